/* A program of another project using the installed lora_ops: the header from the install's
 * include directory, the library through find_package or pkg-config. It checks that the header
 * and the library loaded agree on the version, and runs one forward against a plain loop. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <lora_ops/lora_ops.h>

#define STR_(x) #x
#define STR(x) STR_(x)

int main(void) {
  const char* header = STR(LORA_OPS_VERSION_MAJOR) "." STR(LORA_OPS_VERSION_MINOR) "." STR(
      LORA_OPS_VERSION_PATCH);
  if (strcmp(lora_ops_version(), header) != 0) {
    fprintf(stderr, "library %s, header %s\n", lora_ops_version(), header);
    return 1;
  }
  enum { M = 2, K = 3, N = 2, R = 1 };
  const float x[M * K] = {1, 2, 3, -1, 0.5f, 2};
  const float w[N * K] = {0.5f, -1, 2, 1, 1, -0.25f};
  const float bias[N] = {0.25f, -0.5f};
  const float a[R * K] = {1, -2, 0.5f};
  const float b[N * R] = {3, -1};
  const float scaling = 0.5f;
  float s[M * R], y[M * N];
  const lora_dropout_t no_dropout = {0u, 0u, 1.0f};
  const lora_status_t status = lora_ops_cpu_lora_linear_fwd(
      LORA_DTYPE_F32, M, N, K, R, x, K, w, bias, a, b, scaling, no_dropout, s, y, NULL);
  if (status != LORA_OK) {
    fprintf(stderr, "lora_ops_cpu_lora_linear_fwd: %s\n", lora_ops_status_string(status));
    return 1;
  }
  for (int i = 0; i < M; ++i) {
    float t = 0;
    for (int k = 0; k < K; ++k) t += x[i * K + k] * a[k];
    for (int j = 0; j < N; ++j) {
      float want = bias[j] + scaling * t * b[j];
      for (int k = 0; k < K; ++k) want += x[i * K + k] * w[j * K + k];
      if (fabsf(y[i * N + j] - want) > 1e-5f * (1 + fabsf(want))) {
        fprintf(stderr, "y[%d][%d] = %g, want %g\n", i, j, y[i * N + j], want);
        return 1;
      }
    }
  }
  printf("lora_ops %s (cuda: %d): ok\n", lora_ops_version(), lora_ops_has_cuda());
  return 0;
}
