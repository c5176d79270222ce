//! What the fake driver reports: a JSON file named by `FAKE_NVML_SCENARIO`, re-read
//! whenever it changes, so a test can make processes appear and exit, add utilization
//! samples, raise XID events or lose a GPU while the agent runs. Tests write it with
//! [`Scenario::write`] (a rename, so the library never reads half a file).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The environment variable naming the scenario file.
pub const SCENARIO_ENV: &str = "FAKE_NVML_SCENARIO";

/// The whole machine as NVML sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// `nvmlSystemGetDriverVersion`.
    pub driver_version: String,
    /// GPUs in NVML index order.
    pub gpus: Vec<Gpu>,
}

/// One physical GPU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gpu {
    /// `GPU-<uuid>`.
    pub uuid: String,
    /// Product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// `nvmlPciInfo_t.busId`, e.g. `00000000:3B:00.0`; empty = `00000000:<0x18 + index>:00.0`.
    pub pci_bus_id: String,
    /// Fallen off the bus: every call on it returns `NVML_ERROR_GPU_IS_LOST`.
    pub lost: bool,
    /// `nvmlDeviceGetMinorNumber` (the N of `/dev/nvidiaN`); `None` = its NVML index. The two
    /// differ on machines whose PCI order is not the driver's enumeration order.
    pub minor: Option<u32>,
    /// `nvmlDeviceGetUtilizationRates().gpu`, percent.
    pub utilization_percent: u32,
    /// `nvmlDeviceGetUtilizationRates().memory`, percent.
    pub memory_utilization_percent: u32,
    /// Framebuffer size.
    pub memory_total_bytes: u64,
    /// Framebuffer in use.
    pub memory_used_bytes: u64,
    /// Core temperature.
    pub temperature_celsius: u32,
    /// Power draw.
    pub power_milliwatts: u32,
    /// `nvmlDeviceGetPowerUsage` fails with `NVML_ERROR_UNKNOWN`, as it does on a board whose
    /// power sensor has faulted.
    pub power_read_fails: bool,
    /// Enforced power limit.
    pub power_limit_milliwatts: u32,
    /// Energy since the driver loaded.
    pub energy_millijoules: u64,
    /// SM clock.
    pub sm_clock_mhz: u32,
    /// `nvmlClocksThrottleReason*` bits.
    pub throttle_reasons: u64,
    /// Volatile corrected ECC errors; `None` = the board has no ECC (`NOT_SUPPORTED`).
    pub ecc_corrected: Option<u64>,
    /// Volatile uncorrected ECC errors.
    pub ecc_uncorrected: Option<u64>,
    /// Processes with a compute context.
    pub processes: Vec<Process>,
    /// MIG instances; MIG mode is on when there is at least one.
    pub mig: Vec<MigInstance>,
    /// MIG mode on without an instance (as before a DRA driver creates them for a claim, or
    /// after every instance was destroyed).
    pub mig_mode: bool,
    /// Critical XID events raised so far; each is delivered once per event set.
    pub xid_events: Vec<XidEvent>,
    /// GPM (Hopper and newer): what the performance counters measure right now. `None` = an
    /// older architecture: `nvmlGpmQueryDeviceSupport` says unsupported and sampling fails
    /// with `NOT_SUPPORTED`.
    pub gpm: Option<Gpm>,
    /// `nvmlDeviceGetPcieThroughput`, KB/s, as the legacy 20 ms sensor reports it.
    pub pcie_tx_kb_per_s: u32,
    /// `nvmlDeviceGetPcieThroughput` for received bytes, KB/s.
    pub pcie_rx_kb_per_s: u32,
    /// `nvmlDeviceGetRemappedRows`; `None` = before Ampere (`NOT_SUPPORTED`).
    pub remapped_rows: Option<RemappedRows>,
    /// Per-process utilization samples the driver keeps (a ring of the newest); 0 = 20.
    pub samples_kept: u64,
    /// The driver's per-process sample period, microseconds; 0 = 1/6 s.
    pub sample_period_us: u64,
    /// A read returns only each process's newest sample, whatever `lastSeenTimeStamp` asks
    /// (as an H200 on driver 580.159 does, with a 200 ms period).
    pub newest_sample_only: bool,
    /// `nvmlDeviceGetGpuInstanceById` answers `NO_PERMISSION`, as for an unprivileged caller.
    pub gpu_instances_denied: bool,
    /// Field `NVML_FI_DEV_MEMORY_TEMP` (HBM); `None` = the field answers `NOT_SUPPORTED`.
    pub memory_temperature_celsius: Option<u32>,
    /// `nvmlDeviceGetTemperatureThreshold(NVML_TEMPERATURE_THRESHOLD_MEM_MAX)`; `None` =
    /// `NOT_SUPPORTED`.
    pub memory_temperature_limit_celsius: Option<u32>,
    /// `nvmlDeviceGetClockInfo(NVML_CLOCK_MEM)`; `None` = `NOT_SUPPORTED`.
    pub memory_clock_mhz: Option<u32>,
    /// `nvmlDeviceGetEncoderUtilization`, percent; `None` = no encoder (`NOT_SUPPORTED`).
    pub encoder_percent: Option<u32>,
    /// `nvmlDeviceGetDecoderUtilization`, percent; `None` = no decoder (`NOT_SUPPORTED`).
    pub decoder_percent: Option<u32>,
    /// Field `NVML_FI_DEV_PCIE_REPLAY_COUNTER`; `None` = `NOT_SUPPORTED`.
    pub pcie_replays: Option<u64>,
    /// NVLink links (field `NVML_FI_DEV_NVLINK_LINK_COUNT` is their number); none = no NVLink:
    /// that field and the link calls answer `NOT_SUPPORTED`.
    pub nvlinks: Vec<NvLink>,
    /// `nvmlDeviceGetViolationStatus`, nanoseconds per policy; `None` = `NOT_SUPPORTED`.
    pub violations: Violations,
    /// Page retirement (before Ampere); `None` = `NOT_SUPPORTED`, as on GPUs that remap rows.
    pub retired_pages: Option<RetiredPages>,
    /// `nvmlDeviceGetGpuFabricInfoV`; `None` = no NVSwitch fabric (`NOT_SUPPORTED`).
    pub fabric: Option<Fabric>,
}

impl Gpu {
    /// Whether MIG mode is on: set, or implied by an instance.
    pub fn mig_enabled(&self) -> bool {
        self.mig_mode || !self.mig.is_empty()
    }
}

/// One NVLink link.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvLink {
    /// `nvmlDeviceGetNvLinkState`.
    pub active: bool,
    /// `nvmlDeviceGetNvLinkErrorCounter(NVML_NVLINK_ERROR_DL_CRC_FLIT)`; `None` = `NOT_SUPPORTED`.
    pub crc_flit: Option<u64>,
    /// `NVML_NVLINK_ERROR_DL_CRC_DATA`.
    pub crc_data: Option<u64>,
    /// `NVML_NVLINK_ERROR_DL_REPLAY`.
    pub replay: Option<u64>,
    /// `NVML_NVLINK_ERROR_DL_RECOVERY`.
    pub recovery: Option<u64>,
}

/// `nvmlViolationTime_t.violationTime` per `nvmlPerfPolicyType_t`, nanoseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Violations {
    /// `NVML_PERF_POLICY_POWER`.
    pub power: Option<u64>,
    /// `NVML_PERF_POLICY_THERMAL`.
    pub thermal: Option<u64>,
    /// `NVML_PERF_POLICY_SYNC_BOOST`.
    pub sync_boost: Option<u64>,
    /// `NVML_PERF_POLICY_BOARD_LIMIT`.
    pub board_limit: Option<u64>,
    /// `NVML_PERF_POLICY_LOW_UTILIZATION`.
    pub low_utilization: Option<u64>,
    /// `NVML_PERF_POLICY_RELIABILITY`.
    pub reliability: Option<u64>,
}

/// `nvmlDeviceGetRetiredPages` and `nvmlDeviceGetRetiredPagesPendingStatus`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetiredPages {
    /// Pages retired for multiple single-bit ECC errors.
    pub single_bit: u32,
    /// Pages retired for a double-bit ECC error.
    pub double_bit: u32,
    /// A retirement waits for the next GPU reset.
    pub pending: bool,
}

/// `nvmlGpuFabricInfo_v3_t`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fabric {
    /// `nvmlGpuFabricState_t`: 1 not started, 2 in progress, 3 completed.
    pub state: u8,
    /// The probe's `nvmlReturn_t` (0 = success).
    pub status: u32,
    /// `healthMask` (`NVML_GPU_FABRIC_HEALTH_MASK_*`).
    pub health_mask: u32,
    /// `healthSummary` (1 healthy, 2 unhealthy, 3 limited capacity).
    pub health_summary: u8,
    /// An older driver that knows only version 2 of the struct (no health summary).
    pub v2_only: bool,
}

/// The rates a GPU's (or MIG instance's) GPM counters advance at. Samples integrate them over
/// time, so `nvmlGpmMetricsGet` reports the time-weighted mean between two samples even when a
/// test changes them in between.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gpm {
    /// `NVML_GPM_METRIC_GRAPHICS_UTIL`, percent.
    pub graphics_percent: f64,
    /// `NVML_GPM_METRIC_SM_UTIL`, percent.
    pub sm_active_percent: f64,
    /// `NVML_GPM_METRIC_SM_OCCUPANCY`, percent.
    pub sm_occupancy_percent: f64,
    /// `NVML_GPM_METRIC_ANY_TENSOR_UTIL`, percent.
    pub tensor_active_percent: f64,
    /// `NVML_GPM_METRIC_DRAM_BW_UTIL`, percent.
    pub dram_active_percent: f64,
    /// `NVML_GPM_METRIC_FP64_UTIL`, percent.
    pub fp64_active_percent: f64,
    /// `NVML_GPM_METRIC_FP32_UTIL`, percent.
    pub fp32_active_percent: f64,
    /// `NVML_GPM_METRIC_FP16_UTIL`, percent.
    pub fp16_active_percent: f64,
    /// `NVML_GPM_METRIC_PCIE_TX_PER_SEC`, MiB/s (whole GPUs only).
    pub pcie_tx_mib_per_s: f64,
    /// `NVML_GPM_METRIC_PCIE_RX_PER_SEC`, MiB/s.
    pub pcie_rx_mib_per_s: f64,
    /// `NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC`, MiB/s (whole GPUs only).
    pub nvlink_tx_mib_per_s: f64,
    /// `NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC`, MiB/s.
    pub nvlink_rx_mib_per_s: f64,
}

/// `nvmlDeviceGetRemappedRows`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemappedRows {
    /// Rows remapped for correctable errors.
    pub correctable: u32,
    /// Rows remapped for uncorrectable errors.
    pub uncorrectable: u32,
    /// A remap waits for the next GPU reset.
    pub pending: bool,
    /// A remap failed: the GPU needs service.
    pub failed: bool,
}

/// A process with a compute context on a GPU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Process {
    /// Host PID.
    pub pid: u32,
    /// Framebuffer the process holds.
    pub used_memory_bytes: u64,
    /// The MIG GPU instance it runs in.
    pub gpu_instance: Option<u32>,
    /// SM utilization while it runs kernels, percent; 0 = idle, and an idle process has no
    /// utilization samples, as with the real driver.
    pub sm_percent: u32,
    /// Bursty work: the process runs kernels only in the first `burst_busy` of every
    /// `burst_cycle` driver sample periods (wall-clock aligned). 0 = always busy.
    pub burst_cycle: u64,
    /// Busy sample periods per cycle.
    pub burst_busy: u64,
}

/// A MIG device (GPU instance with its compute instance).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigInstance {
    /// `MIG-<uuid>`.
    pub uuid: String,
    /// Profile, e.g. `1g.10gb`; the device name is `<gpu name> MIG <profile>`.
    pub profile: String,
    /// GPU instance id.
    pub gpu_instance: u32,
    /// `nvmlGpuInstanceInfo_t.profileId`: the GPU instance profile (e.g. 19 for `1g.10gb` on
    /// an H100).
    pub profile_id: u32,
    /// `nvmlGpuInstanceInfo_t.placement`: first memory slice and slice count.
    pub placement_start: u32,
    pub placement_size: u32,
    /// The instance's memory.
    pub memory_total_bytes: u64,
    /// Memory in use in the instance.
    pub memory_used_bytes: u64,
    /// The instance's GPM counters (`nvmlGpmMigSampleGet`); needs GPM on the parent.
    pub gpm: Option<Gpm>,
}

/// A critical XID error event.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XidEvent {
    /// Unique per GPU; identifies the event so it is delivered once.
    pub id: u64,
    /// The XID.
    pub xid: u64,
}

impl Scenario {
    /// Writes the scenario atomically (temp file, rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("scenario serialises"))?;
        std::fs::rename(tmp, path)
    }
}
