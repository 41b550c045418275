"""The objectives on per-sequence statistics: hand-derived values, an independent transcription of TRL 1.16's
`DPOTrainer._compute_loss` formulas, Liger's `preference_loss_fn`, finite-difference gradients (float64
gradcheck), numerics at the edges, and bad input.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastpo.losses import (
    LOSSES,
    PreferenceInputs,
    cpo_loss,
    dpo_loss,
    is_pair_local,
    kto_loss,
    ld_weights,
    orpo_loss,
    plackett_luce_loss,
    preference_loss,
    sequence_logps,
    simpo_loss,
)
from fastpo.losses.objectives import log1mexp

TRL_DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
F_DIV_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"]


def pair_batch(B=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, 2, generator=g, dtype=dtype) * 30 - 1
    ref = logps + torch.randn(B, 2, generator=g, dtype=dtype) * 3
    n = torch.randint(1, 40, (B, 2), generator=g).to(dtype)
    return logps, ref, n


# ----------------------------------------------------------------------------------------------------
# independent oracle: TRL 1.16 DPOTrainer._compute_loss, transcribed branch by branch
# ----------------------------------------------------------------------------------------------------


def trl_scores(lr, fdiv, alpha):
    if fdiv == "reverse_kl":
        return lr
    if fdiv == "forward_kl":
        return 1 - torch.exp(-lr)
    if fdiv == "js_divergence":
        return math.log(2) + F.logsigmoid(lr)
    coef = 1.0 / (alpha - 1.0)
    return (torch.exp(torch.clamp((alpha - 1.0) * lr, max=80.0)) - 1.0) * coef


def trl_loss(loss_type, cl, rl, rcl, rrl, nc, nr, beta, ls=0.0, tau=0.05, fdiv="reverse_kl", alpha=0.5):
    """Per-sequence loss of TRL 1.16 (sft: the broadcast batch mean)."""
    c_lr, r_lr = cl - rcl, rl - rrl
    cs, rs = trl_scores(c_lr, fdiv, alpha), trl_scores(r_lr, fdiv, alpha)
    d = cs - rs
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * d)
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "ipo":
        return (cs / nc.clamp(min=1) - rs / nr.clamp(min=1) - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        eps = torch.tensor(ls, dtype=cl.dtype)
        qw, ql = torch.sigmoid(beta * d), torch.sigmoid(-beta * d)
        return qw * (F.logsigmoid(beta * d) - torch.log1p(-eps)) + ql * (F.logsigmoid(-beta * d) - torch.log(eps))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c_lr) - 0.5 * F.logsigmoid(-beta * c_lr) - 0.5 * F.logsigmoid(-beta * r_lr)
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(beta * d) + ls * F.logsigmoid(-beta * d)) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c_lr) - F.logsigmoid(-beta * r_lr)
    if loss_type == "sppo_hard":
        return (c_lr - 0.5 / beta) ** 2 + (r_lr + 0.5 / beta) ** 2
    if loss_type == "aot":
        delta = torch.sort(cl - rl).values - torch.sort(rcl - rrl).values
        return -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
    if loss_type == "aot_unpaired":
        delta = torch.sort(c_lr).values - torch.sort(r_lr).values
        return -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c_lr) + torch.sigmoid(beta * r_lr)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c_lr) + 1 - torch.sigmoid(beta * (c_lr - r_lr))
    if loss_type == "discopop":
        z = d * beta
        mod = torch.sigmoid(z / tau)
        return -F.logsigmoid(z) * (1 - mod) + torch.exp(-z) * mod
    if loss_type == "sft":
        return (-cl.sum() / nc.sum()).expand(cl.shape[0])
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * (cs / nc.clamp(min=1) - rs / nr.clamp(min=1)))
    raise AssertionError(loss_type)


def _hparams_for(loss_type):
    return {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.2},
            "aot": {"label_smoothing": 0.1}, "aot_unpaired": {"label_smoothing": 0.1},
            "discopop": {"discopop_tau": 0.05}}.get(loss_type, {})


def _trl_kwargs(hp):
    return {"ls": hp.get("label_smoothing", 0.0), "tau": hp.get("discopop_tau", 0.05)}


@pytest.mark.parametrize("loss_type", TRL_DPO_TYPES)
def test_dpo_loss_matches_trl_formula(loss_type):
    logps, ref, n = pair_batch()
    hp = _hparams_for(loss_type)
    beta = 0.3
    got = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=beta, loss_type=loss_type,
                   chosen_num_tokens=n[:, 0], rejected_num_tokens=n[:, 1], **hp)
    want = trl_loss(loss_type, logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], n[:, 0], n[:, 1], beta,
                    **_trl_kwargs(hp))
    # sft is an additive per-example decomposition of TRL's broadcast mean: compare the batch means
    if loss_type == "sft":
        got_l, want_l = got.losses.mean(), want.mean()
    else:
        got_l, want_l = got.losses, want
    torch.testing.assert_close(got_l, want_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.chosen_rewards, beta * (logps[:, 0] - ref[:, 0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.rejected_rewards, beta * (logps[:, 1] - ref[:, 1]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", F_DIV_TYPES)
def test_f_divergence_matches_trl_formula(loss_type, fdiv):
    logps, ref, n = pair_batch(seed=1)
    ref = logps + torch.randn_like(logps) * 0.5  # keep e^{-rho} moderate for forward KL
    hp = _hparams_for(loss_type)
    got = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=0.2, loss_type=loss_type,
                   chosen_num_tokens=n[:, 0], rejected_num_tokens=n[:, 1], f_divergence_type=fdiv,
                   f_alpha_divergence_coef=0.3, **hp)
    want = trl_loss(loss_type, logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], n[:, 0], n[:, 1], 0.2,
                    fdiv=fdiv, alpha=0.3, **_trl_kwargs(hp))
    torch.testing.assert_close(got.losses, want, rtol=1e-10, atol=1e-12)


LIGER_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
               "apo_down", "discopop"]


@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_dpo_loss_matches_liger_preference_fn(loss_type):
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    logps, ref, _ = pair_batch(dtype=torch.float32, seed=2)
    hp = _hparams_for(loss_type)
    full_target = torch.zeros(2 * logps.shape[0], 3)
    want, want_c, want_r = LigerFusedLinearDPOFunction.preference_loss_fn(
        logps[:, 0], logps[:, 1], full_target, ref[:, 0], ref[:, 1], beta=0.25, loss_type=loss_type,
        label_smoothing=hp.get("label_smoothing", 0.0), discopop_tau=hp.get("discopop_tau", 0.05))
    got = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=0.25, loss_type=loss_type, **hp)
    torch.testing.assert_close(got.losses.mean(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.chosen_rewards, want_c)
    torch.testing.assert_close(got.rejected_rewards, want_r)


# ----------------------------------------------------------------------------------------------------
# hand-derived values
# ----------------------------------------------------------------------------------------------------


def _one_pair(c_rho, r_rho, **kw):
    """A single pair with rho = (c_rho, r_rho): S = rho, S_ref = 0."""
    t = torch.tensor
    d = torch.float64
    return dict(policy_chosen_logps=t([c_rho], dtype=d), policy_rejected_logps=t([r_rho], dtype=d),
                ref_chosen_logps=t([0.0], dtype=d), ref_rejected_logps=t([0.0], dtype=d), **kw)


# (loss_type, c, r, beta, extra, expected): each value worked out by hand in the comment
HAND = [
    # -log sigmoid(1 * (1 - 0)) = log(1 + e^-1)
    ("sigmoid", 1.0, 0.0, 1.0, {}, math.log1p(math.exp(-1))),
    # max(0, 1 - 0.5 * 1) = 0.5
    ("hinge", 1.0, 0.0, 0.5, {}, 0.5),
    # n = (2, 4): (1/2 - (-2)/4 - 1/(2*0.5))^2 = (0.5 + 0.5 - 1)^2 = 0
    ("ipo", 1.0, -2.0, 0.5, {"chosen_num_tokens": torch.tensor([2.0]), "rejected_num_tokens": torch.tensor([4.0])},
     0.0),
    # d = 0: q_w = q_l = 1/2; 1/2 (log 1/2 - log 0.9) + 1/2 (log 1/2 - log 0.1) = -log 2 - (log 0.9 + log 0.1)/2
    ("exo_pair", 0.0, 0.0, 1.0, {"label_smoothing": 0.1}, -math.log(2) - 0.5 * (math.log(0.9) + math.log(0.1))),
    # c = r = 0: log 2 + log 2 / 2 + log 2 / 2 = 2 log 2
    ("nca_pair", 0.0, 0.0, 1.0, {}, 2 * math.log(2)),
    # d = 0: [(1 - e) log 2 - e log 2] / (1 - 2e) = log 2
    ("robust", 0.0, 0.0, 1.0, {"label_smoothing": 0.3}, math.log(2)),
    # d = 0: (1 - e) log 2 + e log 2 = log 2
    ("cdpo", 0.0, 0.0, 1.0, {"label_smoothing": 0.3}, math.log(2)),
    # c = r = 0: log 2 + log 2
    ("bco_pair", 0.0, 0.0, 1.0, {}, 2 * math.log(2)),
    # beta = 0.5: (1 - 1)^2 + (-1 + 1)^2 = 0
    ("sppo_hard", 1.0, -1.0, 0.5, {}, 0.0),
    # c = r = 0: (1 - 1/2) + 1/2 = 1
    ("apo_zero", 0.0, 0.0, 1.0, {}, 1.0),
    # c = r = 0: 1/2 + (1 - 1/2) = 1
    ("apo_down", 0.0, 0.0, 1.0, {}, 1.0),
    # z = 0: log 2 * (1 - 1/2) + e^0 * 1/2
    ("discopop", 0.0, 0.0, 1.0, {}, 0.5 * math.log(2) + 0.5),
    # n = (2, 1): -log sigmoid(1 * (2/2 - 0/1)) = log(1 + e^-1)
    ("sigmoid_norm", 2.0, 0.0, 1.0,
     {"chosen_num_tokens": torch.tensor([2.0]), "rejected_num_tokens": torch.tensor([1.0])},
     math.log1p(math.exp(-1))),
    # lambda = 0.5: -log sigmoid(2 - 0.5 * 2) = log(1 + e^-1)
    ("dpo_shift", 2.0, 2.0, 1.0, {"shift_lambda": 0.5}, math.log1p(math.exp(-1))),
    # margin 1: -log sigmoid(2 - 1)
    ("sigmoid", 2.0, 0.0, 1.0, {"margin": torch.tensor([1.0], dtype=torch.float64)}, math.log1p(math.exp(-1))),
]


@pytest.mark.parametrize("loss_type,c,r,beta,extra,expected", HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)])
def test_hand_values(loss_type, c, r, beta, extra, expected):
    extra = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    out = dpo_loss(**_one_pair(c, r), beta=beta, loss_type=loss_type, **extra)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)


def test_hand_simpo_cpo_orpo():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # SimPO: M = (-2/2, -6/3) = (-1, -2); z = 1 * (1) - 0.5 = 0.5 -> log(1 + e^-0.5); rewards (-1, -2)
    out = simpo_loss(t(-2.0), t(-6.0), beta=1.0, gamma=0.5, chosen_num_tokens=t(2.0), rejected_num_tokens=t(3.0))
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-1.0, -2.0))
    # CPO: l(1 * (-2 + 3)) + 1 * NLL, NLL = 2 / 2 = 1
    out = cpo_loss(t(-2.0), t(-3.0), beta=1.0, cpo_alpha=1.0, chosen_num_tokens=t(2.0), rejected_num_tokens=t(1.0))
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1)) + 1.0, abs=1e-12)
    # ORPO: M_w = log 1/2 -> lo = 0; M_l = log 1/4 -> lo = log(1/4) - log(3/4) = -log 3;
    # -beta log sigmoid(log 3) = -beta log(3/4); NLL = -log(1/2)
    out = orpo_loss(t(math.log(0.5)), t(math.log(0.25)), beta=0.1, chosen_num_tokens=t(1.0), rejected_num_tokens=t(1.0))
    assert out.losses.item() == pytest.approx(-0.1 * math.log(0.75) + math.log(2), abs=1e-12)


def test_hand_kto_and_plackett_luce():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # rho = (1, 1), z0 = 1: desirable 2 * (1 - sigmoid(0)) = 1, undesirable 3 * (1 - sigmoid(0)) = 1.5
    out = kto_loss(t(1.0, 1.0), t(0.0, 0.0), torch.tensor([True, False]), beta=1.0, kl=t(1.0)[0],
                   desirable_weight=2.0, undesirable_weight=3.0)
    torch.testing.assert_close(out.losses, t(1.0, 1.5))
    # apo_zero_unpaired, rho = 0: desirable 1/2, undesirable 1/2
    out = kto_loss(t(0.0, 0.0), t(0.0, 0.0), torch.tensor([True, False]), loss_type="apo_zero_unpaired")
    torch.testing.assert_close(out.losses, t(0.5, 0.5))
    # K = 3 equal scores: log 3 + log 2
    out = plackett_luce_loss(torch.zeros(1, 3, dtype=torch.float64))
    assert out.losses.item() == pytest.approx(math.log(3) + math.log(2), abs=1e-12)


def test_plackett_luce_k2_is_dpo_and_matches_paper_formula():
    logps, ref, _ = pair_batch()
    pl = plackett_luce_loss(logps, ref, beta=0.2).losses
    dpo = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=0.2).losses
    torch.testing.assert_close(pl, dpo)
    g = torch.Generator().manual_seed(3)
    lp, rp = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    s = 0.2 * (lp - rp)
    want = -sum(s[:, k] - torch.logsumexp(s[:, k:], -1) for k in range(4))
    torch.testing.assert_close(plackett_luce_loss(lp, rp, beta=0.2).losses, want)


# ----------------------------------------------------------------------------------------------------
# modifiers and combinations
# ----------------------------------------------------------------------------------------------------


def test_loss_weights_combine_like_trl_mpo():
    logps, ref, n = pair_batch()
    args = (logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1])
    kw = dict(chosen_num_tokens=n[:, 0], rejected_num_tokens=n[:, 1])
    mpo = dpo_loss(*args, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], **kw)
    want = sum(w * trl_loss(t, *args, n[:, 0], n[:, 1], 0.1).mean()
               for t, w in [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)])
    torch.testing.assert_close(mpo.losses.mean(), want)
    rpo = dpo_loss(*args, loss_type="rpo", rpo_alpha=0.5, **kw)
    combo = dpo_loss(*args, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], **kw)
    torch.testing.assert_close(rpo.losses, combo.losses)


def test_per_pair_beta_margin_weight():
    logps, ref, _ = pair_batch()
    betas = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 1.0], dtype=torch.float64)
    margin = torch.linspace(-1, 1, 6, dtype=torch.float64)
    weight = torch.linspace(0.5, 2, 6, dtype=torch.float64)
    out = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=betas, margin=margin, weight=weight)
    d = (logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1])
    torch.testing.assert_close(out.losses, weight * -F.logsigmoid(betas * d - margin))
    torch.testing.assert_close(out.chosen_rewards, betas * (logps[:, 0] - ref[:, 0]))


def test_wpo_weighting_multiplies_pair_weights():
    logps, ref, _ = pair_batch()
    w = -torch.rand(6, 2, dtype=torch.float64)
    out = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], use_weighting=True,
                   chosen_wpo_logweights=w[:, 0], rejected_wpo_logweights=w[:, 1])
    plain = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1])
    torch.testing.assert_close(out.losses, plain.losses * torch.exp(w[:, 0]) * torch.exp(w[:, 1]))


def test_multi_reference_weights():
    logps, ref, _ = pair_batch()
    ref2 = ref + torch.randn_like(ref)
    alpha = torch.tensor([0.25, 0.75], dtype=torch.float64)
    out = dpo_loss(logps[:, 0], logps[:, 1], torch.stack([ref[:, 0], ref2[:, 0]]), torch.stack([ref[:, 1], ref2[:, 1]]),
                   loss_type="mrpo", ref_weights=alpha)
    mix = 0.25 * ref + 0.75 * ref2
    want = dpo_loss(logps[:, 0], logps[:, 1], mix[:, 0], mix[:, 1])
    torch.testing.assert_close(out.losses, want.losses)


def test_token_weighted_and_ld_weights():
    g = torch.Generator().manual_seed(4)
    tok = -torch.rand(2, 6, generator=g, dtype=torch.float64)
    cm = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    rm = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    wc, wr = ld_weights(cm, rm, 0.5)
    # pair 0: shared 2 -> chosen tokens 3, 4 get 0.5; pair 1: shared 2 -> rejected tokens 3..5 get 0.5
    assert wc.tolist() == [[1, 1, 0.5, 0.5, 0, 0], [0, 1, 1, 0, 0, 0]]
    assert wr.tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 0.5, 0.5, 0.5, 0]]
    s = sequence_logps(tok, cm, wc)
    torch.testing.assert_close(s, (tok * wc).sum(-1))
    omega = torch.rand(2, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sequence_logps(tok, cm, omega), (tok * omega * cm).sum(-1))


def test_registry_contract():
    for name, objective in LOSSES.items():
        assert objective.fn.__doc__ and len(objective.fn.__doc__) > 40, name
        assert "beta" in objective.hparams, name
    assert not is_pair_local("aot") and not is_pair_local(["sigmoid", "aot_unpaired"])
    assert is_pair_local(["sigmoid", "sft"]) and is_pair_local("kto") and is_pair_local("plackett_luce")
    inputs = PreferenceInputs(logps=-torch.rand(3, 2) * 5, num_tokens=torch.ones(3, 2), ref_logps=-torch.rand(3, 2))
    for name in ["sigmoid", "ipo", "simpo", "orpo", "cpo", "rpo", "sft", "aot"]:
        out = LOSSES[name](inputs)
        assert out.losses.shape == (3,) and out.rewards.shape == (3, 2) and isinstance(out.metrics, dict)


# ----------------------------------------------------------------------------------------------------
# finite differences (float64 gradcheck) and numerics
# ----------------------------------------------------------------------------------------------------


GRADCHECK = [("sigmoid", {}), ("ipo", {}), ("orpo", {}), ("discopop", {}), ("simpo", {"gamma": 0.3}),
             ("exo_pair", {"label_smoothing": 0.1}), ("plackett_luce", {}), ("sigmoid_norm", {}), ("cpo", {})]


@pytest.mark.parametrize("name,hp", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck(name, hp):
    g = torch.Generator().manual_seed(5)
    K = 3 if name == "plackett_luce" else 2
    logps = (-torch.rand(4, K, generator=g, dtype=torch.float64) * 3 - 0.1).requires_grad_()
    ref = -torch.rand(4, K, generator=g, dtype=torch.float64) * 3
    n = torch.randint(1, 5, (4, K), generator=g).double()

    def f(x):
        return LOSSES[name](PreferenceInputs(logps=x, num_tokens=n, ref_logps=ref), beta=0.7, **hp).losses

    assert torch.autograd.gradcheck(f, (logps,), eps=1e-6, atol=1e-7)


def test_kto_gradcheck():
    g = torch.Generator().manual_seed(6)
    logps = torch.randn(5, 1, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([True, False, True, True, False])

    def f(x):
        inputs = PreferenceInputs(logps=x, ref_logps=torch.zeros_like(x), labels=labels, kl=torch.tensor(0.3))
        return LOSSES["kto"](inputs, beta=0.5, desirable_weight=1.5).losses

    assert torch.autograd.gradcheck(f, (logps,), eps=1e-6, atol=1e-7)


def test_log1mexp_is_accurate_and_has_finite_gradients():
    x = torch.tensor([-50.0, -5.0, -0.7, -0.69, -1e-3, -1e-5], dtype=torch.float32, requires_grad=True)
    y = log1mexp(x)
    exact = torch.log(-torch.expm1(x.detach().double()))
    torch.testing.assert_close(y.double(), exact, rtol=1e-6, atol=1e-7)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    z = torch.tensor([0.0, -1e-9], requires_grad=True)
    log1mexp(z).sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad == 0).all()


def test_discopop_does_not_overflow():
    logps = torch.tensor([[-1.0, 2000.0], [2000.0, -1.0]], requires_grad=True)
    out = LOSSES["discopop"](PreferenceInputs(logps=logps), beta=0.5)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(logps.grad).all()
    # z = -1000.5: l(z)(1 - sigmoid(z / tau)) + exp(-z + log sigmoid(z / tau)) ~ 1000.5 + e^{-z (1/tau - 1)} -> l(z)
    assert out.losses[0].item() == pytest.approx(1000.5, rel=1e-6)


def test_empty_response_contributes_zero_gradient():
    """n = 0 is clamped to 1 and S = 0 (all-masked sequence): finite loss; the gradient flows only
    through S, whose tokens do not exist, so the head receives nothing for that response."""
    logps = torch.tensor([[0.0, -3.0]], requires_grad=True)
    n = torch.tensor([[0.0, 3.0]])
    out = LOSSES["ipo"](PreferenceInputs(logps=logps, num_tokens=n), beta=0.1)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(logps.grad).all()


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------


def _args(B=3):
    logps, ref, _ = pair_batch(B)
    return logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1]


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "dpoo"}, "Unsupported loss_type 'dpoo'; valid names: .*sigmoid"),
    ({"loss_type": ["sigmoid", "nope"]}, "Unsupported loss_type 'nope'"),
    ({"beta": 0.0}, "beta must be a finite number > 0"),
    ({"beta": -1.0}, "beta must be a finite number > 0"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, r"label_smoothing must lie in \[0.0, 0.5\) for loss_type='robust'"),
    ({"loss_type": "robust", "label_smoothing": -0.1}, r"label_smoothing must lie in \[0.0, 0.5\)"),
    ({"loss_type": "exo_pair", "label_smoothing": 0.0}, "label_smoothing must be > 0 for loss_type='exo_pair'"),
    ({"loss_type": "sigmoid", "label_smoothing": 0.1}, "'label_smoothing' has no effect"),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau must be"),
    ({"loss_type": "ipo"}, "needs num_tokens"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights has 1 entries for 2"),
    ({"loss_type": "sigmoid", "f_divergence_type": "kl"}, "f_divergence_type must be one of"),
    ({"loss_type": "nca_pair", "margin": torch.zeros(3, dtype=torch.float64)}, "does not take a per-group margin"),
    ({"loss_type": "aot", "use_weighting": True}, "cannot be combined with the batch-coupled"),
    ({"loss_type": "kto"}, "unpaired"),
    ({"loss_type": "dpo_shift", "shift_lambda": 1.5}, "shift_lambda must lie in"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(*_args(), **kwargs)


def test_bad_shapes_and_counts():
    c, r, rc, rr = _args(3)
    with pytest.raises(ValueError, match="chosen has shape"):
        dpo_loss(c, r[:2], rc, rr)
    with pytest.raises(ValueError, match="reference logps have"):
        dpo_loss(c, r, rc[:2], rr[:2])
    with pytest.raises(ValueError, match="pass both the chosen and the rejected"):
        dpo_loss(c, r, rc, None)
    with pytest.raises(ValueError, match="at least one completion token"):
        dpo_loss(c, r, rc, rr, loss_type="ipo", chosen_num_tokens=torch.tensor([1.0, 0.0, 2.0]),
                 rejected_num_tokens=torch.ones(3))
    with pytest.raises(ValueError, match="needs pairs"):
        preference_loss("sigmoid", PreferenceInputs(logps=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="must have the shape of logps"):
        PreferenceInputs(logps=torch.zeros(2, 2), num_tokens=torch.ones(3, 2))
    with pytest.raises(ValueError, match="needs ref_logps of shape"):
        dpo_loss(c, r, rc, rr, loss_type="mrpo")
