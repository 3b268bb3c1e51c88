/* Selective scan on the CPU: the recurrence of kernels/selective_scan/ as one fused loop.
 *
 * Compiled on first use by kernels/_native.py (cc -O3 -march=native -ffast-math -fopenmp) and
 * called through ctypes (signatures in kernels/selective_scan/native_impl.py); no Python or torch
 * headers. Every tensor is float32 and contiguous:
 *   u, delta, z, out, du, ddelta, dz, dout : (b, d, l)
 *   A : (d, n);  D, bias : (d)
 *   Bt, Ct : the n states of one step adjacent (one vector), rows addressed by the strides of
 *            scan_shape: time-varying (b, g, l, n) contiguous, or time-invariant (d, n) as g = d
 *            groups with batch and time strides 0
 *   last, dlast : (b, d, n);  ckpt : (b, nck, d, n), the state before each chunk's first step
 * Channels run in parallel (OpenMP); each keeps its n states in registers and walks the sequence.
 * The backward recomputes a chunk's states from its checkpoint into a small buffer, then runs the
 * adjoint recurrence backwards over them. Gradients shared by channels (B, C) go to per-thread
 * partial buffers (threads, nB or nC elements laid out like Bt, Ct) that the caller sums, so results
 * do not depend on timing; a time-invariant B or C adds every step into its one row.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef struct {
    int64_t b, d, l, n, gB, gC, chunk, nck;
    int64_t sBb, sBg, sBt, sCb, sCg, sCt; /* element strides of Bt, Ct per batch, group, step */
    int64_t nB, nC;                       /* elements of Bt, Ct */
    int has_D, has_z, has_bias, softplus;
} scan_shape;

/* delta'_t = softplus(delta_t + bias) (or the sum as is) for a whole row, and, when slope is not
 * NULL, d delta'/d delta. A loop of its own so the compiler vectorises expf/logf over steps;
 * softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|), with log1p from logf by the classic
 * correction log(w) - ((w - 1) - e) / w, w = 1 + e (exact to float rounding for tiny e). */
static void row_delta(const float *delta, float bias, int64_t l, int softplus, float *dl, float *slope) {
    if (!softplus) {
#pragma omp simd
        for (int64_t t = 0; t < l; t++)
            dl[t] = delta[t] + bias;
        if (slope)
            for (int64_t t = 0; t < l; t++)
                slope[t] = 1.0f;
        return;
    }
#pragma omp simd
    for (int64_t t = 0; t < l; t++) {
        const float x = delta[t] + bias, e = expf(-fabsf(x)), w = 1.0f + e;
        dl[t] = fmaxf(x, 0.0f) + (logf(w) - ((w - 1.0f) - e) / w);
        if (slope)
            slope[t] = x >= 0.0f ? 1.0f / w : e / w; /* sigmoid(x) */
    }
}

/* Offset of the first step's row of B or C that channel ch of batch bi reads. */
static inline int64_t group_offset(int64_t g, int64_t sb, int64_t sg, const scan_shape *s, int64_t bi, int64_t ch) {
    return bi * sb + ch / (s->d / g) * sg;
}

void scan_fwd(const scan_shape *s, int threads, const float *u, const float *delta, const float *A,
              const float *Bt, const float *Ct, const float *D, const float *z, const float *bias,
              float *out, float *last, float *ckpt) {
    const int64_t d = s->d, l = s->l, n = s->n;
#pragma omp parallel num_threads(threads)
    {
        float *dl = malloc((size_t)(l > 0 ? l : 1) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t bd = 0; bd < s->b * d; bd++) {
            const int64_t bi = bd / d, ch = bd % d;
            const float *a_row = A + ch * n;
            const float *Bg = Bt + group_offset(s->gB, s->sBb, s->sBg, s, bi, ch);
            const float *Cg = Ct + group_offset(s->gC, s->sCb, s->sCg, s, bi, ch);
            const float *ur = u + bd * l;
            const float Dc = s->has_D ? D[ch] : 0.0f;
            float *restrict yr = out + bd * l;
            float h[n > 0 ? n : 1]; /* local, so nothing aliases it and it can live in registers */
            row_delta(delta + bd * l, s->has_bias ? bias[ch] : 0.0f, l, s->softplus, dl, NULL);
            memset(h, 0, n * sizeof(float));
            for (int64_t t = 0; t < l; t++) {
                if (t % s->chunk == 0)
                    memcpy(ckpt + ((bi * s->nck + t / s->chunk) * d + ch) * n, h, n * sizeof(float));
                const float dt = dl[t], du = dt * ur[t];
                const float *Bs = Bg + t * s->sBt, *Cs = Cg + t * s->sCt;
                float y = 0.0f;
#pragma omp simd reduction(+ : y)
                for (int64_t k = 0; k < n; k++) {
                    h[k] = expf(dt * a_row[k]) * h[k] + du * Bs[k];
                    y += h[k] * Cs[k];
                }
                yr[t] = y;
            }
            memcpy(last + bd * n, h, n * sizeof(float));
            if (s->has_z) {
                const float *zr = z + bd * l;
#pragma omp simd
                for (int64_t t = 0; t < l; t++)
                    yr[t] = (yr[t] + Dc * ur[t]) * (zr[t] / (1.0f + expf(-zr[t])));
            } else {
#pragma omp simd
                for (int64_t t = 0; t < l; t++)
                    yr[t] += Dc * ur[t];
            }
        }
        free(dl);
    }
}

void scan_bwd(const scan_shape *s, int threads, const float *u, const float *delta, const float *A,
              const float *Bt, const float *Ct, const float *D, const float *z, const float *bias,
              const float *ckpt, const float *dout, const float *dlast,
              float *du, float *ddelta, float *dz, float *dA_part, float *dD_part, float *dbias_part,
              float *dB_part, float *dC_part) {
    const int64_t d = s->d, l = s->l, n = s->n;
#pragma omp parallel num_threads(threads)
    {
        const int tid = omp_get_thread_num();
        float *H = malloc((size_t)(s->chunk + 1) * n * sizeof(float)); /* row 0: the chunk's entry state */
        float *dh = malloc((size_t)n * sizeof(float)), *dA = malloc((size_t)n * sizeof(float));
        float *dl = malloc((size_t)(l > 0 ? l : 1) * sizeof(float)), *slope = malloc((size_t)(l > 0 ? l : 1) * sizeof(float));
        float *dBt = dB_part + tid * s->nB, *dCt = dC_part + tid * s->nC;
#pragma omp for schedule(static)
        for (int64_t bd = 0; bd < s->b * d; bd++) {
            const int64_t bi = bd / d, ch = bd % d;
            const float *a_row = A + ch * n;
            const int64_t off_B = group_offset(s->gB, s->sBb, s->sBg, s, bi, ch);
            const int64_t off_C = group_offset(s->gC, s->sCb, s->sCg, s, bi, ch);
            const float *Bg = Bt + off_B, *Cg = Ct + off_C;
            float *dBg = dBt + off_B, *dCg = dCt + off_C;
            const float *ur = u + bd * l;
            const float Dc = s->has_D ? D[ch] : 0.0f;
            double dD_acc = 0.0, dbias_acc = 0.0;
            row_delta(delta + bd * l, s->has_bias ? bias[ch] : 0.0f, l, s->softplus, dl, slope);
            for (int64_t k = 0; k < n; k++) {
                dh[k] = dlast ? dlast[bd * n + k] : 0.0f;
                dA[k] = 0.0f;
            }
            for (int64_t c = s->nck - 1; c >= 0; c--) {
                const int64_t t0 = c * s->chunk, t1 = t0 + s->chunk < l ? t0 + s->chunk : l;
                memcpy(H, ckpt + ((bi * s->nck + c) * d + ch) * n, n * sizeof(float));
                for (int64_t t = t0; t < t1; t++) { /* recompute the chunk's states */
                    const float dt = dl[t], dus = dt * ur[t];
                    const float *Bs = Bg + t * s->sBt, *hp = H + (t - t0) * n;
                    float *hn = H + (t - t0 + 1) * n;
#pragma omp simd
                    for (int64_t k = 0; k < n; k++)
                        hn[k] = expf(dt * a_row[k]) * hp[k] + dus * Bs[k];
                }
                for (int64_t t = t1 - 1; t >= t0; t--) { /* adjoint, backwards in time */
                    const float dt = dl[t], ut = ur[t];
                    const float *Bs = Bg + t * s->sBt, *Cs = Cg + t * s->sCt;
                    const float *ht = H + (t - t0 + 1) * n, *hp = H + (t - t0) * n;
                    float *dBs = dBg + t * s->sBt, *dCs = dCg + t * s->sCt;
                    float gy = dout[bd * l + t];
                    if (s->has_z) {
                        float y = Dc * ut;
#pragma omp simd reduction(+ : y)
                        for (int64_t k = 0; k < n; k++)
                            y += ht[k] * Cs[k];
                        const float zt = z[bd * l + t], sz = 1.0f / (1.0f + expf(-zt));
                        dz[bd * l + t] = gy * y * sz * (1.0f + zt * (1.0f - sz));
                        gy *= zt * sz;
                    }
                    dD_acc += (double)gy * ut;
                    float ddl = 0.0f, dus = 0.0f;
#pragma omp simd reduction(+ : ddl, dus)
                    for (int64_t k = 0; k < n; k++) {
                        const float ak = expf(dt * a_row[k]);
                        dCs[k] += gy * ht[k];
                        const float g = dh[k] + gy * Cs[k]; /* d loss / d h_t */
                        const float decay = g * hp[k] * ak; /* d loss / d (dl A_k) */
                        dBs[k] += g * dt * ut;
                        dA[k] += decay * dt;
                        ddl += decay * a_row[k] + g * ut * Bs[k];
                        dus += g * Bs[k];
                        dh[k] = g * ak;
                    }
                    du[bd * l + t] = gy * Dc + dt * dus;
                    const float draw = ddl * slope[t];
                    ddelta[bd * l + t] = draw;
                    dbias_acc += draw;
                }
            }
            memcpy(dA_part + bd * n, dA, n * sizeof(float));
            dD_part[bd] = (float)dD_acc;
            dbias_part[bd] = (float)dbias_acc;
        }
        free(H);
        free(dh);
        free(dA);
        free(dl);
        free(slope);
    }
}

/* One decode step (mamba_ssm's selective_state_update), the state updated in place. Every tensor
 * is float32 and addressed by its element strides, in the multi-head form:
 *   state (slots, h, p, n); x, dt, z, out (b, h, p); A (h, p, n); B, C (b, g, n); D, bias (h, p)
 * (strides 0 broadcast, as Mamba-2's expanded A, or the single-head form's missing nheads axis).
 * idx (b,) int64 or NULL: the state row of each batch row, negative for padding (out zero, nothing
 * written). */
typedef struct {
    int64_t b, h, p, n, g;
    int64_t s_state[4], s_x[3], s_dt[3], s_z[3], s_out[3], s_A[3], s_B[3], s_C[3], s_D[2], s_bias[2];
    int64_t has_D, has_z, has_bias, has_idx, softplus; /* int64 like the rest: Python passes one int64 array */
} update_shape;

/* Channels per task of a step: a task's dt', outputs and gates are vectors on the stack, so the
 * softplus and the gate vectorise over channels (per channel, they would cost more than the n states). */
#define STEP_BLOCK 64

void state_update(const update_shape *s, int threads, float *state, const float *x, const float *dt,
                  const float *A, const float *B, const float *C, const float *D, const float *z,
                  const float *bias, const int64_t *idx, float *out) {
    const int64_t h = s->h, p = s->p, n = s->n, heads_per_group = h / s->g;
    const int64_t blocks = (p + STEP_BLOCK - 1) / STEP_BLOCK;
    const int64_t ss = s->s_state[3], sa = s->s_A[2], sb = s->s_B[2], sc = s->s_C[2];
    const int unit = ss == 1 && sa == 1 && sb == 1 && sc == 1; /* the usual layout: a loop that vectorises expf */
    /* Tasks (batch row, head, block of channels); one division per task, none per channel. */
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t task = 0; task < s->b * h * blocks; task++) {
        const int64_t bi = task / (h * blocks), hi = task / blocks % h, p0 = task % blocks * STEP_BLOCK;
        const int64_t np = p - p0 < STEP_BLOCK ? p - p0 : STEP_BLOCK, gi = hi / heads_per_group;
        float *o = out + bi * s->s_out[0] + hi * s->s_out[1] + p0 * s->s_out[2];
        const int64_t so = s->s_out[2], slot = s->has_idx ? idx[bi] : bi;
        if (slot < 0) {
            for (int64_t k = 0; k < np; k++)
                o[k * so] = 0.0f;
            continue;
        }
        float raw[STEP_BLOCK], dl[STEP_BLOCK], y[STEP_BLOCK];
        const float *dtr = dt + bi * s->s_dt[0] + hi * s->s_dt[1] + p0 * s->s_dt[2];
        const int64_t sdt = s->s_dt[2];
        if (s->has_bias) {
            const float *br = bias + hi * s->s_bias[0] + p0 * s->s_bias[1];
            const int64_t sbias = s->s_bias[1];
            for (int64_t k = 0; k < np; k++)
                raw[k] = dtr[k * sdt] + br[k * sbias];
        } else {
            for (int64_t k = 0; k < np; k++)
                raw[k] = dtr[k * sdt];
        }
        row_delta(raw, 0.0f, np, (int)s->softplus, dl, NULL);
        const float *xr = x + bi * s->s_x[0] + hi * s->s_x[1] + p0 * s->s_x[2];
        const float *bb = B + bi * s->s_B[0] + gi * s->s_B[1], *cc = C + bi * s->s_C[0] + gi * s->s_C[1];
        for (int64_t k = 0; k < np; k++) {
            const float xv = xr[k * s->s_x[2]], dx = dl[k] * xv, dk = dl[k];
            float *st = state + slot * s->s_state[0] + hi * s->s_state[1] + (p0 + k) * s->s_state[2];
            const float *a = A + hi * s->s_A[0] + (p0 + k) * s->s_A[1];
            float acc = 0.0f;
            if (unit) {
#pragma omp simd reduction(+ : acc)
                for (int64_t j = 0; j < n; j++) {
                    const float v = expf(dk * a[j]) * st[j] + dx * bb[j];
                    st[j] = v;
                    acc += v * cc[j];
                }
            } else {
                for (int64_t j = 0; j < n; j++) {
                    const float v = expf(dk * a[j * sa]) * st[j * ss] + dx * bb[j * sb];
                    st[j * ss] = v;
                    acc += v * cc[j * sc];
                }
            }
            y[k] = s->has_D ? acc + xv * D[hi * s->s_D[0] + (p0 + k) * s->s_D[1]] : acc;
        }
        if (s->has_z) {
            const float *zr = z + bi * s->s_z[0] + hi * s->s_z[1] + p0 * s->s_z[2];
            const int64_t sz = s->s_z[2];
#pragma omp simd
            for (int64_t k = 0; k < np; k++)
                y[k] *= zr[k * sz] / (1.0f + expf(-zr[k * sz]));
        }
        for (int64_t k = 0; k < np; k++)
            o[k * so] = y[k];
    }
}
