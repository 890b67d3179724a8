//! randperm and rebasin on sdxl-sgm blocks with real key names and shapes: the permuted model
//! computes what the original does, the permutation is real and reproducible, and rebasin
//! undoes a permutation exactly and lines unrelated weights up with a reference.

mod common;
mod sdxl_blocks;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use common::*;
use mecha_core::exec::{merge, MergeOptions};
use mecha_core::recipe::{Arg, Recipe, RecipeBuilder, Scalar};
use mecha_core::ErrorKind;
use sdxl_blocks::*;

/// The keys a permutation moves; every other key is copied.
fn is_permuted(key: &str) -> bool {
    const SUFFIXES: [&str; 21] = [
        "q_proj.weight",
        "q_proj.bias",
        "k_proj.weight",
        "k_proj.bias",
        "v_proj.weight",
        "v_proj.bias",
        "out_proj.weight",
        "in_proj_weight",
        "in_proj_bias",
        "to_q.weight",
        "to_k.weight",
        "to_v.weight",
        "to_out.0.weight",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "c_fc.weight",
        "c_fc.bias",
        "c_proj.weight",
        "ff.net.0.proj.weight",
        "ff.net.0.proj.bias",
    ];
    SUFFIXES.iter().any(|s| key.ends_with(s))
        || key.ends_with("ff.net.2.weight")
        || key.starts_with(&format!("{TIME}0."))
        || key == format!("{TIME}2.weight")
        || key.starts_with(&format!("{LABEL}0.0."))
        || key == format!("{LABEL}0.2.weight")
}

fn model_node(r: &mut RecipeBuilder, path: &Path, config: Option<&str>) -> usize {
    r.model(path.to_str().unwrap(), config, Some("weight"))
}

fn randperm(path: &Path, seed: i64, config: Option<&str>) -> Recipe {
    let mut r = RecipeBuilder::new();
    let a = model_node(&mut r, path, config);
    let root = r.merge("randperm", vec![Arg::Node(a), Arg::Value(Scalar::Int(seed))], vec![]).unwrap();
    r.finish(root).unwrap()
}

fn merged(recipe: Recipe, threads: usize) -> mecha_core::exec::MergeResult {
    run(recipe, &MergeOptions { threads, ..f32_memory() })
}

#[test]
fn randperm_keeps_what_every_block_computes_and_really_permutes() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_model(dir.path(), "a", 1, &ALL, &[], |_| 1.0);
    let result = merged(randperm(&model.path, 7, Some("sdxl-sgm")), 2);
    let after = weights_of(&result);
    // (the config's missing-key handler adds zeros for CLIP-L layer 11 and CLIP-G resblock 31)
    assert!(model.weights.keys().all(|k| after.contains_key(k)), "every key is written");
    for (key, (shape, values)) in &model.weights {
        assert_eq!(&after[key].0, shape, "{key}");
        if is_permuted(key) {
            assert_ne!(&after[key].1, values, "{key} is permuted");
            let (mut x, mut y) = (values.clone(), after[key].1.clone());
            x.sort_by(f32::total_cmp);
            y.sort_by(f32::total_cmp);
            assert_eq!(x, y, "{key} holds the same values, moved");
        } else {
            assert_eq!(&after[key].1, values, "{key} is copied");
        }
    }
    assert_same_function(&model.weights, &after, false, true);

    // Moving a head of q without k changes the function: the check above would see it.
    let mut broken = after.clone();
    let q = format!("{UNET}attn1.to_q.weight");
    let (shape, values) = broken[&q].clone();
    let cols = shape[1];
    let mut swapped = values.clone();
    swapped[..64 * cols].copy_from_slice(&values[64 * cols..128 * cols]);
    swapped[64 * cols..128 * cols].copy_from_slice(&values[..64 * cols]);
    broken.insert(q, (shape, swapped));
    let (a, b) =
        (Attention::new(&model.weights, &format!("{UNET}attn1.")), Attention::new(&broken, &format!("{UNET}attn1.")));
    let x = inputs(11, 5, a.q.cols);
    let diff = a.apply(&x, &x).iter().zip(b.apply(&x, &x)).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
    assert!(diff > 1e-3, "a q-only head swap must change the output ({diff})");
}

#[test]
fn randperm_depends_on_the_seed_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_model(dir.path(), "a", 2, &[CLIP_L, UNET], &[], |_| 1.0);
    let bytes = |seed, threads| {
        let result = merged(randperm(&model.path, seed, Some("sdxl-sgm")), threads);
        result.tensors.iter().map(|t| (t.name.clone(), t.data.clone())).collect::<Vec<_>>()
    };
    let one = bytes(5, 1);
    assert_eq!(one, bytes(5, 2), "same seed, 1 and 2 threads: the same bytes");
    assert_eq!(one, bytes(5, 1));
    let other = bytes(6, 2);
    let q = format!("{CLIP_L}self_attn.q_proj.weight");
    let find = |r: &Vec<(String, Vec<u8>)>, k: &str| r.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert_ne!(find(&one, &q), find(&other, &q), "another seed, another permutation");
}

#[test]
fn a_null_seed_is_chosen_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_model(dir.path(), "a", 3, &[TIME], &[], |_| 1.0);
    let mut r = RecipeBuilder::new();
    let a = model_node(&mut r, &model.path, Some("sdxl-sgm"));
    let root = r.merge("randperm", vec![Arg::Node(a)], vec![]).unwrap();
    let result = merged(r.finish(root).unwrap(), 1);
    assert_eq!(result.report.seeds.len(), 1);
    let key = format!("{TIME}0.weight");
    assert_ne!(weights_of(&result)[&key].1, model.weights[&key].1);
}

#[test]
fn rebasin_undoes_a_permutation_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let reference = write_model(dir.path(), "ref", 4, &ALL, &[], |_| 1.0);
    let mut r = RecipeBuilder::new();
    let ref_node = model_node(&mut r, &reference.path, None);
    let shuffled = r.merge("randperm", vec![Arg::Node(ref_node), Arg::Value(Scalar::Int(9))], vec![]).unwrap();
    let root = r.merge("rebasin", vec![Arg::Node(shuffled), Arg::Node(ref_node)], vec![]).unwrap();
    let result = merged(r.finish(root).unwrap(), 2);
    let after = weights_of(&result);
    for (key, (_, values)) in &reference.weights {
        assert_eq!(&after[key].1, values, "{key} is back in the reference's order");
    }
}

#[test]
fn rebasin_keeps_what_a_computes_and_lines_it_up_with_ref() {
    let dir = tempfile::tempdir().unwrap();
    let reference = write_model(dir.path(), "ref", 5, &ALL, &[], |_| 1.0);
    // Unrelated to ref: another draw.
    let a = write_model(dir.path(), "a", 6, &ALL, &[], |_| 1.0);
    let mut r = RecipeBuilder::new();
    let (na, nr) =
        (model_node(&mut r, &a.path, Some("sdxl-sgm")), model_node(&mut r, &reference.path, Some("sdxl-sgm")));
    let iters = ("iters".to_string(), Arg::Value(Scalar::Int(3)));
    let root = r.merge("rebasin", vec![Arg::Node(na), Arg::Node(nr)], vec![iters]).unwrap();
    let after = weights_of(&merged(r.finish(root).unwrap(), 2));
    assert_same_function(&a.weights, &after, false, true);
    let blocks = attentions().into_iter().chain(mlps().into_iter().map(|(first, _)| first));
    for prefix in blocks {
        let (before, aligned) =
            (alignment(&a.weights, &reference.weights, &prefix), alignment(&after, &reference.weights, &prefix));
        assert!(aligned > before, "{prefix}: alignment {before} → {aligned}");
    }
    let changed = a.weights.iter().filter(|(k, (_, v))| &after[*k].1 != v).count();
    assert!(changed > 20, "{changed} keys moved");
}

#[test]
fn an_incomplete_group_is_left_out_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("{CLIP_L}self_attn.k_proj.bias");
    let model = write_model(dir.path(), "a", 7, &[CLIP_L], &[&missing], |_| 1.0);
    let result = merged(randperm(&model.path, 1, Some("sdxl-sgm")), 1);
    let after = weights_of(&result);
    for name in ["q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.weight", "v_proj.bias", "out_proj.weight"] {
        let key = format!("{CLIP_L}self_attn.{name}");
        assert!(!after.contains_key(&key), "{key} is left out");
        let skipped = result.report.keys_skipped.iter().find(|s| s.key == key).expect("reported");
        assert!(
            skipped.reason.contains("needs all of its keys") && skipped.reason.contains(&missing),
            "{}",
            skipped.reason
        );
    }
    // The rest of the layer is unaffected: its MLP is permuted and still computes the same.
    let (first, second) = (format!("{CLIP_L}mlp.fc1"), format!("{CLIP_L}mlp.fc2"));
    assert_ne!(after[&format!("{first}.weight")].1, model.weights[&format!("{first}.weight")].1);
    let (m0, m1) = (Mlp::new(&model.weights, &first, &second), Mlp::new(&after, &first, &second));
    let x = inputs(1, 3, 768);
    assert_close(&m0.apply(&x), &m1.apply(&x), 1e-4, "CLIP-L MLP");
    assert_eq!(
        after[&format!("{CLIP_L}self_attn.out_proj.bias")].1,
        model.weights[&format!("{CLIP_L}self_attn.out_proj.bias")].1
    );
}

#[test]
fn the_interfaces_dispatch_on_the_inputs_config() {
    let dir = tempfile::tempdir().unwrap();
    // No config given: inferred from the keys.
    let model = write_model(dir.path(), "a", 8, &[CLIP_L], &[], |_| 1.0);
    let result = merged(randperm(&model.path, 1, None), 1);
    let key = format!("{CLIP_L}mlp.fc1.weight");
    assert_ne!(weights_of(&result)[&key].1, model.weights[&key].1, "randperm_'sdxl-sgm' ran");

    // An sd1 model: no implementation takes it.
    let sd1 = dir.path().join("sd1.safetensors");
    let key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight";
    write_file(&sd1, &[(key, f32_tensor(mecha_core::DType::F32, &[3072, 768], &values(1, 3072 * 768)))]);
    for recipe in [randperm(&sd1, 1, None), {
        let mut r = RecipeBuilder::new();
        let (a, b) = (model_node(&mut r, &sd1, None), model_node(&mut r, &model.path, None));
        let root = r.merge("rebasin", vec![Arg::Node(a), Arg::Node(b)], vec![]).unwrap();
        r.finish(root).unwrap()
    }] {
        let err = merge(recipe, &f32_memory(), &AtomicBool::new(false), None).err().expect("no implementation");
        assert_eq!(err.kind, ErrorKind::Config, "{err}");
        assert!(err.message.contains("'sdxl-sgm'"), "{}", err.message);
    }
}

#[test]
fn wrong_shapes_are_shape_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_model(dir.path(), "a", 9, &[TIME], &[], |_| 1.0);
    let other = dir.path().join("other.safetensors");
    // time_embed with a narrower hidden layer than SDXL's
    let w0 = format!("{TIME}0.weight");
    let tensors: Vec<(String, Raw)> = model
        .weights
        .iter()
        .map(|(k, (shape, v))| {
            let raw = if *k == w0 {
                f32_tensor(mecha_core::DType::F32, &[1280, 300], &v[..1280 * 300])
            } else {
                f32_tensor(mecha_core::DType::F32, shape, v)
            };
            (k.clone(), raw)
        })
        .collect();
    let named: Vec<(&str, Raw)> = tensors.into_iter().map(|(k, r)| (&*Box::leak(k.into_boxed_str()), r)).collect();
    write_file(&other, &named);
    let mut r = RecipeBuilder::new();
    let (a, b) = (model_node(&mut r, &model.path, Some("sdxl-sgm")), model_node(&mut r, &other, Some("sdxl-sgm")));
    let root = r.merge("rebasin", vec![Arg::Node(a), Arg::Node(b)], vec![]).unwrap();
    let err =
        merge(r.finish(root).unwrap(), &f32_memory(), &AtomicBool::new(false), None).err().expect("a shape error");
    assert_eq!(err.kind, ErrorKind::Shape, "{err}");
    assert!(err.to_string().contains(&w0), "{err}");
}
