/*
 * CPU emulation of the 4-bit kernels' index math: repack, magic-number dequant,
 * ldmatrix addressing of the swizzled A tile, mma.sync m16n8k16 fragment ownership
 * (PTX ISA rules, lane by lane) and the GEMV's per-lane work. Host code only: built by
 * nvcc and run on a machine without a GPU (cuda/tests/run.sh). Exit status 0 = pass.
 */
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../q4_layout.cuh"

static int g_failures = 0;
#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                          \
            std::fprintf(stderr, __VA_ARGS__);                                                 \
            std::fprintf(stderr, "\n");                                                        \
            if (++g_failures > 20) std::exit(1);                                               \
        }                                                                                      \
    } while (0)

static float h2f(uint16_t b) { return __half2float(*reinterpret_cast<const __half *>(&b)); }
static uint16_t f2h(float f) {
    const __half h = __float2half_rn(f);
    return *reinterpret_cast<const uint16_t *>(&h);
}
static float round_h(float f) { return h2f(f2h(f)); }

struct Problem {
    int kind; // 0 int4, 1 int4sym, 2 nf4
    int64_t m, n, k, group;
    std::vector<uint8_t> packed;                // canonical [n, k/2]
    std::vector<uint16_t> scales, offsets, x;   // f16 bits
    std::vector<uint16_t> bias;
    std::vector<uint32_t> repacked;
};

static const float kNf4[16] = HP_NF4_LEVELS;

static Problem make_problem(std::mt19937_64 &rng, int kind, int64_t m, int64_t n, int64_t k,
                            int64_t group) {
    Problem p;
    p.kind = kind;
    p.m = m, p.n = n, p.k = k, p.group = group;
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    p.packed.resize(n * k / 2);
    for (auto &b : p.packed) b = (uint8_t)byte(rng);
    const int64_t groups = k / group;
    p.scales.resize(n * groups);
    p.offsets.resize(n * groups);
    for (auto &s : p.scales) s = f2h(0.01f + 0.05f * std::fabs(u(rng)));
    for (size_t i = 0; i < p.offsets.size(); ++i)
        p.offsets[i] = f2h(-8.0f * h2f(p.scales[i]) + 0.3f * u(rng) * h2f(p.scales[i]));
    p.x.resize(m * k);
    for (auto &v : p.x) v = f2h(u(rng));
    p.bias.resize(n);
    for (auto &v : p.bias) v = f2h(0.5f * u(rng));
    // Repack: the exact function the repack kernel runs, once per output word.
    const int64_t words = hp_q4_n_pad(n) * hp_q4_k_pad(k) / 8;
    p.repacked.resize(words);
    for (int64_t w = 0; w < words; ++w) p.repacked[w] = hp_q4_repack_word(p.packed.data(), n, k, w);
    return p;
}

static int code_at(const Problem &p, int64_t r, int64_t c) {
    const uint8_t b = p.packed[r * (p.k / 2) + c / 2];
    return (c & 1) ? b >> 4 : b & 0xf;
}

/** f64 reference with the canonical weight formula of each kind. */
static double weight_ref(const Problem &p, int64_t r, int64_t c) {
    const int64_t gi = r * (p.k / p.group) + c / p.group;
    const double s = h2f(p.scales[gi]);
    const int q = code_at(p, r, c);
    if (p.kind == 0) return s * q + h2f(p.offsets[gi]);
    if (p.kind == 1) return s * (q - 8);
    return s * kNf4[q];
}

static std::vector<double> reference(const Problem &p, bool with_bias) {
    std::vector<double> y(p.m * p.n);
    for (int64_t i = 0; i < p.m; ++i)
        for (int64_t r = 0; r < p.n; ++r) {
            double acc = with_bias ? h2f(p.bias[r]) : 0.0;
            for (int64_t c = 0; c < p.k; ++c) acc += (double)h2f(p.x[i * p.k + c]) * weight_ref(p, r, c);
            y[i * p.n + r] = acc;
        }
    return y;
}

static double rel_err(const std::vector<float> &got, const std::vector<double> &ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        if (!std::isfinite(got[i])) return INFINITY;
        num += (got[i] - ref[i]) * (got[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return std::sqrt(num / den);
}

/* ---- 1. layout: bijection, inverse, padding ---- */
static void test_layout(const Problem &p) {
    const int64_t kb = hp_q4_kblocks(p.k), strips = hp_q4_n_pad(p.n) / 16;
    std::vector<int> seen(hp_q4_n_pad(p.n) * hp_q4_k_pad(p.k), 0);
    for (int64_t S = 0; S < strips; ++S)
        for (int64_t B = 0; B < kb; ++B)
            for (int lane = 0; lane < 32; ++lane)
                for (int s = 0; s < 4; ++s)
                    for (int nib = 0; nib < 8; ++nib) {
                        int64_t r, c;
                        hp_q4_code_coords(S, B, lane, s, nib, &r, &c);
                        CHECK(r >= 16 * S && r < 16 * S + 16 && c >= 64 * B && c < 64 * B + 64,
                              "coords outside atom");
                        seen[r * hp_q4_k_pad(p.k) + c]++;
                        const hp_q4_loc loc = hp_q4_locate(r, c, p.k);
                        const int64_t w = (S * kb + B) * 128 + lane * 4 + s;
                        CHECK(loc.word == w && loc.nibble == nib, "locate is not the inverse");
                        const int q = (int)hp_q4_nib(p.repacked[w], nib);
                        if (r < p.n && c < p.k)
                            CHECK(q == code_at(p, r, c), "code (%lld,%lld) moved", (long long)r, (long long)c);
                        else
                            CHECK(q == 0, "padding not 0");
                    }
    for (int v : seen) CHECK(v == 1, "layout is not a bijection");
}

/* ---- 2. the magic-number trick, bit by bit, as the device does it ---- */
static void test_magic(std::mt19937_64 &rng) {
    for (int it = 0; it < 20000; ++it) {
        const uint32_t w = (uint32_t)rng();
        for (int bias = 0; bias <= 8; bias += 8) {
            uint32_t ref[4];
            hp_q4_pairs_int(w, bias, ref); // host branch: plain nibble extraction
            const uint32_t lo0 = (w & 0x000f000fu) | 0x64006400u;
            const uint32_t hi0 = (w & 0x00f000f0u) | 0x64006400u;
            const uint32_t lo1 = ((w >> 8) & 0x000f000fu) | 0x64006400u;
            const uint32_t hi1 = ((w >> 8) & 0x00f000f0u) | 0x64006400u;
            const uint32_t in[4] = {lo0, hi0, lo1, hi1};
            for (int p = 0; p < 4; ++p) {
                for (int half = 0; half < 2; ++half) {
                    const float v = h2f((uint16_t)(in[p] >> (16 * half)));
                    // HSUB2 (lo) / HFMA2 (hi) in f16: every intermediate is exact.
                    const float got = (p & 1) ? round_h(v * round_h(1.0f / 16) + round_h(-64.0f - bias))
                                              : round_h(v - round_h(1024.0f + bias));
                    const float want = h2f((uint16_t)(ref[p] >> (16 * half)));
                    CHECK(got == want, "magic trick pair %d half %d: %g vs %g", p, half, got, want);
                    CHECK(want == (float)((int)hp_q4_nib(w, p + 4 * half) - bias), "pair order");
                }
            }
        }
    }
}

/* ---- 3. GEMM: one warp tile, lane by lane ---- */
// A fragment regs of one m16 tile, k16 step ks of a 64-wide k tile, via the swizzled
// shared tile and ldmatrix.x4 addressing.
static void emulate_ldmatrix_a(const std::vector<uint16_t> &smem /*[16][64] swizzled*/, int ks,
                               uint32_t regs[32][4]) {
    for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < 4; ++j) {
            // matrix j's row r is addressed by lane 8j + r
            int dr, dc;
            hp_ldmatrix_dst(lane, &dr, &dc);
            const int src_lane = 8 * j + dr;
            int row, chunk;
            hp_ldmatrix_a_src(src_lane, ks, &row, &chunk);
            const int phys = hp_a_swizzle(row, chunk);
            const uint16_t lo = smem[row * 64 + phys * 8 + dc];
            const uint16_t hi = smem[row * 64 + phys * 8 + dc + 1];
            regs[lane][j] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
}

// mma.sync m16n8k16 row.col f32.f16.f16.f32, from the ISA's fragment ownership.
static void emulate_mma(const uint32_t a[32][4], const uint32_t b[32][2], float d[32][4]) {
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        for (int i = 0; i < 8; ++i)
            A[hp_mma_a_row(lane, i)][hp_mma_a_col(lane, i)] = h2f((uint16_t)(a[lane][i / 2] >> (16 * (i & 1))));
        for (int i = 0; i < 4; ++i)
            B[hp_mma_b_row(lane, i)][hp_mma_b_col(lane, i)] = h2f((uint16_t)(b[lane][i / 2] >> (16 * (i & 1))));
    }
    for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 4; ++i) {
            const int r = hp_mma_c_row(lane, i), c = hp_mma_c_col(lane, i);
            double acc = d[lane][i];
            for (int kk = 0; kk < 16; ++kk) acc += (double)A[r][kk] * B[kk][c];
            d[lane][i] = (float)acc;
        }
}

static std::vector<float> emulate_gemm(const Problem &p) {
    std::vector<float> y(p.m * p.n, NAN);
    const int64_t kb = hp_q4_kblocks(p.k), groups = p.k / p.group;
    uint16_t nf4h[16];
    for (int i = 0; i < 16; ++i) nf4h[i] = f2h(kNf4[i]);
    for (int64_t m0 = 0; m0 < p.m; m0 += 16)
        for (int64_t S = 0; S < hp_q4_n_pad(p.n) / 16; ++S) {
            float acc[2][32][4] = {};
            for (int64_t B = 0; B < kb; ++B) {
                // A tile: rows m0..m0+15, k 64B..64B+63, zero past m and k, swizzled chunks.
                std::vector<uint16_t> smem(16 * 64, 0xffff);
                for (int r = 0; r < 16; ++r)
                    for (int c = 0; c < 8; ++c)
                        for (int e = 0; e < 8; ++e) {
                            const int64_t gr = m0 + r, gc = 64 * B + 8 * c + e;
                            smem[r * 64 + hp_a_swizzle(r, c) * 8 + e] =
                                (gr < p.m && gc < p.k) ? p.x[gr * p.k + gc] : 0;
                        }
                for (int s = 0; s < 4; ++s) {
                    uint32_t a[32][4], b[2][32][2];
                    emulate_ldmatrix_a(smem, s, a);
                    for (int lane = 0; lane < 32; ++lane) {
                        const uint32_t w = p.repacked[(S * kb + B) * 128 + lane * 4 + s];
                        const int64_t kc = std::min<int64_t>(64 * B + 16 * s, p.k - 1);
                        __half sc[2], of[2];
                        for (int j = 0; j < 2; ++j) {
                            const int64_t r = std::min<int64_t>(16 * S + 8 * j + lane / 4, p.n - 1);
                            const uint16_t sb = p.scales[r * groups + kc / p.group];
                            const uint16_t ob = p.offsets[r * groups + kc / p.group];
                            sc[j] = *reinterpret_cast<const __half *>(&sb);
                            of[j] = *reinterpret_cast<const __half *>(&ob);
                        }
                        uint32_t bf[2][2];
                        switch (p.kind) {
                        case 0: hp_q4_b_frag<0>(w, sc, of, nf4h, bf); break;
                        case 1: hp_q4_b_frag<1>(w, sc, of, nf4h, bf); break;
                        default: hp_q4_b_frag<2>(w, sc, of, nf4h, bf); break;
                        }
                        for (int j = 0; j < 2; ++j) b[j][lane][0] = bf[j][0], b[j][lane][1] = bf[j][1];
                    }
                    for (int j = 0; j < 2; ++j) emulate_mma(a, b[j], acc[j]);
                }
            }
            // Epilogue: C fragment ownership, bias, skip past m / n.
            for (int j = 0; j < 2; ++j)
                for (int lane = 0; lane < 32; ++lane)
                    for (int i = 0; i < 4; ++i) {
                        const int64_t r = m0 + hp_mma_c_row(lane, i);
                        const int64_t c = 16 * S + 8 * j + hp_mma_c_col(lane, i);
                        if (r < p.m && c < p.n) y[r * p.n + c] = round_h(acc[j][lane][i] + h2f(p.bias[c]));
                    }
        }
    return y;
}

/* ---- 4. GEMV: per-lane work, quad shuffle, warp split, as the kernel does it ---- */
template <int KIND, int M> static std::vector<float> emulate_gemv_t(const Problem &p) {
    const int warps = 8, unroll = 4;
    const int64_t kb = hp_q4_kblocks(p.k), groups = p.k / p.group;
    std::vector<float> y(p.m * p.n, NAN);
    const __half *x = reinterpret_cast<const __half *>(p.x.data());
    for (int64_t S = 0; S < hp_q4_n_pad(p.n) / 16; ++S) {
        float red[8][M][16] = {};
        for (int warp = 0; warp < warps; ++warp) {
            float accl[32][2][M] = {};
            for (int lane = 0; lane < 32; ++lane) {
                const int g = lane / 4, t = lane % 4;
                const int64_t r0 = 16 * S + g, r1 = r0 + 8;
                for (int64_t kb0 = warp; kb0 < kb; kb0 += warps * unroll)
                    for (int u = 0; u < unroll; ++u) {
                        const int64_t B = kb0 + u * warps;
                        if (B >= kb) continue;
                        const uint32_t *raw = &p.repacked[(S * kb + B) * 128 + lane * 4];
                        for (int h = 0; h < 2; ++h) {
                            const int64_t kh = 64 * B + 32 * h;
                            if (kh >= p.k) continue;
                            const int64_t gi = kh / p.group;
                            const float s0 = r0 < p.n ? h2f(p.scales[r0 * groups + gi]) : 0;
                            const float s1 = r1 < p.n ? h2f(p.scales[r1 * groups + gi]) : 0;
                            const float o0 = r0 < p.n ? h2f(p.offsets[r0 * groups + gi]) : 0;
                            const float o1 = r1 < p.n ? h2f(p.offsets[r1 * groups + gi]) : 0;
                            const uint32_t wds[2] = {raw[2 * h], raw[2 * h + 1]};
                            float dot[2][M] = {}, sx[M] = {};
                            hp_gemv_half_atom<KIND, M>(wds, x, p.k, kh + 2 * t, kNf4, dot, sx);
                            for (int m = 0; m < M; ++m) {
                                accl[lane][0][m] += s0 * dot[0][m] + (KIND == 0 ? o0 * sx[m] : 0);
                                accl[lane][1][m] += s1 * dot[1][m] + (KIND == 0 ? o1 * sx[m] : 0);
                            }
                        }
                    }
            }
            // __shfl_xor 1 then 2: lane 4g ends with the quad's sum.
            for (int g = 0; g < 8; ++g)
                for (int m = 0; m < M; ++m)
                    for (int j = 0; j < 2; ++j) {
                        float v = 0;
                        for (int t = 0; t < 4; ++t) v += accl[4 * g + t][j][m];
                        red[warp][m][g + 8 * j] = v;
                    }
        }
        for (int m = 0; m < M; ++m)
            for (int r = 0; r < 16; ++r) {
                const int64_t row = 16 * S + r;
                if (row >= p.n) continue;
                float v = 0;
                for (int w = 0; w < warps; ++w) v += red[w][m][r];
                y[m * p.n + row] = round_h(v + h2f(p.bias[row]));
            }
    }
    return y;
}

template <int KIND> static std::vector<float> emulate_gemv_k(const Problem &p) {
    switch (p.m) {
    case 1: return emulate_gemv_t<KIND, 1>(p);
    case 2: return emulate_gemv_t<KIND, 2>(p);
    case 3: return emulate_gemv_t<KIND, 3>(p);
    case 5: return emulate_gemv_t<KIND, 5>(p);
    case 7: return emulate_gemv_t<KIND, 7>(p);
    default: return emulate_gemv_t<KIND, 8>(p);
    }
}

static std::vector<float> emulate_gemv(const Problem &p) {
    if (p.kind == 0) return emulate_gemv_k<0>(p);
    if (p.kind == 1) return emulate_gemv_k<1>(p);
    return emulate_gemv_k<2>(p);
}

int main() {
    std::mt19937_64 rng(std::random_device{}());
    const uint64_t seed = rng();
    std::printf("seed %llu\n", (unsigned long long)seed);
    rng.seed(seed);
    test_magic(rng);
    std::printf("magic-number dequant: ok\n");

    const int64_t groups[3] = {32, 64, 128};
    const int64_t ms[6] = {1, 2, 3, 5, 7, 8};
    const int64_t gemm_ms[4] = {1, 9, 17, 37};
    std::uniform_int_distribution<int> ndist(1, 70);
    for (int kind = 0; kind < 3; ++kind)
        for (int gi = 0; gi < 3; ++gi)
            for (int rep = 0; rep < 3; ++rep) {
                const int64_t group = groups[gi];
                // k: a multiple of group, often not of 64 (padded half-atom).
                const int64_t k = group * std::uniform_int_distribution<int>(1, 320 / (int)group)(rng);
                const int64_t n = ndist(rng);
                const int64_t m = ms[std::uniform_int_distribution<int>(0, 5)(rng)];
                Problem p = make_problem(rng, kind, std::max<int64_t>(m, gemm_ms[rep % 4 + (rep == 2)]), n, k, group);
                test_layout(p);
                const auto ref = reference(p, true);
                const auto gemm = emulate_gemm(p);
                const double eg = rel_err(gemm, ref);
                Problem pv = p;
                pv.m = m;
                pv.x.resize(m * k);
                const auto refv = reference(pv, true);
                const auto gemv = emulate_gemv(pv);
                const double ev = rel_err(gemv, refv);
                std::printf("kind %d group %3lld m %2lld/%lld n %3lld k %3lld: gemm rel %.2e  gemv rel %.2e\n",
                            kind, (long long)group, (long long)p.m, (long long)m, (long long)n,
                            (long long)k, eg, ev);
                CHECK(eg <= 2e-3, "gemm emulation rel err %g", eg);
                CHECK(ev <= 2e-3, "gemv emulation rel err %g", ev);
            }
    if (g_failures) {
        std::printf("%d failures\n", g_failures);
        return 1;
    }
    std::printf("all emulation checks passed\n");
    return 0;
}
