//! End to end: GPU run reports. The real `nodelens` binary on a simulated GPU node (fake NVML,
//! the kubelet's pod-resources service, a fake `/proc`, the fake API server) with its default
//! stdout sink: a container OOMKilled after holding half a time-sliced H100 gets exactly one
//! `nodelens.gpu_run` record, its totals continued across an agent restart in the middle of
//! the run (a clean stop, and a SIGKILL that leaves only what was saved); a pod deleted without
//! a terminated status gets one with reason `unknown`; a container still running gets none,
//! across any number of restarts.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use nodelens_testkit::agent::{metric_sum, Agent};
use nodelens_testkit::gpu::scenario::{Gpu, Process, Scenario, SCENARIO_ENV};
use nodelens_testkit::gpu::{nvml_library, Allocated, Cgroup, FakePodResources, FakeProc};
use nodelens_testkit::kubelet::ContainerLog;
use nodelens_testkit::kubernetes::FakeApiServer;
use serde_json::{json, Value};

const NODE: &str = "gpu-node-1";
const H100: &str = "GPU-0f0e0d0c-0b0a-4908-8706-050403020100";
const GIB: u64 = 1 << 30;
const RESNET_UID: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const BERT_UID: &str = "bbbbbbbb-0000-4000-8000-000000000002";

fn id(digit: char) -> String {
    digit.to_string().repeat(64)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as f64
}

/// A pod holding one container whose status is running since `started`, or terminated.
fn pod(
    name: &str,
    uid: &str,
    app: &str,
    user: &str,
    digit: char,
    started: SystemTime,
    terminated: Option<(i32, &str, SystemTime)>,
) -> Value {
    let since = humantime::format_rfc3339_seconds(started).to_string();
    let state = match terminated {
        None => json!({"running": {"startedAt": since}}),
        Some((code, reason, finished)) => json!({"terminated": {"exitCode": code, "reason": reason, "startedAt": since,
            "finishedAt": humantime::format_rfc3339_seconds(finished).to_string(), "containerID": format!("containerd://{}", id(digit))}}),
    };
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "ml", "uid": uid, "labels": {"app": app, "user": user}},
        "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": format!("registry.example/{app}:1.0")}]},
        "status": {"phase": if terminated.is_some() { "Failed" } else { "Running" }, "podIP": "10.42.0.17", "containerStatuses": [
            {"name": "main", "image": format!("registry.example/{app}:1.0"), "imageID": "", "ready": terminated.is_none(),
             "restartCount": 0, "containerID": format!("containerd://{}", id(digit)), "state": state}]}
    })
}

/// One H100 time-sliced between resnet (30 % SM, 10 GiB) and bert (50 %, 20 GiB), clocks
/// power-capped, its energy counter at `energy_joules`.
fn scenario(energy_joules: u64, processes: Vec<Process>) -> Scenario {
    Scenario {
        driver_version: "550.54.15".into(),
        gpus: vec![Gpu {
            uuid: H100.into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            utilization_percent: 80,
            memory_total_bytes: 80 * GIB,
            memory_used_bytes: 30 * GIB,
            temperature_celsius: 61,
            power_milliwatts: 400_000,
            power_limit_milliwatts: 700_000,
            energy_millijoules: energy_joules * 1000,
            sm_clock_mhz: 1980,
            throttle_reasons: 0x4,
            processes,
            ..Gpu::default()
        }],
    }
}

fn process(pid: u32, memory: u64, sm_percent: u32) -> Process {
    Process { pid, used_memory_bytes: memory, sm_percent, ..Process::default() }
}

struct Node {
    dir: tempfile::TempDir,
    api: FakeApiServer,
    kubelet: FakePodResources,
    proc: FakeProc,
}

impl Node {
    fn new(started: SystemTime) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pods")).unwrap();
        let api = FakeApiServer::start();
        let kubelet = FakePodResources::start(&dir.path().join("kubelet.sock"));
        let proc = FakeProc::new(&dir.path().join("proc"));
        api.apply(pod("resnet-0", RESNET_UID, "resnet", "alice", 'a', started, None));
        api.apply(pod("bert-0", BERT_UID, "bert", "bob", 'b', started, None));
        proc.add(4101, 777_101, &Cgroup::V2SystemdContainerd.render(RESNET_UID, &id('a')));
        proc.add(4202, 777_202, &Cgroup::V2SystemdContainerd.render(BERT_UID, &id('b')));
        kubelet.set(vec![
            Allocated::new("ml", "resnet-0", "main", "nvidia.com/gpu", &[&format!("{H100}::0")]),
            Allocated::new("ml", "bert-0", "main", "nvidia.com/gpu", &[&format!("{H100}::3")]),
        ]);
        let node = Node { dir, api, kubelet, proc };
        node.set_gpu(1_000_000, vec![process(4101, 10 * GIB, 30), process(4202, 20 * GIB, 50)]);
        node
    }

    fn set_gpu(&self, energy_joules: u64, processes: Vec<Process>) {
        scenario(energy_joules, processes).write(&self.dir.path().join("scenario.json")).unwrap();
    }

    fn start(&self) -> Agent {
        let kubeconfig = self.dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, self.api.kubeconfig()).unwrap();
        let config = self.dir.path().join("nodelens.yaml");
        let text = format!(
            "node_name: {NODE}\nstate_dir: {state}\nhost:\n  proc_root: {proc}\nlogs:\n  pods_dir: {pods}\n  log_metrics:\n    - {{name: loss, app: 'resnet*', pattern: 'loss=(?P<v>[0-9.]+)', type: gauge, value: v}}\nkubernetes:\n  enabled: true\n  kubeconfig: {kc}\n  pod_resources_socket: {sock}\ngpu:\n  nvml_library: {lib}\n  poll_interval: 200ms\nmetrics:\n  listen: 127.0.0.1:0\n",
            state = self.dir.path().join("state").display(),
            proc = self.proc.root.display(),
            pods = self.dir.path().join("pods").display(),
            kc = kubeconfig.display(),
            sock = self.kubelet.socket.display(),
            lib = nvml_library().display(),
        );
        std::fs::write(&config, text).unwrap();
        let scenario = self.dir.path().join("scenario.json").display().to_string();
        Agent::start(Path::new(env!("CARGO_BIN_EXE_nodelens")), &config, &[(SCENARIO_ENV, scenario.as_str())])
    }
}

fn runs(docs: &[Value]) -> Vec<Value> {
    docs.iter().filter(|d| d["event"]["dataset"] == "nodelens.gpu_run").cloned().collect()
}

fn attributed(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let series = ["nodelens_container_gpu_utilization_ratio", r#"pod="resnet-0""#];
    while Instant::now() < deadline {
        let (_, m) = agent.get("/metrics");
        if metric_sum(&m, series[0], &[series[1]]) > 0.0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("resnet never attributed\n{}", agent.log());
}

fn close(actual: &Value, expected: f64, tolerance: f64, what: &str) {
    let v = actual.as_f64().unwrap_or_else(|| panic!("{what}: {actual}"));
    assert!((v - expected).abs() <= tolerance, "{what}: {v}, want {expected} ± {tolerance}");
}

#[test]
fn a_gpu_run_is_reported_once_when_it_ends_with_its_totals_continued_across_agent_restarts() {
    let started = SystemTime::now() - Duration::from_secs(10);
    let node = Node::new(started);
    let mut log = ContainerLog::create(&node.dir.path().join("pods"), "ml", "resnet-0", RESNET_UID, "main", 0).unwrap();
    log.write_cri("stdout", "step=10 loss=0.91").unwrap();
    log.write_cri("stdout", "step=20 loss=0.53").unwrap();

    // First agent: both run; shut down in the middle of the run.
    let agent = node.start();
    attributed(&agent);
    std::thread::sleep(Duration::from_secs(1));
    let (status, docs, first_log) = agent.terminate();
    assert!(status.success(), "{first_log}");
    assert_eq!(runs(&docs), Vec::<Value>::new(), "none while running, none at shutdown");

    // Away 3 s, then the GPU has spent 1,000 J more.
    std::thread::sleep(Duration::from_secs(3));
    node.set_gpu(1_001_000, vec![process(4101, 10 * GIB, 30), process(4202, 20 * GIB, 50)]);
    let agent = node.start();
    attributed(&agent);
    std::thread::sleep(Duration::from_secs(1));
    // resnet is OOMKilled: its process goes, and the kubelet reports it terminated a few
    // polls later. Those polls read it allocated and idle: they are after its end, not its.
    let finished = SystemTime::now();
    node.proc.remove(4101);
    node.set_gpu(1_001_000, vec![process(4202, 20 * GIB, 50)]);
    std::thread::sleep(Duration::from_millis(700));
    node.api.apply(pod("resnet-0", RESNET_UID, "resnet", "alice", 'a', started, Some((137, "OOMKilled", finished))));
    let posted = Instant::now();
    agent.wait_for(Duration::from_secs(15), "resnet's report", |docs| !runs(docs).is_empty());
    let latency = posted.elapsed();
    let report = runs(&agent.docs()).remove(0);
    let run = &report["nodelens"]["run"];
    assert_eq!(report["kubernetes"]["pod"]["name"], "resnet-0", "{report}");
    assert_eq!((report["service"]["name"].as_str(), report["user"]["name"].as_str()), (Some("resnet"), Some("alice")));
    assert_eq!(report["container"]["id"], id('a'));
    assert_eq!(run["exit_code"], 137, "a number: {report}");
    assert_eq!((run["exit_reason"].as_str(), run["outcome"].as_str()), (Some("OOMKilled"), Some("oomkilled")));
    assert_eq!(run["started"].as_str().unwrap()[..19], humantime::format_rfc3339_seconds(started).to_string()[..19]);
    let held = unix(finished) - unix(started);
    close(&run["duration_seconds"], held, 0.0, "duration");
    // Half the H100 (time-sliced with bert) from start to end, the agent's downtime included.
    close(&run["gpu_seconds"], held / 2.0, 0.6, "gpu_seconds");
    close(&run["gpus"], 0.5, 0.0, "gpus");
    close(&run["sm_utilization_mean"], 0.3, 0.02, "sm_utilization_mean");
    close(&run["memory_used_peak_bytes"], (10 * GIB) as f64, 0.0, "memory peak");
    close(&run["energy_joules"], 500.0, 1e-6, "half of the 1,000 J spent while it held the GPU");
    let throttled = run["throttled_seconds"].as_f64().unwrap();
    assert!(throttled > 1.0 && throttled <= held, "power-capped throughout the polls seen: {throttled}");
    assert_eq!(run["xid_errors"], 0);
    close(&run["log_metrics"]["loss"], 0.53, 0.0, "the last loss");
    assert!(latency < Duration::from_secs(15), "{latency:?}");
    let (_, m) = agent.get("/metrics");
    let seconds = metric_sum(&m, "nodelens_gpu_run_seconds_total", &[r#"app="resnet""#, r#"user="alice""#, r#"outcome="oomkilled""#]);
    assert!((seconds - held / 2.0).abs() <= 0.6, "{seconds}\n{m}");

    // bert's pod is deleted while its process still runs: reason unknown.
    node.kubelet.set(Vec::new());
    node.api.delete("Pod", "ml", "bert-0");
    let deleted = Instant::now();
    agent.wait_for(Duration::from_secs(20), "bert's report", |docs| runs(docs).len() == 2);
    let after = deleted.elapsed();
    let bert = runs(&agent.docs()).remove(1);
    assert_eq!(bert["kubernetes"]["pod"]["name"], "bert-0", "{bert}");
    assert_eq!(bert["nodelens"]["run"]["exit_reason"], "unknown");
    assert_eq!(bert["nodelens"]["run"]["outcome"], "unknown");
    assert!(bert["nodelens"]["run"].get("exit_code").is_none(), "{bert}");
    assert!(after < Duration::from_secs(20), "{after:?}");
    let (status, docs, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(runs(&docs).len(), 2, "{log}");

    // A third agent, the kubelet still listing nothing, the API the same: nothing again.
    let agent = node.start();
    std::thread::sleep(Duration::from_secs(2));
    let (status, docs, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(runs(&docs), Vec::<Value>::new(), "each container reported once across restarts: {log}");
}

#[test]
fn a_run_whose_agent_was_killed_mid_run_is_reported_once_with_the_totals_it_had_saved() {
    let started = SystemTime::now() - Duration::from_secs(10);
    let node = Node::new(started);

    // The first agent sees both runs, then is SIGKILLed: no shutdown, only what it had saved.
    let agent = node.start();
    attributed(&agent);
    std::thread::sleep(Duration::from_secs(1));
    let (_, docs, first_log) = agent.kill();
    assert_eq!(runs(&docs), Vec::<Value>::new(), "none while running: {first_log}");
    let state = std::fs::read_to_string(node.dir.path().join("state").join("gpu-runs.json"))
        .unwrap_or_else(|e| panic!("the running totals were saved before the kill: {e}\n{first_log}"));
    assert!(state.contains(&id('a')), "{state}");

    std::thread::sleep(Duration::from_secs(2));
    let agent = node.start();
    attributed(&agent);
    node.proc.remove(4101);
    node.set_gpu(1_000_000, vec![process(4202, 20 * GIB, 50)]);
    let finished = SystemTime::now();
    node.api.apply(pod("resnet-0", RESNET_UID, "resnet", "alice", 'a', started, Some((1, "Error", finished))));
    agent.wait_for(Duration::from_secs(15), "resnet's report", |docs| !runs(docs).is_empty());
    std::thread::sleep(Duration::from_secs(1));
    let (status, docs, log) = agent.terminate();
    assert!(status.success(), "{log}");
    let reports = runs(&docs);
    assert_eq!(reports.len(), 1, "one report: {reports:?}");
    let run = &reports[0]["nodelens"]["run"];
    assert_eq!((run["exit_code"].as_i64(), run["outcome"].as_str()), (Some(1), Some("failed")), "{run}");
    let held = unix(finished) - unix(started);
    // Half the GPU from start to end: the killed agent's last poll to the restart is counted
    // at the share it last saw, as after a clean stop.
    close(&run["gpu_seconds"], held / 2.0, 0.6, "gpu_seconds");

    // Restarted once more: the run was remembered as reported.
    let agent = node.start();
    std::thread::sleep(Duration::from_secs(2));
    let (status, docs, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(runs(&docs), Vec::<Value>::new(), "{log}");
}
