//! Lints the bundled views. Rules: every alert has a severity, a summary, a description naming
//! what it is about and a runbook link that resolves in docs/runbooks.md; every alert has a
//! promtool test in which it fires and one in which it must stay silent. Dashboards: Grafana 10+
//! JSON with a stable uid, the data source as first variable, and every query valid PromQL
//! (checked by promtool with the variables substituted). Both read only metrics the agent
//! exports, recording rules of rules/, or the external metrics listed in
//! dashboards/external-metrics.md. (promtool runs the rule tests themselves: tests/run-all.sh;
//! tests/e2e/prometheus.rs checks the names against a live agent and runs every query.)

use std::collections::{BTreeSet, HashSet};

use nodelens_testkit::views::{self, dashboards, external_metrics, metric_names, panels, queries, recorded_names, root, rules};
use serde_yaml_ng::Value;

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
        let description = alert["annotations"]["description"].as_str().unwrap();
        assert!(
            ["$labels.node", "$labels.app"].iter().any(|l| description.contains(l)),
            "{name}: the description names the node or the app it is about"
        );
        let url = alert["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = url.strip_prefix("docs/runbooks.md#").unwrap_or_else(|| panic!("{name}: runbook_url {url}"));
        assert!(anchors.contains(anchor), "{name}: no runbook section for #{anchor}");
    }
}

#[test]
fn every_alert_has_a_test_where_it_fires_and_one_where_it_stays_silent() {
    let (mut fires, mut silent) = (BTreeSet::new(), BTreeSet::new());
    for file in views::files("rules/tests", ".test.yaml") {
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

/// The metric names the views may read: exported by the agent, recorded by a rule, or on the
/// documented list of external metrics.
struct Known {
    exported: HashSet<String>,
    recorded: BTreeSet<String>,
    external: BTreeSet<String>,
}

impl Known {
    fn load() -> Known {
        let exported: HashSet<String> = nodelens::metrics::Metrics::new("lint").names().iter().cloned().collect();
        assert!(exported.contains("nodelens_log_records_total") && exported.contains("nodelens_gpu_allocated"));
        let external = external_metrics();
        assert!(external.contains("container_cpu_usage_seconds_total") && external.contains("up"), "{external:?}");
        Known { exported, recorded: recorded_names(), external }
    }

    /// Fails naming `what` when `expr` reads a metric that is not known.
    fn assert_reads_only_known(&self, what: &str, expr: &str) {
        for name in metric_names(expr) {
            let known = if name.starts_with("nodelens_") {
                self.exported.contains(&name)
            } else if name.contains(':') {
                self.recorded.contains(&name)
            } else {
                self.external.contains(&name)
            };
            assert!(known, "{what} reads {name}: not exported by the agent, recorded by a rule, or in dashboards/external-metrics.md");
        }
    }
}

#[test]
fn rules_read_only_known_metrics() {
    let known = Known::load();
    for rule in rules() {
        let name = rule.get("alert").or_else(|| rule.get("record")).and_then(Value::as_str).unwrap();
        known.assert_reads_only_known(name, rule["expr"].as_str().unwrap());
    }
}

#[test]
fn recording_rules_are_named_level_metric_operations() {
    let records = recorded_names();
    assert!(records.contains("user:nodelens_gpu_allocated:sum"), "{records:?}");
    let external = external_metrics();
    for record in records {
        let parts: Vec<&str> = record.split(':').collect();
        assert!(parts.len() == 3 && parts.iter().all(|p| !p.is_empty()), "{record}: level:metric:operations");
        let metric = parts[1];
        let source = [metric.to_string(), format!("{metric}_total")];
        assert!(
            metric.starts_with("nodelens_") || source.iter().any(|m| external.contains(m)),
            "{record}: the middle part names the metric it is computed from"
        );
    }
}

#[test]
fn dashboards_follow_the_conventions() {
    let mut uids = HashSet::new();
    let all = dashboards();
    assert!(all.len() >= 7, "the six views and the operator checks");
    for (file, d) in &all {
        let name = file.display();
        let uid = d["uid"].as_str().unwrap_or("");
        assert!(uid.starts_with("nodelens-") && uid.len() <= 40 && uids.insert(uid.to_string()), "{name}: stable, unique uid");
        assert!(d.get("__inputs").is_none(), "{name}: no __inputs");
        assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "{name}: Grafana 10+ schema");
        let variables = d["templating"]["list"].as_array().unwrap();
        let first = &variables[0];
        let described = (first["name"].as_str(), first["type"].as_str(), first["label"].as_str());
        assert_eq!(described, (Some("datasource"), Some("datasource"), Some("Data source")), "{name}: first variable");
        assert_eq!(variables[1]["name"], "cluster", "{name}: the cluster variable follows the data source");
        let mut ids = HashSet::new();
        for p in panels(d) {
            assert!(ids.insert(p["id"].as_u64().unwrap()), "{name}: panel ids are unique");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{name}: panel {} uses the data source variable", p["title"]);
            assert!(!p["targets"].as_array().unwrap().is_empty(), "{name}: panel {} has a query", p["title"]);
            assert!(!p["description"].as_str().unwrap_or("").is_empty(), "{name}: panel {} says what it shows", p["title"]);
        }
        let to_all = d["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["type"] == "dashboards" && l["tags"][0] == "nodelens" && l["includeVars"] == true);
        assert!(to_all, "{name}: links to the other nodelens dashboards, carrying the variables");
    }
}

/// `$name` and `${name...}` references in a text, Grafana's own (`__...`) left out.
fn variable_references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices('$') {
        let rest = text[i + 1..].trim_start_matches('{');
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && !name.starts_with("__") && !name.chars().all(|c| c.is_ascii_digit()) {
            out.insert(name);
        }
    }
    out
}

#[test]
fn dashboards_define_every_variable_they_use_and_link_only_to_bundled_dashboards() {
    let all = dashboards();
    let uids: HashSet<String> = all.iter().map(|(_, d)| d["uid"].as_str().unwrap().to_string()).collect();
    for (file, d) in &all {
        let name = file.display();
        let defined: BTreeSet<String> =
            d["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
        let mut text = serde_json::to_string(&d["panels"]).unwrap();
        text.push_str(&serde_json::to_string(&d["links"]).unwrap());
        text.push_str(&serde_json::to_string(&d["templating"]).unwrap());
        let used = variable_references(&text);
        let undefined: Vec<&String> = used.difference(&defined).collect();
        assert!(undefined.is_empty(), "{name}: uses undefined variables {undefined:?}");
        for (i, _) in text.match_indices("/d/") {
            let target: String = text[i + 3..].chars().take_while(|c| *c != '/' && *c != '?').collect();
            assert!(uids.contains(&target), "{name}: links to /d/{target}, which is not a bundled dashboard");
            let url: String = text[i..].chars().take_while(|c| *c != '"').collect();
            for carried in ["var-datasource=${datasource}", "var-cluster=${cluster}", "${__url_time_range}"] {
                assert!(url.contains(carried), "{name}: drill-down {url} carries {carried}");
            }
        }
    }
    for uid in ["nodelens-cluster", "nodelens-machine", "nodelens-application", "nodelens-user", "nodelens-gpu-fleet", "nodelens-agent"] {
        assert!(uids.contains(uid), "{uid} is bundled");
        let linked = all.iter().any(|(_, d)| d["uid"] != uid && serde_json::to_string(d).unwrap().contains(&format!("/d/{uid}/")));
        assert!(linked || uid == "nodelens-cluster" || uid == "nodelens-gpu-fleet", "some dashboard drills down to {uid}");
    }
}

#[test]
fn the_application_dashboard_links_to_its_logs_in_kibana() {
    let (_, app) = dashboards().into_iter().find(|(_, d)| d["uid"] == "nodelens-application").unwrap();
    let kibana_url =
        app["templating"]["list"].as_array().unwrap().iter().find(|v| v["name"] == "kibana_url").expect("a Kibana URL variable");
    assert_eq!(kibana_url["type"], "textbox");
    let link = app["links"].as_array().unwrap().iter().find(|l| l["title"] == "Logs in Kibana").expect("a Logs in Kibana link");
    let url = link["url"].as_str().unwrap();
    assert!(url.starts_with("${kibana_url}/app/discover#/view/"), "{url}");
    assert!(url.contains("service.name:%22${app}%22") && url.contains("kubernetes.namespace:%22${namespace}%22"), "{url}");
    assert!(url.contains("${__from:date:iso}") && url.contains("${__to:date:iso}"), "{url}: keeps the time range");
    let search = url.split("/view/").nth(1).and_then(|r| r.split('?').next()).unwrap();
    let objects = kibana_objects();
    let saved = objects.iter().find(|o| o["id"] == search).unwrap_or_else(|| panic!("saved search {search} is bundled"));
    assert_eq!(saved["type"], "search");
}

fn kibana_objects() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(root().join("dashboards/kibana/nodelens.ndjson")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
}

/// Field paths of the bundled index template's mapping (`a.b.c`); `kubernetes.labels` is one
/// flattened field whose keys are queried as `kubernetes.labels.<key>`.
fn mapped_fields() -> BTreeSet<String> {
    fn walk(prefix: &str, properties: &serde_json::Value, out: &mut BTreeSet<String>) {
        for (name, field) in properties.as_object().unwrap() {
            let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            match field.get("properties") {
                Some(nested) => walk(&path, nested, out),
                None => {
                    out.insert(path);
                }
            }
        }
    }
    let text = std::fs::read_to_string(root().join("deploy/elasticsearch/index-template.json")).unwrap();
    let template: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = BTreeSet::new();
    walk("", &template["template"]["mappings"]["properties"], &mut out);
    out
}

/// What Kibana's saved-objects import API requires of each line, and what makes the objects
/// work against the data stream the agent writes: known types, unique ids, references that
/// resolve inside the file, a data view over the agent's data stream with `@timestamp`, and
/// saved searches whose columns and queries name mapped fields.
#[test]
fn kibana_saved_objects_import_cleanly_and_name_mapped_fields() {
    let objects = kibana_objects();
    let fields = mapped_fields();
    assert!(fields.contains("service.name") && fields.contains("kubernetes.namespace"), "{fields:?}");
    let ids: HashSet<(String, String)> =
        objects.iter().map(|o| (o["type"].as_str().unwrap().to_string(), o["id"].as_str().unwrap().to_string())).collect();
    assert_eq!(ids.len(), objects.len(), "ids are unique");
    let data_stream = nodelens::config::Config::default().sinks.elasticsearch.data_stream;
    let mut titles = BTreeSet::new();
    for o in &objects {
        let (kind, id) = (o["type"].as_str().unwrap(), o["id"].as_str().unwrap());
        assert!(["index-pattern", "search"].contains(&kind), "{id}: type {kind}");
        assert!(id.starts_with("nodelens-"), "{id}: a stable id of ours");
        let attributes = o["attributes"].as_object().unwrap_or_else(|| panic!("{id}: attributes"));
        titles.insert(attributes["title"].as_str().unwrap().to_string());
        for r in o["references"].as_array().unwrap() {
            let target = (r["type"].as_str().unwrap().to_string(), r["id"].as_str().unwrap().to_string());
            assert!(ids.contains(&target), "{id}: reference {target:?} is in the file");
        }
        if kind == "index-pattern" {
            let pattern = attributes["title"].as_str().unwrap();
            let prefix = pattern.strip_suffix('*').unwrap();
            assert!(data_stream.starts_with(prefix), "{id}: {pattern} covers the default data stream {data_stream}");
            assert_eq!(attributes["timeFieldName"], "@timestamp");
            continue;
        }
        let source: serde_json::Value =
            serde_json::from_str(attributes["kibanaSavedObjectMeta"]["searchSourceJSON"].as_str().unwrap()).unwrap();
        let index_ref = source["indexRefName"].as_str().unwrap();
        assert!(o["references"].as_array().unwrap().iter().any(|r| r["name"] == index_ref), "{id}: its data view is referenced");
        assert_eq!(source["query"]["language"], "kuery");
        for column in attributes["columns"].as_array().unwrap() {
            assert!(fields.contains(column.as_str().unwrap()), "{id}: column {column} is a mapped field");
        }
        let query = source["query"]["query"].as_str().unwrap();
        for word in query.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
            if let Some((field, _)) = word.split_once(':') {
                assert!(fields.contains(field), "{id}: query field {field} is mapped");
            }
        }
    }
    assert!(titles.contains("Logs of one app") && titles.contains("Errors by app"), "{titles:?}");
}

#[test]
fn every_dashboard_query_is_valid_promql_over_known_metrics() {
    let mut rules = String::from("groups:\n  - name: dashboard-queries\n    rules:\n");
    let known = Known::load();
    for (n, (file, d)) in dashboards().into_iter().enumerate() {
        for (i, q) in queries(&file, &d).iter().enumerate() {
            known.assert_reads_only_known(&q.what, &q.expr);
            let expr = views::substitute(&q.expr, "5m", &[]);
            rules.push_str(&format!("      - record: lint:query_{n}_{i}\n        expr: {}\n", serde_json::to_string(&expr).unwrap()));
        }
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

#[test]
fn variable_references_are_found_in_every_form() {
    let got: Vec<String> =
        variable_references("a $node b ${app} c ${__from:date:iso} d ${kibana_url} $1 $__rate_interval").into_iter().collect();
    assert_eq!(got, ["app", "kibana_url", "node"]);
}
