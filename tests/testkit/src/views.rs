//! The bundled views as data, for the tests that check them: rules from `rules/`, dashboards
//! from `dashboards/grafana/`, the queries they run, and the metric names those queries read.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

/// Where the runbooks are published: every alert's `runbook_url` is this base, `#`, and the
/// alert's section in docs/runbooks.md. An installation replaces the base, this exact string,
/// in the rendered rules (the Helm chart's value, a kustomize patch, `sed`).
pub const RUNBOOK_BASE_URL: &str = "https://github.com/nodelens/nodelens/blob/main/docs/runbooks.md";

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Files in `dir` (relative to the root) whose names end in `suffix`, sorted.
pub fn files(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

/// Every rule, recording and alerting, of every `rules/*.rules.yaml`.
pub fn rules() -> Vec<Yaml> {
    files("rules", ".rules.yaml")
        .iter()
        .flat_map(|f| {
            let doc: Yaml = serde_yaml_ng::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            doc["groups"].as_sequence().unwrap().iter().flat_map(|g| g["rules"].as_sequence().unwrap().clone()).collect::<Vec<_>>()
        })
        .collect()
}

/// Names of the recording rules.
pub fn recorded_names() -> BTreeSet<String> {
    rules().iter().filter_map(|r| r.get("record")?.as_str().map(String::from)).collect()
}

/// Every dashboard with its file.
pub fn dashboards() -> Vec<(PathBuf, Json)> {
    files("dashboards/grafana", ".json")
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let dashboard = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (f, dashboard)
        })
        .collect()
}

/// Every panel, rows' nested panels included.
pub fn panels(dashboard: &Json) -> Vec<Json> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        out.extend(p["panels"].as_array().cloned().unwrap_or_default());
        out.push(p.clone());
    }
    out
}

/// One PromQL query of a dashboard.
#[derive(Debug, Clone)]
pub struct Query {
    /// Dashboard, panel and query, for messages.
    pub what: String,
    /// The query as written, with Grafana variables.
    pub expr: String,
    /// An instant query (a table or stat of the latest values) rather than a range.
    pub instant: bool,
}

/// Every panel query, every annotation query, and every query variable's selector
/// (`label_values(selector, label)`).
pub fn queries(file: &Path, dashboard: &Json) -> Vec<Query> {
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                what: format!("{name} / {} / {}", p["title"].as_str().unwrap_or(""), t["refId"].as_str().unwrap_or("")),
                expr: t["expr"].as_str().unwrap().to_string(),
                instant: t["instant"].as_bool().unwrap_or(false),
            });
        }
    }
    // Grafana's current annotation format: the query in `target` (a top-level `expr` is the old
    // one, which bundled_views refuses).
    for a in dashboard["annotations"]["list"].as_array().into_iter().flatten().filter(|a| a["target"]["expr"].is_string()) {
        out.push(Query {
            what: format!("{name} / annotation {}", a["name"].as_str().unwrap_or("")),
            expr: a["target"]["expr"].as_str().unwrap().to_string(),
            instant: false,
        });
    }
    for v in dashboard["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
        let query = v["query"]["query"].as_str().unwrap();
        let selector = query.strip_prefix("label_values(").and_then(|q| q.rsplit_once(',')).map(|(sel, _)| sel.to_string());
        out.push(Query {
            what: format!("{name} / variable {}", v["name"].as_str().unwrap()),
            expr: selector.unwrap_or_else(|| query.to_string()),
            instant: true,
        });
    }
    out
}

/// `expr` with Grafana's variables replaced: `$__rate_interval` and friends by `rate_interval`
/// and fixed spans, `$var`/`${var}` by the value `vars` gives (or `.*`).
pub fn substitute(expr: &str, rate_interval: &str, vars: &[(&str, &str)]) -> String {
    substitute_over(expr, "1h", rate_interval, vars)
}

/// Seconds in a Prometheus duration such as `1h30m` or `24h`.
pub fn duration_seconds(text: &str) -> u64 {
    let (mut total, mut number) = (0, 0);
    for c in text.chars() {
        match c {
            '0'..='9' => number = number * 10 + u64::from(c.to_digit(10).unwrap()),
            unit => {
                let scale = match unit {
                    's' => 1,
                    'm' => 60,
                    'h' => 3600,
                    'd' => 86400,
                    'w' => 7 * 86400,
                    _ => panic!("{text}: unknown duration unit {unit}"),
                };
                total += number * scale;
                number = 0;
            }
        }
    }
    total
}

/// [`substitute`] with the dashboard's time range `range` (`$__range`, `$__range_s`).
pub fn substitute_over(expr: &str, range: &str, rate_interval: &str, vars: &[(&str, &str)]) -> String {
    let mut expr = expr
        .replace("$__rate_interval", rate_interval)
        .replace("$__interval", "1m")
        .replace("$__range_s", &duration_seconds(range).to_string())
        .replace("$__range", range);
    let mut names: Vec<&str> = ["node", "node_pods", "namespace", "app", "user", "name", "pod", "cluster", "gpu", "uuid", "model"].into();
    names.extend(vars.iter().map(|(n, _)| *n));
    // Longest first, so `$app` does not eat the start of `$application`.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        let value = vars.iter().find(|(n, _)| *n == name).map_or(".*", |(_, v)| v);
        expr = expr.replace(&format!("${{{name}}}"), value).replace(&format!("${name}"), value);
    }
    expr
}

/// A query of a dashboard by `uid / panel title / refId`, as the known-answer scenarios in
/// dashboards/tests/ name them.
pub fn query_by_reference(reference: &str) -> Option<String> {
    let mut parts = reference.splitn(3, " / ");
    let (uid, title, ref_id) = (parts.next()?, parts.next()?, parts.next()?);
    let (_, dashboard) = dashboards().into_iter().find(|(_, d)| d["uid"] == uid)?;
    let panel = panels(&dashboard).into_iter().find(|p| p["title"] == title)?;
    let target = panel["targets"].as_array()?.iter().find(|t| t["refId"] == ref_id)?.clone();
    target["expr"].as_str().map(String::from)
}

/// PromQL words followed by a list of label names.
const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// Other PromQL words that are not metric names: keywords, and aggregations (which may be
/// followed by `by (...)` rather than by their parenthesis).
const KEYWORDS: &[&str] = &[
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// The metric names (and recording rule names) a PromQL expression reads. Strings, label
/// matchers, grouping lists and ranges are skipped; a word followed by `(` is a function.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut after_grouping_keyword = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    i += 1;
                }
                i += 1;
            }
            '(' if after_grouping_keyword => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                after_grouping_keyword = false;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let is_call = chars.get(next) == Some(&'(');
                after_grouping_keyword = GROUPING.contains(&word.as_str());
                if !is_call && !after_grouping_keyword && !KEYWORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations (1e3, 0x10, 5m, 1h30m).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            '$' => {
                // A Grafana variable: `$name` or `${name:format}`.
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_{}:".contains(chars[i])) {
                    i += 1;
                }
            }
            c if c.is_whitespace() => i += 1,
            _ => {
                after_grouping_keyword = false;
                i += 1;
            }
        }
    }
    names
}

/// The metrics the views read from other exporters, from `dashboards/external-metrics.md`:
/// every name written as a list item in backticks.
pub fn external_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("dashboards/external-metrics.md")).unwrap();
    text.lines().filter_map(|l| l.strip_prefix("- `")?.split('`').next().map(String::from)).collect()
}

/// Metric names in a text exposition: series names, and for each `# TYPE` line the names its
/// series take (`_total` for counters; `_bucket`, `_sum`, `_count` for histograms), so a
/// family with no series yet still counts as exported.
pub fn exposition_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
            match kind {
                "counter" => names.insert(format!("{}_total", name.trim_end_matches("_total"))),
                "histogram" => ["_bucket", "_sum", "_count"].iter().all(|s| names.insert(format!("{name}{s}"))),
                _ => names.insert(name.to_string()),
            };
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_skip_functions_labels_groupings_and_ranges() {
        let expr = r#"sum by (cluster, node) (rate(nodelens_log_records_total{level=~"error|fatal", app="x"}[5m]))
            * on (namespace, pod) group_left (app, user) topk by (pod) (1, nodelens_pod_info) > bool 0.5
            or vector(0) unless up offset 10m and node:nodelens_gpus_up:sum / 1e3 * $__range_s"#;
        let got: Vec<String> = metric_names(expr).into_iter().collect();
        assert_eq!(got, ["node:nodelens_gpus_up:sum", "nodelens_log_records_total", "nodelens_pod_info", "up"]);
    }

    #[test]
    fn exposition_names_include_empty_families_by_their_series_names() {
        let text = "# TYPE nodelens_a counter\n# TYPE nodelens_b histogram\n# TYPE nodelens_c gauge\nnodelens_d{x=\"1\"} 2\n";
        let got: Vec<String> = exposition_names(text).into_iter().collect();
        assert_eq!(got, ["nodelens_a_total", "nodelens_b_bucket", "nodelens_b_count", "nodelens_b_sum", "nodelens_c", "nodelens_d"]);
    }

    #[test]
    fn substitution_uses_given_values_and_matches_all_otherwise() {
        let got = substitute(r#"rate(x{node=~"$node", app="${app}", user=~"$user"}[$__rate_interval])"#, "30s", &[("app", "resnet")]);
        assert_eq!(got, r#"rate(x{node=~".*", app="resnet", user=~".*"}[30s])"#);
        let got = substitute_over("sum_over_time(x[$__range:1m]) * $__range_s", "24h", "5m", &[]);
        assert_eq!(got, "sum_over_time(x[24h:1m]) * 86400");
        assert_eq!(duration_seconds("1h30m"), 5400);
    }
}
