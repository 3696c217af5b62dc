//! The `.hpk` package: a valid safetensors file holding the weights plus a
//! postcard-encoded [`Manifest`] tensor named [`MANIFEST_TENSOR`].
//!
//! [`Package::open`] memory-maps a file and validates every rule before handing out any
//! view; [`PackageWriter`] writes one atomically (temp file in the same folder, fsync,
//! rename). See `docs/FORMAT.md` for the full specification.

pub mod manifest;
pub mod read;
mod validate;
pub mod write;

pub use manifest::{
    COMPONENT_NAMES, ComponentCut, Dtype, LayerEntry, Manifest, PackageInfo, Precision, Provenance,
    TensorEntry,
};
pub use read::{Package, TensorView};
pub use write::PackageWriter;

/// Name of the tensor that holds the postcard-encoded manifest.
pub const MANIFEST_TENSOR: &str = "__manifest__";
/// The package format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// Oldest package format version read (version 1 has no `removed_components`).
pub const MIN_FORMAT_VERSION: u32 = 1;

/// [`Error::UnsupportedFormatVersion`](crate::Error::UnsupportedFormatVersion) for a
/// version this build does not read.
pub fn check_format_version(version: u32) -> crate::Result<()> {
    if (MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        Ok(())
    } else {
        Err(crate::Error::UnsupportedFormatVersion {
            found: version,
            supported: FORMAT_VERSION,
        })
    }
}
/// Value of the `format` key in the safetensors header metadata.
pub const FORMAT_NAME: &str = "hiprune";
/// Header metadata key holding the CRC-32 of the manifest bytes (8 lowercase hex digits).
pub const MANIFEST_CRC_KEY: &str = "manifest_crc32";
/// Largest accepted JSON header, in bytes (the safetensors crate's own cap, so every
/// package stays readable by it).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Most tensors (the manifest included) a package may declare. A whole SD3.5 Large
/// model stores a few thousand.
pub const MAX_TENSORS: usize = 65_536;
