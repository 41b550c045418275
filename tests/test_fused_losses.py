"""`fused_linear_preference_loss` (generic and pair-fused paths, torch and Triton heads) against the naive
materialized-logits reference `fused_linear_preference_loss_ref`.

Ground truth: the reference in float64 on the same (already rounded) inputs. fp32 inputs must match it to
~1e-5 relative; bf16 inputs must be no worse than twice the error of the same reference computing in bf16
(tests/tolerances.py). Compared: the loss, every metric, per-group losses / rewards / log-probs, dH, dW and
d(bias), with a random upstream gradient (the loss times a random scalar).
"""

from dataclasses import dataclass, field

import pytest
import torch

from fastpo.losses import (
    ResponseLayout,
    fused_linear_preference_loss,
    fused_linear_preference_loss_ref,
    response_logps,
)
from tests.tolerances import assert_parity


@dataclass(frozen=True)
class Case:
    loss_type: object = "sigmoid"
    hparams: dict = field(default_factory=dict)
    B: int = 3
    T: int = 9
    H: int = 24
    V: int = 131
    ref: str | None = "hidden"  # "hidden", "logps", "multi" or None
    bias: bool = True
    prompt: int = 2  # leading ignored positions per row
    temperature: float = 1.0
    extra: tuple = ()  # names of optional inputs: token_weights, ld_alpha, wpo, pair, kto, confident, packed, empty
    chunk_pairs: int = 1
    generic_only: bool = False
    softcap: float | None = None


# Why each case is here:
CASES = {
    # the workhorse: DPO with a reference head, bias, prompt + padding ignored, one pair per chunk
    "dpo": Case(),
    # length-normalized objective needs counts; temperature; precomputed reference log-probs
    "ipo_ref_logps": Case("ipo", ref="logps", temperature=0.7, bias=False, chunk_pairs=2),
    # reference-free, mean log-probs, margin gamma and label smoothing
    "simpo": Case("simpo", {"gamma": 0.3, "label_smoothing": 0.1}, ref=None),
    # NLL term inside the objective, stable log-odds
    "orpo": Case("orpo", ref=None),
    # TRL list of losses with weights; per-pair beta, margin and weight
    "rpo_pair_data": Case(["sigmoid", "sft"], {"loss_weights": [1.0, 0.7]}, extra=("pair",)),
    # arbitrary per-token weights times LD-DPO positional weights, WPO weighting from the head's log sum p^2
    "token_weighted_ld_wpo": Case(extra=("token_weights", "ld_alpha", "wpo")),
    # unpaired KTO: one response per row, labels, z0
    "kto": Case("kto", {"desirable_weight": 1.3}, B=5, extra=("kto",)),
    # batch-coupled (sort over the batch): generic path only
    "aot": Case("aot", {"label_smoothing": 0.1}, generic_only=True),
    # K = 3 ranked responses, packed rows in scrambled order, several chunks
    "plackett_luce_packed": Case("plackett_luce", B=3, extra=("packed",), chunk_pairs=1),
    # several precomputed references with weights
    "mrpo": Case("mrpo", ref="multi"),
    # Gemma 2's final-logit soft cap, small enough to bend most logits, with temperature: policy and reference
    "dpo_softcap": Case(temperature=0.8, softcap=1.5),
    # near-one-hot softmax: 1 - p_y must be formed in fp32
    "confident": Case(extra=("confident",), V=257),
    # a response with no completion token contributes S = 0 and gets no gradient
    "empty_response": Case(extra=("empty",)),
}
DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(case: Case, dtype):
    """(kwargs shared by fastpo and the reference, kwargs of the inputs to rebuild per dtype)."""
    G, K = case.B, (3 if case.loss_type == "plackett_luce" else 1 if "kto" in case.extra else 2)
    rows = G * K
    hidden = torch.randn(rows, case.T, case.H)
    weight = torch.randn(case.V, case.H) / case.H**0.5
    targets = torch.randint(0, case.V, (rows, case.T))
    targets[:, : case.prompt] = -100
    lengths = torch.randint(case.prompt + 2, case.T + 1, (rows,))  # right padding after >= 2 completion tokens
    targets[torch.arange(case.T)[None, :] >= lengths[:, None]] = -100
    if "confident" in case.extra:
        flat = hidden.reshape(-1, case.H)
        y = targets.reshape(-1)
        weight[y[y >= 0]] = flat[y >= 0] * (30 / case.H)
    if "empty" in case.extra:
        targets[1] = -100
    tensors = {"hidden": hidden, "weight": weight, "bias": torch.randn(case.V) * 0.1 if case.bias else None}
    common = {"targets": targets, "loss_type": case.loss_type, "temperature": case.temperature,
              "softcap": case.softcap}
    common |= {k: v for k, v in case.hparams.items()}
    if case.ref == "hidden":
        tensors |= {"ref_hidden": hidden + 0.3 * torch.randn_like(hidden),
                    "ref_weight": weight + 0.05 * torch.randn_like(weight)}
    elif case.ref == "logps":
        common["ref_logps"] = -torch.rand(rows) * 20
    elif case.ref == "multi":
        common["ref_logps"] = -torch.rand(2, rows) * 20
        common["ref_weights"] = torch.tensor([0.3, 0.7])
    _add_extras(case, common, targets, G, rows)
    return common, {k: (None if v is None else v.to(dtype)) for k, v in tensors.items()}


def _add_extras(case, common, targets, G, rows):
    if "token_weights" in case.extra:
        common["token_weights"] = torch.rand(rows * case.T) + 0.5
    if "ld_alpha" in case.extra:
        common["ld_alpha"] = 0.4
    if "wpo" in case.extra:
        common["use_weighting"] = True
    if "pair" in case.extra:
        common |= {"pair_beta": torch.rand(G) * 0.3 + 0.05, "pair_margin": torch.randn(G) * 0.2,
                   "pair_weight": torch.rand(G) + 0.5}
    if "kto" in case.extra:
        common |= {"labels": torch.arange(G) % 2 == 0, "kl": torch.tensor(0.2)}
    if "empty" in case.extra:
        common["allow_empty_completions"] = True
    if "packed" in case.extra:
        K = rows // G
        perm = torch.randperm(rows * case.T)
        token_response = torch.arange(rows).repeat_interleave(case.T)[perm]
        common["layout"] = ResponseLayout(token_response, torch.arange(rows).view(G, K))
        common["targets"] = targets.reshape(-1)[perm]
        common["_perm"] = perm


def run(fn, case, common, tensors, dtype, **kw):
    """Call `fn`, backpropagate loss * c (random scalar c); return (output, grads)."""
    common = dict(common)
    perm = common.pop("_perm", None)
    leaves = {k: v.detach().clone().requires_grad_(k in ("hidden", "weight", "bias")) if v is not None else None
              for k, v in tensors.items()}
    args = dict(leaves)
    if perm is not None:
        args["hidden"] = leaves["hidden"].reshape(-1, case.H)[perm]
        if args.get("ref_hidden") is not None:
            args["ref_hidden"] = leaves["ref_hidden"].reshape(-1, case.H)[perm]
    out = fn(args.pop("hidden"), args.pop("weight"), common.pop("targets"), **args, **common, **kw)
    c = torch.tensor(1.7)
    (out.loss * c).backward()
    grads = {"dH": leaves["hidden"].grad, "dW": leaves["weight"].grad}
    if leaves["bias"] is not None:
        grads["db"] = leaves["bias"].grad
    return out, grads


def check(case_name, out, grads, truth, truth_grads, dtype, same=None, same_grads=None):
    def compare(name, x, t, s):
        assert_parity(f"{case_name}:{name}", x.detach().double(), t.detach().double(), dtype=dtype,
                      same_dtype=None if s is None else s.detach().double())

    compare("loss", out.loss, truth.loss, same and same.loss)
    for field_name in ("losses", "rewards", "logps", "num_tokens", "logits_sum"):
        compare(field_name, getattr(out, field_name), getattr(truth, field_name), same and getattr(same, field_name))
    assert set(out.metrics) == set(truth.metrics)
    for key in truth.metrics:
        compare(key, out.metrics[key], truth.metrics[key], same and same.metrics[key])
    for key in truth_grads:
        compare(key, grads[key], truth_grads[key], same_grads and same_grads[key])


def _params():
    for name, case in CASES.items():
        paths = ["generic"] if case.generic_only else ["generic", "pair_fused"]
        for path in paths:
            for dtype in DTYPES:
                yield pytest.param(name, path, dtype, id=f"{name}-{path}-{str(dtype)[6:]}")


def check_against_reference(case_name, case, common, tensors, dtype, out, grads):
    """`out`/`grads` against the float64 naive reference (and, for half dtypes, the same-dtype one)."""
    truth, truth_grads = run(fused_linear_preference_loss_ref, case, common,
                             {k: None if v is None else v.double() for k, v in tensors.items()}, torch.float64)
    same, same_grads = (None, None)
    if dtype != torch.float32:
        same, same_grads = run(fused_linear_preference_loss_ref, case, common, tensors, dtype, upcast=False)
    check(case_name, out, grads, truth, truth_grads, dtype, same, same_grads)


@pytest.mark.parametrize("case_name,path,dtype", list(_params()))
def test_fused_matches_reference(case_name, path, dtype):
    case = CASES[case_name]
    common, tensors = make_inputs(case, dtype)
    chunk = case.chunk_pairs * case.T * (3 if case.loss_type == "plackett_luce" else 2)
    out, grads = run(fused_linear_preference_loss, case, common, tensors, dtype, path=path, impl="torch",
                     chunk_tokens=chunk, chunk_vocab=64)
    check_against_reference(case_name, case, common, tensors, dtype, out, grads)
    if "empty" in case.extra:
        assert (grads["dH"][1] == 0).all()


# generic: the policy head and the reference pass on the Triton head op; pair-fused: the row statistics
# (lse, logp, mean logit, log sum p^2 for WPO) and dz on the Triton row kernels, the reference pass on the op
TRITON_PARAMS = [("dpo", "generic"), ("dpo", "pair_fused"), ("orpo", "generic"), ("kto", "generic"),
                 ("aot", "generic"), ("token_weighted_ld_wpo", "pair_fused"), ("dpo_softcap", "pair_fused"),
                 ("dpo_softcap", "generic"), ("confident", "pair_fused")]


def _triton_params():
    for case_name, path in TRITON_PARAMS:
        for dtype in DTYPES:
            yield pytest.param(case_name, path, dtype, id=f"{case_name}-{path}-{str(dtype)[6:]}")


@pytest.mark.parametrize("case_name,path,dtype", list(_triton_params()))
def test_triton_head_matches_reference(case_name, path, dtype, triton_device):
    """Small shapes: on CPU the Triton kernels run in the interpreter."""
    case = CASES[case_name]
    case = Case(**{**case.__dict__, "B": 2, "T": 6, "H": 16, "V": 67})
    common, tensors = make_inputs(case, dtype)
    out, grads = run(fused_linear_preference_loss, case, common, tensors, dtype, path=path, impl="triton",
                     chunk_vocab=32)
    check_against_reference(case_name, case, common, tensors, dtype, out, grads)


def test_pair_fused_equals_generic_and_is_chunking_invariant():
    case = CASES["rpo_pair_data"]
    common, tensors = make_inputs(case, torch.float32)
    results = [run(fused_linear_preference_loss, case, common, tensors, torch.float32, path=p, chunk_tokens=c)
               for p, c in [("generic", 1024), ("pair_fused", 1), ("pair_fused", 40), ("pair_fused", 1024)]]
    (base, base_grads), rest = results[0], results[1:]
    for out, grads in rest:
        torch.testing.assert_close(out.loss, base.loss, rtol=1e-6, atol=1e-6)
        for k in base_grads:
            torch.testing.assert_close(grads[k], base_grads[k], rtol=1e-5, atol=1e-6)
        for k in base.metrics:
            torch.testing.assert_close(out.metrics[k], base.metrics[k], rtol=1e-6, atol=1e-6)


def test_precomputed_reference_equals_reference_head():
    """Caching S_ref with `response_logps` gives the same loss and gradients as the on-the-fly reference."""
    case = CASES["dpo"]
    common, tensors = make_inputs(case, torch.float32)
    layout = ResponseLayout.chosen_rejected(2 * case.B, case.T)
    with torch.no_grad():
        ref_logps = response_logps(tensors["ref_hidden"], tensors["ref_weight"], common["targets"], layout)
    cached = dict(tensors, ref_hidden=None, ref_weight=None)
    out, grads = run(fused_linear_preference_loss, case, dict(common, ref_logps=ref_logps), cached, torch.float32)
    base, base_grads = run(fused_linear_preference_loss, case, common, tensors, torch.float32)
    torch.testing.assert_close(out.loss, base.loss)
    for k in grads:
        torch.testing.assert_close(grads[k], base_grads[k])


def test_frozen_weight_and_forward_only():
    case = CASES["dpo"]
    common, tensors = make_inputs(case, torch.float32)
    common.pop("_perm", None)
    targets = common.pop("targets")
    hidden = tensors["hidden"].clone().requires_grad_()
    out = fused_linear_preference_loss(hidden, tensors["weight"], targets, bias=tensors["bias"],
                                       ref_hidden=tensors["ref_hidden"], ref_weight=tensors["ref_weight"],
                                       path="pair_fused", **common)
    (dH,) = torch.autograd.grad(out.loss, [hidden])
    with torch.no_grad():
        plain = fused_linear_preference_loss(hidden, tensors["weight"], targets, bias=tensors["bias"],
                                             ref_hidden=tensors["ref_hidden"], ref_weight=tensors["ref_weight"],
                                             **common)
    torch.testing.assert_close(plain.loss, out.loss.detach(), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(dH).all() and dH.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------


def _small():
    h, w = torch.randn(4, 5, 8), torch.randn(11, 8)
    y = torch.randint(0, 11, (4, 5))
    return h, w, y


@pytest.mark.parametrize("mutate,match", [
    (lambda h, w, y: (h[:3], w, y[:3], {}), "even number of rows"),
    (lambda h, w, y: (h, w, y.index_fill(0, torch.tensor([2]), -100), {}),
     r"responses \[2\] have no completion tokens"),
    (lambda h, w, y: (h, w, y, {"loss_type": "dpo2"}), "Unsupported loss_type 'dpo2'"),
    (lambda h, w, y: (h, w, y, {"beta": 0.0}), "beta must be a finite number > 0"),
    (lambda h, w, y: (h, w, y, {"loss_type": "robust", "label_smoothing": 0.7}), "label_smoothing must lie in"),
    (lambda h, w, y: (h, w, y, {"loss_type": "aot", "path": "pair_fused"}), "needs the generic path"),
    (lambda h, w, y: (h, w, y, {"ref_hidden": h}), "ref_hidden needs ref_weight"),
    (lambda h, w, y: (h, w, y, {"ref_logps": torch.zeros(3)}), r"ref_logps must be \[R\]"),
    (lambda h, w, y: (h, w, y, {"path": "fast"}), "path must be one of"),
    (lambda h, w, y: (h.reshape(-1, 8), w, y.reshape(-1), {}), "need an explicit layout"),
    (lambda h, w, y: (h, w, y, {"layout": ResponseLayout.chosen_rejected(2, 5)}), "layout.token_response has 10 rows"),
])
def test_bad_input(mutate, match):
    h, w, y, kw = mutate(*_small())
    with pytest.raises(ValueError, match=match):
        fused_linear_preference_loss(h.requires_grad_(), w, y, **kw)


def test_bad_layout():
    with pytest.raises(ValueError, match="every response id"):
        ResponseLayout(torch.zeros(4, dtype=torch.long), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="token_response values must lie"):
        ResponseLayout(torch.tensor([0, 2]), torch.tensor([[0, 1]]))
    # a group may be smaller than the largest one, but its ranks must be 0 .. k-1 without a gap
    ragged = ResponseLayout.from_groups(torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]))
    assert ragged.sizes == (2, 1) and ragged.group_index.tolist() == [[0, 1], [2, -1]]
    with pytest.raises(ValueError, match="ranks 0 .. size-1"):
        ResponseLayout.from_groups(torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, 1]), torch.tensor([0, 2, 0]))


# ----------------------------------------------------------------------------------------------------
# groups of different sizes in one batch
# ----------------------------------------------------------------------------------------------------


def _mixed_groups(sizes, T=6, H=16, V=97):
    """Rows of responses of groups of the given sizes (group-major, best first), random hidden states and
    targets with 1 ignored prompt position; and the layout."""
    R = sum(sizes)
    hidden = torch.randn(R, T, H, dtype=torch.float64)
    targets = torch.randint(0, V, (R, T))
    targets[:, 0] = -100
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    rank = torch.cat([torch.arange(k) for k in sizes])
    layout = ResponseLayout.from_groups(torch.arange(R).repeat_interleave(T), group, rank)
    weight = torch.randn(V, H, dtype=torch.float64) / H**0.5
    return hidden, weight, targets, layout


@pytest.mark.parametrize("path", ["generic", "pair_fused"])
@pytest.mark.parametrize("loss_type,sizes", [("plackett_luce", (2, 4, 3, 2)), ("sigmoid", (2, 2, 2))],
                         ids=["listwise-2-4-3-2", "pairs-uniform"])
def test_groups_of_different_sizes_equal_per_group_computation(loss_type, sizes, path):
    """A batch mixing K = 2, 3 and 4 (ranked data): every group keeps its own responses, so the loss, the
    per-group results, the metrics and the gradients equal running each group alone (float64 inputs; the
    per-response sums are fp32 by design, hence 1e-6). A wrong regrouping (the whole batch as groups of mean
    size) would give other losses."""
    hidden, weight, targets, layout = _mixed_groups(sizes)
    ref_logps = -torch.rand(sum(sizes), dtype=torch.float64) * 10
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_preference_loss(h, w, targets, layout=layout, loss_type=loss_type,
                                       ref_logps=ref_logps, path=path, chunk_tokens=8)
    out.loss.backward()
    if layout.sizes is not None:
        assert layout.sizes == sizes and out.present.sum(-1).tolist() == list(sizes)
    grads_h, grads_w, losses = torch.zeros_like(hidden), torch.zeros_like(weight), []
    start = 0
    for g, k in enumerate(sizes):
        rows = slice(start, start + k)
        hg, wg = hidden[rows].clone().requires_grad_(), weight.clone().requires_grad_()
        one = fused_linear_preference_loss_ref(hg, wg, targets[rows], loss_type=loss_type,
                                               layout=ResponseLayout(torch.arange(k).repeat_interleave(hidden.shape[1]),
                                                                     torch.arange(k)[None, :]),
                                               ref_logps=ref_logps[rows], upcast=True)
        (one.loss / len(sizes)).backward()
        grads_h[rows], grads_w = hg.grad, grads_w + wg.grad
        torch.testing.assert_close(out.rewards[g, :k], one.rewards[0], rtol=1e-6, atol=1e-7)
        assert (out.rewards[g, k:] == 0).all() and not out.present[g, k:].any()
        losses.append(one.losses[0])
        start += k
    torch.testing.assert_close(out.losses, torch.stack(losses), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h.grad, grads_h, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad, grads_w, rtol=1e-6, atol=1e-7)
    accurate = [bool(out.rewards[g, 0] > out.rewards[g, 1:k].max()) for g, k in enumerate(sizes)]
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(sum(accurate) / len(sizes))
    rejected = torch.cat([out.rewards[g, 1:k] for g, k in enumerate(sizes)])
    assert out.metrics["rewards/rejected"].item() == pytest.approx(rejected.mean().item())
