//! Certificate expiry: every certificate in the files matched by `certificates.paths` —
//! PEM files, chains, and kubeconfigs with embedded `*-certificate-data` — exported as
//! `nodelens_certificate_not_after_seconds{path,subject}`, read again every interval. kubeadm
//! and kubelet certificates expire silently after a year; this is how an alert sees it coming.
//! A file that cannot be read or holds no valid certificate counts in
//! `nodelens_certificate_errors_total{path}` and never stops the agent.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use x509_parser::pem::Pem;

use crate::shutdown::Shutdown;

/// Labels of `nodelens_certificate_not_after_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// The file holding the certificate.
    pub path: String,
    /// The certificate's subject, e.g. `CN=kube-apiserver`.
    pub subject: String,
}

/// Labels of `nodelens_certificate_errors_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// The file that could not be read.
    pub path: String,
}

/// The certificate metrics.
#[derive(Clone, Default)]
pub struct CertMetrics {
    /// `nodelens_certificate_not_after_seconds`.
    pub not_after: Family<CertLabels, Gauge>,
    /// `nodelens_certificate_errors_total`.
    pub errors: Family<PathLabels, Counter>,
}

/// A certificate found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its subject.
    pub subject: String,
    /// Its expiry, in Unix seconds.
    pub not_after: i64,
}

/// Why a file yielded no certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Read(#[from] std::io::Error),
    /// A certificate block did not parse.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// Neither PEM certificates nor a kubeconfig with embedded ones.
    #[error("no certificate found")]
    Empty,
}

/// The certificates in `bytes`: PEM `CERTIFICATE` blocks, or a kubeconfig's base64 ones.
pub fn certificates_in(bytes: &[u8]) -> Result<Vec<Found>, CertError> {
    let mut found = pem_certificates(bytes)?;
    if found.is_empty() {
        for pem in kubeconfig_certificates(bytes)? {
            found.extend(pem_certificates(&pem)?);
        }
    }
    if found.is_empty() {
        return Err(CertError::Empty);
    }
    Ok(found)
}

fn pem_certificates(bytes: &[u8]) -> Result<Vec<Found>, CertError> {
    let mut found = Vec::new();
    for pem in Pem::iter_from_buffer(bytes) {
        let Ok(pem) = pem else { break };
        if pem.label != "CERTIFICATE" {
            continue;
        }
        let cert = pem.parse_x509().map_err(|e| CertError::Malformed(e.to_string()))?;
        found.push(Found { subject: cert.subject().to_string(), not_after: cert.validity().not_after.timestamp() });
    }
    Ok(found)
}

/// PEM texts of `*certificate-data` and `*certificate-authority-data` fields anywhere in a
/// YAML document (kubeconfigs).
fn kubeconfig_certificates(bytes: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    let Ok(doc) = serde_yaml_ng::from_slice::<serde_yaml_ng::Value>(bytes) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    let mut stack = vec![&doc];
    while let Some(value) = stack.pop() {
        match value {
            serde_yaml_ng::Value::Mapping(map) => {
                for (k, v) in map {
                    match (k.as_str(), v.as_str()) {
                        (Some(key), Some(data)) if key.ends_with("certificate-data") || key.ends_with("certificate-authority-data") => {
                            let pem = base64::engine::general_purpose::STANDARD
                                .decode(data.trim())
                                .map_err(|e| CertError::Malformed(format!("{key}: not base64: {e}")))?;
                            out.push(pem);
                        }
                        _ => stack.push(v),
                    }
                }
            }
            serde_yaml_ng::Value::Sequence(items) => stack.extend(items),
            _ => {}
        }
    }
    Ok(out)
}

/// The files the globs match now.
pub fn matching_files(patterns: &[String]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        patterns.iter().filter_map(|p| glob::glob(p).ok()).flat_map(|paths| paths.flatten()).filter(|p| p.is_file()).collect();
    files.sort();
    files.dedup();
    files
}

/// What one refresh leaves for the next.
#[derive(Debug, Default)]
pub struct Checked {
    /// The series exported, so the next refresh can remove those that went away.
    pub exported: HashSet<CertLabels>,
    /// Files that could not be used, with the reason: each is logged when it starts failing
    /// or its reason changes, not on every refresh.
    pub failing: HashMap<String, String>,
}

/// Reads every matching file once and brings the metrics up to date.
pub fn refresh(patterns: &[String], metrics: &CertMetrics, previous: Checked) -> Checked {
    let mut now = Checked::default();
    for path in matching_files(patterns) {
        let file = path.display().to_string();
        match std::fs::read(&path).map_err(CertError::from).and_then(|bytes| certificates_in(&bytes)) {
            Ok(found) => {
                for cert in found {
                    let labels = CertLabels { path: file.clone(), subject: cert.subject };
                    metrics.not_after.get_or_create(&labels).set(cert.not_after);
                    now.exported.insert(labels);
                }
            }
            Err(e) => {
                let reason = e.to_string();
                if previous.failing.get(&file) != Some(&reason) {
                    tracing::warn!(path = %file, error = %reason, "certificate file not usable");
                }
                metrics.errors.get_or_create(&PathLabels { path: file.clone() }).inc();
                now.failing.insert(file, reason);
            }
        }
    }
    for gone in previous.exported.difference(&now.exported) {
        metrics.not_after.remove(gone);
    }
    now
}

/// Refreshes every `interval` until shutdown.
pub async fn run(patterns: Vec<String>, interval: Duration, metrics: CertMetrics, shutdown: Shutdown) {
    crate::periodic::every(interval, "certificate check", shutdown, move |previous| refresh(&patterns, &metrics, previous)).await
}

#[cfg(test)]
mod tests;
