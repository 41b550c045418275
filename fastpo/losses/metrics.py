"""TRL's preference metrics, defined once: per-batch sums on the device, and the means reported from them.

Shapes: G groups (examples), K ranks (the largest group).

`metric_sums` turns one batch's per-group results into detached 0-d sums (masked by the example mask),
which add across micro-batches and ranks; `metric_means` turns totals into TRL-named means. The fused
losses report `metric_means(metric_sums(batch))`; the trainer adds the sums of a step's micro-batches,
all-reduces them once, and reports `metric_means` of the totals, so both give the same numbers for the
same examples.

Roles: with K >= 2 "chosen" is rank 0 and "rejected" pools the ranks >= 1 a group has (K = 2: the rejected
response); unpaired data (K = 1) splits examples by their desirability label (KTO). Definitions (LOSSES.md
section 3): `rewards/<role>`, `logps/<role>` are means over the role's responses; `logits/<role>` is the
token-weighted mean over the role's completion tokens of the per-token vocabulary-mean logit;
`rewards/margins` is the chosen mean minus the rejected mean; `rewards/accuracies` the fraction of groups
whose best response's reward is strictly above every other of its group (K = 2: chosen > rejected; ties
count as wrong); `loss` and the objective's own metrics (`nll_loss`, `log_odds_ratio`, ..., `kl`) are
means over examples. Unpaired runs also report `count/chosen`, `count/rejected`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

ROLES = ("chosen", "rejected")
COUNTS = ("count/examples", "count/chosen", "count/rejected", "tokens/chosen", "tokens/rejected")


def _role_masks(result):
    """[G, K] float masks of the chosen and rejected responses, times the example mask."""
    G, K = result.rewards.shape
    mask = result.rewards.new_ones(G) if result.mask is None else result.mask.float()
    if result.labels is not None:
        good = result.labels.bool()[:, None].float()
        return mask, good * mask[:, None], (1.0 - good) * mask[:, None]
    rank = torch.arange(K, device=mask.device)[None, :]
    chosen = (rank == 0).float() * mask[:, None]
    rejected = ((rank > 0) & result.present).float() * mask[:, None]
    return mask, chosen, rejected


def _accurate(result) -> torch.Tensor:
    """[G] 1.0 where the rank-0 reward is strictly above every other response of its group."""
    others = result.rewards[:, 1:].masked_fill(~result.present[:, 1:], float("-inf"))
    return (result.rewards[:, 0] > others.amax(-1)).float()


def metric_sums(result) -> dict[str, torch.Tensor]:
    """Detached 0-d sums of one batch (a `fastpo.losses.stats.GroupResult`), kept on the device."""
    mask, chosen, rejected = _role_masks(result)
    sums = {"loss": result.losses.detach().float().sum(), "count/examples": mask.sum()}
    for role, m in zip(ROLES, (chosen, rejected)):
        sums[f"count/{role}"] = m.sum()
        sums[f"tokens/{role}"] = (result.num_tokens * m).sum()
        sums[f"rewards/{role}"] = (result.rewards * m).sum()
        sums[f"logps/{role}"] = (result.logps * m).sum()
        sums[f"logits/{role}"] = (result.logits_sum * m).sum()
    if result.labels is None and result.rewards.shape[1] > 1:
        sums["rewards/accuracies"] = (_accurate(result) * mask).sum()
    for name, per_example in result.metrics.items():
        sums[name] = (per_example.detach().float() * mask).sum()
    return sums


def _ratio(num, den):
    if isinstance(den, torch.Tensor):
        return num / den.clamp(min=1.0)
    return num / max(den, 1.0)


def metric_means(totals: Mapping[str, float | torch.Tensor], *, unpaired: bool | None = None) -> dict:
    """TRL-named means from `metric_sums` totals (floats after a reduction, or device tensors).

    A role with no response in the totals is left out (as TRL does for KTO steps holding one label
    only) when the totals are floats; device tensors are never read, so there such means are 0.
    `unpaired` (default: inferred from the totals) adds the example counts per role.
    """
    if unpaired is None:
        unpaired = "rewards/accuracies" not in totals
    out = {"loss": _ratio(totals["loss"], totals["count/examples"])}
    for role in ROLES:
        n = totals[f"count/{role}"]
        if not isinstance(n, torch.Tensor) and n <= 0:
            continue
        for key in ("rewards", "logps"):
            out[f"{key}/{role}"] = _ratio(totals[f"{key}/{role}"], n)
        out[f"logits/{role}"] = _ratio(totals[f"logits/{role}"], totals[f"tokens/{role}"])
        if unpaired:
            out[f"count/{role}"] = n
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    for name, value in totals.items():
        if name == "loss" or name in COUNTS or name.split("/")[0] in ("rewards", "logps", "logits"):
            continue
        out[name] = _ratio(value, totals["count/examples"])
    if "rewards/accuracies" in totals:
        out["rewards/accuracies"] = _ratio(totals["rewards/accuracies"], totals["count/examples"])
    return out


def add_sums(total: dict | None, sums: dict) -> dict:
    """Running sum of `metric_sums` dicts (across micro-batches); a key missing on one side counts as 0."""
    if total is None:
        return dict(sums)
    return {k: total[k] + sums[k] if k in total and k in sums else total.get(k, sums.get(k)) for k in total | sums}
