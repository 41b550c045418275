"""Value types of `fastpo.losses`: the response layout, the objectives' inputs and outputs.

Shapes: N head rows (tokens), R responses, G groups (examples: a pair, a K-list, or one unpaired
response), K responses per group (rank 0 = chosen / best), M reference models.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch


class Bucket(NamedTuple):
    """The groups of one size K in a layout: the objectives run on each bucket's dense `[G_b, K]` inputs.

    groups  [G_b] int64 group ids of the bucket, or None when the bucket holds every group in order
    index   [G_b, K] int64 response ids, rank 0 first
    """

    size: int
    groups: torch.Tensor | None
    index: torch.Tensor


@dataclass(frozen=True)
class ResponseLayout:
    """Which response every head row belongs to, and how responses form ranked groups.

    token_response  [N] int64   response id in [0, R) of each head row. Rows whose target equals
                                `ignore_index` (prompt, padding) may carry any valid id: they add nothing.
    group_index     [G, K] int64 response id of rank k in group g, K the largest group; every response appears
                                exactly once. Rank 0 is the chosen (best) response, rank 1 the rejected one
                                (K = 2), or the rest of a ranked list best to worst (K > 2). Unpaired data has
                                K = 1. A group of k < K responses fills ranks 0 .. k-1 and holds -1 after them.
    sizes           host tuple of the G group sizes when they differ (a batch mixing pairs and ranked lists);
                    None when every group has K responses. Set by the constructors below.
    host            a copy of the layout on the CPU (kept by `to`), from which the pair-fused path plans its
                    chunks without reading the device.

    Build it on the CPU (as the packer does) and move it with `to(device)`.
    """

    token_response: torch.Tensor
    group_index: torch.Tensor
    sizes: tuple[int, ...] | None = None
    host: ResponseLayout | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.token_response.dim() != 1 or self.token_response.dtype != torch.int64:
            raise ValueError(f"token_response must be an int64 [N] tensor, got {_describe(self.token_response)}")
        if self.group_index.dim() != 2 or self.group_index.dtype != torch.int64:
            raise ValueError(f"group_index must be an int64 [G, K] tensor, got {_describe(self.group_index)}")
        if self.group_index.shape[0] == 0 or self.group_index.shape[1] == 0:
            raise ValueError(f"group_index must hold at least one group of one response, got "
                             f"{tuple(self.group_index.shape)}")
        if self.sizes is not None and len(self.sizes) != self.group_index.shape[0]:
            raise ValueError(f"sizes has {len(self.sizes)} entries for {self.group_index.shape[0]} groups")
        # values are checked where they can be read without a device sync (host data)
        if self.group_index.device.type == "cpu":
            self._check_groups()
        if self.token_response.device.type == "cpu" and self.token_response.numel():
            lo, hi = int(self.token_response.min()), int(self.token_response.max())
            if lo < 0 or hi >= self.num_responses:
                raise ValueError(f"token_response values must lie in [0, R={self.num_responses}), got [{lo}, {hi}]")

    def _check_groups(self):
        G, K = self.group_index.shape
        sizes = torch.tensor(self.sizes if self.sizes is not None else [K] * G)
        if bool((sizes < 1).any() or (sizes > K).any()):
            raise ValueError(f"group sizes must lie in [1, K={K}], got {sizes.tolist()}")
        filled = torch.arange(K)[None, :] < sizes[:, None]
        if not torch.equal(self.group_index >= 0, filled):
            raise ValueError("group_index must hold response ids in ranks 0 .. size-1 of each group and -1 after")
        ids = self.group_index[filled].sort().values
        if not torch.equal(ids, torch.arange(ids.numel())):
            raise ValueError("group_index must list every response id 0..R-1 exactly once")

    @property
    def num_groups(self) -> int:
        return self.group_index.shape[0]

    @property
    def group_size(self) -> int:
        """K, the size of the largest group."""
        return self.group_index.shape[1]

    @property
    def num_responses(self) -> int:
        return self.group_index.numel() if self.sizes is None else sum(self.sizes)

    @property
    def present(self) -> torch.Tensor:
        """[G, K] bool: rank k of group g holds a response."""
        return self.group_index >= 0

    def buckets(self) -> tuple[Bucket, ...]:
        """The groups by size, from the host sizes (no device read): one bucket of all groups when uniform."""
        if self.sizes is None:
            return (Bucket(self.group_size, None, self.group_index),)
        out = []
        for k in sorted(set(self.sizes)):
            ids = torch.tensor([g for g, n in enumerate(self.sizes) if n == k], device=self.group_index.device)
            out.append(Bucket(k, ids, self.group_index.index_select(0, ids)[:, :k]))
        return tuple(out)

    def group_of_response(self) -> torch.Tensor:
        """[R] int64 group id of every response."""
        present = self.present
        group_ids = torch.arange(self.num_groups, device=present.device)[:, None].expand_as(present)
        out = torch.empty(self.num_responses, dtype=torch.int64, device=present.device)
        return out.index_put_((self.group_index[present],), group_ids[present])

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
        token_response = torch.arange(num_rows).repeat_interleave(seq_len)
        group_index = torch.stack([torch.arange(B), torch.arange(B, 2 * B)], 1)
        return cls(token_response, group_index).to(device)

    @classmethod
    def unpaired(cls, num_rows: int, seq_len: int, device=None) -> ResponseLayout:
        """One response per row and per group (KTO): `[B, T]` rows, K = 1."""
        token_response = torch.arange(num_rows).repeat_interleave(seq_len)
        return cls(token_response, torch.arange(num_rows)[:, None]).to(device)

    @classmethod
    def from_groups(cls, token_response, response_group, response_rank) -> ResponseLayout:
        """From per-response group ids `[R]` and ranks `[R]` (as `fastpo.packing` emits them), on the host.
        Groups may differ in size (ranks 0 .. k-1 each)."""
        response_group, response_rank = response_group.cpu(), response_rank.cpu()
        if response_group.numel() == 0:
            raise ValueError("a layout needs at least one response")
        G = int(response_group.max()) + 1
        K = int(response_rank.max()) + 1
        group_index = torch.full((G, K), -1, dtype=torch.int64)
        group_index[response_group, response_rank] = torch.arange(response_group.numel())
        counts = torch.bincount(response_group, minlength=G)
        sizes = None if bool((counts == K).all()) else tuple(counts.tolist())
        return cls(token_response.to(torch.int64).cpu(), group_index, sizes)

    def to(self, device) -> ResponseLayout:
        """The layout on `device`, keeping (or recording) its host copy."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if self.token_response.device == device and self.group_index.device == device:
            return self
        on_host = self.token_response.device.type == "cpu"
        host = self.host if self.host is not None else (self if on_host else None)
        return ResponseLayout(self.token_response.to(device), self.group_index.to(device), self.sizes, host)

    def on_host(self) -> ResponseLayout:
        """The CPU copy (a device read only when the layout was built on the device)."""
        return self.host if self.host is not None else self.to("cpu")


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
    metrics  the objective's own detached per-example metrics, each [G], reported as their mean over
             examples: `nll_loss` (the example's NLL contribution), `log_odds_ratio`, `log_odds_chosen`,
             `kl` (KTO's z0, the same for every example of the batch).
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
    """Result of `fused_linear_preference_loss`. Ranks are padded to the largest group K (0 where a group has
    fewer responses; `present` says which ranks hold one).

    loss         scalar, differentiable in hidden / weight / bias: sum of `losses` / the normalizer
                 (the number of groups by default: the mean)
    losses       [G] per-example losses (detached; weights and the example mask applied)
    rewards      [G, K] (detached)
    logps        [G, K] policy log-probs fed to the objective (detached; S, S^w, or S / n)
    num_tokens   [G, K] completion-token counts
    logits_sum   [G, K] sum over completion tokens of the per-token mean logit
    present      [G, K] bool
    metrics      TRL-named detached 0-d means over this batch (`fastpo.losses.metrics`)
    metric_sums  the sums those means come from, to add across micro-batches and ranks
    """

    loss: torch.Tensor
    losses: torch.Tensor
    rewards: torch.Tensor
    logps: torch.Tensor
    num_tokens: torch.Tensor
    logits_sum: torch.Tensor
    present: torch.Tensor
    metrics: dict
    metric_sums: dict


def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    return type(x).__name__
