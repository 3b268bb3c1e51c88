/* The MoE's CPU loops that PyTorch runs poorly: top-K routing and the K-way combination of
 * moe_mlp's expert outputs, each one pass over the rows.
 *
 * Built and loaded like selective_scan_cpu.c (kernels/_native.py); the C signatures are declared
 * in kernels/moe/native_impl.py. float32, contiguous:
 *   logits : (P, N);  w : (P, K) gate weights;  idx : (P, K) int64 expert indices
 *   out : (K, P, C) expert outputs, row k*P + p;  y, dy : (P, C);  dout : (K, P, C);  dw : (P, K)
 * Combination, lse = 0: y = sum_k w_k o_k.  lse = 1: y = log sum_k w_k exp(o_k), as a
 * log-sum-exp of o_k + log w_k (stable for any o). The same formulas as _combine_rows in
 * kernels/moe/triton_impl.py; here the point is that expf/logf vectorise (libmvec), where PyTorch's CPU
 * log/logaddexp run scalar, and that a (P, 6) top-2 costs PyTorch ~4 ms of small-op overhead.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* log w, with a zero weight (a softmax that underflowed) as the most negative finite float: the
 * library is built with -ffast-math, which assumes no infinities. */
static inline float log_weight(float w) { return w > 0.0f ? logf(w) : -FLT_MAX; }

/* The routing order as an integer key, so -ffast-math (which assumes no NaN or infinity) cannot
 * reorder or drop a comparison: keys compare as the floats do, with -0.0 equal to 0.0 and every NaN
 * (either sign) above +inf, the order of torch.sort. */
static inline int32_t order_key(float x) {
    int32_t b;
    memcpy(&b, &x, sizeof b);
    const int32_t mag = b & 0x7fffffff;
    if (mag > 0x7f800000)
        return INT32_MAX; /* NaN */
    if (mag == 0)
        return 0; /* -0.0 */
    return b >= 0 ? b : b ^ 0x7fffffff;
}

static inline int nonfinite(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return (b & 0x7f800000u) == 0x7f800000u;
}

static inline float quiet_nan(void) {
    const uint32_t b = 0x7fc00000u;
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
}

/* Top-K routing. Column j of a row goes to slot rank_j = #{i : key_i > key_j, or key_i == key_j
 * and i < j} when rank_j < K: the K largest, sorted descending, ties to the lower index -- what K
 * rounds of "take the first largest" (the Triton kernel) give. The keys are totally ordered, so the
 * ranks are a permutation of 0..N-1 and each slot is claimed by exactly one column. Then the
 * softmax of the kept logits (slot 0 holds their max), as torch.softmax computes it: a NaN or +inf
 * in slot 0 (they rank highest) or a -inf there (all kept logits are -inf) makes every weight NaN;
 * a kept -inf below a finite max gets weight 0. Everything runs on a transposed block of rows with
 * the row innermost, so every loop vectorises (fixed-size arrays: GCC does not vectorise over
 * variable-length ones) and nothing branches on a comparison that random logits make
 * unpredictable (a selection loop per row was ten times slower, bench/RESULTS.md). */
#define TOPK_ROWS 64
#define TOPK_MAX_N 64 /* the caller checks N <= TOPK_MAX_N (moe/native_impl.py) */
void topk_softmax_fwd(int64_t P, int64_t N, int64_t K, int threads, const float *logits, float *w, int64_t *idx) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p0 = 0; p0 < P; p0 += TOPK_ROWS) {
        const int rows = P - p0 < TOPK_ROWS ? (int)(P - p0) : TOPK_ROWS;
        float v[TOPK_MAX_N][TOPK_ROWS], kv[TOPK_MAX_N][TOPK_ROWS], top[TOPK_ROWS], sum[TOPK_ROWS];
        int32_t key[TOPK_MAX_N][TOPK_ROWS];
        int rank[TOPK_MAX_N][TOPK_ROWS], kc[TOPK_MAX_N][TOPK_ROWS], bad[TOPK_ROWS];
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < N; j++) {
                v[j][r] = logits[(p0 + r) * N + j];
                key[j][r] = order_key(v[j][r]);
            }
        for (int j = 0; j < N; j++) {
            for (int r = 0; r < rows; r++)
                rank[j][r] = 0;
            for (int i = 0; i < N; i++) {
                if (i < j) {
                    for (int r = 0; r < rows; r++)
                        rank[j][r] += key[i][r] >= key[j][r];
                } else {
                    for (int r = 0; r < rows; r++)
                        rank[j][r] += key[i][r] > key[j][r];
                }
            }
        }
        /* Zeros only give the selects below a defined first operand: every slot is claimed. */
        for (int k = 0; k < K; k++)
            for (int r = 0; r < rows; r++) {
                kv[k][r] = 0.0f;
                kc[k][r] = 0;
            }
        for (int k = 0; k < K; k++)
            for (int j = 0; j < N; j++)
                for (int r = 0; r < rows; r++) {
                    const int hit = rank[j][r] == k;
                    kv[k][r] = hit ? v[j][r] : kv[k][r];
                    kc[k][r] = hit ? j : kc[k][r];
                }
        for (int r = 0; r < rows; r++) {
            bad[r] = nonfinite(kv[0][r]);
            top[r] = bad[r] ? 0.0f : kv[0][r];
            sum[r] = 0.0f;
        }
        for (int k = 0; k < K; k++)
            for (int r = 0; r < rows; r++) {
                /* Only -inf can be non-finite below a finite max; exp gives it 0 without computing
                 * on an infinity. Rows already spoilt compute on zeros and are overwritten below. */
                const int gone = nonfinite(kv[k][r]);
                kv[k][r] = gone ? 0.0f : expf(kv[k][r] - top[r]);
                sum[r] += kv[k][r];
            }
        for (int r = 0; r < rows; r++)
            for (int k = 0; k < K; k++) {
                w[(p0 + r) * K + k] = bad[r] ? quiet_nan() : kv[k][r] / sum[r];
                idx[(p0 + r) * K + k] = kc[k][r];
            }
    }
}

static void combine_row(int64_t P, int64_t C, int64_t K, int lse, const float *out, const float *w, int64_t p,
                        float *y) {
    const float *o0 = out + p * C;
    if (!lse) {
        const float w0 = w[p * K];
#pragma omp simd
        for (int64_t c = 0; c < C; c++)
            y[c] = w0 * o0[c];
        for (int64_t k = 1; k < K; k++) {
            const float *ok = out + (k * P + p) * C, wk = w[p * K + k];
#pragma omp simd
            for (int64_t c = 0; c < C; c++)
                y[c] += wk * ok[c];
        }
        return;
    }
    /* y holds the running max m of t_k = o_k + log w_k, then m + log sum_k w_k exp(o_k - m).
     * Whole-row passes, each a plain loop over c that the compiler vectorises (expf/logf too). */
    float s[C > 0 ? C : 1];
    for (int64_t k = 0; k < K; k++) {
        const float *ok = out + (k * P + p) * C, lw = log_weight(w[p * K + k]);
        if (k == 0) {
#pragma omp simd
            for (int64_t c = 0; c < C; c++)
                y[c] = ok[c] + lw;
        } else {
#pragma omp simd
            for (int64_t c = 0; c < C; c++)
                y[c] = fmaxf(y[c], ok[c] + lw);
        }
    }
#pragma omp simd
    for (int64_t c = 0; c < C; c++)
        s[c] = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const float *ok = out + (k * P + p) * C, wk = w[p * K + k];
#pragma omp simd
        for (int64_t c = 0; c < C; c++)
            s[c] += wk * expf(ok[c] - y[c]);
    }
#pragma omp simd
    for (int64_t c = 0; c < C; c++)
        y[c] += logf(s[c]);
}

void combine_fwd(int64_t P, int64_t C, int64_t K, int lse, int threads, const float *out, const float *w,
                 float *y) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < P; p++)
        combine_row(P, C, K, lse, out, w, p, y + p * C);
}

/* dout[k, p] = dy * w_k * (lse ? exp(o_k - y) : 1);  dw[p, k] = sum_c dy * (lse ? exp(o_k - y) : o_k). */
void combine_bwd(int64_t P, int64_t C, int64_t K, int lse, int threads, const float *dy, const float *out,
                 const float *w, float *dout, float *dw) {
#pragma omp parallel num_threads(threads)
    {
        float y[C > 0 ? C : 1];
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++) {
            const float *g = dy + p * C;
            if (lse)
                combine_row(P, C, K, lse, out, w, p, y);
            for (int64_t k = 0; k < K; k++) {
                const float *ok = out + (k * P + p) * C, wk = w[p * K + k];
                float *dk = dout + (k * P + p) * C;
                float acc = 0.0f;
                if (lse) {
#pragma omp simd reduction(+ : acc)
                    for (int64_t c = 0; c < C; c++) {
                        const float share = g[c] * expf(ok[c] - y[c]);
                        dk[c] = wk * share;
                        acc += share;
                    }
                } else {
#pragma omp simd reduction(+ : acc)
                    for (int64_t c = 0; c < C; c++) {
                        dk[c] = wk * g[c];
                        acc += g[c] * ok[c];
                    }
                }
                dw[p * K + k] = acc;
            }
        }
    }
}
