//! [`CpuBackend`]: the [`Backend`] trait on the CPU kernels of this module (f32
//! activations, the SIMD/threaded linear kernels, [`super::ops`] and
//! [`super::attention`]). Linear layers stay views into the host weights.

use std::sync::Arc;

use super::attention::{AttentionShape, attention};
use super::image;
use super::linear::linear;
use super::ops;
use crate::backend::{
    Activation, Backend, Device, GroupNorm, ImageShape, LinearLayer, LinearSource, Modulation,
};
use crate::error::{Error, Result};
use crate::quant::{DenseData, LinearWeights};

/// The CPU backend: f32 activations in host memory, kernels threaded on the current
/// rayon pool with the fastest SIMD path of this CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// The CPU backend.
    pub fn new() -> CpuBackend {
        CpuBackend
    }
}

/// An f32 activation `[rows, cols]` in host memory, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl CpuTensor {
    /// Wraps `data` after checking it holds `rows * cols` elements.
    pub fn from_vec(data: Vec<f32>, rows: usize, cols: usize) -> Result<CpuTensor> {
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| Error::invalid("tensor shape", format!("{rows} x {cols} overflows")))?;
        if data.len() != len {
            return Err(Error::length(
                format!("tensor [{rows}, {cols}]"),
                len,
                data.len(),
            ));
        }
        Ok(CpuTensor { data, rows, cols })
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The elements, row-major, by value.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
}

impl Activation for CpuTensor {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }
}

enum CpuWeights {
    /// A view lent by the source on each call (zero-copy).
    Shared {
        source: Arc<dyn LinearSource>,
        layer: String,
    },
    /// An owned f32 matrix `[n, k]`.
    Owned(Vec<f32>),
}

/// A linear layer of the CPU backend: the host weights (shared, or an owned f32
/// matrix) and an f32 copy of the bias.
pub struct CpuLinear {
    weights: CpuWeights,
    n: usize,
    k: usize,
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for CpuLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let weights = match &self.weights {
            CpuWeights::Shared { layer, .. } => format!("shared `{layer}`"),
            CpuWeights::Owned(_) => "owned f32".to_string(),
        };
        f.debug_struct("CpuLinear")
            .field("weights", &weights)
            .field("n", &self.n)
            .field("k", &self.k)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl CpuLinear {
    /// The weight view (checked again by the source: cheap, a name lookup).
    fn view(&self) -> Result<LinearWeights<'_>> {
        match &self.weights {
            CpuWeights::Shared { source, layer } => source.linear_weights(layer, self.n, self.k),
            CpuWeights::Owned(w) => LinearWeights::dense(DenseData::F32(w), self.n, self.k),
        }
    }
}

impl LinearLayer for CpuLinear {
    fn n(&self) -> usize {
        self.n
    }

    fn k(&self) -> usize {
        self.k
    }
}

fn check_bias(bias: Option<&[f32]>, n: usize) -> Result<Option<Vec<f32>>> {
    match bias {
        Some(b) if b.len() != n => Err(Error::length("bias [N]", n, b.len())),
        b => Ok(b.map(<[f32]>::to_vec)),
    }
}

/// Rows of each batch item when `rows` rows are split among `batch` items.
fn rows_per_item(what: &str, rows: usize, batch: usize) -> Result<usize> {
    if batch == 0 || !rows.is_multiple_of(batch) {
        return Err(Error::invalid(
            what,
            format!("{rows} rows do not split evenly into {batch} batch items"),
        ));
    }
    Ok(rows / batch)
}

fn same_cols(what: &str, a: &CpuTensor, b: &CpuTensor) -> Result<()> {
    if a.cols != b.cols {
        return Err(Error::invalid(
            what,
            format!("{} columns against {}", a.cols, b.cols),
        ));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Linear = CpuLinear;

    fn open(device: Device) -> Result<Self> {
        match device {
            Device::Cpu => Ok(CpuBackend),
            Device::Cuda(n) => {
                device.ensure_compiled()?;
                Err(Error::Unsupported {
                    what: format!(
                        "the CPU backend on cuda:{n}: run the model on `backend::cuda::CudaBackend` (`Mmdit::<CudaBackend>::load_on`)"
                    ),
                })
            }
        }
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        CpuTensor::from_vec(data.to_vec(), rows, cols)
    }

    fn download(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn upload_linear(
        &self,
        source: &Arc<dyn LinearSource>,
        layer: &str,
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Result<CpuLinear> {
        // Checks the layer once (the source guarantees the shape of what it lends);
        // each call borrows the view again.
        source.linear_weights(layer, n, k)?;
        Ok(CpuLinear {
            weights: CpuWeights::Shared {
                source: Arc::clone(source),
                layer: layer.to_string(),
            },
            n,
            k,
            bias: check_bias(bias, n)?,
        })
    }

    fn upload_dense(
        &self,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Result<CpuLinear> {
        LinearWeights::dense(DenseData::F32(w), n, k)?;
        Ok(CpuLinear {
            weights: CpuWeights::Owned(w.to_vec()),
            n,
            k,
            bias: check_bias(bias, n)?,
        })
    }

    fn linear(&self, x: &CpuTensor, w: &CpuLinear) -> Result<CpuTensor> {
        if x.cols != w.k {
            return Err(Error::length("linear input columns (K)", w.k, x.cols));
        }
        let view = w.view()?;
        let len = x
            .rows
            .checked_mul(w.n)
            .ok_or_else(|| Error::invalid("M", "M * N overflows"))?;
        let mut y = vec![0.0f32; len];
        linear(&x.data, x.rows, &view, w.bias.as_deref(), &mut y)?;
        CpuTensor::from_vec(y, x.rows, w.n)
    }

    fn layer_norm_modulate(
        &self,
        x: &CpuTensor,
        modulation: Option<Modulation<'_, CpuTensor>>,
        eps: f32,
    ) -> Result<CpuTensor> {
        let mut out = vec![0.0f32; x.data.len()];
        ops::layer_norm(&x.data, x.cols, eps, &mut out)?;
        if let Some(m) = modulation {
            if m.shift.rows != m.scale.rows {
                return Err(Error::invalid(
                    "modulation",
                    format!("shift has {} rows, scale {}", m.shift.rows, m.scale.rows),
                ));
            }
            let per = rows_per_item("modulate input", x.rows, m.shift.rows)?;
            ops::modulate(&mut out, x.cols, per, &m.shift.data, &m.scale.data)?;
        }
        CpuTensor::from_vec(out, x.rows, x.cols)
    }

    fn rms_norm_heads(&self, x: &mut CpuTensor, weight: &CpuTensor, eps: f32) -> Result<()> {
        if weight.rows != 1 || weight.cols == 0 || !x.cols.is_multiple_of(weight.cols) {
            return Err(Error::invalid(
                "rms_norm weight",
                format!(
                    "[{}, {}] is not one row whose width divides the {} columns",
                    weight.rows, weight.cols, x.cols
                ),
            ));
        }
        ops::rms_norm_heads(&mut x.data, weight.cols, &weight.data, eps)
    }

    fn gated_residual(
        &self,
        x: &mut CpuTensor,
        gate: Option<&CpuTensor>,
        y: &CpuTensor,
    ) -> Result<()> {
        if x.rows != y.rows || x.cols != y.cols {
            return Err(Error::invalid(
                "gated_residual update",
                format!(
                    "[{}, {}] against the residual's [{}, {}]",
                    y.rows, y.cols, x.rows, x.cols
                ),
            ));
        }
        let per = match gate {
            Some(g) => rows_per_item("gated_residual input", x.rows, g.rows)?,
            None => 1,
        };
        ops::gated_add(
            &mut x.data,
            &y.data,
            x.cols,
            per,
            gate.map(|g| g.data.as_slice()),
        )
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        if x.rows != y.rows || x.cols != y.cols {
            return Err(Error::invalid(
                "add_assign operand",
                format!("[{}, {}] against [{}, {}]", y.rows, y.cols, x.rows, x.cols),
            ));
        }
        ops::add_assign(&mut x.data, &y.data)
    }

    fn silu(&self, x: &mut CpuTensor) -> Result<()> {
        ops::silu(&mut x.data);
        Ok(())
    }

    fn gelu_tanh(&self, x: &mut CpuTensor) -> Result<()> {
        ops::gelu_tanh(&mut x.data);
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        batch: usize,
        heads: usize,
    ) -> Result<CpuTensor> {
        for (name, t) in [("k", k), ("v", v)] {
            if t.rows != q.rows || t.cols != q.cols {
                return Err(Error::invalid(
                    format!("attention {name}"),
                    format!(
                        "[{}, {}] against q's [{}, {}]",
                        t.rows, t.cols, q.rows, q.cols
                    ),
                ));
            }
        }
        if heads == 0 || !q.cols.is_multiple_of(heads) {
            return Err(Error::invalid(
                "attention heads",
                format!("{heads} heads do not divide {} columns", q.cols),
            ));
        }
        let seq = rows_per_item("attention input", q.rows, batch)?;
        let shape = AttentionShape {
            batch,
            seq,
            heads,
            head_dim: q.cols / heads,
        };
        let mut out = vec![0.0f32; q.data.len()];
        attention(&q.data, &k.data, &v.data, shape, &mut out)?;
        CpuTensor::from_vec(out, q.rows, q.cols)
    }

    fn concat_tokens(&self, a: &CpuTensor, b: &CpuTensor, batch: usize) -> Result<CpuTensor> {
        same_cols("concat_tokens", a, b)?;
        let na = rows_per_item("concat_tokens first input", a.rows, batch)?;
        let nb = rows_per_item("concat_tokens second input", b.rows, batch)?;
        let d = a.cols;
        let mut out = Vec::with_capacity(a.data.len() + b.data.len());
        for i in 0..batch {
            out.extend_from_slice(&a.data[i * na * d..(i + 1) * na * d]);
            out.extend_from_slice(&b.data[i * nb * d..(i + 1) * nb * d]);
        }
        CpuTensor::from_vec(out, a.rows + b.rows, d)
    }

    fn split_tokens(
        &self,
        x: &CpuTensor,
        batch: usize,
        first: usize,
    ) -> Result<(CpuTensor, CpuTensor)> {
        let seq = rows_per_item("split_tokens input", x.rows, batch)?;
        if first > seq {
            return Err(Error::invalid(
                "split_tokens",
                format!("{first} leading rows of items of {seq} rows"),
            ));
        }
        let d = x.cols;
        let mut a = Vec::with_capacity(batch * first * d);
        let mut b = Vec::with_capacity(batch * (seq - first) * d);
        if d > 0 && seq > 0 {
            for item in x.data.chunks(seq * d) {
                a.extend_from_slice(&item[..first * d]);
                b.extend_from_slice(&item[first * d..]);
            }
        }
        Ok((
            CpuTensor::from_vec(a, batch * first, d)?,
            CpuTensor::from_vec(b, batch * (seq - first), d)?,
        ))
    }

    fn column_chunk(&self, x: &CpuTensor, chunks: usize, index: usize) -> Result<CpuTensor> {
        if chunks == 0 || index >= chunks || !x.cols.is_multiple_of(chunks) {
            return Err(Error::invalid(
                "column_chunk",
                format!("chunk {index} of {chunks} of {} columns", x.cols),
            ));
        }
        let d = x.cols / chunks;
        let mut out = Vec::with_capacity(x.rows * d);
        for r in 0..x.rows {
            out.extend_from_slice(&x.data[(r * chunks + index) * d..][..d]);
        }
        CpuTensor::from_vec(out, x.rows, d)
    }

    fn conv2d(
        &self,
        x: &CpuTensor,
        w: &CpuLinear,
        image: ImageShape,
        kernel: usize,
    ) -> Result<CpuTensor> {
        let pixels = image.pixels()?;
        if x.rows != pixels {
            return Err(Error::length(
                format!("conv2d input rows ({image})"),
                pixels,
                x.rows,
            ));
        }
        let len = pixels
            .checked_mul(w.n)
            .ok_or_else(|| Error::invalid("conv2d output", "pixels x N overflows"))?;
        let mut y = vec![0.0f32; len];
        image::conv2d(
            &x.data,
            image,
            kernel,
            &w.view()?,
            w.bias.as_deref(),
            &mut y,
        )?;
        CpuTensor::from_vec(y, pixels, w.n)
    }

    fn group_norm(
        &self,
        x: &CpuTensor,
        batch: usize,
        norm: GroupNorm<'_, CpuTensor>,
        silu: bool,
    ) -> Result<CpuTensor> {
        for (name, t) in [("weight", norm.weight), ("bias", norm.bias)] {
            if t.rows != 1 || t.cols != x.cols {
                return Err(Error::invalid(
                    format!("group_norm {name}"),
                    format!("[{}, {}] is not [1, {}]", t.rows, t.cols, x.cols),
                ));
            }
        }
        let mut out = vec![0.0f32; x.data.len()];
        image::group_norm(
            &x.data,
            batch,
            x.cols,
            norm.groups,
            &norm.weight.data,
            &norm.bias.data,
            norm.eps,
            silu,
            &mut out,
        )?;
        CpuTensor::from_vec(out, x.rows, x.cols)
    }

    fn upsample_nearest2x(&self, x: &CpuTensor, image: ImageShape) -> Result<CpuTensor> {
        let up = image.upsampled2x()?;
        let len = up
            .pixels()?
            .checked_mul(x.cols)
            .ok_or_else(|| Error::invalid("upsample output", "pixels x channels overflows"))?;
        let mut out = vec![0.0f32; len];
        image::upsample_nearest2x(&x.data, image, x.cols, &mut out)?;
        CpuTensor::from_vec(out, up.pixels()?, x.cols)
    }
}
