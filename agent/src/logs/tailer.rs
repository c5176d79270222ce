//! The tailer thread: finds container log files (inotify plus periodic rescans), reads every
//! container's chain in turn, and sends chunks downstream, pausing while too many bytes are
//! in flight. File reads block, so this runs on a thread of its own, not on the async runtime.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use globset::GlobSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use super::assemble::MultilineRule;
use super::budget::ReadBudget;
use super::checkpoint::Checkpoints;
use super::chunk::Chunk;
use super::container::{ContainerTail, Lost, StepLimits};
use super::limit::{count_throttled, rate_limit_of, Allowance, ThrottleLabels};
use super::scan::{self, Exclusions, FingerprintCache, Scan, ScannedFile};
use super::source::{ContainerInfo, FileId};
use super::wake::{self, Changes, Wake};
use crate::identity::path::{self, ContainerRef};
use crate::kube::store::PodStore;

/// What the tailer needs to know.
pub struct TailerSettings {
    /// The kubelet's pod log directory.
    pub pods_dir: PathBuf,
    /// The kubelet's container symlink directory (for container ids).
    pub containers_dir: PathBuf,
    /// Namespaces not collected.
    pub exclude_namespaces: GlobSet,
    /// The agent's own pod, whose logs are never read.
    pub own_pod_uid: Option<String>,
    /// Bounds of one read step.
    pub limits: StepLimits,
    /// Full rescan period.
    pub rescan_interval: Duration,
    /// Records a second each container is read at, at most (0 = no limit); a pod's
    /// `nodelens.io/rate-limit` annotation overrides it.
    pub rate_limit: u32,
    /// Multi-line rules by application glob, first match wins.
    pub multiline: Vec<(globset::GlobMatcher, Arc<MultilineRule>)>,
    /// How long reading waits at start for the first pod list before it goes on with
    /// metadata from paths alone.
    pub metadata_wait: Duration,
    /// The most log files held open at once (see [`max_open_files`]).
    pub max_open_files: usize,
}

/// Descriptors kept for what is not a log file: sockets to the sinks and the API server,
/// checkpoint writes, directory scans, inotify, the metrics endpoint's connections.
pub const FD_RESERVE: u64 = 64;

/// The bound on open log files: `configured`, or half of what the descriptor limit leaves
/// after [`FD_RESERVE`] (at most 4096), never above what it leaves.
pub fn max_open_files(configured: Option<usize>, fd_limit: Option<u64>) -> usize {
    let room = fd_limit.map_or(u64::MAX, |limit| limit.saturating_sub(FD_RESERVE).max(1));
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    match configured {
        Some(n) => n.min(room),
        None => (room / 2).clamp(1, 4096),
    }
}

/// The tailer's own metrics.
#[derive(Clone, Default)]
pub struct TailerMetrics {
    /// `nodelens_log_files_tailed`: container instances whose live file is followed.
    pub files_tailed: Gauge,
    /// `nodelens_log_files_open`: log files held open now (idle ones are closed).
    pub files_open: Gauge,
    /// `nodelens_log_backlog_bytes`.
    pub backlog_bytes: Gauge,
    /// `nodelens_log_lost_bytes_total`.
    pub lost_bytes: Counter,
    /// `nodelens_log_files_lost_total`: files gone before they were read to their end.
    pub files_lost: Counter,
    /// `nodelens_log_files_truncated_total`: files truncated in place and read again.
    pub truncated: Counter,
    /// `nodelens_log_paths_skipped_total`: entries under `pods_dir` that cannot be a pod's,
    /// counted once per path.
    pub paths_skipped: Counter,
    /// `nodelens_log_records_throttled_total`: records that waited for their container's
    /// rate limit.
    pub throttled: Family<ThrottleLabels, Counter>,
}

/// How long a container waits for its pod's metadata once the pod list has arrived: the
/// watch event of a new pod can come after its first line.
const POD_WAIT: Duration = Duration::from_secs(1);

/// How often a container waiting for a descriptor (`logs.max_open_files`) is looked at again.
const OPEN_FILES_WAIT: Duration = Duration::from_millis(20);

/// How often a container held for its pod's metadata is looked at again.
const HOLD_POLL: Duration = Duration::from_millis(20);

/// How often the backlog and tail gauges are recomputed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Bounds of the backoff with which pod directories holding a file without a whole first
/// line are rescanned when inotify says nothing (it is the fast path; this the safety net).
const PENDING_POLL: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// What visiting one tail in a read pass came to.
enum Visit {
    Next,
    /// The in-flight budget is used up.
    Full,
    /// Downstream is gone.
    Closed,
}

/// A pod directory with files not fingerprinted yet.
struct Pending {
    /// The files and their length when last looked at: a write makes them longer.
    files: Vec<(PathBuf, u64)>,
    next: Instant,
    interval: Duration,
}

impl Pending {
    fn new(files: Vec<(PathBuf, u64)>, now: Instant) -> Pending {
        Pending { files, next: now + PENDING_POLL.0, interval: PENDING_POLL.0 }
    }

    /// Whether a file grew (or went) since the scan: one `stat` each, no directory walk.
    fn changed(&self) -> bool {
        self.files.iter().any(|(path, len)| std::fs::metadata(path).map_or(true, |m| m.len() != *len))
    }

    fn back_off(&mut self, now: Instant) {
        self.interval = (self.interval * 2).min(PENDING_POLL.1);
        self.next = now + self.interval;
    }
}

/// The tailer and everything it owns.
pub struct Tailer {
    settings: TailerSettings,
    checkpoints: Arc<Checkpoints>,
    budget: Arc<ReadBudget>,
    out: mpsc::Sender<Chunk>,
    wake: Arc<Wake>,
    metrics: TailerMetrics,
    /// Pod metadata: each container's application for its multi-line rule, and whether its
    /// pod is known yet (records wait for their metadata).
    pods: Option<Arc<PodStore>>,
    tails: BTreeMap<ContainerRef, ContainerTail>,
    /// Where the next read pass starts.
    cursor: Option<ContainerRef>,
    /// Containers held back until their pod's metadata is known, since when.
    held: HashMap<ContainerRef, Instant>,
    pending: HashMap<PathBuf, Pending>,
    cache: FingerprintCache,
    watcher: Option<notify::RecommendedWatcher>,
    started: Instant,
    warned_unsynced: bool,
    /// Pods whose rate-limit annotation was found invalid (logged once each).
    warned_rate: HashSet<String>,
    /// Paths skipped (counted and logged) that the last full scan still found.
    skipped: HashSet<PathBuf>,
}

impl Tailer {
    /// A tailer sending chunks to `out`; `budget` counts bytes sent and not yet committed.
    pub fn new(
        settings: TailerSettings,
        checkpoints: Arc<Checkpoints>,
        budget: Arc<ReadBudget>,
        out: mpsc::Sender<Chunk>,
        wake: Arc<Wake>,
        metrics: TailerMetrics,
        pods: Option<Arc<PodStore>>,
    ) -> Tailer {
        if let Some(uid) = &settings.own_pod_uid {
            tracing::info!(pod_uid = %uid, "not reading this agent's own pod's logs");
        }
        tracing::info!(max_open_files = settings.max_open_files, "log files held open at most");
        Tailer {
            settings,
            checkpoints,
            budget,
            out,
            wake,
            metrics,
            pods,
            tails: BTreeMap::new(),
            cursor: None,
            held: HashMap::new(),
            pending: HashMap::new(),
            cache: FingerprintCache::default(),
            watcher: None,
            started: Instant::now(),
            warned_unsynced: false,
            warned_rate: HashSet::new(),
            skipped: HashSet::new(),
        }
    }

    /// Runs until [`Wake::shutdown`] or until downstream hangs up. Pending partial records are
    /// not flushed at shutdown: their checkpoint stays before them, so they are read whole
    /// on the next start.
    pub fn run(mut self) {
        let mut next_full_scan = Instant::now();
        let mut next_gauges = Instant::now();
        let mut next_release = Instant::now();
        let mut changes = Changes::default();
        loop {
            self.note_renames(&changes.renamed);
            let now = Instant::now();
            if now >= next_full_scan || changes.rescan_all {
                self.full_scan();
                next_full_scan = now + self.settings.rescan_interval;
            } else {
                // A write to a directory with a file not fingerprinted yet may be its first line.
                let mut dirs: HashSet<PathBuf> = changes.rescan.iter().cloned().collect();
                for (dir, pending) in self.pending.iter_mut() {
                    let written = changes.written.contains(dir);
                    if written || pending.next <= now {
                        if pending.changed() {
                            dirs.insert(dir.clone());
                        } else if !written {
                            pending.back_off(now);
                        }
                    }
                }
                dirs.extend(self.tails.iter().filter(|(_, t)| t.wants_rescan).map(|(r, _)| pod_dir(&self.settings.pods_dir, r)));
                for pod_dir in &dirs {
                    self.rescan_pod_dir(pod_dir);
                }
            }
            self.poke_pods(changes.written.iter().chain(&changes.rescan));
            if changes.shutdown {
                break;
            }
            if Instant::now() >= next_release {
                self.release_held(Instant::now());
                next_release = Instant::now() + HOLD_POLL;
            }
            let Some(progressed) = self.read_pass() else { break };
            let now = Instant::now();
            if now >= next_gauges {
                self.update_gauges();
                next_gauges = now + GAUGE_INTERVAL;
            }
            let timeout = if progressed {
                Duration::ZERO
            } else {
                let next_poll = self.tails.iter().filter(|(r, _)| !self.held.contains_key(*r)).map(|(_, t)| t.next_poll).min();
                let next_pending = self.pending.values().map(|p| p.next).min();
                let next_hold = (!self.held.is_empty()).then_some(next_release);
                let wake_at =
                    [next_poll, next_pending, next_hold, Some(next_gauges)].into_iter().flatten().fold(next_full_scan, Instant::min);
                wake_at.saturating_duration_since(now).min(Duration::from_secs(1))
            };
            changes = self.wake.wait(timeout);
        }
        tracing::debug!("tailer stopped");
    }

    /// One turn over every due container. `None` when downstream is gone.
    fn read_pass(&mut self) -> Option<bool> {
        let now = Instant::now();
        let mut progressed = false;
        // Start where a pass cut short by back-pressure stopped, so every container gets its
        // turn rather than those first in order (after an outage, all are behind).
        let start = self.cursor.take();
        let mut open_files = self.tails.values().filter(|t| t.is_open()).count();
        let mut waiting = false;
        let mut visit = |reference: &ContainerRef, tail: &mut ContainerTail| -> Visit {
            if self.budget.is_full() {
                return Visit::Full;
            }
            if tail.next_poll > now || self.held.contains_key(reference) {
                return Visit::Next;
            }
            let was_open = tail.is_open();
            if !was_open && open_files >= self.settings.max_open_files {
                // Its turn comes when a file open now is at its end and closed for it.
                waiting = true;
                tail.next_poll = now + OPEN_FILES_WAIT;
                return Visit::Next;
            }
            // A container over its rate limit is read later; its excess waits in its files.
            // A step takes no more than what is left of the bound (and always one line).
            let mut limits = self.settings.limits;
            limits.max_bytes = limits.max_bytes.min(self.budget.room().max(1));
            if let Some(rate) = tail.rate_limit_mut() {
                match rate.allowance(now) {
                    Allowance::Records(n) => limits.max_records = limits.max_records.min(n),
                    Allowance::WaitUntil(at) => {
                        tail.next_poll = at;
                        return Visit::Next;
                    }
                }
            }
            let step = tail.step(&self.checkpoints, &limits, now);
            if let (Some(rate), Some(step)) = (tail.rate_limit_mut(), &step) {
                let cut_short = limits.max_records < self.settings.limits.max_records;
                let waited = rate.took(limits.max_records, step.chunk.records.len(), cut_short);
                if waited > 0 {
                    count_throttled(&self.metrics.throttled, self.pods.as_deref(), reference, waited);
                }
            }
            match (was_open, tail.is_open()) {
                (false, true) => open_files += 1,
                (true, false) => open_files -= 1,
                _ => {}
            }
            let Some(step) = step else { return Visit::Next };
            count_lost(&self.metrics, reference, step.lost);
            if step.truncated {
                self.metrics.truncated.inc();
                self.cache.forget(&step.chunk.source.path);
            }
            let chunk = step.chunk;
            if !chunk.records.is_empty() || chunk.read_bytes > 0 {
                progressed = true;
                self.budget.take(chunk.read_bytes);
                self.budget.chunk_read();
                if self.out.blocking_send(chunk).is_err() {
                    return Visit::Closed;
                }
            }
            Visit::Next
        };
        // Visits a range of tails; `Err` when downstream is gone, `Ok(Some(r))` when the
        // in-flight budget ran out at `r`.
        let mut walk = |tails: std::collections::btree_map::RangeMut<'_, ContainerRef, ContainerTail>| {
            for (reference, tail) in tails {
                match visit(reference, tail) {
                    Visit::Next => {}
                    Visit::Full => return Ok(Some(reference.clone())),
                    Visit::Closed => return Err(()),
                }
            }
            Ok(None)
        };
        let mut stopped = match &start {
            Some(c) => walk(self.tails.range_mut(c.clone()..)).ok()?,
            None => walk(self.tails.range_mut(..)).ok()?,
        };
        if let (None, Some(head)) = (&stopped, start) {
            stopped = walk(self.tails.range_mut(..head)).ok()?;
        }
        if waiting {
            // Read in turns: files read to their end, or open for their turn, give their
            // descriptor to those waiting.
            let released = self.tails.values_mut().map(|t| t.release_for_turn(now)).filter(|closed| *closed).count();
            progressed |= released > 0;
        }
        if stopped.is_some() {
            // Downstream is behind: the files on disk are the buffer. Look again shortly.
            self.cursor = stopped;
            std::thread::sleep(Duration::from_millis(5));
            return Some(false);
        }
        self.budget.reading();
        Some(progressed)
    }

    /// Lets containers read once their pod is known, or once waiting longer cannot help.
    fn release_held(&mut self, now: Instant) {
        if self.held.is_empty() {
            return;
        }
        let Some(store) = &self.pods else {
            self.held.clear();
            return;
        };
        let synced = store.is_synced();
        let listed = store.pods_listed();
        let current = store.is_current();
        let waited_out = store.waited_out() || now.duration_since(self.started) >= self.settings.metadata_wait;
        if !listed && waited_out && !self.warned_unsynced {
            self.warned_unsynced = true;
            tracing::warn!(waited = ?self.settings.metadata_wait, "no pod list from the Kubernetes API yet; reading logs with metadata from their paths (exclusion annotations cannot be honoured until it arrives)");
        }
        if !(synced || waited_out) {
            // Nothing is released before the first lists: a known pod may still miss its
            // namespace's labels and exclusion (the namespace watch says when it gives up).
            return;
        }
        let metadata_wait = self.settings.metadata_wait;
        let mut released = Vec::new();
        self.held.retain(|reference, since| {
            let known = store.get(&reference.pod_uid).is_some();
            // While the pod watch is down, a new pod is unheard of rather than absent: its
            // container waits for the watch's next list as before the first one.
            let give_up = match (listed, current) {
                (true, true) => now.duration_since(*since) >= POD_WAIT,
                (true, false) => now.duration_since(*since) >= metadata_wait,
                (false, _) => waited_out,
            };
            if give_up && !known && current {
                tracing::debug!(namespace = %reference.namespace, pod = %reference.pod, "pod not reported by the watch; reading with metadata from its path");
            } else if give_up && !known && listed {
                tracing::warn!(namespace = %reference.namespace, pod = %reference.pod, waited = ?metadata_wait, "pod watch still down; reading with metadata from its path");
            }
            let release = known || give_up;
            if release {
                released.push(reference.clone());
            }
            !release
        });
        // The pod is known now: its application's multi-line rule and its rate limit apply
        // from the first record.
        for reference in released {
            if let Some(tail) = self.tails.get_mut(&reference) {
                configure(tail, &self.settings, self.pods.as_deref(), &mut self.warned_rate, now);
            }
        }
    }

    fn update_gauges(&mut self) {
        let backlog: u64 = self.tails.values().map(|t| t.backlog(&self.checkpoints)).sum();
        self.metrics.backlog_bytes.set(backlog as i64);
        let following = self.tails.values().filter(|t| !t.is_done(&self.checkpoints)).count();
        self.metrics.files_tailed.set(following as i64);
        self.metrics.files_open.set(self.tails.values().filter(|t| t.is_open()).count() as i64);
    }

    fn full_scan(&mut self) {
        if self.watcher.is_none() {
            self.watcher = wake::watch(&self.settings.pods_dir, self.wake.clone());
        }
        let exclusions = exclusions(&self.settings);
        let scan = match scan::scan_all(&self.settings.pods_dir, &exclusions, &mut self.cache) {
            Ok(scan) => scan,
            Err(e) => {
                tracing::warn!(dir = %self.settings.pods_dir.display(), error = %e, "cannot scan pods_dir; will retry");
                return;
            }
        };
        let still: HashSet<PathBuf> = scan.skipped.iter().map(|(p, _)| p.clone()).collect();
        self.count_skipped(scan.skipped);
        self.skipped.retain(|p| still.contains(p));
        let now = Instant::now();
        let mut pending = std::mem::take(&mut self.pending);
        for (dir, files) in scan.pending {
            match pending.remove(&dir) {
                Some(mut known) => {
                    known.files = files;
                    self.pending.insert(dir, known);
                }
                None => {
                    self.pending.insert(dir, Pending::new(files, now));
                }
            }
        }
        let unreadable = scan.unreadable;
        let readable = |r: &ContainerRef| !unreadable.contains(&pod_dir(&self.settings.pods_dir, r));
        let gone: Vec<ContainerRef> = self.tails.keys().filter(|r| !scan.chains.contains_key(*r) && readable(r)).cloned().collect();
        self.apply(scan.chains, gone);
        for tail in self.tails.values_mut() {
            configure(tail, &self.settings, self.pods.as_deref(), &mut self.warned_rate, now);
        }
        self.collect_checkpoint_garbage(&unreadable);
        self.update_gauges();
    }

    fn rescan_pod_dir(&mut self, pod_dir: &Path) {
        let mut scan = Scan::default();
        let exclusions = exclusions(&self.settings);
        scan::scan_pod_dir(pod_dir, &self.settings.pods_dir, &exclusions, &mut self.cache, &mut scan);
        self.count_skipped(std::mem::take(&mut scan.skipped));
        let now = Instant::now();
        match scan.pending.remove(pod_dir) {
            Some(files) => {
                let p = self.pending.entry(pod_dir.to_path_buf()).or_insert_with(|| Pending::new(Vec::new(), now));
                p.files = files;
                if p.next <= now {
                    p.back_off(now);
                }
            }
            None => {
                self.pending.remove(pod_dir);
            }
        }
        let uid = pod_uid_of(pod_dir).unwrap_or_default();
        // Nothing is gone from a directory that could not be read whole.
        let readable = !scan.unreadable.contains(pod_dir);
        let gone: Vec<ContainerRef> =
            self.tails.keys().filter(|r| readable && r.pod_uid == uid && !scan.chains.contains_key(r)).cloned().collect();
        for tail in self.tails.iter_mut().filter(|(r, _)| r.pod_uid == uid).map(|(_, t)| t) {
            tail.wants_rescan = false;
        }
        self.apply(scan.chains, gone);
    }

    /// Merges a scan: new containers get a tail, known ones their new chain, vanished ones
    /// are read to their end. A tail is dropped only once none of its files is left on disk,
    /// so a finished file keeps its position (a restarted container's previous log is read
    /// once, however many scans see it).
    fn apply(&mut self, chains: BTreeMap<ContainerRef, Vec<ScannedFile>>, gone: Vec<ContainerRef>) {
        let newest_restart: HashMap<(String, String), u32> = chains.keys().fold(HashMap::new(), |mut m, r| {
            let e = m.entry((r.pod_uid.clone(), r.container.clone())).or_insert(r.restart);
            *e = (*e).max(r.restart);
            m
        });
        let mut links = None;
        let now = Instant::now();
        let touched: Vec<ContainerRef> = chains.keys().chain(&gone).cloned().collect();
        for (reference, chain) in chains {
            let restarted = newest_restart[&(reference.pod_uid.clone(), reference.container.clone())] > reference.restart;
            let tail = self.tails.entry(reference.clone()).or_insert_with(|| {
                let links = links.get_or_insert_with(|| container_links(&self.settings.containers_dir));
                let info = container_info(&self.settings.pods_dir, reference.clone(), links);
                tracing::info!(namespace = %info.reference.namespace, pod = %info.reference.pod, container = %info.reference.container, restart = info.reference.restart, "tailing container");
                // Until the first lists (pods, and namespaces where watched), a known pod may
                // still be missing its namespace's labels and exclusion.
                if self.pods.as_ref().is_some_and(|store| !store.is_synced() || store.get(&reference.pod_uid).is_none()) {
                    self.held.insert(reference.clone(), now);
                }
                let mut tail = ContainerTail::new(Arc::new(info), self.settings.limits.max_line_bytes);
                configure(&mut tail, &self.settings, self.pods.as_deref(), &mut self.warned_rate, now);
                tail
            });
            let lost = tail.update(chain, &self.checkpoints);
            count_lost(&self.metrics, &tail.info().reference, lost);
            count_unseen(&self.metrics, &pod_dir(&self.settings.pods_dir, &reference), &reference, tail.take_unseen_lost());
            if restarted {
                tail.set_final();
            }
        }
        let mut unlisted = HashSet::new();
        for reference in gone {
            if let Some(tail) = self.tails.get_mut(&reference) {
                let lost = tail.update(Vec::new(), &self.checkpoints);
                count_lost(&self.metrics, &reference, lost);
                tail.set_final();
                unlisted.insert(reference);
            }
        }
        // A tail is dropped once its container is no longer listed at all (an empty file of a
        // crashed instance keeps it, so it is not created again on every scan).
        for reference in touched {
            let drop =
                unlisted.contains(&reference) && self.tails.get(&reference).is_some_and(|t| t.is_gone() && t.is_done(&self.checkpoints));
            if drop {
                self.tails.remove(&reference);
                self.held.remove(&reference);
            }
        }
    }

    /// Tells each tail how often inotify saw its live file renamed away.
    fn note_renames(&mut self, renamed: &HashMap<PathBuf, u64>) {
        for (live, times) in renamed {
            let Some((reference, _)) = path::parse(&self.settings.pods_dir, live) else { continue };
            if let Some(tail) = self.tails.get_mut(&reference) {
                for _ in 0..*times {
                    tail.note_rename();
                }
            }
        }
    }

    /// Counts and logs each skipped path the first time it is found (the set holds only paths
    /// still there, so it stays as small as the oddities on the node).
    fn count_skipped(&mut self, skipped: Vec<(PathBuf, &'static str)>) {
        for (path, why) in skipped {
            if self.skipped.insert(path.clone()) {
                self.metrics.paths_skipped.inc();
                tracing::warn!(path = %path.display(), reason = why, "skipping an entry under pods_dir");
            }
        }
    }

    /// Makes every tail of these pod directories look at its files now.
    fn poke_pods<'a>(&mut self, pod_dirs: impl Iterator<Item = &'a PathBuf>) {
        let uids: HashSet<&str> = pod_dirs.filter_map(|d| pod_uid_of(d)).collect();
        if uids.is_empty() {
            return;
        }
        for (reference, tail) in self.tails.iter_mut() {
            if uids.contains(reference.pod_uid.as_str()) {
                tail.poke();
            }
        }
    }

    /// Forgets checkpoints of files that exist no more: every file on disk has a tail (kept
    /// until its last file is gone), so what no tail lists is gone. An acknowledgement still
    /// in flight may bring one back; the next full scan removes it again.
    fn collect_checkpoint_garbage(&self, unreadable: &std::collections::BTreeSet<PathBuf>) {
        let live: HashSet<FileId> = self.tails.values().flat_map(|t| t.file_ids()).collect();
        for (id, entry) in self.checkpoints.snapshot() {
            // A file under a directory that could not be read may still be there.
            if !live.contains(&id) && !unreadable.iter().any(|dir| entry.path.starts_with(dir)) {
                tracing::debug!(path = %entry.path.display(), "forgetting checkpoint of a removed file");
                self.checkpoints.forget(id);
            }
        }
    }
}

/// What a container takes from its pod: its application's multi-line rule and its rate limit.
fn configure(tail: &mut ContainerTail, settings: &TailerSettings, pods: Option<&PodStore>, warned: &mut HashSet<String>, now: Instant) {
    let info = tail.info().clone();
    tail.set_multiline(multiline_rule(&settings.multiline, pods, &info.reference));
    tail.set_rate_limit(rate_limit_of(settings.rate_limit, pods, &info.reference, warned), now);
}

/// The multi-line rule of the container's application (the pod name without the API).
fn multiline_rule(
    rules: &[(globset::GlobMatcher, Arc<MultilineRule>)],
    pods: Option<&PodStore>,
    r: &ContainerRef,
) -> Option<Arc<MultilineRule>> {
    if rules.is_empty() {
        return None;
    }
    let app = pods
        .and_then(|p| p.get(&r.pod_uid))
        .map_or_else(|| crate::identity::resolve::app_from_pod_name(&r.pod).to_string(), |p| p.app.clone());
    rules.iter().find(|(glob, _)| glob.is_match(&app)).map(|(_, rule)| rule.clone())
}

/// The pod UID in a pod directory's name (unique on the node, unlike the name).
fn pod_uid_of(pod_dir: &Path) -> Option<&str> {
    path::parse_pod_dir(pod_dir.file_name()?.to_str()?).map(|(_, _, uid)| uid)
}

/// What scans skip: excluded namespaces and the agent's own pod.
fn exclusions(settings: &TailerSettings) -> Exclusions<'_> {
    Exclusions { namespaces: &settings.exclude_namespaces, own_pod_uid: settings.own_pod_uid.as_deref() }
}

/// The pod directory of a container instance.
fn pod_dir(pods_dir: &Path, r: &ContainerRef) -> PathBuf {
    path::pod_dir(pods_dir, &r.namespace, &r.pod, &r.pod_uid)
}

fn count_lost(metrics: &TailerMetrics, reference: &ContainerRef, lost: Vec<Lost>) {
    for l in lost {
        tracing::warn!(path = %l.path.display(), bytes = l.bytes, namespace = %reference.namespace, pod = %reference.pod, "log file removed before it was read; bytes lost");
        metrics.lost_bytes.inc_by(l.bytes);
        metrics.files_lost.inc();
    }
}

/// Files of a container created and deleted unseen: counted, their size unknown.
fn count_unseen(metrics: &TailerMetrics, pod_dir: &Path, reference: &ContainerRef, files: u64) {
    if files == 0 {
        return;
    }
    let dir = pod_dir.join(&reference.container);
    tracing::warn!(dir = %dir.display(), files, namespace = %reference.namespace, pod = %reference.pod, container = %reference.container, "log files rotated away and deleted before they were read (the agent was stopped or far behind); lost, size unknown");
    metrics.files_lost.inc_by(files);
}

/// The kubelet's `containers_dir` symlinks: link target → container id.
fn container_links(containers_dir: &Path) -> HashMap<PathBuf, String> {
    let Ok(entries) = std::fs::read_dir(containers_dir) else { return HashMap::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id = path::parse_container_link(&name)?.id.to_string();
            Some((std::fs::read_link(e.path()).ok()?, id))
        })
        .collect()
}

fn container_info(pods_dir: &Path, reference: ContainerRef, links: &HashMap<PathBuf, String>) -> ContainerInfo {
    let live = pod_dir(pods_dir, &reference).join(&reference.container).join(format!("{}.log", reference.restart));
    let target = std::fs::read_link(&live).ok();
    let from_target = target.as_ref().and_then(|t| path::container_id_in(t.to_str()?)).map(str::to_string);
    let runtime = target.as_ref().filter(|t| t.to_string_lossy().contains("/docker/")).map(|_| "docker");
    let container_id = from_target.or_else(|| links.get(&live).cloned());
    ContainerInfo { reference, container_id, runtime }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_fit_under_the_descriptor_limit_with_a_reserve() {
        assert_eq!(max_open_files(None, Some(256)), 96, "half of what 256 leaves after 64");
        assert_eq!(max_open_files(None, Some(1024)), 480);
        assert_eq!(max_open_files(None, Some(1 << 20)), 4096);
        assert_eq!(max_open_files(None, None), 4096);
        assert_eq!(max_open_files(Some(1000), Some(256)), 192, "never above what the limit leaves");
        assert_eq!(max_open_files(Some(50), Some(256)), 50);
        assert_eq!(max_open_files(None, Some(10)), 1, "a tiny limit still reads");
    }
}
