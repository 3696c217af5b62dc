//! Image ops of the VAE decoder on f32 channels-last activations: an image of `batch`
//! items of `height x width` pixels is a `[batch * height * width, channels]` matrix,
//! one row per pixel in row-major pixel order.
//!
//! - [`conv2d`]: a square, odd, stride-1 "same" convolution as im2col + the linear
//!   kernels, in bands of output pixels so the im2col buffer stays small;
//! - [`group_norm`]: GroupNorm with affine parameters (statistics in f64), optionally
//!   fused with SiLU;
//! - [`upsample_nearest2x`]: nearest-neighbour 2x upsampling.

use rayon::prelude::*;

use super::linear::linear;
use crate::backend::ImageShape;
use crate::error::{Error, Result};
use crate::quant::LinearWeights;

/// Upper bound on the elements of one im2col band (16 MiB of f32).
const IM2COL_BAND_ELEMENTS: usize = 4 << 20;

fn check_image(what: &str, x: &[f32], image: ImageShape, channels: usize) -> Result<usize> {
    let pixels = image.pixels()?;
    let len = pixels
        .checked_mul(channels)
        .ok_or_else(|| Error::invalid(what, "pixels x channels overflows"))?;
    if x.len() != len {
        return Err(Error::length(
            format!("{what} ({image} x {channels} channels)"),
            len,
            x.len(),
        ));
    }
    Ok(pixels)
}

/// Writes the im2col rows of output pixels `first..first + rows` of `x` into `cols`:
/// row `p` holds, for each input channel `c` and kernel tap `(ky, kx)`, the input at
/// `(y + ky - pad, x + kx - pad)` (zero outside), at column `(c * kernel + ky) * kernel
/// + kx`: the order of a PyTorch `[out, in, kh, kw]` weight flattened to `[out, in *
///   kh * kw]`.
fn im2col_band(
    x: &[f32],
    image: ImageShape,
    channels: usize,
    kernel: usize,
    first: usize,
    cols: &mut [f32],
) {
    let taps = kernel * kernel;
    let width = channels * taps;
    let pad = (kernel / 2) as isize;
    let (h, w) = (image.height as isize, image.width as isize);
    let per_item = image.height * image.width;
    cols.par_chunks_mut(width).enumerate().for_each(|(i, row)| {
        let p = first + i;
        let (item, pixel) = (p / per_item, p % per_item);
        let (py, px) = (
            (pixel / image.width) as isize,
            (pixel % image.width) as isize,
        );
        let base = item * per_item;
        for ky in 0..kernel {
            let sy = py + ky as isize - pad;
            for kx in 0..kernel {
                let sx = px + kx as isize - pad;
                let tap = ky * kernel + kx;
                if sy < 0 || sy >= h || sx < 0 || sx >= w {
                    for c in 0..channels {
                        row[c * taps + tap] = 0.0;
                    }
                } else {
                    let src = (base + (sy * w + sx) as usize) * channels;
                    for (c, &v) in x[src..src + channels].iter().enumerate() {
                        row[c * taps + tap] = v;
                    }
                }
            }
        }
    });
}

/// `y = conv2d(x, w) (+ bias)`: `x` is `[pixels, in]` channels-last, `w` the `[out, in *
/// kernel * kernel]` weight (PyTorch's `[out, in, kernel, kernel]` flattened), stride
/// 1 and zero padding `kernel / 2`, so `y` is `[pixels, out]`. A 1 x 1 kernel is the
/// linear layer itself.
pub fn conv2d(
    x: &[f32],
    image: ImageShape,
    kernel: usize,
    w: &LinearWeights<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    if kernel == 0 || kernel.is_multiple_of(2) {
        return Err(Error::invalid(
            "conv2d kernel",
            format!("{kernel} x {kernel} is not an odd square kernel"),
        ));
    }
    let taps = kernel * kernel;
    if !w.k().is_multiple_of(taps) {
        return Err(Error::invalid(
            "conv2d weight",
            format!("K = {} is not input channels x {kernel} x {kernel}", w.k()),
        ));
    }
    let channels = w.k() / taps;
    let pixels = check_image("conv2d input", x, image, channels)?;
    if y.len() != pixels * w.n() {
        return Err(Error::length("conv2d output", pixels * w.n(), y.len()));
    }
    if kernel == 1 {
        return linear(x, pixels, w, bias, y);
    }
    let band = (IM2COL_BAND_ELEMENTS / w.k()).max(1).min(pixels.max(1));
    let mut cols = vec![0.0f32; band * w.k()];
    let mut first = 0;
    while first < pixels {
        let rows = band.min(pixels - first);
        let cols = &mut cols[..rows * w.k()];
        im2col_band(x, image, channels, kernel, first, cols);
        linear(
            cols,
            rows,
            w,
            bias,
            &mut y[first * w.n()..(first + rows) * w.n()],
        )?;
        first += rows;
    }
    Ok(())
}

/// GroupNorm of a channels-last image: the channels of each batch item split into
/// `groups` equal groups, each normalised over its pixels and channels (biased
/// variance, `eps` inside the square root), then `* weight[c] + bias[c]`, then SiLU
/// when `silu`. Statistics accumulate in f64.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    batch: usize,
    channels: usize,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    silu: bool,
    out: &mut [f32],
) -> Result<()> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(Error::invalid(
            "group_norm groups",
            format!("{groups} groups do not divide {channels} channels"),
        ));
    }
    if weight.len() != channels || bias.len() != channels {
        return Err(Error::length(
            "group_norm weight/bias",
            channels,
            weight.len().min(bias.len()),
        ));
    }
    if batch == 0 || !x.len().is_multiple_of(batch * channels) {
        return Err(Error::invalid(
            "group_norm input",
            format!(
                "{} elements are not {batch} items of {channels}-channel pixels",
                x.len()
            ),
        ));
    }
    if out.len() != x.len() {
        return Err(Error::length("group_norm output", x.len(), out.len()));
    }
    let per_item = x.len() / batch;
    if per_item == 0 {
        return Ok(());
    }
    let group_width = channels / groups;
    // (mean, 1 / std) per item and group.
    let stats: Vec<(f64, f64)> = (0..batch * groups)
        .into_par_iter()
        .map(|bg| {
            let (b, g) = (bg / groups, bg % groups);
            let item = &x[b * per_item..(b + 1) * per_item];
            let (mut sum, mut sq) = (0.0f64, 0.0f64);
            for pixel in item.chunks(channels) {
                for &v in &pixel[g * group_width..(g + 1) * group_width] {
                    sum += v as f64;
                    sq += (v as f64) * (v as f64);
                }
            }
            let count = (per_item / channels * group_width) as f64;
            let mean = sum / count;
            let var = (sq / count - mean * mean).max(0.0);
            (mean, 1.0 / (var + eps as f64).sqrt())
        })
        .collect();
    out.par_chunks_mut(channels)
        .zip(x.par_chunks(channels))
        .enumerate()
        .for_each(|(p, (orow, xrow))| {
            let b = p * channels / per_item;
            for (c, (o, &v)) in orow.iter_mut().zip(xrow).enumerate() {
                let (mean, inv) = stats[b * groups + c / group_width];
                let n = ((v as f64 - mean) * inv) as f32 * weight[c] + bias[c];
                *o = if silu { n / (1.0 + (-n).exp()) } else { n };
            }
        });
    Ok(())
}

/// Nearest-neighbour 2x upsampling of a channels-last image: output pixel `(y, x)` is
/// input pixel `(y / 2, x / 2)`.
pub fn upsample_nearest2x(
    x: &[f32],
    image: ImageShape,
    channels: usize,
    out: &mut [f32],
) -> Result<()> {
    check_image("upsample input", x, image, channels)?;
    let up = image.upsampled2x()?;
    check_image("upsample output", out, up, channels)?;
    let out_row = up.width * channels;
    out.par_chunks_mut(out_row)
        .enumerate()
        .for_each(|(r, orow)| {
            let (item, oy) = (r / up.height, r % up.height);
            let src_row = (item * image.height + oy / 2) * image.width * channels;
            for (ox, pixel) in orow.chunks_mut(channels).enumerate() {
                let src = src_row + (ox / 2) * channels;
                pixel.copy_from_slice(&x[src..src + channels]);
            }
        });
    Ok(())
}
