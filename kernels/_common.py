"""Helpers shared by the Triton kernels (imports Triton: load only through the kernel modules)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def native_dot(*tensors: torch.Tensor) -> bool:
    """Whether ``tl.dot`` may take the loaded tiles as they are (bf16/fp16 tensor cores, fp32 accumulation).

    fp32 operands always go through an IEEE fp32 dot (TF32 would lose precision
    the PyTorch reference keeps). The interpreter computes bf16 arithmetic
    wrongly, so there every tile is upcast to fp32 first (the result is the same:
    bf16·bf16 and fp16·fp16 products are exact in fp32).
    """
    if interpreting():
        return False
    dtypes = {t.dtype for t in tensors}
    return len(dtypes) == 1 and dtypes.pop() in (torch.bfloat16, torch.float16)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def pow2_block(x: int, lo: int, hi: int) -> int:
    """The power of two ``>= x`` clamped to ``[lo, hi]`` (``tl.dot`` needs every dim >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def same_device(*tensors: torch.Tensor | None) -> None:
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devs)}")


@triton.jit
def dot_acc(a, b, acc, NATIVE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation: native low-precision dot or IEEE fp32."""
    if NATIVE:
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def rne_bf16(x):
    """fp32 -> bf16 rounded to nearest-even through the bits.

    Only used under the interpreter, whose fp32 -> bf16 cast truncates; compiled
    kernels use the hardware conversion (RNE, NaN-safe).
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


def needs_rne_bf16(out: torch.Tensor) -> bool:
    """Whether a kernel storing into ``out`` must round to bf16 by hand (interpreter only)."""
    return interpreting() and out.dtype == torch.bfloat16
