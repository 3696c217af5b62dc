//! x86_64 kernels: AVX2 + FMA and AVX-512 versions of the fused 4-bit dequant-GEMV.
//!
//! See [the parent module](super) for the data layout they share. Every function here enables its
//! CPU features with `#[target_feature]`; callers must have checked them at run time.

use std::arch::x86_64::*;

use super::{CHUNK, GemvTask, M_TILE, N_BLOCK};

/// Calls `$row::<MT, CPG, ...>` for the runtime tile height `$mt` and chunks per group
/// `$cpg`, so that both loops are unrolled at compile time.
macro_rules! dispatch_tile {
    ($row:ident, [$($extra:tt)*], $mt:expr, $cpg:expr, $($arg:expr),*) => {
        match ($mt, $cpg) {
            (1, 1) => $row::<1, 1, $($extra)*>($($arg),*),
            (1, 2) => $row::<1, 2, $($extra)*>($($arg),*),
            (1, _) => $row::<1, 4, $($extra)*>($($arg),*),
            (2, 1) => $row::<2, 1, $($extra)*>($($arg),*),
            (2, 2) => $row::<2, 2, $($extra)*>($($arg),*),
            (2, _) => $row::<2, 4, $($extra)*>($($arg),*),
            (3, 1) => $row::<3, 1, $($extra)*>($($arg),*),
            (3, 2) => $row::<3, 2, $($extra)*>($($arg),*),
            (3, _) => $row::<3, 4, $($extra)*>($($arg),*),
            (_, 1) => $row::<4, 1, $($extra)*>($($arg),*),
            (_, 2) => $row::<4, 2, $($extra)*>($($arg),*),
            (_, _) => $row::<4, 4, $($extra)*>($($arg),*),
        }
    };
}

/// Weights covered by one AVX-512 chunk: 64 packed bytes, one per nibble of each of 16
/// 32-bit lanes.
pub(crate) const CHUNK512: usize = 128;

/// AVX-512 kernel: output rows `n0 .. n0 + out.len() / M` into `out[r * M + i]`.
///
/// It reads 64 packed bytes at a time as 16 dwords; lane `l` holds the codes of
/// `k = 8l .. 8l + 8` of the chunk, and nibble plane `j` is isolated with one shift and
/// decoded with one permute from a 16-float codebook register (the INT4 codebook is
/// `0..=15`, so both kinds share the code). `x` must therefore be in the matching
/// order ([the parent module](super)'s 128-element layout: element `j * 16 + l` of a chunk is
/// `x[8l + j]`). A group (32, 64 or 128) is a whole number of lanes, so each lane gets
/// its group's scale through one permute per chunk. Rows are processed in blocks of
/// [`N_BLOCK`] over slices of `K` whose activations fit in L1.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and DQ. `task` must describe consistent
/// buffers in the 128-element layout (as built by `gemv_q4`) and
/// `n0 + out.len() / M <= N`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub(crate) unsafe fn gemv_rows_avx512(task: &GemvTask<'_>, n0: usize, out: &mut [f32]) {
    let m = task.m;
    let mut i0 = 0;
    while i0 < m {
        let mt = (m - i0).min(M_TILE);
        // SAFETY: features as required by this function; `i0 + mt <= M`, and the row
        // range is the caller's.
        unsafe {
            match mt {
                1 => avx512_tile::<1>(task, n0, i0, out),
                2 => avx512_tile::<2>(task, n0, i0, out),
                3 => avx512_tile::<3>(task, n0, i0, out),
                _ => avx512_tile::<4>(task, n0, i0, out),
            }
        }
        i0 += mt;
    }
}

/// Activations (per row of `x`) kept in L1 while a block of weight rows streams by.
const K_SLICE: usize = 4096;

/// The `MT` rows of `x` from `i0` against output rows `n0 .. n0 + out.len() / M`.
///
/// # Safety
/// As [`gemv_rows_avx512`], and `i0 + MT <= M`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn avx512_tile<const MT: usize>(task: &GemvTask<'_>, n0: usize, i0: usize, out: &mut [f32]) {
    let m = task.m;
    let rows = out.len() / m;
    let gpr = task.w.groups_per_row();
    // Groups per K slice: a multiple of 16 (the scale block of `avx512_row`).
    let slice_groups = (K_SLICE / task.w.group()).max(16);
    // SAFETY: the codebook is 16 f32, exactly one unaligned 512-bit load.
    let table = unsafe { _mm512_loadu_ps(task.w.kind().codebook().as_ptr()) };
    let mut nb = 0;
    while nb < rows {
        let nb_end = (nb + N_BLOCK).min(rows);
        let mut acc = [[_mm512_setzero_ps(); MT]; N_BLOCK];
        let mut g_begin = 0;
        while g_begin < gpr {
            let g_end = (g_begin + slice_groups).min(gpr);
            for r in nb..nb_end {
                // SAFETY: `n0 + r < N` by the caller's contract, `g_begin` is a multiple
                // of 16 and `g_end <= K / G`.
                unsafe {
                    avx512_row::<MT>(task, table, n0 + r, i0, g_begin, g_end, &mut acc[r - nb])
                };
            }
            g_begin = g_end;
        }
        for r in nb..nb_end {
            let bias = task.bias.map_or(0.0, |b| b[n0 + r]);
            for (i, &a) in acc[r - nb].iter().enumerate() {
                out[r * m + i0 + i] = _mm512_reduce_add_ps(a) + bias;
            }
        }
        nb = nb_end;
    }
}

/// Decodes nibble `J` of every lane of `v` through the codebook `table`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
#[inline]
fn decode16<const J: u32>(v: __m512i, table: __m512) -> __m512 {
    // `permutexvar` reads only the low 4 bits of each index lane.
    _mm512_permutexvar_ps(_mm512_srli_epi32::<J>(v), table)
}

/// Adds groups `g_begin .. g_end` of output row `n`, for the `MT` rows of `x` starting
/// at `i0`, to the 16-lane partial sums `total` (scale, codes and offset terms).
///
/// # Safety
/// AVX-512 F/BW/VL/DQ available; `n < N`, `i0 + MT <= M`, `g_begin` a multiple of 16,
/// `g_end <= K / G`, `x` in the 128-element layout with row stride `task.xstride` at
/// least `K` rounded up to 128.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
#[inline]
unsafe fn avx512_row<const MT: usize>(
    task: &GemvTask<'_>,
    table: __m512,
    n: usize,
    i0: usize,
    g_begin: usize,
    g_end: usize,
    total: &mut [__m512; MT],
) {
    let w = &task.w;
    let k = w.k();
    let group = w.group();
    let xs = task.xstride;
    debug_assert!(i0 + MT <= task.m && g_begin.is_multiple_of(16) && g_end <= w.groups_per_row());
    debug_assert!(xs >= k.div_ceil(CHUNK512) * CHUNK512);
    let packed = w.packed_row(n).as_ptr();
    let scales = w.scales_row(n).as_ptr().cast::<i16>();
    let offsets = w.offsets_row(n);
    let xp = task.xp[i0 * xs..(i0 + MT) * xs].as_ptr();
    let nchunks = k.div_ceil(CHUNK512);
    // Dwords of packed codes in the last chunk (all 16 unless K % 128 != 0).
    let tail_lanes = (k - (nchunks - 1) * CHUNK512) / 8;
    let tail_mask: __mmask16 = if tail_lanes == 16 {
        0xffff
    } else {
        (1u16 << tail_lanes) - 1
    };
    // Lane `l` of a chunk belongs to group `8l / G` of it; a chunk spans `128 / G` groups.
    let lane_group = _mm512_srlv_epi32(
        _mm512_setr_epi32(
            0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120,
        ),
        _mm512_set1_epi32(group.trailing_zeros() as i32),
    );
    let groups_per_chunk = (CHUNK512 / group) as i32;
    let chunks_per_block = 16 * group / CHUNK512;
    let mut g0 = g_begin;
    // SAFETY: loads stay inside their rows: scale and offset loads are masked to the
    // `gl` groups left in the row (masked-out lanes are not accessed); `gsum` rows are
    // zero-padded to a multiple of 16 groups and `g0` is a multiple of 16; chunk `c`
    // reads packed bytes `64c ..` masked to the row's K/2 bytes, and x floats
    // `i * xs + 128c .. + 128` with `128 (c + 1) <= xs`.
    unsafe {
        while g0 < g_end {
            let gl = (g_end - g0).min(16);
            let mask: __mmask16 = if gl == 16 { 0xffff } else { (1u16 << gl) - 1 };
            let sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, scales.add(g0)));
            if !offsets.is_empty() {
                let ov = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                    mask,
                    offsets.as_ptr().cast::<i16>().add(g0),
                ));
                for (i, t) in total.iter_mut().enumerate() {
                    let gs = task.gsum[(i0 + i) * task.gstride + g0..].as_ptr();
                    *t = _mm512_fmadd_ps(ov, _mm512_loadu_ps(gs), *t);
                }
            }
            let c0 = g0 * group / CHUNK512;
            let c1 = (c0 + chunks_per_block).min(nchunks);
            let mut idx = lane_group;
            for c in c0..c1 {
                let lmask = if c + 1 == nchunks { tail_mask } else { 0xffff };
                let v = _mm512_maskz_loadu_epi32(lmask, packed.add(c * 64).cast::<i32>());
                let svec = _mm512_permutexvar_ps(idx, sv);
                idx = _mm512_add_epi32(idx, _mm512_set1_epi32(groups_per_chunk));
                let d0 = decode16::<0>(v, table);
                let d1 = decode16::<4>(v, table);
                let d2 = decode16::<8>(v, table);
                let d3 = decode16::<12>(v, table);
                let d4 = decode16::<16>(v, table);
                let d5 = decode16::<20>(v, table);
                let d6 = decode16::<24>(v, table);
                let d7 = decode16::<28>(v, table);
                for (i, t) in total.iter_mut().enumerate() {
                    let xr = xp.add(i * xs + c * CHUNK512);
                    let mut a = _mm512_mul_ps(d0, _mm512_loadu_ps(xr));
                    let mut b = _mm512_mul_ps(d1, _mm512_loadu_ps(xr.add(16)));
                    a = _mm512_fmadd_ps(d2, _mm512_loadu_ps(xr.add(32)), a);
                    b = _mm512_fmadd_ps(d3, _mm512_loadu_ps(xr.add(48)), b);
                    a = _mm512_fmadd_ps(d4, _mm512_loadu_ps(xr.add(64)), a);
                    b = _mm512_fmadd_ps(d5, _mm512_loadu_ps(xr.add(80)), b);
                    a = _mm512_fmadd_ps(d6, _mm512_loadu_ps(xr.add(96)), a);
                    b = _mm512_fmadd_ps(d7, _mm512_loadu_ps(xr.add(112)), b);
                    *t = _mm512_fmadd_ps(svec, _mm512_add_ps(a, b), *t);
                }
            }
            g0 += gl;
        }
    }
}

/// AVX2 + FMA kernel: output rows `n0 .. n0 + out.len() / M` into `out[r * M + i]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA. `task` must describe consistent buffers (as built
/// by `gemv_q4`) and `n0 + out.len() / M <= N`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gemv_rows_avx2(task: &GemvTask<'_>, n0: usize, out: &mut [f32]) {
    let m = task.m;
    let rows = out.len() / m;
    let cpg = task.w.group() / CHUNK;
    let book = task.w.kind().codebook();
    // SAFETY: the codebook is 16 f32: two unaligned 256-bit loads.
    let (tlo, thi) = unsafe {
        (
            _mm256_loadu_ps(book.as_ptr()),
            _mm256_loadu_ps(book.as_ptr().add(8)),
        )
    };
    // Kinds without offsets (NF4, symmetric INT4) decode through the codebook.
    let nf4 = !task.w.kind().has_offsets();
    let mut nb = 0;
    while nb < rows {
        let nb_end = (nb + N_BLOCK).min(rows);
        let mut i0 = 0;
        while i0 < m {
            let mt = (m - i0).min(M_TILE);
            for r in nb..nb_end {
                let dst = &mut out[r * m + i0..r * m + i0 + mt];
                // SAFETY: features as required by this function; `n0 + r < N` and
                // `i0 + mt <= M` by the loop bounds and the caller's contract.
                unsafe {
                    if nf4 {
                        dispatch_tile!(avx2_row, [true], mt, cpg, task, tlo, thi, n0 + r, i0, dst)
                    } else {
                        dispatch_tile!(avx2_row, [false], mt, cpg, task, tlo, thi, n0 + r, i0, dst)
                    }
                }
            }
            i0 += mt;
        }
        nb = nb_end;
    }
}

/// Converts eight f16 bit patterns (zero-extended in 32-bit lanes) to f32 with integer
/// operations, exactly, including subnormals, infinities and NaN (no F16C needed).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn f16x8_to_f32(h: __m256i) -> __m256 {
    let sign = _mm256_slli_epi32::<16>(_mm256_and_si256(h, _mm256_set1_epi32(0x8000)));
    let mag = _mm256_and_si256(h, _mm256_set1_epi32(0x7fff));
    let shifted = _mm256_slli_epi32::<13>(mag);
    // Exponent rebias by 2^112; f16 subnormals land on f32 subnormals and come out exact.
    let finite = _mm256_mul_ps(
        _mm256_castsi256_ps(shifted),
        _mm256_castsi256_ps(_mm256_set1_epi32(0x7780_0000)),
    );
    let special = _mm256_castsi256_ps(_mm256_or_si256(shifted, _mm256_set1_epi32(0x7f80_0000)));
    let is_special = _mm256_castsi256_ps(_mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7bff)));
    let v = _mm256_blendv_ps(finite, special, is_special);
    _mm256_or_ps(v, _mm256_castsi256_ps(sign))
}

/// Loads up to eight f16 values (the rest read as zero) and converts them to f32.
///
/// # Safety
/// `p` must be valid for reading `len` (at most 8) 16-bit values.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load_f16x8(p: *const u16, len: usize) -> __m256 {
    let h = if len >= 8 {
        // SAFETY: eight values readable, as the caller guarantees.
        unsafe { _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast::<__m128i>())) }
    } else {
        let mut buf = [0u16; 8];
        // SAFETY: `len` values readable from `p`; `buf` has room for 8.
        unsafe {
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len);
            _mm256_cvtepu16_epi32(_mm_loadu_si128(buf.as_ptr().cast::<__m128i>()))
        }
    };
    f16x8_to_f32(h)
}

/// Decodes eight codes (one per 32-bit lane, low 4 bits used) through the codebook.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn decode8<const NF4: bool>(q: __m256i, tlo: __m256, thi: __m256) -> __m256 {
    if NF4 {
        // Low 3 bits pick within each half of the table; bit 3 (moved to the sign bit)
        // picks the half.
        let a = _mm256_permutevar8x32_ps(tlo, q);
        let b = _mm256_permutevar8x32_ps(thi, q);
        _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(q)))
    } else {
        _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)))
    }
}

/// One output row `n` for the `MT` rows of `x` starting at `i0`; `CPG` chunks per group.
///
/// # Safety
/// AVX2 and FMA available; `n < N`, `i0 + MT <= M`, `dst.len() == MT`,
/// `group == CPG * 32`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn avx2_row<const MT: usize, const CPG: usize, const NF4: bool>(
    task: &GemvTask<'_>,
    tlo: __m256,
    thi: __m256,
    n: usize,
    i0: usize,
    dst: &mut [f32],
) {
    let w = &task.w;
    let k = w.k();
    let gpr = w.groups_per_row();
    debug_assert_eq!(w.group(), CPG * CHUNK);
    debug_assert!(i0 + MT <= task.m && dst.len() == MT);
    let packed = w.packed_row(n).as_ptr();
    let scales = w.scales_row(n).as_ptr().cast::<u16>();
    let offsets = w.offsets_row(n);
    let xp = task.xp[i0 * k..(i0 + MT) * k].as_ptr();
    let mut totals = [[_mm256_setzero_ps(); MT]; 2];
    let mut offacc = [_mm256_setzero_ps(); MT];
    let mut sbuf = [0.0f32; 8];
    let mut g0 = 0;
    // SAFETY: `packed` is K/2 bytes and each chunk reads 2 x 8 bytes at byte `kk / 2`
    // with `kk + 32 <= K`; `xp` holds MT rows of K floats and each load reads 8 at
    // `i * K + kk + {0, 8, 16, 24}`; scales and offsets are read for the `gl` groups
    // left in the row only; `gsum` rows are zero-padded to a multiple of 16 groups and
    // `g0` is a multiple of 8, so the 8-float load at `g0` stays inside row `i0 + i`.
    unsafe {
        while g0 < gpr {
            let gl = (gpr - g0).min(8);
            _mm256_storeu_ps(sbuf.as_mut_ptr(), load_f16x8(scales.add(g0), gl));
            if !offsets.is_empty() {
                let ov = load_f16x8(offsets.as_ptr().cast::<u16>().add(g0), gl);
                for (i, oa) in offacc.iter_mut().enumerate() {
                    let gs = task.gsum[(i0 + i) * task.gstride + g0..].as_ptr();
                    *oa = _mm256_fmadd_ps(ov, _mm256_loadu_ps(gs), *oa);
                }
            }
            for (gi, &s) in sbuf.iter().enumerate().take(gl) {
                let g = g0 + gi;
                // Alternate two totals so consecutive groups do not wait on each other.
                let total = &mut totals[gi & 1];
                let mut acc = [_mm256_setzero_ps(); MT];
                for c in 0..CPG {
                    let kk = (g * CPG + c) * CHUNK;
                    let p = packed.add(kk / 2);
                    let v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast::<__m128i>()));
                    let v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8).cast::<__m128i>()));
                    let lo0 = decode8::<NF4>(v0, tlo, thi);
                    let lo1 = decode8::<NF4>(v1, tlo, thi);
                    let hi0 = decode8::<NF4>(_mm256_srli_epi32::<4>(v0), tlo, thi);
                    let hi1 = decode8::<NF4>(_mm256_srli_epi32::<4>(v1), tlo, thi);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xr = xp.add(i * k + kk);
                        *a = _mm256_fmadd_ps(lo0, _mm256_loadu_ps(xr), *a);
                        *a = _mm256_fmadd_ps(lo1, _mm256_loadu_ps(xr.add(8)), *a);
                        *a = _mm256_fmadd_ps(hi0, _mm256_loadu_ps(xr.add(16)), *a);
                        *a = _mm256_fmadd_ps(hi1, _mm256_loadu_ps(xr.add(24)), *a);
                    }
                }
                let sv = _mm256_set1_ps(s);
                for (t, a) in total.iter_mut().zip(acc) {
                    *t = _mm256_fmadd_ps(sv, a, *t);
                }
            }
            g0 += gl;
        }
    }
    let bias = task.bias.map_or(0.0, |b| b[n]);
    for i in 0..MT {
        let t = _mm256_add_ps(totals[0][i], totals[1][i]);
        dst[i] = hsum256(_mm256_add_ps(t, offacc[i])) + bias;
    }
}

/// Horizontal sum of eight f32 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}
