//! The 2D sin-cos positional table of diffusers' `PatchEmbed`, computed exactly as
//! diffusers computes it, so that a package can omit the stored table when a
//! checkpoint's table is this one.
//!
//! diffusers (`get_2d_sincos_pos_embed(D, grid, base_size, interpolation_scale=1)`,
//! with `base_size = sample_size // patch_size`):
//!
//! - positions `p_i = f32(i) / f32(grid / base_size)` for `i` in `0..grid`, in f32;
//! - frequencies `omega_j = 1 / 10000^(j / (D/4))` for `j` in `0..D/4`, in f64;
//! - the row of patch (row `r`, column `c`), index `r * grid + c`, is
//!   `[sin(p_c omega) | cos(p_c omega) | sin(p_r omega) | cos(p_r omega)]`, each block
//!   `D/4` wide, every product, sine and cosine in f64;
//! - the f64 table is rounded to f32 (`.float()`), then to the checkpoint's dtype.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::Dtype;

/// Checks the table's sizes: `grid, base_size >= 1`, `dim` a positive multiple of 4,
/// and `grid * grid * dim` addressable.
fn check_dims(grid: usize, base_size: usize, dim: usize) -> Result<usize> {
    if grid == 0 || base_size == 0 {
        return Err(Error::invalid(
            "sin-cos table",
            format!("grid ({grid}) and base_size ({base_size}) must be at least 1"),
        ));
    }
    if dim == 0 || !dim.is_multiple_of(4) {
        return Err(Error::invalid(
            "sin-cos table",
            format!("width {dim} must be a positive multiple of 4"),
        ));
    }
    grid.checked_mul(grid)
        .and_then(|g2| g2.checked_mul(dim))
        .ok_or_else(|| Error::invalid("sin-cos table", "grid * grid * width overflows"))
}

/// The 1D half-table `[grid, D/2]`: `[sin(p_i omega) | cos(p_i omega)]` per position,
/// in f64.
fn half_table(grid: usize, base_size: usize, dim: usize) -> Vec<f64> {
    half_rows(grid, base_size, dim, 0, grid)
}

/// Rows `first..first + count` of the 1D half-table (`[count, D/2]`, f64); each row
/// depends only on its own position, so these are exactly the full half-table's rows.
fn half_rows(grid: usize, base_size: usize, dim: usize, first: usize, count: usize) -> Vec<f64> {
    let quarter = dim / 4;
    // Python computes `grid / base_size` in f64; torch divides the f32 positions by it
    // in f32. (Rounding the f64 quotient instead gives the same f32: double rounding of
    // a division is harmless from f64 to f32.)
    let div = (grid as f64 / base_size as f64) as f32;
    let omega: Vec<f64> = (0..quarter)
        .map(|j| 1.0 / 10000f64.powf(j as f64 / quarter as f64))
        .collect();
    let mut out = vec![0.0f64; count * 2 * quarter];
    for (i, row) in out.chunks_exact_mut(2 * quarter).enumerate() {
        let p = f64::from((first + i) as f32 / div);
        let (sin, cos) = row.split_at_mut(quarter);
        for ((s, c), &om) in sin.iter_mut().zip(cos.iter_mut()).zip(&omega) {
            let a = p * om;
            *s = a.sin();
            *c = a.cos();
        }
    }
    out
}

/// The table `[grid * grid, dim]` rounded from f64 to f32, as diffusers registers it.
pub fn sincos_2d_f32(grid: usize, base_size: usize, dim: usize) -> Result<Vec<f32>> {
    let len = check_dims(grid, base_size, dim)?;
    let half = half_table(grid, base_size, dim);
    let hw = dim / 2;
    let mut out = vec![0.0f32; len];
    out.par_chunks_exact_mut(dim)
        .enumerate()
        .for_each(|(idx, row)| {
            let (r, c) = (idx / grid, idx % grid);
            let (first, second) = row.split_at_mut(hw);
            for (o, &v) in first.iter_mut().zip(&half[c * hw..(c + 1) * hw]) {
                *o = v as f32;
            }
            for (o, &v) in second.iter_mut().zip(&half[r * hw..(r + 1) * hw]) {
                *o = v as f32;
            }
        });
    Ok(out)
}

/// `v` rounded to the float `dtype` and widened back to f32; `None` for U8.
pub fn round_value(v: f32, dtype: Dtype) -> Option<f32> {
    match dtype {
        Dtype::F32 => Some(v),
        Dtype::F16 => Some(f16::from_f32(v).to_f32()),
        Dtype::Bf16 => Some(bf16::from_f32(v).to_f32()),
        Dtype::U8 => None,
    }
}

/// Rounds f32 values to `dtype` and back, in place (a no-op for F32).
pub fn round_through(values: &mut [f32], dtype: Dtype) -> Result<()> {
    if round_value(0.0, dtype).is_none() {
        return Err(Error::invalid(
            "sin-cos table",
            "dtype U8 is not a float type",
        ));
    }
    values
        .par_iter_mut()
        .for_each(|v| *v = round_value(*v, dtype).unwrap_or(*v));
    Ok(())
}

/// The table as a model uses it: f64, rounded to f32, then to each dtype of `chain` in
/// order (the checkpoint's dtype, then the package's), returned as f32.
pub fn sincos_2d_table(
    grid: usize,
    base_size: usize,
    dim: usize,
    chain: &[Dtype],
) -> Result<Vec<f32>> {
    let mut t = sincos_2d_f32(grid, base_size, dim)?;
    for &d in chain {
        round_through(&mut t, d)?;
    }
    Ok(t)
}

/// Rows of a centre (or any) crop of the table, as a model uses it: grid rows
/// `top..top + height` by grid columns `left..left + width`, in row-major order
/// (`[height * width, dim]`), rounded like [`sincos_2d_table`] through `chain`.
/// Bit-identical to the corresponding rows of the full table, at the cost of the crop
/// alone. Errors: the sizes [`sincos_2d_table`] rejects, a crop outside the grid, a
/// U8 dtype in `chain`.
#[allow(clippy::too_many_arguments)]
pub fn sincos_2d_crop(
    grid: usize,
    base_size: usize,
    dim: usize,
    chain: &[Dtype],
    top: usize,
    left: usize,
    height: usize,
    width: usize,
) -> Result<Vec<f32>> {
    check_dims(grid, base_size, dim)?;
    let inside = |start: usize, len: usize| start.checked_add(len).is_some_and(|e| e <= grid);
    if !inside(top, height) || !inside(left, width) {
        return Err(Error::invalid(
            "sin-cos table",
            format!(
                "crop of {height} x {width} at ({top}, {left}) is outside the {grid} x {grid} grid"
            ),
        ));
    }
    if chain.iter().any(|&d| round_value(0.0, d).is_none()) {
        return Err(Error::invalid(
            "sin-cos table",
            "dtype U8 is not a float type",
        ));
    }
    let hw = dim / 2;
    // One span of positions covers both the crop's rows and its columns (for a centre
    // crop they overlap), so the half-table rows are computed once each.
    let first = top.min(left);
    let last = (top + height).max(left + width);
    // Rounded once per position rather than once per output element: an element's
    // value is its half-table value rounded, whichever crop row it lands in.
    let half: Vec<f32> = half_rows(grid, base_size, dim, first, last - first)
        .into_iter()
        .map(|v| {
            let mut x = v as f32;
            for &d in chain {
                x = round_value(x, d).unwrap_or(x);
            }
            x
        })
        .collect();
    let mut out = vec![0.0f32; height * width * dim];
    if width == 0 {
        return Ok(out);
    }
    out.par_chunks_exact_mut(dim)
        .enumerate()
        .for_each(|(idx, row)| {
            let (r, c) = (top + idx / width - first, left + idx % width - first);
            let (cols, rows) = row.split_at_mut(hw);
            cols.copy_from_slice(&half[c * hw..(c + 1) * hw]);
            rows.copy_from_slice(&half[r * hw..(r + 1) * hw]);
        });
    Ok(out)
}
