//! The unit that flows down the pipeline: records read from one file in one pass, with the
//! file position that becomes its checkpoint once every sink has acknowledged it.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use memchr::memmem::Finder;

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

/// The buffers of chunks done with, for the next chunks. At full speed a chunk's buffers grow
/// to a few hundred KiB; made anew for every chunk, grown by doubling, copied at each step and
/// their pages faulted in, they cost a third of the tailer's time. A chunk is dropped by the
/// encoder as the tailer fills the next one, so a couple are kept, each only up to a modest
/// size and only if its chunk used a fair part of it: after a burst, the few lines of a quiet
/// node do not go on holding a burst's buffers.
static SPARES: Spares = Spares::new();

/// Spare buffers: a few, none grown large.
struct Spares {
    kept: Mutex<Vec<(Vec<u8>, Vec<Record>)>>,
}

impl Spares {
    /// Buffers kept: what is held however quiet the node is.
    const KEPT: usize = 2;
    /// A buffer kept holds at most this many bytes (a chunk reads 256 KiB at most; one grown
    /// by a huge line goes).
    const BYTES: usize = 512 * 1024;
    /// A record list kept holds at most this many records (a chunk holds 2,048).
    const RECORDS: usize = 4096;
    /// A buffer is kept only if its chunk filled at least this part of it (1 / 4).
    const USED_FRACTION: usize = 4;

    const fn new() -> Spares {
        Spares { kept: Mutex::new(Vec::new()) }
    }

    /// Empty buffers, a chunk's done with when there are some.
    fn take(&self) -> (Vec<u8>, Vec<Record>) {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner).pop().unwrap_or_default()
    }

    /// Keeps `buf` and `records`, emptied, unless enough are kept, they grew large, or `buf`
    /// was mostly unused.
    fn give(&self, buf: &mut Vec<u8>, records: &mut Vec<Record>) {
        let capacity = buf.capacity();
        if capacity == 0 || capacity > Self::BYTES || buf.len() * Self::USED_FRACTION < capacity || records.capacity() > Self::RECORDS {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() < Self::KEPT {
            buf.clear();
            records.clear();
            kept.push((std::mem::take(buf), std::mem::take(records)));
        }
    }
}

impl Chunk {
    /// An empty chunk for `source`, with the buffers of a chunk done with when there is one.
    pub fn new(source: Arc<Source>) -> Chunk {
        let (buf, records) = SPARES.take();
        Chunk { source, buf, records, commit_offset: 0, read_bytes: 0 }
    }

    /// A record's timestamp.
    pub fn timestamp(&self, record: &Record) -> &[u8] {
        &self.buf[record.timestamp.start as usize..record.timestamp.end as usize]
    }

    /// A record's message bytes.
    pub fn message(&self, record: &Record) -> &[u8] {
        &self.buf[record.message.start as usize..record.message.end as usize]
    }

    /// A chunk of stdout records, each given as the bytes in its timestamp's place and its
    /// message, at offsets 0, 1, 2, ...
    #[cfg(test)]
    pub fn for_tests<'a>(records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Chunk {
        let mut chunk = Chunk::new(Arc::new(Source::for_tests()));
        for (offset, (before, text)) in records.into_iter().enumerate() {
            let timestamp = chunk.push_bytes(before);
            let message = chunk.push_bytes(text);
            chunk.records.push(Record { timestamp, message, stream: StreamKind::Stdout, offset: offset as u64, flags: Flags::default() });
        }
        chunk
    }

    /// Appends bytes to the buffer and returns their range.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> Range<u32> {
        let start = self.buf.len() as u32;
        self.buf.extend_from_slice(bytes);
        start..self.buf.len() as u32
    }
}

/// Where a literal occurs in a chunk's buffer, found in one pass over the whole buffer, for
/// the records' messages to look up: one vector search per chunk rather than one per record,
/// whose set-up costs more than the scan of a short line.
#[derive(Debug, Default)]
pub struct Occurrences {
    at: Vec<u32>,
    needle_len: u32,
    /// More than [`Occurrences::MOST`] were found: none is kept, each message is searched.
    too_many: bool,
}

impl Occurrences {
    /// Occurrences kept at most (32 KiB): a chunk of lines made of the literal (`00-00-...`)
    /// would otherwise take more memory than its own bytes.
    const MOST: usize = 8192;

    /// Finds every occurrence of `finder`'s needle in `chunk`'s buffer, forgetting the last
    /// chunk's. The needle must not overlap itself (as `level=` and `00-` do not): the search
    /// finds occurrences that do not overlap.
    pub fn find(&mut self, finder: &Finder<'_>, chunk: &Chunk) {
        let needle = finder.needle();
        debug_assert!((1..needle.len()).all(|n| needle[..n] != needle[needle.len() - n..]), "a needle that overlaps itself");
        self.at.clear();
        self.at.extend(finder.find_iter(&chunk.buf).take(Self::MOST + 1).map(|at| at as u32));
        self.too_many = self.at.len() > Self::MOST;
        if self.too_many {
            self.at.clear();
        }
        self.needle_len = needle.len() as u32;
    }

    /// The occurrences wholly inside `within`, a range of the buffer (a record's message or
    /// the end of one), as offsets from its start, in order; `None` when the chunk held too
    /// many to keep (the caller searches the message itself).
    pub fn inside(&self, within: Range<u32>) -> Option<impl Iterator<Item = usize> + '_> {
        if self.too_many {
            return None;
        }
        let from = self.at.partition_point(|&at| at < within.start);
        let found = self.at[from..].iter().take_while(move |&&at| at + self.needle_len <= within.end);
        Some(found.map(move |&at| (at - within.start) as usize))
    }
}

impl Drop for Chunk {
    /// Leaves its buffers for the next chunk.
    fn drop(&mut self) {
        SPARES.give(&mut self.buf, &mut self.records);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record { timestamp: 0..0, message: 0..0, stream: StreamKind::Stdout, offset: 0, flags: Flags::default() }
    }

    #[test]
    fn buffers_go_to_the_next_chunk_unless_grown_large_mostly_unused_or_enough_are_kept() {
        let spares = Spares::new();
        let (mut buf, mut records) = (Vec::with_capacity(1000), vec![record(); 10]);
        buf.extend_from_slice(&[b'x'; 250]);
        let at = buf.as_ptr();
        spares.give(&mut buf, &mut records);
        let (buf, records) = spares.take();
        assert_eq!((buf.as_ptr(), buf.len(), buf.capacity(), records.len()), (at, 0, 1000, 0), "the same buffer, emptied");
        assert!(records.capacity() >= 10);
        assert_eq!(spares.take().0.capacity(), 0, "taken: none left");

        let mut large = vec![0; Spares::BYTES + 1];
        spares.give(&mut large, &mut Vec::new());
        assert_eq!(large.len(), Spares::BYTES + 1, "a large buffer is not kept");
        let mut idle = Vec::with_capacity(1000);
        idle.extend_from_slice(&[b'x'; 249]);
        spares.give(&mut idle, &mut Vec::new());
        assert_eq!(idle.len(), 249, "nor one mostly unused");
        let mut many = Vec::with_capacity(Spares::RECORDS + 1);
        spares.give(&mut vec![0; 10], &mut many);
        assert_eq!(spares.take().0.capacity(), 0, "nor the buffers of a long record list");

        for _ in 0..Spares::KEPT + 1 {
            spares.give(&mut vec![0; 10], &mut Vec::new());
        }
        let kept = std::iter::from_fn(|| Some(spares.take()).filter(|(buf, _)| buf.capacity() > 0)).count();
        assert_eq!(kept, Spares::KEPT);
    }

    #[test]
    fn a_new_chunk_starts_empty_on_a_dropped_chunks_buffers() {
        let source = Arc::new(Source::for_tests());
        // Other tests make and drop chunks at the same time: the buffers come back most times.
        let mut reused = 0;
        for _ in 0..100 {
            let mut chunk = Chunk::new(source.clone());
            let message = chunk.push_bytes(&[b'x'; 4096]);
            chunk.records.push(Record { message, ..record() });
            drop(chunk);
            let next = Chunk::new(source.clone());
            assert!(next.buf.is_empty() && next.records.is_empty(), "a new chunk holds nothing of the last");
            reused += usize::from(next.buf.capacity() >= 4096);
        }
        assert!(reused > 0, "no chunk got a dropped chunk's buffers");
    }
}
