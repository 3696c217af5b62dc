//! [`Mmdit`]: the forward pass of diffusers' `SD3Transformer2DModel`, written once
//! against the [`Backend`] trait (the CPU backend by default), for any batch size,
//! running only the blocks a [`PruneSpec`] keeps (see [`crate::model::prune`] for the
//! pruning rule).
//!
//! The forward: patch embedding (the patch convolution as a linear layer over
//! `[C, p, p]` patches) plus the centre-cropped positional table; timestep embedding
//! (256 sinusoidal channels `[cos | sin]` of `t` as given, Linear-SiLU-Linear) plus the
//! pooled-text MLP; the context embedder; the kept joint blocks; the final
//! AdaLayerNormContinuous (scale, then shift); `proj_out`; unpatchify.
//!
//! The patch embedding, the sinusoidal embedding and unpatchify run on the host (once
//! per forward, see [`crate::backend`]); everything else runs on the backend, with the
//! linear layers uploaded once when the pruning plan is set.

use std::path::Path;
use std::sync::Arc;

use crate::backend::{Backend, CpuBackend, Device, LinearSource, Modulation};
use crate::config::MmditConfig;
use crate::error::Result;
use crate::model::checkpoint::{Checkpoint, CheckpointOptions};
pub use crate::model::layers::TIMESTEP_CHANNELS;
use crate::model::layers::{BlockLayers, LayerSink, TopLayers};
use crate::model::memory::WeightBytes;
use crate::model::prune::PruneSpec;
use crate::model::tensor::Tensor;
use crate::model::weights::{POS_TABLE, Weights};

/// LayerNorm and RMS-norm epsilon of every norm in the model.
pub const NORM_EPS: f32 = 1e-6;

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

/// A kept block's layers on the backend `B`.
pub(crate) type Block<B> = BlockLayers<<B as Backend>::Linear, <B as Backend>::Tensor>;

/// An MMDiT transformer ready to run on the backend `B` (the CPU by default).
pub struct Mmdit<B: Backend = CpuBackend> {
    pub(crate) config: MmditConfig,
    pub(crate) weights: Arc<Weights>,
    pub(crate) spec: PruneSpec,
    backend: B,
    /// The embeddings and the output head on the backend. The positional table is not
    /// copied: each forward reads the crop it needs from [`Weights::pos_table`].
    top: TopLayers<B::Linear>,
    /// The kept blocks in execution order, with the layers their masks keep.
    blocks: Vec<Arc<Block<B>>>,
}

/// The [`LayerSink`] of a model load: reads each tensor from the weights and uploads
/// it to the backend.
struct Upload<'a, B: Backend> {
    backend: &'a B,
    weights: &'a Arc<Weights>,
    source: Arc<dyn LinearSource>,
}

impl<'a, B: Backend> Upload<'a, B> {
    fn new(backend: &'a B, weights: &'a Arc<Weights>) -> Self {
        let source: Arc<dyn LinearSource> = weights.clone();
        Upload {
            backend,
            weights,
            source,
        }
    }
}

impl<B: Backend> LayerSink for Upload<'_, B> {
    type Linear = B::Linear;
    type Norm = B::Tensor;

    fn linear(&mut self, name: String, n: usize, k: usize) -> Result<B::Linear> {
        let bias = self.weights.f32_tensor(&format!("{name}.bias"), &[n])?;
        self.backend
            .upload_linear(&self.source, &name, n, k, Some(&bias))
    }

    fn norm(&mut self, name: String, len: usize) -> Result<B::Tensor> {
        let data = self.weights.f32_tensor(&name, &[len])?;
        self.backend.upload(&data, 1, len)
    }

    fn patch_conv(&mut self, name: &str, d: usize, c: usize, p: usize) -> Result<B::Linear> {
        let w = self
            .weights
            .f32_tensor(&format!("{name}.weight"), &[d, c, p, p])?;
        let bias = self.weights.f32_tensor(&format!("{name}.bias"), &[d])?;
        self.backend.upload_dense(&w, d, c * p * p, Some(&bias))
    }

    fn pos_table(&mut self, name: &str, grid: usize, d: usize) -> Result<()> {
        // Checked here (shape, dtype, a computed table's parameters); held as it is
        // stored, never copied whole.
        self.weights.pos_table(name, grid, d).map(|_| ())
    }
}

impl<B: Backend> std::fmt::Debug for Mmdit<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mmdit")
            .field("config", &self.config)
            .field("weights", &self.weights)
            .field("spec", &self.spec)
            .field("backend", &self.backend)
            .finish()
    }
}

/// The two token streams and the conditioning of a forward pass on the backend, after
/// the embeddings and before the blocks.
pub(crate) struct Streams<T> {
    /// Image tokens `[B*N, D]`.
    pub x: T,
    /// Context tokens `[B*T, D]`.
    pub c: T,
    /// `SiLU(temb)` `[B, D]`, the input of every modulation.
    pub silu_temb: T,
}

impl Mmdit<CpuBackend> {
    /// Builds the model on the CPU after checking that every tensor `spec` needs is
    /// present with the shape the config implies.
    pub fn new(config: MmditConfig, weights: Weights, spec: PruneSpec) -> Result<Mmdit> {
        Mmdit::with_backend(CpuBackend::new(), config, weights, spec)
    }

    /// Loads a diffusers transformer folder (`config.json` + safetensors) or an `.hpk`
    /// package (its `kept_blocks` become the pruning plan) onto the CPU.
    pub fn load(path: impl AsRef<Path>) -> Result<Mmdit> {
        Mmdit::load_with(path, CpuBackend::new())
    }
}

impl<B: Backend> Mmdit<B> {
    /// Builds the model on `backend` after checking that every tensor `spec` needs is
    /// present with the shape the config implies, and uploads the weights `spec`
    /// needs.
    pub fn with_backend(
        backend: B,
        config: MmditConfig,
        weights: Weights,
        spec: PruneSpec,
    ) -> Result<Mmdit<B>> {
        Mmdit::with_shared_weights(backend, config, Arc::new(weights), spec)
    }

    /// [`Mmdit::with_backend`] on weights another model may share (one memory map
    /// serves the CPU model and a device upload).
    pub fn with_shared_weights(
        backend: B,
        config: MmditConfig,
        weights: Arc<Weights>,
        spec: PruneSpec,
    ) -> Result<Mmdit<B>> {
        config.validate()?;
        let top = TopLayers::load(&config, &mut Upload::new(&backend, &weights))?;
        let mut model = Mmdit {
            config,
            weights,
            spec: PruneSpec::none(),
            backend,
            top,
            blocks: Vec::new(),
        };
        model.set_prune(spec)?;
        Ok(model)
    }

    /// [`Mmdit::load_with`] on the backend `B` opened on `device`: `Mmdit::<CpuBackend>`
    /// on [`Device::Cpu`], `Mmdit::<CudaBackend>` on [`Device::Cuda`] (feature `cuda`;
    /// `crate::backend::cuda::CudaBackend`). Asking a backend for a device it does not
    /// run on is an error; for the CPU model a CUDA device gives
    /// [`crate::Error::BackendNotCompiled`] in a build without the `cuda` feature.
    pub fn load_on(path: impl AsRef<Path>, device: Device) -> Result<Mmdit<B>> {
        Mmdit::load_with(path, B::open(device)?)
    }

    /// Loads a diffusers transformer folder (`config.json` + safetensors), a
    /// single-file checkpoint (configuration read from its shapes) or an `.hpk`
    /// package onto `backend`; blocks the checkpoint lacks, or the package removed, are
    /// the pruning plan ([`Checkpoint::open`]).
    pub fn load_with(path: impl AsRef<Path>, backend: B) -> Result<Mmdit<B>> {
        let checkpoint = Checkpoint::open(path, &CheckpointOptions::default())?;
        Mmdit::from_checkpoint(backend, checkpoint)
    }

    /// Builds the model of an opened checkpoint on `backend`, with the checkpoint's
    /// pruning plan.
    pub fn from_checkpoint(backend: B, checkpoint: Checkpoint) -> Result<Mmdit<B>> {
        Mmdit::with_backend(
            backend,
            checkpoint.config,
            checkpoint.weights,
            checkpoint.spec,
        )
    }

    /// Replaces the pruning plan, checking the weights it needs and uploading the
    /// blocks not uploaded yet (a block the old plan already ran with the same mask is
    /// kept, not uploaded again). On error the model is left unchanged.
    pub fn set_prune(&mut self, spec: PruneSpec) -> Result<()> {
        spec.validate(self.config.num_layers)?;
        let mut sink = Upload::new(&self.backend, &self.weights);
        let mut blocks = Vec::new();
        for i in spec.kept_blocks(self.config.num_layers) {
            let mask = spec.mask(i);
            let old = self.blocks.iter().find(|b| b.index == i && b.mask == mask);
            blocks.push(match old {
                Some(b) => Arc::clone(b),
                None => Arc::new(BlockLayers::load(&self.config, i, mask, &mut sink)?),
            });
        }
        self.blocks = blocks;
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

    /// The weights, shareable with another model (see [`Mmdit::with_shared_weights`]).
    pub fn shared_weights(&self) -> &Arc<Weights> {
        &self.weights
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The kept blocks in execution order.
    #[cfg(feature = "compress")]
    pub(crate) fn blocks(&self) -> &[Arc<Block<B>>] {
        &self.blocks
    }

    /// Bytes of the weights the model runs, by storage (see [`WeightBytes`]).
    pub fn weight_bytes(&self) -> Result<WeightBytes> {
        WeightBytes::count(&self.weights, &self.config, &self.spec)
    }

    /// Runs the transformer: the velocity prediction `[B, out_channels, H, W]`.
    pub fn forward(&self, inputs: &MmditInputs<'_>) -> Result<Tensor> {
        let dims = self.check_inputs(inputs)?;
        let Streams {
            mut x,
            mut c,
            silu_temb,
        } = self.embed(inputs, &dims)?;

        for (pos, block) in self.blocks.iter().enumerate() {
            let last_kept = pos + 1 == self.blocks.len();
            self.block(block, last_kept, &mut x, &mut c, &silu_temb, &dims)?;
        }

        let be = &self.backend;
        let m = be.linear(&silu_temb, &self.top.norm_out)?;
        let (shift, scale) = continuous_chunks(be, &m)?;
        let modulation = Modulation {
            shift: &shift,
            scale: &scale,
        };
        let nx = be.layer_norm_modulate(&x, Some(modulation), NORM_EPS)?;
        let y = be.linear(&nx, &self.top.proj_out)?;
        Ok(self.unpatchify(&be.download(&y)?, &dims))
    }

    /// The embeddings of a checked forward pass, on the backend: image tokens (patch
    /// embedding), context tokens (context embedder) and `SiLU(temb)`.
    pub(crate) fn embed(
        &self,
        inputs: &MmditInputs<'_>,
        dims: &Dims,
    ) -> Result<Streams<B::Tensor>> {
        let be = &self.backend;
        let x = self.embed_patches(inputs.hidden_states, dims)?;
        let mut silu_temb =
            self.embed_conditioning(inputs.timestep, inputs.pooled_projections, dims.batch)?;
        be.silu(&mut silu_temb)?;
        let ehs = be.upload(
            &inputs.encoder_hidden_states.data,
            dims.batch * dims.n_ctx,
            self.config.joint_attention_dim,
        )?;
        let c = be.linear(&ehs, &self.top.context_embedder)?;
        Ok(Streams { x, c, silu_temb })
    }

    /// Patches `[B*N, C*p*p]` in (c, py, px) order (cut on the host), through the patch
    /// convolution, plus the centre crop of the positional table, on the backend.
    pub(crate) fn embed_patches(&self, hs: &Tensor, dims: &Dims) -> Result<B::Tensor> {
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
        let be = &self.backend;
        let rows = dims.batch * dims.n_img;
        let mut x = be.linear(&be.upload(&patches, rows, kk)?, &self.top.patch_conv)?;
        let crop = self.pos_crop(gh, gw)?.repeat(dims.batch);
        be.add_assign(&mut x, &be.upload(&crop, rows, d)?)?;
        Ok(x)
    }

    /// The centre `gh x gw` crop of the positional table as f32 `[gh * gw, D]`, read
    /// from the table as held (converted from its stored dtype, or computed).
    pub(crate) fn pos_crop(&self, gh: usize, gw: usize) -> Result<Vec<f32>> {
        let msize = self.config.pos_embed_max_size;
        let table = self
            .weights
            .pos_table(POS_TABLE, msize, self.config.hidden_size())?;
        let (top, left) = (msize.saturating_sub(gh) / 2, msize.saturating_sub(gw) / 2);
        table.crop(top, left, gh, gw)
    }

    /// `temb [B, D]` = timestep MLP of the sinusoidal embedding + pooled-text MLP.
    pub(crate) fn embed_conditioning(
        &self,
        t: &Tensor,
        pooled: &Tensor,
        batch: usize,
    ) -> Result<B::Tensor> {
        let be = &self.backend;
        let sin = timestep_embedding(&t.data, TIMESTEP_CHANNELS);
        let sin = be.upload(&sin, batch, TIMESTEP_CHANNELS)?;
        let [t1, t2] = &self.top.timestep;
        let mut h = be.linear(&sin, t1)?;
        be.silu(&mut h)?;
        let mut temb = be.linear(&h, t2)?;
        let pooled = be.upload(&pooled.data, batch, self.config.pooled_projection_dim)?;
        let [p1, p2] = &self.top.text;
        let mut g = be.linear(&pooled, p1)?;
        be.silu(&mut g)?;
        let g = be.linear(&g, p2)?;
        be.add_assign(&mut temb, &g)?;
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

/// The (shift, scale) of an AdaLayerNormContinuous modulation `m [batch, 2D]`, which
/// stores the scale first (the final layer, and a `context_pre_only` block's context
/// modulation).
pub(crate) fn continuous_chunks<B: Backend>(
    be: &B,
    m: &B::Tensor,
) -> Result<(B::Tensor, B::Tensor)> {
    Ok((be.column_chunk(m, 2, 1)?, be.column_chunk(m, 2, 0)?))
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
