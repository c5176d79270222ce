//! The tailer thread: finds container log files (inotify plus periodic rescans), reads every
//! container's chain in turn, and sends chunks downstream, pausing while too many bytes are
//! in flight. File reads block, so this runs on a thread of its own, not on the async runtime.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use globset::GlobSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use super::assemble::MultilineRule;
use super::checkpoint::Checkpoints;
use super::chunk::Chunk;
use super::container::{ContainerTail, Lost, StepLimits};
use super::path::{self, ContainerRef};
use super::scan::{self, FingerprintCache, Scan};
use super::source::{ContainerInfo, FileId};
use super::wake::{self, Changes, Wake};
use crate::kube::store::PodStore;

/// What the tailer needs to know.
pub struct TailerSettings {
    /// The kubelet's pod log directory.
    pub pods_dir: PathBuf,
    /// The kubelet's container symlink directory (for container ids).
    pub containers_dir: PathBuf,
    /// Namespaces not collected.
    pub exclude_namespaces: GlobSet,
    /// Bounds of one read step.
    pub limits: StepLimits,
    /// Full rescan period.
    pub rescan_interval: Duration,
    /// Read-ahead bound.
    pub max_inflight_bytes: u64,
    /// Multi-line rules by application glob, first match wins.
    pub multiline: Vec<(globset::GlobMatcher, Arc<MultilineRule>)>,
}

/// The tailer's own metrics.
#[derive(Clone, Default)]
pub struct TailerMetrics {
    /// `nodelens_log_files_tailed`.
    pub files_tailed: Gauge,
    /// `nodelens_log_backlog_bytes`.
    pub backlog_bytes: Gauge,
    /// `nodelens_log_lost_bytes_total`.
    pub lost_bytes: Counter,
}

/// The tailer and everything it owns.
pub struct Tailer {
    settings: TailerSettings,
    checkpoints: Arc<Checkpoints>,
    inflight: Arc<AtomicU64>,
    out: mpsc::Sender<Chunk>,
    wake: Arc<Wake>,
    metrics: TailerMetrics,
    /// Pod metadata, to find each container's application for its multi-line rule.
    pods: Option<Arc<PodStore>>,
    tails: BTreeMap<ContainerRef, ContainerTail>,
    cache: FingerprintCache,
    watcher: Option<notify::RecommendedWatcher>,
}

impl Tailer {
    /// A tailer sending chunks to `out`; `inflight` counts bytes sent and not yet committed.
    pub fn new(
        settings: TailerSettings,
        checkpoints: Arc<Checkpoints>,
        inflight: Arc<AtomicU64>,
        out: mpsc::Sender<Chunk>,
        wake: Arc<Wake>,
        metrics: TailerMetrics,
        pods: Option<Arc<PodStore>>,
    ) -> Tailer {
        Tailer {
            settings,
            checkpoints,
            inflight,
            out,
            wake,
            metrics,
            pods,
            tails: BTreeMap::new(),
            cache: FingerprintCache::default(),
            watcher: None,
        }
    }

    /// Runs until [`Wake::shutdown`] or until downstream hangs up. Pending partial records are
    /// not flushed at shutdown: their checkpoint stays before them, so they are read whole
    /// on the next start.
    pub fn run(mut self) {
        let mut next_full_scan = Instant::now();
        let mut changes = Changes::default();
        loop {
            let now = Instant::now();
            if now >= next_full_scan || changes.rescan_all {
                self.full_scan();
                next_full_scan = now + self.settings.rescan_interval;
            } else {
                for pod_dir in &changes.rescan {
                    self.rescan_pod_dir(pod_dir);
                }
            }
            for pod_dir in changes.written.iter().chain(&changes.rescan) {
                self.poke_pod_dir(pod_dir);
            }
            if changes.shutdown {
                break;
            }
            let Some(progressed) = self.read_pass() else { break };
            let timeout = if progressed {
                Duration::ZERO
            } else {
                let next_poll = self.tails.values().filter(|t| t.is_open()).map(|t| t.next_poll).min();
                let wake_at = next_poll.unwrap_or(next_full_scan).min(next_full_scan);
                wake_at.saturating_duration_since(Instant::now()).min(Duration::from_secs(1))
            };
            changes = self.wake.wait(timeout);
        }
        tracing::debug!("tailer stopped");
    }

    /// One turn over every due container. `None` when downstream is gone.
    fn read_pass(&mut self) -> Option<bool> {
        let now = Instant::now();
        let mut progressed = false;
        let mut open = 0;
        for tail in self.tails.values_mut() {
            if self.inflight.load(Ordering::Acquire) >= self.settings.max_inflight_bytes {
                // Downstream is behind: the files on disk are the buffer. Look again shortly.
                progressed = false;
                std::thread::sleep(Duration::from_millis(5));
                break;
            }
            if tail.next_poll <= now {
                if let Some((chunk, lost)) = tail.step(&self.checkpoints, &self.settings.limits, now) {
                    count_lost(&self.metrics, &tail.info().reference, lost);
                    if !chunk.records.is_empty() || chunk.read_bytes > 0 {
                        progressed = true;
                        self.inflight.fetch_add(chunk.read_bytes, Ordering::AcqRel);
                        self.out.blocking_send(chunk).ok()?;
                    }
                }
            }
            open += usize::from(tail.is_open());
        }
        self.metrics.files_tailed.set(open as i64);
        Some(progressed)
    }

    fn full_scan(&mut self) {
        if self.watcher.is_none() {
            self.watcher = wake::watch(&self.settings.pods_dir, self.wake.clone());
        }
        let scan = match scan::scan_all(&self.settings.pods_dir, &self.settings.exclude_namespaces, &mut self.cache) {
            Ok(scan) => scan,
            Err(e) => {
                tracing::warn!(dir = %self.settings.pods_dir.display(), error = %e, "cannot scan pods_dir; will retry");
                return;
            }
        };
        self.cache.retain_seen(&scan);
        let gone: Vec<ContainerRef> = self.tails.keys().filter(|r| !scan.contains_key(r)).cloned().collect();
        self.apply(scan, gone);
        if !self.settings.multiline.is_empty() {
            for tail in self.tails.values_mut() {
                let rule = multiline_rule(&self.settings.multiline, self.pods.as_deref(), &tail.info().reference);
                tail.set_multiline(rule);
            }
        }
        self.collect_checkpoint_garbage();
        let backlog: u64 = self.tails.values().map(|t| t.backlog(&self.checkpoints)).sum();
        self.metrics.backlog_bytes.set(backlog as i64);
    }

    fn rescan_pod_dir(&mut self, pod_dir: &Path) {
        let mut scan = Scan::new();
        scan::scan_pod_dir(pod_dir, &self.settings.pods_dir, &self.settings.exclude_namespaces, &mut self.cache, &mut scan);
        let dir_name = pod_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let gone: Vec<ContainerRef> = self.tails.keys().filter(|r| pod_dir_name(r) == dir_name && !scan.contains_key(r)).cloned().collect();
        self.apply(scan, gone);
    }

    /// Merges a scan: new containers get a tail, known ones their new chain, vanished ones
    /// are read to their end and dropped.
    fn apply(&mut self, scan: Scan, gone: Vec<ContainerRef>) {
        let newest_restart: HashMap<(String, String), u32> = scan.keys().fold(HashMap::new(), |mut m, r| {
            let e = m.entry((pod_dir_name(r), r.container.clone())).or_insert(r.restart);
            *e = (*e).max(r.restart);
            m
        });
        let mut links = None;
        for (reference, chain) in scan {
            let restarted = newest_restart[&(pod_dir_name(&reference), reference.container.clone())] > reference.restart;
            let tail = self.tails.entry(reference.clone()).or_insert_with(|| {
                let links = links.get_or_insert_with(|| container_links(&self.settings.containers_dir));
                let info = container_info(&self.settings.pods_dir, reference.clone(), links);
                tracing::info!(namespace = %info.reference.namespace, pod = %info.reference.pod, container = %info.reference.container, restart = info.reference.restart, "tailing container");
                let mut tail = ContainerTail::new(Arc::new(info), self.settings.limits.max_line_bytes);
                tail.set_multiline(multiline_rule(&self.settings.multiline, self.pods.as_deref(), &reference));
                tail
            });
            let lost = tail.update(chain, &self.checkpoints);
            count_lost(&self.metrics, &tail.info().reference, lost);
            if restarted {
                tail.set_final();
            }
        }
        for reference in gone {
            if let Some(tail) = self.tails.get_mut(&reference) {
                let lost = tail.update(Vec::new(), &self.checkpoints);
                count_lost(&self.metrics, &reference, lost);
                tail.set_final();
            }
        }
        let checkpoints = &self.checkpoints;
        self.tails.retain(|_, t| !t.is_done(checkpoints));
    }

    fn poke_pod_dir(&mut self, pod_dir: &Path) {
        let Some(name) = pod_dir.file_name().and_then(|n| n.to_str()) else { return };
        for (reference, tail) in self.tails.iter_mut() {
            if pod_dir_name(reference) == name {
                tail.poke();
            }
        }
    }

    /// Forgets checkpoints of files that exist no more. An acknowledgement still in flight
    /// may bring one back; the next full scan removes it again.
    fn collect_checkpoint_garbage(&self) {
        let live: HashSet<FileId> = self.tails.values().flat_map(|t| t.file_ids()).collect();
        for (id, entry) in self.checkpoints.snapshot() {
            if !live.contains(&id) {
                tracing::debug!(path = %entry.path.display(), "forgetting checkpoint of a removed file");
                self.checkpoints.forget(id);
            }
        }
    }
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
    let app = pods.and_then(|p| p.get(&r.pod_uid)).map_or_else(|| r.pod.clone(), |p| p.app.clone());
    rules.iter().find(|(glob, _)| glob.is_match(&app)).map(|(_, rule)| rule.clone())
}

fn pod_dir_name(r: &ContainerRef) -> String {
    format!("{}_{}_{}", r.namespace, r.pod, r.pod_uid)
}

fn count_lost(metrics: &TailerMetrics, reference: &ContainerRef, lost: Vec<Lost>) {
    for l in lost {
        tracing::warn!(path = %l.path.display(), bytes = l.bytes, namespace = %reference.namespace, pod = %reference.pod, "log file removed before it was read; bytes lost");
        metrics.lost_bytes.inc_by(l.bytes);
    }
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
    let live = pods_dir.join(pod_dir_name(&reference)).join(&reference.container).join(format!("{}.log", reference.restart));
    let target = std::fs::read_link(&live).ok();
    let from_target = target.as_ref().and_then(|t| path::container_id_in(t.to_str()?)).map(str::to_string);
    let runtime = target.as_ref().filter(|t| t.to_string_lossy().contains("/docker/")).map(|_| "docker");
    let container_id = from_target.or_else(|| links.get(&live).cloned());
    ContainerInfo { reference, container_id, runtime }
}
