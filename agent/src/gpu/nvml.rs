//! The NVML thread: loads the library, finds the GPUs (and MIG instances), and every
//! `gpu.poll_interval` reads them into a [`Reading`] it publishes on a watch channel. Between
//! polls it waits on an NVML event set, so critical XID errors are counted as they happen.
//!
//! Every driver call is made here, never on the async runtime. A call that fails degrades one
//! value, not the collector: a function missing from an older driver turns its metric off (one
//! warning), `NOT_SUPPORTED` leaves it out for that GPU, and "GPU is lost" marks that GPU down
//! while the others go on.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};
use tokio::sync::{oneshot, watch};

use super::processes::PidResolver;
use super::reading::{GpuGauge, GpuId, GpuReading, MigId, ProcessUse, Reading};

/// The library loaded when `gpu.nvml_library` is empty: the driver's runtime name (the
/// unversioned `libnvidia-ml.so` exists only where development packages are installed).
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// The longest the thread waits before checking whether the agent is stopping.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// What the thread needs.
pub struct Settings {
    /// `gpu.nvml_library`, or empty.
    pub library: String,
    /// `gpu.poll_interval`.
    pub poll_interval: Duration,
    /// `host.proc_root`.
    pub proc_root: PathBuf,
}

/// What start-up found, for the log line.
#[derive(Debug)]
pub struct Found {
    /// Physical GPUs.
    pub gpus: usize,
    /// MIG instances.
    pub mig_instances: usize,
    /// The driver's version.
    pub driver_version: String,
}

/// Runs the thread: reports start-up on `started`, then publishes readings until every
/// receiver of `out` is gone.
pub fn run(settings: Settings, out: watch::Sender<Option<Arc<Reading>>>, started: oneshot::Sender<Result<Found, String>>) {
    let library = if settings.library.is_empty() { DEFAULT_LIBRARY } else { settings.library.as_str() };
    let nvml = match Nvml::builder().lib_path(OsStr::new(library)).init() {
        Ok(nvml) => nvml,
        Err(e) => {
            let _ = started.send(Err(format!("NVML did not load from {library}: {e}")));
            return;
        }
    };
    let mut collector = Collector::discover(&nvml, PidResolver::new(settings.proc_root));
    if collector.devices.is_empty() {
        let _ = started.send(Err(format!("NVML loaded from {library} but reports no GPU")));
        return;
    }
    let found = Found {
        gpus: collector.devices.len(),
        mig_instances: collector.devices.iter().map(|d| d.migs.len()).sum(),
        driver_version: collector.driver_version.clone(),
    };
    if started.send(Ok(found)).is_err() {
        return;
    }
    let mut next = Instant::now();
    loop {
        if out.send(Some(Arc::new(collector.poll()))).is_err() {
            return;
        }
        next += settings.poll_interval;
        let now = Instant::now();
        if next < now {
            next = now + settings.poll_interval;
        }
        if !collector.wait_events(next, &out) {
            return;
        }
    }
}

/// One physical GPU.
struct Gpu<'n> {
    index: u32,
    /// `None` while NVML cannot give a handle (lost before the agent started).
    device: Option<Device<'n>>,
    id: GpuId,
    migs: Vec<(Device<'n>, GpuId)>,
    /// Timestamp of the newest per-process utilization sample seen, microseconds.
    last_sample_us: u64,
}

/// A GPU that answered "lost" in this poll.
struct Lost;

/// Bookkeeping of failed calls.
#[derive(Default)]
struct Calls {
    /// Functions the library lacks.
    missing: HashSet<&'static str>,
    /// (function, GPU index) pairs the device does not support.
    unsupported: HashSet<(&'static str, u32)>,
    /// Other failures, by function.
    errors: HashMap<&'static str, u64>,
}

impl Calls {
    /// Makes one call unless it is known to be missing or unsupported. `Err(Lost)` when the
    /// GPU is gone; `Ok(None)` when there is no value.
    fn call<T>(&mut self, name: &'static str, gpu: u32, f: impl FnOnce() -> Result<T, NvmlError>) -> Result<Option<T>, Lost> {
        if self.missing.contains(name) || self.unsupported.contains(&(name, gpu)) {
            return Ok(None);
        }
        match f() {
            Ok(v) => Ok(Some(v)),
            Err(NvmlError::GpuLost) => Err(Lost),
            Err(NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound) => {
                tracing::warn!(function = name, "this NVML library lacks the function; the metrics read with it are off");
                self.missing.insert(name);
                Ok(None)
            }
            Err(NvmlError::NotSupported) => {
                tracing::debug!(function = name, gpu, "not supported by this GPU");
                self.unsupported.insert((name, gpu));
                Ok(None)
            }
            Err(e) => {
                tracing::debug!(function = name, gpu, error = %e, "NVML call failed");
                *self.errors.entry(name).or_default() += 1;
                Ok(None)
            }
        }
    }
}

/// The collector's state between polls.
struct Collector<'n> {
    nvml: &'n Nvml,
    driver_version: String,
    devices: Vec<Gpu<'n>>,
    calls: Calls,
    events: Option<EventSet<'n>>,
    /// Critical XID events counted: (GPU position, xid) → count.
    xids: HashMap<(usize, u64), u64>,
    pids: PidResolver,
}

impl<'n> Collector<'n> {
    fn discover(nvml: &'n Nvml, pids: PidResolver) -> Collector<'n> {
        let count = nvml.device_count().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "NVML could not count the GPUs");
            0
        });
        let mut collector = Collector {
            nvml,
            driver_version: nvml.sys_driver_version().unwrap_or_default(),
            devices: Vec::new(),
            calls: Calls::default(),
            events: None,
            xids: HashMap::new(),
            pids,
        };
        for index in 0..count {
            let mut gpu = placeholder(index);
            collector.identify(&mut gpu);
            collector.devices.push(gpu);
        }
        collector.events = collector.register_events();
        collector
    }

    /// Gets a handle for `gpu`, with its identity and MIG instances; leaves it without one
    /// (reported down) when NVML cannot give one.
    fn identify(&self, gpu: &mut Gpu<'n>) {
        let device = match self.nvml.device_by_index(gpu.index) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(gpu = gpu.index, error = %e, "GPU not usable");
                return;
            }
        };
        gpu.id.uuid = device.uuid().unwrap_or_default();
        gpu.id.model = device.name().unwrap_or_default();
        if device.mig_mode().is_ok_and(|m| m.current == 1) {
            let slots = device.mig_device_count().unwrap_or(0);
            for slot in 0..slots {
                let Ok(mig) = device.mig_device_by_index(slot) else { continue };
                let name = mig.name().unwrap_or_default();
                let profile = name.rsplit_once(" MIG ").map(|(_, p)| p.to_string()).unwrap_or(name);
                let id = GpuId {
                    index: gpu.index,
                    uuid: mig.uuid().unwrap_or_default(),
                    model: gpu.id.model.clone(),
                    mig: Some(MigId {
                        profile,
                        gpu_instance: gpu_instance_id(self.nvml, &mig).unwrap_or(0),
                        parent_uuid: gpu.id.uuid.clone(),
                    }),
                };
                gpu.migs.push((mig, id));
            }
        }
        gpu.device = Some(device);
    }

    /// An event set with every GPU that supports critical-XID events registered. A failed
    /// registration frees the set (NVML's rule), so the set is rebuilt without that GPU.
    fn register_events(&self) -> Option<EventSet<'n>> {
        let mut wanted: Vec<&Device<'n>> = self
            .devices
            .iter()
            .filter_map(|g| g.device.as_ref())
            .filter(|d| d.supported_event_types().is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR)))
            .collect();
        'rebuild: while !wanted.is_empty() {
            let mut set = self.nvml.create_event_set().ok()?;
            for (i, device) in wanted.iter().enumerate() {
                match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                    Ok(s) => set = s,
                    Err(e) => {
                        tracing::warn!(error = %e.error, "XID events not available for a GPU");
                        wanted.remove(i);
                        continue 'rebuild;
                    }
                }
            }
            return Some(set);
        }
        None
    }

    /// Reads every GPU once.
    fn poll(&mut self) -> Reading {
        let mut reading = Reading { driver_version: self.driver_version.clone(), ..Reading::default() };
        for position in 0..self.devices.len() {
            if self.devices[position].device.is_none() {
                let mut gpu = std::mem::replace(&mut self.devices[position], placeholder(position as u32));
                self.identify(&mut gpu);
                self.devices[position] = gpu;
            }
            let Collector { devices, calls, pids, xids, .. } = self;
            let gpu = &mut devices[position];
            let mut xid_counts: Vec<(u64, u64)> = xids.iter().filter(|((p, _), _)| *p == position).map(|((_, x), n)| (*x, *n)).collect();
            xid_counts.sort_unstable();
            let mut readings = match read_gpu(calls, gpu).and_then(|r| read_processes(calls, gpu, pids, &mut reading).map(|()| r)) {
                Ok(gpu_readings) => gpu_readings,
                Err(Lost) => {
                    let mut lost = vec![GpuReading::new(gpu.id.clone(), false)];
                    lost.extend(gpu.migs.iter().map(|(_, id)| GpuReading::new(id.clone(), false)));
                    lost
                }
            };
            readings[0].xids = xid_counts;
            reading.gpus.extend(readings);
        }
        self.pids.end_poll();
        let mut errors: Vec<_> = self.calls.errors.iter().map(|(k, v)| (*k, *v)).collect();
        errors.sort_unstable();
        reading.errors = errors;
        reading
    }

    /// Waits for XID events until `until`; false when the agent is stopping.
    fn wait_events(&mut self, until: Instant, out: &watch::Sender<Option<Arc<Reading>>>) -> bool {
        loop {
            if out.is_closed() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            let slice = left.min(STOP_CHECK);
            let Some(set) = &self.events else {
                std::thread::sleep(slice);
                continue;
            };
            match set.wait(slice.as_millis() as u32) {
                Ok(event) => {
                    let Some(xid) = event.event_data else { continue };
                    let xid = match xid {
                        XidError::Value(v) => v,
                        XidError::Unknown => 999,
                    };
                    // SAFETY: handles are only compared, never used to build a second owner.
                    let handle = unsafe { event.device.handle() };
                    let position = self.devices.iter().position(|g| g.device.as_ref().is_some_and(|d| unsafe { d.handle() } == handle));
                    if let Some(position) = position {
                        tracing::warn!(gpu = self.devices[position].index, xid, "GPU reported a critical XID error");
                        *self.xids.entry((position, xid)).or_default() += 1;
                    }
                }
                Err(NvmlError::Timeout) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "waiting for NVML events failed");
                    std::thread::sleep(slice);
                }
            }
        }
    }
}

/// GPU `index` before NVML has given a handle for it.
fn placeholder(index: u32) -> Gpu<'static> {
    Gpu {
        index,
        device: None,
        id: GpuId { index, uuid: String::new(), model: String::new(), mig: None },
        migs: Vec::new(),
        last_sample_us: 0,
    }
}

/// The GPU instance id of a MIG device (not wrapped by `nvml-wrapper`).
fn gpu_instance_id(nvml: &Nvml, mig: &Device) -> Option<u32> {
    let function = nvml.lib().nvmlDeviceGetGpuInstanceId.as_ref().ok()?;
    let mut id = 0;
    // SAFETY: a valid MIG handle and a valid out-pointer, as nvml.h requires.
    let status = unsafe { function(mig.handle(), &mut id) };
    (status == 0).then_some(id)
}

/// The board-level readings of a GPU, then one reading per MIG instance.
fn read_gpu(calls: &mut Calls, gpu: &Gpu) -> Result<Vec<GpuReading>, Lost> {
    let Some(d) = &gpu.device else { return Err(Lost) };
    let i = gpu.index;
    let mut r = GpuReading::new(gpu.id.clone(), true);
    let utilization = calls.call("utilization_rates", i, || d.utilization_rates())?;
    r.set(GpuGauge::Utilization, utilization.as_ref().map(|u| f64::from(u.gpu) / 100.0));
    r.set(GpuGauge::MemoryUtilization, utilization.as_ref().map(|u| f64::from(u.memory) / 100.0));
    let memory = calls.call("memory_info", i, || d.memory_info())?;
    r.set(GpuGauge::MemoryUsed, memory.as_ref().map(|m| m.used as f64));
    r.set(GpuGauge::MemoryTotal, memory.as_ref().map(|m| m.total as f64));
    r.set(GpuGauge::Temperature, calls.call("temperature", i, || d.temperature(TemperatureSensor::Gpu))?.map(f64::from));
    r.set(GpuGauge::Power, calls.call("power_usage", i, || d.power_usage())?.map(|mw| f64::from(mw) / 1000.0));
    r.set(GpuGauge::PowerLimit, calls.call("enforced_power_limit", i, || d.enforced_power_limit())?.map(|mw| f64::from(mw) / 1000.0));
    r.set(GpuGauge::SmClock, calls.call("clock_info", i, || d.clock_info(Clock::SM))?.map(|mhz| f64::from(mhz) * 1e6));
    r.energy_joules = calls.call("total_energy_consumption", i, || d.total_energy_consumption())?.map(|mj| mj as f64 / 1000.0);
    r.throttle_reasons = calls.call("current_throttle_reasons", i, || d.current_throttle_reasons())?.map(|t| t.bits());
    r.ecc = (
        calls.call("total_ecc_errors", i, || d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile))?,
        calls.call("total_ecc_errors", i, || d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile))?,
    );
    let mut readings = vec![r];
    for (mig, id) in &gpu.migs {
        let mut m = GpuReading::new(id.clone(), true);
        let memory = calls.call("memory_info", i, || mig.memory_info())?;
        m.set(GpuGauge::MemoryUsed, memory.as_ref().map(|m| m.used as f64));
        m.set(GpuGauge::MemoryTotal, memory.as_ref().map(|m| m.total as f64));
        readings.push(m);
    }
    Ok(readings)
}

/// The processes on a GPU with their memory and SM utilization since the last poll, added to
/// `reading`.
fn read_processes(calls: &mut Calls, gpu: &mut Gpu, pids: &mut PidResolver, reading: &mut Reading) -> Result<(), Lost> {
    let Some(d) = &gpu.device else { return Err(Lost) };
    let i = gpu.index;
    let running = calls.call("running_compute_processes", i, || d.running_compute_processes())?.unwrap_or_default();
    // NOT_FOUND means no process ran a kernel since the last poll: idle, not an error.
    let since = gpu.last_sample_us;
    let samples = if gpu.migs.is_empty() {
        calls.call("process_utilization_stats", i, || match d.process_utilization_stats(since) {
            Err(NvmlError::NotFound) => Ok(Vec::new()),
            other => other,
        })?
    } else {
        None
    };
    if samples.is_some() {
        reading.sampled.push(gpu.id.uuid.clone());
    }
    let mut sm: HashMap<u32, (u64, u32)> = HashMap::new();
    for s in samples.iter().flatten() {
        let entry = sm.entry(s.pid).or_default();
        entry.0 += u64::from(s.sm_util);
        entry.1 += 1;
        gpu.last_sample_us = gpu.last_sample_us.max(s.timestamp);
    }
    let sm_ratio = |pid: u32| -> Option<f64> {
        samples.as_ref()?;
        Some(sm.get(&pid).map_or(0.0, |(sum, n)| (*sum as f64 / f64::from(*n) / 100.0).min(1.0)))
    };
    let uses = &mut reading.processes;
    for p in &running {
        let uuid = match p.gpu_instance_id {
            Some(gi) => {
                gpu.migs.iter().find(|(_, id)| id.mig.as_ref().is_some_and(|m| m.gpu_instance == gi)).map(|(_, id)| id.uuid.clone())
            }
            None => None,
        };
        let memory_bytes = match p.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        };
        let sm_ratio = if uuid.is_some() { None } else { sm_ratio(p.pid) };
        uses.push(ProcessUse {
            uuid: uuid.unwrap_or_else(|| gpu.id.uuid.clone()),
            pid: p.pid,
            container: pids.resolve(p.pid),
            memory_bytes,
            sm_ratio,
        });
    }
    // Processes sampled but without a compute context (graphics work) still used the SMs.
    for (&pid, _) in sm.iter().filter(|(pid, _)| !running.iter().any(|p| p.pid == **pid)) {
        uses.push(ProcessUse { uuid: gpu.id.uuid.clone(), pid, container: pids.resolve(pid), memory_bytes: None, sm_ratio: sm_ratio(pid) });
    }
    Ok(())
}
