//! [`AnyModel`]: one model type whose device is chosen at run time, for callers that
//! pick the device from a flag or a C enum (the CLI, the C ABI) rather than at compile
//! time. It wraps [`Mmdit`] on the CPU backend and, with the `cuda` feature, on the
//! CUDA backend; every method forwards to the one the device holds.

use std::path::Path;
use std::sync::Arc;

#[cfg(feature = "cuda")]
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, CpuBackend, Device};
use crate::config::MmditConfig;
#[cfg(not(feature = "cuda"))]
use crate::error::Error;
use crate::error::Result;
use crate::model::checkpoint::Checkpoint;
use crate::model::memory::WeightBytes;
use crate::model::mmdit::{Mmdit, MmditInputs};
use crate::model::prune::PruneSpec;
use crate::model::sampler::{Conditioning, SampleOptions, sample, sample_cancellable};
use crate::model::tensor::Tensor;
use crate::model::weights::Weights;

/// An MMDiT model on the device chosen at run time.
pub enum AnyModel {
    /// On the CPU backend (boxed, like every variant: a model's top layers are held
    /// inline).
    Cpu(Box<Mmdit<CpuBackend>>),
    /// On the CUDA backend.
    #[cfg(feature = "cuda")]
    Cuda(Box<Mmdit<CudaBackend>>),
}

/// Runs `$body` with `$m` bound to the [`Mmdit`] inside `$model`, whatever its backend.
macro_rules! on_model {
    ($model:expr, $m:ident => $body:expr) => {
        match $model {
            AnyModel::Cpu($m) => $body,
            #[cfg(feature = "cuda")]
            AnyModel::Cuda($m) => $body,
        }
    };
}

impl std::fmt::Debug for AnyModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        on_model!(self, m => m.fmt(f))
    }
}

impl AnyModel {
    /// Loads a diffusers transformer folder, a single-file checkpoint or an `.hpk`
    /// package onto `device`. An
    /// error if the device cannot be used: [`crate::Error::BackendNotCompiled`] for
    /// CUDA in a build without the `cuda` feature, [`crate::Error::NoCudaDevice`] when
    /// the driver or the device is missing.
    pub fn load_on(path: impl AsRef<Path>, device: Device) -> Result<AnyModel> {
        match device {
            Device::Cpu => Ok(AnyModel::Cpu(Box::new(Mmdit::load(path)?))),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(AnyModel::Cuda(Box::new(Mmdit::load_on(path, device)?))),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(not_compiled(device)),
        }
    }

    /// Builds the model of an opened checkpoint (with its pruning plan) on `device`;
    /// the errors of [`AnyModel::load_on`] for a device that cannot be used.
    pub fn from_checkpoint(checkpoint: Checkpoint, device: Device) -> Result<AnyModel> {
        AnyModel::build(
            checkpoint.config,
            Arc::new(checkpoint.weights),
            checkpoint.spec,
            device,
        )
    }

    /// Builds a model on `device` from weights another model may share (the memory map
    /// is not read again, and a CPU model borrows it without copying). The errors of
    /// [`AnyModel::load_on`] for a device that cannot be used;
    /// [`crate::Error::is_device_unavailable`] tells them apart from a broken model.
    pub fn build(
        config: MmditConfig,
        weights: Arc<Weights>,
        spec: PruneSpec,
        device: Device,
    ) -> Result<AnyModel> {
        match device {
            Device::Cpu => Ok(AnyModel::Cpu(Box::new(Mmdit::with_shared_weights(
                CpuBackend::new(),
                config,
                weights,
                spec,
            )?))),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(AnyModel::Cuda(Box::new(Mmdit::with_shared_weights(
                CudaBackend::open(device)?,
                config,
                weights,
                spec,
            )?))),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(not_compiled(device)),
        }
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        on_model!(self, m => m.backend().device())
    }

    /// The architecture.
    pub fn config(&self) -> &MmditConfig {
        on_model!(self, m => m.config())
    }

    /// The pruning plan in force.
    pub fn prune_spec(&self) -> &PruneSpec {
        on_model!(self, m => m.prune_spec())
    }

    /// The host weights (shared by every model built from them).
    pub fn weights(&self) -> &Arc<Weights> {
        on_model!(self, m => m.shared_weights())
    }

    /// Bytes of the weights the model runs, by storage.
    pub fn weight_bytes(&self) -> Result<WeightBytes> {
        on_model!(self, m => m.weight_bytes())
    }

    /// Replaces the pruning plan (see [`Mmdit::set_prune`]).
    pub fn set_prune(&mut self, spec: PruneSpec) -> Result<()> {
        on_model!(self, m => m.set_prune(spec))
    }

    /// One forward pass (see [`Mmdit::forward`]).
    pub fn forward(&self, inputs: &MmditInputs<'_>) -> Result<Tensor> {
        on_model!(self, m => m.forward(inputs))
    }

    /// The sampling loop (see [`sample`]); `progress(step, steps, sigma)` is called
    /// before each step.
    pub fn sample(
        &self,
        latent: Tensor,
        cond: &Conditioning<'_>,
        opts: &SampleOptions,
        progress: impl FnMut(usize, usize, f32),
    ) -> Result<Tensor> {
        on_model!(self, m => sample(m, latent, cond, opts, progress))
    }

    /// The sampling loop (see [`sample_cancellable`]): `Ok(None)` when `progress`
    /// asked to stop.
    pub fn sample_cancellable(
        &self,
        latent: Tensor,
        cond: &Conditioning<'_>,
        opts: &SampleOptions,
        progress: impl FnMut(usize, usize, f32) -> bool,
    ) -> Result<Option<Tensor>> {
        on_model!(self, m => sample_cancellable(m, latent, cond, opts, progress))
    }
}

/// The error for a CUDA device in a build without the CUDA backend.
#[cfg(not(feature = "cuda"))]
fn not_compiled(device: Device) -> Error {
    Error::BackendNotCompiled {
        device: device.to_string(),
    }
}
