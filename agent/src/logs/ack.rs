//! Acknowledgements: a chunk's checkpoint advances once every sink has acknowledged it, and
//! chunks are committed strictly in the order they were read, so a checkpoint never passes a
//! record some sink still holds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use super::budget::{Pacer, ReadBudget, WINDOW};
use super::checkpoint::{Checkpoints, NodePosition};
use super::source::FileId;

/// A message to the [`Committer`].
#[derive(Debug)]
pub enum AckMsg {
    /// Chunk `seq` was handed to `sinks` sinks; once all acknowledge, `file` is done up to `offset`.
    Register {
        /// Order in which chunks were read.
        seq: u64,
        /// The chunk's file.
        file: FileId,
        /// Its path, kept in the checkpoint for people.
        path: PathBuf,
        /// The chunk's commit offset.
        offset: u64,
        /// Bytes the chunk holds against the in-flight budget.
        read_bytes: u64,
        /// How many acknowledgements to wait for.
        sinks: u32,
        /// When it was registered.
        at: Instant,
    },
    /// Node-log batch `seq` was handed to `sinks` sinks; once all acknowledge, its source is
    /// done up to `position`.
    RegisterNode {
        /// Order in which batches were made.
        seq: u64,
        /// The position of the batch's last record.
        position: NodePosition,
        /// How many acknowledgements to wait for.
        sinks: u32,
    },
    /// Batch `seq` of a source that keeps its own state (GPU run reports) was handed to
    /// `sinks` sinks; `done` is set, in order with every other batch, once all acknowledge.
    RegisterNotify {
        /// Order in which batches were made.
        seq: u64,
        /// Set when the batch is done.
        done: Arc<AtomicBool>,
        /// How many acknowledgements to wait for.
        sinks: u32,
    },
    /// One sink is done with chunk `seq` (delivered, or rejected for good).
    Ack {
        /// The chunk.
        seq: u64,
    },
}

/// Registrations handed to the committer without waking it: the runtime is woken for a
/// chunk's batch (by its sinks' queues), not also for its registration.
///
/// A chunk is registered here before any sink has it, so its acknowledgements are always
/// sent after its registration was queued; the committer takes the queue before each message
/// it handles, at each tick and at the end. The queue holds at most the chunks between two
/// messages, and no more than the read budget lets the tailer read ahead.
#[derive(Clone, Default)]
pub struct Registrations(Arc<Mutex<Vec<AckMsg>>>);

/// Registrations whose room the queue keeps once taken: a burst's room is given back.
const KEPT_REGISTRATIONS: usize = 1024;

impl Registrations {
    /// Queues `register` (an [`AckMsg::Register`]: an acknowledgement must not pass the
    /// messages before it) for the committer's next message or tick.
    pub fn push(&self, register: AckMsg) {
        debug_assert!(matches!(register, AckMsg::Register { .. }), "only registrations are queued: {register:?}");
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(register);
    }

    /// The sequence numbers queued.
    #[cfg(test)]
    pub fn queued(&self) -> Vec<u64> {
        let queue = self.0.lock().unwrap();
        queue.iter().filter_map(|m| if let AckMsg::Register { seq, .. } = m { Some(*seq) } else { None }).collect()
    }

    /// What is queued, taken.
    #[cfg(test)]
    pub fn take_all(&self) -> Vec<AckMsg> {
        let mut all = Vec::new();
        self.take(&mut all);
        all
    }

    /// Swaps what is queued into `into` (empty), keeping the queue's storage in circulation.
    fn take(&self, into: &mut Vec<AckMsg>) {
        std::mem::swap(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()), into);
    }
}

struct Waiting {
    done: Done,
    missing: u32,
}

/// Whether checkpoints reach the disk: a full or failing state file system shows here, not
/// only in the log (records acknowledged since the last good write are sent again after a
/// restart).
#[derive(Clone, Default)]
pub struct CheckpointMetrics {
    /// `nodelens_checkpoint_write_errors_total`: attempts to write the checkpoint file that failed.
    pub write_errors: Counter,
    /// `nodelens_checkpoint_last_success_timestamp_seconds`: when the file on disk last held
    /// every acknowledged offset (written, or nothing new to write), Unix seconds.
    pub last_success: Gauge<f64, AtomicU64>,
    /// `nodelens_state_dir_lock_waiting`: 1 while start-up waits for another agent to release
    /// `state_dir`'s lock (the agent is not ready meanwhile).
    pub lock_waiting: Gauge,
}

/// What a chunk's acknowledgement commits.
enum Done {
    /// A container's chunk, registered at `at`.
    File {
        file: FileId,
        path: PathBuf,
        offset: u64,
        read_bytes: u64,
        at: Instant,
    },
    Node(NodePosition),
    Notify(Arc<AtomicBool>),
}

/// Applies acknowledgements in read order and persists checkpoints periodically.
pub struct Committer {
    checkpoints: Arc<Checkpoints>,
    budget: Arc<ReadBudget>,
    pacer: Pacer,
    waiting: BTreeMap<u64, Waiting>,
    metrics: CheckpointMetrics,
    /// Whether the last write failed, so the error is logged once per outage, not every second.
    failing: bool,
}

impl Committer {
    /// A committer over `checkpoints`; `budget` is the tailer's read-ahead, released and paced here.
    pub fn new(checkpoints: Arc<Checkpoints>, budget: Arc<ReadBudget>, metrics: CheckpointMetrics) -> Committer {
        Committer { checkpoints, budget, pacer: Pacer::default(), waiting: BTreeMap::new(), metrics, failing: false }
    }

    /// Handles one message, committing every chunk that is now complete and first in line.
    pub fn handle(&mut self, msg: AckMsg) {
        match msg {
            AckMsg::Register { seq, file, path, offset, read_bytes, sinks, at } => {
                self.waiting.insert(seq, Waiting { done: Done::File { file, path, offset, read_bytes, at }, missing: sinks });
            }
            AckMsg::RegisterNode { seq, position, sinks } => {
                self.waiting.insert(seq, Waiting { done: Done::Node(position), missing: sinks });
            }
            AckMsg::RegisterNotify { seq, done, sinks } => {
                self.waiting.insert(seq, Waiting { done: Done::Notify(done), missing: sinks });
            }
            AckMsg::Ack { seq } => match self.waiting.get_mut(&seq) {
                Some(w) => w.missing = w.missing.saturating_sub(1),
                None => tracing::error!(seq, "acknowledgement for an unknown chunk"),
            },
        }
        while let Some(entry) = self.waiting.first_entry() {
            if entry.get().missing > 0 {
                break;
            }
            match entry.remove().done {
                Done::File { file, path, offset, read_bytes, at } => {
                    self.checkpoints.acknowledge(file, offset, &path);
                    self.budget.release(read_bytes);
                    self.pacer.committed(read_bytes, at.elapsed());
                }
                Done::Node(position) => self.checkpoints.acknowledge_node(position),
                Done::Notify(done) => done.store(true, Ordering::Release),
            }
        }
    }

    /// Chunks handed out and not yet committed.
    pub fn outstanding(&self) -> usize {
        self.waiting.len()
    }

    /// Handles what `registered` holds, in the order it was queued.
    fn take_registered(&mut self, registered: &Registrations, spare: &mut Vec<AckMsg>) {
        registered.take(spare);
        for msg in spare.drain(..) {
            self.handle(msg);
        }
        spare.shrink_to(KEPT_REGISTRATIONS);
    }

    /// Handles `msg`, from the channel, after what was queued in `registered` before it.
    fn receive(&mut self, msg: AckMsg, registered: &Registrations, spare: &mut Vec<AckMsg>) {
        self.take_registered(registered, spare);
        self.handle(msg);
    }

    /// Runs until every sender is gone, persisting every `interval` (a failed write is retried
    /// at the next one) and once at the end, and pacing the read-ahead every [`WINDOW`];
    /// what is queued in `registered` is taken before each message and at each tick.
    pub async fn run(mut self, mut rx: mpsc::Receiver<AckMsg>, registered: Registrations, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pace = tokio::time::interval(WINDOW);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut spare = Vec::new();
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.receive(msg, &registered, &mut spare),
                    None => break,
                },
                _ = tick.tick() => {
                    self.take_registered(&registered, &mut spare);
                    self.persist().await;
                }
                _ = pace.tick() => self.pacer.adjust(&self.budget),
            }
        }
        self.take_registered(&registered, &mut spare);
        if self.outstanding() > 0 {
            tracing::info!(chunks = self.outstanding(), "unacknowledged chunks at shutdown will be read again on start");
        }
        self.persist().await;
    }

    async fn persist(&mut self) {
        let checkpoints = self.checkpoints.clone();
        let result = tokio::task::spawn_blocking(move || checkpoints.persist()).await;
        self.record(result.unwrap_or_else(|e| Err(std::io::Error::other(format!("checkpoint writer panicked: {e}")))));
    }

    /// Counts a write attempt's outcome; logs the first failure and the recovery.
    fn record(&mut self, result: std::io::Result<()>) {
        match result {
            Ok(()) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                self.metrics.last_success.set(now.as_secs_f64());
                if std::mem::take(&mut self.failing) {
                    tracing::info!("checkpoints written again");
                }
            }
            Err(e) => {
                self.metrics.write_errors.inc();
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(error = %e, "cannot write checkpoints; shipping goes on, retrying every second (records acknowledged meanwhile are sent again if the agent restarts before a write succeeds)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(seq: u64, offset: u64, sinks: u32) -> AckMsg {
        AckMsg::Register {
            seq,
            file: FileId { container: 1, fingerprint: 1 },
            path: "/f".into(),
            offset,
            read_bytes: 10,
            sinks,
            at: Instant::now(),
        }
    }

    #[test]
    fn checkpoints_advance_only_in_read_order_and_after_every_sink() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Arc::new(Checkpoints::open(dir.path()).unwrap());
        let budget = Arc::new(ReadBudget::new(1024));
        budget.take(30);
        let mut c = Committer::new(cp.clone(), budget.clone(), CheckpointMetrics::default());
        let id = FileId { container: 1, fingerprint: 1 };
        for seq in 0..3 {
            c.handle(register(seq, (seq + 1) * 100, 2));
        }
        c.handle(AckMsg::Ack { seq: 1 });
        c.handle(AckMsg::Ack { seq: 1 });
        assert_eq!(cp.offset(id), None, "chunk 0 still outstanding");
        c.handle(AckMsg::Ack { seq: 0 });
        assert_eq!(cp.offset(id), None, "chunk 0 needs both sinks");
        c.handle(AckMsg::Ack { seq: 0 });
        assert_eq!(cp.offset(id), Some(200), "0 and 1 commit together");
        assert_eq!(budget.inflight(), 10);
        assert_eq!(c.outstanding(), 1);
    }

    /// A registration queued without a message is applied before the next message: a chunk
    /// registered through the channel after it (one no sink gets) waits behind it, and the
    /// acknowledgement that follows commits both.
    #[test]
    fn queued_registrations_are_applied_before_the_message_that_follows_them() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Arc::new(Checkpoints::open(dir.path()).unwrap());
        let id = FileId { container: 1, fingerprint: 1 };
        let budget = Arc::new(ReadBudget::new(1024));
        budget.take(20);
        let mut c = Committer::new(cp.clone(), budget.clone(), CheckpointMetrics::default());
        let (registered, mut spare) = (Registrations::default(), Vec::new());
        registered.push(register(0, 100, 1));
        c.receive(register(1, 200, 0), &registered, &mut spare);
        assert_eq!((cp.offset(id), budget.inflight()), (None, 20), "the chunk no sink got waits behind the queued one");
        assert!(registered.queued().is_empty());
        c.receive(AckMsg::Ack { seq: 0 }, &registered, &mut spare);
        assert_eq!((cp.offset(id), budget.inflight()), (Some(200), 0), "the acknowledgement found its queued registration");
        // Between messages, registrations keep arriving in the queue.
        registered.push(register(2, 300, 1));
        c.receive(AckMsg::Ack { seq: 2 }, &registered, &mut spare);
        assert_eq!(cp.offset(id), Some(300));
        assert_eq!(c.outstanding(), 0);
    }

    /// The state directory vanishing (as good as a full or failing file system: every write
    /// fails) is counted on every attempt while acknowledgements go on in memory, and the
    /// first attempt after it is back writes the checkpoints and the success time.
    #[tokio::test]
    async fn failed_checkpoint_writes_are_counted_until_one_succeeds() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        let cp = Arc::new(Checkpoints::open(&dir).unwrap());
        let metrics = CheckpointMetrics::default();
        let mut c = Committer::new(cp.clone(), Arc::new(ReadBudget::new(1024)), metrics.clone());
        c.persist().await;
        assert!(metrics.last_success.get() > 1.0e9, "nothing to write is a success: {}", metrics.last_success.get());
        metrics.last_success.set(0.0);
        std::fs::rename(&dir, root.path().join("away")).unwrap();
        c.handle(register(0, 100, 1));
        c.handle(AckMsg::Ack { seq: 0 });
        let mut errors = Vec::new();
        for _ in 0..3 {
            c.persist().await;
            errors.push(metrics.write_errors.get());
        }
        assert_eq!(errors, [1, 2, 3], "every failed attempt counts");
        assert_eq!(metrics.last_success.get(), 0.0, "no success while failing");
        assert_eq!(cp.offset(FileId { container: 1, fingerprint: 1 }), Some(100), "acknowledged in memory meanwhile");
        std::fs::rename(root.path().join("away"), &dir).unwrap();
        c.persist().await;
        assert_eq!(metrics.write_errors.get(), 3, "no failure once the directory is back");
        assert!(metrics.last_success.get() > 1.0e9);
        let on_disk = std::fs::read_to_string(dir.join("checkpoints.json")).unwrap();
        assert!(on_disk.contains("\"offset\":100"), "{on_disk}");
        assert!(
            std::fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")),
            "no temp file left behind"
        );
    }
}
