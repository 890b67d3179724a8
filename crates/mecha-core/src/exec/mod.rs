//! Planning and running a merge, end to end.

pub mod cache;
pub mod convert;
pub mod hashes;
pub mod memory;
pub mod plan;
pub mod run;
pub mod stream;
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
    /// Each finished key handed to a consumer, in output order (`iterate()`).
    Stream(Arc<stream::StreamSink>),
}

impl OutputTarget {
    pub fn path(&self) -> Option<&PathBuf> {
        match self {
            OutputTarget::File(p) | OutputTarget::Sharded { folder: p, .. } => Some(p),
            OutputTarget::Memory | OutputTarget::Compare(_) | OutputTarget::Stream(_) => None,
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

/// Where one pass of a merge writes: a file not yet renamed into place, buffers, or a comparison
/// with an existing file.
enum Destination<'a> {
    File(SafetensorsWriter),
    Sharded(ShardedWriter),
    Memory(MemorySink),
    Compare(verify::CompareSink<'a>),
    Stream(&'a stream::StreamSink),
}

impl Destination<'_> {
    fn sink(&self) -> &dyn TensorSink {
        match self {
            Destination::File(w) => w,
            Destination::Sharded(w) => w,
            Destination::Memory(m) => m,
            Destination::Compare(c) => c,
            Destination::Stream(s) => *s,
        }
    }
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
/// that change the bytes and each input's hash (`None`: reserved fields of the same length, until
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
    let reserved = hashes::reserved();
    let inputs: Vec<serde_json::Value> = input_labels(plan)
        .into_iter()
        .enumerate()
        .map(|(i, model)| {
            let hash = hashes.and_then(|h| h.get(i)).map_or(reserved.as_str(), |h| h.hash.as_str());
            serde_json::json!({ "model": model, hashes::ALGORITHM: hash })
        })
        .collect();
    metadata.push(("mecha_inputs".to_string(), serde_json::Value::Array(inputs).to_string()));
    metadata
}

/// Creates where a pass writes (a temporary file for file outputs), and the hasher of the
/// inputs' bytes when the output records them (or is compared with a file that does).
fn open_destination<'a>(
    plan: &Plan,
    seeds: &[ChosenSeed],
    options: &'a MergeOptions,
) -> Result<(Destination<'a>, Option<hashes::InputHashes>)> {
    let hashes = match &options.output {
        OutputTarget::Memory | OutputTarget::Stream(_) => None,
        OutputTarget::Compare(_) => Some(hashes::InputHashes::new(plan.inputs())?),
        _ => records_recipe(plan, options).then(|| hashes::InputHashes::new(plan.inputs())).transpose()?,
    };
    let destination = match &options.output {
        OutputTarget::File(path) => {
            ensure_not_an_input(path, &plan.input_paths())?;
            let layout = FileLayout::new(&planned_tensors(plan), &output_metadata(plan, seeds, options, None));
            Destination::File(SafetensorsWriter::create(path, layout)?)
        }
        OutputTarget::Sharded { folder, max_shard_bytes } => {
            let inputs = plan.input_paths();
            ensure_not_an_input(folder, &inputs)?;
            ensure_no_input_inside(folder, &inputs)?;
            let metadata = output_metadata(plan, seeds, options, None);
            Destination::Sharded(ShardedWriter::create(folder, &planned_tensors(plan), &metadata, *max_shard_bytes)?)
        }
        OutputTarget::Memory => Destination::Memory(MemorySink {
            buffers: plan.keys.iter().map(|k| Mutex::new(vec![0u8; k.byte_len()])).collect(),
        }),
        OutputTarget::Compare(against) => Destination::Compare(verify::CompareSink::new(plan, against)),
        OutputTarget::Stream(sink) => {
            sink.start(plan)?;
            Destination::Stream(sink)
        }
    };
    Ok((destination, hashes))
}

/// Each input's hash, once the pass has read them.
fn input_hashes(plan: &Plan, hashes: Option<&hashes::InputHashes>) -> Result<Vec<InputHash>> {
    let Some(hashes) = hashes else { return Ok(vec![]) };
    Ok(hashes
        .finish(plan.inputs())?
        .into_iter()
        .zip(input_labels(plan))
        .zip(plan.inputs())
        .filter_map(|((hash, model), file)| hash.map(|hash| InputHash { model, path: file.path().to_path_buf(), hash }))
        .collect())
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

fn run_options<'a>(
    options: &'a MergeOptions,
    cancel: &'a AtomicBool,
    progress: Option<&'a dyn ProgressSink>,
) -> RunOptions<'a> {
    RunOptions {
        check_inputs: options.omit_non_finite_inputs,
        check_outputs: options.check_finite_output,
        threads: options.threads,
        chunk: options.chunk,
        cancel,
        progress,
        progress_interval: options.progress_interval,
        memory_budget: budget_or_default(options.memory_budget),
        cache: options.cache.as_ref(),
    }
}

/// Chooses the recipe's seeds and solves its spaces and configs (input headers are read).
fn prepare(recipe: Recipe, options: &MergeOptions) -> Result<(plan::Finalized, Vec<ChosenSeed>)> {
    let mut recipe = recipe;
    let seeds = choose_seeds(&mut recipe);
    let finalized = plan::finalize(recipe, &options.plan.root_space)?;
    if finalized.inputs.is_empty() {
        return Err(MechaError::recipe("the recipe has no model inputs, so there are no keys to merge"));
    }
    Ok((finalized, seeds))
}

/// Plans the keys, refusing what the options refuse.
fn plan_checked(finalized: plan::Finalized, options: &MergeOptions, excluded: &Exclusions) -> Result<Plan> {
    let plan = plan::plan_keys(finalized, &options.plan, excluded)?;
    // Refused when nothing can be built from the inputs' keys at all; keys emptied by
    // values found while reading (NaN inputs) are reported as skipped instead.
    if plan.keys.is_empty() && excluded.is_empty() && !options.allow_empty {
        return Err(empty_merge(&plan));
    }
    if options.strict_mandatory_keys && !plan.unbuilt_mandatory.is_empty() {
        return Err(unbuilt_mandatory(&plan));
    }
    Ok(plan)
}

/// Adds what a pass found (NaN inputs, keys methods skipped) to `excluded`; whether it grew, so
/// the plan must be made again without them.
fn found_exclusions(stats: &RunStats, options: &MergeOptions, excluded: &mut Exclusions) -> bool {
    let before = excluded.len();
    if options.omit_non_finite_inputs {
        excluded.tensors.extend(stats.non_finite_inputs.iter().copied());
    }
    excluded.nodes.extend(stats.skipped.nodes.clone());
    excluded.len() != before
}

/// A pass that wrote every key: its plan, stats, destination and input hashes.
struct Pass<'a> {
    plan: Plan,
    stats: RunStats,
    destination: Destination<'a>,
    hashes: Vec<InputHash>,
}

/// Plans and runs passes of one recipe until a pass finds nothing new to exclude.
fn run_passes<'a>(
    finalized: plan::Finalized,
    seeds: &[ChosenSeed],
    mut excluded: Exclusions,
    options: &'a MergeOptions,
    run_options: &RunOptions,
) -> Result<Pass<'a>> {
    let mut finalized = finalized;
    loop {
        let plan = plan_checked(finalized, options, &excluded)?;
        let (destination, hashes) = open_destination(&plan, seeds, options)?;
        let target = run::RunTarget {
            plan: &plan,
            sink: destination.sink(),
            hashes: hashes.as_ref(),
            host_context: options.host_context,
        };
        let stats = run::run(target, run_options)?;
        if !found_exclusions(&stats, options, &mut excluded) {
            let hashes = input_hashes(&plan, hashes.as_ref())?;
            return Ok(Pass { plan, stats, destination, hashes });
        }
        if let OutputTarget::Stream(_) = options.output {
            // The consumer has had the keys before the one to leave out: they cannot be taken back.
            return Err(MechaError::recipe(
                "a streamed merge found input tensors holding NaN or infinity (or keys a method skipped) \
                 after it had handed over keys, so it cannot plan again without them; iterate with \
                 omitNonFiniteInputs: false, or merge to a file",
            ));
        }
        drop(destination); // the unfinished output is dropped, and deleted
        finalized = plan.finalized;
    }
}

/// Commits a pass's output (the real input hashes replace the reserved fields the header was
/// written with, same length) and makes its report.
fn finish(
    pass: Pass,
    seeds: Vec<ChosenSeed>,
    options: &MergeOptions,
    started: Instant,
    peak_rss_bytes: u64,
) -> Result<MergeResult> {
    let Pass { plan, stats, destination, hashes: input_hashes } = pass;
    let metadata = || output_metadata(&plan, &seeds, options, Some(&input_hashes));
    let (tensors, comparison) = match destination {
        Destination::File(mut writer) => {
            writer.rewrite_metadata(&planned_tensors(&plan), &metadata())?;
            writer.commit()?;
            (vec![], None)
        }
        Destination::Sharded(mut writer) => {
            writer.rewrite_metadata(&metadata())?;
            writer.commit()?;
            (vec![], None)
        }
        Destination::Memory(sink) => {
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
            (tensors, None)
        }
        Destination::Compare(sink) => (vec![], Some(sink.finish())),
        Destination::Stream(_) => (vec![], None),
    };
    let report = MergeReport {
        output: options.output.path().cloned(),
        keys_written: plan.keys.len(),
        keys_skipped: plan.skipped.clone(),
        non_finite_outputs: stats.non_finite_outputs.iter().map(|&k| plan.keys[k].name.clone()).collect(),
        bytes_read: stats.bytes_read,
        bytes_written: stats.bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_bytes,
        memory_budget: budget_or_default(options.memory_budget),
        over_budget: stats.over_budget.iter().map(|&k| plan.keys[k].name.clone()).collect(),
        threads: if options.threads == 0 { run::auto_threads() } else { options.threads },
        recipe: recipe_text(&plan, options.embed_recipe),
        seeds,
        input_hashes,
    };
    Ok(MergeResult { report, tensors, comparison })
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
    let (finalized, seeds) = prepare(recipe, options)?;
    let pass = run_passes(finalized, &seeds, Exclusions::default(), options, &run_options(options, cancel, progress))?;
    finish(pass, seeds, options, started, peak.finish())
}

/// Merges several recipes in one pass over their inputs, each to its own output (`options`
/// apply to all but `output`, which each job gives): a key several recipes compute reads the
/// input tensors they share once, so a sweep of one recipe's parameters costs little more than
/// one merge besides the writes. Outputs are written whole or not at all: an error in any
/// merge leaves none of them (they are committed together at the end). External methods of
/// job `i` see host context `options.host_context + i`. Without a cache in `options` (limit 0),
/// the run keeps one of a quarter of the memory budget, so that a decomposition is computed once
/// for all the outputs.
///
/// A recipe whose pass finds inputs to leave out (NaN inputs, keys a method skipped) is planned
/// again and merged on its own, as `merge` would.
pub fn merge_many(
    jobs: Vec<(Recipe, OutputTarget)>,
    options: &MergeOptions,
    cancel: &AtomicBool,
    progress: Option<&dyn ProgressSink>,
) -> Result<Vec<MergeResult>> {
    let started = Instant::now();
    let peak = memory::PeakWatch::start();
    if jobs.is_empty() {
        return Err(MechaError::recipe("mergeMany needs at least one { recipe, output }"));
    }
    // Job i's external methods see host context `host_context + i`.
    let job_options: Vec<MergeOptions> = jobs
        .iter()
        .enumerate()
        .map(|(i, (_, output))| MergeOptions {
            output: output.clone(),
            host_context: options.host_context + i as u64,
            ..options.clone()
        })
        .collect();
    let in_job = |i: usize, e: MechaError| {
        let output = job_options[i].output.path().map_or(String::new(), |p| format!(" ({})", p.display()));
        MechaError { message: format!("output {}{output}: {}", i + 1, e.message), ..e }
    };
    let mut outputs: Vec<PathBuf> = vec![];
    let mut prepared = vec![];
    for (i, (recipe, output)) in jobs.into_iter().enumerate() {
        if let Some(path) = output.path() {
            if let Some(j) = outputs.iter().position(|p| p == path) {
                return Err(MechaError::recipe(format!(
                    "outputs {} and {} are both {}; give each merge its own output",
                    j + 1,
                    i + 1,
                    path.display()
                )));
            }
            outputs.push(path.clone());
        }
        let (finalized, seeds) = prepare(recipe, &job_options[i]).map_err(|e| in_job(i, e))?;
        let plan = plan_checked(finalized, &job_options[i], &Exclusions::default()).map_err(|e| in_job(i, e))?;
        prepared.push((plan, seeds));
    }
    // No output may overwrite what another merge reads.
    let every_input: Vec<PathBuf> = prepared.iter().flat_map(|(plan, _)| plan.input_paths()).collect();
    for (i, output) in job_options.iter().enumerate() {
        if let Some(path) = output.output.path() {
            ensure_not_an_input(path, &every_input).map_err(|e| in_job(i, e))?;
            ensure_no_input_inside(path, &every_input).map_err(|e| in_job(i, e))?;
        }
    }
    let mut destinations = vec![];
    for (i, (plan, seeds)) in prepared.iter().enumerate() {
        destinations.push(open_destination(plan, seeds, &job_options[i]).map_err(|e| in_job(i, e))?);
    }
    // The outputs of a sweep compute a key one after the other: without a cache of the caller's,
    // one for this run lets the later ones reuse the first one's decompositions (rotate,
    // truncate_rank) instead of computing them again.
    let sweep_cache = MethodCache::new(budget_or_default(options.memory_budget) / 4);
    let mut run_options = run_options(options, cancel, progress);
    if options.cache.limit() == 0 && prepared.len() > 1 {
        run_options.cache = &sweep_cache;
    }
    let targets: Vec<run::RunTarget> = prepared
        .iter()
        .zip(&destinations)
        .zip(&job_options)
        .map(|(((plan, _), (destination, hashes)), job)| run::RunTarget {
            plan,
            sink: destination.sink(),
            hashes: hashes.as_ref(),
            host_context: job.host_context,
        })
        .collect();
    let all_stats = run::run_many(&targets, &run_options)?;
    drop(targets);
    let mut passes = vec![];
    for (i, (((plan, seeds), (destination, hashes)), stats)) in
        prepared.into_iter().zip(destinations).zip(all_stats).enumerate()
    {
        let mut excluded = Exclusions::default();
        let pass = if found_exclusions(&stats, &job_options[i], &mut excluded) {
            drop(destination);
            run_passes(plan.finalized, &seeds, excluded, &job_options[i], &run_options).map_err(|e| in_job(i, e))?
        } else {
            let hashes = input_hashes(&plan, hashes.as_ref()).map_err(|e| in_job(i, e))?;
            Pass { plan, stats, destination, hashes }
        };
        passes.push((pass, seeds));
    }
    // Every output is complete: commit them all.
    let peak_rss_bytes = peak.finish();
    passes
        .into_iter()
        .enumerate()
        .map(|(i, (pass, seeds))| {
            finish(pass, seeds, &job_options[i], started, peak_rss_bytes).map_err(|e| in_job(i, e))
        })
        .collect()
}
