/* Fused elementwise passes of a CPU training step, fp32: SwiGLU, RMSNorm and the cross-entropy loss.

   Why native code: in PyTorch these are chains of separate full passes over large buffers
   (SwiGLU: silu, then a multiply, and three more passes backward; the loss: log-softmax into a
   [rows, V] buffer, a gather, then softmax, multiply and scatter backward). Each pass here reads
   its inputs once and writes its outputs once; rows are split across the OpenMP threads.

   - swiglu: h [N, 2F] = [gate | up] -> y [N, F] = silu(gate) * up; backward from h and dy alone
     (the sigmoid is recomputed, nothing else is saved).
   - RMSNorm: forward keeps 1/rms per row; backward is one pass for dx, with the weight gradient
     summed per fixed chunk of rows.
   - cross entropy: per row of x [N, V], lse = logsumexp(x) and ce = lse - x[target] (no softmax
     buffer is written); backward writes (g_ce + g_lse) * exp(x - lse) - g_ce * onehot(target) in
     one pass, optionally over x itself.

   Built by anymodal/kernels/build.py, loaded by anymodal/kernels/elementwise.py. Results do not
   depend on the number of threads (every row is computed by one thread, in one order). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

/* Row kernels are kept out of line: inlined into OpenMP loop bodies, gcc ran their scalar versions. */
__attribute__((noinline)) static void swiglu_row(const float *restrict gate, const float *restrict up,
                                                 float *restrict y, int64_t f) {
#pragma omp simd
  for (int64_t j = 0; j < f; ++j) {
    const float a = gate[j];
    y[j] = a / (1.0f + exp_clamped(-a)) * up[j];
  }
}

__attribute__((noinline)) static void swiglu_backward_row(const float *restrict gate, const float *restrict up,
                                                          const float *restrict dy, float *restrict dgate,
                                                          float *restrict dup, int64_t f) {
#pragma omp simd
  for (int64_t j = 0; j < f; ++j) {
    const float a = gate[j], s = 1.0f / (1.0f + exp_clamped(-a)), g = dy[j];
    dup[j] = g * a * s;
    dgate[j] = g * up[j] * s * (1.0f + a * (1.0f - s));  // d silu(a) / da = s (1 + a (1 - s))
  }
}

void am_swiglu_forward(int64_t n, int64_t f, const float *h, float *y) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) swiglu_row(h + r * 2 * f, h + r * 2 * f + f, y + r * f, f);
}

void am_swiglu_backward(int64_t n, int64_t f, const float *h, const float *dy, float *dh) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const float *hr = h + r * 2 * f;
    float *dr = dh + r * 2 * f;
    swiglu_backward_row(hr, hr + f, dy + r * f, dr, dr + f, f);
  }
}

__attribute__((noinline)) static float row_max(const float *restrict x, int64_t v) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

__attribute__((noinline)) static float row_sum_exp(const float *restrict x, int64_t v, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) s += exp_clamped(x[j] - m);
  return s;
}

__attribute__((noinline)) static void row_scaled_exp(const float *x, float *out, int64_t v, float lse, float scale) {
  // out may alias x (in-place backward): element j is read before it is written
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) out[j] = scale * exp_clamped(x[j] - lse);
}

void am_cross_entropy_forward(int64_t n, int64_t v, const float *x, const int64_t *target, float *ce,
                              float *lse) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const float *xr = x + r * v;
    const float m = row_max(xr, v);
    const float l = m + logf(row_sum_exp(xr, v, m));
    lse[r] = l;
    ce[r] = l - xr[target[r]];
  }
}

/* g_ce [n] (required), g_lse [n] or NULL. grad may be x itself. */
void am_cross_entropy_backward(int64_t n, int64_t v, const float *x, const int64_t *target, const float *lse,
                               const float *g_ce, const float *g_lse, float *grad) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const float scale = g_ce[r] + (g_lse ? g_lse[r] : 0.f);
    row_scaled_exp(x + r * v, grad + r * v, v, lse[r], scale);
    grad[r * v + target[r]] -= g_ce[r];
  }
}

/* ---- RMSNorm: out = w * x / sqrt(mean(x^2) + eps) over rows of d; rstd [n] is kept -------------- */

__attribute__((noinline)) static float rms_norm_row(const float *restrict x, const float *restrict w,
                                                    float *restrict out, int64_t d, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < d; ++j) ss += x[j] * x[j];
  const float r = 1.0f / sqrtf(ss / (float)d + eps);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) out[j] = x[j] * r * w[j];
  return r;
}

void am_rms_norm_forward(int64_t n, int64_t d, const float *x, const float *w, float eps, float *out,
                         float *rstd) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) rstd[r] = rms_norm_row(x + r * d, w, out + r * d, d, eps);
}

__attribute__((noinline)) static void rms_norm_backward_row(const float *restrict x, const float *restrict w,
                                                            const float *restrict g, float rstd,
                                                            float *restrict dx, float *restrict dw,
                                                            int64_t d) {
  float dot = 0.f;  // sum(g * w * xhat)
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < d; ++j) {
    const float xh = x[j] * rstd;
    dw[j] += g[j] * xh;
    dot += g[j] * w[j] * xh;
  }
  dot /= (float)d;
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) dx[j] = rstd * (g[j] * w[j] - x[j] * rstd * dot);
}

/* dw of every `chunk` consecutive rows goes to dw_part [n_chunks, d] (summed by the caller in
   order, so the result does not depend on the thread count). */
void am_rms_norm_backward(int64_t n, int64_t d, const float *x, const float *w, const float *rstd,
                          const float *g, float *dx, int64_t chunk, float *dw_part) {
  const int64_t n_chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    float *dw = dw_part + c * d;
    memset(dw, 0, (size_t)d * sizeof(float));
    const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
    for (int64_t r = c * chunk; r < end; ++r) rms_norm_backward_row(x + r * d, w, g + r * d, rstd[r], dx + r * d, dw, d);
  }
}
