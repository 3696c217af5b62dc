//! The tensors an MMDiT model needs, with diffusers names and shapes, for a config and
//! a pruning plan (removed blocks and sub-components need no weights): the list
//! the model loads (`model/layers.rs`), recorded instead of uploaded.

use super::layers::{BlockLayers, LayerSink, TopLayers};
use super::prune::PruneSpec;
use crate::config::MmditConfig;
use crate::error::Result;

/// One tensor the model reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Required {
    /// A linear layer `<name>.weight [n, k]` with `<name>.bias [n]`.
    Linear {
        /// Layer name without `.weight`.
        name: String,
        /// Output features.
        n: usize,
        /// Input features.
        k: usize,
    },
    /// A plain tensor read as f32.
    Plain {
        /// Tensor name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
    },
}

/// A [`LayerSink`] that only lists what it is given.
#[derive(Default)]
struct Recorder(Vec<Required>);

impl LayerSink for Recorder {
    type Linear = ();
    type Norm = ();

    fn linear(&mut self, name: String, n: usize, k: usize) -> Result<()> {
        self.0.push(Required::Linear { name, n, k });
        Ok(())
    }

    fn norm(&mut self, name: String, len: usize) -> Result<()> {
        self.0.push(Required::Plain {
            name,
            shape: vec![len],
        });
        Ok(())
    }

    fn patch_conv(&mut self, name: &str, d: usize, c: usize, p: usize) -> Result<()> {
        self.0.push(Required::Plain {
            name: format!("{name}.weight"),
            shape: vec![d, c, p, p],
        });
        self.0.push(Required::Plain {
            name: format!("{name}.bias"),
            shape: vec![d],
        });
        Ok(())
    }

    fn pos_table(&mut self, name: &str, grid: usize, d: usize) -> Result<()> {
        self.0.push(Required::Plain {
            name: name.to_string(),
            shape: vec![1, grid * grid, d],
        });
        Ok(())
    }
}

/// Every tensor the model reads under `spec`, top-level ones first.
pub fn required_tensors(cfg: &MmditConfig, spec: &PruneSpec) -> Vec<Required> {
    let mut rec = Recorder::default();
    // The recorder never fails.
    let _ = TopLayers::load(cfg, &mut rec);
    for i in spec.kept_blocks(cfg.num_layers) {
        let _ = BlockLayers::load(cfg, i, spec.mask(i), &mut rec);
    }
    rec.0
}

/// The tensors block `i` reads under `spec`.
pub fn block_tensors(cfg: &MmditConfig, i: usize, spec: &PruneSpec) -> Vec<Required> {
    let mut rec = Recorder::default();
    let _ = BlockLayers::load(cfg, i, spec.mask(i), &mut rec);
    rec.0
}
