// Small vectorisable helpers for the CPU kernels.
//
// setup.py compiles for a conservative baseline ISA (x86-64-v2), so the hot
// loops are multi-versioned with GCC target_clones (on the definitions in
// cpu_utils.cpp only): the loader picks the AVX-512 / AVX2+FMA clone at run time.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__NVCC__)
#define MKF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MKF_MULTIVERSION
#endif

namespace metake_fast {
namespace cpu {

// exp(x) for float, branch-free so loops over it vectorise. Accurate to ~2 ulp
// on [-87, 88]; inputs below -87 return exp(-87) ~ 1.6e-38 (callers only use
// it for x <= 0 where that is indistinguishable from 0 after summation).
inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // k = round(x / ln 2) with the 1.5 * 2^23 trick (no rint call needed).
  const float magic = 12582912.0f;
  float kf = (x * 1.44269504088896341f + magic) - magic;
  // Cody-Waite: ln2_hi has 11 significant bits so kf * ln2_hi is exact.
  float r = x - kf * 0.693145751953125f;
  r = r - kf * 1.428606765330187045e-06f;
  // exp(r), |r| <= 0.347: degree-7 Taylor (truncation < 4e-9 relative).
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t ki = static_cast<int32_t>(kf);
  int32_t bits = (ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}
inline float to_float(c10::Half v) { return static_cast<float>(v); }

// Convert n contiguous values to float / double (vectorisable for bf16/fp32).
void convert_to_f32(const c10::BFloat16* src, float* dst, int64_t n);
void convert_to_f32(const c10::Half* src, float* dst, int64_t n);
void convert_to_f32(const float* src, float* dst, int64_t n);
void convert_to_f32(const double* src, float* dst, int64_t n);
template <typename T>
void convert_to_f64(const T* src, double* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<double>(static_cast<float>(src[i]));
}
inline void convert_to_f64(const double* src, double* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(double)); }

// Online log-sum-exp update of rows of a logits tile.
// L: rows x cols (row stride ld). For each row i, (m[i], s[i]) holds the running
// max and sum of exp(x - m[i]); they are updated to include the tile.
void lse_update_rows(const float* L, int64_t rows, int64_t cols, int64_t ld, float* m, float* s);
void lse_update_rows(const double* L, int64_t rows, int64_t cols, int64_t ld, double* m, double* s);

// In place: L[i][j] = exp(L[i][j] - lse[i]) * g[i].
void softmax_scale_rows(float* L, int64_t rows, int64_t cols, int64_t ld, const float* lse, const float* g);
void softmax_scale_rows(double* L, int64_t rows, int64_t cols, int64_t ld, const double* lse, const double* g);

}  // namespace cpu
}  // namespace metake_fast
