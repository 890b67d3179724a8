//! sdxl-sgm test models: a few real blocks (real key names and shapes from the builtin config)
//! with random weights, and what those blocks compute, evaluated in f64 here so that a test can
//! compare a model's function before and after a transformation.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mecha_core::exec::MergeResult;
use mecha_core::DType;

use crate::common::{decode, f32_tensor, values, write_file, Raw};

pub const CLIP_L: &str = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.";
pub const CLIP_G: &str = "conditioner.embedders.1.model.transformer.resblocks.0.";
/// A 640-channel UNet transformer block: attn1, attn2 (context 2048) and the GEGLU ff.
pub const UNET: &str = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.";
pub const TIME: &str = "model.diffusion_model.time_embed.";
pub const LABEL: &str = "model.diffusion_model.label_emb.";
pub const VAE: &str = "first_stage_model.encoder.mid.attn_1.";

/// Key → (shape, values).
pub type Weights = HashMap<String, (Vec<usize>, Vec<f32>)>;

pub struct Model {
    pub path: PathBuf,
    pub weights: Weights,
}

fn key_seed(seed: u64, key: &str) -> u64 {
    key.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Writes the sdxl-sgm keys starting with one of `prefixes`, except `omit`, as f32: weights
/// uniform in ±1/√fan_in times `scale(key)`, biases ±0.1 times it.
pub fn write_model(
    dir: &Path,
    name: &str,
    seed: u64,
    prefixes: &[&str],
    omit: &[&str],
    scale: impl Fn(&str) -> f32,
) -> Model {
    let config = mecha_core::configs::resolve("sdxl-sgm").unwrap();
    let mut weights = Weights::new();
    let mut raws: Vec<(String, Raw)> = vec![];
    for (key, meta) in config.keys() {
        if !prefixes.iter().any(|p| key.starts_with(p)) || omit.contains(&key) {
            continue;
        }
        let shape = meta.shape.clone().unwrap();
        let n: usize = shape.iter().product();
        let fan_in: usize = shape[1..].iter().product();
        let base = if shape.len() >= 2 { 1.0 / (fan_in as f32).sqrt() } else { 0.1 };
        let s = base * scale(key);
        let v: Vec<f32> = values(key_seed(seed, key), n).into_iter().map(|x| x * s).collect();
        raws.push((key.to_string(), f32_tensor(DType::F32, &shape, &v)));
        weights.insert(key.to_string(), (shape, v));
    }
    let path = dir.join(format!("{name}.safetensors"));
    let named: Vec<(&str, Raw)> = raws.into_iter().map(|(k, r)| (&*Box::leak(k.into_boxed_str()), r)).collect();
    write_file(&path, &named);
    Model { path, weights }
}

/// An in-memory merge result as weights.
pub fn weights_of(result: &MergeResult) -> Weights {
    result.tensors.iter().map(|t| (t.name.clone(), (t.shape.clone(), decode(t.dtype, &t.data)))).collect()
}

/// Row-major inputs in ±1.
pub fn inputs(seed: u64, rows: usize, cols: usize) -> Vec<f64> {
    values(seed, rows * cols).into_iter().map(f64::from).collect()
}

pub struct Linear {
    pub w: Vec<f64>,
    pub rows: usize,
    pub cols: usize,
    pub b: Option<Vec<f64>>,
}

impl Linear {
    /// Rows `from..from + rows` of a weight (flattened past axis 0) and of its bias.
    pub fn part(weights: &Weights, weight: &str, bias: Option<&str>, from: usize, rows: usize) -> Linear {
        let (shape, w) = &weights[weight];
        let cols: usize = shape[1..].iter().product();
        let b = bias.map(|b| weights[b].1[from..from + rows].iter().map(|&x| x as f64).collect());
        Linear { w: w[from * cols..(from + rows) * cols].iter().map(|&x| x as f64).collect(), rows, cols, b }
    }

    pub fn new(weights: &Weights, weight: &str, bias: Option<&str>) -> Linear {
        Linear::part(weights, weight, bias, 0, weights[weight].0[0])
    }

    /// `x` (n × cols) → n × rows.
    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        let n = x.len() / self.cols;
        let mut out = vec![0.0; n * self.rows];
        for t in 0..n {
            let xt = &x[t * self.cols..(t + 1) * self.cols];
            for r in 0..self.rows {
                let w = &self.w[r * self.cols..(r + 1) * self.cols];
                let dot: f64 = w.iter().zip(xt).map(|(a, b)| a * b).sum();
                out[t * self.rows + r] = dot + self.b.as_ref().map_or(0.0, |b| b[r]);
            }
        }
        out
    }
}

/// An attention block: q reads `x`, k and v read the context.
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub head_width: usize,
}

impl Attention {
    /// The block at `prefix` (CLIP-L `…self_attn.`, CLIP-G `…attn.`, UNet `…attn1.`/`…attn2.`,
    /// VAE `…mid.attn_1.`).
    pub fn new(w: &Weights, prefix: &str) -> Attention {
        let key = |s: &str| format!("{prefix}{s}");
        let separate = |names: [&str; 4], biased: bool, head_width| {
            let lin = |n: &str| {
                let bias = key(&format!("{n}.bias"));
                Linear::new(w, &key(&format!("{n}.weight")), biased.then_some(bias.as_str()))
            };
            let out_bias = key(&format!("{}.bias", names[3]));
            Attention {
                q: lin(names[0]),
                k: lin(names[1]),
                v: lin(names[2]),
                out: Linear::new(w, &key(&format!("{}.weight", names[3])), Some(&out_bias)),
                head_width,
            }
        };
        if prefix.ends_with("self_attn.") {
            separate(["q_proj", "k_proj", "v_proj", "out_proj"], true, 64)
        } else if prefix.ends_with(".attn.") {
            let (weight, bias) = (key("in_proj_weight"), key("in_proj_bias"));
            let c = w[&weight].0[0] / 3;
            let part = |i| Linear::part(w, &weight, Some(&bias), i * c, c);
            let out_bias = key("out_proj.bias");
            Attention {
                q: part(0),
                k: part(1),
                v: part(2),
                out: Linear::new(w, &key("out_proj.weight"), Some(&out_bias)),
                head_width: 64,
            }
        } else if prefix.ends_with("mid.attn_1.") {
            separate(["q", "k", "v", "proj_out"], true, 512)
        } else {
            separate(["to_q", "to_k", "to_v", "to_out.0"], false, 64)
        }
    }

    pub fn heads(&self) -> usize {
        self.q.rows / self.head_width
    }

    /// Per head, the t × s logits q·kᵀ/√d.
    pub fn logits(&self, x: &[f64], context: &[f64]) -> Vec<f64> {
        let (q, k) = (self.q.apply(x), self.k.apply(context));
        let (c, d) = (self.q.rows, self.head_width);
        let (t, s) = (q.len() / c, k.len() / c);
        let mut out = vec![];
        for h in 0..self.heads() {
            for i in 0..t {
                for j in 0..s {
                    let dot: f64 = (0..d).map(|e| q[i * c + h * d + e] * k[j * c + h * d + e]).sum();
                    out.push(dot / (d as f64).sqrt());
                }
            }
        }
        out
    }

    /// softmax(q·kᵀ/√d)·v per head, then the output projection.
    pub fn apply(&self, x: &[f64], context: &[f64]) -> Vec<f64> {
        let v = self.v.apply(context);
        let logits = self.logits(x, context);
        let (c, d) = (self.q.rows, self.head_width);
        let (t, s) = (x.len() / self.q.cols, v.len() / c);
        let mut mixed = vec![0.0; t * c];
        for h in 0..self.heads() {
            for i in 0..t {
                let row = &logits[(h * t + i) * s..(h * t + i + 1) * s];
                let top = row.iter().copied().fold(f64::MIN, f64::max);
                let e: Vec<f64> = row.iter().map(|l| (l - top).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for f in 0..d {
                        mixed[i * c + h * d + f] += ej / sum * v[j * c + h * d + f];
                    }
                }
            }
        }
        self.out.apply(&mixed)
    }
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (0.797_884_560_8 * (x + 0.044_715 * x * x * x)).tanh())
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Two linear layers around an activation; `geglu`: the first layer's rows are a value half and
/// a gate half, value·gelu(gate).
pub struct Mlp {
    pub first: Linear,
    pub second: Linear,
    pub geglu: bool,
    pub silu: bool,
}

impl Mlp {
    /// `first` / `second`: the layers' key stems (without `.weight`).
    pub fn new(w: &Weights, first: &str, second: &str) -> Mlp {
        let lin = |stem: &str| {
            let bias = format!("{stem}.bias");
            Linear::new(w, &format!("{stem}.weight"), Some(&bias))
        };
        Mlp {
            first: lin(first),
            second: lin(second),
            geglu: first.ends_with("net.0.proj"),
            silu: first.contains("_emb"),
        }
    }

    pub fn apply(&self, x: &[f64]) -> Vec<f64> {
        let h = self.first.apply(x);
        let hidden: Vec<f64> = if self.geglu {
            let width = self.first.rows / 2;
            h.chunks(self.first.rows).flat_map(|r| (0..width).map(move |i| r[i] * gelu(r[width + i]))).collect()
        } else if self.silu {
            h.into_iter().map(silu).collect()
        } else {
            h.into_iter().map(gelu).collect()
        };
        self.second.apply(&hidden)
    }
}

/// Every MLP of the test blocks: (first layer's stem, second layer's stem).
pub fn mlps() -> Vec<(String, String)> {
    vec![
        (format!("{CLIP_L}mlp.fc1"), format!("{CLIP_L}mlp.fc2")),
        (format!("{CLIP_G}mlp.c_fc"), format!("{CLIP_G}mlp.c_proj")),
        (format!("{UNET}ff.net.0.proj"), format!("{UNET}ff.net.2")),
        (format!("{TIME}0"), format!("{TIME}2")),
        (format!("{LABEL}0.0"), format!("{LABEL}0.2")),
    ]
}

/// Every attention of the test blocks (VAE excluded: it is not permuted).
pub fn attentions() -> Vec<String> {
    vec![format!("{CLIP_L}self_attn."), format!("{CLIP_G}attn."), format!("{UNET}attn1."), format!("{UNET}attn2.")]
}

/// max |a − b| ≤ tolerance · max |a|.
pub fn assert_close(a: &[f64], b: &[f64], tolerance: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(scale > 0.0, "{what}: all zero");
    assert!(diff <= tolerance * scale, "{what}: differs by {diff} (scale {scale})");
}

/// Checks that `after` computes what `before` does in every test block (and the VAE's attention
/// with `vae`); with `heads_move`, the heads may be in another order.
pub fn assert_same_function(before: &Weights, after: &Weights, vae: bool, heads_move: bool) {
    for prefix in attentions().into_iter().chain(vae.then(|| VAE.to_string())) {
        let (a, b) = (Attention::new(before, &prefix), Attention::new(after, &prefix));
        let context_width = a.k.cols;
        let x = inputs(11, 5, a.q.cols);
        let context = if prefix.ends_with("attn2.") { inputs(12, 7, context_width) } else { x.clone() };
        let (la, lb) = (a.logits(&x, &context), b.logits(&x, &context));
        if heads_move {
            // each head's logits are some head's of the original: match them up
            let per_head = la.len() / a.heads();
            let mut free: Vec<&[f64]> = lb.chunks(per_head).collect();
            for (h, head) in la.chunks(per_head).enumerate() {
                let diff = |o: &&[f64]| head.iter().zip(*o).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
                let best = (0..free.len()).min_by(|&i, &j| diff(&free[i]).total_cmp(&diff(&free[j]))).unwrap();
                assert_close(head, free.remove(best), 1e-4, &format!("{prefix} logits of head {h}"));
            }
        } else {
            assert_close(&la, &lb, 1e-4, &format!("{prefix} logits"));
        }
        assert_close(&a.apply(&x, &context), &b.apply(&x, &context), 1e-4, &format!("{prefix} output"));
    }
    for (first, second) in mlps() {
        let (a, b) = (Mlp::new(before, &first, &second), Mlp::new(after, &first, &second));
        let x = inputs(13, 4, a.first.cols);
        assert_close(&a.apply(&x), &b.apply(&x), 1e-4, &format!("{first} MLP"));
    }
}

/// Σ⟨x, y⟩ over the keys with `prefix`.
pub fn alignment(x: &Weights, y: &Weights, prefix: &str) -> f64 {
    x.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, (_, v))| v.iter().zip(&y[k].1).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>())
        .sum()
}

pub const ALL: [&str; 5] = [CLIP_L, CLIP_G, UNET, TIME, LABEL];
