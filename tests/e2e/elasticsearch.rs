//! End to end: the real `nodelens` binary ships logs that a simulated kubelet writes and
//! rotates to a strict `_bulk` double, through injected faults, crashes and outages. The
//! double must end holding every record exactly once, with the right fields.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodelens_testkit::agent::{metric_sum, Agent};
use nodelens_testkit::assert_same_records;
use nodelens_testkit::elasticsearch::{FakeElasticsearch, Fault};
use nodelens_testkit::kubelet::ContainerLog;

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

    fn config(&self, es_url: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join("nodelens.yaml");
        let text = format!(
            "node_name: es-node\ncluster_name: lab\nstate_dir: {state}\nlogs:\n  pods_dir: {pods}\n  rescan_interval: 500ms\nsinks:\n  elasticsearch:\n    endpoints: [{es_url}]\n    flush_interval: 200ms\n{extra}metrics:\n  listen: 127.0.0.1:0\n",
            state = self.dir.path().join("state").display(),
            pods = self.pods().display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(&self, config: &Path, env: &[(&str, &str)]) -> Agent {
        Agent::start(Path::new(env!("CARGO_BIN_EXE_nodelens")), config, env)
    }

    fn container(&self, pod: &str) -> ContainerLog {
        self.0.container(pod, "main")
    }
}

fn write_lines(log: &mut ContainerLog, prefix: &str, range: std::ops::Range<usize>) {
    for i in range {
        log.write_cri(if i % 5 == 0 { "stderr" } else { "stdout" }, &format!("{prefix} line {i}")).unwrap();
    }
}

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

/// Messages per pod in the double, in the order they were stored.
fn messages_by_pod(es: &FakeElasticsearch) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (_, doc) in es.docs() {
        out.entry(doc["kubernetes"]["pod"]["name"].as_str().unwrap().to_string())
            .or_default()
            .push(doc["message"].as_str().unwrap().to_string());
    }
    out
}

fn expected(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix} line {i}")).collect()
}

#[test]
fn every_record_lands_exactly_once_through_faults_crashes_and_rotation() {
    let node = Node::new();
    let es = FakeElasticsearch::start();
    for fault in [
        Fault::Status(503),
        Fault::ItemTooManyRequests { every: 7 },
        Fault::LoseReply,
        Fault::Slow(Duration::from_millis(300)),
        Fault::Status(429),
        Fault::LoseReply,
        Fault::ItemTooManyRequests { every: 3 },
    ] {
        es.inject(fault);
    }
    // Small bulks: many requests, so every queued fault meets one.
    let config = node.config(&es.url(), "    batch_max_bytes: 65536\n");
    let mut a = node.container("train-a");
    let mut b = node.container("train-b");
    write_lines(&mut a, "a", 0..3000);
    write_lines(&mut b, "b", 0..1000);
    let agent = node.start(&config, &[]);
    wait_until("some records stored", &agent, || es.count() >= 1000);
    let (_, _, first_log) = agent.kill();

    // While the agent is dead: more lines and rotations, so unread records sit in .gz files.
    write_lines(&mut a, "a", 3000..4000);
    a.rotate().unwrap();
    write_lines(&mut a, "a", 4000..4500);
    a.rotate().unwrap();
    write_lines(&mut b, "b", 1000..1500);
    b.rotate().unwrap();
    es.inject(Fault::LoseReply);
    es.inject(Fault::Status(503));
    let agent = node.start(&config, &[]);
    write_lines(&mut a, "a", 4500..5000);
    write_lines(&mut b, "b", 1500..2000);
    wait_until("all 7000 records stored", &agent, || es.count() >= 7000);
    std::thread::sleep(Duration::from_millis(500));
    let (_, body) = agent.get("/metrics");
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "{log}");

    let stored = messages_by_pod(&es);
    let mut a_msgs = stored["train-a"].clone();
    let mut b_msgs = stored["train-b"].clone();
    a_msgs.sort_by_key(|m| m.rsplit(' ').next().unwrap().parse::<usize>().unwrap());
    b_msgs.sort_by_key(|m| m.rsplit(' ').next().unwrap().parse::<usize>().unwrap());
    assert_same_records("pod a in Elasticsearch", &a_msgs, &expected("a", 0..5000));
    assert_same_records("pod b in Elasticsearch", &b_msgs, &expected("b", 0..2000));
    assert_eq!(es.count(), 7000, "no record stored twice under different ids");

    let seen = es.seen();
    assert!(seen.iter().all(|s| s.gzip), "bodies are gzip-compressed");
    let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
    assert!(statuses.contains(&503) && statuses.contains(&429), "faults were exercised: {statuses:?}");
    assert!(metric_sum(&body, "nodelens_sink_records_total", &[r#"outcome="duplicate""#]) > 0.0, "lost replies came back as 409s:\n{body}");
    assert!(metric_sum(&body, "nodelens_sink_retries_total", &[r#"sink="elasticsearch""#]) > 0.0);
    assert!(first_log.contains("retrying"), "failures are logged");

    let (_, doc) = es.docs().into_iter().find(|(_, d)| d["message"] == "b line 1234").unwrap();
    assert_eq!(doc["kubernetes"]["namespace"], "ml");
    assert_eq!(doc["kubernetes"]["pod"]["uid"], "uid-train-b");
    assert_eq!(doc["kubernetes"]["container"]["name"], "main");
    assert_eq!(doc["kubernetes"]["node"]["name"], "es-node");
    assert_eq!(doc["orchestrator"]["cluster"]["name"], "lab");
    assert!(doc["@timestamp"].as_str().unwrap().starts_with("2026-11-22T"));
    assert!(doc["log"]["file"]["path"].as_str().unwrap().contains("ml_train-b_uid-train-b/main/0.log"));
}

#[test]
fn an_outage_loses_nothing_and_memory_stays_bounded() {
    let node = Node::new();
    // Reserve a port, then leave it closed: connections are refused until the double starts.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = node.config(&format!("http://127.0.0.1:{port}"), "");
    let mut logs: Vec<ContainerLog> = (0..4).map(|i| node.container(&format!("p{i}"))).collect();
    let line = "x".repeat(400);
    for (i, log) in logs.iter_mut().enumerate() {
        for n in 0..10_000 {
            log.write_cri("stdout", &format!("p{i} {n} {line}")).unwrap();
        }
    }
    let backlog_bytes: u64 = logs.iter().map(|l| std::fs::metadata(l.live_path()).unwrap().len()).sum();
    let agent = node.start(&config, &[]);
    // Elasticsearch stays down: the backlog is seen and the sink retries.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (backlog, retries) = loop {
        let (_, body) = agent.get("/metrics");
        let seen = (metric_sum(&body, "nodelens_log_backlog_bytes", &[]), metric_sum(&body, "nodelens_sink_retries_total", &[]));
        if (seen.0 >= backlog_bytes as f64 * 0.9 && seen.1 >= 3.0) || Instant::now() > deadline {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(backlog >= backlog_bytes as f64 * 0.9, "backlog {backlog} of {backlog_bytes} written");
    assert!(retries >= 3.0, "{retries} retries: down for a while");
    let rss = agent.rss_bytes();
    // Memory is measured by the benchmarks (node_soak, under an outage), not asserted here:
    // a debug build on a busy machine is no place for a threshold.
    eprintln!("agent RSS {} MiB with {} MiB waiting on disk (debug build)", rss >> 20, backlog_bytes >> 20);

    let es = FakeElasticsearch::start_on(port);
    wait_until("the backlog delivered", &agent, || es.count() >= 40_000);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(es.count(), 40_000);
    wait_until("backlog metric to drain", &agent, || {
        let (_, body) = agent.get("/metrics");
        metric_sum(&body, "nodelens_log_backlog_bytes", &[]) == 0.0
    });
    let (_, body) = agent.get("/metrics");
    assert_eq!(metric_sum(&body, "nodelens_sink_records_total", &[r#"outcome="delivered""#]), 40_000.0);
    agent.terminate();
}

#[test]
fn rejected_records_are_counted_logged_and_not_sent_again() {
    let node = Node::new();
    let es = FakeElasticsearch::start();
    es.reject_messages_containing("poison");
    let config = node.config(&es.url(), "");
    let mut log = node.container("svc");
    for i in 0..10 {
        log.write_cri("stdout", &if i == 3 || i == 7 { format!("poison {i}") } else { format!("fine {i}") }).unwrap();
    }
    let agent = node.start(&config, &[]);
    wait_until("the good records", &agent, || es.count() >= 8);
    wait_until("the rejection counted", &agent, || {
        metric_sum(&agent.get("/metrics").1, "nodelens_log_records_dropped_total", &[r#"reason="rejected""#]) == 2.0
    });
    let requests = es.seen().len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(es.seen().len(), requests, "rejected records are not retried");
    let (_, body) = agent.get("/metrics");
    assert_eq!(metric_sum(&body, "nodelens_sink_records_total", &[r#"outcome="rejected""#]), 2.0);
    let (_, _, log_text) = agent.terminate();
    assert!(log_text.contains("document_parsing_exception"), "Elasticsearch's reason is logged:\n{log_text}");

    // After a restart the checkpoint is past them: nothing is sent at all.
    let agent = node.start(&config, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    agent.terminate();
    assert_eq!(es.seen().len(), requests);
    assert_eq!(es.count(), 8);
}

#[test]
fn a_413_splits_the_request_until_it_fits() {
    let node = Node::new();
    let es = FakeElasticsearch::start();
    es.limit_body(40_000);
    let config = node.config(&es.url(), "    batch_max_bytes: 262144\n");
    let mut log = node.container("big");
    let pad = "y".repeat(300);
    for i in 0..400 {
        log.write_cri("stdout", &format!("big line {i} {pad}")).unwrap();
    }
    let agent = node.start(&config, &[]);
    wait_until("all records", &agent, || es.count() >= 400);
    agent.terminate();
    assert!(es.seen().iter().any(|s| s.status == 413), "the limit was hit");
    assert_eq!(es.count(), 400);
}

#[test]
fn api_key_authenticates_and_secrets_stay_out_of_logs() {
    let node = Node::new();
    let es = FakeElasticsearch::start();
    es.require_authorization("ApiKey bm9kZWxlbnM6czNjcmV0");
    let config = node.config(&es.url(), "");
    let mut log = node.container("auth");
    write_lines(&mut log, "auth", 0..20);

    let wrong = node.start(&config, &[("NODELENS_SINKS__ELASTICSEARCH__API_KEY", "d3Jvbmc6a2V5")]);
    wait_until("a refused request", &wrong, || es.seen().iter().any(|s| s.status == 401));
    let (_, _, wrong_log) = wrong.terminate();
    assert_eq!(es.count(), 0);
    assert!(wrong_log.contains("401"), "{wrong_log}");
    assert!(!wrong_log.contains("d3Jvbmc6a2V5"), "the key is never logged");

    let right = node.start(&config, &[("NODELENS_SINKS__ELASTICSEARCH__API_KEY", "bm9kZWxlbnM6czNjcmV0")]);
    wait_until("records after a 401 outage", &right, || es.count() >= 20);
    let (_, _, log_text) = right.terminate();
    assert!(!log_text.contains("bm9kZWxlbnM6czNjcmV0"));
    assert_eq!(es.count(), 20, "nothing lost while the key was wrong");
}

#[test]
fn a_private_ca_from_ca_file_secures_the_connection() {
    let node = Node::new();
    let ca_file = node.dir.path().join("ca.pem");
    let es = FakeElasticsearch::start_tls(&ca_file);
    assert!(es.url().starts_with("https://"));
    let mut log = node.container("tls");
    write_lines(&mut log, "tls", 0..10);

    // Without the CA the server is not trusted: nothing is sent, nothing is lost.
    let config = node.config(&es.url(), "");
    let untrusted = node.start(&config, &[]);
    wait_until("a TLS failure logged", &untrusted, || untrusted.log().contains("_bulk request failed"));
    let (_, _, log_text) = untrusted.terminate();
    assert_eq!(es.count(), 0);
    assert!(log_text.to_lowercase().contains("certificate"), "{log_text}");

    let config = node.config(&es.url(), &format!("    ca_file: {}\n", ca_file.display()));
    let trusted = node.start(&config, &[]);
    wait_until("records over TLS", &trusted, || es.count() >= 10);
    trusted.terminate();
    assert_eq!(es.count(), 10);
}

/// A document Elasticsearch fails on every time (a shard failing on it, 500) is given up after
/// `item_max_attempts` while the others get in, counted once, and does not hold them up.
#[test]
fn a_poison_document_is_given_up_and_does_not_stop_the_node() {
    let node = Node::new();
    let es = FakeElasticsearch::start();
    es.fail_messages_containing("POISON");
    let config = node.config(&es.url(), "");
    let mut log = node.container("ingest");
    write_lines(&mut log, "before", 0..500);
    log.write_cri("stdout", "POISON record").unwrap();
    write_lines(&mut log, "after", 0..3000);
    let agent = node.start(&config, &[]);
    wait_until("every other record", &agent, || es.count() >= 3500);
    let metrics = |labels: &[&str]| metric_sum(&agent.get("/metrics").1, "nodelens_log_records_dropped_total", labels);
    wait_until("the poison record given up", &agent, || metrics(&[r#"reason="retries_exhausted""#]) == 1.0);
    // Requests run concurrently: each record exactly once, in whatever order they landed.
    let mut got = messages_by_pod(&es).remove("ingest").unwrap();
    got.sort();
    let mut all: Vec<String> = expected("before", 0..500);
    all.extend(expected("after", 0..3000));
    all.sort();
    assert_same_records("ingest", &got, &all);
    assert!(agent.log().contains("shard failure on this document"), "Elasticsearch's reason is logged:\n{}", agent.log());
    let (_, body) = agent.get("/metrics");
    assert_eq!(metric_sum(&body, "nodelens_sink_records_total", &[r#"outcome="rejected""#]), 1.0);
    agent.terminate();
}

/// Every item answered 5xx (shards unavailable) is an outage, not poison: nothing is given
/// up, and everything lands once Elasticsearch recovers.
#[test]
fn an_outage_answered_item_by_item_with_5xx_gives_up_nothing() {
    let node = Node::new();
    let es = FakeElasticsearch::start();
    es.fail_messages_containing("line");
    let config = node.config(&es.url(), "    item_max_attempts: 2\n");
    let mut log = node.container("ingest");
    write_lines(&mut log, "outage", 0..300);
    let agent = node.start(&config, &[]);
    wait_until("several rounds of 5xx", &agent, || es.seen().len() >= 4);
    std::thread::sleep(Duration::from_secs(2));
    es.fail_messages_containing("\u{0}nothing");
    wait_until("every record", &agent, || es.count() >= 300);
    let (_, body) = agent.get("/metrics");
    assert_eq!(metric_sum(&body, "nodelens_log_records_dropped_total", &[]), 0.0, "{body}");
    let mut got = messages_by_pod(&es).remove("ingest").unwrap();
    got.sort();
    let mut want = expected("outage", 0..300);
    want.sort();
    assert_same_records("ingest", &got, &want);
    agent.terminate();
}

#[test]
fn json_traceparent_and_bad_timestamps_give_exact_fields_and_each_namespace_its_own_stream() {
    let node = Node::new();
    let es = FakeElasticsearch::start();
    es.install_index_template(serde_json::from_str(include_str!("../../deploy/elasticsearch/index-template.json")).unwrap());
    let config = node.config(&es.url(), "    data_stream: logs-kubernetes.container_logs-{namespace}\n");
    let mut team = ContainerLog::create(&node.pods(), "team-a", "web-0", "uid-web-0", "main", 0).unwrap();
    let mut ml = ContainerLog::create(&node.pods(), "ml", "trainer-0", "uid-trainer-0", "main", 0).unwrap();
    let agent = node.start(&config, &[]);
    let many: Vec<String> = (0..200).map(|i| format!("\"k{i}\":{i}")).collect();
    let lines = [
        r#"{"level":"ERROR","msg":"boom","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7","user":{"id":7,"tags":["a"]},"a.b":1}"#.to_string(),
        "GET /x traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 200".to_string(),
        r#"{"msg":"not quite",}"#.to_string(),
        format!("{{{}}}", many.join(",")),
        format!(r#"{{"msg":"big","huge":"{}","small":1}}"#, "x".repeat(10_000)),
    ];
    for line in &lines {
        team.write_cri("stdout", line).unwrap();
    }
    team.write_raw(b"2024-13-45T99:99:99Z stdout F impossible time\n").unwrap();
    for i in 0..20 {
        ml.write_cri("stdout", &format!("ml line {i}")).unwrap();
    }
    wait_until("every record", &agent, || es.count() > lines.len() + 20);
    std::thread::sleep(Duration::from_millis(500));
    let docs = es.docs();
    assert_eq!(docs.len(), lines.len() + 21, "every record once");
    for (id, doc) in &docs {
        let namespace = doc["kubernetes"]["namespace"].as_str().unwrap();
        let want = if namespace == "team-a" { "logs-kubernetes.container_logs-team_a" } else { "logs-kubernetes.container_logs-ml" };
        assert_eq!(es.data_stream_of(id).as_deref(), Some(want));
    }
    let team_docs: Vec<&serde_json::Value> = docs.iter().map(|(_, d)| d).filter(|d| d["kubernetes"]["namespace"] == "team-a").collect();
    let json = team_docs[0];
    assert_eq!(json["message"], "boom");
    assert_eq!(json["log"]["level"], "error");
    assert_eq!(json["trace"]["id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(json["span"]["id"], "00f067aa0ba902b7");
    assert_eq!(json["json"], serde_json::json!({"user": {"id": 7, "tags": ["a"]}, "a.b": 1}));
    let text = team_docs[1];
    assert_eq!(text["message"], lines[1].as_str());
    assert_eq!(text["trace"]["id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(text.get("json").is_none());
    let not_quite = team_docs[2];
    assert_eq!(not_quite["message"], lines[2].as_str());
    assert!(not_quite["log"].get("flags").is_none() && not_quite.get("json").is_none());
    let wide = team_docs[3];
    assert_eq!(wide["json"].as_object().unwrap().len(), 64);
    assert_eq!(wide["log"]["flags"], serde_json::json!(["json_truncated"]));
    let huge = team_docs[4];
    assert_eq!((&huge["message"], &huge["json"]), (&serde_json::json!("big"), &serde_json::json!({"small": 1})));
    let late = team_docs[5];
    assert_eq!(late["message"], "impossible time");
    assert_eq!(late["log"]["flags"], serde_json::json!(["bad_timestamp"]));
    assert!(late["@timestamp"].as_str().unwrap().starts_with("20"), "the read time: {late}");
}

/// Against a saturated Elasticsearch (3,000 records/s, answering late rather than with 429)
/// and default sink settings, a container writing as fast as it can delays a quiet one's new
/// lines by at most 2 s from write to stored, and every one of its own lines still arrives.
#[test]
fn a_flooding_container_delays_a_quiet_ones_lines_by_at_most_two_seconds() {
    let node = Node::new();
    let es = FakeElasticsearch::start();
    es.limit_rate(3000.0);
    let config = node.path("nodelens.yaml");
    let text = format!(
        "node_name: es-node\nstate_dir: {state}\nlogs:\n  pods_dir: {pods}\nsinks:\n  elasticsearch:\n    endpoints: [{url}]\nmetrics:\n  listen: 127.0.0.1:0\n",
        state = node.state().display(),
        pods = node.pods().display(),
        url = es.url(),
    );
    std::fs::write(&config, text).unwrap();
    let mut quiet = node.container("quiet");
    quiet.write_cri("stdout", "quiet hello").unwrap();
    let agent = node.start(&config, &[]);
    wait_until("the quiet container's first line", &agent, || es.count() == 1);

    // 30,000 lines of 200 bytes at once: ten seconds of the cluster's capacity.
    const NOISY: usize = 30_000;
    let mut noisy = node.container("noisy");
    let padding = "n".repeat(180);
    let flood = Instant::now();
    for i in 0..NOISY {
        noisy.write_cri("stdout", &format!("noisy {i:05} {padding}")).unwrap();
    }
    let mut written = Vec::new();
    for i in 0..16 {
        std::thread::sleep(Duration::from_millis(500));
        let message = format!("quiet {i}");
        quiet.write_cri("stdout", &message).unwrap();
        written.push((message, Instant::now()));
    }
    wait_until("every quiet line", &agent, || messages_by_pod(&es).get("quiet").map_or(0, Vec::len) == 17);
    let arrived: HashMap<String, Instant> =
        es.docs_arrived().into_iter().map(|(_, doc, at)| (doc["message"].as_str().unwrap().to_string(), at)).collect();
    let delays: Vec<Duration> = written.iter().map(|(m, at)| arrived[m].duration_since(*at)).collect();
    let noisy_then = messages_by_pod(&es).get("noisy").map_or(0, Vec::len);
    eprintln!("quiet line delays behind a flood: {delays:?}; noisy records stored by then: {noisy_then}");
    assert!(noisy_then < NOISY, "the flood was still going while the quiet lines were written: {noisy_then}");
    let worst = delays.iter().max().unwrap();
    assert!(*worst <= Duration::from_secs(2), "quiet lines waited up to {worst:?}: {delays:?}\n{}", agent.log());

    let deadline = Instant::now() + Duration::from_secs(60);
    while es.count() < NOISY + 17 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let requests = es.seen().len();
    eprintln!("the flood stored in {:?} (the cluster's capacity: 10 s) in {requests} requests", flood.elapsed());
    // At most one request per 100 ms of the cluster's time: batching is not given up.
    assert!(requests <= 200, "{requests} requests for {NOISY} records");
    // Requests overlap (up to `max_concurrent_requests`), so Elasticsearch may store them out
    // of order: in the file's order is by offset, as a search sorts them.
    let mut stored: Vec<(u64, String)> = es
        .docs()
        .into_iter()
        .filter(|(_, doc)| doc["kubernetes"]["pod"]["name"] == "noisy")
        .map(|(_, doc)| (doc["log"]["offset"].as_u64().unwrap(), doc["message"].as_str().unwrap().to_string()))
        .collect();
    stored.sort_unstable_by_key(|(offset, _)| *offset);
    assert!(stored.windows(2).all(|w| w[0].0 < w[1].0), "one offset a line");
    assert_eq!(
        stored.into_iter().map(|(_, m)| m).collect::<Vec<_>>(),
        (0..NOISY).map(|i| format!("noisy {i:05} {padding}")).collect::<Vec<_>>(),
        "every noisy line, once, in the file's order by offset"
    );
    agent.terminate();
}
