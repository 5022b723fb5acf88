// Plain C++ interface to the CUDA kernels in csrc/cuda/*.cu.
//
// The .cu files include only the CUDA runtime headers (no ATen), so they
// compile with nvcc against any torch install, including a CPU-only wheel that
// lacks the generated c10/cuda headers. The ATen glue (input checks, dtype
// dispatch, streams, TORCH_LIBRARY_IMPL) is in csrc/cuda_glue.cpp, compiled
// only when METAKE_FAST_WITH_CUDA is defined.
#pragma once

#include <cstdint>

namespace metake_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// S (d x d, contiguous, acc) += X^T X for X (n x d, contiguous, acc); acc is
// kFloat32 or kFloat64. Only lower-triangle tiles are computed, each
// off-diagonal tile is added to S[bi, bj] and transposed to S[bj, bi].
// Returns 0 on success, else the cudaError_t of the launch.
int launch_second_moment(DType acc, void* S, const void* X, int64_t n, int64_t d, void* stream);

// W (rows x cols, contiguous, w) += A (rows x u) @ B (cols x u)^T, math in acc
// (kFloat32 / kFloat64), rounded once into W. Returns 0 or the cudaError_t.
int launch_lowrank_update(DType w, DType acc, void* W, const void* A, const void* B, int64_t rows, int64_t cols,
                          int64_t u, void* stream);

}  // namespace cuda
}  // namespace metake_fast
