"""Preference objectives on per-sequence statistics, and the `LOSSES` registry.

Uniform contract. Every registered objective is called as

    LOSSES[name](inputs: PreferenceInputs, **hyperparameters) -> LossOutput(losses [G], rewards [G, K], metrics)

and `preference_loss(loss_type, inputs, loss_weights=..., use_weighting=..., **hyperparameters)` combines
one or several of them (TRL's `loss_type` list with `loss_weights`), applies per-group weights and WPO
weighting, and returns the same `LossOutput`. The batch loss is `output.losses.mean()`. A trainer picks the
objective by name and never branches on it; `LOSSES[name].pair_local` says whether the per-group gradient
depends on that group alone (then the pair-fused head may be used).

Notation (LOSSES.md): S policy log-prob sum over completion tokens, S_ref reference sum, n token count,
M = S / max(n, 1), rho = S - S_ref (with several references S_ref = sum_m alpha_m S_ref_m), c = rho(chosen),
r = rho(rejected), phi the f-divergence score (identity for reverse KL), d = phi(c) - phi(r),
z = beta * d - margin, l(z) = -log sigmoid(z) = softplus(-z). All math in fp32 with `F.logsigmoid`.
Hyperparameters are validated on the host; tensor values are never inspected (no device syncs).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastpo.losses.types import LossOutput, PreferenceInputs

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# validation and shared pieces
# ----------------------------------------------------------------------------------------------------


def _up(x):
    """x in at least fp32 (float64 stays float64, for exact gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_beta(beta, name="beta"):
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {beta!r}")


def _check_label_smoothing(eps, name, *, positive=False):
    """eps in [0, 0.5), or in (0, 0.5) where the loss takes log(eps) (EXO). The messages keep Liger-Kernel's
    wording, so code matching its errors keeps working."""
    ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0.0 <= eps < 0.5
    if ok and positive and eps <= 0.0:
        raise ValueError(f"label_smoothing must be > 0 for loss_type={name!r} (it lies in (0, 0.5)), got {eps!r}")
    if not ok:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type={name!r}, got {eps!r}")


def _check_weight(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _no_margin(inputs, name):
    if inputs.margin is not None:
        raise ValueError(f"loss {name!r} does not take a per-group margin (inputs.margin); "
                         "use a loss of the form f(beta * d - margin), e.g. 'sigmoid'")


def _pair(x, name):
    if x.shape[-1] != 2:
        raise ValueError(f"loss {name!r} needs pairs (K = 2 responses per group), got K = {x.shape[-1]}")
    return x[..., 0], x[..., 1]


def _ref_sum(inputs):
    """S_ref as [G, K]: 0 without a reference, sum_m alpha_m S_ref_m with several (alpha uniform by default)."""
    ref = inputs.ref_logps
    if ref is None:
        return torch.zeros_like(inputs.logps)
    if ref.dim() == 2:
        return _up(ref.detach())
    alpha = inputs.ref_weights
    if alpha is None:
        alpha = torch.full((ref.shape[0],), 1.0 / ref.shape[0], device=ref.device)
    return (_up(alpha)[:, None, None] * _up(ref.detach())).sum(0)


def logratios(inputs: PreferenceInputs) -> torch.Tensor:
    """rho = S - S_ref, [G, K] fp32."""
    return _up(inputs.logps) - _ref_sum(inputs)


def _beta(inputs, beta):
    """beta as a [G, 1] column (per-group beta when given, else the scalar)."""
    _check_beta(beta)
    if inputs.beta is None:
        return beta
    return _up(inputs.beta)[:, None]


def _rewards(inputs, beta):
    return (_beta(inputs, beta) * logratios(inputs)).detach()


def _counts(inputs, name):
    if inputs.num_tokens is None:
        raise ValueError(f"loss {name!r} needs num_tokens (completion-token counts)")
    return _up(inputs.num_tokens).clamp(min=1.0)


def f_divergence_scores(rho, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """phi(rho) of Wang et al., *Beyond Reverse KL* (TRL 1.16 forms, fp32, exponent clamped at 80)."""
    if f_divergence_type == "reverse_kl":
        return rho
    if f_divergence_type == "forward_kl":
        return 1.0 - torch.exp(-rho)
    if f_divergence_type == "js_divergence":
        return _LN2 + F.logsigmoid(rho)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return rho
        return torch.expm1(((a - 1.0) * rho).clamp(max=80.0)) / (a - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")


def _margin_logit(inputs, beta, name, fdiv, falpha, normalize=False):
    """z = beta * (phi(c) [/ n_w] - phi(r) [/ n_l]) - margin, [G]."""
    phi = f_divergence_scores(logratios(inputs), fdiv, falpha)
    if normalize:
        phi = phi / _counts(inputs, name)
    c, r = _pair(phi, name)
    z = _beta(inputs, beta) * (c - r)[:, None]
    z = z[:, 0]
    return z if inputs.margin is None else z - _up(inputs.margin)


def _smoothed_logistic(z, eps):
    """(1 - eps) l(z) + eps l(-z)."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def nll_terms(inputs: PreferenceInputs) -> torch.Tensor:
    """Per-example NLL contribution -S_w * nll_scale, [G]; its mean is the token-mean chosen NLL.

    nll_scale = G / sum_g n_w,g unless the inputs carry a (global) one.
    """
    nll_logps = inputs.logps if inputs.nll_logps is None else inputs.nll_logps
    scale = inputs.nll_scale
    if scale is None:
        if inputs.num_tokens is None:
            raise ValueError("the NLL term needs num_tokens (or a precomputed nll_scale)")
        scale = inputs.num_groups / _up(inputs.num_tokens[:, 0]).sum().clamp(min=1.0)
    return -_up(nll_logps[:, 0]) * scale


def _out(losses, rewards, **metrics):
    """LossOutput with detached per-example metrics (each [G]; reported as their mean over examples)."""
    return LossOutput(losses, rewards, {k: v.detach() for k, v in metrics.items()})


# ----------------------------------------------------------------------------------------------------
# A. reference-based pairwise losses (TRL DPOConfig.loss_type)
# ----------------------------------------------------------------------------------------------------


def sigmoid(inputs, *, beta=0.1, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """DPO. Rafailov et al., *Direct Preference Optimization: Your Language Model is Secretly a Reward Model*.

    L = -log sigmoid(z),  z = beta * (phi(c) - phi(r)) - margin;  rewards beta * rho.
    """
    z = _margin_logit(inputs, beta, "sigmoid", f_divergence_type, f_alpha_divergence_coef)
    return _out(-F.logsigmoid(z), _rewards(inputs, beta))


def hinge(inputs, *, beta=0.1, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """SLiC-HF / RSO hinge-norm. Zhao et al., *SLiC-HF*; Liu et al., *Statistical Rejection Sampling
    Improves Preference Optimization*.  L = max(0, 1 - z).
    """
    z = _margin_logit(inputs, beta, "hinge", f_divergence_type, f_alpha_divergence_coef)
    return _out(torch.relu(1.0 - z), _rewards(inputs, beta))


def ipo(inputs, *, beta=0.1, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """IPO. Azar et al., *A General Theoretical Paradigm to Understand Learning from Human Preferences*.

    L = (phi(c)/n_w - phi(r)/n_l - 1/(2 beta))^2, beta playing tau (TRL's length-normalized form).
    """
    _no_margin(inputs, "ipo")
    phi = f_divergence_scores(logratios(inputs), f_divergence_type, f_alpha_divergence_coef) / _counts(inputs, "ipo")
    c, r = _pair(phi, "ipo")
    losses = ((c - r)[:, None] - 1.0 / (2.0 * _beta(inputs, beta))) ** 2
    return _out(losses[:, 0], _rewards(inputs, beta))


def exo_pair(inputs, *, beta=0.1, label_smoothing=1e-3, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """EXO. Ji et al., *Towards Efficient and Exact Optimization of Language Model Alignment* (Eq. 16).

    q_w = sigmoid(z), q_l = sigmoid(-z);  L = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps), eps > 0.
    """
    _check_label_smoothing(label_smoothing, "exo_pair", positive=True)
    z = _margin_logit(inputs, beta, "exo_pair", f_divergence_type, f_alpha_divergence_coef)
    eps = label_smoothing
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return _out(losses, _rewards(inputs, beta))


def nca_pair(inputs, *, beta=0.1):
    """NCA. Chen et al., *Noise Contrastive Alignment of Language Models with Explicit Rewards*.

    L = l(beta c) + l(-beta c)/2 + l(-beta r)/2.
    """
    _no_margin(inputs, "nca_pair")
    rewards = _beta(inputs, beta) * logratios(inputs)
    c, r = _pair(rewards, "nca_pair")
    losses = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    return _out(losses, rewards.detach())


def robust(inputs, *, beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """Robust DPO. Chowdhury et al., *Provably Robust DPO: Aligning Language Models with Noisy Feedback*.

    L = [(1 - eps) l(z) - eps l(-z)] / (1 - 2 eps), eps = label-flip rate in [0, 0.5).
    """
    _check_label_smoothing(label_smoothing, "robust")
    z = _margin_logit(inputs, beta, "robust", f_divergence_type, f_alpha_divergence_coef)
    eps = label_smoothing
    losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return _out(losses, _rewards(inputs, beta))


def cdpo(inputs, *, beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """Conservative DPO (TRL <= 0.28 `sigmoid` with label smoothing). Mitchell, *A note on DPO with noisy
    preferences*.  L = (1 - eps) l(z) + eps l(-z).
    """
    _check_label_smoothing(label_smoothing, "cdpo")
    z = _margin_logit(inputs, beta, "cdpo", f_divergence_type, f_alpha_divergence_coef)
    return _out(_smoothed_logistic(z, label_smoothing), _rewards(inputs, beta))


def bco_pair(inputs, *, beta=0.1):
    """BCO (paired form of TRL 1.16 / Liger). Jung et al., *Binary Classifier Optimization for Large
    Language Model Alignment*.  L = l(beta c) + l(-beta r). TRL <= 0.28 also subtracted a running mean
    of the rewards; that variant is not provided.
    """
    _no_margin(inputs, "bco_pair")
    rewards = _beta(inputs, beta) * logratios(inputs)
    c, r = _pair(rewards, "bco_pair")
    return _out(-F.logsigmoid(c) - F.logsigmoid(-r), rewards.detach())


def sppo_hard(inputs, *, beta=0.1):
    """SPPO, hard labels. Wu et al., *Self-Play Preference Optimization for Language Model Alignment*.

    L = (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2.
    """
    _no_margin(inputs, "sppo_hard")
    b = _beta(inputs, beta)
    c, r = _pair(logratios(inputs), "sppo_hard")
    half = 0.5 / b if isinstance(b, float) else 0.5 / b[:, 0]
    return _out((c - half) ** 2 + (r + half) ** 2, _rewards(inputs, beta))


def aot(inputs, *, beta=0.1, label_smoothing=0.0):
    """AOT, paired. Melnyk et al., *Distributional Preference Alignment of LLMs via Optimal Transport*.

    Delta = sort(S_w - S_l) - sort(S_ref,w - S_ref,l) over the batch (ascending);
    L_i = (1 - eps) l(beta Delta_i) + eps l(-beta Delta_i). Batch-coupled: never pair-fused.
    """
    _no_margin(inputs, "aot")
    _check_label_smoothing(label_smoothing, "aot")
    s_w, s_l = _pair(_up(inputs.logps), "aot")
    ref_w, ref_l = _pair(_ref_sum(inputs), "aot")
    delta = torch.sort(s_w - s_l).values - torch.sort(ref_w - ref_l).values
    z = (_beta(inputs, beta) * delta[:, None])[:, 0]
    return _out(_smoothed_logistic(z, label_smoothing), _rewards(inputs, beta))


def aot_unpaired(inputs, *, beta=0.1, label_smoothing=0.0):
    """AOT, unpaired (TRL <= 0.28 `aot_pair`). Same paper.  Delta = sort(c) - sort(r)."""
    _no_margin(inputs, "aot_unpaired")
    _check_label_smoothing(label_smoothing, "aot_unpaired")
    c, r = _pair(logratios(inputs), "aot_unpaired")
    delta = torch.sort(c).values - torch.sort(r).values
    z = (_beta(inputs, beta) * delta[:, None])[:, 0]
    return _out(_smoothed_logistic(z, label_smoothing), _rewards(inputs, beta))


def apo_zero(inputs, *, beta=0.1):
    """APO-zero. D'Oosterlinck et al., *Anchored Preference Optimization and Contrastive Revisions*.

    L = (1 - sigmoid(beta c)) + sigmoid(beta r).
    """
    _no_margin(inputs, "apo_zero")
    rewards = _beta(inputs, beta) * logratios(inputs)
    c, r = _pair(rewards, "apo_zero")
    return _out(1.0 - torch.sigmoid(c) + torch.sigmoid(r), rewards.detach())


def apo_down(inputs, *, beta=0.1):
    """APO-down. Same paper.  L = sigmoid(beta c) + (1 - sigmoid(beta (c - r)))."""
    _no_margin(inputs, "apo_down")
    rewards = _beta(inputs, beta) * logratios(inputs)
    c, r = _pair(rewards, "apo_down")
    return _out(torch.sigmoid(c) + 1.0 - torch.sigmoid(c - r), rewards.detach())


def discopop(inputs, *, beta=0.1, discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """DiscoPOP (log-ratio modulated loss). Chris Lu et al., *Discovering Preference Optimization
    Algorithms with and for Large Language Models* (Eq. 5).

    L = l(z) (1 - sigmoid(z / tau)) + e^{-z} sigmoid(z / tau); the second term is evaluated as
    exp(-z + log sigmoid(z / tau)) so that e^{-z} never overflows against a vanishing sigmoid.
    """
    _check_beta(discopop_tau, "discopop_tau")
    z = _margin_logit(inputs, beta, "discopop", f_divergence_type, f_alpha_divergence_coef)
    mod = torch.sigmoid(z / discopop_tau)
    losses = -F.logsigmoid(z) * (1.0 - mod) + torch.exp(-z + F.logsigmoid(z / discopop_tau))
    return _out(losses, _rewards(inputs, beta))


def sigmoid_norm(inputs, *, beta=0.1, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """Length-normalized DPO (SimPO's "DPO w/ LN"; Tulu 3 `dpo_norm`). Lambert et al., *Tulu 3*.

    L = l(beta (phi(c)/n_w - phi(r)/n_l) - margin).
    """
    z = _margin_logit(inputs, beta, "sigmoid_norm", f_divergence_type, f_alpha_divergence_coef, normalize=True)
    return _out(-F.logsigmoid(z), _rewards(inputs, beta))


def sft(inputs, *, beta=0.1):
    """SFT / NLL term on the chosen responses (TRL `sft`).

    NLL_w = -(sum_g S_w,g) / (sum_g n_w,g), a token mean over the batch's chosen completion tokens.
    Per example this returns the additive contribution -S_w,g * G / sum n_w (mean = NLL_w); TRL
    broadcasts the batch mean instead (same mean and gradient). `beta` only scales the reported rewards.
    """
    nll = nll_terms(inputs)
    return _out(nll, _rewards(inputs, beta), nll_loss=nll)


def rpo(inputs, *, beta=0.1, rpo_alpha=1.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """RPO / DPO + NLL. Liu et al., *Provably Mitigating Overoptimization in RLHF*; Pang et al., *Iterative
    Reasoning Preference Optimization*.  L = l(z) + alpha * NLL_w (TRL >= 0.29: ["sigmoid", "sft"]).
    """
    _check_weight(rpo_alpha, "rpo_alpha")
    z = _margin_logit(inputs, beta, "rpo", f_divergence_type, f_alpha_divergence_coef)
    nll = nll_terms(inputs)
    return _out(-F.logsigmoid(z) + rpo_alpha * nll, _rewards(inputs, beta), nll_loss=nll)


# ----------------------------------------------------------------------------------------------------
# B. reference-free losses
# ----------------------------------------------------------------------------------------------------


def simpo(inputs, *, beta=0.1, gamma=0.5, label_smoothing=0.0):
    """SimPO. Meng et al., *SimPO: Simple Preference Optimization with a Reference-Free Reward*.

    z = beta (M_w - M_l) - gamma - margin, M = S / n;  L = (1 - eps) l(z) + eps l(-z);  rewards beta M.
    """
    _check_label_smoothing(label_smoothing, "simpo")
    b = _beta(inputs, beta)
    mean_logps = _up(inputs.logps) / _counts(inputs, "simpo")
    m_w, m_l = _pair(mean_logps, "simpo")
    z = (b * (m_w - m_l)[:, None])[:, 0] - gamma
    z = z if inputs.margin is None else z - _up(inputs.margin)
    return _out(_smoothed_logistic(z, label_smoothing), (b * mean_logps).detach())


def cpo(inputs, *, beta=0.1, label_smoothing=0.0, cpo_alpha=1.0):
    """CPO. Xu et al., *Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
    Machine Translation*.  L = (1 - eps) l(z) + eps l(-z) + alpha NLL_w, z = beta (S_w - S_l) - margin,
    summed log-probs; rewards beta S.
    """
    _check_label_smoothing(label_smoothing, "cpo")
    _check_weight(cpo_alpha, "cpo_alpha")
    b = _beta(inputs, beta)
    s_w, s_l = _pair(_up(inputs.logps), "cpo")
    z = (b * (s_w - s_l)[:, None])[:, 0]
    z = z if inputs.margin is None else z - _up(inputs.margin)
    losses = _smoothed_logistic(z, label_smoothing)
    metrics = {}
    if cpo_alpha:
        nll = nll_terms(inputs)
        losses = losses + cpo_alpha * nll
        metrics["nll_loss"] = nll
    return _out(losses, (b * _up(inputs.logps)).detach(), **metrics)


def log1mexp(x):
    """log(1 - e^x) for x < 0, stable: log1p(-e^x) below -ln 2, log(-expm1(x)) above; both branches see
    safe inputs so the unused one cannot inject NaN gradients. x is clamped to <= -1e-6."""
    x = x.clamp(max=-1e-6)
    low = x < -_LN2
    return torch.where(
        low,
        torch.log1p(-torch.exp(torch.where(low, x, -_LN2))),
        torch.log(-torch.expm1(torch.where(low, -_LN2, x))),
    )


def orpo(inputs, *, beta=0.1, compute_nll_loss=True):
    """ORPO. Hong et al., *ORPO: Monolithic Preference Optimization without Reference Model*.

    lo(M) = M - log(1 - e^M) (log-odds of the mean token log-prob M = S / n);
    L = NLL_w - lambda log sigmoid(lo(M_w) - lo(M_l)), lambda = beta;  rewards beta M.
    Metrics (per example): log_odds_ratio = log sigmoid(lo_w - lo_l), log_odds_chosen = lo_w - lo_l.
    """
    _check_beta(beta)
    _no_margin(inputs, "orpo")
    mean_logps = _up(inputs.logps) / _counts(inputs, "orpo")
    log_odds = mean_logps - log1mexp(mean_logps)
    lo_w, lo_l = _pair(log_odds, "orpo")
    ratio = F.logsigmoid(lo_w - lo_l)
    losses = -_beta(inputs, beta) * ratio[:, None]
    metrics = {"log_odds_ratio": ratio, "log_odds_chosen": lo_w - lo_l}
    losses = losses[:, 0]
    if compute_nll_loss:
        nll = nll_terms(inputs)
        losses = losses + nll
        metrics["nll_loss"] = nll
    return _out(losses, (_beta(inputs, beta) * mean_logps).detach(), **metrics)


# ----------------------------------------------------------------------------------------------------
# C. unpaired losses (K = 1, labels)
# ----------------------------------------------------------------------------------------------------


def _unpaired(inputs, name):
    if inputs.group_size != 1 or inputs.labels is None:
        raise ValueError(f"loss {name!r} is unpaired: it needs K = 1 response per group and inputs.labels [G] bool")
    _no_margin(inputs, name)
    return logratios(inputs)[:, 0], inputs.labels.bool()


def kto(inputs, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO. Ethayarajh et al., *KTO: Model Alignment as Prospect Theoretic Optimization*.

    desirable:   lambda_D (1 - sigmoid(beta (rho - z0)))
    undesirable: lambda_U (1 - sigmoid(beta (z0 - rho)))
    z0 = inputs.kl, a detached reference point (see `kto_reference_point`); 0 when absent.
    """
    _check_weight(desirable_weight, "desirable_weight")
    _check_weight(undesirable_weight, "undesirable_weight")
    rho, labels = _unpaired(inputs, "kto")
    b = _beta(inputs, beta)
    b = b if isinstance(b, float) else b[:, 0]
    z0 = torch.zeros((), device=rho.device) if inputs.kl is None else inputs.kl.detach().float()
    sign = torch.where(labels, 1.0, -1.0)
    lam = torch.where(labels, float(desirable_weight), float(undesirable_weight))
    losses = lam * (1.0 - torch.sigmoid(b * (rho - z0) * sign))
    return _out(losses, _rewards(inputs, beta), kl=z0.expand(rho.shape[0]))


def kto_reference_point(kl_logps, kl_ref_logps):
    """z0 = max(0, mean_j sg(S(y'_j) - S_ref(y'_j))) over mismatched completions y', passed as
    `PreferenceInputs.kl`. Across ranks: all-reduce the sum and the count, then `reference_point_from_sums`."""
    rho = kl_logps.detach().float() - kl_ref_logps.detach().float()
    return reference_point_from_sums(rho.sum(), torch.tensor(float(rho.numel()), device=rho.device))


def reference_point_from_sums(rho_sum, count):
    """KTO's z0 from the sum of sg(S - S_ref) over mismatched pairs and their count (both already summed over
    ranks): max(0, sum / count); 0 without pairs."""
    return (rho_sum / count.clamp(min=1.0)).clamp(min=0.0)


def apo_zero_unpaired(inputs, *, beta=0.1):
    """APO-zero, unpaired (TRL KTOConfig). desirable 1 - sigmoid(beta rho), undesirable sigmoid(beta rho)."""
    rho, labels = _unpaired(inputs, "apo_zero_unpaired")
    b = _beta(inputs, beta)
    s = torch.sigmoid((b * rho[:, None])[:, 0])
    return _out(torch.where(labels, 1.0 - s, s), _rewards(inputs, beta))


# ----------------------------------------------------------------------------------------------------
# D/E. shifted, listwise and multi-reference losses
# ----------------------------------------------------------------------------------------------------


def dpo_shift(inputs, *, beta=0.1, shift_lambda=0.75):
    """DPO-Shift. Yang et al., *DPO-Shift: Shifting the Distribution of Direct Preference Optimization*.

    L = l(beta c - f(lambda) beta r - margin), f(lambda) = shift_lambda in (0, 1].
    """
    if not (isinstance(shift_lambda, (int, float)) and 0.0 < shift_lambda <= 1.0):
        raise ValueError(f"shift_lambda must lie in (0, 1], got {shift_lambda!r}")
    rewards = _beta(inputs, beta) * logratios(inputs)
    c, r = _pair(rewards, "dpo_shift")
    z = c - shift_lambda * r
    z = z if inputs.margin is None else z - _up(inputs.margin)
    return _out(-F.logsigmoid(z), rewards.detach())


def plackett_luce(inputs, *, beta=0.1):
    """Listwise DPO (Plackett-Luce), Rafailov et al., DPO paper appendix.

    Responses ranked best first, s_k = beta rho_k:  L = -sum_{k < K} [s_k - log sum_{j >= k} e^{s_j}].
    K = 2 is DPO.
    """
    _no_margin(inputs, "plackett_luce")
    if inputs.group_size < 2:
        raise ValueError(f"loss 'plackett_luce' needs K >= 2 responses per group, got K = {inputs.group_size}")
    s = _beta(inputs, beta) * logratios(inputs)
    tail_lse = s.flip(-1).logcumsumexp(-1).flip(-1)
    return _out(-(s - tail_lse)[:, :-1].sum(-1), s.detach())


def mrpo(inputs, *, beta=0.1):
    """Multi-reference DPO. Le et al., *Intelligently Weighting Multiple Reference Models for Direct
    Preference Optimization of LLMs*.  L = l(beta [S_w - sum_m alpha_m S_ref_m,w] - beta [S_l - ...]),
    sum_m alpha_m = 1 (inputs.ref_weights, uniform by default; ref_logps [M, G, K])."""
    if inputs.ref_logps is None or inputs.ref_logps.dim() != 3:
        raise ValueError("loss 'mrpo' needs ref_logps of shape [M, G, K] (one slice per reference model)")
    return sigmoid(inputs, beta=beta)


# ----------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """A registered objective and the traits its callers plan with.

    pair_local            the gradient for a group depends on that group only (given precomputed detached
                          batch constants such as nll_scale or KTO's z0): the pair-fused head applies;
                          False (AOT: sorts over the batch) also rules out WPO weighting.
    needs_reference       reads reference log-probs (False: reference-free, no reference model).
    unpaired              one labelled response per example (K = 1, `inputs.labels`).
    uses_reference_point  reads `inputs.kl`, KTO's z0 (scored on mismatched pairs).
    multi_reference       reads the sums of several reference models (`ref_logps` [M, G, K]).
    """

    name: str
    fn: Callable[..., LossOutput]
    pair_local: bool = True
    needs_reference: bool = True
    unpaired: bool = False
    uses_reference_point: bool = False
    multi_reference: bool = False

    def __call__(self, inputs: PreferenceInputs, **hparams) -> LossOutput:
        return self.fn(inputs, **hparams)

    @property
    def hparams(self) -> frozenset:
        params = inspect.signature(self.fn).parameters.values()
        return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


_OBJECTIVES = [
    Objective("sigmoid", sigmoid), Objective("hinge", hinge), Objective("ipo", ipo),
    Objective("exo_pair", exo_pair), Objective("nca_pair", nca_pair), Objective("robust", robust),
    Objective("cdpo", cdpo), Objective("bco_pair", bco_pair), Objective("sppo_hard", sppo_hard),
    Objective("aot", aot, pair_local=False), Objective("aot_unpaired", aot_unpaired, pair_local=False),
    Objective("apo_zero", apo_zero), Objective("apo_down", apo_down), Objective("discopop", discopop),
    Objective("sigmoid_norm", sigmoid_norm), Objective("sft", sft, needs_reference=False), Objective("rpo", rpo),
    Objective("simpo", simpo, needs_reference=False), Objective("cpo", cpo, needs_reference=False),
    Objective("orpo", orpo, needs_reference=False),
    Objective("kto", kto, unpaired=True, uses_reference_point=True),
    Objective("apo_zero_unpaired", apo_zero_unpaired, unpaired=True),
    Objective("dpo_shift", dpo_shift), Objective("plackett_luce", plackett_luce),
    Objective("mrpo", mrpo, multi_reference=True),
    Objective("dpo", sigmoid),
]
LOSSES: dict[str, Objective] = {o.name: o for o in _OBJECTIVES}
"""Objective name -> `Objective`; `LOSSES[name](inputs, **hparams) -> LossOutput`. "dpo" = "sigmoid"."""


def loss_names(loss_type) -> tuple[str, ...]:
    """`loss_type` (a name or a list of names) as a validated tuple."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise ValueError("loss_type must name at least one loss")
    for name in names:
        if name not in LOSSES:
            raise ValueError(f"Unsupported loss_type {name!r}; valid names: {sorted(LOSSES)}")
    return names


def is_pair_local(loss_type) -> bool:
    return all(LOSSES[n].pair_local for n in loss_names(loss_type))


def _check_hparams(names, hparams):
    accepted = set().union(*(LOSSES[n].hparams for n in names))
    for key in hparams:
        if key not in accepted:
            raise ValueError(f"hyperparameter {key!r} has no effect on loss_type {list(names)}; "
                             f"accepted: {sorted(accepted)}")


def _loss_weights(names, loss_weights):
    if loss_weights is None:
        return (1.0,) * len(names)
    weights = tuple(loss_weights)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} loss types {list(names)}")
    for w in weights:
        _check_weight(w, "loss_weights[i]")
    return weights


def wpo_weights(inputs: PreferenceInputs) -> torch.Tensor:
    """WPO (Zhou et al., *WPO: Enhancing RLHF with Weighted Preference Optimization*, Eq. 2): per group
    prod_k w(y_k), w(y) = exp(mean_t sg(logp_t - log sum_v p_v^2)); [G], detached, unclamped (TRL 1.16)."""
    if inputs.wpo_logweights is None:
        raise ValueError("use_weighting needs inputs.wpo_logweights (per-token log sum p^2 from the head)")
    return torch.exp(inputs.wpo_logweights.detach().float().sum(-1))


def preference_loss(
    loss_type, inputs: PreferenceInputs, *, loss_weights=None, use_weighting=False, **hparams
) -> LossOutput:
    """The trainer's single entry point: sum_k loss_weights[k] * LOSSES[loss_type[k]](inputs, ...).losses,
    times per-group weights and WPO weights. Rewards come from the first loss; metrics are merged.

    Each hyperparameter goes to the losses whose signature names it; one that no selected loss takes
    raises (an option is never silently ignored).
    """
    names = loss_names(loss_type)
    weights = _loss_weights(names, loss_weights)
    _check_hparams(names, hparams)
    if use_weighting and not is_pair_local(names):
        raise ValueError(f"use_weighting (WPO) cannot be combined with the batch-coupled losses {list(names)}")
    outs = [LOSSES[n](inputs, **{k: v for k, v in hparams.items() if k in LOSSES[n].hparams}) for n in names]
    losses = sum(w * o.losses for w, o in zip(weights, outs))
    if inputs.weight is not None:
        losses = losses * _up(inputs.weight)
    if use_weighting:
        losses = losses * wpo_weights(inputs)
    metrics = {k: v for o in outs for k, v in o.metrics.items()}
    return LossOutput(losses, outs[0].rewards, metrics)
