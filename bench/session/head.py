"""Stage 2, head: the LM head at N=8192, H=4096, V=128256 (bf16), fastpo's paths and the baselines against
the bare GEMMs: median time, TFLOP/s on the counted FLOPs, x_roofline and peak memory.

Providers are `bench.bench_logprobs.PROVIDERS` (one definition each: `gemm`, `fastpo-triton`,
`fastpo-pair-fused`, `trl-chunked`, `liger-flce`, `cce`, `cce-nofilter`, `linear-cross-entropy`,
`liger-scaled-ce`; see that module for what each computes).

Counted FLOPs: `bench.harness.HEAD_GEMMS` (units of 2NHV: forward GEMM 1, the 3 GEMMs of forward + backward 3,
the 2-pass heads 4, pair-fused 3). `x_roofline` is a time ratio against `gemm` in the same mode: the generic
and pair-fused heads against the 3 GEMMs, the no-grad reference forward against the forward GEMM. Inputs:
`bench.harness.head_inputs` (randn hidden, W / sqrt(H), uniform targets), built once.
"""

from __future__ import annotations

import torch

from bench import bench_logprobs as head_bench
from bench.harness import HEAD_GEMMS, HEAD_SHAPES, HeadShape, head_inputs
from bench.session.measure import time_fn
from fastpo.kernels._compile import interpreting

# (provider, mode), most valuable first: the roofline, fastpo's three paths, then the baselines, TRL's head
# (the design to beat) first.
CASES = (
    ("gemm", "fwd"), ("gemm", "fwd_bwd"),
    ("fastpo-triton", "fwd_bwd"), ("fastpo-pair-fused", "fwd_bwd"), ("fastpo-triton", "fwd"),
    ("trl-chunked", "fwd_bwd"), ("liger-flce", "fwd_bwd"), ("cce", "fwd_bwd"),
    ("linear-cross-entropy", "fwd_bwd"), ("liger-scaled-ce", "fwd_bwd"), ("cce-nofilter", "fwd_bwd"),
)  # fmt: skip
SHAPES = {"cuda": ("llama3-8k", HEAD_SHAPES["cuda"]["llama3-8k"]),
          "dry": ("dry-tiny", HeadShape(N=32, H=32, V=256, dtype="float32"))}
TIMING = {"cuda": dict(warmup=1, max_reps=10, budget_s=6.0), "dry": dict(warmup=1, max_reps=2, budget_s=0.5)}


def plan(dry: bool) -> dict:
    key = "dry" if dry else "cuda"
    name, shape = SHAPES[key]
    return {"shape_name": name, "shape": shape, "cases": CASES, "timing": TIMING[key]}


def skip_reason(provider: str, mode: str | None = None) -> str | None:
    if provider == "fastpo-triton" and interpreting():
        return None
    return head_bench._skip_reason(provider, mode)


def call(provider: str, mode: str, inputs):
    """The measured region: forward (no grad) or forward + backward with a fixed random upstream gradient."""
    fn = head_bench.PROVIDERS[provider]
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

    for provider, mode in plan["cases"]:
        if rec.out_of_time(f"{provider}/{mode}"):
            return
        reason = skip_reason(provider, mode)
        with rec.case(test=f"head[{plan['shape_name']}-{provider}-{mode}]", shape=plan["shape_name"], provider=provider,
                      mode=mode, N=shape.N, H=shape.H, V=shape.V, dtype=shape.dtype) as row:
            if reason:
                row["skipped"] = reason
            else:
                timing = time_fn(call(provider, mode, inputs), setup=clear_grads, deadline=rec.deadline,
                                 **plan["timing"])
                gemms = HEAD_GEMMS.get((provider, mode), HEAD_GEMMS[("", mode)])
                row.update(timing, counted_flops=f"{2 * gemms}NHV",
                           tflops=shape.flops(mode, provider) / (timing["median_ms"] / 1e3) / 1e12)
        clear_grads()
