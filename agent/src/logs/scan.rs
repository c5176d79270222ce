//! Walks the kubelet's pod log directory and describes every container instance's files,
//! fingerprinted and in rotation order. The walk is the safety net under inotify; it also
//! serves targeted rescans of one pod directory when inotify reports a change there.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use globset::GlobSet;

use super::fingerprint::{self, Fingerprint};
use super::path::{self, ContainerRef, Generation};

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
}

/// Every container instance found, with its files oldest first (one entry per fingerprint:
/// while the kubelet compresses a rotated file, the plain copy is listed and the `.gz` is not).
pub type Scan = BTreeMap<ContainerRef, Vec<ScannedFile>>;

/// Fingerprints already computed, by path and inode, so a scan reads only new files.
#[derive(Default)]
pub struct FingerprintCache {
    known: HashMap<(PathBuf, u64), (Fingerprint, u64)>,
}

impl FingerprintCache {
    fn get(&mut self, path: &Path, meta: &fs::Metadata, gzip: bool) -> io::Result<Option<(Fingerprint, u64)>> {
        let key = (path.to_path_buf(), meta.ino());
        if let Some(hit) = self.known.get(&key) {
            if gzip || meta.len() >= hit.1 {
                return Ok(Some(*hit));
            }
        }
        let Some(fp) = fingerprint::of_file(path, gzip)? else {
            return Ok(None);
        };
        let size = if gzip { fingerprint::gzip_uncompressed_size(path)? as u64 } else { meta.len() };
        self.known.insert(key, (fp, size));
        Ok(Some((fp, size)))
    }

    /// Forgets entries for files `scan` (a full scan) did not see.
    pub fn retain_seen(&mut self, scan: &Scan) {
        let seen: std::collections::HashSet<&Path> = scan.values().flatten().map(|f| f.path.as_path()).collect();
        self.known.retain(|(p, _), _| seen.contains(p.as_path()));
    }
}

/// Scans all of `pods_dir`, skipping excluded namespaces.
pub fn scan_all(pods_dir: &Path, exclude: &GlobSet, cache: &mut FingerprintCache) -> io::Result<Scan> {
    let mut scan = Scan::new();
    for entry in fs::read_dir(pods_dir)? {
        let entry = entry?;
        scan_pod_dir(&entry.path(), pods_dir, exclude, cache, &mut scan);
    }
    Ok(scan)
}

/// Scans one pod directory into `scan`. Files that vanish mid-scan are skipped: the next
/// scan sees the truth.
pub fn scan_pod_dir(pod_dir: &Path, pods_dir: &Path, exclude: &GlobSet, cache: &mut FingerprintCache, scan: &mut Scan) {
    let Some(name) = pod_dir.file_name().and_then(|n| n.to_str()) else { return };
    let Some((namespace, _, _)) = path::parse_pod_dir(name) else { return };
    if exclude.is_match(namespace) {
        return;
    }
    let Ok(containers) = fs::read_dir(pod_dir) else { return };
    for container in containers.flatten() {
        let Ok(files) = fs::read_dir(container.path()) else { continue };
        for file in files.flatten() {
            let file_path = file.path();
            let Some((reference, generation)) = path::parse(pods_dir, &file_path) else { continue };
            // Follow symlinks: with docker, `<n>.log` links to the runtime's own file.
            let Ok(meta) = fs::metadata(&file_path) else { continue };
            if !meta.is_file() {
                continue;
            }
            match cache.get(&file_path, &meta, generation.is_gzip()) {
                Ok(Some((fingerprint, size))) => {
                    scan.entry(reference).or_default().push(ScannedFile { path: file_path, generation, fingerprint, size });
                }
                Ok(None) => {
                    scan.entry(reference).or_default();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %file_path.display(), error = %e, "cannot fingerprint log file"),
            }
        }
    }
    for files in scan.values_mut() {
        files.sort_by_key(|f| f.generation);
        let mut seen = std::collections::HashSet::new();
        files.retain(|f| seen.insert(f.fingerprint.hash));
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
        let scan = scan_all(root.path(), &exclude.build().unwrap(), &mut FingerprintCache::default()).unwrap();
        assert_eq!(scan.len(), 2, "restarts 0 and 1 of one container; kube-system excluded");
        let chain: Vec<String> =
            scan.values().next().unwrap().iter().map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(chain, ["0.log.20261122-010000.gz", "0.log.20261122-020000", "0.log"]);
        let gz = &scan.values().next().unwrap()[0];
        assert_eq!(gz.size, 32, "gzip size is the uncompressed size");
    }

    #[test]
    fn a_file_without_a_first_line_still_registers_its_container() {
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join("ns_p_u/c/0.log"), "", false);
        let scan = scan_all(root.path(), &GlobSet::empty(), &mut FingerprintCache::default()).unwrap();
        assert_eq!(scan.values().next().unwrap().len(), 0);
    }
}
