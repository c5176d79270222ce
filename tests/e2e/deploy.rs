//! The Kubernetes manifests under deploy/: generated parts agree with their sources
//! (rules/, dashboards/), every kustomization renders, every rendered object is a valid
//! object of its kind (round-trips through its k8s-openapi type, or a strict schema for the
//! Prometheus operator's kinds), and the security policy holds.
//!
//! `NODELENS_UPDATE_DEPLOY=1 cargo test --test deploy` rewrites the generated files.

use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use nodelens_testkit::views::{files, root};
use serde::Deserialize;
use serde_json::Value;

const GENERATED: &str =
    "# Generated from {source} by tests/e2e/deploy.rs; do not edit.\n# NODELENS_UPDATE_DEPLOY=1 cargo test --test deploy rewrites it.\n";

fn prometheus_rule() -> String {
    let mut groups = Vec::new();
    for file in files("rules", ".rules.yaml") {
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        groups.extend(doc["groups"].as_sequence().unwrap().iter().cloned());
    }
    let object = serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "nodelens", "labels": {"app.kubernetes.io/name": "nodelens"}},
        "spec": {"groups": groups},
    });
    GENERATED.replace("{source}", "rules/*.rules.yaml") + &serde_yaml_ng::to_string(&object).unwrap()
}

fn dashboard_config_maps() -> String {
    let mut out = GENERATED.replace("{source}", "dashboards/grafana/*.json");
    for file in files("dashboards/grafana", ".json") {
        let text = std::fs::read_to_string(&file).unwrap();
        let uid = serde_json::from_str::<Value>(&text).unwrap()["uid"].as_str().unwrap().to_string();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let object = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": format!("nodelens-dashboard-{uid}"), "labels": {"grafana_dashboard": "1", "app.kubernetes.io/name": "nodelens"}},
            "data": {name: text},
        });
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&object).unwrap());
    }
    out
}

#[test]
fn generated_manifests_match_rules_and_dashboards() {
    for (path, expected) in
        [("deploy/base/prometheusrule.yaml", prometheus_rule()), ("deploy/base/dashboards.yaml", dashboard_config_maps())]
    {
        let file = root().join(path);
        if std::env::var_os("NODELENS_UPDATE_DEPLOY").is_some() {
            std::fs::write(&file, &expected).unwrap();
        }
        let actual = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(actual == expected, "{path} drifted from its source; run NODELENS_UPDATE_DEPLOY=1 cargo test --test deploy");
    }
}

/// `kubectl kustomize <dir>` as a list of objects.
fn render(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join(dir))
        .output()
        .expect("kubectl is installed (tests/run-all.sh installs it)");
    assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml_ng::Value::deserialize(doc).unwrap()).unwrap())
        .collect()
}

fn kustomizations() -> [&'static str; 3] {
    ["deploy/base", "deploy/overlays/gpu", "deploy/overlays/elasticsearch"]
}

/// Deserializes into `T` and back; a field `T` does not know (a typo) is lost and fails.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) {
    let typed: T =
        serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{} {}: {e}", object["kind"], object["metadata"]["name"]));
    let back = serde_json::to_value(typed).unwrap();
    assert_eq!(&back, object, "{} {} loses fields in a round trip (misspelled key?)", object["kind"], object["metadata"]["name"]);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Crd<S> {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: S,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct ServiceMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    endpoints: Vec<Endpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Endpoint {
    port: String,
    path: String,
    interval: String,
    honor_labels: bool,
    relabelings: Vec<Relabeling>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Relabeling {
    source_labels: Vec<String>,
    target_label: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

#[test]
fn every_rendered_object_is_valid_for_its_kind() {
    for dir in kustomizations() {
        let objects = render(dir);
        assert!(objects.len() >= 10, "{dir}: {} objects", objects.len());
        for object in &objects {
            match object["kind"].as_str().unwrap() {
                "Namespace" => round_trip::<Namespace>(object),
                "ServiceAccount" => round_trip::<ServiceAccount>(object),
                "ClusterRole" => round_trip::<ClusterRole>(object),
                "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(object),
                "ConfigMap" => round_trip::<ConfigMap>(object),
                "DaemonSet" => round_trip::<DaemonSet>(object),
                "Service" => round_trip::<Service>(object),
                "NetworkPolicy" => round_trip::<NetworkPolicy>(object),
                "ServiceMonitor" => drop(serde_json::from_value::<Crd<ServiceMonitorSpec>>(object.clone()).expect("ServiceMonitor schema")),
                "PrometheusRule" => drop(serde_json::from_value::<Crd<RuleSpec>>(object.clone()).expect("PrometheusRule schema")),
                other => panic!("{dir}: unexpected kind {other}"),
            }
        }
    }
}

fn daemonset(dir: &str) -> DaemonSet {
    let object = render(dir).into_iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    serde_json::from_value(object).unwrap()
}

#[test]
fn the_daemonset_runs_with_least_privilege() {
    for dir in kustomizations() {
        let ds = daemonset(dir);
        let pod = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.host_pid, Some(true), "{dir}: hostPID for process attribution");
        assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
        assert!(
            pod.tolerations.unwrap().iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
            "{dir}: runs on tainted nodes"
        );
        let volumes = pod.volumes.unwrap();
        for c in &pod.containers {
            let sc = c.security_context.as_ref().unwrap();
            assert_ne!(sc.privileged, Some(true), "{dir}: not privileged");
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{dir}");
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{dir}");
            let caps = sc.capabilities.as_ref().unwrap();
            assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]), "{dir}");
            assert!(caps.add.as_ref().is_none_or(|a| a.is_empty()), "{dir}: no capability added");
            let env_node = c.env.iter().flatten().find(|e| e.name == "NODE_NAME").unwrap();
            assert_eq!(env_node.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "spec.nodeName");
            assert_eq!(c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/healthz"));
            assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"));
            assert!(c.resources.as_ref().unwrap().limits.as_ref().unwrap().contains_key("memory"), "{dir}: a memory limit");
            for mount in c.volume_mounts.iter().flatten() {
                let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
                if let Some(host) = &volume.host_path {
                    let writable = mount.read_only != Some(true);
                    assert_eq!(
                        writable,
                        host.path == "/var/lib/nodelens",
                        "{dir}: hostPath {} must be read-only unless it is the state dir",
                        host.path
                    );
                }
            }
        }
    }
    let gpu = daemonset("deploy/overlays/gpu").spec.unwrap().template.spec.unwrap();
    assert_eq!(gpu.runtime_class_name.as_deref(), Some("nvidia"));
    let env: Vec<_> = gpu.containers[0].env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect();
    assert!(env.contains(&("NVIDIA_DRIVER_CAPABILITIES".into(), "utility".into())));
    let es = daemonset("deploy/overlays/elasticsearch").spec.unwrap().template.spec.unwrap();
    let password = es.containers[0].env.iter().flatten().find(|e| e.name == "NODELENS_SINKS__ELASTICSEARCH__PASSWORD").unwrap();
    assert!(password.value.is_none() && password.value_from.as_ref().unwrap().secret_key_ref.is_some(), "the password comes from a Secret");
}

#[test]
fn rbac_is_exactly_get_list_watch_on_pods_and_namespaces() {
    let role = render("deploy/base").into_iter().find(|o| o["kind"] == "ClusterRole").unwrap();
    let role: ClusterRole = serde_json::from_value(role).unwrap();
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].api_groups.as_deref(), Some(&["".to_string()][..]));
    assert_eq!(rules[0].resources.as_deref(), Some(&["pods".to_string(), "namespaces".to_string()][..]));
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
}

#[test]
fn the_shipped_agent_config_passes_check_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_nodelens"))
        .args(["check-config", "--config"])
        .arg(root().join("deploy/base/config.yaml"))
        .env("NODE_NAME", "node-1")
        // The agent rejects unknown NODELENS_* variables; this one is the test's own switch.
        .env_remove("NODELENS_UPDATE_DEPLOY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("node_name: node-1"));
}

#[test]
fn only_the_monitoring_namespace_reaches_metrics_and_prometheus_keeps_the_workload_labels() {
    for dir in kustomizations() {
        let objects = render(dir);
        let policy: NetworkPolicy =
            serde_json::from_value(objects.iter().find(|o| o["kind"] == "NetworkPolicy").expect("a NetworkPolicy").clone()).unwrap();
        let spec = policy.spec.unwrap();
        let agent: DaemonSet = daemonset(dir);
        let pod_labels = agent.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        for (k, v) in spec.pod_selector.unwrap().match_labels.unwrap() {
            assert_eq!(pod_labels.get(&k), Some(&v), "{dir}: the policy selects the agent's pods");
        }
        assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_string()][..]), "{dir}: egress stays open");
        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 1, "{dir}");
        let from = ingress[0].from.as_ref().unwrap();
        let namespaces = from[0].namespace_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
        assert_eq!(namespaces.get("kubernetes.io/metadata.name").map(String::as_str), Some("monitoring"), "{dir}");
        assert!(from[0].pod_selector.is_none() && from.len() == 1, "{dir}: no other peer");
        let port = &ingress[0].ports.as_ref().unwrap()[0];
        assert_eq!(port.port, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())), "{dir}");

        let monitor = objects.iter().find(|o| o["kind"] == "ServiceMonitor").expect("a ServiceMonitor");
        let spec: Crd<ServiceMonitorSpec> = serde_json::from_value(monitor.clone()).unwrap();
        assert!(spec.spec.endpoints.iter().all(|e| e.honor_labels), "{dir}: honorLabels, or namespace/pod/container become exported_*");
    }
}
