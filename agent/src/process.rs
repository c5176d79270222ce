//! The agent's own CPU time and resident memory, read from `/proc/self` at scrape time, so
//! the agent dashboard shows what nodelens costs on each node without a cAdvisor join; and the
//! memory limit of its cgroup, so an alert can warn before the agent is OOM-killed.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// Names of the series [`ProcessCollector`] exports.
pub const NAMES: &[&str] = &[
    "nodelens_process_cpu_seconds_total",
    "nodelens_process_resident_memory_bytes",
    "nodelens_process_memory_limit_bytes",
    "nodelens_process_start_time_seconds",
    "nodelens_process_open_fds",
    "nodelens_process_max_fds",
];

/// Where the cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// CPU seconds (user + system) and resident bytes of this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size, in bytes.
    pub resident_bytes: u64,
}

/// Parses `/proc/<pid>/stat` and `/proc/<pid>/statm` given the clock tick rate and page size.
fn parse(stat: &str, statm: &str, ticks_per_second: f64, page_size: u64) -> Option<Usage> {
    // The command name (field 2) may hold spaces and parentheses: fields resume after the
    // last ')'. utime and stime are fields 14 and 15, the 12th and 13th after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_ascii_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    let resident_pages: u64 = statm.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(Usage { cpu_seconds: (utime + stime) / ticks_per_second, resident_bytes: resident_pages * page_size })
}

/// When the process started, Unix seconds: its start (`/proc/<pid>/stat` field 22, clock ticks
/// after boot) plus the boot time (`btime` of `/proc/stat`).
fn started_at(stat: &str, proc_stat: &str, ticks_per_second: f64) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let start_ticks: f64 = after_name.split_ascii_whitespace().nth(19)?.parse().ok()?;
    let boot: f64 = proc_stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    Some(boot + start_ticks / ticks_per_second)
}

/// This process's start time, read once.
fn own_start_time() -> Option<f64> {
    static STARTED: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *STARTED.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let proc_stat = std::fs::read_to_string("/proc/stat").ok()?;
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        started_at(&stat, &proc_stat, ticks.max(1) as f64)
    })
}

/// Descriptors this process holds now: every entry of `/proc/self/fd` (files, sockets,
/// inotify, epoll), less the one listing the directory.
pub fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count().saturating_sub(1) as u64)
}

/// The soft `RLIMIT_NOFILE`: opening a descriptor beyond it fails with EMFILE.
pub fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct it is given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur)
}

/// This process's usage now, or `None` where `/proc` cannot be read.
pub fn usage() -> Option<Usage> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    // SAFETY: sysconf only reads configuration values.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    parse(&stat, &statm, ticks.max(1) as f64, page.max(1) as u64)
}

/// The memory limit of the agent's cgroup in bytes: infinite without one (`max`, or cgroup
/// v1's "unlimited" near `i64::MAX`), `None` where no cgroup file can be read. `cgroup` is
/// `/proc/self/cgroup`; `read` reads a file under the cgroup root. cgroup v2 first (the
/// unified `0::<path>` line; `/` inside a container's own cgroup namespace), then v1's memory
/// controller (hybrid hosts have both lines, the memory controller on v1).
fn memory_limit(cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<f64> {
    let parse = |text: String| match text.trim() {
        "max" => Some(f64::INFINITY),
        v => v.parse::<u64>().ok().map(|v| if v >= 1 << 60 { f64::INFINITY } else { v as f64 }),
    };
    if let Some(path) = cgroup.lines().find_map(|l| l.strip_prefix("0::")) {
        let path = path.trim_end_matches('/');
        // Without a cgroup namespace the path is the host's; the container's own cgroup may
        // still be what is mounted at the root.
        if let Some(limit) = read(&format!("{path}/memory.max")).or_else(|| read("/memory.max")).and_then(parse) {
            return Some(limit);
        }
    }
    let v1 = cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "memory").then(|| path.trim_end_matches('/').to_string())
    })?;
    read(&format!("/memory{v1}/memory.limit_in_bytes")).or_else(|| read("/memory/memory.limit_in_bytes")).and_then(parse)
}

/// The limit of this process's cgroup now.
fn own_memory_limit() -> Option<f64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    memory_limit(&cgroup, |path| std::fs::read_to_string(format!("{CGROUP_ROOT}{path}")).ok())
}

/// Encodes [`usage`] on every scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(usage) = usage() else { return Ok(()) };
        let cpu =
            encoder.encode_descriptor("process_cpu_seconds", "User and system CPU time the agent has used", None, MetricType::Counter)?;
        ConstCounter::new(usage.cpu_seconds).encode(cpu)?;
        let rss = encoder.encode_descriptor("process_resident_memory_bytes", "Resident memory of the agent", None, MetricType::Gauge)?;
        ConstGauge::new(usage.resident_bytes as i64).encode(rss)?;
        if let Some(started) = own_start_time() {
            // The conventional process_start_time_seconds: when this run of the agent began.
            let start = encoder.encode_descriptor(
                "process_start_time_seconds",
                "When the agent process started, Unix time",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(started).encode(start)?;
        }
        if let (Some(open), Some(max)) = (open_fds(), max_fds()) {
            let fds = encoder.encode_descriptor("process_open_fds", "Descriptors the agent holds open", None, MetricType::Gauge)?;
            ConstGauge::new(open as i64).encode(fds)?;
            let limit = encoder.encode_descriptor(
                "process_max_fds",
                "The agent's descriptor limit (soft RLIMIT_NOFILE)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(max.min(i64::MAX as u64) as i64).encode(limit)?;
        }
        let Some(bytes) = own_memory_limit() else { return Ok(()) };
        let limit = encoder.encode_descriptor(
            "process_memory_limit_bytes",
            "Memory limit of the agent's cgroup (its container); +Inf without one",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(bytes).encode(limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_boot_time_plus_the_start_ticks() {
        let stat = "4242 (node lens (x)) S 1 4242 4242 0 -1 4194560 9000 0 0 0 300 25 0 0 20 0 12 0 123400 9000000 5000";
        assert_eq!(started_at(stat, "cpu  1 2 3\nbtime 1764600000\nprocesses 9\n", 100.0), Some(1_764_601_234.0));
        assert_eq!(started_at(stat, "cpu  1 2 3\n", 100.0), None);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let own = own_start_time().expect("this process's start time");
        assert!(own <= now + 1.0 && own > now - 86_400.0, "{own} against {now}");
    }

    #[test]
    fn the_memory_limit_is_read_from_the_agents_own_cgroup() {
        let files = |entries: &'static [(&'static str, &'static str)]| {
            move |path: &str| entries.iter().find(|(p, _)| *p == path).map(|(_, v)| v.to_string())
        };
        let v2 = files(&[("/kubepods.slice/pod-x/cri-containerd-1.scope/memory.max", "268435456\n"), ("/memory.max", "max\n")]);
        assert_eq!(memory_limit("0::/kubepods.slice/pod-x/cri-containerd-1.scope\n", v2), Some(f64::from(256 << 20)));
        assert_eq!(memory_limit("0::/\n", v2), Some(f64::INFINITY), "`max`: no limit");
        let own_namespace = files(&[("/memory.max", "536870912\n")]);
        assert_eq!(memory_limit("0::/\n", own_namespace), Some(f64::from(512 << 20)));
        // A hybrid host: the unified line has no memory controller, v1's has the limit.
        let v1 = files(&[("/memory/kubepods/pod-y/abc/memory.limit_in_bytes", "134217728\n")]);
        let hybrid = "12:cpu,cpuacct:/kubepods/pod-y/abc\n11:memory:/kubepods/pod-y/abc\n0::/\n";
        assert_eq!(memory_limit(hybrid, v1), Some(f64::from(128 << 20)));
        let unlimited = files(&[("/memory/memory.limit_in_bytes", "9223372036854771712\n")]);
        assert_eq!(memory_limit("4:memory:/\n", unlimited), Some(f64::INFINITY));
        assert_eq!(memory_limit("0::/x\n", files(&[])), None, "nothing readable: no series");
        let mounted_at_root = files(&[("/memory.max", "1073741824\n")]);
        assert_eq!(memory_limit("0::/kubepods.slice/pod-z/cri-containerd-2.scope\n", mounted_at_root), Some(f64::from(1 << 30)));
    }

    #[test]
    fn open_descriptors_follow_what_the_process_opens() {
        let before = open_fds().unwrap();
        let files: Vec<_> = (0..64).map(|_| tempfile::tempfile().unwrap()).collect();
        let during = open_fds().unwrap();
        drop(files);
        // Other tests run on other threads of this process and open and close files meanwhile:
        // 64 more, give or take a dozen of theirs.
        assert!(during >= before + 52, "{before} then {during}");
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!(max_fds(), Some(limit.rlim_cur));
        assert!(max_fds().unwrap() > during);
    }

    #[test]
    fn cpu_and_memory_come_from_the_fields_after_the_command_name() {
        let stat = "4242 (node lens) (x)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 100 200000000 5000";
        let usage = parse(stat, "50000 5000 1000 10 0 8000 0", 100.0, 4096).unwrap();
        assert_eq!(usage, Usage { cpu_seconds: 3.25, resident_bytes: 5000 * 4096 });
        assert_eq!(parse("4242 (x) S 1", "1 2", 100.0, 4096), None);
    }

    #[test]
    fn this_process_uses_some_memory_and_its_cpu_time_grows_while_it_works() {
        let before = usage().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after.cpu_seconds <= before.cpu_seconds && start.elapsed().as_secs() < 10 {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
            }
            after = usage().unwrap();
        }
        std::hint::black_box(x);
        assert!(before.resident_bytes > 1 << 20, "{before:?}");
        assert!(after.cpu_seconds > before.cpu_seconds, "{before:?} {after:?}");
    }
}
