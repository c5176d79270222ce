//! Walks the kubelet's pod log directory and describes every container instance's files,
//! fingerprinted and in rotation order. The walk is the safety net under inotify; it also
//! serves targeted rescans of one pod directory when inotify reports a change there.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use globset::GlobSet;

use super::fingerprint::{self, Fingerprint};
use crate::identity::path::{self, ContainerRef, Generation};

/// A log file as the latest scan saw it.
#[derive(Debug, Clone)]
pub struct ScannedFile {
    /// Where it is now.
    pub path: PathBuf,
    /// Live or rotated (and compressed).
    pub generation: Generation,
    /// Content identity and format.
    pub fingerprint: Fingerprint,
    /// Size on disk; for gzip files the uncompressed size from the trailer.
    pub size: u64,
    /// Device and inode: a closed file is reopened only where this still holds.
    pub inode: (u64, u64),
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every container instance found, with its files oldest first (one entry per
    /// fingerprint: while the kubelet compresses a rotated file, the plain copy is listed
    /// and the `.gz` is not).
    pub chains: BTreeMap<ContainerRef, Vec<ScannedFile>>,
    /// Log files without a whole first line yet (a container that has not logged, or a
    /// fresh file after a rotation), by pod directory, with their length: looked at again
    /// when they grow.
    pub pending: BTreeMap<PathBuf, Vec<(PathBuf, u64)>>,
    /// Pod directories where something could not be looked at (other than vanishing): what
    /// the scan does not list there may still exist, so nothing is concluded from its absence.
    pub unreadable: BTreeSet<PathBuf>,
    /// Entries that cannot be a pod's, a container's or a log file (a pod directory name
    /// without a uid, a name that is not UTF-8, a log symlink that loops), with why: skipped
    /// for good, not retried like an unreadable one.
    pub skipped: Vec<(PathBuf, &'static str)>,
}

/// Which pods a scan skips.
pub struct Exclusions<'a> {
    /// Namespace globs (`logs.exclude_namespaces`).
    pub namespaces: &'a GlobSet,
    /// The agent's own pod: never read, so a stdout sink cannot feed on itself.
    pub own_pod_uid: Option<&'a str>,
}

impl Exclusions<'_> {
    fn skips(&self, namespace: &str, uid: &str) -> bool {
        self.namespaces.is_match(namespace) || self.own_pod_uid == Some(uid)
    }
}

/// Who a file at a path is, as far as its metadata tells: an inode reused for a new file at
/// the same path has another birth time (where the filesystem records one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    path: PathBuf,
    inode: (u64, u64),
    born: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy)]
struct Cached {
    /// `None`: no whole first line when last looked at.
    fingerprint: Option<Fingerprint>,
    /// The file's length when last looked at: a shorter file was truncated or replaced.
    len: u64,
    /// For gzip files, the uncompressed size (the file no longer changes).
    gzip_size: Option<u64>,
}

/// Fingerprints already computed, so a scan reads only new files. An entry is used only for
/// the same path, inode and birth time, and only while the file has not shrunk.
#[derive(Default)]
pub struct FingerprintCache {
    known: HashMap<CacheKey, Cached>,
    /// Keys looked up since the last sweep.
    seen: HashSet<CacheKey>,
    /// Files whose fingerprinting failed, warned about once.
    warned: HashSet<PathBuf>,
}

impl FingerprintCache {
    fn get(&mut self, path: &Path, meta: &fs::Metadata, gzip: bool) -> io::Result<Option<(Fingerprint, u64)>> {
        let key = CacheKey { path: path.to_path_buf(), inode: (meta.dev(), meta.ino()), born: meta.created().ok() };
        self.seen.insert(key.clone());
        let len = meta.len();
        if let Some(hit) = self.known.get_mut(&key) {
            match (hit.fingerprint, hit.gzip_size) {
                (Some(fp), Some(size)) if len == hit.len => return Ok(Some((fp, size))),
                (Some(fp), None) if len >= hit.len => {
                    // The length last seen, so a truncation between two scans shows as a shrink.
                    hit.len = len;
                    return Ok(Some((fp, len)));
                }
                // Nothing new was written: still no whole first line.
                (None, _) if len == hit.len => return Ok(None),
                _ => {}
            }
        }
        let fingerprint = fingerprint::of_file(path, gzip)?;
        let gzip_size = if gzip && fingerprint.is_some() { Some(fingerprint::gzip_uncompressed_size(path)? as u64) } else { None };
        self.known.insert(key, Cached { fingerprint, len, gzip_size });
        Ok(fingerprint.map(|fp| (fp, gzip_size.unwrap_or(len))))
    }

    /// True the first time `path` fails to be fingerprinted.
    fn warn_once(&mut self, path: &Path) -> bool {
        if self.warned.len() > 10_000 {
            self.warned.clear();
        }
        self.warned.insert(path.to_path_buf())
    }

    /// Forgets what is known about the file at `path` (found truncated in place: its content,
    /// not its inode, changed).
    pub fn forget(&mut self, path: &Path) {
        self.known.retain(|key, _| key.path != path);
    }

    /// Forgets entries under `dir` (a directory just scanned whole) that the scan did not
    /// look up: their file is gone, or its path now holds another inode.
    fn sweep(&mut self, dir: &Path) {
        self.known.retain(|key, _| !key.path.starts_with(dir) || self.seen.contains(key));
        self.seen.retain(|key| !key.path.starts_with(dir));
    }
}

/// Scans all of `pods_dir`, skipping excluded pods.
pub fn scan_all(pods_dir: &Path, exclude: &Exclusions, cache: &mut FingerprintCache) -> io::Result<Scan> {
    let mut scan = Scan::default();
    for entry in fs::read_dir(pods_dir)? {
        let entry = entry?;
        scan_into(&entry.path(), pods_dir, exclude, cache, &mut scan);
    }
    cache.sweep(pods_dir);
    Ok(scan)
}

/// Scans one pod directory into `scan`. Files that vanish mid-scan are skipped: the next
/// scan sees the truth.
pub fn scan_pod_dir(pod_dir: &Path, pods_dir: &Path, exclude: &Exclusions, cache: &mut FingerprintCache, scan: &mut Scan) {
    scan_into(pod_dir, pods_dir, exclude, cache, scan);
    cache.sweep(pod_dir);
}

fn scan_into(pod_dir: &Path, pods_dir: &Path, exclude: &Exclusions, cache: &mut FingerprintCache, scan: &mut Scan) {
    let Some(name) = pod_dir.file_name().and_then(|n| n.to_str()) else {
        scan.skipped.push((pod_dir.to_path_buf(), "pod directory name is not UTF-8"));
        return;
    };
    let Some((namespace, _, uid)) = path::parse_pod_dir(name) else {
        scan.skipped.push((pod_dir.to_path_buf(), "not a pod directory (<namespace>_<pod>_<uid>)"));
        return;
    };
    if exclude.skips(namespace, uid) {
        return;
    }
    let unreadable = |scan: &mut Scan, e: &io::Error| {
        if !matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) {
            scan.unreadable.insert(pod_dir.to_path_buf());
        }
    };
    let containers = match fs::read_dir(pod_dir) {
        Ok(c) => c,
        Err(e) => {
            unreadable(scan, &e);
            return;
        }
    };
    let mut found: BTreeMap<ContainerRef, Vec<ScannedFile>> = BTreeMap::new();
    for container in containers.flatten() {
        if container.file_name().to_str().is_none() {
            scan.skipped.push((container.path(), "container directory name is not UTF-8"));
            continue;
        }
        let files = match fs::read_dir(container.path()) {
            Ok(f) => f,
            Err(e) => {
                unreadable(scan, &e);
                continue;
            }
        };
        for file in files.flatten() {
            let file_path = file.path();
            let Some((reference, generation)) = path::parse(pods_dir, &file_path) else { continue };
            // Follow symlinks: with docker, `<n>.log` links to the runtime's own file.
            let meta = match fs::metadata(&file_path) {
                Ok(meta) if meta.is_file() => meta,
                Ok(_) => continue,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ELOOP) {
                        // Reported, and otherwise treated as unreadable: the link may yet be
                        // pointed somewhere, and nothing is concluded from what it hides.
                        scan.skipped.push((file_path.clone(), "log file is a symlink loop"));
                    }
                    if e.kind() != io::ErrorKind::NotFound {
                        found.entry(reference).or_default();
                    }
                    unreadable(scan, &e);
                    continue;
                }
            };
            match cache.get(&file_path, &meta, generation.is_gzip()) {
                Ok(Some((fingerprint, size))) => {
                    let inode = (meta.dev(), meta.ino());
                    found.entry(reference).or_default().push(ScannedFile { path: file_path, generation, fingerprint, size, inode });
                }
                Ok(None) => {
                    found.entry(reference).or_default();
                    scan.pending.entry(pod_dir.to_path_buf()).or_default().push((file_path, meta.len()));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Its container stays listed: a file that cannot be read now is not gone.
                    found.entry(reference).or_default();
                    if cache.warn_once(&file_path) {
                        tracing::warn!(path = %file_path.display(), error = %e, "cannot fingerprint log file; will retry");
                    }
                    unreadable(scan, &e);
                }
            }
        }
    }
    for (reference, mut files) in found {
        files.sort_by_key(|f| f.generation);
        let mut seen = HashSet::new();
        files.retain(|f| seen.insert(f.fingerprint.hash));
        scan.chains.insert(reference, files);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn write(path: &Path, text: &str, gzip: bool) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = fs::File::create(path).unwrap();
        if gzip {
            let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            enc.write_all(text.as_bytes()).unwrap();
            enc.finish().unwrap();
        } else {
            let mut f = f;
            f.write_all(text.as_bytes()).unwrap();
        }
    }

    #[test]
    fn entries_that_cannot_be_a_pods_are_listed_as_skipped_and_the_rest_is_read() {
        use std::os::unix::ffi::OsStrExt;
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join("ml_good_uid1/main/0.log"), "2026-11-22T03:00:00Z stdout F ok\n", false);
        write(&root.path().join("ml_no-uid/main/0.log"), "2026-11-22T03:00:00Z stdout F x\n", false);
        let odd = root.path().join(std::ffi::OsStr::from_bytes(b"ml_bad\xff_uid2"));
        write(&odd.join("main/0.log"), "2026-11-22T03:00:00Z stdout F x\n", false);
        let looping = root.path().join("ml_loop_uid3/main");
        fs::create_dir_all(&looping).unwrap();
        std::os::unix::fs::symlink(looping.join("0.log"), looping.join("0.log")).unwrap();
        let odd_container = root.path().join("ml_good_uid1").join(std::ffi::OsStr::from_bytes(b"c\xfe"));
        write(&odd_container.join("0.log"), "2026-11-22T03:00:00Z stdout F x\n", false);
        let none = globset::GlobSet::empty();
        let scan = scan_all(root.path(), &Exclusions { namespaces: &none, own_pod_uid: None }, &mut FingerprintCache::default()).unwrap();
        let mut skipped: Vec<_> = scan.skipped.iter().map(|(p, _)| p.strip_prefix(root.path()).unwrap().to_path_buf()).collect();
        skipped.sort();
        let mut expected = vec![
            PathBuf::from(std::ffi::OsStr::from_bytes(b"ml_bad\xff_uid2")),
            PathBuf::from("ml_good_uid1").join(std::ffi::OsStr::from_bytes(b"c\xfe")),
            PathBuf::from("ml_loop_uid3/main/0.log"),
            PathBuf::from("ml_no-uid"),
        ];
        expected.sort();
        assert_eq!(skipped, expected);
        assert_eq!(scan.chains.keys().map(|r| r.pod.as_str()).collect::<Vec<_>>(), ["good", "loop"]);
        assert_eq!(scan.chains.values().next().unwrap().len(), 1, "the good file is read");
    }

    #[test]
    fn scan_orders_chains_and_lists_a_compressing_twin_once() {
        let root = tempfile::tempdir().unwrap();
        let c = root.path().join("ml_train-0_uid1/worker");
        write(&c.join("0.log.20261122-010000.gz"), "2026-11-22T01:00:00Z stdout F a\n", true);
        write(&c.join("0.log.20261122-020000"), "2026-11-22T02:00:00Z stdout F b\n", false);
        write(&c.join("0.log.20261122-020000.gz"), "2026-11-22T02:00:00Z stdout F b\n", true);
        write(&c.join("0.log.20261122-030000.gz.tmp"), "garbage", false);
        write(&c.join("0.log"), "2026-11-22T03:00:00Z stdout F c\n", false);
        write(&c.join("1.log"), "2026-11-22T04:00:00Z stdout F d\n", false);
        write(&root.path().join("kube-system_dns_uid2/dns/0.log"), "2026-11-22T03:00:00Z stdout F x\n", false);
        let mut exclude = globset::GlobSetBuilder::new();
        exclude.add(globset::Glob::new("kube-*").unwrap());
        let exclude = exclude.build().unwrap();
        let scan =
            scan_all(root.path(), &Exclusions { namespaces: &exclude, own_pod_uid: None }, &mut FingerprintCache::default()).unwrap();
        assert_eq!(scan.chains.len(), 2, "restarts 0 and 1 of one container; kube-system excluded");
        let chain: Vec<String> =
            scan.chains.values().next().unwrap().iter().map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(chain, ["0.log.20261122-010000.gz", "0.log.20261122-020000", "0.log"]);
        let gz = &scan.chains.values().next().unwrap()[0];
        assert_eq!(gz.size, 32, "gzip size is the uncompressed size");
    }

    fn no_exclusions() -> Exclusions<'static> {
        static EMPTY: std::sync::OnceLock<GlobSet> = std::sync::OnceLock::new();
        Exclusions { namespaces: EMPTY.get_or_init(GlobSet::empty), own_pod_uid: None }
    }

    #[test]
    fn a_file_without_a_first_line_registers_its_container_as_pending() {
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join("ns_p_u/c/0.log"), "", false);
        let mut cache = FingerprintCache::default();
        let scan = scan_all(root.path(), &no_exclusions(), &mut cache).unwrap();
        assert_eq!(scan.chains.values().next().unwrap().len(), 0);
        assert_eq!(scan.pending.keys().collect::<Vec<_>>(), [&root.path().join("ns_p_u")]);
        write(&root.path().join("ns_p_u/c/0.log"), "2026-11-22T03:00:00Z stdout F x\n", false);
        let scan = scan_all(root.path(), &no_exclusions(), &mut cache).unwrap();
        assert_eq!(scan.chains.values().next().unwrap().len(), 1, "written since: fingerprinted now");
        assert!(scan.pending.is_empty());
    }

    #[test]
    fn the_agents_own_pod_is_not_scanned() {
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join("obs_nodelens-x7k2p_self-uid/nodelens/0.log"), "2026-11-22T03:00:00Z stdout F {}\n", false);
        write(&root.path().join("ml_train_other-uid/c/0.log"), "2026-11-22T03:00:00Z stdout F x\n", false);
        let empty = GlobSet::empty();
        let scan =
            scan_all(root.path(), &Exclusions { namespaces: &empty, own_pod_uid: Some("self-uid") }, &mut FingerprintCache::default())
                .unwrap();
        let pods: Vec<&str> = scan.chains.keys().map(|r| r.pod.as_str()).collect();
        assert_eq!(pods, ["train"]);
    }

    #[test]
    fn sizes_follow_the_file_and_a_shrunk_or_replaced_file_is_fingerprinted_again() {
        let root = tempfile::tempdir().unwrap();
        let live = root.path().join("ns_p_u/c/0.log");
        let mut cache = FingerprintCache::default();
        let first = |scan: &Scan| scan.chains.values().next().unwrap()[0].clone();
        write(&live, "2026-11-22T03:00:00Z stdout F a\n", false);
        let a = first(&scan_all(root.path(), &no_exclusions(), &mut cache).unwrap());
        fs::OpenOptions::new().append(true).open(&live).unwrap().write_all(b"2026-11-22T03:00:01Z stdout F more\n").unwrap();
        let grown = first(&scan_all(root.path(), &no_exclusions(), &mut cache).unwrap());
        assert_eq!(
            (grown.fingerprint, grown.size),
            (a.fingerprint, fs::metadata(&live).unwrap().len()),
            "size is today's, not the cached one"
        );
        // Truncated in place and written again (copytruncate): same inode, new content.
        fs::write(&live, "2026-11-22T04:00:00Z stdout F b\n").unwrap();
        let b = first(&scan_all(root.path(), &no_exclusions(), &mut cache).unwrap());
        assert_ne!(b.fingerprint, a.fingerprint);
        // Rotated away, and a new file at the same path (possibly a reused inode).
        fs::rename(&live, root.path().join("ns_p_u/c/0.log.20261122-040000")).unwrap();
        write(&live, "2026-11-22T05:00:00Z stdout F c\n", false);
        let scan = scan_all(root.path(), &no_exclusions(), &mut cache).unwrap();
        let chain = scan.chains.values().next().unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].fingerprint, b.fingerprint);
        assert_ne!(chain[1].fingerprint, b.fingerprint);
    }

    #[test]
    fn a_file_that_cannot_be_looked_at_keeps_its_container_listed_and_marks_the_pod_unreadable() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ns_p_u/c");
        fs::create_dir_all(&dir).unwrap();
        // A symlink loop fails with ELOOP even for root, like EACCES or EIO would for others.
        std::os::unix::fs::symlink(dir.join("1.log"), dir.join("1.log")).unwrap();
        let scan = scan_all(root.path(), &no_exclusions(), &mut FingerprintCache::default()).unwrap();
        assert_eq!(scan.chains.keys().map(|r| r.restart).collect::<Vec<_>>(), [1], "listed, not taken for gone");
        assert!(scan.unreadable.contains(&root.path().join("ns_p_u")));
    }
}
