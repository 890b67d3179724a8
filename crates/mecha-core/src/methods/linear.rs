//! Linear and arithmetic merge methods (sd-mecha `linear.py`). All but `slerp` and
//! `perpendicular_component` are elementwise and streamed in chunks; those two need global
//! norms, so they run on whole tensors.

use super::decl::*;
use super::elementwise::{self, forward_when, zeros_like_first};
use super::seam::{Arg, ComputeSpec, Decision, Method, Output, PlanCall, RunCall};
use super::{DefaultValue, MethodSpec, SpaceSpec, ValueType};
use crate::chunk_kernel;
use crate::error::Result;
use crate::kernels::{lerp, map2, map3, Operand, Real};

#[inline(always)]
fn at<T: Real>(o: &Operand<T>, i: usize) -> T {
    match o {
        Operand::Scalar(v) => *v,
        Operand::Slice(s) => s[i],
    }
}

/// torch's `nan_to_num(x, nan=0)`: NaN → 0, ±inf → the largest finite value of that sign.
#[inline(always)]
pub(crate) fn nan_to_num<T: Real>(x: T) -> T {
    if x.is_nan() {
        T::ZERO
    } else if x > T::MAX {
        T::MAX
    } else if x < -T::MAX {
        -T::MAX
    } else {
        x
    }
}

/// `[a, b, alpha]` → torch's lerp(a, b, alpha).
pub struct WeightedSum;
#[inline(always)]
fn weighted_sum<T: Real>(_: &WeightedSum, x: &[Operand<T>], out: &mut [T]) {
    map3(out, x[0], x[1], x[2], lerp)
}
chunk_kernel!(WeightedSum => weighted_sum);

/// `[m1, …, mn]` → running lerp(res, m_i, 1/i), the arithmetic mean as sd-mecha computes it.
pub struct NAverage;
#[inline(always)]
fn n_average<T: Real>(_: &NAverage, x: &[Operand<T>], out: &mut [T]) {
    map2(out, x[0], Operand::Scalar(T::ZERO), |a, _| a);
    for (i, m) in x.iter().enumerate().skip(1) {
        let w = T::from_f64(1.0 / (i + 1) as f64);
        match m {
            Operand::Slice(m) => {
                for (o, m) in out.iter_mut().zip(m.iter()) {
                    *o = lerp(*o, *m, w);
                }
            }
            Operand::Scalar(m) => {
                for o in out.iter_mut() {
                    *o = lerp(*o, *m, w);
                }
            }
        }
    }
}
chunk_kernel!(NAverage => n_average);

/// `[a, b, alpha]` → a + b·alpha (torch's `addcmul`, fused).
pub struct AddDifference;
#[inline(always)]
fn add_difference<T: Real>(_: &AddDifference, x: &[Operand<T>], out: &mut [T]) {
    map3(out, x[0], x[1], x[2], |a, b, w| a + b * w)
}
chunk_kernel!(AddDifference => add_difference);

/// `[a, alpha]` → a·alpha.
pub struct Scale;
#[inline(always)]
fn scale<T: Real>(_: &Scale, x: &[Operand<T>], out: &mut [T]) {
    map2(out, x[0], x[1], |a, w| a * w)
}
chunk_kernel!(Scale => scale);

/// `[a, b]` → a − b.
pub struct Subtract;
#[inline(always)]
fn subtract<T: Real>(_: &Subtract, x: &[Operand<T>], out: &mut [T]) {
    map2(out, x[0], x[1], |a, b| a - b)
}
chunk_kernel!(Subtract => subtract);

/// `[a, b, c, alpha]` → alpha·1.8·nan_to_num(|b−a| / (|b−a| + |b−c|)).
pub struct TrainDifferenceMask;
#[inline(always)]
fn train_difference_mask<T: Real>(_: &TrainDifferenceMask, x: &[Operand<T>], out: &mut [T]) {
    let k = T::from_f64(1.8);
    for (i, o) in out.iter_mut().enumerate() {
        let (a, b, c, alpha) = (at(&x[0], i), at(&x[1], i), at(&x[2], i), at(&x[3], i));
        let ba = (b - a).abs();
        *o = alpha * k * nan_to_num(ba / (ba + (b - c).abs()));
    }
}
chunk_kernel!(TrainDifferenceMask => train_difference_mask);

/// `[a, b, c, alpha]` → alpha·2·nan_to_num(|a−b| / (|a−b| + |a+b−2c|)).
pub struct AddOppositeMask;
#[inline(always)]
fn add_opposite_mask<T: Real>(_: &AddOppositeMask, x: &[Operand<T>], out: &mut [T]) {
    let two = T::from_f64(2.0);
    for (i, o) in out.iter_mut().enumerate() {
        let (a, b, c, alpha) = (at(&x[0], i), at(&x[1], i), at(&x[2], i), at(&x[3], i));
        let ab = (a - b).abs();
        *o = alpha * two * nan_to_num(ab / (ab + (a + b - two * c).abs()));
    }
}
chunk_kernel!(AddOppositeMask => add_opposite_mask);

/// torch's `maximum`: NaN wins.
#[inline(always)]
fn maximum<T: Real>(a: T, b: T) -> T {
    if a.is_nan() || b.is_nan() {
        a + b
    } else if a > b {
        a
    } else {
        b
    }
}

/// `[a, b, c, alpha]` → alpha·max(nan_to_num((c−a)(b−c) / max(|a−c|, |b−c|)²), 0)·2.
pub struct AddStrictOppositeMask;
#[inline(always)]
fn add_strict_opposite_mask<T: Real>(_: &AddStrictOppositeMask, x: &[Operand<T>], out: &mut [T]) {
    let two = T::from_f64(2.0);
    for (i, o) in out.iter_mut().enumerate() {
        let (a, b, c, alpha) = (at(&x[0], i), at(&x[1], i), at(&x[2], i), at(&x[3], i));
        let t = maximum((a - c).abs(), (b - c).abs());
        let v = nan_to_num((c - a) * (b - c) / (t * t));
        *o = alpha * maximum(v, T::ZERO) * two;
    }
}
chunk_kernel!(AddStrictOppositeMask => add_strict_opposite_mask);

/// `base^p` of a real base as a complex number (torch promotes to complex, so a negative base
/// has argument π): returns (|base|^p, the angle p·π or 0).
#[inline(always)]
fn real_pow_polar<T: Real>(base: T, p: T) -> (T, T) {
    let angle = if base < T::ZERO { p * T::from_f64(std::f64::consts::PI) } else { T::ZERO };
    (base.abs().powf(p), angle)
}

/// `[a, b, alpha]` → Re(a^(1−alpha) · b^alpha), computed over the complex numbers.
pub struct GeometricSum;
#[inline(always)]
fn geometric_sum<T: Real>(_: &GeometricSum, x: &[Operand<T>], out: &mut [T]) {
    for (i, o) in out.iter_mut().enumerate() {
        let (a, b, alpha) = (at(&x[0], i), at(&x[1], i), at(&x[2], i));
        let (ra, ta) = real_pow_polar(a, T::ONE - alpha);
        let (rb, tb) = real_pow_polar(b, alpha);
        *o = ra * rb * (ta + tb).cos();
    }
}
chunk_kernel!(GeometricSum => geometric_sum);

/// `[a, b, c, alpha]` → Re(a·(b/c)^alpha'), where alpha' = alpha·max(−nan_to_num(ac·bc / t²), 0),
/// ac = ln|a| − ln|c|, bc = ln|b| − ln|c|, t = max(|ac|, |bc|); where that is NaN, a.
pub struct MultiplyQuotient;
#[inline(always)]
fn multiply_quotient<T: Real>(_: &MultiplyQuotient, x: &[Operand<T>], out: &mut [T]) {
    for (i, o) in out.iter_mut().enumerate() {
        let (a, b, c, alpha) = (at(&x[0], i), at(&x[1], i), at(&x[2], i), at(&x[3], i));
        let ac = a.abs().ln() - c.abs().ln();
        let bc = b.abs().ln() - c.abs().ln();
        let t = maximum(ac.abs(), bc.abs());
        let w = alpha * maximum(-nan_to_num(ac * bc / (t * t)), T::ZERO);
        // b/c is a complex division: a zero divisor gives no number, and the result falls back to a.
        let quotient = b / c;
        let res = if c == T::ZERO || quotient.is_nan() {
            T::NAN
        } else {
            let (r, angle) = real_pow_polar(quotient, w);
            a * r * angle.cos()
        };
        *o = if res.is_nan() { a } else { res };
    }
}
chunk_kernel!(MultiplyQuotient => multiply_quotient);

/// `slerp`: spherical interpolation of the flattened tensors, scaled by the lerp of their norms;
/// falls back to lerp when the result has NaN (parallel or zero inputs).
struct Slerp;
impl Method for Slerp {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        Ok(ComputeSpec::whole(call.common_shape([0, 1])?))
    }
    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let (a, b) = (call.tensor(0, 0)?, call.tensor(1, 0)?);
        let alpha = call.number(2)?;
        Ok(vec![Arg::Tensor(super::wholemath::slerp(&a, &b, alpha)?)])
    }
}

/// `perpendicular_component`: b minus its projection on a; zeros when that has NaN.
struct PerpendicularComponent;
impl Method for PerpendicularComponent {
    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        Ok(ComputeSpec::whole(call.common_shape([0, 1])?))
    }
    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let (a, b) = (call.tensor(0, 0)?, call.tensor(1, 0)?);
        Ok(vec![Arg::Tensor(super::wholemath::perpendicular_component(&a, &b)?)])
    }
}

/// A mask method of (a, b, c): its result is a weight for another method, in `param` space.
fn abc_mask(id: &str, description: &str, kernel: impl super::ChunkKernel + 'static) -> MethodSpec {
    use ValueType::Tensor;
    elementwise::method(
        id,
        description,
        vec![
            same_space("a", Tensor),
            same_space("b", Tensor),
            same_space("c", Tensor),
            hyper("alpha", Tensor, DefaultValue::Float(1.0)),
        ],
        returns(Tensor, SpaceSpec::fixed(&["param"])),
        kernel,
        None,
    )
}

pub fn methods() -> Vec<MethodSpec> {
    use ValueType::Tensor;
    vec![
        elementwise::method(
            "weighted_sum",
            "Linear interpolation a + alpha·(b − a). alpha may be a number, per-block values or a tensor.",
            vec![
                same_space("a", Tensor).state_dict(),
                same_space("b", Tensor).state_dict(),
                hyper("alpha", Tensor, DefaultValue::Float(0.5)),
            ],
            returns(Tensor, SpaceSpec::Symbol),
            WeightedSum,
            Some(|c| forward_when(c, 2, 0.0, 0).or_else(|| forward_when(c, 2, 1.0, 1))),
        ),
        elementwise::method(
            "n_average",
            "Arithmetic mean of any number of models.",
            vec![same_space("models", Tensor).state_dict().varargs()],
            returns(Tensor, SpaceSpec::Symbol),
            NAverage,
            Some(|c| (c.args[0].len() == 1).then_some(Decision::Forward { param: 0, index: 0 })),
        ),
        elementwise::method(
            "add_difference",
            "a + alpha·b, where b is a delta (for example `subtract(b, c)`).",
            vec![
                same_space("a", Tensor).state_dict(),
                input("b", Tensor, SpaceSpec::fixed(&["delta"])).state_dict(),
                hyper("alpha", Tensor, DefaultValue::Float(1.0)),
            ],
            returns(Tensor, SpaceSpec::Symbol),
            AddDifference,
            Some(|c| forward_when(c, 2, 0.0, 0)),
        ),
        elementwise::method(
            "scale",
            "a·alpha, where a is a delta.",
            vec![
                input("a", Tensor, SpaceSpec::fixed(&["delta"])).state_dict(),
                hyper("alpha", Tensor, DefaultValue::Float(1.0)),
            ],
            returns(Tensor, SpaceSpec::fixed(&["delta"])),
            Scale,
            Some(|c| match c.number(1) {
                Some(0.0) => zeros_like_first(c),
                _ => forward_when(c, 1, 1.0, 0),
            }),
        ),
        elementwise::method(
            "subtract",
            "a − b of two weights, giving a delta.",
            vec![input("a", Tensor, SpaceSpec::fixed(&["weight"])), input("b", Tensor, SpaceSpec::fixed(&["weight"]))],
            returns(Tensor, SpaceSpec::fixed(&["delta"])),
            Subtract,
            None,
        ),
        MethodSpec::new(
            "slerp",
            "Spherical interpolation between a and b (flattened), scaled by the interpolated norms; lerp when \
             the inputs are parallel.",
            vec![same_space("a", Tensor), same_space("b", Tensor), hyper("alpha", Tensor, DefaultValue::Float(0.5))],
            returns(Tensor, SpaceSpec::Symbol),
            Slerp,
        ),
        MethodSpec::new(
            "perpendicular_component",
            "The part of b perpendicular to a: b minus its projection on a (zeros when a is zero).",
            vec![same_space("a", Tensor), same_space("b", Tensor)],
            returns(Tensor, SpaceSpec::Symbol),
            PerpendicularComponent,
        ),
        abc_mask(
            "train_difference_mask",
            "A weight mask: alpha·1.8·|b − a| / (|b − a| + |b − c|), for weighted_sum's alpha.",
            TrainDifferenceMask,
        ),
        abc_mask("add_opposite_mask", "A weight mask: alpha·2·|a − b| / (|a − b| + |a + b − 2c|).", AddOppositeMask),
        abc_mask(
            "add_strict_opposite_mask",
            "A weight mask that is non-zero where a and b moved in opposite directions from c.",
            AddStrictOppositeMask,
        ),
        elementwise::method(
            "geometric_sum",
            "Elementwise geometric interpolation Re(a^(1−alpha)·b^alpha), over the complex numbers.",
            vec![same_space("a", Tensor), same_space("b", Tensor), hyper("alpha", Tensor, DefaultValue::Float(0.5))],
            returns(Tensor, SpaceSpec::Symbol),
            GeometricSum,
            None,
        ),
        elementwise::method(
            "multiply_quotient",
            "a·(b/c)^alpha' where a and b moved the same way from c (log-space train difference).",
            vec![
                same_space("a", Tensor),
                same_space("b", Tensor),
                same_space("c", Tensor),
                hyper("alpha", Tensor, DefaultValue::Float(1.0)),
            ],
            returns(Tensor, SpaceSpec::Symbol),
            MultiplyQuotient,
            None,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::seam::{Chunk, ChunkKernel, NodeRef};

    fn run(kernel: &dyn ChunkKernel, x: &[Operand<f32>], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        let chunk = Chunk {
            key: "k",
            shape: &[n],
            offset: 0,
            node: NodeRef { index: 0, source: None, identity: 0 },
            host_context: 0,
        };
        kernel.apply_f32(&chunk, x, &mut out).unwrap();
        out
    }

    #[test]
    fn weighted_sum_is_torch_lerp() {
        let a = [1.0f32, -2.0, 3.0];
        let b = [5.0f32, 4.0, -1.0];
        let out = run(&WeightedSum, &[Operand::Slice(&a), Operand::Slice(&b), Operand::Scalar(0.25)], 3);
        assert_eq!(out, vec![2.0, -0.5, 2.0]);
        let out = run(&WeightedSum, &[Operand::Slice(&a), Operand::Slice(&b), Operand::Scalar(0.75)], 3);
        assert_eq!(out, vec![4.0, 2.5, 0.0]);
        let w = [0.0f32, 1.0, 0.5];
        let out = run(&WeightedSum, &[Operand::Slice(&a), Operand::Slice(&b), Operand::Slice(&w)], 3);
        assert_eq!(out, vec![1.0, 4.0, 1.0]);
    }

    #[test]
    fn n_average_is_the_mean() {
        let m: Vec<Vec<f32>> = (0..5).map(|i| vec![i as f32, 10.0 * i as f32]).collect();
        let ops: Vec<Operand<f32>> = m.iter().map(|v| Operand::Slice(v.as_slice())).collect();
        let out = run(&NAverage, &ops, 2);
        assert!((out[0] - 2.0).abs() < 1e-6 && (out[1] - 20.0).abs() < 1e-5, "{out:?}");
    }

    #[test]
    fn arithmetic_kernels() {
        let a = [1.0f32, 2.0];
        let b = [0.5f32, -1.0];
        assert_eq!(
            run(&AddDifference, &[Operand::Slice(&a), Operand::Slice(&b), Operand::Scalar(2.0)], 2),
            vec![2.0, 0.0]
        );
        assert_eq!(run(&Subtract, &[Operand::Slice(&a), Operand::Slice(&b)], 2), vec![0.5, 3.0]);
        assert_eq!(run(&Scale, &[Operand::Slice(&a), Operand::Scalar(3.0)], 2), vec![3.0, 6.0]);
    }

    #[test]
    fn masks_replace_nan_by_zero() {
        // a == b == c gives 0/0 in every mask.
        let same = [1.0f32];
        let ops = [Operand::Slice(&same[..]), Operand::Slice(&same), Operand::Slice(&same), Operand::Scalar(1.0)];
        for k in [&TrainDifferenceMask as &dyn ChunkKernel, &AddOppositeMask, &AddStrictOppositeMask] {
            assert_eq!(run(k, &ops, 1), vec![0.0]);
        }
        // b moved away from a, not from c: the mask is 1.8.
        let (a, b, c) = ([0.0f32], [1.0f32], [1.0f32]);
        let ops = [Operand::Slice(&a[..]), Operand::Slice(&b), Operand::Slice(&c), Operand::Scalar(1.0)];
        assert_eq!(run(&TrainDifferenceMask, &ops, 1), vec![1.8]);
    }

    #[test]
    fn geometric_sum_takes_complex_roots_of_negatives() {
        let (a, b) = ([4.0f32, -4.0], [9.0f32, 9.0]);
        let out = run(&GeometricSum, &[Operand::Slice(&a), Operand::Slice(&b), Operand::Scalar(0.5)], 2);
        assert!((out[0] - 6.0).abs() < 1e-5, "{out:?}");
        // sqrt(-4)·3 = 6i: its real part is 0.
        assert!(out[1].abs() < 1e-5, "{out:?}");
    }
}
