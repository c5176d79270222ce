//! The OTLP log sink: batches' `ResourceLogs` put together into `ExportLogsServiceRequest`s
//! of up to `batch_max_bytes`, over OTLP/HTTP or gRPC ([`crate::otlp`]).
//!
//! A batch is acknowledged once its request has settled: accepted (the records the receiver
//! names in `partial_success` counted as rejected, with its message), or its data refused
//! (400, INVALID_ARGUMENT, or too large for the receiver even alone) `max_attempts` times
//! (counted as rejected). A request too large is split. Every other failure is retried
//! without end, waiting at least as long as the receiver asks, and meanwhile the tailer
//! pauses and the files wait on disk. Every record carries `log.record.uid`, so what
//! a lost answer makes us send twice can be told downstream.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Batch, ReasonLabels, SinkLabels, SinkMetrics, SinkOutcomeLabels};
use crate::config::OtlpSinkConfig;
use crate::logs::ack::AckMsg;
use crate::logs::budget::ReadBudget;
use crate::otlp::{self, Exporter, FailureKind, Payload};
use crate::packed::{Packer, INLINE_WORK};

const SINK: &str = "otlp";

/// The exporter settings of `sinks.otlp`.
pub fn settings(config: &OtlpSinkConfig) -> otlp::Settings {
    otlp::Settings {
        key: "sinks.otlp",
        endpoint: config.endpoint.clone(),
        protocol: config.protocol,
        headers: config.headers.clone(),
        compression: config.compression,
        ca_file: config.ca_file.clone(),
        timeout: config.request_timeout,
    }
}

/// Runs the sink until its input closes, then delivers what it holds and returns. Up to
/// `max_concurrent_requests` requests are in flight.
pub async fn run(
    config: OtlpSinkConfig,
    exporter: Exporter,
    batches: mpsc::Receiver<Arc<Batch>>,
    acks: mpsc::Sender<AckMsg>,
    budget: Arc<ReadBudget>,
    metrics: SinkMetrics,
) -> anyhow::Result<()> {
    let last_rejection = Arc::new(Mutex::new(String::new()));
    let requests = super::Requests {
        flush_interval: config.flush_interval,
        max_bytes: config.batch_max_bytes,
        concurrency: config.max_concurrent_requests,
        reading: Some(budget),
    };
    let size = |b: &Batch| b.otlp.plain_len();
    super::run_deliveries(batches, acks, requests, size, move |pending| {
        let (exporter, metrics, config, last_rejection) = (exporter.clone(), metrics.clone(), config.clone(), last_rejection.clone());
        async move { deliver(&exporter, &pending, &config, &Tally { metrics: &metrics, last_rejection: &last_rejection }).await }
    })
    .await
}

/// Counts outcomes, and says why records were rejected once per distinct reason in a row.
struct Tally<'a> {
    metrics: &'a SinkMetrics,
    last_rejection: &'a Mutex<String>,
}

impl Tally<'_> {
    fn count(&self, outcome: &'static str, n: usize) {
        if n > 0 {
            self.metrics.records.get_or_create(&SinkOutcomeLabels { sink: SINK, outcome }).inc_by(n as u64);
        }
    }

    fn reject(&self, n: usize, reason: &'static str, message: &str) {
        self.count("rejected", n);
        self.metrics.dropped.get_or_create(&ReasonLabels { reason }).inc_by(n as u64);
        let mut last = self.last_rejection.lock().unwrap_or_else(|e| e.into_inner());
        if *last != message {
            tracing::warn!(count = n, reason = %message, "the OTLP receiver rejected records; they will not be sent again");
            *last = message.to_string();
        } else {
            tracing::debug!(count = n, reason = %message, "the OTLP receiver rejected records");
        }
    }
}

/// The request of `run`'s batches: their pieces, shared; put together off the async threads
/// when small pieces in it take more than a little compressing.
async fn payload(exporter: &Exporter, run: &[Arc<Batch>]) -> Payload {
    if run.iter().map(|b| b.otlp.work(exporter.gzip())).sum::<usize>() <= INLINE_WORK {
        return Packer::with(|packer| exporter.payload(run.iter().map(|b| &b.otlp), packer));
    }
    let (owned, batches) = (exporter.clone(), run.to_vec());
    let made = tokio::task::spawn_blocking(move || Packer::with(|packer| owned.payload(batches.iter().map(|b| &b.otlp), packer)));
    match made.await {
        Ok(payload) => payload,
        // Only a runtime shutting down refuses the task: put it together here.
        Err(_) => Packer::with(|packer| exporter.payload(run.iter().map(|b| &b.otlp), packer)),
    }
}

/// Delivers every record of `batches`, returning once each has settled: how long the first
/// export took to be accepted, if it was (it carried them all).
async fn deliver(exporter: &Exporter, batches: &[Arc<Batch>], config: &OtlpSinkConfig, tally: &Tally<'_>) -> Option<Duration> {
    let sink = SinkLabels { sink: SINK };
    let (mut exports, mut first) = (0u32, None);
    let mut runs: VecDeque<&[Arc<Batch>]> = VecDeque::from([batches]);
    while let Some(run) = runs.pop_front() {
        let records: usize = run.iter().map(|b| b.records).sum();
        let request = payload(exporter, run).await;
        let (mut attempt, mut refused) = (0u32, 0u32);
        loop {
            exports += 1;
            match exporter.export(&request).await {
                Ok((accepted, took)) => {
                    if exports == 1 {
                        first = Some(took);
                    }
                    tally.metrics.request_duration.get_or_create(&sink).observe(took.as_secs_f64());
                    let rejected = (accepted.rejected as usize).min(records);
                    tally.count("delivered", records - rejected);
                    if rejected > 0 {
                        let message = if accepted.message.is_empty() { "no reason given" } else { accepted.message.as_str() };
                        tally.reject(rejected, "rejected", message);
                    }
                    break;
                }
                Err(failure) if failure.kind == FailureKind::TooLarge && run.len() > 1 => {
                    let (first, second) = run.split_at(run.len() / 2);
                    runs.push_front(second);
                    runs.push_front(first);
                    break;
                }
                Err(failure) if failure.kind == FailureKind::Retry => {
                    tracing::warn!(error = %failure, attempt, "OTLP export failed; retrying");
                    tally.count("retried", records);
                    super::backoff(tally.metrics, &sink, &mut attempt, failure.retry_after).await;
                }
                Err(failure) => {
                    // The data itself was refused (or one chunk is too large): a few more tries,
                    // in case the receiver was briefly wrong, then given up.
                    refused += 1;
                    if refused >= config.max_attempts {
                        tally.reject(records, "rejected", &failure.to_string());
                        break;
                    }
                    tracing::warn!(error = %failure, attempt = refused, "the OTLP receiver refused the export; trying again");
                    super::backoff(tally.metrics, &sink, &mut attempt, failure.retry_after).await;
                }
            }
        }
    }
    first
}
