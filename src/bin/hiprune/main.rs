//! The `hiprune` command-line tool.

mod bench;
#[cfg(feature = "compress")]
mod compress;
mod decode;
#[cfg(feature = "compress")]
mod demo;
mod forward;
mod inspect;
mod report;
mod sample;
mod source;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Position-pruned, 4-bit MMDiT diffusion transformers for edge GPUs and CPUs.
#[derive(Parser)]
#[command(name = "hiprune", version, about, long_about = None)]
struct Cli {
    /// Log more (-v info, -vv debug); `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a .hpk package holds: architecture, kept blocks, per-layer precision,
    /// sizes and the reduction against the dense f16 equivalent.
    Inspect {
        /// A package, a single-file checkpoint or a diffusers transformer folder.
        package: PathBuf,
        #[command(flatten)]
        checkpoint: source::CheckpointArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also verify every tensor's checksum.
        #[arg(long)]
        verify: bool,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// The toolchain end to end on a small seeded model: generate, analyze, plan,
    /// compress to INT4, then sample with the original and the package.
    #[cfg(feature = "compress")]
    Demo(demo::DemoArgs),
    #[cfg(feature = "compress")]
    /// Compress a diffusers transformer folder into a pruned, 4-bit .hpk package.
    Compress(compress::CompressArgs),
    #[cfg(feature = "compress")]
    /// Write a diffusers-layout checkpoint with seeded random weights of real shapes.
    Generate(compress::GenerateArgs),
    #[cfg(feature = "compress")]
    /// Measure per-block and per-sub-component sensitivity; write a JSON report.
    Analyze(compress::AnalyzeArgs),
    /// Run one transformer forward pass on inputs from a safetensors file.
    Forward(forward::ForwardArgs),
    /// Sample a latent with the flow-matching Euler loop.
    Sample(sample::SampleArgs),
    /// Decode latents (what `sample` writes) to PNG through a VAE.
    Decode(decode::DecodeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    let result = match cli.command {
        Command::Inspect {
            package,
            checkpoint,
            json,
            verify,
        } => inspect::run(&package, &checkpoint, json, verify),
        Command::Bench { what } => bench::run(what),
        #[cfg(feature = "compress")]
        Command::Demo(args) => demo::run(&args),
        #[cfg(feature = "compress")]
        Command::Compress(args) => compress::run_compress(&args),
        #[cfg(feature = "compress")]
        Command::Generate(args) => compress::run_generate(&args),
        #[cfg(feature = "compress")]
        Command::Analyze(args) => compress::run_analyze(&args),
        Command::Forward(args) => forward::run(&args),
        Command::Sample(args) => sample::run(&args),
        Command::Decode(args) => decode::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", in_flags(err));
            ExitCode::FAILURE
        }
    }
}

/// The library names the option fields it rejects (`protect_until`); the CLI says
/// which flag set them.
const FLAG_OF_FIELD: &[(&str, &str)] = &[
    ("group", "--group"),
    ("position_weight", "--position-weight"),
    ("protect_until", "--protect-until"),
    ("target_blocks", "--target-blocks"),
    ("target_ratio", "--target-ratio"),
    ("remove_components", "--remove"),
    ("removal list", "--remove"),
];

/// `err` with an option field replaced by the flag that sets it.
fn in_flags(err: hiprune::Error) -> hiprune::Error {
    match err {
        hiprune::Error::InvalidArgument { what, reason } => {
            let what = FLAG_OF_FIELD
                .iter()
                .find(|(field, _)| *field == what)
                .map_or(what, |(_, flag)| flag.to_string());
            hiprune::Error::InvalidArgument { what, reason }
        }
        other => other,
    }
}
