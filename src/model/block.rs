//! One joint transformer block (diffusers' `JointTransformerBlock`), with the
//! sub-component removal of [`crate::model::prune::BlockMask`].

use crate::backend::cpu::attention::{AttentionShape, attention};
use crate::backend::cpu::ops;
use crate::error::Result;
use crate::model::mmdit::{Dims, Mmdit, NORM_EPS, chunk};

/// The (shift, scale, gate) modulation chunks of one branch; `None` = no modulation
/// (shift = scale = 0, gate = 1).
struct Mod {
    shift: Vec<f32>,
    scale: Vec<f32>,
    gate: Vec<f32>,
}

impl Mod {
    fn from(m: &[f32], batch: usize, nch: usize, first: usize, d: usize) -> Mod {
        Mod {
            shift: chunk(m, batch, nch, first, d),
            scale: chunk(m, batch, nch, first + 1, d),
            gate: chunk(m, batch, nch, first + 2, d),
        }
    }
}

/// `LN(x)` modulated by `m` when given.
fn norm_mod(x: &[f32], d: usize, rows_per_item: usize, m: Option<&Mod>) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; x.len()];
    ops::layer_norm(x, d, NORM_EPS, &mut out)?;
    if let Some(m) = m {
        ops::modulate(&mut out, d, rows_per_item, &m.shift, &m.scale)?;
    }
    Ok(out)
}

impl Mmdit {
    /// Runs block `i` on the image stream `x [B*N, D]` and the context `c [B*T, D]`.
    /// When `last_kept`, the context update is skipped: nothing reads it afterwards.
    pub(crate) fn block(
        &self,
        i: usize,
        last_kept: bool,
        x: &mut [f32],
        c: &mut [f32],
        silu_temb: &[f32],
        dims: &Dims,
    ) -> Result<()> {
        let cfg = &self.config;
        let d = cfg.hidden_size();
        let Dims {
            batch,
            n_img,
            n_ctx,
            ..
        } = *dims;
        let pre_only = i + 1 == cfg.num_layers;
        let dual = cfg.is_dual(i);
        let mask = self.spec.mask(i);
        let name = |s: &str| format!("transformer_blocks.{i}.{s}");

        // Image modulation: (msa, mlp[, msa2]) x (shift, scale, gate).
        let (img_msa, img_mlp, img_msa2) = if mask.norm1 {
            (None, None, None)
        } else {
            let nch = if dual { 9 } else { 6 };
            let m = self.lin(&name("norm1.linear"), silu_temb, batch, nch * d, d)?;
            let msa2 = dual.then(|| Mod::from(&m, batch, nch, 6, d));
            (
                Some(Mod::from(&m, batch, nch, 0, d)),
                Some(Mod::from(&m, batch, nch, 3, d)),
                msa2,
            )
        };
        // Context modulation.
        let (ctx_msa, ctx_mlp) = match (mask.norm1_context, pre_only) {
            (true, _) => (None, None),
            (false, true) => {
                // AdaLayerNormContinuous: scale, then shift; no gates.
                let m = self.lin(&name("norm1_context.linear"), silu_temb, batch, 2 * d, d)?;
                let mo = Mod {
                    shift: chunk(&m, batch, 2, 1, d),
                    scale: chunk(&m, batch, 2, 0, d),
                    gate: Vec::new(),
                };
                (Some(mo), None)
            }
            (false, false) => {
                let m = self.lin(&name("norm1_context.linear"), silu_temb, batch, 6 * d, d)?;
                (
                    Some(Mod::from(&m, batch, 6, 0, d)),
                    Some(Mod::from(&m, batch, 6, 3, d)),
                )
            }
        };
        let gate = |m: &Option<Mod>| -> Option<Vec<f32>> { m.as_ref().map(|m| m.gate.clone()) };

        let mut ln_x = vec![0.0f32; x.len()];
        ops::layer_norm(x, d, NORM_EPS, &mut ln_x)?;
        let norm_x2 = if dual && !mask.attn2 {
            let mut v = ln_x.clone();
            if let Some(m) = &img_msa2 {
                ops::modulate(&mut v, d, n_img, &m.shift, &m.scale)?;
            }
            Some(v)
        } else {
            None
        };
        let mut ctx_attn = None;
        if !mask.attn {
            let mut norm_x = ln_x;
            if let Some(m) = &img_msa {
                ops::modulate(&mut norm_x, d, n_img, &m.shift, &m.scale)?;
            }
            let norm_c = norm_mod(c, d, n_ctx, ctx_msa.as_ref())?;
            let (ax, ac) = self.joint_attention(i, &norm_x, &norm_c, dims)?;
            let ax = self.lin(&name("attn.to_out.0"), &ax, batch * n_img, d, d)?;
            ops::gated_add(x, &ax, d, n_img, gate(&img_msa).as_deref())?;
            if !pre_only && !last_kept {
                ctx_attn = Some(self.lin(&name("attn.to_add_out"), &ac, batch * n_ctx, d, d)?);
            }
        }
        if let Some(nx2) = norm_x2 {
            let a2 = self.self_attention(&name("attn2"), &nx2, batch, n_img)?;
            ops::gated_add(x, &a2, d, n_img, gate(&img_msa2).as_deref())?;
        }
        if !mask.ff {
            let nx = norm_mod(x, d, n_img, img_mlp.as_ref())?;
            let h = self.feed_forward(&name("ff"), &nx, batch * n_img)?;
            ops::gated_add(x, &h, d, n_img, gate(&img_mlp).as_deref())?;
        }
        if pre_only || last_kept {
            return Ok(());
        }
        if let Some(ac) = ctx_attn {
            ops::gated_add(c, &ac, d, n_ctx, gate(&ctx_msa).as_deref())?;
        }
        if !mask.ff_context {
            let nc = norm_mod(c, d, n_ctx, ctx_mlp.as_ref())?;
            let h = self.feed_forward(&name("ff_context"), &nc, batch * n_ctx)?;
            ops::gated_add(c, &h, d, n_ctx, gate(&ctx_mlp).as_deref())?;
        }
        Ok(())
    }

    /// `net.2(GELU_tanh(net.0.proj(x)))`.
    fn feed_forward(&self, prefix: &str, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let d = self.config.hidden_size();
        let mut h = self.lin(&format!("{prefix}.net.0.proj"), x, rows, 4 * d, d)?;
        ops::gelu_tanh(&mut h);
        self.lin(&format!("{prefix}.net.2"), &h, rows, d, 4 * d)
    }

    /// Projects `x` with `<prefix>.to_{q,k,v}` (or the `add_*_proj` names) and applies
    /// the qk RMS norms when the model has them.
    fn qkv(&self, x: &[f32], rows: usize, names: [&str; 5]) -> Result<[Vec<f32>; 3]> {
        let d = self.config.hidden_size();
        let hd = self.config.attention_head_dim;
        let mut q = self.lin(names[0], x, rows, d, d)?;
        let mut k = self.lin(names[1], x, rows, d, d)?;
        let v = self.lin(names[2], x, rows, d, d)?;
        if self.config.has_qk_norm() {
            ops::rms_norm_heads(&mut q, hd, self.small(names[3])?, NORM_EPS)?;
            ops::rms_norm_heads(&mut k, hd, self.small(names[4])?, NORM_EPS)?;
        }
        Ok([q, k, v])
    }

    /// Joint attention of block `i` over `[image; context]` tokens; returns the image
    /// and context parts of the attention output (before the output projections).
    fn joint_attention(
        &self,
        i: usize,
        norm_x: &[f32],
        norm_c: &[f32],
        dims: &Dims,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let d = self.config.hidden_size();
        let Dims {
            batch,
            n_img,
            n_ctx,
            ..
        } = *dims;
        let a = |s: &str| format!("transformer_blocks.{i}.attn.{s}");
        let img = self.qkv(
            norm_x,
            batch * n_img,
            [
                &a("to_q"),
                &a("to_k"),
                &a("to_v"),
                &a("norm_q.weight"),
                &a("norm_k.weight"),
            ],
        )?;
        let ctx = self.qkv(
            norm_c,
            batch * n_ctx,
            [
                &a("add_q_proj"),
                &a("add_k_proj"),
                &a("add_v_proj"),
                &a("norm_added_q.weight"),
                &a("norm_added_k.weight"),
            ],
        )?;
        let seq = n_img + n_ctx;
        let join = |xi: &[f32], ci: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(batch * seq * d);
            for b in 0..batch {
                out.extend_from_slice(&xi[b * n_img * d..(b + 1) * n_img * d]);
                out.extend_from_slice(&ci[b * n_ctx * d..(b + 1) * n_ctx * d]);
            }
            out
        };
        let (q, k, v) = (
            join(&img[0], &ctx[0]),
            join(&img[1], &ctx[1]),
            join(&img[2], &ctx[2]),
        );
        let mut o = vec![0.0f32; q.len()];
        let shape = AttentionShape {
            batch,
            seq,
            heads: self.config.num_attention_heads,
            head_dim: self.config.attention_head_dim,
        };
        attention(&q, &k, &v, shape, &mut o)?;
        let mut ox = Vec::with_capacity(batch * n_img * d);
        let mut oc = Vec::with_capacity(batch * n_ctx * d);
        for item in o.chunks(seq * d) {
            ox.extend_from_slice(&item[..n_img * d]);
            oc.extend_from_slice(&item[n_img * d..]);
        }
        Ok((ox, oc))
    }

    /// The MMDiT-X image-only attention `<prefix>` including its output projection.
    fn self_attention(&self, prefix: &str, x: &[f32], batch: usize, n: usize) -> Result<Vec<f32>> {
        let d = self.config.hidden_size();
        let p = |s: &str| format!("{prefix}.{s}");
        let [q, k, v] = self.qkv(
            x,
            batch * n,
            [
                &p("to_q"),
                &p("to_k"),
                &p("to_v"),
                &p("norm_q.weight"),
                &p("norm_k.weight"),
            ],
        )?;
        let mut o = vec![0.0f32; q.len()];
        let shape = AttentionShape {
            batch,
            seq: n,
            heads: self.config.num_attention_heads,
            head_dim: self.config.attention_head_dim,
        };
        attention(&q, &k, &v, shape, &mut o)?;
        self.lin(&p("to_out.0"), &o, batch * n, d, d)
    }
}
