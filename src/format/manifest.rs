//! The package manifest: what the package holds and how it was made.
//!
//! Encoded with postcard (compact, not self-describing). `format_version` is the first
//! field, so a reader can decode it alone and refuse newer versions with a clear error
//! before trying to decode the rest.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

use crate::config::MmditConfig;
use crate::quant::Q4Kind;

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dtype {
    /// Unsigned byte (packed 4-bit codes, the manifest).
    U8,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision.
    F32,
}

impl Dtype {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// The safetensors spelling (`U8`, `F16`, `BF16`, `F32`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U8 => "U8",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
            Dtype::F32 => "F32",
        }
    }

    /// Parses the safetensors spelling; `None` for dtypes a package never stores.
    pub fn from_name(name: &str) -> Option<Dtype> {
        match name {
            "U8" => Some(Dtype::U8),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::Bf16),
            "F32" => Some(Dtype::F32),
            _ => None,
        }
    }

    /// Whether the dtype is a floating-point type (allowed for biases).
    pub fn is_float(self) -> bool {
        !matches!(self, Dtype::U8)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a linear layer's weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Precision {
    /// Dense f32 `<name>.weight`.
    F32,
    /// Dense f16 `<name>.weight`.
    F16,
    /// Dense bf16 `<name>.weight`.
    Bf16,
    /// INT4: `<name>.qweight` U8 `[N, K/2]`, `<name>.scales` and `<name>.offsets` F16
    /// `[N, K/group]`.
    Int4 {
        /// Group size along K.
        group: u32,
    },
    /// NF4: `<name>.qweight` U8 `[N, K/2]`, `<name>.absmax` F16 `[N, K/block]`.
    Nf4 {
        /// Block size along K.
        block: u32,
    },
    /// Symmetric INT4, `w = scale * (q - 8)`: `<name>.qweight` U8 `[N, K/2]` and
    /// `<name>.scales` F16 `[N, K/group]`, no offsets.
    Int4Sym {
        /// Group size along K.
        group: u32,
    },
    /// Not a linear layer: the 2D sin-cos positional table of diffusers' `PatchEmbed`
    /// (`get_2d_sincos_pos_embed`), `[1, grid * grid, D]` with `out_features = grid *
    /// grid` and `in_features = D`, computed at load instead of stored. The package
    /// holds no tensor for it. The table is computed in f64, rounded to f32 (as
    /// diffusers does), then to `source` (the checkpoint's dtype, which it matched bit
    /// for bit) and to `dtype` (the dtype the package would have stored it in).
    Sincos2d {
        /// Side of the square grid (`pos_embed_max_size`).
        grid: u32,
        /// diffusers' `base_size`, `sample_size / patch_size`: positions are scaled by
        /// `base_size / grid`.
        base_size: u32,
        /// dtype of the checkpoint's table.
        source: Dtype,
        /// dtype the package's table would have had.
        dtype: Dtype,
    },
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Precision::F32 => f.write_str("f32"),
            Precision::F16 => f.write_str("f16"),
            Precision::Bf16 => f.write_str("bf16"),
            Precision::Int4 { group } => write!(f, "int4/g{group}"),
            Precision::Nf4 { block } => write!(f, "nf4/b{block}"),
            Precision::Int4Sym { group } => write!(f, "int4sym/g{group}"),
            Precision::Sincos2d { dtype, .. } => {
                write!(
                    f,
                    "sincos2d/{} (computed, not stored)",
                    dtype.name().to_lowercase()
                )
            }
        }
    }
}

impl Precision {
    /// The 4-bit kind and group (block) size of a quantised layer; `None` for dense ones.
    pub fn q4(self) -> Option<(Q4Kind, usize)> {
        match self {
            Precision::Int4 { group } => Some((Q4Kind::Int4, group as usize)),
            Precision::Nf4 { block } => Some((Q4Kind::Nf4, block as usize)),
            Precision::Int4Sym { group } => Some((Q4Kind::Int4Sym, group as usize)),
            Precision::F32 | Precision::F16 | Precision::Bf16 | Precision::Sincos2d { .. } => None,
        }
    }

    /// The dtype of `<name>.weight` for a dense layer; `None` for 4-bit ones.
    pub fn dense_dtype(self) -> Option<Dtype> {
        match self {
            Precision::F32 => Some(Dtype::F32),
            Precision::F16 => Some(Dtype::F16),
            Precision::Bf16 => Some(Dtype::Bf16),
            Precision::Int4 { .. }
            | Precision::Nf4 { .. }
            | Precision::Int4Sym { .. }
            | Precision::Sincos2d { .. } => None,
        }
    }

    /// Whether the entry is a table computed at load ([`Precision::Sincos2d`]) rather
    /// than a stored linear layer.
    pub fn is_computed(self) -> bool {
        matches!(self, Precision::Sincos2d { .. })
    }
}

/// One linear layer `y = x W^T + b` with `W [out_features, in_features]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerEntry {
    /// diffusers name without the `.weight` suffix, with the ORIGINAL block index
    /// (`transformer_blocks.17.attn.to_q`).
    pub name: String,
    /// Storage of the weight.
    pub precision: Precision,
    /// N, rows of W.
    pub out_features: u64,
    /// K, columns of W.
    pub in_features: u64,
    /// Whether `<name>.bias` (`[N]`, dense) is stored.
    pub has_bias: bool,
}

impl LayerEntry {
    /// Names of the tensors this layer stores: the weight parts (`.weight`, or
    /// `.qweight` + `.scales` + `.offsets` for INT4, `.qweight` + `.scales` for
    /// symmetric INT4, `.qweight` + `.absmax` for NF4, nothing for a computed table),
    /// then `.bias` when present.
    pub fn tensor_names(&self) -> Vec<String> {
        let name = &self.name;
        let mut names = match self.precision {
            Precision::Int4 { .. } => vec![
                format!("{name}.qweight"),
                format!("{name}.scales"),
                format!("{name}.offsets"),
            ],
            Precision::Nf4 { .. } => vec![format!("{name}.qweight"), format!("{name}.absmax")],
            Precision::Int4Sym { .. } => {
                vec![format!("{name}.qweight"), format!("{name}.scales")]
            }
            Precision::Sincos2d { .. } => Vec::new(),
            Precision::F32 | Precision::F16 | Precision::Bf16 => vec![format!("{name}.weight")],
        };
        if self.has_bias {
            names.push(format!("{name}.bias"));
        }
        names
    }
}

/// One stored tensor, as declared by the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Tensor name in the safetensors header.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// CRC-32 of the tensor's bytes, checked by `Package::verify`.
    pub crc32: u32,
}

/// Where a package came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Source checkpoint name (folder or file name).
    pub source: String,
    /// Source checkpoint size in bytes.
    pub source_bytes: u64,
    /// hiprune version that wrote the package.
    pub tool_version: String,
    /// Quantiser used (`rtn-asymmetric`, `rtn-symmetric`, `nf4-rtn`, ...) and its options.
    pub quantizer: String,
    /// Human summary of the pruning plan.
    pub plan_summary: String,
    /// Per-block sensitivity scores (original block index order), if measured.
    pub sensitivity: Vec<f32>,
    /// Per-block distillation weights for an external trainer, if computed.
    pub distillation_weights: Vec<f32>,
}

/// Everything a package declares about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Package format version; must stay the first field.
    pub format_version: u32,
    /// The model architecture, when the package holds a whole model.
    pub architecture: Option<MmditConfig>,
    /// Original indices of the blocks the pruned model runs, in execution order.
    pub kept_blocks: Vec<u32>,
    /// Every linear layer and its precision.
    pub layers: Vec<LayerEntry>,
    /// Every stored tensor except the manifest itself.
    pub tensors: Vec<TensorEntry>,
    /// Where the package came from.
    pub provenance: Provenance,
    /// Sub-components removed from kept blocks (format version 2; empty in version 1).
    pub removed_components: Vec<ComponentCut>,
}

/// The names of a block's removable sub-components, as diffusers names its modules.
pub const COMPONENT_NAMES: [&str; 6] = [
    "norm1",
    "norm1_context",
    "attn",
    "attn2",
    "ff",
    "ff_context",
];

/// The sub-components removed from one kept block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentCut {
    /// The block's original index (one of `kept_blocks`).
    pub block: u32,
    /// Names from [`COMPONENT_NAMES`], each once.
    pub components: Vec<String>,
}

/// A version 1 manifest: [`Manifest`] before `removed_components`.
#[derive(Serialize, Deserialize)]
struct ManifestV1 {
    format_version: u32,
    architecture: Option<MmditConfig>,
    kept_blocks: Vec<u32>,
    layers: Vec<LayerEntry>,
    tensors: Vec<TensorEntry>,
    provenance: Provenance,
}

/// The parts of a [`Manifest`] a package writer takes from its caller; the writer adds
/// `format_version` and the `layers` and `tensors` it recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackageInfo {
    /// The model architecture, when the package holds a whole model.
    pub architecture: Option<MmditConfig>,
    /// Original indices of the blocks the pruned model runs, in execution order.
    pub kept_blocks: Vec<u32>,
    /// Where the package came from.
    pub provenance: Provenance,
    /// Sub-components removed from kept blocks.
    pub removed_components: Vec<ComponentCut>,
}

impl Manifest {
    /// Reads the leading format version of encoded manifest bytes alone and returns
    /// it: [`Error::UnsupportedFormatVersion`] for a version outside
    /// [`MIN_FORMAT_VERSION`](crate::format::MIN_FORMAT_VERSION)..=
    /// [`FORMAT_VERSION`](crate::format::FORMAT_VERSION), before the rest is decoded.
    pub fn check_version(bytes: &[u8]) -> Result<u32> {
        let (version, _) =
            postcard::take_from_bytes::<u32>(bytes).map_err(|e| Error::ManifestCorrupt {
                reason: format!("cannot read the format version: {e}"),
            })?;
        crate::format::check_format_version(version)?;
        Ok(version)
    }

    /// Encodes the manifest with postcard, as a package stores it, in the layout of its
    /// `format_version` (version 1 has no `removed_components`, so a version-1 manifest
    /// with some is an error).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let cannot = |e: postcard::Error| Error::invalid("manifest", format!("cannot encode: {e}"));
        if self.format_version != 1 {
            return postcard::to_allocvec(self).map_err(cannot);
        }
        if !self.removed_components.is_empty() {
            return Err(Error::invalid(
                "manifest",
                "format version 1 cannot record removed_components",
            ));
        }
        postcard::to_allocvec(&ManifestV1 {
            format_version: 1,
            architecture: self.architecture.clone(),
            kept_blocks: self.kept_blocks.clone(),
            layers: self.layers.clone(),
            tensors: self.tensors.clone(),
            provenance: self.provenance.clone(),
        })
        .map_err(cannot)
    }

    /// Decodes postcard-encoded manifest bytes (version first, then the whole
    /// structure, with nothing left over). Checks no rule beyond the encoding; a
    /// [`Package`](crate::format::Package) checks the manifest against its file.
    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        let corrupt = |e: postcard::Error| Error::ManifestCorrupt {
            reason: e.to_string(),
        };
        let (manifest, rest) = if Self::check_version(bytes)? == 1 {
            let (v1, rest) = postcard::take_from_bytes::<ManifestV1>(bytes).map_err(corrupt)?;
            let manifest = Manifest {
                format_version: v1.format_version,
                architecture: v1.architecture,
                kept_blocks: v1.kept_blocks,
                layers: v1.layers,
                tensors: v1.tensors,
                provenance: v1.provenance,
                removed_components: Vec::new(),
            };
            (manifest, rest)
        } else {
            postcard::take_from_bytes::<Manifest>(bytes).map_err(corrupt)?
        };
        if !rest.is_empty() {
            return Err(Error::ManifestCorrupt {
                reason: format!("{} bytes follow the encoded manifest", rest.len()),
            });
        }
        Ok(manifest)
    }
}
