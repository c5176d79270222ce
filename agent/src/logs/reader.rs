//! Reads lines from a log file with a bound on memory, whatever the file holds.
//!
//! A line longer than the bound yields its head once (marked truncated) and the rest of it is
//! skipped as it is read. An unfinished last line stays unread until its newline arrives (the
//! runtime may be mid-write), unless the caller knows the file is final.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use flate2::read::MultiGzDecoder;

const INITIAL_BUFFER: usize = 64 * 1024;

/// One line as the reader yields it.
#[derive(Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// Offset of the line's first byte in the (uncompressed) file.
    pub offset: u64,
    /// The line without its newline; only the head when `truncated`.
    pub bytes: &'a [u8],
    /// The line was longer than the bound; the rest is skipped.
    pub truncated: bool,
}

enum Input {
    Plain(File),
    Gzip(Box<MultiGzDecoder<BufReader<File>>>),
}

impl Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Input::Plain(f) => f.read(buf),
            Input::Gzip(g) => g.read(buf),
        }
    }
}

/// A bounded line reader over a plain or gzip-compressed file.
pub struct LineReader {
    input: Input,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// File offset of `buf[start]`.
    offset: u64,
    /// Longest line returned whole.
    max_line: usize,
    /// Inside an over-long line whose head was returned; holds that line's offset.
    skipping: Option<u64>,
}

impl LineReader {
    /// Opens `path` and positions it at `offset` (uncompressed bytes). For gzip files the
    /// bytes before `offset` are decompressed and discarded.
    pub fn open(path: &Path, gzip: bool, offset: u64, max_line: usize) -> io::Result<LineReader> {
        let file = File::open(path)?;
        LineReader::from_file(file, gzip, offset, max_line)
    }

    /// Like [`LineReader::open`], over a file already open.
    pub fn from_file(mut file: File, gzip: bool, offset: u64, max_line: usize) -> io::Result<LineReader> {
        let mut input = if gzip {
            Input::Gzip(Box::new(MultiGzDecoder::new(BufReader::with_capacity(64 * 1024, file))))
        } else {
            file.seek(SeekFrom::Start(offset))?;
            Input::Plain(file)
        };
        if gzip && offset > 0 {
            let skipped = io::copy(&mut (&mut input).take(offset), &mut io::sink())?;
            if skipped < offset {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("compressed file holds {skipped} bytes, checkpoint is at {offset}"),
                ));
            }
        }
        Ok(LineReader {
            input,
            buf: vec![0; INITIAL_BUFFER.min(max_line + 1).max(4096)],
            start: 0,
            end: 0,
            offset,
            max_line,
            skipping: None,
        })
    }

    /// Offset up to which the file has been consumed: every byte before it belongs to a line
    /// already returned (or skipped as the tail of a truncated one).
    pub fn consumed(&self) -> u64 {
        self.offset
    }

    /// Start of an over-long line still being skipped; the line is not over until its newline.
    pub fn skipping_from(&self) -> Option<u64> {
        self.skipping
    }

    /// When the file was last written to.
    pub fn modified(&self) -> Option<std::time::SystemTime> {
        match &self.input {
            Input::Plain(f) => f.metadata().and_then(|m| m.modified()).ok(),
            Input::Gzip(g) => g.get_ref().get_ref().metadata().and_then(|m| m.modified()).ok(),
        }
    }

    /// The length of a plain file now (through its descriptor, whatever its name has become).
    pub fn file_len(&self) -> Option<u64> {
        match &self.input {
            Input::Plain(f) => f.metadata().map(|m| m.len()).ok(),
            Input::Gzip(_) => None,
        }
    }

    /// Bytes read from the file but not yet returned (an unfinished last line).
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The next whole line, or `None` at the current end of the file.
    pub fn next_line(&mut self) -> io::Result<Option<Line<'_>>> {
        loop {
            let window = &self.buf[self.start..self.end];
            if let Some(nl) = memchr::memchr(b'\n', window) {
                let line_offset = self.offset;
                let line_start = self.start;
                self.start += nl + 1;
                self.offset += nl as u64 + 1;
                if self.skipping.take().is_some() {
                    continue;
                }
                return Ok(Some(Line { offset: line_offset, bytes: &self.buf[line_start..line_start + nl], truncated: false }));
            }
            if self.skipping.is_some() {
                self.offset += window.len() as u64;
                self.start = self.end;
            } else if window.len() >= self.max_line {
                let (head_start, line_offset) = (self.start, self.offset);
                self.skipping = Some(line_offset);
                self.offset += window.len() as u64;
                self.start = self.end;
                return Ok(Some(Line { offset: line_offset, bytes: &self.buf[head_start..head_start + self.max_line], truncated: true }));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// At the final end of a file that will not grow (rotated, or gone), the unfinished last
    /// line, if any, as a line of its own.
    pub fn take_unfinished(&mut self) -> Option<Line<'_>> {
        if self.start == self.end || self.skipping.is_some() {
            self.skipping = None;
            return None;
        }
        let (start, len) = (self.start, self.end - self.start);
        let offset = self.offset;
        self.offset += len as u64;
        self.start = self.end;
        Some(Line { offset, bytes: &self.buf[start..start + len], truncated: false })
    }

    /// Reads more bytes; false at end of file.
    fn fill(&mut self) -> io::Result<bool> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let grown = (self.buf.len() * 2).min(self.max_line + 1);
            self.buf.resize(grown.max(self.buf.len() + 1), 0);
        }
        loop {
            match self.input.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn reader_over(content: &[u8], gzip: bool, offset: u64, max: usize) -> (tempfile::NamedTempFile, LineReader) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        if gzip {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(content).unwrap();
            f.write_all(&enc.finish().unwrap()).unwrap();
        } else {
            f.write_all(content).unwrap();
        }
        let r = LineReader::open(f.path(), gzip, offset, max).unwrap();
        (f, r)
    }

    fn all_lines(r: &mut LineReader) -> Vec<(u64, String, bool)> {
        let mut out = Vec::new();
        while let Some(l) = r.next_line().unwrap() {
            out.push((l.offset, String::from_utf8_lossy(l.bytes).into_owned(), l.truncated));
        }
        out
    }

    #[test]
    fn lines_come_with_their_offsets_and_unfinished_tail_waits() {
        let (_f, mut r) = reader_over(b"ab\n\ncde\nunfinished", false, 0, 1024);
        assert_eq!(all_lines(&mut r), [(0, "ab".into(), false), (3, "".into(), false), (4, "cde".into(), false)]);
        assert_eq!(r.consumed(), 8);
        assert_eq!(r.buffered(), 10);
        let tail = r.take_unfinished().unwrap();
        assert_eq!((tail.offset, tail.bytes), (8, &b"unfinished"[..]));
        assert_eq!(r.consumed(), 18);
    }

    #[test]
    fn reading_resumes_at_an_offset_in_plain_and_gzip_files() {
        for gzip in [false, true] {
            let (_f, mut r) = reader_over(b"one\ntwo\nthree\n", gzip, 4, 1024);
            assert_eq!(all_lines(&mut r), [(4, "two".into(), false), (8, "three".into(), false)], "gzip={gzip}");
        }
    }

    #[test]
    fn gzip_checkpoint_past_the_end_is_an_error() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"short\n").unwrap();
        f.write_all(&enc.finish().unwrap()).unwrap();
        assert!(LineReader::open(f.path(), true, 100, 1024).is_err());
    }

    #[test]
    fn over_long_line_yields_its_head_once_and_the_rest_is_skipped() {
        let mut content = b"short\n".to_vec();
        content.extend(std::iter::repeat_n(b'x', 300_000));
        content.extend_from_slice(b"\nafter\n");
        let (_f, mut r) = reader_over(&content, false, 0, 4096);
        let lines = all_lines(&mut r);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].0, 6);
        assert_eq!(lines[1].1.len(), 4096);
        assert!(lines[1].2, "head is marked truncated");
        assert_eq!(lines[2], (6 + 300_001, "after".into(), false));
        assert!(r.buf.len() <= 4097, "buffer stays bounded, was {}", r.buf.len());
    }

    #[test]
    fn over_long_line_still_being_written_keeps_its_start_until_the_newline() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![b'y'; 10_000]).unwrap();
        f.flush().unwrap();
        let mut r = LineReader::open(f.path(), false, 0, 4096).unwrap();
        assert!(r.next_line().unwrap().unwrap().truncated);
        assert!(r.next_line().unwrap().is_none());
        assert_eq!(r.skipping_from(), Some(0));
        f.write_all(b"yyy\nnext\n").unwrap();
        f.flush().unwrap();
        assert_eq!(r.next_line().unwrap().unwrap().bytes, b"next");
        assert_eq!(r.skipping_from(), None);
    }
}
