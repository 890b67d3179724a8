//! Model-config inference, before any tensor is read: every node gets the config its keys
//! follow, solved per component the way sd-mecha does it.
//!
//! Nodes form components: a merge input without an explicit config shares its parent's
//! component, a literal without a config shares it with its dict entries. Each component
//! collects the keys of its models and literals; a config is a candidate when it covers at
//! least 10 % of a node's keys (aliases resolved), candidates of several nodes intersect, and
//! the candidate missing the fewest of the inputs' keys wins (ties: sd-mecha's order, configs
//! sorted by identifier in reverse). With no candidate and no explicit constraint, the component
//! is *structural*: its keys are those of its inputs. (sd-mecha keeps only the keys common to
//! all inputs, which leaves `fallback` nothing to fill; see docs/differences.md.)

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use indexmap::{IndexMap, IndexSet};

use crate::configs::{self, ModelConfig};
use crate::error::{ErrorKind, MechaError, Result};
use crate::recipe::{NodeId, NodeKind, Recipe, Value};

/// Identifier sd-mecha uses for "infer the config", equivalent to giving none.
pub const INFER: &str = "infer";
/// Identifier of a structural (unknown-architecture) config in serialized recipes.
pub const STRUCTURAL: &str = "structural";

/// The config a node was solved to.
#[derive(Clone, Debug)]
pub enum SolvedConfig {
    Named(Arc<ModelConfig>),
    /// No known config: the keys of the component's inputs, in order of first appearance.
    Structural(Arc<IndexSet<String>>),
}

impl SolvedConfig {
    pub fn id(&self) -> &str {
        match self {
            SolvedConfig::Named(c) => &c.id,
            SolvedConfig::Structural(_) => STRUCTURAL,
        }
    }

    /// Keys in the config's order.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            SolvedConfig::Named(c) => c.keys().map(|(k, _)| k).collect(),
            SolvedConfig::Structural(keys) => keys.iter().map(String::as_str).collect(),
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        match self {
            SolvedConfig::Named(c) => c.get(key).is_some(),
            SolvedConfig::Structural(keys) => keys.contains(key),
        }
    }

    /// Other names `key` may have in inputs.
    pub fn aliases(&self, key: &str) -> &[String] {
        match self {
            SolvedConfig::Named(c) => c.get(key).map_or(&[][..], |m| m.aliases.as_slice()),
            SolvedConfig::Structural(_) => &[],
        }
    }

    pub fn as_named(&self) -> Option<&Arc<ModelConfig>> {
        match self {
            SolvedConfig::Named(c) => Some(c),
            SolvedConfig::Structural(_) => None,
        }
    }
}

/// Per node: its solved config and the keys it may provide (`None` for unreachable nodes).
pub struct ConfigSolution {
    pub configs: Vec<Option<SolvedConfig>>,
    pub domains: Vec<Option<Arc<HashSet<String>>>>,
}

/// A config a node declares.
enum Hint {
    None,
    /// `infer`: like none, except that a known config becomes required (as in sd-mecha).
    Infer,
    Config(Arc<ModelConfig>),
}

impl Hint {
    fn resolve(id: Option<&str>) -> Result<Hint> {
        Ok(match id {
            // sd-mecha writes `structural` for unknown architectures but cannot read it back;
            // reading it as "infer from the keys" is what it means.
            None | Some(STRUCTURAL) => Hint::None,
            Some(INFER) => Hint::Infer,
            Some(id) => Hint::Config(configs::resolve(id)?),
        })
    }
}

#[derive(Clone, Debug)]
struct MatchStats {
    /// Canonical keys of the inputs that the config has.
    intersection: HashSet<String>,
    /// Fraction of the inputs' keys the config lacks.
    state_dict_misses: f64,
    count: usize,
}

impl MatchStats {
    fn of(config: &ModelConfig, keys: &IndexSet<String>) -> MatchStats {
        if keys.is_empty() {
            return MatchStats::unmatched(config);
        }
        let canonical: HashSet<&str> = keys.iter().map(|k| config.resolve_alias(k).unwrap_or(k)).collect();
        let matched: HashSet<String> =
            canonical.iter().filter(|k| config.get(k).is_some()).map(|k| k.to_string()).collect();
        let extra = canonical.len() - matched.len();
        // Relative to the keys as named in the input, before aliases merge any of them.
        MatchStats { state_dict_misses: extra as f64 / keys.len() as f64, intersection: matched, count: 1 }
    }

    /// A config constrained without inputs: all its keys, weighing nothing in averages.
    fn unmatched(config: &ModelConfig) -> MatchStats {
        MatchStats {
            intersection: config.keys().map(|(k, _)| k.to_string()).collect(),
            state_dict_misses: 0.0,
            count: 0,
        }
    }

    /// Combines two nodes' statistics: common keys, count-weighted misses.
    fn combine(&self, other: &MatchStats) -> MatchStats {
        let count = self.count + other.count;
        let misses = if count == 0 {
            0.0
        } else {
            (self.state_dict_misses * self.count as f64 + other.state_dict_misses * other.count as f64) / count as f64
        };
        MatchStats {
            intersection: self.intersection.intersection(&other.intersection).cloned().collect(),
            state_dict_misses: misses,
            count,
        }
    }
}

/// Candidate configs of one component (sd-mecha's `ModelConfigCandidates`).
#[derive(Default)]
struct Candidates {
    /// `None`: nothing constrains the component yet. Ordered like sd-mecha's config list.
    stats: Option<IndexMap<String, MatchStats>>,
    requires_known: bool,
    explicit: BTreeSet<String>,
    /// Every key of the component's inputs, in order of first appearance.
    possible_keys: IndexSet<String>,
}

/// Configs covering at least 10 % of `keys`, in sd-mecha's order.
fn candidate_stats(keys: &IndexSet<String>) -> IndexMap<String, MatchStats> {
    if keys.is_empty() {
        return IndexMap::new();
    }
    configs::candidates_for(keys)
        .iter()
        .map(|c| (c.id.clone(), MatchStats::of(c, keys)))
        .filter(|(_, s)| s.intersection.len() as f64 >= keys.len() as f64 * 0.1)
        .collect()
}

impl Candidates {
    fn conflict(&self, new: &str, reason: &str) -> MechaError {
        let existing: Vec<&str> = self.stats.as_ref().map_or(vec![], |s| s.keys().map(String::as_str).collect());
        MechaError::new(
            ErrorKind::Config,
            format!(
                "incompatible model config constraints: {reason} requires \"{new}\", but the candidates here are [{}]; \
                 make the inputs agree, or omit the config so it is inferred",
                existing.join(", ")
            ),
        )
    }

    fn constrain_to(&mut self, config: &ModelConfig, reason: &str) -> Result<()> {
        match self.stats.as_mut() {
            None => {
                self.stats = Some(IndexMap::from([(config.id.clone(), MatchStats::unmatched(config))]));
            }
            Some(stats) => {
                if !stats.contains_key(&config.id) && self.requires_known {
                    return Err(self.conflict(&config.id, reason));
                }
                stats.retain(|id, _| *id == config.id);
            }
        }
        Ok(())
    }

    /// A node's keys, with the config it declares (if any).
    fn add_node(&mut self, keys: &IndexSet<String>, hint: &Hint, reason: &str) -> Result<()> {
        self.possible_keys.extend(keys.iter().cloned());
        let config = match hint {
            Hint::Config(config) => config,
            Hint::None | Hint::Infer => {
                self.requires_known |= matches!(hint, Hint::Infer);
                return self.add_candidates(keys, reason);
            }
        };
        self.explicit.insert(config.id.clone());
        self.requires_known = true;
        self.constrain_to(config, reason)?;
        let this = MatchStats::of(config, keys);
        let stats = self.stats.get_or_insert_with(IndexMap::new);
        let combined = match stats.get(&config.id) {
            Some(prev) => prev.combine(&this),
            None => MatchStats::unmatched(config).combine(&this),
        };
        stats.insert(config.id.clone(), combined);
        Ok(())
    }

    /// Intersects the candidates with the configs matching `keys`.
    fn add_candidates(&mut self, keys: &IndexSet<String>, reason: &str) -> Result<()> {
        {
            let new = candidate_stats(keys);
            self.stats = Some(match self.stats.take() {
                None => new,
                Some(old) => {
                    let common: IndexMap<String, MatchStats> =
                        old.iter().filter_map(|(id, s)| new.get(id).map(|n| (id.clone(), s.combine(n)))).collect();
                    if common.is_empty() && self.requires_known {
                        let ids: Vec<&str> = old.keys().map(String::as_str).collect();
                        let found: Vec<&str> = new.keys().map(String::as_str).collect();
                        return Err(MechaError::new(
                            ErrorKind::Config,
                            format!(
                                "incompatible model config constraints: {reason} matches [{}] but the component \
                                 requires one of [{}]",
                                found.join(", "),
                                ids.join(", ")
                            ),
                        ));
                    }
                    common
                }
            });
            Ok(())
        }
    }

    /// An explicit requirement from a merge method's signature or the caller.
    fn require(&mut self, config: &Arc<ModelConfig>, reason: &str) -> Result<()> {
        self.requires_known = true;
        self.explicit.insert(config.id.clone());
        self.constrain_to(config, reason)?;
        let keys: IndexSet<String> = config.keys().map(|(k, _)| k.to_string()).collect();
        self.add_node(&keys, &Hint::Config(config.clone()), reason)
    }

    fn prefer(&mut self, id: &str) -> Result<()> {
        if self.stats.as_ref().is_some_and(|s| s.is_empty()) {
            return Ok(());
        }
        if self.stats.as_ref().is_none_or(|s| s.contains_key(id)) {
            let config = configs::resolve(id)?;
            self.require(&config, &format!("the preference for {id}"))?;
        }
        Ok(())
    }

    fn finalize(&self) -> Result<SolvedConfig> {
        match self.stats.as_ref().filter(|s| !s.is_empty()) {
            Some(stats) => {
                // min_by keeps the first of equal elements only with a strict comparison.
                let mut best: Option<(&String, &MatchStats)> = None;
                for (id, s) in stats {
                    if best.is_none_or(|(_, b)| s.state_dict_misses < b.state_dict_misses) {
                        best = Some((id, s));
                    }
                }
                Ok(SolvedConfig::Named(configs::resolve(best.expect("non-empty").0)?))
            }
            None if self.requires_known => Err(MechaError::new(
                ErrorKind::Config,
                match self.explicit.len() {
                    0 => "model config inference failed: a known config is required but none matches the inputs' keys".to_string(),
                    1 => format!(
                        "the inputs do not match the required model config \"{}\"; provide files with that layout, \
                         or omit the config so it is inferred",
                        self.explicit.first().expect("one")
                    ),
                    _ => format!(
                        "incompatible model configs are mixed in one component: {}; convert the inputs to one config first",
                        self.explicit.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                },
            )),
            None => Ok(SolvedConfig::Structural(Arc::new(self.possible_keys.clone()))),
        }
    }

    /// The keys nodes of this component may provide.
    fn domain(&self, solved: &SolvedConfig) -> HashSet<String> {
        let possible = || self.possible_keys.iter().cloned();
        match solved {
            SolvedConfig::Named(config) => match self.stats.as_ref().and_then(|s| s.get(&config.id)) {
                Some(stats) => stats.intersection.iter().cloned().chain(possible()).collect(),
                None if !self.possible_keys.is_empty() => possible().collect(),
                None => config.keys().map(|(k, _)| k.to_string()).collect(),
            },
            SolvedConfig::Structural(_) => possible().collect(),
        }
    }
}

/// Union-find over component ids.
#[derive(Default)]
struct Components {
    parent: Vec<usize>,
}

impl Components {
    fn new_component(&mut self) -> usize {
        self.parent.push(self.parent.len());
        self.parent.len() - 1
    }

    fn find(&mut self, c: usize) -> usize {
        let mut root = c;
        while self.parent[root] != root {
            root = self.parent[root];
        }
        self.parent[c] = root;
        root
    }

    fn union(&mut self, a: usize, b: usize) -> usize {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.parent[b] = a;
        }
        a
    }
}

/// Inputs to inference: the keys of each model node's file (in file order).
pub type ModelKeys = HashMap<NodeId, Arc<IndexSet<String>>>;

/// Components and their candidates, before any config is chosen.
struct Analysis {
    /// Component of each discovered node.
    comp: HashMap<NodeId, usize>,
    /// Discovery order (sd-mecha's), which decides structural key order and error order.
    order: Vec<NodeId>,
    candidates: HashMap<usize, Candidates>,
}

/// Discovers components and gathers candidates. With `root_only`, only the root's component
/// is considered (as sd-mecha does when converting).
fn analyze(recipe: &Recipe, model_keys: &ModelKeys, root_only: bool) -> Result<Analysis> {
    let mut comps = Components::default();
    let mut node_comp: Vec<Option<usize>> = vec![None; recipe.nodes.len()];
    // Visit order matters (it decides the order of structural keys and which error is seen
    // first), so discovery mirrors sd-mecha: depth-first within a component, components
    // breadth-first.
    let mut order: Vec<NodeId> = vec![];
    let mut attach = |node: NodeId, comp: usize, comps: &mut Components, order: &mut Vec<NodeId>| -> usize {
        let comp = match node_comp[node] {
            Some(existing) => comps.union(comp, existing),
            None => {
                order.push(node);
                comp
            }
        };
        node_comp[node] = Some(comp);
        comps.find(comp)
    };
    let first = comps.new_component();
    let mut queue = VecDeque::from([(recipe.root, first)]);
    let mut seen: HashSet<(NodeId, usize)> = HashSet::new();
    while let Some(start) = queue.pop_front() {
        let mut stack = vec![start];
        while let Some((node, comp)) = stack.pop() {
            let cur = attach(node, comp, &mut comps, &mut order);
            if !seen.insert((node, cur)) {
                continue;
            }
            let children: Vec<(NodeId, bool)> = match &recipe.node(node).kind {
                NodeKind::Model { .. } => vec![],
                NodeKind::Literal { entries } => {
                    let own = recipe.node(node).config.is_none();
                    entries
                        .values()
                        .filter_map(|v| match v {
                            Value::Node(c) => Some((*c, own)),
                            Value::Scalar(_) => None,
                        })
                        .collect()
                }
                NodeKind::Merge { method, inputs } => method
                    .params
                    .iter()
                    .zip(inputs)
                    .flat_map(|(p, ids)| ids.iter().map(move |c| (*c, p.config.is_none())))
                    .collect(),
            };
            for (child, shares) in children {
                let wanted = if shares { cur } else { comps.new_component() };
                let child_comp = attach(child, wanted, &mut comps, &mut order);
                if child_comp == comps.find(cur) {
                    stack.push((child, child_comp));
                } else {
                    queue.push_back((child, child_comp));
                }
            }
        }
    }

    let mut candidates: HashMap<usize, Candidates> = HashMap::new();
    let comp_of = |n: NodeId, comps: &mut Components| comps.find(node_comp[n].expect("discovered"));
    let root_comp = comp_of(recipe.root, &mut comps);
    if root_only {
        order.retain(|&n| comp_of(n, &mut comps) == root_comp);
    }
    for &n in &order {
        let node = recipe.node(n);
        let c = comp_of(n, &mut comps);
        let traced = |e: MechaError| e.within_node(&recipe.trace(n));
        match &node.kind {
            NodeKind::Model { .. } => {
                let hint = Hint::resolve(node.config.as_deref()).map_err(traced)?;
                let keys = model_keys.get(&n).expect("every model was opened");
                candidates.entry(c).or_default().add_node(keys, &hint, &node.label()).map_err(traced)?;
            }
            NodeKind::Literal { entries } => {
                let hint = Hint::resolve(node.config.as_deref()).map_err(traced)?;
                let keys: IndexSet<String> =
                    entries.iter().filter(|(_, v)| matches!(v, Value::Scalar(_))).map(|(k, _)| k.clone()).collect();
                candidates.entry(c).or_default().add_node(&keys, &hint, &node.label()).map_err(traced)?;
            }
            NodeKind::Merge { method, inputs } => {
                candidates.entry(c).or_default();
                if let Some(id) = &method.returns.config {
                    let config = configs::resolve(id).map_err(traced)?;
                    let reason = format!("the result of {}", method.id);
                    candidates.get_mut(&c).expect("inserted").require(&config, &reason).map_err(traced)?;
                }
                for (param, children) in method.params.iter().zip(inputs) {
                    let Some(id) = &param.config else { continue };
                    let config = configs::resolve(id).map_err(traced)?;
                    for &child in children {
                        let cc = comp_of(child, &mut comps);
                        if root_only && cc != root_comp {
                            continue;
                        }
                        let reason = format!("{} input \"{}\"", method.id, param.name);
                        candidates
                            .entry(cc)
                            .or_default()
                            .require(&config, &reason)
                            .map_err(|e| e.within_node(&recipe.trace(child)))?;
                    }
                }
            }
        }
    }

    let comp: HashMap<NodeId, usize> = order.iter().map(|&n| (n, comp_of(n, &mut comps))).collect();
    Ok(Analysis { comp, order, candidates })
}

/// Solves the config of every node reachable from the root. `root_preference` lists configs the
/// result prefers when they are candidates (sd-mecha prefers `singleton-mecha`).
pub fn infer(recipe: &Recipe, model_keys: &ModelKeys, root_preference: &[&str]) -> Result<ConfigSolution> {
    let Analysis { comp, order, mut candidates } = analyze(recipe, model_keys, false)?;
    let root_c = comp[&recipe.root];
    for id in root_preference {
        candidates.entry(root_c).or_default().prefer(id)?;
    }

    let mut solved: HashMap<usize, (SolvedConfig, Arc<HashSet<String>>)> = HashMap::new();
    let mut configs_out: Vec<Option<SolvedConfig>> = vec![None; recipe.nodes.len()];
    let mut domains: Vec<Option<Arc<HashSet<String>>>> = vec![None; recipe.nodes.len()];
    for &n in &order {
        let c = comp[&n];
        let (config, domain) = match solved.entry(c) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let cand = &candidates[&c];
                let config = cand.finalize().map_err(|e| e.within_node(&recipe.trace(n)))?;
                let domain = Arc::new(cand.domain(&config));
                e.insert((config, domain))
            }
        };
        configs_out[n] = Some(config.clone());
        domains[n] = Some(domain.clone());
    }
    Ok(ConfigSolution { configs: configs_out, domains })
}

/// The configs the root could be, best first (fewest misses), with `preference` applied as
/// sd-mecha's `convert` does; empty when nothing constrains the root.
pub fn root_candidates(recipe: &Recipe, model_keys: &ModelKeys, preference: Option<&str>) -> Result<Vec<String>> {
    let Analysis { comp, mut candidates, .. } = analyze(recipe, model_keys, true)?;
    let root = candidates.entry(comp[&recipe.root]).or_default();
    if let Some(id) = preference {
        root.prefer(id)?;
    }
    let mut ranked: Vec<(&String, f64)> =
        root.stats.iter().flatten().map(|(id, s)| (id, s.state_dict_misses)).collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(ranked.into_iter().map(|(id, _)| id.clone()).collect())
}
