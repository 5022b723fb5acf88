#!/usr/bin/env bash
# Compile-only check of every csrc/cuda/*.cu with nvcc for sm_90 against the
# installed torch headers. The .cu files are header-light (CUDA runtime only;
# ATen glue lives in csrc/cuda_glue.cpp) because a CPU torch wheel lacks the
# generated c10/cuda headers. Object files go to a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "cuda_compile_check: nvcc not found, skipping"
  exit 0
fi
PY="${PYTHON:-python}"
mapfile -t INCS < <("$PY" -c 'import torch.utils.cpp_extension as e; print("\n".join(e.include_paths()))')
INC_FLAGS=(-I csrc)
for d in "${INCS[@]}"; do INC_FLAGS+=(-I "$d"); done
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [[ ${#files[@]} -eq 0 ]]; then
  echo "cuda_compile_check: no csrc/cuda/*.cu files"
  exit 0
fi
status=0
for f in "${files[@]}"; do
  echo "nvcc -arch=sm_90 -c $f"
  if ! "$NVCC" -arch=sm_90 -std=c++17 -O2 -c "$f" -o "$OUT/$(basename "$f").o" "${INC_FLAGS[@]}" \
      -DMETAKE_FAST_WITH_CUDA=1 -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC; then
    status=1
  fi
done
if [[ $status -eq 0 ]]; then echo "cuda_compile_check: OK (${#files[@]} files)"; fi
exit $status
