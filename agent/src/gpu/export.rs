//! The GPU series on `/metrics`, encoded at scrape time from the last published [`GpuView`]:
//! a scrape never waits for the driver, and a GPU or container missing from the view has no
//! series, so nothing stale lingers.

use std::fmt;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::reading::{GpuGauge, GpuReading, NVLINK_ERROR_TYPES, RETIREMENT_CAUSES, VIOLATION_REASONS};
use super::unattributed::{Unattributed, REASONS};

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

/// XIDs that point at the GPU, its memory or its links rather than at the application
/// (NVIDIA's XID catalogue): `kind="hardware"` of `nodelens_gpu_xid_events_total`, and the
/// alert GpuCriticalXidError.
pub const HARDWARE_XIDS: [u64; 13] = [48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140];

/// One GPU or MIG instance with its labels (`gpu, uuid, model`, and `mig_profile,
/// gpu_instance` for a MIG instance).
#[derive(Debug, Clone)]
pub struct GpuRow {
    /// Identity labels.
    pub labels: Labels,
    /// What was read.
    pub reading: GpuReading,
}

/// One (GPU, container) pair (`gpu, uuid, namespace, pod, container, app, user`).
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerRow {
    /// Identity labels.
    pub labels: Labels,
    /// The kubelet allocated the GPU (or a share of it) to the container.
    pub allocated: bool,
    /// Sum of the container's processes' SM utilization on the GPU, 0..1.
    pub utilization: Option<f64>,
    /// Device memory the container's processes hold on the GPU.
    pub memory_bytes: Option<f64>,
    /// Device memory HAMi granted the container on the GPU.
    pub granted_memory_bytes: Option<f64>,
    /// Share of the GPU's SMs HAMi granted the container, 0..1.
    pub granted_cores_ratio: Option<f64>,
}

/// Everything the GPU collector exports.
#[derive(Debug, Clone, Default)]
pub struct GpuView {
    /// The driver's version.
    pub driver_version: String,
    /// GPUs and MIG instances.
    pub gpus: Vec<GpuRow>,
    /// Per-container attribution.
    pub containers: Vec<ContainerRow>,
    /// Use no container holding the GPU accounts for, per physical GPU.
    pub unattributed: Vec<Unattributed>,
    /// Failed NVML calls by function.
    pub nvml_errors: Vec<(&'static str, u64)>,
    /// Failed pod-resources List calls.
    pub pod_resources_errors: u64,
    /// The pod store had its first lists (pods, and namespaces where watched, or waited for
    /// them `metadata_wait`) when this view was composed; always false without the API.
    /// Before them, a process of a pod not yet known is named from the kubelet's directories
    /// (no user, often no container name), so an allocated container's processes may not be
    /// found and it reads idle.
    pub pods_synced: bool,
}

/// Throttle reason bits of `nvmlClocksThrottleReason*` and their `reason` label.
const THROTTLE_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// Every name the collector can export, as series are named.
pub const NAMES: &[&str] = &[
    "nodelens_gpu_info",
    "nodelens_gpu_up",
    "nodelens_gpu_utilization_ratio",
    "nodelens_gpu_memory_utilization_ratio",
    "nodelens_gpu_memory_used_bytes",
    "nodelens_gpu_memory_total_bytes",
    "nodelens_gpu_temperature_celsius",
    "nodelens_gpu_power_watts",
    "nodelens_gpu_power_limit_watts",
    "nodelens_gpu_sm_clock_hertz",
    "nodelens_gpu_sm_active_ratio",
    "nodelens_gpu_sm_occupancy_ratio",
    "nodelens_gpu_tensor_active_ratio",
    "nodelens_gpu_dram_active_ratio",
    "nodelens_gpu_fp64_active_ratio",
    "nodelens_gpu_fp32_active_ratio",
    "nodelens_gpu_fp16_active_ratio",
    "nodelens_gpu_memory_temperature_celsius",
    "nodelens_gpu_memory_temperature_limit_celsius",
    "nodelens_gpu_memory_clock_hertz",
    "nodelens_gpu_encoder_utilization_ratio",
    "nodelens_gpu_decoder_utilization_ratio",
    "nodelens_gpu_nvlink_links_active",
    "nodelens_gpu_retired_pages_pending",
    "nodelens_gpu_fabric_healthy",
    "nodelens_gpu_pcie_replays_total",
    "nodelens_gpu_nvlink_errors_total",
    "nodelens_gpu_violation_seconds_total",
    "nodelens_gpu_retired_pages_total",
    "nodelens_gpu_pcie_bytes_total",
    "nodelens_gpu_nvlink_bytes_total",
    "nodelens_gpu_remapped_rows_total",
    "nodelens_gpu_row_remap_pending",
    "nodelens_gpu_row_remap_failed",
    "nodelens_gpu_energy_joules_total",
    "nodelens_gpu_throttled",
    "nodelens_gpu_ecc_errors_total",
    "nodelens_gpu_xid_errors_total",
    "nodelens_gpu_xid_events_total",
    "nodelens_gpu_allocated",
    "nodelens_container_gpu_utilization_ratio",
    "nodelens_container_gpu_memory_used_bytes",
    "nodelens_container_gpu_memory_granted_bytes",
    "nodelens_container_gpu_cores_granted_ratio",
    "nodelens_gpu_unattributed_memory_bytes",
    "nodelens_gpu_unattributed_sm_ratio",
    "nodelens_gpu_nvml_errors_total",
    "nodelens_gpu_pod_resources_errors_total",
];

/// The published view, shared between the collector task and the registry.
#[derive(Clone, Default)]
pub struct GpuExport(Arc<Mutex<Arc<GpuView>>>);

impl fmt::Debug for GpuExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuExport").field("gpus", &self.view().gpus.len()).finish()
    }
}

impl GpuExport {
    /// Replaces the view scrapes encode.
    pub fn publish(&self, view: GpuView) {
        *self.0.lock().unwrap() = Arc::new(view);
    }

    /// The current view.
    pub fn view(&self) -> Arc<GpuView> {
        self.0.lock().unwrap().clone()
    }
}

/// Encodes one family: a descriptor, then one series per row that has a value.
fn family<'a, L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl Iterator<Item = (L, M)>,
) -> fmt::Result
where
    L: prometheus_client::encoding::EncodeLabelSet + 'a,
    M: EncodeMetric,
{
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for GpuExport {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let view = self.view();
        let gpus = &view.gpus;
        let driver = [("driver_version", view.driver_version.as_str())];
        let up = |g: &&GpuRow| g.reading.up;
        family(
            &mut encoder,
            "gpu_info",
            "1 for every GPU and MIG instance, with its driver version",
            MetricType::Gauge,
            gpus.iter().map(|g| ((g.labels.as_slice(), driver), ConstGauge::new(1i64))),
        )?;
        family(
            &mut encoder,
            "gpu_up",
            "1 while NVML can read the GPU, 0 when it reports the GPU lost",
            MetricType::Gauge,
            gpus.iter().map(|g| (g.labels.as_slice(), ConstGauge::new(i64::from(g.reading.up)))),
        )?;
        for gauge in GpuGauge::ALL {
            let (name, help) = gauge.describe();
            let series = gpus.iter().filter_map(|g| g.reading.get(gauge).map(|v| (g.labels.as_slice(), ConstGauge::new(v))));
            family(&mut encoder, name, help, MetricType::Gauge, series)?;
        }
        let energy = gpus.iter().filter(up).filter_map(|g| g.reading.energy_joules.map(|j| (g.labels.as_slice(), ConstCounter::new(j))));
        family(&mut encoder, "gpu_energy_joules", "Energy consumed since the driver loaded", MetricType::Counter, energy)?;
        let throttled = gpus.iter().filter_map(|g| g.reading.throttle_reasons.map(|bits| (g, bits))).flat_map(|(g, bits)| {
            THROTTLE_REASONS
                .iter()
                .map(move |(bit, reason)| ((g.labels.as_slice(), [("reason", *reason)]), ConstGauge::new(i64::from(bits & bit != 0))))
        });
        family(&mut encoder, "gpu_throttled", "1 while clocks are held down for the reason", MetricType::Gauge, throttled)?;
        let ecc = gpus.iter().flat_map(|g| {
            [("corrected", g.reading.ecc.0), ("uncorrected", g.reading.ecc.1)]
                .into_iter()
                .filter_map(move |(kind, n)| n.map(|n| ((g.labels.as_slice(), [("type", kind)]), ConstCounter::new(n))))
        });
        family(&mut encoder, "gpu_ecc_errors", "ECC errors since the driver loaded (volatile counters)", MetricType::Counter, ecc)?;
        let xids = gpus.iter().flat_map(|g| {
            g.reading.xids.iter().map(move |(xid, n)| ((g.labels.as_slice(), [("xid", xid.to_string())]), ConstCounter::new(*n)))
        });
        family(&mut encoder, "gpu_xid_errors", "Critical XID error events since the agent started, by XID", MetricType::Counter, xids)?;
        // Per physical GPU and kind, from 0 at the agent's start: increase() sees a GPU's first
        // XID, which the per-XID series (appearing with the value 1) hides.
        let xid_events = gpus.iter().filter(|g| g.reading.id.mig.is_none()).flat_map(|g| {
            let hardware: u64 = g.reading.xids.iter().filter(|(xid, _)| HARDWARE_XIDS.contains(xid)).map(|(_, n)| n).sum();
            let all: u64 = g.reading.xids.iter().map(|(_, n)| n).sum();
            [("hardware", hardware), ("application", all - hardware)]
                .map(|(kind, n)| ((g.labels.as_slice(), [("kind", kind)]), ConstCounter::new(n)))
        });
        family(
            &mut encoder,
            "gpu_xid_events",
            "Critical XID error events since the agent started, by kind (hardware: XIDs that point at the GPU, its memory or links)",
            MetricType::Counter,
            xid_events,
        )?;
        let traffic = |pick: fn(&GpuReading) -> Option<(f64, f64)>| {
            gpus.iter().filter(up).filter_map(move |g| pick(&g.reading).map(|t| (g, t))).flat_map(|(g, (tx, rx))| {
                [("tx", tx), ("rx", rx)]
                    .map(|(direction, bytes)| ((g.labels.as_slice(), [("direction", direction)]), ConstCounter::new(bytes)))
            })
        };
        family(
            &mut encoder,
            "gpu_pcie_bytes",
            "PCIe bytes since the agent started (GPM; on GPUs without it, estimated from the throughput sensor)",
            MetricType::Counter,
            traffic(|r| r.pcie_bytes),
        )?;
        family(
            &mut encoder,
            "gpu_nvlink_bytes",
            "NVLink bytes since the agent started, all links (GPM)",
            MetricType::Counter,
            traffic(|r| r.nvlink_bytes),
        )?;
        let rows = || gpus.iter().filter_map(|g| g.reading.remapped_rows.map(|r| (g, r)));
        let remapped = rows().flat_map(|(g, r)| {
            [("correctable", r.correctable), ("uncorrectable", r.uncorrectable)]
                .map(|(cause, n)| ((g.labels.as_slice(), [("cause", cause)]), ConstCounter::new(u64::from(n))))
        });
        family(
            &mut encoder,
            "gpu_remapped_rows",
            "Device memory rows replaced by spare rows after ECC errors, by cause",
            MetricType::Counter,
            remapped,
        )?;
        family(
            &mut encoder,
            "gpu_row_remap_pending",
            "1 while a row remap waits for a GPU reset to take effect",
            MetricType::Gauge,
            rows().map(|(g, r)| (g.labels.as_slice(), ConstGauge::new(i64::from(r.pending)))),
        )?;
        family(
            &mut encoder,
            "gpu_row_remap_failed",
            "1 when a row remap failed (no spare row left): the GPU needs service",
            MetricType::Gauge,
            rows().map(|(g, r)| (g.labels.as_slice(), ConstGauge::new(i64::from(r.failed)))),
        )?;
        let replays =
            gpus.iter().filter(up).filter_map(|g| g.reading.health.pcie_replays.map(|n| (g.labels.as_slice(), ConstCounter::new(n))));
        family(
            &mut encoder,
            "gpu_pcie_replays",
            "PCIe replays (link-level retransmissions) since the driver loaded",
            MetricType::Counter,
            replays,
        )?;
        let by = |pick: fn(&GpuReading) -> &[Option<u64>], label: &'static str, values: &'static [&'static str]| {
            gpus.iter().filter(up).flat_map(move |g| {
                pick(&g.reading)
                    .iter()
                    .zip(values)
                    .filter_map(move |(n, v)| n.map(|n| ((g.labels.as_slice(), [(label, *v)]), ConstCounter::new(n))))
            })
        };
        family(
            &mut encoder,
            "gpu_nvlink_errors",
            "NVLink errors since the driver loaded, summed over the GPU's links, by type",
            MetricType::Counter,
            by(|r| &r.health.nvlink_errors, "type", &NVLINK_ERROR_TYPES),
        )?;
        let violations = gpus.iter().filter(up).flat_map(|g| {
            g.reading
                .health
                .violation_seconds
                .iter()
                .zip(VIOLATION_REASONS)
                .filter_map(move |(s, reason)| s.map(|s| ((g.labels.as_slice(), [("reason", reason)]), ConstCounter::new(s))))
        });
        family(
            &mut encoder,
            "gpu_violation_seconds",
            "Time the clocks were held below what was asked, since the driver loaded, by reason",
            MetricType::Counter,
            violations,
        )?;
        family(
            &mut encoder,
            "gpu_retired_pages",
            "Device memory pages retired after ECC errors, by cause (GPUs before row remapping)",
            MetricType::Counter,
            by(|r| &r.health.retired_pages, "cause", &RETIREMENT_CAUSES),
        )?;

        let containers = &view.containers;
        let allocated = containers.iter().filter(|c| c.allocated).map(|c| (c.labels.as_slice(), ConstGauge::new(1i64)));
        family(
            &mut encoder,
            "gpu_allocated",
            "1 while the kubelet has allocated the GPU, or a share of it, to the container",
            MetricType::Gauge,
            allocated,
        )?;
        let utilization = containers.iter().filter_map(|c| c.utilization.map(|u| (c.labels.as_slice(), ConstGauge::new(u))));
        family(
            &mut encoder,
            "container_gpu_utilization_ratio",
            "SM utilization of the container's processes on the GPU since the last poll",
            MetricType::Gauge,
            utilization,
        )?;
        let memory = containers.iter().filter_map(|c| c.memory_bytes.map(|m| (c.labels.as_slice(), ConstGauge::new(m))));
        family(
            &mut encoder,
            "container_gpu_memory_used_bytes",
            "Device memory the container's processes hold on the GPU",
            MetricType::Gauge,
            memory,
        )?;
        let granted = containers.iter().filter_map(|c| c.granted_memory_bytes.map(|m| (c.labels.as_slice(), ConstGauge::new(m))));
        family(
            &mut encoder,
            "container_gpu_memory_granted_bytes",
            "Device memory HAMi granted the container on the GPU (its limiter fails allocations beyond it)",
            MetricType::Gauge,
            granted,
        )?;
        let cores = containers.iter().filter_map(|c| c.granted_cores_ratio.map(|r| (c.labels.as_slice(), ConstGauge::new(r))));
        family(
            &mut encoder,
            "container_gpu_cores_granted_ratio",
            "Share of the GPU's SMs HAMi granted the container (0: none reserved, not capped)",
            MetricType::Gauge,
            cores,
        )?;

        let unattributed = |pick: fn(&Unattributed) -> &[f64; 3]| {
            view.unattributed.iter().flat_map(move |u| {
                let labels: Labels = vec![("gpu", u.gpu.index.to_string()), ("uuid", u.gpu.uuid.clone())];
                let known = u.allocations_known;
                pick(u)
                    .iter()
                    .zip(REASONS)
                    .filter(move |(_, reason)| known || *reason != "unallocated")
                    .map(move |(v, reason)| ((labels.clone(), [("reason", reason)]), ConstGauge::new(*v)))
            })
        };
        family(
            &mut encoder,
            "gpu_unattributed_memory_bytes",
            "Device memory held by processes no container holding the GPU accounts for, by reason (host, unallocated, pod_gone)",
            MetricType::Gauge,
            unattributed(|u| &u.memory_bytes),
        )?;
        family(
            &mut encoder,
            "gpu_unattributed_sm_ratio",
            "SM share of processes no container holding the GPU accounts for since the last poll, by reason",
            MetricType::Gauge,
            unattributed(|u| &u.sm_ratio),
        )?;

        let nvml_errors = view.nvml_errors.iter().map(|(function, n)| ([("function", *function)], ConstCounter::new(*n)));
        family(&mut encoder, "gpu_nvml_errors", "NVML calls that failed, by function", MetricType::Counter, nvml_errors)?;
        let no_labels: [(&str, &str); 0] = [];
        let pod_resources = (!gpus.is_empty()).then_some((no_labels, ConstCounter::new(view.pod_resources_errors)));
        family(
            &mut encoder,
            "gpu_pod_resources_errors",
            "Failed calls to the kubelet's pod-resources API",
            MetricType::Counter,
            pod_resources.into_iter(),
        )
    }
}
