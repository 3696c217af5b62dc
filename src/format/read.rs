//! Opening and validating a package.
//!
//! [`Package::open`] maps the file read-only and checks every rule of `docs/FORMAT.md`
//! before it returns, so each view it hands out afterwards is a bounds-checked,
//! correctly aligned, zero-copy slice of the map.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

use crate::config::MmditConfig;
use crate::error::{Error, Result};
use crate::format::{
    Dtype, FORMAT_NAME, FORMAT_VERSION, LayerEntry, MANIFEST_CRC_KEY, MANIFEST_TENSOR,
    MAX_HEADER_BYTES, MAX_TENSORS, Manifest, Precision,
};
use crate::quant::{Q4Kind, Q4Weights, check_q4_dims};

/// Length of the little-endian header-length prefix.
const PREFIX_LEN: usize = 8;

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

/// One tensor of the header after validation.
#[derive(Debug)]
struct TensorInfo {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    shape_u64: Vec<u64>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
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

/// Everything [`validate`] derives from the bytes of a package.
struct Parsed {
    metadata: BTreeMap<String, String>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    manifest: Manifest,
    layer_index: HashMap<String, usize>,
    entry_index: HashMap<String, usize>,
}

/// One tensor entry of the JSON header, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The JSON header, as written, with the tensor count capped.
struct RawHeader {
    metadata: Option<BTreeMap<String, String>>,
    tensors: Vec<(String, RawTensor)>,
    /// Tensors declared, including those past the cap that were skipped.
    declared: usize,
}

/// Deserialises the header object entry by entry, keeping at most [`MAX_TENSORS`]
/// tensors; entries past the cap are only counted, never stored.
struct HeaderSeed;

impl<'de> DeserializeSeed<'de> for HeaderSeed {
    type Value = RawHeader;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<RawHeader, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for HeaderSeed {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of tensor entries and `__metadata__`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
        use serde::de::Error as _;
        let mut header = RawHeader {
            metadata: None,
            tensors: Vec::new(),
            declared: 0,
        };
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "__metadata__" {
                if header.metadata.is_some() {
                    return Err(A::Error::custom("`__metadata__` appears twice"));
                }
                header.metadata = Some(map.next_value()?);
                continue;
            }
            header.declared += 1;
            if header.declared > MAX_TENSORS {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            if !seen.insert(key.clone()) {
                return Err(A::Error::custom(format!("tensor `{key}` appears twice")));
            }
            let raw: RawTensor = map.next_value()?;
            header.tensors.push((key, raw));
        }
        Ok(header)
    }
}

fn invalid_header(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidHeader {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn not_a_package(path: &Path, reason: impl Into<String>) -> Error {
    Error::NotAPackage {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(what, format!("{v} does not fit in usize")))
}

fn shape_usize(shape: &[u64]) -> Vec<usize> {
    shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
        .collect()
}

/// Validates the whole file held in `bytes` (see [`Package::open`]).
fn validate(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.first_chunk::<PREFIX_LEN>() else {
        return Err(Error::FileTooShort {
            path: path.to_path_buf(),
            len: file_len,
        });
    };
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > MAX_HEADER_BYTES {
        return Err(Error::HeaderTooLarge {
            path: path.to_path_buf(),
            header_len,
            max: MAX_HEADER_BYTES,
        });
    }
    if header_len > file_len - PREFIX_LEN as u64 {
        return Err(Error::HeaderPastEnd {
            path: path.to_path_buf(),
            header_len,
            file_len,
        });
    }
    // Both fit in usize: header_len <= file_len, which is a slice length.
    let data_start = PREFIX_LEN + header_len as usize;
    let header_text = std::str::from_utf8(&bytes[PREFIX_LEN..data_start])
        .map_err(|e| invalid_header(path, format!("not UTF-8: {e}")))?;

    let mut de = serde_json::Deserializer::from_str(header_text);
    let raw = HeaderSeed
        .deserialize(&mut de)
        .and_then(|h| de.end().map(|()| h))
        .map_err(|e| invalid_header(path, e.to_string()))?;
    if raw.declared > MAX_TENSORS {
        return Err(Error::TooManyTensors {
            path: path.to_path_buf(),
            count: raw.declared,
            max: MAX_TENSORS,
        });
    }

    let metadata = check_metadata(path, raw.metadata)?;
    let tensors = check_tensors(path, raw.tensors, data_start, bytes.len())?;
    let index: HashMap<String, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();

    // The manifest: version first, then its checksum, then the full decoding.
    let manifest_info = index
        .get(MANIFEST_TENSOR)
        .map(|&i| &tensors[i])
        .ok_or_else(|| Error::MissingTensor {
            tensor: MANIFEST_TENSOR.to_string(),
        })?;
    if manifest_info.dtype != Dtype::U8 {
        return Err(Error::DtypeMismatch {
            tensor: MANIFEST_TENSOR.to_string(),
            expected: Dtype::U8.to_string(),
            found: manifest_info.dtype.to_string(),
        });
    }
    let manifest_bytes = &bytes[manifest_info.start..manifest_info.end];
    if manifest_info.shape.len() != 1 {
        return Err(Error::ShapeMismatch {
            tensor: MANIFEST_TENSOR.to_string(),
            expected: vec![manifest_bytes.len()],
            found: manifest_info.shape.clone(),
        });
    }
    let manifest = decode_manifest(manifest_bytes, &metadata, path)?;

    let entry_index = check_manifest_tensors(&manifest, &tensors, &index)?;
    let shapes: HashMap<&str, (Dtype, &[u64])> = tensors
        .iter()
        .map(|t| (t.name.as_str(), (t.dtype, t.shape_u64.as_slice())))
        .collect();
    let mut layer_index = HashMap::with_capacity(manifest.layers.len());
    for (i, layer) in manifest.layers.iter().enumerate() {
        if layer_index.insert(layer.name.clone(), i).is_some() {
            return Err(Error::ManifestCorrupt {
                reason: format!("layer `{}` is listed twice", layer.name),
            });
        }
        check_layer(layer, &shapes)?;
    }
    check_kept_blocks(manifest.architecture.as_ref(), &manifest.kept_blocks)?;

    Ok(Parsed {
        metadata,
        tensors,
        index,
        manifest,
        layer_index,
        entry_index,
    })
}

/// Checks the header metadata: `format`, `format_version`, `manifest_crc32` present.
fn check_metadata(
    path: &Path,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>> {
    let metadata =
        metadata.ok_or_else(|| not_a_package(path, "the header has no `__metadata__`"))?;
    match metadata.get("format") {
        Some(f) if f == FORMAT_NAME => {}
        Some(f) => {
            return Err(not_a_package(
                path,
                format!("metadata `format` is `{f}`, not `{FORMAT_NAME}`"),
            ));
        }
        None => return Err(not_a_package(path, "metadata has no `format` key")),
    }
    let version = metadata
        .get("format_version")
        .ok_or_else(|| not_a_package(path, "metadata has no `format_version` key"))?;
    let version: u32 = version.parse().map_err(|_| {
        not_a_package(
            path,
            format!("metadata `format_version` `{version}` is not a number"),
        )
    })?;
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedFormatVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if !metadata.contains_key(MANIFEST_CRC_KEY) {
        return Err(not_a_package(
            path,
            format!("metadata has no `{MANIFEST_CRC_KEY}` key"),
        ));
    }
    Ok(metadata)
}

/// Checks each tensor entry on its own (dtype, size, bounds, length) and then all of
/// them together (contiguous from 0, nothing after the last, aligned). Returns them in
/// file order with absolute byte ranges.
fn check_tensors(
    path: &Path,
    raw: Vec<(String, RawTensor)>,
    data_start: usize,
    file_len: usize,
) -> Result<Vec<TensorInfo>> {
    let data_len = (file_len - data_start) as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    let mut ranges = Vec::with_capacity(raw.len());
    for (name, t) in raw {
        let dtype = Dtype::from_name(&t.dtype).ok_or_else(|| {
            invalid_header(
                path,
                format!(
                    "tensor `{name}` has dtype `{}`; a package stores only U8, F16, BF16 and F32",
                    t.dtype
                ),
            )
        })?;
        // A zero dimension makes an empty tensor whatever the other dimensions are.
        let size = if t.shape.contains(&0) {
            Some(0)
        } else {
            t.shape
                .iter()
                .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
        };
        let size = size.ok_or_else(|| Error::SizeOverflow {
            tensor: name.clone(),
            shape: t.shape.clone(),
        })?;
        let [begin, end] = t.data_offsets;
        if begin > end || end > data_len {
            return Err(Error::TensorOutOfBounds {
                tensor: name,
                start: begin,
                end,
                data_len,
            });
        }
        if end - begin != size {
            return Err(Error::ByteLengthMismatch {
                tensor: name,
                expected: size,
                found: end - begin,
            });
        }
        let shape = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<usize>, _>>()
            .map_err(|_| Error::SizeOverflow {
                tensor: name.clone(),
                shape: t.shape.clone(),
            })?;
        ranges.push((begin, end));
        tensors.push(TensorInfo {
            name,
            dtype,
            shape,
            shape_u64: t.shape,
            // In bounds of the file, so these fit in usize.
            start: data_start + begin as usize,
            end: data_start + end as usize,
        });
    }
    tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));

    let mut expected = data_start;
    for t in &tensors {
        if t.start != expected {
            return Err(Error::NonContiguous {
                tensor: t.name.clone(),
                start: (t.start - data_start) as u64,
                expected: (expected - data_start) as u64,
            });
        }
        expected = t.end;
    }
    if expected != file_len {
        return Err(Error::TrailingBytes {
            path: path.to_path_buf(),
            extra: (file_len - expected) as u64,
        });
    }
    for t in &tensors {
        if t.start % t.dtype.size() != 0 {
            return Err(Error::Misaligned {
                tensor: t.name.clone(),
                align: t.dtype.size(),
            });
        }
    }
    Ok(tensors)
}

/// Decodes the manifest: the leading version alone, then the checksum recorded in the
/// header metadata, then the whole structure (with nothing left over).
fn decode_manifest(
    bytes: &[u8],
    metadata: &BTreeMap<String, String>,
    path: &Path,
) -> Result<Manifest> {
    Manifest::check_version(bytes)?;
    let recorded = metadata
        .get(MANIFEST_CRC_KEY)
        .ok_or_else(|| not_a_package(path, format!("metadata has no `{MANIFEST_CRC_KEY}` key")))?;
    let recorded = u32::from_str_radix(recorded, 16).map_err(|_| {
        not_a_package(
            path,
            format!("metadata `{MANIFEST_CRC_KEY}` `{recorded}` is not a hex CRC-32"),
        )
    })?;
    let found = crc32fast::hash(bytes);
    if found != recorded {
        return Err(Error::ManifestCorrupt {
            reason: format!(
                "its CRC-32 is {found:08x} but the header records {recorded:08x} (file corrupted)"
            ),
        });
    }
    let manifest = Manifest::decode(bytes)?;
    Ok(manifest)
}

/// Checks that the manifest declares exactly the header's tensors (the manifest tensor
/// aside), each with the header's dtype and shape. Returns name -> manifest index.
fn check_manifest_tensors(
    manifest: &Manifest,
    tensors: &[TensorInfo],
    index: &HashMap<String, usize>,
) -> Result<HashMap<String, usize>> {
    let mut declared = HashMap::with_capacity(manifest.tensors.len());
    for (i, entry) in manifest.tensors.iter().enumerate() {
        if entry.name == MANIFEST_TENSOR {
            return Err(Error::ManifestCorrupt {
                reason: format!("it declares the reserved tensor `{MANIFEST_TENSOR}`"),
            });
        }
        if declared.insert(entry.name.clone(), i).is_some() {
            return Err(Error::ManifestCorrupt {
                reason: format!("tensor `{}` is declared twice", entry.name),
            });
        }
        let info = index
            .get(&entry.name)
            .map(|&j| &tensors[j])
            .ok_or_else(|| Error::MissingTensor {
                tensor: entry.name.clone(),
            })?;
        if info.dtype != entry.dtype {
            return Err(Error::DtypeMismatch {
                tensor: entry.name.clone(),
                expected: entry.dtype.to_string(),
                found: info.dtype.to_string(),
            });
        }
        if info.shape_u64 != entry.shape {
            return Err(Error::ShapeMismatch {
                tensor: entry.name.clone(),
                expected: shape_usize(&entry.shape),
                found: info.shape.clone(),
            });
        }
    }
    for t in tensors {
        if t.name != MANIFEST_TENSOR && !declared.contains_key(&t.name) {
            return Err(Error::UndeclaredTensor {
                tensor: t.name.clone(),
            });
        }
    }
    Ok(declared)
}

/// Checks that the tensors of `layer` exist in `tensors` (name -> dtype, shape) with
/// the dtypes and shapes its precision implies, and that its group size is valid.
pub(crate) fn check_layer(
    layer: &LayerEntry,
    tensors: &HashMap<&str, (Dtype, &[u64])>,
) -> Result<()> {
    let name = &layer.name;
    let (n, k) = (layer.out_features, layer.in_features);
    if n == 0 || k == 0 {
        return Err(Error::invalid(
            format!("layer `{name}`"),
            format!("out_features ({n}) and in_features ({k}) must be at least 1"),
        ));
    }
    if let Precision::Sincos2d {
        grid,
        base_size,
        source,
        dtype,
    } = layer.precision
    {
        return check_computed_table(layer, grid, base_size, source, dtype, tensors);
    }
    // (tensor, dtype or None for "any float", shape)
    let mut expect: Vec<(String, Option<Dtype>, Vec<u64>)> = Vec::with_capacity(4);
    match layer.precision.q4() {
        Some((kind, group)) => {
            check_q4_dims(kind, name, to_usize(k, name)?, group)?;
            let groups = k / group as u64;
            expect.push((format!("{name}.qweight"), Some(Dtype::U8), vec![n, k / 2]));
            match kind {
                Q4Kind::Int4 => {
                    expect.push((format!("{name}.scales"), Some(Dtype::F16), vec![n, groups]));
                    expect.push((format!("{name}.offsets"), Some(Dtype::F16), vec![n, groups]));
                }
                Q4Kind::Nf4 => {
                    expect.push((format!("{name}.absmax"), Some(Dtype::F16), vec![n, groups]));
                }
                Q4Kind::Int4Sym => {
                    expect.push((format!("{name}.scales"), Some(Dtype::F16), vec![n, groups]));
                    let stray = format!("{name}.offsets");
                    if tensors.contains_key(stray.as_str()) {
                        return Err(Error::UnexpectedTensor {
                            tensor: stray,
                            reason: format!(
                                "layer `{name}` is symmetric INT4 ({}), which stores no offsets",
                                layer.precision
                            ),
                        });
                    }
                }
            }
        }
        None => {
            expect.push((
                format!("{name}.weight"),
                layer.precision.dense_dtype(),
                vec![n, k],
            ));
        }
    }
    if layer.has_bias {
        expect.push((format!("{name}.bias"), None, vec![n]));
    }
    for (tensor, dtype, shape) in expect {
        let Some(&(found_dtype, found_shape)) = tensors.get(tensor.as_str()) else {
            return Err(Error::MissingTensor { tensor });
        };
        let dtype_ok = match dtype {
            Some(d) => d == found_dtype,
            None => found_dtype.is_float(),
        };
        if !dtype_ok {
            return Err(Error::DtypeMismatch {
                tensor,
                expected: dtype.map_or_else(|| "F32, F16 or BF16".to_string(), |d| d.to_string()),
                found: found_dtype.to_string(),
            });
        }
        if found_shape != shape.as_slice() {
            return Err(Error::ShapeMismatch {
                tensor,
                expected: shape_usize(&shape),
                found: shape_usize(found_shape),
            });
        }
    }
    Ok(())
}

/// Checks a [`Precision::Sincos2d`] entry: a square grid of `D`-wide rows with `D` a
/// multiple of 4 (two halves of sin and cos), no bias, float dtypes, and no stored
/// tensor under its name.
fn check_computed_table(
    layer: &LayerEntry,
    grid: u32,
    base_size: u32,
    source: Dtype,
    dtype: Dtype,
    tensors: &HashMap<&str, (Dtype, &[u64])>,
) -> Result<()> {
    let name = &layer.name;
    let what = format!("layer `{name}`");
    if tensors.contains_key(name.as_str()) {
        return Err(Error::UnexpectedTensor {
            tensor: name.clone(),
            reason: "the manifest declares this table as computed at load, not stored".to_string(),
        });
    }
    if layer.has_bias {
        return Err(Error::invalid(what, "a computed table has no bias"));
    }
    if grid == 0 || base_size == 0 {
        return Err(Error::invalid(
            what,
            format!("grid ({grid}) and base_size ({base_size}) must be at least 1"),
        ));
    }
    if layer.out_features != u64::from(grid) * u64::from(grid) {
        return Err(Error::invalid(
            what,
            format!(
                "out_features {} is not grid * grid = {grid} * {grid}",
                layer.out_features
            ),
        ));
    }
    if !layer.in_features.is_multiple_of(4) {
        return Err(Error::invalid(
            what,
            format!(
                "in_features {} is not a multiple of 4 (sin and cos of two coordinates)",
                layer.in_features
            ),
        ));
    }
    if !source.is_float() || !dtype.is_float() {
        return Err(Error::invalid(
            what,
            format!("dtypes {source} and {dtype} must be F32, F16 or BF16"),
        ));
    }
    Ok(())
}

/// Checks `kept_blocks`: no index twice and, with an architecture, each below its
/// `num_layers`.
pub(crate) fn check_kept_blocks(architecture: Option<&MmditConfig>, kept: &[u32]) -> Result<()> {
    let mut seen = HashSet::with_capacity(kept.len());
    for &b in kept {
        if !seen.insert(b) {
            return Err(Error::invalid(
                "manifest field `kept_blocks`",
                format!("block {b} is listed twice"),
            ));
        }
        if let Some(arch) = architecture
            && b as usize >= arch.num_layers
        {
            return Err(Error::invalid(
                "manifest field `kept_blocks`",
                format!(
                    "block {b} does not exist: the architecture has {} blocks",
                    arch.num_layers
                ),
            ));
        }
    }
    Ok(())
}
