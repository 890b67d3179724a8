//! Planning and running a merge, end to end.

pub mod cache;
pub mod convert;
pub mod hashes;
pub mod memory;
pub mod plan;
pub mod run;
pub mod verify;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dtype::DType;
use crate::error::{MechaError, Result};
use crate::io::reader::SafetensorsFile;
use crate::io::shards::{ensure_no_input_inside, ShardedWriter};
use crate::io::writer::{ensure_not_an_input, FileLayout, PlannedTensor, SafetensorsWriter};
use crate::recipe::seeds::{choose_seeds, ChosenSeed};
use crate::recipe::Recipe;
use cache::MethodCache;
use plan::{Exclusions, Plan, PlanOptions, RecipePaths, SkippedKey};
use run::{ProgressSink, RunOptions, RunStats, TensorSink};

#[derive(Clone, Debug)]
pub enum OutputTarget {
    File(PathBuf),
    /// A Hugging Face sharded checkpoint: a folder of shards of at most `max_shard_bytes` each
    /// and their index (`io::shards`).
    Sharded {
        folder: PathBuf,
        max_shard_bytes: u64,
    },
    Memory,
    /// Nothing written: every tensor is compared with this merged file's (`verify`).
    Compare(Arc<SafetensorsFile>),
}

impl OutputTarget {
    pub fn path(&self) -> Option<&PathBuf> {
        match self {
            OutputTarget::File(p) | OutputTarget::Sharded { folder: p, .. } => Some(p),
            OutputTarget::Memory | OutputTarget::Compare(_) => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub plan: PlanOptions,
    pub output: OutputTarget,
    /// 0 = one per CPU.
    pub threads: usize,
    pub chunk: usize,
    pub progress_interval: Duration,
    /// Handed to external methods with every call (see `ExternalCall::context`).
    pub host_context: u64,
    /// Treat input tensors holding NaN or infinity as missing (sd-mecha's default).
    pub omit_non_finite_inputs: bool,
    /// List the keys whose output holds NaN or infinity in the report (sd-mecha's default).
    pub check_finite_output: bool,
    /// Bytes of working memory the keys computed at once may use together (0: the default,
    /// a quarter of physical memory, at most 4 GiB).
    pub memory_budget: u64,
    /// Write an output with no tensors when no key can be produced (refused by default, as
    /// sd-mecha refuses a merge that "produces no output keys").
    pub allow_empty: bool,
    /// Refuse the merge when a key of the output's config that is not optional cannot be
    /// built (sd-mecha's `strict_mandatory_keys`; off by default: such keys are skipped).
    pub strict_mandatory_keys: bool,
    /// What the output's `mecha_recipe` metadata records.
    pub embed_recipe: EmbedRecipe,
    /// Values methods keep per node and key, for later merges of the same recipe that reuse
    /// it. The default keeps nothing (a merge computes each key once).
    pub cache: Arc<MethodCache>,
}

impl EmbedRecipe {
    /// `relative` (paths as given; the default), `absolute` or `none`.
    pub fn parse(name: &str) -> Result<EmbedRecipe> {
        match name {
            "relative" => Ok(EmbedRecipe::Paths(RecipePaths::AsGiven)),
            "absolute" => Ok(EmbedRecipe::Paths(RecipePaths::Absolute)),
            "none" => Ok(EmbedRecipe::None),
            other => Err(MechaError::recipe(format!(
                "embedRecipe must be 'relative' (model paths as given), 'absolute' or 'none', got \"{other}\""
            ))),
        }
    }
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            plan: PlanOptions::default(),
            output: OutputTarget::Memory,
            threads: 0,
            chunk: run::DEFAULT_CHUNK,
            progress_interval: Duration::from_millis(100),
            host_context: 0,
            omit_non_finite_inputs: true,
            check_finite_output: true,
            memory_budget: 0,
            allow_empty: false,
            strict_mandatory_keys: false,
            embed_recipe: EmbedRecipe::Paths(RecipePaths::AsGiven),
            cache: Arc::new(MethodCache::new(0)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct MergeReport {
    pub output: Option<PathBuf>,
    pub keys_written: usize,
    pub keys_skipped: Vec<SkippedKey>,
    /// Keys written with NaN or infinity in them (sd-mecha warns about these).
    pub non_finite_outputs: Vec<String>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    /// Peak resident memory of the whole process while this merge ran (other merges running
    /// at the same time in the process count too).
    pub peak_rss_bytes: u64,
    /// The memory budget the merge ran under, and the keys that needed more, so ran alone.
    pub memory_budget: u64,
    pub over_budget: Vec<String>,
    pub threads: usize,
    /// The recipe as `.mecha` text (also stored in the output's `__metadata__.mecha_recipe`),
    /// with the seeds below in place of null seeds.
    pub recipe: String,
    /// Seeds chosen for `seed: None` parameters (also in `__metadata__.mecha_seeds`).
    pub seeds: Vec<ChosenSeed>,
    /// The content hash of each input file, as read (also in `__metadata__.mecha_inputs`);
    /// empty when the output records no recipe (in memory, `embed_recipe: none`).
    pub input_hashes: Vec<InputHash>,
}

/// The content hash of one input (see `hashes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputHash {
    /// The model path as the recipe gives it.
    pub model: String,
    /// The file read (resolved).
    pub path: PathBuf,
    /// `hashes::ALGORITHM` as 32 hex digits.
    pub hash: String,
}

/// The engine that wrote an output (`__metadata__.mecha_engine`).
pub fn engine_version() -> String {
    format!("sd-mecha-node {}", env!("CARGO_PKG_VERSION"))
}

#[derive(Clone, Debug)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub struct MergeResult {
    pub report: MergeReport,
    /// Filled when the output target is memory, in plan order.
    pub tensors: Vec<OutputTensor>,
    /// What comparing with an existing output found (`OutputTarget::Compare`).
    pub comparison: Option<verify::Comparison>,
}

impl TensorSink for SafetensorsWriter {
    fn write(&self, key: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        self.write_at(key, offset, bytes)
    }
}

impl TensorSink for ShardedWriter {
    fn write(&self, key: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        self.write_at(key, offset, bytes)
    }
}

struct MemorySink {
    buffers: Vec<Mutex<Vec<u8>>>,
}

impl TensorSink for MemorySink {
    fn write(&self, key: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        let mut buf = self.buffers[key].lock().expect("tensor buffer lock");
        buf[offset..offset + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

pub fn planned_tensors(plan: &Plan) -> Vec<PlannedTensor> {
    plan.keys.iter().map(|k| PlannedTensor { name: k.name.clone(), dtype: k.dtype, shape: k.shape.clone() }).collect()
}

/// The recipe an output records in its `mecha_recipe` metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbedRecipe {
    /// The finalized recipe, with model paths as given (the default, as sd-mecha) or absolute.
    Paths(RecipePaths),
    /// No recipe (nor chosen seeds) in the metadata.
    None,
}

/// The recipe text the output records, or for `EmbedRecipe::None` the absolute one (reported only).
fn recipe_text(plan: &Plan, embed: EmbedRecipe) -> String {
    match embed {
        EmbedRecipe::Paths(RecipePaths::AsGiven) => plan.finalized.to_mecha_with(RecipePaths::AsGiven),
        EmbedRecipe::Paths(RecipePaths::Absolute) | EmbedRecipe::None => plan.serialized.clone(),
    }
}

/// Where one pass of a merge wrote: a file not yet renamed into place, buffers, or nowhere.
enum Written {
    File(SafetensorsWriter),
    Sharded(ShardedWriter),
    Memory(Vec<OutputTensor>),
    Compared(verify::Comparison),
}

/// Whether the output records its recipe (and so the inputs' hashes): sd-mecha stores none
/// for a recipe holding in-memory models, which cannot be replayed from text.
fn records_recipe(plan: &Plan, options: &MergeOptions) -> bool {
    options.embed_recipe != EmbedRecipe::None && !plan.finalized.has_memory_inputs()
}

/// The model path each input is given by in the recipe.
fn input_labels(plan: &Plan) -> Vec<String> {
    let f = &plan.finalized;
    let mut labels = vec![String::new(); f.inputs.len()];
    for n in f.recipe.models().into_iter().rev() {
        if let (crate::recipe::NodeKind::Model { path, .. }, Some(i)) = (&f.recipe.node(n).kind, f.model_input[n]) {
            labels[i] = path.clone();
        }
    }
    labels
}

/// The options that change an output's bytes, recorded so that `verify` merges as the merge did.
fn recorded_options(options: &MergeOptions) -> String {
    serde_json::json!({
        "merge_dtype": options.plan.merge_dtype.name(),
        "output_dtype": options.plan.output_dtype.safetensors_name(),
        "omit_non_finite_inputs": options.omit_non_finite_inputs,
    })
    .to_string()
}

/// The output's `__metadata__`: the recipe, the seeds the merge chose, the engine, the options
/// that change the bytes and each input's hash (`None`: placeholders of the same length, until
/// the inputs have been read).
fn output_metadata(
    plan: &Plan,
    seeds: &[ChosenSeed],
    options: &MergeOptions,
    hashes: Option<&[InputHash]>,
) -> Vec<(String, String)> {
    if !records_recipe(plan, options) {
        return vec![];
    }
    let mut metadata = vec![("mecha_recipe".to_string(), recipe_text(plan, options.embed_recipe))];
    if !seeds.is_empty() {
        let listed: Vec<serde_json::Value> = seeds
            .iter()
            .map(|s| serde_json::json!({ "node": s.node, "method": s.method, "param": s.param, "seed": s.seed }))
            .collect();
        metadata.push(("mecha_seeds".to_string(), serde_json::Value::Array(listed).to_string()));
    }
    metadata.push(("mecha_engine".to_string(), engine_version()));
    metadata.push(("mecha_options".to_string(), recorded_options(options)));
    let placeholder = hashes::placeholder();
    let inputs: Vec<serde_json::Value> = input_labels(plan)
        .into_iter()
        .enumerate()
        .map(|(i, model)| {
            let hash = hashes.and_then(|h| h.get(i)).map_or(placeholder.as_str(), |h| h.hash.as_str());
            serde_json::json!({ "model": model, hashes::ALGORITHM: hash })
        })
        .collect();
    metadata.push(("mecha_inputs".to_string(), serde_json::Value::Array(inputs).to_string()));
    metadata
}

fn run_once(
    plan: &Plan,
    seeds: &[ChosenSeed],
    options: &MergeOptions,
    run_options: &RunOptions,
) -> Result<(RunStats, Written, Vec<InputHash>)> {
    // Hashed while reading when the output records its inputs (or is compared with one that does).
    let hashes = match &options.output {
        OutputTarget::Memory => None,
        OutputTarget::Compare(_) => Some(hashes::InputHashes::new(plan.inputs())?),
        _ => records_recipe(plan, options).then(|| hashes::InputHashes::new(plan.inputs())).transpose()?,
    };
    let run_options = RunOptions { hashes: hashes.as_ref(), ..*run_options };
    let (stats, written) = match &options.output {
        OutputTarget::File(path) => {
            ensure_not_an_input(path, &plan.input_paths())?;
            let layout = FileLayout::new(&planned_tensors(plan), &output_metadata(plan, seeds, options, None));
            let writer = SafetensorsWriter::create(path, layout)?;
            (run::run(plan, &writer, &run_options)?, Written::File(writer))
        }
        OutputTarget::Sharded { folder, max_shard_bytes } => {
            let inputs = plan.input_paths();
            ensure_not_an_input(folder, &inputs)?;
            ensure_no_input_inside(folder, &inputs)?;
            let metadata = output_metadata(plan, seeds, options, None);
            let writer = ShardedWriter::create(folder, &planned_tensors(plan), &metadata, *max_shard_bytes)?;
            (run::run(plan, &writer, &run_options)?, Written::Sharded(writer))
        }
        OutputTarget::Memory => {
            let sink = MemorySink { buffers: plan.keys.iter().map(|k| Mutex::new(vec![0u8; k.byte_len()])).collect() };
            let stats = run::run(plan, &sink, &run_options)?;
            let tensors = plan
                .keys
                .iter()
                .zip(sink.buffers)
                .map(|(k, b)| OutputTensor {
                    name: k.name.clone(),
                    dtype: k.dtype,
                    shape: k.shape.clone(),
                    data: b.into_inner().expect("tensor buffer lock"),
                })
                .collect();
            (stats, Written::Memory(tensors))
        }
        OutputTarget::Compare(against) => {
            let sink = verify::CompareSink::new(plan, against);
            let stats = run::run(plan, &sink, &run_options)?;
            (stats, Written::Compared(sink.finish()))
        }
    };
    let input_hashes = match &hashes {
        Some(h) => h
            .finish(plan.inputs())?
            .into_iter()
            .zip(input_labels(plan))
            .zip(plan.inputs())
            .filter_map(|((hash, model), file)| {
                hash.map(|hash| InputHash { model, path: file.path().to_path_buf(), hash })
            })
            .collect(),
        None => vec![],
    };
    Ok((stats, written, input_hashes))
}

/// Why a merge with `strict_mandatory_keys` is refused: the first mandatory keys that cannot
/// be built, with their reasons.
fn unbuilt_mandatory(plan: &Plan) -> MechaError {
    let missing = &plan.unbuilt_mandatory;
    let listed: Vec<String> = missing.iter().take(5).map(|k| format!("{} ({})", k.key, k.reason)).collect();
    let more = if missing.len() > listed.len() {
        format!(" and {} more", missing.len() - listed.len())
    } else {
        String::new()
    };
    MechaError::recipe(format!(
        "strictMandatoryKeys: {} mandatory key(s) of the model config \"{}\" cannot be merged: {}{more}; \
         give the inputs those keys, or merge without strictMandatoryKeys to skip them",
        missing.len(),
        plan.finalized.root_config().id(),
        listed.join(", "),
    ))
}

/// Why a merge has nothing to write: the first reasons keys were skipped, grouped.
fn empty_merge(plan: &Plan) -> MechaError {
    let mut reasons: Vec<(String, usize)> = vec![];
    for skipped in &plan.skipped {
        match reasons.iter_mut().find(|(r, _)| *r == skipped.reason) {
            Some((_, n)) => *n += 1,
            None => reasons.push((skipped.reason.clone(), 1)),
        }
    }
    let listed: Vec<String> = reasons.iter().take(5).map(|(r, n)| format!("{n} key(s): {r}")).collect();
    MechaError::recipe(format!(
        "the recipe produces no output keys ({} skipped{}{}); check that the inputs share an architecture, \
         or pass allowEmpty: true to write an empty file",
        plan.skipped.len(),
        if listed.is_empty() { "" } else { ": " },
        listed.join("; ")
    ))
}

/// The budget a merge runs under: the one given, or the default.
pub fn budget_or_default(budget: u64) -> u64 {
    if budget == 0 {
        memory::default_budget()
    } else {
        budget
    }
}

/// Plans and runs a merge. A file output appears at its path only once complete.
///
/// With `omit_non_finite_inputs` (sd-mecha's default), input tensors holding NaN or infinity are
/// treated as missing: when a pass finds some, the keys are planned again without them (a
/// `fallback` then takes its other input; other keys are skipped and reported) and the merge runs
/// again. NaN-free inputs, the usual case, take one pass.
pub fn merge(
    recipe: Recipe,
    options: &MergeOptions,
    cancel: &AtomicBool,
    progress: Option<&dyn ProgressSink>,
) -> Result<MergeResult> {
    let started = Instant::now();
    let peak = memory::PeakWatch::start();
    let mut recipe = recipe;
    let seeds = choose_seeds(&mut recipe);
    let mut finalized = plan::finalize(recipe, &options.plan.root_space)?;
    if finalized.inputs.is_empty() {
        return Err(MechaError::recipe("the recipe has no model inputs, so there are no keys to merge"));
    }
    let run_options = RunOptions {
        check_inputs: options.omit_non_finite_inputs,
        check_outputs: options.check_finite_output,
        threads: options.threads,
        chunk: options.chunk,
        host_context: options.host_context,
        cancel,
        progress,
        progress_interval: options.progress_interval,
        memory_budget: budget_or_default(options.memory_budget),
        cache: options.cache.as_ref(),
        hashes: None,
    };
    let mut excluded = Exclusions::default();
    let (plan, stats, written, input_hashes) = loop {
        let plan = plan::plan_keys(finalized, &options.plan, &excluded)?;
        // Refused when nothing can be built from the inputs' keys at all; keys emptied by
        // values found while reading (NaN inputs) are reported as skipped instead.
        if plan.keys.is_empty() && excluded.is_empty() && !options.allow_empty {
            return Err(empty_merge(&plan));
        }
        if options.strict_mandatory_keys && !plan.unbuilt_mandatory.is_empty() {
            return Err(unbuilt_mandatory(&plan));
        }
        let (stats, written, input_hashes) = run_once(&plan, &seeds, options, &run_options)?;
        let before = excluded.len();
        if options.omit_non_finite_inputs {
            excluded.tensors.extend(stats.non_finite_inputs.iter().copied());
        }
        excluded.nodes.extend(stats.skipped.nodes.clone());
        if excluded.len() == before {
            break (plan, stats, written, input_hashes);
        }
        finalized = plan.finalized; // the unfinished output is dropped, and deleted
    };
    // The header was written with placeholder hashes of the same length: now the real ones.
    let metadata = || output_metadata(&plan, &seeds, options, Some(&input_hashes));
    let (tensors, comparison) = match written {
        Written::File(mut writer) => {
            writer.rewrite_metadata(&planned_tensors(&plan), &metadata())?;
            writer.commit()?;
            (vec![], None)
        }
        Written::Sharded(mut writer) => {
            writer.rewrite_metadata(&metadata())?;
            writer.commit()?;
            (vec![], None)
        }
        Written::Memory(tensors) => (tensors, None),
        Written::Compared(comparison) => (vec![], Some(comparison)),
    };
    let report = MergeReport {
        output: options.output.path().cloned(),
        keys_written: plan.keys.len(),
        keys_skipped: plan.skipped.clone(),
        non_finite_outputs: stats.non_finite_outputs.iter().map(|&k| plan.keys[k].name.clone()).collect(),
        bytes_read: stats.bytes_read,
        bytes_written: stats.bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_bytes: peak.finish(),
        memory_budget: run_options.memory_budget,
        over_budget: stats.over_budget.iter().map(|&k| plan.keys[k].name.clone()).collect(),
        threads: if options.threads == 0 { run::auto_threads() } else { options.threads },
        recipe: recipe_text(&plan, options.embed_recipe),
        seeds,
        input_hashes,
    };
    Ok(MergeResult { report, tensors, comparison })
}
