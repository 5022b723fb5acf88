// CUDA device kernels (header-light: CUDA runtime + fp16/bf16 headers only).
// See launchers.h for the interface and csrc/cuda_glue.cpp for the ATen side.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "launchers.h"

namespace metake_fast {
namespace cuda {
namespace {

constexpr int kTile = 32;     // output tile (kTile x kTile) per thread block
constexpr int kThreads = 16;  // kThreads x kThreads threads, 2x2 outputs each
constexpr int kTK = 16;       // reduction slice staged through shared memory

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
  __device__ static double loadd(float v) { return v; }
  __device__ static float stored(double v) { return static_cast<float>(v); }
};
template <>
struct Conv<double> {
  __device__ static float load(double v) { return static_cast<float>(v); }
  __device__ static double store(float v) { return v; }
  __device__ static double loadd(double v) { return v; }
  __device__ static double stored(double v) { return v; }
};
template <>
struct Conv<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
  __device__ static double loadd(__half v) { return __half2float(v); }
  __device__ static __half stored(double v) { return __double2half(v); }
};
template <>
struct Conv<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
  __device__ static double loadd(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 stored(double v) { return __double2bfloat16(v); }
};

// W + delta in acc precision, rounded once to W's type.
template <typename w_t>
__device__ inline w_t add_round(w_t w, float delta) {
  return Conv<w_t>::store(Conv<w_t>::load(w) + delta);
}
template <typename w_t>
__device__ inline w_t add_round(w_t w, double delta) {
  return Conv<w_t>::stored(Conv<w_t>::loadd(w) + delta);
}

// Round-to-nearest adds that the compiler may neither contract nor reassociate
// (the build uses --use_fast_math), for compensated sums.
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ inline float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ inline double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// s += p with Kahan compensation c: the error of a sum over n rows stays O(eps)
// instead of growing with n (one row per step, no split over rows).
template <typename acc_t>
__device__ inline void kahan_add(acc_t& s, acc_t& c, acc_t p) {
  const acc_t y = sub_rn(p, c);
  const acc_t t = add_rn(s, y);
  c = sub_rn(sub_rn(t, s), y);
  s = t;
}

template <typename acc_t>
__global__ void second_moment_kernel(acc_t* __restrict__ S, const acc_t* __restrict__ X, int64_t n, int64_t d) {
  // linear block id -> lower-triangle tile (bi, bj), bj <= bi
  const int64_t t = blockIdx.x;
  int64_t bi = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) / 2.0);
  while ((bi + 1) * (bi + 2) / 2 <= t) ++bi;
  while (bi * (bi + 1) / 2 > t) --bi;
  const int64_t bj = t - bi * (bi + 1) / 2;
  const int64_t r0 = bi * kTile, c0 = bj * kTile;
  __shared__ acc_t As[kTK][kTile];
  __shared__ acc_t Bs[kTK][kTile];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreads + tx;
  acc_t acc[2][2] = {{0, 0}, {0, 0}};
  acc_t comp[2][2] = {{0, 0}, {0, 0}};  // Kahan compensation of acc
  for (int64_t k0 = 0; k0 < n; k0 += kTK) {
    for (int e = tid; e < kTK * kTile; e += kThreads * kThreads) {
      const int kk = e / kTile, cc = e % kTile;  // coalesced along columns of X
      const int64_t k = k0 + kk;
      As[kk][cc] = (k < n && r0 + cc < d) ? X[k * d + r0 + cc] : acc_t(0);
      Bs[kk][cc] = (k < n && c0 + cc < d) ? X[k * d + c0 + cc] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTK; ++kk) {
      const acc_t a0 = As[kk][ty], a1 = As[kk][ty + kThreads];
      const acc_t b0 = Bs[kk][tx], b1 = Bs[kk][tx + kThreads];
      kahan_add(acc[0][0], comp[0][0], a0 * b0);
      kahan_add(acc[0][1], comp[0][1], a0 * b1);
      kahan_add(acc[1][0], comp[1][0], a1 * b0);
      kahan_add(acc[1][1], comp[1][1], a1 * b1);
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t i = r0 + ty + a * kThreads, j = c0 + tx + b * kThreads;
      acc[a][b] = sub_rn(acc[a][b], comp[a][b]);
      if (i < d && j < d) {
        S[i * d + j] += acc[a][b];
        if (bi != bj) S[j * d + i] += acc[a][b];  // mirrored tile has no other writer
      }
    }
}

template <typename w_t, typename acc_t>
__global__ void lowrank_update_kernel(w_t* __restrict__ W, const acc_t* __restrict__ A, const acc_t* __restrict__ B,
                                      int64_t rows, int64_t cols, int64_t u) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  __shared__ acc_t As[kTK][kTile];
  __shared__ acc_t Bs[kTK][kTile];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kThreads + tx;
  acc_t acc[2][2] = {{0, 0}, {0, 0}};
  for (int64_t k0 = 0; k0 < u; k0 += kTK) {
    for (int e = tid; e < kTK * kTile; e += kThreads * kThreads) {
      const int rr = e / kTK, kk = e % kTK;  // coalesced along u
      const int64_t k = k0 + kk;
      As[kk][rr] = (k < u && r0 + rr < rows) ? A[(r0 + rr) * u + k] : acc_t(0);
      Bs[kk][rr] = (k < u && c0 + rr < cols) ? B[(c0 + rr) * u + k] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTK; ++kk) {
      const acc_t a0 = As[kk][ty], a1 = As[kk][ty + kThreads];
      const acc_t b0 = Bs[kk][tx], b1 = Bs[kk][tx + kThreads];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t i = r0 + ty + a * kThreads, j = c0 + tx + b * kThreads;
      if (i < rows && j < cols) W[i * cols + j] = add_round(W[i * cols + j], acc[a][b]);
    }
}

template <typename w_t, typename acc_t>
int launch_update_typed(void* W, const void* A, const void* B, int64_t rows, int64_t cols, int64_t u,
                        cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((cols + kTile - 1) / kTile), static_cast<unsigned>((rows + kTile - 1) / kTile));
  lowrank_update_kernel<w_t, acc_t><<<grid, dim3(kThreads, kThreads), 0, s>>>(
      static_cast<w_t*>(W), static_cast<const acc_t*>(A), static_cast<const acc_t*>(B), rows, cols, u);
  return static_cast<int>(cudaGetLastError());
}

template <typename acc_t>
int launch_update_acc(DType w, void* W, const void* A, const void* B, int64_t rows, int64_t cols, int64_t u,
                      cudaStream_t s) {
  switch (w) {
    case DType::kFloat32:
      return launch_update_typed<float, acc_t>(W, A, B, rows, cols, u, s);
    case DType::kFloat64:
      return launch_update_typed<double, acc_t>(W, A, B, rows, cols, u, s);
    case DType::kFloat16:
      return launch_update_typed<__half, acc_t>(W, A, B, rows, cols, u, s);
    case DType::kBFloat16:
      return launch_update_typed<__nv_bfloat16, acc_t>(W, A, B, rows, cols, u, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int launch_second_moment(DType acc, void* S, const void* X, int64_t n, int64_t d, void* stream) {
  if (n <= 0 || d <= 0) return 0;
  const int64_t nb = (d + kTile - 1) / kTile;
  const int64_t ntiles = nb * (nb + 1) / 2;
  if (ntiles >= (int64_t{1} << 31)) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 block(kThreads, kThreads);
  if (acc == DType::kFloat32) {
    second_moment_kernel<float><<<static_cast<unsigned>(ntiles), block, 0, s>>>(
        static_cast<float*>(S), static_cast<const float*>(X), n, d);
  } else if (acc == DType::kFloat64) {
    second_moment_kernel<double><<<static_cast<unsigned>(ntiles), block, 0, s>>>(
        static_cast<double*>(S), static_cast<const double*>(X), n, d);
  } else {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_lowrank_update(DType w, DType acc, void* W, const void* A, const void* B, int64_t rows, int64_t cols,
                          int64_t u, void* stream) {
  if (rows <= 0 || cols <= 0 || u <= 0) return 0;
  if ((rows + kTile - 1) / kTile >= 65536) return static_cast<int>(cudaErrorInvalidConfiguration);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (acc == DType::kFloat32) return launch_update_acc<float>(w, W, A, B, rows, cols, u, s);
  if (acc == DType::kFloat64) return launch_update_acc<double>(w, W, A, B, rows, cols, u, s);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace metake_fast
