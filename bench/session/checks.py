"""Error checks recorded rather than asserted, under the test suite's rule (`tests.tolerances.error_bound`):
float64 (or fp32) ground truth; fp32 results within 1e-5 relative; bf16 results within 2x the error of
PyTorch's own program in bf16 + 2e-3. Non-finite values fail."""

from __future__ import annotations

import torch

from tests.tolerances import error_bound, relative_error


def judge(x, truth, same, dtype) -> dict:
    """{err, bound, ok} of one quantity; `same` is PyTorch's same-dtype result (needed for half dtypes)."""
    x, truth = x.detach(), truth.detach()
    err = relative_error(x, truth)
    bound = error_bound(truth, dtype=dtype, same_dtype=None if same is None else same.detach())
    return {"err": err, "bound": bound, "ok": bool(torch.isfinite(x).all()) and err <= bound}


def summarize(row: dict, quantities: dict) -> None:
    """The row's verdict and its worst quantity (largest err / bound); every quantity stays in the JSON."""
    worst = max(quantities, key=lambda k: quantities[k]["err"] / max(quantities[k]["bound"], 1e-30))
    row.update(ok=all(q["ok"] for q in quantities.values()), worst=worst, err=quantities[worst]["err"],
               bound=quantities[worst]["bound"], quantities=quantities)
