//! The `.mecha` text format, version 0.1.0, written exactly as sd-mecha writes it: one
//! instruction per line in post-order, identical lines shared, numbers in Python's `str()` form,
//! no trailing newline.

use std::collections::HashMap;

use crate::methods::ParamKind;
use crate::recipe::{NodeId, NodeKind, Recipe, Scalar, Value};
use crate::util::python_float;

pub const FORMAT_VERSION: &str = "0.1.0";

/// What serialization needs beyond the graph: each node's solved config and merge space, and
/// each model's path as it should be written (absolute, once resolved).
pub struct Annotations<'a> {
    pub configs: &'a [Option<String>],
    pub spaces: &'a [Option<String>],
    pub paths: &'a [Option<String>],
}

pub fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

pub fn format_scalar(s: &Scalar) -> String {
    match s {
        Scalar::Null => "null".into(),
        Scalar::Bool(true) => "true".into(),
        Scalar::Bool(false) => "false".into(),
        Scalar::Int(i) => i.to_string(),
        Scalar::Float(f) => python_float(*f),
        Scalar::Str(s) => quote(s),
    }
}

fn format_optional(s: &Option<String>) -> String {
    s.as_deref().map_or_else(|| "null".to_string(), quote)
}

struct Writer<'a> {
    recipe: &'a Recipe,
    notes: &'a Annotations<'a>,
    lines: Vec<String>,
    index: HashMap<String, usize>,
    /// Each written node's reference (`&3`), so a shared node is written once.
    refs: Vec<Option<String>>,
}

impl Writer<'_> {
    fn emit(&mut self, line: String) -> String {
        let next = self.lines.len();
        let i = *self.index.entry(line.clone()).or_insert(next);
        if i == next {
            self.lines.push(line);
        }
        format!("&{i}")
    }

    /// A child's reference; children are written before their parents.
    fn written(&self, id: NodeId) -> String {
        self.refs[id].clone().expect("children are written first")
    }

    fn node(&mut self, id: NodeId) -> String {
        let node = self.recipe.node(id);
        let config = format_optional(&self.notes.configs[id].clone().or_else(|| node.config.clone()));
        let space = format_optional(&self.notes.spaces[id].clone().or_else(|| node.merge_space.clone()));
        match &node.kind {
            NodeKind::Model { path, .. } => {
                let path = self.notes.paths[id].as_deref().unwrap_or(path);
                let line = format!("model {} model_config={config} merge_space={space}", quote(path));
                self.emit(line)
            }
            NodeKind::Literal { entries } => {
                let mut parts = vec!["dict".to_string()];
                for (k, v) in entries {
                    let v = match v {
                        Value::Scalar(s) => format_scalar(s),
                        Value::Node(n) => self.written(*n),
                    };
                    parts.push(format!("{k}={v}"));
                }
                let dict = self.emit(parts.join(" "));
                if self.notes.configs[id].is_none() && node.config.is_none() {
                    dict
                } else {
                    self.emit(format!("literal {dict} model_config={config} merge_space={space}"))
                }
            }
            NodeKind::Merge { method, inputs } => {
                let mut args = vec!["merge".to_string(), quote(&method.id)];
                let mut kwargs = vec![];
                for (param, children) in method.params.iter().zip(inputs) {
                    for &child in children {
                        let r = self.written(child);
                        match param.kind {
                            ParamKind::KeywordOnly => kwargs.push(format!("{}={r}", param.name)),
                            _ => args.push(r),
                        }
                    }
                }
                args.extend(kwargs);
                self.emit(args.join(" "))
            }
        }
    }
}

/// Serializes a recipe to `.mecha` text.
pub fn serialize(recipe: &Recipe, notes: &Annotations) -> String {
    let mut w = Writer { recipe, notes, lines: vec![], index: HashMap::new(), refs: vec![None; recipe.nodes.len()] };
    // The order a recursive writer would visit them in, without the recursion.
    for id in recipe.post_order() {
        let r = w.node(id);
        w.refs[id] = Some(r);
    }
    let mut text = format!("version {FORMAT_VERSION}");
    for line in w.lines {
        text.push('\n');
        text.push_str(&line);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::spaces::{infer, RootSpace};
    use crate::recipe::{Arg, RecipeBuilder};

    #[test]
    fn weighted_sum_serializes_like_sd_mecha() {
        let mut b = RecipeBuilder::new();
        let a = b.model("/tmp/exp/a.safetensors", Some("tiny-test"), Some("weight"));
        let c = b.model("/tmp/exp/b.safetensors", Some("tiny-test"), Some("weight"));
        let root = b
            .merge(
                "weighted_sum",
                vec![Arg::Node(a), Arg::Node(c)],
                vec![("alpha".into(), Arg::Value(Scalar::Float(0.3)))],
            )
            .unwrap();
        let r = b.finish(root).unwrap();
        let spaces = infer(&r, &RootSpace::default()).unwrap();
        let none = vec![None; r.nodes.len()];
        let text = serialize(&r, &Annotations { configs: &none, spaces: &spaces, paths: &none });
        assert_eq!(
            text,
            "version 0.1.0\n\
             model \"/tmp/exp/a.safetensors\" model_config=\"tiny-test\" merge_space=\"weight\"\n\
             model \"/tmp/exp/b.safetensors\" model_config=\"tiny-test\" merge_space=\"weight\"\n\
             dict key=0.3\n\
             literal &2 model_config=\"singleton-mecha\" merge_space=\"param\"\n\
             merge \"convert_singleton\" &3\n\
             merge \"weighted_sum\" &0 &1 &4"
        );
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
