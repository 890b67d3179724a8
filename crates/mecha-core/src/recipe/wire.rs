//! The JSON form of a recipe, used between TypeScript and the core and accepted by the CLI:
//!
//! ```json
//! { "nodes": [
//!     { "model": "a.safetensors", "mergeSpace": "weight" },
//!     { "model": "b.safetensors" },
//!     { "merge": "weighted_sum", "args": [{ "node": 0 }, { "node": 1 }], "kwargs": { "alpha": 0.3 } }
//!   ],
//!   "root": 2 }
//! ```
//!
//! Values are JSON numbers (floats), `{ "int": 3 }`, `{ "float": "inf" | "-inf" | "nan" | "-0.0" }`
//! (what JSON numbers cannot say),
//! strings, booleans, `null`, or `{ "node": i }` referring to an earlier entry of `nodes`.
//! A literal is a value or a dict of values; `{ "literal": { "dict": { … } } }` always means a
//! dict (write it so for a one-entry dict whose key is `int`, `float`, `node` or `dict`).
//! `root` defaults to the last node.

use indexmap::IndexMap;
use serde_json::Value as Json;

use crate::error::{ErrorKind, MechaError, Result};
use crate::methods::logistics::SINGLETON_CONFIG;
use crate::methods::ParamKind;
use crate::recipe::{Arg, NodeId, NodeKind, Recipe, RecipeBuilder, Scalar, Value};

fn parse_error(msg: impl Into<String>) -> MechaError {
    MechaError::new(ErrorKind::Recipe, msg)
}

enum Parsed {
    Scalar(Scalar),
    Node(NodeId),
}

fn parse_value(v: &Json, ids: &[NodeId], at: &str) -> Result<Parsed> {
    Ok(match v {
        Json::Null => Parsed::Scalar(Scalar::Null),
        Json::Bool(b) => Parsed::Scalar(Scalar::Bool(*b)),
        Json::Number(n) => {
            Parsed::Scalar(Scalar::Float(n.as_f64().ok_or_else(|| parse_error(format!("{at}: number out of range")))?))
        }
        Json::String(s) => Parsed::Scalar(Scalar::Str(s.clone())),
        Json::Object(o) if o.len() == 1 && o.contains_key("node") => {
            let i =
                o["node"].as_u64().ok_or_else(|| parse_error(format!("{at}: \"node\" must be a node index")))? as usize;
            Parsed::Node(*ids.get(i).ok_or_else(|| {
                parse_error(format!("{at}: reference to node {i}, which is not defined before this point"))
            })?)
        }
        Json::Object(o) if o.len() == 1 && o.contains_key("float") => {
            let f = o["float"].as_str().and_then(|s| s.parse::<f64>().ok());
            Parsed::Scalar(Scalar::Float(f.ok_or_else(|| {
                parse_error(format!("{at}: \"float\" holds a number such as \"inf\", \"nan\" or \"-0.0\""))
            })?))
        }
        Json::Object(o) if o.len() == 1 && o.contains_key("int") => {
            let i = match &o["int"] {
                Json::Number(n) => n.as_i64(),
                Json::String(s) => s.parse().ok(),
                _ => None,
            };
            Parsed::Scalar(Scalar::Int(i.ok_or_else(|| parse_error(format!("{at}: \"int\" must hold an integer")))?))
        }
        other => return Err(parse_error(format!("{at}: unsupported value {other}"))),
    })
}

fn opt_str<'a>(o: &'a serde_json::Map<String, Json>, key: &str, at: &str) -> Result<Option<&'a str>> {
    match o.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s)),
        Some(_) => Err(parse_error(format!("{at}: \"{key}\" must be a string"))),
    }
}

/// Reads the JSON form into a bound recipe.
pub fn from_json(text: &str) -> Result<Recipe> {
    let json: Json = serde_json::from_str(text).map_err(|e| parse_error(format!("recipe JSON is invalid: {e}")))?;
    from_json_value(&json)
}

pub fn from_json_value(json: &Json) -> Result<Recipe> {
    let nodes = json
        .get("nodes")
        .and_then(Json::as_array)
        .ok_or_else(|| parse_error("a JSON recipe is an object with a \"nodes\" array"))?;
    if nodes.is_empty() {
        return Err(parse_error("the recipe has no nodes"));
    }
    let mut b = RecipeBuilder::new();
    let mut ids: Vec<NodeId> = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let at = format!("nodes[{i}]");
        let o = node.as_object().ok_or_else(|| parse_error(format!("{at} must be an object")))?;
        let config = opt_str(o, "config", &at)?;
        let space = opt_str(o, "mergeSpace", &at)?;
        let id = if let Some(memory) = o.get("memory") {
            let id = memory.as_u64().ok_or_else(|| parse_error(format!("{at}: \"memory\" must be a model id")))?;
            b.memory_model(id, config, space)
        } else if let Some(path) = o.get("model") {
            let path = path.as_str().ok_or_else(|| parse_error(format!("{at}: \"model\" must be a path string")))?;
            b.model(path, config, space)
        } else if let Some(value) = o.get("literal") {
            literal(&mut b, value, config, space, &ids, &at)?
        } else if let Some(method) = o.get("merge") {
            let method = method.as_str().ok_or_else(|| parse_error(format!("{at}: \"merge\" must be a method id")))?;
            let to_arg = |v: &Json, at: String| -> Result<Arg> {
                Ok(match parse_value(v, &ids, &at)? {
                    Parsed::Node(n) => Arg::Node(n),
                    Parsed::Scalar(s) => Arg::Value(s),
                })
            };
            let args = match o.get("args") {
                None => vec![],
                Some(Json::Array(a)) => {
                    a.iter().enumerate().map(|(j, v)| to_arg(v, format!("{at}.args[{j}]"))).collect::<Result<_>>()?
                }
                Some(_) => return Err(parse_error(format!("{at}: \"args\" must be an array"))),
            };
            let kwargs = match o.get("kwargs") {
                None => vec![],
                Some(Json::Object(k)) => k
                    .iter()
                    .map(|(name, v)| Ok((name.clone(), to_arg(v, format!("{at}.kwargs.{name}"))?)))
                    .collect::<Result<_>>()?,
                Some(_) => return Err(parse_error(format!("{at}: \"kwargs\" must be an object"))),
            };
            b.merge(method, args, kwargs).map_err(|e| e.within_node(&at))?
        } else {
            return Err(parse_error(format!("{at} must have one of \"model\", \"literal\" or \"merge\"")));
        };
        b.set_source_index(id, i);
        ids.push(id);
    }
    let root = match json.get("root") {
        None | Some(Json::Null) => *ids.last().expect("non-empty"),
        Some(r) => {
            let i = r.as_u64().ok_or_else(|| parse_error("\"root\" must be a node index"))? as usize;
            *ids.get(i)
                .ok_or_else(|| parse_error(format!("\"root\" refers to node {i}, but there are {} nodes", ids.len())))?
        }
    };
    b.finish(root)
}

/// sd-mecha's `literal()`: a dict stays a dict literal; any other value becomes `{"key": v}` in
/// the singleton config, broadcast through `convert_singleton` unless the singleton config is asked for.
fn literal(
    b: &mut RecipeBuilder,
    value: &Json,
    config: Option<&str>,
    space: Option<&str>,
    ids: &[NodeId],
    at: &str,
) -> Result<NodeId> {
    if let Json::Object(o) = value {
        // `{"dict": {...}}` is always a dict; a bare object is one unless it is a tagged value.
        let dict = match o.get("dict") {
            Some(Json::Object(d)) if o.len() == 1 => Some(d),
            _ if o.len() == 1 && ["node", "int", "float"].iter().any(|t| o.contains_key(*t)) => None,
            _ => Some(o),
        };
        if let Some(o) = dict {
            let mut entries = IndexMap::new();
            for (k, v) in o {
                let v = match parse_value(v, ids, &format!("{at}.literal.{k}"))? {
                    Parsed::Node(n) => Value::Node(n),
                    Parsed::Scalar(s) => Value::Scalar(s),
                };
                entries.insert(k.clone(), v);
            }
            return b.literal(entries, config, space).map_err(|e| e.within_node(at));
        }
    }
    let entry = match parse_value(value, ids, &format!("{at}.literal"))? {
        Parsed::Node(n) => Value::Node(n),
        Parsed::Scalar(s) => Value::Scalar(s),
    };
    let node = b.literal(IndexMap::from([("key".to_string(), entry)]), Some(SINGLETON_CONFIG), space)?;
    if config == Some(SINGLETON_CONFIG) {
        Ok(node)
    } else {
        b.merge("convert_singleton", vec![Arg::Node(node)], vec![])
    }
}

fn scalar_json(s: &Scalar) -> Json {
    match s {
        Scalar::Null => Json::Null,
        Scalar::Bool(b) => Json::Bool(*b),
        Scalar::Int(i) => serde_json::json!({ "int": i }),
        Scalar::Float(f) if f.is_finite() => serde_json::json!(f),
        Scalar::Float(f) => {
            serde_json::json!({ "float": f.to_string().to_lowercase().replace("infinity", "inf") })
        }
        Scalar::Str(s) => Json::String(s.clone()),
    }
}

/// The JSON form of a bound recipe (node ids are kept: children come first).
pub fn to_json(recipe: &Recipe) -> Json {
    let node_ref = |id: &usize| serde_json::json!({ "node": id });
    let with_hints = |mut o: serde_json::Map<String, Json>, n: &crate::recipe::Node| {
        if let Some(c) = &n.config {
            o.insert("config".into(), c.clone().into());
        }
        if let Some(s) = &n.merge_space {
            o.insert("mergeSpace".into(), s.clone().into());
        }
        Json::Object(o)
    };
    let nodes: Vec<Json> = recipe
        .nodes
        .iter()
        .map(|n| match &n.kind {
            NodeKind::Model { path, memory } => {
                let mut o = serde_json::Map::from_iter([("model".into(), path.clone().into())]);
                if let Some(id) = memory {
                    o.insert("memory".into(), (*id).into());
                }
                with_hints(o, n)
            }
            NodeKind::Literal { entries } => {
                let value: serde_json::Map<String, Json> = entries
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Value::Scalar(s) => scalar_json(s),
                            Value::Node(id) => node_ref(id),
                        };
                        (k.clone(), v)
                    })
                    .collect();
                let dict = serde_json::json!({ "dict": Json::Object(value) });
                with_hints(serde_json::Map::from_iter([("literal".into(), dict)]), n)
            }
            NodeKind::Merge { method, inputs } => {
                let mut args = vec![];
                let mut kwargs = serde_json::Map::new();
                for (param, ids) in method.params.iter().zip(inputs) {
                    match param.kind {
                        ParamKind::KeywordOnly => {
                            kwargs.insert(param.name.clone(), node_ref(&ids[0]));
                        }
                        _ => args.extend(ids.iter().map(node_ref)),
                    }
                }
                serde_json::json!({ "merge": method.id, "args": args, "kwargs": kwargs })
            }
        })
        .collect();
    serde_json::json!({ "nodes": nodes, "root": recipe.root })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::mecha::{serialize, Annotations};
    use crate::recipe::parse::parse;

    fn text_of(r: &Recipe) -> String {
        let none = vec![None; r.nodes.len()];
        serialize(r, &Annotations { configs: &none, spaces: &none, paths: &none })
    }

    #[test]
    fn parsed_recipes_survive_the_json_form() {
        // Found by fuzzing: a dict key named like a value tag (`int`) must stay a dict key.
        for dict in ["int=0.3", "node=1", "float=2", "dict=3", "key=-0.0", "key=inf", "key=9007199254740993"] {
            let text = format!(
                "version 0.1.0\nmodel \"a\" model_config=null merge_space=\"weight\"\nmodel \"b\" model_config=null merge_space=\"weight\"\n\
                 dict {dict}\nliteral &2 model_config=\"singleton-mecha\" merge_space=\"param\"\nmerge \"weighted_sum\" &0 &1 &3"
            );
            let parsed = parse(&text).unwrap();
            let again = from_json_value(&to_json(&parsed)).unwrap();
            assert_eq!(text_of(&again), text_of(&parsed), "{dict}");
        }
    }
}
