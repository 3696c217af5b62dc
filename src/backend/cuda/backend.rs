//! [`CudaBackend`]: the [`Backend`] trait on one CUDA device. Activations are `f16`
//! matrices in device memory ([`CudaTensorF16`]); every op is one or two launches of
//! the model-op launchers of `cuda/launch.h` on the device's stream, with shapes
//! checked on the host first. Linear layers are 4-bit ([`CudaQ4Linear`]) or dense
//! `f16` through cuBLAS ([`CudaDenseLinear`]).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::f16;

use super::device::{CudaDevice, CudaTensorF16};
use super::launch::{self, sys};
use super::linear::{CudaDenseLinear, CudaQ4Linear};
use crate::backend::{
    Activation, Backend, Device, GroupNorm, ImageShape, LinearLayer, LinearSource, Modulation,
};
use crate::error::{Error, Result};
use crate::quant::Q4Weights;
use crate::quant::{DenseData, LinearWeights};

/// The head widths the attention kernel is compiled for.
pub const ATTENTION_HEAD_DIMS: &[usize] = &[8, 16, 32, 64, 128];

/// The widest head [`Backend::rms_norm_heads`] takes on CUDA (one warp holds a head).
pub const RMS_NORM_MAX_HEAD_DIM: usize = 128;

/// The MMDiT engine's backend on a CUDA device: `f16` activations with `f32`
/// accumulation. Cloning is cheap and shares the device (its stream and memory
/// accounting).
#[derive(Debug, Clone)]
pub struct CudaBackend {
    device: CudaDevice,
    poison: bool,
}

/// A linear layer of the CUDA backend: 4-bit weights through the hiprune kernels or
/// dense `f16` weights through cuBLAS.
#[derive(Debug)]
pub enum CudaLinear {
    /// INT4, symmetric INT4 or NF4 weights, repacked for the 4-bit kernels.
    Q4(CudaQ4Linear),
    /// Dense `f16` weights (stored f32/f16/bf16 layers, and 4-bit layers whose shape
    /// the 4-bit kernels do not take, dequantised).
    Dense(CudaDenseLinear),
}

impl LinearLayer for CudaLinear {
    fn n(&self) -> usize {
        match self {
            CudaLinear::Q4(l) => l.n(),
            CudaLinear::Dense(l) => l.n(),
        }
    }

    fn k(&self) -> usize {
        match self {
            CudaLinear::Q4(l) => l.k(),
            CudaLinear::Dense(l) => l.k(),
        }
    }
}

impl Activation for CudaTensorF16 {
    fn rows(&self) -> usize {
        CudaTensorF16::rows(self)
    }

    fn cols(&self) -> usize {
        CudaTensorF16::cols(self)
    }
}

/// `value` as the launchers' `int32`.
/// Upper bound on the elements of one im2col band of [`Backend::conv2d`] (64 MiB of
/// f16).
const IM2COL_BAND_ELEMENTS: usize = 32 << 20;

fn dim32(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| {
        Error::invalid(
            what,
            format!("{value} exceeds the CUDA kernels' 32-bit sizes"),
        )
    })
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

fn same_shape(what: &str, x: &CudaTensorF16, y: &CudaTensorF16) -> Result<()> {
    if x.rows() != y.rows() || x.cols() != y.cols() {
        return Err(Error::invalid(
            what,
            format!(
                "[{}, {}] against [{}, {}]",
                y.rows(),
                y.cols(),
                x.rows(),
                x.cols()
            ),
        ));
    }
    Ok(())
}

/// Host `f32` values as `f16` bits; refuses values that are not finite in `f16`.
fn to_f16_bits(data: &[f32], what: &str) -> Result<Vec<u16>> {
    data.iter()
        .enumerate()
        .map(|(i, &v)| {
            let h = f16::from_f32(v);
            if h.is_finite() {
                Ok(h.to_bits())
            } else {
                Err(Error::invalid(
                    what,
                    format!("element {i} = {v} is not finite in f16"),
                ))
            }
        })
        .collect()
}

/// Dense weights of any stored precision as `f16` for the device.
fn dense_to_f16(data: DenseData<'_>, layer: &str) -> Result<Vec<f16>> {
    let what = format!("{layer}.weight");
    let from = |i: usize, v: f32| {
        let h = f16::from_f32(v);
        if h.is_finite() {
            Ok(h)
        } else {
            Err(Error::invalid(
                &what,
                format!("element {i} = {v} is not finite in f16 (the CUDA backend's weight type)"),
            ))
        }
    };
    match data {
        DenseData::F16(d) => Ok(d.to_vec()),
        DenseData::F32(d) => d.iter().enumerate().map(|(i, &v)| from(i, v)).collect(),
        DenseData::Bf16(d) => d
            .iter()
            .enumerate()
            .map(|(i, &v)| from(i, v.to_f32()))
            .collect(),
    }
}

/// Why the 4-bit kernels do not take `w`, or `None` when they do.
fn q4_refusal(w: &Q4Weights<'_>) -> Option<String> {
    if i32::try_from(w.n()).is_err() || i32::try_from(w.k()).is_err() {
        return Some(format!("[{}, {}] exceeds 32-bit sizes", w.n(), w.k()));
    }
    if !w.k().is_multiple_of(32) {
        return Some(format!("K = {} is not a multiple of 32", w.k()));
    }
    if ![32, 64, 128].contains(&w.group()) {
        return Some(format!("group {} is not 32, 64 or 128", w.group()));
    }
    launch::repacked_bytes(w.n(), w.k())
        .err()
        .map(|e| e.to_string())
}

/// The dequantised `f16` copy of a 4-bit matrix, row by row.
fn dequantize_f16(w: &Q4Weights<'_>, layer: &str) -> Result<Vec<f16>> {
    let (n, k) = (w.n(), w.k());
    let mut row = vec![0.0f32; k];
    let mut out = Vec::with_capacity(n * k);
    for r in 0..n {
        w.dequantize_row(r, &mut row);
        for (c, &v) in row.iter().enumerate() {
            let h = f16::from_f32(v);
            if !h.is_finite() {
                return Err(Error::invalid(
                    format!("{layer}.weight"),
                    format!("dequantised element [{r}, {c}] = {v} is not finite in f16"),
                ));
            }
            out.push(h);
        }
    }
    Ok(out)
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` ([`Error::NoCudaDevice`] without a usable one).
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        Ok(CudaBackend::from_device(CudaDevice::new(ordinal)?))
    }

    /// The backend on an already opened device handle (shares its stream and memory
    /// accounting).
    pub fn from_device(device: CudaDevice) -> CudaBackend {
        CudaBackend {
            device,
            poison: false,
        }
    }

    /// The device handle (memory report, synchronisation, properties).
    pub fn cuda_device(&self) -> &CudaDevice {
        &self.device
    }

    /// Fills every output buffer an op allocates with NaN before the kernel runs, so
    /// that an element no kernel wrote shows up in tests (costs one extra upload per
    /// op; off by default).
    pub fn poison_outputs(mut self, on: bool) -> CudaBackend {
        self.poison = on;
        self
    }

    /// A fresh output `[rows, cols]` (NaN-filled when poisoning is on).
    fn fresh(&self, rows: usize, cols: usize) -> Result<CudaTensorF16> {
        if self.poison {
            self.device.full_f16(rows, cols, f16::NAN)
        } else {
            self.device.alloc_f16(rows, cols)
        }
    }

    /// Refuses a tensor of another device handle.
    fn mine(&self, t: &CudaTensorF16, what: &str) -> Result<()> {
        self.device.check_same(t.buffer().device_id(), what)
    }

    /// The raw stream handle the launchers take.
    fn raw_stream(&self) -> *mut c_void {
        self.device.stream().cu_stream() as *mut c_void
    }

    /// Strided copy of `rows` x `cols` elements: row `r` of the source starts at
    /// `src_off + r * src_stride`, of the destination at `dst_off + r * dst_stride`;
    /// both ranges are checked to lie inside their buffers.
    #[allow(clippy::too_many_arguments)]
    fn copy_2d(
        &self,
        dst: &mut CudaTensorF16,
        dst_off: usize,
        dst_stride: usize,
        src: &CudaTensorF16,
        src_off: usize,
        src_stride: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let fits = |off: usize, stride: usize, len: usize| {
            rows >= 1
                && cols >= 1
                && stride >= cols
                && (rows - 1)
                    .checked_mul(stride)
                    .and_then(|v| v.checked_add(off))
                    .and_then(|v| v.checked_add(cols))
                    .is_some_and(|end| end <= len)
        };
        if !fits(dst_off, dst_stride, dst.buffer().len())
            || !fits(src_off, src_stride, src.buffer().len())
        {
            return Err(Error::invalid(
                "copy_2d",
                format!(
                    "{rows} x {cols} elements at {src_off} (stride {src_stride}) of {} to {dst_off} (stride {dst_stride}) of {}",
                    src.buffer().len(),
                    dst.buffer().len()
                ),
            ));
        }
        let cols32 = dim32(cols, "copy_2d columns")?;
        self.device.bind()?;
        let stream = self.device.stream();
        let (sp, _s) = src.buffer().slice().device_ptr(stream);
        let (dp, _d) = dst.buffer_mut().slice_mut().device_ptr_mut(stream);
        let sp = sp + 2 * src_off as u64;
        let dp = dp + 2 * dst_off as u64;
        // SAFETY: both pointers are live device allocations of this context (`src` and
        // `dst` are distinct tensors: one is borrowed mutably), offset by whole f16
        // elements; the check above keeps every element the launcher touches,
        // (rows - 1) * stride + off + cols, inside its buffer. The launcher only
        // enqueues a kernel on this context's stream, ordered before any later use or
        // free of the buffers.
        let status = unsafe {
            sys::hp_launch_copy_2d_f16(
                dp as *mut u16,
                dst_stride as i64,
                sp as *const u16,
                src_stride as i64,
                rows as i64,
                cols32,
                self.raw_stream(),
            )
        };
        launch::check_status("hp_launch_copy_2d_f16", status, || {
            format!("rows = {rows}, cols = {cols}, strides {src_stride} -> {dst_stride}")
        })
    }

    /// `x += y` for `x`, `y` of the same shape.
    fn add_rows(&self, x: &mut CudaTensorF16, y: &CudaTensorF16) -> Result<()> {
        self.mine(x, "add x")?;
        self.mine(y, "add y")?;
        let rows = dim32(x.rows(), "rows")?;
        let cols = dim32(x.cols(), "columns")?;
        self.device.bind()?;
        let stream = self.device.stream();
        let (yp, _y) = y.buffer().slice().device_ptr(stream);
        let (xp, _x) = x.buffer_mut().slice_mut().device_ptr_mut(stream);
        // SAFETY: x and y are distinct live allocations of this context holding rows *
        // cols f16 each (same shape, checked by the callers); y_rows = rows keeps every
        // read of y in bounds. The kernel is enqueued on this context's stream.
        let status = unsafe {
            sys::hp_launch_add_rows_f16(
                xp as *mut u16,
                yp as *const u16,
                rows,
                cols,
                rows,
                self.raw_stream(),
            )
        };
        launch::check_status("hp_launch_add_rows_f16", status, || {
            format!("rows = {rows}, cols = {cols}")
        })
    }

    /// An activation function in place.
    fn activation(&self, x: &mut CudaTensorF16, act: sys::hp_activation, name: &str) -> Result<()> {
        self.mine(x, name)?;
        let n = x.buffer().len();
        self.device.bind()?;
        let stream = self.device.stream();
        let (xp, _x) = x.buffer_mut().slice_mut().device_ptr_mut(stream);
        // SAFETY: x is a live allocation of this context with n f16 elements; the
        // launcher reads and writes each element i < n from one thread (input and output
        // may be the same buffer, as launch.h allows). Enqueued on this context's stream.
        let status = unsafe {
            sys::hp_launch_activation_f16(
                xp as *const u16,
                xp as *mut u16,
                n as i64,
                act as i32,
                self.raw_stream(),
            )
        };
        launch::check_status("hp_launch_activation_f16", status, || {
            format!("{name} of {n} elements")
        })
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensorF16;
    type Linear = CudaLinear;

    fn open(device: Device) -> Result<Self> {
        match device {
            Device::Cuda(n) => CudaBackend::new(n),
            Device::Cpu => Err(Error::Unsupported {
                what: "the CUDA backend on the CPU device (use the CPU backend for `cpu`)".into(),
            }),
        }
    }

    fn device(&self) -> Device {
        Device::Cuda(self.device.ordinal())
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensorF16> {
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
        let bits = to_f16_bits(data, "uploaded activation")?;
        self.device
            .upload_f16(bytemuck::cast_slice(&bits), rows, cols)
    }

    fn download(&self, x: &CudaTensorF16) -> Result<Vec<f32>> {
        Ok(self
            .device
            .download_f16(x)?
            .into_iter()
            .map(f16::to_f32)
            .collect())
    }

    fn upload_linear(
        &self,
        source: &Arc<dyn LinearSource>,
        layer: &str,
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Result<CudaLinear> {
        match source.linear_weights(layer, n, k)? {
            LinearWeights::Dense { data, .. } => {
                let w = dense_to_f16(data, layer)?;
                Ok(CudaLinear::Dense(CudaDenseLinear::upload(
                    &self.device,
                    &w,
                    n,
                    k,
                    bias,
                )?))
            }
            LinearWeights::Q4(w) => match q4_refusal(&w) {
                None => Ok(CudaLinear::Q4(CudaQ4Linear::upload(&self.device, w, bias)?)),
                Some(reason) => {
                    log::info!(
                        "{layer}: the CUDA 4-bit kernels do not take this {} layer ({reason}); it runs as dequantised f16",
                        w.kind()
                    );
                    let dense = dequantize_f16(&w, layer)?;
                    Ok(CudaLinear::Dense(CudaDenseLinear::upload(
                        &self.device,
                        &dense,
                        n,
                        k,
                        bias,
                    )?))
                }
            },
        }
    }

    fn upload_dense(
        &self,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Result<CudaLinear> {
        let view = LinearWeights::dense(DenseData::F32(w), n, k)?;
        let LinearWeights::Dense { data, .. } = view else {
            return Err(Error::invalid("dense weight", "not a dense matrix"));
        };
        let w = dense_to_f16(data, "dense layer")?;
        Ok(CudaLinear::Dense(CudaDenseLinear::upload(
            &self.device,
            &w,
            n,
            k,
            bias,
        )?))
    }

    fn linear(&self, x: &CudaTensorF16, w: &CudaLinear) -> Result<CudaTensorF16> {
        if x.cols() != w.k() {
            return Err(Error::length("linear input columns (K)", w.k(), x.cols()));
        }
        let mut y = self.fresh(x.rows(), w.n())?;
        match w {
            CudaLinear::Q4(l) => l.forward_into(x, &mut y, super::Q4Kernel::Auto)?,
            CudaLinear::Dense(l) => l.forward_into(x, &mut y)?,
        }
        Ok(y)
    }

    fn layer_norm_modulate(
        &self,
        x: &CudaTensorF16,
        modulation: Option<Modulation<'_, CudaTensorF16>>,
        eps: f32,
    ) -> Result<CudaTensorF16> {
        self.mine(x, "layer_norm input")?;
        if !eps.is_finite() || eps < 0.0 {
            return Err(Error::invalid(
                "layer_norm eps",
                format!("{eps} is not a finite value >= 0"),
            ));
        }
        if !x.cols().is_multiple_of(2) || x.cols() < 2 {
            return Err(Error::Unsupported {
                what: format!(
                    "LayerNorm of {} columns on CUDA (the kernel takes an even width)",
                    x.cols()
                ),
            });
        }
        let rows = dim32(x.rows(), "layer_norm rows")?;
        let cols = dim32(x.cols(), "layer_norm columns")?;
        let per = match modulation {
            Some(m) => {
                self.mine(m.shift, "modulation shift")?;
                self.mine(m.scale, "modulation scale")?;
                if m.shift.rows() != m.scale.rows() {
                    return Err(Error::invalid(
                        "modulation",
                        format!(
                            "shift has {} rows, scale {}",
                            m.shift.rows(),
                            m.scale.rows()
                        ),
                    ));
                }
                for (name, t) in [("modulation shift", m.shift), ("modulation scale", m.scale)] {
                    if t.cols() != x.cols() {
                        return Err(Error::length(name, x.cols(), t.cols()));
                    }
                }
                rows_per_item("modulate input", x.rows(), m.shift.rows())?
            }
            None => x.rows(),
        };
        let per = dim32(per, "rows per batch item")?;
        let mut y = self.fresh(x.rows(), x.cols())?;
        self.device.bind()?;
        let status = {
            let stream = self.device.stream();
            let (xp, _x) = x.buffer().slice().device_ptr(stream);
            let shift = modulation.map(|m| m.shift.buffer().slice().device_ptr(stream));
            let scale = modulation.map(|m| m.scale.buffer().slice().device_ptr(stream));
            let shift_ptr = shift
                .as_ref()
                .map_or(std::ptr::null(), |(p, _)| *p as *const u16);
            let scale_ptr = scale
                .as_ref()
                .map_or(std::ptr::null(), |(p, _)| *p as *const u16);
            let (yp, _y) = y.buffer_mut().slice_mut().device_ptr_mut(stream);
            // SAFETY: x and y are live allocations of this context of rows * cols f16; shift
            // and scale (both or neither) hold batch * cols f16 where batch = rows / per, so
            // with mod_stride = cols every modulation read (row / per) * cols + c is in
            // bounds. Fresh allocations are 256-byte aligned (the kernel needs 4). Enqueued
            // on this context's stream.
            unsafe {
                sys::hp_launch_layer_norm_modulate_f16(
                    xp as *const u16,
                    shift_ptr,
                    scale_ptr,
                    yp as *mut u16,
                    rows,
                    cols,
                    per,
                    cols,
                    eps,
                    self.raw_stream(),
                )
            }
        };
        launch::check_status("hp_launch_layer_norm_modulate_f16", status, || {
            format!("rows = {rows}, dim = {cols}, rows per item = {per}")
        })?;
        Ok(y)
    }

    fn rms_norm_heads(
        &self,
        x: &mut CudaTensorF16,
        weight: &CudaTensorF16,
        eps: f32,
    ) -> Result<()> {
        self.mine(x, "rms_norm input")?;
        self.mine(weight, "rms_norm weight")?;
        if weight.rows() != 1 || !x.cols().is_multiple_of(weight.cols()) {
            return Err(Error::invalid(
                "rms_norm weight",
                format!(
                    "[{}, {}] is not one row whose width divides the {} columns",
                    weight.rows(),
                    weight.cols(),
                    x.cols()
                ),
            ));
        }
        if !eps.is_finite() || eps < 0.0 {
            return Err(Error::invalid(
                "rms_norm eps",
                format!("{eps} is not a finite value >= 0"),
            ));
        }
        let head_dim = weight.cols();
        if head_dim > RMS_NORM_MAX_HEAD_DIM {
            return Err(Error::Unsupported {
                what: format!(
                    "RMS norm of {head_dim}-wide heads on CUDA (the kernel takes up to {RMS_NORM_MAX_HEAD_DIM})"
                ),
            });
        }
        let rows = dim32(x.rows(), "rms_norm rows")?;
        let heads = dim32(x.cols() / head_dim, "rms_norm heads")?;
        let stride = dim32(x.cols(), "rms_norm columns")?;
        self.device.bind()?;
        let stream = self.device.stream();
        let (wp, _w) = weight.buffer().slice().device_ptr(stream);
        let (xp, _x) = x.buffer_mut().slice_mut().device_ptr_mut(stream);
        // SAFETY: x is a live allocation of this context of rows * cols f16 with cols =
        // heads * head_dim = row_stride; weight holds head_dim f16. Distinct buffers (one
        // is borrowed mutably). Enqueued on this context's stream.
        let status = unsafe {
            sys::hp_launch_rms_norm_heads_f16(
                xp as *mut u16,
                wp as *const u16,
                rows,
                heads,
                head_dim as i32,
                stride,
                eps,
                self.raw_stream(),
            )
        };
        launch::check_status("hp_launch_rms_norm_heads_f16", status, || {
            format!("rows = {rows}, heads = {heads}, head_dim = {head_dim}")
        })
    }

    fn gated_residual(
        &self,
        x: &mut CudaTensorF16,
        gate: Option<&CudaTensorF16>,
        y: &CudaTensorF16,
    ) -> Result<()> {
        same_shape("gated_residual update", x, y)?;
        let Some(g) = gate else {
            return self.add_rows(x, y);
        };
        self.mine(x, "gated_residual x")?;
        self.mine(y, "gated_residual y")?;
        self.mine(g, "gated_residual gate")?;
        if g.cols() != x.cols() {
            return Err(Error::length("gated_residual gate", x.cols(), g.cols()));
        }
        let per = dim32(
            rows_per_item("gated_residual input", x.rows(), g.rows())?,
            "rows per batch item",
        )?;
        let rows = dim32(x.rows(), "rows")?;
        let cols = dim32(x.cols(), "columns")?;
        self.device.bind()?;
        let stream = self.device.stream();
        let (gp, _g) = g.buffer().slice().device_ptr(stream);
        let (yp, _y) = y.buffer().slice().device_ptr(stream);
        let (xp, _x) = x.buffer_mut().slice_mut().device_ptr_mut(stream);
        // SAFETY: x and y are live allocations of this context of rows * cols f16 (same
        // shape, checked), x distinct from y and gate (borrowed mutably); gate holds
        // batch * cols f16 with batch = rows / per, so with mod_stride = cols every gate
        // read is in bounds. Enqueued on this context's stream.
        let status = unsafe {
            sys::hp_launch_gated_residual_f16(
                xp as *mut u16,
                gp as *const u16,
                yp as *const u16,
                rows,
                cols,
                per,
                cols,
                self.raw_stream(),
            )
        };
        launch::check_status("hp_launch_gated_residual_f16", status, || {
            format!("rows = {rows}, dim = {cols}, rows per item = {per}")
        })
    }

    fn add_assign(&self, x: &mut CudaTensorF16, y: &CudaTensorF16) -> Result<()> {
        same_shape("add_assign operand", x, y)?;
        self.add_rows(x, y)
    }

    fn silu(&self, x: &mut CudaTensorF16) -> Result<()> {
        self.activation(x, sys::hp_activation_HP_ACTIVATION_SILU, "silu")
    }

    fn gelu_tanh(&self, x: &mut CudaTensorF16) -> Result<()> {
        self.activation(x, sys::hp_activation_HP_ACTIVATION_GELU_TANH, "gelu_tanh")
    }

    fn attention(
        &self,
        q: &CudaTensorF16,
        k: &CudaTensorF16,
        v: &CudaTensorF16,
        batch: usize,
        heads: usize,
    ) -> Result<CudaTensorF16> {
        self.mine(q, "attention q")?;
        for (name, t) in [("k", k), ("v", v)] {
            self.mine(t, &format!("attention {name}"))?;
            if t.rows() != q.rows() || t.cols() != q.cols() {
                return Err(Error::invalid(
                    format!("attention {name}"),
                    format!(
                        "[{}, {}] against q's [{}, {}]",
                        t.rows(),
                        t.cols(),
                        q.rows(),
                        q.cols()
                    ),
                ));
            }
        }
        if heads == 0 || !q.cols().is_multiple_of(heads) {
            return Err(Error::invalid(
                "attention heads",
                format!("{heads} heads do not divide {} columns", q.cols()),
            ));
        }
        let seq = rows_per_item("attention input", q.rows(), batch)?;
        let head_dim = q.cols() / heads;
        if !ATTENTION_HEAD_DIMS.contains(&head_dim) {
            return Err(Error::Unsupported {
                what: format!(
                    "attention with head_dim {head_dim} on CUDA (the kernel takes {ATTENTION_HEAD_DIMS:?})"
                ),
            });
        }
        if batch > 65535 || heads > 65535 {
            return Err(Error::Unsupported {
                what: format!(
                    "attention over {batch} batch items of {heads} heads on CUDA (at most 65535 each)"
                ),
            });
        }
        let (b32, s32, h32) = (
            dim32(batch, "attention batch")?,
            dim32(seq, "attention sequence")?,
            dim32(heads, "attention heads")?,
        );
        let stride = dim32(q.cols(), "attention columns")?;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = self.fresh(q.rows(), q.cols())?;
        self.device.bind()?;
        let status = {
            let stream = self.device.stream();
            let (qp, _q) = q.buffer().slice().device_ptr(stream);
            let (kp, _k) = k.buffer().slice().device_ptr(stream);
            let (vp, _v) = v.buffer().slice().device_ptr(stream);
            let (op, _o) = out.buffer_mut().slice_mut().device_ptr_mut(stream);
            // SAFETY: q, k, v and out are live allocations of this context of batch * seq *
            // cols f16 each (shapes checked), with cols = heads * head_dim = row_stride, a
            // multiple of 8 since head_dim is; `out` is a fresh buffer distinct from the
            // inputs; fresh allocations are 256-byte aligned (the kernel needs 16). Enqueued
            // on this context's stream.
            unsafe {
                sys::hp_launch_attention_f16(
                    qp as *const u16,
                    kp as *const u16,
                    vp as *const u16,
                    op as *mut u16,
                    b32,
                    s32,
                    h32,
                    head_dim as i32,
                    stride,
                    scale,
                    self.raw_stream(),
                )
            }
        };
        launch::check_status("hp_launch_attention_f16", status, || {
            format!("batch = {batch}, seq = {seq}, heads = {heads}, head_dim = {head_dim}")
        })?;
        Ok(out)
    }

    fn concat_tokens(
        &self,
        a: &CudaTensorF16,
        b: &CudaTensorF16,
        batch: usize,
    ) -> Result<CudaTensorF16> {
        self.mine(a, "concat_tokens first input")?;
        self.mine(b, "concat_tokens second input")?;
        if a.cols() != b.cols() {
            return Err(Error::invalid(
                "concat_tokens",
                format!("{} columns against {}", a.cols(), b.cols()),
            ));
        }
        let na = rows_per_item("concat_tokens first input", a.rows(), batch)?;
        let nb = rows_per_item("concat_tokens second input", b.rows(), batch)?;
        let d = a.cols();
        let rows = a.rows() + b.rows();
        let mut out = self.fresh(rows, d)?;
        // Each item's rows are contiguous: one copy of `batch` rows of na * d (then nb * d)
        // elements into rows of (na + nb) * d.
        let item = (na + nb) * d;
        self.copy_2d(&mut out, 0, item, a, 0, na * d, batch, na * d)?;
        self.copy_2d(&mut out, na * d, item, b, 0, nb * d, batch, nb * d)?;
        Ok(out)
    }

    fn split_tokens(
        &self,
        x: &CudaTensorF16,
        batch: usize,
        first: usize,
    ) -> Result<(CudaTensorF16, CudaTensorF16)> {
        self.mine(x, "split_tokens input")?;
        let seq = rows_per_item("split_tokens input", x.rows(), batch)?;
        if first == 0 || first >= seq {
            return Err(Error::invalid(
                "split_tokens",
                format!(
                    "{first} leading rows of items of {seq} rows (the CUDA backend needs both parts non-empty)"
                ),
            ));
        }
        let d = x.cols();
        let rest = seq - first;
        let mut a = self.fresh(batch * first, d)?;
        let mut b = self.fresh(batch * rest, d)?;
        self.copy_2d(&mut a, 0, first * d, x, 0, seq * d, batch, first * d)?;
        self.copy_2d(&mut b, 0, rest * d, x, first * d, seq * d, batch, rest * d)?;
        Ok((a, b))
    }

    fn column_chunk(
        &self,
        x: &CudaTensorF16,
        chunks: usize,
        index: usize,
    ) -> Result<CudaTensorF16> {
        self.mine(x, "column_chunk input")?;
        if chunks == 0 || index >= chunks || !x.cols().is_multiple_of(chunks) {
            return Err(Error::invalid(
                "column_chunk",
                format!("chunk {index} of {chunks} of {} columns", x.cols()),
            ));
        }
        let d = x.cols() / chunks;
        let mut out = self.fresh(x.rows(), d)?;
        self.copy_2d(&mut out, 0, d, x, index * d, x.cols(), x.rows(), d)?;
        Ok(out)
    }

    fn conv2d(
        &self,
        x: &CudaTensorF16,
        w: &CudaLinear,
        image: ImageShape,
        kernel: usize,
    ) -> Result<CudaTensorF16> {
        self.mine(x, "conv2d input")?;
        if kernel == 0 || kernel.is_multiple_of(2) || kernel > 15 {
            return Err(Error::invalid(
                "conv2d kernel",
                format!("{kernel} x {kernel} is not an odd square kernel of at most 15"),
            ));
        }
        let taps = kernel * kernel;
        let k = w.k();
        if !k.is_multiple_of(taps) || x.cols() != k / taps {
            return Err(Error::invalid(
                "conv2d weight",
                format!(
                    "K = {k} is not the input's {} channels x {kernel} x {kernel}",
                    x.cols()
                ),
            ));
        }
        let pixels = image.pixels()?;
        if x.rows() != pixels {
            return Err(Error::length(
                format!("conv2d input rows ({image})"),
                pixels,
                x.rows(),
            ));
        }
        if kernel == 1 {
            return self.linear(x, w);
        }
        let (batch, height, width) = (
            dim32(image.batch, "conv2d batch")?,
            dim32(image.height, "conv2d height")?,
            dim32(image.width, "conv2d width")?,
        );
        let channels = dim32(x.cols(), "conv2d channels")?;
        let band = (IM2COL_BAND_ELEMENTS / k).max(1).min(pixels);
        let n = w.n();
        let mut out = None;
        let mut first = 0;
        while first < pixels {
            let rows = band.min(pixels - first);
            let mut cols = self.fresh(rows, k)?;
            self.device.bind()?;
            let status = {
                let stream = self.device.stream();
                let (xp, _x) = x.buffer().slice().device_ptr(stream);
                let (cp, _c) = cols.buffer_mut().slice_mut().device_ptr_mut(stream);
                // SAFETY: x is a live allocation of this context holding pixels * channels
                // f16 (checked above: rows == batch * height * width, cols == channels);
                // cols holds rows * channels * kernel^2 f16, exactly what the launcher
                // writes for output pixels first .. first + rows <= pixels. Enqueued on
                // this context's stream.
                unsafe {
                    sys::hp_launch_im2col_f16(
                        xp as *const u16,
                        cp as *mut u16,
                        batch,
                        height,
                        width,
                        channels,
                        kernel as i32,
                        first as i64,
                        rows as i64,
                        self.raw_stream(),
                    )
                }
            };
            launch::check_status("hp_launch_im2col_f16", status, || {
                format!("{image}, {channels} channels, kernel {kernel}, rows {first}+{rows}")
            })?;
            let y = self.linear(&cols, w)?;
            if rows == pixels {
                return Ok(y);
            }
            let dst = match &mut out {
                Some(dst) => dst,
                None => out.insert(self.fresh(pixels, n)?),
            };
            self.copy_2d(dst, first * n, n, &y, 0, n, rows, n)?;
            first += rows;
        }
        out.ok_or_else(|| Error::invalid("conv2d input", "no pixels"))
    }

    fn group_norm(
        &self,
        x: &CudaTensorF16,
        batch: usize,
        norm: GroupNorm<'_, CudaTensorF16>,
        silu: bool,
    ) -> Result<CudaTensorF16> {
        self.mine(x, "group_norm input")?;
        for (name, t) in [("weight", norm.weight), ("bias", norm.bias)] {
            self.mine(t, &format!("group_norm {name}"))?;
            if t.rows() != 1 || t.cols() != x.cols() {
                return Err(Error::invalid(
                    format!("group_norm {name}"),
                    format!("[{}, {}] is not [1, {}]", t.rows(), t.cols(), x.cols()),
                ));
            }
        }
        if norm.groups == 0 || !x.cols().is_multiple_of(norm.groups) {
            return Err(Error::invalid(
                "group_norm groups",
                format!("{} groups do not divide {} channels", norm.groups, x.cols()),
            ));
        }
        if !norm.eps.is_finite() || norm.eps < 0.0 {
            return Err(Error::invalid(
                "group_norm eps",
                format!("{} is not a finite value >= 0", norm.eps),
            ));
        }
        let pixels = rows_per_item("group_norm input", x.rows(), batch)?;
        let mut y = self.fresh(x.rows(), x.cols())?;
        if pixels == 0 {
            return Ok(y);
        }
        let batch32 = dim32(batch, "group_norm batch")?;
        let channels = dim32(x.cols(), "group_norm channels")?;
        let groups = dim32(norm.groups, "group_norm groups")?;
        self.device.bind()?;
        let status = {
            let stream = self.device.stream();
            let (xp, _x) = x.buffer().slice().device_ptr(stream);
            let (wp, _w) = norm.weight.buffer().slice().device_ptr(stream);
            let (bp, _b) = norm.bias.buffer().slice().device_ptr(stream);
            let (yp, _y) = y.buffer_mut().slice_mut().device_ptr_mut(stream);
            // SAFETY: x and y are distinct live allocations of this context of batch *
            // pixels * channels f16; weight and bias hold channels f16 each (checked
            // above). Enqueued on this context's stream.
            unsafe {
                sys::hp_launch_group_norm_f16(
                    xp as *const u16,
                    wp as *const u16,
                    bp as *const u16,
                    yp as *mut u16,
                    batch32,
                    pixels as i64,
                    channels,
                    groups,
                    norm.eps,
                    i32::from(silu),
                    self.raw_stream(),
                )
            }
        };
        launch::check_status("hp_launch_group_norm_f16", status, || {
            format!("batch {batch}, {pixels} pixels, {channels} channels, {groups} groups")
        })?;
        Ok(y)
    }

    fn upsample_nearest2x(&self, x: &CudaTensorF16, image: ImageShape) -> Result<CudaTensorF16> {
        self.mine(x, "upsample input")?;
        let pixels = image.pixels()?;
        if x.rows() != pixels {
            return Err(Error::length(
                format!("upsample input rows ({image})"),
                pixels,
                x.rows(),
            ));
        }
        let up = image.upsampled2x()?;
        let mut y = self.fresh(up.pixels()?, x.cols())?;
        let (batch, height, width) = (
            dim32(image.batch, "upsample batch")?,
            dim32(image.height, "upsample height")?,
            dim32(image.width, "upsample width")?,
        );
        let channels = dim32(x.cols(), "upsample channels")?;
        self.device.bind()?;
        let status = {
            let stream = self.device.stream();
            let (xp, _x) = x.buffer().slice().device_ptr(stream);
            let (yp, _y) = y.buffer_mut().slice_mut().device_ptr_mut(stream);
            // SAFETY: x is a live allocation of this context of pixels * channels f16 and
            // y one of 4 * pixels * channels f16, the launcher's whole range. Enqueued on
            // this context's stream.
            unsafe {
                sys::hp_launch_upsample_nearest2x_f16(
                    xp as *const u16,
                    yp as *mut u16,
                    batch,
                    height,
                    width,
                    channels,
                    self.raw_stream(),
                )
            }
        };
        launch::check_status("hp_launch_upsample_nearest2x_f16", status, || {
            format!("{image}, {channels} channels")
        })?;
        Ok(y)
    }
}
