/* The collapsed form of the uniform-count encoders, fused into one pass per row for the CPU.
 *
 * Computes exactly what spikellm.ops.rounding.quantize_counts computes after the encoder's step
 * (see cpu_encode.py): per row r of x [rows, cols],
 *
 *   step[r]  = max(bound_r, 1e-8) / levels   (bound_r = max |x| or max(x, 0); or given)
 *   Δ[r, c]  = step[r] / scale[c]            (scale: per-channel step multipliers, or none)
 *   n[r, c]  = clamp(round_half_away(x / Δ), low · scale[c], high · scale[c])
 *   value    = n · Δ
 *
 * step: [rows], read (given) or written (computed; NULL: not kept); counts: NULL or [rows, cols].
 *
 * in IEEE single precision, one correctly rounded operation at a time: it must be compiled
 * without -ffast-math and with -ffp-contract=off, so no product is fused into an addition.
 * NaN propagates as in PyTorch (amax, clamp and the arithmetic keep it), and a zero count is
 * +0.0, never -0.0.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus /* a C++ compiler as $CC: keep the names ctypes looks up */
extern "C" {
#endif

/* max |x| (signed) or max(x, 0) (unsigned) of a row. The bits of a non-negative float order as
   integers, and a NaN's magnitude bits exceed infinity's, so an integer maximum of the magnitudes'
   bits is the float maximum with NaN propagated, as torch.amax does, and it vectorises. */
static float row_bound(const float *x, int64_t cols, int is_signed) {
    int32_t best = 0;
    if (is_signed) {
        for (int64_t c = 0; c < cols; ++c) {
            uint32_t b;
            memcpy(&b, x + c, sizeof b);
            const int32_t m = (int32_t)(b & 0x7fffffffu);
            best = m > best ? m : best;
        }
    } else {
        for (int64_t c = 0; c < cols; ++c) {
            uint32_t b;
            memcpy(&b, x + c, sizeof b);
            const int32_t m = (int32_t)(b & 0x7fffffffu);
            /* the positive part: a negative number (or -0.0) counts 0, a NaN of either sign stays */
            const int32_t kept = ((b >> 31) && m <= 0x7f800000) ? 0 : m;
            best = kept > best ? kept : best;
        }
    }
    float bound;
    memcpy(&bound, &best, sizeof bound);
    return bound;
}

/* round_half_away(clamp(x / step, lo, hi)) · step for one element; the fraction of |v| is exact,
   so comparing it with 1/2 decides ties exactly (spikellm.ops.rounding.round_half_away). |v| is
   at most the largest count (< 2^31) after the clamp, so truncating it through int32 is exact. */
static inline float count_of(float x, float step, float lo, float hi) {
    float v = x / step;
    v = v < lo ? lo : v; /* NaN passes both, as through torch.clamp */
    v = v > hi ? hi : v;
    float magnitude = fabsf(v);
    float defined = magnitude == magnitude ? magnitude : 0.0f; /* NaN -> int32 is undefined */
    float whole = (float)(int32_t)defined;
    whole += (magnitude - whole >= 0.5f) ? 1.0f : 0.0f;
    float n = copysignf(whole, v) + 0.0f; /* + 0.0: -0.0 becomes +0.0 */
    return v == v ? n : v;
}

int spikellm_encode_rows(const float *x, int64_t rows, int64_t cols, float *step, int compute_step,
                         int is_signed, float levels, const float *scale, float low, float high,
                         float *counts, float *value) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * cols;
        float *vr = value + r * cols, *nr = counts ? counts + r * cols : 0;
        float token_step;
        if (compute_step) {
            const float bound = row_bound(xr, cols, is_signed);
            token_step = (bound < 1e-8f ? 1e-8f : bound) / levels; /* NaN stays NaN, as clamp_min */
            if (step) step[r] = token_step;
        } else {
            token_step = step[r];
        }
        if (scale) { /* per-channel multipliers m: step Δ/m, bounds m·low, m·high */
            for (int64_t c = 0; c < cols; ++c) {
                const float element_step = token_step / scale[c];
                const float n = count_of(xr[c], element_step, low * scale[c], high * scale[c]);
                if (nr) nr[c] = n;
                vr[c] = n * element_step;
            }
        } else if (nr) {
            for (int64_t c = 0; c < cols; ++c) {
                const float n = count_of(xr[c], token_step, low, high);
                nr[c] = n;
                vr[c] = n * token_step;
            }
        } else {
            for (int64_t c = 0; c < cols; ++c) vr[c] = count_of(xr[c], token_step, low, high) * token_step;
        }
    }
    return 0;
}

/* One new token of a per-channel (causal) code, element by element over x [n] (its channels, for
 * every sequence and head): the running bound continues from the previous tokens' bound,
 *
 *   bound[i] = max(previous[i], |x[i]|)      (|x| or max(x, 0); no previous: |x| alone; NaN wins)
 *   step     = max(bound, 1e-8) / levels,    value = clamp(round_half_away(x / step)) · step,
 *
 * which is the last row of the code over the whole sequence (cummax of the magnitudes). */
int spikellm_encode_channels(const float *x, int64_t n, const float *previous, float *bound, int is_signed,
                             float levels, float low, float high, float *value) {
    for (int64_t i = 0; i < n; ++i) {
        const float magnitude = is_signed ? fabsf(x[i]) : (x[i] < 0.0f ? 0.0f : x[i]);
        float b = magnitude;
        if (previous) {
            const float p = previous[i];
            b = (p != p || magnitude != magnitude) ? NAN : (p > magnitude ? p : magnitude);
        }
        bound[i] = b;
        const float step = (b < 1e-8f ? 1e-8f : b) / levels;
        value[i] = count_of(x[i], step, low, high) * step;
    }
    return 0;
}

#ifdef __cplusplus
}
#endif
