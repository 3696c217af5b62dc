/*
 * W4A16 GEMV for 1 <= m <= 8: y[m, n] = x[m, k] . W^T (+ bias), W 4-bit in the atom layout
 * of q4_layout.cuh, f16 in and out, f32 accumulation.
 *
 * At m <= 8 the work is bound by reading the weights once (0.5 byte per weight plus the
 * scales); everything here serves that:
 * - One block (8 warps) per 16-row strip; the 8 warps split the strip's atoms along k
 *   round-robin, so one strip's 512-byte atoms are read by different warps at once and
 *   a block keeps 8 x U x 512 bytes in flight. Rows never straddle blocks, so no atomics
 *   and no second pass: the 8 partial sums are added in shared memory at the end.
 * - Each lane reads its 16 bytes of an atom with one ld.global.nc.L1::no_allocate.v4
 *   (a warp reads 512 contiguous bytes); U = 4 atoms are loaded before the first is
 *   used, so 4 independent 16-byte loads per lane are in flight.
 * - Dequant in registers: INT4 by the lop3 / 0x6400 magic-number trick (exact f16
 *   integers, then f32), NF4 by a 16-entry f32 codebook in shared memory (16 distinct
 *   words in 16 distinct banks: a warp's lookups never conflict).
 * - Scale and offset are applied once per half-atom (32 codes of one group) on the
 *   per-lane dot product: acc += s * sum(x q) + o * sum(x), not once per weight.
 * - The 4 lanes of a quad (same g, different t) hold the same rows at different k:
 *   two xor-shuffles reduce them, then shared memory reduces the 8 warps; the bias add
 *   and f16 store are fused in that last step.
 * - Templated on M so every loop over the batch rows is unrolled and the accumulators
 *   stay in registers.
 * x (f16 [m, k]) is read with 4-byte loads through L1: it is small and shared by every
 * block, so it stays cache-resident. At m = 8 those loads, not DRAM, may limit the H100.
 *
 * ptxas -v (CUDA 13.0), registers per thread for M = 1..8; 0 bytes stack, 0 spill
 * stores / loads in every instance (cuda/tests/run.sh fails otherwise):
 *   int4     sm_87: 48 64 64 78 80 80 100 99    sm_90: 58 64 75 80 80 96 101 104
 *   int4sym  sm_87: 48 58 64 64 80 80 80 98     sm_90: 57 59 64 64 80 80 80 101
 *   nf4      sm_87: 48 48 64 76 77 80 80 99     sm_90: 48 57 64 73 80 80 80 100
 */
#include "common.cuh"

namespace {

constexpr int kGemvWarps = 8;
constexpr int kGemvUnroll = 4;

template <int KIND, int M>
__global__ void __launch_bounds__(kGemvWarps * 32)
    hp_gemv_q4_kernel(const __half *__restrict__ x, const uint4 *__restrict__ qw,
                      const __half *__restrict__ scales, const __half *__restrict__ offsets,
                      const __half *__restrict__ bias, __half *__restrict__ y, int n, int k,
                      int group) {
    __shared__ float nf4[16];
    __shared__ float red[kGemvWarps][M][16];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    if (KIND == HP_Q4_NF4) {
        const float levels[16] = HP_NF4_LEVELS;
        if (threadIdx.x < 16) nf4[threadIdx.x] = levels[threadIdx.x];
        __syncthreads();
    }
    const int64_t strip = blockIdx.x;
    const int kblocks = (k + 63) / 64;
    const int groups = k / group;
    const int64_t row0 = strip * 16 + g, row1 = row0 + 8;
    const bool ok0 = row0 < n, ok1 = row1 < n;
    // 32 uint4 per atom; this lane's 16 bytes of the strip's first atom.
    const uint4 *base = qw + strip * kblocks * 32 + lane;

    float acc[2][M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = 0.0f;

    for (int kb0 = warp; kb0 < kblocks; kb0 += kGemvWarps * kGemvUnroll) {
        uint4 raw[kGemvUnroll];
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
            const int kb = kb0 + u * kGemvWarps;
            raw[u] = kb < kblocks ? hp_ld_stream16(base + (int64_t)kb * 32) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
            const int kb = kb0 + u * kGemvWarps;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int kh = kb * 64 + 32 * h;
                // k % 32 == 0: a half-atom is wholly inside k or wholly padding.
                if (kb < kblocks && kh < k) {
                    const int gi = kh / group;
                    const float s0 = ok0 ? __half2float(scales[row0 * groups + gi]) : 0.0f;
                    const float s1 = ok1 ? __half2float(scales[row1 * groups + gi]) : 0.0f;
                    float o0 = 0.0f, o1 = 0.0f;
                    if (KIND == HP_Q4_INT4) {
                        o0 = ok0 ? __half2float(offsets[row0 * groups + gi]) : 0.0f;
                        o1 = ok1 ? __half2float(offsets[row1 * groups + gi]) : 0.0f;
                    }
                    const uint32_t wds[2] = {h ? raw[u].z : raw[u].x, h ? raw[u].w : raw[u].y};
                    float dot[2][M], sx[M];
#pragma unroll
                    for (int m = 0; m < M; ++m) dot[0][m] = dot[1][m] = sx[m] = 0.0f;
                    hp_gemv_half_atom<KIND, M>(wds, x, k, kh + 2 * t, nf4, dot, sx);
#pragma unroll
                    for (int m = 0; m < M; ++m) {
                        acc[0][m] = fmaf(s0, dot[0][m], acc[0][m]);
                        acc[1][m] = fmaf(s1, dot[1][m], acc[1][m]);
                        if (KIND == HP_Q4_INT4) {
                            acc[0][m] = fmaf(o0, sx[m], acc[0][m]);
                            acc[1][m] = fmaf(o1, sx[m], acc[1][m]);
                        }
                    }
                }
            }
        }
    }

    // Quad reduction: lanes 4g..4g+3 hold rows g and g+8 over disjoint k.
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float v = acc[j][m];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            acc[j][m] = v;
        }
    }
    if (t == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            red[warp][m][g] = acc[0][m];
            red[warp][m][g + 8] = acc[1][m];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < M * 16; idx += blockDim.x) {
        const int m = idx >> 4, r = idx & 15;
        const int64_t row = strip * 16 + r;
        if (row < n) {
            float v = 0.0f;
#pragma unroll
            for (int w = 0; w < kGemvWarps; ++w) v += red[w][m][r];
            if (bias != nullptr) v += __half2float(bias[row]);
            y[(int64_t)m * n + row] = __float2half_rn(v);
        }
    }
}

template <int KIND, int M>
void hp_gemv_launch(const uint16_t *x, const uint8_t *qw, const uint16_t *scales,
                    const uint16_t *offsets, const uint16_t *bias, uint16_t *y, int32_t n,
                    int32_t k, int32_t group, cudaStream_t stream) {
    const unsigned strips = (unsigned)(hp_q4_n_pad(n) / 16);
    hp_gemv_q4_kernel<KIND, M><<<strips, kGemvWarps * 32, 0, stream>>>(
        reinterpret_cast<const __half *>(x), reinterpret_cast<const uint4 *>(qw),
        reinterpret_cast<const __half *>(scales), reinterpret_cast<const __half *>(offsets),
        reinterpret_cast<const __half *>(bias), reinterpret_cast<__half *>(y), n, k, group);
}

template <int KIND>
int32_t hp_gemv(const uint16_t *x, const uint8_t *qw, const uint16_t *scales,
                const uint16_t *offsets, const uint16_t *bias, uint16_t *y, int32_t m, int32_t n,
                int32_t k, int32_t group, void *stream) {
    const int32_t st = hp_check_linear((hp_q4_kind)KIND, x, qw, scales, offsets, y, m, n, k,
                                       group, HP_GEMV_MAX_M, 4);
    if (st != HP_LAUNCH_OK) return st;
    HP_REQUIRE(bias == nullptr || hp_aligned(bias, 2));
    const cudaStream_t s = (cudaStream_t)stream;
    switch (m) {
    case 1: hp_gemv_launch<KIND, 1>(x, qw, scales, offsets, bias, y, n, k, group, s); break;
    case 2: hp_gemv_launch<KIND, 2>(x, qw, scales, offsets, bias, y, n, k, group, s); break;
    case 3: hp_gemv_launch<KIND, 3>(x, qw, scales, offsets, bias, y, n, k, group, s); break;
    case 4: hp_gemv_launch<KIND, 4>(x, qw, scales, offsets, bias, y, n, k, group, s); break;
    case 5: hp_gemv_launch<KIND, 5>(x, qw, scales, offsets, bias, y, n, k, group, s); break;
    case 6: hp_gemv_launch<KIND, 6>(x, qw, scales, offsets, bias, y, n, k, group, s); break;
    case 7: hp_gemv_launch<KIND, 7>(x, qw, scales, offsets, bias, y, n, k, group, s); break;
    default: hp_gemv_launch<KIND, 8>(x, qw, scales, offsets, bias, y, n, k, group, s); break;
    }
    HP_RETURN_LAUNCH_STATUS();
}

} // namespace

HP_Q4_LINEAR_LAUNCHER(gemv, int4, HP_Q4_INT4)
HP_Q4_LINEAR_LAUNCHER(gemv, int4sym, HP_Q4_INT4SYM)
HP_Q4_LINEAR_LAUNCHER(gemv, nf4, HP_Q4_NF4)
