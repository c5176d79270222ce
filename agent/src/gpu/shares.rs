//! Each process's share of a GPU's SMs over a poll window, from NVML's per-process
//! utilization samples.
//!
//! The driver takes a sample every period and gives a process one only for the periods in
//! which it ran. Drivers differ in what one read returns:
//!
//! - a ring: every sample it still holds newer than the read's `lastSeenTimeStamp`. Each
//!   sample stands for one period, and a process's share of a window is its samples' SM %
//!   summed over the periods the window holds: a process that ran 6 of 30 periods at 90 % has
//!   0.18, not the 0.9 its samples average.
//! - only each process's newest sample (seen on an H200 with driver 580: one sample per
//!   process every 200 ms, and whatever `lastSeenTimeStamp` asks, one read returns one sample
//!   per process). The periods between two reads are not seen, so each sample stands for the
//!   time since the previous sample seen of its process (a process new or back from idle: since
//!   the previous read):
//!   a process's share is its sampled SM % weighted by the time each sample stands for, over
//!   the window's length.
//!
//! A driver is taken for a ring once one read returns two samples of one process.
//!
//! The NVML thread fetches samples about every second ([`ShareWindow::add`]), so a ring never
//! turns over before a poll, and a poll closes the window over everything fetched since the
//! last one ([`ShareWindow::close`]). Windows are laid on the driver's sample grid (they end on
//! the last sample instant the last read saw), so a steady process reads exactly its utilization
//! whatever the poll's phase; a sample fetched late counts in the next window, so none is lost
//! or counted twice.

use std::collections::HashMap;

/// The period assumed until two samples of one process show the driver's.
const DEFAULT_PERIOD_US: u64 = 166_667;
/// Gaps between a process's samples below this are jitter, not a period.
const MIN_PERIOD_US: u64 = 1_000;
/// Samples held between polls at most (a stalled poll must not grow memory without end).
const MAX_CARRIED: usize = 200_000;
/// A clock stepped back by more than this restarts the windows.
const CLOCK_STEP_US: u64 = 10_000_000;
/// A process's newest sample instant is forgotten this long after it.
const FORGET_US: u64 = 60_000_000;

/// One per-process utilization sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Host PID.
    pub pid: u32,
    /// The driver's timestamp, wall-clock microseconds.
    pub at_us: u64,
    /// SM utilization in the period, percent.
    pub sm_percent: u32,
}

/// A fetched sample and the time it stands for on a driver that returns only the newest.
#[derive(Debug, Clone, Copy)]
struct Held {
    sample: Sample,
    /// Since the previous sample seen of the process, or for a process not running at the
    /// previous read, since that read; `None` before a second read (one period).
    span_us: Option<u64>,
}

/// The samples of one GPU between polls and where the last window ended.
#[derive(Debug, Default)]
pub struct ShareWindow {
    /// Fetched, not yet counted in a window.
    carry: Vec<Held>,
    /// The newest timestamp fetched: what to ask the driver for samples after.
    last_seen_us: u64,
    /// Where the last window ended (a sample instant), 0 before the first.
    window_end_us: u64,
    /// The driver's sample period, once measured.
    period_us: Option<u64>,
    /// The driver returned two samples of one process in one read: it keeps a ring.
    ring: bool,
    /// Each process's newest sample instant.
    newest_of: HashMap<u32, u64>,
    /// When the samples were last fetched (wall clock), 0 before the first fetch.
    fetched_us: u64,
    /// The last window's shares: a poll that closes no whole period reads them again.
    last: HashMap<u32, f64>,
}

impl ShareWindow {
    /// The timestamp to fetch samples after (`nvmlDeviceGetProcessUtilization`'s
    /// `lastSeenTimeStamp`).
    pub fn since(&self) -> u64 {
        self.last_seen_us
    }

    /// Adds the samples fetched at `now_us` (wall clock); those not newer than the last fetch
    /// are already held.
    pub fn add(&mut self, samples: impl IntoIterator<Item = Sample>, now_us: u64) {
        let since = self.last_seen_us;
        let mut fresh: Vec<Sample> = samples.into_iter().filter(|s| s.at_us > since).collect();
        fresh.sort_unstable_by_key(|s| (s.pid, s.at_us));
        self.ring |= fresh.windows(2).any(|w| w[0].pid == w[1].pid && w[1].at_us - w[0].at_us >= MIN_PERIOD_US);
        let period = self.period_us();
        let read_before = self.fetched_us;
        for s in fresh {
            self.last_seen_us = self.last_seen_us.max(s.at_us);
            let previous = self.newest_of.insert(s.pid, s.at_us);
            let span_us = match previous {
                _ if read_before == 0 => None,
                // Running at the previous read (a sample published late included): this
                // sample stands for the periods since that one.
                Some(p) if p < s.at_us && p + 2 * period >= read_before => Some(s.at_us - p),
                // New, or back from idle: running since the previous read at most.
                _ => Some(s.at_us.saturating_sub(read_before).max(period)),
            };
            self.carry.push(Held { sample: s, span_us });
        }
        self.fetched_us = now_us;
        if self.carry.len() > MAX_CARRIED {
            let excess = self.carry.len() - MAX_CARRIED;
            self.carry.drain(..excess);
        }
    }

    /// Forgets everything: the GPU was lost, or the clock stepped back.
    pub fn reset(&mut self) {
        *self = ShareWindow { period_us: self.period_us, ring: self.ring, ..ShareWindow::default() };
    }

    /// The driver's sample period as measured so far.
    pub fn period_us(&self) -> u64 {
        self.period_us.unwrap_or(DEFAULT_PERIOD_US)
    }

    /// Closes the window at `now_us` (wall clock) and returns each sampled process's share of
    /// it; processes absent from the map had no sample: 0. A poll too soon after the last to
    /// close a whole sample period (a late poll's successor on a loaded node) gets the last
    /// window's shares again, not a window of nothing read as idle; `None` while the clock,
    /// stepped back, has not caught up with the last window: nothing is known.
    pub fn close(&mut self, now_us: u64) -> Option<HashMap<u32, f64>> {
        if now_us.saturating_add(CLOCK_STEP_US) < self.window_end_us.max(self.last_seen_us) {
            self.reset();
        }
        self.measure_period();
        let period = self.period_us();
        // Seen up to: the last read, not `now` (see below). A newest-only driver is allowed a
        // period to publish a sample (a ring's late sample counts in the next window).
        let publishing = if self.ring { 0 } else { period };
        let seen_to = self.fetched_us.min(now_us).saturating_sub(publishing);
        let newest = self.carry.iter().map(|h| h.sample.at_us).max();
        let start = match (self.window_end_us, self.carry.iter().map(|h| h.sample.at_us).min()) {
            (0, None) => {
                self.window_end_us = seen_to;
                return Some(HashMap::new());
            }
            // The first window starts with the oldest sample the driver still held.
            (0, Some(oldest)) => oldest.saturating_sub(period),
            (end, _) => end,
        };
        // End on the sample grid: the newest sample instant, plus the whole periods since that
        // the last read saw without a sample. Not up to `now`: a period after the read is not
        // seen yet; counted empty here, a newest-only driver's sample that covers it would
        // count it again in the next window.
        let anchor = newest.unwrap_or(self.window_end_us).max(start);
        let end = anchor + seen_to.saturating_sub(anchor) / period * period;
        if end <= start {
            // Less than a period since the last window: it stands. (Further back, the clock
            // stepped back less than `CLOCK_STEP_US`: nothing is known until it catches up.)
            return (seen_to + period >= start).then(|| self.last.clone());
        }
        // In periods: a ring's sample stands for one; a newest-only driver's for its span.
        let length = if self.ring { ((end - start) as f64 / period as f64).round().max(1.0) } else { (end - start) as f64 / period as f64 };
        // A sample up to two periods before the window was published late: it counts here.
        // Older ones were counted already or belong to no window.
        let stale = start.saturating_sub(2 * period);
        let ring = self.ring;
        let mut weighted: HashMap<u32, f64> = HashMap::new();
        self.carry.retain(|h| {
            let s = h.sample;
            if s.at_us > end {
                return true;
            }
            if s.at_us > stale {
                let periods = if ring { 1.0 } else { h.span_us.map_or(1.0, |span| span as f64 / period as f64) };
                *weighted.entry(s.pid).or_default() += f64::from(s.sm_percent.min(100)) * periods;
            }
            false
        });
        self.window_end_us = end;
        self.newest_of.retain(|_, at| at.saturating_add(FORGET_US) > end);
        // One division of whole numbers on a ring: 30 % over 3 periods reads 0.3 exactly.
        self.last = weighted.into_iter().map(|(pid, sum)| (pid, (sum / (100.0 * length)).min(1.0))).collect();
        Some(self.last.clone())
    }

    /// The smallest gap between two samples of one process fetched in one read, or on a
    /// driver that returns only the newest sample, in any reads (gaps between different
    /// processes' samples are phase offsets, not periods).
    fn measure_period(&mut self) {
        let mut by_pid: HashMap<u32, Vec<u64>> = HashMap::new();
        for h in &self.carry {
            by_pid.entry(h.sample.pid).or_default().push(h.sample.at_us);
        }
        let gaps = by_pid.into_values().filter_map(|mut at| {
            at.sort_unstable();
            at.windows(2).map(|w| w[1] - w[0]).filter(|g| *g >= MIN_PERIOD_US).min()
        });
        if let Some(gap) = gaps.min() {
            self.period_us = Some(self.period_us.map_or(gap, |p| p.min(gap)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 166_667;

    fn samples(pid: u32, periods: impl IntoIterator<Item = u64>, sm_percent: u32) -> Vec<Sample> {
        periods.into_iter().map(|k| Sample { pid, at_us: k * P, sm_percent }).collect()
    }

    /// Adds samples as fetched at the newest one's instant.
    fn fetch(w: &mut ShareWindow, samples: Vec<Sample>) {
        let at = samples.iter().map(|s| s.at_us).max().unwrap_or(0);
        w.add(samples, at);
    }

    fn close_to(shares: &HashMap<u32, f64>, pid: u32, expected: f64) {
        let got = shares.get(&pid).copied().unwrap_or(0.0);
        assert!((got - expected).abs() < 1e-9, "pid {pid}: {got}, expected {expected}: {shares:?}");
    }

    #[test]
    fn a_bursty_process_gets_its_time_weighted_share_not_its_samples_mean() {
        let mut w = ShareWindow::default();
        fetch(&mut w, samples(1, 990..=1000, 40));
        w.close(1000 * P + 5).unwrap();
        // 5 s = 30 periods: a steady process at 40 %, one that ran 6 periods at 90 %.
        fetch(&mut w, [samples(1, 1001..=1030, 40), samples(2, 1001..=1006, 90)].concat());
        let shares = w.close(1030 * P + 100).unwrap();
        assert_eq!(w.period_us(), P, "measured from one process's consecutive samples");
        close_to(&shares, 1, 0.4);
        close_to(&shares, 2, 0.18);
    }

    #[test]
    fn samples_fetched_every_second_cover_a_poll_window_longer_than_the_drivers_buffer() {
        // The driver keeps 6 samples (1 s); the poll window is 5 s; fetched each second.
        let mut w = ShareWindow::default();
        fetch(&mut w, samples(7, 95..=100, 100));
        w.close(100 * P).unwrap();
        for second in 0..5 {
            let last = 100 + 6 * (second + 1);
            fetch(&mut w, samples(7, last - 5..=last, 100));
        }
        close_to(&w.close(130 * P + 10).unwrap(), 7, 1.0);
    }

    #[test]
    fn idle_polls_move_the_window_so_the_first_busy_one_is_not_diluted() {
        let mut w = ShareWindow::default();
        fetch(&mut w, samples(3, 1..=10, 50));
        close_to(&w.close(10 * P).unwrap(), 3, 0.5);
        // An hour without samples, read and polled every 5 s.
        for k in 1..=720 {
            w.add([], 10 * P + k * 30 * P);
            assert!(w.close(10 * P + k * 30 * P).unwrap().is_empty());
        }
        let busy_from = 10 + 720 * 30;
        fetch(&mut w, samples(3, busy_from + 1..=busy_from + 30, 80));
        close_to(&w.close((busy_from + 30) * P + 7).unwrap(), 3, 0.8);
    }

    #[test]
    fn a_late_sample_counts_once_in_the_next_window_and_offsets_between_processes_are_not_a_period() {
        // Two processes whose samples are 3 ms apart: the period stays the driver's.
        let both = |from: u64, to: u64, sm| {
            let offset = samples(2, from..=to, sm).into_iter().map(|s| Sample { at_us: s.at_us + 3_000, ..s });
            [samples(1, from..=to, sm), offset.collect()].concat()
        };
        let mut w = ShareWindow::default();
        fetch(&mut w, both(1, 12, 50));
        close_to(&w.close(12 * P + 3_500).unwrap(), 1, 0.5);
        assert_eq!(w.period_us(), P);
        // The driver publishes the sample at 24 P only after the read at 24 P + 3.5 ms: this
        // window reads 11 of its 12 periods, the next one 13, and none is lost.
        w.add(both(13, 23, 50), 24 * P + 3_500);
        let shares = w.close(24 * P + 3_500).unwrap();
        assert!((shares[&1] - 5.5 / 12.0).abs() < 1e-9, "{shares:?}");
        fetch(&mut w, both(24, 36, 50));
        let shares = w.close(36 * P + 3_500).unwrap();
        assert!((shares[&1] - 6.5 / 12.0).abs() < 1e-9, "the late sample is counted now: {shares:?}");
        close_to(&shares, 2, 6.5 / 12.0);
    }

    #[test]
    fn a_clock_stepped_back_restarts_the_windows() {
        let mut w = ShareWindow::default();
        fetch(&mut w, samples(1, 1_000_000..=1_000_010, 60));
        w.close(1_000_010 * P).unwrap();
        fetch(&mut w, samples(1, 1..=10, 60));
        assert!(w.close(10 * P).unwrap().is_empty(), "older than the last fetch: dropped once, and the windows restart");
        fetch(&mut w, samples(1, 11..=20, 60));
        close_to(&w.close(20 * P).unwrap(), 1, 0.6);
    }

    /// A driver that samples every 200 ms and returns only each process's newest sample: a
    /// read at `at_us` of processes (pid, SM %) running steadily.
    fn read_newest(w: &mut ShareWindow, at_us: u64, running: &[(u32, u32)]) {
        read_newest_published(w, at_us, 0, running);
    }

    /// As [`read_newest`], from a driver that publishes each sample `publish_us` after its
    /// instant.
    fn read_newest_published(w: &mut ShareWindow, at_us: u64, publish_us: u64, running: &[(u32, u32)]) {
        const GRID: u64 = 200_000;
        let newest = (at_us - publish_us) / GRID * GRID;
        let fresh = running.iter().map(|&(pid, sm_percent)| Sample { pid, at_us: newest, sm_percent });
        let since = w.since();
        w.add(fresh.filter(|s| s.at_us > since).collect::<Vec<_>>(), at_us);
    }

    /// Reads every second at `phase_us` past it and at each poll, and closes a window each
    /// `poll_s` seconds at `poll_phase_us` past the second; the shares of each window.
    fn newest_only_windows(poll_s: u64, phase_us: u64, poll_phase_us: u64, running: &[(u32, u32)], polls: u64) -> Vec<HashMap<u32, f64>> {
        let mut w = ShareWindow::default();
        let t0 = 1_700_000_000_000_000;
        let mut shares = Vec::new();
        for second in 0..polls * poll_s {
            let base = t0 + second * 1_000_000;
            read_newest(&mut w, base + phase_us, running);
            if second % poll_s == poll_s - 1 {
                let poll = base + poll_phase_us;
                read_newest(&mut w, poll, running);
                shares.push(w.close(poll).unwrap());
            }
        }
        shares
    }

    #[test]
    fn a_steady_process_reads_its_utilization_on_a_driver_that_returns_only_the_newest_sample() {
        for poll_s in [2, 5] {
            for (phase, poll_phase) in
                [(10_000, 930_000), (450_000, 470_000), (990_000, 20_000), (300_000, 100_000), (500_000, 180_000), (190_000, 390_000)]
            {
                let windows = newest_only_windows(poll_s, phase, poll_phase, &[(9, 17), (10, 60)], 12);
                // The first window is the newest sample's period alone; every later one reads
                // exactly, not decaying as the smallest gap seen between reads shrinks.
                for (i, shares) in windows.iter().enumerate() {
                    let (a, b) = (shares.get(&9).copied().unwrap_or(0.0), shares.get(&10).copied().unwrap_or(0.0));
                    assert!(
                        (a - 0.17).abs() < 1e-9 && (b - 0.6).abs() < 1e-9,
                        "poll {poll_s} s, phases {phase}/{poll_phase}, window {i}: {shares:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn on_a_newest_only_driver_a_process_that_stops_reads_zero_and_one_that_resumes_is_not_counted_for_its_idle_time() {
        let mut w = ShareWindow::default();
        let t0 = 1_700_000_000_000_000;
        let poll = |w: &mut ShareWindow, from_s: u64, running: &[(u32, u32)]| {
            for second in from_s..from_s + 5 {
                read_newest(w, t0 + second * 1_000_000 + 500_000, running);
            }
            let at = t0 + (from_s + 4) * 1_000_000 + 600_000;
            read_newest(w, at, running);
            w.close(at).unwrap()
        };
        poll(&mut w, 0, &[(4, 50)]);
        close_to(&poll(&mut w, 5, &[(4, 50)]), 4, 0.5);
        assert!(poll(&mut w, 10, &[]).is_empty());
        assert!(poll(&mut w, 15, &[]).is_empty());
        // Back after 10 s idle, running from about the read before its first sample.
        let back = poll(&mut w, 20, &[(4, 50)]);
        assert!((back[&4] - 0.5).abs() < 0.5 * 0.2 / 5.0 + 1e-9, "its first sample stands for about a second, not its 10 s idle: {back:?}");
        assert!(!w.ring, "one sample per process per read: not a ring");
    }

    #[test]
    fn a_poll_that_closes_its_window_periods_after_its_read_does_not_move_a_steady_processs_share() {
        // A loaded node: the thread stalls between a poll's read and its close, past one or
        // two of the driver's 200 ms sample instants, on some polls and not others.
        let mut w = ShareWindow::default();
        let t0 = 1_700_000_000_000_000;
        for (poll, stall_us) in [0, 250_000, 0, 450_000, 10_000, 0, 210_000, 0].into_iter().enumerate() {
            let from = t0 + poll as u64 * 2_000_000;
            read_newest(&mut w, from + 300_000, &[(9, 17)]);
            read_newest(&mut w, from + 1_300_000, &[(9, 17)]);
            read_newest(&mut w, from + 1_950_000, &[(9, 17)]);
            let shares = w.close(from + 1_950_000 + stall_us).unwrap();
            if poll > 0 {
                close_to(&shares, 9, 0.17);
            }
        }
    }

    #[test]
    fn a_newest_only_drivers_sample_published_just_after_its_instant_is_not_counted_twice() {
        // Polls 1 ms or 50 ms past a sample instant; the driver publishes 3 ms after it.
        let mut w = ShareWindow::default();
        let t0 = 1_700_000_000_000_000;
        let read = |w: &mut ShareWindow, at_us: u64| read_newest_published(w, at_us, 3_000, &[(9, 17)]);
        for (poll, past_us) in [1_000, 50_000, 1_000, 1_000, 50_000, 1_000, 50_000].into_iter().enumerate() {
            let from = t0 + poll as u64 * 2_000_000;
            read(&mut w, from + 1_001_000);
            read(&mut w, from + 1_801_000);
            read(&mut w, from + 2_000_000 + past_us);
            let shares = w.close(from + 2_000_000 + past_us).unwrap();
            if poll > 0 {
                close_to(&shares, 9, 0.17);
            }
        }
    }

    #[test]
    fn a_poll_within_one_sample_period_of_the_last_reads_the_last_shares_not_idle() {
        let mut w = ShareWindow::default();
        fetch(&mut w, samples(3, 1..=6, 10));
        w.close(6 * P).unwrap();
        fetch(&mut w, samples(3, 7..=9, 10));
        // Three periods at 10 %: exactly 0.1, as a one-period window reads it.
        assert_eq!(w.close(9 * P + 100).unwrap().get(&3), Some(&0.1));
        // The next poll comes 60 ms later (its predecessor ran late): no period closed since.
        w.add([], 9 * P + 60_100);
        assert_eq!(w.close(9 * P + 60_100).unwrap().get(&3), Some(&0.1), "not 0 for a window of nothing");
        // A period with no sample is idle.
        w.add([], 11 * P + 100);
        assert!(w.close(11 * P + 100).unwrap().is_empty());
        fetch(&mut w, samples(3, 12..=14, 10));
        assert_eq!(w.close(14 * P + 100).unwrap().get(&3), Some(&0.1));
        // The clock stepped back 2 s (less than a restart of the windows): not the last shares.
        w.add([], 2 * P);
        assert_eq!(w.close(2 * P), None, "nothing known until the clock catches up");
    }

    #[test]
    fn a_ring_is_known_by_two_samples_of_one_process_in_one_read() {
        let mut w = ShareWindow::default();
        fetch(&mut w, samples(1, 1..=1, 50));
        assert!(!w.ring);
        fetch(&mut w, samples(1, 2..=3, 50));
        assert!(w.ring);
    }
}
