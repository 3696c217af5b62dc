//! Writing a package atomically.
//!
//! Tensor bytes are streamed into spool files (one per alignment class: 4-, 2- and
//! 1-byte dtypes) in the output's folder as they are added, so memory use does not grow
//! with the model. [`PackageWriter::finish`] then writes header, spools and manifest
//! into a temp file in the same folder, syncs it and renames it over the output path.
//! Until that rename nothing exists at the output path; every temp file is removed on
//! error or when the writer is dropped unfinished.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::{Map, Value, json};
use tempfile::NamedTempFile;

use crate::error::{Error, Result};
use crate::format::validate::{check_kept_blocks, check_layer, check_removed_components};
use crate::format::{
    Dtype, FORMAT_NAME, FORMAT_VERSION, LayerEntry, MANIFEST_CRC_KEY, MANIFEST_TENSOR,
    MAX_HEADER_BYTES, MAX_TENSORS, Manifest, PackageInfo, Precision, TensorEntry,
};
use crate::quant::{Q4Kind, Q4Matrix, check_q4_dims};

/// Buffer size of each spool writer.
const SPOOL_BUFFER: usize = 1 << 20;

/// One spool: the bytes of every tensor of one alignment class, in the order added.
#[derive(Debug)]
struct Spool {
    file: BufWriter<NamedTempFile>,
    len: u64,
}

/// A tensor already spooled.
#[derive(Debug)]
struct Pending {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    crc32: u32,
    /// Index of its spool (see [`spool_of`]).
    spool: usize,
    /// Offset within its spool.
    offset: u64,
    len: u64,
}

/// The spool of a dtype: 0 for 4-byte, 1 for 2-byte, 2 for 1-byte elements. Spools
/// are concatenated in this order, so each tensor stays aligned to its element size.
fn spool_of(dtype: Dtype) -> usize {
    match dtype.size() {
        4 => 0,
        2 => 1,
        _ => 2,
    }
}

/// Streams tensors into a new package, written atomically by [`PackageWriter::finish`].
///
/// ```no_run
/// # fn main() -> hiprune::Result<()> {
/// use hiprune::format::{PackageInfo, PackageWriter};
/// let mut w = PackageWriter::create("model.hpk")?;
/// w.add_f32("pos_embed.pos_embed", &[4, 8], &[0.0; 32])?;
/// w.finish(PackageInfo::default())?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct PackageWriter {
    path: PathBuf,
    dir: PathBuf,
    file_name: String,
    spools: [Spool; 3],
    tensors: Vec<Pending>,
    names: HashSet<String>,
    layers: Vec<LayerEntry>,
    layer_names: HashSet<String>,
    /// Set when a spool write failed part-way: the spooled offsets are no longer
    /// trustworthy, so the package cannot be finished.
    broken: bool,
}

impl PackageWriter {
    /// Starts a package that [`finish`](Self::finish) will place at `path`. Creates
    /// the spool files in `path`'s folder now, so an unwritable folder fails here with
    /// [`Error::Io`] naming it.
    pub fn create(path: impl AsRef<Path>) -> Result<PackageWriter> {
        if cfg!(target_endian = "big") {
            return Err(Error::Unsupported {
                what: "writing packages on a big-endian machine".to_string(),
            });
        }
        let path = path.as_ref().to_path_buf();
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                Error::invalid(
                    "package path",
                    format!("`{}` does not end in a UTF-8 file name", path.display()),
                )
            })?
            .to_string();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let spool = |align: usize| -> Result<Spool> {
            let tmp = tempfile::Builder::new()
                .prefix(&format!(".{file_name}.spool{align}-"))
                .tempfile_in(&dir)
                .map_err(|e| Error::io(&dir, e))?;
            Ok(Spool {
                file: BufWriter::with_capacity(SPOOL_BUFFER, tmp),
                len: 0,
            })
        };
        let spools = [spool(4)?, spool(2)?, spool(1)?];
        Ok(PackageWriter {
            path,
            dir,
            file_name,
            spools,
            tensors: Vec::new(),
            names: HashSet::new(),
            layers: Vec::new(),
            layer_names: HashSet::new(),
            broken: false,
        })
    }

    /// The path the package will have once finished.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tensors added so far.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    fn check_usable(&self) -> Result<()> {
        if self.broken {
            return Err(Error::invalid(
                "package writer",
                "an earlier write failed; the package cannot be completed",
            ));
        }
        Ok(())
    }

    /// Checks that `name` may be added as a new tensor.
    fn check_name(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("tensor name", "must not be empty"));
        }
        if name == MANIFEST_TENSOR || name == "__metadata__" {
            return Err(Error::invalid(
                format!("tensor name `{name}`"),
                "reserved by the package format",
            ));
        }
        if self.names.contains(name) {
            return Err(Error::invalid(
                format!("tensor `{name}`"),
                "added twice to the package",
            ));
        }
        Ok(())
    }

    /// Checks the bytes of a tensor against its dtype and shape; returns its shape as
    /// stored.
    fn check_tensor(
        &self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        len: usize,
    ) -> Result<Vec<u64>> {
        self.check_name(name)?;
        let overflow = || Error::SizeOverflow {
            tensor: name.to_string(),
            shape: shape.iter().map(|&d| d as u64).collect(),
        };
        let expected = if shape.contains(&0) {
            Some(0)
        } else {
            shape
                .iter()
                .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        };
        let expected = expected.ok_or_else(overflow)?;
        if len != expected {
            return Err(Error::length(
                format!("bytes of tensor `{name}` ({dtype} {shape:?})"),
                expected,
                len,
            ));
        }
        let shape = shape
            .iter()
            .map(|&d| u64::try_from(d))
            .collect::<std::result::Result<Vec<u64>, _>>()
            .map_err(|_| overflow())?;
        Ok(shape)
    }

    /// Appends the tensor `name` (`bytes` little-endian, `shape.product() *
    /// dtype.size()` long). The bytes go straight to a spool file.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<()> {
        self.check_usable()?;
        let shape = self.check_tensor(name, dtype, shape, bytes.len())?;
        // Room for this tensor and the manifest.
        if self.tensors.len() + 2 > MAX_TENSORS {
            return Err(Error::TooManyTensors {
                path: self.path.clone(),
                count: self.tensors.len() + 2,
                max: MAX_TENSORS,
            });
        }
        let spool_index = spool_of(dtype);
        let spool = &mut self.spools[spool_index];
        if let Err(e) = spool.file.write_all(bytes) {
            self.broken = true;
            let spool_path = spool.file.get_ref().path().to_path_buf();
            return Err(Error::io(spool_path, e));
        }
        let offset = spool.len;
        spool.len += bytes.len() as u64;
        self.names.insert(name.to_string());
        self.tensors.push(Pending {
            name: name.to_string(),
            dtype,
            shape,
            crc32: crc32fast::hash(bytes),
            spool: spool_index,
            offset,
            len: bytes.len() as u64,
        });
        Ok(())
    }

    /// Appends an F32 tensor.
    pub fn add_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        self.add_tensor(name, Dtype::F32, shape, bytemuck::cast_slice(data))
    }

    /// Appends an F16 tensor.
    pub fn add_f16(&mut self, name: &str, shape: &[usize], data: &[f16]) -> Result<()> {
        self.add_tensor(name, Dtype::F16, shape, bytemuck::cast_slice(data))
    }

    /// Appends a BF16 tensor.
    pub fn add_bf16(&mut self, name: &str, shape: &[usize], data: &[bf16]) -> Result<()> {
        self.add_tensor(name, Dtype::Bf16, shape, bytemuck::cast_slice(data))
    }

    /// Appends a U8 tensor.
    pub fn add_u8(&mut self, name: &str, shape: &[usize], data: &[u8]) -> Result<()> {
        self.add_tensor(name, Dtype::U8, shape, data)
    }

    fn check_layer_name(&self, name: &str, parts: &[String]) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("layer name", "must not be empty"));
        }
        if self.layer_names.contains(name) {
            return Err(Error::invalid(
                format!("layer `{name}`"),
                "added twice to the package",
            ));
        }
        parts.iter().try_for_each(|p| self.check_name(p))
    }

    /// Appends the 4-bit layer `name` (`<name>.qweight`, `.scales` + `.offsets` for
    /// INT4, `.scales` for symmetric INT4 or `.absmax` for NF4, and an F32 `.bias` when given) and records its
    /// [`LayerEntry`]. Everything is checked before the first byte is written.
    pub fn add_q4_layer(&mut self, name: &str, m: &Q4Matrix, bias: Option<&[f32]>) -> Result<()> {
        self.check_usable()?;
        check_q4_dims(m.kind, name, m.k, m.group)?;
        m.view()?;
        let group = u32::try_from(m.group).map_err(|_| {
            Error::invalid(format!("layer `{name}`"), "group size does not fit in u32")
        })?;
        let entry = LayerEntry {
            name: name.to_string(),
            precision: match m.kind {
                Q4Kind::Int4 => Precision::Int4 { group },
                Q4Kind::Nf4 => Precision::Nf4 { block: group },
                Q4Kind::Int4Sym => Precision::Int4Sym { group },
            },
            out_features: m.n as u64,
            in_features: m.k as u64,
            has_bias: bias.is_some(),
        };
        let parts = entry.tensor_names();
        self.check_layer_name(name, &parts)?;
        if let Some(b) = bias
            && b.len() != m.n
        {
            return Err(Error::length(
                format!("bias of layer `{name}`"),
                m.n,
                b.len(),
            ));
        }
        let groups = m.k / m.group;
        let mut parts = parts.into_iter();
        let mut next = || parts.next().unwrap_or_default();
        self.add_u8(&next(), &[m.n, m.k / 2], &m.packed)?;
        self.add_f16(&next(), &[m.n, groups], &m.scales)?;
        if m.kind == Q4Kind::Int4 {
            self.add_f16(&next(), &[m.n, groups], &m.offsets)?;
        }
        if let Some(b) = bias {
            self.add_f32(&next(), &[m.n], b)?;
        }
        self.layer_names.insert(entry.name.clone());
        self.layers.push(entry);
        Ok(())
    }

    /// Appends the dense layer `name`: `<name>.weight` `[n, k]` in the dtype of
    /// `precision` (F32, F16 or BF16) from its little-endian `weight` bytes, and an
    /// F32 `.bias` when given; records its [`LayerEntry`].
    pub fn add_dense_layer(
        &mut self,
        name: &str,
        precision: Precision,
        n: usize,
        k: usize,
        weight: &[u8],
        bias: Option<&[f32]>,
    ) -> Result<()> {
        self.check_usable()?;
        let Some(dtype) = precision.dense_dtype() else {
            return Err(Error::invalid(
                format!("layer `{name}`"),
                format!("{precision} is not a dense precision; use add_q4_layer"),
            ));
        };
        if n == 0 || k == 0 {
            return Err(Error::invalid(
                format!("layer `{name}`"),
                format!("out_features ({n}) and in_features ({k}) must be at least 1"),
            ));
        }
        let entry = LayerEntry {
            name: name.to_string(),
            precision,
            out_features: n as u64,
            in_features: k as u64,
            has_bias: bias.is_some(),
        };
        let parts = entry.tensor_names();
        self.check_layer_name(name, &parts)?;
        self.check_tensor(&parts[0], dtype, &[n, k], weight.len())?;
        if let Some(b) = bias
            && b.len() != n
        {
            return Err(Error::length(format!("bias of layer `{name}`"), n, b.len()));
        }
        self.add_tensor(&parts[0], dtype, &[n, k], weight)?;
        if let Some(b) = bias {
            self.add_f32(&parts[1], &[n], b)?;
        }
        self.layer_names.insert(entry.name.clone());
        self.layers.push(entry);
        Ok(())
    }

    /// Records a layer whose tensors are added separately with
    /// [`add_tensor`](Self::add_tensor) (for example an F16 bias). Its tensors are
    /// checked against its precision at [`finish`](Self::finish).
    pub fn add_layer_entry(&mut self, entry: LayerEntry) -> Result<()> {
        if entry.name.is_empty() {
            return Err(Error::invalid("layer name", "must not be empty"));
        }
        if !self.layer_names.insert(entry.name.clone()) {
            return Err(Error::invalid(
                format!("layer `{}`", entry.name),
                "added twice to the package",
            ));
        }
        self.layers.push(entry);
        Ok(())
    }

    /// Writes the package and moves it into place; returns its path.
    ///
    /// The manifest is `info` plus the layers and tensors (with CRC-32s) recorded by
    /// this writer. Layers and `kept_blocks` are checked with the reader's rules first,
    /// so a package that finishes also opens. On error nothing is left at the output
    /// path and the temp files are removed. The one exception is a failure of the
    /// final folder sync, reported as [`Error::Io`] naming the folder: the package is
    /// then in place but may not survive a power loss.
    pub fn finish(self, info: PackageInfo) -> Result<PathBuf> {
        self.check_usable()?;
        check_kept_blocks(info.architecture.as_ref(), &info.kept_blocks)?;
        check_removed_components(
            info.architecture.as_ref(),
            &info.kept_blocks,
            &info.removed_components,
        )?;
        let shapes: HashMap<&str, (Dtype, &[u64])> = self
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), (t.dtype, t.shape.as_slice())))
            .collect();
        for layer in &self.layers {
            check_layer(layer, &shapes)?;
        }
        drop(shapes);

        let PackageWriter {
            path,
            dir,
            file_name,
            spools,
            tensors,
            layers,
            ..
        } = self;

        let mut spool_files = Vec::with_capacity(spools.len());
        let mut spool_lens = Vec::with_capacity(spools.len());
        for spool in spools {
            let spool_path = spool.file.get_ref().path().to_path_buf();
            let mut file = spool
                .file
                .into_inner()
                .map_err(|e| Error::io(&spool_path, e.into_error()))?;
            file.as_file_mut()
                .seek(SeekFrom::Start(0))
                .map_err(|e| Error::io(&spool_path, e))?;
            spool_lens.push(spool.len);
            spool_files.push(file);
        }
        let bases = [0, spool_lens[0], spool_lens[0] + spool_lens[1]];
        let manifest_start = bases[2] + spool_lens[2];

        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            architecture: info.architecture,
            kept_blocks: info.kept_blocks,
            layers,
            tensors: tensors
                .iter()
                .map(|t| TensorEntry {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    crc32: t.crc32,
                })
                .collect(),
            provenance: info.provenance,
            removed_components: info.removed_components,
        };
        let manifest_bytes = manifest.encode()?;

        let mut header = Map::new();
        header.insert(
            "__metadata__".to_string(),
            json!({
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION.to_string(),
                MANIFEST_CRC_KEY: format!("{:08x}", crc32fast::hash(&manifest_bytes)),
            }),
        );
        for t in &tensors {
            let begin = bases[t.spool] + t.offset;
            header.insert(
                t.name.clone(),
                json!({
                    "dtype": t.dtype.name(),
                    "shape": t.shape,
                    "data_offsets": [begin, begin + t.len],
                }),
            );
        }
        header.insert(
            MANIFEST_TENSOR.to_string(),
            json!({
                "dtype": Dtype::U8.name(),
                "shape": [manifest_bytes.len()],
                "data_offsets": [manifest_start, manifest_start + manifest_bytes.len() as u64],
            }),
        );
        let mut header = serde_json::to_vec(&Value::Object(header))
            .map_err(|e| Error::invalid("package header", format!("cannot encode: {e}")))?;
        // Pad with spaces so the data section, and with it every spool, starts 8-aligned.
        while (8 + header.len()) % 8 != 0 {
            header.push(b' ');
        }
        if header.len() as u64 > MAX_HEADER_BYTES {
            return Err(Error::HeaderTooLarge {
                path,
                header_len: header.len() as u64,
                max: MAX_HEADER_BYTES,
            });
        }

        let mut out = tempfile::Builder::new()
            .prefix(&format!(".{file_name}.tmp-"))
            .tempfile_in(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        let out_path = out.path().to_path_buf();
        let io = |e| Error::io(&out_path, e);
        {
            let f = out.as_file_mut();
            f.write_all(&(header.len() as u64).to_le_bytes())
                .map_err(io)?;
            f.write_all(&header).map_err(io)?;
            for (spool, &len) in spool_files.iter_mut().zip(&spool_lens) {
                let copied = std::io::copy(spool.as_file_mut(), f).map_err(io)?;
                if copied != len {
                    return Err(io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "spool {} held {copied} bytes, expected {len}",
                            spool.path().display()
                        ),
                    )));
                }
            }
            f.write_all(&manifest_bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        drop(spool_files);
        out.persist(&path).map_err(|e| Error::io(&path, e.error))?;
        sync_dir(&dir)?;
        Ok(path)
    }
}

/// Makes the rename that placed the package durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
