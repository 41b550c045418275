"""Naive reference of the fused preference losses: materialized logits + the same objective code.

Shapes: N head rows, H hidden, V vocabulary, R responses, G groups.

`fused_linear_preference_loss_ref` takes the arguments of `fastpo.losses.fused_linear_preference_loss`
(minus the path / impl / chunking knobs) and computes the `[N, V]` logits with `fastpo.reference`; the
reductions, objectives and metrics are literally the same functions as the fused paths, so a parity failure
points at the head. `upcast=True` runs in fp32 (the ground truth), `upcast=False` in the inputs' dtype (the
"same-dtype PyTorch" bound). Product code: no kernel imports.
"""

from __future__ import annotations

import torch

from fastpo.losses import stats as S
from fastpo.losses.objectives import loss_names
from fastpo.losses.types import FusedLossOutput, ResponseLayout
from fastpo.reference import token_logprobs_ref, token_stats_ref


def _layout(targets, layout, unpaired):
    if layout is not None:
        return layout.to(targets.device)
    build = ResponseLayout.unpaired if unpaired else ResponseLayout.chosen_rejected
    return build(targets.shape[0], targets.shape[1], device=targets.device)


def fused_linear_preference_loss_ref(
    hidden, weight, targets, *, loss_type="sigmoid", layout=None, bias=None,
    ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None, ref_weights=None,
    token_weights=None, ld_alpha=None, average_log_prob=False, use_weighting=False, loss_weights=None,
    pair_beta=None, pair_margin=None, pair_weight=None, labels=None, kl=None, nll_targets=None,
    example_mask=None, nll_scale=None, normalizer=None,
    ignore_index=-100, temperature=1.0, softcap=None, upcast=True, allow_empty_completions=True, **hparams,
) -> FusedLossOutput:
    """Materialized-logits version of `fused_linear_preference_loss`; differentiable by plain autograd.
    Empty completions are not checked here (`allow_empty_completions` is accepted for call parity)."""
    head = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap, upcast=upcast)
    layout = _layout(targets, layout, labels is not None)
    targets_N = targets.reshape(-1).long()
    valid_N = targets_N != ignore_index
    weights_N = S.token_weights_for(layout, valid_N, token_weights, ld_alpha)
    stats = token_stats_ref(hidden, weight, targets_N, bias=bias, **head)
    ref_R = None if ref_logps is None else ref_logps.detach().float()
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logp = token_logprobs_ref(ref_hidden, ref_weight, targets_N, bias=ref_bias, **head)
        ref_R = S.reduce_tokens(layout.token_response, layout.num_responses, ref_logp, valid_N, weights_N).logps
    nll = {}
    if nll_targets is not None:
        nll_N = nll_targets.reshape(-1)
        nll = dict(nll_logp_N=token_logprobs_ref(hidden, weight, nll_N, bias=bias, **head),
                   nll_valid_N=nll_N != ignore_index)
    config = S.PreferenceConfig(loss_names(loss_type), None if loss_weights is None else tuple(loss_weights),
                                use_weighting, average_log_prob, dict(hparams))
    data = S.GroupData(pair_beta, pair_margin, pair_weight, labels, kl, ref_weights, example_mask)
    return S.objective_from_token_stats(stats, targets_N, layout, ref_R, data, config, ignore_index=ignore_index,
                                        weights_N=weights_N, scale=nll_scale, normalizer=normalizer, **nll)
