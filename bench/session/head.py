"""Stage 2, head: the LM head at N=8192, H=4096, V=128256 (bf16), fastpo's paths and the baselines against
the bare GEMMs: median time, TFLOP/s on the counted FLOPs, x_roofline and peak memory.

Providers are `bench.bench_logprobs.PROVIDERS` (one definition each: `gemm`, `fastpo-triton`, `trl-chunked`,
`cce`, `cce-nofilter`, `linear-cross-entropy`, `liger-scaled-ce`) plus two that only this stage times:

    fastpo-pair-fused  sigmoid DPO (reference-free) over 8 pairs of N/16-token responses on the pair-fused path
                       (`impl="auto"`: the Triton row kernels on CUDA): a scalar loss, 6NHV for forward + backward
    liger-flce         Liger's Triton fused linear cross-entropy with per-token output (`reduction="none"`),
                       the Liger head that runs on any CUDA GPU; `liger-scaled-ce` needs Liger's SM90 CuTe-DSL
                       kernel (nvidia-cutlass-dsl) on Hopper

Counted FLOPs (units of 2NHV): forward GEMM 1, the 3 GEMMs of forward + backward 3, the 2-pass heads 4 (8NHV:
fastpo generic and every baseline), pair-fused 3. `x_roofline` is a time ratio against `gemm` in the same
mode: the generic and pair-fused heads against the 3 GEMMs, the no-grad reference forward against the
forward GEMM. Inputs: `bench.harness.head_inputs` (randn hidden, W / sqrt(H), uniform targets), built once.
"""

from __future__ import annotations

import importlib.util

import torch

from bench import bench_logprobs as head_bench
from bench.harness import DEVICE, HEAD_SHAPES, HeadShape, head_inputs
from bench.session.measure import time_fn
from fastpo.kernels._compile import interpreting

PAIRS = 8


def pair_fused_loss(hidden, weight, targets):
    """Sigmoid DPO (no reference) over PAIRS pairs; rows [0, PAIRS) chosen, [PAIRS, 2 PAIRS) rejected."""
    from fastpo.losses import fused_linear_preference_loss

    rows = 2 * PAIRS
    return fused_linear_preference_loss(hidden.view(rows, -1, hidden.shape[-1]), weight, targets.view(rows, -1),
                                        path="pair_fused").loss


def liger_flce(hidden, weight, targets):
    """Per-token log-probs from Liger's Triton FLCE (its defaults otherwise, e.g. dW accumulated in W's dtype)."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    return -LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100, 0.0, 0.0, "none")[0]


SESSION_PROVIDERS = {"fastpo-pair-fused": pair_fused_loss, "liger-flce": liger_flce}
# (provider, mode, counted FLOPs in units of 2NHV), most valuable first: the roofline, fastpo's three paths,
# then the baselines, TRL's head (the design to beat) first.
CASES = (
    ("gemm", "fwd", 1), ("gemm", "fwd_bwd", 3),
    ("fastpo-triton", "fwd_bwd", 4), ("fastpo-pair-fused", "fwd_bwd", 3), ("fastpo-triton", "fwd", 1),
    ("trl-chunked", "fwd_bwd", 4), ("liger-flce", "fwd_bwd", 4), ("cce", "fwd_bwd", 4),
    ("linear-cross-entropy", "fwd_bwd", 4), ("liger-scaled-ce", "fwd_bwd", 4), ("cce-nofilter", "fwd_bwd", 4),
)  # fmt: skip
SHAPES = {"cuda": ("llama3-8k", HEAD_SHAPES["cuda"]["llama3-8k"]),
          "dry": ("dry-tiny", HeadShape(N=32, H=32, V=256, dtype="float32"))}
TIMING = {"cuda": dict(warmup=1, max_reps=10, budget_s=6.0), "dry": dict(warmup=1, max_reps=2, budget_s=0.5)}


def plan(dry: bool) -> dict:
    key = "dry" if dry else "cuda"
    name, shape = SHAPES[key]
    return {"shape_name": name, "shape": shape, "cases": CASES, "timing": TIMING[key]}


def skip_reason(provider: str) -> str | None:
    if provider == "liger-flce":
        if DEVICE != "cuda":
            return "Liger's Triton kernels need CUDA"
        return None if importlib.util.find_spec("liger_kernel") else "liger_kernel is not installed"
    if provider == "liger-scaled-ce" and DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        if importlib.util.find_spec("cutlass") is None:
            return "on SM90 Liger dispatches to its CuTe-DSL kernel, which needs nvidia-cutlass-dsl (not installed)"
    if provider in SESSION_PROVIDERS or (provider == "fastpo-triton" and interpreting()):
        return None
    return head_bench._skip_reason(provider)


def call(provider: str, mode: str, inputs):
    """The measured region: forward (no grad) or forward + backward with a fixed random upstream gradient."""
    fn = SESSION_PROVIDERS.get(provider) or head_bench.PROVIDERS[provider]
    hidden, weight, targets = inputs

    def forward():
        with torch.no_grad():
            return fn(hidden, weight, targets)

    def fwd_bwd():
        out = fn(hidden, weight, targets)
        out.backward(head_bench._upstream(out))

    return forward if mode == "fwd" else fwd_bwd


def run(rec, plan: dict) -> None:
    shape: HeadShape = plan["shape"]
    inputs = head_inputs(shape)

    def clear_grads():
        inputs[0].grad = inputs[1].grad = None

    for provider, mode, units in plan["cases"]:
        if rec.out_of_time(f"{provider}/{mode}"):
            return
        reason = skip_reason(provider)
        with rec.case(test=f"head[{plan['shape_name']}-{provider}-{mode}]", shape=plan["shape_name"], provider=provider,
                      mode=mode, N=shape.N, H=shape.H, V=shape.V, dtype=shape.dtype) as row:
            if reason:
                row["skipped"] = reason
            else:
                timing = time_fn(call(provider, mode, inputs), setup=clear_grads, deadline=rec.deadline,
                                 **plan["timing"])
                row.update(timing, counted_flops=f"{2 * units}NHV",
                           tflops=units * shape.flops("fwd") / (timing["median_ms"] / 1e3) / 1e12)
        clear_grads()
