//! `exchange_ema` (sd-mecha's `ema.py`): swaps a checkpoint's weights with the EMA copy saved
//! next to them, so the EMA weights become the model's. An interface, dispatched by config; the
//! builtin implementation is for `sd1-ldm`, whose EMA keys are the UNet keys with their dots
//! removed (`model.diffusion_model.input_blocks.0.0.weight` ↔
//! `model_ema.diffusion_modelinput_blocks00weight`). Every key is a byte copy.

use std::collections::HashMap;

use super::decl::*;
use super::seam::{Clause, Decision, KeyMapCall, KeyRelation, Meta, Method, PlanCall};
use super::{MethodSpec, ReturnSpec, SpaceSpec, ValueType};
use crate::configs;
use crate::error::{ErrorKind, MechaError, Result};

const SD1_UNET: &str = "model.diffusion_model.";

/// The sd1-ldm EMA name of a UNet key.
fn sd1_ema_key(unet_key: &str) -> Option<String> {
    let rest = unet_key.strip_prefix("model.")?;
    unet_key.starts_with(SD1_UNET).then(|| format!("model_ema.{}", rest.replace('.', "")))
}

struct ExchangeEma {
    /// Each UNet key with its EMA key, and each EMA key with its UNet key.
    partner: HashMap<String, String>,
}

impl ExchangeEma {
    fn sd1() -> ExchangeEma {
        let config = configs::resolve("sd1-ldm").expect("builtin config");
        let mut partner = HashMap::new();
        for (key, _) in config.keys() {
            if let Some(ema) = sd1_ema_key(key).filter(|e| config.get(e).is_some()) {
                partner.insert(ema.clone(), key.to_string());
                partner.insert(key.to_string(), ema);
            }
        }
        ExchangeEma { partner }
    }
}

/// Marks the clause used when the input lacks a key's partner.
struct Unpaired;

impl Method for ExchangeEma {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        let Some(partner) = self.partner.get(call.key) else {
            return Some(KeyRelation::identity(call.key, 1));
        };
        let clauses = vec![
            Clause { inputs: vec![Some(vec![partner.clone()])], meta: Meta::default() },
            // the key without its partner: an error below (absent too: skipped as missing)
            Clause { inputs: vec![Some(vec![call.key.to_string()])], meta: Meta::new(Unpaired) },
        ];
        Some(KeyRelation { outputs: vec![call.key.to_string()], clauses })
    }

    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        if call.meta.get::<Unpaired>().is_none() {
            return Ok(Decision::Forward { param: 0, index: 0 });
        }
        let partner = &self.partner[call.key];
        if call.key.starts_with("model_ema.") {
            // A checkpoint without EMA weights: its UNet keys fail below, with the explanation.
            return Ok(Decision::Skip(format!("the input has no \"{partner}\" to take the EMA weights from")));
        }
        Err(MechaError::new(
            ErrorKind::Config,
            format!(
                "{}: the input has no EMA copy of \"{}\" (\"{partner}\"); exchange_ema needs a checkpoint saved \
                 with its EMA weights (model_ema.* keys)",
                call.method.id, call.key
            ),
        ))
    }
}

pub fn methods() -> Vec<MethodSpec> {
    let model = || input("model", ValueType::Tensor, SpaceSpec::Symbol).state_dict();
    let result = || returns(ValueType::Tensor, SpaceSpec::Symbol);
    vec![
        MethodSpec::interface(
            "exchange_ema",
            "Swaps the model's weights with the EMA weights saved in the same checkpoint (dispatched by config).",
            vec![model()],
            result(),
        ),
        MethodSpec::new(
            "exchange_ema_'sd1-ldm'",
            "exchange_ema for sd1-ldm: model.diffusion_model.* ↔ model_ema.* (keys without dots).",
            vec![model().config("sd1-ldm")],
            ReturnSpec { config: Some("sd1-ldm".into()), ..result() },
            ExchangeEma::sd1(),
        )
        .implements("exchange_ema"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sd1_unet_key_has_its_ema_partner() {
        let ema = ExchangeEma::sd1();
        let config = configs::resolve("sd1-ldm").unwrap();
        let unet = config.keys().filter(|(k, _)| k.starts_with(SD1_UNET)).count();
        assert!(unet > 600, "{unet}");
        assert_eq!(ema.partner.len(), 2 * unet);
        assert_eq!(
            ema.partner["model.diffusion_model.input_blocks.0.0.weight"],
            "model_ema.diffusion_modelinput_blocks00weight"
        );
        assert_eq!(ema.partner["model_ema.diffusion_modelout2weight"], "model.diffusion_model.out.2.weight");
    }
}
