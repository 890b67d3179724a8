//! Safetensors files: headers, inferred configs, and generated models for demos and tests.

use crate::errors::{guarded, parse_dtype, throw};
use mecha_core::io::reader::SafetensorsFile;
use mecha_core::recipe::spaces::RootSpace;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::collections::HashMap;
use std::path::PathBuf;

// Files

#[napi(object)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    /// Byte offsets from the start of the file.
    pub start: i64,
    pub bytes: i64,
    /// Which of `FileInfo.files` holds it.
    pub shard: u32,
}

#[napi(object)]
pub struct FileInfo {
    pub path: String,
    pub file_bytes: i64,
    pub header_bytes: i64,
    /// The files holding the data: the file itself, or a sharded checkpoint's shards.
    pub files: Vec<String>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    pub metadata: HashMap<String, String>,
}

/// Reads and validates a safetensors header.
#[napi]
pub fn inspect(env: Env, path: String) -> napi::Result<FileInfo> {
    let file = guarded(&env, "inspect", || SafetensorsFile::open(std::path::Path::new(&path)))?;
    Ok(FileInfo {
        path,
        file_bytes: file.file_len() as i64,
        header_bytes: file.header_len() as i64,
        files: file.files().iter().map(|p| p.display().to_string()).collect(),
        tensors: file
            .tensors()
            .iter()
            .map(|(name, e)| TensorInfo {
                name: name.clone(),
                dtype: e.dtype.safetensors_name().to_string(),
                shape: e.shape.iter().map(|&d| d as i64).collect(),
                start: e.start as i64,
                bytes: e.byte_len as i64,
                shard: e.shard as u32,
            })
            .collect(),
        metadata: file.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    })
}

/// The model config sd-mecha's rules infer for a file, or `null` for an unknown architecture.
#[napi]
pub fn infer_config(env: Env, path: String) -> napi::Result<Option<String>> {
    let run = || -> mecha_core::Result<Option<String>> {
        let mut b = mecha_core::recipe::RecipeBuilder::new();
        let node = b.model(&path, None, Some("weight"));
        let f = mecha_core::exec::plan::finalize(b.finish(node)?, &RootSpace::default())?;
        Ok(f.root_config().as_named().map(|c| c.id.clone()))
    };
    guarded(&env, "infer_config", run)
}

/// The configs a file could be, best first, as sd-mecha ranks them (`root_candidates`).
#[napi]
pub fn config_candidates(env: Env, path: String) -> napi::Result<Vec<String>> {
    let run = || -> mecha_core::Result<Vec<String>> {
        let mut b = mecha_core::recipe::RecipeBuilder::new();
        let node = b.model(&path, None, Some("weight"));
        let recipe = b.finish(node)?;
        let inputs = mecha_core::exec::plan::open_inputs(&recipe)?;
        mecha_core::recipe::inference::root_candidates(&recipe, &inputs.model_keys, None)
    };
    guarded(&env, "config_candidates", run)
}

// Synthetic models (demo, benchmarks, tests)

#[napi(object)]
pub struct TensorSpec {
    pub name: String,
    /// safetensors or torch dtype name.
    pub dtype: String,
    pub shape: Vec<i64>,
}

pub struct RandomModelTask {
    path: PathBuf,
    tensors: Vec<mecha_core::io::writer::PlannedTensor>,
    seed: u64,
}

impl Task for RandomModelTask {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> napi::Result<()> {
        mecha_core::error::guarded("writeRandomModel", || {
            mecha_core::synthetic::write_random_model(&self.path, &self.tensors, self.seed, &[])
        })
        .map_err(|e| napi::Error::new(Status::GenericFailure, e.to_string()))
    }

    fn resolve(&mut self, _env: Env, _output: ()) -> napi::Result<()> {
        Ok(())
    }
}

/// Writes a safetensors file of deterministic pseudo-random values with the given layout.
#[napi]
pub fn write_random_model(
    env: Env,
    path: String,
    tensors: Vec<TensorSpec>,
    seed: i64,
) -> napi::Result<AsyncTask<RandomModelTask>> {
    let planned = tensors
        .into_iter()
        .map(|t| {
            let dtype = parse_dtype(&t.dtype, "dtype").map_err(|e| throw(&env, &e))?;
            let shape: Vec<usize> = t.shape.iter().map(|&d| d.max(0) as usize).collect();
            Ok(mecha_core::io::writer::PlannedTensor { name: t.name, dtype, shape })
        })
        .collect::<napi::Result<Vec<_>>>()?;
    Ok(AsyncTask::new(RandomModelTask { path: PathBuf::from(path), tensors: planned, seed: seed as u64 }))
}

// In-memory models

/// Keeps a safetensors file given as bytes (validated like a file) for recipes to use as a
/// model; returns its id. The bytes are copied once, here.
#[napi]
pub fn register_memory_model(env: Env, bytes: Buffer) -> napi::Result<u32> {
    let owned = bytes.to_vec();
    let id = guarded(&env, "model", || mecha_core::io::memory::register(owned))?;
    // Ids count up from 1 per process; u32 is what JavaScript numbers carry exactly here.
    Ok(id as u32)
}

/// Frees an in-memory model (called when its recipe node is garbage collected).
#[napi]
pub fn release_memory_model(id: u32) {
    mecha_core::io::memory::release(id as u64);
}

/// How many in-memory models are held.
#[napi]
pub fn memory_model_count() -> u32 {
    mecha_core::io::memory::count() as u32
}
