/* Helpers shared by the C tests: raw little-endian f32 files and status checks. */
#ifndef HP_TEST_COMMON_H
#define HP_TEST_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hiprune.h"

static int g_failures = 0;

/* Reads a whole file of float32 values; *n receives the count. Exits on error. */
static inline float *read_floats(const char *dir, const char *name, size_t *n) {
    char path[4096];
    FILE *f;
    long bytes;
    float *data;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = (float *)malloc((size_t)bytes > 0 ? (size_t)bytes : 1);
    if (!data || fread(data, 1, (size_t)bytes, f) != (size_t)bytes) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    fclose(f);
    *n = (size_t)bytes / sizeof(float);
    return data;
}

static inline void write_floats(const char *dir, const char *name, const float *data, size_t n) {
    char path[4096];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "wb");
    if (!f || fwrite(data, sizeof(float), n, f) != n) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
    fclose(f);
}

/* Checks that `got` is `want`; an error status must come with a message. */
static inline void check_status(hp_status got, hp_status want, const char *what, int line) {
    const char *msg = hp_last_error_message();
    if (got != want) {
        fprintf(stderr, "FAIL line %d: %s returned %s (%d), expected %s: %s\n", line, what,
                hp_status_string(got), (int)got, hp_status_string(want), msg);
        g_failures++;
        return;
    }
    if (want != HP_OK && (msg == NULL || msg[0] == '\0')) {
        fprintf(stderr, "FAIL line %d: %s returned %s with an empty message\n", line, what,
                hp_status_string(got));
        g_failures++;
        return;
    }
    if (want == HP_OK && msg[0] != '\0') {
        fprintf(stderr, "FAIL line %d: %s succeeded but left the message \"%s\"\n", line,
                what, msg);
        g_failures++;
        return;
    }
    printf("ok   %-58s %s%s%s\n", what, hp_status_string(got), want != HP_OK ? ": " : "",
           want != HP_OK ? msg : "");
}

#define CHECK(call, want) check_status((call), (want), #call, __LINE__)

#endif
