//! NF4 round-to-nearest quantisation into the canonical [`Q4Kind::Nf4`] layout.
//!
//! Each block of `B` consecutive weights along `K` stores its absmax as f16 in
//! `scales` (no offsets), and each weight the code of the [`NF4_CODEBOOK`] level
//! nearest to `w / absmax`. As in bitsandbytes, the nearest level is found by comparing
//! against the midpoints between neighbouring levels (a value exactly on a midpoint
//! takes the lower level). The absmax is rounded to f16 first and the codes are chosen
//! with the rounded value, so the dequantised weights are the ones that were optimised.
//! An all-zero block gets absmax `0` and the code of level `0.0`.

use half::f16;
use rayon::prelude::*;

use super::{NF4_CODEBOOK, Q4Kind, Q4Matrix, check_q4_dims, check_weight_len};
use crate::error::{Error, Result};

/// The NF4 block size used when the caller has no preference (bitsandbytes' default).
pub const NF4_DEFAULT_BLOCK: usize = 64;

/// The code of level `0.0` in [`NF4_CODEBOOK`].
const NF4_ZERO_CODE: u8 = 7;

/// Midpoints between neighbouring NF4 levels: a value's code is the number of
/// midpoints strictly below it.
pub const NF4_MIDPOINTS: [f32; 15] = {
    let mut m = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = 0.5 * (NF4_CODEBOOK[i] + NF4_CODEBOOK[i + 1]);
        i += 1;
    }
    m
};

/// The code of the NF4 level nearest to `x` (a weight divided by its block's absmax).
#[inline]
pub fn nf4_code(x: f32) -> u8 {
    // Fifteen comparisons, no branches on data: count the midpoints below x.
    NF4_MIDPOINTS.iter().map(|&m| u8::from(x > m)).sum()
}

/// Why one row could not be quantised (positions within the row).
enum RowError {
    NonFinite { col: usize, value: f32 },
    F16Overflow { block: usize, absmax: f32 },
}

impl RowError {
    fn into_error(self, row: Option<usize>) -> Error {
        let at_row = row.map_or(String::new(), |r| format!("row {r}, "));
        match self {
            RowError::NonFinite { col, value } => Error::invalid(
                "weights",
                format!("non-finite value {value} at {at_row}column {col}"),
            ),
            RowError::F16Overflow { block, absmax } => Error::invalid(
                "weights",
                format!("{at_row}block {block} has absmax {absmax}, which overflows f16"),
            ),
        }
    }
}

fn quantize_row_unchecked(
    row: &[f32],
    block: usize,
    packed: &mut [u8],
    absmax_out: &mut [f16],
) -> std::result::Result<(), RowError> {
    if let Some((col, &value)) = row.iter().enumerate().find(|(_, w)| !w.is_finite()) {
        return Err(RowError::NonFinite { col, value });
    }
    for (bi, ((blk, packed), absmax)) in row
        .chunks_exact(block)
        .zip(packed.chunks_exact_mut(block / 2))
        .zip(absmax_out.iter_mut())
        .enumerate()
    {
        let amax = blk.iter().fold(0.0f32, |m, &w| m.max(w.abs()));
        let a16 = f16::from_f32(amax);
        let a = a16.to_f32();
        if !a.is_finite() {
            return Err(RowError::F16Overflow {
                block: bi,
                absmax: amax,
            });
        }
        *absmax = a16;
        if a == 0.0 {
            packed.fill(NF4_ZERO_CODE | (NF4_ZERO_CODE << 4));
            continue;
        }
        for (byte, pair) in packed.iter_mut().zip(blk.chunks_exact(2)) {
            *byte = nf4_code(pair[0] / a) | (nf4_code(pair[1] / a) << 4);
        }
    }
    Ok(())
}

/// Quantises one row of `K` weights to NF4: `K/2` packed bytes (low nibble first) and
/// `K/block` f16 absmax values. For streaming a matrix row by row; errors name the
/// column (or block) within the row.
pub fn quantize_nf4_row(
    row: &[f32],
    block: usize,
    packed_out: &mut [u8],
    absmax_out: &mut [f16],
) -> Result<()> {
    let k = row.len();
    check_q4_dims(Q4Kind::Nf4, "weights", k, block)?;
    if packed_out.len() != k / 2 {
        return Err(Error::length("packed 4-bit codes", k / 2, packed_out.len()));
    }
    if absmax_out.len() != k / block {
        return Err(Error::length("absmax", k / block, absmax_out.len()));
    }
    quantize_row_unchecked(row, block, packed_out, absmax_out).map_err(|e| e.into_error(None))
}

/// Quantises a row-major `W [N, K]` to NF4 with per-block absmax (`block` in 32, 64,
/// 128), rows in parallel.
///
/// Errors: [`Error::InvalidGroupSize`] / [`Error::GroupDoesNotDivide`] for a bad block,
/// [`Error::LengthMismatch`] if `w.len() != n * k`, [`Error::InvalidArgument`] for
/// `n == 0`, a NaN/infinite weight (naming its row and column) or an absmax that
/// overflows f16.
pub fn quantize_nf4(w: &[f32], n: usize, k: usize, block: usize) -> Result<Q4Matrix> {
    check_q4_dims(Q4Kind::Nf4, "weights", k, block)?;
    check_weight_len(w, n, k)?;
    let bpr = k / block;
    let mut packed = vec![0u8; n * (k / 2)];
    let mut scales = vec![f16::ZERO; n * bpr];
    let failure = w
        .par_chunks_exact(k)
        .zip(packed.par_chunks_exact_mut(k / 2))
        .zip(scales.par_chunks_exact_mut(bpr))
        .enumerate()
        .with_min_len(4)
        .find_map_first(|(r, ((row, p), s))| {
            quantize_row_unchecked(row, block, p, s)
                .err()
                .map(|e| e.into_error(Some(r)))
        });
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Q4Matrix {
        kind: Q4Kind::Nf4,
        n,
        k,
        group: block,
        packed,
        scales,
        offsets: Vec::new(),
    })
}
