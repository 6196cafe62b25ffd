/* RMSNorm and the residual add. Gains come from Python already effective (Gemma's 1 + w folded there). */
#include "ops.h"

/* out = h / rms(h) * g; every thread that needs it computes it whole (d floats: cheaper than a barrier). */
void sp_rmsnorm(const float *h, const float *g, int n, float eps, float *out) {
    SP_ASSERT(n > 0);
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)h[i] * h[i];
    const float s = 1.f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = h[i] * s * g[i];
}

/* h += y on this thread's split share, y first normed by `gain` if the block norms its branch outputs (Gemma 3's
 * post-attention and post-feedforward norms); then the caller must have made all of y visible (a barrier). */
void sp_add_branch(int ith, int nth, int d, float eps, const float *gain, const float *y, float *h) {
    SP_ASSERT(d > 0);
    int lo, hi;
    sp_split(d, ith, nth, &lo, &hi);
    if (!gain) {
        for (int j = lo; j < hi; j++) h[j] += y[j];
        return;
    }
    double ss = 0;
    for (int i = 0; i < d; i++) ss += (double)y[i] * y[i];
    const float s = 1.f / sqrtf((float)(ss / d) + eps);
    for (int j = lo; j < hi; j++) h[j] += y[j] * s * gain[j];
}
