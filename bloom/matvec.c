/* y = x · Wᵀ (+ b) for a few rows of x: the matrix-vector products of a decode step, on the CPU.
 *
 * A decode step multiplies one token per sequence (M rows, M <= 16) by every weight matrix of the model, so
 * its time is the time it takes to read the weights from memory. torch's general matmul kernels reach about
 * 60% of the machine's bandwidth on these shapes; reading each weight row once, as one contiguous stream,
 * with the M dot products for it computed while the row is in the cache, reaches about 95%.
 *
 * Shapes: x (M, K) row-major, W (N, K) row-major (torch's Linear layout), b and scale (N,), y (M, N).
 * Every product is accumulated in float32 and rounded to the output dtype once, after the bias is added, as
 * torch's bf16 matmul does; the order of the additions differs from torch's, so results differ from F.linear
 * by float32 rounding (not bitwise).
 *
 * The rows of W are split over the OpenMP threads in contiguous blocks. This file is compiled on first use
 * by bloom/matvec.py, for the machine it runs on (-march=native): with AVX512-BF16 the bf16 and int8
 * products use vdpbf16ps, the fp32 ones AVX-512 FMAs; elsewhere plain loops that the compiler vectorizes.
 * Built against the OpenMP runtime torch has loaded (same soname), it shares torch's threads.
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_AVX512 1
#endif

#define MAX_ROWS 16 /* rows of x handled with one read of W; the Python side uses torch beyond */

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

/* The rows of x in blocks the kernels are specialised for: 1, 2, 4, 8 or 16 rows, the last ones repeating
 * row M-1 when M is not one of them (computed, never written). */
static int block_rows(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : m <= 8 ? 8 : 16; }

/* The block of rows n_begin..n_end-1 of W that this thread computes. */
#define THREAD_ROWS(N, n_begin, n_end)                                    \
    int threads_ = omp_get_num_threads(), thread_ = omp_get_thread_num(); \
    int64_t n_begin = (N) * thread_ / threads_, n_end = (N) * (thread_ + 1) / threads_;

#include <omp.h>

#ifdef HAVE_AVX512

/* dots[m] = x[m] · w for the MB rows of x and one row w of K bf16 values. Up to 16 float32 accumulators:
 * with few rows of x, several per row over consecutive 32-value chunks (U of them), so that the loop is
 * never waiting on one accumulator. */
static inline __attribute__((always_inline)) void dot_bf16(const uint16_t *const *x, const uint16_t *w, int64_t K,
                                                           float *dots, const int MB) {
    const int U = MB == 1 ? 4 : MB == 2 ? 2 : 1; /* chunks in flight per row of x */
    __m512 acc[16];
    for (int a = 0; a < U * MB; a++) acc[a] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U)
        for (int u = 0; u < U; u++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
            for (int m = 0; m < MB; m++)
                acc[u * MB + m] = _mm512_dpbf16_ps(acc[u * MB + m], wv, (__m512bh)_mm512_loadu_si512(x[m] + k + 32 * u));
        }
    for (; k < K; k += 32) { /* the last K % (32·U) values; a masked load reads zeros past K */
        __mmask32 valid = K - k >= 32 ? 0xffffffffu : (1u << (K - k)) - 1;
        __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(valid, w + k);
        for (int m = 0; m < MB; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_maskz_loadu_epi16(valid, x[m] + k));
    }
    for (int m = 0; m < MB; m++) {
        __m512 sum = acc[m];
        for (int u = 1; u < U; u++) sum = _mm512_add_ps(sum, acc[u * MB + m]);
        dots[m] = _mm512_reduce_add_ps(sum);
    }
}

/* The same for a row of K int8 values: each 32 of them become bf16 (exact: |q| <= 127 has 8 significant bits). */
static inline __attribute__((always_inline)) __m512bh int8_to_bf16(const int8_t *q, __mmask32 valid) {
    __m256i bytes = _mm256_maskz_loadu_epi8(valid, q);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

static inline __attribute__((always_inline)) void dot_int8(const uint16_t *const *x, const int8_t *w, int64_t K,
                                                           float *dots, const int MB) {
    const int U = MB == 1 ? 4 : MB == 2 ? 2 : 1;
    __m512 acc[16];
    for (int a = 0; a < U * MB; a++) acc[a] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U)
        for (int u = 0; u < U; u++) {
            __m512bh wv = int8_to_bf16(w + k + 32 * u, 0xffffffffu);
            for (int m = 0; m < MB; m++)
                acc[u * MB + m] = _mm512_dpbf16_ps(acc[u * MB + m], wv, (__m512bh)_mm512_loadu_si512(x[m] + k + 32 * u));
        }
    for (; k < K; k += 32) {
        __mmask32 valid = K - k >= 32 ? 0xffffffffu : (1u << (K - k)) - 1;
        __m512bh wv = int8_to_bf16(w + k, valid);
        for (int m = 0; m < MB; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_maskz_loadu_epi16(valid, x[m] + k));
    }
    for (int m = 0; m < MB; m++) {
        __m512 sum = acc[m];
        for (int u = 1; u < U; u++) sum = _mm512_add_ps(sum, acc[u * MB + m]);
        dots[m] = _mm512_reduce_add_ps(sum);
    }
}

static inline __attribute__((always_inline)) void dot_f32(const float *const *x, const float *w, int64_t K,
                                                          float *dots, const int MB) {
    const int U = MB == 1 ? 4 : MB == 2 ? 2 : 1;
    __m512 acc[16];
    for (int a = 0; a < U * MB; a++) acc[a] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= K; k += 16 * U)
        for (int u = 0; u < U; u++) {
            __m512 wv = _mm512_loadu_ps(w + k + 16 * u);
            for (int m = 0; m < MB; m++)
                acc[u * MB + m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x[m] + k + 16 * u), acc[u * MB + m]);
        }
    for (; k < K; k += 16) {
        __mmask16 valid = K - k >= 16 ? 0xffff : (1u << (K - k)) - 1;
        __m512 wv = _mm512_maskz_loadu_ps(valid, w + k);
        for (int m = 0; m < MB; m++) acc[m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(valid, x[m] + k), acc[m]);
    }
    for (int m = 0; m < MB; m++) {
        __m512 sum = acc[m];
        for (int u = 1; u < U; u++) sum = _mm512_add_ps(sum, acc[u * MB + m]);
        dots[m] = _mm512_reduce_add_ps(sum);
    }
}

#else /* portable: one row of x at a time, loops the compiler vectorizes */

static inline void dot_bf16(const uint16_t *const *x, const uint16_t *w, int64_t K, float *dots, const int MB) {
    for (int m = 0; m < MB; m++) {
        float sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < K; k++) sum += bf16_to_float(w[k]) * bf16_to_float(x[m][k]);
        dots[m] = sum;
    }
}

static inline void dot_int8(const uint16_t *const *x, const int8_t *w, int64_t K, float *dots, const int MB) {
    for (int m = 0; m < MB; m++) {
        float sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < K; k++) sum += (float)w[k] * bf16_to_float(x[m][k]);
        dots[m] = sum;
    }
}

static inline void dot_f32(const float *const *x, const float *w, int64_t K, float *dots, const int MB) {
    for (int m = 0; m < MB; m++) {
        float sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < K; k++) sum += w[k] * x[m][k];
        dots[m] = sum;
    }
}

#endif

/* Each kernel: the rows of x as pointers (repeating the last one up to the block size), then one pass over the
 * rows of W, calling its dot function with the block size as a constant so that the compiler specialises it. */
#define ROWS_OF_X(T, x, M, K)                                             \
    const int MB = block_rows(M);                                         \
    const T *rows[MAX_ROWS];                                              \
    for (int m = 0; m < MB; m++) rows[m] = (x) + (m < (M) ? m : (M) - 1) * (K);

#define FOR_BLOCK(DOT, w_row, K, dots)                 \
    switch (MB) {                                      \
        case 1: DOT(rows, w_row, K, dots, 1); break;   \
        case 2: DOT(rows, w_row, K, dots, 2); break;   \
        case 4: DOT(rows, w_row, K, dots, 4); break;   \
        case 8: DOT(rows, w_row, K, dots, 8); break;   \
        default: DOT(rows, w_row, K, dots, 16); break; \
    }

/* bf16 x, W, b (or NULL) -> bf16 y */
void linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *b, uint16_t *y, int64_t M, int64_t N, int64_t K) {
    ROWS_OF_X(uint16_t, x, M, K)
#pragma omp parallel
    {
        THREAD_ROWS(N, n_begin, n_end)
        float dots[MAX_ROWS];
        for (int64_t n = n_begin; n < n_end; n++) {
            FOR_BLOCK(dot_bf16, w + n * K, K, dots)
            float bias = b ? bf16_to_float(b[n]) : 0.0f;
            for (int64_t m = 0; m < M; m++) y[m * N + n] = float_to_bf16(dots[m] + bias);
        }
    }
}

/* bf16 x, int8 W with a bf16 scale per row, bf16 b (or NULL) -> bf16 y = (x · Wᵀ) · scale + b */
void linear_int8(const uint16_t *x, const int8_t *w, const uint16_t *scale, const uint16_t *b, uint16_t *y, int64_t M,
                 int64_t N, int64_t K) {
    ROWS_OF_X(uint16_t, x, M, K)
#pragma omp parallel
    {
        THREAD_ROWS(N, n_begin, n_end)
        float dots[MAX_ROWS];
        for (int64_t n = n_begin; n < n_end; n++) {
            FOR_BLOCK(dot_int8, w + n * K, K, dots)
            float s = bf16_to_float(scale[n]), bias = b ? bf16_to_float(b[n]) : 0.0f;
            for (int64_t m = 0; m < M; m++) y[m * N + n] = float_to_bf16(dots[m] * s + bias);
        }
    }
}

/* fp32 x, W, b (or NULL) -> fp32 y */
void linear_f32(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t N, int64_t K) {
    ROWS_OF_X(float, x, M, K)
#pragma omp parallel
    {
        THREAD_ROWS(N, n_begin, n_end)
        float dots[MAX_ROWS];
        for (int64_t n = n_begin; n < n_end; n++) {
            FOR_BLOCK(dot_f32, w + n * K, K, dots)
            float bias = b ? b[n] : 0.0f;
            for (int64_t m = 0; m < M; m++) y[m * N + n] = dots[m] + bias;
        }
    }
}
