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

from fastpo.losses.metrics import metric_means, metric_sums
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
    mask: torch.Tensor | None = None
    """[G] example mask: a 0 example adds no loss, no gradient and no metric (padding examples)."""

    PER_GROUP = ("beta", "margin", "weight", "labels", "mask")

    def slice(self, g0: int, g1: int) -> GroupData:
        return self._replace(**{k: getattr(self, k)[g0:g1] for k in self.PER_GROUP if getattr(self, k) is not None})

    def take(self, groups: torch.Tensor) -> GroupData:
        return self._replace(**{k: getattr(self, k)[groups] for k in self.PER_GROUP if getattr(self, k) is not None})


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
    """Per-response `[R]` (or `[M, R]` references) to the objective's `[G, K]` inputs of one bucket."""
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


class GroupResult(NamedTuple):
    """The objective's per-group results on a whole batch, ranks padded to the largest group (0 where absent).

    losses      [G] per-example losses (objective weights, per-pair weights and the example mask applied)
    rewards     [G, K] detached implicit rewards
    logps       [G, K] the policy log-probs fed to the objective (S, S^w, or S / n), detached
    num_tokens  [G, K] completion-token counts
    logits_sum  [G, K] sums over completion tokens of the per-token mean logit
    present     [G, K] bool: rank k of group g holds a response
    metrics     the objective's own per-example metrics, each [G]
    labels      [G] bool desirability (unpaired data) or None
    mask        [G] example mask (1 real, 0 padding example) or None
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    logps: torch.Tensor
    num_tokens: torch.Tensor
    logits_sum: torch.Tensor
    present: torch.Tensor
    metrics: dict
    labels: torch.Tensor | None
    mask: torch.Tensor | None


def evaluate(seq: SequenceStats, ref_R, layout: ResponseLayout, data: GroupData, config: PreferenceConfig,
             scale: torch.Tensor) -> GroupResult:
    """Run the objective on every bucket of equal-size groups (one bucket unless sizes differ) and assemble
    the per-group results. The only place objectives meet per-response statistics: the generic path, each
    pair-fused chunk and the reporting pass all come through here."""
    parts = []
    for bucket in layout.buckets():
        sub = data if bucket.groups is None else data.take(bucket.groups)
        inputs = build_inputs(seq, ref_R, bucket.index, sub, config, scale)
        parts.append((bucket, inputs, config(inputs)))
    losses, rewards, logps, metrics = _assemble(parts, layout)
    if data.mask is not None:
        losses = losses * data.mask.to(losses.dtype)
    present = layout.present
    padded = lambda x: torch.where(present, x[layout.group_index.clamp(min=0)], 0.0)  # noqa: E731
    return GroupResult(losses, rewards, logps, padded(seq.num_tokens), padded(seq.logits_sum).detach(), present,
                       metrics, data.labels, data.mask)


def _assemble(parts, layout: ResponseLayout):
    """(losses [G], rewards [G, K], logps [G, K], metrics {name: [G]}) from the buckets' outputs."""
    if len(parts) == 1 and parts[0][0].groups is None:
        _, inputs, out = parts[0]
        return out.losses, out.rewards.detach(), inputs.logps.detach(), out.metrics
    G, K = layout.group_index.shape
    like = parts[0][2].losses
    losses = like.new_zeros(G)
    rewards = like.new_zeros(G, K)
    logps = like.new_zeros(G, K)
    metrics = {name: like.new_zeros(G) for name in parts[0][2].metrics}
    for bucket, inputs, out in parts:
        k = bucket.size
        losses = losses.index_put((bucket.groups,), out.losses)
        rewards[bucket.groups, :k] = out.rewards.detach().to(rewards.dtype)
        logps[bucket.groups, :k] = inputs.logps.detach().to(logps.dtype)
        for name, value in out.metrics.items():
            metrics[name][bucket.groups] = value.to(like.dtype)
    return losses, rewards, logps, metrics


def finish(loss, result: GroupResult) -> FusedLossOutput:
    """The public output: per-group values, and the metrics as sums (for reduction) and means."""
    sums = metric_sums(result)
    return FusedLossOutput(
        loss=loss, losses=result.losses.detach(), rewards=result.rewards, logps=result.logps,
        num_tokens=result.num_tokens, logits_sum=result.logits_sum, present=result.present,
        metrics=metric_means(sums), metric_sums=sums,
    )


def objective_from_token_stats(stats, targets_N, layout, ref_R, data, config, *, ignore_index=-100,
                               weights_N=None, nll_logp_N=None, nll_valid_N=None, scale=None, normalizer=None):
    """Generic path after the head: reduce per-token stats, run the objective, compute metrics.

    `stats` is a `TokenStats` with `logp` differentiable; `nll_logp_N` / `nll_valid_N` optionally give the
    NLL term its own targets (Liger ORPO's `nll_target`). `scale` overrides the batch's NLL scale (a global
    one), `normalizer` the loss's divisor (default: the number of groups, the mean).
    """
    valid_N = targets_N != ignore_index
    idx, R = layout.token_response, layout.num_responses
    seq = reduce_tokens(idx, R, stats.logp, valid_N, weights_N, stats.mean_logits, stats.log_sum_sq_probs)
    counts = seq.num_tokens
    if nll_logp_N is not None:
        nll_seq = reduce_tokens(idx, R, nll_logp_N, nll_valid_N)
        seq = seq._replace(nll_logps=nll_seq.logps)
        counts = nll_seq.num_tokens
    scale = nll_scale(layout, counts) if scale is None else scale
    result = evaluate(seq, ref_R, layout, data, config, scale)
    return finish(result.losses.sum() / (layout.num_groups if normalizer is None else normalizer), result)
