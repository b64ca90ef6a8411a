/* CPU kernels for decoding.
 *
 * llama4_few_rows: few-row matrix products, y (M, N) = x (M, K) @ W (N, K)^T, W float32 or
 * bfloat16, x and y float32, M small (one row per sequence being decoded).
 * llama4_rms_norm: RMS normalisation of a few float32 rows (torch's CPU kernel for it is a chain
 * of ~8 ops: ~60 us for one 1024-wide row, against ~1 us here).
 *
 * A decode step multiplies each weight matrix by a handful of rows, so its speed is the speed at
 * which W streams from memory. Each thread takes one contiguous band of W's rows and reads it
 * front to back: one sequential stream per core, which the hardware prefetchers follow best
 * (on the 2-core AVX-512 machine this was written on: 27-30 GB/s over a decode step's distinct
 * 2-16 MB matrices at one row of x, against 20-25 GB/s for oneDNN's kernel; with 2-3 streams
 * per core it fell to ~22).
 *
 * With several rows of x, each W vector is loaded once and multiplied into every row: blocks of
 * R rows of W times G rows of x, R * G accumulators held in registers. One row of x takes R = 1
 * (the single stream above). Unused accumulators (r >= R or j >= G) are dropped by the compiler:
 * `block` is always inlined with constant R and G.
 *
 * Built by llama4/kernels/__init__.py with the machine's C compiler (-O3 -march=native -fopenmp);
 * the vector width follows the instruction set it was compiled for. GCC/Clang vector extensions,
 * no intrinsics: the same source builds for AVX-512, AVX2 and Arm.
 */
#include <stdint.h>
#include <math.h>
#include <string.h>

#if defined(__AVX512F__)
#define VBYTES 64
#define RMAX 3 /* 3 x 8 accumulators + 3 W vectors + 1 x vector fit in 32 registers */
#define GMAX 8
#else
#define VBYTES 32
#define RMAX 2 /* 2 x 4 accumulators + 2 + 1 fit in 16 registers */
#define GMAX 4
#endif
#define VL (VBYTES / 4) /* floats per vector */

typedef float vf __attribute__((vector_size(VBYTES), aligned(4), may_alias));
typedef uint16_t vh __attribute__((vector_size(VBYTES / 2), aligned(2), may_alias));
typedef uint32_t vu __attribute__((vector_size(VBYTES)));

/* VL elements of row `r` of W at column k, as floats (bfloat16 is the top half of a float32). */
static inline __attribute__((always_inline)) vf load_w(const void* w, int64_t idx, const int bf16) {
    if (bf16) {
        vu bits = __builtin_convertvector(*(const vh*)((const uint16_t*)w + idx), vu) << 16;
        return (vf)bits;
    }
    return *(const vf*)((const float*)w + idx);
}

static inline float w_at(const void* w, int64_t idx, const int bf16) {
    if (bf16) {
        uint32_t bits = (uint32_t)((const uint16_t*)w)[idx] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    return ((const float*)w)[idx];
}

static inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

/* y[j, n + r] for r < R, j < G: rows n..n+R-1 of W times rows 0..G-1 of x. */
static inline __attribute__((always_inline)) void block(
    const float* x, int64_t ldx, const void* w, int64_t ldw, float* y, int64_t ldy, int64_t n,
    int64_t K, const int R, const int G, const int bf16) {
#define ACCUMULATORS(r) vf a##r##0 = {0}, a##r##1 = {0}, a##r##2 = {0}, a##r##3 = {0}, \
                           a##r##4 = {0}, a##r##5 = {0}, a##r##6 = {0}, a##r##7 = {0};
    ACCUMULATORS(0) ACCUMULATORS(1) ACCUMULATORS(2)
    const int64_t w0 = n * ldw, w1 = (n + 1) * ldw, w2 = (n + 2) * ldw;
    int64_t k = 0;
    for (; k + VL <= K; k += VL) {
        vf v0 = load_w(w, w0 + k, bf16);
        vf v1 = R > 1 ? load_w(w, w1 + k, bf16) : v0;
        vf v2 = R > 2 ? load_w(w, w2 + k, bf16) : v0;
#define TIMES_X(j)                                         \
        if (j < G) {                                       \
            vf xv = *(const vf*)(x + j * ldx + k);         \
            a0##j += v0 * xv;                              \
            if (R > 1) a1##j += v1 * xv;                   \
            if (R > 2) a2##j += v2 * xv;                   \
        }
        TIMES_X(0) TIMES_X(1) TIMES_X(2) TIMES_X(3) TIMES_X(4) TIMES_X(5) TIMES_X(6) TIMES_X(7)
    }
    /* Sum each accumulator's lanes, add the columns past the last full vector, store. */
#define STORE(r, j)                                                                  \
    if (r < R && j < G) {                                                            \
        float s = hsum(a##r##j);                                                     \
        for (int64_t i = k; i < K; i++) s += w_at(w, w##r + i, bf16) * x[j * ldx + i]; \
        y[j * ldy + n + r] = s;                                                      \
    }
#define STORE_ROW(r) STORE(r, 0) STORE(r, 1) STORE(r, 2) STORE(r, 3) STORE(r, 4) STORE(r, 5) STORE(r, 6) STORE(r, 7)
    STORE_ROW(0) STORE_ROW(1) STORE_ROW(2)
}

/* One W block of R rows against all M rows of x, G at a time (the block stays in cache). */
static inline __attribute__((always_inline)) void rows_block(
    const float* x, int64_t ldx, const void* w, int64_t ldw, float* y, int64_t n, int64_t M,
    int64_t N, int64_t K, const int R, const int bf16) {
    for (int64_t m = 0; m < M; m += GMAX) {
        const float* xm = x + m * ldx;
        float* ym = y + m * N;
        switch (M - m < GMAX ? M - m : GMAX) {
#define CASE(g) case g: block(xm, ldx, w, ldw, ym, N, n, K, R, g, bf16); break;
            CASE(1) CASE(2) CASE(3) CASE(4)
#if GMAX > 4
            CASE(5) CASE(6) CASE(7) CASE(8)
#endif
        }
    }
}

/* Rows [n0, n1) of W: R = RMAX blocks (R = 1 for a single row of x), then single rows. */
static void band(const float* x, int64_t ldx, const void* w, int64_t ldw, float* y, int64_t n0,
                 int64_t n1, int64_t M, int64_t N, int64_t K, const int bf16) {
    int64_t n = n0;
    if (M > 1)
        for (; n + RMAX <= n1; n += RMAX) rows_block(x, ldx, w, ldw, y, n, M, N, K, RMAX, bf16);
    for (; n < n1; n++) rows_block(x, ldx, w, ldw, y, n, M, N, K, 1, bf16);
}

/* y (M, N) contiguous = x (M, K; row stride ldx) @ W (N, K; row stride ldw)^T.
 * w_bf16: W holds bfloat16 (else float32). Splits W's rows over `threads` OpenMP threads. */
void llama4_few_rows(const float* x, int64_t ldx, const void* w, int64_t ldw, int w_bf16, float* y,
                     int64_t M, int64_t N, int64_t K, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1 && N >= 2 * threads && N * K >= 65536)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        extern int omp_get_thread_num(void), omp_get_num_threads(void);
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        int64_t n0 = N * t / T, n1 = N * (t + 1) / T;
        if (w_bf16)
            band(x, ldx, w, ldw, y, n0, n1, M, N, K, 1);
        else
            band(x, ldx, w, ldw, y, n0, n1, M, N, K, 0);
    }
}

/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w (w may be NULL: no scale), for `rows` rows of `dim`
 * floats; x rows `ldx` apart, y contiguous. One thread: the work is a few microseconds. */
void llama4_rms_norm(const float* x, int64_t ldx, const float* w, float* y, int64_t rows, int64_t dim,
                     float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * ldx;
        float* yr = y + r * dim;
        vf acc = {0};
        int64_t i = 0;
        for (; i + VL <= dim; i += VL) {
            vf v = *(const vf*)(xr + i);
            acc += v * v;
        }
        float ss = hsum(acc);
        for (; i < dim; i++) ss += xr[i] * xr[i];
        float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        if (w)
            for (i = 0; i < dim; i++) yr[i] = xr[i] * scale * w[i];
        else
            for (i = 0; i < dim; i++) yr[i] = xr[i] * scale;
    }
}
