"""The config tree, its CLI and config files, and validation (CPU, no model built)."""

import dataclasses

import pytest

from fastpo import config
from fastpo.config import TrainConfig, parse_args, validate


def test_defaults_are_the_valid_demo():
    cfg = parse_args([])
    validate(cfg)
    assert cfg == TrainConfig()
    assert cfg.model.name == config.DEMO_MODEL and cfg.data.dataset == config.DEMO_TRAIN
    assert cfg.model.random_init()  # the demo ships no weights
    assert cfg.optim.lr == 3e-3  # resolved for a random-init model
    assert cfg.loss.name == "dpo" and not cfg.loss.reference_free


def test_every_field_has_a_docstring():
    for cls in (TrainConfig, *config._sections().values()):
        docs = config.field_docs(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(config._hints(cls)[f.name]):
                assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


def test_cli_overrides():
    cfg = parse_args([
        "--model.name", "org/model", "--loss.name", "simpo", "--loss.simpo_gamma", "0.3",
        "--data.max_length=256", "--data.no-share_prefix", "--model.compile", "--logging.jsonl", "false",
        "--optim.betas", "0.9,0.95", "--loss.loss_type", "sigmoid,bco_pair", "--loss.loss_type", "sft",
        "--ref.name", "none", "--seed", "7",
    ])  # fmt: skip
    assert cfg.model.name == "org/model" and cfg.model.init == "auto"
    assert cfg.loss.simpo_gamma == 0.3 and cfg.data.max_length == 256
    assert cfg.data.share_prefix is False and cfg.model.compile is True and cfg.logging.jsonl is False
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.loss.loss_type == ["sigmoid", "bco_pair", "sft"]
    assert cfg.ref.name is None and cfg.seed == 7
    assert cfg.optim.lr == 1e-6  # pretrained weights


def test_file_then_cli_precedence(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('seed = 3\n[data]\nbatch_size = 8\nmax_length = 128\n[loss]\nname = "ipo"\nbeta = 0.5\n')
    cfg = parse_args(["--config", str(path), "--loss.beta", "0.2"])
    assert cfg.seed == 3 and cfg.data.batch_size == 8 and cfg.data.max_length == 128
    assert cfg.loss.name == "ipo" and cfg.loss.beta == 0.2  # CLI beats file
    assert cfg.data.max_tokens == 4096  # untouched default


def test_yaml_file(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  num_steps: 5\n  betas: [0.8, 0.9]\nlogging:\n  tensorboard: true\n")
    cfg = parse_args(["--config", str(path)])
    assert cfg.optim.num_steps == 5 and cfg.optim.betas == (0.8, 0.9) and cfg.logging.tensorboard is True


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for key, (cls, name, _, _) in config.options().items():
        assert f"--{key}" in out
        assert " ".join(config.field_docs(cls)[name].split())[:40] in out


def test_unknown_flag_suggests(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--loss.betta", "0.1"])
    err = capsys.readouterr().err
    assert "--loss.betta" in err and "--loss.beta" in err


def test_unknown_file_key_suggests(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[data]\nmax_lenght = 10\n")
    with pytest.raises(ValueError, match=r"max_lenght.*data\.max_length"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("argv, match", [
    (["--data.max_length", "0"], r"--data\.max_length"),  # must be > 0
    (["--data.truncation_mode", "middle"], r"--data\.truncation_mode.*keep_start"),
    (["--optim.num_steps", "2.5"], r"--optim\.num_steps"),  # not an integer
    (["--data.max_length", "64", "--data.max_prompt_length", "64"], r"--data\.max_prompt_length"),
    (["--loss.loss_type", "sigmoid,sft", "--loss.loss_weights", "1"], r"--loss\.loss_weights"),
    (["--model.dtype", "int8"], r"--model\.dtype"),
    (["--device", "tpu"], r"--device"),
    (["--loss.f_divergence_type", "kl"], r"--loss\.f_divergence_type.*reverse_kl"),
    (["--logging.tensorboard", "maybe"], r"--logging\.tensorboard.*true or false"),
])  # fmt: skip
def test_field_validation(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


@pytest.mark.parametrize("argv, match", [
    (["--loss.name", "simpo", "--ref.name", "org/ref"], r"--ref\.name.*reference-free"),
    (["--loss.name", "dpp"], r"unknown loss 'dpp'.*dpo"),
    (["--loss.name", "dpo", "--loss.simpo_gamma", "1.0"], r"--loss\.simpo_gamma.*does not use it"),
    (["--data.format", "kto", "--loss.name", "dpo"], r"--data\.format=kto.*unpaired objectives"),
    (["--data.format", "ranked", "--loss.name", "kto"], r"--loss\.name \['kto'\] is unpaired.*kto rows.*ranked lists"),
    (["--loss.loss_type", "kto,sigmoid"], r"--loss\.loss_type.*cannot be combined"),
    (["--data.format", "kto", "--loss.name", "kto", "--loss.ld_alpha", "0.5"], r"--loss\.ld_alpha.*one response"),
    (["--data.format", "kto", "--loss.name", "kto", "--loss.use_weighting"], r"--loss\.use_weighting.*one response"),
    (["--data.format", "kto", "--loss.name", "kto", "--data.batch_size", "4", "--optim.grad_accum_steps", "4"],
     r"--data\.batch_size / --optim\.grad_accum_steps = 1.*at least 2"),  # z0 needs another completion
    (["--loss.name", "aot", "--loss.use_weighting"], r"--loss\.use_weighting.*AOT"),
    (["--loss.name", "mrpo"], r"several reference models"),
    (["--data.max_length", "8192"], r"--data\.max_tokens"),
    (["--data.batch_size", "10", "--optim.grad_accum_steps", "4"], r"divisible"),
])  # fmt: skip
def test_cross_field_validation(argv, match):
    with pytest.raises(ValueError, match=match):
        validate(parse_args(argv))


def test_loss_hparams_use_the_objectives_names():
    cfg = parse_args(["--loss.name", "simpo", "--loss.simpo_gamma", "0.7", "--loss.label_smoothing", "0.1"])
    validate(cfg)
    assert cfg.loss.reference_free
    assert cfg.loss.hparams() == {"beta": 0.1, "use_weighting": False, "gamma": 0.7, "label_smoothing": 0.1}


@pytest.mark.parametrize("argv", [
    ["--loss.ld_alpha", "0.5"],
    ["--loss.use_weighting"],
    ["--loss.ld_alpha", "0.5", "--loss.use_weighting", "--loss.loss_type", "sigmoid,sft"],
    ["--data.format", "kto", "--loss.name", "kto", "--loss.desirable_weight", "1.33"],
    ["--data.format", "kto", "--loss.name", "apo_zero_unpaired"],
    ["--loss.name", "kto"],  # format auto: checked against the detected format once the data is loaded
])  # fmt: skip
def test_trainer_drives_wpo_ld_dpo_and_unpaired(argv):
    validate(parse_args(argv))


def test_unpaired_traits():
    assert parse_args(["--loss.name", "kto"]).loss.unpaired
    assert parse_args(["--loss.name", "kto"]).loss.uses_reference_point
    unpaired = parse_args(["--loss.name", "apo_zero_unpaired"]).loss
    assert unpaired.unpaired and not unpaired.uses_reference_point
    assert not parse_args([]).loss.unpaired
    cfg = parse_args(["--loss.name", "kto", "--loss.undesirable_weight", "2"])
    assert cfg.loss.hparams() == {"beta": 0.1, "use_weighting": False, "undesirable_weight": 2.0}
    config.check_data_format(cfg, "kto")
    config.check_data_format(cfg, "preference")  # pairs are unpaired by the data layer
    with pytest.raises(ValueError, match=r"detected format 'ranked'"):
        config.check_data_format(cfg, "ranked")
