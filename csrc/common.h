// Shared helpers for the metake_fast C++ extension.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace metake_fast {

// One entry per (op, dispatch key) that this library registered a kernel for.
struct KernelRecord {
  std::string op;
  std::string dispatch_key;
  std::string provider;
};

// The records, filled by static RecordKernel objects next to each TORCH_LIBRARY_IMPL.
std::vector<KernelRecord>& kernel_records();

struct RecordKernel {
  RecordKernel(const char* op, const char* key, const char* provider) {
    kernel_records().push_back({op, key, provider});
  }
};

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace metake_fast
