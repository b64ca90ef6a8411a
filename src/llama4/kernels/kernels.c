/* CPU kernels for decoding.
 *
 * llama4_few_rows: few-row matrix products, y (M, N) = x (M, K) @ W (N, K)^T, W float32 or
 * bfloat16, x and y float32, M small (one row per sequence being decoded); optionally with x
 * holding a SwiGLU's [gate | up], the product then takes silu(gate) * up.
 * llama4_decode_attention: attention of one query per row over a cache.
 * llama4_rope: RoPE, then optionally the QK norm, in place.
 * llama4_rms_norm: RMS normalisation of a few rows (torch's CPU kernel for it is a chain
 * of ~8 ops: ~60 us for one 1024-wide row, against ~1 us here).
 * llama4_decode_step: a whole decode step (embedding, every layer, head) in one call, from the
 * pieces above (at the end of this file).
 * Each replaces several small torch ops of a decode step, whose fixed costs (~5-30 us each, ~100
 * of them per layer) rivalled the products themselves.
 *
 * A decode step multiplies each weight matrix by a handful of rows, so its speed is the speed at
 * which W streams from memory. Each thread takes one contiguous band of W's rows and reads it
 * front to back: one sequential stream per core, which the hardware prefetchers follow best
 * (on the 2-core AVX-512 machine this was written on: 25-30 GB/s over a decode step's distinct
 * 2-16 MB matrices at one row of x, against 20-25 GB/s for oneDNN's kernel; with 2-3 streams
 * per core it fell to ~22).
 *
 * With several rows of x, each W vector is loaded once and multiplied into every row: blocks of
 * R rows of W times G rows of x, R * G accumulators held in registers. One or two rows of x take
 * R = 1 (the single stream above; at two rows 24 GB/s against 20 with R = 3), more rows take
 * R = RMAX (fewer loads of x per W vector: at 4-8 rows 16-19 GB/s against 10-17 with R = 1).
 * Unused accumulators (r >= R or j >= G) are dropped by the compiler: `block` is always inlined
 * with constant R and G.
 *
 * Reading ahead: between two products of a decode step the caller runs Python and small ops
 * (norms, attention, routing, sampling: ~15% of a batch-1 step) with one core and memory idle.
 * The caller may name the weights it expects to multiply next; after the product, a reader
 * thread of idle priority reads them into the cache while the caller is busy elsewhere, so the
 * next products find their first megabytes in L2/L3 (batch-1 decoding 5-12% faster; see
 * `read_ahead` below).
 *
 * Threads: llama4's own pool (below), not OpenMP: work stealing keeps a product from waiting
 * for a thread that is slow to wake or descheduled (decoding at one row: 36.8 ms a step against
 * 44.4 with OpenMP's passive threads; beside a busy process, 43.8 against 42.6).
 *
 * Built by llama4/kernels/__init__.py with the machine's C compiler (-O3 -march=native -pthread);
 * the vector width follows the instruction set it was compiled for. GCC/Clang vector extensions,
 * no intrinsics: the same source builds for AVX-512, AVX2 and Arm.
 */
#define _GNU_SOURCE /* SCHED_IDLE */
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <stdlib.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>

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

/* Rows [n0, n1) of W: R = RMAX blocks (R = 1 for one or two rows of x), then single rows. */
static void band(const float* x, int64_t ldx, const void* w, int64_t ldw, float* y, int64_t n0,
                 int64_t n1, int64_t M, int64_t N, int64_t K, const int bf16) {
    int64_t n = n0;
    if (M > 2)
        for (; n + RMAX <= n1; n += RMAX) rows_block(x, ldx, w, ldw, y, n, M, N, K, RMAX, bf16);
    for (; n < n1; n++) rows_block(x, ldx, w, ldw, y, n, M, N, K, 1, bf16);
}

/* ------------------------------------------------------------------------------------------
 * Thread pool. A product is cut into chunks of W's rows; thread t owns the t-th contiguous band
 * of chunks and takes them front to back (one stream per core); a thread whose band is empty
 * takes the last untaken chunk of another band. So a thread that the OS has descheduled (a busy
 * machine) delays a product by at most the chunk it is in, never by its whole band: the others
 * take the rest. Between jobs, workers spin for a short while (a decode step issues a product
 * every ~100 us; waking a sleeping thread costs tens of microseconds, more in a VM), then sleep.
 *
 * Each band is one 64-bit word, (job << 44) | (lo << 22) | hi: claims are compare-and-swaps on
 * it, so a worker that wakes late for an old job cannot take chunks of a newer one (the job
 * number differs) and the caller never waits for a worker that took nothing.
 * ------------------------------------------------------------------------------------------ */
#define POOL_MAX 64              /* threads per product, the caller included */
#define CHUNK_BITS 22            /* at most 4M chunks per job */
#define CHUNK_MASK ((1ull << CHUNK_BITS) - 1)
#define JOB_MASK ((1ull << (64 - 2 * CHUNK_BITS)) - 1)

typedef void (*chunk_fn)(const void* args, int64_t chunk);

typedef struct {
    _Alignas(64) _Atomic uint64_t word; /* one cache line each */
} band_t;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    pthread_mutex_t submit; /* one job at a time (callers on several threads queue here) */
    int workers;            /* started so far (they never exit) */
    _Alignas(64) _Atomic uint64_t job; /* number of the current job; workers watch it */
    _Atomic int sleeping;
    chunk_fn fn;
    const void* args;
    _Alignas(64) _Atomic int64_t done; /* chunks finished in the current job */
    _Atomic int64_t spin_ns;
    band_t band[POOL_MAX];
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER,
          .submit = PTHREAD_MUTEX_INITIALIZER};

static inline uint64_t band_word(uint64_t job, uint64_t lo, uint64_t hi) {
    return ((job & JOB_MASK) << (2 * CHUNK_BITS)) | (lo << CHUNK_BITS) | hi;
}

/* Take a chunk of band b for `job`: its first (front) or last untaken one. -1 when none. */
static int64_t claim(band_t* b, uint64_t job, int front) {
    uint64_t w = atomic_load_explicit(&b->word, memory_order_acquire);
    for (;;) {
        uint64_t lo = (w >> CHUNK_BITS) & CHUNK_MASK, hi = w & CHUNK_MASK;
        if ((w >> (2 * CHUNK_BITS)) != (job & JOB_MASK) || lo >= hi) return -1;
        uint64_t next = front ? band_word(job, lo + 1, hi) : band_word(job, lo, hi - 1);
        if (atomic_compare_exchange_weak_explicit(&b->word, &w, next, memory_order_acq_rel,
                                                  memory_order_acquire))
            return front ? (int64_t)lo : (int64_t)hi - 1;
    }
}

/* Thread t's share of `job` over T bands: its own band, then the others' leftovers. */
static void work(int t, int T, uint64_t job) {
    int64_t c, n = 0;
    chunk_fn fn = NULL;
    const void* args = NULL;
    for (int i = 0; i < T; i++) {
        band_t* b = &pool.band[(t + i) % T];
        while ((c = claim(b, job, i == 0)) >= 0) {
            if (!fn) { /* a claim succeeded: the job is live, so fn and args are this job's */
                fn = pool.fn;
                args = pool.args;
            }
            fn(args, c);
            n++;
        }
    }
    if (n) atomic_fetch_add_explicit(&pool.done, n, memory_order_release);
}

/* ------------------------------------------------------------------------------------------
 * Reading ahead. `llama4_few_rows` may carry up to AHEAD_MAX regions (the weights of the next
 * products); after each job worker 1 hands over to it, the reader thread (below) reads the
 * current regions front to back, checking every 4 KB that no new job has arrived and that the
 * regions are still current, and stops at either.
 *
 * The regions are weights the caller holds and will free some time after a later call has
 * replaced them; the caller never waits for the reader (an idle-priority thread may be off the
 * CPU for a long time). Each replacement starts a new `epoch`, a number the caller chooses (> 0,
 * increasing), so that it can hold the regions before the call. The reader publishes the epoch it
 * is about to read (`reading`) and only then checks that it is still current, so once the caller
 * has started epoch e + 1 and then sees `reading` != e, no read of epoch e's regions is under
 * way or can start: the caller may free them (`llama4_ahead_reading`; llama4.kernels.ReadAhead
 * keeps them until then). The regions are copied under a sequence lock (`seq` odd while
 * written) and used only if they were written in the reader's epoch.
 * ------------------------------------------------------------------------------------------ */
#define AHEAD_MAX 4
static struct {
    _Alignas(64) _Atomic uint64_t epoch;
    _Atomic uint64_t reading; /* the epoch the reader is reading, 0 when none */
    _Atomic uint64_t seq;
    _Atomic uint64_t written_in; /* the epoch the regions below were written in */
    _Atomic(const char*) ptr[AHEAD_MAX];
    _Atomic int64_t bytes[AHEAD_MAX];
    _Atomic int64_t total; /* bytes read ahead so far (llama4_ahead_total) */
} ahead;
volatile float ahead_sink; /* keeps the reads */

/* Replace the regions (n of them; n = 0: none) under epoch `epoch`. */
static void ahead_set(const void* const* ptrs, const int64_t* bytes, int n, uint64_t epoch) {
    atomic_store(&ahead.epoch, epoch);
    atomic_fetch_add(&ahead.seq, 1); /* odd: being written */
    atomic_thread_fence(memory_order_release); /* the stores below stay after it */
    for (int i = 0; i < AHEAD_MAX; i++) {
        atomic_store_explicit(&ahead.ptr[i], i < n ? (const char*)ptrs[i] : NULL, memory_order_relaxed);
        atomic_store_explicit(&ahead.bytes[i], i < n ? bytes[i] : 0, memory_order_relaxed);
    }
    atomic_store(&ahead.written_in, epoch);
    atomic_fetch_add(&ahead.seq, 1);
}

/* The epoch whose regions the reader may be reading (0: none). */
int64_t llama4_ahead_reading(void) { return (int64_t)atomic_load(&ahead.reading); }

/* The reader, after a job whose word is `jobword`: read the regions until done or interrupted. */
static void read_ahead(uint64_t jobword) {
    const uint64_t epoch = atomic_load(&ahead.epoch);
    if (!epoch) return;
    atomic_store(&ahead.reading, epoch);
    const uint64_t seq = atomic_load(&ahead.seq);
    const char* ptr[AHEAD_MAX];
    int64_t bytes[AHEAD_MAX];
    for (int i = 0; i < AHEAD_MAX; i++) {
        ptr[i] = atomic_load_explicit(&ahead.ptr[i], memory_order_relaxed);
        bytes[i] = atomic_load_explicit(&ahead.bytes[i], memory_order_relaxed);
    }
    atomic_thread_fence(memory_order_acquire); /* the copies above stay before the checks */
    if ((seq & 1) || atomic_load(&ahead.written_in) != epoch || atomic_load(&ahead.seq) != seq ||
        atomic_load(&ahead.epoch) != epoch)
        goto out;
    vf sum = {0};
    for (int i = 0; i < AHEAD_MAX && ptr[i]; i++)
        for (int64_t at = 0; at < bytes[i]; at += 4096) {
            if (atomic_load_explicit(&pool.job, memory_order_relaxed) != jobword ||
                atomic_load_explicit(&ahead.epoch, memory_order_relaxed) != epoch)
                goto out;
            const int64_t end = at + 4096 < bytes[i] ? at + 4096 : bytes[i];
            for (int64_t j = at; j + VBYTES <= end; j += 64) sum += *(const vf*)(ptr[i] + j);
            atomic_fetch_add_explicit(&ahead.total, end - at, memory_order_relaxed);
        }
    ahead_sink = sum[0];
out:
    atomic_store(&ahead.reading, 0);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Wait until *word differs from `seen` and return it: spin for spin_ns, then sleep on `wake`
 * (counted in *sleeping, so that whoever changes the word knows to signal). */
static uint64_t wait_change(_Atomic uint64_t* word, uint64_t seen, int64_t spin_ns, pthread_mutex_t* mu,
                            pthread_cond_t* wake, _Atomic int* sleeping) {
    uint64_t now;
    int64_t start = now_ns(), spins = 0;
    while ((now = atomic_load_explicit(word, memory_order_acquire)) == seen) {
        if ((spins++ & 255) == 0 && now_ns() - start >= spin_ns) {
            pthread_mutex_lock(mu);
            atomic_fetch_add(sleeping, 1);
            while ((now = atomic_load(word)) == seen) pthread_cond_wait(wake, mu);
            atomic_fetch_sub(sleeping, 1);
            pthread_mutex_unlock(mu);
            break;
        }
        cpu_relax();
    }
    return now;
}

#define READER_SPIN_NS 2000000 /* 2 ms */

/* The reader: a thread of its own at SCHED_IDLE priority, so it runs only on a core nothing
 * else wants (when worker 1 read ahead itself, at normal priority, it took the caller's core
 * often enough beside a busy process to make batch-1 decoding 33-42% slower; the reader costs
 * nothing measurable there, and reads little). Where idle priority is not to be had (not
 * Linux), the reader reads nothing. Worker 1 hands it each job it has finished. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    _Atomic int started;
    _Atomic int idle; /* it runs at idle priority (else it never reads: see above) */
    _Atomic uint64_t posted; /* jobs handed over so far */
    _Atomic uint64_t jobword;
    _Atomic int sleeping;
} reader = {.mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static void* reader_main(void* arg) {
    (void)arg;
#ifdef SCHED_IDLE /* Linux */
    struct sched_param none = {0};
    atomic_store(&reader.idle, pthread_setschedparam(pthread_self(), SCHED_IDLE, &none) == 0);
#endif
    uint64_t seen = 0;
    for (;;) {
        /* Spin a while first (a decode step hands over a job every ~0.5 ms; waking from sleep
         * takes tens of microseconds, a good part of a gap): at idle priority this costs no one
         * else anything, as any other thread that wants the core preempts it. */
        seen = wait_change(&reader.posted, seen, READER_SPIN_NS, &reader.mu, &reader.wake, &reader.sleeping);
        read_ahead(atomic_load(&reader.jobword));
    }
    return NULL;
}

/* Hand job `jobword` (just finished by this worker) to the reader. */
static void reader_post(uint64_t jobword) {
    atomic_store(&reader.jobword, jobword);
    atomic_fetch_add(&reader.posted, 1);
    if (atomic_load(&reader.sleeping)) {
        pthread_mutex_lock(&reader.mu);
        pthread_cond_signal(&reader.wake);
        pthread_mutex_unlock(&reader.mu);
    }
}

/* Start the reader once (called under pool.submit, with every signal blocked). */
static void reader_start(void) {
    if (atomic_load(&reader.started)) return;
    pthread_t th;
    if (pthread_create(&th, NULL, reader_main, NULL) == 0) {
        pthread_detach(th);
        atomic_store(&reader.started, 1);
    }
}

static void* worker(void* arg) {
    const int t = (int)(intptr_t)arg;
    uint64_t seen = atomic_load(&pool.job);
    for (;;) {
        const uint64_t job = wait_change(&pool.job, seen, atomic_load(&pool.spin_ns), &pool.mu, &pool.wake, &pool.sleeping);
        seen = job;
        if (t > (int)(job >> 56)) continue; /* not needed for this job */
        work(t, (int)(job >> 56) + 1, job & ((1ull << 56) - 1));
        if (t == 1 && atomic_load(&reader.idle) && atomic_load_explicit(&ahead.ptr[0], memory_order_relaxed))
            reader_post(job); /* something to read (a stale answer only costs or skips one read) */
    }
    return NULL;
}

/* A forked child has none of the parent's workers: start afresh (claims still complete every
 * job without them, the caller takes all chunks, but the locks may have been held mid-fork). */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_mutex_init(&pool.submit, NULL);
    pool.workers = 0;
    atomic_store(&pool.sleeping, 0);
    /* A fork inside ahead_set may have left the sequence odd: no regions, and an even sequence
     * (the caller names regions again with its next product). */
    for (int i = 0; i < AHEAD_MAX; i++) atomic_store(&ahead.ptr[i], NULL);
    atomic_store(&ahead.written_in, 0);
    atomic_store(&ahead.seq, (atomic_load(&ahead.seq) + 1) & ~1ull);
    atomic_store(&ahead.reading, 0);
    pthread_mutex_init(&reader.mu, NULL);
    pthread_cond_init(&reader.wake, NULL);
    atomic_store(&reader.started, 0);
    atomic_store(&reader.idle, 0);
    atomic_store(&reader.sleeping, 0);
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* Run fn(args, c) for c in [0, n) on up to T threads (the caller is one of them). */
static void parallel(chunk_fn fn, const void* args, int64_t n, int T) {
    if (T > POOL_MAX) T = POOL_MAX;
    if (T > n) T = (int)n;
    if (T <= 1 || n > (int64_t)CHUNK_MASK) {
        for (int64_t c = 0; c < n; c++) fn(args, c);
        return;
    }
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool.submit);
    if (pool.workers < T - 1 || !atomic_load(&reader.started)) { /* threads take no signals (Ctrl-C goes to the caller) */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        reader_start();
        while (pool.workers < T - 1) {
            pthread_t th;
            if (pthread_create(&th, NULL, worker, (void*)(intptr_t)(pool.workers + 1)) != 0) break;
            pthread_detach(th);
            pool.workers++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    if (T > pool.workers + 1) T = pool.workers + 1;
    uint64_t job = ((atomic_load(&pool.job) & ((1ull << 56) - 1)) + 1) & ((1ull << 56) - 1);
    pool.fn = fn;
    pool.args = args;
    atomic_store(&pool.done, 0);
    for (int t = 0; t < T; t++)
        atomic_store_explicit(&pool.band[t].word, band_word(job, n * t / T, n * (t + 1) / T),
                              memory_order_release);
    atomic_store(&pool.job, ((uint64_t)(T - 1) << 56) | job); /* seq_cst: see `sleeping` below */
    if (atomic_load(&pool.sleeping)) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.mu);
    }
    work(0, T, job);
    /* Only chunks other threads are inside remain: wait for them (yielding now and then, in
     * case one of them waits for this core). */
    for (int64_t spins = 1; atomic_load_explicit(&pool.done, memory_order_acquire) < n; spins++) {
        if ((spins & 4095) == 0) sched_yield();
        cpu_relax();
    }
    pthread_mutex_unlock(&pool.submit);
}

/* How long idle workers spin before they sleep (see the pool's comment). */
void llama4_set_spin(int64_t ns) { atomic_store(&pool.spin_ns, ns); }

/* ------------------------------------------------------------------------------------------ */

typedef struct {
    const float* x;
    int64_t ldx;
    const void* w;
    int64_t ldw;
    int bf16;
    float* y;
    int64_t M, N, K, rows_per_chunk;
} few_rows_args;

static void few_rows_chunk(const void* p, int64_t c) {
    const few_rows_args* a = p;
    int64_t n0 = c * a->rows_per_chunk, n1 = n0 + a->rows_per_chunk < a->N ? n0 + a->rows_per_chunk : a->N;
    if (a->bf16)
        band(a->x, a->ldx, a->w, a->ldw, a->y, n0, n1, a->M, a->N, a->K, 1);
    else
        band(a->x, a->ldx, a->w, a->ldw, a->y, n0, n1, a->M, a->N, a->K, 0);
}

typedef int32_t vi __attribute__((vector_size(VBYTES)));

/* exp(x) for VL floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for exactness), exp(r)
 * by its degree-7 Taylor polynomial (relative error < 1e-8 before rounding), times 2^n built in
 * the exponent bits. Inputs are clamped to [-87, 88], where float exp neither overflows nor goes
 * subnormal. Within 2 ulp of expf; the compiler vectorises no libm exp without -ffast-math (which
 * would break the -inf masking in attention). */
static inline vf vexp(vf x) {
    const vi over = x > 88.f, under = x < -87.f; /* lanes all ones where true */
    const vf hi = (vf){0} + 88.f, lo = (vf){0} + -87.f;
    x = (vf)(((vi)x & ~(over | under)) | ((vi)hi & over) | ((vi)lo & under));
    const float magic = 12582912.f; /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    vf p = (vf){0} + (1.f / 5040.f);
    p = p * r + (1.f / 720.f);
    p = p * r + (1.f / 120.f);
    p = p * r + (1.f / 24.f);
    p = p * r + (1.f / 6.f);
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
}

/* act[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i] for n floats. */
static void silu_times(const float* gate, const float* up, float* act, int64_t n) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        const vf g = *(const vf*)(gate + i);
        *(vf*)(act + i) = g / (1.f + vexp(-g)) * *(const vf*)(up + i);
    }
    for (; i < n; i++) act[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

/* Threads for a product with W (N, K): one below 64K weights (waking a worker costs more). */
static int product_threads(int64_t N, int64_t K, int threads) { return N * K >= 65536 ? threads : 1; }

/* y (M, N) contiguous = x (M, K; row stride ldx) @ W (N, K; row stride ldw)^T on up to `threads`
 * threads, in chunks of ~64 KB of W (whole register blocks). */
static void product(const float* x, int64_t ldx, const void* w, int64_t ldw, int bf16, float* y, int64_t M,
                    int64_t N, int64_t K, int threads) {
    int64_t rows = (65536 / (K * (bf16 ? 2 : 4))) / RMAX * RMAX;
    if (rows < RMAX) rows = RMAX;
    few_rows_args a = {x, ldx, w, ldw, bf16, y, M, N, K, rows};
    parallel(few_rows_chunk, &a, (N + rows - 1) / rows, product_threads(N, K, threads));
}

/* The same, W (N, K) multiplied by silu(gate) * up of x's rows [gate | up] (2K floats, row stride
 * ldx), formed in act (M, K) first. */
static void product_glu(const float* x, int64_t ldx, const void* w, int64_t ldw, int bf16, float* y,
                        float* act, int64_t M, int64_t N, int64_t K, int threads) {
    for (int64_t m = 0; m < M; m++) silu_times(x + m * ldx, x + m * ldx + K, act + m * K, K);
    product(act, K, w, ldw, bf16, y, M, N, K, threads);
}

/* y (M, N) contiguous = x (M, K; row stride ldx) @ W (N, K; row stride ldw)^T.
 * w_bf16: W holds bfloat16 (else float32). glu: x rows hold [gate | up] (2K floats) and the
 * product takes silu(gate) * up (the SwiGLU's input to its down projection), formed here first.
 * Spread over `threads` threads as `product` does.
 * ahead_ptrs, ahead_bytes: n_ahead regions for the reader once the product is done (see
 * `read_ahead`), under epoch `ahead_epoch`. They replace the last call's only if this product
 * runs on several threads (one thread: no worker hands over after it, and the last call's
 * regions are likely still being read). Returns 1 if they did, 0 if not, -1 when out of memory. */
int64_t llama4_few_rows(const float* x, int64_t ldx, int glu, const void* w, int64_t ldw, int w_bf16,
                        float* y, int64_t M, int64_t N, int64_t K, int threads,
                        const void* const* ahead_ptrs, const int64_t* ahead_bytes, int n_ahead,
                        int64_t ahead_epoch) {
    float* act = NULL;
    if (M <= 0 || N <= 0) return 0;
    if (glu && !(act = malloc(sizeof(float) * M * K))) return -1;
    const int replace = product_threads(N, K, threads) > 1 && ahead_epoch > 0;
    if (replace) {
        pthread_mutex_lock(&pool.submit);
        ahead_set(ahead_ptrs, ahead_bytes, n_ahead < AHEAD_MAX ? n_ahead : AHEAD_MAX, (uint64_t)ahead_epoch);
        pthread_mutex_unlock(&pool.submit);
    }
    if (glu)
        product_glu(x, ldx, w, ldw, w_bf16, y, act, M, N, K, threads);
    else
        product(x, ldx, w, ldw, w_bf16, y, M, N, K, threads);
    free(act);
    return replace;
}

int64_t llama4_ahead_total(void) { return atomic_load(&ahead.total); }

/* Replace the regions to read ahead by none, under epoch `epoch`. */
void llama4_forget_ahead(int64_t epoch) {
    pthread_mutex_lock(&pool.submit);
    ahead_set(NULL, NULL, 0, (uint64_t)epoch);
    pthread_mutex_unlock(&pool.submit);
}

/* ------------------------------------------------------------------------------------------
 * Attention of one query per row (decoding), float32: out[b, h] = softmax(scale * q[b, h] . k[b, h / G, s]
 * over the s allowed by mask[b, s]) @ v[b, h / G], G = H / K query heads per key/value head.
 * q (B, H, Dh) with strides (qb, qh); k, v (B, K, S, Dh) with strides (kb, kk, ks); mask
 * (B, S) bytes (row stride mb, 0: one row for all; NULL: all allowed); out (B, H, Dh) contiguous.
 * One chunk per (row, key/value head): its G query heads share one pass over its keys and one
 * over its values.
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    const void *q, *k, *v; /* float32, or bfloat16 when bf16 */
    int64_t qb, qh, kb, kk, ks, vb, vk, vs;
    const uint8_t* mask;
    int64_t mb;
    void* out;
    int64_t H, K, S, Dh;
    float scale;
    int bf16;
    float* scratch; /* per chunk: scores (G, S), queries (G, Dh), outputs (G, Dh) in float32 */
    const int64_t* kv_rows; /* NULL, or the row of k and v that row b of q reads (cache slots) */
} attention_args;

/* Round to the nearest bfloat16 (ties to even), as torch's casts do; NaN stays NaN. */
static inline uint16_t to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    if ((b & 0x7fffffff) > 0x7f800000) return (uint16_t)((b >> 16) | 0x40);
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

/* The float32 value that storing f in the tensor's dtype leaves (bfloat16 rounds). */
static inline float as_stored(float f, const int bf16) {
    if (!bf16) return f;
    uint32_t b = (uint32_t)to_bf16(f) << 16;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline void store(void* p, int64_t i, float f, const int bf16) {
    if (bf16)
        ((uint16_t*)p)[i] = to_bf16(f);
    else
        ((float*)p)[i] = f;
}

/* a (float32) . row of w at idx (float32 or bfloat16), n elements. */
static inline float dot(const float* a, const void* w, int64_t idx, int64_t n, const int bf16) {
    vf acc = {0};
    int64_t i = 0;
    for (; i + VL <= n; i += VL) acc += *(const vf*)(a + i) * load_w(w, idx + i, bf16);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * w_at(w, idx + i, bf16);
    return s;
}

static inline __attribute__((always_inline)) void attention_rows(const attention_args* a, int64_t c, const int bf16) {
    const int64_t b = c / a->K, kh = c % a->K, G = a->H / a->K, S = a->S, Dh = a->Dh;
    const int64_t kv = a->kv_rows ? a->kv_rows[b] : b;
    const int64_t k0 = kv * a->kb + kh * a->kk, v0 = kv * a->vb + kh * a->vk;
    const uint8_t* mask = a->mask ? a->mask + b * a->mb : NULL;
    float* sc = a->scratch + c * G * (S + 2 * Dh); /* (G, S) */
    float* q = sc + G * S;                         /* (G, Dh): query heads kh * G .. kh * G + G - 1 */
    float* out = q + G * Dh;                       /* (G, Dh) */
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < Dh; d++) q[g * Dh + d] = w_at(a->q, b * a->qb + (kh * G + g) * a->qh + d, bf16);
    for (int64_t s = 0; s < S; s++) /* one pass over the keys for all G heads */
        for (int64_t g = 0; g < G; g++)
            sc[g * S + s] = mask && !mask[s] ? -INFINITY : dot(q + g * Dh, a->k, k0 + s * a->ks, Dh, bf16) * a->scale;
    for (int64_t g = 0; g < G; g++) { /* softmax per head; a row that may attend nowhere gets 0 */
        float* sg = sc + g * S;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t s = 0; s < S; s++) mx = sg[s] > mx ? sg[s] : mx;
        for (int64_t s = 0; s < S; s++) sum += sg[s] = mx == -INFINITY ? 0.f : expf(sg[s] - mx);
        for (int64_t s = 0; s < S; s++) sg[s] = sum > 0.f ? sg[s] / sum : 0.f;
    }
    memset(out, 0, sizeof(float) * G * Dh);
    for (int64_t s = 0; s < S; s++) { /* one pass over the values */
        const int64_t vr = v0 + s * a->vs;
        for (int64_t g = 0; g < G; g++) {
            const float pr = sc[g * S + s];
            float* o = out + g * Dh;
            if (pr == 0.f) continue;
            int64_t d = 0;
            for (; d + VL <= Dh; d += VL) *(vf*)(o + d) += pr * load_w(a->v, vr + d, bf16);
            for (; d < Dh; d++) o[d] += pr * w_at(a->v, vr + d, bf16);
        }
    }
    for (int64_t i = 0; i < G * Dh; i++) store(a->out, (b * a->H + kh * G) * Dh + i, out[i], bf16);
}

static void attention_chunk(const void* p, int64_t c) {
    const attention_args* a = p;
    if (a->bf16)
        attention_rows(a, c, 1);
    else
        attention_rows(a, c, 0);
}

int llama4_decode_attention(const void* q, int64_t qb, int64_t qh, const void* k, int64_t kb, int64_t kk,
                            int64_t ks, const void* v, int64_t vb, int64_t vk, int64_t vs,
                            const uint8_t* mask, int64_t mb, void* out, int bf16, int64_t B, int64_t H,
                            int64_t K, int64_t S, int64_t Dh, float scale, int threads) {
    if (B <= 0 || S <= 0 || K <= 0) return -2;
    /* The scores: as many as torch's scores tensor. */
    float* scratch = malloc(sizeof(float) * B * H * (S + 2 * Dh));
    if (!scratch) return -1;
    attention_args a = {q, k, v, qb, qh, kb, kk, ks, vb, vk, vs, mask, mb, out, H, K, S, Dh, scale, bf16, scratch, NULL};
    parallel(attention_chunk, &a, B * K, B * H * S * Dh >= 65536 ? threads : 1);
    free(scratch);
    return 0;
}

/* In place: rotate the interleaved pairs (0,1), (2,3), ... of each head of each row by the row's
 * angles (RoPE, the complex-number convention), then, if norm_eps >= 0, RMS-normalise each head
 * (no weight: Llama 4's QK norm). x (rows, heads, Dh) float32 or bfloat16 (bf16) with strides
 * (ldr, ldh); cos, sin (rows, Dh / 2) float32 contiguous. Computed in float32; bfloat16 is
 * rounded where torch's ops round it: after the rotation and after the norm. */
static inline __attribute__((always_inline)) void rope_rows(void* x, const int bf16, int64_t rows, int64_t ldr,
                                                            int64_t heads, int64_t ldh, int64_t Dh,
                                                            const float* cos, const float* sin, float norm_eps) {
    const int64_t half = Dh / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * half, *s = sin + r * half;
        for (int64_t h = 0; h < heads; h++) {
            const int64_t at = r * ldr + h * ldh;
            float ss = 0.f;
            for (int64_t i = 0; i < half; i++) {
                const float x0 = w_at(x, at + 2 * i, bf16), x1 = w_at(x, at + 2 * i + 1, bf16);
                const float y0 = as_stored(x0 * c[i] - x1 * s[i], bf16);
                const float y1 = as_stored(x0 * s[i] + x1 * c[i], bf16);
                store(x, at + 2 * i, y0, bf16);
                store(x, at + 2 * i + 1, y1, bf16);
                ss += y0 * y0 + y1 * y1;
            }
            if (norm_eps >= 0.f) {
                const float scale = 1.0f / sqrtf(ss / (float)Dh + norm_eps);
                for (int64_t i = 0; i < Dh; i++) store(x, at + i, w_at(x, at + i, bf16) * scale, bf16);
            }
        }
    }
}

void llama4_rope(void* x, int bf16, int64_t rows, int64_t ldr, int64_t heads, int64_t ldh, int64_t Dh,
                 const float* cos, const float* sin, float norm_eps) {
    if (bf16) /* a constant flag inside: the compiler keeps one tight loop per dtype */
        rope_rows(x, 1, rows, ldr, heads, ldh, Dh, cos, sin, norm_eps);
    else
        rope_rows(x, 0, rows, ldr, heads, ldh, Dh, cos, sin, norm_eps);
}

/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w (w may be NULL: no scale), for `rows` rows of `dim`
 * values; x rows `ldx` apart, y contiguous; x, w and y each float32 or bfloat16 (x16, w16, y16),
 * computed in float32; with `round`, the normalised value and the result are rounded to bfloat16
 * (before and after the scale, as the reference does for bfloat16 models).
 * One thread: the work is a few microseconds. */
static inline __attribute__((always_inline)) void norm_rows(const void* x, int64_t ldx, const int x16,
                                                            const void* w, const int w16, void* y, const int y16,
                                                            const int round, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t xr = r * ldx, yr = r * dim;
        vf acc = {0};
        int64_t i = 0;
        for (; i + VL <= dim; i += VL) {
            vf v = load_w(x, xr + i, x16);
            acc += v * v;
        }
        float ss = hsum(acc);
        for (; i < dim; i++) ss += w_at(x, xr + i, x16) * w_at(x, xr + i, x16);
        const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (i = 0; i < dim; i++) {
            const float v = as_stored(w_at(x, xr + i, x16) * scale, round);
            store(y, yr + i, as_stored(w ? v * w_at(w, i, w16) : v, round), y16);
        }
    }
}

void llama4_rms_norm(const void* x, int64_t ldx, const void* w, void* y, int bf16, int64_t rows, int64_t dim,
                     float eps) {
    if (bf16)
        norm_rows(x, ldx, 1, w, 1, y, 1, 1, rows, dim, eps);
    else
        norm_rows(x, ldx, 0, w, 0, y, 0, 0, rows, dim, eps);
}


/* ------------------------------------------------------------------------------------------
 * A whole decode step in one call: the embedding rows, every layer, the final norm and the output
 * head, for B rows of one new token each. It computes what the model's forward computes with the
 * engine's cache (llama4.model.transformer, .attention, .moe; llama4.engine.cache), op for op
 * and with the kernels above, without the Python and small torch ops that a step through the
 * forward spends between products (~7 of 25 ms at batch 1 in benchmarks/decode.py).
 * llama4/engine/step.py lays out the plan (`step_model`, one `step_layer` per layer); its tests
 * hold the two to the same logits.
 *
 * Weights and cache are float32, or all bfloat16 (`bf16`). Activations are float32 arrays; in a
 * bfloat16 model they hold bfloat16 values, rounded wherever the forward's ops round (each
 * product's output, the residual adds, the norms, the gated inputs of the experts), and the
 * attention half works on bfloat16 rows as the forward's kernels do.
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    const void* attention_norm; /* (D) */
    const void* qkv;            /* ((H + 2K) Dh, D): the q, k and v projections stacked */
    int64_t ld_qkv;
    const void* o; /* (D, H Dh) */
    int64_t ld_o;
    void* k_cache; /* (slots, K, capacity, Dh) contiguous */
    void* v_cache;
    int64_t capacity;
    int64_t is_global;          /* NoPE, the whole history; else RoPE and the current chunk */
    int64_t qk_norm;            /* RMS-normalise each q and k head after RoPE */
    int64_t temperature_tuning; /* scale q by a function of its position */
    const void* ffn_norm;       /* (D) */
    const void* gate_up;        /* the dense FFN or the shared expert: (2F, D) = [gate | up] */
    int64_t ld_gate_up;
    const void* down; /* (D, F) */
    int64_t ld_down, hidden;
    int64_t n_experts, top_k; /* 0 experts: a dense FFN layer */
    const void* router;       /* (E, D) */
    int64_t ld_router;
    const void* router_bias; /* (E): steers the choice only; bfloat16 if router_bias_bf16 */
    int64_t router_bias_bf16;
    const void* expert_gate_up; /* expert e: (2Fe, D) at e * expert_gate_up_stride */
    int64_t expert_gate_up_stride, expert_ld_gate_up;
    const void* expert_down; /* expert e: (D, Fe) at e * expert_down_stride */
    int64_t expert_down_stride, expert_ld_down, expert_hidden;
} step_layer;

typedef struct {
    int64_t n_layers, dim, n_heads, n_kv_heads, head_dim, vocab, chunk, bf16;
    float norm_eps, attn_scale, floor_scale;
    const void* embedding; /* (V, D) */
    int64_t ld_embedding;
    const void* norm; /* (D) */
    const void* head; /* (V, D) */
    int64_t ld_head;
    const float* inv_freq; /* (Dh / 2) float32 */
    const step_layer* layers;
} step_model;

/* Working memory of one step. */
typedef struct {
    float *x, *xn, *qkv, *att, *y, *ffn, *gu, *act, *rows, *cos, *sin, *scores;
    void *q, *out;  /* the attention half's rows in the weights' dtype (bf16: copies; else qkv, att) */
    uint8_t* mask;
    int64_t *order, *token, *count; /* experts in order of first choice, rows of one expert, keys per row */
} step_work;

/* a[i] as stored in the model's dtype, for n values (bf16: rounded; float32: as they are). */
static void round_as(float* a, int64_t n, const int bf16) {
    if (bf16)
        for (int64_t i = 0; i < n; i++) a[i] = as_stored(a[i], 1);
}

static void step_norm(const step_model* m, const float* x, const void* w, float* y, int64_t B) {
    if (m->bf16)
        norm_rows(x, m->dim, 0, w, 1, y, 0, 1, B, m->dim, m->norm_eps);
    else
        norm_rows(x, m->dim, 0, w, 0, y, 0, 0, B, m->dim, m->norm_eps);
}

/* Attention half of layer L on rows x (B, D): x += o(attention(norm(x))), k and v stored. */
static void step_attention(const step_model* m, const step_layer* L, step_work* w, const int64_t* slots,
                           const int64_t* pos, int64_t B, int threads) {
    const int64_t D = m->dim, H = m->n_heads, K = m->n_kv_heads, Dh = m->head_dim, QKV = (H + 2 * K) * Dh;
    const int bf16 = (int)m->bf16, size = bf16 ? 2 : 4;
    step_norm(m, w->x, L->attention_norm, w->xn, B);
    product(w->xn, D, L->qkv, L->ld_qkv, bf16, w->qkv, B, QKV, D, threads);
    if (bf16)
        for (int64_t i = 0; i < B * QKV; i++) store(w->q, i, w->qkv[i], 1);
    int64_t S = 0, same = 1;
    for (int64_t b = 0; b < B; b++) {
        char* row = (char*)w->q + b * QKV * size; /* q (H heads), k (K heads), v (K heads) */
        if (!L->is_global) /* queries and keys rotate together, as in the model */
            rope_rows(row, bf16, 1, QKV, H + K, Dh, Dh, w->cos + b * Dh / 2, w->sin + b * Dh / 2,
                      L->qk_norm ? m->norm_eps : -1.f);
        if (L->temperature_tuning) {
            const float scale = 1.f + m->attn_scale * log1pf(floorf(((float)pos[b] + 1.f) / m->floor_scale));
            for (int64_t i = 0; i < H * Dh; i++) store(row, i, w_at(row, i, bf16) * scale, bf16);
        }
        const int64_t at = L->is_global ? pos[b] : pos[b] % m->chunk; /* where the cache keeps it */
        for (int64_t kh = 0; kh < K; kh++) {
            const int64_t to = ((slots[b] * K + kh) * L->capacity + at) * Dh * size;
            memcpy((char*)L->k_cache + to, row + (H + kh) * Dh * size, size * Dh);
            memcpy((char*)L->v_cache + to, row + (H + K + kh) * Dh * size, size * Dh);
        }
        w->count[b] = at + 1; /* keys row b attends to */
        if (b && w->count[b] != S) same = 0;
        if (w->count[b] > S) S = w->count[b];
    }
    if (!same) /* rows of different lengths: each attends to its own */
        for (int64_t b = 0; b < B; b++)
            for (int64_t s = 0; s < S; s++) w->mask[b * S + s] = s < w->count[b];
    attention_args a = {w->q, L->k_cache, L->v_cache, QKV, Dh, K * L->capacity * Dh, L->capacity * Dh, Dh,
                        K * L->capacity * Dh, L->capacity * Dh, Dh, same ? NULL : w->mask, S, w->out, H, K, S,
                        Dh, (float)pow((double)Dh, -0.5), bf16, w->scores, slots};
    parallel(attention_chunk, &a, B * K, B * H * S * Dh >= 65536 ? threads : 1);
    if (bf16)
        for (int64_t i = 0; i < B * H * Dh; i++) w->att[i] = w_at(w->out, i, 1);
    product(w->att, H * Dh, L->o, L->ld_o, bf16, w->y, B, D, H * Dh, threads);
    for (int64_t i = 0; i < B * D; i++) w->x[i] = as_stored(w->x[i] + as_stored(w->y[i], bf16), bf16);
}

/* SwiGLU of n rows (D) with gate_up (2F, D) and down (D, F) into y (n, D), rounded as stored. */
static void step_swiglu(const step_model* m, step_work* w, const float* x, const void* gate_up, int64_t ld_gate_up,
                        const void* down, int64_t ld_down, int64_t F, float* y, int64_t n, int threads) {
    const int bf16 = (int)m->bf16;
    product(x, m->dim, gate_up, ld_gate_up, bf16, w->gu, n, 2 * F, m->dim, threads);
    round_as(w->gu, n * 2 * F, bf16);
    product_glu(w->gu, 2 * F, down, ld_down, bf16, y, w->act, n, m->dim, F, threads);
    round_as(y, n * m->dim, bf16);
}

/* Feed-forward half: x += ffn(norm(x)); an MoE layer's routing goes to logits (B, E), experts
 * and gates (B, k). */
static void step_ffn(const step_model* m, const step_layer* L, step_work* w, int64_t B, float* logits,
                     int64_t* experts, float* gates, int threads) {
    const int64_t D = m->dim, E = L->n_experts, k = L->top_k;
    const int bf16 = (int)m->bf16;
    step_norm(m, w->x, L->ffn_norm, w->xn, B);
    step_swiglu(m, w, w->xn, L->gate_up, L->ld_gate_up, L->down, L->ld_down, L->hidden, w->ffn, B, threads);
    if (E) {
        /* Router, in float32: top k of logits + bias (ties: the lower id), gates sigmoid(logit). */
        product(w->xn, D, L->router, L->ld_router, bf16, logits, B, E, D, threads);
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < k; j++) {
                int64_t best = -1;
                float top = 0.f;
                for (int64_t e = 0; e < E; e++) {
                    int taken = 0;
                    for (int64_t i = 0; i < j; i++) taken |= experts[b * k + i] == e;
                    const float v = logits[b * E + e] + w_at(L->router_bias, e, (int)L->router_bias_bf16);
                    if (!taken && (best < 0 || v > top)) best = e, top = v;
                }
                experts[b * k + j] = best;
                gates[b * k + j] = 1.f / (1.f + expf(-logits[b * E + best]));
            }
        /* Each chosen expert once, on all its rows (experts in order of first choice, rows in
         * order: the model's grouping, so every row sums its experts in the model's order). */
        int64_t n_order = 0;
        for (int64_t i = 0; i < B * k; i++) {
            int64_t seen = 0;
            for (int64_t o = 0; o < n_order; o++) seen |= w->order[o] == experts[i];
            if (!seen) w->order[n_order++] = experts[i];
        }
        for (int64_t o = 0; o < n_order; o++) {
            const int64_t e = w->order[o];
            int64_t n = 0;
            for (int64_t i = 0; i < B * k; i++)
                if (experts[i] == e) { /* the gate multiplies the row before the expert */
                    const float g = as_stored(gates[i], bf16);
                    for (int64_t d = 0; d < D; d++) w->rows[n * D + d] = as_stored(w->xn[i / k * D + d] * g, bf16);
                    w->token[n++] = i / k;
                }
            step_swiglu(m, w, w->rows, (const char*)L->expert_gate_up + e * L->expert_gate_up_stride * (bf16 ? 2 : 4),
                        L->expert_ld_gate_up, (const char*)L->expert_down + e * L->expert_down_stride * (bf16 ? 2 : 4),
                        L->expert_ld_down, L->expert_hidden, w->y, n, threads);
            for (int64_t r = 0; r < n; r++) {
                float* f = w->ffn + w->token[r] * D;
                for (int64_t d = 0; d < D; d++) f[d] = as_stored(f[d] + w->y[r * D + d], bf16);
            }
        }
    }
    for (int64_t i = 0; i < B * D; i++) w->x[i] = as_stored(w->x[i] + w->ffn[i], bf16);
}

/* logits (B, V) for tokens (B) appended to cache slots `slots` at positions `pos` (each below its
 * layer's capacity; the caller checks). Routing of the MoE layers, in layer order: router_logits
 * (B, E), experts (B, k) and gates (B, k) each. Returns 0, or -1 when out of memory. */
int64_t llama4_decode_step(const step_model* m, const int64_t* tokens, const int64_t* slots, const int64_t* pos,
                           int64_t B, float* logits, float* router_logits, int64_t* experts, float* gates,
                           int threads) {
    const int64_t D = m->dim, H = m->n_heads, K = m->n_kv_heads, Dh = m->head_dim;
    const int bf16 = (int)m->bf16;
    int64_t F = 1, S = 1, k = 1;
    for (int64_t l = 0; l < m->n_layers; l++) {
        const step_layer* L = &m->layers[l];
        if (L->hidden > F) F = L->hidden;
        if (L->n_experts && L->expert_hidden > F) F = L->expert_hidden;
        if (L->n_experts && L->top_k > k) k = L->top_k;
        if (L->capacity > S) S = L->capacity;
    }
    /* Float arrays, then (bf16) the attention half's rows, each part 64 bytes aligned within. */
    const int64_t sizes[14] = {B * D,     B * D,          B * (H + 2 * K) * Dh, B * H * Dh, B * D,
                               B * D,     B * 2 * F,      B * F,                B * D,      B * Dh / 2,
                               B * Dh / 2, B * H * (S + 2 * Dh), bf16 ? (B * (H + 2 * K) * Dh + 1) / 2 : 0,
                               bf16 ? (B * H * Dh + 1) / 2 : 0};
    int64_t floats = 0;
    for (int i = 0; i < 14; i++) floats += (sizes[i] + 15) / 16 * 16;
    float* mem = malloc(sizeof(float) * floats + sizeof(int64_t) * B * (2 * k + 1) + B * S);
    if (!mem) return -1;
    step_work w;
    float *q16, *out16;
    float** parts[14] = {&w.x,   &w.xn,  &w.qkv, &w.att, &w.y,   &w.ffn, &w.gu,
                         &w.act, &w.rows, &w.cos, &w.sin, &w.scores, &q16, &out16};
    float* at = mem;
    for (int i = 0; i < 14; i++) {
        *parts[i] = at;
        at += (sizes[i] + 15) / 16 * 16;
    }
    w.q = bf16 ? (void*)q16 : (void*)w.qkv;
    w.out = bf16 ? (void*)out16 : (void*)w.att;
    w.order = (int64_t*)at;            /* B k */
    w.token = w.order + B * k;         /* B k */
    w.count = w.token + B * k;         /* B */
    w.mask = (uint8_t*)(w.count + B);  /* B S */

    for (int64_t b = 0; b < B; b++) {
        for (int64_t i = 0; i < D; i++) w.x[b * D + i] = w_at(m->embedding, tokens[b] * m->ld_embedding + i, bf16);
        for (int64_t i = 0; i < Dh / 2; i++) { /* RoPE angles, as rope_cos_sin computes them */
            const float angle = (float)pos[b] * m->inv_freq[i];
            w.cos[b * Dh / 2 + i] = cosf(angle);
            w.sin[b * Dh / 2 + i] = sinf(angle);
        }
    }
    for (int64_t l = 0; l < m->n_layers; l++) {
        const step_layer* L = &m->layers[l];
        step_attention(m, L, &w, slots, pos, B, threads);
        step_ffn(m, L, &w, B, router_logits, experts, gates, threads);
        if (L->n_experts) {
            router_logits += B * L->n_experts;
            experts += B * L->top_k;
            gates += B * L->top_k;
        }
    }
    step_norm(m, w.x, m->norm, w.xn, B);
    product(w.xn, D, m->head, m->ld_head, bf16, logits, B, m->vocab, D, threads);
    round_as(logits, B * m->vocab, bf16);
    free(mem);
    return 0;
}
