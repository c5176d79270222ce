//! The agent's metrics over OTLP: every `interval`, the families `/metrics` serves, as one
//! `ExportMetricsServiceRequest` (cumulative temporality, started when the agent started).
//!
//! The source is the exposition `/metrics` serves (prometheus-client's OpenMetrics text), read
//! back here, so both endpoints show the same numbers from one registry, custom collectors
//! included: a counter `nodelens_x_total` becomes the monotonic Sum `nodelens_x` (the one
//! `unknown` family, `nodelens_log_metric_total`, keeps its name), a gauge a
//! Gauge, a histogram an explicit-bucket Histogram; labels are data-point attributes (`node`
//! included, so series of different nodes stay apart wherever they are forwarded), and the
//! resource names the node. A push that fails is not retried: the next one carries the
//! cumulative values again.

use std::collections::BTreeMap;
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
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
        let (metrics, origin) = (metrics.clone(), origin.clone());
        let Ok((request, points)) = tokio::task::spawn_blocking(move || {
            let families = parse(&metrics.encode(), started, unix_nanos(SystemTime::now()));
            let points = families.iter().map(points_of).sum::<usize>();
            (request(&origin, families).encode_to_vec(), points)
        })
        .await
        else {
            return;
        };
        let count = |outcome, n: usize| {
            if n > 0 {
                counts.get_or_create(&OutcomeLabels { outcome }).inc_by(n as u64);
            }
        };
        match exporter.export(request).await {
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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One histogram series being put together from its `_bucket`, `_sum` and `_count` samples.
#[derive(Default)]
struct Buckets {
    /// Upper bound → cumulative count (`+Inf` left out: it is `_count`).
    bounds: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

/// Reads the OpenMetrics text `/metrics` serves into OTLP metrics, stamped `now`, cumulative
/// ones since `start`. Lines it cannot read are skipped (the text is our own).
pub fn parse(text: &str, start: u64, now: u64) -> Vec<Metric> {
    let mut out: Vec<Metric> = Vec::new();
    let mut help: BTreeMap<&str, &str> = BTreeMap::new();
    // The family being read: its name, kind, and histogram series in order of appearance.
    let mut family: Option<(&str, Kind)> = None;
    let mut histograms: Vec<(Vec<KeyValue>, Buckets)> = Vec::new();
    let flush = |family: Option<(&str, Kind)>, histograms: &mut Vec<(Vec<KeyValue>, Buckets)>, out: &mut Vec<Metric>| {
        if let Some((_, Kind::Histogram)) = family {
            let points = histograms.drain(..).map(|(attributes, b)| histogram_point(attributes, b, start, now)).collect();
            if let Some(metric) = out.last_mut() {
                metric.data = Some(Data::Histogram(Histogram {
                    data_points: points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                }));
            }
        }
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = rest.split_once(' ') {
                help.insert(name, text);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            flush(family.take(), &mut histograms, &mut out);
            let Some((name, kind)) = rest.split_once(' ') else { continue };
            let (otlp_name, kind) = match kind {
                "counter" => (name, Kind::Counter),
                "histogram" => (name, Kind::Histogram),
                // `nodelens_log_metric_total` is declared `unknown` because the counter family
                // name it would need is the gauges' (`nodelens_log_metric`): it stays a Sum of
                // its own name, so the two do not collide over OTLP either.
                "unknown" if name.ends_with("_total") => (name, Kind::Counter),
                _ => (name, Kind::Gauge),
            };
            let data = match kind {
                Kind::Counter => Data::Sum(Sum {
                    data_points: Vec::new(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                }),
                Kind::Gauge => Data::Gauge(Gauge { data_points: Vec::new() }),
                Kind::Histogram => Data::Histogram(Histogram::default()),
            };
            out.push(Metric {
                name: otlp_name.to_string(),
                description: help.get(name).map(|h| unescape_help(h)).unwrap_or_default(),
                unit: unit_of(otlp_name).to_string(),
                data: Some(data),
                ..Default::default()
            });
            family = Some((name, kind));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((name, labels, value)) = sample(line) else { continue };
        let Some((family_name, kind)) = family else { continue };
        match kind {
            Kind::Histogram => {
                let suffix = name.strip_prefix(family_name).unwrap_or("");
                let mut le = None;
                let attributes: Vec<KeyValue> = labels
                    .into_iter()
                    .filter_map(|(k, v)| {
                        if k == "le" {
                            le = Some(v);
                            None
                        } else {
                            Some(kv(k, &v))
                        }
                    })
                    .collect();
                let position = histograms.iter().position(|(a, _)| *a == attributes);
                let series = match position {
                    Some(i) => &mut histograms[i].1,
                    None => {
                        histograms.push((attributes, Buckets::default()));
                        &mut histograms.last_mut().expect("pushed").1
                    }
                };
                match suffix {
                    "_sum" => series.sum = value,
                    "_count" => series.count = value as u64,
                    "_bucket" => match le.as_deref().map(str::parse::<f64>) {
                        Some(Ok(bound)) if bound.is_finite() => series.bounds.push((bound, value as u64)),
                        _ => {}
                    },
                    _ => {}
                }
            }
            Kind::Counter | Kind::Gauge => {
                if name.ends_with("_created") {
                    continue;
                }
                let point = NumberDataPoint {
                    attributes: labels.into_iter().map(|(k, v)| kv(k, &v)).collect(),
                    start_time_unix_nano: if kind == Kind::Counter { start } else { 0 },
                    time_unix_nano: now,
                    value: Some(Number::AsDouble(value)),
                    ..Default::default()
                };
                match out.last_mut().and_then(|m| m.data.as_mut()) {
                    Some(Data::Sum(sum)) => sum.data_points.push(point),
                    Some(Data::Gauge(gauge)) => gauge.data_points.push(point),
                    _ => {}
                }
            }
        }
    }
    flush(family, &mut histograms, &mut out);
    // A family without series says nothing.
    out.retain(|m| points_of(m) > 0);
    out
}

fn histogram_point(attributes: Vec<KeyValue>, mut b: Buckets, start: u64, now: u64) -> HistogramDataPoint {
    b.bounds.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut counts = Vec::with_capacity(b.bounds.len() + 1);
    let mut below = 0;
    for &(_, cumulative) in &b.bounds {
        counts.push(cumulative.saturating_sub(below));
        below = cumulative;
    }
    counts.push(b.count.saturating_sub(below));
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        count: b.count,
        sum: Some(b.sum),
        bucket_counts: counts,
        explicit_bounds: b.bounds.iter().map(|(bound, _)| *bound).collect(),
        ..Default::default()
    }
}

/// A sample's labels, values unescaped.
type Labels<'a> = Vec<(&'a str, String)>;

/// `name{k="v",...} value [timestamp]` → its parts.
fn sample(line: &str) -> Option<(&str, Labels<'_>, f64)> {
    let (name, mut rest) = line.split_at(line.find(['{', ' '])?);
    let mut labels = Vec::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            inner = inner.trim_start_matches(',');
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inner.split_once("=\"")?;
            let (value, after) = quoted(after)?;
            labels.push((key, value));
            inner = after;
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

/// The text up to its closing quote, unescaped (`\\`, `\"`, `\n`), and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

fn unescape_help(text: &str) -> String {
    text.replace("\\n", "\n").replace("\\\\", "\\")
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
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();

        let metrics = parse(&text, 100, 200);
        assert_eq!(metrics.len(), 3, "{text}");
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

    #[test]
    fn an_untyped_total_is_a_sum_of_its_own_name_and_bad_lines_are_skipped() {
        let text = "# HELP nodelens_log_metric_total Sum of matches.\n# TYPE nodelens_log_metric_total unknown\n\
                    nodelens_log_metric_total{name=\"oom\",node=\"n\"} 3\nnodelens_log_metric_total{name=\"broken 7\n# EOF\n";
        let metrics = parse(text, 1, 2);
        let metric = find(&metrics, "nodelens_log_metric_total");
        let Some(Data::Sum(sum)) = &metric.data else { panic!("{metric:?}") };
        assert_eq!(sum.data_points.len(), 1);
        assert_eq!(sum.data_points[0].value, Some(Number::AsDouble(3.0)));
        assert_eq!(attrs(&sum.data_points[0].attributes), vec![("name".into(), "oom".into()), ("node".into(), "n".into())]);
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
