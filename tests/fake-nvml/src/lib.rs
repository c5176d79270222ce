//! A fake `libnvidia-ml.so`: the NVML C functions nodelens calls, with the signatures, struct
//! layouts and return codes of `nvml.h`, answering from a [`scenario::Scenario`] file. It is
//! strict where the real library is: calls before `nvmlInit` fail with `UNINITIALIZED`, unknown
//! handles with `INVALID_ARGUMENT`, short buffers with `INSUFFICIENT_SIZE`, versioned structs
//! with the wrong version with `ARGUMENT_VERSION_MISMATCH`, and MIG devices do not report
//! utilization (`NOT_SUPPORTED`), as on real hardware. GPUs of older architectures (no `gpm`
//! in the scenario) answer GPM calls with `NOT_SUPPORTED`; see [`gpm`].
#![allow(non_camel_case_types, non_snake_case, clippy::missing_safety_doc)]

pub mod gpm;
pub mod health;
pub mod scenario;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::{c_char, c_int, c_uint, c_ulonglong};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use scenario::{Gpu, MigInstance, Scenario, SCENARIO_ENV};

type nvmlReturn_t = c_int;
const SUCCESS: nvmlReturn_t = 0;
const ERROR_UNINITIALIZED: nvmlReturn_t = 1;
const ERROR_INVALID_ARGUMENT: nvmlReturn_t = 2;
const ERROR_NOT_SUPPORTED: nvmlReturn_t = 3;
const ERROR_NO_PERMISSION: nvmlReturn_t = 4;
const ERROR_NOT_FOUND: nvmlReturn_t = 6;
const ERROR_INSUFFICIENT_SIZE: nvmlReturn_t = 7;
const ERROR_TIMEOUT: nvmlReturn_t = 10;
const ERROR_GPU_IS_LOST: nvmlReturn_t = 15;
const ERROR_ARGUMENT_VERSION_MISMATCH: nvmlReturn_t = 25;
const ERROR_UNKNOWN: nvmlReturn_t = 999;

/// `nvmlEventTypeXidCriticalError`.
const EVENT_XID_CRITICAL: c_ulonglong = 0x8;
/// `NVML_DEVICE_MIG_ENABLE`.
const MIG_ENABLE: c_uint = 1;
/// `NVML_CLOCK_SM`, `NVML_CLOCK_MEM`.
const CLOCK_SM: c_uint = 1;
const CLOCK_MEM: c_uint = 2;
/// `NVML_TEMPERATURE_GPU`.
const TEMPERATURE_GPU: c_uint = 0;
/// `NVML_VOLATILE_ECC`.
const ECC_VOLATILE: c_uint = 0;
/// Largest MIG device count of any current GPU.
const MAX_MIG_DEVICES: c_uint = 7;
/// Instance ids of processes outside MIG.
const NO_INSTANCE: c_uint = 0xFFFF_FFFF;
/// The driver samples per-process utilization every 1/6 s ...
const SAMPLE_PERIOD_US: u64 = 166_667;
/// ... and keeps the last few samples (unless the scenario says how many).
const SAMPLES_KEPT: u64 = 20;

#[repr(C)]
pub struct nvmlDevice_st {
    _opaque: [u8; 0],
}
pub type nvmlDevice_t = *mut nvmlDevice_st;

#[repr(C)]
pub struct nvmlEventSet_st {
    _opaque: [u8; 0],
}
pub type nvmlEventSet_t = *mut nvmlEventSet_st;

#[repr(C)]
pub struct nvmlUtilization_t {
    pub gpu: c_uint,
    pub memory: c_uint,
}

#[repr(C)]
pub struct nvmlMemory_v2_t {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}
/// `NVML_STRUCT_VERSION(Memory, 2)`.
const MEMORY_V2: c_uint = (std::mem::size_of::<nvmlMemory_v2_t>() as c_uint) | (2 << 24);

#[repr(C)]
pub struct nvmlProcessInfo_t {
    pub pid: c_uint,
    pub usedGpuMemory: c_ulonglong,
    pub gpuInstanceId: c_uint,
    pub computeInstanceId: c_uint,
}

#[repr(C)]
pub struct nvmlProcessUtilizationSample_t {
    pub pid: c_uint,
    pub timeStamp: c_ulonglong,
    pub smUtil: c_uint,
    pub memUtil: c_uint,
    pub encUtil: c_uint,
    pub decUtil: c_uint,
}

#[repr(C)]
pub struct nvmlEventData_t {
    pub device: nvmlDevice_t,
    pub eventType: c_ulonglong,
    pub eventData: c_ulonglong,
    pub gpuInstanceId: c_uint,
    pub computeInstanceId: c_uint,
}

/// The library's state: the scenario as last read, and whether `nvmlInit` was called.
struct State {
    path: Option<PathBuf>,
    modified: Option<SystemTime>,
    checked: Option<Instant>,
    scenario: Scenario,
    init_count: u32,
    /// GPM samples allocated and not yet freed.
    samples: BTreeSet<usize>,
    /// GPM counters of every GPU and MIG instance sampled so far.
    gpm: BTreeMap<gpm::Source, gpm::Counters>,
}

static STATE: Mutex<State> = Mutex::new(State {
    path: None,
    modified: None,
    checked: None,
    scenario: empty(),
    init_count: 0,
    samples: BTreeSet::new(),
    gpm: BTreeMap::new(),
});

const fn empty() -> Scenario {
    Scenario { driver_version: String::new(), gpus: Vec::new() }
}

/// The state with the scenario refreshed if its file changed (checked at most every 10 ms).
fn state() -> MutexGuard<'static, State> {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if state.checked.is_some_and(|at| at.elapsed() < Duration::from_millis(10)) {
        return state;
    }
    state.checked = Some(Instant::now());
    let Some(path) = state.path.clone() else { return state };
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    if modified != state.modified {
        if let Some(scenario) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Scenario>(&b).ok()) {
            // The counters ran at the old rates until now; a GPU that is lost (reset, off the
            // bus) starts them again from zero when it is back.
            let State { gpm, scenario: old, .. } = &mut *state;
            gpm::advance(gpm, old);
            let lost: Vec<usize> = scenario.gpus.iter().enumerate().filter(|(_, g)| g.lost).map(|(i, _)| i).collect();
            gpm.retain(|(gpu, _), _| !lost.contains(gpu));
            state.scenario = scenario;
            state.modified = modified;
        }
    }
    state
}

/// What a device handle points at.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Handle {
    gpu: usize,
    mig: Option<usize>,
}

impl Handle {
    fn to_ptr(self) -> nvmlDevice_t {
        (((self.gpu + 1) << 16) | self.mig.map_or(0, |m| m + 1)) as nvmlDevice_t
    }

    fn from_ptr(device: nvmlDevice_t) -> Option<Handle> {
        let raw = device as usize;
        let gpu = (raw >> 16).checked_sub(1)?;
        let mig = (raw & 0xffff).checked_sub(1);
        Some(Handle { gpu, mig })
    }
}

/// Runs `f` on the GPU (and MIG instance) behind `device`, after the checks every device call
/// makes: initialised, a valid handle, the GPU not lost.
fn with_device(device: nvmlDevice_t, f: impl FnOnce(&Gpu, Option<&MigInstance>) -> nvmlReturn_t) -> nvmlReturn_t {
    let state = state();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    let Some(handle) = Handle::from_ptr(device) else { return ERROR_INVALID_ARGUMENT };
    let Some(gpu) = state.scenario.gpus.get(handle.gpu) else { return ERROR_INVALID_ARGUMENT };
    if gpu.lost {
        return ERROR_GPU_IS_LOST;
    }
    match handle.mig {
        None => f(gpu, None),
        Some(m) => match gpu.mig.get(m) {
            Some(mig) => f(gpu, Some(mig)),
            None => ERROR_INVALID_ARGUMENT,
        },
    }
}

/// Writes `value` to an out-pointer, rejecting NULL.
unsafe fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    out.write(value);
    SUCCESS
}

/// Copies `text` NUL-terminated into a caller's buffer of `length` bytes.
unsafe fn put_str(out: *mut c_char, length: c_uint, text: &str) -> nvmlReturn_t {
    if out.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    if text.len() + 1 > length as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    std::ptr::copy_nonoverlapping(text.as_ptr(), out.cast::<u8>(), text.len());
    out.add(text.len()).write(0);
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    state.path = std::env::var_os(SCENARIO_ENV).map(PathBuf::from);
    state.checked = None;
    state.modified = None;
    state.init_count += 1;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    nvmlInit_v2()
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    state.init_count -= 1;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(_result: nvmlReturn_t) -> *const c_char {
    c"fake NVML error".as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> nvmlReturn_t {
    let state = state();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    put_str(version, length, &state.scenario.driver_version)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    let state = state();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    put(count, state.scenario.gpus.len() as c_uint)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut nvmlDevice_t) -> nvmlReturn_t {
    let state = state();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    match state.scenario.gpus.get(index as usize) {
        None => ERROR_INVALID_ARGUMENT,
        Some(gpu) if gpu.lost => ERROR_GPU_IS_LOST,
        Some(_) => put(device, Handle { gpu: index as usize, mig: None }.to_ptr()),
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(device: nvmlDevice_t, uuid: *mut c_char, length: c_uint) -> nvmlReturn_t {
    with_device(device, |gpu, mig| put_str(uuid, length, mig.map_or(&gpu.uuid, |m| &m.uuid)))
}

/// `nvmlPciInfo_t` of `nvml.h` (the v3 layout).
#[repr(C)]
pub struct nvmlPciInfo_t {
    pub busIdLegacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pciDeviceId: c_uint,
    pub pciSubSystemId: c_uint,
    pub busId: [c_char; 32],
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(device: nvmlDevice_t, pci: *mut nvmlPciInfo_t) -> nvmlReturn_t {
    if pci.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let Some(Handle { gpu: index, .. }) = Handle::from_ptr(device) else { return ERROR_INVALID_ARGUMENT };
    with_device(device, |gpu, _| {
        let bus_id = if gpu.pci_bus_id.is_empty() { format!("00000000:{:02X}:00.0", 0x18 + index) } else { gpu.pci_bus_id.clone() };
        let mut parts = bus_id.split(['.', ':']).map(|p| u32::from_str_radix(p, 16).unwrap_or(0));
        let (domain, bus, dev) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        let out = &mut *pci;
        out.domain = domain;
        out.bus = bus;
        out.device = dev;
        out.pciDeviceId = 0x2330_10DE;
        out.pciSubSystemId = 0x16C1_10DE;
        let legacy = format!("{:04X}:{:02X}:{:02X}.0", domain, bus, dev);
        out.busIdLegacy = [0; 16];
        out.busId = [0; 32];
        for (i, b) in legacy.bytes().take(15).enumerate() {
            out.busIdLegacy[i] = b as c_char;
        }
        for (i, b) in bus_id.bytes().take(31).enumerate() {
            out.busId[i] = b as c_char;
        }
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(device: nvmlDevice_t, name: *mut c_char, length: c_uint) -> nvmlReturn_t {
    with_device(device, |gpu, mig| match mig {
        None => put_str(name, length, &gpu.name),
        Some(m) => put_str(name, length, &format!("{} MIG {}", gpu.name, m.profile)),
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(device: nvmlDevice_t, utilization: *mut nvmlUtilization_t) -> nvmlReturn_t {
    with_device(device, |gpu, mig| match mig {
        Some(_) => ERROR_NOT_SUPPORTED,
        None => put(utilization, nvmlUtilization_t { gpu: gpu.utilization_percent, memory: gpu.memory_utilization_percent }),
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: nvmlDevice_t, memory: *mut nvmlMemory_v2_t) -> nvmlReturn_t {
    if memory.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    if (*memory).version != MEMORY_V2 {
        return ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    with_device(device, |gpu, mig| {
        let (total, used) = mig.map_or((gpu.memory_total_bytes, gpu.memory_used_bytes), |m| (m.memory_total_bytes, m.memory_used_bytes));
        put(memory, nvmlMemory_v2_t { version: MEMORY_V2, total, reserved: 0, free: total.saturating_sub(used), used })
    })
}

/// Runs `f` on a full GPU; MIG handles get `NOT_SUPPORTED`, as for the board-level queries
/// the real driver answers only on the parent.
fn with_gpu(device: nvmlDevice_t, f: impl FnOnce(&Gpu) -> nvmlReturn_t) -> nvmlReturn_t {
    with_device(device, |gpu, mig| if mig.is_some() { ERROR_NOT_SUPPORTED } else { f(gpu) })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(device: nvmlDevice_t, sensor: c_uint, temp: *mut c_uint) -> nvmlReturn_t {
    if sensor != TEMPERATURE_GPU {
        return ERROR_INVALID_ARGUMENT;
    }
    with_gpu(device, |gpu| put(temp, gpu.temperature_celsius))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(device: nvmlDevice_t, power: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |gpu| if gpu.power_read_fails { ERROR_UNKNOWN } else { put(power, gpu.power_milliwatts) })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(device: nvmlDevice_t, limit: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |gpu| put(limit, gpu.power_limit_milliwatts))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(device: nvmlDevice_t, energy: *mut c_ulonglong) -> nvmlReturn_t {
    with_gpu(device, |gpu| put(energy, gpu.energy_millijoules))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(device: nvmlDevice_t, clock_type: c_uint, clock: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |gpu| match clock_type {
        CLOCK_SM => put(clock, gpu.sm_clock_mhz),
        CLOCK_MEM => gpu.memory_clock_mhz.map_or(ERROR_NOT_SUPPORTED, |mhz| put(clock, mhz)),
        _ => ERROR_NOT_SUPPORTED,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(device: nvmlDevice_t, reasons: *mut c_ulonglong) -> nvmlReturn_t {
    with_gpu(device, |gpu| put(reasons, gpu.throttle_reasons))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: c_uint,
    counter_type: c_uint,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    if counter_type != ECC_VOLATILE {
        return ERROR_NOT_SUPPORTED;
    }
    with_gpu(device, |gpu| {
        let value = match error_type {
            0 => gpu.ecc_corrected,
            1 => gpu.ecc_uncorrected,
            _ => return ERROR_INVALID_ARGUMENT,
        };
        value.map_or(ERROR_NOT_SUPPORTED, |v| put(count, v))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    with_device(device, |gpu, mig| {
        let procs: Vec<_> = gpu.processes.iter().filter(|p| mig.is_none_or(|m| p.gpu_instance == Some(m.gpu_instance))).collect();
        let room = *count as usize;
        *count = procs.len() as c_uint;
        if procs.is_empty() {
            return SUCCESS;
        }
        if room < procs.len() || infos.is_null() {
            return ERROR_INSUFFICIENT_SIZE;
        }
        for (i, p) in procs.iter().enumerate() {
            infos.add(i).write(nvmlProcessInfo_t {
                pid: p.pid,
                usedGpuMemory: p.used_memory_bytes,
                gpuInstanceId: p.gpu_instance.unwrap_or(NO_INSTANCE),
                computeInstanceId: if p.gpu_instance.is_some() { 0 } else { NO_INSTANCE },
            });
        }
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    utilization: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    last_seen: c_ulonglong,
) -> nvmlReturn_t {
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    with_gpu(device, |gpu| {
        let samples = samples_since(gpu, last_seen);
        if samples.is_empty() {
            return ERROR_NOT_FOUND;
        }
        let room = *count as usize;
        *count = samples.len() as c_uint;
        if utilization.is_null() || room < samples.len() {
            return ERROR_INSUFFICIENT_SIZE;
        }
        for (i, sample) in samples.into_iter().enumerate() {
            utilization.add(i).write(sample);
        }
        SUCCESS
    })
}

/// The samples the driver holds that are newer than `last_seen`: one per busy process per
/// sample period over the kept window, stamped with wall-clock microseconds; where the
/// scenario says so, only each process's newest one.
fn samples_since(gpu: &Gpu, last_seen: c_ulonglong) -> Vec<nvmlProcessUtilizationSample_t> {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_micros() as u64;
    let period = if gpu.sample_period_us == 0 { SAMPLE_PERIOD_US } else { gpu.sample_period_us };
    let newest = now / period;
    let kept = if gpu.samples_kept == 0 { SAMPLES_KEPT } else { gpu.samples_kept };
    let oldest = (newest + 1).saturating_sub(kept).max(last_seen / period + 1);
    let busy = gpu.processes.iter().filter(|p| p.sm_percent > 0 && p.gpu_instance.is_none());
    busy.flat_map(|p| {
        let ran = move |k: &u64| p.burst_cycle == 0 || k % p.burst_cycle < p.burst_busy;
        let held: Vec<u64> = (oldest..=newest).filter(ran).collect();
        let returned = if gpu.newest_sample_only { &held[held.len().saturating_sub(1)..] } else { &held[..] };
        returned
            .iter()
            .map(|k| nvmlProcessUtilizationSample_t {
                pid: p.pid,
                timeStamp: k * period,
                smUtil: p.sm_percent,
                memUtil: 0,
                encUtil: 0,
                decUtil: 0,
            })
            .collect::<Vec<_>>()
    })
    .collect()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(device: nvmlDevice_t, counter: c_uint, value: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |gpu| match counter {
        0 => put(value, gpu.pcie_tx_kb_per_s),
        1 => put(value, gpu.pcie_rx_kb_per_s),
        _ => ERROR_INVALID_ARGUMENT,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: nvmlDevice_t,
    correctable: *mut c_uint,
    uncorrectable: *mut c_uint,
    pending: *mut c_uint,
    failed: *mut c_uint,
) -> nvmlReturn_t {
    if [correctable, uncorrectable, pending, failed].iter().any(|p| p.is_null()) {
        return ERROR_INVALID_ARGUMENT;
    }
    with_gpu(device, |gpu| {
        let Some(rows) = gpu.remapped_rows else { return ERROR_NOT_SUPPORTED };
        correctable.write(rows.correctable);
        uncorrectable.write(rows.uncorrectable);
        pending.write(rows.pending as c_uint);
        failed.write(rows.failed as c_uint);
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(device: nvmlDevice_t, current: *mut c_uint, pending: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |gpu| {
        let mode = if gpu.mig_enabled() { MIG_ENABLE } else { 0 };
        match put(current, mode) {
            SUCCESS => put(pending, mode),
            err => err,
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(device: nvmlDevice_t, count: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |_| put(count, MAX_MIG_DEVICES))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(device: nvmlDevice_t, index: c_uint, mig: *mut nvmlDevice_t) -> nvmlReturn_t {
    let Some(handle) = Handle::from_ptr(device) else { return ERROR_INVALID_ARGUMENT };
    with_gpu(device, |gpu| {
        if !gpu.mig_enabled() || index >= MAX_MIG_DEVICES {
            ERROR_INVALID_ARGUMENT
        } else if index as usize >= gpu.mig.len() {
            ERROR_NOT_FOUND
        } else {
            put(mig, Handle { gpu: handle.gpu, mig: Some(index as usize) }.to_ptr())
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(device: nvmlDevice_t, is_mig: *mut c_uint) -> nvmlReturn_t {
    with_device(device, |_, mig| put(is_mig, mig.is_some() as c_uint))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(device: nvmlDevice_t, minor: *mut c_uint) -> nvmlReturn_t {
    let Some(handle) = Handle::from_ptr(device) else { return ERROR_INVALID_ARGUMENT };
    with_gpu(device, |gpu| put(minor, gpu.minor.unwrap_or(handle.gpu as c_uint)))
}

#[repr(C)]
pub struct nvmlGpuInstance_st {
    _opaque: [u8; 0],
}
pub type nvmlGpuInstance_t = *mut nvmlGpuInstance_st;

#[repr(C)]
pub struct nvmlGpuInstancePlacement_t {
    pub start: c_uint,
    pub size: c_uint,
}

#[repr(C)]
pub struct nvmlGpuInstanceInfo_t {
    pub device: nvmlDevice_t,
    pub id: c_uint,
    pub profileId: c_uint,
    pub placement: nvmlGpuInstancePlacement_t,
}

/// GPU instance handles: the MIG device's handle with a high bit set, so that passing one
/// where a device handle belongs (or the reverse) is caught.
const GPU_INSTANCE_BIT: usize = 1 << 40;

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceById(device: nvmlDevice_t, id: c_uint, instance: *mut nvmlGpuInstance_t) -> nvmlReturn_t {
    let Some(handle) = Handle::from_ptr(device) else { return ERROR_INVALID_ARGUMENT };
    with_gpu(device, |gpu| {
        if !gpu.mig_enabled() {
            return ERROR_NOT_SUPPORTED;
        }
        if gpu.gpu_instances_denied {
            return ERROR_NO_PERMISSION;
        }
        match gpu.mig.iter().position(|m| m.gpu_instance == id) {
            None => ERROR_NOT_FOUND,
            Some(m) => put(instance, (Handle { gpu: handle.gpu, mig: Some(m) }.to_ptr() as usize | GPU_INSTANCE_BIT) as nvmlGpuInstance_t),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpuInstanceGetInfo(instance: nvmlGpuInstance_t, info: *mut nvmlGpuInstanceInfo_t) -> nvmlReturn_t {
    let raw = instance as usize;
    if raw & GPU_INSTANCE_BIT == 0 {
        return ERROR_INVALID_ARGUMENT;
    }
    let Some(Handle { gpu, mig: Some(_) }) = Handle::from_ptr((raw & !GPU_INSTANCE_BIT) as nvmlDevice_t) else {
        return ERROR_INVALID_ARGUMENT;
    };
    let parent = Handle { gpu, mig: None }.to_ptr();
    with_device((raw & !GPU_INSTANCE_BIT) as nvmlDevice_t, |_, mig| {
        let Some(m) = mig else { return ERROR_INVALID_ARGUMENT };
        put(
            info,
            nvmlGpuInstanceInfo_t {
                device: parent,
                id: m.gpu_instance,
                profileId: m.profile_id,
                placement: nvmlGpuInstancePlacement_t { start: m.placement_start, size: m.placement_size },
            },
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(device: nvmlDevice_t, id: *mut c_uint) -> nvmlReturn_t {
    with_device(device, |_, mig| match mig {
        None => ERROR_NOT_SUPPORTED,
        Some(m) => put(id, m.gpu_instance),
    })
}

/// An event set: the GPUs registered on it and the XID events already delivered from it.
struct EventSet {
    gpus: Vec<usize>,
    delivered: HashSet<(usize, u64)>,
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    if state().init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    put(set, Box::into_raw(Box::new(EventSet { gpus: Vec::new(), delivered: HashSet::new() })).cast())
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(device: nvmlDevice_t, types: *mut c_ulonglong) -> nvmlReturn_t {
    with_gpu(device, |_| put(types, EVENT_XID_CRITICAL))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(device: nvmlDevice_t, types: c_ulonglong, set: nvmlEventSet_t) -> nvmlReturn_t {
    if set.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    if types & !EVENT_XID_CRITICAL != 0 {
        return ERROR_NOT_SUPPORTED;
    }
    let set = &mut *set.cast::<EventSet>();
    let Some(handle) = Handle::from_ptr(device) else { return ERROR_INVALID_ARGUMENT };
    with_gpu(device, |gpu| {
        // Events raised before registration are not delivered.
        set.delivered.extend(gpu.xid_events.iter().map(|e| (handle.gpu, e.id)));
        set.gpus.push(handle.gpu);
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(set: nvmlEventSet_t, data: *mut nvmlEventData_t, timeout_ms: c_uint) -> nvmlReturn_t {
    if set.is_null() || data.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let set = &mut *set.cast::<EventSet>();
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.into());
    loop {
        {
            let state = state();
            if state.init_count == 0 {
                return ERROR_UNINITIALIZED;
            }
            for &g in &set.gpus {
                let Some(gpu) = state.scenario.gpus.get(g) else { continue };
                if gpu.lost {
                    return ERROR_GPU_IS_LOST;
                }
                if let Some(event) = gpu.xid_events.iter().find(|e| !set.delivered.contains(&(g, e.id))) {
                    set.delivered.insert((g, event.id));
                    data.write(nvmlEventData_t {
                        device: Handle { gpu: g, mig: None }.to_ptr(),
                        eventType: EVENT_XID_CRITICAL,
                        eventData: event.xid,
                        gpuInstanceId: NO_INSTANCE,
                        computeInstanceId: NO_INSTANCE,
                    });
                    return SUCCESS;
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return ERROR_TIMEOUT;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    if set.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    drop(Box::from_raw(set.cast::<EventSet>()));
    SUCCESS
}
