/* The quantized transposed product alone: SmolLM2's 210 block linears (30 layers x q, k, v, o, gate, up, down) as
 * Q4 (block 32, fp16 scales and minima) with random codes, one token's products timed, best of N passes. For kernel
 * work: compare builds or densities side by side in one sitting (the machine is shared; absolute rates move).
 *
 *   gcc -O3 -march=native -fopenmp -ffp-contract=fast -std=gnu11 -Isrc/sparsen/engine/kernels \
 *       benchmarks/quant_kernel_bench.c src/sparsen/engine/kernels/[a-z]*.c -o /tmp/qkb -lm
 *   /tmp/qkb DENSITY [PASSES] [THREADS] [LAYERS]      # e.g. /tmp/qkb 1 50 1 30; /tmp/qkb 0.5 50 1 30
 *
 * LAYERS 30 reads the weights from memory (~53 MB of codes); LAYERS 1 keeps them in the last-level cache. THREADS > 1
 * goes through sp_test_gemv's own parallel region per product (a fork and join each), unlike the engine's one
 * region per token: compare threads within this program only. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "ops.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    const double density = argc > 1 ? atof(argv[1]) : 1.0;
    const int passes = argc > 2 ? atoi(argv[2]) : 50, threads = argc > 3 ? atoi(argv[3]) : 1;
    const int layers = argc > 4 ? atoi(argv[4]) : 30;
    if (density < 0 || density > 1 || passes < 1 || threads < 1 || layers < 1) {
        fprintf(stderr, "usage: %s DENSITY(0..1) [PASSES] [THREADS] [LAYERS]\n", argv[0]);
        return 2;
    }
    enum { N_LIN = 7, MAX_IN = 1536 };
    static const int shape[N_LIN][2] = {{576, 576}, {576, 192}, {576, 192}, {576, 576}, {576, 1536}, {576, 1536}, {1536, 576}};
    sp_weight *w = calloc((size_t)layers * N_LIN, sizeof *w);
    float *x = malloc(sizeof(float) * MAX_IN), *y = malloc(sizeof(float) * MAX_IN);
    static int act[N_LIN][MAX_IN];
    int n_act[N_LIN];
    srand(1);
    for (int i = 0; i < MAX_IN; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    long weights = 0;
    for (int l = 0; l < layers; l++)
        for (int j = 0; j < N_LIN; j++) {
            const int in = shape[j][0], out = shape[j][1];
            const size_t n_codes = (size_t)in * out / 2, n_param = (size_t)in / 32 * out;
            uint8_t *codes = malloc(n_codes);
            uint16_t *scale = malloc(2 * n_param), *min = malloc(2 * n_param);
            for (size_t k = 0; k < n_codes; k++) codes[k] = (uint8_t)rand();
            for (size_t k = 0; k < n_param; k++) scale[k] = 0x2000, min[k] = 0xA000; /* ~0.008, ~-0.008 in fp16 */
            w[l * N_LIN + j] = (sp_weight){SP_W_Q4, 32, 0, out, codes, scale, min};
            weights += (long)in * out;
        }
    for (int j = 0; j < N_LIN; j++) {
        n_act[j] = 0;
        for (int i = 0; i < shape[j][0]; i++)
            if (rand() / (double)RAND_MAX < density) act[j][n_act[j]++] = i;
    }
    double best = 1e30;
    for (int p = 0; p < passes; p++) {
        const double t0 = now();
        for (int l = 0; l < layers; l++)
            for (int j = 0; j < N_LIN; j++)
                sp_test_gemv(&w[l * N_LIN + j], shape[j][0], shape[j][1], x, act[j], n_act[j], y, threads);
        const double t = now() - t0;
        if (t < best) best = t;
    }
    printf("density %.2f, %d thread(s), %d layers: %.3f ms per token, %.2f G weights/s (of all), %.2f GB/s of codes read\n",
           density, threads, layers, best * 1e3, weights / best * 1e-9, weights * 0.5 * density / best * 1e-9);
    return 0;
}
