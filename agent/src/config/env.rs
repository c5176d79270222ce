//! The environment's two ways into the config: `${VAR}` in the file, and `NODELENS_A__B=value`
//! overrides (`__` between levels), which is how a DaemonSet passes `NODE_NAME` and secrets.

use serde_yaml_ng::{Mapping, Value};

use super::ConfigError;

const PREFIX: &str = "NODELENS_";

/// Variables that start with the prefix but are not config keys.
const RESERVED: &[&str] = &["NODELENS_CONFIG"];
/// The shape of a key in a free-form map: a string.
static FREE_KEY: Value = Value::String(String::new());

/// Replaces `${VAR}` and `${VAR:-default}` with the variable's value (empty when unset and no
/// default is given, as `envsubst` does); `$$` is a literal `$`.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let (Some(body), Some(end)) = (after.strip_prefix('{'), after.find('}')) {
            let body = &body[..end - 1];
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            let value = lookup(name).filter(|v| !v.is_empty() || default.is_none());
            out.push_str(&value.unwrap_or_else(|| default.unwrap_or_default().to_string()));
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Applies every `NODELENS_*` variable to `tree`. `defaults` (the serialized default config)
/// tells which paths exist and their shape: a list key takes a comma-separated value, a string
/// key takes the value verbatim, any other key takes a YAML scalar (`true`, `5s`, `1024`).
pub fn apply_overrides(tree: &mut Value, defaults: &Value, vars: &[(String, String)]) -> Result<(), ConfigError> {
    let mut overrides: Vec<&(String, String)> =
        vars.iter().filter(|(k, _)| k.starts_with(PREFIX) && !RESERVED.contains(&k.as_str())).collect();
    overrides.sort();
    for (var, raw) in overrides {
        let mut path: Vec<String> = var[PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
        let env_error = |message: String| ConfigError::Env { var: var.clone(), message };
        let dotted = path.join(".");
        let mut shape = defaults;
        for depth in 0..path.len() {
            shape = match shape.as_mapping() {
                // A map without keys of its own (`headers`) takes any key, as a string. Header
                // names are case-insensitive, and `_` stands for `-` (proxies drop headers
                // with underscores): `..._HEADERS__X_API_KEY` is `x-api-key`.
                Some(map) if map.is_empty() && depth + 1 == path.len() => {
                    path[depth] = path[depth].replace('_', "-");
                    &FREE_KEY
                }
                map => map.and_then(|m| m.get(path[depth].as_str())).ok_or_else(|| env_error(format!("`{dotted}` is not a config key")))?,
            };
        }
        let value = match shape {
            Value::Mapping(_) => return Err(env_error(format!("`{dotted}` is a section; set one of its keys"))),
            Value::Sequence(_) if !raw.trim_start().starts_with('[') => {
                Value::Sequence(raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| Value::String(s.into())).collect())
            }
            Value::String(_) => Value::String(raw.clone()),
            _ => serde_yaml_ng::from_str(raw).map_err(|e| env_error(format!("value for `{dotted}` is not YAML: {e}")))?,
        };
        set(tree, &path, value).map_err(|at| env_error(format!("`{at}` in the config file is not a section")))?;
    }
    Ok(())
}

/// Sets `path` in `tree`, creating sections on the way; on failure returns the key that is not a map.
fn set(tree: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut node = tree;
    for (depth, key) in parents.iter().enumerate() {
        let map = node.as_mapping_mut().ok_or_else(|| path[..depth].join("."))?;
        node = map.entry(Value::String(key.clone())).or_insert_with(|| Value::Mapping(Mapping::new()));
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
    }
    let map = node.as_mapping_mut().ok_or_else(|| parents.join("."))?;
    map.insert(Value::String(last.clone()), value);
    Ok(())
}
