//! How the same tensor is named in each checkpoint layout: ldm / sgm (Stability's original
//! code), diffusers and kohya (sd-scripts). Each function names an original (ldm / sgm) key in
//! another layout; the conversions in `methods/formats.rs` build their tables from these and
//! invert them for the reverse direction, so both directions always agree.
//!
//! The rules follow diffusers' `convert_diffusers_to_original_stable_diffusion.py` tables, as
//! sd-mecha uses them; the unit tests check that they name every key of each target config.

use std::sync::OnceLock;

/// The UNet block structure: SD 1.x has four levels (attention in the first three down and the
/// last three up levels); SDXL has three (attention in the last two down and first two up levels).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum UnetLayout {
    Sd1,
    Sdxl,
}

/// How one output tensor is made from its input tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The same tensor under another name.
    Copy(String),
    /// The transposed matrix (open_clip's `text_projection` is stored the other way round).
    Transpose(String),
    /// A `[c, c]` linear weight stored as a `[c, c, 1, 1]` 1×1 convolution (VAE attention).
    AsConv(String),
    /// The reverse: a `[c, c, 1, 1]` convolution stored as a `[c, c]` linear weight.
    AsLinear(String),
    /// The inputs stacked along the first dimension (open_clip's fused q/k/v projection).
    Concat(Vec<String>),
}

/// `(ldm prefix, diffusers prefix)` pairs for a UNet layout, tried in order on the key's start.
fn unet_prefixes(layout: UnetLayout) -> &'static [(String, String)] {
    static SD1: OnceLock<Vec<(String, String)>> = OnceLock::new();
    static SDXL: OnceLock<Vec<(String, String)>> = OnceLock::new();
    let cell = match layout {
        UnetLayout::Sd1 => &SD1,
        UnetLayout::Sdxl => &SDXL,
    };
    cell.get_or_init(|| {
        // Which down / up levels have attention blocks.
        let levels = if layout == UnetLayout::Sd1 { 4 } else { 3 };
        let down_attention = |i: usize| if layout == UnetLayout::Sd1 { i < 3 } else { i > 0 };
        let up_attention = |i: usize| if layout == UnetLayout::Sd1 { i > 0 } else { i < 2 };
        let mut p: Vec<(String, String)> = vec![
            ("time_embed.0.".into(), "time_embedding.linear_1.".into()),
            ("time_embed.2.".into(), "time_embedding.linear_2.".into()),
            ("label_emb.0.0.".into(), "add_embedding.linear_1.".into()),
            ("label_emb.0.2.".into(), "add_embedding.linear_2.".into()),
            ("input_blocks.0.0.".into(), "conv_in.".into()),
            ("out.0.".into(), "conv_norm_out.".into()),
            ("out.2.".into(), "conv_out.".into()),
            ("middle_block.1.".into(), "mid_block.attentions.0.".into()),
            ("middle_block.0.".into(), "mid_block.resnets.0.".into()),
            ("middle_block.2.".into(), "mid_block.resnets.1.".into()),
        ];
        for i in 0..levels {
            for j in 0..2 {
                let n = 3 * i + j + 1;
                p.push((format!("input_blocks.{n}.0."), format!("down_blocks.{i}.resnets.{j}.")));
                if down_attention(i) {
                    p.push((format!("input_blocks.{n}.1."), format!("down_blocks.{i}.attentions.{j}.")));
                }
            }
            for j in 0..3 {
                let n = 3 * i + j;
                p.push((format!("output_blocks.{n}.0."), format!("up_blocks.{i}.resnets.{j}.")));
                if up_attention(i) {
                    p.push((format!("output_blocks.{n}.1."), format!("up_blocks.{i}.attentions.{j}.")));
                }
            }
            if i < 3 {
                // (SD1 has no resampling at its fourth level; SDXL's last rules name no key)
                p.push((
                    format!("input_blocks.{}.0.op.", 3 * (i + 1)),
                    format!("down_blocks.{i}.downsamplers.0.conv."),
                ));
                // The upsampler follows the level's last resnet (and its attention, if any).
                let slot = if up_attention(i) { 2 } else { 1 };
                p.push((format!("output_blocks.{}.{slot}.", 3 * i + 2), format!("up_blocks.{i}.upsamplers.0.")));
            }
        }
        p
    })
}

/// Renames inside a UNet resnet block.
const RESNET_PARTS: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

fn rename_start(name: &str, pairs: &[(impl AsRef<str>, impl AsRef<str>)]) -> Option<String> {
    pairs.iter().find_map(|(from, to)| name.strip_prefix(from.as_ref()).map(|rest| format!("{}{rest}", to.as_ref())))
}

/// An ldm / sgm UNet key without its `model.diffusion_model.` prefix, in diffusers naming.
pub fn diffusers_unet(ldm: &str, layout: UnetLayout) -> String {
    let Some(renamed) = rename_start(ldm, unet_prefixes(layout)) else { return ldm.to_string() };
    // `…resnets.N.` then the resnet's own part names
    let Some(at) = renamed.find("resnets.") else { return renamed };
    let number = &renamed[at + "resnets.".len()..];
    let Some(dot) = number.find('.') else { return renamed };
    let (block, part) = renamed.split_at(renamed.len() - number.len() + dot + 1);
    format!("{block}{}", rename_start(part, &RESNET_PARTS).unwrap_or_else(|| part.to_string()))
}

/// An sgm CLIP-G key (`conditioner.embedders.1.model.…`) in kohya / transformers naming under
/// `te2.`; `None` for `logit_scale`, which transformers' model does not have.
pub fn kohya_clip_g(sgm: &str) -> Option<Source> {
    let rest = sgm.strip_prefix("conditioner.embedders.1.model.")?;
    let te = |s: &str| format!("te2.text_model.{s}");
    Some(match rest {
        "text_projection" => Source::Transpose("te2.text_projection.weight".into()),
        "positional_embedding" => Source::Copy(te("embeddings.position_embedding.weight")),
        "logit_scale" => return None,
        _ => {
            if let Some(r) = rest.strip_prefix("token_embedding.") {
                Source::Copy(te(&format!("embeddings.token_embedding.{r}")))
            } else if let Some(r) = rest.strip_prefix("ln_final.") {
                Source::Copy(te(&format!("final_layer_norm.{r}")))
            } else {
                let r = rest.strip_prefix("transformer.resblocks.")?;
                let (layer, part) = r.split_once('.')?;
                let layer = te(&format!("encoder.layers.{layer}."));
                let fused = |kind: &str| {
                    Source::Concat(
                        ["q", "k", "v"].iter().map(|p| format!("{layer}self_attn.{p}_proj.{kind}")).collect(),
                    )
                };
                match part {
                    "attn.in_proj_weight" => fused("weight"),
                    "attn.in_proj_bias" => fused("bias"),
                    _ => {
                        const PARTS: [(&str, &str); 5] = [
                            ("attn.out_proj.", "self_attn.out_proj."),
                            ("ln_1.", "layer_norm1."),
                            ("ln_2.", "layer_norm2."),
                            ("mlp.c_fc.", "mlp.fc1."),
                            ("mlp.c_proj.", "mlp.fc2."),
                        ];
                        Source::Copy(format!("{layer}{}", rename_start(part, &PARTS)?))
                    }
                }
            }
        }
    })
}

/// An SD1 ldm VAE key (`first_stage_model.…`) in diffusers naming under `vae.`.
pub fn diffusers_vae(ldm: &str) -> Option<Source> {
    let rest = ldm.strip_prefix("first_stage_model.")?;
    let (coder, part) = rest.split_once('.')?;
    let renamed = if let Some(attn) = part.strip_prefix("mid.attn_1.") {
        const ATTN: [(&str, &str); 5] =
            [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")];
        let name = format!("vae.{coder}.mid_block.attentions.0.{}", rename_start(attn, &ATTN)?);
        // The projections are 1×1 convolutions in ldm and linear layers in diffusers.
        return Some(if attn.ends_with("weight") && !attn.starts_with("norm.") {
            Source::AsLinear(name)
        } else {
            Source::Copy(name)
        });
    } else if let Some(r) = part.strip_prefix("mid.block_") {
        let (n, r) = r.split_once('.')?;
        format!("mid_block.resnets.{}.{r}", n.parse::<usize>().ok()?.checked_sub(1)?)
    } else if let Some(r) = part.strip_prefix("down.") {
        let (i, r) = r.split_once('.')?;
        match r.split_once('.')? {
            ("block", r) => format!("down_blocks.{i}.resnets.{r}"),
            ("downsample", r) => format!("down_blocks.{i}.downsamplers.0.{r}"),
            _ => return None,
        }
    } else if let Some(r) = part.strip_prefix("up.") {
        // diffusers numbers the decoder's levels from the bottom, ldm from the top.
        let (i, r) = r.split_once('.')?;
        let level = 3usize.checked_sub(i.parse().ok()?)?;
        match r.split_once('.')? {
            ("block", r) => format!("up_blocks.{level}.resnets.{r}"),
            ("upsample", r) => format!("up_blocks.{level}.upsamplers.0.{r}"),
            _ => return None,
        }
    } else if let Some(r) = part.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else {
        part.to_string()
    };
    Some(Source::Copy(format!("vae.{coder}.{}", renamed.replace("nin_shortcut.", "conv_shortcut."))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_diffusers() {
        let cases = [
            (UnetLayout::Sd1, "input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
            (UnetLayout::Sd1, "input_blocks.4.1.proj_in.weight", "down_blocks.1.attentions.0.proj_in.weight"),
            (UnetLayout::Sd1, "input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
            (UnetLayout::Sd1, "output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            (UnetLayout::Sd1, "output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            (UnetLayout::Sd1, "middle_block.2.emb_layers.1.bias", "mid_block.resnets.1.time_emb_proj.bias"),
            (UnetLayout::Sd1, "out.2.weight", "conv_out.weight"),
            (UnetLayout::Sdxl, "input_blocks.4.1.norm.weight", "down_blocks.1.attentions.0.norm.weight"),
            (UnetLayout::Sdxl, "output_blocks.2.2.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            (UnetLayout::Sdxl, "output_blocks.8.0.skip_connection.bias", "up_blocks.2.resnets.2.conv_shortcut.bias"),
            (UnetLayout::Sdxl, "label_emb.0.2.weight", "add_embedding.linear_2.weight"),
        ];
        for (layout, ldm, hf) in cases {
            assert_eq!(diffusers_unet(ldm, layout), hf, "{ldm}");
        }
    }

    #[test]
    fn clip_g_and_vae_names() {
        assert_eq!(
            kohya_clip_g("conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_bias"),
            Some(Source::Concat(vec![
                "te2.text_model.encoder.layers.3.self_attn.q_proj.bias".into(),
                "te2.text_model.encoder.layers.3.self_attn.k_proj.bias".into(),
                "te2.text_model.encoder.layers.3.self_attn.v_proj.bias".into(),
            ]))
        );
        assert_eq!(kohya_clip_g("conditioner.embedders.1.model.logit_scale"), None);
        assert_eq!(
            diffusers_vae("first_stage_model.decoder.up.3.block.2.nin_shortcut.weight"),
            Some(Source::Copy("vae.decoder.up_blocks.0.resnets.2.conv_shortcut.weight".into()))
        );
        assert_eq!(
            diffusers_vae("first_stage_model.encoder.mid.attn_1.q.weight"),
            Some(Source::AsLinear("vae.encoder.mid_block.attentions.0.to_q.weight".into()))
        );
        assert_eq!(
            diffusers_vae("first_stage_model.encoder.mid.attn_1.norm.bias"),
            Some(Source::Copy("vae.encoder.mid_block.attentions.0.group_norm.bias".into()))
        );
    }
}
