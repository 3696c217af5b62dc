//! # hiprune
//!
//! Run position-pruned, INT4-quantised MMDiT diffusion transformers (Stable Diffusion 3 /
//! 3.5) on edge GPUs and CPUs.
//!
//! HierarchicalPrune showed that the early blocks of an MMDiT model set an image's
//! semantic structure while later blocks only refine texture, so well-chosen later
//! blocks can be removed and the remaining weights quantised to 4 bits. This crate is
//! the runtime side of that idea plus the host-side toolchain that produces its
//! packages:
//!
//! - [`config`]: [`MmditConfig`](config::MmditConfig), the architecture of an MMDiT
//!   transformer (a diffusers `config.json`), shared by the package format and the model.
//! - [`quant`]: the 4-bit weight formats (INT4 with a per-group scale, symmetric, or
//!   with scale and offset; NF4 with per-block absmax), their quantisers and an `f64`
//!   reference used by the tests.
//! - [`format`](mod@format): the `.hpk` package, a safetensors file with a manifest, memory-mapped
//!   and validated before any tensor is handed out, and written atomically.
//! - [`backend`]: compute backends; the CPU backend runs fused dequant-GEMV/GEMM kernels
//!   directly on the package's memory map.
//! - [`model`]: the MMDiT transformer (SD3, SD3.5 Large, SD3.5 Medium / MMDiT-X): its
//!   configuration, weights from a diffusers folder or a package, the position-pruned
//!   forward pass and the flow-matching Euler sampler.
//! - `compress` (feature `compress`): sensitivity analysis, pruning plans, seeded
//!   checkpoint generation and the streaming INT4 exporter.
//! - the C interface (`include/hiprune.h`): the `hp_*` functions of the shared and
//!   static library, implemented in the private `ffi` module.
//!
//! Every fallible function returns [`Result`]; the library never panics on bad input.

pub mod backend;
#[cfg(feature = "compress")]
pub mod compress;
pub mod config;
pub mod error;
mod ffi;
pub mod format;
mod io;
pub mod model;
pub mod pipeline;
pub mod quant;

pub use error::{Error, Result};
pub use format::{Package, PackageWriter};
pub use quant::{Q4Kind, Q4Matrix, Q4Weights};

/// The crate version, as written in Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
