//! Planning and running a merge, end to end.

pub mod cache;
pub mod convert;
pub mod memory;
pub mod plan;
pub mod run;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dtype::DType;
use crate::error::{MechaError, Result};
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
}

impl OutputTarget {
    pub fn path(&self) -> Option<&PathBuf> {
        match self {
            OutputTarget::File(p) | OutputTarget::Sharded { folder: p, .. } => Some(p),
            OutputTarget::Memory => None,
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

/// Where one pass of a merge wrote: a file not yet renamed into place, or buffers.
enum Written {
    File(SafetensorsWriter),
    Sharded(ShardedWriter),
    Memory(Vec<OutputTensor>),
}

/// The output's `__metadata__`: the recipe, and the seeds the merge chose.
fn output_metadata(plan: &Plan, seeds: &[ChosenSeed], embed: EmbedRecipe) -> Vec<(String, String)> {
    // A recipe holding in-memory models cannot be replayed from text, so sd-mecha stores none.
    if embed == EmbedRecipe::None || plan.finalized.has_memory_inputs() {
        return vec![];
    }
    let mut metadata = vec![("mecha_recipe".to_string(), recipe_text(plan, embed))];
    if !seeds.is_empty() {
        let listed: Vec<serde_json::Value> = seeds
            .iter()
            .map(|s| serde_json::json!({ "node": s.node, "method": s.method, "param": s.param, "seed": s.seed }))
            .collect();
        metadata.push(("mecha_seeds".to_string(), serde_json::Value::Array(listed).to_string()));
    }
    metadata
}

fn run_once(
    plan: &Plan,
    seeds: &[ChosenSeed],
    options: &MergeOptions,
    run_options: &RunOptions,
) -> Result<(RunStats, Written)> {
    match &options.output {
        OutputTarget::File(path) => {
            ensure_not_an_input(path, &plan.input_paths())?;
            let metadata = output_metadata(plan, seeds, options.embed_recipe);
            let layout = FileLayout::new(&planned_tensors(plan), &metadata);
            let writer = SafetensorsWriter::create(path, layout)?;
            let stats = run::run(plan, &writer, run_options)?;
            Ok((stats, Written::File(writer)))
        }
        OutputTarget::Sharded { folder, max_shard_bytes } => {
            let inputs = plan.input_paths();
            ensure_not_an_input(folder, &inputs)?;
            ensure_no_input_inside(folder, &inputs)?;
            let metadata = output_metadata(plan, seeds, options.embed_recipe);
            let writer = ShardedWriter::create(folder, &planned_tensors(plan), &metadata, *max_shard_bytes)?;
            let stats = run::run(plan, &writer, run_options)?;
            Ok((stats, Written::Sharded(writer)))
        }
        OutputTarget::Memory => {
            let sink = MemorySink { buffers: plan.keys.iter().map(|k| Mutex::new(vec![0u8; k.byte_len()])).collect() };
            let stats = run::run(plan, &sink, run_options)?;
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
            Ok((stats, Written::Memory(tensors)))
        }
    }
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
    };
    let mut excluded = Exclusions::default();
    let (plan, stats, written) = loop {
        let plan = plan::plan_keys(finalized, &options.plan, &excluded)?;
        // Refused when nothing can be built from the inputs' keys at all; keys emptied by
        // values found while reading (NaN inputs) are reported as skipped instead.
        if plan.keys.is_empty() && excluded.is_empty() && !options.allow_empty {
            return Err(empty_merge(&plan));
        }
        if options.strict_mandatory_keys && !plan.unbuilt_mandatory.is_empty() {
            return Err(unbuilt_mandatory(&plan));
        }
        let (stats, written) = run_once(&plan, &seeds, options, &run_options)?;
        let before = excluded.len();
        if options.omit_non_finite_inputs {
            excluded.tensors.extend(stats.non_finite_inputs.iter().copied());
        }
        excluded.nodes.extend(stats.skipped.nodes.clone());
        if excluded.len() == before {
            break (plan, stats, written);
        }
        finalized = plan.finalized; // the unfinished output is dropped, and deleted
    };
    let tensors = match written {
        Written::File(writer) => {
            writer.commit()?;
            vec![]
        }
        Written::Sharded(writer) => {
            writer.commit()?;
            vec![]
        }
        Written::Memory(tensors) => tensors,
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
    };
    Ok(MergeResult { report, tensors })
}
