//! `seed: int = None` parameters: sd-mecha draws an unseeded stream for them, which no one can
//! replay. Here a merge picks a seed for each such null before planning, reports it, and the
//! recipe embedded in the output carries it, so merging that recipe again gives the same bytes.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use super::{NodeKind, Recipe, Scalar, Value};
use crate::methods::{DefaultValue, ParamSpec, ValueType};

/// A seed the merge chose for a null seed parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ChosenSeed {
    /// The node's index in the recipe as it was read (its line in `.mecha` text), if any.
    pub node: Option<usize>,
    pub method: String,
    pub param: String,
    pub seed: i64,
}

/// A parameter declared like sd-mecha's `seed: int = None` or `approximate_basis_seed: int = None`.
pub fn is_seed_param(param: &ParamSpec) -> bool {
    param.value_type == ValueType::Int
        && param.default == Some(DefaultValue::Null)
        && (param.name == "seed" || param.name.ends_with("_seed"))
}

/// Seeds below 2^53 stay exact as JavaScript numbers; different each call (the OS-keyed hasher
/// of the standard library, mixed with the time).
fn fresh_seed(salt: u64) -> i64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(salt);
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    (h.finish() >> 11) as i64
}

/// The literal holding a plain parameter value and that value: sd-mecha wraps a plain value as
/// `convert_singleton(literal {"key": value})`.
fn plain_value(recipe: &Recipe, id: usize) -> Option<(usize, &Scalar)> {
    let NodeKind::Merge { method, inputs } = &recipe.nodes[id].kind else { return None };
    if method.id != "convert_singleton" {
        return None;
    }
    let literal = *inputs.first()?.first()?;
    match &recipe.nodes[literal].kind {
        NodeKind::Literal { entries } if entries.len() == 1 => match entries.values().next() {
            Some(Value::Scalar(v)) => Some((literal, v)),
            _ => None,
        },
        _ => None,
    }
}

fn null_literal(recipe: &Recipe, id: usize) -> Option<usize> {
    plain_value(recipe, id).filter(|(_, v)| **v == Scalar::Null).map(|(literal, _)| literal)
}

/// `approximate_basis_seed` feeds the randomised SVD only: with `use_approximate_basis=False`
/// nothing draws from it, so no seed is chosen (or reported).
fn seed_unused(recipe: &Recipe, method: &crate::methods::MethodSpec, inputs: &[Vec<usize>], param: usize) -> bool {
    method.params[param].name == "approximate_basis_seed"
        && method.param("use_approximate_basis").is_some_and(|(i, _)| {
            inputs[i].iter().all(|&n| matches!(plain_value(recipe, n), Some((_, Scalar::Bool(false)))))
        })
}

/// Replaces every null seed of the nodes reachable from the root by a fresh seed, in node order.
pub fn choose_seeds(recipe: &mut Recipe) -> Vec<ChosenSeed> {
    let mut chosen = vec![];
    for id in recipe.post_order() {
        let NodeKind::Merge { method, inputs } = &recipe.nodes[id].kind else { continue };
        let method = method.clone();
        let seeds: Vec<(usize, usize)> = (0..method.params.len())
            .filter(|&p| is_seed_param(&method.params[p]) && !seed_unused(recipe, &method, inputs, p))
            .flat_map(|p| inputs[p].iter().filter_map(|&i| null_literal(recipe, i)).map(move |l| (l, p)))
            .collect();
        for (literal, param) in seeds {
            let seed = fresh_seed((id as u64) << 32 | literal as u64);
            if let NodeKind::Literal { entries } = &mut recipe.nodes[literal].kind {
                for value in entries.values_mut() {
                    *value = Value::Scalar(Scalar::Int(seed));
                }
            }
            chosen.push(ChosenSeed {
                node: recipe.source_index[id],
                method: method.id.clone(),
                param: method.params[param].name.clone(),
                seed,
            });
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::error::Result;
    use crate::methods::decl::{hyper, input, returns};
    use crate::methods::seam::{Decision, Method, PlanCall};
    use crate::methods::{MethodSpec, SpaceSpec};
    use crate::recipe::RecipeBuilder;

    struct Unplanned;
    impl Method for Unplanned {
        fn plan(&self, call: &PlanCall) -> Result<Decision> {
            Err(crate::error::MechaError::recipe(format!("{} only exists to be bound", call.method.id)))
        }
    }

    /// `noise(a, seed=…, label=None)` bound the way `RecipeBuilder::merge` binds arguments.
    fn recipe_with(seed: Scalar) -> Recipe {
        let spec = Arc::new(MethodSpec::new(
            "noise",
            "test method",
            vec![
                input("a", ValueType::Tensor, SpaceSpec::Symbol),
                hyper("seed", ValueType::Int, DefaultValue::Null),
                hyper("label", ValueType::Int, DefaultValue::Null),
            ],
            returns(ValueType::Tensor, SpaceSpec::Symbol),
            Unplanned,
        ));
        let mut b = RecipeBuilder::new();
        let a = b.model("a.safetensors", None, None);
        let (seed, label) = (b.value(seed), b.value(Scalar::Null));
        let mut nodes_and_root = b.finish(a).expect("valid");
        nodes_and_root.nodes.push(crate::recipe::Node {
            kind: NodeKind::Merge { method: spec, inputs: vec![vec![a], vec![seed], vec![label]] },
            config: None,
            merge_space: None,
        });
        nodes_and_root.source_index.push(Some(7));
        nodes_and_root.root = nodes_and_root.nodes.len() - 1;
        nodes_and_root
    }

    fn literal_values(recipe: &Recipe) -> Vec<Scalar> {
        recipe
            .nodes
            .iter()
            .filter_map(|n| match &n.kind {
                NodeKind::Literal { entries } => entries.values().next().cloned(),
                _ => None,
            })
            .map(|v| match v {
                Value::Scalar(s) => s,
                Value::Node(_) => unreachable!("scalar literals only"),
            })
            .collect()
    }

    #[test]
    fn null_seeds_are_replaced_and_reported_other_nulls_and_given_seeds_are_not() {
        let mut first = recipe_with(Scalar::Null);
        let chosen = choose_seeds(&mut first);
        assert_eq!(chosen.len(), 1);
        assert_eq!((chosen[0].node, chosen[0].method.as_str(), chosen[0].param.as_str()), (Some(7), "noise", "seed"));
        assert!((0..1i64 << 53).contains(&chosen[0].seed));
        assert_eq!(literal_values(&first), vec![Scalar::Int(chosen[0].seed), Scalar::Null]);

        let mut second = recipe_with(Scalar::Null);
        assert_ne!(choose_seeds(&mut second)[0].seed, chosen[0].seed, "each merge picks its own seed");

        let mut given = recipe_with(Scalar::Int(42));
        assert!(choose_seeds(&mut given).is_empty());
        assert_eq!(literal_values(&given), vec![Scalar::Int(42), Scalar::Null]);
    }

    #[test]
    fn the_exact_svd_needs_no_seed() {
        let bound = |approximate: bool| {
            let mut b = RecipeBuilder::new();
            let a = b.model("a.safetensors", Some("sdxl-kohya"), Some("delta"));
            let flag = crate::recipe::Arg::Value(Scalar::Bool(approximate));
            let root = b
                .merge("truncate_rank", vec![crate::recipe::Arg::Node(a)], vec![("use_approximate_basis".into(), flag)])
                .unwrap();
            b.finish(root).unwrap()
        };
        assert!(choose_seeds(&mut bound(false)).is_empty());
        let chosen = choose_seeds(&mut bound(true));
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0].param, "approximate_basis_seed");
    }
}
