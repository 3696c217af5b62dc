/* Misuse of the C interface: every call below is wrong in one way and must return
 * the code the header documents, with a message, and never crash.
 *
 *   misuse PACKAGE CORRUPT_PACKAGE MISSING_PATH */
#include <math.h>

#include "common.h"

struct reentry {
    hp_context *ctx;
    hp_status forward_status;
    hp_status free_status;
    int message_ok;
    uint32_t abort_at;
    uint32_t calls;
};

/* Stops at step `abort_at`; on the first call also tries to use and free the busy
 * context from inside the callback. */
static bool on_progress(uint32_t step, uint32_t steps, float sigma, void *user_data) {
    struct reentry *r = (struct reentry *)user_data;
    hp_dims d = {1, 8, 6, 5};
    float x = 0.0f;
    (void)steps;
    (void)sigma;
    r->calls++;
    if (step == 0 && r->ctx) {
        r->forward_status = hp_forward(r->ctx, &d, &x, 1, &x, 1, &x, 1, &x, 1, &x, 1);
        r->message_ok = hp_last_error_message()[0] != '\0';
        r->free_status = hp_context_free(r->ctx);
    }
    return step < r->abort_at;
}

int main(int argc, char **argv) {
    hp_model *model = NULL, *m2 = NULL;
    hp_context *ctx = NULL, *c2 = NULL;
    hp_model_info info;
    hp_memory_info mem;
    hp_context_params cp;
    hp_sample_params sp;
    hp_dims d = {1, 8, 6, 5}, bad;
    uint32_t blocks[2];
    size_t count = 0, n_lat, n_ctx, n_pool, i;
    float *lat, *ctxv, *pool, *out, ts = 500.0f;
    int not_a_handle = 0;
    struct reentry r;

    if (argc != 4) {
        fprintf(stderr, "usage: misuse PACKAGE CORRUPT MISSING\n");
        return 2;
    }

    /* Library-level calls. */
    if (strcmp(hp_status_string(-999), "HP_ERR_UNKNOWN") != 0 ||
        strcmp(hp_status_string(HP_ERR_BUSY), "HP_ERR_BUSY") != 0) {
        fprintf(stderr, "FAIL: hp_status_string\n");
        g_failures++;
    }

    /* Loading. */
    CHECK(hp_model_load(NULL, &model), HP_ERR_INVALID_ARGUMENT);
    CHECK(hp_model_load(argv[1], NULL), HP_ERR_INVALID_ARGUMENT);
    model = (hp_model *)&not_a_handle;
    CHECK(hp_model_load(argv[3], &model), HP_ERR_IO);
    if (model != NULL) {
        fprintf(stderr, "FAIL: a failed load left *out_model set\n");
        g_failures++;
    }
    CHECK(hp_model_load(argv[2], &model), HP_ERR_INVALID_MODEL);
    CHECK(hp_model_load(argv[1], &model), HP_OK);

    /* Model handles and info. */
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK(hp_model_get_info(NULL, &info), HP_ERR_INVALID_HANDLE);
    CHECK(hp_model_get_info((hp_model *)&not_a_handle, &info), HP_ERR_INVALID_HANDLE);
    CHECK(hp_model_get_info(model, NULL), HP_ERR_INVALID_ARGUMENT);
    info.struct_size = 8;
    CHECK(hp_model_get_info(model, &info), HP_ERR_INVALID_ARGUMENT);
    info.struct_size = sizeof info;
    CHECK(hp_model_get_info(model, &info), HP_OK);
    CHECK(hp_model_blocks(model, 8, blocks, 2, &count), HP_ERR_INVALID_ARGUMENT);
    CHECK(hp_model_blocks(model, -1, blocks, 2, &count), HP_ERR_INVALID_ARGUMENT);
    CHECK(hp_model_blocks(model, HP_BLOCKS_KEPT, blocks, 2, NULL), HP_ERR_INVALID_ARGUMENT);
    CHECK(hp_model_blocks(model, HP_BLOCKS_KEPT, NULL, 2, &count), HP_ERR_INVALID_ARGUMENT);
    CHECK(hp_model_blocks(model, HP_BLOCKS_KEPT, blocks, 2, &count), HP_ERR_SIZE_MISMATCH);
    if (count != info.num_kept_blocks) {
        fprintf(stderr, "FAIL: size query gave %zu blocks\n", count);
        g_failures++;
    }
    CHECK(hp_model_blocks(model, HP_BLOCKS_KEPT, NULL, 0, &count), HP_ERR_SIZE_MISMATCH);
    CHECK(hp_model_blocks(model, HP_BLOCKS_DUAL_ATTENTION, NULL, 0, &count), HP_OK);

    /* Context creation. */
    cp = hp_context_default_params();
    CHECK(hp_context_create(NULL, &cp, &ctx), HP_ERR_INVALID_HANDLE);
    CHECK(hp_context_create(model, &cp, NULL), HP_ERR_INVALID_ARGUMENT);
    cp.backend = 99;
    CHECK(hp_context_create(model, &cp, &ctx), HP_ERR_INVALID_ARGUMENT);
    cp.backend = HP_BACKEND_CUDA;
    CHECK(hp_context_create(model, &cp, &ctx), HP_ERR_BACKEND_UNAVAILABLE);
    cp.backend = HP_BACKEND_CPU;
    cp.device = 3;
    CHECK(hp_context_create(model, &cp, &ctx), HP_ERR_INVALID_ARGUMENT);
    cp.device = -1;
    CHECK(hp_context_create(model, &cp, &ctx), HP_ERR_INVALID_ARGUMENT);
    cp = hp_context_default_params();
    cp.struct_size = 4;
    CHECK(hp_context_create(model, &cp, &ctx), HP_ERR_INVALID_ARGUMENT);
    cp = hp_context_default_params();
    cp.n_threads = 2;
    CHECK(hp_context_create(model, &cp, &ctx), HP_OK);

    /* Forward with bad arguments. */
    n_lat = info.in_channels * d.height * d.width;
    n_ctx = d.context_tokens * info.joint_attention_dim;
    n_pool = info.pooled_projection_dim;
    lat = (float *)calloc(n_lat, sizeof(float));
    ctxv = (float *)calloc(n_ctx, sizeof(float));
    pool = (float *)calloc(n_pool, sizeof(float));
    out = (float *)calloc(n_lat, sizeof(float));
    CHECK(hp_forward(NULL, &d, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1, out, n_lat),
          HP_ERR_INVALID_HANDLE);
    CHECK(hp_forward((hp_context *)model, &d, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1,
                     out, n_lat),
          HP_ERR_INVALID_HANDLE);
    CHECK(hp_forward(ctx, NULL, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1, out, n_lat),
          HP_ERR_INVALID_ARGUMENT);
    CHECK(hp_forward(ctx, &d, NULL, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1, out, n_lat),
          HP_ERR_INVALID_ARGUMENT);
    CHECK(hp_forward(ctx, &d, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1, NULL, n_lat),
          HP_ERR_INVALID_ARGUMENT);
    CHECK(hp_forward(ctx, &d, lat, n_lat - 1, ctxv, n_ctx, pool, n_pool, &ts, 1, out, n_lat),
          HP_ERR_SIZE_MISMATCH);
    CHECK(hp_forward(ctx, &d, lat, n_lat, ctxv, 0, pool, n_pool, &ts, 1, out, n_lat),
          HP_ERR_SIZE_MISMATCH);
    CHECK(hp_forward(ctx, &d, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 2, out, n_lat),
          HP_ERR_SIZE_MISMATCH);
    CHECK(hp_forward(ctx, &d, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1, out, n_lat + 1),
          HP_ERR_SIZE_MISMATCH);
    bad = d;
    bad.batch = 0;
    CHECK(hp_forward(ctx, &bad, lat, 0, ctxv, 0, pool, 0, &ts, 0, out, 0),
          HP_ERR_INVALID_ARGUMENT);
    bad = d;
    bad.height = 7; /* not a multiple of the patch */
    CHECK(hp_forward(ctx, &bad, lat, info.in_channels * 7 * d.width, ctxv, n_ctx, pool, n_pool,
                     &ts, 1, out, info.out_channels * 7 * d.width),
          HP_ERR_INVALID_ARGUMENT);
    bad = d;
    bad.batch = (size_t)-1; /* the shape product overflows */
    CHECK(hp_forward(ctx, &bad, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1, out, n_lat),
          HP_ERR_SIZE_MISMATCH);
    lat[3] = NAN;
    CHECK(hp_forward(ctx, &d, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1, out, n_lat),
          HP_ERR_INVALID_ARGUMENT);
    lat[3] = 0.0f;
    CHECK(hp_forward(ctx, &d, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1, out, n_lat), HP_OK);

    /* Sampling with bad arguments, abort, and re-entry from the callback. */
    sp = hp_sample_default_params();
    sp.steps = 0;
    CHECK(hp_sample(ctx, &sp, &d, ctxv, n_ctx, pool, n_pool, NULL, 0, NULL, 0, NULL, 0, out,
                    n_lat),
          HP_ERR_INVALID_ARGUMENT);
    sp = hp_sample_default_params();
    sp.shift = -1.0;
    CHECK(hp_sample(ctx, &sp, &d, ctxv, n_ctx, pool, n_pool, NULL, 0, NULL, 0, NULL, 0, out,
                    n_lat),
          HP_ERR_INVALID_ARGUMENT);
    sp = hp_sample_default_params();
    sp.steps = 2;
    sp.guidance = 4.5f;
    CHECK(hp_sample(ctx, &sp, &d, ctxv, n_ctx, pool, n_pool, NULL, 0, NULL, 0, NULL, 0, out,
                    n_lat),
          HP_ERR_INVALID_ARGUMENT);
    sp.guidance = 1.0f;
    CHECK(hp_sample(ctx, &sp, &d, ctxv, n_ctx, pool, n_pool, ctxv, 3, NULL, 0, NULL, 0, out,
                    n_lat),
          HP_ERR_SIZE_MISMATCH);
    CHECK(hp_sample(ctx, &sp, &d, ctxv, n_ctx, pool, n_pool, NULL, 0, NULL, 0, lat, 5, out,
                    n_lat),
          HP_ERR_SIZE_MISMATCH);
    memset(&r, 0, sizeof r);
    r.ctx = ctx;
    r.abort_at = 1;
    sp = hp_sample_default_params();
    sp.steps = 4;
    sp.progress = on_progress;
    sp.progress_user_data = &r;
    for (i = 0; i < n_lat; i++) {
        out[i] = 7.0f;
    }
    CHECK(hp_sample(ctx, &sp, &d, ctxv, n_ctx, pool, n_pool, NULL, 0, NULL, 0, NULL, 0, out,
                    n_lat),
          HP_ERR_ABORTED);
    if (r.calls != 2 || out[0] != 7.0f || out[n_lat - 1] != 7.0f) {
        fprintf(stderr, "FAIL: abort after %u callbacks, output touched: %f\n", r.calls,
                (double)out[0]);
        g_failures++;
    }
    if (r.forward_status != HP_ERR_BUSY || r.free_status != HP_ERR_BUSY || !r.message_ok) {
        fprintf(stderr, "FAIL: re-entry gave forward %s, free %s\n",
                hp_status_string(r.forward_status), hp_status_string(r.free_status));
        g_failures++;
    } else {
        printf("ok   re-entry from the progress callback: forward and free %s\n",
               hp_status_string(r.forward_status));
    }

    /* Memory. */
    mem.struct_size = 0;
    CHECK(hp_context_memory(ctx, &mem), HP_ERR_INVALID_ARGUMENT);
    CHECK(hp_context_memory(ctx, NULL), HP_ERR_INVALID_ARGUMENT);
    CHECK(hp_context_memory((hp_context *)model, &mem), HP_ERR_INVALID_HANDLE);

    /* Frees: wrong kind, double free, use after free, model freed before its context. */
    CHECK(hp_model_free(NULL), HP_OK);
    CHECK(hp_context_free(NULL), HP_OK);
    CHECK(hp_model_free((hp_model *)ctx), HP_ERR_INVALID_HANDLE);
    CHECK(hp_context_free((hp_context *)model), HP_ERR_INVALID_HANDLE);
    CHECK(hp_context_free(ctx), HP_OK);
    CHECK(hp_context_free(ctx), HP_ERR_INVALID_HANDLE);
    CHECK(hp_forward(ctx, &d, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1, out, n_lat),
          HP_ERR_INVALID_HANDLE);
    CHECK(hp_model_load(argv[1], &m2), HP_OK);
    CHECK(hp_context_create(m2, NULL, &c2), HP_OK);
    CHECK(hp_model_free(m2), HP_OK);
    CHECK(hp_model_free(m2), HP_ERR_INVALID_HANDLE);
    CHECK(hp_model_get_info(m2, &info), HP_ERR_INVALID_HANDLE);
    CHECK(hp_forward(c2, &d, lat, n_lat, ctxv, n_ctx, pool, n_pool, &ts, 1, out, n_lat), HP_OK);
    CHECK(hp_context_free(c2), HP_OK);
    CHECK(hp_model_free(model), HP_OK);
    CHECK(hp_model_free(model), HP_ERR_INVALID_HANDLE);

    free(lat);
    free(ctxv);
    free(pool);
    free(out);
    printf("%s\n", g_failures ? "FAILED" : "misuse passed");
    return g_failures ? 1 : 0;
}
