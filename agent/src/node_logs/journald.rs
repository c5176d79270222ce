//! The journal source: `journalctl --directory` as a child process, as Vector's journald
//! source does, so every journal file format the image's systemd reads (compact, keyed-hash,
//! zstd) is read by systemd's own code and no C library is linked into the agent.
//!
//! Never `--follow`: journalctl 252 following stays on the newest boot, and with
//! `--after-cursor` skips that boot's first entry, losing entries across a reboot. Nor
//! `--after-cursor` at all: it steps over one entry blindly, so when the cursor's entry was
//! vacuumed it skips the first entry after it. Each pass runs `journalctl --cursor=<last read>
//! -o json` to the journal's end, dropping the cursor's own entry when it is still there, and
//! the next pass starts a second later; entries of every boot come in order.

use std::io::{BufRead, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use super::record::NodeRecord;
use super::{pause, Context, Feed, NodeRecordLabels};
use crate::config::JournaldConfig;
use crate::logs::checkpoint::NodePosition;
use crate::logs::source::FileId;

/// Entries per batch, and message bytes (a batch is held until every sink has taken it).
const BATCH: usize = 500;
const BATCH_BYTES: usize = 2 * 1024 * 1024;
/// The wait between passes: new entries are shipped within it plus the sink's flush.
const PASS_INTERVAL: Duration = Duration::from_secs(1);
/// The `journalctl` to run, found on `PATH`.
const JOURNALCTL: &str = "journalctl";
/// The volatile journal, read when the configured directory holds none.
const RUNTIME_JOURNAL: &str = "/run/log/journal";

/// An opened journal.
pub struct JournalSource {
    dir: PathBuf,
    units: Vec<String>,
    journalctl: String,
}

/// Finds the journal: `path` when it (or a machine-id directory in it) holds `.journal`
/// files, else the volatile journal. An unreadable directory is an error naming it.
pub fn open(config: &JournaldConfig) -> anyhow::Result<JournalSource> {
    let dir = [config.path.as_path(), Path::new(RUNTIME_JOURNAL)].into_iter().find(|dir| holds_journal(dir)).ok_or_else(|| {
        match std::fs::read_dir(&config.path) {
            Err(e) => anyhow::anyhow!("node_logs.journald.path {}: {e}", config.path.display()),
            Ok(_) => anyhow::anyhow!("no journal files under {} or {RUNTIME_JOURNAL}", config.path.display()),
        }
    })?;
    Ok(JournalSource { dir: dir.to_path_buf(), units: config.units.clone(), journalctl: JOURNALCTL.into() })
}

fn holds_journal(dir: &Path) -> bool {
    let is_journal = |p: &Path| p.extension().is_some_and(|e| e == "journal" || e == "journal~");
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let path = e.path();
        is_journal(&path) || (path.is_dir() && std::fs::read_dir(&path).is_ok_and(|d| d.flatten().any(|f| is_journal(&f.path()))))
    })
}

impl JournalSource {
    /// Reads until `context.stop` is set.
    pub fn run(self, context: &Context, feed: &Feed) {
        let source = FileId { container: xxhash_rust::xxh3::xxh3_64(b"journal"), fingerprint: 0 };
        let mut cursor = context.checkpoints.node_positions().journal_cursor;
        tracing::info!(dir = %self.dir.display(), units = ?self.units, from_cursor = cursor.is_some(), "reading the journal");
        let mut failures = 0u32;
        loop {
            match self.pass(&mut cursor, context, feed, source) {
                Ok(true) => failures = 0,
                Ok(false) => return,
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::error!(error = %e, dir = %self.dir.display(), "cannot read the journal; retrying");
                    }
                    if failures >= 3 && cursor.is_some() {
                        // A cursor journalctl cannot seek to (a journal replaced by another
                        // machine's) must not stall the source: start over; document ids
                        // make what was shipped already a duplicate, not a second copy.
                        tracing::warn!("journalctl keeps failing after the saved cursor; reading the journal from its start");
                        cursor = None;
                    }
                }
            }
            if !pause(&context.stop, PASS_INTERVAL) {
                return;
            }
        }
    }

    fn command(&self, cursor: Option<&str>) -> Command {
        let mut command = Command::new(&self.journalctl);
        command.arg(format!("--directory={}", self.dir.display())).args(["--output=json", "--all", "--no-pager", "--quiet"]);
        if let Some(cursor) = cursor {
            command.arg(format!("--cursor={cursor}"));
        }
        command.args(self.units.iter().map(|u| format!("_SYSTEMD_UNIT={u}")));
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command
    }

    /// One journalctl run to the journal's end. False when stopping.
    fn pass(&self, cursor: &mut Option<String>, context: &Context, feed: &Feed, source: FileId) -> anyhow::Result<bool> {
        let mut child = KillOnDrop(self.command(cursor.as_deref()).spawn().map_err(|e| anyhow::anyhow!("{}: {e}", self.journalctl))?);
        // The pass starts at the saved cursor's entry, shipped already, when it still exists.
        let shipped = cursor.clone();
        let mut lines = BufReader::new(child.0.stdout.take().expect("piped"));
        // Drained on the side, so warnings about many damaged files cannot fill the pipe and
        // stall journalctl; the first 2 KiB are kept for the error message. It ends when the
        // child does (killed when this pass returns early).
        let mut stderr = child.0.stderr.take().expect("piped");
        let stderr = std::thread::Builder::new().name("journalctl-stderr".into()).spawn(move || {
            let mut kept = Vec::new();
            let _ = (&mut stderr).take(2048).read_to_end(&mut kept);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            String::from_utf8_lossy(&kept).into_owned()
        })?;
        let mut batch = Vec::with_capacity(BATCH);
        let (mut line, mut bytes) = (Vec::new(), 0);
        let max = context.config.logs.max_line_bytes;
        loop {
            let n = read_line(&mut lines, &mut line, max.saturating_mul(4) + 64 * 1024)?;
            if n > 0 {
                match entry(&line, max) {
                    Some((_, entry_cursor)) if shipped.as_ref() == Some(&entry_cursor) => {}
                    Some((record, entry_cursor)) => {
                        if let Some(record) = record {
                            context.metrics.records.get_or_create(&NodeRecordLabels::new("journald", record.priority)).inc();
                            bytes += record.message.len();
                            batch.push(record);
                        }
                        *cursor = Some(entry_cursor);
                    }
                    None => tracing::debug!("journalctl wrote a line that is not an entry"),
                }
            }
            let stopping = context.stop.load(Ordering::Acquire);
            if (n == 0 || batch.len() >= BATCH || bytes >= BATCH_BYTES || stopping) && cursor.is_some() {
                let position = NodePosition::Journal(cursor.clone().expect("checked"));
                if (!batch.is_empty() || n == 0) && !feed.send(source, &batch, position) {
                    return Ok(false);
                }
                batch.clear();
                bytes = 0;
            }
            if stopping {
                return Ok(false);
            }
            if n == 0 {
                break;
            }
        }
        let status = child.0.wait()?;
        let message = stderr.join().unwrap_or_default();
        if !status.success() {
            anyhow::bail!("journalctl {status}: {}", message.trim());
        }
        Ok(true)
    }
}

/// Reads one line into `line`, keeping at most `limit` bytes of it (the rest is skipped up to
/// its newline, and the cut line then fails to parse as an entry). Returns the bytes consumed.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, limit: usize) -> std::io::Result<usize> {
    line.clear();
    let mut consumed = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(consumed);
        }
        let (take, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = limit.saturating_sub(line.len());
        line.extend_from_slice(&buf[..take.min(room)]);
        reader.consume(take);
        consumed += take;
        if done {
            return Ok(consumed);
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A field of journalctl's JSON: a string, or an array of bytes for binary or invalid UTF-8.
fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Array(bytes) => {
            let bytes: Vec<u8> = bytes.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect();
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        _ => None,
    }
}

/// One line of `journalctl -o json`: the record (none for an entry without a message) and the
/// entry's cursor; `None` when the line is not an entry.
pub fn entry(line: &[u8], max_message: usize) -> Option<(Option<NodeRecord>, String)> {
    let value: Value = serde_json::from_slice(line).ok()?;
    let cursor = value.get("__CURSOR")?.as_str()?.to_string();
    let Some(mut message) = text(value.get("MESSAGE")) else { return Some((None, cursor)) };
    let truncated = message.len() > max_message;
    if truncated {
        let mut end = max_message;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    let number = |key: &str| text(value.get(key)).and_then(|v| v.parse::<u64>().ok());
    let record = NodeRecord {
        dataset: "node.journald",
        timestamp_us: number("__REALTIME_TIMESTAMP")?,
        message,
        priority: number("PRIORITY").map(|p| p.min(7) as u8),
        unit: text(value.get("_SYSTEMD_UNIT")),
        pid: number("_PID").map(|p| p as u32),
        process_name: text(value.get("_COMM")),
        truncated,
        id: xxhash_rust::xxh3::xxh3_64(cursor.as_bytes()),
        gpu: None,
    };
    Some((Some(record), cursor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_gives_the_ecs_fields_and_invalid_utf8_is_replaced() {
        let line = br#"{"__CURSOR":"s=1;i=2","__REALTIME_TIMESTAMP":"1764800000123456","PRIORITY":"3","_SYSTEMD_UNIT":"kubelet.service","_PID":"812","_COMM":"kubelet","MESSAGE":[104,105,255]}"#;
        let (record, cursor) = entry(line, 1024).unwrap();
        let record = record.unwrap();
        assert_eq!(cursor, "s=1;i=2");
        assert_eq!(record.message, "hi\u{fffd}");
        assert_eq!(record.timestamp_us, 1_764_800_000_123_456);
        assert_eq!((record.priority, record.pid), (Some(3), Some(812)));
        assert_eq!(record.unit.as_deref(), Some("kubelet.service"));
        assert_eq!(record.process_name.as_deref(), Some("kubelet"));
        assert_eq!(record.id, xxhash_rust::xxh3::xxh3_64(b"s=1;i=2"), "the id follows the cursor");
    }

    #[test]
    fn an_entry_without_a_message_moves_the_cursor_only() {
        let (record, cursor) = entry(br#"{"__CURSOR":"c","__REALTIME_TIMESTAMP":"1"}"#, 10).unwrap();
        assert_eq!((record, cursor.as_str()), (None, "c"));
        assert!(entry(b"not json", 10).is_none());
    }

    #[test]
    fn an_overlong_line_is_bounded_and_the_next_line_is_whole() {
        let text = format!("{}\n{{\"a\":1}}\n", "x".repeat(10_000));
        let mut reader = std::io::BufReader::with_capacity(64, text.as_bytes());
        let mut line = Vec::new();
        assert_eq!(read_line(&mut reader, &mut line, 100).unwrap(), 10_001);
        assert_eq!(line.len(), 100);
        read_line(&mut reader, &mut line, 100).unwrap();
        assert_eq!(line, b"{\"a\":1}\n");
        assert_eq!(read_line(&mut reader, &mut line, 100).unwrap(), 0);
    }

    #[test]
    fn an_unreadable_journal_directory_is_an_error_naming_it() {
        let config = JournaldConfig { path: "/nonexistent/journal".into(), ..JournaldConfig::default() };
        let Err(err) = open(&config) else {
            // A test machine with a volatile journal finds that one instead.
            return;
        };
        assert!(err.to_string().contains("/nonexistent/journal"), "{err}");
    }
}
