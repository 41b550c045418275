"""Stage 3, dpo: the fused DPO loss at 8 pairs x 1024 positions (the first 256 of each row prompt, ignored),
H=4096, V=128256, bf16, with a reference model given by its hidden states and head: forward + backward time,
tokens/s and peak memory, per provider of `bench.bench_losses.PROVIDERS` (one definition each): fastpo's
pair-fused and generic paths, Liger's `LigerFusedLinearDPOLoss`, TRL's chunked head + the DPO loss, and the
naive materialized-logits program last (about 40 GB at this shape). Inputs: `bench_losses.dpo_inputs`.
"""

from __future__ import annotations

from bench import bench_losses as loss_bench
from bench.session.measure import time_fn

PROVIDERS = ("fastpo-pair-fused", "liger-dpo", "trl-chunked", "fastpo-generic", "naive")
"""Most valuable first: the goal compares pair-fused with Liger."""
SHAPES = {
    "cuda": ("llama3-8pairs", loss_bench.DPOShape(B=8, T=1024, H=4096, V=128256, dtype="bfloat16")),
    "dry": ("dry-tiny", loss_bench.DPOShape(B=2, T=32, H=32, V=256)),
}
TIMING = {"cuda": dict(warmup=1, max_reps=5, budget_s=5.0), "dry": dict(warmup=1, max_reps=2, budget_s=0.5)}


def plan(dry: bool) -> dict:
    key = "dry" if dry else "cuda"
    name, shape = SHAPES[key]
    return {"shape_name": name, "shape": shape, "providers": PROVIDERS, "timing": TIMING[key]}


def run(rec, plan: dict) -> None:
    shape = plan["shape"]
    inputs = loss_bench.dpo_inputs(shape)

    def clear_grads():
        inputs[0].grad = inputs[1].grad = None

    for provider in plan["providers"]:
        if rec.out_of_time(provider):
            return
        reason = loss_bench._skip_reason(provider)
        with rec.case(test=f"dpo[{plan['shape_name']}-{provider}]", shape=plan["shape_name"], provider=provider,
                      mode="fwd_bwd", pairs=shape.B, T=shape.T, H=shape.H, V=shape.V, dtype=shape.dtype) as row:
            if reason:
                row["skipped"] = reason
            else:
                step = loss_bench._step(provider, "fwd_bwd")
                timing = time_fn(lambda step=step: step(inputs), setup=clear_grads, deadline=rec.deadline,
                                 **plan["timing"])
                row.update(timing, tokens_per_s=shape.N / (timing["median_ms"] / 1e3))
        clear_grads()
