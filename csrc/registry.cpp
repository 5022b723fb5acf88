// Python module metake_fast._C: importing it runs the static TORCH_LIBRARY_IMPL
// registrations of every kernel file; registered_kernels() lists them.
// Without TORCH_EXTENSION_NAME (CMake build) only the record list is compiled.
#include <tuple>

#include "common.h"

#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>
#endif

namespace metake_fast {

std::vector<KernelRecord>& kernel_records() {
  static std::vector<KernelRecord> records;
  return records;
}

}  // namespace metake_fast

#ifdef TORCH_EXTENSION_NAME
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metake_fast compiled kernels (registered with the PyTorch dispatcher on import)";
  m.def(
      "registered_kernels",
      []() {
        std::vector<std::tuple<std::string, std::string, std::string>> out;
        for (const auto& r : metake_fast::kernel_records()) out.emplace_back(r.op, r.dispatch_key, r.provider);
        return out;
      },
      "List of (op_name, dispatch_key, provider) for every kernel this extension registered.");
#ifdef METAKE_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
#endif
