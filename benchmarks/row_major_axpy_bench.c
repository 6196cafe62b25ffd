/* A Q4 product in another layout, beside the engine's tile-major one, from memory: SmolLM2's 210 block linears (30
 * layers x q, k, v, o, gate, up, down; outputs rounded up to 128: 640, 256, 256, 640, 1536, 1536, 640) with random
 * codes, one token's products timed, best of N passes, the two layouts alternating in each pass.
 *
 *   tile-major: the engine's (sp_q_axpy): a block's 32 input rows a tile of 128 outputs at a time, the tile's sums in
 *               registers; a skipped input leaves 64-byte holes scattered through each tile's 2 KB.
 *   row-major:  input i's codes for every output in one run (out / 2 bytes, each 64-byte chunk nibble-packed as the
 *               tile-major chunks are), the block's sums in an L1-resident buffer, ROWS active inputs streamed at a
 *               time: a skipped input is a whole run never read.
 *
 *   gcc -O3 -march=native -fopenmp -ffp-contract=fast -std=gnu11 -Isrc/sparsen/engine/kernels \
 *       benchmarks/row_major_axpy_bench.c src/sparsen/engine/kernels/[a-z]*.c -o /tmp/rmb -lm
 *   /tmp/rmb DENSITY PASSES THREADS LAYERS        # e.g. /tmp/rmb 0.25 10 2 30
 *
 * AVX-512 only; `row_major_q4_axpy` is checked against a scalar dequantized product when the program starts. The
 * engine's SP_W_Q4_RUNS product (kernels/quant.c, q4_runs_block) grew out of it. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include "ops.h"

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

/* y[0:out) = sum over the active inputs act (ascending) of x[i] * W^T[i, :], W = scale * code + min per (block of 32
 * inputs, output). codes [in, out / 2]: row i's 64-byte chunk c holds outputs 128c.. (nibble j of 32-bit lane l is
 * output 128c + 16j + l); scale, min [in / 32, out] fp16; out a multiple of 128; acc [out] scratch. */
#define ROWS 8
static void row_major_q4_axpy(const uint8_t *codes, const uint16_t *scale, const uint16_t *mn, int out, const float *x,
                    const int *act, int n_act, float *restrict y, float *restrict acc) {
    memset(y, 0, sizeof(float) * out);
    const int rb = out / 2, nc = out / 128;
    int a = 0;
    while (a < n_act) {
        const int b = act[a] >> 5;
        int k = 0;
        while (a + k < n_act && (act[a + k] >> 5) == b) k++;
        float sx = 0.f;
        int t = 0;
        int k_next = 0; /* the next block's active rows */
        while (a + k + k_next < n_act && (act[a + k + k_next] >> 5) == (act[a + k] >> 5)) k_next++;
        for (int u = 0; u < k_next; u++) /* ... requested whole into L2 */
            for (int off = 0; off < rb; off += 64) _mm_prefetch((const char *)codes + (size_t)act[a + k + u] * rb + off, _MM_HINT_T1);
        for (; t < k; t += ROWS) {
            const int m = k - t < ROWS ? k - t : ROWS;
            const uint8_t *p[ROWS];
            __m512 xv[ROWS];
            for (int r = 0; r < ROWS; r++) {
                const int i = act[a + t + (r < m ? r : 0)];
                p[r] = codes + (size_t)i * rb;
                const float xi = r < m ? x[i] : 0.f;
                xv[r] = _mm512_set1_ps(xi);
                sx += xi;
            }
            for (int c = 0; c < nc; c++) {
                __m512i v[ROWS], v7[ROWS];
                for (int r = 0; r < ROWS; r++) { v[r] = _mm512_loadu_si512(p[r] + 64 * c); v7[r] = _mm512_srli_epi32(v[r], 4); }
                float *ac = acc + 128 * c;
                for (int j = 0; j < 8; j++) {
                    const __m512i msk = _mm512_set1_epi32(15 << 4 * (j < 7 ? j : 6));
                    __m512 s = t == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(ac + 16 * j);
                    for (int r = 0; r < ROWS; r++)
                        s = _mm512_fmadd_ps(xv[r], _mm512_cvtepi32_ps(_mm512_and_si512(j < 7 ? v[r] : v7[r], msk)), s);
                    _mm512_storeu_ps(ac + 16 * j, s);
                }
            }
        }
        const __m512 sxv = _mm512_set1_ps(sx);
        const size_t sb = (size_t)b * out;
        for (int c = 0; c < nc; c++)
            for (int j = 0; j < 8; j++) {
                const int o = 128 * c + 16 * j;
                const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + sb + o)));
                const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mn + sb + o)));
                __m512 tt = _mm512_mul_ps(sc, _mm512_mul_ps(_mm512_loadu_ps(acc + o), _mm512_set1_ps(1.f / (float)(1 << 4 * (j < 7 ? j : 6)))));
                tt = _mm512_fmadd_ps(mv, sxv, tt);
                _mm512_storeu_ps(y + o, _mm512_add_ps(_mm512_loadu_ps(y + o), tt));
            }
        a += k;
    }
}

static float half(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}

/* row_major_q4_axpy against the dequantized product in double, on random codes, scales and a random third of the
 * inputs inactive: the largest absolute error */
static double self_check(void) {
    enum { IN = 576, OUT = 640 };
    static uint8_t codes[IN * OUT / 2];
    static uint16_t sc[IN / 32 * OUT], mn[IN / 32 * OUT];
    static float x[IN], y[OUT], acc[OUT];
    static int act[IN];
    int n = 0;
    for (int k = 0; k < IN * OUT / 2; k++) codes[k] = (uint8_t)rand();
    for (int k = 0; k < IN / 32 * OUT; k++) {
        const _Float16 a = (_Float16)(rand() / (float)RAND_MAX * 0.02f), b = (_Float16)(-rand() / (float)RAND_MAX * 0.1f);
        memcpy(&sc[k], &a, 2), memcpy(&mn[k], &b, 2);
    }
    for (int i = 0; i < IN; i++) {
        x[i] = rand() / (float)RAND_MAX - 0.5f;
        if (rand() % 3) act[n++] = i;
    }
    row_major_q4_axpy(codes, sc, mn, OUT, x, act, n, y, acc);
    double err = 0;
    for (int o = 0; o < OUT; o++) {
        const int c = o / 128, j = o % 128 / 16, l = o % 16;
        double s = 0;
        for (int t = 0; t < n; t++) {
            const int i = act[t];
            const uint8_t b = codes[(size_t)i * OUT / 2 + 64 * c + 4 * l + j / 2];
            s += (double)x[i] * (half(sc[i / 32 * OUT + o]) * (j % 2 ? b >> 4 : b & 15) + half(mn[i / 32 * OUT + o]));
        }
        err = fabs(s - y[o]) > err ? fabs(s - y[o]) : err;
    }
    return err;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s DENSITY(0..1) PASSES THREADS LAYERS\n", argv[0]);
        return 2;
    }
    const double density = atof(argv[1]);
    const int passes = atoi(argv[2]), threads = atoi(argv[3]), layers = atoi(argv[4]);
    srand(3);
    const double err = self_check();
    if (err > 1e-4) {
        fprintf(stderr, "row_major_q4_axpy differs from the dequantized product by %g\n", err);
        return 1;
    }
    enum { N_LIN = 7, MAX_IN = 1536 };
    /* both layouts at the same shapes, the outputs rounded up to 128 (the row-major chunks) */
    static const int shape[N_LIN][2] = {{576, 640}, {576, 256}, {576, 256}, {576, 640}, {576, 1536}, {576, 1536}, {1536, 640}};
    sp_weight *w = calloc((size_t)layers * N_LIN, sizeof *w);
    uint8_t **rc = calloc((size_t)layers * N_LIN, sizeof *rc);
    uint16_t **rs = calloc((size_t)layers * N_LIN, sizeof *rs), **rmn = calloc((size_t)layers * N_LIN, sizeof *rmn);
    float *x = malloc(sizeof(float) * MAX_IN);
    static int act[N_LIN][MAX_IN];
    int n_act[N_LIN];
    srand(1);
    for (int i = 0; i < MAX_IN; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    for (int l = 0; l < layers; l++)
        for (int j = 0; j < N_LIN; j++) {
            const int in = shape[j][0], out = shape[j][1];
            const size_t n_codes = (size_t)in * out / 2, n_param = (size_t)in / 32 * out;
            uint8_t *codes = malloc(n_codes), *codes2 = malloc(n_codes);
            uint16_t *scale = malloc(2 * n_param), *min = malloc(2 * n_param);
            for (size_t k = 0; k < n_codes; k++) codes[k] = (uint8_t)rand(), codes2[k] = codes[k];
            for (size_t k = 0; k < n_param; k++) scale[k] = 0x2000, min[k] = 0xA000;
            w[l * N_LIN + j] = (sp_weight){SP_W_Q4, 32, 0, out, codes, scale, min};
            rc[l * N_LIN + j] = codes2;
            rs[l * N_LIN + j] = malloc(2 * n_param); memcpy(rs[l * N_LIN + j], scale, 2 * n_param);
            rmn[l * N_LIN + j] = malloc(2 * n_param); memcpy(rmn[l * N_LIN + j], min, 2 * n_param);
        }
    for (int j = 0; j < N_LIN; j++) {
        n_act[j] = 0;
        for (int i = 0; i < shape[j][0]; i++)
            if (rand() / (double)RAND_MAX < density) act[j][n_act[j]++] = i;
    }
    float *part = aligned_alloc(64, sizeof(float) * threads * 2048), *accs = aligned_alloc(64, sizeof(float) * threads * 2048);
    float *y = malloc(sizeof(float) * 2048);
    double best[2] = {1e30, 1e30};
    for (int p = 0; p < passes; p++)
        for (int v = 0; v < 2; v++) {
            const double t0 = now();
#pragma omp parallel num_threads(threads)
            {
                const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
                for (int l = 0; l < layers; l++)
                    for (int j = 0; j < N_LIN; j++) {
                        const sp_weight *wj = &w[l * N_LIN + j];
                        const int a0 = sp_q_split(wj, act[j], n_act[j], ith, nth), a1 = sp_q_split(wj, act[j], n_act[j], ith + 1, nth);
                        if (v == 0) sp_q_axpy(wj, shape[j][1], x, act[j] + a0, a1 - a0, part + ith * 2048);
                        else row_major_q4_axpy(rc[l * N_LIN + j], rs[l * N_LIN + j], rmn[l * N_LIN + j], shape[j][1], x, act[j] + a0, a1 - a0,
                                     part + ith * 2048, accs + ith * 2048);
#pragma omp barrier
                        int lo = shape[j][1] * ith / nth, hi = shape[j][1] * (ith + 1) / nth;
                        for (int o = lo; o < hi; o++) { float s = 0; for (int u = 0; u < nth; u++) s += part[u * 2048 + o]; y[o] = s; }
#pragma omp barrier
                    }
            }
            const double t = now() - t0;
            if (t < best[v]) best[v] = t;
        }
    printf("density %.2f, %d thread(s), %d layers: tile-major %.3f ms, row-major %.3f ms per token (tile / row %.2f)\n",
           density, threads, layers, best[0] * 1e3, best[1] * 1e3, best[0] / best[1]);
    return 0;
}
