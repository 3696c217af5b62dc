/*
 * Index math of the repacked 4-bit layout and of the mma.sync m16n8k16 fragments.
 *
 * Everything here is __host__ __device__ so that the kernels and the CPU emulation
 * in cuda/tests/emulate_layout.cu run the very same functions: a layout or fragment
 * bug shows up on a machine with no GPU.
 *
 * The repacked layout ("atoms")
 * -----------------------------
 * n is padded to n_pad = 16 * ceil(n / 16) and k to k_pad = 64 * ceil(k / 64), with
 * code 0 in the padding. The matrix is cut into atoms of 16 rows (n) x 64 columns (k);
 * an atom is 512 contiguous bytes, and atoms are stored strip-major:
 *
 *     atom(S, B) = S * (k_pad / 64) + B        S = n / 16 (strip), B = k / 64 (k block)
 *     byte offset of the atom = 512 * atom(S, B)
 *
 * Inside an atom, lane L (0..31) of a warp owns the 16 bytes at 16 * L: one 16-byte
 * load per lane, 512 contiguous bytes per warp, so both the GEMV (straight from
 * global memory) and the GEMM (cp.async into shared memory, then one conflict-free
 * 16-byte shared load per lane) move the weights with full-width coalesced accesses.
 * With L = 4 * g + t (g = groupID, t = threadID_in_group in the PTX ISA's words),
 * word s (0..3) of the lane's 16 bytes holds the 8 codes that lane needs as the B
 * operand of the k16 step s of the atom, for both n8 halves j (0, 1) of the strip:
 *
 *     nibble p' (bits 4p'..4p'+3) of word s, p = p' & 3, hi = p' >> 2:
 *         j = p >> 1,   i = 2 * (p & 1) + hi          (i: index of b_i in the ISA)
 *         n = 16 S + 8 j + g
 *         k = 64 B + 16 s + 2 t + (i & 1) + 8 * (i >> 1)
 *
 * The k formula is the ISA's B-fragment row (row = 2t + (i & 1) (+ 8 for i >= 2)),
 * the n formula its column (col = groupID). Nibbles p and p + 4 form one pair because
 * the magic-number conversion (see hp_q4_pairs_int below) turns bits 0-3 and 16-19 of
 * a word into the low and high halves of one half2 with a single lop3: pair p is
 * (b_{2(p&1)}, b_{2(p&1)+1}) of n8 half j = p >> 1, i.e. exactly one .f16x2 B register
 * of mma.m16n8k16 after dequantisation. No shuffles or permutes are needed in the
 * inner loop.
 *
 * A half-atom (words 0-1 or 2-3, 32 consecutive k) never straddles a quantisation
 * group since groups are 32, 64 or 128 wide and start at multiples of 32: the
 * kernels apply one scale per (row, half-atom).
 */
#ifndef HIPRUNE_CUDA_Q4_LAYOUT_CUH
#define HIPRUNE_CUDA_Q4_LAYOUT_CUH

#include <cuda_fp16.h>
#include <stdint.h>

#define HP_HD __host__ __device__ __forceinline__

/** Rows per atom (one strip). */
#define HP_Q4_ATOM_N 16
/** k columns per atom. */
#define HP_Q4_ATOM_K 64
/** Bytes per atom: 16 * 64 codes of 4 bits. */
#define HP_Q4_ATOM_BYTES 512

/** n padded to whole strips. */
HP_HD int64_t hp_q4_n_pad(int64_t n) { return (n + 15) / 16 * 16; }
/** k padded to whole atoms. */
HP_HD int64_t hp_q4_k_pad(int64_t k) { return (k + 63) / 64 * 64; }
/** Number of atoms along k. */
HP_HD int64_t hp_q4_kblocks(int64_t k) { return hp_q4_k_pad(k) / 64; }

/** Where one code lives in the repacked buffer: byte offset of its 32-bit word and nibble. */
struct hp_q4_loc {
    int64_t word; /* index of the 32-bit word */
    int nibble;   /* 0..7, bits 4*nibble .. 4*nibble+3 */
};

/** (n, k) coordinates of nibble `nib` of word `s` of lane `lane` of atom (S, B). */
HP_HD void hp_q4_code_coords(int64_t strip, int64_t kblock, int lane, int s, int nib,
                             int64_t *n, int64_t *k) {
    const int g = lane >> 2, t = lane & 3;
    const int p = nib & 3, hi = nib >> 2;
    const int j = p >> 1, i = 2 * (p & 1) + hi;
    *n = 16 * strip + 8 * j + g;
    *k = 64 * kblock + 16 * s + 2 * t + (i & 1) + 8 * (i >> 1);
}

/** Inverse of hp_q4_code_coords: the location of code (n, k) of a k-wide matrix. */
HP_HD hp_q4_loc hp_q4_locate(int64_t n, int64_t k, int64_t kdim) {
    const int64_t strip = n / 16, kblock = k / 64;
    const int nr = (int)(n % 16), kr = (int)(k % 64);
    const int j = nr >> 3, g = nr & 7;
    const int s = kr >> 4, kk = kr & 15;
    const int i = (kk & 1) + 2 * (kk >> 3);
    const int t = (kk & 7) >> 1;
    const int p = 2 * j + (i >> 1), hi = i & 1;
    const int lane = 4 * g + t;
    hp_q4_loc loc;
    loc.word = (strip * hp_q4_kblocks(kdim) + kblock) * (HP_Q4_ATOM_BYTES / 4) + lane * 4 + s;
    loc.nibble = p + 4 * hi;
    return loc;
}

/**
 * Builds repacked word `w` (32-bit word index into the repacked buffer) from the
 * canonical codes (u8 [n, k/2], low nibble = even k). Codes outside [n, k] are 0.
 */
HP_HD uint32_t hp_q4_repack_word(const uint8_t *packed, int64_t n, int64_t k, int64_t w) {
    const int64_t kb = hp_q4_kblocks(k);
    const int64_t atom = w / (HP_Q4_ATOM_BYTES / 4);
    const int within = (int)(w % (HP_Q4_ATOM_BYTES / 4));
    const int lane = within >> 2, s = within & 3;
    const int64_t strip = atom / kb, kblock = atom % kb;
    uint32_t out = 0;
#pragma unroll
    for (int nib = 0; nib < 8; ++nib) {
        int64_t r, c;
        hp_q4_code_coords(strip, kblock, lane, s, nib, &r, &c);
        uint32_t q = 0;
        if (r < n && c < k) {
            const uint8_t byte = packed[r * (k / 2) + c / 2];
            q = (c & 1) ? (uint32_t)(byte >> 4) : (uint32_t)(byte & 0xf);
        }
        out |= q << (4 * nib);
    }
    return out;
}

/* ---- mma.sync.m16n8k16 .f16 fragment ownership (PTX ISA, "Matrix Fragments for
 * mma.m16n8k16 with floating point type"). groupID = lane >> 2, tig = lane % 4. ---- */

/** Row of element a_i (i = 0..7) of the A fragment held by `lane`. */
HP_HD int hp_mma_a_row(int lane, int i) { return (lane >> 2) + (((i >> 1) & 1) ? 8 : 0); }
/** Column (k) of element a_i of the A fragment held by `lane`. */
HP_HD int hp_mma_a_col(int lane, int i) { return (lane & 3) * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
/** Row (k) of element b_i (i = 0..3) of the B fragment held by `lane`. */
HP_HD int hp_mma_b_row(int lane, int i) { return (lane & 3) * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
/** Column (n) of element b_i of the B fragment held by `lane`. */
HP_HD int hp_mma_b_col(int lane, int i) { (void)i; return lane >> 2; }
/** Row (m) of accumulator c_i (i = 0..3) held by `lane`. */
HP_HD int hp_mma_c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
/** Column (n) of accumulator c_i held by `lane`. */
HP_HD int hp_mma_c_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

/* ---- ldmatrix.x4 addressing of the A tile in shared memory ----
 * The A tile is [rows][64] halves, 128 bytes a row, stored as eight 16-byte chunks
 * per row with chunk c of row r at physical chunk c ^ (r & 7) (XOR swizzle). Without
 * it the 8 row addresses of one 8x8 matrix are 128 bytes apart and all hit the same
 * 4 banks (8-way conflict); with it they cover all 32 banks. cp.async writes with the
 * same mapping. */

/** Physical 16-byte chunk of logical chunk `c` (0..7) of A-tile row `r`. */
HP_HD int hp_a_swizzle(int r, int c) { return c ^ (r & 7); }

/**
 * Row (within the m16 tile) and logical 16-byte chunk (within the 64-wide k tile) whose
 * address `lane` supplies to ldmatrix.x4 for k16 step `ks`. Lanes 0-7 address matrix 0
 * (rows 0-7, k 0-7 of the step), 8-15 matrix 1 (rows 8-15, k 0-7), 16-23 matrix 2
 * (rows 0-7, k 8-15), 24-31 matrix 3 (rows 8-15, k 8-15): destination register j then
 * holds exactly the ISA's A register j (a_{2j}, a_{2j+1}).
 */
HP_HD void hp_ldmatrix_a_src(int lane, int ks, int *row, int *chunk) {
    *row = lane & 15;
    *chunk = 2 * ks + (lane >> 4);
}

/** ldmatrix result rule: register j of `lane` holds row lane/4, columns 2(lane%4)+{0,1} of matrix j. */
HP_HD void hp_ldmatrix_dst(int lane, int *row, int *col) {
    *row = lane >> 2;
    *col = 2 * (lane & 3);
}

/* ---- nibble -> half conversion ---- */

/** The 16 NF4 levels (bitsandbytes), indexed by code. */
#define HP_NF4_LEVELS                                                                          \
    {-1.0f, -0.6961928f, -0.52507305f, -0.3949175f, -0.28444138f, -0.18477343f,                \
     -0.091050036f, 0.0f, 0.0795803f, 0.1609302f, 0.2461123f, 0.33791524f, 0.44070983f,        \
     0.562617f, 0.72295684f, 1.0f}

/**
 * INT4 codes of one repacked word as four half2 (bit patterns): pair p = (q(nib p) -
 * bias, q(nib p+4) - bias), low half first. `bias` is 0 (int4) or 8 (int4sym).
 *
 * On the device this is the magic-number trick: OR-ing a nibble into the low mantissa
 * bits of 1024.0h (0x6400) gives the f16 value 1024 + q exactly (f16 has 10 mantissa
 * bits, so 1024..2047 are the integers). lop3 does the AND with the nibble mask and the
 * OR with 0x6400 in one instruction for two halves at once. Nibbles in bits 4-7 land as
 * 1024 + 16 q, fixed with one fma (x/16 - 64). All steps are exact in f16.
 */
HP_HD void hp_q4_pairs_int(uint32_t w, int bias, uint32_t out[4]) {
#ifdef __CUDA_ARCH__
    const uint32_t lo_mask = 0x000f000fu, hi_mask = 0x00f000f0u, magic = 0x64006400u;
    uint32_t lo0, hi0, lo1, hi1;
    const uint32_t w8 = w >> 8;
    // (a & b) | c  ->  immLut 0xea
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(lo0) : "r"(w), "r"(lo_mask), "r"(magic));
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(hi0) : "r"(w), "r"(hi_mask), "r"(magic));
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(lo1) : "r"(w8), "r"(lo_mask), "r"(magic));
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(hi1) : "r"(w8), "r"(hi_mask), "r"(magic));
    // lo: (1024 + q) - (1024 + bias); hi: (1024 + 16 q) / 16 - (64 + bias).
    const __half2 sub = __half2half2(__float2half_rn(1024.0f + (float)bias));
    const __half2 sixteenth = __half2half2(__float2half_rn(1.0f / 16.0f));
    const __half2 hi_off = __half2half2(__float2half_rn(-64.0f - (float)bias));
    __half2 r0 = __hsub2(*reinterpret_cast<const __half2 *>(&lo0), sub);
    __half2 r1 = __hfma2(*reinterpret_cast<const __half2 *>(&hi0), sixteenth, hi_off);
    __half2 r2 = __hsub2(*reinterpret_cast<const __half2 *>(&lo1), sub);
    __half2 r3 = __hfma2(*reinterpret_cast<const __half2 *>(&hi1), sixteenth, hi_off);
    out[0] = *reinterpret_cast<uint32_t *>(&r0);
    out[1] = *reinterpret_cast<uint32_t *>(&r1);
    out[2] = *reinterpret_cast<uint32_t *>(&r2);
    out[3] = *reinterpret_cast<uint32_t *>(&r3);
#else
    for (int p = 0; p < 4; ++p) {
        const __half lo = __float2half_rn((float)((w >> (4 * p)) & 0xf) - (float)bias);
        const __half hi = __float2half_rn((float)((w >> (4 * (p + 4))) & 0xf) - (float)bias);
        const uint16_t lb = *reinterpret_cast<const uint16_t *>(&lo);
        const uint16_t hb = *reinterpret_cast<const uint16_t *>(&hi);
        out[p] = (uint32_t)lb | ((uint32_t)hb << 16);
    }
#endif
}

/** Code of nibble `nib` (0..7) of a repacked word. */
HP_HD uint32_t hp_q4_nib(uint32_t w, int nib) { return (w >> (4 * nib)) & 0xfu; }

/** f16 bits of a half2 word -> two floats (low, high). */
HP_HD float2 hp_pair_to_float2(uint32_t pair) {
    const uint16_t lo = (uint16_t)(pair & 0xffffu), hi = (uint16_t)(pair >> 16);
    return make_float2(__half2float(*reinterpret_cast<const __half *>(&lo)),
                       __half2float(*reinterpret_cast<const __half *>(&hi)));
}

/**
 * The GEMV's per-lane work on one half-atom (32 consecutive k, one quantisation group):
 * the lane's two words `wds` (words 2h and 2h+1 of its 16 bytes) hold codes of rows g
 * and g + 8 of the strip at k = kh + 16 ss + 2t + {0, 1, 8, 9}, ss = 0, 1 (`k_lane` =
 * kh + 2t). Accumulates in f32, per row j and batch row m,
 *     dot[j][m] += sum x[m, k] * v(q)      (v = q for int4, q - 8 for int4sym, NF4[q] for nf4)
 *     sx[m]     += sum x[m, k]             (int4 only: the offset term is offset * sum x)
 * so the caller applies scale (and offset) once per half-atom: two FMAs per 32 codes.
 * `x` is [M, kdim] row-major f16; `nf4` the 16 levels (shared memory on the device).
 */
template <int KIND, int M>
HP_HD void hp_gemv_half_atom(const uint32_t wds[2], const __half *__restrict__ x, int64_t kdim,
                             int64_t k_lane, const float *nf4, float dot[2][M], float sx[M]) {
#pragma unroll
    for (int ss = 0; ss < 2; ++ss) {
        float2 v[4];
        if (KIND == 2) {
#pragma unroll
            for (int p = 0; p < 4; ++p)
                v[p] = make_float2(nf4[hp_q4_nib(wds[ss], p)], nf4[hp_q4_nib(wds[ss], p + 4)]);
        } else {
            uint32_t pairs[4];
            hp_q4_pairs_int(wds[ss], KIND == 1 ? 8 : 0, pairs);
#pragma unroll
            for (int p = 0; p < 4; ++p) v[p] = hp_pair_to_float2(pairs[p]);
        }
        const int64_t kk = k_lane + 16 * ss;
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const __half2 xa2 = *reinterpret_cast<const __half2 *>(x + m * kdim + kk);
            const __half2 xb2 = *reinterpret_cast<const __half2 *>(x + m * kdim + kk + 8);
            const float2 xa = make_float2(__low2float(xa2), __high2float(xa2));
            const float2 xb = make_float2(__low2float(xb2), __high2float(xb2));
            // pair 0/1: row g (j = 0), k pairs (2t, 2t+1) and (2t+8, 2t+9); pair 2/3: row g + 8.
            dot[0][m] += xa.x * v[0].x + xa.y * v[0].y + xb.x * v[1].x + xb.y * v[1].y;
            dot[1][m] += xa.x * v[2].x + xa.y * v[2].y + xb.x * v[3].x + xb.y * v[3].y;
            if (KIND == 0) sx[m] += (xa.x + xa.y) + (xb.x + xb.y);
        }
    }
}

/** half2 bits from two f16 values given as floats (round to nearest). */
HP_HD uint32_t hp_pack_half2(float lo, float hi) {
    const __half l = __float2half_rn(lo), h = __float2half_rn(hi);
    return (uint32_t)(*reinterpret_cast<const uint16_t *>(&l)) |
           ((uint32_t)(*reinterpret_cast<const uint16_t *>(&h)) << 16);
}

/**
 * The GEMM's B operands for one k16 step of one atom: from the lane's word s, the two
 * .f16x2 registers of n8 half j = 0 (b[0][0..1]) and j = 1 (b[1][0..1]), dequantised with
 * the scale (and offset) of the lane's rows g (sc[0], of[0]) and g + 8 (sc[1], of[1]):
 *     int4: s * q + o (one HFMA2 per register), int4sym: s * (q - 8) (the -8 is folded
 *     into the magic-number constants, then one HMUL2), nf4: absmax * NF4[q] (codebook
 *     `nf4h` as f16 bits, shared memory on the device; then one HMUL2).
 * Scale, offset and results are f16: the tensor cores take f16 operands anyway, and the
 * single rounding of s * q + o is the rounding an f16 weight would have had.
 */
template <int KIND>
HP_HD void hp_q4_b_frag(uint32_t w, const __half sc[2], const __half of[2],
                        const uint16_t *nf4h, uint32_t b[2][2]) {
    uint32_t pairs[4];
    if (KIND == 2) {
#pragma unroll
        for (int p = 0; p < 4; ++p)
            pairs[p] = (uint32_t)nf4h[hp_q4_nib(w, p)] | ((uint32_t)nf4h[hp_q4_nib(w, p + 4)] << 16);
    } else {
        hp_q4_pairs_int(w, KIND == 1 ? 8 : 0, pairs);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const uint32_t q = pairs[2 * j + r];
#ifdef __CUDA_ARCH__
            const __half2 s2 = __half2half2(sc[j]);
            const __half2 qh = *reinterpret_cast<const __half2 *>(&q);
            __half2 v;
            if (KIND == 0)
                v = __hfma2(qh, s2, __half2half2(of[j]));
            else
                v = __hmul2(qh, s2);
            b[j][r] = *reinterpret_cast<uint32_t *>(&v);
#else
            const float2 qf = hp_pair_to_float2(q);
            const float s = __half2float(sc[j]);
            const float o = KIND == 0 ? __half2float(of[j]) : 0.0f;
            b[j][r] = KIND == 0 ? hp_pack_half2(fmaf(qf.x, s, o), fmaf(qf.y, s, o))
                                : hp_pack_half2(qf.x * s, qf.y * s);
#endif
        }
    }
}

#endif /* HIPRUNE_CUDA_Q4_LAYOUT_CUH */
