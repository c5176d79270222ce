//! The kernel ring through `/dev/kmsg`: one record per read,
//! `<prio>,<seq>,<usec since boot>,<flags>[,...];<text>\n` followed by continuation
//! (dictionary) lines that start with a space. The same line-oriented reading serves the
//! device and a regular file (the tests' double), which hands out bytes in any split.

use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// One kernel record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRecord {
    /// The syslog level (0 emergency … 7 debug).
    pub level: u8,
    /// The kernel's sequence number, from 0 at every boot.
    pub seq: u64,
    /// Microseconds after boot.
    pub usec: u64,
    /// The text after `;`, without continuation lines; cut at the reader's bound.
    pub message: String,
    /// The text was longer than the bound.
    pub truncated: bool,
}

/// Parses a record's first line (without its newline).
pub fn parse(line: &[u8], max_message: usize) -> Option<KernelRecord> {
    let semi = memchr::memchr(b';', line)?;
    let header = std::str::from_utf8(&line[..semi]).ok()?;
    let mut fields = header.split(',');
    let prio: u32 = fields.next()?.parse().ok()?;
    let seq = fields.next()?.parse().ok()?;
    let usec = fields.next()?.parse().ok()?;
    let text = &line[semi + 1..];
    let truncated = text.len() > max_message;
    let text = &text[..text.len().min(max_message)];
    Some(KernelRecord { level: (prio & 7) as u8, seq, usec, message: String::from_utf8_lossy(text).into_owned(), truncated })
}

/// What one read pass found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Records were appended to the output (possibly none: only continuation lines).
    Records,
    /// Nothing more for now (`EAGAIN` on the device, end of a regular file).
    End,
    /// The kernel overwrote records before they were read (`EPIPE`); reading goes on from the
    /// oldest record left, and the sequence gap tells how many were lost.
    Overwritten,
}

/// Reads records from the device or a file, a bounded line at a time.
pub struct KmsgReader {
    file: File,
    /// A character device (poll for more) rather than a file (sleep for more).
    pub is_device: bool,
    buf: Vec<u8>,
    /// The start of a line whose end was not read yet (a regular file mid-write).
    partial: Vec<u8>,
    /// The partial line passed the bound: the rest of it is dropped up to its newline.
    overlong: bool,
    max_message: usize,
}

/// Largest record the kernel hands out in one read is 8 KiB; a larger buffer never gets `EINVAL`.
const READ_BUF: usize = 64 * 1024;

impl KmsgReader {
    /// Opens `path` non-blocking; messages are cut at `max_message` bytes.
    pub fn open(path: &Path, max_message: usize) -> io::Result<KmsgReader> {
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
        let is_device = file.metadata()?.file_type().is_char_device();
        Ok(KmsgReader { file, is_device, buf: vec![0; READ_BUF], partial: Vec::new(), overlong: false, max_message })
    }

    /// Reads up to `max` records, and about `max_bytes` of messages, into `out`.
    pub fn read(&mut self, out: &mut Vec<KernelRecord>, max: usize, max_bytes: usize) -> io::Result<Read> {
        let before = out.len();
        let mut bytes = 0;
        while out.len() - before < max && bytes < max_bytes {
            let n = match self.file.read(&mut self.buf) {
                Ok(0) => return Ok(if out.len() > before { Read::Records } else { Read::End }),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(if out.len() > before { Read::Records } else { Read::End }),
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => return Ok(after_overwrite(out.len() > before)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut data = &self.buf[..n];
            while let Some(end) = memchr::memchr(b'\n', data) {
                let (line, rest) = (&data[..end], &data[end + 1..]);
                data = rest;
                if self.overlong {
                    self.overlong = false;
                    self.partial.clear();
                    continue;
                }
                let line = if self.partial.is_empty() {
                    line
                } else {
                    self.partial.extend_from_slice(line);
                    &self.partial[..]
                };
                if !line.starts_with(b" ") {
                    if let Some(record) = parse(line, self.max_message) {
                        bytes += record.message.len();
                        out.push(record);
                    }
                }
                self.partial.clear();
            }
            if !data.is_empty() && !self.overlong {
                let room = (self.max_message + 64).saturating_sub(self.partial.len());
                self.partial.extend_from_slice(&data[..data.len().min(room)]);
                if data.len() > room {
                    // Keep the head (enough for the record, cut), drop the rest of the line.
                    if !self.partial.starts_with(b" ") {
                        if let Some(mut record) = parse(&self.partial, self.max_message) {
                            record.truncated = true;
                            out.push(record);
                        }
                    }
                    self.overlong = true;
                }
            }
        }
        Ok(Read::Records)
    }

    /// Waits up to `timeout` for more to read (the device), or just waits (a file).
    pub fn wait(&self, timeout: std::time::Duration) {
        if self.is_device {
            use std::os::fd::AsRawFd;
            let mut fds = libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut fds, 1, timeout.as_millis() as libc::c_int) };
        } else {
            std::thread::sleep(timeout);
        }
    }
}

/// Boot time in Unix seconds (`btime` of `<proc_root>/stat`).
pub fn boot_time(proc_root: &Path) -> io::Result<u64> {
    let stat = std::fs::read_to_string(proc_root.join("stat"))?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no btime line"))
}

/// The current boot's id (`<proc_root>/sys/kernel/random/boot_id`).
pub fn boot_id(proc_root: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(proc_root.join("sys/kernel/random/boot_id"))?.trim().to_string())
}

/// What a read that met `EPIPE` returns. The kernel reports the overwrite once and moves the
/// reader to the oldest record left, so records this read took before it are handed on
/// (dropping them would lose records that were read, and count them as overwritten); the
/// next read goes on from the oldest record, the sequence gap telling what was lost.
fn after_overwrite(took_records: bool) -> Read {
    if took_records {
        Read::Records
    } else {
        Read::Overwritten
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn records_read_before_an_overwrite_are_handed_on() {
        assert_eq!(after_overwrite(true), Read::Records, "taken records are shipped, not dropped");
        assert_eq!(after_overwrite(false), Read::Overwritten);
    }

    #[test]
    fn a_record_is_its_header_and_text_and_continuation_lines_are_never_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg");
        let ring = "6,0,5000,-;Linux version 6.1.0\n SUBSYSTEM=cpu\n DEVICE=+cpu:0\n3,1,7000123,-,caller=T1;nvidia: probe of 0000:3b:00.0 failed; retry\n";
        std::fs::write(&path, ring).unwrap();
        let mut reader = KmsgReader::open(&path, 1024).unwrap();
        assert!(!reader.is_device);
        let mut out = Vec::new();
        assert_eq!(reader.read(&mut out, 100, usize::MAX).unwrap(), Read::Records);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], KernelRecord { level: 6, seq: 0, usec: 5000, message: "Linux version 6.1.0".into(), truncated: false });
        assert_eq!((out[1].level, out[1].seq, out[1].usec), (3, 1, 7_000_123));
        assert_eq!(out[1].message, "nvidia: probe of 0000:3b:00.0 failed; retry", "only the first ; splits");
        out.clear();
        assert_eq!(reader.read(&mut out, 100, usize::MAX).unwrap(), Read::End, "end of a file is not an error");
    }

    #[test]
    fn a_line_written_in_two_parts_is_one_record_and_a_huge_one_is_cut_without_stalling() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg");
        std::fs::write(&path, "4,7,10,-;half of ").unwrap();
        let mut reader = KmsgReader::open(&path, 4096).unwrap();
        let mut out = Vec::new();
        assert_eq!(reader.read(&mut out, 100, usize::MAX).unwrap(), Read::End);
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        writeln!(file, "a line").unwrap();
        writeln!(file, "4,8,11,-;{}", "x".repeat(1 << 20)).unwrap();
        writeln!(file, "4,9,12,-;after").unwrap();
        reader.read(&mut out, 100, usize::MAX).unwrap();
        let seqs: Vec<u64> = out.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [7, 8, 9]);
        assert_eq!(out[0].message, "half of a line");
        assert!(out[1].truncated && out[1].message.len() == 4096, "cut at the bound");
        assert_eq!(out[2].message, "after");
    }

    #[test]
    fn headers_that_do_not_parse_are_skipped() {
        assert_eq!(parse(b"no header here", 100), None);
        assert_eq!(parse(b"x,1,2,-;text", 100), None);
        assert_eq!(parse(b"30,1,2,-;text", 100).unwrap().level, 6, "facility bits are not the level");
    }

    #[test]
    fn boot_time_and_id_come_from_the_proc_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/kernel/random")).unwrap();
        std::fs::write(dir.path().join("stat"), "cpu  1 2 3\nbtime 1764800000\nprocesses 9\n").unwrap();
        std::fs::write(dir.path().join("sys/kernel/random/boot_id"), "0b5e...\n").unwrap();
        assert_eq!(boot_time(dir.path()).unwrap(), 1_764_800_000);
        assert_eq!(boot_id(dir.path()).unwrap(), "0b5e...");
    }
}
