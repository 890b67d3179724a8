//! Linear and arithmetic merge methods (sd-mecha `linear.py`): elementwise, chunkable.

use super::decl::*;
use super::{DefaultValue, Implementation, MethodSpec, SpaceSpec, ValueType};
use crate::kernels::{lerp, map2, map3, Operand, Real};

/// The elementwise kernels. Operands arrive flattened in parameter order (varargs expanded).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `[a, b, alpha]` → lerp(a, b, alpha)
    WeightedSum,
    /// `[m1, …, mn]` → running lerp(res, m_i, 1/i), the arithmetic mean
    NAverage,
    /// `[a, b, alpha]` → a + b·alpha (b is a delta)
    AddDifference,
    /// `[a, alpha]` → a·alpha (a is a delta)
    Scale,
    /// `[a, b]` → a − b
    Subtract,
    /// `[a, bound…, stiffness]` → a limited to the bounds' range (`clamp`)
    Clamp,
}

/// A result that needs no arithmetic, decided from scalar hyper-parameters before reading data.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Shortcut {
    /// The result is operand `i` unchanged.
    Operand(usize),
    /// The result is all zeros, shaped like operand 0.
    Zeros,
}

impl Kernel {
    /// sd-mecha returns an input as-is when a scalar weight is exactly 0 or 1 (`math.isclose`
    /// with no absolute tolerance); doing the same lets untouched keys be copied byte for byte.
    pub fn shortcut(self, scalars: &[Option<f64>]) -> Option<Shortcut> {
        let is = |i: usize, v: f64| scalars.get(i).copied().flatten() == Some(v);
        match self {
            Kernel::WeightedSum if is(2, 0.0) => Some(Shortcut::Operand(0)),
            Kernel::WeightedSum if is(2, 1.0) => Some(Shortcut::Operand(1)),
            Kernel::AddDifference if is(2, 0.0) => Some(Shortcut::Operand(0)),
            Kernel::Scale if is(1, 0.0) => Some(Shortcut::Zeros),
            Kernel::Scale if is(1, 1.0) => Some(Shortcut::Operand(0)),
            Kernel::NAverage if scalars.len() == 1 => Some(Shortcut::Operand(0)),
            _ => None,
        }
    }

    /// Which operands the output must have the shape of (the others may be scalars).
    pub fn shaped_operands(self, count: usize) -> std::ops::Range<usize> {
        match self {
            Kernel::WeightedSum | Kernel::AddDifference | Kernel::Subtract => 0..2,
            Kernel::Scale => 0..1,
            Kernel::NAverage => 0..count,
            Kernel::Clamp => 0..count - 1,
        }
    }

    /// Computes one chunk. Every operand slice has `out.len()` elements.
    ///
    /// Compiled twice: for AVX2+FMA, used when the CPU has them, and for the baseline. Results
    /// are identical either way, since every operation is correctly rounded (`mul_add` is a true
    /// fused multiply-add on both paths, an instruction on one and a library call on the other).
    pub fn apply<T: Real>(self, x: &[Operand<T>], out: &mut [T]) {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::has_avx2_fma() {
            // SAFETY: the CPU supports the enabled features (checked above).
            return unsafe { self.apply_avx2_fma(x, out) };
        }
        self.apply_portable(x, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_avx2_fma<T: Real>(self, x: &[Operand<T>], out: &mut [T]) {
        self.apply_portable(x, out)
    }

    #[inline(always)]
    fn apply_portable<T: Real>(self, x: &[Operand<T>], out: &mut [T]) {
        match self {
            Kernel::WeightedSum => map3(out, x[0], x[1], x[2], lerp),
            Kernel::AddDifference => map3(out, x[0], x[1], x[2], |a, b, w| a + b * w),
            Kernel::Scale => map2(out, x[0], x[1], |a, w| a * w),
            Kernel::Subtract => map2(out, x[0], x[1], |a, b| a - b),
            Kernel::Clamp => super::limiting::clamp(x, out),
            Kernel::NAverage => {
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
        }
    }
}

pub fn methods() -> Vec<MethodSpec> {
    use ValueType::Tensor;
    let elementwise = |id: &str, description: &str, params, returns, kernel| MethodSpec {
        id: id.into(),
        description: description.into(),
        params,
        returns,
        implementation: Implementation::Elementwise(kernel),
        is_conversion: false,
    };
    vec![
        elementwise(
            "weighted_sum",
            "Linear interpolation a + alpha·(b − a). alpha may be a number, per-block values or a tensor.",
            vec![
                same_space("a", Tensor).state_dict(),
                same_space("b", Tensor).state_dict(),
                hyper("alpha", Tensor, DefaultValue::Float(0.5)),
            ],
            returns(Tensor, SpaceSpec::Symbol),
            Kernel::WeightedSum,
        ),
        elementwise(
            "n_average",
            "Arithmetic mean of any number of models.",
            vec![same_space("models", Tensor).state_dict().varargs()],
            returns(Tensor, SpaceSpec::Symbol),
            Kernel::NAverage,
        ),
        elementwise(
            "add_difference",
            "a + alpha·b, where b is a delta (for example `subtract(b, c)`).",
            vec![
                same_space("a", Tensor).state_dict(),
                input("b", Tensor, SpaceSpec::fixed(&["delta"])).state_dict(),
                hyper("alpha", Tensor, DefaultValue::Float(1.0)),
            ],
            returns(Tensor, SpaceSpec::Symbol),
            Kernel::AddDifference,
        ),
        elementwise(
            "scale",
            "a·alpha, where a is a delta.",
            vec![
                input("a", Tensor, SpaceSpec::fixed(&["delta"])).state_dict(),
                hyper("alpha", Tensor, DefaultValue::Float(1.0)),
            ],
            returns(Tensor, SpaceSpec::fixed(&["delta"])),
            Kernel::Scale,
        ),
        elementwise(
            "subtract",
            "a − b of two weights, giving a delta.",
            vec![input("a", Tensor, SpaceSpec::fixed(&["weight"])), input("b", Tensor, SpaceSpec::fixed(&["weight"]))],
            returns(Tensor, SpaceSpec::fixed(&["delta"])),
            Kernel::Subtract,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kernel: Kernel, x: &[Operand<f32>], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        kernel.apply(x, &mut out);
        out
    }

    #[test]
    fn weighted_sum_is_torch_lerp() {
        let a = [1.0f32, -2.0, 3.0];
        let b = [5.0f32, 4.0, -1.0];
        let out = run(Kernel::WeightedSum, &[Operand::Slice(&a), Operand::Slice(&b), Operand::Scalar(0.25)], 3);
        assert_eq!(out, vec![2.0, -0.5, 2.0]);
        let out = run(Kernel::WeightedSum, &[Operand::Slice(&a), Operand::Slice(&b), Operand::Scalar(0.75)], 3);
        assert_eq!(out, vec![4.0, 2.5, 0.0]);
        let w = [0.0f32, 1.0, 0.5];
        let out = run(Kernel::WeightedSum, &[Operand::Slice(&a), Operand::Slice(&b), Operand::Slice(&w)], 3);
        assert_eq!(out, vec![1.0, 4.0, 1.0]);
    }

    #[test]
    fn n_average_is_the_mean() {
        let m: Vec<Vec<f32>> = (0..5).map(|i| vec![i as f32, 10.0 * i as f32]).collect();
        let ops: Vec<Operand<f32>> = m.iter().map(|v| Operand::Slice(v.as_slice())).collect();
        let out = run(Kernel::NAverage, &ops, 2);
        assert!((out[0] - 2.0).abs() < 1e-6 && (out[1] - 20.0).abs() < 1e-5, "{out:?}");
    }

    #[test]
    fn arithmetic_kernels() {
        let a = [1.0f32, 2.0];
        let b = [0.5f32, -1.0];
        assert_eq!(
            run(Kernel::AddDifference, &[Operand::Slice(&a), Operand::Slice(&b), Operand::Scalar(2.0)], 2),
            vec![2.0, 0.0]
        );
        assert_eq!(run(Kernel::Subtract, &[Operand::Slice(&a), Operand::Slice(&b)], 2), vec![0.5, 3.0]);
        assert_eq!(run(Kernel::Scale, &[Operand::Slice(&a), Operand::Scalar(3.0)], 2), vec![3.0, 6.0]);
    }

    #[test]
    fn shortcuts_follow_sd_mecha() {
        assert_eq!(Kernel::WeightedSum.shortcut(&[None, None, Some(0.0)]), Some(Shortcut::Operand(0)));
        assert_eq!(Kernel::WeightedSum.shortcut(&[None, None, Some(1.0)]), Some(Shortcut::Operand(1)));
        assert_eq!(Kernel::WeightedSum.shortcut(&[None, None, Some(0.5)]), None);
        assert_eq!(Kernel::WeightedSum.shortcut(&[None, None, None]), None);
        assert_eq!(Kernel::Scale.shortcut(&[None, Some(0.0)]), Some(Shortcut::Zeros));
        assert_eq!(Kernel::AddDifference.shortcut(&[None, None, Some(0.0)]), Some(Shortcut::Operand(0)));
    }
}
