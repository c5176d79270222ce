//! The `metrics` section: the Prometheus endpoint and the OTLP metrics push.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, redacted_map, redacted_url, Compression, OtlpProtocol};

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
