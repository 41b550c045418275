"""Timing and peak memory of one case, bounded by a repetition count, a time budget and the stage deadline.

Time: CUDA events around each call (host clock on CPU); warm-up calls first (compilation, autotuning and
allocator growth stay out of the figures but inside the stage's cap); the median over the timed calls,
with p20 / p80. `setup` runs before every call, untimed (clearing gradients, as `pytest bench/` does).
Peak memory (CUDA only): `max_memory_allocated` on the first timed call, above what was live just before it
(the protocol of `bench.harness.peak_memory_bytes`). A CPU dry run times its tiny cases only to exercise
the code; its figures mean nothing.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench import harness


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _peak_begin() -> int:
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_end(base: int) -> float:
    return max(0, torch.cuda.max_memory_allocated() - base) / 2**20


def _one_call(fn, cuda: bool) -> float:
    """Seconds of one synchronized call."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def time_fn(fn, *, setup=None, warmup: int = 1, max_reps: int = 10, budget_s: float = 10.0,
            deadline: float | None = None) -> dict:
    """`fn()` timed: {median_ms, p20_ms, p80_ms, reps, peak_mb}. At least one timed call is made; further calls
    stop at `max_reps`, after `budget_s` of timed calls, or at `deadline` (epoch seconds)."""
    cuda = harness.DEVICE == "cuda"
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
        _sync(cuda)
    stop = time.time() + budget_s
    if deadline is not None:
        stop = min(stop, deadline)
    times, peak_mb = [], None
    while not times or (len(times) < max_reps and time.time() < stop):
        if setup is not None:
            setup()
        _sync(cuda)
        base = _peak_begin() if cuda and not times else None
        times.append(_one_call(fn, cuda))
        if base is not None:
            peak_mb = _peak_end(base)
    ms = [t * 1e3 for t in times]
    return {"median_ms": statistics.median(ms), "p20_ms": _quantile(ms, 0.2), "p80_ms": _quantile(ms, 0.8),
            "reps": len(ms), "peak_mb": peak_mb}
