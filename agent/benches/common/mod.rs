//! What the benchmarks share: a backlog generator and the process's CPU time and peak RSS.

#![allow(dead_code)]

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodelens::agent::Metrics;
use nodelens::config::Config;
use nodelens::logs::checkpoint::Checkpoints;
use nodelens::pipeline::{self, LogPipeline};
use nodelens::sinks::SinkOutcomeLabels;

/// Containers in a generated backlog.
pub const CONTAINERS: usize = 8;

/// Writes `bytes` of CRI records per container (training-log lines of varied length) under
/// `pods`, and returns how many records that is.
pub fn generate_backlog(pods: &Path, bytes: u64) -> u64 {
    generate_backlog_with(pods, bytes, false)
}

/// As [`generate_backlog`]; with `half_json`, every other record is a structured JSON line
/// (level, msg, a trace id and the training fields as keys).
pub fn generate_backlog_with(pods: &Path, bytes: u64, half_json: bool) -> u64 {
    let mut total = 0;
    for c in 0..CONTAINERS {
        let dir = pods.join(format!("bench_train-{c}_0000000{c}-7d9f-4b6c-9d5e-0123456789ab")).join("worker");
        std::fs::create_dir_all(&dir).unwrap();
        let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(dir.join("0.log")).unwrap());
        let (mut written, mut i) = (0u64, 0u64);
        while written < bytes {
            let line = if half_json && i % 2 == 1 {
                format!(
                    "2026-11-22T03:{:02}:{:02}.{:09}Z stdout F {{\"level\":\"info\",\"msg\":\"step done\",\"rank\":{c},\"step\":{i},\"loss\":{:.4},\"lr\":0.0003,\"throughput\":{},\"trace_id\":\"{:032x}\",\"span_id\":\"{:016x}\",\"detail\":\"{}\"}}\n",
                    (i / 60_000) % 60,
                    (i / 1000) % 60,
                    i % 1_000_000_000,
                    1.0 / (1.0 + i as f64),
                    1000 + i % 977,
                    0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128 ^ u128::from(i),
                    0x00f0_67aa_0ba9_02b7u64 ^ i,
                    &"detail ".repeat((i % 13) as usize)
                )
            } else {
                format!(
                "2026-11-22T03:{:02}:{:02}.{:09}Z {} F rank={c} step={i} loss={:.4} lr=0.0003 throughput={} samples/s gpu_mem={}MiB {}\n",
                (i / 60_000) % 60,
                (i / 1000) % 60,
                i % 1_000_000_000,
                if i % 10 == 0 { "stderr" } else { "stdout" },
                1.0 / (1.0 + i as f64),
                1000 + i % 977,
                30_000 + i % 4096,
                &"detail ".repeat((i % 13) as usize)
                )
            };
            out.write_all(line.as_bytes()).unwrap();
            written += line.len() as u64;
            i += 1;
        }
        out.flush().unwrap();
        total += i;
    }
    total
}

/// User plus system CPU seconds of this process, all threads.
pub fn cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Peak RSS of this process's own address space. (`getrusage`'s `ru_maxrss` also counts
/// the image the process replaced at exec, which was a copy of its parent: cargo.)
pub fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:") / 1024.0
}

/// Current RSS.
pub fn current_rss_mib() -> f64 {
    status_kib("VmRSS:") / 1024.0
}

fn status_kib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

/// Runs the real pipeline with the sinks `config` asks for until `sink` has delivered
/// `records`, and returns the CPU-seconds and wall seconds it took.
pub fn ship(config: &Config, sink: &'static str, records: u64) -> (f64, f64) {
    let config = &config.clone().validate().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let metrics = Metrics::new("bench");
        let checkpoints = Arc::new(Checkpoints::open(&config.state_dir).unwrap());
        let delivered = metrics.sinks.records.get_or_create(&SinkOutcomeLabels { sink, outcome: "delivered" }).clone();
        let start_cpu = cpu_seconds();
        let start = Instant::now();
        let sinks = pipeline::configured_sinks(config, &metrics.sinks).unwrap();
        let pipeline = LogPipeline::start(config, checkpoints, &metrics.logs, None, sinks, Default::default()).unwrap();
        while delivered.get() < records {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let result = (cpu_seconds() - start_cpu, start.elapsed().as_secs_f64());
        pipeline.stop(Duration::from_secs(5)).await;
        result
    })
}
