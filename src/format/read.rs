//! Opening a package and reading its tensors.
//!
//! [`Package::open`] maps the file read-only and checks every rule of `docs/FORMAT.md`
//! (`format/validate.rs`) before it returns, so each view it hands out afterwards is a
//! bounds-checked, correctly aligned, zero-copy slice of the map.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;

use super::validate::{PREFIX_LEN, TensorInfo, to_usize, validate};
use crate::error::{Error, Result};
use crate::format::{Dtype, LayerEntry, MANIFEST_TENSOR, Manifest};
use crate::quant::{Q4Kind, Q4Weights};

/// A memory-mapped, validated package.
///
/// The file must not be modified in place while it is open (replacing it with a
/// rename, as [`crate::format::PackageWriter`] does, is fine): the views borrow the
/// memory map directly.
pub struct Package {
    path: PathBuf,
    mmap: Mmap,
    metadata: BTreeMap<String, String>,
    /// Every header tensor, in file (offset) order.
    tensors: Vec<TensorInfo>,
    /// Tensor name to index in `tensors`.
    index: HashMap<String, usize>,
    manifest: Manifest,
    /// Layer name to index in `manifest.layers`.
    layer_index: HashMap<String, usize>,
    /// Tensor name to index in `manifest.tensors`.
    entry_index: HashMap<String, usize>,
}

/// A borrowed, validated tensor of a package.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    name: &'a str,
    dtype: Dtype,
    shape: &'a [usize],
    bytes: &'a [u8],
}

impl fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorView")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl<'a> TensorView<'a> {
    /// The tensor's name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The data as `f32`; the dtype must be F32.
    pub fn f32_slice(&self) -> Result<&'a [f32]> {
        self.cast(Dtype::F32)
    }

    /// The data as `f16`; the dtype must be F16.
    pub fn f16_slice(&self) -> Result<&'a [f16]> {
        self.cast(Dtype::F16)
    }

    /// The data as `bf16`; the dtype must be BF16.
    pub fn bf16_slice(&self) -> Result<&'a [bf16]> {
        self.cast(Dtype::Bf16)
    }

    /// The data as bytes; the dtype must be U8.
    pub fn u8_slice(&self) -> Result<&'a [u8]> {
        self.cast(Dtype::U8)
    }

    /// A copy converted to `f32`, from any floating-point dtype (U8 is refused).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self.dtype {
            Dtype::F32 => Ok(self.f32_slice()?.to_vec()),
            Dtype::F16 => Ok(self.f16_slice()?.iter().map(|v| v.to_f32()).collect()),
            Dtype::Bf16 => Ok(self.bf16_slice()?.iter().map(|v| v.to_f32()).collect()),
            Dtype::U8 => Err(Error::DtypeMismatch {
                tensor: self.name.to_string(),
                expected: "F32, F16 or BF16".to_string(),
                found: self.dtype.to_string(),
            }),
        }
    }

    fn cast<T: bytemuck::Pod>(&self, want: Dtype) -> Result<&'a [T]> {
        if self.dtype != want {
            return Err(Error::DtypeMismatch {
                tensor: self.name.to_string(),
                expected: want.to_string(),
                found: self.dtype.to_string(),
            });
        }
        bytemuck::try_cast_slice(self.bytes).map_err(|_| Error::Misaligned {
            tensor: self.name.to_string(),
            align: std::mem::align_of::<T>(),
        })
    }
}

impl fmt::Debug for Package {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Package")
            .field("path", &self.path)
            .field("file_len", &self.mmap.len())
            .field("tensors", &self.tensors.len())
            .field("layers", &self.manifest.layers.len())
            .finish()
    }
}

impl Package {
    /// Maps and validates the package at `path`.
    ///
    /// Every structural rule is checked here (header size and JSON, tensor count,
    /// dtypes, checked shape arithmetic, contiguous in-bounds offsets, alignment,
    /// metadata, manifest version, checksum and decoding, manifest against header,
    /// layer tensors, kept blocks); tensor checksums are left to [`Package::verify`]
    /// because they read every byte.
    pub fn open(path: impl AsRef<Path>) -> Result<Package> {
        let path = path.as_ref().to_path_buf();
        if cfg!(target_endian = "big") {
            return Err(Error::Unsupported {
                what: "reading packages on a big-endian machine".to_string(),
            });
        }
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < PREFIX_LEN as u64 {
            return Err(Error::FileTooShort { path, len });
        }
        // SAFETY: the map is read-only and private to this `Package`. Its soundness
        // rests on the file not being truncated or written in place while mapped; that
        // is the documented contract of `Package` (packages are only ever replaced
        // atomically by rename, which leaves this mapping's inode untouched).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let parsed = validate(&path, &mmap)?;
        Ok(Package {
            path,
            mmap,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            index: parsed.index,
            manifest: parsed.manifest,
            layer_index: parsed.layer_index,
            entry_index: parsed.entry_index,
        })
    }

    /// The decoded manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The file the package was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// The string metadata of the safetensors header (`format`, `format_version`,
    /// `manifest_crc32`, ...).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Names of the stored tensors in file order, the manifest tensor excluded.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| *n != MANIFEST_TENSOR)
    }

    /// Whether a tensor named `name` is stored.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// A zero-copy view of the tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self
            .index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_string(),
            })?;
        Ok(TensorView {
            name: &info.name,
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &self.mmap[info.start..info.end],
        })
    }

    /// The manifest entry of the linear layer `name` (without `.weight`).
    pub fn layer(&self, name: &str) -> Result<&LayerEntry> {
        self.layer_index
            .get(name)
            .map(|&i| &self.manifest.layers[i])
            .ok_or_else(|| Error::MissingLayer {
                layer: name.to_string(),
            })
    }

    /// A zero-copy view of the 4-bit (INT4 or NF4) layer `name`.
    pub fn q4_layer(&self, name: &str) -> Result<Q4Weights<'_>> {
        let layer = self.layer(name)?;
        let Some((kind, group)) = layer.precision.q4() else {
            return Err(Error::invalid(
                format!("layer `{name}`"),
                format!("stored as {}, not as a 4-bit matrix", layer.precision),
            ));
        };
        let n = to_usize(layer.out_features, name)?;
        let k = to_usize(layer.in_features, name)?;
        let packed = self.tensor(&format!("{name}.qweight"))?.u8_slice()?;
        let (scales, offsets) = match kind {
            Q4Kind::Int4 => (
                self.tensor(&format!("{name}.scales"))?.f16_slice()?,
                self.tensor(&format!("{name}.offsets"))?.f16_slice()?,
            ),
            Q4Kind::Nf4 => (
                self.tensor(&format!("{name}.absmax"))?.f16_slice()?,
                &[][..],
            ),
            Q4Kind::Int4Sym => (
                self.tensor(&format!("{name}.scales"))?.f16_slice()?,
                &[][..],
            ),
        };
        Q4Weights::new(kind, n, k, group, packed, scales, offsets)
    }

    /// The `<name>.weight` view of the dense (F32, F16 or BF16) layer `name`.
    pub fn dense_weight(&self, name: &str) -> Result<TensorView<'_>> {
        let layer = self.layer(name)?;
        if layer.precision.dense_dtype().is_none() {
            return Err(Error::invalid(
                format!("layer `{name}`"),
                format!("stored as {}, not as a dense matrix", layer.precision),
            ));
        }
        self.tensor(&format!("{name}.weight"))
    }

    /// The `<name>.bias` view of the layer `name`, if it has a bias.
    pub fn bias(&self, name: &str) -> Result<Option<TensorView<'_>>> {
        let layer = self.layer(name)?;
        if !layer.has_bias {
            return Ok(None);
        }
        self.tensor(&format!("{name}.bias")).map(Some)
    }

    /// Checks every tensor's CRC-32 against the manifest (reads the whole file).
    pub fn verify(&self) -> Result<()> {
        let results: Vec<Result<()>> = self
            .manifest
            .tensors
            .par_iter()
            .map(|entry| self.verify_tensor(&entry.name))
            .collect();
        results.into_iter().collect()
    }

    /// Checks the CRC-32 of the tensor `name` against the manifest.
    pub fn verify_tensor(&self, name: &str) -> Result<()> {
        let entry = self
            .entry_index
            .get(name)
            .map(|&i| &self.manifest.tensors[i])
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_string(),
            })?;
        let found = crc32fast::hash(self.tensor(name)?.bytes());
        if found != entry.crc32 {
            return Err(Error::ChecksumMismatch {
                tensor: name.to_string(),
                expected: entry.crc32,
                found,
            });
        }
        Ok(())
    }
}
