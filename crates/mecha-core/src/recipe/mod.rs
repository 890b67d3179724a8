//! The recipe graph: models, literals and merge nodes, bound to method signatures with defaults
//! materialised (as sd-mecha does, so serialized text lists every parameter).

pub mod dispatch;
pub mod inference;
pub mod mecha;
pub mod parse;
pub mod seeds;
pub mod spaces;
pub mod wire;

use std::sync::Arc;

use indexmap::IndexMap;

use crate::error::{MechaError, Result};
use crate::methods::logistics::SINGLETON_CONFIG;
use crate::methods::{registry, DefaultValue, MethodSpec, ParamKind, SpaceSpec};

pub type NodeId = usize;

#[derive(Clone, Debug, PartialEq)]
pub enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Scalar {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Bool(b) => Some(*b as u8 as f64),
            Scalar::Int(i) => Some(*i as f64),
            Scalar::Float(f) => Some(*f),
            Scalar::Null | Scalar::Str(_) => None,
        }
    }

    fn type_family(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool(_) => "bool",
            Scalar::Int(_) | Scalar::Float(_) => "number",
            Scalar::Str(_) => "string",
        }
    }
}

impl From<&DefaultValue> for Scalar {
    fn from(d: &DefaultValue) -> Scalar {
        match d {
            DefaultValue::Null => Scalar::Null,
            DefaultValue::Bool(b) => Scalar::Bool(*b),
            DefaultValue::Int(i) => Scalar::Int(*i),
            DefaultValue::Float(f) => Scalar::Float(*f),
            DefaultValue::Str(s) => Scalar::Str(s.clone()),
        }
    }
}

/// A literal dict entry: a plain value or another node (dicts of nodes are sd-mecha's way of
/// giving each block its own sub-recipe).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Scalar(Scalar),
    Node(NodeId),
}

#[derive(Clone, Debug)]
pub enum NodeKind {
    Model {
        /// The file's path as given, or the label of an in-memory model.
        path: String,
        /// The id of an in-memory model (`io::memory`), which `path` then only names.
        memory: Option<u64>,
    },
    Literal {
        entries: IndexMap<String, Value>,
    },
    /// `inputs[i]` holds the argument nodes of parameter `i` (several for varargs).
    Merge {
        method: Arc<MethodSpec>,
        inputs: Vec<Vec<NodeId>>,
    },
}

#[derive(Clone, Debug)]
pub struct Node {
    pub kind: NodeKind,
    pub config: Option<String>,
    pub merge_space: Option<String>,
}

/// A bound recipe. Nodes are stored children-first, so `nodes[i]` only refers to ids below `i`.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub nodes: Vec<Node>,
    pub root: NodeId,
    /// For each node, its index in the form it was read from (JSON node or `.mecha`
    /// instruction); nodes created by binding (defaults, wrapped values) have none.
    pub source_index: Vec<Option<usize>>,
}

/// An argument passed to a merge method: an existing node or a value to wrap.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Node(NodeId),
    Value(Scalar),
}

#[derive(Default, Debug)]
pub struct RecipeBuilder {
    nodes: Vec<Node>,
    source_index: Vec<Option<usize>>,
}

impl RecipeBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.source_index.push(None);
        self.nodes.len() - 1
    }

    /// Records where a node came from in the text or JSON it was read from.
    pub fn set_source_index(&mut self, id: NodeId, index: usize) {
        self.source_index[id] = Some(index);
    }

    fn check_ref(&self, id: NodeId) -> Result<NodeId> {
        if id < self.nodes.len() {
            Ok(id)
        } else {
            Err(MechaError::recipe(format!(
                "reference to node {id}, which is not defined before this point (there are {} nodes so far)",
                self.nodes.len()
            )))
        }
    }

    pub fn model(&mut self, path: &str, config: Option<&str>, merge_space: Option<&str>) -> NodeId {
        self.push(Node {
            kind: NodeKind::Model { path: path.to_string(), memory: None },
            config: config.map(str::to_string),
            merge_space: merge_space.map(str::to_string),
        })
    }

    /// A model held in memory (`io::memory::register`), like sd-mecha's `model(state_dict)`.
    pub fn memory_model(&mut self, id: u64, config: Option<&str>, merge_space: Option<&str>) -> NodeId {
        self.push(Node {
            kind: NodeKind::Model { path: crate::io::memory::label(id), memory: Some(id) },
            config: config.map(str::to_string),
            merge_space: merge_space.map(str::to_string),
        })
    }

    /// A dict literal. As in sd-mecha, all values must be of one kind (numbers, strings, bools,
    /// or nodes).
    pub fn literal(
        &mut self,
        entries: IndexMap<String, Value>,
        config: Option<&str>,
        merge_space: Option<&str>,
    ) -> Result<NodeId> {
        let family = |v: &Value| match v {
            Value::Scalar(s) => s.type_family(),
            Value::Node(_) => "node",
        };
        if let Some((first_key, first)) = entries.first() {
            for (k, v) in &entries {
                if let Value::Node(id) = v {
                    self.check_ref(*id)?;
                }
                if family(v) != family(first) {
                    return Err(MechaError::recipe(format!(
                        "literal dict mixes value kinds: \"{first_key}\" is a {} but \"{k}\" is a {}; \
                         use one kind per dict",
                        family(first),
                        family(v)
                    )));
                }
            }
        }
        Ok(self.push(Node {
            kind: NodeKind::Literal { entries },
            config: config.map(str::to_string),
            merge_space: merge_space.map(str::to_string),
        }))
    }

    /// sd-mecha's `value_to_node` for a plain value: `{"key": v}` in the singleton-mecha config,
    /// broadcast to every key through `convert_singleton`.
    pub fn value(&mut self, value: Scalar) -> NodeId {
        let entries = IndexMap::from([("key".to_string(), Value::Scalar(value))]);
        let literal = self.push(Node {
            kind: NodeKind::Literal { entries },
            config: Some(SINGLETON_CONFIG.to_string()),
            merge_space: None,
        });
        let method = registry().get("convert_singleton").expect("builtin");
        self.push(Node {
            kind: NodeKind::Merge { method, inputs: vec![vec![literal]] },
            config: None,
            merge_space: None,
        })
    }

    fn arg_node(&mut self, arg: Arg) -> Result<NodeId> {
        match arg {
            Arg::Node(id) => self.check_ref(id),
            Arg::Value(v) => Ok(self.value(v)),
        }
    }

    /// Calls a merge method with Python's binding rules: positional arguments fill positional
    /// parameters then varargs, keywords match any non-varargs parameter, defaults fill the rest.
    pub fn merge(&mut self, method_id: &str, args: Vec<Arg>, kwargs: Vec<(String, Arg)>) -> Result<NodeId> {
        let method = registry().resolve(method_id)?;
        let call = |msg: String| MechaError::recipe(format!("{method_id}(): {msg}"));
        let mut bound: Vec<Option<Vec<Arg>>> = vec![None; method.params.len()];
        let positional: Vec<usize> =
            (0..method.params.len()).filter(|&i| method.params[i].kind == ParamKind::Positional).collect();
        let mut args = args.into_iter();
        for &i in &positional {
            match args.next() {
                Some(a) => bound[i] = Some(vec![a]),
                None => break,
            }
        }
        let rest: Vec<Arg> = args.collect();
        match method.varargs() {
            Some(v) => bound[v] = Some(rest),
            None if !rest.is_empty() => {
                return Err(call(format!(
                    "takes {} positional argument{} but {} were given",
                    positional.len(),
                    if positional.len() == 1 { "" } else { "s" },
                    positional.len() + rest.len()
                )))
            }
            None => {}
        }
        for (name, arg) in kwargs {
            let Some((i, p)) = method.param(&name) else {
                let hint = crate::util::nearest(&name, method.params.iter().map(|p| p.name.as_str()))
                    .map(|n| format!(" (did you mean \"{n}\"?)"))
                    .unwrap_or_default();
                return Err(call(format!("unknown parameter \"{name}\"{hint}")));
            };
            if p.kind == ParamKind::VarPositional {
                return Err(call(format!("\"{name}\" takes positional arguments only")));
            }
            if bound[i].is_some() {
                return Err(call(format!("got multiple values for \"{name}\"")));
            }
            bound[i] = Some(vec![arg]);
        }
        let mut inputs = Vec::with_capacity(method.params.len());
        for (i, p) in method.params.iter().enumerate() {
            let args = match bound[i].take() {
                Some(args) => args,
                None => match &p.default {
                    Some(d) => vec![Arg::Value(d.into())],
                    None => return Err(call(format!("missing required argument \"{}\"", p.name))),
                },
            };
            let ids = args.into_iter().map(|a| self.arg_node(a)).collect::<Result<Vec<_>>>()?;
            inputs.push(ids);
        }
        Ok(self.push(Node { kind: NodeKind::Merge { method, inputs }, config: None, merge_space: None }))
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    pub fn finish(self, root: NodeId) -> Result<Recipe> {
        if root >= self.nodes.len() {
            return Err(MechaError::recipe("the recipe has no root node"));
        }
        Ok(Recipe { nodes: self.nodes, root, source_index: self.source_index })
    }
}

impl Node {
    /// A short description for error traces: `weighted_sum`, `model "a.safetensors"`, `literal`.
    pub fn label(&self) -> String {
        match &self.kind {
            NodeKind::Model { path, .. } => format!("model \"{path}\""),
            NodeKind::Literal { entries } => {
                let shown: Vec<String> = entries
                    .iter()
                    .take(3)
                    .map(|(k, v)| match v {
                        Value::Scalar(s) => format!("{k}={}", mecha::format_scalar(s)),
                        Value::Node(n) => format!("{k}=&{n}"),
                    })
                    .collect();
                let more = if entries.len() > 3 { " …" } else { "" };
                format!("literal {{{}{more}}}", shown.join(", "))
            }
            NodeKind::Merge { method, .. } => method.id.clone(),
        }
    }
}

impl Recipe {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// Children of a node with the parameter each feeds (`None` for literal dict entries).
    pub fn children(&self, id: NodeId) -> Vec<(NodeId, Option<&str>)> {
        match &self.nodes[id].kind {
            NodeKind::Model { .. } => vec![],
            NodeKind::Literal { entries } => entries
                .values()
                .filter_map(|v| match v {
                    Value::Node(n) => Some((*n, None)),
                    Value::Scalar(_) => None,
                })
                .collect(),
            NodeKind::Merge { method, inputs } => inputs
                .iter()
                .enumerate()
                .flat_map(|(i, ids)| ids.iter().map(move |n| (*n, Some(method.params[i].name.as_str()))))
                .collect(),
        }
    }

    /// The chain of nodes from the root down to `target`, for error messages:
    /// `weighted_sum > b: subtract > a: model "x.safetensors"`.
    pub fn trace(&self, target: NodeId) -> String {
        let mut parent: Vec<Option<(NodeId, Option<&str>)>> = vec![None; self.nodes.len()];
        let mut stack = vec![self.root];
        let mut seen = vec![false; self.nodes.len()];
        seen[self.root] = true;
        while let Some(n) = stack.pop() {
            for (c, param) in self.children(n) {
                if !seen[c] {
                    seen[c] = true;
                    parent[c] = Some((n, param));
                    stack.push(c);
                }
            }
        }
        let mut parts = vec![];
        let mut cur = target;
        loop {
            let label = self.nodes[cur].label();
            match parent[cur] {
                Some((p, param)) => {
                    parts.push(match param {
                        Some(param) => format!("{param}: {label}"),
                        None => label,
                    });
                    cur = p;
                }
                None => {
                    parts.push(label);
                    break;
                }
            }
        }
        parts.reverse();
        parts.join(" > ")
    }

    /// For each node, a hash of what it computes from its inputs, hyper-parameters left out: the
    /// method and the sub-recipes of its model-space inputs. The same node of another merge of the
    /// same recipe gets the same value (whatever its `alpha`), so per-node caches stay valid
    /// across merges; methods check the hyper-parameters their cached values depend on.
    pub fn cache_identities(&self) -> Vec<u64> {
        use std::hash::{Hash, Hasher};
        let mut ids: Vec<u64> = Vec::with_capacity(self.nodes.len());
        // Children are stored before their parents, so one forward pass sees them first.
        for node in &self.nodes {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&node.config, &node.merge_space).hash(&mut h);
            match &node.kind {
                NodeKind::Model { path, .. } => ("model", path).hash(&mut h),
                NodeKind::Literal { entries } => {
                    "literal".hash(&mut h);
                    for (k, v) in entries {
                        k.hash(&mut h);
                        match v {
                            Value::Scalar(s) => format!("{s:?}").hash(&mut h),
                            Value::Node(n) => ids[*n].hash(&mut h),
                        }
                    }
                }
                NodeKind::Merge { method, inputs } => {
                    method.id.hash(&mut h);
                    for (param, children) in method.params.iter().zip(inputs) {
                        if param.space == SpaceSpec::fixed(&["param"]) {
                            "hyper".hash(&mut h);
                        } else {
                            children.iter().for_each(|&c| ids[c].hash(&mut h));
                        }
                    }
                }
            }
            ids.push(h.finish());
        }
        ids
    }

    /// Model nodes reachable from the root, in post-order (the order sd-mecha visits them).
    pub fn models(&self) -> Vec<NodeId> {
        self.post_order().into_iter().filter(|&n| matches!(self.nodes[n].kind, NodeKind::Model { .. })).collect()
    }

    /// Nodes reachable from the root, children before parents, each once, in the order a
    /// recursive depth-first walk would finish them. Iterative: recipes may be chains of
    /// 100,000 nodes.
    pub fn post_order(&self) -> Vec<NodeId> {
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![(self.root, false)];
        while let Some((n, expanded)) = stack.pop() {
            if expanded {
                out.push(n);
                continue;
            }
            if std::mem::replace(&mut seen[n], true) {
                continue;
            }
            stack.push((n, true));
            stack.extend(self.children(n).into_iter().rev().filter(|(c, _)| !seen[*c]).map(|(c, _)| (c, false)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weighted_sum_identity(b_path: &str, alpha: f64) -> u64 {
        let mut b = RecipeBuilder::new();
        let (x, y) = (b.model("a.safetensors", None, None), b.model(b_path, None, None));
        let root = b
            .merge(
                "weighted_sum",
                vec![Arg::Node(x), Arg::Node(y)],
                vec![("alpha".into(), Arg::Value(Scalar::Float(alpha)))],
            )
            .expect("binds");
        let recipe = b.finish(root).expect("valid");
        recipe.cache_identities()[recipe.root]
    }

    #[test]
    fn cache_identity_ignores_hyper_parameters_but_not_inputs() {
        assert_eq!(weighted_sum_identity("b.safetensors", 0.3), weighted_sum_identity("b.safetensors", 0.7));
        assert_ne!(weighted_sum_identity("b.safetensors", 0.3), weighted_sum_identity("c.safetensors", 0.3));
    }

    #[test]
    fn binding_follows_python_rules() {
        let mut b = RecipeBuilder::new();
        let a = b.model("a", None, Some("weight"));
        let c = b.model("c", None, Some("weight"));
        let ws = b
            .merge(
                "weighted_sum",
                vec![Arg::Node(a), Arg::Node(c)],
                vec![("alpha".into(), Arg::Value(Scalar::Float(0.3)))],
            )
            .unwrap();
        let NodeKind::Merge { inputs, .. } = &b.node(ws).unwrap().kind else { panic!() };
        assert_eq!(inputs.len(), 3);
        assert_eq!(inputs[0], vec![a]);

        let err = b.merge("weighted_sum", vec![Arg::Node(a)], vec![]).unwrap_err();
        assert!(err.message.contains("missing required argument \"b\""), "{}", err.message);
        let err = b.merge("subtract", vec![Arg::Node(a), Arg::Node(c), Arg::Node(c)], vec![]).unwrap_err();
        assert!(err.message.contains("takes 2 positional arguments but 3 were given"), "{}", err.message);
        let err = b
            .merge(
                "weighted_sum",
                vec![Arg::Node(a), Arg::Node(c)],
                vec![("alpah".into(), Arg::Value(Scalar::Float(0.1)))],
            )
            .unwrap_err();
        assert!(err.message.contains("did you mean \"alpha\""), "{}", err.message);
        let err = b.merge("weighted_sum", vec![Arg::Node(a), Arg::Node(99)], vec![]).unwrap_err();
        assert!(err.message.contains("node 99"), "{}", err.message);
        let avg = b.merge("n_average", vec![Arg::Node(a), Arg::Node(c), Arg::Node(a)], vec![]).unwrap();
        let NodeKind::Merge { inputs, .. } = &b.node(avg).unwrap().kind else { panic!() };
        assert_eq!(inputs[0], vec![a, c, a]);
    }

    #[test]
    fn mixed_literal_values_are_refused() {
        let mut b = RecipeBuilder::new();
        let entries = IndexMap::from([
            ("x".to_string(), Value::Scalar(Scalar::Float(1.0))),
            ("y".to_string(), Value::Scalar(Scalar::Str("s".into()))),
        ]);
        assert!(b.literal(entries, None, None).is_err());
    }
}
