"""Value types of `fastpo.losses`: the response layout, the objectives' inputs and outputs.

Shapes: N head rows (tokens), R responses, G groups (examples: a pair, a K-list, or one unpaired
response), K responses per group (rank 0 = chosen / best), M reference models.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class ResponseLayout:
    """Which response every head row belongs to, and how responses form ranked groups.

    token_response  [N] int64   response id in [0, R) of each head row. Rows whose target equals
                                `ignore_index` (prompt, padding) may carry any valid id: they add nothing.
    group_index     [G, K] int64 response id of rank k in group g; every response appears exactly once.
                                Rank 0 is the chosen (best) response, rank 1 the rejected one (K = 2), or
                                the rest of a ranked list best to worst (K > 2). Unpaired data has K = 1.

    Build it on the CPU (as the packer does): the pair-fused path plans its chunks from it on the host.
    """

    token_response: torch.Tensor
    group_index: torch.Tensor

    def __post_init__(self):
        if self.token_response.dim() != 1 or self.token_response.dtype != torch.int64:
            raise ValueError(f"token_response must be an int64 [N] tensor, got {_describe(self.token_response)}")
        if self.group_index.dim() != 2 or self.group_index.dtype != torch.int64:
            raise ValueError(f"group_index must be an int64 [G, K] tensor, got {_describe(self.group_index)}")
        if self.group_index.shape[0] == 0:
            raise ValueError("group_index must hold at least one group")
        if not self.group_index.is_cuda:
            ids = self.group_index.flatten().sort().values
            if not torch.equal(ids, torch.arange(ids.numel())):
                raise ValueError("group_index must list every response id 0..R-1 exactly once")
        if not self.token_response.is_cuda and self.token_response.numel():
            lo, hi = int(self.token_response.min()), int(self.token_response.max())
            if lo < 0 or hi >= self.num_responses:
                raise ValueError(f"token_response values must lie in [0, R={self.num_responses}), got [{lo}, {hi}]")

    @property
    def num_groups(self) -> int:
        return self.group_index.shape[0]

    @property
    def group_size(self) -> int:
        return self.group_index.shape[1]

    @property
    def num_responses(self) -> int:
        return self.group_index.numel()

    @classmethod
    def chosen_rejected(cls, num_rows: int, seq_len: int, device=None) -> ResponseLayout:
        """Liger / TRL batch: `[2B, T]` rows, all chosen rows first, then all rejected rows.

        Row i is response i; group g is (row g, row B + g).
        """
        if num_rows % 2:
            raise ValueError(
                f"chosen/rejected batches need an even number of rows (B chosen then B rejected), got {num_rows}"
            )
        B = num_rows // 2
        token_response = torch.arange(num_rows, device=device).repeat_interleave(seq_len)
        group_index = torch.stack([torch.arange(B, device=device), torch.arange(B, 2 * B, device=device)], 1)
        return cls(token_response, group_index)

    @classmethod
    def unpaired(cls, num_rows: int, seq_len: int, device=None) -> ResponseLayout:
        """One response per row and per group (KTO): `[B, T]` rows, K = 1."""
        token_response = torch.arange(num_rows, device=device).repeat_interleave(seq_len)
        return cls(token_response, torch.arange(num_rows, device=device)[:, None])

    @classmethod
    def from_groups(cls, token_response, response_group, response_rank) -> ResponseLayout:
        """From per-response group ids `[R]` and ranks `[R]` (as `fastpo.packing` emits them)."""
        G = int(response_group.max()) + 1
        K = int(response_rank.max()) + 1
        if G * K != response_group.numel():
            raise ValueError(f"{response_group.numel()} responses do not fill {G} groups of {K} ranks")
        group_index = torch.full((G, K), -1, dtype=torch.int64, device=response_group.device)
        group_index[response_group, response_rank] = torch.arange(response_group.numel(), device=group_index.device)
        return cls(token_response.to(torch.int64), group_index)

    def to(self, device) -> ResponseLayout:
        return ResponseLayout(self.token_response.to(device), self.group_index.to(device))


@dataclass(frozen=True)
class PreferenceInputs:
    """Everything an objective reads: per-response statistics shaped `[G, K]`, plus optional per-group data.

    logps           [G, K] fp32  policy log-prob sums S (token-weighted S^w when token weights are used);
                                 carries the gradient.
    num_tokens      [G, K] fp32  completion-token counts n (None when unknown; objectives needing n raise).
    ref_logps       [G, K] or [M, G, K] fp32, no gradient: reference sums (None: reference-free, S_ref = 0).
    ref_weights     [M] weights alpha_m of several references (multi-reference; default uniform).
    nll_logps       [G, K] plain (unweighted) log-prob sums for NLL terms; default `logps`.
    nll_scale       scalar G_total / (chosen tokens in the whole batch): the per-example NLL contribution is
                    -nll_logps[:, 0] * nll_scale, so that its mean over the batch is the token-mean NLL.
                    Default: from this batch. Pass a global count to normalize across micro-batches/ranks.
    wpo_logweights  [G, K] detached `mean_t (logp_t - log sum_v p_v^2)` (WPO); None when not computed.
    beta            [G] per-group beta; replaces the scalar `beta` hyperparameter when given.
    margin          [G] per-group offset subtracted from the logit z (ODPO Delta_i); losses of the form
                    f(beta * d) accept it, the others raise.
    weight          [G] per-group loss weight.
    labels          [G] bool, unpaired data: True = desirable (KTO).
    kl              scalar, detached KTO reference point z0 (None: 0).
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    ref_weights: torch.Tensor | None = None
    nll_logps: torch.Tensor | None = None
    nll_scale: torch.Tensor | None = None
    wpo_logweights: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    kl: torch.Tensor | None = None

    def __post_init__(self):
        if self.logps.dim() != 2:
            raise ValueError(f"logps must be [G, K], got {tuple(self.logps.shape)}")
        shape = tuple(self.logps.shape)
        for name in ("num_tokens", "nll_logps", "wpo_logweights"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} must have the shape of logps {shape}, got {tuple(t.shape)}")
        if self.ref_logps is not None and tuple(self.ref_logps.shape[-2:]) != shape:
            raise ValueError(f"ref_logps must be [G, K] = {shape} or [M, G, K], got {tuple(self.ref_logps.shape)}")
        for name in ("beta", "margin", "weight", "labels"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape[:1]:
                raise ValueError(f"{name} must be [G] = [{shape[0]}], got {tuple(t.shape)}")

    @property
    def num_groups(self) -> int:
        return self.logps.shape[0]

    @property
    def group_size(self) -> int:
        return self.logps.shape[1]

    def replace(self, **changes) -> PreferenceInputs:
        return replace(self, **changes)

    def detach(self) -> PreferenceInputs:
        return replace(self, **{f.name: _detach(getattr(self, f.name)) for f in fields(self)})


class LossOutput(NamedTuple):
    """What every registered objective returns.

    losses   [G] per-example loss; the batch loss is `losses.mean()` (per-pair weights already applied).
    rewards  [G, K] implicit rewards (detached), e.g. beta * (S - S_ref) or beta * S / n.
    metrics  extra detached scalar metrics, e.g. `nll_loss`, `log_odds_ratio`, `kl`.
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    metrics: dict

    @property
    def chosen_rewards(self) -> torch.Tensor:
        return self.rewards[:, 0]

    @property
    def rejected_rewards(self) -> torch.Tensor:
        """Rank-1 rewards (the rejected response of a pair)."""
        return self.rewards[:, 1]


class PairLosses(NamedTuple):
    """TRL's `(losses, chosen_rewards, rejected_rewards)`, each `[B]`."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class UnpairedLosses(NamedTuple):
    """KTO-style outputs, each `[B]` in example order, plus the reference point `kl` (scalar)."""

    losses: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


class SequenceStats(NamedTuple):
    """Per-response statistics reduced from per-token head outputs, each `[R]` fp32.

    logps       sum_t w_t logp_t (with gradient in the generic path)
    nll_logps   sum_t logp_t (plain; equals logps without token weights)
    num_tokens  completion-token count n
    logits_sum  sum_t mean_v z_tv (for TRL's `logits/*` metrics)
    wpo         mean_t (logp_t - log sum_v p_tv^2), detached
    """

    logps: torch.Tensor
    nll_logps: torch.Tensor
    num_tokens: torch.Tensor
    logits_sum: torch.Tensor
    wpo: torch.Tensor


class FusedLossOutput(NamedTuple):
    """Result of `fused_linear_preference_loss`.

    loss       scalar, differentiable in hidden / weight / bias
    losses     [G] per-example losses (detached)
    rewards    [G, K] (detached)
    logps      [G, K] policy log-probs fed to the objective (detached; S, S^w, or S / n)
    num_tokens [G, K] completion-token counts
    logits_sum [G, K] sum over completion tokens of the per-token mean logit
    metrics    TRL-named detached scalars: rewards/*, logps/*, logits/*, nll_loss where used, ...
    """

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    logps: torch.Tensor
    num_tokens: torch.Tensor
    logits_sum: torch.Tensor
    metrics: dict


def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    return type(x).__name__
