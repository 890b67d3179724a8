//! Interface dispatch (sd-mecha's `MergeMethodInterface.dispatch`): a call of an interface
//! (`exchange_ema`, `rebasin`, `extract_kohya_lora`, …) becomes a call of the first
//! implementation, in registration order, whose input configs the arguments can have. The
//! arguments' configs are inferred from their files' keys, so this runs once the inputs are
//! open and before merge spaces and configs are solved.

use crate::error::{ErrorKind, MechaError, Result};
use crate::methods::{registry, Dispatch, MethodSpec};
use crate::recipe::inference::{root_candidates, ModelKeys};
use crate::recipe::{NodeId, NodeKind, Recipe};

/// The recipe with every interface call replaced by its implementation; `None` when it calls
/// no interface.
pub fn dispatch(recipe: &Recipe, model_keys: &ModelKeys) -> Result<Option<Recipe>> {
    let calls_interface = |r: &Recipe| {
        r.nodes
            .iter()
            .any(|n| matches!(&n.kind, NodeKind::Merge { method, .. } if method.dispatch == Dispatch::Interface))
    };
    if !calls_interface(recipe) {
        return Ok(None);
    }
    let mut out = recipe.clone();
    // Children come first, so an argument that is itself a dispatched call is already resolved.
    for id in 0..out.nodes.len() {
        let NodeKind::Merge { method, inputs } = &out.nodes[id].kind else { continue };
        if method.dispatch != Dispatch::Interface {
            continue;
        }
        let chosen = choose(&out, method, inputs, model_keys).map_err(|e| e.within_node(&out.trace(id)))?;
        let inputs = inputs.clone();
        out.nodes[id].kind = NodeKind::Merge { method: chosen, inputs };
    }
    Ok(Some(out))
}

/// The recipe's nodes up to `root`, rooted there (nodes are stored children-first).
fn rooted_at(recipe: &Recipe, root: NodeId) -> Recipe {
    Recipe { nodes: recipe.nodes[..=root].to_vec(), root, source_index: recipe.source_index[..=root].to_vec() }
}

fn choose(
    recipe: &Recipe,
    interface: &MethodSpec,
    inputs: &[Vec<NodeId>],
    model_keys: &ModelKeys,
) -> Result<std::sync::Arc<MethodSpec>> {
    let implementations = registry().implementations(&interface.id);
    // The configs each argument could have, best first (computed once per argument).
    let mut seen: Vec<(NodeId, Vec<String>)> = vec![];
    let mut candidates_of = |child: NodeId| -> Result<Vec<String>> {
        if let Some((_, c)) = seen.iter().find(|(n, _)| *n == child) {
            return Ok(c.clone());
        }
        let c = root_candidates(&rooted_at(recipe, child), model_keys, None)?;
        seen.push((child, c.clone()));
        Ok(c)
    };
    // sd-mecha takes the first implementation whose configs the inputs can have; where an input
    // could have several (a file holding only keys two configs share), the implementation for
    // its likelier configs wins, then registration order.
    let mut best: Option<(usize, &std::sync::Arc<MethodSpec>)> = None;
    'implementations: for implementation in &implementations {
        let mut rank = 0;
        for (param, children) in implementation.params.iter().zip(inputs) {
            let Some(config) = &param.config else { continue };
            for &child in children {
                match candidates_of(child)?.iter().position(|c| c == config) {
                    Some(position) => rank += position,
                    None => continue 'implementations,
                }
            }
        }
        if best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, implementation));
        }
    }
    if let Some((_, implementation)) = best {
        return Ok(implementation.clone());
    }
    // Name what the arguments look like and what exists, so the user can convert or register.
    let mut found = vec![];
    for (param, children) in interface.params.iter().zip(inputs) {
        if !implementations.iter().any(|m| m.param(&param.name).is_some_and(|(_, p)| p.config.is_some())) {
            continue;
        }
        for &child in children {
            let c = candidates_of(child)?;
            let what = if c.is_empty() { "no known config".to_string() } else { c.join(" or ") };
            found.push(format!("\"{}\" has {what}", param.name));
        }
    }
    let available: Vec<String> = implementations
        .iter()
        .map(|m| {
            let configs: Vec<String> =
                m.params.iter().filter_map(|p| p.config.as_ref().map(|c| format!("{} {c}", p.name))).collect();
            format!("{} ({})", m.id, configs.join(", "))
        })
        .collect();
    Err(MechaError::new(
        ErrorKind::Config,
        format!(
            "{}: no implementation takes these inputs ({}); implementations: {}. Convert the input to one of \
             those configs, or register an implementation for its config",
            interface.id,
            found.join(", "),
            if available.is_empty() { "none".to_string() } else { available.join("; ") }
        ),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use indexmap::IndexSet;

    use super::*;
    use crate::recipe::{Arg, RecipeBuilder};

    fn keys(names: &[&str]) -> Arc<IndexSet<String>> {
        Arc::new(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn an_interface_call_becomes_its_implementation_for_the_inputs_config() {
        let mut b = RecipeBuilder::new();
        let m = b.model("sd1.safetensors", None, None);
        let call = b.merge("exchange_ema", vec![Arg::Node(m)], vec![]).unwrap();
        let recipe = b.finish(call).unwrap();
        let model_keys: ModelKeys = HashMap::from([(
            m,
            keys(&["model.diffusion_model.input_blocks.0.0.weight", "model_ema.diffusion_modelinput_blocks00weight"]),
        )]);
        let out = dispatch(&recipe, &model_keys).unwrap().expect("an interface is called");
        let NodeKind::Merge { method, .. } = &out.node(out.root).kind else { panic!() };
        assert_eq!(method.id, "exchange_ema_'sd1-ldm'");
    }

    #[test]
    fn an_input_no_implementation_takes_is_a_typed_error_naming_the_configs() {
        let mut b = RecipeBuilder::new();
        let m = b.model("flux.safetensors", None, None);
        let call = b.merge("exchange_ema", vec![Arg::Node(m)], vec![]).unwrap();
        let recipe = b.finish(call).unwrap();
        let model_keys: ModelKeys = HashMap::from([(m, keys(&["some.unknown.key"]))]);
        let err = dispatch(&recipe, &model_keys).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Config);
        assert!(err.message.contains("no known config") && err.message.contains("sd1-ldm"), "{}", err.message);
    }
}
