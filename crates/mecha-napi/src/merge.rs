//! Running recipes: merge (on its own thread, with progress and cancel), plan, serialize,
//! deserialize and conversions.

use crate::errors::{guarded, parse_dtype, ErrorInfo};
use mecha_core::exec::cache::MethodCache;
use mecha_core::exec::plan::{MergeDtype, PlanOptions};
use mecha_core::exec::run::{Progress, ProgressSink};
use mecha_core::exec::{MergeOptions, MergeReport, OutputTarget};
use mecha_core::recipe::spaces::RootSpace;
use mecha_core::DType;
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `None` → weight (merges); `"any"` → any space, preferring weight; `"free"` → no requirement;
/// otherwise that space.
fn root_space(strict: Option<String>) -> RootSpace {
    match strict.as_deref() {
        None => RootSpace::default(),
        Some("any") => RootSpace::Preferred,
        Some("free") => RootSpace::Free,
        Some(s) => RootSpace::Strict(s.to_string()),
    }
}

/// Serializes a JSON recipe to `.mecha` text, finalized like sd-mecha: absolute paths, solved
/// model configs and merge spaces (model headers are read).
#[napi]
pub fn serialize(env: Env, recipe_json: String, strict_merge_space: Option<String>) -> napi::Result<String> {
    let run = || -> mecha_core::Result<String> {
        let recipe = mecha_core::recipe::wire::from_json(&recipe_json)?;
        let finalized = mecha_core::exec::plan::finalize(recipe, &root_space(strict_merge_space))?;
        if finalized.has_memory_inputs() {
            return Err(mecha_core::MechaError::recipe(
                "the recipe holds an in-memory model (model(stateDict) or a tensor literal), which .mecha \
                 text cannot record (sd-mecha cannot serialize tensors either); save the tensors as a \
                 safetensors file and use model(path)",
            ));
        }
        Ok(finalized.to_mecha())
    };
    guarded(&env, "serialize", run)
}

/// Parses `.mecha` text into the JSON recipe form (node ids are the instruction order, children
/// first). Throws `ParseError` / `RecipeError` naming the line and column.
#[napi]
pub fn deserialize(env: Env, text: String) -> napi::Result<String> {
    let recipe = guarded(&env, "deserialize", || mecha_core::recipe::parse::parse(&text))?;
    Ok(mecha_core::recipe::wire::to_json(&recipe).to_string())
}

#[napi(object)]
pub struct PlanInput {
    pub path: String,
    pub config: String,
}

/// What a merge would do, decided from headers only.
#[napi(object)]
pub struct PlanInfo {
    /// Solved config of the result (`structural` for unknown architectures).
    pub config: String,
    pub merge_space: String,
    pub inputs: Vec<PlanInput>,
    pub keys: u32,
    pub output_bytes: f64,
    pub keys_skipped: Vec<SkippedKeyInfo>,
    /// Keys of the result's config, not optional, that cannot be built (strictMandatoryKeys refuses these).
    pub unbuilt_mandatory: Vec<SkippedKeyInfo>,
    pub threads: u32,
    /// Working memory of the merge threads (buffers), excluding the process itself.
    pub estimated_working_bytes: f64,
    /// Estimated peak resident memory of the process during the merge: what it uses now plus
    /// the working memory the budget admits.
    pub estimated_peak_bytes: f64,
    /// The memory budget the merge would run under.
    pub memory_budget: f64,
    /// Keys whose computation needs more than the budget, so would run alone.
    pub over_budget: Vec<String>,
    pub recipe: String,
}

/// Plans a merge without reading tensor data: configs, spaces, kept and skipped keys, memory.
#[napi]
pub fn plan(env: Env, recipe_json: String, options: NativeMergeOptions) -> napi::Result<PlanInfo> {
    let run = || -> mecha_core::Result<PlanInfo> {
        let recipe = mecha_core::recipe::wire::from_json(&recipe_json)?;
        let options = merge_options(options, Arc::new(MethodCache::new(0)))?;
        let plan = mecha_core::exec::plan::plan(recipe, &options.plan)?;
        let f = &plan.finalized;
        let threads = if options.threads == 0 { mecha_core::exec::run::auto_threads() } else { options.threads };
        let budget = mecha_core::exec::budget_or_default(options.memory_budget);
        let working = plan.estimated_working_bytes(threads, options.chunk, budget);
        let inputs = (0..f.recipe.nodes.len())
            .filter_map(|n| f.model_input[n].map(|i| (n, i)))
            .map(|(n, i)| PlanInput {
                path: f.inputs[i].path().display().to_string(),
                config: f.configs.configs[n].as_ref().map_or("", |c| c.id()).to_string(),
            })
            .collect();
        Ok(PlanInfo {
            config: f.root_config().id().to_string(),
            merge_space: f.spaces[f.recipe.root].clone().unwrap_or_default(),
            inputs,
            keys: plan.keys.len() as u32,
            output_bytes: plan.output_bytes() as f64,
            keys_skipped: skipped_infos(&plan.skipped),
            unbuilt_mandatory: skipped_infos(&plan.unbuilt_mandatory),
            threads: threads as u32,
            estimated_working_bytes: working as f64,
            estimated_peak_bytes: (mecha_core::exec::memory::current_rss_bytes() + working) as f64,
            memory_budget: budget as f64,
            over_budget: (0..plan.keys.len())
                .filter(|&k| plan.unit_bytes(k, options.chunk) > budget)
                .map(|k| plan.keys[k].name.clone())
                .collect(),
            recipe: plan.serialized.clone(),
        })
    };
    guarded(&env, "plan", run)
}

/// Cancels a running merge; checked between keys and chunks.
#[napi]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
}

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

#[napi]
impl CancelToken {
    #[napi(constructor)]
    pub fn new() -> Self {
        CancelToken { flag: Arc::new(AtomicBool::new(false)) }
    }

    #[napi]
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    #[napi(getter)]
    pub fn cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// Values merge methods compute once per node and key (SVD factors, eigenbases), kept across
/// the merges it is passed to.
#[napi]
pub struct MergeCache {
    inner: Arc<MethodCache>,
}

#[napi]
impl MergeCache {
    /// `limit_bytes`: the most it holds (the oldest entries go first); default a quarter of
    /// physical memory, at most 4 GiB.
    #[napi(constructor)]
    pub fn new(limit_bytes: Option<f64>) -> napi::Result<Self> {
        let limit = match limit_bytes {
            Some(b) if !(b.is_finite() && b >= 0.0) => {
                return Err(napi::Error::from_reason(format!(
                    "a cache limit must be a non-negative number of bytes, got {b}"
                )))
            }
            Some(b) => b as u64,
            None => mecha_core::exec::memory::default_budget(),
        };
        Ok(MergeCache { inner: Arc::new(MethodCache::new(limit)) })
    }

    #[napi(getter)]
    pub fn bytes(&self) -> f64 {
        self.inner.bytes() as f64
    }

    #[napi(getter)]
    pub fn entries(&self) -> u32 {
        self.inner.len() as u32
    }

    #[napi(getter)]
    pub fn limit_bytes(&self) -> f64 {
        self.inner.limit() as f64
    }

    #[napi]
    pub fn clear(&self) {
        self.inner.clear()
    }
}

#[napi(object)]
pub struct NativeMergeOptions {
    /// Output file; absent → tensors are returned in memory.
    pub output: Option<String>,
    /// Worker threads; 0 or absent = one per CPU.
    pub threads: Option<u32>,
    pub merge_dtype: Option<String>,
    pub output_dtype: Option<String>,
    /// Space the result must have; `"any"` accepts any (preferring weight); absent = weight.
    pub strict_merge_space: Option<String>,
    /// Elements per work chunk (tuning and tests).
    pub chunk: Option<u32>,
    /// Minimum milliseconds between progress callbacks.
    pub progress_interval_ms: Option<u32>,
    /// Passed to JavaScript merge methods with every call, to tell concurrent merges apart.
    pub context: Option<u32>,
    /// Treat input tensors holding NaN or infinity as missing (default true, as sd-mecha).
    pub omit_non_finite_inputs: Option<bool>,
    /// Report keys written with NaN or infinity (default true).
    pub check_finite_output: Option<bool>,
    /// Bytes of working memory keys computed at once may use together (default: a quarter of
    /// physical memory, at most 4 GiB).
    pub memory_budget: Option<f64>,
    /// Write `output` as a sharded checkpoint (a folder) of shards of at most this many bytes.
    pub max_shard_bytes: Option<f64>,
    /// Write a file with no tensors when no key can be produced (default false: an error).
    pub allow_empty: Option<bool>,
    /// List input keys outside the output's config among the skipped keys (default true).
    pub check_extra_keys: Option<bool>,
    /// Refuse the merge when a mandatory key of the output's config cannot be built (default false).
    pub strict_mandatory_keys: Option<bool>,
    /// What the output's `mecha_recipe` records: `relative` (paths as given; default), `absolute`, `none`.
    pub embed_recipe: Option<String>,
}

#[napi(object)]
#[derive(Clone)]
pub struct ProgressInfo {
    pub keys_done: u32,
    pub keys_total: u32,
    pub bytes_done: f64,
    pub bytes_total: f64,
    pub elapsed_seconds: f64,
    pub key: String,
}

#[napi(object)]
pub struct SkippedKeyInfo {
    pub key: String,
    pub reason: String,
}

/// A seed the merge chose for a `seed: None` parameter.
#[napi(object)]
pub struct ChosenSeedInfo {
    /// The node's index in the recipe as given (its line in `.mecha` text).
    pub node: Option<u32>,
    pub method: String,
    pub param: String,
    /// Below 2^53, so exact as a JavaScript number.
    pub seed: f64,
}

#[napi(object)]
pub struct MergeReportInfo {
    pub output: Option<String>,
    pub keys_written: u32,
    pub keys_skipped: Vec<SkippedKeyInfo>,
    /// Keys written with NaN or infinity in them.
    pub non_finite_outputs: Vec<String>,
    pub bytes_read: f64,
    pub bytes_written: f64,
    pub seconds: f64,
    /// Peak resident memory of the whole process while the merge ran.
    pub peak_rss_bytes: f64,
    pub threads: u32,
    pub memory_budget: f64,
    /// Keys that needed more working memory than the budget, so ran alone.
    pub over_budget: Vec<String>,
    pub recipe: String,
    pub seeds: Vec<ChosenSeedInfo>,
    /// Content hash of each input file, as recorded in the output's `mecha_inputs`.
    pub input_hashes: Vec<InputHashInfo>,
}

/// The content hash of one input file (xxh3-128 over its header and the tensor bytes read).
#[napi(object)]
pub struct InputHashInfo {
    /// The model path as the recipe gives it.
    pub model: String,
    /// The file it was read from.
    pub path: String,
    pub hash: String,
}

impl From<MergeReport> for MergeReportInfo {
    fn from(r: MergeReport) -> Self {
        MergeReportInfo {
            output: r.output.map(|p| p.display().to_string()),
            keys_written: r.keys_written as u32,
            keys_skipped: r.keys_skipped.into_iter().map(|s| SkippedKeyInfo { key: s.key, reason: s.reason }).collect(),
            non_finite_outputs: r.non_finite_outputs,
            bytes_read: r.bytes_read as f64,
            bytes_written: r.bytes_written as f64,
            seconds: r.seconds,
            peak_rss_bytes: r.peak_rss_bytes as f64,
            threads: r.threads as u32,
            memory_budget: r.memory_budget as f64,
            over_budget: r.over_budget,
            recipe: r.recipe,
            seeds: r
                .seeds
                .into_iter()
                .map(|s| ChosenSeedInfo {
                    node: s.node.map(|n| n as u32),
                    method: s.method,
                    param: s.param,
                    seed: s.seed as f64,
                })
                .collect(),
            input_hashes: r
                .input_hashes
                .into_iter()
                .map(|h| InputHashInfo { model: h.model, path: h.path.display().to_string(), hash: h.hash })
                .collect(),
        }
    }
}

#[napi(object, object_from_js = false)]
pub struct OutputTensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    pub data: crate::buffers::OutputBytes,
}

fn tensor_info(name: String, dtype: DType, shape: &[usize], data: Vec<u8>) -> OutputTensorInfo {
    OutputTensorInfo {
        name,
        dtype: dtype.safetensors_name().to_string(),
        shape: shape.iter().map(|&d| d as i64).collect(),
        data: crate::buffers::OutputBytes(data),
    }
}

/// A finished merge: `report` (and `tensors` for in-memory output), or `error`.
#[napi(object, object_from_js = false)]
pub struct MergeOutcome {
    pub report: Option<MergeReportInfo>,
    pub tensors: Option<Vec<OutputTensorInfo>>,
    pub error: Option<ErrorInfo>,
}

type ProgressFn = ThreadsafeFunction<ProgressInfo, (), ProgressInfo, Status, false, false, 4>;

struct JsProgress(ProgressFn);

impl ProgressSink for JsProgress {
    fn report(&self, p: &Progress) {
        // Non-blocking: when the JS side lags, the queue is full and this update is dropped.
        let _ = self.0.call(
            ProgressInfo {
                keys_done: p.keys_done as u32,
                keys_total: p.keys_total as u32,
                bytes_done: p.bytes_done as f64,
                bytes_total: p.bytes_total as f64,
                elapsed_seconds: p.elapsed_seconds,
                key: p.key.clone(),
            },
            ThreadsafeFunctionCallMode::NonBlocking,
        );
    }
}

fn skipped_infos(keys: &[mecha_core::exec::plan::SkippedKey]) -> Vec<SkippedKeyInfo> {
    keys.iter().map(|s| SkippedKeyInfo { key: s.key.clone(), reason: s.reason.clone() }).collect()
}

fn merge_options(options: NativeMergeOptions, cache: Arc<MethodCache>) -> mecha_core::Result<MergeOptions> {
    let defaults = MergeOptions::default();
    Ok(MergeOptions {
        plan: PlanOptions {
            merge_dtype: match &options.merge_dtype {
                Some(d) => MergeDtype::parse(d)?,
                None => MergeDtype::F32,
            },
            output_dtype: match &options.output_dtype {
                Some(d) => parse_dtype(d, "outputDtype")?,
                None => DType::F16,
            },
            root_space: root_space(options.strict_merge_space),
            check_extra_keys: options.check_extra_keys.unwrap_or(true),
        },
        output: match (options.output, options.max_shard_bytes) {
            (Some(_), Some(b)) if !(b.is_finite() && b >= 1.0) => {
                return Err(mecha_core::MechaError::recipe(format!(
                    "maxShardSize must be a positive number of bytes, got {b}"
                )))
            }
            (Some(p), Some(b)) => OutputTarget::Sharded { folder: PathBuf::from(p), max_shard_bytes: b as u64 },
            (Some(p), None) => OutputTarget::File(PathBuf::from(p)),
            (None, _) => OutputTarget::Memory,
        },
        threads: options.threads.unwrap_or(0) as usize,
        host_context: options.context.unwrap_or(0) as u64,
        omit_non_finite_inputs: options.omit_non_finite_inputs.unwrap_or(defaults.omit_non_finite_inputs),
        check_finite_output: options.check_finite_output.unwrap_or(defaults.check_finite_output),
        chunk: options.chunk.map_or(defaults.chunk, |c| c.max(1) as usize),
        memory_budget: match options.memory_budget {
            Some(b) if !(b.is_finite() && b >= 1.0) => {
                return Err(mecha_core::MechaError::recipe(format!(
                    "memoryBudget must be a positive number of bytes, got {b}"
                )))
            }
            Some(b) => b as u64,
            None => 0,
        },
        allow_empty: options.allow_empty.unwrap_or(false),
        strict_mandatory_keys: options.strict_mandatory_keys.unwrap_or(false),
        embed_recipe: match &options.embed_recipe {
            Some(name) => mecha_core::exec::EmbedRecipe::parse(name)?,
            None => defaults.embed_recipe,
        },
        cache,
        progress_interval: options
            .progress_interval_ms
            .map_or(defaults.progress_interval, |ms| std::time::Duration::from_millis(ms as u64)),
    })
}

/// Runs `work` on a thread of its own with the merge's cancel flag and progress sink, and
/// settles the promise with what `settle` makes of its result. A panic becomes an error (the
/// writers' drops remove any temporary file on the way out) instead of a promise left pending.
fn spawn_merge<'env, T: Send + 'static, O: ToNapiValue + Send + 'static>(
    env: &'env Env,
    what: &'static str,
    cancel: &CancelToken,
    on_progress: Option<ProgressFn>,
    work: impl FnOnce(&AtomicBool, Option<&dyn ProgressSink>) -> mecha_core::Result<T> + Send + 'static,
    settle: impl FnOnce(mecha_core::Result<T>) -> O + Send + 'static,
) -> napi::Result<Object<'env>> {
    type Settle<O> = Box<dyn FnOnce(Env) -> napi::Result<O> + Send>;
    let (deferred, promise) = env.create_deferred::<O, Settle<O>>()?;
    let flag = cancel.flag.clone();
    let progress = on_progress.map(JsProgress);
    std::thread::Builder::new()
        .name("mecha-merge".into())
        .spawn(move || {
            let result = mecha_core::error::guarded(what, || {
                crate::errors::inject_fault(what);
                work(&flag, progress.as_ref().map(|p| p as &dyn ProgressSink))
            });
            drop(progress); // release the callback so it no longer holds the event loop
            deferred.resolve(Box::new(move |_env| Ok(settle(result))));
        })
        .map_err(|e| napi::Error::from_reason(format!("cannot start the merge thread: {e}")))?;
    Ok(promise)
}

/// Runs a merge on its own threads and resolves with a `MergeOutcome` (errors are returned in
/// it, so the TypeScript layer can raise its typed error classes).
#[napi(ts_return_type = "Promise<MergeOutcome>")]
pub fn merge<'env>(
    env: &'env Env,
    recipe_json: String,
    options: NativeMergeOptions,
    cancel: &CancelToken,
    cache: &MergeCache,
    #[napi(ts_arg_type = "((progress: ProgressInfo) => void) | undefined | null")] on_progress: Option<ProgressFn>,
) -> napi::Result<Object<'env>> {
    let cache = cache.inner.clone();
    let work = move |flag: &AtomicBool, progress: Option<&dyn ProgressSink>| {
        let recipe = mecha_core::recipe::wire::from_json(&recipe_json)?;
        let options = merge_options(options, cache)?;
        mecha_core::exec::merge(recipe, &options, flag, progress)
    };
    spawn_merge(env, "merge", cancel, on_progress, work, |result| match result {
        Ok(r) => MergeOutcome {
            tensors: (r.report.output.is_none())
                .then(|| r.tensors.into_iter().map(|t| tensor_info(t.name, t.dtype, &t.shape, t.data)).collect()),
            report: Some(r.report.into()),
            error: None,
        },
        Err(e) => MergeOutcome { report: None, tensors: None, error: Some(ErrorInfo::from(&e)) },
    })
}

/// One merge of `mergeMany`: a recipe (JSON) and its output file or folder.
#[napi(object)]
pub struct NativeSweepJob {
    pub recipe: String,
    pub output: String,
    /// Write `output` as a sharded checkpoint of shards of at most this many bytes.
    pub max_shard_bytes: Option<f64>,
}

/// A finished `mergeMany`: a report per job, in order, or `error`.
#[napi(object, object_from_js = false)]
pub struct MergeManyOutcome {
    pub reports: Option<Vec<MergeReportInfo>>,
    pub error: Option<ErrorInfo>,
}

/// Merges several recipes in one pass over their inputs (`exec::merge_many`), on its own
/// thread; `options.output` is ignored (each job gives its own).
#[napi(ts_return_type = "Promise<MergeManyOutcome>")]
pub fn merge_many<'env>(
    env: &'env Env,
    jobs: Vec<NativeSweepJob>,
    options: NativeMergeOptions,
    cancel: &CancelToken,
    cache: &MergeCache,
    #[napi(ts_arg_type = "((progress: ProgressInfo) => void) | undefined | null")] on_progress: Option<ProgressFn>,
) -> napi::Result<Object<'env>> {
    let cache = cache.inner.clone();
    let work = move |flag: &AtomicBool, progress: Option<&dyn ProgressSink>| {
        let options = merge_options(NativeMergeOptions { output: None, max_shard_bytes: None, ..options }, cache)?;
        let jobs = jobs
            .into_iter()
            .map(|job| {
                let recipe = mecha_core::recipe::wire::from_json(&job.recipe)?;
                let output = match job.max_shard_bytes {
                    Some(b) if !(b.is_finite() && b >= 1.0) => {
                        return Err(mecha_core::MechaError::recipe(format!(
                            "maxShardSize must be a positive number of bytes, got {b}"
                        )))
                    }
                    Some(b) => OutputTarget::Sharded { folder: PathBuf::from(job.output), max_shard_bytes: b as u64 },
                    None => OutputTarget::File(PathBuf::from(job.output)),
                };
                Ok((recipe, output))
            })
            .collect::<mecha_core::Result<Vec<_>>>()?;
        mecha_core::exec::merge_many(jobs, &options, flag, progress)
    };
    spawn_merge(env, "mergeMany", cancel, on_progress, work, |result| match result {
        Ok(results) => {
            MergeManyOutcome { reports: Some(results.into_iter().map(|r| r.report.into()).collect()), error: None }
        }
        Err(e) => MergeManyOutcome { reports: None, error: Some(ErrorInfo::from(&e)) },
    })
}

/// A merge streamed key by key (`iterate()`): started on its own thread, read with `next()`.
#[napi]
pub struct MergeStream {
    sink: Arc<mecha_core::exec::stream::StreamSink>,
    cancel: Arc<AtomicBool>,
    report: Arc<std::sync::Mutex<Option<MergeReport>>>,
}

/// Starts streaming the recipe's merged keys in output order, keeping at most `buffer_bytes` of
/// finished keys the consumer has not taken (the engine waits beyond that).
#[napi]
pub fn merge_stream(
    recipe_json: String,
    options: NativeMergeOptions,
    buffer_bytes: f64,
    cache: &MergeCache,
    #[napi(ts_arg_type = "((progress: ProgressInfo) => void) | undefined | null")] on_progress: Option<ProgressFn>,
) -> napi::Result<MergeStream> {
    let sink = Arc::new(mecha_core::exec::stream::StreamSink::new(buffer_bytes.max(1.0) as u64));
    let cancel = Arc::new(AtomicBool::new(false));
    let report = Arc::new(std::sync::Mutex::new(None));
    let (thread_sink, flag, kept) = (sink.clone(), cancel.clone(), report.clone());
    let cache = cache.inner.clone();
    let progress = on_progress.map(JsProgress);
    std::thread::Builder::new()
        .name("mecha-merge".into())
        .spawn(move || {
            let result = mecha_core::error::guarded("iterate", || {
                let recipe = mecha_core::recipe::wire::from_json(&recipe_json)?;
                let mut options =
                    merge_options(NativeMergeOptions { output: None, max_shard_bytes: None, ..options }, cache)?;
                options.output = OutputTarget::Stream(thread_sink.clone());
                mecha_core::exec::merge(recipe, &options, &flag, progress.as_ref().map(|p| p as &dyn ProgressSink))
            });
            drop(progress);
            match result {
                Ok(r) => {
                    *kept.lock().expect("report lock") = Some(r.report);
                    thread_sink.end(Ok(()));
                }
                Err(e) => thread_sink.end(Err(e)),
            }
        })
        .map_err(|e| napi::Error::from_reason(format!("cannot start the merge thread: {e}")))?;
    Ok(MergeStream { sink, cancel, report })
}

/// The next key of a stream, `done` after the last one, or `error`.
#[napi(object, object_from_js = false)]
pub struct StreamItem {
    pub tensor: Option<OutputTensorInfo>,
    pub done: bool,
    pub error: Option<ErrorInfo>,
}

pub struct NextKeyTask {
    sink: Arc<mecha_core::exec::stream::StreamSink>,
}

impl Task for NextKeyTask {
    type Output = mecha_core::Result<Option<mecha_core::exec::stream::StreamedTensor>>;
    type JsValue = StreamItem;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        Ok(self.sink.next())
    }

    fn resolve(&mut self, _env: Env, output: Self::Output) -> napi::Result<StreamItem> {
        Ok(match output {
            Ok(Some(t)) => {
                StreamItem { tensor: Some(tensor_info(t.name, t.dtype, &t.shape, t.data)), done: false, error: None }
            }
            Ok(None) => StreamItem { tensor: None, done: true, error: None },
            Err(e) => StreamItem { tensor: None, done: false, error: Some(ErrorInfo::from(&e)) },
        })
    }
}

#[napi]
impl MergeStream {
    /// Waits (off the event loop) for the next key in output order.
    #[napi(ts_return_type = "Promise<StreamItem>")]
    pub fn next(&self) -> AsyncTask<NextKeyTask> {
        AsyncTask::new(NextKeyTask { sink: self.sink.clone() })
    }

    /// Stops the merge (the consumer is done with it).
    #[napi]
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.sink.cancel();
    }

    /// The merge's report, once the stream has ended.
    #[napi(getter)]
    pub fn report(&self) -> Option<MergeReportInfo> {
        self.report.lock().expect("report lock").clone().map(MergeReportInfo::from)
    }

    /// The most bytes of keys the stream held at once (computed and not yet taken).
    #[napi(getter)]
    pub fn peak_buffered_bytes(&self) -> f64 {
        self.sink.peak_buffered_bytes() as f64
    }
}
