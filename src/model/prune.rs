//! Position pruning at run time: which blocks run, and which sub-components of a
//! running block are removed.
//!
//! The rule for a pruned model: the kept blocks run in their original order, each with
//! its own weights and exactly as in the full model. A kept block that was not the
//! original last block therefore still updates the context stream (context modulation,
//! `to_add_out`, `ff_context`); when it ends up last, that context update is computed and
//! then discarded, because the output head reads only the image stream. This is what
//! diffusers does when the last block is deleted from `transformer_blocks`.
//!
//! Removing a sub-component of a block:
//! - `norm1`: the image adaLN modulation becomes a plain LayerNorm (shift = scale = 0,
//!   every gate 1), for MMDiT-X blocks also the modulation of `attn2`'s input;
//! - `norm1_context`: the same for the context stream (the last block's
//!   AdaLayerNormContinuous becomes a plain LayerNorm);
//! - `attn`, `attn2`, `ff`, `ff_context`: that branch is skipped (adds nothing).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{COMPONENT_NAMES, ComponentCut};

/// The removable sub-components of one block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMask {
    /// Image-stream adaLN modulation removed.
    pub norm1: bool,
    /// Context-stream modulation removed.
    pub norm1_context: bool,
    /// Joint attention removed.
    pub attn: bool,
    /// MMDiT-X image-only attention removed.
    pub attn2: bool,
    /// Image feed-forward removed.
    pub ff: bool,
    /// Context feed-forward removed.
    pub ff_context: bool,
}

impl BlockMask {
    /// Whether nothing is removed.
    pub fn is_empty(&self) -> bool {
        *self == BlockMask::default()
    }

    /// The names of the removed sub-components, in [`COMPONENT_NAMES`] order.
    pub fn names(&self) -> Vec<&'static str> {
        let flags = [
            self.norm1,
            self.norm1_context,
            self.attn,
            self.attn2,
            self.ff,
            self.ff_context,
        ];
        COMPONENT_NAMES
            .iter()
            .zip(flags)
            .filter_map(|(&n, f)| f.then_some(n))
            .collect()
    }

    /// Marks the sub-component named as in diffusers (`norm1`, `norm1_context`, `attn`,
    /// `attn2`, `ff`, `ff_context`: [`COMPONENT_NAMES`]) removed.
    pub fn remove(&mut self, component: &str) -> Result<()> {
        let flag = match component {
            "norm1" => &mut self.norm1,
            "norm1_context" => &mut self.norm1_context,
            "attn" => &mut self.attn,
            "attn2" => &mut self.attn2,
            "ff" => &mut self.ff,
            "ff_context" => &mut self.ff_context,
            other => {
                return Err(Error::invalid(
                    "block sub-component",
                    format!("`{other}` is not one of {}", COMPONENT_NAMES.join(", ")),
                ));
            }
        };
        *flag = true;
        Ok(())
    }
}

/// A run-time pruning plan: removed blocks (original indices) and per-block removed
/// sub-components.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneSpec {
    /// Original indices of the removed blocks.
    pub removed_blocks: BTreeSet<usize>,
    /// Removed sub-components of kept blocks, by original index.
    pub masks: BTreeMap<usize, BlockMask>,
}

impl PruneSpec {
    /// No pruning.
    pub fn none() -> Self {
        PruneSpec::default()
    }

    /// A spec that removes the given blocks.
    pub fn remove_blocks(blocks: impl IntoIterator<Item = usize>) -> Self {
        PruneSpec {
            removed_blocks: blocks.into_iter().collect(),
            masks: BTreeMap::new(),
        }
    }

    /// The spec that keeps exactly `kept` out of `num_layers` blocks.
    pub fn keep_only(num_layers: usize, kept: &[usize]) -> Self {
        let kept: BTreeSet<usize> = kept.iter().copied().collect();
        PruneSpec::remove_blocks((0..num_layers).filter(|i| !kept.contains(i)))
    }

    /// The plan a package's manifest records as `kept_blocks` (original indices):
    /// every block when the list is empty (an unpruned package).
    pub fn from_kept_blocks(num_layers: usize, kept: &[u32]) -> Self {
        if kept.is_empty() {
            return PruneSpec::none();
        }
        let kept: Vec<usize> = kept.iter().map(|&i| i as usize).collect();
        PruneSpec::keep_only(num_layers, &kept)
    }

    /// The plan a package's manifest records: `kept_blocks` (see
    /// [`PruneSpec::from_kept_blocks`]) and the sub-components removed from them.
    pub fn from_manifest(num_layers: usize, kept: &[u32], cuts: &[ComponentCut]) -> Result<Self> {
        let mut spec = PruneSpec::from_kept_blocks(num_layers, kept);
        for cut in cuts {
            for c in &cut.components {
                spec.remove_component(cut.block as usize, c)?;
            }
        }
        Ok(spec)
    }

    /// The removed sub-components of the blocks that run, as a manifest records them
    /// (blocks in order, empty masks left out).
    pub fn component_cuts(&self, num_layers: usize) -> Vec<ComponentCut> {
        self.kept_blocks(num_layers)
            .into_iter()
            .filter_map(|b| {
                let names = self.mask(b).names();
                (!names.is_empty()).then(|| ComponentCut {
                    block: b as u32,
                    components: names.into_iter().map(str::to_string).collect(),
                })
            })
            .collect()
    }

    /// Parses a removal list: whole blocks (`3`) and sub-components of blocks
    /// (`12.ff`, `14.attn2`), comma-separated (empty string = none). Errors name the
    /// entry.
    pub fn parse_removals(list: &str) -> Result<PruneSpec> {
        let mut spec = PruneSpec::none();
        for entry in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (block, component) = match entry.split_once('.') {
                Some((b, c)) => (b, Some(c)),
                None => (entry, None),
            };
            let block: usize = block.parse().map_err(|_| {
                Error::invalid(
                    "removal list",
                    format!("`{entry}` is not a block index or BLOCK.COMPONENT (e.g. 12.ff)"),
                )
            })?;
            match component {
                None => {
                    spec.removed_blocks.insert(block);
                }
                Some(c) => spec.remove_component(block, c)?,
            }
        }
        Ok(spec)
    }

    /// Parses a comma-separated block list such as `3,5` (empty string = none).
    pub fn parse_block_list(list: &str) -> Result<BTreeSet<usize>> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<usize>().map_err(|_| {
                    Error::invalid("block list", format!("`{s}` is not a block index"))
                })
            })
            .collect()
    }

    /// Removes `component` of block `block` (see [`BlockMask::remove`]).
    pub fn remove_component(&mut self, block: usize, component: &str) -> Result<()> {
        self.masks.entry(block).or_default().remove(component)
    }

    /// The mask of block `i` (empty when nothing is removed).
    pub fn mask(&self, i: usize) -> BlockMask {
        self.masks.get(&i).copied().unwrap_or_default()
    }

    /// Original indices of the blocks that run, in order.
    pub fn kept_blocks(&self, num_layers: usize) -> Vec<usize> {
        (0..num_layers)
            .filter(|i| !self.removed_blocks.contains(i))
            .collect()
    }

    /// Checks every index against a model of `num_layers` blocks.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        let bad = self
            .removed_blocks
            .iter()
            .chain(self.masks.keys())
            .find(|&&i| i >= num_layers);
        if let Some(i) = bad {
            return Err(Error::invalid(
                "pruned block",
                format!("block {i} is outside the model's {num_layers} blocks"),
            ));
        }
        Ok(())
    }
}
