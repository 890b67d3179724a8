//! The streaming executor. Keys are split into work units — a batch of small keys, or one chunk
//! of a large key — run in parallel on a dedicated thread pool. Each chunk reads only its slice
//! of every input, computes, encodes and writes straight to its final place. Memory is
//! O(threads × chunk × inputs), whatever the model size, and the output bytes do not depend on
//! the thread count.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{MechaError, Result};
use crate::exec::plan::{Compute, Expr, ExprId, ExternalOperand, Op, Plan, TensorId};
use crate::io::reader::TensorEntry;
use crate::kernels::convert::has_non_finite;
use crate::kernels::{Operand, Real};
use crate::methods::{ExternalArg, ExternalCall, ExternalMethod};

/// Elements per chunk: small enough that a chunk's buffers for several inputs stay in L2.
pub const DEFAULT_CHUNK: usize = 1 << 15;

/// Where finished bytes go: a file being written, or buffers in memory.
pub trait TensorSink: Sync {
    /// Writes bytes of planned key `key`, starting `offset` bytes into its data.
    fn write(&self, key: usize, offset: usize, bytes: &[u8]) -> Result<()>;
}

#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub keys_done: usize,
    pub keys_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub elapsed_seconds: f64,
    /// The key that just finished.
    pub key: String,
}

/// Receives progress; calls are coalesced (at most one per interval, plus a final one).
pub trait ProgressSink: Sync {
    fn report(&self, progress: &Progress);
}

#[derive(Clone, Debug, Default)]
pub struct RunStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Input tensors found to hold NaN or infinity (when checked).
    pub non_finite_inputs: HashSet<TensorId>,
    /// Keys whose output holds NaN or infinity (when checked), by index in the plan.
    pub non_finite_outputs: Vec<usize>,
}

pub struct RunOptions<'a> {
    /// Scan input tensors for NaN and infinity (sd-mecha's `omit_non_finite_inputs`).
    pub check_inputs: bool,
    /// Scan outputs for NaN and infinity (sd-mecha's `check_finite_output`).
    pub check_outputs: bool,
    pub threads: usize,
    pub chunk: usize,
    /// Passed to external (host) methods so the host can tell concurrent merges apart.
    pub host_context: u64,
    pub cancel: &'a AtomicBool,
    pub progress: Option<&'a dyn ProgressSink>,
    pub progress_interval: Duration,
}

/// One unit of parallel work: element ranges of keys.
type Unit = Vec<(usize, Range<usize>)>;

fn units(plan: &Plan, chunk: usize) -> (Vec<Unit>, Vec<usize>) {
    let mut out = vec![];
    let mut pieces = vec![0usize; plan.keys.len()];
    let mut batch: Unit = vec![];
    let mut batch_len = 0;
    for (k, key) in plan.keys.iter().enumerate() {
        let n = key.numel();
        // Sub-byte dtypes are only ever copied whole, and whole-tensor methods need it all.
        if n <= chunk || key.dtype.bits() % 8 != 0 || !key.chunkable {
            batch.push((k, 0..n));
            pieces[k] = 1;
            batch_len += n.max(1);
            if batch_len >= chunk {
                out.push(std::mem::take(&mut batch));
                batch_len = 0;
            }
        } else {
            let count = n.div_ceil(chunk);
            pieces[k] = count;
            out.extend((0..count).map(|c| vec![(k, c * chunk..((c + 1) * chunk).min(n))]));
        }
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    (out, pieces)
}

pub fn auto_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn run(plan: &Plan, sink: &dyn TensorSink, options: &RunOptions) -> Result<RunStats> {
    let threads = if options.threads == 0 { auto_threads() } else { options.threads };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("mecha-merge-{i}"))
        .build()
        .map_err(|e| MechaError::io("starting the merge threads", std::io::Error::other(e)))?;
    let (units, pieces) = units(plan, options.chunk.max(1));
    let tracker = Tracker {
        remaining: pieces.into_iter().map(AtomicUsize::new).collect(),
        keys_done: AtomicUsize::new(0),
        keys_total: plan.keys.len(),
        bytes_done: AtomicU64::new(0),
        bytes_total: plan.output_bytes(),
        bytes_read: AtomicU64::new(0),
        started: Instant::now(),
        last_report: Mutex::new(None),
        sink: options.progress,
        interval: options.progress_interval,
    };
    let worker = Worker {
        plan,
        sink,
        bytes_read: &tracker.bytes_read,
        host_context: options.host_context,
        check_inputs: options.check_inputs,
        check_outputs: options.check_outputs,
        non_finite_inputs: Mutex::new(HashSet::new()),
        non_finite_outputs: (0..plan.keys.len()).map(|_| AtomicBool::new(false)).collect(),
    };
    pool.install(|| {
        units.par_iter().try_for_each_init(Scratch::default, |scratch, unit| {
            for (k, range) in unit {
                if options.cancel.load(Ordering::Relaxed) {
                    return Err(MechaError::aborted());
                }
                let key = &plan.keys[*k];
                let written = worker.compute_piece(*k, range.clone(), scratch).map_err(|e| {
                    if e.key.is_none() {
                        e.with_key(&key.name)
                    } else {
                        e
                    }
                })?;
                tracker.piece_done(*k, &key.name, written);
            }
            Ok(())
        })
    })?;
    tracker.report(true, plan.keys.last().map_or("", |k| k.name.as_str()));
    let Worker { non_finite_inputs, non_finite_outputs, .. } = worker;
    Ok(RunStats {
        bytes_read: tracker.bytes_read.into_inner(),
        bytes_written: tracker.bytes_done.into_inner(),
        non_finite_inputs: non_finite_inputs.into_inner().expect("scan lock"),
        non_finite_outputs: (0..plan.keys.len()).filter(|&k| non_finite_outputs[k].load(Ordering::Relaxed)).collect(),
    })
}

struct Tracker<'a> {
    remaining: Vec<AtomicUsize>,
    keys_done: AtomicUsize,
    keys_total: usize,
    bytes_done: AtomicU64,
    bytes_total: u64,
    bytes_read: AtomicU64,
    started: Instant,
    last_report: Mutex<Option<Instant>>,
    sink: Option<&'a dyn ProgressSink>,
    interval: Duration,
}

impl Tracker<'_> {
    fn piece_done(&self, key: usize, name: &str, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        if self.remaining[key].fetch_sub(1, Ordering::AcqRel) == 1 {
            self.keys_done.fetch_add(1, Ordering::Relaxed);
            self.report(false, name);
        }
    }

    /// Reports at most once per interval; a worker that finds the lock taken just moves on, so
    /// a slow consumer never holds up computation. Reporting under the lock keeps the reported
    /// counts monotonic.
    fn report(&self, last: bool, name: &str) {
        let Some(sink) = self.sink else { return };
        let now = Instant::now();
        let mut guard = if last {
            self.last_report.lock().expect("progress lock")
        } else {
            match self.last_report.try_lock() {
                Ok(g) => g,
                Err(_) => return,
            }
        };
        if !last && guard.is_some_and(|t| now.duration_since(t) < self.interval) {
            return;
        }
        *guard = Some(now);
        sink.report(&Progress {
            keys_done: self.keys_done.load(Ordering::Relaxed),
            keys_total: self.keys_total,
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total,
            elapsed_seconds: now.duration_since(self.started).as_secs_f64(),
            key: name.to_string(),
        });
    }
}

/// Reusable buffers of one worker.
#[derive(Default)]
struct Scratch {
    f32s: Vec<Vec<f32>>,
    f64s: Vec<Vec<f64>>,
    /// Bytes read from an input.
    raw: Vec<u8>,
    /// Bytes encoded for the output.
    bytes: Vec<u8>,
}

trait Pool<T> {
    fn take(&mut self, len: usize) -> Vec<T>;
    fn give(&mut self, buf: Vec<T>);
}

macro_rules! pool_impl {
    ($t:ty, $field:ident) => {
        impl Pool<$t> for Scratch {
            fn take(&mut self, len: usize) -> Vec<$t> {
                let mut v = self.$field.pop().unwrap_or_default();
                v.resize(len, 0.0);
                v
            }
            fn give(&mut self, buf: Vec<$t>) {
                self.$field.push(buf);
            }
        }
    };
}
pool_impl!(f32, f32s);
pool_impl!(f64, f64s);

enum Val<T> {
    Scalar(T),
    Buf(Vec<T>),
}

fn round_to<T: Real>(dtype: DType, values: &mut [T]) {
    let width = dtype.bits() / 8;
    let mut bytes = vec![0u8; values.len() * width];
    if dtype.is_integer() {
        for v in values.iter_mut() {
            *v = T::from_f64(v.to_f64().trunc()); // torch's `.to(int)` truncates
        }
    }
    T::encode(dtype, values, &mut bytes);
    T::decode(dtype, &bytes, values);
}

/// What every work unit of one run shares.
struct Worker<'a> {
    plan: &'a Plan,
    sink: &'a dyn TensorSink,
    bytes_read: &'a AtomicU64,
    host_context: u64,
    check_inputs: bool,
    check_outputs: bool,
    non_finite_inputs: Mutex<HashSet<TensorId>>,
    non_finite_outputs: Vec<AtomicBool>,
}

impl Worker<'_> {
    /// Computes elements `range` of key `k` and writes them. Returns the bytes written.
    fn compute_piece(&self, k: usize, range: Range<usize>, scratch: &mut Scratch) -> Result<u64> {
        let (plan, sink, bytes_read, key) = (self.plan, self.sink, self.bytes_read, &self.plan.keys[k]);
        let out_width = key.dtype.bits() / 8;
        if let Some((input, entry)) = key.passthrough() {
            // Same dtype in and out: copy bytes, no decoding.
            let file = &plan.inputs()[input];
            let (start, len) = if entry.dtype.bits() % 8 == 0 {
                let width = entry.dtype.bits() / 8;
                (range.start * width, range.len() * width)
            } else {
                (0, entry.byte_len) // sub-byte dtypes arrive as one whole piece
            };
            let mut raw = std::mem::take(&mut scratch.raw);
            raw.resize(len, 0);
            let result = file.read(entry, start, &mut raw).and_then(|()| sink.write(k, start, &raw));
            if result.is_ok() && (self.check_inputs || self.check_outputs) && has_non_finite(entry.dtype, &raw) {
                self.found_non_finite_input(input, entry);
                self.non_finite_outputs[k].store(true, Ordering::Relaxed);
            }
            scratch.raw = raw;
            result?;
            bytes_read.fetch_add(len as u64, Ordering::Relaxed);
            return Ok(len as u64);
        }
        let mut out = std::mem::take(&mut scratch.bytes);
        out.resize(range.len() * out_width, 0);
        match key.compute {
            Compute::F32 => self.evaluate::<f32>(k, range.clone(), scratch, &mut out)?,
            Compute::F64 => self.evaluate::<f64>(k, range.clone(), scratch, &mut out)?,
        }
        let result = sink.write(k, range.start * out_width, &out);
        scratch.bytes = out;
        result.map(|()| (range.len() * out_width) as u64)
    }
    fn evaluate<T: Real>(&self, k: usize, range: Range<usize>, scratch: &mut Scratch, out: &mut [u8]) -> Result<()>
    where
        Scratch: Pool<T>,
    {
        let (plan, bytes_read, key) = (self.plan, self.bytes_read, &self.plan.keys[k]);
        let n = range.len();
        let key_numel = key.numel();
        // Free each buffer after its last reader.
        let mut last_use = vec![0usize; key.exprs.len()];
        for (i, e) in key.exprs.iter().enumerate() {
            for a in e.op.operands() {
                last_use[a] = i;
            }
        }
        last_use[key.root] = usize::MAX;

        let mut vals: Vec<Option<Val<T>>> = (0..key.exprs.len()).map(|_| None).collect();
        for (i, e) in key.exprs.iter().enumerate() {
            let broadcast = e.shape.as_ref().is_none_or(|s| s.iter().product::<usize>() == 1 && key_numel != 1);
            let val = match &e.op {
                Op::Constant(v) => Val::Scalar(T::from_f64(*v)),
                Op::Source { input, entry } => {
                    let file = &plan.inputs()[*input];
                    let width = entry.dtype.bits() / 8;
                    // A key computed whole reads whole inputs, whatever their shape (conversions
                    // combine differently shaped tensors); chunks read the same range of each.
                    let r = if broadcast {
                        0..1
                    } else if key.chunkable {
                        range.clone()
                    } else {
                        0..entry.numel()
                    };
                    let mut raw = std::mem::take(&mut scratch.raw);
                    raw.resize(r.len() * width, 0);
                    let read = file.read(entry, r.start * width, &mut raw);
                    if read.is_ok() && self.check_inputs && has_non_finite(entry.dtype, &raw) {
                        self.found_non_finite_input(*input, entry);
                    }
                    let mut buf = scratch.take(r.len());
                    T::decode(entry.dtype, &raw, &mut buf);
                    bytes_read.fetch_add(raw.len() as u64, Ordering::Relaxed);
                    scratch.raw = raw;
                    read?;
                    if broadcast {
                        let v = buf[0];
                        scratch.give(buf);
                        Val::Scalar(v)
                    } else {
                        Val::Buf(buf)
                    }
                }
                Op::Round { dtype, arg } => match vals[*arg].as_ref().expect("children evaluate first") {
                    Val::Scalar(v) => {
                        let mut one = [*v];
                        round_to(*dtype, &mut one);
                        Val::Scalar(one[0])
                    }
                    Val::Buf(b) => {
                        let mut buf = scratch.take(n);
                        buf.copy_from_slice(b);
                        round_to(*dtype, &mut buf);
                        Val::Buf(buf)
                    }
                },
                Op::External { method, node, args } => {
                    let len = if e.shape.is_some() { n } else { 1 };
                    let result =
                        self.call_external(method, *node, args, &vals, &key.name, e, range.start..range.start + len)?;
                    if e.shape.is_none() {
                        Val::Scalar(T::from_f64(result[0] as f64))
                    } else {
                        let mut buf = scratch.take(n);
                        for (o, v) in buf.iter_mut().zip(result) {
                            *o = T::from_f64(v as f64);
                        }
                        Val::Buf(buf)
                    }
                }
                Op::Apply { kernel, args } => {
                    let mut result = scratch.take(n);
                    {
                        let operands: Vec<Operand<T>> = args
                            .iter()
                            .map(|&a| match vals[a].as_ref().expect("children evaluate first") {
                                Val::Scalar(v) => Operand::Scalar(*v),
                                Val::Buf(b) => Operand::Slice(b.as_slice()),
                            })
                            .collect();
                        kernel.apply(&operands, &mut result);
                    }
                    Val::Buf(result)
                }
            };
            vals[i] = Some(val);
            // Release operands whose last reader was this expression.
            for c in e.op.operands() {
                if last_use[c] == i {
                    if let Some(Val::Buf(b)) = vals[c].take() {
                        scratch.give(b);
                    }
                }
            }
        }
        match vals[key.root].take().expect("root evaluated") {
            Val::Buf(b) => {
                T::encode(key.dtype, &b, out);
                scratch.give(b);
            }
            Val::Scalar(v) => {
                let mut buf = scratch.take(n);
                buf.fill(v);
                T::encode(key.dtype, &buf, out);
                scratch.give(buf);
            }
        }
        if self.check_outputs && has_non_finite(key.dtype, out) {
            self.non_finite_outputs[k].store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn found_non_finite_input(&self, input: usize, entry: &TensorEntry) {
        self.non_finite_inputs.lock().expect("scan lock").insert((input, entry.start));
    }

    /// Calls a host method with its operands' values (in f32, the hosts' type) and checks the
    /// length of what it returns.
    #[allow(clippy::too_many_arguments)]
    fn call_external<T: Real>(
        &self,
        method: &ExternalMethod,
        node: usize,
        args: &[ExternalOperand],
        vals: &[Option<Val<T>>],
        key: &str,
        expr: &Expr,
        range: Range<usize>,
    ) -> Result<Vec<f32>> {
        let (offset, len) = (range.start, range.len());
        let val = |id: ExprId| vals[id].as_ref().expect("children evaluate first");
        // f64 buffers are converted once, up front, so the call can borrow them.
        let f32s: HashMap<ExprId, std::borrow::Cow<[f32]>> = expr
            .op
            .operands()
            .into_iter()
            .filter_map(|id| match val(id) {
                Val::Buf(b) => Some((id, T::to_f32(b))),
                Val::Scalar(_) => None,
            })
            .collect();
        let arg = |id: ExprId| match val(id) {
            Val::Scalar(v) => ExternalArg::Number(v.to_f64()),
            Val::Buf(_) => ExternalArg::Tensor(&f32s[&id]),
        };
        let call_args = args
            .iter()
            .map(|a| match a {
                ExternalOperand::Tensor(id) => arg(*id),
                ExternalOperand::Tensors(ids) => ExternalArg::Tensors(ids.iter().map(|&id| arg(id)).collect()),
                ExternalOperand::Text(t) => ExternalArg::Text(t.as_deref()),
            })
            .collect();
        let shape = expr.shape.clone().unwrap_or_default();
        let call = ExternalCall {
            context: self.host_context,
            key,
            node: self.plan.finalized.recipe.source_index[node],
            shape: &shape,
            offset,
            len,
            args: call_args,
        };
        let result = method.kernel.call(call)?;
        if result.len() != len {
            return Err(MechaError::recipe(format!(
                "{} returned {} values for key \"{key}\", but {len} were expected (shape {shape:?})",
                expr.origin,
                result.len(),
            )));
        }
        Ok(result)
    }
}
