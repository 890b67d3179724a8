//! The streaming executor. Keys are split into work units — a batch of small keys, or one chunk
//! of a large key — run in parallel on a dedicated thread pool. Each chunk reads only its slice
//! of every input, computes, encodes and writes straight to its final place. Memory is
//! O(threads × chunk × inputs), whatever the model size, and the output bytes do not depend on
//! the thread count.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{guarded, ErrorKind, MechaError, Result};
use crate::exec::hashes::InputHashes;
use crate::exec::plan::{Compute, Exclusions, Expr, KeyPlan, Op, Plan, TensorId};
use crate::io::reader::TensorEntry;
use crate::kernels::convert::has_non_finite;
use crate::kernels::tensor::with_slice;
use crate::kernels::{Operand, Real};
use crate::methods::seam::{Arg, Chunk, ChunkKernel, NodeCache, NodeRef, Output, RunCall};
use crate::recipe::{NodeId, Scalar};

/// Elements per chunk: small enough that a chunk's buffers for several inputs stay in L2.
pub const DEFAULT_CHUNK: usize = 1 << 15;

/// Where finished bytes go: a file being written, or buffers in memory.
pub trait TensorSink: Sync {
    /// Writes bytes of planned key `key`, starting `offset` bytes into its data.
    fn write(&self, key: usize, offset: usize, bytes: &[u8]) -> Result<()>;

    /// Whether keys must be computed in plan order (a consumer takes them in that order:
    /// `exec::stream`); work units are then dispatched in order, not split among threads.
    fn ordered(&self) -> bool {
        false
    }

    /// Called before a worker takes a unit whose first key is `key` (ordered sinks only): may
    /// wait until the consumer has made room.
    fn wait_for_room(&self, _key: usize, _cancel: &AtomicBool) {}

    /// Every piece of `key` has been computed (or skipped: see `piece_skipped`).
    fn key_done(&self, _key: usize) {}

    /// A piece of `key` was not written: a method skipped the key.
    fn piece_skipped(&self, _key: usize) {}
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
    /// What methods skipped while running: (node, key asked of it) → why.
    pub skipped: Exclusions,
    /// Keys whose work unit needed more than the memory budget, so it ran alone.
    pub over_budget: Vec<usize>,
}

pub struct RunOptions<'a> {
    /// Scan input tensors for NaN and infinity (sd-mecha's `omit_non_finite_inputs`).
    pub check_inputs: bool,
    /// Scan outputs for NaN and infinity (sd-mecha's `check_finite_output`).
    pub check_outputs: bool,
    pub threads: usize,
    pub chunk: usize,
    pub cancel: &'a AtomicBool,
    pub progress: Option<&'a dyn ProgressSink>,
    pub progress_interval: Duration,
    /// Bytes of working memory the units running at once may use together.
    pub memory_budget: u64,
    pub cache: &'a dyn NodeCache,
}

/// One output of a run: its plan, where its bytes go, and what hashes its inputs' bytes as they
/// are read (for the output's `mecha_inputs`).
pub struct RunTarget<'a> {
    pub plan: &'a Plan,
    pub sink: &'a dyn TensorSink,
    pub hashes: Option<&'a InputHashes>,
    /// Passed to external (host) methods so the host can tell concurrent merges (and the
    /// outputs of one run) apart.
    pub host_context: u64,
}

/// Elements `range` of key `key` of output `target`.
#[derive(Clone, Debug)]
struct Piece {
    target: usize,
    key: usize,
    range: Range<usize>,
}

/// One unit of parallel work: pieces computed one after the other on one thread, and the bytes
/// of input they keep in the unit's read memo (0 with one output).
struct Unit {
    pieces: Vec<Piece>,
    memo_bytes: u64,
}

/// Whether a key is computed in chunks (else whole, batched with other small keys). Sub-byte
/// dtypes are only ever copied whole, and whole-tensor methods need it all.
fn in_chunks(key: &KeyPlan, chunk: usize) -> bool {
    key.numel() > chunk && key.dtype.bits().is_multiple_of(8) && key.chunkable
}

/// Cuts the keys of every output into units. Keys of the same name and size in several outputs
/// (a sweep of one recipe) go into the same units, piece by piece, so that the input bytes they
/// share are read once. With one output, units are the plan's keys in order. Small keys are
/// batched while large ones go by; `ordered` flushes the batch first, so that units are in key
/// order (`run_in_order`).
fn units(targets: &[RunTarget], chunk: usize, file_ids: &[Vec<usize>], ordered: bool) -> (Vec<Unit>, Vec<Vec<usize>>) {
    let mut pieces: Vec<Vec<usize>> = targets.iter().map(|t| vec![0usize; t.plan.keys.len()]).collect();
    let key_of = |(t, k): (usize, usize)| &targets[t].plan.keys[k];
    let mut groups: Vec<Vec<(usize, usize)>> = vec![];
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (t, target) in targets.iter().enumerate() {
        for (k, key) in target.plan.keys.iter().enumerate() {
            let joins = by_name.get(key.name.as_str()).copied().filter(|&g| {
                let first = key_of(groups[g][0]);
                first.numel() == key.numel() && in_chunks(first, chunk) == in_chunks(key, chunk)
            });
            match joins {
                Some(g) => groups[g].push((t, k)),
                None => {
                    by_name.insert(key.name.as_str(), groups.len());
                    groups.push(vec![(t, k)]);
                }
            }
        }
    }
    // What one piece of each group keeps in the memo: its members' distinct input reads.
    let memo_bytes = |group: &[(usize, usize)], elements: usize| -> u64 {
        if targets.len() == 1 {
            return 0;
        }
        let mut seen = HashSet::new();
        let mut bytes = 0;
        for &(t, k) in group {
            for (input, entry, len) in key_of((t, k)).source_reads(elements) {
                if seen.insert((file_ids[t][input], entry.shard, entry.start)) {
                    bytes += len;
                }
            }
        }
        bytes
    };
    let mut out = vec![];
    let mut batch = Unit { pieces: vec![], memo_bytes: 0 };
    let mut batch_len = 0;
    for group in &groups {
        let n = key_of(group[0]).numel();
        if !in_chunks(key_of(group[0]), chunk) {
            for &(t, k) in group {
                batch.pieces.push(Piece { target: t, key: k, range: 0..n });
                pieces[t][k] = 1;
                batch_len += n.max(1);
            }
            batch.memo_bytes += memo_bytes(group, n);
            if batch_len >= chunk {
                out.push(std::mem::replace(&mut batch, Unit { pieces: vec![], memo_bytes: 0 }));
                batch_len = 0;
            }
        } else {
            if ordered && !batch.pieces.is_empty() {
                out.push(std::mem::replace(&mut batch, Unit { pieces: vec![], memo_bytes: 0 }));
                batch_len = 0;
            }
            let count = n.div_ceil(chunk);
            for &(t, k) in group {
                pieces[t][k] = count;
            }
            let memo = memo_bytes(group, chunk);
            out.extend((0..count).map(|c| {
                Unit {
                    pieces: group
                        .iter()
                        .map(|&(t, k)| Piece { target: t, key: k, range: c * chunk..((c + 1) * chunk).min(n) })
                        .collect(),
                    memo_bytes: memo,
                }
            }));
        }
    }
    if !batch.pieces.is_empty() {
        out.push(batch);
    }
    (out, pieces)
}

/// Gives the inputs of all outputs one numbering, a file read by several outputs one number (so
/// their reads of it share the memo). Files in memory are never shared.
fn shared_file_ids(targets: &[RunTarget]) -> Vec<Vec<usize>> {
    let mut ids: HashMap<std::path::PathBuf, usize> = HashMap::new();
    let mut next = 0;
    targets
        .iter()
        .map(|t| {
            t.plan
                .inputs()
                .iter()
                .map(|file| {
                    let fresh = {
                        next += 1;
                        next - 1
                    };
                    if file.in_memory() {
                        fresh
                    } else {
                        *ids.entry(file.path().to_path_buf()).or_insert(fresh)
                    }
                })
                .collect()
        })
        .collect()
}

pub fn auto_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs one plan, writing to `target`'s sink.
pub fn run(target: RunTarget, options: &RunOptions) -> Result<RunStats> {
    Ok(run_many(&[target], options)?.pop().expect("one output, one result"))
}

/// Runs several plans in one pass (a sweep: `exec::merge_many`): keys of the same name are
/// computed together, so an input tensor several outputs read is read once. Returns each
/// output's stats, in order.
pub fn run_many(targets: &[RunTarget], options: &RunOptions) -> Result<Vec<RunStats>> {
    // Large freed buffers are kept for the next key while this runs (see block_cache), except
    // for a stream: the tensors its consumer frees would be kept too, and its memory is the
    // point of streaming.
    let ordered = targets.iter().any(|t| t.sink.ordered());
    let _kept_blocks = crate::block_cache::merge_scope(if ordered { 0 } else { options.memory_budget });
    let threads = if options.threads == 0 { auto_threads() } else { options.threads };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("mecha-merge-{i}"))
        .build()
        .map_err(|e| MechaError::io("starting the merge threads", std::io::Error::other(e)))?;
    let chunk = options.chunk.max(1);
    let file_ids = shared_file_ids(targets);
    let (units, pieces) = units(targets, chunk, &file_ids, ordered);
    let shared_reads = targets.len() > 1;
    let tracker = Tracker {
        remaining: pieces.into_iter().map(|p| p.into_iter().map(AtomicUsize::new).collect()).collect(),
        keys_done: AtomicUsize::new(0),
        keys_total: targets.iter().map(|t| t.plan.keys.len()).sum(),
        bytes_done: AtomicU64::new(0),
        bytes_total: targets.iter().map(|t| t.plan.output_bytes()).sum(),
        started: Instant::now(),
        last_report: Mutex::new(None),
        sink: options.progress,
        interval: options.progress_interval,
    };
    let workers: Vec<Worker> = targets
        .iter()
        .zip(file_ids)
        .map(|(target, file_ids)| Worker {
            plan: target.plan,
            sink: target.sink,
            file_ids,
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            host_context: target.host_context,
            check_inputs: options.check_inputs,
            check_outputs: options.check_outputs,
            cache: options.cache,
            hashes: target.hashes,
            non_finite_inputs: Mutex::new(HashSet::new()),
            non_finite_outputs: (0..target.plan.keys.len()).map(|_| AtomicBool::new(false)).collect(),
            skipped: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            over_budget: Mutex::new(vec![]),
        })
        .collect();
    let budget = Budget::new(options.memory_budget);
    // Once per key, not per chunk: walking a key's expression for every one of SDXL's ~100 K
    // chunks adds up.
    let key_bytes: Vec<Vec<u64>> =
        targets.iter().map(|t| (0..t.plan.keys.len()).map(|k| t.plan.unit_bytes(k, chunk)).collect()).collect();
    // Units are admitted against the budget, so a large one waits for memory rather than
    // running beside others; one larger than the whole budget runs alone.
    // One scratch per thread for the whole merge, so whole-tensor keys reuse the pages of the
    // previous key instead of faulting in fresh ones (on SD 1.5 TIES, zeroing new pages was a
    // fifth of the time). A thread that picks up a unit while its own is busy (nested rayon
    // work steals) takes a fresh one.
    let scratches: Vec<Mutex<Scratch>> = (0..threads).map(|_| Mutex::default()).collect();
    let retain = (options.memory_budget / 8 / threads as u64) as usize;
    let run_unit = |unit: &Unit| -> Result<()> {
        {
            let mut own = rayon::current_thread_index().and_then(|i| scratches.get(i)).and_then(|m| m.try_lock().ok());
            let mut fresh = Scratch::default();
            let scratch = match own.as_deref_mut() {
                Some(s) => s,
                None => &mut fresh,
            };
            scratch.memo.enabled = shared_reads;
            // Pieces run one after the other; the memo holds the unit's reads throughout.
            let need = unit.pieces.iter().map(|p| key_bytes[p.target][p.key]).max().unwrap_or(0) + unit.memo_bytes;
            let alone = budget.acquire(need, options.cancel);
            if alone {
                for p in &unit.pieces {
                    workers[p.target].over_budget.lock().expect("budget lock").push(p.key);
                }
            }
            // One guard per unit (not per chunk): a panic in a kernel or the executor becomes an
            // error, and the unit's budget is released below either way.
            let result = guarded("the merge executor", || {
                for Piece { target, key: k, range } in &unit.pieces {
                    if options.cancel.load(Ordering::Relaxed) {
                        return Err(MechaError::aborted());
                    }
                    let (worker, key) = (&workers[*target], &targets[*target].plan.keys[*k]);
                    let written = match worker.compute_piece(*k, range.clone(), scratch) {
                        Ok(w) => w,
                        Err(e) if e.kind == ErrorKind::KeySkipped => {
                            worker.sink.piece_skipped(*k); // re-planned without it
                            0
                        }
                        Err(e) if e.key.is_none() => return Err(e.with_key(&key.name)),
                        Err(e) => return Err(e),
                    };
                    worker.bytes_written.fetch_add(written, Ordering::Relaxed);
                    if tracker.piece_done(*target, *k, &key.name, written) {
                        worker.sink.key_done(*k);
                    }
                }
                Ok(())
            });
            scratch.memo.clear(chunk * 8, 16);
            budget.release(need);
            scratch.shrink(chunk, retain);
            result
        }
    };
    if ordered {
        run_in_order(&pool, threads, &units, targets, options.cancel, &run_unit)?;
    } else {
        pool.install(|| units.par_iter().try_for_each(run_unit))?;
    }
    let last = targets.last().and_then(|t| t.plan.keys.last()).map_or("", |k| k.name.as_str());
    tracker.report(true, last);
    Ok(workers.into_iter().map(Worker::into_stats).collect())
}

/// Runs the units in plan order for ordered sinks: each of `threads` workers takes the next unit
/// (so every unit before the one a consumer waits for has been taken and is finishing), waiting
/// for the sinks' room first. Stops at the first error.
fn run_in_order(
    pool: &rayon::ThreadPool,
    threads: usize,
    units: &[Unit],
    targets: &[RunTarget],
    cancel: &AtomicBool,
    run_unit: &(dyn Fn(&Unit) -> Result<()> + Sync),
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<MechaError>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    pool.scope(|s| {
        for _ in 0..threads {
            s.spawn(|_| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) || i >= units.len() {
                    break;
                }
                let unit = &units[i];
                for piece in unit.pieces.iter().take(1) {
                    targets[piece.target].sink.wait_for_room(piece.key, cancel);
                }
                if let Err(e) = run_unit(unit) {
                    failed.lock().expect("order lock").get_or_insert(e);
                    stop.store(true, Ordering::SeqCst);
                    break;
                }
            });
        }
    });
    failed.into_inner().expect("order lock").map_or(Ok(()), Err)
}

/// Bytes of working memory in use. Small units (chunks, batches of small keys) are admitted
/// without locking; a unit larger than an eighth of the budget waits until it fits (or nothing
/// else runs), and small units wait behind it so it is not starved.
struct Budget {
    limit: u64,
    in_use: AtomicU64,
    /// Units waiting for room, and how many of them are large.
    waiting: AtomicUsize,
    large_waiting: AtomicUsize,
    lock: Mutex<()>,
    changed: std::sync::Condvar,
}

impl Budget {
    fn new(limit: u64) -> Budget {
        Budget {
            limit: limit.max(1),
            in_use: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            large_waiting: AtomicUsize::new(0),
            lock: Mutex::new(()),
            changed: std::sync::Condvar::new(),
        }
    }

    /// Waits until `need` bytes fit. Returns whether the unit is larger than the whole budget
    /// (it then ran alone).
    fn acquire(&self, need: u64, cancel: &AtomicBool) -> bool {
        let small = need <= self.limit / 8;
        if small && self.waiting.load(Ordering::SeqCst) == 0 {
            self.in_use.fetch_add(need, Ordering::SeqCst);
            return false;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        if !small {
            self.large_waiting.fetch_add(1, Ordering::SeqCst);
        }
        let mut guard = self.lock.lock().expect("budget lock");
        loop {
            let in_use = self.in_use.load(Ordering::SeqCst);
            // Small units let a waiting large one go first.
            let turn = !small || self.large_waiting.load(Ordering::SeqCst) == 0;
            if (turn && in_use + need <= self.limit) || in_use == 0 || cancel.load(Ordering::Relaxed) {
                self.in_use.fetch_add(need, Ordering::SeqCst);
                break;
            }
            guard = self.changed.wait_timeout(guard, Duration::from_millis(20)).expect("budget lock").0;
        }
        drop(guard);
        if !small {
            self.large_waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_all();
        need > self.limit
    }

    fn release(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().expect("budget lock");
            self.changed.notify_all();
        }
    }
}

struct Tracker<'a> {
    /// Pieces left of each output's keys.
    remaining: Vec<Vec<AtomicUsize>>,
    keys_done: AtomicUsize,
    keys_total: usize,
    bytes_done: AtomicU64,
    bytes_total: u64,
    started: Instant,
    last_report: Mutex<Option<Instant>>,
    sink: Option<&'a dyn ProgressSink>,
    interval: Duration,
}

impl Tracker<'_> {
    /// Counts a finished piece; whether it was the key's last.
    fn piece_done(&self, target: usize, key: usize, name: &str, bytes: u64) -> bool {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        let last = self.remaining[target][key].fetch_sub(1, Ordering::AcqRel) == 1;
        if last {
            self.keys_done.fetch_add(1, Ordering::Relaxed);
            self.report(false, name);
        }
        last
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
    memo: ReadMemo,
}

/// Which bytes a read took: (shared file id, shard, tensor data start, offset, length).
type ReadId = (usize, usize, usize, usize, usize);

/// The input bytes one work unit has read, kept while it runs so that the same key of another
/// output (`run_many`) takes them instead of reading the file again. Off with one output.
#[derive(Default)]
struct ReadMemo {
    enabled: bool,
    reads: HashMap<ReadId, Vec<u8>>,
    /// Chunk-sized buffers of earlier units, reused (whole tensors' are freed).
    spare: Vec<Vec<u8>>,
}

impl ReadMemo {
    fn get(&self, id: &ReadId) -> Option<&[u8]> {
        if !self.enabled {
            return None;
        }
        self.reads.get(id).map(Vec::as_slice)
    }

    fn put(&mut self, id: ReadId, bytes: &[u8]) {
        if !self.enabled {
            return;
        }
        let mut copy = self.spare.pop().unwrap_or_default();
        copy.clear();
        copy.extend_from_slice(bytes);
        self.reads.insert(id, copy);
    }

    /// Forgets the unit's reads, keeping up to `keep` of the buffers of at most `small` bytes.
    fn clear(&mut self, small: usize, keep: usize) {
        for (_, b) in self.reads.drain() {
            if b.capacity() <= small && self.spare.len() < keep {
                self.spare.push(b);
            }
        }
    }
}

impl Scratch {
    /// Keeps buffers grown for whole tensors only up to `retain` bytes (the largest first, which
    /// serve any smaller key), so one large key does not keep its memory beyond that.
    fn shrink(&mut self, chunk: usize, retain: usize) {
        let small = chunk * 4;
        let mut left = retain;
        fn keep_within<T>(pool: &mut Vec<Vec<T>>, small: usize, left: &mut usize) {
            pool.sort_by_key(|b| b.capacity()); // `take` pops the largest
            let mut kept: Vec<Vec<T>> = Vec::with_capacity(pool.len());
            for b in pool.drain(..).rev() {
                let bytes = b.capacity() * std::mem::size_of::<T>();
                if b.capacity() <= small {
                    kept.push(b);
                } else if bytes <= *left {
                    *left -= bytes;
                    kept.push(b);
                }
            }
            kept.reverse();
            *pool = kept;
        }
        keep_within(&mut self.f32s, small, &mut left);
        keep_within(&mut self.f64s, small, &mut left);
        for bytes in [&mut self.raw, &mut self.bytes] {
            if bytes.capacity() > small * 8 {
                if bytes.capacity() <= left {
                    left -= bytes.capacity();
                } else {
                    *bytes = Vec::new();
                }
            }
        }
    }
}

trait Pool<T> {
    fn take(&mut self, len: usize) -> Vec<T>;
    fn give(&mut self, buf: Vec<T>);
}

macro_rules! pool_impl {
    ($t:ty, $field:ident) => {
        impl Pool<$t> for Scratch {
            /// A buffer of `len` elements with arbitrary contents: every caller overwrites all
            /// of them (decoding, copies, kernels, which must write each element), so only a
            /// grown part is filled; zeroing it all each time cost ~10 % of a cached SVD merge.
            fn take(&mut self, len: usize) -> Vec<$t> {
                let mut v = self.$field.pop().unwrap_or_default();
                if v.len() >= len {
                    v.truncate(len);
                } else {
                    v.resize(len, 0.0);
                }
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

/// A compute type the executor runs in: a kernel float that candle also knows.
trait Num: Real + WithDType {
    fn apply(kernel: &dyn ChunkKernel, chunk: &Chunk, x: &[Operand<Self>], out: &mut [Self]) -> Result<()>;
}

impl Num for f32 {
    fn apply(kernel: &dyn ChunkKernel, chunk: &Chunk, x: &[Operand<f32>], out: &mut [f32]) -> Result<()> {
        kernel.apply_f32(chunk, x, out)
    }
}

impl Num for f64 {
    fn apply(kernel: &dyn ChunkKernel, chunk: &Chunk, x: &[Operand<f64>], out: &mut [f64]) -> Result<()> {
        kernel.apply_f64(chunk, x, out)
    }
}

enum Val<T> {
    Scalar(T),
    Buf(Vec<T>),
    /// A whole tensor computed by a method.
    Tensor(Tensor),
    /// A value that is not a number (text, null).
    Value(Scalar),
}

/// A multi-output group: (node, its first output key).
type GroupId = (NodeId, String);

/// The outputs of one run of a multi-output method, kept until every key that reads them has.
struct GroupSlot {
    outputs: Option<Vec<Output>>,
    taken: usize,
}

/// What every work unit of one run shares.
struct Worker<'a> {
    plan: &'a Plan,
    sink: &'a dyn TensorSink,
    /// Each plan input's number among the inputs of all outputs (see `shared_file_ids`).
    file_ids: Vec<usize>,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    host_context: u64,
    check_inputs: bool,
    check_outputs: bool,
    cache: &'a dyn NodeCache,
    hashes: Option<&'a InputHashes>,
    non_finite_inputs: Mutex<HashSet<TensorId>>,
    non_finite_outputs: Vec<AtomicBool>,
    skipped: Mutex<HashMap<(NodeId, String), String>>,
    groups: Mutex<HashMap<GroupId, Arc<Mutex<GroupSlot>>>>,
    over_budget: Mutex<Vec<usize>>,
}

impl Worker<'_> {
    /// Computes elements `range` of key `k` and writes them. Returns the bytes written.
    fn compute_piece(&self, k: usize, range: Range<usize>, scratch: &mut Scratch) -> Result<u64> {
        let (sink, key) = (self.sink, &self.plan.keys[k]);
        let out_width = key.dtype.bits() / 8;
        if let Some((input, entry)) = key.passthrough() {
            // Same dtype in and out: copy bytes, no decoding.
            let (start, len) = if entry.dtype.bits() % 8 == 0 {
                let width = entry.dtype.bits() / 8;
                (range.start * width, range.len() * width)
            } else {
                (0, entry.byte_len) // sub-byte dtypes arrive as one whole piece
            };
            let mut raw = std::mem::take(&mut scratch.raw);
            raw.resize(len, 0);
            let result = self
                .read_input(input, entry, start, &mut raw, &mut scratch.memo)
                .and_then(|()| sink.write(k, start, &raw));
            if result.is_ok() && (self.check_inputs || self.check_outputs) && has_non_finite(entry.dtype, &raw) {
                self.found_non_finite_input(k, input, entry);
                self.non_finite_outputs[k].store(true, Ordering::Relaxed);
            }
            scratch.raw = raw;
            result?;
            return Ok(len as u64);
        }
        // Sized when the result is encoded, so a whole-tensor key never holds it while computing.
        let mut out = std::mem::take(&mut scratch.bytes);
        let evaluated = match key.compute {
            Compute::F32 => self.evaluate::<f32>(k, range.clone(), scratch, &mut out),
            Compute::F64 => self.evaluate::<f64>(k, range.clone(), scratch, &mut out),
        };
        let result = evaluated.and_then(|()| sink.write(k, range.start * out_width, &out));
        scratch.bytes = out;
        result.map(|()| (range.len() * out_width) as u64)
    }

    /// Reads `raw.len()` bytes of `entry`'s data from `offset` in plan input `input`: from the
    /// unit's memo when another output's key has just read them, else from the file (and into
    /// the memo). Either way the bytes are hashed for this output.
    fn read_input(
        &self,
        input: usize,
        entry: &TensorEntry,
        offset: usize,
        raw: &mut [u8],
        memo: &mut ReadMemo,
    ) -> Result<()> {
        let id = (self.file_ids[input], entry.shard, entry.start, offset, raw.len());
        match memo.get(&id) {
            Some(bytes) => raw.copy_from_slice(bytes),
            None => {
                self.plan.inputs()[input].read(entry, offset, raw)?;
                self.bytes_read.fetch_add(raw.len() as u64, Ordering::Relaxed);
                memo.put(id, raw);
            }
        }
        if let Some(hashes) = self.hashes {
            hashes.record(input, entry, offset, raw);
        }
        Ok(())
    }

    fn into_stats(self) -> RunStats {
        let keys = self.plan.keys.len();
        let mut over_budget = self.over_budget.into_inner().expect("budget lock");
        over_budget.sort_unstable();
        over_budget.dedup();
        RunStats {
            bytes_read: self.bytes_read.into_inner(),
            bytes_written: self.bytes_written.into_inner(),
            non_finite_inputs: self.non_finite_inputs.into_inner().expect("scan lock"),
            non_finite_outputs: (0..keys).filter(|&k| self.non_finite_outputs[k].load(Ordering::Relaxed)).collect(),
            skipped: Exclusions { tensors: HashSet::new(), nodes: self.skipped.into_inner().expect("skip lock") },
            over_budget,
        }
    }

    fn evaluate<T: Num>(&self, k: usize, range: Range<usize>, scratch: &mut Scratch, out: &mut Vec<u8>) -> Result<()>
    where
        Scratch: Pool<T>,
    {
        let key = &self.plan.keys[k];
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
        // Buffers hold the chunk when streaming, else each expression's whole tensor.
        let len_of = |e: &Expr| if key.chunkable { n } else { e.numel() };

        let mut vals: Vec<Option<Val<T>>> = (0..key.exprs.len()).map(|_| None).collect();
        for (i, e) in key.exprs.iter().enumerate() {
            let broadcast = e.shape.as_ref().is_none_or(|s| s.iter().product::<usize>() == 1 && key_numel != 1);
            let val = match &e.op {
                Op::Constant(v) => match v.as_f64() {
                    Some(x) => Val::Scalar(<T as Real>::from_f64(x)),
                    None => Val::Value(v.clone()),
                },
                Op::Source { input, entry, .. } => {
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
                    let read = self.read_input(*input, entry, r.start * width, &mut raw, &mut scratch.memo);
                    if read.is_ok() && self.check_inputs && has_non_finite(entry.dtype, &raw) {
                        self.found_non_finite_input(k, *input, entry);
                    }
                    let mut buf = scratch.take(r.len());
                    T::decode(entry.dtype, &raw, &mut buf);
                    // A whole tensor's raw bytes are not kept while the key computes.
                    scratch.raw = if key.chunkable { raw } else { Vec::new() };
                    read?;
                    if broadcast {
                        let v = buf[0];
                        scratch.give(buf);
                        Val::Scalar(v)
                    } else {
                        Val::Buf(buf)
                    }
                }
                Op::Arange => {
                    let start = if key.chunkable { range.start } else { 0 };
                    let mut buf = scratch.take(len_of(e));
                    for (i, v) in buf.iter_mut().enumerate() {
                        *v = <T as Real>::from_f64((start + i) as f64);
                    }
                    Val::Buf(buf)
                }
                Op::Round { dtype, arg } => {
                    let mut buf = scratch.take(len_of(e));
                    match vals[*arg].as_ref().expect("children evaluate first") {
                        Val::Scalar(v) => {
                            let mut one = [*v];
                            crate::methods::logistics::round_to(*dtype, &mut one);
                            scratch.give(buf);
                            vals[i] = Some(Val::Scalar(one[0]));
                            self.release(e, i, &last_use, &mut vals, scratch);
                            continue;
                        }
                        Val::Buf(b) => buf.copy_from_slice(b),
                        Val::Tensor(t) => with_slice(t, |s: &[T]| buf.copy_from_slice(s))?,
                        Val::Value(_) => return Err(MechaError::recipe(format!("{}: cannot round text", e.origin))),
                    }
                    crate::methods::logistics::round_to(*dtype, &mut buf);
                    Val::Buf(buf)
                }
                Op::Kernel { kernel, args, at } => {
                    // Method results arrive as whole tensors; kernels read slices.
                    for &a in args {
                        if let Some(Val::Tensor(t)) = &vals[a] {
                            let copy = with_slice(t, |s: &[T]| {
                                let mut copy = scratch.take(s.len());
                                copy.copy_from_slice(s);
                                copy
                            })?;
                            vals[a] = Some(if copy.len() == 1 && len_of(e) != 1 {
                                Val::Scalar(copy[0])
                            } else {
                                Val::Buf(copy)
                            });
                        }
                    }
                    let mut result = scratch.take(len_of(e));
                    let operands: Vec<Operand<T>> = args
                        .iter()
                        .map(|&a| match vals[a].as_ref().expect("children evaluate first") {
                            Val::Scalar(v) => Operand::Scalar(*v),
                            Val::Buf(b) => Operand::Slice(b.as_slice()),
                            Val::Tensor(_) | Val::Value(_) => Operand::Scalar(T::ZERO),
                        })
                        .collect();
                    let chunk = Chunk {
                        key: &at.1,
                        shape: e.shape.as_deref().unwrap_or(&[]),
                        offset: if key.chunkable { range.start } else { 0 },
                        node: at.0,
                        host_context: self.host_context,
                    };
                    if let Err(err) = T::apply(kernel.as_ref(), &chunk, &operands, &mut result) {
                        return Err(self.note_skip(err, at));
                    }
                    drop(operands);
                    Val::Buf(result)
                }
                Op::Method { method, args, group, index, at, .. } => {
                    // Buffers read for the last time move into the tensors, without a copy.
                    for &a in args.iter().flatten() {
                        if last_use[a] == i {
                            if let Some(Val::Buf(b)) = &vals[a] {
                                if b.len() == key.exprs[a].numel() && key.exprs[a].shape.is_some() {
                                    let Some(Val::Buf(b)) = vals[a].take() else { unreachable!() };
                                    let shape = key.exprs[a].shape.clone().unwrap_or_default();
                                    vals[a] = Some(Val::Tensor(Tensor::from_vec(b, shape, &Device::Cpu)?));
                                }
                            }
                        }
                    }
                    let call_args = args
                        .iter()
                        .map(|ids| {
                            ids.iter()
                                .map(|&a| {
                                    self.whole_arg(&key.exprs[a], vals[a].as_ref().expect("children evaluate first"))
                                })
                                .collect::<Result<Vec<_>>>()
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let call = RunCall {
                        method,
                        outputs: &group.outputs,
                        meta: &group.meta,
                        args: call_args,
                        shape: e.shape.clone(),
                        device: &Device::Cpu,
                        node: at.0,
                        cache: self.cache,
                        host_context: self.host_context,
                    };
                    let output = match self.run_group(call, at.0, *index) {
                        Ok(o) => o,
                        Err(err) => return Err(self.note_skip(err, at)),
                    };
                    match output {
                        Arg::Tensor(t) => {
                            if t.elem_count() != e.numel() {
                                return Err(MechaError::recipe(format!(
                                    "{} returned shape {:?} for key \"{}\", but {:?} was planned",
                                    method.id,
                                    t.dims(),
                                    at.1,
                                    e.shape
                                )));
                            }
                            Val::Tensor(t)
                        }
                        Arg::Value(v) => match v.as_f64() {
                            Some(x) if e.numeric => Val::Scalar(<T as Real>::from_f64(x)),
                            _ => Val::Value(v),
                        },
                    }
                }
            };
            vals[i] = Some(val);
            self.release(e, i, &last_use, &mut vals, scratch);
        }
        out.resize(n * (key.dtype.bits() / 8), 0);
        match vals[key.root].take().expect("root evaluated") {
            Val::Buf(b) => {
                T::encode(key.dtype, &b, out);
                scratch.give(b);
            }
            Val::Tensor(t) => with_slice(&t, |s: &[T]| T::encode(key.dtype, s, out))?,
            Val::Scalar(v) => {
                let mut buf = scratch.take(n);
                buf.fill(v);
                T::encode(key.dtype, &buf, out);
                scratch.give(buf);
            }
            Val::Value(_) => return Err(MechaError::recipe("the recipe's result is a text value, not tensors")),
        }
        if self.check_outputs && has_non_finite(key.dtype, out) {
            self.non_finite_outputs[k].store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Releases the operands of expression `i` whose last reader it was.
    fn release<T>(&self, e: &Expr, i: usize, last_use: &[usize], vals: &mut [Option<Val<T>>], scratch: &mut Scratch)
    where
        Scratch: Pool<T>,
    {
        for c in e.op.operands() {
            if last_use[c] == i {
                if let Some(Val::Buf(b)) = vals[c].take() {
                    scratch.give(b);
                } // other values (tensors) are dropped here
            }
        }
    }

    /// An executor value as a method argument: tensors keep their planned shape; a number
    /// planned as a tensor (a fill) is expanded to one.
    fn whole_arg<T: Num>(&self, e: &Expr, v: &Val<T>) -> Result<Arg> {
        let shape = e.shape.clone().unwrap_or_default();
        Ok(match v {
            Val::Value(s) => Arg::Value(s.clone()),
            Val::Scalar(x) => match (&e.op, &e.shape) {
                (Op::Constant(s), None) => Arg::Value(s.clone()),
                (_, None) => Arg::Value(Scalar::Float(Real::to_f64(*x))),
                (_, Some(_)) => Arg::Tensor(Tensor::from_vec(vec![*x; e.numel()], shape, &Device::Cpu)?),
            },
            Val::Buf(b) => Arg::Tensor(Tensor::from_slice(b, shape, &Device::Cpu)?),
            Val::Tensor(t) => Arg::Tensor(t.clone()),
        })
    }

    /// Runs a method, or for a multi-output group, takes this key's output from the one run
    /// the group has (whichever key asked first ran it).
    fn run_group(&self, call: RunCall, node: NodeRef, index: usize) -> Result<Output> {
        if call.outputs.len() == 1 {
            let (method, id) = (call.method.implementation.clone(), call.method.id.clone());
            let outputs = guarded(&id, || method.run(call))?;
            return outputs.into_iter().next().ok_or_else(|| MechaError::recipe(format!("{id} returned nothing")));
        }
        let id = (node.index, call.outputs[0].clone());
        let uses = self.plan.group_uses.get(&id).copied().unwrap_or(1);
        let slot = self
            .groups
            .lock()
            .expect("group lock")
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Mutex::new(GroupSlot { outputs: None, taken: 0 })))
            .clone();
        let mut slot = slot.lock().expect("group lock");
        if slot.outputs.is_none() {
            let (count, id_name) = (call.outputs.len(), call.method.id.clone());
            let method = call.method.implementation.clone();
            let outputs = guarded(&id_name, || method.run(call))?;
            if outputs.len() != count {
                return Err(MechaError::recipe(format!(
                    "{id_name} returned {} results for {count} keys",
                    outputs.len()
                )));
            }
            slot.outputs = Some(outputs);
        }
        let output = slot.outputs.as_ref().expect("computed above")[index].clone();
        slot.taken += 1;
        if slot.taken >= uses {
            self.groups.lock().expect("group lock").remove(&id);
        }
        Ok(output)
    }

    /// A method that skipped its key at run time is remembered for the next planning pass.
    fn note_skip(&self, err: MechaError, at: &(NodeRef, String)) -> MechaError {
        if err.kind == ErrorKind::KeySkipped {
            self.skipped.lock().expect("skip lock").insert((at.0.index, at.1.clone()), err.message.clone());
        }
        err
    }

    /// Notes an input tensor holding NaN or infinity, read for key `k`. When such inputs are left
    /// out (`check_inputs`), the key will be planned again without it: its bytes now are not the
    /// output's (a streaming consumer must not get them).
    fn found_non_finite_input(&self, k: usize, input: usize, entry: &TensorEntry) {
        if self.check_inputs {
            self.sink.piece_skipped(k);
        }
        self.non_finite_inputs.lock().expect("scan lock").insert((input, entry.start));
    }
}
