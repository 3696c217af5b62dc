/*
 * Image ops of the VAE decoder on channels-last f16 images ([pixels, channels], one row
 * per pixel): the im2col gather of a "same" convolution (the product itself runs on the
 * linear path), GroupNorm with affine parameters and optional SiLU, and nearest 2x
 * upsampling.
 *
 * im2col and upsampling are one-pass gathers with grid-stride loops (64-bit indices).
 * GroupNorm gives one block to each (batch item, group): the block reads the group three
 * times (mean, then the variance about the mean, then the write), accumulating in f32
 * per thread and reducing through shared memory, so a group with a large mean does not
 * cancel the way E[x^2] - E[x]^2 does.
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

/* cols[p, (c * kernel + ky) * kernel + kx] = x[pixel first + p shifted by (ky, kx) - pad, c],
 * zero outside the image. */
__global__ void im2col_kernel(const __half *__restrict__ x, __half *__restrict__ cols,
                              int height, int width, int channels, int kernel,
                              long long first, long long total) {
    const int taps = kernel * kernel;
    const long long row_len = (long long)channels * taps;
    const int pad = kernel / 2;
    const long long per_item = (long long)height * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long p = first + i / row_len;
        const int col = (int)(i % row_len);
        const int c = col / taps;
        const int tap = col % taps;
        const long long item = p / per_item;
        const long long pixel = p % per_item;
        const int sy = (int)(pixel / width) + tap / kernel - pad;
        const int sx = (int)(pixel % width) + tap % kernel - pad;
        __half v = __float2half_rn(0.f);
        if (sy >= 0 && sy < height && sx >= 0 && sx < width) {
            v = x[((item * height + sy) * width + sx) * channels + c];
        }
        cols[i] = v;
    }
}

__device__ float block_sum(float v, float *shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    const float total = shared[0];
    __syncthreads();
    return total;
}

__global__ void group_norm_kernel(const __half *__restrict__ x, const __half *__restrict__ weight,
                                  const __half *__restrict__ bias, __half *__restrict__ y,
                                  long long pixels, int channels, int groups, float eps,
                                  int silu) {
    __shared__ float shared[kThreads];
    const int item = blockIdx.x / groups;
    const int group = blockIdx.x % groups;
    const int width = channels / groups;
    const long long count = pixels * width;
    const size_t base = (size_t)item * pixels * channels + (size_t)group * width;
    auto at = [&](long long i) { return base + (size_t)(i / width) * channels + i % width; };

    float sum = 0.f;
    for (long long i = threadIdx.x; i < count; i += blockDim.x) sum += __half2float(x[at(i)]);
    const float mean = block_sum(sum, shared) / (float)count;
    float sq = 0.f;
    for (long long i = threadIdx.x; i < count; i += blockDim.x) {
        const float d = __half2float(x[at(i)]) - mean;
        sq += d * d;
    }
    const float rstd = rsqrtf(block_sum(sq, shared) / (float)count + eps);
    for (long long i = threadIdx.x; i < count; i += blockDim.x) {
        const int c = group * width + (int)(i % width);
        float v = (__half2float(x[at(i)]) - mean) * rstd * __half2float(weight[c]) +
                  __half2float(bias[c]);
        if (silu) v = v / (1.f + __expf(-v));
        y[at(i)] = __float2half_rn(v);
    }
}

__global__ void upsample_nearest2x_kernel(const __half *__restrict__ x, __half *__restrict__ y,
                                          int height, int width, int channels,
                                          long long total) {
    const int out_w = 2 * width;
    const long long out_plane = 4LL * height * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int c = (int)(i % channels);
        const long long p = i / channels;
        const long long item = p / out_plane;
        const long long pixel = p % out_plane;
        const int oy = (int)(pixel / out_w);
        const int ox = (int)(pixel % out_w);
        y[i] = x[((item * height + oy / 2) * width + ox / 2) * channels + c];
    }
}

}  // namespace

extern "C" int32_t hp_launch_im2col_f16(const uint16_t *x, uint16_t *cols, int32_t batch,
                                        int32_t height, int32_t width, int32_t channels,
                                        int32_t kernel, int64_t first, int64_t rows,
                                        void *stream) {
    HP_REQUIRE(x != nullptr && cols != nullptr);
    HP_REQUIRE(batch >= 1 && height >= 1 && width >= 1 && channels >= 1);
    HP_REQUIRE(kernel >= 1 && kernel % 2 == 1 && kernel <= 15);
    HP_REQUIRE(first >= 0 && rows >= 1);
    HP_REQUIRE(first + rows <= (long long)batch * height * width);
    const long long total = rows * channels * kernel * kernel;
    im2col_kernel<<<grid_for(total), kThreads, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<const __half *>(x), reinterpret_cast<__half *>(cols), height, width,
        channels, kernel, first, total);
    HP_RETURN_LAUNCH_STATUS();
}

extern "C" int32_t hp_launch_group_norm_f16(const uint16_t *x, const uint16_t *weight,
                                            const uint16_t *bias, uint16_t *y, int32_t batch,
                                            int64_t pixels, int32_t channels, int32_t groups,
                                            float eps, int32_t silu, void *stream) {
    HP_REQUIRE(x != nullptr && weight != nullptr && bias != nullptr && y != nullptr);
    HP_REQUIRE(batch >= 1 && pixels >= 1 && channels >= 1);
    HP_REQUIRE(groups >= 1 && channels % groups == 0);
    HP_REQUIRE((long long)batch * groups <= 0x7fffffffLL);
    HP_REQUIRE(eps >= 0.f);
    group_norm_kernel<<<(unsigned)(batch * groups), kThreads, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<const __half *>(x), reinterpret_cast<const __half *>(weight),
        reinterpret_cast<const __half *>(bias), reinterpret_cast<__half *>(y), pixels, channels,
        groups, eps, silu != 0);
    HP_RETURN_LAUNCH_STATUS();
}

extern "C" int32_t hp_launch_upsample_nearest2x_f16(const uint16_t *x, uint16_t *y,
                                                    int32_t batch, int32_t height, int32_t width,
                                                    int32_t channels, void *stream) {
    HP_REQUIRE(x != nullptr && y != nullptr);
    HP_REQUIRE(batch >= 1 && height >= 1 && width >= 1 && channels >= 1);
    const long long total = 4LL * batch * height * width * channels;
    upsample_nearest2x_kernel<<<grid_for(total), kThreads, 0, (cudaStream_t)stream>>>(
        reinterpret_cast<const __half *>(x), reinterpret_cast<__half *>(y), height, width,
        channels, total);
    HP_RETURN_LAUNCH_STATUS();
}
