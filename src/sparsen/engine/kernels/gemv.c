/* GEMV over the active input channels: the op that reads the weights, so the one that sets the speed. */
#include <omp.h>
#include <string.h>

#include "ops.h"

/* This thread's share of [0, n), in multiples of 16 floats (whole cache lines of y per thread). */
void sp_split(int n, int ith, int nth, int *lo, int *hi) {
    const int blocks = (n + 15) / 16;
    const int b0 = (int)((long)blocks * ith / nth), b1 = (int)((long)blocks * (ith + 1) / nth);
    *lo = b0 * 16 < n ? b0 * 16 : n;
    *hi = b1 * 16 < n ? b1 * 16 : n;
}

/* y[0:out] = sum over the active i of x[i] * W^T[i, :].
 * Eight rows per pass over y: y is loaded and stored once per eight weight rows streamed (with one or two rows
 * per pass the y traffic, not the weights, limited it to ~13 GB/s; eight reach ~20-27 GB/s here). */
#define AXPY_PASS(T, LOAD)                                                                                   \
    {                                                                                                        \
        const T *Wt = (const T *)w;                                                                          \
        int a = 0;                                                                                           \
        for (; a + 8 <= n_act; a += 8) {                                                                     \
            const T *restrict r0 = Wt + (size_t)act[a] * out, *restrict r1 = Wt + (size_t)act[a + 1] * out;   \
            const T *restrict r2 = Wt + (size_t)act[a + 2] * out, *restrict r3 = Wt + (size_t)act[a + 3] * out; \
            const T *restrict r4 = Wt + (size_t)act[a + 4] * out, *restrict r5 = Wt + (size_t)act[a + 5] * out; \
            const T *restrict r6 = Wt + (size_t)act[a + 6] * out, *restrict r7 = Wt + (size_t)act[a + 7] * out; \
            const float x0 = x[act[a]], x1 = x[act[a + 1]], x2 = x[act[a + 2]], x3 = x[act[a + 3]];            \
            const float x4 = x[act[a + 4]], x5 = x[act[a + 5]], x6 = x[act[a + 6]], x7 = x[act[a + 7]];        \
            _Pragma("omp simd") for (int j = 0; j < out; j++) y[j] +=                                         \
                x0 * LOAD(r0[j]) + x1 * LOAD(r1[j]) + x2 * LOAD(r2[j]) + x3 * LOAD(r3[j]) +                  \
                x4 * LOAD(r4[j]) + x5 * LOAD(r5[j]) + x6 * LOAD(r6[j]) + x7 * LOAD(r7[j]);                   \
        }                                                                                                    \
        for (; a < n_act; a++) {                                                                             \
            const float x0 = x[act[a]];                                                                      \
            const T *restrict r0 = Wt + (size_t)act[a] * out;                                                \
            _Pragma("omp simd") for (int j = 0; j < out; j++) y[j] += x0 * LOAD(r0[j]);                      \
        }                                                                                                    \
    }
#define AS_FLOAT(v) (v)

static void axpy_rows(const sp_weight *wt, int out, const float *x, const int *act, int n_act, float *restrict y) {
    SP_ASSERT(wt->stride == out);
    const void *w = wt->data;
    for (int j = 0; j < out; j++) y[j] = 0.f;
    if (wt->type == SP_W_BF16) AXPY_PASS(uint16_t, sp_bf16)
    else AXPY_PASS(float, AS_FLOAT)
}

/* The threads split the ACTIVE ROWS: each streams whole contiguous rows (sequential memory, which the prefetchers
 * like far better than every thread reading part of each row) into a full-width partial sum at part + ith*stride.
 * Quantized weights split at block boundaries (a block's scales applied once). */
void sp_gemv_partial(int ith, int nth, const sp_weight *w, int out, const float *x, const int *act, int n_act,
                     float *part, int stride) {
    SP_ASSERT(out >= 0 && out <= stride && n_act >= 0 && 0 <= ith && ith < nth);
    if (sp_q_transposed_type(w->type)) {
        SP_ASSERT(w->stride <= stride);
        const int a0 = sp_q_split(w, act, n_act, ith, nth), a1 = sp_q_split(w, act, n_act, ith + 1, nth);
        sp_q_axpy(w, out, x, act + a0, a1 - a0, part + (size_t)ith * stride);
        return;
    }
    const int a0 = (int)((long)n_act * ith / nth), a1 = (int)((long)n_act * (ith + 1) / nth);
    axpy_rows(w, out, x, act + a0, a1 - a0, part + (size_t)ith * stride);
}

/* y[lo:hi] = the sum of the nth partials, for this thread's split share [lo, hi) of the outputs. */
void sp_gemv_reduce(int ith, int nth, int out, const float *part, int stride, float *y) {
    SP_ASSERT(out <= stride);
    int lo, hi;
    sp_split(out, ith, nth, &lo, &hi);
    for (int j = lo; j < hi; j++) {
        float s = 0.f;
        for (int u = 0; u < nth; u++) s += part[(size_t)u * stride + j];
        y[j] = s;
    }
}

/* y[r] = dot(W[r, :], x) for the rows r listed in rows[r0:r1] (or r in [r0, r1) when rows is NULL). Four rows at
 * a time: one row's sum is a single chain of dependent FMAs (latency-bound, ~4x below the FMA throughput at d = 576),
 * four rows give four independent chains and read x once for them. */
void sp_dot_rows(const sp_weight *wt, int in, const float *restrict x, const int *rows, int r0, int r1,
                 float *restrict y) {
    SP_ASSERT(in > 0 && r0 <= r1);
    if (wt->type == SP_W_Q4 || wt->type == SP_W_Q8) {
        sp_q_dot_rows(wt, in, x, rows, r0, r1, y);
        return;
    }
    SP_ASSERT((wt->type == SP_W_F32 || wt->type == SP_W_BF16) && wt->stride == in);
    const void *w = wt->data;
    const int wbf16 = wt->type == SP_W_BF16;
    int a = r0;
    for (; a + 4 <= r1; a += 4) {
        int r[4];
        for (int q = 0; q < 4; q++) r[q] = rows ? rows[a + q] : a + q;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
        if (wbf16) {
            const uint16_t *restrict w0 = (const uint16_t *)w + (size_t)r[0] * in, *restrict w1 = (const uint16_t *)w + (size_t)r[1] * in;
            const uint16_t *restrict w2 = (const uint16_t *)w + (size_t)r[2] * in, *restrict w3 = (const uint16_t *)w + (size_t)r[3] * in;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int i = 0; i < in; i++) {
                const float xi = x[i];
                s0 += sp_bf16(w0[i]) * xi, s1 += sp_bf16(w1[i]) * xi, s2 += sp_bf16(w2[i]) * xi, s3 += sp_bf16(w3[i]) * xi;
            }
        } else {
            const float *restrict w0 = (const float *)w + (size_t)r[0] * in, *restrict w1 = (const float *)w + (size_t)r[1] * in;
            const float *restrict w2 = (const float *)w + (size_t)r[2] * in, *restrict w3 = (const float *)w + (size_t)r[3] * in;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int i = 0; i < in; i++) {
                const float xi = x[i];
                s0 += w0[i] * xi, s1 += w1[i] * xi, s2 += w2[i] * xi, s3 += w3[i] * xi;
            }
        }
        y[r[0]] = s0, y[r[1]] = s1, y[r[2]] = s2, y[r[3]] = s3;
    }
    for (; a < r1; a++) {
        const int r = rows ? rows[a] : a;
        float s = 0.f;
        if (wbf16) {
            const uint16_t *restrict row = (const uint16_t *)w + (size_t)r * in;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < in; i++) s += sp_bf16(row[i]) * x[i];
        } else {
            const float *restrict row = (const float *)w + (size_t)r * in;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < in; i++) s += row[i] * x[i];
        }
        y[r] = s;
    }
}

/* y = W x over the active rows, every thread calling: partial sums, a barrier, this thread's share of the sum.
 * The partials alternate between two sets, so a thread that moves on to the next GEMV never overwrites a
 * partial another thread is still adding up (the barrier of that next GEMV orders the one after it).
 * timing (NULL: not timed): += this thread's seconds in its partial sums, then waiting at the barrier, and 1. */
void sp_gemv(sp_ctx *c, const sp_weight *w, int out, const float *x, const int *act, int n_act, float *y,
             double *timing) {
    sp_workspace *ws = c->ws;
    float *part = ws->part + (size_t)(c->phase & 1) * ws->n_threads * ws->stride;
    c->phase += 1;
    const double t0 = timing ? omp_get_wtime() : 0.0;
    sp_gemv_partial(c->ith, c->nth, w, out, x, act, n_act, part, ws->stride);
    const double t1 = timing ? omp_get_wtime() : 0.0;
    SP_BARRIER();
    if (timing) timing[0] += t1 - t0, timing[1] += omp_get_wtime() - t1, timing[2] += 1;
    sp_gemv_reduce(c->ith, c->nth, out, part, ws->stride, y);
}

/* R-Sparse: y += B (A x_dropped) for linear j, the dropped channels being those of [0, n_in) not in act (act
 * ascending, as sp_mask writes it). Adds to this thread's split share of y, the share sp_gemv left it. */
static void lowrank_add(sp_ctx *c, const sp_model *M, const sp_layer *L, int j, const float *x, int n_in,
                        const int *act, int n_act, int out, float *y) {
    sp_workspace *ws = c->ws;
    const int r = L->lr_rank[j];
    SP_ASSERT(r > 0 && r <= ws->max_rank && n_in <= ws->wide && out <= ws->wide);
    int *drop = c->t->drop, nd = 0, a = 0;
    for (int i = 0; i < n_in; i++) {
        if (a < n_act && act[a] == i) a++;
        else drop[nd++] = i;
    }
    const int type = M->wbf16 ? SP_W_BF16 : SP_W_F32;
    const sp_weight A = {type, 0, 0, r, L->lr_a[j], NULL, NULL}, B = {type, 0, 0, out, L->lr_b[j], NULL, NULL};
    sp_gemv(c, &A, r, x, drop, nd, ws->lr_t, NULL);
    SP_BARRIER(); /* lr_t is complete */
    sp_gemv(c, &B, out, ws->lr_t, ws->iota, r, ws->lr_y, NULL);
    int lo, hi;
    sp_split(out, c->ith, c->nth, &lo, &hi);
    for (int o = lo; o < hi; o++) y[o] += ws->lr_y[o];
}

/* Block linear j of layer l on its masked input: y = W x[act] (+ the low-rank term) (+ bias), this thread's split
 * share of y final on return; counts the channels for the achieved sparsity (sparse tokens only). */
void sp_linear(sp_ctx *c, const sp_model *M, int l, int j, const float *x, int n_in, const int *act, int n_act,
               int out, float *y, int dense) {
    const sp_layer *L = &M->layers[l];
    SP_ASSERT(n_act >= 0 && n_act <= n_in && n_in <= c->ws->wide && out <= c->ws->wide);
    sp_gemv(c, &L->w[j], out, x, act, n_act, y, M->timing ? M->timing + ((size_t)c->ith * SP_N_LIN + j) * 3 : NULL);
    if (!dense && L->lr_a[j]) lowrank_add(c, M, L, j, x, n_in, act, n_act, out, y);
    if (L->bias[j]) {
        int lo, hi;
        sp_split(out, c->ith, c->nth, &lo, &hi);
        for (int o = lo; o < hi; o++) y[o] += L->bias[j][o];
    }
    if (c->ith == 0 && !dense) {
        M->active[(size_t)l * SP_N_LIN + j] += n_act;
        M->seen[(size_t)l * SP_N_LIN + j] += n_in;
        const sp_weight *w = &L->w[j];
        if (M->blocks && sp_q_transposed_type(w->type)) {
            int64_t nb = 0;
            const int sh = __builtin_ctz((unsigned)w->block);
            for (int a = 0; a < n_act; a++) nb += a == 0 || (act[a] >> sh) != (act[a - 1] >> sh);
            M->blocks[(size_t)l * SP_N_LIN + j] += nb;
        }
        if (M->mask_sum) {
            uint64_t h = 0;
            for (int a = 0; a < n_act; a++) { /* splitmix64 of the index */
                uint64_t z = (uint64_t)act[a] + 0x9E3779B97F4A7C15ull;
                z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
                z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
                h += z ^ (z >> 31);
            }
            M->mask_sum[(size_t)l * SP_N_LIN + j] += h;
        }
    }
}

/* Test entry points: the ops above on their own, with their own scratch. */
int sp_test_gemv(const sp_weight *w, int in, int out, const float *x, const int *act, int n_act, float *y,
                 int threads) {
    (void)in;
    if (threads < 1 || out < 0 || !w || w->stride < out) return SP_ERR_SHAPE;
    if (w->type == SP_W_Q4_RUNS && w->stride > SP_Q4_RUNS_MAX_OUT) return SP_ERR_SHAPE;
    const int stride = (w->stride + 15) / 16 * 16;
    float *part = malloc(sizeof(float) * (size_t)threads * (stride ? stride : 1));
    if (!part) return SP_ERR_NOMEM;
#pragma omp parallel num_threads(threads)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        sp_gemv_partial(ith, nth, w, out, x, act, n_act, part, stride);
        SP_BARRIER();
        sp_gemv_reduce(ith, nth, out, part, stride, y);
    }
    free(part);
    return SP_OK;
}

int sp_test_dot_rows(const sp_weight *w, int in, int n_rows, const float *x, const int *rows, int n_sel, float *y,
                     int threads) {
    if (threads < 1 || in < 1 || !w || w->stride != in) return SP_ERR_SHAPE;
#pragma omp parallel num_threads(threads)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        const int total = rows ? n_sel : n_rows;
        sp_dot_rows(w, in, x, rows, (int)((long)total * ith / nth), (int)((long)total * (ith + 1) / nth), y);
    }
    return SP_OK;
}
