//! Linear layers on the GPU: 4-bit weights through the hiprune kernels, dense `f16`
//! weights through cuBLAS (the baseline the 4-bit kernels are measured against).

use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::f16;

use super::device::{CudaBuffer, CudaDevice, CudaTensorF16, MemoryPurpose};
use super::launch::{self, GEMV_MAX_M, sys};
use crate::error::{Error, Result};
use crate::quant::{Q4Kind, Q4Weights};

/// Signature shared by every `hp_launch_{gemv,gemm}_*_f16` launcher.
type LinearLauncher = unsafe extern "C" fn(
    *const u16,
    *const u8,
    *const u16,
    *const u16,
    *const u16,
    *mut u16,
    i32,
    i32,
    i32,
    i32,
    *mut c_void,
) -> i32;

/// Which 4-bit kernel family runs a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Q4Kernel {
    /// GEMV for M <= 8 ([`GEMV_MAX_M`]) when M is small, GEMM otherwise.
    Auto,
    /// The memory-bound GEMV kernel (M <= 8 only).
    Gemv,
    /// The tensor-core GEMM kernel (any M).
    Gemm,
}

/// The launchers (name, function) of one weight kind: (GEMV, GEMM).
fn launchers(
    kind: Q4Kind,
) -> (
    (&'static str, LinearLauncher),
    (&'static str, LinearLauncher),
) {
    match kind {
        Q4Kind::Int4 => (
            ("hp_launch_gemv_int4_f16", sys::hp_launch_gemv_int4_f16),
            ("hp_launch_gemm_int4_f16", sys::hp_launch_gemm_int4_f16),
        ),
        Q4Kind::Nf4 => (
            ("hp_launch_gemv_nf4_f16", sys::hp_launch_gemv_nf4_f16),
            ("hp_launch_gemm_nf4_f16", sys::hp_launch_gemm_nf4_f16),
        ),
        Q4Kind::Int4Sym => (
            (
                "hp_launch_gemv_int4sym_f16",
                sys::hp_launch_gemv_int4sym_f16,
            ),
            (
                "hp_launch_gemm_int4sym_f16",
                sys::hp_launch_gemm_int4sym_f16,
            ),
        ),
    }
}

/// `n`, `k` or `m` as the kernels' `int32`.
fn dim(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| {
        Error::invalid(
            what,
            format!("{value} exceeds the CUDA kernels' 32-bit sizes"),
        )
    })
}

/// An `f32` bias as device `f16` bits; refuses values that are not finite in `f16`.
fn bias_bits(bias: &[f32], n: usize) -> Result<Vec<u16>> {
    if bias.len() != n {
        return Err(Error::length("bias", n, bias.len()));
    }
    bias.iter()
        .enumerate()
        .map(|(i, &b)| {
            let h = f16::from_f32(b);
            if h.is_finite() {
                Ok(h.to_bits())
            } else {
                Err(Error::invalid(
                    "bias",
                    format!("element {i} = {b} is not finite in f16"),
                ))
            }
        })
        .collect()
}

/// Checks `x [m, k]` and `y [m, n]` against a layer `[n, k]` on `device`.
fn check_io(
    device: &CudaDevice,
    x: &CudaTensorF16,
    y: &CudaTensorF16,
    n: usize,
    k: usize,
) -> Result<()> {
    device.check_same(x.buffer().device_id(), "input x")?;
    device.check_same(y.buffer().device_id(), "output y")?;
    if x.cols() != k {
        return Err(Error::ShapeMismatch {
            tensor: "input x".into(),
            expected: vec![x.rows(), k],
            found: vec![x.rows(), x.cols()],
        });
    }
    if y.rows() != x.rows() || y.cols() != n {
        return Err(Error::ShapeMismatch {
            tensor: "output y".into(),
            expected: vec![x.rows(), n],
            found: vec![y.rows(), y.cols()],
        });
    }
    Ok(())
}

/// A 4-bit linear layer `y = x . W^T + bias` resident on a CUDA device: the codes in the
/// kernels' repacked layout (the only copy on the device), `f16` scales, offsets for
/// INT4, an optional `f16` bias.
#[derive(Debug)]
pub struct CudaQ4Linear {
    device: CudaDevice,
    kind: Q4Kind,
    n: usize,
    k: usize,
    group: usize,
    qweight: CudaBuffer<u8>,
    scales: CudaBuffer<u16>,
    offsets: Option<CudaBuffer<u16>>,
    bias: Option<CudaBuffer<u16>>,
}

impl CudaQ4Linear {
    /// Uploads `w` (and `bias`, length N) to `device` and repacks the codes there once.
    /// The canonical code copy is freed before this returns; waits for the device.
    pub fn upload(device: &CudaDevice, w: Q4Weights<'_>, bias: Option<&[f32]>) -> Result<Self> {
        let (kind, n, k, group) = (w.kind(), w.n(), w.k(), w.group());
        let (n32, k32) = (dim(n, "4-bit matrix N")?, dim(k, "4-bit matrix K")?);
        if !k.is_multiple_of(32) {
            return Err(Error::invalid(
                "4-bit matrix",
                format!("K = {k}: the CUDA kernels take K that is a multiple of 32"),
            ));
        }
        let repacked_len = launch::repacked_bytes(n, k)?;
        let bias = bias
            .map(|b| {
                let bits = bias_bits(b, n)?;
                device.upload(&bits, MemoryPurpose::Weights, "bias")
            })
            .transpose()?;
        let scales = device.upload(
            bytemuck::cast_slice::<f16, u16>(w.scales()),
            MemoryPurpose::Weights,
            "scales",
        )?;
        let offsets = if kind.has_offsets() {
            Some(device.upload(
                bytemuck::cast_slice::<f16, u16>(w.offsets()),
                MemoryPurpose::Weights,
                "offsets",
            )?)
        } else {
            None
        };
        let mut qweight: CudaBuffer<u8> =
            device.alloc_uninit(repacked_len, MemoryPurpose::Weights, "repacked 4-bit codes")?;
        {
            // The canonical codes live only until the repack has run.
            let packed = device.upload(w.packed(), MemoryPurpose::Scratch, "packed 4-bit codes")?;
            device.bind()?;
            let stream = device.stream();
            let (src, _s) = packed.slice().device_ptr(stream);
            let (dst, _d) = qweight.slice_mut().device_ptr_mut(stream);
            // SAFETY: `src` holds n * k / 2 bytes (Q4Weights checked the length), `dst`
            // hp_q4_repacked_bytes(n, k) bytes; both are live device allocations of this
            // context, distinct, and outlive the launch: `packed` is dropped only after
            // the synchronisation below. The stream handle belongs to this context.
            let status = unsafe {
                sys::hp_launch_repack_q4(
                    src as *const u8,
                    dst as *mut u8,
                    n32,
                    k32,
                    stream.cu_stream() as *mut c_void,
                )
            };
            launch::check_status("hp_launch_repack_q4", status, || {
                format!("n = {n}, k = {k}")
            })?;
            device.synchronize()?;
        }
        Ok(CudaQ4Linear {
            device: device.clone(),
            kind,
            n,
            k,
            group,
            qweight,
            scales,
            offsets,
            bias,
        })
    }

    /// The weight kind.
    pub fn kind(&self) -> Q4Kind {
        self.kind
    }
    /// Output features N.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input features K.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Group (block) size along K.
    pub fn group(&self) -> usize {
        self.group
    }
    /// Device bytes of the layer (repacked codes, scales, offsets, bias).
    pub fn device_bytes(&self) -> u64 {
        self.qweight.bytes()
            + self.scales.bytes()
            + self.offsets.as_ref().map_or(0, |o| o.bytes())
            + self.bias.as_ref().map_or(0, |b| b.bytes())
    }

    /// `y [m, n] = x [m, k] . W^T + bias` into a new device matrix; GEMV for
    /// `m <= 8`, GEMM otherwise. Enqueued on the device's stream, not waited for.
    pub fn forward(&self, x: &CudaTensorF16) -> Result<CudaTensorF16> {
        let mut y = self.device.alloc_f16(x.rows(), self.n)?;
        self.forward_into(x, &mut y, Q4Kernel::Auto)?;
        Ok(y)
    }

    /// Like [`forward`](Self::forward) into an existing `y [m, n]`, with the kernel
    /// family chosen by `kernel`.
    pub fn forward_into(
        &self,
        x: &CudaTensorF16,
        y: &mut CudaTensorF16,
        kernel: Q4Kernel,
    ) -> Result<()> {
        check_io(&self.device, x, y, self.n, self.k)?;
        let m = x.rows();
        let m32 = dim(m, "rows of x")?;
        let (gemv, gemm) = launchers(self.kind);
        let (name, f) = match kernel {
            Q4Kernel::Auto if m <= GEMV_MAX_M => gemv,
            Q4Kernel::Auto | Q4Kernel::Gemm => gemm,
            Q4Kernel::Gemv if m <= GEMV_MAX_M => gemv,
            Q4Kernel::Gemv => {
                return Err(Error::invalid(
                    "rows of x",
                    format!("M = {m}: the GEMV kernel takes M <= {GEMV_MAX_M}"),
                ));
            }
        };
        self.device.bind()?;
        let stream = self.device.stream();
        let (xp, _x) = x.buffer().slice().device_ptr(stream);
        let (qp, _q) = self.qweight.slice().device_ptr(stream);
        let (sp, _s) = self.scales.slice().device_ptr(stream);
        let op = self.offsets.as_ref().map(|o| o.slice().device_ptr(stream));
        let bp = self.bias.as_ref().map(|b| b.slice().device_ptr(stream));
        let (yp, _y) = y.buffer_mut().slice_mut().device_ptr_mut(stream);
        let offsets_ptr = op
            .as_ref()
            .map_or(std::ptr::null(), |(p, _)| *p as *const u16);
        let bias_ptr = bp
            .as_ref()
            .map_or(std::ptr::null(), |(p, _)| *p as *const u16);
        // SAFETY: every pointer is a live device allocation of this context with the
        // length the launcher expects: x [m, k] and y [m, n] (check_io), the repacked
        // codes hp_q4_repacked_bytes(n, k), scales/offsets [n, k / group] (checked by
        // Q4Weights at upload), bias [n]. Offsets are non-NULL exactly for INT4. The
        // launcher only enqueues work on this context's stream; the buffers are borrowed
        // (x, weights) or mutably borrowed (y) for this call and freed only through
        // stream-ordered frees or after a synchronisation.
        let status = unsafe {
            f(
                xp as *const u16,
                qp as *const u8,
                sp as *const u16,
                offsets_ptr,
                bias_ptr,
                yp as *mut u16,
                m32,
                self.n as i32,
                self.k as i32,
                self.group as i32,
                stream.cu_stream() as *mut c_void,
            )
        };
        launch::check_status(name, status, || {
            format!(
                "m = {m}, n = {}, k = {}, group = {}, kind {}",
                self.n, self.k, self.group, self.kind
            )
        })?;
        self.device.check_recorded(name)
    }
}

/// A dense `f16` linear layer `y = x . W^T + bias` through cuBLAS (f32 accumulation,
/// tensor cores): the baseline for the 4-bit kernels and the path for layers kept in
/// `f16`.
pub struct CudaDenseLinear {
    device: CudaDevice,
    n: usize,
    k: usize,
    weight: CudaBuffer<u16>,
    bias: Option<CudaBuffer<u16>>,
    /// A column of ones `[m]` for the bias as a rank-1 update, grown on demand.
    ones: Mutex<Option<CudaBuffer<u16>>>,
}

impl std::fmt::Debug for CudaDenseLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDenseLinear")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl CudaDenseLinear {
    /// Uploads a row-major `f16` weight `[n, k]` (and `bias`, length N) to `device`.
    /// Fails with [`Error::Unsupported`] when cuBLAS cannot be loaded.
    pub fn upload(
        device: &CudaDevice,
        weight: &[f16],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        dim(n, "dense weight N")?;
        dim(k, "dense weight K")?;
        if n == 0 || k == 0 {
            return Err(Error::invalid(
                "dense weight",
                format!("shape [{n}, {k}] has a zero dimension"),
            ));
        }
        let len = n
            .checked_mul(k)
            .ok_or_else(|| Error::invalid("dense weight", "N * K overflows"))?;
        if weight.len() != len {
            return Err(Error::length("dense weight", len, weight.len()));
        }
        device.blas()?;
        let bias = bias
            .map(|b| {
                let bits = bias_bits(b, n)?;
                device.upload(&bits, MemoryPurpose::Weights, "bias")
            })
            .transpose()?;
        let weight = device.upload(
            bytemuck::cast_slice::<f16, u16>(weight),
            MemoryPurpose::Weights,
            "dense f16 weight",
        )?;
        Ok(CudaDenseLinear {
            device: device.clone(),
            n,
            k,
            weight,
            bias,
            ones: Mutex::new(None),
        })
    }

    /// Output features N.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input features K.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `y [m, n] = x [m, k] . W^T + bias` into a new device matrix (enqueued, not
    /// waited for).
    pub fn forward(&self, x: &CudaTensorF16) -> Result<CudaTensorF16> {
        let mut y = self.device.alloc_f16(x.rows(), self.n)?;
        self.forward_into(x, &mut y)?;
        Ok(y)
    }

    /// Like [`forward`](Self::forward) into an existing `y [m, n]`.
    pub fn forward_into(&self, x: &CudaTensorF16, y: &mut CudaTensorF16) -> Result<()> {
        check_io(&self.device, x, y, self.n, self.k)?;
        let m = x.rows();
        let (m32, n32, k32) = (dim(m, "rows of x")?, self.n as i32, self.k as i32);
        let blas = self.device.blas()?;
        self.device.bind()?;
        let stream = self.device.stream();
        let mut ones_guard = self.ones.lock().unwrap_or_else(|e| e.into_inner());
        if self.bias.is_some() && ones_guard.as_ref().is_none_or(|o| o.len() < m) {
            let host = vec![f16::ONE.to_bits(); m];
            *ones_guard = Some(self.device.upload(&host, MemoryPurpose::Scratch, "ones")?);
        }
        let (xp, _x) = x.buffer().slice().device_ptr(stream);
        let (wp, _w) = self.weight.slice().device_ptr(stream);
        let (yp, _y) = y.buffer_mut().slice_mut().device_ptr_mut(stream);
        let one = 1.0f32;
        let zero = 0.0f32;
        // Row-major y [m, n] is column-major y^T [n, m] (ld n) = W [n, k] . x^T, where
        // row-major W is column-major W^T [k, n] (ld k, so op T) and row-major x is
        // column-major x^T [k, m] (ld k, op N).
        let mut beta = zero;
        if let (Some(bias), Some(ones)) = (&self.bias, ones_guard.as_ref()) {
            let (bp, _b) = bias.slice().device_ptr(stream);
            let (op, _o) = ones.slice().device_ptr(stream);
            // y^T = bias [n, 1] . ones [1, m]: the bias in every row, then the product
            // accumulates onto it (beta = 1).
            // SAFETY: bias holds n f16, ones at least m, y m * n; all live device
            // allocations of this context; the handle is bound to this device's stream.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    n32,
                    m32,
                    1,
                    (&one as *const f32).cast(),
                    bp as *const c_void,
                    blas_sys::cudaDataType::CUDA_R_16F,
                    n32,
                    op as *const c_void,
                    blas_sys::cudaDataType::CUDA_R_16F,
                    1,
                    (&zero as *const f32).cast(),
                    yp as *mut c_void,
                    blas_sys::cudaDataType::CUDA_R_16F,
                    n32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| Error::Cuda {
                call: format!("cublasGemmEx (bias, m = {m}, n = {})", self.n),
                reason: format!("{e:?}"),
            })?;
            beta = one;
        }
        // SAFETY: W holds n * k f16, x m * k, y m * n (check_io); all live device
        // allocations of this context; the handle runs on this device's stream; alpha
        // and beta are host f32 scalars as CUBLAS_COMPUTE_32F with the default
        // host pointer mode expects.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n32,
                m32,
                k32,
                (&one as *const f32).cast(),
                wp as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16F,
                k32,
                xp as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16F,
                k32,
                (&beta as *const f32).cast(),
                yp as *mut c_void,
                blas_sys::cudaDataType::CUDA_R_16F,
                n32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Cuda {
            call: format!("cublasGemmEx (m = {m}, n = {}, k = {})", self.n, self.k),
            reason: format!("{e:?}"),
        })?;
        self.device.check_recorded("cublasGemmEx")
    }
}
