//! Baking LoRA / LyCORIS files (sd-mecha's `lycoris.py`): the six conversions from a LoRA config
//! (`sdxl-kohya_kohya_lora`, …) to its base kohya config, in delta space, so that
//! `add_difference(base, convert(lora, base), alpha)` applies a LoRA. Each base weight is rebuilt
//! from the factors the file holds for it:
//!
//! - LoRA / LoCon: `up · down` (optionally through a Tucker core `lora_mid`), times `alpha / rank`;
//! - LoHa: `(w1_a · w1_b) ⊙ (w2_a · w2_b)` (optionally Tucker cores `hada_t1`, `hada_t2`),
//!   times `alpha / rank`;
//! - LoKr: `w1 ⊗ w2`, each half whole or a product (`w2` optionally through a Tucker core), times
//!   `alpha / rank` when a half is factored and alpha is finite.
//!
//! The result is reshaped to the base key's shape.

use candle_core::Tensor;

use super::decl::*;
use super::seam::{
    Arg, Clause, ComputeSpec, Decision, KeyMapCall, KeyRelation, Meta, Method, Output, PlanCall, RunCall,
};
use super::{MethodSpec, ReturnSpec, SpaceSpec, ValueType};
use crate::configs::lycoris::{has_low_rank_form, lora_configs, lycoris_stem};
use crate::configs::{self, ModelConfig};
use crate::error::{ErrorKind, MechaError, Result};

/// One half of a LoKr product.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Half {
    /// `w` as stored.
    Whole,
    /// `w_a · w_b`.
    Factored,
    /// The Tucker rebuild of `t`, `w_a`, `w_b` (only `w2`).
    Tucker,
}

/// Which factors a clause reads, in the order its keys are listed.
#[derive(Copy, Clone, Debug)]
enum Factors {
    /// up, down, [mid], [alpha]
    Lora { mid: bool, alpha: bool },
    /// w1_a, w1_b, w2_a, w2_b, [t1, t2], [alpha]
    Loha { tucker: bool, alpha: bool },
    /// w1 | w1_a w1_b; then w2 | w2_a w2_b | w2_a w2_b t2; then [alpha]
    Lokr { w1: Half, w2: Half, alpha: bool },
}

impl Factors {
    /// Every way a file may hold a key's factors, most specific first (the first complete one is
    /// used, as in sd-mecha: LoRA, then LoHa, then LoKr).
    fn all() -> Vec<Factors> {
        let mut all = vec![];
        for alpha in [true, false] {
            for mid in [true, false] {
                all.push(Factors::Lora { mid, alpha });
            }
        }
        for tucker in [true, false] {
            for alpha in [true, false] {
                all.push(Factors::Loha { tucker, alpha });
            }
        }
        for w1 in [Half::Whole, Half::Factored] {
            for w2 in [Half::Tucker, Half::Whole, Half::Factored] {
                for alpha in [true, false] {
                    all.push(Factors::Lokr { w1, w2, alpha });
                }
            }
        }
        all
    }

    fn suffixes(self) -> Vec<&'static str> {
        let mut s = match self {
            Factors::Lora { mid, .. } => {
                let mut s = vec!["lora_up.weight", "lora_down.weight"];
                if mid {
                    s.push("lora_mid.weight");
                }
                s
            }
            Factors::Loha { tucker, .. } => {
                let mut s = vec!["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];
                if tucker {
                    s.extend(["hada_t1", "hada_t2"]);
                }
                s
            }
            Factors::Lokr { w1, w2, .. } => {
                let mut s = match w1 {
                    Half::Factored => vec!["lokr_w1_a", "lokr_w1_b"],
                    _ => vec!["lokr_w1"],
                };
                match w2 {
                    Half::Whole => s.push("lokr_w2"),
                    Half::Factored => s.extend(["lokr_w2_a", "lokr_w2_b"]),
                    Half::Tucker => s.extend(["lokr_w2_a", "lokr_w2_b", "lokr_t2"]),
                }
                s
            }
        };
        if self.has_alpha() {
            s.push("alpha");
        }
        s
    }

    fn has_alpha(self) -> bool {
        match self {
            Factors::Lora { alpha, .. } | Factors::Loha { alpha, .. } | Factors::Lokr { alpha, .. } => alpha,
        }
    }
}

/// `t` as a matrix: its first dimension by the product of the others.
fn matrix(t: &Tensor) -> Result<Tensor> {
    let rows = t.dim(0)?;
    Ok(t.reshape((rows, t.elem_count() / rows.max(1)))?)
}

/// The Tucker rebuild `Σ_ij core[i, j, …] · a[i, p] · b[j, r]` → `[p, r, …]` (LyCORIS'
/// `einsum("i j ..., i p, j r -> p r ...")`), as two matrix products.
fn tucker(core: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = core.dims().to_vec();
    let (i, j) = (dims[0], dims[1]);
    let kernel: usize = dims[2..].iter().product();
    let (a, b) = (matrix(a)?, matrix(b)?);
    let (p, r) = (a.dim(1)?, b.dim(1)?);
    // [p, i] · [i, j·k] → [p, j, k] → [p·k, j] · [j, r] → [p, k, r] → [p, r, k]
    let x = a.t()?.matmul(&core.reshape((i, j * kernel))?)?;
    let x = x.reshape((p, j, kernel))?.transpose(1, 2)?.contiguous()?.reshape((p * kernel, j))?;
    let x = x.matmul(&b)?.reshape((p, kernel, r))?.transpose(1, 2)?.contiguous()?;
    let mut shape = vec![p, r];
    shape.extend(&dims[2..]);
    Ok(x.reshape(shape)?)
}

/// The Kronecker product of two tensors of the same rank (`torch.kron`).
fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (da, db) = (a.dims(), b.dims());
    let interleave = |first: bool| -> Vec<usize> {
        da.iter().zip(db).flat_map(|(&x, &y)| if first { [x, 1] } else { [1, y] }).collect()
    };
    let product = a.reshape(interleave(true))?.broadcast_mul(&b.reshape(interleave(false))?)?;
    let shape: Vec<usize> = da.iter().zip(db).map(|(x, y)| x * y).collect();
    Ok(product.reshape(shape)?)
}

/// `t` with trailing unit dimensions up to `rank` (LoKr's `w1` next to a convolution's `w2`).
fn with_rank(t: &Tensor, rank: usize) -> Result<Tensor> {
    let mut shape = t.dims().to_vec();
    shape.resize(rank.max(shape.len()), 1);
    Ok(t.reshape(shape)?)
}

/// The factors' product before scaling and reshaping, and the rank alpha divides by.
fn product(factors: Factors, t: &[Tensor]) -> Result<(Tensor, Option<usize>)> {
    Ok(match factors {
        Factors::Lora { mid: false, .. } => (matrix(&t[0])?.matmul(&matrix(&t[1])?)?, Some(t[1].dim(0)?)),
        Factors::Lora { mid: true, .. } => (tucker(&t[2], &matrix(&t[0])?.t()?, &t[1])?, Some(t[1].dim(0)?)),
        Factors::Loha { tucker: false, .. } => {
            let w1 = matrix(&t[0])?.matmul(&matrix(&t[1])?)?;
            let w2 = matrix(&t[2])?.matmul(&matrix(&t[3])?)?;
            (w1.mul(&w2)?, Some(t[1].dim(0)?))
        }
        Factors::Loha { tucker: true, .. } => {
            let w1 = tucker(&t[4], &t[0], &t[1])?;
            let w2 = tucker(&t[5], &t[2], &t[3])?;
            (w1.mul(&w2)?, Some(t[1].dim(0)?))
        }
        Factors::Lokr { w1, w2, .. } => {
            let (w1, rank1, rest) = match w1 {
                Half::Factored => (t[0].matmul(&t[1])?, Some(t[1].dim(0)?), &t[2..]),
                _ => (t[0].clone(), None, &t[1..]),
            };
            let (w2, rank2) = match w2 {
                Half::Whole => (rest[0].clone(), None),
                Half::Factored => (matrix(&rest[0])?.matmul(&matrix(&rest[1])?)?, Some(rest[1].dim(0)?)),
                Half::Tucker => (tucker(&rest[2], &rest[0], &rest[1])?, Some(rest[1].dim(0)?)),
            };
            (kron(&with_rank(&w1, w2.rank())?, &w2)?, rank1.or(rank2))
        }
    })
}

/// The element count [`product`] gives, from shapes alone, or why the factors do not fit.
fn product_len(factors: Factors, s: &[&[usize]]) -> std::result::Result<usize, String> {
    let n = |s: &[usize]| s.iter().product::<usize>();
    let cols = |s: &[usize]| n(s) / s.first().copied().unwrap_or(1).max(1);
    let inner = |a: &[usize], b: &[usize]| {
        if cols(a) == b.first().copied().unwrap_or(0) {
            Ok(a[0] * cols(b))
        } else {
            Err(format!("{a:?} and {b:?} cannot be multiplied"))
        }
    };
    let tucker = |core: &[usize], a: &[usize], b: &[usize]| {
        if core.len() >= 2 && core[0] == a[0] && core[1] == b[0] {
            Ok(cols(a) * cols(b) * n(&core[2..]))
        } else {
            Err(format!("the Tucker core {core:?} does not fit the factors {a:?} and {b:?}"))
        }
    };
    let factor_count = s.len() - factors.has_alpha() as usize;
    if s[..factor_count].iter().any(|d| d.is_empty()) {
        return Err("a factor is a single number".into());
    }
    match factors {
        Factors::Lora { mid: false, .. } => inner(s[0], s[1]),
        Factors::Lora { mid: true, .. } => tucker(s[2], &[cols(s[0]), s[0][0]], s[1]),
        Factors::Loha { tucker: false, .. } => {
            let (w1, w2) = (inner(s[0], s[1])?, inner(s[2], s[3])?);
            if w1 == w2 && s[0][0] == s[2][0] {
                Ok(w1)
            } else {
                Err(format!("the two halves {:?}·{:?} and {:?}·{:?} differ in shape", s[0], s[1], s[2], s[3]))
            }
        }
        Factors::Loha { tucker: true, .. } => {
            let (w1, w2) = (tucker(s[4], s[0], s[1])?, tucker(s[5], s[2], s[3])?);
            if w1 == w2 {
                Ok(w1)
            } else {
                Err("the two Tucker halves differ in shape".into())
            }
        }
        Factors::Lokr { w1, w2, .. } => {
            let (w1, rest) = match w1 {
                Half::Factored => (inner(s[0], s[1])?, &s[2..]),
                _ => (n(s[0]), &s[1..]),
            };
            let w2 = match w2 {
                Half::Whole => n(rest[0]),
                Half::Factored => inner(rest[0], rest[1])?,
                Half::Tucker => tucker(rest[2], rest[0], rest[1])?,
            };
            Ok(w1 * w2)
        }
    }
}

struct LoraToBase {
    /// The key prefix of the LoRA config (`lora` or `lycoris`).
    prefix: &'static str,
    base: std::sync::Arc<ModelConfig>,
}

impl Method for LoraToBase {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        let meta = self.base.get(call.key)?;
        if !has_low_rank_form(call.key, meta) {
            return None;
        }
        let stem = lycoris_stem(self.prefix, call.key);
        let clauses = Factors::all()
            .into_iter()
            .map(|f| Clause {
                inputs: vec![Some(f.suffixes().iter().map(|s| format!("{stem}.{s}")).collect())],
                meta: Meta::new(f),
            })
            .collect();
        Some(KeyRelation { outputs: vec![call.key.to_string()], clauses })
    }

    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let factors = *call.meta.get::<Factors>().expect("clauses carry their factors");
        let args = &call.args[0];
        let shapes: Vec<&[usize]> = args.iter().map(|a| a.shape.as_deref().unwrap_or(&[])).collect();
        let target = self.base.get(call.key).and_then(|m| m.shape.clone());
        let fail = |why: String| {
            let files: Vec<&str> = args.iter().map(|a| a.origin.as_str()).collect();
            MechaError::new(
                ErrorKind::Shape,
                format!(
                    "{}: the LoRA factors for \"{}\" ({}) {why}; is the LoRA made for another model?",
                    call.method.id,
                    call.key,
                    files.join(", ")
                ),
            )
        };
        let len = product_len(factors, &shapes).map_err(fail)?;
        let shape = match target {
            Some(t) if t.iter().product::<usize>() == len => t,
            Some(t) => return Err(fail(format!("make {len} values, but the base key has shape {t:?}"))),
            None => vec![len],
        };
        let width = (call.merge_dtype.bits() / 8) as u64;
        let extra_bytes = 3 * len as u64 * width;
        Ok(Decision::Compute(ComputeSpec { shape: Some(shape), dtype: None, kernel: None, extra_bytes }))
    }

    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let factors = *call.meta.get::<Factors>().expect("clauses carry their factors");
        let tensors = call.tensors(0)?;
        let (delta, rank) = product(factors, &tensors)?;
        let alpha = match tensors.last() {
            Some(alpha) if factors.has_alpha() => {
                Some(alpha.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?[0])
            }
            _ => None,
        };
        let scale = match (factors, alpha, rank) {
            // LoKr with both halves whole has no rank, and an infinite alpha means "no scaling".
            (Factors::Lokr { .. }, Some(a), Some(r)) if a.is_finite() => a / r as f64,
            (Factors::Lokr { .. }, _, _) => 1.0,
            (_, Some(a), Some(r)) => a / r as f64,
            _ => 1.0,
        };
        let shape = call.shape.clone().expect("planned with a shape");
        Ok(vec![Arg::Tensor(delta.affine(scale, 0.0)?.reshape(shape)?)])
    }
}

pub fn methods() -> Vec<MethodSpec> {
    lora_configs()
        .into_iter()
        .map(|(lora, base, prefix)| {
            MethodSpec::new(
                &format!("convert_'{lora}'_to_base"),
                &format!("The weight changes a {lora} file makes, as deltas of {base} (bakes LoRA, LoHa and LoKr)."),
                vec![input("lora", ValueType::Tensor, SpaceSpec::fixed(&["weight"])).state_dict().config(&lora)],
                ReturnSpec { config: Some(base.into()), ..returns(ValueType::Tensor, SpaceSpec::fixed(&["delta"])) },
                LoraToBase { prefix, base: configs::resolve(base).expect("builtin config") },
            )
            .conversion()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn kron_matches_its_definition() {
        let a = t(&[1., 2., 3., 4.], &[2, 2]);
        let b = t(&[0., 1., 10., 100., 5., 6.], &[2, 3]);
        let k = kron(&a, &b).unwrap();
        assert_eq!(k.dims(), &[4, 6]);
        let v = values(&k);
        for (i, j) in (0..4).flat_map(|i| (0..6).map(move |j| (i, j))) {
            let want = [1., 2., 3., 4.][(i / 2) * 2 + j / 3] * [0., 1., 10., 100., 5., 6.][(i % 2) * 3 + j % 3];
            assert_eq!(v[i * 6 + j], want, "{i},{j}");
        }
    }

    #[test]
    fn tucker_matches_its_definition() {
        // core [2, 3, 2], a [2, 4], b [3, 5] → [4, 5, 2]
        let core: Vec<f32> = (0..12).map(|x| x as f32 * 0.5 - 2.0).collect();
        let a: Vec<f32> = (0..8).map(|x| (x as f32).sin()).collect();
        let b: Vec<f32> = (0..15).map(|x| (x as f32).cos()).collect();
        let r = tucker(&t(&core, &[2, 3, 2]), &t(&a, &[2, 4]), &t(&b, &[3, 5])).unwrap();
        assert_eq!(r.dims(), &[4, 5, 2]);
        let v = values(&r);
        for p in 0..4 {
            for q in 0..5 {
                for k in 0..2 {
                    let mut want = 0f32;
                    for i in 0..2 {
                        for j in 0..3 {
                            want += core[(i * 3 + j) * 2 + k] * a[i * 4 + p] * b[j * 5 + q];
                        }
                    }
                    assert!((v[(p * 5 + q) * 2 + k] - want).abs() < 1e-5, "{p},{q},{k}");
                }
            }
        }
    }

    #[test]
    fn shapes_are_checked_before_reading() {
        let lora = Factors::Lora { mid: false, alpha: true };
        assert_eq!(product_len(lora, &[&[8, 4], &[4, 6], &[]]), Ok(48));
        assert_eq!(product_len(lora, &[&[320, 4, 1, 1], &[4, 4, 3, 3], &[]]), Ok(320 * 36));
        assert!(product_len(lora, &[&[8, 4], &[3, 6], &[]]).is_err());
        let lokr = Factors::Lokr { w1: Half::Factored, w2: Half::Tucker, alpha: false };
        // w1 [4,2]·[2,8] = 32; t2 [2,2,3,3] with w2_a [2,5], w2_b [2,6] → 5·6·9
        assert_eq!(product_len(lokr, &[&[4, 2], &[2, 8], &[2, 5], &[2, 6], &[2, 2, 3, 3]]), Ok(32 * 270));
    }
}
