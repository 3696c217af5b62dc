//! x86_64 micro-kernels and panel unpacking of the int8-activation mode (see
//! [`super::int8`]).

use std::arch::x86_64::*;

use super::{Line, MAX_MR, PANEL_N, Panel};
use crate::backend::cpu::path::KernelPath;
use crate::quant::Q4Weights;

/// Raw operands of one micro-kernel call.
#[derive(Clone, Copy)]
struct Args {
    /// First of the rows of int8 activations, row stride `ldx`.
    x: *const i8,
    ldx: usize,
    /// Per-row, per-group sums of the int8 values as f32, row stride `gpr`.
    xsum: *const f32,
    gpr: usize,
    /// Steps of four `k` per group (`G / 4`).
    group4: usize,
    /// Panel codes `[K/4][PANEL_N][4]`, 64-byte aligned.
    codes: *const u8,
    /// Panel scales and offsets `[K/G][PANEL_N]`.
    scales: *const f32,
    offsets: *const f32,
    /// Output `[MR][PANEL_N]`.
    out: *mut f32,
}

/// Runs the micro-kernel of `path` (an x86 path) on `rows` rows.
///
/// # Safety
/// `path` must be available on this CPU; `x` must hold `rows * k` values and `xsum`
/// `rows * gpr`; the panel must be filled for this `k` and `gpr`, `group` must be the
/// weights' group size, and `rows` must be at least 1 and at most the path's height
/// (6 for the AVX-512 paths, 2 for AVX2).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn micro(
    path: KernelPath,
    panel: &Panel,
    rows: usize,
    x: &[i8],
    k: usize,
    xsum: &[f32],
    gpr: usize,
    group: usize,
    out: &mut [f32; MAX_MR * PANEL_N],
) {
    let a = Args {
        x: x.as_ptr(),
        ldx: k,
        xsum: xsum.as_ptr(),
        gpr,
        group4: group / 4,
        codes: panel.code_bytes().as_ptr(),
        scales: panel.scales.as_ptr(),
        offsets: panel.offsets.as_ptr(),
        out: out.as_mut_ptr(),
    };
    // SAFETY (all arms): the caller guarantees the CPU features of `path` and buffers
    // sized for `rows` rows, which is the height each instantiation reads.
    unsafe {
        match (path, rows) {
            (KernelPath::Avx512Vnni, 1) => kernel_vnni::<1>(a),
            (KernelPath::Avx512Vnni, 2) => kernel_vnni::<2>(a),
            (KernelPath::Avx512Vnni, 3) => kernel_vnni::<3>(a),
            (KernelPath::Avx512Vnni, 4) => kernel_vnni::<4>(a),
            (KernelPath::Avx512Vnni, 5) => kernel_vnni::<5>(a),
            (KernelPath::Avx512Vnni, _) => kernel_vnni::<6>(a),
            (KernelPath::Avx512, 1) => kernel_avx512::<1>(a),
            (KernelPath::Avx512, 2) => kernel_avx512::<2>(a),
            (KernelPath::Avx512, 3) => kernel_avx512::<3>(a),
            (KernelPath::Avx512, 4) => kernel_avx512::<4>(a),
            (KernelPath::Avx512, 5) => kernel_avx512::<5>(a),
            (KernelPath::Avx512, _) => kernel_avx512::<6>(a),
            (_, 1) => kernel_avx2::<1>(a),
            (_, _) => kernel_avx2::<2>(a),
        }
    }
}

/// AVX-512 VNNI micro-kernel: `MR` rows x 32 outputs, `vpdpbusd` with the unsigned
/// weight codes as the first source and broadcast int8 activations as the second.
///
/// # Safety
/// AVX-512F/BW/VNNI must be present and `a` must describe buffers for `MR` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel_vnni<const MR: usize>(a: Args) {
    let mut f = [[_mm512_setzero_ps(); 2]; MR];
    for g in 0..a.gpr {
        let mut acc = [[_mm512_setzero_si512(); 2]; MR];
        let i0 = g * a.group4;
        for i in i0..i0 + a.group4 {
            // SAFETY: step i < K/4 of the panel (128 bytes per step) and bytes
            // 4i..4i+4 of each of the MR rows of x are in bounds (caller contract).
            unsafe {
                let w0 = _mm512_loadu_si512(a.codes.add(i * 128).cast());
                let w1 = _mm512_loadu_si512(a.codes.add(i * 128 + 64).cast());
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_epi32(std::ptr::read_unaligned(
                        a.x.add(r * a.ldx + 4 * i).cast::<i32>(),
                    ));
                    acc_r[0] = _mm512_dpbusd_epi32(acc_r[0], w0, xb);
                    acc_r[1] = _mm512_dpbusd_epi32(acc_r[1], w1, xb);
                }
            }
        }
        // SAFETY: group g < K/G of the panel scales/offsets and of the MR rows of xsum.
        unsafe {
            let s0 = _mm512_loadu_ps(a.scales.add(g * PANEL_N));
            let s1 = _mm512_loadu_ps(a.scales.add(g * PANEL_N + 16));
            let o0 = _mm512_loadu_ps(a.offsets.add(g * PANEL_N));
            let o1 = _mm512_loadu_ps(a.offsets.add(g * PANEL_N + 16));
            for (r, (f_r, acc_r)) in f.iter_mut().zip(&acc).enumerate() {
                let xs = _mm512_set1_ps(*a.xsum.add(r * a.gpr + g));
                f_r[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_r[0]), s0, f_r[0]);
                f_r[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_r[1]), s1, f_r[1]);
                f_r[0] = _mm512_fmadd_ps(o0, xs, f_r[0]);
                f_r[1] = _mm512_fmadd_ps(o1, xs, f_r[1]);
            }
        }
    }
    for (r, f_r) in f.iter().enumerate() {
        // SAFETY: the output holds MAX_MR >= MR rows of PANEL_N floats.
        unsafe {
            _mm512_storeu_ps(a.out.add(r * PANEL_N), f_r[0]);
            _mm512_storeu_ps(a.out.add(r * PANEL_N + 16), f_r[1]);
        }
    }
}

/// AVX-512 micro-kernel without VNNI: `vpmaddubsw` (u8 codes x s8 activations, pairs
/// summed to i16, at most 2 * 15 * 127 = 3810 so never saturating) then `vpmaddwd` with
/// ones. Two steps are added in i16 (at most 7620) before widening.
///
/// # Safety
/// AVX-512F/BW must be present and `a` must describe buffers for `MR` rows.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn kernel_avx512<const MR: usize>(a: Args) {
    let ones = _mm512_set1_epi16(1);
    let mut f = [[_mm512_setzero_ps(); 2]; MR];
    for g in 0..a.gpr {
        let mut acc = [[_mm512_setzero_si512(); 2]; MR];
        let i0 = g * a.group4;
        // group4 is a multiple of 8 (G >= 32), so the steps come in pairs.
        let mut i = i0;
        while i < i0 + a.group4 {
            // SAFETY: steps i and i + 1 < K/4 of the panel and bytes 4i..4i+8 of each
            // of the MR rows of x are in bounds (caller contract).
            unsafe {
                let w0 = _mm512_loadu_si512(a.codes.add(i * 128).cast());
                let w1 = _mm512_loadu_si512(a.codes.add(i * 128 + 64).cast());
                let w2 = _mm512_loadu_si512(a.codes.add(i * 128 + 128).cast());
                let w3 = _mm512_loadu_si512(a.codes.add(i * 128 + 192).cast());
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let p = a.x.add(r * a.ldx + 4 * i);
                    let xa = _mm512_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>()));
                    let xb = _mm512_set1_epi32(std::ptr::read_unaligned(p.add(4).cast::<i32>()));
                    let t0 = _mm512_add_epi16(
                        _mm512_maddubs_epi16(w0, xa),
                        _mm512_maddubs_epi16(w2, xb),
                    );
                    let t1 = _mm512_add_epi16(
                        _mm512_maddubs_epi16(w1, xa),
                        _mm512_maddubs_epi16(w3, xb),
                    );
                    acc_r[0] = _mm512_add_epi32(acc_r[0], _mm512_madd_epi16(t0, ones));
                    acc_r[1] = _mm512_add_epi32(acc_r[1], _mm512_madd_epi16(t1, ones));
                }
            }
            i += 2;
        }
        // SAFETY: group g < K/G of the panel scales/offsets and of the MR rows of xsum.
        unsafe {
            let s0 = _mm512_loadu_ps(a.scales.add(g * PANEL_N));
            let s1 = _mm512_loadu_ps(a.scales.add(g * PANEL_N + 16));
            let o0 = _mm512_loadu_ps(a.offsets.add(g * PANEL_N));
            let o1 = _mm512_loadu_ps(a.offsets.add(g * PANEL_N + 16));
            for (r, (f_r, acc_r)) in f.iter_mut().zip(&acc).enumerate() {
                let xs = _mm512_set1_ps(*a.xsum.add(r * a.gpr + g));
                f_r[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_r[0]), s0, f_r[0]);
                f_r[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_r[1]), s1, f_r[1]);
                f_r[0] = _mm512_fmadd_ps(o0, xs, f_r[0]);
                f_r[1] = _mm512_fmadd_ps(o1, xs, f_r[1]);
            }
        }
    }
    for (r, f_r) in f.iter().enumerate() {
        // SAFETY: the output holds MAX_MR >= MR rows of PANEL_N floats.
        unsafe {
            _mm512_storeu_ps(a.out.add(r * PANEL_N), f_r[0]);
            _mm512_storeu_ps(a.out.add(r * PANEL_N + 16), f_r[1]);
        }
    }
}

/// AVX2 micro-kernel: `MR` (<= 2) rows x 32 outputs in four ymm columns,
/// `vpmaddubsw` then `vpmaddwd` with ones.
///
/// # Safety
/// AVX2 and FMA must be present and `a` must describe buffers for `MR` rows.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<const MR: usize>(a: Args) {
    let ones = _mm256_set1_epi16(1);
    let mut f = [[_mm256_setzero_ps(); 4]; MR];
    for g in 0..a.gpr {
        let mut acc = [[_mm256_setzero_si256(); 4]; MR];
        let i0 = g * a.group4;
        for i in i0..i0 + a.group4 {
            // SAFETY: step i < K/4 of the panel and bytes 4i..4i+4 of each of the MR
            // rows of x are in bounds (caller contract).
            unsafe {
                let mut xb = [_mm256_setzero_si256(); MR];
                for (r, xb_r) in xb.iter_mut().enumerate() {
                    *xb_r = _mm256_set1_epi32(std::ptr::read_unaligned(
                        a.x.add(r * a.ldx + 4 * i).cast::<i32>(),
                    ));
                }
                for j in 0..4 {
                    let wj = _mm256_loadu_si256(a.codes.add(i * 128 + 32 * j).cast());
                    for (acc_r, &xb_r) in acc.iter_mut().zip(&xb) {
                        let d = _mm256_madd_epi16(_mm256_maddubs_epi16(wj, xb_r), ones);
                        acc_r[j] = _mm256_add_epi32(acc_r[j], d);
                    }
                }
            }
        }
        for j in 0..4 {
            // SAFETY: group g < K/G of the panel scales/offsets and of the MR rows of
            // xsum.
            unsafe {
                let s = _mm256_loadu_ps(a.scales.add(g * PANEL_N + 8 * j));
                let o = _mm256_loadu_ps(a.offsets.add(g * PANEL_N + 8 * j));
                for (r, (f_r, acc_r)) in f.iter_mut().zip(&acc).enumerate() {
                    let xs = _mm256_set1_ps(*a.xsum.add(r * a.gpr + g));
                    f_r[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc_r[j]), s, f_r[j]);
                    f_r[j] = _mm256_fmadd_ps(o, xs, f_r[j]);
                }
            }
        }
    }
    for (r, f_r) in f.iter().enumerate() {
        for (j, &v) in f_r.iter().enumerate() {
            // SAFETY: the output holds MAX_MR >= MR rows of PANEL_N floats.
            unsafe { _mm256_storeu_ps(a.out.add(r * PANEL_N + 8 * j), v) };
        }
    }
}

/// Spreads the four nibbles in the low 16 bits of each lane into its four bytes.
#[target_feature(enable = "avx512f")]
fn spread_nibbles_512(v: __m512i) -> __m512i {
    let t = _mm512_and_si512(
        _mm512_or_si512(v, _mm512_slli_epi32::<8>(v)),
        _mm512_set1_epi32(0x00ff_00ff),
    );
    _mm512_and_si512(
        _mm512_or_si512(t, _mm512_slli_epi32::<4>(t)),
        _mm512_set1_epi32(0x0f0f_0f0f),
    )
}

/// Whether [`unpack_panel_avx512`] can address every row of `w` with i32 offsets.
pub(super) fn gather_fits(w: &Q4Weights<'_>) -> bool {
    (w.k() / 2)
        .checked_mul(PANEL_N)
        .is_some_and(|v| v <= i32::MAX as usize)
}

/// Unpacks outputs `n0..n0 + valid` of `w` into `codes` (`[K/4][PANEL_N][4]`) with
/// masked gathers: one 32-bit gather reads two steps of four codes from 16 rows.
/// Outputs past `valid` get zero codes.
///
/// # Safety
/// AVX-512F must be present; `n0 + valid <= N`, `1 <= valid <= PANEL_N`, `codes` must
/// hold `K * PANEL_N / 64` lines and [`gather_fits`] must hold for `w`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn unpack_panel_avx512(
    w: &Q4Weights<'_>,
    n0: usize,
    valid: usize,
    codes: &mut [Line],
) {
    let rb = w.k() / 2;
    let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let idx = _mm512_mullo_epi32(lane, _mm512_set1_epi32(rb as i32));
    let mask_of = |h: usize| -> u16 {
        let v = valid.saturating_sub(16 * h).min(16);
        ((1u32 << v) - 1) as u16
    };
    let masks = [mask_of(0), mask_of(1)];
    let dst = codes.as_mut_ptr().cast::<u8>();
    let packed = w.packed();
    let lo16 = _mm512_set1_epi32(0xffff);
    for (h, &mask) in masks.iter().enumerate() {
        // Row n0 + 16h exists whenever the mask is non-zero.
        let base = if mask == 0 {
            None
        } else {
            Some(packed[(n0 + 16 * h) * rb..].as_ptr())
        };
        for i2 in 0..rb / 4 {
            let (l, u) = match base {
                Some(b) => {
                    // SAFETY: lane t < valid - 16h reads bytes 4*i2..4*i2+4 of row
                    // n0 + 16h + t, inside the packed buffer (4*i2 + 4 <= K/2); lanes
                    // outside the mask are not read. Offsets fit in i32 (gather_fits).
                    let v = unsafe {
                        _mm512_mask_i32gather_epi32::<1>(
                            _mm512_setzero_si512(),
                            mask,
                            idx,
                            b.add(4 * i2).cast(),
                        )
                    };
                    (
                        spread_nibbles_512(_mm512_and_si512(v, lo16)),
                        spread_nibbles_512(_mm512_srli_epi32::<16>(v)),
                    )
                }
                None => (_mm512_setzero_si512(), _mm512_setzero_si512()),
            };
            // SAFETY: steps 2*i2 and 2*i2 + 1 < K/4; each step is 128 bytes of which
            // half h is written; `codes` holds K/4 * 128 bytes.
            unsafe {
                _mm512_storeu_si512(dst.add(2 * i2 * 128 + 64 * h).cast(), l);
                _mm512_storeu_si512(dst.add((2 * i2 + 1) * 128 + 64 * h).cast(), u);
            }
        }
    }
}
