/* Decode-time KV selection (sp_attn): the state a new key updates, each method's estimate and choice of positions,
 * restated from src/sparsen/methods/attention/ (one file per method there; tests check the two agree). One op per
 * step, the threads splitting keys (estimates) or selection heads (choices), barriers between them. */
#include <string.h>

#include "ops.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* core.attention.budget_tokens: `tokens`, or ceil(density n), within [1, n]. */
static int budget(const sp_attn *A, int n) {
    long b = A->tokens > 0 ? A->tokens : (long)ceil((double)n * A->density - 1e-9);
    return (int)(b < 1 ? 1 : b > n ? n : b);
}

/* head_dim vectors the estimate reads per KV head for a query with n causal keys (the selectors' estimate_reads) */
static double estimate_reads(const sp_attn *A, int n, int hd) {
    switch (A->method) {
    case SP_ATTN_ORACLE_TOPK:
    case SP_ATTN_ORACLE_TOPP: return n;
    case SP_ATTN_QUEST: return 2.0 * ((n - 1) / A->page);
    case SP_ATTN_DOUBLE_SPARSITY: return (double)n * A->rank / hd;
    case SP_ATTN_SKETCH: /* sketch.sketch_bytes over an fp32 K row's bytes */
        return (double)n * (A->label_bits ? (A->rank * A->label_bits + 7) / 8 + 4 : 4 * A->rank) / (4.0 * hd);
    default: return 0.0;
    }
}

/* The k-th largest (1 <= k <= n) of a[0:n), which is reordered (quickselect, descending). */
#define KTH_LARGEST(name, T)                                                                                    \
    static T name(T *a, int n, int k) {                                                                         \
        int lo = 0, hi = n - 1;                                                                                 \
        const int t = k - 1;                                                                                    \
        while (lo < hi) {                                                                                       \
            T x = a[lo], y = a[(lo + hi) / 2], z = a[hi], pv;                                                   \
            pv = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y)); /* median of three */  \
            int i = lo, j = hi;                                                                                 \
            while (i <= j) {                                                                                    \
                while (a[i] > pv) i++;                                                                          \
                while (a[j] < pv) j--;                                                                          \
                if (i <= j) {                                                                                   \
                    const T tmp = a[i];                                                                         \
                    a[i++] = a[j], a[j--] = tmp;                                                                \
                }                                                                                               \
            }                                                                                                   \
            if (t <= j) hi = j;                                                                                 \
            else if (t >= i) lo = i;                                                                            \
            else return a[t]; /* between the two halves: equal to the pivot */                                 \
        }                                                                                                       \
        return a[t];                                                                                            \
    }
KTH_LARGEST(kth_largest_f, float)
KTH_LARGEST(kth_largest_d, double)

#if !defined(__AVX512F__) && defined(__AVX2__)
/* AVX2 has no compress: lane order of each 8-bit mask's set lanes, first (keep_at_least) */
static uint8_t compress_lanes[256][8];
__attribute__((constructor)) static void init_compress_lanes(void) {
    for (int mask = 0; mask < 256; mask++)
        for (int i = 0, c = 0; i < 8; i++)
            if (mask >> i & 1) compress_lanes[mask][c++] = (uint8_t)i;
}
#endif

/* The values of v[0:m) that compare CMP against t (into vals, when given) and their positions (into idx, when
 * given), in order; returns their count. Both buffers need room for m (the SIMD loops store a vector's lanes past
 * the count, below m). One loop per comparison (the vector compare takes an immediate). */
enum { KEEP_GE, KEEP_GT, KEEP_LT };
#if !defined(__AVX512F__) && defined(__AVX2__)
#define KEEP_SIMD(CMP)                                                                                          \
    const __m256 tt = _mm256_set1_ps(t);                                                                        \
    for (; j + 8 <= m; j += 8) {                                                                                \
        const __m256 x = _mm256_loadu_ps(v + j);                                                                \
        const int k = _mm256_movemask_ps(_mm256_cmp_ps(x, tt, CMP));                                            \
        const __m256i lanes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)compress_lanes[k]));        \
        if (vals) _mm256_storeu_ps(vals + c, _mm256_permutevar8x32_ps(x, lanes));                               \
        if (idx) _mm256_storeu_si256((__m256i *)(idx + c), _mm256_add_epi32(lanes, _mm256_set1_epi32(j)));      \
        c += __builtin_popcount((unsigned)k);                                                                   \
    }
#elif defined(__AVX512F__) /* register compress, then a plain store: the memory form is microcoded on AMD Zen 4 */
#define KEEP_SIMD(CMP)                                                                                          \
    const __m512 tt = _mm512_set1_ps(t);                                                                        \
    const __m512i sixteen = _mm512_set1_epi32(16);                                                              \
    __m512i ix = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);                      \
    for (; j + 16 <= m; j += 16) {                                                                              \
        const __m512 x = _mm512_loadu_ps(v + j);                                                                \
        const __mmask16 k = _mm512_cmp_ps_mask(x, tt, CMP);                                                     \
        if (vals) _mm512_storeu_ps(vals + c, _mm512_maskz_compress_ps(k, x));                                   \
        if (idx) _mm512_storeu_si512((void *)(idx + c), _mm512_maskz_compress_epi32(k, ix));                    \
        c += __builtin_popcount((unsigned)k);                                                                   \
        ix = _mm512_add_epi32(ix, sixteen);                                                                     \
    }
#else
#define KEEP_SIMD(CMP)
#endif
#define KEEP_LOOP(CMP, TEST)                                                                                    \
    {                                                                                                           \
        KEEP_SIMD(CMP)                                                                                          \
        for (; j < m; j++) { /* branch-free */                                                                  \
            if (vals) vals[c] = v[j];                                                                           \
            if (idx) idx[c] = j;                                                                                \
            c += (TEST);                                                                                        \
        }                                                                                                       \
        return c;                                                                                               \
    }
static int keep_cmp(const float *restrict v, int m, float t, int op, float *restrict vals, int *restrict idx) {
    int c = 0, j = 0;
    switch (op) {
    case KEEP_GE: KEEP_LOOP(_CMP_GE_OQ, v[j] >= t)
    case KEEP_GT: KEEP_LOOP(_CMP_GT_OQ, v[j] > t)
    default: KEEP_LOOP(_CMP_LT_OQ, v[j] < t)
    }
}

static int keep_at_least(const float *restrict v, int m, float t, float *restrict vals, int *restrict idx) {
    return keep_cmp(v, m, t, KEEP_GE, vals, idx);
}

/* kth_largest_f by passes that split a around a pivot with the vector compress (into buf, then swapping the
 * two): quickselect's partition branches on every value, half of them mispredicted on scores. a and buf (room
 * for n each) are both overwritten. */
static float kth_largest_split(float *a, int n, int k, float *buf) {
    while (n > 64) {
        const float x = a[0], y = a[n / 2], z = a[n - 1];
        const float pv = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));
        const int gt = keep_cmp(a, n, pv, KEEP_GT, buf, NULL);
        if (k <= gt) { /* among the values above the pivot */
            float *t = a;
            a = buf, buf = t, n = gt;
            continue;
        }
        const int ge = keep_cmp(a, n, pv, KEEP_GE, NULL, NULL);
        if (k <= ge) return pv;
        n = keep_cmp(a, n, pv, KEEP_LT, buf, NULL), k -= ge; /* among the values below it */
        float *t = a;
        a = buf, buf = t;
    }
    return kth_largest_f(a, n, k);
}

/* core.attention.top_budget on one row: the positions of v[0:m) at or above its k-th largest (ties included). For
 * a small share of a long row the k-th largest is searched among the values at or above a bound from a sample of
 * 256 (exact whenever k of them reach it: otherwise the whole row), a few times faster than over all of it. tmp and
 * buf: room for m floats each. */
static int top_budget(const float *v, int m, int k, float *tmp, float *buf, int *out) {
    float thr = -INFINITY;
    if (k < m) {
        int c = 0;
        if (m >= 2048 && 4 * k <= m) {
            const int step = m / 256;
            int ns = 0;
            for (int j = 0; j < m; j += step) tmp[ns++] = v[j];
            int ks = (int)(1.5 * k / m * ns) + 8; /* ranked a little lower than k: the bound falls below the answer */
            const float lb = kth_largest_split(tmp, ns, ks < ns ? ks : ns, buf);
            c = keep_at_least(v, m, lb, tmp, NULL);
            if (c >= k) thr = kth_largest_split(tmp, c, k, buf);
        }
        if (c < k) {
            memcpy(tmp, v, sizeof(float) * m);
            thr = kth_largest_split(tmp, m, k, buf);
        }
    }
    return keep_at_least(v, m, thr, NULL, out);
}

int sp_test_top_budget(const float *v, int m, int k, int *out) {
    if (m < 1 || k < 1 || k > m) return SP_ERR_SHAPE;
    float *tmp = malloc(sizeof(float) * 2 * (size_t)m);
    if (!tmp) return SP_ERR_NOMEM;
    const int c = top_budget(v, m, k, tmp, tmp + m, out);
    free(tmp);
    return c;
}

static int cmp_desc(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* oracle.py OracleTopP on one row of probabilities: the largest first until their sum (accumulated in double, as
 * torch's cumsum, compared in fp32) reaches p, every value equal to the last one taken included, zeros never. */
static int top_p(const float *v, int m, double p, float *tmp, int *out) {
    memcpy(tmp, v, sizeof(float) * m);
    qsort(tmp, m, sizeof(float), cmp_desc);
    const float target = (float)(p - 1e-6);
    double cum = 0.0;
    int count = 1;
    for (int j = 0; j < m; j++) {
        cum += tmp[j];
        if (!((float)cum < target)) break;
        count++;
    }
    const float thr = tmp[count - 1 < m - 1 ? count - 1 : m - 1];
    int c = 0;
    for (int j = 0; j < m; j++)
        if (v[j] >= thr && v[j] > 0.f) out[c++] = j;
    return c;
}

/* h2o.py H2O.keep for one selection head and one query: the new key is held; over budget, the held keys outside
 * the recent window keep the `heavy` largest masses (ties: the earlier position) and the recent window is held;
 * an evicted key never returns. Lists the held positions. */
static int h2o_hold(const sp_attn *A, double *mass, uint8_t *held, int n, int b, double *tmp, int *out) {
    held[n - 1] = 1;
    int count = 0;
    for (int j = 0; j < n; j++) count += held[j];
    if (count > b) {
        const int recent = (int)fmin(b, ceil(A->recent_share * b)), heavy = b - recent, old_end = n - recent;
        int m = 0;
        for (int j = 0; j < old_end; j++)
            if (held[j]) tmp[m++] = mass[j];
        const double thr = heavy > 0 ? kth_largest_d(tmp, m, heavy) : INFINITY;
        int above = 0;
        for (int j = 0; j < old_end; j++) above += held[j] && mass[j] > thr;
        int ties = heavy - above;
        for (int j = 0; j < old_end; j++) {
            if (!held[j]) continue;
            held[j] = mass[j] > thr || (mass[j] == thr && ties-- > 0);
        }
        for (int j = old_end; j < n; j++) held[j] = 1;
    }
    int c = 0;
    for (int j = 0; j < n; j++)
        if (held[j]) out[c++] = j;
    return c;
}

/* The int8 codes' tile holding key j of label head `head` (l * lab_heads + lh): [rank, SP_CODE_TILE]. */
static inline int8_t *code_tile(const sp_attn *A, int S, size_t head, int j) {
    const size_t tiles = (size_t)(S + SP_CODE_TILE - 1) / SP_CODE_TILE;
    return A->codes + (head * tiles + (size_t)(j / SP_CODE_TILE)) * A->rank * SP_CODE_TILE;
}

/* The new key at pos of layer l enters the state, as stored in the cache (rounded to half with an fp16 cache):
 * Quest's page summaries (its page's channel min and max; the page's first key starts them) and the label cache
 * (k P per label head, fp32 or int8 codes with a scale). Threads split the KV heads, then the label heads. tmp: [head_dim]. */
void sp_select_append(int ith, int nth, const sp_model *M, int l, int pos, float *tmp) {
    const sp_attn *A = M->attn;
    const int hd = M->head_dim, nkv = M->n_kv, S = M->max_seq, f16 = M->kv_f16;
    SP_ASSERT(A && 0 <= pos && pos < S);
    int lo, hi;
    if (A->method == SP_ATTN_QUEST) {
        const int page = pos / A->page, first = pos % A->page == 0;
        SP_ASSERT(page < A->max_pages);
        sp_range(nkv, ith, nth, &lo, &hi);
        for (int kv = lo; kv < hi; kv++) {
            const size_t row = ((size_t)l * nkv + kv) * S + pos, sum = ((size_t)l * nkv + kv) * A->max_pages + page;
            if (f16) {
                const _Float16 *k = (const _Float16 *)M->k_cache + row * hd;
                _Float16 *mn = (_Float16 *)A->kmin + sum * hd, *mx = (_Float16 *)A->kmax + sum * hd;
                for (int i = 0; i < hd; i++) {
                    mn[i] = first || k[i] < mn[i] ? k[i] : mn[i];
                    mx[i] = first || k[i] > mx[i] ? k[i] : mx[i];
                }
            } else {
                const float *k = (const float *)M->k_cache + row * hd;
                float *mn = (float *)A->kmin + sum * hd, *mx = (float *)A->kmax + sum * hd;
                for (int i = 0; i < hd; i++) {
                    mn[i] = first || k[i] < mn[i] ? k[i] : mn[i];
                    mx[i] = first || k[i] > mx[i] ? k[i] : mx[i];
                }
            }
        }
    }
    if (A->labels || A->codes) {
        const int r = A->rank, per = A->lab_heads / nkv;
        sp_range(A->lab_heads, ith, nth, &lo, &hi);
        for (int lh = lo; lh < hi; lh++) {
            const float *k = sp_kv_row(M->k_cache, f16, ((size_t)l * nkv + lh / per) * S + pos, hd, tmp);
            const float *P = A->proj + ((size_t)l * A->lab_heads + lh) * hd * r;
            float lab[r];
            for (int c = 0; c < r; c++) lab[c] = 0.f;
            for (int d = 0; d < hd; d++)
                for (int c = 0; c < r; c++) lab[c] += k[d] * P[(size_t)d * r + c];
            const size_t head = (size_t)l * A->lab_heads + lh;
            if (A->codes) { /* sketch.quantize: codes round(label / scale), scale = max|label| / 127 */
                const float lim = (float)((1 << (A->label_bits - 1)) - 1);
                float amax = 0.f;
                for (int c = 0; c < r; c++) amax = fmaxf(amax, fabsf(lab[c]));
                const float sc = fmaxf(amax, 1e-30f) / lim;
                int8_t *col = code_tile(A, S, head, pos) + pos % SP_CODE_TILE;
                for (int c = 0; c < r; c++) col[(size_t)c * SP_CODE_TILE] = (int8_t)rintf(lab[c] / sc);
                A->code_scale[head * S + pos] = sc;
            } else {
                float *col = A->labels + head * r * S + pos;
                for (int c = 0; c < r; c++) col[(size_t)c * S] = lab[c];
            }
        }
    }
}

/* This thread's share [lo, hi) of the n causal keys an estimate scores: whole tiles of int8 codes. */
static void est_range(const sp_attn *A, int n, int ith, int nth, int *lo, int *hi) {
    if (A->codes) {
        sp_range((n + SP_CODE_TILE - 1) / SP_CODE_TILE, ith, nth, lo, hi);
        *lo *= SP_CODE_TILE, *hi = *hi * SP_CODE_TILE < n ? *hi * SP_CODE_TILE : n;
        if (*lo > *hi) *lo = *hi;
    } else {
        sp_range(n, ith, nth, lo, hi);
    }
}

/* oracle: the exact logits of every causal key [0, n) for every query head (this thread's share of the keys),
 * into scores[h, j], and this thread's maximum per head into tmax. */
static void est_exact(int ith, int nth, const sp_model *M, int l, const float *q, int n, float *scores, float *tmax,
                      float *tmp) {
    const int hd = M->head_dim, nh = M->n_heads, S = M->max_seq, group = nh / M->n_kv;
    int lo, hi;
    est_range(M->attn, n, ith, nth, &lo, &hi);
    float *tm = tmax + (size_t)ith * nh;
    for (int h = 0; h < nh; h++) tm[h] = -INFINITY;
    for (int kv = 0; kv < M->n_kv; kv++) {
        const size_t head = ((size_t)l * M->n_kv + kv) * S;
        for (int j = lo; j < hi; j++) {
            const float *k = sp_kv_row(M->k_cache, M->kv_f16, head + j, hd, tmp);
            for (int h = kv * group; h < (kv + 1) * group; h++) {
                const float s = sp_dot(q + (size_t)h * hd, k, hd) * M->attn_scale;
                scores[(size_t)h * S + j] = s;
                if (s > tm[h]) tm[h] = s;
            }
        }
    }
}

/* double-sparsity, sketch: approximate scores (q Pq).(k P) label_scale from the label cache, this thread's share
 * of the keys [0, n). per_head: into scores[h, j] with this thread's maxima (a softmax follows); else summed over
 * each selection head's query heads into vals[s, j], as one product with their summed projected queries (the
 * group's heads share a label head). fp32 labels are stored channel-major, [rank, max_seq] per label head, int8
 * codes in tiles of EST_KEYS keys (one contiguous run each; threads split whole tiles). A block
 * of EST_KEYS keys is widened once per channel and accumulated for up to EST_ROWS rows (the query or selection
 * heads reading that label head) in L1: the cache is read once per label head and the sums never leave L1 until
 * the block is done. qp: [n_heads, rank] scratch, overwritten with the rows' weights. */
#define EST_KEYS SP_CODE_TILE
#define EST_ROWS 4
#if defined(__AVX512F__) && SP_CODE_TILE == 64
/* One full tile of int8 codes for `rows` (<= EST_ROWS) rows of weights w[x * r + c]: the rows x 4 accumulators
 * stay in registers over the channels, each channel's 64 codes widened once. Inlined per constant row count, so
 * SmolLM2's 3 query heads per label head do not pay for a fourth. */
static inline __attribute__((always_inline)) void tile_codes_rows(const int8_t *tile, int r, const float *w,
                                                                  float acc[EST_ROWS][EST_KEYS], const int rows) {
    __m512 a[EST_ROWS][4];
    for (int x = 0; x < rows; x++)
        for (int v = 0; v < 4; v++) a[x][v] = _mm512_setzero_ps();
    for (int c = 0; c < r; c++) {
        const __m512i b = _mm512_loadu_si512((const void *)(tile + (size_t)c * EST_KEYS));
        __m512 f[4];
        f[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(b)));
        f[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 1)));
        f[2] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 2)));
        f[3] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 3)));
        for (int x = 0; x < rows; x++) {
            const __m512 wc = _mm512_set1_ps(w[(size_t)x * r + c]);
            for (int v = 0; v < 4; v++) a[x][v] = _mm512_fmadd_ps(wc, f[v], a[x][v]);
        }
    }
    for (int x = 0; x < rows; x++)
        for (int v = 0; v < 4; v++) _mm512_storeu_ps(acc[x] + 16 * v, a[x][v]);
}

#define TILE_CODES_SIMD /* tile_codes: one full tile of codes for nr rows */
static void tile_codes(const int8_t *tile, int r, const float *w, float acc[EST_ROWS][EST_KEYS], int nr) {
    switch (nr) {
    case 1: tile_codes_rows(tile, r, w, acc, 1); break;
    case 2: tile_codes_rows(tile, r, w, acc, 2); break;
    case 3: tile_codes_rows(tile, r, w, acc, 3); break;
    default: tile_codes_rows(tile, r, w, acc, EST_ROWS);
    }
}
#elif defined(__AVX2__) && defined(__FMA__) && SP_CODE_TILE == 64
/* The same with 16 ymm registers: the tile in passes of `keys` (32 for up to 3 rows, 16 for 4), rows x keys / 8
 * accumulators held over the channels; the same fma per channel in the same order as the AVX-512 and plain loops. */
static inline __attribute__((always_inline)) void tile_codes_pass(const int8_t *tile, int r, const float *w,
                                                                  float acc[EST_ROWS][EST_KEYS], const int rows,
                                                                  const int keys, int t0) {
    __m256 a[EST_ROWS][4];
    for (int x = 0; x < rows; x++)
        for (int v = 0; v < keys / 8; v++) a[x][v] = _mm256_setzero_ps();
    for (int c = 0; c < r; c++) { /* one widened vector live at a time: rows x 4 sums + rows weights + 1 fit 16 */
        const int8_t *cc = tile + (size_t)c * EST_KEYS + t0;
        __m256 wc[EST_ROWS];
        for (int x = 0; x < rows; x++) wc[x] = _mm256_set1_ps(w[(size_t)x * r + c]);
        for (int v = 0; v < keys / 8; v++) {
            const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(cc + 8 * v))));
            for (int x = 0; x < rows; x++) a[x][v] = _mm256_fmadd_ps(wc[x], f, a[x][v]);
        }
    }
    for (int x = 0; x < rows; x++)
        for (int v = 0; v < keys / 8; v++) _mm256_storeu_ps(acc[x] + t0 + 8 * v, a[x][v]);
}

#define TILE_CODES_SIMD
static void tile_codes(const int8_t *tile, int r, const float *w, float acc[EST_ROWS][EST_KEYS], int nr) {
    switch (nr) {
    case 1: for (int t0 = 0; t0 < EST_KEYS; t0 += 32) tile_codes_pass(tile, r, w, acc, 1, 32, t0); break;
    case 2: for (int t0 = 0; t0 < EST_KEYS; t0 += 32) tile_codes_pass(tile, r, w, acc, 2, 32, t0); break;
    case 3: for (int t0 = 0; t0 < EST_KEYS; t0 += 32) tile_codes_pass(tile, r, w, acc, 3, 32, t0); break;
    default: for (int t0 = 0; t0 < EST_KEYS; t0 += 16) tile_codes_pass(tile, r, w, acc, EST_ROWS, 16, t0);
    }
}
#endif
static void est_labels(int ith, int nth, const sp_model *M, int l, const float *q, int n, int per_head, float *qp,
                       float *scores, float *tmax, float *vals, int sel_heads) {
    const sp_attn *A = M->attn;
    const int hd = M->head_dim, nh = M->n_heads, S = M->max_seq, r = A->rank, lab_of = nh / A->lab_heads;
    const int gs = nh / sel_heads;
    SP_ASSERT(per_head || lab_of % gs == 0); /* a selection head's query heads share a label head */
    for (int h = 0; h < nh; h++) { /* q Pq, each thread for itself (n_heads head_dim rank products: no barrier) */
        const float *P = A->qproj + ((size_t)l * A->lab_heads + h / lab_of) * hd * r, *qh = q + (size_t)h * hd;
        float *o = qp + (size_t)h * r;
        for (int c = 0; c < r; c++) o[c] = 0.f;
        for (int d = 0; d < hd; d++)
            for (int c = 0; c < r; c++) o[c] += qh[d] * P[(size_t)d * r + c];
    }
    const int rows = per_head ? nh : sel_heads, per = per_head ? 1 : gs, rows_per_lab = lab_of / per;
    float *w = qp; /* row x's weights: its query heads' projections summed, times label_scale (in place: row x
                      reads heads x*per.. which are >= x, and x*per == x when per == 1) */
    for (int x = 0; x < rows; x++)
        for (int c = 0; c < r; c++) {
            float sum = 0.f;
            for (int h = x * per; h < (x + 1) * per; h++) sum += qp[(size_t)h * r + c];
            w[(size_t)x * r + c] = sum * A->label_scale;
        }
    int lo, hi;
    est_range(A, n, ith, nth, &lo, &hi);
    float mx[EST_ROWS];
    for (int lh = 0; lh < A->lab_heads; lh++) {
        const size_t head = (size_t)l * A->lab_heads + lh;
        const float *lab = A->labels ? A->labels + head * r * S : NULL;
        const float *scale = A->codes ? A->code_scale + head * S : NULL;
        for (int x0 = lh * rows_per_lab; x0 < (lh + 1) * rows_per_lab; x0 += EST_ROWS) {
            const int nr = (lh + 1) * rows_per_lab - x0 < EST_ROWS ? (lh + 1) * rows_per_lab - x0 : EST_ROWS;
            float wpad[EST_ROWS * r]; /* the rows' weights, zero past nr */
            for (int x = 0; x < EST_ROWS; x++)
                for (int c = 0; c < r; c++) wpad[x * r + c] = x < nr ? w[(size_t)(x0 + x) * r + c] : 0.f;
            for (int x = 0; x < nr; x++) mx[x] = -INFINITY;
            for (int j0 = lo; j0 < hi; j0 += EST_KEYS) {
                const int m = hi - j0 < EST_KEYS ? hi - j0 : EST_KEYS;
                float acc[EST_ROWS][EST_KEYS], val[EST_KEYS];
                const int8_t *tile = A->codes ? code_tile(A, S, head, j0) : NULL; /* j0: a tile's first key */
#ifdef TILE_CODES_SIMD
                const int wide = tile && m == EST_KEYS;
                if (wide) tile_codes(tile, r, wpad, acc, nr);
#else
                const int wide = 0;
#endif
                if (!wide) { /* fp32 labels, a partial last tile, or no SIMD tile kernel */
                    for (int x = 0; x < nr; x++)
                        for (int t = 0; t < EST_KEYS; t++) acc[x][t] = 0.f;
                    for (int c = 0; c < r; c++) {
                        if (tile) {
                            const int8_t *restrict cc = tile + (size_t)c * EST_KEYS;
#pragma omp simd
                            for (int t = 0; t < m; t++) val[t] = (float)cc[t];
                        } else {
                            memcpy(val, lab + (size_t)c * S + j0, (size_t)m * sizeof(float));
                        }
                        for (int x = 0; x < nr; x++) {
                            const float wc = wpad[x * r + c];
#pragma omp simd
                            for (int t = 0; t < m; t++) acc[x][t] += wc * val[t];
                        }
                    }
                }
                for (int x = 0; x < nr; x++) {
                    float *restrict out = (per_head ? scores : vals) + (size_t)(x0 + x) * S + j0;
                    if (scale)
                        for (int t = 0; t < m; t++) out[t] = acc[x][t] * scale[j0 + t];
                    else
                        for (int t = 0; t < m; t++) out[t] = acc[x][t];
                    if (per_head) {
                        float bm = mx[x];
#pragma omp simd reduction(max : bm)
                        for (int t = 0; t < m; t++) bm = out[t] > bm ? out[t] : bm;
                        mx[x] = bm;
                    }
                }
            }
            if (per_head)
                for (int x = 0; x < nr; x++) tmax[(size_t)ith * nh + x0 + x] = mx[x];
        }
    }
}

/* The softmax of scores[h, 0:n) per head, in two ops around one barrier, each thread on the keys it estimated
 * (est_range): probs_exp turns them into exp(x - m) with m this thread's maximum (tmax) and sums them per head into
 * tsum; probs_values then writes, per selection head, the probabilities summed over its query heads (mean: divided
 * by their number) into vals, each thread's terms scaled by exp(m - max) / (the sum over threads). */
static void probs_exp(int ith, int nth, const sp_attn *A, int nh, int S, int n, float *scores, const float *tmax,
                      float *tsum) {
    int lo, hi;
    est_range(A, n, ith, nth, &lo, &hi);
    for (int h = 0; h < nh; h++) {
        tsum[(size_t)ith * nh + h] = sp_exp_shift_sum(scores + (size_t)h * S, lo, hi, tmax[(size_t)ith * nh + h]);
    }
}

static void probs_values(int ith, int nth, const sp_attn *A, int nh, int S, int n, const float *scores,
                         const float *tmax, const float *tsum, int sel_heads, int mean, float *vals) {
    const int gs = nh / sel_heads;
    int lo, hi;
    est_range(A, n, ith, nth, &lo, &hi);
    if (lo >= hi) return;
    for (int h = 0; h < nh; h++) {
        float mx = -INFINITY, z = 0.f;
        for (int t = 0; t < nth; t++) mx = tmax[(size_t)t * nh + h] > mx ? tmax[(size_t)t * nh + h] : mx;
        for (int t = 0; t < nth; t++)
            if (tsum[(size_t)t * nh + h] > 0.f) z += tsum[(size_t)t * nh + h] * sp_exp(tmax[(size_t)t * nh + h] - mx);
        const float f = sp_exp(tmax[(size_t)ith * nh + h] - mx) / (z * (mean ? (float)gs : 1.f));
        const float *restrict s = scores + (size_t)h * S;
        float *restrict v = vals + (size_t)(h / gs) * S;
        if (h % gs == 0) {
#pragma omp simd
            for (int j = lo; j < hi; j++) v[j] = s[j] * f;
        } else {
#pragma omp simd
            for (int j = lo; j < hi; j++) v[j] += s[j] * f;
        }
    }
}

/* quest: the upper bound sum_d max(q_d min_d, q_d max_d) of each complete page [0, n_pages) (this thread's share),
 * summed over each selection head's query heads, into vals[s, page]. */
static void est_pages(int ith, int nth, const sp_model *M, int l, const float *q, int n_pages, float *vals,
                      int sel_heads, float *tmin, float *tmax) {
    const sp_attn *A = M->attn;
    const int hd = M->head_dim, nh = M->n_heads, S = M->max_seq, group = nh / M->n_kv, gs = nh / sel_heads;
    int lo, hi;
    sp_range(n_pages, ith, nth, &lo, &hi);
    for (int kv = 0; kv < M->n_kv; kv++) {
        const size_t head = ((size_t)l * M->n_kv + kv) * A->max_pages;
        for (int p = lo; p < hi; p++) {
            const float *mn = sp_kv_row(A->kmin, M->kv_f16, head + p, hd, tmin);
            const float *mx = sp_kv_row(A->kmax, M->kv_f16, head + p, hd, tmax);
            for (int h = kv * group; h < (kv + 1) * group; h++) {
                const float *qh = q + (size_t)h * hd;
                float ub = 0.f;
                int d = 0;
#ifdef __AVX512F__ /* GCC ran this reduction scalar (its simd version unused): 3x the whole select stage */
                __m512 acc = _mm512_setzero_ps();
                for (; d + 16 <= hd; d += 16) {
                    const __m512 x = _mm512_loadu_ps(qh + d);
                    acc = _mm512_add_ps(acc, _mm512_max_ps(_mm512_mul_ps(x, _mm512_loadu_ps(mn + d)),
                                                           _mm512_mul_ps(x, _mm512_loadu_ps(mx + d))));
                }
                ub = _mm512_reduce_add_ps(acc);
#endif
                for (; d < hd; d++) { /* not fmaxf: without -ffast-math GCC calls libm for each */
                    const float a = qh[d] * mn[d], b = qh[d] * mx[d];
                    ub += a > b ? a : b;
                }
                float *v = vals + (size_t)(h / gs) * S + p;
                *v = h % gs == 0 ? ub : *v + ub;
            }
        }
    }
}

/* The positions each selection head reads at the step of pos in layer l (ws->sel_idx, ws->sel_cnt), then the keys
 * read per KV head (ws->kept). Called by every thread; ends after a barrier (the lists are complete). */
void sp_select_stage(sp_ctx *c, const sp_model *M, int l, int pos) {
    const sp_attn *A = M->attn;
    sp_workspace *ws = c->ws;
    const int ith = c->ith, nth = c->nth, n = pos + 1, b = budget(A, n), S = M->max_seq, nh = M->n_heads;
    const int G = A->sel_heads;
    SP_ASSERT(G == ws->sel_heads && (G == M->n_kv || G == nh) && 0 <= pos && pos < S);
    float *tmp = (float *)c->t->sel; /* room for 3 max_seq floats */
    int g0, g1;
    sp_range(G, ith, nth, &g0, &g1);
    switch (A->method) {
    case SP_ATTN_SINK_WINDOW: { /* sink_window.py: min(budget - 1, sinks) first positions and the last ones */
        const int sinks = b - 1 < A->sinks ? b - 1 : A->sinks, from = pos - (b - sinks) + 1;
        for (int s = g0; s < g1; s++) {
            int *out = ws->sel_idx + (size_t)s * S, m = 0;
            for (int j = 0; j < n; j++)
                if (j < sinks || j >= from) out[m++] = j;
            ws->sel_cnt[s] = m;
        }
        break;
    }
    case SP_ATTN_H2O: {
        for (int s = g0; s < g1; s++) {
            const size_t at = ((size_t)l * G + s) * S;
            ws->sel_cnt[s] = h2o_hold(A, A->mass + at, A->held + at, n, b, c->t->sel, ws->sel_idx + (size_t)s * S);
        }
        break;
    }
    case SP_ATTN_QUEST: { /* quest.py: top (pages - 1) complete pages by bound, and the current page */
        const int cur = pos / A->page, pages = (b + A->page - 1) / A->page > A->min_pages
                                                   ? (b + A->page - 1) / A->page : A->min_pages;
        const int take = pages > 1 && cur > 0 ? (pages - 1 < cur ? pages - 1 : cur) : 0;
        if (take > 0) {
            est_pages(ith, nth, M, l, c->ws->q, cur, ws->vals, G, c->t->row, c->t->scratch);
            SP_BARRIER(); /* every page's bound */
        }
        for (int s = g0; s < g1; s++) {
            int *out = ws->sel_idx + (size_t)s * S, m = 0;
            if (take > 0) {
                int *chosen = (int *)(tmp + A->max_pages); /* max_pages <= max_seq: room for all three */
                const int k = top_budget(ws->vals + (size_t)s * S, cur, take, tmp, tmp + 2 * A->max_pages, chosen);
                for (int i = 0; i < k; i++)
                    for (int j = chosen[i] * A->page; j < (chosen[i] + 1) * A->page; j++) out[m++] = j;
            }
            for (int j = cur * A->page; j <= pos; j++) out[m++] = j;
            ws->sel_cnt[s] = m;
        }
        break;
    }
    case SP_ATTN_ORACLE_TOPK:
    case SP_ATTN_ORACLE_TOPP:
    case SP_ATTN_SKETCH:
    case SP_ATTN_DOUBLE_SPARSITY: {
        const int oracle = A->method == SP_ATTN_ORACLE_TOPK || A->method == SP_ATTN_ORACLE_TOPP;
        const int probs = oracle || A->method == SP_ATTN_SKETCH;
        if (oracle) est_exact(ith, nth, M, l, ws->q, n, ws->scores, ws->tmax, c->t->row);
        else est_labels(ith, nth, M, l, ws->q, n, probs, c->t->qp, ws->scores, ws->tmax, ws->vals, G);
        if (probs) {
            probs_exp(ith, nth, A, nh, S, n, ws->scores, ws->tmax, ws->tsum); /* the keys this thread estimated */
            SP_BARRIER(); /* every thread's maxima and sums */
            probs_values(ith, nth, A, nh, S, n, ws->scores, ws->tmax, ws->tsum, G, A->method == SP_ATTN_ORACLE_TOPP,
                         ws->vals);
        }
        SP_BARRIER(); /* every key's value */
        for (int s = g0; s < g1; s++) {
            float *v = ws->vals + (size_t)s * S;
            int *out = ws->sel_idx + (size_t)s * S;
            if (A->method == SP_ATTN_SKETCH) { /* sketch.py: sinks and the local window forced (above any value) */
                for (int j = 0; j < n && j < A->sinks; j++) v[j] = 1e30f;
                for (int j = pos - A->local + 1 > 0 ? pos - A->local + 1 : 0; j < n; j++) v[j] = 1e30f;
            }
            ws->sel_cnt[s] = A->method == SP_ATTN_ORACLE_TOPP ? top_p(v, n, A->p, tmp, out)
                                                              : top_budget(v, n, b, tmp, tmp + S, out);
        }
        break;
    }
    default: SP_ASSERT(0 && "unknown KV selection method");
    }
    SP_BARRIER(); /* every selection head's list */
    int lo, hi; /* keys read per KV head: the union of its selection heads' lists */
    sp_range(M->n_kv, ith, nth, &lo, &hi);
    const int per = G / M->n_kv;
    for (int kv = lo; kv < hi; kv++) {
        if (per == 1) {
            ws->kept[kv] = ws->sel_cnt[kv];
            continue;
        }
        uint8_t *mark = c->t->mark;
        int u = 0;
        for (int s = kv * per; s < (kv + 1) * per; s++)
            for (int i = 0; i < ws->sel_cnt[s]; i++) {
                const int j = ws->sel_idx[(size_t)s * S + i];
                u += !mark[j];
                mark[j] = 1;
            }
        for (int s = kv * per; s < (kv + 1) * per; s++)
            for (int i = 0; i < ws->sel_cnt[s]; i++) mark[ws->sel_idx[(size_t)s * S + i]] = 0;
        ws->kept[kv] = u;
    }
}

/* One thread, after the step's lists: the layer's accounting (core.attention.AttnTally.add, per query). */
void sp_select_tally(const sp_model *M, const sp_workspace *ws, int l, int pos) {
    const sp_attn *A = M->attn;
    double kept = 0;
    for (int kv = 0; kv < M->n_kv; kv++) kept += ws->kept[kv];
    double *t = A->tally + (size_t)l * 4;
    t[0] += kept;
    t[1] += (double)(pos + 1) * M->n_kv;
    t[2] += estimate_reads(A, pos + 1, M->head_dim) * M->n_kv;
    t[3] += 1;
}

/* h2o: the probabilities this step read (idx / cnt per selection head, or the range base + [0, n) for every head),
 * summed over each selection head's query heads, added to its keys' mass. This thread's share of the slots, as
 * sp_attn_rows split them, so scores[h, i] holds exp(logit - pm[ith, h]) and the probability is that
 * exp(pm - gm) / gl. */
void sp_h2o_observe(int ith, int nth, const sp_model *M, int l, const int *idx, const int *cnt, int base, int n,
                    const float *scores, const float *pm, const float *gm, const float *gl) {
    const sp_attn *A = M->attn;
    const int S = M->max_seq, G = A->sel_heads, nh = M->n_heads, gs = nh / G;
    for (int s = 0; s < G; s++) {
        const int m = idx ? cnt[s] : n, lo = (int)((long)m * ith / nth), hi = (int)((long)m * (ith + 1) / nth);
        double *mass = A->mass + ((size_t)l * G + s) * S;
        float w[gs];
        for (int h = s * gs; h < (s + 1) * gs; h++)
            w[h - s * gs] = gl[h] > 0.f ? sp_exp(pm[(size_t)ith * nh + h] - gm[h]) / gl[h] : 0.f;
        for (int i = lo; i < hi; i++) {
            float p = 0.f;
            for (int j = 0; j < gs; j++) p += scores[(size_t)(s * gs + j) * S + i] * w[j];
            mass[idx ? idx[(size_t)s * S + i] : base + i] += p;
        }
    }
}
