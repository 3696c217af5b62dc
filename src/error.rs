//! The one error type of the crate.
//!
//! Each variant is one broken rule and names the file, tensor, layer or argument it is
//! about, so the `Display` text tells the user what to fix.

use std::path::PathBuf;

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in hiprune.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The file is shorter than the smallest valid package (8-byte header length).
    #[error("{path}: file is {len} bytes, too short to be a package (truncated?)")]
    FileTooShort {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },

    /// A file is larger than the cap for its kind.
    #[error("{path}: {len} bytes exceed the {max}-byte cap for this kind of file")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The cap.
        max: u64,
    },

    /// The header length field points past the end of the file.
    #[error(
        "{path}: header length {header_len} runs past the end of the {file_len}-byte file (truncated or not a package)"
    )]
    HeaderPastEnd {
        /// The file.
        path: PathBuf,
        /// The declared header length.
        header_len: u64,
        /// The file length.
        file_len: u64,
    },

    /// The header is larger than the accepted cap.
    #[error("{path}: header of {header_len} bytes exceeds the {max}-byte cap")]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// The declared header length.
        header_len: u64,
        /// The cap.
        max: u64,
    },

    /// The header is not the JSON a safetensors file must hold.
    #[error("{path}: invalid safetensors header: {reason}")]
    InvalidHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The file declares more tensors than the accepted cap.
    #[error("{path}: {count} tensors exceed the cap of {max}")]
    TooManyTensors {
        /// The file.
        path: PathBuf,
        /// Declared tensor count.
        count: usize,
        /// The cap.
        max: usize,
    },

    /// A tensor's byte range lies (partly) outside the data section.
    #[error("tensor `{tensor}`: bytes {start}..{end} lie outside the {data_len}-byte data section")]
    TensorOutOfBounds {
        /// The tensor.
        tensor: String,
        /// Declared start offset.
        start: u64,
        /// Declared end offset.
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },

    /// Tensor byte ranges overlap or leave a gap: safetensors requires them contiguous.
    #[error(
        "tensor `{tensor}`: starts at byte {start} but the previous tensor ends at {expected} (overlapping or non-contiguous offsets)"
    )]
    NonContiguous {
        /// The tensor.
        tensor: String,
        /// Where the tensor starts.
        start: u64,
        /// Where it should start.
        expected: u64,
    },

    /// Shape times element size overflows 64-bit arithmetic.
    #[error("tensor `{tensor}`: shape {shape:?} times the element size overflows")]
    SizeOverflow {
        /// The tensor.
        tensor: String,
        /// Its declared shape.
        shape: Vec<u64>,
    },

    /// A tensor's byte range does not match its shape and dtype.
    #[error(
        "tensor `{tensor}`: shape and dtype need {expected} bytes but the offsets give {found}"
    )]
    ByteLengthMismatch {
        /// The tensor.
        tensor: String,
        /// Bytes implied by shape and dtype.
        expected: u64,
        /// Bytes given by the offsets.
        found: u64,
    },

    /// The trailing bytes after the last tensor are not accounted for.
    #[error("{path}: {extra} bytes after the last tensor belong to no tensor")]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Unaccounted bytes.
        extra: u64,
    },

    /// A single-file checkpoint breaks a rule of its layout.
    #[error("{path}: {rule}")]
    SingleFile {
        /// The file.
        path: PathBuf,
        /// The rule.
        rule: SingleFileRule,
    },

    /// A tensor has a dtype other than the one required.
    #[error("tensor `{tensor}`: dtype {found}, expected {expected}")]
    DtypeMismatch {
        /// The tensor.
        tensor: String,
        /// The required dtype.
        expected: String,
        /// The dtype found.
        found: String,
    },

    /// A tensor has a shape other than the one required.
    #[error("tensor `{tensor}`: shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// The required shape.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },

    /// A tensor the manifest or the caller requires is absent.
    #[error("tensor `{tensor}` is missing")]
    MissingTensor {
        /// The tensor.
        tensor: String,
    },

    /// A tensor is present in the file but not declared in the manifest.
    #[error("tensor `{tensor}` is in the file but not in the manifest")]
    UndeclaredTensor {
        /// The tensor.
        tensor: String,
    },

    /// A tensor is present that a layer's precision rules out (a stray `.offsets` of a
    /// symmetric INT4 layer, a stored table the manifest declares computed).
    #[error("tensor `{tensor}` must not be present: {reason}")]
    UnexpectedTensor {
        /// The tensor.
        tensor: String,
        /// The rule it breaks.
        reason: String,
    },

    /// A layer the caller asked for is not declared in the package's manifest.
    #[error("layer `{layer}` is not in the package")]
    MissingLayer {
        /// The layer.
        layer: String,
    },

    /// A tensor's data is not aligned for zero-copy access to its element type.
    #[error("tensor `{tensor}`: data is not {align}-byte aligned, it cannot be viewed in place")]
    Misaligned {
        /// The tensor.
        tensor: String,
        /// The alignment needed.
        align: usize,
    },

    /// The file is a safetensors file but not a hiprune package.
    #[error("{path}: not a hiprune package: {reason}")]
    NotAPackage {
        /// The file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },

    /// The package was written by a format version this build cannot read.
    #[error(
        "package format version {found} is not supported (this build reads version {supported}); upgrade hiprune or re-export the package"
    )]
    UnsupportedFormatVersion {
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },

    /// The manifest bytes could not be decoded.
    #[error("package manifest is corrupt: {reason}")]
    ManifestCorrupt {
        /// What the decoder reported.
        reason: String,
    },

    /// A tensor's bytes do not match the checksum recorded in the manifest.
    #[error(
        "tensor `{tensor}`: checksum {found:08x} does not match the recorded {expected:08x} (file corrupted)"
    )]
    ChecksumMismatch {
        /// The tensor.
        tensor: String,
        /// Recorded CRC-32.
        expected: u32,
        /// Computed CRC-32.
        found: u32,
    },

    /// A quantisation group or block size that the format does not allow.
    #[error("layer `{layer}`: group size {group} is not supported (use one of {allowed:?})")]
    InvalidGroupSize {
        /// The layer.
        layer: String,
        /// The requested group size.
        group: usize,
        /// Allowed sizes.
        allowed: &'static [usize],
    },

    /// The input dimension K of a layer is not a multiple of its group size.
    #[error(
        "layer `{layer}`: K = {k} is not a multiple of the group size {group}; keep this layer dense"
    )]
    GroupDoesNotDivide {
        /// The layer.
        layer: String,
        /// Input features.
        k: usize,
        /// Group size.
        group: usize,
    },

    /// A buffer passed to a kernel or quantiser has the wrong length.
    #[error("{what}: expected {expected} elements, got {found}")]
    LengthMismatch {
        /// Which argument.
        what: String,
        /// Elements needed.
        expected: usize,
        /// Elements given.
        found: usize,
    },

    /// A value is outside what the operation accepts.
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// Which argument or field.
        what: String,
        /// Why it is rejected.
        reason: String,
    },

    /// Something this build or machine does not support.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What was asked for.
        what: String,
    },

    /// A device was asked for whose backend this build does not have.
    #[error(
        "{device} was asked for but hiprune was not built with CUDA (rebuild with `--features cuda`)"
    )]
    BackendNotCompiled {
        /// The device asked for, e.g. `cuda:0`.
        device: String,
    },

    /// No usable CUDA driver or device (in a build with the CUDA backend).
    #[error("no usable CUDA device: {reason}")]
    NoCudaDevice {
        /// Why none could be used.
        reason: String,
    },

    /// A CUDA driver or cuBLAS call failed (including errors a kernel raised earlier on
    /// the stream, which surface at the next call that synchronises).
    #[error("CUDA call `{call}` failed: {reason}")]
    Cuda {
        /// The call or operation, e.g. `cuMemAlloc (weights of 2432x9728)`.
        call: String,
        /// The driver's or cuBLAS' error.
        reason: String,
    },

    /// A CUDA launcher of `cuda/launch.h` refused its arguments or failed to launch.
    #[error("CUDA launcher `{launcher}` returned status {status}: {reason}")]
    CudaLaunch {
        /// The launcher, e.g. `hp_launch_gemv_int4_f16`.
        launcher: String,
        /// Its `hp_launch_status`.
        status: i32,
        /// What the status means, with the shape launched.
        reason: String,
    },
}

impl Error {
    /// Whether the error says the device asked for cannot be used here (not compiled
    /// in, no driver, no such device), as opposed to a broken model or input: the
    /// cases where an automatic device choice falls back to the CPU.
    pub fn is_device_unavailable(&self) -> bool {
        matches!(
            self,
            Error::NoCudaDevice { .. } | Error::BackendNotCompiled { .. }
        )
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::LengthMismatch`] for the argument `what`.
    pub fn length(what: impl Into<String>, expected: usize, found: usize) -> Self {
        Error::LengthMismatch {
            what: what.into(),
            expected,
            found,
        }
    }

    /// An [`Error::InvalidArgument`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// A rule of the single-file layout that a checkpoint breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SingleFileRule {
    /// A transformer tensor with a name this reader does not know.
    UnknownTensor {
        /// The tensor (original name, prefix removed).
        tensor: String,
    },
    /// A fused `qkv` whose first axis does not split into three.
    QkvRows {
        /// The tensor.
        tensor: String,
        /// Its first axis.
        rows: usize,
    },
    /// A block with one of its two streams missing.
    MissingStream {
        /// The block index.
        block: usize,
        /// The stream present (`x_block` or `context_block`).
        present: &'static str,
        /// The stream missing.
        missing: &'static str,
    },
    /// The hidden size is not a multiple of the head width.
    HeadDim {
        /// Hidden size D (from `x_embedder`).
        hidden: usize,
        /// The head width.
        head_dim: usize,
    },
    /// The same tensor of two blocks has two shapes.
    BlockShapes {
        /// The tensor in the later block.
        tensor: String,
        /// Its shape.
        found: Vec<usize>,
        /// The earlier block with the other shape.
        other_block: usize,
        /// The shape there.
        expected: Vec<usize>,
    },
    /// `pos_embed` is not `[1, side * side, D]`.
    PosEmbedNotSquare {
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A tensor the configuration is read from is missing or has the wrong rank.
    ShapeSource {
        /// The tensor (original name).
        tensor: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// The file holds no `joint_blocks`.
    NoBlocks,
    /// A `context_pre_only` block (two-chunk context modulation) that is not the last.
    PreOnlyNotLast {
        /// The `context_pre_only` block.
        block: usize,
        /// The last block present.
        last: usize,
    },
    /// A block index at or past the configured depth.
    BlockOutsideConfig {
        /// The block.
        block: usize,
        /// The config's `num_layers`.
        num_layers: usize,
    },
    /// The file uses diffusers names: it is part of a diffusers folder.
    DiffusersNames,
}

impl std::fmt::Display for SingleFileRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SingleFileRule::UnknownTensor { tensor } => write!(
                f,
                "tensor `{tensor}` is not part of an SD3 / SD3.5 MMDiT single file"
            ),
            SingleFileRule::QkvRows { tensor, rows } => write!(
                f,
                "fused `{tensor}` has {rows} rows, not a multiple of 3 (q, k, v)"
            ),
            SingleFileRule::MissingStream {
                block,
                present,
                missing,
            } => write!(
                f,
                "block {block} has its `{present}` but no `{missing}` (a block is removed whole or not at all)"
            ),
            SingleFileRule::HeadDim { hidden, head_dim } => write!(
                f,
                "hidden size {hidden} is not a multiple of the head width {head_dim} (give the right one with --head-dim or --config)"
            ),
            SingleFileRule::BlockShapes {
                tensor,
                found,
                other_block,
                expected,
            } => write!(
                f,
                "tensor `{tensor}` has shape {found:?} but block {other_block} has {expected:?}"
            ),
            SingleFileRule::PosEmbedNotSquare { shape } => write!(
                f,
                "`pos_embed` has shape {shape:?}, not [1, side * side, D] for a square grid"
            ),
            SingleFileRule::ShapeSource { tensor, expected } => {
                write!(f, "tensor `{tensor}` must be present with shape {expected}")
            }
            SingleFileRule::NoBlocks => write!(f, "holds no `joint_blocks` tensors"),
            SingleFileRule::PreOnlyNotLast { block, last } => write!(
                f,
                "block {block} has the last block's two-chunk context modulation, but block {last} follows it"
            ),
            SingleFileRule::BlockOutsideConfig { block, num_layers } => write!(
                f,
                "block {block} is outside the configured {num_layers} blocks"
            ),
            SingleFileRule::DiffusersNames => write!(
                f,
                "uses diffusers tensor names: open the folder that holds it (with its config.json)"
            ),
        }
    }
}
