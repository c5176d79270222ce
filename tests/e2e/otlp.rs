//! End to end: the real `nodelens` binary exports what a simulated kubelet writes to a strict
//! OTLP receiver double, over OTLP/HTTP and gRPC, through injected faults, a SIGKILL and
//! gzip rotations. Every record must arrive, every resend must carry the uid of the first
//! send, and the numbers the receiver is told (rejections, metrics) must be exact.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodelens_testkit::agent::{metric_sum, Agent};
use nodelens_testkit::assert_same_records;
use nodelens_testkit::elasticsearch::FakeElasticsearch;
use nodelens_testkit::kubelet::ContainerLog;
use nodelens_testkit::otlp::{FakeOtlp, Fault, ReceivedLog};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;

const WAIT: Duration = Duration::from_secs(30);

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

    /// A config whose `sinks` section is `sinks` (indented by two).
    fn config(&self, sinks: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join("nodelens.yaml");
        let text = format!(
            "node_name: otlp-node\ncluster_name: lab\nstate_dir: {state}\nlogs:\n  pods_dir: {pods}\n  rescan_interval: 500ms\nsinks:\n{sinks}{extra}",
            state = self.dir.path().join("state").display(),
            pods = self.pods().display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(&self, config: &Path) -> Agent {
        Agent::start(Path::new(env!("CARGO_BIN_EXE_nodelens")), config, &[])
    }

    fn container(&self, pod: &str) -> ContainerLog {
        self.0.container(pod, "main")
    }
}

fn otlp_sink(url: &str, protocol: &str, extra: &str) -> String {
    format!("  otlp:\n    endpoint: {url}\n    protocol: {protocol}\n    flush_interval: 200ms\n{extra}")
}

const METRICS_LISTEN: &str = "metrics:\n  listen: 127.0.0.1:0\n";

fn wait_until(what: &str, agent: &Agent, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting for {what}; agent log:\n{}", agent.log());
}

/// Writes `prefix line i` for each i; every 10th record is split into two partial CRI lines,
/// which the agent must join.
fn write_lines(log: &mut ContainerLog, prefix: &str, range: std::ops::Range<usize>) {
    for i in range {
        let message = format!("{prefix} line {i}");
        if i % 10 == 3 {
            let (head, tail) = message.split_at(message.len() / 2);
            let raw = format!("{} stdout P {head}\n{} stdout F {tail}\n", log.timestamp(), log.timestamp());
            log.write_raw(raw.as_bytes()).unwrap();
        } else {
            log.write_cri(if i % 5 == 0 { "stderr" } else { "stdout" }, &message).unwrap();
        }
    }
}

fn expected(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix} line {i}")).collect()
}

/// One body per uid, sorted by line number: what the receiver holds once resends are folded.
/// Panics when a uid came with two different bodies (a uid must name one record).
fn distinct_by_uid(logs: &[ReceivedLog], pod: &str) -> Vec<String> {
    let mut by_uid: BTreeMap<&str, &str> = BTreeMap::new();
    for log in logs.iter().filter(|l| l.resource.get("k8s.pod.name").map(String::as_str) == Some(pod)) {
        let uid = log.uid().unwrap_or_else(|| panic!("no log.record.uid on {log:?}"));
        if let Some(before) = by_uid.insert(uid, &log.body) {
            assert_eq!(before, log.body, "uid {uid} named two records");
        }
    }
    let mut bodies: Vec<String> = by_uid.values().map(|b| b.to_string()).collect();
    bodies.sort_by_key(|m| m.rsplit(' ').next().unwrap().parse::<usize>().unwrap());
    bodies
}

fn delivery_through_faults_crashes_and_rotation(protocol: &str) {
    let node = Node::new();
    let otlp = FakeOtlp::start();
    let url = if protocol == "grpc" { otlp.grpc_url() } else { otlp.http_url() };
    for fault in [
        Fault::Status { code: 503, retry_after: Some(1) },
        Fault::LoseReply,
        Fault::Slow(Duration::from_millis(300)),
        // Over gRPC a 429 is RESOURCE_EXHAUSTED, retryable only with RetryInfo.
        Fault::Status { code: 429, retry_after: Some(1) },
        Fault::Status { code: 502, retry_after: None },
        Fault::Status { code: 401, retry_after: None },
        Fault::LoseReply,
    ] {
        otlp.inject(fault);
    }
    // Small requests: many of them, so every queued fault meets one.
    let config = node.config(&otlp_sink(&url, protocol, "    batch_max_bytes: 65536\n"), METRICS_LISTEN);
    let mut a = node.container("train-a");
    let mut b = node.container("train-b");
    write_lines(&mut a, "a", 0..3000);
    write_lines(&mut b, "b", 0..1000);
    let agent = node.start(&config);
    wait_until("some records received", &agent, || otlp.log_count() >= 1000);
    let (_, _, first_log) = agent.kill();

    // While the agent is dead: more lines and rotations, so unread records sit in .gz files.
    write_lines(&mut a, "a", 3000..4000);
    a.rotate().unwrap();
    write_lines(&mut a, "a", 4000..4500);
    a.rotate().unwrap();
    write_lines(&mut b, "b", 1000..1500);
    b.rotate().unwrap();
    otlp.inject(Fault::LoseReply);
    otlp.inject(Fault::Status { code: 503, retry_after: None });
    let agent = node.start(&config);
    write_lines(&mut a, "a", 4500..5000);
    write_lines(&mut b, "b", 1500..2000);
    let received = || {
        let logs = otlp.logs();
        distinct_by_uid(&logs, "train-a").len() + distinct_by_uid(&logs, "train-b").len()
    };
    wait_until("all 7000 records received", &agent, || received() >= 7000);
    std::thread::sleep(Duration::from_millis(500));
    let (_, body) = agent.get("/metrics");
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");

    let logs = otlp.logs();
    assert_same_records("pod a over OTLP", &distinct_by_uid(&logs, "train-a"), &expected("a", 0..5000));
    assert_same_records("pod b over OTLP", &distinct_by_uid(&logs, "train-b"), &expected("b", 0..2000));
    let resent = logs.len() - 7000;
    assert!(resent > 0, "the lost replies and the SIGKILL made the agent send some records twice");
    let delivered = metric_sum(&body, "nodelens_sink_records_total", &[r#"sink="otlp""#, r#"outcome="delivered""#]);
    assert!(delivered >= 1000.0, "{body}");
    assert!(metric_sum(&body, "nodelens_sink_retries_total", &[r#"sink="otlp""#]) > 0.0, "{body}");
    // Both runs met faults; the first may be killed before its reader thread has every line.
    assert!(first_log.contains("retrying") || log.contains("retrying"), "failures are logged:\n{first_log}\n{log}");

    let seen = otlp.seen();
    assert!(seen.iter().all(|s| s.transport == protocol.split('/').next().unwrap()), "{seen:?}");
    assert!(seen.iter().all(|s| s.content_encoding.as_deref() == Some("gzip")), "bodies are gzip-compressed: {seen:?}");
    let codes: BTreeSet<i32> = seen.iter().map(|s| s.status).collect();
    assert!(codes.len() >= 2, "faults were exercised: {codes:?}");

    // The resource and record fields of one record, exactly.
    let record = logs.iter().find(|l| l.body == "b line 1234").unwrap();
    let resource: BTreeMap<&str, &str> = record.resource.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let want: BTreeMap<&str, &str> = [
        ("k8s.namespace.name", "ml"),
        ("k8s.pod.name", "train-b"),
        ("k8s.pod.uid", "uid-train-b"),
        ("k8s.container.name", "main"),
        ("k8s.container.restart_count", "0"),
        ("k8s.node.name", "otlp-node"),
        ("host.name", "otlp-node"),
        ("k8s.cluster.name", "lab"),
        ("service.name", "train-b"),
    ]
    .into_iter()
    .collect();
    assert_eq!(resource, want);
    assert_eq!(record.attributes["log.iostream"], "stdout");
    assert!(record.attributes["log.file.path"].contains("ml_train-b_uid-train-b/main/0.log"), "{record:?}");
    assert_eq!(record.uid().unwrap().len(), 32);
    // The kubelet simulator's clock: 2026-11-22T00:00:00Z plus one microsecond per record.
    let midnight = 1_795_305_600_000_000_000u64;
    assert!((midnight..midnight + 86_400_000_000_000).contains(&record.time_unix_nano), "{record:?}");
    assert!(record.observed_time_unix_nano > record.time_unix_nano);
    let joined = logs.iter().find(|l| l.body == "a line 13").unwrap();
    assert_eq!(joined.attributes["log.iostream"], "stdout", "partial lines joined into one record");
    let error = logs.iter().find(|l| l.body == "a line 5").unwrap();
    assert_eq!(error.attributes["log.iostream"], "stderr");
}

#[test]
fn every_record_arrives_over_http_through_faults_crashes_and_rotation() {
    delivery_through_faults_crashes_and_rotation("http/protobuf");
}

#[test]
fn every_record_arrives_over_grpc_through_faults_crashes_and_rotation() {
    delivery_through_faults_crashes_and_rotation("grpc");
}

#[test]
fn rejections_are_counted_exactly_and_not_retried_forever() {
    let node = Node::new();
    let otlp = FakeOtlp::start();
    let config = node.config(&otlp_sink(&otlp.http_url(), "http/protobuf", "    max_attempts: 3\n"), METRICS_LISTEN);
    let mut log = node.container("svc");
    let agent = node.start(&config);
    let batch = |log: &mut ContainerLog, from: usize| {
        for i in from..from + 10 {
            log.write_cri("stdout", &format!("svc line {i}")).unwrap();
        }
    };
    batch(&mut log, 0);
    wait_until("the first 10 records", &agent, || otlp.log_count() == 10);

    otlp.inject(Fault::PartialSuccess { rejected: 2, message: "timestamp out of range".into() });
    batch(&mut log, 10);
    wait_until("8 of the next 10", &agent, || otlp.log_count() == 18);

    for _ in 0..3 {
        otlp.inject(Fault::Status { code: 400, retry_after: None });
    }
    batch(&mut log, 20);
    std::thread::sleep(Duration::from_millis(300));
    batch(&mut log, 30);
    wait_until("the 10 after the refused request", &agent, || otlp.log_count() == 28);

    // A 503 asking for 2 s: nothing is sent before it has passed.
    otlp.inject(Fault::Status { code: 503, retry_after: Some(2) });
    let written = Instant::now();
    batch(&mut log, 40);
    wait_until("the records after the Retry-After", &agent, || otlp.log_count() == 38);
    let first_after = otlp.logs().iter().filter(|l| l.body == "svc line 40").map(|l| l.arrived).min().unwrap();
    assert!(first_after.duration_since(written) >= Duration::from_secs(2), "sent after {:?}", first_after.duration_since(written));

    // Answers about the endpoint, not the data (a route not there yet, a token not yet
    // valid, a proxy's 500): kept and sent again, nothing given up.
    for code in [404, 403, 500] {
        otlp.inject(Fault::Status { code, retry_after: None });
    }
    batch(&mut log, 50);
    wait_until("the records after the endpoint errors", &agent, || otlp.log_count() == 48);

    std::thread::sleep(Duration::from_millis(300));
    let (_, body) = agent.get("/metrics");
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
    let count = |outcome: &str| metric_sum(&body, "nodelens_sink_records_total", &[r#"sink="otlp""#, &format!("outcome=\"{outcome}\"")]);
    assert_eq!((count("delivered"), count("rejected")), (48.0, 12.0), "{body}");
    assert_eq!(metric_sum(&body, "nodelens_log_records_dropped_total", &[r#"reason="rejected""#]), 12.0, "{body}");
    assert_eq!(log.matches("timestamp out of range").count(), 1, "the receiver's reason, logged once:\n{log}");
    assert!(log.contains("400"), "the refusal is logged with its status:\n{log}");
    let bodies: BTreeSet<String> = otlp.logs().into_iter().map(|l| l.body).collect();
    assert!((20..30).all(|i| !bodies.contains(&format!("svc line {i}"))), "the refused request was given up");
    assert_eq!(otlp.seen().iter().filter(|s| s.status == 400).count(), 3, "tried max_attempts times, not forever");
}

#[test]
fn elasticsearch_and_otlp_at_once_checkpoints_wait_for_both() {
    let node = Node::new();
    let es = FakeElasticsearch::start();
    let otlp = FakeOtlp::start();
    let sinks = format!(
        "  elasticsearch:\n    endpoints: [{}]\n    flush_interval: 200ms\n{}",
        es.url(),
        otlp_sink(&otlp.grpc_url(), "grpc", "    headers:\n      Authorization: Bearer s3cret-token\n")
    );
    otlp.require_header("authorization", "Bearer s3cret-token");
    let config = node.config(&sinks, METRICS_LISTEN);
    let mut log = node.container("both");
    for i in 0..500 {
        log.write_cri("stdout", &format!("both line {i}")).unwrap();
    }
    otlp.outage(true);
    let agent = node.start(&config);
    wait_until("all 500 in Elasticsearch", &agent, || es.count() == 500);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(otlp.log_count(), 0);
    // Elasticsearch has them all, the receiver none: the checkpoint must not have moved.
    let (_, _, first_log) = agent.kill();
    otlp.outage(false);
    let agent = node.start(&config);
    wait_until("all 500 over OTLP", &agent, || otlp.log_count() >= 500);
    std::thread::sleep(Duration::from_millis(500));
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");
    let bodies: BTreeSet<String> = otlp.logs().into_iter().map(|l| l.body).collect();
    assert_eq!(bodies.len(), 500);
    assert_eq!(es.count(), 500, "Elasticsearch's resends were answered 409, nothing stored twice");
    assert!(otlp.seen().iter().all(|s| s.authorization.as_deref() == Some("Bearer s3cret-token")));
    assert!(!first_log.contains("s3cret") && !log.contains("s3cret"), "the header value never reaches the log");
    let checked =
        std::process::Command::new(env!("CARGO_BIN_EXE_nodelens")).args(["check-config", "--config"]).arg(&config).output().unwrap();
    let printed = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success() && printed.contains("Authorization") && !printed.contains("s3cret"), "{printed}");
}

#[test]
fn metrics_arrive_as_the_right_otlp_types() {
    let node = Node::new();
    let otlp = FakeOtlp::start();
    let extra =
        format!("metrics:\n  listen: 127.0.0.1:0\n  otlp:\n    endpoint: {}\n    protocol: grpc\n    interval: 1s\n", otlp.grpc_url());
    let config = node.config(&otlp_sink(&otlp.http_url(), "http/protobuf", ""), &extra);
    let mut log = node.container("metered");
    for i in 0..120 {
        log.write_cri(if i < 20 { "stderr" } else { "stdout" }, &format!("metered line {i}")).unwrap();
    }
    let agent = node.start(&config);
    wait_until("120 records", &agent, || otlp.log_count() == 120);
    let records_sum = |otlp: &FakeOtlp| {
        let requests = otlp.metrics();
        let last = requests.last()?;
        let metric = last.resource_metrics[0].scope_metrics[0].metrics.iter().find(|m| m.name == "nodelens_log_records")?;
        let Some(Data::Sum(sum)) = &metric.data else { return None };
        let total: f64 = sum
            .data_points
            .iter()
            .map(|p| match p.value {
                Some(Number::AsDouble(v)) => v,
                Some(Number::AsInt(v)) => v as f64,
                None => 0.0,
            })
            .sum();
        Some((sum.is_monotonic, total))
    };
    wait_until("a push counting all 120 records", &agent, || records_sum(&otlp) == Some((true, 120.0)));
    // A push made between two reads of /metrics carries every family the first read showed
    // with series, and none the second read does not declare (families are named as OTLP
    // names them: OpenMetrics declares a counter without `_total`).
    let families = |exposition: &str| -> (BTreeSet<String>, BTreeSet<String>) {
        let declared: BTreeSet<String> =
            exposition.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next().map(str::to_string)).collect();
        let with_series =
            declared.iter().filter(|f| exposition.lines().any(|l| !l.starts_with('#') && l.starts_with(f.as_str()))).cloned().collect();
        (declared, with_series)
    };
    let (_, with_series) = families(&agent.get("/metrics").1);
    let pushes = otlp.metrics().len();
    wait_until("a push after the first read", &agent, || otlp.metrics().len() >= pushes + 2);
    let (declared, _) = families(&agent.get("/metrics").1);
    let between: BTreeSet<String> =
        otlp.metrics()[pushes + 1].resource_metrics[0].scope_metrics[0].metrics.iter().map(|m| m.name.clone()).collect();
    let missing: Vec<&String> = with_series.difference(&between).collect();
    assert!(missing.is_empty(), "families /metrics serves that the push left out: {missing:?}");
    let unknown: Vec<&String> = between.difference(&declared).collect();
    assert!(unknown.is_empty(), "pushed families /metrics does not declare: {unknown:?}");
    assert!(between.iter().any(|n| n.starts_with("nodelens_process_")), "collector families are pushed too: {between:?}");
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");

    let requests = otlp.metrics();
    let last = requests.last().unwrap();
    let resource: BTreeMap<String, String> = last.resource_metrics[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(resource["k8s.node.name"], "otlp-node");
    assert_eq!(resource["k8s.cluster.name"], "lab");
    let metrics = &last.resource_metrics[0].scope_metrics[0].metrics;
    let find = |name: &str| metrics.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no {name}"));
    let totals: Vec<&str> =
        metrics.iter().map(|m| m.name.as_str()).filter(|n| n.ends_with("_total") && *n != "nodelens_log_metric_total").collect();
    assert!(totals.is_empty(), "counters are named without _total: {totals:?}");
    assert!(matches!(find("nodelens_log_files_tailed").data, Some(Data::Gauge(_))));
    assert!(matches!(find("nodelens_build_info").data, Some(Data::Gauge(_))));
    let Some(Data::Histogram(histogram)) = &find("nodelens_sink_request_duration_seconds").data else { panic!("not a histogram") };
    let point = &histogram.data_points[0];
    assert_eq!(point.bucket_counts.len(), point.explicit_bounds.len() + 1);
    assert_eq!(point.bucket_counts.iter().sum::<u64>(), point.count);
    assert!(point.count >= 1 && point.start_time_unix_nano > 0 && point.time_unix_nano > point.start_time_unix_nano);
    assert_eq!(find("nodelens_sink_request_duration_seconds").unit, "s");
    // Every data point carries the node, like every /metrics series.
    let Some(Data::Sum(records)) = &find("nodelens_log_records").data else { panic!() };
    let stderr: f64 = records
        .data_points
        .iter()
        .filter(|p| p.attributes.iter().any(|kv| kv.key == "stream" && format!("{:?}", kv.value).contains("stderr")))
        .map(|p| match p.value {
            Some(Number::AsDouble(v)) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(stderr, 20.0);
    assert!(records.data_points.iter().all(|p| p.attributes.iter().any(|kv| kv.key == "node")));
}
