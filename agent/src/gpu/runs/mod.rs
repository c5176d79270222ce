//! GPU run reports: for every container the kubelet gave a GPU (or a share of one), totals
//! kept poll by poll while it runs — GPU-seconds by share, utilization, memory, energy, XIDs,
//! throttling — and one [`Report`] when it ends (its status says terminated, or its pod is
//! gone), handed to the log sinks and counted in `nodelens_gpu_run_seconds_total`.
//!
//! Exactly once per container: the totals, the reports not yet acknowledged by every sink and
//! the containers reported live in `state_dir` ([`state`]), so an agent restart continues a
//! run's totals, sends an unacknowledged report again, and never reports a container twice.

pub mod report;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::export::GpuView;
use super::reading::{GpuGauge, GpuReading, Reading};
use crate::kube::meta::{ContainerMeta, Exit, PodMeta};
use crate::kube::store::PodStore;
use crate::logs::derived::PodGauges;
use report::{Report, Who};
use state::{PollAdded, Run, State, StateFile};

/// Labels of `nodelens_gpu_run_seconds_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    /// Namespace.
    pub namespace: String,
    /// Application.
    pub app: String,
    /// User.
    pub user: String,
    /// One of [`report::OUTCOMES`].
    pub outcome: &'static str,
}

/// `nodelens_gpu_run_seconds_total`: GPU-seconds of ended runs.
pub type RunSeconds = Family<RunLabels, Counter<f64, AtomicU64>>;

/// A report on its way to the sinks; `delivered` is set once every sink acknowledged it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The report.
    pub report: Arc<Report>,
    /// Set by the committer.
    pub delivered: Arc<AtomicBool>,
}

/// Reports waiting for the log pipeline, which takes them once it runs.
pub fn channel() -> (SyncSender<Delivery>, Receiver<Delivery>) {
    std::sync::mpsc::sync_channel(64)
}

/// Throttle reason bits that hold the clocks down: software power cap, hardware slowdown,
/// software and hardware thermal slowdown, power brake (not idle, application or display
/// clock settings, nor sync boost).
const THROTTLED: u64 = 0x4 | 0x8 | 0x20 | 0x40 | 0x80;
/// Written at least this often while runs are tracked (ends and acknowledgements at once).
const SAVE_EVERY: Duration = Duration::from_secs(30);
/// A namespace, app and user whose counter series went this long without an increment and
/// without a running run loses its series.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// One container's use of one device in one poll.
struct Held<'a> {
    device: &'a GpuReading,
    physical: Option<&'a GpuReading>,
    share: f64,
    alone: bool,
    utilization: Option<f64>,
    memory: Option<f64>,
}

/// The tracker, driven by the GPU attribution task after every poll.
pub struct Runs {
    state: State,
    file: StateFile,
    pods: Arc<PodStore>,
    gauges: PodGauges,
    seconds: RunSeconds,
    /// `nodelens_gpu_run_reports_dropped_total`.
    dropped: Counter,
    /// When each (namespace, app, user) of the counter last ran or was incremented.
    touched: HashMap<(String, String, String), f64>,
    out: Option<SyncSender<Delivery>>,
    /// No sink takes reports at all (no log pipeline): a report is done once counted.
    no_sink: bool,
    /// Reports handed to the pipeline, by container id.
    inflight: HashMap<String, Arc<AtomicBool>>,
    poll_interval: Duration,
    saved_at: f64,
    dirty: bool,
    /// The state file could not be written last time (logged once per outage).
    failing: bool,
}

impl Runs {
    /// Loads the state from `file`; reports go to `out`, `None` where no log pipeline runs (a
    /// report is then done once counted).
    pub fn new(
        file: StateFile,
        pods: Arc<PodStore>,
        gauges: PodGauges,
        (seconds, dropped): (RunSeconds, Counter),
        out: Option<SyncSender<Delivery>>,
        poll_interval: Duration,
    ) -> Runs {
        let state = file.load();
        if !state.running.is_empty() || !state.pending.is_empty() {
            tracing::info!(running = state.running.len(), pending = state.pending.len(), "GPU runs continued from state_dir");
        }
        let mut state = state;
        for run in state.running.values_mut() {
            baseline(&seconds, &run.who);
            // XID counts are the previous agent's, counted since it started: a new baseline.
            run.xids_at.clear();
        }
        Runs {
            state,
            file,
            pods,
            gauges,
            seconds,
            dropped,
            touched: HashMap::new(),
            no_sink: out.is_none(),
            out,
            inflight: HashMap::new(),
            poll_interval,
            saved_at: 0.0,
            dirty: false,
            failing: false,
        }
    }

    /// The state, for tests.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Takes one poll: adds it to the runs of the containers holding GPUs, reports those that
    /// ended, and hands pending reports to the pipeline. `now` in Unix seconds.
    pub fn observe(&mut self, reading: &Reading, view: &GpuView, now: f64) {
        // A view composed before the pod store's first list may show a container's processes
        // unnamed and the container idle: a run would count that poll's window at 0 %. And
        // before the first list, every pod looks gone.
        if !view.pods_synced || !self.pods.is_synced() {
            return;
        }
        self.account(reading, view, now);
        self.end(now);
        // Written before any report leaves: killed after printing one, the agent that comes
        // next finds it pending (sent again, same document id), never running (reported twice).
        if self.dirty {
            self.save(now);
        }
        self.deliver();
        self.forget(now);
        if self.dirty || (!self.state.running.is_empty() && now - self.saved_at >= SAVE_EVERY.as_secs_f64()) {
            self.save(now);
        }
    }

    /// Collects what was delivered and writes the state: at shutdown, after the pipeline drained.
    pub fn finish(&mut self) {
        self.collect_delivered();
        self.save(unix_now());
    }

    fn account(&mut self, reading: &Reading, view: &GpuView, now: f64) {
        let by_uuid: HashMap<&str, &GpuReading> = reading.gpus.iter().map(|g| (g.id.uuid.as_str(), g)).collect();
        let label = |labels: &[(&'static str, String)], key: &str| labels.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
        let mut holders: HashMap<&str, usize> = HashMap::new();
        for row in view.containers.iter().filter(|r| r.allocated) {
            if let Some(uuid) = row.labels.iter().find(|(k, _)| *k == "uuid") {
                *holders.entry(uuid.1.as_str()).or_default() += 1;
            }
        }
        if holders.is_empty() {
            return;
        }
        // One copy of the pod index per poll, and only on a node where GPUs are held.
        let pods = self.pods.by_name();
        let mut held: BTreeMap<String, (Arc<PodMeta>, String, Vec<Held>)> = BTreeMap::new();
        for row in view.containers.iter().filter(|r| r.allocated) {
            let (Some(uuid), Some(namespace), Some(pod), Some(container)) =
                (label(&row.labels, "uuid"), label(&row.labels, "namespace"), label(&row.labels, "pod"), label(&row.labels, "container"))
            else {
                continue;
            };
            let Some(meta) = pods.get(&(namespace, pod)) else { continue };
            // A pod deleted from the API holds nothing, though the kubelet may still list it.
            if self.pods.is_deleted(&meta.uid) {
                continue;
            }
            // A container whose end is known is not holding anything any more, whatever the
            // kubelet's list still says.
            let Some(id) = meta.container(&container).filter(|c| own_exit(c).is_none()).and_then(|c| c.id.clone()) else { continue };
            if self.state.is_done(&id) {
                continue;
            }
            let Some(device) = by_uuid.get(uuid.as_str()).copied() else { continue };
            let sharers = holders.get(uuid.as_str()).copied().unwrap_or(1).max(1);
            let (share, physical) = match &device.id.mig {
                // A time-sliced MIG instance is shared like a whole GPU.
                Some(mig) => {
                    (mig_fraction(&mig.profile, &device.id.model) / sharers as f64, by_uuid.get(mig.parent_uuid.as_str()).copied())
                }
                None => (row.granted_cores_ratio.filter(|r| *r > 0.0).unwrap_or(1.0 / sharers as f64), Some(device)),
            };
            let entry = held.entry(id).or_insert_with(|| (meta.clone(), container, Vec::new()));
            entry.2.push(Held { device, physical, share, alone: sharers == 1, utilization: row.utilization, memory: row.memory_bytes });
        }
        for (id, (pod, container, uses)) in held {
            let Some(c) = pod.container(&container) else { continue };
            let started = c.started.map(|s| s as f64);
            let seconds = &self.seconds;
            let run = self.state.running.entry(id.clone()).or_insert_with(|| {
                let run = new_run(&pod, c, &id, started, now);
                baseline(seconds, &run.who);
                run
            });
            add_poll(run, &uses, now, self.poll_interval.as_secs_f64() * 2.0);
            let values = self.gauges.values(&pod.uid);
            if !values.is_empty() {
                run.log_metrics = values;
            }
        }
        if self.state.running.len() > state::MAX_RUNNING {
            let oldest = self.state.running.iter().min_by(|a, b| a.1.last_seen.total_cmp(&b.1.last_seen)).map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                tracing::warn!(container_id = %id, "too many GPU runs tracked; the one seen longest ago is dropped unreported");
                self.state.running.remove(&id);
            }
        }
    }

    /// Reports every run whose container ended or whose pod is gone.
    fn end(&mut self, now: f64) {
        let ended: Vec<(String, Option<Exit>, bool)> = self
            .state
            .running
            .iter()
            .filter_map(|(id, run)| {
                let pod = self.pods.get(&run.who.pod_uid);
                let deleted = self.pods.is_deleted(&run.who.pod_uid);
                let evicted = pod.as_ref().is_some_and(|p| p.evicted);
                let c = pod.as_ref().and_then(|p| p.container(&run.who.container));
                let exit = c.and_then(|c| {
                    if c.id.as_deref() == Some(id) {
                        own_exit(c).cloned()
                    } else if c.last_id.as_deref() == Some(id) {
                        c.last_exit.as_deref().cloned()
                    } else {
                        None
                    }
                });
                let current = c.is_some_and(|c| c.id.as_deref() == Some(id.as_str()));
                // Ended: its status says so; or its pod is deleted or gone; or the kubelet
                // replaced it without the old instance's end in the status (restarted twice).
                let replaced = c.is_some_and(|c| c.id.is_some() && !current && c.last_id.as_deref() != Some(id.as_str()));
                (exit.is_some() || deleted || pod.is_none() || replaced).then(|| (id.clone(), exit, evicted))
            })
            .collect();
        for (id, exit, evicted) in ended {
            let Some(mut run) = self.state.running.remove(&id) else { continue };
            // The last values its logs gave (the final loss), read once more.
            let values = self.gauges.values(&run.who.pod_uid);
            if !values.is_empty() {
                run.log_metrics = values;
            }
            // No end known (its pod went while the agent was down, or the kubelet replaced
            // it): it held the GPU until a poll after it was last seen at most.
            let ended = exit
                .as_ref()
                .and_then(|e| e.finished)
                .map_or_else(|| now.min(run.last_seen + self.poll_interval.as_secs_f64()), |f| f as f64);
            let report = finish_run(run, exit.as_ref(), evicted, ended);
            self.seconds
                .get_or_create(&RunLabels {
                    namespace: report.who.namespace.clone(),
                    app: report.who.app.clone(),
                    user: report.who.user.clone(),
                    outcome: report::OUTCOMES.iter().find(|o| **o == report.outcome).copied().unwrap_or("unknown"),
                })
                .inc_by(report.gpu_seconds);
            self.touched.insert((report.who.namespace.clone(), report.who.app.clone(), report.who.user.clone()), now);
            tracing::info!(
                namespace = %report.who.namespace, pod = %report.who.pod, container = %report.who.container,
                reason = %report.exit_reason, gpu_seconds = report.gpu_seconds, "GPU run ended"
            );
            if self.state.pending.len() >= state::MAX_PENDING {
                let oldest = self.state.pending.remove(0);
                self.inflight.remove(&oldest.who.container_id);
                self.dropped.inc();
                tracing::warn!(container_id = %oldest.who.container_id, "too many GPU run reports wait for the sinks; the oldest is dropped unsent");
            }
            self.state.pending.push(report);
            self.state.reindex();
            self.dirty = true;
        }
    }

    /// Removes the counter's series of a namespace, app and user idle for [`FORGET_AFTER`].
    fn forget(&mut self, now: f64) {
        for run in self.state.running.values() {
            self.touched.insert((run.who.namespace.clone(), run.who.app.clone(), run.who.user.clone()), now);
        }
        let stale: Vec<_> =
            self.touched.iter().filter(|(_, at)| now - **at >= FORGET_AFTER.as_secs_f64()).map(|(k, _)| k.clone()).collect();
        for (namespace, app, user) in stale {
            self.touched.remove(&(namespace.clone(), app.clone(), user.clone()));
            for outcome in report::OUTCOMES {
                self.seconds.remove(&RunLabels { namespace: namespace.clone(), app: app.clone(), user: user.clone(), outcome });
            }
        }
    }

    fn collect_delivered(&mut self) {
        let done: Vec<String> = self.inflight.iter().filter(|(_, d)| d.load(Ordering::Acquire)).map(|(id, _)| id.clone()).collect();
        for id in done {
            self.inflight.remove(&id);
            self.state.pending.retain(|r| r.who.container_id != id);
            self.state.remember(id);
            self.state.reindex();
            self.dirty = true;
        }
    }

    /// Hands pending reports to the pipeline; without one (no sink), a report is done at once.
    /// A pipeline that went away (shutdown, a failed sink) keeps every report pending: written
    /// to the state file and sent again after a restart.
    fn deliver(&mut self) {
        self.collect_delivered();
        for report in &self.state.pending {
            let id = &report.who.container_id;
            if self.inflight.contains_key(id) {
                continue;
            }
            let Some(out) = &self.out else { break };
            let delivered = Arc::new(AtomicBool::new(false));
            match out.try_send(Delivery { report: Arc::new(report.clone()), delivered: delivered.clone() }) {
                Ok(()) => {
                    self.inflight.insert(id.clone(), delivered);
                }
                Err(TrySendError::Full(_)) => break,
                Err(TrySendError::Disconnected(_)) => {
                    tracing::info!("the log pipeline stopped; GPU run reports stay pending until the next start");
                    self.out = None;
                    break;
                }
            }
        }
        if self.no_sink && !self.state.pending.is_empty() {
            for report in std::mem::take(&mut self.state.pending) {
                self.state.remember(report.who.container_id);
            }
            self.state.reindex();
            self.dirty = true;
        }
    }

    fn save(&mut self, now: f64) {
        match self.file.save(&self.state) {
            Ok(()) => {
                if self.failing {
                    tracing::info!("GPU run state written again");
                }
                self.failing = false;
                self.dirty = false;
                self.saved_at = now;
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %e, "cannot write the GPU run state; runs may be reported twice or lose totals after a restart");
                }
                self.failing = true;
            }
        }
    }
}

/// Creates the counter's series of `who`'s namespace, application and user at 0 for every
/// outcome, so that `increase()` sees the first run that ends.
fn baseline(seconds: &RunSeconds, who: &Who) {
    for outcome in report::OUTCOMES {
        let _ =
            seconds.get_or_create(&RunLabels { namespace: who.namespace.clone(), app: who.app.clone(), user: who.user.clone(), outcome });
    }
}

/// The end of the container instance `c.id`: its `state.terminated`, or, while the kubelet
/// waits to restart it (CrashLoopBackOff), its `lastState.terminated` naming the same id.
fn own_exit(c: &ContainerMeta) -> Option<&Exit> {
    c.exit.as_deref().or_else(|| c.last_exit.as_deref().filter(|_| c.id.is_some() && c.last_id == c.id))
}

fn new_run(pod: &PodMeta, c: &ContainerMeta, id: &str, started: Option<f64>, now: f64) -> Run {
    Run {
        who: Who {
            container_id: id.to_string(),
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            pod_uid: pod.uid.clone(),
            container: c.name.clone(),
            image: c.image.clone(),
            app: pod.app.clone(),
            user: pod.user.clone(),
        },
        started,
        // The kubelet allocates devices before the container starts: it held them since.
        last_seen: started.filter(|s| *s <= now).unwrap_or(now),
        last_share: 0.0,
        gpu_seconds: 0.0,
        gpus: 0.0,
        utilization: Default::default(),
        sm_active: Default::default(),
        tensor_active: Default::default(),
        memory_peak: None,
        energy_joules: None,
        energy_at: BTreeMap::new(),
        xids: 0,
        xids_at: BTreeMap::new(),
        throttled_seconds: 0.0,
        log_metrics: Vec::new(),
        recent: Default::default(),
    }
}

/// Adds one poll to a run: `now - last_seen` at this poll's share (a gap across an agent
/// restart included), and the means and throttling over at most `max_window` seconds.
fn add_poll(run: &mut Run, uses: &[Held], now: f64, max_window: f64) {
    let share: f64 = uses.iter().map(|h| h.share).sum();
    let elapsed = (now - run.last_seen).max(0.0);
    let window = elapsed.min(max_window);
    run.gpu_seconds += share * elapsed;
    run.gpus = run.gpus.max(share);
    run.last_share = share;
    run.last_seen = now;
    let memory: Option<f64> = uses.iter().filter_map(|h| h.memory).reduce(|a, b| a + b);
    if let Some(m) = memory {
        run.memory_peak = Some(run.memory_peak.map_or(m, |p| p.max(m)));
    }
    let mut added = PollAdded { at: now.floor(), ..PollAdded::default() };
    for h in uses {
        if let Some(u) = h.utilization {
            added.utilization.add(u, window);
        }
        if h.alone {
            if let Some(v) = h.device.get(GpuGauge::SmActive) {
                added.sm_active.add(v, window);
            }
            if let Some(v) = h.device.get(GpuGauge::TensorActive) {
                added.tensor_active.add(v, window);
            }
        }
        let Some(gpu) = h.physical else { continue };
        let uuid = &gpu.id.uuid;
        if let Some(energy) = gpu.energy_joules {
            if let Some(before) = run.energy_at.insert(uuid.clone(), energy) {
                // A counter reset (driver reload) counts nothing for this poll.
                if energy >= before {
                    added.energy_joules += (energy - before) * h.share;
                }
            }
            run.energy_joules = Some(run.energy_joules.unwrap_or(0.0));
        }
        let xids: u64 = gpu.xids.iter().map(|(_, n)| n).sum();
        let before = run.xids_at.insert(uuid.clone(), xids);
        // Counted since the agent started: a lower count is a new agent's.
        run.xids += match before {
            Some(b) if xids >= b => xids - b,
            Some(_) => xids,
            None => 0,
        };
        if gpu.throttle_reasons.is_some_and(|r| r & THROTTLED != 0) {
            added.throttled_seconds += window;
        }
    }
    run.add(&added);
    match run.recent.back_mut() {
        Some(second) if second.at == added.at => second.merge(&added),
        _ => {
            if run.recent.len() == state::RECENT_SECONDS {
                run.recent.pop_front();
            }
            run.recent.push_back(added);
        }
    }
}

/// The report of a run that ended at `ended` with `exit` (`None`: not reported by the kubelet).
fn finish_run(mut run: Run, exit: Option<&Exit>, evicted: bool, ended: f64) -> Report {
    // Held at the last share until it ended; polls after its end (before its status
    // arrived) are taken back: it held nothing then, and read idle.
    run.gpu_seconds = (run.gpu_seconds + run.last_share * (ended - run.last_seen)).max(0.0);
    for after in std::mem::take(&mut run.recent).iter().filter(|p| p.at >= ended) {
        run.take_back(after);
    }
    let started = run.started.or(exit.and_then(|e| e.started).map(|s| s as f64));
    Report {
        outcome: report::outcome(evicted, exit.map(|e| (e.code, e.reason.as_str()))).to_string(),
        exit_code: exit.map(|e| e.code),
        exit_reason: exit.map(|e| e.reason.clone()).filter(|r| !r.is_empty()).unwrap_or_else(|| "unknown".into()),
        who: run.who,
        started,
        ended,
        gpu_seconds: run.gpu_seconds,
        gpus: run.gpus,
        sm_utilization_mean: run.utilization.get(),
        sm_active_mean: run.sm_active.get(),
        tensor_active_mean: run.tensor_active.get(),
        memory_used_peak_bytes: run.memory_peak,
        energy_joules: run.energy_joules,
        xid_errors: run.xids,
        throttled_seconds: run.throttled_seconds,
        log_metrics: run.log_metrics,
    }
}

/// A MIG instance's share of its GPU: its compute slices over the GPU's seven (four on an
/// A30) — `3g` of `3g.20gb`, and for a compute instance the `1c` of `1c.3g.20gb` (one of the
/// GPU instance's three slices).
pub fn mig_fraction(profile: &str, model: &str) -> f64 {
    let part = |suffix: char| profile.split('.').find_map(|part| part.strip_suffix(suffix)?.parse::<u32>().ok());
    let slices = part('c').or_else(|| part('g')).unwrap_or(1);
    let total = if model.contains("A30") { 4.0 } else { 7.0 };
    (f64::from(slices) / total).min(1.0)
}

/// Unix seconds now.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests;
