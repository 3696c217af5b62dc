//! [`generate_checkpoint`]: a diffusers-layout transformer folder with seeded random
//! weights of the real shapes, for tests, benchmarks and the demo; and
//! [`generate_single_file`], the same model as one single-file checkpoint with
//! Stability AI's names.
//!
//! The folder holds `config.json`, shards `diffusion_pytorch_model-0000i-of-0000n.safetensors`
//! of at most [`GenerateOptions::max_shard_bytes`] each and the index
//! `diffusion_pytorch_model.safetensors.index.json`, as `save_pretrained` writes them.
//! Each shard's header is computed from the shapes first, then the tensors are
//! generated and written one at a time through a small buffer, so memory stays small
//! whatever the model size. Every tensor has its own random stream derived from the
//! seed and its name, so the values do not depend on the sharding.
//!
//! Values: Linear weights ~ N(0, 1/K) (a variance-preserving init, so activations stay
//! bounded through many blocks), biases and the patch convolution ~ N(0, 0.02^2),
//! qk-norm weights 1 + N(0, 0.05^2). The normal samples are a sum of three uniforms
//! (close to normal, cheap to draw). The positional table is not random: it is the 2D
//! sin-cos table diffusers' `PatchEmbed` initialises it with (computed in f64, rounded
//! to f32, then to the checkpoint's dtype), as in a real checkpoint. It is the one
//! tensor held whole in memory while written.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::f16;
use rayon::prelude::*;
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::model::checkpoint::single_file::DIFFUSION_PREFIX;
use crate::model::checkpoint::{SHARD_INDEX, original_layout};
use crate::model::layout::{Required, required_tensors};
use crate::model::pos_embed::sincos_2d_f32;
use crate::model::{MmditConfig, PruneSpec};

/// The default shard size limit, 2 GB.
pub const DEFAULT_SHARD_BYTES: u64 = 2_000_000_000;

/// A named model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// SD3.5 Large (38 blocks, D = 2432).
    Sd35Large,
    /// SD3.5 Medium (MMDiT-X, 24 blocks, D = 1536).
    Sd35Medium,
    /// A tiny model (4 blocks, D = 64, every K a multiple of 64) for tests.
    Tiny,
}

impl Preset {
    /// The architecture of the preset.
    pub fn config(self) -> MmditConfig {
        match self {
            Preset::Sd35Large => MmditConfig::sd35_large(),
            Preset::Sd35Medium => MmditConfig::sd35_medium(),
            Preset::Tiny => MmditConfig {
                sample_size: 16,
                patch_size: 2,
                in_channels: 16,
                out_channels: 16,
                num_layers: 4,
                attention_head_dim: 32,
                num_attention_heads: 2,
                joint_attention_dim: 128,
                caption_projection_dim: 64,
                pooled_projection_dim: 64,
                pos_embed_max_size: 16,
                qk_norm: Some("rms_norm".into()),
                dual_attention_layers: Vec::new(),
            },
        }
    }

    /// Parses `sd35-large`, `sd35-medium` or `tiny`.
    pub fn parse(name: &str) -> Result<Preset> {
        match name {
            "sd35-large" => Ok(Preset::Sd35Large),
            "sd35-medium" => Ok(Preset::Sd35Medium),
            "tiny" => Ok(Preset::Tiny),
            other => Err(Error::invalid(
                "preset",
                format!("`{other}` is not one of sd35-large, sd35-medium, tiny"),
            )),
        }
    }
}

/// Settings of [`generate_checkpoint`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// The architecture to generate.
    pub config: MmditConfig,
    /// Store f16 (`true`) or f32 tensors.
    pub f16: bool,
    /// Seed of every random stream.
    pub seed: u64,
    /// Largest shard in bytes (a single tensor larger than this gets its own shard).
    pub max_shard_bytes: u64,
}

impl GenerateOptions {
    /// f16, seed 0, 2 GB shards.
    pub fn new(config: MmditConfig) -> Self {
        GenerateOptions {
            config,
            f16: true,
            seed: 0,
            max_shard_bytes: DEFAULT_SHARD_BYTES,
        }
    }

    /// `config` with `num_layers` replaced (dual-attention layers beyond it dropped).
    pub fn with_layers(mut config: MmditConfig, layers: usize) -> MmditConfig {
        config.num_layers = layers;
        config.dual_attention_layers.retain(|&i| i < layers);
        config
    }
}

/// What [`generate_checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateSummary {
    /// The shard files, in order.
    pub shards: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_bytes: u64,
}

/// What kind of values a tensor gets.
#[derive(Clone, Copy)]
enum Init {
    /// N(0, std^2).
    Normal(f32),
    /// 1 + N(0, std^2).
    One(f32),
    /// diffusers' 2D sin-cos positional table (not random: `PatchEmbed` initialises
    /// its buffer with it).
    Sincos,
}

/// Every tensor of the full model with its shape and init.
fn tensor_list(cfg: &MmditConfig) -> Vec<(String, Vec<usize>, Init)> {
    let mut out = Vec::new();
    for req in required_tensors(cfg, &PruneSpec::none()) {
        match req {
            Required::Linear { name, n, k } => {
                out.push((
                    format!("{name}.weight"),
                    vec![n, k],
                    Init::Normal(1.0 / (k as f32).sqrt()),
                ));
                out.push((format!("{name}.bias"), vec![n], Init::Normal(0.02)));
            }
            Required::Plain { name, shape } => {
                let init = if name.ends_with(".pos_embed") {
                    Init::Sincos
                } else if name.contains(".norm_") {
                    Init::One(0.05)
                } else {
                    Init::Normal(0.02)
                };
                out.push((name, shape, init));
            }
        }
    }
    out
}

/// Elements of one tensor generated per parallel work item.
const CHUNK: usize = 1 << 18;

/// The increment of [`SplitMix`]'s state per draw.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64: a tiny, fast, well-mixed generator, enough for seeded test weights.
/// Its state advances by a constant per draw, so the generator positioned at draw `j`
/// of a stream is computed directly, which lets the pieces of one tensor be made in
/// parallel and still give the sequential stream.
struct SplitMix(u64);

impl SplitMix {
    /// The generator of stream `seed` positioned before its draw number `index`.
    fn at(seed: u64, index: u64) -> Self {
        SplitMix(seed.wrapping_add(index.wrapping_mul(GAMMA)))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A sample of mean 0, variance 1: three 21-bit uniforms summed and rescaled.
    fn normal(&mut self) -> f32 {
        let r = self.next();
        let m = (1u64 << 21) - 1;
        let u = |s: u32| ((r >> s) & m) as f32 / m as f32;
        (u(0) + u(21) + u(42) - 1.5) * 2.0
    }
}

/// How the values of one tensor are made: one draw of its stream per element.
struct TensorValues<'a> {
    /// The tensor's stream (seed mixed with its name).
    stream: u64,
    init: Init,
    /// The sin-cos table ([`Init::Sincos`] only).
    table: &'a [f32],
    f16: bool,
}

impl<'a> TensorValues<'a> {
    /// The values of tensor `name` under `opts` (its stream is the seed mixed with the
    /// name); `table` is [`table_for`]'s.
    fn new(opts: &GenerateOptions, name: &str, init: Init, table: &'a [f32]) -> Self {
        TensorValues {
            stream: opts.seed ^ name_hash(name),
            init,
            table,
            f16: opts.f16,
        }
    }

    /// Little-endian bytes of elements `start..end`.
    fn encode(&self, start: usize, end: usize) -> Vec<u8> {
        let elem = if self.f16 { 2 } else { 4 };
        let mut out = Vec::with_capacity((end - start) * elem);
        let mut rng = SplitMix::at(self.stream, start as u64);
        for j in start..end {
            let v = match self.init {
                Init::Normal(s) => rng.normal() * s,
                Init::One(s) => 1.0 + rng.normal() * s,
                Init::Sincos => self.table.get(j).copied().unwrap_or(0.0),
            };
            if self.f16 {
                out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
            } else {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Writes all `total` elements in order, made `chunk` at a time on the rayon pool
    /// (a bounded number of pieces in flight, so memory stays small).
    fn write(&self, w: &mut impl Write, total: usize, chunk: usize) -> std::io::Result<()> {
        self.write_range(w, 0, total, chunk)
    }

    /// [`TensorValues::write`] of elements `start..total` only.
    fn write_range(
        &self,
        w: &mut impl Write,
        start: usize,
        total: usize,
        chunk: usize,
    ) -> std::io::Result<()> {
        let chunk = chunk.max(1);
        let round = chunk.saturating_mul(rayon::current_num_threads().max(1));
        let mut start = start;
        while start < total {
            let end = total.min(start.saturating_add(round));
            let pieces: Vec<Vec<u8>> = (start..end)
                .step_by(chunk)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|s| self.encode(s, end.min(s.saturating_add(chunk))))
                .collect();
            for piece in &pieces {
                w.write_all(piece)?;
            }
            start = end;
        }
        Ok(())
    }
}

/// The sin-cos table an [`Init::Sincos`] tensor of `cfg` holds; empty for other inits.
fn table_for(init: Init, cfg: &MmditConfig) -> Result<Vec<f32>> {
    match init {
        Init::Sincos => sincos_2d_f32(
            cfg.pos_embed_max_size,
            cfg.sample_size / cfg.patch_size,
            cfg.hidden_size(),
        ),
        _ => Ok(Vec::new()),
    }
}

/// A safetensors header as JSON bytes, padded with spaces so the data that follows the
/// 8-byte length and the header starts 8-byte aligned; `what` names it in errors.
fn padded_header(header: Map<String, Value>, what: &str) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::invalid(what, e.to_string()))?;
    while !(8 + bytes.len()).is_multiple_of(8) {
        bytes.push(b' ');
    }
    Ok(bytes)
}

/// FNV-1a of a tensor name, to give each tensor its own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes a diffusers transformer folder with seeded random weights into `dir`
/// (created if missing; existing files of the same names are replaced).
pub fn generate_checkpoint(dir: &Path, opts: &GenerateOptions) -> Result<GenerateSummary> {
    generate_with_chunk(dir, opts, CHUNK)
}

/// [`generate_checkpoint`] with the values of each tensor made in pieces of `chunk`
/// elements, in parallel (the bytes do not depend on `chunk`).
fn generate_with_chunk(
    dir: &Path,
    opts: &GenerateOptions,
    chunk: usize,
) -> Result<GenerateSummary> {
    opts.config.validate()?;
    if opts.max_shard_bytes == 0 {
        return Err(Error::invalid("shard size", "must be at least 1 byte"));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let elem = if opts.f16 { 2u64 } else { 4 };
    let tensors = tensor_list(&opts.config);

    // Greedy sharding in model order.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, (_, shape, _)) in tensors.iter().enumerate() {
        let bytes = shape.iter().product::<usize>() as u64 * elem;
        if size > 0 && size + bytes > opts.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
        size += bytes;
    }

    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut paths = Vec::with_capacity(count);
    let mut total_bytes = 0u64;
    for (si, members) in shards.iter().enumerate() {
        let file_name = format!(
            "diffusion_pytorch_model-{:05}-of-{:05}.safetensors",
            si + 1,
            count
        );
        let path = dir.join(&file_name);
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({ "format": "pt" }));
        let mut offset = 0u64;
        for &i in members {
            let (name, shape, _) = &tensors[i];
            let bytes = shape.iter().product::<usize>() as u64 * elem;
            header.insert(
                name.clone(),
                json!({
                    "dtype": if opts.f16 { "F16" } else { "F32" },
                    "shape": shape,
                    "data_offsets": [offset, offset + bytes],
                }),
            );
            offset += bytes;
            weight_map.insert(name.clone(), Value::String(file_name.clone()));
        }
        total_bytes += offset;
        let header = padded_header(header, "shard header")?;
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let io = |e| Error::io(&path, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for &i in members {
            let (name, shape, init) = &tensors[i];
            let total: usize = shape.iter().product();
            let table = table_for(*init, &opts.config)?;
            let values = TensorValues::new(opts, name, *init, &table);
            values.write(&mut w, total, chunk).map_err(io)?;
        }
        w.flush().map_err(io)?;
        paths.push(path);
    }

    let index = json!({
        "metadata": { "total_size": total_bytes },
        "weight_map": weight_map,
    });
    let index_path = dir.join(SHARD_INDEX);
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| Error::invalid("shard index", e.to_string()))?;
    std::fs::write(&index_path, text).map_err(|e| Error::io(&index_path, e))?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config_json(&opts.config))
        .map_err(|e| Error::io(&config_path, e))?;
    Ok(GenerateSummary {
        shards: paths,
        tensors: tensors.len(),
        total_bytes,
    })
}

/// Writes a single-file checkpoint at `path`: Stability AI's tensor names under
/// `model.diffusion_model.`, with exactly the values [`generate_checkpoint`] gives the
/// same options (each original tensor is made of the diffusers tensors' streams: q, k
/// and v concatenated, the halves of the two (shift, scale) modulations swapped), so
/// it loads into the same model as the folder. Written to a temporary file beside
/// `path` and renamed into place.
pub fn generate_single_file(path: &Path, opts: &GenerateOptions) -> Result<GenerateSummary> {
    opts.config.validate()?;
    let elem = if opts.f16 { 2usize } else { 4 };
    let tensors: BTreeMap<String, (Vec<usize>, Init)> = tensor_list(&opts.config)
        .into_iter()
        .map(|(name, shape, init)| (name, (shape, init)))
        .collect();
    let layout = original_layout(&|n| tensors.contains_key(n), opts.config.num_layers);

    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for t in &layout {
        let mut shape = tensors[&t.parts[0]].0.clone();
        shape[0] *= t.parts.len();
        let bytes = shape.iter().product::<usize>() * elem;
        header.insert(
            format!("{DIFFUSION_PREFIX}{}", t.name),
            json!({
                "dtype": if opts.f16 { "F16" } else { "F32" },
                "shape": shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let header = padded_header(header, "single-file header")?;

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(|e| Error::io(&dir, e))?;
    let io = |e| Error::io(path, e);
    let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for t in &layout {
        for part in &t.parts {
            let (shape, init) = &tensors[part];
            let total: usize = shape.iter().product();
            let table = table_for(*init, &opts.config)?;
            let values = TensorValues::new(opts, part, *init, &table);
            if t.swapped {
                values
                    .write_range(&mut w, total / 2, total, CHUNK)
                    .map_err(io)?;
                values
                    .write_range(&mut w, 0, total / 2, CHUNK)
                    .map_err(io)?;
            } else {
                values.write(&mut w, total, CHUNK).map_err(io)?;
            }
        }
    }
    w.flush().map_err(io)?;
    drop(w);
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(GenerateSummary {
        shards: vec![path.to_path_buf()],
        tensors: layout.len(),
        total_bytes: offset as u64,
    })
}

/// A diffusers `config.json` for `cfg`.
pub fn config_json(cfg: &MmditConfig) -> String {
    let v = json!({
        "_class_name": "SD3Transformer2DModel",
        "sample_size": cfg.sample_size,
        "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_layers": cfg.num_layers,
        "attention_head_dim": cfg.attention_head_dim,
        "num_attention_heads": cfg.num_attention_heads,
        "joint_attention_dim": cfg.joint_attention_dim,
        "caption_projection_dim": cfg.caption_projection_dim,
        "pooled_projection_dim": cfg.pooled_projection_dim,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "qk_norm": cfg.qk_norm,
        "dual_attention_layers": cfg.dual_attention_layers,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequential stream: one generator drawn `total` times from the start.
    fn sequential(values: &TensorValues<'_>, total: usize) -> Vec<u8> {
        let mut rng = SplitMix(values.stream);
        let mut out = Vec::new();
        for j in 0..total {
            let v = match values.init {
                Init::Normal(s) => rng.normal() * s,
                Init::One(s) => 1.0 + rng.normal() * s,
                Init::Sincos => values.table[j],
            };
            if values.f16 {
                out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
            } else {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn positioned_generator_continues_the_stream() {
        for seed in [0u64, 1, 0xdead_beef, u64::MAX] {
            let mut seq = SplitMix(seed);
            let draws: Vec<u64> = (0..1000).map(|_| seq.next()).collect();
            for index in [0usize, 1, 2, 17, 500, 999] {
                assert_eq!(SplitMix::at(seed, index as u64).next(), draws[index]);
            }
        }
    }

    #[test]
    fn chunked_writes_equal_the_sequential_stream() {
        let table: Vec<f32> = (0..1237).map(|i| i as f32 * 0.25).collect();
        for (init, f16) in [
            (Init::Normal(0.3), true),
            (Init::Normal(1.0), false),
            (Init::One(0.05), true),
            (Init::Sincos, false),
        ] {
            let values = TensorValues {
                stream: 0x1234_5678 ^ name_hash("blocks.0.attn.to_q.weight"),
                init,
                table: &table,
                f16,
            };
            for total in [0usize, 1, 7, 64, 1000, 1237] {
                let want = sequential(&values, total);
                for chunk in [0usize, 1, 3, 7, 64, 1 << 18] {
                    let mut got = Vec::new();
                    values.write(&mut got, total, chunk).unwrap();
                    assert_eq!(got, want, "total {total}, chunk {chunk}, f16 {f16}");
                }
            }
        }
    }

    #[test]
    fn checkpoint_bytes_do_not_depend_on_the_chunk_size() {
        let opts = GenerateOptions {
            seed: 11,
            max_shard_bytes: 200_000,
            ..GenerateOptions::new(Preset::Tiny.config())
        };
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let sa = generate_with_chunk(a.path(), &opts, 5).unwrap();
        let sb = generate_with_chunk(b.path(), &opts, CHUNK).unwrap();
        assert!(sa.shards.len() > 1, "the test wants several shards");
        assert_eq!(sa.shards.len(), sb.shards.len());
        for (pa, pb) in sa.shards.iter().zip(&sb.shards) {
            assert_eq!(std::fs::read(pa).unwrap(), std::fs::read(pb).unwrap());
        }
    }
}
