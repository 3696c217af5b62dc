/*
 * hiprune CUDA launchers: the one contract between the Rust runtime and the kernels.
 *
 * Every launcher is a plain C function that checks its arguments, enqueues its
 * kernel(s) on `stream` (a CUstream / cudaStream_t passed as void*) and returns an
 * hp_launch_status. It never synchronises, never allocates, never aborts.
 * bindgen turns this file into src/backend/cuda/launch_bindings.rs (committed; CI
 * regenerates it and fails on a diff), so Rust and CUDA cannot drift.
 *
 * Conventions
 * - All pointers are device pointers. f16 buffers are passed as uint16_t (IEEE
 *   binary16 bits) so this header needs no CUDA includes.
 * - Row-major everywhere. A linear weight W is [n, k] (out features, in features).
 * - 4-bit weights: `qweight` is the repacked code buffer produced by
 *   hp_launch_repack_q4 (hp_q4_repacked_bytes(n, k) bytes, the kernels' own layout, the only copy on
 *   the device); `scales` (and `offsets` for int4) are f16 [n, k / group] in the
 *   package's canonical layout. Weight kinds:
 *     int4     w = scale * q + offset
 *     int4sym  w = scale * (q - 8)            (offsets must be NULL)
 *     nf4      w = absmax * NF4[q]            (offsets must be NULL; scales hold absmax)
 *   with q the 4-bit code, group in {32, 64, 128}, k a multiple of group.
 * - Linears compute y[m, n] = x[m, k] . W^T (+ bias[n] when bias is not NULL) with f16
 *   inputs and outputs and f32 accumulation. gemv launchers take 1 <= m <= 8, gemm
 *   launchers any m >= 1.
 * - Alignment: qweight 16 bytes, x 16 bytes (gemm) or 4 bytes (gemv), scales, offsets,
 *   bias and y 2 bytes (cudaMalloc gives 256); a misaligned buffer is an argument error.
 */
#ifndef HIPRUNE_CUDA_LAUNCH_H
#define HIPRUNE_CUDA_LAUNCH_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Status returned by every launcher. */
typedef enum hp_launch_status {
    /** The work was enqueued. */
    HP_LAUNCH_OK = 0,
    /** A NULL pointer, a size out of range, an unsupported group or a shape the kernel does not take. */
    HP_LAUNCH_ERR_ARGUMENT = -1,
    /** The CUDA runtime reported an error when the kernel was launched. */
    HP_LAUNCH_ERR_LAUNCH = -2,
} hp_launch_status;

/** Largest m the gemv launchers take. */
#define HP_GEMV_MAX_M 8

/**
 * Bytes of the repacked code buffer of an [n, k] 4-bit matrix (at least n * k / 2;
 * more when the layout pads n or k to its tile). Host function; 0 when n < 1, k < 1
 * or k is odd.
 */
int64_t hp_q4_repacked_bytes(int32_t n, int32_t k);

/**
 * Repacks canonical 4-bit codes (u8 [n, k/2]; byte j of row r holds k = 2j in the
 * low nibble and k = 2j + 1 in the high nibble) into the kernels' layout, padding with
 * code 0 where the layout pads. `packed` (n * k / 2 bytes) and `repacked`
 * (hp_q4_repacked_bytes(n, k) bytes) are distinct buffers. Kind-independent.
 * Takes any n >= 1 and k >= 32 with k % 32 == 0.
 */
int32_t hp_launch_repack_q4(const uint8_t *packed, uint8_t *repacked, int32_t n, int32_t k,
                            void *stream);

/** y = x . W^T + bias for 1 <= m <= HP_GEMV_MAX_M, INT4 with offsets. */
int32_t hp_launch_gemv_int4_f16(const uint16_t *x, const uint8_t *qweight, const uint16_t *scales,
                                const uint16_t *offsets, const uint16_t *bias, uint16_t *y,
                                int32_t m, int32_t n, int32_t k, int32_t group, void *stream);
/** y = x . W^T + bias for 1 <= m <= HP_GEMV_MAX_M, symmetric INT4 (offsets NULL). */
int32_t hp_launch_gemv_int4sym_f16(const uint16_t *x, const uint8_t *qweight,
                                   const uint16_t *scales, const uint16_t *offsets,
                                   const uint16_t *bias, uint16_t *y, int32_t m, int32_t n,
                                   int32_t k, int32_t group, void *stream);
/** y = x . W^T + bias for 1 <= m <= HP_GEMV_MAX_M, NF4 (offsets NULL). */
int32_t hp_launch_gemv_nf4_f16(const uint16_t *x, const uint8_t *qweight, const uint16_t *scales,
                               const uint16_t *offsets, const uint16_t *bias, uint16_t *y,
                               int32_t m, int32_t n, int32_t k, int32_t group, void *stream);

/** y = x . W^T + bias for any m >= 1 on tensor cores, INT4 with offsets. */
int32_t hp_launch_gemm_int4_f16(const uint16_t *x, const uint8_t *qweight, const uint16_t *scales,
                                const uint16_t *offsets, const uint16_t *bias, uint16_t *y,
                                int32_t m, int32_t n, int32_t k, int32_t group, void *stream);
/** y = x . W^T + bias for any m >= 1 on tensor cores, symmetric INT4 (offsets NULL). */
int32_t hp_launch_gemm_int4sym_f16(const uint16_t *x, const uint8_t *qweight,
                                   const uint16_t *scales, const uint16_t *offsets,
                                   const uint16_t *bias, uint16_t *y, int32_t m, int32_t n,
                                   int32_t k, int32_t group, void *stream);
/** y = x . W^T + bias for any m >= 1 on tensor cores, NF4 (offsets NULL). */
int32_t hp_launch_gemm_nf4_f16(const uint16_t *x, const uint8_t *qweight, const uint16_t *scales,
                               const uint16_t *offsets, const uint16_t *bias, uint16_t *y,
                               int32_t m, int32_t n, int32_t k, int32_t group, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* HIPRUNE_CUDA_LAUNCH_H */
