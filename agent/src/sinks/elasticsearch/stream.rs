//! A data stream per Kubernetes namespace: `sinks.elasticsearch.data_stream` may hold
//! `{namespace}` (e.g. `logs-kubernetes.container_logs-{namespace}`), so an Elasticsearch role
//! per data stream gives each team its own logs. The namespace is made a valid data stream
//! namespace: lower case, and `-`, `\ / * ? " < > |`, space, `,`, `#`, `:` each `_` (the
//! naming scheme allows no `-` in that part: `team-a` → `team_a`).

use std::sync::Arc;

/// The placeholder replaced by the record's namespace.
pub const NAMESPACE: &str = "{namespace}";

/// The data stream names of container records.
#[derive(Debug, Clone, Default)]
pub struct DataStreams {
    /// The configured name when it holds [`NAMESPACE`].
    pattern: Option<String>,
}

impl DataStreams {
    /// The streams `data_stream` names.
    pub fn new(data_stream: &str) -> DataStreams {
        DataStreams { pattern: data_stream.contains(NAMESPACE).then(|| data_stream.to_string()) }
    }

    /// Whether records go to a stream per namespace (every `_bulk` item then names its own).
    pub fn per_namespace(data_stream: &str) -> bool {
        data_stream.contains(NAMESPACE)
    }

    /// The data stream of `namespace`'s records; `None` when it is the sink's one stream.
    pub fn of(&self, namespace: &str) -> Option<Arc<str>> {
        self.pattern.as_ref().map(|p| p.replace(NAMESPACE, &sanitize(namespace)).into())
    }
}

/// `namespace` as the namespace part of a data stream name.
pub fn sanitize(namespace: &str) -> String {
    namespace
        .chars()
        .map(|c| match c {
            '-' | '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_become_valid_data_stream_namespaces() {
        assert_eq!(sanitize("team-a"), "team_a");
        assert_eq!(sanitize("ML-Prod"), "ml_prod");
        assert_eq!(sanitize(r#"a\b/c*d?e"f<g>h|i j,k#l:m"#), "a_b_c_d_e_f_g_h_i_j_k_l_m");
        assert_eq!(sanitize("kube-system"), "kube_system");
    }

    #[test]
    fn a_pattern_names_one_stream_per_namespace_and_a_plain_name_none() {
        let streams = DataStreams::new("logs-kubernetes.container_logs-{namespace}");
        assert_eq!(streams.of("team-a").as_deref(), Some("logs-kubernetes.container_logs-team_a"));
        assert_eq!(streams.of("ml").as_deref(), Some("logs-kubernetes.container_logs-ml"));
        assert_eq!(DataStreams::new("logs-kubernetes.container_logs-default").of("ml"), None);
        assert!(DataStreams::per_namespace("logs-x-{namespace}") && !DataStreams::per_namespace("logs-x-default"));
    }
}
