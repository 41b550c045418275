"""Where the head's time goes: per-kernel GPU time of one step, from `torch.profiler`.

    python -m bench.profile_head [--shape sm90-8k] [--path generic|pair_fused|reference] [--out FILE]

`generic`: `fastpo.token_logprobs` fwd + bwd with a random upstream gradient (Triton head kernels + cuBLAS
dH/dW); `pair_fused`: `fused_linear_preference_loss` (sigmoid DPO, 8 pairs per step at the shape's N) fwd + bwd;
`reference`: the forward-only pass. Prints the kernels sorted by total GPU time, their share of the step, and
the step's fraction of the roofline (the bare GEMMs' counted FLOPs at the measured GEMM throughput).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fastpo
from bench.harness import HEAD_SHAPES, head_inputs


def _step(path: str, hidden, weight, targets):
    if path == "reference":
        with torch.no_grad():
            fastpo.token_logprobs(hidden, weight, targets)
        return
    if path == "generic":
        logp = fastpo.token_logprobs(hidden, weight, targets)
        logp.backward(torch.randn_like(logp))
        return
    from fastpo.losses import fused_linear_preference_loss

    pairs = 8
    out = fused_linear_preference_loss(hidden.view(2 * pairs, -1, hidden.shape[-1]), weight,
                                       targets.view(2 * pairs, -1), loss_type="sigmoid", path="pair_fused")
    out.loss.backward()


def _gemm_seconds(shape, mode: str) -> float:
    """Measured time of the bare GEMMs of `mode` (forward, or forward + dX + dW)."""
    hidden, weight, _ = head_inputs(shape)
    g = torch.randn(shape.N, shape.V, device=hidden.device, dtype=hidden.dtype)

    def run():
        F.linear(hidden, weight)
        if mode != "fwd":
            g @ weight
            g.T @ hidden

    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10 / 1e3


def profile(shape_name: str, path: str) -> str:
    shape = HEAD_SHAPES["cuda"][shape_name]
    hidden, weight, targets = head_inputs(shape)
    for _ in range(3):  # compile and warm up
        _step(path, hidden, weight, targets)
        hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _step(path, hidden, weight, targets)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    mode = "fwd" if path == "reference" else "fwd_bwd"
    roofline = _gemm_seconds(shape, mode)
    lines = [f"{path} at {shape_name} (N={shape.N}, H={shape.H}, V={shape.V}, {shape.dtype}) on "
             f"{torch.cuda.get_device_name()}: GPU time {total / 1e3:.3f} ms; bare GEMMs ({mode}) "
             f"{roofline * 1e3:.3f} ms; ratio {total / 1e6 / roofline:.3f}"]
    for e in sorted(events, key=lambda e: -e.device_time_total)[:15]:
        lines.append(f"  {e.device_time_total / 1e3:9.3f} ms  {100 * e.device_time_total / total:5.1f}%  "
                     f"x{e.count:<4d} {e.key[:90]}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="sm90-8k", choices=list(HEAD_SHAPES["cuda"]))
    parser.add_argument("--path", default="generic", choices=["generic", "pair_fused", "reference"])
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.profile_head profiles GPU kernels; no CUDA device is available")
    report = profile(args.shape, args.path)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n\n")


if __name__ == "__main__":
    main()
