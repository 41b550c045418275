"""The fused DPO loss, side by side: time (fwd, fwd+bwd) and peak memory, per provider.

Every provider computes the same sigmoid DPO loss of a `[2B, T]` chosen-then-rejected batch (prompt
positions ignored) with a reference model given by its hidden states and LM-head weight:

    fastpo-generic     fused_linear_preference_loss(path="generic"): token_stats + autograd, 8NHV
    fastpo-pair-fused  fused_linear_preference_loss(path="pair_fused"): gradients formed in forward, 6NHV
                       (both with impl="auto": the Triton kernels on CUDA, the chunked torch path on CPU)
    naive              fused_linear_preference_loss_ref(upcast=False): materialized [N, V] logits
    torch-compile      the naive program under torch.compile
    liger-dpo          liger_kernel LigerFusedLinearDPOLoss (compiled=False on CPU)
    trl-chunked        trl.kernels.chunked_logprob head on the completion rows + the DPO loss in PyTorch

A provider that does not install or cannot give a meaningful figure on this device is skipped with the
reason. Peak memory on CPU is the peak RSS of a fresh subprocess above its RSS before the call.

`bench_liger_module_time` compares the drop-in modules as a user swaps them: fastpo's
`FusedLinear{DPO,SimPO}Loss` against Liger-Kernel's `LigerFusedLinear{DPO,SimPO}Loss` with their defaults
(compiled with torch.compile, one pair per chunk), forward + backward, same call, same inputs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from bench.harness import DEVICE, peak_memory_bytes, run_pedantic, synchronize
from fastpo.losses import fused_linear_preference_loss, fused_linear_preference_loss_ref


@dataclass(frozen=True)
class DPOShape:
    B: int  # pairs
    T: int  # positions per row (the first T // 4 are prompt, ignored)
    H: int
    V: int
    dtype: str = "float32"

    @property
    def N(self):
        return 2 * self.B * self.T


SHAPES = {
    "cpu": {"cpu-small": DPOShape(B=4, T=128, H=128, V=4096), "cpu-memory": DPOShape(B=4, T=256, H=128, V=32000)},
    "cuda": {"llama3-8k": DPOShape(B=4, T=1024, H=4096, V=128256, dtype="bfloat16")},
}[DEVICE]
TIME_SHAPE = "cpu-small" if DEVICE == "cpu" else "llama3-8k"
MEMORY_SHAPE = "cpu-memory" if DEVICE == "cpu" else "llama3-8k"


def dpo_inputs(shape: DPOShape, seed=0):
    """Drawn on DEVICE (model-size inputs drawn on the host would cost seconds of every GPU run)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    make = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device=DEVICE) * scale).to(dtype)  # noqa: E731
    hidden = make(2 * shape.B, shape.T, shape.H).requires_grad_()
    weight = make(shape.V, shape.H, scale=shape.H**-0.5).requires_grad_()
    targets = torch.randint(0, shape.V, (2 * shape.B, shape.T), generator=g, device=DEVICE)
    targets[:, : shape.T // 4] = -100
    ref_hidden = make(2 * shape.B, shape.T, shape.H)
    ref_weight = make(shape.V, shape.H, scale=shape.H**-0.5)
    return hidden, weight, targets, ref_hidden, ref_weight


def _fastpo(path):
    def loss(h, w, y, rh, rw):
        return fused_linear_preference_loss(h, w, y, ref_hidden=rh, ref_weight=rw, path=path).loss

    return loss


def _naive(h, w, y, rh, rw):
    return fused_linear_preference_loss_ref(h, w, y, ref_hidden=rh, ref_weight=rw, upcast=False).loss


@functools.lru_cache
def _compiled_naive():
    return torch.compile(_naive)


def _liger(h, w, y, rh, rw):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    return LigerFusedLinearDPOLoss(compiled=DEVICE == "cuda")(w, h, y, ref_input=rh, ref_weight=rw)[0]


def _trl_sums(h, w, y):
    """TRL 1.16's head as its DPO trainer runs it: completion rows only (its "compact" mode), its default
    32768-column vocabulary tiles, per-row sums."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    valid = (y != -100).reshape(-1)
    rows = valid.nonzero().squeeze(1)
    logp = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1])[rows], w, None, y.reshape(-1)[rows],
                                        1.0, 32768, None, 1.0, ())[0]
    row_of = torch.arange(y.shape[0], device=y.device).repeat_interleave(y.shape[1])[rows]
    return torch.zeros(y.shape[0], device=y.device, dtype=torch.float32).index_add(0, row_of, logp.float())


def _trl(h, w, y, rh, rw, beta=0.1):
    s = _trl_sums(h, w, y)
    with torch.no_grad():
        s_ref = _trl_sums(rh, rw, y)
    c, r = (s - s_ref).chunk(2)
    return -F.logsigmoid(beta * (c - r)).mean()


PROVIDERS = {
    "fastpo-generic": _fastpo("generic"),
    "fastpo-pair-fused": _fastpo("pair_fused"),
    "naive": _naive,
    "torch-compile": lambda *a: _compiled_naive()(*a),
    "liger-dpo": _liger,
    "trl-chunked": _trl,
}
COMPILED = {"torch-compile"}
"""Providers that compile on their first call (warmed up before a memory probe)."""
MODES = ["fwd", "fwd_bwd"]


def _skip_reason(provider):
    module = {"liger-dpo": "liger_kernel.chunked_loss", "trl-chunked": "trl.kernels.chunked_logprob"}.get(provider)
    if module is not None:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not importable"
    return None


def _step(provider, mode):
    fn = PROVIDERS[provider]

    def run(inputs):
        if mode == "fwd":
            with torch.no_grad():
                return fn(*inputs)
        loss = fn(*inputs)
        loss.backward(torch.tensor(1.3, device=loss.device))
        return loss

    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_dpo_loss_time(benchmark, record, provider, mode):
    reason = _skip_reason(provider)
    if reason:
        pytest.skip(reason)
    shape = SHAPES[TIME_SHAPE]
    inputs = dpo_inputs(shape)

    def fresh():
        for t in inputs[:2]:
            t.grad = None
        return inputs

    run_pedantic(benchmark, _step(provider, mode), setup=fresh)
    median = benchmark.stats.stats.median
    record(benchmark, shape=TIME_SHAPE, provider=provider, mode=mode, B=shape.B, T=shape.T, H=shape.H, V=shape.V,
           dtype=shape.dtype, tokens_per_s=shape.N / median)


def dpo_case(provider, B, T, H, V, dtype):
    """Inputs built (and, on CUDA or for a compiled provider, one untimed fwd + bwd run to compile and
    autotune, gradients cleared): returns the measured region (one fwd + bwd)."""
    inputs = dpo_inputs(DPOShape(B, T, H, V, dtype))
    step = _step(provider, "fwd_bwd")
    if DEVICE == "cuda" or provider in COMPILED:
        step(inputs)
        for t in inputs[:2]:
            t.grad = None
        synchronize()
    return lambda: (step(inputs), synchronize())


@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_dpo_loss_peak_memory(record, provider):
    """Peak memory of one fwd+bwd above the inputs; on CPU at 2B*T = 2048 rows and V = 32000 (fp32), where
    the naive program's [N, V] logits alone take 250 MiB."""
    reason = _skip_reason(provider)
    if reason:
        pytest.skip(reason)
    shape = SHAPES[MEMORY_SHAPE]
    peak = peak_memory_bytes("bench.bench_losses", "dpo_case",
                             dict(provider=provider, B=shape.B, T=shape.T, H=shape.H, V=shape.V, dtype=shape.dtype))
    record(shape=MEMORY_SHAPE, provider=provider, mode="fwd_bwd", B=shape.B, T=shape.T, H=shape.H, V=shape.V,
           dtype=shape.dtype, peak_mb=peak / 2**20, logits_fp32_mb=4 * shape.N * shape.V / 2**20)


# ----------------------------------------------------------------------------------------------------
# the drop-in modules against Liger's, as a user swaps them
# ----------------------------------------------------------------------------------------------------

MODULE_SHAPES = {
    "cpu": {"cpu-modules": DPOShape(B=8, T=128, H=1024, V=4096)},  # 16 rows x 128 tokens, fp32
    "cuda": {"llama3-8k": DPOShape(B=4, T=1024, H=4096, V=128256, dtype="bfloat16")},
}[DEVICE]
MODULES = {"fastpo": "fastpo.losses", "liger": "liger_kernel.chunked_loss"}
MODULE_CLASSES = {"dpo": ("FusedLinearDPOLoss", "LigerFusedLinearDPOLoss"),
                  "simpo": ("FusedLinearSimPOLoss", "LigerFusedLinearSimPOLoss")}


def module_step(provider: str, loss: str):
    """One forward + backward of the provider's module for `loss`, Liger's call signature (weight, input,
    target[, bias, ref_input, ref_weight]); DPO with a reference model."""
    module_path = MODULES[provider]
    cls = getattr(__import__(module_path, fromlist=["_"]), MODULE_CLASSES[loss][provider == "liger"])
    mod = cls()

    def run(inputs):
        h, w, y, rh, rw = inputs
        out = mod(w, h, y, None, rh, rw) if loss == "dpo" else mod(w, h, y)
        out[0].backward()
        return out[0]

    return run


@pytest.mark.parametrize("loss", list(MODULE_CLASSES))
@pytest.mark.parametrize("provider", list(MODULES))
def bench_liger_module_time(benchmark, record, provider, loss):
    try:
        __import__(MODULES[provider])
    except ImportError:
        pytest.skip(f"{MODULES[provider]} is not importable")
    shape_name, shape = next(iter(MODULE_SHAPES.items()))
    inputs = dpo_inputs(shape)
    step = module_step(provider, loss)
    step(inputs)  # Liger's modules compile on their first call

    def fresh():
        for t in inputs[:2]:
            t.grad = None
        return inputs

    run_pedantic(benchmark, step, setup=fresh)
    median = benchmark.stats.stats.median
    record(benchmark, shape=f"{shape_name}-{loss}", provider=f"{provider}-{loss}", mode="fwd_bwd", B=shape.B,
           T=shape.T, H=shape.H, V=shape.V, dtype=shape.dtype, tokens_per_s=shape.N / median)
