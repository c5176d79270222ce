//! Where records go. Each sink is a task that takes [`Batch`]es in read order and
//! acknowledges each one once it is delivered (or rejected for good), so checkpoints advance
//! only past what every sink has taken.

pub mod ecs;
pub mod elasticsearch;
pub mod otlp;
pub mod stdout;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::Compression;
use crate::logs::ack::AckMsg;
use crate::logs::budget::ReadBudget;
use crate::logs::source::FileId;
use crate::packed::{Packed, Packer};

/// The records of one chunk, encoded once for every sink, in each format a sink asked for.
/// What Elasticsearch and OTLP send is held packed (compressed, when they compress) from
/// the moment it is encoded until the batch is acknowledged.
#[derive(Debug)]
pub struct Batch {
    /// Read order; the unit of acknowledgement.
    pub seq: u64,
    /// The file the records came from (with each offset, the document id).
    pub file: FileId,
    /// How many records.
    pub records: usize,
    /// Plain ECS documents, for the stdout sink (empty when it is off).
    pub docs: ecs::Documents,
    /// The `_bulk` lines, an action and a document per record, with each record's end
    /// (empty when there is no Elasticsearch sink).
    pub bulk: Packed,
    /// The records as one `ResourceLogs`, framed as a field of `ExportLogsServiceRequest`
    /// (empty when there is no OTLP sink).
    pub otlp: Packed,
    /// The Elasticsearch data stream of these records when it is not the sink's own
    /// (`data_stream`): the node's logs go to `node_data_stream`, in the same requests.
    pub index: Option<Arc<str>>,
    /// Container-log bytes read for these records (against `logs.max_inflight_bytes`); 0
    /// for the node's logs, Events and GPU runs.
    pub read_bytes: u64,
}

impl Batch {
    /// A batch of `records` from `file`, with nothing encoded yet.
    pub fn new(seq: u64, file: FileId, records: usize, index: Option<Arc<str>>) -> Batch {
        Batch {
            seq,
            file,
            records,
            docs: ecs::Documents::default(),
            bulk: Packed::default(),
            otlp: Packed::default(),
            index,
            read_bytes: 0,
        }
    }

    /// Memory the batch holds (its documents, its packed bytes).
    pub fn held_bytes(&self) -> usize {
        self.docs.bytes.capacity()
            + self.docs.ends.capacity() * 4
            + self.docs.offsets.capacity() * 8
            + self.bulk.held_bytes()
            + self.otlp.held_bytes()
    }

    /// The batch of container-log records that took `bytes` of reading.
    pub fn read_from(mut self, bytes: u64) -> Batch {
        self.read_bytes = bytes;
        self
    }

    /// The batch with its `_bulk` lines already packed (rendered straight into their piece).
    pub fn with_bulk(mut self, bulk: Packed) -> Batch {
        self.bulk = bulk;
        self
    }

    /// The batch with its `ExportLogsServiceRequest` field already packed.
    pub fn with_otlp(mut self, otlp: Packed) -> Batch {
        self.otlp = otlp;
        self
    }

    /// The batch with `docs` (the ECS documents, each with its offset for its `_id`) and
    /// `otlp` (one encoded `ResourceLogs`, or nothing) packed as `formats` asks. `docs` is
    /// taken only when a sink prints it; otherwise it is left for the caller to reuse. `_bulk`
    /// lines already packed ([`Batch::with_bulk`]) are kept.
    pub fn packed(mut self, docs: &mut ecs::Documents, otlp: &[u8], formats: Formats, packer: &mut Packer) -> Batch {
        if let Some(compression) = formats.bulk.filter(|_| !docs.is_empty() && self.bulk.is_empty()) {
            let (file, index) = (self.file, self.index.as_deref());
            self.bulk = packer.pack_with(compression == Compression::Gzip, |plain| elasticsearch::bulk::lines(file, index, docs, plain));
        }
        if let Some(compression) = formats.otlp.filter(|_| !otlp.is_empty()) {
            let mut piece = packer.piece(compression == Compression::Gzip);
            piece.write(&crate::otlp::logs::frame_head(otlp.len()));
            piece.write(otlp);
            self.otlp = piece.finish(Vec::new());
        }
        if formats.ecs {
            self.docs = std::mem::take(docs);
        }
        self
    }
}

/// The encodings the producers of batches write for the sinks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    /// Plain ECS documents (stdout).
    pub ecs: bool,
    /// `_bulk` lines of ECS documents, packed so (Elasticsearch).
    pub bulk: Option<Compression>,
    /// OTLP `ResourceLogs`, packed so.
    pub otlp: Option<Compression>,
}

impl Formats {
    /// Whether ECS documents are rendered (for stdout or Elasticsearch).
    pub fn documents(&self) -> bool {
        self.ecs || self.bulk.is_some()
    }

    /// Whether OTLP records are encoded.
    pub fn otlp_records(&self) -> bool {
        self.otlp.is_some()
    }

    /// What `self` and `other` ask for together.
    pub fn and(self, other: Formats) -> Formats {
        Formats { ecs: self.ecs || other.ecs, bulk: self.bulk.or(other.bulk), otlp: self.otlp.or(other.otlp) }
    }
}

/// Labels of `nodelens_sink_records_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkOutcomeLabels {
    /// `stdout`, `elasticsearch` or `otlp`.
    pub sink: &'static str,
    /// `delivered`, `duplicate`, `rejected` or `retried`.
    pub outcome: &'static str,
}

/// Labels of per-sink series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// The sink.
    pub sink: &'static str,
}

/// Labels of `nodelens_log_records_dropped_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why the records were dropped.
    pub reason: &'static str,
}

/// The sinks' metric handles, shared by every sink.
#[derive(Clone)]
pub struct SinkMetrics {
    /// `nodelens_sink_records_total`.
    pub records: Family<SinkOutcomeLabels, Counter>,
    /// `nodelens_sink_request_duration_seconds`.
    pub request_duration: Family<SinkLabels, Histogram>,
    /// `nodelens_sink_retries_total`: requests retried after a failure.
    pub retries: Family<SinkLabels, Counter>,
    /// `nodelens_log_records_dropped_total`: records a sink will never deliver.
    pub dropped: Family<ReasonLabels, Counter>,
    /// `nodelens_otlp_metric_points_total`: data points of the OTLP metrics push.
    pub pushed_points: Family<crate::otlp::metrics::OutcomeLabels, Counter>,
}

impl Default for SinkMetrics {
    fn default() -> Self {
        SinkMetrics {
            records: Family::default(),
            request_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16))),
            retries: Family::default(),
            dropped: Family::default(),
            pushed_points: Family::default(),
        }
    }
}

/// How a sink puts batches together into requests.
#[derive(Debug, Clone)]
pub struct Requests {
    /// Longest a batch waits for its request to fill.
    pub flush_interval: Duration,
    /// Size at which a request is sent (as the sink measures batches).
    pub max_bytes: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// The container logs' read-ahead: while reading is held at its bound, a request goes
    /// once every chunk read is with the sinks, or at once when it holds its share of the
    /// bound (see [`gather`]).
    pub reading: Option<Arc<ReadBudget>>,
}

/// Runs a sink until its input closes, then delivers what it holds and returns. Batches are
/// gathered into requests as `requests` says (`size` measuring each) once a delivery slot is
/// free (so batches that arrive while every slot is busy join the next request), up to
/// `concurrency` are delivered at once by `deliver`, and each batch is acknowledged when its
/// delivery returns; the committer advances checkpoints in read order whatever order they
/// settle in. A delivery returns how long its first request took to be answered, when that
/// request carried the whole delivery and was answered (not split up front, not refused as too
/// large, not lost to a connection error): only such a request, sent while no other was in
/// flight, times the sink's round trip for the read-ahead's pacing.
pub async fn run_deliveries<F: Future<Output = Option<Duration>> + Send + 'static>(
    mut batches: mpsc::Receiver<Arc<Batch>>,
    acks: mpsc::Sender<AckMsg>,
    requests: Requests,
    size: impl Fn(&Batch) -> usize,
    deliver: impl Fn(Arc<[Arc<Batch>]>) -> F,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(requests.concurrency));
    let mut deliveries = JoinSet::new();
    let mut open = true;
    // A batch that would have taken the last request over `max_bytes` starts the next one.
    let mut next: Option<Arc<Batch>> = None;
    while open {
        let first = match next.take() {
            Some(batch) => batch,
            None => match batches.recv().await {
                Some(batch) => batch,
                None => break,
            },
        };
        // Waiting for a slot is the back-pressure: batches queue up, then the tailer pauses.
        let slot = slots.clone().acquire_owned().await?;
        let pending: Arc<[Arc<Batch>]>;
        (pending, next, open) = gather(&mut batches, first, &requests, &size).await;
        let (delivery, acks) = (deliver(pending.clone()), acks.clone());
        // A request sent while none of the others is in flight times the sink's round trip.
        let lone = (slots.available_permits() + 1 == requests.concurrency).then(|| requests.reading.clone()).flatten();
        deliveries.spawn(async move {
            let answered = delivery.await;
            if let (Some(reading), Some(took)) = (lone, answered) {
                reading.request_took(took);
            }
            drop(slot);
            for batch in pending.iter() {
                // The committer is gone only at shutdown, when nothing more can be committed.
                let _ = acks.send(AckMsg::Ack { seq: batch.seq }).await;
            }
        });
        while let Some(done) = deliveries.try_join_next() {
            done?;
        }
    }
    while let Some(done) = deliveries.join_next().await {
        done?;
    }
    Ok(())
}

/// Takes batches after `first` while they fit in `max_bytes` (as `size` measures them), until
/// `flush_interval` has passed or reading is held and either every chunk read has been
/// encoded and handed to the sinks (nothing more can come) or the request already holds its
/// share of the bound in container bytes read (the bound over `concurrency`: the other
/// requests carry the rest, overlapping). A batch that does not fit is returned to start the next request:
/// requests are made of whole batches, sent as they are held, and a batch is only ever split
/// when it is larger than `max_bytes` alone. The flag is false when the input was seen closed
/// (one closed while the last batches were taken is seen by the next receive).
async fn gather(
    batches: &mut mpsc::Receiver<Arc<Batch>>,
    first: Arc<Batch>,
    requests: &Requests,
    size: impl Fn(&Batch) -> usize,
) -> (Arc<[Arc<Batch>]>, Option<Arc<Batch>>, bool) {
    let deadline = Instant::now() + requests.flush_interval;
    let mut bytes = size(&first);
    let mut read = first.read_bytes;
    let mut pending = vec![first];
    while bytes < requests.max_bytes {
        let held = async {
            match &requests.reading {
                Some(reading) if read >= reading.limit() / requests.concurrency.max(1) as u64 => reading.until_held().await,
                Some(reading) => reading.until_settled().await,
                None => std::future::pending().await,
            }
        };
        let batch = tokio::select! {
            biased;
            batch = batches.recv() => match batch {
                Some(batch) => batch,
                None => return (pending.into(), None, false),
            },
            // A batch handed over as reading settled joins this request, not the next.
            () = held => match batches.try_recv() {
                Ok(batch) => batch,
                Err(_) => break,
            },
            () = tokio::time::sleep_until(deadline) => break,
        };
        if bytes + size(&batch) > requests.max_bytes {
            return (pending.into(), Some(batch), true);
        }
        bytes += size(&batch);
        read += batch.read_bytes;
        pending.push(batch);
    }
    (pending.into(), None, true)
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Waits before a retry and counts it: exponential backoff with jitter (half the step plus a
/// random part of the other half), and at least what the receiver asked for.
pub async fn backoff(metrics: &SinkMetrics, sink: &SinkLabels, attempt: &mut u32, at_least: Option<Duration>) {
    metrics.retries.get_or_create(sink).inc();
    let step = MIN_BACKOFF.saturating_mul(1 << (*attempt).min(16)).min(MAX_BACKOFF);
    *attempt += 1;
    let jitter = step.mul_f64(fastrand::f64() / 2.0);
    tokio::time::sleep((step / 2 + jitter).max(at_least.unwrap_or_default())).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, bytes: usize) -> Arc<Batch> {
        read_batch(seq, bytes, 0)
    }

    /// A batch of `bytes` of documents from `read` bytes of container logs.
    fn read_batch(seq: u64, bytes: usize, read: u64) -> Arc<Batch> {
        let docs = ecs::Documents { bytes: vec![b'x'; bytes], ..ecs::Documents::default() };
        Arc::new(Batch {
            seq,
            file: FileId { container: 1, fingerprint: 2 },
            records: 1,
            docs,
            bulk: Packed::default(),
            otlp: Packed::default(),
            index: None,
            read_bytes: read,
        })
    }

    /// One request at a time of up to 1,000 bytes every 5 s, gathered against a 1 MiB read
    /// budget.
    fn budgeted() -> (Arc<ReadBudget>, Requests) {
        let budget = Arc::new(ReadBudget::new(1 << 20));
        (budget.clone(), Requests { flush_interval: Duration::from_secs(5), max_bytes: 1000, concurrency: 1, reading: Some(budget) })
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_sent_when_full_or_at_the_flush_interval_whichever_comes_first() {
        let (tx, mut rx) = mpsc::channel(16);
        let size = |b: &Batch| b.docs.bytes.len();
        // Alone, a batch waits the whole flush interval for company.
        let started = Instant::now();
        let requests = Requests { flush_interval: Duration::from_secs(5), max_bytes: 1000, concurrency: 1, reading: None };
        let (pending, next, open) = gather(&mut rx, batch(1, 100), &requests, size).await;
        assert_eq!((pending.len(), next.is_none(), open), (1, true, true));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // Batches arriving meanwhile join it while they fit; the first that does not starts
        // the next request, and this one goes at once.
        let started = Instant::now();
        let feeder = tokio::spawn(async move {
            for (seq, bytes) in [(2, 400), (3, 400), (4, 400), (5, 200), (6, 1500), (7, 100)] {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tx.send(batch(seq, bytes)).await.unwrap();
            }
        });
        let seqs = |pending: &[Arc<Batch>]| pending.iter().map(|b| b.seq).collect::<Vec<_>>();
        let (pending, next, _) = gather(&mut rx, batch(1, 300), &requests, size).await;
        assert_eq!((seqs(&pending), next.as_ref().map(|b| b.seq)), (vec![1, 2], Some(3)));
        assert_eq!(started.elapsed(), Duration::from_secs(2), "closed by the third arrival, not at the interval");
        // Exactly full goes at once, without waiting for another.
        let (pending, next, _) = gather(&mut rx, next.unwrap(), &requests, size).await;
        assert_eq!((seqs(&pending), next.is_none()), (vec![3, 4, 5], true));
        assert_eq!(started.elapsed(), Duration::from_secs(4));
        // A batch larger than a request alone is a request of its own.
        let (pending, next, _) = gather(&mut rx, batch(8, 100), &requests, size).await;
        assert_eq!((seqs(&pending), next.as_ref().map(|b| b.seq)), (vec![8], Some(6)));
        let (pending, next, _) = gather(&mut rx, next.unwrap(), &requests, size).await;
        assert_eq!((seqs(&pending), next.is_none()), (vec![6], true));
        feeder.await.unwrap();
        // A closed input ends the gathering at once, with what it has.
        drop(rx);
    }

    #[tokio::test(start_paused = true)]
    async fn every_request_holds_whole_batches_within_max_bytes_and_every_batch_goes_once_in_order() {
        let (tx, rx) = mpsc::channel(64);
        let (ack_tx, _acks) = mpsc::channel(256);
        let requests = Requests { flush_interval: Duration::from_millis(100), max_bytes: 1000, concurrency: 2, reading: None };
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = sent.clone();
        let sink = tokio::spawn(run_deliveries(
            rx,
            ack_tx,
            requests,
            |b| b.docs.bytes.len(),
            move |pending| {
                log.lock().unwrap().push(pending.iter().map(|b| (b.seq, b.docs.bytes.len())).collect::<Vec<_>>());
                async { None }
            },
        ));
        let sizes: Vec<usize> = (0..200u64).map(|i| [120, 350, 999, 1, 480, 2500, 60][(i * 7 % 11) as usize % 7]).collect();
        for (seq, bytes) in sizes.iter().enumerate() {
            tx.send(batch(seq as u64, *bytes)).await.unwrap();
        }
        drop(tx);
        sink.await.unwrap().unwrap();
        let sent = sent.lock().unwrap();
        for request in sent.iter() {
            let bytes: usize = request.iter().map(|(_, b)| b).sum();
            assert!(bytes <= 1000 || request.len() == 1, "a request over max_bytes of more than one batch: {request:?}");
        }
        let order: Vec<u64> = sent.iter().flatten().map(|(seq, _)| *seq).collect();
        assert_eq!(order, (0..200).collect::<Vec<_>>());
        assert!(sent.iter().any(|r| r.len() > 2), "batches were gathered at all: {sent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn while_reading_is_held_a_request_goes_with_what_is_queued_instead_of_waiting_the_interval() {
        let (tx, mut rx) = mpsc::channel(16);
        let size = |b: &Batch| b.docs.bytes.len();
        let (budget, requests) = budgeted();
        // Reading goes on: the request waits for company as without a budget.
        let started = Instant::now();
        let (pending, _, _) = gather(&mut rx, batch(1, 100), &requests, size).await;
        assert_eq!((pending.len(), started.elapsed()), (1, Duration::from_secs(5)));
        // Held at its bound: what is queued goes at once.
        budget.take(1 << 20);
        assert!(budget.is_full());
        tx.send(batch(2, 100)).await.unwrap();
        tx.send(batch(3, 100)).await.unwrap();
        let started = Instant::now();
        let (pending, _, open) = gather(&mut rx, batch(1, 100), &requests, size).await;
        assert_eq!(pending.iter().map(|b| b.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!((open, started.elapsed()), (true, Duration::ZERO));
        // Held in the middle of a gathering: it goes within a poll.
        budget.reading();
        let held_later = {
            let budget = budget.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                assert!(budget.is_full());
            })
        };
        let started = Instant::now();
        let (pending, _, _) = gather(&mut rx, batch(4, 100), &requests, size).await;
        assert_eq!(pending.len(), 1);
        assert_eq!(started.elapsed(), Duration::from_secs(2), "woken when reading is held, not at the interval");
        held_later.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn while_reading_is_held_a_request_waits_for_the_chunks_still_being_encoded_then_goes_at_once() {
        let (tx, mut rx) = mpsc::channel(16);
        let size = |b: &Batch| b.docs.bytes.len();
        let (budget, requests) = budgeted();
        // Two chunks read, then reading held at its bound; the first one's batch is here.
        budget.chunk_read();
        budget.chunk_read();
        budget.take(1 << 20);
        assert!(budget.is_full());
        budget.chunk_encoded();
        let encoder = {
            let (budget, tx) = (budget.clone(), tx.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                tx.send(batch(2, 100)).await.unwrap();
                budget.chunk_encoded();
            })
        };
        let started = Instant::now();
        let (pending, _, _) = gather(&mut rx, batch(1, 100), &requests, size).await;
        assert_eq!(pending.iter().map(|b| b.seq).collect::<Vec<_>>(), [1, 2], "the chunk being encoded joined the request");
        assert_eq!(started.elapsed(), Duration::from_millis(300), "sent once it was encoded, not at the interval");
        encoder.await.unwrap();
        // Nothing left to encode: the next request goes at once.
        tx.send(batch(4, 100)).await.unwrap();
        let started = Instant::now();
        let (pending, _, _) = gather(&mut rx, batch(3, 100), &requests, size).await;
        assert_eq!((pending.len(), started.elapsed()), (2, Duration::ZERO));
        // A request that holds its share of the bytes in flight (the bound over the
        // concurrency) goes at once, whatever is still being encoded: others carry the rest.
        let requests = Requests { concurrency: 4, ..requests };
        budget.chunk_read();
        let share = budget.limit() / 4;
        let (pending, _, _) = gather(&mut rx, read_batch(5, 100, share - 1), &requests, size).await;
        assert_eq!(
            (pending.len(), started.elapsed()),
            (1, Duration::from_secs(5)),
            "under its share: waits for the chunk, or the interval"
        );
        let started = Instant::now();
        let (pending, _, _) = gather(&mut rx, read_batch(6, 100, share), &requests, size).await;
        assert_eq!((pending.len(), started.elapsed()), (1, Duration::ZERO), "its share: at once");
        budget.chunk_encoded();
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_with_jitter_up_to_thirty_seconds_and_waits_at_least_what_was_asked() {
        let (metrics, sink) = (SinkMetrics::default(), SinkLabels { sink: "test" });
        let mut attempt = 0;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let started = Instant::now();
            backoff(&metrics, &sink, &mut attempt, None).await;
            waits.push(started.elapsed());
        }
        for (n, wait) in waits.iter().enumerate() {
            let step = MIN_BACKOFF.saturating_mul(1 << n).min(MAX_BACKOFF);
            assert!(*wait >= step / 2 && *wait <= step, "attempt {n}: {wait:?} against a step of {step:?}");
        }
        assert_eq!(metrics.retries.get_or_create(&sink).get(), 12, "every retry counted");
        let started = Instant::now();
        backoff(&metrics, &sink, &mut 0, Some(Duration::from_secs(7))).await;
        assert_eq!(started.elapsed(), Duration::from_secs(7), "a receiver's retry delay is honoured");
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_lone_whole_request_answered_times_the_sinks_round_trip() {
        use crate::logs::budget::Pacer;
        let budget = Arc::new(ReadBudget::new(1 << 20));
        let (tx, rx) = mpsc::channel(16);
        let (ack_tx, mut acks) = mpsc::channel(64);
        let requests = Requests { flush_interval: Duration::from_millis(1), max_bytes: 1, concurrency: 1, reading: Some(budget.clone()) };
        // Each delivery: how long it takes, and its first request's answer time, if it counts.
        let answers = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from([
            (Duration::from_millis(900), None),
            (Duration::from_millis(700), Some(Duration::from_millis(20))),
        ])));
        let sink = tokio::spawn(run_deliveries(
            rx,
            ack_tx,
            requests,
            |b| b.docs.bytes.len(),
            move |_| {
                let answers = answers.clone();
                async move {
                    let (took, first) = answers.lock().unwrap().pop_front().expect("two deliveries");
                    tokio::time::sleep(took).await;
                    first
                }
            },
        ));
        let mut pacer = Pacer::default();
        tx.send(batch(0, 10)).await.unwrap();
        assert!(matches!(acks.recv().await, Some(AckMsg::Ack { seq: 0 })));
        pacer.adjust(&budget);
        assert_eq!(pacer.round_trip(), Duration::ZERO, "a delivery whose first request does not count times nothing");
        tx.send(batch(1, 10)).await.unwrap();
        assert!(matches!(acks.recv().await, Some(AckMsg::Ack { seq: 1 })));
        pacer.adjust(&budget);
        assert_eq!(pacer.round_trip(), Duration::from_millis(20), "the first request's answer, not the retries after it");
        drop(tx);
        sink.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_run_at_most_concurrency_at_once_and_every_batch_is_acknowledged() {
        let (tx, rx) = mpsc::channel(16);
        let (ack_tx, mut acks) = mpsc::channel(64);
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let requests = Requests { flush_interval: Duration::from_millis(100), max_bytes: 1, concurrency: 2, reading: None };
        let (r, m) = (running.clone(), most.clone());
        let sink = tokio::spawn(run_deliveries(
            rx,
            ack_tx,
            requests,
            |b| b.docs.bytes.len(),
            move |_| {
                let (running, most) = (r.clone(), m.clone());
                async move {
                    let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    None
                }
            },
        ));
        let started = Instant::now();
        for seq in 0..6 {
            tx.send(batch(seq, 10)).await.unwrap();
        }
        drop(tx);
        sink.await.unwrap().unwrap();
        let mut acked = Vec::new();
        while let Ok(AckMsg::Ack { seq }) = acks.try_recv() {
            acked.push(seq);
        }
        acked.sort_unstable();
        assert_eq!(acked, [0, 1, 2, 3, 4, 5]);
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(started.elapsed(), Duration::from_secs(30), "three rounds of two 10 s deliveries");
    }
}
