//! Opening and validating a package. (Being written.)

use std::path::Path;

use crate::error::Result;
use crate::format::Manifest;

/// A memory-mapped, validated package.
pub struct Package {
    manifest: Manifest,
}

/// A borrowed, validated tensor of a package.
pub struct TensorView<'a> {
    /// The tensor's bytes.
    pub data: &'a [u8],
}

impl Package {
    /// Maps and validates the package at `path`.
    pub fn open(_path: impl AsRef<Path>) -> Result<Package> {
        unimplemented!("format::read is being written")
    }

    /// The decoded manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}
