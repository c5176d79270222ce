//! The read-ahead budget: bytes read from container logs and not yet committed by every sink.
//!
//! A fixed bound is wrong both ways: against an Elasticsearch that takes a few thousand
//! records a second and answers late, 4 MiB in flight is nine seconds of queue ahead of a quiet
//! container's next line; against a fast one, a small bound starves the sink. So the bound
//! follows the sinks. Each quarter second the [`Pacer`] looks at how long the chunks committed
//! took from read to commit: above [`LATENCY_TARGET`] (or, where the sink's own round trip is
//! longer, above that round trip plus [`QUEUE_TARGET`]) the bound shrinks by a quarter; while
//! reading is held at the bound below it, the bound grows by a quarter, up to
//! `logs.max_inflight_bytes`. The round trip is what chunks read with next to nothing ahead of
//! them took (a queue cannot tell itself from a slow sink otherwise); it is forgotten after a
//! minute, and a bound shrunk to its floor measures it again. While reading is held, the sinks
//! send what they have at once instead of waiting out `flush_interval` for a fuller request
//! (nothing more can come).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The smallest bound: a chunk and some, so reading never stalls on a small budget.
pub const MIN_LIMIT: u64 = 128 * 1024;

/// Read-to-commit time the bound aims under.
pub const LATENCY_TARGET: Duration = Duration::from_millis(500);

/// Queueing allowed beyond the sink's round trip, where that round trip is long.
pub const QUEUE_TARGET: Duration = Duration::from_millis(250);

/// Bytes ahead of a chunk for its read-to-commit time to count as a round trip.
pub const UNQUEUED: u64 = 64 * 1024;

/// How long a measured round trip is trusted.
const ROUND_TRIP_MEMORY: Duration = Duration::from_secs(60);

/// How often the bound is adjusted.
pub const WINDOW: Duration = Duration::from_millis(250);

/// Shared by the tailer (which reads against it), the committer (which releases bytes and
/// paces the bound) and the sinks (which send at once while reading is held).
#[derive(Debug)]
pub struct ReadBudget {
    inflight: AtomicU64,
    limit: AtomicU64,
    max: u64,
    /// Reading stopped at the bound and has not gone on since.
    held: AtomicBool,
    /// Reading stopped at the bound at some point since the pacer last looked.
    held_seen: AtomicBool,
}

impl ReadBudget {
    /// A budget bounded by at most `max` bytes, starting small (it grows within seconds
    /// where the sinks keep up).
    pub fn new(max: u64) -> ReadBudget {
        ReadBudget {
            inflight: AtomicU64::new(0),
            limit: AtomicU64::new(MIN_LIMIT.min(max)),
            max,
            held: AtomicBool::new(false),
            held_seen: AtomicBool::new(false),
        }
    }

    /// Whether reading must wait; marks reading held when it must.
    pub fn is_full(&self) -> bool {
        let full = self.inflight.load(Ordering::Acquire) >= self.limit.load(Ordering::Acquire);
        if full {
            self.held.store(true, Ordering::Release);
            self.held_seen.store(true, Ordering::Release);
        }
        full
    }

    /// Reading went on below the bound.
    pub fn reading(&self) {
        self.held.store(false, Ordering::Release);
    }

    /// Whether reading is waiting for the sinks now: what they gathered is all that can come.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// `bytes` were read and sent downstream.
    pub fn take(&self, bytes: u64) {
        self.inflight.fetch_add(bytes, Ordering::AcqRel);
    }

    /// `bytes` were committed by every sink.
    pub fn release(&self, bytes: u64) {
        self.inflight.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes read and not yet committed.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Acquire)
    }

    /// The bound now.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }
}

/// Adjusts a [`ReadBudget`]'s bound from what the committer sees, one [`WINDOW`] at a time.
#[derive(Debug, Default)]
pub struct Pacer {
    /// Bytes committed in this window, and the sum of their read-to-commit times × bytes.
    bytes: u64,
    weighted: f64,
    /// The sink's round trip: the quickest unqueued chunk, and when it was seen.
    round_trip: Option<(Duration, Instant)>,
}

impl Pacer {
    /// A chunk of `bytes` took `latency` from read to commit, with `ahead` bytes read before
    /// it and not yet committed when it was read.
    pub fn committed(&mut self, bytes: u64, latency: Duration, ahead: u64, now: Instant) {
        self.bytes += bytes;
        self.weighted += latency.as_secs_f64() * bytes as f64;
        if ahead <= UNQUEUED {
            let stale = |(rtt, at): (Duration, Instant)| latency <= rtt || now.duration_since(at) > ROUND_TRIP_MEMORY;
            if self.round_trip.is_none_or(stale) {
                self.round_trip = Some((latency, now));
            }
        }
    }

    /// Ends a window: shrinks the bound when chunks took too long, grows it when reading was
    /// held while they did not. A window in which nothing was committed changes nothing (an
    /// outage is not a measurement).
    pub fn adjust(&mut self, budget: &ReadBudget, now: Instant) {
        let held = budget.held_seen.swap(false, Ordering::AcqRel);
        let bytes = std::mem::take(&mut self.bytes);
        let weighted = std::mem::take(&mut self.weighted);
        if bytes == 0 {
            return;
        }
        let mean = Duration::from_secs_f64(weighted / bytes as f64);
        let round_trip = self.round_trip.filter(|(_, at)| now.duration_since(*at) <= ROUND_TRIP_MEMORY).map(|(rtt, _)| rtt);
        let target = LATENCY_TARGET.max(round_trip.unwrap_or_default() + QUEUE_TARGET);
        let limit = budget.limit();
        let next = if mean > target {
            (limit - limit / 4).max(MIN_LIMIT)
        } else if held {
            limit + limit / 4
        } else {
            limit
        };
        budget.limit.store(next.min(budget.max), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// A sink that takes `rate` bytes a second and answers in `rtt` with nothing queued,
    /// driven one window at a time with reading always held: what is in flight (the bound)
    /// drains in read order, the first bytes after `rtt`, the last after `rtt + bound / rate`.
    fn saturate(budget: &ReadBudget, pacer: &mut Pacer, now: &mut Instant, rate: f64, rtt: Duration, windows: usize) -> Vec<u64> {
        let mut limits = Vec::new();
        for _ in 0..windows {
            if budget.inflight() < budget.limit() {
                budget.take(budget.limit() - budget.inflight());
            }
            assert!(budget.is_full());
            let inflight = budget.inflight();
            let parts = 8;
            for k in 0..parts {
                let ahead = inflight * k / parts;
                let latency = rtt + Duration::from_secs_f64((ahead + inflight / parts) as f64 / rate);
                pacer.committed(inflight / parts, latency, ahead, *now);
            }
            budget.release(inflight);
            *now += WINDOW;
            pacer.adjust(budget, *now);
            limits.push(budget.limit());
        }
        limits
    }

    #[test]
    fn the_bound_grows_to_the_maximum_where_the_sink_keeps_up() {
        let (budget, mut pacer, mut now) = (ReadBudget::new(4 * MIB), Pacer::default(), Instant::now());
        // 100 MiB/s, 5 ms round trips: 4 MiB drain in 45 ms.
        let limits = saturate(&budget, &mut pacer, &mut now, 100.0 * MIB as f64, Duration::from_millis(5), 20);
        assert_eq!(limits[0], MIN_LIMIT + MIN_LIMIT / 4);
        assert!(limits.windows(2).all(|w| w[1] >= w[0]), "{limits:?}");
        assert_eq!(*limits.last().unwrap(), 4 * MIB, "{limits:?}");
    }

    #[test]
    fn against_a_slow_sink_the_bound_settles_where_chunks_take_about_the_target() {
        let (budget, mut pacer, mut now) = (ReadBudget::new(64 * MIB), Pacer::default(), Instant::now());
        // 1 MiB/s answered in 20 ms when idle: a second of queue is 1 MiB in flight.
        let rate = MIB as f64;
        let limits = saturate(&budget, &mut pacer, &mut now, rate, Duration::from_millis(20), 400);
        let drain = |l: u64| Duration::from_secs_f64(l as f64 / rate);
        let settled = &limits[40..];
        // Chunks take the round trip and on average a little over half the drain.
        assert!(settled.iter().all(|&l| drain(l) <= LATENCY_TARGET * 5 / 2), "{limits:?}");
        assert!(settled.iter().any(|&l| drain(l) >= LATENCY_TARGET / 2), "not pinned at the floor: {limits:?}");
    }

    #[test]
    fn a_sink_whose_round_trip_alone_exceeds_the_target_is_not_starved() {
        let (budget, mut pacer, mut now) = (ReadBudget::new(64 * MIB), Pacer::default(), Instant::now());
        // A distant cluster: 1.5 s round trips, 8 MiB/s. Half a second of queue is 4 MiB.
        let rate = 8.0 * MIB as f64;
        let limits = saturate(&budget, &mut pacer, &mut now, rate, Duration::from_millis(1500), 1000);
        let settled = &limits[100..];
        assert!(settled.iter().all(|&l| l <= 12 * MIB), "about a second of queue at most: {limits:?}");
        let mean = settled.iter().sum::<u64>() / settled.len() as u64;
        assert!(mean >= MIB, "the bound keeps well above its floor on average: {mean} ({limits:?})");
    }

    #[test]
    fn a_window_without_commits_changes_nothing_and_reading_not_held_does_not_grow_the_bound() {
        let (budget, mut pacer, now) = (ReadBudget::new(4 * MIB), Pacer::default(), Instant::now());
        budget.take(MIB);
        assert!(budget.is_full());
        pacer.adjust(&budget, now);
        assert_eq!(budget.limit(), MIN_LIMIT, "an outage measures nothing");
        budget.release(MIB);
        pacer.committed(1000, Duration::from_millis(10), 0, now);
        pacer.adjust(&budget, now);
        assert_eq!(budget.limit(), MIN_LIMIT, "the held mark went with the empty window; not held since");
        budget.take(2 * MIN_LIMIT);
        assert!(budget.is_full() && budget.is_held());
        budget.reading();
        assert!(!budget.is_held());
        pacer.committed(1000, Duration::from_millis(10), 0, now);
        pacer.adjust(&budget, now);
        assert_eq!(budget.limit(), MIN_LIMIT + MIN_LIMIT / 4, "held during the window: grows");
        pacer.committed(1000, Duration::from_secs(3), MIB, now);
        pacer.adjust(&budget, now);
        assert_eq!(budget.limit(), MIN_LIMIT, "too slow: shrinks, never below the floor");
    }
}
