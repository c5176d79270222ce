//! Runs the real `nodelens` binary and collects its stdout documents and stderr log.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running agent.
pub struct Agent {
    child: Child,
    docs: Arc<Mutex<Vec<Value>>>,
    /// Lines of stdout that are not JSON documents.
    torn: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Agent {
    /// Starts `binary` with `config` and extra environment.
    pub fn start(binary: &Path, config: &Path, env: &[(&str, &str)]) -> Agent {
        let mut cmd = Command::new(binary);
        cmd.arg("run").arg("--config").arg(config).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("nodelens starts");
        let docs = Arc::new(Mutex::new(Vec::new()));
        let torn = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (d, t, e) = (docs.clone(), torn.clone(), stderr.clone());
        let readers = vec![
            thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let line = line.expect("stdout is UTF-8");
                    match serde_json::from_str(&line) {
                        Ok(doc) => d.lock().unwrap().push(doc),
                        Err(_) => t.lock().unwrap().push(line),
                    }
                }
            }),
            thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    e.lock().unwrap().push(line);
                }
            }),
        ];
        Agent { child, docs, torn, stderr, readers }
    }

    /// Documents printed so far.
    pub fn docs(&self) -> Vec<Value> {
        self.docs.lock().unwrap().clone()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until `done` holds for the documents, panicking with the log after `timeout`.
    pub fn wait_for(&self, timeout: Duration, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(&self.docs.lock().unwrap()) {
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
