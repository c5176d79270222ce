//! The unit that flows down the pipeline: records read from one file in one pass, with the
//! file position that becomes its checkpoint once every sink has acknowledged it.

use std::ops::Range;
use std::sync::Arc;

use super::source::Source;

/// Which output stream of the container a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl StreamKind {
    /// The ECS `stream` value.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

/// Flags set on a record; exported as `log.flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(u8);

impl Flags {
    /// Cut at `logs.max_line_bytes`.
    pub const TRUNCATED: Flags = Flags(1);
    /// Partial parts shipped without their closing part (timeout, or the file ended).
    pub const PARTIAL: Flags = Flags(2);
    /// The line did not parse as CRI or docker JSON; the whole line is the message.
    pub const MALFORMED: Flags = Flags(4);
    /// The runtime's timestamp was impossible or had no zone; `@timestamp` is the read time.
    pub const BAD_TIMESTAMP: Flags = Flags(8);
    /// A JSON message had more keys or bytes than `json` keeps; the rest was dropped.
    pub const JSON_TRUNCATED: Flags = Flags(16);

    /// Whether every flag in `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets the flags in `other`.
    pub fn insert(&mut self, other: Flags) {
        self.0 |= other.0;
    }

    /// No flag set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The names of the set flags, as written to `log.flags`.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        [
            (Flags::TRUNCATED, "truncated"),
            (Flags::PARTIAL, "partial"),
            (Flags::MALFORMED, "malformed"),
            (Flags::BAD_TIMESTAMP, "bad_timestamp"),
            (Flags::JSON_TRUNCATED, "json_truncated"),
        ]
        .into_iter()
        .filter(move |(f, _)| self.contains(*f))
        .map(|(_, name)| name)
    }
}

/// One log record. Its timestamp and message bytes live in the chunk's buffer.
#[derive(Debug, Clone)]
pub struct Record {
    /// The runtime's timestamp (RFC 3339) as written in the file.
    pub timestamp: Range<u32>,
    /// The message, partial parts joined, without the trailing newline. May hold invalid UTF-8.
    pub message: Range<u32>,
    /// stdout or stderr.
    pub stream: StreamKind,
    /// Byte offset of the record's first line in its (uncompressed) file.
    pub offset: u64,
    /// What happened to the record on the way.
    pub flags: Flags,
}

/// Records from one file, in file order, and the position they complete.
#[derive(Debug)]
pub struct Chunk {
    /// The file the records came from.
    pub source: Arc<Source>,
    /// Backing bytes for every record's timestamp and message.
    pub buf: Vec<u8>,
    /// The records, in file order.
    pub records: Vec<Record>,
    /// Every record starting before this offset is in this chunk or an earlier one: the file's
    /// checkpoint once this chunk is acknowledged.
    pub commit_offset: u64,
    /// Bytes consumed from the file for this chunk; counts against `logs.max_inflight_bytes`.
    pub read_bytes: u64,
}

impl Chunk {
    /// An empty chunk for `source`.
    pub fn new(source: Arc<Source>) -> Chunk {
        Chunk { source, buf: Vec::new(), records: Vec::new(), commit_offset: 0, read_bytes: 0 }
    }

    /// A record's timestamp.
    pub fn timestamp(&self, record: &Record) -> &[u8] {
        &self.buf[record.timestamp.start as usize..record.timestamp.end as usize]
    }

    /// A record's message bytes.
    pub fn message(&self, record: &Record) -> &[u8] {
        &self.buf[record.message.start as usize..record.message.end as usize]
    }

    /// Appends bytes to the buffer and returns their range.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> Range<u32> {
        let start = self.buf.len() as u32;
        self.buf.extend_from_slice(bytes);
        start..self.buf.len() as u32
    }
}
