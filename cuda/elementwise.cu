/*
 * Elementwise ops of the MMDiT forward: gated residual, row-broadcast add, SiLU /
 * GELU-tanh, strided 2-D copy. All are memory-bound one-pass kernels; grid-stride loops
 * keep the grid small and fixed (at most 4096 blocks of 256 threads) however large the
 * tensor is, and indices are 64-bit because the launchers take 64-bit extents.
 */
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr long long kMaxBlocks = 4096;

unsigned grid_for(long long n) {
    long long blocks = (n + kThreads - 1) / kThreads;
    if (blocks > kMaxBlocks) blocks = kMaxBlocks;
    return (unsigned)(blocks < 1 ? 1 : blocks);
}

__global__ void gated_residual_kernel(__half *__restrict__ x, const __half *__restrict__ gate,
                                      const __half *__restrict__ y, long long total, int dim,
                                      int rows_per_batch, int mod_stride) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / dim;
        const int c = (int)(i % dim);
        const float g = __half2float(gate[(row / rows_per_batch) * mod_stride + c]);
        x[i] = __float2half_rn(__half2float(x[i]) + g * __half2float(y[i]));
    }
}

__global__ void add_rows_kernel(__half *__restrict__ x, const __half *__restrict__ y,
                                long long total, int dim, int y_rows) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / dim;
        const int c = (int)(i % dim);
        x[i] = __float2half_rn(__half2float(x[i]) +
                               __half2float(y[(row % y_rows) * (long long)dim + c]));
    }
}

template <int Act>
__global__ void activation_kernel(const __half *__restrict__ x, __half *__restrict__ y,
                                  long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = __half2float(x[i]);
        float r;
        if (Act == HP_ACTIVATION_SILU) {
            r = v / (1.f + __expf(-v));
        } else {
            const float kC = 0.7978845608028654f;  // sqrt(2 / pi)
            r = 0.5f * v * (1.f + tanhf(kC * (v + 0.044715f * v * v * v)));
        }
        y[i] = __float2half_rn(r);
    }
}

__global__ void copy_2d_kernel(__half *__restrict__ dst, long long dst_stride,
                               const __half *__restrict__ src, long long src_stride,
                               long long total, int cols) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / cols;
        const long long c = i % cols;
        dst[r * dst_stride + c] = src[r * src_stride + c];
    }
}

}  // namespace

extern "C" int32_t hp_launch_gated_residual_f16(uint16_t *x, const uint16_t *gate,
                                                const uint16_t *y, int32_t rows, int32_t dim,
                                                int32_t rows_per_batch, int32_t mod_stride,
                                                void *stream) {
    HP_REQUIRE(x != nullptr && gate != nullptr && y != nullptr);
    HP_REQUIRE(rows >= 1 && dim >= 1 && rows_per_batch >= 1 && mod_stride >= dim);
    const long long total = (long long)rows * dim;
    gated_residual_kernel<<<grid_for(total), kThreads, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<__half *>(x), reinterpret_cast<const __half *>(gate),
        reinterpret_cast<const __half *>(y), total, dim, rows_per_batch, mod_stride);
    HP_RETURN_LAUNCH_STATUS();
}

extern "C" int32_t hp_launch_add_rows_f16(uint16_t *x, const uint16_t *y, int32_t rows,
                                          int32_t dim, int32_t y_rows, void *stream) {
    HP_REQUIRE(x != nullptr && y != nullptr);
    HP_REQUIRE(rows >= 1 && dim >= 1 && y_rows >= 1);
    const long long total = (long long)rows * dim;
    add_rows_kernel<<<grid_for(total), kThreads, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<__half *>(x), reinterpret_cast<const __half *>(y), total, dim, y_rows);
    HP_RETURN_LAUNCH_STATUS();
}

extern "C" int32_t hp_launch_activation_f16(const uint16_t *x, uint16_t *y, int64_t n,
                                            int32_t activation, void *stream) {
    HP_REQUIRE(x != nullptr && y != nullptr && n >= 1);
    const auto *xi = reinterpret_cast<const __half *>(x);
    auto *yo = reinterpret_cast<__half *>(y);
    switch (activation) {
    case HP_ACTIVATION_SILU:
        activation_kernel<HP_ACTIVATION_SILU>
            <<<grid_for(n), kThreads, 0, (cudaStream_t)stream>>>(xi, yo, n);
        break;
    case HP_ACTIVATION_GELU_TANH:
        activation_kernel<HP_ACTIVATION_GELU_TANH>
            <<<grid_for(n), kThreads, 0, (cudaStream_t)stream>>>(xi, yo, n);
        break;
    default:
        return HP_LAUNCH_ERR_ARGUMENT;
    }
    HP_RETURN_LAUNCH_STATUS();
}

extern "C" int32_t hp_launch_copy_2d_f16(uint16_t *dst, int64_t dst_stride, const uint16_t *src,
                                         int64_t src_stride, int64_t rows, int32_t cols,
                                         void *stream) {
    HP_REQUIRE(dst != nullptr && src != nullptr);
    HP_REQUIRE(rows >= 1 && cols >= 1 && dst_stride >= cols && src_stride >= cols);
    const long long total = rows * (long long)cols;
    copy_2d_kernel<<<grid_for(total), kThreads, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<__half *>(dst), dst_stride, reinterpret_cast<const __half *>(src),
        src_stride, total, cols);
    HP_RETURN_LAUNCH_STATUS();
}
