//! The method seam: every merge method is a declaration (`MethodSpec`) plus one implementation
//! of [`Method`], in three parts modelled on sd-mecha's `map_keys` / `merge_key`:
//!
//! - [`Method::key_map`]: which input keys each parameter must provide for an output key, as
//!   ordered alternatives (clauses); a group may have several outputs computed at once.
//! - [`Method::plan`]: decided from shapes, dtypes and constant hyper-parameters before any tensor
//!   data is read: forward an input, produce a constant, skip the key, or compute — with an
//!   elementwise [`ChunkKernel`] when the result can be streamed in chunks.
//! - [`Method::run`]: computes a group from whole tensors (`candle_core::Tensor` on a `Device`).
//!
//! The planner and executor only ever talk to methods through this file.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::dtype::DType;
use crate::error::{MechaError, Result};
use crate::kernels::Operand;
use crate::recipe::inference::SolvedConfig;
use crate::recipe::{NodeId, Scalar};

use super::MethodSpec;

/// Data a method attaches to a key group (a permutation closure, which half of a stack…).
#[derive(Clone, Default)]
pub struct Meta(pub Option<Arc<dyn Any + Send + Sync>>);

impl Meta {
    pub fn new<T: Any + Send + Sync>(value: T) -> Meta {
        Meta(Some(Arc::new(value)))
    }
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.as_ref()?.downcast_ref()
    }
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Meta(..)" } else { "Meta(none)" })
    }
}

/// One way to build a key group: for each parameter, the keys it must provide (every child of
/// a varargs parameter provides them all), or `None` when this clause does not use it.
#[derive(Clone, Debug)]
pub struct Clause {
    pub inputs: Vec<Option<Vec<String>>>,
    pub meta: Meta,
}

/// The output keys computed together and the ways to build them; the first clause whose
/// inputs all exist is used (sd-mecha's `KeyRelation`).
#[derive(Clone, Debug)]
pub struct KeyRelation {
    pub outputs: Vec<String>,
    pub clauses: Vec<Clause>,
}

impl KeyRelation {
    /// The default: one output, every parameter read at the same key.
    pub fn identity(key: &str, params: usize) -> KeyRelation {
        KeyRelation::single(key, vec![Some(vec![key.to_string()]); params])
    }

    /// One output built one way: `inputs` are the keys each parameter reads.
    pub fn single(key: &str, inputs: Vec<Option<Vec<String>>>) -> KeyRelation {
        KeyRelation { outputs: vec![key.to_string()], clauses: vec![Clause { inputs, meta: Meta::default() }] }
    }
}

pub struct KeyMapCall<'a> {
    pub method: &'a MethodSpec,
    pub key: &'a str,
    /// The config of the node's result.
    pub config: &'a SolvedConfig,
    /// The merge space of the node's result (in `delta`, a missing part may count as zero).
    pub merge_space: Option<&'a str>,
}

/// What one argument provides for one key, known before any data is read.
#[derive(Clone, Debug)]
pub struct ArgInfo {
    /// `None`: a single value (number, text, null) broadcast over the key.
    pub shape: Option<Vec<usize>>,
    /// The dtype the values come from (decides integer results).
    pub dtype: Option<DType>,
    /// The values are stored exactly in `dtype` (an input tensor or a cast), not computed.
    pub exact: bool,
    /// The value, when it is known before reading data (literals, plan-time results).
    pub constant: Option<Scalar>,
    /// Where the values come from, for messages.
    pub origin: String,
    /// A number or tensor (text and null are values of their own).
    pub numeric: bool,
}

impl ArgInfo {
    pub fn numel(&self) -> usize {
        self.shape.as_ref().map_or(1, |s| s.iter().product())
    }
    pub fn number(&self) -> Option<f64> {
        self.constant.as_ref().and_then(Scalar::as_f64)
    }
    pub fn text(&self) -> Option<&str> {
        match &self.constant {
            Some(Scalar::Str(s)) => Some(s),
            _ => None,
        }
    }
    /// Numbers and tensors; text and null are not numeric.
    pub fn is_numeric(&self) -> bool {
        self.numeric
    }
}

pub struct PlanCall<'a> {
    pub method: &'a MethodSpec,
    /// The output key being planned (one of `outputs`).
    pub key: &'a str,
    pub outputs: &'a [String],
    pub meta: &'a Meta,
    /// Per parameter (declaration order), one entry per child and input key; empty for a
    /// parameter the chosen clause does not use.
    pub args: Vec<Vec<ArgInfo>>,
    /// Per parameter, the config of its (first) child.
    pub input_configs: Vec<Option<&'a SolvedConfig>>,
    /// The config of the node's result.
    pub config: &'a SolvedConfig,
    /// The dtype float inputs are computed in (the merge dtype).
    pub merge_dtype: DType,
}

impl PlanCall<'_> {
    pub fn arg(&self, param: usize) -> Option<&ArgInfo> {
        self.args.get(param)?.first()
    }
    /// A constant number given to parameter `param` (hyper-parameters such as alpha).
    pub fn number(&self, param: usize) -> Option<f64> {
        self.arg(param)?.number()
    }
    pub fn tensors(&self) -> impl Iterator<Item = &ArgInfo> {
        self.args.iter().flatten().filter(|a| a.shape.is_some())
    }
    /// The first tensor argument's shape and dtype.
    pub fn first_tensor(&self) -> Option<&ArgInfo> {
        self.tensors().next()
    }
    pub fn fail(&self, message: impl fmt::Display) -> MechaError {
        MechaError::recipe(format!("{}: {message}", self.method.id))
    }
    /// The shape all of `params`' tensors share (a single element broadcasts), or a shape error
    /// naming both sources.
    pub fn common_shape(&self, params: impl IntoIterator<Item = usize>) -> Result<Option<Vec<usize>>> {
        let mut found: Option<&ArgInfo> = None;
        for p in params {
            for a in self.args.get(p).into_iter().flatten() {
                let Some(s) = &a.shape else { continue };
                match found {
                    None => found = Some(a),
                    Some(f) if f.shape.as_ref() != Some(s) => {
                        return Err(MechaError::new(
                            crate::error::ErrorKind::Shape,
                            format!(
                                "{}: shapes differ for key \"{}\": {} has {:?} but {} has {:?}",
                                self.method.id,
                                self.key,
                                f.origin,
                                f.shape.as_ref().expect("found tensors have shapes"),
                                a.origin,
                                s
                            ),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(found.and_then(|a| a.shape.clone()))
    }
}

/// What a method does for one output key, decided at plan time.
pub enum Decision {
    /// The result is argument `index` of parameter `param`, unchanged (bytes are copied).
    Forward {
        param: usize,
        index: usize,
    },
    /// The result is a value (text, number, bool, null): not a tensor.
    Constant(Scalar),
    /// A tensor filled with one number.
    Fill {
        value: f64,
        shape: Vec<usize>,
        dtype: Option<DType>,
    },
    /// The key is not produced (sd-mecha's `StateDictKeyError`); the reason is reported.
    Skip(String),
    Compute(ComputeSpec),
}

pub struct ComputeSpec {
    /// The result's shape; `None` for a value result (an `int`, `float` or `str`).
    pub shape: Option<Vec<usize>>,
    /// The dtype the result counts as coming from (`None`: the first tensor argument's).
    pub dtype: Option<DType>,
    /// Set for elementwise results: the executor streams the key in chunks through this kernel,
    /// with the numeric arguments flattened in parameter order. Without it, `run` is called
    /// with whole tensors.
    pub kernel: Option<Arc<dyn ChunkKernel>>,
    /// Working memory `run` needs beyond its arguments and results, in bytes.
    pub extra_bytes: u64,
}

impl ComputeSpec {
    pub fn whole(shape: Option<Vec<usize>>) -> Decision {
        Decision::Compute(ComputeSpec { shape, dtype: None, kernel: None, extra_bytes: 0 })
    }
    pub fn streamed(shape: Option<Vec<usize>>, kernel: Arc<dyn ChunkKernel>) -> Decision {
        Decision::Compute(ComputeSpec { shape, dtype: None, kernel: Some(kernel), extra_bytes: 0 })
    }
}

/// Where a chunk is, for kernels that call out (JavaScript methods).
pub struct Chunk<'a> {
    pub key: &'a str,
    pub shape: &'a [usize],
    pub offset: usize,
    pub node: NodeRef,
    pub host_context: u64,
}

/// The node a method runs for: its index in the finalized recipe and in the source form the
/// user wrote (JSON node index or `.mecha` instruction), and its cache identity
/// ([`crate::recipe::Recipe::cache_identities`]).
#[derive(Copy, Clone, Debug)]
pub struct NodeRef {
    pub index: NodeId,
    pub source: Option<usize>,
    pub identity: u64,
}

/// Elementwise math over one chunk (or a whole tensor): every slice operand has `out.len()`
/// elements, scalars are broadcast. `out` arrives with arbitrary contents (a reused buffer):
/// write every element. Declare builtins with [`chunk_kernel!`].
pub trait ChunkKernel: Send + Sync {
    fn apply_f32(&self, chunk: &Chunk, x: &[Operand<f32>], out: &mut [f32]) -> Result<()>;
    fn apply_f64(&self, chunk: &Chunk, x: &[Operand<f64>], out: &mut [f64]) -> Result<()>;
}

/// Implements [`ChunkKernel`] for `$ty` with a generic function
/// `fn<T: Real>(&$ty, &[Operand<T>], &mut [T])`, compiled twice: for AVX2+FMA (used when the
/// CPU has them) and for the baseline. The function must be `#[inline(always)]` so that its
/// loops are compiled inside the AVX2 copy (a call across the boundary stays scalar).
#[macro_export]
macro_rules! chunk_kernel {
    ($ty:ty => $f:path) => {
        impl $crate::methods::seam::ChunkKernel for $ty {
            fn apply_f32(
                &self,
                _: &$crate::methods::seam::Chunk,
                x: &[$crate::kernels::Operand<f32>],
                out: &mut [f32],
            ) -> $crate::error::Result<()> {
                $crate::chunk_kernel!(@dispatch self, x, out, f32, $ty, $f);
                Ok(())
            }
            fn apply_f64(
                &self,
                _: &$crate::methods::seam::Chunk,
                x: &[$crate::kernels::Operand<f64>],
                out: &mut [f64],
            ) -> $crate::error::Result<()> {
                $crate::chunk_kernel!(@dispatch self, x, out, f64, $ty, $f);
                Ok(())
            }
        }
    };
    (@dispatch $s:ident, $x:ident, $out:ident, $t:ty, $ty:ty, $f:path) => {
        #[cfg(target_arch = "x86_64")]
        if $crate::kernels::has_avx2_fma() {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast(k: &$ty, x: &[$crate::kernels::Operand<$t>], out: &mut [$t]) {
                $f(k, x, out)
            }
            // SAFETY: the CPU supports the enabled features (checked above).
            unsafe { fast($s, $x, $out) };
            return Ok(());
        }
        $f($s, $x, $out)
    };
}

/// A whole-tensor argument or result.
#[derive(Clone, Debug)]
pub enum Arg {
    Tensor(Tensor),
    /// A number, text or null (hyper-parameters, broadcast values).
    Value(Scalar),
}

pub type Output = Arg;

/// Per-node values kept between keys and across merges of the same recipe (SVD factors,
/// eigenbases); bounded in size by its owner.
pub trait NodeCache: Send + Sync {
    fn get(&self, node: NodeRef, key: &str, name: &str) -> Option<Arc<dyn Any + Send + Sync>>;
    fn put(&self, node: NodeRef, key: &str, name: &str, value: Arc<dyn Any + Send + Sync>, bytes: u64);
}

pub struct RunCall<'a> {
    pub method: &'a MethodSpec,
    /// The group's output keys; `run` returns one result per key, in this order.
    pub outputs: &'a [String],
    pub meta: &'a Meta,
    /// Per parameter, as planned (see [`PlanCall::args`]).
    pub args: Vec<Vec<Arg>>,
    /// The planned shape of the output that asked for this run (`None`: a value result).
    pub shape: Option<Vec<usize>>,
    pub device: &'a Device,
    pub node: NodeRef,
    pub cache: &'a dyn NodeCache,
    pub host_context: u64,
}

impl RunCall<'_> {
    pub fn key(&self) -> &str {
        &self.outputs[0]
    }
    pub fn fail(&self, message: impl fmt::Display) -> MechaError {
        MechaError::recipe(format!("{}: {message}", self.method.id)).with_key(self.key())
    }
    pub fn arg(&self, param: usize, index: usize) -> Result<&Arg> {
        self.args
            .get(param)
            .and_then(|a| a.get(index))
            .ok_or_else(|| self.fail(format!("parameter {param} has no argument {index}")))
    }
    /// A tensor argument; a broadcast number becomes a 0-D tensor.
    pub fn tensor(&self, param: usize, index: usize) -> Result<Tensor> {
        match self.arg(param, index)? {
            Arg::Tensor(t) => Ok(t.clone()),
            Arg::Value(v) => {
                let n = v.as_f64().ok_or_else(|| self.fail(format!("{} expects a tensor", self.param_name(param))))?;
                Ok(Tensor::new(n, self.device)?)
            }
        }
    }
    /// Every tensor of a varargs parameter.
    pub fn tensors(&self, param: usize) -> Result<Vec<Tensor>> {
        (0..self.args.get(param).map_or(0, Vec::len)).map(|i| self.tensor(param, i)).collect()
    }
    /// A number argument (a one-element tensor counts).
    pub fn number(&self, param: usize) -> Result<f64> {
        match self.arg(param, 0)? {
            Arg::Value(v) => v.as_f64(),
            Arg::Tensor(t) if t.elem_count() == 1 => {
                t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1()?.first().copied()
            }
            Arg::Tensor(_) => None,
        }
        .ok_or_else(|| self.fail(format!("{} expects a number", self.param_name(param))))
    }
    pub fn int(&self, param: usize) -> Result<i64> {
        match self.arg(param, 0)? {
            Arg::Value(Scalar::Int(i)) => Ok(*i),
            Arg::Value(Scalar::Bool(b)) => Ok(*b as i64),
            _ => self.number(param).map(|v| v as i64),
        }
    }
    pub fn text(&self, param: usize) -> Result<Option<String>> {
        match self.arg(param, 0)? {
            Arg::Value(Scalar::Str(s)) => Ok(Some(s.clone())),
            Arg::Value(Scalar::Null) => Ok(None),
            _ => Err(self.fail(format!("{} expects text", self.param_name(param)))),
        }
    }
    fn param_name(&self, param: usize) -> &str {
        self.method.params.get(param).map_or("?", |p| p.name.as_str())
    }
    /// A random stream for this key, derived from (seed, key): the same for any thread count.
    pub fn rng(&self, seed: u64) -> KeyRng {
        KeyRng::new(seed, self.key())
    }
    /// The random stream of a `seed: int = None` parameter. The planner replaces a null seed by
    /// a chosen one (reported and recorded in the output) before any method runs, so a null
    /// here means the method was called outside a merge.
    pub fn seed_rng(&self, param: usize) -> Result<KeyRng> {
        match self.arg(param, 0)? {
            Arg::Value(Scalar::Null) => {
                Err(self.fail(format!("{} was not chosen before the run", self.param_name(param))))
            }
            _ => Ok(self.rng(self.int(param)? as u64)),
        }
    }
}

/// A merge method's behaviour. Only `plan` is required: a method whose results are all
/// decided at plan time (forwarding, constants, streamed kernels) never runs.
pub trait Method: Send + Sync {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        Some(KeyRelation::identity(call.key, call.method.params.len()))
    }
    fn plan(&self, call: &PlanCall) -> Result<Decision>;
    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        Err(call.fail("has no whole-tensor implementation"))
    }
}

/// A deterministic random stream (SplitMix64-seeded xoshiro256**) for one key of one merge.
pub struct KeyRng {
    state: [u64; 4],
}

impl KeyRng {
    pub fn new(seed: u64, key: &str) -> KeyRng {
        // FNV-1a of the key, mixed with the seed, expanded by SplitMix64.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in key.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let mut x = seed ^ h.rotate_left(17);
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        KeyRng { state: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, 1) with 24 random bits (one f32 step), for masks compared with an f32.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Standard normal (Box–Muller; the second value is dropped so each draw uses a fixed
    /// number of words and streams stay aligned).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

impl From<candle_core::Error> for MechaError {
    fn from(e: candle_core::Error) -> MechaError {
        MechaError::recipe(format!("tensor operation failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_streams_depend_on_seed_and_key_only() {
        let draw = |seed, key| {
            let mut r = KeyRng::new(seed, key);
            (0..4).map(|_| r.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(1, "a.weight"), draw(1, "a.weight"));
        assert_ne!(draw(1, "a.weight"), draw(2, "a.weight"));
        assert_ne!(draw(1, "a.weight"), draw(1, "b.weight"));
        let mut r = KeyRng::new(7, "k");
        let mean = (0..10_000).map(|_| r.next_f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
