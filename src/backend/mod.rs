//! Compute backends. The CPU backend is always built; the CUDA backend comes with the
//! `cuda` feature.
//!
//! # The [`Backend`] trait
//!
//! The MMDiT engine ([`crate::model::Mmdit`]) is written once against [`Backend`]. A
//! backend owns its activations ([`Backend::Tensor`], a row-major `[rows, cols]` matrix
//! that lives wherever the backend computes; the model never sees a pointer) and its
//! uploaded linear layers ([`Backend::Linear`], made once per load from the host
//! weights).
//!
//! Ops on the trait (everything that runs per block, so that a device backend keeps
//! the activations resident between them):
//! - transfers: [`Backend::upload`], [`Backend::download`];
//! - weights: [`Backend::upload_linear`] (dense or 4-bit, zero-copy where the backend
//!   can run on host memory), [`Backend::upload_dense`] (an owned f32 matrix);
//! - [`Backend::linear`] with the layer's optional bias;
//! - [`Backend::layer_norm_modulate`] (adaLN: LayerNorm without affine, then
//!   `x * (1 + scale) + shift` per batch item), [`Backend::rms_norm_heads`] (qk-norm);
//! - [`Backend::gated_residual`] (`x += gate * y`), [`Backend::add_assign`];
//! - [`Backend::silu`], [`Backend::gelu_tanh`];
//! - [`Backend::attention`] on the joint sequence, with [`Backend::concat_tokens`] /
//!   [`Backend::split_tokens`] to join and split the image and context tokens;
//! - [`Backend::column_chunk`] to cut a modulation `[batch, n * d]` into its chunks;
//! - the VAE decoder's image ops on channels-last images ([`ImageShape`]):
//!   [`Backend::conv2d`], [`Backend::group_norm`], [`Backend::upsample_nearest2x`].
//!
//! Host-side steps of the model (they run once per forward on data that starts or
//! ends on the host, so a device gains nothing from them): the sinusoidal timestep
//! embedding, the patch embedding (patchify, the small patch convolution and the
//! centre crop of the positional table, which for SD3 is a 192 x 192 x D table that
//! need not be copied to a device; one `[B * N, D]` upload follows) and unpatchify
//! (after one download).
//!
//! # Precision of activations
//!
//! The CPU backend keeps activations in f32 and accumulates norms in f64; the CUDA
//! backend keeps them in f16 with f32 accumulation (matrix products, norm statistics,
//! softmax statistics). [`Backend::upload`] and [`Backend::download`] always speak f32:
//! a backend converts on the way in and out. Weights keep their stored precision
//! (f32/f16/bf16 or 4-bit) on every backend.
//!
//! # Lifetimes of uploaded weights
//!
//! [`Backend::Linear`] is an owned, `'static` value, so the model can hold one per
//! layer for as long as it lives. To stay zero-copy on the CPU, a layer is uploaded
//! from a shared [`LinearSource`] (the model's weights, which own the package's memory
//! map): the CPU backend keeps the `Arc` and borrows a [`LinearWeights`] view for
//! each call, a device backend reads the view once and copies (or repacks) it to
//! device memory.

use std::sync::Arc;

use crate::error::{Error, Result};

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use cpu::attention::AttentionShape;
pub use cpu::backend::{CpuBackend, CpuLinear, CpuTensor};

use crate::quant::LinearWeights;

/// Where a model runs, as callers choose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The CPU backend (f32 activations).
    #[default]
    Cpu,
    /// The CUDA device with this ordinal (f16 activations; feature `cuda`).
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` (device 0) or `cuda:N`.
    pub fn parse(name: &str) -> Result<Device> {
        let lower = name.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => lower
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::invalid(
                        "device",
                        format!("`{name}` is not `cpu`, `cuda` or `cuda:N`"),
                    )
                }),
        }
    }

    /// Whether this build has a backend for the device: `Ok` for the CPU; for CUDA an
    /// [`Error::BackendNotCompiled`] in a build without the `cuda` feature. (Whether a
    /// device is actually present is the backend's business when it opens: an
    /// [`Error::NoCudaDevice`] then.)
    pub fn ensure_compiled(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
            Device::Cuda(n) => Err(Error::BackendNotCompiled {
                device: format!("cuda:{n}"),
            }),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Host storage that lends linear-layer weights by layer name, without copying.
///
/// The contract backends rely on: a view it returns is exactly `[n, k]` (`view.n() ==
/// n`, `view.k() == k`), so an uploaded layer's shape is the one the model asked for
/// and backends do not check it again.
pub trait LinearSource: Send + Sync {
    /// The weight matrix of layer `layer` (its `<layer>.weight`) as an `[n, k]` view;
    /// an error if it is missing or has another shape.
    fn linear_weights(&self, layer: &str, n: usize, k: usize) -> Result<LinearWeights<'_>>;
}

/// The shape of a backend activation: a row-major `[rows, cols]` matrix.
pub trait Activation {
    /// Rows (tokens, or batch items for per-item vectors).
    fn rows(&self) -> usize;
    /// Columns (channels).
    fn cols(&self) -> usize;
}

/// An uploaded linear layer `y = x W^T (+ bias)`, `W` of shape `[n, k]`.
pub trait LinearLayer {
    /// Output features N.
    fn n(&self) -> usize;
    /// Input features K.
    fn k(&self) -> usize;
}

/// The adaLN modulation of [`Backend::layer_norm_modulate`]: `shift` and `scale` are
/// `[batch, cols]`, one row per batch item.
#[derive(Debug)]
pub struct Modulation<'a, T> {
    /// Added after scaling.
    pub shift: &'a T,
    /// The input is multiplied by `1 + scale`.
    pub scale: &'a T,
}

impl<T> Clone for Modulation<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Modulation<'_, T> {}

/// The geometry of an image activation: `batch` items of `height x width` pixels,
/// stored channels-last as a `[batch * height * width, channels]` matrix (one row per
/// pixel, pixels row-major within an item).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageShape {
    /// Batch items.
    pub batch: usize,
    /// Pixel rows per item.
    pub height: usize,
    /// Pixel columns per item.
    pub width: usize,
}

impl ImageShape {
    /// Pixels in all items (the rows of the activation); an error on overflow.
    pub fn pixels(self) -> Result<usize> {
        self.batch
            .checked_mul(self.height)
            .and_then(|n| n.checked_mul(self.width))
            .ok_or_else(|| Error::invalid("image shape", format!("{self} overflows")))
    }

    /// The shape after 2x upsampling; an error on overflow.
    pub fn upsampled2x(self) -> Result<ImageShape> {
        let up = ImageShape {
            batch: self.batch,
            height: self.height.saturating_mul(2),
            width: self.width.saturating_mul(2),
        };
        up.pixels()?;
        Ok(up)
    }
}

impl std::fmt::Display for ImageShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} x {} x {} pixels",
            self.batch, self.height, self.width
        )
    }
}

/// The parameters of [`Backend::group_norm`]: `weight` and `bias` are `[1, channels]`.
#[derive(Debug)]
pub struct GroupNorm<'a, T> {
    /// Channel groups (they divide the channels).
    pub groups: usize,
    /// Per-channel scale.
    pub weight: &'a T,
    /// Per-channel shift.
    pub bias: &'a T,
    /// Added to the variance inside the square root.
    pub eps: f32,
}

impl<T> Clone for GroupNorm<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for GroupNorm<'_, T> {}

/// A compute backend: activations, uploaded weights and the ops of the MMDiT forward.
///
/// Per-item arguments (`shift`, `scale`, `gate`) have one row per batch item; the rows
/// of the activation they apply to are split evenly among the items (an error
/// otherwise). Every op checks its shapes and returns an error, never panics.
pub trait Backend: Send + Sync + std::fmt::Debug + Sized {
    /// An activation matrix resident on the backend.
    type Tensor: Activation + Send + Sync + std::fmt::Debug;
    /// A linear layer (weights and optional bias) resident on the backend.
    type Linear: LinearLayer + Send + Sync;

    /// Opens the backend on `device`; an error if this backend does not run there or
    /// the device is unusable.
    fn open(device: Device) -> Result<Self>;

    /// The device this backend runs on.
    fn device(&self) -> Device;

    /// Copies host f32 data `[rows, cols]` to the backend.
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;

    /// Copies an activation back to the host as f32, row-major.
    fn download(&self, x: &Self::Tensor) -> Result<Vec<f32>>;

    /// Uploads layer `layer` of `source` (`[n, k]`, dense or 4-bit) with its bias
    /// `[n]`. Backends that compute on host memory keep `source` and stay zero-copy.
    fn upload_linear(
        &self,
        source: &Arc<dyn LinearSource>,
        layer: &str,
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self::Linear>;

    /// Uploads an f32 weight matrix `w [n, k]` (copied) with its bias `[n]`.
    fn upload_dense(
        &self,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self::Linear>;

    /// `x [m, k] -> x W^T (+ bias) [m, n]`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Linear) -> Result<Self::Tensor>;

    /// LayerNorm of each row without affine parameters (biased variance, `eps` inside
    /// the square root), then, when given, `x * (1 + scale) + shift` per batch item.
    fn layer_norm_modulate(
        &self,
        x: &Self::Tensor,
        modulation: Option<Modulation<'_, Self::Tensor>>,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// RMS norm of every `head_dim`-wide slice of `x` in place, times `weight`
    /// (`[1, head_dim]`): `v / sqrt(mean(v^2) + eps) * weight`.
    fn rms_norm_heads(&self, x: &mut Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<()>;

    /// Gated residual in place: `x += gate * y`, `gate` per batch item, or `x += y`
    /// when `gate` is `None`.
    fn gated_residual(
        &self,
        x: &mut Self::Tensor,
        gate: Option<&Self::Tensor>,
        y: &Self::Tensor,
    ) -> Result<()>;

    /// `x += y` elementwise (same shape).
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;

    /// SiLU `x * sigmoid(x)` in place.
    fn silu(&self, x: &mut Self::Tensor) -> Result<()>;

    /// GELU with the tanh approximation in place.
    fn gelu_tanh(&self, x: &mut Self::Tensor) -> Result<()>;

    /// Scaled dot-product attention `softmax(q k^T / sqrt(head_dim)) v` (no mask) of
    /// `batch` items of `rows / batch` tokens and `heads` heads; q, k, v and the result
    /// are `[batch * seq, heads * head_dim]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        batch: usize,
        heads: usize,
    ) -> Result<Self::Tensor>;

    /// The joint sequence: for each of the `batch` items, its rows of `a` followed by
    /// its rows of `b` (same column count).
    fn concat_tokens(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        batch: usize,
    ) -> Result<Self::Tensor>;

    /// The inverse of [`Backend::concat_tokens`]: each of the `batch` items' first
    /// `first` rows go to the first result, the rest to the second.
    fn split_tokens(
        &self,
        x: &Self::Tensor,
        batch: usize,
        first: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)>;

    /// Chunk `index` of `chunks` equal column blocks of `x [rows, chunks * d]`, as
    /// `[rows, d]`.
    fn column_chunk(&self, x: &Self::Tensor, chunks: usize, index: usize) -> Result<Self::Tensor>;

    /// A stride-1, zero-padded ("same") convolution with an odd `kernel x kernel`
    /// kernel of the channels-last image `x` (`[image.pixels(), in]`): `w` is the
    /// `[out, in * kernel * kernel]` weight (PyTorch's `[out, in, kh, kw]` flattened)
    /// with its bias; the result is `[image.pixels(), out]`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Linear,
        image: ImageShape,
        kernel: usize,
    ) -> Result<Self::Tensor>;

    /// GroupNorm of the channels-last activation `x` of `batch` items (each item's
    /// channels in `norm.groups` groups, normalised over the item's pixels; biased
    /// variance), then `* weight + bias` per channel, then SiLU when `silu`.
    fn group_norm(
        &self,
        x: &Self::Tensor,
        batch: usize,
        norm: GroupNorm<'_, Self::Tensor>,
        silu: bool,
    ) -> Result<Self::Tensor>;

    /// Nearest-neighbour 2x upsampling of the channels-last image `x`.
    fn upsample_nearest2x(&self, x: &Self::Tensor, image: ImageShape) -> Result<Self::Tensor>;
}
