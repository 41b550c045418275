"""What the kernel files share: the interpreter switch and its bf16 workarounds, the launch options, and the
specialization of ahead-of-time compiles."""

from __future__ import annotations

import os

import torch

TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

FP_FUSION = {"enable_fp_fusion": True}
"""Compile option of every fastpo launch and ahead-of-time compile. Fused multiply-add contraction changes
bitwise results, so it is pinned per launch rather than inherited from TRITON_DEFAULT_FP_FUSION, whose
default changes across Triton versions; pinning it here leaves other Triton users' kernels alone."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_dot(dtype: torch.dtype) -> bool:
    """NOTE: Triton 3.9's interpreter stores bf16 as uint16 and multiplies the raw integers in tl.dot.
    Under the interpreter bf16 operands are widened to fp32 first; the widening is exact, so the tile
    equals a bf16 tensor-core product with fp32 accumulation. Compiled kernels never take this branch."""
    return interpreting() and dtype == torch.bfloat16


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes a `dtype` result in.

    NOTE: Triton 3.9's interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest even), which
    doubles and biases the rounding error; under the interpreter bf16 results are written in fp32 and
    rounded by torch (nearest even), the same numbers a GPU produces."""
    return torch.float32 if upcast_dot(dtype) else dtype


def divisibility_attrs(sig: dict, divisible: tuple[str, ...]) -> dict:
    """`tt.divisibility=16` on every pointer and on the integer arguments named in `divisible`: what the JIT
    specializes for 16-byte aligned inputs whose sizes are multiples of 16 (every model shape). Without
    these facts loads are not vectorized and loops are not software-pipelined, so an ahead-of-time
    compile without them would check a kernel that never runs."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
            if ty.startswith("*") or name in divisible}
