//! `balance_attention` for sdxl-sgm (sd-mecha's `balance_attention/`). Per head, attention reads
//! its weights only through Qᵀ·K (the logits) and Vᵀ·O (the output, O = Woutᵀ's head rows), so
//! Q → S·Q, K → S⁻ᵀ·K and V → T·V, O → T⁻ᵀ·O leave what it computes unchanged for any
//! invertible S and T. Biases ride along as a last column (Q = [Wq | bq]).
//!
//! This picks the symmetric positive S with which both sides carry the same energy, in every
//! direction: (S·Q)(S·Q)ᵀ = (S⁻¹·K)(S⁻¹·K)ᵀ. With A = Q·Qᵀ and B = K·Kᵀ that is M·A·M = B for
//! M = S², whose solution is the geometric mean M = A⁻¹ # B = A^-½·(A^½·B·A^½)^½·A^-½, so S comes
//! from three symmetric eigendecompositions. Heads are 64 wide; the VAE's mid-block attention is
//! one head of 512.

use std::sync::OnceLock;

use candle_core::Tensor;
use faer::{Mat, MatRef, Side};

use super::decl::*;
use super::permutations::{attention_blocks, AttentionBlock, KeyGroups, Projection, SDXL};
use super::seam::{Arg, Decision, KeyMapCall, KeyRelation, Method, Output, PlanCall, RunCall};
use super::{MethodSpec, ReturnSpec, SpaceSpec, ValueType};
use crate::configs;
use crate::error::Result;

/// Added to the Gram matrices' diagonals, relative to their mean diagonal (sd-mecha adds 1e-6
/// whatever the scale): keeps them invertible, and heads with zero weights (a pruned layer
/// filled with zeros) as they are, while balancing near-singular heads (the VAE's 512 × 512)
/// to within 1e-9 and giving the same S for weights at any scale.
const RELATIVE_EPS: f64 = 1e-9;

struct Balance {
    blocks: Vec<AttentionBlock>,
    groups: KeyGroups,
}

fn sdxl_balance() -> &'static Balance {
    static BALANCE: OnceLock<Balance> = OnceLock::new();
    BALANCE.get_or_init(|| {
        let config = configs::resolve(SDXL).expect("builtin config");
        let blocks = attention_blocks(&config);
        let groups = blocks.iter().map(|b| (format!("the attention of {}", b.name), b.keys.clone())).collect();
        Balance { groups: KeyGroups::new(&config, groups), blocks }
    })
}

/// (M^½, M^-½) of a symmetric positive semi-definite M; eigenvalues below 1e-12 of the largest
/// are raised to it, so both stay finite and exact inverses of each other.
fn roots(m: MatRef<f64>) -> std::result::Result<(Mat<f64>, Mat<f64>), String> {
    let n = m.nrows();
    let symmetric = Mat::from_fn(n, n, |i, j| 0.5 * (m[(i, j)] + m[(j, i)]));
    let e = symmetric
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| format!("an eigendecomposition did not converge ({e:?})"))?;
    let (u, s) = (e.U(), e.S().column_vector());
    let largest = (0..n).map(|i| s[i]).fold(0.0f64, f64::max);
    if !largest.is_finite() {
        return Err("the weights hold NaN or infinity".into());
    }
    let floor = (largest * 1e-12).max(f64::MIN_POSITIVE);
    let scaled = |power: f64| {
        let d: Vec<f64> = (0..n).map(|i| s[i].max(floor).powf(power)).collect();
        let ud = Mat::from_fn(n, n, |i, j| u[(i, j)] * d[j]);
        ud * u.transpose()
    };
    Ok((scaled(0.5), scaled(-0.5)))
}

/// (S, S⁻¹): the symmetric positive S with (S·x)(S·x)ᵀ = (S⁻¹·y)(S⁻¹·y)ᵀ (module docs), up to the
/// small `eps` added to both Gram matrices.
fn balancing(x: MatRef<f64>, y: MatRef<f64>) -> std::result::Result<(Mat<f64>, Mat<f64>), String> {
    let (mut a, mut b) = (x * x.transpose(), y * y.transpose());
    let n = a.nrows();
    let mean_diagonal = (0..n).map(|i| a[(i, i)] + b[(i, i)]).sum::<f64>() / (2 * n) as f64;
    let eps = RELATIVE_EPS * mean_diagonal + f64::MIN_POSITIVE.sqrt();
    for i in 0..n {
        a[(i, i)] += eps;
        b[(i, i)] += eps;
    }
    let (a_half, a_half_inverse) = roots(a.as_ref())?;
    let (c_half, _) = roots((&a_half * &b * &a_half).as_ref())?;
    roots((&a_half_inverse * &c_half * &a_half_inverse).as_ref())
}

/// One attention block's tensors as f64 row-major values, read and written head by head.
struct BlockValues<'a> {
    keys: &'a [String],
    shapes: &'a [Vec<usize>],
    values: Vec<Vec<f64>>,
}

impl BlockValues<'_> {
    fn slot(&self, key: &str) -> usize {
        self.keys.iter().position(|k| k == key).expect("a block's keys are its group's")
    }

    fn columns(&self, slot: usize) -> usize {
        self.shapes[slot][1..].iter().product()
    }

    /// Head `h` of a projection: its rows of the weight, with the bias as a last column.
    fn head_rows(&self, p: &Projection, h: usize, width: usize) -> Mat<f64> {
        let (w, bias) = (self.slot(&p.weight), p.bias.as_deref().map(|b| self.slot(b)));
        let cols = self.columns(w);
        let first = p.offset + h * width;
        Mat::from_fn(width, cols + usize::from(bias.is_some()), |i, j| match bias {
            Some(b) if j == cols => self.values[b][first + i],
            _ => self.values[w][(first + i) * cols + j],
        })
    }

    fn set_head_rows(&mut self, p: &Projection, h: usize, width: usize, m: MatRef<f64>) {
        let (w, bias) = (self.slot(&p.weight), p.bias.as_deref().map(|b| self.slot(b)));
        let cols = self.columns(w);
        let first = p.offset + h * width;
        for i in 0..width {
            for j in 0..cols {
                self.values[w][(first + i) * cols + j] = m[(i, j)];
            }
            if let Some(b) = bias {
                self.values[b][first + i] = m[(i, cols)];
            }
        }
    }

    /// Head `h`'s columns of the output projection, transposed (`width × out rows`).
    fn head_columns(&self, out: &str, h: usize, width: usize) -> Mat<f64> {
        let o = self.slot(out);
        let (rows, cols) = (self.shapes[o][0], self.columns(o));
        Mat::from_fn(width, rows, |d, r| self.values[o][r * cols + h * width + d])
    }

    fn set_head_columns(&mut self, out: &str, h: usize, width: usize, m: MatRef<f64>) {
        let o = self.slot(out);
        let (rows, cols) = (self.shapes[o][0], self.columns(o));
        for r in 0..rows {
            for d in 0..width {
                self.values[o][r * cols + h * width + d] = m[(d, r)];
            }
        }
    }
}

/// Balances every head of `block` in place.
fn balance_block(block: &AttentionBlock, values: &mut BlockValues) -> std::result::Result<(), String> {
    let width = block.head_width;
    for h in 0..block.heads {
        let (q, k) = (values.head_rows(&block.q, h, width), values.head_rows(&block.k, h, width));
        let (s, s_inverse) = balancing(q.as_ref(), k.as_ref())?;
        values.set_head_rows(&block.q, h, width, (&s * &q).as_ref());
        values.set_head_rows(&block.k, h, width, (&s_inverse * &k).as_ref());
        let (v, o) = (values.head_rows(&block.v, h, width), values.head_columns(&block.out, h, width));
        let (t, t_inverse) = balancing(v.as_ref(), o.as_ref())?;
        values.set_head_rows(&block.v, h, width, (&t * &v).as_ref());
        values.set_head_columns(&block.out, h, width, (&t_inverse * &o).as_ref());
    }
    Ok(())
}

struct BalanceAttention;

impl Method for BalanceAttention {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        Some(sdxl_balance().groups.relation(call, 1))
    }

    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let groups = &sdxl_balance().groups;
        Ok(match groups.check(call, 1)? {
            Err(decision) => decision,
            Ok(g) => {
                // an f64 copy of the block, and the largest head's matrices
                let elements: usize = groups.shapes[g].iter().map(|s| s.iter().product::<usize>()).sum();
                let head: usize =
                    groups.shapes[g].iter().map(|s| s.iter().skip(1).product::<usize>() + 1).max().unwrap_or(0);
                let width = sdxl_balance().blocks[g].head_width;
                groups.compute(call, g, (8 * (elements + 4 * width * head + 8 * width * width)) as u64)
            }
        })
    }

    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let balance = sdxl_balance();
        let g = KeyGroups::group_of_run(&call);
        let tensors = call.tensors(0)?;
        let values = tensors
            .iter()
            .map(|t| Ok(t.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1::<f64>()?))
            .collect::<Result<Vec<_>>>()?;
        let (keys, shapes) = (&balance.groups.keys[g], &balance.groups.shapes[g]);
        let mut block = BlockValues { keys, shapes, values };
        balance_block(&balance.blocks[g], &mut block)
            .map_err(|e| call.fail(format!("cannot balance {}: {e}", balance.groups.names[g])))?;
        block
            .values
            .into_iter()
            .zip(shapes)
            .zip(&tensors)
            .map(|((v, shape), t)| {
                Ok(Arg::Tensor(Tensor::from_vec(v, shape.as_slice(), t.device())?.to_dtype(t.dtype())?))
            })
            .collect()
    }
}

pub fn methods() -> Vec<MethodSpec> {
    let model = || input("a", ValueType::Tensor, SpaceSpec::Symbol).state_dict();
    let result = || returns(ValueType::Tensor, SpaceSpec::Symbol);
    vec![
        MethodSpec::interface(
            "balance_attention",
            "Rescales each attention head so that q and k (and v and out) carry equal energy, without changing \
             what the model computes (dispatched by config).",
            vec![model()],
            result(),
        ),
        MethodSpec::new(
            "balance_attention_'sdxl-sgm'",
            "balance_attention for sdxl-sgm: CLIP-L, CLIP-G, UNet attn1/attn2 (64-wide heads) and the VAE's mid-block \
             attention (one head).",
            vec![model().config(SDXL)],
            ReturnSpec { config: Some(SDXL.into()), ..result() },
            BalanceAttention,
        )
        .implements("balance_attention"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(seed: u64, rows: usize, cols: usize, scale: f64) -> Mat<f64> {
        let mut rng = super::super::seam::KeyRng::new(seed, "balance");
        Mat::from_fn(rows, cols, |_, _| scale * rng.next_normal())
    }

    fn max_abs(m: MatRef<f64>) -> f64 {
        (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)].abs())).fold(0.0, f64::max)
    }

    #[test]
    fn balancing_keeps_the_product_and_equalises_the_grams() {
        let (x, y) = (matrix(1, 8, 20, 1.0), matrix(2, 8, 30, 5.0));
        let (s, s_inverse) = balancing(x.as_ref(), y.as_ref()).unwrap();
        let (x2, y2) = (&s * &x, &s_inverse * &y);
        let before = x.transpose() * &y;
        let after = x2.transpose() * &y2;
        assert!(max_abs((&after - &before).as_ref()) < 1e-9 * max_abs(before.as_ref()));
        let (gx, gy) = (&x2 * x2.transpose(), &y2 * y2.transpose());
        assert!(max_abs((&gx - &gy).as_ref()) < 1e-6 * max_abs(gx.as_ref()), "the Gram matrices agree");
        let identity = Mat::<f64>::identity(8, 8);
        assert!(max_abs((&s * &s_inverse - &identity).as_ref()) < 1e-9);
    }
}
