//! Each process's share of a GPU's SMs over a poll window, from NVML's per-process
//! utilization samples.
//!
//! The driver takes a sample every period and gives a process one only for the periods in
//! which it ran; each sample stands for one period. A process's share of a window is its
//! samples' SM % summed over the periods the window holds: a process that ran 6 of 30 periods
//! at 90 % has 0.18, not the 0.9 its samples average.
//!
//! The driver keeps only its last few samples, fewer than a poll interval may hold, so the
//! NVML thread fetches them about every second ([`ShareWindow::add`]) and a poll closes the
//! window over everything fetched since the last one ([`ShareWindow::close`]). Windows are
//! laid on the driver's sample grid (they end on the last sample instant before now), so a
//! steady process reads exactly its utilization whatever the poll's phase; a sample fetched
//! late counts in the next window, so none is lost or counted twice.

use std::collections::HashMap;

/// The period assumed until two samples of one process show the driver's.
const DEFAULT_PERIOD_US: u64 = 166_667;
/// Gaps between a process's samples below this are jitter, not a period.
const MIN_PERIOD_US: u64 = 1_000;
/// Samples held between polls at most (a stalled poll must not grow memory without end).
const MAX_CARRIED: usize = 200_000;
/// A clock stepped back by more than this restarts the windows.
const CLOCK_STEP_US: u64 = 10_000_000;

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

/// The samples of one GPU between polls and where the last window ended.
#[derive(Debug, Default)]
pub struct ShareWindow {
    /// Fetched, not yet counted in a window.
    carry: Vec<Sample>,
    /// The newest timestamp fetched: what to ask the driver for samples after.
    last_seen_us: u64,
    /// Where the last window ended (a sample instant), 0 before the first.
    window_end_us: u64,
    /// The driver's sample period, once measured.
    period_us: Option<u64>,
}

impl ShareWindow {
    /// The timestamp to fetch samples after (`nvmlDeviceGetProcessUtilization`'s
    /// `lastSeenTimeStamp`).
    pub fn since(&self) -> u64 {
        self.last_seen_us
    }

    /// Adds fetched samples; those not newer than the last fetch are already held.
    pub fn add(&mut self, samples: impl IntoIterator<Item = Sample>) {
        let since = self.last_seen_us;
        for s in samples.into_iter().filter(|s| s.at_us > since) {
            self.last_seen_us = self.last_seen_us.max(s.at_us);
            self.carry.push(s);
        }
        if self.carry.len() > MAX_CARRIED {
            let excess = self.carry.len() - MAX_CARRIED;
            self.carry.drain(..excess);
        }
    }

    /// Forgets everything: the GPU was lost, or the clock stepped back.
    pub fn reset(&mut self) {
        *self = ShareWindow { period_us: self.period_us, ..ShareWindow::default() };
    }

    /// The driver's sample period as measured so far.
    pub fn period_us(&self) -> u64 {
        self.period_us.unwrap_or(DEFAULT_PERIOD_US)
    }

    /// Closes the window at `now_us` (wall clock) and returns each sampled process's share of
    /// it; processes absent from the map had no sample: 0.
    pub fn close(&mut self, now_us: u64) -> HashMap<u32, f64> {
        if now_us.saturating_add(CLOCK_STEP_US) < self.window_end_us.max(self.last_seen_us) {
            self.reset();
        }
        self.measure_period();
        let period = self.period_us();
        let newest = self.carry.iter().map(|s| s.at_us).max();
        let start = match (self.window_end_us, self.carry.iter().map(|s| s.at_us).min()) {
            (0, None) => {
                self.window_end_us = now_us;
                return HashMap::new();
            }
            // The first window starts with the oldest sample the driver still held.
            (0, Some(oldest)) => oldest.saturating_sub(period),
            (end, _) => end,
        };
        // End on the sample grid: the newest sample instant, plus the whole periods since.
        let anchor = newest.unwrap_or(self.window_end_us).max(start);
        let end = anchor + now_us.saturating_sub(anchor) / period * period;
        if end <= start {
            return HashMap::new();
        }
        let periods = ((end - start) as f64 / period as f64).round().max(1.0);
        // A sample up to two periods before the window was published late: it counts here.
        // Older ones were counted already or belong to no window.
        let stale = start.saturating_sub(2 * period);
        let mut percent: HashMap<u32, u64> = HashMap::new();
        self.carry.retain(|s| {
            if s.at_us > end {
                return true;
            }
            if s.at_us > stale {
                *percent.entry(s.pid).or_default() += u64::from(s.sm_percent.min(100));
            }
            false
        });
        self.window_end_us = end;
        percent.into_iter().map(|(pid, sum)| (pid, (sum as f64 / 100.0 / periods).min(1.0))).collect()
    }

    /// The smallest gap between two samples of one process ever seen (gaps between different
    /// processes' samples are phase offsets, not periods).
    fn measure_period(&mut self) {
        let mut by_pid: HashMap<u32, Vec<u64>> = HashMap::new();
        for s in &self.carry {
            by_pid.entry(s.pid).or_default().push(s.at_us);
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

    fn close_to(shares: &HashMap<u32, f64>, pid: u32, expected: f64) {
        let got = shares.get(&pid).copied().unwrap_or(0.0);
        assert!((got - expected).abs() < 1e-9, "pid {pid}: {got}, expected {expected}: {shares:?}");
    }

    #[test]
    fn a_bursty_process_gets_its_time_weighted_share_not_its_samples_mean() {
        let mut w = ShareWindow::default();
        w.add(samples(1, 990..=1000, 40));
        w.close(1000 * P + 5);
        // 5 s = 30 periods: a steady process at 40 %, one that ran 6 periods at 90 %.
        w.add([samples(1, 1001..=1030, 40), samples(2, 1001..=1006, 90)].concat());
        let shares = w.close(1030 * P + 100);
        assert_eq!(w.period_us(), P, "measured from one process's consecutive samples");
        close_to(&shares, 1, 0.4);
        close_to(&shares, 2, 0.18);
    }

    #[test]
    fn samples_fetched_every_second_cover_a_poll_window_longer_than_the_drivers_buffer() {
        // The driver keeps 6 samples (1 s); the poll window is 5 s; fetched each second.
        let mut w = ShareWindow::default();
        w.add(samples(7, 95..=100, 100));
        w.close(100 * P);
        for second in 0..5 {
            let last = 100 + 6 * (second + 1);
            w.add(samples(7, last - 5..=last, 100));
        }
        close_to(&w.close(130 * P + 10), 7, 1.0);
    }

    #[test]
    fn idle_polls_move_the_window_so_the_first_busy_one_is_not_diluted() {
        let mut w = ShareWindow::default();
        w.add(samples(3, 1..=10, 50));
        close_to(&w.close(10 * P), 3, 0.5);
        // An hour without samples, polled every 5 s.
        for k in 1..=720 {
            assert!(w.close(10 * P + k * 30 * P).is_empty());
        }
        let busy_from = 10 + 720 * 30;
        w.add(samples(3, busy_from + 1..=busy_from + 30, 80));
        close_to(&w.close((busy_from + 30) * P + 7), 3, 0.8);
    }

    #[test]
    fn a_late_sample_counts_once_in_the_next_window_and_offsets_between_processes_are_not_a_period() {
        // Two processes whose samples are 3 ms apart: the period stays the driver's.
        let both = |from: u64, to: u64, sm| {
            let offset = samples(2, from..=to, sm).into_iter().map(|s| Sample { at_us: s.at_us + 3_000, ..s });
            [samples(1, from..=to, sm), offset.collect()].concat()
        };
        let mut w = ShareWindow::default();
        w.add(both(1, 12, 50));
        close_to(&w.close(12 * P + 3_500), 1, 0.5);
        assert_eq!(w.period_us(), P);
        // The driver publishes the sample at 24 P only after the poll at 24 P + 3.5 ms: this
        // window reads 11 of its 12 periods, the next one 13, and none is lost.
        w.add(both(13, 23, 50));
        let shares = w.close(24 * P + 3_500);
        assert!((shares[&1] - 5.5 / 12.0).abs() < 1e-9, "{shares:?}");
        w.add(both(24, 36, 50));
        let shares = w.close(36 * P + 3_500);
        assert!((shares[&1] - 6.5 / 12.0).abs() < 1e-9, "the late sample is counted now: {shares:?}");
        close_to(&shares, 2, 6.5 / 12.0);
    }

    #[test]
    fn a_clock_stepped_back_restarts_the_windows() {
        let mut w = ShareWindow::default();
        w.add(samples(1, 1_000_000..=1_000_010, 60));
        w.close(1_000_010 * P);
        w.add(samples(1, 1..=10, 60));
        assert!(w.close(10 * P).is_empty(), "older than the last fetch: dropped once, and the windows restart");
        w.add(samples(1, 11..=20, 60));
        close_to(&w.close(20 * P), 1, 0.6);
    }
}
