//! The CPU backend: f32 activations, fused 4-bit dequant-GEMV/GEMM kernels that run in
//! place on the packed weights, dense layers through the `gemm` crate, threads over
//! output rows (rayon).

pub mod attention;
pub mod backend;
mod check;
pub mod gemv;
pub mod image;
pub mod int8;
pub mod linear;
pub mod membw;
pub mod ops;
mod panel;
pub mod path;

pub use backend::{CpuBackend, CpuLinear, CpuTensor};
pub use linear::{linear, linear_with_path};
pub use path::KernelPath;
