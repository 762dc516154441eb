/* A decode step's work on the CPU: y = x · Wᵀ (+ b) for a few rows of x, one query's attention over a KV cache,
 * and the GeLU, for bf16, fp16 and fp32 models and int8 weights; and a whole block's step made of them.
 *
 * A decode step multiplies one token per sequence (M rows, a few) by every weight matrix of the model, so its
 * time is the time it takes to read the weights from memory. torch's general matmul kernels reach about 60% of
 * the machine's bandwidth on these shapes; reading each weight row once, as one contiguous stream, with the M
 * dot products for it computed while the row is in the cache, reaches 80-95%.
 *
 * Shapes: x (M, K) row-major, W (N, K) row-major (torch's Linear layout), b and scale (N,), y (M, N).
 * Every product is accumulated in float32 and rounded to the output dtype once, after the bias is added, as
 * torch's half-precision matmul does; the order of the additions differs from torch's, so results differ from
 * F.linear by float32 rounding (not bitwise). (With AVX2, int8 weights beside bf16 activations are summed in int32
 * first, each row of activations rounded to a grid of 2^-15 of its largest: int8_in_integers.)
 *
 * The rows of W are split over the OpenMP threads in contiguous blocks. This file is compiled on first use
 * by bloom/matvec.py, for the machine it runs on (-march=native): with AVX512-BF16 (and AVX512-VBMI, for the
 * int8 weights' conversion) the bf16 and int8 products use vdpbf16ps, the fp16 and fp32 ones AVX-512 FMAs; with
 * AVX2, FMA and F16C, 8-lane multiply-adds of float32 (int8 weights beside bf16 activations: exact products of int16,
 * int8_in_integers); elsewhere plain loops that the compiler vectorizes, slower
 * than torch's matmul, so that bloom/matvec.py sends them no products (`vector_tiles` below). Built against the
 * OpenMP runtime torch has loaded (same soname), it shares torch's threads. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define HAVE_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, NaN stays NaN: as torch */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* fp16 <-> float32 through the compiler's _Float16 (F16C instructions where the CPU has them), rounding to
 * nearest even as torch does. */
static inline float f16_to_float(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}

static inline uint16_t float_to_f16(float f) {
    _Float16 v = (_Float16)f;
    uint16_t h;
    memcpy(&h, &v, sizeof h);
    return h;
}

/* A float32 value rounded to bf16 or fp16 and back: what storing an op's result in that dtype does to it. */
static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }
static inline float round_f16(float f) { return f16_to_float(float_to_f16(f)); }
static inline float same_float(float f) { return f; }

/* The dtype of a kernel's values, a constant where it is passed, so that the compiler drops the other cases */
enum { AS_F32, AS_BF16, AS_F16 };

/* Which tiles the products are: 2 the AVX-512 ones, 1 the AVX2 ones, 0 the portable loops (bloom/matvec.py sends
 * products to the kernels by it, `max_rows`) */
int vector_tiles(void) {
#if defined(HAVE_AVX512)
    return 2;
#elif defined(HAVE_AVX2)
    return 1;
#else
    return 0;
#endif
}

#include <omp.h>

#ifdef HAVE_AVX512

/* The vector steps each type needs: load `width` values of W or x (zeros past a mask), multiply-add them. */
static inline __m512bh load_bf16(const uint16_t *p, __mmask32 valid) { return (__m512bh)_mm512_maskz_loadu_epi16(valid, p); }

static inline __m512 load_f32(const float *p, __mmask16 valid) { return _mm512_maskz_loadu_ps(valid, p); }
/* The same, into a register the compiler must use as it is. Left to itself, it folds a float32 chunk's load into every
 * multiply-add that uses it (vfmadd231ps with a memory operand), so that a 4x4 tile loaded each chunk four times and
 * waited for the load ports, not the multiply-adds (bf16's vdpbf16ps never took memory operands). Streaming
 * bloom-560m's products at 16 rows (scratch, alternated in one process): fp32's blocks 52.6 -> 37.8 ms, its LM head
 * 42.3 -> 29.6 ms; fp16's (x as float32) 33.8 -> 28.1 and 25.1 -> 19.8 ms; int8's beside float32 x 32.5 -> 25.9 and
 * 26.6 -> 20.0 ms. */
static inline __m512 load_f32_held(const float *p, __mmask16 valid) {
    __m512 v = _mm512_maskz_loadu_ps(valid, p);
    __asm__("" : "+v"(v)); /* an empty instruction that "changes" v: what it holds is no longer the memory's */
    return v;
}
static inline __m512 load_int8_as_f32(const int8_t *q, __mmask16 valid) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(valid, q)));
}
static inline __m512 load_f16(const uint16_t *p, __mmask16 valid) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, p));
}
static inline __m512 mac_bf16(__m512 acc, __m512bh w, __m512bh x) { return _mm512_dpbf16_ps(acc, w, x); }
static inline __m512 mac_f32(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }

/* float32 -> bf16 in the low 16 bits of each lane, as float_to_bf16: to nearest even, subnormals kept (vcvtneps2bf16
 * would flush them to 0), a NaN made quiet */
static inline __m512i bf16_bits512(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x400000));
    return _mm512_srli_epi32(rounded, 16);
}
static inline __m512 round512_bf16(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits512(v), 16)); }
static inline __m512 round512_f16(__m512 v) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* 16 values of `dtype` from element i of p as float32 (zeros past `valid`), float32 values rounded to it, and
 * stored as it. */
static inline __m512 load512(const void *p, int64_t i, __mmask16 valid, const int dtype) {
    if (dtype == AS_F32) return _mm512_maskz_loadu_ps(valid, (const float *)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(valid, (const uint16_t *)p + i);
    return dtype == AS_BF16 ? _mm512_cvtpbh_ps((__m256bh)h) : _mm512_cvtph_ps(h);
}

static inline __m512 round512(__m512 v, const int dtype) {
    return dtype == AS_BF16 ? round512_bf16(v) : dtype == AS_F16 ? round512_f16(v) : v;
}

static inline void store512(void *p, int64_t i, __mmask16 valid, __m512 v, const int dtype) {
    if (dtype == AS_F32) {
        _mm512_mask_storeu_ps((float *)p + i, valid, v);
        return;
    }
    __m256i h = dtype == AS_BF16 ? _mm512_cvtepi32_epi16(bf16_bits512(v))
                                 : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16((uint16_t *)p + i, valid, h);
}

/* 64 int8 weights as bf16 (exact: 8 bits), in 8 vector instructions where converting through float32 takes 12: each
 * byte's bf16 is looked up, its low and its high byte in a table of 128 entries (the bf16 of 1..128, indexed by
 * |q| - 1; q = 0 is masked to 0), its sign put back, and the two bytes interleaved. The bytes are first put in the
 * order that the interleaving (within 128-bit lanes) undoes, so the 64 values come out in order. */
typedef struct { __m512bh lo, hi; } bf16x64; /* values [0, 32) and [32, 64) */

static uint8_t BF16_LOW_BYTE[128], BF16_HIGH_BYTE[128]; /* of the bf16 of 1..128 */
__attribute__((constructor)) static void fill_bf16_byte_tables(void) {
    for (int i = 0; i < 128; i++) {
        uint16_t bits = float_to_bf16((float)(i + 1));
        BF16_LOW_BYTE[i] = bits & 0xff, BF16_HIGH_BYTE[i] = bits >> 8;
    }
}

static inline bf16x64 load_int8x64_as_bf16(const int8_t *q, __mmask64 valid) { /* exact, -128 included */
    const __m512i order = _mm512_set_epi8(63, 62, 61, 60, 59, 58, 57, 56, 31, 30, 29, 28, 27, 26, 25, 24, /**/
                                          55, 54, 53, 52, 51, 50, 49, 48, 23, 22, 21, 20, 19, 18, 17, 16, /**/
                                          47, 46, 45, 44, 43, 42, 41, 40, 15, 14, 13, 12, 11, 10, 9, 8,   /**/
                                          39, 38, 37, 36, 35, 34, 33, 32, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i *low = (const __m512i *)BF16_LOW_BYTE, *high = (const __m512i *)BF16_HIGH_BYTE;
    __m512i bytes = _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8(valid, q));
    __mmask64 nonzero = _mm512_test_epi8_mask(bytes, bytes);
    __m512i index = _mm512_sub_epi8(_mm512_abs_epi8(bytes), _mm512_set1_epi8(1)); /* the table uses its low 7 bits */
    __m512i lo = _mm512_maskz_permutex2var_epi8(nonzero, _mm512_loadu_si512(low), index, _mm512_loadu_si512(low + 1));
    __m512i hi = _mm512_maskz_permutex2var_epi8(nonzero, _mm512_loadu_si512(high), index, _mm512_loadu_si512(high + 1));
    hi = _mm512_ternarylogic_epi32(hi, bytes, _mm512_set1_epi8((char)0x80), 0xF8); /* hi | (bytes & 0x80) */
    return (bf16x64){(__m512bh)_mm512_unpacklo_epi8(lo, hi), (__m512bh)_mm512_unpackhi_epi8(lo, hi)};
}

/* count int8 values widened to bf16 into wide; while they are read, the same count from `ahead` (NULL: none) is
 * prefetched */
static inline void widen_int8(const int8_t *q, int64_t count, uint16_t *wide, const int8_t *ahead) {
    for (int64_t i = 0; i < count; i += 64) {
        __mmask64 valid = count - i >= 64 ? ~0ull : (1ull << (count - i)) - 1;
        if (ahead) _mm_prefetch((const char *)(ahead + i), _MM_HINT_T0);
        bf16x64 v = load_int8x64_as_bf16(q + i, valid);
        _mm512_mask_storeu_epi16(wide + i, (__mmask32)valid, (__m512i)v.lo);
        _mm512_mask_storeu_epi16(wide + i + 32, (__mmask32)(valid >> 32), (__m512i)v.hi);
    }
}

static inline bf16x64 load_bf16x64(const uint16_t *p, __mmask64 valid) {
    return (bf16x64){load_bf16(p, (__mmask32)valid), load_bf16(p + 32, (__mmask32)(valid >> 32))};
}

static inline __m512 mac_bf16x64(__m512 acc, bf16x64 w, bf16x64 x) {
    return mac_bf16(mac_bf16(acc, w.lo, x.lo), w.hi, x.hi);
}

/* The sums of 16 vectors' lanes as one vector (lane a: the sum of v[a]'s 16 lanes), in 15 additions and 30
 * shuffles where 16 separate sums take 64 of each: pairs of vectors are interleaved and added, halving their
 * number each time. */
static inline __m512 sum_lanes16(const __m512 *v) {
    __m512 two[8], four[4], eight[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: v[2i]'s and v[2i+1]'s partial sums, interleaved */
        two[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: one partial sum of each of v[4i..4i+3] */
        __m512d a = _mm512_castps_pd(two[2 * i]), b = _mm512_castps_pd(two[2 * i + 1]);
        four[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++) /* the four 128-bit lanes added in pairs */
        eight[i] = _mm512_add_ps(_mm512_shuffle_f32x4(four[2 * i], four[2 * i + 1], 0x44),
                                 _mm512_shuffle_f32x4(four[2 * i], four[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(eight[0], eight[1], 0x88), _mm512_shuffle_f32x4(eight[0], eight[1], 0xDD));
}

/* A tile's results, lane r·XB + m: the product of row r of W and row m of x (lanes past R·XB: 0). Returned in a
 * register, not through memory: a vector stored and read back a lane at a time, or lanes stored one at a time and
 * read back as a vector, waits for the store to reach the cache. */
typedef __m512 dots16;

/* TILE(NAME, ...) defines NAME(x, w, K, ld, R, XB, U, next, rows_to_prefetch): the dots16 of K values of R
 * consecutive rows of W (ld values apart) and of XB rows of x, in R·XB·U <= 16 float32 accumulators. Each chunk of x
 * is loaded once for the R rows of W and each chunk of W once for the XB rows of x; U > 1 keeps U chunks of a row of
 * W in flight. Meanwhile it prefetches the W that a later tile reads, `next` (R rows, ld apart): the rows whose bits
 * `rows_to_prefetch` sets. With 16 rows of x, whose multiply-adds take as long as reading W, the products ran at 305
 * GFLOP/s without prefetching and 435 with it (when every tile prefetched the next R rows), the memory no longer
 * waited for between tiles. Called with constant R, XB, U, so that the compiler unrolls the loops and keeps the
 * accumulators in registers. */
#define TILE(NAME, WT, XT, VW, VX, WIDTH, MASK, LOAD_W, LOAD_X, MAC)                                          \
    static inline __attribute__((always_inline)) dots16 NAME(const XT *const *x, const WT *w, int64_t K,      \
                                                             int64_t ld, const int R, const int XB, const int U,  \
                                                             const WT *next, unsigned rows_to_prefetch) {         \
        __m512 acc[16];                                                                                       \
        for (int a = 0; a < R * XB * U; a++) acc[a] = _mm512_setzero_ps();                                    \
        int64_t k = 0;                                                                                        \
        for (; k + WIDTH * U <= K; k += WIDTH * U) /* whole chunks */                                         \
            for (int u = 0; u < U; u++) {                                                                     \
                VX xv[4];                                                                                     \
                for (int m = 0; m < XB; m++) xv[m] = LOAD_X(x[m] + k + WIDTH * u, (MASK)-1);                  \
                for (int r = 0; r < R; r++) {                                                                 \
                    if (rows_to_prefetch >> r & 1)                                                            \
                        _mm_prefetch((const char *)(next + r * ld + k + WIDTH * u), _MM_HINT_T0);             \
                    VW wv = LOAD_W(w + r * ld + k + WIDTH * u, (MASK)-1);                                     \
                    for (int m = 0; m < XB; m++)                                                              \
                        acc[(u * R + r) * XB + m] = MAC(acc[(u * R + r) * XB + m], wv, xv[m]);                \
                }                                                                                             \
            }                                                                                                 \
        for (; k < K; k += WIDTH) { /* the rest, a chunk at a time; the masked loads read zeros past K */     \
            MASK valid = K - k >= WIDTH ? (MASK)-1 : (MASK)((1ull << (K - k)) - 1);                           \
            VX xv[4];                                                                                         \
            for (int m = 0; m < XB; m++) xv[m] = LOAD_X(x[m] + k, valid);                                     \
            for (int r = 0; r < R; r++) {                                                                     \
                VW wv = LOAD_W(w + r * ld + k, valid);                                                        \
                for (int m = 0; m < XB; m++) acc[r * XB + m] = MAC(acc[r * XB + m], wv, xv[m]);               \
            }                                                                                                 \
        }                                                                                                     \
        __m512 sums[16];                                                                                      \
        for (int a = 0; a < 16; a++) {                                                                        \
            sums[a] = _mm512_setzero_ps();                                                                    \
            if (a < R * XB) sums[a] = acc[a];                                                                 \
            for (int u = 1; u < U && a < R * XB; u++) sums[a] = _mm512_add_ps(sums[a], acc[u * R * XB + a]);  \
        }                                                                                                     \
        return sum_lanes16(sums);                                                                             \
    }

TILE(tile_bf16, uint16_t, uint16_t, __m512bh, __m512bh, 32, __mmask32, load_bf16, load_bf16, mac_bf16)
TILE(tile_int8, int8_t, uint16_t, bf16x64, bf16x64, 64, __mmask64, load_int8x64_as_bf16, load_bf16x64, mac_bf16x64)
TILE(tile_int8_f32, int8_t, float, __m512, __m512, 16, __mmask16, load_int8_as_f32, load_f32_held, mac_f32) /* x float32 */
TILE(tile_f32, float, float, __m512, __m512, 16, __mmask16, load_f32_held, load_f32_held, mac_f32)
TILE(tile_f16, uint16_t, float, __m512, __m512, 16, __mmask16, load_f16, load_f32_held, mac_f32) /* x as float32 */
TILE(tile_f16_f16, uint16_t, uint16_t, __m512, __m512, 16, __mmask16, load_f16, load_f16, mac_f32)

/* SEQ_TILE(NAME, ...) defines NAME(x, w, K, R): the dots16 of one row of x and R <= 16 consecutive rows of W, read
 * one after the other, each from start to end with 4 chunks in flight (as one stream, which the memory serves
 * fastest), while the weights SEQ_AHEAD bytes further on are prefetched (the next row of fp32 weights, the second
 * of bf16, the fourth of int8: streamed, int8's LM head at one row took 5.4-5.7 ms prefetching the next row, 5.0-5.2
 * this way; bf16's and fp32's the same). A row's 4 partial sums are added into one vector, and the R vectors
 * summed across lanes together at the end: summing each row's lanes on its own took about a third of the time of an
 * int8 row of 1024 bytes read from the caches (the kernel ran at 52 GB/s there, then 75; with
 * load_int8x64_as_bf16, 97). */
#define SEQ_AHEAD 4096
#define SEQ_TILE(NAME, WT, XT, VW, VX, WIDTH, MASK, LOAD_W, LOAD_X, MAC)                                     \
    static inline __attribute__((always_inline)) dots16 NAME(const XT *x, const WT *w, int64_t K, const int R) { \
        __m512 row_sums[16];                                                                                 \
        for (int r = 0; r < R; r++) {                                                                        \
            const WT *row = w + r * K;                                                                       \
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}; \
            int64_t k = 0;                                                                                   \
            for (; k + 4 * WIDTH <= K; k += 4 * WIDTH)                                                       \
                for (int u = 0; u < 4; u++) {                                                                \
                    _mm_prefetch((const char *)(row + k + WIDTH * u) + SEQ_AHEAD, _MM_HINT_T0);              \
                    VW wv = LOAD_W(row + k + WIDTH * u, (MASK)-1);                                           \
                    acc[u] = MAC(acc[u], wv, LOAD_X(x + k + WIDTH * u, (MASK)-1));                           \
                }                                                                                            \
            for (; k < K; k += WIDTH) {                                                                      \
                MASK valid = K - k >= WIDTH ? (MASK)-1 : (MASK)((1ull << (K - k)) - 1);                      \
                acc[0] = MAC(acc[0], LOAD_W(row + k, valid), LOAD_X(x + k, valid));                          \
            }                                                                                                \
            row_sums[r] = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));       \
        }                                                                                                    \
        for (int r = R; r < 16; r++) row_sums[r] = _mm512_setzero_ps();                                      \
        return sum_lanes16(row_sums);                                                                        \
    }

SEQ_TILE(seq_bf16, uint16_t, uint16_t, __m512bh, __m512bh, 32, __mmask32, load_bf16, load_bf16, mac_bf16)
SEQ_TILE(seq_int8, int8_t, uint16_t, bf16x64, bf16x64, 64, __mmask64, load_int8x64_as_bf16, load_bf16x64, mac_bf16x64)
SEQ_TILE(seq_int8_f32, int8_t, float, __m512, __m512, 16, __mmask16, load_int8_as_f32, load_f32, mac_f32)
SEQ_TILE(seq_f32, float, float, __m512, __m512, 16, __mmask16, load_f32, load_f32, mac_f32)
SEQ_TILE(seq_f16, uint16_t, float, __m512, __m512, 16, __mmask16, load_f16, load_f32, mac_f32)

/* y[m0 + m, n + r] = (lane r·XB + m of dots) · scale[n + r] + bias[n + r] (scale and bias when not NULL) for r < R
 * and m < rows, in `dtype`: a tile's results scaled, biased, rounded and stored together, a row of y at a time. One
 * at a time, each read back from a vector just stored, they took about a fifth of a 4x4 tile's time with K = 1024
 * (one core, weights in the caches: 313-322 GFLOP/s, 392-398 now, of the 469 its vdpbf16ps can do). */
static inline __attribute__((always_inline)) void store_dots(dots16 dots, int R, int XB, int rows, const void *scale,
                                                            const void *bias, void *y, int64_t N, int64_t m0,
                                                            int64_t n, const int dtype) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i column = _mm512_srli_epi32(lane, XB == 4 ? 2 : XB == 2 ? 1 : 0); /* of lane r·XB + m: r */
    __mmask16 columns = (__mmask16)((1u << R) - 1);
    __m512 v = dots;
    if (scale) v = _mm512_mul_ps(v, _mm512_permutexvar_ps(column, load512(scale, n, columns, dtype)));
    if (bias) v = _mm512_add_ps(v, _mm512_permutexvar_ps(column, load512(bias, n, columns, dtype)));
    for (int m = 0; m < rows; m++) { /* row m's results, lanes r·XB + m, gathered into lanes r */
        __m512i source = _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(XB)), _mm512_set1_epi32(m));
        store512(y, (m0 + m) * N + n, columns, _mm512_permutexvar_ps(source, v), dtype);
    }
}

static inline dots16 add_dots(dots16 a, dots16 b) { return _mm512_add_ps(a, b); }

/* the first n results of a tile into p */
static inline void put_dots(float *p, dots16 dots, int n) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), dots);
}

#else /* AVX2, or portable: the dots of a tile as 16 floats */

typedef struct {
    float lane[16];
} dots16;

#ifdef HAVE_AVX2
/* 16 values of W or x as two registers of 8 float32, in the same order for W and x (a dot product's terms may be
 * summed in any order). bf16 beside bf16 in its own order: the even values shifted up, the odd ones masked in place,
 * one integer operation per 8 values where widening them in order takes two (bloom-560m's products and a quarter of
 * its LM head, alternated in one process on an AVX2 machine, scratch: 16 rows 92.1 -> 121.4 GFLOP/s, 128 rows
 * 83.3 -> 109.7). float32 values are held in a register the compiler must use as it is: left to itself, it folds a
 * load into every multiply-add that uses it, as in the AVX-512 tiles above. */
static inline void load16_bf16_pairs(const uint16_t *p, __m256 v[2]) {
    __m256i bits = _mm256_loadu_si256((const __m256i *)p);
    v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32((int)0xffff0000u)));
}
/* 8 values of `dtype` from element i of p as float32, in order */
static inline __m256 load8(const void *p, int64_t i, const int dtype) {
    if (dtype == AS_F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return dtype == AS_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}
static inline void load16_bf16(const uint16_t *p, __m256 v[2]) {
    v[0] = load8(p, 0, AS_BF16), v[1] = load8(p, 8, AS_BF16);
}
static inline void load16_f16(const uint16_t *p, __m256 v[2]) {
    v[0] = load8(p, 0, AS_F16), v[1] = load8(p, 8, AS_F16);
}
/* each 8 bytes read by the instruction that widens them, where one 16-byte load and a shuffle for the high half took
 * a vector operation more (a whole int8 decode step of bloom-560m at batch 1, alternated in one process, scratch:
 * 24.35 -> 23.20 ms; from the L2 cache, one core, 12.9 -> 17.6 G weights/s) */
static inline void load16_int8(const int8_t *p, __m256 v[2]) {
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
}
static inline void load16_f32(const float *p, __m256 v[2]) {
    v[0] = _mm256_loadu_ps(p), v[1] = _mm256_loadu_ps(p + 8);
    __asm__("" : "+x"(v[0]), "+x"(v[1]));
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* The first n lanes of 8 (all of them for n >= 8), as a mask of maskload and maskstore */
static inline __m256i first_lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n < 8 ? (int)n : 8), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* The first `count` values of 8 of `dtype` from element i of p as float32 (zeros after them), and the first `count`
 * lanes of v stored there as `dtype`: the vector steps' tails, without reading or writing past them */
static inline __m256 load_first8(const void *p, int64_t i, int64_t count, const int dtype) {
    if (count >= 8) return load8(p, i, dtype);
    if (dtype == AS_F32) return _mm256_maskload_ps((const float *)p + i, first_lanes(count));
    uint16_t values[8] = {0};
    memcpy(values, (const uint16_t *)p + i, sizeof(uint16_t) * count);
    return load8(values, 0, dtype);
}

/* float32 -> bf16 or fp16 and back on 8 lanes, as round_bf16 and round_f16 */
static inline __m256 round8(__m256 v, const int dtype) {
    if (dtype == AS_F32) return v;
    if (dtype == AS_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)); /* made quiet, as float_to_bf16 */
    rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), nan);
    return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32((int)0xffff0000u)));
}

static inline void store_first8(void *p, int64_t i, int64_t count, __m256 v, const int dtype) {
    if (dtype == AS_F32) {
        _mm256_maskstore_ps((float *)p + i, first_lanes(count), v);
        return;
    }
    __m128i h; /* the 8 values as dtype, in order */
    if (dtype == AS_F16) {
        h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        __m256i high = _mm256_srli_epi32(_mm256_castps_si256(round8(v, AS_BF16)), 16);
        h = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
    }
    if (count >= 8) _mm_storeu_si128((__m128i *)((uint16_t *)p + i), h);
    else {
        uint16_t values[8];
        _mm_storeu_si128((__m128i *)values, h);
        memcpy((uint16_t *)p + i, values, sizeof(uint16_t) * count);
    }
}

/* The tiles with AVX2's 8-lane multiply-adds (16 registers): R rows of W by XB rows of x, each register summing 8
 * lanes of one dot over K, 16 values at a time, the lanes summed at the end and the K % 16 values left added one at a
 * time. A single row of x takes W a row at a time, in four sums over alternate chunks of 16, so that a multiply-add
 * waits for the one four before it (bloom-560m's products and a quarter of its LM head with int8 weights at one row,
 * alternated in one process, scratch: two sums 31.3 and 26.4 GFLOP/s, four 33.3 and 29.6; bf16 and fp32 as fast
 * either way). More rows of x take 4 rows of W by 2 of x at a time: a chunk of each row of x, loaded once, serves the
 * rows of W of its pass, a chunk of W its rows of x. While it multiplies, a tile prefetches what is read after it
 * (`next`, the rows of W in `rows_to_prefetch`), a line a row every 64 bytes of W. */
#define TILE(NAME, WT, XT, LOAD_W, LOAD_X, TO_FLOAT_W, TO_FLOAT_X)                                            \
    static inline __attribute__((always_inline)) dots16 NAME(const XT *const *x, const WT *w, int64_t K,      \
                                                             int64_t ld, const int R, const int XB, const int U, \
                                                             const WT *next, unsigned rows_to_prefetch) {     \
        (void)U;                                                                                              \
        dots16 dots;                                                                                          \
        const int LINE = 64 / sizeof(WT);                                                                     \
        const int64_t K16 = K & ~(int64_t)15;                                                                 \
        if (XB == 1) {                                                                                        \
            for (int r = 0; r < R; r++) {                                                                     \
                const WT *wr = w + (int64_t)r * ld;                                                           \
                const int prefetch = next && (rows_to_prefetch >> r & 1);                                    \
                __m256 sums[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),              \
                                  _mm256_setzero_ps()};                                                       \
                __m256 xv[2], wv[2];                                                                          \
                int64_t k = 0;                                                                                \
                for (; k + 32 <= K16; k += 32)                                                                \
                    for (int half = 0; half < 2; half++) {                                                    \
                        const int64_t at = k + 16 * half;                                                     \
                        if (prefetch && at % LINE == 0) __builtin_prefetch(next + (int64_t)r * ld + at, 0, 3); \
                        LOAD_X(x[0] + at, xv);                                                                \
                        LOAD_W(wr + at, wv);                                                                  \
                        sums[2 * half] = _mm256_fmadd_ps(wv[0], xv[0], sums[2 * half]);                       \
                        sums[2 * half + 1] = _mm256_fmadd_ps(wv[1], xv[1], sums[2 * half + 1]);               \
                    }                                                                                         \
                if (k < K16) { /* an odd chunk of 16 */                                                       \
                    if (prefetch && k % LINE == 0) __builtin_prefetch(next + (int64_t)r * ld + k, 0, 3);      \
                    LOAD_X(x[0] + k, xv);                                                                     \
                    LOAD_W(wr + k, wv);                                                                       \
                    sums[0] = _mm256_fmadd_ps(wv[0], xv[0], sums[0]);                                         \
                    sums[1] = _mm256_fmadd_ps(wv[1], xv[1], sums[1]);                                         \
                }                                                                                             \
                float sum = sum8(_mm256_add_ps(_mm256_add_ps(sums[0], sums[2]), _mm256_add_ps(sums[1], sums[3]))); \
                for (k = K16; k < K; k++) sum += TO_FLOAT_W(wr[k]) * TO_FLOAT_X(x[0][k]);                     \
                dots.lane[r] = sum;                                                                           \
            }                                                                                                 \
            return dots;                                                                                      \
        }                                                                                                     \
        for (int r0 = 0; r0 < R; r0 += 4)                                                                     \
            for (int m0 = 0; m0 < XB; m0 += 2) {                                                              \
                const int rows = R - r0 < 4 ? R - r0 : 4, xs = XB - m0 < 2 ? XB - m0 : 2;                     \
                __m256 acc[4][2];                                                                             \
                for (int r = 0; r < rows; r++)                                                                \
                    for (int m = 0; m < xs; m++) acc[r][m] = _mm256_setzero_ps();                             \
                for (int64_t k = 0; k < K16; k += 16) {                                                       \
                    if (next && m0 == 0 && k % LINE == 0)                                                     \
                        for (int r = 0; r < rows; r++)                                                        \
                            if (rows_to_prefetch >> (r0 + r) & 1)                                             \
                                __builtin_prefetch(next + (int64_t)(r0 + r) * ld + k, 0, 3);                  \
                    __m256 xv[2][2], wv[2];                                                                   \
                    for (int m = 0; m < xs; m++) LOAD_X(x[m0 + m] + k, xv[m]);                                \
                    for (int r = 0; r < rows; r++) {                                                          \
                        LOAD_W(w + (int64_t)(r0 + r) * ld + k, wv);                                           \
                        for (int m = 0; m < xs; m++) {                                                        \
                            acc[r][m] = _mm256_fmadd_ps(wv[0], xv[m][0], acc[r][m]);                          \
                            acc[r][m] = _mm256_fmadd_ps(wv[1], xv[m][1], acc[r][m]);                          \
                        }                                                                                     \
                    }                                                                                         \
                }                                                                                             \
                for (int r = 0; r < rows; r++)                                                                \
                    for (int m = 0; m < xs; m++) {                                                            \
                        const WT *wr = w + (int64_t)(r0 + r) * ld;                                            \
                        float sum = sum8(acc[r][m]);                                                          \
                        for (int64_t k = K16; k < K; k++) sum += TO_FLOAT_W(wr[k]) * TO_FLOAT_X(x[m0 + m][k]); \
                        dots.lane[(r0 + r) * XB + m0 + m] = sum;                                              \
                    }                                                                                         \
            }                                                                                                 \
        return dots;                                                                                          \
    }

#define AS_FLOAT(v) ((float)(v))
TILE(tile_bf16, uint16_t, uint16_t, load16_bf16_pairs, load16_bf16_pairs, bf16_to_float, bf16_to_float)
TILE(tile_int8, int8_t, uint16_t, load16_int8, load16_bf16, AS_FLOAT, bf16_to_float)
TILE(tile_int8_f32, int8_t, float, load16_int8, load16_f32, AS_FLOAT, AS_FLOAT)
TILE(tile_f32, float, float, load16_f32, load16_f32, AS_FLOAT, AS_FLOAT)
TILE(tile_f16, uint16_t, float, load16_f16, load16_f32, f16_to_float, AS_FLOAT)
TILE(tile_f16_f16, uint16_t, uint16_t, load16_f16, load16_f16, f16_to_float, f16_to_float)

/* a single row of x against R rows of W (up to 16), read a row at a time: one stream, which the CPU's own prefetcher
 * follows (bloom-560m's products and a quarter of its LM head streamed at one row, alternated in one process on a
 * Zen 4 machine whose AVX-512 was hidden, scratch: 8 rows of W at once, each prefetched 16 rows ahead, 20.0, 13.2 and
 * 24.2 GFLOP/s in bf16, fp32 and with int8 weights; a row at a time without prefetching, 29.4, 14.4 and 28.7; torch's
 * matmul in the same runs 23.5, 8.3 and 18.2) */
#define SEQ_TILE(NAME, TILE_FN, WT, XT)                                               \
    static inline dots16 NAME(const XT *x, const WT *w, int64_t K, const int R) {     \
        return TILE_FN(&x, w, K, K, R, 1, 1, NULL, 0);                                \
    }

#else /* portable: the same tiles as plain loops, which the compiler vectorizes */

#define TILE(NAME, WT, XT, TO_FLOAT_W, TO_FLOAT_X)                                                            \
    static inline dots16 NAME(const XT *const *x, const WT *w, int64_t K, int64_t ld, const int R, const int XB, \
                              const int U, const WT *next, unsigned rows_to_prefetch) {                       \
        (void)U, (void)next, (void)rows_to_prefetch; /* no prefetching here */                                \
        dots16 dots = {{0}};                                                                                  \
        for (int r = 0; r < R; r++)                                                                           \
            for (int m = 0; m < XB; m++) {                                                                    \
                const WT *wr = w + r * ld;                                                                    \
                const XT *xm = x[m];                                                                          \
                float sum = 0;                                                                                \
                _Pragma("omp simd reduction(+ : sum)") for (int64_t k = 0; k < K; k++) sum +=                 \
                    TO_FLOAT_W(wr[k]) * TO_FLOAT_X(xm[k]);                                                    \
                dots.lane[r * XB + m] = sum;                                                                  \
            }                                                                                                 \
        return dots;                                                                                          \
    }

#define AS_FLOAT(v) ((float)(v))
TILE(tile_bf16, uint16_t, uint16_t, bf16_to_float, bf16_to_float)
TILE(tile_int8, int8_t, uint16_t, AS_FLOAT, bf16_to_float)
TILE(tile_int8_f32, int8_t, float, AS_FLOAT, AS_FLOAT)
TILE(tile_f32, float, float, AS_FLOAT, AS_FLOAT)
TILE(tile_f16, uint16_t, float, f16_to_float, AS_FLOAT)
TILE(tile_f16_f16, uint16_t, uint16_t, f16_to_float, f16_to_float)

#define SEQ_TILE(NAME, TILE_FN, WT, XT)                                                \
    static inline dots16 NAME(const XT *x, const WT *w, int64_t K, const int R) {      \
        return TILE_FN(&x, w, K, K, R, 1, 1, w, 0);                                    \
    }
#endif
SEQ_TILE(seq_bf16, tile_bf16, uint16_t, uint16_t)
SEQ_TILE(seq_int8, tile_int8, int8_t, uint16_t)
SEQ_TILE(seq_int8_f32, tile_int8_f32, int8_t, float)
SEQ_TILE(seq_f32, tile_f32, float, float)
SEQ_TILE(seq_f16, tile_f16, uint16_t, float)

static inline float value_at(const void *p, int64_t i, const int dtype) {
    return dtype == AS_F32 ? ((const float *)p)[i] : dtype == AS_BF16 ? bf16_to_float(((const uint16_t *)p)[i])
                                                                      : f16_to_float(((const uint16_t *)p)[i]);
}

/* y[m0 + m, n + r] = (lane r·XB + m of dots) · scale[n + r] + bias[n + r] (scale and bias when not NULL), in
 * `dtype` */
static inline void store_dots(dots16 dots, int R, int XB, int rows, const void *scale, const void *bias, void *y,
                              int64_t N, int64_t m0, int64_t n, const int dtype) {
    for (int r = 0; r < R; r++)
        for (int m = 0; m < rows; m++) {
            float v = dots.lane[r * XB + m];
            if (scale) v *= value_at(scale, n + r, dtype);
            if (bias) v += value_at(bias, n + r, dtype);
            int64_t i = (m0 + m) * N + n + r;
            if (dtype == AS_F32) ((float *)y)[i] = v;
            else ((uint16_t *)y)[i] = dtype == AS_BF16 ? float_to_bf16(v) : float_to_f16(v);
        }
}

static inline dots16 add_dots(dots16 a, dots16 b) {
    for (int i = 0; i < 16; i++) a.lane[i] += b.lane[i];
    return a;
}

static inline void put_dots(float *p, dots16 dots, int n) { memcpy(p, dots.lane, sizeof(float) * n); }

#endif

/* This thread's block of the N rows of W: its share of the groups of 4 rows */
static inline void thread_rows(int64_t N, int64_t *begin, int64_t *end) {
    int threads = omp_get_num_threads(), thread = omp_get_thread_num();
    int64_t groups = (N + 3) / 4;
    int64_t stop = 4 * (groups * (thread + 1) / threads); /* past N for the last thread when N % 4 != 0 */
    *begin = 4 * (groups * thread / threads);
    *end = stop < N ? stop : N;
}

/* A bitmask of the R rows of W that the tile of block `block` (of `blocks` blocks of rows of x) prefetches. Where a
 * group reads its rows whole (one span), the rows are dealt out to the blocks, one each at 16 rows of x, so that every
 * line is asked for once, spread over the group's time: streaming bloom-560m's products at 16 rows (scratch,
 * alternated in one process), bf16's 1024-wide ones ran 10-18% faster and its LM head 5-18%. Where the rows are split
 * in spans, every tile prefetches every row: one row each made fp32's products 7-10% slower there, and bf16's
 * 4096-wide one. With the next span prefetched (GROUP), decode steps of a batch of 16, alternated in fresh
 * processes, took 38.3-38.5 ms instead of 44.1-46.8 in bf16 and 53.8-55.6 instead of 63.2-64.8 in fp16. */
static inline unsigned prefetched_rows(int R, int block, int blocks, int split) {
    unsigned rows = 0;
    for (int r = 0; r < R; r++)
        if (split || r % blocks == block) rows |= 1u << r;
    return rows;
}

/* LINEAR(GROUP_FN, DTYPE) is the body of a kernel: this thread's block of rows of W, a group of them at a time
 * against the rows of x (GROUP_FN, below), which write y in DTYPE. A prefill's many rows of x are taken X_BLOCK at a
 * time, each block against all of this thread's rows of W, so that the block stays in the cache (without it, 2048
 * fp16 rows of a batch's prefill, x streaming from memory, ran at half the rate of 128). */
#define X_BLOCK 64
#define X_SPAN 2048

/* Where the block of rows of x that starts at m_begin ends, of M rows */
static inline int64_t x_block_end(int64_t m_begin, int64_t M) {
    return m_begin + X_BLOCK < M ? m_begin + X_BLOCK : M;
}

/* GROUP(NAME, TILE_FN, SEQ_FN, XT, WT, SPAN) defines NAME(x, w, K, R, XB, m_begin, m_end, ...): columns n to n + R - 1
 * of rows m_begin to m_end - 1 (at most X_BLOCK) of y, from those rows of x and R rows of W (K values apart). The rows
 * of x go in blocks of XB (1, 2 or 4; the last block repeating its last row: computed, never written) through TILE_FN
 * with constant sizes, or SEQ_FN for a single row of x and up to 16 rows of W. Up to 4 rows of x read W a row at a
 * time, which streams fastest (one row of x keeps four chunks in flight, two rows two). More rows are limited by the
 * multiply-adds, not the memory: tiles of 4 rows of W by 4 of x then load each chunk for four products, SPAN values
 * of each row at a time (X_SPAN bytes of W, int8 counted as the bf16 it is widened to beside bf16 x), adding up their
 * dots16 over the spans. A span of the R rows of W then stays in the L1 cache while the tiles of the next rows of x
 * read it again, where whole rows overflowed it (scratch, bloom-560m's products streamed at 16 rows: the 4096-wide
 * one 322-333 -> 275 us in bf16, 289 -> 276 with int8 weights, 528 -> 459 in fp16; fp32's blocks 53-55 -> 45 ms and
 * LM head 43 -> 37 ms; spans of x's bytes instead made fp16's 1024-wide products 10% slower). Each is compiled once,
 * not inlined into its callers: inlined into linear_int8_bf16, group_bf16 slowed that function's other tiles by
 * ~10%.
 * While a span's tiles multiply, they prefetch what is read after it: the same rows' next span, or after the last
 * one `after`, what the caller reads next (NULL: nothing). Until then they always prefetched the next rows at the
 * same span, which in a split row are read only a whole row later: fp32's products of 64 and 128 rows of x, whose
 * rows are two or more spans, ran 11-14% faster from the caches and from memory once the prefetches named the next
 * span. `prefetched_rows` says which of those rows each block's tile prefetches. */
#define GROUP(NAME, TILE_FN, SEQ_FN, XT, WT, SPAN)                                                                \
    static __attribute__((noinline)) void NAME(const XT *x, const WT *w, const WT *after, int64_t K, int R, int XB, \
                                               int64_t m_begin, int64_t m_end, const void *scale,                 \
                                               const void *bias, void *y, int64_t N, int64_t n,                   \
                                               const int dtype) {                                                 \
        const int64_t span = m_end - m_begin > 4 ? SPAN : K;                                                      \
        const int blocks = (m_end - m_begin + XB - 1) / XB;                                                       \
        dots16 sums[X_BLOCK / 4]; /* of each block of rows of x, over the spans so far */                         \
        int64_t k = 0;                                                                                            \
        do { /* once at least: K = 0 gives y = bias */                                                            \
            int64_t width = K - k < span ? K - k : span;                                                          \
            for (int64_t m0 = m_begin; m0 < m_end; m0 += XB) {                                                    \
                const XT *rows[4];                                                                                \
                for (int m = 0; m < XB; m++) rows[m] = x + (m0 + m < m_end ? m0 + m : m_end - 1) * K + k;         \
                const int block = (m0 - m_begin) / XB;                                                            \
                dots16 dots;                                                                                      \
                if (XB == 1) {                                                                                    \
                    dots = SEQ_FN(rows[0], w + k, width, R); /* prefetches on its own */                          \
                } else {                                                                                          \
                    const WT *next = k + span < K ? w + k + span : after; /* read after this span */              \
                    unsigned prefetch = next ? prefetched_rows(R, block, blocks, span < K) : 0;                   \
                    if (XB == 2) dots = TILE_FN(rows, w + k, width, K, 1, 2, 2, next, prefetch);                  \
                    else if (R == 1) dots = TILE_FN(rows, w + k, width, K, 1, 4, 1, next, prefetch);              \
                    else dots = TILE_FN(rows, w + k, width, K, 4, 4, 1, next, prefetch);                          \
                }                                                                                                 \
                sums[block] = k ? add_dots(sums[block], dots) : dots;                                             \
            }                                                                                                     \
            k += span;                                                                                            \
        } while (k < K);                                                                                          \
        for (int64_t m0 = m_begin; m0 < m_end; m0 += XB) {                                                        \
            int rows_left = m_end - m0 < XB ? m_end - m0 : XB;                                                    \
            store_dots(sums[(m0 - m_begin) / XB], R, XB, rows_left, scale, bias, y, N, m0, n, dtype);             \
        }                                                                                                         \
    }

GROUP(group_bf16, tile_bf16, seq_bf16, uint16_t, uint16_t, X_SPAN / 2)
GROUP(group_int8, tile_int8, seq_int8, uint16_t, int8_t, X_SPAN / 2) /* as the bf16 that int8 is widened to */
GROUP(group_int8_f32, tile_int8_f32, seq_int8_f32, float, int8_t, X_SPAN)
#ifdef HAVE_AVX2 /* beside bf16 x widened to float32 (linear_int8_bf16): group_int8's spans, so its order of sums */
GROUP(group_int8_x32, tile_int8_f32, seq_int8_f32, float, int8_t, X_SPAN / 2)
#endif
GROUP(group_f32, tile_f32, seq_f32, float, float, X_SPAN / 4)
GROUP(group_f16, tile_f16, seq_f16, float, uint16_t, X_SPAN / 2)

#define LINEAR(GROUP_FN, DTYPE)                                                                                 \
    _Pragma("omp parallel") {                                                                                   \
        int64_t n_begin, n_end;                                                                                 \
        thread_rows(N, &n_begin, &n_end);                                                                       \
        const int XB = M == 1 ? 1 : M == 2 ? 2 : 4;                                                             \
        for (int64_t m_begin = 0; m_begin < M; m_begin += X_BLOCK) {                                            \
            int64_t m_end = x_block_end(m_begin, M);                                                            \
            for (int64_t n = n_begin; n < n_end;) {                                                             \
                int R = M == 1 ? (n_end - n >= 16 ? 16 : n_end - n) : M > 4 && n_end - n >= 4 ? 4 : 1;          \
                GROUP_FN(x, w + n * K, w + (n + R) * K, K, R, XB, m_begin, m_end, scale, b, y, N, n, DTYPE);    \
                n += R;                                                                                         \
            }                                                                                                   \
        }                                                                                                       \
    }

#ifdef HAVE_AVX512
/* Products of LANES_MIN or more rows of bf16 x, the lanes of a register holding 16 rows of x instead of stretches of K.
 * x is packed by pairs, xp[p] = the pair (2p, 2p + 1) of each of 16 rows of x, 16 lanes (a block of fewer: zeros); each
 * pair of a row of W is broadcast from memory into the 16 lanes of a multiply-add (vdpbf16ps's {1to16}), so that acc[r]
 * lane m sums row r of W times row m of x over K with no sum across lanes at the end, where the 4x4 tiles spend about a
 * tenth of their multiply-adds' time summing lanes and placing results. A tile takes 16 rows of W, in 2 groups of 8
 * rows, the second LANES_APART pairs further along its rows than the first, wrapping around: 16 rows 8 KB apart
 * (K = 4096) at the same offset fall into one set of the L1 cache, whose 8 ways then thrashed (the 4096-wide product
 * ran at half the rate of the 1024-wide ones). A group reads a line of each of its rows while the next two are asked for
 * (to_l1), so the second group starts 4 lines on. One line on, its rows' lines fell into the sets of the first group's
 * next lines: streamed at 8, 16 and 32 rows, the 4096-wide product ran 4-9% slower in five runs of six, 24% in one
 * (bloom-7b1's 4096-wide products 0-14%), and a batch-16 step took 0.4-1.9 ms longer in three runs (52.9-58.7 ms;
 * scratch, alternated in one process, on a Zen 4 machine). Each group loads its pair of x once for its 8 rows: in 4
 * groups of 4 rows (a load of x per 4 multiply-adds), bloom-560m's products streamed at 16 rows ran 0-5% slower and its
 * LM head 1-4%, and a batch-16 step took 0.5-1.3 ms longer (scratch, alternated in one process, on a Zen 4 machine;
 * int8's blocks and LM head 2% and 1%). While a tile multiplies, it prefetches the next tile's rows into the L2 cache,
 * a line a pair, in the order of memory (into L1 they evicted what the tile reads: 10-20% slower; a line of each row in
 * turn: as fast on the LM head, up to 8% slower on the blocks' products). Streaming bloom-560m's products at 16 rows on
 * a Zen 4 core (vdpbf16ps: 234 GFLOP/s a core; scratch, alternated in one process), against the 4x4 tiles, over several
 * runs: the LM head 313-323 -> 366-423 GFLOP/s, the blocks' four products 258-317 -> 297-394; with int8 weights,
 * widened 16 rows at a time, the LM head 30.3-30.7 -> 24.7-24.8 ms, the blocks 38.5-38.7 -> 31.6-31.8 ms. */
#define LANES_MIN 8
#define LANE_GROUPS 2
#define LANES_APART 64 /* pairs: 4 cache lines */
/* Up to this K, a tile of bf16 W asks the lines of W and x that it reads a few pairs later into L1 (lanes_tile's
 * to_l1). Alternated in one process on a Zen 4 machine (scratch): bloom-560m's 1024-wide products at 16 and 32 rows
 * 3-11% faster, its 4096-wide one 0-4%, its LM head 3-5%, a batch-16 step 0.4-1.6 ms faster in 3 runs (53.1-58.0
 * ms); bloom-176b's 57,344-wide product (x packed: 1.8 MB, past the L2 cache) 4-15% slower in 6 runs of 7. Not for
 * int8: its tile, widened into a buffer just written, made its blocks 8-17% slower so. */
#define LANES_L1_AHEAD_K 16384

/* acc[r] lane m = row r of W (16 rows, K values apart) times row m of x, from xp ([K/2][16] pairs); `next`: the
 * bytes read after these rows, prefetched; `to_l1`: the lines of W and x read a few pairs later asked into L1 */
static inline __attribute__((always_inline)) void lanes_tile(const uint32_t *xp, const uint16_t *w, int64_t K,
                                                             const char *next, const int to_l1, __m512 *acc) {
    enum { G = LANE_GROUPS, ROWS = 16 / LANE_GROUPS };
    const int64_t P = K / 2, ld = 2 * K; /* pairs in a row; bytes from a row to the next */
    const uint32_t *xg[G]; /* each group's next pair of x, and of its first row of W */
    const char *wg[G];
    for (int g = 0; g < G; g++) {
        int64_t q = (LANES_APART * g) % P;
        xg[g] = xp + q * 16;
        wg[g] = (const char *)w + g * ROWS * ld + 4 * q;
    }
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    int64_t p = 0;
    for (int g = G - 1; g >= 0; g--) { /* up to the pair where group g wraps around to its rows' start */
        for (int64_t stop = P - LANES_APART * g; p < stop; p++) {
            _mm_prefetch(next + p * 64, _MM_HINT_T1); /* the next 16 rows: P lines, in order */
            for (int h = 0; h < G; h++) {
                __m512bh xv = (__m512bh)_mm512_load_si512(xg[h]);
                if (to_l1) { /* x 8 pairs ahead; 2 lines ahead in one of the group's rows, each in turn */
                    _mm_prefetch((const char *)(xg[h] + 16 * 8), _MM_HINT_T0);
                    _mm_prefetch(wg[h] + (p % ROWS) * ld + 128, _MM_HINT_T0);
                }
                for (int r = 0; r < ROWS; r++) /* written out: the compiler would not fold the broadcast */
                    __asm__("vdpbf16ps %[pair]%{1to16%}, %[x], %[acc]"
                            : [acc] "+v"(acc[h * ROWS + r])
                            : [x] "v"(xv), [pair] "m"(*(const int32_t *)(wg[h] + r * ld)));
                xg[h] += 16, wg[h] += 4;
            }
        }
        if (g) xg[g] = xp, wg[g] = (const char *)w + g * ROWS * ld;
    }
}

/* out[j] lane i = in[i] lane j, for 16 registers of 16 32-bit values: rows interleaved by pairs, then by 64 bits,
 * then the 128-bit lanes of four registers exchanged */
static inline __attribute__((always_inline)) void transpose16(const __m512i in[16], __m512i out[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) { /* t[i], t[i + 1]: in[i], in[i + 1] interleaved; lane L: values 4L, 4L + 1 */
        t[i] = _mm512_unpacklo_epi32(in[i], in[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(in[i], in[i + 1]); /* and values 4L + 2, 4L + 3 */
    }
    for (int g = 0; g < 4; g++) { /* u[4g + e] lane L: value 4L + e of in[4g .. 4g + 3] */
        u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int e = 0; e < 4; e++) { /* the lanes L of u[4g + e], g = 0..3, exchanged: value 4L + e of all 16 */
        __m512i low01 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44);
        __m512i high01 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xee);
        __m512i low23 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
        __m512i high23 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xee);
        out[e] = _mm512_shuffle_i32x4(low01, low23, 0x88);
        out[4 + e] = _mm512_shuffle_i32x4(low01, low23, 0xdd);
        out[8 + e] = _mm512_shuffle_i32x4(high01, high23, 0x88);
        out[12 + e] = _mm512_shuffle_i32x4(high01, high23, 0xdd);
    }
}

/* xp[p] = the pair p of each of M rows of x (P pairs a row), 16 lanes, zeros past M, for p from begin (a multiple of
 * 16) to end - 1: 16 pairs of the 16 rows at a time, transposed in registers. With a gather per pair, one thread
 * packing while the other waited, bloom-560m's products streamed at 16 rows were 2-7% slower (scratch, alternated in
 * one process, on a Zen 4 machine). The threads pack a share each: packed by one before they started, a bf16
 * batch-16 step spent 0.5 ms packing (scratch, on a Zen 4 machine), and the step took 0.3-1.5 ms longer in three of
 * four runs alternated in one process (52.1-56.6 ms). */
static void pack_pairs(const uint32_t *x, int64_t M, int64_t P, int64_t begin, int64_t end, uint32_t *xp) {
    int64_t p = begin;
    for (; p + 16 <= end; p += 16) {
        __m512i rows[16], pairs[16];
        for (int m = 0; m < 16; m++) rows[m] = m < M ? _mm512_loadu_si512(x + m * P + p) : _mm512_setzero_si512();
        transpose16(rows, pairs);
        for (int q = 0; q < 16; q++) _mm512_store_si512(xp + (p + q) * 16, pairs[q]);
    }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i row_starts = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)P));
    const __mmask16 rows = (__mmask16)((1u << M) - 1);
    for (; p < end; p++) /* the last P % 16 pairs, one gather each */
        _mm512_store_si512(xp + p * 16, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, row_starts, x + p,
                                                                    4));
}

/* y = x · Wᵀ + b for M >= LANES_MIN rows of bf16 x and an even K; W bf16 (scale NULL) or int8 with a scale per row,
 * y = (x · Wᵀ) · scale + b, each tile's 16 rows then widened to bf16 first, into a buffer of the thread's own that the
 * tile reads from the L2 cache. Up to 16 rows of x are one block; more go in blocks of 16, each packed once, each
 * tile of W read again from the caches for every block, and the M % 16 rows left take the 4x4 tiles on it (streamed
 * at 24 and 28 rows, alternated in one process, those rows as a last lane block of 8 or 12 made bloom-560m's products
 * 0-20% slower). Streamed at 20, 32 and 48 rows, against the 4x4 tiles for all rows: 20-30% faster; at bloom-7b1's
 * and bloom-176b's widths (K up to 57,344: a tile of 1.8 MB, read again from L3 for each block), at 32 and 96 rows,
 * 9-31% faster. Returns 1 (y not written) for other sizes, or when the scratch memory cannot be allocated. Each thread
 * takes its share of the tiles of 16 rows of W, the last also the N % 16 rows left, one row of W at a time through
 * the tiles of 4 rows of x. */
static int lanes_bf16(const uint16_t *x, const void *w, const uint16_t *scale, const uint16_t *b, uint16_t *y,
                      int64_t M, int64_t N, int64_t K) {
    if (M < LANES_MIN || K <= 0 || K % 2) return 1;
    const int64_t P = K / 2;
    const int64_t lane_rows = M < 16 ? M : M / 16 * 16; /* rows in lane blocks; the rest: 4x4 tiles */
    /* the rest's rows of x a tile takes: one row alone (as 4, 17 rows' products streamed 5-10% slower); 2 as 4 (as
     * 2, a row of W a tile, 18 rows' 3-9% slower) */
    const int rest_XB = M - lane_rows == 1 ? 1 : 4;
    const int64_t blocks = (lane_rows + 15) / 16;
    const int most_threads = omp_get_max_threads();
    uint32_t *xp = aligned_alloc(64, blocks * P * 64 + (scale ? most_threads * P * 64 : 0)); /* and int8's buffers */
    if (!xp) return 1;
    const int8_t *w8 = w;
    const uint16_t *w16 = w;
    const int to_l1 = !scale && K <= LANES_L1_AHEAD_K;
    _Pragma("omp parallel") {
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        const int64_t chunks = (P + 15) / 16; /* of 16 pairs: each thread packs its share of every block's */
        for (int64_t block = 0; block < blocks; block++) {
            const int64_t rows = lane_rows - 16 * block < 16 ? lane_rows - 16 * block : 16;
            const int64_t end = 16 * (chunks * (thread + 1) / threads);
            pack_pairs((const uint32_t *)x + 16 * block * P, rows, P, 16 * (chunks * thread / threads),
                       end < P ? end : P, xp + block * P * 16);
        }
        _Pragma("omp barrier")
        const int64_t tiles = N / 16;
        const int64_t begin = 16 * (tiles * thread / threads), end = 16 * (tiles * (thread + 1) / threads);
        uint16_t *wide = (uint16_t *)(xp + blocks * P * 16) + thread * 16 * K; /* int8 W's tile, widened */
        for (int64_t n = begin; n < end; n += 16) {
            const uint16_t *tile = w16 + n * K;
            const char *next = scale ? (const char *)(w8 + (n + 16) * K) /* int8: the next 2 tiles */
                                     : (const char *)(w16 + (n + 16) * K);
            if (scale) widen_int8(w8 + n * K, 16 * K, wide, NULL), tile = wide; /* 16 rows, contiguous in both */
            __m512 factor = scale ? load512(scale, n, (__mmask16)-1, AS_BF16) : _mm512_set1_ps(1);
            __m512 bias = b ? load512(b, n, (__mmask16)-1, AS_BF16) : _mm512_setzero_ps();
            for (int64_t block = 0; block < blocks; block++) {
                __m512 acc[16];
                __m512i by_w[16], sums[16]; /* sums[m] lane r: row r of W times row first + m of x */
                lanes_tile(xp + block * P * 16, tile, K, next, to_l1, acc); /* each block prefetches the next tile */
                for (int r = 0; r < 16; r++) by_w[r] = _mm512_castps_si512(acc[r]);
                transpose16(by_w, sums);
                const int64_t first = 16 * block, rows = lane_rows - first < 16 ? lane_rows - first : 16;
                for (int m = 0; m < rows; m++) {
                    __m512 v = _mm512_castsi512_ps(sums[m]);
                    if (scale) v = _mm512_mul_ps(v, factor);
                    store512(y, (first + m) * N + n, (__mmask16)-1, _mm512_add_ps(v, bias), AS_BF16);
                }
            }
            for (int64_t r = 0; lane_rows < M && r < 16; r += 4) /* the rows of x past the lane blocks */
                group_bf16(x, tile + r * K, NULL, K, 4, rest_XB, lane_rows, M, scale, b, y, N, n + r, AS_BF16);
        }
        for (int64_t n = 16 * tiles; thread == threads - 1 && n < N; n++) /* the rows of W past the last tile */
            for (int64_t m_begin = 0; m_begin < M; m_begin += X_BLOCK) {
                int64_t m_end = x_block_end(m_begin, M);
                if (scale) group_int8(x, w8 + n * K, NULL, K, 1, 4, m_begin, m_end, scale, b, y, N, n, AS_BF16);
                else group_bf16(x, w16 + n * K, NULL, K, 1, 4, m_begin, m_end, NULL, b, y, N, n, AS_BF16);
            }
    }
    free(xp);
    return 0;
}
#endif

#ifdef HAVE_AVX2
/* A single row of bf16 x against bf16 W on AVX2: the tile's single row (seq_bf16, so the same y) a row of W at a
 * time, each thread's rows one after the other and every dot rounded into y as soon as it is summed, without the
 * groups of 16 rows, their calls and stores of 16 dots at a time. Alternated in one process (scratch): 4096 x 1024
 * from the L3 cache 33.6 -> 34.0 and 26.3 -> 28.2 GB/s on one core, 44.5 -> 46.4 and 50.6 -> 53.2 on two;
 * bloom-560m's products from memory (24 weights of each shape in turn, two runs) 1024 x 1024 34.0 -> 38.8 and 36.1
 * -> 35.5, 3072 x 1024 30.9 -> 34.0 and 30.1 -> 29.2, the others within 1 GB/s; whole bf16 decode steps 41.3 -> 39.9
 * and 34.8 -> 30.7 ms. (x widened once to float32 instead, 16 KB for a row of 4096, left the L1 cache to W's lines,
 * and that product fell to 18.6 GB/s, 27.6 in the tile.) */
static void row_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t N, int64_t K) {
#pragma omp parallel
    {
        int64_t begin, end;
        thread_rows(N, &begin, &end);
        for (int64_t n = begin; n < end; n++)
            store_dots(seq_bf16(x, w + n * K, K, 1), 1, 1, 1, NULL, b, y, N, 0, n, AS_BF16);
    }
}
#endif

/* bf16 x, W, b (or NULL) -> bf16 y */
void linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t M, int64_t N, int64_t K) {
#ifdef HAVE_AVX512
    if (!lanes_bf16(x, w, NULL, b, y, M, N, K)) return;
#endif
#ifdef HAVE_AVX2
    if (M == 1) {
        row_bf16(x, w, b, y, N, K);
        return;
    }
#endif
    const void *scale = NULL;
    LINEAR(group_bf16, AS_BF16)
}

#ifdef HAVE_AVX2
/* bf16 x beside int8 W on AVX2, multiplied in integers: each row of x as int16 multiples of a power of two, its unit,
 * and W widened to int16, vpmaddwd makes 16 products and adds them in pairs, exactly, in one instruction. Widened to
 * float32, W takes a widening, a conversion and a multiply-add per 8 weights, and the conversions held the tiles below
 * the memory's speed at one row (one core, from the L2 cache, scratch: 17.6 -> 32 G weights/s; a whole int8 decode
 * step of bloom-560m at batch 1, alternated in one process: 25.6 -> 18.3 ms) and at 2 rows (bloom-560m's products
 * and a quarter of its LM head, alternated in one process: 33 -> 51 GFLOP/s), below the multiply-adds' at more (16
 * rows 105 -> 126 GFLOP/s, 128 rows 103 -> 157). With unit = 2^(e - 15) for a row's largest |x| < 2^e, every value
 * within a factor 2^8 of the largest is a multiple of it (a bf16 has 8 significant bits), read exactly; smaller ones
 * are rounded to the nearest multiple, by 2^-15 of the largest at most. Each product is below 2^7 · 2^15, and a lane
 * of an int32 sum adds 128 pairs of them at most (a chunk of INT_CHUNK values in 16 sums of 2 rows by 8 lanes, or a
 * single row's 4 sums of every fourth 16 values by 8 lanes, added together): no overflow; the chunks add up in
 * float32. A single row reads W a row at a time (rows_in_integers); more rows go in tiles of 4 rows of W by 2 of x
 * over a chunk, the chunk of the 4 rows staying in the L1 cache while the tiles of the next rows of x read it, X_BLOCK
 * rows of x at a time against all of a thread's rows of W, so that they stay in the L2 cache: with the rows of W
 * outside, every 4 of them read all the rows of x again (a prefill of 16 prompts of bloom-560m, 2048 rows, alternated
 * in one process: 12.6 -> 10.3 s; 512 rows 2.83 -> 2.74 s). */
#define INT_CHUNK 2048

/* dots.lane[r] = row r of W (R rows, up to 16) · x16, in units. Four sums, where two held a product below the
 * memory's speed from the L3 cache (alternated in one process, scratch: 8192 x 1024 on one core 18.8 -> 22.2 GB/s,
 * on two 36.0 -> 39.7; whole int8 decode steps of bloom-560m 20.10 -> 19.14 and 21.61 -> 21.53 ms) */
static dots16 rows_in_integers(const int16_t *x16, const int8_t *w, int64_t K, int R) {
    dots16 dots;
    const int64_t K16 = K & ~(int64_t)15;
    for (int r = 0; r < R; r++) {
        const int8_t *wr = w + (int64_t)r * K;
        __m256 sums = _mm256_setzero_ps();
        int64_t k = 0;
        while (k < K16) {
            const int64_t stop = k + INT_CHUNK < K16 ? k + INT_CHUNK : K16;
            __m256i pairs[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                _mm256_setzero_si256()}; /* every fourth 16 values */
            for (; k + 64 <= stop; k += 64)
                for (int quarter = 0; quarter < 4; quarter++) {
                    __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wr + k + 16 * quarter)));
                    __m256i xv = _mm256_load_si256((const __m256i *)(x16 + k + 16 * quarter));
                    pairs[quarter] = _mm256_add_epi32(pairs[quarter], _mm256_madd_epi16(wv, xv));
                }
            for (int quarter = 0; k < stop; k += 16, quarter++) { /* up to three chunks of 16 left */
                __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wr + k)));
                __m256i xv = _mm256_load_si256((const __m256i *)(x16 + k));
                pairs[quarter] = _mm256_add_epi32(pairs[quarter], _mm256_madd_epi16(wv, xv));
            }
            __m256i chunk = _mm256_add_epi32(_mm256_add_epi32(pairs[0], pairs[1]),
                                             _mm256_add_epi32(pairs[2], pairs[3]));
            sums = _mm256_add_ps(sums, _mm256_cvtepi32_ps(chunk));
        }
        int32_t tail = 0; /* the K % 16 values left */
        for (k = K16; k < K; k++) tail += (int32_t)wr[k] * x16[k];
        dots.lane[r] = sum8(sums) + (float)tail;
    }
    return dots;
}

/* 16 values of a row of W (widened to int16) by the same 16 of two rows of x16, added to their sums a and b */
static inline __attribute__((always_inline)) void row_by_two_in_integers(const int8_t *w, __m256i x0, __m256i x1,
                                                                          __m256i *a, __m256i *b) {
    __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(wv, x0));
    *b = _mm256_add_epi32(*b, _mm256_madd_epi16(wv, x1));
}

/* R rows of W (1 or 4, ld values apart) by rows x0 and x1 of x16 over `width` values, at most INT_CHUNK:
 * dots.lane[r * 2 + m], in units. The sums are variables, x's 16 values held in registers: with the sums in an array,
 * the compiler copied each into another register after every addition, and it loaded x again beside every
 * multiply-add (one core, weights and x in the caches, 16 rows of x by 512 of W: 56-66 -> 67-73 GFLOP/s) */
static inline __attribute__((always_inline)) dots16 tile_in_integers(const int16_t *x0, const int16_t *x1,
                                                                    const int8_t *w, int64_t width, int64_t ld,
                                                                    const int R) {
    dots16 dots = {{0}}; /* add_dots adds every lane */
    const int64_t K16 = width & ~(int64_t)15;
    __m256i a0 = _mm256_setzero_si256(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
    for (int64_t k = 0; k < K16; k += 16) {
        __m256i xv0 = _mm256_load_si256((const __m256i *)(x0 + k));
        __m256i xv1 = _mm256_load_si256((const __m256i *)(x1 + k));
        __asm__("" : "+x"(xv0), "+x"(xv1));
        row_by_two_in_integers(w + k, xv0, xv1, &a0, &b0);
        if (R == 4) {
            row_by_two_in_integers(w + ld + k, xv0, xv1, &a1, &b1);
            row_by_two_in_integers(w + 2 * ld + k, xv0, xv1, &a2, &b2);
            row_by_two_in_integers(w + 3 * ld + k, xv0, xv1, &a3, &b3);
        }
    }
    const __m256i sums[4][2] = {{a0, b0}, {a1, b1}, {a2, b2}, {a3, b3}};
    for (int r = 0; r < R; r++) {
        int32_t tail[2] = {0, 0}; /* the width % 16 values left */
        for (int64_t k = K16; k < width; k++) {
            tail[0] += (int32_t)w[r * ld + k] * x0[k];
            tail[1] += (int32_t)w[r * ld + k] * x1[k];
        }
        dots.lane[r * 2] = sum8(_mm256_cvtepi32_ps(sums[r][0])) + (float)tail[0];
        dots.lane[r * 2 + 1] = sum8(_mm256_cvtepi32_ps(sums[r][1])) + (float)tail[1];
    }
    return dots;
}

/* A row of bf16 x (K values) as int16 multiples of its unit, into x16 (with room for K rounded up to 8: zeros past K);
 * returns the unit, or 0 where the row holds an infinity or NaN or its largest |x| is below 2^-112 (the unit would not
 * be a normal float) */
static float row_in_units(const uint16_t *x, int64_t K, int16_t *x16) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), infinity = _mm256_set1_ps(INFINITY);
    __m256 largest = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 v = _mm256_and_ps(load_first8(x, k, K - k, AS_BF16), magnitude);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, infinity, _CMP_NLT_UQ)); /* inf or NaN */
        largest = _mm256_max_ps(largest, v);
    }
    int e;
    frexpf(max8(largest), &e); /* largest < 2^e (0: e = 0) */
    if (_mm256_movemask_ps(bad) || e - 15 < -126) return 0;
    const __m256 in_units = _mm256_set1_ps(ldexpf(1.0f, 15 - e)); /* |x| · in_units < 2^15 */
    for (int64_t k = 0; k < K; k += 8) { /* to nearest even, as lrintf */
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(load_first8(x, k, K - k, AS_BF16), in_units));
        __m128i values = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)); /* in order */
        _mm_storeu_si128((__m128i *)(x16 + k), values);
    }
    return ldexpf(1.0f, e - 15);
}

/* y = (x · Wᵀ) · scale + b for M rows of bf16 x in integers: a single row through rows_in_integers, more in tiles of
 * 4 rows of W by 2 of x; 0 (nothing written) where a row has no unit (row_in_units) or there is no memory for x16:
 * then the float32 tiles take them */
static int int8_in_integers(const uint16_t *x, const int8_t *w, const uint16_t *scale, const uint16_t *b,
                            uint16_t *y, int64_t M, int64_t N, int64_t K) {
    const int64_t ldx = (K + 15) & ~(int64_t)15; /* each row of x16 on 32 bytes, for the aligned loads */
    int16_t *x16 = aligned_alloc(64, (sizeof(int16_t) * M * ldx + 63) / 64 * 64);
    float *units = malloc(sizeof(float) * M);
    int done = x16 && units;
    for (int64_t m = 0; done && m < M; m++) done = (units[m] = row_in_units(x + m * K, K, x16 + m * ldx)) != 0;
    if (done) {
        _Pragma("omp parallel") {
            int64_t n_begin, n_end;
            thread_rows(N, &n_begin, &n_end);
            for (int64_t n = n_begin; M == 1 && n < n_end; n += 16) {
                const int R = n_end - n < 16 ? n_end - n : 16;
                dots16 dots = rows_in_integers(x16, w + n * K, K, R);
                for (int r = 0; r < R; r++) dots.lane[r] *= units[0]; /* a power of two: exact */
                store_dots(dots, R, 1, 1, scale, b, y, N, 0, n, AS_BF16);
            }
            for (int64_t m_begin = 0; M > 1 && m_begin < M; m_begin += X_BLOCK) {
                const int64_t m_end = x_block_end(m_begin, M);
                for (int64_t n = n_begin; n < n_end;) {
                    const int R = n_end - n >= 4 ? 4 : 1;
                    dots16 sums[X_BLOCK / 2]; /* of each pair of rows of x, over the chunks so far */
                    for (int64_t k = 0; k < K; k += INT_CHUNK) { /* a chunk of R rows of W in the L1 cache */
                        const int64_t width = K - k < INT_CHUNK ? K - k : INT_CHUNK;
                        for (int64_t m0 = m_begin; m0 < m_end; m0 += 2) { /* an odd block's last row twice */
                            const int16_t *x0 = x16 + m0 * ldx + k, *x1 = m0 + 1 < m_end ? x0 + ldx : x0;
                            dots16 dots = R == 4 ? tile_in_integers(x0, x1, w + n * K + k, width, K, 4)
                                                 : tile_in_integers(x0, x1, w + n * K + k, width, K, 1);
                            const int64_t pair = (m0 - m_begin) / 2;
                            sums[pair] = k ? add_dots(sums[pair], dots) : dots;
                        }
                    }
                    for (int64_t m0 = m_begin; m0 < m_end; m0 += 2) {
                        const int rows = m_end - m0 < 2 ? m_end - m0 : 2;
                        dots16 *dots = &sums[(m0 - m_begin) / 2];
                        for (int r = 0; r < R; r++)
                            for (int m = 0; m < rows; m++) dots->lane[r * 2 + m] *= units[m0 + m];
                        store_dots(*dots, R, 2, rows, scale, b, y, N, m0, n, AS_BF16);
                    }
                    n += R;
                }
            }
        }
    }
    free(x16);
    free(units);
    return done;
}
#endif

/* int8 W with a scale per row: y = (x · Wᵀ) · scale + b, in the activations' dtype. With bf16 x, scale, b (or NULL)
 * and y; with fp16 ones, x read as float32 (converted once); with fp32 ones. */
void linear_int8_bf16(const uint16_t *x, const int8_t *w, const uint16_t *scale, const uint16_t *b, uint16_t *y,
                      int64_t M, int64_t N, int64_t K) {
#ifdef HAVE_AVX512
    if (!lanes_bf16(x, w, scale, b, y, M, N, K)) return;
    /* 5 or more rows of x that the lane tiles did not take (5 to 7 rows, an odd K, or no scratch memory for
     * lanes_bf16): each group of 4 rows of W is widened to bf16 once, into a buffer of the thread's own, for the bf16
     * tiles of every 4 rows of x (group_bf16), where the int8 tiles widened it in each: the same products, added in the
     * same order (measured when this path also took 16 and 32 rows: bloom-560m's products streamed at 16 rows 15 -> 18
     * GB/s of int8 weights, at 32 rows 7 -> 10; with one buffer for both threads, 13 and 9). The tiles prefetch no W
     * after their group's last span: the next group is widened from W first, which prefetches its own rows. A thread
     * whose buffer cannot be allocated multiplies its rows of W one at a time. */
    if (M > 4) {
        _Pragma("omp parallel") {
            int64_t n_begin, n_end;
            thread_rows(N, &n_begin, &n_end);
            uint16_t *wide = aligned_alloc(64, sizeof(uint16_t) * ((4 * K + 31) / 32 * 32)); /* 64-byte lines */
            for (int64_t n = n_begin; !wide && n < n_end; n++) /* no buffer: the int8 tiles, a row of W at a time */
                for (int64_t m_begin = 0; m_begin < M; m_begin += X_BLOCK)
                    group_int8(x, w + n * K, w + (n + 1) * K, K, 1, 4, m_begin, x_block_end(m_begin, M), scale, b, y,
                               N, n, AS_BF16);
            for (int64_t n = n_begin; wide && n < n_end;) {
                int R = n_end - n >= 4 ? 4 : 1;
                widen_int8(w + n * K, R * K, wide, w + (n + R) * K); /* the group's R rows, contiguous */
                for (int64_t m_begin = 0; m_begin < M; m_begin += X_BLOCK)
                    group_bf16(x, wide, NULL, K, R, 4, m_begin, x_block_end(m_begin, M), scale, b, y, N, n, AS_BF16);
                n += R;
            }
            free(wide);
        }
        return;
    }
#elif defined(HAVE_AVX2)
    if (int8_in_integers(x, w, scale, b, y, M, N, K)) return;
    /* Where x cannot go in integers: x widened to float32 once, where the int8 tiles widen it beside every row of W
     * (bloom-560m's products and a quarter of its LM head, alternated in one process, scratch: 1 row 40.3 -> 42.2
     * GFLOP/s, 16 rows 93.4 -> 105.0); without memory for it, as they do: the same sums in the same order */
    float *x32 = aligned_alloc(64, (sizeof(float) * M * K + 63) / 64 * 64);
    if (x32) {
        for (int64_t i = 0; i < M * K; i++) x32[i] = bf16_to_float(x[i]);
        {
            const float *x = x32; /* what LINEAR reads */
            LINEAR(group_int8_x32, AS_BF16)
        }
        free(x32);
        return;
    }
#endif
    LINEAR(group_int8, AS_BF16)
}

void linear_int8_f16(const float *x, const int8_t *w, const uint16_t *scale, const uint16_t *b, uint16_t *y, int64_t M,
                     int64_t N, int64_t K) {
    LINEAR(group_int8_f32, AS_F16)
}

void linear_int8_f32(const float *x, const int8_t *w, const float *scale, const float *b, float *y, int64_t M, int64_t N,
                     int64_t K) {
    LINEAR(group_int8_f32, AS_F32)
}

/* fp16 W and b (or NULL), x as float32 (the fp16 activations, converted once) -> fp16 y */
void linear_f16(const float *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t M, int64_t N, int64_t K) {
    const void *scale = NULL;
    LINEAR(group_f16, AS_F16)
}

/* fp32 x, W, b (or NULL) -> fp32 y */
void linear_f32(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t N, int64_t K) {
    const void *scale = NULL;
    LINEAR(group_f32, AS_F32)
}

#ifdef HAVE_AVX512
/* exp(x) = 2^j · exp(r), j = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by its Taylor series to r^7 (relative error
 * < 1e-8, below float32's half ulp). x below -104 gives 0, as expf does; above 88.7, infinity. */
static inline __m512 exp512(__m512 x) {
    const float taylor[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x); /* this order keeps a NaN a NaN, as expf */
    __m512 j = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(j, _mm512_set1_ps(0.693145751953125f), x); /* ln 2 in two parts */
    r = _mm512_fnmadd_ps(j, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(taylor[0]);
    for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(taylor[i]));
    return _mm512_scalef_ps(p, j);
}

/* score[s] = exp(score[s] - max) for the n scores; returns their sum. */
static float exp_and_sum(float *score, int64_t n, float max) {
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s += 16) {
        __mmask16 valid = n - s >= 16 ? 0xffff : (__mmask16)((1u << (n - s)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, score + s), _mm512_set1_ps(max)));
        _mm512_mask_storeu_ps(score + s, valid, e);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(valid, e));
    }
    return _mm512_reduce_add_ps(total);
}
#elif defined(HAVE_AVX2)
/* exp512 on 8 lanes by the same steps, so with the same results; 2^j made of two halves, each a normal float32's
 * exponent, multiplied in turn: the second multiplication rounds once, as scalef does. x is also held below 88.8, where
 * the result is infinite already, so that j stays within the halves' range. */
static inline __m256 exp8(__m256 x) {
    const float taylor[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    x = _mm256_min_ps(_mm256_set1_ps(88.8f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x)); /* a NaN stays a NaN */
    __m256 j = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(j, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(j, _mm256_set1_ps(1.42860682030941723212e-6f), r);
    __m256 p = _mm256_set1_ps(taylor[0]);
    for (int i = 1; i < 8; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(taylor[i]));
    __m256i whole = _mm256_cvtps_epi32(j), half = _mm256_srai_epi32(whole, 1), bias = _mm256_set1_epi32(127);
    __m256 first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
    __m256 second = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(whole, half), bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, first), second);
}

static float exp_and_sum(float *score, int64_t n, float max) {
    __m256 total = _mm256_setzero_ps();
    for (int64_t s = 0; s < n; s += 8) {
        __m256i valid = first_lanes(n - s);
        __m256 e = exp8(_mm256_sub_ps(_mm256_maskload_ps(score + s, valid), _mm256_set1_ps(max)));
        _mm256_maskstore_ps(score + s, valid, e);
        total = _mm256_add_ps(total, _mm256_and_ps(e, _mm256_castsi256_ps(valid)));
    }
    return sum8(total);
}
#else
static float exp_and_sum(float *score, int64_t n, float max) {
    float total = 0;
    for (int64_t s = 0; s < n; s++) total += score[s] = expf(score[s] - max);
    return total;
}
#endif

/* bloom_gelu (bloom/model.py), x · 0.5 · (1 + tanh(0.79788456 · x · (1 + 0.044715 · x · x))), one operation at a
 * time in float32, each result rounded by ROUND to the model's dtype as torch rounds each op's output. */
#define GELU_PARALLEL 65536 /* values from which the threads share a GeLU (a prefill's); a decode step's: one */

#define GELU_STEPS(x, ROUND, TANH)                                                                  \
    ROUND(ROUND((x) * 0.5f) *                                                                       \
          ROUND(1.0f + ROUND(TANH(ROUND(ROUND(0.79788456f * (x)) *                                  \
                                         ROUND(1.0f + ROUND(ROUND(0.044715f * (x)) * (x))))))))

#ifdef HAVE_AVX512
/* tanh(u) = 1 - 2 / (exp(2u) + 1): its absolute error (~1e-7) is what matters here, where 1 is added to it */
static inline __m512 tanh512(__m512 u) {
    __m512 e = exp512(_mm512_add_ps(u, u));
    __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
}

/* GELU_STEPS on 16 values, each step rounded to `dtype` */
static inline __attribute__((always_inline)) __m512 gelu512(__m512 x, const int dtype) {
#define MUL(a, v) _mm512_mul_ps(_mm512_set1_ps(a), v)
#define ONE_PLUS(v) _mm512_add_ps(_mm512_set1_ps(1.0f), v)
    __m512 inner = round512(ONE_PLUS(round512(_mm512_mul_ps(round512(MUL(0.044715f, x), dtype), x), dtype)), dtype);
    inner = round512(_mm512_mul_ps(round512(MUL(0.79788456f, x), dtype), inner), dtype);
    __m512 half_x = round512(MUL(0.5f, x), dtype);
    return round512(_mm512_mul_ps(half_x, round512(ONE_PLUS(round512(tanh512(inner), dtype)), dtype)), dtype);
#undef MUL
#undef ONE_PLUS
}

void gelu_f32(const float *x, float *y, int64_t n) {
#pragma omp parallel for if (n >= GELU_PARALLEL)
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 valid = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        store512(y, i, valid, gelu512(load512(x, i, valid, AS_F32), AS_F32), AS_F32);
    }
}
#else
void gelu_f32(const float *x, float *y, int64_t n) {
#pragma omp parallel for if (n >= GELU_PARALLEL)
    for (int64_t i = 0; i < n; i++) y[i] = GELU_STEPS(x[i], same_float, tanhf);
}
#endif

/* bf16 and fp16 have 65,536 values each: their GeLUs are computed once, by the steps above, when the library is
 * loaded, and looked up. Each of the 9 roundings to bf16 takes 8 vector instructions: computed, a batch-16 step's
 * GeLU of bloom-560m took 45 us a layer, looked up 10 (the results are the same, for every input). */
static uint16_t GELU_OF_BF16[65536], GELU_OF_F16[65536];
__attribute__((constructor)) static void fill_gelu_tables(void) {
    static uint16_t every[65536]; /* each 16-bit pattern */
    for (int32_t i = 0; i < 65536; i++) every[i] = (uint16_t)i;
#ifdef HAVE_AVX512
    for (int64_t i = 0; i < 65536; i += 16) {
        store512(GELU_OF_BF16, i, 0xffff, gelu512(load512(every, i, 0xffff, AS_BF16), AS_BF16), AS_BF16);
        store512(GELU_OF_F16, i, 0xffff, gelu512(load512(every, i, 0xffff, AS_F16), AS_F16), AS_F16);
    }
#else
    for (int32_t i = 0; i < 65536; i++) {
        GELU_OF_BF16[i] = float_to_bf16(GELU_STEPS(bf16_to_float(every[i]), round_bf16, tanhf));
        GELU_OF_F16[i] = float_to_f16(GELU_STEPS(f16_to_float(every[i]), round_f16, tanhf));
    }
#endif
}

void gelu_bf16(const uint16_t *x, uint16_t *y, int64_t n) {
#pragma omp parallel for if (n >= GELU_PARALLEL)
    for (int64_t i = 0; i < n; i++) y[i] = GELU_OF_BF16[x[i]];
}

void gelu_f16(const uint16_t *x, uint16_t *y, int64_t n) {
#pragma omp parallel for if (n >= GELU_PARALLEL)
    for (int64_t i = 0; i < n; i++) y[i] = GELU_OF_F16[x[i]];
}

/* The greedy choice: for each of `rows` rows of n logits, the index of the largest, the first of equal ones, a NaN
 * counting as larger than any number (the first NaN's), as torch.argmax of their float32 values. torch's own argmax
 * of bf16 logits is slow, and converting them to float32 for it took 1.3 ms of a bf16 batch-16 step of bloom-560m
 * (16 rows of 250,880). Rows are shared by the threads. With AVX2 on 8 lanes, 4 sums apart (a row of 250,880 bf16
 * logits, scratch: 350 us one value at a time, 35 us so). */
#ifdef HAVE_AVX512
static inline __attribute__((always_inline)) int64_t argmax512(const void *x, int64_t n, const int dtype) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < n && !nan; i += 16) { /* the largest value, or the first chunk with a NaN */
        __mmask16 valid = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = load512(x, i, valid, dtype);
        nan = _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q);
        best = _mm512_mask_max_ps(best, valid, best, v);
    }
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(best));
    for (int64_t i = 0; i < n; i += 16) { /* its first place */
        __mmask16 valid = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 v = load512(x, i, valid, dtype);
        __mmask16 found = nan ? _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q)
                              : _mm512_mask_cmp_ps_mask(valid, v, max, _CMP_EQ_OQ);
        if (found) return i + __builtin_ctz(found);
    }
    return 0; /* n = 0 */
}
#define ARGMAX(NAME, T, DTYPE, TO_FLOAT)                                                                       \
    void NAME(const T *x, int64_t rows, int64_t n, int64_t *out) {                                             \
        _Pragma("omp parallel for") for (int64_t r = 0; r < rows; r++) out[r] = argmax512(x + r * n, n, DTYPE); \
    }
#elif defined(HAVE_AVX2)
/* argmax512 on 8 lanes */
static inline __attribute__((always_inline)) int64_t argmax8(const void *x, int64_t n, const int dtype) {
    __m256 best[4] = {_mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY),
                      _mm256_set1_ps(-INFINITY)}; /* 4 apart: each max waits for the one 4 before it */
    int nan = 0;
    int64_t i = 0;
    for (; i + 32 <= n && !nan; i += 32) { /* the largest value, or the first 32 with a NaN */
        __m256 unordered = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            __m256 v = load8(x, i + 8 * j, dtype);
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            best[j] = _mm256_max_ps(v, best[j]); /* a NaN is not the largest here */
        }
        nan = _mm256_movemask_ps(unordered);
    }
    for (; i < n && !nan; i += 8) {
        __m256 v = load_first8(x, i, n - i, dtype);
        v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, _mm256_castsi256_ps(first_lanes(n - i)));
        nan = _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        best[0] = _mm256_max_ps(v, best[0]);
    }
    const __m256 largest = _mm256_max_ps(_mm256_max_ps(best[0], best[1]), _mm256_max_ps(best[2], best[3]));
    const __m256 max = _mm256_set1_ps(max8(largest));
    for (i = 0; i + 32 <= n; i += 32) { /* its first 32, */
        __m256 found = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            __m256 v = load8(x, i + 8 * j, dtype);
            found = _mm256_or_ps(found, nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, max, _CMP_EQ_OQ));
        }
        if (_mm256_movemask_ps(found)) break;
    }
    for (; i < n; i += 8) { /* and place */
        __m256 v = load_first8(x, i, n - i, dtype);
        int found = _mm256_movemask_ps(nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, max, _CMP_EQ_OQ));
        found &= (1 << (n - i < 8 ? n - i : 8)) - 1;
        if (found) return i + __builtin_ctz(found);
    }
    return 0; /* n = 0 */
}
#define ARGMAX(NAME, T, DTYPE, TO_FLOAT)                                                                       \
    void NAME(const T *x, int64_t rows, int64_t n, int64_t *out) {                                             \
        _Pragma("omp parallel for") for (int64_t r = 0; r < rows; r++) out[r] = argmax8(x + r * n, n, DTYPE);  \
    }
#else
#define ARGMAX(NAME, T, DTYPE, TO_FLOAT)                                                                       \
    void NAME(const T *x, int64_t rows, int64_t n, int64_t *out) {                                             \
        _Pragma("omp parallel for") for (int64_t r = 0; r < rows; r++) {                                       \
            float best = -INFINITY;                                                                            \
            out[r] = 0;                                                                                        \
            for (int64_t i = 0; i < n; i++) {                                                                  \
                float v = TO_FLOAT(x[r * n + i]);                                                              \
                if (v != v) { /* NaN */                                                                        \
                    out[r] = i;                                                                                \
                    break;                                                                                     \
                }                                                                                              \
                if (v > best) best = v, out[r] = i;                                                            \
            }                                                                                                  \
        }                                                                                                      \
    }
#endif
ARGMAX(argmax_bf16, uint16_t, AS_BF16, bf16_to_float)
ARGMAX(argmax_f16, uint16_t, AS_F16, f16_to_float)
ARGMAX(argmax_f32, float, AS_F32, same_float)

/* Ask for the cache lines of `bytes` from p to be brought into the L2 cache */
static inline void prefetch_rows(const void *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)p + i, 0, 2);
}

/* The softmax steps of a dtype (bias_and_mask_bf16, ...) as the vector builds' functions of a constant dtype */
#define VECTOR_SOFTMAX_STEPS(T, SUFFIX, DTYPE, BIAS_AND_MASK_FN, NORMALIZE_FN, WEIGH_FN)                       \
    static float bias_and_mask_##SUFFIX(const T *alibi, const T *mask, float *score, int64_t n, float alpha) { \
        return BIAS_AND_MASK_FN(alibi, mask, score, n, alpha, DTYPE);                                          \
    }                                                                                                          \
    static void normalize_##SUFFIX(float *p, int64_t n, float total) { NORMALIZE_FN(p, n, total, DTYPE); }     \
    static void weigh_##SUFFIX(const float *p, const T *v, int64_t n, int64_t hd, float *acc, const T *next) { \
        WEIGH_FN(p, v, n, hd, acc, DTYPE, next);                                                               \
    }

#ifdef HAVE_AVX512
/* score[s] = T(T(alibi[s] + alpha · score[s]) + mask[s]) for n slots, their q·k in score; returns the maximum */
static inline __attribute__((always_inline)) float bias_and_mask512(const void *alibi, const void *mask, float *score,
                                                                    int64_t n, float alpha, const int dtype) {
    __m512 max = _mm512_set1_ps(-INFINITY);
    for (int64_t s = 0; s < n; s += 16) {
        __mmask16 valid = n - s >= 16 ? 0xffff : (__mmask16)((1u << (n - s)) - 1);
        __m512 dot = _mm512_mul_ps(_mm512_set1_ps(alpha), _mm512_maskz_loadu_ps(valid, score + s));
        __m512 x = round512(_mm512_add_ps(load512(alibi, s, valid, dtype), dot), dtype);
        x = round512(_mm512_add_ps(x, load512(mask, s, valid, dtype)), dtype);
        _mm512_mask_storeu_ps(score + s, valid, x);
        max = _mm512_mask_max_ps(max, valid, x, max); /* a NaN score is not the maximum, as in the scalar loop */
    }
    return _mm512_reduce_max_ps(max);
}

/* p[s] = T(p[s] / total) for n slots */
static inline __attribute__((always_inline)) void normalize512(float *p, int64_t n, float total, const int dtype) {
    for (int64_t s = 0; s < n; s += 16) {
        __mmask16 valid = n - s >= 16 ? 0xffff : (__mmask16)((1u << (n - s)) - 1);
        __m512 x = _mm512_div_ps(_mm512_maskz_loadu_ps(valid, p + s), _mm512_set1_ps(total));
        _mm512_mask_storeu_ps(p + s, valid, round512(x, dtype));
    }
}

/* weigh512 for bf16 values and hd a multiple of 32: each 32 values loaded at once and split into the even ones (shifted
 * into the high half of their 32 bits) and the odd ones (the low half cleared), which are float32 as they are; p[s],
 * a bf16 value, times a bf16 value is exact in float32, so one fused multiply-add gives the separate product and sum's
 * result. Half the instructions of widening 16 values at a time: 24 layers of a bf16 batch of 16 from the caches
 * (scratch), 3.2 -> 2.7 ms. */
static inline __attribute__((always_inline)) void weigh_bf16_pairs(const float *p, const uint16_t *v, int64_t n,
                                                                    int64_t hd, float *acc, const uint16_t *next) {
    const __m512i high_half = _mm512_set1_epi32((int)0xffff0000);
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0); /* even, odd */
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t d = 0; d < hd; d += 128) {
        const int chunks = hd - d >= 128 ? 4 : (int)(hd - d) / 32; /* of 32 values */
        __m512 even[4], odd[4];
        for (int j = 0; j < 4; j++) even[j] = odd[j] = _mm512_setzero_ps();
        for (int64_t s = 0; s < n; s++) {
            if (next && d == 0) prefetch_rows(next + s * hd, hd * 2);
            if (p[s] == 0) continue;
            __m512 weight = _mm512_set1_ps(p[s]);
            for (int j = 0; j < chunks; j++) {
                __m512i values = _mm512_loadu_si512(v + s * hd + d + 32 * j);
                even[j] = _mm512_fmadd_ps(weight, _mm512_castsi512_ps(_mm512_slli_epi32(values, 16)), even[j]);
                odd[j] = _mm512_fmadd_ps(weight, _mm512_castsi512_ps(_mm512_and_si512(values, high_half)), odd[j]);
            }
        }
        for (int j = 0; j < chunks; j++) { /* interleaved back into order */
            _mm512_storeu_ps(acc + d + 32 * j, _mm512_permutex2var_ps(even[j], first, odd[j]));
            _mm512_storeu_ps(acc + d + 32 * j + 16, _mm512_permutex2var_ps(even[j], second, odd[j]));
        }
    }
}

/* acc[d] = Σ p[s] · v[s][d] over n slots (in order, skipping p = 0) for hd features, 64 at a time in registers;
 * `next` (or NULL): values (n, hd) to prefetch meanwhile, a slot at a time */
static inline __attribute__((always_inline)) void weigh512(const float *p, const void *v, int64_t n, int64_t hd,
                                                            float *acc, const int dtype, const void *next) {
    if (dtype == AS_BF16 && hd % 32 == 0) {
        weigh_bf16_pairs(p, v, n, hd, acc, next);
        return;
    }
    const int64_t size = dtype == AS_F32 ? 4 : 2; /* bytes a value */
    for (int64_t d = 0; d < hd; d += 64) {
        __mmask16 valid[4];
        __m512 sum[4];
        for (int j = 0; j < 4; j++) {
            int64_t left = hd - d - 16 * j;
            valid[j] = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
            sum[j] = _mm512_setzero_ps();
        }
        for (int64_t s = 0; s < n; s++) {
            if (next && d == 0) prefetch_rows((const char *)next + s * hd * size, hd * size);
            if (p[s] == 0) continue;
            __m512 weight = _mm512_set1_ps(p[s]);
            for (int j = 0; j < 4; j++)
                sum[j] = _mm512_add_ps(sum[j], _mm512_mul_ps(weight, load512(v, s * hd + d + 16 * j, valid[j], dtype)));
        }
        for (int j = 0; j < 4; j++) _mm512_mask_storeu_ps(acc + d + 16 * j, valid[j], sum[j]);
    }
}

#define SOFTMAX_STEPS(T, SUFFIX, DTYPE, TO_FLOAT, ROUND)                                                       \
    VECTOR_SOFTMAX_STEPS(T, SUFFIX, DTYPE, bias_and_mask512, normalize512, weigh512)
#else
#ifdef HAVE_AVX2
/* acc[d] = Σ p[s] · v[s][d] over n slots (in order, skipping p = 0) for hd features, in registers: 64 at a time, then
 * 8, then the hd % 8 left one at a time; `next` (or NULL): values (n, hd) to prefetch meanwhile, a slot at a time.
 * The plain loop below kept the sums in memory, a load and a store of each beside every slot's multiply-add: 24
 * layers' bf16 attention over 160 slots, heads of 64, alternated in one process on the AVX2 machine (scratch), 12.58
 * -> 9.27 ms at 16 rows, 1.32 -> 0.86 ms at 1. */
static inline __attribute__((always_inline)) void weigh_slots(const float *p, const void *v, int64_t n, int64_t hd,
                                                               float *acc, const int dtype, const void *next) {
    const int64_t size = dtype == AS_F32 ? 4 : 2;
    int64_t d = 0;
    for (; d + 64 <= hd; d += 64) {
        __m256 sums[8];
        for (int j = 0; j < 8; j++) sums[j] = _mm256_setzero_ps();
        for (int64_t s = 0; s < n; s++) {
            if (next && d == 0) prefetch_rows((const char *)next + s * hd * size, hd * size);
            if (p[s] == 0) continue;
            __m256 weight = _mm256_set1_ps(p[s]);
            for (int j = 0; j < 8; j++) sums[j] = _mm256_fmadd_ps(weight, load8(v, s * hd + d + 8 * j, dtype), sums[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(acc + d + 8 * j, sums[j]);
    }
    for (; d + 8 <= hd; d += 8) {
        __m256 sum = _mm256_setzero_ps();
        for (int64_t s = 0; s < n; s++) {
            if (next && d == 0) prefetch_rows((const char *)next + s * hd * size, hd * size);
            if (p[s] != 0) sum = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), load8(v, s * hd + d, dtype), sum);
        }
        _mm256_storeu_ps(acc + d, sum);
    }
    for (; d < hd; d++) {
        float sum = 0;
        for (int64_t s = 0; s < n; s++)
            if (p[s] != 0) sum += p[s] * value_at(v, s * hd + d, dtype);
        acc[d] = sum;
    }
}

/* bias_and_mask512 and normalize512 on 8 lanes */
static inline __attribute__((always_inline)) float bias_and_mask8(const void *alibi, const void *mask, float *score,
                                                                  int64_t n, float alpha, const int dtype) {
    __m256 max = _mm256_set1_ps(-INFINITY);
    for (int64_t s = 0; s < n; s += 8) {
        __m256i valid = first_lanes(n - s);
        __m256 dot = _mm256_mul_ps(_mm256_set1_ps(alpha), _mm256_maskload_ps(score + s, valid));
        __m256 x = round8(_mm256_add_ps(load_first8(alibi, s, n - s, dtype), dot), dtype);
        x = round8(_mm256_add_ps(x, load_first8(mask, s, n - s, dtype)), dtype);
        _mm256_maskstore_ps(score + s, valid, x);
        x = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, _mm256_castsi256_ps(valid)); /* lanes past n: none */
        max = _mm256_max_ps(x, max); /* a NaN score is not the maximum, as in the scalar loop */
    }
    return max8(max);
}

static inline __attribute__((always_inline)) void normalize8(float *p, int64_t n, float total, const int dtype) {
    for (int64_t s = 0; s < n; s += 8) {
        __m256i valid = first_lanes(n - s);
        __m256 x = _mm256_div_ps(_mm256_maskload_ps(p + s, valid), _mm256_set1_ps(total));
        _mm256_maskstore_ps(p + s, valid, round8(x, dtype));
    }
}

#define SOFTMAX_STEPS(T, SUFFIX, DTYPE, TO_FLOAT, ROUND)                                                       \
    VECTOR_SOFTMAX_STEPS(T, SUFFIX, DTYPE, bias_and_mask8, normalize8, weigh_slots)
#else
/* acc[d] = Σ p[s] · v[s][d] over n slots (in order, skipping p = 0) for hd features; `next` (or NULL): values (n, hd)
 * to prefetch meanwhile, a slot at a time */
static inline __attribute__((always_inline)) void weigh_slots(const float *p, const void *v, int64_t n, int64_t hd,
                                                               float *acc, const int dtype, const void *next) {
    const int64_t size = dtype == AS_F32 ? 4 : 2;
    for (int64_t d = 0; d < hd; d++) acc[d] = 0;
    for (int64_t s = 0; s < n; s++) {
        if (next) prefetch_rows((const char *)next + s * hd * size, hd * size);
        if (p[s] == 0) continue;
        _Pragma("omp simd") for (int64_t d = 0; d < hd; d++) acc[d] += p[s] * value_at(v, s * hd + d, dtype);
    }
}
#define SOFTMAX_STEPS(T, SUFFIX, DTYPE, TO_FLOAT, ROUND)                                                       \
    static float bias_and_mask_##SUFFIX(const T *alibi, const T *mask, float *score, int64_t n, float alpha) { \
        float max = -INFINITY;                                                                                 \
        for (int64_t s = 0; s < n; s++) {                                                                      \
            score[s] = ROUND(ROUND(TO_FLOAT(alibi[s]) + alpha * score[s]) + TO_FLOAT(mask[s]));                \
            if (score[s] > max) max = score[s];                                                                \
        }                                                                                                      \
        return max;                                                                                            \
    }                                                                                                          \
    static void normalize_##SUFFIX(float *p, int64_t n, float total) {                                         \
        for (int64_t s = 0; s < n; s++) p[s] = ROUND(p[s] / total);                                            \
    }                                                                                                          \
    static void weigh_##SUFFIX(const float *p, const T *v, int64_t n, int64_t hd, float *acc, const T *next) { \
        weigh_slots(p, v, n, hd, acc, DTYPE, next);                                                            \
    }
#endif
#endif
SOFTMAX_STEPS(uint16_t, bf16, AS_BF16, bf16_to_float, round_bf16)
SOFTMAX_STEPS(uint16_t, f16, AS_F16, f16_to_float, round_f16)
SOFTMAX_STEPS(float, f32, AS_F32, same_float, same_float)

/* One query per row of the batch against its keys and values: a decode step's attention, as Attention.attend
 * computes it in the model's dtype T. For each of the BH (row, head) pairs, over the S key slots:
 *     score[s] = T(T(alibi[s] + alpha · q·k[s]) + mask[s])        baddbmm's rounding, then the mask's
 *     p = T(softmax(score)), in float32                           masked slots get 0 beside a visible one
 *     y = T(Σ p[s] · v[s]), in float32
 * q and y (BH, hd); k and v (BH, S, hd); alibi (BH, S); mask (BH / heads, S), shared by a row's heads. The q·k products
 * are the tiles above (16 slots at a time, then 4, then 1); the bias, the mask, the softmax and the sum of the values
 * run on 16 lanes at a time (AVX2: on 8; one at a time, with libm's expf, 24 layers at one row over 140 of 160 slots
 * took 1.20 ms, on 8 lanes 0.94, through bloom.matvec.attend, alternated in one process, scratch). exp is computed
 * here, not as torch does, so a probability can differ from torch's in its last bit. The masked slots before a row's
 * first visible one (left padding) and after its last (the cache's unwritten slots) are not read: their probability,
 * exp(LOWEST - max), is 0 to float32's precision (in fp16, while the scores stay above -65400), so a batch's step reads
 * only its rows' keys and values. One layer's attention for a bf16 batch of 16 rows at 141 of 256 slots (scratch): 344
 * us reading every slot one at a time, 229 us skipping the masked ones, 80 us on 16 lanes. The values of each tile's
 * keys are prefetched as the keys are read: 24 layers' caches of a bf16 batch of 16, read from memory at 130 and 200
 * slots (scratch), took 7.8 and 12.4 ms without it, 5.9 and 9.4 with it; and so are the thread's next (row, head)
 * pair's, at the same slots, which the memory then serves while this one multiplies: 24 layers of a bf16 batch of 16 at
 * 64-141 visible slots of 160 (scratch, alternated in one process, on a Zen 4 machine), 9.6-10.4 ms -> 7.0-7.4. Its
 * keys are asked for while this pair's keys are read, its values while this pair's values are summed, so that the
 * requests are spread over the pair's time (both while the keys were read: 8.5, 12.0 and 6.6 ms in three runs of the
 * same scratch, then 7.4, 10.7 and 5.9). Returns 1 when the scores' memory cannot be allocated. */
#define ATTEND(NAME, T, TILE_FN, SUFFIX, TO_FLOAT, FROM_FLOAT, LOWEST)                                            \
    int NAME(const T *q, const T *k, const T *v, const T *alibi, const T *mask, T *y, int64_t BH, int64_t heads,  \
             int64_t S, int64_t hd, float alpha) {                                                                \
        int threads = omp_get_max_threads(); /* their scores and sums, allocated before they start */             \
        float *scratch = malloc(sizeof(float) * threads * (S + hd));                                              \
        if (!scratch) return 1;                                                                                   \
        _Pragma("omp parallel num_threads(threads)") {                                                            \
            float *score = scratch + omp_get_thread_num() * (S + hd), *acc = score + S;                           \
            /* (row, head) pairs dealt out one at a time: a batch's rows see different numbers of slots */        \
            _Pragma("omp for schedule(static, 1)") for (int64_t i = 0; i < BH; i++) {                             \
                const T *qi[1] = {q + i * hd}, *ki = k + i * S * hd, *vi = v + i * S * hd;                        \
                const T *mi = mask + (i / heads) * S;                                                             \
                int64_t first = 0, end = S; /* the slots from the first visible one to the last */                \
                while (first < end && TO_FLOAT(mi[first]) == LOWEST) first++;                                     \
                while (end > first && TO_FLOAT(mi[end - 1]) == LOWEST) end--;                                     \
                if (first == end) first = 0, end = S; /* none visible (not a mask the model makes): all, as torch */ \
                for (int64_t s = first; s < end;) {                                                               \
                    int R = end - s >= 16 ? 16 : end - s >= 4 ? 4 : 1;                                            \
                    prefetch_rows(vi + s * hd, R * hd * sizeof(T)); /* their values, read once the softmax is done */ \
                    if (i + threads < BH) /* and the keys of this thread's next pair at these slots */               \
                        prefetch_rows(ki + threads * S * hd + s * hd, R * hd * sizeof(T));                            \
                    const T *next = ki + (s + R) * hd; /* the keys after these, prefetched */                    \
                    if (R == 16) put_dots(score + s, TILE_FN(qi, ki + s * hd, hd, hd, 16, 1, 1, next, ~0u), 16);  \
                    else if (R == 4) put_dots(score + s, TILE_FN(qi, ki + s * hd, hd, hd, 4, 1, 1, next, ~0u), 4); \
                    else put_dots(score + s, TILE_FN(qi, ki + s * hd, hd, hd, 1, 1, 1, next, ~0u), 1);            \
                    s += R;                                                                                       \
                }                                                                                                 \
                int64_t n = end - first;                                                                          \
                float *p = score + first;                                                                         \
                float max = bias_and_mask_##SUFFIX(alibi + i * S + first, mi + first, p, n, alpha);               \
                normalize_##SUFFIX(p, n, exp_and_sum(p, n, max));                                                 \
                weigh_##SUFFIX(p, vi + first * hd, n, hd, acc, /* prefetching the next pair's values */           \
                               i + threads < BH ? vi + threads * S * hd + first * hd : NULL);                     \
                for (int64_t d = 0; d < hd; d++) y[i * hd + d] = FROM_FLOAT(acc[d]);                              \
            }                                                                                                     \
        }                                                                                                         \
        free(scratch);                                                                                            \
        return 0;                                                                                                 \
    }

ATTEND(attend_bf16, uint16_t, tile_bf16, bf16, bf16_to_float, float_to_bf16, -0x1.fep+127f)
ATTEND(attend_f32, float, tile_f32, f32, same_float, same_float, -FLT_MAX)
ATTEND(attend_f16, uint16_t, tile_f16_f16, f16, f16_to_float, float_to_f16, -65504.0f)

/* A whole block's decode step in one call (bloom/generation/decode_step.py), for M rows of one token each: the work
 * of Block.forward (bloom/model.py) in its order, through the kernels above, with the same roundings:
 *     h = LN1(x); q, k, v = split(h · Wqkvᵀ + b), k and v written at `slot` of the layer's cache
 *     x = T(x + dense(attend(q, keys, values)));  out = T(x + down(gelu(up(LN2(x)))))
 * A product's weight is int8 (its scale per row given) or in the activations' dtype T (scale NULL). */
struct product {
    const void *weight, *scale, *bias;
};

struct block {
    const void *ln1_weight, *ln1_bias;
    struct product qkv, dense;
    const void *ln2_weight, *ln2_bias;
    struct product up, down;
    void *keys, *values; /* the layer's cache, (M, nh, S, hd) each */
    int64_t hidden, heads;
    float eps, alpha; /* LayerNorm's epsilon; 1/√hd */
};

/* What every block of a step shares: M rows, the caches' S slots, the one written, and the query's ALiBi bias and
 * additive mask, (M, nh, S) and (M, S) in T */
struct step {
    const void *alibi, *mask;
    int64_t rows, slots, slot;
};

/* LayerNorm over the C values of each of M rows: mean and variance in float32, y = T((x - mean) · rstd · w + b),
 * and the residual add, out = T(x + a) over n values. torch sums in another order, so a LayerNorm can differ from
 * F.layer_norm's by float32 rounding. With AVX-512 both run on 16 lanes, with AVX2 on 8 (one value at a time, on one
 * core while the other waited, they took about 1 ms of a bf16 batch-16 step of bloom-560m, by their share in perf). */
#ifdef HAVE_AVX512
static inline __attribute__((always_inline)) void layer_norm512(const void *x, const void *w, const void *b, void *y,
                                                                 int64_t M, int64_t C, float eps, const int dtype) {
    for (int64_t row = 0; row < M * C; row += C) {
        __m512 sum = _mm512_setzero_ps(), squares = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; c += 16) {
            __mmask16 valid = C - c >= 16 ? 0xffff : (__mmask16)((1u << (C - c)) - 1);
            sum = _mm512_add_ps(sum, load512(x, row + c, valid, dtype));
        }
        __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / C);
        for (int64_t c = 0; c < C; c += 16) {
            __mmask16 valid = C - c >= 16 ? 0xffff : (__mmask16)((1u << (C - c)) - 1);
            __m512 d = _mm512_maskz_sub_ps(valid, load512(x, row + c, valid, dtype), mean);
            squares = _mm512_add_ps(squares, _mm512_mul_ps(d, d));
        }
        __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / C + eps));
        for (int64_t c = 0; c < C; c += 16) {
            __mmask16 valid = C - c >= 16 ? 0xffff : (__mmask16)((1u << (C - c)) - 1);
            __m512 v = _mm512_mul_ps(_mm512_sub_ps(load512(x, row + c, valid, dtype), mean), rstd);
            v = _mm512_add_ps(_mm512_mul_ps(v, load512(w, c, valid, dtype)), load512(b, c, valid, dtype));
            store512(y, row + c, valid, v, dtype);
        }
    }
}

static inline __attribute__((always_inline)) void add512(const void *x, const void *a, void *out, int64_t n,
                                                          const int dtype) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 valid = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        store512(out, i, valid, _mm512_add_ps(load512(x, i, valid, dtype), load512(a, i, valid, dtype)), dtype);
    }
}

#define NORM_AND_ADD(T, SUFFIX, DTYPE, TO_FLOAT, FROM_FLOAT)                                                   \
    static void layer_norm_##SUFFIX(const T *x, const T *w, const T *b, T *y, int64_t M, int64_t C, float eps) { \
        layer_norm512(x, w, b, y, M, C, eps, DTYPE);                                                           \
    }                                                                                                          \
    static void add_##SUFFIX(const T *x, const T *a, T *out, int64_t n) { add512(x, a, out, n, DTYPE); }
#elif defined(HAVE_AVX2)
/* layer_norm512 and add512 on 8 lanes */
static inline __attribute__((always_inline)) void layer_norm8(const void *x, const void *w, const void *b, void *y,
                                                               int64_t M, int64_t C, float eps, const int dtype) {
    for (int64_t row = 0; row < M * C; row += C) {
        __m256 sum = _mm256_setzero_ps(), squares = _mm256_setzero_ps();
        for (int64_t c = 0; c < C; c += 8) sum = _mm256_add_ps(sum, load_first8(x, row + c, C - c, dtype));
        __m256 mean = _mm256_set1_ps(sum8(sum) / C);
        for (int64_t c = 0; c < C; c += 8) {
            __m256 d = _mm256_sub_ps(load_first8(x, row + c, C - c, dtype), mean);
            d = _mm256_and_ps(d, _mm256_castsi256_ps(first_lanes(C - c))); /* lanes past C: 0 */
            squares = _mm256_add_ps(squares, _mm256_mul_ps(d, d));
        }
        __m256 rstd = _mm256_set1_ps(1.0f / sqrtf(sum8(squares) / C + eps));
        for (int64_t c = 0; c < C; c += 8) {
            __m256 v = _mm256_mul_ps(_mm256_sub_ps(load_first8(x, row + c, C - c, dtype), mean), rstd);
            v = _mm256_add_ps(_mm256_mul_ps(v, load_first8(w, c, C - c, dtype)), load_first8(b, c, C - c, dtype));
            store_first8(y, row + c, C - c, v, dtype);
        }
    }
}

static inline __attribute__((always_inline)) void add8(const void *x, const void *a, void *out, int64_t n,
                                                        const int dtype) {
    for (int64_t i = 0; i < n; i += 8)
        store_first8(out, i, n - i, _mm256_add_ps(load_first8(x, i, n - i, dtype), load_first8(a, i, n - i, dtype)),
                     dtype);
}

#define NORM_AND_ADD(T, SUFFIX, DTYPE, TO_FLOAT, FROM_FLOAT)                                                   \
    static void layer_norm_##SUFFIX(const T *x, const T *w, const T *b, T *y, int64_t M, int64_t C, float eps) { \
        layer_norm8(x, w, b, y, M, C, eps, DTYPE);                                                             \
    }                                                                                                          \
    static void add_##SUFFIX(const T *x, const T *a, T *out, int64_t n) { add8(x, a, out, n, DTYPE); }
#else
#define NORM_AND_ADD(T, SUFFIX, DTYPE, TO_FLOAT, FROM_FLOAT)                                                   \
    static void layer_norm_##SUFFIX(const T *x, const T *w, const T *b, T *y, int64_t M, int64_t C, float eps) { \
        for (int64_t m = 0; m < M; m++, x += C, y += C) {                                                      \
            float mean = 0, var = 0;                                                                           \
            for (int64_t c = 0; c < C; c++) mean += TO_FLOAT(x[c]);                                            \
            mean /= C;                                                                                         \
            for (int64_t c = 0; c < C; c++) var += (TO_FLOAT(x[c]) - mean) * (TO_FLOAT(x[c]) - mean);          \
            float rstd = 1.0f / sqrtf(var / C + eps);                                                          \
            for (int64_t c = 0; c < C; c++)                                                                    \
                y[c] = FROM_FLOAT((TO_FLOAT(x[c]) - mean) * rstd * TO_FLOAT(w[c]) + TO_FLOAT(b[c]));           \
        }                                                                                                      \
    }                                                                                                          \
    static void add_##SUFFIX(const T *x, const T *a, T *out, int64_t n) {                                      \
        for (int64_t i = 0; i < n; i++) out[i] = FROM_FLOAT(TO_FLOAT(x[i]) + TO_FLOAT(a[i]));                  \
    }
#endif
NORM_AND_ADD(uint16_t, bf16, AS_BF16, bf16_to_float, float_to_bf16)
NORM_AND_ADD(uint16_t, f16, AS_F16, f16_to_float, float_to_f16)
NORM_AND_ADD(float, f32, AS_F32, same_float, same_float)

/* One product of a block step, x (M, K) -> y (M, N): int8 or same-dtype weights; fp16 x through x32 (M·K floats),
 * which the fp16 kernels read. */
static void product_bf16(const uint16_t *x, float *x32, const struct product *p, uint16_t *y, int64_t M, int64_t N,
                         int64_t K) {
    (void)x32;
    if (p->scale) linear_int8_bf16(x, p->weight, p->scale, p->bias, y, M, N, K);
    else linear_bf16(x, p->weight, p->bias, y, M, N, K);
}

static void product_f16(const uint16_t *x, float *x32, const struct product *p, uint16_t *y, int64_t M, int64_t N,
                        int64_t K) {
    for (int64_t i = 0; i < M * K; i++) x32[i] = f16_to_float(x[i]);
    if (p->scale) linear_int8_f16(x32, p->weight, p->scale, p->bias, y, M, N, K);
    else linear_f16(x32, p->weight, p->bias, y, M, N, K);
}

static void product_f32(const float *x, float *x32, const struct product *p, float *y, int64_t M, int64_t N,
                        int64_t K) {
    (void)x32;
    if (p->scale) linear_int8_f32(x, p->weight, p->scale, p->bias, y, M, N, K);
    else linear_f32(x, p->weight, p->bias, y, M, N, K);
}

/* x (M, C) -> out (M, C) through one block, with scratch memory h (M · 11C values of T) and x32 (M · 4C floats);
 * returns 1 when the attention's scratch memory cannot be allocated. */
#define DECODE_BLOCK(NAME, T, LAYER_NORM_FN, ADD_FN, PRODUCT, ATTEND_FN, GELU_FN)                                \
    static int NAME(const struct block *p, const struct step *step, const T *x, T *out, T *h, float *x32) {      \
        const int64_t M = step->rows, C = p->hidden, nh = p->heads, hd = C / nh, S = step->slots;                \
        T *qkv = h + M * C, *q = qkv + M * 3 * C, *context = q + M * C, *a = context + M * C, *up = a + M * C;   \
        T *keys = p->keys, *values = p->values;                                                                  \
        LAYER_NORM_FN(x, p->ln1_weight, p->ln1_bias, h, M, C, p->eps);                                           \
        PRODUCT(h, x32, &p->qkv, qkv, M, 3 * C, C);                                                              \
        for (int64_t i = 0; i < M * nh; i++) { /* qkv's features per head: [q | k | v][hd] */                    \
            const T *src = qkv + i * 3 * hd;                                                                     \
            memcpy(q + i * hd, src, sizeof(T) * hd);                                                             \
            memcpy(keys + (i * S + step->slot) * hd, src + hd, sizeof(T) * hd);                                  \
            memcpy(values + (i * S + step->slot) * hd, src + 2 * hd, sizeof(T) * hd);                            \
        }                                                                                                        \
        int failed = ATTEND_FN(q, keys, values, step->alibi, step->mask, context, M * nh, nh, S, hd, p->alpha);  \
        if (!failed) {                                                                                           \
            PRODUCT(context, x32, &p->dense, a, M, C, C);                                                        \
            ADD_FN(x, a, out, M * C);                                                                            \
            LAYER_NORM_FN(out, p->ln2_weight, p->ln2_bias, h, M, C, p->eps);                                     \
            PRODUCT(h, x32, &p->up, up, M, 4 * C, C);                                                            \
            GELU_FN(up, up, M * 4 * C);                                                                          \
            PRODUCT(up, x32, &p->down, a, M, C, 4 * C);                                                          \
            ADD_FN(out, a, out, M * C);                                                                          \
        }                                                                                                        \
        return failed;                                                                                           \
    }

DECODE_BLOCK(decode_block_bf16, uint16_t, layer_norm_bf16, add_bf16, product_bf16, attend_bf16, gelu_bf16)
DECODE_BLOCK(decode_block_f16, uint16_t, layer_norm_f16, add_f16, product_f16, attend_f16, gelu_f16)
DECODE_BLOCK(decode_block_f32, float, layer_norm_f32, add_f32, product_f32, attend_f32, gelu_f32)

/* The n blocks of a decode step one after another, in one call: x (M, C) through blocks[0], its output through
 * blocks[1], ..., the last block's into out (M, C), with what they share in `step`; the blocks' outputs in between
 * alternate between out and a buffer of the call's. Returns 1 when scratch memory cannot be allocated (out is not
 * complete then). A call per block from Python, each after the Python that prepared it, cost 1.1 ms more a bf16
 * batch-16 step of bloom-560m than the blocks' work (24 blocks; scratch, on a Zen 4 machine): the interpreter's code
 * and objects are no longer in the caches once a block's weights have streamed through them. */
#define DECODE_BLOCKS(NAME, BLOCK_FN, T)                                                                         \
    int NAME(const struct block *const *blocks, int64_t n, const struct step *step, const T *x, T *out) {        \
        const int64_t M = step->rows, C = blocks[0]->hidden;                                                     \
        /* LN output, qkv, q, context, a product's output, up; the blocks' outputs between them. On cache        \
         * lines, where the products read them (from malloc's 16-byte boundaries, fp32's loads of x straddled    \
         * two lines: a batch-16 step's blocks, 97 ms; on lines, 58) */                                          \
        T *h = aligned_alloc(64, (sizeof(T) * M * 12 * C + 63) / 64 * 64), *between = h + M * 11 * C;            \
        float *x32 = aligned_alloc(64, (sizeof(float) * M * 4 * C + 63) / 64 * 64);                              \
        int failed = !h || !x32;                                                                                 \
        for (int64_t i = 0; i < n && !failed; i++) { /* the last block writes out */                             \
            T *y = (n - 1 - i) % 2 ? between : out;                                                              \
            failed = BLOCK_FN(blocks[i], step, x, y, h, x32);                                                    \
            x = y;                                                                                               \
        }                                                                                                        \
        free(h);                                                                                                 \
        free(x32);                                                                                               \
        return failed;                                                                                           \
    }

DECODE_BLOCKS(decode_blocks_bf16, decode_block_bf16, uint16_t)
DECODE_BLOCKS(decode_blocks_f16, decode_block_f16, uint16_t)
DECODE_BLOCKS(decode_blocks_f32, decode_block_f32, float)
