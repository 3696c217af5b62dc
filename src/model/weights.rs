//! [`Weights`]: the tensors of an MMDiT transformer by their diffusers names (original
//! block indices), from a diffusers folder (one or sharded safetensors files, F32/F16/
//! BF16, memory-mapped), from an `.hpk` [`Package`], or from memory.
//!
//! Linear layers are handed out as [`LinearWeights`] views without copying: dense
//! views straight into the memory map (a tensor whose bytes are not aligned for its
//! element type is copied once at load), or the package's 4-bit layers. The positional
//! table is handed out the same way as a [`PosTable`] (a view in its stored dtype, or
//! only the parameters of a computed table), from which a forward converts or computes
//! just the crop it needs. Other tensors (biases, the patch convolution, qk-norm
//! weights) are read as f32 copies.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::backend::LinearSource;
use crate::error::{Error, Result};
use crate::format::{Dtype, Package, Precision, TensorView};
use crate::model::tensor::{Tensor, floats_to_f32};
use crate::quant::{DenseData, LinearWeights, Q4Matrix};

/// Name of the positional table of the patch embedding, `[1, grid * grid, D]`.
pub const POS_TABLE: &str = "pos_embed.pos_embed";

/// Name of a single-file diffusers checkpoint.
pub const SINGLE_FILE: &str = "diffusion_pytorch_model.safetensors";
/// Name of the index of a sharded diffusers checkpoint.
pub const SHARD_INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

/// A tensor given in memory to [`Weights::from_memory`].
#[derive(Debug, Clone)]
pub enum MemoryTensor {
    /// A dense f32 tensor (a linear weight is `[N, K]`).
    F32(Tensor),
    /// A 4-bit linear weight (the layer's `.weight`).
    Q4(Q4Matrix),
}

enum Entry {
    Mapped {
        file: usize,
        start: usize,
        end: usize,
        dtype: StDtype,
        shape: Vec<usize>,
    },
    Packaged,
    /// A table the package declares computed ([`Precision::Sincos2d`]), and its width.
    Computed(Precision, u64),
    F32(Tensor),
    Q4(Q4Matrix),
}

enum Source {
    Files(Vec<Mmap>),
    Package(Box<Package>),
    Memory,
}

/// The weights of one model, looked up by diffusers tensor name.
pub struct Weights {
    source: Source,
    entries: HashMap<String, Entry>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.source {
            Source::Files(m) => format!("{} safetensors file(s)", m.len()),
            Source::Package(p) => format!("package {}", p.path().display()),
            Source::Memory => "memory".to_string(),
        };
        f.debug_struct("Weights")
            .field("source", &source)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and owned by `Weights`; like `Package`, soundness
    // rests on the checkpoint not being truncated or rewritten in place while loaded
    // (the documented contract of `Weights::from_folder`).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn is_aligned(bytes: &[u8], dtype: StDtype) -> bool {
    let align = match dtype {
        StDtype::F32 => 4,
        StDtype::F16 | StDtype::BF16 => 2,
        _ => 1,
    };
    (bytes.as_ptr() as usize).is_multiple_of(align)
}

/// Largest shard index json accepted (SD3.5 Large's is about 100 KiB).
pub const MAX_INDEX_FILE_BYTES: u64 = 64 << 20;

impl Weights {
    /// Loads a diffusers transformer folder: `diffusion_pytorch_model.safetensors`, or
    /// the shards listed by `diffusion_pytorch_model.safetensors.index.json`. The files
    /// are memory-mapped and must not be modified in place while loaded.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Weights> {
        let dir = dir.as_ref();
        let index = dir.join(SHARD_INDEX);
        let (files, weight_map): (Vec<PathBuf>, Option<HashMap<String, String>>) =
            if index.is_file() {
                let text = crate::io::read_text_capped(&index, MAX_INDEX_FILE_BYTES)?;
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| Error::InvalidHeader {
                        path: index.clone(),
                        reason: e.to_string(),
                    })?;
                let map: HashMap<String, String> = json
                    .get("weight_map")
                    .cloned()
                    .and_then(|v| serde_json::from_value(v).ok())
                    .ok_or_else(|| Error::InvalidHeader {
                        path: index.clone(),
                        reason: "no `weight_map` object of tensor name to file name".to_string(),
                    })?;
                let names: BTreeSet<&String> = map.values().collect();
                for n in &names {
                    if n.contains('/') || n.contains('\\') || n.as_str() == ".." {
                        return Err(Error::InvalidHeader {
                            path: index.clone(),
                            reason: format!("shard name `{n}` is not a plain file name"),
                        });
                    }
                }
                let files = names.iter().map(|n| dir.join(n)).collect();
                (files, Some(map))
            } else {
                (vec![dir.join(SINGLE_FILE)], None)
            };
        let mut maps = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        let mut owner: HashMap<String, PathBuf> = HashMap::new();
        for (fi, path) in files.iter().enumerate() {
            let mmap = map_file(path)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::InvalidHeader {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.iter() {
                let bytes = view.data();
                let entry = if is_aligned(bytes, view.dtype()) {
                    let start = bytes.as_ptr() as usize - base;
                    Entry::Mapped {
                        file: fi,
                        start,
                        end: start + bytes.len(),
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                    }
                } else {
                    let data = floats_to_f32(name, view.dtype(), bytes)?;
                    Entry::F32(Tensor::new(data, view.shape().to_vec())?)
                };
                if owner.insert(name.to_string(), path.clone()).is_some() {
                    return Err(Error::InvalidHeader {
                        path: path.clone(),
                        reason: format!("tensor `{name}` is stored in two shards"),
                    });
                }
                entries.insert(name.to_string(), entry);
            }
            drop(st);
            maps.push(mmap);
        }
        if let Some(map) = weight_map {
            for (name, file) in map {
                match owner.get(&name) {
                    Some(p) if p.file_name().is_some_and(|f| f == file.as_str()) => {}
                    _ => return Err(Error::MissingTensor { tensor: name }),
                }
            }
        }
        Ok(Weights {
            source: Source::Files(maps),
            entries,
        })
    }

    /// Uses an opened package: its layers keep the precision of the manifest; a table
    /// it declares computed (the sin-cos positional table) is computed when read.
    pub fn from_package(package: Package) -> Weights {
        let entries = package
            .tensor_names()
            .map(|n| (n.to_string(), Entry::Packaged))
            .chain(package.manifest().layers.iter().map(|l| {
                if l.precision.is_computed() {
                    (l.name.clone(), Entry::Computed(l.precision, l.in_features))
                } else {
                    (format!("{}.weight", l.name), Entry::Packaged)
                }
            }))
            .collect();
        Weights {
            source: Source::Package(Box::new(package)),
            entries,
        }
    }

    /// Weights held in memory, by tensor name (a 4-bit linear weight under
    /// `<layer>.weight`).
    pub fn from_memory(tensors: HashMap<String, MemoryTensor>) -> Weights {
        let entries = tensors
            .into_iter()
            .map(|(n, t)| {
                let e = match t {
                    MemoryTensor::F32(t) => Entry::F32(t),
                    MemoryTensor::Q4(q) => Entry::Q4(q),
                };
                (n, e)
            })
            .collect();
        Weights {
            source: Source::Memory,
            entries,
        }
    }

    /// The package these weights come from, if any.
    pub fn package(&self) -> Option<&Package> {
        match &self.source {
            Source::Package(p) => Some(p),
            _ => None,
        }
    }

    /// Tells the operating system that the mapped bytes of tensor `name` are not needed
    /// any more: their pages leave this process's resident set (they stay in the page
    /// cache and are read again if touched). For streaming a large checkpoint once
    /// without its pages piling up in the resident set. A no-op for tensors that are
    /// not memory-mapped and on non-Unix systems.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let (
            Some(Entry::Mapped {
                file, start, end, ..
            }),
            Source::Files(maps),
        ) = (self.entries.get(name), &self.source)
        {
            let map = &maps[*file];
            // SAFETY: the map is a read-only shared mapping of a file; MADV_DONTNEED on
            // it only drops page-table entries, so later reads (including through slices
            // still borrowed from it) fault the same file bytes back in. memmap2 checks
            // that the range lies inside the map. A failure only means the pages stay.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, *start, end - start)
            };
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// Whether a tensor named `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_string(),
        })
    }

    fn mapped_bytes(&self, file: usize, start: usize, end: usize) -> &[u8] {
        match &self.source {
            Source::Files(maps) => &maps[file][start..end],
            _ => &[],
        }
    }

    /// The linear layer `layer` (its `<layer>.weight`) as a `[n, k]` view, checked
    /// against the expected shape.
    pub fn linear(&self, layer: &str, n: usize, k: usize) -> Result<LinearWeights<'_>> {
        let name = format!("{layer}.weight");
        let mismatch = |found: Vec<usize>| Error::ShapeMismatch {
            tensor: name.clone(),
            expected: vec![n, k],
            found,
        };
        let w = match self.entry(&name)? {
            Entry::Mapped {
                file,
                start,
                end,
                dtype,
                shape,
            } => {
                if shape.as_slice() != [n, k] {
                    return Err(mismatch(shape.clone()));
                }
                let bytes = self.mapped_bytes(*file, *start, *end);
                let data = dense_from_bytes(&name, *dtype, bytes)?;
                LinearWeights::dense(data, n, k)?
            }
            Entry::F32(t) => {
                if t.shape.as_slice() != [n, k] {
                    return Err(mismatch(t.shape.clone()));
                }
                LinearWeights::dense(DenseData::F32(&t.data), n, k)?
            }
            Entry::Q4(q) => LinearWeights::Q4(q.view()?),
            Entry::Computed(..) => return Err(Error::MissingTensor { tensor: name }),
            Entry::Packaged => {
                let Some(p) = self.package() else {
                    return Err(Error::MissingTensor { tensor: name });
                };
                match p.layer(layer).ok().map(|l| l.precision) {
                    Some(prec) if prec.q4().is_some() => LinearWeights::Q4(p.q4_layer(layer)?),
                    _ => {
                        let view = p.tensor(&name)?;
                        if view.shape() != [n, k] {
                            return Err(mismatch(view.shape().to_vec()));
                        }
                        LinearWeights::dense(dense_from_view(&name, &view)?, n, k)?
                    }
                }
            }
        };
        if w.n() != n || w.k() != k {
            return Err(mismatch(vec![w.n(), w.k()]));
        }
        Ok(w)
    }

    /// A copy of the tensor `name` as f32, checked against `shape`.
    pub fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (data, found) = match self.entry(name)? {
            Entry::Mapped {
                file,
                start,
                end,
                dtype,
                shape,
            } => (
                floats_to_f32(name, *dtype, self.mapped_bytes(*file, *start, *end))?,
                shape.clone(),
            ),
            Entry::F32(t) => (t.data.clone(), t.shape.clone()),
            Entry::Q4(_) => return Err(float_dtype_error(name, "4-bit")),
            Entry::Computed(prec, dim) => computed_table(name, *prec, *dim, shape)?,
            Entry::Packaged => {
                let p = self.package().ok_or_else(|| Error::MissingTensor {
                    tensor: name.to_string(),
                })?;
                let view = p.tensor(name)?;
                (view.to_f32_vec()?, view.shape().to_vec())
            }
        };
        if found != shape {
            return Err(Error::ShapeMismatch {
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        Ok(data)
    }
}

impl Weights {
    /// The positional table `name` (`[1, grid * grid, dim]`) as held, without copying
    /// it: a view of its stored elements (from the memory map, the package, or
    /// memory), or the parameters of a table the package declares computed. Errors: a
    /// missing tensor, a shape other than `[1, grid * grid, dim]` (checked before
    /// anything is computed), a 4-bit or non-float tensor.
    pub fn pos_table(&self, name: &str, grid: usize, dim: usize) -> Result<PosTable<'_>> {
        let expected = vec![1, grid.saturating_mul(grid), dim];
        let mismatch = |found: Vec<usize>| Error::ShapeMismatch {
            tensor: name.to_string(),
            expected: expected.clone(),
            found,
        };
        let (data, found) = match self.entry(name)? {
            Entry::Mapped {
                file,
                start,
                end,
                dtype,
                shape,
            } => (
                dense_from_bytes(name, *dtype, self.mapped_bytes(*file, *start, *end))?,
                shape.clone(),
            ),
            Entry::F32(t) => (DenseData::F32(&t.data), t.shape.clone()),
            Entry::Q4(_) => return Err(float_dtype_error(name, "4-bit")),
            Entry::Computed(prec, width) => {
                let Precision::Sincos2d {
                    grid: g,
                    base_size,
                    source,
                    dtype,
                } = *prec
                else {
                    return Err(Error::MissingTensor {
                        tensor: name.to_string(),
                    });
                };
                let g = g as usize;
                let width = usize::try_from(*width).unwrap_or(usize::MAX);
                let found = vec![1, g.saturating_mul(g), width];
                if found != expected || g != grid {
                    return Err(mismatch(found));
                }
                // Validates the sizes (and that the chain holds float dtypes only) with
                // an empty crop, so a bad manifest fails at load, not in a forward.
                let chain = [source, dtype];
                super::pos_embed::sincos_2d_crop(
                    grid,
                    base_size as usize,
                    dim,
                    &chain,
                    0,
                    0,
                    0,
                    0,
                )?;
                return Ok(PosTable::Sincos2d {
                    grid,
                    base_size: base_size as usize,
                    dim,
                    chain,
                });
            }
            Entry::Packaged => {
                let p = self.package().ok_or_else(|| Error::MissingTensor {
                    tensor: name.to_string(),
                })?;
                let view = p.tensor(name)?;
                (dense_from_view(name, &view)?, view.shape().to_vec())
            }
        };
        if found != expected {
            return Err(mismatch(found));
        }
        let len = match data {
            DenseData::F32(d) => d.len(),
            DenseData::F16(d) => d.len(),
            DenseData::Bf16(d) => d.len(),
        };
        if grid.checked_mul(grid).and_then(|g2| g2.checked_mul(dim)) != Some(len) {
            return Err(Error::length(
                format!("tensor `{name}`"),
                grid.saturating_mul(grid).saturating_mul(dim),
                len,
            ));
        }
        Ok(PosTable::Stored { data, grid, dim })
    }
}

/// The positional table of the patch embedding as [`Weights`] hold it
/// ([`Weights::pos_table`]): a forward reads only the crop of the grid it needs.
#[derive(Debug, Clone, Copy)]
pub enum PosTable<'a> {
    /// Stored elements `[grid * grid, dim]` in their dtype, not copied.
    Stored {
        /// The elements, row `r * grid + c` for grid cell (r, c).
        data: DenseData<'a>,
        /// Side of the square grid.
        grid: usize,
        /// Width of a row.
        dim: usize,
    },
    /// diffusers' 2D sin-cos table, computed on demand
    /// ([`sincos_2d_crop`](super::pos_embed::sincos_2d_crop)); nothing is held.
    Sincos2d {
        /// Side of the square grid.
        grid: usize,
        /// diffusers' `base_size`.
        base_size: usize,
        /// Width of a row.
        dim: usize,
        /// The dtypes the f32 values are rounded through, in order.
        chain: [Dtype; 2],
    },
}

impl PosTable<'_> {
    /// Side of the square grid.
    pub fn grid(&self) -> usize {
        match *self {
            PosTable::Stored { grid, .. } | PosTable::Sincos2d { grid, .. } => grid,
        }
    }

    /// Width of a row.
    pub fn dim(&self) -> usize {
        match *self {
            PosTable::Stored { dim, .. } | PosTable::Sincos2d { dim, .. } => dim,
        }
    }

    /// Bytes the table occupies as held: its stored elements, 0 for a computed table.
    pub fn held_bytes(&self) -> u64 {
        match self {
            PosTable::Stored { data, .. } => match data {
                DenseData::F32(d) => 4 * d.len() as u64,
                DenseData::F16(d) => 2 * d.len() as u64,
                DenseData::Bf16(d) => 2 * d.len() as u64,
            },
            PosTable::Sincos2d { .. } => 0,
        }
    }

    /// Grid rows `top..top + height` by columns `left..left + width` as f32,
    /// `[height * width, dim]` in row-major order: exactly the values of the
    /// corresponding rows of the full table widened to f32. Errors: a crop outside the
    /// grid.
    pub fn crop(&self, top: usize, left: usize, height: usize, width: usize) -> Result<Vec<f32>> {
        match *self {
            PosTable::Sincos2d {
                grid,
                base_size,
                dim,
                chain,
            } => super::pos_embed::sincos_2d_crop(
                grid, base_size, dim, &chain, top, left, height, width,
            ),
            PosTable::Stored { data, grid, dim } => {
                let inside =
                    |start: usize, len: usize| start.checked_add(len).is_some_and(|e| e <= grid);
                if !inside(top, height) || !inside(left, width) {
                    return Err(Error::invalid(
                        "positional table",
                        format!(
                            "crop of {height} x {width} at ({top}, {left}) is outside the \
                             {grid} x {grid} grid"
                        ),
                    ));
                }
                let mut out = vec![0.0f32; height * width * dim];
                if width == 0 || dim == 0 {
                    return Ok(out);
                }
                out.par_chunks_exact_mut(width * dim)
                    .enumerate()
                    .for_each(|(r, dst)| {
                        let start = ((top + r) * grid + left) * dim;
                        let range = start..start + width * dim;
                        match data {
                            DenseData::F32(d) => dst.copy_from_slice(&d[range]),
                            DenseData::F16(d) => d[range].convert_to_f32_slice(dst),
                            DenseData::Bf16(d) => d[range].convert_to_f32_slice(dst),
                        }
                    });
                Ok(out)
            }
        }
    }
}

impl LinearSource for Weights {
    fn linear_weights(&self, layer: &str, n: usize, k: usize) -> Result<LinearWeights<'_>> {
        self.linear(layer, n, k)
    }
}

/// Computes the table `name` that a package declares as `prec` with width `dim`, after
/// checking its shape `[1, grid * grid, dim]` against `shape`; returns the data and
/// its shape.
fn computed_table(
    name: &str,
    prec: Precision,
    dim: u64,
    shape: &[usize],
) -> Result<(Vec<f32>, Vec<usize>)> {
    let Precision::Sincos2d {
        grid,
        base_size,
        source,
        dtype,
    } = prec
    else {
        return Err(Error::MissingTensor {
            tensor: name.to_string(),
        });
    };
    let grid = grid as usize;
    let dim = usize::try_from(dim).unwrap_or(usize::MAX);
    let found = vec![1, grid.saturating_mul(grid), dim];
    if found != shape {
        // Reported before anything is computed, so a manifest cannot make the model
        // allocate a table larger than the config implies.
        return Err(Error::ShapeMismatch {
            tensor: name.to_string(),
            expected: shape.to_vec(),
            found,
        });
    }
    let data = super::pos_embed::sincos_2d_table(grid, base_size as usize, dim, &[source, dtype])?;
    Ok((data, found))
}

fn float_dtype_error(name: &str, found: &str) -> Error {
    Error::DtypeMismatch {
        tensor: name.to_string(),
        expected: "F32, F16 or BF16".to_string(),
        found: found.to_string(),
    }
}

/// The elements of a package tensor `name` as a borrowed float view; an error for a
/// non-float dtype.
fn dense_from_view<'a>(name: &str, view: &TensorView<'a>) -> Result<DenseData<'a>> {
    Ok(match view.dtype() {
        Dtype::F32 => DenseData::F32(view.f32_slice()?),
        Dtype::F16 => DenseData::F16(view.f16_slice()?),
        Dtype::Bf16 => DenseData::Bf16(view.bf16_slice()?),
        Dtype::U8 => return Err(float_dtype_error(name, "U8")),
    })
}

fn dense_from_bytes<'a>(name: &str, dtype: StDtype, bytes: &'a [u8]) -> Result<DenseData<'a>> {
    let misaligned = |align| Error::Misaligned {
        tensor: name.to_string(),
        align,
    };
    Ok(match dtype {
        StDtype::F32 => {
            DenseData::F32(bytemuck::try_cast_slice::<u8, f32>(bytes).map_err(|_| misaligned(4))?)
        }
        StDtype::F16 => {
            DenseData::F16(bytemuck::try_cast_slice::<u8, f16>(bytes).map_err(|_| misaligned(2))?)
        }
        StDtype::BF16 => {
            DenseData::Bf16(bytemuck::try_cast_slice::<u8, bf16>(bytes).map_err(|_| misaligned(2))?)
        }
        other => return Err(float_dtype_error(name, &format!("{other:?}"))),
    })
}
