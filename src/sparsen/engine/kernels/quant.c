/* Quantized weights as a GGUF file stores them (sparsen.engine.quant packs them): w = scale * code + min per
 * (output, block of `block` inputs), codes 4-bit unsigned (SP_W_Q4, SP_W_Q4_RUNS) or int8 (SP_W_Q8), scales and minima IEEE
 * half or fp32. Nothing is requantized: a product sums x * code over a block in fp32 and applies the block's scale
 * and minimum once, so it equals the product with the dequantized weights up to rounding: summation order, and
 * in the 16-lane tile (q4_tile16) one subtraction of the block's sum of x per plane.
 *
 *   y[o] = sum over blocks b of  scale[b, o] * sum_{i in b, active} x_i code[i, o]  +  min[b, o] * sum_{i in b, active} x_i
 *
 * Two layouts, the transposed one in three forms. Transposed (the block linears): input channel i has its own codes for every output, so an inactive
 * channel's codes are never read; scales and minima [in / block, stride]. Int8 codes: [in, stride], a row per
 * input. Q4 codes (stride a multiple of 64) are tile-major within each block of inputs, in the order a product
 * reads them: the block's tiles of 128 outputs, each its rows' 64-byte chunks one after another (nibble j, bits
 * 4j .. 4j + 3, of 32-bit lane l is output 128c + 16j + l), then a last tile of 64 when the stride has one (32-byte
 * chunks, nibble j of lane l output 8j + l). One AND and one conversion give a vector of outputs' codes scaled by
 * 16^j (exact; the tile's sums are scaled back once). Tile-major because a block read row by row across short
 * tiles touched 32 rows' cache lines at once, which the hardware prefetchers did not follow: a dense product ran at
 * half the memory's rate.
 * Runs (SP_W_Q4_RUNS, for linears whose plan keeps few inputs): input i's codes for every output in one run of
 * stride / 2 bytes, its 64-byte chunks (and 32-byte tail) packed as the tile-major ones are; a skipped input is a whole
 * run never read. Tile-major leaves a skipped row's line between active ones, and in the products-alone benchmark
 * reading a scattered quarter of a tile's lines from memory took longer than reading all of them in order
 * (BENCHMARKS.md); a run streams.
 * Rows (lm_head, up or gate read by rows): the file's own order, codes [rows, in] (Q4: ggml's block of 32, byte j
 * holding inputs j and j + 16), scales and minima [rows, in / block].
 */
#include <string.h>

#include "ops.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

static inline float sp_half(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

/* scale or minimum number k of a weight's scale / min array */
static inline float q_param(const sp_weight *w, const void *a, size_t k) {
    return w->scale_f32 ? ((const float *)a)[k] : sp_half(((const uint16_t *)a)[k]);
}

/* The Q4 transposed codes of input i (of a block of w->block) for the tile holding output o: 64 bytes (a tile of 128
 * outputs) or 32 (the last tile of 64). */
static inline const uint8_t *q4_chunk(const sp_weight *w, int i, int o) {
    const int B = w->block, full = w->stride / 128 * 128;
    if (w->type == SP_W_Q4_RUNS)
        return (const uint8_t *)w->data + (size_t)i * (w->stride / 2) + (o < full ? (size_t)(o / 128) * 64 : (size_t)full / 2);
    const uint8_t *blk = (const uint8_t *)w->data + (size_t)(i / B) * B * (w->stride / 2);
    if (o < full) return blk + (size_t)(o / 128) * B * 64 + (size_t)(i % B) * 64;
    return blk + (size_t)full / 2 * B + (size_t)(i % B) * 32;
}

/* code (as float) of input i, output o in the transposed layout */
static inline float q_code_t(const sp_weight *w, int i, int o) {
    if (w->type == SP_W_Q4 || w->type == SP_W_Q4_RUNS) {
        const int wide = o < w->stride / 128 * 128, lanes = wide ? 16 : 8, p = o % (8 * lanes);
        const int j = p / lanes, l = p % lanes; /* nibble j of 32-bit lane l */
        const uint8_t b = q4_chunk(w, i, o)[l * 4 + j / 2];
        return (float)(j % 2 ? b >> 4 : b & 15);
    }
    return (float)((const int8_t *)w->data)[(size_t)i * w->stride + o];
}

#ifdef __AVX2__
/* 8 scales (or minima) from index k on, as fp32 */
static inline __m256 q_param8(const sp_weight *w, const void *a, size_t k) {
    if (w->scale_f32) return _mm256_loadu_ps((const float *)a + k);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)a + k)));
}

/* Q4: acc[j] = sum_t xs[t] * the codes of nibble j in the 32 bytes at tb of block row ch[t] (rows row_bytes apart),
 * scaled back from 16^j. Nibble 7 is shifted to 6's place: int32 is signed. */
static inline __attribute__((always_inline)) void q4_tile8(const uint8_t *tb, int row_bytes, int bmask, const int *ch,
                                                          const float *xs, int k, __m256 *acc) {
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int t = 0; t < k; t++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(tb + (size_t)(ch[t] & bmask) * row_bytes));
        const __m256i v7 = _mm256_srli_epi32(v, 4);
        const __m256 xv = _mm256_broadcast_ss(xs + t);
        for (int j = 0; j < 8; j++) {
            const __m256i m = _mm256_set1_epi32(15 << 4 * (j < 7 ? j : 6));
            acc[j] = _mm256_fmadd_ps(xv, _mm256_cvtepi32_ps(_mm256_and_si256(j < 7 ? v : v7, m)), acc[j]);
        }
    }
    for (int j = 1; j < 8; j++) acc[j] = _mm256_mul_ps(acc[j], _mm256_set1_ps(1.f / (float)(1 << 4 * (j < 7 ? j : 6))));
}

/* Int8: acc[0 : 2 n16) += sum_t xs[t] * codes of row ch[t] over the 16 n16 outputs from o (n16 is a constant at
 * every call, so the loops unroll and acc stays in registers). */
static inline __attribute__((always_inline)) void q8_tile(const sp_weight *w, int o, const int *ch, const float *xs,
                                                         int k, __m256 *acc, const int n16) {
    for (int h = 0; h < 2 * n16; h++) acc[h] = _mm256_setzero_ps();
    const int8_t *base = (const int8_t *)w->data + o;
    for (int t = 0; t < k; t++) {
        const int8_t *p = base + (size_t)ch[t] * w->stride;
        const __m256 xv = _mm256_broadcast_ss(xs + t);
        for (int h = 0; h < 2 * n16; h++)
            acc[h] = _mm256_fmadd_ps(xv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * h)))), acc[h]);
    }
}

/* Requests the codes at the tile of output o of the next block's active rows into L2 (spread over this block's
 * tiles). Without it a sparse product ran from memory little faster than a dense one: the hardware prefetchers do
 * not follow scattered rows. A Q4 tile of a block with a quarter or more of its rows active is requested whole: its
 * rows are adjacent, the hardware prefetchers fetch the rest of it anyway, and requesting only the active rows'
 * lines ran slower than the dense product. Into L2 (T1), not L1: that leaves the L1's miss buffers to the loads, and
 * ran faster. (Requesting the next block's scales too made it slower: the prefetchers stream those.) */
static inline void q_prefetch_next(const sp_weight *w, const int *next, int n_next, int o) {
    if (w->type == SP_W_Q4 && n_next * 4 >= w->block) { /* the tile's rows are adjacent: its bytes, a line at a time */
        const char *tile = (const char *)q4_chunk(w, next[0] & ~(w->block - 1), o);
        const int bytes = w->block * (o < w->stride / 128 * 128 ? 64 : 32);
        for (int b = 0; b < bytes; b += 64) _mm_prefetch(tile + b, _MM_HINT_T1);
        return;
    }
    for (int t = 0; t < n_next; t++)
        _mm_prefetch(w->type != SP_W_Q8 ? (const char *)q4_chunk(w, next[t], o)
                                        : (const char *)w->data + (size_t)next[t] * w->stride + o, _MM_HINT_T1);
}

/* y[o + step h ... + 8) += scale * acc[h] (+ min * sx) for h < n: a tile's block sums, scaled once. */
static inline void q_scale_tile(const sp_weight *w, size_t sb, int o, int step, const __m256 *acc, int n, __m256 sxv,
                                float *restrict y) {
    for (int h = 0; h < n; h++) {
        const int p = o + step * h;
        __m256 t = _mm256_mul_ps(q_param8(w, w->scale, sb + p), acc[h]);
        if (w->min) t = _mm256_fmadd_ps(q_param8(w, w->min, sb + p), sxv, t);
        _mm256_storeu_ps(y + p, _mm256_add_ps(_mm256_loadu_ps(y + p), t));
    }
}

#ifdef __AVX512F__
static inline __m512 q_param16(const sp_weight *w, const void *a, size_t k) {
    if (w->scale_f32) return _mm512_loadu_ps((const float *)a + k);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a + k)));
}

/* y[o + 16j ... + 16) += scale * acc[j] (+ min * sx) for the 8 planes of a 128-output tile: a block's sums, scaled
 * once (q_scale_tile in 16 lanes). */
static inline void q4_scale_tile16(const sp_weight *w, size_t sb, int o, const __m512 *acc, float sx,
                                   float *restrict y) {
    const __m512 sxv = _mm512_set1_ps(sx);
    for (int j = 0; j < 8; j++) {
        const int p = o + 16 * j;
        __m512 t = _mm512_mul_ps(q_param16(w, w->scale, sb + p), acc[j]);
        if (w->min) t = _mm512_fmadd_ps(q_param16(w, w->min, sb + p), sxv, t);
        _mm512_storeu_ps(y + p, _mm512_add_ps(_mm512_loadu_ps(y + p), t));
    }
}

/* A tile of 128 outputs in 16 lanes: the same sums as q4_tile8 over a whole 64-byte chunk, then scaled into y. A code
 * c becomes the float 1 + c / 16 by placing it at the top of a mantissa of 1.0 (a shift and one ternary logic op,
 * integer pipes) instead of an AND and a conversion (the conversions and the FMAs had shared the FP pipes): the
 * sums are then sx + S / 16, S the plane's sum of x * c, taken back out once per tile. */
static inline void q4_tile16(const sp_weight *w, const uint8_t *tb, int bmask, const int *ch, const float *xs, int k,
                             size_t sb, int o, float sx, float *restrict y) {
    __m512 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
    const __m512i top = _mm512_set1_epi32(15 << 19), one = _mm512_set1_epi32(0x3F800000);
    for (int t = 0; t < k; t++) {
        const __m512i v = _mm512_loadu_si512((const void *)(tb + (size_t)(ch[t] & bmask) * 64));
        const __m512 xv = _mm512_set1_ps(xs[t]);
        for (int j = 0; j < 8; j++) { /* nibble j (bits 4j .. 4j + 3) to bits 19 .. 22; (a & top) | one */
            const __m512i a = 4 * j <= 19 ? _mm512_slli_epi32(v, 19 - 4 * j) : _mm512_srli_epi32(v, 4 * j - 19);
            acc[j] = _mm512_fmadd_ps(xv, _mm512_castsi512_ps(_mm512_ternarylogic_epi32(a, top, one, 0xEA)), acc[j]);
        }
    }
    const __m512 sxv = _mm512_set1_ps(sx);
    for (int j = 0; j < 8; j++) acc[j] = _mm512_mul_ps(_mm512_sub_ps(acc[j], sxv), _mm512_set1_ps(16.f));
    q4_scale_tile16(w, sb, o, acc, sx, y);
}

/* Q4 runs: the block's k active rows ch (inputs xs, summing to sx) streamed 8 at a time into the block's sums over
 * every output (acc: in L1), then scaled once into y; the next block's n_next active rows requested whole into L2
 * first, while this block computes. */
static void q4_runs_block(const sp_weight *w, int b, const int *ch, const float *xs, int k, float sx,
                          float *restrict y, const int *next, int n_next) {
    enum { R = 8 };
    const int S = w->stride, rb = S / 2, full = S / 128 * 128;
    SP_ASSERT(S <= SP_Q4_RUNS_MAX_OUT && k > 0);
    const uint8_t *codes = (const uint8_t *)w->data;
    for (int t = 0; t < n_next; t++)
        for (int off = 0; off < rb; off += 64) _mm_prefetch((const char *)codes + (size_t)next[t] * rb + off, _MM_HINT_T1);
    float acc[SP_Q4_RUNS_MAX_OUT] __attribute__((aligned(64)));
    for (int t = 0; t < k; t += R) {
        const int m = k - t < R ? k - t : R;
        const uint8_t *p[R];
        __m512 xv[R];
        for (int r = 0; r < R; r++) { /* a short last pass repeats its first row with input 0 */
            p[r] = codes + (size_t)ch[t + (r < m ? r : 0)] * rb;
            xv[r] = _mm512_set1_ps(r < m ? xs[t + r] : 0.f);
        }
        for (int o = 0; o < full; o += 128) {
            __m512i v[R], v7[R];
            for (int r = 0; r < R; r++) {
                v[r] = _mm512_loadu_si512((const void *)(p[r] + o / 2));
                v7[r] = _mm512_srli_epi32(v[r], 4);
            }
            for (int j = 0; j < 8; j++) {
                const __m512i msk = _mm512_set1_epi32(15 << 4 * (j < 7 ? j : 6));
                __m512 s = t ? _mm512_load_ps(acc + o + 16 * j) : _mm512_setzero_ps();
                for (int r = 0; r < R; r++)
                    s = _mm512_fmadd_ps(xv[r], _mm512_cvtepi32_ps(_mm512_and_si512(j < 7 ? v[r] : v7[r], msk)), s);
                _mm512_store_ps(acc + o + 16 * j, s);
            }
        }
        if (full < S) { /* the tail of 64 outputs: 32 bytes a row, nibble j of lane l output full + 8j + l */
            __m256i v[R], v7[R];
            for (int r = 0; r < R; r++) {
                v[r] = _mm256_loadu_si256((const __m256i *)(p[r] + full / 2));
                v7[r] = _mm256_srli_epi32(v[r], 4);
            }
            for (int j = 0; j < 8; j++) {
                const __m256i msk = _mm256_set1_epi32(15 << 4 * (j < 7 ? j : 6));
                __m256 s = t ? _mm256_load_ps(acc + full + 8 * j) : _mm256_setzero_ps();
                for (int r = 0; r < R; r++)
                    s = _mm256_fmadd_ps(_mm512_castps512_ps256(xv[r]),
                                        _mm256_cvtepi32_ps(_mm256_and_si256(j < 7 ? v[r] : v7[r], msk)), s);
                _mm256_store_ps(acc + full + 8 * j, s);
            }
        }
    }
    const size_t sb = (size_t)b * S;
    for (int o = 0; o < full; o += 128) {
        __m512 a[8];
        for (int j = 0; j < 8; j++) /* plane j's sums were of codes scaled by 16^j (nibble 7 by 16^6) */
            a[j] = _mm512_mul_ps(_mm512_load_ps(acc + o + 16 * j), _mm512_set1_ps(1.f / (float)(1 << 4 * (j < 7 ? j : 6))));
        q4_scale_tile16(w, sb, o, a, sx, y);
    }
    if (full < S) {
        __m256 a[8];
        for (int j = 0; j < 8; j++)
            a[j] = _mm256_mul_ps(_mm256_load_ps(acc + full + 8 * j), _mm256_set1_ps(1.f / (float)(1 << 4 * (j < 7 ? j : 6))));
        q_scale_tile(w, sb, full, 8, a, 8, _mm256_set1_ps(sx), y);
    }
}
#endif
#endif

/* y[0:stride) += the block's term for the k active channels ch (their inputs xs, summing to sx) of block b; next:
 * the n_next active channels of the next block with any, whose rows are requested meanwhile. */
static void q_axpy_block(const sp_weight *w, int b, const int *ch, const float *xs, int k, float sx,
                         float *restrict y, const int *next, int n_next) {
    const size_t sb = (size_t)b * w->stride;
    int o = 0;
#ifdef __AVX512F__
    if (w->type == SP_W_Q4_RUNS) {
        q4_runs_block(w, b, ch, xs, k, sx, y, next, n_next);
        return;
    }
#endif
#ifdef __AVX2__
    const __m256 sxv = _mm256_set1_ps(sx);
    if (w->type == SP_W_Q4) { /* the stride is a multiple of 64 */
        const int B = w->block, bmask = B - 1, full = w->stride / 128 * 128;
        const uint8_t *blk = (const uint8_t *)w->data + (size_t)b * B * (w->stride / 2);
        for (; o < full; o += 128) {
            q_prefetch_next(w, next, n_next, o);
            const uint8_t *tb = blk + (size_t)(o / 128) * B * 64;
#ifdef __AVX512F__
            q4_tile16(w, tb, bmask, ch, xs, k, sb, o, sx, y);
#else
            for (int half = 0; half < 2; half++) { /* lanes 8 half .. 8 half + 7: outputs o + 16 j + 8 half + l */
                __m256 acc[8];
                q4_tile8(tb + 32 * half, 64, bmask, ch, xs, k, acc);
                q_scale_tile(w, sb, o + 8 * half, 16, acc, 8, sxv, y);
            }
#endif
        }
        if (o < w->stride) {
            q_prefetch_next(w, next, n_next, o);
            __m256 acc[8];
            q4_tile8(blk + (size_t)full / 2 * B, 32, bmask, ch, xs, k, acc);
            q_scale_tile(w, sb, o, 8, acc, 8, sxv, y);
            o += 64;
        }
    }
    for (; w->type == SP_W_Q8 && o + 32 <= w->stride; o += 32) {
        q_prefetch_next(w, next, n_next, o);
        __m256 acc[4];
        q8_tile(w, o, ch, xs, k, acc, 2);
        q_scale_tile(w, sb, o, 8, acc, 4, sxv, y);
    }
    for (; w->type == SP_W_Q8 && o + 16 <= w->stride; o += 16) {
        __m256 acc[2];
        q8_tile(w, o, ch, xs, k, acc, 1);
        q_scale_tile(w, sb, o, 8, acc, 2, sxv, y);
    }
#else
    (void)next, (void)n_next;
#endif
    for (; o < w->stride; o++) {
        float s = 0.f;
        for (int t = 0; t < k; t++) s += xs[t] * q_code_t(w, ch[t], o);
        y[o] += q_param(w, w->scale, sb + o) * s + (w->min ? q_param(w, w->min, sb + o) * sx : 0.f);
    }
}

/* How many of act[a:n) (ascending) lie in act[a]'s block of 2^sh inputs: its active channels. */
static inline int block_run(const int *act, int a, int n, int sh) {
    int k = 0;
    while (a + k < n && (act[a + k] >> sh) == (act[a] >> sh)) k++;
    return k;
}

/* 1 where the runs layout has its vector kernel (AVX-512), else 0 (the scalar fallback: correct, not fast). */
int sp_q4_runs_vectorized(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* y[0:out) = sum over the active i of x[i] * W^T[i, :] (transposed layout; act ascending). The active channels are
 * taken a block at a time; y has room for w->stride outputs (the padding is written, with zeros). */
void sp_q_axpy(const sp_weight *w, int out, const float *x, const int *act, int n_act, float *restrict y) {
    SP_ASSERT(sp_q_transposed_type(w->type) && w->block > 0 && w->stride >= out &&
              w->stride % (w->type == SP_W_Q8 ? 16 : 64) == 0);
    memset(y, 0, sizeof(float) * (size_t)w->stride);
    float xs[64];
    SP_ASSERT(w->block <= 64 && (w->block & (w->block - 1)) == 0);
    const int sh = __builtin_ctz((unsigned)w->block); /* a shift, not a division per channel */
#ifdef __AVX2__
    if (n_act) { /* the first block's rows, which no block before requests */
        const int n0 = block_run(act, 0, n_act, sh);
        const int full = w->type != SP_W_Q8 ? w->stride / 128 * 128 : w->stride;
        for (int o = 0; o < w->stride; o += o < full ? (w->type != SP_W_Q8 ? 128 : 32) : 64) q_prefetch_next(w, act, n0, o);
    }
#endif
    for (int a = 0; a < n_act;) {
        const int k = block_run(act, a, n_act, sh);
        float sx = 0.f;
        for (int t = 0; t < k; t++) {
            xs[t] = x[act[a + t]];
            sx += xs[t];
        }
        const int n_next = block_run(act, a + k, n_act, sh); /* the next block's active channels */
        q_axpy_block(w, act[a] >> sh, act + a, xs, k, sx, y, act + a + k, n_next);
        a += k;
    }
}

/* The start, in act, of thread ith's share of the active channels: the even split moved forward to the next block
 * boundary, so a block's scales are applied by one thread only. */
int sp_q_split(const sp_weight *w, const int *act, int n_act, int ith, int nth) {
    int s = (int)((long)n_act * ith / nth);
    const int sh = __builtin_ctz((unsigned)w->block);
    while (s > 0 && s < n_act && (act[s] >> sh) == (act[s - 1] >> sh)) s++;
    return s;
}

/* Rows layout: the dot of row r with x, the block sums of x (sxb, for the minima) given. */
static float q_dot_row(const sp_weight *w, int in, const float *restrict x, const float *sxb, int r) {
    const int B = w->block, nb = in / B;
    const size_t sr = (size_t)r * nb;
    float s = 0.f;
    int b = 0;
#ifdef __AVX512F__
    if (B == 32 && w->type == SP_W_Q8) { /* the lm_head: 16 lanes, a block's scale folded into x (two chains) */
        const int8_t *p = (const int8_t *)w->data + (size_t)r * in;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        float sc[16];
        for (; b < nb; b++) {
            if (b % 16 == 0) {
                if (b + 16 <= nb) _mm512_storeu_ps(sc, q_param16(w, w->scale, sr + b));
                else
                    for (int k = 0; k < nb - b; k++) sc[k] = q_param(w, w->scale, sr + b + k);
            }
            const __m512 sv = _mm512_set1_ps(sc[b % 16]);
            const int8_t *q = p + 32 * b;
            a0 = _mm512_fmadd_ps(_mm512_mul_ps(sv, _mm512_loadu_ps(x + 32 * b)),
                                 _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), a0);
            a1 = _mm512_fmadd_ps(_mm512_mul_ps(sv, _mm512_loadu_ps(x + 32 * b + 16)),
                                 _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), a1);
        }
        s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
#endif
#ifdef __AVX2__
    if (B == 32 && b < nb) {
        __m256 acc = _mm256_setzero_ps();
        float sc[8]; /* the scales of blocks b0 .. b0 + 7, widened 8 at a time */
        for (; b < nb; b++) {
            if (b % 8 == 0) {
                if (b + 8 <= nb) _mm256_storeu_ps(sc, q_param8(w, w->scale, sr + b));
                else
                    for (int k = 0; k < nb - b; k++) sc[k] = q_param(w, w->scale, sr + b + k);
            }
            const float *xb = x + b * 32;
            __m256 t;
            if (w->type == SP_W_Q4) { /* byte j: input j (low nibble) and j + 16 (high) */
                const uint8_t *p = (const uint8_t *)w->data + (size_t)r * (in / 2) + b * 16;
                const __m256i c0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
                const __m256i c1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
                const __m256i m = _mm256_set1_epi32(15);
                t = _mm256_mul_ps(_mm256_loadu_ps(xb), _mm256_cvtepi32_ps(_mm256_and_si256(c0, m)));
                t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8), _mm256_cvtepi32_ps(_mm256_and_si256(c1, m)), t);
                t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 16), _mm256_cvtepi32_ps(_mm256_srli_epi32(c0, 4)), t);
                t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 24), _mm256_cvtepi32_ps(_mm256_srli_epi32(c1, 4)), t);
            } else {
                const int8_t *p = (const int8_t *)w->data + (size_t)r * in + b * 32;
                t = _mm256_mul_ps(_mm256_loadu_ps(xb), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))));
                for (int h = 1; h < 4; h++)
                    t = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * h),
                                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * h)))), t);
            }
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + b % 8), t, acc);
        }
        const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
        s = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
    }
#endif
    for (; b < nb; b++) {
        float t = 0.f;
        for (int j = 0; j < B; j++) {
            float c;
            if (w->type == SP_W_Q4) {
                const uint8_t byte = ((const uint8_t *)w->data)[(size_t)r * (in / 2) + b * (B / 2) + j % (B / 2)];
                c = (float)(j < B / 2 ? byte & 15 : byte >> 4);
            } else {
                c = (float)((const int8_t *)w->data)[(size_t)r * in + b * B + j];
            }
            t += x[b * B + j] * c;
        }
        s += q_param(w, w->scale, sr + b) * t;
    }
    if (w->min)
        for (b = 0; b < nb; b++) s += q_param(w, w->min, sr + b) * sxb[b];
    return s;
}

/* The dot of row r with x, for rows without minima (sp_q_dot_rows' arithmetic: the same value). */
float sp_q_dot_row(const sp_weight *w, int in, const float *x, int r) {
    SP_ASSERT(!w->min && (w->type == SP_W_Q4 || w->type == SP_W_Q8) && in % w->block == 0 && w->stride == in);
    return q_dot_row(w, in, x, NULL, r);
}

/* y[r] = dot(W[r, :], x) for the rows r listed in rows[r0:r1] (or r in [r0, r1) when rows is NULL). */
void sp_q_dot_rows(const sp_weight *w, int in, const float *x, const int *rows, int r0, int r1, float *y) {
    SP_ASSERT((w->type == SP_W_Q4 || w->type == SP_W_Q8) && w->block > 0 && in % w->block == 0 && w->stride == in);
    const int B = w->block, nb = in / B;
    float sxb[nb]; /* the block sums of x, for the minima */
    if (w->min)
        for (int b = 0; b < nb; b++) {
            float s = 0.f;
            for (int j = 0; j < B; j++) s += x[b * B + j];
            sxb[b] = s;
        }
    for (int a = r0; a < r1; a++) {
        const int r = rows ? rows[a] : a;
        y[r] = q_dot_row(w, in, x, sxb, r);
    }
}
