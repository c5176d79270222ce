//! Where records go. Each sink is a task that takes [`Batch`]es in read order and
//! acknowledges each one once it is delivered (or rejected for good), so checkpoints advance
//! only past what every sink has taken.

pub mod ecs;
pub mod elasticsearch;
pub mod stdout;

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
