//! The tensors an MMDiT model needs, with diffusers names and shapes, for a config and
//! a pruning plan (removed blocks and sub-components need no weights).

use super::config::MmditConfig;
use super::prune::PruneSpec;

/// One tensor the model reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Required {
    /// A linear layer `<name>.weight [n, k]` with `<name>.bias [n]`.
    Linear {
        /// Layer name without `.weight`.
        name: String,
        /// Output features.
        n: usize,
        /// Input features.
        k: usize,
    },
    /// A plain tensor read as f32.
    Plain {
        /// Tensor name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
    },
}

fn lin(name: String, n: usize, k: usize) -> Required {
    Required::Linear { name, n, k }
}

/// Every tensor the model reads under `spec`, top-level ones first.
pub fn required_tensors(cfg: &MmditConfig, spec: &PruneSpec) -> Vec<Required> {
    let d = cfg.hidden_size();
    let p = cfg.patch_size;
    let m = cfg.pos_embed_max_size;
    let mut out = vec![
        Required::Plain {
            name: "pos_embed.proj.weight".into(),
            shape: vec![d, cfg.in_channels, p, p],
        },
        Required::Plain {
            name: "pos_embed.proj.bias".into(),
            shape: vec![d],
        },
        Required::Plain {
            name: "pos_embed.pos_embed".into(),
            shape: vec![1, m * m, d],
        },
        lin("time_text_embed.timestep_embedder.linear_1".into(), d, 256),
        lin("time_text_embed.timestep_embedder.linear_2".into(), d, d),
        lin(
            "time_text_embed.text_embedder.linear_1".into(),
            d,
            cfg.pooled_projection_dim,
        ),
        lin("time_text_embed.text_embedder.linear_2".into(), d, d),
        lin(
            "context_embedder".into(),
            cfg.caption_projection_dim,
            cfg.joint_attention_dim,
        ),
        lin("norm_out.linear".into(), 2 * d, d),
        lin("proj_out".into(), p * p * cfg.out_channels, d),
    ];
    for i in spec.kept_blocks(cfg.num_layers) {
        out.extend(block_tensors(cfg, i, spec));
    }
    out
}

/// The tensors block `i` reads under `spec`.
pub fn block_tensors(cfg: &MmditConfig, i: usize, spec: &PruneSpec) -> Vec<Required> {
    let d = cfg.hidden_size();
    let hd = cfg.attention_head_dim;
    let last = i + 1 == cfg.num_layers;
    let dual = cfg.is_dual(i);
    let mask = spec.mask(i);
    let b = |s: &str| format!("transformer_blocks.{i}.{s}");
    let norm = |s: &str| Required::Plain {
        name: b(s),
        shape: vec![hd],
    };
    let mut out = Vec::new();
    if !mask.norm1 {
        out.push(lin(b("norm1.linear"), if dual { 9 * d } else { 6 * d }, d));
    }
    if !mask.norm1_context {
        out.push(lin(
            b("norm1_context.linear"),
            if last { 2 * d } else { 6 * d },
            d,
        ));
    }
    if !mask.attn {
        for s in [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
        ] {
            out.push(lin(b(&format!("attn.{s}")), d, d));
        }
        if !last {
            out.push(lin(b("attn.to_add_out"), d, d));
        }
        if cfg.has_qk_norm() {
            for s in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
                out.push(norm(&format!("attn.{s}.weight")));
            }
        }
    }
    if dual && !mask.attn2 {
        for s in ["to_q", "to_k", "to_v", "to_out.0"] {
            out.push(lin(b(&format!("attn2.{s}")), d, d));
        }
        if cfg.has_qk_norm() {
            out.push(norm("attn2.norm_q.weight"));
            out.push(norm("attn2.norm_k.weight"));
        }
    }
    if !mask.ff {
        out.push(lin(b("ff.net.0.proj"), 4 * d, d));
        out.push(lin(b("ff.net.2"), d, 4 * d));
    }
    if !last && !mask.ff_context {
        out.push(lin(b("ff_context.net.0.proj"), 4 * d, d));
        out.push(lin(b("ff_context.net.2"), d, 4 * d));
    }
    out
}
