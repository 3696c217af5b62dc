//! INT4 round-to-nearest quantisation into the canonical [`Q4Kind::Int4`] (asymmetric)
//! and [`Q4Kind::Int4Sym`] (symmetric) layouts.
//!
//! Each group of `G` consecutive weights along `K` gets an f16 `scale`, and in the
//! asymmetric kind an f16 `offset`, with `w ~= scale * q + offset`, `q` in `0..=15`.
//!
//! - Asymmetric ([`Q4Kind::Int4`]): `offset = f16(min)`, `scale = f16((max - offset) /
//!   15)`, so the 16 levels span the group's range.
//! - Symmetric ([`Q4Kind::Int4Sym`]): no stored offset, `w = scale * (q - 8)` (the same
//!   values as an offset of `-8 * scale`), levels `-8s, -7s, ..., 7s`. The scale is the
//!   smallest one that brings both ends of the group within half a step of a level:
//!   `scale = max(max(w, 0) / 7.5, -min(w, 0) / 8.5)`. This uses the one extra negative
//!   level instead of wasting it, and bounds the error by `scale / 2 <= absmax / 15`
//!   (a plain `absmax / 7` or `absmax / 8` gives `absmax / 14` or `absmax / 8`).
//!
//! The scale and offset are rounded to f16 *before* the codes are chosen, and the codes
//! are chosen with the rounded values, so the dequantised weights are the ones the
//! quantiser optimised. A group whose range, measured from the rounded offset, is zero
//! or below the smallest f16 step gets `scale = 0` and every code `0`, so it
//! dequantises to `offset`; a constant group thus comes back as its f16-rounded value
//! or closer (exactly when the value is an f16).
//!
//! With [`Int4Options::clip_search`] each group also tries narrower ranges and keeps
//! the one with the smallest squared dequantisation error (measured with the f16
//! parameters that would be stored). The unclipped range is always a candidate and wins
//! ties, so the search never does worse than plain round-to-nearest:
//!
//! - asymmetric: the low end is raised by `a * range` and the high end lowered by
//!   `b * range`, for every pair `a, b` in [`ASYM_CLIP_FRACTIONS`] (one-sided and
//!   two-sided clipping);
//! - symmetric: the scale is multiplied by each factor in [`SYM_CLIP_FACTORS`].

use half::f16;
use rayon::prelude::*;

use super::{Q4Kind, Q4Matrix, check_q4_dims, check_weight_len};
use crate::error::{Error, Result};

/// Fractions of a group's range by which the asymmetric clip search may move each end
/// inward; every pair (low, high) is tried. `0.0` first, so plain RTN wins ties.
pub const ASYM_CLIP_FRACTIONS: [f32; 9] = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5];

/// Factors by which the symmetric clip search shrinks the scale. `1.0` first, so plain
/// RTN wins ties.
pub const SYM_CLIP_FACTORS: [f32; 21] = [
    1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 0.775, 0.75, 0.725, 0.7, 0.675, 0.65,
    0.625, 0.6, 0.575, 0.55, 0.525, 0.5,
];

/// Settings of the INT4 quantiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Int4Options {
    /// Group size along K: 32, 64 or 128.
    pub group: usize,
    /// Symmetric groups (scale only, [`Q4Kind::Int4Sym`], `w = scale * (q - 8)`)
    /// instead of asymmetric min/max groups with an offset ([`Q4Kind::Int4`]).
    pub symmetric: bool,
    /// Search per group for a clipped range with a smaller squared error.
    pub clip_search: bool,
}

impl Default for Int4Options {
    /// Group 64, asymmetric, no clip search.
    fn default() -> Self {
        Int4Options {
            group: 64,
            symmetric: false,
            clip_search: false,
        }
    }
}

/// Why one row could not be quantised (positions are within the row).
enum RowError {
    /// A NaN or infinite weight.
    NonFinite { col: usize, value: f32 },
    /// The group's scale or offset does not fit in f16.
    F16Overflow { group: usize, lo: f32, hi: f32 },
}

impl RowError {
    fn into_error(self, row: Option<usize>) -> Error {
        let at_row = row.map_or(String::new(), |r| format!("row {r}, "));
        match self {
            RowError::NonFinite { col, value } => Error::invalid(
                "weights",
                format!("non-finite value {value} at {at_row}column {col}"),
            ),
            RowError::F16Overflow { group, lo, hi } => Error::invalid(
                "weights",
                format!(
                    "{at_row}group {group} spans [{lo}, {hi}]: its scale or offset overflows f16"
                ),
            ),
        }
    }
}

/// The f16 parameters of one group and the f32 values the codes are chosen with.
#[derive(Clone, Copy)]
struct GroupParams {
    scale: f16,
    offset: f16,
}

impl GroupParams {
    /// Asymmetric parameters covering `[lo, hi]`; `None` if they do not fit in f16.
    fn asymmetric(lo: f32, hi: f32) -> Option<Self> {
        let offset = f16::from_f32(lo);
        let o = offset.to_f32();
        if !o.is_finite() {
            return None;
        }
        // Measure the range from the rounded offset, so the top level lands on `hi`.
        let scale = f16::from_f32(((hi - o) / 15.0).max(0.0));
        if !scale.to_f32().is_finite() {
            return None;
        }
        Some(GroupParams { scale, offset })
    }

    /// Symmetric parameters for scale `s`; `None` if `s` or `-8 s` does not fit in f16.
    fn symmetric(s: f32) -> Option<Self> {
        let scale = f16::from_f32(s.max(0.0));
        // `-8 * scale` is exact in f16 unless it overflows. Codes are chosen with this
        // offset; `s * q + o` equals the symmetric kind's `s * (q - 8)` exactly in f32
        // (both are small integer multiples of the f16 `s`).
        let offset = f16::from_f32(-8.0 * scale.to_f32());
        if !offset.to_f32().is_finite() {
            return None;
        }
        Some(GroupParams { scale, offset })
    }

    /// The code nearest to `w` and `w`'s dequantised value, with the stored parameters.
    #[inline]
    fn encode(self, s: f32, inv_s: f32, o: f32, w: f32) -> (u8, f32) {
        // Clamp first, then round half up by truncation: for values in [0, 15] this is
        // round-to-nearest, and it avoids a libm `roundf` call on baseline x86-64.
        // With s == 0 (and inv_s == 0) it gives code 0 and the value `o`, branch-free.
        let q = (((w - o) * inv_s).clamp(0.0, 15.0) + 0.5) as u8;
        // Same arithmetic as the dequantiser: one multiply, one add, in f32.
        (q, s * f32::from(q) + o)
    }

    /// Squared dequantisation error of `group` (a multiple of 8 long) in f32, eight
    /// lanes at a time: the fast measure the clip search ranks candidates by.
    fn squared_error_f32(self, group: &[f32]) -> f32 {
        let (s, o) = (self.scale.to_f32(), self.offset.to_f32());
        let inv_s = if s == 0.0 { 0.0 } else { 1.0 / s };
        let mut acc = [0.0f32; 8];
        for chunk in group.chunks_exact(8) {
            for (a, &w) in acc.iter_mut().zip(chunk) {
                let (_, d) = self.encode(s, inv_s, o, w);
                let e = d - w;
                *a += e * e;
            }
        }
        acc.iter().sum()
    }

    /// Squared dequantisation error of `group` under these parameters, in f64.
    fn squared_error(self, group: &[f32]) -> f64 {
        let (s, o) = (self.scale.to_f32(), self.offset.to_f32());
        let inv_s = if s == 0.0 { 0.0 } else { 1.0 / s };
        group
            .iter()
            .map(|&w| {
                let (_, d) = self.encode(s, inv_s, o, w);
                let e = f64::from(d) - f64::from(w);
                e * e
            })
            .sum()
    }
}

/// Chooses the parameters of one group (already checked finite).
fn choose_params(group: &[f32], opts: &Int4Options) -> Option<GroupParams> {
    let (lo, hi) = group
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &w| {
            (lo.min(w), hi.max(w))
        });
    let base = if opts.symmetric {
        GroupParams::symmetric(symmetric_scale(lo, hi))?
    } else {
        GroupParams::asymmetric(lo, hi)?
    };
    if !opts.clip_search || base.scale.to_f32() == 0.0 {
        return Some(base);
    }
    let mut best = base;
    let mut best_err = base.squared_error_f32(group);
    let mut consider = |cand: Option<GroupParams>| {
        if let Some(c) = cand {
            let err = c.squared_error_f32(group);
            if err < best_err {
                best = c;
                best_err = err;
            }
        }
    };
    if opts.symmetric {
        let s0 = symmetric_scale(lo, hi);
        for &f in &SYM_CLIP_FACTORS[1..] {
            consider(GroupParams::symmetric(s0 * f));
        }
    } else {
        let range = hi - lo;
        for &a in &ASYM_CLIP_FRACTIONS {
            for &b in &ASYM_CLIP_FRACTIONS {
                if a == 0.0 && b == 0.0 {
                    continue;
                }
                let (l, h) = (lo + a * range, hi - b * range);
                if l < h {
                    consider(GroupParams::asymmetric(l, h));
                }
            }
        }
    }
    // The ranking above is in f32; confirm the winner in f64 so that the search can
    // never end worse than plain round-to-nearest.
    let changed = best.scale != base.scale || best.offset != base.offset;
    if changed && best.squared_error(group) >= base.squared_error(group) {
        best = base;
    }
    Some(best)
}

/// The symmetric scale that brings both `lo` and `hi` within half a step of a level of
/// `-8s..=7s`.
fn symmetric_scale(lo: f32, hi: f32) -> f32 {
    (hi.max(0.0) / 7.5).max(-lo.min(0.0) / 8.5)
}

/// Quantises one row without checking buffer lengths (the callers do). `offsets` is
/// empty for symmetric groups, which store none.
fn quantize_row_unchecked(
    row: &[f32],
    opts: &Int4Options,
    packed: &mut [u8],
    scales: &mut [f16],
    offsets: &mut [f16],
) -> std::result::Result<(), RowError> {
    if let Some((col, &value)) = row.iter().enumerate().find(|(_, w)| !w.is_finite()) {
        return Err(RowError::NonFinite { col, value });
    }
    let g = opts.group;
    for (gi, ((group, packed), scale)) in row
        .chunks_exact(g)
        .zip(packed.chunks_exact_mut(g / 2))
        .zip(scales.iter_mut())
        .enumerate()
    {
        let params = choose_params(group, opts).ok_or_else(|| {
            let lo = group.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            RowError::F16Overflow { group: gi, lo, hi }
        })?;
        *scale = params.scale;
        if let Some(offset) = offsets.get_mut(gi) {
            *offset = params.offset;
        }
        let (s, o) = (params.scale.to_f32(), params.offset.to_f32());
        let inv_s = if s == 0.0 { 0.0 } else { 1.0 / s };
        for (byte, pair) in packed.iter_mut().zip(group.chunks_exact(2)) {
            let (lo_code, _) = params.encode(s, inv_s, o, pair[0]);
            let (hi_code, _) = params.encode(s, inv_s, o, pair[1]);
            *byte = lo_code | (hi_code << 4);
        }
    }
    Ok(())
}

/// The kind [`quantize_int4`] produces with `opts`.
fn kind_of(opts: &Int4Options) -> Q4Kind {
    if opts.symmetric {
        Q4Kind::Int4Sym
    } else {
        Q4Kind::Int4
    }
}

/// Checks the group size, then that `k` is a positive multiple of it.
fn check_opts(k: usize, opts: &Int4Options) -> Result<()> {
    check_q4_dims(kind_of(opts), "weights", k, opts.group)
}

/// Quantises one row of `K` weights into its packed codes (`K/2` bytes), scales (`K/G`)
/// and, for asymmetric groups, offsets (`K/G`; `offsets_out` must be empty for
/// symmetric ones), in the canonical INT4 layout. For streaming a matrix row by row;
/// errors name the column (or group) within the row.
pub fn quantize_int4_row(
    row: &[f32],
    opts: &Int4Options,
    packed_out: &mut [u8],
    scales_out: &mut [f16],
    offsets_out: &mut [f16],
) -> Result<()> {
    let k = row.len();
    check_opts(k, opts)?;
    let groups = k / opts.group;
    if packed_out.len() != k / 2 {
        return Err(Error::length("packed 4-bit codes", k / 2, packed_out.len()));
    }
    if scales_out.len() != groups {
        return Err(Error::length("scales", groups, scales_out.len()));
    }
    let expected_offsets = if opts.symmetric { 0 } else { groups };
    if offsets_out.len() != expected_offsets {
        return Err(Error::length(
            "offsets",
            expected_offsets,
            offsets_out.len(),
        ));
    }
    quantize_row_unchecked(row, opts, packed_out, scales_out, offsets_out)
        .map_err(|e| e.into_error(None))
}

/// Quantises a row-major `W [N, K]` to INT4 in the canonical layout, rows in parallel:
/// a [`Q4Kind::Int4Sym`] matrix (no offsets) with `opts.symmetric`, else a
/// [`Q4Kind::Int4`] one.
///
/// Errors: [`Error::InvalidGroupSize`] / [`Error::GroupDoesNotDivide`] for a bad group,
/// [`Error::LengthMismatch`] if `w.len() != n * k`, [`Error::InvalidArgument`] for
/// `n == 0`, a NaN/infinite weight (naming its row and column) or a group whose range
/// overflows f16.
pub fn quantize_int4(w: &[f32], n: usize, k: usize, opts: &Int4Options) -> Result<Q4Matrix> {
    check_opts(k, opts)?;
    check_weight_len(w, n, k)?;
    let gpr = k / opts.group;
    let mut packed = vec![0u8; n * (k / 2)];
    let mut scales = vec![f16::ZERO; n * gpr];
    let mut offsets = Vec::new();
    let failure = if opts.symmetric {
        // Symmetric groups store no offsets: every row gets an empty slice.
        w.par_chunks_exact(k)
            .zip(packed.par_chunks_exact_mut(k / 2))
            .zip(scales.par_chunks_exact_mut(gpr))
            .enumerate()
            .with_min_len(4)
            .find_map_first(|(r, ((row, p), s))| {
                quantize_row_unchecked(row, opts, p, s, &mut [])
                    .err()
                    .map(|e| e.into_error(Some(r)))
            })
    } else {
        offsets = vec![f16::ZERO; n * gpr];
        w.par_chunks_exact(k)
            .zip(packed.par_chunks_exact_mut(k / 2))
            .zip(scales.par_chunks_exact_mut(gpr))
            .zip(offsets.par_chunks_exact_mut(gpr))
            .enumerate()
            .with_min_len(4)
            .find_map_first(|(r, (((row, p), s), o))| {
                quantize_row_unchecked(row, opts, p, s, o)
                    .err()
                    .map(|e| e.into_error(Some(r)))
            })
    };
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Q4Matrix {
        kind: kind_of(opts),
        n,
        k,
        group: opts.group,
        packed,
        scales,
        offsets,
    })
}
