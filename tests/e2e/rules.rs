//! Lints the bundled Prometheus rules: every alert has a severity, a summary, a description
//! and a runbook link that resolves in docs/runbooks.md; every alert has a promtool test in
//! which it fires and one in which it must stay silent; and every nodelens metric a rule uses
//! is one the agent exports. (promtool itself runs the tests: tests/run-all.sh.)

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

fn alerts() -> Vec<Value> {
    yaml_files(&root().join("rules"))
        .iter()
        .flat_map(|f| {
            let doc: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            doc["groups"].as_sequence().unwrap().iter().flat_map(|g| g["rules"].as_sequence().unwrap().clone()).collect::<Vec<_>>()
        })
        .filter(|r| r.get("alert").is_some())
        .collect()
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

#[test]
fn rules_use_only_metrics_the_agent_exports() {
    let exported: HashSet<String> = nodelens::metrics::Metrics::new("lint").names().iter().cloned().collect();
    assert!(exported.contains("nodelens_log_records_total") && exported.contains("nodelens_pod_info"));
    // GPU metrics come with the GPU collector; until it lands, rules may name them.
    let later = ["nodelens_gpu_allocated"];
    for alert in alerts() {
        let expr = alert["expr"].as_str().unwrap();
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("nodelens_")) {
            assert!(
                exported.contains(word) || later.contains(&word),
                "{} uses {word}, which the agent does not export",
                alert["alert"].as_str().unwrap()
            );
        }
    }
}
