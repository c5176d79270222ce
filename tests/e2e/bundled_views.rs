//! Lints the bundled views. Rules: every alert has a severity, a summary, a description naming
//! what it is about and an absolute runbook link (`RUNBOOK_BASE_URL#section`) whose section
//! exists in docs/runbooks.md; every alert has a
//! promtool test in which it fires and one in which it must stay silent. Dashboards: Grafana 10+
//! JSON with a stable uid, the data source as first variable, and every query valid PromQL
//! (checked by promtool with the variables substituted). Both read only metrics the agent
//! exports, recording rules of rules/, or the external metrics listed in
//! dashboards/external-metrics.md. The numbers: every dashboard query, variables substituted,
//! runs under promtool on the synthetic cluster of dashboards/tests/ and must return data
//! (table queries: rows without `__name__`, joined by the same explicit labels), and the
//! known-answer scenarios of dashboards/tests/known-answers.yaml (8 GPUs for 1 h of 24 h are 8
//! GPU-hours, 4 sharers hold 1 GPU, ...) must give their answers. (promtool runs the rule tests themselves: tests/run-all.sh;
//! tests/e2e/prometheus.rs checks the names against a live agent and runs every query.)

use std::collections::{BTreeMap, BTreeSet, HashSet};

use nodelens_testkit::views::{
    self, dashboards, external_metrics, metric_names, panels, queries, recorded_names, root, rules, RUNBOOK_BASE_URL,
};
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
        // A cluster-wide alert (the Events election) names the cluster.
        assert!(
            ["$labels.node", "$labels.app", "$labels.cluster"].iter().any(|l| description.contains(l)),
            "{name}: the description names the node, the app or the cluster it is about"
        );
        let url = alert["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = url
            .strip_prefix(RUNBOOK_BASE_URL)
            .and_then(|rest| rest.strip_prefix('#'))
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} is not {RUNBOOK_BASE_URL}#<section>"));
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
        let exported: HashSet<String> = nodelens::agent::Metrics::new("lint").names().iter().cloned().collect();
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
            // `:queryparam` writes every value of a multi-select (`var-cluster=a&var-cluster=b`).
            for carried in ["${datasource:queryparam}", "${cluster:queryparam}", "${__url_time_range}"] {
                assert!(url.contains(carried), "{name}: drill-down {url} carries {carried}");
            }
            for (j, _) in url.match_indices("=${") {
                assert!(url[j + 3..].starts_with("__"), "{name}: drill-down {url} passes a variable without :queryparam");
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
    // Provisioned dashboards cannot be saved from the UI: a constant, set at install time.
    assert_eq!((kibana_url["type"].as_str(), kibana_url["hide"].as_u64()), (Some("constant"), Some(2)));
    let link = app["links"].as_array().unwrap().iter().find(|l| l["title"] == "Logs in Kibana").expect("a Logs in Kibana link");
    let url = link["url"].as_str().unwrap();
    // `:raw`: Grafana 9.5+ URL-encodes variables in links, which would turn the address into a path.
    assert!(url.starts_with("${kibana_url:raw}/app/discover#/view/"), "{url}");
    assert!(url.contains("service.name:%22${app}%22") && url.contains("kubernetes.namespace:%22${namespace}%22"), "{url}");
    assert!(url.contains("${__from:date:iso}") && url.contains("${__to:date:iso}"), "{url}: keeps the time range");
    let search = url.split("/view/").nth(1).and_then(|r| r.split('?').next()).unwrap();
    let objects = kibana_objects();
    let saved = objects.iter().find(|o| o["id"] == search).unwrap_or_else(|| panic!("saved search {search} is bundled"));
    assert_eq!(saved["type"], "search");
}

/// The fields a Discover deep link's Lucene query names (`field:value`, `_exists_:field`), each
/// of which must be mapped, and that it scopes by cluster the way documents without
/// `orchestrator.cluster.name` (no `cluster_name` configured) still match.
fn assert_discover_link(what: &str, url: &str, cluster: &str) {
    let fields = mapped_fields();
    let search = url
        .split("/app/discover#/view/")
        .nth(1)
        .and_then(|r| r.split('?').next())
        .unwrap_or_else(|| panic!("{what}: {url} opens Discover"));
    assert!(kibana_objects().iter().any(|o| o["id"] == search && o["type"] == "search"), "{what}: saved search {search} is bundled");
    let query = url.split("query:'").nth(1).and_then(|q| q.strip_suffix("'))")).unwrap_or_else(|| panic!("{what}: {url} has a query"));
    assert!(url.contains("(query:(language:lucene,query:'"), "{what}: {url}: Lucene (KQL has no regular expressions)");
    let query = query.replace("%22", "\"").replace("%20", " ");
    assert!(
        query.ends_with(&format!(" AND (orchestrator.cluster.name:{cluster} OR (*:* NOT _exists_:orchestrator.cluster.name))")),
        "{what}: {query}"
    );
    // Lucene's classic parser, which query_string uses, reads `A OR NOT B` as `A -B`: a
    // negation must stand in a group with something to subtract from, `(*:* NOT B)`.
    assert!(!query.contains("OR NOT") && !query.contains("(NOT"), "{what}: {query}: a bare negation matches nothing");
    for word in query.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
        if let Some((field, _)) = word.split_once(':').filter(|(field, _)| *field != "*") {
            let field = if field == "_exists_" { &word["_exists_:".len()..] } else { field };
            assert!(fields.contains(field), "{what}: query field {field} is mapped");
        }
    }
}

#[test]
fn every_kibana_link_of_the_dashboards_scopes_by_cluster_and_names_mapped_fields() {
    let mut links = 0;
    for (file, d) in dashboards() {
        let text = serde_json::to_string(&d).unwrap();
        for (i, _) in text.match_indices("${kibana_url:raw}") {
            let url: String = text[i..].chars().take_while(|c| *c != '"').collect();
            assert_discover_link(&file.display().to_string(), &url, "/${cluster:regex}/");
            links += 1;
        }
    }
    assert!(links >= 6, "{links} Kibana links");
}

/// Every alert links to the dashboard of what it is about (`dashboard_url`, relative to Grafana:
/// the chart makes it absolute from `links.grafanaUrl`), passing variables that dashboard has;
/// `logs_url` (relative to Kibana) opens a bundled saved search. promtool renders both in the
/// rule tests' `exp_annotations`.
#[test]
fn alert_links_open_bundled_dashboards_with_their_variables_and_bundled_searches() {
    let boards = dashboards();
    let mut logs = 0;
    for alert in alerts() {
        let name = alert["alert"].as_str().unwrap();
        let url = alert["annotations"]["dashboard_url"].as_str().unwrap_or_else(|| panic!("{name}: no dashboard_url"));
        let (uid, query) =
            url.strip_prefix("/d/").and_then(|r| r.split_once('?')).unwrap_or_else(|| panic!("{name}: {url} is /d/<uid>?<vars>"));
        let (_, board) = boards.iter().find(|(_, d)| d["uid"] == uid).unwrap_or_else(|| panic!("{name}: {uid} is not bundled"));
        let variables: BTreeSet<&str> =
            board["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        for (i, _) in query.match_indices("var-") {
            let var: String = query[i + 4..].chars().take_while(|c| *c != '=').collect();
            assert!(variables.contains(var.as_str()), "{name}: {uid} has no variable {var}");
        }
        assert!(query.contains("{{ with $labels.cluster }}&var-cluster={{ . | urlquery }}{{ end }}"), "{name}: {url} keeps the cluster");
        if let Some(url) = alert["annotations"]["logs_url"].as_str() {
            assert!(url.starts_with("/app/discover#/view/"), "{name}: {url}");
            let scoped = url.replace(
                "{{ with or $labels.cluster $externalLabels.cluster }}%20AND%20(orchestrator.cluster.name:%22{{ . }}%22%20OR%20(*:*%20NOT%20_exists_:orchestrator.cluster.name)){{ end }}",
                "%20AND%20(orchestrator.cluster.name:%22c%22%20OR%20(*:*%20NOT%20_exists_:orchestrator.cluster.name))",
            );
            assert_discover_link(name, &scoped, "\"c\"");
            logs += 1;
        }
    }
    assert!(logs >= 3, "{logs} alerts link to logs");
}

fn kibana_objects() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(root().join("dashboards/kibana/nodelens.ndjson")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
}

/// Field paths of the bundled index template's mapping (`a.b.c`); `kubernetes.labels` is one
/// flattened field whose keys are queried as `kubernetes.labels.<key>`.
fn mapped_fields() -> BTreeSet<String> {
    mapped_field_types().into_keys().collect()
}

/// [`mapped_fields`] with each field's mapping type (`keyword`, `date_nanos`, ...).
fn mapped_field_types() -> BTreeMap<String, String> {
    fn walk(prefix: &str, properties: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        for (name, field) in properties.as_object().unwrap() {
            let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            match field.get("properties") {
                Some(nested) => walk(&path, nested, out),
                None => {
                    out.insert(path, field["type"].as_str().unwrap_or_else(|| panic!("{name}: a mapping type")).to_string());
                }
            }
        }
    }
    // The container logs' template and the node logs' (the node data view and its links).
    let mut out = BTreeMap::new();
    for file in ["index-template.json", "node-index-template.json", "gpu-runs-index-template.json", "events-index-template.json"] {
        let text = std::fs::read_to_string(root().join("deploy/elasticsearch").join(file)).unwrap();
        let template: serde_json::Value = serde_json::from_str(&text).unwrap();
        walk("", &template["template"]["mappings"]["properties"], &mut out);
    }
    out
}

/// For each object type we ship, a type migration version Kibana 8.8 is known to have (the
/// dashboards of its 8.8 sample data, an 8.8 export of a visualization, 8.0.0 where data views and
/// saved searches became shareable): Kibana refuses to import an object migrated past what it
/// knows.
const KIBANA_8_8_TYPE_VERSIONS: &[(&str, &str)] =
    &[("index-pattern", "8.0.0"), ("search", "8.0.0"), ("visualization", "8.5.0"), ("dashboard", "8.7.0")];

/// Aggregation-based visualization types we ship, with the agg schemas each one takes.
const VISUALIZATION_SCHEMAS: &[(&str, &[&str])] = &[("histogram", &["metric", "segment", "group"]), ("table", &["metric", "bucket"])];

/// Mapping types Kibana can aggregate on in our visualizations.
const AGGREGATABLE_TYPES: &[&str] = &["keyword", "date", "date_nanos", "double", "long"];

/// The Grafana address the data view's links use in the file; replaced at install time.
const GRAFANA_PLACEHOLDER: &str = "http://grafana:3000";

/// `8.5.0` as `[8, 5, 0]`, which compare as versions do.
fn version(text: &str) -> Vec<u32> {
    text.split('.').map(|p| p.parse().unwrap_or_else(|_| panic!("{text}: a version"))).collect()
}

/// Parses a JSON string attribute (`visState`, `panelsJSON`, `searchSourceJSON`, ...).
fn json_attribute(id: &str, value: &serde_json::Value) -> serde_json::Value {
    let text = value.as_str().unwrap_or_else(|| panic!("{id}: {value} is a JSON string"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{id}: {text}: {e}"))
}

/// A saved search's or visualization's data view is referenced, its query is KQL over mapped
/// fields.
fn assert_search_source(id: &str, o: &serde_json::Value, fields: &BTreeSet<String>) {
    let source = json_attribute(id, &o["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"]);
    let index_ref = source["indexRefName"].as_str().unwrap_or_else(|| panic!("{id}: searchSourceJSON names its data view"));
    let index = o["references"].as_array().unwrap().iter().find(|r| r["name"] == index_ref);
    assert_eq!(index.map(|r| &r["type"]), Some(&serde_json::json!("index-pattern")), "{id}: its data view is referenced");
    assert_eq!(source["query"]["language"], "kuery");
    let query = source["query"]["query"].as_str().unwrap();
    for word in query.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
        if let Some((field, _)) = word.split_once(':') {
            assert!(fields.contains(field), "{id}: query field {field} is mapped");
        }
    }
}

/// An aggregation-based visualization of a type we use, every agg of a schema that type takes,
/// on an aggregatable mapped field; chart series and terms orders name metric aggs.
fn assert_visualization(id: &str, attributes: &serde_json::Value, types: &BTreeMap<String, String>) {
    let vis = json_attribute(id, &attributes["visState"]);
    assert_eq!(vis["title"], attributes["title"], "{id}: visState has the object's title");
    let kind = vis["type"].as_str().unwrap();
    let (_, schemas) = VISUALIZATION_SCHEMAS.iter().find(|(k, _)| *k == kind).unwrap_or_else(|| panic!("{id}: vis type {kind}"));
    let aggs = vis["aggs"].as_array().unwrap();
    let metrics: BTreeSet<&str> = aggs.iter().filter(|a| a["schema"] == "metric").map(|a| a["id"].as_str().unwrap()).collect();
    assert!(!metrics.is_empty(), "{id}: a metric");
    let agg_ids: HashSet<&str> = aggs.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(agg_ids.len(), aggs.len(), "{id}: agg ids are unique");
    for agg in aggs {
        let what = format!("{id}: agg {} ({})", agg["id"], agg["type"]);
        let schema = agg["schema"].as_str().unwrap();
        assert!(schemas.contains(&schema), "{what}: schema {schema} is not one of {kind}'s {schemas:?}");
        if let Some(field) = agg["params"].get("field") {
            let field = field.as_str().unwrap();
            let mapping = types.get(field).unwrap_or_else(|| panic!("{what}: {field} is not a mapped field"));
            assert!(AGGREGATABLE_TYPES.contains(&mapping.as_str()), "{what}: {field} is {mapping}, not aggregatable");
        }
        if agg["type"] == "terms" {
            let order_by = agg["params"]["orderBy"].as_str().unwrap();
            assert!(metrics.contains(order_by), "{what}: ordered by metric {order_by}");
        }
    }
    if kind == "histogram" {
        let params = &vis["params"];
        let axes: BTreeSet<&str> = params["valueAxes"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect();
        assert!(!params["categoryAxes"].as_array().unwrap().is_empty(), "{id}: a category axis");
        for series in params["seriesParams"].as_array().unwrap() {
            assert!(metrics.contains(series["data"]["id"].as_str().unwrap()), "{id}: series {series} draws a metric");
            assert!(axes.contains(series["valueAxis"].as_str().unwrap()), "{id}: series {series} is on a value axis");
        }
        let on_time =
            aggs.iter().any(|a| a["schema"] == "segment" && a["type"] == "date_histogram" && a["params"]["field"] == "@timestamp");
        assert!(on_time, "{id}: the x-axis is a date histogram on @timestamp");
    }
}

/// Every panel opens a visualization or saved search of the file the way Kibana resolves
/// `panelRefName` (the references prefixed `<panelIndex>:`, or all of them when none is), panel
/// indices are unique and no two panels overlap on the 48-column grid.
fn assert_dashboard(id: &str, o: &serde_json::Value) -> BTreeSet<String> {
    let attributes = &o["attributes"];
    assert_eq!(attributes["timeRestore"], false, "{id}: keeps the time range the user has");
    json_attribute(id, &attributes["optionsJSON"]);
    let source = json_attribute(id, &attributes["kibanaSavedObjectMeta"]["searchSourceJSON"]);
    assert_eq!(source["query"]["language"], "kuery");
    let panels = json_attribute(id, &attributes["panelsJSON"]);
    let panels = panels.as_array().unwrap();
    assert!(!panels.is_empty(), "{id}: panels");
    let references = o["references"].as_array().unwrap();
    let (mut indices, mut opened, mut rects) = (HashSet::new(), BTreeSet::new(), Vec::new());
    for panel in panels {
        let index = panel["panelIndex"].as_str().unwrap();
        assert!(indices.insert(index), "{id}: panel index {index} is unique");
        let grid = &panel["gridData"];
        assert_eq!(grid["i"].as_str(), Some(index), "{id}: panel {index}: gridData.i is its panelIndex");
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| grid[k].as_u64().unwrap_or_else(|| panic!("{id}: panel {index}: gridData.{k}")));
        assert!(w > 0 && h > 0 && x + w <= 48, "{id}: panel {index} fits the grid");
        for (other, (ox, oy, ow, oh)) in &rects {
            let apart = x + w <= *ox || *ox + *ow <= x || y + h <= *oy || *oy + *oh <= y;
            assert!(apart, "{id}: panels {other} and {index} overlap");
        }
        rects.push((index, (x, y, w, h)));
        let ref_name = panel["panelRefName"].as_str().unwrap_or_else(|| panic!("{id}: panel {index} is by reference"));
        let prefix = format!("{index}:");
        let prefixed: Vec<&serde_json::Value> =
            references.iter().filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with(&prefix))).collect();
        let candidates = if prefixed.is_empty() { references.iter().collect() } else { prefixed };
        let reference = candidates
            .iter()
            .find(|r| r["name"].as_str().map(|n| n.strip_prefix(&prefix).unwrap_or(n)) == Some(ref_name))
            .unwrap_or_else(|| panic!("{id}: panel {index}: no reference {ref_name}"));
        let kind = reference["type"].as_str().unwrap();
        assert!(["visualization", "search"].contains(&kind), "{id}: panel {index} opens a {kind}");
        assert_eq!(panel["type"].as_str(), Some(kind), "{id}: panel {index}: its type is its reference's");
        opened.insert(reference["id"].as_str().unwrap().to_string());
    }
    opened
}

/// The data view formats `service.name` as a link to the bundled Grafana dashboard of that app,
/// at the install-time placeholder address, passing only variables that dashboard has.
fn assert_grafana_link(id: &str, attributes: &serde_json::Value, fields: &BTreeSet<String>) {
    let formats = json_attribute(id, &attributes["fieldFormatMap"]);
    for field in formats.as_object().unwrap().keys() {
        assert!(fields.contains(field), "{id}: field format for {field}, not a mapped field");
    }
    let format = &formats["service.name"];
    assert_eq!(format["id"], "url", "{id}: service.name is a link");
    assert_eq!(format["params"]["labelTemplate"], "{{value}}", "{id}: the link reads as the app's name");
    let url = format["params"]["urlTemplate"].as_str().unwrap();
    let path = url.strip_prefix(GRAFANA_PLACEHOLDER).unwrap_or_else(|| panic!("{id}: {url} starts with {GRAFANA_PLACEHOLDER}"));
    let (uid, query) = path.strip_prefix("/d/").and_then(|r| r.split_once('?')).unwrap_or_else(|| panic!("{id}: {url} is /d/<uid>?<vars>"));
    let boards = dashboards();
    let (_, board) = boards.iter().find(|(_, d)| d["uid"] == uid).unwrap_or_else(|| panic!("{id}: {uid} is not a bundled dashboard"));
    let variables: BTreeSet<&str> = board["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    for pair in query.split('&') {
        let var = pair.strip_prefix("var-").and_then(|p| p.split_once('=')).map(|(v, _)| v);
        let var = var.unwrap_or_else(|| panic!("{id}: {url}: {pair} is var-<name>=<value>"));
        assert!(variables.contains(var), "{id}: {uid} has no variable {var}");
    }
    assert!(query.split('&').any(|p| p == "var-app={{value}}"), "{id}: {url} opens the app's dashboard");
}

/// What Kibana's saved-objects import API requires of each line, and what makes the objects
/// work against the data stream the agent writes: known types at migration versions Kibana 8.8
/// knows, unique ids, references that resolve inside the file, a data view over the agent's
/// data stream with `@timestamp` whose `service.name` links to Grafana, saved searches and
/// aggregation-based visualizations that name mapped (for aggs: aggregatable) fields, and a
/// dashboard of them.
#[test]
fn kibana_saved_objects_import_cleanly_and_name_mapped_fields() {
    let objects = kibana_objects();
    let types = mapped_field_types();
    let fields = mapped_fields();
    assert!(fields.contains("service.name") && fields.contains("kubernetes.namespace"), "{fields:?}");
    let ids: HashSet<(String, String)> =
        objects.iter().map(|o| (o["type"].as_str().unwrap().to_string(), o["id"].as_str().unwrap().to_string())).collect();
    assert_eq!(ids.len(), objects.len(), "ids are unique");
    let es = nodelens::config::Config::default().sinks.elasticsearch;
    let (data_stream, node_data_stream, gpu_runs_data_stream, events_data_stream) =
        (es.data_stream, es.node_data_stream, es.gpu_runs_data_stream, es.events_data_stream);
    let (mut titles, mut on_dashboards) = (BTreeSet::new(), BTreeSet::new());
    for o in &objects {
        let (kind, id) = (o["type"].as_str().unwrap(), o["id"].as_str().unwrap());
        let (_, known) = KIBANA_8_8_TYPE_VERSIONS.iter().find(|(k, _)| *k == kind).unwrap_or_else(|| panic!("{id}: type {kind}"));
        assert!(id.starts_with("nodelens-"), "{id}: a stable id of ours");
        assert_eq!(o["coreMigrationVersion"], "8.8.0", "{id}");
        let type_version = o["typeMigrationVersion"].as_str().unwrap_or_else(|| panic!("{id}: typeMigrationVersion"));
        assert!(version(type_version) <= version(known), "{id}: {kind} {type_version} is newer than Kibana 8.8's {known}");
        let attributes = o["attributes"].as_object().unwrap_or_else(|| panic!("{id}: attributes"));
        titles.insert(attributes["title"].as_str().unwrap().to_string());
        for r in o["references"].as_array().unwrap() {
            let target = (r["type"].as_str().unwrap().to_string(), r["id"].as_str().unwrap().to_string());
            assert!(ids.contains(&target), "{id}: reference {target:?} is in the file");
        }
        match kind {
            "index-pattern" => {
                let pattern = attributes["title"].as_str().unwrap();
                let prefix = pattern.strip_suffix('*').unwrap();
                assert!(
                    [&data_stream, &node_data_stream, &gpu_runs_data_stream, &events_data_stream].iter().any(|stream| stream.starts_with(prefix)),
                    "{id}: {pattern} covers the default data stream {data_stream}, {node_data_stream}, {gpu_runs_data_stream} or {events_data_stream}"
                );
                assert_eq!(attributes["timeFieldName"], "@timestamp");
                assert_grafana_link(id, &o["attributes"], &fields);
            }
            "search" => {
                assert_search_source(id, o, &fields);
                for column in attributes["columns"].as_array().unwrap() {
                    assert!(fields.contains(column.as_str().unwrap()), "{id}: column {column} is a mapped field");
                }
            }
            "visualization" => {
                assert_search_source(id, o, &fields);
                assert_visualization(id, &o["attributes"], &types);
            }
            _ => on_dashboards.extend(assert_dashboard(id, o)),
        }
    }
    for o in objects.iter().filter(|o| o["type"] == "visualization") {
        assert!(on_dashboards.contains(o["id"].as_str().unwrap()), "{}: on no dashboard", o["id"]);
    }
    for title in
        ["Logs of one app", "Errors by app", "nodelens: log volume by app and level", "GPU runs", "GPU-hours of failed runs by user"]
    {
        assert!(titles.contains(title), "{title} is bundled: {titles:?}");
    }
}

/// Grafana's annotation format: the query in `target.expr`, never at the annotation's top level
/// (the older form), in the dashboards and in every ConfigMap the chart and kustomize ship.
fn assert_annotations_in_target(what: &str, dashboard: &serde_json::Value) {
    for a in dashboard["annotations"]["list"].as_array().into_iter().flatten() {
        let name = a["name"].as_str().unwrap_or_default();
        assert!(a.get("expr").is_none() && a.get("step").is_none(), "{what}: annotation {name} has a top-level expr or step");
        if a["builtIn"].as_i64() != Some(1) {
            assert!(a["target"]["expr"].as_str().is_some_and(|e| !e.is_empty()), "{what}: annotation {name} has no target.expr");
        }
    }
}

#[test]
fn every_annotation_has_its_query_in_target() {
    let mut seen = 0;
    for (file, d) in dashboards() {
        assert_annotations_in_target(&file.display().to_string(), &d);
        seen += d["annotations"]["list"].as_array().map_or(0, Vec::len);
    }
    assert!(seen >= 2, "the machine dashboard's annotations are checked");
    let shipped = std::fs::read_to_string(views::root().join("deploy/base/dashboards.yaml")).unwrap();
    let mut maps = 0;
    for doc in serde_yaml_ng::Deserializer::from_str(&shipped) {
        let map: serde_json::Value = serde_json::to_value(<serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).unwrap()).unwrap();
        for (file, text) in map["data"].as_object().into_iter().flatten() {
            assert_annotations_in_target(
                &format!("deploy/base/dashboards.yaml {file}"),
                &serde_json::from_str::<serde_json::Value>(text.as_str().unwrap()).unwrap(),
            );
            maps += 1;
        }
    }
    assert!(maps >= 7, "{maps} dashboards in deploy/base/dashboards.yaml");
    for file in views::files("deploy/helm/nodelens/files/dashboards", ".json") {
        let text = std::fs::read_to_string(&file).unwrap();
        assert_annotations_in_target(&file.display().to_string(), &serde_json::from_str::<serde_json::Value>(&text).unwrap());
    }
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

/// Runs `promtool test rules` on a generated test file (YAML written as JSON) with the rules of
/// rules/ loaded: promtool's report on failure.
fn promtool_test(tests: Vec<serde_json::Value>) -> Result<(), String> {
    let rule_files: Vec<String> = views::files("rules", ".rules.yaml").iter().map(|f| f.display().to_string()).collect();
    let doc = serde_json::json!({"rule_files": rule_files, "evaluation_interval": "1m", "tests": tests});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("views.test.yaml");
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let out = std::process::Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&file)
        .output()
        .expect("promtool is installed (tests/run-all.sh installs Debian's prometheus package)");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(())
    } else {
        Err(report)
    }
}

fn yaml_file(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    let yaml: Value = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::to_value(yaml).unwrap()
}

/// The scenarios of dashboards/tests/known-answers.yaml, each a promtool test of the
/// dashboards' own queries with their answers.
#[test]
fn dashboard_queries_give_the_known_answers() {
    let doc = yaml_file("dashboards/tests/known-answers.yaml");
    let scenarios = doc["scenarios"].as_array().unwrap();
    assert!(scenarios.len() >= 4);
    let mut tests = Vec::new();
    let mut checked = BTreeSet::new();
    for scenario in scenarios {
        let range = scenario["range"].as_str().unwrap_or("1h");
        let rate_interval = scenario["rate_interval"].as_str().unwrap_or("5m");
        let vars: Vec<(String, String)> = scenario["vars"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect())
            .unwrap_or_default();
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut exprs = Vec::new();
        for check in scenario["checks"].as_array().unwrap() {
            let reference = check["query"].as_str().unwrap();
            let expr = views::query_by_reference(reference).unwrap_or_else(|| panic!("{reference}: no such dashboard query"));
            checked.insert(reference.to_string());
            exprs.push(serde_json::json!({
                "expr": views::substitute_over(&expr, range, rate_interval, &vars),
                "eval_time": check["eval_time"],
                "exp_samples": check["exp_samples"],
            }));
        }
        tests.push(serde_json::json!({
            "name": scenario["name"],
            "interval": "1m",
            "input_series": scenario["input_series"],
            "promql_expr_test": exprs,
        }));
    }
    for must in [
        "nodelens-user / GPU-hours held / A",
        "nodelens-cluster / GPUs allocated / A",
        "nodelens-cluster / Allocated but idle / A",
        "nodelens-machine / XID errors / A",
        "nodelens-cluster / GPUs lost / A",
    ] {
        assert!(checked.contains(must), "no known answer for {must}");
    }
    if let Err(report) = promtool_test(tests) {
        panic!("a dashboard query gives a wrong answer:\n{report}");
    }
}

/// Variables of the synthetic cluster in dashboards/tests/synthetic-cluster.yaml.
const SYNTHETIC_VARS: &[(&str, &str)] =
    &[("cluster", "c1"), ("node", "n1"), ("namespace", "ml"), ("app", "train"), ("user", "alice"), ("name", "loss")];

/// Every panel and variable query of every dashboard returns data on the synthetic cluster;
/// a table query's rows have no `__name__`. A new panel is covered without a new test.
#[test]
fn every_dashboard_query_returns_data_on_the_synthetic_cluster() {
    let synthetic = yaml_file("dashboards/tests/synthetic-cluster.yaml");
    let mut exprs = Vec::new();
    let mut count = 0;
    for (file, d) in dashboards() {
        let tables: BTreeSet<String> = panels(&d)
            .iter()
            .filter(|p| p["type"] == "table")
            .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t["expr"].as_str().map(String::from))
            .collect();
        for q in queries(&file, &d) {
            let expr = views::substitute_over(&q.expr, "1h", "5m", SYNTHETIC_VARS);
            // absent() is empty exactly when the query returns data.
            exprs.push(serde_json::json!({"expr": format!("absent({expr})"), "eval_time": "150m", "exp_samples": []}));
            if tables.contains(&q.expr) {
                exprs.push(serde_json::json!({
                    "expr": format!("group by (__name__) ({expr})"),
                    "eval_time": "150m",
                    "exp_samples": [{"labels": "{}", "value": 1}],
                }));
            }
            count += 1;
        }
    }
    assert!(count > 100, "{count} queries");
    let test = serde_json::json!({"name": "every dashboard query returns data", "interval": "1m", "input_series": synthetic["input_series"], "promql_expr_test": exprs});
    if let Err(report) = promtool_test(vec![test]) {
        // promtool names each failing expression; absent(...) failing means no data.
        panic!("dashboard queries that return no data (absent) or rows with __name__ (group by) on the synthetic cluster:\n{report}");
    }
}

/// The `by (...)` list of an expression's outermost aggregation (inside `sort`/`topk`-like
/// wrappers and parentheses).
fn outer_grouping(expr: &str) -> Option<Vec<String>> {
    let mut rest = expr.trim();
    loop {
        let before = rest;
        for wrapper in ["sort_desc(", "sort(", "("] {
            rest = rest.strip_prefix(wrapper).map(str::trim_start).unwrap_or(rest);
        }
        if rest == before {
            break;
        }
    }
    let word: String = rest.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
    if !["sum", "max", "min", "avg", "count", "group"].contains(&word.as_str()) {
        return None;
    }
    let labels = rest[word.len()..].trim_start().strip_prefix("by")?.trim_start().strip_prefix('(')?.split(')').next()?;
    Some(labels.split(',').map(|l| l.trim().to_string()).collect())
}

/// Tables are instant queries in table format, each aggregated `by` explicit labels that
/// include `cluster`, the same labels for every query of one table (Grafana's merge joins
/// only rows that agree on every shared field); status-history panels ask for few points.
#[test]
fn tables_join_by_explicit_labels_and_status_history_panels_are_drawable() {
    for (file, d) in dashboards() {
        let name = file.display();
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or("");
            if p["type"] == "status-history" {
                let points = p["maxDataPoints"].as_u64().unwrap_or(u64::MAX);
                assert!(points <= 200, "{name} / {title}: maxDataPoints {points}: Grafana draws at most width/2 points");
            }
            if p["type"] != "table" {
                continue;
            }
            let targets = p["targets"].as_array().unwrap();
            let mut groupings = BTreeSet::new();
            for t in targets {
                assert_eq!((t["instant"].as_bool(), t["format"].as_str()), (Some(true), Some("table")), "{name} / {title}");
                let expr = t["expr"].as_str().unwrap();
                let by = outer_grouping(expr).unwrap_or_else(|| panic!("{name} / {title}: {expr} is not aggregated by explicit labels"));
                assert!(by.contains(&"cluster".to_string()), "{name} / {title}: {expr} drops cluster");
                groupings.insert(by);
            }
            if targets.len() > 1 {
                assert_eq!(groupings.len(), 1, "{name} / {title}: its queries group by different labels: {groupings:?}");
                let merged = p["transformations"].as_array().into_iter().flatten().any(|t| t["id"] == "merge");
                assert!(merged, "{name} / {title}: several queries and no merge");
            }
        }
    }
    assert_eq!(outer_grouping("sort((max by (cluster, node) (x) - time()) / 86400)"), Some(vec!["cluster".into(), "node".into()]));
    assert_eq!(outer_grouping("x{a=\"b\"}"), None);
}

/// The Alertmanager inhibition rules shipped in rules/alertmanager/ name alerts that exist and
/// make a valid Alertmanager configuration (amtool check-config).
#[test]
fn shipped_inhibition_rules_name_real_alerts_and_load_in_alertmanager() {
    let text = std::fs::read_to_string(root().join("rules/alertmanager/inhibit-rules.yaml")).unwrap();
    let doc: Value = serde_yaml_ng::from_str(&text).unwrap();
    let names: HashSet<String> = alerts().iter().map(|a| a["alert"].as_str().unwrap().to_string()).collect();
    let rules = doc["inhibit_rules"].as_sequence().unwrap();
    assert!(rules.len() >= 2);
    for rule in rules {
        for side in ["source_matchers", "target_matchers"] {
            let matcher = rule[side].as_sequence().unwrap().iter().filter_map(Value::as_str).find(|m| m.starts_with("alertname"));
            let matcher = matcher.unwrap_or_else(|| panic!("{side} of {rule:?} names its alert"));
            let pattern = matcher.split('"').nth(1).unwrap();
            for alert in pattern.split('|') {
                assert!(names.contains(alert), "{matcher}: no alert {alert}");
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("alertmanager.yml");
    std::fs::write(&config, format!("route: {{receiver: x}}\nreceivers: [{{name: x}}]\n{text}")).unwrap();
    let out = std::process::Command::new("amtool").arg("check-config").arg(&config).output().expect("amtool is installed");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
