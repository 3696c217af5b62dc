/*
 * W4A16 GEMM on tensor cores for any m >= 1: y[m, n] = x[m, k] . W^T (+ bias), W 4-bit in
 * the atom layout of q4_layout.cuh, f16 operands, f32 accumulators, f16 out.
 *
 * Tiles. A block computes a BM x 128 tile of y; its warps are WARPS_M x 4, each warp a
 * (MT * 16) x 32 sub-tile (MT m16 tiles times 4 n8 tiles, i.e. two weight strips).
 *   m > 64:       BM = 128, 8 warps, warp tile 64 x 32, 64 f32 accumulators per lane.
 *                 Each dequantised B register feeds MT = 4 mma, each A fragment 4 mma:
 *                 enough reuse that dequant stays under the tensor-core time. 128 x 128
 *                 tiles give 19 x 32 = 608 blocks for SD3.5's (4096 x 2432) linears:
 *                 4.6 waves on a 132-SM H100, 38 on a 16-SM Orin.
 *   17 <= m <= 64: BM = 64, 4 warps (one m row of warps): no wasted MMA rows past 64.
 *   m <= 16:      BM = 16, 4 warps, warp tile 16 x 32: weight-bound; the tensor cores
 *                 idle, what counts is streaming W once, which this tile does.
 * BN = 128 (8 strips) for all: the B tile of one stage is 8 atoms = 4 KB, one or two
 * 16-byte cp.async per thread.
 *
 * Pipeline. BK = 64 (one atom column) per stage, 4 stages of cp.async (.cg, 16 bytes):
 * while the tensor cores work on stage i, stages i+1..i+3 are in flight. One
 * __syncthreads per k tile both publishes the landed stage and retires the stage the
 * next copy overwrites. Rows of A past m and chunks past k are zero-filled by cp.async
 * src-size 0; strips past n_pad likewise (their codes become 0, and their outputs are
 * never stored).
 *
 * A: a [BM][64] f16 tile per stage, 16-byte chunks XOR-swizzled by row (q4_layout.cuh) so
 * that both the cp.async stores and ldmatrix.x4 reads are bank-conflict-free; one
 * ldmatrix.x4 gives one m16k16 A fragment.
 * B: each lane reads its 16 bytes of each of its warp's two atoms with one 16-byte
 * shared load (a warp reads 512 contiguous bytes: conflict-free), and every 32-bit word
 * is one k16 step: four half2 after the lop3 trick, i.e. the two B registers of both n8
 * tiles of the strip, scaled with one HFMA2 / HMUL2 per register (hp_q4_b_frag).
 * Scales / offsets: read straight from global (canonical [n, k/group] layout) one k tile
 * ahead into registers, so their latency hides behind a whole tile of MMAs.
 * Epilogue: bias added to the f32 accumulators, converted to f16, stored with bounds
 * checks on m and n.
 *
 * ptxas -v (CUDA 13.0), registers per thread (sm_87 / sm_90); 0 bytes stack, 0 spill
 * stores / loads in every instance (cuda/tests/run.sh fails otherwise):
 *              BM = 16      BM = 64      BM = 128
 *   int4       121 / 124    242 / 244    243 / 243
 *   int4sym    104 / 108    208 / 210    199 / 200
 *   nf4        111 / 119    176 / 178    167 / 167
 * The BM = 128 tile runs one 256-thread block per SM (8 warps); latency is covered by
 * the 4-stage pipeline rather than by occupancy.
 */
#include "common.cuh"

namespace {

constexpr int kBN = 128;
constexpr int kBK = 64;
constexpr int kStages = 4;
constexpr int kWarpsN = 4;

template <int WARPS_M, int MT> struct GemmCfg {
    static constexpr int kBM = WARPS_M * MT * 16;
    static constexpr int kThreads = WARPS_M * kWarpsN * 32;
    static constexpr int kAStage = kBM * kBK;             // halves
    static constexpr int kBStage = kBN * kBK / 2;         // bytes
    static constexpr int kSmem = kStages * (kAStage * 2 + kBStage);
};

template <int KIND, int WARPS_M, int MT>
__global__ void __launch_bounds__(GemmCfg<WARPS_M, MT>::kThreads, 1)
    hp_gemm_q4_kernel(const __half *__restrict__ x, const uint8_t *__restrict__ qw,
                      const __half *__restrict__ scales, const __half *__restrict__ offsets,
                      const __half *__restrict__ bias, __half *__restrict__ y, int m, int n,
                      int k, int group) {
    using Cfg = GemmCfg<WARPS_M, MT>;
    extern __shared__ __align__(16) uint8_t smem[];
    __half *As = reinterpret_cast<__half *>(smem);
    uint8_t *Bs = smem + kStages * Cfg::kAStage * 2;
    __shared__ uint16_t nf4h[16];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / kWarpsN, wn = warp % kWarpsN;
    const int g = lane >> 2, t = lane & 3;
    const int64_t m0 = (int64_t)blockIdx.y * Cfg::kBM;
    const int64_t n0 = (int64_t)blockIdx.x * kBN;
    const int kblocks = (k + kBK - 1) / kBK;
    const int64_t strips = (n + 15) / 16;
    const int groups = k / group;

    if (KIND == HP_Q4_NF4) {
        const float levels[16] = HP_NF4_LEVELS;
        if (tid < 16) nf4h[tid] = __half_as_ushort(__float2half_rn(levels[tid]));
    }

    // Issues the cp.async copies of k tile `kt` into stage `st`.
    auto load_tile = [&](int st, int kt) {
        const int64_t k0 = (int64_t)kt * kBK;
        __half *as = As + st * Cfg::kAStage;
#pragma unroll
        for (int i = 0; i < (Cfg::kBM * 8 + Cfg::kThreads - 1) / Cfg::kThreads; ++i) {
            const int c = tid + i * Cfg::kThreads;
            if (Cfg::kBM * 8 % Cfg::kThreads == 0 || c < Cfg::kBM * 8) {
                const int row = c >> 3, ch = c & 7;
                const bool ok = m0 + row < m && k0 + ch * 8 < k;
                const __half *src = ok ? x + (m0 + row) * k + k0 + ch * 8 : x;
                hp_cp_async16(as + row * kBK + hp_a_swizzle(row, ch) * 8, src, ok);
            }
        }
        uint8_t *bs = Bs + st * Cfg::kBStage;
#pragma unroll
        for (int i = 0; i < (kBN * 2) / Cfg::kThreads; ++i) {
            const int c = tid + i * Cfg::kThreads; // 16-byte chunk: atom c / 32, lane c % 32
            const int64_t strip = n0 / 16 + (c >> 5);
            const bool ok = strip < strips;
            const uint8_t *src =
                ok ? qw + ((strip * kblocks + kt) * 32 + (c & 31)) * 16 : qw;
            hp_cp_async16(bs + c * 16, src, ok);
        }
    };

    // Scale / offset of this lane's rows for the two half-atoms of k tile kt:
    // [half][atom][j], rows n0 + 32 wn + 16 atom + 8 j + g (clamped to n - 1: those
    // columns are never stored), groups clamped to the last one (the padded half-atom
    // multiplies zero-filled A).
    __half sc[2][2][2], of[2][2][2], sc_n[2][2][2], of_n[2][2][2];
    auto load_scales = [&](int kt, __half s_out[2][2][2], __half o_out[2][2][2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int gi = (kt * kBK + 32 * h) / group;
            gi = gi < groups ? gi : groups - 1;
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    int64_t r = n0 + 32 * wn + 16 * a + 8 * j + g;
                    r = r < n ? r : n - 1;
                    s_out[h][a][j] = scales[r * groups + gi];
                    o_out[h][a][j] = KIND == HP_Q4_INT4 ? offsets[r * groups + gi] : __half();
                }
        }
    };

    float acc[MT][4][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
        if (st < kblocks) load_tile(st, st);
        hp_cp_async_commit();
    }
    load_scales(0, sc, of);

    for (int kt = 0; kt < kblocks; ++kt) {
        hp_cp_async_wait<kStages - 2>();
        __syncthreads(); // stage kt landed for all threads; stage kt-1 fully consumed
        {
            const int nk = kt + kStages - 1;
            if (nk < kblocks) load_tile(nk % kStages, nk);
            hp_cp_async_commit();
        }
        if (kt + 1 < kblocks) load_scales(kt + 1, sc_n, of_n);

        const int st = kt % kStages;
        const __half *as = As + st * Cfg::kAStage + (wm * MT * 16) * kBK;
        const uint8_t *bs = Bs + st * Cfg::kBStage + (wn * 2) * HP_Q4_ATOM_BYTES + lane * 16;
        const uint4 braw0 = *reinterpret_cast<const uint4 *>(bs);
        const uint4 braw1 = *reinterpret_cast<const uint4 *>(bs + HP_Q4_ATOM_BYTES);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                int row, ch;
                hp_ldmatrix_a_src(lane, s, &row, &ch);
                hp_ldmatrix_x4(a[mt], as + (mt * 16 + row) * kBK + hp_a_swizzle(row, ch) * 8);
            }
#pragma unroll
            for (int at = 0; at < 2; ++at) {
                const uint4 &br = at ? braw1 : braw0;
                const uint32_t w = s == 0 ? br.x : s == 1 ? br.y : s == 2 ? br.z : br.w;
                uint32_t b[2][2];
                hp_q4_b_frag<KIND>(w, sc[s >> 1][at], of[s >> 1][at], nf4h, b);
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        hp_mma_16816(acc[mt][at * 2 + j], a[mt], b[j][0], b[j][1]);
            }
        }
        if (kt + 1 < kblocks) {
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int a = 0; a < 2; ++a)
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        sc[h][a][j] = sc_n[h][a][j];
                        of[h][a][j] = of_n[h][a][j];
                    }
        }
    }
    hp_cp_async_wait<0>();

    // Epilogue: accumulator c_i of lane (g, t) is row g (+8 for i >= 2), column 2t + (i & 1).
    const bool pair_store = (n & 1) == 0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int64_t col = n0 + 32 * wn + 8 * nt + 2 * t;
            if (col >= n) continue;
            const bool has2 = col + 1 < n;
            const float b0 = bias != nullptr ? __half2float(bias[col]) : 0.0f;
            const float b1 = bias != nullptr && has2 ? __half2float(bias[col + 1]) : 0.0f;
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                const int64_t row = m0 + wm * MT * 16 + mt * 16 + g + 8 * hr;
                if (row >= m) continue;
                const float v0 = acc[mt][nt][2 * hr] + b0, v1 = acc[mt][nt][2 * hr + 1] + b1;
                __half *dst = y + row * n + col;
                if (pair_store && has2) {
                    *reinterpret_cast<__half2 *>(dst) = __floats2half2_rn(v0, v1);
                } else {
                    dst[0] = __float2half_rn(v0);
                    if (has2) dst[1] = __float2half_rn(v1);
                }
            }
        }
}

template <int KIND, int WARPS_M, int MT>
int32_t hp_gemm_launch(const uint16_t *x, const uint8_t *qw, const uint16_t *scales,
                       const uint16_t *offsets, const uint16_t *bias, uint16_t *y, int32_t m,
                       int32_t n, int32_t k, int32_t group, cudaStream_t stream) {
    using Cfg = GemmCfg<WARPS_M, MT>;
    const int64_t mtiles = ((int64_t)m + Cfg::kBM - 1) / Cfg::kBM;
    HP_REQUIRE(mtiles <= 65535);
    auto kern = hp_gemm_q4_kernel<KIND, WARPS_M, MT>;
    // Above 48 KB of dynamic shared memory a kernel must opt in; idempotent and cheap.
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem) !=
        cudaSuccess)
        return HP_LAUNCH_ERR_LAUNCH;
    const dim3 grid((unsigned)((n + kBN - 1) / kBN), (unsigned)mtiles);
    kern<<<grid, Cfg::kThreads, Cfg::kSmem, stream>>>(
        reinterpret_cast<const __half *>(x), qw, reinterpret_cast<const __half *>(scales),
        reinterpret_cast<const __half *>(offsets), reinterpret_cast<const __half *>(bias),
        reinterpret_cast<__half *>(y), m, n, k, group);
    HP_RETURN_LAUNCH_STATUS();
}

template <int KIND>
int32_t hp_gemm(const uint16_t *x, const uint8_t *qw, const uint16_t *scales,
                const uint16_t *offsets, const uint16_t *bias, uint16_t *y, int32_t m, int32_t n,
                int32_t k, int32_t group, void *stream) {
    const int32_t st = hp_check_linear((hp_q4_kind)KIND, x, qw, scales, offsets, y, m, n, k,
                                       group, INT32_MAX, 16);
    if (st != HP_LAUNCH_OK) return st;
    HP_REQUIRE(bias == nullptr || hp_aligned(bias, 2));
    const cudaStream_t s = (cudaStream_t)stream;
    if (m <= 16) return hp_gemm_launch<KIND, 1, 1>(x, qw, scales, offsets, bias, y, m, n, k, group, s);
    if (m <= 64) return hp_gemm_launch<KIND, 1, 4>(x, qw, scales, offsets, bias, y, m, n, k, group, s);
    return hp_gemm_launch<KIND, 2, 4>(x, qw, scales, offsets, bias, y, m, n, k, group, s);
}

} // namespace

HP_Q4_LINEAR_LAUNCHER(gemm, int4, HP_Q4_INT4)
HP_Q4_LINEAR_LAUNCHER(gemm, int4sym, HP_Q4_INT4SYM)
HP_Q4_LINEAR_LAUNCHER(gemm, nf4, HP_Q4_NF4)
