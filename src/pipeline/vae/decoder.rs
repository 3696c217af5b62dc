//! The decoder network of diffusers' `AutoencoderKL` on a [`Backend`]: the layers,
//! resolved once from checkpoint names at load, and the forward of one latent tile.

use std::sync::Arc;

use super::config::VaeConfig;
use crate::backend::{Backend, GroupNorm, ImageShape, LinearSource};
use crate::error::{Error, Result};
use crate::model::Weights;

/// Epsilon of every GroupNorm of the decoder (diffusers' `resnet_eps`).
const NORM_EPS: f32 = 1e-6;

/// A GroupNorm's per-channel affine parameters, uploaded as `[1, channels]`.
struct Norm<B: Backend> {
    weight: B::Tensor,
    bias: B::Tensor,
    groups: usize,
}

impl<B: Backend> Norm<B> {
    fn params(&self) -> GroupNorm<'_, B::Tensor> {
        GroupNorm {
            groups: self.groups,
            weight: &self.weight,
            bias: &self.bias,
            eps: NORM_EPS,
        }
    }
}

/// A square convolution (weights and bias) and its kernel size.
struct Conv<B: Backend> {
    layer: B::Linear,
    kernel: usize,
}

/// diffusers' `ResnetBlock2D` without a time embedding.
struct Resnet<B: Backend> {
    norm1: Norm<B>,
    conv1: Conv<B>,
    norm2: Norm<B>,
    conv2: Conv<B>,
    /// The 1 x 1 `conv_shortcut` when the block changes the channel count.
    shortcut: Option<B::Linear>,
}

/// The mid block's single-head self-attention over all pixels, with its GroupNorm
/// and residual connection.
struct MidAttention<B: Backend> {
    norm: Norm<B>,
    to_q: B::Linear,
    to_k: B::Linear,
    to_v: B::Linear,
    to_out: B::Linear,
}

/// One `UpDecoderBlock2D`: resnets, then (all but the last level) nearest 2x
/// upsampling and a 3 x 3 convolution.
struct UpBlock<B: Backend> {
    resnets: Vec<Resnet<B>>,
    upsample: Option<Conv<B>>,
}

/// The decoder's layers on a backend.
pub(super) struct Decoder<B: Backend> {
    backend: B,
    post_quant_conv: Option<B::Linear>,
    conv_in: Conv<B>,
    mid_resnets: [Resnet<B>; 2],
    mid_attention: Option<MidAttention<B>>,
    up_blocks: Vec<UpBlock<B>>,
    norm_out: Norm<B>,
    conv_out: Conv<B>,
}

/// Uploads layers of one checkpoint, checking every tensor's shape first.
struct Loader<'a, B: Backend> {
    backend: &'a B,
    weights: &'a Weights,
    source: Arc<dyn LinearSource>,
    groups: usize,
}

impl<B: Backend> Loader<'_, B> {
    fn bias(&self, layer: &str, n: usize) -> Result<Vec<f32>> {
        self.weights.f32_tensor(&format!("{layer}.bias"), &[n])
    }

    fn conv(&self, layer: &str, out: usize, input: usize, kernel: usize) -> Result<Conv<B>> {
        let name = format!("{layer}.weight");
        let expected = vec![out, input, kernel, kernel];
        let found = self.weights.shape(&name)?;
        // A 4-bit layer is stored as its [out, in * k * k] matrix.
        if found != expected && found != [out, input * kernel * kernel] {
            return Err(Error::ShapeMismatch {
                tensor: name,
                expected,
                found,
            });
        }
        let bias = self.bias(layer, out)?;
        let k = input * kernel * kernel;
        let layer = self
            .backend
            .upload_linear(&self.source, layer, out, k, Some(&bias))?;
        Ok(Conv { layer, kernel })
    }

    fn linear(&self, layer: &str, n: usize, k: usize) -> Result<B::Linear> {
        let bias = self.bias(layer, n)?;
        self.backend
            .upload_linear(&self.source, layer, n, k, Some(&bias))
    }

    fn norm(&self, layer: &str, channels: usize) -> Result<Norm<B>> {
        let weight = self
            .weights
            .f32_tensor(&format!("{layer}.weight"), &[channels])?;
        let bias = self.bias(layer, channels)?;
        Ok(Norm {
            weight: self.backend.upload(&weight, 1, channels)?,
            bias: self.backend.upload(&bias, 1, channels)?,
            groups: self.groups,
        })
    }

    fn resnet(&self, prefix: &str, input: usize, out: usize) -> Result<Resnet<B>> {
        Ok(Resnet {
            norm1: self.norm(&format!("{prefix}.norm1"), input)?,
            conv1: self.conv(&format!("{prefix}.conv1"), out, input, 3)?,
            norm2: self.norm(&format!("{prefix}.norm2"), out)?,
            conv2: self.conv(&format!("{prefix}.conv2"), out, out, 3)?,
            shortcut: if input == out {
                None
            } else {
                let conv = self.conv(&format!("{prefix}.conv_shortcut"), out, input, 1)?;
                Some(conv.layer)
            },
        })
    }

    fn attention(&self, prefix: &str, channels: usize) -> Result<MidAttention<B>> {
        let linear = |name: &str| self.linear(&format!("{prefix}.{name}"), channels, channels);
        Ok(MidAttention {
            norm: self.norm(&format!("{prefix}.group_norm"), channels)?,
            to_q: linear("to_q")?,
            to_k: linear("to_k")?,
            to_v: linear("to_v")?,
            to_out: linear("to_out.0")?,
        })
    }
}

impl<B: Backend> Decoder<B> {
    /// Resolves and uploads every layer the config implies (diffusers names:
    /// `decoder.*`, `post_quant_conv.*`).
    pub(super) fn load(config: &VaeConfig, weights: &Arc<Weights>, backend: B) -> Result<Self> {
        let source: Arc<dyn LinearSource> = Arc::clone(weights) as Arc<dyn LinearSource>;
        let loader = Loader {
            backend: &backend,
            weights,
            source,
            groups: config.norm_num_groups,
        };
        let channels = &config.block_out_channels;
        let deepest = channels[channels.len() - 1];
        let post_quant_conv = if config.use_post_quant_conv {
            let c = config.latent_channels;
            Some(loader.conv("post_quant_conv", c, c, 1)?.layer)
        } else {
            None
        };
        let conv_in = loader.conv("decoder.conv_in", deepest, config.latent_channels, 3)?;
        let mid_resnets = [
            loader.resnet("decoder.mid_block.resnets.0", deepest, deepest)?,
            loader.resnet("decoder.mid_block.resnets.1", deepest, deepest)?,
        ];
        let mid_attention = if config.mid_block_add_attention {
            Some(loader.attention("decoder.mid_block.attentions.0", deepest)?)
        } else {
            None
        };
        let mut up_blocks = Vec::with_capacity(channels.len());
        let mut input = deepest;
        for (i, &out) in channels.iter().rev().enumerate() {
            let prefix = format!("decoder.up_blocks.{i}");
            let mut resnets = Vec::with_capacity(config.layers_per_block + 1);
            for j in 0..=config.layers_per_block {
                let from = if j == 0 { input } else { out };
                resnets.push(loader.resnet(&format!("{prefix}.resnets.{j}"), from, out)?);
            }
            let upsample = if i + 1 < channels.len() {
                Some(loader.conv(&format!("{prefix}.upsamplers.0.conv"), out, out, 3)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            input = out;
        }
        let finest = channels[0];
        let norm_out = loader.norm("decoder.conv_norm_out", finest)?;
        let conv_out = loader.conv("decoder.conv_out", config.out_channels, finest, 3)?;
        Ok(Decoder {
            backend,
            post_quant_conv,
            conv_in,
            mid_resnets,
            mid_attention,
            up_blocks,
            norm_out,
            conv_out,
        })
    }

    fn conv(&self, x: &B::Tensor, conv: &Conv<B>, image: ImageShape) -> Result<B::Tensor> {
        self.backend.conv2d(x, &conv.layer, image, conv.kernel)
    }

    fn resnet(&self, x: &B::Tensor, block: &Resnet<B>, image: ImageShape) -> Result<B::Tensor> {
        let b = &self.backend;
        let h = b.group_norm(x, image.batch, block.norm1.params(), true)?;
        let h = self.conv(&h, &block.conv1, image)?;
        let h = b.group_norm(&h, image.batch, block.norm2.params(), true)?;
        let mut h = self.conv(&h, &block.conv2, image)?;
        match &block.shortcut {
            Some(shortcut) => b.add_assign(&mut h, &b.linear(x, shortcut)?)?,
            None => b.add_assign(&mut h, x)?,
        }
        Ok(h)
    }

    fn attention(
        &self,
        x: &B::Tensor,
        block: &MidAttention<B>,
        image: ImageShape,
    ) -> Result<B::Tensor> {
        let b = &self.backend;
        let h = b.group_norm(x, image.batch, block.norm.params(), false)?;
        let q = b.linear(&h, &block.to_q)?;
        let k = b.linear(&h, &block.to_k)?;
        let v = b.linear(&h, &block.to_v)?;
        let a = b.attention(&q, &k, &v, image.batch, 1)?;
        let mut out = b.linear(&a, &block.to_out)?;
        b.add_assign(&mut out, x)?;
        Ok(out)
    }

    /// Decodes one channels-last latent `[batch * height * width, latent_channels]`
    /// (already unscaled: `latents / scaling_factor + shift_factor`) into the
    /// channels-last image `[batch * H * W, out_channels]` and its shape.
    pub(super) fn forward(
        &self,
        latent: &[f32],
        mut image: ImageShape,
        latent_channels: usize,
    ) -> Result<(Vec<f32>, ImageShape)> {
        let b = &self.backend;
        let mut x = b.upload(latent, image.pixels()?, latent_channels)?;
        if let Some(pqc) = &self.post_quant_conv {
            x = b.linear(&x, pqc)?;
        }
        x = self.conv(&x, &self.conv_in, image)?;
        x = self.resnet(&x, &self.mid_resnets[0], image)?;
        if let Some(attention) = &self.mid_attention {
            x = self.attention(&x, attention, image)?;
        }
        x = self.resnet(&x, &self.mid_resnets[1], image)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = self.resnet(&x, resnet, image)?;
            }
            if let Some(conv) = &block.upsample {
                x = b.upsample_nearest2x(&x, image)?;
                image = image.upsampled2x()?;
                x = self.conv(&x, conv, image)?;
            }
        }
        x = b.group_norm(&x, image.batch, self.norm_out.params(), true)?;
        x = self.conv(&x, &self.conv_out, image)?;
        Ok((b.download(&x)?, image))
    }
}
