//! Runs the real `nodelens` binary and collects its stdout documents (each with the moment
//! it was read, for write-to-output latency) and stderr log; reads its fds, RSS and CPU from
//! `/proc/<pid>`. It can run the agent as its own pod does in the default install, with stdout
//! and stderr landing in that pod's log file as CRI records.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// What the harness collected from the agent's stdout.
#[derive(Default)]
struct Collected {
    docs: Vec<Value>,
    /// When the harness read each document, in the order of `docs`.
    arrived: Vec<Instant>,
}

/// How to run the agent beyond its config.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Variables removed from the inherited environment (e.g. `POD_UID`).
    pub env_remove: Vec<String>,
    /// The agent's own container log: every stdout and stderr line is also appended here as a
    /// CRI record, as the runtime does for the agent's pod. This is the default install, where
    /// stdout is the sink.
    pub own_log: Option<PathBuf>,
    /// Run as this (uid, gid) instead of the test's user (root ignores file permissions).
    pub user: Option<(u32, u32)>,
    /// Do not read stdout until [`Agent::resume_stdout`]: the pipe fills, the stdout sink
    /// blocks, and the agent stops reading once `logs.max_inflight_bytes` are in flight.
    pub stdout_paused: bool,
    /// The descriptor limit (`RLIMIT_NOFILE`, soft and hard) the agent starts under, as a
    /// container runtime's default or a node's ulimit would set it.
    pub fd_limit: Option<u64>,
}

/// A running agent.
pub struct Agent {
    child: Child,
    collected: Arc<Mutex<Collected>>,
    /// Lines of stdout that are not JSON documents.
    torn: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    paused: Arc<AtomicBool>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Agent {
    /// Starts `binary` with `config` and extra environment.
    pub fn start(binary: &Path, config: &Path, env: &[(&str, &str)]) -> Agent {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Agent::start_with(binary, config, Options { env, ..Options::default() })
    }

    /// Starts `binary` with `config`, run as `options` say.
    pub fn start_with(binary: &Path, config: &Path, options: Options) -> Agent {
        let mut cmd = Command::new(binary);
        cmd.arg("run").arg("--config").arg(config).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // The test machine's own journal and kernel ring stay out of tests that do not ask for
        // them (`auto` would ship them); a test turns them on through `options.env`.
        cmd.env("NODELENS_NODE_LOGS__KERNEL__ENABLED", "false").env("NODELENS_NODE_LOGS__JOURNALD__ENABLED", "false");
        for k in &options.env_remove {
            cmd.env_remove(k);
        }
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        if let Some((uid, gid)) = options.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        if let Some(limit) = options.fd_limit {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: limit as libc::rlim_t };
            // SAFETY: setrlimit is async-signal-safe and touches only the child between fork and exec.
            unsafe {
                cmd.pre_exec(
                    move || {
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                            Ok(())
                        } else {
                            Err(std::io::Error::last_os_error())
                        }
                    },
                );
            }
        }
        // The runtime creates the container's log file before it starts the process.
        let own_log = options.own_log.map(|path| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            Arc::new(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(path).expect("own log opens")))
        });
        let mut child = cmd.spawn().expect("nodelens starts");
        let collected = Arc::new(Mutex::new(Collected::default()));
        let torn = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let paused = Arc::new(AtomicBool::new(options.stdout_paused));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (c, t, e, p) = (collected.clone(), torn.clone(), stderr.clone(), paused.clone());
        let (own_out, own_err) = (own_log.clone(), own_log);
        let readers = vec![
            thread::spawn(move || {
                let mut lines = BufReader::new(out).lines();
                loop {
                    while p.load(Ordering::Acquire) {
                        thread::sleep(Duration::from_millis(10));
                    }
                    let Some(line) = lines.next() else { break };
                    let line = line.expect("stdout is UTF-8");
                    let arrived = Instant::now();
                    if let Some(own) = &own_out {
                        append_cri(own, "stdout", &line);
                    }
                    match serde_json::from_str(&line) {
                        Ok(doc) => {
                            let mut c = c.lock().unwrap();
                            c.docs.push(doc);
                            c.arrived.push(arrived);
                        }
                        Err(_) => t.lock().unwrap().push(line),
                    }
                }
            }),
            thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if let Some(own) = &own_err {
                        append_cri(own, "stderr", &line);
                    }
                    e.lock().unwrap().push(line);
                }
            }),
        ];
        Agent { child, collected, torn, stderr, paused, readers }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts reading stdout again (see [`Options::stdout_paused`]).
    pub fn resume_stdout(&self) {
        self.paused.store(false, Ordering::Release);
    }

    /// Stops reading stdout until [`Agent::resume_stdout`].
    pub fn pause_stdout(&self) {
        self.paused.store(true, Ordering::Release);
    }

    /// Documents printed so far, each with the moment the harness read it.
    pub fn docs_arrived(&self) -> Vec<(Instant, Value)> {
        let c = self.collected.lock().unwrap();
        c.arrived.iter().copied().zip(c.docs.iter().cloned()).collect()
    }

    /// Open file descriptors of the agent, from `/proc/<pid>/fd`.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).expect("agent is running").count()
    }

    /// Documents printed so far.
    pub fn docs(&self) -> Vec<Value> {
        self.collected.lock().unwrap().docs.clone()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until `done` holds for the documents, panicking with the log after `timeout`.
    pub fn wait_for(&self, timeout: Duration, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(&self.collected.lock().unwrap().docs) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("timed out waiting for {what}; {} docs; agent log:\n{}", self.docs().len(), self.log());
    }

    /// The metrics endpoint's address, from the agent's start-up log line.
    pub fn metrics_addr(&self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            for line in self.stderr.lock().unwrap().iter() {
                if let Some(rest) = line.split("metrics endpoint listening addr=").nth(1) {
                    return rest.split_whitespace().next().unwrap().parse().expect("addr parses");
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("no metrics address in the agent log:\n{}", self.log());
    }

    /// The agent's resident set size.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("agent is running");
        let kib: u64 =
            status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap();
        kib * 1024
    }

    /// The agent's anonymous resident memory (`RssAnon`: its heap and stacks, without the
    /// pages of its binary, which a debug build makes large).
    pub fn rss_anon_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("agent is running");
        let kib: u64 =
            status.lines().find_map(|l| l.strip_prefix("RssAnon:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap();
        kib * 1024
    }

    /// User plus system CPU seconds the agent has used, all threads.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("agent is running");
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    /// GETs `path` from the metrics endpoint: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics_addr(), path)
    }

    /// Sends SIGTERM and waits for exit, returning the status and all documents. Every line
    /// printed must be a whole JSON document.
    pub fn terminate(self) -> (ExitStatus, Vec<Value>, String) {
        let torn = self.torn.clone();
        let result = self.signal(libc::SIGTERM);
        assert!(torn.lock().unwrap().is_empty(), "stdout lines that are not JSON: {:?}", torn.lock().unwrap());
        result
    }

    /// Sends SIGKILL: a crash. Only the very last line may be torn by it.
    pub fn kill(self) -> (ExitStatus, Vec<Value>, String) {
        let torn = self.torn.clone();
        let result = self.signal(libc::SIGKILL);
        assert!(torn.lock().unwrap().len() <= 1, "more than the last line torn: {:?}", torn.lock().unwrap());
        result
    }

    /// Waits for the agent to exit by itself (a start-up error), panicking after `timeout`.
    pub fn wait_exit(self, timeout: Duration) -> (ExitStatus, Vec<Value>, String) {
        self.exit(timeout, "by itself")
    }

    fn signal(self, signal: i32) -> (ExitStatus, Vec<Value>, String) {
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.exit(Duration::from_secs(15), &format!("after signal {signal}"))
    }

    fn exit(mut self, timeout: Duration, how: &str) -> (ExitStatus, Vec<Value>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("agent did not exit {how} within {timeout:?}; log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        };
        // A paused reader would never see the end of stdout.
        self.resume_stdout();
        for r in std::mem::take(&mut self.readers) {
            r.join().expect("reader thread");
        }
        (status, self.docs(), self.log())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.0 GET.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to metrics endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// The sum of a metric's samples whose labels contain every `label="value"` given.
pub fn metric_sum(exposition: &str, name: &str, labels: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Appends `line` to the agent's own container log as the runtime frames it.
fn append_cri(log: &Mutex<std::fs::File>, stream: &str, line: &str) {
    let record = format!("{} {stream} F {line}\n", rfc3339_now());
    log.lock().unwrap().write_all(record.as_bytes()).expect("own log is writable");
}

/// Now as RFC 3339 with nanoseconds, UTC, as the runtime stamps records.
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let secs = now.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z", rest / 3600, (rest / 60) % 60, rest % 60, now.subsec_nanos())
}

/// The agent's own pod, as the kubelet lays out its logs, and as `/proc/self/cgroup` names it.
#[derive(Debug, Clone)]
pub struct OwnPod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID (what the DaemonSet passes as `POD_UID`).
    pub uid: String,
    /// The agent container's runtime id (64 hex digits).
    pub container_id: String,
}

impl OwnPod {
    /// A DaemonSet pod `nodelens-<suffix>` in `nodelens`.
    pub fn new(suffix: &str, uid: &str) -> OwnPod {
        OwnPod { namespace: "nodelens".into(), name: format!("nodelens-{suffix}"), uid: uid.into(), container_id: "5e".repeat(32) }
    }

    /// `<pods_dir>/<ns>_<pod>_<uid>/nodelens/0.log`, the file the agent's stdout lands in.
    pub fn log_path(&self, pods_dir: &Path) -> PathBuf {
        pods_dir.join(format!("{}_{}_{}", self.namespace, self.name, self.uid)).join("nodelens").join("0.log")
    }

    /// Writes `<proc_root>/self/cgroup` as the agent's container sees it on a systemd,
    /// containerd, cgroup v2 node.
    pub fn write_self_cgroup(&self, proc_root: &Path) {
        let dir = proc_root.join("self");
        std::fs::create_dir_all(&dir).unwrap();
        let cgroup = crate::gpu::Cgroup::V2SystemdContainerd.render(&self.uid, &self.container_id);
        std::fs::write(dir.join("cgroup"), cgroup).unwrap();
    }
}

/// Write-to-output latency of records that carry a key: `written` maps each key (a
/// message) to when it was written, `arrived` is what came out with when. Returns one
/// latency per written key that came out (its first arrival), and the keys that did not.
pub fn latencies(written: &[(String, Instant)], arrived: &[(Instant, Value)]) -> (Vec<(String, Duration)>, Vec<String>) {
    let mut first: std::collections::HashMap<&str, Instant> = std::collections::HashMap::new();
    for (at, doc) in arrived {
        if let Some(m) = doc["message"].as_str() {
            first.entry(m).or_insert(*at);
        }
    }
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for (key, at) in written {
        match first.get(key.as_str()) {
            Some(got) => out.push((key.clone(), got.saturating_duration_since(*at))),
            None => missing.push(key.clone()),
        }
    }
    (out, missing)
}

/// The `q` quantile (0..=1) of `samples`, nearest rank; zero when there are none.
pub fn quantile(samples: &[Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Every series (sample line) of the exposition whose name is `name` exactly.
pub fn series<'a>(exposition: &'a str, name: &str) -> Vec<&'a str> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' ')))
        .collect()
}
