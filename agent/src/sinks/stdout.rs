//! The stdout sink: one ECS JSON document per line. The default when no other sink is set.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{Batch, SinkMetrics, SinkOutcomeLabels};
use crate::logs::ack::AckMsg;

/// Writes every batch to `out` and acknowledges it; fails when the output is gone.
pub async fn run<W: tokio::io::AsyncWrite + Unpin>(
    mut out: W,
    mut batches: mpsc::Receiver<Arc<Batch>>,
    acks: mpsc::Sender<AckMsg>,
    metrics: SinkMetrics,
) -> std::io::Result<()> {
    let delivered = metrics.records.get_or_create(&SinkOutcomeLabels { sink: "stdout", outcome: "delivered" }).clone();
    while let Some(batch) = batches.recv().await {
        out.write_all(&batch.docs.bytes).await?;
        if batches.is_empty() {
            out.flush().await?;
        }
        delivered.inc_by(batch.docs.len() as u64);
        if acks.send(AckMsg::Ack { seq: batch.seq }).await.is_err() {
            break;
        }
    }
    out.flush().await
}
