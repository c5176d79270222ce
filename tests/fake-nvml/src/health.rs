//! The second tier of GPU health: field values, memory clock, video engines, NVLink state and
//! error counters, violation time, retired pages and NVSwitch fabric info, with `nvml.h`'s
//! signatures, struct layouts and field ids. What a GPU lacks answers `NOT_SUPPORTED`, as the
//! real driver does.

use std::ffi::{c_int, c_uint, c_ulonglong};
use std::time::SystemTime;

use super::*;

/// `NVML_FI_DEV_MEMORY_TEMP`.
pub const FI_DEV_MEMORY_TEMP: c_uint = 82;
/// `NVML_FI_DEV_NVLINK_LINK_COUNT`.
pub const FI_DEV_NVLINK_LINK_COUNT: c_uint = 91;
/// `NVML_FI_DEV_PCIE_REPLAY_COUNTER`.
pub const FI_DEV_PCIE_REPLAY_COUNTER: c_uint = 94;
/// `NVML_VALUE_TYPE_UNSIGNED_INT`, `NVML_VALUE_TYPE_UNSIGNED_LONG_LONG`.
const VALUE_TYPE_UNSIGNED_INT: c_uint = 1;
const VALUE_TYPE_UNSIGNED_LONG_LONG: c_uint = 3;
/// `NVML_NVLINK_MAX_LINKS`.
const NVLINK_MAX_LINKS: c_uint = 18;
/// The encoder and decoder sample period the driver reports, microseconds.
const VIDEO_SAMPLE_PERIOD_US: c_uint = 167_000;

#[repr(C)]
#[derive(Clone, Copy)]
pub union nvmlValue_t {
    pub dVal: f64,
    pub siVal: c_int,
    pub uiVal: c_uint,
    pub ulVal: std::ffi::c_ulong,
    pub ullVal: c_ulonglong,
    pub sllVal: std::ffi::c_longlong,
    pub usVal: std::ffi::c_ushort,
}

#[repr(C)]
pub struct nvmlFieldValue_t {
    pub fieldId: c_uint,
    pub scopeId: c_uint,
    pub timestamp: std::ffi::c_longlong,
    pub latencyUsec: std::ffi::c_longlong,
    pub valueType: c_uint,
    pub nvmlReturn: nvmlReturn_t,
    pub value: nvmlValue_t,
}

#[repr(C)]
pub struct nvmlViolationTime_t {
    pub referenceTime: c_ulonglong,
    pub violationTime: c_ulonglong,
}

/// `nvmlGpuFabricInfo_v3_t` (`nvmlGpuFabricInfoV_t`); version 2 is the same without
/// `healthSummary`.
#[repr(C)]
pub struct nvmlGpuFabricInfo_v3_t {
    pub version: c_uint,
    pub clusterUuid: [u8; 16],
    pub status: nvmlReturn_t,
    pub cliqueId: c_uint,
    pub state: u8,
    pub healthMask: c_uint,
    pub healthSummary: u8,
}

#[repr(C)]
pub struct nvmlGpuFabricInfo_v2_t {
    pub version: c_uint,
    pub clusterUuid: [u8; 16],
    pub status: nvmlReturn_t,
    pub cliqueId: c_uint,
    pub state: u8,
    pub healthMask: c_uint,
}

/// `NVML_STRUCT_VERSION(GpuFabricInfo, 3)` and `(…, 2)`.
const FABRIC_INFO_V3: c_uint = (std::mem::size_of::<nvmlGpuFabricInfo_v3_t>() as c_uint) | (3 << 24);
const FABRIC_INFO_V2: c_uint = (std::mem::size_of::<nvmlGpuFabricInfo_v2_t>() as c_uint) | (2 << 24);

fn now_us() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_micros() as i64
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(device: nvmlDevice_t, count: c_int, values: *mut nvmlFieldValue_t) -> nvmlReturn_t {
    if count <= 0 || values.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    with_gpu(device, |gpu| {
        for k in 0..count as usize {
            let v = &mut *values.add(k);
            v.timestamp = now_us();
            v.latencyUsec = 0;
            let answer = match v.fieldId {
                FI_DEV_MEMORY_TEMP => gpu.memory_temperature_celsius.map(|t| (VALUE_TYPE_UNSIGNED_INT, nvmlValue_t { uiVal: t })),
                // A GPU without NVLink answers NOT_SUPPORTED here (as an H200 on driver 580 does).
                FI_DEV_NVLINK_LINK_COUNT if gpu.nvlinks.is_empty() => None,
                FI_DEV_NVLINK_LINK_COUNT => Some((VALUE_TYPE_UNSIGNED_INT, nvmlValue_t { uiVal: gpu.nvlinks.len() as c_uint })),
                FI_DEV_PCIE_REPLAY_COUNTER => gpu.pcie_replays.map(|n| (VALUE_TYPE_UNSIGNED_LONG_LONG, nvmlValue_t { ullVal: n })),
                // Fields this fake does not model.
                _ => None,
            };
            match answer {
                Some((value_type, value)) => {
                    v.valueType = value_type;
                    v.value = value;
                    v.nvmlReturn = SUCCESS;
                }
                None => v.nvmlReturn = ERROR_NOT_SUPPORTED,
            }
        }
        SUCCESS
    })
}

/// `NVML_TEMPERATURE_THRESHOLD_MEM_MAX`.
const TEMPERATURE_THRESHOLD_MEM_MAX: c_uint = 2;

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperatureThreshold(device: nvmlDevice_t, threshold: c_uint, temp: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |gpu| match threshold {
        TEMPERATURE_THRESHOLD_MEM_MAX => gpu.memory_temperature_limit_celsius.map_or(ERROR_NOT_SUPPORTED, |t| put(temp, t)),
        0..=7 => ERROR_NOT_SUPPORTED,
        _ => ERROR_INVALID_ARGUMENT,
    })
}

unsafe fn video(
    device: nvmlDevice_t,
    utilization: *mut c_uint,
    period: *mut c_uint,
    pick: fn(&scenario::Gpu) -> Option<u32>,
) -> nvmlReturn_t {
    if utilization.is_null() || period.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    with_gpu(device, |gpu| match pick(gpu) {
        None => ERROR_NOT_SUPPORTED,
        Some(percent) => {
            utilization.write(percent);
            period.write(VIDEO_SAMPLE_PERIOD_US);
            SUCCESS
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEncoderUtilization(
    device: nvmlDevice_t,
    utilization: *mut c_uint,
    period_us: *mut c_uint,
) -> nvmlReturn_t {
    video(device, utilization, period_us, |g| g.encoder_percent)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetDecoderUtilization(
    device: nvmlDevice_t,
    utilization: *mut c_uint,
    period_us: *mut c_uint,
) -> nvmlReturn_t {
    video(device, utilization, period_us, |g| g.decoder_percent)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkState(device: nvmlDevice_t, link: c_uint, active: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |gpu| {
        if gpu.nvlinks.is_empty() {
            return ERROR_NOT_SUPPORTED;
        }
        match gpu.nvlinks.get(link as usize) {
            Some(l) if link < NVLINK_MAX_LINKS => put(active, c_uint::from(l.active)),
            _ => ERROR_INVALID_ARGUMENT,
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkErrorCounter(
    device: nvmlDevice_t,
    link: c_uint,
    counter: c_uint,
    value: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_gpu(device, |gpu| {
        if gpu.nvlinks.is_empty() {
            return ERROR_NOT_SUPPORTED;
        }
        let Some(l) = gpu.nvlinks.get(link as usize) else { return ERROR_INVALID_ARGUMENT };
        // nvmlNvLinkErrorCounter_t: DL_REPLAY, DL_RECOVERY, DL_CRC_FLIT, DL_CRC_DATA, DL_ECC_DATA.
        let n = match counter {
            0 => l.replay,
            1 => l.recovery,
            2 => l.crc_flit,
            3 => l.crc_data,
            4 => None,
            _ => return ERROR_INVALID_ARGUMENT,
        };
        n.map_or(ERROR_NOT_SUPPORTED, |n| put(value, n))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetViolationStatus(
    device: nvmlDevice_t,
    policy: c_uint,
    time: *mut nvmlViolationTime_t,
) -> nvmlReturn_t {
    with_gpu(device, |gpu| {
        let v = &gpu.violations;
        let ns = match policy {
            0 => v.power,
            1 => v.thermal,
            2 => v.sync_boost,
            3 => v.board_limit,
            4 => v.low_utilization,
            5 => v.reliability,
            10 | 11 => None,
            _ => return ERROR_INVALID_ARGUMENT,
        };
        ns.map_or(ERROR_NOT_SUPPORTED, |ns| put(time, nvmlViolationTime_t { referenceTime: now_us() as u64, violationTime: ns }))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: nvmlDevice_t,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
) -> nvmlReturn_t {
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    with_gpu(device, |gpu| {
        let Some(pages) = gpu.retired_pages else { return ERROR_NOT_SUPPORTED };
        let n = match cause {
            0 => pages.single_bit,
            1 => pages.double_bit,
            _ => return ERROR_INVALID_ARGUMENT,
        };
        let room = *count;
        *count = n;
        if n == 0 {
            return SUCCESS;
        }
        if room < n {
            return ERROR_INSUFFICIENT_SIZE;
        }
        if addresses.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        for k in 0..n as usize {
            addresses.add(k).write(0x1000 * (k as u64 + 1) + u64::from(cause) * 0x100_0000);
        }
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(device: nvmlDevice_t, pending: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |gpu| match gpu.retired_pages {
        None => ERROR_NOT_SUPPORTED,
        Some(pages) => put(pending, c_uint::from(pages.pending)),
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGpuFabricInfoV(device: nvmlDevice_t, info: *mut nvmlGpuFabricInfo_v3_t) -> nvmlReturn_t {
    if info.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let version = (*info).version;
    with_gpu(device, |gpu| {
        let Some(fabric) = gpu.fabric else { return ERROR_NOT_SUPPORTED };
        if version != FABRIC_INFO_V2 && (version != FABRIC_INFO_V3 || fabric.v2_only) {
            return ERROR_ARGUMENT_VERSION_MISMATCH;
        }
        // Written field by field through raw pointers: a version 2 caller's buffer ends before
        // `healthSummary`.
        std::ptr::addr_of_mut!((*info).clusterUuid).write([0x5a; 16]);
        std::ptr::addr_of_mut!((*info).status).write(fabric.status as nvmlReturn_t);
        std::ptr::addr_of_mut!((*info).cliqueId).write(32766);
        std::ptr::addr_of_mut!((*info).state).write(fabric.state);
        std::ptr::addr_of_mut!((*info).healthMask).write(fabric.health_mask);
        if version == FABRIC_INFO_V3 {
            std::ptr::addr_of_mut!((*info).healthSummary).write(fabric.health_summary);
        }
        SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_the_sizes_of_nvml_h() {
        assert_eq!(std::mem::size_of::<nvmlFieldValue_t>(), 40);
        assert_eq!(FABRIC_INFO_V3, 0x0300_0028);
        assert_eq!(FABRIC_INFO_V2, 0x0200_0024);
    }
}
