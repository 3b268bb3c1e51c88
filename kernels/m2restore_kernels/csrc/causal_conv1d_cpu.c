/* Decode steps of the depthwise causal conv (causal_conv1d's causal_conv1d_update) on the CPU.
 *
 * Compiled on first use by kernels/_native.py and called through ctypes (signatures in
 * kernels/causal_conv1d/native_impl.py). Every tensor is float32, addressed by element strides:
 *   x, out (b, d, l); conv_state (slots, d, S); weight (d, w); bias (d)
 *   seqlens (b,) int64 or NULL: conv_state is a ring buffer whose next write is at seqlens % S
 *     (else its last S columns are the latest inputs, shifted left by l);
 *   idx (b,) int64 or NULL: the conv_state row of each batch row, negative for padding (out zero,
 *     nothing written).
 * Blocks of channels of one batch row run in parallel; every output is computed before the cache
 * is written, so the window reads the inputs cached before this call. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <omp.h>

typedef struct {
    int64_t b, d, l, w, S;
    int64_t s_x[3], s_out[3], s_state[3], s_w[2], s_bias;
    int64_t has_bias, silu, has_seqlens, has_idx; /* int64 like the rest: Python passes one int64 array */
} conv_update_shape;

static inline int64_t wrap(int64_t i, int64_t S) {
    const int64_t r = i % S;
    return r < 0 ? r + S : r;
}

/* Channels per task. Every loop runs over a task's channels, which the compiler vectorises (the
 * width and the step count are a handful each: loops over them would cost their own setup per channel). */
#define CONV_BLOCK 64

void conv_update(const conv_update_shape *s, int threads, const float *x, float *state, const float *weight,
                 const float *bias, const int64_t *seqlens, const int64_t *idx, float *out) {
    const int64_t w = s->w, l = s->l, S = s->S, d = s->d, blocks = (d + CONV_BLOCK - 1) / CONV_BLOCK;
    const int64_t sx1 = s->s_x[1], sx2 = s->s_x[2], so1 = s->s_out[1], so2 = s->s_out[2];
    const int64_t ss1 = s->s_state[1], sc = s->s_state[2], sw0 = s->s_w[0], sw1 = s->s_w[1];
    /* Tasks (batch row, block of channels): one division per task, none per channel. */
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t task = 0; task < s->b * blocks; task++) {
        const int64_t bi = task / blocks, c0 = task % blocks * CONV_BLOCK;
        const int64_t nc = d - c0 < CONV_BLOCK ? d - c0 : CONV_BLOCK;
        float *ob = out + bi * s->s_out[0] + c0 * so1;
        const int64_t slot = s->has_idx ? idx[bi] : bi;
        if (slot < 0) {
            for (int64_t t = 0; t < l; t++)
                for (int64_t c = 0; c < nc; c++)
                    ob[c * so1 + t * so2] = 0.0f;
            continue;
        }
        const float *xb = x + bi * s->s_x[0] + c0 * sx1, *wb = weight + c0 * sw0;
        float *sb = state + slot * s->s_state[0] + c0 * ss1;
        const int64_t start = s->has_seqlens ? seqlens[bi] : 0;
        /* Every output first: the window reads the cache as it was before this call. */
        for (int64_t t = 0; t < l; t++) {
            float acc[CONV_BLOCK] = {0};
            for (int64_t k = 0; k < w; k++) {
                /* Tap k of output t: window position t + k, whose first w - 1 are the cached inputs. */
                const int64_t j = t + k, past = j < w - 1;
                const int64_t col = s->has_seqlens ? wrap(start - (w - 1) + j, S) : S - (w - 1) + j;
                const float *src = past ? sb + col * sc : xb + (j - (w - 1)) * sx2;
                const int64_t step = past ? ss1 : sx1;
                const float *wk = wb + k * sw1;
#pragma omp simd
                for (int64_t c = 0; c < nc; c++)
                    acc[c] += wk[c * sw0] * src[c * step];
            }
            float *ot = ob + t * so2;
            const float *bb = s->has_bias ? bias + c0 * s->s_bias : NULL;
#pragma omp simd
            for (int64_t c = 0; c < nc; c++) {
                const float v = s->has_bias ? acc[c] + bb[c * s->s_bias] : acc[c];
                ot[c * so1] = s->silu ? v / (1.0f + expf(-v)) : v;
            }
        }
        if (s->has_seqlens) {
            for (int64_t t = 0; t < l; t++) {
                float *dst = sb + wrap(start + t, S) * sc;
#pragma omp simd
                for (int64_t c = 0; c < nc; c++)
                    dst[c * ss1] = xb[c * sx1 + t * sx2];
            }
        } else { /* the last S of [state, x]: column i takes column i + l (read before it is written) */
            for (int64_t i = 0; i < S; i++) {
                float *dst = sb + i * sc;
                if (i + l < S) {
                    const float *from = sb + (i + l) * sc;
#pragma omp simd
                    for (int64_t c = 0; c < nc; c++)
                        dst[c * ss1] = from[c * ss1];
                } else {
                    const float *from = xb + (i + l - S) * sx2;
#pragma omp simd
                    for (int64_t c = 0; c < nc; c++)
                        dst[c * ss1] = from[c * sx1];
                }
            }
        }
    }
}
