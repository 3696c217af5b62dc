//! `hiprune bench`: the kernel benchmark ([`kernels`]: the 4-bit linear kernels
//! against the dense baseline on every linear shape of an SD3.5 model family, measured
//! in one run) and the whole-model benchmark ([`model`]), with the device and memory
//! probes ([`probe`]) and the reports they print ([`report`]).

use clap::Subcommand;
use hiprune::Result;

mod kernels;
#[cfg(feature = "compress")]
mod model;
mod probe;
mod report;

#[cfg(feature = "compress")]
use model::{ModelArgs, ModelRunArgs};

/// What to benchmark.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Linear-layer kernels: INT4/NF4/f16 weights against the dense baseline (f32 on
    /// the CPU, cuBLAS f16 on CUDA) at each shape and M.
    Kernels(kernels::KernelArgs),
    #[cfg(feature = "compress")]
    /// A whole model: per-step latency, sampling time and memory, dense and compressed
    /// side by side.
    Model(ModelArgs),
    /// Measures one model in this process and prints JSON (used by `bench model`,
    /// which runs each model in a child process so its peak RSS is its own).
    #[cfg(feature = "compress")]
    #[command(hide = true)]
    ModelRun(ModelRunArgs),
}

/// Runs a bench subcommand.
pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Kernels(args) => kernels::run(&args),
        #[cfg(feature = "compress")]
        BenchCommand::Model(args) => model::run(&args),
        #[cfg(feature = "compress")]
        BenchCommand::ModelRun(args) => model::run_child(&args),
    }
}
