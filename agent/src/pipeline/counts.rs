//! Counts of the records read: `nodelens_log_records_total{namespace,app,stream,level}`,
//! `nodelens_log_bytes_total{namespace,app}` and `nodelens_log_records_flagged_total{flag}`.
//!
//! An application's series go once none of its pods has been alive for [`APP_SERIES_IDLE`],
//! so pods that come and go (Jobs, CronJobs, workflow steps) do not add series forever.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::identity::path::ContainerRef;
use crate::logs::chunk::{Chunk, Flags, StreamKind};
use crate::logs::level::Level;
use crate::logs::limit::ThrottleLabels;

/// How long an application's series stay after the last of its pods is gone. Longer than a
/// scrape interval and a rate window, so its last increments are seen.
pub const APP_SERIES_IDLE: Duration = Duration::from_secs(600);

/// Labels of `nodelens_log_records_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    /// Pod namespace.
    pub namespace: String,
    /// Application (`service.name`).
    pub app: String,
    /// stdout or stderr.
    pub stream: &'static str,
    /// `log.level`, or `unknown`.
    pub level: &'static str,
}

/// Labels of `nodelens_log_bytes_total`, and the application a container's records count for.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    /// Pod namespace.
    pub namespace: String,
    /// Application.
    pub app: String,
}

/// The flags of `nodelens_log_records_flagged_total`, set before the encoder.
const COUNTED_FLAGS: [(Flags, &str); 4] = [
    (Flags::TRUNCATED, "truncated"),
    (Flags::PARTIAL, "partial"),
    (Flags::MALFORMED, "malformed"),
    (Flags::BAD_TIMESTAMP, "bad_timestamp"),
];

/// Labels of `nodelens_log_records_flagged_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlagLabels {
    /// `truncated`, `partial` or `malformed`.
    pub flag: &'static str,
}

/// The families behind the counts, registered once.
#[derive(Clone, Default)]
pub struct CountFamilies {
    /// `nodelens_log_records_total`.
    pub records: Family<RecordLabels, Counter>,
    /// `nodelens_log_bytes_total`: message bytes.
    pub bytes: Family<AppLabels, Counter>,
    /// `nodelens_log_records_flagged_total`: records shipped truncated, partial, malformed or with a bad timestamp.
    pub flagged: Family<FlagLabels, Counter>,
    /// The tailer's `nodelens_log_records_throttled_total` (the same family), whose
    /// per-application series go with the others'.
    pub throttled: Family<ThrottleLabels, Counter>,
}

/// An application's pods, to tell when it is gone.
struct App {
    /// By pod uid: a container of the pod, whose pod directory tells whether it is alive.
    pods: HashMap<String, ContainerRef>,
    /// When a pod of it was last seen alive.
    alive_at: Instant,
}

/// Counts records per application; owned by the encoder stage.
pub struct Counts {
    families: CountFamilies,
    apps: HashMap<AppLabels, App>,
}

const STREAMS: [&str; 2] = ["stdout", "stderr"];
const LEVELS: usize = Level::ALL.len() + 1;

fn level_name(i: usize) -> &'static str {
    Level::ALL.get(i).map_or("unknown", |l| l.as_str())
}

impl Counts {
    /// Counts into `families`.
    pub fn new(families: CountFamilies) -> Counts {
        Counts { families, apps: HashMap::new() }
    }

    /// Counts the records of `chunk` (read from `container`, of application `app`, with the
    /// levels detected in them) at `now`.
    pub fn count(&mut self, app: &AppLabels, container: &ContainerRef, chunk: &Chunk, levels: &[Option<Level>], now: Instant) {
        if chunk.records.is_empty() {
            return;
        }
        self.track(app, container, now);
        let mut records = [[0u64; LEVELS]; 2];
        let mut bytes = 0u64;
        let mut flagged = [0u64; COUNTED_FLAGS.len()];
        for (record, level) in chunk.records.iter().zip(levels) {
            let stream = usize::from(record.stream == StreamKind::Stderr);
            let level = level.map_or(Level::ALL.len(), |l| Level::ALL.iter().position(|x| *x == l).expect("listed"));
            records[stream][level] += 1;
            bytes += u64::from(record.message.end - record.message.start);
            for (i, (flag, _)) in COUNTED_FLAGS.into_iter().enumerate() {
                flagged[i] += u64::from(record.flags.contains(flag));
            }
        }
        for (stream, per_level) in STREAMS.into_iter().zip(records) {
            for (i, n) in per_level.into_iter().enumerate() {
                if n > 0 {
                    let key = RecordLabels { namespace: app.namespace.clone(), app: app.app.clone(), stream, level: level_name(i) };
                    self.families.records.get_or_create(&key).inc_by(n);
                }
            }
        }
        self.families.bytes.get_or_create(app).inc_by(bytes);
        for ((_, flag), n) in COUNTED_FLAGS.into_iter().zip(flagged) {
            if n > 0 {
                self.families.flagged.get_or_create(&FlagLabels { flag }).inc_by(n);
            }
        }
    }

    /// Every series counted gets here first, so none outlives its application unseen.
    fn track(&mut self, app: &AppLabels, container: &ContainerRef, now: Instant) {
        let entry = match self.apps.get_mut(app) {
            Some(entry) => entry,
            None => self.apps.entry(app.clone()).or_insert(App { pods: HashMap::new(), alive_at: now }),
        };
        entry.alive_at = now;
        if !entry.pods.contains_key(&container.pod_uid) {
            entry.pods.insert(container.pod_uid.clone(), container.clone());
        }
    }

    /// Forgets the pods for which `alive` is false, and removes the series of applications
    /// without a live pod since [`APP_SERIES_IDLE`] before `now`.
    pub fn sweep(&mut self, now: Instant, alive: impl Fn(&ContainerRef) -> bool) {
        let families = &self.families;
        self.apps.retain(|labels, app| {
            app.pods.retain(|_, container| alive(container));
            if !app.pods.is_empty() {
                app.alive_at = now;
                return true;
            }
            if now.saturating_duration_since(app.alive_at) < APP_SERIES_IDLE {
                return true;
            }
            for stream in STREAMS {
                for level in (0..LEVELS).map(level_name) {
                    families.records.remove(&RecordLabels { namespace: labels.namespace.clone(), app: labels.app.clone(), stream, level });
                }
            }
            families.bytes.remove(labels);
            families.throttled.remove(&ThrottleLabels { namespace: labels.namespace.clone(), app: labels.app.clone() });
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::logs::chunk::Record;
    use crate::logs::source::Source;

    fn container(pod: &str) -> ContainerRef {
        ContainerRef { namespace: "ml".into(), pod: pod.into(), pod_uid: format!("uid-{pod}"), container: "main".into(), restart: 0 }
    }

    fn app(name: &str) -> AppLabels {
        AppLabels { namespace: "ml".into(), app: name.into() }
    }

    fn chunk(lines: &[(&str, StreamKind)]) -> Chunk {
        let mut chunk = Chunk::new(Arc::new(Source::for_tests()));
        for (i, (line, stream)) in lines.iter().enumerate() {
            let timestamp = chunk.push_bytes(b"2024-01-01T00:00:00Z");
            let message = chunk.push_bytes(line.as_bytes());
            chunk.records.push(Record { timestamp, message, stream: *stream, offset: i as u64 * 100, flags: Flags::default() });
        }
        chunk
    }

    /// The exposition's series lines of `nodelens_log_records_total` and `nodelens_log_bytes_total`
    /// for application `app`.
    fn series(families: &CountFamilies, app: &str) -> usize {
        let mut registry = Registry::with_prefix("nodelens");
        registry.register("log_records", "", families.records.clone());
        registry.register("log_bytes", "", families.bytes.clone());
        registry.register("log_records_throttled", "", families.throttled.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines().filter(|l| !l.starts_with('#') && l.contains(&format!("app=\"{app}\""))).count()
    }

    #[test]
    fn records_are_counted_by_stream_level_and_bytes() {
        let families = CountFamilies::default();
        let mut counts = Counts::new(families.clone());
        let lines = chunk(&[("a", StreamKind::Stdout), ("bb", StreamKind::Stderr), ("ccc", StreamKind::Stderr)]);
        counts.count(&app("web"), &container("web-0"), &lines, &[None, Some(Level::Error), Some(Level::Error)], Instant::now());
        let record = |stream, level| RecordLabels { namespace: "ml".into(), app: "web".into(), stream, level };
        assert_eq!(families.records.get_or_create(&record("stdout", "unknown")).get(), 1);
        assert_eq!(families.records.get_or_create(&record("stderr", "error")).get(), 2);
        assert_eq!(families.bytes.get_or_create(&app("web")).get(), 6);
    }

    #[test]
    fn series_of_an_application_gone_ten_minutes_are_removed_and_live_ones_stay() {
        let families = CountFamilies::default();
        let mut counts = Counts::new(families.clone());
        let t0 = Instant::now();
        let lines = chunk(&[("done", StreamKind::Stdout), ("oops", StreamKind::Stderr)]);
        counts.count(&app("nightly"), &container("nightly-29100480-x2k4p"), &lines, &[None, Some(Level::Error)], t0);
        counts.count(&app("web"), &container("web-0"), &lines, &[None, None], t0);
        families.throttled.get_or_create(&ThrottleLabels { namespace: "ml".into(), app: "nightly".into() }).inc();
        assert_eq!((series(&families, "nightly"), series(&families, "web")), (4, 3));

        let web_only = |c: &ContainerRef| c.pod == "web-0";
        counts.sweep(t0 + Duration::from_secs(60), web_only);
        assert_eq!(series(&families, "nightly"), 4, "kept a while after its pod is gone");
        counts.sweep(t0 + Duration::from_secs(60) + APP_SERIES_IDLE, web_only);
        assert_eq!(series(&families, "nightly"), 0, "removed once gone for APP_SERIES_IDLE");
        assert_eq!(series(&families, "web"), 3, "a live application keeps its series");
        counts.sweep(t0 + APP_SERIES_IDLE * 10, web_only);
        assert_eq!(series(&families, "web"), 3, "however long it lives without logging");
    }

    #[test]
    fn an_application_with_a_new_pod_keeps_its_series() {
        let families = CountFamilies::default();
        let mut counts = Counts::new(families.clone());
        let t0 = Instant::now();
        let lines = chunk(&[("run", StreamKind::Stdout)]);
        counts.count(&app("nightly"), &container("nightly-1-aaaaa"), &lines, &[None], t0);
        counts.sweep(t0 + Duration::from_secs(60), |_| false);
        // The next run's pod logs before the first run's series would expire.
        counts.count(&app("nightly"), &container("nightly-2-bbbbb"), &lines, &[None], t0 + Duration::from_secs(120));
        counts.sweep(t0 + APP_SERIES_IDLE + Duration::from_secs(60), |c| c.pod == "nightly-2-bbbbb");
        assert_eq!(series(&families, "nightly"), 2);
        assert_eq!(
            families
                .records
                .get_or_create(&RecordLabels { namespace: "ml".into(), app: "nightly".into(), stream: "stdout", level: "unknown" })
                .get(),
            2,
            "one series for both runs"
        );
    }
}
