//! The planner: resolves merge spaces, opens every input once (headers only), and turns the
//! recipe into one small expression per output key, with shapes, dtypes and shortcuts decided
//! before any tensor data is read. Keys that cannot be built are listed with the reason.

use std::collections::{HashMap, HashSet};

use indexmap::IndexSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{ErrorKind, MechaError, Result};
use crate::io::reader::{SafetensorsFile, TensorEntry};
use crate::methods::linear::{Kernel, Shortcut};
use crate::methods::logistics::SINGLETON_CONFIG;
use crate::methods::{ExternalMethod, Implementation, ParamKind, ValueType};
use crate::model_dirs;
use crate::recipe::inference::{self, ConfigSolution, ModelKeys, SolvedConfig};
use crate::recipe::mecha::{self, Annotations};
use crate::recipe::spaces::{self, RootSpace};
use crate::recipe::{NodeId, NodeKind, Recipe, Scalar, Value};

pub type ExprId = usize;

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A tensor read from input file `input`.
    Source {
        input: usize,
        entry: TensorEntry,
    },
    /// A number, broadcast (or, with a shape, filling a tensor).
    Constant(f64),
    Apply {
        kernel: Kernel,
        args: Vec<ExprId>,
    },
    /// Values rounded to `dtype` (toward zero for integer dtypes, as torch's `.to()` does).
    Round {
        dtype: DType,
        arg: ExprId,
    },
    /// A host-supplied method (JavaScript), called with every parameter's value.
    External {
        method: Arc<ExternalMethod>,
        node: NodeId,
        args: Vec<ExternalOperand>,
    },
}

/// A parameter of an external call, as planned.
#[derive(Clone, Debug, PartialEq)]
pub enum ExternalOperand {
    Tensor(ExprId),
    /// Varargs, or several keys of a routed input.
    Tensors(Vec<ExprId>),
    Text(Option<String>),
}

impl Op {
    /// The expressions this one reads.
    pub fn operands(&self) -> Vec<ExprId> {
        match self {
            Op::Apply { args, .. } => args.clone(),
            Op::Round { arg, .. } => vec![*arg],
            Op::External { args, .. } => args
                .iter()
                .flat_map(|a| match a {
                    ExternalOperand::Tensor(e) => vec![*e],
                    ExternalOperand::Tensors(es) => es.clone(),
                    ExternalOperand::Text(_) => vec![],
                })
                .collect(),
            Op::Source { .. } | Op::Constant(_) => vec![],
        }
    }
}

impl PartialEq for ExternalMethod {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

#[derive(Clone, Debug)]
pub struct Expr {
    pub op: Op,
    /// `None`: a single value broadcast over the key.
    pub shape: Option<Vec<usize>>,
    /// The dtype the values come from, which decides integer outputs.
    pub dtype: Option<DType>,
    /// Where the values come from, for error messages.
    pub origin: String,
}

/// The precision arithmetic runs in.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Compute {
    F32,
    F64,
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

#[derive(Clone, Debug)]
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
            .any(|e| matches!(&e.op, Op::Source { input, entry } if tensors.contains(&(*input, entry.start))))
    }

    /// When the output is an input tensor unchanged, its bytes can be copied without decoding.
    pub fn passthrough(&self) -> Option<(usize, &TensorEntry)> {
        match &self.exprs[self.root].op {
            Op::Source { input, entry } if entry.dtype == self.dtype => Some((*input, entry)),
            _ => None,
        }
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
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { merge_dtype: MergeDtype::F32, output_dtype: DType::F16, root_space: RootSpace::default() }
    }
}

pub struct Plan {
    pub finalized: Finalized,
    pub keys: Vec<KeyPlan>,
    pub skipped: Vec<SkippedKey>,
    /// The recipe as `.mecha` text, with absolute paths, solved configs and spaces.
    pub serialized: String,
}

impl Plan {
    pub fn inputs(&self) -> &[Arc<SafetensorsFile>] {
        &self.finalized.inputs
    }

    pub fn input_paths(&self) -> Vec<PathBuf> {
        self.inputs().iter().map(|f| f.path().to_path_buf()).collect()
    }

    pub fn output_bytes(&self) -> u64 {
        self.keys.iter().map(|k| k.byte_len() as u64).sum()
    }

    /// Peak working memory of the executor, from the plan: per thread, the buffers of the
    /// largest work unit (every intermediate of a chunk, the bytes read and written).
    pub fn estimated_working_bytes(&self, threads: usize, chunk: usize) -> u64 {
        let per_unit = self
            .keys
            .iter()
            .map(|k| {
                let n = k.numel().min(chunk) as u64;
                let width = match k.compute {
                    Compute::F32 => 4,
                    Compute::F64 => 8,
                };
                k.exprs.len() as u64 * n * width + n * 8 + k.dtype.byte_len(n as usize).unwrap_or(0) as u64
            })
            .max()
            .unwrap_or(0);
        per_unit * threads as u64
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
}

impl Finalized {
    pub fn root_config(&self) -> &SolvedConfig {
        self.configs.configs[self.recipe.root].as_ref().expect("the root is solved")
    }

    /// The recipe as `.mecha` text, as sd-mecha serializes a finalized recipe.
    pub fn to_mecha(&self) -> String {
        let n = self.recipe.nodes.len();
        let mut configs = vec![None; n];
        let mut paths = vec![None; n];
        for (i, node) in self.recipe.nodes.iter().enumerate() {
            if matches!(node.kind, NodeKind::Model { .. } | NodeKind::Literal { .. }) {
                configs[i] = self.configs.configs[i].as_ref().map(|c| c.id().to_string());
            }
            if let Some(input) = self.model_input[i] {
                paths[i] = Some(self.inputs[input].path().to_string_lossy().into_owned());
            }
        }
        mecha::serialize(&self.recipe, &Annotations { configs: &configs, spaces: &self.spaces, paths: &paths })
    }
}

/// The distinct input files of a recipe, opened once (headers only).
pub struct Inputs {
    pub files: Vec<Arc<SafetensorsFile>>,
    /// Input file of each model node.
    pub model_input: Vec<Option<usize>>,
    pub model_keys: ModelKeys,
}

pub fn open_inputs(recipe: &Recipe) -> Result<Inputs> {
    let mut files: Vec<Arc<SafetensorsFile>> = vec![];
    let mut by_path: HashMap<PathBuf, usize> = HashMap::new();
    let mut model_input: Vec<Option<usize>> = vec![None; recipe.nodes.len()];
    let mut model_keys: ModelKeys = HashMap::new();
    let mut key_sets: Vec<Arc<IndexSet<String>>> = vec![];
    for n in recipe.models() {
        let NodeKind::Model { path } = &recipe.node(n).kind else { unreachable!() };
        let resolved = model_dirs::resolve(path);
        let index = match by_path.get(&resolved) {
            Some(&i) => i,
            None => {
                let file = SafetensorsFile::open(&resolved).map_err(|e| e.within_node(&recipe.trace(n)))?;
                key_sets.push(Arc::new(file.tensors().keys().cloned().collect()));
                files.push(Arc::new(file));
                by_path.insert(resolved, files.len() - 1);
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
    let spaces = spaces::infer(&recipe, root_space)?;
    let Inputs { files, model_input, model_keys } = open_inputs(&recipe)?;
    let configs = inference::infer(&recipe, &model_keys, &[SINGLETON_CONFIG])?;
    Ok(Finalized { recipe, spaces, configs, inputs: files, model_input })
}

/// An input tensor, as (input file index, data offset): what a merge found non-finite values in.
pub type TensorId = (usize, usize);

pub fn plan(recipe: Recipe, options: &PlanOptions) -> Result<Plan> {
    let finalized = finalize(recipe, &options.root_space)?;
    if finalized.inputs.is_empty() {
        return Err(MechaError::recipe("the recipe has no model inputs, so there are no keys to merge"));
    }
    plan_keys(finalized, options, &HashSet::new())
}

/// Plans the keys of a finalized recipe, treating the `excluded` input tensors as missing (as
/// sd-mecha's `omit_non_finite_inputs` does for tensors holding NaN or infinity).
pub fn plan_keys(finalized: Finalized, options: &PlanOptions, excluded: &HashSet<TensorId>) -> Result<Plan> {
    let root_config = finalized.root_config();
    let ctx = Context { f: &finalized, options, excluded };
    let mut keys = vec![];
    let mut failures: HashMap<String, String> = HashMap::new();
    // sd-mecha writes the root config's keys that can be built, in config order.
    for key in root_config.keys() {
        match ctx.plan_key(key)? {
            Ok(k) => keys.push(k),
            Err(reason) => {
                failures.insert(key.to_string(), reason);
            }
        }
    }
    // Report what an input has that the output lacks: missing elsewhere, or outside the config.
    let written: HashSet<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    let mut skipped = vec![];
    let mut reported: HashSet<String> = HashSet::new();
    for file in &finalized.inputs {
        for name in file.tensors().keys() {
            let canonical = match root_config.as_named() {
                Some(c) => c.resolve_alias(name).unwrap_or(name),
                None => name.as_str(),
            };
            if written.contains(canonical) || !reported.insert(canonical.to_string()) {
                continue;
            }
            let reason = failures
                .get(canonical)
                .cloned()
                .unwrap_or_else(|| format!("not a key of the model config \"{}\"", root_config.id()));
            skipped.push(SkippedKey { key: canonical.to_string(), reason });
        }
    }
    let serialized = finalized.to_mecha();
    Ok(Plan { finalized, keys, skipped, serialized })
}

struct Context<'a> {
    f: &'a Finalized,
    options: &'a PlanOptions,
    excluded: &'a HashSet<TensorId>,
}

/// What a node yields for one key: a numeric expression or a text/null parameter value.
#[derive(Clone, Debug)]
enum Planned {
    Expr(ExprId),
    Text(Option<String>),
}

/// `Err(reason)`: the node cannot provide this key (the key is skipped, not an error).
type Built = std::result::Result<Planned, String>;

struct KeyBuilder<'a> {
    ctx: &'a Context<'a>,
    key: &'a str,
    exprs: Vec<Expr>,
    dedup: HashMap<String, ExprId>,
    memo: HashMap<(NodeId, String), Built>,
}

impl Context<'_> {
    fn plan_key(&self, key: &str) -> Result<std::result::Result<KeyPlan, String>> {
        let mut b = KeyBuilder { ctx: self, key, exprs: vec![], dedup: HashMap::new(), memo: HashMap::new() };
        let root = match b.build(self.f.recipe.root, key)? {
            Err(reason) => return Ok(Err(reason)),
            Ok(Planned::Text(_)) => {
                return Err(MechaError::recipe("the recipe's result is a text value, not tensors")
                    .within_node(&self.f.recipe.node(self.f.recipe.root).label()))
            }
            Ok(Planned::Expr(e)) => b.in_merge_precision(e),
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
        let chunkable = b.exprs.iter().all(|e| match &e.op {
            Op::External { method, .. } => method.elementwise,
            _ => true,
        });
        Ok(Ok(KeyPlan { name: key.to_string(), shape, dtype, compute, exprs: b.exprs, root, chunkable }))
    }
}

impl KeyBuilder<'_> {
    fn push(&mut self, expr: Expr) -> ExprId {
        let fingerprint = format!("{:?}|{:?}", expr.op, expr.shape);
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
            MergeDtype::Rounded(dtype) if e.shape.is_some() && exact != Some(dtype) => {
                let (shape, natural, origin) = (e.shape.clone(), e.dtype, e.origin.clone());
                self.push(Expr { op: Op::Round { dtype, arg: id }, shape, dtype: natural, origin })
            }
            _ => id,
        }
    }

    fn constant(&mut self, v: f64, origin: &str) -> ExprId {
        self.push(Expr { op: Op::Constant(v), shape: None, dtype: None, origin: origin.into() })
    }

    fn build(&mut self, node: NodeId, key: &str) -> Result<Built> {
        let memo_key = (node, key.to_string());
        if let Some(b) = self.memo.get(&memo_key) {
            return Ok(b.clone());
        }
        let built = self.build_uncached(node, key).map_err(|e| {
            let e = if e.key.is_none() { e.with_key(self.key) } else { e };
            if e.node.is_none() {
                e.within_node(&self.ctx.f.recipe.trace(node))
            } else {
                e
            }
        })?;
        self.memo.insert(memo_key, built.clone());
        Ok(built)
    }

    fn build_uncached(&mut self, node: NodeId, key: &str) -> Result<Built> {
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
                let found = if in_domain { names().find_map(|name| file.entry(name)) } else { None };
                let Some(entry) = found else {
                    return Ok(Err(format!("missing from {}", file.path().display())));
                };
                if self.ctx.excluded.contains(&(input, entry.start)) {
                    return Ok(Err(format!("non-finite values (NaN or infinity) in {}", file.path().display())));
                }
                let id = self.push(Expr {
                    op: Op::Source { input, entry: entry.clone() },
                    shape: Some(entry.shape.clone()),
                    dtype: Some(entry.dtype),
                    origin: file.path().display().to_string(),
                });
                Ok(Ok(Planned::Expr(id)))
            }
            NodeKind::Literal { entries } => {
                let found = if in_domain { names().find_map(|name| entries.get(name)) } else { None };
                match found {
                    None => Ok(Err(format!("missing from {}", n.label()))),
                    Some(Value::Node(child)) => self.build(*child, key),
                    Some(Value::Scalar(Scalar::Str(s))) => Ok(Ok(Planned::Text(Some(s.clone())))),
                    Some(Value::Scalar(Scalar::Null)) => Ok(Ok(Planned::Text(None))),
                    Some(Value::Scalar(s)) => {
                        let v = s.as_f64().expect("numbers and bools convert");
                        Ok(Ok(Planned::Expr(self.constant(v, &n.label()))))
                    }
                }
            }
            NodeKind::Merge { method, inputs } => {
                // A method maps the keys of its result's config (sd-mecha's key map).
                if !in_domain || !config.contains(key) {
                    return Ok(Err(format!("{} produces no key \"{key}\" for config \"{}\"", method.id, config.id())));
                }
                match &method.implementation {
                    Implementation::ConvertSingleton => self.build(inputs[0][0], "key"),
                    Implementation::Route(table) => match table.routes.get(key) {
                        Some(input_key) => self.build(inputs[0][0], input_key),
                        None => Ok(Err(format!("{} has no source key for \"{key}\"", method.id))),
                    },
                    Implementation::Component { omit } => self.build_component(inputs, key, *omit),
                    Implementation::Fallback => match self.build(inputs[0][0], key)? {
                        Ok(p) => Ok(Ok(p)),
                        Err(_) => self.build(inputs[1][0], key),
                    },
                    Implementation::Cast => self.build_cast(inputs, key),
                    Implementation::External(external) => self.build_external(node, external, inputs, key),
                    Implementation::Elementwise(kernel) => self.build_elementwise(node, *kernel, inputs, key),
                }
            }
        }
    }

    fn build_external(
        &mut self,
        node: NodeId,
        external: &Arc<ExternalMethod>,
        inputs: &[Vec<NodeId>],
        key: &str,
    ) -> Result<Built> {
        let NodeKind::Merge { method, .. } = &self.ctx.f.recipe.node(node).kind else { unreachable!() };
        let mut args = vec![];
        let mut tensors = vec![];
        for (i, (param, children)) in method.params.iter().zip(inputs).enumerate() {
            // The first input of a routed method reads the keys its table names.
            let keys: Vec<&str> = match (&external.routes, i) {
                (Some(r), 0) => match r.routes.get(key) {
                    Some(keys) => keys.iter().map(String::as_str).collect(),
                    None => return Ok(Err(format!("{} has no source keys for \"{key}\"", method.id))),
                },
                _ => vec![key],
            };
            let mut exprs = vec![];
            for &child in children {
                for &k in &keys {
                    match self.build(child, k)? {
                        Err(why) => return Ok(Err(why)),
                        Ok(Planned::Text(t)) if param.value_type == ValueType::Str => {
                            args.push(ExternalOperand::Text(t))
                        }
                        Ok(Planned::Text(_)) => {
                            return Err(MechaError::recipe(format!(
                                "{}: \"{}\" expects {}, but received text",
                                method.id,
                                param.name,
                                param.value_type.name()
                            )))
                        }
                        Ok(Planned::Expr(e)) => exprs.push(e),
                    }
                }
            }
            tensors.extend(exprs.iter().copied().filter(|&e| self.exprs[e].shape.is_some()));
            let many = param.kind == ParamKind::VarPositional || keys.len() > 1;
            match (many, exprs.as_slice()) {
                (true, _) => args.push(ExternalOperand::Tensors(exprs)),
                (false, [e]) => args.push(ExternalOperand::Tensor(*e)),
                (false, _) => {}
            }
        }
        // Results have their first input's shape, except conversions, whose keys have the shape
        // the target config gives them (a LoRA's factors become a full weight).
        let first = tensors.first().map(|&e| (self.exprs[e].shape.clone(), self.exprs[e].dtype));
        let config = self.ctx.f.configs.configs[node].as_ref().expect("reachable nodes are solved");
        let configured = config.as_named().and_then(|c| c.get(key)).and_then(|m| m.shape.clone());
        let first_shape = first.as_ref().and_then(|(s, _)| s.clone());
        // Without a tensor input the result is one value broadcast over the key, as in torch.
        let shape = if tensors.is_empty() {
            None
        } else if method.is_conversion {
            configured.or(first_shape)
        } else {
            first_shape
        };
        if let (true, Some(s)) = (external.elementwise, &shape) {
            let mismatch = tensors
                .iter()
                .find(|&&e| self.exprs[e].shape.as_ref().is_some_and(|t| t != s && t.iter().product::<usize>() != 1));
            if let Some(&bad) = mismatch {
                return Err(MechaError::new(
                    ErrorKind::Shape,
                    format!(
                        "{}: shapes differ for key \"{}\": {s:?}, but {} has {:?}",
                        method.id, self.key, self.exprs[bad].origin, self.exprs[bad].shape
                    ),
                ));
            }
        }
        let id = self.push(Expr {
            op: Op::External { method: external.clone(), node, args },
            shape,
            dtype: first.and_then(|(_, d)| d),
            origin: method.id.clone(),
        });
        Ok(Ok(Planned::Expr(id)))
    }

    fn build_component(&mut self, inputs: &[Vec<NodeId>], key: &str, omit: bool) -> Result<Built> {
        let name = match self.build(inputs[1][0], key)? {
            Err(why) => return Ok(Err(why)),
            Ok(Planned::Text(Some(name))) => name,
            Ok(_) => return Err(MechaError::recipe("\"component\" must be a component name such as \"diffuser\"")),
        };
        let source = inputs[0][0];
        let config = self.ctx.f.configs.configs[source].as_ref().expect("reachable nodes are solved");
        let Some(config) = config.as_named() else {
            return Err(MechaError::new(
                ErrorKind::Config,
                "components are defined by a model config, but this input's architecture is unknown (structural); \
                 give the model its config",
            ));
        };
        let Some(component) = config.components().get(&name) else {
            let valid: Vec<&str> = config.components().keys().map(String::as_str).collect();
            return Err(MechaError::recipe(format!(
                "component \"{name}\" does not exist in config \"{}\"; valid components: {}",
                config.id,
                valid.join(", ")
            )));
        };
        if component.keys.contains_key(key) == omit {
            let verb = if omit { "omitted" } else { "not picked" };
            return Ok(Err(format!("in component \"{}\", {verb}", config.component_of(key).unwrap_or("?"))));
        }
        self.build(source, key)
    }

    fn build_cast(&mut self, inputs: &[Vec<NodeId>], key: &str) -> Result<Built> {
        let a = match self.build(inputs[0][0], key)? {
            Err(why) => return Ok(Err(why)),
            Ok(Planned::Text(_)) => return Err(MechaError::recipe("cast: input \"a\" must be tensors, not text")),
            Ok(Planned::Expr(a)) => a,
        };
        // `device` is accepted for compatibility with sd-mecha recipes; the engine picks devices.
        let dtype = match self.build(inputs[2][0], key)? {
            Err(why) => return Ok(Err(why)),
            Ok(Planned::Text(None)) => return Ok(Ok(Planned::Expr(a))),
            Ok(Planned::Text(Some(name))) => DType::parse_user(&name).filter(|d| d.is_numeric()).ok_or_else(|| {
                MechaError::recipe(format!(
                    "cast: unknown dtype \"{name}\"; use a torch name such as float16, bfloat16, float32, float64, \
                     float8_e4m3fn, float8_e5m2, int64, bool"
                ))
            })?,
            Ok(Planned::Expr(_)) => {
                return Err(MechaError::recipe("cast: \"dtype\" must be a dtype name such as \"float16\""))
            }
        };
        let e = &self.exprs[a];
        if e.dtype == Some(dtype) && matches!(e.op, Op::Source { .. }) {
            return Ok(Ok(Planned::Expr(a))); // already in that dtype
        }
        if e.shape.is_none() {
            return Ok(Ok(Planned::Expr(a))); // a broadcast number is not stored, so nothing to round
        }
        let (shape, origin) = (e.shape.clone(), format!("cast({})", e.origin));
        Ok(Ok(Planned::Expr(self.push(Expr { op: Op::Round { dtype, arg: a }, shape, dtype: Some(dtype), origin }))))
    }

    fn build_elementwise(&mut self, node: NodeId, kernel: Kernel, inputs: &[Vec<NodeId>], key: &str) -> Result<Built> {
        let NodeKind::Merge { method, .. } = &self.ctx.f.recipe.node(node).kind else { unreachable!() };
        let mut operands = vec![];
        for (param, children) in method.params.iter().zip(inputs) {
            for &child in children {
                match self.build(child, key)? {
                    Err(why) => return Ok(Err(why)),
                    Ok(Planned::Text(_)) => {
                        return Err(MechaError::recipe(format!(
                            "{}: \"{}\" expects {}, but received a text value",
                            method.id,
                            param.name,
                            if param.value_type == ValueType::Tensor {
                                "tensors or numbers"
                            } else {
                                param.value_type.name()
                            }
                        )))
                    }
                    Ok(Planned::Expr(e)) => {
                        if let Some(d) = self.exprs[e].dtype.filter(|d| !d.is_numeric()) {
                            return Err(MechaError::new(
                                ErrorKind::Shape,
                                format!(
                                    "{}: cannot compute on dtype {d} (from {}); it can only be passed through",
                                    method.id, self.exprs[e].origin
                                ),
                            ));
                        }
                        operands.push(self.in_merge_precision(e));
                    }
                }
            }
        }

        let scalars: Vec<Option<f64>> = operands
            .iter()
            .map(|&e| match (&self.exprs[e].op, &self.exprs[e].shape) {
                (Op::Constant(v), None) => Some(*v),
                _ => None,
            })
            .collect();
        match kernel.shortcut(&scalars) {
            Some(Shortcut::Operand(i)) => return Ok(Ok(Planned::Expr(operands[i]))),
            Some(Shortcut::Zeros) => {
                let e = &self.exprs[operands[0]];
                let (shape, dtype) = (e.shape.clone(), e.dtype);
                let id = self.push(Expr { op: Op::Constant(0.0), shape, dtype, origin: method.id.clone() });
                return Ok(Ok(Planned::Expr(id)));
            }
            None => {}
        }

        // Shaped operands must agree; hyper-parameters may also be single values.
        let shaped = kernel.shaped_operands(operands.len());
        let mut shape: Option<(Vec<usize>, ExprId)> = None;
        for (i, &e) in operands.iter().enumerate() {
            let Some(s) = &self.exprs[e].shape else {
                continue;
            };
            if !shaped.contains(&i) && s.iter().product::<usize>() == 1 {
                continue;
            }
            match &shape {
                None => shape = Some((s.clone(), e)),
                Some((first, first_e)) if first != s => {
                    return Err(MechaError::new(
                        ErrorKind::Shape,
                        format!(
                            "{}: shapes differ for key \"{}\": {} has {:?} but {} has {:?}",
                            method.id, self.key, self.exprs[*first_e].origin, first, self.exprs[e].origin, s
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        let natural = operands.iter().find_map(|&e| self.exprs[e].dtype);
        let id = self.push(Expr {
            op: Op::Apply { kernel, args: operands },
            shape: shape.map(|(s, _)| s),
            dtype: natural,
            origin: method.id.clone(),
        });
        Ok(Ok(Planned::Expr(id)))
    }
}
