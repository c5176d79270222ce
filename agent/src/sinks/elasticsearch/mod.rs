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

use tokio::sync::mpsc;
use tokio::time::Instant;

use self::bulk::{Item, Outcome};
use self::client::{Client, Reply};
use super::{Batch, ReasonLabels, SinkLabels, SinkMetrics, SinkOutcomeLabels};
use crate::config::ElasticsearchConfig;
use crate::logs::ack::AckMsg;

const SINK: &str = "elasticsearch";
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs the sink until its input closes, then delivers what it holds and returns.
pub async fn run(
    config: ElasticsearchConfig,
    mut client: Client,
    mut batches: mpsc::Receiver<Arc<Batch>>,
    acks: mpsc::Sender<AckMsg>,
    metrics: SinkMetrics,
) -> anyhow::Result<()> {
    let mut pending: Vec<Arc<Batch>> = Vec::new();
    let mut open = true;
    while open {
        let Some(first) = batches.recv().await else { break };
        let deadline = Instant::now() + config.flush_interval;
        let mut bytes = first.docs.bytes.len();
        pending.push(first);
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
        deliver(&mut client, &pending, config.batch_max_bytes, &metrics).await;
        for batch in pending.drain(..) {
            acks.send(AckMsg::Ack { seq: batch.seq }).await?;
        }
    }
    Ok(())
}

/// Delivers every record of `batches`, returning once each has settled.
async fn deliver(client: &mut Client, batches: &[Arc<Batch>], max_bytes: usize, metrics: &SinkMetrics) {
    let items: Vec<Item> =
        batches.iter().flat_map(|b| (0..b.docs.len() as u32).map(move |index| Item { batch: b.clone(), index })).collect();
    let mut runs: VecDeque<Vec<Item>> = bulk::split_by_size(&items, max_bytes).into_iter().map(|r| items[r].to_vec()).collect();
    let count = |outcome: &'static str, n: usize| {
        if n > 0 {
            metrics.records.get_or_create(&SinkOutcomeLabels { sink: SINK, outcome }).inc_by(n as u64);
        }
    };
    let sink = SinkLabels { sink: SINK };
    while let Some(mut todo) = runs.pop_front() {
        let mut attempt = 0u32;
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
                    let (mut created, mut duplicates, mut rejected) = (0, 0, Vec::new());
                    let mut retry = Vec::new();
                    for (item, outcome) in todo.into_iter().zip(outcomes) {
                        match outcome {
                            Outcome::Created => created += 1,
                            Outcome::Duplicate => duplicates += 1,
                            Outcome::Retry => retry.push(item),
                            Outcome::Rejected(reason) => rejected.push(reason),
                        }
                    }
                    count("delivered", created);
                    count("duplicate", duplicates);
                    count("rejected", rejected.len());
                    count("retried", retry.len());
                    if let Some(first) = rejected.first() {
                        metrics.dropped.get_or_create(&ReasonLabels { reason: "rejected" }).inc_by(rejected.len() as u64);
                        tracing::warn!(count = rejected.len(), reason = %first, "Elasticsearch rejected records; they will not be sent again");
                    }
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
                    count("rejected", 1);
                    metrics.dropped.get_or_create(&ReasonLabels { reason: "too_large" }).inc();
                    tracing::warn!(
                        bytes = todo[0].doc().len(),
                        "a single record is larger than Elasticsearch accepts (413); it will not be sent again"
                    );
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
