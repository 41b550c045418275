"""The `FusedLinear*Loss` modules are drop-in replacements for Liger-Kernel's (`liger_kernel.chunked_loss`,
run on CPU with `compiled=False`): same constructor, same forward call, same return structure, and the same
loss, outputs and gradients for the options both share (fp32).

Pinned deliberate difference: the logits means/sums cover completion tokens only (TRL's definition); Liger's
include prompt and padding positions.
"""

import pytest
import torch

pytest.importorskip("liger_kernel.chunked_loss")
from liger_kernel.chunked_loss import (  # noqa: E402
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearKTOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
)

from fastpo.losses import (  # noqa: E402
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearKTOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
)

B, T, H, V = 3, 8, 16, 67
LOGITS_SLOTS = {2, 3}  # chosen_logits_mean, rejected_logits_mean in the 7/9-tuples


def batch(rows, bias=True, ref=True):
    hidden = torch.randn(rows, T, H)
    weight = torch.randn(V, H) / H**0.5
    target = torch.randint(0, V, (rows, T))
    target[:, :2] = -100  # prompt
    target[torch.arange(T)[None, :] >= torch.randint(4, T + 1, (rows, 1))] = -100  # right padding
    out = {"hidden": hidden, "weight": weight, "target": target, "bias": torch.randn(V) * 0.1 if bias else None}
    if ref:
        out |= {"ref_hidden": hidden + 0.2 * torch.randn_like(hidden),
                "ref_weight": weight + 0.05 * torch.randn_like(weight)}
    return out


def call(module, data, kind, **extra):
    h = data["hidden"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    b = None if data["bias"] is None else data["bias"].clone().requires_grad_()
    ref = {k: data[k] for k in ("ref_hidden", "ref_weight") if k in data}
    ref = {"ref_input": ref["ref_hidden"], "ref_weight": ref["ref_weight"]} if ref else {}
    if kind == "kto":
        loss, outs = module(h, w, data["target"], b, **ref, **extra)
    else:
        loss, outs = module(w, h, data["target"], b, **ref, **extra)
    (loss * 1.3).backward()
    grads = [h.grad, w.grad] + ([b.grad] if b is not None else [])
    return loss, outs, grads


def assert_same(ours, theirs, skip=()):
    loss, outs, grads = ours
    l_loss, l_outs, l_grads = theirs
    torch.testing.assert_close(loss, l_loss, rtol=1e-5, atol=1e-6)
    assert len(outs) == len(l_outs)
    for i, (a, b) in enumerate(zip(outs, l_outs)):
        if i not in skip:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-5, msg=f"output {i}")
    for a, b in zip(grads, l_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def completion_logits_mean(data, rows):
    logits = data["hidden"] @ data["weight"].T + (0 if data["bias"] is None else data["bias"])
    mask = data["target"][rows] != -100
    return logits[rows].mean(-1)[mask].mean()


DPO_OPTIONS = [
    dict(loss_type="sigmoid"),
    dict(loss_type="hinge"),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="exo_pair", label_smoothing=1e-3),
    dict(loss_type="nca_pair"),
    dict(loss_type="bco_pair"),
    dict(loss_type="sppo_hard"),
    dict(loss_type="apo_zero"),
    dict(loss_type="apo_down"),
    dict(loss_type="discopop", discopop_tau=0.1),
    dict(loss_type="sigmoid", compute_nll_loss=True, alpha=0.5),
    dict(loss_type="sigmoid", average_log_prob=True, chunk_size=2),
    dict(loss_type="sigmoid", use_ref_model=False, beta=0.5),
]


@pytest.mark.parametrize("options", DPO_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_dpo_module_matches_liger(options):
    data = batch(2 * B, ref=options.get("use_ref_model", True))
    ours = call(FusedLinearDPOLoss(**options), data, "dpo")
    theirs = call(LigerFusedLinearDPOLoss(compiled=False, **options), data, "dpo")
    assert_same(ours, theirs, skip=LOGITS_SLOTS)
    torch.testing.assert_close(ours[1][2], completion_logits_mean(data, slice(0, B)))
    torch.testing.assert_close(ours[1][3], completion_logits_mean(data, slice(B, 2 * B)))


def test_logits_means_differ_from_liger_by_design():
    """Liger averages logits over all B*T*V entries (prompt and padding included)."""
    data = batch(2 * B)
    theirs = call(LigerFusedLinearDPOLoss(compiled=False), data, "dpo")
    logits = data["hidden"] @ data["weight"].T + data["bias"]
    torch.testing.assert_close(theirs[1][2], logits[:B].mean())
    ours = call(FusedLinearDPOLoss(), data, "dpo")
    assert not torch.allclose(ours[1][2], theirs[1][2])


@pytest.mark.parametrize("options", [dict(), dict(compute_nll_loss=False, gamma=0.8, label_smoothing=0.1, beta=2.0)],
                         ids=["default", "no_nll"])
def test_simpo_module_matches_liger(options):
    data = batch(2 * B, ref=False)
    assert_same(call(FusedLinearSimPOLoss(**options), data, "simpo"),
                call(LigerFusedLinearSimPOLoss(compiled=False, **options), data, "simpo"), skip=LOGITS_SLOTS)


@pytest.mark.parametrize("options", [dict(), dict(average_log_prob=True, label_smoothing=0.1, alpha=0.3),
                                     dict(compute_nll_loss=False, bias=False)], ids=["default", "avg", "no_nll"])
def test_cpo_module_matches_liger(options):
    options = dict(options)
    data = batch(2 * B, bias=options.pop("bias", True), ref=False)
    assert_same(call(FusedLinearCPOLoss(**options), data, "cpo"),
                call(LigerFusedLinearCPOLoss(compiled=False, **options), data, "cpo"), skip=LOGITS_SLOTS)


@pytest.mark.parametrize("options", [dict(), dict(compute_nll_loss=False, beta=0.5)], ids=["default", "no_nll"])
def test_orpo_module_matches_liger(options):
    data = batch(2 * B, ref=False)
    assert_same(call(FusedLinearORPOLoss(**options), data, "orpo"),
                call(LigerFusedLinearORPOLoss(compiled=False, **options), data, "orpo"), skip=LOGITS_SLOTS)


@pytest.mark.parametrize("scale", [1.0, 40.0], ids=["normal", "largest_logit_above_100"])
def test_orpo_nll_target_as_liger_callers_pass_it(scale):
    """`nll_target` as Liger's callers pass it, `[2B, T]` (its chosen half is used): the same loss, outputs
    and gradients as Liger's module, also when the largest logit is well past 100 (where an ignored row's
    exp(z - 0) would overflow to inf and 0 * inf give NaN gradients)."""
    data = batch(2 * B, ref=False)
    data["hidden"] = data["hidden"] * scale
    nll_target = torch.randint(0, V, (2 * B, T))
    nll_target[:, :1] = -100
    logits = data["hidden"] @ data["weight"].T
    assert scale == 1.0 or logits.max() > 100
    ours = call(FusedLinearORPOLoss(), data, "orpo", nll_target=nll_target)
    theirs = call(LigerFusedLinearORPOLoss(compiled=False), data, "orpo", nll_target=nll_target)
    for grad in ours[2]:
        assert torch.isfinite(grad).all()
    assert_same(ours, theirs, skip=LOGITS_SLOTS)


def test_orpo_nll_target_of_the_chosen_rows_alone():
    """`nll_target` `[B, T]` (the chosen rows only) is the same as Liger's `[2B, T]` with those rows first."""
    data = batch(2 * B, ref=False)
    nll_target = torch.randint(0, V, (B, T))
    full = torch.cat([nll_target, torch.randint(0, V, (B, T))])
    short = call(FusedLinearORPOLoss(), data, "orpo", nll_target=nll_target)
    long = call(FusedLinearORPOLoss(), data, "orpo", nll_target=full)
    assert_same(short, long)
    with pytest.raises(ValueError, match="nll_target must be"):
        call(FusedLinearORPOLoss(), data, "orpo", nll_target=nll_target[:, :-1])


@pytest.mark.parametrize("options", [dict(), dict(use_ref_model=True, kl=0.3), dict(use_ref_model=True,
                                     average_log_prob=True, beta=0.5)], ids=["ref_free", "ref_kl", "ref_avg"])
def test_kto_module_matches_liger(options):
    options = dict(options)
    kl = options.pop("kl", None)
    data = batch(2 * B, ref=options.get("use_ref_model", False))
    labels = torch.tensor([True, False, True, True, False, False])
    extra = {"preference_labels": labels, "kl": None if kl is None else torch.tensor(kl)}
    ours = call(FusedLinearKTOLoss(**options), data, "kto", **extra)
    theirs = call(LigerFusedLinearKTOLoss(compiled=False, **options), data, "kto", **extra)
    assert_same(ours, theirs, skip={2, 3})
    logits = data["hidden"] @ data["weight"].T + data["bias"]
    mask = (data["target"] != -100) & labels[:, None]
    torch.testing.assert_close(ours[1][2], logits.sum(-1)[mask].sum(), rtol=1e-5, atol=1e-4)


def test_modules_reject_silently_ignored_options():
    with pytest.raises(ValueError, match="'label_smoothing' has no effect"):
        FusedLinearDPOLoss(loss_type="sigmoid", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing must be > 0 for loss_type='exo_pair'"):
        FusedLinearDPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match="Unsupported loss_type"):
        FusedLinearDPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="beta must be"):
        FusedLinearSimPOLoss(beta=-1.0)
    data = batch(2 * B)
    with pytest.raises(ValueError, match="use_ref_model=True needs"):
        FusedLinearDPOLoss()(data["weight"], data["hidden"], data["target"])
