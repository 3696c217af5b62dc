//! Int8-activation mode for INT4 linear layers (W4A8).
//!
//! Activations are quantised per token (per row of `x`) to symmetric int8:
//! `scale_x = max|x_row| / 127`, `xq = round(x / scale_x)`. The INT4 codes `q` (0..=15)
//! then meet `xq` in integer dot products with i32 accumulation inside each weight
//! group, and the groups are combined in f32:
//!
//! ```text
//! y[m,n] = scale_x[m] * sum_g ( scale[n,g] * sum_{k in g} q[n,k] * xq[m,k]
//!                              + offset[n,g] * sum_{k in g} xq[m,k] )  (+ bias[n])
//! ```
//!
//! The GEMM runs over tiles of `y` on the rayon pool. For each panel of [`PANEL_N`]
//! output features a tile unpacks the nibbles once into a small, cache-resident buffer
//! laid out `[K/4][PANEL_N][4]` (four consecutive `k` of one output next to each other,
//! the operand shape of `vpdpbusd` and `vpmaddubsw`) and reuses it for every row of
//! its block of `x`. The whole matrix is never unpacked. A register-blocked micro-kernel
//! multiplies a few rows of `x` with the panel; its i32 accumulators are converted and
//! multiplied by the group scales at each group end, and the offset term comes from
//! per-row, per-group sums of `xq`. Symmetric INT4 ([`Q4Kind::Int4Sym`]) runs the same
//! way with `offset = -8 * scale`; NF4 is refused (its levels are not uniform).
//!
//! Paths: [`KernelPath::Avx512Vnni`] (`vpdpbusd`: unsigned weights times signed
//! activations), [`KernelPath::Avx512`] and [`KernelPath::Avx2`] (`vpmaddubsw` then
//! `vpmaddwd` with ones; the i16 pair sums stay below `2 * 15 * 127 = 3810`, so nothing
//! saturates), and [`KernelPath::Portable`] (plain Rust).

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::backend::cpu::check::check_linear_args;
use crate::backend::cpu::path::KernelPath;
use crate::error::{Error, Result};
use crate::quant::{Q4Kind, Q4Weights};

#[cfg(target_arch = "x86_64")]
mod x86;

/// Width along K of the blocks over which [`QuantizedActivations`] keeps sums of the
/// int8 values; it divides every INT4 group size.
pub const SUM_BLOCK: usize = 32;

/// Output features per unpacked weight panel.
pub const PANEL_N: usize = 32;

/// Largest number of rows of `x` a micro-kernel handles at once.
pub(crate) const MAX_MR: usize = 6;

/// Largest number of rows of `x` per tile (tiles are rounded up to a multiple of 12, a
/// multiple of every path's micro-kernel height).
const TILE_M: usize = 512;
/// Output features per tile (a multiple of [`PANEL_N`]).
const TILE_N: usize = 128;

/// Smallest value of `max|x_row| / 127` that still quantises a row; rows below it
/// (all-zero rows, or rows whose largest magnitude is below about 1.5e-36) get scale 0
/// and all-zero values.
const MIN_SCALE: f32 = f32::MIN_POSITIVE;

/// Activations quantised per row to symmetric int8.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedActivations {
    m: usize,
    k: usize,
    values: Vec<i8>,
    scales: Vec<f32>,
    block_sums: Vec<i32>,
}

impl QuantizedActivations {
    /// Rows (tokens).
    pub fn m(&self) -> usize {
        self.m
    }

    /// Columns (input features).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The int8 values, row-major `[M, K]`, each in `-127..=127`.
    pub fn values(&self) -> &[i8] {
        &self.values
    }

    /// The int8 values of row `i`, or `None` past the last row.
    pub fn row(&self, i: usize) -> Option<&[i8]> {
        (i < self.m).then(|| &self.values[i * self.k..(i + 1) * self.k])
    }

    /// The per-row scales: `x[i, k] ~ scales[i] * values[i, k]`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Blocks of [`SUM_BLOCK`] columns per row (the last one may be short).
    pub fn blocks_per_row(&self) -> usize {
        self.k.div_ceil(SUM_BLOCK)
    }

    /// Sums of the int8 values over each block of [`SUM_BLOCK`] columns,
    /// `[M, blocks_per_row]`.
    pub fn block_sums(&self) -> &[i32] {
        &self.block_sums
    }

    /// Sums of the int8 values over each group of `group` columns, `[M, K / group]`.
    /// `group` must be a multiple of [`SUM_BLOCK`] that divides K.
    pub fn group_sums(&self, group: usize) -> Result<Vec<i32>> {
        if group == 0 || !group.is_multiple_of(SUM_BLOCK) || !self.k.is_multiple_of(group) {
            return Err(Error::invalid(
                "group",
                format!(
                    "{group} must be a positive multiple of {SUM_BLOCK} that divides K = {}",
                    self.k
                ),
            ));
        }
        let per_group = group / SUM_BLOCK;
        let bpr = self.blocks_per_row();
        let mut out = Vec::with_capacity(self.m * (self.k / group));
        for row in 0..self.m {
            let sums = &self.block_sums[row * bpr..(row + 1) * bpr];
            out.extend(sums.chunks(per_group).map(|c| c.iter().sum::<i32>()));
        }
        Ok(out)
    }
}

/// Quantises `x [M, K]` per row to symmetric int8 (`scale = max|x_row| / 127`,
/// `value = round(x * 127 / max|x_row|)`, ties to even, in `-127..=127`). A row whose
/// largest magnitude is below about 1.5e-36 (all zeros, say) gets scale 0 and zero
/// values. Fails on NaN or infinite inputs and on a length other than `M * K`.
pub fn quantize_activations(x: &[f32], m: usize, k: usize) -> Result<QuantizedActivations> {
    let len = m
        .checked_mul(k)
        .ok_or_else(|| Error::invalid("activations", "M * K overflows"))?;
    if x.len() != len {
        return Err(Error::length("activations x [M, K]", len, x.len()));
    }
    let bpr = k.div_ceil(SUM_BLOCK);
    let mut values = vec![0i8; len];
    let mut scales = vec![0f32; m];
    let mut block_sums = vec![0i32; m * bpr];
    if len > 0 {
        values
            .par_chunks_mut(k)
            .zip(scales.par_iter_mut())
            .zip(block_sums.par_chunks_mut(bpr))
            .zip(x.par_chunks(k))
            .enumerate()
            .with_min_len(8)
            .try_for_each(|(i, (((q, scale), sums), xr))| {
                *scale = quantize_row(xr, q, sums).ok_or_else(|| {
                    Error::invalid("activations", format!("row {i} holds a NaN or infinity"))
                })?;
                Ok::<(), Error>(())
            })?;
    }
    Ok(QuantizedActivations {
        m,
        k,
        values,
        scales,
        block_sums,
    })
}

/// Quantises one row; returns its scale, or `None` if it holds a non-finite value.
/// Runs the same code compiled for the widest vector extension the CPU has.
fn quantize_row(x: &[f32], q: &mut [i8], sums: &mut [i32]) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: the features the function is compiled for were detected above.
            return unsafe { quantize_row_avx512(x, q, sums) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected above.
            return unsafe { quantize_row_avx2(x, q, sums) };
        }
    }
    quantize_row_body(x, q, sums)
}

/// [`quantize_row_body`] compiled for AVX-512.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL/DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn quantize_row_avx512(x: &[f32], q: &mut [i8], sums: &mut [i32]) -> Option<f32> {
    quantize_row_body(x, q, sums)
}

/// [`quantize_row_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8], sums: &mut [i32]) -> Option<f32> {
    quantize_row_body(x, q, sums)
}

/// The row quantiser, written so the compiler vectorises every loop.
#[inline(always)]
fn quantize_row_body(x: &[f32], q: &mut [i8], sums: &mut [i32]) -> Option<f32> {
    // For non-negative floats the bit patterns order like the values, and every NaN or
    // infinity lies above the largest finite value: one integer max finds both.
    let amax_bits = x
        .iter()
        .fold(0u32, |acc, v| acc.max(v.to_bits() & 0x7fff_ffff));
    if amax_bits >= 0x7f80_0000 {
        return None;
    }
    let amax = f32::from_bits(amax_bits);
    let scale = amax / 127.0;
    if scale < MIN_SCALE {
        q.fill(0);
        sums.fill(0);
        return Some(0.0);
    }
    let inv = 127.0 / amax;
    // Adding and subtracting 1.5 * 2^23 rounds |v| <= 2^22 to the nearest integer, ties
    // to even, in any SIMD width.
    const ROUND: f32 = 12_582_912.0;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = (v * inv + ROUND) - ROUND;
        // SAFETY: `v` is finite with |v| <= amax and `inv` = 127 / amax is finite
        // (amax >= 127 * f32::MIN_POSITIVE here), so |r| <= 128: finite and in range.
        let c = unsafe { r.to_int_unchecked::<i32>() };
        *o = c.clamp(-127, 127) as i8;
    }
    for (s, block) in sums.iter_mut().zip(q.chunks(SUM_BLOCK)) {
        *s = block.iter().map(|&v| i32::from(v)).sum();
    }
    Some(scale)
}

/// Checks the path and the weight kind.
fn check_path_and_kind(path: KernelPath, w: &Q4Weights<'_>) -> Result<()> {
    if !KernelPath::available().contains(&path) {
        return Err(Error::Unsupported {
            what: format!("kernel path `{path}` is not available on this CPU"),
        });
    }
    if w.kind() == Q4Kind::Nf4 {
        return Err(Error::Unsupported {
            what: format!(
                "int8-activation linear on {} weights: its codes decode to non-uniform levels, \
                 so the product with int8 activations is not an integer dot product; \
                 use the f32-activation kernel",
                w.kind()
            ),
        });
    }
    Ok(())
}

/// `y [M, N] = x [M, K] * W^T (+ bias)` with `x` quantised per row to int8 (see the
/// module docs) and INT4 weights `W`. Fails with [`Error::LengthMismatch`] on wrong
/// buffer lengths and [`Error::Unsupported`] for NF4 weights or a path this CPU lacks.
/// `W` may be asymmetric or symmetric INT4.
pub fn linear_q4_int8(
    path: KernelPath,
    x: &[f32],
    m: usize,
    w: &Q4Weights<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    check_path_and_kind(path, w)?;
    check_linear_args(x, m, w.n(), w.k(), bias, y)?;
    let xq = quantize_activations(x, m, w.k())?;
    linear_q4_int8_quantized(path, &xq, w, bias, y)
}

fn check_outputs(m: usize, w: &Q4Weights<'_>, bias: Option<&[f32]>, y: &[f32]) -> Result<()> {
    let ylen = m
        .checked_mul(w.n())
        .ok_or_else(|| Error::invalid("output", "M * N overflows"))?;
    if y.len() != ylen {
        return Err(Error::length("output y [M, N]", ylen, y.len()));
    }
    if let Some(b) = bias
        && b.len() != w.n()
    {
        return Err(Error::length("bias [N]", w.n(), b.len()));
    }
    Ok(())
}

/// As [`linear_q4_int8`] with activations already quantised by
/// [`quantize_activations`], so several layers that read the same input quantise it once.
pub fn linear_q4_int8_quantized(
    path: KernelPath,
    xq: &QuantizedActivations,
    w: &Q4Weights<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    check_path_and_kind(path, w)?;
    if xq.k() != w.k() {
        return Err(Error::length(
            "quantised activations (K columns)",
            w.k(),
            xq.k(),
        ));
    }
    let m = xq.m();
    check_outputs(m, w, bias, y)?;
    if m == 0 {
        return Ok(());
    }
    let (n, k, group) = (w.n(), w.k(), w.group());
    let gpr = w.groups_per_row();
    let xsum: Vec<f32> = xq
        .group_sums(group)?
        .into_iter()
        .map(|s| s as f32)
        .collect();

    // Even tiles of at most about TILE_M rows, so a short last tile does not unpack the
    // whole matrix again for a handful of rows.
    let tile_m = m.div_ceil(m.div_ceil(TILE_M)).next_multiple_of(12);
    let m_tiles = m.div_ceil(tile_m);
    let n_tiles = n.div_ceil(TILE_N);
    let ctx = GemmCtx {
        path,
        w,
        xq,
        xsum: &xsum,
        bias,
        gpr,
        n,
        k,
        group,
    };
    let y_ptr = SyncPtr(y.as_mut_ptr());
    (0..m_tiles * n_tiles).into_par_iter().for_each_init(
        || Panel::new(k, gpr),
        |panel, t| {
            let (mt, nt) = (t / n_tiles, t % n_tiles);
            let m0 = mt * tile_m;
            let m1 = (m0 + tile_m).min(m);
            let n0 = nt * TILE_N;
            let n1 = (n0 + TILE_N).min(n);
            // SAFETY: tile `t` writes only rows m0..m1 and columns n0..n1 of `y`; the
            // tiles partition `y`, so no two tasks touch the same element, and `y` is
            // borrowed mutably for the whole parallel loop.
            unsafe { ctx.run_tile(panel, m0, m1, n0, n1, y_ptr) };
        },
    );
    Ok(())
}

/// A raw output pointer shared by tiles that write disjoint parts of `y`.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: the pointer is only used to write disjoint tiles of one `&mut [f32]` that
// outlives the parallel loop (see `linear_q4_int8_quantized`).
unsafe impl Send for SyncPtr {}
// SAFETY: as above; no element is accessed by two threads.
unsafe impl Sync for SyncPtr {}

/// One 64-byte line of the panel buffer (aligned so vector loads never split lines).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [u8; 64]);

/// A thread's unpacked weight panel: `PANEL_N` outputs, all of K.
pub(crate) struct Panel {
    /// Codes, `[K/4][PANEL_N][4]` bytes (`[K/4][4][PANEL_N]` on the portable path).
    pub(crate) codes: Vec<Line>,
    /// Scales as f32, `[K/G][PANEL_N]`.
    pub(crate) scales: Vec<f32>,
    /// Offsets as f32, `[K/G][PANEL_N]`.
    pub(crate) offsets: Vec<f32>,
    /// Scratch for one row of scales or offsets.
    row_tmp: Vec<f32>,
}

impl Panel {
    fn new(k: usize, gpr: usize) -> Self {
        Panel {
            codes: vec![Line([0; 64]); k * PANEL_N / 64],
            scales: vec![0.0; gpr * PANEL_N],
            offsets: vec![0.0; gpr * PANEL_N],
            row_tmp: vec![0.0; gpr],
        }
    }

    pub(crate) fn code_bytes(&self) -> &[u8] {
        bytemuck_lines(&self.codes)
    }

    /// Unpacks outputs `n0..n0 + valid` of `w` (`valid <= PANEL_N`); the rest of the
    /// panel gets zero codes, scales and offsets.
    fn fill(&mut self, path: KernelPath, w: &Q4Weights<'_>, n0: usize, valid: usize) {
        let gpr = w.groups_per_row();
        self.row_tmp.resize(gpr, 0.0);
        for j in 0..PANEL_N {
            if j < valid {
                // Vectorised f16 conversion of one row, then a transposed scatter.
                w.scales_row(n0 + j).convert_to_f32_slice(&mut self.row_tmp);
                for (g, &v) in self.row_tmp.iter().enumerate() {
                    self.scales[g * PANEL_N + j] = v;
                }
                if w.kind().has_offsets() {
                    w.offsets_row(n0 + j)
                        .convert_to_f32_slice(&mut self.row_tmp);
                } else {
                    // Symmetric INT4: `scale * (q - 8)` is `scale * q + offset` with
                    // `offset = -8 * scale`, exact in f32 (the scales still sit in
                    // `row_tmp`).
                    self.row_tmp.iter_mut().for_each(|v| *v *= -8.0);
                }
                for (g, &v) in self.row_tmp.iter().enumerate() {
                    self.offsets[g * PANEL_N + j] = v;
                }
            } else {
                for g in 0..gpr {
                    self.scales[g * PANEL_N + j] = 0.0;
                    self.offsets[g * PANEL_N + j] = 0.0;
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if matches!(path, KernelPath::Avx512 | KernelPath::Avx512Vnni) && x86::gather_fits(w) {
            // SAFETY: the caller only passes a path from `KernelPath::available()`, so
            // AVX-512F is present; `n0 + valid <= N` and the buffer holds K * PANEL_N
            // bytes, which is what `unpack_panel_avx512` requires.
            unsafe {
                x86::unpack_panel_avx512(w, n0, valid, &mut self.codes);
            }
            return;
        }
        let planar = path == KernelPath::Portable;
        unpack_panel_portable(w, n0, valid, &mut self.codes, planar);
    }
}

/// Views the panel lines as bytes.
fn bytemuck_lines(lines: &[Line]) -> &[u8] {
    // SAFETY: `Line` is `repr(C)` around `[u8; 64]` with size 64 and no padding, so a
    // slice of `Line` is a valid, initialised slice of `64 * len` bytes.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<u8>(), lines.len() * 64) }
}

/// Spreads the four nibbles of `v` (low nibble first) into the four bytes of a u32.
#[inline(always)]
pub(crate) fn spread_nibbles(v: u32) -> u32 {
    let t = (v | (v << 8)) & 0x00ff_00ff;
    (t | (t << 4)) & 0x0f0f_0f0f
}

/// Scalar panel unpacking (used by the portable and AVX2 paths). Each step of four `k`
/// is 128 bytes: interleaved (`[PANEL_N][4]`, the x86 operand order) or, with
/// `planar`, `[4][PANEL_N]` (contiguous per `k`, which the portable kernel vectorises).
fn unpack_panel_portable(
    w: &Q4Weights<'_>,
    n0: usize,
    valid: usize,
    codes: &mut [Line],
    planar: bool,
) {
    let bytes = lines_as_bytes_mut(codes);
    let pos = |i: usize, j: usize, t: usize| {
        if planar {
            i * 4 * PANEL_N + t * PANEL_N + j
        } else {
            i * 4 * PANEL_N + 4 * j + t
        }
    };
    for j in 0..PANEL_N {
        if j < valid {
            let row = w.packed_row(n0 + j);
            for (i, pair) in row.chunks_exact(2).enumerate() {
                let v = spread_nibbles(u32::from(pair[0]) | (u32::from(pair[1]) << 8));
                for (t, b) in v.to_le_bytes().into_iter().enumerate() {
                    bytes[pos(i, j, t)] = b;
                }
            }
        } else {
            for i in 0..w.k() / 4 {
                for t in 0..4 {
                    bytes[pos(i, j, t)] = 0;
                }
            }
        }
    }
}

/// Views the panel lines as mutable bytes.
fn lines_as_bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: `Line` is `repr(C)` around `[u8; 64]` with size 64 and no padding, so a
    // slice of `Line` is a valid slice of `64 * len` bytes, borrowed mutably here.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), lines.len() * 64) }
}

/// Everything a tile needs.
struct GemmCtx<'a> {
    path: KernelPath,
    w: &'a Q4Weights<'a>,
    xq: &'a QuantizedActivations,
    xsum: &'a [f32],
    bias: Option<&'a [f32]>,
    gpr: usize,
    n: usize,
    k: usize,
    group: usize,
}

impl GemmCtx<'_> {
    /// Computes `y[m0..m1, n0..n1]`.
    ///
    /// # Safety
    /// `y` must point to the `M * N` output buffer and no other thread may access rows
    /// `m0..m1` x columns `n0..n1` meanwhile; `path` must be available on this CPU.
    unsafe fn run_tile(
        &self,
        panel: &mut Panel,
        m0: usize,
        m1: usize,
        n0: usize,
        n1: usize,
        y: SyncPtr,
    ) {
        let mr = match self.path {
            KernelPath::Avx512Vnni | KernelPath::Avx512 => 6,
            KernelPath::Avx2 => 2,
            KernelPath::Portable => 4,
        };
        let mut out = [0f32; MAX_MR * PANEL_N];
        let values = self.xq.values();
        let scales_x = self.xq.scales();
        let mut p0 = n0;
        while p0 < n1 {
            let valid = (n1 - p0).min(PANEL_N);
            panel.fill(self.path, self.w, p0, valid);
            let mut r0 = m0;
            while r0 < m1 {
                let rows = (m1 - r0).min(mr);
                let x = &values[r0 * self.k..(r0 + rows) * self.k];
                let xsum = &self.xsum[r0 * self.gpr..(r0 + rows) * self.gpr];
                self.micro(panel, rows, x, xsum, &mut out);
                for r in 0..rows {
                    let sx = scales_x[r0 + r];
                    let row_out = &out[r * PANEL_N..r * PANEL_N + valid];
                    // SAFETY: row r0 + r < M and columns p0..p0 + valid <= N lie in this
                    // tile, which only this task writes (see the function contract).
                    let yrow = unsafe {
                        std::slice::from_raw_parts_mut(y.0.add((r0 + r) * self.n + p0), valid)
                    };
                    match self.bias {
                        Some(b) => {
                            for ((o, &a), &bb) in yrow.iter_mut().zip(row_out).zip(&b[p0..]) {
                                *o = sx * a + bb;
                            }
                        }
                        None => {
                            for (o, &a) in yrow.iter_mut().zip(row_out) {
                                *o = sx * a;
                            }
                        }
                    }
                }
                r0 += rows;
            }
            p0 += valid;
        }
    }

    /// Runs the micro-kernel of the path on `rows` rows of `x` (at most the path's
    /// height) and the panel; writes `out[r * PANEL_N + j]` without the x scale.
    fn micro(
        &self,
        panel: &Panel,
        rows: usize,
        x: &[i8],
        xsum: &[f32],
        out: &mut [f32; MAX_MR * PANEL_N],
    ) {
        let (k, gpr, group) = (self.k, self.gpr, self.group);
        match self.path {
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni | KernelPath::Avx512 | KernelPath::Avx2 => {
                // SAFETY: the path is available on this CPU (checked on entry to the
                // public functions); `x` holds `rows * K` values, `xsum` `rows * K/G`,
                // the panel `K * PANEL_N` codes and `K/G * PANEL_N` scales and offsets,
                // and `rows` is at most the path's height, as the kernels require.
                unsafe { x86::micro(self.path, panel, rows, x, k, xsum, gpr, group, out) };
            }
            _ => micro_portable(panel, rows, x, k, xsum, gpr, group, out),
        }
    }
}

/// Plain-Rust micro-kernel: dispatches the row count to a const height.
#[allow(clippy::too_many_arguments)]
fn micro_portable(
    panel: &Panel,
    rows: usize,
    x: &[i8],
    k: usize,
    xsum: &[f32],
    gpr: usize,
    group: usize,
    out: &mut [f32; MAX_MR * PANEL_N],
) {
    match rows {
        1 => micro_portable_n::<1>(panel, x, k, xsum, gpr, group, out),
        2 => micro_portable_n::<2>(panel, x, k, xsum, gpr, group, out),
        3 => micro_portable_n::<3>(panel, x, k, xsum, gpr, group, out),
        _ => micro_portable_n::<4>(panel, x, k, xsum, gpr, group, out),
    }
}

/// One step of four `k` for one row of `x` on a planar panel step (`[4][n]` codes,
/// `n = acc.len()`): `acc[j] += sum_t w[t][j] * x[t]`. The products and their sum over
/// the four `k` fit i16 (4 * 15 * 127 = 7620), so the step is summed in i16 (16-bit
/// multiplies exist on every SIMD ISA) and widened once. Kept out of line with a
/// run-time length so the compiler vectorises the loops over `j`.
#[inline(never)]
fn step_dot(acc: &mut [i32], w: &[u8], x: &[i8]) {
    let n = acc.len();
    let mut step = [0i16; PANEL_N];
    let step = &mut step[..n.min(PANEL_N)];
    for (t, &xt) in x.iter().enumerate().take(4) {
        let xt = i16::from(xt);
        let wt = &w[t * n..(t + 1) * n];
        for (s, &c) in step.iter_mut().zip(wt) {
            *s += i16::from(c) * xt;
        }
    }
    for (a, &s) in acc.iter_mut().zip(step.iter()) {
        *a += i32::from(s);
    }
}

fn micro_portable_n<const MR: usize>(
    panel: &Panel,
    x: &[i8],
    k: usize,
    xsum: &[f32],
    gpr: usize,
    group: usize,
    out: &mut [f32; MAX_MR * PANEL_N],
) {
    let codes = panel.code_bytes();
    let mut facc = [[0f32; PANEL_N]; MR];
    for g in 0..gpr {
        let mut acc = [[0i32; PANEL_N]; MR];
        for i in g * group / 4..(g + 1) * group / 4 {
            let wv = &codes[i * 4 * PANEL_N..(i + 1) * 4 * PANEL_N];
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xr = &x[r * k + 4 * i..r * k + 4 * i + 4];
                // Planar panel: the 32 codes of one k are contiguous. Products and
                // their sum over the four k of a step fit i16 (4 * 15 * 127 = 7620), so
                // the step is computed in i16 (16-bit multiplies exist on every SIMD
                // ISA) and widened once.
                step_dot(acc_r, wv, xr);
            }
        }
        let s = &panel.scales[g * PANEL_N..(g + 1) * PANEL_N];
        let o = &panel.offsets[g * PANEL_N..(g + 1) * PANEL_N];
        for r in 0..MR {
            let xs = xsum[r * gpr + g];
            for j in 0..PANEL_N {
                facc[r][j] += s[j] * acc[r][j] as f32 + o[j] * xs;
            }
        }
    }
    for (r, f) in facc.iter().enumerate() {
        out[r * PANEL_N..(r + 1) * PANEL_N].copy_from_slice(f);
    }
}
