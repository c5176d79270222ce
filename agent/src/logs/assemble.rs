//! Turns decoded lines into records: joins partial parts with their closing part (per stream,
//! since stdout and stderr parts interleave), joins the lines of a stack trace when the
//! container's application has a multi-line rule, bounds every record at `max_line_bytes`,
//! and ships an unfinished record after a timeout rather than holding it forever.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

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

/// A multi-line rule: a line matching `start` begins a record, other lines continue it.
#[derive(Debug)]
pub struct MultilineRule {
    /// The start pattern.
    pub start: regex::bytes::Regex,
    /// How long a record waits for more lines.
    pub timeout: Duration,
}

/// Record assembly for one container instance.
pub struct Assembler {
    max_bytes: usize,
    /// Partial (`P`) parts awaiting their closing part, per stream.
    pending: [Option<Box<Pending>>; 2],
    /// The container's multi-line rule, if its application has one.
    multiline: Option<Arc<MultilineRule>>,
    /// Multi-line records awaiting more lines, per stream.
    joining: [Option<Box<Pending>>; 2],
}

fn slot_index(stream: StreamKind) -> usize {
    match stream {
        StreamKind::Stdout => 0,
        StreamKind::Stderr => 1,
    }
}

impl Assembler {
    /// An assembler cutting records at `max_bytes`.
    pub fn new(max_bytes: usize) -> Assembler {
        Assembler { max_bytes, pending: [None, None], multiline: None, joining: [None, None] }
    }

    /// Sets (or clears) the multi-line rule. Records already joining are kept.
    pub fn set_multiline(&mut self, rule: Option<Arc<MultilineRule>>) {
        self.multiline = rule;
    }

    /// Takes one decoded line that starts at `offset`; `truncated` when the reader cut it.
    pub fn push(&mut self, chunk: &mut Chunk, offset: u64, line: Decoded<'_>, truncated: bool, now: Instant) {
        let max = self.max_bytes;
        let slot = &mut self.pending[slot_index(line.stream)];
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
                    self.finish(chunk, *pending, line.stream, now);
                }
            }
            None if line.partial => {
                let mut message = Vec::with_capacity(line.message.len().min(max));
                append_bounded(&mut message, &line.message, max, &mut flags);
                *slot = Some(Box::new(Pending { offset, timestamp: line.timestamp.into_owned(), message, flags, since: now }));
            }
            None if self.multiline.is_none() && self.joining[slot_index(line.stream)].is_none() => {
                let keep = line.message.len().min(max);
                if keep < line.message.len() {
                    flags.insert(Flags::TRUNCATED);
                }
                emit(chunk, offset, &line.timestamp, &line.message[..keep], line.stream, flags);
            }
            None => {
                let mut message = Vec::with_capacity(line.message.len().min(max));
                append_bounded(&mut message, &line.message, max, &mut flags);
                let record = Pending { offset, timestamp: line.timestamp.into_owned(), message, flags, since: now };
                self.finish(chunk, record, line.stream, now);
            }
        }
    }

    /// A whole record: shipped, or held to join the lines that continue it.
    fn finish(&mut self, chunk: &mut Chunk, record: Pending, stream: StreamKind, now: Instant) {
        let i = slot_index(stream);
        let Some(rule) = self.multiline.clone() else {
            if let Some(joined) = self.joining[i].take() {
                emit(chunk, joined.offset, &joined.timestamp, &joined.message, stream, joined.flags);
            }
            emit(chunk, record.offset, &record.timestamp, &record.message, stream, record.flags);
            return;
        };
        let starts = rule.start.is_match(&record.message);
        match &mut self.joining[i] {
            Some(joined) if !starts => {
                let mut flags = joined.flags;
                append_bounded(&mut joined.message, b"\n", self.max_bytes, &mut flags);
                append_bounded(&mut joined.message, &record.message, self.max_bytes, &mut flags);
                flags.insert(record.flags);
                joined.flags = flags;
            }
            joining => {
                if let Some(done) = joining.take() {
                    emit(chunk, done.offset, &done.timestamp, &done.message, stream, done.flags);
                }
                if starts {
                    *joining = Some(Box::new(Pending { since: now, ..record }));
                } else {
                    emit(chunk, record.offset, &record.timestamp, &record.message, stream, record.flags);
                }
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
        self.pending.iter().chain(&self.joining).flatten().map(|p| p.offset).min()
    }

    /// Ships what waited too long: partial parts older than `partial_timeout` (flagged
    /// `partial`), multi-line records older than their rule's timeout.
    pub fn flush_expired(&mut self, chunk: &mut Chunk, now: Instant, partial_timeout: Duration) {
        let due = |since: Instant, timeout: Duration| now.checked_sub(timeout).is_some_and(|deadline| since <= deadline);
        for i in 0..2 {
            if self.pending[i].as_ref().is_some_and(|p| due(p.since, partial_timeout)) {
                let part = self.pending[i].take().expect("checked");
                self.flush_partial(chunk, *part, i);
            }
            let timeout = self.multiline.as_ref().map_or(Duration::ZERO, |r| r.timeout);
            if self.joining[i].as_ref().is_some_and(|p| due(p.since, timeout)) {
                let done = self.joining[i].take().expect("checked");
                emit(chunk, done.offset, &done.timestamp, &done.message, stream_of(i), done.flags);
            }
        }
    }

    /// Ships every unfinished record (the file has ended).
    pub fn flush_all(&mut self, chunk: &mut Chunk) {
        for i in 0..2 {
            if let Some(part) = self.pending[i].take() {
                self.flush_partial(chunk, *part, i);
            }
            if let Some(done) = self.joining[i].take() {
                emit(chunk, done.offset, &done.timestamp, &done.message, stream_of(i), done.flags);
            }
        }
    }

    /// Parts without their closing part, shipped as one record flagged `partial`, after any
    /// multi-line record of the same stream (which started earlier).
    fn flush_partial(&mut self, chunk: &mut Chunk, mut part: Pending, i: usize) {
        part.flags.insert(Flags::PARTIAL);
        if let Some(done) = self.joining[i].take() {
            emit(chunk, done.offset, &done.timestamp, &done.message, stream_of(i), done.flags);
        }
        emit(chunk, part.offset, &part.timestamp, &part.message, stream_of(i), part.flags);
    }
}

fn stream_of(slot: usize) -> StreamKind {
    if slot == 0 {
        StreamKind::Stdout
    } else {
        StreamKind::Stderr
    }
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
        a.flush_expired(&mut c, start + Duration::from_millis(999), Duration::from_secs(1));
        assert!(c.records.is_empty(), "not yet due");
        a.flush_expired(&mut c, start + Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(messages(&c), [(0, "waiting".into(), Flags::PARTIAL)]);
        assert_eq!(a.pending_from(), None);
    }

    fn traceback_rule() -> Option<Arc<MultilineRule>> {
        Some(Arc::new(MultilineRule { start: regex::bytes::Regex::new(r"^\S").unwrap(), timeout: Duration::from_secs(2) }))
    }

    #[test]
    fn stack_traces_join_into_one_record_under_a_multiline_rule() {
        let (mut a, mut c, now) = (Assembler::new(1024), chunk(), Instant::now());
        a.set_multiline(traceback_rule());
        for (offset, text) in [
            (0, "Traceback (most recent call last):"),
            (10, "  File \"train.py\", line 3"),
            (20, "    main()"),
            (30, "RuntimeError: boom"),
            (40, "next record"),
        ] {
            a.push(&mut c, offset, line(StreamKind::Stderr, false, text), false, now);
        }
        assert_eq!(
            messages(&c),
            [
                (0, "Traceback (most recent call last):\n  File \"train.py\", line 3\n    main()".into(), Flags::default()),
                (30, "RuntimeError: boom".into(), Flags::default())
            ]
        );
        assert_eq!(a.pending_from(), Some(40), "the last record may still continue");
        a.flush_expired(&mut c, now + Duration::from_secs(2), Duration::from_secs(5));
        assert_eq!(messages(&c).last().unwrap().1, "next record");
        assert_eq!(a.pending_from(), None);
    }

    #[test]
    fn go_panics_join_and_lines_before_any_start_ship_alone() {
        let (mut a, mut c, now) = (Assembler::new(1024), chunk(), Instant::now());
        a.set_multiline(Some(Arc::new(MultilineRule {
            start: regex::bytes::Regex::new(r"^(panic:|\d{4}-)").unwrap(),
            timeout: Duration::from_secs(2),
        })));
        for (offset, text) in
            [(0, "\tstray continuation"), (5, "panic: runtime error"), (9, ""), (10, "goroutine 1 [running]:"), (20, "main.main()")]
        {
            a.push(&mut c, offset, line(StreamKind::Stderr, false, text), false, now);
        }
        a.flush_all(&mut c);
        assert_eq!(
            messages(&c),
            [
                (0, "\tstray continuation".into(), Flags::default()),
                (5, "panic: runtime error\n\ngoroutine 1 [running]:\nmain.main()".into(), Flags::default())
            ]
        );
    }

    #[test]
    fn joined_records_respect_the_bound() {
        let (mut a, mut c, now) = (Assembler::new(16), chunk(), Instant::now());
        a.set_multiline(traceback_rule());
        for (offset, text) in [(0, "Exception in x"), (1, "  at a.b(C.java:1)"), (2, "  at d.e(F.java:2)")] {
            a.push(&mut c, offset, line(StreamKind::Stderr, false, text), false, now);
        }
        a.flush_all(&mut c);
        assert_eq!(messages(&c), [(0, "Exception in x\n ".into(), Flags::TRUNCATED)]);
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
