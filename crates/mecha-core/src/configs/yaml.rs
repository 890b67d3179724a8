// YAML model config -> compact text. build.rs `include!`s this file to convert the builtin
// configs, and `from_yaml` uses it at run time, so builtin and user configs follow one set of
// rules. Being included is why it has no inner doc comment and no `crate::` paths.
//
// The compact text holds one record per line, fields separated by tabs:
//   C <id> <declared identifier>
//   P <component name>
//   K <key> <dtype, empty if unknown> <shape> <1 if optional, else 0> [<alias> ...]
// A shape is its dimensions joined by commas: empty for a scalar, `?` when unknown.
// Names cannot contain tabs or line breaks, so the text needs no escaping.

use yaml_rust2::Yaml;

/// Appends the config in `docs` (a loaded YAML file) to `out` as compact text. The config is
/// registered as `id` when given (sd-mecha uses the file stem), else as its `identifier` field.
/// Errors say what is wrong and where. Identifiers and name clashes are left to
/// `ModelConfig::new`, which runs when the text is read back.
pub fn write_compact(docs: &[Yaml], id: Option<&str>, out: &mut String) -> Result<(), String> {
    let [doc] = docs else {
        return Err(format!("expected one YAML document, found {}", docs.len()));
    };
    let fields = doc.as_hash().ok_or("expected a mapping with `identifier` and `components`")?;
    let (mut declared, mut components) = (None, None);
    for (field, value) in fields {
        match field.as_str() {
            Some("identifier") => declared = Some(name(value, "`identifier`")?),
            Some("components") => components = Some(value),
            _ => {
                return Err(format!(
                    "unknown top-level field {} (expected `identifier` and `components`)",
                    describe(field)
                ))
            }
        }
    }
    let declared = declared.or(id).ok_or("missing `identifier`")?;
    let id = name_str(id.unwrap_or(declared), "the identifier")?;
    let components = components
        .and_then(Yaml::as_hash)
        .ok_or("`components` must be a mapping from component names to their keys")?;

    push_line(out, &["C", id, declared]);
    for (component, keys) in components {
        let component = name(component, "a component name")?;
        let keys = keys
            .as_hash()
            .ok_or_else(|| format!("component \"{component}\" must be a mapping from keys to their metadata"))?;
        push_line(out, &["P", component]);
        for (key, meta) in keys {
            let key = name(key, &format!("a key of component \"{component}\""))?;
            write_key(key, meta, out).map_err(|e| format!("component \"{component}\", key \"{key}\": {e}"))?;
        }
    }
    Ok(())
}

fn write_key(key: &str, meta: &Yaml, out: &mut String) -> Result<(), String> {
    let meta = meta.as_hash().ok_or("expected a mapping such as {shape: [320], dtype: float16}")?;
    let (mut dtype, mut shape, mut optional) = ("", "?".to_string(), "0");
    let mut aliases = Vec::new();
    let wrong =
        |field: &str, expected: &str, value: &Yaml| format!("`{field}` must be {expected}, not {}", describe(value));
    for (field, value) in meta {
        match (field.as_str(), value) {
            // sd-mecha reads null as "unknown", like an absent field.
            (Some("shape" | "dtype"), Yaml::Null) => {}
            (Some("dtype"), value) => dtype = name(value, "`dtype`")?,
            (Some("shape"), Yaml::Array(dims)) => {
                let dims = dims.iter().map(|d| match d {
                    Yaml::Integer(n) if *n >= 0 => Ok(n.to_string()),
                    _ => Err(format!("shape dimension {} is not a non-negative integer", describe(d))),
                });
                shape = dims.collect::<Result<Vec<_>, _>>()?.join(",");
            }
            (Some("aliases"), Yaml::Array(names)) => {
                for alias in names {
                    aliases.push(name(alias, "an alias")?);
                }
            }
            (Some("optional"), Yaml::Boolean(b)) => optional = if *b { "1" } else { "0" },
            (Some("shape"), value) => return Err(wrong("shape", "a list of integers", value)),
            (Some("aliases"), value) => return Err(wrong("aliases", "a list of names", value)),
            (Some("optional"), value) => return Err(wrong("optional", "true or false", value)),
            _ => return Err(format!("unknown field {} (expected shape, dtype, aliases, optional)", describe(field))),
        }
    }
    let mut line = vec!["K", key, dtype, &shape, optional];
    line.extend(aliases);
    push_line(out, &line);
    Ok(())
}

/// A YAML string usable as a compact-text field.
fn name<'a>(value: &'a Yaml, what: &str) -> Result<&'a str, String> {
    let s = value.as_str();
    name_str(s.ok_or_else(|| format!("{what} must be a string, not {}", describe(value)))?, what)
}

fn name_str<'a>(s: &'a str, what: &str) -> Result<&'a str, String> {
    if s.is_empty() || s.contains(['\t', '\n', '\r']) {
        return Err(format!("{what} {s:?} must be non-empty and hold no tab or line break"));
    }
    Ok(s)
}

/// A YAML value as the user wrote it, for error messages.
fn describe(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => format!("{s:?}"),
        Yaml::Real(s) => s.clone(),
        Yaml::Integer(n) => n.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        Yaml::Null => "null".into(),
        Yaml::Array(_) => "a list".into(),
        Yaml::Hash(_) => "a mapping".into(),
        Yaml::Alias(_) | Yaml::BadValue => "an invalid value".into(),
    }
}

fn push_line(out: &mut String, fields: &[&str]) {
    out.push_str(&fields.join("\t"));
    out.push('\n');
}
