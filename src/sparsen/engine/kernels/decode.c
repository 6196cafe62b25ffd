/* The decode loop (one token per call, one parallel region), the workspace, and the ABI checks Python runs. */
#include <omp.h>
#include <string.h>

#include "ops.h"

int sp_abi_version(void) { return SP_ABI_VERSION; }

/* The instruction-set extensions this build was compiled with (-march=native), in /proc/cpuinfo's spelling: Python
 * refuses the library on a CPU that lacks one (a build carried over from another kind of machine). */
const char *sp_isa(void) {
    return ""
#ifdef __AVX__
           "avx,"
#endif
#ifdef __AVX2__
           "avx2,"
#endif
#ifdef __FMA__
           "fma,"
#endif
#ifdef __F16C__
           "f16c,"
#endif
#ifdef __AVXVNNI__
           "avx_vnni,"
#endif
#ifdef __AVX512F__
           "avx512f,"
#endif
#ifdef __AVX512CD__
           "avx512cd,"
#endif
#ifdef __AVX512BW__
           "avx512bw,"
#endif
#ifdef __AVX512DQ__
           "avx512dq,"
#endif
#ifdef __AVX512VL__
           "avx512vl,"
#endif
#ifdef __AVX512VNNI__
           "avx512_vnni,"
#endif
#ifdef __AVX512BF16__
           "avx512_bf16,"
#endif
#ifdef __AVX512VBMI__
           "avx512vbmi,"
#endif
#ifdef __AVX512FP16__
           "avx512_fp16,"
#endif
#ifdef __AMX_TILE__
           "amx_tile,"
#endif
        ;
}

long sp_struct_size(int which) {
    switch (which) {
    case SP_STRUCT_RULE: return (long)sizeof(sp_rule);
    case SP_STRUCT_LAYER: return (long)sizeof(sp_layer);
    case SP_STRUCT_MODEL: return (long)sizeof(sp_model);
    case SP_STRUCT_ATTN: return (long)sizeof(sp_attn);
    case SP_STRUCT_WEIGHT: return (long)sizeof(sp_weight);
    case SP_STRUCT_HEAD_BOUND: return (long)sizeof(sp_head_bound);
    default: return -1;
    }
}

#define SP_ENUM_STR(name, value) #name "=" #value ","
const char *sp_rule_kinds(void) { return SP_RULE_KINDS(SP_ENUM_STR); }
const char *sp_attn_methods(void) { return SP_ATTN_METHODS(SP_ENUM_STR); }
#undef SP_ENUM_STR

/* Everything the selection ops assume about sp_model.attn. */
static int check_attn(const sp_model *M) {
    const sp_attn *A = M->attn;
    int any = 0;
    for (int l = 0; l < M->n_layers; l++) {
        if (M->layers[l].attn_select && (!A || M->layers[l].window)) return SP_ERR_ATTN;
        any |= M->layers[l].attn_select;
    }
    if (!A) return SP_OK;
    const int m = A->method, G = A->sel_heads;
    if (m < SP_ATTN_ORACLE_TOPK || m > SP_ATTN_SKETCH || (G != M->n_kv && G != M->n_heads) || !A->tally || !any)
        return SP_ERR_ATTN;
    if (A->tokens < 0 || (A->tokens == 0 && !(A->density > 0 && A->density <= 1)) || !(A->p > 0 && A->p <= 1))
        return SP_ERR_ATTN;
    if (m == SP_ATTN_QUEST && (A->page < 1 || A->min_pages < 1 || !A->kmin || !A->kmax ||
                               A->max_pages < (M->max_seq + A->page - 1) / A->page))
        return SP_ERR_ATTN;
    if (m == SP_ATTN_H2O && (!A->mass || !A->held || !(A->recent_share >= 0 && A->recent_share <= 1)))
        return SP_ERR_ATTN;
    if (m == SP_ATTN_DOUBLE_SPARSITY || m == SP_ATTN_SKETCH) {
        const int fp32 = A->label_bits == 0 && A->labels && !A->codes;
        const int int8 = A->label_bits == 8 && !A->labels && A->codes && A->code_scale;
        if (A->rank < 1 || !A->proj || !A->qproj || !(fp32 || int8) ||
            (A->lab_heads != M->n_kv && A->lab_heads != M->n_heads))
            return SP_ERR_ATTN;
    } else if (A->labels || A->codes) {
        return SP_ERR_ATTN;
    }
    if (A->sinks < 0 || A->local < 0) return SP_ERR_ATTN;
    return SP_OK;
}

static int max_experts(const sp_model *M) {
    int e = 0;
    for (int l = 0; l < M->n_layers; l++)
        if (M->layers[l].rule[SP_DOWN].kind == SP_RULE_EXPERTS && M->layers[l].n_experts > e) e = M->layers[l].n_experts;
    return e;
}

/* An experts rule's router, sizes and channel lists (each channel of [0, inter) in exactly one expert). */
static int check_experts(const sp_model *M, const sp_layer *L) {
    if (!L->router || !L->experts || L->n_experts < 1 || L->expert_size < 1 || L->top_k < 1 ||
        L->top_k > L->n_experts || (long)L->n_experts * L->expert_size != M->inter)
        return SP_ERR_RULE;
    if (L->rule[SP_GATE].kind != SP_RULE_DENSE || L->rule[SP_UP].kind != SP_RULE_DENSE) return SP_ERR_RULE;
    unsigned char *seen = calloc((size_t)M->inter, 1);
    if (!seen) return SP_ERR_NOMEM;
    int st = SP_OK;
    for (int i = 0; i < M->inter && st == SP_OK; i++) {
        const int ch = L->experts[i];
        if (ch < 0 || ch >= M->inter || seen[ch]) st = SP_ERR_RULE;
        else seen[ch] = 1;
    }
    free(seen);
    return st;
}

static int max_rank(const sp_model *M) {
    int r = 0;
    for (int l = 0; l < M->n_layers; l++)
        for (int j = 0; j < SP_N_LIN; j++)
            if (M->layers[l].lr_a[j] && M->layers[l].lr_rank[j] > r) r = M->layers[l].lr_rank[j];
    return r;
}

/* A weight's type and storage for an [out, in] matrix kept transposed (W^T rows of `out`) or as rows (of `in`). */
static int check_weight(const sp_weight *w, int in, int out, int as_rows) {
    if (!w->data) return SP_ERR_SHAPE;
    if (w->type == SP_W_F32 || w->type == SP_W_BF16) return w->stride == (as_rows ? in : out) ? SP_OK : SP_ERR_SHAPE;
    if (!sp_q_transposed_type(w->type)) return SP_ERR_SHAPE;
    if ((w->block != 16 && w->block != 32) || in % w->block || !w->scale) return SP_ERR_SHAPE;
    if (as_rows) return w->type != SP_W_Q4_RUNS && w->stride == in ? SP_OK : SP_ERR_SHAPE;
    if (w->type == SP_W_Q4_RUNS && w->stride > SP_Q4_RUNS_MAX_OUT) return SP_ERR_SHAPE;
    return w->stride >= out && w->stride % (w->type == SP_W_Q8 ? 16 : 64) == 0 ? SP_OK : SP_ERR_SHAPE;
}

/* (in, out) of block linear j (enum SP_Q ...). */
static void linear_dims(const sp_model *M, int j, int *in, int *out) {
    const int dq = M->n_heads * M->head_dim, dkv = M->n_kv * M->head_dim;
    static const int ins[SP_N_LIN] = {0, 0, 0, 1, 0, 0, 2}, outs[SP_N_LIN] = {1, 3, 3, 0, 2, 2, 0};
    const int dims[4] = {M->d, dq, M->inter, dkv};
    *in = dims[ins[j]], *out = dims[outs[j]];
}

/* Everything the ops assume about a model, checked once (the ops only assert it). */
int sp_check_model(const sp_model *M) {
    if (!M) return SP_ERR_SHAPE;
    if (M->n_layers < 1 || M->d < 1 || M->n_heads < 1 || M->n_kv < 1 || M->head_dim < 2 || M->head_dim % 2 ||
        M->inter < 1 || M->vocab < 1 || M->max_seq < 1)
        return SP_ERR_SHAPE;
    if (M->n_heads % M->n_kv) return SP_ERR_HEADS;
    if (M->activation != SP_ACT_SILU && M->activation != SP_ACT_GELU_TANH) return SP_ERR_SHAPE;
    if (!M->layers || !M->embed || !M->final_norm || !M->k_cache || !M->v_cache || !M->active || !M->seen ||
        check_weight(&M->lm_head, M->d, M->vocab, 1) != SP_OK)
        return SP_ERR_SHAPE;
    if (M->head_bound && sp_head_bound_check(&M->lm_head, M->head_bound, M->vocab, M->d) != SP_OK) return SP_ERR_SHAPE;
    for (int l = 0; l < M->n_layers; l++) {
        const sp_layer *L = &M->layers[l];
        if (!L->attn_norm || !L->mlp_norm || !L->rope_cos || !L->rope_sin || L->window < 0) return SP_ERR_SHAPE;
        for (int j = 0; j < SP_N_LIN; j++) {
            const sp_rule *r = &L->rule[j];
            int in, out;
            linear_dims(M, j, &in, &out);
            const int down_kind = L->rule[SP_DOWN].kind;
            const int as_rows = (j == SP_UP && (down_kind == SP_RULE_GATE_ACT || down_kind == SP_RULE_EXPERTS)) ||
                                (j == SP_GATE && down_kind == SP_RULE_EXPERTS);
            if (check_weight(&L->w[j], in, out, as_rows) != SP_OK) return SP_ERR_SHAPE;
            if (r->kind < SP_RULE_DENSE || r->kind > SP_RULE_EXPERTS) return SP_ERR_RULE;
            if ((r->kind == SP_RULE_GATE_ACT || r->kind == SP_RULE_EXPERTS) && j != SP_DOWN) return SP_ERR_RULE;
            if ((r->kind == SP_RULE_THRESHOLD || r->kind == SP_RULE_GATE_ACT) && !r->thr) return SP_ERR_RULE;
            if (!L->lr_a[j] != !L->lr_b[j] || (L->lr_a[j] && L->lr_rank[j] < 1)) return SP_ERR_SHAPE;
            if (L->lr_a[j] && r->kind != SP_RULE_THRESHOLD) return SP_ERR_RULE;
        }
        if (L->rule[SP_DOWN].kind == SP_RULE_EXPERTS) {
            const int st = check_experts(M, L);
            if (st != SP_OK) return st;
        }
    }
    return check_attn(M);
}

/* Carves n_bytes, 64-byte aligned, off the arena (size pass when base is NULL). */
static void *carve(char *base, size_t *off, size_t n_bytes) {
    void *p = base ? base + *off : NULL;
    *off += (n_bytes + 63) / 64 * 64;
    return p;
}

/* Lays every buffer out in one arena; with base NULL it only sizes them. */
static size_t layout(sp_workspace *ws, char *base) {
    size_t off = 0;
    const int d = ws->d, I = ws->inter, dq = ws->n_heads * ws->head_dim, dkv = ws->n_kv * ws->head_dim;
    const int nt = ws->n_threads, wide = ws->wide;
    const size_t F = sizeof(float), N = sizeof(int);
    ws->h = carve(base, &off, F * d);
    ws->q = carve(base, &off, F * dq);
    ws->k = carve(base, &off, F * dkv);
    ws->v = carve(base, &off, F * dkv);
    ws->att = carve(base, &off, F * dq);
    ws->g = carve(base, &off, F * I);
    ws->u = carve(base, &off, F * I);
    ws->mid = carve(base, &off, F * I);
    ws->proj = carve(base, &off, F * wide);
    ws->scores = carve(base, &off, F * (size_t)ws->n_heads * ws->max_seq);
    ws->pm = carve(base, &off, F * (size_t)nt * ws->n_heads);
    ws->pl = carve(base, &off, F * (size_t)nt * ws->n_heads);
    ws->po = carve(base, &off, F * (size_t)nt * dq);
    ws->gm = carve(base, &off, F * ws->n_heads);
    ws->gl = carve(base, &off, F * ws->n_heads);
    ws->tmax = carve(base, &off, F * (size_t)nt * ws->n_heads);
    ws->tsum = carve(base, &off, F * (size_t)nt * ws->n_heads);
    const size_t sel = ws->sel_heads ? (size_t)ws->max_seq : 0; /* selection buffers only with sp_model.attn */
    ws->vals = carve(base, &off, F * ws->sel_heads * sel);
    ws->sel_idx = carve(base, &off, N * ws->sel_heads * sel);
    ws->sel_cnt = carve(base, &off, N * ws->sel_heads);
    ws->kept = carve(base, &off, N * ws->n_kv);
    ws->part = carve(base, &off, F * 2 * (size_t)nt * ws->stride);
    ws->lr_t = carve(base, &off, F * (ws->max_rank + 1));
    ws->lr_y = carve(base, &off, F * wide);
    ws->gate_act = carve(base, &off, N * I);
    ws->expert_scores = carve(base, &off, F * (ws->max_experts + 1));
    ws->iota = carve(base, &off, N * (wide > ws->max_rank ? wide : ws->max_rank));
    ws->head_best = carve(base, &off, F * nt);
    ws->thr = carve(base, &off, sizeof(sp_thread) * nt);
    for (int t = 0; t < nt; t++) {
        sp_thread th;
        th.x = carve(base, &off, F * wide);
        th.scratch = carve(base, &off, F * wide);
        th.act = carve(base, &off, N * wide);
        th.act2 = carve(base, &off, N * wide);
        th.drop = carve(base, &off, N * wide);
        th.row = carve(base, &off, F * ws->head_dim);
        th.qp = carve(base, &off, F * (size_t)ws->n_heads * ws->rank);
        th.sel = carve(base, &off, 3 * F * sel); /* h2o: sel doubles; top_budget: 3 sel floats */
        th.mark = carve(base, &off, sel);
        if (base) ws->thr[t] = th;
    }
    return off;
}

sp_workspace *sp_workspace_create(const sp_model *M, int n_threads, int *status) {
    int st = sp_check_model(M);
    if (st == SP_OK && n_threads < 1) st = SP_ERR_THREADS;
    if (st != SP_OK) {
        if (status) *status = st;
        return NULL;
    }
    sp_workspace *ws = calloc(1, sizeof(sp_workspace));
    if (!ws) {
        if (status) *status = SP_ERR_NOMEM;
        return NULL;
    }
    ws->d = M->d, ws->inter = M->inter, ws->n_heads = M->n_heads, ws->n_kv = M->n_kv, ws->head_dim = M->head_dim;
    ws->max_seq = M->max_seq, ws->n_layers = M->n_layers, ws->n_threads = n_threads;
    const int dq = M->n_heads * M->head_dim;
    ws->wide = M->d > M->inter ? M->d : M->inter;
    if (dq > ws->wide) ws->wide = dq;
    ws->stride = (ws->wide + 63) / 64 * 64; /* room for a Q4 weight's padded outputs */
    ws->max_rank = max_rank(M);
    ws->max_experts = max_experts(M);
    if (M->attn) ws->sel_heads = M->attn->sel_heads, ws->rank = M->attn->rank, ws->max_pages = M->attn->max_pages;
    const size_t bytes = layout(ws, NULL);
    ws->arena = aligned_alloc(64, bytes);
    if (!ws->arena) {
        free(ws);
        if (status) *status = SP_ERR_NOMEM;
        return NULL;
    }
    memset(ws->arena, 0, bytes);
    layout(ws, ws->arena);
    const int n_iota = ws->wide > ws->max_rank ? ws->wide : ws->max_rank;
    for (int i = 0; i < n_iota; i++) ws->iota[i] = i;
    if (status) *status = SP_OK;
    return ws;
}

void sp_workspace_free(sp_workspace *ws) {
    if (!ws) return;
    free(ws->arena);
    free(ws);
}

int sp_decode_step(const sp_model *M, sp_workspace *ws, int pos, int token, float *logits, int dense, int greedy) {
    if (!M || !ws || !logits) return SP_ERR_SHAPE;
    if (pos < 0 || pos >= M->max_seq) return SP_ERR_POS;
    if (token < 0 || token >= M->vocab) return SP_ERR_TOKEN;
    if (ws->d != M->d || ws->inter != M->inter || ws->n_heads != M->n_heads || ws->n_kv != M->n_kv ||
        ws->head_dim != M->head_dim || ws->max_seq != M->max_seq || ws->n_layers != M->n_layers ||
        ws->max_rank < max_rank(M) || ws->max_experts < max_experts(M) || (M->attn && (ws->sel_heads != M->attn->sel_heads || ws->rank < M->attn->rank)))
        return SP_ERR_THREADS;
    const int d = M->d;
    const float *e = M->embed + (size_t)token * d;
    for (int i = 0; i < d; i++) ws->h[i] = e[i] * M->embed_scale;

#pragma omp parallel num_threads(ws->n_threads)
    {
        sp_ctx c = {omp_get_thread_num(), omp_get_num_threads(), 0, ws, NULL};
        SP_ASSERT(c.nth <= ws->n_threads); /* the buffers are per thread */
        c.t = &ws->thr[c.ith];
        for (int l = 0; l < M->n_layers; l++) {
            const sp_layer *L = &M->layers[l];
            if (L->basis) { /* change of basis of the residual stream, h <- h R, in place: every partial sum has
                             * read h before the GEMV's barrier, and only then are the shares of h written */
                const sp_weight R = {SP_W_F32, 0, 0, d, L->basis, NULL, NULL};
                sp_gemv(&c, &R, d, ws->h, ws->iota, d, ws->h, NULL);
                SP_BARRIER();
            }
            sp_attn_stage(&c, M, l, pos, dense);
            sp_mlp_stage(&c, M, l, dense);
        }
        sp_rmsnorm(ws->h, M->final_norm, d, M->eps, c.t->x);
        if (greedy && M->head_bound) {
            sp_head_greedy(c.ith, c.nth, &M->lm_head, M->head_bound, M->vocab, d, c.t->x, M->logit_softcap, logits,
                           ws->head_best, c.t->scratch, M->head_tally);
        } else {
            int lo, hi;
            sp_split(M->vocab, c.ith, c.nth, &lo, &hi);
            sp_dot_rows(&M->lm_head, d, c.t->x, NULL, lo, hi, logits);
            sp_softcap(logits, lo, hi, M->logit_softcap);
        }
    }
    return SP_OK;
}
