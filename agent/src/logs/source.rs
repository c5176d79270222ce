//! Identity of what is being read: the container instance (from the path) and the file
//! (by fingerprint), and the id that a record's checkpoint and document id derive from.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use super::fingerprint::Format;
use crate::identity::path::ContainerRef;

/// A container instance whose logs are tailed, as known without the Kubernetes API.
#[derive(Debug)]
pub struct ContainerInfo {
    /// Namespace, pod, uid, container and restart count from the path.
    pub reference: ContainerRef,
    /// The runtime's container id, when a symlink names it.
    pub container_id: Option<String>,
    /// The runtime, when the log format or a symlink tells it (`docker`).
    pub runtime: Option<&'static str>,
}

/// A file's identity across renames and compression: its container instance and fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    /// Hash of `<namespace>_<pod>_<uid>/<container>/<restart>`.
    pub container: u64,
    /// Hash of the file's first line.
    pub fingerprint: u64,
}

impl FileId {
    /// The id of the file with `fingerprint` in `container`'s chain.
    pub fn new(container: &ContainerRef, fingerprint: u64) -> FileId {
        let key = format!("{}_{}_{}/{}/{}", container.namespace, container.pod, container.pod_uid, container.container, container.restart);
        FileId { container: xxhash_rust::xxh3::xxh3_64(key.as_bytes()), fingerprint }
    }

    /// A record's document id: the same record always gets the same id, so a resend after a
    /// crash or a lost reply is recognised as a duplicate.
    pub fn record_id(&self, offset: u64) -> u128 {
        let mut key = [0u8; 24];
        key[..8].copy_from_slice(&self.container.to_le_bytes());
        key[8..16].copy_from_slice(&self.fingerprint.to_le_bytes());
        key[16..].copy_from_slice(&offset.to_le_bytes());
        xxhash_rust::xxh3::xxh3_128(&key)
    }
}

/// Appends the 32 lower-case hex digits of `id`, eight at a time: each group is worked out in
/// a register and stored at once (digits written a pair at a time and read back together
/// stall the CPU until the pairs are stored).
pub fn push_hex_id(id: u128, out: &mut Vec<u8>) {
    out.reserve(32);
    for shift in [96, 64, 32, 0] {
        out.extend_from_slice(&hex8((id >> shift) as u32));
    }
}

/// The eight lower-case hex digits of `v`, most significant first.
fn hex8(v: u32) -> [u8; 8] {
    // Nibble k of `v` into byte k, alone.
    let mut x = u64::from(v);
    x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    // Each to `0`..`9` or `a`..`f`: a nibble over 9 is one that 6 more carries into bit 4.
    let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    let digits = x + 0x3030_3030_3030_3030 + letters * (b'a' - b'0' - 10) as u64;
    // Nibble 7, the most significant, first.
    digits.to_be_bytes()
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:016x}-{:016x}", self.container, self.fingerprint)
    }
}

impl std::str::FromStr for FileId {
    type Err = ();
    fn from_str(s: &str) -> Result<FileId, ()> {
        let (c, f) = s.split_once('-').ok_or(())?;
        Ok(FileId { container: u64::from_str_radix(c, 16).map_err(|_| ())?, fingerprint: u64::from_str_radix(f, 16).map_err(|_| ())? })
    }
}

/// One file being read.
#[derive(Debug)]
pub struct Source {
    /// Its container instance.
    pub container: Arc<ContainerInfo>,
    /// Its identity.
    pub id: FileId,
    /// Its path when it was opened (`log.file.path`).
    pub path: PathBuf,
    /// CRI or docker JSON.
    pub format: Format,
}

impl Source {
    /// A placeholder source for unit tests of downstream stages.
    #[cfg(test)]
    pub fn for_tests() -> Source {
        let reference =
            ContainerRef { namespace: "ns".into(), pod: "pod".into(), pod_uid: "uid".into(), container: "c".into(), restart: 0 };
        Source {
            id: FileId::new(&reference, 1),
            container: Arc::new(ContainerInfo { reference, container_id: None, runtime: None }),
            path: PathBuf::from("/var/log/pods/ns_pod_uid/c/0.log"),
            format: Format::Cri,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_are_written_as_32_lower_case_hex_digits() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            u128::from(state) << 64 | u128::from(state.rotate_left(29))
        };
        let ids = [0, 1, 0xf, 0xa, 9, 10, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210, u128::from(u64::MAX) << 64];
        for id in ids.into_iter().chain(std::iter::repeat_with(&mut random).take(1000)) {
            let mut out = b"x".to_vec();
            push_hex_id(id, &mut out);
            assert_eq!(std::str::from_utf8(&out[1..]).unwrap(), format!("{id:032x}"));
        }
    }
}
