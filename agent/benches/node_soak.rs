//! Soak: the release `nodelens` binary on a simulated node for MINUTES (default 1, fractions
//! allowed: `cargo bench --bench node_soak -- 0.5`). About 300 pods log at varied rates; their
//! containers restart (a few crash-loop), pods are deleted and new ones created (CronJob,
//! Deployment and StatefulSet names), files rotate with gzip; everything ships to the strict
//! `_bulk` double, which answers some requests with 429 or 503, refuses some items with 429,
//! loses some replies after applying them, and has one short outage.
//!
//! Every line carries a node-wide sequence number and its write time, so the report counts
//! lines written, shipped, duplicated (stored twice under different `_id`s) and lost, and the
//! write-to-index latency. The agent's fds, RSS and `/metrics` series are sampled over time and
//! should stay flat. Exits non-zero when anything is lost or duplicated, or when the backlog
//! does not return to 0 once everything is indexed.
//!
//! A pod is deleted, and a container restarted (which removes its instance before the
//! previous one), only once the lines in the files that go away have been indexed, or after
//! a grace of 30 s: what the simulator removes is then the agent's loss, not the scenario's.

use std::path::Path;
use std::time::{Duration, Instant};

use nodelens_testkit::agent::{metric_sum, quantile, Agent};
use nodelens_testkit::elasticsearch::{FakeElasticsearch, Fault};
use nodelens_testkit::kubelet::{ContainerLog, PodLogs};

/// Pods on the node at any time.
const PODS: usize = 300;
/// Applications the pods belong to.
const APPS: usize = 40;
/// The writer's tick.
const TICK: Duration = Duration::from_millis(50);
/// The kubelet's `containerLogMaxSize`, small so rotations happen in a short run.
const MAX_LIVE_BYTES: u64 = 256 * 1024;
/// Node-wide container restarts per second (crash loops come on top).
const RESTARTS_PER_S: f64 = 0.5;
/// Node-wide pod deletions (each replaced by a new pod) per second.
const DELETIONS_PER_S: f64 = 0.3;
/// How long a removal waits for the lines it would take away to be indexed.
const REMOVAL_GRACE: Duration = Duration::from_secs(30);
/// One injected fault (429, 503, lost reply, item 429s, slow reply) this often.
const FAULT_EVERY: Duration = Duration::from_secs(5);
/// After the run, how long the agent gets to ship what is left.
const DRAIN: Duration = Duration::from_secs(60);

const SUFFIX: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// One container of a simulated pod.
struct SimContainer {
    log: ContainerLog,
    live_bytes: u64,
    /// Sequence numbers written to the running instance and to the previous one (the files a
    /// restart keeps), not yet known to be indexed.
    current: Vec<u64>,
    previous: Vec<u64>,
}

/// A simulated pod.
struct SimPod {
    logs: Option<PodLogs>,
    name: String,
    containers: Vec<SimContainer>,
    /// Lines per second.
    rate: f64,
    carry: f64,
    crash_loops: bool,
    next_crash: Instant,
    /// Deleted (no more writes) since then; its directory goes once its lines are indexed.
    terminating: Option<Instant>,
    restart_pending: Option<(usize, Instant)>,
}

/// What the bench counts.
#[derive(Default)]
struct Tally {
    written: u64,
    /// Times each sequence number was stored.
    seen: Vec<u8>,
    shipped: u64,
    duplicated: u64,
    /// Write-to-index latency, microseconds.
    latency_us: Vec<u32>,
    /// Latencies already reported in a sample row.
    sampled: usize,
    created: usize,
    deleted: usize,
    restarts: usize,
    rotations: usize,
    forced_removals: usize,
}

struct Sample {
    at: f64,
    written: u64,
    shipped: u64,
    backlog: f64,
    fds: usize,
    rss_mib: f64,
    series: usize,
    tailed: f64,
    conflicts: usize,
    /// p99 write-to-index latency of the lines indexed since the previous sample.
    p99: Duration,
}

fn main() {
    let minutes: f64 = std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let run_for = Duration::from_secs_f64((minutes * 60.0).clamp(5.0, 24.0 * 3600.0));
    let dir = tempfile::tempdir().unwrap();
    let pods_dir = dir.path().join("pods");
    std::fs::create_dir_all(&pods_dir).unwrap();
    let es = FakeElasticsearch::start();
    let config = dir.path().join("nodelens.yaml");
    std::fs::write(
        &config,
        format!(
            "node_name: soak-node\nlog_level: nodelens=info\nstate_dir: {}\nlogs:\n  pods_dir: {}\nsinks:\n  elasticsearch:\n    endpoints: [{}]\nmetrics:\n  listen: 127.0.0.1:0\n",
            dir.path().join("state").display(),
            pods_dir.display(),
            es.url()
        ),
    )
    .unwrap();

    let mut rng = fastrand::Rng::with_seed(13);
    let base = Instant::now();
    let mut tally = Tally::default();
    let mut pods: Vec<SimPod> = (0..PODS).map(|i| new_pod(&pods_dir, &mut rng, i, &mut tally)).collect();
    let agent = Agent::start(Path::new(env!("CARGO_BIN_EXE_nodelens")), &config, &[]);
    let addr = agent.metrics_addr();
    println!("node_soak: {minutes} min, {PODS} pods, release agent pid {}, metrics on {addr}, _bulk double on {}", agent.pid(), es.url());
    println!(
        "{:>7} {:>9} {:>9} {:>11} {:>5} {:>8} {:>7} {:>6} {:>6} {:>9}",
        "t (s)", "written", "shipped", "backlog B", "fds", "RSS MiB", "series", "tailed", "409s", "p99 (ms)"
    );

    let faults = [
        Fault::Status(429),
        Fault::LoseReply,
        Fault::ItemTooManyRequests { every: 5 },
        Fault::Status(503),
        Fault::Slow(Duration::from_millis(500)),
        Fault::LoseReply,
    ];
    let sample_every = Duration::from_secs_f64((run_for.as_secs_f64() / 6.0).clamp(2.0, 10.0));
    let outage = (run_for.mul_f64(0.4), run_for.mul_f64(0.4) + Duration::from_secs(3));
    let mut samples = Vec::new();
    let mut next_sample = Instant::now();
    let mut next_fault = Instant::now() + FAULT_EVERY;
    let mut fault_i = 0;
    let mut in_outage = false;
    let start = Instant::now();
    let mut last = Instant::now();
    let mut next_tick = Instant::now();
    while start.elapsed() < run_for {
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        for pod in pods.iter_mut() {
            write_pod(pod, &mut rng, dt, base, &mut tally);
        }
        drain(&es, base, &mut tally);
        churn(&pods_dir, &mut pods, &mut rng, dt, &mut tally);
        let elapsed = start.elapsed();
        if !in_outage && elapsed >= outage.0 && elapsed < outage.1 {
            es.outage(503);
            in_outage = true;
        } else if in_outage && elapsed >= outage.1 {
            es.recover();
            in_outage = false;
        }
        if now >= next_fault {
            es.inject(faults[fault_i % faults.len()].clone());
            fault_i += 1;
            next_fault = now + FAULT_EVERY;
        }
        if now >= next_sample {
            samples.push(sample(&agent, &es, start, &mut tally));
            next_sample = now + sample_every;
        }
        next_tick += TICK;
        std::thread::sleep(next_tick.saturating_duration_since(Instant::now()));
    }
    es.recover();

    // Writing stops; the agent ships what is left, within a bound.
    let drain_start = Instant::now();
    let deadline = drain_start + DRAIN;
    while tally.shipped < tally.written && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        drain(&es, base, &mut tally);
        if Instant::now() >= next_sample {
            samples.push(sample(&agent, &es, start, &mut tally));
            next_sample = Instant::now() + sample_every;
        }
    }
    let drained = drain_start.elapsed();
    // Everything acknowledged: the backlog must reach 0 within a rescan (10 s by default).
    // Late duplicates (a resend after a lost reply) land meanwhile.
    let backlog_of = |agent: &Agent| metric_sum(&agent.get("/metrics").1, "nodelens_log_backlog_bytes", &[]);
    let settle = Instant::now() + Duration::from_secs(25);
    while backlog_of(&agent) > 0.0 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(2));
    drain(&es, base, &mut tally);
    let final_backlog = backlog_of(&agent);
    samples.push(sample(&agent, &es, start, &mut tally));
    let cpu = agent.cpu_seconds();
    let (status, _, log) = agent.terminate();

    let lost = tally.seen.iter().filter(|n| **n == 0).count();
    let latencies: Vec<Duration> = tally.latency_us.iter().map(|us| Duration::from_micros(u64::from(*us))).collect();
    let col = |f: fn(&Sample) -> f64| -> String {
        let first = samples.get(1).or(samples.first()).map_or(0.0, f);
        let last = samples.last().map_or(0.0, f);
        let max = samples.iter().map(f).fold(0.0, f64::max);
        format!("{first:.0} -> {last:.0} (max {max:.0})")
    };
    println!(
        "node_soak: {:.1} min of writing, {:.1} s to drain; pods created {}, deleted {}; restarts {}; rotations {}; removals after the grace {}",
        run_for.as_secs_f64() / 60.0,
        drained.as_secs_f64(),
        tally.created,
        tally.deleted,
        tally.restarts,
        tally.rotations,
        tally.forced_removals
    );
    println!(
        "node_soak: lines written {}, shipped {}, duplicated {}, lost {lost}; resends answered 409: {}; bulk requests {}",
        tally.written,
        tally.shipped,
        tally.duplicated,
        es.conflicts(),
        es.seen().len()
    );
    println!(
        "node_soak: write-to-index latency p50 {:?}, p99 {:?}, max {:?}; agent CPU {cpu:.1} s",
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        quantile(&latencies, 1.0)
    );
    println!(
        "node_soak: fds {}, RSS MiB {}, series {} (from the second sample to the last); backlog at the end {final_backlog} B",
        col(|s| s.fds as f64),
        col(|s| s.rss_mib),
        col(|s| s.series as f64)
    );
    let mut failed = Vec::new();
    if lost > 0 {
        let first: Vec<usize> = tally.seen.iter().enumerate().filter(|(_, n)| **n == 0).map(|(i, _)| i).take(10).collect();
        failed.push(format!("{lost} lines lost (first sequence numbers: {first:?})"));
    }
    if tally.duplicated > 0 {
        failed.push(format!("{} lines stored more than once", tally.duplicated));
    }
    if lost == 0 && final_backlog > 0.0 {
        failed.push(format!("nodelens_log_backlog_bytes is {final_backlog} with every line indexed"));
    }
    if !status.success() {
        failed.push(format!("the agent exited with {status:?}"));
    }
    if !failed.is_empty() {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("agent log (last lines, newest first):\n{}", tail.join("\n"));
        eprintln!("node_soak FAILED: {}", failed.join("; "));
        std::process::exit(1);
    }
}

fn suffix(rng: &mut fastrand::Rng, n: usize) -> String {
    (0..n).map(|_| SUFFIX[rng.usize(..SUFFIX.len())] as char).collect()
}

/// A new pod of one of the usual workload shapes, with its rate class.
fn new_pod(pods_dir: &Path, rng: &mut fastrand::Rng, i: usize, tally: &mut Tally) -> SimPod {
    // Forty applications, each always in the same namespace, so the series they make are
    // bounded however many pods come and go.
    let app = rng.usize(..APPS);
    let name = match app % 4 {
        0 => format!("backup{app}-{}-{}", 29_100_480 + i, suffix(rng, 5)),
        1 => format!("svc{app}-{}-{}", suffix(rng, 10), suffix(rng, 5)),
        2 => format!("db{app}-{}", i % 3),
        _ => format!("train{app}-{}", suffix(rng, 5)),
    };
    let uid = format!("{:08x}-0000-4000-8000-{:012x}", rng.u32(..), i);
    let logs = PodLogs::create(pods_dir, &format!("team-{}", app % 7), &name, &uid).unwrap();
    let mut names = vec!["main"];
    if i % 10 == 0 {
        names.push("sidecar");
    }
    let containers = names
        .into_iter()
        .map(|c| SimContainer { log: logs.start_container(c).unwrap(), live_bytes: 0, current: Vec::new(), previous: Vec::new() })
        .collect();
    // Most pods are quiet, some steady, a few chatty.
    let rate = match rng.u32(..100) {
        0..80 => 0.2,
        80..95 => 5.0,
        _ => 100.0,
    };
    tally.created += 1;
    SimPod {
        logs: Some(logs),
        name,
        containers,
        rate,
        carry: 0.0,
        crash_loops: i % 60 == 7,
        next_crash: Instant::now() + Duration::from_secs(5),
        terminating: None,
        restart_pending: None,
    }
}

fn write_pod(pod: &mut SimPod, rng: &mut fastrand::Rng, dt: f64, base: Instant, tally: &mut Tally) {
    if pod.terminating.is_some() {
        return;
    }
    pod.carry += pod.rate * dt;
    while pod.carry >= 1.0 {
        pod.carry -= 1.0;
        let c = rng.usize(..pod.containers.len());
        let container = &mut pod.containers[c];
        let seq = tally.written;
        tally.written += 1;
        tally.seen.push(0);
        let message = format!(
            "seq={seq} t={} pod={} step={} loss={:.4} {}",
            base.elapsed().as_micros(),
            pod.name,
            seq % 10_000,
            1.0 / (1.0 + seq as f64),
            "detail ".repeat(rng.usize(0..24))
        );
        container.log.write_cri(if seq % 10 == 0 { "stderr" } else { "stdout" }, &message).unwrap();
        // The runtime's framing: timestamp, stream, tag, newline.
        container.live_bytes += message.len() as u64 + 40;
        container.current.push(seq);
        if container.live_bytes > MAX_LIVE_BYTES {
            container.log.rotate().unwrap();
            container.live_bytes = 0;
            tally.rotations += 1;
        }
    }
}

/// Takes what the double stored since the last call into the tally.
fn drain(es: &FakeElasticsearch, base: Instant, tally: &mut Tally) {
    for (_, doc, arrived) in es.take_docs() {
        let message = doc["message"].as_str().unwrap_or_default();
        let field = |key: &str| message.split(' ').find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse::<u64>().ok());
        let (Some(seq), Some(t)) = (field("seq="), field("t=")) else { continue };
        let Some(count) = tally.seen.get_mut(seq as usize) else { continue };
        *count = count.saturating_add(1);
        if *count == 1 {
            tally.shipped += 1;
            let written = base + Duration::from_micros(t);
            tally.latency_us.push(arrived.saturating_duration_since(written).as_micros().min(u32::MAX as u128) as u32);
        } else {
            tally.duplicated += 1;
        }
    }
}

fn indexed(seen: &[u8], seqs: &mut Vec<u64>) -> bool {
    seqs.retain(|s| seen[*s as usize] == 0);
    seqs.is_empty()
}

/// Restarts, crash loops, deletions and their replacements.
fn churn(pods_dir: &Path, pods: &mut [SimPod], rng: &mut fastrand::Rng, dt: f64, tally: &mut Tally) {
    let now = Instant::now();
    if rng.f64() < RESTARTS_PER_S * dt {
        let p = rng.usize(..pods.len());
        if pods[p].terminating.is_none() && pods[p].restart_pending.is_none() {
            pods[p].restart_pending = Some((rng.usize(..pods[p].containers.len()), now));
        }
    }
    if rng.f64() < DELETIONS_PER_S * dt {
        let p = rng.usize(..pods.len());
        if pods[p].terminating.is_none() {
            pods[p].terminating = Some(now);
        }
    }
    for pod in pods.iter_mut() {
        if pod.crash_loops && pod.terminating.is_none() && pod.restart_pending.is_none() && now >= pod.next_crash {
            pod.restart_pending = Some((0, now));
            pod.next_crash = now + Duration::from_secs(5);
        }
        if let Some((c, since)) = pod.restart_pending {
            let container = &mut pod.containers[c];
            let ready = indexed(&tally.seen, &mut container.previous);
            if ready || now.duration_since(since) > REMOVAL_GRACE {
                tally.forced_removals += usize::from(!ready);
                container.log.restart().unwrap();
                container.previous = std::mem::take(&mut container.current);
                container.live_bytes = 0;
                tally.restarts += 1;
                pod.restart_pending = None;
            }
        }
        if let Some(since) = pod.terminating {
            let mut ready = true;
            for container in pod.containers.iter_mut() {
                ready &= indexed(&tally.seen, &mut container.current) & indexed(&tally.seen, &mut container.previous);
            }
            if ready || now.duration_since(since) > REMOVAL_GRACE {
                tally.forced_removals += usize::from(!ready);
                pod.logs.take().unwrap().delete().unwrap();
                tally.deleted += 1;
                let n = PODS + tally.created;
                *pod = new_pod(pods_dir, rng, n, tally);
            }
        }
    }
    // Sequence numbers of running instances are checked only when something is removed;
    // keep the lists short for chatty pods.
    for pod in pods.iter_mut() {
        for container in pod.containers.iter_mut() {
            if container.current.len() > 50_000 {
                indexed(&tally.seen, &mut container.current);
            }
        }
    }
}

fn sample(agent: &Agent, es: &FakeElasticsearch, start: Instant, tally: &mut Tally) -> Sample {
    let (_, body) = agent.get("/metrics");
    let window: Vec<Duration> = tally.latency_us[tally.sampled..].iter().map(|us| Duration::from_micros(u64::from(*us))).collect();
    tally.sampled = tally.latency_us.len();
    let s = Sample {
        at: start.elapsed().as_secs_f64(),
        written: tally.written,
        shipped: tally.shipped,
        backlog: metric_sum(&body, "nodelens_log_backlog_bytes", &[]),
        fds: agent.fd_count(),
        rss_mib: agent.rss_bytes() as f64 / 1048576.0,
        series: body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count(),
        tailed: metric_sum(&body, "nodelens_log_files_tailed", &[]),
        conflicts: es.conflicts(),
        p99: quantile(&window, 0.99),
    };
    println!(
        "{:>7.1} {:>9} {:>9} {:>11.0} {:>5} {:>8.1} {:>7} {:>6.0} {:>6} {:>9}",
        s.at,
        s.written,
        s.shipped,
        s.backlog,
        s.fds,
        s.rss_mib,
        s.series,
        s.tailed,
        s.conflicts,
        s.p99.as_millis()
    );
    s
}
