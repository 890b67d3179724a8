//! Block-weight conversions (sd-mecha `convert_sd1_blocks.py`, `convert_sdxl_blocks.py`): each key
//! of a full model takes the value of the SuperMerger block it belongs to, so per-block weights
//! (MBW) become per-key weights.

use std::collections::HashMap;

use super::decl::*;
use super::seam::{Decision, KeyMapCall, KeyRelation, Method, PlanCall};
use super::{MethodSpec, ReturnSpec, SpaceSpec, ValueType};
use crate::configs;
use crate::error::Result;

/// The number after `marker` in `key` (as in `.input_blocks.4.`), when followed by a dot.
fn block_number(key: &str, marker: &str) -> Option<u32> {
    let rest = &key[key.find(marker)? + marker.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!digits.is_empty() && rest[digits.len()..].starts_with('.')).then(|| digits.parse().ok())?
}

/// The block a UNet key belongs to; `last` is the final output block (OUT11 for SD1, OUT08 for SDXL).
fn unet_block(key: &str, last: &str, base_markers: &[&str]) -> String {
    if base_markers.iter().any(|m| key.contains(m)) {
        "BASE".into()
    } else if key.contains(".out.") {
        last.into()
    } else if let Some(n) = block_number(key, ".input_blocks.") {
        format!("IN{n:02}")
    } else if block_number(key, ".middle_block.").is_some() {
        "M00".into()
    } else if let Some(n) = block_number(key, ".output_blocks.") {
        format!("OUT{n:02}")
    } else {
        last.into()
    }
}

fn sd1_block(key: &str) -> String {
    if key.starts_with("model.diffusion_model.") {
        unet_block(key, "OUT11", &[".time_embed"])
    } else {
        "BASE".into()
    }
}

fn sdxl_block(key: &str) -> String {
    if key.starts_with("model.diffusion_model.") {
        unet_block(key, "OUT08", &[".time_embed", ".label_emb"])
    } else if key.starts_with("first_stage_model.") {
        "VAE".into()
    } else {
        "BASE".into()
    }
}

/// Each key of the target config takes the value of one block key.
struct BlockRoutes {
    routes: HashMap<String, String>,
}

impl Method for BlockRoutes {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        let block = self.routes.get(call.key)?;
        Some(KeyRelation::single(call.key, vec![Some(vec![block.clone()])]))
    }
    fn plan(&self, _: &PlanCall) -> Result<Decision> {
        Ok(Decision::Forward { param: 0, index: 0 })
    }
}

fn converter(id: &str, from: &str, to: &str, block_of: fn(&str) -> String) -> MethodSpec {
    let config = configs::resolve(to).expect("builtin config");
    let routes = config.keys().map(|(k, _)| (k.to_string(), block_of(k))).collect();
    MethodSpec::new(
        id,
        &format!("Per-block values in {from} to per-key values in {to} (SuperMerger block names)."),
        vec![same_space("blocks", ValueType::Any).state_dict().config(from)],
        ReturnSpec { config: Some(to.into()), ..returns(ValueType::Any, SpaceSpec::Symbol) },
        BlockRoutes { routes },
    )
    .conversion()
}

pub fn methods() -> Vec<MethodSpec> {
    vec![
        converter("convert_sd1_blocks_to_ldm", "sd1-supermerger_blocks", "sd1-ldm", sd1_block),
        converter("convert_sdxl_blocks_to_sgm", "sdxl-supermerger_blocks", "sdxl-sgm", sdxl_block),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_route_to_supermerger_blocks() {
        let cases = [
            ("model.diffusion_model.time_embed.0.weight", "BASE"),
            ("model.diffusion_model.input_blocks.4.1.proj_in.weight", "IN04"),
            ("model.diffusion_model.input_blocks.11.0.in_layers.0.bias", "IN11"),
            ("model.diffusion_model.middle_block.1.norm.weight", "M00"),
            ("model.diffusion_model.output_blocks.11.1.norm.bias", "OUT11"),
            ("model.diffusion_model.out.2.weight", "OUT11"),
            ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "BASE"),
            ("first_stage_model.decoder.conv_in.weight", "BASE"),
        ];
        for (key, block) in cases {
            assert_eq!(sd1_block(key), block, "{key}");
        }
        assert_eq!(sdxl_block("first_stage_model.decoder.conv_in.weight"), "VAE");
        assert_eq!(sdxl_block("model.diffusion_model.label_emb.0.0.weight"), "BASE");
        assert_eq!(sdxl_block("model.diffusion_model.out.2.weight"), "OUT08");
        // every routed block exists in the blocks config
        for (from, to, block_of) in [
            ("sd1-supermerger_blocks", "sd1-ldm", sd1_block as fn(&str) -> String),
            ("sdxl-supermerger_blocks", "sdxl-sgm", sdxl_block),
        ] {
            let blocks = configs::resolve(from).unwrap();
            assert!(configs::resolve(to).unwrap().keys().all(|(k, _)| blocks.get(&block_of(k)).is_some()), "{to}");
        }
    }
}
