//! `convert(recipe, target)`: the shortest chain of registered conversions from the recipe's
//! config to a target config (sd-mecha's `convert`).

use std::collections::{HashMap, VecDeque};

use crate::configs;
use crate::error::{ErrorKind, MechaError, Result};
use crate::exec::plan::open_inputs;
use crate::methods::registry;
use crate::recipe::inference::root_candidates;
use crate::recipe::Recipe;

pub enum Target {
    /// A config id.
    Config(String),
    /// The config another recipe has.
    Like(Recipe),
}

/// Conversions as edges between configs: config → [(target config, method id)], in
/// registration order.
fn edges() -> HashMap<String, Vec<(String, String)>> {
    let mut edges: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for m in registry().list().iter().filter(|m| m.is_conversion) {
        let (Some(from), Some(to)) = (m.params.first().and_then(|p| p.config.clone()), m.returns.config.clone()) else {
            continue; // convert_singleton goes to "any config" and never forms a path
        };
        edges.entry(from).or_default().push((to, m.id.clone()));
    }
    edges
}

/// Fewest conversions from `from` to `to` (every edge costs 1, so breadth-first).
fn shortest(edges: &HashMap<String, Vec<(String, String)>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut came_from: HashMap<&str, (&str, &str)> = HashMap::new();
    let mut queue = VecDeque::from([from]);
    while let Some(config) = queue.pop_front() {
        if config == to {
            let mut path = vec![];
            let mut cur = to;
            while cur != from {
                let (prev, method) = came_from[cur];
                path.push(method.to_string());
                cur = prev;
            }
            path.reverse();
            return Some(path);
        }
        for (next, method) in edges.get(config).into_iter().flatten() {
            if next != from && !came_from.contains_key(next.as_str()) {
                came_from.insert(next, (config, method));
                queue.push_back(next);
            }
        }
    }
    None
}

/// The ids of the conversion methods to apply, in order (empty when already in the target).
pub fn conversion_path(recipe: &Recipe, target: &Target) -> Result<Vec<String>> {
    let targets = match target {
        Target::Config(id) => vec![configs::resolve(id)?.id.clone()],
        Target::Like(other) => root_candidates(other, &open_inputs(other)?.model_keys, None)?,
    };
    let keys = open_inputs(recipe)?.model_keys;
    let edges = edges();
    let mut tried = vec![];
    for target in &targets {
        for source in root_candidates(recipe, &keys, Some(target))? {
            if let Some(path) = shortest(&edges, &source, target) {
                return Ok(path);
            }
            // The same source is tried once per target; name it once.
            if !tried.contains(&source) {
                tried.push(source);
            }
        }
    }
    Err(MechaError::new(
        ErrorKind::Config,
        format!(
            "no chain of conversions leads from the recipe's config ({}) to {}; register a conversion \
             (a merge method with isConversion) between them",
            if tried.is_empty() { "unknown".to_string() } else { tried.join(" or ") },
            if targets.is_empty() { "the target's config (unknown)".to_string() } else { targets.join(" or ") },
        ),
    ))
}
