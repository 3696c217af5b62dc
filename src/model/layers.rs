//! The layers of an MMDiT model as typed structs, resolved once at load: one
//! [`TopLayers`] for the embeddings and the output head, one [`BlockLayers`] per kept
//! block (its attention, the MMDiT-X `attn2`, the feed-forwards and the modulations),
//! with `None` for what the pruning plan removes. A loaded model cannot lack a layer,
//! and the forward never looks one up by name.
//!
//! This module is the one place that spells the checkpoint's (diffusers') tensor names
//! and derives their shapes from the config. The builders hand each tensor to a
//! [`LayerSink`]: the model's sink uploads it to the backend, and
//! [`crate::model::layout`]'s sink records it, so the list of required tensors that
//! `compress` and the weight counters read is the very list the model loads.

use crate::config::MmditConfig;
use crate::error::Result;
use crate::model::prune::BlockMask;
use crate::model::weights::POS_TABLE;

/// Sinusoidal channels of the timestep embedding (the input of its first linear).
pub const TIMESTEP_CHANNELS: usize = 256;
/// Name of the patch convolution's weight `[D, C, p, p]` (its bias is `.bias`).
pub const PATCH_CONV: &str = "pos_embed.proj";

/// Receives the tensors of a model, in load order, and turns each into the value the
/// typed structs hold.
pub(crate) trait LayerSink {
    /// A linear layer.
    type Linear;
    /// A per-head RMS-norm weight.
    type Norm;

    /// The linear layer `<name>.weight [n, k]` with its bias `<name>.bias [n]`.
    fn linear(&mut self, name: String, n: usize, k: usize) -> Result<Self::Linear>;

    /// The qk-norm weight `name` of `len` (the head dim) elements.
    fn norm(&mut self, name: String, len: usize) -> Result<Self::Norm>;

    /// The patch convolution `<name>.weight [d, c, p, p]` with `<name>.bias [d]`, run as
    /// a linear layer `[d, c * p * p]` over patches.
    fn patch_conv(&mut self, name: &str, d: usize, c: usize, p: usize) -> Result<Self::Linear>;

    /// The positional table `name [1, grid * grid, d]`; held by the weights, not here.
    fn pos_table(&mut self, name: &str, grid: usize, d: usize) -> Result<()>;
}

/// The layers outside the blocks.
pub(crate) struct TopLayers<L> {
    /// The patch convolution as a linear layer over `[C, p, p]` patches.
    pub patch_conv: L,
    /// `time_text_embed.timestep_embedder.linear_1` and `linear_2`.
    pub timestep: [L; 2],
    /// `time_text_embed.text_embedder.linear_1` and `linear_2` (the pooled-text MLP).
    pub text: [L; 2],
    /// `context_embedder`.
    pub context_embedder: L,
    /// `norm_out.linear`: the final AdaLayerNormContinuous (scale, then shift).
    pub norm_out: L,
    /// `proj_out`.
    pub proj_out: L,
}

impl<L> TopLayers<L> {
    /// Loads the top-level layers of `cfg` into `sink`.
    pub fn load<S: LayerSink<Linear = L>>(cfg: &MmditConfig, sink: &mut S) -> Result<Self> {
        let d = cfg.hidden_size();
        let p = cfg.patch_size;
        let patch_conv = sink.patch_conv(PATCH_CONV, d, cfg.in_channels, p)?;
        sink.pos_table(POS_TABLE, cfg.pos_embed_max_size, d)?;
        let te = "time_text_embed.timestep_embedder";
        let timestep = [
            sink.linear(format!("{te}.linear_1"), d, TIMESTEP_CHANNELS)?,
            sink.linear(format!("{te}.linear_2"), d, d)?,
        ];
        let tx = "time_text_embed.text_embedder";
        let text = [
            sink.linear(format!("{tx}.linear_1"), d, cfg.pooled_projection_dim)?,
            sink.linear(format!("{tx}.linear_2"), d, d)?,
        ];
        Ok(TopLayers {
            patch_conv,
            timestep,
            text,
            context_embedder: sink.linear(
                "context_embedder".into(),
                cfg.caption_projection_dim,
                cfg.joint_attention_dim,
            )?,
            norm_out: sink.linear("norm_out.linear".into(), 2 * d, d)?,
            proj_out: sink.linear("proj_out".into(), p * p * cfg.out_channels, d)?,
        })
    }
}

/// The per-head RMS norms of q and k.
pub(crate) struct QkNorm<N> {
    /// Applied to q.
    pub q: N,
    /// Applied to k.
    pub k: N,
}

/// The q, k, v projections of one token stream, with its qk-norm when the model has
/// one.
pub(crate) struct Projections<L, N> {
    /// q, k, v.
    pub qkv: [L; 3],
    /// `None` for SD3 (no qk-norm).
    pub norm: Option<QkNorm<N>>,
}

/// The joint attention `attn` of a block over `[image; context]` tokens.
pub(crate) struct JointAttention<L, N> {
    /// `to_q`, `to_k`, `to_v` (+ `norm_q`, `norm_k`).
    pub image: Projections<L, N>,
    /// `add_q_proj`, `add_k_proj`, `add_v_proj` (+ `norm_added_q`, `norm_added_k`).
    pub context: Projections<L, N>,
    /// `to_out.0`.
    pub to_out: L,
    /// `to_add_out`; `None` in a `context_pre_only` block.
    pub to_add_out: Option<L>,
}

/// The MMDiT-X image-only attention `attn2`.
pub(crate) struct SelfAttention<L, N> {
    /// `to_q`, `to_k`, `to_v` (+ `norm_q`, `norm_k`).
    pub proj: Projections<L, N>,
    /// `to_out.0`.
    pub to_out: L,
}

/// `net.2(GELU_tanh(net.0.proj(x)))`.
pub(crate) struct FeedForward<L> {
    /// `net.0.proj` `[4D, D]`.
    pub up: L,
    /// `net.2` `[D, 4D]`.
    pub down: L,
}

/// One kept block; a sub-component the plan removes is `None`.
pub(crate) struct BlockLayers<L, N> {
    /// The block's original index.
    pub index: usize,
    /// The sub-components removed when it was loaded.
    pub mask: BlockMask,
    /// The original last block (`context_pre_only`: no context update).
    pub pre_only: bool,
    /// An MMDiT-X dual-attention block (9 modulation chunks, `attn2`).
    pub dual: bool,
    /// `norm1.linear` `[6D or 9D, D]`.
    pub norm1: Option<L>,
    /// `norm1_context.linear` `[6D, D]`, or `[2D, D]` in a `context_pre_only` block.
    pub norm1_context: Option<L>,
    /// `attn`.
    pub attn: Option<JointAttention<L, N>>,
    /// `attn2` (dual-attention blocks only).
    pub attn2: Option<SelfAttention<L, N>>,
    /// `ff`.
    pub ff: Option<FeedForward<L>>,
    /// `ff_context` (not in a `context_pre_only` block).
    pub ff_context: Option<FeedForward<L>>,
}

impl<L, N> BlockLayers<L, N> {
    /// Loads block `i` of `cfg` with the sub-components `mask` removes left out.
    pub fn load<S: LayerSink<Linear = L, Norm = N>>(
        cfg: &MmditConfig,
        i: usize,
        mask: BlockMask,
        sink: &mut S,
    ) -> Result<Self> {
        let d = cfg.hidden_size();
        let hd = cfg.attention_head_dim;
        let pre_only = i + 1 == cfg.num_layers;
        let dual = cfg.is_dual(i);
        let qk_norm = cfg.has_qk_norm();
        let b = |s: &str| format!("transformer_blocks.{i}.{s}");

        let image_chunks = if dual { 9 } else { 6 };
        let context_chunks = if pre_only { 2 } else { 6 };
        let norm1 = if mask.norm1 {
            None
        } else {
            Some(sink.linear(b("norm1.linear"), image_chunks * d, d)?)
        };
        let norm1_context = if mask.norm1_context {
            None
        } else {
            Some(sink.linear(b("norm1_context.linear"), context_chunks * d, d)?)
        };
        let attn = if mask.attn {
            None
        } else {
            let mut lin = |s: &str| sink.linear(b(&format!("attn.{s}")), d, d);
            let image = [lin("to_q")?, lin("to_k")?, lin("to_v")?];
            let to_out = lin("to_out.0")?;
            let context = [lin("add_q_proj")?, lin("add_k_proj")?, lin("add_v_proj")?];
            let to_add_out = if pre_only {
                None
            } else {
                Some(lin("to_add_out")?)
            };
            let (image_norm, context_norm) = if qk_norm {
                let mut norm = |s: &str| sink.norm(b(&format!("attn.{s}.weight")), hd);
                let image = QkNorm {
                    q: norm("norm_q")?,
                    k: norm("norm_k")?,
                };
                let context = QkNorm {
                    q: norm("norm_added_q")?,
                    k: norm("norm_added_k")?,
                };
                (Some(image), Some(context))
            } else {
                (None, None)
            };
            Some(JointAttention {
                image: Projections {
                    qkv: image,
                    norm: image_norm,
                },
                context: Projections {
                    qkv: context,
                    norm: context_norm,
                },
                to_out,
                to_add_out,
            })
        };
        let attn2 = if dual && !mask.attn2 {
            let mut lin = |s: &str| sink.linear(b(&format!("attn2.{s}")), d, d);
            let qkv = [lin("to_q")?, lin("to_k")?, lin("to_v")?];
            let to_out = lin("to_out.0")?;
            let norm = if qk_norm {
                Some(QkNorm {
                    q: sink.norm(b("attn2.norm_q.weight"), hd)?,
                    k: sink.norm(b("attn2.norm_k.weight"), hd)?,
                })
            } else {
                None
            };
            Some(SelfAttention {
                proj: Projections { qkv, norm },
                to_out,
            })
        } else {
            None
        };
        let mut feed_forward = |prefix: &str| -> Result<FeedForward<L>> {
            Ok(FeedForward {
                up: sink.linear(b(&format!("{prefix}.net.0.proj")), 4 * d, d)?,
                down: sink.linear(b(&format!("{prefix}.net.2")), d, 4 * d)?,
            })
        };
        let ff = if mask.ff {
            None
        } else {
            Some(feed_forward("ff")?)
        };
        let ff_context = if pre_only || mask.ff_context {
            None
        } else {
            Some(feed_forward("ff_context")?)
        };
        Ok(BlockLayers {
            index: i,
            mask,
            pre_only,
            dual,
            norm1,
            norm1_context,
            attn,
            attn2,
            ff,
            ff_context,
        })
    }
}
