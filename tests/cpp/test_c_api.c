/* The C ABI from plain C, through lora_ops.h alone: every CPU entry point against naive double
 * loops (fp32, plus a bf16 run through the same ABI), a caller-supplied GEMM, the status
 * strings, the CUDA entry points of a build without CUDA, and invalid-argument returns. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora_ops/lora_ops.h"

static int failures = 0;
static int checks = 0;

static void expect(int ok, const char* what) {
  ++checks;
  if (!ok) {
    ++failures;
    fprintf(stderr, "FAIL: %s\n", what);
  }
}

static void expect_status(lora_status_t got, lora_status_t want, const char* what) {
  ++checks;
  if (got != want) {
    ++failures;
    fprintf(stderr, "FAIL: %s: %s (expected %s)\n", what, lora_ops_status_string(got),
            lora_ops_status_string(want));
  }
}

/* Multiples of 1/64 in [-1.5, 1.5]: exact in fp32 and bf16. */
static unsigned rng_state = 12345u;
static float random_value(void) {
  rng_state = rng_state * 1103515245u + 12345u;
  return (float)((int)((rng_state >> 16) % 193u) - 96) / 64.0f;
}

static float* random_floats(size_t n) {
  float* p = (float*)malloc((n ? n : 1) * sizeof(float));
  size_t i;
  for (i = 0; i < n; ++i) p[i] = random_value();
  return p;
}

/* |got - want| <= tol * mag for all n elements. */
static int all_close(const float* got, const double* want, const double* mag, size_t n,
                     double tol) {
  size_t i;
  for (i = 0; i < n; ++i) {
    if (!(fabs(got[i] - want[i]) <= tol * mag[i] + 1e-30)) {
      fprintf(stderr, "  [%zu] got %.9g want %.9g\n", i, got[i], want[i]);
      return 0;
    }
  }
  return 1;
}

static const double kTol = 1e-4; /* fp32 storage, depth < 200 */

/* (dY W)[i][k] into *v and its magnitude sum into *va (dy [.., n_out], w [n_out, k_in]). */
static void add_dy_w(const float* dy, const float* w, int i, int k, int n_out, int k_in, double* v,
                     double* va) {
  int n;
  for (n = 0; n < n_out; ++n) {
    *v += (double)dy[i * n_out + n] * w[n * k_in + k];
    *va += fabs((double)dy[i * n_out + n] * w[n * k_in + k]);
  }
}
static const lora_dropout_t kNoDropout = {0u, 0u, 1.0f, NULL};

/* A caller-supplied GEMM: naive loops, counting its calls. */
static int user_gemm_calls = 0;
static void user_gemm(void* ctx, lora_dtype_t dtype, int b_is_nk, int64_t m, int64_t n, int64_t k,
                      const void* a, int64_t lda, const void* b, int64_t ldb, float beta, void* c,
                      int64_t ldc) {
  const float* af = (const float*)a;
  const float* bf = (const float*)b;
  float* cf = (float*)c;
  int64_t i, j, p;
  (void)ctx;
  ++user_gemm_calls;
  if (dtype != LORA_DTYPE_F32) return;
  for (i = 0; i < m; ++i) {
    for (j = 0; j < n; ++j) {
      float s = 0.0f;
      for (p = 0; p < k; ++p) s += af[i * lda + p] * (b_is_nk ? bf[j * ldb + p] : bf[p * ldb + j]);
      cf[i * ldc + j] = s + (beta == 0.0f ? 0.0f : beta * cf[i * ldc + j]);
    }
  }
}

static void test_meta(void) {
  char want[32];
  snprintf(want, sizeof want, "%d.%d.%d", LORA_OPS_VERSION_MAJOR, LORA_OPS_VERSION_MINOR,
           LORA_OPS_VERSION_PATCH);
  expect(strcmp(lora_ops_version(), want) == 0, "lora_ops_version matches the header");
  expect(strcmp(lora_ops_status_string(LORA_OK), "ok") == 0, "status string of LORA_OK");
  expect(strcmp(lora_ops_status_string(LORA_ERR_INVALID_ARGUMENT),
                lora_ops_status_string(LORA_ERR_UNSUPPORTED)) != 0,
         "status strings are distinct");
  expect(strcmp(lora_ops_status_string((lora_status_t)99), "unknown status") == 0,
         "status string of an unknown code");
  expect(strcmp(lora_ops_status_string((lora_status_t)-5), "unknown status") == 0,
         "status string of a negative code");
  /* The range enumerators make both enums int32 wide, so every code a caller passes is a value. */
  expect(sizeof(lora_dtype_t) == 4 && sizeof(lora_status_t) == 4, "the enums are 4 bytes");
}

/* The CUDA kernels themselves are tested by test_cuda_kernels on a GPU; here, what holds on any
 * machine: a build without CUDA refuses, a build with it rejects bad host-side arguments
 * before touching a device. */
static void test_cuda_entry_points(void) {
  lora_status_t st;
  const lora_adapter_index_t no_index = {NULL, NULL, NULL, 0};
  if (!lora_ops_has_cuda()) {
    expect(lora_ops_cuda_lora_linear_fwd_workspace_bytes(LORA_DTYPE_F32, 4, 4, 4, 2) == 0,
           "no CUDA: workspace bytes 0");
    st = lora_ops_cuda_lora_linear_fwd(LORA_DTYPE_F32, 1, 1, 1, 1, NULL, 1, NULL, NULL, NULL, NULL,
                                       1.0f, kNoDropout, NULL, NULL, NULL, NULL, NULL, 0);
    expect_status(st, LORA_ERR_UNSUPPORTED, "no CUDA: lora_ops_cuda_lora_linear_fwd");
    return;
  }
  st = lora_ops_cuda_multi_lora_shrink(LORA_DTYPE_F32, 0, 4, 1, 2, 0, NULL, 4, NULL, NULL, NULL,
                                       no_index, NULL, NULL);
  expect_status(st, LORA_ERR_INVALID_ARGUMENT, "CUDA shrink with 0 slices");
  st = lora_ops_cuda_multi_lora_expand(LORA_DTYPE_F32, 0, 1, 2, 1, NULL, NULL, NULL, NULL, NULL,
                                       no_index, NULL, 4, NULL);
  expect_status(st, LORA_ERR_INVALID_ARGUMENT, "CUDA expand with NULL stacks");
}

/* Forward and backward of one adapter, fp32, with bias, against the closed form. */
static void test_linear(const lora_cpu_gemm_t* gemm, const char* name) {
  enum { M = 9, N = 11, K = 23, R = 5 };
  const int64_t ldx = K + 2;
  const float scaling = 0.5f;
  float* x = random_floats(M * ldx);
  float* w = random_floats(N * K);
  float* bias = random_floats(N);
  float* a = random_floats(R * K);
  float* b = random_floats(N * R);
  float* dy = random_floats(M * N);
  float s[M * R], y[M * N], dx[M * K], da[R * K], db[N * R];
  double s_ref[M * R], s_mag[M * R], y_ref[M * N], y_mag[M * N], ds[M * R], ds_mag[M * R];
  double dx_ref[M * K], dx_mag[M * K], da_ref[R * K], da_mag[R * K], db_ref[N * R], db_mag[N * R];
  int i, j, k, n;
  char what[128];

  for (i = 0; i < M; ++i) {
    for (j = 0; j < R; ++j) {
      double v = 0, va = 0;
      for (k = 0; k < K; ++k) {
        v += (double)x[i * ldx + k] * a[j * K + k];
        va += fabs((double)x[i * ldx + k] * a[j * K + k]);
      }
      s_ref[i * R + j] = v;
      s_mag[i * R + j] = va;
    }
    for (n = 0; n < N; ++n) {
      double v = bias[n], va = fabs(bias[n]);
      for (k = 0; k < K; ++k) {
        v += (double)x[i * ldx + k] * w[n * K + k];
        va += fabs((double)x[i * ldx + k] * w[n * K + k]);
      }
      for (j = 0; j < R; ++j) {
        v += scaling * s_ref[i * R + j] * b[n * R + j];
        va += fabs(scaling * b[n * R + j]) * s_mag[i * R + j];
      }
      y_ref[i * N + n] = v;
      y_mag[i * N + n] = va;
    }
  }
  snprintf(what, sizeof what, "cpu_lora_linear_fwd (%s)", name);
  expect_status(lora_ops_cpu_lora_linear_fwd(LORA_DTYPE_F32, M, N, K, R, x, ldx, w, bias, a, b,
                                             scaling, kNoDropout, s, y, gemm),
                LORA_OK, what);
  expect(all_close(s, s_ref, s_mag, M * R, kTol), what);
  expect(all_close(y, y_ref, y_mag, M * N, kTol), what);

  for (i = 0; i < M; ++i) {
    for (j = 0; j < R; ++j) {
      double v = 0, va = 0;
      for (n = 0; n < N; ++n) {
        v += (double)dy[i * N + n] * b[n * R + j];
        va += fabs((double)dy[i * N + n] * b[n * R + j]);
      }
      ds[i * R + j] = scaling * v;
      ds_mag[i * R + j] = scaling * va;
    }
    for (k = 0; k < K; ++k) {
      double v = 0, va = 0;
      add_dy_w(dy, w, i, k, N, K, &v, &va);
      for (j = 0; j < R; ++j) {
        v += ds[i * R + j] * a[j * K + k];
        va += ds_mag[i * R + j] * fabs(a[j * K + k]);
      }
      dx_ref[i * K + k] = v;
      dx_mag[i * K + k] = va;
    }
  }
  for (j = 0; j < R; ++j) {
    for (k = 0; k < K; ++k) {
      double v = 0, va = 0;
      for (i = 0; i < M; ++i) {
        v += ds[i * R + j] * x[i * ldx + k];
        va += ds_mag[i * R + j] * fabs(x[i * ldx + k]);
      }
      da_ref[j * K + k] = v;
      da_mag[j * K + k] = va;
    }
  }
  for (n = 0; n < N; ++n) {
    for (j = 0; j < R; ++j) {
      double v = 0, va = 0;
      for (i = 0; i < M; ++i) {
        v += (double)dy[i * N + n] * s[i * R + j];
        va += fabs((double)dy[i * N + n] * s[i * R + j]);
      }
      db_ref[n * R + j] = scaling * v;
      db_mag[n * R + j] = scaling * va;
    }
  }
  snprintf(what, sizeof what, "cpu_lora_linear_bwd (%s)", name);
  expect_status(lora_ops_cpu_lora_linear_bwd(LORA_DTYPE_F32, M, N, K, R, dy, x, ldx, w, a, b, s,
                                             scaling, kNoDropout, dx, da, db, gemm),
                LORA_OK, what);
  expect(all_close(dx, dx_ref, dx_mag, M * K, kTol), what);
  expect(all_close(da, da_ref, da_mag, R * K, kTol), what);
  expect(all_close(db, db_ref, db_mag, N * R, kTol), what);

  /* p = 1 (threshold 2^24) drops every element: S = 0, y is the base layer alone. */
  {
    lora_dropout_t all_dropped;
    all_dropped.seed32 = 7u;
    all_dropped.threshold = 1u << 24;
    all_dropped.keep_scale = INFINITY; /* 1/(1-p): never applied, nothing is kept */
    all_dropped.seed_ptr = NULL;
    for (i = 0; i < M; ++i) {
      for (n = 0; n < N; ++n) {
        double v = bias[n];
        for (k = 0; k < K; ++k) v += (double)x[i * ldx + k] * w[n * K + k];
        y_ref[i * N + n] = v;
      }
    }
    for (i = 0; i < M * R; ++i) s_ref[i] = 0.0;
    snprintf(what, sizeof what, "cpu_lora_linear_fwd, every element dropped (%s)", name);
    expect_status(lora_ops_cpu_lora_linear_fwd(LORA_DTYPE_F32, M, N, K, R, x, ldx, w, bias, a, b,
                                               scaling, all_dropped, s, y, gemm),
                  LORA_OK, what);
    expect(all_close(s, s_ref, s_mag, M * R, 0.0), what);
    expect(all_close(y, y_ref, y_mag, M * N, kTol), what);
  }
  free(x);
  free(w);
  free(bias);
  free(a);
  free(b);
  free(dy);
}

/* bf16 through the ABI: values exact in bf16, encoded by truncating their fp32 bits. */
static void test_linear_bf16(void) {
  enum { M = 3, N = 4, K = 5, R = 2 };
  uint16_t x[M * K], w[N * K], a[R * K], b[N * R], s[M * R], y[M * N];
  float xf[M * K], wf[N * K], af[R * K], bf[N * R];
  int i, j, k, n, ok = 1;
#define ENCODE(dst, src, count)     \
  for (i = 0; i < (count); ++i) {   \
    uint32_t u;                     \
    (src)[i] = random_value();      \
    memcpy(&u, &(src)[i], 4);       \
    (dst)[i] = (uint16_t)(u >> 16); \
  }
  ENCODE(x, xf, M * K)
  ENCODE(w, wf, N * K)
  ENCODE(a, af, R * K)
  ENCODE(b, bf, N * R)
#undef ENCODE
  expect_status(lora_ops_cpu_lora_linear_fwd(LORA_DTYPE_BF16, M, N, K, R, x, K, w, NULL, a, b, 1.0f,
                                             kNoDropout, s, y, NULL),
                LORA_OK, "cpu_lora_linear_fwd bf16");
  for (i = 0; i < M; ++i) {
    for (n = 0; n < N; ++n) {
      double want = 0, mag = 0, got;
      uint32_t u;
      float f;
      for (k = 0; k < K; ++k) {
        want += (double)xf[i * K + k] * wf[n * K + k];
        mag += fabs((double)xf[i * K + k] * wf[n * K + k]);
      }
      for (j = 0; j < R; ++j) {
        double sv = 0, sa = 0;
        for (k = 0; k < K; ++k) {
          sv += (double)xf[i * K + k] * af[j * K + k];
          sa += fabs((double)xf[i * K + k] * af[j * K + k]);
        }
        want += sv * bf[n * R + j];
        mag += sa * fabs(bf[n * R + j]);
      }
      u = (uint32_t)y[i * N + n] << 16;
      memcpy(&f, &u, 4);
      got = f;
      ok &= fabs(got - want) <= 0.02 * mag + 1e-30;
    }
  }
  expect(ok, "cpu_lora_linear_fwd bf16 matches");
}

enum { kMultiM = 6, kMultiK = 7, kMultiL = 2, kMultiRMax = 3, kMultiS = 2, kMultiN = 5 };

/* The multi-adapter backward of test_multi's layer through the C ABI, against double loops:
 * dT_s by a shrink of dY's slice s over B_s viewed as [L, r_max, N_s], dx by linear_dx, dA_s and
 * dB_s by adapter_grad (t: the forward's t_workspace). Each step is checked from the kernel
 * outputs of the step before. */
static void test_multi_backward(const float* x, const float* w, float* const* a, float* const* b,
                                const lora_adapter_stack_t* as, const float* t,
                                const int64_t* widths, const int64_t* offsets,
                                const int32_t* ranks, const float* scalings,
                                const int32_t* tokens, lora_adapter_index_t index) {
  enum { M = kMultiM, K = kMultiK, L = kMultiL, RMAX = kMultiRMax, S = kMultiS, N = kMultiN };
  float* dy = random_floats(M * N);
  float dt[S * M * RMAX], dx[M * K], da[L * RMAX * K], db[L * N * RMAX];
  double ref[M * K + L * RMAX * K + L * N * RMAX], mag[M * K + L * RMAX * K + L * N * RMAX];
  lora_adapter_stack_t bt[S];
  int s, i, j, k, n, ad;
  const int64_t P = RMAX;

  for (s = 0; s < S; ++s) {
    bt[s].data = b[s];
    bt[s].stride_l = widths[s] * RMAX;
    bt[s].stride_row = 1; /* row j of the view: column j of B_s[a] */
    bt[s].stride_col = RMAX;
    expect_status(lora_ops_cpu_multi_lora_shrink(LORA_DTYPE_F32, M, widths[s], L, RMAX, 1,
                                                 dy + offsets[s], N, &bt[s], scalings, ranks,
                                                 index, dt + s * M * RMAX),
                  LORA_OK, "multi-adapter bwd: dT by a shrink over B^T");
    for (i = 0; i < M; ++i) {
      ad = tokens[i] >= 0 && tokens[i] < L ? tokens[i] : -1;
      for (j = 0; j < RMAX; ++j) {
        double v = 0, va = 0;
        for (n = 0; ad >= 0 && j < ranks[ad] && n < widths[s]; ++n) {
          const double p = (double)dy[i * N + offsets[s] + n] * b[s][(ad * widths[s] + n) * RMAX + j];
          v += p * scalings[ad];
          va += fabs(p * scalings[ad]);
        }
        ref[i * RMAX + j] = v;
        mag[i * RMAX + j] = va;
      }
    }
    expect(all_close(dt + s * M * RMAX, ref, mag, M * RMAX, kTol), "multi-adapter bwd: dT matches");
  }

  expect_status(lora_ops_cpu_multi_lora_linear_dx(LORA_DTYPE_F32, M, N, K, L, RMAX, S, dy, w, as,
                                                  dt, ranks, index, dx, NULL),
                LORA_OK, "multi-adapter bwd: dx");
  for (i = 0; i < M; ++i) {
    ad = tokens[i] >= 0 && tokens[i] < L ? tokens[i] : -1;
    for (k = 0; k < K; ++k) {
      double v = 0, va = 0;
      add_dy_w(dy, w, i, k, N, K, &v, &va);
      for (s = 0; s < S; ++s) {
        for (j = 0; ad >= 0 && j < ranks[ad]; ++j) {
          const double p = (double)dt[(s * M + i) * RMAX + j] * a[s][(ad * RMAX + j) * K + k];
          v += p;
          va += fabs(p);
        }
      }
      ref[i * K + k] = v;
      mag[i * K + k] = va;
    }
  }
  expect(all_close(dx, ref, mag, M * K, kTol), "multi-adapter bwd: dx matches");

  for (s = 0; s < S; ++s) {
    const int64_t width = widths[s];
    /* dA_s[a][j][k] = sum over a's rows of dT_s[i][j] x[i][k], j < rank. */
    expect_status(lora_ops_cpu_multi_lora_adapter_grad(LORA_DTYPE_F32, LORA_DTYPE_F32, M, P, K, L,
                                                       dt + s * M * RMAX, RMAX, x, K, ranks, 1,
                                                       index, LORA_DTYPE_F32, da),
                  LORA_OK, "multi-adapter bwd: dA");
    /* dB_s[a][n][j] = sum over a's rows of dY[i][off + n] t_s[i][j], j < rank. */
    expect_status(lora_ops_cpu_multi_lora_adapter_grad(LORA_DTYPE_F32, LORA_DTYPE_F32, M, width,
                                                       RMAX, L, dy + offsets[s], N,
                                                       t + s * M * RMAX, RMAX, ranks, 2, index,
                                                       LORA_DTYPE_F32, db),
                  LORA_OK, "multi-adapter bwd: dB");
    for (i = 0; i < L * RMAX * K + L * width * RMAX; ++i) ref[i] = mag[i] = 0;
    for (i = 0; i < M; ++i) {
      ad = tokens[i] >= 0 && tokens[i] < L ? tokens[i] : -1;
      for (j = 0; ad >= 0 && j < ranks[ad]; ++j) {
        for (k = 0; k < K; ++k) {
          const double p = (double)dt[(s * M + i) * RMAX + j] * x[i * K + k];
          ref[(ad * RMAX + j) * K + k] += p;
          mag[(ad * RMAX + j) * K + k] += fabs(p);
        }
        for (n = 0; n < width; ++n) {
          const double p = (double)dy[i * N + offsets[s] + n] * t[(s * M + i) * RMAX + j];
          ref[L * RMAX * K + (ad * width + n) * RMAX + j] += p;
          mag[L * RMAX * K + (ad * width + n) * RMAX + j] += fabs(p);
        }
      }
    }
    expect(all_close(da, ref, mag, L * RMAX * K, kTol), "multi-adapter bwd: dA matches");
    expect(all_close(db, ref + L * RMAX * K, mag + L * RMAX * K, L * width * RMAX, kTol),
           "multi-adapter bwd: dB matches");
  }
  expect_status(lora_ops_cpu_multi_lora_adapter_grad(LORA_DTYPE_F16, LORA_DTYPE_BF16, M, P, K, L,
                                                     dt, RMAX, x, K, ranks, 1, index,
                                                     LORA_DTYPE_F32, da),
                LORA_ERR_UNSUPPORTED, "adapter_grad with neither operand fp32");
  expect_status(lora_ops_cpu_multi_lora_linear_dx(LORA_DTYPE_F32, M, N, K, L, RMAX, S, dy, w, NULL,
                                                  dt, ranks, index, dx, NULL),
                LORA_ERR_INVALID_ARGUMENT, "linear_dx with NULL stacks");
  free(dy);
}

/* Multi-adapter: token and segment index forms, -1 rows, two slices. */
static void test_multi(void) {
  enum { M = kMultiM, K = kMultiK, L = kMultiL, RMAX = kMultiRMax, S = kMultiS, N = kMultiN };
  const int64_t widths[S] = {3, 2}, offsets[S] = {0, 3};
  const int32_t ranks[L] = {3, 2};
  const float scalings[L] = {0.5f, 2.0f};
  const int32_t tokens[M] = {1, 1, -1, 0, 0, 7};
  const int32_t seg_indptr[5] = {0, 2, 3, 5, 6}, seg_adapter[4] = {1, -1, 0, 7};
  float* x = random_floats(M * K);
  float* a[S];
  float* b[S];
  float* w = random_floats(N * K);
  float* bias = random_floats(N);
  float t[S * M * RMAX], y[M * N];
  double t_ref[S * M * RMAX], t_mag[S * M * RMAX], y_ref[M * N], y_mag[M * N];
  lora_adapter_stack_t as[S], bs[S];
  lora_adapter_index_t by_token, by_seg;
  int s, i, j, k, n, form;

  for (s = 0; s < S; ++s) {
    a[s] = random_floats(L * RMAX * K);
    b[s] = random_floats(L * widths[s] * RMAX);
    for (k = 0; k < K; ++k) a[s][(1 * RMAX + 2) * K + k] = NAN; /* adapter 1 past its rank */
    for (n = 0; n < widths[s]; ++n) b[s][(1 * widths[s] + n) * RMAX + 2] = NAN;
    as[s].data = a[s];
    as[s].stride_l = RMAX * K;
    as[s].stride_row = K;
    as[s].stride_col = 1;
    bs[s].data = b[s];
    bs[s].stride_l = widths[s] * RMAX;
    bs[s].stride_row = RMAX;
    bs[s].stride_col = 1;
  }
  for (s = 0; s < S; ++s) {
    for (i = 0; i < M; ++i) {
      const int ad = tokens[i] >= 0 && tokens[i] < L ? tokens[i] : -1;
      for (j = 0; j < RMAX; ++j) {
        double v = 0, va = 0;
        if (ad >= 0 && j < ranks[ad]) {
          for (k = 0; k < K; ++k) {
            v += (double)x[i * K + k] * a[s][(ad * RMAX + j) * K + k];
            va += fabs((double)x[i * K + k] * a[s][(ad * RMAX + j) * K + k]);
          }
          v *= scalings[ad];
          va *= scalings[ad];
        }
        t_ref[(s * M + i) * RMAX + j] = v;
        t_mag[(s * M + i) * RMAX + j] = va;
      }
    }
  }
  for (i = 0; i < M; ++i) {
    const int ad = tokens[i] >= 0 && tokens[i] < L ? tokens[i] : -1;
    for (s = 0; s < S; ++s) {
      for (n = 0; n < widths[s]; ++n) {
        const int col = (int)offsets[s] + n;
        double v = bias[col], va = fabs(bias[col]);
        for (k = 0; k < K; ++k) {
          v += (double)x[i * K + k] * w[col * K + k];
          va += fabs((double)x[i * K + k] * w[col * K + k]);
        }
        if (ad >= 0) {
          for (j = 0; j < ranks[ad]; ++j) {
            v += t_ref[(s * M + i) * RMAX + j] * b[s][(ad * widths[s] + n) * RMAX + j];
            va += t_mag[(s * M + i) * RMAX + j] * fabs(b[s][(ad * widths[s] + n) * RMAX + j]);
          }
        }
        y_ref[i * N + col] = v;
        y_mag[i * N + col] = va;
      }
    }
  }
  by_token.token_adapter = tokens;
  by_token.seg_indptr = NULL;
  by_token.seg_adapter = NULL;
  by_token.num_segments = 0;
  by_seg.token_adapter = NULL;
  by_seg.seg_indptr = seg_indptr;
  by_seg.seg_adapter = seg_adapter;
  by_seg.num_segments = 4;

  for (form = 0; form < 2; ++form) {
    const lora_adapter_index_t index = form ? by_seg : by_token;
    const char* what = form ? "multi-adapter, segments" : "multi-adapter, tokens";
    expect_status(lora_ops_cpu_multi_lora_shrink(LORA_DTYPE_F32, M, K, L, RMAX, S, x, K, as,
                                                 scalings, ranks, index, t),
                  LORA_OK, what);
    expect(all_close(t, t_ref, t_mag, S * M * RMAX, kTol), "shrink matches");

    for (i = 0; i < M * N; ++i) y[i] = 0.0f;
    expect_status(lora_ops_cpu_multi_lora_expand(LORA_DTYPE_F32, M, L, RMAX, S, t, bs, offsets,
                                                 widths, ranks, index, y, N),
                  LORA_OK, what);
    for (i = 0; i < M; ++i) {
      for (n = 0; n < N; ++n) {
        double base = bias[n];
        for (k = 0; k < K; ++k) base += (double)x[i * K + k] * w[n * K + k];
        y[i * N + n] += (float)base; /* expand + base = the fused layer */
      }
    }
    expect(all_close(y, y_ref, y_mag, M * N, kTol), "expand matches");

    expect_status(
        lora_ops_cpu_multi_lora_linear_fwd(LORA_DTYPE_F32, M, N, K, L, RMAX, S, x, K, w, bias, as,
                                           bs, offsets, widths, scalings, ranks, index, t, y, NULL),
        LORA_OK, what);
    expect(all_close(y, y_ref, y_mag, M * N, kTol), "linear_fwd matches");
  }

  user_gemm_calls = 0;
  {
    const lora_cpu_gemm_t gemm = {user_gemm, NULL};
    expect_status(lora_ops_cpu_multi_lora_linear_fwd(LORA_DTYPE_F32, M, N, K, L, RMAX, S, x, K, w,
                                                     bias, as, bs, offsets, widths, scalings, ranks,
                                                     by_token, t, y, &gemm),
                  LORA_OK, "multi-adapter linear_fwd, user GEMM");
    expect(user_gemm_calls == 1 && all_close(y, y_ref, y_mag, M * N, kTol),
           "multi-adapter linear_fwd runs its base GEMM through the user GEMM");
  }

  test_multi_backward(x, w, a, b, as, t, widths, offsets, ranks, scalings, tokens, by_token);

  expect_status(lora_ops_cpu_multi_lora_shrink(LORA_DTYPE_F32, M, K, L, RMAX, 0, x, K, as, scalings,
                                               ranks, by_token, t),
                LORA_ERR_INVALID_ARGUMENT, "shrink with 0 slices");
  expect_status(lora_ops_cpu_multi_lora_shrink(LORA_DTYPE_F32, M, K, L, RMAX, LORA_MAX_SLICES + 1,
                                               x, K, as, scalings, ranks, by_token, t),
                LORA_ERR_UNSUPPORTED, "shrink with too many slices");
  expect_status(lora_ops_cpu_multi_lora_shrink(LORA_DTYPE_F32, M, K, L, RMAX, S, x, K, NULL,
                                               scalings, ranks, by_token, t),
                LORA_ERR_INVALID_ARGUMENT, "shrink with NULL stacks");
  expect_status(lora_ops_cpu_multi_lora_expand(LORA_DTYPE_F32, M, L, RMAX, S, t, bs, offsets,
                                               widths, ranks, by_token, NULL, N),
                LORA_ERR_INVALID_ARGUMENT, "expand with NULL y");

  for (s = 0; s < S; ++s) {
    free(a[s]);
    free(b[s]);
  }
  free(x);
  free(w);
  free(bias);
}

/* Every output of one forward and backward with dropout p = 1/2 and this descriptor. */
enum { SEED_M = 5, SEED_N = 6, SEED_K = 9, SEED_R = 3, SEED_OUTPUTS = 5 };
typedef struct seeded_outputs {
  float s[SEED_M * SEED_R], y[SEED_M * SEED_N];
  float dx[SEED_M * SEED_K], da[SEED_R * SEED_K], db[SEED_N * SEED_R];
} seeded_outputs_t;

static void run_seeded(lora_dropout_t dropout, seeded_outputs_t* out) {
  static float x[SEED_M * SEED_K], w[SEED_N * SEED_K], a[SEED_R * SEED_K], b[SEED_N * SEED_R];
  static float dy[SEED_M * SEED_N];
  static int drawn = 0;
  int i;
  if (!drawn) {
    for (i = 0; i < SEED_M * SEED_K; ++i) x[i] = random_value();
    for (i = 0; i < SEED_N * SEED_K; ++i) w[i] = random_value();
    for (i = 0; i < SEED_R * SEED_K; ++i) a[i] = random_value();
    for (i = 0; i < SEED_N * SEED_R; ++i) b[i] = random_value();
    for (i = 0; i < SEED_M * SEED_N; ++i) dy[i] = random_value();
    drawn = 1;
  }
  expect_status(lora_ops_cpu_lora_linear_fwd(LORA_DTYPE_F32, SEED_M, SEED_N, SEED_K, SEED_R, x,
                                             SEED_K, w, NULL, a, b, 0.5f, dropout, out->s, out->y,
                                             NULL),
                LORA_OK, "cpu_lora_linear_fwd with dropout");
  expect_status(lora_ops_cpu_lora_linear_bwd(LORA_DTYPE_F32, SEED_M, SEED_N, SEED_K, SEED_R, dy, x,
                                             SEED_K, w, a, b, out->s, 0.5f, dropout, out->dx,
                                             out->da, out->db, NULL),
                LORA_OK, "cpu_lora_linear_bwd with dropout");
}

/* A seed left in memory (seed_ptr) is read by the kernels and folded as common.h says: the
 * same outputs, bit for bit, as that seed32 passed by value (the seed32 field is then ignored);
 * another value in memory, another mask. */
static void test_seed_in_memory(void) {
  const int64_t seed = (int64_t)0x9e3779b97f4a7c15ull; /* negative as int64: all 64 bits count */
  const int64_t other = seed + 1;
  const uint64_t bits = (uint64_t)seed;
  const lora_dropout_t by_value = {(uint32_t)(bits ^ (bits >> 32)), 1u << 23, 2.0f, NULL};
  lora_dropout_t in_memory = by_value;
  seeded_outputs_t want, got;
  in_memory.seed32 = ~by_value.seed32; /* ignored when seed_ptr is set */
  in_memory.seed_ptr = &seed;
  run_seeded(by_value, &want);
  run_seeded(in_memory, &got);
  expect(memcmp(&want, &got, sizeof want) == 0,
         "a seed in memory gives the outputs of its seed32 by value");
  in_memory.seed_ptr = &other;
  run_seeded(in_memory, &got);
  expect(memcmp(want.s, got.s, sizeof want.s) != 0, "another seed in memory, another mask");
}

static void test_invalid(void) {
  float buf[64];
  const lora_cpu_gemm_t no_fn = {NULL, NULL};
  memset(buf, 0, sizeof buf);
  expect_status(lora_ops_cpu_lora_linear_fwd(LORA_DTYPE_F32, 2, 2, 2, 2, NULL, 2, buf, NULL, buf,
                                             buf, 1.0f, kNoDropout, buf, buf, NULL),
                LORA_ERR_INVALID_ARGUMENT, "fwd with NULL x");
  expect_status(lora_ops_cpu_lora_linear_fwd(LORA_DTYPE_F32, 2, 2, 2, 2, buf, 2, buf, NULL, buf,
                                             buf, 1.0f, kNoDropout, buf, buf, &no_fn),
                LORA_ERR_INVALID_ARGUMENT, "fwd with a GEMM callback without function");
  expect_status(lora_ops_cpu_lora_linear_bwd(LORA_DTYPE_F32, -3, 2, 2, 2, buf, buf, 2, buf, buf,
                                             buf, buf, 1.0f, kNoDropout, buf, buf, buf, NULL),
                LORA_ERR_INVALID_ARGUMENT, "bwd with M < 0");
  expect_status(lora_ops_cpu_lora_linear_fwd((lora_dtype_t)9, 2, 2, 2, 2, buf, 2, buf, NULL, buf,
                                             buf, 1.0f, kNoDropout, buf, buf, NULL),
                LORA_ERR_INVALID_ARGUMENT, "fwd with an unknown dtype");
  expect_status(lora_ops_cpu_lora_linear_fwd((lora_dtype_t)-1, 2, 2, 2, 2, buf, 2, buf, NULL, buf,
                                             buf, 1.0f, kNoDropout, buf, buf, NULL),
                LORA_ERR_INVALID_ARGUMENT, "fwd with a negative dtype");
  expect_status(lora_ops_cpu_lora_linear_fwd(LORA_DTYPE_F32, 0, 2, 2, 2, NULL, 2, buf, NULL, buf,
                                             buf, 1.0f, kNoDropout, NULL, NULL, NULL),
                LORA_OK, "fwd with M = 0 and NULL activations");
}

int main(void) {
  const lora_cpu_gemm_t gemm = {user_gemm, NULL};
  test_meta();
  test_cuda_entry_points();
  test_linear(NULL, "built-in GEMM");
  user_gemm_calls = 0;
  test_linear(&gemm, "user GEMM");
  expect(user_gemm_calls == 3, "the user GEMM runs the base GEMMs (fwd, bwd, fwd p=1)");
  test_linear_bf16();
  test_multi();
  test_seed_in_memory();
  test_invalid();
  printf("test_c_api: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
