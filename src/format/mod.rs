//! The `.hpk` package: a valid safetensors file holding the weights plus a
//! postcard-encoded [`Manifest`] tensor named [`MANIFEST_TENSOR`].
//!
//! [`Package::open`] memory-maps a file and validates every rule before handing out any
//! view; [`PackageWriter`] writes one atomically (temp file in the same folder, fsync,
//! rename). See `docs/FORMAT.md` for the full specification.

pub mod manifest;
pub mod read;
pub mod write;

pub use manifest::{Dtype, LayerEntry, Manifest, Precision, Provenance, TensorEntry};
pub use read::{Package, TensorView};
pub use write::PackageWriter;

/// Name of the tensor that holds the postcard-encoded manifest.
pub const MANIFEST_TENSOR: &str = "__manifest__";
/// The package format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Value of the `format` key in the safetensors header metadata.
pub const FORMAT_NAME: &str = "hiprune";
