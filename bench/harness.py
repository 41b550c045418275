"""Shared benchmark machinery: device, shape registry, timing, peak memory, result files.

Timing: pytest-benchmark's `pedantic` with a CUDA synchronize at the end of every call on GPU.
Peak memory: on CUDA `max_memory_allocated` above the live memory before the call; on CPU the
case runs in a fresh subprocess and reports its peak RSS (VmHWM, reset once the case is built) above
its RSS just before the call, so neither another case's allocations nor the case's own setup (input
construction, a warmup step, a compile) count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class HeadShape:
    N: int
    H: int
    V: int
    dtype: str = "bfloat16"

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    def flops(self, mode: str, provider: str = "") -> float:
        """Counted FLOPs in units of one 2NHV GEMM (`HEAD_GEMMS`): forward 1; a 2-pass head's backward
        (recompute + dH + dW) 3, forward + backward 4; the bare GEMMs and the pair-fused head (gradients formed
        from the forward's logits) 3 for forward + backward."""
        return HEAD_GEMMS.get((provider, mode), HEAD_GEMMS[("", mode)]) * 2.0 * self.N * self.H * self.V


HEAD_GEMMS = {("", "fwd"): 1, ("", "bwd"): 3, ("", "fwd_bwd"): 4, ("gemm", "bwd"): 2, ("gemm", "fwd_bwd"): 3,
              ("fastpo-pair-fused", "fwd_bwd"): 3}
"""(provider, mode) -> GEMMs of 2NHV the provider performs; ("", mode) is a 2-pass head."""


# One registry for every head benchmark. CPU shapes run in CI in seconds; GPU shapes are the model
# shapes of the targets (H=4096 with the Llama-3 / Liger SM90 / Qwen2.5 vocabularies).
HEAD_SHAPES = {
    "cpu": {
        "cpu-small": HeadShape(N=512, H=128, V=4096, dtype="float32"),
        "cpu-memory": HeadShape(N=4096, H=256, V=32000, dtype="float32"),
    },
    "cuda": {
        "llama3-8k": HeadShape(N=8192, H=4096, V=128256),
        "sm90-8k": HeadShape(N=8192, H=4096, V=131072),
        "qwen-8k": HeadShape(N=8192, H=4096, V=151936),
        "sm90-16k": HeadShape(N=16384, H=4096, V=131072),
        "sm90-32k": HeadShape(N=32768, H=4096, V=131072),
    },
}


def head_inputs(shape: HeadShape, device=DEVICE, requires_grad=True, seed=0):
    """randn hidden states, W / sqrt(H) and uniform targets, drawn on `device` (model-size inputs drawn on the
    host would cost seconds of every GPU run)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(shape.N, shape.H, generator=g, device=device).to(shape.torch_dtype)
    weight = (torch.randn(shape.V, shape.H, generator=g, device=device) / shape.H**0.5).to(shape.torch_dtype)
    targets = torch.randint(0, shape.V, (shape.N,), generator=g, device=device)
    return hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), targets


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


SMOKE = False
"""Set by bench/conftest.py for the smoke pass (the default `python -m pytest`): one round, no warmup."""


def run_pedantic(benchmark, fn, setup=None, rounds=None):
    """Time `fn` (synchronized) with a fixed warmup; returns fn's last result. In the smoke pass one round
    and no warmup: enough to show that the benchmark runs, too little to measure anything."""
    rounds = rounds or (20 if DEVICE == "cuda" else 3)
    warmup_rounds = 1
    if SMOKE:
        rounds, warmup_rounds = 1, 0

    def timed(*args):
        out = fn(*args)
        synchronize()
        return out

    def make_args():
        return (setup(),), {}

    if setup is None:
        return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return benchmark.pedantic(timed, setup=make_args, rounds=rounds, warmup_rounds=warmup_rounds)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(module: str, func: str, kwargs: dict) -> int:
    """Peak memory of `module.func(**kwargs)` above what was live before it.

    `func(**kwargs)` must return a zero-argument callable (inputs built, any warmup done): the callable
    is the measured region. CUDA: measured in this process. CPU: in a fresh subprocess (peak RSS)."""
    if DEVICE == "cuda":
        fn = getattr(__import__(module, fromlist=[func]), func)(**kwargs)
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated() - base
    code = (
        "import json, sys; from bench.harness import _child_peak; "
        f"print(json.dumps(_child_peak({module!r}, {func!r}, json.loads(sys.argv[1]))))"
    )
    # A fixed mmap threshold makes glibc return every large block on free (its default threshold grows
    # up to 32 MiB and then keeps freed tensors in the heap), so peak RSS tracks live tensor memory.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_repo_root(), os.environ.get("PYTHONPATH", "")]),
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                          env=env, check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {module}.{func} failed:\n{proc.stderr[-3000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1]))


def _child_peak(module: str, func: str, kwargs: dict) -> int:
    fn = getattr(__import__(module, fromlist=[func]), func)(**kwargs)
    _reset_peak_rss()
    base = _rss_bytes()
    fn()
    return max(0, _peak_rss_bytes() - base)


def _reset_peak_rss():
    """Set VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise RuntimeError(f"cannot reset the peak RSS of the memory probe ({e}); a Linux /proc is needed") from e


def _peak_rss_bytes() -> int:
    """VmHWM of this process image. (ru_maxrss would not do: across fork + exec Linux carries the
    parent's high-water mark into the child's.)"""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"
