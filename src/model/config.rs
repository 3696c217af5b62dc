//! [`MmditConfig`]: the architecture hyper-parameters of an MMDiT transformer, with the
//! field names of a diffusers `config.json` for `SD3Transformer2DModel`.

use serde::{Deserialize, Serialize};

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

impl MmditConfig {
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
