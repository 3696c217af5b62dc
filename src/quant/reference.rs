//! The `f64` reference ("oracle") that every kernel is tested against.
//!
//! Deliberately plain: one loop per formula, every product and sum in `f64`.

use super::Q4Weights;

/// Dequantises a whole 4-bit matrix to `f64`, row-major `[N, K]`.
pub fn dequantize(w: &Q4Weights<'_>) -> Vec<f64> {
    let (n, k, group) = (w.n(), w.k(), w.group());
    let book = w.kind().codebook();
    let mut out = vec![0.0f64; n * k];
    for row in 0..n {
        let packed = w.packed_row(row);
        let scales = w.scales_row(row);
        let offsets = w.offsets_row(row);
        for col in 0..k {
            let byte = packed[col / 2];
            let code = if col % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            let g = col / group;
            let scale = f64::from(scales[g].to_f32());
            let offset = offsets.get(g).map_or(0.0, |o| f64::from(o.to_f32()));
            out[row * k + col] = scale * f64::from(book[code as usize]) + offset;
        }
    }
    out
}

/// `y[M, N] = x[M, K] * W^T (+ bias)` with `W` given densely as `f64 [N, K]`.
pub fn linear_f64(
    x: &[f32],
    m: usize,
    w: &[f64],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    assert_eq!(x.len(), m * k, "reference: x must be [M, K]");
    assert_eq!(w.len(), n * k, "reference: W must be [N, K]");
    let mut y = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = bias.map_or(0.0, |b| f64::from(b[j]));
            for t in 0..k {
                acc += f64::from(x[i * k + t]) * w[j * k + t];
            }
            y[i * n + j] = acc;
        }
    }
    y
}

/// `sum_k |x[m,k] * W[n,k]| + |bias[n]|` per output: the scale of rounding error a
/// correct f32 kernel may make on `y[m, n]`. Tests bound `|y - reference|` by a small
/// multiple of it, which stays meaningful where `y` itself cancels to near zero.
pub fn linear_magnitude(
    x: &[f32],
    m: usize,
    w: &[f64],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    let absx: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let absw: Vec<f64> = w.iter().map(|v| v.abs()).collect();
    let absb: Option<Vec<f32>> = bias.map(|b| b.iter().map(|v| v.abs()).collect());
    linear_f64(&absx, m, &absw, n, k, absb.as_deref())
}

/// Reference 4-bit linear layer: dequantise in `f64`, then [`linear_f64`].
pub fn linear_q4(x: &[f32], m: usize, w: &Q4Weights<'_>, bias: Option<&[f32]>) -> Vec<f64> {
    linear_f64(x, m, &dequantize(w), w.n(), w.k(), bias)
}
