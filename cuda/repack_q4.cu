/*
 * Repack of canonical 4-bit codes (u8 [n, k/2]) into the atom layout that both the GEMV
 * and the GEMM read. The layout is documented in q4_layout.cuh; this file only runs
 * hp_q4_repack_word once per output word.
 *
 * Why a gather (one thread per output word) and not a scatter: every output word is
 * written exactly once, by one thread, as one 32-bit store, coalesced across the warp,
 * and the padding nibbles come out as 0 without a separate memset. The reads are
 * scattered bytes, but this runs once per weight at upload, so its cost is noise next
 * to the copy from the host.
 *
 * ptxas -v (CUDA 13.0): hp_repack_q4_kernel  sm_87: 35 registers, sm_90: 34 registers,
 * no spills, no stack.
 */
#include "common.cuh"

/** One thread per 32-bit word of the repacked buffer (grid-stride). */
__global__ void __launch_bounds__(256) hp_repack_q4_kernel(const uint8_t *__restrict__ packed,
                                                           uint32_t *__restrict__ out, int64_t n,
                                                           int64_t k, int64_t words) {
    for (int64_t w = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; w < words;
         w += (int64_t)gridDim.x * blockDim.x) {
        out[w] = hp_q4_repack_word(packed, n, k, w);
    }
}

extern "C" int64_t hp_q4_repacked_bytes(int32_t n, int32_t k) {
    if (n < 1 || k < 1 || (k & 1) != 0) return 0;
    return hp_q4_n_pad(n) * hp_q4_k_pad(k) / 2;
}

extern "C" int32_t hp_launch_repack_q4(const uint8_t *packed, uint8_t *repacked, int32_t n,
                                       int32_t k, void *stream) {
    HP_REQUIRE(packed != nullptr && repacked != nullptr);
    HP_REQUIRE(n >= 1 && k >= 32 && k % 32 == 0);
    HP_REQUIRE(hp_aligned(repacked, 4));
    const int64_t bytes = hp_q4_repacked_bytes(n, k);
    // The two buffers must not overlap: the kernel reads packed while writing repacked.
    const uintptr_t a = (uintptr_t)packed, b = (uintptr_t)repacked;
    const uintptr_t a_end = a + (uintptr_t)((int64_t)n * (k / 2));
    const uintptr_t b_end = b + (uintptr_t)bytes;
    HP_REQUIRE(a_end <= b || b_end <= a);
    const int64_t words = bytes / 4;
    const int threads = 256;
    int64_t blocks = (words + threads - 1) / threads;
    if (blocks > 65535LL * 16) blocks = 65535LL * 16; // grid-stride covers the rest
    hp_repack_q4_kernel<<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(
        packed, reinterpret_cast<uint32_t *>(repacked), n, k, words);
    HP_RETURN_LAUNCH_STATUS();
}
