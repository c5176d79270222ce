//! Container logs: from the kubelet's files to chunks of records.
//!
//! `scan` and `wake` find files, `container` reads one container's rotation chain in order
//! (`reader` bounds lines, `decode` parses CRI and docker lines, `assemble` joins partial
//! records), `tailer` drives it all on its own thread, and `checkpoint` with `ack` remember
//! how far each file is acknowledged.

pub mod ack;
pub mod assemble;
pub mod budget;
pub mod checkpoint;
pub mod chunk;
pub mod container;
pub mod decode;
pub mod derived;
pub mod enrich;
pub mod fingerprint;
pub mod json;
pub mod level;
pub mod limit;
pub mod reader;
pub mod scan;
pub mod source;
pub mod structured;
pub mod tailer;
pub mod timestamp;
pub mod wake;
