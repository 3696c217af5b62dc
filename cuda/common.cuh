/*
 * Shared helpers of the 4-bit kernels: launcher status and argument checks, cp.async,
 * ldmatrix and mma.sync wrappers. The layout and dequant index math lives in
 * q4_layout.cuh (host + device, emulated on the CPU by cuda/tests).
 *
 * Only Ampere-ISA instructions (sm_80+: cp.async, ldmatrix, mma.sync m16n8k16) are
 * used, so the same code runs on Jetson Orin (sm_87) and on Hopper (sm_90).
 */
#ifndef HIPRUNE_CUDA_COMMON_CUH
#define HIPRUNE_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launch.h"
#include "q4_layout.cuh"

/** Returns HP_LAUNCH_ERR_ARGUMENT from the enclosing launcher when `cond` is false. */
#define HP_REQUIRE(cond)                                                                       \
    do {                                                                                       \
        if (!(cond)) return HP_LAUNCH_ERR_ARGUMENT;                                            \
    } while (0)

/**
 * After a launch: returns HP_LAUNCH_ERR_LAUNCH from the enclosing launcher when the
 * runtime reports an error, HP_LAUNCH_OK otherwise. Never aborts, never synchronises.
 */
#define HP_RETURN_LAUNCH_STATUS()                                                              \
    do {                                                                                       \
        return cudaGetLastError() == cudaSuccess ? HP_LAUNCH_OK : HP_LAUNCH_ERR_LAUNCH;        \
    } while (0)

/** Weight kinds, as template parameters. */
enum hp_q4_kind { HP_Q4_INT4 = 0, HP_Q4_INT4SYM = 1, HP_Q4_NF4 = 2 };

/**
 * Defines hp_launch_<OP>_<NAME>_f16, the extern "C" launcher declared in launch.h, as a
 * call of hp_<OP><KIND>. Use at file scope, after the template hp_<OP> is defined.
 */
#define HP_Q4_LINEAR_LAUNCHER(OP, NAME, KIND)                                                  \
    extern "C" int32_t hp_launch_##OP##_##NAME##_f16(                                          \
        const uint16_t *x, const uint8_t *qweight, const uint16_t *scales,                     \
        const uint16_t *offsets, const uint16_t *bias, uint16_t *y, int32_t m, int32_t n,      \
        int32_t k, int32_t group, void *stream) {                                              \
        return hp_##OP<KIND>(x, qweight, scales, offsets, bias, y, m, n, k, group, stream);    \
    }

/** True when `p` is a multiple of `align` bytes. */
static inline bool hp_aligned(const void *p, uintptr_t align) {
    return ((uintptr_t)p % align) == 0;
}

/**
 * Common argument checks of the linear launchers: pointers, offsets presence by kind,
 * sizes, group. `max_m` is HP_GEMV_MAX_M for the gemv launchers, INT32_MAX for gemm.
 * The kernels read x with 16-byte (gemm) or 4-byte (gemv) accesses and the weights with
 * 16-byte accesses, so those buffers must be aligned accordingly (cudaMalloc gives 256).
 */
static inline int32_t hp_check_linear(hp_q4_kind kind, const uint16_t *x, const uint8_t *qweight,
                                      const uint16_t *scales, const uint16_t *offsets,
                                      const uint16_t *y, int32_t m, int32_t n, int32_t k,
                                      int32_t group, int32_t max_m, uintptr_t x_align) {
    HP_REQUIRE(x != nullptr && qweight != nullptr && scales != nullptr && y != nullptr);
    HP_REQUIRE(kind == HP_Q4_INT4 ? offsets != nullptr : offsets == nullptr);
    HP_REQUIRE(m >= 1 && m <= max_m && n >= 1 && k >= 32);
    HP_REQUIRE(group == 32 || group == 64 || group == 128);
    HP_REQUIRE(k % group == 0);
    HP_REQUIRE(hp_aligned(x, x_align) && hp_aligned(qweight, 16));
    HP_REQUIRE(hp_aligned(scales, 2) && hp_aligned(y, 2));
    HP_REQUIRE(offsets == nullptr || hp_aligned(offsets, 2));
    // Index arithmetic inside the kernels is 64-bit where products can exceed 2^31;
    // grid.x (strips / tiles) stays far below its 2^31 - 1 limit for any int32 n.
    return HP_LAUNCH_OK;
}

/* ---- cp.async (sm_80+) ---- */

/** Shared-memory address of a generic pointer, as cp.async / ldmatrix want it. */
__device__ __forceinline__ uint32_t hp_smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/**
 * 16-byte global -> shared copy that bypasses L1 (.cg: the tile is used once per block).
 * When `valid` is false, src-size 0 makes the hardware write 16 zero bytes and read
 * nothing, which is how rows past m and strips past n_pad are zero-filled without a
 * branch around the copy. `src` must still be a mapped address; callers pass the
 * buffer's base then.
 */
__device__ __forceinline__ void hp_cp_async16(void *smem, const void *src, bool valid) {
    const int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(hp_smem_addr(smem)),
                 "l"(src), "r"(src_size)
                 : "memory");
}

/** Closes the current group of cp.async copies. */
__device__ __forceinline__ void hp_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/** Waits until at most N groups of this thread's cp.async copies are pending. */
template <int N> __device__ __forceinline__ void hp_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* ---- ldmatrix / mma ---- */

/** ldmatrix.x4: four 8x8 b16 matrices; each lane passes one row address (see q4_layout.cuh). */
__device__ __forceinline__ void hp_ldmatrix_x4(uint32_t r[4], const void *smem_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(hp_smem_addr(smem_row)));
}

/** d = a . b + d for one m16n8k16 tile: f16 operands, f32 accumulators (row.col). */
__device__ __forceinline__ void hp_mma_16816(float d[4], const uint32_t a[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/** 16-byte load that skips L1: weights are streamed once (gemv). */
__device__ __forceinline__ uint4 hp_ld_stream16(const void *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

/** f16 bits -> float. */
__device__ __forceinline__ float hp_h2f(uint16_t b) { return __half2float(__ushort_as_half(b)); }

#endif /* HIPRUNE_CUDA_COMMON_CUH */
