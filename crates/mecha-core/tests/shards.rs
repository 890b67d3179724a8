//! Hugging Face sharded checkpoints in and out: an index (or its folder) read as one state dict,
//! sharded outputs written whole or not at all, and damaged or hostile indexes as typed errors.
//! Checkpoints here have a real LLM key layout (Qwen2's), small shapes.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::*;
use mecha_core::exec::{merge, MergeOptions, MergeResult, OutputTarget};
use mecha_core::io::reader::SafetensorsFile;
use mecha_core::recipe::{Arg, Recipe, RecipeBuilder, Scalar};
use mecha_core::{DType, ErrorKind, MechaError};

/// Qwen2's keys for `layers` decoder layers, hidden size 16, MLP 40, vocabulary 50.
fn qwen_shapes(layers: usize) -> Vec<(String, Vec<usize>)> {
    let (h, m, v, kv) = (16, 40, 50, 8);
    let mut keys = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.q_proj.bias", vec![h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![m, h]),
            ("mlp.up_proj.weight", vec![m, h]),
            ("mlp.down_proj.weight", vec![h, m]),
        ] {
            keys.push((format!("{p}.{name}"), shape));
        }
    }
    keys.push(("model.norm.weight".to_string(), vec![h]));
    keys.push(("lm_head.weight".to_string(), vec![v, h]));
    keys
}

fn qwen_tensors(seed: u64) -> Vec<(String, Raw)> {
    qwen_shapes(3)
        .into_iter()
        .enumerate()
        .map(|(i, (k, s))| {
            let n = s.iter().product();
            (k, f32_tensor(DType::BF16, &s, &values(seed * 1000 + i as u64, n)))
        })
        .collect()
}

/// Writes `tensors` as `shards` files of a checkpoint in `folder`, with its index.
fn write_sharded(folder: &Path, tensors: &[(String, Raw)], shards: usize) -> PathBuf {
    std::fs::create_dir_all(folder).unwrap();
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, group) in tensors.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        let listed: Vec<(&str, Raw)> = group
            .iter()
            .map(|(k, r)| (k.as_str(), Raw { dtype: r.dtype, shape: r.shape.clone(), data: r.data.clone() }))
            .collect();
        write_file(&folder.join(&name), &listed);
        for (k, _) in group {
            weight_map.insert(k.clone(), name.clone().into());
        }
    }
    let index = folder.join("model.safetensors.index.json");
    let total: usize = tensors.iter().map(|(_, r)| r.data.len()).sum();
    let json = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(&index, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    index
}

fn write_single(path: &Path, tensors: &[(String, Raw)]) {
    let listed: Vec<(&str, Raw)> = tensors
        .iter()
        .map(|(k, r)| (k.as_str(), Raw { dtype: r.dtype, shape: r.shape.clone(), data: r.data.clone() }))
        .collect();
    write_file(path, &listed);
}

fn weighted(a: &Path, b: &Path, alpha: f64) -> Recipe {
    let mut r = RecipeBuilder::new();
    let na = r.model(a.to_str().unwrap(), None, Some("weight"));
    let nb = r.model(b.to_str().unwrap(), None, Some("weight"));
    let root =
        r.merge("weighted_sum", vec![Arg::Node(na), Arg::Node(nb), Arg::Value(Scalar::Float(alpha))], vec![]).unwrap();
    r.finish(root).unwrap()
}

fn try_run(recipe: Recipe, options: &MergeOptions) -> mecha_core::Result<MergeResult> {
    merge(recipe, options, &AtomicBool::new(false), None)
}

fn sharded_to(folder: &Path, max_shard_bytes: u64) -> MergeOptions {
    MergeOptions {
        output: OutputTarget::Sharded { folder: folder.to_path_buf(), max_shard_bytes },
        plan: mecha_core::exec::plan::PlanOptions { output_dtype: DType::BF16, ..Default::default() },
        ..MergeOptions::default()
    }
}

fn bf16_memory() -> MergeOptions {
    MergeOptions {
        plan: mecha_core::exec::plan::PlanOptions { output_dtype: DType::BF16, ..Default::default() },
        ..f32_memory()
    }
}

/// name → bytes of an in-memory result.
fn by_name(result: &MergeResult) -> std::collections::BTreeMap<String, Vec<u8>> {
    result.tensors.iter().map(|t| (t.name.clone(), t.data.clone())).collect()
}

/// Every tensor of a model (file or checkpoint), read through this library's reader.
fn read_all(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let file = SafetensorsFile::open(path).unwrap();
    file.tensors().iter().map(|(k, e)| (k.clone(), file.read_tensor(e).unwrap())).collect()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn expect_err(result: mecha_core::Result<MergeResult>) -> MechaError {
    match result {
        Ok(_) => panic!("the merge should have failed"),
        Err(e) => e,
    }
}

#[test]
fn a_sharded_checkpoint_reads_as_one_state_dict() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (qwen_tensors(1), qwen_tensors(2));
    let index = write_sharded(&dir.path().join("a"), &a, 3);
    let (single_a, single_b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    write_single(&single_a, &a);
    write_single(&single_b, &b);

    let file = SafetensorsFile::open(&index).unwrap();
    assert_eq!(file.shard_count(), 3);
    assert_eq!(file.tensors().len(), a.len());
    let total: usize = a.iter().map(|(_, r)| r.data.len()).sum();
    assert_eq!(file.metadata().get("total_size"), Some(&total.to_string()), "the index's metadata is kept");
    assert_eq!(read_all(&index), read_all(&single_a), "every tensor reads back from its shard");
    assert_eq!(read_all(&dir.path().join("a")), read_all(&single_a), "the folder opens its index");

    // merged with a single file, the sharded model gives what its single-file copy gives
    let from_shards = try_run(weighted(&dir.path().join("a"), &single_b, 0.3), &bf16_memory()).unwrap();
    let from_file = try_run(weighted(&single_a, &single_b, 0.3), &bf16_memory()).unwrap();
    assert_eq!(from_shards.tensors.len(), a.len(), "an unknown (LLM) architecture merges by structure");
    assert_eq!(by_name(&from_shards), by_name(&from_file));
}

#[test]
fn sharded_outputs_follow_the_transformers_layout_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    write_single(&a, &qwen_tensors(1));
    write_single(&b, &qwen_tensors(2));
    let expected = by_name(&try_run(weighted(&a, &b, 0.5), &bf16_memory()).unwrap());

    let out = dir.path().join("merged");
    let max = 4000u64;
    let report = try_run(weighted(&a, &b, 0.5), &sharded_to(&out, max)).unwrap().report;
    assert_eq!(report.output.as_deref(), Some(out.as_path()));
    let names = listing(&out);
    let shards: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors")).collect();
    assert!(shards.len() >= 4, "{names:?}");
    let count = shards.len();
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(**s, format!("model-{:05}-of-{count:05}.safetensors", i + 1));
    }
    assert_eq!(names.len(), count + 1, "the shards and the index, nothing else: {names:?}");

    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    assert_eq!(weight_map.len(), expected.len());
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
    let mut previous = String::new();
    for (i, shard) in shards.iter().enumerate() {
        let (tensors, metadata) = read_file(&out.join(shard));
        assert_eq!(metadata.get("format").map(String::as_str), Some("pt"), "transformers requires it");
        assert!(metadata.contains_key("mecha_recipe"));
        let bytes: usize = tensors.values().map(|(_, _, d)| d.len()).sum();
        assert!(bytes as u64 <= max || tensors.len() == 1, "shard {i} holds {bytes} bytes");
        for (name, (_, _, data)) in &tensors {
            assert_eq!(weight_map[name].as_str(), Some(shard.as_str()), "the index places {name} in its shard");
            assert_eq!(data, &expected[name]);
        }
        assert!(previous < **shard);
        previous = shard.to_string();
    }
    assert_eq!(read_all(&out), expected, "the output reads back as one model");
    assert_eq!(listing(dir.path()), ["a.safetensors", "b.safetensors", "merged"], "no debris next to it");

    // written again: the previous checkpoint is replaced whole
    try_run(weighted(&a, &b, 0.25), &sharded_to(&out, max)).unwrap();
    let again = by_name(&try_run(weighted(&a, &b, 0.25), &bf16_memory()).unwrap());
    assert_eq!(read_all(&out), again);
    assert_eq!(listing(dir.path()), ["a.safetensors", "b.safetensors", "merged"]);

    // a model that fits in one shard is `model.safetensors` alone, as save_pretrained writes it
    let small = dir.path().join("small");
    try_run(weighted(&a, &b, 0.5), &sharded_to(&small, 1 << 30)).unwrap();
    assert_eq!(listing(&small), ["model.safetensors"]);
    assert_eq!(read_all(&small), expected);
}

#[test]
fn sharded_outputs_appear_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
    write_single(&a, &qwen_tensors(1));
    write_single(&b, &qwen_tensors(2));

    // cancelled: no folder, no temporary folder
    let out = dir.path().join("merged");
    let e = expect_err(merge(weighted(&a, &b, 0.5), &sharded_to(&out, 4000), &AtomicBool::new(true), None));
    assert_eq!(e.kind, ErrorKind::Aborted, "{e}");
    assert_eq!(listing(dir.path()), ["a.safetensors", "b.safetensors"]);

    // a folder holding anything else is not replaced
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let e = expect_err(try_run(weighted(&a, &b, 0.5), &sharded_to(&out, 4000)));
    assert_eq!(e.kind, ErrorKind::Output);
    assert!(e.message.contains("notes.txt") && e.message.contains("new or empty folder"), "{e}");
    assert_eq!(listing(&out), ["notes.txt"]);

    // nor a folder holding an input, nor a file
    let inputs = dir.path().join("inputs");
    write_sharded(&inputs, &qwen_tensors(3), 2);
    let e = expect_err(try_run(weighted(&inputs, &b, 0.5), &sharded_to(&inputs, 4000)));
    assert_eq!(e.kind, ErrorKind::Output);
    assert!(e.message.contains("one of the merge's inputs"), "{e}");
    let e = expect_err(try_run(weighted(&a, &b, 0.5), &sharded_to(&b, 4000)));
    assert_eq!(e.kind, ErrorKind::Output, "{e}");
    // and a single-file output cannot overwrite a shard of an input
    let shard = inputs.join("model-00001-of-00002.safetensors");
    let options = MergeOptions { output: OutputTarget::File(shard.clone()), ..MergeOptions::default() };
    let e = expect_err(try_run(weighted(&inputs, &b, 0.5), &options));
    assert!(e.message.contains("one of the merge's inputs"), "{e}");
    // nor its index
    let index = inputs.join("model.safetensors.index.json");
    let options = MergeOptions { output: OutputTarget::File(index.clone()), ..MergeOptions::default() };
    let e = expect_err(try_run(weighted(&inputs, &b, 0.5), &options));
    assert!(e.message.contains("one of the merge's inputs"), "{e}");
    assert_eq!(listing(&inputs).len(), 3, "the checkpoint is untouched");
}

#[test]
fn damaged_or_hostile_indexes_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = qwen_tensors(1);
    let open_err = |path: &Path| SafetensorsFile::open(path).expect_err("the open should fail");
    let fresh = |name: &str| {
        let folder = dir.path().join(name);
        let index = write_sharded(&folder, &tensors, 2);
        (folder, index)
    };
    let rewrite = |index: &Path, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(index).unwrap()).unwrap();
        edit(&mut json);
        std::fs::write(index, serde_json::to_vec(&json).unwrap()).unwrap();
    };

    // a shard is missing
    let (folder, index) = fresh("missing");
    std::fs::remove_file(folder.join("model-00002-of-00002.safetensors")).unwrap();
    let e = open_err(&index);
    assert_eq!(e.kind, ErrorKind::Safetensors);
    assert!(e.message.contains("model-00002-of-00002.safetensors") && e.message.contains("missing"), "{e}");

    // the index lists a tensor its shard does not hold
    let (_, index) = fresh("unlisted-in-shard");
    rewrite(&index, &|j| {
        j["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors".into();
    });
    let e = open_err(&index);
    assert!(e.message.contains("model.extra.weight") && e.message.contains("does not hold it"), "{e}");
    assert_eq!(e.key.as_deref(), Some("model.extra.weight"));

    // a shard holds a tensor the index places elsewhere, or does not list
    let (_, index) = fresh("misplaced");
    rewrite(&index, &|j| {
        j["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors".into();
    });
    let e = open_err(&index);
    assert!(e.message.contains("lm_head.weight") && e.message.contains("disagree"), "{e}");
    let (_, index) = fresh("unlisted");
    rewrite(&index, &|j| {
        j["weight_map"].as_object_mut().unwrap().remove("lm_head.weight");
    });
    let e = open_err(&index);
    assert!(e.message.contains("lm_head.weight") && e.message.contains("does not list it"), "{e}");

    // shard names outside the folder are refused before anything is opened
    for hostile in ["../a.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""] {
        let (_, index) = fresh("hostile");
        rewrite(&index, &|j| {
            j["weight_map"]["lm_head.weight"] = hostile.into();
        });
        let e = open_err(&index);
        assert!(e.message.contains("not a file name inside the index's folder"), "{hostile}: {e}");
        std::fs::remove_dir_all(dir.path().join("hostile")).unwrap();
    }

    // not JSON, no weight_map
    let (_, index) = fresh("garbage");
    std::fs::write(&index, b"{ not json").unwrap();
    assert!(open_err(&index).message.contains("not valid JSON"));
    std::fs::write(&index, b"{\"metadata\": {}}").unwrap();
    assert!(open_err(&index).message.contains("weight_map"));

    // a folder of several files and no index names the problem; one with one file opens it
    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    write_single(&loose.join("one.safetensors"), &tensors);
    assert_eq!(SafetensorsFile::open(&loose).unwrap().tensors().len(), tensors.len());
    write_single(&loose.join("two.safetensors"), &tensors);
    let e = open_err(&loose);
    assert!(e.message.contains("2 .safetensors files") && e.message.contains("no .safetensors.index.json"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(open_err(&empty).message.contains("no .safetensors file"));

    // a merge naming a damaged checkpoint fails with the node and the file
    let (folder, _) = fresh("in-merge");
    std::fs::remove_file(folder.join("model-00001-of-00002.safetensors")).unwrap();
    let single = dir.path().join("single.safetensors");
    write_single(&single, &tensors);
    let e = expect_err(try_run(weighted(&folder, &single, 0.5), &bf16_memory()));
    assert_eq!(e.kind, ErrorKind::Safetensors);
    assert!(e.message.contains("model-00001-of-00002.safetensors"), "{e}");
}

#[test]
fn shards_are_filled_in_order_up_to_the_limit() {
    use mecha_core::io::shards::assign_shards;
    use mecha_core::io::writer::PlannedTensor;
    let t = |n: usize| PlannedTensor { name: format!("t{n}"), dtype: DType::U8, shape: vec![n] };
    let tensors = [t(4), t(4), t(3), t(10), t(1), t(1)];
    // 8 | 3 | 10 (alone: larger than the limit) | 2
    assert_eq!(assign_shards(&tensors, 8), [0, 0, 1, 2, 3, 3]);
    assert_eq!(assign_shards(&tensors, 100), [0; 6]);
    assert!(assign_shards(&[], 8).is_empty());
}
