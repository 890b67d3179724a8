//! Folders searched for models given by relative path, as sd-mecha's `model_dirs`.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

static DIRS: RwLock<Vec<PathBuf>> = RwLock::new(Vec::new());

/// Adds a folder to search (once; later additions are searched after earlier ones).
pub fn add(dir: &Path) {
    let mut dirs = DIRS.write().expect("model dirs lock");
    if !dirs.iter().any(|d| d == dir) {
        dirs.push(dir.to_path_buf());
    }
}

pub fn list() -> Vec<PathBuf> {
    DIRS.read().expect("model dirs lock").clone()
}

pub fn clear() {
    DIRS.write().expect("model dirs lock").clear();
}

/// The file a model path refers to: an absolute path as is; a relative one in the first model
/// folder that has it, else relative to the current directory. Symlinks are resolved when the
/// file exists, as sd-mecha writes paths into finalized recipes.
pub fn resolve(path: &str) -> PathBuf {
    let p = Path::new(path);
    let found = if p.is_absolute() {
        p.to_path_buf()
    } else {
        list().into_iter().map(|d| d.join(p)).find(|c| c.exists()).unwrap_or_else(|| p.to_path_buf())
    };
    std::fs::canonicalize(&found).unwrap_or_else(|_| std::path::absolute(&found).unwrap_or(found))
}
