//! What the benchmarks read off the machine: whether this build runs a backend, the
//! GPU for the report header, device memory around a model run, and the process's
//! resident set.

use hiprune::Result;
#[cfg(feature = "cuda")]
use hiprune::backend::cuda::{CudaDevice, DeviceInfo};
use serde::{Deserialize, Serialize};

use crate::forward::BackendChoice;
use crate::report::GpuInfo;

/// [`hiprune::Error::Unsupported`] unless this build can run `backend`.
pub fn check_backend(backend: BackendChoice) -> Result<()> {
    match backend {
        BackendChoice::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        BackendChoice::Cuda => Ok(()),
        #[cfg(not(feature = "cuda"))]
        BackendChoice::Cuda => Err(hiprune::Error::Unsupported {
            what:
                "--backend cuda: this hiprune was built without CUDA support (cargo feature `cuda`)"
                    .to_string(),
        }),
    }
}

/// Name of a backend in reports.
pub fn backend_name(backend: BackendChoice) -> &'static str {
    match backend {
        BackendChoice::Cpu => "cpu",
        BackendChoice::Cuda => "cuda",
    }
}

/// The card, driver and CUDA version for the report header; `None` on the CPU.
pub fn gpu_info(backend: BackendChoice) -> Option<GpuInfo> {
    match backend {
        BackendChoice::Cpu => None,
        BackendChoice::Cuda => cuda_device_info(),
    }
}

/// The card name, capability, memory, driver and runtime versions and clocks of CUDA
/// device 0 (`None` without a device or in a build without CUDA).
fn cuda_device_info() -> Option<GpuInfo> {
    #[cfg(feature = "cuda")]
    {
        device_info()
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

#[cfg(feature = "cuda")]
/// The card, driver, runtime and clocks for the report header; `None` when no device
/// can be opened (the benchmark itself then reports why).
fn device_info() -> Option<GpuInfo> {
    CudaDevice::new(0).ok().map(|d| gpu_info_of(&d.info()))
}

#[cfg(feature = "cuda")]
/// [`GpuInfo`] from what the driver told; unreadable fields say `unknown` or are
/// left out.
fn gpu_info_of(info: &DeviceInfo) -> GpuInfo {
    let version = |v: Option<(u32, u32)>| v.map(|(a, b)| format!("{a}.{b}"));
    let driver = match (&info.driver_release, version(info.driver_cuda_version)) {
        (Some(r), Some(v)) => format!("{r} (CUDA {v})"),
        (Some(r), None) => r.clone(),
        (None, Some(v)) => format!("CUDA {v}"),
        (None, None) => "unknown".to_string(),
    };
    let mut clocks = Vec::new();
    if let Some(khz) = info.sm_clock_khz {
        clocks.push(format!("SM {} MHz", khz / 1000));
    }
    if let Some(khz) = info.memory_clock_khz {
        clocks.push(format!("memory {} MHz", khz / 1000));
    }
    if let Some(bits) = info.memory_bus_bits {
        clocks.push(format!("{bits}-bit bus"));
    }
    let (major, minor) = info.compute_capability;
    GpuInfo {
        name: info.name.clone(),
        driver,
        cuda_version: version(info.runtime_version).unwrap_or_else(|| "unknown".into()),
        memory_bytes: info.total_memory,
        compute_capability: format!("{major}.{minor}"),
        multiprocessors: info.multiprocessors,
        clocks: (!clocks.is_empty()).then(|| clocks.join(", ")),
    }
}

/// Device memory of one model run on a GPU: the allocator's accounting (bytes the
/// backend asked for) and the driver's free-memory reading (all processes, with the
/// driver's rounding and the context's own memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMemory {
    /// Weight bytes on the device after loading.
    pub weights_bytes: u64,
    /// Peak bytes of activations and temporaries.
    pub scratch_peak_bytes: u64,
    /// Peak of weights + scratch together.
    pub peak_bytes: u64,
    /// Free device memory before loading.
    pub driver_free_before_bytes: u64,
    /// Free device memory after loading.
    pub driver_free_after_load_bytes: u64,
    /// Lowest free device memory seen after a step.
    pub driver_free_min_bytes: u64,
    /// `free before - lowest free`: what the run took from the device at its peak.
    pub driver_used_peak_bytes: u64,
}

/// Device memory readings around one model run (GPU backends); the CPU has none.
pub(crate) trait MemoryProbe {
    /// Called right before the model is loaded.
    fn before_load(&mut self) -> Result<()>;
    /// Called right after the model is loaded.
    fn after_load(&mut self) -> Result<()>;
    /// Called after each denoising step.
    fn after_step(&mut self);
    /// The figures of the run.
    fn finish(&self) -> Option<DeviceMemory>;
}

/// The CPU's [`MemoryProbe`]: nothing to read.
pub(crate) struct NoDeviceMemory;

impl MemoryProbe for NoDeviceMemory {
    fn before_load(&mut self) -> Result<()> {
        Ok(())
    }
    fn after_load(&mut self) -> Result<()> {
        Ok(())
    }
    fn after_step(&mut self) {}
    fn finish(&self) -> Option<DeviceMemory> {
        None
    }
}

/// The [`MemoryProbe`] of a CUDA device: the handle's memory ledger and the driver's
/// free memory. It must read the same `CudaDevice` handle (or a clone) the backend
/// allocates through, or the ledger stays empty.
#[cfg(feature = "cuda")]
pub(crate) struct CudaMemoryProbe {
    device: hiprune::backend::cuda::CudaDevice,
    free_before: u64,
    free_after_load: u64,
    free_min: u64,
    weights: u64,
}

#[cfg(feature = "cuda")]
impl CudaMemoryProbe {
    pub(crate) fn new(device: &CudaDevice) -> Result<Self> {
        let free = device.free_memory()?;
        Ok(CudaMemoryProbe {
            device: device.clone(),
            free_before: free,
            free_after_load: free,
            free_min: free,
            weights: 0,
        })
    }
}

#[cfg(feature = "cuda")]
impl MemoryProbe for CudaMemoryProbe {
    fn before_load(&mut self) -> Result<()> {
        self.free_before = self.device.free_memory()?;
        self.free_min = self.free_before;
        Ok(())
    }
    fn after_load(&mut self) -> Result<()> {
        self.device.synchronize()?;
        self.free_after_load = self.device.free_memory()?;
        self.free_min = self.free_min.min(self.free_after_load);
        self.weights = self.device.memory().weights.current;
        Ok(())
    }
    fn after_step(&mut self) {
        // A failed reading only loses one sample; the step itself reports errors.
        if let Ok(free) = self.device.free_memory() {
            self.free_min = self.free_min.min(free);
        }
    }
    fn finish(&self) -> Option<DeviceMemory> {
        let m = self.device.memory();
        Some(DeviceMemory {
            weights_bytes: self.weights,
            scratch_peak_bytes: m.scratch.peak,
            peak_bytes: m.total.peak,
            driver_free_before_bytes: self.free_before,
            driver_free_after_load_bytes: self.free_after_load,
            driver_free_min_bytes: self.free_min,
            driver_used_peak_bytes: self.free_before.saturating_sub(self.free_min),
        })
    }
}

/// A `/proc/self/status` field in bytes (0 where unreadable).
pub(crate) fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Reads one value per 4 KiB page of `bytes` so the pages are resident.
pub(crate) fn touch(bytes: &[u8]) -> u64 {
    bytes.iter().step_by(4096).map(|&b| b as u64).sum()
}
