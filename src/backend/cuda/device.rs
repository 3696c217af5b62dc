//! One CUDA device: its context, the stream all work goes on, and device memory
//! accounted by purpose.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, DriverError};
use half::f16;

use crate::error::{Error, Result};

/// Turns a driver error of `call` into [`Error::Cuda`].
pub(crate) fn driver_err(call: impl Into<String>, err: DriverError) -> Error {
    Error::Cuda {
        call: call.into(),
        reason: format!("{err:?}"),
    }
}

/// What a device allocation is for, in [`CudaDevice::memory`] accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryPurpose {
    /// Model weights (4-bit codes, scales, offsets, dense f16 weights, biases).
    Weights,
    /// Activations, outputs and temporary buffers.
    Scratch,
}

/// Current and peak bytes of one purpose (or of all together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Bytes allocated now.
    pub current: u64,
    /// Most bytes allocated at any one time since the device was opened.
    pub peak: u64,
}

/// Device memory this [`CudaDevice`] has allocated, by purpose. Counts the bytes asked
/// for; the driver may round each allocation up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Model weights.
    pub weights: MemoryUsage,
    /// Activations and temporaries.
    pub scratch: MemoryUsage,
    /// Both together (its peak is the peak of the sum, not the sum of the peaks).
    pub total: MemoryUsage,
}

#[derive(Debug, Default)]
struct Ledger {
    report: Mutex<MemoryReport>,
}

impl Ledger {
    fn with<R>(&self, f: impl FnOnce(&mut MemoryReport) -> R) -> R {
        // A panic elsewhere cannot leave the counters half-updated: recover the data.
        let mut guard = self.report.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    fn add(&self, purpose: MemoryPurpose, bytes: u64) {
        self.with(|r| {
            let u = match purpose {
                MemoryPurpose::Weights => &mut r.weights,
                MemoryPurpose::Scratch => &mut r.scratch,
            };
            u.current += bytes;
            u.peak = u.peak.max(u.current);
            r.total.current += bytes;
            r.total.peak = r.total.peak.max(r.total.current);
        });
    }

    fn sub(&self, purpose: MemoryPurpose, bytes: u64) {
        self.with(|r| {
            let u = match purpose {
                MemoryPurpose::Weights => &mut r.weights,
                MemoryPurpose::Scratch => &mut r.scratch,
            };
            u.current = u.current.saturating_sub(bytes);
            r.total.current = r.total.current.saturating_sub(bytes);
        });
    }
}

/// A device allocation of `len` values of `T`, counted in its device's
/// [`MemoryReport`] until dropped.
#[derive(Debug)]
pub struct CudaBuffer<T> {
    slice: CudaSlice<T>,
    ledger: Arc<Ledger>,
    purpose: MemoryPurpose,
    bytes: u64,
    device_id: u64,
}

impl<T> CudaBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        cudarc::driver::DeviceSlice::len(&self.slice)
    }
    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes allocated.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// What the buffer is accounted as.
    pub fn purpose(&self) -> MemoryPurpose {
        self.purpose
    }
    pub(crate) fn device_id(&self) -> u64 {
        self.device_id
    }
    pub(crate) fn slice(&self) -> &CudaSlice<T> {
        &self.slice
    }
    pub(crate) fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for CudaBuffer<T> {
    fn drop(&mut self) {
        self.ledger.sub(self.purpose, self.bytes);
    }
}

/// A row-major `f16` matrix `[rows, cols]` in device memory (activations, outputs).
#[derive(Debug)]
pub struct CudaTensorF16 {
    buf: CudaBuffer<u16>,
    rows: usize,
    cols: usize,
}

impl CudaTensorF16 {
    /// Rows (M for activations).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns (features).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The underlying buffer (IEEE binary16 bits).
    pub fn buffer(&self) -> &CudaBuffer<u16> {
        &self.buf
    }
    pub(crate) fn buffer_mut(&mut self) -> &mut CudaBuffer<u16> {
        &mut self.buf
    }
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    name: String,
    compute_capability: (u32, u32),
    total_memory: u64,
    ledger: Arc<Ledger>,
    id: u64,
    blas: OnceLock<CudaBlas>,
}

/// An opened CUDA device: a context (the device's primary context), one stream on which
/// every copy and kernel of this handle runs in order, and memory accounting. Cloning
/// is cheap and shares all of it.
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.inner.ordinal)
            .field("name", &self.inner.name)
            .field("compute_capability", &self.inner.compute_capability)
            .field("total_memory", &self.inner.total_memory)
            .finish()
    }
}

/// Whether the CUDA driver library (libcuda) can be loaded. cudarc panics on first use
/// when it cannot, so this is asked before anything else touches it.
pub fn driver_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the driver library under its known
    // names and closes it again; loading libcuda runs no initialisers with preconditions.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLAS can be loaded (needed by [`super::CudaDenseLinear`] only).
pub fn cublas_present() -> bool {
    // SAFETY: as for `driver_present`: a dlopen probe of libcublas, nothing else.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl CudaDevice {
    /// Opens device `ordinal`. Without a driver, without a device, or with an ordinal out
    /// of range this returns [`Error::NoCudaDevice`] saying why; it never panics.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        // cudarc panics where a driver lacks a symbol it loads; that is a missing (or too
        // old) driver too, not a reason to take the process down.
        std::panic::catch_unwind(|| Self::open(ordinal)).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(Error::NoCudaDevice {
                reason: format!("the CUDA driver could not be used: {what}"),
            })
        })
    }

    fn open(ordinal: usize) -> Result<CudaDevice> {
        if !driver_present() {
            return Err(Error::NoCudaDevice {
                reason: "the CUDA driver library (libcuda.so) is not installed or not on the \
                         loader path"
                    .into(),
            });
        }
        let count = CudaContext::device_count().map_err(|e| Error::NoCudaDevice {
            reason: format!("the driver reports no usable device: {e:?}"),
        })?;
        if count <= 0 || ordinal >= count as usize {
            return Err(Error::NoCudaDevice {
                reason: format!("device {ordinal} requested, the driver sees {count}"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoCudaDevice {
            reason: format!("cannot open device {ordinal}: {e:?}"),
        })?;
        // Every buffer of this handle is used on its one stream only, so cudarc's
        // per-buffer event tracking (for ordering across streams) is pure overhead.
        // SAFETY: disabling tracking is sound when no buffer is shared between streams;
        // all allocations, copies and launches of a CudaDevice go through `stream`, and
        // buffers of different handles are refused by the device-id checks.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_err("cuStreamCreate", e))?;
        let name = ctx.name().map_err(|e| driver_err("cuDeviceGetName", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_err("cuDeviceGetAttribute (compute capability)", e))?;
        let total_memory = ctx
            .total_mem()
            .map_err(|e| driver_err("cuDeviceTotalMem", e))? as u64;
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                ctx,
                stream,
                ordinal,
                name,
                compute_capability: (major.max(0) as u32, minor.max(0) as u32),
                total_memory,
                ledger: Arc::new(Ledger::default()),
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                blas: OnceLock::new(),
            }),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }
    /// The device's name, e.g. `NVIDIA H100 80GB HBM3` or `Orin`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// Compute capability `(major, minor)`, e.g. `(8, 7)` for Jetson Orin.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.inner.compute_capability
    }
    /// Total device memory in bytes.
    pub fn total_memory(&self) -> u64 {
        self.inner.total_memory
    }
    /// Free device memory in bytes now, as the driver reports it (all processes).
    pub fn free_memory(&self) -> Result<u64> {
        let (free, _total) = self
            .inner
            .ctx
            .mem_get_info()
            .map_err(|e| driver_err("cuMemGetInfo", e))?;
        Ok(free as u64)
    }
    /// Bytes this handle (and its clones) have allocated, by purpose, current and peak.
    pub fn memory(&self) -> MemoryReport {
        self.inner.ledger.with(|r| *r)
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// Makes this device's context current on the calling thread (the launchers use
    /// the CUDA runtime, which follows the current context).
    pub(crate) fn bind(&self) -> Result<()> {
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(|e| driver_err("cuCtxSetCurrent", e))
    }

    /// Errors that cudarc recorded where it could not return them (for example from a
    /// synchronisation on drop), as [`Error::Cuda`].
    pub(crate) fn check_recorded(&self, call: &str) -> Result<()> {
        self.inner.ctx.check_err().map_err(|e| driver_err(call, e))
    }

    /// Waits for all work on this device's stream and reports any error it raised (an
    /// illegal address in a kernel, for example).
    pub fn synchronize(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .map_err(|e| driver_err("cuStreamSynchronize", e))?;
        self.check_recorded("cuStreamSynchronize")
    }

    /// The cuBLAS handle on this device's stream, created on first use.
    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        if let Some(b) = self.inner.blas.get() {
            return Ok(b);
        }
        if !cublas_present() {
            return Err(Error::Unsupported {
                what: "dense f16 linear on CUDA: cuBLAS (libcublas.so) is not on the loader path"
                    .into(),
            });
        }
        self.bind()?;
        let blas = CudaBlas::new(self.inner.stream.clone()).map_err(|e| Error::Cuda {
            call: "cublasCreate".into(),
            reason: format!("{e:?}"),
        })?;
        // Another thread may have won the race; either handle is fine.
        let _ = self.inner.blas.set(blas);
        self.inner.blas.get().ok_or_else(|| Error::Cuda {
            call: "cublasCreate".into(),
            reason: "handle not stored".into(),
        })
    }

    fn account<T>(&self, slice: CudaSlice<T>, purpose: MemoryPurpose) -> CudaBuffer<T> {
        let bytes = (cudarc::driver::DeviceSlice::len(&slice) * std::mem::size_of::<T>()) as u64;
        self.inner.ledger.add(purpose, bytes);
        CudaBuffer {
            slice,
            ledger: self.inner.ledger.clone(),
            purpose,
            bytes,
            device_id: self.inner.id,
        }
    }

    /// Allocates `len` values of `T` without initialising them.
    pub(crate) fn alloc_uninit<T: DeviceRepr>(
        &self,
        len: usize,
        purpose: MemoryPurpose,
        what: &str,
    ) -> Result<CudaBuffer<T>> {
        // SAFETY: the buffers hold plain integers (u8/u16 bit patterns) for which any bit
        // pattern is valid; the device memory is only read after a kernel or copy wrote
        // it, and host code never sees it before a copy back.
        let slice = unsafe { self.inner.stream.alloc::<T>(len) }
            .map_err(|e| driver_err(format!("cuMemAlloc ({what}, {len} values)"), e))?;
        Ok(self.account(slice, purpose))
    }

    /// Copies `data` into a new device buffer.
    pub(crate) fn upload<T: DeviceRepr>(
        &self,
        data: &[T],
        purpose: MemoryPurpose,
        what: &str,
    ) -> Result<CudaBuffer<T>> {
        let slice = self
            .inner
            .stream
            .clone_htod(data)
            .map_err(|e| driver_err(format!("cuMemcpyHtoD ({what})"), e))?;
        Ok(self.account(slice, purpose))
    }

    /// Copies a device buffer back to the host (waits for the stream).
    pub(crate) fn download<T: DeviceRepr + Default + Clone>(
        &self,
        buf: &CudaBuffer<T>,
        what: &str,
    ) -> Result<Vec<T>> {
        self.check_same(buf.device_id(), what)?;
        let mut host = vec![T::default(); buf.len()];
        self.inner
            .stream
            .memcpy_dtoh(buf.slice(), host.as_mut_slice())
            .map_err(|e| driver_err(format!("cuMemcpyDtoH ({what})"), e))?;
        self.synchronize()?;
        Ok(host)
    }

    /// Refuses a buffer that belongs to another [`CudaDevice`] handle.
    pub(crate) fn check_same(&self, device_id: u64, what: &str) -> Result<()> {
        if device_id != self.inner.id {
            return Err(Error::invalid(
                what,
                "the buffer belongs to another CudaDevice handle; use one handle (or its clones) per device",
            ));
        }
        Ok(())
    }

    /// Copies a row-major `f16` matrix `[rows, cols]` to the device (scratch memory).
    pub fn upload_f16(&self, data: &[f16], rows: usize, cols: usize) -> Result<CudaTensorF16> {
        let len = matrix_len(rows, cols, "f16 matrix")?;
        if data.len() != len {
            return Err(Error::length("f16 matrix", len, data.len()));
        }
        let bits: &[u16] = bytemuck::cast_slice(data);
        Ok(CudaTensorF16 {
            buf: self.upload(bits, MemoryPurpose::Scratch, "f16 matrix")?,
            rows,
            cols,
        })
    }

    /// A device `f16` matrix `[rows, cols]` with every element `value` (tests fill
    /// outputs with NaN so that an element no kernel wrote shows up).
    pub fn full_f16(&self, rows: usize, cols: usize, value: f16) -> Result<CudaTensorF16> {
        let len = matrix_len(rows, cols, "f16 matrix")?;
        let host = vec![value.to_bits(); len];
        Ok(CudaTensorF16 {
            buf: self.upload(&host, MemoryPurpose::Scratch, "f16 matrix")?,
            rows,
            cols,
        })
    }

    /// A device `f16` matrix `[rows, cols]` with unspecified contents.
    pub fn alloc_f16(&self, rows: usize, cols: usize) -> Result<CudaTensorF16> {
        let len = matrix_len(rows, cols, "f16 matrix")?;
        Ok(CudaTensorF16 {
            buf: self.alloc_uninit(len, MemoryPurpose::Scratch, "f16 matrix")?,
            rows,
            cols,
        })
    }

    /// Copies a device `f16` matrix back to the host, row-major (waits for the stream
    /// and reports any error a kernel raised).
    pub fn download_f16(&self, t: &CudaTensorF16) -> Result<Vec<f16>> {
        let bits = self.download(&t.buf, "f16 matrix")?;
        Ok(bits.into_iter().map(f16::from_bits).collect())
    }
}

/// `rows * cols` with both at least 1 and no overflow.
fn matrix_len(rows: usize, cols: usize, what: &str) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Err(Error::invalid(
            what,
            format!("shape [{rows}, {cols}] has a zero dimension"),
        ));
    }
    rows.checked_mul(cols)
        .filter(|&l| l <= i32::MAX as usize)
        .ok_or_else(|| Error::invalid(what, format!("shape [{rows}, {cols}] is too large")))
}
