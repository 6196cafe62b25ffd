/* Internal to the kernels: the workspace, the per-thread context, and one function per op.
 *
 * Style (after llama.cpp's ggml-cpu): an op is a plain function that does this thread's share of the work,
 * given ith (this thread) and nth (the team size), and never synchronises; the stage functions (attention.c,
 * mlp.c, decode.c) call the ops in order with a barrier (SP_BARRIER) wherever an op reads what another thread
 * wrote. Shapes are asserted at the top of each op (an assertion is a bug in the kernels or in the Python that
 * filled the structs, which sp_check_model screens first: it aborts with the failed condition).
 */
#ifndef SPARSEN_OPS_H
#define SPARSEN_OPS_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#if (defined(__F16C__) && defined(__AVX__)) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "sparsen.h"

#define SP_ASSERT(c)                                                                        \
    do {                                                                                    \
        if (!(c)) {                                                                         \
            fprintf(stderr, "sparsen kernels: %s:%d: assertion failed: %s\n", __FILE__, __LINE__, #c); \
            abort();                                                                        \
        }                                                                                   \
    } while (0)

#define SP_BARRIER() _Pragma("omp barrier")

typedef struct {
    float *x;       /* [wide] the normed input of the current linear (each thread holds its own copy) */
    float *scratch; /* [wide] */
    int *act;       /* [wide] active input channels of the current linear, ascending */
    int *act2;      /* [wide] up's own mask when it differs from gate's */
    int *drop;      /* [wide] dropped channels (R-Sparse) */
    float *row;     /* [head_dim] a half-precision K or V row widened to fp32 */
    /* KV selection only (NULL without sp_model.attn): */
    float *qp;      /* [n_heads, rank] the query projected on the label basis */
    double *sel;    /* [3 max_seq] floats: the k-th-largest search's buffers (h2o: max_seq doubles) */
    uint8_t *mark;  /* [max_seq] zero between uses: the union of a KV head's lists */
} sp_thread;

struct sp_workspace {
    /* the model it was made for (the step refuses another) */
    int d, inter, n_heads, n_kv, head_dim, max_seq, n_layers;
    int n_threads, wide, stride, max_rank;
    float *h;          /* [d] the residual stream */
    float *q, *k, *v;  /* [n_heads * head_dim], [n_kv * head_dim] x 2 */
    float *att;        /* [n_heads * head_dim] attention output (o's input) */
    float *g, *u, *mid;/* [inter] gate, up, down's input */
    float *proj;       /* [wide] a branch's output before the residual add */
    float *scores;     /* [n_heads, max_seq] per slot of the positions read: exp(logit - the thread's max); an
                        * estimate's per-head scores by key before that */
    float *pm, *pl, *po;/* [n_threads, n_heads] (x head_dim for po): each thread's partial attention: max, sum of
                         * exp, exp-weighted V sum over its share of the positions */
    float *gm, *gl;    /* [n_heads] the merged max and sum of exp (the probabilities H2O accumulates) */
    float *tmax, *tsum;/* [n_threads, n_heads] an estimate's per-thread maxima and sums of exp */
    /* KV selection (sized 0 without sp_model.attn) */
    int sel_heads, rank, max_pages;
    float *vals;       /* [sel_heads, max_seq] what a selection head ranks (keys, or pages for Quest) */
    int *sel_idx;      /* [sel_heads, max_seq] the positions each selection head reads, ascending */
    int *sel_cnt;      /* [sel_heads] */
    int *kept;         /* [n_kv] keys read per KV head (union over its selection heads) */
    float *part;       /* [2, n_threads, stride] GEMV partial sums, two alternating sets */
    float *lr_t, *lr_y;/* [max_rank], [wide] R-Sparse: A x_dropped, then B of it */
    int *gate_act;     /* [inter] active MLP channels under a gate-activation or experts rule */
    int n_gate_act;
    float *expert_scores; /* [max_experts] the router's scores of one token */
    int max_experts;
    int *iota;         /* [wide] 0, 1, 2, ...: every channel active */
    float *head_best;  /* [n_threads] a greedy lm_head's best probed logit per thread */
    sp_thread *thr;    /* [n_threads] */
    void *arena;       /* the one allocation every buffer above lives in */
};

/* What one thread of the decode step carries from op to op. */
typedef struct {
    int ith, nth;
    int phase;         /* which set of partial sums the next GEMV writes */
    sp_workspace *ws;
    sp_thread *t;      /* this thread's buffers */
} sp_ctx;

/* This thread's share [lo, hi) of n items (heads, keys). */
/* A weight whose transposed product is sp_q_axpy's: 4-bit codes (tile-major or runs) or int8. */
static inline int sp_q_transposed_type(int type) { return type == SP_W_Q4 || type == SP_W_Q8 || type == SP_W_Q4_RUNS; }

static inline void sp_range(int n, int ith, int nth, int *lo, int *hi) {
    *lo = (int)((long)n * ith / nth);
    *hi = (int)((long)n * (ith + 1) / nth);
}

/* Row r of a KV-dtype array ([..., head_dim] rows) as fp32: a pointer into it (fp32), or into tmp (half, widened). */
static inline const float *sp_kv_row(const void *a, int f16, size_t r, int hd, float *restrict tmp) {
    if (!f16) return (const float *)a + r * hd;
    const _Float16 *restrict h = (const _Float16 *)a + r * hd;
    int i = 0;
#if defined(__F16C__) && defined(__AVX__)
    /* GCC 12 widens _Float16 one element at a time even in a simd loop: 8 per instruction here */
    for (; i + 8 <= hd; i += 8) _mm256_storeu_ps(tmp + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < hd; i++) tmp[i] = (float)h[i];
    return tmp;
}

/* exp(x) for x <= 0 (a logit minus its maximum), within 2 ulp of expf, written so `omp simd` loops vectorize it
 * (libm's expf does not without -ffast-math): x = n ln2 + r, exp(r) by Cephes' polynomial, 2^n from the exponent
 * bits; 0 below -87.3 (and for -inf). */
static inline float sp_exp(float x) {
    const float xc = x < -87.3f ? -87.3f : x;
    const float n = __builtin_rintf(xc * 1.44269504088896341f);
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } e = {((int32_t)n + 127) << 23};
    return x < -87.3f ? 0.f : p * e.f;
}

#ifdef __AVX2__
/* sp_exp on 8 lanes: the same operations in the same order, so the same values as the scalar form */
static inline __m256 sp_exp8(__m256 x) {
    const __m256 lim = _mm256_set1_ps(-87.3f);
    const __m256 xc = _mm256_max_ps(x, lim);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lim, _CMP_LT_OQ), _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

/* x[i] <- sp_exp(x[i] - mx) over [lo, hi), returning their sum. Written with vectors: GCC leaves the `omp simd`
 * form scalar (the union's bit cast is a memory write to it), 8x slower in every softmax. */
static inline float sp_exp_shift_sum(float *restrict x, int lo, int hi, float mx) {
    float sum = 0.f;
    int i = lo;
#ifdef __AVX2__
    const __m256 m = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= hi; i += 8) {
        const __m256 e = sp_exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int j = 0; j < 8; j++) sum += lanes[j];
#endif
    for (; i < hi; i++) {
        x[i] = sp_exp(x[i] - mx);
        sum += x[i];
    }
    return sum;
}

static inline float sp_dot(const float *restrict a, const float *restrict b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline float sp_bf16(uint16_t b) {
    union { uint32_t u; float f; } v;
    v.u = ((uint32_t)b) << 16;
    return v.f;
}

/* A logit softcap: y <- cap tanh(y / cap) over [lo, hi) for cap > 0 (-inf, a row a greedy step left out, stays). */
static inline float sp_softcap1(float y, float cap) { return cap * tanhf(y / cap); }
static inline void sp_softcap(float *y, int lo, int hi, float cap) {
    for (int j = lo; cap > 0.f && j < hi; j++)
        if (y[j] != -INFINITY) y[j] = sp_softcap1(y[j], cap);
}

static inline float sp_act(int kind, float g) {
    if (kind == SP_ACT_GELU_TANH) {
        const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
        return 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
    }
    return g / (1.f + expf(-g));
}

/* gemv.c */
void sp_split(int n, int ith, int nth, int *lo, int *hi);
void sp_gemv_partial(int ith, int nth, const sp_weight *w, int out, const float *x, const int *act, int n_act,
                     float *part, int stride);
void sp_gemv_reduce(int ith, int nth, int out, const float *part, int stride, float *y);
void sp_dot_rows(const sp_weight *w, int in, const float *x, const int *rows, int r0, int r1, float *y);
void sp_gemv(sp_ctx *c, const sp_weight *w, int out, const float *x, const int *act, int n_act, float *y,
             double *timing);
void sp_linear(sp_ctx *c, const sp_model *M, int l, int j, const float *x, int n_in, const int *act,
               int n_act, int out, float *y, int dense);

/* quant.c */
void sp_q_axpy(const sp_weight *w, int out, const float *x, const int *act, int n_act, float *y);
int sp_q_split(const sp_weight *w, const int *act, int n_act, int ith, int nth);
void sp_q_dot_rows(const sp_weight *w, int in, const float *x, const int *rows, int r0, int r1, float *y);
float sp_q_dot_row(const sp_weight *w, int in, const float *x, int r);

/* head.c */
int sp_head_bound_check(const sp_weight *w, const sp_head_bound *hb, int vocab, int d);
void sp_head_greedy(int ith, int nth, const sp_weight *w, const sp_head_bound *hb, int vocab, int d, const float *x,
                    float cap, float *logits, float *best, void *scratch, int64_t *tally);

/* mask.c */
int sp_mask(const sp_rule *r, const float *x, int n, int *act, float *scratch);
int sp_layer_mask(const sp_layer *L, int j, int dense, const float *x, int n, int *act, float *scratch);

/* norm.c */
void sp_rmsnorm(const float *h, const float *g, int n, float eps, float *out);
void sp_add_branch(int ith, int nth, int d, float eps, const float *gain, const float *y, float *h);

/* attention.c */
void sp_qk_prepare(int ith, int nth, const sp_model *M, const sp_layer *L, int l, int pos, float *q, float *k,
                   const float *v);
void sp_attn_rows(int ith, int nth, const sp_model *M, int l, const float *q, int n_groups, const int *idx,
                  const int *cnt, int base, int n, float *scores, float *pm, float *pl, float *po, float *tmp);
void sp_attn_merge(int ith, int nth, int n_heads, int hd, const float *pm, const float *pl, const float *po,
                   float *gm, float *gl, float *out);
void sp_attn_stage(sp_ctx *c, const sp_model *M, int l, int pos, int dense);

/* select.c */
void sp_select_append(int ith, int nth, const sp_model *M, int l, int pos, float *tmp);
void sp_select_stage(sp_ctx *c, const sp_model *M, int l, int pos);
void sp_h2o_observe(int ith, int nth, const sp_model *M, int l, const int *idx, const int *cnt, int base, int n,
                    const float *scores, const float *pm, const float *gm, const float *gl);
void sp_select_tally(const sp_model *M, const sp_workspace *ws, int l, int pos);

/* mlp.c */
void sp_mlp_stage(sp_ctx *c, const sp_model *M, int l, int dense);

#endif
