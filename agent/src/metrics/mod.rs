//! The registry every metric the agent exports is registered in. Each part owns its metric
//! handles and label types and hands them to a [`Registrar`], which registers them under
//! their names, all with `node` (a registry-wide label); `agent::Metrics` does so for every
//! part. What it makes, an [`Exposition`], is what the HTTP endpoint serves and the OTLP push
//! sends. A leaf: it knows no other part of the agent.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry};

/// Labels of `nodelens_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The agent's version.
    pub version: &'static str,
}

/// Registers metrics and remembers their names.
pub struct Registrar {
    registry: Registry,
    names: Vec<String>,
}

impl Registrar {
    /// A registry whose series all carry `node`, holding `nodelens_build_info`.
    pub fn new(node: &str) -> Registrar {
        let mut r = Registrar {
            registry: Registry::with_prefix_and_labels("nodelens", [("node".into(), node.to_string().into())].into_iter()),
            names: Vec::new(),
        };
        let build: Family<BuildLabels, Gauge> = Family::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        r.add("build_info", "nodelens build; the value is 1", build);
        r
    }

    /// Registers `metric` as `nodelens_<name>`.
    pub fn add<M: Metric + TypedMetric>(&mut self, name: &str, help: &str, metric: M) {
        let suffixes: &[&str] = match M::TYPE {
            MetricType::Counter => &["_total"],
            MetricType::Histogram => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        self.names.extend(suffixes.iter().map(|suffix| format!("nodelens_{name}{suffix}")));
        self.registry.register(name, help, metric);
    }

    /// Registers a collector that encodes the families `names` (full series names) at scrape time.
    pub fn add_collector(&mut self, collector: Box<dyn Collector>, names: &[&str]) {
        self.registry.register_collector(collector);
        self.names.extend(names.iter().map(|n| n.to_string()));
    }

    /// The registry, complete.
    pub fn finish(self) -> Exposition {
        Exposition { registry: self.registry, names: self.names }
    }
}

/// Every registered metric: what `/metrics` serves and the OTLP push sends.
pub struct Exposition {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Names of the registered metrics, as series carry them.
    names: Vec<String>,
}

impl Exposition {
    /// Every metric name the agent exports (as series are named: counters end in `_total`),
    /// whether or not it has series yet.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The registry in the text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("string write");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn every_series_carries_node_and_names_are_remembered() {
        let mut r = Registrar::new("gpu-7");
        let c: Counter = Counter::default();
        c.inc();
        r.add("things", "Things", c);
        let e = r.finish();
        let text = e.encode();
        assert!(text.contains(r#"nodelens_build_info{node="gpu-7",version=""#), "{text}");
        assert!(text.contains(r#"nodelens_things_total{node="gpu-7"} 1"#), "{text}");
        assert_eq!(e.names(), ["nodelens_build_info", "nodelens_things_total"]);
    }
}
