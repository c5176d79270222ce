//! End to end: the real `nodelens` binary ships the node's own logs. The kernel ring is a file
//! in `/dev/kmsg`'s record format beside a fake `/proc` (boot id, boot time, XID processes in
//! every cgroup layout the GPU tests use); the journal is real journal files written by
//! systemd's own `systemd-journal-remote` and read back through `journalctl`. Agents are
//! stopped with SIGTERM and restarted in between: every selected record is shipped once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodelens_testkit::agent::{metric_sum, Agent};
use nodelens_testkit::elasticsearch::FakeElasticsearch;
use nodelens_testkit::gpu::{Cgroup, FakeProc};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const BTIME: u64 = 1_764_800_000;

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["pods", "containers", "proc/sys/kernel/random", "journal"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        std::fs::write(dir.path().join("proc/stat"), format!("cpu  1 2 3 4\nbtime {BTIME}\nprocesses 77\n")).unwrap();
        let node = Node { dir };
        node.boot("boot-1");
        node
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn boot(&self, id: &str) {
        std::fs::write(self.path("proc/sys/kernel/random/boot_id"), format!("{id}\n")).unwrap();
    }

    fn config(&self, sink: &str) -> PathBuf {
        let path = self.path("nodelens.yaml");
        let text = format!(
            "node_name: gpu-node\nstate_dir: {state}\nhost:\n  proc_root: {proc}\nlogs:\n  pods_dir: {pods}\n  containers_dir: {containers}\n  max_line_bytes: 4096\nkubernetes:\n  enabled: false\nnode_logs:\n  journald:\n    path: {journal}\n  kernel:\n    path: {kmsg}\n{sink}metrics:\n  listen: 127.0.0.1:0\n",
            state = self.path("state").display(),
            proc = self.path("proc").display(),
            pods = self.path("pods").display(),
            containers = self.path("containers").display(),
            journal = self.path("journal").display(),
            kmsg = self.path("kmsg").display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(&self, config: &Path, kernel: bool, journal: bool) -> Agent {
        let on = |b: bool| if b { "true" } else { "false" };
        let env = [("NODELENS_NODE_LOGS__KERNEL__ENABLED", on(kernel)), ("NODELENS_NODE_LOGS__JOURNALD__ENABLED", on(journal))];
        Agent::start(Path::new(env!("CARGO_BIN_EXE_nodelens")), config, &env)
    }

    fn kmsg(&self, text: &str) {
        std::fs::OpenOptions::new().create(true).append(true).open(self.path("kmsg")).unwrap().write_all(text.as_bytes()).unwrap();
    }
}

fn dataset<'a>(docs: &'a [Value], name: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["event"]["dataset"] == name).collect()
}

fn wait_docs(agent: &Agent, name: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let docs = agent.docs();
        if dataset(&docs, name).len() >= count {
            // Anything extra would show up within a pass.
            std::thread::sleep(Duration::from_millis(1500));
            return agent.docs().into_iter().filter(|d| d["event"]["dataset"] == name).collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {count} {name} records; agent log:\n{}", agent.log());
}

fn pod(node: &Node, proc: &FakeProc, pid: u32, name: &str, uid: &str, layout: Cgroup) {
    let id = format!("{:0>64}", format!("{pid:x}"));
    std::fs::create_dir_all(node.path("pods").join(format!("ml_{name}_{uid}/main"))).unwrap();
    std::fs::write(node.path("containers").join(format!("{name}_ml_main-{id}.log")), "").unwrap();
    proc.add(pid, 100, &layout.render(uid, &id));
}

fn stop(agent: Agent) {
    let started = Instant::now();
    let (status, _, log) = agent.terminate();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn kernel_records_are_shipped_once_across_restarts_and_a_reboot_and_xids_name_their_container() {
    let node = Node::new();
    let proc = FakeProc::new(&node.path("proc"));
    let uid = |n: u32| format!("6f1c2d3e-0000-4a5b-9c8d-00000000000{n}");
    pod(&node, &proc, 101, "trainer-a", &uid(1), Cgroup::V2SystemdContainerd);
    pod(&node, &proc, 102, "trainer-b", &uid(2), Cgroup::V2SystemdCrio);
    pod(&node, &proc, 103, "trainer-c", &uid(3), Cgroup::V1CgroupfsGuaranteed);
    pod(&node, &proc, 104, "trainer-d", &uid(4), Cgroup::V2Namespaced);
    proc.add(200, 100, "0::/system.slice/sshd.service\n");
    let huge = "y".repeat(1 << 20);
    node.kmsg(&format!(
        "6,0,1000000,-;Linux version 6.1.0-test\n SUBSYSTEM=cpu\n DEVICE=+cpu:0\n\
         4,1,2000000,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=101, name=python3, GPU has fallen off the bus.\n\
         4,2,2100000,-;NVRM: Xid (PCI:0000:3c:00): 13, pid=102, name=train, Graphics SM Warp Exception\n\
         4,3,2200000,-;NVRM: Xid (PCI:0000:3d:00): 31, pid='103', name=train, Ch 00000008, MMU Fault\n\
         4,4,2300000,-;NVRM: Xid (PCI:0000:3e:00): 43, pid=104, name=train, Ch 00000010\n\
         4,8,3000000,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=300, name=gone, GPU has fallen off the bus.\n\
         4,9,3100000,-;NVRM: Xid (PCI:0000:3b:00): 45, pid=200, name=sshd, Preemptive Cleanup\n\
         4,10,3200000,-;NVRM: Xid (PCI:0000:3b:00): 48, An uncorrectable double bit error (DBE) has been detected on GPU\n\
         3,11,3300000,-;{huge}\n"
    ));
    let config = node.config("");
    let agent = node.start(&config, true, false);
    let docs = wait_docs(&agent, "node.kernel", 9);
    assert_eq!(docs.len(), 9, "continuation lines are never records: {docs:#?}");
    assert_eq!(docs[0]["message"], "Linux version 6.1.0-test");
    assert_eq!(docs[0]["@timestamp"], "2025-12-03T22:13:21.000000Z", "boot time + the record's microseconds");
    assert_eq!(docs[0]["log"]["syslog"]["priority"], 6);
    assert_eq!(docs[0]["kubernetes"]["node"]["name"], "gpu-node");
    assert_eq!(docs[0]["host"]["name"], "gpu-node");
    assert!(docs[0].get("kubernetes").unwrap().get("pod").is_none());
    let xid = |n: u64| docs.iter().find(|d| d["nodelens"]["gpu"]["xid"] == n).unwrap_or_else(|| panic!("no xid {n}: {docs:#?}"));
    for (n, pod, bus) in [(13, "trainer-b", "0000:3c:00"), (31, "trainer-c", "0000:3d:00"), (43, "trainer-d", "0000:3e:00")] {
        let d = xid(n);
        assert_eq!(d["kubernetes"]["pod"]["name"], pod, "{d}");
        assert_eq!(d["kubernetes"]["namespace"], "ml");
        assert_eq!(d["kubernetes"]["container"]["name"], "main");
        assert_eq!(d["error"]["code"], n.to_string());
        assert_eq!(d["nodelens"]["gpu"]["pci_bus_id"], bus);
        assert!(d["service"]["name"].as_str().is_some_and(|s| !s.is_empty()), "{d}");
    }
    let first79 = docs
        .iter()
        .find(|d| d["nodelens"]["gpu"]["xid"] == 79 && d["kubernetes"]["pod"]["name"] == "trainer-a")
        .expect("xid 79 of trainer-a");
    assert_eq!(first79["kubernetes"]["pod"]["uid"], uid(1));
    for (n, why) in [(45, "host process"), (48, "no pid")] {
        assert!(xid(n)["kubernetes"].get("pod").is_none() && xid(n).get("service").is_none(), "{why}: GPU fields only: {}", xid(n));
    }
    let gone = docs.iter().filter(|d| d["nodelens"]["gpu"]["xid"] == 79).count();
    assert_eq!(gone, 2, "the gone pid's XID is shipped with its GPU fields");
    let huge_doc = docs.iter().find(|d| d["log"]["syslog"]["priority"] == 3).unwrap();
    assert_eq!(huge_doc["message"].as_str().unwrap().len(), 4096, "a 1 MiB line is cut at max_line_bytes");
    assert_eq!(huge_doc["log"]["flags"], serde_json::json!(["truncated"]));

    let (_, metrics) = agent.get("/metrics");
    let xids = "nodelens_container_gpu_xid_errors_total";
    assert!(
        metrics.contains(&format!(
            r#"{xids}{{node="gpu-node",gpu="",uuid="",namespace="ml",pod="trainer-a",container="main",app="trainer-a",user="",xid="79"}} 1"#
        )),
        "{metrics}"
    );
    assert_eq!(metric_sum(&metrics, xids, &[]), 7.0, "{metrics}");
    assert_eq!(metric_sum(&metrics, xids, &["pod=\"\""]), 3.0, "gone, host and pid-less XIDs count without a container");
    assert_eq!(metric_sum(&metrics, "nodelens_log_lost_records_total", &["source=\"kernel\""]), 3.0, "sequence gap 5..7");
    let records = "nodelens_node_log_records_total";
    assert_eq!(metric_sum(&metrics, records, &["source=\"kernel\""]), 9.0, "{metrics}");
    assert_eq!(metric_sum(&metrics, records, &["source=\"kernel\"", "level=\"warning\""]), 7.0, "{metrics}");
    assert_eq!(metric_sum(&metrics, records, &["source=\"kernel\"", "level=\"err\""]), 1.0, "{metrics}");
    stop(agent);

    node.kmsg("6,12,4000000,-;after the restart\n6,13,4100000,-;second after the restart\n");
    let agent = node.start(&config, true, false);
    let docs = wait_docs(&agent, "node.kernel", 2);
    let messages: Vec<&str> = docs.iter().map(|d| d["message"].as_str().unwrap()).collect();
    assert_eq!(messages, ["after the restart", "second after the restart"], "nothing shipped before is shipped again");
    stop(agent);

    node.boot("boot-2");
    std::fs::remove_file(node.path("kmsg")).unwrap();
    node.kmsg("6,0,500000,-;Linux version 6.1.0-test (second boot)\n6,1,600000,-;early in the second boot\n");
    let agent = node.start(&config, true, false);
    let docs = wait_docs(&agent, "node.kernel", 2);
    let messages: Vec<&str> = docs.iter().map(|d| d["message"].as_str().unwrap()).collect();
    assert_eq!(messages, ["Linux version 6.1.0-test (second boot)", "early in the second boot"], "a new boot is read from its start");
    let (_, metrics) = agent.get("/metrics");
    assert_eq!(metric_sum(&metrics, "nodelens_log_lost_records_total", &["source=\"kernel\""]), 0.0);
    stop(agent);
}

#[test]
fn kernel_records_go_to_the_node_data_stream_beside_container_logs() {
    let node = Node::new();
    node.kmsg("6,0,1000000,-;one\n6,1,2000000,-;two\n");
    let es = FakeElasticsearch::start();
    let config = node.config(&format!("sinks:\n  elasticsearch:\n    endpoints: [{}]\n    flush_interval: 200ms\n", es.url()));
    let agent = node.start(&config, true, false);
    let deadline = Instant::now() + WAIT;
    while es.count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(agent);
    let docs = es.docs();
    assert_eq!(docs.len(), 2, "{docs:?}");
    for (id, _) in &docs {
        assert_eq!(es.data_stream_of(id).as_deref(), Some("logs-kubernetes.node-default"));
    }
    // A resend (no checkpoint) writes nothing twice: the ids are the boot's and the sequence's.
    std::fs::remove_dir_all(node.path("state")).unwrap();
    let agent = node.start(&config, true, false);
    let deadline = Instant::now() + WAIT;
    while es.conflicts() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(agent);
    assert_eq!((es.count(), es.conflicts()), (2, 2));
}

/// Journal export format entries (`systemd-journal-remote`'s input).
fn export_entry(out: &mut Vec<u8>, usec: u64, boot: &str, unit: &str, message: &[u8]) {
    write!(out, "__REALTIME_TIMESTAMP={usec}\n__MONOTONIC_TIMESTAMP={}\n_BOOT_ID={boot}\n", usec - BTIME * 1_000_000).unwrap();
    write!(out, "_MACHINE_ID=0123456789abcdef0123456789abcdef\n_SYSTEMD_UNIT={unit}\n_PID=812\n_COMM=kubelet\nPRIORITY=4\n").unwrap();
    out.extend_from_slice(b"MESSAGE\n");
    out.extend_from_slice(&(message.len() as u64).to_le_bytes());
    out.extend_from_slice(message);
    out.extend_from_slice(b"\n\n");
}

fn journal_remote() -> PathBuf {
    ["/lib/systemd/systemd-journal-remote", "/usr/lib/systemd/systemd-journal-remote"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("systemd-journal-remote (Debian package systemd-journal-remote; tests/run-all.sh installs it)")
}

/// Appends entries to `file` under the machine-id directory, as systemd writes them.
fn write_journal(node: &Node, file: &str, entries: &[(u64, &str, &str, &[u8])]) {
    let dir = node.path("journal/0123456789abcdef0123456789abcdef");
    std::fs::create_dir_all(&dir).unwrap();
    let mut export = Vec::new();
    for (usec, boot, unit, message) in entries {
        export_entry(&mut export, *usec, boot, unit, message);
    }
    let mut child = Command::new(journal_remote())
        .arg(format!("--output={}", dir.join(file).display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&export).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn journal_entries_of_the_selected_units_are_shipped_once_across_restarts_reboots_and_a_vacuum() {
    let node = Node::new();
    let (b1, b2) = ("11111111111111111111111111111111", "22222222222222222222222222222222");
    let t = |s: u64| (BTIME + s) * 1_000_000 + 123_456;
    write_journal(
        &node,
        "system@a.journal",
        &[
            (t(1), b1, "kubelet.service", b"kubelet started"),
            (t(2), b1, "sshd.service", b"not selected"),
            (t(3), b1, "containerd.service", b"bad utf8 \xff here"),
        ],
    );
    let config = node.config("");
    let agent = node.start(&config, false, true);
    let docs = wait_docs(&agent, "node.journald", 2);
    let messages: Vec<&str> = docs.iter().map(|d| d["message"].as_str().unwrap()).collect();
    assert_eq!(messages, ["kubelet started", "bad utf8 \u{fffd} here"]);
    let d = &docs[0];
    assert_eq!(d["@timestamp"], "2025-12-03T22:13:21.123456Z");
    assert_eq!(d["systemd"]["unit"], "kubelet.service");
    assert_eq!(d["process"]["pid"], 812);
    assert_eq!(d["process"]["name"], "kubelet");
    assert_eq!(d["log"]["syslog"]["priority"], 4);
    // Appended while the agent runs: shipped within 5 s.
    write_journal(&node, "system@a.journal", &[(t(4), b1, "kubelet.service", b"appended live")]);
    let appended = Instant::now();
    let docs = wait_docs(&agent, "node.journald", 3);
    assert!(appended.elapsed() < Duration::from_secs(7), "took {:?}", appended.elapsed());
    assert_eq!(docs[2]["message"], "appended live");
    stop(agent);

    // A reboot: the first entry of the new boot must not be skipped. The file holding the
    // saved cursor's entry is vacuumed while the agent is down.
    write_journal(
        &node,
        "system@b.journal",
        &[(t(100), b2, "kubelet.service", b"first of boot 2"), (t(101), b2, "kubelet.service", b"second of boot 2")],
    );
    std::fs::remove_file(node.path("journal/0123456789abcdef0123456789abcdef/system@a.journal")).unwrap();
    let agent = node.start(&config, false, true);
    let docs = wait_docs(&agent, "node.journald", 2);
    let messages: Vec<&str> = docs.iter().map(|d| d["message"].as_str().unwrap()).collect();
    assert_eq!(messages, ["first of boot 2", "second of boot 2"]);
    // Vacuumed while the agent runs: the file of the last entry read goes, a newer file comes.
    write_journal(&node, "system@c.journal", &[(t(102), b2, "crio.service", b"after the vacuum")]);
    std::fs::remove_file(node.path("journal/0123456789abcdef0123456789abcdef/system@b.journal")).unwrap();
    let docs = wait_docs(&agent, "node.journald", 3);
    let messages: Vec<&str> = docs.iter().map(|d| d["message"].as_str().unwrap()).collect();
    assert_eq!(messages, ["first of boot 2", "second of boot 2", "after the vacuum"]);
    stop(agent);
    let agent = node.start(&config, false, true);
    std::thread::sleep(Duration::from_secs(3));
    let docs = agent.docs();
    assert!(dataset(&docs, "node.journald").is_empty(), "nothing again after a restart: {docs:?}");
    stop(agent);
}

#[test]
fn an_unreadable_journal_is_a_clear_error_and_the_kernel_ring_is_still_shipped() {
    let node = Node::new();
    node.kmsg("6,0,1000000,-;still here\n");
    std::fs::remove_dir_all(node.path("journal")).unwrap();
    let config = node.config("");
    let agent = node.start(&config, true, true);
    let docs = wait_docs(&agent, "node.kernel", 1);
    assert_eq!(docs[0]["message"], "still here");
    let log = agent.log();
    assert!(log.contains("journal cannot be read") && log.contains(&node.path("journal").display().to_string()), "{log}");
    stop(agent);
}

#[test]
fn kernel_records_reach_an_otlp_receiver_with_the_node_as_resource() {
    let node = Node::new();
    node.kmsg("3,0,1000000,-;NVRM: Xid (PCI:0000:3b:00): 48, An uncorrectable double bit error\n6,1,2000000,-;two\n");
    let otlp = nodelens_testkit::otlp::FakeOtlp::start();
    let sink = format!("sinks:\n  otlp:\n    endpoint: {}\n    flush_interval: 200ms\n", otlp.http_url());
    let agent = node.start(&node.config(&sink), true, false);
    let deadline = Instant::now() + WAIT;
    while otlp.log_count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(agent);
    let logs = otlp.logs();
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert_eq!(logs[0].resource.get("k8s.node.name").map(String::as_str), Some("gpu-node"));
    assert_eq!(logs[0].attributes.get("nodelens.gpu.xid").map(String::as_str), Some("48"));
    assert_eq!(logs[0].attributes.get("event.dataset").map(String::as_str), Some("node.kernel"));
    assert_eq!((logs[0].severity_text.as_str(), logs[0].time_unix_nano), ("ERROR", (BTIME + 1) * 1_000_000_000));
    assert_eq!(logs[1].body, "two");
    assert_ne!(logs[0].uid(), logs[1].uid());
}

#[test]
fn a_metrics_only_agent_reads_the_kernel_ring_and_names_the_gpu_of_an_xid_by_its_bus_id() {
    use nodelens_testkit::gpu::nvml_library;
    use nodelens_testkit::gpu::scenario::{Gpu, Scenario, SCENARIO_ENV};
    let node = Node::new();
    let proc = FakeProc::new(&node.path("proc"));
    pod(&node, &proc, 101, "trainer-a", "6f1c2d3e-0000-4a5b-9c8d-000000000001", Cgroup::V2SystemdContainerd);
    let gpu =
        |uuid: &str, bus: &str| Gpu { uuid: uuid.into(), name: "NVIDIA H100 80GB HBM3".into(), pci_bus_id: bus.into(), ..Gpu::default() };
    // The second GPU's bus id is the fake's default for index 1: 00000000:19:00.0.
    let scenario = Scenario { driver_version: "560.35.03".into(), gpus: vec![gpu("GPU-aaaa", "00000000:3B:00.0"), gpu("GPU-bbbb", "")] };
    scenario.write(&node.path("scenario.json")).unwrap();
    node.kmsg(
        "4,0,2000000,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=101, name=python3, GPU has fallen off the bus.\n\
         4,1,2100000,-;NVRM: Xid (PCI:0000:19:00.0): 48, An uncorrectable double bit error (DBE) has been detected on GPU\n\
         4,2,2200000,-;NVRM: Xid (PCI:0000:5e:00): 13, pid='<unknown>', name=<unknown>, Graphics SM Warp Exception\n",
    );
    let extra = format!("gpu:\n  enabled: true\n  nvml_library: {}\nsinks:\n  stdout:\n    enabled: true\n", nvml_library().display());
    let config = node.config(&extra);
    let text = std::fs::read_to_string(&config).unwrap().replace("logs:\n  pods_dir", "logs:\n  enabled: false\n  pods_dir");
    std::fs::write(&config, text).unwrap();
    let scenario_path = node.path("scenario.json").display().to_string();
    let env = [
        ("NODELENS_NODE_LOGS__KERNEL__ENABLED", "auto"),
        ("NODELENS_NODE_LOGS__JOURNALD__ENABLED", "false"),
        (SCENARIO_ENV, scenario_path.as_str()),
    ];
    let agent = Agent::start(Path::new(env!("CARGO_BIN_EXE_nodelens")), &config, &env);
    let docs = wait_docs(&agent, "node.kernel", 3);
    assert_eq!(docs.len(), 3, "{docs:#?}");
    let xid = |n: u64| docs.iter().find(|d| d["nodelens"]["gpu"]["xid"] == n).unwrap_or_else(|| panic!("no xid {n}: {docs:#?}"));
    assert_eq!(xid(79)["nodelens"]["gpu"]["uuid"], "GPU-aaaa", "{}", xid(79));
    assert_eq!(xid(79)["kubernetes"]["pod"]["name"], "trainer-a");
    assert_eq!(xid(48)["nodelens"]["gpu"]["uuid"], "GPU-bbbb", "the kernel's bus id with a function: {}", xid(48));
    assert!(xid(13)["nodelens"]["gpu"].get("uuid").is_none(), "no GPU at that bus: {}", xid(13));

    let (_, metrics) = agent.get("/metrics");
    let xids = "nodelens_container_gpu_xid_errors_total";
    assert!(
        metrics.contains(&format!(
            r#"{xids}{{node="gpu-node",gpu="0",uuid="GPU-aaaa",namespace="ml",pod="trainer-a",container="main",app="trainer-a",user="",xid="79"}} 1"#
        )),
        "{metrics}"
    );
    assert_eq!(metric_sum(&metrics, xids, &["gpu=\"1\"", "uuid=\"GPU-bbbb\"", "xid=\"48\""]), 1.0, "{metrics}");
    assert_eq!(metric_sum(&metrics, xids, &["gpu=\"\"", "uuid=\"\"", "xid=\"13\""]), 1.0, "{metrics}");
    assert_eq!(metric_sum(&metrics, "nodelens_node_log_records_total", &["source=\"kernel\""]), 3.0, "{metrics}");
    stop(agent);
}
