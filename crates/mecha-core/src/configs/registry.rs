//! The configs recipes can name: the builtins plus any registered at run time.

use std::sync::{Arc, OnceLock, RwLock};

use super::{check_identifier, config_error, parse_compact, ModelConfig};
use crate::error::Result;

static USER: RwLock<Vec<Arc<ModelConfig>>> = RwLock::new(Vec::new());

/// Parsed on first use: about 15,000 keys, a few milliseconds.
fn builtins() -> &'static [Arc<ModelConfig>] {
    static BUILTINS: OnceLock<Vec<Arc<ModelConfig>>> = OnceLock::new();
    BUILTINS.get_or_init(|| {
        let text = include_str!(concat!(env!("OUT_DIR"), "/model-configs.txt"));
        let configs = parse_compact(text).expect("the builtin model configs are valid");
        configs.into_iter().map(Arc::new).collect()
    })
}

pub fn builtin(id: &str) -> Option<Arc<ModelConfig>> {
    builtins().iter().find(|c| c.id == id).cloned()
}

/// The LoRA/LyCORIS configs derived from the kohya builtins (sd-mecha's "aux" configs).
fn auxiliary() -> &'static [Arc<ModelConfig>] {
    static AUX: OnceLock<Vec<Arc<ModelConfig>>> = OnceLock::new();
    AUX.get_or_init(|| super::lycoris::derived_configs(builtin).into_iter().map(Arc::new).collect())
}

/// Builtin and derived configs: what every process knows without registering anything. The
/// derived ones (75,000 keys, ~15 MiB) are built only when the iteration reaches them.
fn known() -> impl Iterator<Item = &'static Arc<ModelConfig>> {
    builtins().iter().chain(std::iter::once(()).flat_map(|()| auxiliary()))
}

/// Builtin identifiers in file-name order.
pub fn builtin_ids() -> Vec<&'static str> {
    builtins().iter().map(|c| c.id.as_str()).collect()
}

/// Adds a config for recipes to use. Identifiers are never reused, not even a builtin's.
pub fn register(config: ModelConfig) -> Result<()> {
    check_identifier(&config.id)?;
    let mut user = USER.write().expect("config registry lock");
    if known().any(|c| c.id == config.id) || user.iter().any(|c| c.id == config.id) {
        return Err(config_error(format!(
            "a model config \"{}\" is already registered; choose another identifier",
            config.id
        )));
    }
    user.push(Arc::new(config));
    Ok(())
}

/// Looks a config up, or fails with the closest known identifier as a suggestion.
pub fn resolve(id: &str) -> Result<Arc<ModelConfig>> {
    if let Some(config) = known().find(|c| c.id == id) {
        return Ok(config.clone());
    }
    let user = USER.read().expect("config registry lock");
    if let Some(config) = user.iter().find(|c| c.id == id) {
        return Ok(config.clone());
    }
    let mut names: Vec<&str> = known().map(|c| c.id.as_str()).collect();
    names.extend(user.iter().map(|c| c.id.as_str()));
    let hint = match crate::util::nearest(id, names.iter().copied()) {
        Some(near) => format!("did you mean \"{near}\"?"),
        None => format!("known configs: {}", names.join(", ")),
    };
    Err(config_error(format!("unknown model config \"{id}\"; {hint}")))
}

/// Every config, sorted by identifier in reverse, the order in which sd-mecha's `get_all()`
/// returns them and so the order that breaks ties when inferring a config.
pub fn list() -> Vec<Arc<ModelConfig>> {
    sorted(known().cloned().collect())
}

/// The configs that can share a key with `keys`, in `list()`'s order: the LoRA/LyCORIS ones
/// only when some key has their prefix, so inferring a checkpoint's config never builds them.
pub fn candidates_for<'k>(keys: impl IntoIterator<Item = &'k String>) -> Vec<Arc<ModelConfig>> {
    let mut all: Vec<Arc<ModelConfig>> = builtins().to_vec();
    if keys.into_iter().any(|k| super::lycoris::has_lycoris_prefix(k)) {
        all.extend(auxiliary().iter().cloned());
    }
    sorted(all)
}

/// Adds the registered configs and sorts.
fn sorted(mut all: Vec<Arc<ModelConfig>>) -> Vec<Arc<ModelConfig>> {
    all.extend(USER.read().expect("config registry lock").iter().cloned());
    all.sort_by(|a, b| b.id.cmp(&a.id));
    all
}
