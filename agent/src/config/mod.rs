//! The agent's configuration: the YAML schema of SPEC.md, loaded in two stages.
//!
//! Stage one ([`load`]) turns text into a [`Config`]: `${VAR}` expansion of the file, then
//! `NODELENS_<PATH>` environment overrides, then strict deserialization (unknown keys are
//! errors naming the key). Stage two ([`Config::validate`]) checks what serde cannot (globs,
//! bounds, cross-key rules). The doc comment on each field is the user documentation: `nodelens
//! check-config` prints the effective result.

mod certificates;
mod env;
mod gpu;
mod host;
mod kubernetes;
mod logs;
mod metrics;
mod node_logs;
mod settings;
mod sinks;
mod switch;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::resolve::Key;

pub use certificates::CertificatesConfig;
pub use gpu::GpuConfig;
pub use host::HostConfig;
pub use kubernetes::{EventsConfig, KubernetesConfig};
pub use logs::{JsonMode, LogMetric, LogMetricKind, LogMetricRule, LogsConfig, Multiline, MultilineRule};
pub use metrics::{MetricsConfig, OtlpMetricsConfig};
pub use node_logs::{JournaldConfig, KernelConfig, NodeLogsConfig};
pub use settings::{EventsIdentity, Settings};
pub use sinks::{Compression, ElasticsearchConfig, OtlpProtocol, OtlpSinkConfig, SinksConfig, StdoutConfig};
pub use switch::Switch;

/// Headers the OTLP exporters set themselves (for the body's framing and encoding, and the
/// connection).
const RESERVED_HEADERS: [&str; 8] =
    ["content-length", "transfer-encoding", "content-encoding", "content-type", "host", "te", "connection", "upgrade"];

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

impl Config {
    /// Stage two: checks serde cannot make, values derived from the environment, and the
    /// parsed keys and compiled globs, regexes and rules the agent runs on.
    pub fn validate(mut self) -> Result<Settings, ConfigError> {
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
        let mut exclude_namespaces = globset::GlobSetBuilder::new();
        for (i, glob) in self.logs.exclude_namespaces.iter().enumerate() {
            exclude_namespaces
                .add(globset::Glob::new(glob).map_err(|e| key_error(&format!("logs.exclude_namespaces[{i}]"), e.to_string()))?);
        }
        let exclude_namespaces = exclude_namespaces.build().map_err(|e| key_error("logs.exclude_namespaces", e.to_string()))?;
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
        let keys = |list: &str, keys: &[String]| {
            keys.iter()
                .enumerate()
                .map(|(i, key)| Key::parse(key).map_err(|e| key_error(&format!("kubernetes.{list}[{i}]"), e)))
                .collect::<Result<Vec<_>, _>>()
        };
        let (app_keys, user_keys) = (keys("app_keys", &self.kubernetes.app_keys)?, keys("user_keys", &self.kubernetes.user_keys)?);
        let mut multiline = Vec::new();
        for (i, rule) in self.logs.multiline.iter().enumerate() {
            let app = globset::Glob::new(&rule.app).map_err(|e| key_error(&format!("logs.multiline[{i}].app"), e.to_string()))?;
            let start = regex::bytes::Regex::new(&rule.start_pattern)
                .map_err(|e| key_error(&format!("logs.multiline[{i}].start_pattern"), e.to_string()))?;
            multiline.push(Multiline { app: app.compile_matcher(), start, timeout: rule.timeout });
        }
        for (i, pattern) in self.certificates.paths.iter().enumerate() {
            glob::Pattern::new(pattern).map_err(|e| key_error(&format!("certificates.paths[{i}]"), e.to_string()))?;
        }
        let mut rule_names = std::collections::HashSet::new();
        let mut log_metrics = Vec::new();
        for (i, rule) in self.logs.log_metrics.iter().enumerate() {
            log_metrics.push(rule.compile().map_err(|e| key_error(&format!("logs.log_metrics[{i}] ({})", rule.name), e))?);
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
                // What frames and encodes the body is the agent's: a Content-Length of the
                // config's would cut the body short, a Content-Encoding make it unreadable.
                if RESERVED_HEADERS.iter().any(|reserved| name.eq_ignore_ascii_case(reserved)) {
                    return Err(key_error(
                        &format!("{key}.{name}"),
                        "is set by the agent for each request and cannot be configured".into(),
                    ));
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
        // Elasticsearch refuses every document of a stream whose name it cannot take: a typo
        // here would lose every record, so it stops the start instead.
        let streams = [
            // The longest namespace Kubernetes allows stands in for the placeholder.
            ("sinks.elasticsearch.data_stream", es.data_stream.replace("{namespace}", &"n".repeat(63))),
            ("sinks.elasticsearch.node_data_stream", es.node_data_stream.clone()),
            ("sinks.elasticsearch.gpu_runs_data_stream", es.gpu_runs_data_stream.clone()),
            ("sinks.elasticsearch.events_data_stream", es.events_data_stream.clone()),
        ];
        for (key, name) in streams {
            if let Err(why) = data_stream_name(&name) {
                return Err(key_error(key, why));
            }
        }
        // Collectors refuse gRPC messages over 4 MiB unless configured otherwise; a request
        // passes the limit only when one chunk alone does.
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
        let events = self.events_identity(|name| std::env::var(name).ok(), &key_error)?;
        Ok(Settings { config: self, app_keys, user_keys, exclude_namespaces, multiline, log_metrics, events })
    }

    /// Who this agent is in the Events election, when `kubernetes.events.enabled` (and the
    /// Kubernetes API not switched off): the Lease's name, `POD_NAMESPACE` and `POD_NAME`
    /// (from `env`).
    fn events_identity(
        &self,
        env: impl Fn(&str) -> Option<String>,
        key_error: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<Option<EventsIdentity>, ConfigError> {
        let events = &self.kubernetes.events;
        if !events.enabled || self.kubernetes.enabled == Switch::Off {
            return Ok(None);
        }
        // A DNS subdomain, as the API server requires of an object's name.
        let name = &events.lease_name;
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !valid {
            return Err(key_error(
                "kubernetes.events.lease_name",
                format!("`{name}` is not a valid object name (lower-case letters, digits, `-` and `.`)"),
            ));
        }
        let var = |name: &str| env(name).filter(|v| !v.is_empty());
        match (var("POD_NAMESPACE"), var("POD_NAME")) {
            (Some(namespace), Some(holder)) => Ok(Some(EventsIdentity { lease: name.clone(), namespace, holder })),
            _ => Err(key_error(
                "kubernetes.events.enabled",
                "needs the POD_NAME and POD_NAMESPACE environment variables (the downward API: metadata.name, metadata.namespace)".into(),
            )),
        }
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

/// Checks a data stream name as Elasticsearch checks index names. (The naming scheme,
/// `<type>-<dataset>-<namespace>`, is what the bundled index templates match, not a rule of
/// Elasticsearch's: a stream of another name needs a template of the operator's own.)
fn data_stream_name(name: &str) -> Result<(), String> {
    const FORBIDDEN: &[char] = &['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#', ':', '{', '}'];
    if name.is_empty() || name.len() > 255 {
        return Err(format!("`{name}` must be 1 to 255 bytes (with a namespace of 63 characters for `{{namespace}}`)"));
    }
    if name != name.to_lowercase() {
        return Err(format!("`{name}` must be lower case (Elasticsearch refuses upper-case index names)"));
    }
    if name.contains(['{', '}']) {
        return Err(format!("`{name}` holds a placeholder; only sinks.elasticsearch.data_stream takes `{{namespace}}`"));
    }
    if let Some(c) = name.chars().find(|c| FORBIDDEN.contains(c)) {
        return Err(format!("`{name}` holds `{c}`, which Elasticsearch refuses in index names"));
    }
    if name.starts_with(['-', '_', '+', '.']) {
        return Err(format!("`{name}` must not start with `-`, `_`, `+` or `.`"));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not an index name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
