//! Compute backends. The CPU backend is always built; the CUDA backend comes with the
//! `cuda` feature.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
