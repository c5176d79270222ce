//! Turns decoded lines into records: joins partial parts with their closing part (per stream,
//! since stdout and stderr parts interleave), bounds every record at `max_line_bytes`, and
//! ships an unfinished record after a timeout rather than holding it forever.

use std::time::{Instant, SystemTime};

use super::chunk::{Chunk, Flags, Record, StreamKind};
use super::decode::Decoded;

/// A record whose closing part has not been read yet.
struct Pending {
    offset: u64,
    timestamp: Vec<u8>,
    message: Vec<u8>,
    flags: Flags,
    since: Instant,
}

/// Record assembly for one container instance.
pub struct Assembler {
    max_bytes: usize,
    pending: [Option<Pending>; 2],
}

fn slot(stream: StreamKind) -> usize {
    match stream {
        StreamKind::Stdout => 0,
        StreamKind::Stderr => 1,
    }
}

impl Assembler {
    /// An assembler cutting records at `max_bytes`.
    pub fn new(max_bytes: usize) -> Assembler {
        Assembler { max_bytes, pending: [None, None] }
    }

    /// Takes one decoded line that starts at `offset`; `truncated` when the reader cut it.
    pub fn push(&mut self, chunk: &mut Chunk, offset: u64, line: Decoded<'_>, truncated: bool, now: Instant) {
        let max = self.max_bytes;
        let slot = &mut self.pending[slot(line.stream)];
        let mut flags = Flags::default();
        if truncated {
            flags.insert(Flags::TRUNCATED);
        }
        match slot {
            Some(pending) => {
                append_bounded(&mut pending.message, &line.message, max, &mut pending.flags);
                pending.flags.insert(flags);
                if !line.partial {
                    let pending = slot.take().expect("checked above");
                    emit(chunk, pending.offset, &pending.timestamp, &pending.message, line.stream, pending.flags);
                }
            }
            None if line.partial => {
                let mut message = Vec::with_capacity(line.message.len().min(max));
                append_bounded(&mut message, &line.message, max, &mut flags);
                *slot = Some(Pending { offset, timestamp: line.timestamp.into_owned(), message, flags, since: now });
            }
            None => {
                let keep = line.message.len().min(max);
                if keep < line.message.len() {
                    flags.insert(Flags::TRUNCATED);
                }
                emit(chunk, offset, &line.timestamp, &line.message[..keep], line.stream, flags);
            }
        }
    }

    /// Ships a line that is neither CRI nor docker JSON as it is, timestamped now.
    pub fn push_malformed(&mut self, chunk: &mut Chunk, offset: u64, raw: &[u8], truncated: bool) {
        let mut flags = Flags::MALFORMED;
        if truncated {
            flags.insert(Flags::TRUNCATED);
        }
        let now = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
        emit(chunk, offset, now.as_bytes(), &raw[..raw.len().min(self.max_bytes)], StreamKind::Stdout, flags);
    }

    /// Offset of the oldest unfinished record: the file position a checkpoint may not pass.
    pub fn pending_from(&self) -> Option<u64> {
        self.pending.iter().flatten().map(|p| p.offset).min()
    }

    /// Ships unfinished records that started before `deadline`, flagged `partial`.
    pub fn flush_started_before(&mut self, chunk: &mut Chunk, deadline: Instant) {
        for (i, slot) in self.pending.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|p| p.since <= deadline) {
                flush(chunk, slot.take().expect("checked"), i);
            }
        }
    }

    /// Ships every unfinished record, flagged `partial` (the file has ended).
    pub fn flush_all(&mut self, chunk: &mut Chunk) {
        for (i, slot) in self.pending.iter_mut().enumerate() {
            if let Some(p) = slot.take() {
                flush(chunk, p, i);
            }
        }
    }
}

fn flush(chunk: &mut Chunk, mut pending: Pending, slot: usize) {
    pending.flags.insert(Flags::PARTIAL);
    let stream = if slot == 0 { StreamKind::Stdout } else { StreamKind::Stderr };
    emit(chunk, pending.offset, &pending.timestamp, &pending.message, stream, pending.flags);
}

fn append_bounded(message: &mut Vec<u8>, part: &[u8], max: usize, flags: &mut Flags) {
    let room = max.saturating_sub(message.len());
    if part.len() > room {
        flags.insert(Flags::TRUNCATED);
    }
    message.extend_from_slice(&part[..part.len().min(room)]);
}

fn emit(chunk: &mut Chunk, offset: u64, timestamp: &[u8], message: &[u8], stream: StreamKind, flags: Flags) {
    let timestamp = chunk.push_bytes(timestamp);
    let message = chunk.push_bytes(message);
    chunk.records.push(Record { timestamp, message, stream, offset, flags });
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::logs::source::Source;

    fn line(stream: StreamKind, partial: bool, msg: &'static str) -> Decoded<'static> {
        Decoded { timestamp: Cow::Borrowed(b"2026-11-22T03:16:40Z"), stream, partial, message: Cow::Borrowed(msg.as_bytes()) }
    }

    fn messages(chunk: &Chunk) -> Vec<(u64, String, Flags)> {
        chunk.records.iter().map(|r| (r.offset, String::from_utf8_lossy(chunk.message(r)).into_owned(), r.flags)).collect()
    }

    fn chunk() -> Chunk {
        Chunk::new(Arc::new(Source::for_tests()))
    }

    #[test]
    fn partial_parts_join_per_stream_even_when_interleaved() {
        let (mut a, mut c, now) = (Assembler::new(1024), chunk(), Instant::now());
        a.push(&mut c, 0, line(StreamKind::Stdout, true, "hel"), false, now);
        a.push(&mut c, 10, line(StreamKind::Stderr, false, "err"), false, now);
        assert_eq!(a.pending_from(), Some(0));
        a.push(&mut c, 20, line(StreamKind::Stdout, true, "lo "), false, now);
        a.push(&mut c, 30, line(StreamKind::Stdout, false, "world"), false, now);
        assert_eq!(messages(&c), [(10, "err".into(), Flags::default()), (0, "hello world".into(), Flags::default())]);
        assert_eq!(a.pending_from(), None);
    }

    #[test]
    fn joined_records_are_cut_at_the_bound_and_flagged() {
        let (mut a, mut c, now) = (Assembler::new(8), chunk(), Instant::now());
        a.push(&mut c, 0, line(StreamKind::Stdout, true, "0123456"), false, now);
        a.push(&mut c, 9, line(StreamKind::Stdout, true, "789abc"), false, now);
        a.push(&mut c, 18, line(StreamKind::Stdout, false, "def"), false, now);
        a.push(&mut c, 27, line(StreamKind::Stdout, false, "0123456789"), false, now);
        assert_eq!(messages(&c), [(0, "01234567".into(), Flags::TRUNCATED), (27, "01234567".into(), Flags::TRUNCATED)]);
    }

    #[test]
    fn unfinished_records_ship_after_the_timeout_flagged_partial() {
        let (mut a, mut c, start) = (Assembler::new(1024), chunk(), Instant::now());
        a.push(&mut c, 0, line(StreamKind::Stdout, true, "waiting"), false, start);
        a.flush_started_before(&mut c, start - Duration::from_secs(1));
        assert!(c.records.is_empty(), "not yet due");
        a.flush_started_before(&mut c, start);
        assert_eq!(messages(&c), [(0, "waiting".into(), Flags::PARTIAL)]);
        assert_eq!(a.pending_from(), None);
    }

    #[test]
    fn malformed_lines_keep_their_text() {
        let (mut a, mut c) = (Assembler::new(1024), chunk());
        a.push_malformed(&mut c, 5, b"not a log line", false);
        let (offset, text, flags) = &messages(&c)[0];
        assert_eq!((*offset, text.as_str(), *flags), (5, "not a log line", Flags::MALFORMED));
        assert!(c.timestamp(&c.records[0]).starts_with(b"20"));
    }
}
