/*
 * Multi-head attention for the joint image + context sequence, flash-style: the
 * [seq, seq] score matrix is never materialised. For SD3.5 Large at 1024 x 1024 that
 * matrix would be 4429^2 x 38 heads x 2 bytes = 1.5 GB per batch entry, which is why an
 * unfused softmax(QK^T)V cannot run on an 8-16 GB Jetson at all.
 *
 * Work split. Grid (query tiles, heads, batch); 128 threads per block. A query row is
 * owned by TPR = head_dim / DT consecutive lanes, each holding DT = min(head_dim, 32)
 * of its dimensions in registers (q pre-scaled by scale * log2(e) so the softmax uses
 * exp2, and an f32 accumulator). TPR divides 32, so a row's lanes sit in one warp and
 * combine their partial dot products with xor shuffles. With head_dim = 64 (every
 * SD3 / SD3.5 model) a block covers 64 query rows and each thread keeps 32 + 32 f32
 * registers for q and the accumulator.
 *
 * Keys and values stream through shared memory in tiles of 64 keys (16-byte loads,
 * 2 x 64 x 128 B = 16 KB at head_dim 64). Every lane of a warp reads the same key row,
 * so the shared loads are broadcasts (no bank conflicts). Scores are taken 16 keys at a
 * time: one running-max update and one rescale of the accumulator per 16 keys instead
 * of per key (online softmax, running max and sum in f32).
 *
 * This runs on the CUDA cores (about 2 x head_dim FMAs per query-key pair). A
 * tensor-core version (mma.sync for QK^T and PV, as in FlashAttention-2) is the next
 * step; this one is the correct, simple reference the device path starts from.
 */
#include <math_constants.h>

#include "common.cuh"

namespace {

constexpr int kThreads = 128;
constexpr int kKeysPerTile = 64;
constexpr int kKeysPerStep = 16;

template <int HeadDim>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(const __half *__restrict__ q, const __half *__restrict__ k,
                     const __half *__restrict__ v, __half *__restrict__ out, int seq,
                     int row_stride, float scale_log2) {
    constexpr int DT = HeadDim < 32 ? HeadDim : 32;  // dimensions per thread
    constexpr int TPR = HeadDim / DT;                // threads per query row
    constexpr int kRows = kThreads / TPR;            // query rows per block
    constexpr int kChunks = HeadDim / 8;             // 16-byte chunks per key row
    __shared__ __align__(16) __half ks[kKeysPerTile * HeadDim];
    __shared__ __align__(16) __half vs[kKeysPerTile * HeadDim];

    const int head = blockIdx.y;
    const size_t base = (size_t)blockIdx.z * seq * row_stride + (size_t)head * HeadDim;
    const int row = blockIdx.x * kRows + threadIdx.x / TPR;
    const int part = threadIdx.x % TPR;
    const bool active = row < seq;

    float qr[DT];
    float acc[DT];
#pragma unroll
    for (int d = 0; d < DT; ++d) {
        qr[d] = active ? __half2float(q[base + (size_t)row * row_stride + part * DT + d]) *
                             scale_log2
                       : 0.f;
        acc[d] = 0.f;
    }
    float run_max = -CUDART_INF_F;
    float run_sum = 0.f;

    for (int t0 = 0; t0 < seq; t0 += kKeysPerTile) {
        // Inactive threads (rows past seq) still load tiles and shuffle: every lane of
        // the block takes part in both, so the full-mask shuffles below are well-defined.
        for (int i = threadIdx.x; i < kKeysPerTile * kChunks; i += kThreads) {
            const int key = t0 + i / kChunks;
            const int chunk = i % kChunks;
            uint4 kv = make_uint4(0, 0, 0, 0);
            uint4 vv = make_uint4(0, 0, 0, 0);
            if (key < seq) {
                const size_t at = base + (size_t)key * row_stride + chunk * 8;
                kv = *reinterpret_cast<const uint4 *>(k + at);
                vv = *reinterpret_cast<const uint4 *>(v + at);
            }
            reinterpret_cast<uint4 *>(ks)[i] = kv;
            reinterpret_cast<uint4 *>(vs)[i] = vv;
        }
        __syncthreads();

        const int keys = min(kKeysPerTile, seq - t0);
        for (int j0 = 0; j0 < keys; j0 += kKeysPerStep) {
            float s[kKeysPerStep];
            float step_max = -CUDART_INF_F;
#pragma unroll
            for (int j = 0; j < kKeysPerStep; ++j) {
                const __half2 *kr =
                    reinterpret_cast<const __half2 *>(ks + (j0 + j) * HeadDim + part * DT);
                float dot = 0.f;
#pragma unroll
                for (int c = 0; c < DT / 2; ++c) {
                    const float2 kf = __half22float2(kr[c]);
                    dot = fmaf(qr[2 * c], kf.x, dot);
                    dot = fmaf(qr[2 * c + 1], kf.y, dot);
                }
#pragma unroll
                for (int off = 1; off < TPR; off <<= 1)
                    dot += __shfl_xor_sync(0xffffffffu, dot, off);
                s[j] = (j0 + j < keys) ? dot : -CUDART_INF_F;
                step_max = fmaxf(step_max, s[j]);
            }
            // j0 < keys, so at least one score is finite and new_max is finite.
            const float new_max = fmaxf(run_max, step_max);
            const float correction = exp2f(run_max - new_max);  // 0 on the first step
            run_sum *= correction;
#pragma unroll
            for (int d = 0; d < DT; ++d) acc[d] *= correction;
#pragma unroll
            for (int j = 0; j < kKeysPerStep; ++j) {
                const float p = exp2f(s[j] - new_max);  // exactly 0 for masked keys
                run_sum += p;
                const __half2 *vr =
                    reinterpret_cast<const __half2 *>(vs + (j0 + j) * HeadDim + part * DT);
#pragma unroll
                for (int c = 0; c < DT / 2; ++c) {
                    const float2 vf = __half22float2(vr[c]);
                    acc[2 * c] = fmaf(p, vf.x, acc[2 * c]);
                    acc[2 * c + 1] = fmaf(p, vf.y, acc[2 * c + 1]);
                }
            }
            run_max = new_max;
        }
        __syncthreads();
    }

    if (active) {
        const float inv = 1.f / run_sum;
        __half2 *o = reinterpret_cast<__half2 *>(out + base + (size_t)row * row_stride + part * DT);
#pragma unroll
        for (int c = 0; c < DT / 2; ++c) o[c] = __floats2half2_rn(acc[2 * c] * inv, acc[2 * c + 1] * inv);
    }
}

template <int HeadDim>
int32_t launch(const __half *q, const __half *k, const __half *v, __half *out, int batch, int seq,
               int heads, int row_stride, float scale_log2, cudaStream_t stream) {
    constexpr int DT = HeadDim < 32 ? HeadDim : 32;
    constexpr int kRows = kThreads / (HeadDim / DT);
    const dim3 grid((unsigned)((seq + kRows - 1) / kRows), (unsigned)heads, (unsigned)batch);
    attention_kernel<HeadDim><<<grid, kThreads, 0, stream>>>(q, k, v, out, seq, row_stride,
                                                             scale_log2);
    HP_RETURN_LAUNCH_STATUS();
}

}  // namespace

extern "C" int32_t hp_launch_attention_f16(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                           uint16_t *out, int32_t batch, int32_t seq,
                                           int32_t heads, int32_t head_dim, int32_t row_stride,
                                           float scale, void *stream) {
    HP_REQUIRE(q != nullptr && k != nullptr && v != nullptr && out != nullptr);
    HP_REQUIRE(batch >= 1 && batch <= 65535 && seq >= 1 && heads >= 1 && heads <= 65535);
    HP_REQUIRE((long long)heads * head_dim <= row_stride && row_stride % 8 == 0);
    HP_REQUIRE(hp_aligned(q, 16) && hp_aligned(k, 16) && hp_aligned(v, 16) && hp_aligned(out, 16));
    HP_REQUIRE(isfinite(scale) && scale > 0.f);
    const float scale_log2 = scale * 1.4426950408889634f;  // log2(e): softmax via exp2
    const auto *qh = reinterpret_cast<const __half *>(q);
    const auto *kh = reinterpret_cast<const __half *>(k);
    const auto *vh = reinterpret_cast<const __half *>(v);
    auto *oh = reinterpret_cast<__half *>(out);
    const auto s = (cudaStream_t)stream;
    switch (head_dim) {
    case 8: return launch<8>(qh, kh, vh, oh, batch, seq, heads, row_stride, scale_log2, s);
    case 16: return launch<16>(qh, kh, vh, oh, batch, seq, heads, row_stride, scale_log2, s);
    case 32: return launch<32>(qh, kh, vh, oh, batch, seq, heads, row_stride, scale_log2, s);
    case 64: return launch<64>(qh, kh, vh, oh, batch, seq, heads, row_stride, scale_log2, s);
    case 128: return launch<128>(qh, kh, vh, oh, batch, seq, heads, row_stride, scale_log2, s);
    default: return HP_LAUNCH_ERR_ARGUMENT;
    }
}
