//! [`VaeConfig`]: the architecture of a diffusers `AutoencoderKL` decoder, read from the
//! `vae/config.json` of a pipeline folder.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::MAX_CONFIG_FILE_BYTES;
use crate::error::{Error, Result};

/// The decoder half of a diffusers `AutoencoderKL` (SD3's 16-channel VAE, or the
/// 4-channel SD 1.x/2.x/XL layout): everything decoding needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels out (3).
    pub out_channels: usize,
    /// Latent channels in (16 for SD3).
    pub latent_channels: usize,
    /// Channels per resolution level, finest first (`[128, 256, 512, 512]` for SD3).
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level; decoder up blocks have one more.
    pub layers_per_block: usize,
    /// GroupNorm groups of every norm.
    pub norm_num_groups: usize,
    /// The pipeline divides latents by this before decoding.
    pub scaling_factor: f64,
    /// Then adds this (SD3: 0.0609; 0 when the config has none).
    pub shift_factor: f64,
    /// A 1 x 1 `post_quant_conv` runs before the decoder (SD 1.x; not SD3).
    pub use_post_quant_conv: bool,
    /// The mid block has its single-head self-attention.
    pub mid_block_add_attention: bool,
}

/// The fields of `config.json` read, with diffusers' defaults for absent ones.
#[derive(Deserialize)]
struct RawVaeConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    out_channels: Option<usize>,
    latent_channels: Option<usize>,
    block_out_channels: Option<Vec<usize>>,
    layers_per_block: Option<usize>,
    norm_num_groups: Option<usize>,
    scaling_factor: Option<f64>,
    shift_factor: Option<f64>,
    use_post_quant_conv: Option<bool>,
    mid_block_add_attention: Option<bool>,
    up_block_types: Option<Vec<String>>,
    act_fn: Option<String>,
}

fn field_error(field: &str, reason: impl Into<String>) -> Error {
    Error::invalid(format!("VAE config field `{field}`"), reason)
}

impl VaeConfig {
    /// Parses a diffusers `AutoencoderKL` `config.json`, absent fields taking
    /// diffusers' defaults, then [`validate`](Self::validate)s it. Up blocks other than
    /// `UpDecoderBlock2D` and activations other than SiLU are refused.
    pub fn from_json(json: &str) -> Result<Self> {
        let raw: RawVaeConfig = serde_json::from_str(json)
            .map_err(|e| Error::invalid("VAE config.json", e.to_string()))?;
        if let Some(class) = raw.class_name.as_deref()
            && class != "AutoencoderKL"
        {
            return Err(field_error(
                "_class_name",
                format!("`{class}` is not `AutoencoderKL`"),
            ));
        }
        if let Some(act) = raw.act_fn.as_deref()
            && act != "silu"
        {
            return Err(field_error("act_fn", format!("`{act}` is not `silu`")));
        }
        let block_out_channels = raw.block_out_channels.unwrap_or_else(|| vec![64]);
        if let Some(types) = &raw.up_block_types {
            if let Some(t) = types.iter().find(|t| *t != "UpDecoderBlock2D") {
                return Err(field_error(
                    "up_block_types",
                    format!("`{t}` is not `UpDecoderBlock2D`"),
                ));
            }
            if types.len() != block_out_channels.len() {
                return Err(field_error(
                    "up_block_types",
                    format!(
                        "{} up blocks for {} levels of block_out_channels",
                        types.len(),
                        block_out_channels.len()
                    ),
                ));
            }
        }
        let config = VaeConfig {
            out_channels: raw.out_channels.unwrap_or(3),
            latent_channels: raw.latent_channels.unwrap_or(4),
            block_out_channels,
            layers_per_block: raw.layers_per_block.unwrap_or(1),
            norm_num_groups: raw.norm_num_groups.unwrap_or(32),
            scaling_factor: raw.scaling_factor.unwrap_or(0.18215),
            shift_factor: raw.shift_factor.unwrap_or(0.0),
            use_post_quant_conv: raw.use_post_quant_conv.unwrap_or(true),
            mid_block_add_attention: raw.mid_block_add_attention.unwrap_or(true),
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a `config.json` file ([`from_json`](Self::from_json)); files
    /// over [`MAX_CONFIG_FILE_BYTES`] are refused before they are read.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let text = crate::io::read_text_capped(path.as_ref(), MAX_CONFIG_FILE_BYTES)?;
        Self::from_json(&text)
    }

    /// The configuration of SD3 / SD3.5's VAE (`stabilityai/stable-diffusion-3.5-*`,
    /// `vae/config.json`).
    pub fn sd3() -> VaeConfig {
        VaeConfig {
            out_channels: 3,
            latent_channels: 16,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 1.5305,
            shift_factor: 0.0609,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
        }
    }

    /// Checks the rules the decoder relies on: non-zero sizes, groups dividing every
    /// level's channels, a finite non-zero scaling factor and a finite shift.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if value == 0 {
                return Err(field_error(field, "must be at least 1"));
            }
        }
        if self.block_out_channels.is_empty() {
            return Err(field_error("block_out_channels", "is empty"));
        }
        if self.block_out_channels.len() > 8 {
            return Err(field_error(
                "block_out_channels",
                format!("{} levels (at most 8)", self.block_out_channels.len()),
            ));
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || !c.is_multiple_of(self.norm_num_groups))
        {
            return Err(field_error(
                "block_out_channels",
                format!(
                    "{c} channels are not a positive multiple of norm_num_groups = {}",
                    self.norm_num_groups
                ),
            ));
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(field_error(
                "scaling_factor",
                format!("{} is not finite and non-zero", self.scaling_factor),
            ));
        }
        if !self.shift_factor.is_finite() {
            return Err(field_error("shift_factor", "is not finite"));
        }
        Ok(())
    }

    /// How many times the decoder doubles the resolution (levels - 1).
    pub fn upsamplings(&self) -> usize {
        self.block_out_channels.len() - 1
    }

    /// Image pixels per latent pixel along each side (`2^upsamplings`: 8 for SD3).
    pub fn scale_factor(&self) -> usize {
        1 << self.upsamplings()
    }
}
