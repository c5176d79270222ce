//! Read → decode → ECS encode throughput of the real log pipeline, to a sink that discards.
//!
//! Generates a backlog of CRI logs (8 containers × N MiB, default 64; `cargo bench --bench
//! tail_throughput -- 16` for 16), runs the pipeline over it until every record is through,
//! and reports records per CPU-second (all threads) and the process's peak RSS. Run it at two
//! sizes to see that memory does not follow the backlog. `NODELENS_BENCH_JSON=half` makes
//! every other record a JSON line (`logs.json: auto` parses it); `NODELENS_BENCH_JSON=off`
//! turns `logs.json` off on the plain corpus.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::CONTAINERS;
use nodelens::agent::Metrics;
use nodelens::config::Config;
use nodelens::logs::ack::AckMsg;
use nodelens::logs::checkpoint::Checkpoints;
use nodelens::pipeline::{LogPipeline, SinkStarter};
use nodelens::sinks::Formats;

fn main() {
    let mib: u64 = std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(64);
    let dir = tempfile::tempdir().unwrap();
    let pods = dir.path().join("pods");
    // NODELENS_BENCH_JSON=half: every other record a JSON line; NODELENS_BENCH_JSON=off also
    // sets `logs.json: off` (the text path alone, as before JSON lines).
    let json = std::env::var("NODELENS_BENCH_JSON").unwrap_or_default();
    let records = common::generate_backlog_with(&pods, mib * 1024 * 1024, json == "half");
    let bytes = mib * 1024 * 1024 * CONTAINERS as u64;
    let rss_before = common::current_rss_mib();

    let mut config = Config::default();
    // The machine's own journal and kernel ring stay out of the measurement.
    config.node_logs.journald.enabled = nodelens::config::Switch::Off;
    config.node_logs.kernel.enabled = nodelens::config::Switch::Off;
    config.logs.pods_dir = pods;
    config.state_dir = dir.path().join("state");
    if json == "off" {
        config.logs.json = nodelens::config::JsonMode::Off;
    }
    // NODELENS_BENCH_RULES=10: ten log-derived metric rules over every record; with
    // NODELENS_BENCH_RULES_KIND=rare, ten rules of the kind operators count (errors, OOMs,
    // NCCL and CUDA failures) that no line of the corpus matches.
    let rules: usize = std::env::var("NODELENS_BENCH_RULES").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let rare = std::env::var("NODELENS_BENCH_RULES_KIND").as_deref() == Ok("rare");
    let rare_patterns = [
        ("errors", "(?i)error|exception", "counter"),
        ("oom", "out of memory|OOMKilled", "counter"),
        ("nan", "loss=nan", "counter"),
        ("cuda", "CUDA error: (?P<v>\\d+)", "gauge"),
        ("nccl", "NCCL WARN", "counter"),
        ("traceback", "^Traceback", "counter"),
        ("xid", "NVRM: Xid \\(PCI:[0-9a-f:.]+\\): (?P<v>\\d+)", "gauge"),
        ("killed", "Killed process (?P<v>\\d+)", "gauge"),
        ("segfault", "segfault at", "counter"),
        ("timeout", "(?i)timed? ?out after (?P<v>\\d+)", "gauge"),
    ];
    let common_patterns = [
        ("loss", "loss=(?P<v>[0-9.]+)", "gauge"),
        ("lr", "lr=(?P<v>[0-9.]+)", "gauge"),
        ("throughput", "throughput=(?P<v>\\d+)", "gauge"),
        ("gpu_mem", "gpu_mem=(?P<v>\\d+)MiB", "gauge"),
        ("steps", "step=(?P<v>\\d+)", "gauge"),
        ("lines", "step=", "counter"),
        ("details", "detail detail detail", "counter"),
        ("errors", "(?i)error|exception", "counter"),
        ("oom", "out of memory", "counter"),
        ("nan", "loss=nan", "counter"),
    ];
    let patterns = if rare { &rare_patterns } else { &common_patterns };
    for (name, pattern, kind) in patterns.iter().take(rules) {
        let value = if *kind == "gauge" { ", value: v" } else { "" };
        config
            .logs
            .log_metrics
            .push(serde_yaml_ng::from_str(&format!("{{name: {name}, pattern: '{pattern}', type: {kind}{value}}}")).unwrap());
    }
    let config = config.validate().unwrap();
    // The agent's own runtime, as the binary runs it.
    let runtime = nodelens::agent::runtime().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let (cpu, wall) = runtime.block_on(async {
        let metrics = Metrics::new("bench");
        let checkpoints = Arc::new(Checkpoints::open(&config.state_dir).unwrap());
        let start_cpu = common::cpu_seconds();
        let start = Instant::now();
        let pipeline =
            LogPipeline::start(&config, checkpoints, &metrics.logs, None, vec![discard(seen.clone())], Default::default()).unwrap();
        while seen.load(Ordering::Acquire) < records {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (cpu, wall) = (common::cpu_seconds() - start_cpu, start.elapsed().as_secs_f64());
        pipeline.stop(Duration::from_secs(5)).await;
        (cpu, wall)
    });
    println!(
        "tail_throughput ({rules} {}log-metric rules, json {json:?}): {CONTAINERS} containers x {mib} MiB = {records} CRI records ({:.0} MiB): {:.0} records/CPU-s, {:.0} records/s wall, {:.0} MiB/CPU-s, CPU {:.2} s, wall {:.2} s, peak RSS {:.1} MiB (RSS before the pipeline {:.1} MiB)",
        if rare { "rarely matching " } else { "" },
        bytes as f64 / 1048576.0,
        records as f64 / cpu,
        records as f64 / wall,
        bytes as f64 / 1048576.0 / cpu,
        cpu,
        wall,
        common::peak_rss_mib(),
        rss_before
    );
}

/// A sink that counts documents and acknowledges at once.
fn discard(seen: Arc<AtomicU64>) -> SinkStarter {
    SinkStarter::new(Formats { ecs: true, ..Formats::default() }, move |mut rx, acks, _| async move {
        while let Some(batch) = rx.recv().await {
            seen.fetch_add(batch.records as u64, Ordering::AcqRel);
            acks.send(AckMsg::Ack { seq: batch.seq }).await?;
        }
        Ok::<(), anyhow::Error>(())
    })
}
