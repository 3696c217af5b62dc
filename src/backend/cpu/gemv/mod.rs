//! Fused 4-bit dequant-GEMV: `y[M, N] = x[M, K] * W^T (+ bias)` for small `M`, run in
//! place on a [`Q4Weights`] view (for example straight from a package's memory map).
//!
//! The weights are never dequantised into memory. Each kernel decodes 32 codes at a
//! time in registers and multiplies them with the activations:
//!
//! - Each row of `x` is copied once per call into a "nibble order": inside every chunk
//!   of 32 elements the even positions come first, then the odd ones. A chunk of 16
//!   packed bytes then holds, in its low nibbles, the weights for the first 16 permuted
//!   activations and, in its high nibbles, those for the last 16, so no shuffle of the
//!   weights is needed.
//! - Per group `g`, `acc_g = sum_k book[q_k] * x_k` is accumulated in a vector and
//!   folded into the row total with one FMA by the group's scale. The INT4 offset term
//!   `offset_g * sum_{k in g} x_k` uses per-group sums of `x` computed once per call.
//! - Up to four rows of `x` share each decoded chunk; rayon threads split the output
//!   rows `N`.

use rayon::prelude::*;

use super::check::check_linear_args;
use super::path::KernelPath;
use crate::error::Result;
use crate::quant::Q4Weights;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Elements of `K` covered by one chunk of 16 packed bytes.
pub(crate) const CHUNK: usize = 32;
/// Rows of `x` that share one decoded weight chunk.
pub(crate) const M_TILE: usize = 4;
/// Output rows processed per pass over the `x` tiles (keeps them in L1/L2 for `M > 4`).
pub(crate) const N_BLOCK: usize = 8;
/// The group-sum rows of `x` are padded with zeros to a multiple of this many groups,
/// so kernels can read them in full vectors.
pub(crate) const GROUP_PAD: usize = 16;
/// Below this many weights (`N * K`) the whole product runs on the calling thread.
const SERIAL_WEIGHTS: usize = 1 << 18;
/// Smallest number of weights one rayon task handles.
const MIN_TASK_WEIGHTS: usize = 1 << 16;

/// Everything a kernel needs to compute a range of output rows.
pub(crate) struct GemvTask<'a> {
    /// The weights.
    pub w: Q4Weights<'a>,
    /// `x` in the kernel's nibble order, `[M, xstride]`.
    pub xp: &'a [f32],
    /// Row stride of `xp`: `K`, or `K` rounded up to 128 (zero-padded) for the 128-element
    /// layout of the AVX-512 kernel.
    pub xstride: usize,
    /// Per-group sums of `x`, `[M, gstride]`, zero-padded (INT4 only; empty for NF4).
    pub gsum: &'a [f32],
    /// Row stride of `gsum`: groups per row rounded up to [`GROUP_PAD`].
    pub gstride: usize,
    /// Rows of `x`.
    pub m: usize,
    /// Optional bias `[N]`.
    pub bias: Option<&'a [f32]>,
}

/// Computes `y[M, N] = x[M, K] * W^T (+ bias)` with the 4-bit matrix `w` (`[N, K]`) on the
/// SIMD path `path`, using the current rayon pool.
///
/// `x` is `[M, K]` and `y` is `[M, N]`, both f32 row-major; `bias` is `[N]`. Every element
/// of `y` is written. Fails with [`Error::LengthMismatch`](crate::Error::LengthMismatch) when a buffer has the wrong
/// length and with [`Error::Unsupported`](crate::Error::Unsupported) when this CPU cannot run `path`.
/// [`KernelPath::Avx512Vnni`] runs the AVX-512 float kernel.
pub fn gemv_q4(
    path: KernelPath,
    x: &[f32],
    m: usize,
    w: &Q4Weights<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    let (n, k) = (w.n(), w.k());
    check_linear_args(x, m, n, k, bias, y)?;
    path.ensure_available()?;
    if m == 0 {
        return Ok(());
    }

    let layout128 = matches!(path, KernelPath::Avx512 | KernelPath::Avx512Vnni);
    let (xp, xstride) = if layout128 {
        permute_x_128(x, m, k)
    } else {
        (permute_x_32(x), k)
    };
    let (gsum, gstride) = group_sums(x, m, w);
    let task = GemvTask {
        w: *w,
        xp: &xp,
        xstride,
        gsum: &gsum,
        gstride,
        m,
        bias,
    };

    // The kernels write `out[r * M + i]` for output row `r` of their range, so each task
    // owns one contiguous slice. For M = 1 that is `y` itself; otherwise the result is
    // transposed into `y` at the end.
    let mut transposed = if m == 1 {
        Vec::new()
    } else {
        vec![0.0f32; m * n]
    };
    let out: &mut [f32] = if m == 1 { y } else { &mut transposed };

    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || n.saturating_mul(k) < SERIAL_WEIGHTS || n == 1 {
        run_rows(path, &task, 0, out);
    } else {
        let by_balance = n.div_ceil(threads * 4);
        let by_size = MIN_TASK_WEIGHTS.div_ceil(k);
        let rows_per_task = by_balance.max(by_size).max(1);
        out.par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(t, chunk)| run_rows(path, &task, t * rows_per_task, chunk));
    }

    if m > 1 {
        for (r, vals) in transposed.chunks_exact(m).enumerate() {
            for (i, &v) in vals.iter().enumerate() {
                y[i * n + r] = v;
            }
        }
    }
    Ok(())
}

/// The 32-element nibble order: in every chunk of 32, the even positions, then the odd.
fn permute_x_32(x: &[f32]) -> Vec<f32> {
    let mut xp = vec![0.0f32; x.len()];
    for (src, dst) in x.chunks_exact(CHUNK).zip(xp.chunks_exact_mut(CHUNK)) {
        let (even, odd) = dst.split_at_mut(CHUNK / 2);
        for (j, pair) in src.chunks_exact(2).enumerate() {
            even[j] = pair[0];
            odd[j] = pair[1];
        }
    }
    xp
}

/// The 128-element nibble order of the AVX-512 kernel: element `j * 16 + l` of a chunk
/// is `x[8l + j]` of it; rows are zero-padded to a multiple of 128. Returns the rows
/// and their stride.
fn permute_x_128(x: &[f32], m: usize, k: usize) -> (Vec<f32>, usize) {
    const C: usize = 128;
    let stride = k.div_ceil(C) * C;
    let mut xp = vec![0.0f32; m * stride];
    for (src_row, dst_row) in x.chunks_exact(k).zip(xp.chunks_exact_mut(stride)) {
        for (src, dst) in src_row.chunks(C).zip(dst_row.chunks_exact_mut(C)) {
            for (t, &v) in src.iter().enumerate() {
                dst[(t % 8) * 16 + t / 8] = v;
            }
        }
    }
    (xp, stride)
}

/// Per-group sums of each row of `x` (INT4 only, empty for NF4), rows zero-padded to a
/// multiple of [`GROUP_PAD`] groups. Returns the sums and their row stride.
fn group_sums(x: &[f32], m: usize, w: &Q4Weights<'_>) -> (Vec<f32>, usize) {
    let (k, group) = (w.k(), w.group());
    let gstride = w.groups_per_row().div_ceil(GROUP_PAD) * GROUP_PAD;
    if !w.kind().has_offsets() {
        return (Vec::new(), gstride);
    }
    let mut gsum = vec![0.0f32; m * gstride];
    for (xrow, grow) in x.chunks_exact(k).zip(gsum.chunks_exact_mut(gstride)) {
        for (xg, s) in xrow.chunks_exact(group).zip(grow.iter_mut()) {
            *s = sum_lanes(xg);
        }
    }
    (gsum, gstride)
}

/// Sum of a slice whose length is a multiple of 32, in 16 independent lanes.
fn sum_lanes(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for c in v.chunks_exact(16) {
        for (l, &e) in lanes.iter_mut().zip(c) {
            *l += e;
        }
    }
    lanes.iter().sum()
}

/// Runs the kernel of `path` on output rows `n0 .. n0 + out.len() / M`.
fn run_rows(path: KernelPath, task: &GemvTask<'_>, n0: usize, out: &mut [f32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => {
            // SAFETY: `gemv_q4` only dispatches here after `KernelPath::available()`
            // reported AVX2 and FMA on this CPU, the features the kernel enables; the
            // task's buffers were length-checked there.
            unsafe { x86::gemv_rows_avx2(task, n0, out) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 | KernelPath::Avx512Vnni => {
            // SAFETY: as above, AVX-512 F/BW/VL/DQ were reported by
            // `KernelPath::available()` before dispatch.
            unsafe { x86::gemv_rows_avx512(task, n0, out) }
        }
        _ => gemv_rows_portable(task, n0, out),
    }
}

/// Portable kernel: plain Rust over 32-weight chunks that the compiler vectorises.
pub(crate) fn gemv_rows_portable(task: &GemvTask<'_>, n0: usize, out: &mut [f32]) {
    match task.w.kind() {
        crate::quant::Q4Kind::Int4 => portable_rows::<false>(task, n0, out),
        // Codebook kinds (no offsets): decode through the table.
        crate::quant::Q4Kind::Nf4 | crate::quant::Q4Kind::Int4Sym => {
            portable_rows::<true>(task, n0, out)
        }
    }
}

fn portable_rows<const NF4: bool>(task: &GemvTask<'_>, n0: usize, out: &mut [f32]) {
    let m = task.m;
    let rows = out.len() / m;
    let mut nb = 0;
    while nb < rows {
        let nb_end = (nb + N_BLOCK).min(rows);
        let mut i0 = 0;
        while i0 < m {
            let mt = (m - i0).min(M_TILE);
            for r in nb..nb_end {
                let dst = &mut out[r * m + i0..r * m + i0 + mt];
                match mt {
                    1 => portable_row::<1, NF4>(task, n0 + r, i0, dst),
                    2 => portable_row::<2, NF4>(task, n0 + r, i0, dst),
                    3 => portable_row::<3, NF4>(task, n0 + r, i0, dst),
                    _ => portable_row::<4, NF4>(task, n0 + r, i0, dst),
                }
            }
            i0 += mt;
        }
        nb = nb_end;
    }
}

/// Exact f16 -> f32 conversion in plain integer and float arithmetic (inlined, unlike a
/// call that checks for F16C at run time): rebias the exponent by a multiply with
/// `2^112`, which also turns f16 subnormals into the right f32 values; infinities and
/// NaN keep an all-ones exponent.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let mag = h & 0x7fff;
    let shifted = mag << 13;
    let v = if mag > 0x7bff {
        f32::from_bits(shifted | 0x7f80_0000)
    } else {
        f32::from_bits(shifted) * f32::from_bits(0x7780_0000)
    };
    f32::from_bits(v.to_bits() | sign)
}

/// One output row `n` for the `MT` rows of `x` starting at `i0`.
#[inline(always)]
fn portable_row<const MT: usize, const NF4: bool>(
    task: &GemvTask<'_>,
    n: usize,
    i0: usize,
    dst: &mut [f32],
) {
    let w = &task.w;
    let k = w.k();
    let group = w.group();
    let book = w.kind().codebook();
    let packed = w.packed_row(n);
    let scales = w.scales_row(n);
    let xs: [&[f32]; MT] = std::array::from_fn(|i| &task.xp[(i0 + i) * k..(i0 + i + 1) * k]);
    let mut total = [[0.0f32; 16]; MT];
    for (g, (pg, &scale)) in packed.chunks_exact(group / 2).zip(scales).enumerate() {
        let mut acc = [[0.0f32; 16]; MT];
        for (c, bytes) in pg.chunks_exact(CHUNK / 2).enumerate() {
            let mut lo = [0.0f32; 16];
            let mut hi = [0.0f32; 16];
            for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(bytes) {
                if NF4 {
                    *l = book[usize::from(b & 15)];
                    *h = book[usize::from(b >> 4)];
                } else {
                    *l = f32::from(b & 15);
                    *h = f32::from(b >> 4);
                }
            }
            let kk = g * group + c * CHUNK;
            for (a, xr) in acc.iter_mut().zip(&xs) {
                let (xl, xh) = xr[kk..kk + CHUNK].split_at(CHUNK / 2);
                for j in 0..16 {
                    a[j] += lo[j] * xl[j] + hi[j] * xh[j];
                }
            }
        }
        let s = f16_to_f32(scale.to_bits());
        for i in 0..MT {
            for j in 0..16 {
                total[i][j] += s * acc[i][j];
            }
        }
    }
    let bias = task.bias.map_or(0.0, |b| b[n]);
    let offsets = w.offsets_row(n);
    for i in 0..MT {
        let mut y = total[i].iter().sum::<f32>();
        if !offsets.is_empty() {
            let gs = &task.gsum[(i0 + i) * task.gstride..];
            y += offsets
                .iter()
                .zip(gs)
                .map(|(o, s)| f16_to_f32(o.to_bits()) * s)
                .sum::<f32>();
        }
        dst[i] = y + bias;
    }
}

#[cfg(test)]
mod tests {
    use super::f16_to_f32;
    use half::f16;

    #[test]
    fn f16_conversion_is_exact_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}: {got} is not NaN");
            } else {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{bits:#06x}: {got} != {want}"
                );
            }
        }
    }
}
