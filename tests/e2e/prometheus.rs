//! The bundled views against a real Prometheus and a real Alertmanager (Debian's packages):
//! the `nodelens` binary runs on a simulated GPU node (fake NVML, pod-resources, `/proc`, API
//! server, kubelet log files, Elasticsearch double); a static exporter serves recorded
//! cAdvisor, kube-state-metrics and node-exporter samples; Prometheus scrapes both with the
//! rules of rules/ loaded. Then:
//! - every nodelens metric a rule or dashboard reads is on the live agent's `/metrics`;
//! - every panel query and variable query of every dashboard, variables substituted, returns
//!   data from Prometheus's HTTP API;
//! - GpuLost and GpuAllocatedIdle (with a short `for`, and a few samples enough, in a test
//!   copy of the rules) reach Alertmanager and its webhook receiver, with their labels and
//!   annotations;
//!   NodelensAgentDown for a node kube-state-metrics lists but no agent is scraped on;
//!   NodeGpuCountDropped is held back by the shipped inhibition rules;
//! - the numbers are right: the H100 shared through HAMi (half its SMs each) counts as one GPU
//!   held by its two slices, and
//!   it is busy, so only the notebook's L4 is allocated but idle.
//!
//! The agent is scraped as prometheus-operator scrapes it from the shipped ServiceMonitor: the
//! target carries the agent pod's own `namespace`, `pod`, `container`, `service`, `endpoint`
//! labels, and `honor_labels` is the ServiceMonitor's `honorLabels`; without it the workload
//! labels would become `exported_*` and the checks below fail.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use nodelens_testkit::agent::{http_get, Agent};
use nodelens_testkit::elasticsearch::{FakeElasticsearch, Fault};
use nodelens_testkit::gpu::scenario::{
    Fabric, Gpm, Gpu, NvLink, Process, RemappedRows, RetiredPages, Scenario, Violations, XidEvent, SCENARIO_ENV,
};
use nodelens_testkit::gpu::{nvml_library, Allocated, Cgroup, FakePodResources, FakeProc, Workload};
use nodelens_testkit::http::Server;
use nodelens_testkit::kubelet::ContainerLog;
use nodelens_testkit::kubernetes::{event, hami_devices, pod_with_ids, with_hami, FakeApiServer};
use nodelens_testkit::views::{self, dashboards, exposition_names, metric_names, queries, rules, RUNBOOK_BASE_URL};
use serde_json::{json, Value};

const NODE: &str = "gpu-node-1";
const CLUSTER: &str = "e2e";
const H100: &str = "GPU-0f0e0d0c-0b0a-4908-8706-050403020100";
const L4: &str = "GPU-14141414-0000-4000-8000-000000000014";
const A100: &str = "GPU-a1a1a1a1-0000-4000-8000-000000000001";
const GIB: u64 = 1 << 30;
const WAIT: Duration = Duration::from_secs(90);

/// The node's workloads: resnet and bert share the H100 through HAMi; dave's notebook holds
/// the L4 and runs nothing on it.
fn workloads() -> Vec<Workload> {
    let w = |pod, uid, app, user, digit, pid| Workload::new(pod, uid, app, user, digit, pid, Cgroup::V2SystemdContainerd);
    vec![
        w("resnet-0", "aaaaaaaa-0000-4000-8000-000000000001", "resnet", "alice", 'a', Some(4101)),
        w("bert-0", "bbbbbbbb-0000-4000-8000-000000000002", "bert", "bob", 'b', Some(4202)),
        w("notebook-0", "dddddddd-0000-4000-8000-000000000004", "notebook", "dave", 'd', None),
    ]
}

/// An H100 shared through HAMi by resnet and bert (half its SMs each), with corrected and uncorrected ECC errors and
/// its power capped; an idle L4 held by dave's notebook, whose power sensor has failed; an
/// A100 that nobody holds, and which is lost once the test is under way. The H100 has the second
/// tier (its NVSwitch fabric degraded, NVLink errors and PCIe replays rising once the test is
/// under way); the L4 encodes and decodes and has a page retirement pending.
fn scenario(a100_lost: bool, xids: Vec<XidEvent>) -> Scenario {
    let gpu = |uuid: &str, name: &str, memory_gib: u64| Gpu {
        uuid: uuid.into(),
        name: name.into(),
        memory_total_bytes: memory_gib * GIB,
        temperature_celsius: 38,
        power_milliwatts: 60_000,
        power_limit_milliwatts: 300_000,
        energy_millijoules: 9_000_000,
        sm_clock_mhz: 1410,
        ecc_corrected: Some(0),
        ecc_uncorrected: Some(0),
        ..Gpu::default()
    };
    let nvlink = |active, crc_flit| NvLink { active, crc_flit: Some(crc_flit), crc_data: None, replay: Some(0), recovery: Some(0) };
    let process = |pid, memory_gib, sm_percent| Process { pid, used_memory_bytes: memory_gib * GIB, sm_percent, ..Process::default() };
    Scenario {
        driver_version: "550.54.15".into(),
        gpus: vec![
            Gpu {
                utilization_percent: 80,
                memory_utilization_percent: 35,
                memory_used_bytes: 30 * GIB,
                temperature_celsius: 71,
                power_milliwatts: 612_500,
                power_limit_milliwatts: 700_000,
                throttle_reasons: 0x4,
                ecc_corrected: Some(12),
                ecc_uncorrected: Some(1),
                processes: vec![process(4101, 10, 30), process(4202, 20, 50)],
                xid_events: xids,
                gpm: Some(Gpm {
                    graphics_percent: 80.0,
                    sm_active_percent: 45.0,
                    sm_occupancy_percent: 20.0,
                    tensor_active_percent: 35.0,
                    dram_active_percent: 50.0,
                    pcie_tx_mib_per_s: 800.0,
                    pcie_rx_mib_per_s: 400.0,
                    nvlink_tx_mib_per_s: 3000.0,
                    nvlink_rx_mib_per_s: 3000.0,
                    ..Gpm::default()
                }),
                remapped_rows: Some(RemappedRows { correctable: 1, ..RemappedRows::default() }),
                memory_temperature_celsius: Some(64),
                memory_temperature_limit_celsius: Some(95),
                memory_clock_mhz: Some(2619),
                decoder_percent: Some(20),
                // Errors and replays rise once the test is under way.
                pcie_replays: Some(if a100_lost { 40 } else { 3 }),
                nvlinks: (0..18).map(|k| nvlink(k != 5, if a100_lost && k == 0 { 9 } else { 1 })).collect(),
                violations: Violations { power: Some(2_000_000_000), thermal: Some(0), ..Violations::default() },
                // Degraded bandwidth: the fabric is up but not healthy.
                fabric: Some(Fabric { state: 3, status: 0, health_mask: 0x21, health_summary: 3, v2_only: false }),
                ..gpu(H100, "NVIDIA H100 80GB HBM3", 80)
            },
            Gpu {
                power_read_fails: true,
                ecc_corrected: None,
                ecc_uncorrected: None,
                encoder_percent: Some(15),
                decoder_percent: Some(40),
                retired_pages: Some(RetiredPages { single_bit: 1, double_bit: 0, pending: true }),
                ..gpu(L4, "NVIDIA L4", 24)
            },
            Gpu { lost: a100_lost, ..gpu(A100, "NVIDIA A100-SXM4-40GB", 40) },
        ],
    }
}

/// A child process killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start(program: &str, args: &[String], log: &Path) -> Daemon {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is installed (tests/run-all.sh installs it from Debian's packages): {e}"));
    Daemon(child)
}

/// Waits until `check` returns `Some`, panicking with `what` and `context()` after `WAIT`.
fn wait_for<T>(what: &str, context: impl Fn() -> String, check: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Serves the recorded exporter samples under tests/e2e/data, one path per exporter.
fn static_exporter() -> Server {
    Server::start(0, None, |request: hyper::Request<hyper::body::Incoming>| async move {
        let file = match request.uri().path() {
            "/cadvisor" => "cadvisor.prom",
            "/kube-state-metrics" => "kube-state-metrics.prom",
            "/node-exporter" => "node-exporter.prom",
            _ => return Ok::<_, std::convert::Infallible>(Response::builder().status(404).body(Full::new(Bytes::new())).unwrap()),
        };
        let body = std::fs::read(views::root().join("tests/e2e/data").join(file)).unwrap();
        Ok(Response::builder().header("content-type", "text/plain; version=0.0.4").body(Full::new(Bytes::from(body))).unwrap())
    })
}

/// Alertmanager's webhook receiver: every notification body it posts.
fn webhook() -> (Server, Arc<Mutex<Vec<Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let server = Server::start(0, None, move |request: hyper::Request<hyper::body::Incoming>| {
        let sink = sink.clone();
        async move {
            let body = request.into_body().collect().await?.to_bytes();
            let status = match serde_json::from_slice::<Value>(&body) {
                Ok(notification) => {
                    sink.lock().unwrap().push(notification);
                    StatusCode::OK
                }
                Err(_) => StatusCode::BAD_REQUEST,
            };
            Ok::<_, hyper::Error>(Response::builder().status(status).body(Full::new(Bytes::new())).unwrap())
        }
    });
    (server, received)
}

/// The rules of rules/, every `for:` shortened so alerts fire within the test, and every
/// "enough samples in the window" condition (`count_over_time(...) > N`) met by a few.
fn rules_with_short_for(dir: &Path) -> Vec<PathBuf> {
    views::files("rules", ".rules.yaml")
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).unwrap();
            let short: String = text
                .lines()
                .map(|l| {
                    if l.trim_start().starts_with("for: ") {
                        format!("{}for: 3s\n", &l[..l.find("for:").unwrap()])
                    } else if let Some(at) = l.find("count_over_time(").and_then(|_| l.rfind(") > ")) {
                        format!("{}) > 3\n", &l[..at])
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            let copy = dir.join(file.file_name().unwrap());
            std::fs::write(&copy, short).unwrap();
            copy
        })
        .collect()
}

/// The `honorLabels` of the shipped ServiceMonitor's endpoint (prometheus-operator's default:
/// false).
fn service_monitor_honors_labels() -> bool {
    let text = std::fs::read_to_string(views::root().join("deploy/base/service.yaml")).unwrap();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let object = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).unwrap();
        if object["kind"] == "ServiceMonitor" {
            return object["spec"]["endpoints"][0]["honorLabels"].as_bool().unwrap_or(false);
        }
    }
    panic!("deploy/base/service.yaml has a ServiceMonitor");
}

/// The shipped Alertmanager inhibition rules, as YAML lines of alertmanager.yml.
fn inhibit_rules() -> String {
    std::fs::read_to_string(views::root().join("rules/alertmanager/inhibit-rules.yaml")).unwrap()
}

/// The simulated node, the agent on it, and everything the agent talks to.
struct Node {
    dir: tempfile::TempDir,
    /// Shared with the writer, which also records a pod's Events as the kubelet would.
    api: Arc<FakeApiServer>,
    _kubelet: FakePodResources,
    _proc: FakeProc,
    es: FakeElasticsearch,
    scenario: PathBuf,
    logs: Vec<ContainerLog>,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let pods = dir.path().join("pods");
        std::fs::create_dir_all(&pods).unwrap();
        let api = Arc::new(FakeApiServer::start());
        let kubelet = FakePodResources::start(&dir.path().join("kubelet.sock"));
        let proc = FakeProc::new(&dir.path().join("proc"));
        // The kernel ring: an error, a sequence gap (two records the ring overwrote) and an XID
        // raised by resnet's process (after it started: 777,000 + pid clock ticks after boot), so
        // the node-log panels have data.
        std::fs::create_dir_all(dir.path().join("proc/sys/kernel/random")).unwrap();
        std::fs::write(dir.path().join("proc/sys/kernel/random/boot_id"), "6f4c1c1e-2d8f-4d44-9d3b-0c6d2d7e1a01\n").unwrap();
        std::fs::write(dir.path().join("proc/stat"), "cpu  1 2 3 4\nbtime 1764800000\nprocesses 77\n").unwrap();
        std::fs::write(
            dir.path().join("kmsg"),
            "6,0,1000000,-;Linux version 6.1.0-test\n\
             3,1,2000000,-;nvidia-uvm: Unloaded the UVM driver\n\
             4,4,9000000000,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=4101, name=python, GPU has fallen off the bus.\n",
        )
        .unwrap();
        let mut logs = Vec::new();
        for w in workloads() {
            let pod = pod_with_ids("ml", w.pod, w.uid, NODE, json!({"app": w.app, "user": w.user}), &[("main", w.id.as_str())]);
            // HAMi's grants on the H100: 16000 and 24000 MiB, half the SMs each.
            let pod = match w.pod {
                "resnet-0" => with_hami(pod, &[], &hami_devices(&[&[(H100, 16000, 50)]])),
                "bert-0" => with_hami(pod, &[], &hami_devices(&[&[(H100, 24000, 50)]])),
                _ => pod,
            };
            api.apply(pod);
            w.add_process(&proc);
            if let Some(pid) = w.pid {
                // The runtime's default 64 MiB /dev/shm.
                let mountinfo = "1210 1200 0:125 / /dev/shm rw,nosuid,nodev - tmpfs shm rw,size=65536k,inode64\n";
                std::fs::write(proc.root.join(pid.to_string()).join("mountinfo"), mountinfo).unwrap();
            }
            logs.push(ContainerLog::create(&pods, "ml", w.pod, w.uid, "main", 0).unwrap());
        }
        kubelet.set(vec![
            Allocated::hami("ml", "resnet-0", "main", H100, 0),
            Allocated::hami("ml", "bert-0", "main", H100, 1),
            Allocated::new("ml", "notebook-0", "main", "nvidia.com/gpu", &[L4]),
        ]);
        let scenario_path = dir.path().join("scenario.json");
        scenario(false, Vec::new()).write(&scenario_path).unwrap();
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["kube-apiserver".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "kube-apiserver");
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        std::fs::write(pki.join("apiserver.crt"), params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()).unwrap();
        std::fs::write(pki.join("truncated.crt"), "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let es = FakeElasticsearch::start();
        es.reject_messages_containing("mapping-conflict");
        Node { dir, api, _kubelet: kubelet, _proc: proc, es, scenario: scenario_path, logs }
    }

    fn start_agent(&self) -> Agent {
        let kubeconfig = self.dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, self.api.kubeconfig()).unwrap();
        let path = |p: &str| self.dir.path().join(p).display().to_string();
        let config = format!(
            r#"node_name: {NODE}
cluster_name: {CLUSTER}
state_dir: {state}
host:
  proc_root: {proc}
  scan_interval: 200ms
logs:
  pods_dir: {pods}
  log_metrics:
    - {{name: loss, app: 'resnet*', pattern: 'loss=(?P<v>[0-9.]+)', type: gauge, value: v}}
    - {{name: steps, app: 'resnet*', pattern: 'step=\d+', type: counter}}
    - {{name: tokens, pattern: 'tokens=(?P<n>\d+)', type: counter, value: n, max_series: 1}}
kubernetes:
  enabled: true
  kubeconfig: {kubeconfig}
  pod_resources_socket: {socket}
  events:
    enabled: true
gpu:
  nvml_library: {library}
  poll_interval: 200ms
sinks:
  elasticsearch:
    endpoints: ["{es}"]
    flush_interval: 200ms
metrics:
  listen: 127.0.0.1:0
certificates:
  paths: ["{pki}/*.crt"]
  interval: 200ms
node_logs:
  kernel:
    path: {kmsg}
"#,
            state = path("state"),
            proc = path("proc"),
            pods = path("pods"),
            kubeconfig = kubeconfig.display(),
            socket = path("kubelet.sock"),
            library = nvml_library().display(),
            es = self.es.url(),
            pki = path("pki"),
            kmsg = path("kmsg"),
        );
        let file = self.dir.path().join("nodelens.yaml");
        std::fs::write(&file, config).unwrap();
        let scenario = self.scenario.display().to_string();
        Agent::start(
            Path::new(env!("CARGO_BIN_EXE_nodelens")),
            &file,
            &[
                (SCENARIO_ENV, scenario.as_str()),
                ("NODELENS_NODE_LOGS__KERNEL__ENABLED", "true"),
                ("POD_NAME", "nodelens-x7k2p"),
                ("POD_NAMESPACE", "nodelens"),
            ],
        )
    }
}

/// One round of log lines: training progress, errors, and every fifth round a line
/// Elasticsearch rejects and a line that is not CRI at all.
fn write_round(logs: &mut [ContainerLog], round: usize) {
    let [resnet, bert, notebook] = logs else { unreachable!() };
    resnet.write_cri("stdout", &format!("step={round} loss={:.3} tokens=512", 2.0 / (round as f64 + 1.0))).unwrap();
    resnet.write_cri("stderr", &format!("ERROR: data loader worker {round} exited unexpectedly")).unwrap();
    bert.write_cri("stdout", &format!("level=info msg=\"step={round} tokens=4096\"")).unwrap();
    notebook.write_cri("stdout", "[I 10:00:00.000 NotebookApp] Kernel started").unwrap();
    if round % 5 == 0 {
        bert.write_cri("stderr", "level=error msg=\"mapping-conflict: labels.app is an object here\"").unwrap();
        notebook.write_raw(b"this line was not written by a CRI runtime\n").unwrap();
    }
}

/// Keeps the pods logging, a round every 300 ms, until dropped; bert's container backs off
/// from a crash every round (a Warning Event whose count goes up, for the Events panel).
struct Writer(Arc<std::sync::atomic::AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Writer {
    fn start(mut logs: Vec<ContainerLog>, api: Arc<FakeApiServer>) -> Writer {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut round = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                write_round(&mut logs, round);
                let bert = ["Pod", "ml", "bert-0", "bbbbbbbb-0000-4000-8000-000000000002"];
                let backoff = ["BackOff", "Warning", "Back-off restarting failed container main"];
                api.apply(event("ml", "bert-0.backoff", "ev-bert-backoff", bert, backoff, round as i32 + 1));
                round += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Writer(stop, Some(thread))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.1.take() {
            let _ = thread.join();
        }
    }
}

/// A running Prometheus and Alertmanager.
struct Monitoring {
    prometheus: SocketAddr,
    alertmanager: SocketAddr,
    logs: (PathBuf, PathBuf),
    _daemons: (Daemon, Daemon),
}

impl Monitoring {
    fn start(dir: &Path, agent: SocketAddr, exporter: SocketAddr, webhook: SocketAddr) -> Monitoring {
        let alertmanager: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let am_config = dir.join("alertmanager.yml");
        std::fs::write(
            &am_config,
            format!(
                "route:\n  receiver: test\n  group_by: [alertname]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: test\n    webhook_configs:\n      - url: http://{webhook}/alerts\n        send_resolved: false\n{inhibit}",
                inhibit = inhibit_rules(),
            ),
        )
        .unwrap();
        let am_log = dir.join("alertmanager.log");
        let am = start(
            "prometheus-alertmanager",
            &[
                format!("--config.file={}", am_config.display()),
                format!("--storage.path={}", dir.join("alertmanager-data").display()),
                format!("--web.listen-address={alertmanager}"),
                "--cluster.listen-address=".into(),
            ],
            &am_log,
        );

        let prometheus: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let rule_files: Vec<String> = rules_with_short_for(dir).iter().map(|f| format!("  - {}\n", f.display())).collect();
        let job = |name: &str, path: &str, target: SocketAddr, labels: &str, honor: bool| {
            format!(
                "  - job_name: {name}\n    metrics_path: {path}\n    honor_labels: {honor}\n    static_configs:\n      - targets: [\"{target}\"]\n        labels: {{cluster: {CLUSTER}{labels}}}\n"
            )
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{rules}alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{alertmanager}\"]\nscrape_configs:\n{a}{b}{c}{d}",
            rules = rule_files.concat(),
            // As prometheus-operator scrapes the ServiceMonitor in deploy/: the target labels
            // name the agent's own pod, `instance` is the node's name (its relabeling), and
            // `honor_labels` is the ServiceMonitor's.
            a = job(
                "nodelens",
                "/metrics",
                agent,
                &format!(
                    ", instance: {NODE}, namespace: nodelens, pod: nodelens-x7k2p, container: nodelens, service: nodelens, endpoint: metrics"
                ),
                service_monitor_honors_labels(),
            ),
            b = job("kubelet", "/cadvisor", exporter, "", true),
            c = job("kube-state-metrics", "/kube-state-metrics", exporter, "", true),
            // As kube-prometheus-stack scrapes its node-exporter: the exporter pod's own labels
            // and no `node` (the views find the node through kube_pod_info).
            d = job(
                "node-exporter",
                "/node-exporter",
                exporter,
                ", instance: \"10.0.0.11:9100\", namespace: monitoring, pod: kps-prometheus-node-exporter-7xk2p, container: node-exporter, service: kps-prometheus-node-exporter, endpoint: http-metrics",
                false,
            ),
        );
        let prom_config = dir.join("prometheus.yml");
        std::fs::write(&prom_config, config).unwrap();
        let prom_log = dir.join("prometheus.log");
        let prom = start(
            "prometheus",
            &[
                format!("--config.file={}", prom_config.display()),
                format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()),
                format!("--web.listen-address={prometheus}"),
            ],
            &prom_log,
        );
        Monitoring { prometheus, alertmanager, logs: (prom_log, am_log), _daemons: (prom, am) }
    }

    fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let tail = |s: String| s.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        format!("--- prometheus ---\n{}\n--- alertmanager ---\n{}", tail(read(&self.logs.0)), tail(read(&self.logs.1)))
    }

    /// Runs a query through the HTTP API: the result, or Prometheus's error.
    fn query(&self, expr: &str, instant: bool) -> Result<Value, String> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let path = if instant {
            format!("/api/v1/query?query={}&time={now}", encode(expr))
        } else {
            format!("/api/v1/query_range?query={}&start={}&end={now}&step=1", encode(expr), now - 60.0)
        };
        // Prometheus may still be starting when the agent is already up.
        if std::net::TcpStream::connect(self.prometheus).is_err() {
            return Err("Prometheus is not listening yet".to_string());
        }
        let (status, body) = http_get(self.prometheus, &path);
        let reply: Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {status}: {e}: {body}"))?;
        if reply["status"] != "success" {
            return Err(format!("{}: {}", reply["errorType"], reply["error"]));
        }
        Ok(reply["data"]["result"].clone())
    }
}

/// The value of each series of an instant query's result, by the labels `keys` name.
fn values_by(result: &Value, keys: &[&str]) -> std::collections::BTreeMap<Vec<String>, f64> {
    result
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let key = keys.iter().map(|k| s["metric"][*k].as_str().unwrap_or_default().to_string()).collect();
            (key, s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
        })
        .collect()
}

/// Whether a query result holds data: a scalar, or at least one series with a sample.
fn has_data(result: &Value) -> bool {
    match result {
        Value::Array(series) => series.iter().any(|s| s.get("value").is_some() || s["values"].as_array().is_some_and(|v| !v.is_empty())),
        Value::Null => false,
        _ => true,
    }
}

#[test]
fn every_dashboard_query_returns_data_and_gpu_alerts_reach_alertmanager() {
    let mut node = Node::new();
    // The first bulk request is refused with 429 and retried.
    node.es.inject(Fault::Status(429));
    let _writer = Writer::start(std::mem::take(&mut node.logs), node.api.clone());
    let agent = node.start_agent();
    let metrics_addr = agent.metrics_addr();
    let exporter = static_exporter();
    let (hook, received) = webhook();
    let monitoring = Monitoring::start(node.dir.path(), metrics_addr, exporter.addr, hook.addr);
    let context = || format!("{}\n--- agent ---\n{}", monitoring.logs(), agent.log());

    // The agent is up with every GPU attributed; then the A100 falls off the bus and the
    // H100 reports XID 79 (a hardware fault) and XID 13 (an application's).
    wait_for("the agent to attribute the GPUs", context, || {
        let (_, body) = agent.get("/metrics");
        body.contains("nodelens_container_gpu_utilization_ratio{").then_some(())
    });
    // Prometheus has seen the node with its three GPUs before one is lost.
    wait_for("Prometheus to record three working GPUs", context, || {
        let result = monitoring.query("node:nodelens_gpus_up:sum == 3", true).ok()?;
        has_data(&result).then_some(())
    });
    let xids = vec![XidEvent { id: 1, xid: 79 }, XidEvent { id: 2, xid: 13 }];
    scenario(true, xids).write(&node.scenario).unwrap();

    // Every nodelens metric the views read is exported by the live agent.
    let live = wait_for("the XIDs and the lost GPU on /metrics", context, || {
        let (_, body) = agent.get("/metrics");
        let ready =
            body.contains("nodelens_gpu_xid_errors_total{") && body.contains(&format!("nodelens_gpu_up{{node=\"{NODE}\",gpu=\"2\""));
        ready.then(|| exposition_names(&body))
    });
    let mut read = BTreeSet::new();
    for rule in rules() {
        read.extend(metric_names(rule["expr"].as_str().unwrap()));
    }
    for (file, d) in dashboards() {
        for q in queries(&file, &d) {
            read.extend(metric_names(&q.expr));
        }
    }
    let missing: Vec<&String> = read.iter().filter(|m| m.starts_with("nodelens_") && !live.contains(*m)).collect();
    assert!(missing.is_empty(), "the views read metrics the live agent does not export: {missing:?}");

    // Every panel and variable query returns data once Prometheus has a few scrapes.
    // node_pods as Grafana renders the machine view's hidden variable: the DaemonSet pods on
    // NODE (the variable's own query is run below with the other variable queries).
    let vars = [
        ("cluster", CLUSTER),
        ("node", NODE),
        ("node_pods", "(kps-prometheus-node-exporter-7xk2p)"),
        ("namespace", "ml"),
        ("app", "resnet"),
        ("user", "alice"),
    ];
    let all: Vec<views::Query> = dashboards().iter().flat_map(|(file, d)| queries(file, d)).collect();
    assert!(all.len() > 100, "{} queries", all.len());
    let failing = || -> Vec<String> {
        all.iter()
            .filter_map(|q| {
                let expr = views::substitute(&q.expr, "10s", &vars);
                match monitoring.query(&expr, q.instant) {
                    Ok(r) if has_data(&r) => None,
                    Ok(_) => Some(format!("{}: no data: {expr}", q.what)),
                    Err(e) => Some(format!("{}: {e}: {expr}", q.what)),
                }
            })
            .collect()
    };
    wait_for(
        "every dashboard query to return data",
        || format!("{}\n{}", failing().join("\n"), context()),
        || failing().is_empty().then_some(()),
    );

    // The lost GPU and the idle notebook reach Alertmanager's webhook receiver.
    let alerts = wait_for("GpuLost and GpuAllocatedIdle at the webhook", context, || {
        let alerts: Vec<Value> =
            received.lock().unwrap().iter().flat_map(|n| n["alerts"].as_array().cloned().unwrap_or_default()).collect();
        let names: BTreeSet<&str> = alerts.iter().filter_map(|a| a["labels"]["alertname"].as_str()).collect();
        (names.contains("GpuLost") && names.contains("GpuAllocatedIdle")).then_some(alerts)
    });
    let find = |name: &str| alerts.iter().find(|a| a["labels"]["alertname"] == name).unwrap().clone();
    let lost = find("GpuLost");
    assert_eq!(lost["status"], "firing");
    let labels = &lost["labels"];
    assert_eq!(
        (labels["node"].as_str(), labels["uuid"].as_str(), labels["severity"].as_str()),
        (Some(NODE), Some(A100), Some("critical")),
        "{lost}"
    );
    assert_eq!(labels["cluster"], CLUSTER, "{lost}");
    assert_eq!(
        lost["annotations"]["description"],
        format!("GPU 2 (NVIDIA A100-SXM4-40GB, {A100}) on node {NODE} is reported lost by NVML; its workloads have failed or will.")
    );
    assert_eq!(lost["annotations"]["runbook_url"], format!("{RUNBOOK_BASE_URL}#gpulost"));
    // One alert per physical GPU, labelled by the GPU only: not by the agent's pod.
    let keys: BTreeSet<&str> = labels.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["alertname", "cluster", "gpu", "model", "node", "severity", "uuid"]), "{lost}");
    let idle = find("GpuAllocatedIdle");
    let labels = &idle["labels"];
    let who = ["namespace", "pod", "app", "user", "uuid"].map(|k| labels[k].as_str().unwrap_or_default().to_string());
    assert_eq!(who, ["ml", "notebook-0", "notebook", "dave", L4].map(String::from), "{idle}");
    let idle_gpus: Vec<&Value> = alerts.iter().filter(|a| a["labels"]["alertname"] == "GpuAllocatedIdle").collect();
    assert!(idle_gpus.iter().all(|a| a["labels"]["user"] == "dave"), "only the notebook is idle: {idle_gpus:?}");

    // The workload labels are the agent's, not the scrape target's (honor_labels).
    let instant = |expr: &str| monitoring.query(expr, true).unwrap_or_else(|e| panic!("{expr}: {e}\n{}", context()));
    let exported = instant("count({exported_namespace!=\"\"} or {exported_pod!=\"\"})");
    assert!(!has_data(&exported), "series with exported_* labels: the scrape overrode the agent's labels: {exported}");
    let holders = values_by(&instant("nodelens_gpu_allocated"), &["namespace", "pod"]);
    let pods: Vec<String> = holders.keys().map(|k| k.join("/")).collect();
    assert_eq!(pods, ["ml/bert-0", "ml/notebook-0", "ml/resnet-0"], "{holders:?}");

    // The numbers: the H100 HAMi shares between resnet and bert is one GPU, half each; it is 80%
    // busy, so only dave's L4 is allocated but idle.
    let panel = |reference: &str| {
        let expr = views::query_by_reference(reference).unwrap();
        views::substitute(&expr, "10s", &vars)
    };
    let held = wait_for("the GPU shares to be recorded", context, || {
        let held = values_by(&instant("user:nodelens_gpu_allocated:sum"), &["user"]);
        (held.len() == 3).then_some(held)
    });
    let by_user: Vec<(String, f64)> = held.into_iter().map(|(k, v)| (k[0].clone(), v)).collect();
    assert_eq!(by_user, [("alice".to_string(), 0.5), ("bob".to_string(), 0.5), ("dave".to_string(), 1.0)]);
    let stat = |reference: &str| values_by(&instant(&panel(reference)), &[]).into_values().next().unwrap();
    assert_eq!(stat("nodelens-cluster / GPUs allocated / A"), 2.0);
    assert_eq!(stat("nodelens-cluster / Allocated but idle / A"), 1.0);
    assert_eq!(stat("nodelens-cluster / GPUs lost / A"), 1.0);
    assert_eq!(stat("nodelens-user / GPUs held / A"), 0.5, "alice holds half the H100");

    // A node kube-state-metrics lists but where no agent is scraped pages; the node whose
    // agent is scraped does not.
    let down = wait_for("NodelensAgentDown at the webhook", context, || {
        let all: Vec<Value> = received.lock().unwrap().iter().flat_map(|n| n["alerts"].as_array().cloned().unwrap_or_default()).collect();
        let down: Vec<Value> = all.into_iter().filter(|a| a["labels"]["alertname"] == "NodelensAgentDown").collect();
        (!down.is_empty()).then_some(down)
    });
    assert!(down.iter().all(|a| a["labels"]["node"] == "cpu-node-2"), "{down:?}");

    // The lost A100 also lowers the node's GPU count: Alertmanager holds that alert back
    // (the shipped inhibition rules), and the webhook never hears of it.
    let suppressed = wait_for("NodeGpuCountDropped inhibited in Alertmanager", context, || {
        let (_, body) = http_get(monitoring.alertmanager, "/api/v2/alerts?filter=alertname%3D%22NodeGpuCountDropped%22");
        let alerts: Value = serde_json::from_str(&body).ok()?;
        let alert = alerts.as_array()?.first()?.clone();
        (alert["status"]["state"] == "suppressed").then_some(alert)
    });
    assert!(!suppressed["status"]["inhibitedBy"].as_array().unwrap().is_empty(), "{suppressed}");
    std::thread::sleep(Duration::from_secs(3));
    let notified: Vec<String> = received
        .lock()
        .unwrap()
        .iter()
        .flat_map(|n| n["alerts"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["labels"]["alertname"].as_str().map(String::from))
        .collect();
    assert!(!notified.iter().any(|n| n == "NodeGpuCountDropped"), "an inhibited alert was sent: {notified:?}");
    agent.terminate();
}
