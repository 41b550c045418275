"""Stage 4, train: one DPO optimizer step (reference forward, policy forward + backward, AdamW) of a ~0.5B
random model, `bench.bench_train.make_step` with its providers `fastpo` (the trainer's own `train_step`:
prefix-shared packing and attention, the fused head on completion rows only, pair-fused for DPO) and
`naive` (TRL-style right-padded [p + y] rows with materialized logits): tokens/s of the separate sequences,
completion tokens/s, and peak memory of one step above the models, the AdamW state and the inputs.

Shape: `bench_train.SHAPES["qwen2-0.5b"]` (Qwen2-0.5B's layout: H=896, 24 layers, V=151936; 8 pairs of
~512 + 2 x ~512 tokens, bf16). Steps are built and run exactly as `pytest bench/` builds and runs them (the random init on
the CPU, a few seconds per model, counts inside the cap). Two untimed steps first: the AdamW state is
allocated and the attention kernels compile.
"""

from __future__ import annotations

import gc

import torch

from bench import bench_train as train_bench
from bench.harness import DEVICE
from bench.session.measure import time_fn

PROVIDERS = ("fastpo", "naive")
GPU_SHAPE = "qwen2-0.5b"
DRY_SHAPE = train_bench.TrainShape(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=1000, pairs=4,
                                   prompt_len=24, response_len=12, max_tokens=128)
TIMING = {"cuda": dict(warmup=2, max_reps=5, budget_s=8.0), "dry": dict(warmup=1, max_reps=2, budget_s=0.5)}


def plan(dry: bool) -> dict:
    if dry:
        return {"shape_name": "dry-tiny", "shape": DRY_SHAPE, "providers": PROVIDERS, "timing": TIMING["dry"]}
    # The CUDA registry of bench_train exists only where CUDA does; elsewhere the plan names it.
    shape = train_bench.SHAPES.get(GPU_SHAPE, f"bench_train.SHAPES[{GPU_SHAPE!r}] (defined when CUDA is present)")
    return {"shape_name": GPU_SHAPE, "shape": shape, "providers": PROVIDERS, "timing": TIMING["cuda"]}


def _release() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def run(rec, plan: dict) -> None:
    shape = plan["shape"]
    if not isinstance(shape, train_bench.TrainShape):
        raise RuntimeError(f"no train shape {plan['shape_name']!r} in bench_train.SHAPES on {DEVICE}")
    counts = train_bench.token_counts(shape)
    for provider in plan["providers"]:
        if rec.out_of_time(provider):
            return
        with rec.case(test=f"train[{plan['shape_name']}-{provider}]", shape=plan["shape_name"], provider=provider,
                      mode="train_step", pairs=shape.pairs, H=shape.hidden, layers=shape.layers, V=shape.vocab,
                      dtype=shape.dtype, **counts) as row:
            step = train_bench.make_step(provider, shape)
            timing = time_fn(step, deadline=rec.deadline, **plan["timing"])
            seconds = timing["median_ms"] / 1e3
            row.update(timing, tokens_per_s=counts["sequence_tokens"] / seconds,
                       completion_tokens_per_s=counts["completion_tokens"] / seconds,
                       processed_tokens=train_bench.processed_tokens(provider, shape, train_bench.make_examples(shape)))
            del step
        _release()
