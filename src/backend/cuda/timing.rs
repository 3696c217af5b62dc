//! Measuring on a CUDA device: what the device is ([`DeviceInfo`]), time on its stream
//! ([`StreamTimer`], CUDA events) and its device-to-device copy bandwidth
//! ([`measure_copy_bandwidth`]), the ceiling the memory-bound kernels are compared
//! with.

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaEvent, DevicePtr, DevicePtrMut};

use super::device::{CudaBuffer, CudaDevice, MemoryPurpose, driver_err};
use crate::error::{Error, Result};

// The CUDA runtime the kernels were linked with (build.rs links the static cudart).
unsafe extern "C" {
    fn cudaRuntimeGetVersion(runtime_version: *mut i32) -> i32;
}

/// A CUDA version number `1000 * major + 10 * minor` as `(major, minor)`.
fn split_version(v: i32) -> Option<(u32, u32)> {
    (v > 0).then_some(((v / 1000) as u32, ((v % 1000) / 10) as u32))
}

/// What a report says about the device. Every field the driver could not give is
/// `None`; reading them never fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's name.
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (u32, u32),
    /// Total device memory in bytes.
    pub total_memory: u64,
    /// Streaming multiprocessors.
    pub multiprocessors: Option<u32>,
    /// L2 cache bytes.
    pub l2_cache_bytes: Option<u64>,
    /// Peak SM clock in kHz.
    pub sm_clock_khz: Option<u32>,
    /// Peak memory clock in kHz.
    pub memory_clock_khz: Option<u32>,
    /// Memory bus width in bits.
    pub memory_bus_bits: Option<u32>,
    /// The newest CUDA version the installed driver supports (`cuDriverGetVersion`).
    pub driver_cuda_version: Option<(u32, u32)>,
    /// The driver release, e.g. `580.65.06` (from `/proc/driver/nvidia/version`).
    pub driver_release: Option<String>,
    /// The CUDA runtime version linked into this build (`cudaRuntimeGetVersion`).
    pub runtime_version: Option<(u32, u32)>,
}

impl CudaDevice {
    /// The device's name, capability, memory, clocks and the driver and runtime
    /// versions, each where readable.
    pub fn info(&self) -> DeviceInfo {
        let ctx = self.stream().context();
        let attr = |a: CUdevice_attribute| ctx.attribute(a).ok().filter(|&v| v > 0);
        let mut driver = 0i32;
        // SAFETY: cuDriverGetVersion writes one int through a valid pointer; the driver
        // library is loaded (this device was opened through it).
        let driver_ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) }
            == cudarc::driver::sys::CUresult::CUDA_SUCCESS;
        let mut runtime = 0i32;
        // SAFETY: cudaRuntimeGetVersion writes one int through a valid pointer and needs
        // no device or initialised runtime.
        let runtime_ok = unsafe { cudaRuntimeGetVersion(&mut runtime) } == 0;
        DeviceInfo {
            name: self.name().to_string(),
            compute_capability: self.compute_capability(),
            total_memory: self.total_memory(),
            multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map(|v| v as u32),
            l2_cache_bytes: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
                .map(|v| v as u64),
            sm_clock_khz: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)
                .map(|v| v as u32),
            memory_clock_khz: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
                .map(|v| v as u32),
            memory_bus_bits: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)
                .map(|v| v as u32),
            driver_cuda_version: driver_ok.then(|| split_version(driver)).flatten(),
            driver_release: driver_release(),
            runtime_version: runtime_ok.then(|| split_version(runtime)).flatten(),
        }
    }
}

/// The NVIDIA kernel module's release from `/proc/driver/nvidia/version` (Linux).
fn driver_release() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    parse_driver_release(&text)
}

/// The release number in the `NVRM version:` line, e.g. `580.65.06` from
/// `NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 ...`.
fn parse_driver_release(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version"))?;
    line.split_whitespace()
        .find(|w| {
            w.contains('.')
                && w.chars().all(|c| c.is_ascii_digit() || c == '.')
                && w.starts_with(|c: char| c.is_ascii_digit())
        })
        .map(str::to_string)
}

/// A start and a stop event on a device's stream: `start`, enqueue work, `stop`, then
/// [`elapsed_s`](Self::elapsed_s) gives the device time between them.
pub struct StreamTimer {
    device: CudaDevice,
    start: CudaEvent,
    stop: CudaEvent,
}

impl std::fmt::Debug for StreamTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTimer")
            .field("device", &self.device)
            .finish()
    }
}

impl StreamTimer {
    /// Two timing events on `device`.
    pub fn new(device: &CudaDevice) -> Result<Self> {
        let ctx = device.stream().context();
        let event = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| driver_err("cuEventCreate", e))
        };
        Ok(StreamTimer {
            device: device.clone(),
            start: event()?,
            stop: event()?,
        })
    }

    /// Records the start event on the device's stream.
    pub fn start(&self) -> Result<()> {
        self.start
            .record(self.device.stream())
            .map_err(|e| driver_err("cuEventRecord (start)", e))
    }

    /// Records the stop event on the device's stream.
    pub fn stop(&self) -> Result<()> {
        self.stop
            .record(self.device.stream())
            .map_err(|e| driver_err("cuEventRecord (stop)", e))
    }

    /// Seconds of device time between the last start and stop; waits for the stop
    /// event and reports any error the work in between raised.
    pub fn elapsed_s(&self) -> Result<f64> {
        let ms = self
            .start
            .elapsed_ms(&self.stop)
            .map_err(|e| driver_err("cuEventElapsedTime", e))?;
        self.device.check_recorded("cuEventElapsedTime")?;
        Ok(f64::from(ms) * 1e-3)
    }
}

/// The device-to-device copy bandwidth of [`measure_copy_bandwidth`].
#[derive(Debug, Clone, PartialEq)]
pub struct CopyBandwidth {
    /// Bytes of each copy (read once and written once).
    pub bytes: u64,
    /// Timed copies.
    pub runs: usize,
    /// Median seconds of one copy.
    pub median_s: f64,
    /// `2 * bytes / median_s / 1e9`: read plus written bytes per second, in GB/s.
    pub gbps: f64,
}

/// Times `runs` (at least 3) device-to-device copies of a `bytes`-byte buffer with
/// events, after one warm-up copy. Read and written bytes both count, as a kernel's
/// weights read and outputs written do.
pub fn measure_copy_bandwidth(
    device: &CudaDevice,
    bytes: usize,
    runs: usize,
) -> Result<CopyBandwidth> {
    if bytes == 0 {
        return Err(Error::invalid(
            "copy bandwidth buffer",
            "must be at least 1 byte",
        ));
    }
    let runs = runs.max(3);
    let mut src: CudaBuffer<u8> =
        device.alloc_uninit(bytes, MemoryPurpose::Scratch, "copy bandwidth source")?;
    let mut dst: CudaBuffer<u8> =
        device.alloc_uninit(bytes, MemoryPurpose::Scratch, "copy bandwidth destination")?;
    device.bind()?;
    let stream = device.stream();
    stream
        .memset_zeros(src.slice_mut())
        .map_err(|e| driver_err("cuMemsetD8 (copy bandwidth source)", e))?;
    let copy = |dst: &mut CudaBuffer<u8>| -> Result<()> {
        let (s, _s) = src.slice().device_ptr(stream);
        let (d, _d) = dst.slice_mut().device_ptr_mut(stream);
        // SAFETY: both are live allocations of `bytes` bytes in this device's context,
        // distinct, and stay alive until the synchronisation in `elapsed_s` (or the one
        // after the warm-up) has waited for the copy; the stream belongs to the context.
        unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, bytes, stream.cu_stream()) }
            .map_err(|e| driver_err(format!("cuMemcpyDtoDAsync ({bytes} bytes)"), e))
    };
    copy(&mut dst)?;
    device.synchronize()?;
    let timer = StreamTimer::new(device)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        timer.start()?;
        copy(&mut dst)?;
        timer.stop()?;
        times.push(timer.elapsed_s()?);
    }
    times.sort_by(f64::total_cmp);
    let median = if runs % 2 == 1 {
        times[runs / 2]
    } else {
        0.5 * (times[runs / 2 - 1] + times[runs / 2])
    };
    Ok(CopyBandwidth {
        bytes: bytes as u64,
        runs,
        median_s: median,
        gbps: 2.0 * bytes as f64 / median / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_split_into_major_and_minor() {
        assert_eq!(split_version(13000), Some((13, 0)));
        assert_eq!(split_version(12080), Some((12, 8)));
        assert_eq!(split_version(0), None);
        assert_eq!(split_version(-1), None);
    }

    #[test]
    fn driver_release_is_read_from_the_nvrm_line() {
        let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:46 UTC 2025\nGCC version:  gcc version 12.3.0\n";
        assert_eq!(parse_driver_release(text).as_deref(), Some("580.65.06"));
        let open =
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build\n";
        assert_eq!(parse_driver_release(open).as_deref(), Some("570.86.15"));
        assert_eq!(parse_driver_release("GCC version: 12.3\n"), None);
        assert_eq!(parse_driver_release(""), None);
    }
}
