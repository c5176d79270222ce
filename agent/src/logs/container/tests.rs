use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use super::*;
use crate::identity::path::{ContainerRef, Generation};
use crate::logs::scan::{self, FingerprintCache, Scan};

const LIMITS: StepLimits =
    StepLimits { max_line_bytes: 1024, partial_timeout: Duration::from_secs(5), max_records: 1000, max_bytes: 1 << 20 };

struct Fixture {
    root: tempfile::TempDir,
    checkpoints: Checkpoints,
    cache: FingerprintCache,
    tail: ContainerTail,
    lines: usize,
}

impl Fixture {
    fn new() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("pods/ns_pod_uid/c")).unwrap();
        let checkpoints = Checkpoints::open(&root.path().join("state")).unwrap();
        let reference =
            ContainerRef { namespace: "ns".into(), pod: "pod".into(), pod_uid: "uid".into(), container: "c".into(), restart: 0 };
        let info = Arc::new(ContainerInfo { reference, container_id: None, runtime: None });
        Fixture { root, checkpoints, cache: FingerprintCache::default(), tail: ContainerTail::new(info, 1024), lines: 0 }
    }

    fn file(&self, name: &str) -> std::path::PathBuf {
        self.root.path().join("pods/ns_pod_uid/c").join(name)
    }

    fn line(&mut self, message: &str) -> String {
        self.lines += 1;
        format!("2026-11-22T03:16:40.{:09}Z stdout F {message}\n", self.lines)
    }

    /// Writes a file whose last write lies in the past, so its end is final once a newer file exists.
    fn write(&mut self, name: &str, messages: &[&str]) {
        let text: String = messages.iter().map(|m| self.line(m)).collect();
        fs::write(self.file(name), text).unwrap();
        self.age(name);
    }

    fn age(&self, name: &str) {
        let old = SystemTime::now() - Duration::from_secs(60);
        fs::File::options().write(true).open(self.file(name)).unwrap().set_modified(old).unwrap();
    }

    fn scan(&mut self) -> Vec<ScannedFile> {
        let mut found = Scan::default();
        let pods = self.root.path().join("pods");
        let empty = globset::GlobSet::empty();
        let exclusions = scan::Exclusions { namespaces: &empty, own_pod_uid: None };
        scan::scan_pod_dir(&pods.join("ns_pod_uid"), &pods, &exclusions, &mut self.cache, &mut found);
        found.chains.into_values().next().unwrap_or_default()
    }

    /// Messages of every step until there is nothing more to read.
    fn read_all(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..20 {
            let Some(Progress { chunk, .. }) = self.tail.step(&self.checkpoints, &LIMITS, Instant::now()) else { break };
            out.extend(chunk.records.iter().map(|r| String::from_utf8_lossy(chunk.message(r)).into_owned()));
            self.tail.next_poll = Instant::now();
        }
        out
    }
}

fn gzip(path: &Path) {
    use std::io::Write;
    let plain = fs::read(path).unwrap();
    let mut enc = flate2::write::GzEncoder::new(fs::File::create(format!("{}.gz", path.display())).unwrap(), flate2::Compression::fast());
    enc.write_all(&plain).unwrap();
    enc.finish().unwrap();
    fs::remove_file(path).unwrap();
}

fn live_only(chain: &[ScannedFile]) -> Vec<ScannedFile> {
    chain.iter().filter(|s| s.generation == Generation::Live).cloned().collect()
}

#[test]
fn a_file_missed_by_one_scan_mid_compression_is_not_read_again() {
    let mut f = Fixture::new();
    f.write("0.log.20261122-000001", &["old-1", "old-2"]);
    f.write("0.log", &["new-1"]);
    let chain = f.scan();
    f.tail.update(chain.clone(), &f.checkpoints);
    assert_eq!(f.read_all(), ["old-1", "old-2", "new-1"]);

    // The scan listed neither the plain file (already removed) nor the .gz (renamed in later).
    assert!(f.tail.update(live_only(&chain), &f.checkpoints).is_empty(), "not lost: it may be back");
    gzip(&f.file("0.log.20261122-000001"));
    let chain = f.scan();
    assert!(chain[0].path.to_string_lossy().ends_with(".gz"));
    f.tail.update(chain, &f.checkpoints);
    assert!(f.read_all().is_empty(), "the compressed copy is the same file, already read");

    // The next rotation makes the tail choose its next file from the whole chain again.
    fs::rename(f.file("0.log"), f.file("0.log.20261122-000002")).unwrap();
    f.write("0.log", &["newer-1"]);
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    assert_eq!(f.read_all(), ["newer-1"], "nothing before the newest file is read twice");
}

#[test]
fn the_next_file_waits_while_an_unread_earlier_one_is_missing() {
    let mut f = Fixture::new();
    f.write("0.log.20261122-000001", &["old-1"]);
    f.write("0.log", &["new-1"]);
    let full = f.scan();
    f.tail.update(full.clone(), &f.checkpoints);
    f.tail.update(live_only(&full), &f.checkpoints);
    assert!(f.read_all().is_empty(), "order is kept: the live file waits for the rotated one");
    f.tail.update(full, &f.checkpoints);
    assert_eq!(f.read_all(), ["old-1", "new-1"]);
}

#[test]
fn an_unread_file_gone_for_longer_than_the_grace_is_counted_lost() {
    let mut f = Fixture::new();
    f.write("0.log.20261122-000001", &["never-read"]);
    f.write("0.log", &["live"]);
    let full = f.scan();
    let rotated_size = full[0].size;
    let start = Instant::now();
    f.tail.update_at(full.clone(), &f.checkpoints, start);
    assert!(f.tail.update_at(live_only(&full), &f.checkpoints, start).is_empty());
    let lost = f.tail.update_at(live_only(&full), &f.checkpoints, start + GONE_AFTER);
    assert_eq!(lost, vec![Lost { path: f.file("0.log.20261122-000001"), bytes: rotated_size }]);
    assert_eq!(f.read_all(), ["live"]);
}

#[test]
fn a_rotated_file_written_just_now_is_not_finished_yet() {
    let mut f = Fixture::new();
    f.write("0.log.20261122-000001", &["a"]);
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    assert_eq!(f.read_all(), ["a"]);
    // Rotation: a newer file appears, and the runtime writes one more line to the renamed
    // file before it reopens.
    f.write("0.log", &["b"]);
    let late = f.line("late");
    let mut renamed = fs::OpenOptions::new().append(true).open(f.file("0.log.20261122-000001")).unwrap();
    std::io::Write::write_all(&mut renamed, late.as_bytes()).unwrap();
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    assert_eq!(f.read_all(), ["late"], "the renamed file stays open while it was written to just now");
    f.age("0.log.20261122-000001");
    assert_eq!(f.read_all(), ["b"]);
}

#[test]
fn a_file_truncated_in_place_is_read_again_from_its_start() {
    let mut f = Fixture::new();
    f.write("0.log", &["before-1", "before-2"]);
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    assert_eq!(f.read_all(), ["before-1", "before-2"]);
    // copytruncate: same inode, emptied, written again.
    let again = f.line("after-1");
    fs::OpenOptions::new().write(true).truncate(true).open(f.file("0.log")).unwrap();
    let step = f.tail.step(&f.checkpoints, &LIMITS, Instant::now()).expect("the open file notices");
    assert!(step.truncated);
    assert!(f.tail.wants_rescan, "the tailer is asked to fingerprint it again");
    fs::write(f.file("0.log"), again).unwrap();
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    assert_eq!(f.read_all(), ["after-1"], "new content from offset 0, nothing old repeated");
}

#[test]
fn a_file_gone_between_scan_and_open_is_not_finished_but_looked_for_again() {
    let mut f = Fixture::new();
    f.write("0.log.20261122-000001", &["rotated-1", "rotated-2"]);
    f.write("0.log", &["live-1"]);
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    // The kubelet compresses the rotated file and removes the plain one after the scan.
    gzip(&f.file("0.log.20261122-000001"));
    assert!(f.read_all().is_empty(), "nothing read out of order");
    assert!(f.tail.wants_rescan);
    let chain = f.scan();
    let lost = f.tail.update(chain, &f.checkpoints);
    assert!(lost.is_empty());
    assert_eq!(f.read_all(), ["rotated-1", "rotated-2", "live-1"], "read from the .gz twin");
}

#[test]
fn an_idle_file_is_closed_and_reopened_where_it_left_off() {
    let mut f = Fixture::new();
    f.write("0.log", &["one"]);
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    assert_eq!(f.read_all(), ["one"]);
    let t0 = Instant::now();
    f.tail.step(&f.checkpoints, &LIMITS, t0);
    assert!(f.tail.is_open());
    f.tail.step(&f.checkpoints, &LIMITS, t0 + CLOSE_IDLE_AFTER);
    assert!(!f.tail.is_open(), "idle: no descriptor held");
    assert!(f.tail.step(&f.checkpoints, &LIMITS, t0 + CLOSE_IDLE_AFTER).is_none(), "unchanged: not even opened");
    assert!(!f.tail.is_open());
    let more = f.line("two");
    fs::OpenOptions::new().append(true).open(f.file("0.log")).unwrap().write_all(more.as_bytes()).unwrap();
    assert_eq!(f.read_all(), ["two"]);
}

#[test]
fn a_closed_file_whose_path_now_holds_another_is_not_read_at_the_old_offset() {
    let mut f = Fixture::new();
    f.write("0.log", &["one", "two"]);
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    assert_eq!(f.read_all(), ["one", "two"]);
    let t0 = Instant::now();
    f.tail.step(&f.checkpoints, &LIMITS, t0);
    f.tail.step(&f.checkpoints, &LIMITS, t0 + CLOSE_IDLE_AFTER);
    assert!(!f.tail.is_open());
    // Rotated while closed: the old path holds a new, longer file.
    fs::rename(f.file("0.log"), f.file("0.log.20261122-000001")).unwrap();
    f.write("0.log", &["three", "four", "five"]);
    f.tail.poke();
    assert!(f.read_all().is_empty(), "not read through the old name");
    assert!(f.tail.wants_rescan);
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    assert_eq!(f.read_all(), ["three", "four", "five"]);
}

#[test]
fn sizes_and_backlog_follow_what_was_read() {
    let mut f = Fixture::new();
    f.write("0.log", &["one"]);
    let chain = f.scan();
    let first = chain[0].size;
    f.tail.update(chain, &f.checkpoints);
    assert_eq!(f.tail.backlog(&f.checkpoints), first);
    let more = f.line("two");
    fs::OpenOptions::new().append(true).open(f.file("0.log")).unwrap().write_all(more.as_bytes()).unwrap();
    assert_eq!(f.read_all(), ["one", "two"]);
    let total = fs::metadata(f.file("0.log")).unwrap().len();
    assert_eq!(f.tail.backlog(&f.checkpoints), total, "read, not acknowledged: all of it is backlog");
    let fp = f.scan()[0].fingerprint.hash;
    let id = FileId::new(&f.tail.info().reference, fp);
    f.checkpoints.acknowledge(id, total, &f.file("0.log"));
    assert_eq!(f.tail.backlog(&f.checkpoints), 0);
}

#[test]
fn a_compressed_file_that_cannot_be_read_is_counted_lost_and_the_next_file_is_read() {
    let mut f = Fixture::new();
    f.write("0.log.20261122-000001", &["rotated-1", "rotated-2", "rotated-3"]);
    f.write("0.log", &["live-1"]);
    let chain = f.scan();
    let rotated_size = chain[0].size;
    f.tail.update(chain, &f.checkpoints);
    // Part of the rotated file was shipped before the node crashed mid-compression.
    let fp = f.scan()[0].fingerprint.hash;
    let id = FileId::new(&f.tail.info().reference, fp);
    f.checkpoints.acknowledge(id, 10, &f.file("0.log.20261122-000001"));
    gzip(&f.file("0.log.20261122-000001"));
    let gz = f.file("0.log.20261122-000001.gz");
    let bytes = fs::read(&gz).unwrap();
    fs::write(&gz, &bytes[..bytes.len() - 12]).unwrap();
    let mut tail = ContainerTail::new(f.tail.info().clone(), 1024);
    let chain = f.scan();
    assert!(chain[0].path.ends_with("0.log.20261122-000001.gz"));
    tail.update(chain, &f.checkpoints);
    let mut lost = Vec::new();
    let mut messages = Vec::new();
    for _ in 0..10 {
        if let Some(step) = tail.step(&f.checkpoints, &LIMITS, Instant::now()) {
            lost.extend(step.lost);
            messages.extend(step.chunk.records.iter().map(|r| String::from_utf8_lossy(step.chunk.message(r)).into_owned()));
        }
        tail.next_poll = Instant::now();
    }
    assert!(messages.ends_with(&["live-1".to_string()]), "the live file is not blocked: {messages:?}");
    assert!(lost.iter().map(|l| l.bytes).sum::<u64>() > 0, "the unreadable rest is counted: {lost:?}");
    assert!(rotated_size > 10);
}

#[test]
fn an_idle_file_stays_open_while_a_partial_record_waits_for_its_timeout() {
    let mut f = Fixture::new();
    let head = "2026-11-22T03:16:40.000000001Z stdout P first half \n".to_string();
    fs::write(f.file("0.log"), head).unwrap();
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    let limits = StepLimits { partial_timeout: Duration::from_secs(30), ..LIMITS };
    let t0 = Instant::now();
    assert!(f.tail.step(&f.checkpoints, &limits, t0).unwrap().chunk.records.is_empty(), "the part waits for its closing part");
    f.tail.step(&f.checkpoints, &limits, t0 + Duration::from_secs(1));
    f.tail.step(&f.checkpoints, &limits, t0 + Duration::from_secs(1) + CLOSE_IDLE_AFTER);
    assert!(f.tail.is_open(), "closing now would stop the partial timeout");
    let step = f.tail.step(&f.checkpoints, &limits, t0 + limits.partial_timeout).unwrap();
    assert_eq!(step.chunk.records.len(), 1, "the partial record ships at its timeout");
}

#[test]
fn a_file_whose_turn_is_over_is_closed_and_read_on_from_where_it_stopped() {
    let mut f = Fixture::new();
    let messages: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    f.write("0.log", &messages.iter().map(String::as_str).collect::<Vec<_>>());
    let chain = f.scan();
    f.tail.update(chain, &f.checkpoints);
    let small = StepLimits { max_records: 4, ..LIMITS };
    let now = Instant::now();
    let first = f.tail.step(&f.checkpoints, &small, now).unwrap().chunk;
    assert_eq!(first.records.len(), 4);
    assert!(!f.tail.release_for_turn(now), "mid-file and within its turn: kept");
    assert!(f.tail.release_for_turn(now + OPEN_TURN + Duration::from_secs(1)), "its turn is over");
    assert!(!f.tail.is_open());
    f.tail.next_poll = Instant::now();
    let rest = f.read_all();
    assert_eq!(rest, messages[4..], "nothing read twice, nothing skipped");
    assert!(f.tail.release_for_turn(Instant::now()), "at its end: released at once");
}

/// A node keeps a tail per container instance, most of them idle: what every tail holds
/// inline (in the tailer's map) stays small; an open file and unfinished records are boxed.
#[test]
fn an_idle_tail_is_small() {
    let size = std::mem::size_of::<ContainerTail>();
    println!("ContainerTail: {size} bytes inline");
    assert!(size <= 400, "{size} bytes inline per tail");
}
