//! Log-derived metrics: rules that turn matching lines into series with the pod's
//! `namespace, pod, app, user` labels plus the rule's `name` — a training job's
//! `step=120 loss=0.53` becomes `nodelens_log_metric{name="loss",app="resnet",...} 0.53`.
//!
//! Gauges keep the last value (`nodelens_log_metric`); counters add the value group, or 1 per
//! match (`nodelens_log_metric_total`). Each rule is capped at `max_series`; refused series
//! are counted. Series of pods that are gone are removed.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;

use crate::config::{LogMetric as Rule, LogMetricKind};

/// Labels of a derived series: `name, namespace, pod, app, user`, then the rule's own.
pub type SeriesLabels = Vec<(String, String)>;

/// Labels of `nodelens_log_metric_series_refused_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// The rule's name.
    pub name: String,
}

/// Labels every derived series of a pod carries.
#[derive(Debug, Clone)]
pub struct PodLabels {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID (not exported; used to remove the pod's series).
    pub uid: String,
    /// Application.
    pub app: String,
    /// User.
    pub user: String,
}

/// The families behind the derived metrics, registered once.
#[derive(Clone, Default)]
pub struct DerivedFamilies {
    /// `nodelens_log_metric`.
    pub gauges: Family<SeriesLabels, Gauge<f64, AtomicU64>>,
    /// `nodelens_log_metric_total` (see [`Totals`]).
    pub totals: Family<SeriesLabels, Gauge<f64, AtomicU64>>,
    /// `nodelens_log_metric_series_refused_total`.
    pub refused: Family<RuleLabels, Counter>,
    /// The gauges by pod, for the GPU run reports' last values.
    pub by_pod: PodGauges,
}

/// Each pod's log-derived gauges by rule name: handles on the exported values, added when a
/// series is created and removed with it, so a reading costs no lookup in the families.
#[derive(Clone, Default)]
pub struct PodGauges(Arc<Mutex<HashMap<String, Vec<NamedGauge>>>>);

/// A gauge rule's name and a handle on one of its series.
type NamedGauge = (String, Gauge<f64, AtomicU64>);

impl PodGauges {
    /// The last value of each gauge rule of the pod with `uid` (one per rule name: the newest
    /// series of a rule with extra labels).
    pub fn values(&self, uid: &str) -> Vec<(String, f64)> {
        let pods = self.0.lock().unwrap();
        let mut values: Vec<(String, f64)> = Vec::new();
        for (name, gauge) in pods.get(uid).into_iter().flatten() {
            match values.iter_mut().find(|(n, _)| n == name) {
                Some(seen) => seen.1 = gauge.get(),
                None => values.push((name.clone(), gauge.get())),
            }
        }
        values
    }

    fn add(&self, uid: &str, name: &str, gauge: Gauge<f64, AtomicU64>) {
        self.0.lock().unwrap().entry(uid.to_string()).or_default().push((name.to_string(), gauge));
    }

    fn remove(&self, uid: &str) {
        self.0.lock().unwrap().remove(uid);
    }
}

/// Exposes the counters' running sums under the sample name `nodelens_log_metric_total`
/// beside the gauge family `nodelens_log_metric`. An OpenMetrics counter family of that name
/// would be `nodelens_log_metric` too, and two families may not share a name, so this one is
/// declared `unknown`: same series, values only ever grow.
#[derive(Debug)]
pub struct Totals(pub Family<SeriesLabels, Gauge<f64, AtomicU64>>);

impl Collector for Totals {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let metric = encoder.encode_descriptor(
            "log_metric_total",
            "Log-derived counters: the sum of the value group, or 1 per matching line",
            None,
            MetricType::Unknown,
        )?;
        self.0.encode(metric)
    }
}

/// One series, and a handle on its value so a match costs no label building or family lookup.
struct Series {
    labels: SeriesLabels,
    value: Gauge<f64, AtomicU64>,
}

/// A rule's series: by pod uid, then by the values of its extra labels (joined by `\0`).
type RuleSeries = HashMap<String, HashMap<String, Series>>;

/// Evaluates the rules on records; owned by the encoder stage.
pub struct Derived {
    rules: Vec<Rule>,
    /// Every rule's pattern in one set: a line no rule matches costs one scan, not one per
    /// rule. `None` where the set would be too large to build (the rules then run one by one).
    prefilter: Option<regex::bytes::RegexSet>,
    /// Whether the set pays: it is skipped while most lines match some rule anyway (a training
    /// log where every line carries the step and loss), and looked at again every so often.
    sampling: Sampling,
    /// Capture positions per rule, reused for every line.
    locations: Vec<regex::bytes::CaptureLocations>,
    families: DerivedFamilies,
    series: Vec<RuleSeries>,
    /// Series per rule, for the cap.
    counts: Vec<usize>,
    /// Scratch for the extra-label key.
    key: String,
}

/// Whether the one-pass prefilter is worth running: it costs a scan of its own, which only
/// pays while most lines match no rule.
#[derive(Debug, Default)]
struct Sampling {
    /// Lines looked at through the set in this round, and how many matched some rule.
    lines: u32,
    hits: u32,
    /// Lines to let through without the set before looking again.
    skip: u32,
}

impl Sampling {
    /// Lines per round.
    const ROUND: u32 = 256;
    /// Lines run without the set after a round where most lines matched.
    const SKIP: u32 = 4096;

    /// Whether the next line goes through the set.
    fn filter_next(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// A line went through the set; `hit` if some rule matched it.
    fn saw(&mut self, hit: bool) {
        self.lines += 1;
        self.hits += u32::from(hit);
        if self.lines == Self::ROUND {
            if self.hits * 2 > self.lines {
                self.skip = Self::SKIP;
            }
            (self.lines, self.hits) = (0, 0);
        }
    }
}

impl Derived {
    /// Evaluates `rules` (compiled by the config's validation).
    pub fn new(rules: &[Rule], families: DerivedFamilies) -> Derived {
        let rules = rules.to_vec();
        let series = rules.iter().map(|_| HashMap::new()).collect();
        let counts = vec![0; rules.len()];
        let prefilter = match regex::bytes::RegexSet::new(rules.iter().map(|r| r.pattern.as_str())) {
            Ok(set) => Some(set),
            Err(e) => {
                tracing::info!(error = %e, "log-metric rules are matched one by one (too large to match together)");
                None
            }
        };
        let locations = rules.iter().map(|r| r.pattern.capture_locations()).collect();
        Derived { rules, prefilter, sampling: Sampling::default(), locations, families, series, counts, key: String::new() }
    }

    /// Whether there are rules at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Indexes of the rules for application `app`.
    pub fn rules_for(&self, app: &str) -> Vec<usize> {
        self.rules.iter().enumerate().filter(|(_, r)| r.app.is_match(app)).map(|(i, _)| i).collect()
    }

    /// Applies `rules` (from [`Derived::rules_for`]) to one message of `pod`.
    pub fn observe(&mut self, rules: &[usize], pod: &PodLabels, message: &[u8]) {
        // With more than one rule, one pass finds which can match at all.
        let matched = match &self.prefilter {
            Some(set) if rules.len() > 1 && self.sampling.filter_next() => {
                let matched = set.matches(message);
                self.sampling.saw(matched.matched_any());
                if !matched.matched_any() {
                    return;
                }
                Some(matched)
            }
            _ => None,
        };
        for &i in rules {
            if matched.as_ref().is_some_and(|m| !m.matched(i)) {
                continue;
            }
            let rule = &self.rules[i];
            let locations = &mut self.locations[i];
            let value = if rule.value.is_none() && rule.labels.is_empty() {
                if !rule.pattern.is_match(message) {
                    continue;
                }
                1.0
            } else {
                if rule.pattern.captures_read(locations, message).is_none() {
                    continue;
                }
                match rule.value {
                    Some(group) => {
                        let text = locations.get(group).and_then(|(start, end)| std::str::from_utf8(&message[start..end]).ok());
                        match text.and_then(|t| t.parse::<f64>().ok()) {
                            Some(v) if v.is_finite() => v,
                            _ => continue,
                        }
                    }
                    None => 1.0,
                }
            };
            self.key.clear();
            for (_, group) in &rule.labels {
                let text = locations.get(*group).map_or(&b""[..], |(start, end)| &message[start..end]);
                self.key.push_str(&String::from_utf8_lossy(text));
                self.key.push('\0');
            }
            let existing = self.series[i].get(&pod.uid).and_then(|by_key| by_key.get(self.key.as_str()));
            let series = match existing {
                Some(series) => series,
                None => {
                    if self.counts[i] >= rule.max_series {
                        self.families.refused.get_or_create(&RuleLabels { name: rule.name.clone() }).inc();
                        continue;
                    }
                    let mut labels: SeriesLabels = vec![
                        ("name".into(), rule.name.clone()),
                        ("namespace".into(), pod.namespace.clone()),
                        ("pod".into(), pod.pod.clone()),
                        ("app".into(), pod.app.clone()),
                        ("user".into(), pod.user.clone()),
                    ];
                    for ((name, _), text) in rule.labels.iter().zip(self.key.split('\0')) {
                        labels.push((name.clone(), text.to_string()));
                    }
                    let family = match rule.kind {
                        LogMetricKind::Gauge => &self.families.gauges,
                        LogMetricKind::Counter => &self.families.totals,
                    };
                    let value = family.get_or_create(&labels).clone();
                    if rule.kind == LogMetricKind::Gauge {
                        self.families.by_pod.add(&pod.uid, &rule.name, value.clone());
                    }
                    self.counts[i] += 1;
                    let by_key = self.series[i].entry(pod.uid.clone()).or_default();
                    by_key.entry(self.key.clone()).or_insert(Series { labels, value })
                }
            };
            match rule.kind {
                LogMetricKind::Gauge => series.value.set(value),
                LogMetricKind::Counter => series.value.inc_by(value),
            };
        }
    }

    /// Removes the series of pods for which `alive(namespace, pod, uid)` is false.
    pub fn retain_pods(&mut self, alive: impl Fn(&str, &str, &str) -> bool) {
        for ((rule, series), count) in self.rules.iter().zip(&mut self.series).zip(&mut self.counts) {
            series.retain(|uid, by_key| {
                let labels = by_key.values().next().map(|s| s.labels.as_slice()).unwrap_or_default();
                let label = |name: &str| labels.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str());
                if alive(label("namespace"), label("pod"), uid) {
                    return true;
                }
                self.families.by_pod.remove(uid);
                for gone in by_key.values() {
                    match rule.kind {
                        LogMetricKind::Gauge => self.families.gauges.remove(&gone.labels),
                        LogMetricKind::Counter => self.families.totals.remove(&gone.labels),
                    };
                    *count -= 1;
                }
                false
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    use crate::config::LogMetricRule;

    fn rule(yaml: &str) -> LogMetricRule {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn pod(uid: &str) -> PodLabels {
        PodLabels { namespace: "ml".into(), pod: format!("resnet-{uid}"), uid: uid.into(), app: "resnet".into(), user: "alice".into() }
    }

    fn exposition(families: &DerivedFamilies) -> String {
        let mut registry = Registry::with_prefix("nodelens");
        registry.register("log_metric", "gauges", families.gauges.clone());
        registry.register_collector(Box::new(Totals(families.totals.clone())));
        registry.register("log_metric_series_refused", "refused", families.refused.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    fn training() -> (Derived, DerivedFamilies) {
        let families = DerivedFamilies::default();
        let rules = [
            rule("{name: loss, app: 'res*', pattern: 'step=(?P<step>\\d+) loss=(?P<loss>[0-9.]+)', type: gauge, value: loss}"),
            rule("{name: lr, app: '*', pattern: 'lr=(?P<lr>[0-9.e-]+)', type: gauge, value: lr}"),
            rule("{name: steps, app: '*', pattern: 'step=\\d+', type: counter}"),
            rule("{name: samples, app: '*', pattern: 'samples=(?P<n>\\d+) phase=(?P<phase>\\w+)', type: counter, value: n, labels: [phase], max_series: 2}"),
        ];
        (Derived::new(&rules.map(|r| r.compile().unwrap()), families.clone()), families)
    }

    #[test]
    fn a_training_log_becomes_the_expected_series() {
        let (mut d, families) = training();
        let rules = d.rules_for("resnet");
        assert_eq!(rules.len(), 4);
        for line in [
            "step=10 loss=0.91 lr=0.001",
            "step=20 loss=0.53 lr=0.0005",
            "samples=128 phase=train",
            "samples=64 phase=train",
            "samples=32 phase=eval",
            "nothing to see",
        ] {
            d.observe(&rules, &pod("1"), line.as_bytes());
        }
        let text = exposition(&families);
        assert!(
            text.contains(r#"nodelens_log_metric{name="loss",namespace="ml",pod="resnet-1",app="resnet",user="alice"} 0.53"#),
            "{text}"
        );
        assert!(
            text.contains(r#"nodelens_log_metric{name="lr",namespace="ml",pod="resnet-1",app="resnet",user="alice"} 0.0005"#),
            "{text}"
        );
        assert!(
            text.contains(r#"nodelens_log_metric_total{name="steps",namespace="ml",pod="resnet-1",app="resnet",user="alice"} 2.0"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"nodelens_log_metric_total{name="samples",namespace="ml",pod="resnet-1",app="resnet",user="alice",phase="train"} 192.0"#
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE nodelens_log_metric gauge") && text.contains("# TYPE nodelens_log_metric_total unknown"), "{text}");
    }

    #[test]
    fn the_series_cap_holds_and_refusals_are_counted() {
        let (mut d, families) = training();
        let rules = d.rules_for("resnet");
        for phase in ["a", "b", "c", "d"] {
            d.observe(&rules, &pod("1"), format!("samples=1 phase={phase}").as_bytes());
        }
        let text = exposition(&families);
        assert_eq!(text.lines().filter(|l| l.starts_with(r#"nodelens_log_metric_total{name="samples""#)).count(), 2, "{text}");
        assert!(text.contains(r#"nodelens_log_metric_series_refused_total{name="samples"} 2"#), "{text}");
    }

    #[test]
    fn series_of_gone_pods_are_removed() {
        let (mut d, families) = training();
        let rules = d.rules_for("resnet");
        d.observe(&rules, &pod("1"), b"step=1 loss=1.0");
        d.observe(&rules, &pod("2"), b"step=1 loss=2.0");
        d.retain_pods(|_, _, uid| uid == "2");
        let text = exposition(&families);
        assert!(!text.contains("resnet-1") && text.contains("resnet-2"), "{text}");
    }

    #[test]
    fn app_globs_select_rules_and_bad_values_are_skipped() {
        let (mut d, families) = training();
        assert_eq!(d.rules_for("web").len(), 3, "loss applies to res* only");
        d.observe(&d.rules_for("resnet"), &pod("1"), b"step=1 loss=not-a-number");
        assert!(!exposition(&families).contains(r#"name="loss""#));
    }

    #[test]
    fn the_one_pass_prefilter_gives_what_the_rules_one_by_one_give() {
        let (mut with_set, set_families) = training();
        let (mut one_by_one, plain_families) = training();
        assert!(with_set.prefilter.is_some());
        one_by_one.prefilter = None;
        let lines = [
            "step=10 loss=0.91 lr=0.001",
            "samples=12 phase=train step=3",
            "loss=0.5",
            "nothing to see",
            "lr=0.2 samples=7 phase=eval",
            "",
            "step=x loss=y",
        ];
        for app in ["resnet", "web"] {
            for (n, line) in lines.iter().enumerate() {
                let p = pod(&n.to_string());
                with_set.observe(&with_set.rules_for(app), &p, line.as_bytes());
                one_by_one.observe(&one_by_one.rules_for(app), &p, line.as_bytes());
            }
        }
        let sorted = |text: String| {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            lines.join("\n")
        };
        let (a, b) = (sorted(exposition(&set_families)), sorted(exposition(&plain_families)));
        assert_eq!(a, b);
        assert!(a.contains(r#"name="samples""#) && a.contains(r#"name="loss""#), "{a}");
    }

    #[test]
    fn the_prefilter_is_skipped_while_most_lines_match_and_looked_at_again_later() {
        let mut sampling = Sampling::default();
        for _ in 0..Sampling::ROUND {
            assert!(sampling.filter_next());
            sampling.saw(false);
        }
        assert!(sampling.filter_next(), "lines matching nothing: the set pays");
        for n in 0..Sampling::ROUND {
            assert!(sampling.filter_next());
            sampling.saw(n % 4 != 0);
        }
        let skipped = (0..Sampling::SKIP + 1).take_while(|_| !sampling.filter_next()).count();
        assert_eq!(skipped as u32, Sampling::SKIP, "three lines in four matched: skipped for a while, then tried again");
    }

    #[test]
    fn bad_rules_are_rejected_with_a_reason() {
        for (yaml, reason) in [
            ("{name: x, pattern: '(', type: counter}", "pattern"),
            ("{name: x, pattern: 'a', type: gauge}", "needs a value group"),
            ("{name: x, pattern: 'a', type: counter, value: v}", "no group named `v`"),
            ("{name: x, pattern: '(?P<app>a)', type: counter, labels: [app]}", "reserved"),
        ] {
            let err = rule(yaml).compile().unwrap_err();
            assert!(err.contains(reason), "{yaml}: {err}");
        }
    }
}
