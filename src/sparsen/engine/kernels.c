/* sparsen decode kernels: one call = the whole forward of one token of a Llama-family model.
 *
 * Why one call: batch-1 decoding reads every weight once per token, so time is bytes / bandwidth,
 * and a parallel region per GEMV costs more than a 576x576 GEMV. So the whole token runs inside ONE
 * OpenMP parallel region; the threads meet at barriers between stages, and every GEMV splits its
 * OUTPUT columns across the threads while each thread walks the same list of active input channels.
 *
 * Layouts: every block linear is stored transposed, W^T [in, out], so input channel i is one
 * contiguous row and skipping it skips its bytes: y[o0:o1] += x_i * W^T[i, o0:o1] over active i
 * (never a gather + matmul). Under a gate-activation rule (CATS/CHESS) up is kept as [out, in] rows
 * and only the active rows are dotted. lm_head is [vocab, d] rows, dotted, split over the vocab.
 * Weights are fp32 or bf16 (uint16, widened in the kernel: (uint32) w << 16).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { RULE_DENSE = 0, RULE_THRESHOLD = 1, RULE_TOPK = 2, RULE_GAUSS = 3, RULE_GATE_ACT = 4 };
enum { LIN_Q, LIN_K, LIN_V, LIN_O, LIN_GATE, LIN_UP, LIN_DOWN, N_LIN };

typedef struct {
    int kind;          /* RULE_* on this linear's input (RULE_GATE_ACT only on down) */
    int same_as_prev;  /* this linear's input mask equals the previous linear's (q/k/v, gate/up) */
    float param;       /* topk: share dropped; gauss: z = Phi^-1((1+s)/2) */
    const float *thr;  /* per-input-channel thresholds (RULE_THRESHOLD, RULE_GATE_ACT) */
} Rule;

typedef struct {
    const void *w[N_LIN];   /* W^T [in, out]; for LIN_UP under a gate_act rule: W [out, in] */
    const float *bias[N_LIN];
    const float *norm1, *norm2;
    const float *basis;     /* NULL, or R [d, d] ([in, out]): h <- h R at this layer's input */
    Rule rule[N_LIN];
    /* R-Sparse: NULL, or the low-rank term of the dropped inputs, y += B A x_dropped, stored as
     * A^T [in, rank] (rows of dropped channels are read) and B^T [rank, out], in the weights' dtype */
    const void *lr_a[N_LIN], *lr_b[N_LIN];
    int lr_rank[N_LIN];
} Layer;

typedef struct {
    int n_layers, d, n_heads, n_kv, head_dim, inter, vocab, max_seq, wbf16;
    float eps;
    const Layer *layers;
    const float *final_norm;
    const void *lm_head;       /* [vocab, d] */
    const float *rope_cos;     /* [max_seq, head_dim] (HF rotate-half convention) */
    const float *rope_sin;
    float *k_cache, *v_cache;  /* [n_layers, n_kv, max_seq, head_dim] */
    int64_t *active;           /* [n_layers, N_LIN] active input channels (rows for gate_act up) summed */
    int64_t *seen;             /* [n_layers, N_LIN] input channels offered, summed */
} Model;

static inline float bf16(uint16_t b) {
    union { uint32_t u; float f; } v;
    v.u = ((uint32_t)b) << 16;
    return v.f;
}

/* y[o0:o1] = sum over the active i of x[i] * W^T[i, o0:o1].
 * Eight rows per pass over y: y is loaded and stored once per eight weight rows streamed (with one or
 * two rows per pass the y traffic, not the weights, limited it to ~13 GB/s; eight reach ~20-27 GB/s here). */
#define AXPY_PASS(T, LOAD)                                                                                 \
    {                                                                                                      \
        const T *Wt = (const T *)w;                                                                        \
        int a = 0;                                                                                         \
        for (; a + 8 <= n_act; a += 8) {                                                                   \
            const T *restrict r0 = Wt + (size_t)act[a] * out, *restrict r1 = Wt + (size_t)act[a + 1] * out; \
            const T *restrict r2 = Wt + (size_t)act[a + 2] * out, *restrict r3 = Wt + (size_t)act[a + 3] * out; \
            const T *restrict r4 = Wt + (size_t)act[a + 4] * out, *restrict r5 = Wt + (size_t)act[a + 5] * out; \
            const T *restrict r6 = Wt + (size_t)act[a + 6] * out, *restrict r7 = Wt + (size_t)act[a + 7] * out; \
            const float x0 = x[act[a]], x1 = x[act[a + 1]], x2 = x[act[a + 2]], x3 = x[act[a + 3]];          \
            const float x4 = x[act[a + 4]], x5 = x[act[a + 5]], x6 = x[act[a + 6]], x7 = x[act[a + 7]];      \
            _Pragma("omp simd") for (int j = o0; j < o1; j++) y[j] +=                                       \
                x0 * LOAD(r0[j]) + x1 * LOAD(r1[j]) + x2 * LOAD(r2[j]) + x3 * LOAD(r3[j]) +                \
                x4 * LOAD(r4[j]) + x5 * LOAD(r5[j]) + x6 * LOAD(r6[j]) + x7 * LOAD(r7[j]);                 \
        }                                                                                                  \
        for (; a < n_act; a++) {                                                                           \
            const float x0 = x[act[a]];                                                                    \
            const T *restrict r0 = Wt + (size_t)act[a] * out;                                              \
            _Pragma("omp simd") for (int j = o0; j < o1; j++) y[j] += x0 * LOAD(r0[j]);                    \
        }                                                                                                  \
    }
#define AS_FLOAT(v) (v)

static void axpy_rows(const void *w, int wbf16, int out, const float *x, const int *act, int n_act,
                      float *restrict y, int o0, int o1) {
    for (int j = o0; j < o1; j++) y[j] = 0.f;
    if (wbf16) AXPY_PASS(uint16_t, bf16)
    else AXPY_PASS(float, AS_FLOAT)
}

static void split(int n, int *lo, int *hi);

/* y = W x over the active rows, inside a parallel region (every thread calls it). The threads split the
 * ACTIVE ROWS: each streams whole contiguous rows (sequential memory, which the prefetchers like far
 * better than every thread reading half of each row) into a full-width partial sum, then, after a
 * barrier, each thread adds up the partials of its share of the outputs. Partial buffers alternate
 * between two sets, so a thread that moves on to the next product never overwrites a partial another
 * thread is still reading. part: 2 * nthreads * stride floats. */
static void gemv(const void *w, int wbf16, int out, const float *x, const int *act, int n_act, float *y,
                 float *part, int stride, int *phase) {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    float *base = part + (size_t)(*phase & 1) * nt * stride;
    *phase += 1;
    const int a0 = (int)((long)n_act * t / nt), a1 = (int)((long)n_act * (t + 1) / nt);
    axpy_rows(w, wbf16, out, x, act + a0, a1 - a0, base + (size_t)t * stride, 0, out);
#pragma omp barrier
    int lo, hi;
    split(out, &lo, &hi);
    for (int j = lo; j < hi; j++) {
        float s = 0.f;
        for (int u = 0; u < nt; u++) s += base[(size_t)u * stride + j];
        y[j] = s;
    }
}

/* R-Sparse: y += B (A x_dropped) for linear j, the dropped channels being those of [0, n_in) not in act
 * (act ascending, as make_mask writes it). Inside the parallel region, after the linear's own gemv: each
 * thread then adds its split share of y, the share gemv left it. t: rank floats, ly: out floats, both shared;
 * drop, ridx: this thread's n_in and rank ints. */
static void lowrank_add(const Layer *L, int j, int wbf16, const float *x, int n_in, const int *act, int n_act,
                        int out, float *y, float *t, float *ly, int *drop, int *ridx, float *part, int stride, int *phase) {
    const int r = L->lr_rank[j];
    int nd = 0, a = 0;
    for (int i = 0; i < n_in; i++) {
        if (a < n_act && act[a] == i) a++;
        else drop[nd++] = i;
    }
    for (int k = 0; k < r; k++) ridx[k] = k;
    gemv(L->lr_a[j], wbf16, r, x, drop, nd, t, part, stride, phase);
#pragma omp barrier
    gemv(L->lr_b[j], wbf16, out, t, ridx, r, ly, part, stride, phase);
    int lo, hi;
    split(out, &lo, &hi);
    for (int o = lo; o < hi; o++) y[o] += ly[o];
}

/* y[r] = dot(W[r, :], x) for the rows r listed in rows[r0:r1] (or r in [r0, r1) when rows is NULL) */
static void dot_rows(const void *w, int wbf16, int in, const float *restrict x, const int *rows, int r0, int r1,
                     float *restrict y) {
    for (int a = r0; a < r1; a++) {
        const int r = rows ? rows[a] : a;
        float s = 0.f;
        if (wbf16) {
            const uint16_t *restrict row = (const uint16_t *)w + (size_t)r * in;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < in; i++) s += bf16(row[i]) * x[i];
        } else {
            const float *restrict row = (const float *)w + (size_t)r * in;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < in; i++) s += row[i] * x[i];
        }
        y[r] = s;
    }
}

static int cmp_float(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Active input channels of x [n] under a rule; returns their count. scratch: n floats. */
static int make_mask(const Rule *r, const float *x, int n, int *act, float *scratch) {
    int m = 0;
    switch (r->kind) {
    case RULE_THRESHOLD:
        for (int i = 0; i < n; i++)
            if (fabsf(x[i]) > r->thr[i]) act[m++] = i;
        return m;
    case RULE_TOPK: {
        const int k = (int)lrintf(r->param * n); /* the k smallest |x| are dropped */
        if (k <= 0) break;
        if (k >= n) return 0;
        for (int i = 0; i < n; i++) scratch[i] = fabsf(x[i]);
        qsort(scratch, n, sizeof(float), cmp_float);
        const float kth = scratch[k - 1]; /* the largest dropped magnitude */
        int ties = 0;                     /* entries equal to kth that are dropped */
        for (int i = 0; i < k; i++) ties += scratch[i] == kth;
        for (int i = 0; i < n; i++) {
            const float a = fabsf(x[i]);
            if (a > kth) act[m++] = i;
            else if (a == kth && ties-- <= 0) act[m++] = i;
        }
        return m;
    }
    case RULE_GAUSS: {
        double ss = 0;
        for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
        const float t = r->param * (float)sqrt(ss / n);
        for (int i = 0; i < n; i++)
            if (fabsf(x[i]) > t) act[m++] = i;
        return m;
    }
    default: break;
    }
    for (int i = 0; i < n; i++) act[i] = i;
    return n;
}

static void split(int n, int *lo, int *hi) { /* this thread's share of [0, n), in multiples of 16 */
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int blocks = (n + 15) / 16;
    const int b0 = (int)((long)blocks * t / nt), b1 = (int)((long)blocks * (t + 1) / nt);
    *lo = b0 * 16 < n ? b0 * 16 : n;
    *hi = b1 * 16 < n ? b1 * 16 : n;
}

static void rmsnorm(const float *h, const float *g, int d, float eps, float *out) {
    double ss = 0;
    for (int i = 0; i < d; i++) ss += (double)h[i] * h[i];
    const float s = 1.f / sqrtf((float)(ss / d) + eps);
    for (int i = 0; i < d; i++) out[i] = h[i] * s * g[i];
}

static void rope(float *v, const float *c, const float *s, int hd) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
    }
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* The forward of one token at position pos, embedding row `emb` [d]; writes logits [vocab].
 * dense != 0 ignores every rule (the prompt is prefilled dense, as in the decode protocol). */
int decode_step(const Model *M, int pos, const float *emb, float *logits, int dense) {
    if (pos < 0 || pos >= M->max_seq) return -1;
    const int d = M->d, hd = M->head_dim, nh = M->n_heads, nkv = M->n_kv, I = M->inter;
    const int dq = nh * hd, dkv = nkv * hd, S = M->max_seq;
    const int wide = (d > I ? d : I) > dq ? (d > I ? d : I) : dq;
    float *h = malloc(sizeof(float) * d), *hb = malloc(sizeof(float) * d);
    float *q = malloc(sizeof(float) * dq), *k = malloc(sizeof(float) * dkv), *v = malloc(sizeof(float) * dkv);
    float *att = malloc(sizeof(float) * dq), *g = malloc(sizeof(float) * I), *u = malloc(sizeof(float) * I);
    float *mid = malloc(sizeof(float) * I), *proj = malloc(sizeof(float) * d);
    float *scores = malloc(sizeof(float) * (size_t)nh * (pos + 1));
    int *gate_act = malloc(sizeof(int) * I);
    int n_gate_act = 0;
    const int stride = (wide + 15) / 16 * 16;
    float *part = malloc(sizeof(float) * 2 * (size_t)omp_get_max_threads() * stride);
    int max_rank = 0;
    for (int l = 0; l < M->n_layers; l++)
        for (int j = 0; j < N_LIN; j++)
            if (M->layers[l].lr_a[j] && M->layers[l].lr_rank[j] > max_rank) max_rank = M->layers[l].lr_rank[j];
    float *lr_t = malloc(sizeof(float) * (max_rank + 1)), *lr_y = malloc(sizeof(float) * wide);
    memcpy(h, emb, sizeof(float) * d);
    const float scale = 1.f / sqrtf((float)hd);

#pragma omp parallel
    {
        const int tid = omp_get_thread_num();
        float *x = malloc(sizeof(float) * wide), *scratch = malloc(sizeof(float) * wide);
        int *act = malloc(sizeof(int) * wide), *act2 = malloc(sizeof(int) * wide);
        int *drop = malloc(sizeof(int) * wide), *ridx = malloc(sizeof(int) * (max_rank + 1));
#define LOWRANK(J, X, N_IN, ACT, N_ACT, OUT, Y) \
        if (!dense && L->lr_a[J]) lowrank_add(L, J, M->wbf16, X, N_IN, ACT, N_ACT, OUT, Y, lr_t, lr_y, drop, ridx, part, stride, &phase)
        int lo, hi, phase = 0;
        for (int l = 0; l < M->n_layers; l++) {
            const Layer *L = &M->layers[l];
            const Rule *R = L->rule;
            int64_t *nact = M->active + (size_t)l * N_LIN, *nseen = M->seen + (size_t)l * N_LIN;
            if (L->basis) { /* change of basis of the residual stream: h <- h R */
                int all = d;
                for (int i = 0; i < d; i++) act[i] = i;
                gemv(L->basis, 0, d, h, act, all, proj, part, stride, &phase);
                split(d, &lo, &hi);
#pragma omp barrier
                for (int j = lo; j < hi; j++) h[j] = proj[j];
#pragma omp barrier
            }
            /* attention: x = norm1(h); q, k, v with their input masks */
            rmsnorm(h, L->norm1, d, M->eps, x);
            int n_act = 0;
            float *outs[3] = {q, k, v};
            const int dims[3] = {dq, dkv, dkv};
            for (int t = 0; t < 3; t++) {
                const Rule dr = {RULE_DENSE, 0, 0.f, NULL};
                const Rule *r = dense ? &dr : &R[LIN_Q + t];
                if (t == 0 || !r->same_as_prev || dense) n_act = make_mask(r, x, d, act, scratch);
                gemv(L->w[LIN_Q + t], M->wbf16, dims[t], x, act, n_act, outs[t], part, stride, &phase);
                LOWRANK(LIN_Q + t, x, d, act, n_act, dims[t], outs[t]);
                split(dims[t], &lo, &hi);
                if (L->bias[LIN_Q + t])
                    for (int j = lo; j < hi; j++) outs[t][j] += L->bias[LIN_Q + t][j];
                if (tid == 0 && !dense) { nact[LIN_Q + t] += n_act; nseen[LIN_Q + t] += d; }
            }
#pragma omp barrier
            /* RoPE on q and k, append k and v to the cache (a head per iteration) */
            const float *c = M->rope_cos + (size_t)pos * hd, *s = M->rope_sin + (size_t)pos * hd;
#pragma omp for schedule(static)
            for (int hh = 0; hh < nh + nkv; hh++) {
                if (hh < nh) rope(q + hh * hd, c, s, hd);
                else {
                    const int kv = hh - nh;
                    rope(k + kv * hd, c, s, hd);
                    float *kc = M->k_cache + (((size_t)l * nkv + kv) * S + pos) * hd;
                    float *vc = M->v_cache + (((size_t)l * nkv + kv) * S + pos) * hd;
                    memcpy(kc, k + kv * hd, sizeof(float) * hd);
                    memcpy(vc, v + kv * hd, sizeof(float) * hd);
                }
            } /* implicit barrier */
#pragma omp for schedule(static)
            for (int hh = 0; hh < nh; hh++) {
                const int kv = hh / (nh / nkv);
                const float *qh = q + hh * hd;
                const float *K = M->k_cache + ((size_t)l * nkv + kv) * S * hd;
                const float *V = M->v_cache + ((size_t)l * nkv + kv) * S * hd;
                float *sc = scores + (size_t)hh * (pos + 1), mx = -INFINITY;
                for (int p = 0; p <= pos; p++) {
                    float dot = 0.f;
                    for (int i = 0; i < hd; i++) dot += qh[i] * K[(size_t)p * hd + i];
                    sc[p] = dot * scale;
                    if (sc[p] > mx) mx = sc[p];
                }
                float sum = 0.f;
                for (int p = 0; p <= pos; p++) { sc[p] = expf(sc[p] - mx); sum += sc[p]; }
                float *o = att + hh * hd;
                for (int i = 0; i < hd; i++) o[i] = 0.f;
                for (int p = 0; p <= pos; p++) {
                    const float w = sc[p] / sum;
                    for (int i = 0; i < hd; i++) o[i] += w * V[(size_t)p * hd + i];
                }
            } /* implicit barrier */
            {
                const Rule dr = {RULE_DENSE, 0, 0.f, NULL};
                n_act = make_mask(dense ? &dr : &R[LIN_O], att, dq, act, scratch);
                gemv(L->w[LIN_O], M->wbf16, d, att, act, n_act, proj, part, stride, &phase);
                LOWRANK(LIN_O, att, dq, act, n_act, d, proj);
                split(d, &lo, &hi);
                for (int j = lo; j < hi; j++) h[j] += proj[j] + (L->bias[LIN_O] ? L->bias[LIN_O][j] : 0.f);
                if (tid == 0 && !dense) { nact[LIN_O] += n_act; nseen[LIN_O] += dq; }
            }
#pragma omp barrier
            /* MLP */
            rmsnorm(h, L->norm2, d, M->eps, x);
            const int up_rows = R[LIN_DOWN].kind == RULE_GATE_ACT; /* up stored as [out, in] rows */
            const int gate_rule = !dense && up_rows;
            {
                const Rule dr = {RULE_DENSE, 0, 0.f, NULL};
                n_act = make_mask(dense ? &dr : &R[LIN_GATE], x, d, act, scratch);
                gemv(L->w[LIN_GATE], M->wbf16, I, x, act, n_act, g, part, stride, &phase);
                LOWRANK(LIN_GATE, x, d, act, n_act, I, g);
                split(I, &lo, &hi);
                if (tid == 0 && !dense) { nact[LIN_GATE] += n_act; nseen[LIN_GATE] += d; }
                if (dense && up_rows) { /* the dense prompt under a gate-activation plan: every row of up */
                    dot_rows(L->w[LIN_UP], M->wbf16, d, x, NULL, lo, hi, u);
                    for (int j = lo; j < hi; j++) mid[j] = silu(g[j]) * u[j];
                } else if (!gate_rule) {
                    int n_up = n_act;
                    if (!(dense || R[LIN_UP].same_as_prev)) n_up = make_mask(&R[LIN_UP], x, d, act2, scratch);
                    gemv(L->w[LIN_UP], M->wbf16, I, x, (dense || R[LIN_UP].same_as_prev) ? act : act2, n_up, u, part,
                         stride, &phase);
                    LOWRANK(LIN_UP, x, d, (dense || R[LIN_UP].same_as_prev) ? act : act2, n_up, I, u);
                    for (int j = lo; j < hi; j++) mid[j] = silu(g[j]) * u[j];
                    if (tid == 0 && !dense) { nact[LIN_UP] += n_up; nseen[LIN_UP] += d; }
                }
            }
#pragma omp barrier
            if (gate_rule) { /* CATS / CHESS: channel j active iff |silu(g_j)| > t_j; up rows only for those */
#pragma omp single
                {
                    n_gate_act = 0;
                    for (int j = 0; j < I; j++) {
                        const float a = silu(g[j]);
                        mid[j] = a;
                        if (fabsf(a) > R[LIN_DOWN].thr[j]) gate_act[n_gate_act++] = j;
                    }
                    nact[LIN_UP] += n_gate_act; nseen[LIN_UP] += I;
                    nact[LIN_DOWN] += n_gate_act; nseen[LIN_DOWN] += I;
                } /* implicit barrier */
                const int t = omp_get_thread_num(), nt = omp_get_num_threads();
                const int r0 = (int)((long)n_gate_act * t / nt), r1 = (int)((long)n_gate_act * (t + 1) / nt);
                dot_rows(L->w[LIN_UP], M->wbf16, d, x, gate_act, r0, r1, u);
                for (int a = r0; a < r1; a++) mid[gate_act[a]] *= u[gate_act[a]];
#pragma omp barrier
                gemv(L->w[LIN_DOWN], M->wbf16, d, mid, gate_act, n_gate_act, proj, part, stride, &phase);
                split(d, &lo, &hi);
            } else {
                const Rule dr = {RULE_DENSE, 0, 0.f, NULL};
                n_act = make_mask(dense ? &dr : &R[LIN_DOWN], mid, I, act, scratch);
                gemv(L->w[LIN_DOWN], M->wbf16, d, mid, act, n_act, proj, part, stride, &phase);
                LOWRANK(LIN_DOWN, mid, I, act, n_act, d, proj);
                split(d, &lo, &hi);
                if (tid == 0 && !dense) { nact[LIN_DOWN] += n_act; nseen[LIN_DOWN] += I; }
            }
            for (int j = lo; j < hi; j++) h[j] += proj[j] + (L->bias[LIN_DOWN] ? L->bias[LIN_DOWN][j] : 0.f);
#pragma omp barrier
        }
        rmsnorm(h, M->final_norm, d, M->eps, x);
        split(M->vocab, &lo, &hi);
        dot_rows(M->lm_head, M->wbf16, d, x, NULL, lo, hi, logits);
        free(x); free(scratch); free(act); free(act2); free(drop); free(ridx);
#undef LOWRANK
    }
    free(h); free(hb); free(q); free(k); free(v); free(att); free(g); free(u); free(mid); free(proj);
    free(scores); free(gate_act); free(part); free(lr_t); free(lr_y);
    return 0;
}

/* Kernel entry points for tests: the same code the decode step runs. */
void gemv_axpy(const void *w, int wbf16, int in, int out, const float *x, const int *act, int n_act, float *y,
               int threads) {
    (void)in;
    const int stride = (out + 15) / 16 * 16;
    float *part = malloc(sizeof(float) * 2 * (size_t)threads * stride);
#pragma omp parallel num_threads(threads)
    {
        int phase = 0;
        gemv(w, wbf16, out, x, act, n_act, y, part, stride, &phase);
    }
    free(part);
}

void gemv_rows(const void *w, int wbf16, int in, int n_rows, const float *x, const int *rows, int n_sel, float *y,
               int threads) {
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int total = rows ? n_sel : n_rows;
        dot_rows(w, wbf16, in, x, rows, (int)((long)total * t / nt), (int)((long)total * (t + 1) / nt), y);
    }
}

int mask(int kind, float param, const float *thr, const float *x, int n, int *act) {
    Rule r = {kind, 0, param, thr};
    float *scratch = malloc(sizeof(float) * n);
    const int m = make_mask(&r, x, n, act, scratch);
    free(scratch);
    return m;
}

void set_threads(int n) { omp_set_num_threads(n); }
