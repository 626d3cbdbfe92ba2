/* B = sign(W) * magnitude in one read of W and one write of B, with ||B||^2 and ||W||^2 on the way.
 *
 * The per-step work of the sign-concordant rules on a CPU (usf: magnitude 1; frsf: a fixed
 * magnitude tensor; brsf: fresh 16-bit levels (2k + 1) * step from the draw's SplitMix64 words,
 * draws.py's stream). In PyTorch operations it takes a dozen passes over weight-sized tensors;
 * here both cores draw and write at once. fa_random_words gives the words alone (wm's noise).
 *
 * Every value equals the PyTorch path's to the bit: torch.sign gives 0 for 0, -0 and NaN, and
 * (s * m) * step == s * (m * step) for s = +-1. The squared norms are summed in float over 256
 * entries, then in double per block of 65536 entries, then over the blocks in order: the same
 * result whatever the number of threads. No fused multiply-add (-ffp-contract=off), so the AVX2
 * and the baseline clones agree too.
 *
 * Built by native.py with the system C compiler on first use; linked against the libgomp that
 * torch has loaded, so that these parallel regions use torch's own OpenMP threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(FA_BASELINE_ONLY)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

enum {
    BLOCK = 1 << 16, /* entries per partial sum, and the unit of work split between threads */
    SUB = 1 << 12,   /* entries whose magnitudes are made at a time (stays in L1) */
    GROUP = 256,     /* entries summed in float before a double accumulator takes them */
};

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint64_t v2u64 __attribute__((vector_size(16)));

/* SplitMix64 (Steele, Lea & Flood 2014): word i of the draw keyed k is mix64(k + (i + 1) * GAMMA),
 * a function of its position alone, so any thread makes any part of a draw (draws.py). */
static const uint64_t GAMMA = 0x9E3779B97F4A7C15ull;

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The next word of a draw: `counter` holds k + i * GAMMA for the word i made last. */
static inline uint64_t next_word(uint64_t *counter) {
    *counter += GAMMA;
    return mix64(*counter);
}

enum magnitude_kind { ONES, ARRAY, LEVELS };

/* out = sign(w) * magnitude for `len` entries, adding sum(out^2) and sum(w^2) to sums[0], sums[1].
 * The magnitude is 1 (ONES), magnitude[j] (ARRAY), or (2k + 1) * step with k the next 16-bit
 * level of the draw whose word counter is `state` (LEVELS: one word is four levels, in memory
 * order; the words are made in the same loop as the rest). */
static inline __attribute__((always_inline)) void
signed_product(enum magnitude_kind kind, const float *restrict w, const float *restrict magnitude,
               uint64_t *state, float step, float *restrict out, int64_t len, double *sums) {
    const v8i sign_bit = (v8i){0} + INT32_MIN;
    for (int64_t group = 0; group < len; group += GROUP) {
        const int64_t end = group + GROUP < len ? group + GROUP : len;
        const int64_t vector_end = end - (end - group) % 8;
        v8f out_squares = {0}, w_squares = {0};
        for (int64_t j = group; j < vector_end; j += 8) {
            v8f x, m = (v8f){0} + 1.0f;
            memcpy(&x, w + j, sizeof x);
            if (kind == ARRAY) {
                memcpy(&m, magnitude + j, sizeof m);
            } else if (kind == LEVELS) {
                /* Two words into one register, not through memory: a 16-byte load of two 8-byte
                 * stores just made stalls (no store forwarding), which doubled the time. */
                const uint64_t first = next_word(state);
                const v8u16 k = (v8u16)(v2u64){first, next_word(state)};
                m = __builtin_convertvector(__builtin_convertvector(k, v8i) * 2 + 1, v8f) * step;
            }
            const v8i positive = x > 0, negative = x < 0;
            const v8f b = (v8f)(((v8i)m & positive) | (((v8i)m ^ sign_bit) & negative));
            memcpy(out + j, &b, sizeof b);
            out_squares += b * b;
            w_squares += x * x;
        }
        double out_sum = 0, w_sum = 0;
        for (int lane = 0; lane < 8; lane++) {
            out_sum += out_squares[lane];
            w_sum += w_squares[lane];
        }
        uint16_t levels[8];
        if (kind == LEVELS && vector_end < end) { /* the last 1-7 entries: one or two more words */
            for (int64_t word = 0; word < (end - vector_end + 3) / 4; word++) {
                const uint64_t next = next_word(state);
                memcpy(levels + 4 * word, &next, sizeof next);
            }
        }
        for (int64_t j = vector_end; j < end; j++) {
            const float m = kind == ARRAY ? magnitude[j]
                          : kind == LEVELS ? (float)(2 * (int32_t)levels[j - vector_end] + 1) * step : 1.0f;
            out[j] = w[j] > 0 ? m : (w[j] < 0 ? -m : 0.0f);
            out_sum += (double)out[j] * out[j];
            w_sum += (double)w[j] * w[j];
        }
        sums[0] += out_sum;
        sums[1] += w_sum;
    }
}

/* One compiled copy per kind (and per instruction set, on x86-64). */
CLONES static void signed_ones(const float *w, float *out, int64_t len, double *sums) {
    signed_product(ONES, w, NULL, NULL, 0, out, len, sums);
}
CLONES static void signed_array(const float *w, const float *magnitude, float *out, int64_t len, double *sums) {
    signed_product(ARRAY, w, magnitude, NULL, 0, out, len, sums);
}
CLONES static void signed_levels(const float *w, uint64_t *state, float step, float *out, int64_t len,
                                 double *sums) {
    signed_product(LEVELS, w, NULL, state, step, out, len, sums);
}

/* B = sign(W) * magnitude over n entries, the magnitude being `magnitude` (frsf), or the levels of
 * the draw keyed `key` (brsf, when `levels` is nonzero), or else 1 (usf). squared_norms =
 * (||B||^2, ||W||^2). Returns 0, or -1 when out of memory. */
int fa_signed_feedback(const float *weight, float *feedback, int64_t n, const float *magnitude,
                       int levels, uint64_t key, float step, double *squared_norms) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    double *block_sums = calloc(2 * (size_t)(blocks ? blocks : 1), sizeof *block_sums);
    if (block_sums == NULL) return -1;
#pragma omp parallel if (n >= 2 * BLOCK)
    {
        int threads = 1, thread = 0;
#ifdef _OPENMP
        threads = omp_get_num_threads();
        thread = omp_get_thread_num();
#endif
        const int64_t first = blocks * thread / threads, last = blocks * (thread + 1) / threads;
        for (int64_t b = first; b < last; b++) {
            const int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
            for (int64_t start = b * BLOCK; start < end; start += SUB) {
                const int64_t len = end - start < SUB ? end - start : SUB;
                double *sums = block_sums + 2 * b;
                if (magnitude != NULL) {
                    signed_array(weight + start, magnitude + start, feedback + start, len, sums);
                } else if (!levels) {
                    signed_ones(weight + start, feedback + start, len, sums);
                } else {
                    /* entry `start` (a multiple of 4) is the first level of word start / 4 */
                    uint64_t counter = key + (uint64_t)(start / 4) * GAMMA;
                    signed_levels(weight + start, &counter, step, feedback + start, len, sums);
                }
            }
        }
    }
    squared_norms[0] = squared_norms[1] = 0;
    for (int64_t b = 0; b < blocks; b++) {
        squared_norms[0] += block_sums[2 * b];
        squared_norms[1] += block_sums[2 * b + 1];
    }
    free(block_sums);
    return 0;
}

/* Words first, ..., first + count - 1 of the draw keyed `key`, on every thread. */
void fa_random_words(uint64_t key, int64_t first, int64_t count, uint64_t *out) {
#pragma omp parallel for schedule(static) if (count >= 2 * BLOCK)
    for (int64_t i = 0; i < count; i++) {
        out[i] = mix64(key + (uint64_t)(first + i + 1) * GAMMA);
    }
}
