//! GPUs by PCI address: the NVML thread fills it, the kernel log reads it to name the GPU of
//! an XID. The kernel writes a bus id as `0000:3b:00` or `0000:3b:00.0`, NVML as
//! `00000000:3B:00.0`; both are reduced to (domain, bus, device).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A PCI address without its function: (domain, bus, device).
pub type PciAddress = (u32, u8, u8);

/// Parses `[domain:]bus:device[.function]` in hex, in any case and width.
pub fn parse_bus_id(text: &str) -> Option<PciAddress> {
    let text = text.trim().trim_end_matches('\0');
    let without_function = text.split_once('.').map_or(text, |(head, _)| head);
    let parts: Vec<&str> = without_function.split(':').collect();
    let (domain, bus, device) = match parts.as_slice() {
        [domain, bus, device] => (*domain, *bus, *device),
        [bus, device] => ("0", *bus, *device),
        _ => return None,
    };
    Some((u32::from_str_radix(domain, 16).ok()?, u8::from_str_radix(bus, 16).ok()?, u8::from_str_radix(device, 16).ok()?))
}

/// A GPU as metrics label it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuRef {
    /// NVML index.
    pub index: u32,
    /// `GPU-<uuid>`.
    pub uuid: String,
}

/// The node's GPUs by PCI address, shared between the NVML thread and the kernel log.
#[derive(Debug, Clone, Default)]
pub struct GpuBusIds(Arc<RwLock<HashMap<PciAddress, GpuRef>>>);

impl GpuBusIds {
    /// Records the GPU at `bus_id` (ignored when it does not parse).
    pub fn insert(&self, bus_id: &str, gpu: GpuRef) {
        if let Some(address) = parse_bus_id(bus_id) {
            self.0.write().unwrap_or_else(|e| e.into_inner()).insert(address, gpu);
        }
    }

    /// The GPU at `bus_id`, when NVML named one there.
    pub fn get(&self, bus_id: &str) -> Option<GpuRef> {
        let address = parse_bus_id(bus_id)?;
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(&address).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_and_nvml_spellings_of_one_bus_id_meet() {
        let ids = GpuBusIds::default();
        ids.insert("00000000:3B:00.0", GpuRef { index: 2, uuid: "GPU-a".into() });
        let gpu = Some(GpuRef { index: 2, uuid: "GPU-a".into() });
        assert_eq!(ids.get("0000:3b:00"), gpu);
        assert_eq!(ids.get("0000:3b:00.0"), gpu);
        assert_eq!(ids.get("3b:00.0"), gpu);
        assert_eq!(ids.get("0000:3c:00"), None, "another bus");
        assert_eq!(ids.get("0001:3b:00"), None, "another domain");
        assert_eq!(ids.get("zz"), None);
    }
}
