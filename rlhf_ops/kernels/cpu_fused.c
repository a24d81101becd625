/* Fused fp32 CPU kernels for a Llama-style decoder layer: RMSNorm, RoPE and SwiGLU's elementwise part.
 *
 * Each replaces a chain of 5-20 PyTorch ops (one pass over memory and one dispatch each) with a single
 * pass. Built at first use by rlhf_ops/kernels/cpu.py (gcc -O3 -march=native -fopenmp) and called
 * through ctypes with raw pointers; the Python side checks dtype, device, shapes and strides.
 *
 * Rows are split across OpenMP threads (torch's own libgomp, already loaded by `import torch`) when the
 * caller passes nt > 1 and the tensor is large enough for threads to pay off.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define PAR_MIN 32768 /* elements below which one thread does the work (torch's grain size) */

/* exp(x) in fp32: Cephes' range reduction and polynomial (about 1 ulp), branch-free so it vectorizes. */
static inline float exp_f(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};  /* 2^n */
    return p * scale.f;
}

static inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

/* [begin, end) of n elements for thread t of nt (contiguous chunks, multiples of 64 elements). */
static inline void chunk(int64_t n, int t, int nt, int64_t *begin, int64_t *end) {
    int64_t per = ((n + nt - 1) / nt + 63) / 64 * 64;
    *begin = t * per < n ? t * per : n;
    *end = *begin + per < n ? *begin + per : n;
}

static void swiglu_fwd_range(const float *g, const float *u, float *p, int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        float gi = g[i];
        p[i] = gi * sigmoid_f(gi) * u[i];
    }
}

/* p = silu(g) * u over n elements (p may alias g or u). */
void swiglu_fwd(const float *g, const float *u, float *p, int64_t n, int nt) {
#pragma omp parallel num_threads(nt) if (nt > 1 && n >= PAR_MIN)
    {
        int64_t begin, end;
        chunk(n, omp_get_thread_num(), omp_get_num_threads(), &begin, &end);
        swiglu_fwd_range(g, u, p, begin, end);
    }
}

static void swiglu_bwd_range(const float *gp, const float *g, const float *u, float *p, float *gg, float *gu,
                             int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; i++) {
        float gi = g[i], ui = u[i], d = gp[i];
        float sig = sigmoid_f(gi);
        float s = gi * sig;
        p[i] = s * ui;
        gu[i] = d * s;
        gg[i] = d * ui * (sig * (1.0f + gi * (1.0f - sig)));
    }
}

/* From the product's gradient gp and the saved g, u: p = silu(g) * u (for down's weight gradient),
 * gu = gp * silu(g), gg = gp * u * silu'(g). gg may alias gp. */
void swiglu_bwd(const float *gp, const float *g, const float *u, float *p, float *gg, float *gu, int64_t n,
                int nt) {
#pragma omp parallel num_threads(nt) if (nt > 1 && n >= PAR_MIN)
    {
        int64_t begin, end;
        chunk(n, omp_get_thread_num(), omp_get_num_threads(), &begin, &end);
        swiglu_bwd_range(gp, g, u, p, gg, gu, begin, end);
    }
}

/* y = w * (x * rstd) per row of H, rstd = 1 / sqrt(mean(x^2) + eps) (kept for the backward). */
void rmsnorm_fwd(const float *x, const float *w, float *y, float *rstd, int64_t rows, int64_t H, float eps,
                 int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1 && rows * H >= PAR_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * H;
        float *yr = y + r * H;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < H; j++) ss += xr[j] * xr[j];
        float rs = 1.0f / sqrtf(ss / (float)H + eps);
        rstd[r] = rs;
#pragma omp simd
        for (int64_t j = 0; j < H; j++) yr[j] = w[j] * (xr[j] * rs);
    }
}

/* dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), xhat = x * rstd; dw_parts[t] (zeroed by the caller, one
 * row of H per thread) += dy * xhat over the rows thread t takes. */
void rmsnorm_bwd(const float *dy, const float *x, const float *w, const float *rstd, float *dx, float *dw_parts,
                 int64_t rows, int64_t H, int nt) {
#pragma omp parallel num_threads(nt) if (nt > 1 && rows * H >= PAR_MIN)
    {
        float *dw = dw_parts + (int64_t)omp_get_thread_num() * H;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * H, *dyr = dy + r * H;
            float *dxr = dx + r * H;
            float rs = rstd[r], dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < H; j++) dot += dyr[j] * w[j] * xr[j];
            float m = dot * rs / (float)H;
#pragma omp simd
            for (int64_t j = 0; j < H; j++) {
                float xh = xr[j] * rs;
                dxr[j] = rs * (dyr[j] * w[j] - xh * m);
                dw[j] += dyr[j] * xh;
            }
        }
    }
}

/* Rotary embedding of x [B, T, Hx, D] (strides sb, st, sh; unit stride on D) with cos/sin [*, T, D]
 * (strides cb, ct; cb = 0 broadcasts one row of positions over B), into out, contiguous [B, T, Hx, D].
 * Forward (bwd = 0), half = D / 2:
 *   out[d] = x[d] cos[d] - x[d + half] sin[d]   (d < half)
 *   out[d] = x[d] cos[d] + x[d - half] sin[d]   (d >= half)
 * Backward (bwd = 1) is its transpose, applied to the output gradient:
 *   out[d] = x[d] cos[d] + x[d + half] sin[d + half]   (d < half)
 *   out[d] = x[d] cos[d] - x[d - half] sin[d - half]   (d >= half) */
void rope(const float *x, int64_t sb, int64_t st, int64_t sh, const float *cs, const float *sn, int64_t cb,
          int64_t ct, float *out, int64_t B, int64_t T, int64_t Hx, int64_t D, int bwd, int nt) {
    int64_t half = D / 2;
#pragma omp parallel for collapse(2) num_threads(nt) if (nt > 1 && B * T * Hx * D >= PAR_MIN) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t t = 0; t < T; t++) {
            const float *c = cs + b * cb + t * ct, *s = sn + b * cb + t * ct;
            for (int64_t h = 0; h < Hx; h++) {
                const float *xi = x + b * sb + t * st + h * sh;
                float *o = out + ((b * T + t) * Hx + h) * D;
                if (!bwd) {
#pragma omp simd
                    for (int64_t d = 0; d < half; d++) {
                        o[d] = xi[d] * c[d] - xi[d + half] * s[d];
                        o[d + half] = xi[d + half] * c[d + half] + xi[d] * s[d + half];
                    }
                } else {
#pragma omp simd
                    for (int64_t d = 0; d < half; d++) {
                        o[d] = xi[d] * c[d] + xi[d + half] * s[d + half];
                        o[d + half] = xi[d + half] * c[d + half] - xi[d] * s[d];
                    }
                }
            }
        }
    }
}
