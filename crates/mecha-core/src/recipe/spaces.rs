//! Merge-space inference. Spaces (`weight`, `delta`, `param`) behave like type variables: each
//! method call gets a fresh symbol shared by its symbol-typed inputs and its return; fixed-space
//! parameters and node hints constrain the classes; the root must be `weight` unless the caller
//! says otherwise. Solved before any tensor is read.

use crate::error::{ErrorKind, MechaError, Result};
use crate::methods::SpaceSpec;
use crate::recipe::{NodeKind, Recipe, Value};

/// Registered merge spaces, in sd-mecha's preference order.
pub const SPACES: [&str; 3] = ["weight", "delta", "param"];

/// What the root must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootSpace {
    /// The root must solve to exactly this space (sd-mecha's `strict_merge_space`, default weight).
    Strict(String),
    /// Any space; ambiguity at the root is settled by preference: weight, then delta, then param.
    Preferred,
    /// No requirement and no preference: an ambiguous root is an error (sd-mecha's `serialize`).
    Free,
}

impl Default for RootSpace {
    fn default() -> Self {
        RootSpace::Strict("weight".into())
    }
}

struct Constraint {
    allowed: Vec<String>,
    why: String,
}

struct Solver {
    parent: Vec<usize>,
    constraints: Vec<Vec<Constraint>>,
}

impl Solver {
    fn var(&mut self) -> usize {
        self.parent.push(self.parent.len());
        self.constraints.push(vec![]);
        self.parent.len() - 1
    }

    fn find(&mut self, v: usize) -> usize {
        let mut root = v;
        while self.parent[root] != root {
            root = self.parent[root];
        }
        let mut cur = v;
        while self.parent[cur] != root {
            cur = std::mem::replace(&mut self.parent[cur], root);
        }
        root
    }

    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.parent[b] = a;
            let moved = std::mem::take(&mut self.constraints[b]);
            self.constraints[a].extend(moved);
        }
    }

    fn constrain(&mut self, v: usize, allowed: Vec<String>, why: String) {
        let r = self.find(v);
        self.constraints[r].push(Constraint { allowed, why });
    }
}

fn spaces_of(spec: &SpaceSpec) -> Vec<String> {
    match spec {
        SpaceSpec::Symbol => SPACES.iter().map(|s| s.to_string()).collect(),
        SpaceSpec::Fixed(v) => v.clone(),
    }
}

fn describe(allowed: &[String]) -> String {
    match allowed {
        [one] => one.clone(),
        many => format!("one of {}", many.join("/")),
    }
}

/// Solves the merge space of every node reachable from the root (`None` for the others).
pub fn infer(recipe: &Recipe, root_space: &RootSpace) -> Result<Vec<Option<String>>> {
    let order = recipe.post_order();
    let mut s = Solver { parent: vec![], constraints: vec![] };
    let mut out: Vec<usize> = vec![usize::MAX; recipe.nodes.len()];

    for &n in &order {
        let node = recipe.node(n);
        let label = || recipe.trace(n);
        match &node.kind {
            NodeKind::Model { .. } | NodeKind::Literal { .. } => {
                out[n] = s.var();
                if let Some(hint) = &node.merge_space {
                    if !SPACES.contains(&hint.as_str()) {
                        return Err(MechaError::new(
                            ErrorKind::MergeSpace,
                            format!("unknown merge space \"{hint}\"; use one of {}", SPACES.join(", ")),
                        )
                        .within_node(&label()));
                    }
                    s.constrain(out[n], vec![hint.clone()], format!("{} is declared {hint}", node.label()));
                }
                if let NodeKind::Literal { entries } = &node.kind {
                    for v in entries.values() {
                        if let Value::Node(child) = v {
                            s.union(out[n], out[*child]);
                        }
                    }
                }
            }
            NodeKind::Merge { method, inputs } => {
                let symbol = s.var();
                out[n] = match &method.returns.space {
                    SpaceSpec::Symbol => symbol,
                    fixed => {
                        let v = s.var();
                        let allowed = spaces_of(fixed);
                        let why = format!("{} returns {}", method.id, describe(&allowed));
                        s.constrain(v, allowed, why);
                        v
                    }
                };
                for (param, children) in method.params.iter().zip(inputs) {
                    for &child in children {
                        match &param.space {
                            SpaceSpec::Symbol => s.union(out[child], symbol),
                            fixed => {
                                let allowed = spaces_of(fixed);
                                let why =
                                    format!("{} input \"{}\" requires {}", method.id, param.name, describe(&allowed));
                                s.constrain(out[child], allowed, why);
                            }
                        }
                    }
                }
            }
        }
    }
    if let RootSpace::Strict(space) = root_space {
        s.constrain(out[recipe.root], vec![space.clone()], format!("the recipe's result must be {space}"));
    }

    let mut solved: Vec<Option<String>> = vec![None; recipe.nodes.len()];
    for &n in &order {
        let class = s.find(out[n]);
        let mut allowed: Vec<String> = SPACES.iter().map(|x| x.to_string()).collect();
        for (i, c) in s.constraints[class].iter().enumerate() {
            allowed.retain(|x| c.allowed.contains(x));
            if allowed.is_empty() {
                let earlier: Vec<&str> = s.constraints[class][..i].iter().map(|c| c.why.as_str()).collect();
                let mut msg =
                    format!("merge-space constraints are unsatisfiable: {}, but {}", earlier.join(" and "), c.why);
                if c.why.contains("requires delta") {
                    msg.push_str(". Build a delta with subtract(a, b) (or `a.sub(b)`), or declare the model with mergeSpace: 'delta'");
                } else if c.why.contains("must be weight") {
                    msg.push_str(". Add the delta to a model (`base.add(delta)`), or pass strictMergeSpace: null (or the space you want) to merge()");
                }
                return Err(MechaError::new(ErrorKind::MergeSpace, msg).within_node(&recipe.trace(n)));
            }
        }
        let root_class = class == s.find(out[recipe.root]);
        solved[n] = Some(match allowed.as_slice() {
            [one] => one.clone(),
            _ if root_class && *root_space == RootSpace::Preferred => allowed[0].clone(),
            _ => {
                return Err(MechaError::new(
                    ErrorKind::MergeSpace,
                    format!(
                        "the merge space of {} is ambiguous (it could be {}); give the model or \
                         literal an explicit mergeSpace",
                        recipe.node(n).label(),
                        allowed.join(" or ")
                    ),
                )
                .within_node(&recipe.trace(n)))
            }
        });
    }
    Ok(solved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{Arg, RecipeBuilder, Scalar};

    fn two_models() -> (RecipeBuilder, usize, usize) {
        let mut b = RecipeBuilder::new();
        let a = b.model("a", None, Some("weight"));
        let c = b.model("c", None, Some("weight"));
        (b, a, c)
    }

    #[test]
    fn weighted_sum_is_weight_and_alpha_is_param() {
        let (mut b, a, c) = two_models();
        let root =
            b.merge("weighted_sum", vec![Arg::Node(a), Arg::Node(c), Arg::Value(Scalar::Float(0.3))], vec![]).unwrap();
        let r = b.finish(root).unwrap();
        let spaces = infer(&r, &RootSpace::default()).unwrap();
        assert_eq!(spaces[root].as_deref(), Some("weight"));
        let literal = r.nodes.iter().position(|n| matches!(n.kind, NodeKind::Literal { .. })).unwrap();
        assert_eq!(spaces[literal].as_deref(), Some("param"));
    }

    #[test]
    fn add_needs_a_delta() {
        let (mut b, a, c) = two_models();
        let root = b.merge("add_difference", vec![Arg::Node(a), Arg::Node(c)], vec![]).unwrap();
        let r = b.finish(root).unwrap();
        let err = infer(&r, &RootSpace::default()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::MergeSpace);
        assert!(err.message.contains("requires delta"), "{}", err.message);
        assert!(err.node.as_deref().unwrap().contains("b: model \"c\""), "{:?}", err.node);
    }

    #[test]
    fn delta_root_needs_permission() {
        let (mut b, a, c) = two_models();
        let d = b.merge("subtract", vec![Arg::Node(a), Arg::Node(c)], vec![]).unwrap();
        let r = b.finish(d).unwrap();
        assert!(infer(&r, &RootSpace::default()).is_err());
        assert_eq!(infer(&r, &RootSpace::Preferred).unwrap()[d].as_deref(), Some("delta"));
        assert_eq!(infer(&r, &RootSpace::Strict("delta".into())).unwrap()[d].as_deref(), Some("delta"));
    }

    #[test]
    fn add_difference_of_subtract_is_weight() {
        let (mut b, a, c) = two_models();
        let d = b.merge("subtract", vec![Arg::Node(c), Arg::Node(a)], vec![]).unwrap();
        let root = b
            .merge("add_difference", vec![Arg::Node(a), Arg::Node(d), Arg::Value(Scalar::Float(0.5))], vec![])
            .unwrap();
        let r = b.finish(root).unwrap();
        let spaces = infer(&r, &RootSpace::default()).unwrap();
        assert_eq!(spaces[d].as_deref(), Some("delta"));
        assert_eq!(spaces[root].as_deref(), Some("weight"));
    }
}
