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

/* ---- Model ops (f16 activations, f32 statistics and accumulation) ----
 * Activation buffers are row-major [rows, cols]. Per-batch modulation vectors (adaLN
 * shift / scale / gate chunks of one [batch, 6 * dim] linear output) are passed as a
 * pointer to the chunk plus `mod_stride`, the elements between consecutive batch
 * entries; row r belongs to batch entry r / rows_per_batch.
 */

/**
 * y[r] = LayerNorm(x[r]) * (1 + scale[b]) + shift[b] (no affine weights, eps inside the
 * square root; statistics in f32). `shift` and `scale` may both be NULL (plain
 * LayerNorm). x and y may be the same buffer. dim must be even.
 */
int32_t hp_launch_layer_norm_modulate_f16(const uint16_t *x, const uint16_t *shift,
                                          const uint16_t *scale, uint16_t *y, int32_t rows,
                                          int32_t dim, int32_t rows_per_batch,
                                          int32_t mod_stride, float eps, void *stream);

/**
 * Per-head RMS norm in place: for each row and head h, x[r, h*head_dim .. +head_dim] *=
 * weight / sqrt(mean(x^2) + eps). `row_stride` is the elements between rows
 * (>= heads * head_dim); `weight` (f16 [head_dim]) may be NULL (no affine).
 */
int32_t hp_launch_rms_norm_heads_f16(uint16_t *x, const uint16_t *weight, int32_t rows,
                                     int32_t heads, int32_t head_dim, int32_t row_stride,
                                     float eps, void *stream);

/** x[r, c] += gate[b, c] * y[r, c] (gated residual); x, y are [rows, dim]. */
int32_t hp_launch_gated_residual_f16(uint16_t *x, const uint16_t *gate, const uint16_t *y,
                                     int32_t rows, int32_t dim, int32_t rows_per_batch,
                                     int32_t mod_stride, void *stream);

/** x[r, c] += y[r % y_rows, c]: residual add (y_rows == rows) or a broadcast table. */
int32_t hp_launch_add_rows_f16(uint16_t *x, const uint16_t *y, int32_t rows, int32_t dim,
                               int32_t y_rows, void *stream);

/** Activation kinds of hp_launch_activation_f16. */
typedef enum hp_activation {
    /** x * sigmoid(x). */
    HP_ACTIVATION_SILU = 0,
    /** 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). */
    HP_ACTIVATION_GELU_TANH = 1,
} hp_activation;

/** y[i] = act(x[i]) for i < n; x and y may be the same buffer. */
int32_t hp_launch_activation_f16(const uint16_t *x, uint16_t *y, int64_t n, int32_t activation,
                                 void *stream);

/**
 * Strided 2-D copy: dst[r * dst_stride + c] = src[r * src_stride + c] for r < rows,
 * c < cols (joins and splits the joint image + context sequence without host trips).
 */
int32_t hp_launch_copy_2d_f16(uint16_t *dst, int64_t dst_stride, const uint16_t *src,
                              int64_t src_stride, int64_t rows, int32_t cols, void *stream);

/**
 * Multi-head attention, flash-style: out = softmax(q k^T * scale) v per batch entry and
 * head, online softmax with f32 running max / sum and f32 accumulation, never
 * materialising the score matrix. q, k, v, out are [batch, seq, row_stride] with head h
 * in columns h * head_dim .. (h + 1) * head_dim; row_stride >= heads * head_dim and a
 * multiple of 8; buffers 16-byte aligned. head_dim in {8, 16, 32, 64, 128}.
 */
int32_t hp_launch_attention_f16(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                uint16_t *out, int32_t batch, int32_t seq, int32_t heads,
                                int32_t head_dim, int32_t row_stride, float scale, void *stream);

/* ---- VAE image ops (channels-last f16 images: [batch * height * width, channels]) ---- */

/**
 * The im2col rows of output pixels first .. first + rows of a "same", stride-1
 * convolution with an odd kernel x kernel kernel: cols is [rows, channels * kernel^2],
 * column (c * kernel + ky) * kernel + kx (PyTorch's weight order) holding the input at
 * the pixel shifted by (ky, kx) - kernel / 2, zero outside the image.
 */
int32_t hp_launch_im2col_f16(const uint16_t *x, uint16_t *cols, int32_t batch, int32_t height,
                             int32_t width, int32_t channels, int32_t kernel, int64_t first,
                             int64_t rows, void *stream);

/**
 * GroupNorm of batch items of pixels x channels: each item's channels in groups groups,
 * normalised over the item's pixels (f32 two-pass statistics), then * weight[c] + bias[c],
 * then SiLU when silu != 0. x and y must not overlap.
 */
int32_t hp_launch_group_norm_f16(const uint16_t *x, const uint16_t *weight, const uint16_t *bias,
                                 uint16_t *y, int32_t batch, int64_t pixels, int32_t channels,
                                 int32_t groups, float eps, int32_t silu, void *stream);

/** y[(b, oy, ox), c] = x[(b, oy / 2, ox / 2), c]: nearest 2x upsampling into a 4x larger y. */
int32_t hp_launch_upsample_nearest2x_f16(const uint16_t *x, uint16_t *y, int32_t batch,
                                         int32_t height, int32_t width, int32_t channels,
                                         void *stream);

#ifdef __cplusplus
}
#endif

#endif /* HIPRUNE_CUDA_LAUNCH_H */
