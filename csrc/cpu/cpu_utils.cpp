#include "cpu_utils.h"

#include <cmath>
#include <limits>

namespace metake_fast {
namespace cpu {

MKF_MULTIVERSION void convert_to_f32(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(float));
    dst[i] = f;
  }
}

MKF_MULTIVERSION void convert_to_f32(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void convert_to_f32(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

void convert_to_f32(const double* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

MKF_MULTIVERSION void lse_update_rows(const float* L, int64_t rows, int64_t cols, int64_t ld, float* m, float* s) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* x = L + i * ld;
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < cols; ++j) mx = x[j] > mx ? x[j] : mx;
    float m_new = mx > m[i] ? mx : m[i];
    if (m_new == -std::numeric_limits<float>::infinity()) continue;  // all -inf so far
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < cols; ++j) acc += exp_f32(x[j] - m_new);
    float rescale = (m[i] == -std::numeric_limits<float>::infinity()) ? 0.0f : std::exp(m[i] - m_new);
    s[i] = s[i] * rescale + acc;
    m[i] = m_new;
  }
}

void lse_update_rows(const double* L, int64_t rows, int64_t cols, int64_t ld, double* m, double* s) {
  for (int64_t i = 0; i < rows; ++i) {
    const double* x = L + i * ld;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < cols; ++j) mx = x[j] > mx ? x[j] : mx;
    double m_new = mx > m[i] ? mx : m[i];
    if (m_new == -std::numeric_limits<double>::infinity()) continue;
    double acc = 0.0;
    for (int64_t j = 0; j < cols; ++j) acc += std::exp(x[j] - m_new);
    double rescale = (m[i] == -std::numeric_limits<double>::infinity()) ? 0.0 : std::exp(m[i] - m_new);
    s[i] = s[i] * rescale + acc;
    m[i] = m_new;
  }
}

MKF_MULTIVERSION void softmax_scale_rows(float* L, int64_t rows, int64_t cols, int64_t ld, const float* lse,
                                         const float* g) {
  for (int64_t i = 0; i < rows; ++i) {
    float* x = L + i * ld;
    const float li = lse[i], gi = g[i];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) x[j] = exp_f32(x[j] - li) * gi;
  }
}

void softmax_scale_rows(double* L, int64_t rows, int64_t cols, int64_t ld, const double* lse, const double* g) {
  for (int64_t i = 0; i < rows; ++i) {
    double* x = L + i * ld;
    for (int64_t j = 0; j < cols; ++j) x[j] = std::exp(x[j] - lse[i]) * g[i];
  }
}

}  // namespace cpu
}  // namespace metake_fast
