//! [`MmditConfig`]: the architecture hyper-parameters of an MMDiT transformer, with the
//! field names of a diffusers `config.json` for `SD3Transformer2DModel`. A plain type
//! below both the package format (whose manifest records it) and the model (which
//! runs it).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest `config.json` accepted (a real one is under 1 KiB).
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;
/// Cap on every size field of a config (channels, widths, table side): far above any
/// released model, far below sizes whose buffers would exhaust memory.
pub const MAX_CONFIG_DIM: usize = 1 << 16;
/// Cap on `num_layers`.
pub const MAX_LAYERS: usize = 1024;

/// Architecture of an MMDiT transformer (SD3, SD3.5 Large, SD3.5 Medium / MMDiT-X).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmditConfig {
    /// Latent height/width the model was trained for (in latent pixels).
    pub sample_size: usize,
    /// Patch size of the patch embedding (2 for SD3).
    pub patch_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Number of joint transformer blocks.
    pub num_layers: usize,
    /// Width of one attention head.
    pub attention_head_dim: usize,
    /// Number of attention heads; hidden size D = heads x head_dim.
    pub num_attention_heads: usize,
    /// Width of the text encoder's token embeddings.
    pub joint_attention_dim: usize,
    /// Width the context embedder projects to (equals D in released models).
    pub caption_projection_dim: usize,
    /// Width of the pooled text embedding.
    pub pooled_projection_dim: usize,
    /// Side of the stored positional-embedding grid.
    pub pos_embed_max_size: usize,
    /// `Some("rms_norm")` for SD3.5's query/key RMS norm, `None` for SD3.
    pub qk_norm: Option<String>,
    /// Blocks with the MMDiT-X second (image-only) attention.
    pub dual_attention_layers: Vec<usize>,
}

/// A diffusers `config.json` as written: every field optional (diffusers' defaults fill
/// the gaps), unknown fields ignored.
#[derive(Deserialize)]
struct RawConfig {
    sample_size: Option<usize>,
    patch_size: Option<usize>,
    in_channels: Option<usize>,
    out_channels: Option<usize>,
    num_layers: Option<usize>,
    attention_head_dim: Option<usize>,
    num_attention_heads: Option<usize>,
    joint_attention_dim: Option<usize>,
    caption_projection_dim: Option<usize>,
    pooled_projection_dim: Option<usize>,
    pos_embed_max_size: Option<usize>,
    qk_norm: Option<String>,
    dual_attention_layers: Option<Vec<usize>>,
}

fn config_error(field: &str, reason: impl Into<String>) -> Error {
    Error::invalid(format!("config field `{field}`"), reason)
}

impl MmditConfig {
    /// Parses a diffusers `SD3Transformer2DModel` `config.json`, filling absent fields
    /// with diffusers' defaults, then [`validate`](Self::validate)s it.
    pub fn from_json(json: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| Error::invalid("config.json", e.to_string()))?;
        let in_channels = raw.in_channels.unwrap_or(16);
        let cfg = MmditConfig {
            sample_size: raw.sample_size.unwrap_or(128),
            patch_size: raw.patch_size.unwrap_or(2),
            in_channels,
            out_channels: raw.out_channels.unwrap_or(in_channels),
            num_layers: raw.num_layers.unwrap_or(18),
            attention_head_dim: raw.attention_head_dim.unwrap_or(64),
            num_attention_heads: raw.num_attention_heads.unwrap_or(18),
            joint_attention_dim: raw.joint_attention_dim.unwrap_or(4096),
            caption_projection_dim: raw.caption_projection_dim.unwrap_or(1152),
            pooled_projection_dim: raw.pooled_projection_dim.unwrap_or(2048),
            pos_embed_max_size: raw.pos_embed_max_size.unwrap_or(96),
            qk_norm: raw.qk_norm,
            dual_attention_layers: raw.dual_attention_layers.unwrap_or_default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a `config.json` file ([`from_json`](Self::from_json)); files
    /// over [`MAX_CONFIG_FILE_BYTES`] are refused before they are read.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let text = crate::io::read_text_capped(path.as_ref(), MAX_CONFIG_FILE_BYTES)?;
        Self::from_json(&text)
    }

    /// Checks the rules the engine relies on: non-zero sizes, heads x head_dim equal to
    /// `caption_projection_dim`, `qk_norm` absent or `"rms_norm"`, dual-attention layers
    /// inside the model, and a patch that divides `sample_size`.
    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("sample_size", self.sample_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("caption_projection_dim", self.caption_projection_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("pos_embed_max_size", self.pos_embed_max_size),
        ];
        for (field, v) in nonzero {
            if v == 0 {
                return Err(config_error(field, "must be at least 1"));
            }
            if v > MAX_CONFIG_DIM {
                return Err(config_error(
                    field,
                    format!("{v} exceeds the cap of {MAX_CONFIG_DIM} (not a real model)"),
                ));
            }
        }
        if self.num_layers > MAX_LAYERS {
            return Err(config_error(
                "num_layers",
                format!("{} exceeds the cap of {MAX_LAYERS}", self.num_layers),
            ));
        }
        let d = self
            .num_attention_heads
            .checked_mul(self.attention_head_dim)
            .ok_or_else(|| config_error("num_attention_heads", "heads x head_dim overflows"))?;
        if d != self.caption_projection_dim {
            return Err(config_error(
                "caption_projection_dim",
                format!(
                    "is {} but num_attention_heads x attention_head_dim = {d}",
                    self.caption_projection_dim
                ),
            ));
        }
        if !self.sample_size.is_multiple_of(self.patch_size) {
            return Err(config_error(
                "patch_size",
                format!(
                    "{} does not divide sample_size {}",
                    self.patch_size, self.sample_size
                ),
            ));
        }
        if let Some(q) = &self.qk_norm
            && q != "rms_norm"
        {
            return Err(config_error(
                "qk_norm",
                format!("`{q}` is not supported (only null or \"rms_norm\")"),
            ));
        }
        if let Some(&bad) = self
            .dual_attention_layers
            .iter()
            .find(|&&i| i >= self.num_layers)
        {
            return Err(config_error(
                "dual_attention_layers",
                format!("layer {bad} is outside the {} layers", self.num_layers),
            ));
        }
        Ok(())
    }

    /// Whether the query/key RMS norms are present.
    pub fn has_qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }

    /// Whether block `i` has the MMDiT-X second attention.
    pub fn is_dual(&self, i: usize) -> bool {
        self.dual_attention_layers.contains(&i)
    }

    /// Hidden size D = heads x head_dim.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// SD3.5 Large (38 blocks, D = 2432, RMS qk-norm).
    pub fn sd35_large() -> Self {
        MmditConfig {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            out_channels: 16,
            num_layers: 38,
            attention_head_dim: 64,
            num_attention_heads: 38,
            joint_attention_dim: 4096,
            caption_projection_dim: 2432,
            pooled_projection_dim: 2048,
            pos_embed_max_size: 192,
            qk_norm: Some("rms_norm".into()),
            dual_attention_layers: Vec::new(),
        }
    }

    /// SD3.5 Medium (MMDiT-X: 24 blocks, D = 1536, dual attention in blocks 0-12).
    pub fn sd35_medium() -> Self {
        MmditConfig {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            out_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            pos_embed_max_size: 384,
            qk_norm: Some("rms_norm".into()),
            dual_attention_layers: (0..13).collect(),
        }
    }
}
