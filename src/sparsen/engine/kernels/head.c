/* A greedy step's lm_head on int8 rows (a GGUF's Q8_0, blocks of 32, scales d >= 0): the largest logit exactly,
 * without every row's dot product. A code q = 8 h + l with h = q >> 3 in -16..15 (its top five bits) and l in 0..7,
 * so a row's logit sum_b d_b sum_i x_i q_i is at most
 *
 *     U = sum_b d_b (8 sum_i x_i h_i + 7 sum_{i in b, x_i > 0} x_i)
 *
 * which reads five bits a code instead of eight (sp_head_bound holds them, packed). U is summed in integers: x in
 * two int8 limbs a block (x = s q1 + s2 q2 + e, s2 = s / 254) times the codes c = h + 16 (0..31), by vpdpbusd;
 * the bound carries 128 sum |e| for the second limb's residue. Then the SP_HEAD_PROBE rows of each thread with the
 * largest U are dotted exactly, the largest of those logits is a floor, and only the rows whose U reaches it are
 * dotted (sp_q_dot_row: the full product's arithmetic, so those logits equal its logits bit for bit). Four bits
 * would read less but bound loosely: the floor then left a good share of the rows, read one by one.
 */
#include <float.h>
#include <omp.h>
#include <string.h>

#include "ops.h"

/* 1 where the bound has its vector kernel (AVX-512 VNNI and BW), else 0: the scalar one is correct, for tests,
 * and slower than the full product, so the engine leaves greedy heads off there. */
int sp_head_bound_vectorized(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

/* x's two int8 limbs per block of 32 and the bound's per-block terms (in a thread's scratch: d / 32 floats x 3
 * after 2 d bytes, 4-byte aligned as d is a multiple of 32). U_b = d_b (A1 I1 + A2 I2 + C) with I the limbs' dot
 * with the codes c. */
typedef struct {
    int8_t *q1, *q2;
    float *a1, *a2, *c;
    int ok; /* 0: x is beyond the bound's range (a value over SP_HEAD_X_MAX in size, or not finite) */
} head_x;

/* Inputs up to this size keep every term of the bound and of the exact dot finite in float (half scales <= 65504). */
#define SP_HEAD_X_MAX 1e25f
/* Added to every bound: covers the absolute rounding of subnormal terms (< 1e-38 in all), which the margin, relative
 * to the terms' size, does not. */
#define SP_HEAD_ABS 1e-35f

static head_x head_prepare(const float *x, int d, void *scratch) {
    head_x hx = {(int8_t *)scratch, (int8_t *)scratch + d, NULL, NULL, NULL, 1};
    hx.a1 = (float *)((int8_t *)scratch + 2 * d), hx.a2 = hx.a1 + d / 32, hx.c = hx.a2 + d / 32;
    for (int i = 0; i < d; i++) hx.ok &= fabsf(x[i]) <= SP_HEAD_X_MAX; /* false for NaN too */
    if (!hx.ok) return hx;
    for (int b = 0; b < d / 32; b++) {
        const float *xb = x + 32 * b;
        float mx = 0.f;
        for (int i = 0; i < 32; i++) mx = fmaxf(mx, fabsf(xb[i]));
        /* s at least FLT_MIN: a subnormal s would round x / s past 127 */
        const float s = mx > 0.f ? fmaxf(mx / 127.f, FLT_MIN) : 1.f, s2 = s / 254.f;
        double pos = 0.0, l1 = 0.0, err = 0.0, sum1 = 0.0, sum2 = 0.0;
        for (int i = 0; i < 32; i++) {
            int q1 = (int)lrintf(xb[i] / s);
            q1 = q1 > 127 ? 127 : q1 < -127 ? -127 : q1; /* (never, with s >= max / 127; the residue keeps it exact) */
            const double r = (double)xb[i] - (double)s * q1;
            int q2 = (int)lrint(r / s2);
            q2 = q2 > 127 ? 127 : q2 < -127 ? -127 : q2;
            hx.q1[32 * b + i] = (int8_t)q1, hx.q2[32 * b + i] = (int8_t)q2;
            err += fabs(r - (double)s2 * q2); /* e_i: exact in double, so clamped limbs stay a bound */
            pos += xb[i] > 0.f ? xb[i] : 0.f;
            l1 += fabsf(xb[i]);
            sum1 += q1, sum2 += q2;
        }
        /* 8 sum x h = 8 (s (I1 - 16 S1) + s2 (I2 - 16 S2) + sum e h), |h| <= 16; then the low bits' 7 sum x+. The
         * margin covers the rounding of this sum and of the exact dot (far below 1e-3 of sum_i |x_i| 128 a block,
         * the size of its terms) */
        hx.a1[b] = 8.f * s, hx.a2[b] = 8.f * s2;
        hx.c[b] = (float)(-128.0 * (s * sum1 + s2 * sum2) + 128.0 * err + 7.0 * pos + 0.128 * l1 +
                          1e-5 * 8 * 31 * 127 * 32 * (s + s2));
    }
    return hx;
}

/* U of the 64 rows of tile t into u[0:64) */
static void head_bound_tile(const sp_head_bound *hb, int d, const head_x *hx, int t, float *u) {
    const int nb = d / 32;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __m512i low5 = _mm512_set1_epi8(0x1E), one = _mm512_set1_epi8(1);
    __m512 acc[4];
    for (int s = 0; s < 4; s++) acc[s] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i i1[4], i2[4];
        for (int s = 0; s < 4; s++) i1[s] = _mm512_setzero_si512(), i2[s] = _mm512_setzero_si512();
        const size_t k0 = ((size_t)t * nb + b) * 16;
        const int32_t *q1 = (const int32_t *)(hx->q1 + 32 * b), *q2 = (const int32_t *)(hx->q2 + 32 * b);
        for (int g = 0; g < 4; g++) { /* inputs 8g .. 8g + 3 (low nibbles) and 8g + 4 .. 8g + 7 (high) */
            const __m512i xa1 = _mm512_set1_epi32(q1[2 * g]), xb1 = _mm512_set1_epi32(q1[2 * g + 1]);
            const __m512i xa2 = _mm512_set1_epi32(q2[2 * g]), xb2 = _mm512_set1_epi32(q2[2 * g + 1]);
            for (int s = 0; s < 4; s++) {
                const size_t k = k0 + 4 * g + s;
                const __m512i v = _mm512_load_si512((const void *)(hb->nib + 64 * k));
                __m512i ca = _mm512_and_si512(_mm512_slli_epi16(v, 1), low5); /* 2 nib, bytes apart */
                __m512i cb = _mm512_and_si512(_mm512_srli_epi16(v, 3), low5);
                ca = _mm512_mask_add_epi8(ca, _cvtu64_mask64(hb->bits[2 * k]), ca, one); /* + the fifth bit */
                cb = _mm512_mask_add_epi8(cb, _cvtu64_mask64(hb->bits[2 * k + 1]), cb, one);
                i1[s] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(i1[s], ca, xa1), cb, xb1);
                i2[s] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(i2[s], ca, xa2), cb, xb2);
            }
        }
        const __m512 a1 = _mm512_set1_ps(hx->a1[b]), a2 = _mm512_set1_ps(hx->a2[b]), c = _mm512_set1_ps(hx->c[b]);
        const uint16_t *sc = hb->scale + ((size_t)t * nb + b) * 64;
        for (int s = 0; s < 4; s++) {
            const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1[s]), a1, _mm512_fmadd_ps(_mm512_cvtepi32_ps(i2[s]), a2, c));
            acc[s] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sc + 16 * s))), v, acc[s]);
        }
    }
    for (int s = 0; s < 4; s++) _mm512_storeu_ps(u + 16 * s, _mm512_add_ps(acc[s], _mm512_set1_ps(SP_HEAD_ABS)));
#else
    for (int r = 0; r < 64; r++) u[r] = SP_HEAD_ABS;
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < 64; r++) {
            const int s = r / 16, l = r % 16;
            int32_t i1 = 0, i2 = 0;
            for (int g = 0; g < 4; g++) {
                const size_t k = ((size_t)t * nb + b) * 16 + 4 * g + s;
                for (int m = 0; m < 8; m++) { /* input 8g + m */
                    const uint8_t byte = hb->nib[64 * k + 4 * l + m % 4];
                    const int bit = (int)(hb->bits[2 * k + m / 4] >> (4 * l + m % 4)) & 1;
                    const int code = 2 * (m < 4 ? byte & 15 : byte >> 4) + bit;
                    i1 += code * hx->q1[32 * b + 8 * g + m], i2 += code * hx->q2[32 * b + 8 * g + m];
                }
            }
            _Float16 h;
            memcpy(&h, hb->scale + ((size_t)t * nb + b) * 64 + r, 2);
            u[r] += (float)h * ((float)i1 * hx->a1[b] + ((float)i2 * hx->a2[b] + hx->c[b]));
        }
#endif
}

/* Keeps the k largest (u, r) offered in a min-heap of k (*n: how many it holds). */
static void heap_offer(float *hu, int *hr, int *n, int k, float u, int r) {
    int i;
    if (*n < k) {
        i = (*n)++;
        while (i > 0 && hu[(i - 1) / 2] > u) hu[i] = hu[(i - 1) / 2], hr[i] = hr[(i - 1) / 2], i = (i - 1) / 2;
    } else if (u > hu[0]) {
        i = 0;
        for (;;) {
            int c = 2 * i + 1;
            if (c >= k) break;
            if (c + 1 < k && hu[c + 1] < hu[c]) c++;
            if (hu[c] >= u) break;
            hu[i] = hu[c], hr[i] = hr[c], i = c;
        }
    } else {
        return;
    }
    hu[i] = u, hr[i] = r;
}

/* The exact logits of a thread's rows of largest bound. */
enum { SP_HEAD_PROBE = 16 };
typedef struct {
    int n, row[SP_HEAD_PROBE];
    float logit[SP_HEAD_PROBE];
} head_probe;

/* This thread's tiles [t0, t1): u[r] = U of row r (rows below vocab), then the exact logits of its SP_HEAD_PROBE rows
 * of largest U into *pr; returns the largest of them (-inf without rows). Returns 0 (and nothing in u) when x is
 * beyond the bound's range. scratch: [d] floats. */
static int head_bound_rows(const sp_weight *w, const sp_head_bound *hb, int vocab, int d, const float *x, int t0, int t1,
                           float *u, void *scratch, head_probe *pr) {
    SP_ASSERT(w->type == SP_W_Q8 && w->block == 32 && !w->min && !w->scale_f32 && d % 32 == 0 && w->stride == d);
    SP_ASSERT(t0 >= 0 && t1 <= hb->rows / 64 && hb->rows >= vocab);
    const head_x hx = head_prepare(x, d, scratch);
    if (!hx.ok) return 0;
    float hu[SP_HEAD_PROBE], tile[64];
    pr->n = 0;
    for (int t = t0; t < t1; t++) {
        head_bound_tile(hb, d, &hx, t, tile);
        const int m = vocab - 64 * t < 64 ? vocab - 64 * t : 64;
        for (int r = 0; r < m; r++) {
            u[64 * t + r] = tile[r];
            heap_offer(hu, pr->row, &pr->n, SP_HEAD_PROBE, tile[r], 64 * t + r);
        }
    }
    for (int i = 0; i < pr->n; i++) { /* the probed rows' codes, all requested before the first dot */
        const char *c = (const char *)w->data + (size_t)pr->row[i] * d;
        for (int o = 0; o < d; o += 64) __builtin_prefetch(c + o);
    }
    for (int i = 0; i < pr->n; i++) pr->logit[i] = sp_q_dot_row(w, d, x, pr->row[i]);
    return 1;
}

/* A bound u keeps its row when, softcapped as the logits will be (cap > 0), it reaches the capped floor fc: the cap
 * is non-decreasing, so a row whose capped logit is the largest keeps (the cap merges logits that differ). */
static inline int head_keeps(float u, float fc, float cap) {
    return (cap > 0.f ? sp_softcap1(u, cap) : u) >= fc; /* false for NaN */
}

/* Rows [r0, r1): logits[r] = the exact logit where the bound u[r] (in logits itself) keeps the row, else -inf (a
 * probed row's logit taken from the probe); returns how many rows it dotted. */
static int head_exact(const sp_weight *w, int d, const float *x, float fc, float cap, const head_probe *pr, int r0,
                      int r1, float *logits) {
    int next = r0, dotted = 0;
    while (next < r1 && !head_keeps(logits[next], fc, cap)) logits[next++] = -INFINITY;
    while (next < r1) {
        const int r = next++;
        while (next < r1 && !head_keeps(logits[next], fc, cap)) logits[next++] = -INFINITY;
        if (next < r1) { /* the next row's codes and scales, while this one computes */
            const char *c = (const char *)w->data + (size_t)next * d;
            for (int o = 0; o < d; o += 64) __builtin_prefetch(c + o);
            __builtin_prefetch((const char *)w->scale + (size_t)next * (d / 32) * 2);
        }
        int i = 0;
        while (i < pr->n && pr->row[i] != r) i++;
        if (i < pr->n) {
            logits[r] = pr->logit[i];
        } else {
            logits[r] = sp_q_dot_row(w, d, x, r);
            dotted++;
        }
    }
    return dotted;
}

/* The shapes a bound needs: an int8 lm_head [vocab, d] of blocks of 32 with half scales, its tiles covering vocab. */
int sp_head_bound_check(const sp_weight *w, const sp_head_bound *hb, int vocab, int d) {
    if (!w || !hb || w->type != SP_W_Q8 || w->block != 32 || w->min || w->scale_f32 || d % 32 || w->stride != d ||
        hb->rows < vocab || hb->rows % 64 || !hb->nib || !hb->bits || !hb->scale)
        return SP_ERR_SHAPE;
    return SP_OK;
}

/* Thread ith's tiles [t0, t1) and their rows below vocab, [r0, r1). */
static void head_range(const sp_head_bound *hb, int vocab, int ith, int nth, int *t0, int *t1, int *r0, int *r1) {
    sp_range(hb->rows / 64, ith, nth, t0, t1);
    *r0 = 64 * *t0 < vocab ? 64 * *t0 : vocab, *r1 = 64 * *t1 < vocab ? 64 * *t1 : vocab;
}

/* The greedy head for every thread (one barrier): this thread's tiles of the rows, logits exact where the bound
 * reaches the best probed logit of any thread and -inf elsewhere, so their first largest is the full product's;
 * every row exact when x is beyond the bound's range. With cap > 0 the logits are softcapped, and the bound and the
 * floor compared capped. best: [nth]; tally: NULL, or [2] += (a step, the rows this thread dotted). */
void sp_head_greedy(int ith, int nth, const sp_weight *w, const sp_head_bound *hb, int vocab, int d, const float *x,
                    float cap, float *logits, float *best, void *scratch, int64_t *tally) {
    int t0, t1, r0, r1;
    head_range(hb, vocab, ith, nth, &t0, &t1, &r0, &r1);
    head_probe pr;
    const int bounded = head_bound_rows(w, hb, vocab, d, x, t0, t1, logits, scratch, &pr);
    if (bounded) {
        best[ith] = -INFINITY;
        for (int i = 0; i < pr.n; i++) best[ith] = pr.logit[i] > best[ith] ? pr.logit[i] : best[ith];
    }
    SP_BARRIER(); /* every thread's probe is in (every thread bounded or none: they share x) */
    int dotted = r1 - r0;
    if (bounded) {
        float floor = -INFINITY;
        for (int i = 0; i < nth; i++) floor = best[i] > floor ? best[i] : floor;
        const float fc = cap > 0.f ? sp_softcap1(floor, cap) : floor;
        dotted = pr.n + head_exact(w, d, x, fc, cap, &pr, r0, r1, logits);
    } else {
        sp_q_dot_rows(w, d, x, NULL, r0, r1, logits);
    }
    sp_softcap(logits, r0, r1, cap);
    if (tally) {
        if (ith == 0) tally[0] += 1;
#pragma omp atomic
        tally[1] += dotted;
    }
}

/* Test entry point, mode 0: out[r] = the bound on row r's logit (NaN for every row when x is beyond its range);
 * 1: the logits a greedy step leaves; 2: every row's logit. Softcapped with cap > 0 as the decode step caps them. */
int sp_test_head(const sp_weight *w, const sp_head_bound *hb, int vocab, int d, const float *x, float *out,
                 int mode, float cap, int threads) {
    if (threads < 1 || mode < 0 || mode > 2 || sp_head_bound_check(w, hb, vocab, d) != SP_OK) return SP_ERR_SHAPE;
    float best[threads];
    char *scratch = aligned_alloc(64, (size_t)threads * 4 * (size_t)d);
    if (!scratch) return SP_ERR_NOMEM;
#pragma omp parallel num_threads(threads)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        void *mine = scratch + (size_t)ith * 4 * d;
        int t0, t1, r0, r1;
        head_range(hb, vocab, ith, nth, &t0, &t1, &r0, &r1);
        head_probe pr;
        if (mode == 0 && !head_bound_rows(w, hb, vocab, d, x, t0, t1, out, mine, &pr))
            for (int r = r0; r < r1; r++) out[r] = NAN;
        if (mode == 1) sp_head_greedy(ith, nth, w, hb, vocab, d, x, cap, out, best, mine, NULL);
        if (mode == 2) {
            sp_q_dot_rows(w, d, x, NULL, r0, r1, out);
            sp_softcap(out, r0, r1, cap);
        }
    }
    free(scratch);
    return SP_OK;
}
