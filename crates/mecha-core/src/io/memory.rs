//! In-memory models: safetensors files the host application holds as bytes (sd-mecha's
//! `model(state_dict)`), registered once and referred to from recipes by id. Registered files
//! stay until released, so a recipe node can be merged any number of times.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{MechaError, Result};
use crate::io::reader::SafetensorsFile;

fn registry() -> &'static Mutex<HashMap<u64, Arc<SafetensorsFile>>> {
    static MODELS: OnceLock<Mutex<HashMap<u64, Arc<SafetensorsFile>>>> = OnceLock::new();
    MODELS.get_or_init(Default::default)
}

/// The name an in-memory model has in errors, reports and recipe text.
pub fn label(id: u64) -> String {
    format!("<in-memory model {id}>")
}

/// Validates `bytes` as a safetensors file and keeps it; returns its id.
pub fn register(bytes: Vec<u8>) -> Result<u64> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let file = SafetensorsFile::from_bytes(&label(id), bytes)?;
    registry().lock().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::new(file));
    Ok(id)
}

/// Frees a registered model (merges running with it keep their own reference).
pub fn release(id: u64) {
    registry().lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
}

pub fn get(id: u64) -> Result<Arc<SafetensorsFile>> {
    registry().lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned().ok_or_else(|| {
        MechaError::recipe(format!(
            "{} is not registered (it was released, or the recipe was not built in this process); \
             build the recipe again with model(stateDict)",
            label(id)
        ))
    })
}

/// How many in-memory models are registered (for tests of their release).
pub fn count() -> usize {
    registry().lock().unwrap_or_else(|p| p.into_inner()).len()
}
