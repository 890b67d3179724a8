//! Model configs: for each supported checkpoint layout, the keys of each component in order, with
//! their shape, dtype, aliases and whether they may be missing. The builtin tables are sd-mecha's
//! YAML files (`configs/`, MIT, see `configs/LICENSE-sd-mecha.txt`), which build.rs converts into
//! compact text embedded in the binary. More configs can be registered at run time.

pub mod key_names;
pub mod lycoris;
pub mod missing_keys;
mod registry;
#[cfg(test)]
mod tests;
mod yaml;

pub use registry::{builtin, builtin_ids, candidates_for, list, register, resolve};

use std::collections::HashMap;
use std::iter;

use indexmap::IndexMap;
use yaml_rust2::YamlLoader;

use crate::error::{ErrorKind, MechaError, Result};
use crate::DType;

/// What a config says about one key. A `None` shape or dtype is unknown, as for the one key of
/// `singleton-mecha`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMeta {
    pub shape: Option<Vec<usize>>,
    pub dtype: Option<DType>,
    /// Other names the key may have in input files.
    pub aliases: Vec<String>,
    /// Inputs may lack the key without it counting as a miss.
    pub optional: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Component {
    pub keys: IndexMap<String, KeyMeta>,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// The registered identifier, `<architecture>-<implementation>`.
    pub id: String,
    /// The `identifier` written in the YAML, which may differ from the file stem `id`.
    pub declared_identifier: String,
    // Private so that they cannot drift from `aliases`, which `new` derives from them.
    components: IndexMap<String, Component>,
    /// Alias -> canonical key.
    aliases: HashMap<String, String>,
}

impl ModelConfig {
    /// Checks both identifiers and that every key and alias names a single tensor across all
    /// components, which keeps `keys()` a plain concatenation and alias resolution unambiguous.
    pub fn new(
        id: impl Into<String>,
        declared_identifier: impl Into<String>,
        components: IndexMap<String, Component>,
    ) -> Result<ModelConfig> {
        let (id, declared_identifier) = (id.into(), declared_identifier.into());
        check_identifier(&id)?;
        check_identifier(&declared_identifier)?;
        let role = |is_key: bool, (key, component): (&str, &str)| {
            if is_key {
                format!("a key of component \"{component}\"")
            } else {
                format!("an alias of \"{key}\"")
            }
        };
        // Every name -> (its key, that key's component).
        let mut owners: HashMap<&str, (&str, &str)> = HashMap::new();
        for (component, c) in &components {
            for (key, meta) in &c.keys {
                let names = iter::once((key, true)).chain(meta.aliases.iter().map(|a| (a, false)));
                for (name, is_key) in names {
                    if let Some(first) = owners.insert(name, (key, component)) {
                        // A key is inserted before its aliases, so a first owner named like
                        // `name` was that key itself.
                        return Err(config_error(format!(
                            "model config \"{id}\": \"{name}\" is both {} and {}; every key and alias must be unique",
                            role(first.0 == name, first),
                            role(is_key, (key, component)),
                        )));
                    }
                }
            }
        }
        let aliases = owners
            .into_iter()
            .filter(|(name, (key, _))| name != key)
            .map(|(name, (key, _))| (name.to_string(), key.to_string()))
            .collect();
        Ok(ModelConfig { id, declared_identifier, components, aliases })
    }

    pub fn components(&self) -> &IndexMap<String, Component> {
        &self.components
    }

    /// All keys in output order: component by component, in file order.
    pub fn keys(&self) -> impl Iterator<Item = (&str, &KeyMeta)> + '_ {
        self.components.values().flat_map(|c| c.keys.iter().map(|(k, meta)| (k.as_str(), meta)))
    }

    pub fn key_count(&self) -> usize {
        self.components.values().map(|c| c.keys.len()).sum()
    }

    /// Metadata of a canonical key (not an alias).
    pub fn get(&self, key: &str) -> Option<&KeyMeta> {
        self.components.values().find_map(|c| c.keys.get(key))
    }

    pub fn component_of(&self, key: &str) -> Option<&str> {
        let found = self.components.iter().find(|(_, c)| c.keys.contains_key(key));
        found.map(|(name, _)| name.as_str())
    }

    /// The canonical key `name` stands for: itself if it is a key, its key if it is an alias.
    pub fn resolve_alias(&self, name: &str) -> Option<&str> {
        let canonical = self.components.values().find_map(|c| c.keys.get_key_value(name));
        canonical.map(|(key, _)| key.as_str()).or_else(|| self.aliases.get(name).map(String::as_str))
    }

    /// `sd1` in `sd1-ldm`.
    pub fn architecture(&self) -> &str {
        self.id.split_once('-').map_or(self.id.as_str(), |(arch, _)| arch)
    }

    /// `ldm` in `sd1-ldm`.
    pub fn implementation(&self) -> &str {
        self.id.split_once('-').map_or("", |(_, implementation)| implementation)
    }
}

/// Parses a user config written like sd-mecha's YAML files. Pass the file stem when the text
/// comes from a file: like sd-mecha, the config is then registered under the stem.
pub fn from_yaml(text: &str, id_from_file_stem: Option<&str>) -> Result<ModelConfig> {
    let source = match id_from_file_stem {
        Some(id) => format!("model config \"{id}\""),
        None => "model config YAML".to_string(),
    };
    let docs = YamlLoader::load_from_str(text).map_err(|e| {
        let (line, column) = (e.marker().line(), e.marker().col() + 1);
        let msg = format!("{source}: invalid YAML at line {line}, column {column}: {}", e.info());
        config_error(msg).at(line, column)
    })?;
    let mut compact = String::new();
    yaml::write_compact(&docs, id_from_file_stem, &mut compact).map_err(|e| config_error(format!("{source}: {e}")))?;
    let config = parse_compact(&compact)?.pop();
    Ok(config.expect("write_compact writes one config"))
}

/// Reads text written by `yaml::write_compact`. Only dtype names, dimensions and identifiers
/// can be wrong in it: the writer checked everything else.
fn parse_compact(text: &str) -> Result<Vec<ModelConfig>> {
    let mut configs: Vec<(&str, &str, IndexMap<String, Component>)> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split('\t');
        let mut next = || fields.next().expect("compact config lines have all their fields");
        match next() {
            "C" => configs.push((next(), next(), IndexMap::new())),
            "P" => {
                let (_, _, components) = configs.last_mut().expect("a config precedes its components");
                components.insert(next().to_string(), Component::default());
            }
            "K" => {
                let (id, _, components) = configs.last_mut().expect("a config precedes its keys");
                let (key, dtype, shape, optional) = (next(), next(), next(), next());
                let invalid =
                    |problem: String| config_error(format!("model config \"{id}\", key \"{key}\": {problem}"));
                let dtype = match dtype {
                    "" => None,
                    name => Some(DType::parse_user(name).ok_or_else(|| invalid(format!("unknown dtype \"{name}\"")))?),
                };
                let shape = match shape {
                    "?" => None,
                    "" => Some(Vec::new()),
                    dims => Some(
                        dims.split(',')
                            .map(|d| d.parse().map_err(|_| invalid(format!("dimension {d} is too large"))))
                            .collect::<Result<_>>()?,
                    ),
                };
                let meta =
                    KeyMeta { shape, dtype, aliases: fields.map(str::to_string).collect(), optional: optional == "1" };
                let (_, component) = components.last_mut().expect("a component precedes its keys");
                component.keys.insert(key.to_string(), meta);
            }
            tag => unreachable!("unknown compact config record {tag:?}"),
        }
    }
    let configs = configs.into_iter();
    configs.map(|(id, declared, components)| ModelConfig::new(id, declared, components)).collect()
}

/// sd-mecha's rule for identifiers: `<architecture>-<implementation>`, each `[a-z0-9._+]+`.
fn check_identifier(id: &str) -> Result<()> {
    let valid_part = |part: &str| {
        !part.is_empty() && part.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'+'))
    };
    match id.split_once('-') {
        Some((arch, implementation)) if valid_part(arch) && valid_part(implementation) => Ok(()),
        _ => Err(config_error(format!(
            "invalid model config identifier \"{id}\": it must read <architecture>-<implementation>, \
             each part made of lowercase letters, digits, '.', '_' or '+' (for example \"sdxl-sgm\")"
        ))),
    }
}

fn config_error(message: String) -> MechaError {
    MechaError::new(ErrorKind::Config, message)
}
