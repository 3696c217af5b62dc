//! [`WeightBytes`]: the one count of the bytes of the weights a model holds, by
//! storage, for `inspect`, `hp_model_get_info` and `bench model` alike.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::MmditConfig;
use crate::error::Result;
use crate::model::layout::{Required, required_tensors};
use crate::model::prune::PruneSpec;
use crate::model::weights::{POS_TABLE, Weights};
use crate::quant::{DenseData, LinearWeights, Q4Kind};

/// Bytes of the weights a model runs, by storage, as the model holds them: linear
/// weights in their stored precision (zero-copy on the CPU), their biases and the
/// other small tensors (patch convolution, qk-norm weights) as the f32 copies the
/// model keeps, the positional table as stored (nothing when it is computed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WeightBytes {
    /// Dense f32 linear weights.
    pub f32: u64,
    /// Dense f16 linear weights.
    pub f16: u64,
    /// Dense bf16 linear weights.
    pub bf16: u64,
    /// INT4 linear weights (codes, scales and offsets).
    pub int4: u64,
    /// NF4 linear weights (codes and absmax).
    pub nf4: u64,
    /// Biases, the other small tensors and the positional table.
    pub other: u64,
    /// Linear layers per storage (`f32`, `f16`, `bf16`, `int4 g64`, `nf4 g64`, ...).
    pub layers: BTreeMap<String, usize>,
}

impl WeightBytes {
    /// Counts the weights of the model `cfg` under `spec` as `weights` stores them.
    pub fn count(weights: &Weights, cfg: &MmditConfig, spec: &PruneSpec) -> Result<WeightBytes> {
        let mut out = WeightBytes::default();
        for req in required_tensors(cfg, spec) {
            match req {
                Required::Linear { name, n, k } => {
                    // The f32 bias, held with the layer.
                    out.other += 4 * n as u64;
                    let count = (n * k) as u64;
                    let storage = match weights.linear(&name, n, k)? {
                        LinearWeights::Dense { data, .. } => match data {
                            DenseData::F32(_) => {
                                out.f32 += 4 * count;
                                "f32".to_string()
                            }
                            DenseData::F16(_) => {
                                out.f16 += 2 * count;
                                "f16".to_string()
                            }
                            DenseData::Bf16(_) => {
                                out.bf16 += 2 * count;
                                "bf16".to_string()
                            }
                        },
                        LinearWeights::Q4(q) => {
                            let bytes = q.nbytes() as u64;
                            match q.kind() {
                                Q4Kind::Int4 | Q4Kind::Int4Sym => out.int4 += bytes,
                                Q4Kind::Nf4 => out.nf4 += bytes,
                            }
                            format!("{} g{}", q.kind(), q.group())
                        }
                    };
                    *out.layers.entry(storage).or_insert(0) += 1;
                }
                Required::Plain { name, .. } if name == POS_TABLE => {
                    let table =
                        weights.pos_table(POS_TABLE, cfg.pos_embed_max_size, cfg.hidden_size())?;
                    out.other += table.held_bytes();
                }
                Required::Plain { shape, .. } => {
                    out.other += 4 * shape.iter().product::<usize>() as u64;
                }
            }
        }
        Ok(out)
    }

    /// Bytes of the linear weights (everything but [`WeightBytes::other`]).
    pub fn linear(&self) -> u64 {
        self.f32 + self.f16 + self.bf16 + self.int4 + self.nf4
    }

    /// All bytes.
    pub fn total(&self) -> u64 {
        self.linear() + self.other
    }
}
