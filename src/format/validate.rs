//! The rules of a package (`docs/FORMAT.md`), checked on its bytes before any view is
//! handed out: the header prefix and size, the JSON header (dtypes, shapes, offsets in
//! bounds and contiguous, with checked arithmetic), the metadata, the manifest and its
//! CRC, every layer's tensors against the manifest. [`super::read`] maps a file and
//! runs [`validate`]; the writer runs the layer rules on what it is about to write.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use std::fmt;

use crate::config::MmditConfig;
use crate::error::{Error, Result};
use crate::format::{
    COMPONENT_NAMES, ComponentCut, Dtype, FORMAT_NAME, LayerEntry, MANIFEST_CRC_KEY,
    MANIFEST_TENSOR, MAX_HEADER_BYTES, MAX_TENSORS, Manifest, Precision, check_format_version,
};
use crate::quant::{Q4Kind, check_q4_dims};

/// Length of the little-endian header-length prefix.
pub(super) const PREFIX_LEN: usize = 8;

/// One tensor of the header after validation.
#[derive(Debug)]
pub(super) struct TensorInfo {
    pub(super) name: String,
    pub(super) dtype: Dtype,
    pub(super) shape: Vec<usize>,
    pub(super) shape_u64: Vec<u64>,
    /// Absolute byte range in the file.
    pub(super) start: usize,
    pub(super) end: usize,
}

/// Everything [`validate`] derives from the bytes of a package.
pub(super) struct Parsed {
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) tensors: Vec<TensorInfo>,
    pub(super) index: HashMap<String, usize>,
    pub(super) manifest: Manifest,
    pub(super) layer_index: HashMap<String, usize>,
    pub(super) entry_index: HashMap<String, usize>,
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

pub(super) fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(what, format!("{v} does not fit in usize")))
}

fn shape_usize(shape: &[u64]) -> Vec<usize> {
    shape
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
        .collect()
}

/// Validates the whole file held in `bytes` (see [`super::Package::open`]).
pub(super) fn validate(path: &Path, bytes: &[u8]) -> Result<Parsed> {
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
    check_removed_components(
        manifest.architecture.as_ref(),
        &manifest.kept_blocks,
        &manifest.removed_components,
    )?;

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
    check_format_version(version)?;
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
    let version = Manifest::check_version(bytes)?;
    if metadata.get("format_version").map(String::as_str) != Some(version.to_string().as_str()) {
        return Err(Error::ManifestCorrupt {
            reason: format!(
                "it is format version {version} but the header metadata says {:?}",
                metadata.get("format_version")
            ),
        });
    }
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

/// Checks `removed_components`: each entry a block that runs (in `kept_blocks`, or in
/// the architecture when every block is kept), listed once, with known component names
/// each once, `attn2` only in a dual-attention block.
pub(crate) fn check_removed_components(
    architecture: Option<&MmditConfig>,
    kept: &[u32],
    cuts: &[ComponentCut],
) -> Result<()> {
    let field = "manifest field `removed_components`";
    let mut seen = HashSet::with_capacity(cuts.len());
    for cut in cuts {
        let b = cut.block;
        if !seen.insert(b) {
            return Err(Error::invalid(field, format!("block {b} is listed twice")));
        }
        let runs = if kept.is_empty() {
            architecture.is_some_and(|a| (b as usize) < a.num_layers)
        } else {
            kept.contains(&b)
        };
        if !runs {
            return Err(Error::invalid(
                field,
                format!("block {b} is not a block the model runs"),
            ));
        }
        if cut.components.is_empty() {
            return Err(Error::invalid(
                field,
                format!("block {b} lists no component"),
            ));
        }
        let mut names = HashSet::new();
        for c in &cut.components {
            if !COMPONENT_NAMES.contains(&c.as_str()) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "block {b}: `{c}` is not one of {}",
                        COMPONENT_NAMES.join(", ")
                    ),
                ));
            }
            if !names.insert(c.as_str()) {
                return Err(Error::invalid(
                    field,
                    format!("block {b}: `{c}` is listed twice"),
                ));
            }
            if c == "attn2" && architecture.is_some_and(|a| !a.is_dual(b as usize)) {
                return Err(Error::invalid(
                    field,
                    format!("block {b} has no `attn2` (not a dual-attention block)"),
                ));
            }
        }
    }
    Ok(())
}
