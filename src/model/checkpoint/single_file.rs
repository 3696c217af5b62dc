//! Stability AI's single-file checkpoints (`sd3.5_large.safetensors`,
//! `sd3.5_medium.safetensors`, the `*_incl_clips*` variants, and position-pruned ones
//! whose removed blocks are simply missing): the original MMDiT names under
//! `model.diffusion_model.` (or without that prefix), read under diffusers names.
//!
//! The mapping (as diffusers' own conversion does it):
//! - `joint_blocks.N.{x_block,context_block}.attn.qkv` is split into q, k and v by
//!   views of its three row ranges (no copy), so each is a layer of its own;
//! - the original stores the two-chunk modulations as (shift, scale) and diffusers as
//!   (scale, shift): the last block's context modulation (`norm1_context` of the
//!   `context_pre_only` block) and the final layer (`norm_out`) are read with their
//!   halves swapped (a copy of those two matrices, in their dtype);
//! - everything else is renamed one to one.
//!
//! The configuration comes from the shapes: hidden size D from `x_embedder`, heads =
//! D / head dim (64 in the SD3 family unless told otherwise; never the block count),
//! blocks = the indices present (a gap is a removed block), dual-attention blocks =
//! those with `attn2`, qk-norm from `ln_q`, the table side from `pos_embed`. The
//! original depth is the `context_pre_only` block's index + 1; without that block (it
//! was removed) it is the last index present + 2, which runs the same blocks the same
//! way (give `--config` to record the true depth).
//!
//! Tensors of the other components in the same file (`text_encoders.{clip_l,clip_g,
//! t5xxl}.*`, `first_stage_model.*` = the VAE) are listed and left unread.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;

use safetensors::{Dtype as StDtype, SafeTensors};

use crate::config::MmditConfig;
use crate::error::{Error, Result, SingleFileRule};
use crate::model::weights::{MappedWeights, POS_TABLE, Weights};

use super::Component;

/// Prefix of the transformer's tensors in a full single file.
pub const DIFFUSION_PREFIX: &str = "model.diffusion_model.";
/// Head width of the SD3 / SD3.5 family, used when neither a config nor a head width
/// is given.
pub const DEFAULT_HEAD_DIM: usize = 64;

/// Latent side the SD3 family is trained for (`sample_size`), used without a config.
pub const DEFAULT_SAMPLE_SIZE: usize = 128;

/// The other components a single file may carry: key prefix and name.
const COMPONENT_PREFIXES: [(&str, &str); 4] = [
    ("text_encoders.clip_l.", "clip_l"),
    ("text_encoders.clip_g.", "clip_g"),
    ("text_encoders.t5xxl.", "t5xxl"),
    ("first_stage_model.", "vae"),
];

/// Where one tensor of the single file goes, under diffusers names.
#[derive(Debug, PartialEq)]
enum Target {
    /// The tensor as it is.
    Whole(String),
    /// The three row ranges of a fused qkv: q, k, v.
    Split3([String; 3]),
    /// The tensor with the halves of its first axis swapped ((shift, scale) to
    /// (scale, shift)).
    SwapHalves(String),
}

/// The block stream of a `joint_blocks` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Image,
    Context,
}

/// The diffusers name(s) of the original transformer tensor `key` (prefix removed).
/// `pre_only_context` tells whether a `context_block.adaLN_modulation.1` has two chunks
/// (the last block's, stored as (shift, scale)). `None` for a name this reader does not
/// know.
fn rename(key: &str, pre_only_context: bool) -> Option<Target> {
    let whole = |s: String| Some(Target::Whole(s));
    let (base, param) = match key.rsplit_once('.') {
        Some((b, p @ ("weight" | "bias"))) => (b, p),
        _ => {
            return (key == "pos_embed").then(|| Target::Whole(POS_TABLE.to_string()));
        }
    };
    let top = match base {
        "x_embedder.proj" => Some("pos_embed.proj"),
        "t_embedder.mlp.0" => Some("time_text_embed.timestep_embedder.linear_1"),
        "t_embedder.mlp.2" => Some("time_text_embed.timestep_embedder.linear_2"),
        "y_embedder.mlp.0" => Some("time_text_embed.text_embedder.linear_1"),
        "y_embedder.mlp.2" => Some("time_text_embed.text_embedder.linear_2"),
        "context_embedder" => Some("context_embedder"),
        "final_layer.linear" => Some("proj_out"),
        "final_layer.adaLN_modulation.1" => {
            return Some(Target::SwapHalves(format!("norm_out.linear.{param}")));
        }
        _ => None,
    };
    if let Some(t) = top {
        return whole(format!("{t}.{param}"));
    }
    let (block, stream, local) = parse_block_key(base)?;
    let b = |s: &str| format!("transformer_blocks.{block}.{s}.{param}");
    let norm = |s: &str| (param == "weight").then(|| Target::Whole(b(s)));
    match (stream, local) {
        (Stream::Image, "attn.qkv") => Some(Target::Split3([
            b("attn.to_q"),
            b("attn.to_k"),
            b("attn.to_v"),
        ])),
        (Stream::Image, "attn.proj") => whole(b("attn.to_out.0")),
        (Stream::Image, "attn.ln_q") => norm("attn.norm_q"),
        (Stream::Image, "attn.ln_k") => norm("attn.norm_k"),
        (Stream::Image, "attn2.qkv") => Some(Target::Split3([
            b("attn2.to_q"),
            b("attn2.to_k"),
            b("attn2.to_v"),
        ])),
        (Stream::Image, "attn2.proj") => whole(b("attn2.to_out.0")),
        (Stream::Image, "attn2.ln_q") => norm("attn2.norm_q"),
        (Stream::Image, "attn2.ln_k") => norm("attn2.norm_k"),
        (Stream::Image, "adaLN_modulation.1") => whole(b("norm1.linear")),
        (Stream::Image, "mlp.fc1") => whole(b("ff.net.0.proj")),
        (Stream::Image, "mlp.fc2") => whole(b("ff.net.2")),
        (Stream::Context, "attn.qkv") => Some(Target::Split3([
            b("attn.add_q_proj"),
            b("attn.add_k_proj"),
            b("attn.add_v_proj"),
        ])),
        (Stream::Context, "attn.proj") => whole(b("attn.to_add_out")),
        (Stream::Context, "attn.ln_q") => norm("attn.norm_added_q"),
        (Stream::Context, "attn.ln_k") => norm("attn.norm_added_k"),
        (Stream::Context, "adaLN_modulation.1") if pre_only_context => {
            Some(Target::SwapHalves(b("norm1_context.linear")))
        }
        (Stream::Context, "adaLN_modulation.1") => whole(b("norm1_context.linear")),
        (Stream::Context, "mlp.fc1") => whole(b("ff_context.net.0.proj")),
        (Stream::Context, "mlp.fc2") => whole(b("ff_context.net.2")),
        _ => None,
    }
}

/// Original names outside the blocks (without `.weight` / `.bias`).
const TOP_NAMES: [&str; 8] = [
    "x_embedder.proj",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "y_embedder.mlp.0",
    "y_embedder.mlp.2",
    "context_embedder",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
];
/// Original names inside a block stream (without `.weight` / `.bias`).
const BLOCK_NAMES: [&str; 11] = [
    "attn.qkv",
    "attn.proj",
    "attn.ln_q",
    "attn.ln_k",
    "attn2.qkv",
    "attn2.proj",
    "attn2.ln_q",
    "attn2.ln_k",
    "adaLN_modulation.1",
    "mlp.fc1",
    "mlp.fc2",
];

/// One tensor of a single file as a writer lays it out: its original name (no
/// prefix), the diffusers tensors it is made of in file order, and whether the halves
/// of its first axis are swapped relative to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalTensor {
    /// The original name.
    pub name: String,
    /// The diffusers tensors, concatenated along the first axis.
    pub parts: Vec<String>,
    /// (scale, shift) stored as (shift, scale).
    pub swapped: bool,
}

/// The single-file layout of a model whose diffusers tensors are `present` (a
/// predicate on names) and whose last block is `num_layers - 1`: every original
/// tensor all of whose parts are present, in name order. The inverse of what
/// the reader does, from the same renaming, so a writer cannot disagree with the reader.
pub fn original_layout(present: &dyn Fn(&str) -> bool, num_layers: usize) -> Vec<OriginalTensor> {
    let mut candidates: Vec<(String, bool)> = vec![("pos_embed".to_string(), false)];
    for param in ["weight", "bias"] {
        candidates.extend(TOP_NAMES.iter().map(|n| (format!("{n}.{param}"), false)));
        for i in 0..num_layers {
            for stream in ["x_block", "context_block"] {
                for local in BLOCK_NAMES {
                    let pre_only = i + 1 == num_layers && stream == "context_block";
                    candidates.push((
                        format!("joint_blocks.{i}.{stream}.{local}.{param}"),
                        pre_only,
                    ));
                }
            }
        }
    }
    let mut out: Vec<OriginalTensor> = candidates
        .into_iter()
        .filter_map(|(name, pre_only)| {
            let (parts, swapped) = match rename(&name, pre_only)? {
                Target::Whole(n) => (vec![n], false),
                Target::SwapHalves(n) => (vec![n], true),
                Target::Split3(ns) => (ns.to_vec(), false),
            };
            parts.iter().all(|p| present(p)).then_some(OriginalTensor {
                name,
                parts,
                swapped,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The block, stream and local name (parameter removed) of a tensor name
/// `joint_blocks.N.STREAM.LOCAL.PARAM`.
fn block_of(key: &str) -> Option<(usize, Stream, &str)> {
    key.rsplit_once('.')
        .and_then(|(base, _)| parse_block_key(base))
}

/// `joint_blocks.N.{x_block,context_block}.REST` as (N, stream, REST).
fn parse_block_key(name: &str) -> Option<(usize, Stream, &str)> {
    let rest = name.strip_prefix("joint_blocks.")?;
    let (index, rest) = rest.split_once('.')?;
    if index.is_empty() || !index.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let block = index.parse().ok()?;
    let (stream, local) = rest.split_once('.')?;
    let stream = match stream {
        "x_block" => Stream::Image,
        "context_block" => Stream::Context,
        _ => return None,
    };
    Some((block, stream, local))
}

/// One tensor of the file, before it is added to the weights.
struct Stored {
    key: String,
    range: Range<usize>,
    dtype: StDtype,
    shape: Vec<usize>,
}

/// What a single file holds: its transformer as diffusers-named weights, the
/// configuration read from the shapes (or given), the block indices present, and the
/// other components.
pub(crate) struct SingleFile {
    pub weights: Weights,
    pub config: MmditConfig,
    pub present_blocks: BTreeSet<usize>,
    pub components: Vec<Component>,
}

/// Reads the single file `path`. With `config`, that configuration is used (its
/// shapes are checked when the model loads); otherwise it is read from the shapes with
/// heads of `head_dim` (default [`DEFAULT_HEAD_DIM`]).
pub(crate) fn read(
    path: &Path,
    config: Option<MmditConfig>,
    head_dim: Option<usize>,
) -> Result<SingleFile> {
    let rule_error = |rule| Error::SingleFile {
        path: path.to_path_buf(),
        rule,
    };
    let mut weights = MappedWeights::new();
    let file = weights.map(path)?;
    let st = SafeTensors::deserialize(weights.bytes(file)).map_err(|e| Error::InvalidHeader {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut stored = Vec::new();
    let mut others: BTreeMap<&'static str, Component> = BTreeMap::new();
    let prefixed = st.names().iter().any(|n| n.starts_with(DIFFUSION_PREFIX));
    for (name, view) in st.iter() {
        let component = COMPONENT_PREFIXES
            .iter()
            .find(|(prefix, _)| name.starts_with(prefix))
            .map(|&(_, c)| c);
        let key = match (component, name.strip_prefix(DIFFUSION_PREFIX)) {
            (None, Some(key)) => Some(key),
            (None, None) if !prefixed => Some(name),
            _ => None,
        };
        match key {
            Some(key) => stored.push(Stored {
                key: key.to_string(),
                range: weights.range_of(file, view.data()),
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
            }),
            None => {
                let c = component.unwrap_or("other");
                let entry = others.entry(c).or_insert_with(|| Component {
                    name: c.to_string(),
                    tensors: 0,
                    bytes: 0,
                    dtypes: Vec::new(),
                });
                entry.tensors += 1;
                entry.bytes += view.data().len() as u64;
                let dtype = format!("{:?}", view.dtype());
                if !entry.dtypes.contains(&dtype) {
                    entry.dtypes.push(dtype);
                }
            }
        }
    }
    drop(st);
    for c in others.values_mut() {
        c.dtypes.sort();
    }
    stored.sort_by(|a, b| a.key.cmp(&b.key));
    if stored
        .iter()
        .any(|t| t.key.starts_with("transformer_blocks.") || t.key.starts_with("time_text_embed."))
    {
        return Err(rule_error(SingleFileRule::DiffusersNames));
    }
    let shape_of = |key: &str| stored.iter().find(|t| t.key == key).map(|t| &t.shape[..]);

    // D from the patch convolution; the pre-only block is the one whose context
    // modulation has 2 D rows.
    let patch =
        shape_of("x_embedder.proj.weight").ok_or(rule_error(SingleFileRule::ShapeSource {
            tensor: "x_embedder.proj.weight",
            expected: "[D, C, p, p]",
        }))?;
    let [hidden, in_channels, p, p2] = *patch else {
        return Err(rule_error(SingleFileRule::ShapeSource {
            tensor: "x_embedder.proj.weight",
            expected: "[D, C, p, p]",
        }));
    };
    if p != p2 || p == 0 || hidden == 0 {
        return Err(rule_error(SingleFileRule::ShapeSource {
            tensor: "x_embedder.proj.weight",
            expected: "[D, C, p, p] with a square, non-empty patch",
        }));
    }

    // Blocks: their streams, the pre-only block, the dual ones, the qk-norm.
    let mut streams: BTreeMap<usize, [bool; 2]> = BTreeMap::new();
    let mut pre_only = None;
    let mut dual = Vec::new();
    let mut qk_norm = false;
    for t in &stored {
        let Some((block, stream, local)) = block_of(&t.key) else {
            continue;
        };
        streams.entry(block).or_default()[(stream == Stream::Context) as usize] = true;
        if !t.key.ends_with(".weight") {
            continue;
        }
        match (stream, local) {
            (Stream::Context, "adaLN_modulation.1") if t.shape.first() == Some(&(2 * hidden)) => {
                pre_only = Some(block);
            }
            (Stream::Image, "attn2.qkv") => dual.push(block),
            (Stream::Image, "attn.ln_q") => qk_norm = true,
            _ => {}
        }
    }
    for (&block, s) in &streams {
        if !(s[0] && s[1]) {
            let (present, missing) = if s[0] {
                ("x_block", "context_block")
            } else {
                ("context_block", "x_block")
            };
            return Err(rule_error(SingleFileRule::MissingStream {
                block,
                present,
                missing,
            }));
        }
    }
    let last = *streams
        .keys()
        .next_back()
        .ok_or(rule_error(SingleFileRule::NoBlocks))?;
    if let Some(block) = pre_only
        && block != last
    {
        return Err(rule_error(SingleFileRule::PreOnlyNotLast { block, last }));
    }

    // Rename, checking that every block agrees on every shape but the modulations'.
    let mut targets = Vec::with_capacity(stored.len());
    let mut block_shapes: BTreeMap<String, (usize, Vec<usize>)> = BTreeMap::new();
    for t in stored {
        let block = block_of(&t.key);
        let target = rename(&t.key, block.is_some_and(|(b, _, _)| Some(b) == pre_only))
            .ok_or_else(|| {
                rule_error(SingleFileRule::UnknownTensor {
                    tensor: t.key.clone(),
                })
            })?;
        if let Target::Split3(_) = target {
            let rows = t.shape.first().copied().unwrap_or(0);
            if rows == 0 || !rows.is_multiple_of(3) {
                return Err(rule_error(SingleFileRule::QkvRows {
                    tensor: t.key.clone(),
                    rows,
                }));
            }
        }
        if let Some((block, stream, local)) = block
            && local != "adaLN_modulation.1"
        {
            let param = t.key.rsplit_once('.').map_or("", |(_, p)| p);
            let id = format!("{stream:?}.{local}.{param}");
            match block_shapes.get(&id) {
                Some((other_block, expected)) if *expected != t.shape => {
                    return Err(rule_error(SingleFileRule::BlockShapes {
                        tensor: t.key.clone(),
                        found: t.shape.clone(),
                        other_block: *other_block,
                        expected: expected.clone(),
                    }));
                }
                Some(_) => {}
                None => {
                    block_shapes.insert(id, (block, t.shape.clone()));
                }
            }
        }
        targets.push((t, target));
    }

    let config = match config {
        Some(c) => c,
        None => infer_config(
            &targets,
            hidden,
            in_channels,
            p,
            head_dim,
            pre_only,
            last,
            &dual,
            qk_norm,
        )
        .map_err(&rule_error)?,
    };
    config.validate()?;
    if last >= config.num_layers {
        return Err(rule_error(SingleFileRule::BlockOutsideConfig {
            block: last,
            num_layers: config.num_layers,
        }));
    }

    for (t, target) in targets {
        match target {
            Target::Whole(name) => weights.add(name, file, t.range, t.dtype, t.shape, false)?,
            Target::SwapHalves(name) => weights.add(name, file, t.range, t.dtype, t.shape, true)?,
            Target::Split3(names) => {
                // Rows checked above: a multiple of 3.
                let rows = t.shape[0];
                let part = (t.range.end - t.range.start) / 3;
                let mut shape = t.shape.clone();
                shape[0] = rows / 3;
                for (j, name) in names.into_iter().enumerate() {
                    let start = t.range.start + j * part;
                    weights.add(
                        name,
                        file,
                        start..start + part,
                        t.dtype,
                        shape.clone(),
                        false,
                    )?;
                }
            }
        }
    }
    Ok(SingleFile {
        weights: weights.finish(),
        config,
        present_blocks: streams.into_keys().collect(),
        components: others.into_values().collect(),
    })
}

/// The configuration the shapes imply (see the module docs).
#[allow(clippy::too_many_arguments)]
fn infer_config(
    targets: &[(Stored, Target)],
    hidden: usize,
    in_channels: usize,
    patch: usize,
    head_dim: Option<usize>,
    pre_only: Option<usize>,
    last: usize,
    dual: &[usize],
    qk_norm: bool,
) -> std::result::Result<MmditConfig, SingleFileRule> {
    let shape = |key: &str| {
        targets
            .iter()
            .find(|(t, _)| t.key == key)
            .map(|(t, _)| &t.shape[..])
    };
    let matrix = |key: &'static str, expected: &'static str| match shape(key) {
        Some(&[n, k]) => Ok((n, k)),
        _ => Err(SingleFileRule::ShapeSource {
            tensor: key,
            expected,
        }),
    };
    let head_dim = head_dim.unwrap_or(DEFAULT_HEAD_DIM);
    if head_dim == 0 || !hidden.is_multiple_of(head_dim) {
        return Err(SingleFileRule::HeadDim { hidden, head_dim });
    }
    let table = shape("pos_embed").ok_or(SingleFileRule::ShapeSource {
        tensor: "pos_embed",
        expected: "[1, side * side, D]",
    })?;
    let side = match *table {
        [1, cells, d] if d == hidden => {
            let side = cells.isqrt();
            (side * side == cells && side > 0).then_some(side)
        }
        _ => None,
    }
    .ok_or_else(|| SingleFileRule::PosEmbedNotSquare {
        shape: table.to_vec(),
    })?;
    let (_, joint_attention_dim) = matrix("context_embedder.weight", "[D, joint_attention_dim]")?;
    let (_, pooled_projection_dim) = matrix("y_embedder.mlp.0.weight", "[D, pooled_dim]")?;
    let (out_rows, _) = matrix("final_layer.linear.weight", "[p * p * out_channels, D]")?;
    Ok(MmditConfig {
        // Not stored in the file: the SD3 family's 128, rounded to a multiple of the patch.
        sample_size: (DEFAULT_SAMPLE_SIZE / patch).max(1) * patch,
        patch_size: patch,
        in_channels,
        out_channels: out_rows / (patch * patch),
        num_layers: pre_only.map_or(last + 2, |b| b + 1),
        attention_head_dim: head_dim,
        num_attention_heads: hidden / head_dim,
        joint_attention_dim,
        caption_projection_dim: hidden,
        pooled_projection_dim,
        pos_embed_max_size: side,
        qk_norm: qk_norm.then(|| "rms_norm".to_string()),
        dual_attention_layers: dual.to_vec(),
    })
}
