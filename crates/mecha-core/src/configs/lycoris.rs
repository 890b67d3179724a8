//! The LoRA / LyCORIS configs sd-mecha derives from the kohya configs: one key per algorithm
//! suffix for every weight with two or more dimensions, all optional. They take part in config
//! inference (a kohya LoRA file is recognised by them).

use indexmap::IndexMap;

use super::{Component, KeyMeta, ModelConfig};

const BASES: [&str; 3] = ["sdxl-kohya", "sdxl-kohya_but_diffusers", "sd1-kohya"];
/// (identifier part, key prefix)
const FLAVOURS: [(&str, &str); 2] = [("lycoris", "lycoris"), ("kohya", "lora")];
/// Suffixes of LoRA (up, mid, down, alpha) then LoKr, in sd-mecha's order, then LoHa, which
/// sd-mecha's configs lack (so it cannot read LoHa files; see docs/differences.md).
const SUFFIXES: [&[&str]; 3] = [
    &["lora_up.weight", "lora_mid.weight", "lora_down.weight", "alpha"],
    &["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"],
    &["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"],
];

/// Every key of a derived config starts with one of these (`lora_…`, `lycoris_…`).
pub fn has_lycoris_prefix(key: &str) -> bool {
    FLAVOURS.iter().any(|(_, prefix)| key.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('_')))
}

/// `unet.a.b.weight` → `<prefix>_unet_a_b`.
pub fn lycoris_stem(prefix: &str, key: &str) -> String {
    let key = key.strip_suffix(".weight").unwrap_or(key);
    format!("{prefix}_{}", key.replace('.', "_"))
}

/// A base key a LoRA can change: a floating-point weight with two or more dimensions.
pub fn has_low_rank_form(key: &str, meta: &KeyMeta) -> bool {
    !key.ends_with("bias")
        && meta.dtype.is_none_or(|d| d.is_float())
        && meta.shape.as_ref().is_none_or(|s| s.len() >= 2)
}

fn derive(base: &ModelConfig, flavour: &str, prefix: &str) -> ModelConfig {
    let components = base
        .components()
        .iter()
        .map(|(name, component)| {
            let mut keys = IndexMap::new();
            for (key, meta) in component.keys.iter().filter(|(k, m)| has_low_rank_form(k, m)) {
                let stem = lycoris_stem(prefix, key);
                for suffix in SUFFIXES.iter().flat_map(|s| s.iter()) {
                    let shape = (*suffix == "alpha").then(Vec::new);
                    let derived = KeyMeta { shape, dtype: meta.dtype, aliases: meta.aliases.clone(), optional: true };
                    keys.insert(format!("{stem}.{suffix}"), derived);
                }
            }
            (name.clone(), Component { keys })
        })
        .collect();
    let id = derived_id(&base.id, flavour);
    ModelConfig::new(id.clone(), id, components).expect("derived from a valid builtin config")
}

/// The id of the LoRA config derived from `base` for a flavour (`kohya` or `lycoris`).
fn derived_id(base: &str, flavour: &str) -> String {
    format!("{base}_{flavour}_lora")
}

/// One of the six derived LoRA configs.
pub fn is_lora_config(id: &str) -> bool {
    lora_configs().iter().any(|(lora, _, _)| lora == id)
}

/// For each of the six derived configs: (its id, its base config id, its key prefix).
pub fn lora_configs() -> Vec<(String, &'static str, &'static str)> {
    FLAVOURS
        .iter()
        .flat_map(|(flavour, prefix)| BASES.iter().map(move |base| (derived_id(base, flavour), *base, *prefix)))
        .collect()
}

/// The six auxiliary configs, e.g. `sdxl-kohya_kohya_lora`.
pub fn derived_configs(base: impl Fn(&str) -> Option<std::sync::Arc<ModelConfig>>) -> Vec<ModelConfig> {
    FLAVOURS
        .iter()
        .flat_map(|(flavour, prefix)| {
            BASES
                .iter()
                .map(|id| derive(&base(id).expect("kohya configs are builtin"), flavour, prefix))
                .collect::<Vec<_>>()
        })
        .collect()
}
