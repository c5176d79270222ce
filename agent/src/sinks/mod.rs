//! Where records go. Each sink is a task that takes [`Batch`]es in read order and
//! acknowledges each one once it is delivered (or rejected for good), so checkpoints advance
//! only past what every sink has taken.

pub mod ecs;
pub mod elasticsearch;
pub mod stdout;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::logs::source::FileId;

/// Encoded documents of one chunk, shared by every sink.
#[derive(Debug)]
pub struct Batch {
    /// Read order; the unit of acknowledgement.
    pub seq: u64,
    /// The file the records came from (with each offset, the document id).
    pub file: FileId,
    /// The documents.
    pub docs: ecs::Documents,
}

/// Labels of `nodelens_sink_records_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkOutcomeLabels {
    /// `stdout` or `elasticsearch`.
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
}

impl Default for SinkMetrics {
    fn default() -> Self {
        SinkMetrics {
            records: Family::default(),
            request_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16))),
            retries: Family::default(),
            dropped: Family::default(),
        }
    }
}
