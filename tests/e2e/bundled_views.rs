//! Lints the bundled views. Rules: every alert has a severity, a summary, a description and a
//! runbook link that resolves in docs/runbooks.md; every alert has a promtool test in which it
//! fires and one in which it must stay silent. Dashboards: Grafana 10+ JSON with a stable uid,
//! the data source as first variable, and every query valid PromQL (checked by promtool with
//! the variables substituted). Both use only metrics the agent exports.
//! (promtool runs the rule tests themselves: tests/run-all.sh.)

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")).collect();
    files.sort();
    files
}

/// Every rule, recording and alerting, of every file in `rules/`.
fn rules() -> Vec<Value> {
    yaml_files(&root().join("rules"))
        .iter()
        .flat_map(|f| {
            let doc: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            doc["groups"].as_sequence().unwrap().iter().flat_map(|g| g["rules"].as_sequence().unwrap().clone()).collect::<Vec<_>>()
        })
        .collect()
}

fn alerts() -> Vec<Value> {
    rules().into_iter().filter(|r| r.get("alert").is_some()).collect()
}

#[test]
fn every_alert_is_documented_and_linked_to_its_runbook() {
    let runbooks = std::fs::read_to_string(root().join("docs/runbooks.md")).unwrap();
    let anchors: HashSet<String> = runbooks.lines().filter_map(|l| l.strip_prefix("## ")).map(|h| h.trim().to_lowercase()).collect();
    let alerts = alerts();
    assert!(alerts.len() >= 5);
    for alert in &alerts {
        let name = alert["alert"].as_str().unwrap();
        assert!(["info", "warning", "critical"].contains(&alert["labels"]["severity"].as_str().unwrap_or("")), "{name}: severity");
        for key in ["summary", "description"] {
            assert!(!alert["annotations"][key].as_str().unwrap_or("").is_empty(), "{name}: {key}");
        }
        assert!(alert["annotations"]["description"].as_str().unwrap().contains("$labels.node"), "{name}: description names the node");
        let url = alert["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = url.strip_prefix("docs/runbooks.md#").unwrap_or_else(|| panic!("{name}: runbook_url {url}"));
        assert!(anchors.contains(anchor), "{name}: no runbook section for #{anchor}");
    }
}

#[test]
fn every_alert_has_a_test_where_it_fires_and_one_where_it_stays_silent() {
    let (mut fires, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for file in yaml_files(&root().join("rules/tests")) {
        let doc: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        for test in doc["tests"].as_sequence().unwrap() {
            for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
                let name = case["alertname"].as_str().unwrap().to_string();
                match case["exp_alerts"].as_sequence() {
                    Some(list) if !list.is_empty() => fires.insert(name),
                    _ => silent.insert(name),
                };
            }
        }
    }
    for alert in alerts() {
        let name = alert["alert"].as_str().unwrap();
        assert!(fires.contains(name), "{name} never fires in a test");
        assert!(silent.contains(name), "{name} has no test where it must stay silent");
    }
}

/// Fails naming `what` when `expr` uses a nodelens metric the agent does not export.
fn assert_exported(what: &str, expr: &str) {
    let exported: HashSet<String> = nodelens::metrics::Metrics::new("lint").names().iter().cloned().collect();
    assert!(exported.contains("nodelens_log_records_total") && exported.contains("nodelens_gpu_allocated"));
    // Recording rules (`level:metric:operations`) are checked where they are defined.
    let words = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
    for word in words.filter(|w| w.starts_with("nodelens_")) {
        assert!(exported.contains(word), "{what} uses {word}, which the agent does not export");
    }
}

#[test]
fn rules_use_only_metrics_the_agent_exports() {
    for rule in rules() {
        let name = rule.get("alert").or_else(|| rule.get("record")).and_then(Value::as_str).unwrap();
        assert_exported(name, rule["expr"].as_str().unwrap());
    }
}

#[test]
fn recording_rules_are_named_level_metric_operations() {
    let records: Vec<String> = rules().iter().filter_map(|r| r.get("record")?.as_str().map(String::from)).collect();
    assert!(records.iter().any(|r| r == "user:nodelens_gpu_allocated:sum"), "{records:?}");
    for record in records {
        let parts: Vec<&str> = record.split(':').collect();
        assert!(parts.len() == 3 && parts.iter().all(|p| !p.is_empty()) && parts[1].starts_with("nodelens_"), "{record}");
    }
}

fn dashboards() -> Vec<(PathBuf, serde_json::Value)> {
    let dir = root().join("dashboards/grafana");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let dashboard = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (f, dashboard)
        })
        .collect()
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        out.extend(p["panels"].as_array().cloned().unwrap_or_default());
        out.push(p.clone());
    }
    out
}

/// A query with Grafana's variables replaced by values Prometheus accepts.
fn substituted(expr: &str) -> String {
    let mut expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h");
    for var in ["node", "namespace", "app", "user", "name", "pod", "cluster", "gpu"] {
        expr = expr.replace(&format!("${{{var}}}"), ".*").replace(&format!("${var}"), ".*");
    }
    expr
}

#[test]
fn dashboards_follow_the_conventions() {
    let mut uids = HashSet::new();
    let all = dashboards();
    assert!(!all.is_empty());
    for (file, d) in &all {
        let name = file.display();
        let uid = d["uid"].as_str().unwrap_or("");
        assert!(!uid.is_empty() && uid.len() <= 40 && uids.insert(uid.to_string()), "{name}: stable, unique uid");
        assert!(d.get("__inputs").is_none(), "{name}: no __inputs");
        assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "{name}: Grafana 10+ schema");
        let first = &d["templating"]["list"][0];
        let described = (first["name"].as_str(), first["type"].as_str(), first["label"].as_str());
        assert_eq!(described, (Some("datasource"), Some("datasource"), Some("Data source")), "{name}: first variable");
        let mut ids = HashSet::new();
        for p in panels(d) {
            assert!(ids.insert(p["id"].as_u64().unwrap()), "{name}: panel ids are unique");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{name}: panel {} uses the data source variable", p["title"]);
            assert!(!p["targets"].as_array().unwrap().is_empty(), "{name}: panel {} has a query", p["title"]);
        }
    }
}

#[test]
fn every_dashboard_query_is_valid_promql_over_exported_metrics() {
    let mut exprs = Vec::new();
    for (file, d) in dashboards() {
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                exprs.push((format!("{} / {}", file.display(), p["title"]), t["expr"].as_str().unwrap().to_string()));
            }
        }
        for v in d["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
            let query = v["query"]["query"].as_str().unwrap();
            let selector = query.strip_prefix("label_values(").and_then(|q| q.rsplit_once(',')).map(|(sel, _)| sel.to_string());
            exprs.push((format!("{} / variable {}", file.display(), v["name"]), selector.unwrap_or_else(|| query.to_string())));
        }
    }
    let mut rules = String::from("groups:\n  - name: dashboard-queries\n    rules:\n");
    for (i, (what, expr)) in exprs.iter().enumerate() {
        assert_exported(what, expr);
        rules.push_str(&format!("      - record: lint:query_{i}\n        expr: {}\n", serde_json::to_string(&substituted(expr)).unwrap()));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("queries.yaml");
    std::fs::write(&file, rules).unwrap();
    let out = std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .expect("promtool is installed (tests/run-all.sh installs Debian's prometheus package)");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool rejects a dashboard query:\n{report}");
}
