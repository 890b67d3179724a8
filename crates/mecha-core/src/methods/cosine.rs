//! Cosine-similarity merges (sd-mecha `cosine.py`): interpolate per row of dimension 0 by how
//! similar a and b are there.

use super::decl::*;
use super::seam::{Arg, ComputeSpec, Decision, Method, Output, PlanCall, RunCall};
use super::{DefaultValue, MethodSpec, SpaceSpec, ValueType};
use crate::error::Result;

/// `add_cosine_a` (`variant_b: false`) or `add_cosine_b`.
struct AddCosine {
    variant_b: bool,
}

impl Method for AddCosine {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        Ok(ComputeSpec::whole(call.common_shape([0, 1])?))
    }
    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let (a, b) = (call.tensor(0, 0)?, call.tensor(1, 0)?);
        let alpha = call.number(2)?;
        let result = if self.variant_b {
            super::wholemath::cosine::add_cosine_b(&a, &b, alpha)?
        } else {
            super::wholemath::cosine::add_cosine_a(&a, &b, alpha)?
        };
        Ok(vec![Arg::Tensor(result)])
    }
}

pub fn methods() -> Vec<MethodSpec> {
    use ValueType::Tensor;
    let weight = || SpaceSpec::fixed(&["weight"]);
    let method = |id: &str, description: &str, variant_b| {
        MethodSpec::new(
            id,
            description,
            vec![
                input("a", Tensor, weight()),
                input("b", Tensor, weight()),
                hyper("alpha", Tensor, DefaultValue::Float(1.0)),
            ],
            returns(Tensor, weight()),
            AddCosine { variant_b },
        )
    };
    vec![
        method(
            "add_cosine_a",
            "Interpolates a toward b per row, less where the rows are more similar (cosine similarity along dim 0).",
            false,
        ),
        method(
            "add_cosine_b",
            "Like add_cosine_a, with the similarity averaged with the tensors' global cosine.",
            true,
        ),
    ]
}
