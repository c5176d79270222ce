//! The read-ahead budget: bytes read from container logs and not yet committed by every sink.
//!
//! A fixed bound is wrong both ways: against an Elasticsearch that takes a few thousand
//! records a second and answers late, 4 MiB in flight is nine seconds of queue ahead of a quiet
//! container's next line; against a fast one, a small bound starves the sink. So the bound
//! follows the sinks. Each quarter second in which reading waited at the bound, the [`Pacer`]
//! looks at how long the chunks committed took from read to commit: above [`LATENCY_TARGET`]
//! (or, where the sink's own round trip is longer, above that round trip plus
//! [`QUEUE_TARGET`]) the bound shrinks by a quarter; below, it grows, up to
//! `logs.max_inflight_bytes`: by a quarter, or where chunks queued beyond the round trip for a
//! fraction of what the target leaves, by what would bring that queueing to a quarter of it
//! were it to grow with the bound, at most eightfold (from 128 KiB, a sink that keeps up gets
//! 4 MiB after two windows, not sixteen: four seconds of small requests a quarter at a time,
//! near or far). A leap waits until the bytes in flight at the last one and a quarter of its
//! bound have committed; none is taken within 30 s of chunks taking too long (the bound above
//! its floor), and after that none goes past twice the largest bound they took too long at: a
//! sink that is quick until its queue fills is found a quarter at a time, not flooded again
//! and again. Nor is one taken on chunks quicker than the round trip (it is stale: a sink that
//! got slower since). A quarter second in which reading never waited changes nothing: the
//! bound delayed nothing then (and chunks waited for `flush_interval`, not for a queue). The
//! round trip is the quickest answer to a request a sink sent while none of its others was in
//! flight, carrying a whole delivery (not split, not lost to a connection error), over the
//! last half minute, at most [`MAX_ROUND_TRIP`]. While reading waits, the sinks send without
//! waiting out `flush_interval` for a fuller request: once every chunk read is encoded and
//! with them (nothing more can come; the chunks still queued for the encoder join the request
//! they would otherwise each have made alone), or at once when a request holds its share of
//! the bound in bytes read (the bound over the sink's concurrency: the other requests carry
//! the rest, overlapping).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

/// The smallest bound (or `logs.max_inflight_bytes`, if smaller). A read step takes no more
/// than what is left of the bound (but always one line), so the bound holds.
pub const MIN_LIMIT: u64 = 128 * 1024;

/// Read-to-commit time the bound aims under.
pub const LATENCY_TARGET: Duration = Duration::from_millis(500);

/// Queueing allowed beyond the sink's round trip, where that round trip is long.
pub const QUEUE_TARGET: Duration = Duration::from_millis(250);

/// The longest round trip the bound allows for: a sink slower than that alone gets this.
pub const MAX_ROUND_TRIP: Duration = Duration::from_secs(2);

/// The least a window under the target grows the bound by.
const MIN_GROWTH: f64 = 1.25;

/// The most a window grows the bound by, however far under the target chunks were.
const MAX_GROWTH: f64 = 8.0;

/// How long after chunks last took too long the bound grows a quarter at a time only (30 s).
const CALM_WINDOWS: u64 = 120;

/// How many windows a request's round trip is remembered (30 s).
const ROUND_TRIP_WINDOWS: usize = 120;

/// How often the bound is adjusted.
pub const WINDOW: Duration = Duration::from_millis(250);

/// Shared by the tailer (which reads against it), the committer (which releases bytes and
/// paces the bound), the encoder (which tells it each chunk handed to the sinks) and the
/// sinks (which send at once while reading is held and nothing more can come soon).
#[derive(Debug)]
pub struct ReadBudget {
    inflight: AtomicU64,
    limit: AtomicU64,
    max: u64,
    /// Reading stopped at the bound and has not gone on since.
    held: AtomicBool,
    /// Reading stopped at the bound at some point since the pacer last looked.
    held_seen: AtomicBool,
    /// Chunks read whose batches are not yet with every sink (queued for the encoder, in it,
    /// or being handed over).
    encoding: AtomicU64,
    /// Woken when reading stops at the bound, and each time `encoding` comes to 0.
    held_notify: Notify,
    /// The quickest lone request the sinks reported since the pacer last looked.
    round_trip: Mutex<Option<Duration>>,
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
            encoding: AtomicU64::new(0),
            held_notify: Notify::new(),
            round_trip: Mutex::new(None),
        }
    }

    /// Whether reading must wait; marks reading held when it must.
    pub fn is_full(&self) -> bool {
        let full = self.inflight.load(Ordering::Acquire) >= self.limit.load(Ordering::Acquire);
        if full {
            self.held_seen.store(true, Ordering::Release);
            if !self.held.swap(true, Ordering::AcqRel) {
                self.held_notify.notify_waiters();
            }
        }
        full
    }

    /// Bytes left under the bound (0 when full).
    pub fn room(&self) -> u64 {
        self.limit.load(Ordering::Acquire).saturating_sub(self.inflight.load(Ordering::Acquire))
    }

    /// Waits until reading is held at the bound (returns at once if it is). For sinks
    /// gathering a request that holds its share of the bytes in flight.
    pub async fn until_held(&self) {
        self.until(Self::is_held).await;
    }

    /// Waits until reading is held at the bound and every chunk read is encoded and with the
    /// sinks (returns at once if so): what the sinks gathered is all that can come. For sinks
    /// gathering a request.
    pub async fn until_settled(&self) {
        self.until(|budget| budget.is_held() && budget.encoding() == 0).await;
    }

    /// Waits until `ready` holds, looked at again each time reading stops at the bound or the
    /// last chunk read reaches the sinks (registered before looking: no wake-up is missed).
    async fn until(&self, ready: impl Fn(&Self) -> bool) {
        loop {
            let notified = self.held_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if ready(self) {
                return;
            }
            notified.await;
        }
    }

    /// A chunk was read and goes to the encoder.
    pub fn chunk_read(&self) {
        self.encoding.fetch_add(1, Ordering::AcqRel);
    }

    /// A chunk read was encoded and its batch handed to every sink.
    pub fn chunk_encoded(&self) {
        let before = self.encoding.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        debug_assert!(before.is_ok(), "a chunk encoded that was not read");
        if before == Ok(1) {
            self.held_notify.notify_waiters();
        }
    }

    /// Chunks read and not yet with the sinks.
    pub fn encoding(&self) -> u64 {
        self.encoding.load(Ordering::Acquire)
    }

    /// A sink's request, sent while none of its others was in flight and carrying a whole
    /// delivery, was answered in `took` (retries after it not counted).
    pub fn request_took(&self, took: Duration) {
        let mut quickest = self.round_trip.lock().unwrap_or_else(|e| e.into_inner());
        *quickest = Some(quickest.map_or(took, |q| q.min(took)));
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
    /// The quickest lone request of each recent window (`None`: none went alone).
    round_trips: VecDeque<Option<Duration>>,
    /// Windows ended so far.
    windows: u64,
    /// The last window in which chunks took too long (the bound not at its floor), and the
    /// largest bound they took too long at, in that window and those before it less than
    /// [`CALM_WINDOWS`] apart.
    slow: Option<(u64, u64)>,
    /// Bytes committed since the bound last leapt, and how many must be before it may again:
    /// those in flight when it leapt, and a quarter of the new bound (read under it).
    since_leap: u64,
    leap_measured_at: u64,
}

impl Pacer {
    /// A chunk of `bytes` took `latency` from read to commit.
    pub fn committed(&mut self, bytes: u64, latency: Duration) {
        self.bytes += bytes;
        self.since_leap += bytes;
        self.weighted += latency.as_secs_f64() * bytes as f64;
    }

    /// Ends a window: while reading waited at the bound, shrinks it when chunks took too long
    /// and grows it when they did not (by more when they queued for a fraction of the target).
    /// A window without commits (an outage is not a measurement) or in which reading never
    /// waited changes nothing.
    pub fn adjust(&mut self, budget: &ReadBudget) {
        let held = budget.held_seen.swap(false, Ordering::AcqRel);
        let lone = budget.round_trip.lock().unwrap_or_else(|e| e.into_inner()).take();
        if self.round_trips.len() == ROUND_TRIP_WINDOWS {
            self.round_trips.pop_front();
        }
        self.round_trips.push_back(lone.map(|rtt| rtt.min(MAX_ROUND_TRIP)));
        self.windows += 1;
        let bytes = std::mem::take(&mut self.bytes);
        let weighted = std::mem::take(&mut self.weighted);
        if bytes == 0 || !held {
            return;
        }
        let mean = Duration::from_secs_f64(weighted / bytes as f64);
        let round_trip = self.round_trip();
        let target = LATENCY_TARGET.max(round_trip + QUEUE_TARGET);
        let limit = budget.limit();
        let step = limit + limit / 4;
        let next = if mean > target {
            // At its floor the bound is not what made chunks late.
            if limit > MIN_LIMIT.min(budget.max) {
                // The largest bound chunks were late at, while they keep being late.
                let bound = match self.slow {
                    Some((last, bound)) if self.windows - last < CALM_WINDOWS => bound.max(limit),
                    _ => limit,
                };
                self.slow = Some((self.windows, bound));
            }
            (limit - limit / 4).max(MIN_LIMIT)
        } else if self.may_leap() && mean > round_trip {
            // A chunk takes the round trip and its queueing, which grows with the bound (the
            // quickest round trip lately is the least it takes, so what is left is the most
            // the queueing can be): the step that would bring the queueing to a quarter of
            // what the target leaves it. (A mean under the round trip says the round trip
            // is stale: no leap on it.)
            let queued = (mean - round_trip).as_secs_f64();
            let toward = (target - round_trip).as_secs_f64() / (4.0 * queued);
            let most = self.slow.map_or(budget.max, |(_, bound)| budget.max.min(bound.saturating_mul(2)));
            let leap = ((limit as f64 * toward.clamp(MIN_GROWTH, MAX_GROWTH)) as u64).min(most);
            if leap > step {
                self.since_leap = 0;
                self.leap_measured_at = budget.inflight() + leap / 4;
            }
            leap.max(step)
        } else {
            step
        };
        budget.limit.store(next.min(budget.max), Ordering::Release);
    }

    /// Whether the bound may grow by more than a quarter: the bytes in flight at the last leap
    /// and a quarter of its bound (read under it) have committed (a sink's queue shows late:
    /// one leap measured before the next), and no chunks took too long for [`CALM_WINDOWS`]
    /// (a sink quick until its queue fills is found by quarters, not flooded again and again;
    /// after that, a leap goes no further than twice the largest bound they took too long at).
    fn may_leap(&self) -> bool {
        self.since_leap >= self.leap_measured_at && self.slow.is_none_or(|(slow, _)| self.windows - slow >= CALM_WINDOWS)
    }

    /// The sinks' round trip: their quickest lone request lately (zero before any).
    pub fn round_trip(&self) -> Duration {
        self.round_trips.iter().flatten().min().copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// A sink that takes `rate` bytes a second and answers a lone request in `rtt`, driven one
    /// window at a time with reading always held: what is in flight (the bound) drains in read
    /// order, the first bytes after `rtt`, the last after `rtt + bound / rate`.
    fn saturate(budget: &ReadBudget, pacer: &mut Pacer, rate: f64, rtt: Duration, windows: usize) -> Vec<u64> {
        drive(budget, pacer, windows, |_, _, bytes| rtt + Duration::from_secs_f64(bytes as f64 / rate))
    }

    /// Drives `budget` one window at a time with reading always held: what is in flight (the
    /// bound) commits in eight parts in read order, the part ending `bytes` into it taking
    /// `latency(window, inflight, bytes)`; now and then one part's worth goes out alone.
    fn drive(budget: &ReadBudget, pacer: &mut Pacer, windows: usize, latency: impl Fn(usize, u64, u64) -> Duration) -> Vec<u64> {
        let mut limits = Vec::new();
        for n in 0..windows {
            if budget.room() > 0 {
                budget.take(budget.room());
            }
            assert!(budget.is_full());
            let inflight = budget.inflight();
            let parts = 8;
            for k in 0..parts {
                pacer.committed(inflight / parts, latency(n, inflight, inflight * (k + 1) / parts));
            }
            if n % 10 == 0 {
                budget.request_took(latency(n, inflight / parts, inflight / parts));
            }
            budget.release(inflight);
            pacer.adjust(budget);
            limits.push(budget.limit());
        }
        limits
    }

    #[test]
    fn the_bound_grows_to_the_maximum_where_the_sink_keeps_up() {
        let (budget, mut pacer) = (ReadBudget::new(4 * MIB), Pacer::default());
        // 100 MiB/s, 5 ms round trips: 4 MiB drain in 45 ms.
        let limits = saturate(&budget, &mut pacer, 100.0 * MIB as f64, Duration::from_millis(5), 20);
        // Chunks take a fraction of the target: eightfold, 128 KiB to 4 MiB in two windows.
        assert_eq!(limits[..2], [8 * MIN_LIMIT, 4 * MIB], "{limits:?}");
        assert!(limits[2..].iter().all(|&l| l == 4 * MIB), "{limits:?}");
    }

    #[test]
    fn a_distant_sink_that_keeps_up_gets_the_maximum_as_quickly() {
        let (budget, mut pacer) = (ReadBudget::new(4 * MIB), Pacer::default());
        // 100 MiB/s, 100 ms round trips: chunks take 100 ms, and queue for a few.
        let limits = saturate(&budget, &mut pacer, 100.0 * MIB as f64, Duration::from_millis(100), 20);
        assert_eq!(limits[..2], [8 * MIN_LIMIT, 4 * MIB], "the round trip is not queueing: {limits:?}");
    }

    #[test]
    fn a_sink_quick_until_its_queue_fills_is_not_flooded_again_and_again() {
        // 200 MiB/s and 2 ms round trips up to 2 MiB in flight; beyond, a queue that takes
        // three seconds (an Elasticsearch whose bulk queue is full, answering late), showing
        // `lag` windows after the bound that filled it.
        let cliff = 2 * MIB;
        for lag in [0, 1, 2, 4] {
            let (budget, mut pacer) = (ReadBudget::new(64 * MIB), Pacer::default());
            let bounds = std::cell::RefCell::new(Vec::new());
            let limits = drive(&budget, &mut pacer, 400, |n, inflight, bytes| {
                let mut bounds = bounds.borrow_mut();
                if bounds.len() == n {
                    bounds.push(inflight);
                }
                let quick = Duration::from_millis(2) + Duration::from_secs_f64(bytes as f64 / (200.0 * MIB as f64));
                let filled_by = bounds[n.saturating_sub(lag)];
                if filled_by > cliff {
                    quick + Duration::from_secs(3)
                } else {
                    quick
                }
            });
            // The first leaps may overshoot (here the queue shows late whichever chunks it
            // delays; a real one delays those read past the cliff, which the next leap waits
            // for); after them, the cliff is found by quarters: at most the quarter steps
            // taken before the queue shows, past it.
            let settled = &limits[40..];
            let most = (cliff as f64 * 1.25f64.powi(lag as i32 + 1)) as u64;
            assert!(settled.iter().all(|&l| l <= most), "lag {lag}: at most {most}: {limits:?}");
            let mean = settled.iter().sum::<u64>() / settled.len() as u64;
            assert!(mean >= cliff / 2 && settled.iter().all(|&l| l >= cliff / 8), "lag {lag}: nor far below it: {limits:?}");
        }
    }

    #[test]
    fn against_a_slow_sink_the_bound_settles_where_chunks_take_about_the_target() {
        let (budget, mut pacer) = (ReadBudget::new(64 * MIB), Pacer::default());
        // 1 MiB/s answered in 20 ms when idle: half a second of queue is 512 KiB in flight.
        let rate = MIB as f64;
        let limits = saturate(&budget, &mut pacer, rate, Duration::from_millis(20), 400);
        let drain = |l: u64| Duration::from_secs_f64(l as f64 / rate);
        let settled = &limits[40..];
        // Chunks take the round trip and on average a little over half the drain.
        assert!(settled.iter().all(|&l| drain(l) <= LATENCY_TARGET * 5 / 2), "{limits:?}");
        assert!(settled.iter().any(|&l| drain(l) >= LATENCY_TARGET / 2), "not pinned at the floor: {limits:?}");
    }

    #[test]
    fn a_sink_whose_round_trip_alone_exceeds_the_target_is_not_starved() {
        let (budget, mut pacer) = (ReadBudget::new(64 * MIB), Pacer::default());
        // A distant cluster: 1.5 s round trips, 8 MiB/s. A quarter second of queue is 2 MiB.
        let rate = 8.0 * MIB as f64;
        let limits = saturate(&budget, &mut pacer, rate, Duration::from_millis(1500), 1000);
        let settled = &limits[100..];
        assert!(settled.iter().all(|&l| l <= 6 * MIB), "about half a second of queue at most: {limits:?}");
        let mean = settled.iter().sum::<u64>() / settled.len() as u64;
        assert!(mean >= MIB, "the bound keeps well above its floor on average: {mean} ({limits:?})");
    }

    #[test]
    fn outages_flush_waits_and_unheld_windows_do_not_move_the_bound() {
        let (budget, mut pacer) = (ReadBudget::new(4 * MIB), Pacer::default());
        budget.take(MIB);
        assert!(budget.is_full());
        pacer.adjust(&budget);
        assert_eq!(budget.limit(), MIN_LIMIT, "an outage measures nothing");
        budget.release(MIB);
        // Reading never waited: chunks that waited a second for the flush interval say nothing.
        pacer.committed(1000, Duration::from_secs(1));
        pacer.adjust(&budget);
        assert_eq!(budget.limit(), MIN_LIMIT, "the held mark went with the empty window; not held since");
        budget.take(2 * MIN_LIMIT);
        assert!(budget.is_full() && budget.is_held());
        budget.reading();
        assert!(!budget.is_held());
        pacer.committed(1000, Duration::from_millis(10));
        pacer.adjust(&budget);
        assert_eq!(budget.limit(), 8 * MIN_LIMIT, "held during the window, far under the target: eightfold");
        // A request stuck through a five-minute outage counts as the longest round trip allowed.
        budget.request_took(Duration::from_secs(300));
        budget.take(budget.room());
        assert!(budget.is_full());
        pacer.committed(1000, Duration::from_secs(3));
        pacer.adjust(&budget);
        assert_eq!(pacer.round_trip(), MAX_ROUND_TRIP);
        assert_eq!(budget.limit(), 6 * MIN_LIMIT, "too slow even for a 2 s round trip: shrinks by a quarter");
        for _ in 0..12 {
            assert!(budget.is_full());
            pacer.committed(1000, Duration::from_secs(3));
            pacer.adjust(&budget);
        }
        assert_eq!(budget.limit(), MIN_LIMIT, "never below the floor");
    }

    #[test]
    fn a_leap_waits_until_the_last_is_measured_and_for_calm_after_chunks_took_too_long() {
        let (budget, mut pacer) = (ReadBudget::new(64 * MIB), Pacer::default());
        // One window with reading held: `bytes` commit having taken `latency`.
        let window = |pacer: &mut Pacer, bytes: u64, latency: Duration| {
            budget.take(budget.room());
            assert!(budget.is_full());
            pacer.committed(bytes, latency);
            budget.release(bytes.min(budget.inflight()));
            pacer.adjust(&budget);
            budget.limit()
        };
        let quick = Duration::from_millis(10);
        assert_eq!(window(&mut pacer, 1000, quick), 8 * MIN_LIMIT, "far under the target: eightfold");
        assert_eq!(window(&mut pacer, 1000, quick), 10 * MIN_LIMIT, "nothing read under the leap is in yet: a quarter");
        let all = budget.limit();
        assert_eq!(window(&mut pacer, all, LATENCY_TARGET / 8), 20 * MIN_LIMIT, "measured; an eighth of the target: twofold");
        assert_eq!(window(&mut pacer, all, LATENCY_TARGET * 3 / 4), 25 * MIN_LIMIT, "near the target: a quarter");
        assert_eq!(window(&mut pacer, 1000, LATENCY_TARGET * 2), 25 * MIN_LIMIT * 3 / 4, "too long: shrinks by a quarter");
        assert_eq!(window(&mut pacer, 1000, LATENCY_TARGET * 2), 25 * MIN_LIMIT * 9 / 16, "and again");
        let after_slow = window(&mut pacer, 64 * MIB, quick);
        assert_eq!(after_slow, 25 * MIN_LIMIT * 9 / 16 * 5 / 4, "soon after chunks took too long: a quarter");
        // Windows in which reading never waited pass the time and change nothing.
        for _ in 0..CALM_WINDOWS - 3 {
            pacer.adjust(&budget);
        }
        assert_eq!(budget.limit(), after_slow);
        assert_eq!(window(&mut pacer, 64 * MIB, quick), after_slow * 5 / 4, "29.75 s after: still a quarter");
        assert_eq!(
            window(&mut pacer, 64 * MIB, quick),
            2 * 25 * MIN_LIMIT,
            "30 s after: leaps, to twice the largest bound found too large at most"
        );
        assert_eq!(window(&mut pacer, 64 * MIB, quick), 2 * 25 * MIN_LIMIT * 5 / 4, "then grows by quarters past it");
    }

    #[test]
    fn chunks_late_with_the_bound_at_its_floor_do_not_hold_leaps_back() {
        let (budget, mut pacer) = (ReadBudget::new(4 * MIB), Pacer::default());
        // A cold connection, or a first request that creates the index: late, the bound at
        // its floor.
        budget.take(MIN_LIMIT);
        assert!(budget.is_full());
        pacer.committed(MIN_LIMIT, Duration::from_secs(2));
        budget.release(MIN_LIMIT);
        pacer.adjust(&budget);
        assert_eq!(budget.limit(), MIN_LIMIT);
        budget.take(MIN_LIMIT);
        assert!(budget.is_full());
        pacer.committed(MIN_LIMIT, Duration::from_millis(10));
        pacer.adjust(&budget);
        assert_eq!(budget.limit(), 8 * MIN_LIMIT, "the floor was not too large: a leap");
    }

    #[test]
    fn a_stale_round_trip_gives_no_leap_and_ages_out_after_thirty_seconds() {
        let (budget, mut pacer) = (ReadBudget::new(64 * MIB), Pacer::default());
        // The sink answered a lone request in a second when it was slow; chunks now take 300 ms.
        budget.request_took(Duration::from_secs(1));
        budget.take(MIN_LIMIT);
        assert!(budget.is_full());
        pacer.committed(MIN_LIMIT, Duration::from_millis(300));
        pacer.adjust(&budget);
        assert_eq!(pacer.round_trip(), Duration::from_secs(1));
        assert_eq!(budget.limit(), MIN_LIMIT + MIN_LIMIT / 4, "chunks quicker than the round trip: no leap on it");
        for _ in 0..ROUND_TRIP_WINDOWS - 1 {
            pacer.adjust(&budget);
        }
        assert_eq!(pacer.round_trip(), Duration::from_secs(1), "remembered for 120 windows");
        pacer.adjust(&budget);
        assert_eq!(pacer.round_trip(), Duration::ZERO, "windows without a lone request age it out");
    }

    #[tokio::test]
    async fn gathering_sinks_are_woken_when_reading_is_held_and_every_chunk_read_is_encoded() {
        let budget = std::sync::Arc::new(ReadBudget::new(MIB));
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.until_settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        budget.take(MIB);
        assert!(budget.is_full());
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").unwrap();
        // Already held: at once.
        tokio::time::timeout(Duration::from_millis(100), budget.until_settled()).await.expect("at once");
        // Held with a chunk read and not yet encoded: its batch is still to come.
        budget.chunk_read();
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.until_settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a chunk is being encoded");
        budget.chunk_encoded();
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken once it is encoded").unwrap();
        assert_eq!(budget.encoding(), 0);
        assert_eq!(budget.room(), 0);
    }
}
