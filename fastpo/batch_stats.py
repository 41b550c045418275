"""From a scored packed batch to the objective's inputs and TRL's metrics.

Shapes: R responses, G examples (groups) of K responses, M completion tokens.

`response_stats` reduces the head's per-token scores to per-response sums (LD-DPO-weighted S, plain S, n,
mean-logit sums, WPO log-weights) with `fastpo.losses.stats.reduce_tokens`; `loss_inputs` shapes them into
`PreferenceInputs` `[G, K]`. A `MetricSet` turns each micro-batch into masked metric sums kept on device
and the step's totals, reduced across ranks once, into means with TRL's names: DPO's for pairs
(`rewards/accuracies`, ...), KTO's for unpaired data (`rewards/chosen` over desirable examples, `kl`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastpo import parallel
from fastpo.losses import PreferenceInputs, ResponseLayout, SequenceStats
from fastpo.losses.stats import ld_token_weights, reduce_tokens
from fastpo.packing import PackedBatch


def group_view(x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[R] -> [G, K] (responses are numbered example-major; every example has K responses)."""
    return x.view(batch.num_examples, batch.num_responses // batch.num_examples)


def response_layout(batch: PackedBatch) -> ResponseLayout:
    """The batch's responses as `fastpo.losses` groups: group g holds responses g*K .. g*K + K - 1, best
    first (built on the batch's device without reading it back)."""
    group_index = torch.arange(batch.num_responses, device=batch.token_response.device)
    return ResponseLayout(batch.token_response, group_index.view(batch.num_examples, -1))


def response_stats(scores, batch: PackedBatch, ld_alpha: float | None = None) -> SequenceStats:
    """Per-response sums [R] of a batch's per-token scores: S (LD-DPO-weighted when `ld_alpha` is set),
    plain S, n, sum of mean logits and the detached WPO log-weight (the last two need extras)."""
    valid = torch.ones_like(scores.token_response, dtype=torch.bool)
    weights = None if ld_alpha is None else ld_token_weights(response_layout(batch), valid, ld_alpha)
    return reduce_tokens(scores.token_response, batch.num_responses, scores.token_logp, valid, weights,
                         scores.mean_logits, scores.log_sum_sq_probs)


def loss_inputs(seq: SequenceStats, ref_logps, batch: PackedBatch, nll_scale, *, labels=None,
                kl=None) -> PreferenceInputs:
    return PreferenceInputs(
        logps=group_view(seq.logps, batch),
        num_tokens=group_view(seq.num_tokens, batch),
        ref_logps=None if ref_logps is None else group_view(ref_logps, batch),
        nll_logps=group_view(seq.nll_logps, batch),
        nll_scale=nll_scale,
        wpo_logweights=group_view(seq.wpo, batch),
        labels=labels,
        kl=kl,
    )


def paired_sums(out, inputs: PreferenceInputs, seq: SequenceStats, batch: PackedBatch, mask) -> dict:
    """Masked sums over this micro-batch of TRL's DPO metrics (rank 0 chosen, rank 1 rejected) and the
    counts their means divide by. Kept on device."""
    rewards = out.rewards.detach()
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    logps = inputs.logps.detach()
    tokens = group_view(seq.num_tokens, batch) * mask[:, None]
    logits = group_view(seq.logits_sum, batch) * mask[:, None]

    def total(x):
        return (x * mask).sum()

    return {
        "rewards/chosen": total(chosen), "rewards/rejected": total(rejected),
        "rewards/accuracies": total((chosen > rejected).float()), "rewards/margins": total(chosen - rejected),
        "logps/chosen": total(logps[:, 0]), "logps/rejected": total(logps[:, 1]),
        "logits/chosen": logits[:, 0].sum(), "logits/rejected": logits[:, 1].sum(),
        "count/examples": mask.sum(), "tokens/chosen": tokens[:, 0].sum(), "tokens/rejected": tokens[:, 1].sum(),
    }  # fmt: skip


def paired_means(t: dict) -> dict:
    """TRL's DPO metrics: means over pairs, `logits/*` over completion tokens."""
    per_pair = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")
    means = {k: t[k] / max(t["count/examples"], 1) for k in per_pair}
    return means | {f"logits/{s}": t[f"logits/{s}"] / max(t[f"tokens/{s}"], 1) for s in ("chosen", "rejected")}


def unpaired_sums(out, inputs: PreferenceInputs, seq: SequenceStats, batch: PackedBatch, mask) -> dict:
    """Masked sums of TRL's KTO metrics over desirable ("chosen") and undesirable ("rejected") examples,
    their counts, and the reference point z0 of this micro-batch (0 when the objective has none)."""
    roles = {"chosen": inputs.labels.float() * mask, "rejected": (~inputs.labels).float() * mask}
    values = {"rewards": out.rewards.detach()[:, 0], "logps": inputs.logps.detach()[:, 0],
              "logits": seq.logits_sum, "tokens": seq.num_tokens}
    sums = {f"{k}/{role}": (v * m).sum() for role, m in roles.items() for k, v in values.items()}
    sums |= {f"count/{role}": m.sum() for role, m in roles.items()}
    kl = torch.zeros((), device=mask.device) if inputs.kl is None else inputs.kl.detach().float()
    return sums | {"kl": kl, "count/batches": torch.ones((), device=mask.device)}


def unpaired_means(t: dict) -> dict:
    """TRL's KTO metrics: `rewards/*`, `logps/*` means over the desirable / undesirable examples of the
    step (a role absent from the step is left out, as TRL does), `logits/*` over their completion tokens,
    `rewards/margins` their difference, `count/*` the examples, `kl` the mean z0 of the micro-batches."""
    means = {"kl": t["kl"] / max(t["count/batches"], 1)}
    for role in ("chosen", "rejected"):
        n = t[f"count/{role}"]
        if n > 0:
            means |= {f"rewards/{role}": t[f"rewards/{role}"] / n, f"logps/{role}": t[f"logps/{role}"] / n,
                      f"logits/{role}": t[f"logits/{role}"] / max(t[f"tokens/{role}"], 1), f"count/{role}": n}
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


@dataclass(frozen=True)
class MetricSet:
    """How a micro-batch becomes metric sums (on device) and the step's sums become reported means."""

    sums: Callable[..., dict]
    """(LossOutput, PreferenceInputs, SequenceStats, PackedBatch, mask [G]) -> {name: 0-d sum on device}."""
    means: Callable[[dict], dict]
    """{name: step total over ranks} -> {TRL metric name: value}."""


PAIRED_METRICS = MetricSet(paired_sums, paired_means)
UNPAIRED_METRICS = MetricSet(unpaired_sums, unpaired_means)


def add_sums(total: dict | None, sums: dict) -> dict:
    return sums if total is None else {k: total[k] + v for k, v in sums.items()}


def finish_metrics(sums: dict, loss_sum: torch.Tensor, metric_set: MetricSet) -> dict:
    """Reduce across ranks once and turn sums into TRL-named means (one host sync per step)."""
    values = torch.stack([*(v.float() for v in sums.values()), loss_sum.reshape(()).float()])
    *totals, loss = parallel.all_reduce_sum(values).tolist()
    return {"loss": loss, **metric_set.means(dict(zip(sums, totals)))}
