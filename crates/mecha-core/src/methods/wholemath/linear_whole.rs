//! The whole-tensor methods of sd-mecha's `linear.py`: `slerp` and `perpendicular_component`.
//! Both treat the tensors as flat vectors and need their global norms and dot product, taken
//! in one pass (f64 accumulation) before one pass that writes the result.

use candle_core::{Result, Tensor};

use super::{apply2, lerp, map2, sums, Elem, Kernel2};

/// Spherical interpolation of the flattened tensors, rescaled to the lerp of their norms.
///
/// With â = a/‖a‖, b̂ = b/‖b‖, ω = arccos(clamp(â·b̂, −1, 1)):
/// `res = (â·sin((1−α)ω) + b̂·sin(αω)) / sin ω · lerp(‖a‖, ‖b‖, α)`, and torch's
/// `lerp(a, b, α)` instead when any element of that is NaN (a zero input, parallel inputs with
/// ω = 0, NaN or infinite elements). No shortcut for α = 0 or 1: sd-mecha has none either.
/// The angle math runs in the input dtype like torch's; the norms and the dot product are
/// accumulated in f64 (torch: in the input dtype), so results agree to rounding.
pub fn slerp(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    apply2("slerp", a, b, &Slerp { alpha })
}

/// `b` minus its projection on `a`: `b − a·Σ((a/‖a‖)·(b/‖a‖))`; zeros when that has a NaN
/// (`a` all zeros, or NaN/infinite elements).
pub fn perpendicular_component(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    apply2("perpendicular_component", a, b, &Perpendicular)
}

struct Slerp {
    alpha: f64,
}

impl Kernel2 for Slerp {
    fn run<T: Elem>(&self, a: &[T], b: &[T], _: &[usize]) -> Result<Vec<T>> {
        let alpha = T::narrow(self.alpha);
        let [aa, bb, ab] = sums(a, b);
        let (na, nb) = (T::narrow(aa.sqrt()), T::narrow(bb.sqrt()));
        let cos = T::narrow(ab / (na.widen() * nb.widen()));
        // torch's clamp lets NaN through
        let cos = if cos < -T::ONE {
            -T::ONE
        } else if cos > T::ONE {
            T::ONE
        } else {
            cos
        };
        let omega = cos.acos();
        let sin_omega = omega.sin();
        let (sin_a, sin_b) = (((T::ONE - alpha) * omega).sin(), (alpha * omega).sin());
        let norm = lerp(na, nb, alpha).widen();
        // res = ka·a + kb·b; a NaN coefficient means every element would be NaN
        let ka = T::narrow(sin_a.widen() / sin_omega.widen() * (norm / na.widen()));
        let kb = T::narrow(sin_b.widen() / sin_omega.widen() * (norm / nb.widen()));
        if !ka.is_nan() && !kb.is_nan() {
            let (res, nan) = map2(a, b, |a, b| ka * a + kb * b);
            if !nan {
                return Ok(res);
            }
        }
        Ok(map2(a, b, |a, b| lerp(a, b, alpha)).0)
    }
}

struct Perpendicular;

impl Kernel2 for Perpendicular {
    fn run<T: Elem>(&self, a: &[T], b: &[T], _: &[usize]) -> Result<Vec<T>> {
        let [aa, _, ab] = sums(a, b);
        let norm = T::narrow(aa.sqrt()).widen();
        let proj = T::narrow(ab / (norm * norm));
        let (mut res, nan) = map2(a, b, |a, b| b - a * proj);
        if nan {
            res.fill(T::ZERO);
        }
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{excess, load, max_abs, values};
    use super::*;

    #[test]
    fn matches_sd_mecha() {
        let fam = load("linear_whole");
        let mut checked = 0;
        for c in fam.cases() {
            let got = match c.func.as_str() {
                "slerp" => slerp(&c.a, &c.b, c.params[0]),
                "perpendicular_component" => perpendicular_component(&c.a, &c.b),
                f => panic!("unknown function {f}"),
            }
            .unwrap();
            assert_eq!(got.dims(), c.a.dims());
            assert_eq!(got.dtype(), c.a.dtype());
            let (got, want) = (values(&got), c.expected.unwrap());
            let scale = max_abs(&values(&c.a)).max(max_abs(&values(&c.b)));
            let (rel, abs) = tolerance(&c.func, &c.set, scale);
            let e = excess(&got, &want, rel, abs);
            assert!(e <= 1.0, "{} {} {:?}: excess {e}\n got {got:?}\nwant {want:?}", c.func, c.set, c.params);
            checked += 1;
        }
        assert!(checked > 50);
    }

    /// 1e-5 relative (abs floor 1e-6) except where the result cancels: b − proj for b ≈ a,
    /// and slerp between opposite vectors (ω = π: sin ω is rounding noise in torch's dtype).
    fn tolerance(func: &str, set: &str, scale: f64) -> (f64, f64) {
        let f64_set = set.starts_with("f64");
        let eps = if f64_set { 1e-15 } else { 1e-6 };
        match (func, set) {
            ("slerp", s) if s.ends_with("_neg") => (1e-5, scale),
            ("perpendicular_component", s) if s.ends_with("_base") || s.ends_with("_same") || s.ends_with("twice") => {
                (1e-5, 4.0 * eps * scale)
            }
            _ => (if f64_set { 1e-12 } else { 1e-5 }, eps),
        }
    }
}
