"""Stage 5, attention: the prefix-shared attention backends on CUDA give the log-prob sums and DPO gradients of
separate forwards.

Reuses tests/test_attention.py: its tiny GQA models (Llama; Mistral with a sliding window shorter than the
longer prompts), its examples (several per row, K = 2 and 3) and its two programs, `run_separate` (one
eager forward per [prompt + response]) and `run_packed` (`score` on the packed batch with one backend).
Ground truth: separate forwards in fp32; PyTorch's same-dtype result: separate forwards in bf16; judged:
the packed bf16 run of each backend (`bench.session.checks`). Backends: FlexAttention, torch's varlen
attention, flash-attn's varlen kernel where installed (CPU dry run: the SDPA mask and the emulated varlen
layout, which run anywhere).
"""

from __future__ import annotations

import copy

import torch

from bench.harness import DEVICE
from bench.session.checks import judge, summarize
from fastpo import attention
from fastpo.packing import pack_examples
from tests import test_attention as attn_tests

DTYPE = torch.bfloat16
PLANS = {
    "cuda": {"archs": ("llama", "mistral"), "backends": ("flex", "torch_varlen", "flash_varlen")},
    "dry": {"archs": ("llama",), "backends": ("sdpa", "varlen_emulated")},
}


def plan(dry: bool) -> dict:
    return {**PLANS["dry" if dry else "cuda"], "dtype": DTYPE, "examples": attn_tests.SPEC,
            "max_tokens": attn_tests.MAX_TOKENS, "model": attn_tests.COMMON}


class Inputs:
    """One packed batch, its reference log-probs and one model per arch (fp32 on CPU, copied per run)."""

    def __init__(self):
        self.examples = attn_tests.make_examples(attn_tests.SPEC)
        self.batch = pack_examples(self.examples, max_tokens=attn_tests.MAX_TOKENS).to(DEVICE)
        gen = torch.Generator().manual_seed(1)
        self.ref_logp = (torch.randn(self.batch.num_responses, generator=gen) - 20.0).to(DEVICE)
        self.truth = {}

    def separate(self, base, dtype):
        """(log-prob sums, grads) of one eager forward per sequence."""
        model = copy.deepcopy(base).to(DEVICE, dtype)
        with torch.device(DEVICE):
            _, logp_sum, grads = attn_tests.run_separate(model, self.examples, self.ref_logp,
                                                         self.batch.response_example, self.batch.response_rank)
        return logp_sum, grads

    def packed(self, base, dtype, backend):
        model = copy.deepcopy(base).to(DEVICE, dtype)
        scores, grads = attn_tests.run_packed(model, self.batch, self.ref_logp, backend)
        return scores.logp_sum.detach(), grads

    def reference(self, arch):
        """(fp32 truth, bf16 same-dtype) separate forwards of `arch`, computed once."""
        if arch not in self.truth:
            base = attn_tests.make_model(arch)
            self.truth[arch] = (base, self.separate(base, torch.float32), self.separate(base, DTYPE))
        return self.truth[arch]


def compare(got, truth, same, dtype) -> dict:
    (got_sum, got_g), (truth_sum, truth_g), (same_sum, same_g) = got, truth, same
    quantities = {"logp_sum": judge(got_sum, truth_sum, same_sum, dtype)}
    for name, g in truth_g.items():
        quantities[name] = judge(got_g[name], g, same_g[name], dtype)
    return quantities


def run(rec, plan: dict) -> None:
    inputs = Inputs()
    for arch in plan["archs"]:
        for backend in plan["backends"]:
            if rec.out_of_time(f"{arch}/{backend}"):
                return
            with rec.case(arch=arch, backend=backend, dtype=str(plan["dtype"])[6:]) as row:
                if backend == "flash_varlen" and not attention.flash_attn_available():
                    row["skipped"] = "flash-attn is not installed"
                    continue
                base, truth, same = inputs.reference(arch)
                got = inputs.packed(base, plan["dtype"], backend)
                summarize(row, compare(got, truth, same, plan["dtype"]))
