/* Masks: the active input channels of a linear under its rule (sparsen.core.rules computes the same in torch). */
#include <string.h>

#include "ops.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
/* mask_lanes[b]: the indices of b's set bits, ascending, one per byte (the rest 0) */
static uint64_t mask_lanes[256];
__attribute__((constructor)) static void fill_mask_lanes(void) {
    for (int b = 0; b < 256; b++) {
        uint64_t v = 0;
        for (int l = 0, k = 0; l < 8; l++)
            if (b >> l & 1) v |= (uint64_t)l << (8 * k++);
        mask_lanes[b] = v;
    }
}
#endif

static int cmp_float(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Active channels of x [n] under rule r, ascending, into act; returns their count. scratch: n floats.
 * A rule that is not an input rule (DENSE, GATE_ACT) keeps every channel. */
int sp_mask(const sp_rule *r, const float *x, int n, int *act, float *scratch) {
    SP_ASSERT(n > 0);
    int m = 0;
    switch (r->kind) {
    case SP_RULE_THRESHOLD: {
        SP_ASSERT(r->thr != NULL);
        int i = 0;
        /* compares, then the set lanes' indices packed without a branch (a loop over the set bits mispredicted
         * about once per 8 channels). AVX-512 packs in a register, then stores: Zen 4's compress straight to memory
         * is slow. Whole vectors are stored at act + m <= act + i: inside act[0:n). */
#ifdef __AVX512F__
        for (__m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); i + 16 <= n;
             i += 16, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16))) {
            const __mmask16 k = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + i)), _mm512_loadu_ps(r->thr + i),
                                                   _CMP_GT_OQ);
            _mm512_storeu_si512((void *)(act + m), _mm512_maskz_compress_epi32(k, idx));
            m += __builtin_popcount((unsigned)k);
        }
#elif defined(__AVX2__)
        const __m256 sign = _mm256_set1_ps(-0.f);
        for (; i + 8 <= n; i += 8) {
            const __m256 ax = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
            const unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(ax, _mm256_loadu_ps(r->thr + i), _CMP_GT_OQ));
            const __m256i lanes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)&mask_lanes[bits]));
            _mm256_storeu_si256((__m256i *)(act + m), _mm256_add_epi32(_mm256_set1_epi32(i), lanes));
            m += __builtin_popcount(bits);
        }
#endif
        for (; i < n; i++)
            if (fabsf(x[i]) > r->thr[i]) act[m++] = i;
        return m;
    }
    case SP_RULE_TOPK: {
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
    case SP_RULE_GAUSSIAN_TOPK: {
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

/* The mask of linear j's input x [n]; every channel on a dense token. */
int sp_layer_mask(const sp_layer *L, int j, int dense, const float *x, int n, int *act, float *scratch) {
    static const sp_rule all = {SP_RULE_DENSE, 0, 0.f, NULL};
    return sp_mask(dense ? &all : &L->rule[j], x, n, act, scratch);
}

int sp_test_mask(int kind, float param, const float *thr, const float *x, int n, int *act) {
    if (n < 1) return SP_ERR_SHAPE;
    if (kind == SP_RULE_THRESHOLD && !thr) return SP_ERR_RULE;
    const sp_rule r = {kind, 0, param, thr};
    float *scratch = malloc(sizeof(float) * (size_t)n);
    if (!scratch) return SP_ERR_NOMEM;
    const int m = sp_mask(&r, x, n, act, scratch);
    free(scratch);
    return m;
}
