/* Block-sparse causal prefill attention (flash style), for the HF forward's prefill (sparsen.engine.prefill).
 *
 * Plain functions on plain arrays, no engine struct (ops.h only for the vector exp). For every (query head, query
 * block) the kept key blocks are read in ascending order with an online softmax (running max and sum per query
 * row), then the head's extra key columns outside the kept blocks (MInference's vertical lines), gathered 32 at a
 * time. Only kept entries are computed; the diagonal block is computed whole and masked causally (as flash kernels
 * do). The mask is taken as given (the caller forces the sink block and the diagonal; a row that reads nothing
 * outputs 0).
 *
 * Layouts (float32, contiguous): q and out [n_heads, n, d]; k, v [n_kv, n, d]; mask uint8 [mask_heads, nb, nb]
 * (nb = ceil(n / block)) with mask_heads = n_kv (one mask per KV group) or n_heads; cols (optional) the extra
 * columns of mask head h, ascending, in cols[col_start[h] .. col_start[h + 1]). Query head h reads KV head
 * h / (n_heads / n_kv). Threads: (head, query block) items dealt round-robin (ith, ith + nth, ...), largest query
 * blocks first, so the causal rows' unequal work evens out.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

#ifdef __AVX512F__
#define SP_PF_ROWS 8 /* query rows per micro-tile: 8 x 32 floats = 16 of the 32 zmm registers (98 vs 83 GFLOP/s) */
#else
#define SP_PF_ROWS 6 /* query rows per micro-tile: 6 x 2 ymm sums, 2 loads and a broadcast: 15 of 16 */
#endif
#define SP_PF_COLS 32 /* keys per gathered tile */
#ifdef __AVX512F__
#define SP_PF_REG 32 /* keys (or output channels) per register tile: SP_PF_ROWS x 2 vectors of sums */
#else
#define SP_PF_REG 16 /* keys (or output channels) per register tile: SP_PF_ROWS x 2 ymm of sums */
#endif

typedef struct {
    float *qs;  /* [rows_p, d] the query block, pre-scaled, zero rows past the end */
    float *o;   /* [rows_p, d] running output */
    float *m;   /* [rows_p] running max */
    float *l;   /* [rows_p] running sum */
    float *s;   /* [rows_p, ld] scores of the query block against one key tile */
    float *kt;  /* [d, SP_PF_COLS] gathered columns' keys, transposed */
    float *vc;  /* [SP_PF_COLS, d] gathered columns' values */
} sp_pf_thread;

/* The register tile of both products: c[r][0:SP_PF_REG) (+)= sum_t a[r lda + t] b[t ldb + 0:SP_PF_REG) for the
 * SP_PF_ROWS rows r, from zero or (accumulate) from c. Each b vector is loaded once for the rows. */
static inline __attribute__((always_inline)) void sp_pf_micro(const float *a, int lda, const float *b, int ldb, int T,
                                                              float *c, int ldc, const int accumulate) {
#if defined(__AVX2__) && !defined(__AVX512F__) /* GCC re-loaded the b vectors once per row (FMAs from memory) */
    __m256 acc[SP_PF_ROWS][2];
    for (int r = 0; r < SP_PF_ROWS; r++) {
        acc[r][0] = accumulate ? _mm256_loadu_ps(c + (size_t)r * ldc) : _mm256_setzero_ps();
        acc[r][1] = accumulate ? _mm256_loadu_ps(c + (size_t)r * ldc + 8) : _mm256_setzero_ps();
    }
    for (int t = 0; t < T; t++) {
        const float *bt = b + (size_t)t * ldb;
        const __m256 b0 = _mm256_loadu_ps(bt), b1 = _mm256_loadu_ps(bt + 8);
        for (int r = 0; r < SP_PF_ROWS; r++) {
            const __m256 ar = _mm256_broadcast_ss(a + (size_t)r * lda + t);
            acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]), acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < SP_PF_ROWS; r++) {
        _mm256_storeu_ps(c + (size_t)r * ldc, acc[r][0]);
        _mm256_storeu_ps(c + (size_t)r * ldc + 8, acc[r][1]);
    }
#else
    float acc[SP_PF_ROWS][SP_PF_REG];
    for (int r = 0; r < SP_PF_ROWS; r++)
        for (int j = 0; j < SP_PF_REG; j++) acc[r][j] = accumulate ? c[(size_t)r * ldc + j] : 0.f;
    for (int t = 0; t < T; t++) {
        const float *bt = b + (size_t)t * ldb;
        for (int r = 0; r < SP_PF_ROWS; r++) {
            const float ar = a[(size_t)r * lda + t];
#pragma omp simd
            for (int j = 0; j < SP_PF_REG; j++) acc[r][j] += ar * bt[j];
        }
    }
    for (int r = 0; r < SP_PF_ROWS; r++) memcpy(c + (size_t)r * ldc, acc[r], sizeof(acc[r]));
#endif
}

/* Scores of rp (a multiple of SP_PF_ROWS) query rows against one key tile: s[r][j] = q_r . k_j, for j < nk (kt:
 * [d, ldk], zero padded to a multiple of SP_PF_COLS). Keys outer, row tiles inner: a slice of SP_PF_REG keys of
 * kt stays in L1 while every row tile reads it (rows outer re-read the whole tile from L2 per row tile). */
static void sp_pf_scores(const float *qs, int rp, int d, const float *kt, int ldk, int nk, float *s, int lds) {
    for (int j0 = 0; j0 < nk; j0 += SP_PF_REG)
        for (int r0 = 0; r0 < rp; r0 += SP_PF_ROWS)
            sp_pf_micro(qs + (size_t)r0 * d, d, kt + j0, ldk, d, s + (size_t)r0 * lds + j0, lds, 0);
}

/* The rp rows of the query block against nk keys (values vt rows of stride d): masks key j of row r when
 * key_pos(j) > q_pos(r) (causal; only on the diagonal) or j is padding, then updates the online softmax and the
 * output. */
static void sp_pf_tile(sp_pf_thread *t, int rp, int d, const float *kt, int ldk, int nk, const float *vt,
                       int key0, int qpos0, int causal) {
    float *s = t->s;
    const int lds = ldk;
    sp_pf_scores(t->qs, rp, d, kt, ldk, nk, s, lds);
    for (int r = 0; r < rp; r++) {
        float *sr = s + (size_t)r * lds;
        int valid = nk;
        if (causal) {
            const int lim = qpos0 + r - key0 + 1; /* keys key0 .. qpos read */
            valid = lim < nk ? (lim > 0 ? lim : 0) : nk;
        }
        if (valid == 0) {
            for (int j = 0; j < nk; j++) sr[j] = 0.f;
            continue;
        }
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int j = 0; j < valid; j++) mx = sr[j] > mx ? sr[j] : mx;
        const float mold = t->m[r], mnew = mold > mx ? mold : mx;
        const float corr = sp_exp(mold - mnew); /* 0 when mold is -inf */
        const float sum = sp_exp_shift_sum(sr, 0, valid, mnew);
        for (int j = valid; j < nk; j++) sr[j] = 0.f;
        t->m[r] = mnew;
        t->l[r] = t->l[r] * corr + sum;
        float *o = t->o + (size_t)r * d;
        if (corr != 1.f) {
#pragma omp simd
            for (int i = 0; i < d; i++) o[i] *= corr;
        }
    }
    /* o[r] += sum_j p[r][j] v[j], SP_PF_REG output channels of SP_PF_ROWS rows held in registers across the keys;
     * channels outer, so a slice of V stays in L1 over the row tiles */
    int i0 = 0;
    for (; i0 + SP_PF_REG <= d; i0 += SP_PF_REG)
        for (int r0 = 0; r0 < rp; r0 += SP_PF_ROWS)
            sp_pf_micro(s + (size_t)r0 * lds, lds, vt + i0, d, nk, t->o + (size_t)r0 * d + i0, d, 1);
    for (int j = 0; j < nk && i0 < d; j++) { /* channels past the last multiple of SP_PF_REG */
        const float *vr = vt + (size_t)j * d;
        for (int r = 0; r < rp; r++) {
            const float pr = s[(size_t)r * lds + j];
            float *orow = t->o + (size_t)r * d;
#pragma omp simd
            for (int i = i0; i < d; i++) orow[i] += pr * vr[i];
        }
    }
}

/* Returns 0, or -1 on bad arguments, -2 when memory runs out. */
int sp_prefill_attention(const float *q, const float *k, const float *v, float *out, int n_heads, int n_kv, int n,
                         int d, int block, float scale, const uint8_t *mask, int mask_heads, const int32_t *cols,
                         const int32_t *col_start, int n_threads) {
    if (n <= 0 || d <= 0 || block <= 0 || n_kv <= 0 || n_heads % n_kv != 0 ||
        (mask_heads != n_kv && mask_heads != n_heads) || !q || !k || !v || !out || !mask)
        return -1;
    const int nb = (n + block - 1) / block, group = n_heads / n_kv, mgroup = n_heads / mask_heads;
    const int kp = (block + SP_PF_COLS - 1) / SP_PF_COLS * SP_PF_COLS; /* a block's keys, padded */
    const int rows_p = (block + SP_PF_ROWS - 1) / SP_PF_ROWS * SP_PF_ROWS;
    const int ld = kp > SP_PF_COLS ? kp : SP_PF_COLS;
    /* K transposed per block: [n_kv, nb, d, kp], zero padded */
    float *kt_all = calloc((size_t)n_kv * nb * d * kp, sizeof(float));
    if (!kt_all) return -2;
    int status = 0;
    const long items = (long)n_heads * nb;
#pragma omp parallel num_threads(n_threads > 0 ? n_threads : 1)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        for (long it = ith; it < (long)n_kv * nb; it += nth) {
            const int kv = (int)(it / nb), kb = (int)(it % nb);
            const int k0 = kb * block, nk = n - k0 < block ? n - k0 : block;
            float *dst = kt_all + ((size_t)kv * nb + kb) * d * kp;
            for (int j = 0; j < nk; j++) {
                const float *src = k + ((size_t)kv * n + k0 + j) * d;
                for (int c = 0; c < d; c++) dst[(size_t)c * kp + j] = src[c];
            }
        }
        sp_pf_thread t;
        t.qs = calloc((size_t)rows_p * d, sizeof(float));
        t.o = malloc(sizeof(float) * rows_p * d);
        t.m = malloc(sizeof(float) * rows_p);
        t.l = malloc(sizeof(float) * rows_p);
        t.s = malloc(sizeof(float) * rows_p * ld);
        t.kt = calloc((size_t)d * SP_PF_COLS, sizeof(float));
        t.vc = calloc((size_t)SP_PF_COLS * d, sizeof(float));
        const int ok = t.qs && t.o && t.m && t.l && t.s && t.kt && t.vc;
        if (!ok) {
#pragma omp atomic write
            status = -2;
        }
#pragma omp barrier
        if (status == 0) {
            for (long it = ith; it < items; it += nth) {
                const int qb = nb - 1 - (int)(it / n_heads), h = (int)(it % n_heads); /* largest rows first */
                const int kv = h / group, mh = h / mgroup;
                const int q0 = qb * block, rows = n - q0 < block ? n - q0 : block;
                const int rp = (rows + SP_PF_ROWS - 1) / SP_PF_ROWS * SP_PF_ROWS;
                for (int r = 0; r < rp; r++) {
                    float *dst = t.qs + (size_t)r * d;
                    if (r < rows) {
                        const float *src = q + ((size_t)h * n + q0 + r) * d;
                        for (int c = 0; c < d; c++) dst[c] = src[c] * scale;
                    } else {
                        memset(dst, 0, sizeof(float) * d);
                    }
                    t.m[r] = -INFINITY;
                    t.l[r] = 0.f;
                }
                memset(t.o, 0, sizeof(float) * rp * d);
                const uint8_t *row = mask + ((size_t)mh * nb + qb) * nb;
                for (int kb = 0; kb <= qb; kb++) {
                    if (!row[kb]) continue;
                    const int k0 = kb * block, nk = n - k0 < block ? n - k0 : block;
                    const float *kt = kt_all + ((size_t)kv * nb + kb) * d * kp;
                    const float *vt = v + ((size_t)kv * n + k0) * d;
                    sp_pf_tile(&t, rp, d, kt, kp, nk, vt, k0, q0, kb == qb);
                }
                if (cols && col_start) {
                    int g = 0;
                    for (int32_t ci = col_start[mh]; ci <= col_start[mh + 1]; ci++) {
                        const int last = ci == col_start[mh + 1];
                        if (!last) {
                            const int j = cols[ci], jb = j / block;
                            if (j < 0 || jb >= qb || row[jb]) continue; /* after the block's start, or kept */
                            const float *src = k + ((size_t)kv * n + j) * d;
                            for (int c = 0; c < d; c++) t.kt[(size_t)c * SP_PF_COLS + g] = src[c];
                            memcpy(t.vc + (size_t)g * d, v + ((size_t)kv * n + j) * d, sizeof(float) * d);
                            g++;
                        }
                        if (g == SP_PF_COLS || (last && g > 0)) {
                            sp_pf_tile(&t, rp, d, t.kt, SP_PF_COLS, g, t.vc, 0, 0, 0);
                            g = 0;
                        }
                    }
                }
                for (int r = 0; r < rows; r++) {
                    const float inv = t.l[r] > 0.f ? 1.f / t.l[r] : 0.f, *o = t.o + (size_t)r * d; /* 0: read nothing */
                    float *dst = out + ((size_t)h * n + q0 + r) * d;
                    for (int c = 0; c < d; c++) dst[c] = o[c] * inv;
                }
            }
        }
        free(t.qs);
        free(t.o);
        free(t.m);
        free(t.l);
        free(t.s);
        free(t.kt);
        free(t.vc);
    }
    free(kt_all);
    return status;
}
