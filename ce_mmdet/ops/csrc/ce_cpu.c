/*
 * CE's two passes over an eval feature map on an x86-64 CPU with AVX2 and
 * FMA, float32, for ce_mmdet.ops.cpu_kernels (built there with the system C
 * compiler on first use, loaded by ctypes; the PyTorch ops are used where it
 * cannot be built or run).
 *
 *   ce_map:     out[b] = relu?((A[b] z[b] + bias[b]) + res[b]), one pass
 *               over the (d, hw) blocks b, where ATen needs three (the sum
 *               of residual and bias, the batched GEMM onto it, the ReLU's
 *               write-back); out may be z (in place) and res may be z.
 *               Its tile is 4 rows x 16 columns in AVX2 registers, or, where
 *               the caller asks for it (wide) and the CPU has AVX-512F,
 *               4 rows x 32 columns in AVX-512 registers: twice the FMAs an
 *               instruction, which the d = 64 map of a stem is bound by.
 *   ce_moments: per-row mean and unbiased variance of (rows, hw), one read
 *               (ATen: a sum and a norm, two reads), accumulated in float32
 *               lanes over 1024 positions and in double across them.
 *   ce_eval_small: the small graph of a CE layer in eval (the IR MLP, the
 *               gate, an eval BN folded in) from those variances to the
 *               maps ce_map applies, in one call where PyTorch makes some
 *               30 small ops.
 *
 * The order of the map's arithmetic is ATen's: the products summed first
 * (FMA, over j in order), then the residual-plus-bias term added. Both
 * tiles do the same operations per element in the same order, so they give
 * the same bits.
 */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define LD(p) (*(const v8 *)(p))
#define SPLAT(s) ((v8){(s), (s), (s), (s), (s), (s), (s), (s)})
#define SPLAT16(s)                                                          \
  ((v16){(s), (s), (s), (s), (s), (s), (s), (s), (s), (s), (s), (s), (s), \
         (s), (s), (s)})
/* max(0, s): NaN stays NaN, as torch's ReLU keeps it */
#define RELU8(s) ((v8)_mm256_max_ps(_mm256_setzero_ps(), (__m256)(s)))
#define RELU16(s) ((v16)_mm512_max_ps(_mm512_setzero_ps(), (__m512)(s)))

#define MAX_D 64
#define COLS 16      /* columns of one AVX2 tile: two vectors */
#define WIDE_COLS 32 /* columns of one AVX-512 tile */

/* The last columns [p0, p1) of one block, fewer than a tile, one at a
   time; rows of z, res and out are hw apart. */
static void map_tail(const float *A, const float *z, const float *bias,
                     const float *res, float *out, int64_t d, int64_t hw,
                     int64_t p0, int64_t p1, int relu) {
  float zt[MAX_D * COLS];
  int64_t w = p1 - p0;
  for (int64_t j = 0; j < d; j++) /* z first: out may be z */
    memcpy(zt + j * COLS, z + j * hw + p0, (size_t)w * sizeof(float));
  for (int64_t i = 0; i < d; i++) {
    for (int64_t q = 0; q < w; q++) {
      float t = 0.f;
      for (int64_t j = 0; j < d; j++) t += A[i * d + j] * zt[j * COLS + q];
      float s = bias ? bias[i] : 0.f;
      if (res) s = res[i * hw + p0 + q] + s;
      s += t;
      out[i * hw + p0 + q] = relu && s < 0.f ? 0.f : s;
    }
  }
}

/* NAME(A, z, bias, res, out, d, hw, p0, p1, relu): columns [p0, p1) of one
   block in tiles of 4 rows x 2 vectors of type V (L lanes), then the
   columns past the last whole tile by TAIL (same arguments). The two tiles
   below do the same operations per element in the same order. */
#define DEFINE_MAP_COLUMNS(NAME, ATTR, V, L, SPLATV, RELUV, TAIL)            \
  ATTR static void NAME(const float *A, const float *z, const float *bias,   \
                        const float *res, float *out, int64_t d, int64_t hw, \
                        int64_t p0, int64_t p1, int relu) {                  \
    float zt[MAX_D * 2 * L] __attribute__((aligned(64)));                    \
    int64_t p = p0;                                                          \
    for (; p + 2 * L <= p1; p += 2 * L) {                                    \
      for (int64_t j = 0; j < d; j++) { /* the tile of z first */            \
        *(V *)(zt + j * 2 * L) = *(const V *)(z + j * hw + p);               \
        *(V *)(zt + j * 2 * L + L) = *(const V *)(z + j * hw + p + L);       \
      }                                                                      \
      for (int64_t i = 0; i < d; i += 4) {                                   \
        V c[4][2];                                                           \
        for (int k = 0; k < 4; k++) c[k][0] = c[k][1] = SPLATV(0.f);         \
        for (int64_t j = 0; j < d; j++) {                                    \
          V z0 = *(V *)(zt + j * 2 * L), z1 = *(V *)(zt + j * 2 * L + L);    \
          for (int k = 0; k < 4; k++) {                                      \
            V a = SPLATV(A[(i + k) * d + j]);                                \
            c[k][0] += a * z0;                                               \
            c[k][1] += a * z1;                                               \
          }                                                                  \
        }                                                                    \
        for (int k = 0; k < 4; k++) {                                        \
          int64_t row = (i + k) * hw + p;                                    \
          V b = SPLATV(bias ? bias[i + k] : 0.f), s0 = b, s1 = b;            \
          if (res) {                                                         \
            s0 = *(const V *)(res + row) + b;                                \
            s1 = *(const V *)(res + row + L) + b;                            \
          }                                                                  \
          s0 += c[k][0];                                                     \
          s1 += c[k][1];                                                     \
          if (relu) {                                                        \
            s0 = RELUV(s0);                                                  \
            s1 = RELUV(s1);                                                  \
          }                                                                  \
          *(V *)(out + row) = s0;                                            \
          *(V *)(out + row + L) = s1;                                        \
        }                                                                    \
      }                                                                      \
    }                                                                        \
    if (p < p1) TAIL(A, z, bias, res, out, d, hw, p, p1, relu);              \
  }

/* AVX2: 4 rows x 16 columns */
DEFINE_MAP_COLUMNS(map_columns, , v8, 8, SPLAT, RELU8, map_tail)
/* AVX-512: 4 rows x 32 columns, the rest by the AVX2 tile; called only
   where the CPU has AVX-512F */
DEFINE_MAP_COLUMNS(map_columns_wide, __attribute__((target("avx512f"))), v16,
                   16, SPLAT16, RELU16, map_columns)

/* Returns 0; 1 for a d it does not take (a multiple of 4 up to 64), 2 for
   wide on a CPU without AVX-512F. */
int ce_map(const float *A, const float *z, const float *bias, const float *res,
           float *out, int64_t blocks, int64_t d, int64_t hw, int relu,
           int threads, int wide) {
  if (d < 4 || d > MAX_D || d % 4) return 1;
  if (wide && !__builtin_cpu_supports("avx512f")) return 2;
  /* tasks: column ranges of blocks, about four per thread where blocks are
     few (the stem of one image is one block), whole wide tiles each */
  int64_t per = 1;
  if (blocks < 4 * (int64_t)threads)
    per = (4 * (int64_t)threads + blocks - 1) / blocks;
  int64_t width = (hw + per - 1) / per;
  width = (width + WIDE_COLS - 1) / WIDE_COLS * WIDE_COLS;
  if (width < 256) width = 256;
  int64_t chunks = (hw + width - 1) / width;
  int64_t tasks = blocks * chunks;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tasks; t++) {
    int64_t b = t / chunks, p0 = (t % chunks) * width;
    int64_t p1 = p0 + width < hw ? p0 + width : hw;
    (wide ? map_columns_wide : map_columns)(
        A + b * d * d, z + b * d * hw, bias ? bias + b * d : 0,
        res ? res + b * d * hw : 0, out + b * d * hw, d, hw, p0, p1, relu);
  }
  return 0;
}

void ce_moments(const float *x, float *mean, float *var, int64_t rows,
                int64_t hw, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; r++) {
    const float *v = x + r * hw;
    double s = 0, q = 0;
    int64_t p = 0;
    while (p + COLS <= hw) {
      v8 s0 = SPLAT(0.f), s1 = SPLAT(0.f), q0 = SPLAT(0.f), q1 = SPLAT(0.f);
      int64_t e = p + 1024 < hw ? p + 1024 : hw;
      for (; p + COLS <= e; p += COLS) {
        v8 a = LD(v + p), b = LD(v + p + 8);
        s0 += a;
        s1 += b;
        q0 += a * a;
        q1 += b * b;
      }
      v8 ss = s0 + s1, qq = q0 + q1;
      for (int k = 0; k < 8; k++) {
        s += ss[k];
        q += qq[k];
      }
    }
    for (; p < hw; p++) {
      s += v[p];
      q += (double)v[p] * v[p];
    }
    double m = s / (double)hw;
    double u = (q - s * m) / (double)(hw > 1 ? hw - 1 : 1);
    mean[r] = (float)m;
    var[r] = u > 0 ? (float)u : 0.f;
  }
}

/* sum of a[i] b[i], i < k: float32 lanes, then across them */
static float dot(const float *a, const float *b, int64_t k) {
  v8 s0 = SPLAT(0.f), s1 = SPLAT(0.f);
  int64_t i = 0;
  for (; i + COLS <= k; i += COLS) {
    s0 += LD(a + i) * LD(b + i);
    s1 += LD(a + i + 8) * LD(b + i + 8);
  }
  v8 s = s0 + s1;
  float t = 0.f;
  for (int l = 0; l < 8; l++) t += s[l];
  for (; i < k; i++) t += a[i] * b[i];
  return t;
}

/* out[s, r] = w[r] . v[s] for the rows r of w (rows, k) and the samples s
   of v (n, k): a GEMV per sample, the rows spread over the threads where
   the weight is large enough to pay for them */
static void gemv_rows(const float *w, const float *v, float *out, int64_t n,
                      int64_t rows, int64_t k, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) \
    if (rows * k >= 32768)
  for (int64_t r = 0; r < rows; r++)
    for (int64_t s = 0; s < n; s++)
      out[s * rows + r] = dot(w + r * k, v + s * k, k);
}

/* The small graph of one CE layer in eval (ce_mmdet.ops.small_graph.forward
   with the running state), for n samples, from the per-sample channel
   variances v (n, c) of its input z. Where an eval-mode BN precedes CE
   (bn_var non-null; bn_w and bn_b may be null) X = alpha z + beta with
   alpha = bn_w / sqrt(bn_var + bn_eps), beta = bn_b - bn_mean alpha, and
     v_X = v alpha^2, h = fc1 v_X, p = relu(LayerNorm(h)), y = sigmoid(fc2 p),
     A = lam W + diag((1 - lam) y / max(s, eps)), lam = sigmoid(gate),
     a_in = A diag(alpha), bias = A beta      (A X = a_in z + bias);
   without a BN a_in = A and bias is not written. The LayerNorm's moments
   are summed in double. Returns 0, or 1 where the work space could not be
   allocated. */
int ce_eval_small(const float *v, const float *bn_w, const float *bn_b,
                  const float *bn_mean, const float *bn_var, float bn_eps,
                  const float *gate, const float *fc1, const float *ln_w,
                  const float *ln_b, const float *fc2, const float *wm,
                  const float *scale, float eps, int64_t n, int64_t c,
                  int64_t hid, int64_t d, float *a_in, float *bias,
                  int threads) {
  int64_t g = c / d;
  /* alpha, beta (c each), v_X (n, c), h (n, hid), fc2 p (n, c) */
  float *alpha = malloc(sizeof(float) * (size_t)(2 * c + 2 * n * c + n * hid));
  if (!alpha) return 1;
  float *beta = alpha + c, *vx = beta + c, *h = vx + n * c, *y = h + n * hid;
  for (int64_t i = 0; i < c; i++) {
    if (bn_var) {
      float inv = 1.f / sqrtf(bn_var[i] + bn_eps);
      alpha[i] = bn_w ? inv * bn_w[i] : inv;
      beta[i] = (bn_b ? bn_b[i] : 0.f) - bn_mean[i] * alpha[i];
    } else {
      alpha[i] = 1.f;
      beta[i] = 0.f;
    }
  }
  for (int64_t s = 0; s < n; s++)
    for (int64_t i = 0; i < c; i++)
      vx[s * c + i] =
          bn_var ? v[s * c + i] * alpha[i] * alpha[i] : v[s * c + i];
  gemv_rows(fc1, vx, h, n, hid, c, threads);
  for (int64_t s = 0; s < n; s++) { /* LayerNorm (biased variance), ReLU */
    float *hs = h + s * hid;
    double m = 0, q = 0;
    for (int64_t j = 0; j < hid; j++) m += hs[j];
    m /= (double)hid;
    for (int64_t j = 0; j < hid; j++)
      q += ((double)hs[j] - m) * ((double)hs[j] - m);
    float mean = (float)m, rstd = 1.f / sqrtf((float)(q / (double)hid) + eps);
    for (int64_t j = 0; j < hid; j++) {
      float t = (hs[j] - mean) * rstd * ln_w[j] + ln_b[j];
      hs[j] = t > 0.f ? t : 0.f;
    }
  }
  gemv_rows(fc2, h, y, n, c, hid, threads);
  float lam = 1.f / (1.f + expf(-gate[0]));
  float floor_s = scale[0] > eps ? scale[0] : eps;
  float k = (1.f - lam) / floor_s;
  for (int64_t s = 0; s < n; s++)
    for (int64_t gi = 0; gi < g; gi++) {
      const float *w = wm + gi * d * d, *al = alpha + gi * d;
      const float *be = beta + gi * d;
      const float *ys = y + s * c + gi * d;
      float *ao = a_in + (s * g + gi) * d * d;
      for (int64_t i = 0; i < d; i++) {
        float acc = 0.f;
        for (int64_t j = 0; j < d; j++) {
          float aij = lam * w[i * d + j];
          if (i == j) aij += k * (1.f / (1.f + expf(-ys[i])));
          ao[i * d + j] = aij * al[j];
          acc += aij * be[j];
        }
        if (bias) bias[(s * g + gi) * d + i] = acc;
      }
    }
  free(alpha);
  return 0;
}
