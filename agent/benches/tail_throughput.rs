//! Read → decode → ECS encode throughput of the real log pipeline, to a sink that discards.
//!
//! Generates a backlog of CRI logs (8 containers × N MiB, default 64; `cargo bench --bench
//! tail_throughput -- 16` for 16), runs the pipeline over it until every record is through,
//! and reports records per CPU-second (all threads) and the process's peak RSS. Run it at two
//! sizes to see that memory does not follow the backlog.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodelens::config::Config;
use nodelens::logs::ack::AckMsg;
use nodelens::logs::checkpoint::Checkpoints;
use nodelens::metrics::Metrics;
use nodelens::pipeline::{LogPipeline, SinkStarter};

const CONTAINERS: usize = 8;

fn main() {
    let mib: u64 = std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(64);
    let dir = tempfile::tempdir().unwrap();
    let pods = dir.path().join("pods");
    let records = generate(&pods, mib * 1024 * 1024);
    let bytes = mib * 1024 * 1024 * CONTAINERS as u64;
    let rss_before = current_rss_mib();

    let mut config = Config::default();
    config.logs.pods_dir = pods;
    config.state_dir = dir.path().join("state");
    if let Ok(v) = std::env::var("BENCH_INFLIGHT_MIB") {
        config.logs.max_inflight_bytes = v.parse::<u64>().unwrap() << 20;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let (cpu, wall) = runtime.block_on(async {
        let metrics = Metrics::new("bench");
        let checkpoints = Arc::new(Checkpoints::open(&config.state_dir).unwrap());
        let start_cpu = cpu_seconds();
        let start = Instant::now();
        let pipeline = LogPipeline::start(&config, checkpoints, &metrics, None, vec![discard(seen.clone())]).unwrap();
        while seen.load(Ordering::Acquire) < records {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (cpu, wall) = (cpu_seconds() - start_cpu, start.elapsed().as_secs_f64());
        pipeline.stop(Duration::from_secs(5)).await;
        (cpu, wall)
    });
    println!(
        "tail_throughput: {CONTAINERS} containers x {mib} MiB = {records} CRI records ({:.0} MiB): {:.0} records/CPU-s, {:.0} records/s wall, {:.0} MiB/CPU-s, CPU {:.2} s, wall {:.2} s, peak RSS {:.1} MiB (RSS before the pipeline {:.1} MiB)",
        bytes as f64 / 1048576.0,
        records as f64 / cpu,
        records as f64 / wall,
        bytes as f64 / 1048576.0 / cpu,
        cpu,
        wall,
        peak_rss_mib(),
        rss_before
    );
}

/// A sink that counts documents and acknowledges at once.
fn discard(seen: Arc<AtomicU64>) -> SinkStarter {
    Box::new(move |mut rx, acks| {
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                seen.fetch_add(batch.docs.len() as u64, Ordering::AcqRel);
                acks.send(AckMsg::Ack { seq: batch.seq }).await?;
            }
            Ok(())
        })
    })
}

/// Writes `bytes` of CRI records per container, with messages of varied length.
fn generate(pods: &Path, bytes: u64) -> u64 {
    let mut total = 0;
    for c in 0..CONTAINERS {
        let dir = pods.join(format!("bench_train-{c}_uid-{c}")).join("worker");
        std::fs::create_dir_all(&dir).unwrap();
        let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(dir.join("0.log")).unwrap());
        let (mut written, mut i) = (0u64, 0u64);
        while written < bytes {
            let line = format!(
                "2026-11-22T03:{:02}:{:02}.{:09}Z {} F step={i} loss={:.4} lr=0.0003 throughput={} samples/s gpu_mem={}MiB {}\n",
                (i / 60_000) % 60,
                (i / 1000) % 60,
                i % 1_000_000_000,
                if i % 10 == 0 { "stderr" } else { "stdout" },
                1.0 / (1.0 + i as f64),
                1000 + i % 977,
                30_000 + i % 4096,
                &"detail ".repeat((i % 13) as usize)
            );
            out.write_all(line.as_bytes()).unwrap();
            written += line.len() as u64;
            i += 1;
        }
        out.flush().unwrap();
        total += i;
    }
    total
}

fn cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Peak RSS of this process's own address space. (`getrusage`'s `ru_maxrss` also counts
/// the image the process replaced at exec, which was a copy of its parent: cargo.)
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
    kib / 1024.0
}

fn current_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0.0);
    kib / 1024.0
}
