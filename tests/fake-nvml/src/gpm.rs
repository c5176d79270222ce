//! GPM (GPU Performance Monitoring, Hopper and newer): `nvmlGpmQueryDeviceSupport`,
//! `nvmlGpmSampleAlloc`/`Free`, `nvmlGpmSampleGet`, `nvmlGpmMigSampleGet` and
//! `nvmlGpmMetricsGet`, with `nvml.h`'s layouts and checks. Each GPU and MIG instance has
//! counters that advance at the scenario's rates; a sample records them with its time, and the
//! metrics between two samples are the counters' change over the time between them.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_uint, CStr};
use std::time::Instant;

use super::scenario::{Gpm, Scenario};
use super::*;

/// `NVML_GPM_METRICS_GET_VERSION`.
const METRICS_GET_VERSION: c_uint = 1;
/// `NVML_GPM_SUPPORT_VERSION`.
const SUPPORT_VERSION: c_uint = 1;
/// `NVML_GPM_METRIC_MAX` of the header nodelens is built against: the length of `metrics[]`.
pub const METRIC_MAX: usize = 210;

/// A metric the fake measures: its id, the scenario field with its rate, short name and unit.
type Metric = (c_uint, fn(&Gpm) -> f64, &'static CStr, &'static CStr);

/// Metric ids the fake measures. Ids from 20 up are traffic, measured on whole GPUs only.
const METRICS: [Metric; 12] = [
    (1, |g| g.graphics_percent, c"graphics_util", c"%"),
    (2, |g| g.sm_active_percent, c"sm_util", c"%"),
    (3, |g| g.sm_occupancy_percent, c"sm_occupancy", c"%"),
    (5, |g| g.tensor_active_percent, c"any_tensor_util", c"%"),
    (10, |g| g.dram_active_percent, c"dram_bw_util", c"%"),
    (11, |g| g.fp64_active_percent, c"fp64_util", c"%"),
    (12, |g| g.fp32_active_percent, c"fp32_util", c"%"),
    (13, |g| g.fp16_active_percent, c"fp16_util", c"%"),
    (20, |g| g.pcie_tx_mib_per_s, c"pcie_tx_per_sec", c"MiB/sec"),
    (21, |g| g.pcie_rx_mib_per_s, c"pcie_rx_per_sec", c"MiB/sec"),
    (60, |g| g.nvlink_rx_mib_per_s, c"nvlink_total_rx_per_sec", c"MiB/sec"),
    (61, |g| g.nvlink_tx_mib_per_s, c"nvlink_total_tx_per_sec", c"MiB/sec"),
];

#[repr(C)]
pub struct nvmlGpmSample_st {
    _opaque: [u8; 0],
}
pub type nvmlGpmSample_t = *mut nvmlGpmSample_st;

#[repr(C)]
pub struct nvmlGpmMetricInfo {
    pub shortName: *const c_char,
    pub longName: *const c_char,
    pub unit: *const c_char,
}

#[repr(C)]
pub struct nvmlGpmMetric_t {
    pub metricId: c_uint,
    pub nvmlReturn: nvmlReturn_t,
    pub value: f64,
    pub metricInfo: nvmlGpmMetricInfo,
}

#[repr(C)]
pub struct nvmlGpmMetricsGet_t {
    pub version: c_uint,
    pub numMetrics: c_uint,
    pub sample1: nvmlGpmSample_t,
    pub sample2: nvmlGpmSample_t,
    pub metrics: [nvmlGpmMetric_t; METRIC_MAX],
}

#[repr(C)]
pub struct nvmlGpmSupport_t {
    pub version: c_uint,
    pub isSupportedDevice: c_uint,
}

/// Which counters: a GPU, or one of its MIG GPU instances.
pub type Source = (usize, Option<c_uint>);

/// A source's counters: each metric's rate integrated over time, as of `at`.
#[derive(Clone, Copy)]
pub struct Counters {
    at: Instant,
    sums: [f64; METRICS.len()],
}

/// What a filled sample recorded.
#[derive(Clone, Copy)]
struct Filled {
    source: Source,
    counters: Counters,
}

/// An allocated sample; `None` until a Get fills it.
struct Sample(Option<Filled>);

/// The rates `source` advances at, or `None` if it has no GPM.
fn rates(scenario: &Scenario, (gpu, instance): Source) -> Option<Gpm> {
    let gpu = scenario.gpus.get(gpu)?;
    let parent = gpu.gpm?;
    match instance {
        None => Some(parent),
        Some(gi) => gpu.mig.iter().find(|m| m.gpu_instance == gi)?.gpm,
    }
}

/// Brings every counter up to now at the scenario's current rates: called before each sample
/// and before a changed scenario replaces the old one.
pub fn advance(counters: &mut BTreeMap<Source, Counters>, scenario: &Scenario) {
    let now = Instant::now();
    for (source, c) in counters.iter_mut() {
        let seconds = now.duration_since(c.at).as_secs_f64();
        if let Some(g) = rates(scenario, *source) {
            for (sum, (_, rate, _, _)) in c.sums.iter_mut().zip(METRICS.iter()) {
                *sum += rate(&g) * seconds;
            }
        }
        c.at = now;
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(device: nvmlDevice_t, support: *mut nvmlGpmSupport_t) -> nvmlReturn_t {
    if support.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    if (*support).version != SUPPORT_VERSION {
        return ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    with_gpu(device, |gpu| {
        (*support).isSupportedDevice = gpu.gpm.is_some() as c_uint;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut nvmlGpmSample_t) -> nvmlReturn_t {
    let mut state = state();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    if sample.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let raw: nvmlGpmSample_t = Box::into_raw(Box::new(Sample(None))).cast();
    state.samples.insert(raw as usize);
    sample.write(raw);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleFree(sample: nvmlGpmSample_t) -> nvmlReturn_t {
    let mut state = state();
    if !state.samples.remove(&(sample as usize)) {
        return ERROR_INVALID_ARGUMENT;
    }
    drop(Box::from_raw(sample.cast::<Sample>()));
    SUCCESS
}

/// Fills `sample` with `source`'s counters now, after checking the device and the sample.
unsafe fn fill(device: nvmlDevice_t, instance: Option<c_uint>, sample: nvmlGpmSample_t) -> nvmlReturn_t {
    let mut state = state();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    if !state.samples.contains(&(sample as usize)) {
        return ERROR_INVALID_ARGUMENT;
    }
    let Some(Handle { gpu: index, mig: None }) = Handle::from_ptr(device) else { return ERROR_INVALID_ARGUMENT };
    let Some(gpu) = state.scenario.gpus.get(index) else { return ERROR_INVALID_ARGUMENT };
    if gpu.lost {
        return ERROR_GPU_IS_LOST;
    }
    if gpu.gpm.is_none() {
        return ERROR_NOT_SUPPORTED;
    }
    if let Some(gi) = instance {
        match gpu.mig.iter().find(|m| m.gpu_instance == gi) {
            None if !gpu.mig_enabled() => return ERROR_NOT_SUPPORTED,
            None => return ERROR_NOT_FOUND,
            Some(m) if m.gpm.is_none() => return ERROR_NOT_SUPPORTED,
            Some(_) => {}
        }
    }
    let source = (index, instance);
    let State { gpm, scenario, .. } = &mut *state;
    gpm.entry(source).or_insert(Counters { at: Instant::now(), sums: [0.0; METRICS.len()] });
    advance(gpm, scenario);
    let counters = gpm[&source];
    (*sample.cast::<Sample>()).0 = Some(Filled { source, counters });
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleGet(device: nvmlDevice_t, sample: nvmlGpmSample_t) -> nvmlReturn_t {
    fill(device, None, sample)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmMigSampleGet(device: nvmlDevice_t, gpu_instance_id: c_uint, sample: nvmlGpmSample_t) -> nvmlReturn_t {
    fill(device, Some(gpu_instance_id), sample)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmMetricsGet(request: *mut nvmlGpmMetricsGet_t) -> nvmlReturn_t {
    let state = state();
    if state.init_count == 0 {
        return ERROR_UNINITIALIZED;
    }
    if request.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let request = &mut *request;
    if request.version != METRICS_GET_VERSION {
        return ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    if request.numMetrics as usize > METRIC_MAX {
        return ERROR_INVALID_ARGUMENT;
    }
    let filled = |s: nvmlGpmSample_t| state.samples.contains(&(s as usize)).then(|| (*s.cast::<Sample>()).0).flatten();
    let (Some(first), Some(second)) = (filled(request.sample1), filled(request.sample2)) else { return ERROR_INVALID_ARGUMENT };
    let seconds = second.counters.at.saturating_duration_since(first.counters.at).as_secs_f64();
    if first.source != second.source || seconds <= 0.0 {
        return ERROR_INVALID_ARGUMENT;
    }
    for metric in request.metrics.iter_mut().take(request.numMetrics as usize) {
        let known = METRICS.iter().position(|(id, ..)| *id == metric.metricId);
        metric.metricInfo = nvmlGpmMetricInfo { shortName: std::ptr::null(), longName: std::ptr::null(), unit: std::ptr::null() };
        let Some(k) = known else {
            metric.nvmlReturn = ERROR_NOT_SUPPORTED;
            continue;
        };
        let (id, _, name, unit) = METRICS[k];
        // Traffic is a property of the whole GPU's links, not of a MIG instance.
        if id >= 20 && second.source.1.is_some() {
            metric.nvmlReturn = ERROR_NOT_SUPPORTED;
            continue;
        }
        metric.nvmlReturn = SUCCESS;
        metric.value = (second.counters.sums[k] - first.counters.sums[k]) / seconds;
        metric.metricInfo = nvmlGpmMetricInfo { shortName: name.as_ptr(), longName: name.as_ptr(), unit: unit.as_ptr() };
    }
    SUCCESS
}
