//! Node-API binding of mecha-core. It converts types, schedules merges on their own threads
//! (not the libuv pool), forwards progress through a threadsafe function and cancellation
//! through a token. No merge logic lives here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mecha_core::exec::plan::{MergeDtype, PlanOptions};
use mecha_core::exec::run::{Progress, ProgressSink};
use mecha_core::exec::{MergeOptions, MergeReport, OutputTarget};
use mecha_core::io::reader::SafetensorsFile;
use mecha_core::methods::{
    registry, DefaultValue, ExternalArg, ExternalCall, ExternalKernel, ExternalMethod, ExternalRoutes, Implementation,
    MethodSpec, ParamKind, ParamSpec, ReturnSpec, SpaceSpec, ValueType,
};
use mecha_core::recipe::spaces::RootSpace;
use mecha_core::{DType, MechaError};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;

// ---------------------------------------------------------------------------------------------
// Errors: JS errors carrying the core's kind and details as properties.

/// Details of a core error, as plain data.
#[napi(object)]
#[derive(Clone)]
pub struct ErrorInfo {
    /// The TypeScript error class: `SafetensorsError`, `RecipeError`, `MergeSpaceError`, ...
    pub kind: String,
    pub message: String,
    pub file: Option<String>,
    pub key: Option<String>,
    pub node: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
}

impl From<&MechaError> for ErrorInfo {
    fn from(e: &MechaError) -> Self {
        ErrorInfo {
            kind: e.kind.class_name().to_string(),
            message: e.to_string(),
            file: e.file.as_ref().map(|f| f.display().to_string()),
            key: e.key.clone(),
            node: e.node.clone(),
            line: e.line,
            column: e.column,
        }
    }
}

/// Throws a JS `Error` whose `code` is the error class name, with the details as properties.
fn throw(env: &Env, err: &MechaError) -> napi::Error {
    let info = ErrorInfo::from(err);
    let thrown = (|| -> napi::Result<()> {
        let mut obj = env.create_error(napi::Error::new(Status::GenericFailure, info.message.clone()))?;
        obj.set_named_property("code", info.kind.as_str())?;
        obj.set_named_property("mecha", info)?;
        env.throw(obj)
    })();
    match thrown {
        Ok(()) => napi::Error::from_status(Status::PendingException),
        Err(e) => e,
    }
}

fn parse_dtype(name: &str, what: &str) -> std::result::Result<DType, MechaError> {
    DType::parse_user(name).filter(|d| d.is_numeric()).ok_or_else(|| {
        MechaError::recipe(format!(
            "{what} \"{name}\" is not a dtype; use f16, bf16, f32, f64, f8_e4m3, f8_e5m2 or a torch name like float16"
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Files

#[napi(object)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    /// Byte offsets from the start of the file.
    pub start: i64,
    pub bytes: i64,
}

#[napi(object)]
pub struct FileInfo {
    pub path: String,
    pub file_bytes: i64,
    pub header_bytes: i64,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    pub metadata: HashMap<String, String>,
}

/// Reads and validates a safetensors header.
#[napi]
pub fn inspect(env: Env, path: String) -> napi::Result<FileInfo> {
    let file = SafetensorsFile::open(std::path::Path::new(&path)).map_err(|e| throw(&env, &e))?;
    Ok(FileInfo {
        path,
        file_bytes: file.file_len() as i64,
        header_bytes: file.header_len() as i64,
        tensors: file
            .tensors()
            .iter()
            .map(|(name, e)| TensorInfo {
                name: name.clone(),
                dtype: e.dtype.safetensors_name().to_string(),
                shape: e.shape.iter().map(|&d| d as i64).collect(),
                start: e.start as i64,
                bytes: e.byte_len as i64,
            })
            .collect(),
        metadata: file.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    })
}

/// The model config sd-mecha's rules infer for a file, or `null` for an unknown architecture.
#[napi]
pub fn infer_config(env: Env, path: String) -> napi::Result<Option<String>> {
    let run = || -> mecha_core::Result<Option<String>> {
        let mut b = mecha_core::recipe::RecipeBuilder::new();
        let node = b.model(&path, None, Some("weight"));
        let f = mecha_core::exec::plan::finalize(b.finish(node)?, &RootSpace::default())?;
        Ok(f.root_config().as_named().map(|c| c.id.clone()))
    };
    run().map_err(|e| throw(&env, &e))
}

/// The configs a file could be, best first, as sd-mecha ranks them (`root_candidates`).
#[napi]
pub fn config_candidates(env: Env, path: String) -> napi::Result<Vec<String>> {
    let run = || -> mecha_core::Result<Vec<String>> {
        let mut b = mecha_core::recipe::RecipeBuilder::new();
        let node = b.model(&path, None, Some("weight"));
        let recipe = b.finish(node)?;
        let inputs = mecha_core::exec::plan::open_inputs(&recipe)?;
        mecha_core::recipe::inference::root_candidates(&recipe, &inputs.model_keys, None)
    };
    run().map_err(|e| throw(&env, &e))
}

// ---------------------------------------------------------------------------------------------
// Method registry

#[napi(object)]
pub struct SpaceInfo {
    /// True when the method's own merge-space variable is used (shared with the return value).
    pub symbol: bool,
    /// Allowed spaces.
    pub spaces: Vec<String>,
}

fn space_info(spec: &SpaceSpec) -> SpaceInfo {
    match spec {
        SpaceSpec::Symbol => SpaceInfo {
            symbol: true,
            spaces: mecha_core::recipe::spaces::SPACES.iter().map(|s| s.to_string()).collect(),
        },
        SpaceSpec::Fixed(v) => SpaceInfo { symbol: false, spaces: v.clone() },
    }
}

#[napi(object)]
pub struct ParamInfo {
    pub name: String,
    /// `Tensor`, `float`, `int`, `bool`, `str` or `T` (any).
    #[napi(js_name = "type")]
    pub value_type: String,
    pub state_dict: bool,
    pub merge_space: SpaceInfo,
    pub model_config: Option<String>,
    /// `positional`, `varargs` or `keyword`.
    pub kind: String,
    pub has_default: bool,
    #[napi(ts_type = "number | boolean | string | null | undefined")]
    pub default: Option<serde_json::Value>,
}

#[napi(object)]
pub struct MethodInfo {
    pub id: String,
    pub description: String,
    pub params: Vec<ParamInfo>,
    pub return_type: String,
    pub return_merge_space: SpaceInfo,
    pub return_model_config: Option<String>,
    pub is_conversion: bool,
    pub elementwise: bool,
}

fn method_info(m: &MethodSpec) -> MethodInfo {
    MethodInfo {
        id: m.id.clone(),
        description: m.description.clone(),
        params: m
            .params
            .iter()
            .map(|p| ParamInfo {
                name: p.name.clone(),
                value_type: p.value_type.name().to_string(),
                state_dict: p.state_dict,
                merge_space: space_info(&p.space),
                model_config: p.config.clone(),
                kind: match p.kind {
                    ParamKind::Positional => "positional",
                    ParamKind::VarPositional => "varargs",
                    ParamKind::KeywordOnly => "keyword",
                }
                .to_string(),
                has_default: p.default.is_some(),
                default: p.default.as_ref().map(|d| match d {
                    DefaultValue::Null => serde_json::Value::Null,
                    DefaultValue::Bool(b) => (*b).into(),
                    DefaultValue::Int(i) => (*i).into(),
                    DefaultValue::Float(f) => (*f).into(),
                    DefaultValue::Str(s) => s.clone().into(),
                }),
            })
            .collect(),
        return_type: m.returns.value_type.name().to_string(),
        return_merge_space: space_info(&m.returns.space),
        return_model_config: m.returns.config.clone(),
        is_conversion: m.is_conversion,
        elementwise: m.is_elementwise(),
    }
}

/// Every registered merge method with its signature, for builders, docs and UIs.
#[napi]
pub fn methods() -> Vec<MethodInfo> {
    registry().list().iter().map(|m| method_info(m)).collect()
}

/// Which f16 conversion path this machine uses (`f16c` or `scalar`).
#[napi]
pub fn simd_path() -> String {
    mecha_core::kernels::convert::f16_path().to_string()
}

// ---------------------------------------------------------------------------------------------
// Model configs

#[napi(object)]
pub struct ConfigKeyInfo {
    pub key: String,
    pub component: String,
    /// `null` when the config does not fix it.
    pub shape: Option<Vec<i64>>,
    /// safetensors dtype name, `null` when unknown.
    pub dtype: Option<String>,
    pub optional: bool,
    pub aliases: Vec<String>,
}

#[napi(object)]
pub struct ConfigInfo {
    pub id: String,
    pub architecture: String,
    pub implementation: String,
    /// Component name → number of keys, in config order.
    pub components: HashMap<String, u32>,
    pub key_count: u32,
}

/// Every model config (builtin and registered), in sd-mecha's order (reverse-sorted ids).
#[napi]
pub fn config_list() -> Vec<ConfigInfo> {
    mecha_core::configs::list()
        .iter()
        .map(|c| ConfigInfo {
            id: c.id.clone(),
            architecture: c.architecture().to_string(),
            implementation: c.implementation().to_string(),
            components: c.components().iter().map(|(n, comp)| (n.clone(), comp.keys.len() as u32)).collect(),
            key_count: c.key_count() as u32,
        })
        .collect()
}

/// The keys of a model config in order, with their component and metadata.
#[napi]
pub fn config_keys(env: Env, id: String) -> napi::Result<Vec<ConfigKeyInfo>> {
    let config = mecha_core::configs::resolve(&id).map_err(|e| throw(&env, &e))?;
    Ok(config
        .components()
        .iter()
        .flat_map(|(component, comp)| {
            comp.keys.iter().map(move |(key, meta)| ConfigKeyInfo {
                key: key.clone(),
                component: component.clone(),
                shape: meta.shape.as_ref().map(|s| s.iter().map(|&d| d as i64).collect()),
                dtype: meta.dtype.map(|d| d.safetensors_name().to_string()),
                optional: meta.optional,
                aliases: meta.aliases.clone(),
            })
        })
        .collect())
}

/// Registers a model config from YAML in sd-mecha's format (JSON, a subset of YAML, works too).
/// `id` names it like sd-mecha's file stem; without it the `identifier` field is used.
#[napi]
pub fn config_register(env: Env, yaml: String, id: Option<String>) -> napi::Result<String> {
    let run = || -> mecha_core::Result<String> {
        let config = mecha_core::configs::from_yaml(&yaml, id.as_deref())?;
        let id = config.id.clone();
        mecha_core::configs::register(config)?;
        Ok(id)
    };
    run().map_err(|e| throw(&env, &e))
}

/// Adds a folder searched for models given by relative path.
#[napi]
pub fn model_dirs_add(path: String) {
    mecha_core::model_dirs::add(std::path::Path::new(&path));
}

#[napi]
pub fn model_dirs_list() -> Vec<String> {
    mecha_core::model_dirs::list().iter().map(|p| p.display().to_string()).collect()
}

#[napi]
pub fn model_dirs_clear() {
    mecha_core::model_dirs::clear();
}

/// The conversion methods that take a recipe to a config (or to another recipe's config).
#[napi]
pub fn conversion_path(
    env: Env,
    recipe_json: String,
    target_config: Option<String>,
    target_json: Option<String>,
) -> napi::Result<Vec<String>> {
    use mecha_core::exec::convert::{conversion_path, Target};
    let run = || -> mecha_core::Result<Vec<String>> {
        let recipe = mecha_core::recipe::wire::from_json(&recipe_json)?;
        let target = match (target_config, target_json) {
            (Some(id), _) => Target::Config(id),
            (None, Some(json)) => Target::Like(mecha_core::recipe::wire::from_json(&json)?),
            (None, None) => return Err(MechaError::recipe("convert() needs a target config or recipe")),
        };
        conversion_path(&recipe, &target)
    };
    run().map_err(|e| throw(&env, &e))
}

// ---------------------------------------------------------------------------------------------
// Merging

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
        Ok(mecha_core::exec::plan::finalize(recipe, &root_space(strict_merge_space))?.to_mecha())
    };
    run().map_err(|e| throw(&env, &e))
}

/// Parses `.mecha` text into the JSON recipe form (node ids are the instruction order, children
/// first). Throws `ParseError` / `RecipeError` naming the line and column.
#[napi]
pub fn deserialize(env: Env, text: String) -> napi::Result<String> {
    let recipe = mecha_core::recipe::parse::parse(&text).map_err(|e| throw(&env, &e))?;
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
    pub threads: u32,
    /// Working memory of the merge threads (buffers), excluding the process itself.
    pub estimated_working_bytes: f64,
    pub recipe: String,
}

/// Plans a merge without reading tensor data: configs, spaces, kept and skipped keys, memory.
#[napi]
pub fn plan(env: Env, recipe_json: String, options: NativeMergeOptions) -> napi::Result<PlanInfo> {
    let run = || -> mecha_core::Result<PlanInfo> {
        let recipe = mecha_core::recipe::wire::from_json(&recipe_json)?;
        let options = merge_options(options)?;
        let plan = mecha_core::exec::plan::plan(recipe, &options.plan)?;
        let f = &plan.finalized;
        let threads = if options.threads == 0 { mecha_core::exec::run::auto_threads() } else { options.threads };
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
            keys_skipped: plan
                .skipped
                .iter()
                .map(|s| SkippedKeyInfo { key: s.key.clone(), reason: s.reason.clone() })
                .collect(),
            threads: threads as u32,
            estimated_working_bytes: plan.estimated_working_bytes(threads, options.chunk) as f64,
            recipe: plan.serialized.clone(),
        })
    };
    run().map_err(|e| throw(&env, &e))
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
    pub peak_rss_bytes: f64,
    pub threads: u32,
    pub recipe: String,
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
            recipe: r.recipe,
        }
    }
}

#[napi(object)]
pub struct OutputTensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    pub data: Buffer,
}

/// A finished merge: `report` (and `tensors` for in-memory output), or `error`.
#[napi(object)]
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

fn merge_options(options: NativeMergeOptions) -> mecha_core::Result<MergeOptions> {
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
        },
        output: match options.output {
            Some(p) => OutputTarget::File(PathBuf::from(p)),
            None => OutputTarget::Memory,
        },
        threads: options.threads.unwrap_or(0) as usize,
        host_context: options.context.unwrap_or(0) as u64,
        omit_non_finite_inputs: options.omit_non_finite_inputs.unwrap_or(defaults.omit_non_finite_inputs),
        check_finite_output: options.check_finite_output.unwrap_or(defaults.check_finite_output),
        chunk: options.chunk.map_or(defaults.chunk, |c| c.max(1) as usize),
        progress_interval: options
            .progress_interval_ms
            .map_or(defaults.progress_interval, |ms| std::time::Duration::from_millis(ms as u64)),
    })
}

type Resolver = Box<dyn FnOnce(Env) -> napi::Result<MergeOutcome> + Send>;

/// Runs a merge on its own threads and resolves with a `MergeOutcome` (errors are returned in
/// it, so the TypeScript layer can raise its typed error classes).
#[napi(ts_return_type = "Promise<MergeOutcome>")]
pub fn merge<'env>(
    env: &'env Env,
    recipe_json: String,
    options: NativeMergeOptions,
    cancel: &CancelToken,
    #[napi(ts_arg_type = "((progress: ProgressInfo) => void) | undefined | null")] on_progress: Option<ProgressFn>,
) -> napi::Result<Object<'env>> {
    let (deferred, promise) = env.create_deferred::<MergeOutcome, Resolver>()?;
    let flag = cancel.flag.clone();
    let progress = on_progress.map(JsProgress);
    std::thread::Builder::new()
        .name("mecha-merge".into())
        .spawn(move || {
            let result = (|| {
                let recipe = mecha_core::recipe::wire::from_json(&recipe_json)?;
                let options = merge_options(options)?;
                mecha_core::exec::merge(recipe, &options, &flag, progress.as_ref().map(|p| p as &dyn ProgressSink))
            })();
            drop(progress); // release the callback so it no longer holds the event loop
            deferred.resolve(Box::new(move |_env| {
                Ok(match result {
                    Ok(r) => MergeOutcome {
                        tensors: (r.report.output.is_none()).then(|| {
                            r.tensors
                                .into_iter()
                                .map(|t| OutputTensorInfo {
                                    name: t.name,
                                    dtype: t.dtype.safetensors_name().to_string(),
                                    shape: t.shape.iter().map(|&d| d as i64).collect(),
                                    data: t.data.into(),
                                })
                                .collect()
                        }),
                        report: Some(r.report.into()),
                        error: None,
                    },
                    Err(e) => MergeOutcome { report: None, tensors: None, error: Some(ErrorInfo::from(&e)) },
                })
            }));
        })
        .map_err(|e| napi::Error::from_reason(format!("cannot start the merge thread: {e}")))?;
    Ok(promise)
}

// ---------------------------------------------------------------------------------------------
// Synthetic models (demo, benchmarks, tests)

#[napi(object)]
pub struct TensorSpec {
    pub name: String,
    /// safetensors or torch dtype name.
    pub dtype: String,
    pub shape: Vec<i64>,
}

pub struct RandomModelTask {
    path: PathBuf,
    tensors: Vec<mecha_core::io::writer::PlannedTensor>,
    seed: u64,
}

impl Task for RandomModelTask {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> napi::Result<()> {
        mecha_core::synthetic::write_random_model(&self.path, &self.tensors, self.seed, &[])
            .map_err(|e| napi::Error::new(Status::GenericFailure, e.to_string()))
    }

    fn resolve(&mut self, _env: Env, _output: ()) -> napi::Result<()> {
        Ok(())
    }
}

/// Writes a safetensors file of deterministic pseudo-random values with the given layout.
#[napi]
pub fn write_random_model(
    env: Env,
    path: String,
    tensors: Vec<TensorSpec>,
    seed: i64,
) -> napi::Result<AsyncTask<RandomModelTask>> {
    let planned = tensors
        .into_iter()
        .map(|t| {
            let dtype = parse_dtype(&t.dtype, "dtype").map_err(|e| throw(&env, &e))?;
            let shape: Vec<usize> = t.shape.iter().map(|&d| d.max(0) as usize).collect();
            Ok(mecha_core::io::writer::PlannedTensor { name: t.name, dtype, shape })
        })
        .collect::<napi::Result<Vec<_>>>()?;
    Ok(AsyncTask::new(RandomModelTask { path: PathBuf::from(path), tensors: planned, seed: seed as u64 }))
}

// ---------------------------------------------------------------------------------------------
// Merge methods written in JavaScript

#[napi(object)]
pub struct JsParamSpec {
    pub name: String,
    /// `Tensor`, `float`, `int`, `bool`, `str` or `T`.
    #[napi(js_name = "type")]
    pub value_type: String,
    pub state_dict: bool,
    /// Allowed spaces; absent = the method's own merge-space variable.
    pub merge_space: Option<Vec<String>>,
    pub model_config: Option<String>,
    /// `positional`, `varargs` or `keyword`.
    pub kind: String,
    pub has_default: bool,
    #[napi(ts_type = "number | boolean | string | null | undefined")]
    pub default: Option<serde_json::Value>,
    /// With `default` a number: write it as an integer in `.mecha` text.
    pub default_is_int: Option<bool>,
}

#[napi(object)]
pub struct JsMethodSpec {
    pub id: String,
    pub description: String,
    pub params: Vec<JsParamSpec>,
    #[napi(js_name = "returnType")]
    pub return_type: String,
    /// Absent = the method's own merge-space variable.
    pub return_merge_space: Option<String>,
    pub return_model_config: Option<String>,
    pub elementwise: bool,
    pub is_conversion: bool,
    /// Output key → keys of the first input (from `mapKeys`).
    pub routes: Option<HashMap<String, Vec<String>>>,
}

/// One call of a JavaScript method, as JavaScript receives it.
#[napi(object)]
pub struct JsMethodCall {
    pub context: u32,
    /// Index of the node in the JSON recipe (absent for nodes created while binding).
    pub node: Option<u32>,
    pub key: String,
    pub shape: Vec<i64>,
    pub offset: f64,
    pub length: f64,
    pub args: Vec<JsMethodArg>,
}

/// One parameter's value: exactly one field is set (`isNull` for a null text value).
#[napi(object)]
pub struct JsMethodArg {
    pub tensor: Option<Float32Array>,
    pub tensors: Option<Vec<Float32Array>>,
    pub number: Option<f64>,
    pub text: Option<String>,
    pub is_null: bool,
}

type JsMethodFn = ThreadsafeFunction<JsMethodCall, Either<Float32Array, f64>, JsMethodCall, Status, false, true>;

struct JsKernel {
    id: String,
    function: JsMethodFn,
}

fn js_arg(arg: ExternalArg, len: usize) -> JsMethodArg {
    let empty = JsMethodArg { tensor: None, tensors: None, number: None, text: None, is_null: false };
    match arg {
        ExternalArg::Tensor(t) => JsMethodArg { tensor: Some(Float32Array::new(t.to_vec())), ..empty },
        ExternalArg::Number(n) => JsMethodArg { number: Some(n), ..empty },
        ExternalArg::Text(Some(t)) => JsMethodArg { text: Some(t.to_string()), ..empty },
        ExternalArg::Text(None) => JsMethodArg { is_null: true, ..empty },
        ExternalArg::Tensors(items) => {
            // Broadcast numbers inside a list are filled out, so the list is uniform.
            let arrays = items
                .into_iter()
                .map(|a| match a {
                    ExternalArg::Tensor(t) => Float32Array::new(t.to_vec()),
                    ExternalArg::Number(n) => Float32Array::new(vec![n as f32; len]),
                    _ => Float32Array::new(vec![]),
                })
                .collect();
            JsMethodArg { tensors: Some(arrays), ..empty }
        }
    }
}

impl ExternalKernel for JsKernel {
    fn call(&self, call: ExternalCall<'_>) -> mecha_core::Result<Vec<f32>> {
        let len = call.len;
        let js = JsMethodCall {
            context: call.context as u32,
            node: call.node.map(|n| n as u32),
            key: call.key.to_string(),
            shape: call.shape.iter().map(|&d| d as i64).collect(),
            offset: call.offset as f64,
            length: len as f64,
            args: call.args.into_iter().map(|a| js_arg(a, len)).collect(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let status = self.function.call_with_return_value(js, ThreadsafeFunctionCallMode::Blocking, move |ret, _| {
            let values = ret.map(|r| match r {
                Either::A(array) => array.to_vec(),
                Either::B(number) => vec![number as f32; len],
            });
            let _ = tx.send(values);
            Ok(())
        });
        let failed =
            |why: String| MechaError::recipe(format!("merge method {} failed on key \"{}\": {why}", self.id, call.key));
        if status != Status::Ok {
            return Err(failed(format!("the JavaScript function could not be called ({status})")));
        }
        rx.recv()
            .map_err(|_| failed("the JavaScript function never returned".into()))?
            .map_err(|e| failed(e.reason.clone()))
    }
}

fn param_spec(p: JsParamSpec) -> mecha_core::Result<ParamSpec> {
    let value_type = match p.value_type.as_str() {
        "Tensor" => ValueType::Tensor,
        "float" => ValueType::Float,
        "int" => ValueType::Int,
        "bool" => ValueType::Bool,
        "str" => ValueType::Str,
        "T" => ValueType::Any,
        other => return Err(MechaError::recipe(format!("parameter \"{}\": unknown type \"{other}\"", p.name))),
    };
    let kind = match p.kind.as_str() {
        "positional" => ParamKind::Positional,
        "varargs" => ParamKind::VarPositional,
        "keyword" => ParamKind::KeywordOnly,
        other => return Err(MechaError::recipe(format!("parameter \"{}\": unknown kind \"{other}\"", p.name))),
    };
    let default = if !p.has_default {
        None
    } else {
        Some(match p.default {
            None | Some(serde_json::Value::Null) => DefaultValue::Null,
            Some(serde_json::Value::Bool(b)) => DefaultValue::Bool(b),
            Some(serde_json::Value::String(s)) => DefaultValue::Str(s),
            Some(serde_json::Value::Number(n)) if p.default_is_int == Some(true) => {
                DefaultValue::Int(n.as_f64().unwrap_or(0.0) as i64)
            }
            Some(serde_json::Value::Number(n)) => DefaultValue::Float(n.as_f64().unwrap_or(0.0)),
            Some(other) => {
                return Err(MechaError::recipe(format!("parameter \"{}\": unsupported default {other}", p.name)))
            }
        })
    };
    Ok(ParamSpec {
        name: p.name,
        value_type,
        state_dict: p.state_dict,
        space: p.merge_space.map_or(SpaceSpec::Symbol, SpaceSpec::Fixed),
        config: p.model_config,
        kind,
        default,
    })
}

/// Registers a merge method implemented by a JavaScript function; it then works in recipes,
/// `.mecha` text and `methods()` like a builtin.
#[napi]
pub fn register_method(
    env: Env,
    spec: JsMethodSpec,
    #[napi(ts_arg_type = "(call: JsMethodCall) => Float32Array | number")] callback: JsMethodFn,
) -> napi::Result<()> {
    let run = || -> mecha_core::Result<()> {
        let params = spec.params.into_iter().map(param_spec).collect::<mecha_core::Result<Vec<_>>>()?;
        let returns = ReturnSpec {
            value_type: param_spec(JsParamSpec {
                name: "return".into(),
                value_type: spec.return_type,
                state_dict: false,
                merge_space: None,
                model_config: None,
                kind: "positional".into(),
                has_default: false,
                default: None,
                default_is_int: None,
            })?
            .value_type,
            space: spec.return_merge_space.map_or(SpaceSpec::Symbol, |s| SpaceSpec::Fixed(vec![s])),
            config: spec.return_model_config,
        };
        let kernel = Arc::new(JsKernel { id: spec.id.clone(), function: callback });
        let method = MethodSpec {
            id: spec.id,
            description: spec.description,
            params,
            returns,
            implementation: Implementation::External(Arc::new(ExternalMethod {
                kernel,
                elementwise: spec.elementwise,
                routes: spec.routes.map(|routes| ExternalRoutes { routes: routes.into_iter().collect() }),
            })),
            is_conversion: spec.is_conversion,
        };
        registry().register(method)
    };
    run().map_err(|e| throw(&env, &e))
}
