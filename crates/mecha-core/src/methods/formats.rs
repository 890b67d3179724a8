//! Conversions between key formats of the same architecture (sd-mecha's
//! `convert_sd1_kohya_to_original.py`, `convert_sdxl_kohya_to_original.py`,
//! `convert_sdxl_diffusers_unet_to_original.py`): renames, plus the few tensors stored in
//! another layout (CLIP-G's fused q/k/v, its transposed text projection, the SD1 VAE attention's
//! 1×1 convolutions). Renamed tensors are forwarded without computing, so a conversion streams
//! like a merge and round trips are byte-identical.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use super::decl::*;
use super::seam::{
    Arg, Clause, ComputeSpec, Decision, KeyMapCall, KeyRelation, Meta, Method, Output, PlanCall, RunCall,
};
use super::{MethodSpec, ReturnSpec, SpaceSpec, ValueType};
use crate::configs::key_names::{diffusers_unet, diffusers_vae, kohya_clip_g, Source, UnetLayout};
use crate::configs::{self, ModelConfig};
use crate::error::{ErrorKind, MechaError, Result};

/// How an output key of a conversion is built.
#[derive(Clone, Debug)]
enum Route {
    One(Source),
    /// The output is one of `outputs`, the equal row blocks of `input` (q/k/v of a fused
    /// projection), computed together.
    Split {
        input: String,
        outputs: Arc<Vec<String>>,
    },
}

/// Names an original (ldm / sgm) key in the other layout; `None`: the other layout lacks it.
type Namer = fn(&str) -> Option<Source>;

fn sdxl_kohya(sgm: &str) -> Option<Source> {
    sdxl_kohya_with(sgm, |unet| format!("unet.{unet}"))
}

fn sdxl_kohya_but_diffusers(sgm: &str) -> Option<Source> {
    sdxl_kohya_with(sgm, |unet| format!("unet.{}", diffusers_unet(unet, UnetLayout::Sdxl)))
}

fn sdxl_kohya_with(sgm: &str, unet: impl Fn(&str) -> String) -> Option<Source> {
    if let Some(rest) = sgm.strip_prefix("model.diffusion_model.") {
        Some(Source::Copy(unet(rest)))
    } else if let Some(rest) = sgm.strip_prefix("conditioner.embedders.0.transformer.") {
        Some(Source::Copy(format!("te1.{rest}")))
    } else if sgm.starts_with("conditioner.embedders.1.model.") {
        kohya_clip_g(sgm)
    } else if sgm.starts_with("first_stage_model.") {
        Some(Source::Copy(sgm.to_string()))
    } else {
        None
    }
}

fn sdxl_diffusers_unet(sgm: &str) -> Option<Source> {
    let rest = sgm.strip_prefix("model.diffusion_model.")?;
    Some(Source::Copy(diffusers_unet(rest, UnetLayout::Sdxl)))
}

fn sd1_kohya(ldm: &str) -> Option<Source> {
    if let Some(rest) = ldm.strip_prefix("model.diffusion_model.") {
        Some(Source::Copy(format!("unet.{}", diffusers_unet(rest, UnetLayout::Sd1))))
    } else if let Some(rest) = ldm.strip_prefix("cond_stage_model.transformer.") {
        Some(Source::Copy(format!("te.{rest}")))
    } else {
        diffusers_vae(ldm)
    }
}

/// The names `source` reads from the other layout.
fn names(source: &Source) -> Vec<&String> {
    match source {
        Source::Copy(k) | Source::Transpose(k) | Source::AsConv(k) | Source::AsLinear(k) => vec![k],
        Source::Concat(ks) => ks.iter().collect(),
    }
}

/// The routes of both directions between an original config and another layout: every original
/// key whose counterpart names exist in `other`.
fn tables(original: &ModelConfig, other: &ModelConfig, namer: Namer) -> [HashMap<String, Route>; 2] {
    let (mut to_original, mut to_other) = (HashMap::new(), HashMap::new());
    for (key, _) in original.keys() {
        let Some(source) = namer(key) else { continue };
        if !names(&source).iter().all(|k| other.get(k).is_some()) {
            continue;
        }
        let key = key.to_string();
        match &source {
            Source::Concat(parts) => {
                let outputs = Arc::new(parts.clone());
                for part in parts {
                    to_other.insert(part.clone(), Route::Split { input: key.clone(), outputs: outputs.clone() });
                }
            }
            Source::Copy(k) => drop(to_other.insert(k.clone(), Route::One(Source::Copy(key.clone())))),
            Source::Transpose(k) => drop(to_other.insert(k.clone(), Route::One(Source::Transpose(key.clone())))),
            Source::AsLinear(k) => drop(to_other.insert(k.clone(), Route::One(Source::AsLinear(key.clone())))),
            Source::AsConv(k) => drop(to_other.insert(k.clone(), Route::One(Source::AsConv(key.clone())))),
        }
        let back = match source {
            Source::AsLinear(k) => Source::AsConv(k),
            Source::AsConv(k) => Source::AsLinear(k),
            s => s,
        };
        to_original.insert(key, Route::One(back));
    }
    [to_original, to_other]
}

struct FormatConversion {
    routes: HashMap<String, Route>,
}

fn shape_error(call: &PlanCall, what: String) -> MechaError {
    MechaError::new(ErrorKind::Shape, format!("{}: key \"{}\": {what}", call.method.id, call.key))
}

/// Which parts of a stacked key (q, k, v) a clause reads; the others are zeros.
struct PresentParts(Vec<bool>);

/// For a stacked key in delta space: every way of reading some of its parts, most parts first.
/// A difference that lacks a part changes nothing there (a LoRA that trains CLIP-G's q but not
/// its k and v still changes `in_proj_weight`), which a weight never may.
fn partial_stacks(parts: &[String]) -> Vec<Clause> {
    let n = parts.len();
    let mut masks: Vec<Vec<bool>> = (1..(1u32 << n) - 1).map(|m| (0..n).map(|i| m >> i & 1 == 1).collect()).collect();
    masks.sort_by_key(|m| std::cmp::Reverse(m.iter().filter(|&&p| p).count()));
    masks
        .into_iter()
        .map(|mask| {
            let keys = parts.iter().zip(&mask).filter(|(_, &p)| p).map(|(k, _)| k.clone()).collect();
            Clause { inputs: vec![Some(keys)], meta: Meta::new(PresentParts(mask)) }
        })
        .collect()
}

impl Method for FormatConversion {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        Some(match self.routes.get(call.key)? {
            Route::One(Source::Concat(parts)) if call.merge_space == Some("delta") => {
                let mut relation = KeyRelation::single(call.key, vec![Some(parts.clone())]);
                relation.clauses.extend(partial_stacks(parts));
                relation
            }
            Route::One(source) => {
                KeyRelation::single(call.key, vec![Some(names(source).into_iter().cloned().collect())])
            }
            Route::Split { input, outputs } => KeyRelation {
                outputs: outputs.to_vec(),
                clauses: vec![Clause { inputs: vec![Some(vec![input.clone()])], meta: Meta::default() }],
            },
        })
    }

    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let route = &self.routes[call.key];
        let shapes: Vec<&Vec<usize>> = call.args[0].iter().filter_map(|a| a.shape.as_ref()).collect();
        let Some(&first) = shapes.first() else { return Ok(Decision::Forward { param: 0, index: 0 }) };
        let shape = match route {
            Route::One(Source::Copy(_)) => return Ok(Decision::Forward { param: 0, index: 0 }),
            Route::One(Source::Transpose(_)) => match first[..] {
                [rows, cols] => vec![cols, rows],
                _ => return Err(shape_error(call, format!("a transposed key must be a matrix, not {first:?}"))),
            },
            Route::One(Source::AsConv(_)) => match first[..] {
                [out, inp] => vec![out, inp, 1, 1],
                [_, _, 1, 1] => return Ok(Decision::Forward { param: 0, index: 0 }),
                _ => return Err(shape_error(call, format!("expected a [c, c] or [c, c, 1, 1] weight, not {first:?}"))),
            },
            Route::One(Source::AsLinear(_)) => match first[..] {
                [out, inp, 1, 1] => vec![out, inp],
                [_, _] => return Ok(Decision::Forward { param: 0, index: 0 }),
                _ => return Err(shape_error(call, format!("expected a [c, c, 1, 1] or [c, c] weight, not {first:?}"))),
            },
            Route::One(Source::Concat(parts)) => {
                if shapes.iter().any(|s| s.is_empty() || s[1..] != first[1..]) {
                    return Err(shape_error(call, format!("the stacked parts have shapes {shapes:?}")));
                }
                let mut shape = first.clone();
                shape[0] = shapes.iter().map(|s| s[0]).sum();
                if call.meta.get::<PresentParts>().is_some() {
                    // q, k and v are blocks of one size: the missing ones are zeros like the others
                    if shapes.iter().any(|s| s[0] != first[0]) {
                        return Err(shape_error(call, format!("the stacked parts have shapes {shapes:?}")));
                    }
                    shape[0] = first[0] * parts.len();
                }
                shape
            }
            Route::Split { outputs, .. } => {
                if first.is_empty() || first[0] % outputs.len() != 0 {
                    return Err(shape_error(
                        call,
                        format!("a {first:?} tensor cannot be split into {} equal parts", outputs.len()),
                    ));
                }
                let mut shape = first.clone();
                shape[0] /= outputs.len();
                shape
            }
        };
        Ok(ComputeSpec::whole(Some(shape)))
    }

    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let route = &self.routes[call.key()];
        let tensors = call.tensors(0)?;
        let result = match route {
            Route::One(Source::Transpose(_)) => tensors[0].t()?.contiguous()?,
            Route::One(Source::AsConv(_) | Source::AsLinear(_)) => {
                tensors[0].reshape(call.shape.clone().expect("planned with a shape"))?
            }
            Route::One(Source::Concat(_)) => match call.meta.get::<PresentParts>() {
                None => Tensor::cat(&tensors, 0)?,
                Some(PresentParts(mask)) => {
                    let zeros = tensors[0].zeros_like()?;
                    let mut given = tensors.iter();
                    let parts: Vec<&Tensor> = mask
                        .iter()
                        .map(|&p| if p { given.next().expect("one per present part") } else { &zeros })
                        .collect();
                    Tensor::cat(&parts, 0)?
                }
            },
            Route::One(Source::Copy(_)) => tensors[0].clone(),
            Route::Split { outputs, .. } => {
                let rows = tensors[0].dim(0)? / outputs.len();
                return (0..outputs.len())
                    .map(|i| Ok(Arg::Tensor(tensors[0].narrow(0, i * rows, rows)?.contiguous()?)))
                    .collect();
            }
        };
        Ok(vec![Arg::Tensor(result)])
    }
}

fn conversion(from: &str, to: &str, routes: HashMap<String, Route>) -> MethodSpec {
    MethodSpec::new(
        &format!("convert_'{from}'_to_'{to}'"),
        &format!("Renames (and restacks where the layouts differ) the keys of {from} into {to}."),
        vec![same_space("model", ValueType::Tensor).state_dict().config(from)],
        ReturnSpec { config: Some(to.into()), ..returns(ValueType::Tensor, SpaceSpec::Symbol) },
        FormatConversion { routes },
    )
    .conversion()
}

/// Both directions between an original config and another layout of it.
fn pair(original: &str, other: &str, namer: Namer) -> [MethodSpec; 2] {
    let resolve = |id| configs::resolve(id).expect("builtin config");
    let [to_original, to_other] = tables(&resolve(original), &resolve(other), namer);
    [conversion(other, original, to_original), conversion(original, other, to_other)]
}

pub fn methods() -> Vec<MethodSpec> {
    [
        pair("sdxl-sgm", "sdxl-kohya", sdxl_kohya),
        pair("sdxl-sgm", "sdxl-kohya_but_diffusers", sdxl_kohya_but_diffusers),
        pair("sdxl-sgm", "sdxl-diffusers_unet_only", sdxl_diffusers_unet),
        pair("sd1-ldm", "sd1-kohya", sd1_kohya),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of each layout is reached from the other (except what one layout lacks), and
    /// no two outputs read the same input.
    #[test]
    fn tables_cover_both_configs() {
        let cases: [(&str, &str, Namer); 4] = [
            ("sdxl-sgm", "sdxl-kohya", sdxl_kohya),
            ("sdxl-sgm", "sdxl-kohya_but_diffusers", sdxl_kohya_but_diffusers),
            ("sdxl-sgm", "sdxl-diffusers_unet_only", sdxl_diffusers_unet),
            ("sd1-ldm", "sd1-kohya", sd1_kohya),
        ];
        for (original, other, namer) in cases {
            let (o, t) = (configs::resolve(original).unwrap(), configs::resolve(other).unwrap());
            let [to_original, to_other] = tables(&o, &t, namer);
            let missing: Vec<&str> = t.keys().map(|(k, _)| k).filter(|k| !to_other.contains_key(*k)).collect();
            assert!(
                missing.is_empty(),
                "{original} → {other} misses {} keys, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            let mut read: Vec<&String> = to_original
                .values()
                .flat_map(|r| match r {
                    Route::One(s) => names(s),
                    Route::Split { .. } => unreachable!(),
                })
                .collect();
            let n = read.len();
            read.sort();
            read.dedup();
            assert_eq!(read.len(), n, "{other} → {original} reads a key twice");
            assert_eq!(n, t.keys().count(), "{other} → {original} uses every key of {other}");
        }
    }
}
