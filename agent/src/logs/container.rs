//! One container instance's log: its chain of files (rotated ones oldest first, then the live
//! one) read strictly in order, each record once, whichever name or compression its bytes sit
//! under when they are read.
//!
//! Files are known by fingerprint, so `0.log` renamed to `0.log.<ts>` and then compressed to
//! `0.log.<ts>.gz` stays one file with one position. A file is finished at its end once a newer
//! file exists (the runtime has moved on), or when the container can write no more.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::assemble::{Assembler, MultilineRule};
use super::checkpoint::Checkpoints;
use super::chunk::Chunk;
use super::decode;
use super::fingerprint::Format;
use super::limit::RateLimit;
use super::reader::{Line, LineReader};
use super::scan::ScannedFile;
use super::source::{ContainerInfo, FileId, Source};
use crate::identity::path::Generation;

/// Fixed inputs of a read step.
#[derive(Debug, Clone, Copy)]
pub struct StepLimits {
    /// Longest record kept.
    pub max_line_bytes: usize,
    /// How long a partial record waits for its closing part.
    pub partial_timeout: Duration,
    /// Most records in one chunk.
    pub max_records: usize,
    /// Most bytes consumed for one chunk.
    pub max_bytes: u64,
}

/// Bytes that kubelet removed before they were read.
#[derive(Debug, PartialEq, Eq)]
pub struct Lost {
    /// The file's last known path.
    pub path: std::path::PathBuf,
    /// Unread bytes.
    pub bytes: u64,
}

/// What one read step produced.
#[derive(Debug)]
pub struct Progress {
    /// Records read, and the position they complete.
    pub chunk: Chunk,
    /// Bytes found to be gone for good.
    pub lost: Vec<Lost>,
    /// The file was found truncated in place; it is read again from its start.
    pub truncated: bool,
}

/// Reading state of a file opened during this run.
struct FileState {
    consumed: u64,
    finished: bool,
}

struct OpenFile {
    source: Arc<Source>,
    fingerprint: u64,
    gzip: bool,
    reader: LineReader,
    /// Since when steps found nothing new; an idle file is closed after [`CLOSE_IDLE_AFTER`].
    idle_since: Option<Instant>,
    /// Its path is a symlink (docker's `<n>.log` into the runtime's own directory).
    symlinked: bool,
    /// The last step read to its end.
    at_end: bool,
    /// When it was opened: with containers waiting for a descriptor, a plain file holds its
    /// own for [`OPEN_TURN`] at most.
    opened_at: Instant,
}

/// How long a plain file being read stays open while other containers wait for a descriptor
/// (`logs.max_open_files`); a compressed one stays until its end (reopening it would
/// decompress it again from its start).
const OPEN_TURN: Duration = Duration::from_secs(5);

/// How long a file may be absent from scans before it counts as deleted. A scan can race with
/// the kubelet (a file listed, then renamed or compressed before it is opened) and miss a
/// file that still exists under another name.
const GONE_AFTER: Duration = Duration::from_secs(2);

/// How long a rotated file must be quiet before its end is final. Once the newer file holds a
/// line the runtime has reopened, but the other stream's writer may still be finishing a write
/// to the renamed file; a short quiet period covers that without delaying the newer file.
const QUIET_BEFORE_FINISH: Duration = Duration::from_millis(250);

/// A file with nothing new for this long is closed, so quiet and exited containers hold no
/// file descriptor; it is reopened (and checked to be the same inode) when it grows.
const CLOSE_IDLE_AFTER: Duration = Duration::from_secs(5);

/// How long a rotated file that exists but cannot be opened is retried before its unread
/// bytes count as lost and the files after it are read.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

/// How long a tail with nothing to read sleeps before looking again; scans and writes wake
/// it sooner.
const IDLE_POLL: Duration = Duration::from_secs(30);

/// The tail of one container instance.
pub struct ContainerTail {
    info: Arc<ContainerInfo>,
    chain: Vec<ScannedFile>,
    /// Files absent from the latest scans, since when: deleted once absent for [`GONE_AFTER`].
    missing: HashMap<u64, (ScannedFile, Instant)>,
    states: HashMap<u64, FileState>,
    /// Boxed: most tails of a node are idle, with no file open.
    open: Option<Box<OpenFile>>,
    assembler: Assembler,
    /// No newer file can appear: the container was restarted or its pod removed.
    final_: bool,
    /// When to look at the file again after finding nothing new.
    pub next_poll: Instant,
    backoff: Duration,
    /// The files have moved since the last scan (an open found another file or none): the
    /// tailer rescans the pod directory and clears this.
    pub wants_rescan: bool,
    /// Fingerprints whose file cannot be opened, since when (logged once).
    open_errors: HashMap<u64, Instant>,
    /// Live files renamed away against instances seen: what was never seen is lost.
    rotations: Rotations,
    /// The container's rate limit, if it has one (boxed: most have none).
    rate_limit: Option<Box<RateLimit>>,
}

/// Counts the instances of a container's live file, to find those created and deleted
/// unseen (the agent stopped or stalled across several rotations). Every rotation renames
/// the live file (a non-empty one: the kubelet rotates by size) and the runtime creates the
/// next: after `renames` rotations since the first scan, `renames` new instances have
/// existed, and every one the scans did not see (by fingerprint, or as the live file still
/// without a line) is lost. Scans racing the kubelet may miss a file for a moment, so a
/// shortfall counts only once it has lasted [`GONE_AFTER`] over two scans.
#[derive(Default)]
struct Rotations {
    /// Renames of the live file seen by inotify since the first scan.
    renames: u64,
    /// Fingerprints first seen after the first scan.
    fresh: u64,
    /// Fingerprints seen lately (a bounded memory: a file comes back only while it is being
    /// compressed, among the newest).
    recent: std::collections::VecDeque<u64>,
    scanned: bool,
    /// Instances already counted lost.
    counted: u64,
    /// Since when the scans have found fewer instances than rotations.
    short_since: Option<Instant>,
    /// Lost instances found by the last scan, not yet taken.
    unseen: u64,
}

/// Fingerprints [`Rotations`] remembers.
const RECENT_FINGERPRINTS: usize = 64;

impl Rotations {
    fn scanned(&mut self, chain: &[ScannedFile], live_pending: bool, now: Instant) {
        for file in chain {
            let fp = file.fingerprint.hash;
            if !self.recent.contains(&fp) {
                if self.recent.len() == RECENT_FINGERPRINTS {
                    self.recent.pop_front();
                }
                self.recent.push_back(fp);
                if self.scanned {
                    self.fresh += 1;
                }
            }
        }
        self.scanned = true;
        let seen = self.fresh + u64::from(live_pending);
        let short = self.renames.saturating_sub(seen);
        if short <= self.counted {
            self.short_since = None;
            return;
        }
        let since = *self.short_since.get_or_insert(now);
        if now.duration_since(since) >= GONE_AFTER {
            self.unseen += short - self.counted;
            self.counted = short;
            self.short_since = None;
        }
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl ContainerTail {
    /// A tail for `info`, with nothing known about its files yet.
    pub fn new(info: Arc<ContainerInfo>, max_line_bytes: usize) -> ContainerTail {
        ContainerTail {
            info,
            chain: Vec::new(),
            missing: HashMap::new(),
            states: HashMap::new(),
            open: None,
            assembler: Assembler::new(max_line_bytes),
            final_: false,
            next_poll: Instant::now(),
            backoff: MIN_BACKOFF,
            wants_rescan: false,
            open_errors: HashMap::new(),
            rotations: Rotations::default(),
            rate_limit: None,
        }
    }

    /// The container instance.
    pub fn info(&self) -> &Arc<ContainerInfo> {
        &self.info
    }

    /// Whether a file is open.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Closes the open file if the last step read it to its end, or it is plain and has been
    /// open for its turn ([`OPEN_TURN`]), and nothing is held across a reopen (a record being
    /// joined, a line being skipped, docker's symlinked files): its descriptor goes to a
    /// container waiting for one. True if closed.
    pub fn release_for_turn(&mut self, now: Instant) -> bool {
        let Some(open) = &self.open else { return false };
        let turn_over = open.at_end || (!open.gzip && now.duration_since(open.opened_at) >= OPEN_TURN);
        let closable = turn_over && open.reader.skipping_from().is_none() && self.assembler.pending_from().is_none() && !open.symlinked;
        if closable {
            self.open = None;
        }
        closable
    }

    /// inotify saw the live file renamed away (a rotation).
    pub fn note_rename(&mut self) {
        if self.rotations.scanned {
            self.rotations.renames += 1;
        }
    }

    /// Files of this container found created and deleted before any scan saw them, since
    /// the last call.
    pub fn take_unseen_lost(&mut self) -> u64 {
        std::mem::take(&mut self.rotations.unseen)
    }

    /// Takes the latest scan of this container's files; returns what was deleted unread.
    pub fn update(&mut self, chain: Vec<ScannedFile>, checkpoints: &Checkpoints) -> Vec<Lost> {
        self.update_at(chain, checkpoints, Instant::now())
    }

    fn update_at(&mut self, mut chain: Vec<ScannedFile>, checkpoints: &Checkpoints, now: Instant) -> Vec<Lost> {
        let missing_before: Vec<u64> = self.missing.keys().copied().collect();
        let in_chain = |fp: u64| chain.iter().any(|f| f.fingerprint.hash == fp);
        for old in self.chain.drain(..) {
            if !in_chain(old.fingerprint.hash) {
                self.missing.entry(old.fingerprint.hash).or_insert((old, now));
            }
        }
        self.missing.retain(|fp, _| !in_chain(*fp));
        let open_fp = self.open.as_ref().map(|o| o.fingerprint);
        let gone: Vec<ScannedFile> = {
            let expired: Vec<u64> = self
                .missing
                .iter()
                .filter(|(fp, (_, since))| Some(**fp) != open_fp && now.duration_since(*since) >= GONE_AFTER)
                .map(|(fp, _)| *fp)
                .collect();
            expired.into_iter().filter_map(|fp| self.missing.remove(&fp).map(|(f, _)| f)).collect()
        };
        let mut lost = Vec::new();
        for file in gone {
            let fp = file.fingerprint.hash;
            self.open_errors.remove(&fp);
            let state = self.states.remove(&fp);
            if state.as_ref().is_some_and(|s| s.finished) {
                continue;
            }
            let position = state.map(|s| s.consumed).or_else(|| checkpoints.offset(self.file_id(fp))).unwrap_or(0);
            if file.size > position {
                lost.push(Lost { path: file.path.clone(), bytes: file.size - position });
            }
        }
        // What was read of the open file is on disk, whatever the scan saw a moment earlier.
        if let Some(open) = &self.open {
            if let Some(file) = chain.iter_mut().find(|f| f.fingerprint.hash == open.fingerprint && !open.gzip) {
                file.size = file.size.max(open.reader.consumed());
            }
        }
        let changed = missing_before.len() != self.missing.len()
            || missing_before.iter().any(|fp| !self.missing.contains_key(fp))
            || self.chain.len() != chain.len()
            || self.chain.iter().zip(&chain).any(|(a, b)| a.fingerprint != b.fingerprint || a.size != b.size || a.path != b.path);
        // The live file without a whole line yet is an instance seen, not yet fingerprinted.
        let live_pending = !self.final_ && chain.last().is_none_or(|f| f.generation != Generation::Live);
        self.rotations.scanned(&chain, live_pending, now);
        self.chain = chain;
        // Scans build chains with room to spare; thousands of idle tails keep theirs.
        self.chain.shrink_to_fit();
        // A rescan that finds what was known (one asked for after an open failed) leaves the
        // backoff alone.
        if changed {
            self.poke();
        }
        lost
    }

    /// No newer file will appear; read what is there to its end.
    pub fn set_final(&mut self) {
        self.final_ = true;
    }

    /// Sets the multi-line rule of the container's application.
    pub fn set_multiline(&mut self, rule: Option<Arc<MultilineRule>>) {
        self.assembler.set_multiline(rule);
    }

    /// Limits reading to `per_second` records a second (`0`: no limit). An unchanged limit
    /// keeps its bucket.
    pub fn set_rate_limit(&mut self, per_second: u32, now: Instant) {
        match (&self.rate_limit, per_second) {
            (_, 0) => self.rate_limit = None,
            (Some(limit), n) if limit.per_second() == n => {}
            (_, n) => self.rate_limit = Some(Box::new(RateLimit::new(n, now))),
        }
    }

    /// The container's rate limit, if it has one.
    pub fn rate_limit_mut(&mut self) -> Option<&mut RateLimit> {
        self.rate_limit.as_deref_mut()
    }

    /// Makes the next step look at the files now (something was written).
    pub fn poke(&mut self) {
        self.backoff = MIN_BACKOFF;
        self.next_poll = Instant::now();
    }

    /// Final and read to the end: nothing more will come from this container instance.
    pub fn is_done(&self, checkpoints: &Checkpoints) -> bool {
        self.final_ && self.open.is_none() && self.missing.is_empty() && self.select(checkpoints).is_none()
    }

    /// No file of this container instance is left on disk. A finished tail is kept until then,
    /// so its files keep their positions and are never read again.
    pub fn is_gone(&self) -> bool {
        self.chain.is_empty() && self.missing.is_empty() && self.open.is_none()
    }

    /// Ids of every file that may still exist, for checkpoint garbage collection.
    pub fn file_ids(&self) -> impl Iterator<Item = FileId> + '_ {
        let fps = self.chain.iter().map(|f| f.fingerprint.hash).chain(self.missing.keys().copied()).chain(self.states.keys().copied());
        fps.map(|fp| self.file_id(fp))
    }

    /// Bytes in the chain not yet acknowledged.
    pub fn backlog(&self, checkpoints: &Checkpoints) -> u64 {
        self.chain.iter().map(|f| f.size.saturating_sub(checkpoints.offset(self.file_id(f.fingerprint.hash)).unwrap_or(0))).sum()
    }

    /// Reads the next records, up to the limits. `None` when there was nothing to do.
    pub fn step(&mut self, checkpoints: &Checkpoints, limits: &StepLimits, now: Instant) -> Option<Progress> {
        if self.open.is_none() {
            let Some(index) = self.select(checkpoints) else {
                self.next_poll = now + IDLE_POLL;
                return None;
            };
            match self.open_file(index, checkpoints, limits) {
                Ok(Some(open)) => self.open = Some(Box::new(open)),
                Ok(None) => {
                    self.back_off(now);
                    return None;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Renamed, compressed or replaced since the scan: find it again. Its bytes
                    // count as lost only once the file is gone from disk.
                    self.wants_rescan = true;
                    self.back_off(now);
                    return None;
                }
                Err(e) => return self.open_failed(index, e, checkpoints, now),
            }
        }
        let open = self.open.as_mut().expect("opened above");
        let mut chunk = Chunk::new(open.source.clone());
        let mut lost = Vec::new();
        let start = open.reader.consumed();
        let mut at_end = false;
        let mut read_error = None;
        while chunk.records.len() < limits.max_records && open.reader.consumed() - start < limits.max_bytes {
            match open.reader.next_line() {
                Ok(Some(line)) => decode_into(open.source.format, &mut self.assembler, &mut chunk, line, now),
                Ok(None) => {
                    at_end = true;
                    break;
                }
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            }
        }
        let known_size = self.chain.iter().find(|f| f.fingerprint.hash == open.fingerprint).map_or(0, |f| f.size);
        // Shorter than what was read: truncated in place (copytruncate, `> 0.log`).
        let truncated = at_end && !open.gzip && open.reader.file_len().is_some_and(|len| len < open.reader.consumed());
        if truncated {
            tracing::warn!(path = %open.source.path.display(), offset = open.reader.consumed(), "log file truncated in place; reading it again from its start");
            if known_size > open.reader.consumed() {
                lost.push(Lost { path: open.source.path.clone(), bytes: known_size - open.reader.consumed() });
            }
        }
        let is_last = self.chain.last().map(|f| f.fingerprint.hash) == Some(open.fingerprint);
        let quiet = || open.reader.modified().is_none_or(|m| m.elapsed().unwrap_or_default() >= QUIET_BEFORE_FINISH);
        let finished = truncated || read_error.is_some() || (at_end && (open.gzip || ((!is_last || self.final_) && quiet())));
        if let Some(e) = &read_error {
            tracing::error!(path = %open.source.path.display(), error = %e, offset = open.reader.consumed(), "log file unreadable past this offset");
            lost.push(Lost { path: open.source.path.clone(), bytes: known_size.saturating_sub(open.reader.consumed()) });
        }
        if finished {
            if !truncated {
                if let Some(line) = open.reader.take_unfinished() {
                    decode_into(open.source.format, &mut self.assembler, &mut chunk, line, now);
                }
            }
            self.assembler.flush_all(&mut chunk);
        } else if at_end {
            self.assembler.flush_expired(&mut chunk, now, limits.partial_timeout);
        }
        let consumed = open.reader.consumed();
        open.at_end = at_end;
        chunk.read_bytes = consumed - start;
        chunk.commit_offset = [Some(consumed), self.assembler.pending_from(), open.reader.skipping_from()]
            .into_iter()
            .flatten()
            .min()
            .expect("consumed is always there");
        let fingerprint = open.fingerprint;
        let state = self.states.get_mut(&fingerprint).expect("state created on open");
        state.consumed = consumed;
        let progressed = chunk.read_bytes > 0 || !chunk.records.is_empty();
        if let Some(file) = self.chain.iter_mut().find(|f| f.fingerprint.hash == fingerprint && !f.generation.is_gzip()) {
            file.size = file.size.max(consumed);
        }
        if finished {
            state.finished = true;
            self.open = None;
            self.wants_rescan |= truncated;
            self.poke();
        } else if progressed {
            open.idle_since = None;
            self.backoff = MIN_BACKOFF;
        } else {
            let idle_since = *open.idle_since.get_or_insert(now);
            // Kept open: a record still being joined (its timeout must fire), and docker's
            // symlinked files, which the runtime rotates itself, out of inotify's sight.
            let closable = open.reader.skipping_from().is_none() && self.assembler.pending_from().is_none() && !open.symlinked;
            if now.duration_since(idle_since) >= CLOSE_IDLE_AFTER && closable {
                tracing::debug!(path = %open.source.path.display(), offset = consumed, "closing idle log file");
                self.open = None;
            }
            self.back_off(now);
        }
        Some(Progress { chunk, lost, truncated })
    }

    /// A file that exists and cannot be opened or positioned (EACCES, EMFILE, EIO, a
    /// compressed copy cut short by a crash). Retried with backoff; a rotated file still
    /// failing after [`GIVE_UP_AFTER`], or a compressed one at once (it will not change), is
    /// counted as lost so the files after it are read.
    fn open_failed(&mut self, index: usize, e: io::Error, checkpoints: &Checkpoints, now: Instant) -> Option<Progress> {
        let file = &self.chain[index];
        let fp = file.fingerprint.hash;
        let since = *self.open_errors.entry(fp).or_insert_with(|| {
            tracing::warn!(path = %file.path.display(), error = %e, "cannot open log file; will retry");
            now
        });
        let is_live = index + 1 == self.chain.len() && !self.final_ && !file.generation.is_gzip();
        let give_up = !is_live && (file.generation.is_gzip() || now.duration_since(since) >= GIVE_UP_AFTER);
        if !give_up {
            self.back_off(now);
            return None;
        }
        let position = self.states.get(&fp).map(|s| s.consumed).or_else(|| checkpoints.offset(self.file_id(fp))).unwrap_or(0);
        tracing::error!(path = %file.path.display(), error = %e, offset = position, "log file unreadable; skipping the rest of it");
        let lost = vec![Lost { path: file.path.clone(), bytes: file.size.saturating_sub(position) }];
        self.states.insert(fp, FileState { consumed: position, finished: true });
        self.open_errors.remove(&fp);
        self.poke();
        Some(Progress { chunk: Chunk::new(self.source(index)), lost, truncated: false })
    }

    fn back_off(&mut self, now: Instant) {
        self.next_poll = now + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// The first file in the chain not read to its end; the live file when all are. `None`
    /// while an unfinished file that comes first is absent from the scan (it is being renamed
    /// or compressed and will be back).
    fn select(&self, checkpoints: &Checkpoints) -> Option<usize> {
        let last = self.chain.len().checked_sub(1)?;
        let waiting_for = self
            .missing
            .iter()
            .filter(|(fp, _)| !self.states.get(fp).is_some_and(|s| s.finished))
            .map(|(_, (file, _))| file.generation)
            .min();
        for (i, file) in self.chain.iter().enumerate() {
            if waiting_for.is_some_and(|g| g <= file.generation) {
                return None;
            }
            let fp = file.fingerprint.hash;
            if let Some(state) = self.states.get(&fp) {
                if state.finished {
                    continue;
                }
                return Some(i);
            }
            let position = checkpoints.offset(self.file_id(fp)).unwrap_or(0);
            let complete = if file.generation.is_gzip() { position as u32 == file.size as u32 } else { position >= file.size };
            let keep_following = i == last && !self.final_ && !file.generation.is_gzip();
            if !complete || keep_following {
                return Some(i);
            }
        }
        None
    }

    /// Opens the chain's file at `index` at its position. `Ok(None)` when a file closed while
    /// idle has not grown since; an error of kind `NotFound` when the path no longer holds
    /// that file (renamed or compressed since the scan).
    fn open_file(&mut self, index: usize, checkpoints: &Checkpoints, limits: &StepLimits) -> io::Result<Option<OpenFile>> {
        let file = &self.chain[index];
        let fp = file.fingerprint.hash;
        let gzip = file.generation.is_gzip();
        let known = self.states.get(&fp).map(|s| s.consumed);
        let position = known.or_else(|| checkpoints.offset(self.file_id(fp))).unwrap_or(0);
        let same_file = |meta: &std::fs::Metadata| {
            let same = (meta.dev(), meta.ino()) == file.inode;
            same.then_some(()).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "another file is at this path now"))
        };
        // A file closed while idle is looked at without a descriptor until it has grown.
        if known.is_some() && !gzip && index + 1 == self.chain.len() && !self.final_ {
            let meta = std::fs::metadata(&file.path)?;
            same_file(&meta)?;
            if meta.len() == position {
                return Ok(None);
            }
        }
        let handle = std::fs::File::open(&file.path)?;
        same_file(&handle.metadata()?)?;
        // Room for the runtime's framing around a record of max_line_bytes.
        let reader = LineReader::from_file(handle, gzip, position, limits.max_line_bytes + 4096)?;
        self.states.entry(fp).or_insert(FileState { consumed: position, finished: false });
        self.open_errors.remove(&fp);
        tracing::debug!(path = %file.path.display(), offset = position, "reading log file");
        let symlinked = std::fs::symlink_metadata(&file.path).is_ok_and(|m| m.file_type().is_symlink());
        Ok(Some(OpenFile {
            source: self.source(index),
            fingerprint: fp,
            gzip,
            reader,
            idle_since: None,
            symlinked,
            at_end: false,
            opened_at: Instant::now(),
        }))
    }

    /// The identity of the chain's file at `index`, as records and checkpoints name it.
    fn source(&self, index: usize) -> Arc<Source> {
        let file = &self.chain[index];
        Arc::new(Source {
            container: self.info.clone(),
            id: self.file_id(file.fingerprint.hash),
            path: file.path.clone(),
            format: file.fingerprint.format,
        })
    }

    fn file_id(&self, fingerprint: u64) -> FileId {
        FileId::new(&self.info.reference, fingerprint)
    }
}

fn decode_into(format: Format, assembler: &mut Assembler, chunk: &mut Chunk, line: Line<'_>, now: Instant) {
    let decoded = match format {
        Format::Cri => decode::cri(line.bytes),
        Format::Docker => decode::docker(line.bytes),
    };
    match decoded {
        Ok(d) => assembler.push(chunk, line.offset, d, line.truncated, now),
        Err(_) => assembler.push_malformed(chunk, line.offset, line.bytes, line.truncated),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod rotation_tests {
    use super::*;
    use crate::logs::fingerprint::Fingerprint;

    fn file(name: &str, fp: u64, generation: Generation) -> ScannedFile {
        let fingerprint = Fingerprint { hash: fp, format: Format::Cri };
        ScannedFile { path: name.into(), generation, fingerprint, size: 10, inode: (1, fp) }
    }

    fn rotated(fp: u64) -> ScannedFile {
        file("0.log.20261122-000001", fp, Generation::Rotated { at: fp, gzip: false })
    }

    #[test]
    fn instances_never_seen_count_once_they_stay_missing_and_a_scan_that_misses_one_counts_nothing() {
        let t0 = Instant::now();
        let later = |s: u64| t0 + Duration::from_secs(s);
        let mut r = Rotations::default();
        r.scanned(&[file("0.log", 1, Generation::Live)], false, t0);
        // An ordinary rotation: the new live file is empty (pending), then written.
        r.renames += 1;
        r.scanned(&[rotated(1)], true, later(1));
        r.scanned(&[rotated(1), file("0.log", 2, Generation::Live)], false, later(2));
        assert_eq!((r.unseen, r.counted), (0, 0));
        // A scan racing the kubelet misses the next instance once: nothing is counted.
        r.renames += 1;
        r.scanned(&[rotated(1)], false, later(3));
        r.scanned(&[rotated(2), file("0.log", 3, Generation::Live)], false, later(6));
        assert_eq!((r.unseen, r.counted), (0, 0), "found again before it counted");
        // Three rotations while stopped; one instance (4) was never seen.
        r.renames += 3;
        r.scanned(&[rotated(5), file("0.log", 6, Generation::Live)], false, later(10));
        assert_eq!(r.unseen, 0, "not at the first scan that is short");
        r.scanned(&[rotated(5), file("0.log", 6, Generation::Live)], false, later(11));
        assert_eq!(r.unseen, 0, "nor before it has lasted GONE_AFTER");
        r.scanned(&[rotated(5), file("0.log", 6, Generation::Live)], false, later(13));
        assert_eq!(r.unseen, 1);
        r.scanned(&[rotated(5), file("0.log", 6, Generation::Live)], false, later(20));
        assert_eq!(r.unseen, 1, "counted once");
    }
}
