//! The CUDA backend (feature `cuda`): `f16` activations, `f32` accumulation.
//!
//! The kernels are CUDA C++ in `cuda/*.cu`, compiled by build.rs with nvcc and reached
//! through the C launchers of `cuda/launch.h` ([`launch`]). cudarc owns the rest: the
//! driver is loaded at run time (so a binary built with this feature starts on a machine
//! without one), and [`CudaDevice::new`] reports a missing driver or device as
//! [`Error::NoCudaDevice`](crate::Error::NoCudaDevice).
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

pub mod device;
pub mod launch;
pub mod linear;

pub use device::{
    CudaBuffer, CudaDevice, CudaTensorF16, MemoryPurpose, MemoryReport, MemoryUsage,
    cublas_present, driver_present,
};
pub use launch::GEMV_MAX_M;
pub use linear::{CudaDenseLinear, CudaQ4Linear, Q4Kernel};
