//! Extracting LoRA files from a delta (sd-mecha's `extract_*` methods in `lycoris.py`): the
//! inverse of the bake in `lycoris.rs`. Four interfaces, dispatched by the delta's config to one
//! implementation per LoRA config:
//!
//! - `extract_kohya_lora` / `extract_lycoris_lora` → `extract_lora_'<cfg>'`: the rank-`r`
//!   truncated SVD of each weight's delta (exact, or the seeded randomised range finder),
//!   written as `lora_up = u·√s`, `lora_down = √s·vᵀ` and `alpha = r`, so baking it back gives
//!   the best rank-`r` approximation of the delta;
//! - `extract_kohya_lokr` / `extract_lycoris_lokr` → `extract_lokr_'<cfg>'`: the nearest
//!   Kronecker product `lokr_w1 ⊗ lokr_w2` (rank-1 SVD of the rearranged delta), no alpha.
//!
//! sd-mecha 1.1.8 declares these but they produce nothing (LoRA) or raise (LoKr); this is the
//! evident intent (docs/differences.md).

use std::collections::HashMap;

use candle_core::Tensor;
use faer::{Mat, MatRef};

use super::decl::*;
use super::seam::{Arg, ComputeSpec, Decision, KeyMapCall, KeyRelation, Method, Output, PlanCall, RunCall};
use super::svd::{clamp_rank, decompose, fingerprint, flat_2d, kronecker_rearrangement};
use super::wholemath::svd::{kron_dims_from_ratio, to_rows, LeadingBasis};
use super::{DefaultValue, MethodSpec, ParamSpec, ReturnSpec, SpaceSpec, ValueType};
use crate::configs::lycoris::{has_low_rank_form, lora_configs, lycoris_stem};
use crate::configs::{self, ModelConfig};
use crate::error::Result;

/// The LoRA file layout an implementation writes.
#[derive(Copy, Clone)]
enum Form {
    /// `lora_up.weight`, `lora_down.weight`, `alpha`.
    LowRank,
    /// `lokr_w1`, `lokr_w2`.
    Kronecker,
}

impl Form {
    fn suffixes(self) -> &'static [&'static str] {
        match self {
            Form::LowRank => &["lora_up.weight", "lora_down.weight", "alpha"],
            Form::Kronecker => &["lokr_w1", "lokr_w2"],
        }
    }
}

struct Extract {
    form: Form,
    /// LoRA stem (`lora_unet_…`) → the base key it changes.
    base_key: HashMap<String, String>,
}

impl Extract {
    fn new(form: Form, base: &ModelConfig, prefix: &str) -> Extract {
        let base_key = base
            .keys()
            .filter(|(k, m)| has_low_rank_form(k, m))
            .map(|(k, _)| (lycoris_stem(prefix, k), k.to_string()))
            .collect();
        Extract { form, base_key }
    }
}

/// The shapes of a LoRA's factors for a base weight of `shape` at rank `r`: `up` keeps the
/// kernel's dimensions as 1s (`[out, r, 1, 1]` for a convolution, as kohya writes LoCon files),
/// `down` is `[r, in, kernel…]`.
fn low_rank_shapes(shape: &[usize], r: usize) -> [Vec<usize>; 3] {
    let mut up = vec![shape[0], r];
    up.resize(shape.len(), 1);
    let mut down = vec![r];
    down.extend(&shape[1..]);
    [up, down, vec![]]
}

fn kronecker_shapes(shape: &[usize], (m1, m2, n1, n2): (usize, usize, usize, usize)) -> [Vec<usize>; 2] {
    let mut w2 = vec![m2, n2];
    w2.extend(&shape[2..]);
    [vec![m1, n1], w2]
}

impl Extract {
    /// The shape of each output for a base weight of `shape`, from the constant parameter.
    fn shapes(&self, shape: &[usize], parameter: f64, method: &str) -> std::result::Result<Vec<Vec<usize>>, String> {
        Ok(match self.form {
            Form::LowRank => {
                let (m, n) = flat_2d(shape);
                let r = clamp_rank(parameter, m.min(n), method, "rank")?;
                low_rank_shapes(shape, r).to_vec()
            }
            Form::Kronecker => {
                if !parameter.is_finite() {
                    return Err(format!("{method}: kronecker_ratio must be a finite number, got {parameter}"));
                }
                kronecker_shapes(shape, kron_dims_from_ratio(shape, parameter)).to_vec()
            }
        })
    }
}

impl Method for Extract {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        let (stem, suffix) = call.key.split_once('.')?;
        if !self.form.suffixes().contains(&suffix) {
            return None;
        }
        let base = self.base_key.get(stem)?;
        let outputs = self.form.suffixes().iter().map(|s| format!("{stem}.{s}")).collect();
        // The delta is read at the base key; hyper-parameters live in the result's config.
        let mut inputs = vec![Some(vec![call.key.to_string()]); call.method.params.len()];
        inputs[0] = Some(vec![base.clone()]);
        Some(KeyRelation { outputs, clauses: vec![super::seam::Clause { inputs, meta: Default::default() }] })
    }

    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let Some(shape) = call.arg(0).and_then(|a| a.shape.clone()) else {
            return Err(call.fail("base must be a tensor"));
        };
        if shape.len() < 2 || shape.contains(&0) {
            return Ok(Decision::Skip(format!(
                "{} has no low-rank form (shape {shape:?})",
                call.arg(0).unwrap().origin
            )));
        }
        let parameter_name = &call.method.params[1].name;
        let Some(parameter) = call.number(1) else {
            return Err(call.fail(format!(
                "{parameter_name} must be known before the merge (a number), since it decides the shapes of the LoRA file"
            )));
        };
        let shapes = self.shapes(&shape, parameter, &call.method.id).map_err(|e| call.fail(e))?;
        let index = call.outputs.iter().position(|o| o == call.key).expect("the key is an output");
        if matches!(self.form, Form::LowRank) {
            let r = shapes[1][0];
            if r == 0 {
                return Ok(Decision::Skip(format!("{parameter_name} 0 leaves nothing to extract")));
            }
            if index == 2 {
                // alpha = rank, so the bake scales by alpha / rank = 1
                return Ok(Decision::Fill { value: r as f64, shape: vec![], dtype: None });
            }
        }
        let (m, n) = flat_2d(&shape);
        // f64 copies of the delta and its factors, the Gram matrix and its eigenvectors
        let extra_bytes = 8 * (3 * m * n + 2 * m.min(n).pow(2)) as u64;
        let shape = Some(shapes[index].clone());
        Ok(Decision::Compute(ComputeSpec { shape, dtype: None, kernel: None, extra_bytes }))
    }

    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let base = call.tensor(0, 0)?;
        let shape = base.dims().to_vec();
        let data = super::wholemath::to_f64_vec(&base)?;
        let parameter = call.number(1)?;
        let shapes = self.shapes(&shape, parameter, &call.method.id).map_err(|e| call.fail(e))?;
        let (first, second) = match self.form {
            Form::LowRank => {
                let (m, n) = flat_2d(&shape);
                let r = shapes[1][0];
                // a view of the data; `decompose` copies it only when nothing is cached
                let view = MatRef::from_row_major_slice(&data, m, n);
                let copy = || view.to_owned();
                let d = decompose(&call, "extract_lora.svd", (m, n), copy, fingerprint(&[&data[..]]), (0, 0, 0, 0), r)?;
                d.factors(view, r)
            }
            Form::Kronecker => {
                let mat = kronecker_rearrangement(&data, &shape, kron_dims_from_ratio(&shape, parameter));
                LeadingBasis::new(mat.as_ref(), 1).map_err(|e| call.fail(e))?.factors(mat.as_ref(), 1)
            }
        };
        let tensor = |m: &Mat<f64>, shape: &[usize]| -> Result<Arg> {
            Ok(Arg::Tensor(Tensor::from_vec(to_rows(m.as_ref()), shape, base.device())?.to_dtype(base.dtype())?))
        };
        let mut out = vec![tensor(&first, &shapes[0])?, tensor(&second, &shapes[1])?];
        if let Some(alpha) = shapes.get(2) {
            out.push(Arg::Tensor(
                Tensor::new(shapes[1][0] as f64, base.device())?.to_dtype(base.dtype())?.reshape(alpha.as_slice())?,
            ));
        }
        Ok(out)
    }
}

/// The delta extracted from, in `base`'s config for an implementation (none for the interface).
fn delta_param(base: Option<&str>) -> ParamSpec {
    ParamSpec {
        config: base.map(String::from),
        ..input("base", ValueType::Tensor, SpaceSpec::fixed(&["delta"])).state_dict()
    }
}

fn lora_params(base: Option<&str>) -> Vec<ParamSpec> {
    vec![
        delta_param(base),
        hyper("rank", ValueType::Int, DefaultValue::Int(8)),
        hyper("use_approximate_basis", ValueType::Bool, DefaultValue::Bool(true)),
        hyper("approximate_basis_iters", ValueType::Int, DefaultValue::Int(2)),
        hyper("approximate_basis_seed", ValueType::Int, DefaultValue::Null),
    ]
}

fn lokr_params(base: Option<&str>) -> Vec<ParamSpec> {
    vec![delta_param(base), hyper("kronecker_ratio", ValueType::Float, DefaultValue::Float(0.5))]
}

pub fn methods() -> Vec<MethodSpec> {
    let weight = || returns(ValueType::Tensor, SpaceSpec::fixed(&["weight"]));
    let mut methods = vec![];
    for flavour in ["kohya", "lycoris"] {
        methods.push(MethodSpec::interface(
            &format!("extract_{flavour}_lora"),
            &format!("A {flavour}-named LoRA (lora_up, lora_down, alpha) of a delta: its rank-`rank` truncated SVD (dispatched by config)."),
            lora_params(None),
            weight(),
        ));
        methods.push(MethodSpec::interface(
            &format!("extract_{flavour}_lokr"),
            &format!("A {flavour}-named LoKr (lokr_w1 ⊗ lokr_w2) of a delta: its nearest Kronecker product (dispatched by config)."),
            lokr_params(None),
            weight(),
        ));
    }
    for (lora, base, prefix) in lora_configs() {
        let flavour = if prefix == "lora" { "kohya" } else { "lycoris" };
        let base_config = configs::resolve(base).expect("builtin config");
        let result = ReturnSpec { config: Some(lora.clone()), ..weight() };
        methods.push(
            MethodSpec::new(
                &format!("extract_lora_'{lora}'"),
                &format!("extract_{flavour}_lora for {base} deltas."),
                lora_params(Some(base)),
                result.clone(),
                Extract::new(Form::LowRank, &base_config, prefix),
            )
            .implements(&format!("extract_{flavour}_lora")),
        );
        methods.push(
            MethodSpec::new(
                &format!("extract_lokr_'{lora}'"),
                &format!("extract_{flavour}_lokr for {base} deltas."),
                lokr_params(Some(base)),
                result,
                Extract::new(Form::Kronecker, &base_config, prefix),
            )
            .implements(&format!("extract_{flavour}_lokr")),
        );
    }
    methods
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_shapes_follow_kohya() {
        assert_eq!(low_rank_shapes(&[640, 320], 8), [vec![640, 8], vec![8, 320], vec![]]);
        assert_eq!(low_rank_shapes(&[320, 4, 3, 3], 4), [vec![320, 4, 1, 1], vec![4, 4, 3, 3], vec![]]);
        let (m1, m2, n1, n2) = kron_dims_from_ratio(&[640, 320, 3, 3], 0.5);
        assert_eq!(m1 * m2, 640);
        assert_eq!(n1 * n2, 320);
        assert_eq!(kronecker_shapes(&[640, 320, 3, 3], (m1, m2, n1, n2))[1], vec![m2, n2, 3, 3]);
    }

    #[test]
    fn every_lora_config_key_maps_to_a_base_weight() {
        let base = configs::resolve("sdxl-kohya").unwrap();
        let e = Extract::new(Form::LowRank, &base, "lora");
        let stem = lycoris_stem("lora", "unet.input_blocks.1.0.in_layers.2.weight");
        assert_eq!(e.base_key.get(&stem).map(String::as_str), Some("unet.input_blocks.1.0.in_layers.2.weight"));
    }
}
