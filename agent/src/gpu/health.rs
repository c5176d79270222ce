//! The second tier of GPU health, read on the NVML thread once per poll and GPU: HBM
//! temperature, memory clock, video engines, PCIe replays, NVLink errors and links, clock
//! violation time, retired pages and NVSwitch fabric health (what dcgm-exporter exports by
//! default), through NVML alone.
//!
//! `nvml-wrapper` makes the calls it wraps; the rest (retired page counts, fabric info) are the
//! raw functions. An answer of `NOT_SUPPORTED` turns that one reading off for that GPU (one
//! info line, see [`Calls`]), so a GPU without it costs nothing per poll.

use nvml_wrapper::enum_wrappers::device::{Clock, PerformancePolicy, TemperatureThreshold};
use nvml_wrapper::enum_wrappers::nv_link::ErrorCounter;
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::{nvml_sym, nvml_try, NvmlError};
use nvml_wrapper::struct_wrappers::device::FieldValueSample;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_NVLINK_LINK_COUNT, NVML_FI_DEV_PCIE_REPLAY_COUNTER};
use nvml_wrapper::Device;
use nvml_wrapper_sys::bindings::nvmlGpuFabricInfoV_t;

use super::nvml::{Calls, Lost};
use super::reading::{GpuGauge, GpuReading};

/// The most NVLink links a GPU has (`NVML_NVLINK_MAX_LINKS` of current drivers).
const MAX_LINKS: u32 = 18;

/// NVLink error counters in the order of `NVLINK_ERROR_TYPES`, with the names their calls are
/// counted under.
const NVLINK_COUNTERS: [(ErrorCounter, &str); 4] = [
    (ErrorCounter::DlCrcFlit, "nvlink_error_crc_flit"),
    (ErrorCounter::DlCrcData, "nvlink_error_crc_data"),
    (ErrorCounter::DlReplay, "nvlink_error_replay"),
    (ErrorCounter::DlRecovery, "nvlink_error_recovery"),
];

/// Performance policies in the order of `VIOLATION_REASONS`.
const VIOLATIONS: [(PerformancePolicy, &str); 6] = [
    (PerformancePolicy::Power, "violation_status_power"),
    (PerformancePolicy::Thermal, "violation_status_thermal"),
    (PerformancePolicy::SyncBoost, "violation_status_sync_boost"),
    (PerformancePolicy::BoardLimit, "violation_status_board_limit"),
    (PerformancePolicy::LowUtilization, "violation_status_low_utilization"),
    (PerformancePolicy::Reliability, "violation_status_reliability"),
];

/// `nvmlPageRetirementCause_t` values in the order of `RETIREMENT_CAUSES`.
const RETIREMENTS: [(u32, &str); 2] = [(0, "retired_pages_single_bit"), (1, "retired_pages_double_bit")];

/// Fields read together in one `nvmlDeviceGetFieldValues` call, each answering on its own.
const FIELDS: [(u32, &str); 2] =
    [(NVML_FI_DEV_MEMORY_TEMP, "field_memory_temp"), (NVML_FI_DEV_PCIE_REPLAY_COUNTER, "field_pcie_replay_counter")];

/// `nvmlReturn_t` values the raw calls tell apart.
const NVML_ERROR_INSUFFICIENT_SIZE: u32 = 7;
const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: u32 = 25;
/// `nvmlGpuFabricState_t`.
const FABRIC_STATE_NOT_SUPPORTED: u8 = 0;
const FABRIC_STATE_COMPLETED: u8 = 3;
/// `nvmlGpuFabricInfo_v3_t.healthMask`: two-bit fields whose value 1 means "true".
const FABRIC_HEALTH_TRUE: u32 = 1;
const FABRIC_HEALTH_SHIFT_DEGRADED_BW: u32 = 0;
const FABRIC_HEALTH_SHIFT_ROUTE_UNHEALTHY: u32 = 4;
const FABRIC_HEALTH_WIDTH: u32 = 3;
/// `NVML_GPU_FABRIC_HEALTH_SUMMARY_UNHEALTHY`.
const FABRIC_SUMMARY_UNHEALTHY: u8 = 2;

/// What spans polls for one GPU's NVLink links.
#[derive(Debug, Default)]
pub struct Links {
    /// The GPU's links, once counted.
    count: Option<u32>,
    /// The last value read of each link's counters (a link that went down keeps its errors in
    /// the sum, so the counter never drops).
    errors: Vec<[Option<u64>; 4]>,
}

/// Reads the second tier of a physical GPU into `r`.
pub fn read(calls: &mut Calls, d: &Device, index: u32, links: &mut Links, r: &mut GpuReading) -> Result<(), Lost> {
    read_fields(calls, d, index, r)?;
    if r.get(GpuGauge::MemoryTemperature).is_some() {
        let limit = calls.call("memory_temperature_limit", index, || d.temperature_threshold(TemperatureThreshold::MemoryMax))?;
        r.set(GpuGauge::MemoryTemperatureLimit, limit.map(f64::from));
    }
    r.set(GpuGauge::MemoryClock, calls.call("memory_clock", index, || d.clock_info(Clock::Memory))?.map(|mhz| f64::from(mhz) * 1e6));
    let encoder = calls.call("encoder_utilization", index, || d.encoder_utilization())?;
    r.set(GpuGauge::EncoderUtilization, encoder.map(|u| f64::from(u.utilization) / 100.0));
    let decoder = calls.call("decoder_utilization", index, || d.decoder_utilization())?;
    r.set(GpuGauge::DecoderUtilization, decoder.map(|u| f64::from(u.utilization) / 100.0));
    for (k, (policy, name)) in VIOLATIONS.into_iter().enumerate() {
        let time = calls.call(name, index, || d.violation_status(policy))?;
        r.health.violation_seconds[k] = time.map(|t| t.violation_time as f64 / 1e9);
    }
    for (k, (cause, name)) in RETIREMENTS.into_iter().enumerate() {
        r.health.retired_pages[k] = calls.call(name, index, || retired_pages(d, cause))?;
    }
    let pending = calls.call("retired_pages_pending", index, || d.are_pages_pending_retired())?;
    r.set(GpuGauge::RetiredPagesPending, pending.map(|p| f64::from(u8::from(p))));
    let fabric = calls.call("fabric_info", index, || fabric_healthy(d))?.flatten();
    r.set(GpuGauge::FabricHealthy, fabric.map(|h| f64::from(u8::from(h))));
    read_links(calls, d, index, links, r)
}

/// HBM temperature and PCIe replays: one call, each field answering on its own.
fn read_fields(calls: &mut Calls, d: &Device, index: u32, r: &mut GpuReading) -> Result<(), Lost> {
    let wanted: Vec<(u32, &'static str)> = FIELDS.into_iter().filter(|(_, name)| calls.is_on(name, index)).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let ids: Vec<FieldId> = wanted.iter().map(|(id, _)| FieldId(*id)).collect();
    let Some(samples) = calls.call("field_values", index, || d.field_values_for(&ids))? else { return Ok(()) };
    for (sample, (id, name)) in samples.into_iter().zip(wanted) {
        let Some(value) = calls.answer(name, index, sample.and_then(|s: FieldValueSample| s.value))? else { continue };
        match id {
            NVML_FI_DEV_MEMORY_TEMP => r.set(GpuGauge::MemoryTemperature, Some(as_f64(value))),
            _ => r.health.pcie_replays = Some(as_f64(value) as u64),
        }
    }
    Ok(())
}

/// A field's value, whatever type the driver gave it.
fn as_f64(value: SampleValue) -> f64 {
    match value {
        SampleValue::F64(v) => v,
        SampleValue::U32(v) => f64::from(v),
        SampleValue::U64(v) => v as f64,
        SampleValue::I64(v) => v as f64,
    }
}

/// NVLink: the links that are up, and each error counter summed over the links.
fn read_links(calls: &mut Calls, d: &Device, index: u32, links: &mut Links, r: &mut GpuReading) -> Result<(), Lost> {
    let count = match links.count {
        Some(count) => count,
        None => {
            let count = count_links(d)?;
            if count == 0 {
                tracing::info!(gpu = index, "no NVLink on this GPU: NVLink errors and links are not exported for it");
            }
            links.count = Some(count);
            links.errors = vec![[None; 4]; count as usize];
            count
        }
    };
    if count == 0 {
        return Ok(());
    }
    let mut active = Some(0.0);
    for link in 0..count {
        let wrapper = d.link_wrapper_for(link);
        let up = calls.call("nvlink_state", index, || wrapper.is_active())?;
        match up {
            None => active = None,
            Some(false) => {}
            Some(true) => {
                active = active.map(|n| n + 1.0);
                for (k, (counter, name)) in NVLINK_COUNTERS.into_iter().enumerate() {
                    if let Some(n) = calls.call(name, index, || wrapper.error_counter(counter))? {
                        links.errors[link as usize][k] = Some(n);
                    }
                }
            }
        }
    }
    r.set(GpuGauge::NvlinkLinksActive, active);
    for k in 0..NVLINK_COUNTERS.len() {
        let values = links.errors.iter().filter_map(|l| l[k]);
        r.health.nvlink_errors[k] = links.errors.iter().any(|l| l[k].is_some()).then(|| values.sum());
    }
    Ok(())
}

/// The GPU's NVLink links: field `NVML_FI_DEV_NVLINK_LINK_COUNT`, or where the driver does not
/// answer it, the links whose state it gives (up to the first it calls invalid).
fn count_links(d: &Device) -> Result<u32, Lost> {
    match d.field_values_for(&[FieldId(NVML_FI_DEV_NVLINK_LINK_COUNT)]) {
        Err(NvmlError::GpuLost) => return Err(Lost),
        Ok(samples) => {
            if let Some(Ok(FieldValueSample { value: Ok(value), .. })) = samples.into_iter().next() {
                return Ok((as_f64(value) as u32).min(MAX_LINKS));
            }
        }
        Err(_) => {}
    }
    for link in 0..MAX_LINKS {
        match d.link_wrapper_for(link).is_active() {
            Ok(_) => {}
            Err(NvmlError::GpuLost) => return Err(Lost),
            Err(_) => return Ok(link),
        }
    }
    Ok(MAX_LINKS)
}

/// Pages retired for one cause (`nvmlDeviceGetRetiredPages` with an empty buffer answers the
/// count; not wrapped by `nvml-wrapper` without also fetching every address).
fn retired_pages(d: &Device, cause: u32) -> Result<u64, NvmlError> {
    let function = nvml_sym(d.nvml().lib().nvmlDeviceGetRetiredPages.as_ref())?;
    let (mut count, mut address) = (0, 0);
    // SAFETY: a valid device handle, a count of 0 and a valid (unused) address buffer.
    let status = unsafe { function(d.handle(), cause, &mut count, &mut address) };
    if status != NVML_ERROR_INSUFFICIENT_SIZE {
        nvml_try(status)?;
    }
    Ok(u64::from(count))
}

/// Whether the GPU's NVSwitch fabric is healthy (`nvmlDeviceGetGpuFabricInfoV`, not wrapped by
/// `nvml-wrapper`): `None` on a GPU without one. A driver that does not know the version 3
/// struct (with the health summary) is asked for version 2.
fn fabric_healthy(d: &Device) -> Result<Option<bool>, NvmlError> {
    let function = nvml_sym(d.nvml().lib().nvmlDeviceGetGpuFabricInfoV.as_ref())?;
    // SAFETY: the struct is plain data, valid zeroed; the version names its size, as
    // `NVML_STRUCT_VERSION` does.
    let mut info = unsafe { std::mem::zeroed::<nvmlGpuFabricInfoV_t>() };
    let size = std::mem::size_of_val(&info) as u32;
    info.version = size | (3 << 24);
    // SAFETY: a valid device handle and a struct of the size its version names.
    let mut status = unsafe { function(d.handle(), &mut info) };
    let mut summary = true;
    if status == NVML_ERROR_ARGUMENT_VERSION_MISMATCH {
        // Version 2 is version 3 without the trailing summary byte (and its padding).
        // SAFETY: as above.
        info = unsafe { std::mem::zeroed() };
        info.version = (size - 4) | (2 << 24);
        // SAFETY: as above; the buffer is larger than the version 2 struct.
        status = unsafe { function(d.handle(), &mut info) };
        summary = false;
    }
    nvml_try(status)?;
    if info.state == FABRIC_STATE_NOT_SUPPORTED {
        return Ok(None);
    }
    let flag = |shift: u32| (info.healthMask >> shift) & FABRIC_HEALTH_WIDTH == FABRIC_HEALTH_TRUE;
    let healthy = info.state == FABRIC_STATE_COMPLETED
        && info.status == 0
        && !flag(FABRIC_HEALTH_SHIFT_DEGRADED_BW)
        && !flag(FABRIC_HEALTH_SHIFT_ROUTE_UNHEALTHY)
        && !(summary && info.healthSummary == FABRIC_SUMMARY_UNHEALTHY);
    Ok(Some(healthy))
}
