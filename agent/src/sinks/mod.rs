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

use crate::logs::ack::AckMsg;
use crate::logs::source::FileId;

/// The records of one chunk, encoded once for every sink, in each format a sink asked for.
#[derive(Debug)]
pub struct Batch {
    /// Read order; the unit of acknowledgement.
    pub seq: u64,
    /// The file the records came from (with each offset, the document id).
    pub file: FileId,
    /// How many records.
    pub records: usize,
    /// The ECS documents (empty when no sink takes them).
    pub docs: ecs::Documents,
    /// The records as one encoded OTLP `ResourceLogs` (empty when no sink takes it).
    pub otlp: Vec<u8>,
    /// The Elasticsearch data stream of these records when it is not the sink's own
    /// (`data_stream`): the node's logs go to `node_data_stream`, in the same requests.
    pub index: Option<Arc<str>>,
}

/// The encodings the encoder writes for the sinks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    /// ECS JSON documents (Elasticsearch, stdout).
    pub ecs: bool,
    /// OTLP `ResourceLogs`.
    pub otlp: bool,
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
#[derive(Debug, Clone, Copy)]
pub struct Requests {
    /// Longest a batch waits for its request to fill.
    pub flush_interval: Duration,
    /// Size at which a request is sent (as the sink measures batches).
    pub max_bytes: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
}

/// Runs a sink until its input closes, then delivers what it holds and returns. Batches are
/// gathered into requests as `requests` says (`size` measuring each), up to `concurrency`
/// are delivered at once by `deliver`, and each batch is acknowledged when its delivery
/// returns; the committer advances checkpoints in read order whatever order they settle in.
pub async fn run_deliveries<F: Future<Output = ()> + Send + 'static>(
    mut batches: mpsc::Receiver<Arc<Batch>>,
    acks: mpsc::Sender<AckMsg>,
    requests: Requests,
    size: impl Fn(&Batch) -> usize,
    deliver: impl Fn(Arc<[Arc<Batch>]>) -> F,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(requests.concurrency));
    let mut deliveries = JoinSet::new();
    let mut open = true;
    while open {
        let Some(first) = batches.recv().await else { break };
        let pending: Arc<[Arc<Batch>]>;
        (pending, open) = gather(&mut batches, first, requests.flush_interval, requests.max_bytes, &size).await;
        // Waiting for a slot is the back-pressure: batches queue up, then the tailer pauses.
        let slot = slots.clone().acquire_owned().await?;
        let (delivery, acks) = (deliver(pending.clone()), acks.clone());
        deliveries.spawn(async move {
            delivery.await;
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

/// Takes batches after `first` until they reach `max_bytes` (as `size` measures them) or
/// `flush_interval` has passed. The flag is false when the input has closed.
async fn gather(
    batches: &mut mpsc::Receiver<Arc<Batch>>,
    first: Arc<Batch>,
    flush_interval: Duration,
    max_bytes: usize,
    size: impl Fn(&Batch) -> usize,
) -> (Arc<[Arc<Batch>]>, bool) {
    let deadline = Instant::now() + flush_interval;
    let mut bytes = size(&first);
    let mut pending = vec![first];
    while bytes < max_bytes {
        match tokio::time::timeout_at(deadline, batches.recv()).await {
            Ok(Some(batch)) => {
                bytes += size(&batch);
                pending.push(batch);
            }
            Ok(None) => return (pending.into(), false),
            Err(_) => break,
        }
    }
    (pending.into(), true)
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
