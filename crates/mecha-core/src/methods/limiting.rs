//! `clamp` (sd-mecha `limiting.py`): keeps values within the range spanned by other models.

use super::decl::*;
use super::{elementwise, DefaultValue, MethodSpec, SpaceSpec, ValueType};
use crate::chunk_kernel;
use crate::kernels::{Operand, Real};

/// torch's `maximum`/`minimum`: NaN wins.
#[inline(always)]
fn pick<T: Real>(a: T, b: T, take_a: bool) -> T {
    if a.is_nan() || b.is_nan() {
        a + b // NaN
    } else if take_a {
        a
    } else {
        b
    }
}

/// `x = [a, bound₁…boundₙ, stiffness]`. The range is [min, max] of the bounds; a stiffness s
/// pulls each end toward the bound nearest the bounds' mean from that side.
pub struct Clamp;
chunk_kernel!(Clamp => clamp);

#[inline(always)]
fn clamp<T: Real>(_: &Clamp, x: &[Operand<T>], out: &mut [T]) {
    let (a, rest) = x.split_first().expect("clamp has an input");
    let (stiffness, bounds) = rest.split_last().expect("clamp has a stiffness");
    let stiffness = stiffness.scalar().expect("stiffness is a number");
    let at = |o: &Operand<T>, i: usize| match o {
        Operand::Scalar(v) => *v,
        Operand::Slice(s) => s[i],
    };
    let n = T::from_f64(bounds.len() as f64);
    for (i, o) in out.iter_mut().enumerate() {
        let (mut hi, mut lo) = (at(&bounds[0], i), at(&bounds[0], i));
        for b in &bounds[1..] {
            let v = at(b, i);
            hi = pick(hi, v, hi > v);
            lo = pick(lo, v, lo < v);
        }
        if stiffness != T::ZERO {
            let mut sum = T::ZERO;
            for b in bounds {
                sum = sum + at(b, i);
            }
            let mean = sum / n;
            let (mut above, mut below) = (hi, lo);
            for b in bounds {
                let v = at(b, i);
                if above >= v && v >= mean {
                    above = v;
                }
                if below <= v && v <= mean {
                    below = v;
                }
            }
            hi = (T::ONE - stiffness) * hi + stiffness * above;
            lo = (T::ONE - stiffness) * lo + stiffness * below;
        }
        let av = at(a, i);
        let raised = pick(av, lo, av > lo);
        *o = pick(raised, hi, raised < hi);
    }
}

pub fn methods() -> Vec<MethodSpec> {
    use ValueType::{Float, Tensor};
    vec![elementwise::method(
        "clamp",
        "a limited to the range spanned by the bounds; stiffness pulls the range toward the bounds' mean.",
        vec![
            same_space("a", Tensor),
            same_space("bounds", Tensor).varargs(),
            hyper("stiffness", Float, DefaultValue::Float(0.0)).keyword_only(),
        ],
        returns(Tensor, SpaceSpec::Symbol),
        Clamp,
        None,
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::seam::{Chunk, ChunkKernel, NodeRef};

    fn apply(x: &[Operand<f32>], out: &mut [f32]) {
        let chunk = Chunk {
            key: "k",
            shape: &[],
            offset: 0,
            node: NodeRef { index: 0, source: None, identity: 0 },
            host_context: 0,
        };
        Clamp.apply_f32(&chunk, x, out).unwrap();
    }

    #[test]
    fn clamps_to_the_bounds_range() {
        let a = [5.0f32, -5.0, 0.5, f32::NAN];
        let b1 = [1.0f32, 1.0, 0.0, 0.0];
        let b2 = [2.0f32, -1.0, 1.0, 1.0];
        let mut out = [0f32; 4];
        apply(&[Operand::Slice(&a), Operand::Slice(&b1), Operand::Slice(&b2), Operand::Scalar(0.0)], &mut out);
        assert_eq!(&out[..3], &[2.0, -1.0, 0.5]);
        assert!(out[3].is_nan());
        // Stiffness 1 narrows the range to the bounds nearest the mean (here the mean itself).
        let b3 = [1.5f32, 0.0, 0.5, 0.5];
        apply(
            &[Operand::Slice(&a), Operand::Slice(&b1), Operand::Slice(&b2), Operand::Slice(&b3), Operand::Scalar(1.0)],
            &mut out,
        );
        assert_eq!(out[0], 1.5);
    }
}
