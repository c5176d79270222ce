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

/// The 32 lower-case hex digits of `id`.
pub fn hex_id(id: u128) -> [u8; 32] {
    let mut text = [0u8; 32];
    for (pair, byte) in text.chunks_exact_mut(2).zip(id.to_be_bytes()) {
        pair.copy_from_slice(&HEX_PAIRS[byte as usize]);
    }
    text
}

/// The two hex digits of each byte.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    pairs
};

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
