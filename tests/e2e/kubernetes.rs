//! End to end: the real `nodelens` binary watches a fake API server that speaks the
//! Kubernetes list/watch protocol, and enriches the records a simulated kubelet writes with
//! each pod's application, user, workload and labels, through label changes, deletions, 410
//! Gone relists and dropped connections.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodelens_testkit::agent::{metric_sum, Agent};
use nodelens_testkit::kubelet::ContainerLog;
use nodelens_testkit::kubernetes::{namespace, pod, FakeApiServer};
use serde_json::{json, Value};

const NODE: &str = "gpu-node-1";
const WAIT: Duration = Duration::from_secs(20);

struct Cluster {
    dir: tempfile::TempDir,
    api: FakeApiServer,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pods")).unwrap();
        Cluster { dir, api: FakeApiServer::start() }
    }

    fn start(&self, kubernetes_extra: &str) -> Agent {
        self.start_with("", kubernetes_extra)
    }

    fn start_with(&self, logs_extra: &str, kubernetes_extra: &str) -> Agent {
        self.start_full("", logs_extra, kubernetes_extra)
    }

    fn start_full(&self, top_extra: &str, logs_extra: &str, kubernetes_extra: &str) -> Agent {
        let kubeconfig = self.dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, self.api.kubeconfig()).unwrap();
        let config = self.dir.path().join("nodelens.yaml");
        let text = format!(
            "node_name: {NODE}\n{top_extra}state_dir: {state}\nlogs:\n  pods_dir: {pods}\n  rescan_interval: 500ms\n{logs_extra}kubernetes:\n  enabled: true\n  kubeconfig: {kc}\n{kubernetes_extra}metrics:\n  listen: 127.0.0.1:0\n",
            state = self.dir.path().join("state").display(),
            pods = self.pods().display(),
            kc = kubeconfig.display(),
        );
        std::fs::write(&config, text).unwrap();
        Agent::start(Path::new(env!("CARGO_BIN_EXE_nodelens")), &config, &[])
    }

    fn pods(&self) -> PathBuf {
        self.dir.path().join("pods")
    }

    fn log(&self, ns: &str, pod: &str, uid: &str, container: &str) -> ContainerLog {
        ContainerLog::create(&self.pods(), ns, pod, uid, container, 0).unwrap()
    }
}

fn doc_with<'a>(docs: &'a [Value], message: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["message"] == message)
}

fn wait_metric(agent: &Agent, what: &str, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check(&agent.get("/metrics").1) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}:\n{}\nlog:\n{}", agent.get("/metrics").1, agent.log());
}

/// Waits until the agent says it tails a container of `pod`.
fn wait_tailing(agent: &Agent, pod: &str) {
    let deadline = Instant::now() + WAIT;
    let pod = format!("pod={pod}");
    while !agent.log().lines().any(|l| l.contains("tailing container") && l.split_whitespace().any(|w| w == pod)) {
        assert!(Instant::now() < deadline, "{pod} tailed: {}", agent.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn records_carry_application_user_workload_and_labels_from_one_node_scoped_watch() {
    let c = Cluster::new();
    let mut trainer = pod(
        "ml",
        "resnet-7d9f8b6c5d-x2k4p",
        "uid-trainer",
        NODE,
        json!({"app.kubernetes.io/name": "resnet", "user": "alice", "pod-template-hash": "7d9f8b6c5d"}),
        &["trainer"],
    );
    trainer["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "resnet-7d9f8b6c5d", "uid": "rs-1", "controller": true}]);
    c.api.apply(trainer);
    c.api.apply(pod("ml", "elsewhere", "uid-elsewhere", "other-node", json!({"app": "x"}), &["c"]));
    let mut log = c.log("ml", "resnet-7d9f8b6c5d-x2k4p", "uid-trainer", "trainer");
    log.write_cri("stderr", "ERROR: CUDA out of memory").unwrap();
    log.write_cri("stdout", r#"{"level":"info","msg":"step=10 loss=0.5"}"#).unwrap();
    let agent = c.start("");
    agent.wait_for(WAIT, "two records", |d| d.len() >= 2);
    let docs = agent.docs();
    let err = doc_with(&docs, "ERROR: CUDA out of memory").unwrap();
    assert_eq!(err["service"]["name"], "resnet");
    assert_eq!(err["user"]["name"], "alice");
    assert_eq!(err["kubernetes"]["deployment"]["name"], "resnet");
    assert_eq!(err["kubernetes"]["labels"]["app_kubernetes_io/name"], "resnet");
    assert_eq!(err["kubernetes"]["pod"]["ip"], "10.42.0.17");
    assert_eq!(err["container"]["image"]["name"], "registry.example/trainer:1.0");
    assert_eq!(err["container"]["id"], "ab".repeat(32));
    assert_eq!(err["container"]["runtime"], "containerd");
    assert_eq!(err["log"]["level"], "error");
    // A JSON line's `msg` is its message (`logs.json: auto`).
    assert_eq!(doc_with(&docs, "step=10 loss=0.5").unwrap()["log"]["level"], "info");

    let (_, body) = agent.get("/metrics");
    let info = [
        r#"namespace="ml""#,
        r#"pod="resnet-7d9f8b6c5d-x2k4p""#,
        r#"app="resnet""#,
        r#"user="alice""#,
        r#"workload_kind="deployment""#,
        r#"workload="resnet""#,
    ];
    assert_eq!(metric_sum(&body, "nodelens_pod_info", &info), 1.0, "{body}");
    assert_eq!(metric_sum(&body, "nodelens_pod_info", &[]), 1.0, "only pods of this node");
    assert_eq!(metric_sum(&body, "nodelens_log_records_total", &[r#"app="resnet""#, r#"level="error""#]), 1.0);
    agent.terminate();

    let requests = c.api.requests();
    let pod_requests: Vec<&String> = requests.iter().filter(|r| r.contains("/pods")).collect();
    assert!(!pod_requests.is_empty());
    for r in &pod_requests {
        assert!(
            r.starts_with("GET /api/v1/pods?") && r.contains(&format!("spec.nodeName%3D{NODE}")),
            "every pod request is node-scoped: {r}"
        );
    }
    assert!(requests.iter().all(|r| !r.contains("/namespaces/")), "never a GET per pod: {requests:?}");
    assert!(requests.iter().any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")), "it watches, with bookmarks");
}

#[test]
fn pods_known_late_or_never_and_pods_deleted_while_logging() {
    let c = Cluster::new();
    let mut late = c.log("ml", "late", "uid-late", "main");
    let mut ghost = c.log("ml", "ghost", "uid-ghost", "main");
    late.write_cri("stdout", "late first line").unwrap();
    ghost.write_cri("stdout", "ghost line").unwrap();
    let agent = c.start("");
    // The pod's event once the agent tails its container: it waits 1 s for it.
    wait_tailing(&agent, "late");
    c.api.apply(pod("ml", "late", "uid-late", NODE, json!({"app": "latecomer"}), &["main"]));
    agent.wait_for(WAIT, "both records", |d| d.len() >= 2);
    let docs = agent.docs();
    assert_eq!(doc_with(&docs, "late first line").unwrap()["service"]["name"], "latecomer", "waited briefly for the watch");
    let ghost_doc = doc_with(&docs, "ghost line").unwrap();
    assert_eq!(ghost_doc["service"]["name"], "ghost", "unknown pod ships with path metadata");
    assert!(ghost_doc["kubernetes"].get("labels").is_none());

    // Deleted while still logging: the last lines are still enriched.
    c.api.delete("Pod", "ml", "late");
    wait_metric(&agent, "pod_info removed", |m| metric_sum(m, "nodelens_pod_info", &[r#"pod="late""#]) == 0.0);
    late.write_cri("stdout", "after delete").unwrap();
    agent.wait_for(WAIT, "the line after deletion", |d| doc_with(d, "after delete").is_some());
    assert_eq!(doc_with(&agent.docs(), "after delete").unwrap()["service"]["name"], "latecomer");
    agent.terminate();
}

#[test]
fn label_changes_410_relists_and_dropped_watches_are_followed() {
    let c = Cluster::new();
    c.api.apply(pod("ml", "job", "uid-job", NODE, json!({"app": "v1"}), &["main"]));
    let mut log = c.log("ml", "job", "uid-job", "main");
    log.write_cri("stdout", "line 1").unwrap();
    let agent = c.start("");
    agent.wait_for(WAIT, "line 1", |d| doc_with(d, "line 1").is_some());
    assert_eq!(doc_with(&agent.docs(), "line 1").unwrap()["service"]["name"], "v1");

    c.api.apply(pod("ml", "job", "uid-job", NODE, json!({"app": "v2"}), &["main"]));
    c.api.bookmark();
    wait_metric(&agent, "relabelled pod_info", |m| {
        metric_sum(m, "nodelens_pod_info", &[r#"app="v2""#]) == 1.0 && metric_sum(m, "nodelens_pod_info", &[]) == 1.0
    });
    log.write_cri("stdout", "line 2").unwrap();
    agent.wait_for(WAIT, "line 2", |d| doc_with(d, "line 2").is_some());
    assert_eq!(doc_with(&agent.docs(), "line 2").unwrap()["service"]["name"], "v2");

    // A change whose event is lost, history compacted, the connection dropped: the watch
    // resumes from an expired version, gets 410 Gone, and must list again to see the change.
    let lists_before = c.api.requests().iter().filter(|r| r.contains("/pods") && !r.contains("watch=")).count();
    c.api.apply_unannounced(pod("ml", "job", "uid-job", NODE, json!({"app": "v3"}), &["main"]));
    c.api.compact();
    c.api.drop_watches();
    wait_metric(&agent, "v3 after relist", |m| metric_sum(m, "nodelens_pod_info", &[r#"app="v3""#]) == 1.0);
    let lists_after = c.api.requests().iter().filter(|r| r.contains("/pods") && !r.contains("watch=")).count();
    assert!(lists_after > lists_before, "a relist happened");
    log.write_cri("stdout", "line 3").unwrap();
    agent.wait_for(WAIT, "line 3", |d| doc_with(d, "line 3").is_some());
    assert_eq!(doc_with(&agent.docs(), "line 3").unwrap()["service"]["name"], "v3");
    let (status, _, _) = agent.terminate();
    assert!(status.success());
}

#[test]
fn namespace_labels_name_the_user_and_annotations_exclude_logs() {
    let c = Cluster::new();
    c.api.apply(namespace("team-a", json!({"user": "carol"}), json!({})));
    c.api.apply(namespace("quiet", json!({}), json!({"nodelens.io/exclude": "true"})));
    c.api.apply(pod("team-a", "nb", "uid-nb", NODE, json!({"app": "jupyter"}), &["notebook", "sidecar"]));
    let mut skip = pod("team-a", "noisy", "uid-noisy", NODE, json!({"app": "noisy"}), &["main"]);
    skip["metadata"]["annotations"] = json!({"nodelens.io/exclude": "true"});
    c.api.apply(skip);
    let mut partly = pod("team-a", "nb", "uid-nb", NODE, json!({"app": "jupyter"}), &["notebook", "sidecar"]);
    partly["metadata"]["annotations"] = json!({"nodelens.io/exclude-containers": "sidecar"});
    c.api.apply(partly);
    c.api.apply(pod("quiet", "q", "uid-q", NODE, json!({}), &["main"]));
    c.api.apply(pod("team-a", "later", "uid-later", NODE, json!({"app": "jupyter"}), &["main"]));
    for (ns, p, uid, container) in [
        ("team-a", "nb", "uid-nb", "notebook"),
        ("team-a", "nb", "uid-nb", "sidecar"),
        ("team-a", "noisy", "uid-noisy", "main"),
        ("quiet", "q", "uid-q", "main"),
    ] {
        c.log(ns, p, uid, container).write_cri("stdout", &format!("{p}/{container}")).unwrap();
    }
    // The pods are listed well before the namespaces: their containers wait for both.
    c.api.delay_lists_of("Namespace", Duration::from_secs(5));
    let agent = c.start("  user_keys: [\"label:user\", \"namespace_label:user\"]\n  watch_namespaces: true\n");
    // A container first seen once its pod is in the store, its namespace not yet.
    let up = |m: &str, resource: &str| metric_sum(m, "nodelens_kubernetes_watch_up", &[&format!(r#"resource="{resource}""#)]);
    wait_metric(&agent, "pods listed, namespaces not yet", |m| up(m, "pods") == 1.0 && up(m, "namespaces") == 0.0);
    c.log("team-a", "later", "uid-later", "main").write_cri("stdout", "later/main").unwrap();
    agent.wait_for(WAIT, "the notebook lines", |d| doc_with(d, "nb/notebook").is_some() && doc_with(d, "later/main").is_some());
    std::thread::sleep(Duration::from_millis(1500));
    let docs = agent.docs();
    for shipped in ["nb/notebook", "later/main"] {
        assert_eq!(doc_with(&docs, shipped).unwrap()["user"]["name"], "carol", "{shipped}");
    }
    for excluded in ["nb/sidecar", "noisy/main", "q/main"] {
        assert!(doc_with(&docs, excluded).is_none(), "{excluded} is excluded");
    }
    assert_eq!(docs.len(), 2);

    c.api.apply(namespace("team-a", json!({"user": "dave"}), json!({})));
    wait_metric(&agent, "user relabelled", |m| metric_sum(m, "nodelens_pod_info", &[r#"pod="nb""#, r#"user="dave""#]) == 1.0);
    c.log("team-a", "nb", "uid-nb", "notebook").write_cri("stdout", "after relabel").unwrap();
    agent.wait_for(WAIT, "line after relabel", |d| doc_with(d, "after relabel").is_some());
    assert_eq!(doc_with(&agent.docs(), "after relabel").unwrap()["user"]["name"], "dave");
    agent.terminate();
}

/// Where the namespaces' list never comes (their watch is denied), reading waits for it
/// `metadata_wait` once, then goes on with the pods' metadata and says so, and a pod the watch
/// has not reported yet is waited for (1 s) again.
#[test]
fn a_namespace_list_that_never_comes_holds_logs_for_metadata_wait_once() {
    let c = Cluster::new();
    c.api.apply(namespace("team-a", json!({"user": "carol"}), json!({})));
    c.api.apply(pod("team-a", "nb", "uid-nb", NODE, json!({"app": "jupyter"}), &["main"]));
    c.log("team-a", "nb", "uid-nb", "main").write_cri("stdout", "nb/main").unwrap();
    c.api.delay_lists_of("Namespace", Duration::from_secs(600));
    let started = Instant::now();
    let agent = c.start("  metadata_wait: 5s\n  user_keys: [\"namespace_label:user\"]\n");
    let up = |m: &str, resource: &str| metric_sum(m, "nodelens_kubernetes_watch_up", &[&format!(r#"resource="{resource}""#)]);
    agent.wait_for(WAIT, "the line", |d| doc_with(d, "nb/main").is_some());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(5), "held for the namespaces' list: {waited:?}");
    let docs = agent.docs();
    let doc = doc_with(&docs, "nb/main").unwrap();
    assert_eq!(doc["service"]["name"], "jupyter", "the pod's metadata");
    assert!(doc["user"]["name"].is_null(), "no namespace label to name the user: {doc}");
    let deadline = Instant::now() + WAIT;
    while !agent.log().contains("no namespace list from the Kubernetes API yet") {
        assert!(Instant::now() < deadline, "the wait given up is said: {}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(up(&agent.get("/metrics").1, "namespaces"), 0.0);

    // A container seen before its pod's event (the pod watch is up): waited for, so it ships
    // with its pod's metadata.
    c.log("team-a", "newcomer", "uid-newcomer", "main").write_cri("stdout", "newcomer/main").unwrap();
    // The pod's event once the agent tails the container (so it is seen first), well within
    // the 1 s it waits for it.
    wait_tailing(&agent, "newcomer");
    c.api.apply(pod("team-a", "newcomer", "uid-newcomer", NODE, json!({"app": "newcomer-app"}), &["main"]));
    agent.wait_for(WAIT, "the newcomer's line", |d| doc_with(d, "newcomer/main").is_some());
    assert_eq!(doc_with(&agent.docs(), "newcomer/main").unwrap()["service"]["name"], "newcomer-app");
    agent.terminate();
}

#[test]
fn without_a_cluster_auto_mode_runs_on_path_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "node_name: n\nstate_dir: {}\nlogs:\n  pods_dir: {}\nkubernetes:\n  enabled: auto\nmetrics:\n  listen: 127.0.0.1:0\n",
            dir.path().join("s").display(),
            dir.path().join("pods").display()
        ),
    )
    .unwrap();
    let mut log = ContainerLog::create(&dir.path().join("pods"), "ns", "solo", "u", "c", 0).unwrap();
    log.write_cri("stdout", "hello").unwrap();
    let agent = Agent::start(
        Path::new(env!("CARGO_BIN_EXE_nodelens")),
        &config,
        &[("KUBECONFIG", "/nonexistent"), ("KUBERNETES_SERVICE_HOST", "")],
    );
    agent.wait_for(WAIT, "the record", |d| !d.is_empty());
    assert_eq!(agent.docs()[0]["service"]["name"], "solo");
    let (status, _, log_text) = agent.terminate();
    assert!(status.success());
    assert!(log_text.contains("no Kubernetes API"), "{log_text}");
}

#[test]
fn a_thousand_cached_pods_keep_the_agent_small() {
    let c = Cluster::new();
    for i in 0..1000 {
        let mut p = pod(
            &format!("team-{}", i % 20),
            &format!("worker-{i}"),
            &format!("uid-{i}"),
            NODE,
            json!({"app": format!("job-{}", i % 40), "user": format!("u{}", i % 25), "tier": "gpu"}),
            &["main", "sidecar"],
        );
        p["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(1500)});
        c.api.apply(p);
    }
    let agent = c.start("");
    wait_metric(&agent, "all pods cached", |m| metric_sum(m, "nodelens_pod_info", &[]) == 1000.0);
    let rss = agent.rss_bytes();
    eprintln!("agent RSS with 1,000 pods cached (debug build): {:.1} MiB", rss as f64 / 1048576.0);
    // The cost per cached pod is measured by the pod_store benchmark (heap bytes per pod),
    // not asserted here against a debug build's RSS.
    agent.terminate();
}

#[test]
fn tracebacks_of_an_application_with_a_multiline_rule_are_one_record() {
    let c = Cluster::new();
    c.api.apply(pod("ml", "trainer-0", "uid-t", NODE, json!({"app": "trainer"}), &["main"]));
    c.api.apply(pod("ml", "web-0", "uid-w", NODE, json!({"app": "web"}), &["main"]));
    let mut trainer = c.log("ml", "trainer-0", "uid-t", "main");
    let mut web = c.log("ml", "web-0", "uid-w", "main");
    for log in [&mut trainer, &mut web] {
        for line in [
            "Traceback (most recent call last):",
            "  File \"train.py\", line 9, in <module>",
            "    main()",
            "ValueError: bad shape",
            "epoch 2 done",
        ] {
            log.write_cri("stderr", line).unwrap();
        }
    }
    let agent = c.start_with("  multiline:\n    - {app: \"train*\", start_pattern: '^\\S', timeout: 500ms}\n", "");
    agent.wait_for(WAIT, "trainer's three records and web's five", |d| d.len() >= 8);
    std::thread::sleep(Duration::from_millis(800));
    let (_, docs, _) = agent.terminate();
    let of = |app: &str| {
        docs.iter().filter(|d| d["service"]["name"] == app).map(|d| d["message"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(
        of("trainer"),
        [
            "Traceback (most recent call last):\n  File \"train.py\", line 9, in <module>\n    main()",
            "ValueError: bad shape",
            "epoch 2 done"
        ]
    );
    assert_eq!(of("web").len(), 5, "no rule for web: one record per line");
}

#[test]
fn container_shm_sizes_and_certificate_expiry_are_exported() {
    let c = Cluster::new();
    c.api.apply(pod("ml", "trainer-0", "6f1c2d3e-0000-4a5b-9c8d-444444444444", NODE, json!({"app": "trainer", "user": "erin"}), &["main"]));
    // A process of that container, as /proc shows it with hostPID (the fake pod's container id).
    let proc_root = c.dir.path().join("proc");
    let pid = proc_root.join("31337");
    std::fs::create_dir_all(&pid).unwrap();
    let id = "ab".repeat(32);
    std::fs::write(pid.join("cgroup"), format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1c2d3e_0000_4a5b_9c8d_444444444444.slice/cri-containerd-{id}.scope\n")).unwrap();
    std::fs::write(pid.join("mountinfo"), "1210 1200 0:125 / /dev/shm rw,nosuid,nodev - tmpfs shm rw,size=65536k,inode64\n").unwrap();
    // A certificate that expires at 2027-01-01T00:00:00Z (1798761600).
    let pki = c.dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["kube-apiserver".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "kube-apiserver");
    params.not_after = rcgen::date_time_ymd(2027, 1, 1);
    std::fs::write(pki.join("apiserver.crt"), params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()).unwrap();
    std::fs::write(pki.join("garbage.crt"), "nope").unwrap();

    let top = format!(
        "host:\n  proc_root: {}\n  scan_interval: 200ms\ncertificates:\n  paths: [\"{}/**/*.crt\"]\n  interval: 200ms\n",
        proc_root.display(),
        pki.display()
    );
    let agent = c.start_full(&top, "", "");
    let shm = [r#"namespace="ml""#, r#"pod="trainer-0""#, r#"container="main""#, r#"app="trainer""#, r#"user="erin""#];
    wait_metric(&agent, "the shm size", |m| metric_sum(m, "nodelens_container_shm_bytes", &shm) == 67108864.0);
    wait_metric(&agent, "the certificate", |m| {
        metric_sum(m, "nodelens_certificate_not_after_seconds", &[r#"subject="CN=kube-apiserver""#]) == 1798761600.0
    });
    let (_, body) = agent.get("/metrics");
    assert!(metric_sum(&body, "nodelens_certificate_errors_total", &[r#"garbage.crt""#]) >= 1.0, "{body}");
    std::fs::remove_dir_all(&pid).unwrap();
    wait_metric(&agent, "the shm series gone with the process", |m| !m.contains("nodelens_container_shm_bytes{"));
    agent.terminate();
}

/// A tenant's pods with thousands of distinct label keys against the Elasticsearch double
/// holding the shipped index template: `kubernetes.labels` is one flattened field, so the
/// mapping cannot pass the field limit; without the template (every key a field, the default
/// 1,000-field limit) the same documents are refused, as Elasticsearch would. A pod with
/// 3,000 labels of its own ships documents carrying the first 64.
#[test]
fn thousands_of_label_keys_cannot_push_the_data_stream_past_the_field_limit() {
    use nodelens_testkit::elasticsearch::FakeElasticsearch;
    let text = std::fs::read_to_string(nodelens_testkit::views::root().join("deploy/elasticsearch/index-template.json")).unwrap();
    let template: Value = serde_json::from_str(&text).unwrap();
    const PODS: usize = 30;
    for with_template in [true, false] {
        let c = Cluster::new();
        let es = FakeElasticsearch::start();
        if with_template {
            es.install_index_template(template.clone());
        }
        let mut logs = Vec::new();
        for p in 0..PODS {
            let labels: serde_json::Map<String, Value> = (0..60).map(|i| (format!("tenant.example/p{p}-key-{i}"), json!("v"))).collect();
            let (name, uid) = (format!("labels-{p}"), format!("uid-labels-{p}"));
            c.api.apply(pod("noisy", &name, &uid, NODE, Value::Object(labels), &["main"]));
            logs.push(c.log("noisy", &name, &uid, "main"));
        }
        let huge: serde_json::Map<String, Value> = (0..3000).map(|i| (format!("huge.example/key-{i:04}"), json!("v"))).collect();
        c.api.apply(pod("ml", "huge-0", "uid-huge", NODE, Value::Object(huge), &["main"]));
        logs.push(c.log("ml", "huge-0", "uid-huge", "main"));
        for log in &mut logs {
            for i in 0..5 {
                log.write_cri("stdout", &format!("line {i}")).unwrap();
            }
        }
        let total = (PODS + 1) * 5;
        let sink = format!("sinks:\n  elasticsearch:\n    endpoints: [{}]\n    flush_interval: 200ms\n", es.url());
        let agent = c.start_full(&sink, "", "");
        let settled = |agent: &Agent| {
            let body = agent.get("/metrics").1;
            metric_sum(&body, "nodelens_sink_records_total", &[r#"outcome="delivered""#])
                + metric_sum(&body, "nodelens_sink_records_total", &[r#"outcome="rejected""#])
        };
        let deadline = Instant::now() + WAIT;
        while settled(&agent) < total as f64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let stored = es.docs();
        let huge_doc = stored.iter().find(|(_, d)| d["kubernetes"]["namespace"] == "ml").map(|(_, d)| d.clone());
        let labels_of_huge = huge_doc.as_ref().map(|d| d["kubernetes"]["labels"].as_object().unwrap().len());
        assert_eq!(labels_of_huge, Some(64), "a document carries at most 64 labels\n{}", agent.log());
        if with_template {
            assert_eq!(stored.len(), total, "flattened labels: everything lands\n{}", agent.log());
        } else {
            let rejected = metric_sum(&agent.get("/metrics").1, "nodelens_sink_records_total", &[r#"outcome="rejected""#]);
            assert!(stored.len() < total && rejected > 0.0, "the double refuses what Elasticsearch would: {} stored", stored.len());
            assert_eq!(stored.len() + rejected as usize, total, "each record stored or counted as rejected");
            assert!(agent.log().contains("Limit of total fields [1000] has been exceeded"), "the reason is logged:\n{}", agent.log());
        }
        agent.terminate();
    }
}

/// Issue 31: the API cut (connections refused), then answering 500s. The watch shows down in
/// `nodelens_kubernetes_watch_up` throughout, is retried at most 5 s apart, is back within
/// 10 s of the API, and a pod created during the outage gets its metadata: its container
/// waits for it as before the first list (up to `kubernetes.metadata_wait`).
#[test]
fn a_pod_born_during_an_api_outage_gets_its_metadata_and_the_outage_shows() {
    let c = Cluster::new();
    c.api.apply(namespace("ml", json!({"user": "dana"}), json!({})));
    let agent = c.start("  metadata_wait: 60s\n  watch_namespaces: true\n");
    let up = |m: &str, resource: &str| metric_sum(m, "nodelens_kubernetes_watch_up", &[&format!(r#"resource="{resource}""#)]);
    wait_metric(&agent, "the watch series", |m| m.contains(r#"nodelens_kubernetes_watch_up{node="gpu-node-1",resource="pods"}"#));
    wait_metric(&agent, "both watches up", |m| up(m, "pods") == 1.0 && up(m, "namespaces") == 1.0);

    c.api.refuse_connections();
    wait_metric(&agent, "pods watch down while refused", |m| up(m, "pods") == 0.0 && up(m, "namespaces") == 0.0);
    let mut born = c.log("ml", "born-in-outage", "uid-born", "main");
    c.api.apply(pod("ml", "born-in-outage", "uid-born", NODE, json!({"app": "newborn", "user": "erin"}), &["main"]));
    for i in 0..20 {
        born.write_cri("stdout", &format!("outage line {i}")).unwrap();
    }
    std::thread::sleep(Duration::from_secs(4));
    let (status, metrics) = agent.get("/healthz");
    assert_eq!(status, 200, "liveness holds through an API outage: {metrics}");
    assert_eq!(up(&agent.get("/metrics").1, "pods"), 0.0);

    c.api.accept_connections();
    c.api.fail_requests(Some(500));
    let failing_since = Instant::now();
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(up(&agent.get("/metrics").1, "pods"), 0.0, "down while every request gets a 500");
    let times: Vec<Instant> = c.api.request_times().into_iter().filter(|t| *t >= failing_since).collect();
    let mut gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.push(Instant::now() - *times.last().expect("retried while answered 500"));
    // Two watches retry independently: a gap between any two requests bounds each one's.
    assert!(gaps.iter().all(|g| *g <= Duration::from_millis(5_500)), "retries at most 5 s apart: {gaps:?}");
    assert!(
        !agent.docs().iter().any(|d| d["message"].as_str().is_some_and(|m| m.starts_with("outage line"))),
        "the new pod's lines wait for its metadata while the watch is down"
    );

    c.api.fail_requests(None);
    let back = Instant::now();
    wait_metric(&agent, "pods watch up again", |m| up(m, "pods") == 1.0 && up(m, "namespaces") == 1.0);
    let recovered = back.elapsed();
    assert!(recovered <= Duration::from_secs(10), "up {recovered:?} after the API");
    agent.wait_for(WAIT, "the pod's 20 lines", |d| {
        d.iter().filter(|d| d["message"].as_str().is_some_and(|m| m.starts_with("outage line"))).count() >= 20
    });
    let docs = agent.docs();
    let lines: Vec<&Value> = docs.iter().filter(|d| d["message"].as_str().is_some_and(|m| m.starts_with("outage line"))).collect();
    assert_eq!(lines.len(), 20, "each once");
    for doc in lines {
        assert_eq!(doc["service"]["name"], "newborn", "{doc}");
        assert_eq!(doc["user"]["name"], "erin", "{doc}");
    }
    println!("watch back {recovered:?} after the API; largest retry gap while failing {:?}", gaps.iter().max().unwrap());
    agent.terminate();
}

/// A list the API server accepted but never answers (an overloaded or wedged server) is given
/// up after `kubernetes.request_timeout` and retried, the watch showing 0 meanwhile, instead
/// of hanging for ever; once lists are answered again the watch is up. A healthy watch is ended
/// by the server before the timeout (timeoutSeconds), so it never reads as stalled.
#[test]
fn a_list_that_is_never_answered_is_retried_after_the_request_timeout() {
    let c = Cluster::new();
    c.api.apply(pod("ml", "steady", "uid-steady", NODE, json!({"app": "steady"}), &["main"]));
    c.api.delay_lists(Duration::from_secs(3600));
    let agent = c.start("  request_timeout: 2s\n");
    let up = |m: &str| metric_sum(m, "nodelens_kubernetes_watch_up", &[r#"resource="pods""#]);
    wait_metric(&agent, "the watch series", |m| m.contains(r#"nodelens_kubernetes_watch_up{node="gpu-node-1",resource="pods"}"#));
    let lists = |api: &FakeApiServer| api.requests().iter().filter(|r| r.contains("/api/v1/pods") && !r.contains("watch=true")).count();
    let start = Instant::now();
    while lists(&c.api) < 3 {
        assert!(start.elapsed() < Duration::from_secs(30), "a hung list is retried: {:?}", c.api.requests());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(up(&agent.get("/metrics").1), 0.0, "down while no list is answered");

    c.api.delay_lists(Duration::ZERO);
    wait_metric(&agent, "the pods watch up once lists are answered", |m| up(m) == 1.0);
    // Up and quiet for three request timeouts: the server's watch timeout comes first.
    let lists_when_up = lists(&c.api);
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(up(&agent.get("/metrics").1), 1.0, "a quiet, healthy watch never reads as stalled");
    }
    assert_eq!(lists(&c.api), lists_when_up, "and is resumed from its resourceVersion, not relisted");
    agent.terminate();
}

#[test]
fn a_rate_limited_container_is_read_at_its_limit_and_a_pod_annotation_lifts_it() {
    let c = Cluster::new();
    c.api.apply(pod("ml", "chatty-0", "uid-chatty", NODE, json!({"app": "chatty"}), &["main"]));
    let mut free = pod("ml", "free-0", "uid-free", NODE, json!({"app": "free"}), &["main"]);
    free["metadata"]["annotations"] = json!({"nodelens.io/rate-limit": "0"});
    c.api.apply(free);
    let (mut chatty, mut unlimited) = (c.log("ml", "chatty-0", "uid-chatty", "main"), c.log("ml", "free-0", "uid-free", "main"));
    for i in 0..600 {
        chatty.write_cri("stdout", &format!("chatty {i}")).unwrap();
        unlimited.write_cri("stdout", &format!("free {i}")).unwrap();
    }
    let agent = c.start_with("  rate_limit:\n    records_per_second: 100\n", "");
    agent.wait_for(Duration::from_secs(30), "every record", |d| d.len() >= 1200);
    let arrived = agent.docs_arrived();
    let of = |app: &str| -> Vec<(Instant, String)> {
        arrived
            .iter()
            .filter(|(_, d)| d["service"]["name"] == app)
            .map(|(at, d)| (*at, d["message"].as_str().unwrap().to_string()))
            .collect()
    };
    let (limited, lifted) = (of("chatty"), of("free"));
    assert_eq!(limited.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(), (0..600).map(|i| format!("chatty {i}")).collect::<Vec<_>>());
    assert_eq!(lifted.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(), (0..600).map(|i| format!("free {i}")).collect::<Vec<_>>());
    // A burst of 100, then 100 a second: the other 500 take at least 5 s.
    let span = limited.last().unwrap().0.duration_since(limited[0].0);
    assert!(span >= Duration::from_millis(4800), "600 records at 100/s arrived within {span:?}");
    eprintln!("600 records under a limit of 100/s arrived over {span:?}");
    assert!(lifted.last().unwrap().0 < limited[300].0, "the annotated pod is not held back by the default, nor by its neighbour");
    let (_, body) = agent.get("/metrics");
    let throttled = metric_sum(&body, "nodelens_log_records_throttled_total", &[r#"namespace="ml""#, r#"app="chatty""#]);
    assert!((400.0..=600.0).contains(&throttled), "{throttled}\n{body}");
    assert_eq!(metric_sum(&body, "nodelens_log_records_throttled_total", &[r#"app="free""#]), 0.0);
}
