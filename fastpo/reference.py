"""Naive materialized-logits references: the ground truth of tests and benchmarks.

Shapes: N tokens reaching the head, H hidden size, V vocabulary.

Everything here materializes the `[N, V]` logits on purpose: it is the obvious PyTorch program that the
fused op replaces. With `upcast=True` the whole computation runs in fp32 (float64 inputs stay float64),
which is the reference every fastpo path is measured against; with `upcast=False` the logits GEMM runs
in the inputs' dtype and only the softmax is fp32, which is what ordinary bf16 training code computes
and so sets the "no worse than PyTorch in the same dtype" bound. Product code: no kernel imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpo.ops import TokenStats


def _logits_ref(hidden, weight, bias, temperature, upcast, softcap=None):
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])
    if upcast:
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        hidden_NH, weight, bias = hidden_NH.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    logits_NV = F.linear(hidden_NH, weight, bias)
    logits_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))
    if softcap is not None:
        logits_NV = softcap * torch.tanh(logits_NV / softcap)
    return logits_NV / temperature


def token_stats_ref(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                    upcast=True):
    """All per-token statistics from materialized logits; differentiable in every input.

    logp_t = z_t,y - logsumexp_v z_t,v, with z = (h W^T + b) / temperature, or z = c tanh((h W^T + b) / c) /
    temperature with `softcap=c`;
    entropy_t = -sum_v p log p;  log_sum_sq_probs_t = log sum_v p^2;  mean_logits_t = mean_v z;
    is_top1_t = argmax_v z == y (first index on ties). Rows with `targets == ignore_index` give 0.
    """
    z_NV = _logits_ref(hidden, weight, bias, temperature, upcast, softcap)
    y_N = targets.reshape(-1)
    valid_N = y_N != ignore_index
    logprobs_NV = z_NV.log_softmax(-1)
    logp = logprobs_NV.gather(-1, torch.where(valid_N, y_N, 0)[:, None]).squeeze(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    probs_NV = logprobs_NV.exp()
    entropy = -(probs_NV * logprobs_NV).sum(-1)
    log_sum_sq = torch.logsumexp(2 * logprobs_NV, -1)
    return TokenStats(
        logp=torch.where(valid_N, logp, zero),
        entropy=torch.where(valid_N, entropy, zero),
        log_sum_sq_probs=torch.where(valid_N, log_sum_sq, zero),
        mean_logits=torch.where(valid_N, z_NV.mean(-1), zero),
        is_top1=valid_N & (z_NV.argmax(-1) == y_N),
    )


def token_logprobs_ref(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                       upcast=True):
    """`log softmax(cap(h W^T + b) / T)` at the targets, from materialized logits; 0 at `ignore_index`."""
    z_NV = _logits_ref(hidden, weight, bias, temperature, upcast, softcap)
    y_N = targets.reshape(-1)
    valid_N = y_N != ignore_index
    logp = z_NV.log_softmax(-1).gather(-1, torch.where(valid_N, y_N, 0)[:, None]).squeeze(-1)
    return torch.where(valid_N, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
