/*
 * Normalisations of the MMDiT block: adaLN (LayerNorm without affine weights, then the
 * per-batch modulation x * (1 + scale) + shift) and the per-head RMS norm of q and k.
 *
 * Both are memory-bound: one warp owns one row (LayerNorm) or one (row, head) slice
 * (RMS norm), so no shared memory and no __syncthreads are needed and a block of 8 warps
 * covers 8 rows. The row is read three times (mean, variance, write); for D = 2432 f16
 * that is 4.8 KB per row, which stays in L1/L2 between the passes, so DRAM traffic is
 * one read and one write. Statistics are f32 and the variance is the two-pass form
 * (mean first), which does not cancel catastrophically on rows with a large mean the
 * way E[x^2] - E[x]^2 does in f16-range data.
 */
#include "common.cuh"

namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

/* One warp per row; lanes stride over half2 pairs so every load is 4 bytes and a warp
 * reads 128 contiguous bytes per step. */
__global__ void layer_norm_modulate_kernel(const __half2 *__restrict__ x,
                                           const __half *__restrict__ shift,
                                           const __half *__restrict__ scale,
                                           __half2 *__restrict__ y, int rows, int dim,
                                           int rows_per_batch, int mod_stride, float eps) {
    const int row = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // whole warps leave together: no shuffle sees a missing lane
    const int pairs = dim / 2;
    const __half2 *xr = x + (size_t)row * pairs;

    float sum = 0.f;
    for (int c = lane; c < pairs; c += 32) {
        const float2 v = __half22float2(xr[c]);
        sum += v.x + v.y;
    }
    const float mean = warp_sum(sum) / dim;
    float sq = 0.f;
    for (int c = lane; c < pairs; c += 32) {
        const float2 v = __half22float2(xr[c]);
        sq += (v.x - mean) * (v.x - mean) + (v.y - mean) * (v.y - mean);
    }
    const float rstd = rsqrtf(warp_sum(sq) / dim + eps);

    const size_t mod = (size_t)(row / rows_per_batch) * mod_stride;
    __half2 *yr = y + (size_t)row * pairs;
    for (int c = lane; c < pairs; c += 32) {
        const float2 v = __half22float2(xr[c]);
        float a = (v.x - mean) * rstd;
        float b = (v.y - mean) * rstd;
        if (scale != nullptr) {
            a = a * (1.f + __half2float(scale[mod + 2 * c])) + __half2float(shift[mod + 2 * c]);
            b = b * (1.f + __half2float(scale[mod + 2 * c + 1])) +
                __half2float(shift[mod + 2 * c + 1]);
        }
        yr[c] = __floats2half2_rn(a, b);
    }
}

/* One warp per (row, head): head_dim <= 128 so each lane holds at most 4 values and the
 * slice is read once into registers, then scaled in place. */
__global__ void rms_norm_heads_kernel(__half *__restrict__ x, const __half *__restrict__ weight,
                                      int rows, int heads, int head_dim, int row_stride,
                                      float eps) {
    const long long slice = (long long)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (slice >= (long long)rows * heads) return;
    const int row = (int)(slice / heads);
    const int head = (int)(slice % heads);
    __half *xs = x + (size_t)row * row_stride + (size_t)head * head_dim;
    float v[4];
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = lane + 32 * i;
        v[i] = c < head_dim ? __half2float(xs[c]) : 0.f;
        sq += v[i] * v[i];
    }
    const float r = rsqrtf(warp_sum(sq) / head_dim + eps);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = lane + 32 * i;
        if (c < head_dim) {
            const float w = weight != nullptr ? __half2float(weight[c]) : 1.f;
            xs[c] = __float2half_rn(v[i] * r * w);
        }
    }
}

}  // namespace

extern "C" int32_t hp_launch_layer_norm_modulate_f16(const uint16_t *x, const uint16_t *shift,
                                                     const uint16_t *scale, uint16_t *y,
                                                     int32_t rows, int32_t dim,
                                                     int32_t rows_per_batch, int32_t mod_stride,
                                                     float eps, void *stream) {
    HP_REQUIRE(x != nullptr && y != nullptr);
    HP_REQUIRE((shift == nullptr) == (scale == nullptr));
    HP_REQUIRE(rows >= 1 && dim >= 2 && dim % 2 == 0 && rows_per_batch >= 1);
    HP_REQUIRE(shift == nullptr || mod_stride >= dim);
    HP_REQUIRE(eps >= 0.f);
    HP_REQUIRE(hp_aligned(x, 4) && hp_aligned(y, 4));
    const unsigned blocks = (unsigned)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    layer_norm_modulate_kernel<<<blocks, 32 * kWarpsPerBlock, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<const __half2 *>(x), reinterpret_cast<const __half *>(shift),
        reinterpret_cast<const __half *>(scale), reinterpret_cast<__half2 *>(y), rows, dim,
        rows_per_batch, mod_stride, eps);
    HP_RETURN_LAUNCH_STATUS();
}

extern "C" int32_t hp_launch_rms_norm_heads_f16(uint16_t *x, const uint16_t *weight,
                                                int32_t rows, int32_t heads, int32_t head_dim,
                                                int32_t row_stride, float eps, void *stream) {
    HP_REQUIRE(x != nullptr);
    HP_REQUIRE(rows >= 1 && heads >= 1 && head_dim >= 1 && head_dim <= 128);
    HP_REQUIRE((long long)heads * head_dim <= row_stride);
    HP_REQUIRE(eps >= 0.f);
    const long long slices = (long long)rows * heads;
    const long long blocks = (slices + kWarpsPerBlock - 1) / kWarpsPerBlock;
    HP_REQUIRE(blocks <= 0x7fffffffLL);
    rms_norm_heads_kernel<<<(unsigned)blocks, 32 * kWarpsPerBlock, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<__half *>(x), reinterpret_cast<const __half *>(weight), rows, heads,
        head_dim, row_stride, eps);
    HP_RETURN_LAUNCH_STATUS();
}
