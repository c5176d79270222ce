//! One NVML poll as plain data: what the NVML thread hands to the attribution step. Nothing
//! here refers to the driver, so the rest of the GPU path is testable without one.

use crate::identity::cgroup::ContainerCgroup;

/// A GPU or a MIG instance of one, as the `gpu`, `uuid`, `model` (and MIG) labels name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GpuId {
    /// NVML index of the physical GPU.
    pub index: u32,
    /// `GPU-…`, or `MIG-…` for a MIG instance.
    pub uuid: String,
    /// Product name of the physical GPU.
    pub model: String,
    /// Set for a MIG instance.
    pub mig: Option<MigId>,
    /// The physical GPU's minor number (`/dev/nvidiaN`), which DRA device names use.
    pub minor: Option<u32>,
}

/// Which MIG instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MigId {
    /// Profile, e.g. `1g.10gb`.
    pub profile: String,
    /// GPU instance id.
    pub gpu_instance: u32,
    /// UUID of the physical GPU.
    pub parent_uuid: String,
    /// GPU instance profile id and placement start, which DRA device names use.
    pub placement: Option<(u32, u32)>,
}

/// The per-GPU gauges, in the order they are exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuGauge {
    /// `nodelens_gpu_utilization_ratio`.
    Utilization,
    /// `nodelens_gpu_memory_utilization_ratio`.
    MemoryUtilization,
    /// `nodelens_gpu_memory_used_bytes`.
    MemoryUsed,
    /// `nodelens_gpu_memory_total_bytes`.
    MemoryTotal,
    /// `nodelens_gpu_temperature_celsius`.
    Temperature,
    /// `nodelens_gpu_power_watts`.
    Power,
    /// `nodelens_gpu_power_limit_watts`.
    PowerLimit,
    /// `nodelens_gpu_sm_clock_hertz`.
    SmClock,
    /// `nodelens_gpu_sm_active_ratio` (GPM).
    SmActive,
    /// `nodelens_gpu_sm_occupancy_ratio` (GPM).
    SmOccupancy,
    /// `nodelens_gpu_tensor_active_ratio` (GPM).
    TensorActive,
    /// `nodelens_gpu_dram_active_ratio` (GPM).
    DramActive,
    /// `nodelens_gpu_fp64_active_ratio` (GPM).
    Fp64Active,
    /// `nodelens_gpu_fp32_active_ratio` (GPM).
    Fp32Active,
    /// `nodelens_gpu_fp16_active_ratio` (GPM).
    Fp16Active,
    /// `nodelens_gpu_memory_temperature_celsius` (HBM, field `NVML_FI_DEV_MEMORY_TEMP`).
    MemoryTemperature,
    /// `nodelens_gpu_memory_temperature_limit_celsius` (`NVML_TEMPERATURE_THRESHOLD_MEM_MAX`).
    MemoryTemperatureLimit,
    /// `nodelens_gpu_memory_clock_hertz`.
    MemoryClock,
    /// `nodelens_gpu_encoder_utilization_ratio`.
    EncoderUtilization,
    /// `nodelens_gpu_decoder_utilization_ratio`.
    DecoderUtilization,
    /// `nodelens_gpu_nvlink_links_active`.
    NvlinkLinksActive,
    /// `nodelens_gpu_retired_pages_pending` (GPUs before row remapping).
    RetiredPagesPending,
    /// `nodelens_gpu_fabric_healthy` (NVSwitch systems).
    FabricHealthy,
}

/// Number of [`GpuGauge`]s.
pub const GAUGES: usize = GpuGauge::ALL.len();

impl GpuGauge {
    /// Every gauge.
    pub const ALL: [GpuGauge; 23] = [
        GpuGauge::Utilization,
        GpuGauge::MemoryUtilization,
        GpuGauge::MemoryUsed,
        GpuGauge::MemoryTotal,
        GpuGauge::Temperature,
        GpuGauge::Power,
        GpuGauge::PowerLimit,
        GpuGauge::SmClock,
        GpuGauge::SmActive,
        GpuGauge::SmOccupancy,
        GpuGauge::TensorActive,
        GpuGauge::DramActive,
        GpuGauge::Fp64Active,
        GpuGauge::Fp32Active,
        GpuGauge::Fp16Active,
        GpuGauge::MemoryTemperature,
        GpuGauge::MemoryTemperatureLimit,
        GpuGauge::MemoryClock,
        GpuGauge::EncoderUtilization,
        GpuGauge::DecoderUtilization,
        GpuGauge::NvlinkLinksActive,
        GpuGauge::RetiredPagesPending,
        GpuGauge::FabricHealthy,
    ];

    /// Metric name without the `nodelens_` prefix, and help text.
    pub fn describe(self) -> (&'static str, &'static str) {
        match self {
            GpuGauge::Utilization => (
                "gpu_utilization_ratio",
                "Fraction of the last sample period in which a kernel ran on the GPU (for a MIG instance: GPM graphics activity)",
            ),
            GpuGauge::MemoryUtilization => {
                ("gpu_memory_utilization_ratio", "Fraction of the last sample period in which device memory was read or written")
            }
            GpuGauge::MemoryUsed => ("gpu_memory_used_bytes", "Device memory in use"),
            GpuGauge::MemoryTotal => ("gpu_memory_total_bytes", "Device memory installed (for a MIG instance: its share)"),
            GpuGauge::Temperature => ("gpu_temperature_celsius", "GPU core temperature"),
            GpuGauge::Power => ("gpu_power_watts", "Power drawn by the board"),
            GpuGauge::PowerLimit => ("gpu_power_limit_watts", "Power limit the driver enforces"),
            GpuGauge::SmClock => ("gpu_sm_clock_hertz", "Current SM clock"),
            GpuGauge::SmActive => (
                "gpu_sm_active_ratio",
                "Fraction of SMs busy (at least one warp resident), averaged over the poll interval; unlike utilization, a kernel on one SM of 132 reads 0.008",
            ),
            GpuGauge::SmOccupancy => ("gpu_sm_occupancy_ratio", "Resident warps against the SMs' maximum, averaged over the poll interval"),
            GpuGauge::TensorActive => ("gpu_tensor_active_ratio", "Fraction of time the SMs ran tensor-core instructions (any precision)"),
            GpuGauge::DramActive => ("gpu_dram_active_ratio", "Device memory bandwidth used against its peak"),
            GpuGauge::Fp64Active => ("gpu_fp64_active_ratio", "Fraction of time the SMs ran non-tensor FP64 instructions"),
            GpuGauge::Fp32Active => ("gpu_fp32_active_ratio", "Fraction of time the SMs ran non-tensor FP32 instructions"),
            GpuGauge::Fp16Active => ("gpu_fp16_active_ratio", "Fraction of time the SMs ran non-tensor FP16 instructions"),
            GpuGauge::MemoryTemperature => ("gpu_memory_temperature_celsius", "Device memory (HBM) temperature"),
            GpuGauge::MemoryTemperatureLimit => {
                ("gpu_memory_temperature_limit_celsius", "Highest device memory temperature the GPU is specified to run at")
            }
            GpuGauge::MemoryClock => ("gpu_memory_clock_hertz", "Current memory clock"),
            GpuGauge::EncoderUtilization => {
                ("gpu_encoder_utilization_ratio", "Fraction of the driver's last sample period in which the video encoder ran")
            }
            GpuGauge::DecoderUtilization => {
                ("gpu_decoder_utilization_ratio", "Fraction of the driver's last sample period in which the video decoder ran")
            }
            GpuGauge::NvlinkLinksActive => ("gpu_nvlink_links_active", "NVLink links of the GPU that are up"),
            GpuGauge::RetiredPagesPending => (
                "gpu_retired_pages_pending",
                "1 while a retired device memory page waits for a GPU reset to leave use (GPUs before row remapping)",
            ),
            GpuGauge::FabricHealthy => (
                "gpu_fabric_healthy",
                "1 while the GPU's NVSwitch fabric probe completed with success and reports no degraded bandwidth or unhealthy route",
            ),
        }
    }
}

/// Everything read from one GPU (or MIG instance) in one poll. `None` = not available: not
/// supported by the device, missing from the driver, or the call failed.
#[derive(Debug, Clone)]
pub struct GpuReading {
    /// Which GPU.
    pub id: GpuId,
    /// False when NVML reports the GPU lost (fallen off the bus).
    pub up: bool,
    /// Gauges, indexed like [`GpuGauge::ALL`].
    pub gauges: [Option<f64>; GAUGES],
    /// Energy since the driver loaded, joules.
    pub energy_joules: Option<f64>,
    /// `nvmlClocksThrottleReason*` bits.
    pub throttle_reasons: Option<u64>,
    /// Volatile ECC error counts: (corrected, uncorrected).
    pub ecc: (Option<u64>, Option<u64>),
    /// Critical XID events counted since the agent started: (xid, count).
    pub xids: Vec<(u64, u64)>,
    /// PCIe bytes since the agent started: (transmitted, received).
    pub pcie_bytes: Option<(f64, f64)>,
    /// NVLink bytes since the agent started, all links: (transmitted, received).
    pub nvlink_bytes: Option<(f64, f64)>,
    /// Row remapping state (Ampere and newer).
    pub remapped_rows: Option<RemappedRows>,
    /// The error and violation counters of the second tier.
    pub health: HealthCounters,
}

/// NVLink error counters, in the order of [`HealthCounters::nvlink_errors`] (the `type` label).
pub const NVLINK_ERROR_TYPES: [&str; 4] = ["crc_flit", "crc_data", "replay", "recovery"];

/// Why the clocks were held down, in the order of [`HealthCounters::violation_seconds`] (the
/// `reason` label).
pub const VIOLATION_REASONS: [&str; 6] = ["power", "thermal", "sync_boost", "board_limit", "low_utilization", "reliability"];

/// Why pages were retired, in the order of [`HealthCounters::retired_pages`] (the `cause` label).
pub const RETIREMENT_CAUSES: [&str; 2] = ["single_bit", "double_bit"];

/// Counters the driver keeps since it loaded. `None` = not available on this GPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthCounters {
    /// PCIe replays (link-level retransmissions).
    pub pcie_replays: Option<u64>,
    /// NVLink errors summed over the GPU's links, by [`NVLINK_ERROR_TYPES`].
    pub nvlink_errors: [Option<u64>; 4],
    /// Seconds the clocks were held down, by [`VIOLATION_REASONS`].
    pub violation_seconds: [Option<f64>; 6],
    /// Retired device memory pages, by [`RETIREMENT_CAUSES`].
    pub retired_pages: [Option<u64>; 2],
}

/// `nvmlDeviceGetRemappedRows`: rows of device memory replaced by spares after ECC errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemappedRows {
    /// Rows remapped after correctable errors.
    pub correctable: u32,
    /// Rows remapped after uncorrectable errors.
    pub uncorrectable: u32,
    /// A remap waits for the next GPU reset to take effect.
    pub pending: bool,
    /// A remap failed: no spare row was left, the GPU needs service.
    pub failed: bool,
}

impl GpuReading {
    /// A reading with nothing read yet.
    pub fn new(id: GpuId, up: bool) -> GpuReading {
        GpuReading {
            id,
            up,
            gauges: [None; GAUGES],
            energy_joules: None,
            throttle_reasons: None,
            ecc: (None, None),
            xids: Vec::new(),
            pcie_bytes: None,
            nvlink_bytes: None,
            remapped_rows: None,
            health: HealthCounters::default(),
        }
    }

    /// Sets one gauge.
    pub fn set(&mut self, gauge: GpuGauge, value: Option<f64>) {
        self.gauges[gauge as usize] = value;
    }

    /// One gauge.
    pub fn get(&self, gauge: GpuGauge) -> Option<f64> {
        self.gauges[gauge as usize]
    }
}

/// A process's use of one GPU (or MIG instance).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessUse {
    /// UUID of the device it runs on (the MIG instance's under MIG).
    pub uuid: String,
    /// Host PID.
    pub pid: u32,
    /// Its container; `None` for processes outside Kubernetes pods.
    pub container: Option<ContainerCgroup>,
    /// Device memory it holds.
    pub memory_bytes: Option<u64>,
    /// The process's share of the SMs over the poll window, 0..1: its samples' SM
    /// utilization weighted by the time each covers, divided by the window (a process that ran
    /// 1 s of 5 at 90 % is 0.18). `None` where the driver does not sample per process (MIG).
    pub sm_ratio: Option<f64>,
}

/// One poll of every GPU.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// `nvmlSystemGetDriverVersion`.
    pub driver_version: String,
    /// Physical GPUs, then their MIG instances.
    pub gpus: Vec<GpuReading>,
    /// Processes on GPUs.
    pub processes: Vec<ProcessUse>,
    /// Failed NVML calls since the agent started, by call: (call, count).
    pub errors: Vec<(&'static str, u64)>,
    /// UUIDs of the GPUs whose per-process utilization was read: a process missing from
    /// their samples was idle.
    pub sampled: Vec<String>,
}
