"""The log-prob head, side by side: time (fwd, bwd, fwd+bwd) and peak memory, per provider.

Providers compute the same per-token log-probs (or NLL, its negation) of the targets from hidden
states and the LM-head weight; `gemm` is the bare LM-head GEMMs, the roofline (forward: z = h W^T;
fwd+bwd: that plus dX = G W and dW = G^T h). Each provider is skipped, with the reason, where it does
not install or run. Shapes come from `bench.harness.HEAD_SHAPES` for the current device.

Apple's Cut Cross-Entropy (`pip install cut-cross-entropy`, PyPI 25.1.1) enters as three providers of
`linear_cross_entropy(e, c, targets, reduction="none")`, negated:

  cce                its Triton kernels (CUDA only) with the default gradient filter `filter_eps="high"`
  cce-nofilter       the same kernels with `filter_eps=None`. The filter skips gradient tiles whose entries
                     are all below 2^-12 (bf16); with these random inputs (logits ~ N(0, 1) over 128k
                     columns) that is most tiles without a target, so the filtered figure flatters CCE.
  cce-torch-compile  its `impl="torch_compile"`: materialized logits under torch.compile; runs on CPU.

Two more providers are not per-token heads of the same contract but the fastest paths a preference loss
takes through the head:

  fastpo-pair-fused  sigmoid DPO (reference-free) over 8 pairs of N/16-token responses on the pair-fused
                     path (`impl="auto"`: the Triton row kernels on CUDA): a scalar loss whose gradients are
                     formed in the forward, 6NHV for forward + backward (no separate backward to time)
  liger-flce         Liger's Triton fused linear cross-entropy with per-token output (`reduction="none"`), the
                     Liger head that runs on any CUDA GPU (`liger-scaled-ce` dispatches to Liger's CuTe-DSL
                     kernel on SM90, which needs nvidia-cutlass-dsl)
"""

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import fastpo
from bench.harness import DEVICE, HEAD_SHAPES, head_inputs, peak_memory_bytes, run_pedantic, synchronize
from fastpo.reference import token_logprobs_ref


def _liger(hidden, weight, targets):
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

    return -LigerFusedLinearScaledCrossEntropyFunction.apply(hidden, weight, targets)


def _trl(hidden, weight, targets):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ())[0]


def _cce(impl, **kwargs):
    def logprobs(hidden, weight, targets):
        from cut_cross_entropy import linear_cross_entropy

        return -linear_cross_entropy(hidden, weight, targets, reduction="none", impl=impl, **kwargs)

    return logprobs


@functools.lru_cache
def _compiled_ref():
    return torch.compile(functools.partial(token_logprobs_ref, upcast=False))


PAIRS = 8


def _pair_fused(hidden, weight, targets):
    """Sigmoid DPO (no reference) over PAIRS pairs; rows [0, PAIRS) chosen, [PAIRS, 2 PAIRS) rejected."""
    from fastpo.losses import fused_linear_preference_loss

    rows = 2 * PAIRS
    return fused_linear_preference_loss(hidden.view(rows, -1, hidden.shape[-1]), weight, targets.view(rows, -1),
                                        path="pair_fused").loss


def _liger_flce(hidden, weight, targets):
    """Per-token log-probs from Liger's Triton FLCE (its defaults otherwise, e.g. dW accumulated in W's dtype)."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    return -LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100, 0.0, 0.0, "none")[0]


def _gemm(hidden, weight, targets):
    """Roofline: the logits GEMM alone; its backward is the dX and dW GEMMs."""
    return F.linear(hidden, weight)


PROVIDERS = {
    "fastpo-triton": lambda h, w, y: fastpo.token_logprobs(h, w, y, impl="triton"),
    "fastpo-torch": lambda h, w, y: fastpo.token_logprobs(h, w, y, impl="torch"),
    "fastpo-pair-fused": _pair_fused,
    "naive": lambda h, w, y: token_logprobs_ref(h, w, y, upcast=False),
    "torch-compile": lambda h, w, y: _compiled_ref()(h, w, y),
    "linear-cross-entropy": lambda h, w, y: -F.linear_cross_entropy(h, w, y, reduction="none"),
    "liger-scaled-ce": _liger,
    "liger-flce": _liger_flce,
    "trl-chunked": _trl,
    "cce": _cce("cce"),
    "cce-nofilter": _cce("cce", filter_eps=None),
    "cce-torch-compile": _cce("torch_compile"),
    "gemm": _gemm,
}
# Where a provider cannot give a meaningful figure on this device, say why instead of timing it.
SKIP_ON_CPU = {
    "fastpo-triton": "Triton on CPU is the interpreter: a correctness tool, not a benchmark",
    "cce": "CCE's Triton kernels need CUDA (on CPU: '0 active drivers')",
    "cce-nofilter": "CCE's Triton kernels need CUDA (on CPU: '0 active drivers')",
    "liger-flce": "Liger's Triton kernels need CUDA",
}
MODULES = {"liger-scaled-ce": "liger_kernel", "liger-flce": "liger_kernel", "trl-chunked": "trl", "cce": "cut_cross_entropy",
           "cce-nofilter": "cut_cross_entropy", "cce-torch-compile": "cut_cross_entropy"}
"""Optional baselines: the module each needs (skipped with the reason where it does not import)."""
COMPILED = {"torch-compile", "cce-torch-compile"}
"""Providers that compile on their first call (warmed up before a memory probe)."""
MODES = ["fwd", "bwd", "fwd_bwd"]
SHAPES = HEAD_SHAPES[DEVICE]
TIME_SHAPES = [s for s in SHAPES if s != "cpu-memory"]


def _skip_reason(provider, mode=None):
    if DEVICE == "cpu" and provider in SKIP_ON_CPU:
        return SKIP_ON_CPU[provider]
    if provider == "fastpo-pair-fused" and mode == "bwd":
        return "the pair-fused head forms its gradients in the forward: only fwd and fwd_bwd are timed"
    if provider == "liger-scaled-ce" and DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        if importlib.util.find_spec("cutlass") is None:
            return "on SM90 Liger dispatches to its CuTe-DSL kernel, which needs nvidia-cutlass-dsl (not installed)"
    if provider == "linear-cross-entropy" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    module = MODULES.get(provider)
    if module is not None:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed"
    return None


def _upstream(out):
    """A random upstream gradient shaped like `out`, drawn once per shape: the timed region never pays for
    drawing it (for `gemm` that is [N, V] values, comparable to the GEMMs themselves at CPU shapes)."""
    return _random_like(tuple(out.shape), out.dtype, str(out.device))


@functools.lru_cache(maxsize=1)
def _random_like(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(1)
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def _step(provider, mode):
    fn = PROVIDERS[provider]

    def forward(inputs):
        hidden, weight, targets = inputs
        if mode == "fwd":
            with torch.no_grad():
                return fn(hidden, weight, targets)
        return fn(hidden, weight, targets)

    def backward(state):
        out, grad = state
        out.backward(grad)

    def fwd_bwd(inputs):
        out = forward(inputs)
        out.backward(_upstream(out))

    return forward, backward, fwd_bwd


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape_name", TIME_SHAPES)
def bench_head_time(benchmark, record, shape_name, provider, mode):
    reason = _skip_reason(provider, mode)
    if reason:
        pytest.skip(reason)
    shape = SHAPES[shape_name]
    forward, backward, fwd_bwd = _step(provider, mode)
    inputs = head_inputs(shape)

    def fresh():
        for t in inputs[:2]:
            t.grad = None
        return inputs

    if mode == "bwd":

        def setup():
            out = forward(fresh())
            synchronize()
            return out, _upstream(out)

        run_pedantic(benchmark, backward, setup=setup)
    else:
        run_pedantic(benchmark, forward if mode == "fwd" else fwd_bwd, setup=fresh)
    median = benchmark.stats.stats.median
    record(benchmark, shape=shape_name, provider=provider, mode=mode, N=shape.N, H=shape.H, V=shape.V,
           dtype=shape.dtype, tokens_per_s=shape.N / median, tflops=shape.flops(mode, provider) / median / 1e12)


def head_case(provider, N, H, V, dtype):
    """Inputs built (and, on CUDA or for a compiled provider, one untimed fwd + bwd run to compile and
    autotune, gradients cleared): returns the measured region (fwd + bwd with a random upstream)."""
    from bench.harness import HeadShape

    inputs = head_inputs(HeadShape(N, H, V, dtype))
    _, _, fwd_bwd = _step(provider, "fwd_bwd")
    if DEVICE == "cuda" or provider in COMPILED:
        fwd_bwd(inputs)
        for t in inputs[:2]:
            t.grad = None
        synchronize()
    return lambda: fwd_bwd(inputs)


MEMORY_SHAPE = "cpu-memory" if DEVICE == "cpu" else "sm90-8k"


@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_head_peak_memory(record, provider):
    """Peak memory of one fwd+bwd above the inputs; on CPU at N=4096, H=256, V=32000 (fp32), where the
    naive program's [N, V] logits alone take 524 MB."""
    reason = _skip_reason(provider)
    if reason:
        pytest.skip(reason)
    shape = SHAPES[MEMORY_SHAPE]
    peak = peak_memory_bytes("bench.bench_logprobs", "head_case", dict(provider=provider, N=shape.N, H=shape.H,
                                                                        V=shape.V, dtype=shape.dtype))
    record(shape=MEMORY_SHAPE, provider=provider, mode="fwd_bwd", N=shape.N, H=shape.H, V=shape.V,
           dtype=shape.dtype, peak_mb=peak / 2**20, logits_fp32_mb=4 * shape.N * shape.V / 2**20)
