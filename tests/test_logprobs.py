"""Parity of `fastpo.token_logprobs` / `token_stats` (both impls) against the materialized reference.

Ground truth: `fastpo.reference` in float64 on the same (already rounded) inputs. fp32 inputs must match
it to ~1e-5; bf16 inputs must be no worse than PyTorch's own bf16 program (tests/tolerances.py).
Backward always uses a random upstream gradient. The Triton impl runs compiled on CUDA, or on CPU
under TRITON_INTERPRET=1 (set by conftest), so shapes stay small.
"""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

import fastpo
from fastpo.reference import token_logprobs_ref, token_stats_ref
from tests.tolerances import assert_parity


@dataclass(frozen=True)
class Case:
    N: int
    H: int
    V: int
    ignore_frac: float = 0.0
    temperature: float = 1.0
    bias: bool = False
    confident: bool = False
    batch_dims: tuple = ()
    softcap: float | None = None


# Why each case is here:
CASES = {
    # prime V: no block or split size divides it; 30% ignored rows are sorted away by the kernels
    "prime_V": Case(N=45, H=24, V=251, ignore_frac=0.3),
    # V = 1000 leaves a 40-column tail tile; H = 40 a partial K step; bias and temperature together
    "tail_bias_temperature": Case(N=70, H=40, V=1000, temperature=0.7, bias=True),
    # every row ignored: zeros out, zero gradients, no NaN (Liger #177)
    "all_ignored": Case(N=20, H=16, V=123, ignore_frac=1.0),
    # near-one-hot softmax: 1 - p_y must be formed in fp32 (Liger #1329)
    "confident": Case(N=33, H=32, V=507, ignore_frac=0.3, confident=True),
    # Gemma 2's final-logit soft cap, small enough that most logits bend (|a| / c ~ 1), with bias and
    # temperature: checks the tanh and its chain factor 1 - tanh^2 in both backward passes
    "softcap": Case(N=40, H=32, V=300, ignore_frac=0.3, temperature=0.8, bias=True, softcap=1.5),
    # [B, T, H] input is flattened
    "batched_3d": Case(N=36, H=16, V=97, ignore_frac=0.3, batch_dims=(4, 9)),
}
IMPLS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(case: Case, dtype, device="cpu"):
    hidden = torch.randn(case.N, case.H)
    weight = torch.randn(case.V, case.H) / case.H**0.5
    targets = torch.randint(0, case.V, (case.N,))
    if case.confident:
        # logit of the target ~ 30 above the rest
        weight[targets] = hidden * (30 / case.H)
    ignored = torch.rand(case.N) < case.ignore_frac if case.ignore_frac < 1 else torch.ones(case.N, dtype=torch.bool)
    targets[ignored] = -100
    bias = torch.randn(case.V) if case.bias else None
    shape = case.batch_dims or (case.N,)
    leaves = [hidden.reshape(*shape, case.H), weight] + ([bias] if case.bias else [])
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in leaves]
    return leaves, targets.reshape(shape).to(device)


def run(fn, leaves, targets, case, grad_out, **kw):
    hidden, weight, *bias = leaves
    out = fn(hidden, weight, targets, bias=bias[0] if bias else None, temperature=case.temperature,
             softcap=case.softcap, **kw)
    logp = out.logp if isinstance(out, fastpo.TokenStats) else out
    grads = torch.autograd.grad((logp.reshape(-1).double() * grad_out).sum(), leaves, allow_unused=True)
    return out, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_parity(name, impl, dtype, triton_device):
    case = CASES[name]
    device = triton_device if impl == "triton" else "cpu"
    leaves, targets = make_inputs(case, dtype, device)
    grad_out = torch.randn(case.N, dtype=torch.float64, device=device)
    stats, grads = run(fastpo.token_stats, leaves, targets, case, grad_out, impl=impl, extras=True, chunk_tokens=16)

    truth_leaves = [t.detach().double().requires_grad_() for t in leaves]
    truth, truth_grads = run(token_stats_ref, truth_leaves, targets, case, grad_out)
    same, same_grads = run(token_logprobs_ref, leaves, targets, case, grad_out, upcast=False)

    assert stats.logp.dtype == torch.float32 and stats.logp.shape == (case.N,)
    valid = targets.reshape(-1) != -100
    assert (stats.logp[~valid] == 0).all(), "ignored rows must give exactly 0"
    assert_parity("logp", stats.logp, truth.logp, dtype=dtype, same_dtype=same)
    for g, tg, sg, leaf in zip(grads, truth_grads, same_grads, ["d_hidden", "d_weight", "d_bias"]):
        assert g.dtype == dtype
        assert_parity(leaf, g, tg, dtype=dtype, same_dtype=sg)
    if not case.confident:  # at near-ties bf16 rounding may move the argmax; the extras are fp32 metrics
        assert torch.equal(stats.is_top1, truth.is_top1)
    for field in ("entropy", "log_sum_sq_probs", "mean_logits"):
        # PyTorch's same-dtype extras: from the bf16 logits, upcast (what training code computes)
        same_extra = getattr(token_stats_ref(*[t.detach() for t in leaves[:2]], targets, upcast=False,
                                             bias=leaves[2].detach() if case.bias else None,
                                             temperature=case.temperature, softcap=case.softcap), field)
        assert_parity(field, getattr(stats, field), getattr(truth, field), dtype=dtype, same_dtype=same_extra)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_gives_zero_gradients(impl, triton_device):
    case = CASES["all_ignored"]
    leaves, targets = make_inputs(case, torch.float32, triton_device if impl == "triton" else "cpu")
    stats, grads = run(fastpo.token_stats, leaves, targets, case, torch.ones(case.N, dtype=torch.float64,
                       device=targets.device), impl=impl)
    assert (stats.logp == 0).all()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_only_saves_nothing(impl, triton_device):
    """Reference-model path: with no gradient needed the output has no graph and equals the grad path."""
    case = CASES["prime_V"]
    (hidden, weight), targets = make_inputs(case, torch.float32, triton_device if impl == "triton" else "cpu")
    with_grad = fastpo.token_logprobs(hidden, weight, targets, impl=impl)
    with torch.no_grad():
        no_grad = fastpo.token_logprobs(hidden, weight, targets, impl=impl)
    frozen = fastpo.token_logprobs(hidden.detach(), weight.detach(), targets, impl=impl)
    assert with_grad.grad_fn is not None
    assert no_grad.grad_fn is None and frozen.grad_fn is None
    assert torch.equal(no_grad, with_grad.detach()) and torch.equal(frozen, no_grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_gets_no_weight_gradient(impl, triton_device):
    case = CASES["prime_V"]
    (hidden, weight), targets = make_inputs(case, torch.float32, triton_device if impl == "triton" else "cpu")
    weight.requires_grad_(False)
    fastpo.token_logprobs(hidden, weight, targets, impl=impl).sum().backward()
    assert weight.grad is None and hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_triton_is_deterministic(triton_device):
    """No atomics: repeated runs are bitwise identical, forward and backward."""
    case = CASES["tail_bias_temperature"]
    leaves, targets = make_inputs(case, torch.bfloat16, triton_device)
    grad_out = torch.randn(case.N, dtype=torch.float64, device=triton_device)
    first = run(fastpo.token_stats, leaves, targets, case, grad_out, impl="triton", chunk_tokens=16)
    second = run(fastpo.token_stats, leaves, targets, case, grad_out, impl="triton", chunk_tokens=16)
    assert torch.equal(first[0].logp, second[0].logp)
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_triton_vocab_splits_merge_exactly(num_splits, triton_device):
    """The split merge is exact whatever the number of vocabulary splits (8 > tiles: clamped)."""
    from fastpo.kernels.logprobs import logprobs_fwd
    from fastpo.ops import HeadParams

    case = CASES["prime_V"]
    (hidden, weight), targets = make_inputs(case, torch.float32, triton_device)
    stats, *_ = logprobs_fwd(hidden.detach(), weight.detach(), None, targets, HeadParams(extras=True),
                             num_splits=num_splits)
    truth = token_stats_ref(hidden.detach().double(), weight.detach().double(), targets)
    for field in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_parity(field, getattr(stats, field), getattr(truth, field), dtype=torch.float32)
    assert torch.equal(stats.is_top1, truth.is_top1)


def test_auto_impl_uses_torch_on_cpu():
    from fastpo.ops import _resolve_impl

    assert _resolve_impl("auto", torch.device("cpu")) == "torch"
    assert _resolve_impl("auto", torch.device("cuda", 0)) == "triton"


def _bad_inputs():
    h, w, y = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
    return [
        ("hidden", dict(hidden=h.long()), TypeError, "hidden must be a floating-point"),
        ("weight_dim", dict(weight=w[0]), ValueError, "weight must be a 2-D tensor"),
        ("H_mismatch", dict(weight=torch.randn(11, 7)), ValueError, "must equal weight's H"),
        ("weight_dtype", dict(weight=w.double()), TypeError, "weight dtype"),
        ("targets_float", dict(targets=y.float()), TypeError, "targets must be an integer tensor"),
        ("targets_shape", dict(targets=y[:5]), ValueError, "targets shape"),
        ("target_high", dict(targets=torch.tensor([0, 1, 11, 2, 3, 4])), ValueError, "targets.flatten()[2] = 11"),
        ("target_negative", dict(targets=torch.tensor([0, -1, 1, 2, 3, 4])), ValueError, "[0, V=11)"),
        ("bias_shape", dict(bias=torch.randn(10)), ValueError, "bias must be [V]=11"),
        ("temperature", dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        ("temperature_negative", dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
        ("softcap_negative", dict(softcap=-30.0), ValueError, "softcap must be None or a finite number > 0"),
        ("impl", dict(impl="cuda"), ValueError, "impl must be one of"),
        ("vocab_empty", dict(weight=torch.randn(0, 8)), ValueError, "with V >= 1"),
        ("chunk_tokens", dict(chunk_tokens=0), ValueError, "chunk_tokens must be an int >= 1"),
        ("ignore_index_none", dict(ignore_index=None), TypeError, "ignore_index must be an int"),
    ], (h, w, y)


def _call_with(fn, idx):
    cases, (h, w, y) = _bad_inputs()
    _, change, exc, message = cases[idx]
    args = dict(hidden=h, weight=w, targets=y) | {k: v for k, v in change.items() if k in ("hidden", "weight", "targets")}
    kwargs = {k: v for k, v in change.items() if k not in ("hidden", "weight", "targets")}
    with pytest.raises(exc) as info:
        fn(args["hidden"], args["weight"], args["targets"], **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("idx", range(len(_bad_inputs()[0])), ids=[c[0] for c in _bad_inputs()[0]])
def test_bad_input_raises_clear_error(idx):
    _call_with(fastpo.token_logprobs, idx)


@pytest.mark.parametrize("idx", range(len(_bad_inputs()[0])), ids=[c[0] for c in _bad_inputs()[0]])
def test_pair_fused_path_validates_as_the_op_does(idx):
    """The fused losses run the op's one validation on both paths: the same error for the same bad input."""
    from fastpo.losses import ResponseLayout, fused_linear_preference_loss

    def loss(hidden, weight, targets, **kw):
        layout = ResponseLayout(torch.arange(6) // 2 % 2 if targets.dim() == 1 else torch.arange(1), torch.tensor([[0, 1]]))
        hidden = hidden.requires_grad_() if hidden.is_floating_point() else hidden
        return fused_linear_preference_loss(hidden, weight, targets, layout=layout, path="pair_fused",
                                            loss_type="simpo", **kw)

    _call_with(loss, idx)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_any_integer_target_dtype_is_accepted(dtype):
    h, w, y = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
    torch.testing.assert_close(fastpo.token_logprobs(h, w, y.to(dtype)), fastpo.token_logprobs(h, w, y))


@pytest.mark.parametrize("impl", IMPLS)
def test_no_rows_gives_empty_outputs_and_gradients(impl):
    """N = 0 (a batch whose responses were all cut away upstream): empty log-probs, zero gradients."""
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    stats = fastpo.token_stats(h, w, torch.zeros(0, dtype=torch.long), extras=True, impl=impl)
    assert stats.logp.shape == (0,) and stats.entropy.shape == (0,)
    stats.logp.sum().backward()
    assert h.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))


def test_ignored_rows_with_huge_logits_get_zero_not_nan_gradients():
    """Rows whose target is ignored carry no log-prob; their logits may be far beyond exp's range (here
    around 200) and must still get exactly zero gradient, never NaN (0 * inf)."""
    h = torch.randn(4, 8) * 40
    w = torch.randn(11, 8)
    y = torch.tensor([3, -100, 5, -100])
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    fastpo.token_logprobs(hh, ww, y, impl="torch").sum().backward()
    assert torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()
    assert torch.equal(hh.grad[1], torch.zeros(8)) and torch.equal(hh.grad[3], torch.zeros(8))


def test_ignore_index_is_accepted_in_range_check():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    logp = fastpo.token_logprobs(h, w, torch.tensor([-7, 2, -7]), ignore_index=-7)
    assert logp[0] == 0 and logp[2] == 0 and logp[1] < 0


@pytest.mark.slow
def test_every_kernel_config_compiles_for_hopper():
    """Ahead-of-time compile of every kernel variant (head op and pair-fused row kernels) for sm_90a (no GPU needed), specialized as the JIT
    specializes contiguous aligned inputs: catches what the interpreter lets through (types, shared
    memory, layouts) and checks the properties the speed depends on: the K-loop is software-pipelined
    (cp.async stages), 16-bit variants use wgmma, and ptxas (the one Triton calls) reports no register
    spills in the backward or in the bias-free forward without extras (every current LM head's policy
    backward and reference pass). The extras epilogue runs at the 255-register limit and spills a few
    bytes (more with bias and a soft cap together); that is reported, not hidden. Runs in a fresh process
    because the interpreter replaces @triton.jit functions in this one."""
    script = textwrap.dedent(
        """
        import json, re, subprocess, tempfile
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from fastpo.kernels import logit_rows, logprobs
        specs = [*logprobs.aot_specs(), *logit_rows.aot_specs()]
        for name, fn, sig, const, attrs, options in specs:
            k = triton.compile(triton.compiler.ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                               options=options)
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                ptx.write(k.asm["ptx"])
                ptx.flush()
                info = subprocess.run([get_ptxas(90).path, "--gpu-name", "sm_90a", "-v", ptx.name, "-o", "/dev/null"],
                                      capture_output=True, text=True, check=True).stderr
            print(json.dumps(dict(
                name=name, ptx_ok=".target sm_90a" in k.asm["ptx"] and len(k.asm["cubin"]) > 0,
                shared=k.metadata.shared, async_copies=k.asm["ttgir"].count("async_copy_global_to_local"),
                wgmma="warp_group_dot" in k.asm["ttgir"], vector_loads="ld.global.v4" in k.asm["ptx"],
                spill_bytes=int(re.search(r"(\\d+) bytes spill stores", info).group(1)),
            )), flush=True)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    variants = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(variants) == 36 + 7, proc.stdout
    for v in variants:
        assert v["ptx_ok"] and v["shared"] <= 227 * 1024, v
        if v["name"].startswith("rows"):  # pair-fused row kernels: streaming, 128-bit loads, no spills
            assert v["vector_loads"] and v["spill_bytes"] == 0, v
            continue
        assert v["async_copies"] > 0, f"{v['name']}: K-loop not pipelined"
        assert v["wgmma"] == ("fp32" not in v["name"]), v
        if v["name"].startswith("bwd") or ("extras0" in v["name"] and "bias0" in v["name"]):
            assert v["spill_bytes"] == 0, v
    print("spills:", {v["name"]: v["spill_bytes"] for v in variants if v["spill_bytes"]})


@pytest.mark.slow
def test_torch_impl_memory_is_bounded_by_chunks():
    """fwd+bwd at N=4096, H=256, V=32000 (fp32): the chunked path peaks at a small fraction of the naive
    program, whose [N, V] logits alone are 524 MB (full side-by-side table: bench/bench_logprobs.py)."""
    from bench.harness import peak_memory_bytes

    shape = dict(N=4096, H=256, V=32000, dtype="float32")
    fastpo_peak = peak_memory_bytes("bench.bench_logprobs", "head_case", dict(provider="fastpo-torch", **shape))
    naive_peak = peak_memory_bytes("bench.bench_logprobs", "head_case", dict(provider="naive", **shape))
    assert naive_peak > 4 * 4096 * 32000 * 2, naive_peak  # sanity: the probe sees the logits
    assert fastpo_peak < 0.2 * naive_peak, (fastpo_peak, naive_peak)
