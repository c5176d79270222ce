//! Per-container rate limits (`logs.rate_limit.records_per_second`, a pod's
//! `nodelens.io/rate-limit` annotation over it): a token bucket per container the tailer
//! reads against. A container over its limit is read later, not dropped: its excess waits in
//! its files, as it would behind a slow sink, and the records that waited are counted.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;

use crate::identity::path::ContainerRef;
use crate::kube::store::PodStore;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// The pod annotation that sets its containers' limit (records per second; `0` = none).
pub const ANNOTATION: &str = "nodelens.io/rate-limit";

/// The most records a container may read at once after being quiet.
pub const MAX_BURST: u32 = 1000;

/// A token bucket of records.
#[derive(Debug, Clone)]
pub struct RateLimit {
    per_second: u32,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// The last read was cut short by the limit: the records read next waited for it.
    throttled: bool,
}

/// What one read may take under a limit.
#[derive(Debug, PartialEq, Eq)]
pub enum Allowance {
    /// Read up to this many records.
    Records(usize),
    /// Read nothing before this moment.
    WaitUntil(Instant),
}

impl RateLimit {
    /// `per_second` records a second (at least 1), with a burst of as many, at most [`MAX_BURST`].
    pub fn new(per_second: u32, now: Instant) -> RateLimit {
        let per_second = per_second.max(1);
        let burst = f64::from(per_second.min(MAX_BURST));
        RateLimit { per_second, burst, tokens: burst, last: now, throttled: false }
    }

    /// Records a second.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// How much the next read may take. Reads wait for a twentieth of a second's worth (or
    /// the burst, if smaller) so that a throttled container is read in steps, not a record at
    /// a time.
    pub fn allowance(&mut self, now: Instant) -> Allowance {
        self.refill(now);
        let step = (f64::from(self.per_second) / 20.0).clamp(1.0, self.burst);
        if self.tokens >= step {
            return Allowance::Records(self.tokens as usize);
        }
        let wait = (step - self.tokens) / f64::from(self.per_second);
        Allowance::WaitUntil(now + Duration::from_secs_f64(wait))
    }

    /// A read allowed `allowed` records took `records`: returns how many of them waited for
    /// the limit (all of them when the read before was cut short by it).
    pub fn took(&mut self, allowed: usize, records: usize, cut_short: bool) -> usize {
        self.tokens = (self.tokens - records as f64).max(0.0);
        let waited = if self.throttled { records } else { 0 };
        self.throttled = cut_short && records >= allowed;
        waited
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(self.per_second)).min(self.burst);
        self.last = now;
    }
}

/// The limit of a pod's containers: its annotation when it has a valid one, else the default
/// (`0` = none). An invalid annotation is reported to `invalid` and the default applies.
pub fn for_pod(default: u32, annotation: Option<&str>, invalid: impl FnOnce(&str)) -> u32 {
    match annotation.map(str::trim) {
        None => default,
        Some(value) => value.parse::<u32>().unwrap_or_else(|_| {
            invalid(value);
            default
        }),
    }
}

/// Labels of `nodelens_log_records_throttled_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThrottleLabels {
    /// The pod's namespace.
    pub namespace: String,
    /// Its application.
    pub app: String,
}

/// The rate limit of a container: its pod's `nodelens.io/rate-limit` annotation, else the
/// default. An invalid annotation is logged once per pod (`warned` remembers it).
pub fn rate_limit_of(default: u32, pods: Option<&PodStore>, r: &ContainerRef, warned: &mut HashSet<String>) -> u32 {
    let pod = pods.and_then(|p| p.get(&r.pod_uid));
    let annotation = pod.as_ref().and_then(|p| p.annotations.get(ANNOTATION)).map(String::as_str);
    for_pod(default, annotation, |value| {
        if warned.len() >= 10_000 {
            warned.clear();
        }
        if warned.insert(r.pod_uid.clone()) {
            tracing::warn!(namespace = %r.namespace, pod = %r.pod, value, "{} is not a number of records per second; the default limit applies", ANNOTATION);
        }
    })
}

/// Counts records that waited for their container's rate limit.
pub fn count_throttled(throttled: &Family<ThrottleLabels, Counter>, pods: Option<&PodStore>, r: &ContainerRef, records: usize) {
    let app = pods
        .and_then(|p| p.get(&r.pod_uid))
        .map_or_else(|| crate::identity::resolve::app_from_pod_name(&r.pod).to_string(), |p| p.app.clone());
    throttled.get_or_create(&ThrottleLabels { namespace: r.namespace.clone(), app }).inc_by(records as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(a: Allowance) -> usize {
        match a {
            Allowance::Records(n) => n,
            Allowance::WaitUntil(at) => panic!("waits until {at:?}"),
        }
    }

    #[test]
    fn a_burst_then_the_rate_and_the_wait_for_the_next_step() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(100, t0);
        assert_eq!(records(limit.allowance(t0)), 100, "a full bucket: the burst");
        assert_eq!(limit.took(100, 100, true), 0, "the first cut read waited for nothing");
        // Empty: the next step is 5 records, 50 ms away.
        assert_eq!(limit.allowance(t0), Allowance::WaitUntil(t0 + Duration::from_millis(50)));
        let t1 = t0 + Duration::from_millis(50);
        assert_eq!(records(limit.allowance(t1)), 5);
        assert_eq!(limit.took(5, 5, true), 5, "read after a cut: they waited");
        // One second later, 100 more, never more than the burst.
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(records(limit.allowance(t2)), 100);
        assert_eq!(limit.took(100, 40, false), 40, "the read before was cut: these waited too");
        assert_eq!(limit.took(60, 10, false), 0, "caught up: nothing waits");
    }

    #[test]
    fn the_burst_is_at_most_a_thousand_records() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(50_000, t0);
        assert_eq!(records(limit.allowance(t0 + Duration::from_secs(60))), 1000);
        let mut slow = RateLimit::new(0, t0);
        assert_eq!(slow.per_second(), 1, "at least one record a second");
        assert_eq!(records(slow.allowance(t0)), 1);
    }

    #[test]
    fn a_pod_annotation_overrides_the_default_and_a_bad_one_is_reported() {
        assert_eq!(for_pod(500, None, |_| panic!()), 500);
        assert_eq!(for_pod(500, Some(" 20 "), |_| panic!()), 20);
        assert_eq!(for_pod(500, Some("0"), |_| panic!()), 0, "0 lifts the limit for the pod");
        let mut seen = None;
        assert_eq!(for_pod(500, Some("fast"), |v| seen = Some(v.to_string())), 500);
        assert_eq!(seen.as_deref(), Some("fast"));
    }
}
