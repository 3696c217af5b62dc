//! Opening what a user points hiprune at: a diffusers transformer folder, Stability
//! AI's single-file checkpoint (whole or position-pruned, with other components in the
//! same file or not), or an `.hpk` package. Each gives one [`Checkpoint`]: the
//! configuration, the weights under diffusers names with their original block
//! indices, and the pruning plan the file implies (a block with no tensors is a
//! removed block).

mod folder;
pub mod single_file;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::config::MmditConfig;
use crate::error::{Error, Result};
use crate::format::{FORMAT_NAME, MANIFEST_TENSOR, MAX_HEADER_BYTES, Package};
use crate::model::prune::PruneSpec;
use crate::model::weights::Weights;

pub use crate::error::SingleFileRule;
pub(crate) use folder::read_weights as read_folder_weights;
pub use folder::{MAX_INDEX_FILE_BYTES, SHARD_INDEX, SINGLE_FILE};
pub use single_file::{DEFAULT_HEAD_DIM, OriginalTensor, original_layout};

/// What kind of checkpoint a path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// A diffusers transformer folder (`config.json` + safetensors, single or sharded).
    DiffusersFolder,
    /// A single safetensors file with the original (Stability AI) names.
    SingleFile,
    /// An `.hpk` package.
    Package,
}

impl CheckpointKind {
    /// A short name for messages.
    pub fn describe(self) -> &'static str {
        match self {
            CheckpointKind::DiffusersFolder => "diffusers transformer folder",
            CheckpointKind::SingleFile => "single-file checkpoint",
            CheckpointKind::Package => "hiprune package",
        }
    }
}

/// How to read a checkpoint that carries no configuration of its own (a single file).
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    /// A diffusers `config.json` to use instead of reading the configuration from the
    /// shapes. Not accepted for a package (it records its own).
    pub config: Option<PathBuf>,
    /// Head width for a single file without `config` (default
    /// [`DEFAULT_HEAD_DIM`]).
    pub head_dim: Option<usize>,
}

/// Another model component stored in a single file beside the transformer (listed,
/// not read by the transformer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Component {
    /// `clip_l`, `clip_g`, `t5xxl`, `vae`, or `other` for tensors of no known
    /// component.
    pub name: String,
    /// Number of tensors.
    pub tensors: usize,
    /// Bytes of their data.
    pub bytes: u64,
    /// Their dtypes, sorted (`F16`, `F8_E4M3`, ...).
    pub dtypes: Vec<String>,
}

/// An opened checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The path that was opened.
    pub path: PathBuf,
    /// What it holds.
    pub kind: CheckpointKind,
    /// The architecture (with the original depth of a pruned model).
    pub config: MmditConfig,
    /// Whether `config` was read from the tensor shapes (a single file without
    /// `--config`).
    pub config_inferred: bool,
    /// The transformer's weights under diffusers names.
    pub weights: Weights,
    /// The blocks the checkpoint lacks (removed when it was pruned), or a package's
    /// plan.
    pub spec: PruneSpec,
    /// The files the weights come from.
    pub files: Vec<PathBuf>,
    /// Other components in the same file.
    pub components: Vec<Component>,
}

impl Checkpoint {
    /// Opens `path`: a folder is a diffusers transformer folder; a file is a package
    /// when its safetensors header says so, otherwise a single-file checkpoint. Every
    /// name, shape and byte range is checked here; the files are memory-mapped and
    /// must not be modified in place while the weights are loaded.
    pub fn open(path: impl AsRef<Path>, opts: &CheckpointOptions) -> Result<Checkpoint> {
        let path = path.as_ref();
        let kind = Checkpoint::kind_of(path)?;
        let given = opts
            .config
            .as_deref()
            .map(MmditConfig::from_file)
            .transpose()?;
        match kind {
            CheckpointKind::Package => {
                if opts.config.is_some() || opts.head_dim.is_some() {
                    return Err(Error::invalid(
                        format!("package {}", path.display()),
                        "records its own configuration; --config and --head-dim apply to \
                         single-file checkpoints",
                    ));
                }
                let package = Package::open(path)?;
                let config = package.manifest().architecture.clone().ok_or_else(|| {
                    Error::invalid(
                        format!("package {}", path.display()),
                        "holds no model architecture",
                    )
                })?;
                let manifest = package.manifest();
                let spec = PruneSpec::from_manifest(
                    config.num_layers,
                    &manifest.kept_blocks,
                    &manifest.removed_components,
                )?;
                Ok(Checkpoint {
                    path: path.to_path_buf(),
                    kind,
                    config,
                    config_inferred: false,
                    weights: Weights::from_package(package),
                    spec,
                    files: vec![path.to_path_buf()],
                    components: Vec::new(),
                })
            }
            CheckpointKind::DiffusersFolder => {
                let config = match given {
                    Some(c) => c,
                    None => MmditConfig::from_file(path.join("config.json"))?,
                };
                let (weights, files) = read_folder_weights(path)?;
                let present = weights.block_indices();
                Ok(Checkpoint {
                    path: path.to_path_buf(),
                    kind,
                    spec: missing_blocks(&config, &present),
                    config,
                    config_inferred: false,
                    weights,
                    files,
                    components: Vec::new(),
                })
            }
            CheckpointKind::SingleFile => {
                let config_inferred = given.is_none();
                let read = single_file::read(path, given, opts.head_dim)?;
                Ok(Checkpoint {
                    path: path.to_path_buf(),
                    kind,
                    spec: missing_blocks(&read.config, &read.present_blocks),
                    config: read.config,
                    config_inferred,
                    weights: read.weights,
                    files: vec![path.to_path_buf()],
                    components: read.components,
                })
            }
        }
    }

    /// What `path` holds, from its kind (folder or file) and, for a file, its
    /// safetensors header (a package names its format there). Errors: a path that
    /// cannot be read, a file that is not safetensors at all.
    pub fn kind_of(path: impl AsRef<Path>) -> Result<CheckpointKind> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Ok(CheckpointKind::DiffusersFolder);
        }
        let not_safetensors = |reason: String| Error::InvalidHeader {
            path: path.to_path_buf(),
            reason: format!("not an .hpk package or a safetensors checkpoint: {reason}"),
        };
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| not_safetensors(format!("{} bytes long", meta.len())))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER_BYTES || header_len + 8 > meta.len() {
            return Err(not_safetensors(format!(
                "its first 8 bytes give a {header_len}-byte header"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|e| not_safetensors(format!("header is not JSON ({e})")))?;
        let format = json
            .get("__metadata__")
            .and_then(|m| m.get("format"))
            .and_then(|f| f.as_str());
        if format == Some(FORMAT_NAME) || json.get(MANIFEST_TENSOR).is_some() {
            Ok(CheckpointKind::Package)
        } else {
            Ok(CheckpointKind::SingleFile)
        }
    }

    /// Original indices of the blocks the checkpoint lacks (or the package removed).
    pub fn missing_blocks(&self) -> Vec<usize> {
        self.spec.removed_blocks.iter().copied().collect()
    }

    /// Total bytes of the checkpoint's files.
    pub fn file_bytes(&self) -> Result<u64> {
        self.files.iter().try_fold(0u64, |total, f| {
            Ok(total + std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len())
        })
    }
}

/// The plan that removes every block of `config` with no tensors in `present`.
fn missing_blocks(config: &MmditConfig, present: &BTreeSet<usize>) -> PruneSpec {
    PruneSpec::remove_blocks((0..config.num_layers).filter(|i| !present.contains(i)))
}
