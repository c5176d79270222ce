//! The kustomize manifests under deploy/: generated parts agree with their sources (rules/,
//! dashboards/; deploy/base and the Helm chart's files/), every kustomization renders, every
//! rendered object is a valid object of its kind (round-trips through its k8s-openapi type,
//! or a strict schema for the Prometheus operator's kinds), and the security policy holds.
//! The chart's renderings are tested by tests/e2e/helm.rs against the same checks.
//!
//! `NODELENS_UPDATE_DEPLOY=1 cargo test --test deploy` rewrites the generated files.

#[path = "manifests.rs"]
mod manifests;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use manifests::{
    agent_config, assert_certificates_in_use, assert_least_privilege, assert_one_agent_per_real_node, assert_rbac, assert_rule_tests_pass,
    assert_selectors_disjoint, assert_valid, chart_files, check_config, dashboard_config_maps, kustomize, of_kind, placement, pod,
    prometheus_rule, Crd, ServiceMonitorSpec,
};
use nodelens_testkit::views::root;

#[test]
fn generated_manifests_match_rules_and_dashboards() {
    let mut expected = vec![
        ("deploy/base/prometheusrule.yaml".to_string(), prometheus_rule()),
        ("deploy/base/dashboards.yaml".to_string(), dashboard_config_maps()),
    ];
    expected.extend(chart_files());
    let update = std::env::var_os("NODELENS_UPDATE_DEPLOY").is_some();
    let chart_dashboards = root().join("deploy/helm/nodelens/files/dashboards");
    for entry in std::fs::read_dir(&chart_dashboards).into_iter().flatten().flatten() {
        let path = format!("deploy/helm/nodelens/files/dashboards/{}", entry.file_name().to_string_lossy());
        if !expected.iter().any(|(p, _)| *p == path) {
            assert!(update, "{path} has no source in dashboards/grafana; run NODELENS_UPDATE_DEPLOY=1 cargo test --test deploy");
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    for (path, expected) in expected {
        let file = root().join(&path);
        if update {
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, &expected).unwrap();
        }
        let actual = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(actual == expected, "{path} drifted from its source; run NODELENS_UPDATE_DEPLOY=1 cargo test --test deploy");
    }
}

fn kustomizations() -> [&'static str; 3] {
    ["deploy/base", "deploy/overlays/gpu", "deploy/overlays/elasticsearch"]
}

fn daemonsets(dir: &str) -> Vec<DaemonSet> {
    of_kind(&kustomize(dir), "DaemonSet")
}

#[test]
fn every_rendered_object_is_valid_for_its_kind() {
    for dir in kustomizations() {
        let objects = kustomize(dir);
        assert!(objects.len() >= 10, "{dir}: {} objects", objects.len());
        assert_valid(dir, &objects);
    }
}

#[test]
fn the_daemonsets_run_with_least_privilege() {
    for dir in kustomizations() {
        let all = daemonsets(dir);
        assert!(!all.is_empty(), "{dir}");
        for ds in &all {
            assert_least_privilege(dir, ds);
        }
    }
    let es = daemonsets("deploy/overlays/elasticsearch");
    let password =
        pod(&es[0]).containers[0].env.clone().unwrap().into_iter().find(|e| e.name == "NODELENS_SINKS__ELASTICSEARCH__PASSWORD").unwrap();
    assert!(password.value.is_none() && password.value_from.as_ref().unwrap().secret_key_ref.is_some(), "the password comes from a Secret");
}

#[test]
fn the_base_runs_everywhere_and_the_gpu_overlay_gives_gpu_nodes_their_own_daemonset() {
    let base = daemonsets("deploy/base");
    assert_eq!(placement(&base), (vec!["nodelens".into()], vec!["nodelens".into()]), "the base: one agent on every node");
    assert!(pod(&base[0]).runtime_class_name.is_none(), "the base needs no runtime class");

    let gpu = daemonsets("deploy/overlays/gpu");
    assert_eq!(
        placement(&gpu),
        (vec!["nodelens".into()], vec!["nodelens-gpu".into()]),
        "exactly one agent per node: CPU-only nodes keep the base's, GPU nodes get nodelens-gpu"
    );
    assert_selectors_disjoint("deploy/overlays/gpu", &gpu);
    let on_gpu = pod(gpu.iter().find(|d| d.metadata.name.as_deref() == Some("nodelens-gpu")).unwrap());
    assert_eq!(on_gpu.runtime_class_name.as_deref(), Some("nvidia"));
    let env: Vec<_> = on_gpu.containers[0].env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect();
    assert!(env.contains(&("NVIDIA_DRIVER_CAPABILITIES".into(), "utility".into())), "{env:?}");
    let configs: Vec<_> =
        gpu.iter().map(|d| pod(d).volumes.unwrap().into_iter().find(|v| v.name == "config").unwrap().config_map).collect();
    assert_eq!(configs[0], configs[1], "both read the one generated config");
}

#[test]
fn rbac_reads_pods_namespaces_and_events_and_writes_only_the_events_lease_in_its_namespace() {
    for dir in kustomizations() {
        assert_rbac(dir, &kustomize(dir));
    }
}

#[test]
fn the_shipped_agent_config_passes_check_config_and_reads_only_the_certificates_in_use() {
    for dir in kustomizations() {
        let objects = kustomize(dir);
        let config = agent_config(&objects);
        for ds in of_kind::<DaemonSet>(&objects, "DaemonSet") {
            let effective = check_config(&config, &ds).unwrap_or_else(|e| panic!("{dir}: check-config: {e}"));
            assert_eq!(effective["node_name"].as_str(), Some("node-1"), "{dir}: node_name from NODE_NAME");
            assert_certificates_in_use(dir, &effective, &ds);
        }
    }
}

#[test]
fn only_the_monitoring_namespace_reaches_metrics_and_prometheus_keeps_the_workload_labels() {
    for dir in kustomizations() {
        let objects = kustomize(dir);
        let policies: Vec<NetworkPolicy> = of_kind(&objects, "NetworkPolicy");
        let spec = policies.first().expect("a NetworkPolicy").spec.clone().unwrap();
        for agent in daemonsets(dir) {
            let pod_labels = agent.spec.unwrap().template.metadata.unwrap().labels.unwrap();
            for (k, v) in spec.pod_selector.clone().unwrap().match_labels.unwrap() {
                assert_eq!(pod_labels.get(&k), Some(&v), "{dir}: the policy selects every agent's pods");
            }
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

#[test]
fn nodelens_agent_down_pages_for_every_node_the_overlays_run_an_agent_on() {
    for dir in kustomizations() {
        assert_rule_tests_pass(dir, &kustomize(dir), "agent-down-all-nodes.test.yaml");
    }
}

#[test]
fn every_kustomization_puts_one_agent_on_each_real_node_and_none_on_virtual_ones() {
    for dir in kustomizations() {
        assert_one_agent_per_real_node(dir, &daemonsets(dir));
    }
}

#[test]
fn every_namespace_an_applied_kustomization_creates_allows_privileged_pods() {
    for dir in kustomizations() {
        let namespaces: Vec<k8s_openapi::api::core::v1::Namespace> = of_kind(&kustomize(dir), "Namespace");
        assert!(!namespaces.is_empty(), "{dir}");
        for ns in namespaces {
            let labels = ns.metadata.labels.unwrap_or_default();
            assert_eq!(
                labels.get("pod-security.kubernetes.io/enforce").map(String::as_str),
                Some("privileged"),
                "{dir}: hostPID and hostPath pods are refused under baseline"
            );
        }
    }
}
