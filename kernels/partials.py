"""What the head op's implementations share, with no Triton import: the op's parameters, the per-split
online log-sum-exp partials and their exact merge, the per-token outputs, and the fp32-accumulating GEMM.

Shapes: N tokens, H hidden size, V vocabulary, S vocabulary splits.

`fastpo.ops` (the public op and its chunked PyTorch path) and `fastpo.kernels.logprobs` (the Triton
path) both import this module; neither imports the other at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

class TokenStats(NamedTuple):
    """Per-token statistics, all `[N]`. Only `logp` carries a gradient; unrequested extras are None.

    entropy          -sum_v p_tv log p_tv
    log_sum_sq_probs log sum_v p_tv^2   (WPO weights)
    mean_logits      (1/V) sum_v z_tv   (TRL's `logits/*` metrics)
    is_top1          argmax_v z_tv == y_t, first index on ties (bool)
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


class Partials(NamedTuple):
    """Online log-sum-exp statistics of one vocabulary split, each `[S, N]` fp32.

    m      max_v z                      s      sum_v e^(z - m)
    zy     z at the target (0 if the target is not in the split)
    ent    sum_v e^(z - m) z            sq     sum_v e^(2(z - m))
    zsum   sum_v z                      before max of z over columns left of the target
    """

    m: torch.Tensor
    s: torch.Tensor
    zy: torch.Tensor
    ent: torch.Tensor
    sq: torch.Tensor
    zsum: torch.Tensor
    before: torch.Tensor


@dataclass(frozen=True)
class HeadParams:
    """Non-tensor arguments of the head op, passed to autograd Functions as one value."""

    ignore_index: int = -100
    scale: float = 1.0
    """1 / temperature."""
    extras: bool = False
    """Compute the `EXTRA_OUTPUTS` in the same pass."""
    chunk_tokens: int = 1024
    chunk_vocab: int = 8192
    softcap: float | None = None
    """c of the final-logit soft cap z = c tanh(a / c) (Gemma 2's `final_logit_softcapping`), or None."""


def combine_partials(p: Partials, valid_N: torch.Tensor, vocab_size: int, extras: bool):
    """Merge the splits of `p` into `(TokenStats, lse_N)`; rows outside `valid_N` give 0."""
    m = p.m.amax(0)
    w = torch.exp(p.m - m)
    s = (p.s * w).sum(0)
    lse = m + torch.log(s)
    zy = p.zy.sum(0)
    zero = torch.zeros((), dtype=torch.float32, device=m.device)
    stats = TokenStats(logp=torch.where(valid_N, zy - lse, zero))
    if extras:
        # entropy = lse - E_p[z];  log sum p^2 = log sum e^(2(z - m)) - 2 log s
        entropy = lse - (p.ent * w).sum(0) / s
        log_sum_sq = torch.log((p.sq * w * w).sum(0)) - 2 * torch.log(s)
        stats = stats._replace(
            entropy=torch.where(valid_N, entropy, zero),
            log_sum_sq_probs=torch.where(valid_N, log_sum_sq, zero),
            mean_logits=torch.where(valid_N, p.zsum.sum(0) / vocab_size, zero),
            is_top1=valid_N & (zy >= m) & (zy > p.before.amax(0)),
        )
    return stats, torch.where(valid_N, lse, zero)


def pack_extras(stats: TokenStats) -> torch.Tensor:
    """The four extras as one `[4, N]` fp32 tensor (autograd Functions return tensors only)."""
    return torch.stack([stats.entropy, stats.log_sum_sq_probs, stats.mean_logits, stats.is_top1.float()])


def unpack_extras(logp: torch.Tensor, extras_4N: torch.Tensor | None) -> TokenStats:
    """Inverse of `pack_extras`; None or a 1-D empty tensor (the Functions' "no extras") gives logp alone."""
    if extras_4N is None or extras_4N.dim() != 2:
        return TokenStats(logp=logp)
    entropy, log_sum_sq, mean_logits, is_top1 = extras_4N.unbind(0)
    return TokenStats(logp, entropy, log_sum_sq, mean_logits, is_top1 > 0.5)


def addmm_fp32_(acc_VH, a_VC, b_CH):
    """acc += a @ b into an fp32 `acc`, with fp32 accumulation and no low-precision rounding of the product
    (cuBLAS `out_dtype=float32` for 16-bit CUDA operands)."""
    if a_VC.is_cuda and a_VC.dtype != torch.float32:
        torch.addmm(acc_VH, a_VC, b_CH, out_dtype=torch.float32, out=acc_VH)
    else:
        acc_VH.addmm_(a_VC.float(), b_CH.float())
