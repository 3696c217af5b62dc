//! [`Mmdit`]: the forward pass of diffusers' `SD3Transformer2DModel` on the CPU, f32
//! activations, for any batch size, running only the blocks a [`PruneSpec`] keeps
//! (see [`crate::model::prune`] for the pruning rule).
//!
//! The forward: patch embedding (the patch convolution as a linear layer over
//! `[C, p, p]` patches) plus the centre-cropped positional table; timestep embedding
//! (256 sinusoidal channels `[cos | sin]` of `t` as given, Linear-SiLU-Linear) plus the
//! pooled-text MLP; the context embedder; the kept joint blocks; the final
//! AdaLayerNormContinuous (scale, then shift); `proj_out`; unpatchify.
//!
//! Operations are called on the CPU backend directly
//! ([`crate::backend::cpu::ops`], [`crate::backend::cpu::attention`],
//! [`crate::backend::cpu::linear()`]).

use std::collections::HashMap;
use std::path::Path;

use crate::backend::cpu::ops;
use crate::backend::cpu::{DenseData, LinearWeights, linear};
use crate::error::{Error, Result};
use crate::format::Package;
use crate::model::config::MmditConfig;
use crate::model::layout::{Required, required_tensors};
use crate::model::prune::PruneSpec;
use crate::model::tensor::Tensor;
use crate::model::weights::Weights;

/// LayerNorm and RMS-norm epsilon of every norm in the model.
pub const NORM_EPS: f32 = 1e-6;
/// Sinusoidal channels of the timestep embedding.
pub const TIMESTEP_CHANNELS: usize = 256;

/// The inputs of one forward pass (all f32).
#[derive(Debug, Clone, Copy)]
pub struct MmditInputs<'a> {
    /// Latents `[B, in_channels, H, W]`.
    pub hidden_states: &'a Tensor,
    /// Prompt embeddings `[B, T, joint_attention_dim]`.
    pub encoder_hidden_states: &'a Tensor,
    /// Pooled prompt embeddings `[B, pooled_projection_dim]`.
    pub pooled_projections: &'a Tensor,
    /// Timesteps `[B]` (sigma x 1000 for the flow-matching scheduler).
    pub timestep: &'a Tensor,
}

/// Sizes of one forward pass, derived from validated inputs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub batch: usize,
    /// Latent height and width.
    pub h: usize,
    pub w: usize,
    /// Image tokens per item.
    pub n_img: usize,
    /// Context tokens per item.
    pub n_ctx: usize,
}

/// An MMDiT transformer ready to run.
pub struct Mmdit {
    pub(crate) config: MmditConfig,
    pub(crate) weights: Weights,
    pub(crate) spec: PruneSpec,
    /// f32 copies of the biases, the patch convolution, the positional table and the
    /// qk-norm weights.
    pub(crate) small: HashMap<String, Vec<f32>>,
}

impl std::fmt::Debug for Mmdit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mmdit")
            .field("config", &self.config)
            .field("weights", &self.weights)
            .field("spec", &self.spec)
            .finish()
    }
}

impl Mmdit {
    /// Builds the model after checking that every tensor `spec` needs is present with
    /// the shape the config implies.
    pub fn new(config: MmditConfig, weights: Weights, spec: PruneSpec) -> Result<Mmdit> {
        config.validate()?;
        let mut model = Mmdit {
            config,
            weights,
            spec: PruneSpec::none(),
            small: HashMap::new(),
        };
        model.set_prune(spec)?;
        Ok(model)
    }

    /// Loads a diffusers transformer folder (`config.json` + safetensors) or an `.hpk`
    /// package (its `kept_blocks` become the pruning plan).
    pub fn load(path: impl AsRef<Path>) -> Result<Mmdit> {
        let path = path.as_ref();
        if path.is_dir() {
            let config = MmditConfig::from_file(path.join("config.json"))?;
            let weights = Weights::from_folder(path)?;
            Mmdit::new(config, weights, PruneSpec::none())
        } else {
            let package = Package::open(path)?;
            let config = package.manifest().architecture.clone().ok_or_else(|| {
                Error::invalid(
                    format!("package {}", path.display()),
                    "holds no model architecture",
                )
            })?;
            let kept: Vec<usize> = package
                .manifest()
                .kept_blocks
                .iter()
                .map(|&i| i as usize)
                .collect();
            let spec = if kept.is_empty() {
                PruneSpec::none()
            } else {
                PruneSpec::keep_only(config.num_layers, &kept)
            };
            Mmdit::new(config, Weights::from_package(package), spec)
        }
    }

    /// Replaces the pruning plan, checking the weights it needs.
    pub fn set_prune(&mut self, spec: PruneSpec) -> Result<()> {
        spec.validate(self.config.num_layers)?;
        let mut small = HashMap::new();
        for req in required_tensors(&self.config, &spec) {
            match req {
                Required::Linear { name, n, k } => {
                    self.weights.linear(&name, n, k)?;
                    let bias = format!("{name}.bias");
                    let data = self.weights.f32_tensor(&bias, &[n])?;
                    small.insert(bias, data);
                }
                Required::Plain { name, shape } => {
                    let data = self.weights.f32_tensor(&name, &shape)?;
                    small.insert(name, data);
                }
            }
        }
        self.small = small;
        self.spec = spec;
        Ok(())
    }

    /// The architecture.
    pub fn config(&self) -> &MmditConfig {
        &self.config
    }

    /// The pruning plan in force.
    pub fn prune_spec(&self) -> &PruneSpec {
        &self.spec
    }

    /// The weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// A cached f32 tensor (checked present by `set_prune`).
    pub(crate) fn small(&self, name: &str) -> Result<&[f32]> {
        self.small
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_string(),
            })
    }

    /// `x [m, k] -> [m, n]` through the linear layer `name` with its bias.
    pub(crate) fn lin(
        &self,
        name: &str,
        x: &[f32],
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<Vec<f32>> {
        let w = self.weights.linear(name, n, k)?;
        let bias = self.small(&format!("{name}.bias"))?;
        let mut y = vec![0.0f32; m * n];
        linear(x, m, &w, Some(bias), &mut y)?;
        Ok(y)
    }

    /// Runs the transformer: the velocity prediction `[B, out_channels, H, W]`.
    pub fn forward(&self, inputs: &MmditInputs<'_>) -> Result<Tensor> {
        let dims = self.check_inputs(inputs)?;
        let d = self.config.hidden_size();
        let Dims {
            batch,
            n_img,
            n_ctx,
            ..
        } = dims;

        let mut x = self.embed_patches(inputs.hidden_states, &dims)?;
        let temb = self.embed_conditioning(inputs.timestep, inputs.pooled_projections, batch)?;
        let mut silu_temb = temb;
        ops::silu(&mut silu_temb);
        let mut c = self.lin(
            "context_embedder",
            &inputs.encoder_hidden_states.data,
            batch * n_ctx,
            d,
            self.config.joint_attention_dim,
        )?;

        let kept = self.spec.kept_blocks(self.config.num_layers);
        for (pos, &i) in kept.iter().enumerate() {
            let last_kept = pos + 1 == kept.len();
            self.block(i, last_kept, &mut x, &mut c, &silu_temb, &dims)?;
        }

        // Final AdaLayerNormContinuous: chunk 0 is the scale, chunk 1 the shift.
        let m = self.lin("norm_out.linear", &silu_temb, batch, 2 * d, d)?;
        let mut nx = vec![0.0f32; x.len()];
        ops::layer_norm(&x, d, NORM_EPS, &mut nx)?;
        ops::modulate(
            &mut nx,
            d,
            n_img,
            &chunk(&m, batch, 2, 1, d),
            &chunk(&m, batch, 2, 0, d),
        )?;
        let p = self.config.patch_size;
        let cout = self.config.out_channels;
        let y = self.lin("proj_out", &nx, batch * n_img, p * p * cout, d)?;
        Ok(self.unpatchify(&y, &dims))
    }

    /// Patches `[B*N, C*p*p]` in (c, py, px) order, through the patch convolution, plus
    /// the centre crop of the positional table.
    pub(crate) fn embed_patches(&self, hs: &Tensor, dims: &Dims) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let (p, cin, d) = (cfg.patch_size, cfg.in_channels, cfg.hidden_size());
        let (gh, gw) = (dims.h / p, dims.w / p);
        let kk = cin * p * p;
        let mut patches = vec![0.0f32; dims.batch * dims.n_img * kk];
        for b in 0..dims.batch {
            for gy in 0..gh {
                for gx in 0..gw {
                    let row = &mut patches[((b * gh + gy) * gw + gx) * kk..][..kk];
                    for ch in 0..cin {
                        for py in 0..p {
                            let src = ((b * cin + ch) * dims.h + gy * p + py) * dims.w + gx * p;
                            row[(ch * p + py) * p..][..p].copy_from_slice(&hs.data[src..src + p]);
                        }
                    }
                }
            }
        }
        let conv = self.small("pos_embed.proj.weight")?;
        let w = LinearWeights::dense(DenseData::F32(conv), d, kk)?;
        let mut x = vec![0.0f32; dims.batch * dims.n_img * d];
        linear(
            &patches,
            dims.batch * dims.n_img,
            &w,
            Some(self.small("pos_embed.proj.bias")?),
            &mut x,
        )?;
        let table = self.small("pos_embed.pos_embed")?;
        let msize = cfg.pos_embed_max_size;
        let (top, left) = ((msize - gh) / 2, (msize - gw) / 2);
        for b in 0..dims.batch {
            for gy in 0..gh {
                for gx in 0..gw {
                    let t = &table[((top + gy) * msize + left + gx) * d..][..d];
                    let r = &mut x[((b * gh + gy) * gw + gx) * d..][..d];
                    ops::add_assign(r, t)?;
                }
            }
        }
        Ok(x)
    }

    /// `temb [B, D]` = timestep MLP of the sinusoidal embedding + pooled-text MLP.
    pub(crate) fn embed_conditioning(
        &self,
        t: &Tensor,
        pooled: &Tensor,
        batch: usize,
    ) -> Result<Vec<f32>> {
        let d = self.config.hidden_size();
        let sin = timestep_embedding(&t.data, TIMESTEP_CHANNELS);
        let mut h = self.lin(
            "time_text_embed.timestep_embedder.linear_1",
            &sin,
            batch,
            d,
            TIMESTEP_CHANNELS,
        )?;
        ops::silu(&mut h);
        let mut temb = self.lin(
            "time_text_embed.timestep_embedder.linear_2",
            &h,
            batch,
            d,
            d,
        )?;
        let pd = self.config.pooled_projection_dim;
        let mut g = self.lin(
            "time_text_embed.text_embedder.linear_1",
            &pooled.data,
            batch,
            d,
            pd,
        )?;
        ops::silu(&mut g);
        let g = self.lin("time_text_embed.text_embedder.linear_2", &g, batch, d, d)?;
        ops::add_assign(&mut temb, &g)?;
        Ok(temb)
    }

    /// `[B*N, p*p*C]` tokens back to `[B, C, H, W]`.
    fn unpatchify(&self, y: &[f32], dims: &Dims) -> Tensor {
        let p = self.config.patch_size;
        let cout = self.config.out_channels;
        let (gh, gw) = (dims.h / p, dims.w / p);
        let mut out = Tensor::zeros(vec![dims.batch, cout, dims.h, dims.w]);
        for b in 0..dims.batch {
            for gy in 0..gh {
                for gx in 0..gw {
                    let tok = &y[((b * gh + gy) * gw + gx) * p * p * cout..][..p * p * cout];
                    for py in 0..p {
                        for px in 0..p {
                            for ch in 0..cout {
                                let dst =
                                    ((b * cout + ch) * dims.h + gy * p + py) * dims.w + gx * p + px;
                                out.data[dst] = tok[(py * p + px) * cout + ch];
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// Chunk `j` of `nch` of a modulation `[batch, nch * d]`, as `[batch, d]`.
pub(crate) fn chunk(m: &[f32], batch: usize, nch: usize, j: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(batch * d);
    for b in 0..batch {
        out.extend_from_slice(&m[(b * nch + j) * d..][..d]);
    }
    out
}

/// diffusers' `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`: for
/// frequency `f_i = exp(-ln(10000) i / (channels/2))` the row is
/// `[cos(t f_i) | sin(t f_i)]`, computed in f32 as PyTorch does.
pub fn timestep_embedding(t: &[f32], channels: usize) -> Vec<f32> {
    let half = channels / 2;
    let ln = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((ln * i as f32 / half as f32) as f64).exp() as f32)
        .collect();
    let mut out = vec![0.0f32; t.len() * channels];
    for (row, &tv) in out.chunks_mut(channels).zip(t) {
        for (i, &f) in freqs.iter().enumerate() {
            let arg = (tv * f) as f64;
            row[i] = arg.cos() as f32;
            row[half + i] = arg.sin() as f32;
        }
    }
    out
}
