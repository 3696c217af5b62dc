//! [`AnyModel`]: one model type whose device is chosen at run time, for callers that
//! pick the device from a flag or a C enum (the CLI, the C ABI) rather than at compile
//! time. It wraps [`Mmdit`] on the CPU backend and, with the `cuda` feature, on the
//! CUDA backend; every method forwards to the one the device holds.

use std::path::Path;
use std::sync::Arc;

#[cfg(feature = "cuda")]
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, CpuBackend, Device};
use crate::error::{Error, Result};
use crate::model::config::MmditConfig;
use crate::model::memory::WeightBytes;
use crate::model::mmdit::{Mmdit, MmditInputs};
use crate::model::prune::PruneSpec;
use crate::model::sampler::{Conditioning, SampleOptions, sample, sample_cancellable};
use crate::model::tensor::Tensor;
use crate::model::weights::Weights;

/// A device request that may leave the choice to hiprune.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when this build has CUDA and the device is usable, else the CPU.
    #[default]
    Auto,
    /// Exactly this device; an error if it cannot be used.
    Exactly(Device),
}

/// An MMDiT model on the device chosen at run time.
pub enum AnyModel {
    /// On the CPU backend.
    Cpu(Mmdit<CpuBackend>),
    /// On the CUDA backend.
    #[cfg(feature = "cuda")]
    Cuda(Mmdit<CudaBackend>),
}

impl std::fmt::Debug for AnyModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnyModel::Cpu(m) => m.fmt(f),
            #[cfg(feature = "cuda")]
            AnyModel::Cuda(m) => m.fmt(f),
        }
    }
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

/// What [`AnyModel::build`] chose, and why it fell back to the CPU if it did.
#[derive(Debug)]
pub struct Built {
    /// The model.
    pub model: AnyModel,
    /// Why `Auto` did not run on CUDA (`None` when it did, or when the device was
    /// given exactly).
    pub fallback: Option<String>,
}

impl AnyModel {
    /// Loads a diffusers transformer folder or an `.hpk` package onto `device`. An
    /// error if the device cannot be used: [`Error::BackendNotCompiled`] for CUDA in a
    /// build without the `cuda` feature, [`Error::NoCudaDevice`] when the driver or the
    /// device is missing.
    pub fn load_on(path: impl AsRef<Path>, device: Device) -> Result<AnyModel> {
        device.ensure_compiled()?;
        match device {
            Device::Cpu => Ok(AnyModel::Cpu(Mmdit::load(path)?)),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(AnyModel::Cuda(Mmdit::load_on(path, device)?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => unreachable_backend(device),
        }
    }

    /// Builds a model from weights another model may share (the memory map is not
    /// read again) on the device `choice` names; `Auto` falls back to the CPU when CUDA
    /// is not compiled in or not usable, and says why in [`Built::fallback`].
    pub fn build(
        config: MmditConfig,
        weights: Arc<Weights>,
        spec: PruneSpec,
        choice: DeviceChoice,
    ) -> Result<Built> {
        let cpu = |config, weights, spec| -> Result<AnyModel> {
            Ok(AnyModel::Cpu(Mmdit::with_shared_weights(
                CpuBackend::new(),
                config,
                weights,
                spec,
            )?))
        };
        match choice {
            DeviceChoice::Exactly(Device::Cpu) => Ok(Built {
                model: cpu(config, weights, spec)?,
                fallback: None,
            }),
            DeviceChoice::Exactly(device) => Ok(Built {
                model: Self::on_cuda(device, config, weights, spec)?,
                fallback: None,
            }),
            DeviceChoice::Auto => {
                let device = Device::Cuda(0);
                let reason = match device.ensure_compiled() {
                    Err(e) => e.to_string(),
                    Ok(()) => {
                        match Self::on_cuda(device, config.clone(), weights.clone(), spec.clone()) {
                            Ok(model) => {
                                return Ok(Built {
                                    model,
                                    fallback: None,
                                });
                            }
                            // Only an unusable device falls back; a broken model stays an
                            // error.
                            Err(e @ Error::NoCudaDevice { .. }) => e.to_string(),
                            Err(e) => return Err(e),
                        }
                    }
                };
                log::info!("automatic device: the CPU ({reason})");
                Ok(Built {
                    model: cpu(config, weights, spec)?,
                    fallback: Some(reason),
                })
            }
        }
    }

    /// The model on CUDA device `device`.
    fn on_cuda(
        device: Device,
        config: MmditConfig,
        weights: Arc<Weights>,
        spec: PruneSpec,
    ) -> Result<AnyModel> {
        device.ensure_compiled()?;
        #[cfg(feature = "cuda")]
        {
            let backend = CudaBackend::open(device)?;
            Ok(AnyModel::Cuda(Mmdit::with_shared_weights(
                backend, config, weights, spec,
            )?))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (config, weights, spec);
            unreachable_backend(device)
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

/// A CUDA device in a build without the CUDA backend: [`Device::ensure_compiled`]
/// refuses it before this is reached, so this only turns that into an error again.
#[cfg(not(feature = "cuda"))]
fn unreachable_backend<T>(device: Device) -> Result<T> {
    Err(Error::BackendNotCompiled {
        device: device.to_string(),
    })
}
