//! The node's own logs through the real pipeline to a sink that discards: kernel records
//! (one in ten a GPU XID attributed through a fake `/proc`) and journal entries (real journal
//! files written by `systemd-journal-remote`, read through `journalctl`), each reported as
//! records per CPU-second (all threads, the journalctl children included) with the peak RSS.
//! `cargo bench --bench node_logs_throughput -- 200000` for 200,000 of each (default 100,000).

use std::io::{BufWriter, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use nodelens::agent::Metrics;
use nodelens::config::{Config, Switch};
use nodelens::logs::ack::AckMsg;
use nodelens::logs::checkpoint::Checkpoints;
use nodelens::pipeline::{LogPipeline, SinkStarter};
use nodelens::sinks::Formats;

fn main() {
    let n: u64 = std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let proc_root = dir.path().join("proc");
    std::fs::create_dir_all(proc_root.join("sys/kernel/random")).unwrap();
    std::fs::write(proc_root.join("stat"), "btime 1764800000\n").unwrap();
    std::fs::write(proc_root.join("sys/kernel/random/boot_id"), "bench\n").unwrap();
    let uid = "0000000a-7d9f-4b6c-9d5e-0123456789ab";
    let id = "ab".repeat(32);
    std::fs::create_dir_all(proc_root.join("4242")).unwrap();
    std::fs::write(
        proc_root.join("4242/cgroup"),
        format!("0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{id}.scope\n", uid.replace('-', "_")),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join(format!("pods/bench_train-0_{uid}/main"))).unwrap();
    let mut kmsg = BufWriter::new(std::fs::File::create(dir.path().join("kmsg")).unwrap());
    for i in 0..n {
        if i % 10 == 0 {
            writeln!(kmsg, "4,{i},{},-;NVRM: Xid (PCI:0000:3b:00): 13, pid=4242, name=python3, Graphics Exception", i * 1000).unwrap();
        } else {
            writeln!(kmsg, "6,{i},{},-;eth0: link up, 100 Gbps, full duplex, flow control rx/tx {i}", i * 1000).unwrap();
            writeln!(kmsg, " SUBSYSTEM=net\n DEVICE=n2").unwrap();
        }
    }
    kmsg.flush().unwrap();
    drop(kmsg);

    let mut config = Config { state_dir: dir.path().join("state"), ..Config::default() };
    config.logs.pods_dir = dir.path().join("pods");
    config.host.proc_root = proc_root;
    config.node_logs.kernel.path = dir.path().join("kmsg");
    config.node_logs.kernel.enabled = Switch::On;
    config.node_logs.journald.enabled = Switch::Off;
    let (cpu, wall, rss) = run(&config, n);
    println!(
        "node_logs_throughput: {n} kernel records: {:.0} records/CPU-s, {:.0} records/s wall, peak RSS {rss:.1} MiB",
        n as f64 / cpu,
        n as f64 / wall
    );

    let journal = dir.path().join("journal/0123456789abcdef0123456789abcdef");
    std::fs::create_dir_all(&journal).unwrap();
    let mut export = Vec::new();
    for i in 0..n {
        write!(
            export,
            "__REALTIME_TIMESTAMP={}\n__MONOTONIC_TIMESTAMP={}\n_BOOT_ID=11111111111111111111111111111111\n_SYSTEMD_UNIT=kubelet.service\n_PID=812\n_COMM=kubelet\nPRIORITY=6\nMESSAGE=I1204 16:00:00.000000     812 kubelet.go:2345] \"SyncLoop UPDATE\" source=\"api\" pods=[\"ml/train-{i}\"]\n\n",
            1_764_800_000_000_000 + i,
            1_000_000 + i
        )
        .unwrap();
    }
    let remote = ["/lib/systemd/systemd-journal-remote", "/usr/lib/systemd/systemd-journal-remote"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(remote) = remote else {
        println!("node_logs_throughput: no systemd-journal-remote; journal part skipped");
        return;
    };
    let mut child = Command::new(remote)
        .arg(format!("--output={}", journal.join("system.journal").display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&export).unwrap();
    assert!(child.wait().unwrap().success());
    config.state_dir = dir.path().join("state-journal");
    config.node_logs.kernel.enabled = Switch::Off;
    config.node_logs.journald.enabled = Switch::On;
    config.node_logs.journald.path = dir.path().join("journal");
    let (cpu, wall, rss) = run(&config, n);
    println!(
        "node_logs_throughput: {n} journal entries: {:.0} entries/CPU-s (journalctl included), {:.0} entries/s wall, peak RSS {rss:.1} MiB",
        n as f64 / cpu,
        n as f64 / wall
    );
}

/// Runs the pipeline until `records` are through: (CPU seconds, wall seconds, peak RSS MiB).
fn run(config: &Config, records: u64) -> (f64, f64, f64) {
    let config = &config.clone().validate().unwrap();
    // The agent's own runtime, as the binary runs it.
    let runtime = nodelens::agent::runtime().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    runtime.block_on(async {
        let metrics = Metrics::new("bench");
        let checkpoints = Arc::new(Checkpoints::open(&config.state_dir).unwrap());
        let start_cpu = cpu_with_children();
        let start = Instant::now();
        let pipeline =
            LogPipeline::start(config, checkpoints, &metrics.logs, None, vec![discard(seen.clone())], Default::default()).unwrap();
        while seen.load(Ordering::Acquire) < records {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (cpu, wall) = (cpu_with_children() - start_cpu, start.elapsed().as_secs_f64());
        pipeline.stop(Duration::from_secs(5)).await;
        (cpu, wall, common::peak_rss_mib())
    })
}

/// CPU seconds of this process and its waited-for children (journalctl).
fn cpu_with_children() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    common::cpu_seconds() + tv(usage.ru_utime) + tv(usage.ru_stime)
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
