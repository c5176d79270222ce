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

use aho_corasick::AhoCorasick;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use regex_syntax::hir::literal::Seq;

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
    /// The literals every match of a rule starts with, looked for at once by a vectorized
    /// search: a line holding none of them matches none of those rules, found without an
    /// automaton. `None` where no rule has few, long enough such literals, or all have too many.
    literals: Option<Literals>,
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

/// Most literals kept for one rule, tried in turn until all rules' fit in [`MAX_LITERALS`]:
/// case-insensitive words are cut to the prefix whose case forms fit (`(?i)error|exception`
/// to the 16 forms of `erro` and the 16 of `exce` at 32; at 16 to `err`, also found in
/// `stderr`, and `exc`).
const LITERALS_PER_RULE: [usize; 3] = [32, 16, 8];
/// Shortest literal worth looking for: shorter ones are in most lines.
const MIN_LITERAL: usize = 3;
/// Most literals in all: what the vectorized search handles at once.
const MAX_LITERALS: usize = 64;

/// The literals every match of a rule starts with, searched for at once.
struct Literals {
    search: AhoCorasick,
    /// Rules without such literals (each rule's index): a line the search turns away may still
    /// match one of them, so it is looked at by the set where one applies.
    without: Vec<bool>,
}

impl Literals {
    /// The search for the literals of each pattern that has few enough of them (see
    /// [`cut_literals`]), as many a rule as lets all of them fit in [`MAX_LITERALS`], logging
    /// once why each other rule is left out of it. An error when no pattern has such literals
    /// or they are more than [`MAX_LITERALS`] at the fewest a rule.
    fn new<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Result<Literals, String> {
        let prefixes: Vec<(&str, Result<Seq, String>)> = patterns.into_iter().map(|p| (p, prefix_literals(p))).collect();
        let mut too_many = None;
        for per_rule in LITERALS_PER_RULE {
            let (mut all, mut without, mut left_out) = (Vec::new(), Vec::new(), Vec::new());
            for (pattern, prefixes) in &prefixes {
                match prefixes.as_ref().map_err(Clone::clone).and_then(|seq| cut_literals(pattern, seq, per_rule)) {
                    Ok(literals) => {
                        all.extend(literals);
                        without.push(false);
                    }
                    Err(why) => {
                        left_out.push(why);
                        without.push(true);
                    }
                }
            }
            all.sort();
            all.dedup();
            if all.len() > MAX_LITERALS {
                too_many = Some(format!("{} literals in all at {per_rule} a rule, more than {MAX_LITERALS}", all.len()));
                continue;
            }
            if all.is_empty() {
                return Err(match too_many {
                    Some(too_many) => format!("{too_many}, and none at {per_rule}"),
                    None => "no rule's matches start with a few literals".into(),
                });
            }
            for why in left_out {
                tracing::info!(reason = %why, "a log-metric rule is left out of the first search for literals");
            }
            if let Some(too_many) = too_many {
                tracing::info!(reason = %too_many, "log-metric rules' literals are cut to {per_rule} a rule, shorter");
            }
            // Leftmost-first: the kind the vectorized searcher serves (the standard kind,
            // reporting matches as the automaton sees them, runs it byte by byte: six times
            // slower here).
            let search =
                AhoCorasick::builder().match_kind(aho_corasick::MatchKind::LeftmostFirst).build(&all).map_err(|e| e.to_string())?;
            return Ok(Literals { search, without });
        }
        Err(too_many.unwrap_or_default())
    }

    /// Whether `message` may match one of `rules`: it holds one of the literals, or one of the
    /// rules has none.
    fn may_match(&self, rules: &[usize], message: &[u8]) -> bool {
        rules.iter().any(|&i| self.without[i]) || self.search.is_match(message)
    }
}

/// The literals every match of `pattern` starts with, as the regex engine's own prefilter
/// finds them (for each pattern alone rather than their union, which case-insensitive words
/// make too large to keep).
fn prefix_literals(pattern: &str) -> Result<Seq, String> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};
    // As `regex::bytes` parses it: any byte may be matched.
    let hir = regex_syntax::ParserBuilder::new().utf8(false).build().parse(pattern).map_err(|e| format!("pattern `{pattern}`: {e}"))?;
    Ok(Extractor::new().kind(ExtractKind::Prefix).limit_total(4096).extract(&hir))
}

/// `prefixes` (of `pattern`) cut to at most `per_rule` literals of [`MIN_LITERAL`] bytes or
/// more; an error saying why when there are no such.
fn cut_literals(pattern: &str, prefixes: &Seq, per_rule: usize) -> Result<Vec<Vec<u8>>, String> {
    let few = || format!("pattern `{pattern}`: its matches start with no {per_rule} or fewer literals of {MIN_LITERAL} bytes or more");
    let mut keep = prefixes.max_literal_len().ok_or_else(few)?;
    // A prefix of a prefix: each cut goes on from the last.
    let mut cut = prefixes.clone();
    loop {
        cut.keep_first_bytes(keep);
        cut.sort();
        cut.dedup();
        if cut.len().is_some_and(|n| n <= per_rule) {
            break;
        }
        keep = keep.checked_sub(1).filter(|&n| n >= MIN_LITERAL).ok_or_else(few)?;
    }
    let literals = cut.literals().ok_or_else(few)?;
    if literals.iter().any(|literal| literal.len() < MIN_LITERAL) {
        return Err(few());
    }
    Ok(literals.iter().map(|literal| literal.as_bytes().to_vec()).collect())
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
        // Looked for only with more than one rule (one rule is one pass of its own).
        let literals = match rules.len() {
            0 | 1 => None,
            _ => Literals::new(rules.iter().map(|r| r.pattern.as_str()))
                .inspect_err(
                    |why| tracing::info!(reason = %why, "log-metric rules are looked at without a first search for their literals"),
                )
                .ok(),
        };
        let locations = rules.iter().map(|r| r.pattern.capture_locations()).collect();
        Derived { rules, literals, prefilter, sampling: Sampling::default(), locations, families, series, counts, key: String::new() }
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
        // With more than one rule, one search for their literals and one pass of their set find
        // which can match at all.
        let first_look = self.literals.is_some() || self.prefilter.is_some();
        let matched = if first_look && rules.len() > 1 && self.sampling.filter_next() {
            if self.literals.as_ref().is_some_and(|literals| !literals.may_match(rules, message)) {
                self.sampling.saw(false);
                return;
            }
            match &self.prefilter {
                Some(set) => {
                    let matched = set.matches(message);
                    self.sampling.saw(matched.matched_any());
                    if !matched.matched_any() {
                        return;
                    }
                    Some(matched)
                }
                // The literals alone: a line holding one is a hit for the sampling.
                None => {
                    self.sampling.saw(true);
                    None
                }
            }
        } else {
            None
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
    use crate::test_numbers::Numbers;

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

    /// The exposition's lines in order, to compare families filled in different orders.
    fn sorted_exposition(families: &DerivedFamilies) -> String {
        let text = exposition(families);
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        lines.join("\n")
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
        let (a, b) = (sorted_exposition(&set_families), sorted_exposition(&plain_families));
        assert_eq!(a, b);
        assert!(a.contains(r#"name="samples""#) && a.contains(r#"name="loss""#), "{a}");
    }

    fn rule_literals(pattern: &str, per_rule: usize) -> Result<Vec<Vec<u8>>, String> {
        cut_literals(pattern, &prefix_literals(pattern)?, per_rule)
    }

    /// Patterns of the kind operators count, case-insensitive words among them.
    const RARE: [&str; 11] = [
        "(?i)error|exception",
        "out of memory|OOMKilled",
        "(?i)oomkilled",
        "loss=nan",
        "CUDA error: (?P<v>\\d+)",
        "NCCL WARN",
        "^Traceback",
        "NVRM: Xid \\(PCI:[0-9a-f:.]+\\): (?P<v>\\d+)",
        "Killed process (?P<v>\\d+)",
        "\\bsegfault at",
        "(?i)timed? ?out after (?P<v>\\d+)",
    ];

    #[test]
    fn a_line_some_rule_matches_always_passes_the_literal_prefilter() {
        let literals = Literals::new(RARE).expect("every pattern starts with a few literals");
        assert!(literals.without.iter().all(|&without| !without));
        let literals = literals.search;
        let matching = [
            "ERROR: boom",
            "an Exception was raised",
            "eRRoR",
            "CUDA error: 2",
            "torch: CUDA out of memory",
            "reason OOMKilled",
            "OOM\u{212a}ILLED (a Kelvin sign folds to k)",
            "Traceback (most recent call last):",
            "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus",
            "Killed process 4242 (python)",
            "python[7]: segfault at 0 ip",
            "Timed Out After 30s",
            "timeout after 5",
            "step=1 loss=nan",
        ];
        let set = regex::bytes::RegexSet::new(RARE).unwrap();
        for line in matching {
            assert!(set.is_match(line.as_bytes()), "the case is meant to match: {line}");
            assert!(literals.is_match(line), "{line}");
        }
        for line in ["rank=3 step=7 loss=0.25 lr=0.0003 throughput=1200 samples/s", "", "NCCL", "Killed proc", "Trace"] {
            assert!(!set.is_match(line.as_bytes()));
            assert!(!literals.is_match(line), "no rule can match it: {line}");
        }
        // Every line a rule matches, among all the cuts of the matching lines.
        for line in matching {
            for start in 0..line.len() {
                let Some(cut) = line.get(start..) else { continue };
                assert!(!set.is_match(cut.as_bytes()) || literals.is_match(cut), "{cut}");
            }
        }
    }

    /// Random patterns (case-insensitive and byte-mode groups, Unicode case folds, anchors,
    /// word boundaries, repetitions, alternations) and lines holding a witness of each, with
    /// noise around it and now and then a byte changed: whenever the pattern matches a line,
    /// the literal search finds something in it.
    #[test]
    fn no_line_a_random_pattern_matches_is_turned_away() {
        // An atom and the texts that match it (none for the assertions).
        const ATOMS: &[(&str, &[&str])] = &[
            ("a", &["a"]),
            ("k", &["k"]),
            ("s", &["s"]),
            ("(?i:k)", &["k", "K", "\u{212a}"]),
            ("(?i:s)", &["s", "S", "\u{17f}"]),
            ("(?i:ss)", &["ss", "SS", "s\u{17f}"]),
            ("é", &["é"]),
            ("(?i:é)", &["é", "É"]),
            ("(?-u:\\xFF)", &["\u{ff}"]),
            ("[ab]", &["a", "b"]),
            ("[^a]", &["b", "é"]),
            (".", &["x", "é"]),
            ("\\d", &["7"]),
            ("\\w", &["k"]),
            ("\\s", &[" "]),
            ("abc", &["abc"]),
            ("error", &["error"]),
            ("(?i:error)", &["ERROR", "eRrOr"]),
            ("\\b", &[""]),
            ("^", &[""]),
            ("$", &[""]),
            ("(?m:^)", &[""]),
            ("(?:)", &[""]),
        ];
        const NOISE: &[&str] = &["a", "b", "k", "K", "s", "é", "\u{212a}", "x", " ", "\n", "1", "E", "r"];
        fn generate(rng: &mut Numbers, depth: usize) -> (String, String) {
            if depth == 0 {
                let (atom, texts) = rng.pick(ATOMS);
                return (atom.to_string(), rng.pick(texts).to_string());
            }
            let (inner, text) = generate(rng, depth - 1);
            match rng.below(9) {
                0..=2 => {
                    let (next, next_text) = generate(rng, depth - 1);
                    (inner + &next, text + &next_text)
                }
                3 => {
                    let (other, other_text) = generate(rng, depth - 1);
                    let text = if rng.below(2) == 0 { text } else { other_text };
                    (format!("(?:{inner}|{other})"), text)
                }
                4 => {
                    let (repeat, times) = rng.pick(&[("*", 2), ("+", 1), ("?", 0), ("{2}", 2), ("{1,3}", 3), ("*?", 0), ("{12}", 12)]);
                    (format!("(?:{inner}){repeat}"), text.repeat(times))
                }
                5 => (format!("(?i:{inner})"), text),
                6 => (format!("({inner})"), text),
                _ => (inner, text),
            }
        }
        let mut rng = Numbers(0x9e37_79b9_7f4a_7c15);
        let (mut checked, mut built) = (0, 0);
        for _ in 0..3000 {
            let depth = 1 + rng.below(4);
            let (pattern, witness) = generate(&mut rng, depth);
            let (Ok(regex), Ok(literals)) = (regex::bytes::Regex::new(&pattern), Literals::new([pattern.as_str()])) else { continue };
            let literals = literals.search;
            built += 1;
            for _ in 0..10 {
                let mut line: Vec<u8> = (0..rng.below(6)).flat_map(|_| rng.pick(NOISE).as_bytes().to_vec()).collect();
                let start = line.len();
                line.extend_from_slice(witness.as_bytes());
                if rng.below(4) == 0 && line.len() > start {
                    let at = start + rng.below(line.len() - start);
                    line[at] = rng.pick(NOISE).as_bytes()[0];
                }
                line.extend((0..rng.below(6)).flat_map(|_| rng.pick(NOISE).as_bytes().to_vec()));
                if regex.is_match(&line) {
                    checked += 1;
                    assert!(literals.is_match(&line), "{pattern:?} matches {:?}", String::from_utf8_lossy(&line));
                }
            }
        }
        assert!(built > 300 && checked > 2000, "{built} patterns with literals, {checked} matching lines");
    }

    #[test]
    fn a_rule_without_literals_leaves_the_search_to_the_other_applications_rules() {
        let families = DerivedFamilies::default();
        let rules = [
            rule("{name: nccl, app: 'train*', pattern: 'NCCL WARN', type: counter}"),
            rule("{name: oom, app: 'train*', pattern: 'out of memory', type: counter}"),
            rule("{name: web_errors, app: 'web', pattern: '.*err', type: counter}"),
        ];
        let mut d = Derived::new(&rules.map(|r| r.compile().unwrap()), families.clone());
        assert_eq!(d.literals.as_ref().map(|l| l.without.clone()), Some(vec![false, false, true]));
        let (train, web) = (d.rules_for("trainer"), d.rules_for("web"));
        assert_eq!((train.len(), web.len()), (2, 1));
        let literals = d.literals.as_ref().unwrap();
        assert!(!literals.may_match(&train, b"stderr: err"), "the trainer's rules all have literals");
        assert!(literals.may_match(&[0, 2], b"stderr: err"), "with the web rule, the line goes on");
        d.observe(&train, &pod("1"), b"CUDA out of memory");
        d.observe(&train, &pod("1"), b"an err");
        d.observe(&web, &pod("2"), b"an err");
        // Through the first look: the line holds no literal, and the rule without any matches it.
        d.observe(&[0, 2], &pod("3"), b"an err");
        let text = exposition(&families);
        assert!(text.contains(r#"name="oom""#) && !text.contains(r#"name="nccl""#), "{text}");
        let web_errors: Vec<&str> =
            text.lines().filter(|l| l.starts_with("nodelens_log_metric_total{") && l.contains(r#"name="web_errors""#)).collect();
        assert_eq!(web_errors.len(), 2, "the web pod's and the third pod's line: {text}");
    }

    #[test]
    fn literals_are_kept_as_long_as_all_rules_fit_and_cut_shorter_when_they_do_not() {
        // Ten rules: 57 literals at 32 a rule, `(?i)error|exception` as `erro` and `exce`.
        let ten: Vec<&str> = RARE.iter().copied().filter(|p| *p != "(?i)oomkilled").collect();
        let literals = Literals::new(ten.iter().copied()).unwrap();
        let all: Vec<usize> = (0..ten.len()).collect();
        assert_eq!(literals.search.patterns_len(), 57);
        assert!(!literals.may_match(&all, b"stderr: over budget") && literals.may_match(&all, b"an Error"));
        // One more case-insensitive word: 81 at 32, so 16 a rule (49), `err` found in `stderr`.
        let literals = Literals::new(RARE).unwrap();
        assert_eq!(literals.search.patterns_len(), 49);
        assert!(literals.may_match(&all, b"stderr: over budget"));
        assert!(
            rule_literals("(?i)exceptional failure|(?i)kernel", 16).is_err()
                && rule_literals("(?i)exceptional failure|(?i)kernel", 32).is_ok()
        );
        // A rule that fits only at 32 a rule is left out once the others need 16.
        let literals = Literals::new(RARE.iter().copied().chain(["(?i)exceptional failure|(?i)kernel"])).unwrap();
        assert_eq!(literals.search.patterns_len(), 49);
        assert_eq!(literals.without.iter().filter(|&&w| w).count(), 1);
        assert!(literals.without[RARE.len()]);
        // More than 64 at 32 a rule and none at 16: said so.
        let why = Literals::new(["(?i)abc|(?i)def|(?i)ghi", "(?i)jkl|(?i)mno|(?i)pqr", "(?i)stu|(?i)vwx|(?i)yza"]).err();
        assert!(
            why.as_ref().is_some_and(|why| why.contains("literals in all at 32 a rule, more than 64") && why.contains("none at 16")),
            "{why:?}"
        );
        let words: Vec<String> = (0..40).map(|n| format!("(?i)w{n:02}x")).collect();
        let why = Literals::new(words.iter().map(String::as_str)).err();
        assert!(why.as_ref().is_some_and(|why| why.contains("more than 64")), "{why:?}");
    }

    #[test]
    fn rules_without_a_few_long_literals_are_left_to_the_set() {
        for pattern in [".*error", "\\d+ items", "(?i)ab", "x|error", "(?i)exceptional failure|(?i)kernel|(?i)oom killer|(?i)abort"] {
            let why = rule_literals(pattern, LITERALS_PER_RULE[0]).err();
            assert!(why.as_ref().is_some_and(|why| why.contains(pattern)), "{pattern}: {why:?}");
            let literals = Literals::new(["NCCL WARN", pattern]).unwrap();
            assert_eq!(literals.without, [false, true], "{pattern}");
            assert!(literals.may_match(&[1], b"x") && !literals.may_match(&[0], b"x") && literals.may_match(&[0], b"NCCL WARN"));
        }
        assert!(Literals::new(["NCCL WARN", "(?i)kernel panic"]).is_ok_and(|l| l.without == [false, false]));
        assert!(Literals::new([".*error"]).is_err());
        let many: Vec<String> = (0..65).map(|n| format!("word{n:02}")).collect();
        assert!(Literals::new(many.iter().map(String::as_str)).is_err_and(|why| why.contains("65 literals")));
        assert!(Literals::new([".*error", "\\d+"]).is_err_and(|why| why.contains("no rule")));
    }

    #[test]
    fn the_literal_prefilter_gives_what_the_rules_one_by_one_give() {
        let families = [DerivedFamilies::default(), DerivedFamilies::default(), DerivedFamilies::default()];
        let rules: Vec<_> = RARE
            .iter()
            .enumerate()
            .map(|(n, pattern)| {
                let value = if pattern.contains("?P<v>") { ", type: gauge, value: v" } else { ", type: counter" };
                rule(&format!("{{name: r{n}, pattern: '{pattern}'{value}}}")).compile().unwrap()
            })
            .collect();
        let mut with_literals = Derived::new(&rules, families[0].clone());
        let mut one_by_one = Derived::new(&rules, families[1].clone());
        let mut literals_alone = Derived::new(&rules, families[2].clone());
        literals_alone.prefilter = None;
        assert!(with_literals.literals.is_some() && with_literals.prefilter.is_some());
        let all_rules = with_literals.rules_for("any");
        let literals = with_literals.literals.as_ref().unwrap();
        assert!(!literals.may_match(&all_rules, b"fine") && literals.may_match(&all_rules, b"ERROR x"), "the literals turn lines away");
        (one_by_one.literals, one_by_one.prefilter) = (None, None);
        let lines = ["ERROR x", "Timed out after 12", "Killed process 77", "fine", "CUDA error: 3 and exception", "OOMkilled"];
        for (n, line) in lines.iter().cycle().take(60).enumerate() {
            let p = pod(&(n % 3).to_string());
            let all = with_literals.rules_for("any");
            with_literals.observe(&all, &p, line.as_bytes());
            one_by_one.observe(&all, &p, line.as_bytes());
            literals_alone.observe(&all, &p, line.as_bytes());
        }
        let [a, b, c] = families.each_ref().map(sorted_exposition);
        assert_eq!(a, b);
        assert_eq!(c, b);
        assert!(a.contains(r#"name="r0""#) && a.contains(r#"name="r8""#) && a.contains(r#"name="r10""#), "{a}");
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
