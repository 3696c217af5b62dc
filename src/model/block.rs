//! One joint transformer block (diffusers' `JointTransformerBlock`), with the
//! sub-component removal of [`crate::model::prune::BlockMask`], on the backend.

use crate::backend::{Backend, Modulation};
use crate::error::Result;
use crate::model::mmdit::{Dims, Mmdit, NORM_EPS};

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
    /// Runs block `i` on the image stream `x [B*N, D]` and the context `c [B*T, D]`.
    /// When `last_kept`, the context update is skipped: nothing reads it afterwards.
    pub(crate) fn block(
        &self,
        i: usize,
        last_kept: bool,
        x: &mut B::Tensor,
        c: &mut B::Tensor,
        silu_temb: &B::Tensor,
        dims: &Dims,
    ) -> Result<()> {
        let be = self.backend();
        let cfg = &self.config;
        let batch = dims.batch;
        let pre_only = i + 1 == cfg.num_layers;
        let dual = cfg.is_dual(i);
        let mask = self.spec.mask(i);
        let name = |s: &str| format!("transformer_blocks.{i}.{s}");

        // Image modulation: (msa, mlp[, msa2]) x (shift, scale, gate).
        let (img_msa, img_mlp, img_msa2) = if mask.norm1 {
            (None, None, None)
        } else {
            let nch = if dual { 9 } else { 6 };
            let m = self.lin(&name("norm1.linear"), silu_temb)?;
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
        };
        // Context modulation.
        let (ctx_msa, ctx_mlp) = match (mask.norm1_context, pre_only) {
            (true, _) => (None, None),
            (false, true) => {
                // AdaLayerNormContinuous: scale, then shift; no gates.
                let m = self.lin(&name("norm1_context.linear"), silu_temb)?;
                let mo = Mod {
                    shift: be.column_chunk(&m, 2, 1)?,
                    scale: be.column_chunk(&m, 2, 0)?,
                    gate: None,
                };
                (Some(mo), None)
            }
            (false, false) => {
                let m = self.lin(&name("norm1_context.linear"), silu_temb)?;
                (Some(chunks(be, &m, 6, 0)?), Some(chunks(be, &m, 6, 3)?))
            }
        };

        // Both image attentions read LN(x) of the block input.
        let norm_x2 = if dual && !mask.attn2 {
            Some(be.layer_norm_modulate(x, modulation(&img_msa2), NORM_EPS)?)
        } else {
            None
        };
        let mut ctx_attn = None;
        if !mask.attn {
            let norm_x = be.layer_norm_modulate(x, modulation(&img_msa), NORM_EPS)?;
            let norm_c = be.layer_norm_modulate(c, modulation(&ctx_msa), NORM_EPS)?;
            let (ax, ac) = self.joint_attention(i, &norm_x, &norm_c, dims)?;
            let ax = self.lin(&name("attn.to_out.0"), &ax)?;
            be.gated_residual(x, gate(&img_msa), &ax)?;
            if !pre_only && !last_kept {
                ctx_attn = Some(self.lin(&name("attn.to_add_out"), &ac)?);
            }
        }
        if let Some(nx2) = norm_x2 {
            let a2 = self.self_attention(&name("attn2"), &nx2, batch)?;
            be.gated_residual(x, gate(&img_msa2), &a2)?;
        }
        if !mask.ff {
            let nx = be.layer_norm_modulate(x, modulation(&img_mlp), NORM_EPS)?;
            let h = self.feed_forward(&name("ff"), &nx)?;
            be.gated_residual(x, gate(&img_mlp), &h)?;
        }
        if pre_only || last_kept {
            return Ok(());
        }
        if let Some(ac) = ctx_attn {
            be.gated_residual(c, gate(&ctx_msa), &ac)?;
        }
        if !mask.ff_context {
            let nc = be.layer_norm_modulate(c, modulation(&ctx_mlp), NORM_EPS)?;
            let h = self.feed_forward(&name("ff_context"), &nc)?;
            be.gated_residual(c, gate(&ctx_mlp), &h)?;
        }
        Ok(())
    }

    /// `net.2(GELU_tanh(net.0.proj(x)))`.
    fn feed_forward(&self, prefix: &str, x: &B::Tensor) -> Result<B::Tensor> {
        let mut h = self.lin(&format!("{prefix}.net.0.proj"), x)?;
        self.backend().gelu_tanh(&mut h)?;
        self.lin(&format!("{prefix}.net.2"), &h)
    }

    /// Projects `x` with `<prefix>.to_{q,k,v}` (or the `add_*_proj` names) and applies
    /// the qk RMS norms when the model has them.
    fn qkv(&self, x: &B::Tensor, names: [&str; 5]) -> Result<[B::Tensor; 3]> {
        let be = self.backend();
        let mut q = self.lin(names[0], x)?;
        let mut k = self.lin(names[1], x)?;
        let v = self.lin(names[2], x)?;
        if self.config.has_qk_norm() {
            be.rms_norm_heads(&mut q, self.norm_weight(names[3])?, NORM_EPS)?;
            be.rms_norm_heads(&mut k, self.norm_weight(names[4])?, NORM_EPS)?;
        }
        Ok([q, k, v])
    }

    /// Joint attention of block `i` over `[image; context]` tokens; returns the image
    /// and context parts of the attention output (before the output projections).
    fn joint_attention(
        &self,
        i: usize,
        norm_x: &B::Tensor,
        norm_c: &B::Tensor,
        dims: &Dims,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let be = self.backend();
        let batch = dims.batch;
        let a = |s: &str| format!("transformer_blocks.{i}.attn.{s}");
        let [qi, ki, vi] = self.qkv(
            norm_x,
            [
                &a("to_q"),
                &a("to_k"),
                &a("to_v"),
                &a("norm_q.weight"),
                &a("norm_k.weight"),
            ],
        )?;
        let [qc, kc, vc] = self.qkv(
            norm_c,
            [
                &a("add_q_proj"),
                &a("add_k_proj"),
                &a("add_v_proj"),
                &a("norm_added_q.weight"),
                &a("norm_added_k.weight"),
            ],
        )?;
        let q = be.concat_tokens(&qi, &qc, batch)?;
        let k = be.concat_tokens(&ki, &kc, batch)?;
        let v = be.concat_tokens(&vi, &vc, batch)?;
        let o = be.attention(&q, &k, &v, batch, self.config.num_attention_heads)?;
        be.split_tokens(&o, batch, dims.n_img)
    }

    /// The MMDiT-X image-only attention `<prefix>` including its output projection.
    fn self_attention(&self, prefix: &str, x: &B::Tensor, batch: usize) -> Result<B::Tensor> {
        let p = |s: &str| format!("{prefix}.{s}");
        let [q, k, v] = self.qkv(
            x,
            [
                &p("to_q"),
                &p("to_k"),
                &p("to_v"),
                &p("norm_q.weight"),
                &p("norm_k.weight"),
            ],
        )?;
        let o = self
            .backend()
            .attention(&q, &k, &v, batch, self.config.num_attention_heads)?;
        self.lin(&p("to_out.0"), &o)
    }
}
