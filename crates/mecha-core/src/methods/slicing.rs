//! Region copies (sd-mecha `slicing.py`): `tensor_sum` copies a band of rows of b into a;
//! `top_k_tensor_sum` moves a band of a's values by magnitude to b's ranking.

use super::decl::*;
use super::seam::{Arg, ComputeSpec, Decision, Method, Output, PlanCall, RunCall};
use super::{DefaultValue, MethodSpec, SpaceSpec, ValueType};
use crate::error::Result;

struct TensorSum {
    top_k: bool,
}

impl Method for TensorSum {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let shape = call.common_shape([0, 1])?;
        // Ranking needs a sorted copy of a, sort keys and 32-bit ranks, and bucket histograms.
        let width = if call.merge_dtype == crate::dtype::DType::F64 { 8 } else { 4 };
        let extra = if self.top_k {
            shape.as_ref().map_or(0, |s| s.iter().product::<usize>() as u64 * (2 * width + 4) + (16 << 20))
        } else {
            0
        };
        Ok(Decision::Compute(ComputeSpec { shape, dtype: None, kernel: None, extra_bytes: extra }))
    }
    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let (a, b) = (call.tensor(0, 0)?, call.tensor(1, 0)?);
        let (width, offset) = (call.number(2)?, call.number(3)?);
        let result = if self.top_k {
            super::wholemath::slicing::top_k_tensor_sum(&a, &b, width, offset)?
        } else {
            super::wholemath::slicing::tensor_sum(&a, &b, width, offset)?
        };
        Ok(vec![Arg::Tensor(result)])
    }
}

pub fn methods() -> Vec<MethodSpec> {
    use ValueType::{Float, Tensor};
    let method = |id: &str, description: &str, width, top_k| {
        MethodSpec::new(
            id,
            description,
            vec![
                same_space("a", Tensor),
                same_space("b", Tensor),
                hyper("width", Float, DefaultValue::Float(width)),
                hyper("offset", Float, DefaultValue::Float(0.0)),
            ],
            returns(Tensor, SpaceSpec::Symbol),
            TensorSum { top_k },
        )
    };
    vec![
        method(
            "tensor_sum",
            "a with the rows in [offset, offset + width) of dimension 0 (wrapping around) taken from b.",
            0.5,
            false,
        ),
        method(
            "top_k_tensor_sum",
            "a's values in the magnitude band [offset, offset + width) rearranged into b's rank order.",
            1.0,
            true,
        ),
    ]
}
