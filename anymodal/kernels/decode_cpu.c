/* One decode step of anymodal's transformer on the CPU, fp32: ids [B] -> logits [B, V].

   Why native code: at batch 1 a decode step is ~33 matrix-vector products over ~30 MB of weights
   plus ~150 tiny elementwise ops. In PyTorch the products run single-threaded at ~6-8 GB/s and
   each tiny op costs microseconds of dispatch; here the whole step is one call, every product is
   split across the OpenMP threads by output columns (streaming the weights at DRAM speed), and
   norms, RoPE, attention and SwiGLU are plain loops.

   The math is exactly `Transformer.decode` (see anymodal/model/transformer.py):
   RMSNorm, fused q|k|v projection, QK-Norm (LayerNorm over head_dim with per-head affine), RoPE on
   (x[2i], x[2i+1]) pairs, grouped-query attention over the cached keys that are marked valid,
   'pre' or 'swin' norm placement, SwiGLU on [gate | up], final RMSNorm and the untied head.
   Weights are passed transposed ([in, out], row-major), the layout the column split streams best.

   Built by anymodal/kernels/build.py and loaded by anymodal/kernels/decode.py (ctypes). It links
   the same libgomp that PyTorch already loaded, so it shares PyTorch's thread pool instead of
   starting a second one. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

/* Per-layer weights, in this order, in `layer_ptrs[layer * N_LAYER_PTRS + k]`. */
enum { P_ATTN_NORM, P_MLP_NORM, P_WQKV, P_WO, P_W13, P_W2, P_QK_W, P_QK_B, N_LAYER_PTRS };

/* This thread's share [*o0, *o1) of `out` columns, in whole 8-float blocks (one AVX register). */
static void column_share(int64_t out, int64_t *o0, int64_t *o1) {
  int nt = omp_get_num_threads(), t = omp_get_thread_num();
  int64_t blocks = (out + 7) / 8;
  int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
  *o0 = b0 * 8;
  *o1 = b1 * 8 < out ? b1 * 8 : out;
}

/* y[b, o] (+)= sum_i x[b, i] * w[i, o] for this thread's share of the `out` columns; w is [in, out]
   row-major with row stride ldw (>= out: a column slice of a wider matrix), y has row stride ldy.
   Four weight rows per pass: each y element is loaded/stored once per four multiply-adds, and the
   four rows are contiguous streams the prefetcher follows. With accumulate == 0, y is overwritten. */
static void gemv_share(const float *x, const float *w, float *y, int64_t B, int64_t in, int64_t out,
                       int64_t ldw, int64_t ldy, int accumulate) {
  int64_t o0, o1;
  column_share(out, &o0, &o1);
  if (o0 >= o1) return;
  if (!accumulate)
    for (int64_t b = 0; b < B; ++b) memset(y + b * ldy + o0, 0, (size_t)(o1 - o0) * sizeof(float));
  int64_t i = 0;
  for (; i + 4 <= in; i += 4) {
    const float *restrict w0 = w + i * ldw, *restrict w1 = w0 + ldw, *restrict w2 = w1 + ldw,
                *restrict w3 = w2 + ldw;
    for (int64_t b = 0; b < B; ++b) {
      const float *xb = x + b * in;
      const float a0 = xb[i], a1 = xb[i + 1], a2 = xb[i + 2], a3 = xb[i + 3];
      float *restrict yb = y + b * ldy;
#pragma GCC ivdep
      for (int64_t o = o0; o < o1; ++o) yb[o] += a0 * w0[o] + a1 * w1[o] + a2 * w2[o] + a3 * w3[o];
    }
  }
  for (; i < in; ++i) {
    const float *restrict wi = w + i * ldw;
    for (int64_t b = 0; b < B; ++b) {
      const float a = x[b * in + i];
      float *restrict yb = y + b * ldy;
      for (int64_t o = o0; o < o1; ++o) yb[o] += a * wi[o];
    }
  }
}

/* out = w * x / sqrt(mean(x^2) + eps), over d. */
static void rms_norm(const float *x, const float *w, float *out, int64_t d, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float r = 1.0f / sqrtf(ss / (float)d + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = x[i] * r * w[i];
}

/* LayerNorm over d (no affine), in place. */
static void layer_norm(float *x, int64_t d, float eps) {
  float mean = 0.f, var = 0.f;
  for (int64_t i = 0; i < d; ++i) mean += x[i];
  mean /= (float)d;
  for (int64_t i = 0; i < d; ++i) {
    const float c = x[i] - mean;
    var += c * c;
  }
  const float r = 1.0f / sqrtf(var / (float)d + eps);
  for (int64_t i = 0; i < d; ++i) x[i] = (x[i] - mean) * r;
}

/* Returns 0 on success, 1 when scratch memory could not be allocated, 2 for a bad head slice. */
int am_decode_step(
    /* shapes */
    int64_t B, int64_t D, int64_t n_layers, int64_t H, int64_t Hkv, int64_t hd, int64_t F, int64_t V,
    int32_t swin, int32_t qk_norm, float eps, float qk_eps,
    /* inputs */
    const int64_t *ids, const int64_t *pos, int64_t slot, int64_t S_max,
    const uint8_t *valid, /* [B, S_max] bool, or NULL when no slot up to `slot` is padding */
    /* cache [n_layers, B, Hkv, S_max, hd]; this step's keys/values are written at `slot` */
    float *k_cache, float *v_cache,
    /* weights */
    const float *emb, const float *const *layer_ptrs, const float *final_norm, const float *head,
    const float *inv_freq, /* [hd / 2] */
    /* output */
    float *logits, /* [B, V] */
    int64_t head_lo, int64_t head_hi, /* logits outside [head_lo, head_hi) are not computed: -inf */
    int32_t n_threads) {
  if (head_lo < 0 || head_hi > V || head_lo >= head_hi) return 2;
  const int64_t QKV = (H + 2 * Hkv) * hd, QK = (H + Hkv) * hd, S = slot + 1, G = H / Hkv, half = hd / 2;
  const float scale = 1.0f / sqrtf((float)hd);
  const int64_t n_x = B * D, n_h = B * D, n_qkv = B * QKV, n_y = B * H * hd, n_gu = B * 2 * F,
                n_act = B * F, n_rot = B * half * 2, n_sc = B * H * S;
  float *buf = (float *)malloc(sizeof(float) * (size_t)(n_x + n_h + n_qkv + n_y + n_gu + n_act + n_rot + n_sc));
  if (!buf) return 1;
  float *x = buf, *h = x + n_x, *qkv = h + n_h, *y = qkv + n_qkv, *gu = y + n_y, *act = gu + n_gu,
        *rot = act + n_act, *scores = rot + n_rot;
  const int64_t cache_row = Hkv * S_max * hd; /* one batch row of one layer */

  for (int64_t b = 0; b < B; ++b) {
    memcpy(x + b * D, emb + ids[b] * D, sizeof(float) * (size_t)D);
    for (int64_t i = 0; i < half; ++i) { /* the same fp32 angle as torch: float(pos) * inv_freq */
      const float a = (float)pos[b] * inv_freq[i];
      rot[(b * half + i) * 2] = cosf(a);
      rot[(b * half + i) * 2 + 1] = sinf(a);
    }
  }

#pragma omp parallel num_threads(n_threads)
  {
    for (int64_t l = 0; l < n_layers; ++l) {
      const float *const *P = layer_ptrs + l * N_LAYER_PTRS;
      float *kc = k_cache + l * B * cache_row, *vc = v_cache + l * B * cache_row;
      /* attention input */
#pragma omp single
      for (int64_t b = 0; b < B; ++b) {
        if (swin) memcpy(h + b * D, x + b * D, sizeof(float) * (size_t)D);
        else rms_norm(x + b * D, P[P_ATTN_NORM], h + b * D, D, eps);
      }
      gemv_share(h, P[P_WQKV], qkv, B, D, QKV, QKV, QKV, 0);
#pragma omp barrier
      /* QK-Norm, RoPE, and this step's keys/values into the cache: one (row, head) per iteration */
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < B * (H + Hkv); ++bh) {
        const int64_t b = bh / (H + Hkv), hh = bh % (H + Hkv);
        float *v = qkv + b * QKV + hh * hd;
        if (qk_norm) {
          layer_norm(v, hd, qk_eps);
          const float *nw = P[P_QK_W] + hh * hd, *nb = P[P_QK_B] + hh * hd;
          for (int64_t i = 0; i < hd; ++i) v[i] = nb[i] + v[i] * nw[i];
        }
        const float *r = rot + b * half * 2;
        for (int64_t i = 0; i < half; ++i) {
          const float re = v[2 * i], im = v[2 * i + 1], c = r[2 * i], s = r[2 * i + 1];
          v[2 * i] = re * c - im * s;
          v[2 * i + 1] = re * s + im * c;
        }
        if (hh >= H) {
          const int64_t kh = hh - H;
          memcpy(kc + b * cache_row + (kh * S_max + slot) * hd, v, sizeof(float) * (size_t)hd);
          memcpy(vc + b * cache_row + (kh * S_max + slot) * hd, qkv + b * QKV + QK + kh * hd,
                 sizeof(float) * (size_t)hd);
        }
      }
      /* attention of each (row, query head) over its kv head's valid slots 0..slot */
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, hh = bh % H, kh = hh / G;
        const float *q = qkv + b * QKV + hh * hd;
        const float *K = kc + b * cache_row + kh * S_max * hd, *Vv = vc + b * cache_row + kh * S_max * hd;
        const uint8_t *ok = valid ? valid + b * S_max : NULL;
        float *sc = scores + bh * S, mx = -INFINITY;
        for (int64_t j = 0; j < S; ++j) {
          if (ok && !ok[j]) { sc[j] = -INFINITY; continue; }
          float d = 0.f;
          for (int64_t i = 0; i < hd; ++i) d += q[i] * K[j * hd + i];
          sc[j] = d * scale;
          if (sc[j] > mx) mx = sc[j];
        }
        float sum = 0.f;
        for (int64_t j = 0; j < S; ++j) {
          sc[j] = (sc[j] == -INFINITY) ? 0.f : expf(sc[j] - mx);
          sum += sc[j];
        }
        float *out = y + b * H * hd + hh * hd;
        memset(out, 0, sizeof(float) * (size_t)hd);
        for (int64_t j = 0; j < S; ++j) {
          const float p = sc[j] / sum;
          if (p == 0.f) continue;
          for (int64_t i = 0; i < hd; ++i) out[i] += p * Vv[j * hd + i];
        }
      }
      if (swin) { /* x = x + norm(y @ wo); h = x + norm(mlp(x)) */
        gemv_share(y, P[P_WO], h, B, H * hd, D, D, D, 0);
#pragma omp barrier
#pragma omp single
        for (int64_t b = 0; b < B; ++b) {
          rms_norm(h + b * D, P[P_ATTN_NORM], h + b * D, D, eps);
          for (int64_t i = 0; i < D; ++i) x[b * D + i] += h[b * D + i];
        }
        gemv_share(x, P[P_W13], gu, B, D, 2 * F, 2 * F, 2 * F, 0);
      } else { /* x = x + y @ wo; then the MLP on norm(x) */
        gemv_share(y, P[P_WO], x, B, H * hd, D, D, D, 1);
#pragma omp barrier
#pragma omp single
        for (int64_t b = 0; b < B; ++b) rms_norm(x + b * D, P[P_MLP_NORM], h + b * D, D, eps);
        gemv_share(h, P[P_W13], gu, B, D, 2 * F, 2 * F, 2 * F, 0);
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t bf = 0; bf < B * F; ++bf) {
        const int64_t b = bf / F, f = bf % F;
        const float g = gu[b * 2 * F + f], u = gu[b * 2 * F + F + f];
        act[bf] = g / (1.0f + expf(-g)) * u;
      }
      if (swin) {
        gemv_share(act, P[P_W2], h, B, F, D, D, D, 0);
#pragma omp barrier
#pragma omp single
        for (int64_t b = 0; b < B; ++b) {
          rms_norm(h + b * D, P[P_MLP_NORM], h + b * D, D, eps);
          for (int64_t i = 0; i < D; ++i) x[b * D + i] += h[b * D + i];
        }
      } else {
        gemv_share(act, P[P_W2], x, B, F, D, D, D, 1);
#pragma omp barrier
      }
    }
#pragma omp single
    for (int64_t b = 0; b < B; ++b) rms_norm(x + b * D, final_norm, h + b * D, D, eps);
    /* only the vocabulary slice [head_lo, head_hi) the grammar can allow next; the rest is -inf */
    gemv_share(h, head + head_lo, logits + head_lo, B, D, head_hi - head_lo, V, V, 0);
#pragma omp single
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t o = 0; o < head_lo; ++o) logits[b * V + o] = -INFINITY;
      for (int64_t o = head_hi; o < V; ++o) logits[b * V + o] = -INFINITY;
    }
  }
  free(buf);
  return 0;
}
