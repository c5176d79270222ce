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
pub mod stream;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use self::bulk::{Item, Outcome};
use self::client::{Client, Reply};
use super::{Batch, ReasonLabels, SinkLabels, SinkMetrics, SinkOutcomeLabels};
use crate::config::ElasticsearchConfig;
use crate::logs::ack::AckMsg;
use crate::logs::budget::ReadBudget;

const SINK: &str = "elasticsearch";

/// Runs the sink until its input closes, then delivers what it holds and returns. Up to
/// `max_concurrent_requests` requests are in flight; each batch is acknowledged when all its
/// records have settled.
pub async fn run(
    config: ElasticsearchConfig,
    client: Client,
    batches: mpsc::Receiver<Arc<Batch>>,
    acks: mpsc::Sender<AckMsg>,
    budget: Arc<ReadBudget>,
    metrics: SinkMetrics,
) -> anyhow::Result<()> {
    let health = Health::new();
    let requests = super::Requests {
        flush_interval: config.flush_interval,
        max_bytes: config.batch_max_bytes,
        concurrency: config.max_concurrent_requests,
        reading: Some(budget),
    };
    super::run_deliveries(
        batches,
        acks,
        requests,
        |b| b.bulk.plain_len(),
        move |pending| {
            let (client, metrics, config, health) = (client.clone(), metrics.clone(), config.clone(), health.clone());
            async move { deliver(&client, &pending, &config, &metrics, &health).await }
        },
    )
    .await
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

/// What the sink's deliveries have seen of Elasticsearch lately, to tell a record it fails on
/// (poison) from an outage: a 5xx for one record while others get in is the record's own.
#[derive(Clone)]
pub struct Health {
    started: Instant,
    /// When a record was last accepted (milliseconds after `started`, plus one; 0 = never).
    last_accepted_ms: Arc<AtomicU64>,
    /// When a request last failed as a whole, or every record of a request got 5xx.
    last_trouble_ms: Arc<AtomicU64>,
}

impl Health {
    fn new() -> Health {
        Health { started: Instant::now(), last_accepted_ms: Arc::new(AtomicU64::new(0)), last_trouble_ms: Arc::new(AtomicU64::new(0)) }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    fn accepted(&self) {
        self.last_accepted_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn trouble(&self) {
        self.last_trouble_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether a 5xx for a record sent at `sent_at` counts against it: others got in after it
    /// was sent, or (for a record that already failed while others got in) nothing has looked
    /// like an outage since the last record got in.
    fn blames(&self, sent_at: Instant, struck_before: bool) -> bool {
        let (accepted, trouble) = (self.last_accepted_ms.load(Ordering::Relaxed), self.last_trouble_ms.load(Ordering::Relaxed));
        accepted > sent_at.duration_since(self.started).as_millis() as u64 + 1 || (struck_before && accepted > trouble)
    }
}

/// Delivers every record of `batches`, returning once each has settled: how long the first
/// `_bulk` request took to be answered, if it carried them all and was (per-item failures,
/// 429s included, are answers).
async fn deliver(
    client: &Client,
    batches: &[Arc<Batch>],
    config: &ElasticsearchConfig,
    metrics: &SinkMetrics,
    health: &Health,
) -> Option<Duration> {
    let (mut requests, mut first) = (0u32, None);
    let mut items: Vec<Item> =
        batches.iter().flat_map(|b| (0..b.bulk.ends().len() as u32).map(move |index| Item { batch: b.clone(), index })).collect();
    let mut runs = VecDeque::new();
    for run in bulk::split_by_size(&items, config.batch_max_bytes).into_iter().rev() {
        runs.push_front(if run.start == 0 { std::mem::take(&mut items) } else { items.split_off(run.start) });
    }
    let tally = Tally { metrics };
    let sink = SinkLabels { sink: SINK };
    while let Some(mut todo) = runs.pop_front() {
        let mut attempt = 0u32;
        // Per item of `todo`: 5xx answers while Elasticsearch accepted other records (made
        // at the first reply that is not all created).
        let mut strikes: Vec<u32> = Vec::new();
        while !todo.is_empty() {
            let sent_at = Instant::now();
            requests += 1;
            match client.bulk(&todo).await {
                Ok((Reply::Done(reply), took)) => {
                    if requests == 1 && runs.is_empty() {
                        first = Some(took);
                    }
                    metrics.request_duration.get_or_create(&sink).observe(took.as_secs_f64());
                    let outcomes = match bulk::outcomes_off_the_runtime(reply, todo.len()).await {
                        Ok(None) => {
                            health.accepted();
                            tally.count("delivered", todo.len());
                            break;
                        }
                        Ok(Some(outcomes)) => {
                            strikes.resize(todo.len(), 0);
                            outcomes
                        }
                        Err(e) => {
                            // Resending everything is safe: what was applied answers 409.
                            tracing::warn!(error = %e, "unusable _bulk reply; sending the request again");
                            retry_later(metrics, &sink, &mut attempt).await;
                            continue;
                        }
                    };
                    if outcomes.iter().any(|o| matches!(o, Outcome::Created | Outcome::Duplicate)) {
                        health.accepted();
                    } else if outcomes.len() > 1 && outcomes.iter().all(|o| matches!(o, Outcome::Failed(_))) {
                        health.trouble();
                    }
                    let (mut created, mut duplicates, mut rejected, mut exhausted) = (0, 0, Vec::new(), Vec::new());
                    let (mut retry, mut retry_strikes) = (Vec::new(), Vec::new());
                    for ((item, outcome), mut strike) in todo.into_iter().zip(outcomes).zip(strikes) {
                        match outcome {
                            Outcome::Created => created += 1,
                            Outcome::Duplicate => duplicates += 1,
                            // 429 is back-pressure: retried however long it takes.
                            Outcome::Overloaded => {
                                retry.push(item);
                                retry_strikes.push(strike);
                            }
                            Outcome::Failed(reason) => {
                                // Only while other records get in is a 5xx this record's own;
                                // during an outage nothing is given up.
                                strike += u32::from(health.blames(sent_at, strike > 0));
                                if strike >= config.item_max_attempts {
                                    exhausted.push(reason);
                                } else {
                                    retry.push(item);
                                    retry_strikes.push(strike);
                                }
                            }
                            Outcome::Rejected(reason) => rejected.push(reason),
                        }
                    }
                    tally.count("delivered", created);
                    tally.count("duplicate", duplicates);
                    tally.give_up("rejected", &rejected, "Elasticsearch rejected records; they will not be sent again");
                    tally.give_up(
                        "retries_exhausted",
                        &exhausted,
                        "Elasticsearch kept failing on records (5xx) while accepting others; they will not be sent again",
                    );
                    tally.count("retried", retry.len());
                    todo = retry;
                    strikes = retry_strikes;
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
                    let reasons = [format!("413 request entity too large ({} bytes)", todo[0].body_len())];
                    tally.give_up("too_large", &reasons, "a single record is larger than Elasticsearch accepts; it will not be sent again");
                    break;
                }
                Err(failure) => {
                    // Connection errors, timeouts, and any status for the request as a whole
                    // (a 400 from a proxy is not the records' fault): kept, sent again.
                    health.trouble();
                    tracing::warn!(error = %failure, attempt, "_bulk request failed; retrying");
                    retry_later(metrics, &sink, &mut attempt).await;
                }
            }
        }
    }
    first
}

async fn retry_later(metrics: &SinkMetrics, sink: &SinkLabels, attempt: &mut u32) {
    super::backoff(metrics, sink, attempt, None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_5xx_counts_against_a_record_only_while_others_get_in() {
        let health = Health::new();
        let step = Duration::from_secs(1);
        tokio::time::sleep(step).await;
        let sent_at = Instant::now();
        tokio::time::sleep(step).await;
        assert!(!health.blames(sent_at, false), "nothing got in since it was sent: an outage, not the record");
        health.accepted();
        assert!(health.blames(sent_at, false), "another record got in after it was sent");

        // Sent after the last acceptance, during trouble: not its fault.
        tokio::time::sleep(step).await;
        health.trouble();
        let late = Instant::now();
        tokio::time::sleep(step).await;
        assert!(!health.blames(late, true), "trouble since the last acceptance");
        // Once records get in again, a record that failed before is blamed.
        health.accepted();
        assert!(health.blames(late, true));
        tokio::time::sleep(step).await;
        let after = Instant::now();
        assert!(health.blames(after, true), "struck before, and nothing looked like an outage since the last acceptance");
        assert!(!health.blames(after, false), "a first strike needs an acceptance after the send");
    }
}
