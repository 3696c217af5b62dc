//! One joint transformer block (diffusers' `JointTransformerBlock`), with the
//! sub-component removal of [`crate::model::prune::BlockMask`], on the backend.

use crate::backend::{Backend, Modulation};
use crate::error::Result;
use crate::model::layers::{FeedForward, JointAttention, Projections, SelfAttention};
use crate::model::mmdit::{Block, Dims, Mmdit, NORM_EPS, continuous_chunks};

/// The (shift, scale, gate) modulation chunks of one branch, each `[batch, D]`; a
/// branch without modulation is `None` (shift = scale = 0, gate = 1).
struct Mod<T> {
    shift: T,
    scale: T,
    /// `None` for the AdaLayerNormContinuous of a `context_pre_only` block.
    gate: Option<T>,
}

impl<T> Mod<T> {
    fn modulation(&self) -> Modulation<'_, T> {
        Modulation {
            shift: &self.shift,
            scale: &self.scale,
        }
    }
}

/// Chunks `first`, `first + 1`, `first + 2` of `nch` of the modulation `m`.
fn chunks<B: Backend>(be: &B, m: &B::Tensor, nch: usize, first: usize) -> Result<Mod<B::Tensor>> {
    Ok(Mod {
        shift: be.column_chunk(m, nch, first)?,
        scale: be.column_chunk(m, nch, first + 1)?,
        gate: Some(be.column_chunk(m, nch, first + 2)?),
    })
}

/// The modulation of a branch, if any.
fn modulation<T>(m: &Option<Mod<T>>) -> Option<Modulation<'_, T>> {
    m.as_ref().map(Mod::modulation)
}

/// The gate of a branch: `None` (a gate of 1) without modulation.
fn gate<T>(m: &Option<Mod<T>>) -> Option<&T> {
    m.as_ref().and_then(|m| m.gate.as_ref())
}

impl<B: Backend> Mmdit<B> {
    /// Runs `block` on the image stream `x [B*N, D]` and the context `c [B*T, D]`.
    /// When `last_kept`, the context update is skipped: nothing reads it afterwards.
    pub(crate) fn block(
        &self,
        block: &Block<B>,
        last_kept: bool,
        x: &mut B::Tensor,
        c: &mut B::Tensor,
        silu_temb: &B::Tensor,
        dims: &Dims,
    ) -> Result<()> {
        let be = self.backend();
        let batch = dims.batch;
        let pre_only = block.pre_only;
        let dual = block.dual;

        // Image modulation: (msa, mlp[, msa2]) x (shift, scale, gate).
        let (img_msa, img_mlp, img_msa2) = match &block.norm1 {
            None => (None, None, None),
            Some(norm1) => {
                let nch = if dual { 9 } else { 6 };
                let m = be.linear(silu_temb, norm1)?;
                let msa2 = if dual {
                    Some(chunks(be, &m, nch, 6)?)
                } else {
                    None
                };
                (
                    Some(chunks(be, &m, nch, 0)?),
                    Some(chunks(be, &m, nch, 3)?),
                    msa2,
                )
            }
        };
        // Context modulation.
        let (ctx_msa, ctx_mlp) = match (&block.norm1_context, pre_only) {
            (None, _) => (None, None),
            (Some(norm), true) => {
                // AdaLayerNormContinuous: no gates.
                let m = be.linear(silu_temb, norm)?;
                let (shift, scale) = continuous_chunks(be, &m)?;
                let mo = Mod {
                    shift,
                    scale,
                    gate: None,
                };
                (Some(mo), None)
            }
            (Some(norm), false) => {
                let m = be.linear(silu_temb, norm)?;
                (Some(chunks(be, &m, 6, 0)?), Some(chunks(be, &m, 6, 3)?))
            }
        };

        // Both image attentions read LN(x) of the block input.
        let norm_x2 = match &block.attn2 {
            Some(_) => Some(be.layer_norm_modulate(x, modulation(&img_msa2), NORM_EPS)?),
            None => None,
        };
        let mut ctx_attn = None;
        if let Some(attn) = &block.attn {
            let norm_x = be.layer_norm_modulate(x, modulation(&img_msa), NORM_EPS)?;
            let norm_c = be.layer_norm_modulate(c, modulation(&ctx_msa), NORM_EPS)?;
            let (ax, ac) = self.joint_attention(attn, &norm_x, &norm_c, dims)?;
            let ax = be.linear(&ax, &attn.to_out)?;
            be.gated_residual(x, gate(&img_msa), &ax)?;
            if let Some(to_add_out) = &attn.to_add_out
                && !last_kept
            {
                ctx_attn = Some(be.linear(&ac, to_add_out)?);
            }
        }
        if let (Some(attn2), Some(nx2)) = (&block.attn2, norm_x2) {
            let a2 = self.self_attention(attn2, &nx2, batch)?;
            be.gated_residual(x, gate(&img_msa2), &a2)?;
        }
        if let Some(ff) = &block.ff {
            let nx = be.layer_norm_modulate(x, modulation(&img_mlp), NORM_EPS)?;
            let h = self.feed_forward(ff, &nx)?;
            be.gated_residual(x, gate(&img_mlp), &h)?;
        }
        if pre_only || last_kept {
            return Ok(());
        }
        if let Some(ac) = ctx_attn {
            be.gated_residual(c, gate(&ctx_msa), &ac)?;
        }
        if let Some(ff) = &block.ff_context {
            let nc = be.layer_norm_modulate(c, modulation(&ctx_mlp), NORM_EPS)?;
            let h = self.feed_forward(ff, &nc)?;
            be.gated_residual(c, gate(&ctx_mlp), &h)?;
        }
        Ok(())
    }

    /// `down(GELU_tanh(up(x)))`.
    fn feed_forward(&self, ff: &FeedForward<B::Linear>, x: &B::Tensor) -> Result<B::Tensor> {
        let be = self.backend();
        let mut h = be.linear(x, &ff.up)?;
        be.gelu_tanh(&mut h)?;
        be.linear(&h, &ff.down)
    }

    /// Projects `x` to q, k, v and applies the qk RMS norms when the model has them.
    fn qkv(
        &self,
        x: &B::Tensor,
        proj: &Projections<B::Linear, B::Tensor>,
    ) -> Result<[B::Tensor; 3]> {
        let be = self.backend();
        let [wq, wk, wv] = &proj.qkv;
        let mut q = be.linear(x, wq)?;
        let mut k = be.linear(x, wk)?;
        let v = be.linear(x, wv)?;
        if let Some(norm) = &proj.norm {
            be.rms_norm_heads(&mut q, &norm.q, NORM_EPS)?;
            be.rms_norm_heads(&mut k, &norm.k, NORM_EPS)?;
        }
        Ok([q, k, v])
    }

    /// Joint attention over `[image; context]` tokens; returns the image and context
    /// parts of the attention output (before the output projections).
    fn joint_attention(
        &self,
        attn: &JointAttention<B::Linear, B::Tensor>,
        norm_x: &B::Tensor,
        norm_c: &B::Tensor,
        dims: &Dims,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let be = self.backend();
        let batch = dims.batch;
        let [qi, ki, vi] = self.qkv(norm_x, &attn.image)?;
        let [qc, kc, vc] = self.qkv(norm_c, &attn.context)?;
        let q = be.concat_tokens(&qi, &qc, batch)?;
        let k = be.concat_tokens(&ki, &kc, batch)?;
        let v = be.concat_tokens(&vi, &vc, batch)?;
        let o = be.attention(&q, &k, &v, batch, self.config.num_attention_heads)?;
        be.split_tokens(&o, batch, dims.n_img)
    }

    /// The MMDiT-X image-only attention including its output projection.
    fn self_attention(
        &self,
        attn: &SelfAttention<B::Linear, B::Tensor>,
        x: &B::Tensor,
        batch: usize,
    ) -> Result<B::Tensor> {
        let be = self.backend();
        let [q, k, v] = self.qkv(x, &attn.proj)?;
        let o = be.attention(&q, &k, &v, batch, self.config.num_attention_heads)?;
        be.linear(&o, &attn.to_out)
    }
}
