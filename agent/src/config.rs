//! The agent's configuration: the YAML schema of SPEC.md, loaded in two stages.
//!
//! Stage one ([`load`]) turns text into a [`Config`]: `${VAR}` expansion of the file, then
//! `NODELENS_<PATH>` environment overrides, then strict deserialization (unknown keys are
//! errors naming the key). Stage two ([`Config::validate`]) checks what serde cannot (globs,
//! bounds, cross-key rules). The doc comment on each field is the user documentation: `nodelens
//! check-config` prints the effective result.

mod env;
mod switch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use switch::Switch;

/// A configuration problem, phrased for the person who wrote the config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by `--config`.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The text is not YAML.
    #[error("{origin}: not valid YAML: {source}")]
    Syntax {
        /// The file (or "defaults") the text came from.
        origin: String,
        /// The parser's complaint, with line and column.
        source: serde_yaml_ng::Error,
    },
    /// A key is unknown, or its value has the wrong type.
    #[error("{origin}: key `{key}`: {message}")]
    Key {
        /// The file the key came from.
        origin: String,
        /// Dotted path of the offending key, e.g. `logs.pods_dri`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// An environment override names no config key, or cannot be applied.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable, e.g. `NODELENS_LOGS__PODS_DRI`.
        var: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration. Every field has a default, so an empty file is a valid config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name of the node this agent runs on; goes to `kubernetes.node.name`, `host.name` and the
    /// `node` label of every metric. Empty: the `NODE_NAME` environment variable, else the hostname.
    pub node_name: String,
    /// Cluster name written to `orchestrator.cluster.name` (omitted when empty).
    pub cluster_name: String,
    /// Directory for checkpoints. Must survive agent restarts (a hostPath in Kubernetes).
    pub state_dir: PathBuf,
    /// The agent's own log filter, in `tracing` syntax (e.g. `info`, `nodelens=debug`).
    pub log_level: String,
    /// Where the host's filesystems are visible to the agent.
    pub host: HostConfig,
    /// Container log collection.
    pub logs: LogsConfig,
    /// Pod metadata from the Kubernetes API.
    pub kubernetes: KubernetesConfig,
    /// GPU metrics from NVML.
    pub gpu: GpuConfig,
    /// Where log records go.
    pub sinks: SinksConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Certificate expiry checks.
    pub certificates: CertificatesConfig,
    /// The node's own logs: the systemd journal and the kernel ring.
    pub node_logs: NodeLogsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: String::new(),
            cluster_name: String::new(),
            state_dir: PathBuf::from("/var/lib/nodelens"),
            log_level: "info".into(),
            host: HostConfig::default(),
            logs: LogsConfig::default(),
            kubernetes: KubernetesConfig::default(),
            gpu: GpuConfig::default(),
            sinks: SinksConfig::default(),
            metrics: MetricsConfig::default(),
            certificates: CertificatesConfig::default(),
            node_logs: NodeLogsConfig::default(),
        }
    }
}

/// The node's own logs, shipped like container logs (same sinks, checkpoints, exactly once).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeLogsConfig {
    /// The host's systemd journal (kubelet, container runtime).
    pub journald: JournaldConfig,
    /// The kernel ring (`/dev/kmsg`): driver errors such as GPU XIDs, OOM kills.
    pub kernel: KernelConfig,
}

/// The host's systemd journal, read through `journalctl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournaldConfig {
    /// `auto`: on when a journal is found under `path` (or `/run/log/journal`).
    pub enabled: Switch,
    /// The host's journal directory (`<path>/<machine-id>/*.journal`); when it holds no
    /// journal, `/run/log/journal` (a volatile journal) is read instead.
    pub path: PathBuf,
    /// Units shipped (`_SYSTEMD_UNIT`); empty = every entry of the journal.
    pub units: Vec<String>,
}

impl Default for JournaldConfig {
    fn default() -> Self {
        JournaldConfig {
            enabled: Switch::Auto,
            path: PathBuf::from("/var/log/journal"),
            units: ["kubelet.service", "containerd.service", "crio.service", "docker.service"].map(String::from).to_vec(),
        }
    }
}

/// The kernel ring buffer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelConfig {
    /// `auto`: on when `path` can be opened for reading (it needs `CAP_SYSLOG` where
    /// `kernel.dmesg_restrict` is set).
    pub enabled: Switch,
    /// The kernel's record device: one record per read,
    /// `<prio>,<seq>,<usec since boot>,<flags>;<text>` with indented continuation lines.
    pub path: PathBuf,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig { enabled: Switch::Auto, path: PathBuf::from("/dev/kmsg") }
    }
}

/// Paths of the host as the agent sees them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// The host's `/proc` (the pod runs with `hostPID`); tests point it at a fake tree.
    pub proc_root: PathBuf,
    /// How often host processes are scanned (container `/dev/shm` sizes).
    #[serde(with = "duration")]
    pub scan_interval: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig { proc_root: PathBuf::from("/proc"), scan_interval: Duration::from_secs(30) }
    }
}

/// Container log collection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// Tail container logs at all.
    pub enabled: bool,
    /// The kubelet's pod log directory: `<ns>_<pod>_<uid>/<container>/<n>.log[.<ts>[.gz]]`.
    pub pods_dir: PathBuf,
    /// The kubelet's `<pod>_<ns>_<container>-<id>.log` symlinks, read for container ids.
    pub containers_dir: PathBuf,
    /// Namespaces (globs) whose logs are not collected.
    pub exclude_namespaces: Vec<String>,
    /// Longest record kept; longer records are cut here and flagged `truncated`.
    pub max_line_bytes: usize,
    /// How long a partial (`P`) record waits for its closing part before it is shipped as is.
    #[serde(with = "duration")]
    pub partial_timeout: Duration,
    /// Full rescan of `pods_dir`, the safety net under inotify (which can overflow or be absent).
    #[serde(with = "duration")]
    pub rescan_interval: Duration,
    /// Bytes read but not yet acknowledged by every sink; reading pauses above this.
    pub max_inflight_bytes: u64,
    /// Log files held open at once; beyond it, files are read in turns (one at the end of
    /// what it has, or open for 5 s, is closed for one waiting). Unset: half the descriptor limit left after a
    /// reserve of 64 for sockets, checkpoints and scans, at most 4096 (96 under a limit of
    /// 256). A value above that is lowered to it.
    pub max_open_files: Option<usize>,
    /// Per-application multi-line rules: `{app: glob, start_pattern: regex, timeout: 2s}`.
    pub multiline: Vec<MultilineRule>,
    /// Log-to-metric rules (see SPEC.md "Log-derived metrics").
    pub log_metrics: Vec<LogMetricRule>,
    /// `auto`: a message that is a JSON object gives `message` (from `msg`/`message`),
    /// `log.level`, `trace.id`, `span.id`, and its other keys under `json`; `off`: text only.
    pub json: JsonMode,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            enabled: true,
            pods_dir: PathBuf::from("/var/log/pods"),
            containers_dir: PathBuf::from("/var/log/containers"),
            exclude_namespaces: Vec::new(),
            max_line_bytes: 1024 * 1024,
            partial_timeout: Duration::from_secs(5),
            rescan_interval: Duration::from_secs(10),
            max_inflight_bytes: 4 * 1024 * 1024,
            max_open_files: None,
            multiline: Vec::new(),
            log_metrics: Vec::new(),
            json: Default::default(),
        }
    }
}

/// `logs.json`: whether a message that is a JSON object gives fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JsonMode {
    /// A message that is a JSON object gives fields.
    #[default]
    Auto,
    /// Messages are text, whatever they hold.
    Off,
}

/// Joins the lines of one stack trace into one record for matching applications.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultilineRule {
    /// Applications (glob over `service.name`) the rule applies to.
    pub app: String,
    /// A line matching this regex starts a new record; other lines continue the current one.
    pub start_pattern: String,
    /// How long to wait for more lines before shipping the record.
    #[serde(with = "duration", default = "default_multiline_timeout")]
    pub timeout: Duration,
}

fn default_multiline_timeout() -> Duration {
    Duration::from_secs(2)
}

/// Turns matching log lines into a metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogMetricRule {
    /// The metric's `name` label.
    pub name: String,
    /// Applications (glob over `service.name`) the rule applies to.
    #[serde(default = "default_glob")]
    pub app: String,
    /// Regex with named groups, matched against the message.
    pub pattern: String,
    /// `counter` or `gauge`.
    #[serde(rename = "type")]
    pub kind: LogMetricKind,
    /// The named group holding the value; counters without one count matches.
    #[serde(default)]
    pub value: String,
    /// Named groups exported as extra labels (an allowlist: other groups never become labels).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Most series this rule may create; matches that would make more are counted in
    /// `nodelens_log_metric_series_refused_total` instead.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
}

fn default_max_series() -> usize {
    500
}

/// Labels every log-derived series carries; a rule's own labels cannot be named so.
const LOG_METRIC_RESERVED_LABELS: &[&str] =
    &["name", "namespace", "pod", "app", "user", "node", "cluster", "job", "instance", "container", "le", "quantile"];

impl LogMetricRule {
    /// Checks what serde cannot: the glob and regex compile, and the groups the rule names
    /// exist. The error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("name is empty".into());
        }
        globset::Glob::new(&self.app).map_err(|e| format!("app: {e}"))?;
        let pattern = regex::bytes::Regex::new(&self.pattern).map_err(|e| format!("pattern: {e}"))?;
        let has_group = |name: &str| pattern.capture_names().any(|n| n == Some(name));
        match self.value.as_str() {
            "" if self.kind == LogMetricKind::Gauge => return Err("a gauge needs a value group".into()),
            "" => {}
            name if !has_group(name) => return Err(format!("value: the pattern has no group named `{name}`")),
            _ => {}
        }
        for name in &self.labels {
            // Prometheus refuses a whole scrape over one bad label name; with honorLabels a
            // tenant's value must not become the target's job or instance either.
            let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("labels: `{name}` is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"));
            }
            if LOG_METRIC_RESERVED_LABELS.contains(&name.as_str()) || name.starts_with("__") {
                return Err(format!("labels: `{name}` is reserved"));
            }
            if !has_group(name) {
                return Err(format!("labels: the pattern has no group named `{name}`"));
            }
        }
        Ok(())
    }
}

fn default_glob() -> String {
    "*".into()
}

/// The kind of a log-derived metric.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum LogMetricKind {
    /// `nodelens_log_metric_total`: the sum of the value group, or +1 per match.
    Counter,
    /// `nodelens_log_metric`: the last value seen.
    Gauge,
}

/// Pod metadata from the Kubernetes API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// `auto`: on when in-cluster config or a kubeconfig is found.
    pub enabled: Switch,
    /// Kubeconfig path; empty = in-cluster, then `$KUBECONFIG`.
    pub kubeconfig: String,
    /// Ordered keys that name a pod's application (`label:K`, `annotation:K`, `namespace_label:K`, `owner`).
    pub app_keys: Vec<String>,
    /// Ordered keys that name a pod's user.
    pub user_keys: Vec<String>,
    /// Also watch namespaces for their `nodelens.io/exclude` annotation (needs list/watch on
    /// namespaces). Namespaces are watched anyway when a key is `namespace_label:`.
    pub watch_namespaces: bool,
    /// The kubelet's pod-resources gRPC socket.
    pub pod_resources_socket: PathBuf,
    /// How long log reading waits at start for the first pod list, so every record carries
    /// its pod's metadata and `nodelens.io/exclude` holds from the first record. Past it (the
    /// API unreachable) records ship with metadata from their paths; the files on disk are
    /// the buffer meanwhile.
    #[serde(with = "duration")]
    pub metadata_wait: Duration,
    /// How long a request to the API server may go without a byte of its answer: a list the
    /// server accepted but never answers, or a watch gone silent, is then retried (and shows
    /// in `nodelens_kubernetes_watch_up`) instead of hanging. Watches ask the server to end
    /// them sooner (five sixths of it), so a healthy watch is never idle this long.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: Switch::Auto,
            kubeconfig: String::new(),
            app_keys: ["label:app.kubernetes.io/name", "label:app", "label:k8s-app", "owner"].map(String::from).to_vec(),
            user_keys: ["label:user", "annotation:kubesphere.io/creator", "label:owner", "namespace_label:user"].map(String::from).to_vec(),
            watch_namespaces: false,
            pod_resources_socket: PathBuf::from("/var/lib/kubelet/pod-resources/kubelet.sock"),
            metadata_wait: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// GPU metrics from NVML.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// `auto`: on when NVML loads.
    pub enabled: Switch,
    /// Path to `libnvidia-ml.so.1`; empty = the system's.
    pub nvml_library: String,
    /// Extended resource names that are GPUs or GPU slices.
    pub resource_prefixes: Vec<String>,
    /// How often NVML is sampled.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: Switch::Auto,
            nvml_library: String::new(),
            resource_prefixes: vec!["nvidia.com/gpu".into(), "nvidia.com/mig-".into()],
            poll_interval: Duration::from_secs(5),
        }
    }
}

/// Where log records go.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinksConfig {
    /// Elasticsearch `_bulk`.
    pub elasticsearch: ElasticsearchConfig,
    /// OTLP log export (OpenTelemetry Collector, Alloy, vendors).
    pub otlp: OtlpSinkConfig,
    /// One ECS JSON document per line on standard output.
    pub stdout: StdoutConfig,
}

/// The Elasticsearch sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticsearchConfig {
    /// Base URLs tried in turn (failover); empty = sink off. A password in a URL is used for
    /// basic auth and never printed or logged.
    #[serde(serialize_with = "redacted_urls")]
    pub endpoints: Vec<String>,
    /// Data stream written with `create` operations.
    pub data_stream: String,
    /// Data stream of the node's own logs (journal and kernel); one `_bulk` request may carry
    /// records of both streams.
    pub node_data_stream: String,
    /// Basic-auth user; the password comes from `password` or `password_file`.
    pub username: String,
    /// Basic-auth password (prefer `password_file` or the environment).
    #[serde(serialize_with = "redacted")]
    pub password: String,
    /// File holding the basic-auth password (a mounted Secret).
    pub password_file: String,
    /// `Authorization: ApiKey <api_key>` (the base64 `id:key` form).
    #[serde(serialize_with = "redacted")]
    pub api_key: String,
    /// PEM file of a private CA to trust.
    pub ca_file: String,
    /// Request body compression.
    pub compression: Compression,
    /// Largest `_bulk` body before compression.
    pub batch_max_bytes: usize,
    /// Longest a record waits for its batch to fill.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    /// Timeout of one `_bulk` request.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// `_bulk` requests in flight at once (checkpoints still advance in read order).
    pub max_concurrent_requests: usize,
    /// How many 5xx answers a record may get, while Elasticsearch accepts other records,
    /// before it is given up (counted as `retries_exhausted`). During an outage, when nothing
    /// is accepted, records are kept and sent again without end, as are 429s.
    pub item_max_attempts: u32,
}

impl Default for ElasticsearchConfig {
    fn default() -> Self {
        ElasticsearchConfig {
            endpoints: Vec::new(),
            data_stream: "logs-kubernetes.container_logs-default".into(),
            node_data_stream: "logs-kubernetes.node-default".into(),
            username: String::new(),
            password: String::new(),
            password_file: String::new(),
            api_key: String::new(),
            ca_file: String::new(),
            compression: Compression::Gzip,
            batch_max_bytes: 5 * 1024 * 1024,
            flush_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 4,
            item_max_attempts: 5,
        }
    }
}

/// The OTLP log sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpSinkConfig {
    /// The receiver: `http://host:4318` (OTLP/HTTP; `/v1/logs` is appended unless the URL
    /// already ends with it) or `http://host:4317` (gRPC); `https://` for TLS. Empty = sink off.
    #[serde(serialize_with = "redacted_url")]
    pub endpoint: String,
    /// `http/protobuf` or `grpc`.
    pub protocol: OtlpProtocol,
    /// Sent with every request (HTTP headers or gRPC metadata), e.g. `Authorization`. Values
    /// are never printed.
    #[serde(serialize_with = "redacted_map")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Request body compression.
    pub compression: Compression,
    /// PEM file of a private CA to trust.
    pub ca_file: String,
    /// Largest request before compression. Collectors refuse gRPC messages over 4 MiB by default.
    pub batch_max_bytes: usize,
    /// Longest a record waits for its request to fill.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    /// Timeout of one export request.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Export requests in flight at once (checkpoints still advance in read order).
    pub max_concurrent_requests: usize,
    /// How often a request whose data the receiver refuses (HTTP 400, INVALID_ARGUMENT) is
    /// tried before its records are given up and counted as `rejected`. Every other failure
    /// (429, 5xx, 401/403/404, UNAVAILABLE, no answer) is retried without end.
    pub max_attempts: u32,
}

impl Default for OtlpSinkConfig {
    fn default() -> Self {
        OtlpSinkConfig {
            endpoint: String::new(),
            protocol: OtlpProtocol::HttpProtobuf,
            headers: Default::default(),
            compression: Compression::Gzip,
            ca_file: String::new(),
            batch_max_bytes: 2 * 1024 * 1024,
            flush_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 4,
            max_attempts: 5,
        }
    }
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with binary protobuf bodies.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC.
    #[serde(rename = "grpc")]
    Grpc,
}

/// Request body compression.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `Content-Encoding: gzip`.
    Gzip,
    /// Plain bodies.
    None,
}

/// The stdout sink.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StdoutConfig {
    /// `auto`: on when no other sink is configured.
    pub enabled: Switch,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address serving `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// Also push the agent's metrics over OTLP.
    pub otlp: OtlpMetricsConfig,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: SocketAddr::from(([0, 0, 0, 0], 9400)), otlp: OtlpMetricsConfig::default() }
    }
}

/// OTLP metrics push: the families of `/metrics`, every `interval`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpMetricsConfig {
    /// The receiver (`/v1/metrics` is appended for OTLP/HTTP); empty = off.
    #[serde(serialize_with = "redacted_url")]
    pub endpoint: String,
    /// `http/protobuf` or `grpc`.
    pub protocol: OtlpProtocol,
    /// How often the metrics are pushed.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Sent with every request; values are never printed.
    #[serde(serialize_with = "redacted_map")]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Request body compression.
    pub compression: Compression,
    /// PEM file of a private CA to trust.
    pub ca_file: String,
    /// Timeout of one export request.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
}

impl Default for OtlpMetricsConfig {
    fn default() -> Self {
        OtlpMetricsConfig {
            endpoint: String::new(),
            protocol: OtlpProtocol::HttpProtobuf,
            interval: Duration::from_secs(30),
            headers: Default::default(),
            compression: Compression::Gzip,
            ca_file: String::new(),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Certificate expiry checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertificatesConfig {
    /// Globs (`**` allowed) of PEM files, or kubeconfigs with embedded certificates, whose
    /// expiry is exported.
    pub paths: Vec<String>,
    /// How often the files are read again.
    #[serde(with = "duration")]
    pub interval: Duration,
}

impl Default for CertificatesConfig {
    fn default() -> Self {
        CertificatesConfig { paths: Vec::new(), interval: Duration::from_secs(300) }
    }
}

impl Config {
    /// Stage two: checks serde cannot make, and values derived from the environment.
    pub fn validate(mut self) -> Result<Config, ConfigError> {
        let key_error = |key: &str, message: String| ConfigError::Key { origin: "config".into(), key: key.into(), message };
        if self.node_name.is_empty() {
            self.node_name = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()).unwrap_or_else(hostname);
        }
        if self.logs.max_line_bytes < 1024 {
            return Err(key_error("logs.max_line_bytes", "must be at least 1024".into()));
        }
        if self.logs.max_open_files == Some(0) {
            return Err(key_error("logs.max_open_files", "must be at least 1".into()));
        }
        if self.logs.max_inflight_bytes < self.logs.max_line_bytes as u64 {
            return Err(key_error("logs.max_inflight_bytes", "must be at least logs.max_line_bytes".into()));
        }
        // A zero period spins a thread or panics a timer; a zero timeout wedges a request.
        let es = &self.sinks.elasticsearch;
        let durations = [
            ("host.scan_interval", self.host.scan_interval, Duration::from_millis(100)),
            ("logs.partial_timeout", self.logs.partial_timeout, Duration::from_millis(1)),
            ("logs.rescan_interval", self.logs.rescan_interval, Duration::from_millis(100)),
            ("gpu.poll_interval", self.gpu.poll_interval, Duration::from_millis(100)),
            ("sinks.elasticsearch.flush_interval", es.flush_interval, Duration::from_millis(1)),
            ("sinks.elasticsearch.request_timeout", es.request_timeout, Duration::from_millis(100)),
            ("sinks.otlp.flush_interval", self.sinks.otlp.flush_interval, Duration::from_millis(1)),
            ("sinks.otlp.request_timeout", self.sinks.otlp.request_timeout, Duration::from_millis(100)),
            ("metrics.otlp.interval", self.metrics.otlp.interval, Duration::from_secs(1)),
            ("metrics.otlp.request_timeout", self.metrics.otlp.request_timeout, Duration::from_millis(100)),
            ("certificates.interval", self.certificates.interval, Duration::from_millis(100)),
            ("kubernetes.request_timeout", self.kubernetes.request_timeout, Duration::from_secs(2)),
        ];
        // Beyond a day a period or timeout means nothing, and an absurd one overflows a clock.
        let max = Duration::from_secs(24 * 3600);
        let durations = durations.into_iter().chain([("kubernetes.metadata_wait", self.kubernetes.metadata_wait, Duration::ZERO)]);
        for (key, value, min) in durations {
            if value < min {
                return Err(key_error(key, format!("must be at least {}", humantime::format_duration(min))));
            }
            if value > max {
                return Err(key_error(key, "must be at most 1d".into()));
            }
        }
        for (i, rule) in self.logs.multiline.iter().enumerate() {
            if rule.timeout.is_zero() {
                return Err(key_error(&format!("logs.multiline[{i}].timeout"), "must be more than 0s".into()));
            }
        }
        for (i, glob) in self.logs.exclude_namespaces.iter().enumerate() {
            globset::Glob::new(glob).map_err(|e| key_error(&format!("logs.exclude_namespaces[{i}]"), e.to_string()))?;
        }
        let es_endpoints =
            self.sinks.elasticsearch.endpoints.iter().enumerate().map(|(i, e)| (format!("sinks.elasticsearch.endpoints[{i}]"), e));
        let otlp_endpoints = [("sinks.otlp.endpoint", &self.sinks.otlp.endpoint), ("metrics.otlp.endpoint", &self.metrics.otlp.endpoint)]
            .into_iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(key, e)| (key.to_string(), e));
        for (key, endpoint) in es_endpoints.chain(otlp_endpoints) {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(key_error(&key, format!("`{}` is not an http:// or https:// URL", redact_url(endpoint))));
            }
        }
        for (list, keys) in [("app_keys", &self.kubernetes.app_keys), ("user_keys", &self.kubernetes.user_keys)] {
            for (i, key) in keys.iter().enumerate() {
                crate::kube::resolve::Key::parse(key).map_err(|e| key_error(&format!("kubernetes.{list}[{i}]"), e))?;
            }
        }
        for (i, rule) in self.logs.multiline.iter().enumerate() {
            globset::Glob::new(&rule.app).map_err(|e| key_error(&format!("logs.multiline[{i}].app"), e.to_string()))?;
            regex::bytes::Regex::new(&rule.start_pattern)
                .map_err(|e| key_error(&format!("logs.multiline[{i}].start_pattern"), e.to_string()))?;
        }
        for (i, pattern) in self.certificates.paths.iter().enumerate() {
            glob::Pattern::new(pattern).map_err(|e| key_error(&format!("certificates.paths[{i}]"), e.to_string()))?;
        }
        let mut rule_names = std::collections::HashSet::new();
        for (i, rule) in self.logs.log_metrics.iter().enumerate() {
            rule.check().map_err(|e| key_error(&format!("logs.log_metrics[{i}] ({})", rule.name), e))?;
            if !rule_names.insert((&rule.name, rule.kind)) {
                return Err(key_error(&format!("logs.log_metrics[{i}].name"), format!("`{}` is used twice", rule.name)));
            }
        }
        let es = &self.sinks.elasticsearch;
        if !es.api_key.is_empty() && !es.username.is_empty() {
            return Err(key_error("sinks.elasticsearch.api_key", "set either api_key or username, not both".into()));
        }
        if self.logs.max_line_bytes > 64 * 1024 * 1024 {
            return Err(key_error("logs.max_line_bytes", "must be at most 67108864 (each record is held in memory whole)".into()));
        }
        if self.logs.max_inflight_bytes > 1 << 30 {
            return Err(key_error("logs.max_inflight_bytes", "must be at most 1073741824".into()));
        }
        let otlp = &self.sinks.otlp;
        let headers = [
            ("sinks.otlp.headers", &otlp.headers, otlp.protocol),
            ("metrics.otlp.headers", &self.metrics.otlp.headers, self.metrics.otlp.protocol),
        ];
        for (key, headers, protocol) in headers {
            for (name, value) in headers {
                let grpc_ok = protocol != OtlpProtocol::Grpc
                    || (tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(name.to_ascii_lowercase().as_bytes()).is_ok()
                        && tonic::metadata::MetadataValue::try_from(value.as_str()).is_ok());
                let valid = grpc_ok
                    && reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                    && reqwest::header::HeaderValue::from_str(value).is_ok();
                if !valid {
                    return Err(key_error(&format!("{key}.{name}"), "not a valid header name and value".into()));
                }
            }
        }
        // Elasticsearch refuses bodies over http.max_content_length (100mb by default); OTLP
        // receivers refuse very large messages.
        let counts = [
            ("sinks.elasticsearch.item_max_attempts", es.item_max_attempts as usize, 1, usize::MAX),
            ("sinks.elasticsearch.max_concurrent_requests", es.max_concurrent_requests, 1, 64),
            ("sinks.elasticsearch.batch_max_bytes", es.batch_max_bytes, 64 * 1024, 100 * 1024 * 1024),
            ("sinks.otlp.max_attempts", otlp.max_attempts as usize, 1, usize::MAX),
            ("sinks.otlp.max_concurrent_requests", otlp.max_concurrent_requests, 1, 64),
            ("sinks.otlp.batch_max_bytes", otlp.batch_max_bytes, 64 * 1024, 64 * 1024 * 1024),
        ];
        for (key, value, min, max) in counts {
            if value < min || value > max {
                let bounds = if max == usize::MAX { format!("must be at least {min}") } else { format!("must be between {min} and {max}") };
                return Err(key_error(key, bounds));
            }
        }
        // Collectors refuse gRPC messages over 4 MiB unless configured otherwise; a request may
        // pass the limit by one chunk (256 KiB).
        if otlp.protocol == OtlpProtocol::Grpc && otlp.batch_max_bytes > 3 * 1024 * 1024 {
            return Err(key_error(
                "sinks.otlp.batch_max_bytes",
                "must be at most 3145728 with grpc (receivers take 4 MiB messages)".into(),
            ));
        }
        if self.sinks.stdout.enabled == Switch::Off && es.endpoints.is_empty() && otlp.endpoint.is_empty() {
            return Err(key_error(
                "sinks",
                "no sink is enabled: set sinks.elasticsearch.endpoints, sinks.otlp.endpoint or sinks.stdout.enabled".into(),
            ));
        }
        Ok(self)
    }

    /// Whether the stdout sink runs: explicitly on, or `auto` with no other sink.
    pub fn stdout_enabled(&self) -> bool {
        match self.sinks.stdout.enabled {
            Switch::On => true,
            Switch::Off => false,
            Switch::Auto => self.sinks.elasticsearch.endpoints.is_empty() && self.sinks.otlp.endpoint.is_empty(),
        }
    }

    /// The effective config as YAML, secrets redacted.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("config serializes")
    }
}

/// Stage one: read `path` (or nothing), expand `${VAR}`, apply `NODELENS_*` overrides from
/// `vars`, and deserialize strictly.
pub fn load(path: Option<&Path>, vars: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let (origin, text) = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
            (path.display().to_string(), text)
        }
        None => ("defaults".to_string(), String::new()),
    };
    let expanded = env::expand(&text, |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()));
    let mut tree: serde_yaml_ng::Value = if expanded.trim().is_empty() {
        serde_yaml_ng::Value::Mapping(Default::default())
    } else {
        serde_yaml_ng::from_str(&expanded).map_err(|source| ConfigError::Syntax { origin: origin.clone(), source })?
    };
    if tree.is_null() {
        tree = serde_yaml_ng::Value::Mapping(Default::default());
    }
    let defaults = serde_yaml_ng::to_value(Config::default()).expect("defaults serialize");
    env::apply_overrides(&mut tree, &defaults, &vars)?;
    serde_path_to_error::deserialize(tree).map_err(|e| ConfigError::Key {
        origin,
        key: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

/// The machine's hostname, the last resort for `node_name`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn redacted<S: serde::Serializer>(value: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(if value.is_empty() { "" } else { "<redacted>" })
}

fn redacted_url<S: serde::Serializer>(url: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(url))
}

fn redacted_map<S: serde::Serializer>(map: &std::collections::BTreeMap<String, String>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_map(map.keys().map(|k| (k, "<redacted>")))
}

fn redacted_urls<S: serde::Serializer>(urls: &[String], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(urls.iter().map(|u| redact_url(u)))
}

/// `url` with its user info (`http://user:password@host`, or a token as the user) replaced,
/// for anything printed or logged. What does not parse as a URL but holds an `@` is hidden
/// whole.
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            let user = if url.password().is_some() { url.username().to_string() } else { String::new() };
            let _ = url.set_username(if user.is_empty() { "redacted" } else { &user });
            let _ = url.set_password(Some("redacted"));
            url.to_string()
        }
        Ok(_) => text.to_string(),
        Err(_) if text.contains('@') => "<URL with credentials, redacted>".to_string(),
        Err(_) => text.to_string(),
    }
}

/// Durations as humans write them: `500ms`, `2s`, `1m`.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration like 500ms, 2s or 1m: {e}")))
    }
}

#[cfg(test)]
mod tests;
