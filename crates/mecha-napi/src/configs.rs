//! Model configs and the folders searched for models.

use crate::errors::guarded;
use mecha_core::MechaError;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::collections::HashMap;

#[napi(object)]
pub struct ConfigKeyInfo {
    pub key: String,
    pub component: String,
    /// `null` when the config does not fix it.
    pub shape: Option<Vec<i64>>,
    /// safetensors dtype name, `null` when unknown.
    pub dtype: Option<String>,
    pub optional: bool,
    pub aliases: Vec<String>,
}

#[napi(object)]
pub struct ConfigInfo {
    pub id: String,
    pub architecture: String,
    pub implementation: String,
    /// Component name → number of keys, in config order.
    pub components: HashMap<String, u32>,
    pub key_count: u32,
}

/// Every model config (builtin and registered), in sd-mecha's order (reverse-sorted ids).
#[napi]
pub fn config_list() -> Vec<ConfigInfo> {
    mecha_core::configs::list()
        .iter()
        .map(|c| ConfigInfo {
            id: c.id.clone(),
            architecture: c.architecture().to_string(),
            implementation: c.implementation().to_string(),
            components: c.components().iter().map(|(n, comp)| (n.clone(), comp.keys.len() as u32)).collect(),
            key_count: c.key_count() as u32,
        })
        .collect()
}

/// The keys of a model config in order, with their component and metadata.
#[napi]
pub fn config_keys(env: Env, id: String) -> napi::Result<Vec<ConfigKeyInfo>> {
    let config = guarded(&env, "configs.get", || mecha_core::configs::resolve(&id))?;
    Ok(config
        .components()
        .iter()
        .flat_map(|(component, comp)| {
            comp.keys.iter().map(move |(key, meta)| ConfigKeyInfo {
                key: key.clone(),
                component: component.clone(),
                shape: meta.shape.as_ref().map(|s| s.iter().map(|&d| d as i64).collect()),
                dtype: meta.dtype.map(|d| d.safetensors_name().to_string()),
                optional: meta.optional,
                aliases: meta.aliases.clone(),
            })
        })
        .collect())
}

/// Registers a model config from YAML in sd-mecha's format (JSON, a subset of YAML, works too).
/// `id` names it like sd-mecha's file stem; without it the `identifier` field is used.
#[napi]
pub fn config_register(env: Env, yaml: String, id: Option<String>) -> napi::Result<String> {
    let run = || -> mecha_core::Result<String> {
        let config = mecha_core::configs::from_yaml(&yaml, id.as_deref())?;
        let id = config.id.clone();
        mecha_core::configs::register(config)?;
        Ok(id)
    };
    guarded(&env, "config_register", run)
}

/// Adds a folder searched for models given by relative path.
#[napi]
pub fn model_dirs_add(path: String) {
    mecha_core::model_dirs::add(std::path::Path::new(&path));
}

#[napi]
pub fn model_dirs_list() -> Vec<String> {
    mecha_core::model_dirs::list().iter().map(|p| p.display().to_string()).collect()
}

#[napi]
pub fn model_dirs_clear() {
    mecha_core::model_dirs::clear();
}

/// The conversion methods that take a recipe to a config (or to another recipe's config).
#[napi]
pub fn conversion_path(
    env: Env,
    recipe_json: String,
    target_config: Option<String>,
    target_json: Option<String>,
) -> napi::Result<Vec<String>> {
    use mecha_core::exec::convert::{conversion_path, Target};
    let run = || -> mecha_core::Result<Vec<String>> {
        let recipe = mecha_core::recipe::wire::from_json(&recipe_json)?;
        let target = match (target_config, target_json) {
            (Some(id), _) => Target::Config(id),
            (None, Some(json)) => Target::Like(mecha_core::recipe::wire::from_json(&json)?),
            (None, None) => return Err(MechaError::recipe("convert() needs a target config or recipe")),
        };
        conversion_path(&recipe, &target)
    };
    guarded(&env, "conversion_path", run)
}
