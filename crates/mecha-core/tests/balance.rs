//! balance_attention on sdxl-sgm blocks with real key names and shapes: every attention (CLIP-L,
//! CLIP-G, UNet attn1/attn2, the VAE's mid-block) computes the same logits and outputs, and
//! afterwards each head's q and k (and v and out) carry the same energy in every direction.

mod common;
mod sdxl_blocks;

use common::*;
use mecha_core::recipe::{Arg, RecipeBuilder};
use sdxl_blocks::*;

/// The Gram matrix of head `h` of a projection, the bias as a last column.
fn rows_gram(l: &Linear, h: usize, width: usize) -> Vec<f64> {
    let row = |i: usize| {
        let r = h * width + i;
        let mut v = l.w[r * l.cols..(r + 1) * l.cols].to_vec();
        v.extend(l.b.as_ref().map(|b| b[r]));
        v
    };
    let rows: Vec<Vec<f64>> = (0..width).map(row).collect();
    rows.iter().flat_map(|a| rows.iter().map(move |b| a.iter().zip(b).map(|(x, y)| x * y).sum())).collect()
}

/// The Gram matrix of head `h`'s columns of the output projection.
fn columns_gram(out: &Linear, h: usize, width: usize) -> Vec<f64> {
    let col = |i: usize| (0..out.rows).map(|r| out.w[r * out.cols + h * width + i]).collect::<Vec<f64>>();
    let cols: Vec<Vec<f64>> = (0..width).map(col).collect();
    cols.iter().flat_map(|a| cols.iter().map(move |b| a.iter().zip(b).map(|(x, y)| x * y).sum())).collect()
}

fn trace(gram: &[f64]) -> f64 {
    let n = (gram.len() as f64).sqrt() as usize;
    (0..n).map(|i| gram[i * n + i]).sum()
}

#[test]
fn balanced_attention_computes_the_same_with_equal_energies() {
    let dir = tempfile::tempdir().unwrap();
    // k three times, v a third of the usual scale: the heads start unbalanced.
    let scale = |key: &str| {
        let ends = |s: &[&str]| s.iter().any(|e| key.ends_with(e));
        if ends(&["k_proj.weight", "k_proj.bias", "to_k.weight", "attn_1.k.weight", "attn_1.k.bias"]) {
            3.0
        } else if ends(&["v_proj.weight", "v_proj.bias", "to_v.weight", "attn_1.v.weight", "attn_1.v.bias"]) {
            0.3
        } else {
            1.0
        }
    };
    let prefixes = [CLIP_L, CLIP_G, UNET, TIME, LABEL, VAE];
    let model = write_model(dir.path(), "a", 1, &prefixes, &[], scale);
    let mut r = RecipeBuilder::new();
    // No config given: the interface dispatches on the one inferred from the keys.
    let a = r.model(model.path.to_str().unwrap(), None, Some("weight"));
    let root = r.merge("balance_attention", vec![Arg::Node(a)], vec![]).unwrap();
    let result = run(r.finish(root).unwrap(), &f32_memory());
    let after = weights_of(&result);

    assert_same_function(&model.weights, &after, true, false);

    let moved = |key: &str| {
        ["q_proj.", "k_proj.", "v_proj.", "out_proj.weight", "in_proj_", "to_q.", "to_k.", "to_v.", "to_out.0.weight"]
            .iter()
            .any(|s| key.contains(s))
            || (key.starts_with(VAE) && !key.contains("norm") && !key.ends_with("proj_out.bias"))
    };
    for (key, (shape, values)) in &model.weights {
        assert_eq!(&after[key].0, shape, "{key}");
        if moved(key) {
            assert_ne!(&after[key].1, values, "{key} is rescaled");
        } else {
            assert_eq!(&after[key].1, values, "{key} is copied");
        }
    }

    for prefix in attentions().into_iter().chain([VAE.to_string()]) {
        let (before, balanced) = (Attention::new(&model.weights, &prefix), Attention::new(&after, &prefix));
        let width = balanced.head_width;
        for h in 0..balanced.heads() {
            let what = format!("{prefix} head {h}");
            let (q, k) = (rows_gram(&balanced.q, h, width), rows_gram(&balanced.k, h, width));
            assert_close(&q, &k, 1e-4, &format!("{what}: q·qᵀ = k·kᵀ"));
            let (v, o) = (rows_gram(&balanced.v, h, width), columns_gram(&balanced.out, h, width));
            assert_close(&v, &o, 1e-4, &format!("{what}: v·vᵀ = outᵀ·out"));
            if !prefix.starts_with(CLIP_G) {
                // (CLIP-G's fused weight was drawn at one scale)
                let ratio = trace(&rows_gram(&before.k, h, width)) / trace(&rows_gram(&before.q, h, width));
                assert!(ratio > 4.0, "{what}: the test starts unbalanced ({ratio})");
            }
        }
    }
}
