//! The Elasticsearch sink: `_bulk` `create` requests into a data stream, each record with a
//! deterministic `_id`, so Elasticsearch holds it once however often it is sent.
//!
//! Batches are gathered up to `batch_max_bytes` or `flush_interval`, sent, and acknowledged
//! only when every item has settled: created, already there (409), or rejected for good
//! (4xx, counted and logged). 429 and 5xx items are sent again after a backoff; a request that
//! fails as a whole (connection, timeout, 429/5xx) is sent again, to the next endpoint; a 413
//! request is split. Nothing is dropped while Elasticsearch is away: the sink stops taking
//! batches, the tailer stops reading, and the files on disk wait.

pub mod bulk;
pub mod client;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::bulk::{Item, Outcome};
use self::client::{Client, Reply};
use super::{Batch, ReasonLabels, SinkLabels, SinkMetrics, SinkOutcomeLabels};
use crate::config::ElasticsearchConfig;
use crate::logs::ack::AckMsg;

const SINK: &str = "elasticsearch";
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs the sink until its input closes, then delivers what it holds and returns. Up to
/// `max_concurrent_requests` batches are delivered at once; each is acknowledged when all its
/// records have settled, and the committer advances checkpoints in read order whatever order
/// acknowledgements arrive in.
pub async fn run(
    config: ElasticsearchConfig,
    client: Client,
    mut batches: mpsc::Receiver<Arc<Batch>>,
    acks: mpsc::Sender<AckMsg>,
    metrics: SinkMetrics,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(config.max_concurrent_requests));
    let mut deliveries = JoinSet::new();
    let mut open = true;
    while open {
        let Some(first) = batches.recv().await else { break };
        let deadline = Instant::now() + config.flush_interval;
        let mut bytes = first.docs.bytes.len();
        let mut pending = vec![first];
        while bytes < config.batch_max_bytes {
            match tokio::time::timeout_at(deadline, batches.recv()).await {
                Ok(Some(batch)) => {
                    bytes += batch.docs.bytes.len();
                    pending.push(batch);
                }
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        // Waiting for a slot is the back-pressure: batches queue up, then the tailer pauses.
        let slot = slots.clone().acquire_owned().await?;
        let (client, acks, metrics, config) = (client.clone(), acks.clone(), metrics.clone(), config.clone());
        deliveries.spawn(async move {
            deliver(&client, &pending, &config, &metrics).await;
            drop(slot);
            for batch in &pending {
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

/// Counts outcomes of one sink.
struct Tally<'a> {
    metrics: &'a SinkMetrics,
}

impl Tally<'_> {
    fn count(&self, outcome: &'static str, n: usize) {
        if n > 0 {
            self.metrics.records.get_or_create(&SinkOutcomeLabels { sink: SINK, outcome }).inc_by(n as u64);
        }
    }

    /// Records that will never be delivered: counted as rejected and dropped, and logged once
    /// with Elasticsearch's reason.
    fn give_up(&self, reason: &'static str, reasons: &[String], message: &'static str) {
        let Some(first) = reasons.first() else { return };
        self.count("rejected", reasons.len());
        self.metrics.dropped.get_or_create(&ReasonLabels { reason }).inc_by(reasons.len() as u64);
        tracing::warn!(count = reasons.len(), reason = %first, "{message}");
    }
}

/// Delivers every record of `batches`, returning once each has settled.
async fn deliver(client: &Client, batches: &[Arc<Batch>], config: &ElasticsearchConfig, metrics: &SinkMetrics) {
    let items: Vec<Item> =
        batches.iter().flat_map(|b| (0..b.docs.len() as u32).map(move |index| Item { batch: b.clone(), index })).collect();
    let mut runs: VecDeque<Vec<Item>> =
        bulk::split_by_size(&items, config.batch_max_bytes).into_iter().map(|r| items[r].to_vec()).collect();
    let tally = Tally { metrics };
    let sink = SinkLabels { sink: SINK };
    while let Some(mut todo) = runs.pop_front() {
        let mut attempt = 0u32;
        // Since when some of `todo` has been failing with 5xx.
        let mut failing_since: Option<Instant> = None;
        while !todo.is_empty() {
            match client.bulk(&todo).await {
                Ok((Reply::Done(reply), took)) => {
                    metrics.request_duration.get_or_create(&sink).observe(took.as_secs_f64());
                    let outcomes = match bulk::outcomes(&reply, todo.len()) {
                        Ok(outcomes) => outcomes,
                        Err(e) => {
                            // Resending everything is safe: what was applied answers 409.
                            tracing::warn!(error = %e, "unusable _bulk reply; sending the request again");
                            retry_later(metrics, &sink, &mut attempt).await;
                            continue;
                        }
                    };
                    let (mut created, mut duplicates, mut rejected, mut failed) = (0, 0, Vec::new(), Vec::new());
                    // Items to send again, and whether each failed (5xx) rather than was refused for load (429).
                    let mut retry: Vec<(Item, bool)> = Vec::new();
                    for (item, outcome) in todo.into_iter().zip(outcomes) {
                        match outcome {
                            Outcome::Created => created += 1,
                            Outcome::Duplicate => duplicates += 1,
                            Outcome::Overloaded => retry.push((item, false)),
                            Outcome::Failed(reason) => {
                                retry.push((item, true));
                                failed.push(reason);
                            }
                            Outcome::Rejected(reason) => rejected.push(reason),
                        }
                    }
                    tally.count("delivered", created);
                    tally.count("duplicate", duplicates);
                    tally.give_up("rejected", &rejected, "Elasticsearch rejected records; they will not be sent again");
                    if failed.is_empty() {
                        failing_since = None;
                    } else if failing_since.get_or_insert_with(Instant::now).elapsed() >= config.item_retry_timeout {
                        // Only 429s are retried without end: they are back-pressure, not this document.
                        retry.retain(|(_, failed)| !failed);
                        tally.give_up(
                            "retries_exhausted",
                            &failed,
                            "Elasticsearch kept failing on records (5xx) for item_retry_timeout; they will not be sent again",
                        );
                        failing_since = None;
                    }
                    let retry: Vec<Item> = retry.into_iter().map(|(item, _)| item).collect();
                    tally.count("retried", retry.len());
                    todo = retry;
                    if !todo.is_empty() {
                        retry_later(metrics, &sink, &mut attempt).await;
                    }
                }
                Ok((Reply::TooLarge, _)) if todo.len() > 1 => {
                    let second = todo.split_off(todo.len() / 2);
                    runs.push_front(second);
                    runs.push_front(todo);
                    break;
                }
                Ok((Reply::TooLarge, _)) => {
                    let reasons = [format!("413 request entity too large ({} bytes)", todo[0].doc().len())];
                    tally.give_up("too_large", &reasons, "a single record is larger than Elasticsearch accepts; it will not be sent again");
                    break;
                }
                Ok((Reply::BadRequest(reason), _)) if todo.len() > 1 => {
                    // One record may make the whole request unparseable: halve to find it.
                    tracing::debug!(%reason, records = todo.len(), "_bulk request refused as a whole; splitting it");
                    let second = todo.split_off(todo.len() / 2);
                    runs.push_front(second);
                    runs.push_front(todo);
                    break;
                }
                Ok((Reply::BadRequest(reason), _)) => {
                    tally.give_up("rejected", &[reason], "Elasticsearch refused a request holding one record; it will not be sent again");
                    break;
                }
                Err(failure) => {
                    tracing::warn!(error = %failure, attempt, "_bulk request failed; retrying");
                    retry_later(metrics, &sink, &mut attempt).await;
                }
            }
        }
    }
}

/// Exponential backoff with jitter: half the step plus a random part of the other half.
async fn retry_later(metrics: &SinkMetrics, sink: &SinkLabels, attempt: &mut u32) {
    metrics.retries.get_or_create(sink).inc();
    let step = MIN_BACKOFF.saturating_mul(1 << (*attempt).min(16)).min(MAX_BACKOFF);
    *attempt += 1;
    let jitter = step.mul_f64(fastrand::f64() / 2.0);
    tokio::time::sleep(step / 2 + jitter).await;
}
