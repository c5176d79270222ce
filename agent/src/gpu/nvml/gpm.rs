//! GPM (Hopper and newer): the profiling metrics of a GPU and of each MIG instance, taken
//! between this poll's sample and the previous one; PCIe and NVLink traffic from GPM, or from
//! the legacy PCIe throughput sensor where the GPU has no GPM.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nvml_wrapper::enum_wrappers::device::PcieUtilCounter;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::gpm::gpm_metrics_get;
use nvml_wrapper::Nvml;

use super::{Calls, Gpu, Lost};
use crate::gpu::reading::{GpuGauge, GpuReading};

/// The GPM metrics read each poll.
const GPM_METRICS: [GpmMetricId; 12] = [
    GpmMetricId::GraphicsUtil,
    GpmMetricId::SmUtil,
    GpmMetricId::SmOccupancy,
    GpmMetricId::AnyTensorUtil,
    GpmMetricId::DramBwUtil,
    GpmMetricId::Fp64Util,
    GpmMetricId::Fp32Util,
    GpmMetricId::Fp16Util,
    GpmMetricId::PcieTxPerSec,
    GpmMetricId::PcieRxPerSec,
    GpmMetricId::NvlinkTotalTxPerSec,
    GpmMetricId::NvlinkTotalRxPerSec,
];

/// GPM percentages and the gauges they fill (as ratios).
const GPM_GAUGES: [(GpmMetricId, GpuGauge); 7] = [
    (GpmMetricId::SmUtil, GpuGauge::SmActive),
    (GpmMetricId::SmOccupancy, GpuGauge::SmOccupancy),
    (GpmMetricId::AnyTensorUtil, GpuGauge::TensorActive),
    (GpmMetricId::DramBwUtil, GpuGauge::DramActive),
    (GpmMetricId::Fp64Util, GpuGauge::Fp64Active),
    (GpmMetricId::Fp32Util, GpuGauge::Fp32Active),
    (GpmMetricId::Fp16Util, GpuGauge::Fp16Active),
];

/// GPM reports traffic in MiB/s.
const MIB: f64 = 1_048_576.0;
/// `nvmlDeviceGetPcieThroughput` reports KB/s of 1,024 bytes.
const KIB: f64 = 1024.0;
/// Whether the library has GPM; says so once when it does not.
pub(super) fn gpm_library(nvml: &Nvml) -> bool {
    // The functions every GPM call needs; a library without one has no GPM.
    let lib = nvml.lib();
    let functions = [
        ("nvmlGpmQueryDeviceSupport", lib.nvmlGpmQueryDeviceSupport.is_ok()),
        ("nvmlGpmSampleAlloc", lib.nvmlGpmSampleAlloc.is_ok()),
        ("nvmlGpmSampleFree", lib.nvmlGpmSampleFree.is_ok()),
        ("nvmlGpmSampleGet", lib.nvmlGpmSampleGet.is_ok()),
        ("nvmlGpmMetricsGet", lib.nvmlGpmMetricsGet.is_ok()),
    ];
    let missing: Vec<&str> = functions.iter().filter(|(_, present)| !present).map(|(name, _)| *name).collect();
    if !missing.is_empty() {
        tracing::info!(missing = ?missing, "this NVML library has no GPM (a driver before R525): SM, tensor and DRAM activity are not exported");
    }
    missing.is_empty()
}

/// GPM metrics between two samples, with the seconds between them.
struct GpmWindow {
    values: HashMap<GpmMetricId, f64>,
    seconds: f64,
}

impl GpmWindow {
    /// A percentage as a ratio.
    fn ratio(&self, metric: GpmMetricId) -> Option<f64> {
        self.values.get(&metric).map(|p| (p / 100.0).clamp(0.0, 1.0))
    }

    /// Bytes moved in the window by a MiB/s metric.
    fn bytes(&self, metric: GpmMetricId) -> Option<f64> {
        self.values.get(&metric).map(|mib_per_s| mib_per_s.max(0.0) * MIB * self.seconds)
    }

    /// Fills the profiling gauges of `r`.
    fn fill(&self, r: &mut GpuReading) {
        for (metric, gauge) in GPM_GAUGES {
            r.set(gauge, self.ratio(metric));
        }
    }
}

/// Adds a window's (tx, rx) bytes to a running total; `None` while neither is measured.
fn add_traffic(total: &mut Option<(f64, f64)>, tx: Option<f64>, rx: Option<f64>) {
    if tx.is_none() && rx.is_none() {
        return;
    }
    let t = total.get_or_insert((0.0, 0.0));
    t.0 += tx.unwrap_or(0.0);
    t.1 += rx.unwrap_or(0.0);
}

/// Takes a GPM sample of the GPU (`instance` = `None`) or of one MIG instance and returns the
/// metrics since the previous poll's sample; `None` on the first one or when it failed.
fn gpm_window<'n>(calls: &mut Calls, gpu: &mut Gpu<'n>, instance: Option<u32>, longest: Duration) -> Result<Option<GpmWindow>, Lost> {
    let Some(d) = &gpu.device else { return Err(Lost) };
    let name = if instance.is_some() { "gpm_mig_sample" } else { "gpm_sample" };
    let sample = calls.call(name, gpu.index, || match instance {
        None => d.gpm_sample(),
        Some(gi) => d.gpm_mig_sample(gi),
    })?;
    let Some(sample) = sample else {
        gpu.gpm_samples.remove(&instance);
        return Ok(None);
    };
    let now = Instant::now();
    let Some((before, at)) = gpu.gpm_samples.insert(instance, (sample, now)) else { return Ok(None) };
    // A window much longer than a poll spans a stall or a reset: no rate over it.
    if now.duration_since(at) > longest {
        return Ok(None);
    }
    let current = &gpu.gpm_samples[&instance].0;
    let name = if instance.is_some() { "gpm_mig_metrics_get" } else { "gpm_metrics_get" };
    let Some(results) = calls.call(name, gpu.index, || gpm_metrics_get(d.nvml(), &before, current, &GPM_METRICS))? else {
        return Ok(None);
    };
    // A metric this GPU or instance does not measure comes back as an error of its own.
    let values = results.into_iter().filter_map(Result::ok).map(|r| (r.metric_id, r.value)).collect();
    Ok(Some(GpmWindow { values, seconds: now.duration_since(at).as_secs_f64() }))
}

/// GPM on the GPU and its MIG instances (a MIG instance's utilization is its GPM graphics
/// activity, which NVML's utilization call does not give), and PCIe/NVLink traffic: from GPM
/// where the GPU has it, else PCIe from the legacy throughput sensor.
pub(super) fn read_traffic_and_gpm(
    calls: &mut Calls,
    gpu: &mut Gpu,
    readings: &mut [GpuReading],
    poll_interval: Duration,
) -> Result<(), Lost> {
    let longest = poll_interval * 3 + Duration::from_secs(1);
    if gpu.gpm {
        if let Some(w) = gpm_window(calls, gpu, None, longest)? {
            w.fill(&mut readings[0]);
            add_traffic(&mut gpu.pcie_bytes, w.bytes(GpmMetricId::PcieTxPerSec), w.bytes(GpmMetricId::PcieRxPerSec));
            add_traffic(&mut gpu.nvlink_bytes, w.bytes(GpmMetricId::NvlinkTotalTxPerSec), w.bytes(GpmMetricId::NvlinkTotalRxPerSec));
        }
        // GPM measures a GPU instance: one sample per instance, for its one MIG device. An
        // instance split into several compute instances is left out (its activity is not any
        // one device's).
        let mut per_instance: HashMap<u32, Vec<usize>> = HashMap::new();
        for (k, mig) in gpu.migs.iter().enumerate() {
            if let Some(gi) = mig.gpu_instance {
                per_instance.entry(gi).or_default().push(k + 1);
            }
        }
        for (gi, rows) in per_instance.into_iter().filter(|(_, rows)| rows.len() == 1) {
            if let Some(w) = gpm_window(calls, gpu, Some(gi), longest)? {
                let m = &mut readings[rows[0]];
                w.fill(m);
                m.set(GpuGauge::Utilization, w.ratio(GpmMetricId::GraphicsUtil));
            }
        }
        if calls.unsupported.contains(&("gpm_sample", gpu.index)) || calls.unsupported.contains(&("gpm_metrics_get", gpu.index)) {
            tracing::info!(
                gpu = gpu.index,
                "GPM sampling refused on this GPU: profiling metrics off for it, PCIe from the throughput sensor"
            );
            gpu.gpm = false;
            gpu.gpm_samples.clear();
        }
    } else {
        let Some(d) = &gpu.device else { return Err(Lost) };
        // The sensor gives the rate of the last 20 ms, and reading it may take that long: one
        // direction per poll, in turn, each estimated as its rate times the time since that
        // direction was last read.
        let direction = (gpu.polls % 2) as usize;
        let counter = if direction == 0 { PcieUtilCounter::Send } else { PcieUtilCounter::Receive };
        let kb = calls.call("pcie_throughput", gpu.index, || d.pcie_throughput(counter))?;
        let now = Instant::now();
        let seconds = gpu.pcie_read_at[direction].map_or(0.0, |at| now.duration_since(at).as_secs_f64());
        gpu.pcie_read_at[direction] = Some(now);
        let bytes = kb.map(|kb| f64::from(kb) * KIB * if seconds > longest.as_secs_f64() * 2.0 { 0.0 } else { seconds });
        let (tx, rx) = if direction == 0 { (bytes, None) } else { (None, bytes) };
        add_traffic(&mut gpu.pcie_bytes, tx, rx);
    }
    readings[0].pcie_bytes = gpu.pcie_bytes;
    readings[0].nvlink_bytes = gpu.nvlink_bytes;
    Ok(())
}
