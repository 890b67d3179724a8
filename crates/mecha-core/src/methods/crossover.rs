//! `crossover` (sd-mecha `crossover.py`): mixes the frequency spectra of a and b — low
//! frequencies from one, high from the other — through an n-dimensional real FFT.

use super::decl::*;
use super::seam::{Arg, ComputeSpec, Decision, Method, Output, PlanCall, RunCall};
use super::{DefaultValue, MethodSpec, SpaceSpec, ValueType};
use crate::error::Result;

struct Crossover;

impl Method for Crossover {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let shape = call.common_shape([0, 1])?;
        // sd-mecha's shortcuts come before its check of alpha's range (done in `run`).
        match call.number(2) {
            Some(0.0) => return Ok(Decision::Forward { param: 0, index: 0 }),
            Some(1.0) => return Ok(Decision::Forward { param: 1, index: 0 }),
            _ => {}
        }
        // One half spectrum of complex numbers (a value's width per element) and FFT scratch
        // per thread.
        let width = if call.merge_dtype == crate::dtype::DType::F64 { 8 } else { 4 };
        let bytes = shape.as_ref().map_or(0, |s| s.iter().product::<usize>() as u64 * width + (16 << 20));
        Ok(Decision::Compute(ComputeSpec { shape, dtype: None, kernel: None, extra_bytes: bytes }))
    }
    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let (a, b) = (call.tensor(0, 0)?, call.tensor(1, 0)?);
        let (alpha, tilt) = (call.number(2)?, call.number(3)?);
        Ok(vec![Arg::Tensor(super::wholemath::crossover::crossover(&a, &b, alpha, tilt)?)])
    }
}

pub fn methods() -> Vec<MethodSpec> {
    use ValueType::{Float, Tensor};
    vec![MethodSpec::new(
        "crossover",
        "Low frequencies of a with high frequencies of b (alpha: the cut-off; tilt: a ramp instead of a hard cut).",
        vec![
            same_space("a", Tensor),
            same_space("b", Tensor),
            hyper("alpha", Float, DefaultValue::Float(0.5)),
            hyper("tilt", Float, DefaultValue::Float(0.0)),
        ],
        returns(Tensor, SpaceSpec::Symbol),
        Crossover,
    )]
}
