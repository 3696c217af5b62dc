//! The CPU linear layer `y[M, N] = x[M, K] * W^T (+ bias)` for every weight storage.

use super::check::check_linear_args;
use super::panel::{self, HalfRows, Q4Rows};
use super::{KernelPath, gemv};
use crate::error::Result;
use crate::quant::{DenseData, LinearWeights};

/// Largest M that 4-bit layers run through the fused GEMV kernels: they decode each
/// weight once per 4 rows of x in registers, which wins while the layer is bound by
/// reading the weights; above it the decoded-tile GEMM reuses each weight M times.
pub const GEMV_MAX_M: usize = 8;

/// `y[M, N] = x[M, K] * W^T (+ bias)` on the CPU with the current rayon pool's threads
/// and the fastest SIMD path of this CPU ([`KernelPath::detect`]).
///
/// Dense f32 weights go straight to the `gemm` crate. 4-bit weights run through the fused
/// dequant-GEMV kernels up to [`GEMV_MAX_M`] rows; above that, and for f16/bf16 weights,
/// they are decoded panel by panel into cache-resident f32 tiles (never the whole
/// matrix) that the `gemm` crate multiplies.
pub fn linear(
    x: &[f32],
    m: usize,
    w: &LinearWeights<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    linear_with_path(KernelPath::detect(), x, m, w, bias, y)
}

/// [`linear`] on an explicit SIMD path; [`crate::Error::Unsupported`] if this CPU lacks it.
pub fn linear_with_path(
    path: KernelPath,
    x: &[f32],
    m: usize,
    w: &LinearWeights<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    path.ensure_available()?;
    let (n, k) = (w.n(), w.k());
    check_linear_args(x, m, n, k, bias, y)?;
    if m == 0 {
        return Ok(());
    }
    match *w {
        LinearWeights::Dense {
            data: DenseData::F32(data),
            ..
        } => dense_f32(x, m, data, n, k, bias, y),
        LinearWeights::Dense {
            data: DenseData::F16(data),
            ..
        } => half_linear(x, m, &HalfRows { data, n, k }, bias, y),
        LinearWeights::Dense {
            data: DenseData::Bf16(data),
            ..
        } => half_linear(x, m, &HalfRows { data, n, k }, bias, y),
        LinearWeights::Q4(w) if m <= GEMV_MAX_M => return gemv::gemv_q4(path, x, m, &w, bias, y),
        LinearWeights::Q4(w) => panel::linear_by_panels(x, m, &Q4Rows { w, path }, bias, y),
    }
    Ok(())
}

/// f16/bf16 weights: row by row while reading the weights dominates, decoded tiles above.
fn half_linear(
    x: &[f32],
    m: usize,
    w: &dyn panel::DecodeRows,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    if m <= GEMV_MAX_M {
        panel::linear_by_rows(x, m, w, bias, y)
    } else {
        panel::linear_by_panels(x, m, w, bias, y)
    }
}

/// Dense f32 linear layer through the `gemm` crate (lengths already checked).
fn dense_f32(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    panel::init_output(y, n, bias);
    // SAFETY: x is [M, K], w is [N, K] read as W^T [K, N] through its strides, y is
    // [M, N]; all lengths were checked by `check_linear_args` and `LinearWeights::dense`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}
