//! The CUDA backend (feature `cuda`): `f16` activations, `f32` accumulation.
//!
//! The kernels are CUDA C++ in `cuda/*.cu`, compiled by build.rs with nvcc and reached
//! through the C launchers of `cuda/launch.h` ([`launch`]). cudarc owns the rest: the
//! driver is loaded at run time (so a binary built with this feature starts on a machine
//! without one), and [`CudaDevice::new`] reports a missing driver or device as
//! [`Error::NoCudaDevice`](crate::Error::NoCudaDevice).
//!
//! [`CudaBackend`] implements [`Backend`](crate::backend::Backend), so the MMDiT engine
//! runs here unchanged: `Mmdit::<CudaBackend>::load_on(path, Device::Cuda(0))` (the
//! CLI: `--backend cuda`). Activations stay on the device between ops as
//! [`CudaTensorF16`]; [`Backend::upload`](crate::backend::Backend::upload) and
//! [`Backend::download`](crate::backend::Backend::download) convert from and to `f32`
//! on the host. Linear layers become a [`CudaLinear`]: 4-bit layers of every kind
//! (INT4, symmetric INT4, NF4) a [`CudaQ4Linear`] (a layer whose shape the 4-bit
//! kernels refuse, e.g. K not a multiple of 32, runs as a dequantised `f16` dense layer
//! and says so in the log), dense f32/f16/bf16 layers a [`CudaDenseLinear`] in `f16`.
//! Every other op is a launcher of `cuda/launch.h`: the fused LayerNorm + modulation,
//! the per-head RMS norm, the gated residual (`add_rows` without a gate), SiLU and
//! GELU-tanh in place, flash-style attention (scale `1 / sqrt(head_dim)`, head_dim in
//! [`ATTENTION_HEAD_DIMS`]) and strided copies for the token concatenation and split and
//! the modulation chunks. Shapes are checked on the host before any launch, and every
//! launcher status becomes an error. Device memory stays accounted in [`CudaDevice`]:
//! weights as [`MemoryPurpose::Weights`], activations as [`MemoryPurpose::Scratch`].
//!
//! ```no_run
//! # fn main() -> hiprune::Result<()> {
//! use hiprune::backend::cuda::{CudaDevice, CudaQ4Linear};
//! # let m = hiprune::quant::quantize_int4(&vec![0.5f32; 64 * 64], 64, 64, &Default::default())?;
//! let device = CudaDevice::new(0)?;
//! let layer = CudaQ4Linear::upload(&device, m.view()?, None)?;
//! let x = device.upload_f16(&vec![half::f16::ONE; 3 * 64], 3, 64)?;
//! let y = device.download_f16(&layer.forward(&x)?)?;
//! # let _ = y; Ok(()) }
//! ```

pub mod backend;
pub mod device;
pub mod launch;
pub mod linear;
pub mod timing;

pub use backend::{ATTENTION_HEAD_DIMS, CudaBackend, CudaLinear, RMS_NORM_MAX_HEAD_DIM};
pub use device::{
    CudaBuffer, CudaDevice, CudaTensorF16, MemoryPurpose, MemoryReport, MemoryUsage,
    cublas_present, driver_present,
};
pub use launch::GEMV_MAX_M;
pub use linear::{CudaDenseLinear, CudaQ4Linear, Q4Kernel};
pub use timing::{CopyBandwidth, DeviceInfo, StreamTimer, measure_copy_bandwidth};
