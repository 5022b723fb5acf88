// CPU kernel for metake_fast::second_moment_accumulate: S += X[mask]^T X[mask].
//
// Kept rows of X are gathered and converted to S.dtype once (parallel over
// rows). Only the lower block triangle of X^T X is computed: k x k tiles of
// size `block`, (k+1)/(2k) of the flops of the full product, one OpenMP task
// per tile with a single-threaded BLAS call. Each off-diagonal tile product is
// added to its lower tile and, transposed, to the mirrored upper tile while it
// is still in cache, so S is updated exactly (S + X^T X, also for a
// non-symmetric S) and is symmetric on return when it was on entry.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"
#include "cpu_utils.h"

namespace metake_fast {
namespace cpu {
namespace {

// Copy the kept rows of X into dst (rows x d, contiguous, dtype acc_t).
template <typename acc_t, typename in_t>
void gather_convert(const in_t* X, int64_t ldx, const int64_t* rows, int64_t nrows, int64_t d, acc_t* dst) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < nrows; ++r) {
    const in_t* src = X + (rows ? rows[r] : r) * ldx;
    if constexpr (std::is_same_v<acc_t, float>) {
      convert_to_f32(src, dst + r * d, d);
    } else {
      convert_to_f64(src, dst + r * d, d);
    }
  }
}

// Lower block triangle of Xc^T Xc added into S (d x d, contiguous), one OpenMP
// task per tile with a single-threaded BLAS call each (one parallel region, so
// it degrades gracefully when cores are shared). Off-diagonal tiles are formed
// in a thread-local buffer and added to both S[bi, bj] and S[bj, bi]^T.
template <typename acc_t>
void triangle_update(const at::Tensor& Sw, const at::Tensor& Xc, int64_t block) {
  const int64_t d = Sw.size(0);
  const int64_t nb = (d + block - 1) / block;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t bi = 0; bi < nb; ++bi)
    for (int64_t bj = 0; bj <= bi; ++bj) tiles.emplace_back(bi, bj);
  // Largest tiles (full blocks) first is what dynamic scheduling wants; they are all ~equal here.
  acc_t* sp = Sw.mutable_data_ptr<acc_t>();
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
#pragma omp parallel
  {
    at::Tensor buf = at::empty({block, block}, Sw.options());
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t bi = tiles[t].first, bj = tiles[t].second;
      const int64_t r0 = bi * block, rb = std::min(block, d - r0);
      const int64_t c0 = bj * block, cb = std::min(block, d - c0);
      at::Tensor xi = Xc.narrow(1, r0, rb), xj = Xc.narrow(1, c0, cb);
      at::Tensor D = buf.narrow(0, 0, rb).narrow(1, 0, cb);
      at::mm_out(D, xi.t(), xj);
      const acc_t* dp = D.const_data_ptr<acc_t>();
      if (bi == bj) {  // both halves of a diagonal tile take the lower value: exact symmetry
        for (int64_t i = 0; i < rb; ++i) {
          acc_t* row = sp + (r0 + i) * d + c0;
          for (int64_t j = 0; j <= i; ++j) row[j] += dp[i * block + j];
          for (int64_t j = i + 1; j < cb; ++j) row[j] += dp[j * block + i];
        }
        continue;
      }
      for (int64_t i = 0; i < rb; ++i) {  // lower tile: S[r0+i, c0+j] += D[i, j]
        acc_t* row = sp + (r0 + i) * d + c0;
        const acc_t* drow = dp + i * block;
#pragma omp simd
        for (int64_t j = 0; j < cb; ++j) row[j] += drow[j];
      }
      for (int64_t j0 = 0; j0 < cb; j0 += 16) {  // upper tile: S[c0+j, r0+i] += D[i, j], 16-column strips
        const int64_t j1 = std::min(cb, j0 + 16);
        for (int64_t j = j0; j < j1; ++j) {
          acc_t* row = sp + (c0 + j) * d + r0;
          for (int64_t i = 0; i < rb; ++i) row[i] += dp[i * block + j];
        }
      }
    }
  }
}

void second_moment_accumulate_cpu(const at::Tensor& S, const at::Tensor& X, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(S.device().is_cpu() && X.device().is_cpu(), "second_moment_accumulate (CPU): S and X must be CPU tensors");
  TORCH_CHECK(S.dim() == 2 && S.size(0) == S.size(1), "second_moment_accumulate: S must be square (d, d), got ",
              S.sizes());
  TORCH_CHECK(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble,
              "second_moment_accumulate: S must be float32 or float64, got ", S.scalar_type());
  TORCH_CHECK(X.dim() == 2 && X.size(1) == S.size(0), "second_moment_accumulate: X must be (n, ", S.size(0), "), got ",
              X.sizes());
  TORCH_CHECK(is_float_type(X.scalar_type()),
              "second_moment_accumulate: X must be float32/bfloat16/float16/float64, got ", X.scalar_type());
  const int64_t d = S.size(0);
  at::Tensor Xk = X.contiguous();
  std::vector<int64_t> kept;
  const int64_t* rows = nullptr;
  int64_t n = X.size(0);
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& mk = *mask;
    TORCH_CHECK(mk.device().is_cpu(), "second_moment_accumulate (CPU): mask must be a CPU tensor");
    TORCH_CHECK(mk.dim() == 1 && mk.size(0) == X.size(0), "second_moment_accumulate: mask must be (", X.size(0),
                ",), got ", mk.sizes());
    at::Tensor mb = mk.to(at::kBool).contiguous();
    const bool* mp = mb.data_ptr<bool>();
    kept.reserve(n);
    for (int64_t i = 0; i < n; ++i)
      if (mp[i]) kept.push_back(i);
    rows = kept.data();
    n = static_cast<int64_t>(kept.size());
  }
  if (n == 0 || d == 0) return;

  // Work on S directly when contiguous, else on a contiguous copy written back at the end.
  at::Tensor Sw = S.is_contiguous() ? S : S.contiguous();

  // Xc: kept rows converted to S.dtype (skipped when X already is that and nothing is masked).
  at::Tensor Xc;
  if (!rows && X.scalar_type() == S.scalar_type()) {
    Xc = Xk;
  } else {
    Xc = at::empty({n, d}, S.options());
    AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "smacc_acc", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, X.scalar_type(), "smacc_in", [&] {
        gather_convert<acc_t, scalar_t>(Xk.const_data_ptr<scalar_t>(), d, rows, n, d, Xc.mutable_data_ptr<acc_t>());
      });
    });
  }

  // Tile size: single-threaded GEMMs of this size run near peak; the lower
  // triangle of k x k tiles costs (k+1)/(2k) of the full product.
  const int64_t block = d <= 192 ? d : (d <= 4096 ? 192 : 256);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "smacc_triangle", [&] { triangle_update<scalar_t>(Sw, Xc, block); });
  if (!Sw.is_same(S)) S.copy_(Sw);
}

}  // namespace
}  // namespace cpu

static RecordKernel record_smacc("second_moment_accumulate", "CPU", "C++ (ATen+OpenMP, lower-triangle blocked GEMM)");

}  // namespace metake_fast

TORCH_LIBRARY_IMPL(metake_fast, CPU, m) {
  m.impl("second_moment_accumulate", &metake_fast::cpu::second_moment_accumulate_cpu);
}
