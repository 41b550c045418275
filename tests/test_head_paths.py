"""The trainer's two head paths give the same losses and gradients: for every group-local objective the
trainer drives (and the LD-DPO / WPO modifiers), the pair-fused path (6NHV, gradients formed in the forward)
equals the generic path (8NHV, per-token log-probs and autograd) to fp32 rounding on the same micro-batch,
in one process; and 2-rank FSDP runs of both paths train to the same losses as one process. `auto` picks
pair-fused exactly when the objectives allow it.
"""

import json

import pytest
import torch

from fastpo.losses import LOSSES


def _rows(n=24, seed=0):
    import random

    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice("abcdefghij") for _ in range(k))  # noqa: E731
    return [{"prompt": f"Q: {word(rng.randint(1, 6))}\nA: ", "chosen": word(rng.randint(1, 9)),
             "rejected": word(rng.randint(1, 9))} for _ in range(n)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return str(path)


# Every objective the trainer drives whose per-example gradient depends on that example only (AOT sorts over
# the batch and runs generic; MRPO needs several references and is refused by the trainer). "dpo" is an alias.
PAIR_LOCAL = sorted(n for n, o in LOSSES.items() if o.pair_local and not o.multi_reference and n != "dpo")
MODIFIERS = {"ld_dpo": ["--loss.ld_alpha", "0.4"], "wpo": ["--loss.use_weighting"],
             "rpo_weights": ["--loss.loss_type", "sigmoid,sft", "--loss.loss_weights", "1.0,0.5"]}


def _trainer(tmp_path, data_file, path, args):
    from fastpo import parallel
    from fastpo.build import build
    from fastpo.config import parse_args, validate

    cfg = parse_args(["--data.dataset", data_file, "--data.eval_dataset", data_file, "--data.batch_size", "8",
                      "--data.max_eval_examples", "4", "--logging.out_dir", str(tmp_path), "--device", "cpu",
                      "--model.head_path", path, "--loss.beta", "0.5", *args])
    validate(cfg)
    torch.manual_seed(0)
    return build(cfg, parallel.init_world("cpu"))[0]


def _micro_batch(trainer, examples, path):
    """Loss output and policy gradients of one micro-batch through head path `path`."""
    from fastpo.trainer import _nll_scale

    trainer.policy.path = path
    trainer.optimizer.zero_grad(set_to_none=True)
    out, _ = trainer.micro_step(examples, _nll_scale(examples), len(examples))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", PAIR_LOCAL + list(MODIFIERS))
def test_pair_fused_equals_generic_in_the_trainer(tmp_path, data_file, case):
    """One update first (so policy and reference differ), then the step-1 batch through both paths on the
    same parameters."""
    from fastpo.trainer import global_batch

    trainer = _trainer(tmp_path, data_file, "auto", MODIFIERS.get(case, ["--loss.name", case]))
    trainer.train_step()
    examples = global_batch(trainer.train_examples, trainer.state.step, trainer.cfg.data.batch_size,
                            trainer.cfg.seed)
    out_g, grads_g = _micro_batch(trainer, examples, "generic")
    out_f, grads_f = _micro_batch(trainer, examples, "pair_fused")
    torch.testing.assert_close(out_f.loss, out_g.loss, rtol=1e-5, atol=1e-6)
    for key in out_g.metrics:
        torch.testing.assert_close(out_f.metrics[key], out_g.metrics[key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=key: f"{k}: {m}")
    assert grads_g.keys() == grads_f.keys() and "model.lm_head.weight" in grads_g
    for name, g in grads_g.items():
        err = (grads_f[name] - g).abs().max() / g.abs().max().clamp(min=1e-6)
        assert err <= 1e-5, f"{case}: {name} relative error {err:.2e}"


def test_auto_picks_pair_fused_exactly_when_allowed(tmp_path, data_file, monkeypatch):
    import fastpo.losses.functional as functional

    seen = []
    real = functional._pair_fused
    monkeypatch.setattr(functional, "_pair_fused", lambda *a, **k: seen.append(True) or real(*a, **k))
    for name, fused in (("sigmoid", True), ("aot", False)):
        seen.clear()
        trainer = _trainer(tmp_path / name, data_file, "auto", ["--loss.name", name])
        trainer.train_step()
        assert bool(seen) == fused, name
        seen.clear()
        trainer.evaluate()  # no gradient: generic
        assert not seen


def test_pair_fused_with_a_batch_coupled_objective_is_refused():
    from fastpo.config import parse_args, validate

    with pytest.raises(ValueError, match="--model.head_path=pair_fused"):
        validate(parse_args(["--model.head_path", "pair_fused", "--loss.name", "aot"]))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_head_paths_two_ranks_equal_one_process(tmp_path, data_file, loss):
    """Both head paths under FSDP2 on 2 gloo ranks train to the one-process losses (one process through the
    generic path equals the pair-fused path: the test above)."""
    from tests.test_train import _assert_same_losses, _losses, _run

    args = ["--data.dataset", data_file, "--data.eval_dataset", data_file, "--loss.name", loss,
            "--optim.num_steps", "3", "--data.max_eval_examples", "5"]
    runs = {}
    for path, nproc in (("pair_fused", 1), ("generic", 2), ("pair_fused", 2)):
        out = tmp_path / f"{path}-{nproc}"
        _run([*args, "--model.head_path", path], out, nproc=nproc)
        runs[path, nproc] = _losses(out)
    for losses in runs.values():
        _assert_same_losses(losses, runs["pair_fused", 1], [1, 2, 3])
