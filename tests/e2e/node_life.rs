//! End to end: the real `nodelens` binary on a node living an ordinary day — containers
//! restarting and crash-looping, the agent's own pod logging what the agent prints, files
//! created empty and written later, rotations, an Elasticsearch outage, files that cannot be
//! opened for a while, CronJob pods coming and going, hundreds of quiet containers, an API
//! server slow to list, and files truncated in place. Each test protects one defect of issue 13
//! and asserts exact outcomes: each line exactly once, latency from write to output, series,
//! file descriptors and backlog bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodelens_testkit::agent::{latencies, metric_sum, quantile, series, Agent, Options, OwnPod};
use nodelens_testkit::assert_same_records;
use nodelens_testkit::elasticsearch::FakeElasticsearch;
use nodelens_testkit::kubelet::{ContainerLog, PodLogs};
use nodelens_testkit::kubernetes::{pod, FakeApiServer};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const NODE: &str = "life-node";

/// A node: a pod log directory, a state directory and the agent's config.
/// The shared node (directories, containers) with this file's config and start.
struct Node(nodelens_testkit::node::Node);

impl std::ops::Deref for Node {
    type Target = nodelens_testkit::node::Node;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Node {
    fn new() -> Node {
        Node(nodelens_testkit::node::Node::new())
    }

    /// Writes the config: `logs_extra` goes under `logs:`, `extra` at the top level.
    fn config(&self, rescan: &str, logs_extra: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join("nodelens.yaml");
        let text = format!(
            "node_name: {NODE}\nlog_level: nodelens=debug\nstate_dir: {state}\nlogs:\n  pods_dir: {pods}\n  rescan_interval: {rescan}\n  partial_timeout: 500ms\n{logs_extra}{extra}metrics:\n  listen: 127.0.0.1:0\n",
            state = self.dir.path().join("state").display(),
            pods = self.pods().display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(&self, config: &Path) -> Agent {
        self.start_with(config, Options::default())
    }

    fn start_with(&self, config: &Path, options: Options) -> Agent {
        let built = Path::new(env!("CARGO_BIN_EXE_nodelens"));
        if options.user.is_none() {
            return Agent::start_with(built, config, options);
        }
        // Another user may not reach the build directory (a checkout under a private
        // directory): run a copy from the node's own directory, which the test opens up.
        use std::os::unix::fs::PermissionsExt;
        let copy = self.dir.path().join("nodelens");
        std::fs::copy(built, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        Agent::start_with(&copy, config, options)
    }
}

fn write_lines(log: &mut ContainerLog, prefix: &str, range: std::ops::Range<usize>) {
    for i in range {
        log.write_cri("stdout", &format!("{prefix} line {i}")).unwrap();
    }
}

fn expected(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix} line {i}")).collect()
}

fn messages(docs: &[Value]) -> Vec<String> {
    docs.iter().map(|d| d["message"].as_str().unwrap_or_default().to_string()).collect()
}

/// Messages per `pod/container`, in the order they were printed.
fn by_container(docs: &[Value]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for doc in docs {
        let key = format!(
            "{}/{}",
            doc["kubernetes"]["pod"]["name"].as_str().unwrap_or("?"),
            doc["kubernetes"]["container"]["name"].as_str().unwrap_or("?")
        );
        out.entry(key).or_default().push(doc["message"].as_str().unwrap_or_default().to_string());
    }
    out
}

/// Each of `want` exactly once, in any order (records of several files or instances).
fn assert_each_once(what: &str, got: Vec<String>, want: Vec<String>) {
    let (mut got, mut want) = (got, want);
    got.sort();
    want.sort();
    assert_same_records(what, &got, &want);
}

fn count_is(n: usize) -> impl Fn(&[Value]) -> bool {
    move |docs| docs.len() >= n
}

/// Polls `done` until it holds or `timeout` passes; whether it held.
fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits for a metric condition, panicking with the last exposition and the agent log.
fn wait_metric(agent: &Agent, timeout: Duration, what: &str, check: impl Fn(&str) -> bool) {
    if !eventually(timeout, || check(&agent.get("/metrics").1)) {
        panic!("timed out waiting for {what}:\n{}\nagent log (tail):\n{}", agent.get("/metrics").1, tail(&agent.log(), 40));
    }
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// For asserting that something does NOT happen: give it this long.
fn quiet(period: Duration) {
    std::thread::sleep(period);
}

// 1 -------------------------------------------------------------------------------------

#[test]
fn an_earlier_instance_beside_the_restarted_one_is_read_once_across_rescans_crash_loops_and_agent_restarts() {
    let node = Node::new();
    let config = node.config("500ms", "", "");
    let pod = PodLogs::create(&node.pods(), "ml", "trainer-7d9f8b6c5d-x2k4p", "uid-trainer").unwrap();
    let mut log = pod.start_container("main").unwrap();
    write_lines(&mut log, "first", 0..5);
    let agent = node.start(&config);
    agent.wait_for(WAIT, "the first instance's lines", count_is(5));

    log.restart().unwrap();
    write_lines(&mut log, "second", 0..5);
    agent.wait_for(WAIT, "the second instance's lines", count_is(10));
    assert_eq!(log.files(), ["0.log", "1.log"], "the kubelet keeps the previous instance beside the new one");
    // Six full rescans: each would tail 0.log again if its position had been forgotten.
    quiet(Duration::from_secs(3));
    let want: Vec<String> = [expected("first", 0..5), expected("second", 0..5)].concat();
    assert_each_once("0.log beside 1.log over six rescans", messages(&agent.docs()), want.clone());

    // A crash loop: two restarts in a row; instance 0 is collected, 1 and then 2 kept.
    log.restart().unwrap();
    write_lines(&mut log, "third", 0..5);
    log.restart().unwrap();
    write_lines(&mut log, "fourth", 0..5);
    agent.wait_for(WAIT, "the crash loop's lines", count_is(20));
    assert_eq!(log.files(), ["2.log", "3.log"]);
    quiet(Duration::from_secs(3));
    let want: Vec<String> = [want, expected("third", 0..5), expected("fourth", 0..5)].concat();
    assert_each_once("through a crash loop", messages(&agent.docs()), want);
    let (status, _, log_text) = agent.terminate();
    assert!(status.success(), "{log_text}");

    // The agent restarts: the files on disk were all read; only new lines come out.
    let agent = node.start(&config);
    write_lines(&mut log, "fourth", 5..8);
    agent.wait_for(WAIT, "the new lines after the agent restarted", |d| d.iter().any(|d| d["message"] == "fourth line 7"));
    quiet(Duration::from_secs(2));
    let (_, second_run, _) = agent.terminate();
    assert_each_once("after the agent restarted", messages(&second_run), expected("fourth", 5..8));
}

// 2 -------------------------------------------------------------------------------------

/// The default install: no sink configured, so stdout is the sink, and the runtime writes
/// what the agent prints into the agent's own pod's log under `pods_dir`.
fn assert_never_reads_itself(node: &Node, own: &OwnPod, agent: Agent) {
    let mut web = node.container("web-0", "main");
    write_lines(&mut web, "web", 0..10);
    agent.wait_for(WAIT, "the workload's lines", |d| d.iter().filter(|d| d["kubernetes"]["pod"]["name"] == "web-0").count() >= 10);
    // Six rescans: a self-feeding agent prints its own documents again and again.
    quiet(Duration::from_secs(3));
    write_lines(&mut web, "web", 10..15);
    agent.wait_for(WAIT, "the workload's later lines", |d| d.iter().any(|d| d["message"] == "web line 14"));
    quiet(Duration::from_secs(1));
    let docs = agent.docs();
    let own_docs = docs.iter().filter(|d| d["kubernetes"]["pod"]["uid"] == own.uid.as_str()).count();
    let own_lines = std::fs::read_to_string(own.log_path(&node.pods())).unwrap().lines().count();
    assert!(own_lines >= 15, "the agent's output landed in its own log file ({own_lines} lines)");
    assert_eq!(own_docs, 0, "documents read from the agent's own pod (of {} in all)", docs.len());
    assert_each_once("only the workload", messages(&docs), expected("web", 0..15));
    agent.terminate();
}

#[test]
fn the_default_install_never_reads_its_own_pod_named_by_pod_uid() {
    let node = Node::new();
    let config = node.config("500ms", "", "");
    let own = OwnPod::new("x7k2p", "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b");
    let options =
        Options { env: vec![("POD_UID".into(), own.uid.clone())], own_log: Some(own.log_path(&node.pods())), ..Options::default() };
    let agent = node.start_with(&config, options);
    assert_never_reads_itself(&node, &own, agent);
}

#[test]
fn the_default_install_never_reads_its_own_pod_found_from_its_cgroup() {
    let node = Node::new();
    let proc_root = node.dir.path().join("proc");
    let own = OwnPod::new("q8r2n", "9c8d7e6f-1a2b-4c3d-8e9f-a0b1c2d3e4f5");
    own.write_self_cgroup(&proc_root);
    let config = node.config("500ms", "", &format!("host:\n  proc_root: {}\n", proc_root.display()));
    let options = Options { env_remove: vec!["POD_UID".into()], own_log: Some(own.log_path(&node.pods())), ..Options::default() };
    let agent = node.start_with(&config, options);
    assert_never_reads_itself(&node, &own, agent);
}

// 3 -------------------------------------------------------------------------------------

#[test]
fn a_file_empty_at_first_and_the_fresh_live_file_after_a_rotation_are_read_within_a_second_of_each_write() {
    let node = Node::new();
    // A full rescan only every 30 s: only the fast path can meet the bound.
    let config = node.config("30s", "", "");
    let mut early = node.container("early-0", "main");
    let agent = node.start(&config);
    agent.metrics_addr();
    let mut written: Vec<(String, Instant)> = Vec::new();
    let mut stamp = |log: &mut ContainerLog, message: String| {
        log.write_cri("stdout", &message).unwrap();
        written.push((message, Instant::now()));
    };
    std::thread::sleep(Duration::from_millis(500));
    // A new container's first line, written at once.
    let mut fresh = node.container("fresh-0", "main");
    stamp(&mut fresh, "fresh line 0".into());
    // A container that starts now and logs 3 s later; `early` was empty when the agent started.
    let mut late = node.container("late-0", "main");
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..10 {
        stamp(&mut early, format!("early line {i}"));
        stamp(&mut late, format!("late line {i}"));
        std::thread::sleep(Duration::from_millis(50));
    }
    eventually(Duration::from_secs(5), || agent.docs().len() >= 21);
    // Rotation: the new live file is empty until the process writes again.
    early.rotate().unwrap();
    late.rotate().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for i in 10..20 {
        stamp(&mut early, format!("early line {i}"));
        stamp(&mut late, format!("late line {i}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    eventually(Duration::from_secs(5), || agent.docs().len() >= 41);

    let arrived = agent.docs_arrived();
    let (measured, missing) = latencies(&written, &arrived);
    let (_, docs, _) = agent.terminate();
    let samples: Vec<Duration> = measured.iter().map(|(_, d)| *d).collect();
    eprintln!(
        "write-to-stdout latency over {} lines (debug build): median {:?}, p90 {:?}, max {:?}",
        samples.len(),
        quantile(&samples, 0.5),
        quantile(&samples, 0.9),
        quantile(&samples, 1.0)
    );
    for (group, lines) in [("new container", 0..1), ("empty at first", 1..21), ("after rotation", 21..41)] {
        let of: Vec<Duration> =
            measured.iter().filter(|(m, _)| written[lines.clone()].iter().any(|(w, _)| w == m)).map(|(_, d)| *d).collect();
        eprintln!("  {group}: {} of {} out, max {:?}", of.len(), lines.len(), quantile(&of, 1.0));
    }
    let mut slow: Vec<&(String, Duration)> = measured.iter().filter(|(_, d)| *d >= Duration::from_secs(1)).collect();
    slow.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    assert!(
        missing.is_empty() && slow.is_empty(),
        "not out within 5 s of their write: {missing:?}\nout later than 1 s after their write (worst first): {slow:?}"
    );
    assert_each_once("every line", messages(&docs), written.iter().map(|(m, _)| m.clone()).collect());
}

// 4 -------------------------------------------------------------------------------------

fn backlog(exposition: &str) -> f64 {
    metric_sum(exposition, "nodelens_log_backlog_bytes", &[])
}

#[test]
fn the_backlog_follows_the_bytes_written_during_an_elasticsearch_outage_and_returns_to_zero() {
    let node = Node::new();
    let es = FakeElasticsearch::start();
    let sink = format!("sinks:\n  elasticsearch:\n    endpoints: [{}]\n    flush_interval: 200ms\n", es.url());
    let config = node.config("500ms", "", &sink);
    let mut log = node.container("ingest-0", "main");
    write_lines(&mut log, "ingest", 0..1);
    let agent = node.start(&config);
    assert!(eventually(WAIT, || es.count() == 1), "first record indexed; log:\n{}", agent.log());
    wait_metric(&agent, WAIT, "no backlog once the first record is acknowledged", |m| backlog(m) == 0.0);

    es.outage(503);
    let size = |log: &ContainerLog| std::fs::metadata(log.live_path()).unwrap().len();
    let acknowledged = size(&log);
    write_lines(&mut log, "ingest", 1..1001);
    let unacknowledged = (size(&log) - acknowledged) as f64;
    if !eventually(Duration::from_secs(10), || backlog(&agent.get("/metrics").1) == unacknowledged) {
        panic!(
            "nodelens_log_backlog_bytes is {} while {unacknowledged} bytes written during the outage are unacknowledged",
            backlog(&agent.get("/metrics").1)
        );
    }
    write_lines(&mut log, "ingest", 1001..2001);
    let unacknowledged = (size(&log) - acknowledged) as f64;
    if !eventually(Duration::from_secs(10), || backlog(&agent.get("/metrics").1) == unacknowledged) {
        panic!("nodelens_log_backlog_bytes is {} after more lines; want {unacknowledged}", backlog(&agent.get("/metrics").1));
    }
    assert_eq!(es.count(), 1, "nothing indexed during the outage");

    es.recover();
    assert!(eventually(Duration::from_secs(40), || es.count() >= 2001), "all indexed after the outage: {} of 2001", es.count());
    wait_metric(&agent, WAIT, "the backlog back at zero once everything is acknowledged", |m| backlog(m) == 0.0);
    let (_, body) = agent.get("/metrics");
    assert_eq!(metric_sum(&body, "nodelens_log_lost_bytes_total", &[]), 0.0, "{body}");
    agent.terminate();
    let stored: Vec<Value> = es.docs().into_iter().map(|(_, d)| d).collect();
    // Concurrent `_bulk` requests may store them in any order; each exactly once.
    assert_each_once("in the double", messages(&stored), expected("ingest", 0..2001));
}

// 5 -------------------------------------------------------------------------------------

/// Padded lines, so a few thousand make a file larger than everything the pipeline buffers.
fn padded(prefix: &str, i: usize) -> String {
    format!("{prefix} line {i} {}", "x".repeat(160))
}

#[test]
fn a_rotated_file_that_cannot_be_opened_for_a_while_is_read_once_it_can_and_nothing_counts_as_lost() {
    use std::os::unix::fs::PermissionsExt;
    // Root opens any file whatever its mode: run the agent as nobody so `chmod 000` denies.
    let as_root = unsafe { libc::geteuid() } == 0;
    let node = Node::new();
    let mode = |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    mode(node.dir.path(), 0o755);
    let state = node.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    if as_root {
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    }
    let config = node.config("500ms", "  max_line_bytes: 16384\n  max_inflight_bytes: 65536\n", "");
    let mut log = node.container("archive-0", "main");
    let (x, y, z) = (0..8000, 0..200, 0..20);
    for i in x.clone() {
        log.write_cri("stdout", &padded("x", i)).unwrap();
    }
    log.rotate().unwrap();
    for i in y.clone() {
        log.write_cri("stdout", &padded("y", i)).unwrap();
    }
    // The second rotation compresses the first: x is now in a .gz, y in a plain rotation.
    log.rotate().unwrap();
    write_lines(&mut log, "z", z.clone());
    let y_path = log.dir().join("0.log.20261122-000002");
    assert!(y_path.exists(), "{:?}", log.files());

    // Stdout unread: the agent reads up to max_inflight_bytes of x and waits, having listed
    // (fingerprinted) y without opening it.
    let options = Options { user: as_root.then_some((65534, 65534)), stdout_paused: true, ..Options::default() };
    let agent = node.start_with(&config, options);
    assert!(eventually(WAIT, || agent.log().contains("tailing container")), "the first scan; log:\n{}", agent.log());
    mode(&y_path, 0o000);
    agent.resume_stdout();
    agent.wait_for(WAIT, "the lines of the first rotation", count_is(x.len()));
    // Several attempts at y fail now (EACCES); the file is intact and will be readable.
    quiet(Duration::from_millis(1500));
    mode(&y_path, 0o644);
    agent.wait_for(WAIT, "the lines of the file that could not be opened", |d| d.iter().any(|d| d["message"] == "z line 19"));
    quiet(Duration::from_millis(700));
    let (_, body) = agent.get("/metrics");
    let (_, docs, _) = agent.terminate();
    let want: Vec<String> = [x.map(|i| padded("x", i)).collect::<Vec<_>>(), y.map(|i| padded("y", i)).collect(), expected("z", z)].concat();
    assert_same_records("through a file unreadable for a while", &messages(&docs), &want);
    assert_eq!(metric_sum(&body, "nodelens_log_lost_bytes_total", &[]), 0.0, "an intact file counts as lost:\n{body}");
}

#[test]
fn rotations_compressed_and_removed_while_the_agent_lags_lose_nothing() {
    let node = Node::new();
    // A small read-ahead and a stalling stdout keep the agent behind the kubelet, which
    // compresses each plain rotation (and removes it) at the next one.
    let config = node.config("500ms", "  max_line_bytes: 8192\n  max_inflight_bytes: 16384\n", "");
    let mut logs: Vec<ContainerLog> = (0..4).map(|c| node.container(&format!("worker-{c}"), "main")).collect();
    for log in &mut logs {
        // Every rotation stays on disk (plain or .gz): whatever the agent misses is its loss.
        log.max_files = 100;
    }
    let agent = node.start(&config);
    let (rounds, per_round) = (12, 250);
    for round in 0..rounds {
        if round % 2 == 0 {
            agent.pause_stdout();
        }
        for (c, log) in logs.iter_mut().enumerate() {
            write_lines(log, &format!("w{c}"), round * per_round..(round + 1) * per_round);
            log.rotate().unwrap();
        }
        std::thread::sleep(Duration::from_millis(150));
        agent.resume_stdout();
        std::thread::sleep(Duration::from_millis(50));
    }
    let total = rounds * per_round * logs.len();
    agent.wait_for(Duration::from_secs(40), "every line", count_is(total));
    quiet(Duration::from_secs(1));
    let (_, body) = agent.get("/metrics");
    let (_, docs, _) = agent.terminate();
    let got = by_container(&docs);
    for c in 0..logs.len() {
        let empty = Vec::new();
        let have = got.get(&format!("worker-{c}/main")).unwrap_or(&empty);
        assert_same_records(&format!("worker-{c}"), have, &expected(&format!("w{c}"), 0..rounds * per_round));
    }
    assert!(logs[0].files().iter().filter(|f| f.ends_with(".gz")).count() >= 10, "{:?}", logs[0].files());
    assert_eq!(metric_sum(&body, "nodelens_log_lost_bytes_total", &[]), 0.0, "{body}");
}

// 6 -------------------------------------------------------------------------------------

#[test]
fn pods_without_app_labels_count_under_their_workload_not_their_pod_name_as_they_churn() {
    let node = Node::new();
    let config = node.config("500ms", "", "");
    let agent = node.start(&config);
    // A CronJob's pods: <cronjob>-<scheduled minute>-<5 random>, one after another.
    let suffixes = ["x2k4p", "7hz9q", "m4wbt", "q8r2n", "t5c7d", "z9v2k", "b6n8w", "k7p5s"];
    for (i, suffix) in suffixes.iter().enumerate() {
        let name = format!("backup-{}-{suffix}", 29100480 + i);
        let pod = PodLogs::create(&node.pods(), "batch", &name, &format!("uid-backup-{i}")).unwrap();
        let mut log = pod.start_container("backup").unwrap();
        write_lines(&mut log, &name, 0..3);
        let last = format!("{name} line 2");
        agent.wait_for(WAIT, "the job pod's lines", |d| d.iter().any(|d| d["message"] == last.as_str()));
        pod.delete().unwrap();
    }
    // A Deployment's pods (ReplicaSet hash) and a StatefulSet's (ordinal).
    for name in ["web-7d9f8b6c5d-x2k4p", "web-7d9f8b6c5d-q8r2n", "kafka-0", "kafka-1"] {
        let mut log = ContainerLog::create(&node.pods(), "shop", name, &format!("uid-{name}"), "main", 0).unwrap();
        write_lines(&mut log, name, 0..2);
    }
    agent.wait_for(WAIT, "every line", count_is(suffixes.len() * 3 + 8));
    let (_, body) = agent.get("/metrics");
    let docs = agent.docs();
    agent.terminate();

    let records: Vec<&str> = series(&body, "nodelens_log_records_total");
    let batch: Vec<&&str> = records.iter().filter(|l| l.contains(r#"namespace="batch""#)).collect();
    assert_eq!(batch.len(), 1, "one series for the CronJob however many pods it ran: {batch:#?}");
    assert!(batch[0].contains(r#"app="backup""#), "{}", batch[0]);
    assert_eq!(metric_sum(&body, "nodelens_log_records_total", &[r#"app="backup""#]), 24.0);
    let bytes: Vec<&str> = series(&body, "nodelens_log_bytes_total").into_iter().filter(|l| l.contains(r#"namespace="batch""#)).collect();
    assert_eq!(bytes.len(), 1, "{bytes:#?}");
    for (app, n) in [("web", 4.0), ("kafka", 4.0)] {
        let sel = [r#"namespace="shop""#.to_string(), format!("app=\"{app}\"")];
        let sel: Vec<&str> = sel.iter().map(String::as_str).collect();
        assert_eq!(metric_sum(&body, "nodelens_log_records_total", &sel), n, "app {app}:\n{records:#?}");
    }
    assert_eq!(records.iter().filter(|l| l.contains(r#"namespace="shop""#)).count(), 2, "{records:#?}");
    for doc in &docs {
        let pod = doc["kubernetes"]["pod"]["name"].as_str().unwrap();
        let app = if pod.starts_with("backup-") {
            "backup"
        } else if pod.starts_with("web-") {
            "web"
        } else {
            "kafka"
        };
        assert_eq!(doc["service"]["name"], app, "the application of pod {pod}");
    }
}

// 7 -------------------------------------------------------------------------------------

#[test]
fn quiet_containers_hold_no_file_descriptors_and_are_read_once_when_they_log_again() {
    const CONTAINERS: usize = 300;
    let node = Node::new();
    let config = node.config("500ms", "", "");
    let mut logs: Vec<ContainerLog> = (0..CONTAINERS).map(|i| node.container(&format!("quiet-{i:03}"), "main")).collect();
    for (i, log) in logs.iter_mut().enumerate() {
        log.write_cri("stdout", &format!("quiet-{i:03} line 0")).unwrap();
    }
    let agent = node.start(&config);
    agent.wait_for(Duration::from_secs(30), "a line of every container", count_is(CONTAINERS));
    let busiest = agent.fd_count();
    if !eventually(Duration::from_secs(30), || agent.fd_count() < 100) {
        panic!("{} file descriptors open with {CONTAINERS} quiet containers (after reading: {busiest})", agent.fd_count());
    }
    let idle_fds = agent.fd_count();
    // Some of them log again: read once, from where they were.
    for (i, log) in logs.iter_mut().enumerate().step_by(30) {
        log.write_cri("stdout", &format!("quiet-{i:03} line 1")).unwrap();
    }
    agent.wait_for(WAIT, "the lines of the containers that woke up", count_is(CONTAINERS + 10));
    quiet(Duration::from_secs(2));
    let (_, docs, _) = agent.terminate();
    let mut want: Vec<String> = (0..CONTAINERS).map(|i| format!("quiet-{i:03} line 0")).collect();
    want.extend((0..CONTAINERS).step_by(30).map(|i| format!("quiet-{i:03} line 1")));
    assert_each_once("quiet containers", messages(&docs), want);
    eprintln!("fds with {CONTAINERS} containers: {busiest} right after reading, {idle_fds} once they were quiet");
}

// 8 -------------------------------------------------------------------------------------

/// A node whose agent watches a fake API server.
fn cluster_config(node: &Node, api: &FakeApiServer) -> PathBuf {
    let kubeconfig = node.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    node.config("500ms", "", &format!("kubernetes:\n  enabled: true\n  kubeconfig: {}\n", kubeconfig.display()))
}

#[test]
fn containers_of_pods_the_api_does_not_list_do_not_hold_up_the_others_when_the_list_is_late() {
    let node = Node::new();
    let api = FakeApiServer::start();
    let list_delay = Duration::from_secs(2);
    api.delay_lists(list_delay);
    // 100 pods the API lists, and 100 whose logs are still on disk but whose pods are gone
    // from the API (deleted during an outage, or static pods).
    for i in 0..100 {
        let name = format!("known-{i:03}");
        api.apply(pod("ml", &name, &format!("uid-{name}"), NODE, json!({"app": "trainer"}), &["main"]));
        node.container(&name, "main").write_cri("stdout", &format!("{name} line 0")).unwrap();
        let gone = format!("gone-{i:03}");
        node.container(&gone, "main").write_cri("stdout", &format!("{gone} line 0")).unwrap();
    }
    let config = cluster_config(&node, &api);
    let started = Instant::now();
    let agent = node.start(&config);
    let bound = list_delay + Duration::from_secs(4);
    let all = eventually(bound, || agent.docs().len() >= 200);
    let took = started.elapsed();
    let docs = agent.docs();
    let shipped = docs.len();
    agent.terminate();
    assert!(all, "{shipped} of 200 lines out {took:?} after start (the list came after {list_delay:?})");
    let known: Vec<&Value> = docs.iter().filter(|d| d["message"].as_str().unwrap().starts_with("known-")).collect();
    assert_eq!(known.len(), 100);
    for doc in known {
        assert_eq!(doc["service"]["name"], "trainer", "known pods carry the listed metadata: {doc}");
    }
    assert_each_once(
        "every container's line",
        messages(&docs),
        (0..100).flat_map(|i| [format!("known-{i:03} line 0"), format!("gone-{i:03} line 0")]).collect(),
    );
    eprintln!("200 containers out {took:?} after start, the first list after {list_delay:?}");
}

#[test]
fn an_excluded_pod_ships_nothing_even_when_the_first_list_is_late() {
    let node = Node::new();
    let api = FakeApiServer::start();
    api.delay_lists(Duration::from_secs(2));
    let mut noisy = pod("ml", "noisy-0", "uid-noisy-0", NODE, json!({"app": "noisy"}), &["main"]);
    noisy["metadata"]["annotations"] = json!({"nodelens.io/exclude": "true"});
    api.apply(noisy);
    api.apply(pod("ml", "web-0", "uid-web-0", NODE, json!({"app": "storefront"}), &["main"]));
    let mut noisy_log = node.container("noisy-0", "main");
    let mut web_log = node.container("web-0", "main");
    write_lines(&mut noisy_log, "noisy", 0..5);
    write_lines(&mut web_log, "web", 0..5);
    let config = cluster_config(&node, &api);
    let agent = node.start(&config);
    agent.wait_for(WAIT, "the web pod's first lines", count_is(5));
    write_lines(&mut noisy_log, "noisy", 5..10);
    write_lines(&mut web_log, "web", 5..10);
    agent.wait_for(WAIT, "the web pod's later lines", |d| d.iter().any(|d| d["message"] == "web line 9"));
    quiet(Duration::from_millis(1500));
    let (_, docs, _) = agent.terminate();
    let leaked: Vec<String> = messages(&docs).into_iter().filter(|m| m.starts_with("noisy")).collect();
    assert!(leaked.is_empty(), "records of a pod annotated nodelens.io/exclude: {leaked:?}");
    assert_same_records("the web pod", &messages(&docs), &expected("web", 0..10));
    for doc in &docs {
        assert_eq!(doc["service"]["name"], "storefront", "metadata from the first list, even for lines written before it: {doc}");
    }
}

// 9 -------------------------------------------------------------------------------------

#[test]
fn a_file_truncated_in_place_is_read_again_from_its_start_without_repeating_old_lines() {
    let node = Node::new();
    let config = node.config("500ms", "", "");
    let mut log = node.container("shell-0", "main");
    write_lines(&mut log, "before", 0..1);
    let agent = node.start(&config);
    agent.wait_for(WAIT, "the first line", count_is(1));
    write_lines(&mut log, "before", 1..100);
    agent.wait_for(WAIT, "the lines before the truncation", count_is(100));
    // `> 0.log`, or logrotate's copytruncate: same file, size 0, written again from offset 0.
    log.truncate().unwrap();
    write_lines(&mut log, "after", 0..5);
    let arrived = eventually(Duration::from_secs(10), || agent.docs().iter().any(|d| d["message"] == "after line 4"));
    quiet(Duration::from_millis(1500));
    let (_, docs, _) = agent.terminate();
    assert!(arrived, "the lines written after the truncation never came out; got {} lines", docs.len());
    let want: Vec<String> = [expected("before", 0..100), expected("after", 0..5)].concat();
    assert_same_records("across the truncation", &messages(&docs), &want);
}
