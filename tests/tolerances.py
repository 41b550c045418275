"""One tolerance table for every parity test (STYLE G5).

    err(x) = max |x - truth| / max(max |truth|, 1)      error relative to the reference's scale

- fp32 (and float64) results: err(fastpo) <= RTOL[dtype] against a float64 ground truth.
- bf16 / fp16 results: err(fastpo) <= 2 * err(PyTorch computing in the same dtype) + ATOL[dtype],
  i.e. no worse than the ordinary PyTorch program in that dtype, with a small floor for cases where
  PyTorch happens to be almost exact.
NaN or inf anywhere fails.
"""

import torch

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ATOL = {torch.bfloat16: 2e-3, torch.float16: 5e-4}


def relative_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    x, truth = x.double(), truth.double()
    return ((x - truth).abs().max() / truth.abs().max().clamp_min(1.0)).item() if truth.numel() else 0.0


def _where(x, truth):
    i = int((x.double() - truth.double()).abs().flatten().argmax())
    return f"worst flat index {i}: got {x.flatten()[i].item():.6g}, want {truth.flatten()[i].item():.6g}"


def error_bound(truth, *, dtype, same_dtype=None) -> float:
    """The largest `relative_error` a result computed from `dtype` inputs may have against `truth`: RTOL for
    fp32 / float64; for half dtypes 2x the error of `same_dtype` (PyTorch's own result in that dtype) + ATOL.
    Also used by the GPU session (`bench.session.checks`), which records errors instead of asserting."""
    if dtype in RTOL:
        return RTOL[dtype]
    if same_dtype is None:
        raise ValueError(f"{dtype} inputs need PyTorch's same-dtype result")
    return 2 * relative_error(same_dtype, truth) + ATOL[dtype]


def assert_parity(name, x, truth, *, dtype, same_dtype=None):
    """`x`, computed from inputs of `dtype`, against the ground truth `truth`. For half `dtype`,
    `same_dtype` is the ordinary PyTorch result computed from the same inputs in that dtype."""
    assert x.shape == truth.shape, f"{name}: shape {tuple(x.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = relative_error(x, truth)
    assert dtype in RTOL or same_dtype is not None, f"{name}: {dtype} inputs need PyTorch's same-dtype result"
    bound = error_bound(truth, dtype=dtype, same_dtype=same_dtype)
    why = f"> {bound:.1g}" if dtype in RTOL else f"> bound {bound:.3g} (2x PyTorch {dtype})"
    assert err <= bound, f"{name}: rel. error {err:.3g} {why}; {_where(x, truth)}"
