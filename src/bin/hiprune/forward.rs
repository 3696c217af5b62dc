//! `hiprune forward`: one transformer forward pass on inputs from a safetensors file.

use std::path::{Path, PathBuf};

use crate::source::CheckpointArgs;
use clap::{Args, ValueEnum};
use hiprune::Result;
use hiprune::backend::Device;
use hiprune::model::{AnyModel, MmditInputs, PruneSpec, TensorFile, write_tensors};

/// Where the model runs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackendChoice {
    /// f32 on the CPU.
    Cpu,
    /// f16 on a CUDA GPU (builds with the `cuda` feature).
    Cuda,
}

/// The device a `--backend` choice names.
pub fn device_of(backend: BackendChoice) -> Device {
    match backend {
        BackendChoice::Cpu => Device::Cpu,
        BackendChoice::Cuda => Device::Cuda(0),
    }
}

/// Model options shared by `forward` and `sample`.
#[derive(Args)]
pub struct ModelArgs {
    /// A diffusers transformer folder (config.json + safetensors), a single-file
    /// checkpoint, or an .hpk package.
    pub model: PathBuf,
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendChoice,
    /// Original indices of blocks to skip, comma-separated (e.g. `3,5`).
    #[arg(long, default_value = "")]
    pub remove_blocks: String,
}

impl ModelArgs {
    /// The device `--backend` names.
    pub fn device(&self) -> Device {
        device_of(self.backend)
    }

    /// Loads the model on [`ModelArgs::device`] with the extra removed blocks. A build
    /// without the `cuda` feature refuses `--backend cuda` with a message saying how to
    /// rebuild.
    pub fn load(&self) -> Result<AnyModel> {
        let extra = PruneSpec::parse_block_list(&self.remove_blocks)?;
        let mut model =
            AnyModel::from_checkpoint(self.checkpoint.open(&self.model)?, self.device())?;
        if !extra.is_empty() {
            let mut spec = model.prune_spec().clone();
            spec.removed_blocks.extend(extra);
            model.set_prune(spec)?;
        }
        Ok(model)
    }
}

/// Options of `hiprune forward`.
#[derive(Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// safetensors file with `hidden_states` [B,C,H,W], `encoder_hidden_states` [B,T,J],
    /// `pooled_projections` [B,P] and `timestep` [B].
    #[arg(long)]
    inputs: PathBuf,
    /// Output safetensors file; receives `output` [B,C,H,W] (f32).
    #[arg(long)]
    output: PathBuf,
}

/// Runs `hiprune forward`.
pub fn run(args: &ForwardArgs) -> Result<()> {
    let model = args.model.load()?;
    let inputs = TensorFile::open(&args.inputs)?;
    let out = model.forward(&MmditInputs {
        hidden_states: inputs.get("hidden_states")?,
        encoder_hidden_states: inputs.get("encoder_hidden_states")?,
        pooled_projections: inputs.get("pooled_projections")?,
        timestep: inputs.get("timestep")?,
    })?;
    write_tensors(&args.output, &[("output", &out)])?;
    report_written(&args.output);
    Ok(())
}

/// Logs where the result went.
pub fn report_written(path: &Path) {
    log::info!("wrote {}", path.display());
}
