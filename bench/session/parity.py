"""Stage 1, parity: the compiled Triton kernels against the references, on CUDA at model-sized shapes.

Two ops, each in fp32 and bf16:

- the head op `fastpo.token_stats(impl="triton")` (forward with extras, backward with a random upstream
  gradient) against `fastpo.reference.token_stats_ref`;
- the pair-fused loss `fused_linear_preference_loss(path="pair_fused", impl="triton")` (row kernels of
  `fastpo.kernels.logit_rows`; loss, per-group values, dH, dW, d(bias)) against
  `fused_linear_preference_loss_ref`.

Inputs are built by the test suite's own builders (tests/test_logprobs.py, tests/test_fused_losses.py) on
the device, and every error is judged by the test suite's rule (`tests.tolerances.error_bound`): ground
truth in float64 on the same rounded inputs; fp32 results within 1e-5 relative, bf16 results within 2x the
error of PyTorch's own bf16 program + 2e-3. Errors are recorded, not asserted, so one failing case does
not hide the others. `top1_mismatch` (argmax flips at near-ties) is reported, not judged.
"""

from __future__ import annotations

import torch

import fastpo
from bench.harness import DEVICE
from bench.session.checks import judge, summarize
from fastpo.losses import fused_linear_preference_loss, fused_linear_preference_loss_ref
from fastpo.reference import token_logprobs_ref, token_stats_ref
from tests import test_fused_losses as loss_tests
from tests import test_logprobs as head_tests

DTYPES = (torch.bfloat16, torch.float32)
"""bf16 first: the dtype training runs in."""
EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logits")
# Why each case is here (CUDA): the Llama-3 head with 30% ignored rows (the shape of stage 2, at 2048 rows
# so that the float64 reference fits); an odd vocabulary (V % 128 != 0: masked tail tiles) with bias,
# temperature and a soft cap small enough to bend most logits; near-one-hot rows (1 - p_y formed in fp32).
HEAD_CASES = {
    "cuda": {
        "llama3-ignored": head_tests.Case(N=2048, H=4096, V=128256, ignore_frac=0.3),
        "odd-V-bias-softcap": head_tests.Case(N=1000, H=2304, V=50257, ignore_frac=0.3, temperature=0.8, bias=True,
                                              softcap=1.5),
        "confident": head_tests.Case(N=1024, H=2048, V=65537, ignore_frac=0.3, confident=True),
    },
    "dry": {
        "prime-V-ignored": head_tests.Case(N=45, H=24, V=251, ignore_frac=0.3),
        "bias-softcap": head_tests.Case(N=40, H=32, V=300, ignore_frac=0.3, temperature=0.8, bias=True, softcap=1.5),
    },
}
# DPO with a computed reference head, prompt and padding ignored: at the Llama-3 vocabulary, and with
# temperature and a soft cap at an odd vocabulary.
PAIR_CASES = {
    "cuda": {
        "dpo-llama3": loss_tests.Case(B=2, T=512, H=4096, V=128256, prompt=128),
        "dpo-odd-V-softcap": loss_tests.Case(B=4, T=256, H=1024, V=50257, prompt=64, temperature=0.8, softcap=1.5),
    },
    "dry": {
        "dpo": loss_tests.Case(B=2, T=6, H=16, V=67),
        "dpo-softcap": loss_tests.Case(B=2, T=6, H=16, V=67, temperature=0.8, softcap=1.5),
    },
}
CHUNKS = {"cuda": dict(chunk_tokens=1024, chunk_vocab=8192), "dry": dict(chunk_tokens=16, chunk_vocab=32)}
"""Chunking: the library defaults on CUDA; tiny chunks in the dry run, so that it crosses chunk edges."""


def plan(dry: bool) -> dict:
    key = "dry" if dry else "cuda"
    return {"head_op": HEAD_CASES[key], "pair_fused": PAIR_CASES[key], "dtypes": DTYPES, "chunks": CHUNKS[key],
            "truth": "float64 reference on the device", "rule": "tests.tolerances.error_bound"}


def head_op_case(case, dtype, chunks) -> tuple[dict, int]:
    """(quantities, top-1 mismatches) of `token_stats(impl="triton")` on one case."""
    with torch.device(DEVICE):
        leaves, targets = head_tests.make_inputs(case, dtype, DEVICE)
        grad_out = torch.randn(case.N, dtype=torch.float64)
    stats, grads = head_tests.run(fastpo.token_stats, leaves, targets, case, grad_out, impl="triton", extras=True,
                                  chunk_tokens=chunks["chunk_tokens"])
    truth_leaves = [t.detach().double().requires_grad_() for t in leaves]
    truth, truth_grads = head_tests.run(token_stats_ref, truth_leaves, targets, case, grad_out)
    same, same_grads = head_tests.run(token_logprobs_ref, leaves, targets, case, grad_out, upcast=False)
    q = {"logp": judge(stats.logp, truth.logp, same, dtype)}
    for name, g, tg, sg in zip(("d_hidden", "d_weight", "d_bias"), grads, truth_grads, same_grads, strict=False):
        q[name] = judge(g, tg, sg, dtype)
    same_stats = token_stats_ref(*[t.detach() for t in leaves[:2]], targets, upcast=False,
                                 bias=leaves[2].detach() if case.bias else None, temperature=case.temperature,
                                 softcap=case.softcap)
    for name in EXTRAS:
        q[name] = judge(getattr(stats, name), getattr(truth, name), getattr(same_stats, name), dtype)
    return q, int((stats.is_top1 != truth.is_top1).sum())


def pair_fused_case(case, dtype, chunks) -> dict:
    """Quantities of the pair-fused loss (Triton row kernels) on one case."""
    with torch.device(DEVICE):
        common, tensors = loss_tests.make_inputs(case, dtype)
    out, grads = loss_tests.run(fused_linear_preference_loss, case, common, tensors, dtype, path="pair_fused",
                                impl="triton", **chunks)
    wide = {k: None if v is None else v.double() for k, v in tensors.items()}
    truth, truth_grads = loss_tests.run(fused_linear_preference_loss_ref, case, common, wide, torch.float64)
    same, same_grads = (None, {})
    if dtype != torch.float32:
        same, same_grads = loss_tests.run(fused_linear_preference_loss_ref, case, common, tensors, dtype, upcast=False)
    q = {}
    for name in ("loss", "losses", "rewards", "logps", "num_tokens", "logits_sum"):
        q[name] = judge(getattr(out, name), getattr(truth, name), same and getattr(same, name), dtype)
    for name in truth_grads:
        q[name] = judge(grads[name], truth_grads[name], same_grads.get(name), dtype)
    return q


def run(rec, plan: dict) -> None:
    for dtype in plan["dtypes"]:
        for name, case in plan["head_op"].items():
            if rec.out_of_time(f"token_stats/{name}"):
                return
            with rec.case(op="token_stats", case=name, dtype=str(dtype)[6:], N=case.N, H=case.H, V=case.V) as row:
                torch.manual_seed(0)
                quantities, row["top1_mismatch"] = head_op_case(case, dtype, plan["chunks"])
                summarize(row, quantities)
        for name, case in plan["pair_fused"].items():
            if rec.out_of_time(f"pair_fused/{name}"):
                return
            with rec.case(op="pair_fused", case=name, dtype=str(dtype)[6:], N=2 * case.B * case.T, H=case.H,
                          V=case.V) as row:
                torch.manual_seed(0)
                summarize(row, pair_fused_case(case, dtype, plan["chunks"]))
