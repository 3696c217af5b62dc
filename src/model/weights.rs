//! [`Weights`]: the tensors of an MMDiT transformer by their diffusers names (original
//! block indices), from memory-mapped safetensors files (the checkpoint readers in
//! [`crate::model::checkpoint`] fill them through `MappedWeights`), from an `.hpk`
//! [`Package`], or from memory.
//!
//! Linear layers are handed out as [`LinearWeights`] views without copying: dense
//! views straight into the memory map (a tensor whose bytes are not aligned for its
//! element type is copied once at load), or the package's 4-bit layers. The positional
//! table is handed out the same way as a [`PosTable`] (a view in its stored dtype, or
//! only the parameters of a computed table), from which a forward converts or computes
//! just the crop it needs. Other tensors (biases, the patch convolution, qk-norm
//! weights) are read as f32 copies.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::Dtype as StDtype;

use crate::backend::LinearSource;
use crate::error::{Error, Result};
use crate::format::{Dtype, Package, Precision, TensorView};
use crate::model::tensor::{Tensor, floats_to_f32};
use crate::quant::{DenseData, LinearWeights, Q4Matrix};

/// Name of the positional table of the patch embedding, `[1, grid * grid, D]`.
pub const POS_TABLE: &str = "pos_embed.pos_embed";

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
    /// A dense tensor held in memory in its own dtype (a reordered or widened copy).
    Owned(OwnedDense, Vec<usize>),
    Q4(Q4Matrix),
}

/// Dense elements owned by [`Weights`], in the dtype they are kept in.
enum OwnedDense {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl OwnedDense {
    fn view(&self) -> DenseData<'_> {
        match self {
            OwnedDense::F32(d) => DenseData::F32(d),
            OwnedDense::F16(d) => DenseData::F16(d),
            OwnedDense::Bf16(d) => DenseData::Bf16(d),
        }
    }
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

/// Builds [`Weights`] from memory-mapped safetensors files: the checkpoint readers
/// ([`crate::model::checkpoint`]) map each file, then add its tensors under diffusers
/// names, whole or as row ranges (the fused `qkv` of a single file, split by views).
pub(crate) struct MappedWeights {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
}

impl MappedWeights {
    /// No files yet.
    pub fn new() -> Self {
        MappedWeights {
            paths: Vec::new(),
            maps: Vec::new(),
            entries: HashMap::new(),
        }
    }

    /// Memory-maps `path` and returns its index for [`MappedWeights::add`]. The file
    /// must not be modified in place while the weights are loaded.
    pub fn map(&mut self, path: &Path) -> Result<usize> {
        self.maps.push(map_file(path)?);
        self.paths.push(path.to_path_buf());
        Ok(self.maps.len() - 1)
    }

    /// The bytes of mapped file `file`.
    pub fn bytes(&self, file: usize) -> &[u8] {
        &self.maps[file]
    }

    /// Byte range of `data` (a slice of file `file`'s bytes) inside that file.
    pub fn range_of(&self, file: usize, data: &[u8]) -> Range<usize> {
        let start = data.as_ptr() as usize - self.maps[file].as_ptr() as usize;
        start..start + data.len()
    }

    /// Adds tensor `name` of `shape`, stored as `dtype` in bytes `range` of file
    /// `file`. A float tensor is viewed in place (copied to f32 once when its bytes are
    /// not aligned for its dtype); F8_E4M3 is widened to f16, which holds every e4m3
    /// value exactly; with `swap_halves`, the two halves of the first axis trade places
    /// (a copy in the tensor's dtype). Other dtypes are kept as stored, an error only
    /// when read as a weight. Errors: a name added twice, bytes that do not fill the
    /// shape.
    pub fn add(
        &mut self,
        name: String,
        file: usize,
        range: Range<usize>,
        dtype: StDtype,
        shape: Vec<usize>,
        swap_halves: bool,
    ) -> Result<()> {
        if self.entries.contains_key(&name) {
            return Err(Error::InvalidHeader {
                path: self.paths[file].clone(),
                reason: format!("tensor `{name}` is stored twice"),
            });
        }
        let bytes = &self.maps[file][range.clone()];
        let elements = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let element_bytes = match dtype {
            StDtype::F32 => 4,
            StDtype::F16 | StDtype::BF16 => 2,
            StDtype::F8_E4M3 => 1,
            // Kept as stored (the safetensors parser checked its length): reading it
            // as a weight is a dtype error naming it.
            _ => {
                let (start, end) = (range.start, range.end);
                let entry = Entry::Mapped {
                    file,
                    start,
                    end,
                    dtype,
                    shape,
                };
                self.entries.insert(name, entry);
                return Ok(());
            }
        };
        if elements.and_then(|e| e.checked_mul(element_bytes)) != Some(bytes.len()) {
            return Err(Error::length(
                format!("tensor `{name}` of shape {shape:?}"),
                elements.unwrap_or(usize::MAX),
                bytes.len() / element_bytes,
            ));
        }
        let entry = if dtype == StDtype::F8_E4M3 {
            let mut wide: Vec<f16> = bytes.iter().map(|&b| e4m3_to_f16(b)).collect();
            if swap_halves {
                swap_first_axis_halves(&mut wide);
            }
            Entry::Owned(OwnedDense::F16(wide), shape)
        } else if swap_halves {
            let mut data = match dtype {
                StDtype::F16 => OwnedDense::F16(
                    bytes
                        .chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                ),
                StDtype::BF16 => OwnedDense::Bf16(
                    bytes
                        .chunks_exact(2)
                        .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                ),
                _ => OwnedDense::F32(floats_to_f32(&name, dtype, bytes)?),
            };
            match &mut data {
                OwnedDense::F32(d) => swap_first_axis_halves(d),
                OwnedDense::F16(d) => swap_first_axis_halves(d),
                OwnedDense::Bf16(d) => swap_first_axis_halves(d),
            }
            Entry::Owned(data, shape)
        } else if is_aligned(bytes, dtype) {
            Entry::Mapped {
                file,
                start: range.start,
                end: range.end,
                dtype,
                shape,
            }
        } else {
            Entry::F32(Tensor::new(floats_to_f32(&name, dtype, bytes)?, shape)?)
        };
        if !matches!(entry, Entry::Mapped { .. }) {
            // The copy is what is read from now on: the source pages need not stay.
            drop_pages(&self.maps[file], range);
        }
        self.entries.insert(name, entry);
        Ok(())
    }

    /// The weights.
    pub fn finish(self) -> Weights {
        Weights {
            source: Source::Files(self.maps),
            entries: self.entries,
        }
    }
}

/// Tells the operating system that bytes `range` of the read-only map `map` are not
/// needed now: their pages leave the resident set (a later read faults the same file
/// bytes back in). A no-op on non-Unix systems.
fn drop_pages(map: &Mmap, range: Range<usize>) {
    #[cfg(unix)]
    {
        // SAFETY: the map is a read-only shared mapping of a file; MADV_DONTNEED on it
        // only drops page-table entries, so later reads (including through slices
        // still borrowed from it) fault the same file bytes back in. memmap2 checks
        // that the range lies inside the map. A failure only means the pages stay.
        let _ = unsafe {
            map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                range.start,
                range.end - range.start,
            )
        };
    }
    #[cfg(not(unix))]
    let _ = (map, range);
}

/// Swaps the first and second half of `data` (the two halves of a tensor's first
/// axis, since the array is row-major); an odd length leaves it unchanged.
fn swap_first_axis_halves<T: Copy>(data: &mut [T]) {
    if data.len().is_multiple_of(2) {
        let half = data.len() / 2;
        let (a, b) = data.split_at_mut(half);
        a.swap_with_slice(b);
    }
}

/// The f16 with the value of the OCP FP8 E4M3 (`float8_e4m3fn`) code `code`: sign,
/// 4 exponent bits (bias 7), 3 mantissa bits, no infinities, NaN at S.1111.111.
pub(crate) fn e4m3_to_f16(code: u8) -> f16 {
    let negative = code & 0x80 != 0;
    let exponent = i32::from((code >> 3) & 0x0f);
    let mantissa = f32::from(code & 0x07);
    let magnitude = if exponent == 0x0f && code & 0x07 == 0x07 {
        f32::NAN
    } else if exponent == 0 {
        mantissa / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    };
    f16::from_f32(if negative { -magnitude } else { magnitude })
}

impl Weights {
    /// Reads the tensors of a diffusers transformer folder (the single file, or the
    /// shards its index lists), memory-mapped; the files must not be modified in place
    /// while loaded. [`Checkpoint::open`](crate::model::Checkpoint::open) reads the
    /// config with them.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Weights> {
        crate::model::checkpoint::read_folder_weights(dir.as_ref()).map(|(w, _)| w)
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
        if let (
            Some(Entry::Mapped {
                file, start, end, ..
            }),
            Source::Files(maps),
        ) = (self.entries.get(name), &self.source)
        {
            drop_pages(&maps[*file], *start..*end);
        }
    }

    /// Original indices of the blocks with at least one tensor
    /// (`transformer_blocks.N.*`).
    pub fn block_indices(&self) -> std::collections::BTreeSet<usize> {
        self.entries
            .keys()
            .filter_map(|n| {
                n.strip_prefix("transformer_blocks.")?
                    .split('.')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
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

    /// The shape tensor `name` is stored with (a 4-bit layer's `[n, k]`).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(match self.entry(name)? {
            Entry::Mapped { shape, .. } | Entry::Owned(_, shape) => shape.clone(),
            Entry::F32(t) => t.shape.clone(),
            Entry::Q4(q) => vec![q.n, q.k],
            Entry::Computed(..) => {
                return Err(Error::MissingTensor {
                    tensor: name.to_string(),
                });
            }
            Entry::Packaged => {
                let p = self.package().ok_or_else(|| Error::MissingTensor {
                    tensor: name.to_string(),
                })?;
                match name.strip_suffix(".weight").and_then(|l| p.layer(l).ok()) {
                    Some(l) if l.precision.q4().is_some() => {
                        let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
                        vec![to_usize(l.out_features), to_usize(l.in_features)]
                    }
                    _ => p.tensor(name)?.shape().to_vec(),
                }
            }
        })
    }

    /// The linear layer `layer` (its `<layer>.weight`) as a `[n, k]` view, checked
    /// against the expected shape. A 2-D convolution kernel `[n, c, kh, kw]` with `c *
    /// kh * kw == k` is accepted too, as its im2col matrix (see
    /// [`Backend::conv2d`](crate::backend::Backend::conv2d)).
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
                if !is_matrix_of(shape, n, k) {
                    return Err(mismatch(shape.clone()));
                }
                let bytes = self.mapped_bytes(*file, *start, *end);
                let data = dense_from_bytes(&name, *dtype, bytes)?;
                LinearWeights::dense(data, n, k)?
            }
            Entry::F32(t) => {
                if !is_matrix_of(&t.shape, n, k) {
                    return Err(mismatch(t.shape.clone()));
                }
                LinearWeights::dense(DenseData::F32(&t.data), n, k)?
            }
            Entry::Owned(data, shape) => {
                if !is_matrix_of(shape, n, k) {
                    return Err(mismatch(shape.clone()));
                }
                LinearWeights::dense(data.view(), n, k)?
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
                        if !is_matrix_of(view.shape(), n, k) {
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
            Entry::Owned(data, found) => (dense_to_f32(data.view()), found.clone()),
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
            Entry::Owned(data, shape) => (data.view(), shape.clone()),
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
        let len = data.len();
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

/// Whether a stored shape is the `[n, k]` matrix of a layer: `[n, k]` itself, or a
/// convolution kernel `[n, c, kh, kw]` flattened to `[n, c * kh * kw]`.
fn is_matrix_of(shape: &[usize], n: usize, k: usize) -> bool {
    match shape {
        [rows, cols] => *rows == n && *cols == k,
        [rows, c, kh, kw] => {
            *rows == n && c.checked_mul(*kh).and_then(|v| v.checked_mul(*kw)) == Some(k)
        }
        _ => false,
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

/// The elements of `data` widened to f32.
fn dense_to_f32(data: DenseData<'_>) -> Vec<f32> {
    match data {
        DenseData::F32(d) => d.to_vec(),
        DenseData::F16(d) => d.to_f32_vec(),
        DenseData::Bf16(d) => d.to_f32_vec(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_e4m3_code_widens_to_its_value() {
        for code in 0..=255u8 {
            let got = e4m3_to_f16(code);
            let (sign, e, m) = (code >> 7, i32::from((code >> 3) & 15), f64::from(code & 7));
            if e == 15 && code & 7 == 7 {
                assert!(got.is_nan(), "{code:#04x}");
                continue;
            }
            let magnitude = if e == 0 {
                m * 2f64.powi(-9)
            } else {
                (8.0 + m) * 2f64.powi(e - 10)
            };
            let want = if sign == 1 { -magnitude } else { magnitude };
            assert_eq!(f64::from(got.to_f32()), want, "{code:#04x}");
        }
        assert_eq!(e4m3_to_f16(0x7e).to_f32(), 448.0);
        assert_eq!(e4m3_to_f16(0x01).to_f32(), 2f32.powi(-9));
    }

    #[test]
    fn halves_swap_along_the_first_axis() {
        let mut v = [1, 2, 3, 4, 5, 6];
        swap_first_axis_halves(&mut v);
        assert_eq!(v, [4, 5, 6, 1, 2, 3]);
    }
}
