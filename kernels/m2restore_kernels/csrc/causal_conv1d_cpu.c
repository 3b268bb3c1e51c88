/* Decode steps of the depthwise causal conv (causal_conv1d's causal_conv1d_update) on the CPU.
 *
 * Compiled on first use by kernels/_native.py and called through ctypes (signatures in
 * kernels/causal_conv1d/native_impl.py). Every tensor is float32, addressed by element strides:
 *   x, out (b, d, l); conv_state (slots, d, S); weight (d, w); bias (d)
 *   seqlens (b,) int64 or NULL: conv_state is a ring buffer whose next write is at seqlens % S
 *     (else its last S columns are the latest inputs, shifted left by l);
 *   idx (b,) int64 or NULL: the conv_state row of each batch row, negative for padding (out zero,
 *     nothing written).
 * Rows (batch, channel) run in parallel; each builds its window of w - 1 past inputs and the l new
 * ones in a stack buffer (the caller keeps w - 1 + l <= CONV_WINDOW_MAX). */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#define CONV_WINDOW_MAX 4096

typedef struct {
    int64_t b, d, l, w, S;
    int64_t s_x[3], s_out[3], s_state[3], s_w[2], s_bias;
    int64_t has_bias, silu, has_seqlens, has_idx; /* int64 like the rest: Python passes one int64 array */
} conv_update_shape;

static inline int64_t wrap(int64_t i, int64_t S) {
    const int64_t r = i % S;
    return r < 0 ? r + S : r;
}

void conv_update(const conv_update_shape *s, int threads, const float *x, float *state, const float *weight,
                 const float *bias, const int64_t *seqlens, const int64_t *idx, float *out) {
    const int64_t w = s->w, l = s->l, S = s->S;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < s->b * s->d; r++) {
        const int64_t bi = r / s->d, c = r % s->d;
        const float *xr = x + bi * s->s_x[0] + c * s->s_x[1];
        float *o = out + bi * s->s_out[0] + c * s->s_out[1];
        const int64_t slot = s->has_idx ? idx[bi] : bi;
        if (slot < 0) {
            for (int64_t t = 0; t < l; t++)
                o[t * s->s_out[2]] = 0.0f;
            continue;
        }
        float *cs = state + slot * s->s_state[0] + c * s->s_state[1];
        const int64_t sc = s->s_state[2];
        float win[CONV_WINDOW_MAX];
        for (int64_t j = 0; j < w - 1; j++) /* the w - 1 inputs before the first new one */
            win[j] = s->has_seqlens ? cs[wrap(seqlens[bi] - (w - 1) + j, S) * sc] : cs[(S - (w - 1) + j) * sc];
        for (int64_t t = 0; t < l; t++)
            win[w - 1 + t] = xr[t * s->s_x[2]];
        const float *wt = weight + c * s->s_w[0];
        const float b0 = s->has_bias ? bias[c * s->s_bias] : 0.0f;
        for (int64_t t = 0; t < l; t++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < w; k++)
                acc += wt[k * s->s_w[1]] * win[t + k];
            acc += b0;
            o[t * s->s_out[2]] = s->silu ? acc / (1.0f + expf(-acc)) : acc;
        }
        if (s->has_seqlens) {
            for (int64_t t = 0; t < l; t++)
                cs[wrap(seqlens[bi] + t, S) * sc] = win[w - 1 + t];
        } else { /* the last S of [state, x]: column i takes column i + l (read before it is written) */
            for (int64_t i = 0; i < S; i++)
                cs[i * sc] = i + l < S ? cs[(i + l) * sc] : win[w - 1 + i + l - S];
        }
    }
}
