/*
 * hiprune.h - the C interface of hiprune.
 *
 * Runs position-pruned, 4-bit-quantised MMDiT diffusion transformers (Stable
 * Diffusion 3 / 3.5) from a `.hpk` package or a diffusers transformer folder.
 * Text encoders and the VAE stay with the application: hiprune takes latents, prompt
 * embeddings and pooled prompt embeddings, and returns the velocity prediction
 * (hp_forward) or the denoised latent (hp_sample).
 *
 * Conventions
 * - Every function that can fail returns an hp_status: HP_OK (0) or a negative
 *   HP_ERR_* code. On failure hp_last_error_message() says what went wrong.
 * - Handles (hp_model, hp_context) are opaque and made by *_load / *_create and
 *   released by the matching *_free.
 * - Enumerations are append-only: values never change meaning. Functions and struct
 *   fields take them as int32_t and reject values they do not know with
 *   HP_ERR_INVALID_ARGUMENT.
 * - Parameter structs start with `struct_size`. Get one from hp_*_default_params()
 *   (which fills struct_size) and change the fields you need. A library that is newer
 *   than the header you compiled against reads only the first `struct_size` bytes;
 *   a struct_size smaller than the first released version is HP_ERR_INVALID_ARGUMENT.
 *   Output structs (hp_model_info, hp_memory_info) work the same way: set
 *   struct_size = sizeof(the struct) before the call; the library writes at most
 *   that many bytes.
 * - Tensors are caller-owned, contiguous, row-major float32 buffers with explicit
 *   lengths in elements. A length that does not equal the product of the shape is
 *   HP_ERR_SIZE_MISMATCH; the library never reads or writes past a given length.
 *
 * Thread safety
 * - hp_model: read-only after loading; it may be used from any number of threads at
 *   once (hp_model_info, hp_model_blocks, hp_context_create).
 * - hp_context: one call at a time. A call that finds the context busy in another
 *   thread returns HP_ERR_BUSY (this is checked, not undefined behaviour). Different
 *   contexts may run in parallel, also on the same model.
 * - hp_last_error_message() is per thread.
 * - hp_log_set() may be called from any thread; the callback may be called from any
 *   thread, including the context's worker threads.
 *
 * Handle checking
 * - The library keeps a registry of live handles and never dereferences a pointer
 *   that is not in it. NULL, a freed handle (use after free, double free), a handle
 *   of the wrong kind (a context passed as a model) and any other pointer the library
 *   did not hand out return HP_ERR_INVALID_HANDLE.
 * - Not detectable: a freed handle whose address was later reused by a new handle of
 *   the same kind refers to that new handle.
 * - hp_model_free() while contexts still use the model is allowed: the weights stay
 *   loaded until the last such context is freed.
 * - hp_context_free() on a context that is running in another thread returns
 *   HP_ERR_BUSY and frees nothing.
 * - Not guarded: buffers shorter than the lengths passed with them, dangling buffer
 *   pointers, a log or progress callback that is not a valid function.
 */
#ifndef HIPRUNE_H
#define HIPRUNE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && !defined(__MINGW32__)
#  if defined(HP_BUILD)
#    define HP_API __declspec(dllexport)
#  elif defined(HP_SHARED)
#    define HP_API __declspec(dllimport)
#  else
#    define HP_API
#  endif
#elif defined(__GNUC__) || defined(__clang__)
#  define HP_API __attribute__((visibility("default")))
#else
#  define HP_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Version of this interface. Bumped when a function or struct changes in a way that
 * breaks existing callers; appending functions, enum values or struct fields does
 * not change it. Compare with hp_abi_version() at run time. */
#define HP_ABI_VERSION 1

/* ---------------------------------------------------------------------------------
 * Status codes
 * ------------------------------------------------------------------------------- */

/* HP_OK or one of the negative enum hp_status_code values. */
typedef int32_t hp_status;

enum hp_status_code {
    HP_OK = 0,
    /* An argument is NULL, out of range, not finite, or an enum value is unknown. */
    HP_ERR_INVALID_ARGUMENT = -1,
    /* A handle is NULL, freed, of the wrong kind, or was not made by this library. */
    HP_ERR_INVALID_HANDLE = -2,
    /* A buffer length or a shape does not match what the model needs. */
    HP_ERR_SIZE_MISMATCH = -3,
    /* A file could not be opened or read. */
    HP_ERR_IO = -4,
    /* The file is not a valid package or checkpoint (corrupt, truncated, missing or
     * misshapen tensors, unsupported format version). */
    HP_ERR_INVALID_MODEL = -5,
    /* The requested backend is not compiled in or has no usable device. */
    HP_ERR_BACKEND_UNAVAILABLE = -6,
    /* The context is being used by another thread. */
    HP_ERR_BUSY = -7,
    /* The progress callback asked to stop. */
    HP_ERR_ABORTED = -8,
    /* The request is valid but this build or model does not support it. */
    HP_ERR_UNSUPPORTED = -9,
    /* A bug in hiprune (an internal panic was caught); the message says where. */
    HP_ERR_INTERNAL = -10
};

/* ---------------------------------------------------------------------------------
 * Enumerations (values received as int32_t)
 * ------------------------------------------------------------------------------- */

enum hp_backend {
    /* CUDA when compiled in and a device is present, otherwise the CPU. */
    HP_BACKEND_AUTO = 0,
    HP_BACKEND_CPU = 1,
    HP_BACKEND_CUDA = 2
};

enum hp_log_level {
    HP_LOG_ERROR = 1,
    HP_LOG_WARN = 2,
    HP_LOG_INFO = 3,
    HP_LOG_DEBUG = 4,
    HP_LOG_TRACE = 5
};

enum hp_block_list {
    /* Original indices of the blocks the model runs, in execution order. */
    HP_BLOCKS_KEPT = 0,
    /* Original indices of the blocks with the MMDiT-X second attention. */
    HP_BLOCKS_DUAL_ATTENTION = 1,
    /* Kept blocks with a sub-component removed (a package records them; diffusers'
     * module names): the image adaLN modulation `norm1` (a plain LayerNorm instead),
     * the context modulation `norm1_context`, the joint attention `attn`, the MMDiT-X
     * `attn2`, the feed-forward `ff`, the context feed-forward `ff_context`. */
    HP_BLOCKS_NO_NORM1 = 2,
    HP_BLOCKS_NO_NORM1_CONTEXT = 3,
    HP_BLOCKS_NO_ATTN = 4,
    HP_BLOCKS_NO_ATTN2 = 5,
    HP_BLOCKS_NO_FF = 6,
    HP_BLOCKS_NO_FF_CONTEXT = 7
};

/* ---------------------------------------------------------------------------------
 * Library
 * ------------------------------------------------------------------------------- */

/* HP_ABI_VERSION of the library that is loaded. Never fails. */
HP_API uint32_t hp_abi_version(void);

/* The crate version, e.g. "0.1.0" (static storage). Never fails. */
HP_API const char *hp_version_string(void);

/* The name of a status code, e.g. "HP_ERR_BUSY" (static storage); "HP_ERR_UNKNOWN"
 * for a value that is not a status code. Never fails. */
HP_API const char *hp_status_string(hp_status status);

/* The message of the last failed hp_* call on this thread, or "" when the last call
 * succeeded. Valid until the next hp_* call on this thread (other than
 * hp_last_error_message, hp_abi_version, hp_version_string, hp_status_string). Never
 * NULL. */
HP_API const char *hp_last_error_message(void);

/* Receives one log record: level is an hp_log_level, target the module that logged
 * it, message the text. Both strings are valid only during the call. */
typedef void (*hp_log_callback)(int32_t level, const char *target, const char *message,
                                void *user_data);

/* Routes hiprune's log records (all levels) to `callback`; NULL turns logging off.
 * The callback may run on any thread and must not call back into hiprune.
 * Returns HP_OK, or HP_ERR_UNSUPPORTED when the process already installed another
 * logger for the Rust `log` crate (a Rust host application). */
HP_API hp_status hp_log_set(hp_log_callback callback, void *user_data);

/* ---------------------------------------------------------------------------------
 * Model
 * ------------------------------------------------------------------------------- */

typedef struct hp_model hp_model;

/* Loads an `.hpk` package, a single-file checkpoint with Stability AI's tensor names
 * (configuration read from the shapes with 64-wide heads; blocks it lacks are removed
 * blocks) or a diffusers transformer folder (config.json + safetensors). Files are
 * memory-mapped and must not change while loaded. On success *out_model
 * is a new handle; on failure it is set to NULL.
 * Returns HP_OK, HP_ERR_INVALID_ARGUMENT (path or out_model NULL, path not UTF-8),
 * HP_ERR_IO (missing or unreadable file), HP_ERR_INVALID_MODEL (corrupt or
 * truncated package, bad config, missing or misshapen tensors),
 * HP_ERR_UNSUPPORTED. */
HP_API hp_status hp_model_load(const char *path, hp_model **out_model);

/* Releases a model. NULL is a no-op returning HP_OK. Contexts created from it keep
 * working; the weights are released with the last of them.
 * Returns HP_OK or HP_ERR_INVALID_HANDLE (already freed, not a model). */
HP_API hp_status hp_model_free(hp_model *model);

/* Architecture and storage of a loaded model. */
typedef struct hp_model_info {
    size_t struct_size;
    uint32_t sample_size;
    uint32_t patch_size;
    uint32_t in_channels;
    uint32_t out_channels;
    /* Blocks of the original architecture. */
    uint32_t num_layers;
    uint32_t attention_head_dim;
    uint32_t num_attention_heads;
    /* num_attention_heads * attention_head_dim. */
    uint32_t hidden_size;
    uint32_t joint_attention_dim;
    uint32_t caption_projection_dim;
    uint32_t pooled_projection_dim;
    uint32_t pos_embed_max_size;
    /* Blocks the model runs (hp_model_blocks(HP_BLOCKS_KEPT) lists them). */
    uint32_t num_kept_blocks;
    uint32_t num_dual_attention_layers;
    /* Bytes of the linear-layer weights the model runs, by storage. */
    uint64_t bytes_f32;
    uint64_t bytes_f16;
    uint64_t bytes_bf16;
    /* 4-bit layers: packed weights plus f16 scales (and offsets for INT4). */
    uint64_t bytes_int4;
    uint64_t bytes_nf4;
    /* Everything else: biases, patch convolution and qk-norm weights (held as f32),
     * and the positional table as held (its stored bytes; 0 when it is computed). */
    uint64_t bytes_other;
    /* Sum of the six above. */
    uint64_t bytes_total;
    /* Size of the package file; 0 for a diffusers folder. */
    uint64_t file_bytes;
    /* Loaded from an `.hpk` package (false: a diffusers folder or a single file). */
    bool is_package;
    /* Query/key RMS norm present (SD3.5). */
    bool qk_norm;
    /* Sub-components removed from kept blocks, counted per (block, component); the
     * HP_BLOCKS_NO_* lists of hp_model_blocks name them. */
    uint32_t num_component_cuts;
} hp_model_info;

/* Fills *out (set out->struct_size first).
 * Returns HP_OK, HP_ERR_INVALID_HANDLE, HP_ERR_INVALID_ARGUMENT (out NULL or
 * out->struct_size too small). */
HP_API hp_status hp_model_get_info(const hp_model *model, hp_model_info *out);

/* Copies the block list `which` (an hp_block_list) to out[0..capacity) and its full
 * length to *count. out may be NULL when capacity is 0 (a size query).
 * Returns HP_OK, HP_ERR_INVALID_HANDLE, HP_ERR_INVALID_ARGUMENT (count NULL, out
 * NULL with capacity > 0, unknown `which`), HP_ERR_SIZE_MISMATCH (capacity < *count;
 * *count is still set, nothing is copied). */
HP_API hp_status hp_model_blocks(const hp_model *model, int32_t which, uint32_t *out,
                                 size_t capacity, size_t *count);

/* ---------------------------------------------------------------------------------
 * Context
 * ------------------------------------------------------------------------------- */

typedef struct hp_context hp_context;

typedef struct hp_context_params {
    size_t struct_size;
    /* An hp_backend. Default HP_BACKEND_AUTO. */
    int32_t backend;
    /* Device index for CUDA; must be 0 for the CPU. Default 0. */
    int32_t device;
    /* Worker threads of the context's own thread pool; 0 = one per CPU. Default 0. */
    uint32_t n_threads;
} hp_context_params;

/* Defaults (struct_size filled). Never fails. */
HP_API hp_context_params hp_context_default_params(void);

/* Creates a context: a backend with the model's weights and a thread pool of
 * params->n_threads workers. params NULL means the defaults. On failure *out_ctx is
 * set to NULL.
 * HP_BACKEND_CPU runs the model loaded by hp_model_load (no copy). HP_BACKEND_CUDA
 * uploads the weights to CUDA device params->device (4-bit layers stay 4-bit). With
 * HP_BACKEND_AUTO the context runs on CUDA device params->device when this build has
 * CUDA and that device is usable, otherwise on the CPU; hp_context_get_info says which
 * and why, and a broken model is an error either way.
 * Returns HP_OK, HP_ERR_INVALID_HANDLE (model), HP_ERR_INVALID_ARGUMENT (out_ctx
 * NULL, struct_size too small, unknown backend, negative device, device != 0 on the
 * CPU), HP_ERR_BACKEND_UNAVAILABLE (HP_BACKEND_CUDA in a build without CUDA: the
 * message says "not built with CUDA"; or with no usable driver or device: "no usable
 * CUDA device"), HP_ERR_INVALID_MODEL (the device refused the weights),
 * HP_ERR_INTERNAL (the thread pool could not start). */
HP_API hp_status hp_context_create(const hp_model *model, const hp_context_params *params,
                                   hp_context **out_ctx);

/* Releases a context. NULL is a no-op returning HP_OK.
 * Returns HP_OK, HP_ERR_INVALID_HANDLE (already freed, not a context), HP_ERR_BUSY
 * (running in another thread; nothing is freed). */
HP_API hp_status hp_context_free(hp_context *ctx);

/* What a context runs on. */
typedef struct hp_context_info {
    size_t struct_size;
    /* The hp_backend the context runs: HP_BACKEND_CPU or HP_BACKEND_CUDA, never
     * HP_BACKEND_AUTO. */
    int32_t backend;
    /* The CUDA device index; 0 on the CPU. */
    int32_t device;
    /* Worker threads of the context's thread pool. */
    uint32_t n_threads;
    /* true when HP_BACKEND_AUTO was asked for and the context fell back to the CPU. */
    bool fell_back;
    /* Why it fell back (NUL-terminated, cut to fit); empty when it did not. */
    char fallback_reason[256];
} hp_context_info;

/* Fills *out (set out->struct_size first) with what ctx runs on.
 * Returns HP_OK, HP_ERR_INVALID_HANDLE, HP_ERR_INVALID_ARGUMENT (out NULL,
 * struct_size too small). */
HP_API hp_status hp_context_get_info(const hp_context *ctx, hp_context_info *out);

/* Sizes of one call. The other dimensions come from the model (hp_model_info). */
typedef struct hp_dims {
    size_t batch;
    /* Latent height and width, multiples of patch_size, at most
     * patch_size * pos_embed_max_size. */
    size_t height;
    size_t width;
    /* Prompt tokens T. */
    size_t context_tokens;
} hp_dims;

/* One transformer evaluation: the velocity prediction.
 *   latent    [batch, in_channels, height, width]
 *   context   [batch, context_tokens, joint_attention_dim]   prompt embeddings
 *   pooled    [batch, pooled_projection_dim]                 pooled prompt embeddings
 *   timestep  [batch]                                        sigma * 1000
 *   out       [batch, out_channels, height, width]           written on HP_OK only
 * Returns HP_OK, HP_ERR_INVALID_HANDLE, HP_ERR_INVALID_ARGUMENT (a NULL pointer,
 * a zero dimension, non-finite input, latent size not a multiple of the patch or
 * larger than the positional table), HP_ERR_SIZE_MISMATCH (a length != the product
 * of its shape), HP_ERR_BUSY, HP_ERR_INTERNAL. */
HP_API hp_status hp_forward(hp_context *ctx, const hp_dims *dims, const float *latent,
                            size_t latent_len, const float *context, size_t context_len,
                            const float *pooled, size_t pooled_len, const float *timestep,
                            size_t timestep_len, float *out, size_t out_len);

/* Called before each sampling step (step counts from 0) with the step's noise level,
 * on one of the context's worker threads (not necessarily the thread that called
 * hp_sample), one call at a time. Calls on the same context from inside it return
 * HP_ERR_BUSY. Return true to go on, false to stop: hp_sample then returns
 * HP_ERR_ABORTED. */
typedef bool (*hp_progress_callback)(uint32_t step, uint32_t steps, float sigma,
                                     void *user_data);

typedef struct hp_sample_params {
    size_t struct_size;
    /* Denoising steps, at least 1. Default 28. */
    uint32_t steps;
    /* Classifier-free guidance scale; <= 1 runs the prompt only. Default 1. */
    float guidance;
    /* Schedule shift, > 0. Default 3. */
    double shift;
    /* Seed of the initial latent when none is given (hiprune's own generator: not
     * torch's random stream). Default 0. */
    uint64_t seed;
    /* May be NULL. */
    hp_progress_callback progress;
    void *progress_user_data;
} hp_sample_params;

/* Defaults (struct_size filled). Never fails. */
HP_API hp_sample_params hp_sample_default_params(void);

/* The flow-matching Euler loop of SD3 (diffusers' FlowMatchEulerDiscreteScheduler).
 *   context, pooled                    as for hp_forward
 *   negative_context, negative_pooled  same shapes; required when guidance > 1,
 *                                      otherwise may be NULL with length 0
 *   latent_init  [batch, in_channels, height, width], or NULL with length 0 to draw
 *                one from params->seed
 *   latent_out   [batch, out_channels, height, width], written on HP_OK only
 * params NULL means the defaults. Needs in_channels == out_channels.
 * Returns HP_OK, HP_ERR_INVALID_HANDLE, HP_ERR_INVALID_ARGUMENT (as hp_forward, plus
 * steps 0, shift <= 0 or not finite, guidance not finite, missing negative
 * embeddings, struct_size too small), HP_ERR_SIZE_MISMATCH, HP_ERR_ABORTED (the
 * progress callback returned false; latent_out untouched), HP_ERR_UNSUPPORTED
 * (in_channels != out_channels), HP_ERR_BUSY, HP_ERR_INTERNAL. */
HP_API hp_status hp_sample(hp_context *ctx, const hp_sample_params *params,
                           const hp_dims *dims, const float *context, size_t context_len,
                           const float *pooled, size_t pooled_len,
                           const float *negative_context, size_t negative_context_len,
                           const float *negative_pooled, size_t negative_pooled_len,
                           const float *latent_init, size_t latent_init_len,
                           float *latent_out, size_t latent_out_len);

/* Memory of a context, in bytes. */
typedef struct hp_memory_info {
    size_t struct_size;
    /* Weights the model runs: hp_model_info.bytes_total. On the CPU the linear
     * weights of a package are read in place from its memory map (file pages, shared
     * with the page cache); the rest are f32 copies on the heap. */
    uint64_t weight_bytes;
    /* Activation buffers of the largest call so far, computed from its shapes: the
     * buffers live together inside one transformer block (image and context streams,
     * their normalised copies, q/k/v and the attention output over all tokens,
     * the feed-forward hidden layer), plus the copies hp_sample keeps (latent,
     * doubled batch with guidance, embeddings). An estimate, not a measurement of
     * the allocator. 0 before the first call. */
    uint64_t scratch_bytes;
    /* weight_bytes + scratch_bytes. */
    uint64_t peak_bytes;
} hp_memory_info;

/* Fills *out (set out->struct_size first).
 * Returns HP_OK, HP_ERR_INVALID_HANDLE, HP_ERR_INVALID_ARGUMENT (out NULL,
 * struct_size too small), HP_ERR_BUSY. */
HP_API hp_status hp_context_memory(const hp_context *ctx, hp_memory_info *out);

#ifdef __cplusplus
}
#endif

#endif /* HIPRUNE_H */
