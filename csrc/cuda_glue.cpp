// ATen glue for the CUDA kernels (csrc/cuda/kernels.cu): checks, dtype
// conversion of the factors, streams and TORCH_LIBRARY_IMPL(CUDA). Compiled
// into the extension only when setup.py builds with nvcc
// (METAKE_FAST_WITH_CUDA); otherwise this file is empty and nothing is
// registered for CUDA by the C++ extension.
#ifdef METAKE_FAST_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/launchers.h"

namespace metake_fast {
namespace cuda {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "metake_fast CUDA kernels: unsupported dtype ", t);
  }
}

void second_moment_accumulate_cuda(const at::Tensor& S, const at::Tensor& X, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(S.is_cuda() && X.is_cuda(), "second_moment_accumulate (CUDA): S and X must be CUDA tensors");
  TORCH_CHECK(S.dim() == 2 && S.size(0) == S.size(1), "second_moment_accumulate: S must be square (d, d), got ",
              S.sizes());
  TORCH_CHECK(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble,
              "second_moment_accumulate: S must be float32 or float64, got ", S.scalar_type());
  TORCH_CHECK(X.dim() == 2 && X.size(1) == S.size(0), "second_moment_accumulate: X must be (n, ", S.size(0), "), got ",
              X.sizes());
  TORCH_CHECK(is_float_type(X.scalar_type()), "second_moment_accumulate: X must be a floating tensor, got ",
              X.scalar_type());
  const c10::cuda::CUDAGuard guard(S.device());
  at::Tensor Xc = X;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == X.size(0), "second_moment_accumulate: mask must be (", X.size(0),
                ",), got ", mask->sizes());
    Xc = X.index({mask->to(X.device(), at::kBool)});
  }
  Xc = Xc.to(S.scalar_type()).contiguous();
  if (Xc.size(0) == 0 || S.size(0) == 0) return;
  at::Tensor Sw = S.is_contiguous() ? S : S.contiguous();
  const int err = launch_second_moment(to_dtype(S.scalar_type()), Sw.data_ptr(), Xc.const_data_ptr(), Xc.size(0),
                                       S.size(0), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "second_moment_accumulate (CUDA): kernel launch failed with cudaError ", err);
  if (!Sw.is_same(S)) S.copy_(Sw);
}

void apply_update_cuda(const at::Tensor& W, const at::Tensor& R, const at::Tensor& Y, bool transposed) {
  TORCH_CHECK(W.is_cuda() && R.is_cuda() && Y.is_cuda(), "apply_update_ (CUDA): W, R and Y must be CUDA tensors");
  TORCH_CHECK(W.dim() == 2 && R.dim() == 2 && Y.dim() == 2, "apply_update_: W, R and Y must be 2-D");
  TORCH_CHECK(is_float_type(W.scalar_type()), "apply_update_: W must be a floating tensor, got ", W.scalar_type());
  const int64_t d_v = transposed ? W.size(1) : W.size(0);
  const int64_t d_k = transposed ? W.size(0) : W.size(1);
  TORCH_CHECK(R.size(0) == d_v && Y.size(0) == d_k && R.size(1) == Y.size(1), "apply_update_: shape mismatch: W ",
              W.sizes(), " (transposed=", transposed, "), R ", R.sizes(), ", Y ", Y.sizes());
  if (W.numel() == 0 || R.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(W.device());
  const at::ScalarType mt =
      (R.scalar_type() == at::kDouble || Y.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  at::Tensor A = (transposed ? Y : R).to(mt).contiguous();
  at::Tensor B = (transposed ? R : Y).to(mt).contiguous();
  at::Tensor Ww = W.is_contiguous() ? W : W.contiguous();
  const int err = launch_lowrank_update(to_dtype(Ww.scalar_type()), to_dtype(mt), Ww.data_ptr(), A.const_data_ptr(),
                                        B.const_data_ptr(), Ww.size(0), Ww.size(1), A.size(1),
                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "apply_update_ (CUDA): kernel launch failed with cudaError ", err);
  if (!Ww.is_same(W)) W.copy_(Ww);
}

}  // namespace
}  // namespace cuda

static RecordKernel record_smacc_cuda("second_moment_accumulate", "CUDA", "CUDA (tiled lower-triangle kernel)");
static RecordKernel record_apply_update_cuda("apply_update_", "CUDA", "CUDA (tiled low-rank update kernel)");

}  // namespace metake_fast

TORCH_LIBRARY_IMPL(metake_fast, CUDA, m) {
  m.impl("second_moment_accumulate", &metake_fast::cuda::second_moment_accumulate_cuda);
  m.impl("apply_update_", &metake_fast::cuda::apply_update_cuda);
}

#endif  // METAKE_FAST_WITH_CUDA
