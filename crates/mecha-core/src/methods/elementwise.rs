//! The implementation shared by elementwise methods: an optional plan-time shortcut (sd-mecha
//! returns an input as-is when a weight is exactly 0 or 1), a shape check, and a chunk kernel.

use std::sync::Arc;

use super::seam::{ChunkKernel, ComputeSpec, Decision, Method, PlanCall};
use super::{MethodSpec, ParamSpec, ReturnSpec};
use crate::error::Result;

/// Decides a result without arithmetic from constant hyper-parameters, when it can.
pub type Shortcut = fn(&PlanCall) -> Option<Decision>;

pub struct Elementwise {
    pub kernel: Arc<dyn ChunkKernel>,
    pub shortcut: Option<Shortcut>,
}

impl Method for Elementwise {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        if let Some(decision) = self.shortcut.and_then(|s| s(call)) {
            return Ok(decision);
        }
        Ok(ComputeSpec::streamed(elementwise_shape(call)?, self.kernel.clone()))
    }
}

/// The shape of an elementwise result: inputs must agree; hyper-parameters (parameters with a
/// default) may also be single values.
pub fn elementwise_shape(call: &PlanCall) -> Result<Option<Vec<usize>>> {
    let mut shaped = vec![];
    for (p, spec) in call.method.params.iter().enumerate() {
        let single = call.args[p].iter().all(|a| a.numel() == 1);
        if spec.default.is_none() || !single {
            shaped.push(p);
        }
    }
    call.common_shape(shaped)
}

/// Declares an elementwise method.
pub fn method(
    id: &str,
    description: &str,
    params: Vec<ParamSpec>,
    returns: ReturnSpec,
    kernel: impl ChunkKernel + 'static,
    shortcut: Option<Shortcut>,
) -> MethodSpec {
    MethodSpec::new(id, description, params, returns, Elementwise { kernel: Arc::new(kernel), shortcut }).elementwise()
}

/// `Forward` of `param` when hyper-parameter `weight` is exactly `value` (sd-mecha uses
/// `math.isclose` with no absolute tolerance, which is equality for 0).
pub fn forward_when(call: &PlanCall, weight: usize, value: f64, param: usize) -> Option<Decision> {
    (call.number(weight) == Some(value)).then_some(Decision::Forward { param, index: 0 })
}

/// Zeros shaped like the first tensor argument.
pub fn zeros_like_first(call: &PlanCall) -> Option<Decision> {
    let first = call.first_tensor()?;
    Some(Decision::Fill { value: 0.0, shape: first.shape.clone()?, dtype: first.dtype })
}
