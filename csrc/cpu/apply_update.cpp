// CPU kernel for metake_fast::apply_update_: W += R Y^T (or W += Y R^T when
// transposed), math in fp32 (fp64 if R or Y is fp64), rounded once into W.
//
// W is processed in row blocks: each thread forms the block's slice of the
// low-rank product in the math dtype in a small buffer, adds W's rows and
// rounds back, so no full-size copy of W (or of the product) is made.
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "cpu_utils.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace metake_fast {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 32;

template <typename w_t, typename acc_t>
void add_rows(w_t* W, const acc_t* delta, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    w_t* w = W + i * cols;
    const acc_t* dl = delta + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) w[j] = static_cast<w_t>(static_cast<acc_t>(w[j]) + dl[j]);
  }
}

// W (rows x cols, contiguous, w_t) += A @ B^T, one row block per task.
template <typename w_t, typename acc_t>
void blocked_update(const at::Tensor& Ww, const at::Tensor& A, const at::Tensor& B) {
  const int64_t rows = Ww.size(0), cols = Ww.size(1);
  const int64_t nblk = (rows + kRowBlock - 1) / kRowBlock;
  w_t* wp = Ww.mutable_data_ptr<w_t>();
  const at::Tensor Bt = B.t();
#pragma omp parallel
  {
    at::Tensor buf = at::empty({kRowBlock, cols}, A.options());
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t r0 = b * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
      at::Tensor out = buf.narrow(0, 0, r1 - r0);
      at::mm_out(out, A.narrow(0, r0, r1 - r0), Bt);
      add_rows<w_t, acc_t>(wp + r0 * cols, out.const_data_ptr<acc_t>(), r1 - r0, cols);
    }
  }
}

void apply_update_cpu(const at::Tensor& W, const at::Tensor& R, const at::Tensor& Y, bool transposed) {
  TORCH_CHECK(W.device().is_cpu() && R.device().is_cpu() && Y.device().is_cpu(),
              "apply_update_ (CPU): W, R and Y must be CPU tensors");
  TORCH_CHECK(W.dim() == 2 && R.dim() == 2 && Y.dim() == 2, "apply_update_: W, R and Y must be 2-D");
  TORCH_CHECK(is_float_type(W.scalar_type()), "apply_update_: W must be a floating tensor, got ", W.scalar_type());
  TORCH_CHECK(is_float_type(R.scalar_type()) && is_float_type(Y.scalar_type()),
              "apply_update_: R and Y must be floating tensors");
  const int64_t d_v = transposed ? W.size(1) : W.size(0);
  const int64_t d_k = transposed ? W.size(0) : W.size(1);
  TORCH_CHECK(R.size(0) == d_v && Y.size(0) == d_k && R.size(1) == Y.size(1), "apply_update_: shape mismatch: W ",
              W.sizes(), " (transposed=", transposed, "), R ", R.sizes(), ", Y ", Y.sizes());
  if (W.numel() == 0) return;
  const at::ScalarType mt =
      (R.scalar_type() == at::kDouble || Y.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  // W (rows x cols) += A @ B^T
  at::Tensor A = (transposed ? Y : R).to(mt).contiguous();
  at::Tensor B = (transposed ? R : Y).to(mt).contiguous();
  if (A.size(1) == 0) return;
  at::Tensor Ww = W.is_contiguous() ? W : W.contiguous();
  if (Ww.scalar_type() == mt) {
    Ww.addmm_(A, B.t());  // same precision: one BLAS call, rounded once
  } else {
    AT_DISPATCH_FLOATING_TYPES(mt, "apply_update_acc", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, Ww.scalar_type(), "apply_update_w", [&] {
        blocked_update<scalar_t, acc_t>(Ww, A, B);
      });
    });
  }
  if (!Ww.is_same(W)) W.copy_(Ww);
}

}  // namespace
}  // namespace cpu

static RecordKernel record_apply_update("apply_update_", "CPU", "C++ (ATen+OpenMP, row-blocked)");

}  // namespace metake_fast

TORCH_LIBRARY_IMPL(metake_fast, CPU, m) { m.impl("apply_update_", &metake_fast::cpu::apply_update_cpu); }
