//! The `logs` section: container log collection, multi-line and log-derived metric rules.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration;

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
    /// Per-container rate limit: `records_per_second` (0 = off), a pod's
    /// `nodelens.io/rate-limit` annotation over it.
    pub rate_limit: RateLimitConfig,
}

/// `logs.rate_limit`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Records a second each container is read at, at most (bursts of up to 1,000); the
    /// excess waits in its files. 0: no limit.
    pub records_per_second: u32,
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
            json: JsonMode::Auto,
            rate_limit: RateLimitConfig::default(),
        }
    }
}

/// `logs.json`: whether a message that is a JSON object gives fields. `false` is taken for
/// `off`, since YAML 1.1 readers (Helm's among them) turn an unquoted `off` into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "JsonModeValue")]
pub enum JsonMode {
    /// A message that is a JSON object gives fields.
    #[default]
    Auto,
    /// Messages are text, whatever they hold.
    Off,
}

/// What `logs.json` may be written as.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonModeValue {
    Text(String),
    Flag(bool),
}

impl TryFrom<JsonModeValue> for JsonMode {
    type Error = String;

    fn try_from(value: JsonModeValue) -> Result<JsonMode, String> {
        match value {
            JsonModeValue::Text(text) if text == "auto" => Ok(JsonMode::Auto),
            JsonModeValue::Text(text) if text == "off" => Ok(JsonMode::Off),
            JsonModeValue::Flag(false) => Ok(JsonMode::Off),
            JsonModeValue::Text(text) => Err(format!("unknown variant `{text}`, expected `auto` or `off`")),
            JsonModeValue::Flag(true) => Err("expected `auto` or `off`, not `true`".into()),
        }
    }
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

/// A multi-line rule, compiled.
#[derive(Debug, Clone)]
pub struct Multiline {
    /// Applications the rule applies to.
    pub app: globset::GlobMatcher,
    /// A line matching it starts a new record.
    pub start: regex::bytes::Regex,
    /// How long to wait for more lines.
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

/// A log-derived metric rule, compiled.
#[derive(Debug, Clone)]
pub struct LogMetric {
    /// The metric's `name` label.
    pub name: String,
    /// Applications the rule applies to.
    pub app: globset::GlobMatcher,
    /// Matched against the message.
    pub pattern: regex::bytes::Regex,
    /// Counter or gauge.
    pub kind: LogMetricKind,
    /// The index of the value group; `None`: a counter of matches.
    pub value: Option<usize>,
    /// Extra labels and the index of the group holding each.
    pub labels: Vec<(String, usize)>,
    /// Most series the rule may create.
    pub max_series: usize,
}

impl LogMetricRule {
    /// Compiles the rule, checking what serde cannot: the glob and regex compile, and the
    /// groups the rule names exist. The error says what is wrong.
    pub fn compile(&self) -> Result<LogMetric, String> {
        if self.name.is_empty() {
            return Err("name is empty".into());
        }
        let app = globset::Glob::new(&self.app).map_err(|e| format!("app: {e}"))?.compile_matcher();
        let pattern = regex::bytes::Regex::new(&self.pattern).map_err(|e| format!("pattern: {e}"))?;
        let group = |name: &str| pattern.capture_names().position(|n| n == Some(name));
        let has_group = |name: &str| group(name).is_some();
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
        let value = if self.value.is_empty() { None } else { group(&self.value) };
        let labels = self.labels.iter().filter_map(|name| Some((name.clone(), group(name)?))).collect();
        Ok(LogMetric { name: self.name.clone(), app, pattern, kind: self.kind, value, labels, max_series: self.max_series })
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
