//! TIES and friends (sd-mecha `ties.py`): `ties_sum`, `ties_sum_extended` (model stock or
//! geometric median of the elected deltas), `ties_sum_with_dropout` (DARE/DELLA, random),
//! `model_stock`, `geometric_median` and `dropout` (n-supermario, random). All need whole
//! tensors (magnitude ranks, norms); the math is in `wholemath::ties`.

use super::decl::*;
use super::seam::{Arg, ComputeSpec, Decision, Method, Output, PlanCall, RunCall};
use super::wholemath::ties::{self as math, Combine, Dare, MedianOptions};
use super::{DefaultValue, MethodSpec, SpaceSpec, ValueType};
use crate::error::Result;
use crate::recipe::Scalar;

#[derive(Copy, Clone, PartialEq, Eq)]
enum Kind {
    TiesSum,
    Extended,
    WithDropout,
    ModelStock,
    GeometricMedian,
    Dropout,
}

struct Ties(Kind);

impl Ties {
    /// Checks the hyper-parameters `get` knows (constants at plan time, all of them at run
    /// time) where sd-mecha would raise or compute NaN, so the error names the parameter.
    fn check(&self, get: impl Fn(usize) -> Option<f64>) -> std::result::Result<(), String> {
        let k = match self.0 {
            Kind::TiesSum | Kind::Extended => get(1),
            Kind::WithDropout => get(4),
            _ => None,
        };
        if let Some(k) = k {
            // sd-mecha: k < 0 asks kthvalue for more elements than exist; non-finite k overflows int()
            if !k.is_finite() || k < 0.0 {
                return Err(format!(
                    "k must be a finite number ≥ 0 (the fraction of values kept; above 1 keeps all), got {k}"
                ));
            }
        }
        match (self.0, get(1)) {
            (Kind::WithDropout, Some(p)) if p.is_nan() => Err("probability must be a number, got NaN".into()),
            // numpy's binomial/choice accept only probabilities in [0, 1]
            (Kind::Dropout, Some(p)) if !(0.0..=1.0).contains(&p) => {
                Err(format!("probability must be between 0 and 1, got {p}"))
            }
            _ => match (self.0, get(3)) {
                (Kind::Dropout, Some(o)) if !o.is_finite() => Err(format!("overlap must be finite, got {o}")),
                _ => Ok(()),
            },
        }
    }

    /// Working memory beyond the inputs and the result.
    fn extra_bytes(&self, call: &PlanCall, numel: u64) -> u64 {
        let n = call.args[0].len() as u64;
        let width = if call.merge_dtype == crate::dtype::DType::F64 { 8 } else { 4 };
        let median = |p: usize| call.number(p).is_some_and(|v| v != 0.0);
        let keys = numel * 8; // magnitude keys for the top-k selection
        match self.0 {
            Kind::TiesSum => keys,
            Kind::Extended => keys + if median(4) { (n + 1) * numel * width } else { 0 },
            Kind::WithDropout => {
                let della = if call.number(2) != Some(0.0) { numel * 16 } else { 0 };
                keys + n * numel * width + della + if median(8) { (n + 1) * numel * width } else { 0 }
            }
            Kind::ModelStock => 0,
            Kind::GeometricMedian => 2 * numel * width,
            // per-thread sums and counts of one block
            Kind::Dropout => 16 << 20,
        }
    }
}

/// `ties_sum_extended`'s choice: `apply_median`, else sd-mecha's inverted `apply_stock`
/// (false applies model stock's factor, true leaves it out).
fn combine(apply_stock: bool, apply_median: bool, cos_eps: f64, median: MedianOptions) -> Combine {
    if apply_median {
        Combine::Median(median)
    } else if apply_stock {
        Combine::Mean
    } else {
        Combine::Stock { cos_eps }
    }
}

impl Method for Ties {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let shape = call.common_shape([0])?.unwrap_or_default();
        if call.args[0].is_empty() {
            // sd-mecha returns the int 0 where it can; model_stock and the median divide by 0
            return match self.0 {
                Kind::ModelStock | Kind::GeometricMedian => Err(call.fail("needs at least one model")),
                _ => Ok(Decision::Constant(Scalar::Int(0))),
            };
        }
        self.check(|p| call.number(p)).map_err(|e| call.fail(e))?;
        if self.0 == Kind::WithDropout && call.number(1).is_some_and(|p| math::is_close(p, 1.0)) {
            return Ok(Decision::Constant(Scalar::Int(0)));
        }
        let numel: usize = shape.iter().product();
        if numel == 0 {
            return Ok(Decision::Forward { param: 0, index: 0 });
        }
        let extra_bytes = self.extra_bytes(call, numel as u64);
        Ok(Decision::Compute(ComputeSpec { shape: Some(shape), dtype: None, kernel: None, extra_bytes }))
    }

    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let xs = call.tensors(0)?;
        let params: Vec<Option<f64>> =
            (0..call.method.params.len()).map(|p| if p == 0 { None } else { call.number(p).ok() }).collect();
        self.check(|p| params.get(p).copied().flatten()).map_err(|e| call.fail(e))?;
        let num = |p: usize| call.number(p);
        let flag = |p: usize| Ok::<bool, crate::error::MechaError>(call.number(p)? != 0.0);
        let median = |eps, maxiter, ftol| -> Result<MedianOptions> {
            Ok(MedianOptions { eps: num(eps)?, maxiter: call.int(maxiter)?, ftol: num(ftol)? })
        };
        let result = match self.0 {
            Kind::TiesSum => math::ties(&xs, num(1)?, flag(2)?, Combine::Mean)?,
            Kind::Extended => {
                let how = combine(flag(3)?, flag(4)?, num(5)?, median(6, 7, 8)?);
                math::ties(&xs, num(1)?, flag(2)?, how)?
            }
            Kind::WithDropout => {
                let probability = num(1)?;
                if math::is_close(probability, 1.0) {
                    // decided at plan time when the probability is a constant
                    candle_core::Tensor::zeros(xs[0].dims(), xs[0].dtype(), xs[0].device())?
                } else {
                    let dare = Dare { probability, della_eps: num(2)?, rescale: flag(3)? };
                    let how = combine(flag(6)?, flag(8)?, num(7)?, median(9, 10, 11)?);
                    math::ties_with_dropout(&xs, dare, num(4)?, flag(5)?, how, &mut call.seed_rng(12)?)?
                }
            }
            Kind::ModelStock => math::model_stock(&xs, num(1)?)?,
            Kind::GeometricMedian => math::geometric_median(&xs, median(1, 2, 3)?)?,
            Kind::Dropout => {
                let (probability, overlap) = (num(1)?, num(3)?);
                // sd-mecha: `overlap % 2 == 1` draws independent masks, anything else subsets
                let pmf = if overlap.rem_euclid(2.0) == 1.0 {
                    None
                } else {
                    Some(
                        math::overlapping_sets_pmf(xs.len(), probability, overlap, num(4)?)
                            .map_err(|e| call.fail(e))?,
                    )
                };
                math::dropout(&xs, probability, num(2)?, pmf.as_deref(), &mut call.seed_rng(5)?)?
            }
        };
        Ok(vec![Arg::Tensor(result)])
    }
}

pub fn methods() -> Vec<MethodSpec> {
    use ValueType::{Bool, Float, Int, Tensor};
    let delta = || SpaceSpec::fixed(&["delta"]);
    let models = |name: &str| input(name, Tensor, delta()).varargs();
    let kw = |name: &str, t, d| hyper(name, t, d).keyword_only();
    let float = |name: &str, v| kw(name, Float, DefaultValue::Float(v));
    let flag = |name: &str, v| kw(name, Bool, DefaultValue::Bool(v));
    let median = || vec![float("eps", 1e-6), kw("maxiter", Int, DefaultValue::Int(100)), float("ftol", 1e-20)];
    let seed = || kw("seed", Int, DefaultValue::Null);
    vec![
        MethodSpec::new(
            "ties_sum",
            "TIES: each delta keeps its top-k fraction by magnitude; per element the sign with the most votes \
             wins and the deltas of that sign are averaged (vote_sgn: the sign of the sum wins).",
            vec![models("models"), float("k", 1.0), flag("vote_sgn", false)],
            returns(Tensor, delta()),
            Ties(Kind::TiesSum),
        ),
        MethodSpec::new(
            "ties_sum_extended",
            "TIES with the elected deltas combined by their geometric median (apply_median), or averaged and \
             scaled by model stock's factor — applied when apply_stock is false (sd-mecha's inverted flag).",
            [
                vec![
                    models("models"),
                    float("k", 0.2),
                    flag("vote_sgn", false),
                    flag("apply_stock", false),
                    flag("apply_median", false),
                    float("cos_eps", 1e-6),
                ],
                median(),
            ]
            .concat(),
            returns(Tensor, delta()),
            Ties(Kind::Extended),
        ),
        MethodSpec::new(
            "ties_sum_with_dropout",
            "DARE/DELLA then TIES: each delta element is dropped with the given probability (DELLA: less for \
             larger magnitudes, by della_eps), then ties_sum_extended, rescaled by 1/(1 − probability). Random.",
            [
                vec![
                    models("deltas"),
                    kw("probability", Tensor, DefaultValue::Float(0.9)),
                    float("della_eps", 0.0),
                    flag("rescale", true),
                    float("k", 0.2),
                    flag("vote_sgn", false),
                    flag("apply_stock", false),
                    float("cos_eps", 1e-6),
                    flag("apply_median", false),
                ],
                median(),
                vec![seed()],
            ]
            .concat(),
            returns(Tensor, delta()),
            Ties(Kind::WithDropout),
        ),
        MethodSpec::new(
            "model_stock",
            "Model stock: the mean delta scaled per row by n·cos/(1 + (n − 1)·cos), cos the mean cosine of \
             consecutive deltas along the last dimension.",
            vec![models("deltas"), float("cos_eps", 1e-6)],
            returns(Tensor, delta()),
            Ties(Kind::ModelStock),
        ),
        MethodSpec::new(
            "geometric_median",
            "The geometric median of the models (Weiszfeld's iteration from their mean).",
            [vec![same_space("models", Tensor).varargs()], median()].concat(),
            returns(Tensor, SpaceSpec::Symbol),
            Ties(Kind::GeometricMedian),
        ),
        MethodSpec::new(
            "dropout",
            "n-supermario: each element averages the deltas of a random subset of the models (each kept with \
             probability 1 − probability; overlap and overlap_emphasis shape how subsets overlap), divided by \
             (1 − probability)^rescale. Random.",
            vec![
                models("deltas"),
                float("probability", 0.9),
                float("rescale", 1.0),
                float("overlap", 1.0),
                float("overlap_emphasis", 0.0),
                seed(),
            ],
            returns(Tensor, delta()),
            Ties(Kind::Dropout),
        ),
    ]
}
