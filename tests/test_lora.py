"""LoRA through PEFT: the reference is the policy with its adapters disabled (step-1 loss ln 2, no second copy
of the weights), only the adapters train (the LM head and the embeddings stay frozen), the pair-fused head,
activation checkpointing, DCP resume and FSDP2 (2 ranks equal 1 process) all work, and the export is a PEFT
adapter (plus a merged model on request) loadable with `PeftModel.from_pretrained` / `from_pretrained`.
QLoRA needs CUDA and bitsandbytes and says so before anything loads.
"""

import math

import pytest
import torch

from fastpo import train as train_cli
from tests.test_train import FAST, _assert_same_losses, _losses, _run

LORA = ["--lora.r", "8", "--lora.alpha", "16"]


def _trainer(tmp_path, args):
    from fastpo import parallel
    from fastpo.build import build
    from fastpo.config import parse_args, validate

    cfg = parse_args([*FAST, "--logging.out_dir", str(tmp_path), "--device", "cpu", *args])
    validate(cfg)
    return build(cfg, parallel.init_world("cpu"))


def test_reference_is_the_adapter_off_policy_and_step_one_is_ln2(tmp_path):
    from fastpo.build import AdapterOffReference

    trainer, _, _ = _trainer(tmp_path, LORA)
    assert isinstance(trainer.reference, AdapterOffReference) and trainer.reference.policy is trainer.policy
    trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)[:5]
    frozen = {n for n, p in trainer.policy.named_parameters() if not p.requires_grad}
    assert any("lm_head" in n for n in frozen) and any("embed_tokens" in n for n in frozen)
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in trainer.policy.parameters() if p.requires_grad}
    metrics = trainer.train_step()
    assert abs(metrics["loss"] - math.log(2)) <= 1e-6, metrics["loss"]
    second = trainer.train_step()
    assert abs(second["loss"] - math.log(2)) > 1e-6  # the adapters moved the policy away from the reference


def test_frozen_base_and_head_do_not_change(tmp_path):
    trainer, _, _ = _trainer(tmp_path, LORA)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    for _ in range(2):
        trainer.train_step()
    for name, p in trainer.policy.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(p, before[name]), name


@pytest.mark.slow
def test_lora_export_loads_with_peft_and_merged_with_transformers(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastpo.trainer import Scorer, pack

    out = tmp_path / "run"
    result = train_cli.main([*FAST, *LORA, "--logging.out_dir", str(out), "--checkpoint.dir", str(out / "ckpt"),
                             "--lora.merge_on_export", "--checkpoint.export_dir", "auto", "--device", "cpu"])
    final = out / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "README.md").exists()
    assert "lora" in (final / "README.md").read_text().lower()
    trainer, _, _ = _trainer(tmp_path / "fresh", [])  # the same random-init base (seeded), to load the adapter onto
    base = trainer.policy.model
    adapted = PeftModel.from_pretrained(base, str(final))
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    batch = pack(trainer.eval_examples[:6], trainer.cfg)
    with torch.no_grad():
        a, m = Scorer(adapted)(batch), Scorer(merged)(batch)
        base_scores = adapted.disable_adapter()
        with base_scores:
            b = Scorer(adapted)(batch)
    torch.testing.assert_close(m, a, rtol=1e-5, atol=1e-5)
    assert (a - b).abs().max() > 1e-4  # the adapter is not a no-op
    assert result["after"]["eval/loss"] != result["before"]["eval/loss"]


@pytest.mark.slow
def test_lora_pair_fused_and_activation_checkpointing_equal_generic(tmp_path):
    """The same three LoRA steps through the pair-fused head with activation checkpointing and through the
    generic head without it give the same losses."""
    args = [*LORA, "--optim.num_steps", "3"]
    _run([*args, "--model.head_path", "pair_fused", "--model.activation_checkpointing"], tmp_path / "fused")
    _run([*args, "--model.head_path", "generic"], tmp_path / "generic")
    _assert_same_losses(_losses(tmp_path / "fused"), _losses(tmp_path / "generic"), [1, 2, 3])


@pytest.mark.slow
def test_lora_two_ranks_equal_one_process_and_resume_is_exact(tmp_path):
    """FSDP2 over 2 gloo ranks gives the one-process losses; resuming from the step-2 checkpoint (adapters and
    their optimizer state) reproduces steps 3-4."""
    args = [*LORA, "--checkpoint.interval", "2"]
    _run(args, tmp_path / "one")
    _run(args, tmp_path / "two", nproc=2)
    one = _losses(tmp_path / "one")
    _assert_same_losses(_losses(tmp_path / "two"), one, [1, 2, 3, 4])
    resumed = tmp_path / "resumed"
    _run([*args, "--optim.num_steps", "2"], resumed)
    _run([*args, "--checkpoint.resume", "latest", "--checkpoint.allow_changes"], resumed)
    again = _losses(resumed)
    for step in (3, 4):
        assert abs(one[step] - again[step]) <= 1e-6 * max(1.0, abs(one[step])), (step, one, again)


@pytest.mark.slow
def test_lora_precomputed_reference_equals_adapter_off(tmp_path):
    cache = ["--ref.precompute", "--ref.cache_dir", str(tmp_path / "cache")]
    _run([*LORA, "--optim.num_steps", "2"], tmp_path / "live")
    _run([*LORA, "--optim.num_steps", "2", *cache], tmp_path / "cached")
    live, cached = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    for step in live:
        assert abs(live[step] - cached[step]) <= 1e-6 * max(1.0, abs(live[step])), (step, live, cached)


@pytest.mark.slow
def test_lora_continues_from_an_exported_adapter(tmp_path):
    """--lora.init_from an adapter exported by a previous run: the policy starts where that run ended (its
    first loss is not ln 2: the adapter is not zero), and the reference is still the base."""
    _run([*LORA, "--checkpoint.export_dir", "auto"], tmp_path / "first")
    _run([*LORA, "--lora.init_from", str(tmp_path / "first" / "final"), "--optim.num_steps", "1"], tmp_path / "second")
    assert abs(_losses(tmp_path / "second")[1] - math.log(2)) > 1e-4


def test_qlora_on_cpu_is_refused_before_loading(tmp_path):
    from fastpo.config import parse_args, validate

    cfg = parse_args([*LORA, "--lora.load_in_4bit", "--device", "cpu"])
    with pytest.raises(ValueError, match=r"--lora.load_in_4bit \(QLoRA\) needs CUDA"):
        validate(cfg)


def test_lora_options_without_a_rank_are_refused():
    from fastpo.config import parse_args

    with pytest.raises(ValueError, match="--lora.merge_on_export: expected to be unset unless --lora.r > 0"):
        parse_args(["--lora.merge_on_export"])


@pytest.mark.gpu
def test_qlora_trains_on_cuda(tmp_path):
    """4-bit NF4 base (bitsandbytes), bf16 compute: a pretrained tiny model saved locally, two steps."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastpo.data import demo_paths

    model_dir = tmp_path / "model"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(demo_paths().model))
    model.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).write_bytes((__import__("pathlib").Path(demo_paths().model) / name).read_bytes())
    result = train_cli.main([*FAST, *LORA, "--lora.load_in_4bit", "--model.name", str(model_dir), "--device", "cuda",
                             "--optim.num_steps", "2", "--logging.out_dir", str(tmp_path / "run")])
    assert all(math.isfinite(r["loss"]) for r in result["history"])
