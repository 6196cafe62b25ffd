/* Attention: q, k, v with their input masks, QK-norm and RoPE, the KV cache, softmax over a range of positions. */
#include <string.h>

#include "ops.h"

static void rope(float *v, const float *c, const float *s, int hd) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
    }
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
            const size_t row = (((size_t)l * nkv + kv) * S + pos) * hd;
            memcpy(M->k_cache + row, kh, sizeof(float) * hd);
            memcpy(M->v_cache + row, v + (size_t)kv * hd, sizeof(float) * hd);
        }
    }
}

/* One token's attention in one layer: for this thread's share of the query heads, softmax(scale q.K[p]) over the
 * cached positions p in [start, pos], then the weighted sum of V[p]. K, V: the layer's cache [n_kv, max_seq,
 * head_dim]; query head h reads kv head h / (n_heads / n_kv). scores: [n_heads, max_seq] scratch. */
void sp_attention(int ith, int nth, const float *q, const float *K, const float *V, int n_heads, int n_kv,
                  int head_dim, int max_seq, int start, int pos, float scale, float *scores, float *out) {
    SP_ASSERT(n_kv > 0 && n_heads % n_kv == 0 && 0 <= start && start <= pos && pos < max_seq);
    const int hd = head_dim, group = n_heads / n_kv;
    const int h0 = (int)((long)n_heads * ith / nth), h1 = (int)((long)n_heads * (ith + 1) / nth);
    for (int hh = h0; hh < h1; hh++) {
        const float *qh = q + (size_t)hh * hd;
        const float *Kh = K + (size_t)(hh / group) * max_seq * hd, *Vh = V + (size_t)(hh / group) * max_seq * hd;
        float *sc = scores + (size_t)hh * max_seq, mx = -INFINITY;
        for (int p = start; p <= pos; p++) {
            const float *kp = Kh + (size_t)p * hd;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < hd; i++) dot += qh[i] * kp[i];
            sc[p] = dot * scale;
            if (sc[p] > mx) mx = sc[p];
        }
        float sum = 0.f;
        for (int p = start; p <= pos; p++) {
            sc[p] = expf(sc[p] - mx);
            sum += sc[p];
        }
        float *o = out + (size_t)hh * hd;
        for (int i = 0; i < hd; i++) o[i] = 0.f;
        for (int p = start; p <= pos; p++) {
            const float w = sc[p] / sum, *vp = Vh + (size_t)p * hd;
#pragma omp simd
            for (int i = 0; i < hd; i++) o[i] += w * vp[i];
        }
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
    const int start = L->window > 0 && pos - L->window + 1 > 0 ? pos - L->window + 1 : 0;
    const size_t layer = (size_t)l * M->n_kv * M->max_seq * hd;
    sp_attention(c->ith, c->nth, ws->q, M->k_cache + layer, M->v_cache + layer, M->n_heads, M->n_kv, hd,
                 M->max_seq, start, pos, M->attn_scale, ws->scores, ws->att);
    SP_BARRIER(); /* every head's output complete */
    n_act = sp_layer_mask(L, SP_O, dense, ws->att, dq, t->act, t->scratch);
    sp_linear(c, M, l, SP_O, ws->att, dq, t->act, n_act, d, ws->proj, dense);
    if (L->attn_out_norm) {
        SP_BARRIER(); /* the norm reads all of proj */
    }
    sp_add_branch(c->ith, c->nth, d, M->eps, L->attn_out_norm, ws->proj, ws->h);
    SP_BARRIER(); /* h complete before the MLP reads it */
}
