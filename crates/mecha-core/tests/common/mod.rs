//! Test helpers: files are written and read back with the `safetensors` crate, an
//! implementation independent from ours.
#![allow(dead_code)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use mecha_core::DType;

pub struct Raw {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        to_st(self.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

pub fn to_st(d: DType) -> safetensors::Dtype {
    let json = format!("\"{}\"", d.safetensors_name());
    serde_json::from_str(&json).expect("every dtype exists in the safetensors crate")
}

pub fn write_file(path: &Path, tensors: &[(&str, Raw)]) {
    let views: Vec<(&str, &Raw)> = tensors.iter().map(|(n, r)| (*n, r)).collect();
    safetensors::serialize_to_file(views, None, path).expect("write test file");
}

pub fn f32_tensor(dtype: DType, shape: &[usize], values: &[f32]) -> Raw {
    let mut data = vec![0u8; values.len() * dtype.bits() / 8];
    mecha_core::kernels::convert::encode_f32(dtype, values, &mut data);
    Raw { dtype, shape: shape.to_vec(), data }
}

pub type Tensors = HashMap<String, (DType, Vec<usize>, Vec<u8>)>;

/// Reads a file with the safetensors crate: name → (dtype, shape, bytes), plus metadata.
pub fn read_file(path: &Path) -> (Tensors, HashMap<String, String>) {
    let bytes = std::fs::read(path).expect("read output");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("metadata");
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = DType::from_safetensors_name(&view.dtype().to_string()).expect("known dtype");
            (name, (dtype, view.shape().to_vec(), view.data().to_vec()))
        })
        .collect();
    (tensors, meta.metadata().clone().unwrap_or_default())
}

pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / (dtype.bits() / 8)];
    mecha_core::kernels::convert::decode_f32(dtype, bytes, &mut out);
    out
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Merges into memory with f32 output.
pub fn f32_memory() -> mecha_core::exec::MergeOptions {
    mecha_core::exec::MergeOptions {
        plan: mecha_core::exec::plan::PlanOptions { output_dtype: DType::F32, ..Default::default() },
        output: mecha_core::exec::OutputTarget::Memory,
        ..mecha_core::exec::MergeOptions::default()
    }
}

pub fn run(
    recipe: mecha_core::recipe::Recipe,
    options: &mecha_core::exec::MergeOptions,
) -> mecha_core::exec::MergeResult {
    mecha_core::exec::merge(recipe, options, &std::sync::atomic::AtomicBool::new(false), None).expect("merge")
}

/// An in-memory result's tensor: shape and values.
pub fn tensor(result: &mecha_core::exec::MergeResult, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = result.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no {name}"));
    (t.shape.clone(), decode(t.dtype, &t.data))
}

/// A small model of mixed dtypes: an f16 tensor of 7 hash blocks of 32 KiB (the last one
/// partial) that streams in several chunks, an f32 one, a small f16 bias and a bf16 one; values
/// from `values(seed * 100 + i)`.
pub fn mixed_model(seed: u64) -> Vec<(String, Raw)> {
    let spec: [(&str, DType, Vec<usize>); 4] = [
        ("net.embed.weight", DType::F16, vec![400, 250]),
        ("net.0.weight", DType::F32, vec![300, 110]),
        ("net.0.bias", DType::F16, vec![300]),
        ("net.1.weight", DType::BF16, vec![64, 64]),
    ];
    spec.into_iter()
        .enumerate()
        .map(|(i, (name, dtype, shape))| {
            let n = shape.iter().product();
            (name.to_string(), f32_tensor(dtype, &shape, &values(seed * 100 + i as u64, n)))
        })
        .collect()
}

/// `write_file` for tensors held by name.
pub fn write_named(path: &Path, tensors: &[(String, Raw)]) {
    let listed: Vec<(&str, Raw)> = tensors
        .iter()
        .map(|(k, r)| (k.as_str(), Raw { dtype: r.dtype, shape: r.shape.clone(), data: r.data.clone() }))
        .collect();
    write_file(path, &listed);
}
