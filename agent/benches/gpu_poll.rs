//! GPU collection cost on a busy node: the release `nodelens` binary with the fake NVML
//! library at 8 GPUs × 64 processes (each GPU time-sliced between 64 pods, every process
//! busy), the fake pod-resources service, a fake `/proc` and the fake API server.
//!
//! Reports the `/metrics` scrape latency (median and p99 over loopback HTTP), the agent's CPU
//! time per poll cycle (whole process: NVML reads, pid lookups, the pod-resources call and
//! attribution), and its RSS.
//!
//! Every GPU has GPM (one GPM sample and one metrics call per poll, as on Hopper) and row
//! remapping; `--no-gpm` runs the same node as pre-Hopper GPUs, for the cost of GPM.
//!
//! Every GPU also answers the whole second tier of health (HBM temperature and its limit,
//! memory clock, video engines, PCIe replays, 18 NVLink links with four error counters each,
//! six violation reasons, retired pages, fabric info); `--no-second-tier` runs GPUs that answer
//! none of it (each reading off after its first `NOT_SUPPORTED`), for its cost.
//!
//! `cargo bench --bench gpu_poll -- [seconds] [--no-gpm] [--no-second-tier]` (default 10).

use std::path::Path;
use std::time::{Duration, Instant};

use nodelens::agent::Metrics;
use nodelens::gpu::allocation::{Allocation, Source};
use nodelens::gpu::attribution;
use nodelens::gpu::reading::RemappedRows;
use nodelens::gpu::reading::{GpuGauge, GpuId, GpuReading, HealthCounters, Reading};
use nodelens::kube::Names;
use nodelens_testkit::agent::Agent;
use nodelens_testkit::gpu::scenario::{self, Gpm, Gpu, Process, Scenario, SCENARIO_ENV};
use nodelens_testkit::gpu::{nvml_library, Allocated, Cgroup, FakePodResources, FakeProc};
use nodelens_testkit::kubernetes::{pod_with_ids, FakeApiServer};
use serde_json::json;

const GPUS: u32 = 8;
const PER_GPU: u32 = 64;
const POLL: Duration = Duration::from_millis(100);
const NODE: &str = "bench-node";

fn main() {
    let seconds: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10);
    let gpm = !std::env::args().any(|a| a == "--no-gpm");
    let second_tier = !std::env::args().any(|a| a == "--no-second-tier");
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApiServer::start();
    let kubelet = FakePodResources::start(&dir.path().join("kubelet.sock"));
    let proc = FakeProc::new(&dir.path().join("proc"));
    let mut scenario = Scenario { driver_version: "550.54.15".into(), gpus: Vec::new() };
    let mut allocated = Vec::new();
    for g in 0..GPUS {
        let uuid = format!("GPU-{g:08x}-0000-4000-8000-000000000000");
        let mut processes = Vec::new();
        for p in 0..PER_GPU {
            let n = g * PER_GPU + p;
            let (pod, uid, id) = (format!("train-{n}"), format!("{n:08x}-0000-4000-8000-000000000000"), format!("{n:064x}"));
            api.apply(pod_with_ids(
                "ml",
                &pod,
                &uid,
                NODE,
                json!({"app": format!("app-{}", n % 16), "user": format!("user-{}", n % 8)}),
                &[("main", &id)],
            ));
            let pid = 10_000 + n;
            proc.add(pid, 5_000 + u64::from(n), &Cgroup::V2SystemdContainerd.render(&uid, &id));
            processes.push(Process { pid, used_memory_bytes: 256 << 20, sm_percent: 1 + p % 50, ..Process::default() });
            allocated.push(Allocated::new("ml", &pod, "main", "nvidia.com/gpu", &[&format!("{uuid}::{p}")]));
        }
        scenario.gpus.push(Gpu {
            uuid,
            name: "NVIDIA H100 80GB HBM3".into(),
            utilization_percent: 90,
            memory_total_bytes: 80 << 30,
            memory_used_bytes: 16 << 30,
            temperature_celsius: 60,
            power_milliwatts: 500_000,
            power_limit_milliwatts: 700_000,
            energy_millijoules: 1_000_000,
            sm_clock_mhz: 1980,
            ecc_corrected: Some(0),
            ecc_uncorrected: Some(0),
            processes,
            gpm: gpm.then_some(Gpm {
                graphics_percent: 90.0,
                sm_active_percent: 60.0,
                sm_occupancy_percent: 30.0,
                tensor_active_percent: 40.0,
                dram_active_percent: 50.0,
                pcie_tx_mib_per_s: 1000.0,
                nvlink_tx_mib_per_s: 5000.0,
                ..Gpm::default()
            }),
            pcie_tx_kb_per_s: 100_000,
            remapped_rows: Some(scenario::RemappedRows::default()),
            ..if second_tier { with_second_tier() } else { Gpu::default() }
        });
    }
    kubelet.set(allocated);
    let scenario_path = dir.path().join("scenario.json");
    scenario.write(&scenario_path).unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let config = dir.path().join("nodelens.yaml");
    std::fs::create_dir_all(dir.path().join("pods")).unwrap();
    std::fs::write(
        &config,
        format!(
            "node_name: {NODE}\nstate_dir: {d}/state\nhost:\n  proc_root: {d}/proc\nlogs:\n  pods_dir: {d}/pods\nkubernetes:\n  enabled: true\n  kubeconfig: {kc}\n  pod_resources_socket: {sock}\ngpu:\n  nvml_library: {lib}\n  poll_interval: {poll}ms\nmetrics:\n  listen: 127.0.0.1:0\n",
            d = dir.path().display(),
            kc = kubeconfig.display(),
            sock = kubelet.socket.display(),
            lib = nvml_library().display(),
            poll = POLL.as_millis(),
        ),
    )
    .unwrap();
    let scenario_env = scenario_path.display().to_string();
    let agent = Agent::start(Path::new(env!("CARGO_BIN_EXE_nodelens")), &config, &[(SCENARIO_ENV, &scenario_env)]);

    let want = (GPUS * PER_GPU) as usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    let series = loop {
        let (_, body) = agent.get("/metrics");
        let n = body.lines().filter(|l| l.starts_with("nodelens_container_gpu_utilization_ratio{") && l.contains("app=\"app-")).count();
        if n == want {
            break body.lines().filter(|l| !l.starts_with('#')).count();
        }
        assert!(Instant::now() < deadline, "only {n} of {want} containers attributed:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(200));
    };

    let polls_before = kubelet.calls();
    let cpu_before = agent.cpu_seconds();
    std::thread::sleep(Duration::from_secs(seconds));
    let polls = kubelet.calls() - polls_before;
    let cpu_per_poll = (agent.cpu_seconds() - cpu_before) / polls as f64;

    let addr = agent.metrics_addr();
    let mut scrapes: Vec<Duration> = (0..300)
        .map(|_| {
            let t = Instant::now();
            let (status, _) = nodelens_testkit::agent::http_get(addr, "/metrics");
            assert_eq!(status, 200);
            t.elapsed()
        })
        .collect();
    scrapes.sort();
    let rss = agent.rss_bytes() as f64 / (1 << 20) as f64;
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");

    let gpm = if gpm { "with GPM" } else { "without GPM" };
    let tier = if second_tier { "with the second tier" } else { "without the second tier" };
    println!("gpu_poll: {GPUS} GPUs x {PER_GPU} processes, {gpm}, {tier}, {series} series on /metrics, poll every {POLL:?}");
    println!("  poll cycle:  {:.2} ms CPU per poll ({polls} polls in {seconds} s, whole agent)", cpu_per_poll * 1e3);
    println!(
        "  scrape:      median {:.3} ms, p99 {:.3} ms (loopback HTTP, {} scrapes)",
        ms(scrapes[scrapes.len() / 2]),
        ms(scrapes[scrapes.len() * 99 / 100]),
        scrapes.len()
    );
    println!("  agent RSS:   {rss:.1} MiB");
    let (encode, bytes) = encode_time();
    println!("  encode only: {:.3} ms per /metrics body of {} KiB (in process, same series)", ms(encode), bytes / 1024);
}

/// A GPU that answers every second-tier call.
fn with_second_tier() -> Gpu {
    let link = scenario::NvLink { active: true, crc_flit: Some(1), crc_data: Some(0), replay: Some(2), recovery: Some(0) };
    Gpu {
        memory_temperature_celsius: Some(70),
        memory_temperature_limit_celsius: Some(95),
        memory_clock_mhz: Some(2619),
        encoder_percent: Some(0),
        decoder_percent: Some(10),
        pcie_replays: Some(3),
        nvlinks: vec![link; 18],
        violations: scenario::Violations {
            power: Some(1),
            thermal: Some(2),
            sync_boost: Some(0),
            board_limit: Some(0),
            low_utilization: Some(5),
            reliability: Some(0),
        },
        retired_pages: Some(scenario::RetiredPages::default()),
        fabric: Some(scenario::Fabric { state: 3, status: 0, health_mask: 0x22, health_summary: 1, v2_only: false }),
        ..Gpu::default()
    }
}

/// The registry's text encoding alone, for a view shaped like the run above: 8 GPUs with
/// every per-GPU series, 512 containers each allocated a replica and busy.
fn encode_time() -> (Duration, usize) {
    let metrics = Metrics::new(NODE);
    let mut reading = Reading { driver_version: "550.54.15".into(), ..Reading::default() };
    let mut allocations = Vec::new();
    for g in 0..GPUS {
        let id = GpuId {
            index: g,
            uuid: format!("GPU-{g:08x}-0000-4000-8000-000000000000"),
            model: "NVIDIA H100 80GB HBM3".into(),
            mig: None,
            minor: Some(g),
        };
        let mut gpu = GpuReading::new(id.clone(), true);
        for gauge in GpuGauge::ALL {
            gpu.set(gauge, Some(0.5));
        }
        (gpu.energy_joules, gpu.throttle_reasons, gpu.ecc) = (Some(1000.0), Some(0), (Some(0), Some(0)));
        (gpu.pcie_bytes, gpu.nvlink_bytes) = (Some((1e12, 1e12)), Some((1e12, 1e12)));
        gpu.remapped_rows = Some(RemappedRows { correctable: 0, uncorrectable: 0, pending: false, failed: false });
        gpu.health = HealthCounters {
            pcie_replays: Some(3),
            nvlink_errors: [Some(1); 4],
            violation_seconds: [Some(1.0); 6],
            retired_pages: [Some(0); 2],
        };
        reading.gpus.push(gpu);
        reading.sampled.push(id.uuid.clone());
        for p in 0..PER_GPU {
            let pod = format!("train-{}", g * PER_GPU + p);
            allocations.push(Allocation {
                namespace: "ml".into(),
                pod,
                container: "main".into(),
                device_id: format!("{}::{p}", id.uuid),
                source: Source::DevicePlugin,
            });
        }
    }
    let names = Names { pods_dir: "/nonexistent".into(), containers_dir: "/nonexistent".into(), pods: None };
    metrics.gpu.publish(attribution::compose(&reading, &allocations, &names));
    let bytes = metrics.encode().len();
    let rounds = 200;
    let start = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(metrics.encode());
    }
    (start.elapsed() / rounds, bytes)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
