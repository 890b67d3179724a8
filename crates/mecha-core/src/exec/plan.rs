//! The planner: resolves merge spaces, opens every input once (headers only), and turns the
//! recipe into one small expression per output key, with shapes, dtypes and shortcuts decided
//! before any tensor data is read. Keys that cannot be built are listed with the reason.
//!
//! The planner knows no method by name: each merge node's key map says which input keys it
//! reads, and its plan says whether the result is forwarded, constant, skipped, streamed through
//! a chunk kernel, or computed from whole tensors (`methods::seam`).

use std::collections::{HashMap, HashSet};

use indexmap::IndexSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::configs::missing_keys::{missing_key_fill, MissingKeyFill};
use crate::dtype::DType;
use crate::error::{ErrorKind, MechaError, Result};
use crate::io::memory;
use crate::io::reader::{SafetensorsFile, TensorEntry};
use crate::methods::logistics::SINGLETON_CONFIG;
use crate::methods::seam::{ArgInfo, ChunkKernel, Decision, KeyMapCall, Meta, NodeRef, PlanCall};
use crate::methods::{MethodSpec, ValueType};
use crate::model_dirs;
use crate::recipe::dispatch;
use crate::recipe::inference::{self, ConfigSolution, ModelKeys, SolvedConfig};
use crate::recipe::mecha::{self, Annotations};
use crate::recipe::spaces::{self, RootSpace};
use crate::recipe::{NodeId, NodeKind, Recipe, Scalar, Value};

pub type ExprId = usize;

/// A key group computed by one run of a method (several outputs share it).
#[derive(Clone, Debug)]
pub struct Group {
    pub outputs: Arc<Vec<String>>,
    pub meta: Meta,
}

#[derive(Clone)]
pub enum Op {
    /// A tensor read from input file `input`, stored there as `name`.
    Source { input: usize, entry: TensorEntry, name: Arc<str> },
    /// `0, 1, 2, …` in element order (a missing-key handler's position ids).
    Arange,
    /// A value; with a shape, a tensor filled with it.
    Constant(Scalar),
    /// Values rounded to `dtype` (the merge precision).
    Round { dtype: DType, arg: ExprId },
    /// An elementwise result, streamed in chunks; `args` are the numeric arguments in
    /// parameter order. `at` is the node and the key it was asked for.
    Kernel { kernel: Arc<dyn ChunkKernel>, args: Vec<ExprId>, at: (NodeRef, String) },
    /// A result computed by the method's `run` from whole tensors: output `index` of `group`.
    Method {
        method: Arc<MethodSpec>,
        args: Vec<Vec<ExprId>>,
        group: Group,
        index: usize,
        at: (NodeRef, String),
        /// Working memory `run` needs beyond its arguments and results.
        extra_bytes: u64,
    },
}

impl Op {
    /// The expressions this one reads.
    pub fn operands(&self) -> Vec<ExprId> {
        match self {
            Op::Kernel { args, .. } => args.clone(),
            Op::Method { args, .. } => args.iter().flatten().copied().collect(),
            Op::Round { arg, .. } => vec![*arg],
            Op::Source { .. } | Op::Constant(_) | Op::Arange => vec![],
        }
    }

    /// Identifies an operation for sharing equal subexpressions within a key.
    fn fingerprint(&self) -> String {
        match self {
            Op::Source { input, name, .. } => format!("src {input} {name}"),
            Op::Constant(v) => format!("const {v:?}"),
            Op::Arange => "arange".to_string(),
            Op::Round { dtype, arg } => format!("round {dtype:?} {arg}"),
            Op::Kernel { args, at, .. } => format!("kernel {} {:?} {args:?}", at.0.index, at.1),
            Op::Method { args, at, index, .. } => format!("method {} {:?} {index} {args:?}", at.0.index, at.1),
        }
    }
}

#[derive(Clone)]
pub struct Expr {
    pub op: Op,
    /// `None`: a single value broadcast over the key.
    pub shape: Option<Vec<usize>>,
    /// The dtype the values come from, which decides integer outputs.
    pub dtype: Option<DType>,
    /// Where the values come from, for error messages.
    pub origin: String,
    /// A number or tensor; false for text and null values.
    pub numeric: bool,
}

impl Expr {
    pub fn numel(&self) -> usize {
        self.shape.as_ref().map_or(1, |s| s.iter().product())
    }
}

/// The precision arithmetic runs in.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Compute {
    F32,
    F64,
}

impl Compute {
    pub fn width(self) -> u64 {
        match self {
            Compute::F32 => 4,
            Compute::F64 => 8,
        }
    }
}
/// What the user asked arithmetic to run in: f32/f64 directly, f16/bf16 by rounding every
/// input and every intermediate result (as torch does when merging in half precision).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MergeDtype {
    F32,
    F64,
    Rounded(DType),
}

impl MergeDtype {
    /// The dtype float inputs have once read: what methods see.
    pub fn values_dtype(self) -> DType {
        match self {
            MergeDtype::F32 => DType::F32,
            MergeDtype::F64 => DType::F64,
            MergeDtype::Rounded(d) => d,
        }
    }

    /// The name `parse` reads back.
    pub fn name(self) -> &'static str {
        match self {
            MergeDtype::F32 => "float32",
            MergeDtype::F64 => "float64",
            MergeDtype::Rounded(d) => d.torch_name().unwrap_or("float16"),
        }
    }

    pub fn parse(name: &str) -> Result<MergeDtype> {
        match DType::parse_user(name) {
            Some(DType::F32) => Ok(MergeDtype::F32),
            Some(DType::F64) => Ok(MergeDtype::F64),
            Some(d @ (DType::F16 | DType::BF16)) => Ok(MergeDtype::Rounded(d)),
            _ => Err(MechaError::recipe(format!(
                "mergeDtype \"{name}\" is not supported; use f32 (default), f64, f16 or bf16"
            ))),
        }
    }
}

#[derive(Clone)]
pub struct KeyPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub compute: Compute,
    /// Children come before their parents; `root` is the last one evaluated.
    pub exprs: Vec<Expr>,
    pub root: ExprId,
    /// Every operation is elementwise, so the key can be computed in chunks.
    pub chunkable: bool,
    /// Working memory of computing the whole key at once (for keys that are not chunkable).
    pub whole_bytes: u64,
}

impl KeyPlan {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_len(&self) -> usize {
        self.dtype.byte_len(self.numel()).expect("planned dtypes have whole-byte sizes")
    }

    /// Whether the key reads any of these input tensors.
    pub fn reads_any(&self, tensors: &HashSet<TensorId>) -> bool {
        self.exprs
            .iter()
            .any(|e| matches!(&e.op, Op::Source { input, entry, .. } if tensors.contains(&(*input, entry.start))))
    }

    /// The input tensors one piece of `elements` reads, with the bytes it reads of each (the
    /// executor's rule: a chunk of a streamed key, the whole tensor for a key computed whole,
    /// one element of a broadcast scalar).
    pub fn source_reads(&self, elements: usize) -> Vec<(usize, &TensorEntry, u64)> {
        self.exprs
            .iter()
            .filter_map(|e| match &e.op {
                Op::Source { input, entry, .. } => {
                    let width = (entry.dtype.bits() / 8).max(1) as u64;
                    let broadcast = e.shape.as_ref().is_none_or(|s| s.iter().product::<usize>() == 1);
                    let bytes = if broadcast {
                        width
                    } else if self.chunkable {
                        elements.min(entry.numel()) as u64 * width
                    } else {
                        entry.byte_len as u64
                    };
                    Some((*input, entry, bytes))
                }
                _ => None,
            })
            .collect()
    }

    /// When the output is an input tensor unchanged, its bytes can be copied without decoding.
    pub fn passthrough(&self) -> Option<(usize, &TensorEntry)> {
        match &self.exprs[self.root].op {
            Op::Source { input, entry, .. } if entry.dtype == self.dtype => Some((*input, entry)),
            _ => None,
        }
    }

    /// Peak bytes live while computing `elements` of the key (a chunk, or the whole key when
    /// `None`): buffers are counted from their creation to their last reader, plus the bytes
    /// read for a source, a method's declared working memory and the encoded output.
    pub fn working_bytes(&self, elements: Option<usize>) -> u64 {
        let width = self.compute.width();
        let len = |e: &Expr| -> u64 {
            let n = e.numel();
            if n == 1 {
                return width;
            }
            match elements {
                Some(c) if self.chunkable => c.min(n) as u64 * width,
                _ => n as u64 * width,
            }
        };
        let mut last_use = vec![0usize; self.exprs.len()];
        for (i, e) in self.exprs.iter().enumerate() {
            for a in e.op.operands() {
                last_use[a] = i;
            }
        }
        last_use[self.root] = usize::MAX;
        let (mut live, mut peak) = (0u64, 0u64);
        for (i, e) in self.exprs.iter().enumerate() {
            let size = len(e);
            let transient = match &e.op {
                Op::Source { entry, .. } => size / width * entry.dtype.bits() as u64 / 8,
                Op::Method { extra_bytes, .. } => *extra_bytes,
                _ => 0,
            };
            peak = peak.max(live + size + transient);
            live += size;
            let mut operands = e.op.operands();
            operands.sort_unstable();
            operands.dedup(); // `weighted_sum(r, r)` reads one buffer twice, frees it once
            for c in operands {
                if last_use[c] == i {
                    live -= len(&self.exprs[c]);
                }
            }
        }
        let out = len(&self.exprs[self.root]) / width * self.dtype.bits() as u64 / 8;
        peak.max(live + out)
    }
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedKey {
    pub key: String,
    pub reason: String,
}

#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub merge_dtype: MergeDtype,
    pub output_dtype: DType,
    pub root_space: RootSpace,
    /// List input keys that the root config does not have among the skipped keys (sd-mecha's
    /// `check_extra_keys`, which warns about them; on by default).
    pub check_extra_keys: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            merge_dtype: MergeDtype::F32,
            output_dtype: DType::F16,
            root_space: RootSpace::default(),
            check_extra_keys: true,
        }
    }
}

pub struct Plan {
    pub finalized: Finalized,
    pub keys: Vec<KeyPlan>,
    pub skipped: Vec<SkippedKey>,
    /// Keys of the root config not marked optional that cannot be built, and why, in config
    /// order (what sd-mecha's `strict_mandatory_keys` refuses).
    pub unbuilt_mandatory: Vec<SkippedKey>,
    /// The recipe as `.mecha` text, with absolute paths, solved configs and spaces.
    pub serialized: String,
    /// How many planned keys read each multi-output group, by (node, first output key).
    pub group_uses: HashMap<(NodeId, String), usize>,
}

impl Plan {
    pub fn inputs(&self) -> &[Arc<SafetensorsFile>] {
        &self.finalized.inputs
    }

    /// Every file an input is read from (a sharded checkpoint's shards and index too): what an
    /// output must not overwrite.
    pub fn input_paths(&self) -> Vec<PathBuf> {
        let index = |f: &SafetensorsFile| f.index_path().map(std::path::Path::to_path_buf);
        self.inputs().iter().flat_map(|f| f.files().into_iter().chain(index(f))).collect()
    }

    pub fn output_bytes(&self) -> u64 {
        self.keys.iter().map(|k| k.byte_len() as u64).sum()
    }

    /// Working memory of one work unit of key `k` (a chunk when the key is chunkable).
    pub fn unit_bytes(&self, k: usize, chunk: usize) -> u64 {
        let key = &self.keys[k];
        if key.chunkable {
            key.working_bytes(Some(chunk))
        } else {
            key.whole_bytes
        }
    }

    /// Peak working memory of the executor, from the plan: `threads` units at once, admitted
    /// against `budget` (a unit larger than the budget runs alone).
    pub fn estimated_working_bytes(&self, threads: usize, chunk: usize, budget: u64) -> u64 {
        let mut units: Vec<u64> = (0..self.keys.len()).map(|k| self.unit_bytes(k, chunk)).collect();
        units.sort_unstable_by(|a, b| b.cmp(a));
        let largest = units.first().copied().unwrap_or(0);
        let together: u64 = units.iter().take(threads.max(1)).sum();
        largest.max(together.min(budget))
    }
}

/// A recipe with every node's merge space and model config solved and its inputs opened
/// (headers only). Serialization and planning both start here.
pub struct Finalized {
    pub recipe: Recipe,
    pub spaces: Vec<Option<String>>,
    pub configs: ConfigSolution,
    pub inputs: Vec<Arc<SafetensorsFile>>,
    /// Input file of each model node.
    pub model_input: Vec<Option<usize>>,
    /// Per node, the identity its method cache entries are stored under.
    pub cache_ids: Vec<u64>,
}

impl Finalized {
    pub fn root_config(&self) -> &SolvedConfig {
        self.configs.configs[self.recipe.root].as_ref().expect("the root is solved")
    }

    /// Whether a model of the recipe is held in memory (`model(stateDict)`): such a recipe has no
    /// `.mecha` text that reproduces it.
    pub fn has_memory_inputs(&self) -> bool {
        self.inputs.iter().any(|f| f.in_memory())
    }

    /// The recipe as `.mecha` text, as sd-mecha serializes a finalized recipe, with absolute
    /// model paths.
    pub fn to_mecha(&self) -> String {
        self.to_mecha_with(RecipePaths::Absolute)
    }

    /// The recipe as `.mecha` text, with model paths written as `paths` says.
    pub fn to_mecha_with(&self, paths_as: RecipePaths) -> String {
        let n = self.recipe.nodes.len();
        let mut configs = vec![None; n];
        let mut paths = vec![None; n];
        for (i, node) in self.recipe.nodes.iter().enumerate() {
            if matches!(node.kind, NodeKind::Model { .. } | NodeKind::Literal { .. }) {
                configs[i] = self.configs.configs[i].as_ref().map(|c| c.id().to_string());
            }
            if let (RecipePaths::Absolute, Some(input)) = (paths_as, self.model_input[i]) {
                paths[i] = Some(self.inputs[input].path().to_string_lossy().into_owned());
            }
        }
        mecha::serialize(&self.recipe, &Annotations { configs: &configs, spaces: &self.spaces, paths: &paths })
    }
}

/// How a serialized recipe writes model paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecipePaths {
    /// As the recipe gave them (what sd-mecha's `merge` stores: no user folders revealed).
    AsGiven,
    /// Resolved to absolute paths (what sd-mecha's `serialize` of a finalized recipe writes).
    Absolute,
}

/// The distinct input files of a recipe, opened once (headers only).
pub struct Inputs {
    pub files: Vec<Arc<SafetensorsFile>>,
    /// Input file of each model node.
    pub model_input: Vec<Option<usize>>,
    pub model_keys: ModelKeys,
}

/// What a model node reads: a file (by resolved path) or an in-memory model.
#[derive(Hash, PartialEq, Eq)]
enum InputSource {
    File(PathBuf),
    Memory(u64),
}

pub fn open_inputs(recipe: &Recipe) -> Result<Inputs> {
    let mut files: Vec<Arc<SafetensorsFile>> = vec![];
    let mut by_source: HashMap<InputSource, usize> = HashMap::new();
    let mut model_input: Vec<Option<usize>> = vec![None; recipe.nodes.len()];
    let mut model_keys: ModelKeys = HashMap::new();
    let mut key_sets: Vec<Arc<IndexSet<String>>> = vec![];
    for n in recipe.models() {
        let NodeKind::Model { path, memory } = &recipe.node(n).kind else { unreachable!() };
        let source = match memory {
            Some(id) => InputSource::Memory(*id),
            None => InputSource::File(model_dirs::resolve(path)),
        };
        let index = match by_source.get(&source) {
            Some(&i) => i,
            None => {
                let file = match &source {
                    InputSource::Memory(id) => memory::get(*id),
                    InputSource::File(resolved) => SafetensorsFile::open(resolved).map(Arc::new),
                }
                .map_err(|e| e.within_node(&recipe.trace(n)))?;
                key_sets.push(Arc::new(file.tensors().keys().cloned().collect()));
                files.push(file);
                by_source.insert(source, files.len() - 1);
                files.len() - 1
            }
        };
        model_input[n] = Some(index);
        model_keys.insert(n, key_sets[index].clone());
    }
    Ok(Inputs { files, model_input, model_keys })
}

/// Solves merge spaces, opens each distinct input once and infers model configs.
pub fn finalize(recipe: Recipe, root_space: &RootSpace) -> Result<Finalized> {
    let mut spaces = spaces::infer(&recipe, root_space)?;
    let Inputs { files, model_input, model_keys } = open_inputs(&recipe)?;
    let recipe = match dispatch::dispatch(&recipe, &model_keys)? {
        Some(dispatched) => {
            // The implementations' signatures may fix spaces the interfaces left open.
            spaces = spaces::infer(&dispatched, root_space)?;
            dispatched
        }
        None => recipe,
    };
    let configs = inference::infer(&recipe, &model_keys, &[SINGLETON_CONFIG])?;
    let cache_ids = recipe.cache_identities();
    Ok(Finalized { recipe, spaces, configs, inputs: files, model_input, cache_ids })
}

/// An input tensor, as (input file index, data offset): what a merge found non-finite values in.
pub type TensorId = (usize, usize);

/// What a merge found it must leave out, so the next planning pass treats it as missing: input
/// tensors holding NaN or infinity, and (node, key) pairs a method skipped while running.
#[derive(Clone, Debug, Default)]
pub struct Exclusions {
    pub tensors: HashSet<TensorId>,
    pub nodes: HashMap<(NodeId, String), String>,
}

impl Exclusions {
    pub fn len(&self) -> usize {
        self.tensors.len() + self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn plan(recipe: Recipe, options: &PlanOptions) -> Result<Plan> {
    let finalized = finalize(recipe, &options.root_space)?;
    if finalized.inputs.is_empty() {
        return Err(MechaError::recipe("the recipe has no model inputs, so there are no keys to merge"));
    }
    plan_keys(finalized, options, &Exclusions::default())
}

/// Plans the keys of a finalized recipe, treating what `excluded` names as missing.
pub fn plan_keys(finalized: Finalized, options: &PlanOptions, excluded: &Exclusions) -> Result<Plan> {
    let root_config = finalized.root_config();
    let ctx = Context { f: &finalized, options, excluded };
    let mut keys = vec![];
    let mut failures: HashMap<String, String> = HashMap::new();
    // sd-mecha writes the root config's keys that can be built, in config order.
    let mut unbuilt_mandatory = vec![];
    let planned: Vec<(&str, std::result::Result<KeyPlan, String>)> =
        root_config.keys().into_iter().map(|key| Ok((key, ctx.plan_key(key)?))).collect::<Result<_>>()?;
    // A missing-key handler fills what a component lacks only where the result has the rest of it.
    let built: HashSet<&str> = planned.iter().filter(|(_, p)| p.is_ok()).map(|(k, _)| *k).collect();
    for (key, result) in planned {
        match result {
            Ok(k) => keys.push(k),
            Err(reason) => {
                if let Some(filled) = ctx.filled_missing_key(key, &built) {
                    keys.push(filled);
                    continue;
                }
                let optional = root_config.as_named().and_then(|c| c.get(key)).is_some_and(|m| m.optional);
                if !optional {
                    unbuilt_mandatory.push(SkippedKey { key: key.to_string(), reason: reason.clone() });
                }
                failures.insert(key.to_string(), reason);
            }
        }
    }
    // Report what an input has that the output lacks: missing elsewhere, or outside the config.
    let written: HashSet<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    let read: HashSet<(usize, &str)> = keys
        .iter()
        .flat_map(|k| &k.exprs)
        .filter_map(|e| match &e.op {
            Op::Source { input, name, .. } => Some((*input, name.as_ref())),
            _ => None,
        })
        .collect();
    let lora_inputs = lora_inputs(&finalized);
    let mut skipped = vec![];
    let mut reported: HashSet<String> = HashSet::new();
    for (index, file) in finalized.inputs.iter().enumerate() {
        for name in file.tensors().keys() {
            if lora_inputs.contains(&index) {
                // A LoRA key that changes nothing is worth knowing about, whatever the options.
                if !read.contains(&(index, name.as_str())) && reported.insert(name.clone()) {
                    let reason = "LoRA key not applied: no key of the base model is built from it (a layer the \
                                  base lacks, or an incomplete set of factors)";
                    skipped.push(SkippedKey { key: name.clone(), reason: reason.into() });
                }
                continue;
            }
            let canonical = match root_config.as_named() {
                Some(c) => c.resolve_alias(name).unwrap_or(name),
                None => name.as_str(),
            };
            let used = written.contains(canonical) || read.contains(&(index, name.as_str()));
            if used || !reported.insert(canonical.to_string()) {
                continue;
            }
            let reason = match failures.get(canonical) {
                Some(reason) => reason.clone(),
                None if !options.check_extra_keys => continue,
                None => format!("not a key of the model config \"{}\"", root_config.id()),
            };
            skipped.push(SkippedKey { key: canonical.to_string(), reason });
        }
    }
    // Keys of the config that no input has are not listed; skips decided by methods are.
    for (key, reason) in &failures {
        if !reported.contains(key) && excluded.nodes.keys().any(|(_, k)| k == key) {
            skipped.push(SkippedKey { key: key.clone(), reason: reason.clone() });
        }
    }
    let mut group_uses: HashMap<(NodeId, String), usize> = HashMap::new();
    for k in &keys {
        let mut seen = HashSet::new();
        for e in &k.exprs {
            if let Op::Method { group, at, .. } = &e.op {
                let id = (at.0.index, group.outputs[0].clone());
                if group.outputs.len() > 1 && seen.insert(id.clone()) {
                    *group_uses.entry(id).or_default() += 1;
                }
            }
        }
    }
    let serialized = finalized.to_mecha();
    Ok(Plan { finalized, keys, skipped, unbuilt_mandatory, serialized, group_uses })
}

/// The input files whose model nodes are in a LoRA config (`…_kohya_lora`, `…_lycoris_lora`).
fn lora_inputs(f: &Finalized) -> HashSet<usize> {
    f.model_input
        .iter()
        .enumerate()
        .filter_map(|(node, input)| {
            let config = f.configs.configs[node].as_ref()?;
            (*input).filter(|_| crate::configs::lycoris::is_lora_config(config.id()))
        })
        .collect()
}

struct Context<'a> {
    f: &'a Finalized,
    options: &'a PlanOptions,
    excluded: &'a Exclusions,
}

/// `Err(reason)`: the node cannot provide this key (the key is skipped, not an error).
type Built = std::result::Result<ExprId, String>;

/// One step of building a (node, key) pair.
enum Step {
    Done(Built),
    /// This input pair must be built first.
    Needs((NodeId, String)),
}

struct KeyBuilder<'a> {
    ctx: &'a Context<'a>,
    key: &'a str,
    exprs: Vec<Expr>,
    dedup: HashMap<String, ExprId>,
    memo: HashMap<(NodeId, String), Built>,
}

impl Context<'_> {
    /// The root config's missing-key handler's value for a key the recipe cannot build: only
    /// for components the result has (a text encoder's pruned layer, not a whole missing one).
    fn filled_missing_key(&self, key: &str, built: &HashSet<&str>) -> Option<KeyPlan> {
        let config = self.f.root_config().as_named()?;
        let fill = missing_key_fill(&config.id, key)?;
        let component = &config.components()[config.component_of(key)?];
        if !component.keys.keys().any(|k| built.contains(k.as_str())) {
            return None;
        }
        let meta = config.get(key)?;
        let shape = meta.shape.clone()?;
        let (op, dtype, compute) = match fill {
            MissingKeyFill::Arange => (Op::Arange, meta.dtype.unwrap_or(DType::I64), Compute::F64),
            MissingKeyFill::Zeros => (Op::Constant(Scalar::Float(0.0)), self.options.output_dtype, Compute::F32),
        };
        let origin = format!("the missing-key handler of \"{}\"", config.id);
        let expr = Expr { op, shape: Some(shape.clone()), dtype: Some(dtype), origin, numeric: true };
        let mut plan = KeyPlan {
            name: key.to_string(),
            shape,
            dtype,
            compute,
            exprs: vec![expr],
            root: 0,
            chunkable: true,
            whole_bytes: 0,
        };
        plan.whole_bytes = plan.working_bytes(None);
        Some(plan)
    }

    fn plan_key(&self, key: &str) -> Result<std::result::Result<KeyPlan, String>> {
        let mut b = KeyBuilder { ctx: self, key, exprs: vec![], dedup: HashMap::new(), memo: HashMap::new() };
        let root = match b.build(self.f.recipe.root, key)? {
            Err(reason) => return Ok(Err(reason)),
            Ok(e) if !b.exprs[e].numeric => {
                return Err(MechaError::recipe("the recipe's result is a text value, not tensors")
                    .within_node(&self.f.recipe.node(self.f.recipe.root).label()))
            }
            Ok(e) => b.in_merge_precision(e),
        };
        let Some(shape) = b.exprs[root].shape.clone() else {
            return Ok(Err("no model input provides this key; the result would be a bare number".into()));
        };
        let natural = b.exprs[root].dtype;
        let dtype = match natural {
            Some(d) if !d.is_float() => d, // integers, bools and raw-only dtypes keep their dtype
            _ => self.options.output_dtype,
        };
        let wide_ints =
            b.exprs.iter().any(|e| matches!(e.dtype, Some(DType::I32 | DType::U32 | DType::I64 | DType::U64)));
        let compute =
            if self.options.merge_dtype == MergeDtype::F64 || wide_ints { Compute::F64 } else { Compute::F32 };
        let chunkable = b.exprs.iter().all(|e| !matches!(e.op, Op::Method { .. }));
        let mut plan =
            KeyPlan { name: key.to_string(), shape, dtype, compute, exprs: b.exprs, root, chunkable, whole_bytes: 0 };
        plan.whole_bytes = plan.working_bytes(None);
        Ok(Ok(plan))
    }
}

impl KeyBuilder<'_> {
    fn push(&mut self, expr: Expr) -> ExprId {
        let fingerprint = format!("{}|{:?}", expr.op.fingerprint(), expr.shape);
        if let Some(&id) = self.dedup.get(&fingerprint) {
            return id;
        }
        self.exprs.push(expr);
        self.dedup.insert(fingerprint, self.exprs.len() - 1);
        self.exprs.len() - 1
    }

    /// With a half-precision merge dtype, every operand and the result are rounded to it.
    fn in_merge_precision(&mut self, id: ExprId) -> ExprId {
        let e = &self.exprs[id];
        let exact = match &e.op {
            Op::Round { dtype, .. } | Op::Source { entry: TensorEntry { dtype, .. }, .. } => Some(*dtype),
            _ => None,
        };
        match self.ctx.options.merge_dtype {
            MergeDtype::Rounded(dtype) if e.shape.is_some() && e.numeric && exact != Some(dtype) => {
                let (shape, natural, origin) = (e.shape.clone(), e.dtype, e.origin.clone());
                self.push(Expr { op: Op::Round { dtype, arg: id }, shape, dtype: natural, origin, numeric: true })
            }
            _ => id,
        }
    }

    fn constant(&mut self, v: Scalar, origin: &str) -> ExprId {
        let numeric = !matches!(v, Scalar::Str(_) | Scalar::Null);
        self.push(Expr { op: Op::Constant(v), shape: None, dtype: None, origin: origin.into(), numeric })
    }

    /// Builds (node, key) and everything it depends on without recursion (recipes may be chains
    /// of 100,000 nodes): each step either finishes a pair or names the one input pair it needs
    /// next, which is built first. Inputs are requested in the order a recursive builder would
    /// visit them, and no further, so errors and skips are the same.
    fn build(&mut self, node: NodeId, key: &str) -> Result<Built> {
        let mut pending = vec![(node, key.to_string())];
        while let Some((n, k)) = pending.last().cloned() {
            if self.memo.contains_key(&(n, k.clone())) {
                pending.pop();
                continue;
            }
            let step = match self.ctx.excluded.nodes.get(&(n, k.clone())) {
                Some(reason) => Ok(Step::Done(Err(reason.clone()))),
                None => self.step(n, &k),
            }
            .map_err(|e| {
                let e = if e.key.is_none() { e.with_key(self.key) } else { e };
                if e.node.is_none() {
                    e.within_node(&self.ctx.f.recipe.trace(n))
                } else {
                    e
                }
            })?;
            match step {
                Step::Done(built) => {
                    self.memo.insert((n, k), built);
                    pending.pop();
                }
                Step::Needs(input) => pending.push(input),
            }
        }
        Ok(self.memo[&(node, key.to_string())].clone())
    }

    /// An input pair's result if it has been built, or the step that asks for it.
    fn built(&self, node: NodeId, key: &str) -> std::result::Result<Built, Step> {
        self.memo.get(&(node, key.to_string())).cloned().ok_or_else(|| Step::Needs((node, key.to_string())))
    }

    fn step(&mut self, node: NodeId, key: &str) -> Result<Step> {
        let recipe = &self.ctx.f.recipe;
        let n = recipe.node(node);
        let config = self.ctx.f.configs.configs[node].as_ref().expect("reachable nodes are solved");
        let in_domain = self.ctx.f.configs.domains[node].as_ref().is_some_and(|d| d.contains(key));
        // The names a key may have in this node's inputs: itself, then its aliases.
        let names = || std::iter::once(key).chain(config.aliases(key).iter().map(String::as_str));
        match &n.kind {
            NodeKind::Model { .. } => {
                let input = self.ctx.f.model_input[node].expect("every model was opened");
                let file = &self.ctx.f.inputs[input];
                let found = if in_domain { names().find_map(|name| Some((name, file.entry(name)?))) } else { None };
                let Some((name, entry)) = found else {
                    return Ok(Step::Done(Err(format!("missing from {}", file.path().display()))));
                };
                if self.ctx.excluded.tensors.contains(&(input, entry.start)) {
                    return Ok(Step::Done(Err(format!(
                        "non-finite values (NaN or infinity) in {}",
                        file.path().display()
                    ))));
                }
                let id = self.push(Expr {
                    op: Op::Source { input, entry: entry.clone(), name: name.into() },
                    shape: Some(entry.shape.clone()),
                    dtype: Some(entry.dtype),
                    origin: file.path().display().to_string(),
                    numeric: true,
                });
                Ok(Step::Done(Ok(id)))
            }
            NodeKind::Literal { entries } => {
                let found = if in_domain { names().find_map(|name| entries.get(name)) } else { None };
                Ok(match found {
                    None => Step::Done(Err(format!("missing from {}", n.label()))),
                    Some(Value::Node(child)) => self.built(*child, key).map_or_else(|needs| needs, Step::Done),
                    Some(Value::Scalar(s)) => Step::Done(Ok(self.constant(s.clone(), &n.label()))),
                })
            }
            NodeKind::Merge { method, inputs } => {
                // A method maps the keys of its result's config (sd-mecha's key map).
                if !in_domain || !config.contains(key) {
                    let why = format!("{} produces no key \"{key}\" for config \"{}\"", method.id, config.id());
                    return Ok(Step::Done(Err(why)));
                }
                self.build_merge(node, method, inputs, key, config)
            }
        }
    }

    /// The visible dtype of an argument: float inputs are computed in the merge dtype.
    fn arg_info(&self, id: ExprId) -> ArgInfo {
        let e = &self.exprs[id];
        let merge = self.ctx.options.merge_dtype.values_dtype();
        let (exact, dtype) = match &e.op {
            Op::Source { entry, .. } if entry.dtype.is_float() => (true, Some(merge)),
            Op::Source { .. } | Op::Round { .. } => (true, e.dtype),
            _ => (false, e.dtype),
        };
        let constant = match (&e.op, &e.shape) {
            (Op::Constant(v), None) => Some(v.clone()),
            _ => None,
        };
        ArgInfo { shape: e.shape.clone(), dtype, exact, constant, origin: e.origin.clone(), numeric: e.numeric }
    }

    fn build_merge(
        &mut self,
        node: NodeId,
        method: &Arc<MethodSpec>,
        inputs: &[Vec<NodeId>],
        key: &str,
        config: &SolvedConfig,
    ) -> Result<Step> {
        let implementation = method.implementation.clone();
        let Some(relation) = implementation.key_map(&KeyMapCall {
            method,
            key,
            config,
            merge_space: self.ctx.f.spaces[node].as_deref(),
        }) else {
            return Ok(Step::Done(Err(format!("{} has no source keys for \"{key}\"", method.id))));
        };
        // The first clause whose inputs all exist.
        let mut chosen = None;
        let mut reason = format!("{} has no way to build \"{key}\"", method.id);
        'clauses: for clause in &relation.clauses {
            let mut args: Vec<Vec<ExprId>> = vec![];
            for (p, children) in inputs.iter().enumerate() {
                let mut values = vec![];
                if let Some(Some(keys)) = clause.inputs.get(p) {
                    for &child in children {
                        for k in keys {
                            match self.built(child, k) {
                                Ok(Ok(e)) => values.push(e),
                                Ok(Err(why)) => {
                                    reason = why;
                                    continue 'clauses;
                                }
                                Err(needs) => return Ok(needs),
                            }
                        }
                    }
                }
                args.push(values);
            }
            chosen = Some((clause, args));
            break;
        }
        let Some((clause, args)) = chosen else {
            return Ok(Step::Done(Err(reason)));
        };
        // Text cannot stand in for numbers or tensors; null can where it is the default
        // (sd-mecha's `seed: int = None`).
        for (param, values) in method.params.iter().zip(&args) {
            let numeric = !matches!(param.value_type, ValueType::Str | ValueType::Any);
            let optional = param.default == Some(crate::methods::DefaultValue::Null);
            let is_null = |e: usize| matches!(self.exprs[e].op, Op::Constant(Scalar::Null));
            if let Some(&bad) = values.iter().find(|&&e| numeric && !self.exprs[e].numeric && !(optional && is_null(e)))
            {
                return Err(MechaError::recipe(format!(
                    "{}: \"{}\" expects {}, but received a text value (from {})",
                    method.id,
                    param.name,
                    if param.value_type == ValueType::Tensor { "tensors or numbers" } else { param.value_type.name() },
                    self.exprs[bad].origin
                )));
            }
        }
        let input_configs =
            inputs.iter().map(|c| c.first().and_then(|&n| self.ctx.f.configs.configs[n].as_ref())).collect();
        let call = PlanCall {
            method,
            key,
            outputs: &relation.outputs,
            meta: &clause.meta,
            args: args.iter().map(|a| a.iter().map(|&e| self.arg_info(e)).collect()).collect(),
            input_configs,
            config,
            merge_dtype: self.ctx.options.merge_dtype.values_dtype(),
        };
        let decision = implementation.plan(&call)?;
        let origin = method.id.clone();
        let spec = match decision {
            Decision::Forward { param, index } => {
                return match args.get(param).and_then(|a| a.get(index)) {
                    Some(&e) => Ok(Step::Done(Ok(e))),
                    None => Err(call.fail(format!("forwards argument {index} of parameter {param}, which is absent"))),
                };
            }
            Decision::Constant(v) => return Ok(Step::Done(Ok(self.constant(v, &origin)))),
            Decision::Fill { value, shape, dtype } => {
                let id = self.push(Expr {
                    op: Op::Constant(Scalar::Float(value)),
                    shape: Some(shape),
                    dtype,
                    origin,
                    numeric: true,
                });
                return Ok(Step::Done(Ok(id)));
            }
            Decision::Skip(why) => return Ok(Step::Done(Err(why))),
            Decision::Compute(spec) => spec,
        };
        // Arithmetic reads every tensor in the merge precision; raw-only dtypes cannot be read.
        let mut rounded = vec![];
        for values in &args {
            let mut out = vec![];
            for &e in values {
                if let Some(d) = self.exprs[e].dtype.filter(|d| !d.is_numeric() && self.exprs[e].shape.is_some()) {
                    return Err(MechaError::new(
                        ErrorKind::Shape,
                        format!(
                            "{}: cannot compute on dtype {d} (from {}); it can only be passed through",
                            method.id, self.exprs[e].origin
                        ),
                    ));
                }
                out.push(self.in_merge_precision(e));
            }
            rounded.push(out);
        }
        let dtype = spec.dtype.or_else(|| {
            rounded.iter().flatten().find(|&&e| self.exprs[e].shape.is_some()).and_then(|&e| self.exprs[e].dtype)
        });
        let at = (
            NodeRef { index: node, source: self.ctx.f.recipe.source_index[node], identity: self.ctx.f.cache_ids[node] },
            key.to_string(),
        );
        let numeric = method.returns.value_type != ValueType::Str;
        let op = match spec.kernel {
            Some(kernel) => {
                let numeric_args = rounded.iter().flatten().copied().filter(|&e| self.exprs[e].numeric).collect();
                Op::Kernel { kernel, args: numeric_args, at }
            }
            None => {
                let index = relation.outputs.iter().position(|o| o == key).unwrap_or(0);
                let group = Group { outputs: Arc::new(relation.outputs.clone()), meta: clause.meta.clone() };
                Op::Method { method: method.clone(), args: rounded, group, index, at, extra_bytes: spec.extra_bytes }
            }
        };
        Ok(Step::Done(Ok(self.push(Expr { op, shape: spec.shape, dtype, origin, numeric }))))
    }
}
