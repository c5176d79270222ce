//! A file's identity by content: a hash of its first line. Renaming (`0.log` →
//! `0.log.<ts>`) and compressing (`.gz`) keep it, so a checkpoint follows the bytes, not the name
//! or the inode.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

/// The fingerprint covers the first line, or this many bytes when the first line is longer.
pub const MAX_FINGERPRINT_BYTES: usize = 4096;

/// The log format of a file, known from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// CRI: `<RFC3339Nano> <stream> <P|F> <text>`.
    Cri,
    /// Docker json-file: `{"log":...,"stream":...,"time":...}`.
    Docker,
}

/// Identity and format of a file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    /// Hash of the first line (newline included) or of the first 4 KiB.
    pub hash: u64,
    /// The file's log format.
    pub format: Format,
}

/// Fingerprints the file at `path`; `None` while it does not hold a whole first line yet.
pub fn of_file(path: &Path, gzip: bool) -> io::Result<Option<Fingerprint>> {
    let file = File::open(path)?;
    if gzip {
        of_reader(MultiGzDecoder::new(file))
    } else {
        of_reader(file)
    }
}

fn of_reader(mut reader: impl Read) -> io::Result<Option<Fingerprint>> {
    let mut buf = [0u8; MAX_FINGERPRINT_BYTES];
    let mut len = 0;
    while len < buf.len() {
        let n = match reader.read(&mut buf[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        if let Some(nl) = memchr::memchr(b'\n', &buf[len..len + n]) {
            len += nl + 1;
            return Ok(Some(fingerprint(&buf[..len])));
        }
        len += n;
    }
    Ok((len == buf.len()).then(|| fingerprint(&buf[..len])))
}

fn fingerprint(head: &[u8]) -> Fingerprint {
    let format = if head.first() == Some(&b'{') { Format::Docker } else { Format::Cri };
    Fingerprint { hash: xxhash_rust::xxh3::xxh3_64(head), format }
}

/// The uncompressed size stored in a gzip file's trailer (modulo 2^32, as the format keeps it).
pub fn gzip_uncompressed_size(path: &Path) -> io::Result<u32> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(path)?;
    if file.metadata()?.len() < 18 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "too short for gzip"));
    }
    file.seek(SeekFrom::End(-4))?;
    let mut isize = [0u8; 4];
    file.read_exact(&mut isize)?;
    Ok(u32::from_le_bytes(isize))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn write(path: &Path, bytes: &[u8], gzip: bool) {
        let mut f = File::create(path).unwrap();
        if gzip {
            let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            enc.write_all(bytes).unwrap();
            enc.finish().unwrap();
        } else {
            f.write_all(bytes).unwrap();
        }
    }

    #[test]
    fn renamed_and_compressed_copies_share_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"2026-11-22T03:16:40.000000001Z stdout F first\n2026-11-22T03:16:40.2Z stdout F second\n";
        write(&dir.path().join("0.log"), content, false);
        write(&dir.path().join("0.log.20261122-031640.gz"), content, true);
        let plain = of_file(&dir.path().join("0.log"), false).unwrap().unwrap();
        let gz = of_file(&dir.path().join("0.log.20261122-031640.gz"), true).unwrap().unwrap();
        assert_eq!(plain, gz);
        assert_eq!(plain.format, Format::Cri);
        assert_eq!(gzip_uncompressed_size(&dir.path().join("0.log.20261122-031640.gz")).unwrap() as usize, content.len());
    }

    #[test]
    fn different_first_lines_differ_and_appends_do_not_change_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        write(&p, b"{\"log\":\"a\\n\"}\n", false);
        let before = of_file(&p, false).unwrap().unwrap();
        assert_eq!(before.format, Format::Docker);
        write(&p, b"{\"log\":\"a\\n\"}\n{\"log\":\"b\\n\"}\n", false);
        assert_eq!(of_file(&p, false).unwrap().unwrap(), before);
        write(&p, b"{\"log\":\"c\\n\"}\n", false);
        assert_ne!(of_file(&p, false).unwrap().unwrap(), before);
    }

    #[test]
    fn a_file_without_a_whole_first_line_has_no_fingerprint_yet() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        write(&p, b"2026-11-22T03:16:40Z stdout F no newline yet", false);
        assert_eq!(of_file(&p, false).unwrap(), None);
        write(&p, &[b'z'; 5000], false);
        assert!(of_file(&p, false).unwrap().is_some(), "a long first line is fingerprinted by its head");
    }
}
