//! `merge_many`: several recipes merged in one pass over their inputs. Each output must be the
//! bytes its recipe merged alone gives, the inputs shared between outputs must be read once,
//! and a failure must leave no output at all.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::*;
use mecha_core::exec::{merge, merge_many, MergeOptions, MergeResult, OutputTarget};
use mecha_core::recipe::{Arg, Recipe, RecipeBuilder, Scalar};
use mecha_core::{DType, ErrorKind};

/// `mixed_model(seed)`, with a NaN in `net.0.bias` when asked.
fn model_tensors(seed: u64, nan_in_bias: bool) -> Vec<(String, Raw)> {
    let mut tensors = mixed_model(seed);
    if nan_in_bias {
        let mut v = values(seed * 100 + 2, 300);
        v[7] = f32::NAN;
        tensors[2].1 = f32_tensor(DType::F16, &[300], &v);
    }
    tensors
}

/// `method(a, b, alpha)` for a method taking two models and an alpha.
fn two_models(method: &str, a: &Path, b: &Path, alpha: f64) -> Recipe {
    let mut r = RecipeBuilder::new();
    let na = r.model(a.to_str().unwrap(), None, Some("weight"));
    let nb = r.model(b.to_str().unwrap(), None, Some("weight"));
    let root = r.merge(method, vec![Arg::Node(na), Arg::Node(nb), Arg::Value(Scalar::Float(alpha))], vec![]).unwrap();
    r.finish(root).unwrap()
}

fn options(threads: usize, chunk: usize) -> MergeOptions {
    MergeOptions { threads, chunk, ..MergeOptions::default() }
}

fn alone(recipe: Recipe, out: &Path, options: &MergeOptions) -> MergeResult {
    let options = MergeOptions { output: OutputTarget::File(out.to_path_buf()), ..options.clone() };
    merge(recipe, &options, &AtomicBool::new(false), None).unwrap()
}

fn many(jobs: Vec<(Recipe, &Path)>, options: &MergeOptions) -> mecha_core::Result<Vec<MergeResult>> {
    let jobs = jobs.into_iter().map(|(r, p)| (r, OutputTarget::File(p.to_path_buf()))).collect();
    merge_many(jobs, options, &AtomicBool::new(false), None)
}

struct Fixture {
    dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    /// Like `b`, with a NaN in `net.0.bias`.
    nan: PathBuf,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, nan) =
        (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"), dir.path().join("nan.safetensors"));
    write_named(&a, &model_tensors(1, false));
    write_named(&b, &model_tensors(2, false));
    write_named(&nan, &model_tensors(2, true));
    Fixture { dir, a, b, nan }
}

/// Merges each recipe alone and all of them with `merge_many`, checks that every output is the
/// bytes of its merge alone, and returns the `merge_many` results.
fn same_as_alone(f: &Fixture, recipes: impl Fn() -> Vec<Recipe>, o: &MergeOptions) -> Vec<MergeResult> {
    let count = recipes().len();
    for (i, r) in recipes().into_iter().enumerate() {
        alone(r, &f.path(&format!("alone-{i}.st")), o);
    }
    let outs: Vec<PathBuf> = (0..count).map(|i| f.path(&format!("many-{i}.st"))).collect();
    let results = many(recipes().into_iter().zip(outs.iter().map(PathBuf::as_path)).collect(), o).unwrap();
    for (i, out) in outs.iter().enumerate() {
        assert!(std::fs::read(f.path(&format!("alone-{i}.st"))).unwrap() == std::fs::read(out).unwrap(), "output {i}");
    }
    results
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn every_output_of_a_sweep_is_the_bytes_of_its_merge_alone_and_the_inputs_are_read_once() {
    let f = fixture();
    let alphas = [0.1, 0.5, 0.9];
    // Streamed in chunks of 4096 elements (the embedding is 25 chunks) and computed whole (slerp).
    for (method, threads, chunk) in [("weighted_sum", 2, 4096), ("weighted_sum", 1, 1 << 15), ("slerp", 2, 4096)] {
        let o = options(threads, chunk);
        let mut alone_read = 0;
        for (i, &alpha) in alphas.iter().enumerate() {
            let report = alone(two_models(method, &f.a, &f.b, alpha), &f.path(&format!("alone-{i}.st")), &o).report;
            alone_read = report.bytes_read;
        }
        let outs: Vec<PathBuf> = (0..alphas.len()).map(|i| f.path(&format!("many-{i}.st"))).collect();
        let jobs = alphas.iter().zip(&outs).map(|(&alpha, out)| (two_models(method, &f.a, &f.b, alpha), out.as_path()));
        let results = many(jobs.collect(), &o).unwrap();
        assert_eq!(results.len(), alphas.len());
        for (i, out) in outs.iter().enumerate() {
            let (expected, got) =
                (std::fs::read(f.path(&format!("alone-{i}.st"))).unwrap(), std::fs::read(out).unwrap());
            assert!(
                expected == got,
                "{method}, threads {threads}, chunk {chunk}: output {i} differs from its merge alone"
            );
            assert_eq!(results[i].report.output.as_deref(), Some(out.as_path()));
            assert_eq!(results[i].report.keys_written, 4);
        }
        // Each input byte is read once, by whichever output's key got there first.
        let read: u64 = results.iter().map(|r| r.report.bytes_read).sum();
        assert_eq!(read, alone_read, "{method}: the sweep read {read} bytes, one merge reads {alone_read}");
        // Each output records its own recipe and the same input hashes.
        assert_eq!(results[0].report.input_hashes, results[2].report.input_hashes);
        assert_ne!(results[0].report.recipe, results[2].report.recipe);
    }
}

#[test]
fn recipes_over_different_inputs_and_keys_merge_together() {
    let f = fixture();
    // Another model with a key the others lack, and one key fewer.
    let mut c_tensors = model_tensors(3, false);
    c_tensors.retain(|(k, _)| k != "net.1.weight");
    c_tensors.push(("net.2.weight".to_string(), f32_tensor(DType::F16, &[10, 10], &values(77, 100))));
    let c = f.path("c.safetensors");
    write_named(&c, &c_tensors);
    let o = options(2, 4096);
    let recipes = || vec![two_models("weighted_sum", &f.a, &f.b, 0.3), two_models("slerp", &f.a, &c, 0.7)];
    let results = same_as_alone(&f, recipes, &o);
    assert_eq!(results[1].report.keys_written, 3);
}

#[test]
fn an_output_whose_inputs_hold_nan_is_merged_again_alone_as_merge_would() {
    let f = fixture();
    let o = options(2, 4096);
    let recipes = || vec![two_models("weighted_sum", &f.a, &f.b, 0.3), two_models("weighted_sum", &f.a, &f.nan, 0.3)];
    let results = same_as_alone(&f, recipes, &o);
    // The NaN bias is omitted from the second output, as merging it alone does.
    assert_eq!(results[0].report.keys_written, 4);
    assert_eq!(results[1].report.keys_written, 3);
    assert!(results[1].report.keys_skipped.iter().any(|s| s.key == "net.0.bias"));
}

#[test]
fn a_sweep_that_cannot_complete_leaves_no_output_and_names_the_output() {
    let f = fixture();
    let o = options(2, 4096);
    let before = files_in(f.dir.path());
    // Two outputs at one path.
    let same = f.path("same.st");
    let err = many(
        vec![
            (two_models("weighted_sum", &f.a, &f.b, 0.1), &same),
            (two_models("weighted_sum", &f.a, &f.b, 0.2), &same),
        ],
        &o,
    )
    .err()
    .unwrap();
    assert!(err.message.contains("outputs 1 and 2"), "{}", err.message);
    // An output onto another merge's input.
    let err = many(
        vec![
            (two_models("weighted_sum", &f.a, &f.b, 0.1), &f.path("fine.st")),
            (two_models("weighted_sum", &f.a, &f.nan, 0.2), &f.b),
        ],
        &o,
    )
    .err()
    .unwrap();
    assert!(err.message.starts_with("output 2 ("), "{}", err.message);
    // A recipe with nothing to merge (no key in common), named by its output.
    let other = f.path("other.safetensors");
    write_named(&other, &[("z.weight".to_string(), f32_tensor(DType::F16, &[4], &values(5, 4)))]);
    let err = many(
        vec![
            (two_models("weighted_sum", &f.a, &f.b, 0.1), &f.path("fine.st")),
            (two_models("weighted_sum", &f.a, &other, 0.2), &f.path("empty.st")),
        ],
        &o,
    )
    .err()
    .unwrap();
    assert!(err.message.starts_with("output 2 (") && err.message.contains("no output keys"), "{}", err.message);
    std::fs::remove_file(&other).unwrap();
    // Cancelled while running: neither output appears, and no temporary file stays.
    let cancel = AtomicBool::new(true);
    let jobs = vec![
        (two_models("weighted_sum", &f.a, &f.b, 0.1), OutputTarget::File(f.path("x.st"))),
        (two_models("slerp", &f.a, &f.b, 0.2), OutputTarget::File(f.path("y.st"))),
    ];
    let err = merge_many(jobs, &o, &cancel, None).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Aborted);
    assert_eq!(files_in(f.dir.path()), before);
    assert!(merge_many(vec![], &o, &AtomicBool::new(false), None).is_err());
}

#[test]
fn a_sweep_of_decomposing_methods_gives_each_output_its_bytes_alone() {
    // rotate and truncate_rank keep their decompositions in the run's cache: the later outputs
    // reuse the first one's, and must still be the bytes of their merges alone.
    let f = fixture();
    let o = options(2, 4096);
    let rotate = |alpha: f64| {
        let mut r = RecipeBuilder::new();
        let na = r.model(f.a.to_str().unwrap(), None, Some("weight"));
        let nb = r.model(f.b.to_str().unwrap(), None, Some("weight"));
        let kwargs = vec![
            ("alignment".to_string(), Arg::Value(Scalar::Float(0.5))),
            ("alpha".to_string(), Arg::Value(Scalar::Float(alpha))),
        ];
        let root = r.merge("rotate", vec![Arg::Node(na), Arg::Node(nb)], kwargs).unwrap();
        r.finish(root).unwrap()
    };
    same_as_alone(&f, || [0.0, 0.5, 1.0].map(rotate).to_vec(), &o);
}
