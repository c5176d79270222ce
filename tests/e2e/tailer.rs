//! End to end: the real `nodelens` binary tails logs that a simulated kubelet writes, rotates
//! and compresses, across clean restarts and crashes; what it prints must match what was
//! written — nothing missing, nothing twice, each container's records in order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nodelens_testkit::agent::{metric_sum, Agent};
use nodelens_testkit::assert_same_records;
use nodelens_testkit::kubelet::ContainerLog;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

struct Node {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Node {
    fn new(extra: &str) -> Node {
        Node::with_rescan("500ms", extra)
    }

    fn with_rescan(rescan: &str, extra: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pods")).unwrap();
        let config = dir.path().join("nodelens.yaml");
        let text = format!(
            "node_name: test-node\nlog_level: nodelens=debug\nstate_dir: {state}\nlogs:\n  pods_dir: {pods}\n  rescan_interval: {rescan}\n  partial_timeout: 500ms\n{extra}metrics:\n  listen: 127.0.0.1:0\n",
            state = dir.path().join("state").display(),
            pods = dir.path().join("pods").display(),
        );
        std::fs::write(&config, text).unwrap();
        Node { dir, config }
    }

    fn pods(&self) -> PathBuf {
        self.dir.path().join("pods")
    }

    fn start(&self) -> Agent {
        Agent::start(Path::new(env!("CARGO_BIN_EXE_nodelens")), &self.config, &[])
    }

    fn container(&self, pod: &str, container: &str) -> ContainerLog {
        ContainerLog::create(&self.pods(), "ml", pod, &format!("uid-{pod}"), container, 0).unwrap()
    }
}

/// Messages per `pod/container`, in the order they were printed.
fn by_container(docs: &[Value]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for doc in docs {
        let key =
            format!("{}/{}", doc["kubernetes"]["pod"]["name"].as_str().unwrap(), doc["kubernetes"]["container"]["name"].as_str().unwrap());
        out.entry(key).or_default().push(doc["message"].as_str().unwrap().to_string());
    }
    out
}

fn expected(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix} line {i}")).collect()
}

fn write_lines(log: &mut ContainerLog, prefix: &str, range: std::ops::Range<usize>) {
    for i in range {
        log.write_cri(if i % 7 == 0 { "stderr" } else { "stdout" }, &format!("{prefix} line {i}")).unwrap();
    }
}

fn count_is(n: usize) -> impl Fn(&[Value]) -> bool {
    move |docs| docs.len() >= n
}

#[test]
fn records_written_across_rotations_and_compression_arrive_once_in_order() {
    let node = Node::new("");
    let mut a = node.container("train-a", "worker");
    let mut b = node.container("train-b", "worker");
    let agent = node.start();
    for round in 0..6 {
        write_lines(&mut a, "a", round * 500..(round + 1) * 500);
        write_lines(&mut b, "b", round * 300..(round + 1) * 300);
        // Wait before rotating: with max_files 5 the kubelet deletes the oldest rotation,
        // and records in a file deleted before it was read are gone for any agent.
        agent.wait_for(WAIT, "the round's records", count_is((round + 1) * 800));
        a.rotate().unwrap();
        if round % 2 == 0 {
            b.rotate().unwrap();
        }
    }
    write_lines(&mut a, "a", 3000..3100);
    agent.wait_for(WAIT, "all records", |docs| docs.len() >= 4900 && docs.iter().any(|d| d["message"] == "a line 3099"));
    let (status, docs, log) = agent.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}\n{log}");
    let got = by_container(&docs);
    assert_same_records("container a", &got["train-a/worker"], &expected("a", 0..3100));
    assert_same_records("container b", &got["train-b/worker"], &expected("b", 0..1800));
    assert_same_records("container b", &got["train-b/worker"], &expected("b", 0..1800));
    let gz = std::fs::read_dir(a.dir()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".gz")).count();
    assert!(gz >= 2, "the scenario really compressed rotations ({gz} .gz files)");
}

#[test]
fn records_written_while_stopped_are_read_from_rotated_and_gzip_files_after_restart() {
    let node = Node::new("");
    let mut log = node.container("job", "main");
    write_lines(&mut log, "j", 0..200);
    let agent = node.start();
    agent.wait_for(WAIT, "first records", count_is(200));
    let (status, first_run, _) = agent.terminate();
    assert!(status.success());

    // While the agent is down: more lines and three rotations; the unread lines now sit in
    // a compressed rotation, a plain rotation and the live file.
    for round in 0..3 {
        write_lines(&mut log, "j", 200 + round * 100..300 + round * 100);
        log.rotate().unwrap();
    }
    write_lines(&mut log, "j", 500..550);
    let agent = node.start();
    agent.wait_for(WAIT, "the records written while stopped", count_is(350));
    std::thread::sleep(Duration::from_millis(700));
    let (status, second_run, log_text) = agent.terminate();
    assert!(status.success(), "{log_text}");
    let mut all = by_container(&first_run).remove("job/main").unwrap();
    all.extend(by_container(&second_run).remove("job/main").unwrap());
    assert_same_records("across the restart", &all, &expected("j", 0..550));
}

#[test]
fn a_crash_loses_nothing_and_the_restart_resumes_near_the_crash() {
    let node = Node::new("");
    let mut log = node.container("crashy", "main");
    write_lines(&mut log, "k", 0..2000);
    let agent = node.start();
    agent.wait_for(WAIT, "some records", count_is(1000));
    let (_, first_run, _) = agent.kill();
    write_lines(&mut log, "k", 2000..2500);
    log.rotate().unwrap();
    write_lines(&mut log, "k", 2500..3000);
    log.rotate().unwrap();
    write_lines(&mut log, "k", 3000..3100);
    let agent = node.start();
    agent.wait_for(WAIT, "the rest", |docs| docs.iter().any(|d| d["message"] == "k line 3099"));
    std::thread::sleep(Duration::from_millis(500));
    let (status, second_run, _) = agent.terminate();
    assert!(status.success());

    let first = by_container(&first_run).remove("crashy/main").unwrap_or_default();
    let second = by_container(&second_run).remove("crashy/main").unwrap();
    assert_same_records("first run", &first, &expected("k", 0..first.len()));
    // The restart resumes at the last checkpoint: what it repeats is a tail of the first run
    // (printed but not yet checkpointed when the crash came), then everything after.
    let resume = second[0].trim_start_matches("k line ").parse::<usize>().unwrap();
    assert!(resume <= first.len(), "no gap: resumed at {resume}, first run had {}", first.len());
    assert_same_records("second run", &second, &expected("k", resume..3100));
}

#[test]
fn new_pod_directories_are_picked_up_without_restart() {
    // No periodic rescan during the test: only inotify can find the new directories.
    let node = Node::with_rescan("1h", "");
    let agent = node.start();
    std::thread::sleep(Duration::from_millis(300));
    let mut late = node.container("late-pod", "app");
    write_lines(&mut late, "late", 0..10);
    agent.wait_for(WAIT, "the new pod's records", count_is(10));
    let mut second = ContainerLog::create(&node.pods(), "other", "p2", "uid-p2", "c", 0).unwrap();
    write_lines(&mut second, "p2", 0..5);
    agent.wait_for(WAIT, "the second pod's records", count_is(15));
    let (_, docs, _) = agent.terminate();
    let p2 = docs.iter().find(|d| d["kubernetes"]["pod"]["name"] == "p2").unwrap();
    assert_eq!(p2["kubernetes"]["namespace"], "other");
    assert_eq!(p2["kubernetes"]["pod"]["uid"], "uid-p2");
    assert_eq!(p2["kubernetes"]["node"]["name"], "test-node");
    assert_eq!(p2["host"]["name"], "test-node");
    assert_eq!(p2["service"]["name"], "p2");
    assert_eq!(p2["log"]["file"]["path"], second.live_path().to_str().unwrap());
}

#[test]
fn partial_records_join_huge_lines_truncate_and_garbage_survives() {
    let node = Node::new("  max_line_bytes: 4096\n");
    let mut log = node.container("odd", "main");
    let ts = log.timestamp();
    log.write_raw(format!("{ts} stdout P first half, ").as_bytes()).unwrap();
    log.write_raw(b"\n").unwrap();
    let ts = log.timestamp();
    log.write_raw(format!("{ts} stdout F second half\n").as_bytes()).unwrap();
    let ts = log.timestamp();
    log.write_raw(format!("{ts} stdout F {}\n", "x".repeat(3 * 1024 * 1024)).as_bytes()).unwrap();
    log.write_raw(b"not a CRI line at all\n").unwrap();
    let ts = log.timestamp();
    log.write_raw(format!("{ts} stderr F caf\u{e9} ").as_bytes()).unwrap();
    log.write_raw(b"\xff\xfe bytes\n").unwrap();
    let ts = log.timestamp();
    log.write_raw(format!("{ts} stdout P never finished").as_bytes()).unwrap();
    log.write_raw(b"\n").unwrap();
    let agent = node.start();
    agent.wait_for(WAIT, "five records (the unfinished one after its timeout)", count_is(5));
    let (_, docs, _) = agent.terminate();
    let messages: Vec<&str> = docs.iter().map(|d| d["message"].as_str().unwrap()).collect();
    assert_eq!(messages[0], "first half, second half");
    assert_eq!(messages[1].len(), 4096, "huge line cut at max_line_bytes");
    assert_eq!(docs[1]["log"]["flags"], serde_json::json!(["truncated"]));
    assert_eq!(messages[2], "not a CRI line at all");
    assert_eq!(docs[2]["log"]["flags"], serde_json::json!(["malformed"]));
    assert_eq!(messages[3], "caf\u{e9} \u{fffd}\u{fffd} bytes");
    assert_eq!(docs[3]["stream"], "stderr");
    assert_eq!(messages[4], "never finished");
    assert_eq!(docs[4]["log"]["flags"], serde_json::json!(["partial"]));
}

#[test]
fn metrics_health_and_readiness_are_served() {
    let node = Node::new("");
    let mut log = node.container("metered", "main");
    write_lines(&mut log, "m", 0..70);
    let agent = node.start();
    agent.wait_for(WAIT, "records", count_is(70));
    assert_eq!(agent.get("/healthz").0, 200);
    assert_eq!(agent.get("/readyz").0, 200);
    assert_eq!(agent.get("/nope").0, 404);
    let (status, body) = agent.get("/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric_sum(&body, "nodelens_log_records_total", &[r#"node="test-node""#, r#"namespace="ml""#, r#"app="metered""#]),
        70.0,
        "{body}"
    );
    assert_eq!(metric_sum(&body, "nodelens_log_records_total", &[r#"stream="stderr""#]), 10.0);
    let message_bytes: usize = (0..70).map(|i| format!("m line {i}").len()).sum();
    assert_eq!(metric_sum(&body, "nodelens_log_bytes_total", &[r#"app="metered""#]), message_bytes as f64);
    assert_eq!(metric_sum(&body, "nodelens_log_files_tailed", &[]), 1.0);
    assert_eq!(metric_sum(&body, "nodelens_build_info", &[r#"version=""#]), 1.0);
    assert_eq!(metric_sum(&body, "nodelens_sink_records_total", &[r#"sink="stdout""#, r#"outcome="delivered""#]), 70.0);
    assert!(body.contains("nodelens_log_backlog_bytes{"), "{body}");
    agent.terminate();
}

#[test]
fn check_config_prints_the_effective_config_and_rejects_typos() {
    let node = Node::new("");
    let bin = env!("CARGO_BIN_EXE_nodelens");
    let ok = std::process::Command::new(bin)
        .args(["check-config", "--config"])
        .arg(&node.config)
        .env("NODELENS_SINKS__ELASTICSEARCH__API_KEY", "c2VjcmV0")
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let printed = String::from_utf8(ok.stdout).unwrap();
    assert!(printed.contains("node_name: test-node") && printed.contains("max_line_bytes: 1048576"), "{printed}");
    assert!(!printed.contains("c2VjcmV0"), "secrets are never printed");

    std::fs::write(node.dir.path().join("typo.yaml"), "logs:\n  pod_dir: /var/log/pods\n").unwrap();
    let bad = std::process::Command::new(bin).args(["check-config", "--config"]).arg(node.dir.path().join("typo.yaml")).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8(bad.stderr).unwrap();
    assert!(err.contains("logs.pod_dir"), "{err}");

    let run = std::process::Command::new(bin).arg("--config").arg(node.dir.path().join("typo.yaml")).output().unwrap();
    assert_eq!(run.status.code(), Some(2), "run refuses a bad config too");

    let env_typo = std::process::Command::new(bin).arg("check-config").env("NODELENS_LOGS__MAX_LINE_BYTE", "5").output().unwrap();
    assert_eq!(env_typo.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&env_typo.stderr).contains("NODELENS_LOGS__MAX_LINE_BYTE"));
}

#[test]
fn a_training_log_becomes_metrics_and_they_leave_with_the_pod() {
    let rules = "  log_metrics:\n    - {name: loss, app: 'resnet*', pattern: 'loss=(?P<v>[0-9.]+)', type: gauge, value: v}\n    - {name: steps, pattern: 'step=\\d+', type: counter}\n    - {name: tokens, pattern: 'tokens=(?P<n>\\d+) split=(?P<split>\\w+)', type: counter, value: n, labels: [split]}\n";
    let node = Node::new(rules);
    let mut log = node.container("resnet-0", "trainer");
    for (step, loss) in [(10, "0.91"), (20, "0.74"), (30, "0.53")] {
        log.write_cri("stdout", &format!("step={step} loss={loss} lr=0.001 tokens=100 split=train")).unwrap();
    }
    log.write_cri("stdout", "eval tokens=40 split=val").unwrap();
    let agent = node.start();
    agent.wait_for(WAIT, "the records", count_is(4));
    let (_, body) = agent.get("/metrics");
    let pod = [r#"namespace="ml""#, r#"pod="resnet-0""#, r#"app="resnet""#];
    let with = |name: &'static str| pod.iter().copied().chain([name]).collect::<Vec<_>>();
    assert_eq!(metric_sum(&body, "nodelens_log_metric", &with(r#"name="loss""#)), 0.53, "{body}");
    assert_eq!(metric_sum(&body, "nodelens_log_metric_total", &with(r#"name="steps""#)), 3.0);
    assert_eq!(metric_sum(&body, "nodelens_log_metric_total", &with(r#"split="train""#)), 300.0);
    assert_eq!(metric_sum(&body, "nodelens_log_metric_total", &with(r#"split="val""#)), 40.0);

    std::fs::remove_dir_all(node.pods().join("ml_resnet-0_uid-resnet-0")).unwrap();
    // The sweep runs as records pass through; another pod keeps them flowing.
    let mut other = node.container("web-0", "main");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        other.write_cri("stdout", "tick").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        if !agent.get("/metrics").1.contains(r#"pod="resnet-0""#) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "series of the removed pod are still there");
    }
    agent.terminate();
}
