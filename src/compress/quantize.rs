//! [`compress_checkpoint`]: a diffusers transformer folder or a single-file checkpoint
//! (any [`Checkpoint`] but a package) to one `.hpk` package, streamed tensor by tensor.
//!
//! What is stored how (as in HierarchicalPrune's W4A16 setting):
//! - every Linear weight `[N, K]` of a kept block and of the top level (timestep and
//!   text embedders, `context_embedder`, `norm_out.linear`, `proj_out`) in the chosen
//!   [`WeightFormat`]; a layer whose K is not a multiple of the group size, or that
//!   belongs to a block listed in [`CompressOptions::dense_blocks`], stays f16 (the
//!   summary says why);
//! - every bias as f32;
//! - the patch convolution, the positional table and the qk-norm weights as f16 (f32
//!   when a value does not fit in f16, or when the whole package is f32);
//! - except that the positional table is not stored at all when it equals, bit for bit,
//!   the 2D sin-cos table diffusers initialises it with
//!   ([`sincos_2d_table`](crate::model::pos_embed::sincos_2d_table)): the manifest then
//!   records it as [`Precision::Sincos2d`] and the loader computes it, giving exactly
//!   the values the stored table would have had;
//! - the tensors of removed blocks are not read at all; blocks the checkpoint lacks (a
//!   pruned single file) are removed blocks, so the manifest's `kept_blocks` holds the
//!   original indices of the blocks present and kept.
//!
//! Memory: the checkpoint is memory-mapped ([`Checkpoint::open`]); one Linear at a
//! time is converted to f32 in blocks of rows through a reusable buffer and quantised
//! row by row, and the pages of each source tensor are released once it is written, so
//! the resident set stays within a small multiple of the largest tensor. The package is
//! spooled to disk as it grows and renamed into place only when complete
//! ([`PackageWriter`]): on any error nothing is left at the output path, and an
//! existing file there is replaced only on success.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::{Dtype, LayerEntry, PackageInfo, PackageWriter, Precision, Provenance};
use crate::model::checkpoint::{Checkpoint, CheckpointKind, CheckpointOptions};
use crate::model::layout::{Required, required_tensors};
use crate::model::pos_embed::{round_value, sincos_2d_f32};
use crate::model::weights::POS_TABLE;
use crate::model::{MmditConfig, PruneSpec, Weights};
use crate::quant::{DenseData, LinearWeights};
use crate::quant::{
    Int4Options, Q4Kind, Q4Matrix, check_q4_dims, quantize_int4_row, quantize_nf4_row,
};

/// Rows converted to f32 and quantised per step (the reusable buffer holds
/// `ROW_BLOCK * K` floats).
const ROW_BLOCK: usize = 64;

/// Storage of the Linear weights in the package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WeightFormat {
    /// Symmetric INT4 with one f16 scale per group and no offset,
    /// `w = scale * (q - 8)` (4.25 bits per weight at group 64).
    Int4,
    /// NF4 with per-block f16 absmax.
    Nf4,
    /// Dense f16.
    F16,
    /// Dense f32 (everything else f32 too: a lossless copy of an f32 checkpoint).
    F32,
    /// Asymmetric INT4 with per-group f16 scale and offset (4.5 bits per weight at
    /// group 64).
    Int4Asym,
}

impl WeightFormat {
    /// The 4-bit kind, `None` for dense formats.
    pub fn q4_kind(self) -> Option<Q4Kind> {
        match self {
            WeightFormat::Int4 => Some(Q4Kind::Int4Sym),
            WeightFormat::Int4Asym => Some(Q4Kind::Int4),
            WeightFormat::Nf4 => Some(Q4Kind::Nf4),
            WeightFormat::F16 | WeightFormat::F32 => None,
        }
    }

    /// Package bytes of one `[n, k]` Linear weight in this format with group `g`
    /// (bias not included; a K that `g` does not divide counts as f16).
    pub fn linear_bytes(self, n: usize, k: usize, g: usize) -> u64 {
        let (n, k) = (n as u64, k as u64);
        match self {
            WeightFormat::F32 => 4 * n * k,
            WeightFormat::F16 => 2 * n * k,
            WeightFormat::Int4 | WeightFormat::Int4Asym | WeightFormat::Nf4
                if g == 0 || k % g as u64 != 0 =>
            {
                2 * n * k
            }
            WeightFormat::Int4Asym => n * k / 2 + 4 * n * (k / g as u64),
            WeightFormat::Int4 | WeightFormat::Nf4 => n * k / 2 + 2 * n * (k / g as u64),
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightFormat::Int4 => "int4",
            WeightFormat::Int4Asym => "int4-asym",
            WeightFormat::Nf4 => "nf4",
            WeightFormat::F16 => "f16",
            WeightFormat::F32 => "f32",
        })
    }
}

/// Settings of [`compress_checkpoint`].
#[derive(Debug, Clone, PartialEq)]
pub struct CompressOptions {
    /// Storage of the Linear weights.
    pub weights: WeightFormat,
    /// Group (INT4) or block (NF4) size along K: 32, 64 or 128.
    pub group: usize,
    /// INT4 (either kind) only: search each group for a clipped range with a smaller error.
    pub clip_search: bool,
    /// Blocks to remove (sub-component masks cannot be stored in a package).
    pub spec: PruneSpec,
    /// Kept blocks whose Linear weights stay f16 (Positional Weight Preservation with
    /// `--protect-precision f16`).
    pub dense_blocks: BTreeSet<usize>,
    /// Human summary of the plan, stored in the provenance.
    pub plan_summary: String,
    /// Per-block sensitivity scores for the provenance (empty when not measured).
    pub sensitivity: Vec<f32>,
    /// Per-block distillation weights for the provenance (empty when not computed).
    pub distillation_weights: Vec<f32>,
}

impl Default for CompressOptions {
    /// Symmetric INT4, group 64, no clip search, nothing pruned.
    fn default() -> Self {
        CompressOptions {
            weights: WeightFormat::Int4,
            group: 64,
            clip_search: false,
            spec: PruneSpec::none(),
            dense_blocks: BTreeSet::new(),
            plan_summary: String::new(),
            sensitivity: Vec::new(),
            distillation_weights: Vec::new(),
        }
    }
}

/// Progress of [`compress_checkpoint`], reported after each tensor.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Source elements processed so far.
    pub done: u64,
    /// Source elements to process in all.
    pub total: u64,
    /// The tensor just written.
    pub tensor: &'a str,
}

/// What [`compress_checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressSummary {
    /// The package.
    pub output: PathBuf,
    /// Bytes of the source checkpoint's safetensors files.
    pub source_bytes: u64,
    /// Bytes of the package.
    pub output_bytes: u64,
    /// Original indices of the kept blocks.
    pub kept_blocks: Vec<usize>,
    /// Linear layers stored in 4 bits.
    pub quantized_layers: usize,
    /// Linear layers stored dense, with the reason (empty reason: the chosen format is
    /// dense).
    pub dense_layers: Vec<(String, String)>,
    /// Tensors written (the manifest not counted).
    pub tensors: usize,
}

impl CompressSummary {
    /// `1 - output / source`: the fraction of the source's bytes saved.
    pub fn reduction(&self) -> f64 {
        if self.source_bytes == 0 {
            0.0
        } else {
            1.0 - self.output_bytes as f64 / self.source_bytes as f64
        }
    }
}

/// The quantiser description stored in the provenance.
fn quantizer_name(opts: &CompressOptions) -> String {
    match opts.weights {
        WeightFormat::Int4 if opts.clip_search => {
            format!("int4 rtn-symmetric+clip-search g{}", opts.group)
        }
        WeightFormat::Int4 => format!("int4 rtn-symmetric g{}", opts.group),
        WeightFormat::Int4Asym if opts.clip_search => {
            format!("int4 rtn-asymmetric+clip-search g{}", opts.group)
        }
        WeightFormat::Int4Asym => format!("int4 rtn-asymmetric g{}", opts.group),
        WeightFormat::Nf4 => format!("nf4-rtn b{}", opts.group),
        WeightFormat::F16 => "none (f16)".to_string(),
        WeightFormat::F32 => "none (f32)".to_string(),
    }
}

/// Checks options that do not depend on the checkpoint.
fn check_options(cfg: &MmditConfig, opts: &CompressOptions) -> Result<()> {
    opts.spec.validate(cfg.num_layers)?;
    if let Some(b) = opts
        .spec
        .masks
        .iter()
        .find(|(b, m)| m.attn2 && !cfg.is_dual(**b))
        .map(|(b, _)| b)
    {
        return Err(Error::invalid(
            "pruning plan",
            format!("block {b} has no `attn2` to remove (not a dual-attention block)"),
        ));
    }
    if opts.spec.removed_blocks.len() >= cfg.num_layers {
        return Err(Error::invalid(
            "pruning plan",
            format!("removes all {} blocks", cfg.num_layers),
        ));
    }
    if let Some(&b) = opts.dense_blocks.iter().find(|&&b| b >= cfg.num_layers) {
        return Err(Error::invalid(
            "protected blocks",
            format!("block {b} is outside the model's {} blocks", cfg.num_layers),
        ));
    }
    if let Some(kind) = opts.weights.q4_kind()
        && !kind.allowed_groups().contains(&opts.group)
    {
        return Err(Error::invalid(
            "group",
            format!(
                "{} is not a group size of {kind}; the supported sizes are {:?}",
                opts.group,
                kind.allowed_groups()
            ),
        ));
    }
    Ok(())
}

/// Compresses the checkpoint at `src` (a diffusers transformer folder or a single
/// file, opened with default [`CheckpointOptions`]) into the package `dst`: see
/// [`compress_opened`].
pub fn compress_checkpoint(
    src: &Path,
    dst: &Path,
    opts: &CompressOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<CompressSummary> {
    let checkpoint = Checkpoint::open(src, &CheckpointOptions::default())?;
    compress_opened(&checkpoint, dst, opts, progress)
}

/// Compresses an opened checkpoint (F32/F16/BF16/F8_E4M3 weights) into the package
/// `dst`, removing the blocks `opts.spec` removes and those the checkpoint lacks.
///
/// `progress` is called after each tensor. Errors: a package as the source, a missing
/// tensor ([`Error::MissingTensor`]), a tensor whose shape does not match the config
/// ([`Error::ShapeMismatch`]), a non-finite weight or one out of f16 range
/// ([`Error::InvalidArgument`] naming the tensor), an unsupported group size, and I/O
/// errors naming the path. On error no file is left at `dst`.
pub fn compress_opened(
    checkpoint: &Checkpoint,
    dst: &Path,
    opts: &CompressOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<CompressSummary> {
    let src = checkpoint.path.as_path();
    if checkpoint.kind == CheckpointKind::Package {
        return Err(Error::invalid(
            format!("source {}", src.display()),
            "is already a hiprune package (compress reads a diffusers folder or a single-file \
             checkpoint; `hiprune inspect` shows what the package holds)",
        ));
    }
    let config = &checkpoint.config;
    let mut opts = opts.clone();
    opts.spec
        .removed_blocks
        .extend(checkpoint.spec.removed_blocks.iter().copied());
    let opts = &opts;
    check_options(config, opts)?;
    let source_bytes = checkpoint.file_bytes()?;
    let weights = &checkpoint.weights;
    let reqs = required_tensors(config, &opts.spec);

    // Check names and shapes before writing anything (no copies: views and biases).
    let mut total = 0u64;
    for req in &reqs {
        match req {
            Required::Linear { name, n, k } => {
                weights.linear(name, *n, *k)?;
                weights.f32_tensor(&format!("{name}.bias"), &[*n])?;
                total += (*n * *k + *n) as u64;
            }
            Required::Plain { name, shape } => {
                if !weights.contains(name) {
                    return Err(Error::MissingTensor {
                        tensor: name.clone(),
                    });
                }
                total += shape.iter().product::<usize>() as u64;
            }
        }
    }

    let mut writer = PackageWriter::create(dst)?;
    let mut done = 0u64;
    let mut quantized_layers = 0;
    let mut dense_layers = Vec::new();
    for req in &reqs {
        let name = match req {
            Required::Linear { name, n, k } => {
                let block = block_index(name);
                let protected = block.is_some_and(|b| opts.dense_blocks.contains(&b));
                let (fmt, reason) = layer_format(opts, *k, protected);
                let bias = weights.f32_tensor(&format!("{name}.bias"), &[*n])?;
                let w = weights.linear(name, *n, *k)?;
                let LinearWeights::Dense { data, .. } = w else {
                    return Err(Error::Unsupported {
                        what: format!("layer `{name}`: re-compressing 4-bit weights"),
                    });
                };
                match fmt {
                    WeightFormat::Int4 | WeightFormat::Int4Asym | WeightFormat::Nf4 => {
                        let q = quantize_dense(name, &data, *n, *k, fmt, opts)?;
                        writer.add_q4_layer(name, &q, Some(&bias))?;
                        quantized_layers += 1;
                    }
                    WeightFormat::F16 => {
                        check_fits_f16(name, &data)?;
                        let bytes = to_f16_bytes(&data);
                        writer.add_dense_layer(
                            name,
                            Precision::F16,
                            *n,
                            *k,
                            &bytes,
                            Some(&bias),
                        )?;
                        dense_layers.push((name.clone(), reason));
                    }
                    WeightFormat::F32 => {
                        let bytes = to_f32_bytes(&data);
                        writer.add_dense_layer(
                            name,
                            Precision::F32,
                            *n,
                            *k,
                            &bytes,
                            Some(&bias),
                        )?;
                        dense_layers.push((name.clone(), reason));
                    }
                }
                weights.release(&format!("{name}.weight"));
                done += (*n * *k + *n) as u64;
                name
            }
            Required::Plain { name, shape } => {
                let data = weights.f32_tensor(name, shape)?;
                let fits_f16 = data.iter().all(|v| f16::from_f32(*v).is_finite());
                let stored = if opts.weights == WeightFormat::F32 || !fits_f16 {
                    Dtype::F32
                } else {
                    Dtype::F16
                };
                if name == POS_TABLE
                    && let Some(entry) = computed_pos_table(config, &data, stored)?
                {
                    writer.add_layer_entry(entry)?;
                } else if stored == Dtype::F32 {
                    writer.add_f32(name, shape, &data)?;
                } else {
                    let h: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
                    writer.add_f16(name, shape, &h)?;
                }
                weights.release(name);
                done += data.len() as u64;
                name
            }
        };
        progress(Progress {
            done,
            total,
            tensor: name,
        });
    }
    let tensors = writer.tensor_count();
    let kept_blocks = opts.spec.kept_blocks(config.num_layers);
    let source = src
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| src.display().to_string());
    let info = PackageInfo {
        architecture: Some(config.clone()),
        kept_blocks: kept_blocks.iter().map(|&i| i as u32).collect(),
        removed_components: opts.spec.component_cuts(config.num_layers),
        provenance: Provenance {
            source,
            source_bytes,
            tool_version: crate::VERSION.to_string(),
            quantizer: quantizer_name(opts),
            plan_summary: opts.plan_summary.clone(),
            sensitivity: opts.sensitivity.clone(),
            distillation_weights: opts.distillation_weights.clone(),
        },
    };
    let output = writer.finish(info)?;
    let output_bytes = std::fs::metadata(&output)
        .map_err(|e| Error::io(&output, e))?
        .len();
    Ok(CompressSummary {
        output,
        source_bytes,
        output_bytes,
        kept_blocks,
        quantized_layers,
        dense_layers,
        tensors,
    })
}

/// Grid rows of the positional table compared per step by [`pos_table_is_sincos`].
const POS_CHECK_ROWS: usize = 16;

/// Whether [`compress_checkpoint`] will compute the positional table of `weights`
/// (a checkpoint with config `cfg`) instead of storing it: whether the table equals
/// diffusers' 2D sin-cos table rounded through F32, F16 or BF16, bit for bit, the
/// same test the compressor makes. For size estimates
/// ([`PlanOptions::pos_table_computed`](crate::compress::PlanOptions)). The table is
/// compared a strip of grid rows at a time in its stored dtype, so only a strip is
/// held in f32. `false` (not an error) for a config the sin-cos table does not fit;
/// errors: a missing table or one of the wrong shape or dtype.
pub fn pos_table_is_sincos(weights: &Weights, cfg: &MmditConfig) -> Result<bool> {
    let grid = cfg.pos_embed_max_size;
    let dim = cfg.hidden_size();
    let base_size = cfg.sample_size / cfg.patch_size.max(1);
    let table = weights.pos_table(POS_TABLE, grid, dim)?;
    if base_size == 0
        || !dim.is_multiple_of(4)
        || u32::try_from(grid).is_err()
        || u32::try_from(base_size).is_err()
    {
        return Ok(false);
    }
    let mut candidates = vec![Dtype::F32, Dtype::F16, Dtype::Bf16];
    let mut top = 0;
    while top < grid && !candidates.is_empty() {
        let rows = POS_CHECK_ROWS.min(grid - top);
        let stored = table.crop(top, 0, rows, grid)?;
        let sincos =
            crate::model::pos_embed::sincos_2d_crop(grid, base_size, dim, &[], top, 0, rows, grid)?;
        candidates.retain(|&source| {
            sincos
                .par_iter()
                .zip(stored.par_iter())
                .all(|(&t, &d)| round_value(t, source).is_some_and(|v| v.to_bits() == d.to_bits()))
        });
        top += rows;
    }
    Ok(!candidates.is_empty())
}

/// The manifest entry that replaces the positional table `data` (`[1, m * m, D]` as
/// f32) when it equals diffusers' sin-cos table rounded through some float dtype;
/// `stored` is the dtype the package would store it in. `None` when it differs in any
/// element (or the config gives no integer `base_size`).
fn computed_pos_table(
    cfg: &MmditConfig,
    data: &[f32],
    stored: Dtype,
) -> Result<Option<LayerEntry>> {
    let grid = cfg.pos_embed_max_size;
    let dim = cfg.hidden_size();
    let base_size = cfg.sample_size / cfg.patch_size.max(1);
    if base_size == 0 || !dim.is_multiple_of(4) || data.len() != grid * grid * dim {
        return Ok(None);
    }
    let (Ok(grid32), Ok(base32)) = (u32::try_from(grid), u32::try_from(base_size)) else {
        return Ok(None);
    };
    let table = sincos_2d_f32(grid, base_size, dim)?;
    // The checkpoint's dtype is not needed: f16 and bf16 widen to f32 exactly, so the
    // table matches a dtype exactly when rounding through it reproduces `data`.
    // Rounded element by element, so no second table-sized buffer is held.
    for source in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        let equal = table
            .par_iter()
            .zip(data.par_iter())
            .all(|(&t, &d)| round_value(t, source).is_some_and(|v| v.to_bits() == d.to_bits()));
        if equal {
            return Ok(Some(LayerEntry {
                name: POS_TABLE.to_string(),
                precision: Precision::Sincos2d {
                    grid: grid32,
                    base_size: base32,
                    source,
                    dtype: stored,
                },
                out_features: (grid * grid) as u64,
                in_features: dim as u64,
                has_bias: false,
            }));
        }
    }
    Ok(None)
}

/// The block index of `transformer_blocks.<i>.…`, `None` for top-level tensors.
fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("transformer_blocks.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The storage of one Linear layer and, for a dense fallback, why.
fn layer_format(opts: &CompressOptions, k: usize, protected: bool) -> (WeightFormat, String) {
    match opts.weights {
        WeightFormat::Int4 | WeightFormat::Int4Asym | WeightFormat::Nf4 => {
            if protected {
                (
                    WeightFormat::F16,
                    "protected block kept in f16 (--protect-precision f16)".to_string(),
                )
            } else if !k.is_multiple_of(opts.group) {
                (
                    WeightFormat::F16,
                    format!("K = {k} is not a multiple of the group size {}", opts.group),
                )
            } else {
                (opts.weights, String::new())
            }
        }
        dense => (dense, String::new()),
    }
}

/// Rows `r0..r0 + out.len() / k` of a dense weight as f32.
fn rows_to_f32(data: &DenseData<'_>, r0: usize, k: usize, out: &mut [f32]) {
    let start = r0 * k;
    let end = start + out.len();
    match data {
        DenseData::F32(d) => out.copy_from_slice(&d[start..end]),
        DenseData::F16(d) => out
            .par_chunks_mut(k)
            .zip(d[start..end].par_chunks(k))
            .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, s)| *o = s.to_f32())),
        DenseData::Bf16(d) => out
            .par_chunks_mut(k)
            .zip(d[start..end].par_chunks(k))
            .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, s)| *o = s.to_f32())),
    }
}

/// Quantises a dense `[n, k]` weight to 4 bits, `ROW_BLOCK` rows at a time.
fn quantize_dense(
    name: &str,
    data: &DenseData<'_>,
    n: usize,
    k: usize,
    fmt: WeightFormat,
    opts: &CompressOptions,
) -> Result<Q4Matrix> {
    let kind = fmt.q4_kind().unwrap_or(Q4Kind::Int4Sym);
    let g = opts.group;
    check_q4_dims(kind, name, k, g)?;
    let gpr = k / g;
    let mut packed = vec![0u8; n * (k / 2)];
    let mut scales = vec![f16::ZERO; n * gpr];
    let mut offsets = if kind.has_offsets() {
        vec![f16::ZERO; n * gpr]
    } else {
        Vec::new()
    };
    let int4 = Int4Options {
        group: g,
        symmetric: kind == Q4Kind::Int4Sym,
        clip_search: opts.clip_search,
    };
    let mut buf = vec![0.0f32; ROW_BLOCK.min(n) * k];
    let mut r0 = 0;
    while r0 < n {
        let rows = ROW_BLOCK.min(n - r0);
        let rows_f32 = &mut buf[..rows * k];
        rows_to_f32(data, r0, k, rows_f32);
        let p = &mut packed[r0 * (k / 2)..(r0 + rows) * (k / 2)];
        let s = &mut scales[r0 * gpr..(r0 + rows) * gpr];
        let row_err = |r: usize, e: Error| {
            Error::invalid(
                format!("tensor `{name}.weight`, row {}", r0 + r),
                e.to_string(),
            )
        };
        let failure = match kind {
            Q4Kind::Int4 => {
                let o = &mut offsets[r0 * gpr..(r0 + rows) * gpr];
                rows_f32
                    .par_chunks(k)
                    .zip(p.par_chunks_mut(k / 2))
                    .zip(s.par_chunks_mut(gpr))
                    .zip(o.par_chunks_mut(gpr))
                    .enumerate()
                    .find_map_first(|(r, (((row, p), s), o))| {
                        quantize_int4_row(row, &int4, p, s, o)
                            .err()
                            .map(|e| row_err(r, e))
                    })
            }
            Q4Kind::Int4Sym => rows_f32
                .par_chunks(k)
                .zip(p.par_chunks_mut(k / 2))
                .zip(s.par_chunks_mut(gpr))
                .enumerate()
                .find_map_first(|(r, ((row, p), s))| {
                    quantize_int4_row(row, &int4, p, s, &mut [])
                        .err()
                        .map(|e| row_err(r, e))
                }),
            Q4Kind::Nf4 => rows_f32
                .par_chunks(k)
                .zip(p.par_chunks_mut(k / 2))
                .zip(s.par_chunks_mut(gpr))
                .enumerate()
                .find_map_first(|(r, ((row, p), s))| {
                    quantize_nf4_row(row, g, p, s).err().map(|e| row_err(r, e))
                }),
        };
        if let Some(e) = failure {
            return Err(e);
        }
        r0 += rows;
    }
    Ok(Q4Matrix {
        kind,
        n,
        k,
        group: g,
        packed,
        scales,
        offsets,
    })
}

/// Fails when a finite weight would overflow f16 (NaN and infinities are passed on).
fn check_fits_f16(name: &str, data: &DenseData<'_>) -> Result<()> {
    let bad = |v: f32| v.is_finite() && !f16::from_f32(v).is_finite();
    let found = match data {
        DenseData::F16(_) => None,
        DenseData::F32(d) => d.iter().position(|&v| bad(v)),
        DenseData::Bf16(d) => d.iter().position(|v| bad(v.to_f32())),
    };
    match found {
        Some(i) => Err(Error::invalid(
            format!("tensor `{name}.weight`"),
            format!("element {i} is out of f16 range; use --weights f32"),
        )),
        None => Ok(()),
    }
}

/// A dense weight as little-endian f16 bytes (borrowed when it already is f16).
fn to_f16_bytes<'a>(data: &DenseData<'a>) -> std::borrow::Cow<'a, [u8]> {
    match data {
        DenseData::F16(d) => std::borrow::Cow::Borrowed(bytemuck::cast_slice(d)),
        DenseData::F32(d) => std::borrow::Cow::Owned(
            d.iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        ),
        DenseData::Bf16(d) => std::borrow::Cow::Owned(
            d.iter()
                .flat_map(|v: &bf16| f16::from_f32(v.to_f32()).to_le_bytes())
                .collect(),
        ),
    }
}

/// A dense weight as little-endian f32 bytes (borrowed when it already is f32).
fn to_f32_bytes<'a>(data: &DenseData<'a>) -> std::borrow::Cow<'a, [u8]> {
    match data {
        DenseData::F32(d) => std::borrow::Cow::Borrowed(bytemuck::cast_slice(d)),
        DenseData::F16(d) => std::borrow::Cow::Owned(
            d.iter()
                .flat_map(|v: &f16| v.to_f32().to_le_bytes())
                .collect(),
        ),
        DenseData::Bf16(d) => std::borrow::Cow::Owned(
            d.iter()
                .flat_map(|v: &bf16| v.to_f32().to_le_bytes())
                .collect(),
        ),
    }
}
