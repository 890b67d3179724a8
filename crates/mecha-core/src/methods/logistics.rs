//! Methods that route, convert or inspect values rather than compute on them (sd-mecha
//! `logistics.py` and `convert_singleton_to_any.py`). Most are decided at plan time.

use std::sync::Arc;

use super::decl::*;
use super::seam::{
    Arg, Clause, ComputeSpec, Decision, KeyMapCall, KeyRelation, Meta, Method, Output, PlanCall, RunCall,
};
use super::{DefaultValue, MethodSpec, SpaceSpec, ValueType};
use crate::chunk_kernel;
use crate::dtype::DType;
use crate::error::{ErrorKind, MechaError, Result};
use crate::kernels::{Operand, Real};
use crate::recipe::Scalar;

pub const SINGLETON_CONFIG: &str = "singleton-mecha";

/// `a` where it has the key, otherwise `default`: two clauses, tried in order.
struct Fallback;
impl Method for Fallback {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        let key = vec![call.key.to_string()];
        let clause = |inputs| Clause { inputs, meta: Meta::default() };
        Some(KeyRelation {
            outputs: key.clone(),
            clauses: vec![clause(vec![Some(key.clone()), None]), clause(vec![None, Some(key)])],
        })
    }
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let param = if call.args[0].is_empty() { 1 } else { 0 };
        Ok(Decision::Forward { param, index: 0 })
    }
}

/// Rounds values to a dtype, as torch's `.to(dtype)` (integers truncate toward zero).
pub struct Round {
    pub dtype: DType,
}
chunk_kernel!(Round => round);

#[inline(always)]
fn round<T: Real>(k: &Round, x: &[Operand<T>], out: &mut [T]) {
    match x[0] {
        Operand::Scalar(v) => out.fill(v),
        Operand::Slice(s) => out.copy_from_slice(s),
    }
    round_to(k.dtype, out);
}

/// Rounds `values` in place to what `dtype` can hold.
pub fn round_to<T: Real>(dtype: DType, values: &mut [T]) {
    let width = dtype.bits() / 8;
    let mut bytes = vec![0u8; values.len() * width];
    if dtype.is_integer() {
        for v in values.iter_mut() {
            *v = T::from_f64(v.to_f64().trunc()); // torch's `.to(int)` truncates
        }
    }
    T::encode(dtype, values, &mut bytes);
    T::decode(dtype, &bytes, values);
}

struct Cast;
impl Method for Cast {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let forward = Decision::Forward { param: 0, index: 0 };
        let a = call.arg(0).ok_or_else(|| call.fail("input \"a\" is missing"))?;
        if !a.is_numeric() {
            return Err(call.fail("input \"a\" must be tensors, not text"));
        }
        // `device` is accepted for compatibility with sd-mecha recipes; the engine picks devices.
        let dtype = match call.arg(2).and_then(|d| d.constant.clone()) {
            None | Some(Scalar::Null) => return Ok(forward),
            Some(Scalar::Str(name)) => DType::parse_user(&name).filter(|d| d.is_numeric()).ok_or_else(|| {
                call.fail(format!(
                    "unknown dtype \"{name}\"; use a torch name such as float16, bfloat16, float32, float64, \
                     float8_e4m3fn, float8_e5m2, int64, bool"
                ))
            })?,
            Some(_) => return Err(call.fail("\"dtype\" must be a dtype name such as \"float16\"")),
        };
        if (a.exact && a.dtype == Some(dtype)) || a.shape.is_none() {
            return Ok(forward); // already in that dtype, or a broadcast number that is never stored
        }
        Ok(Decision::Compute(ComputeSpec {
            shape: a.shape.clone(),
            dtype: Some(dtype),
            kernel: Some(Arc::new(Round { dtype })),
            extra_bytes: 0,
        }))
    }
}

/// `a` for the keys of one component of its config (`omit: false`), or for all other keys.
struct Component {
    omit: bool,
}
impl Method for Component {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let Some(name) = call.arg(1).and_then(|a| a.text()) else {
            return Err(call.fail("\"component\" must be a component name such as \"diffuser\""));
        };
        let Some(config) = call.input_configs[0].and_then(|c| c.as_named()) else {
            return Err(MechaError::new(
                ErrorKind::Config,
                "components are defined by a model config, but this input's architecture is unknown (structural); \
                 give the model its config",
            ));
        };
        let Some(component) = config.components().get(name) else {
            let valid: Vec<&str> = config.components().keys().map(String::as_str).collect();
            return Err(MechaError::recipe(format!(
                "component \"{name}\" does not exist in config \"{}\"; valid components: {}",
                config.id,
                valid.join(", ")
            )));
        };
        if component.keys.contains_key(call.key) == self.omit {
            let verb = if self.omit { "omitted" } else { "not picked" };
            return Ok(Decision::Skip(format!(
                "in component \"{}\", {verb}",
                config.component_of(call.key).unwrap_or("?")
            )));
        }
        Ok(Decision::Forward { param: 0, index: 0 })
    }
}

/// Every key of the result is the literal's single key `key`.
struct ConvertSingleton;
impl Method for ConvertSingleton {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        Some(KeyRelation::single(call.key, vec![Some(vec!["key".to_string()])]))
    }
    fn plan(&self, _: &PlanCall) -> Result<Decision> {
        Ok(Decision::Forward { param: 0, index: 0 })
    }
}

/// The dtype the values have when the method sees them (known from the plan).
struct GetDtype;
impl Method for GetDtype {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        match call.arg(0).and_then(|a| a.shape.as_ref().and(a.dtype)) {
            Some(dtype) => {
                Ok(Decision::Constant(Scalar::Str(dtype.torch_name().unwrap_or(dtype.safetensors_name()).into())))
            }
            None => Err(call.fail("input \"a\" must be a tensor")),
        }
    }
}

/// Where the values are computed: the CPU.
struct GetDevice;
impl Method for GetDevice {
    fn plan(&self, _: &PlanCall) -> Result<Decision> {
        Ok(Decision::Constant(Scalar::Str("cpu".into())))
    }
}

/// torch's `stack`: the values along a new first dimension.
struct Stack;
impl Method for Stack {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let Some(shape) = call.common_shape([0])? else {
            return Err(call.fail("needs at least one tensor"));
        };
        Ok(ComputeSpec::whole(Some([vec![call.args[0].len()], shape].concat())))
    }
    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        Ok(vec![Arg::Tensor(candle_core::Tensor::stack(&call.tensors(0)?, 0)?)])
    }
}

/// `a` unchanged, unless it holds NaN or infinity: then the key is left out of the output.
pub struct OmitNonFinite;
impl super::seam::ChunkKernel for OmitNonFinite {
    fn apply_f32(&self, c: &super::seam::Chunk, x: &[Operand<f32>], out: &mut [f32]) -> Result<()> {
        pass_finite(c, x, out)
    }
    fn apply_f64(&self, c: &super::seam::Chunk, x: &[Operand<f64>], out: &mut [f64]) -> Result<()> {
        pass_finite(c, x, out)
    }
}

fn pass_finite<T: Real>(c: &super::seam::Chunk, x: &[Operand<T>], out: &mut [T]) -> Result<()> {
    match x[0] {
        Operand::Scalar(v) => out.fill(v),
        Operand::Slice(s) => out.copy_from_slice(s),
    }
    // x·0 is NaN exactly for NaN and ±inf; summing keeps the loop branch-free.
    let bad = out.iter().fold(T::ZERO, |acc, &v| acc + v * T::ZERO);
    if bad.is_nan() {
        return Err(MechaError::skip_key(format!("non-finite values (NaN or infinity) in \"{}\"", c.key)));
    }
    Ok(())
}

struct OmitNonFiniteMethod;
impl Method for OmitNonFiniteMethod {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let shape = call.arg(0).and_then(|a| a.shape.clone());
        Ok(ComputeSpec::streamed(shape, Arc::new(OmitNonFinite)))
    }
}

pub fn methods() -> Vec<MethodSpec> {
    use ValueType::{Any, Str, Tensor};
    let param = || SpaceSpec::fixed(&["param"]);
    vec![
        MethodSpec::new(
            "fallback",
            "a where it has the key, otherwise default (the `or` operator).",
            vec![same_space("a", Any).state_dict(), same_space("default", Any).state_dict()],
            returns(Any, SpaceSpec::Symbol),
            Fallback,
        ),
        MethodSpec::new(
            "cast",
            "Rounds values to a dtype (torch names such as \"float16\", \"bfloat16\"). device is accepted for \
             compatibility; computation stays on the CPU.",
            vec![
                same_space("a", Tensor),
                hyper("device", Str, DefaultValue::Null),
                hyper("dtype", Str, DefaultValue::Null),
            ],
            returns(Tensor, SpaceSpec::Symbol),
            Cast,
        )
        .elementwise(),
        component_method(
            "pick_component",
            "Keeps only the keys of one component of a's model config (e.g. \"diffuser\", \"clip_l\").",
            false,
        ),
        component_method("omit_component", "Drops the keys of one component of a's model config.", true),
        MethodSpec::new(
            "convert_singleton",
            "Broadcasts the single value of a singleton-mecha literal to every key.",
            vec![same_space("singleton", Any).state_dict().config(SINGLETON_CONFIG)],
            returns(Any, SpaceSpec::Symbol),
            ConvertSingleton,
        )
        .conversion(),
        MethodSpec::new(
            "get_dtype",
            "The dtype name of a's values as computed (e.g. \"float32\"), for cast's dtype.",
            vec![input("a", Tensor, param())],
            returns(Str, param()),
            GetDtype,
        ),
        MethodSpec::new(
            "get_device",
            "The device a's values are computed on (\"cpu\"), for cast's device.",
            vec![input("a", Tensor, param())],
            returns(Str, param()),
            GetDevice,
        ),
        MethodSpec::new(
            "stack",
            "The values stacked along a new first dimension (torch.stack).",
            vec![same_space("values", Tensor).varargs()],
            returns(Tensor, SpaceSpec::Symbol),
            Stack,
        ),
        MethodSpec::new(
            "omit_non_finite",
            "a, except keys holding NaN or infinity, which are left out of the output.",
            vec![same_space("a", Tensor)],
            returns(Tensor, SpaceSpec::Symbol),
            OmitNonFiniteMethod,
        )
        .elementwise(),
    ]
}

/// `pick_component` / `omit_component`: `a` filtered by one component of its config.
fn component_method(id: &str, description: &str, omit: bool) -> MethodSpec {
    use ValueType::{Any, Str};
    MethodSpec::new(
        id,
        description,
        vec![same_space("a", Any).state_dict(), input("component", Str, SpaceSpec::fixed(&["param"]))],
        returns(Any, SpaceSpec::Symbol),
        Component { omit },
    )
}
