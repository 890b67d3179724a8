//! Methods computed outside the engine (JavaScript functions from `defineMergeMethod`): one more
//! implementation of the seam. Elementwise ones are called per chunk; the others once per key
//! with every input at its own shape.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use super::seam::{
    Arg, Chunk, ChunkKernel, ComputeSpec, Decision, KeyMapCall, KeyRelation, Method, NodeRef, Output, PlanCall, RunCall,
};
use super::ValueType;
use crate::error::{ErrorKind, MechaError, Result};
use crate::kernels::{Operand, Real};
use crate::recipe::Scalar;

/// One call of an external method: exactly one argument per declared parameter.
pub struct ExternalCall<'a> {
    /// What the host passed to the merge (`MergeOptions::host_context`).
    pub context: u64,
    pub key: &'a str,
    /// The node being computed, as numbered in the recipe's source form (JSON node index or
    /// `.mecha` instruction), so the host can keep a per-node cache.
    pub node: Option<usize>,
    /// Shape of the whole output tensor (empty for a value result).
    pub shape: &'a [usize],
    /// First element of this chunk and its length (the whole tensor when not elementwise).
    pub offset: usize,
    pub len: usize,
    pub args: Vec<ExternalArg<'a>>,
}

pub enum ExternalArg<'a> {
    /// Values with their own shape (a chunk of them for elementwise methods).
    Tensor {
        data: Cow<'a, [f32]>,
        shape: Vec<usize>,
    },
    /// A varargs parameter, or several keys of a routed input.
    Many(Vec<ExternalArg<'a>>),
    Value(Scalar),
}

pub enum ExternalResult {
    Tensor(Vec<f32>),
    /// A number fills a tensor result; for value methods it is the result (as is text).
    Value(Scalar),
}

pub trait ExternalKernel: Send + Sync {
    fn call(&self, call: ExternalCall<'_>) -> Result<ExternalResult>;
}

pub struct ExternalMethod {
    pub kernel: Arc<dyn ExternalKernel>,
    /// Called per chunk rather than per whole tensor.
    pub elementwise: bool,
    /// Output key → the keys of the first input it is computed from (conversions); identity
    /// when absent.
    pub routes: Option<HashMap<String, Vec<String>>>,
}

impl Method for ExternalMethod {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        let Some(routes) = &self.routes else {
            return Some(KeyRelation::identity(call.key, call.method.params.len()));
        };
        let first = routes.get(call.key)?.clone();
        let mut inputs = vec![Some(vec![call.key.to_string()]); call.method.params.len()];
        if let Some(slot) = inputs.first_mut() {
            *slot = Some(first);
        }
        Some(KeyRelation::single(call.key, inputs))
    }

    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let value_result = !matches!(call.method.returns.value_type, ValueType::Tensor | ValueType::Any);
        let first = call.first_tensor().and_then(|a| a.shape.clone());
        // Conversions give their keys the shape the target config says (a LoRA's factors
        // become a full weight); other methods have their first tensor input's shape.
        let configured = call.config.as_named().and_then(|c| c.get(call.key)).and_then(|m| m.shape.clone());
        let shape = if value_result || first.is_none() {
            None
        } else if call.method.is_conversion {
            configured.or(first)
        } else {
            first
        };
        if !self.elementwise || shape.is_none() {
            return Ok(ComputeSpec::whole(shape));
        }
        let s = shape.clone().expect("checked above");
        if let Some(bad) = call.tensors().find(|a| a.shape.as_ref() != Some(&s) && a.numel() != 1) {
            return Err(MechaError::new(
                ErrorKind::Shape,
                format!(
                    "{}: shapes differ for key \"{}\": {s:?}, but {} has {:?}",
                    call.method.id, call.key, bad.origin, bad.shape
                ),
            ));
        }
        // Which kernel operands (numeric arguments, flattened) each parameter receives.
        let mut next = 0;
        let layout = call
            .method
            .params
            .iter()
            .zip(&call.args)
            .map(|(param, args)| {
                let slots: Vec<Slot> = args
                    .iter()
                    .map(|a| match a.is_numeric() {
                        true => {
                            next += 1;
                            Slot::Operand(next - 1)
                        }
                        false => Slot::Value(a.constant.clone().unwrap_or(Scalar::Null)),
                    })
                    .collect();
                (param.kind == super::ParamKind::VarPositional || args.len() != 1, slots)
            })
            .collect();
        let kernel = ExternalChunks { method: self.kernel.clone(), layout, node_shape: s };
        Ok(ComputeSpec::streamed(shape, Arc::new(kernel)))
    }

    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let many = |i: usize| call.method.params[i].kind == super::ParamKind::VarPositional || call.args[i].len() != 1;
        let to_external = |a: &Arg| match a {
            Arg::Tensor(t) => Ok::<_, MechaError>(ExternalArg::Tensor {
                data: Cow::Owned(t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?),
                shape: t.dims().to_vec(),
            }),
            Arg::Value(v) => Ok(ExternalArg::Value(v.clone())),
        };
        let mut args = vec![];
        for (i, values) in call.args.iter().enumerate() {
            let converted = values.iter().map(to_external).collect::<Result<Vec<_>>>()?;
            args.push(match (many(i), converted.len()) {
                (false, 1) => converted.into_iter().next().expect("one argument"),
                _ => ExternalArg::Many(converted),
            });
        }
        let shape = call.shape.clone().unwrap_or_default();
        let len = call.shape.as_ref().map_or(1, |s| s.iter().product());
        let result = self.kernel.call(ExternalCall {
            context: call.host_context,
            key: call.key(),
            node: call.node.source,
            shape: &shape,
            offset: 0,
            len,
            args,
        })?;
        let out = match (result, &call.shape) {
            (ExternalResult::Value(v), None) => Arg::Value(v),
            (ExternalResult::Value(v), Some(s)) => {
                let n = v.as_f64().ok_or_else(|| call.fail("returned text where a tensor was expected"))?;
                Arg::Tensor(Tensor::from_vec(vec![n as f32; len], s.as_slice(), call.device)?)
            }
            (ExternalResult::Tensor(values), Some(s)) => {
                check_len(&call.method.id, call.key(), values.len(), len, s)?;
                Arg::Tensor(Tensor::from_vec(values, s.as_slice(), call.device)?)
            }
            (ExternalResult::Tensor(_), None) => {
                return Err(call.fail(format!(
                    "returned a tensor, but it is declared to return {}",
                    call.method.returns.value_type.name()
                )))
            }
        };
        Ok(vec![out])
    }
}

fn check_len(id: &str, key: &str, got: usize, expected: usize, shape: &[usize]) -> Result<()> {
    if got != expected {
        return Err(MechaError::recipe(format!(
            "{id} returned {got} values for key \"{key}\", but {expected} were expected (shape {shape:?})"
        )));
    }
    Ok(())
}

enum Slot {
    Operand(usize),
    Value(Scalar),
}

/// An elementwise external method, called once per chunk.
struct ExternalChunks {
    method: Arc<dyn ExternalKernel>,
    /// Per parameter: whether it is passed as a list, and where its values come from.
    layout: Vec<(bool, Vec<Slot>)>,
    node_shape: Vec<usize>,
}

impl ExternalChunks {
    fn apply<T: Real>(&self, chunk: &Chunk, x: &[Operand<T>], out: &mut [T]) -> Result<()> {
        let len = out.len();
        let arg = |slot: &Slot| match slot {
            Slot::Value(v) => ExternalArg::Value(v.clone()),
            Slot::Operand(i) => match x[*i] {
                Operand::Scalar(v) => ExternalArg::Value(Scalar::Float(v.to_f64())),
                Operand::Slice(s) => ExternalArg::Tensor { data: T::to_f32(s), shape: self.node_shape.clone() },
            },
        };
        let args = self
            .layout
            .iter()
            .map(|(many, slots)| match (many, slots.as_slice()) {
                (false, [one]) => arg(one),
                _ => ExternalArg::Many(slots.iter().map(arg).collect()),
            })
            .collect();
        let NodeRef { source, .. } = chunk.node;
        let result = self.method.call(ExternalCall {
            context: chunk.host_context,
            key: chunk.key,
            node: source,
            shape: chunk.shape,
            offset: chunk.offset,
            len,
            args,
        })?;
        match result {
            ExternalResult::Tensor(values) => {
                check_len("a JavaScript method", chunk.key, values.len(), len, chunk.shape)?;
                for (o, v) in out.iter_mut().zip(values) {
                    *o = T::from_f64(v as f64);
                }
            }
            ExternalResult::Value(v) => {
                let n = v.as_f64().ok_or_else(|| MechaError::recipe("returned text where a tensor was expected"))?;
                out.fill(T::from_f64(n));
            }
        }
        Ok(())
    }
}

impl ChunkKernel for ExternalChunks {
    fn apply_f32(&self, chunk: &Chunk, x: &[Operand<f32>], out: &mut [f32]) -> Result<()> {
        self.apply(chunk, x, out)
    }
    fn apply_f64(&self, chunk: &Chunk, x: &[Operand<f64>], out: &mut [f64]) -> Result<()> {
        self.apply(chunk, x, out)
    }
}
