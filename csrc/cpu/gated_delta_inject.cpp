// CPU kernel for metake_fast::gated_delta_inject (forward): out = hidden with
// V = gate^T delta rows added at (rows[i], cols[i]) (V[owner[i]]), repeated
// positions accumulated, math in fp32 (fp64 if delta/gate is fp64), one rounding.
//
// One pass over the output: a slot map (B*T -> accumulated row or -1) is built
// from the n entries, then every row is either copied or upcast + added +
// rounded, in parallel. The reference needs a clone, a sort (unique) and a
// gather/scatter of the touched rows.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../common.h"

namespace metake_fast {
namespace cpu {
namespace {

// S[slot of entry i] += V[owner[i]], serially (entries may share a slot).
template <typename acc_t>
void accumulate(acc_t* S, const acc_t* V, const std::vector<int64_t>& slot_entries, const int64_t* owner, int64_t d) {
  for (size_t i = 0; i < slot_entries.size(); ++i) {
    acc_t* dst = S + slot_entries[i] * d;
    const acc_t* src = V + owner[i] * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
  }
}

template <typename h_t, typename acc_t>
void write_rows(const h_t* hid, h_t* out, const std::vector<int64_t>& slot_of, const acc_t* S, int64_t rows_total,
                int64_t d) {
  at::parallel_for(0, rows_total, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const h_t* src = hid + r * d;
      h_t* dst = out + r * d;
      const int64_t s = slot_of.empty() ? -1 : slot_of[r];
      if (s < 0) {
        std::memcpy(dst, src, sizeof(h_t) * d);
      } else {
        const acc_t* add = S + s * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<h_t>(static_cast<acc_t>(src[j]) + add[j]);
      }
    }
  });
}

at::Tensor gated_delta_inject_cpu(const at::Tensor& hidden, const at::Tensor& delta, const std::optional<at::Tensor>& gate,
                                  const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& owner) {
  TORCH_CHECK(hidden.device().is_cpu() && delta.device().is_cpu(), "gated_delta_inject (CPU): CPU tensors expected");
  TORCH_CHECK(hidden.dim() == 3, "gated_delta_inject: hidden must be (B, T, d)");
  TORCH_CHECK(delta.dim() == 2 && delta.size(1) == hidden.size(2), "gated_delta_inject: delta must be (u, d)");
  TORCH_CHECK(is_float_type(hidden.scalar_type()) && is_float_type(delta.scalar_type()),
              "gated_delta_inject: hidden and delta must be floating tensors");
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong && owner.scalar_type() == at::kLong,
              "gated_delta_inject: rows, cols and owner must be int64");
  const int64_t n = rows.numel();
  TORCH_CHECK(cols.numel() == n && owner.numel() == n, "gated_delta_inject: rows, cols, owner lengths differ");
  const bool has_gate = gate.has_value() && gate->defined();
  if (has_gate) {
    TORCH_CHECK(gate->dim() == 2 && gate->size(0) == delta.size(0), "gated_delta_inject: gate must be (u_in, u_out)");
  }
  const at::ScalarType mt =
      (delta.scalar_type() == at::kDouble || (has_gate && gate->scalar_type() == at::kDouble)) ? at::kDouble
                                                                                             : at::kFloat;
  const int64_t B = hidden.size(0), T = hidden.size(1), d = hidden.size(2);
  at::Tensor hid = hidden.contiguous();
  at::Tensor out = at::empty_like(hid);
  if (hid.numel() == 0) return out;

  // accumulate V[owner[i]] per distinct position (n is small: one entry per prompt)
  std::vector<int64_t> slot_of;
  at::Tensor S;
  if (n > 0) {
    at::Tensor V = has_gate ? at::mm(gate->to(mt).t(), delta.to(mt)) : delta.to(mt);
    V = V.contiguous();
    const int64_t u_out = V.size(0);
    const at::Tensor rc = rows.contiguous(), cc = cols.contiguous(), oc = owner.contiguous();
    const int64_t* rp = rc.const_data_ptr<int64_t>();
    const int64_t* cp = cc.const_data_ptr<int64_t>();
    const int64_t* op = oc.const_data_ptr<int64_t>();
    slot_of.assign(B * T, -1);
    std::vector<int64_t> slot_entries;  // slot of each entry
    slot_entries.reserve(n);
    int64_t nslots = 0;
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(rp[i] >= 0 && rp[i] < B && cp[i] >= 0 && cp[i] < T, "gated_delta_inject: position (", rp[i], ", ",
                  cp[i], ") out of range for hidden of shape ", hidden.sizes());
      TORCH_CHECK(op[i] >= 0 && op[i] < u_out, "gated_delta_inject: owner ", op[i], " out of range [0, ", u_out, ")");
      int64_t& s = slot_of[rp[i] * T + cp[i]];
      if (s < 0) s = nslots++;
      slot_entries.push_back(s);
    }
    S = at::zeros({nslots, d}, V.options());
    AT_DISPATCH_FLOATING_TYPES(mt, "gated_delta_inject_acc", [&] {
      accumulate<scalar_t>(S.mutable_data_ptr<scalar_t>(), V.const_data_ptr<scalar_t>(), slot_entries, op, d);
    });
  }
  AT_DISPATCH_FLOATING_TYPES(mt, "gated_delta_inject_math", [&] {
    using acc_t = scalar_t;
    const acc_t* sp = S.defined() ? S.const_data_ptr<acc_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hid.scalar_type(), "gated_delta_inject_h", [&] {
      write_rows<scalar_t, acc_t>(hid.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), slot_of, sp, B * T,
                                  d);
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu

static RecordKernel record_gated_delta_inject("gated_delta_inject", "CPU", "C++ (ATen, one-pass copy+inject)");

}  // namespace metake_fast

TORCH_LIBRARY_IMPL(metake_fast, CPU, m) { m.impl("gated_delta_inject", &metake_fast::cpu::gated_delta_inject_cpu); }
