/* Causal softmax attention for training on the CPU, fp32: forward and backward.

   Why native code: at the demo preset (4 heads of 64, T = 512-1536) attention is ~12-30% of the
   model FLOPs, and in PyTorch it ran at about half the matmul rate: `bmm` over B*H small matrices
   splits every 128x64 @ 64x512 product across the threads, and the masks, softmax, copies and
   transposes around it are separate passes over memory. Here each OpenMP thread takes whole
   (batch, kv-head) slices and runs the sgemm calls of those slices single-threaded, on data that
   stays in its core's cache; softmax, masking and the softmax backward are loops on the same
   blocks. Query rows go in blocks of `bs`; block i multiplies only the keys it can see, so causal
   attention costs (n+1)/2n of the full T^2 work for n blocks; with packed documents each block
   goes in segments of whole documents (see segment_end), which skip the keys before their own
   document's start.

   Layouts (row-major, the ones the model's projections produce, so nothing is copied). Every
   [B, T, heads, hd] buffer is given by its pointer and its row stride ld (floats from one time step
   to the next; the batch stride is T * ld), so views into the fused q|k|v buffer work directly:
     qk   [B, T, H + Hkv, hd]  post-RoPE q heads then k heads
     v    [B, T, Hkv, hd]
     y    [B, T, H * hd]       output (forward), dy its gradient (backward), contiguous
     key_start [B, T] int32    first key each query may attend (its document start), or NULL (0)
     probs: for every (b, h), the softmax of each query block i, rows x (keys 0 .. end of block)
            stored densely (row stride = block end). Of each row, the columns its segment covers
            (see segment_end) are set, 0 outside the row's [key_start, row]; the rest, which
            backward never reads, are left unset.
   Query head h uses kv head h / (H / Hkv) (grouped-query attention, Chameleon's repeat_interleave).

   sgemm is the BLAS (Fortran-interface) sgemm linked into PyTorch, MKL in the x86 wheels (passed
   in as a pointer by anymodal/kernels/attention.py). Called inside an OpenMP parallel region it runs on the calling
   thread only. Results do not depend on the number of threads: every slice is summed in one order. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

typedef void (*sgemm_fn)(const char *ta, const char *tb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);
static const char NO_TRANS = 'N', TRANS = 'T';

/* Row-major C[m, n] = alpha * op(A) @ op(B) + beta * C through the column-major BLAS: the same
   product is C^T = op(B)^T @ op(A)^T, and a row-major matrix read column-major is its transpose. */
static void gemm(sgemm_fn f, char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                 int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  const int M = m, N = n, K = k, LDA = lda, LDB = ldb, LDC = ldc;
  f(&tb, &ta, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}

/* Row softmax in place over columns [lo, hi) of `row`; columns [z0, lo) and [hi, z1) (the rest of
   what backward reads) are zeroed. Kept out of line: inlined into the OpenMP loop body, gcc ran its
   scalar version (4x slower). */
__attribute__((noinline)) static void softmax_row(float *restrict row, int64_t lo, int64_t hi, int64_t z0,
                                                  int64_t z1) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = lo; j < hi; ++j) m = row[j] > m ? row[j] : m;
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = lo; j < hi; ++j) {
    const float e = exp_clamped(row[j] - m);
    row[j] = e;
    s += e;
  }
  const float r = 1.0f / s;
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) row[j] *= r;
  if (lo > z0) memset(row + z0, 0, (size_t)(lo - z0) * sizeof(float));
  if (hi < z1) memset(row + hi, 0, (size_t)(z1 - hi) * sizeof(float));
}

/* Softmax backward of one row in place: d = p * (d - sum(p * d)) over n columns. Out of line, as above. */
__attribute__((noinline)) static void softmax_backward_row(const float *restrict p, float *restrict d, int64_t n) {
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < n; ++j) dot += p[j] * d[j];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) d[j] = p[j] * (d[j] - dot);
}

/* Offset of block i's probabilities inside one (b, h) slice, and the slice's size. */
static int64_t block_offset(int64_t i, int64_t bs, int64_t T) {
  int64_t off = 0;
  for (int64_t j = 0; j < i; ++j) {
    const int64_t r0 = j * bs, r1 = r0 + bs < T ? r0 + bs : T;
    off += (r1 - r0) * r1;
  }
  return off;
}

int64_t am_attn_probs_per_head(int64_t T, int64_t bs) { return block_offset((T + bs - 1) / bs, bs, T); }

/* Rows of a query block go through the GEMMs in segments of whole documents. Without documents
   (key_start NULL) a segment is the whole block. With them, a block that holds the end of one
   document and the start of the next would otherwise score every row against the earlier
   document's keys too (for short packed documents that was ~40% more score work than the masks
   leave). A document start stays in the current segment when what that saves is smaller than
   SPLIT_MIN_SCORES: an estimate of what the extra GEMM calls cost (six per segment, forward and
   backward; a few microseconds each). */
#define SPLIT_MIN_SCORES 1024

static int64_t segment_end(const int32_t *ks, int64_t s, int64_t r1) {
  if (!ks) return r1;
  int64_t e = s + 1;
  while (e < r1) {
    if (ks[e] == ks[e - 1]) {
      ++e;
      continue;
    }
    int64_t n = e + 1;  // the document starting at row e ends at row n (or the block does)
    while (n < r1 && ks[n] == ks[e]) ++n;
    if ((ks[e] - ks[s]) * (n - e) > SPLIT_MIN_SCORES) break;  // scores its rows would skip
    e = n;
  }
  return e;
}

/* First key any row of [r0, r1) may see. */
static int64_t rows_key_start(const int32_t *ks, int64_t r0, int64_t r1) {
  if (!ks) return 0;
  int64_t lo = r1;
  for (int64_t r = r0; r < r1; ++r) lo = ks[r] < lo ? ks[r] : lo;
  return lo;
}

int am_attn_forward(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t hd, int64_t bs, float scale,
                    const float *qk, int64_t ldqk, const float *v, int64_t ldv, const int32_t *key_start,
                    float *y, float *probs, void *gemm_ptr) {
  sgemm_fn blas = (sgemm_fn)gemm_ptr;
  const int64_t g = H / Hkv, ldy = H * hd;
  const int64_t nblk = (T + bs - 1) / bs, per_head = am_attn_probs_per_head(T, bs);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < B * H; ++task) {
    const int64_t b = task / H, h = task % H, kvh = h / g;
    const float *q = qk + b * T * ldqk + h * hd, *k = qk + b * T * ldqk + (H + kvh) * hd;
    const float *vb = v + b * T * ldv + kvh * hd;
    const int32_t *ks = key_start ? key_start + b * T : NULL;
    float *pb = probs + task * per_head;
    for (int64_t i = 0; i < nblk; ++i) {
      const int64_t r0 = i * bs, r1 = r0 + bs < T ? r0 + bs : T;
      float *pblk = pb + block_offset(i, bs, T);  // [r1 - r0, r1]
      for (int64_t s0 = r0, s1; s0 < r1; s0 = s1) {
        s1 = segment_end(ks, s0, r1);
        const int64_t k0 = rows_key_start(ks, s0, s1), w = s1 - k0;
        float *p = pblk + (s0 - r0) * r1;  // the segment's rows [s1 - s0, r1]
        // scores of the keys the segment may see: p[:, k0:s1] = scale * q[s0:s1] @ k[k0:s1]^T
        gemm(blas, NO_TRANS, TRANS, s1 - s0, w, hd, scale, q + s0 * ldqk, ldqk,
             k + k0 * ldqk, ldqk, 0.f, p + k0, r1);
        for (int64_t r = s0; r < s1; ++r) softmax_row(p + (r - s0) * r1, ks ? ks[r] : 0, r + 1, k0, s1);
        // y[s0:s1, h] = p[:, k0:s1] @ v[k0:s1]
        gemm(blas, NO_TRANS, NO_TRANS, s1 - s0, hd, w, 1.f, p + k0, r1,
             vb + k0 * ldv, ldv, 0.f, y + b * T * ldy + s0 * ldy + h * hd, ldy);
      }
    }
  }
  return 0;
}

int am_attn_backward(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t hd, int64_t bs, float scale,
                     const float *qk, int64_t ldqk, const float *v, int64_t ldv, const int32_t *key_start,
                     const float *probs, const float *dy, float *dqk, int64_t lddqk, float *dv, int64_t lddv,
                     void *gemm_ptr) {
  sgemm_fn blas = (sgemm_fn)gemm_ptr;
  const int64_t g = H / Hkv, ldy = H * hd;
  const int64_t nblk = (T + bs - 1) / bs, per_head = am_attn_probs_per_head(T, bs);
  int failed = 0;
  // one task per (b, kv head): its q heads all add into the same dk/dv rows, in a fixed order
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < B * Hkv; ++task) {
    const int64_t b = task / Hkv, kvh = task % Hkv;
    float *ds = malloc((size_t)(bs * T) * sizeof(float));  // d scores of one segment [rs, w]
    if (!ds) {
#pragma omp atomic write
      failed = 1;
      continue;
    }
    const float *k = qk + b * T * ldqk + (H + kvh) * hd, *vb = v + b * T * ldv + kvh * hd;
    float *dk = dqk + b * T * lddqk + (H + kvh) * hd, *dvb = dv + b * T * lddv + kvh * hd;
    const int32_t *ks = key_start ? key_start + b * T : NULL;
    for (int64_t t = 0; t < T; ++t) {
      memset(dk + t * lddqk, 0, (size_t)hd * sizeof(float));
      memset(dvb + t * lddv, 0, (size_t)hd * sizeof(float));
    }
    for (int64_t h = kvh * g; h < (kvh + 1) * g; ++h) {
      const float *q = qk + b * T * ldqk + h * hd, *pb = probs + (b * H + h) * per_head;
      float *dq = dqk + b * T * lddqk + h * hd;
      const float *dyb = dy + b * T * ldy + h * hd;
      for (int64_t i = nblk - 1; i >= 0; --i) {
        const int64_t r0 = i * bs, r1 = r0 + bs < T ? r0 + bs : T;
        const float *pblk = pb + block_offset(i, bs, T);
        for (int64_t s0 = r0, s1; s0 < r1; s0 = s1) {  // the forward pass's segments
          s1 = segment_end(ks, s0, r1);
          const int64_t k0 = rows_key_start(ks, s0, s1), w = s1 - k0, rs = s1 - s0;
          const float *p = pblk + (s0 - r0) * r1 + k0;  // [rs, w], row stride r1
          // dp = dy[s0:s1] @ v[k0:s1]^T
          gemm(blas, NO_TRANS, TRANS, rs, w, hd, 1.f, dyb + s0 * ldy, ldy,
               vb + k0 * ldv, ldv, 0.f, ds, w);
          // ds = p * (dp - sum(p * dp)) (softmax backward; masked entries have p = 0)
          for (int64_t r = 0; r < rs; ++r) softmax_backward_row(p + r * r1, ds + r * w, w);
          // dq[s0:s1] = scale * ds @ k[k0:s1];  dk[k0:s1] += scale * ds^T @ q[s0:s1];
          // dv[k0:s1] += p^T @ dy[s0:s1]
          gemm(blas, NO_TRANS, NO_TRANS, rs, hd, w, scale, ds, w, k + k0 * ldqk,
               ldqk, 0.f, dq + s0 * lddqk, lddqk);
          gemm(blas, TRANS, NO_TRANS, w, hd, rs, scale, ds, w, q + s0 * ldqk,
               ldqk, 1.f, dk + k0 * lddqk, lddqk);
          gemm(blas, TRANS, NO_TRANS, w, hd, rs, 1.f, p, r1, dyb + s0 * ldy,
               ldy, 1.f, dvb + k0 * lddv, lddv);
        }
      }
    }
    free(ds);
  }
  return failed;
}

/* ---- QK-Norm and RoPE, the passes between the q|k|v projection and attention -------------------

   Per (b, t) and per q or k head (nh = H + Hkv of them) of x (row stride ldx, the fused q|k|v
   projection output): LayerNorm over hd (biased variance, eps), the head's affine (w, bias
   [nh, hd]; w NULL = no QK-Norm), then RoPE on (x[2i], x[2i+1]) pairs with rot [B, T, hd/2, 2]
   = (cos, sin) of each token's angle. out is contiguous [B, T, nh, hd]; mean and rstd [B, T, nh]
   are kept for backward. */

__attribute__((noinline)) static void norm_rope_row(const float *restrict x, const float *restrict w,
                                                    const float *restrict bias, const float *restrict rot,
                                                    float *restrict out, int64_t hd, float eps,
                                                    float *mean_out, float *rstd_out) {
  float n[hd];
  if (w) {
    float mu = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mu)
    for (int64_t j = 0; j < hd; ++j) mu += x[j];
    mu /= (float)hd;
#pragma omp simd reduction(+ : var)
    for (int64_t j = 0; j < hd; ++j) var += (x[j] - mu) * (x[j] - mu);
    const float rstd = 1.0f / sqrtf(var / (float)hd + eps);
#pragma omp simd
    for (int64_t j = 0; j < hd; ++j) n[j] = (x[j] - mu) * rstd * w[j] + bias[j];
    *mean_out = mu;
    *rstd_out = rstd;
  } else {
    memcpy(n, x, (size_t)hd * sizeof(float));
  }
#pragma omp simd
  for (int64_t i = 0; i < hd / 2; ++i) {
    const float c = rot[2 * i], s = rot[2 * i + 1], a = n[2 * i], b = n[2 * i + 1];
    out[2 * i] = a * c - b * s;
    out[2 * i + 1] = a * s + b * c;
  }
}

void am_qk_norm_rope_forward(int64_t B, int64_t T, int64_t nh, int64_t hd, const float *x, int64_t ldx,
                             const float *w, const float *bias, float eps, const float *rot, float *out,
                             float *mean, float *rstd) {
#pragma omp parallel for schedule(static)
  for (int64_t bt = 0; bt < B * T; ++bt)
    for (int64_t h = 0; h < nh; ++h) {
      float m = 0.f, r = 0.f;
      norm_rope_row(x + bt * ldx + h * hd, w ? w + h * hd : NULL, w ? bias + h * hd : NULL,
                    rot + bt * hd, out + (bt * nh + h) * hd, hd, eps, &m, &r);
      if (w) {
        mean[bt * nh + h] = m;
        rstd[bt * nh + h] = r;
      }
    }
}

/* d (row stride ldd) holds d out on entry and d x on return. With QK-Norm, the weight and bias
   gradients of every `chunk` consecutive (b, t) rows are summed into dw_part / db_part
   [n_chunks, nh, hd] (fixed chunks: the result does not depend on the thread count). */
__attribute__((noinline)) static void norm_rope_backward_row(const float *restrict x, const float *restrict w,
                                                             const float *restrict rot, float *restrict d,
                                                             int64_t hd, float mu, float rstd,
                                                             float *restrict dw, float *restrict db) {
  float dn[hd];
#pragma omp simd
  for (int64_t i = 0; i < hd / 2; ++i) {  // rotate back by -angle
    const float c = rot[2 * i], s = rot[2 * i + 1], a = d[2 * i], b = d[2 * i + 1];
    dn[2 * i] = a * c + b * s;
    dn[2 * i + 1] = b * c - a * s;
  }
  if (!w) {
    memcpy(d, dn, (size_t)hd * sizeof(float));
    return;
  }
  float s1 = 0.f, s2 = 0.f;  // mean(dxhat), mean(dxhat * xhat)
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t j = 0; j < hd; ++j) {
    const float xh = (x[j] - mu) * rstd, dxh = dn[j] * w[j];
    dw[j] += dn[j] * xh;
    db[j] += dn[j];
    s1 += dxh;
    s2 += dxh * xh;
  }
  s1 /= (float)hd;
  s2 /= (float)hd;
#pragma omp simd
  for (int64_t j = 0; j < hd; ++j) {
    const float xh = (x[j] - mu) * rstd;
    d[j] = rstd * (dn[j] * w[j] - s1 - xh * s2);
  }
}

void am_qk_norm_rope_backward(int64_t B, int64_t T, int64_t nh, int64_t hd, const float *x, int64_t ldx,
                              const float *w, const float *rot, const float *mean, const float *rstd,
                              float *d, int64_t ldd, int64_t chunk, float *dw_part, float *db_part) {
  const int64_t n = B * T, n_chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    float *dw = w ? dw_part + c * nh * hd : NULL, *db = w ? db_part + c * nh * hd : NULL;
    if (w) {
      memset(dw, 0, (size_t)(nh * hd) * sizeof(float));
      memset(db, 0, (size_t)(nh * hd) * sizeof(float));
    }
    const int64_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
    for (int64_t bt = c * chunk; bt < end; ++bt)
      for (int64_t h = 0; h < nh; ++h)
        norm_rope_backward_row(x + bt * ldx + h * hd, w ? w + h * hd : NULL, rot + bt * hd,
                               d + bt * ldd + h * hd, hd, w ? mean[bt * nh + h] : 0.f,
                               w ? rstd[bt * nh + h] : 0.f, w ? dw + h * hd : NULL, w ? db + h * hd : NULL);
  }
}
