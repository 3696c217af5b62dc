//! The VAE decoder of SD3 / SD3.5 (diffusers' `AutoencoderKL`): latents in, images
//! out, on any [`Backend`], whole or in blended tiles.

mod config;
mod decoder;
mod tiles;

use std::path::Path;
use std::sync::Arc;

pub use config::VaeConfig;
use decoder::Decoder;
pub use tiles::Tiling;
use tiles::{HostImage, decode_tiled};

use crate::backend::{Backend, Device, ImageShape};
use crate::error::{Error, Result};
use crate::model::{Tensor, Weights};

/// A VAE decoder with its layers uploaded to backend `B`.
pub struct VaeDecoder<B: Backend> {
    config: VaeConfig,
    decoder: Decoder<B>,
    weights: Arc<Weights>,
}

impl<B: Backend> std::fmt::Debug for VaeDecoder<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaeDecoder")
            .field("config", &self.config)
            .field("weights", &self.weights)
            .finish()
    }
}

impl<B: Backend> VaeDecoder<B> {
    /// Opens a diffusers VAE folder (`config.json` and `diffusion_pytorch_model.safetensors`,
    /// memory-mapped; the `vae/` folder of a pipeline) on `device`. Every tensor the
    /// config implies is checked (name, shape, dtype) before anything runs.
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::invalid(
                "VAE folder",
                format!("{} has no config.json", dir.display()),
            ));
        }
        let config = VaeConfig::from_file(&config_path)?;
        let weights = Arc::new(Weights::from_folder(dir)?);
        Self::from_weights(config, weights, B::open(device)?)
    }

    /// A decoder of `config` on `weights` (diffusers names: `decoder.*`, and
    /// `post_quant_conv.*` when the config has one), uploaded to `backend`.
    pub fn from_weights(config: VaeConfig, weights: Arc<Weights>, backend: B) -> Result<Self> {
        config.validate()?;
        let decoder = Decoder::load(&config, &weights, backend)?;
        Ok(VaeDecoder {
            config,
            decoder,
            weights,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes pipeline-space latents `[B, C, h, w]` (what the sampler returns) into
    /// images `[B, out_channels, h * s, w * s]` (`s` = [`VaeConfig::scale_factor`]),
    /// values nominally in `[-1, 1]`, exactly as diffusers' pipelines do:
    /// `vae.decode(latents / scaling_factor + shift_factor)`. With `tiling`, a latent
    /// larger than one tile is decoded tile by tile (`tiled_decode`), so memory is
    /// bounded by the tile; `None` decodes it whole.
    pub fn decode(&self, latents: &Tensor, tiling: Option<Tiling>) -> Result<Tensor> {
        let [batch, channels, height, width] = latents.shape[..] else {
            return Err(Error::invalid(
                "latents",
                format!("shape {:?} is not [B, C, H, W]", latents.shape),
            ));
        };
        if channels != self.config.latent_channels {
            return Err(Error::ShapeMismatch {
                tensor: "latents".to_string(),
                expected: vec![batch, self.config.latent_channels, height, width],
                found: latents.shape.clone(),
            });
        }
        if batch == 0 || height == 0 || width == 0 {
            return Err(Error::invalid(
                "latents",
                format!("shape {:?} is empty", latents.shape),
            ));
        }
        let (scaling, shift) = (
            self.config.scaling_factor as f32,
            self.config.shift_factor as f32,
        );
        let mut latent = to_channels_last(latents);
        for v in &mut latent.data {
            *v = *v / scaling + shift;
        }
        let decode_tile = |tile: &HostImage| -> Result<HostImage> {
            let shape = ImageShape {
                batch: tile.batch,
                height: tile.height,
                width: tile.width,
            };
            let (data, image) = self.decoder.forward(&tile.data, shape, tile.channels)?;
            Ok(HostImage {
                data,
                batch: image.batch,
                height: image.height,
                width: image.width,
                channels: self.config.out_channels,
            })
        };
        let image = match tiling {
            Some(t) if height > t.latent_tile || width > t.latent_tile => {
                decode_tiled(&latent, t, self.config.scale_factor(), decode_tile)?
            }
            _ => decode_tile(&latent)?,
        };
        Ok(to_channels_first(&image))
    }
}

/// `[B, C, H, W]` to a channels-last host image.
fn to_channels_last(t: &Tensor) -> HostImage {
    let [batch, channels, height, width] = t.shape[..] else {
        unreachable!("checked by the caller")
    };
    let mut data = vec![0.0f32; t.data.len()];
    let plane = height * width;
    for b in 0..batch {
        for c in 0..channels {
            let src = &t.data[(b * channels + c) * plane..][..plane];
            for (p, &v) in src.iter().enumerate() {
                data[(b * plane + p) * channels + c] = v;
            }
        }
    }
    HostImage {
        data,
        batch,
        height,
        width,
        channels,
    }
}

/// A channels-last host image to `[B, C, H, W]`.
fn to_channels_first(image: &HostImage) -> Tensor {
    let HostImage {
        batch,
        height,
        width,
        channels,
        ..
    } = *image;
    let plane = height * width;
    let mut data = vec![0.0f32; image.data.len()];
    for b in 0..batch {
        for p in 0..plane {
            for c in 0..channels {
                data[(b * channels + c) * plane + p] = image.data[(b * plane + p) * channels + c];
            }
        }
    }
    Tensor {
        data,
        shape: vec![batch, channels, height, width],
    }
}

/// A VAE decoder on the device chosen at run time (the CPU, or CUDA in a build with the
/// `cuda` feature), for callers that pick the device from a flag.
#[derive(Debug)]
pub enum AnyVaeDecoder {
    /// On the CPU backend.
    Cpu(Box<VaeDecoder<crate::backend::CpuBackend>>),
    /// On the CUDA backend.
    #[cfg(feature = "cuda")]
    Cuda(Box<VaeDecoder<crate::backend::cuda::CudaBackend>>),
}

impl AnyVaeDecoder {
    /// [`VaeDecoder::load`] on `device`; [`Error::BackendNotCompiled`] for CUDA in a
    /// build without the `cuda` feature.
    pub fn load(dir: impl AsRef<Path>, device: Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(AnyVaeDecoder::Cpu(Box::new(VaeDecoder::load(dir, device)?))),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(AnyVaeDecoder::Cuda(Box::new(VaeDecoder::load(
                dir, device,
            )?))),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(n) => Err(Error::BackendNotCompiled {
                device: format!("cuda:{n}"),
            }),
        }
    }

    /// [`VaeDecoder::config`].
    pub fn config(&self) -> &VaeConfig {
        match self {
            AnyVaeDecoder::Cpu(v) => v.config(),
            #[cfg(feature = "cuda")]
            AnyVaeDecoder::Cuda(v) => v.config(),
        }
    }

    /// [`VaeDecoder::decode`].
    pub fn decode(&self, latents: &Tensor, tiling: Option<Tiling>) -> Result<Tensor> {
        match self {
            AnyVaeDecoder::Cpu(v) => v.decode(latents, tiling),
            #[cfg(feature = "cuda")]
            AnyVaeDecoder::Cuda(v) => v.decode(latents, tiling),
        }
    }
}
