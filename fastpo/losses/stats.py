"""From per-token head outputs to per-response statistics, objective inputs, and TRL-named metrics.

Shapes: N head rows, R responses, G groups, K responses per group, M reference models.

Pure PyTorch shared by the fused paths (`functional.py`) and the naive reference (`reference.py`), so that
a parity failure can only come from the log-prob computation, the chunking or the reduction order.
Sums are fp32 (`index_add`); counts exclude `ignore_index` rows; no host synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from fastpo.losses.objectives import preference_loss
from fastpo.losses.types import FusedLossOutput, LossOutput, PreferenceInputs, ResponseLayout, SequenceStats


class GroupData(NamedTuple):
    """Optional per-group data carried into `PreferenceInputs` (see its docstring)."""

    beta: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    ref_weights: torch.Tensor | None = None

    def slice(self, g0: int, g1: int) -> GroupData:
        cut = lambda t: None if t is None else t[g0:g1]  # noqa: E731
        return self._replace(beta=cut(self.beta), margin=cut(self.margin), weight=cut(self.weight),
                             labels=cut(self.labels))


@dataclass(frozen=True)
class PreferenceConfig:
    """The objective and its options: what `preference_loss` receives, plus how sums are formed."""

    loss_type: tuple = ("sigmoid",)
    loss_weights: tuple | None = None
    use_weighting: bool = False
    average_log_prob: bool = False
    """Feed S / n (and S_ref / n) to the objective as if each response were one token (Liger option)."""
    hparams: dict = field(default_factory=dict)

    def __call__(self, inputs: PreferenceInputs) -> LossOutput:
        return preference_loss(self.loss_type, inputs, loss_weights=self.loss_weights,
                               use_weighting=self.use_weighting, **self.hparams)


def segment_sum(values_N: torch.Tensor, index_N: torch.Tensor, num_segments: int) -> torch.Tensor:
    """fp32 sum of `values_N` per segment id; differentiable."""
    out = torch.zeros(num_segments, dtype=torch.float32, device=values_N.device)
    return out.index_add(0, index_N, values_N.float())


def token_positions(token_response: torch.Tensor, valid_N: torch.Tensor, num_responses: int) -> torch.Tensor:
    """1-based position of each valid row among its response's valid rows, in row order; 0 if invalid."""
    order = torch.argsort(token_response, stable=True)
    v = valid_N[order].long()
    before = torch.cumsum(v, 0) - v
    first = torch.full((num_responses,), before.numel(), dtype=torch.long, device=v.device)
    first = first.scatter_reduce(0, token_response[order], before, reduce="amin")
    pos_sorted = (before - first[token_response[order]] + 1) * v
    return torch.empty_like(pos_sorted).scatter_(0, order, pos_sorted)


def ld_token_weights(layout: ResponseLayout, valid_N, ld_alpha: float) -> torch.Tensor:
    """LD-DPO positional weights (Liu et al., *Length Desensitization in DPO*): 1 for the first
    l_p = min_k n_k completion tokens of every response in a group, `ld_alpha` after; [N] fp32."""
    R = layout.num_responses
    counts = segment_sum(valid_N.float(), layout.token_response, R)
    shared = counts[layout.group_index].amin(-1)
    group_of = torch.empty(R, dtype=torch.long, device=counts.device)
    group_of[layout.group_index.flatten()] = torch.arange(layout.num_groups, device=counts.device).repeat_interleave(
        layout.group_size
    )
    limit = shared[group_of][layout.token_response]
    pos = token_positions(layout.token_response, valid_N, R).float()
    return torch.where(pos <= limit, 1.0, float(ld_alpha))


def token_weights_for(layout, valid_N, token_weights=None, ld_alpha=None):
    """Per-row weights w_t = token_weights * LD weights, or None when neither is given."""
    w = None if token_weights is None else token_weights.reshape(-1).float()
    if ld_alpha is not None:
        ld = ld_token_weights(layout, valid_N, ld_alpha)
        w = ld if w is None else w * ld
    return w


def reduce_tokens(idx, R, logp_N, valid_N, weights_N=None, mean_logits_N=None, log_sum_sq_N=None) -> SequenceStats:
    """Per-response sums `[R]` over rows with response id `idx` `[N]`: S^w, plain S, n, sum of mean logits,
    and the detached WPO log-weight."""
    logp_N = torch.where(valid_N, logp_N.float(), 0.0)
    plain = segment_sum(logp_N, idx, R)
    weighted = plain if weights_N is None else segment_sum(logp_N * weights_N, idx, R)
    n = segment_sum(valid_N.float(), idx, R)
    zeros = torch.zeros(R, device=logp_N.device)
    logits = zeros if mean_logits_N is None else segment_sum(torch.where(valid_N, mean_logits_N, 0.0), idx, R)
    wpo = zeros
    if log_sum_sq_N is not None:
        aligned = torch.where(valid_N, logp_N.detach() - log_sum_sq_N.float(), 0.0)
        wpo = segment_sum(aligned, idx, R) / n.clamp(min=1.0)
    return SequenceStats(weighted, plain, n, logits.detach(), wpo.detach())


def nll_scale(layout: ResponseLayout, num_tokens_R: torch.Tensor) -> torch.Tensor:
    """G / (chosen completion tokens in the batch): scales -S_w into per-example NLL contributions."""
    return layout.num_groups / num_tokens_R[layout.group_index[:, 0]].sum().clamp(min=1.0)


def build_inputs(seq: SequenceStats, ref_R, group_index, data: GroupData, config: PreferenceConfig,
                 scale: torch.Tensor) -> PreferenceInputs:
    """Per-response `[R]` (or `[M, R]` references) to the objective's `[G, K]` inputs."""
    to_groups = lambda x: None if x is None else x[..., group_index]  # noqa: E731
    logps, ref, n = to_groups(seq.logps), to_groups(ref_R), to_groups(seq.num_tokens)
    if config.average_log_prob:
        logps = logps / n.clamp(min=1.0)
        ref = None if ref is None else ref / n.clamp(min=1.0)
        n = torch.ones_like(n)
    return PreferenceInputs(
        logps=logps, num_tokens=n, ref_logps=ref, ref_weights=data.ref_weights, nll_logps=to_groups(seq.nll_logps),
        nll_scale=scale, wpo_logweights=to_groups(seq.wpo), beta=data.beta, margin=data.margin,
        weight=data.weight, labels=data.labels, kl=data.kl,
    )


def _masked_mean(x, mask):
    mask = mask.float()
    return (x.float() * mask).sum() / mask.sum().clamp(min=1.0)


def _role_masks(inputs: PreferenceInputs):
    """[G, K] masks of chosen and rejected responses: rank 0 vs ranks >= 1, or KTO labels when K = 1."""
    G, K = inputs.logps.shape
    if K == 1:
        labels = inputs.labels
        labels = torch.ones(G, dtype=torch.bool, device=inputs.logps.device) if labels is None else labels.bool()
        return labels[:, None], ~labels[:, None]
    rank = torch.arange(K, device=inputs.logps.device).expand(G, K)
    return rank == 0, rank > 0


def preference_metrics(out: LossOutput, inputs: PreferenceInputs, logits_sum, num_tokens) -> dict:
    """TRL's metrics (LOSSES.md section 3), as detached 0-d tensors, over completion tokens only.

    rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}, logits/{chosen,rejected}, plus the
    objective's own metrics (nll_loss, log_odds_ratio, kl, ...). With K > 2 "rejected" pools ranks >= 1 and an
    accurate group has its best response strictly above all others; with K = 1 (KTO) the labels split roles.
    """
    chosen, rejected = _role_masks(inputs)
    rewards, logps = out.rewards.detach(), inputs.logps.detach()
    metrics = {
        "rewards/chosen": _masked_mean(rewards, chosen),
        "rewards/rejected": _masked_mean(rewards, rejected),
        "logps/chosen": _masked_mean(logps, chosen),
        "logps/rejected": _masked_mean(logps, rejected),
        "logits/chosen": (logits_sum * chosen).sum() / (num_tokens * chosen).sum().clamp(min=1.0),
        "logits/rejected": (logits_sum * rejected).sum() / (num_tokens * rejected).sum().clamp(min=1.0),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if inputs.group_size > 1:
        best_other = rewards[:, 1:].amax(-1)
        metrics["rewards/accuracies"] = (rewards[:, 0] > best_other).float().mean()
    return metrics | {k: v.detach() for k, v in out.metrics.items()}


def finish(loss, out: LossOutput, inputs: PreferenceInputs, seq: SequenceStats, group_index) -> FusedLossOutput:
    """Assemble the public output (metrics computed on the whole batch)."""
    logits_sum, n = seq.logits_sum[group_index], seq.num_tokens[group_index]
    return FusedLossOutput(
        loss=loss, losses=out.losses.detach(), rewards=out.rewards.detach(), logps=inputs.logps.detach(),
        num_tokens=n, logits_sum=logits_sum, metrics=preference_metrics(out, inputs, logits_sum, n),
    )


def objective_from_token_stats(stats, targets_N, layout, ref_R, data, config, *, ignore_index=-100,
                               weights_N=None, nll_logp_N=None, nll_valid_N=None):
    """Generic path after the head: reduce per-token stats, run the objective, compute metrics.

    `stats` is a `TokenStats` with `logp` differentiable; `nll_logp_N` / `nll_valid_N` optionally give the
    NLL term its own targets (Liger ORPO's `nll_target`).
    """
    valid_N = targets_N != ignore_index
    idx, R = layout.token_response, layout.num_responses
    seq = reduce_tokens(idx, R, stats.logp, valid_N, weights_N, stats.mean_logits, stats.log_sum_sq_probs)
    scale = nll_scale(layout, seq.num_tokens)
    if nll_logp_N is not None:
        nll_seq = reduce_tokens(idx, R, nll_logp_N, nll_valid_N)
        seq = seq._replace(nll_logps=nll_seq.logps)
        scale = nll_scale(layout, nll_seq.num_tokens)
    inputs = build_inputs(seq, ref_R, layout.group_index, data, config, scale)
    out = config(inputs)
    return finish(out.losses.mean(), out, inputs, seq, layout.group_index)
