//! The agent's metrics over OTLP: every `interval`, the families `/metrics` serves, as one
//! `ExportMetricsServiceRequest` (cumulative temporality, started when the agent started).
//!
//! The source is the registry `/metrics` serves, encoded by prometheus-client as typed families
//! (its Prometheus protobuf data model, no text in between), so both endpoints show the same
//! numbers, custom collectors included: a counter `nodelens_x_total` becomes the monotonic Sum
//! `nodelens_x` (the one untyped family, `nodelens_log_metric_total`, keeps its name), a gauge
//! a Gauge, a histogram an explicit-bucket Histogram; labels are data-point attributes (`node`
//! included, so series of different nodes stay apart wherever they are forwarded), and the
//! resource names the node. A push that fails is not retried: the next one carries the
//! cumulative values again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::encoding::prometheus_protobuf::{self, prometheus_data_model as prom};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message;

use super::{kv as attribute, text, unix_nanos, Exporter, Settings};
use crate::config::OtlpMetricsConfig;
use crate::metrics::Exposition;
use crate::shutdown::Shutdown;

/// The exporter settings of `metrics.otlp`.
pub fn settings(config: &OtlpMetricsConfig) -> Settings {
    Settings {
        key: "metrics.otlp",
        endpoint: config.endpoint.clone(),
        protocol: config.protocol,
        headers: config.headers.clone(),
        compression: config.compression,
        ca_file: config.ca_file.clone(),
        timeout: config.request_timeout,
    }
}

/// Labels of `nodelens_otlp_metric_points_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `delivered`, `rejected` or `failed`.
    pub outcome: &'static str,
}

/// Who is pushing: the resource of every request.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `k8s.node.name`, `host.name` and `service.instance.id`.
    pub node: String,
    /// `k8s.cluster.name` (left out when empty).
    pub cluster: String,
}

/// Pushes `metrics` every `interval` until `shutdown`, then once more with the final values,
/// counting the data points in `counts` (`nodelens_otlp_metric_points_total`).
pub async fn run(
    interval: Duration,
    exporter: Exporter,
    metrics: Arc<Exposition>,
    counts: Family<OutcomeLabels, Counter>,
    origin: Origin,
    mut shutdown: Shutdown,
) {
    let started = unix_nanos(SystemTime::now());
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut failing = false;
    loop {
        let last = tokio::select! {
            _ = ticks.tick() => false,
            _ = shutdown.recv() => true,
        };
        let (metrics, origin, encoder) = (metrics.clone(), origin.clone(), exporter.clone());
        // Encoding and compressing: off the async threads.
        let Ok(encoded) = tokio::task::spawn_blocking(move || {
            let families = from_registry(&metrics.registry, started, unix_nanos(SystemTime::now()))?;
            let points = families.iter().map(points_of).sum::<usize>();
            Ok::<_, std::fmt::Error>((encoder.payload_of(&request(&origin, families).encode_to_vec()), points))
        })
        .await
        else {
            return;
        };
        let Ok((request, points)) = encoded else {
            // Only a collector can fail to encode, and `/metrics` shows the same failure.
            if !failing {
                tracing::warn!("the metrics registry could not be encoded; pushes are skipped until it can");
                failing = true;
            }
            if last {
                return;
            }
            continue;
        };
        let count = |outcome, n: usize| {
            if n > 0 {
                counts.get_or_create(&OutcomeLabels { outcome }).inc_by(n as u64);
            }
        };
        match exporter.export(&request).await {
            Ok((accepted, _)) => {
                let rejected = (accepted.rejected as usize).min(points);
                count("delivered", points - rejected);
                if rejected > 0 {
                    count("rejected", rejected);
                    tracing::warn!(rejected, reason = %accepted.message, "the OTLP receiver rejected metric data points");
                }
                if failing {
                    tracing::info!("OTLP metrics push works again");
                    failing = false;
                }
            }
            Err(failure) => {
                count("failed", points);
                // One warning per outage; the next push carries the cumulative values again.
                if !failing {
                    tracing::warn!(error = %failure, "OTLP metrics push failed; trying again at the next interval");
                    failing = true;
                }
            }
        }
        if last {
            return;
        }
    }
}

fn points_of(metric: &Metric) -> usize {
    match &metric.data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        _ => 0,
    }
}

fn kv(key: &str, value: &str) -> KeyValue {
    attribute(key, text(value))
}

/// The request carrying `metrics`, from `origin`.
pub fn request(origin: &Origin, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
    let mut attributes = vec![
        kv("service.name", "nodelens"),
        kv("service.version", env!("CARGO_PKG_VERSION")),
        // Unique across clusters that reuse node names.
        kv(
            "service.instance.id",
            &if origin.cluster.is_empty() { origin.node.clone() } else { format!("{}/{}", origin.cluster, origin.node) },
        ),
        kv("k8s.node.name", &origin.node),
        kv("host.name", &origin.node),
    ];
    if !origin.cluster.is_empty() {
        attributes.push(kv("k8s.cluster.name", &origin.cluster));
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource { attributes, ..Default::default() }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "nodelens".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// The OTLP unit (UCUM, as OpenTelemetry writes them) of the Prometheus base unit a name
/// ends with, by the naming convention every family here follows.
fn unit_of(name: &str) -> &'static str {
    const UNITS: [(&str, &str); 7] =
        [("_seconds", "s"), ("_bytes", "By"), ("_joules", "J"), ("_celsius", "Cel"), ("_hertz", "Hz"), ("_watts", "W"), ("_ratio", "1")];
    UNITS.iter().find(|(suffix, _)| name.ends_with(suffix)).map_or("", |(_, unit)| unit)
}

/// The registry's families as OTLP metrics, stamped `now`, cumulative ones since `start`. A
/// family without series says nothing and is left out.
pub fn from_registry(registry: &Registry, start: u64, now: u64) -> Result<Vec<Metric>, std::fmt::Error> {
    let families = prometheus_protobuf::encode(registry)?;
    Ok(families.into_iter().filter(|f| !f.metric.is_empty()).map(|f| metric(f, start, now)).collect())
}

/// One family as an OTLP metric.
fn metric(family: prom::MetricFamily, start: u64, now: u64) -> Metric {
    let attributes = |m: &prom::Metric| m.label.iter().map(|l| kv(&l.name, &l.value)).collect::<Vec<_>>();
    let number = |m: &prom::Metric, start| NumberDataPoint {
        attributes: attributes(m),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(Number::AsDouble(value_of(m))),
        ..Default::default()
    };
    let sum = |metrics: &[prom::Metric]| {
        Data::Sum(Sum {
            data_points: metrics.iter().map(|m| number(m, start)).collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })
    };
    let (name, data) = match prom::MetricType::try_from(family.r#type) {
        Ok(prom::MetricType::Counter) => {
            let name = family.name.strip_suffix("_total").unwrap_or(&family.name).to_string();
            (name, sum(&family.metric))
        }
        // `nodelens_log_metric_total` is untyped because the counter family name it would need
        // is the gauges' (`nodelens_log_metric`): it stays a Sum of its own name, so the two do
        // not collide over OTLP either.
        Ok(prom::MetricType::Untyped) if family.name.ends_with("_total") => (family.name.clone(), sum(&family.metric)),
        Ok(prom::MetricType::Histogram) => {
            let points = family.metric.iter().map(|m| histogram_point(attributes(m), m.histogram.as_ref(), start, now)).collect();
            let data = Histogram { data_points: points, aggregation_temporality: AggregationTemporality::Cumulative as i32 };
            (family.name.clone(), Data::Histogram(data))
        }
        _ => (family.name.clone(), Data::Gauge(Gauge { data_points: family.metric.iter().map(|m| number(m, 0)).collect() })),
    };
    Metric { unit: unit_of(&name).to_string(), name, description: family.help, data: Some(data), ..Default::default() }
}

/// A series' value, whichever kind it was encoded as.
fn value_of(m: &prom::Metric) -> f64 {
    match (&m.counter, &m.gauge, &m.untyped) {
        (Some(c), _, _) => c.value,
        (_, Some(g), _) => g.value,
        (_, _, Some(u)) => u.value,
        _ => 0.0,
    }
}

/// A Prometheus histogram (cumulative buckets, `+Inf` optional) as an OTLP one (a count per
/// bucket, the last one above every explicit bound).
fn histogram_point(attributes: Vec<KeyValue>, h: Option<&prom::Histogram>, start: u64, now: u64) -> HistogramDataPoint {
    let empty = prom::Histogram::default();
    let h = h.unwrap_or(&empty);
    let finite: Vec<&prom::Bucket> = h.bucket.iter().filter(|b| b.upper_bound.is_finite()).collect();
    let mut counts = Vec::with_capacity(finite.len() + 1);
    let mut below = 0;
    for b in &finite {
        counts.push(b.cumulative_count.saturating_sub(below));
        below = b.cumulative_count;
    }
    counts.push(h.sample_count.saturating_sub(below));
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        count: h.sample_count,
        sum: Some(h.sample_sum),
        bucket_counts: counts,
        explicit_bounds: finite.iter().map(|b| b.upper_bound).collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram as PromHistogram;
    use prometheus_client::registry::Registry;

    use super::*;

    fn find<'a>(metrics: &'a [Metric], name: &str) -> &'a Metric {
        metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", metrics.iter().map(|m| &m.name).collect::<Vec<_>>()))
    }

    fn attrs(list: &[KeyValue]) -> Vec<(String, String)> {
        list.iter()
            .map(|kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => (kv.key.clone(), s.clone()),
                other => (kv.key.clone(), format!("{other:?}")),
            })
            .collect()
    }

    #[test]
    fn the_registry_becomes_sums_gauges_and_histograms() {
        let mut registry = Registry::with_prefix_and_labels("nodelens", [("node".into(), "gpu-1".into())].into_iter());
        let records: Family<Vec<(String, String)>, Counter> = Family::default();
        records.get_or_create(&vec![("app".into(), "a \"quoted\" \\ app".into()), ("stream".into(), "stdout".into())]).inc_by(41);
        records.get_or_create(&vec![("app".into(), "b,c={}".into()), ("stream".into(), "stderr".into())]).inc();
        registry.register("log_records", "Records read", records);
        let backlog: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        backlog.set(1.5e9);
        registry.register("log_backlog_bytes", "Bytes not yet acknowledged.", backlog);
        let duration = PromHistogram::new([0.01, 0.1, 1.0]);
        for v in [0.005, 0.05, 0.05, 0.5, 5.0] {
            duration.observe(v);
        }
        registry.register("sink_request_duration_seconds", "Export time.", duration);
        let empty: Family<Vec<(String, String)>, Counter> = Family::default();
        registry.register("never_seen", "No series.", empty);

        let metrics = from_registry(&registry, 100, 200).unwrap();
        assert_eq!(metrics.len(), 3, "{:?}", metrics.iter().map(|m| &m.name).collect::<Vec<_>>());
        let records = find(&metrics, "nodelens_log_records");
        assert_eq!(records.description, "Records read.");
        let Some(Data::Sum(sum)) = &records.data else { panic!("{records:?}") };
        assert!(sum.is_monotonic);
        assert_eq!(sum.aggregation_temporality, AggregationTemporality::Cumulative as i32);
        type Point = (Vec<(String, String)>, Option<Number>, u64, u64);
        let mut points: Vec<Point> =
            sum.data_points.iter().map(|p| (attrs(&p.attributes), p.value, p.start_time_unix_nano, p.time_unix_nano)).collect();
        points.sort_by(|a, b| a.0.cmp(&b.0));
        let label = |app: &str, stream: &str| {
            vec![("node".to_string(), "gpu-1".to_string()), ("app".into(), app.into()), ("stream".into(), stream.into())]
        };
        let mut want = vec![
            (label("a \"quoted\" \\ app", "stdout"), Some(Number::AsDouble(41.0)), 100, 200),
            (label("b,c={}", "stderr"), Some(Number::AsDouble(1.0)), 100, 200),
        ];
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(points, want);

        let backlog = find(&metrics, "nodelens_log_backlog_bytes");
        assert_eq!(backlog.unit, "By");
        let Some(Data::Gauge(gauge)) = &backlog.data else { panic!("{backlog:?}") };
        assert_eq!(gauge.data_points[0].value, Some(Number::AsDouble(1.5e9)));

        let duration = find(&metrics, "nodelens_sink_request_duration_seconds");
        assert_eq!(duration.unit, "s");
        let Some(Data::Histogram(histogram)) = &duration.data else { panic!("{duration:?}") };
        let [point] = &histogram.data_points[..] else { panic!("{histogram:?}") };
        assert_eq!(point.explicit_bounds, vec![0.01, 0.1, 1.0]);
        assert_eq!(point.bucket_counts, vec![1, 2, 1, 1], "per bucket, not cumulative; the last is above 1.0");
        assert_eq!((point.count, point.sum), (5, Some(5.605)));
        assert_eq!(attrs(&point.attributes), vec![("node".to_string(), "gpu-1".to_string())]);
    }

    fn oom_labels() -> Vec<(String, String)> {
        vec![("name".into(), "oom".into()), ("namespace".into(), "ml".into())]
    }

    #[test]
    fn the_untyped_log_metric_totals_are_a_sum_of_their_own_name_beside_the_gauges() {
        use crate::logs::derived::{SeriesLabels, Totals};
        let mut registry = Registry::with_prefix_and_labels("nodelens", [("node".into(), "n".into())].into_iter());
        let totals = Totals(Family::default());
        totals.0.get_or_create(&oom_labels()).set(3.0);
        registry.register_collector(Box::new(totals));
        let gauges: Family<SeriesLabels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
        gauges.get_or_create(&oom_labels()).set(0.5);
        registry.register("log_metric", "Log-derived gauges", gauges);
        let metrics = from_registry(&registry, 1, 2).unwrap();
        let metric = find(&metrics, "nodelens_log_metric_total");
        let Some(Data::Sum(sum)) = &metric.data else { panic!("{metric:?}") };
        assert_eq!((sum.data_points.len(), sum.is_monotonic), (1, true));
        assert_eq!(sum.data_points[0].value, Some(Number::AsDouble(3.0)));
        assert!(attrs(&sum.data_points[0].attributes).contains(&("name".into(), "oom".into())));
        let Some(Data::Gauge(gauge)) = &find(&metrics, "nodelens_log_metric").data else { panic!("{metrics:?}") };
        assert_eq!(gauge.data_points[0].value, Some(Number::AsDouble(0.5)));
    }

    #[test]
    fn the_resource_names_the_node() {
        let request = request(&Origin { node: "gpu-1".into(), cluster: "prod".into() }, Vec::new());
        let resource = attrs(&request.resource_metrics[0].resource.as_ref().unwrap().attributes);
        assert!(resource.contains(&("k8s.node.name".into(), "gpu-1".into())));
        assert!(resource.contains(&("k8s.cluster.name".into(), "prod".into())));
        assert!(resource.contains(&("service.name".into(), "nodelens".into())));
    }
}
