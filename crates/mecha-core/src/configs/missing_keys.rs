//! Model configs' missing-key handlers (sd-mecha 1.1.8's `missing_key_handler`): values a merge
//! writes for keys of the result's config that the inputs lack, so that a checkpoint pruned the
//! usual way still merges into a complete one. In sd-mecha a handler is Python code named by the
//! YAML; here each is Rust, chosen by the config's identifier.

/// How a handler fills a key it knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingKeyFill {
    /// `0, 1, 2, …` in the config's dtype and shape (position ids).
    Arange,
    /// Zeros in the merge's output dtype and the config's shape.
    Zeros,
}

const SDXL_POSITION_IDS: &str = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids";
/// The CLIP-L layer and the CLIP-G resblock that many SDXL checkpoints prune (SDXL conditions
/// on the penultimate layer, so they are never used).
const SDXL_PRUNED_LAYERS: [&str; 2] = [
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.",
    "conditioner.embedders.1.model.transformer.resblocks.31.",
];

/// The fill for `key` of config `config_id` when no input provides it, if that config has one.
pub fn missing_key_fill(config_id: &str, key: &str) -> Option<MissingKeyFill> {
    match config_id {
        "sdxl-sgm" if key == SDXL_POSITION_IDS => Some(MissingKeyFill::Arange),
        "sdxl-sgm" if SDXL_PRUNED_LAYERS.iter().any(|p| key.starts_with(p)) => Some(MissingKeyFill::Zeros),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_sgm_fills_position_ids_and_the_pruned_layers_only() {
        assert_eq!(missing_key_fill("sdxl-sgm", SDXL_POSITION_IDS), Some(MissingKeyFill::Arange));
        let l11 = "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight";
        let g31 = "conditioner.embedders.1.model.transformer.resblocks.31.ln_1.bias";
        assert_eq!(missing_key_fill("sdxl-sgm", l11), Some(MissingKeyFill::Zeros));
        assert_eq!(missing_key_fill("sdxl-sgm", g31), Some(MissingKeyFill::Zeros));
        let l10 = "conditioner.embedders.0.transformer.text_model.encoder.layers.10.mlp.fc1.weight";
        assert_eq!(missing_key_fill("sdxl-sgm", l10), None);
        assert_eq!(missing_key_fill("sdxl-sgm", "model.diffusion_model.out.2.bias"), None);
        // other configs have no handler, as in sd-mecha 1.1.8
        assert_eq!(
            missing_key_fill("sd1-ldm", "cond_stage_model.transformer.text_model.embeddings.position_ids"),
            None
        );
    }
}
