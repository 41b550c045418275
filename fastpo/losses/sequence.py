"""TRL-style losses on sequence log-probs: `dpo_loss(policy_chosen_logps, ...) -> (losses, chosen_rewards,
rejected_rewards)` and siblings. Each packs its arguments into `PreferenceInputs` and calls the registry.

Shapes: B pairs (or examples), K ranked responses, M reference models, T token positions.
Values are fp32 (or float64) per-sequence sums over completion tokens unless a function says otherwise.
"""

from __future__ import annotations

import torch

from fastpo.losses.objectives import LOSSES, preference_loss
from fastpo.losses.types import LossOutput, PairLosses, PreferenceInputs, ResponseLayout, UnpairedLosses


def _check_same(a, b, what):
    if a is not None and b is not None and a.shape != b.shape:
        raise ValueError(f"{what}: chosen has shape {tuple(a.shape)} but rejected has {tuple(b.shape)} "
                         "(one chosen and one rejected value per pair)")


def _check_counts(n):
    """Token counts must be >= 1 (checked when they live on the CPU; device values are never read)."""
    if n is not None and not n.is_cuda and bool((n < 1).any()):
        raise ValueError("num_tokens: every response needs at least one completion token (got a count < 1)")


def _stack(chosen, rejected, what):
    if chosen is None and rejected is None:
        return None
    if chosen is None or rejected is None:
        raise ValueError(f"{what}: pass both the chosen and the rejected values, or neither")
    _check_same(chosen, rejected, what)
    return torch.stack([chosen, rejected], -1)


def _pair_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_num_tokens, rejected_num_tokens, **extra):
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps must be [B], got {tuple(policy_chosen_logps.shape)}")
    logps = _stack(policy_chosen_logps, policy_rejected_logps, "policy logps")
    n = _stack(chosen_num_tokens, rejected_num_tokens, "num_tokens")
    _check_counts(n)
    ref = _stack(ref_chosen_logps, ref_rejected_logps, "reference logps")
    if ref is not None and ref.shape[-2] != logps.shape[0]:
        raise ValueError(f"reference logps have {ref.shape[-2]} pairs, the policy has {logps.shape[0]}")
    n = None if n is None else n.to(torch.promote_types(n.dtype, torch.float32))
    return PreferenceInputs(logps=logps, num_tokens=n, ref_logps=ref, **extra)


def dpo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
    beta=0.1, loss_type="sigmoid", loss_weights=None, chosen_num_tokens=None, rejected_num_tokens=None,
    margin=None, weight=None, ref_weights=None, use_weighting=False, chosen_wpo_logweights=None,
    rejected_wpo_logweights=None, nll_scale=None, **hparams,
) -> PairLosses:
    """DPO and its family (TRL `loss_type`, a name or a list with `loss_weights`) on sequence log-probs.

    policy_*_logps [B] sums over completion tokens (with gradient); ref_*_logps [B], or [M, B] for several
    reference models weighted by `ref_weights` [M] (uniform by default); None for reference-free.
    beta: a float, or a [B] tensor of per-pair betas. margin [B]: ODPO offset. weight [B]: per-pair weights.
    chosen/rejected_num_tokens [B]: counts, needed by ipo, sigmoid_norm and NLL terms.
    *_wpo_logweights [B]: mean_t (logp_t - log sum p^2), for `use_weighting` (WPO).
    hparams: label_smoothing, discopop_tau, f_divergence_type, f_alpha_divergence_coef, rpo_alpha, ...
    (an option that no selected loss uses raises).
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the batch loss is losses.mean().
    """
    per_pair_beta = isinstance(beta, torch.Tensor)
    inputs = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_num_tokens, rejected_num_tokens, ref_weights=ref_weights, margin=margin, weight=weight,
        beta=beta if per_pair_beta else None, nll_scale=nll_scale,
        wpo_logweights=_stack(chosen_wpo_logweights, rejected_wpo_logweights, "wpo_logweights"),
    )
    if not per_pair_beta and _takes_beta(loss_type):
        hparams["beta"] = beta
    out = preference_loss(loss_type, inputs, loss_weights=loss_weights, use_weighting=use_weighting, **hparams)
    return PairLosses(out.losses, out.chosen_rewards, out.rejected_rewards)


def _takes_beta(loss_type):
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    return any(n in LOSSES and "beta" in LOSSES[n].hparams for n in names)


def _mean_inputs(chosen, rejected, chosen_num_tokens, rejected_num_tokens, **extra):
    """Sums with counts, or (counts None) already-averaged log-probs fed as one-token sums."""
    if chosen_num_tokens is None and rejected_num_tokens is None:
        ones = torch.ones_like(chosen)
        chosen_num_tokens, rejected_num_tokens = ones, ones
    return _pair_inputs(chosen, rejected, None, None, chosen_num_tokens, rejected_num_tokens, **extra)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1, gamma=0.5, label_smoothing=0.0,
               chosen_num_tokens=None, rejected_num_tokens=None) -> PairLosses:
    """SimPO. With counts the logps are sums (M = S / n); without, they are already per-token means
    (TRL CPOTrainer / Liger convention). Rewards beta * M."""
    inputs = _mean_inputs(policy_chosen_logps, policy_rejected_logps, chosen_num_tokens, rejected_num_tokens)
    out = LOSSES["simpo"](inputs, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    return PairLosses(out.losses, out.chosen_rewards, out.rejected_rewards)


def cpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1, label_smoothing=0.0, cpo_alpha=1.0,
             chosen_num_tokens=None, rejected_num_tokens=None) -> PairLosses:
    """CPO on summed log-probs; the NLL term (cpo_alpha > 0) needs the token counts."""
    inputs = _pair_inputs(
        policy_chosen_logps, policy_rejected_logps, None, None, chosen_num_tokens, rejected_num_tokens
    )
    out = LOSSES["cpo"](inputs, beta=beta, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha)
    return PairLosses(out.losses, out.chosen_rewards, out.rejected_rewards)


def orpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1, compute_nll_loss=True,
              chosen_num_tokens=None, rejected_num_tokens=None) -> PairLosses:
    """ORPO. With counts the logps are sums; without, per-token means (then no NLL term is possible)."""
    if chosen_num_tokens is None and compute_nll_loss:
        raise ValueError("orpo_loss: the NLL term needs chosen_num_tokens / rejected_num_tokens "
                         "(or pass compute_nll_loss=False with mean log-probs)")
    inputs = _mean_inputs(policy_chosen_logps, policy_rejected_logps, chosen_num_tokens, rejected_num_tokens)
    out = LOSSES["orpo"](inputs, beta=beta, compute_nll_loss=compute_nll_loss)
    return PairLosses(out.losses, out.chosen_rewards, out.rejected_rewards)


def kto_loss(policy_logps, ref_logps, labels, *, beta=0.1, kl=None, desirable_weight=1.0, undesirable_weight=1.0,
             loss_type="kto") -> UnpairedLosses:
    """KTO (or `apo_zero_unpaired`) on unpaired examples: policy_logps, ref_logps [B], labels [B] bool
    (True = desirable), kl = z0 (scalar, see `kto_reference_point`). Returns (losses, rewards, kl)."""
    if policy_logps.shape != labels.shape or (ref_logps is not None and ref_logps.shape != policy_logps.shape):
        raise ValueError("policy_logps, ref_logps and labels must all be [B]")
    inputs = PreferenceInputs(logps=policy_logps[:, None], ref_logps=None if ref_logps is None else ref_logps[:, None],
                              labels=labels.bool(), kl=kl)
    weights = dict(desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    out = preference_loss(loss_type, inputs, beta=beta, **(weights if loss_type == "kto" else {}))
    z0 = torch.zeros((), device=policy_logps.device) if kl is None else kl.detach().float()
    return UnpairedLosses(out.losses, out.rewards[:, 0], z0)


def plackett_luce_loss(policy_logps, ref_logps=None, *, beta=0.1) -> LossOutput:
    """Listwise DPO over [B, K] responses ranked best first (ref_logps [B, K] or None)."""
    return LOSSES["plackett_luce"](PreferenceInputs(logps=policy_logps, ref_logps=ref_logps), beta=beta)


def sequence_logps(token_logps, mask, token_weights=None):
    """S^w = sum_t w_t m_t logp_t over [B, T] per-token log-probs (fp32); w = 1 when not given."""
    acc = torch.promote_types(token_logps.dtype, torch.float32)
    w = mask.to(acc) if token_weights is None else token_weights.to(acc) * mask
    return (token_logps.to(acc) * w).sum(-1)


def ld_weights(chosen_mask, rejected_mask, ld_alpha):
    """LD-DPO positional weights for [B, T] completion masks: 1 for the first min(n_w, n_l) completion
    tokens of each response, ld_alpha after (TRL 1.16, applied to policy and reference alike). The
    [2B, T] rows go through `stats.ld_token_weights`, the one definition of the rule."""
    from fastpo.losses.stats import ld_token_weights

    masks = torch.cat([chosen_mask, rejected_mask]).bool()
    layout = ResponseLayout.chosen_rejected(masks.shape[0], masks.shape[1], device=masks.device)
    w = ld_token_weights(layout, masks.flatten(), ld_alpha).view(masks.shape) * masks
    return w.chunk(2)
