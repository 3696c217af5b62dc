//! The MMDiT model (diffusers' `SD3Transformer2DModel`): configuration, weights,
//! run-time pruning, the forward pass and the flow-matching sampler.

pub mod any;
mod block;
pub mod checkpoint;
mod inputs;
mod layers;
pub mod layout;
pub mod memory;
pub mod mmdit;
pub mod pos_embed;
pub mod prune;
pub mod sampler;
pub mod tensor;
pub mod weights;

pub use crate::config::MmditConfig;
pub use any::AnyModel;
pub use checkpoint::{Checkpoint, CheckpointKind, CheckpointOptions};
pub use memory::WeightBytes;
pub use mmdit::{Mmdit, MmditInputs};
pub use prune::{BlockMask, PruneSpec};
pub use sampler::{SampleOptions, flow_match_schedule, sample, sample_cancellable};
pub use tensor::{Tensor, TensorFile, write_tensors};
pub use weights::{MemoryTensor, Weights};
