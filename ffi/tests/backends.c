/* Backend choice through the C interface: HP_BACKEND_CPU, HP_BACKEND_CUDA and
 * HP_BACKEND_AUTO on one model, checked with hp_context_get_info and forward passes.
 *
 *   backends PACKAGE DIR
 *
 * DIR holds the forward inputs smoke.c reads (fwd_dims.txt, fwd_*.bin).
 * HP_TEST_CUDA_BUILD (1 or 0, set by tests/ffi_c.rs) says whether the library was built
 * with the CUDA backend.
 * - Without a usable GPU, HP_BACKEND_CUDA fails with HP_ERR_BACKEND_UNAVAILABLE and a
 *   message that says "not built with CUDA" in a CPU-only build and "no usable CUDA
 *   device" in a CUDA build; HP_BACKEND_AUTO runs on the CPU, says that it fell back and
 *   why, and its forward equals the CPU context's bit for bit.
 * - With a GPU (HP_BACKEND_CUDA succeeds), the CUDA forward matches the CPU's within
 *   the CUDA tolerance (2e-2 of max |cpu|, f16 activations) and AUTO picks CUDA.
 * HIPRUNE_REQUIRE_GPU=1 turns a missing GPU into a failure. */
#include "common.h"

#include <math.h>

#ifndef HP_TEST_CUDA_BUILD
#error "HP_TEST_CUDA_BUILD must be defined to 0 or 1"
#endif

#define CUDA_TOLERANCE 2e-2f

struct inputs {
    hp_dims dims;
    float *latent, *context, *pooled, *timestep;
    size_t n_latent, n_context, n_pooled, n_timestep, n_out;
};

static void fail(const char *what) {
    fprintf(stderr, "FAIL %s\n", what);
    g_failures++;
}

static struct inputs read_inputs(const char *dir, const hp_model_info *info) {
    char path[4096];
    FILE *f;
    unsigned long b, h, w, t;
    struct inputs in;
    snprintf(path, sizeof path, "%s/fwd_dims.txt", dir);
    f = fopen(path, "r");
    if (!f || fscanf(f, "%lu %lu %lu %lu", &b, &h, &w, &t) != 4) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    fclose(f);
    in.dims.batch = b;
    in.dims.height = h;
    in.dims.width = w;
    in.dims.context_tokens = t;
    in.latent = read_floats(dir, "fwd_latent.bin", &in.n_latent);
    in.context = read_floats(dir, "fwd_context.bin", &in.n_context);
    in.pooled = read_floats(dir, "fwd_pooled.bin", &in.n_pooled);
    in.timestep = read_floats(dir, "fwd_timestep.bin", &in.n_timestep);
    in.n_out = b * info->out_channels * h * w;
    return in;
}

static void free_inputs(struct inputs *in) {
    free(in->latent);
    free(in->context);
    free(in->pooled);
    free(in->timestep);
}

/* A forward on ctx into a fresh buffer (NULL on failure, reported). */
static float *forward(hp_context *ctx, const struct inputs *in, const char *what) {
    float *out = (float *)malloc(in->n_out * sizeof(float));
    hp_status st;
    if (!out) {
        exit(2);
    }
    st = hp_forward(ctx, &in->dims, in->latent, in->n_latent, in->context, in->n_context,
                    in->pooled, in->n_pooled, in->timestep, in->n_timestep, out, in->n_out);
    check_status(st, HP_OK, what, __LINE__);
    if (st != HP_OK) {
        free(out);
        return NULL;
    }
    return out;
}

static hp_context *create(hp_model *model, int32_t backend, hp_status want, const char *what) {
    hp_context *ctx = NULL;
    hp_context_params p = hp_context_default_params();
    p.backend = backend;
    p.n_threads = 2;
    check_status(hp_context_create(model, &p, &ctx), want, what, __LINE__);
    return ctx;
}

static hp_context_info info_of(hp_context *ctx) {
    hp_context_info info;
    memset(&info, 0xab, sizeof info);
    info.struct_size = sizeof info;
    CHECK(hp_context_get_info(ctx, &info), HP_OK);
    if (info.struct_size != sizeof info) {
        fail("hp_context_get_info: struct_size not written back");
    }
    return info;
}

int main(int argc, char **argv) {
    hp_model *model = NULL;
    hp_model_info minfo;
    hp_context *cpu = NULL, *cuda = NULL, *aut = NULL;
    hp_context_info info;
    struct inputs in;
    float *on_cpu = NULL, *on_cuda = NULL, *on_auto = NULL;
    const char *require = getenv("HIPRUNE_REQUIRE_GPU");
    int have_gpu = 0;
    size_t i;

    if (argc != 3) {
        fprintf(stderr, "usage: backends PACKAGE DIR\n");
        return 2;
    }
    CHECK(hp_model_load(argv[1], &model), HP_OK);
    if (!model) {
        return 1;
    }
    memset(&minfo, 0, sizeof minfo);
    minfo.struct_size = sizeof minfo;
    CHECK(hp_model_get_info(model, &minfo), HP_OK);
    in = read_inputs(argv[2], &minfo);

    /* The CPU context: exactly what it says. */
    cpu = create(model, HP_BACKEND_CPU, HP_OK, "create HP_BACKEND_CPU");
    info = info_of(cpu);
    if (info.backend != HP_BACKEND_CPU || info.device != 0 || info.fell_back ||
        info.fallback_reason[0] != '\0' || info.n_threads != 2) {
        fail("CPU context info");
    }
    on_cpu = forward(cpu, &in, "hp_forward on the CPU");

    /* HP_BACKEND_CUDA: runs where a GPU is usable, else says precisely why not. */
    {
        hp_context_params p = hp_context_default_params();
        hp_status st;
        const char *msg;
        p.backend = HP_BACKEND_CUDA;
        st = hp_context_create(model, &p, &cuda);
        msg = hp_last_error_message();
        if (st == HP_OK) {
            have_gpu = 1;
            if (!HP_TEST_CUDA_BUILD) {
                fail("HP_BACKEND_CUDA succeeded in a build without CUDA");
            }
            printf("ok   HP_BACKEND_CUDA context created (a GPU is present)\n");
        } else if (st != HP_ERR_BACKEND_UNAVAILABLE) {
            fprintf(stderr, "FAIL HP_BACKEND_CUDA returned %s: %s\n", hp_status_string(st), msg);
            g_failures++;
        } else if (HP_TEST_CUDA_BUILD && strstr(msg, "no usable CUDA device") == NULL) {
            fprintf(stderr, "FAIL CUDA build: message should say no usable CUDA device: %s\n", msg);
            g_failures++;
        } else if (!HP_TEST_CUDA_BUILD && strstr(msg, "not built with CUDA") == NULL) {
            fprintf(stderr, "FAIL CPU-only build: message should say not built with CUDA: %s\n",
                    msg);
            g_failures++;
        } else {
            printf("ok   HP_BACKEND_CUDA unavailable: %s\n", msg);
        }
        if (st != HP_OK && cuda != NULL) {
            fail("failed hp_context_create left *out_ctx non-NULL");
        }
    }
    if (!have_gpu && require != NULL && strcmp(require, "1") == 0) {
        fail("HIPRUNE_REQUIRE_GPU=1 but no CUDA context could be created");
    }

    /* HP_BACKEND_AUTO: CUDA when usable, else the CPU, and it says so. */
    aut = create(model, HP_BACKEND_AUTO, HP_OK, "create HP_BACKEND_AUTO");
    info = info_of(aut);
    if (have_gpu) {
        if (info.backend != HP_BACKEND_CUDA || info.fell_back || info.fallback_reason[0] != '\0') {
            fail("AUTO with a GPU should run on CUDA");
        }
    } else {
        if (info.backend != HP_BACKEND_CPU || !info.fell_back || info.fallback_reason[0] == '\0' ||
            memchr(info.fallback_reason, '\0', sizeof info.fallback_reason) == NULL) {
            fail("AUTO without a GPU should fall back to the CPU and say why");
        } else {
            printf("ok   AUTO fell back to the CPU: %s\n", info.fallback_reason);
        }
    }
    on_auto = forward(aut, &in, "hp_forward on AUTO");

    if (have_gpu) {
        info = info_of(cuda);
        if (info.backend != HP_BACKEND_CUDA || info.device != 0 || info.fell_back) {
            fail("CUDA context info");
        }
        on_cuda = forward(cuda, &in, "hp_forward on CUDA");
    }

    if (on_cpu && on_auto) {
        float scale = 0.0f, worst = 0.0f;
        for (i = 0; i < in.n_out; i++) {
            float a = fabsf(on_cpu[i]);
            scale = a > scale ? a : scale;
        }
        for (i = 0; i < in.n_out; i++) {
            float d = fabsf(on_auto[i] - on_cpu[i]);
            worst = d > worst ? d : worst;
        }
        if (!have_gpu && worst != 0.0f) {
            fail("AUTO on the CPU differs from the CPU context");
        }
        if (have_gpu && !(worst <= CUDA_TOLERANCE * scale)) {
            fprintf(stderr, "FAIL AUTO (CUDA) vs CPU: max |diff| %g > %g\n", worst,
                    CUDA_TOLERANCE * scale);
            g_failures++;
        }
        printf("ok   AUTO vs CPU: max |diff| %g (max |cpu| %g)\n", worst, scale);
        if (on_cuda) {
            worst = 0.0f;
            for (i = 0; i < in.n_out; i++) {
                float d = fabsf(on_cuda[i] - on_cpu[i]);
                worst = d > worst ? d : worst;
            }
            if (!(worst <= CUDA_TOLERANCE * scale)) {
                fprintf(stderr, "FAIL CUDA vs CPU: max |diff| %g > %g\n", worst,
                        CUDA_TOLERANCE * scale);
                g_failures++;
            }
            printf("ok   CUDA vs CPU: max |diff| %g, relative %g\n", worst,
                   scale > 0.0f ? worst / scale : 0.0f);
        }
    }

    free(on_cpu);
    free(on_cuda);
    free(on_auto);
    free_inputs(&in);
    CHECK(hp_context_free(aut), HP_OK);
    CHECK(hp_context_free(cuda), HP_OK);
    CHECK(hp_context_free(cpu), HP_OK);
    CHECK(hp_model_free(model), HP_OK);
    if (g_failures) {
        fprintf(stderr, "%d failure(s)\n", g_failures);
        return 1;
    }
    printf("backends passed\n");
    return 0;
}
