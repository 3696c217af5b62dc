//! The options that say how to read a checkpoint without a config of its own (a
//! single file), shared by every command that opens a model.

use std::path::{Path, PathBuf};

use clap::Args;
use hiprune::Result;
use hiprune::model::{Checkpoint, CheckpointOptions};

/// How to read a single-file checkpoint.
#[derive(Args, Debug, Clone, Default)]
pub struct CheckpointArgs {
    /// For a single-file checkpoint: a diffusers transformer config.json to use instead
    /// of reading the configuration from the tensor shapes.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// For a single-file checkpoint without --config: the attention head width
    /// (heads = hidden size / head width).
    #[arg(long, value_name = "N")]
    pub head_dim: Option<usize>,
}

impl CheckpointArgs {
    /// The library options these flags give.
    pub fn options(&self) -> CheckpointOptions {
        CheckpointOptions {
            config: self.config.clone(),
            head_dim: self.head_dim,
        }
    }

    /// Opens `path` (a diffusers folder, a single file or a package) with these flags.
    pub fn open(&self, path: &Path) -> Result<Checkpoint> {
        Checkpoint::open(path, &self.options())
    }
}
