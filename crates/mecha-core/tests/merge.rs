mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::*;
use mecha_core::exec::plan::MergeDtype;
use mecha_core::exec::{merge, MergeOptions, OutputTarget};
use mecha_core::recipe::{Arg, Recipe, RecipeBuilder, Scalar};
use mecha_core::{DType, ErrorKind};

const SHAPE: [usize; 2] = [37, 1001]; // odd sizes: several chunks and unaligned tails

fn model(dir: &Path, name: &str, dtype: DType, seed: u64) -> (PathBuf, Vec<f32>) {
    let n: usize = SHAPE.iter().product();
    let vals = values(seed, n);
    let raw = f32_tensor(dtype, &SHAPE, &vals);
    let stored = decode(dtype, &raw.data); // what the file really holds
    let ids: Vec<u8> = (0..77i64).flat_map(|v| v.to_le_bytes()).collect();
    let path = dir.join(name);
    write_file(
        &path,
        &[
            ("model.w", raw),
            ("model.b", f32_tensor(dtype, &[3], &values(seed + 100, 3))),
            ("position_ids", Raw { dtype: DType::I64, shape: vec![1, 77], data: ids }),
        ],
    );
    (path, stored)
}

fn options(out: &Path) -> MergeOptions {
    MergeOptions { output: OutputTarget::File(out.to_path_buf()), chunk: 4096, ..MergeOptions::default() }
}

fn f32_options(out: &Path) -> MergeOptions {
    MergeOptions {
        plan: mecha_core::exec::plan::PlanOptions { output_dtype: DType::F32, ..Default::default() },
        ..options(out)
    }
}

/// `weighted_sum(model(a), model(b), alpha)`.
fn weighted(a: &Path, b: &Path, alpha: f64) -> Recipe {
    let mut r = RecipeBuilder::new();
    let na = r.model(a.to_str().unwrap(), None, Some("weight"));
    let nb = r.model(b.to_str().unwrap(), None, Some("weight"));
    let root =
        r.merge("weighted_sum", vec![Arg::Node(na), Arg::Node(nb), Arg::Value(Scalar::Float(alpha))], vec![]).unwrap();
    r.finish(root).unwrap()
}

fn run(recipe: Recipe, opts: &MergeOptions) -> mecha_core::Result<mecha_core::exec::MergeResult> {
    merge(recipe, opts, &AtomicBool::new(false), None)
}

fn output_values(path: &Path, key: &str) -> (DType, Vec<f32>) {
    let (tensors, _) = read_file(path);
    let (dtype, _, data) = &tensors[key];
    (*dtype, decode(*dtype, data))
}

/// Rounds like the output encoder: f32 → f16.
fn to_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

fn torch_lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        w.mul_add(b - a, a)
    } else {
        (w - 1.0).mul_add(b - a, b)
    }
}

#[test]
fn weighted_sum_matches_a_hand_loop_for_each_input_dtype() {
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let dir = tempfile::tempdir().unwrap();
        let (pa, a) = model(dir.path(), "a.safetensors", dtype, 1);
        let (pb, b) = model(dir.path(), "b.safetensors", dtype, 2);
        let recipe = weighted(&pa, &pb, 0.3);
        let out = dir.path().join("out.safetensors");
        let result = run(recipe, &options(&out)).unwrap();
        assert_eq!(result.report.keys_written, 3);

        let (got_dtype, got) = output_values(&out, "model.w");
        assert_eq!(got_dtype, DType::F16);
        for i in 0..got.len() {
            let want = to_f16(torch_lerp(a[i], b[i], 0.3));
            assert_eq!(got[i].to_bits(), want.to_bits(), "{dtype} element {i}: {} vs {want}", got[i]);
            // and it is the real math, within f16 rounding of the exact value
            let exact = a[i] as f64 + 0.3 * (b[i] as f64 - a[i] as f64);
            assert!((got[i] as f64 - exact).abs() <= exact.abs() * 1e-3 + 1e-4);
        }
        // Integer tensors keep their dtype and values.
        let (tensors, meta) = read_file(&out);
        let (pid_dtype, _, pid) = &tensors["position_ids"];
        assert_eq!(*pid_dtype, DType::I64);
        assert_eq!(pid, &(0..77i64).flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        assert!(meta["mecha_recipe"].contains("merge \"weighted_sum\""), "{}", meta["mecha_recipe"]);
    }
}

#[test]
fn add_difference_subtract_n_average_fallback_and_cast() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, a) = model(dir.path(), "a.safetensors", DType::F16, 1);
    let (pb, b) = model(dir.path(), "b.safetensors", DType::BF16, 2);
    let (pc, c) = model(dir.path(), "c.safetensors", DType::F32, 3);
    let n: usize = SHAPE.iter().product();

    // a + 0.5·(b − c)
    let mut r = RecipeBuilder::new();
    let (na, nb, nc) = (
        r.model(pa.to_str().unwrap(), None, Some("weight")),
        r.model(pb.to_str().unwrap(), None, Some("weight")),
        r.model(pc.to_str().unwrap(), None, Some("weight")),
    );
    let d = r.merge("subtract", vec![Arg::Node(nb), Arg::Node(nc)], vec![]).unwrap();
    let root =
        r.merge("add_difference", vec![Arg::Node(na), Arg::Node(d), Arg::Value(Scalar::Float(0.5))], vec![]).unwrap();
    let out = dir.path().join("ad.safetensors");
    run(r.finish(root).unwrap(), &f32_options(&out)).unwrap();
    let (_, got) = output_values(&out, "model.w");
    for i in 0..n {
        assert_eq!(got[i], a[i] + (b[i] - c[i]) * 0.5, "element {i}");
    }

    // mean of three
    let mut r = RecipeBuilder::new();
    let ids: Vec<_> =
        [&pa, &pb, &pc].iter().map(|p| Arg::Node(r.model(p.to_str().unwrap(), None, Some("weight")))).collect();
    let root = r.merge("n_average", ids, vec![]).unwrap();
    let out = dir.path().join("avg.safetensors");
    run(r.finish(root).unwrap(), &f32_options(&out)).unwrap();
    let (_, got) = output_values(&out, "model.w");
    for i in 0..n {
        let want = torch_lerp(torch_lerp(a[i], b[i], 0.5), c[i], 1.0 / 3.0);
        assert_eq!(got[i], want, "element {i}");
        assert!((got[i] - (a[i] + b[i] + c[i]) / 3.0).abs() < 1e-6);
    }

    // fallback: a model missing a key falls back to the other; cast to bfloat16 rounds.
    let partial = dir.path().join("partial.safetensors");
    write_file(&partial, &[("model.b", f32_tensor(DType::F32, &[3], &[9.0, 8.0, 7.0]))]);
    let mut r = RecipeBuilder::new();
    let np = r.model(partial.to_str().unwrap(), None, Some("weight"));
    let na = r.model(pa.to_str().unwrap(), None, Some("weight"));
    let fb = r.merge("fallback", vec![Arg::Node(np), Arg::Node(na)], vec![]).unwrap();
    let root = r
        .merge("cast", vec![Arg::Node(fb)], vec![("dtype".into(), Arg::Value(Scalar::Str("bfloat16".into())))])
        .unwrap();
    let out = dir.path().join("fb.safetensors");
    run(r.finish(root).unwrap(), &f32_options(&out)).unwrap();
    assert_eq!(output_values(&out, "model.b").1, vec![9.0, 8.0, 7.0]);
    let (_, w) = output_values(&out, "model.w");
    for i in 0..n {
        assert_eq!(w[i], half::bf16::from_f32(a[i]).to_f32());
    }
}

#[test]
fn output_is_identical_for_any_thread_count_and_chunk_size() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, _) = model(dir.path(), "a.safetensors", DType::F16, 1);
    let (pb, _) = model(dir.path(), "b.safetensors", DType::BF16, 2);
    let recipe = || weighted(&pa, &pb, 0.7);
    let mut outputs = vec![];
    for (threads, chunk) in [(1, 1 << 15), (2, 4096), (4, 1000), (3, 7)] {
        let out = dir.path().join(format!("out-{threads}-{chunk}.safetensors"));
        run(recipe(), &MergeOptions { threads, chunk, ..options(&out) }).unwrap();
        outputs.push(std::fs::read(&out).unwrap());
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn in_memory_output_and_merge_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, a) = model(dir.path(), "a.safetensors", DType::F32, 1);
    let (pb, b) = model(dir.path(), "b.safetensors", DType::F32, 2);
    for merge_dtype in [MergeDtype::F32, MergeDtype::F64, MergeDtype::Rounded(DType::F16)] {
        let recipe = weighted(&pa, &pb, 0.25);
        let opts = MergeOptions {
            output: OutputTarget::Memory,
            plan: mecha_core::exec::plan::PlanOptions { merge_dtype, output_dtype: DType::F32, ..Default::default() },
            ..MergeOptions::default()
        };
        let result = run(recipe, &opts).unwrap();
        let w = result.tensors.iter().find(|t| t.name == "model.w").unwrap();
        assert_eq!(w.shape, SHAPE.to_vec());
        let got = decode(w.dtype, &w.data);
        for i in (0..got.len()).step_by(97) {
            let want = match merge_dtype {
                MergeDtype::F32 => torch_lerp(a[i], b[i], 0.25),
                MergeDtype::F64 => (a[i] as f64 + 0.25 * (b[i] as f64 - a[i] as f64)) as f32,
                MergeDtype::Rounded(_) => to_f16(torch_lerp(to_f16(a[i]), to_f16(b[i]), 0.25)),
            };
            assert!((got[i] - want).abs() <= f32::EPSILON * want.abs(), "{merge_dtype:?} {i}: {} vs {want}", got[i]);
        }
    }
}

#[test]
fn shape_mismatch_is_a_typed_error_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, _) = model(dir.path(), "a.safetensors", DType::F16, 1);
    let odd = dir.path().join("odd.safetensors");
    write_file(&odd, &[("model.w", f32_tensor(DType::F16, &[2, 2], &[0.0; 4]))]);
    let recipe = weighted(&pa, &odd, 0.5);
    let out = dir.path().join("out.safetensors");
    let err = run(recipe, &options(&out)).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Shape);
    assert!(
        err.message.contains("a.safetensors")
            && err.message.contains("odd.safetensors")
            && err.message.contains("model.w"),
        "{}",
        err.message
    );
    assert_eq!(err.key.as_deref(), Some("model.w"));
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "only the two inputs");
}

#[test]
fn missing_and_corrupt_inputs_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, _) = model(dir.path(), "a.safetensors", DType::F16, 1);
    let bytes = std::fs::read(&pa).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    for bad in [dir.path().join("nope.safetensors"), cut] {
        let recipe = weighted(&pa, &bad, 0.5);
        let out = dir.path().join("out.safetensors");
        let err = run(recipe, &options(&out)).err().unwrap();
        assert_eq!(err.kind, ErrorKind::Safetensors);
        assert!(err.message.contains(bad.file_name().unwrap().to_str().unwrap()), "{}", err.message);
        assert!(err.node.as_deref().unwrap().contains("b: model"), "{:?}", err.node);
        assert!(!out.exists());
    }
}

#[test]
fn cancelling_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, _) = model(dir.path(), "a.safetensors", DType::F16, 1);
    let (pb, _) = model(dir.path(), "b.safetensors", DType::F16, 2);
    let recipe = weighted(&pa, &pb, 0.5);
    let out = dir.path().join("out.safetensors");
    let err = merge(recipe, &options(&out), &AtomicBool::new(true), None).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Aborted);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no output and no temporary file");
}

#[test]
fn keys_missing_from_an_input_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, _) = model(dir.path(), "a.safetensors", DType::F16, 1);
    let partial = dir.path().join("partial.safetensors");
    write_file(&partial, &[("model.b", f32_tensor(DType::F16, &[3], &[1.0, 2.0, 3.0]))]);
    let recipe = weighted(&pa, &partial, 0.5);
    let result = run(recipe, &MergeOptions::default()).unwrap();
    assert_eq!(result.report.keys_written, 1);
    let mut skipped: Vec<_> =
        result.report.keys_skipped.iter().map(|s| (s.key.as_str(), s.reason.contains("partial.safetensors"))).collect();
    skipped.sort();
    assert_eq!(skipped, vec![("model.w", true), ("position_ids", true)]);
}

#[test]
fn progress_is_reported_and_ends_complete() {
    use mecha_core::exec::run::{Progress, ProgressSink};
    use std::sync::Mutex;
    struct Collect(Mutex<Vec<Progress>>);
    impl ProgressSink for Collect {
        fn report(&self, p: &Progress) {
            self.0.lock().unwrap().push(p.clone());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (pa, _) = model(dir.path(), "a.safetensors", DType::F16, 1);
    let (pb, _) = model(dir.path(), "b.safetensors", DType::F16, 2);
    let recipe = weighted(&pa, &pb, 0.5);
    let sink = Collect(Mutex::new(vec![]));
    let opts = MergeOptions {
        threads: 2,
        chunk: 1000,
        progress_interval: std::time::Duration::ZERO,
        ..MergeOptions::default()
    };
    let result = merge(recipe, &opts, &AtomicBool::new(false), Some(&sink)).unwrap();
    let reports = sink.0.into_inner().unwrap();
    assert!(reports.len() >= 2, "{reports:?}");
    let last = reports.last().unwrap();
    assert_eq!((last.keys_done, last.keys_total), (3, 3));
    assert_eq!(last.bytes_done, last.bytes_total);
    assert_eq!(last.bytes_done, result.report.bytes_written);
    assert!(reports.windows(2).all(|w| w[0].keys_done <= w[1].keys_done));
}

#[test]
fn inputs_with_nan_are_treated_as_missing_like_sd_mecha() {
    let dir = tempfile::tempdir().unwrap();
    let (pb, b) = model(dir.path(), "b.safetensors", DType::F16, 2);
    let nan = dir.path().join("nan.safetensors");
    let mut poisoned = values(3, SHAPE.iter().product());
    poisoned[17] = f32::NAN;
    write_file(
        &nan,
        &[
            ("model.w", f32_tensor(DType::F16, &SHAPE, &poisoned)),
            ("model.b", f32_tensor(DType::F16, &[3], &[1.0, 2.0, 3.0])),
        ],
    );
    let two = |method: &str| {
        let mut r = RecipeBuilder::new();
        let (nn, nb) =
            (r.model(nan.to_str().unwrap(), None, Some("weight")), r.model(pb.to_str().unwrap(), None, Some("weight")));
        let root = r.merge(method, vec![Arg::Node(nn), Arg::Node(nb)], vec![]).unwrap();
        r.finish(root).unwrap()
    };
    // weighted_sum: the key is skipped and the reason names the file.
    let out = dir.path().join("ws.safetensors");
    let result = run(two("weighted_sum"), &options(&out)).unwrap();
    let skipped: Vec<_> = result.report.keys_skipped.iter().filter(|s| s.key == "model.w").collect();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].reason.contains("non-finite") && skipped[0].reason.contains("nan.safetensors"), "{skipped:?}");
    assert!(read_file(&out).0.contains_key("model.b"));
    // fallback: the other input fills in.
    let out = dir.path().join("fb.safetensors");
    run(two("fallback"), &f32_options(&out)).unwrap();
    assert_eq!(output_values(&out, "model.w").1, b);
    // Turned off, the NaN goes through and is reported.
    let out = dir.path().join("kept.safetensors");
    let keep = MergeOptions { omit_non_finite_inputs: false, ..options(&out) };
    let result = run(two("weighted_sum"), &keep).unwrap();
    assert_eq!(result.report.non_finite_outputs, vec!["model.w".to_string()]);
    assert!(output_values(&out, "model.w").1[17].is_nan());
}
