//! Elementwise operations and norms on f32 row-major activations `[rows, width]`.
//!
//! Row-wise operations run over rows on the rayon pool; reductions accumulate in f64.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Rows handed to one rayon task by the row-wise operations.
const ROWS_PER_TASK: usize = 16;

fn check_rows(what: &str, data: &[f32], width: usize) -> Result<usize> {
    if width == 0 || !data.len().is_multiple_of(width) {
        return Err(Error::invalid(
            what,
            format!(
                "{} elements are not whole rows of width {width}",
                data.len()
            ),
        ));
    }
    Ok(data.len() / width)
}

/// `out = (x - mean) / sqrt(var + eps)` per row of width `width` (LayerNorm without
/// affine parameters; biased variance, as PyTorch).
pub fn layer_norm(x: &[f32], width: usize, eps: f32, out: &mut [f32]) -> Result<()> {
    check_rows("layer_norm input", x, width)?;
    if out.len() != x.len() {
        return Err(Error::length("layer_norm output", x.len(), out.len()));
    }
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_mut(width).zip(xi.chunks(width)) {
                let mean = xrow.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
                let var = xrow
                    .iter()
                    .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                    .sum::<f64>()
                    / width as f64;
                let inv = 1.0 / (var + eps as f64).sqrt();
                for (ov, &xv) in orow.iter_mut().zip(xrow) {
                    *ov = ((xv as f64 - mean) * inv) as f32;
                }
            }
        });
    Ok(())
}

/// Per-head RMS norm in place: each `head_dim` slice `v` of `x` becomes
/// `v / sqrt(mean(v^2) + eps) * weight`.
pub fn rms_norm_heads(x: &mut [f32], head_dim: usize, weight: &[f32], eps: f32) -> Result<()> {
    check_rows("rms_norm input", x, head_dim)?;
    if weight.len() != head_dim {
        return Err(Error::length("rms_norm weight", head_dim, weight.len()));
    }
    x.par_chunks_mut(head_dim * ROWS_PER_TASK)
        .for_each(|chunk| {
            for v in chunk.chunks_mut(head_dim) {
                let ms = v.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>() / head_dim as f64;
                let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
                for (a, &w) in v.iter_mut().zip(weight) {
                    *a = *a * inv * w;
                }
            }
        });
    Ok(())
}

/// adaLN modulation in place: row `r` of batch item `b = r / rows_per_item` becomes
/// `x * (1 + scale[b]) + shift[b]`; `shift` and `scale` are `[batch, width]`.
pub fn modulate(
    x: &mut [f32],
    width: usize,
    rows_per_item: usize,
    shift: &[f32],
    scale: &[f32],
) -> Result<()> {
    let rows = check_rows("modulate input", x, width)?;
    let batch = check_batch("modulate", rows, rows_per_item)?;
    if shift.len() != batch * width || scale.len() != batch * width {
        return Err(Error::length(
            "modulate shift/scale",
            batch * width,
            shift.len().min(scale.len()),
        ));
    }
    x.par_chunks_mut(width * rows_per_item)
        .enumerate()
        .for_each(|(b, item)| {
            let sh = &shift[b * width..(b + 1) * width];
            let sc = &scale[b * width..(b + 1) * width];
            for row in item.chunks_mut(width) {
                for ((v, &s), &c) in row.iter_mut().zip(sh).zip(sc) {
                    *v = *v * (1.0 + c) + s;
                }
            }
        });
    Ok(())
}

/// Gated residual in place: `x[r] += gate[b] * y[r]` with `b = r / rows_per_item`;
/// `gate` is `[batch, width]`, or `None` for a gate of 1.
pub fn gated_add(
    x: &mut [f32],
    y: &[f32],
    width: usize,
    rows_per_item: usize,
    gate: Option<&[f32]>,
) -> Result<()> {
    let rows = check_rows("gated_add input", x, width)?;
    let batch = check_batch("gated_add", rows, rows_per_item)?;
    if y.len() != x.len() {
        return Err(Error::length("gated_add update", x.len(), y.len()));
    }
    if let Some(g) = gate
        && g.len() != batch * width
    {
        return Err(Error::length("gated_add gate", batch * width, g.len()));
    }
    x.par_chunks_mut(width * rows_per_item)
        .zip(y.par_chunks(width * rows_per_item))
        .enumerate()
        .for_each(|(b, (xi, yi))| match gate {
            Some(g) => {
                let g = &g[b * width..(b + 1) * width];
                for (xr, yr) in xi.chunks_mut(width).zip(yi.chunks(width)) {
                    for ((a, &u), &gv) in xr.iter_mut().zip(yr).zip(g) {
                        *a += gv * u;
                    }
                }
            }
            None => {
                for (a, &u) in xi.iter_mut().zip(yi) {
                    *a += u;
                }
            }
        });
    Ok(())
}

fn check_batch(what: &str, rows: usize, rows_per_item: usize) -> Result<usize> {
    if rows_per_item == 0 || !rows.is_multiple_of(rows_per_item) {
        return Err(Error::invalid(
            what,
            format!("{rows} rows are not whole items of {rows_per_item} rows"),
        ));
    }
    Ok(rows / rows_per_item)
}

/// SiLU `x * sigmoid(x)` of every element, in place.
pub fn silu(x: &mut [f32]) {
    x.par_chunks_mut(4096).for_each(|c| {
        for v in c {
            *v /= 1.0 + (-*v).exp();
        }
    });
}

/// GELU with the tanh approximation, in place:
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh(x: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    x.par_chunks_mut(4096).for_each(|c| {
        for v in c {
            let u = *v;
            *v = 0.5 * u * (1.0 + (C * (u + 0.044_715 * u * u * u)).tanh());
        }
    });
}

/// `x += y` elementwise.
pub fn add_assign(x: &mut [f32], y: &[f32]) -> Result<()> {
    if x.len() != y.len() {
        return Err(Error::length("add_assign operand", x.len(), y.len()));
    }
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
    Ok(())
}
