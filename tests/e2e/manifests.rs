//! What the kustomize renderings (tests/e2e/deploy.rs) and the Helm chart's
//! (tests/e2e/helm.rs) must both satisfy: every object valid for its kind, the security
//! policy, the GPU/non-GPU split of the DaemonSets, the certificate globs and mounts, and an
//! agent config that `nodelens check-config` accepts. Also the generated files both ship.

// Shared by two test binaries; each uses its part.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodSpec, ResourceQuota, Service, ServiceAccount, Taint};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use nodelens_testkit::views::{files, root};
use serde::Deserialize;
use serde_json::Value;

/// The label GPU nodes carry (the NVIDIA GPU operator's) in both deployments' defaults.
pub const GPU_LABEL: (&str, &str) = ("nvidia.com/gpu.present", "true");

const GENERATED: &str =
    "# Generated from {source} by tests/e2e/deploy.rs; do not edit.\n# NODELENS_UPDATE_DEPLOY=1 cargo test --test deploy rewrites it.\n";

/// The rule groups of every `rules/*.rules.yaml`, in file order.
pub fn rule_groups() -> Vec<serde_yaml_ng::Value> {
    let mut groups = Vec::new();
    for file in files("rules", ".rules.yaml") {
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        groups.extend(doc["groups"].as_sequence().unwrap().iter().cloned());
    }
    groups
}

/// The annotations of rules/ that are paths in Grafana (`dashboard_url`) and Kibana
/// (`logs_url`): links only with the address users' browsers reach those at.
pub const LINK_ANNOTATIONS: [&str; 2] = ["dashboard_url", "logs_url"];

/// [`rule_groups`] without [`LINK_ANNOTATIONS`]: what ships where no Grafana or Kibana address
/// is known (the kustomize base, the chart without `links`).
pub fn rule_groups_without_links() -> Vec<serde_yaml_ng::Value> {
    let mut groups = rule_groups();
    for group in &mut groups {
        for rule in group["rules"].as_sequence_mut().unwrap() {
            if let Some(annotations) = rule.get_mut("annotations").and_then(|a| a.as_mapping_mut()) {
                for key in LINK_ANNOTATIONS {
                    annotations.remove(key);
                }
            }
        }
    }
    groups
}

/// deploy/base/prometheusrule.yaml.
pub fn prometheus_rule() -> String {
    let object = serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "nodelens", "labels": {"app.kubernetes.io/name": "nodelens"}},
        "spec": {"groups": rule_groups_without_links()},
    });
    GENERATED.replace("{source}", "rules/*.rules.yaml") + &serde_yaml_ng::to_string(&object).unwrap()
}

/// deploy/base/dashboards.yaml.
pub fn dashboard_config_maps() -> String {
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

/// The chart's copies: `files/prometheus-rules.yaml` (the groups) and `files/dashboards/*.json`
/// (the dashboards verbatim), as (path under the repository, content).
pub fn chart_files() -> Vec<(String, String)> {
    let groups = serde_json::json!({"groups": rule_groups()});
    let mut out = vec![(
        "deploy/helm/nodelens/files/prometheus-rules.yaml".to_string(),
        GENERATED.replace("{source}", "rules/*.rules.yaml") + &serde_yaml_ng::to_string(&groups).unwrap(),
    )];
    for file in files("dashboards/grafana", ".json") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        out.push((format!("deploy/helm/nodelens/files/dashboards/{name}"), std::fs::read_to_string(&file).unwrap()));
    }
    out
}

/// A multi-document YAML text as JSON objects (empty documents skipped).
pub fn objects(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| serde_json::to_value(serde_yaml_ng::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|o| !o.is_null())
        .collect()
}

/// Deserializes into `T` and back; a field `T` does not know (a typo) is lost and fails.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) {
    let typed: T =
        serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{} {}: {e}", object["kind"], object["metadata"]["name"]));
    let back = serde_json::to_value(typed).unwrap();
    assert_eq!(&back, object, "{} {} loses fields in a round trip (misspelled key?)", object["kind"], object["metadata"]["name"]);
}

/// A Prometheus operator object: typed metadata, a strict spec.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct Crd<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pub spec: S,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct ServiceMonitorSpec {
    pub selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct Endpoint {
    pub port: String,
    pub path: String,
    pub interval: String,
    pub honor_labels: bool,
    pub relabelings: Vec<Relabeling>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct Relabeling {
    pub source_labels: Vec<String>,
    pub target_label: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct RuleSpec {
    pub groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct RuleGroup {
    pub name: String,
    pub rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct Rule {
    pub alert: Option<String>,
    pub record: Option<String>,
    pub expr: String,
    #[serde(rename = "for")]
    pub for_: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Every object is a valid object of its kind.
pub fn assert_valid(what: &str, objects: &[Value]) {
    for object in objects {
        match object["kind"].as_str().unwrap() {
            "Namespace" => round_trip::<Namespace>(object),
            "ServiceAccount" => round_trip::<ServiceAccount>(object),
            "ClusterRole" => round_trip::<ClusterRole>(object),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(object),
            "Role" => round_trip::<Role>(object),
            "RoleBinding" => round_trip::<RoleBinding>(object),
            "ConfigMap" => round_trip::<ConfigMap>(object),
            "DaemonSet" => round_trip::<DaemonSet>(object),
            "Service" => round_trip::<Service>(object),
            "ResourceQuota" => round_trip::<ResourceQuota>(object),
            "NetworkPolicy" => round_trip::<NetworkPolicy>(object),
            "ServiceMonitor" => drop(serde_json::from_value::<Crd<ServiceMonitorSpec>>(object.clone()).expect("ServiceMonitor schema")),
            "PrometheusRule" => drop(serde_json::from_value::<Crd<RuleSpec>>(object.clone()).expect("PrometheusRule schema")),
            other => panic!("{what}: unexpected kind {other}"),
        }
    }
}

/// The objects of one kind, typed.
pub fn of_kind<T: serde::de::DeserializeOwned>(objects: &[Value], kind: &str) -> Vec<T> {
    objects.iter().filter(|o| o["kind"] == kind).map(|o| serde_json::from_value(o.clone()).unwrap()).collect()
}

/// The pod spec of a DaemonSet.
pub fn pod(ds: &DaemonSet) -> PodSpec {
    ds.spec.clone().unwrap().template.spec.unwrap()
}

/// The agent's pods: least privilege, read-only root, one writable hostPath (the state
/// directory), probes, a memory limit, `NODE_NAME` and `POD_UID` from the downward API.
pub fn assert_least_privilege(what: &str, ds: &DaemonSet) {
    let name = ds.metadata.name.clone().unwrap_or_default();
    let what = format!("{what} {name}");
    let pod = pod(ds);
    assert_eq!(pod.host_pid, Some(true), "{what}: hostPID for process attribution");
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"), "{what}");
    assert!(
        pod.tolerations.unwrap().iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "{what}: runs on tainted nodes"
    );
    assert_ne!(pod.host_network, Some(true), "{what}: no host network");
    let volumes = pod.volumes.unwrap();
    let mut writable = Vec::new();
    for c in &pod.containers {
        let sc = c.security_context.as_ref().unwrap();
        assert_ne!(sc.privileged, Some(true), "{what}: not privileged");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{what}");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{what}");
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]), "{what}");
        // One capability may be added: CAP_SYSLOG, for /dev/kmsg under kernel.dmesg_restrict,
        // and only beside the kmsg mount it is for.
        let kmsg = c.volume_mounts.iter().flatten().any(|m| m.mount_path == "/dev/kmsg" && m.read_only == Some(true));
        let added = caps.add.clone().unwrap_or_default();
        assert!(added.is_empty() || (kmsg && added == ["SYSLOG"]), "{what}: no capability added but SYSLOG for /dev/kmsg: {added:?}");
        for (var, field) in [("NODE_NAME", "spec.nodeName"), ("POD_UID", "metadata.uid")] {
            let env = c.env.iter().flatten().find(|e| e.name == var).unwrap_or_else(|| panic!("{what}: {var} is set"));
            let from = env.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
            assert_eq!(from, Some(field), "{what}: {var} from the downward API");
        }
        assert_eq!(c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/healthz"), "{what}");
        assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"), "{what}");
        assert!(c.resources.as_ref().unwrap().limits.as_ref().unwrap().contains_key("memory"), "{what}: a memory limit");
        for mount in c.volume_mounts.iter().flatten() {
            let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
            if let Some(host) = &volume.host_path {
                if mount.read_only != Some(true) {
                    writable.push(host.path.clone());
                }
            }
        }
    }
    assert_eq!(writable, ["/var/lib/nodelens"], "{what}: the state directory is the only writable hostPath");

    // seccomp RuntimeDefault for every container, init containers included (the pod's, unless
    // a container sets its own).
    let pod_profile = pod.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref()).map(|p| p.type_.clone());
    assert_eq!(pod_profile.as_deref(), Some("RuntimeDefault"), "{what}: the pod's seccomp profile");
    for c in pod.containers.iter().chain(pod.init_containers.iter().flatten()) {
        let own = c.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref()).map(|p| p.type_.clone());
        assert_eq!(own.or(pod_profile.clone()).as_deref(), Some("RuntimeDefault"), "{what}: container {}", c.name);
    }
    // Nothing is created on the host but the state directory: every other hostPath must exist.
    for volume in &volumes {
        let Some(host) = &volume.host_path else { continue };
        let expected = match host.path.as_str() {
            "/var/lib/nodelens" => "DirectoryOrCreate",
            "/dev/kmsg" => "CharDevice",
            _ => "Directory",
        };
        assert_eq!(host.type_.as_deref(), Some(expected), "{what}: hostPath {}", host.path);
    }
    // A DaemonSet that runs on workers mounts nothing at or under /etc/kubernetes (it exists on
    // control-plane nodes only; the runtime would create it, or the pod would not start).
    if [Node::Cpu, Node::Gpu].iter().any(|n| runs_on(ds, *n)) {
        for volume in &volumes {
            if let Some(host) = &volume.host_path {
                assert!(!Path::new(&host.path).starts_with("/etc/kubernetes"), "{what}: runs on workers and mounts {}", host.path);
            }
        }
    }
}

/// The nodes the placement tests put DaemonSets on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Node {
    /// A Linux worker without GPUs.
    Cpu,
    /// A GPU worker, labelled as the NVIDIA GPU operator labels them, tainted for GPU pods only.
    Gpu,
    /// A kubeadm control-plane node with its NoSchedule taint.
    ControlPlane,
    /// A virtual-kubelet node (Azure ACI, Alibaba ECI): its label and provider taint.
    Virtual,
    /// A Windows node.
    Windows,
    /// An EKS Fargate node: its compute-type label and taint.
    Fargate,
}

pub const NODES: [Node; 6] = [Node::Cpu, Node::Gpu, Node::ControlPlane, Node::Virtual, Node::Windows, Node::Fargate];

impl Node {
    /// The node's labels (plus `extra`) and taints.
    pub fn with(self, extra: &[(&str, &str)]) -> (BTreeMap<String, String>, Vec<Taint>) {
        let taint =
            |key: &str, value: &str| Taint { key: key.into(), value: Some(value.into()), effect: "NoSchedule".into(), ..Taint::default() };
        let os = if self == Node::Windows { "windows" } else { "linux" };
        let mut labels = BTreeMap::from([("kubernetes.io/os".to_string(), os.to_string())]);
        let mut taints = Vec::new();
        match self {
            Node::Cpu | Node::Windows => {}
            Node::Gpu => {
                labels.insert(GPU_LABEL.0.into(), GPU_LABEL.1.into());
                taints.push(taint("nvidia.com/gpu", "present"));
            }
            Node::ControlPlane => {
                labels.insert("node-role.kubernetes.io/control-plane".into(), String::new());
                taints.push(taint("node-role.kubernetes.io/control-plane", ""));
            }
            Node::Virtual => {
                labels.insert("type".into(), "virtual-kubelet".into());
                labels.insert("kubernetes.io/role".into(), "agent".into());
                taints.push(taint("virtual-kubelet.io/provider", "azure"));
            }
            Node::Fargate => {
                labels.insert("eks.amazonaws.com/compute-type".into(), "fargate".into());
                taints.push(Taint {
                    key: "eks.amazonaws.com/compute-type".into(),
                    value: Some("fargate".into()),
                    effect: "NoSchedule".into(),
                    ..Taint::default()
                });
            }
        }
        labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        (labels, taints)
    }
}

/// Whether the pod tolerates every NoSchedule/NoExecute taint of a node.
pub fn tolerates(pod: &PodSpec, taints: &[Taint]) -> bool {
    taints.iter().all(|t| {
        pod.tolerations.iter().flatten().any(|tol| {
            let effect_ok = tol.effect.as_deref().is_none_or(|e| e.is_empty() || e == t.effect);
            let key_ok = tol.key.as_deref().is_none_or(|k| k.is_empty()) || tol.key.as_deref() == Some(t.key.as_str());
            let value_ok = match tol.operator.as_deref() {
                Some("Exists") => true,
                _ => tol.value.as_deref().unwrap_or_default() == t.value.as_deref().unwrap_or_default(),
            };
            effect_ok && key_ok && value_ok && (tol.operator.as_deref() == Some("Exists") || tol.key.is_some())
        })
    })
}

/// Whether the DaemonSet controller runs a pod of `ds` on a node with these labels and taints.
pub fn runs_on_node(ds: &DaemonSet, labels: &BTreeMap<String, String>, taints: &[Taint]) -> bool {
    let pod = pod(ds);
    schedules_on(&pod, labels) && tolerates(&pod, taints)
}

pub fn runs_on(ds: &DaemonSet, node: Node) -> bool {
    let (labels, taints) = node.with(&[]);
    runs_on_node(ds, &labels, &taints)
}

/// Which DaemonSets run a pod on each kind of node.
pub fn placement_on(daemonsets: &[DaemonSet], extra: &[(&str, &str)]) -> BTreeMap<Node, Vec<String>> {
    NODES
        .iter()
        .map(|node| {
            let (labels, taints) = node.with(extra);
            let names =
                daemonsets.iter().filter(|ds| runs_on_node(ds, &labels, &taints)).map(|ds| ds.metadata.name.clone().unwrap()).collect();
            (*node, names)
        })
        .collect()
}

/// Exactly one agent on a CPU, a GPU and a tainted control-plane node; none on a virtual,
/// Windows or EKS Fargate node.
pub fn assert_one_agent_per_real_node(what: &str, daemonsets: &[DaemonSet]) {
    let on = placement_on(daemonsets, &[]);
    for node in [Node::Cpu, Node::Gpu, Node::ControlPlane] {
        assert_eq!(on[&node].len(), 1, "{what}: {node:?} runs exactly one agent: {on:?}");
    }
    for node in [Node::Virtual, Node::Windows, Node::Fargate] {
        assert!(on[&node].is_empty(), "{what}: {node:?} runs no agent: {on:?}");
    }
}

/// Whether a NetworkPolicy lets a pod in a namespace with these labels reach `port` (a
/// named port) of the pods it selects.
pub fn admits(policy: &NetworkPolicy, namespace_labels: &BTreeMap<String, String>, port: &str) -> bool {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let spec = policy.spec.clone().unwrap();
    spec.ingress.iter().flatten().any(|rule| {
        let port_ok = rule.ports.as_ref().is_none_or(|ports| ports.iter().any(|p| p.port == Some(IntOrString::String(port.into()))));
        let peer_ok = rule.from.as_ref().is_none_or(|from| {
            from.iter().any(|peer| {
                assert!(peer.pod_selector.is_none() && peer.ip_block.is_none(), "namespace peers only");
                peer.namespace_selector.as_ref().is_some_and(|sel| {
                    let labels_ok = sel.match_labels.iter().flatten().all(|(k, v)| namespace_labels.get(k) == Some(v));
                    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
                        let values = e.values.clone().unwrap_or_default();
                        let value = namespace_labels.get(&e.key);
                        match e.operator.as_str() {
                            "In" => value.is_some_and(|v| values.contains(v)),
                            "NotIn" => value.is_none_or(|v| !values.contains(v)),
                            "Exists" => value.is_some(),
                            "DoesNotExist" => value.is_none(),
                            other => panic!("operator {other}"),
                        }
                    });
                    labels_ok && exprs_ok
                })
            })
        });
        port_ok && peer_ok
    })
}

/// A namespace's labels as the API server sets them (kubernetes.io/metadata.name) plus `extra`.
pub fn namespace_labels(name: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.to_string())]);
    labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    labels
}

/// The agent's RBAC, nothing more: get, list and watch on pods and namespaces cluster-wide;
/// where the agent config turns Kubernetes Events on, list and watch on events, and a Role
/// (not a ClusterRole) bound to the agent in its own namespace that creates Leases and gets
/// and updates only the one the config names.
pub fn assert_rbac(what: &str, objects: &[Value]) {
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&agent_config(objects)).unwrap();
    let events = &config["kubernetes"]["events"];
    let enabled = events["enabled"].as_bool().unwrap_or(false);
    let roles: Vec<ClusterRole> = of_kind(objects, "ClusterRole");
    assert_eq!(roles.len(), 1, "{what}: one ClusterRole");
    let rules = roles[0].rules.clone().unwrap();
    assert_eq!(rules.len(), if enabled { 2 } else { 1 }, "{what}");
    assert_eq!(rules[0].api_groups.as_deref(), Some(&["".to_string()][..]), "{what}");
    assert_eq!(rules[0].resources.as_deref(), Some(&["pods".to_string(), "namespaces".to_string()][..]), "{what}");
    assert_eq!(rules[0].verbs, ["get", "list", "watch"], "{what}");
    let roles: Vec<Role> = of_kind(objects, "Role");
    if !enabled {
        assert!(roles.is_empty(), "{what}: no namespaced Role without Events");
        return;
    }
    assert_eq!(rules[1].api_groups.as_deref(), Some(&["".to_string()][..]), "{what}");
    assert_eq!(rules[1].resources.as_deref(), Some(&["events".to_string()][..]), "{what}");
    assert_eq!(rules[1].verbs, ["list", "watch"], "{what}: Events are read, never written");
    assert_eq!(roles.len(), 1, "{what}: one Role, for the Events Lease");
    let role = &roles[0];
    let lease = events["lease_name"].as_str().unwrap_or("nodelens-events").to_string();
    let rules = role.rules.clone().unwrap();
    let leases = Some(vec!["leases".to_string()]);
    assert!(rules.iter().all(|r| r.api_groups == Some(vec!["coordination.k8s.io".into()]) && r.resources == leases), "{what}: {rules:?}");
    let create: Vec<_> = rules.iter().filter(|r| r.verbs.contains(&"create".to_string())).collect();
    assert_eq!(create.len(), 1, "{what}");
    assert_eq!(create[0].verbs, ["create"], "{what}: create cannot be limited to a name, so it stands alone");
    let named: Vec<_> = rules.iter().filter(|r| r.resource_names.is_some()).collect();
    assert_eq!(named.len(), 1, "{what}");
    assert_eq!(named[0].resource_names, Some(vec![lease]), "{what}: only the config's Lease");
    assert_eq!(named[0].verbs, ["get", "update"], "{what}");
    assert_eq!(rules.len(), 2, "{what}");
    let bindings: Vec<RoleBinding> = of_kind(objects, "RoleBinding");
    assert_eq!(bindings.len(), 1, "{what}");
    assert_eq!((bindings[0].role_ref.kind.as_str(), &bindings[0].role_ref.name), ("Role", role.metadata.name.as_ref().unwrap()), "{what}");
    let accounts: Vec<ServiceAccount> = of_kind(objects, "ServiceAccount");
    let subjects = bindings[0].subjects.clone().unwrap();
    assert_eq!(subjects.len(), 1, "{what}");
    assert_eq!(
        (subjects[0].kind.as_str(), subjects[0].name.as_str()),
        ("ServiceAccount", accounts[0].metadata.name.as_deref().unwrap()),
        "{what}"
    );
    assert_eq!(role.metadata.namespace, accounts[0].metadata.namespace, "{what}: the Role is in the agent's namespace");
    assert_eq!(subjects[0].namespace, accounts[0].metadata.namespace, "{what}");
}

/// Whether the scheduler may place `pod` on a node with `labels` (nodeSelector and the
/// required node affinity; In, NotIn, Exists, DoesNotExist).
pub fn schedules_on(pod: &PodSpec, labels: &BTreeMap<String, String>) -> bool {
    let selector_ok = pod.node_selector.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let required = pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| n.required_during_scheduling_ignored_during_execution.as_ref());
    let affinity_ok = required.is_none_or(|r| {
        r.node_selector_terms.iter().any(|term| {
            term.match_expressions.iter().flatten().all(|e| {
                let values = e.values.clone().unwrap_or_default();
                let value = labels.get(&e.key);
                match e.operator.as_str() {
                    "In" => value.is_some_and(|v| values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    other => panic!("operator {other}"),
                }
            })
        })
    });
    selector_ok && affinity_ok
}

/// On a CPU-only node and on a GPU node: which DaemonSets run there. Every DaemonSet that
/// asks for the NVIDIA runtime class runs on GPU nodes only.
pub fn placement(daemonsets: &[DaemonSet]) -> (Vec<String>, Vec<String>) {
    let cpu_node = BTreeMap::from([("kubernetes.io/os".to_string(), "linux".to_string())]);
    let mut gpu_node = cpu_node.clone();
    gpu_node.insert(GPU_LABEL.0.into(), GPU_LABEL.1.into());
    let on = |node: &BTreeMap<String, String>| {
        daemonsets.iter().filter(|ds| schedules_on(&pod(ds), node)).map(|ds| ds.metadata.name.clone().unwrap()).collect::<Vec<_>>()
    };
    for ds in daemonsets {
        if pod(ds).runtime_class_name.is_some() {
            assert!(!schedules_on(&pod(ds), &cpu_node), "{:?} needs the NVIDIA runtime class but runs on CPU-only nodes", ds.metadata.name);
        }
    }
    (on(&cpu_node), on(&gpu_node))
}

/// No two DaemonSets claim each other's pods.
pub fn assert_selectors_disjoint(what: &str, daemonsets: &[DaemonSet]) {
    for a in daemonsets {
        for b in daemonsets {
            if a.metadata.name == b.metadata.name {
                continue;
            }
            let selector = a.spec.as_ref().unwrap().selector.match_labels.clone().unwrap();
            let labels = b.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.clone().unwrap();
            assert!(
                !selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
                "{what}: {:?}'s selector matches {:?}'s pods",
                a.metadata.name,
                b.metadata.name
            );
        }
    }
}

/// The agent's config file in a rendering (the ConfigMap holding `config.yaml`).
pub fn agent_config(objects: &[Value]) -> String {
    let maps: Vec<ConfigMap> = of_kind(objects, "ConfigMap");
    let found: Vec<String> = maps.iter().filter_map(|m| m.data.as_ref()?.get("config.yaml").cloned()).collect();
    assert_eq!(found.len(), 1, "one agent config");
    found[0].clone()
}

/// `nodelens check-config` on `config` with the DaemonSet's `NODELENS_*` variables (a
/// Secret's value stands in as `secret`): the effective config, or the agent's complaint.
pub fn check_config(config: &str, ds: &DaemonSet) -> Result<serde_yaml_ng::Value, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, config).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_nodelens"));
    command.args(["check-config", "--config"]).arg(&file).env("NODE_NAME", "node-1");
    // The agent rejects unknown NODELENS_* variables; the tests' own switches are not its.
    for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("NODELENS_")) {
        command.env_remove(var);
    }
    for env in pod(ds).containers[0].env.iter().flatten().filter(|e| e.name.starts_with("NODELENS_")) {
        command.env(&env.name, env.value.clone().unwrap_or_else(|| "secret".into()));
    }
    // The downward API's values (the Events election's POD_NAME and POD_NAMESPACE).
    for env in pod(ds).containers[0].env.iter().flatten() {
        let field = env.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
        match field {
            Some("metadata.name") => command.env(&env.name, "nodelens-x7k2p"),
            Some("metadata.namespace") => command.env(&env.name, "nodelens"),
            _ => &mut command,
        };
    }
    let out = command.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_yaml_ng::from_slice(&out.stdout).unwrap_or_else(|e| panic!("check-config prints YAML: {e}")))
}

/// A kubelet and kubeadm node's certificate files under `host` (the root of a fake node).
/// Returns (the certificates in use, the files that must never be read).
fn fake_node_certificates(host: &Path) -> (Vec<String>, Vec<String>) {
    let write = |path: &str| {
        let file = host.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n").unwrap();
    };
    let in_use = [
        "/etc/kubernetes/pki/apiserver.crt",
        "/etc/kubernetes/pki/ca.crt",
        "/etc/kubernetes/pki/etcd/server.crt",
        "/var/lib/kubelet/pki/kubelet-client-current.pem",
        "/var/lib/kubelet/pki/kubelet-server-current.pem",
        "/var/lib/kubelet/pki/kubelet.crt",
    ];
    let never = [
        // Rotated away: on disk, not used, expired a year later.
        "/var/lib/kubelet/pki/kubelet-client-2023-01-02-03-04-05.pem",
        "/var/lib/kubelet/pki/kubelet-server-2023-01-02-03-04-05.pem",
        "/var/lib/kubelet/pki/kubelet.key",
        "/etc/kubernetes/pki/ca.key",
        "/etc/kubernetes/admin.conf",
        "/etc/kubernetes/super-admin.conf",
        "/etc/kubernetes/tmp/kubeadm-backup-certs-2024/apiserver.crt",
    ];
    for path in in_use.iter().chain(&never) {
        if !path.ends_with("-current.pem") {
            write(path);
        }
    }
    // The kubelet's links point at the newest rotated file, absolutely.
    for kind in ["client", "server"] {
        let target = format!("/var/lib/kubelet/pki/kubelet-{kind}-2025-06-07-08-09-10.pem");
        write(&target);
        let link = host.join(format!("var/lib/kubelet/pki/kubelet-{kind}-current.pem"));
        std::os::unix::fs::symlink(host.join(target.trim_start_matches('/')), link).unwrap();
    }
    (in_use.map(String::from).to_vec(), never.map(String::from).to_vec())
}

/// The config's `certificates.paths` read the certificates in use on a kubeadm node — the
/// kubelet's `*-current.pem` links, not the rotated files behind them — and nothing else;
/// and every path they can match is mounted into the DaemonSet at its host path, while the
/// rest of /etc/kubernetes (admin.conf) is not.
pub fn assert_certificates_in_use(what: &str, config: &serde_yaml_ng::Value, ds: &DaemonSet) {
    let globs: Vec<String> =
        config["certificates"]["paths"].as_sequence().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    assert!(!globs.is_empty(), "{what}: certificates are checked");
    let host = tempfile::tempdir().unwrap();
    let (in_use, never) = fake_node_certificates(host.path());
    // The agent sees only what its DaemonSet mounts: the control-plane certificates where the
    // config reads them and the DaemonSet (the control-plane nodes' one) mounts them.
    let host_dirs: Vec<String> = pod(ds).volumes.iter().flatten().filter_map(|v| Some(v.host_path.as_ref()?.path.clone())).collect();
    let visible = |path: &str| host_dirs.iter().any(|dir| Path::new(path).starts_with(dir));
    let rooted: Vec<String> = globs.iter().map(|g| format!("{}{g}", host.path().display())).collect();
    let matched: Vec<String> = nodelens::certs::matching_files(&rooted)
        .iter()
        .map(|p| p.to_string_lossy().trim_start_matches(&*host.path().to_string_lossy()).to_string())
        .filter(|p| visible(p) || !p.starts_with("/etc/kubernetes"))
        .collect();
    let control_plane = globs.iter().any(|g| g.starts_with("/etc/kubernetes")) && visible("/etc/kubernetes/pki/ca.crt");
    let in_use: Vec<String> = in_use.into_iter().filter(|p| control_plane || !p.starts_with("/etc/kubernetes")).collect();
    let mut expected = in_use.clone();
    expected.sort();
    assert_eq!(matched, expected, "{what}: the certificates in use, nothing rotated, no key, no kubeconfig ({globs:?})");
    for path in &never {
        assert!(!matched.contains(path), "{what}: reads {path}");
    }

    let pod = pod(ds);
    let volumes = pod.volumes.clone().unwrap();
    let mounts: Vec<(String, String)> = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let host = volumes.iter().find(|v| v.name == m.name)?.host_path.as_ref()?;
            Some((host.path.clone(), m.mount_path.clone()))
        })
        .collect();
    for path in &in_use {
        let mount = mounts.iter().find(|(host, _)| Path::new(path).starts_with(host));
        let (host, inside) = mount.unwrap_or_else(|| panic!("{what}: {path} is not mounted"));
        assert_eq!(host, inside, "{what}: {host} is mounted at its host path, so absolute symlinks resolve");
    }
    for path in ["/etc/kubernetes/admin.conf", "/etc/kubernetes/super-admin.conf", "/etc/kubernetes/controller-manager.conf"] {
        assert!(!mounts.iter().any(|(host, _)| Path::new(path).starts_with(host)), "{what}: {path} is mounted");
    }
}

/// `kubectl kustomize <dir>` as objects.
pub fn kustomize(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join(dir))
        .output()
        .expect("kubectl is installed (tests/run-all.sh installs it)");
    assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
    objects(&String::from_utf8(out.stdout).unwrap())
}

/// Every promtool CI runs the rule tests with: Debian's 2.x on PATH, and Prometheus 3's from
/// `PROMTOOL3_FOR_TESTS` (tests/run-all.sh fetches it; range selectors differ at their left edge).
pub fn promtools() -> Vec<String> {
    let mut tools = vec!["promtool".to_string()];
    tools.extend(std::env::var("PROMTOOL3_FOR_TESTS").ok().filter(|p| !p.is_empty()));
    tools
}

/// `promtool test rules` of `tests/e2e/data/rules/<test>` against the PrometheusRule in a
/// rendering (written as `rules.yaml` beside a copy of the test), under every promtool.
pub fn assert_rule_tests_pass(what: &str, objects: &[Value], test: &str) {
    let rules: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "PrometheusRule").collect();
    assert_eq!(rules.len(), 1, "{what}: one PrometheusRule");
    let dir = tempfile::tempdir().unwrap();
    let groups = serde_json::json!({"groups": rules[0]["spec"]["groups"]});
    std::fs::write(dir.path().join("rules.yaml"), serde_yaml_ng::to_string(&groups).unwrap()).unwrap();
    std::fs::copy(root().join("tests/e2e/data/rules").join(test), dir.path().join(test)).unwrap();
    for tool in promtools() {
        let out = Command::new(&tool)
            .args(["test", "rules", test])
            .current_dir(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e} (tests/run-all.sh installs promtool)"));
        assert!(
            out.status.success(),
            "{what}: {tool} test rules {test}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
