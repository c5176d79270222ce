//! End to end: faults a node brings in a day (issue 31) show in metrics, not only in the log,
//! and the agent keeps working through them: a full state file system, entries under
//! `pods_dir` that cannot be a pod's. The Kubernetes API outage is in `kubernetes.rs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodelens_testkit::agent::{metric_sum, Agent, Options};
use nodelens_testkit::kubelet::ContainerLog;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// A pod log directory, a state directory and the agent's config.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pods")).unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        Node { dir }
    }

    fn pods(&self) -> PathBuf {
        self.dir.path().join("pods")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn start(&self, rescan: &str) -> Agent {
        self.start_under(rescan, None)
    }

    /// Starts the agent with its descriptor limit (soft and hard) set to `fd_limit`, as a
    /// container runtime's default or a node's ulimit would.
    fn start_under(&self, rescan: &str, fd_limit: Option<u32>) -> Agent {
        let config = self.dir.path().join("nodelens.yaml");
        let text = format!(
            "node_name: fault-node\nstate_dir: {state}\nlogs:\n  pods_dir: {pods}\n  rescan_interval: {rescan}\nmetrics:\n  listen: 127.0.0.1:0\n",
            state = self.state().display(),
            pods = self.pods().display(),
        );
        std::fs::write(&config, text).unwrap();
        // Set in the child between fork and exec: a wrapper script written here could be held
        // open by another test's fork at the moment it is executed (ETXTBSY).
        let binary = Path::new(env!("CARGO_BIN_EXE_nodelens"));
        Agent::start_with(binary, &config, Options { fd_limit: fd_limit.map(u64::from), ..Options::default() })
    }
}

fn metric(agent: &Agent, name: &str) -> f64 {
    metric_sum(&agent.get("/metrics").1, name, &[])
}

fn wait_until(agent: &Agent, what: &str, check: impl Fn(&str) -> bool) -> Instant {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check(&agent.get("/metrics").1) {
            return Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}:\n{}\nlog:\n{}", agent.get("/metrics").1, agent.log());
}

fn messages(docs: &[Value], prefix: &str) -> Vec<String> {
    docs.iter().filter_map(|d| d["message"].as_str()).filter(|m| m.starts_with(prefix)).map(String::from).collect()
}

/// A small tmpfs mounted over a directory, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` where mounting is not permitted (not root, no CAP_SYS_ADMIN).
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with one file; the file's path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 4096];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    path
}

/// Issue 31, point 1. The state file system fills: shipping goes on, every failed write is
/// counted and the last success stops moving while `/healthz` stays 200; once space returns a
/// checkpoint lands within 5 s, and after a kill -9 nothing is sent twice.
#[test]
fn a_full_state_file_system_shows_in_metrics_and_a_checkpoint_lands_once_space_returns() {
    let node = Node::new();
    let Some(_tmpfs) = Tmpfs::mount(&node.state(), "64k") else {
        println!("SKIPPED: cannot mount a tmpfs here (needs root); the committer's unit test covers failed writes");
        return;
    };
    let mut log = ContainerLog::create(&node.pods(), "ml", "trainer", "uid-trainer", "main", 0).unwrap();
    let agent = node.start("1s");
    wait_until(&agent, "a first checkpoint success", |m| metric_sum(m, "nodelens_checkpoint_last_success_timestamp_seconds", &[]) > 1.0e9);
    assert_eq!(metric(&agent, "nodelens_checkpoint_write_errors_total"), 0.0, "exported from the start, 0");
    for i in 0..50 {
        log.write_cri("stdout", &format!("before {i}")).unwrap();
    }
    agent.wait_for(WAIT, "50 lines", |d| messages(d, "before").len() == 50);
    std::thread::sleep(Duration::from_millis(1500));

    let filler = fill(&node.state());
    for i in 0..50 {
        log.write_cri("stdout", &format!("during {i}")).unwrap();
    }
    agent.wait_for(WAIT, "lines shipped while checkpoints fail", |d| messages(d, "during").len() == 50);
    wait_until(&agent, "failed writes counted", |m| metric_sum(m, "nodelens_checkpoint_write_errors_total", &[]) >= 3.0);
    let stale = metric(&agent, "nodelens_checkpoint_last_success_timestamp_seconds");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(metric(&agent, "nodelens_checkpoint_last_success_timestamp_seconds"), stale, "no success while full");
    assert_eq!(agent.get("/healthz").0, 200, "an external fault must not get the agent restarted");
    assert_eq!(agent.get("/readyz").0, 200, "nor drop it from the Service its metrics are scraped through");
    let errors_while_full = metric(&agent, "nodelens_checkpoint_write_errors_total");

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let freed_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let landed = wait_until(&agent, "a checkpoint after space returns", |m| {
        metric_sum(m, "nodelens_checkpoint_last_success_timestamp_seconds", &[]) >= freed_unix
    });
    let after = landed - freed;
    assert!(after <= Duration::from_secs(5), "checkpoint {after:?} after space returned");
    let log_text = agent.log();
    assert_eq!(log_text.matches("cannot write checkpoints").count(), 1, "logged once per outage:\n{log_text}");

    let (_, docs, _) = agent.kill();
    assert_eq!(messages(&docs, "during").len(), 50);
    let again = node.start("1s");
    std::thread::sleep(Duration::from_secs(3));
    let resent = again.docs().len();
    again.terminate();
    assert_eq!(resent, 0, "the checkpoint written once space returned covers everything shipped");
    println!("checkpoint writes failed {errors_while_full} times while full; a checkpoint landed {after:?} after space returned; {resent} records sent again after kill -9");
}

/// Issue 31, point 5. A pod directory without a uid, one whose name is not UTF-8, a container
/// directory whose name is not UTF-8 and a `0.log` symlink looping on itself: each counted
/// once and logged once, never again on later rescans, and the good pod beside them is read.
#[test]
fn entries_that_cannot_be_a_pods_are_counted_and_logged_once_per_path() {
    use std::os::unix::ffi::OsStrExt;
    let node = Node::new();
    let pods = node.pods();
    std::fs::create_dir_all(pods.join("ml_no-uid/main")).unwrap();
    std::fs::create_dir_all(pods.join(std::ffi::OsStr::from_bytes(b"ml_caf\xe9_uid-odd/main"))).unwrap();
    std::fs::create_dir_all(pods.join("ml_good_uid-good").join(std::ffi::OsStr::from_bytes(b"c\xfe"))).unwrap();
    let looping = pods.join("ml_loop_uid-loop/main");
    std::fs::create_dir_all(&looping).unwrap();
    std::os::unix::fs::symlink(looping.join("0.log"), looping.join("0.log")).unwrap();
    let mut good = ContainerLog::create(&pods, "ml", "good", "uid-good", "main", 0).unwrap();
    good.write_cri("stdout", "good line").unwrap();
    let agent = node.start("200ms");
    agent.wait_for(WAIT, "the good pod's line", |d| !messages(d, "good line").is_empty());
    // Ten rescans and more.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(metric(&agent, "nodelens_log_paths_skipped_total"), 4.0, "{}", agent.log());
    let log = agent.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("skipping an entry under pods_dir")).collect();
    assert_eq!(warnings.len(), 4, "each once:\n{}", warnings.join("\n"));
    assert!(warnings.iter().any(|w| w.contains("ml_no-uid")), "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("ml_caf")), "the readable part of the name: {warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("ml_loop_uid-loop/main/0.log")), "{warnings:?}");
    good.write_cri("stdout", "good line 2").unwrap();
    agent.wait_for(WAIT, "still reading", |d| !messages(d, "good line 2").is_empty());
    let (status, docs, _) = agent.terminate();
    assert!(status.success());
    assert_eq!(messages(&docs, "good line").len(), 2);
}

/// Containers appearing at once in the descriptor-limit test: 5,000 in the issue; scaled for
/// a shared CI machine (`FD_TEST_CONTAINERS` sets it).
fn burst_containers() -> usize {
    std::env::var("FD_TEST_CONTAINERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

/// Issue 31, point 3. Many containers appear at once under `RLIMIT_NOFILE` 256: the agent
/// holds at most `logs.max_open_files` log files (its default fits), reads the rest in turns,
/// never runs out of descriptors (no failed open, no failed checkpoint) and ships every line
/// exactly once within 60 s; the descriptor gauges say where it stands.
#[test]
fn a_burst_of_containers_under_a_low_descriptor_limit_is_read_in_turns_without_running_out() {
    let node = Node::new();
    let containers = burst_containers();
    let agent = node.start_under("2s", Some(256));
    wait_until(&agent, "the descriptor gauges", |m| metric_sum(m, "nodelens_process_max_fds", &[]) == 256.0);
    let appeared = Instant::now();
    for c in 0..containers {
        let mut log = ContainerLog::create(&node.pods(), "burst", &format!("p{c}"), &format!("uid-{c}"), "main", 0).unwrap();
        for i in 0..10 {
            log.write_cri("stdout", &format!("burst {c} {i}")).unwrap();
        }
    }
    let written = appeared.elapsed();
    let total = containers * 10;
    let mut most_fds = 0;
    let mut most_open = 0.0f64;
    let deadline = appeared + Duration::from_secs(60);
    while messages(&agent.docs(), "burst").len() < total && Instant::now() < deadline {
        most_fds = most_fds.max(agent.fd_count());
        most_open = most_open.max(metric(&agent, "nodelens_log_files_open"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = appeared.elapsed();
    let rss_after = agent.rss_bytes();
    if std::env::var_os("FD_TEST_SETTLE").is_some() {
        // Measurement only (the issue asks for at most 48 MiB 30 s after a burst; not asserted).
        std::thread::sleep(Duration::from_secs(30));
        println!(
            "VmRSS {} MiB once shipped, {} MiB 30 s later (RssAnon {} MiB)",
            rss_after >> 20,
            agent.rss_bytes() >> 20,
            agent.rss_anon_bytes() >> 20
        );
    }
    let m = agent.get("/metrics").1;
    let open_fds = metric_sum(&m, "nodelens_process_open_fds", &[]);
    assert!(open_fds > 0.0 && open_fds < 256.0, "{open_fds}");
    let (status, docs, log) = agent.terminate();
    assert!(status.success());
    let mut got = messages(&docs, "burst");
    assert_eq!(
        got.len(),
        total,
        "all {total} lines within 60 s (took {took:?}); log:\n{}",
        log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    got.sort();
    got.dedup();
    assert_eq!(got.len(), total, "each exactly once");
    assert_eq!(metric_sum(&m, "nodelens_checkpoint_write_errors_total", &[]), 0.0, "no failed checkpoint");
    assert!(
        !log.contains("cannot open log file"),
        "no open failed:\n{}",
        log.lines().filter(|l| l.contains("cannot open")).take(5).collect::<Vec<_>>().join("\n")
    );
    assert!(!log.contains("Too many open files"), "no EMFILE anywhere");
    assert!(most_open <= 96.0, "log files open at most the default bound (96 under 256): {most_open}");
    assert!(most_fds < 256, "{most_fds}");
    println!("{containers} containers x 10 lines under RLIMIT_NOFILE 256: written in {written:?}, all shipped {took:?} after they appeared; at most {most_fds} fds, {most_open} log files open");
}

/// Issue 31, point 2. The agent is stopped (SIGSTOP: CPU throttling, a stalled node, a
/// debugger) while the kubelet rotates five times with `containerLogMaxFiles: 3`: the two
/// files created and deleted during the freeze are counted in `nodelens_log_files_lost_total`
/// and logged as lost, once; the rest is shipped exactly once, and rotations while the agent
/// is awake count nothing.
#[test]
fn files_created_and_deleted_while_the_agent_was_stopped_are_counted_lost() {
    let node = Node::new();
    let mut log = ContainerLog::create(&node.pods(), "ml", "trainer", "uid-trainer", "main", 0).unwrap();
    log.max_files = 3;
    let agent = node.start("1s");
    for r in 0..3 {
        for i in 0..50 {
            log.write_cri("stdout", &format!("awake {r} {i}")).unwrap();
        }
        agent.wait_for(WAIT, "the awake batch", |d| messages(d, &format!("awake {r} ")).len() == 50);
        log.rotate().unwrap();
    }
    for i in 0..100 {
        log.write_cri("stdout", &format!("before {i}")).unwrap();
    }
    agent.wait_for(WAIT, "the lines before the freeze", |d| messages(d, "before").len() == 100);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(metric(&agent, "nodelens_log_files_lost_total"), 0.0, "awake rotations lose nothing:\n{}", agent.log());

    unsafe { libc::kill(agent.pid() as i32, libc::SIGSTOP) };
    for r in 0..5 {
        log.rotate().unwrap();
        for i in 0..100 {
            log.write_cri("stdout", &format!("frozen {r} {i}")).unwrap();
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) };

    agent.wait_for(WAIT, "what is still on disk", |d| messages(d, "frozen").len() >= 300);
    wait_until(&agent, "the lost files counted", |m| metric_sum(m, "nodelens_log_files_lost_total", &[]) >= 2.0);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(metric(&agent, "nodelens_log_files_lost_total"), 2.0, "exactly the two files never seen:\n{}", agent.log());
    assert_eq!(metric(&agent, "nodelens_log_lost_bytes_total"), 0.0, "the file read before the freeze lost nothing");
    let (status, docs, log_text) = agent.terminate();
    assert!(status.success());
    let mut frozen = messages(&docs, "frozen");
    let shipped = frozen.len();
    frozen.sort();
    frozen.dedup();
    assert_eq!((shipped, frozen.len()), (300, 300), "the three files still on disk, each line once");
    assert!(frozen.iter().all(|m| !m.starts_with("frozen 0 ") && !m.starts_with("frozen 1 ")), "batches 0 and 1 were in the deleted files");
    let warnings: Vec<&str> = log_text.lines().filter(|l| l.contains("lost, size unknown")).collect();
    assert_eq!(warnings.len(), 1, "logged once:\n{log_text}");
    assert!(warnings[0].contains("ml_trainer_uid-trainer/main"), "{}", warnings[0]);
    println!("5 rotations during a 2 s SIGSTOP with containerLogMaxFiles 3: 2 files (200 records) counted lost, 300 records shipped once");
}
