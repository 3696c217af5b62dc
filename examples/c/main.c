/* Minimal C application on hiprune: load a model, print what it is, run one
 * denoising run from a seeded latent with zero prompt embeddings, and print the
 * memory the context used.
 *
 *   hiprune_example MODEL.hpk [STEPS]
 *
 * A real application feeds the prompt embeddings of its text encoders and decodes
 * the final latent with its VAE. */
#include <stdio.h>
#include <stdlib.h>

#include <hiprune.h>

static bool on_progress(uint32_t step, uint32_t steps, float sigma, void *user_data) {
    (void)user_data;
    fprintf(stderr, "step %u/%u sigma %.4f\n", step + 1, steps, (double)sigma);
    return true;
}

static int fail(const char *what, hp_status st) {
    fprintf(stderr, "%s failed: %s: %s\n", what, hp_status_string(st), hp_last_error_message());
    return 1;
}

int main(int argc, char **argv) {
    hp_model *model = NULL;
    hp_context *ctx = NULL;
    hp_model_info info = {0};
    hp_memory_info mem = {0};
    hp_sample_params sp;
    hp_dims dims;
    hp_status st;
    size_t n_ctx, n_pool, n_lat;
    float *context, *pooled, *latent;
    int rc = 0;

    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.hpk [STEPS]\n", argv[0]);
        return 2;
    }
    printf("hiprune %s (ABI %u)\n", hp_version_string(), (unsigned)hp_abi_version());
    if ((st = hp_model_load(argv[1], &model)) != HP_OK) {
        return fail("hp_model_load", st);
    }
    info.struct_size = sizeof info;
    hp_model_get_info(model, &info);
    printf("%u of %u blocks, hidden size %u, %llu weight bytes\n", info.num_kept_blocks,
           info.num_layers, info.hidden_size, (unsigned long long)info.bytes_total);

    if ((st = hp_context_create(model, NULL, &ctx)) != HP_OK) {
        hp_model_free(model);
        return fail("hp_context_create", st);
    }
    /* The context keeps the weights alive: the model handle can go now. */
    hp_model_free(model);

    dims.batch = 1;
    dims.height = info.sample_size;
    dims.width = info.sample_size;
    dims.context_tokens = 8;
    n_ctx = dims.context_tokens * info.joint_attention_dim;
    n_pool = info.pooled_projection_dim;
    n_lat = (size_t)info.in_channels * dims.height * dims.width;
    context = calloc(n_ctx, sizeof(float));
    pooled = calloc(n_pool, sizeof(float));
    latent = calloc(n_lat, sizeof(float));

    sp = hp_sample_default_params();
    sp.steps = argc > 2 ? (uint32_t)atoi(argv[2]) : 4;
    sp.seed = 1;
    sp.progress = on_progress;
    st = hp_sample(ctx, &sp, &dims, context, n_ctx, pooled, n_pool, NULL, 0, NULL, 0, NULL, 0,
                   latent, n_lat);
    if (st != HP_OK) {
        rc = fail("hp_sample", st);
    } else {
        printf("latent[0..3] = %f %f %f\n", (double)latent[0], (double)latent[1],
               (double)latent[2]);
        mem.struct_size = sizeof mem;
        hp_context_memory(ctx, &mem);
        printf("memory: weights %llu, scratch %llu, peak %llu bytes\n",
               (unsigned long long)mem.weight_bytes, (unsigned long long)mem.scratch_bytes,
               (unsigned long long)mem.peak_bytes);
    }
    free(context);
    free(pooled);
    free(latent);
    hp_context_free(ctx);
    return rc;
}
