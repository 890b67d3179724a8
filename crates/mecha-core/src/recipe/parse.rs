//! Reading `.mecha` text (format 0.1.0). Everything sd-mecha writes reads back unchanged; on top
//! of what its own parser accepts, blank lines, a trailing newline, `#` comments, `inf`/`nan`
//! and `=` inside quoted strings are read too. Errors name the line and column.

use indexmap::IndexMap;

use crate::error::{ErrorKind, MechaError, Result};
use crate::recipe::mecha::FORMAT_VERSION;
use crate::recipe::{Arg, NodeId, Recipe, RecipeBuilder, Scalar, Value};

fn error(line: usize, column: usize, msg: impl std::fmt::Display) -> MechaError {
    MechaError::new(ErrorKind::Parse, format!("line {line}, column {column}: {msg}")).at(line, column)
}

/// One argument of an instruction: `value` or `name=value`.
struct Token {
    name: Option<String>,
    value: Raw,
    column: usize,
}

enum Raw {
    /// Written in quotes.
    Quoted(String),
    Bare(String),
}

/// Splits an instruction into tokens at unquoted spaces. `\` escapes the next character, as in
/// sd-mecha. `name=` is recognised only before any quote, so `=` inside a string stays text.
fn tokenize(text: &str, line: usize) -> Result<Vec<Token>> {
    let mut tokens = vec![];
    let mut chars = text.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c == ' ' || c == '\t' {
            chars.next();
            continue;
        }
        let column = text[..start].chars().count() + 1;
        let (mut name, mut text_part, mut quoted) = (None::<String>, String::new(), None::<String>);
        let mut in_quotes = false;
        while let Some(&(_, c)) = chars.peek() {
            if !in_quotes && (c == ' ' || c == '\t') {
                break;
            }
            chars.next();
            match c {
                '\\' => match chars.next() {
                    Some((_, escaped)) => match quoted.as_mut() {
                        Some(q) if in_quotes => q.push(escaped),
                        _ => text_part.push(escaped),
                    },
                    None => return Err(error(line, column, "a backslash ends the line; it must escape a character")),
                },
                '"' if in_quotes => in_quotes = false,
                '"' if quoted.is_some() => {
                    return Err(error(line, column, "a value holds two quoted strings; escape inner quotes as \\\""))
                }
                '"' => {
                    if !text_part.is_empty() {
                        return Err(error(
                            line,
                            column,
                            format!("unexpected text `{text_part}` before a quoted string"),
                        ));
                    }
                    in_quotes = true;
                    quoted = Some(String::new());
                }
                '=' if name.is_none() && quoted.is_none() => name = Some(std::mem::take(&mut text_part)),
                c => match quoted.as_mut() {
                    Some(q) if in_quotes => q.push(c),
                    Some(_) => {
                        return Err(error(line, column, format!("unexpected text after a quoted string: `{c}`")))
                    }
                    None => text_part.push(c),
                },
            }
        }
        if in_quotes {
            return Err(error(line, column, "unterminated string: a closing \" is missing"));
        }
        if name.as_deref() == Some("") {
            return Err(error(line, column, "an argument starts with `=`; write `name=value`"));
        }
        let value = match quoted {
            Some(q) => Raw::Quoted(q),
            None if text_part.is_empty() => return Err(error(line, column, "an argument has no value after `=`")),
            None => Raw::Bare(text_part),
        };
        tokens.push(Token { name, value, column });
    }
    Ok(tokens)
}

/// What an instruction produced: dicts are values, the other commands nodes.
enum Item {
    Dict(IndexMap<String, Value>),
    Node(NodeId),
}

enum Parsed {
    Scalar(Scalar),
    Ref(usize),
}

fn parse_value(token: &Token, line: usize, results: usize) -> Result<Parsed> {
    let at = |msg: String| error(line, token.column, msg);
    Ok(match &token.value {
        Raw::Quoted(s) => Parsed::Scalar(Scalar::Str(s.clone())),
        Raw::Bare(t) => {
            match t.as_str() {
                "null" => Parsed::Scalar(Scalar::Null),
                "true" => Parsed::Scalar(Scalar::Bool(true)),
                "false" => Parsed::Scalar(Scalar::Bool(false)),
                t if t.starts_with('&') => {
                    let i: usize = t[1..]
                        .parse()
                        .map_err(|_| at(format!("`{t}` is not a reference; write &N with N an instruction number")))?;
                    if i >= results {
                        return Err(at(format!(
                        "reference &{i} points to an instruction that is not defined before it (instructions so far: {results})"
                    )));
                    }
                    Parsed::Ref(i)
                }
                t => {
                    let lower = t.to_ascii_lowercase();
                    let float_like =
                        t.contains('.') || lower.contains('e') || lower.contains("inf") || lower.contains("nan");
                    if float_like {
                        Parsed::Scalar(Scalar::Float(t.parse().map_err(|_| {
                            at(format!("`{t}` is not a number, a string, a reference or null/true/false"))
                        })?))
                    } else {
                        Parsed::Scalar(Scalar::Int(t.parse().map_err(|_| {
                            at(format!("`{t}` is not a number, a string, a reference or null/true/false"))
                        })?))
                    }
                }
            }
        }
    })
}

struct Parser {
    builder: RecipeBuilder,
    results: Vec<Item>,
}

impl Parser {
    fn value(&self, token: &Token, line: usize) -> Result<Parsed> {
        parse_value(token, line, self.results.len())
    }

    /// A string or null argument (`model_config`, `merge_space`).
    fn optional_string(&self, token: Option<&Token>, line: usize, what: &str) -> Result<Option<String>> {
        let Some(token) = token else { return Ok(None) };
        match self.value(token, line)? {
            Parsed::Scalar(Scalar::Str(s)) => Ok(Some(s)),
            Parsed::Scalar(Scalar::Null) => Ok(None),
            _ => Err(error(line, token.column, format!("{what} must be a quoted string or null"))),
        }
    }

    /// Positional and keyword arguments bound to named parameters (`model` and `literal`).
    fn bind<'t>(tokens: &'t [Token], params: &[&str], line: usize, command: &str) -> Result<Vec<Option<&'t Token>>> {
        let mut bound: Vec<Option<&Token>> = vec![None; params.len()];
        let mut next = 0;
        for t in tokens {
            let slot = match &t.name {
                None => {
                    next += 1;
                    next - 1
                }
                Some(n) => params.iter().position(|p| p == n).ok_or_else(|| {
                    error(line, t.column, format!("{command} has no parameter `{n}` (it takes {})", params.join(", ")))
                })?,
            };
            if slot >= params.len() {
                return Err(error(line, t.column, format!("{command} takes at most {} arguments", params.len())));
            }
            if bound[slot].replace(t).is_some() {
                return Err(error(line, t.column, format!("{command}: `{}` is given twice", params[slot])));
            }
        }
        Ok(bound)
    }

    fn dict_of(&self, token: &Token, line: usize) -> Result<IndexMap<String, Value>> {
        match self.value(token, line)? {
            Parsed::Ref(i) => match &self.results[i] {
                Item::Dict(d) => Ok(d.clone()),
                Item::Node(_) => {
                    Err(error(line, token.column, format!("&{i} is a recipe node, but a dict is expected here")))
                }
            },
            _ => Err(error(line, token.column, "a dict reference (&N of a `dict` line) is expected here")),
        }
    }

    fn instruction(&mut self, command: &str, tokens: &[Token], line: usize, column: usize) -> Result<Item> {
        let traced = |e: MechaError| {
            if e.line.is_some() {
                e
            } else {
                MechaError { message: format!("line {line}: {}", e.message), ..e }.at(line, column)
            }
        };
        match command {
            "dict" => {
                let mut entries = IndexMap::new();
                for t in tokens {
                    match &t.name {
                        None => entries.extend(self.dict_of(t, line)?),
                        Some(k) => {
                            let v = match self.value(t, line)? {
                                Parsed::Scalar(s) => Value::Scalar(s),
                                Parsed::Ref(i) => match &self.results[i] {
                                    Item::Node(n) => Value::Node(*n),
                                    Item::Dict(_) => {
                                        return Err(error(line, t.column, "a dict cannot contain another dict"))
                                    }
                                },
                            };
                            entries.insert(k.clone(), v);
                        }
                    }
                }
                Ok(Item::Dict(entries))
            }
            "literal" => {
                let args = Self::bind(tokens, &["value", "model_config", "merge_space"], line, "literal")?;
                let value =
                    args[0].ok_or_else(|| error(line, column, "literal needs a value (&N of a `dict` line)"))?;
                let entries = self.dict_of(value, line)?;
                let config = self.optional_string(args[1], line, "model_config")?;
                let space = self.optional_string(args[2], line, "merge_space")?;
                let id = self.builder.literal(entries, config.as_deref(), space.as_deref()).map_err(traced)?;
                Ok(Item::Node(id))
            }
            "model" => {
                let args = Self::bind(tokens, &["path", "model_config", "merge_space"], line, "model")?;
                let path = match args[0].map(|t| self.value(t, line)).transpose()? {
                    Some(Parsed::Scalar(Scalar::Str(p))) => p,
                    _ => return Err(error(line, column, "model needs a quoted path")),
                };
                let config = self.optional_string(args[1], line, "model_config")?;
                let space = self.optional_string(args[2], line, "merge_space")?;
                Ok(Item::Node(self.builder.model(&path, config.as_deref(), space.as_deref())))
            }
            "merge" => {
                let (first, rest) =
                    tokens.split_first().ok_or_else(|| error(line, column, "merge needs a method name"))?;
                let method = match (&first.name, self.value(first, line)?) {
                    (None, Parsed::Scalar(Scalar::Str(m))) => m,
                    _ => return Err(error(line, first.column, "merge needs a quoted method name first")),
                };
                let mut args = vec![];
                let mut kwargs = vec![];
                for t in rest {
                    let arg = match self.value(t, line)? {
                        Parsed::Scalar(s) => Arg::Value(s),
                        Parsed::Ref(i) => match &self.results[i] {
                            Item::Node(n) => Arg::Node(*n),
                            // sd-mecha wraps a dict argument into a literal without a config.
                            Item::Dict(d) => Arg::Node(self.builder.literal(d.clone(), None, None).map_err(traced)?),
                        },
                    };
                    match &t.name {
                        None if !kwargs.is_empty() => {
                            return Err(error(line, t.column, "a positional argument follows a keyword argument"))
                        }
                        None => args.push(arg),
                        Some(n) => kwargs.push((n.clone(), arg)),
                    }
                }
                Ok(Item::Node(self.builder.merge(&method, args, kwargs).map_err(traced)?))
            }
            other => {
                Err(error(line, column, format!("unknown command `{other}`; expected dict, literal, model or merge")))
            }
        }
    }
}

/// Parses `.mecha` text into a recipe whose root is the last instruction.
pub fn parse(text: &str) -> Result<Recipe> {
    let mut lines = text.split('\n').enumerate().map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)));
    let is_blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
    let header = format!("version {FORMAT_VERSION}");
    match lines.by_ref().find(|(_, l)| !is_blank(l)) {
        Some((_, l)) if l.trim() == header => {}
        Some((n, l)) if l.trim_start().starts_with("version") => {
            return Err(error(n, 1, format!("unsupported format `{}`; this reader supports `{header}`", l.trim())))
        }
        Some((n, _)) => return Err(error(n, 1, format!("expected `{header}` first"))),
        None => return Err(error(1, 1, format!("the text is empty; a recipe starts with `{header}`"))),
    }
    let mut parser = Parser { builder: RecipeBuilder::new(), results: vec![] };
    for (n, l) in lines {
        if is_blank(l) {
            continue;
        }
        let column = l.len() - l.trim_start().len() + 1;
        let body = l.trim();
        let (command, rest) = body.split_once([' ', '\t']).unwrap_or((body, ""));
        let offset = column + command.len();
        let mut tokens = tokenize(rest, n)?;
        for t in &mut tokens {
            t.column += offset;
        }
        let item = parser.instruction(command, &tokens, n, column)?;
        if let Item::Node(id) = item {
            parser.builder.set_source_index(id, parser.results.len());
        }
        parser.results.push(item);
    }
    match parser.results.last() {
        Some(Item::Node(root)) => parser.builder.finish(*root),
        Some(Item::Dict(_)) => Err(MechaError::new(
            ErrorKind::Parse,
            "the last instruction is a dict; a recipe ends with a model, literal or merge",
        )),
        None => Err(MechaError::new(ErrorKind::Parse, "the recipe has no instructions after the version line")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::NodeKind;

    const WS: &str = "version 0.1.0\n\
        model \"/tmp/exp/a.safetensors\" model_config=\"tiny-test\" merge_space=\"weight\"\n\
        model \"/tmp/exp/b.safetensors\" model_config=\"tiny-test\" merge_space=\"weight\"\n\
        dict key=0.3\n\
        literal &2 model_config=\"singleton-mecha\" merge_space=\"param\"\n\
        merge \"convert_singleton\" &3\n\
        merge \"weighted_sum\" &0 &1 &4";

    #[test]
    fn reads_what_sd_mecha_writes() {
        let r = parse(WS).unwrap();
        let NodeKind::Merge { method, inputs } = &r.node(r.root).kind else { panic!() };
        assert_eq!(method.id, "weighted_sum");
        assert_eq!(inputs.len(), 3);
        let NodeKind::Model { path, .. } = &r.node(inputs[0][0]).kind else { panic!() };
        assert_eq!(path, "/tmp/exp/a.safetensors");
        assert_eq!(r.node(inputs[0][0]).config.as_deref(), Some("tiny-test"));
    }

    #[test]
    fn tolerates_blank_lines_comments_trailing_newline_and_special_floats() {
        let text = format!("\n# a comment\n{}\n\n", WS.replace("dict key=0.3", "  # blend\ndict key=inf\n"));
        let r = parse(&text).unwrap();
        assert_eq!(r.nodes.len(), 5);
        let lit = r
            .nodes
            .iter()
            .find_map(|n| match &n.kind {
                NodeKind::Literal { entries } => Some(entries.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(lit["key"], Value::Scalar(Scalar::Float(f64::INFINITY)));
        let nan = parse(&WS.replace("key=0.3", "key=nan")).unwrap();
        assert!(
            matches!(&nan.nodes[2].kind, NodeKind::Literal { entries } if matches!(entries["key"], Value::Scalar(Scalar::Float(f)) if f.is_nan()))
        );
    }

    #[test]
    fn equals_signs_and_escapes_inside_strings() {
        let r = parse("version 0.1.0\nmodel \"a=b \\\"c\\\".safetensors\" model_config=null merge_space=\"weight\"")
            .unwrap();
        let NodeKind::Model { path, .. } = &r.node(r.root).kind else { panic!() };
        assert_eq!(path, "a=b \"c\".safetensors");
    }

    #[test]
    fn errors_name_line_and_column() {
        let cases = [
            ("version 0.2.0\nmodel \"a\"", 1, "unsupported format"),
            ("model \"a\"", 1, "expected `version 0.1.0`"),
            ("version 0.1.0\nmodel \"a\"\nmerge \"weighted_sum\" &0 &5", 3, "reference &5"),
            ("version 0.1.0\nmodel \"a\"\nmerge \"weighted_sum\" &0 &1", 3, "reference &1"),
            ("version 0.1.0\nmodel \"a\"\nmerge \"nope\" &0", 3, "unknown merge method \"nope\""),
            ("version 0.1.0\nmodel \"a\"\nmerge \"subtract\" &0", 3, "missing required argument \"b\""),
            ("version 0.1.0\nmodel \"a", 2, "unterminated string"),
            ("version 0.1.0\nfrobnicate &0", 2, "unknown command"),
            ("version 0.1.0\ndict k=12abc", 2, "is not a number"),
            ("version 0.1.0\nmodel \"a\"\nliteral &0", 3, "is a recipe node"),
        ];
        for (text, line, needle) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, Some(line as u32), "{text}: {}", err.message);
            assert!(err.message.contains(needle), "{text}: {}", err.message);
            assert!(err.message.starts_with(&format!("line {line}")), "{}", err.message);
        }
        let err = parse("version 0.1.0\nmodel \"a\"\nmerge \"weighted_sum\" &0 &9").unwrap_err();
        assert_eq!(err.column, Some(25));
    }
}
