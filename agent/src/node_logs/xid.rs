//! GPU errors in the kernel log: the NVIDIA driver's `NVRM: Xid` lines, and the container of
//! the process that raised one (through `/proc/<pid>/cgroup`, the parsing GPU attribution uses).
//!
//! Formats seen across driver versions:
//! - `NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, GPU has fallen off the bus.`
//! - `NVRM: Xid (PCI:0000:3b:00): 13, pid='<unknown>', name=<unknown>, Graphics Exception ...`
//! - `NVRM: Xid (PCI:0000:3b:00): 48, An uncorrectable double bit error ...` (older, no pid)
//!
//! Only the fields are taken from the text; the rest is never interpreted.

use std::path::Path;

use crate::identity::cgroup::{self, ContainerCgroup};

/// The fields of one XID line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xid {
    /// The GPU's PCI bus id as the driver writes it (`0000:3b:00`).
    pub pci_bus_id: String,
    /// The XID number.
    pub xid: u32,
    /// The process the driver names, when it names one.
    pub pid: Option<u32>,
}

/// Parses an `NVRM: Xid` kernel message; `None` for any other message.
pub fn parse(message: &str) -> Option<Xid> {
    let at = message.find("NVRM: Xid (")?;
    let rest = &message[at + "NVRM: Xid (".len()..];
    let (bus, rest) = rest.split_once("):")?;
    let pci_bus_id = bus.strip_prefix("PCI:").unwrap_or(bus).trim();
    if pci_bus_id.is_empty() || pci_bus_id.len() > 32 || !pci_bus_id.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
        return None;
    }
    let mut fields = rest.split(',').map(str::trim);
    let xid = fields.next()?.parse().ok()?;
    let pid = fields.next().and_then(|f| f.strip_prefix("pid=")).and_then(|p| p.trim_matches('\'').parse().ok());
    Some(Xid { pci_bus_id: pci_bus_id.to_string(), xid, pid })
}

/// The container of `pid` when it raised an error `error_usec` microseconds after boot:
/// `None` for a process that is gone, runs on the host, or started after the error (its pid
/// was reused, as for errors found in the ring at start).
pub fn container_of(proc_root: &Path, pid: u32, error_usec: u64, ticks_per_second: u64) -> Option<ContainerCgroup> {
    let dir = proc_root.join(pid.to_string());
    if let Some(started) = std::fs::read_to_string(dir.join("stat")).ok().as_deref().and_then(crate::gpu::processes::start_time) {
        if started.saturating_mul(1_000_000) / ticks_per_second.max(1) > error_usec {
            return None;
        }
    }
    cgroup::parse(&std::fs::read_to_string(dir.join("cgroup")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_format_variants_give_the_same_fields() {
        let with_pid = parse("NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, GPU has fallen off the bus.").unwrap();
        assert_eq!(with_pid, Xid { pci_bus_id: "0000:3b:00".into(), xid: 79, pid: Some(1234) });
        let unknown = parse("NVRM: Xid (PCI:0000:af:00): 13, pid='<unknown>', name=<unknown>, Graphics SM Warp Exception").unwrap();
        assert_eq!(unknown, Xid { pci_bus_id: "0000:af:00".into(), xid: 13, pid: None });
        let old = parse("NVRM: Xid (PCI:0000:06:00): 48, An uncorrectable double bit error (DBE) has been detected on GPU").unwrap();
        assert_eq!(old, Xid { pci_bus_id: "0000:06:00".into(), xid: 48, pid: None });
        let quoted = parse("NVRM: Xid (PCI:0000:06:00.0): 31, pid='4242', name=trainer, Ch 00000008, intr 00000000").unwrap();
        assert_eq!((quoted.pid, quoted.pci_bus_id.as_str()), (Some(4242), "0000:06:00.0"));
    }

    #[test]
    fn text_that_only_looks_like_an_xid_is_not_one() {
        assert_eq!(parse("NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.54.15"), None);
        assert_eq!(parse("NVRM: Xid (PCI:0000:3b:00): seventy-nine, pid=1"), None);
        assert_eq!(parse("NVRM: Xid (PCI:$(rm -rf)): 79, pid=1"), None, "a bus id is hex and colons only");
        let spoof = parse("NVRM: Xid (PCI:0000:3b:00): 79, name=x, pid=99, text").unwrap();
        assert_eq!(spoof.pid, None, "pid= is read only in its place");
    }
}
