//! Reproducible outputs: the engine, the options and a content hash of each input recorded next
//! to the recipe (hashes computed while streaming, independent of threads and chunk size), and
//! `verify` replaying the recorded recipe and naming an input that changed.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::*;
use mecha_core::exec::verify::{verify, VerifyOptions};
use mecha_core::exec::{hashes, merge, MergeOptions, MergeResult, OutputTarget};
use mecha_core::recipe::{Arg, Recipe, RecipeBuilder, Scalar};
use mecha_core::ErrorKind;

fn weighted(a: &Path, b: &Path) -> Recipe {
    let mut r = RecipeBuilder::new();
    let na = r.model(a.to_str().unwrap(), None, Some("weight"));
    let nb = r.model(b.to_str().unwrap(), None, Some("weight"));
    let root =
        r.merge("weighted_sum", vec![Arg::Node(na), Arg::Node(nb), Arg::Value(Scalar::Float(0.3))], vec![]).unwrap();
    r.finish(root).unwrap()
}

fn to_file(path: &Path, threads: usize, chunk: usize) -> MergeOptions {
    MergeOptions { output: OutputTarget::File(path.to_path_buf()), threads, chunk, ..MergeOptions::default() }
}

fn run_merge(recipe: Recipe, options: &MergeOptions) -> MergeResult {
    merge(recipe, options, &AtomicBool::new(false), None).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    out: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, out) =
        (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"), dir.path().join("m.safetensors"));
    write_named(&a, &mixed_model(1));
    write_named(&b, &mixed_model(2));
    Fixture { _dir: dir, a, b, out }
}

fn metadata(path: &Path) -> HashMap<String, String> {
    read_file(path).1
}

#[test]
fn outputs_record_engine_options_and_input_hashes() {
    let f = fixture();
    let result = run_merge(weighted(&f.a, &f.b), &to_file(&f.out, 0, mecha_core::exec::run::DEFAULT_CHUNK));
    let meta = metadata(&f.out);
    assert_eq!(meta["mecha_engine"], mecha_core::exec::engine_version());
    let options: serde_json::Value = serde_json::from_str(&meta["mecha_options"]).unwrap();
    assert_eq!(options["output_dtype"], "F16");
    assert_eq!(options["merge_dtype"], "float32");
    let inputs: serde_json::Value = serde_json::from_str(&meta["mecha_inputs"]).unwrap();
    let inputs = inputs.as_array().unwrap();
    assert_eq!(inputs.len(), 2);
    assert_eq!(result.report.input_hashes.len(), 2);
    for (recorded, reported) in inputs.iter().zip(&result.report.input_hashes) {
        let hash = recorded[hashes::ALGORITHM].as_str().unwrap();
        assert_eq!(hash, reported.hash);
        assert_eq!(hash.len(), 32);
        assert_ne!(hash, hashes::reserved(), "the reserved field was filled");
        assert_eq!(recorded["model"].as_str().unwrap(), reported.model);
    }
    assert_eq!(inputs[0]["model"].as_str().unwrap(), f.a.to_str().unwrap());
    assert_ne!(result.report.input_hashes[0].hash, result.report.input_hashes[1].hash);
    // The tensors are where the first header put them: the rewritten header kept its length.
    let (tensors, _) = read_file(&f.out);
    assert_eq!(tensors.len(), 4);
}

#[test]
fn input_hashes_do_not_depend_on_threads_or_chunk_size() {
    let f = fixture();
    let hashes_with = |threads: usize, chunk: usize| {
        run_merge(weighted(&f.a, &f.b), &to_file(&f.out, threads, chunk))
            .report
            .input_hashes
            .into_iter()
            .map(|h| h.hash)
            .collect::<Vec<_>>()
    };
    let reference = hashes_with(2, mecha_core::exec::run::DEFAULT_CHUNK);
    // 1000 elements: reads of 2000/4000 bytes, never a whole block, so the blocks are read at the end.
    assert_eq!(hashes_with(1, 1000), reference);
    assert_eq!(hashes_with(2, 1 << 20), reference);
    assert_eq!(hashes_with(3, 40_000), reference);
}

#[test]
fn verify_reproduces_a_merge_and_names_an_input_that_changed() {
    let f = fixture();
    run_merge(weighted(&f.a, &f.b), &to_file(&f.out, 0, mecha_core::exec::run::DEFAULT_CHUNK));
    let report = verify(&f.out, &VerifyOptions::default()).unwrap();
    assert!(report.reproducible, "{:?}", report.problems);
    assert!(report.problems.is_empty());
    assert_eq!(report.comparison.keys_compared, 4);
    assert!(report.inputs.iter().all(|i| i.matches()));
    assert_eq!(report.recorded_engine.as_deref(), Some(mecha_core::exec::engine_version().as_str()));

    // One value of b changes (same shapes, same header): b is named, and the key that reads it.
    let mut changed = mixed_model(2);
    changed[2].1.data[0] ^= 0x10;
    write_named(&f.b, &changed);
    let report = verify(&f.out, &VerifyOptions { threads: 1, ..Default::default() }).unwrap();
    assert!(!report.reproducible);
    let b = f.b.to_str().unwrap();
    let named: Vec<&String> = report.problems.iter().filter(|p| p.contains(b) && p.contains("has changed")).collect();
    assert_eq!(named.len(), 1, "{:?}", report.problems);
    assert!(report.inputs.iter().find(|i| i.model == b).is_some_and(|i| !i.matches()));
    assert!(report.inputs.iter().find(|i| i.model == f.a.to_str().unwrap()).is_some_and(|i| i.matches()));
    assert_eq!(report.comparison.differing_keys, vec!["net.0.bias".to_string()]);
}

#[test]
fn a_changed_tensor_the_output_does_not_show_still_changes_the_hash() {
    let f = fixture();
    run_merge(weighted(&f.a, &f.b), &to_file(&f.out, 0, mecha_core::exec::run::DEFAULT_CHUNK));
    // The lowest mantissa bit of one f32 value of a: weighted 0.7 into an f16 output, the output
    // bytes are the same, but the input is not the one merged.
    let mut changed = mixed_model(1);
    changed[1].1.data[0] ^= 0x01;
    write_named(&f.a, &changed);
    let report = verify(&f.out, &VerifyOptions::default()).unwrap();
    assert!(!report.reproducible);
    assert!(report.comparison.differing_keys.is_empty(), "{:?}", report.comparison.differing_keys);
    assert!(report.problems.iter().any(|p| p.contains(f.a.to_str().unwrap())), "{:?}", report.problems);
}

#[test]
fn verify_checks_sharded_outputs_and_refuses_files_without_a_recipe() {
    let f = fixture();
    let folder = f.out.with_extension("d");
    let options = MergeOptions {
        output: OutputTarget::Sharded { folder: folder.clone(), max_shard_bytes: 100_000 },
        ..MergeOptions::default()
    };
    run_merge(weighted(&f.a, &f.b), &options);
    assert!(folder.join("model.safetensors.index.json").exists());
    let report = verify(&folder, &VerifyOptions::default()).unwrap();
    assert!(report.reproducible, "{:?}", report.problems);

    let no_recipe = MergeOptions { embed_recipe: mecha_core::exec::EmbedRecipe::None, ..to_file(&f.out, 0, 1 << 15) };
    let result = run_merge(weighted(&f.a, &f.b), &no_recipe);
    assert!(result.report.input_hashes.is_empty());
    assert!(!metadata(&f.out).contains_key("mecha_inputs"));
    let err = verify(&f.out, &VerifyOptions::default()).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Safetensors);
    assert!(err.message.contains("records no recipe"), "{}", err.message);
}
