//! End to end: the real `nodelens` binary loads the fake NVML library through
//! `gpu.nvml_library`, asks the fake kubelet pod-resources service which container holds which
//! GPU, reads a fake `/proc` for the GPU processes' cgroups and the fake API server for pod
//! metadata, and `/metrics` must say exactly who uses how much of which GPU: on time-sliced
//! and MIG GPUs, through processes exiting, XID events, a GPU lost from the bus and an older
//! driver missing a function.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodelens_testkit::agent::{metric_sum, Agent};
use nodelens_testkit::gpu::scenario::{
    Fabric, Gpm, Gpu, MigInstance, NvLink, Process, RemappedRows, RetiredPages, Scenario, Violations, XidEvent, SCENARIO_ENV,
};
use nodelens_testkit::gpu::{nvml_library, without_symbol, Allocated, Cgroup, FakePodResources, FakeProc, Workload};
use nodelens_testkit::kubernetes::{pod_with_ids, FakeApiServer};
use serde_json::json;

const NODE: &str = "gpu-node-1";
const WAIT: Duration = Duration::from_secs(20);
const H100: &str = "GPU-0f0e0d0c-0b0a-4908-8706-050403020100";
const A100: &str = "GPU-a1a1a1a1-0000-4000-8000-000000000001";
const MIG_1G: &str = "MIG-11111111-1111-5111-8111-111111111111";
const MIG_3G: &str = "MIG-33333333-3333-5333-8333-333333333333";
const L4: &str = "GPU-14141414-0000-4000-8000-000000000014";
const H100_MIG: &str = "GPU-4d4d4d4d-0000-4000-8000-000000000001";
const MIB: f64 = 1_048_576.0;
const GIB: u64 = 1 << 30;

/// The node's workloads: resnet and bert time-sliced on the H100, mig-job in a MIG instance,
/// and dave's notebook, which holds the L4 and runs nothing on it.
fn workloads() -> Vec<Workload> {
    vec![
        Workload::new("resnet-0", "aaaaaaaa-0000-4000-8000-000000000001", "resnet", "alice", 'a', Some(4101), Cgroup::V2SystemdContainerd),
        Workload::new("bert-0", "bbbbbbbb-0000-4000-8000-000000000002", "bert", "bob", 'b', Some(4202), Cgroup::V2SystemdCrio),
        Workload::new(
            "mig-job-0",
            "cccccccc-0000-4000-8000-000000000003",
            "mig-job",
            "carol",
            'c',
            Some(4303),
            Cgroup::V1CgroupfsGuaranteed,
        ),
        Workload::new("notebook-0", "dddddddd-0000-4000-8000-000000000004", "notebook", "dave", 'd', None, Cgroup::V2Namespaced),
    ]
}

fn h100(processes: Vec<Process>) -> Gpu {
    Gpu {
        uuid: H100.into(),
        name: "NVIDIA H100 80GB HBM3".into(),
        utilization_percent: 80,
        memory_utilization_percent: 35,
        memory_total_bytes: 80 * GIB,
        memory_used_bytes: 30 * GIB,
        temperature_celsius: 61,
        power_milliwatts: 412_500,
        power_limit_milliwatts: 700_000,
        energy_millijoules: 123_456_789,
        sm_clock_mhz: 1980,
        throttle_reasons: 0x4,
        ecc_corrected: Some(3),
        ecc_uncorrected: Some(0),
        processes,
        ..Gpu::default()
    }
}

fn process(pid: u32, memory: u64, sm_percent: u32) -> Process {
    Process { pid, used_memory_bytes: memory, sm_percent, ..Process::default() }
}

/// GPU 0 (H100) time-sliced between resnet (30% SM, 10 GiB) and bert (50%, 20 GiB); GPU 1
/// (A100) in MIG mode with mig-job in the 1g instance; GPU 2 (L4, no ECC) allocated to an
/// idle notebook.
fn scenario() -> Scenario {
    Scenario {
        driver_version: "550.54.15".into(),
        gpus: vec![
            h100(vec![process(4101, 10 * GIB, 30), process(4202, 20 * GIB, 50)]),
            Gpu {
                uuid: A100.into(),
                name: "NVIDIA A100-SXM4-40GB".into(),
                memory_total_bytes: 40 * GIB,
                temperature_celsius: 40,
                processes: vec![Process {
                    pid: 4303,
                    used_memory_bytes: 4 * GIB,
                    gpu_instance: Some(1),
                    sm_percent: 90,
                    ..Process::default()
                }],
                mig: vec![
                    MigInstance {
                        uuid: MIG_1G.into(),
                        profile: "1g.5gb".into(),
                        gpu_instance: 1,
                        memory_total_bytes: 5 * GIB,
                        memory_used_bytes: 4 * GIB,
                        ..MigInstance::default()
                    },
                    MigInstance {
                        uuid: MIG_3G.into(),
                        profile: "3g.20gb".into(),
                        gpu_instance: 2,
                        memory_total_bytes: 20 * GIB,
                        memory_used_bytes: 0,
                        ..MigInstance::default()
                    },
                ],
                ..Gpu::default()
            },
            Gpu { uuid: L4.into(), name: "NVIDIA L4".into(), memory_total_bytes: 24 * GIB, temperature_celsius: 35, ..Gpu::default() },
        ],
    }
}

struct Node {
    dir: tempfile::TempDir,
    api: FakeApiServer,
    kubelet: FakePodResources,
    proc: FakeProc,
    scenario: PathBuf,
}

impl Node {
    fn new() -> Node {
        Node::with(scenario())
    }

    fn with(scenario: Scenario) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pods")).unwrap();
        let api = FakeApiServer::start();
        let kubelet = FakePodResources::start(&dir.path().join("kubelet.sock"));
        let proc = FakeProc::new(&dir.path().join("proc"));
        for w in workloads() {
            let labels = json!({"app": w.app, "user": w.user});
            api.apply(pod_with_ids("ml", w.pod, w.uid, NODE, labels, &[("main", w.id.as_str())]));
            w.add_process(&proc);
        }
        kubelet.set(vec![
            Allocated::new("ml", "resnet-0", "main", "nvidia.com/gpu", &[&format!("{H100}::0")]),
            Allocated::new("ml", "bert-0", "main", "nvidia.com/gpu", &[&format!("{H100}::3")]),
            Allocated::new("ml", "mig-job-0", "main", "nvidia.com/mig-1g.5gb", &[MIG_1G]),
            Allocated::new("ml", "notebook-0", "main", "nvidia.com/gpu", &[L4]),
            Allocated::new("ml", "cpu-only-0", "main", "example.com/fpga", &["fpga-0"]),
        ]);
        let scenario_path = dir.path().join("scenario.json");
        scenario.write(&scenario_path).unwrap();
        Node { dir, api, kubelet, proc, scenario: scenario_path }
    }

    fn start(&self, library: &Path, gpu_extra: &str) -> Agent {
        self.start_polling(library, "200ms", gpu_extra)
    }

    fn start_polling(&self, library: &Path, poll_interval: &str, gpu_extra: &str) -> Agent {
        let kubeconfig = self.dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, self.api.kubeconfig()).unwrap();
        let config = self.dir.path().join("nodelens.yaml");
        let text = format!(
            "node_name: {NODE}\nstate_dir: {state}\nhost:\n  proc_root: {proc}\nlogs:\n  pods_dir: {pods}\nkubernetes:\n  enabled: true\n  kubeconfig: {kc}\n  pod_resources_socket: {sock}\ngpu:\n  nvml_library: {lib}\n  poll_interval: {poll_interval}\n{gpu_extra}metrics:\n  listen: 127.0.0.1:0\n",
            state = self.dir.path().join("state").display(),
            proc = self.proc.root.display(),
            pods = self.dir.path().join("pods").display(),
            kc = kubeconfig.display(),
            sock = self.kubelet.socket.display(),
            lib = library.display(),
        );
        std::fs::write(&config, text).unwrap();
        let scenario = self.scenario.display().to_string();
        Agent::start(Path::new(env!("CARGO_BIN_EXE_nodelens")), &config, &[(SCENARIO_ENV, scenario.as_str())])
    }
}

/// Scrapes until `done` holds for the exposition, panicking with the last one after `WAIT`.
fn scrape_until(agent: &Agent, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = agent.get("/metrics");
        if status == 200 && done(&body) {
            return body;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}\n--- metrics ---\n{body}\n--- log ---\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the one series of `name` with exactly these labels (besides `node`).
fn value(exposition: &str, name: &str, labels: &str) -> Option<f64> {
    let series = format!("{name}{{node=\"{NODE}\",{labels}}} ");
    exposition.lines().find_map(|l| l.strip_prefix(series.as_str())).map(|v| v.parse().unwrap())
}

fn container(gpu: u32, uuid: &str, pod: &str, app: &str, user: &str) -> String {
    format!("gpu=\"{gpu}\",uuid=\"{uuid}\",namespace=\"ml\",pod=\"{pod}\",container=\"main\",app=\"{app}\",user=\"{user}\"")
}

#[test]
fn shared_gpus_are_attributed_to_each_container_app_and_user() {
    let node = Node::new();
    let agent = node.start(&nvml_library(), "");
    let resnet = container(0, H100, "resnet-0", "resnet", "alice");
    let bert = container(0, H100, "bert-0", "bert", "bob");
    let mig_job = container(1, MIG_1G, "mig-job-0", "mig-job", "carol");
    let notebook = container(2, L4, "notebook-0", "notebook", "dave");
    let m = scrape_until(&agent, "attribution of all four pods", |m| {
        [&resnet, &bert, &mig_job, &notebook].iter().all(|c| value(m, "nodelens_gpu_allocated", c).is_some())
            && value(m, "nodelens_container_gpu_utilization_ratio", &bert).is_some()
    });

    // Time-slicing: each pod gets its own processes' SM share.
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &resnet), Some(0.3), "{m}");
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &bert), Some(0.5));
    assert_eq!(value(&m, "nodelens_container_gpu_memory_used_bytes", &resnet), Some((10 * GIB) as f64));
    assert_eq!(value(&m, "nodelens_container_gpu_memory_used_bytes", &bert), Some((20 * GIB) as f64));
    // MIG: memory of the instance's process; NVML has no per-process SM samples under MIG.
    assert_eq!(value(&m, "nodelens_container_gpu_memory_used_bytes", &mig_job), Some((4 * GIB) as f64));
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &mig_job), None);
    // Allocated but idle.
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &notebook), Some(0.0));
    assert_eq!(metric_sum(&m, "nodelens_gpu_allocated", &[]), 4.0, "the FPGA is not a GPU");

    // Per GPU, in base units.
    let h = format!("gpu=\"0\",uuid=\"{H100}\",model=\"NVIDIA H100 80GB HBM3\"");
    assert_eq!(value(&m, "nodelens_gpu_info", &format!("{h},driver_version=\"550.54.15\"")), Some(1.0));
    assert_eq!(value(&m, "nodelens_gpu_up", &h), Some(1.0));
    assert_eq!(value(&m, "nodelens_gpu_utilization_ratio", &h), Some(0.8));
    assert_eq!(value(&m, "nodelens_gpu_memory_utilization_ratio", &h), Some(0.35));
    assert_eq!(value(&m, "nodelens_gpu_memory_used_bytes", &h), Some((30 * GIB) as f64));
    assert_eq!(value(&m, "nodelens_gpu_memory_total_bytes", &h), Some((80 * GIB) as f64));
    assert_eq!(value(&m, "nodelens_gpu_temperature_celsius", &h), Some(61.0));
    assert_eq!(value(&m, "nodelens_gpu_power_watts", &h), Some(412.5));
    assert_eq!(value(&m, "nodelens_gpu_power_limit_watts", &h), Some(700.0));
    assert_eq!(value(&m, "nodelens_gpu_energy_joules_total", &h), Some(123_456.789));
    assert_eq!(value(&m, "nodelens_gpu_sm_clock_hertz", &h), Some(1.98e9));
    assert_eq!(value(&m, "nodelens_gpu_throttled", &format!("{h},reason=\"sw_power_cap\"")), Some(1.0));
    assert_eq!(value(&m, "nodelens_gpu_throttled", &format!("{h},reason=\"hw_slowdown\"")), Some(0.0));
    assert_eq!(value(&m, "nodelens_gpu_ecc_errors_total", &format!("{h},type=\"corrected\"")), Some(3.0));
    assert_eq!(value(&m, "nodelens_gpu_ecc_errors_total", &format!("{h},type=\"uncorrected\"")), Some(0.0));
    let mig = format!("gpu=\"1\",uuid=\"{MIG_1G}\",model=\"NVIDIA A100-SXM4-40GB\",mig_profile=\"1g.5gb\",gpu_instance=\"1\"");
    assert_eq!(value(&m, "nodelens_gpu_memory_total_bytes", &mig), Some((5 * GIB) as f64));
    assert_eq!(value(&m, "nodelens_gpu_up", &mig), Some(1.0));
    let l4 = format!("gpu=\"2\",uuid=\"{L4}\",model=\"NVIDIA L4\"");
    assert_eq!(metric_sum(&m, "nodelens_gpu_ecc_errors_total", &[&format!("uuid=\"{L4}\"")]), 0.0);
    assert!(!m.contains(&format!("nodelens_gpu_ecc_errors_total{{node=\"{NODE}\",{l4}")), "no ECC on the L4: no series");

    // Per physical GPU and kind, from 0 before any XID (so increase() sees the first one).
    for kind in ["hardware", "application"] {
        assert_eq!(value(&m, "nodelens_gpu_xid_events_total", &format!("{h},kind=\"{kind}\"")), Some(0.0), "{kind}");
    }
    assert!(!m.contains(&format!("nodelens_gpu_xid_events_total{{node=\"{NODE}\",{mig}")), "XIDs belong to the physical GPU");

    // bert's process exits and resnet gets busier; two XID 79s and an XID 13 on the H100.
    node.proc.remove(4202);
    let mut next = scenario();
    next.gpus[0] = h100(vec![process(4101, 12 * GIB, 70)]);
    next.gpus[0].xid_events = vec![XidEvent { id: 1, xid: 79 }, XidEvent { id: 2, xid: 13 }, XidEvent { id: 3, xid: 79 }];
    next.write(&node.scenario).unwrap();
    let xid = |x: u64| format!("{h},xid=\"{x}\"");
    let m = scrape_until(&agent, "the exit, new samples and XIDs", |m| {
        value(m, "nodelens_container_gpu_utilization_ratio", &resnet) == Some(0.7)
            && value(m, "nodelens_gpu_xid_errors_total", &xid(79)) == Some(2.0)
            && value(m, "nodelens_container_gpu_memory_used_bytes", &bert) == Some(0.0)
    });
    assert_eq!(value(&m, "nodelens_gpu_xid_errors_total", &xid(13)), Some(1.0));
    assert_eq!(value(&m, "nodelens_gpu_xid_events_total", &format!("{h},kind=\"hardware\"")), Some(2.0), "79 twice");
    assert_eq!(value(&m, "nodelens_gpu_xid_events_total", &format!("{h},kind=\"application\"")), Some(1.0), "13");
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &bert), Some(0.0), "allocated, no process left: idle");

    // The kubelet frees bert's replica: its series go.
    node.kubelet.set(vec![
        Allocated::new("ml", "resnet-0", "main", "nvidia.com/gpu", &[&format!("{H100}::0")]),
        Allocated::new("ml", "mig-job-0", "main", "nvidia.com/mig-1g.5gb", &[MIG_1G]),
        Allocated::new("ml", "notebook-0", "main", "nvidia.com/gpu", &[L4]),
    ]);
    scrape_until(&agent, "bert's series to go", |m| {
        !m.lines()
            .any(|l| (l.starts_with("nodelens_gpu_allocated") || l.starts_with("nodelens_container_gpu")) && l.contains("pod=\"bert-0\""))
    });

    // The L4 falls off the bus: it reads down, the rest of the node's metrics keep flowing.
    let mut lost = next.clone();
    lost.gpus[2].lost = true;
    lost.gpus[0].utilization_percent = 55;
    lost.write(&node.scenario).unwrap();
    let m = scrape_until(&agent, "the L4 down", |m| value(m, "nodelens_gpu_up", &l4) == Some(0.0));
    let m = if value(&m, "nodelens_gpu_utilization_ratio", &h) == Some(0.55) {
        m
    } else {
        scrape_until(&agent, "the H100 still read", |m| value(m, "nodelens_gpu_utilization_ratio", &h) == Some(0.55))
    };
    assert_eq!(value(&m, "nodelens_gpu_temperature_celsius", &l4), None, "nothing but up=0 for a lost GPU");
    assert_eq!(value(&m, "nodelens_gpu_info", &format!("{l4},driver_version=\"550.54.15\"")), Some(1.0), "still listed");
    assert_eq!(value(&m, "nodelens_gpu_up", &h), Some(1.0));
    assert!(node.kubelet.calls() >= 3, "the allocations were asked for every poll");

    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("GPU metrics on"), "{log}");
}

#[test]
fn an_older_driver_without_a_function_turns_off_only_its_metric() {
    let node = Node::new();
    let old = without_symbol(&nvml_library(), "nvmlDeviceGetTotalEnergyConsumption", node.dir.path());
    let agent = node.start(&old, "");
    let h = format!("gpu=\"0\",uuid=\"{H100}\",model=\"NVIDIA H100 80GB HBM3\"");
    let resnet = container(0, H100, "resnet-0", "resnet", "alice");
    // Attribution needs the pod list and a second poll's samples: wait for it too.
    let m = scrape_until(&agent, "the H100 read and attributed", |m| {
        value(m, "nodelens_gpu_power_watts", &h).is_some() && value(m, "nodelens_container_gpu_utilization_ratio", &resnet).is_some()
    });
    assert!(!m.contains("nodelens_gpu_energy_joules_total{"), "{m}");
    assert_eq!(value(&m, "nodelens_gpu_temperature_celsius", &h), Some(61.0));
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &resnet), Some(0.3));
    std::thread::sleep(Duration::from_millis(600));
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("lacks the function").count(), 1, "one warning, not one per poll: {log}");
    assert!(log.contains("total_energy_consumption"), "{log}");
}

#[test]
fn without_nvml_the_agent_runs_without_gpu_metrics_unless_gpus_are_required() {
    let node = Node::new();
    let missing = node.dir.path().join("no-such-libnvidia-ml.so.1");
    let agent = node.start(&missing, "");
    let (status, _) = agent.get("/readyz");
    let deadline = Instant::now() + WAIT;
    let mut ready = status == 200;
    while !ready && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        ready = agent.get("/readyz").0 == 200;
    }
    assert!(ready, "{}", agent.log());
    let (_, m) = agent.get("/metrics");
    assert!(!m.contains("nodelens_gpu_up{") && m.contains("nodelens_build_info{"), "{m}");
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("GPU metrics off").count(), 1, "{log}");
    assert!(log.contains("no-such-libnvidia-ml.so.1"), "the line names the library: {log}");

    let (status, _, log) = node.start(&missing, "  enabled: true\n").wait_exit(WAIT);
    assert!(!status.success(), "gpu.enabled: true without NVML is an error: {log}");
    assert!(log.contains("gpu.enabled is true"), "{log}");
}

/// What the GPM counters of a busy Hopper GPU measure.
fn gpm(sm_active_percent: f64) -> Gpm {
    Gpm {
        graphics_percent: 80.0,
        sm_active_percent,
        sm_occupancy_percent: 25.0,
        tensor_active_percent: 30.0,
        dram_active_percent: 55.0,
        fp64_active_percent: 1.0,
        fp32_active_percent: 12.0,
        fp16_active_percent: 3.0,
        pcie_tx_mib_per_s: 1000.0,
        pcie_rx_mib_per_s: 500.0,
        nvlink_tx_mib_per_s: 2000.0,
        nvlink_rx_mib_per_s: 4000.0,
    }
}

/// GPU 0: an H100 with GPM, time-sliced between resnet (steady 30 %) and bert, which runs
/// kernels at 90 % in one driver sample period of every six; two rows remapped, one pending.
/// GPU 1: an H100 in MIG mode, mig-job in its 1g instance. GPU 2: an L4, no GPM, PCIe from the
/// legacy sensor.
fn hopper_scenario() -> Scenario {
    let bursty = Process { pid: 4202, used_memory_bytes: 20 * GIB, sm_percent: 90, burst_cycle: 6, burst_busy: 1, ..Process::default() };
    let mut h = h100(vec![process(4101, 10 * GIB, 30), bursty]);
    h.gpm = Some(gpm(42.0));
    // The driver keeps 1.83 s of per-process samples, less than a 2 s poll holds (and 0.6 s
    // more than the agent's 1.2 s between fetches at most, for a stalled thread).
    h.samples_kept = 11;
    h.remapped_rows = Some(RemappedRows { correctable: 2, uncorrectable: 1, pending: true, failed: false });
    let instance = |uuid: &str, profile: &str, gpu_instance, gpm| MigInstance {
        uuid: uuid.into(),
        profile: profile.into(),
        gpu_instance,
        memory_total_bytes: 10 * GIB,
        memory_used_bytes: 0,
        gpm: Some(gpm),
        ..MigInstance::default()
    };
    let mig = Gpu {
        uuid: H100_MIG.into(),
        name: "NVIDIA H100 80GB HBM3".into(),
        memory_total_bytes: 80 * GIB,
        temperature_celsius: 45,
        gpm: Some(gpm(20.0)),
        processes: vec![Process { pid: 4303, used_memory_bytes: 4 * GIB, gpu_instance: Some(1), ..Process::default() }],
        mig: vec![
            instance(
                MIG_1G,
                "1g.10gb",
                1,
                Gpm { graphics_percent: 64.0, sm_active_percent: 50.0, tensor_active_percent: 45.0, ..Gpm::default() },
            ),
            instance(MIG_3G, "3g.40gb", 2, Gpm::default()),
        ],
        ..Gpu::default()
    };
    let l4 = Gpu {
        uuid: L4.into(),
        name: "NVIDIA L4".into(),
        memory_total_bytes: 24 * GIB,
        pcie_tx_kb_per_s: 20_480,
        pcie_rx_kb_per_s: 10_240,
        ..Gpu::default()
    };
    Scenario { driver_version: "560.35.03".into(), gpus: vec![h, mig, l4] }
}

fn close(actual: Option<f64>, expected: f64, what: &str, m: &str) {
    let a = actual.unwrap_or_else(|| panic!("no {what}\n{m}"));
    assert!((a - expected).abs() < 1e-6, "{what}: {a}, expected {expected}");
}

/// The per-second rate of each counter between two of its changes seen `changes` apart (the
/// first value read is not a change: it was reached at an unknown time). The counters move
/// only when the agent polls, so whole polls are measured. Each counter must only grow.
fn rates(agent: &Agent, series: &[(&str, String)], changes: usize) -> Vec<f64> {
    let deadline = Instant::now() + WAIT * 2;
    let mut seen: Vec<Vec<(Instant, f64)>> = vec![Vec::new(); series.len()];
    while seen.iter().any(|s| s.len() <= changes + 1) && Instant::now() < deadline {
        let (_, m) = agent.get("/metrics");
        let at = Instant::now();
        for ((name, labels), s) in series.iter().zip(seen.iter_mut()) {
            if let Some(v) = value(&m, name, labels) {
                if s.last().map(|(_, last)| *last) != Some(v) {
                    s.push((at, v));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    series
        .iter()
        .zip(seen)
        .map(|((name, labels), s)| {
            assert!(s.len() > changes + 1, "{name}{{{labels}}} did not move {} times: {s:?}", changes + 1);
            assert!(s.windows(2).all(|w| w[1].1 > w[0].1), "{name}{{{labels}}} went backwards: {s:?}");
            let ((t0, v0), (t1, v1)) = (s[1], s[changes + 1]);
            (v1 - v0) / (t1 - t0).as_secs_f64()
        })
        .collect()
}

#[test]
fn hopper_gpus_export_profiling_metrics_per_gpu_and_mig_instance_with_time_weighted_shares() {
    let node = Node::with(hopper_scenario());
    let agent = node.start_polling(&nvml_library(), "2s", "");
    let h = format!("gpu=\"0\",uuid=\"{H100}\",model=\"NVIDIA H100 80GB HBM3\"");
    let parent = format!("gpu=\"1\",uuid=\"{H100_MIG}\",model=\"NVIDIA H100 80GB HBM3\"");
    let mig = format!("gpu=\"1\",uuid=\"{MIG_1G}\",model=\"NVIDIA H100 80GB HBM3\",mig_profile=\"1g.10gb\",gpu_instance=\"1\"");
    let mig_3g = format!("gpu=\"1\",uuid=\"{MIG_3G}\",model=\"NVIDIA H100 80GB HBM3\",mig_profile=\"3g.40gb\",gpu_instance=\"2\"");
    let l4 = format!("gpu=\"2\",uuid=\"{L4}\",model=\"NVIDIA L4\"");
    let bert = container(0, H100, "bert-0", "bert", "bob");
    let mig_job = container(1, MIG_1G, "mig-job-0", "mig-job", "carol");
    let m = scrape_until(&agent, "GPM metrics and the MIG instance's container", |m| {
        value(m, "nodelens_gpu_sm_active_ratio", &h).is_some() && value(m, "nodelens_container_gpu_utilization_ratio", &mig_job).is_some()
    });

    // Per GPU: GPM's percentages as ratios, each its own metric.
    for (name, expected) in [
        ("sm_active", 0.42),
        ("sm_occupancy", 0.25),
        ("tensor_active", 0.30),
        ("dram_active", 0.55),
        ("fp64_active", 0.01),
        ("fp32_active", 0.12),
        ("fp16_active", 0.03),
    ] {
        close(value(&m, &format!("nodelens_gpu_{name}_ratio"), &h), expected, name, &m);
    }
    assert_eq!(value(&m, "nodelens_gpu_utilization_ratio", &h), Some(0.8), "NVML's utilization stays NVML's");
    // MIG: each instance measured on its own; its utilization is GPM's graphics activity, and
    // the one container on it gets it.
    close(value(&m, "nodelens_gpu_sm_active_ratio", &parent), 0.20, "the MIG GPU's own SM activity", &m);
    close(value(&m, "nodelens_gpu_sm_active_ratio", &mig), 0.50, "the 1g instance's SM activity", &m);
    close(value(&m, "nodelens_gpu_tensor_active_ratio", &mig), 0.45, "the 1g instance's tensor activity", &m);
    close(value(&m, "nodelens_gpu_utilization_ratio", &mig), 0.64, "the 1g instance's utilization", &m);
    close(value(&m, "nodelens_gpu_sm_active_ratio", &mig_3g), 0.0, "the idle 3g instance", &m);
    close(value(&m, "nodelens_container_gpu_utilization_ratio", &mig_job), 0.64, "mig-job's utilization", &m);
    assert!(!m.lines().any(|l| l.starts_with("nodelens_gpu_pcie_bytes_total") && l.contains("MIG-")), "traffic is per GPU only");
    // No GPM on the L4: no profiling series, one line saying so.
    assert!(!m.lines().any(|l| l.starts_with("nodelens_gpu_") && l.contains("_active_ratio") && l.contains(L4)), "{m}");
    // Row remapping.
    assert_eq!(value(&m, "nodelens_gpu_remapped_rows_total", &format!("{h},cause=\"correctable\"")), Some(2.0));
    assert_eq!(value(&m, "nodelens_gpu_remapped_rows_total", &format!("{h},cause=\"uncorrectable\"")), Some(1.0));
    assert_eq!(value(&m, "nodelens_gpu_row_remap_pending", &h), Some(1.0));
    assert_eq!(value(&m, "nodelens_gpu_row_remap_failed", &h), Some(0.0));
    assert_eq!(value(&m, "nodelens_gpu_row_remap_failed", &l4), None, "the L4's driver answers NOT_SUPPORTED: no series");

    // Traffic: bytes per second over whole polls, at GPM's MiB/s and the legacy sensor's KB/s
    // (read one direction per poll, in turn).
    let traffic = [
        ("nodelens_gpu_pcie_bytes_total", format!("{h},direction=\"tx\""), 1000.0 * MIB),
        ("nodelens_gpu_nvlink_bytes_total", format!("{h},direction=\"rx\""), 4000.0 * MIB),
        ("nodelens_gpu_pcie_bytes_total", format!("{l4},direction=\"rx\""), 10_240.0 * 1024.0),
    ];
    let check_traffic = |when: &str| {
        let series: Vec<_> = traffic.iter().map(|(name, labels, _)| (*name, labels.clone())).collect();
        for (rate, (name, labels, expected)) in rates(&agent, &series, 2).into_iter().zip(&traffic) {
            assert!((rate / expected - 1.0).abs() < 0.1, "{when}: {name}{{{labels}}}: {rate} B/s, expected {expected}");
        }
    };
    check_traffic("running");

    // bert's share is its samples over the window: 90 % in 1 of 6 periods is 15 %, never the
    // 90 % its samples average.
    let deadline = Instant::now() + WAIT;
    let mut shares = Vec::new();
    while Instant::now() < deadline && !shares.iter().any(|s: &f64| (s - 0.15).abs() < 0.016) {
        shares.extend(value(&agent.get("/metrics").1, "nodelens_container_gpu_utilization_ratio", &bert));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(shares.iter().any(|s| (s - 0.15).abs() < 0.016), "bert's share never read 15 %: {shares:?}");
    assert!(shares.iter().all(|s| *s < 0.25), "a bursty process's share is not its samples' mean: {shares:?}");
    close(
        value(&agent.get("/metrics").1, "nodelens_container_gpu_utilization_ratio", &container(0, H100, "resnet-0", "resnet", "alice")),
        0.3,
        "steady resnet, though the driver keeps fewer samples than a poll holds",
        "",
    );

    // The H100 falls off the bus and comes back, its counters restarted: no poll spans the
    // outage, so the traffic counters neither jump nor go back.
    let before = value(&agent.get("/metrics").1, "nodelens_gpu_pcie_bytes_total", &traffic[0].1).unwrap();
    let mut lost = hopper_scenario();
    lost.gpus[0].lost = true;
    lost.write(&node.scenario).unwrap();
    scrape_until(&agent, "the H100 lost", |m| value(m, "nodelens_gpu_up", &h) == Some(0.0));
    std::thread::sleep(Duration::from_secs(3));
    let mut back = lost;
    back.gpus[0].lost = false;
    back.write(&node.scenario).unwrap();
    scrape_until(&agent, "the H100 back", |m| value(m, "nodelens_gpu_up", &h) == Some(1.0));
    check_traffic("after the GPU came back");
    let after = value(&agent.get("/metrics").1, "nodelens_gpu_pcie_bytes_total", &traffic[0].1).unwrap();
    assert!(after >= before, "{after} < {before}");

    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("no GPM on this GPU").count(), 1, "one line, for the L4: {log}");
    assert!(!log.contains("lacks the function") && !log.contains("WARN"), "{log}");
}

#[test]
fn a_driver_without_gpm_exports_everything_else_and_says_so_once() {
    let node = Node::with(hopper_scenario());
    let old = without_symbol(&nvml_library(), "nvmlGpmMetricsGet", node.dir.path());
    let agent = node.start(&old, "");
    let h = format!("gpu=\"0\",uuid=\"{H100}\",model=\"NVIDIA H100 80GB HBM3\"");
    let m = scrape_until(&agent, "the H100 read with PCIe from the legacy sensor", |m| {
        value(m, "nodelens_gpu_pcie_bytes_total", &format!("{h},direction=\"tx\"")).is_some()
    });
    assert!(!m.contains("_active_ratio{"), "{m}");
    assert_eq!(value(&m, "nodelens_gpu_row_remap_pending", &h), Some(1.0));
    assert_eq!(value(&m, "nodelens_gpu_utilization_ratio", &h), Some(0.8));
    std::thread::sleep(Duration::from_millis(600));
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("has no GPM").count(), 1, "{log}");
    assert!(log.contains("nvmlGpmMetricsGet") && !log.contains("lacks the function"), "{log}");
}

#[test]
fn gpus_allocated_through_dra_claims_are_attributed() {
    // Minor numbers differ from NVML indexes, as DRA device names use the minor.
    let mut scenario = hopper_scenario();
    (scenario.gpus[0].minor, scenario.gpus[1].minor, scenario.gpus[2].minor) = (Some(3), Some(0), Some(1));
    let placements = [(MIG_1G, 19, 6, 1), (MIG_3G, 9, 0, 4)];
    for m in scenario.gpus[1].mig.iter_mut() {
        let &(_, profile_id, start, size) = placements.iter().find(|p| p.0 == m.uuid).unwrap();
        (m.profile_id, m.placement_start, m.placement_size) = (profile_id, start, size);
    }
    let node = Node::with(scenario);
    node.kubelet.set(vec![
        // One claim shared by two pods' containers: both hold the GPU.
        Allocated::claim("ml", "resnet-0", "main", "shared-h100", &["gpu-3"]),
        Allocated::claim("ml", "bert-0", "main", "shared-h100", &["gpu-3"]),
        Allocated::claim("ml", "mig-job-0", "main", "one-slice", &["gpu-0-mig-1g10gb-19-6"]),
        Allocated::claim("ml", "notebook-0", "main", "notebook-gpu", &["gpu-1"]),
        // Another driver's device, and a device-plugin GPU beside claims.
        Allocated { resource: "nic.example.com".into(), ..Allocated::claim("ml", "notebook-0", "main", "nic", &["gpu-9"]) },
    ]);
    let agent = node.start(&nvml_library(), "");
    let resnet = container(0, H100, "resnet-0", "resnet", "alice");
    let bert = container(0, H100, "bert-0", "bert", "bob");
    let mig_job = container(1, MIG_1G, "mig-job-0", "mig-job", "carol");
    let notebook = container(2, L4, "notebook-0", "notebook", "dave");
    let m = scrape_until(&agent, "the claimed GPUs attributed", |m| {
        [&resnet, &bert, &mig_job, &notebook].iter().all(|c| value(m, "nodelens_gpu_allocated", c).is_some())
            && value(m, "nodelens_container_gpu_utilization_ratio", &mig_job).is_some()
            && value(m, "nodelens_container_gpu_utilization_ratio", &resnet).is_some()
    });
    assert_eq!(metric_sum(&m, "nodelens_gpu_allocated", &[]), 4.0, "the NIC's claim is not a GPU: {m}");
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &resnet), Some(0.3));
    close(value(&m, "nodelens_container_gpu_utilization_ratio", &mig_job), 0.64, "mig-job's slice", &m);
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &notebook), Some(0.0), "claimed and idle");
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("placements"), "{log}");

    // An agent NVML refuses GPU instance lookups to: whole GPUs are still found, the MIG claim
    // is not, and the log says so once.
    let mut denied = hopper_scenario();
    (denied.gpus[0].minor, denied.gpus[1].minor, denied.gpus[2].minor) = (Some(3), Some(0), Some(1));
    denied.gpus[1].gpu_instances_denied = true;
    denied.write(&node.scenario).unwrap();
    let agent = node.start(&nvml_library(), "");
    let m = scrape_until(&agent, "the whole GPUs' claims attributed", |m| {
        [&resnet, &bert, &notebook].iter().all(|c| value(m, "nodelens_gpu_allocated", c).is_some())
    });
    assert_eq!(value(&m, "nodelens_gpu_allocated", &mig_job), None, "{m}");
    std::thread::sleep(Duration::from_millis(500));
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("does not give MIG instance placements").count(), 1, "{log}");
}

const HAMI_A: &str = "GPU-4a4a4a4a-0000-4000-8000-000000000001";
/// Its last group is all digits, like the `-<n>` HAMi appends.
const HAMI_B: &str = "GPU-4b4b4b4b-0000-4000-8000-000000000002";

/// HAMi (v2.9 layout) shares two GPUs of a node; a third, an L4, is outside HAMi and held
/// whole. slice-a (an init container, then main: 30% of the SMs, 8000 MiB) runs on HAMI_A;
/// slice-b (50%, 16000 MiB) is idle on HAMI_A, though the kubelet picked one of HAMI_B's ids
/// for it; broken's annotation cannot be read, its process runs on HAMI_A.
#[test]
fn hami_slices_are_attributed_where_hami_placed_them_with_their_grants() {
    use nodelens_testkit::kubernetes::{hami_devices, with_hami};
    let gpu = |uuid: &str, name: &str, processes| Gpu {
        uuid: uuid.into(),
        name: name.into(),
        memory_total_bytes: 80 * GIB,
        memory_used_bytes: 13 * GIB,
        processes,
        ..Gpu::default()
    };
    let node = Node::with(Scenario {
        driver_version: "550.54.15".into(),
        gpus: vec![
            gpu(HAMI_A, "NVIDIA H100 80GB HBM3", vec![process(5101, 6 * GIB, 20), process(5404, GIB, 5)]),
            gpu(HAMI_B, "NVIDIA H100 80GB HBM3", vec![]),
            Gpu {
                uuid: L4.into(),
                name: "NVIDIA L4".into(),
                memory_total_bytes: 24 * GIB,
                processes: vec![process(5303, 20 * GIB, 90)],
                ..Gpu::default()
            },
        ],
    });
    let pods = [
        ("slice-a", "5a5a5a5a-0000-4000-8000-000000000001", '1', Some(hami_devices(&[&[], &[(HAMI_A, 8000, 30)]])), 5101),
        ("slice-b", "5b5b5b5b-0000-4000-8000-000000000002", '2', Some(hami_devices(&[&[], &[(HAMI_A, 16000, 50)]])), 0),
        ("whole", "5c5c5c5c-0000-4000-8000-000000000003", '3', None, 5303),
        // A device without its cores field.
        ("broken", "5d5d5d5d-0000-4000-8000-000000000004", '4', Some(format!(";{HAMI_A},NVIDIA,16000:;")), 5404),
    ];
    for (pod, uid, digit, annotation, pid) in &pods {
        let id = digit.to_string().repeat(64);
        let mut object = pod_with_ids("ml", pod, uid, NODE, json!({"app": pod, "user": "erin"}), &[("main", id.as_str())]);
        if let Some(annotation) = annotation {
            object = with_hami(object, &["fetch-weights"], annotation);
        }
        node.api.apply(object);
        if *pid != 0 {
            node.proc.add(*pid, 888_000 + u64::from(*pid), &Cgroup::V2SystemdContainerd.render(uid, &id));
        }
    }
    let hami_allocations = || {
        vec![
            Allocated::hami("ml", "slice-a", "main", HAMI_A, 0),
            Allocated::hami("ml", "slice-b", "main", HAMI_B, 1),
            Allocated::new("ml", "whole", "main", "nvidia.com/gpu", &[L4]),
            Allocated::hami("ml", "broken", "main", HAMI_A, 2),
        ]
    };
    node.kubelet.set(hami_allocations());
    let agent = node.start(&nvml_library(), "");
    let slice_a = container(0, HAMI_A, "slice-a", "slice-a", "erin");
    let slice_b = container(0, HAMI_A, "slice-b", "slice-b", "erin");
    let whole = container(2, L4, "whole", "whole", "erin");
    let broken = container(0, HAMI_A, "broken", "broken", "erin");
    let m = scrape_until(&agent, "the HAMi slices placed", |m| {
        value(m, "nodelens_container_gpu_memory_granted_bytes", &slice_b).is_some()
            && value(m, "nodelens_container_gpu_memory_granted_bytes", &slice_a).is_some()
            && value(m, "nodelens_container_gpu_utilization_ratio", &broken).is_some()
            && value(m, "nodelens_gpu_allocated", &whole).is_some()
    });
    assert_eq!(value(&m, "nodelens_gpu_allocated", &slice_a), Some(1.0), "{m}");
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &slice_a), Some(0.2));
    assert_eq!(value(&m, "nodelens_container_gpu_memory_used_bytes", &slice_a), Some((6 * GIB) as f64));
    assert_eq!(value(&m, "nodelens_container_gpu_memory_granted_bytes", &slice_a), Some(8000.0 * MIB));
    assert_eq!(value(&m, "nodelens_container_gpu_cores_granted_ratio", &slice_a), Some(0.3));
    // Granted, idle, on the GPU HAMi placed it on and nowhere else.
    assert_eq!(value(&m, "nodelens_gpu_allocated", &slice_b), Some(1.0));
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &slice_b), Some(0.0));
    assert_eq!(value(&m, "nodelens_container_gpu_memory_granted_bytes", &slice_b), Some(16000.0 * MIB));
    assert_eq!(value(&m, "nodelens_container_gpu_cores_granted_ratio", &slice_b), Some(0.5));
    assert!(!m.lines().any(|l| l.contains(HAMI_B) && l.contains("pod=\"slice-b\"")), "not on the kubelet's pick: {m}");
    // The whole GPU outside HAMi: allocated, no grant series.
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &whole), Some(0.9));
    assert_eq!(value(&m, "nodelens_container_gpu_memory_granted_bytes", &whole), None);
    // The broken annotation: its process still attributes it, without a grant or allocation.
    assert_eq!(value(&m, "nodelens_container_gpu_utilization_ratio", &broken), Some(0.05));
    assert_eq!(value(&m, "nodelens_gpu_allocated", &broken), None);
    assert_eq!(metric_sum(&m, "nodelens_container_gpu_memory_granted_bytes", &[]), 24000.0 * MIB);
    assert_eq!(metric_sum(&m, "nodelens_gpu_allocated", &[]), 3.0);

    // The pod updated (as the kubelet's status updates do): still one warning.
    let (_, uid, digit, annotation, _) = &pods[3];
    let id = digit.to_string().repeat(64);
    let again = pod_with_ids("ml", "broken", uid, NODE, json!({"app": "broken", "user": "erin", "rev": "2"}), &[("main", id.as_str())]);
    node.api.apply(with_hami(again, &["fetch-weights"], annotation.as_deref().unwrap()));
    // The kubelet frees slice-a (its process, still there, keeps its use series): its
    // allocation and grant series go with the allocation.
    node.kubelet.set(hami_allocations().into_iter().filter(|a| a.pod != "slice-a").collect());
    scrape_until(&agent, "slice-a's grant to go", |m| {
        ["nodelens_gpu_allocated", "nodelens_container_gpu_memory_granted_bytes", "nodelens_container_gpu_cores_granted_ratio"]
            .iter()
            .all(|name| value(m, name, &slice_a).is_none())
    });
    let warnings = agent.log().matches("HAMi's allocation annotation cannot be read").count();
    assert_eq!(warnings, 1, "{}", agent.log());
}

/// GPU 0 (H100) with every second-tier reading: 18 NVLink links, the last one down after 7
/// CRC flit errors, an NVSwitch fabric; GPU 2 (an older board, as far as the fake knows)
/// retires pages; GPU 1 (the MIG A100) answers none of them.
fn second_tier_scenario() -> Scenario {
    let mut s = scenario();
    let link = |active, crc_flit| NvLink { active, crc_flit: Some(crc_flit), crc_data: None, replay: Some(2), recovery: Some(1) };
    let h = &mut s.gpus[0];
    h.memory_temperature_celsius = Some(71);
    h.memory_temperature_limit_celsius = Some(95);
    h.memory_clock_mhz = Some(2619);
    h.encoder_percent = Some(12);
    h.decoder_percent = Some(34);
    h.pcie_replays = Some(5);
    h.nvlinks = (0..18).map(|k| link(k != 17, if k == 17 { 7 } else { 3 })).collect();
    h.violations = Violations { power: Some(1_500_000_000), thermal: Some(250_000_000), ..Violations::default() };
    h.fabric = Some(Fabric { state: 3, status: 0, health_mask: 0x22, health_summary: 1, v2_only: false });
    s.gpus[2].retired_pages = Some(RetiredPages { single_bit: 2, double_bit: 1, pending: true });
    s
}

#[test]
fn second_tier_health_is_exported_exactly_and_absent_without_a_per_poll_line_where_a_gpu_has_none() {
    let node = Node::with(second_tier_scenario());
    let agent = node.start(&nvml_library(), "");
    let h = format!("gpu=\"0\",uuid=\"{H100}\",model=\"NVIDIA H100 80GB HBM3\"");
    let l4 = format!("gpu=\"2\",uuid=\"{L4}\",model=\"NVIDIA L4\"");
    let m = scrape_until(&agent, "the second tier read", |m| value(m, "nodelens_gpu_fabric_healthy", &h).is_some());
    assert_eq!(value(&m, "nodelens_gpu_memory_temperature_celsius", &h), Some(71.0));
    assert_eq!(value(&m, "nodelens_gpu_memory_temperature_limit_celsius", &h), Some(95.0));
    assert_eq!(value(&m, "nodelens_gpu_memory_clock_hertz", &h), Some(2.619e9));
    assert_eq!(value(&m, "nodelens_gpu_encoder_utilization_ratio", &h), Some(0.12));
    assert_eq!(value(&m, "nodelens_gpu_decoder_utilization_ratio", &h), Some(0.34));
    assert_eq!(value(&m, "nodelens_gpu_pcie_replays_total", &h), Some(5.0));
    assert_eq!(value(&m, "nodelens_gpu_nvlink_links_active", &h), Some(17.0));
    // The link that is down was never read up: its errors are not in the sum.
    assert_eq!(value(&m, "nodelens_gpu_nvlink_errors_total", &format!("{h},type=\"crc_flit\"")), Some(51.0));
    assert_eq!(value(&m, "nodelens_gpu_nvlink_errors_total", &format!("{h},type=\"replay\"")), Some(34.0));
    assert_eq!(value(&m, "nodelens_gpu_nvlink_errors_total", &format!("{h},type=\"recovery\"")), Some(17.0));
    assert!(!m.contains("type=\"crc_data\""), "a counter the GPU does not keep has no series: {m}");
    assert_eq!(value(&m, "nodelens_gpu_violation_seconds_total", &format!("{h},reason=\"power\"")), Some(1.5));
    assert_eq!(value(&m, "nodelens_gpu_violation_seconds_total", &format!("{h},reason=\"thermal\"")), Some(0.25));
    assert_eq!(value(&m, "nodelens_gpu_violation_seconds_total", &format!("{h},reason=\"sync_boost\"")), None, "{m}");
    assert_eq!(value(&m, "nodelens_gpu_fabric_healthy", &h), Some(1.0));
    assert_eq!(value(&m, "nodelens_gpu_retired_pages_total", &format!("{l4},cause=\"single_bit\"")), Some(2.0));
    assert_eq!(value(&m, "nodelens_gpu_retired_pages_total", &format!("{l4},cause=\"double_bit\"")), Some(1.0));
    assert_eq!(value(&m, "nodelens_gpu_retired_pages_pending", &l4), Some(1.0));
    assert_eq!(value(&m, "nodelens_gpu_retired_pages_pending", &h), None, "the H100 remaps rows instead: {m}");
    for name in [
        "memory_temperature_celsius",
        "memory_temperature_limit_celsius",
        "memory_clock_hertz",
        "encoder_utilization_ratio",
        "pcie_replays_total",
        "nvlink_links_active",
        "nvlink_errors_total",
        "violation_seconds_total",
        "retired_pages_total",
        "fabric_healthy",
    ] {
        assert!(!m.contains(&format!("nodelens_gpu_{name}{{node=\"{NODE}\",gpu=\"1\"")), "GPU 1 has no {name}: {m}");
    }
    assert!(!m.contains("nodelens_gpu_nvml_errors_total{"), "NOT_SUPPORTED is no error: {m}");

    // Errors rise on an active link; the down link comes up with its 7; the fabric loses a route.
    let mut s = second_tier_scenario();
    s.gpus[0].nvlinks[0].crc_flit = Some(10);
    s.gpus[0].nvlinks[17].active = true;
    s.gpus[0].fabric = Some(Fabric { state: 3, status: 0, health_mask: 0x12, health_summary: 2, v2_only: false });
    s.gpus[0].violations.power = Some(4_000_000_000);
    s.write(&node.scenario).unwrap();
    let power = format!("{h},reason=\"power\"");
    let m = scrape_until(&agent, "the new counts", |m| {
        value(m, "nodelens_gpu_fabric_healthy", &h) == Some(0.0)
            && value(m, "nodelens_gpu_violation_seconds_total", &power) == Some(4.0)
            && value(m, "nodelens_gpu_nvlink_links_active", &h) == Some(18.0)
    });
    assert_eq!(value(&m, "nodelens_gpu_nvlink_errors_total", &format!("{h},type=\"crc_flit\"")), Some(51.0 + 7.0 + 7.0));

    // The link goes down again: its errors stay in the sum, so the counter never drops.
    s.gpus[0].nvlinks[17].active = false;
    s.gpus[0].nvlinks[17].crc_flit = Some(0);
    s.write(&node.scenario).unwrap();
    let m = scrape_until(&agent, "a link down", |m| value(m, "nodelens_gpu_nvlink_links_active", &h) == Some(17.0));
    assert_eq!(value(&m, "nodelens_gpu_nvlink_errors_total", &format!("{h},type=\"crc_flit\"")), Some(65.0));

    std::thread::sleep(Duration::from_millis(600));
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
    let said = |function: &str, gpu: u32| {
        log.lines().filter(|l| l.contains("not supported by this GPU") && l.contains(function) && l.contains(&format!("gpu={gpu}"))).count()
    };
    assert_eq!(said("field_memory_temp", 1), 1, "one line, not one per poll: {log}");
    assert_eq!(said("violation_status_sync_boost", 0), 1, "{log}");
    assert_eq!(said("nvlink_error_crc_data", 0), 1, "{log}");
    assert_eq!(log.matches("no NVLink on this GPU").count(), 2, "{log}");
    assert!(!log.contains("WARN"), "{log}");
}

#[test]
fn a_driver_with_only_the_version_2_fabric_struct_still_reports_fabric_health() {
    let mut s = second_tier_scenario();
    s.gpus[0].fabric = Some(Fabric { state: 3, status: 0, health_mask: 0x22, health_summary: 0, v2_only: true });
    let node = Node::with(s.clone());
    let agent = node.start(&nvml_library(), "");
    let h = format!("gpu=\"0\",uuid=\"{H100}\",model=\"NVIDIA H100 80GB HBM3\"");
    let mut fabric = |f: Fabric, healthy: f64, what: &str| {
        s.gpus[0].fabric = Some(f);
        s.write(&node.scenario).unwrap();
        scrape_until(&agent, what, |m| value(m, "nodelens_gpu_fabric_healthy", &h) == Some(healthy));
    };
    let ok = Fabric { state: 3, status: 0, health_mask: 0x22, health_summary: 0, v2_only: true };
    scrape_until(&agent, "fabric healthy", |m| value(m, "nodelens_gpu_fabric_healthy", &h) == Some(1.0));
    fabric(Fabric { status: 999, ..ok }, 0.0, "a probe that completed with an error");
    fabric(ok, 1.0, "healthy again");
    fabric(Fabric { health_mask: 0x21, ..ok }, 0.0, "degraded bandwidth");
    fabric(ok, 1.0, "healthy again");
    fabric(Fabric { state: 2, ..ok }, 0.0, "a probe still in progress");
}

#[test]
fn use_no_container_holding_the_gpu_accounts_for_is_exported_by_reason() {
    // A host process on the H100; a pod the kubelet gave no GPU running on the L4
    // (NVIDIA_VISIBLE_DEVICES=all); the MIG A100 attributed as usual.
    let mut s = scenario();
    s.gpus[0].processes.push(process(5001, 2 * GIB, 10));
    s.gpus[2].processes.push(process(5002, 3 * GIB, 20));
    let node = Node::with(s);
    let rogue = "eeeeeeee-0000-4000-8000-000000000005";
    let rogue_id = "e".repeat(64);
    node.api.apply(pod_with_ids("ml", "rogue-0", rogue, NODE, json!({"app": "rogue", "user": "eve"}), &[("main", rogue_id.as_str())]));
    node.proc.add(5002, 777_000 + 5002, &Cgroup::V2SystemdContainerd.render(rogue, &rogue_id));
    let agent = node.start(&nvml_library(), "");
    let un = |gpu: u32, uuid: &str, reason: &str| format!("gpu=\"{gpu}\",uuid=\"{uuid}\",reason=\"{reason}\"");
    let bytes = |m: &str, gpu, uuid, reason| value(m, "nodelens_gpu_unattributed_memory_bytes", &un(gpu, uuid, reason));
    let sm = |m: &str, gpu, uuid, reason| value(m, "nodelens_gpu_unattributed_sm_ratio", &un(gpu, uuid, reason));
    let m = scrape_until(&agent, "unattributed use", |m| {
        bytes(m, 2, L4, "unallocated") == Some(3.0 * GIB as f64) && sm(m, 0, H100, "host").is_some_and(|v| v > 0.0)
    });
    assert_eq!(bytes(&m, 0, H100, "host"), Some(2.0 * GIB as f64));
    assert_eq!(sm(&m, 0, H100, "host"), Some(0.1));
    assert_eq!(sm(&m, 2, L4, "unallocated"), Some(0.2));
    for (gpu, uuid, reason) in [(0, H100, "unallocated"), (0, H100, "pod_gone"), (2, L4, "host"), (2, L4, "pod_gone")] {
        assert_eq!(bytes(&m, gpu, uuid, reason), Some(0.0), "{gpu} {reason}: {m}");
    }
    // Time-sliced (resnet and bert on the H100) and MIG (mig-job) use is attributed: no share.
    for reason in ["host", "unallocated", "pod_gone"] {
        assert_eq!(bytes(&m, 1, A100, reason), Some(0.0), "{m}");
        assert_eq!(sm(&m, 1, A100, reason), Some(0.0), "{m}");
    }
    assert!(!m.contains(&format!("uuid=\"{MIG_1G}\",reason=")), "one series set per physical GPU: {m}");

    // bert's pod is deleted while its process still holds 20 GiB.
    node.kubelet.set(vec![
        Allocated::new("ml", "resnet-0", "main", "nvidia.com/gpu", &[&format!("{H100}::0")]),
        Allocated::new("ml", "mig-job-0", "main", "nvidia.com/mig-1g.5gb", &[MIG_1G]),
        Allocated::new("ml", "notebook-0", "main", "nvidia.com/gpu", &[L4]),
    ]);
    node.api.delete("Pod", "ml", "bert-0");
    let deleted = Instant::now();
    let m = scrape_until(&agent, "bert's leftover", |m| bytes(m, 0, H100, "pod_gone") == Some(20.0 * GIB as f64));
    let after = deleted.elapsed();
    assert!(after < Duration::from_secs(8), "pod_gone after {after:?}");
    assert_eq!(sm(&m, 0, H100, "pod_gone"), Some(0.5));
    assert_eq!(bytes(&m, 0, H100, "unallocated"), Some(0.0), "{m}");
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
}

/// The values of series `name{labels}` at each scrape, every 200 ms for `polls` poll
/// intervals, from the end of the agent's second poll.
fn values_over(agent: &Agent, poll: Duration, polls: u32, series: &[(&str, String)]) -> Vec<Vec<f64>> {
    scrape_until(agent, "the first shares", |m| series.iter().all(|(name, labels)| value(m, name, labels).is_some()));
    // The first window is the newest sample's period alone: from the second on.
    std::thread::sleep(poll + Duration::from_millis(500));
    let until = Instant::now() + poll * polls;
    let mut seen = Vec::new();
    while Instant::now() < until {
        let (_, m) = agent.get("/metrics");
        seen.push(series.iter().map(|(name, labels)| value(&m, name, labels).unwrap_or(f64::NAN)).collect());
        std::thread::sleep(Duration::from_millis(200));
    }
    seen
}

#[test]
fn a_steady_process_reads_its_utilization_on_a_driver_that_returns_only_each_processs_newest_sample() {
    // An H200 on driver 580.159 samples each process every 200 ms and returns only the newest
    // sample; the agent's share of a steady process must not decay poll after poll.
    let mut s = scenario();
    s.gpus[0].processes = vec![process(4101, 10 * GIB, 17), process(5001, 2 * GIB, 23)];
    s.gpus[0].sample_period_us = 200_000;
    s.gpus[0].newest_sample_only = true;
    let resnet = container(0, H100, "resnet-0", "resnet", "alice");
    let host = format!("gpu=\"0\",uuid=\"{H100}\",reason=\"host\"");
    let series = [("nodelens_container_gpu_utilization_ratio", resnet), ("nodelens_gpu_unattributed_sm_ratio", host)];
    std::thread::scope(|scope| {
        for (poll, seconds) in [("2s", 2), ("5s", 5)] {
            let s = s.clone();
            let series = &series;
            scope.spawn(move || {
                let node = Node::with(s);
                let agent = node.start_polling(&nvml_library(), poll, "");
                let seen = values_over(&agent, Duration::from_secs(seconds), 4, series);
                for v in &seen {
                    assert!((v[0] - 0.17).abs() <= 0.01 && (v[1] - 0.23).abs() <= 0.01, "poll {poll}: {v:?} of {seen:?}");
                }
                let (status, _, log) = agent.terminate();
                assert!(status.success(), "{log}");
            });
        }
    });
}
