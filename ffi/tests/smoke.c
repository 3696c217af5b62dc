/* Smoke test of the C interface: load a package, inspect it, run one forward pass and
 * two sampling runs on the inputs in DIR, and write the outputs back to DIR.
 *
 *   smoke PACKAGE DIR
 *
 * DIR holds raw little-endian float32 files written by tests/ffi_c.rs:
 *   fwd_dims.txt ("batch height width tokens"), fwd_latent.bin, fwd_context.bin,
 *   fwd_pooled.bin, fwd_timestep.bin; smp_dims.txt, smp_latent.bin, smp_context.bin,
 *   smp_pooled.bin, smp_neg_context.bin, smp_neg_pooled.bin.
 * It writes fwd_out.bin, smp_out.bin (4 steps, no guidance) and smp_cfg_out.bin
 * (4 steps, guidance 4.5). */
#include "common.h"

static int g_log_records = 0;

static void on_log(int32_t level, const char *target, const char *message, void *user_data) {
    int *count = (int *)user_data;
    (*count)++;
    if (level <= HP_LOG_INFO) {
        printf("log  [%d] %s: %s\n", (int)level, target, message);
    }
}

struct progress_state {
    uint32_t calls;
    uint32_t last_step;
    float last_sigma;
};

static bool on_progress(uint32_t step, uint32_t steps, float sigma, void *user_data) {
    struct progress_state *p = (struct progress_state *)user_data;
    (void)steps;
    p->calls++;
    p->last_step = step;
    p->last_sigma = sigma;
    return true;
}

static hp_dims read_dims(const char *dir, const char *name) {
    char path[4096];
    FILE *f;
    unsigned long b, h, w, t;
    hp_dims d;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "r");
    if (!f || fscanf(f, "%lu %lu %lu %lu", &b, &h, &w, &t) != 4) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    fclose(f);
    d.batch = b;
    d.height = h;
    d.width = w;
    d.context_tokens = t;
    return d;
}

int main(int argc, char **argv) {
    const char *dir;
    hp_model *model = NULL;
    hp_context *ctx = NULL;
    hp_model_info info;
    hp_memory_info mem;
    hp_context_params cparams;
    hp_sample_params sparams;
    hp_dims fd, sd;
    uint32_t kept[256];
    size_t n_kept = 0;
    size_t n_lat, n_ctx, n_pool, n_ts, n_out;
    size_t s_lat, s_ctx, s_pool, s_nctx, s_npool;
    float *lat, *ctxv, *pool, *ts, *out;
    float *slat, *sctx, *spool, *snctx, *snpool, *sout;
    struct progress_state progress = {0, 0, 0.0f};
    size_t i;

    if (argc != 3) {
        fprintf(stderr, "usage: smoke PACKAGE DIR\n");
        return 2;
    }
    dir = argv[2];
    printf("hiprune %s, ABI %u (header %d)\n", hp_version_string(), (unsigned)hp_abi_version(),
           HP_ABI_VERSION);
    if (hp_abi_version() != HP_ABI_VERSION) {
        fprintf(stderr, "FAIL: ABI version mismatch\n");
        return 1;
    }
    CHECK(hp_log_set(on_log, &g_log_records), HP_OK);

    CHECK(hp_model_load(argv[1], &model), HP_OK);
    if (!model) {
        return 1;
    }
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK(hp_model_get_info(model, &info), HP_OK);
    printf("model: %u of %u blocks, D=%u, in %u, out %u, qk_norm %d, package %d\n",
           info.num_kept_blocks, info.num_layers, info.hidden_size, info.in_channels,
           info.out_channels, (int)info.qk_norm, (int)info.is_package);
    printf("bytes: f32 %llu f16 %llu bf16 %llu int4 %llu nf4 %llu other %llu total %llu file %llu\n",
           (unsigned long long)info.bytes_f32, (unsigned long long)info.bytes_f16,
           (unsigned long long)info.bytes_bf16, (unsigned long long)info.bytes_int4,
           (unsigned long long)info.bytes_nf4, (unsigned long long)info.bytes_other,
           (unsigned long long)info.bytes_total, (unsigned long long)info.file_bytes);
    if (info.struct_size != sizeof info || info.bytes_total == 0 || !info.is_package ||
        info.bytes_total != info.bytes_f32 + info.bytes_f16 + info.bytes_bf16 +
                                info.bytes_int4 + info.bytes_nf4 + info.bytes_other) {
        fprintf(stderr, "FAIL: inconsistent model info\n");
        g_failures++;
    }
    CHECK(hp_model_blocks(model, HP_BLOCKS_KEPT, kept, 256, &n_kept), HP_OK);
    printf("kept blocks:");
    for (i = 0; i < n_kept; i++) {
        printf(" %u", kept[i]);
    }
    printf("\n");
    if (n_kept != info.num_kept_blocks) {
        fprintf(stderr, "FAIL: block list length %zu != %u\n", n_kept, info.num_kept_blocks);
        g_failures++;
    }
    {
        /* The sub-component cuts: one list per component, together num_component_cuts. */
        static const struct {
            int32_t which;
            const char *name;
        } lists[] = {{HP_BLOCKS_NO_NORM1, "norm1"},
                     {HP_BLOCKS_NO_NORM1_CONTEXT, "norm1_context"},
                     {HP_BLOCKS_NO_ATTN, "attn"},
                     {HP_BLOCKS_NO_ATTN2, "attn2"},
                     {HP_BLOCKS_NO_FF, "ff"},
                     {HP_BLOCKS_NO_FF_CONTEXT, "ff_context"}};
        uint32_t cut[256];
        size_t n_cut = 0, total = 0, j;
        for (j = 0; j < sizeof lists / sizeof lists[0]; j++) {
            CHECK(hp_model_blocks(model, lists[j].which, cut, 256, &n_cut), HP_OK);
            for (i = 0; i < n_cut; i++) {
                printf("component cut: %u.%s\n", cut[i], lists[j].name);
            }
            total += n_cut;
        }
        printf("component cuts: %zu\n", total);
        if (total != info.num_component_cuts) {
            fprintf(stderr, "FAIL: %zu component cuts listed, info says %u\n", total,
                    info.num_component_cuts);
            g_failures++;
        }
    }

    cparams = hp_context_default_params();
    cparams.backend = HP_BACKEND_CPU;
    cparams.n_threads = 2;
    CHECK(hp_context_create(model, &cparams, &ctx), HP_OK);
    if (!ctx) {
        return 1;
    }

    /* Forward. */
    fd = read_dims(dir, "fwd_dims.txt");
    lat = read_floats(dir, "fwd_latent.bin", &n_lat);
    ctxv = read_floats(dir, "fwd_context.bin", &n_ctx);
    pool = read_floats(dir, "fwd_pooled.bin", &n_pool);
    ts = read_floats(dir, "fwd_timestep.bin", &n_ts);
    n_out = fd.batch * info.out_channels * fd.height * fd.width;
    out = (float *)malloc(n_out * sizeof(float));
    CHECK(hp_forward(ctx, &fd, lat, n_lat, ctxv, n_ctx, pool, n_pool, ts, n_ts, out, n_out),
          HP_OK);
    write_floats(dir, "fwd_out.bin", out, n_out);

    /* Sampling, without and with guidance, from the given latent. */
    sd = read_dims(dir, "smp_dims.txt");
    slat = read_floats(dir, "smp_latent.bin", &s_lat);
    sctx = read_floats(dir, "smp_context.bin", &s_ctx);
    spool = read_floats(dir, "smp_pooled.bin", &s_pool);
    snctx = read_floats(dir, "smp_neg_context.bin", &s_nctx);
    snpool = read_floats(dir, "smp_neg_pooled.bin", &s_npool);
    sout = (float *)malloc(s_lat * sizeof(float));
    sparams = hp_sample_default_params();
    sparams.steps = 4;
    sparams.shift = 3.0;
    sparams.progress = on_progress;
    sparams.progress_user_data = &progress;
    CHECK(hp_sample(ctx, &sparams, &sd, sctx, s_ctx, spool, s_pool, NULL, 0, NULL, 0, slat,
                    s_lat, sout, s_lat),
          HP_OK);
    write_floats(dir, "smp_out.bin", sout, s_lat);
    if (progress.calls != 4 || progress.last_step != 3 || !(progress.last_sigma > 0.0f)) {
        fprintf(stderr, "FAIL: progress saw %u calls, last step %u, sigma %f\n",
                progress.calls, progress.last_step, (double)progress.last_sigma);
        g_failures++;
    }
    sparams.guidance = 4.5f;
    CHECK(hp_sample(ctx, &sparams, &sd, sctx, s_ctx, spool, s_pool, snctx, s_nctx, snpool,
                    s_npool, slat, s_lat, sout, s_lat),
          HP_OK);
    write_floats(dir, "smp_cfg_out.bin", sout, s_lat);

    /* A seeded run (no initial latent) must be finite. */
    sparams.guidance = 1.0f;
    sparams.seed = 42;
    sparams.progress = NULL;
    CHECK(hp_sample(ctx, &sparams, &sd, sctx, s_ctx, spool, s_pool, NULL, 0, NULL, 0, NULL, 0,
                    sout, s_lat),
          HP_OK);
    for (i = 0; i < s_lat; i++) {
        if (!(sout[i] == sout[i])) {
            fprintf(stderr, "FAIL: seeded sample has a NaN at %zu\n", i);
            g_failures++;
            break;
        }
    }

    memset(&mem, 0, sizeof mem);
    mem.struct_size = sizeof mem;
    CHECK(hp_context_memory(ctx, &mem), HP_OK);
    printf("memory: weights %llu scratch %llu peak %llu\n",
           (unsigned long long)mem.weight_bytes, (unsigned long long)mem.scratch_bytes,
           (unsigned long long)mem.peak_bytes);
    if (mem.weight_bytes != info.bytes_total || mem.scratch_bytes == 0 ||
        mem.peak_bytes != mem.weight_bytes + mem.scratch_bytes) {
        fprintf(stderr, "FAIL: inconsistent memory info\n");
        g_failures++;
    }

    CHECK(hp_context_free(ctx), HP_OK);
    CHECK(hp_model_free(model), HP_OK);
    if (g_log_records == 0) {
        fprintf(stderr, "FAIL: the log callback saw no record\n");
        g_failures++;
    }
    CHECK(hp_log_set(NULL, NULL), HP_OK);
    free(lat);
    free(ctxv);
    free(pool);
    free(ts);
    free(out);
    free(slat);
    free(sctx);
    free(spool);
    free(snctx);
    free(snpool);
    free(sout);
    printf("%s (%d log records)\n", g_failures ? "FAILED" : "smoke passed", g_log_records);
    return g_failures ? 1 : 0;
}
