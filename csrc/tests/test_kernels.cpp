// C++ unit tests of the CPU kernels against naive loops (fp32 inputs, fp64 loops).
// The op schemas are normally declared from Python (metake_fast/ops); here
// they are declared with TORCH_LIBRARY so the kernels run through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "common.h"

TORCH_LIBRARY(metake_fast, m) {
  m.def("second_moment_accumulate(Tensor(a!) S, Tensor X, Tensor? mask) -> ()");
  m.def("apply_update_(Tensor(a!) W, Tensor R, Tensor Y, bool transposed) -> ()");
  m.def("fused_target_logprob(Tensor hidden, Tensor weight, Tensor targets, int chunk) -> (Tensor, Tensor)");
  m.def(
      "fused_target_logprob_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor targets, Tensor lse, int chunk, "
      "bool weight_grad) -> (Tensor, Tensor)");
}

static int failures = 0;

static void expect_close(const std::string& what, double err, double tol) {
  const bool ok = err <= tol;
  std::printf("%-58s max err %.3e (tol %.1e) %s\n", what.c_str(), err, tol, ok ? "ok" : "FAIL");
  if (!ok) ++failures;
}

static void test_second_moment(int64_t n, int64_t d, bool with_mask) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("metake_fast::second_moment_accumulate", "")
                .typed<void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  at::Tensor X = at::randn({n, d});
  at::Tensor S = at::randn({d, d});  // not symmetric: the kernel must add exactly X^T X
  at::Tensor mask = at::rand({n}) > 0.3;
  at::Tensor S0 = S.to(at::kDouble);
  op.call(S, X, with_mask ? std::optional<at::Tensor>(mask) : std::nullopt);
  auto Xd = X.to(at::kDouble);
  auto xp = Xd.accessor<double, 2>();
  auto mp = mask.accessor<bool, 1>();
  auto sp = S0.accessor<double, 2>();
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < n; ++k)
        if (!with_mask || mp[k]) acc += xp[k][i] * xp[k][j];
      sp[i][j] += acc;
    }
  double err = (S.to(at::kDouble) - S0).abs().max().item<double>();
  double scale = 1.0 + S0.abs().max().item<double>();
  expect_close("second_moment n=" + std::to_string(n) + " d=" + std::to_string(d) + (with_mask ? " mask" : ""),
               err / scale, 1e-5);
}

static void test_apply_update(int64_t dv, int64_t dk, int64_t u, bool transposed) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("metake_fast::apply_update_", "")
                .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  at::Tensor W = transposed ? at::randn({dk, dv}) : at::randn({dv, dk});
  at::Tensor R = at::randn({dv, u}), Y = at::randn({dk, u});
  at::Tensor ref = W.to(at::kDouble);
  op.call(W, R, Y, transposed);
  auto rp = R.accessor<float, 2>();
  auto yp = Y.accessor<float, 2>();
  auto wp = ref.accessor<double, 2>();
  for (int64_t i = 0; i < dv; ++i)
    for (int64_t j = 0; j < dk; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < u; ++k) acc += static_cast<double>(rp[i][k]) * yp[j][k];
      if (transposed)
        wp[j][i] += acc;
      else
        wp[i][j] += acc;
    }
  double err = (W.to(at::kDouble) - ref).abs().max().item<double>();
  expect_close("apply_update dv=" + std::to_string(dv) + " dk=" + std::to_string(dk) + " u=" + std::to_string(u) +
                   (transposed ? " transposed" : ""),
               err, 1e-4);
}

static void test_target_logprob(int64_t n, int64_t d, int64_t V, int64_t chunk) {
  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("metake_fast::fused_target_logprob", "")
                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           int64_t)>();
  at::Tensor h = at::randn({n, d}), w = at::randn({V, d}) * 0.3;
  at::Tensor t = at::randint(V, {n}, at::kLong);
  auto [lp, lse] = fwd.call(h, w, t, chunk);
  auto logits = at::matmul(h.to(at::kDouble), w.to(at::kDouble).t());
  auto ref_lse = at::logsumexp(logits, 1);
  auto ref_lp = logits.gather(1, t.unsqueeze(1)).squeeze(1) - ref_lse;
  double err = std::max((lp.to(at::kDouble) - ref_lp).abs().max().item<double>(),
                        (lse.to(at::kDouble) - ref_lse).abs().max().item<double>());
  expect_close("target_logprob n=" + std::to_string(n) + " V=" + std::to_string(V) + " chunk=" + std::to_string(chunk),
               err, 1e-4);
}

int main() {
  at::manual_seed(0);
  std::printf("registered kernels: %zu\n", metake_fast::kernel_records().size());
  if (metake_fast::kernel_records().size() < 4) ++failures;
  for (auto [n, d] : {std::pair<int64_t, int64_t>{1, 1}, {7, 13}, {50, 127}, {13, 200}, {300, 401}, {64, 520}}) {
    test_second_moment(n, d, false);
    test_second_moment(n, d, true);
  }
  for (bool tr : {false, true}) {
    test_apply_update(1, 1, 1, tr);
    test_apply_update(7, 13, 3, tr);
    test_apply_update(57, 130, 11, tr);
    test_apply_update(40, 20, 100, tr);  // u > d
  }
  test_target_logprob(1, 8, 17, 4);
  test_target_logprob(37, 64, 1000, 128);
  test_target_logprob(300, 33, 1031, 700);
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
