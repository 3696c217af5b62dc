//! `hiprune sample`: the flow-matching Euler loop from a seeded or given latent.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use hiprune::model::TensorFile;
use hiprune::model::sampler::{Conditioning, SampleOptions, initial_latent};
use hiprune::model::write_tensors;
use hiprune::{Error, Result};

use crate::forward::{ModelArgs, report_written};

/// Options of `hiprune sample`.
#[derive(Args)]
pub struct SampleArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// safetensors file with `encoder_hidden_states` [1,T,J], `pooled_projections` [1,P]
    /// and, with --guidance > 1, `negative_encoder_hidden_states` and
    /// `negative_pooled_projections`.
    #[arg(long)]
    inputs: PathBuf,
    /// Denoising steps.
    #[arg(long)]
    steps: usize,
    /// Schedule shift.
    #[arg(long, default_value_t = 3.0)]
    shift: f64,
    /// Classifier-free guidance scale (runs uncond + cond as a batch of 2 when > 1).
    #[arg(long)]
    guidance: Option<f32>,
    /// File holding the start latent as tensor `latent` [B,C,H,W] (instead of --seed).
    #[arg(long)]
    init_latent: Option<PathBuf>,
    /// Seed of the start latent (rand's StdRng, not torch's generator).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Latent height (default: the model's sample_size).
    #[arg(long)]
    height: Option<usize>,
    /// Latent width (default: the model's sample_size).
    #[arg(long)]
    width: Option<usize>,
    /// Output safetensors file; receives `latent` (f32).
    #[arg(long)]
    output: PathBuf,
}

/// Runs `hiprune sample`.
pub fn run(args: &SampleArgs) -> Result<()> {
    let model = args.model.load()?;
    let inputs = TensorFile::open(&args.inputs)?;
    let ehs = inputs.get("encoder_hidden_states")?;
    let guided = args.guidance.is_some_and(|g| g > 1.0);
    let cond = Conditioning {
        encoder_hidden_states: ehs,
        pooled_projections: inputs.get("pooled_projections")?,
        negative_encoder_hidden_states: if guided {
            Some(inputs.get("negative_encoder_hidden_states")?)
        } else {
            None
        },
        negative_pooled_projections: if guided {
            Some(inputs.get("negative_pooled_projections")?)
        } else {
            None
        },
    };
    let latent = match &args.init_latent {
        Some(path) => {
            if args.height.is_some() || args.width.is_some() {
                return Err(Error::invalid(
                    "--height/--width",
                    "the latent size comes from --init-latent; do not give both",
                ));
            }
            TensorFile::open(path)?.take("latent")?
        }
        None => {
            let cfg = model.config();
            let batch = ehs.shape.first().copied().unwrap_or(1);
            let h = args.height.unwrap_or(cfg.sample_size);
            let w = args.width.unwrap_or(cfg.sample_size);
            initial_latent(vec![batch, cfg.in_channels, h, w], args.seed)?
        }
    };
    let opts = SampleOptions {
        steps: args.steps,
        shift: args.shift,
        guidance: args.guidance,
    };
    let start = Instant::now();
    let out = model.sample(latent, &cond, &opts, |i, n, sigma| {
        eprintln!(
            "step {}/{} sigma {sigma:.6} ({:.2} s)",
            i + 1,
            n,
            start.elapsed().as_secs_f64()
        );
    })?;
    eprintln!("done in {:.2} s", start.elapsed().as_secs_f64());
    write_tensors(&args.output, &[("latent", &out)])?;
    report_written(&args.output);
    Ok(())
}
