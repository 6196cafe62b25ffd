/* Attention: q, k, v with their input masks, QK-norm and RoPE, the KV cache (fp32 or half), then softmax(q.K) V
 * over a range of cached positions (dense) or over the positions a KV selection chose (select.c). Flash-decoding
 * style: the threads split each group's positions, each keeps per query head a partial (max, sum of exp,
 * exp-weighted V), and the partials are merged; a K or V row is read once for all the query heads of its group. */
#include <string.h>

#include "ops.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static void rope(float *v, const float *c, const float *s, int hd) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
    }
}

static void store_row(void *cache, int f16, size_t row, const float *x, int hd) {
    if (!f16) {
        memcpy((float *)cache + row * hd, x, sizeof(float) * hd);
        return;
    }
    _Float16 *h = (_Float16 *)cache + row * hd;
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= hd; i += 8) /* round to nearest even, as the scalar conversion */
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < hd; i++) h[i] = (_Float16)x[i];
}

/* Heads [0, n_heads) of q and [0, n_kv) of k (one list, split over the threads): the per-head norm if the layer
 * has one, RoPE at pos with the layer's table, then k and v appended to the layer's cache at row pos. */
void sp_qk_prepare(int ith, int nth, const sp_model *M, const sp_layer *L, int l, int pos, float *q, float *k,
                   const float *v) {
    const int hd = M->head_dim, nh = M->n_heads, nkv = M->n_kv, S = M->max_seq;
    SP_ASSERT(0 <= pos && pos < S && hd % 2 == 0 && 0 <= l && l < M->n_layers);
    const float *c = L->rope_cos + (size_t)pos * hd, *s = L->rope_sin + (size_t)pos * hd;
    const int n = nh + nkv, h0 = (int)((long)n * ith / nth), h1 = (int)((long)n * (ith + 1) / nth);
    for (int hh = h0; hh < h1; hh++) {
        if (hh < nh) {
            float *qh = q + (size_t)hh * hd;
            if (L->q_norm) sp_rmsnorm(qh, L->q_norm, hd, M->eps, qh);
            rope(qh, c, s, hd);
        } else {
            const int kv = hh - nh;
            float *kh = k + (size_t)kv * hd;
            if (L->k_norm) sp_rmsnorm(kh, L->k_norm, hd, M->eps, kh);
            rope(kh, c, s, hd);
            const size_t row = ((size_t)l * nkv + kv) * S + pos;
            store_row(M->k_cache, M->kv_f16, row, kh, hd);
            store_row(M->v_cache, M->kv_f16, row, v + (size_t)kv * hd, hd);
        }
    }
}

/* Every cache line of a selected row, 8 rows ahead: a selection jumps, so the hardware prefetchers cannot follow. */
static inline void prefetch_row(const char *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
}

/* sc[j S + i] <- exp(sc[j S + i] - tm[j]) over the slots [lo, hi) of gs heads; their sums into tl (if not NULL). */
static void exp_slots(float *sc, int S, int gs, int lo, int hi, const float *tm, float *tl) {
    for (int j = 0; j < gs; j++) {
        const float sum = sp_exp_shift_sum(sc + (size_t)j * S, lo, hi, tm[j]);
        if (tl) tl[j] = sum;
    }
}

/* One group's slice [lo, hi) of its positions (ix[i], or base + i): logits into sc[j S + i] for its gs heads with
 * their maxima tm, then exp(logit - max) there with their sums tl, and the exp-weighted V rows summed into to
 * [gs, hd]. The generic form; rows_avx512 below is the same with q and the sums held in registers. */
static void rows_generic(const float *q, const char *K, const char *V, int f16, const int *ix, int base, int lo, int hi,
                         int hd, int gs, int S, float scale, float *sc, float *tm, float *tl, float *to, float *tmp) {
    const size_t rb = (size_t)hd * (f16 ? 2 : 4); /* bytes per row */
    for (int j = 0; j < gs; j++) tm[j] = -INFINITY;
    for (int i = lo; i < hi; i++) {
        const int p = ix ? ix[i] : base + i;
        if (ix && i + 8 < hi) prefetch_row(K + (size_t)ix[i + 8] * rb, rb); /* a selection's next rows */
        const float *k = sp_kv_row(K, f16, p, hd, tmp);
        for (int j = 0; j < gs; j++) {
            const float x = sp_dot(q + (size_t)j * hd, k, hd) * scale;
            sc[(size_t)j * S + i] = x;
            tm[j] = x > tm[j] ? x : tm[j];
        }
    }
    exp_slots(sc, S, gs, lo, hi, tm, tl);
    for (int j = 0; j < gs; j++) memset(to + (size_t)j * hd, 0, sizeof(float) * hd);
    for (int i = lo; i < hi; i++) {
        const int p = ix ? ix[i] : base + i;
        if (ix && i + 8 < hi) prefetch_row(V + (size_t)ix[i + 8] * rb, rb);
        const float *v = sp_kv_row(V, f16, p, hd, tmp);
        for (int j = 0; j < gs; j++) {
            const float e = sc[(size_t)j * S + i];
            float *restrict o = to + (size_t)j * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++) o[d] += e * v[d];
        }
    }
}

#ifdef __AVX512F__
/* rows_generic for head_dim 16 NV and GS heads, fp32 or half rows: the group's queries and output sums stay in
 * zmm registers across the rows (GS NV of each), and a half row is widened in registers, so a row costs its
 * loads, GS NV FMAs twice and GS reductions. The exps in between are the shared vectorized loop. */
#define ROWS_AVX512(NV, GS, F16)                                                                                    \
    static void rows_##NV##_##GS##_##F16(const float *q, const char *K, const char *V, const int *ix, int base,      \
                                         int lo, int hi, int S, float scale, float *sc, float *tm, float *tl,       \
                                         float *to) {                                                               \
        const size_t rb = (size_t)16 * NV * (F16 ? 2 : 4);                                                         \
        __m512 qv[GS][NV], r[NV];                                                                                  \
        for (int j = 0; j < GS; j++)                                                                               \
            for (int v = 0; v < NV; v++) qv[j][v] = _mm512_loadu_ps(q + (j * NV + v) * 16);                       \
        float mx[GS];                                                                                              \
        for (int j = 0; j < GS; j++) mx[j] = -INFINITY;                                                            \
        for (int i = lo; i < hi; i++) {                                                                            \
            const int p = ix ? ix[i] : base + i;                                                                   \
            if (ix && i + 8 < hi) prefetch_row(K + (size_t)ix[i + 8] * rb, rb);                                  \
            LOAD_ROW(K + (size_t)p * rb, NV, F16, r);                                                              \
            for (int j = 0; j < GS; j++) {                                                                         \
                __m512 acc = _mm512_mul_ps(qv[j][0], r[0]);                                                        \
                for (int v = 1; v < NV; v++) acc = _mm512_fmadd_ps(qv[j][v], r[v], acc);                           \
                const float x = _mm512_reduce_add_ps(acc) * scale;                                                 \
                sc[(size_t)j * S + i] = x;                                                                         \
                mx[j] = x > mx[j] ? x : mx[j];                                                                     \
            }                                                                                                      \
        }                                                                                                          \
        for (int j = 0; j < GS; j++) tm[j] = mx[j];                                                                \
        exp_slots(sc, S, GS, lo, hi, tm, tl);                                                                      \
        __m512 o[GS][NV];                                                                                          \
        for (int j = 0; j < GS; j++)                                                                               \
            for (int v = 0; v < NV; v++) o[j][v] = _mm512_setzero_ps();                                            \
        for (int i = lo; i < hi; i++) {                                                                            \
            const int p = ix ? ix[i] : base + i;                                                                   \
            if (ix && i + 8 < hi) prefetch_row(V + (size_t)ix[i + 8] * rb, rb);                                  \
            LOAD_ROW(V + (size_t)p * rb, NV, F16, r);                                                              \
            for (int j = 0; j < GS; j++) {                                                                         \
                const __m512 e = _mm512_set1_ps(sc[(size_t)j * S + i]);                                            \
                for (int v = 0; v < NV; v++) o[j][v] = _mm512_fmadd_ps(e, r[v], o[j][v]);                          \
            }                                                                                                      \
        }                                                                                                          \
        for (int j = 0; j < GS; j++)                                                                               \
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(to + (j * NV + v) * 16, o[j][v]);                        \
    }
#define LOAD_ROW(ptr, NV, F16, r)                                                                                  \
    for (int v = 0; v < NV; v++)                                                                                   \
        r[v] = F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(ptr) + 16 * v)))      \
                   : _mm512_loadu_ps((const float *)(ptr) + 16 * v)
#endif

typedef void (*rows_fn)(const float *, const char *, const char *, const int *, int, int, int, int, float, float *,
                        float *, float *, float *);
#ifdef __AVX512F__
ROWS_AVX512(4, 1, 0) ROWS_AVX512(4, 2, 0) ROWS_AVX512(4, 3, 0) ROWS_AVX512(4, 4, 0)
ROWS_AVX512(4, 1, 1) ROWS_AVX512(4, 2, 1) ROWS_AVX512(4, 3, 1) ROWS_AVX512(4, 4, 1)
ROWS_AVX512(8, 1, 0) ROWS_AVX512(8, 2, 0) ROWS_AVX512(8, 1, 1) ROWS_AVX512(8, 2, 1)
/* [f16][head_dim / 16 == 8][gs - 1] */
static const rows_fn ROWS_FAST[2][2][4] = {
    {{rows_4_1_0, rows_4_2_0, rows_4_3_0, rows_4_4_0}, {rows_8_1_0, rows_8_2_0, NULL, NULL}},
    {{rows_4_1_1, rows_4_2_1, rows_4_3_1, rows_4_4_1}, {rows_8_1_1, rows_8_2_1, NULL, NULL}}};
#endif

/* This thread's pass over its share of every group's positions in layer l. Group s holds the query heads
 * [s gs, (s+1) gs), gs = n_heads / n_groups, of KV head s gs / (n_heads / n_kv), and reads the positions
 * idx[s max_seq + i] for i < cnt[s] (a selection), or base + i for i < n (idx NULL: a range). Leaves this thread's
 * partials (pm, pl, po at slot ith) and, at scores[h, i] for each slot i it read, exp(logit - its pm). Each K row,
 * then each V row, is read once for the group's heads; tmp: [head_dim]. */
void sp_attn_rows(int ith, int nth, const sp_model *M, int l, const float *q, int n_groups, const int *idx,
                  const int *cnt, int base, int n, float *scores, float *pm, float *pl, float *po, float *tmp) {
    const int hd = M->head_dim, nh = M->n_heads, S = M->max_seq, group = nh / M->n_kv, f16 = M->kv_f16;
    SP_ASSERT(n_groups > 0 && nh % n_groups == 0 && group % (nh / n_groups) == 0 && 0 <= l && l < M->n_layers);
    SP_ASSERT(idx || (0 <= base && base + n <= S));
    const int gs = nh / n_groups;
    const size_t rb = (size_t)hd * (f16 ? 2 : 4);
    float *tm = pm + (size_t)ith * nh, *tl = pl + (size_t)ith * nh, *to = po + (size_t)ith * nh * hd;
    for (int s = 0; s < n_groups; s++) {
        const int m = idx ? cnt[s] : n, lo = (int)((long)m * ith / nth), hi = (int)((long)m * (ith + 1) / nth);
        const int *ix = idx ? idx + (size_t)s * S : NULL, h0 = s * gs;
        const size_t head = ((size_t)l * M->n_kv + h0 / group) * S;
        const char *K = (const char *)M->k_cache + head * rb, *V = (const char *)M->v_cache + head * rb;
        float *sc = scores + (size_t)h0 * S;
        const float *qh = q + (size_t)h0 * hd;
        rows_fn fast = NULL;
#ifdef __AVX512F__
        if ((hd == 64 || hd == 128) && gs <= 4) fast = ROWS_FAST[f16][hd == 128][gs - 1];
#endif
        if (fast) {
            fast(qh, K, V, ix, base, lo, hi, S, M->attn_scale, sc, tm + h0, tl + h0, to + (size_t)h0 * hd);
        } else {
            rows_generic(qh, K, V, f16, ix, base, lo, hi, hd, gs, S, M->attn_scale, sc, tm + h0, tl + h0,
                         to + (size_t)h0 * hd, tmp);
        }
    }
}

/* This thread's share of the query heads: the partials of every thread merged into out [n_heads, head_dim], and
 * the overall max and sum of exp per head (gm, gl: the probability of a logit x is exp(x - gm) / gl). */
void sp_attn_merge(int ith, int nth, int n_heads, int hd, const float *pm, const float *pl, const float *po,
                   float *gm, float *gl, float *out) {
    int h0, h1;
    sp_range(n_heads, ith, nth, &h0, &h1);
    for (int h = h0; h < h1; h++) {
        float mx = -INFINITY, sum = 0.f;
        for (int t = 0; t < nth; t++)
            if (pm[(size_t)t * n_heads + h] > mx) mx = pm[(size_t)t * n_heads + h];
        float *restrict o = out + (size_t)h * hd;
        memset(o, 0, sizeof(float) * hd);
        for (int t = 0; t < nth; t++) {
            const float m = pm[(size_t)t * n_heads + h];
            if (m == -INFINITY) continue; /* this thread read none of the head's positions */
            const float w = sp_exp(m - mx);
            const float *restrict p = po + ((size_t)t * n_heads + h) * hd;
            sum += w * pl[(size_t)t * n_heads + h];
#pragma omp simd
            for (int d = 0; d < hd; d++) o[d] += w * p[d];
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int d = 0; d < hd; d++) o[d] *= inv;
        gm[h] = mx, gl[h] = sum;
    }
}

/* The attention branch of layer l for the token at pos: h += [norm](o(attention(q, k, v of norm(h)))). */
void sp_attn_stage(sp_ctx *c, const sp_model *M, int l, int pos, int dense) {
    const sp_layer *L = &M->layers[l];
    sp_workspace *ws = c->ws;
    sp_thread *t = c->t;
    const int d = M->d, hd = M->head_dim, dq = M->n_heads * hd, dkv = M->n_kv * hd;
    sp_rmsnorm(ws->h, L->attn_norm, d, M->eps, t->x);
    float *outs[3] = {ws->q, ws->k, ws->v};
    const int dims[3] = {dq, dkv, dkv};
    int n_act = 0;
    for (int j = 0; j < 3; j++) {
        if (j == 0 || dense || !L->rule[SP_Q + j].same_as_prev)
            n_act = sp_layer_mask(L, SP_Q + j, dense, t->x, d, t->act, t->scratch);
        sp_linear(c, M, l, SP_Q + j, t->x, d, t->act, n_act, dims[j], outs[j], dense);
    }
    SP_BARRIER(); /* q, k, v complete */
    sp_qk_prepare(c->ith, c->nth, M, L, l, pos, ws->q, ws->k, ws->v);
    SP_BARRIER(); /* q roped, this position's k and v in the cache */
    const sp_attn *A = L->attn_select ? M->attn : NULL;
    const int start = L->window > 0 && pos - L->window + 1 > 0 ? pos - L->window + 1 : 0;
    if (A) { /* the new key enters the selection state (on dense steps too: the prompt's keys) */
        sp_select_append(c->ith, c->nth, M, l, pos, t->row);
        if (!dense && (A->labels || A->codes)) {
            SP_BARRIER(); /* the estimate reads this key's label */
        }
    }
    if (A && !dense) {
        sp_select_stage(c, M, l, pos); /* ends at a barrier: every selection head's positions listed */
        sp_attn_rows(c->ith, c->nth, M, l, ws->q, ws->sel_heads, ws->sel_idx, ws->sel_cnt, 0, 0, ws->scores, ws->pm,
                     ws->pl, ws->po, t->row);
    } else {
        sp_attn_rows(c->ith, c->nth, M, l, ws->q, M->n_kv, NULL, NULL, start, pos - start + 1, ws->scores, ws->pm,
                     ws->pl, ws->po, t->row);
    }
    SP_BARRIER(); /* every thread's partials written */
    sp_attn_merge(c->ith, c->nth, M->n_heads, hd, ws->pm, ws->pl, ws->po, ws->gm, ws->gl, ws->att);
    if (A && !dense && c->ith == 0) sp_select_tally(M, ws, l, pos);
    SP_BARRIER(); /* every head's output complete */
    if (A && A->method == SP_ATTN_H2O) /* the probabilities read accumulate (the dense prompt's included) */
        sp_h2o_observe(c->ith, c->nth, M, l, dense ? NULL : ws->sel_idx, ws->sel_cnt, start, pos - start + 1,
                       ws->scores, ws->pm, ws->gm, ws->gl);
    n_act = sp_layer_mask(L, SP_O, dense, ws->att, dq, t->act, t->scratch);
    sp_linear(c, M, l, SP_O, ws->att, dq, t->act, n_act, d, ws->proj, dense);
    if (L->attn_out_norm) {
        SP_BARRIER(); /* the norm reads all of proj */
    }
    sp_add_branch(c->ith, c->nth, d, M->eps, L->attn_out_norm, ws->proj, ws->h);
    SP_BARRIER(); /* h complete before the MLP reads it */
}
