//! Large-M linear layers on weights that are not f32 (4-bit, f16, bf16): decode a panel
//! of weight rows into a cache-resident f32 tile, multiply it with the whole activation
//! matrix through the `gemm` crate, move to the next panel. The decoded copy never
//! exceeds one panel per thread, and each decoded weight is reused by all M rows, so the
//! decode cost shrinks as 1/M next to the multiply.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::KernelPath;
use crate::quant::Q4Weights;

/// Weight rows that can be decoded to f32 on demand.
pub(crate) trait DecodeRows: Sync {
    /// Rows of W (output features).
    fn rows(&self) -> usize;
    /// Columns of W (input features).
    fn cols(&self) -> usize;
    /// Granularity of column blocks (the 4-bit group size; 1 for dense).
    fn col_align(&self) -> usize;
    /// Writes columns `cols` of rows `first..first + out.len() / cols.len()` of W into
    /// `out`, row-major f32. `cols.start` is a multiple of [`DecodeRows::col_align`].
    fn decode_block(&self, first: usize, cols: Range<usize>, out: &mut [f32]);
}

/// 4-bit weights decoded with the chosen SIMD path.
pub(crate) struct Q4Rows<'a> {
    pub(crate) w: Q4Weights<'a>,
    pub(crate) path: KernelPath,
}

impl DecodeRows for Q4Rows<'_> {
    fn rows(&self) -> usize {
        self.w.n()
    }
    fn cols(&self) -> usize {
        self.w.k()
    }
    fn col_align(&self) -> usize {
        self.w.group()
    }
    fn decode_block(&self, first: usize, cols: Range<usize>, out: &mut [f32]) {
        let first_group = cols.start / self.w.group();
        for (i, row) in out.chunks_exact_mut(cols.len()).enumerate() {
            #[cfg(target_arch = "x86_64")]
            if self.path >= KernelPath::Avx512 {
                // SAFETY: callers only pass paths from `KernelPath::available()`, so the
                // CPU has AVX-512F; `row` holds whole groups of a validated matrix.
                unsafe { decode_q4_row_avx512(&self.w, first + i, first_group, row) };
                continue;
            }
            decode_q4_row(&self.w, first + i, first_group, row);
        }
    }
}

/// A dense f16 or bf16 weight matrix `[N, K]`.
pub(crate) struct HalfRows<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) n: usize,
    pub(crate) k: usize,
}

macro_rules! half_rows {
    ($t:ty) => {
        impl DecodeRows for HalfRows<'_, $t> {
            fn rows(&self) -> usize {
                self.n
            }
            fn cols(&self) -> usize {
                self.k
            }
            fn col_align(&self) -> usize {
                1
            }
            fn decode_block(&self, first: usize, cols: Range<usize>, out: &mut [f32]) {
                for (i, dst) in out.chunks_exact_mut(cols.len()).enumerate() {
                    let row = (first + i) * self.k;
                    self.data[row + cols.start..row + cols.end].convert_to_f32_slice(dst);
                }
            }
        }
    };
}
half_rows!(f16);
half_rows!(bf16);

/// Decodes the groups `first_group..` of one 4-bit row that fit in `out` (a whole number
/// of groups): a 16-entry table of `scale * codebook[q] + offset` per group turns every
/// code into one lookup.
fn decode_q4_row(w: &Q4Weights<'_>, row: usize, first_group: usize, out: &mut [f32]) {
    let book = w.kind().codebook();
    let scales = w.scales_row(row);
    let offsets = w.offsets_row(row);
    let half_group = w.group() / 2;
    let codes_row = &w.packed_row(row)[first_group * half_group..];
    for (g, (codes, dst)) in codes_row
        .chunks_exact(half_group)
        .zip(out.chunks_exact_mut(w.group()))
        .enumerate()
        .map(|(i, c)| (first_group + i, c))
    {
        let s = scales[g].to_f32();
        let o = offsets.get(g).map_or(0.0, |o| o.to_f32());
        let table: [f32; 16] = std::array::from_fn(|q| s * book[q] + o);
        for (pair, &byte) in dst.chunks_exact_mut(2).zip(codes) {
            pair[0] = table[(byte & 0x0f) as usize];
            pair[1] = table[(byte >> 4) as usize];
        }
    }
}

/// AVX-512 row decoder: the per-group table lives in one register and `vpermps` looks up
/// 16 codes at once; `vpermt2ps` re-interleaves even (low-nibble) and odd (high-nibble)
/// weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_q4_row_avx512(w: &Q4Weights<'_>, row: usize, first_group: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let book = w.kind().codebook();
    let scales = w.scales_row(row);
    let offsets = w.offsets_row(row);
    let packed = w.packed_row(row);
    let group = w.group();
    // SAFETY: `book` has 16 floats; unaligned load.
    let book_v = unsafe { _mm512_loadu_ps(book.as_ptr()) };
    let mask = _mm512_set1_epi32(0x0f);
    let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (i, g) in (first_group..first_group + out.len() / group).enumerate() {
        let s = _mm512_set1_ps(scales[g].to_f32());
        let o = _mm512_set1_ps(offsets.get(g).map_or(0.0, |o| o.to_f32()));
        let table = _mm512_fmadd_ps(s, book_v, o);
        // Each step decodes 16 bytes = 32 weights; groups are multiples of 32.
        for step in 0..group / 32 {
            let byte_at = g * group / 2 + step * 16;
            let out_at = i * group + step * 32;
            // SAFETY: byte_at + 16 <= K/2 = packed.len() because group g lies in the row.
            let bytes = unsafe { _mm_loadu_si128(packed.as_ptr().add(byte_at) as *const __m128i) };
            let codes = _mm512_cvtepu8_epi32(bytes);
            let lo = _mm512_permutexvar_ps(_mm512_and_si512(codes, mask), table);
            let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(codes), table);
            // SAFETY: out_at + 32 <= out.len(), which holds whole groups.
            unsafe {
                _mm512_storeu_ps(
                    out.as_mut_ptr().add(out_at),
                    _mm512_permutex2var_ps(lo, lo_idx, hi),
                );
                _mm512_storeu_ps(
                    out.as_mut_ptr().add(out_at + 16),
                    _mm512_permutex2var_ps(lo, hi_idx, hi),
                );
            }
        }
    }
}

/// Largest decoded tile per thread, in f32 elements (4 MiB): with two threads the tiles
/// stay in a 32 MiB L3 next to the packed activations.
const TILE_ELEMS: usize = 1 << 20;
/// Most weight rows per tile. Every tile makes the multiply re-pack all of x, so tiles
/// should be tall; 512 rows keep that re-packing far below the multiply's own cost.
const MAX_TILE_ROWS: usize = 512;

/// `y[M, N] = x[M, K] * W^T (+ bias)` by tiles of W. Lengths are checked by the caller.
///
/// Each task owns a block of output columns (a "panel" of weight rows) and walks K in
/// column blocks, accumulating into y; panels are sized so every thread gets several.
pub(crate) fn linear_by_panels(
    x: &[f32],
    m: usize,
    w: &dyn DecodeRows,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (n, k) = (w.rows(), w.cols());
    init_output(y, n, bias);
    let threads = rayon::current_num_threads().max(1);
    let rows = n
        .div_ceil(4 * threads)
        .next_multiple_of(16)
        .clamp(16, MAX_TILE_ROWS);
    let align = w.col_align();
    let cols = (TILE_ELEMS / rows / align).max(1) * align;
    let cols = cols.min(k);
    let panels = n.div_ceil(rows);
    let y_ptr = SendPtr(y.as_mut_ptr());
    (0..panels).into_par_iter().for_each_init(
        || vec![0.0f32; rows * cols],
        |tile, p| {
            let first = p * rows;
            let panel_rows = rows.min(n - first);
            for k0 in (0..k).step_by(cols) {
                let kb = cols.min(k - k0);
                let tile = &mut tile[..panel_rows * kb];
                w.decode_block(first, k0..k0 + kb, tile);
                // SAFETY: each task writes only columns first..first+panel_rows of y,
                // disjoint from every other task's; x and the tile are only read. The
                // strides describe x[:, k0..k0+kb] of row-major x [M, K], the tile as
                // W^T [kb, panel_rows], and y [M, N] row-major.
                unsafe {
                    gemm::gemm(
                        m,
                        panel_rows,
                        kb,
                        y_ptr.get().add(first),
                        1,
                        n as isize,
                        true,
                        x.as_ptr().add(k0),
                        1,
                        k as isize,
                        tile.as_ptr(),
                        kb as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            }
        },
    );
}

/// Small-M linear layer on decoded rows: each task decodes one weight row at a time into
/// a K-long buffer and dots it with every row of x, so each weight is read from memory
/// once and nothing larger than a row is ever decoded. Lengths are checked by the caller.
pub(crate) fn linear_by_rows(
    x: &[f32],
    m: usize,
    w: &dyn DecodeRows,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (n, k) = (w.rows(), w.cols());
    let threads = rayon::current_num_threads().max(1);
    let rows_per_task = n.div_ceil(4 * threads).max(1);
    let y_ptr = SendPtr(y.as_mut_ptr());
    (0..n.div_ceil(rows_per_task))
        .into_par_iter()
        .for_each_init(
            || vec![0.0f32; k],
            |row_buf, t| {
                for j in t * rows_per_task..((t + 1) * rows_per_task).min(n) {
                    w.decode_block(j, 0..k, row_buf);
                    let b = bias.map_or(0.0, |b| b[j]);
                    for (i, x_row) in x.chunks_exact(k).enumerate() {
                        // SAFETY: element (i, j) of y [M, N]; row j belongs to this task only.
                        unsafe { *y_ptr.get().add(i * n + j) = dot(x_row, row_buf) + b };
                    }
                }
            },
        );
    debug_assert_eq!(y.len(), m * n);
}

/// Dot product with sixteen independent partial sums, which the compiler vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for l in 0..16 {
            acc[l] += ca[l] * cb[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Fills every row of `y [M, N]` with the bias (or zeros), so the multiply can accumulate.
pub(crate) fn init_output(y: &mut [f32], n: usize, bias: Option<&[f32]>) {
    match bias {
        Some(b) => y.chunks_exact_mut(n).for_each(|row| row.copy_from_slice(b)),
        None => y.fill(0.0),
    }
}

/// A raw pointer that may cross threads; users guarantee disjoint writes.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand out disjoint column ranges of one output matrix.
unsafe impl Send for SendPtr {}
// SAFETY: as above, tasks never touch the same element.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
