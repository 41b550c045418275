"""The goals each stage is measured against: measured value, goal, and pass / miss.

Goals are reported, never asserted: a miss is a finding, not a failed session. A verdict is given only for a
full-size run on a GPU; a dry run (or any run off CUDA) shows its values with "n/a", since they are not GPU
figures. Time ratios come from `bench.report.add_ratios` (the same `x_roofline` as `pytest bench/`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bench import report


@dataclass(frozen=True)
class Target:
    stage: str
    name: str
    op: str
    """"<=" or ">=": how the measured value must compare with `goal`."""
    goal: float
    measure: Callable[[list[dict]], float | None]
    """rows of the stage -> the measured value (None where the rows needed are missing)."""


def _timed(rows, provider, mode=None):
    """The timed row of `provider` (and `mode`), with the report's ratios added."""
    for r in report.add_ratios(rows):
        if r.get("provider") == provider and (mode is None or r.get("mode") == mode) and "median_ms" in r:
            return r
    return None


def x_roofline(provider: str, mode: str):
    def measure(rows):
        r = _timed(rows, provider, mode)
        return None if r is None else r.get("x_roofline")

    return measure


def ratio(field: str, numerator: str, denominator: str):
    """rows -> row(numerator)[field] / row(denominator)[field]."""

    def measure(rows):
        num, den = _timed(rows, numerator), _timed(rows, denominator)
        if num is None or den is None or not num.get(field) or not den.get(field):
            return None
        return num[field] / den[field]

    return measure


def fraction_ok(rows):
    """Share of checked cases within their bound (a case that raised counts as failed)."""
    checked = [r for r in rows if "ok" in r or "error" in r]
    return sum(bool(r.get("ok")) for r in checked) / len(checked) if checked else None


TARGETS = (
    Target("parity", "compiled kernels within the test suite's error bound (share of cases)", ">=", 1.0, fraction_ok),
    Target("head", "generic head fwd+bwd / bare 3 GEMMs (6NHV)", "<=", 1.35, x_roofline("fastpo-triton", "fwd_bwd")),
    Target("head", "pair-fused head fwd+bwd / bare 3 GEMMs (6NHV)", "<=", 1.15,
           x_roofline("fastpo-pair-fused", "fwd_bwd")),
    Target("head", "reference forward (no grad) / bare forward GEMM (2NHV)", "<=", 1.10,
           x_roofline("fastpo-triton", "fwd")),
    Target("dpo", "fused DPO speed-up over Liger (Liger time / fastpo pair-fused time)", ">=", 2.0,
           ratio("median_ms", "liger-dpo", "fastpo-pair-fused")),
    Target("train", "train step tokens/s, fastpo / TRL-style padded", ">=", 2.0,
           ratio("tokens_per_s", "fastpo", "naive")),
    Target("train", "train step peak memory, fastpo / TRL-style padded", "<=", 0.6,
           ratio("peak_mb", "fastpo", "naive")),
    Target("attention", "CUDA backends equal to separate forwards (share of cases)", ">=", 1.0, fraction_ok),
)


def verdict(target: Target, value: float | None, meta: dict) -> str:
    if meta.get("device_type") != "cuda" or meta.get("mode") != "run":
        return f"n/a ({meta.get('mode')} on {meta.get('device_type')}: not a GPU figure)"
    if value is None:
        return "not measured"
    met = value <= target.goal if target.op == "<=" else value >= target.goal
    return "pass" if met else "miss"


def evaluate(stage: str, rows: list[dict], meta: dict) -> list[dict]:
    out = []
    for t in TARGETS:
        if t.stage != stage:
            continue
        value = t.measure(rows)
        out.append({"target": t.name, "measured": value, "goal": f"{t.op} {t.goal:g}",
                    "verdict": verdict(t, value, meta)})
    return out
