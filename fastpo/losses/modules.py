"""Drop-in replacements for Liger-Kernel's fused linear preference modules (`liger_kernel.chunked_loss`).

Same constructor arguments and defaults, same `forward` call (chosen rows first, then rejected rows, inputs
already shifted) and the same return structure; the modules only store hyperparameters and call
`fused_linear_preference_loss`. Deliberate differences, all toward TRL's definitions:

- `chosen_logits_mean` / `rejected_logits_mean` (and KTO's logits sums) cover completion tokens only; Liger
  averages over every position of the `[B, T, V]` logits, padding and prompt included.
- an option that has no effect raises instead of being ignored (e.g. `label_smoothing` with
  `loss_type="sigmoid"`; use "robust" or "cdpo"); `use_ref_model=True` without `ref_input` raises.
- the DPO module accepts every pairwise `loss_type` of the registry (including "ipo" and "sigmoid_norm").
- ORPO's log-odds use a stable log1mexp (Liger's `log1p(-exp(x))` loses precision near 0). `nll_target` is
  Liger's full `[2B, T]` tensor (its chosen half is used) or just the chosen rows `[B, T]`; the NLL is the token
  mean over the chosen rows' NLL targets.
- `compiled` is accepted for compatibility; the chunks are not `torch.compile`d. `chunk_size` is the number
  of pairs (examples) per chunk, as in Liger.
"""

from __future__ import annotations

import torch

from fastpo.losses.functional import fused_linear_preference_loss
from fastpo.losses.objectives import preference_loss
from fastpo.losses.types import PreferenceInputs


def _validate(loss_type, loss_weights, unpaired=False, **hparams):
    """Run the objective once on a dummy batch so that bad hyperparameters fail at construction."""
    K = 1 if unpaired else 2
    dummy = PreferenceInputs(logps=-torch.ones(1, K), num_tokens=torch.ones(1, K), ref_logps=-torch.ones(1, K),
                             labels=torch.ones(1, dtype=torch.bool) if unpaired else None)
    preference_loss(loss_type, dummy, loss_weights=loss_weights, **hparams)


def _with_nll(loss_type, compute_nll_loss, alpha):
    if compute_nll_loss:
        return [loss_type, "sft"], [1.0, float(alpha)]
    return [loss_type], None


def _chunk_tokens(chunk_size, target, rows_per_group):
    return max(1, int(chunk_size)) * rows_per_group * target.shape[1]


def _nll_loss(metrics, like):
    return metrics.get("nll_loss", torch.zeros((), device=like.device))


def _chosen_nll_targets(nll_target, target, ignore_index):
    """`[2B, T]` NLL targets for the whole batch: the chosen rows' NLL targets, `ignore_index` on rejected rows."""
    B = target.shape[0] // 2
    if nll_target.dim() != 2 or nll_target.shape[0] not in (B, 2 * B) or nll_target.shape[1:] != target.shape[1:]:
        raise ValueError(f"nll_target must be [2B, T] = {[2 * B, *target.shape[1:]]} (chosen half used) or "
                         f"[B, T] = {[B, *target.shape[1:]]}, got {list(nll_target.shape)}")
    chosen = nll_target[:B]
    return torch.cat([chosen, torch.full_like(chosen, ignore_index)])


def _pair_outputs(out):
    m = out.metrics
    return (out.logps[:, 0], out.logps[:, 1], m["logits/chosen"], m["logits/rejected"], _nll_loss(m, out.loss),
            out.rewards[:, 0], out.rewards[:, 1])


class _FusedPairModule(torch.nn.Module):
    """Shared forward of the paired modules: the subclass fixes the objective in `__init__`."""

    def _setup(self, ignore_index, chunk_size, loss_type, loss_weights, average_log_prob, hparams):
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self._loss = dict(loss_type=loss_type, loss_weights=loss_weights, average_log_prob=average_log_prob, **hparams)
        _validate(loss_type, loss_weights, **hparams)

    def _call(self, lin_weight, _input, target, bias, **extra):
        return fused_linear_preference_loss(
            _input, lin_weight, target, bias=bias, ignore_index=self.ignore_index,
            chunk_tokens=_chunk_tokens(self.chunk_size, target, 2), **self._loss, **extra,
        )


class FusedLinearDPOLoss(_FusedPairModule):
    """`LigerFusedLinearDPOLoss` with the same arguments; returns
    `loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
    rejected_rewards)`. `forward` also takes precomputed `ref_logps` `[2B]` (chosen then rejected)."""

    def __init__(self, ignore_index=-100, beta=0.1, alpha=1.0, compute_nll_loss=False, compiled=True,
                 use_ref_model=True, average_log_prob=False, chunk_size=1, loss_type="sigmoid",
                 label_smoothing=0.0, discopop_tau=0.05):
        super().__init__()
        self.beta, self.alpha, self.compute_nll_loss, self.compiled = beta, alpha, compute_nll_loss, compiled
        self.use_ref_model, self.average_log_prob, self.loss_type = use_ref_model, average_log_prob, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau
        hparams = {"beta": beta}
        if label_smoothing or loss_type == "exo_pair":
            hparams["label_smoothing"] = label_smoothing
        if loss_type == "discopop":
            hparams["discopop_tau"] = discopop_tau
        names, weights = _with_nll(loss_type, compute_nll_loss, alpha)
        self._setup(ignore_index, chunk_size, names, weights, average_log_prob, hparams)

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                ref_logps=None):
        ref = {}
        if self.use_ref_model:
            if ref_input is None and ref_logps is None:
                raise ValueError("use_ref_model=True needs ref_input and ref_weight (or precomputed ref_logps)")
            ref = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps)
        out = self._call(lin_weight, _input, target, bias, **ref)
        return out.loss, _pair_outputs(out)


class FusedLinearSimPOLoss(_FusedPairModule):
    """`LigerFusedLinearSimPOLoss`: SimPO on mean log-probs, plus `alpha` * NLL when `compute_nll_loss`
    (True by default, as in Liger's module). Same 7-tuple as the DPO module."""

    def __init__(self, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True,
                 compiled=True, gamma=0.5, chunk_size=1):
        super().__init__()
        self.beta, self.alpha, self.label_smoothing, self.gamma = beta, alpha, label_smoothing, gamma
        self.compute_nll_loss, self.compiled = compute_nll_loss, compiled
        names, weights = _with_nll("simpo", compute_nll_loss, alpha)
        hparams = dict(beta=beta, gamma=gamma, label_smoothing=label_smoothing)
        self._setup(ignore_index, chunk_size, names, weights, True, hparams)

    def forward(self, lin_weight, _input, target, bias=None):
        out = self._call(lin_weight, _input, target, bias)
        return out.loss, _pair_outputs(out)


class FusedLinearCPOLoss(_FusedPairModule):
    """`LigerFusedLinearCPOLoss`: CPO on summed (or, with `average_log_prob`, mean) log-probs plus
    `alpha` * NLL when `compute_nll_loss`. Same 7-tuple as the DPO module."""

    def __init__(self, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=True,
                 compiled=True, average_log_prob=False, chunk_size=1):
        super().__init__()
        self.beta, self.alpha, self.label_smoothing = beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled, self.average_log_prob = compute_nll_loss, compiled, average_log_prob
        names, weights = _with_nll("cpo", compute_nll_loss, alpha)
        hparams = dict(beta=beta, label_smoothing=label_smoothing, cpo_alpha=0.0)
        self._setup(ignore_index, chunk_size, names, weights, average_log_prob, hparams)

    def forward(self, lin_weight, _input, target, bias=None):
        out = self._call(lin_weight, _input, target, bias)
        return out.loss, _pair_outputs(out)


class FusedLinearORPOLoss(_FusedPairModule):
    """`LigerFusedLinearORPOLoss`: NLL (when `compute_nll_loss`) - beta * log sigmoid(log-odds ratio) on mean
    log-probs. Returns the 7-tuple plus `log_odds_ratio`, `log_odds_chosen`. `nll_target` (`[2B, T]` as Liger's
    callers pass it, or the chosen rows `[B, T]`) gives the NLL its own targets for the chosen rows."""

    def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=True, compiled=True, chunk_size=1):
        super().__init__()
        self.beta, self.compute_nll_loss, self.compiled = beta, compute_nll_loss, compiled
        self._setup(ignore_index, chunk_size, ["orpo"], None, True,
                    dict(beta=beta, compute_nll_loss=compute_nll_loss))

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        extra = {}
        if nll_target is not None:
            extra["nll_targets"] = _chosen_nll_targets(nll_target, target, self.ignore_index)
        out = self._call(lin_weight, _input, target, bias, **extra)
        m = out.metrics
        return out.loss, (*_pair_outputs(out), m["log_odds_ratio"], m["log_odds_chosen"])


class FusedLinearKTOLoss(torch.nn.Module):
    """`LigerFusedLinearKTOLoss`: input first, `preference_labels` `[B]` bool, optional scalar `kl` (z0).
    Returns `loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
    chosen_rewards_sum, rejected_rewards_sum)`, sums over desirable / undesirable examples."""

    def __init__(self, ignore_index=-100, beta=0.1, compiled=True, use_ref_model=False, average_log_prob=False,
                 chunk_size=1):
        super().__init__()
        self.ignore_index, self.beta, self.compiled = ignore_index, beta, compiled
        self.use_ref_model, self.average_log_prob, self.chunk_size = use_ref_model, average_log_prob, chunk_size
        _validate("kto", None, unpaired=True, beta=beta)

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None,
                ref_weight=None, ref_bias=None, kl=None):
        if preference_labels is None:
            raise ValueError("preference_labels [B] (True = desirable) is required")
        ref = {}
        if self.use_ref_model:
            if ref_input is None:
                raise ValueError("use_ref_model=True needs ref_input and ref_weight")
            ref = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)
        out = fused_linear_preference_loss(
            _input, lin_weight, target, bias=bias, loss_type="kto", labels=preference_labels.bool(), kl=kl,
            beta=self.beta, ignore_index=self.ignore_index, average_log_prob=self.average_log_prob,
            chunk_tokens=_chunk_tokens(self.chunk_size, target, 1), **ref,
        )
        good = preference_labels.bool()[:, None]
        logits = out.logits_sum * lin_weight.shape[0]
        sums = [(x * good).sum() for x in (out.logps, logits, out.rewards)]
        bads = [(x * ~good).sum() for x in (out.logps, logits, out.rewards)]
        return out.loss, (sums[0], bads[0], sums[1], bads[1], sums[2], bads[2])
