"""fastpo.preflight: folders that cannot be written and disks that are too full fail with the flag named,
the checkpoint size estimate matches a real DCP checkpoint of the demo model with AdamW, and each optional
extra the config asks for is checked with the flag and the pip command."""

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastpo import preflight
from fastpo.config import DEMO_MODEL, from_flat


def test_writable_folder_is_created_and_left_clean(tmp_path):
    path = tmp_path / "a" / "b"
    preflight.check_writable(str(path), "--checkpoint.dir")
    assert path.is_dir() and list(path.iterdir()) == []


@pytest.fixture
def unwritable(tmp_path):
    """(folder, expected cause): a read-only folder; as root, where mode bits do not stop writes, a folder
    path under a regular file."""
    if os.geteuid() != 0:
        path = tmp_path / "ro"
        path.mkdir(mode=0o500)
        yield str(path), "the folder is not writable (Permission denied)"
        path.chmod(0o700)
    else:
        (tmp_path / "file").write_text("")
        yield str(tmp_path / "file" / "ckpt"), "cannot create the folder (Not a directory)"


def test_unwritable_folder_names_the_flag(unwritable):
    path, cause = unwritable
    with pytest.raises(ValueError) as info:
        preflight.check_writable(path, "--checkpoint.dir")
    assert str(info.value) == f"--checkpoint.dir {path}: {cause}"


def test_failed_probe_write_names_the_flag(tmp_path):
    """The kernel refuses the probe's bytes (a per-file size limit of 0, in a subprocess): a real write
    failure in a folder that exists, whoever runs the test."""
    script = textwrap.dedent(f"""
        import resource, signal
        from fastpo import preflight
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        try:
            preflight.check_writable({str(tmp_path)!r}, "--logging.out_dir")
        except ValueError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.strip() == f"--logging.out_dir {tmp_path}: the folder is not writable (File too large)", \
        proc.stdout + proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_free_disk(tmp_path):
    target = str(tmp_path / "not" / "yet")
    preflight.check_free_disk(target, 1, "--checkpoint.dir")
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(ValueError, match=rf"^--checkpoint.dir {target}: a checkpoint needs about [\d.]+ GiB, "
                                         r"the disk has [\d.]+ GiB free$"):
        preflight.check_free_disk(target, free + 2**30, "--checkpoint.dir")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_estimate_matches_a_real_checkpoint(tmp_path):
    """The demo model's weights and AdamW moments saved with DCP take the estimate plus DCP's metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 5, 7]]), labels=torch.tensor([[1, 5, 7]])).loss.backward()
    optimizer.step()
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, optimizer))), checkpoint_id=str(tmp_path),
             no_dist=True)
    saved = sum(p.stat().st_size for p in tmp_path.iterdir())
    count = sum(p.numel() for p in model.parameters())
    estimate = preflight.estimate_checkpoint_bytes(config, "float32")
    assert estimate == count * 4 * 3  # fp32 weights + two fp32 moments
    tensors = 3 * len(list(model.parameters()))  # weight, exp_avg, exp_avg_sq
    assert estimate <= saved <= estimate + tensors * 2500 + 64 * 1024, (estimate, saved)  # torch.save's zip headers
    # bf16 weights, moments of a quarter of them
    assert preflight.estimate_checkpoint_bytes(DEMO_MODEL, torch.bfloat16, trainable_fraction=0.25) == count * 3


def _cfg(**flat):
    return from_flat(flat)


# one case per extra: the flags that need it, the module that goes missing, the line that names both
EXTRA_CASES = {
    "plots": (_cfg(**{"logging.plots": True}), "matplotlib",
              "--logging.plots needs matplotlib: pip install matplotlib"),
    "tensorboard": (_cfg(**{"logging.tensorboard": True}), "tensorboard",
                    "--logging.tensorboard needs tensorboard: pip install tensorboard"),
    "lora": (_cfg(**{"lora.r": 8}), "peft", "--lora.r needs peft: pip install peft"),
    "qlora": (_cfg(**{"lora.r": 8, "lora.load_in_4bit": True}), "bitsandbytes",
              "--lora.load_in_4bit needs bitsandbytes: pip install bitsandbytes"),
    "flash": (_cfg(**{"model.attn_backend": "flash_varlen"}), "flash_attn",
              "--model.attn_backend flash_varlen needs flash_attn: pip install flash-attn --no-build-isolation"),
    "liger": (_cfg(**{"model.liger_kernels": True}), "liger_kernel",
              "--model.liger_kernels needs liger_kernel: pip install liger-kernel"),
}


@pytest.fixture
def without(monkeypatch):
    """without(*names): importlib.util.find_spec reports those extras missing and the other extras installed
    (whatever this machine has)."""
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name in preflight.EXTRAS:
            return None if name in missing else importlib.machinery.ModuleSpec(name, None)
        return real(name, *args)

    missing = set()
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    def hide(*names):
        missing.clear()
        missing.update(names)

    return hide


@pytest.mark.parametrize("case", list(EXTRA_CASES))
def test_missing_extra_names_flag_and_pip_command(without, case):
    cfg, module, line = EXTRA_CASES[case]
    without(module)
    with pytest.raises(ValueError) as info:
        preflight.check_extras(cfg)
    assert str(info.value) == line
    without()
    preflight.check_extras(cfg)


def test_every_missing_extra_gets_its_line(without):
    cfg = _cfg(**{
        "lora.r": 4, "lora.load_in_4bit": True, "logging.plots": True, "logging.tensorboard": True, "model.attn_backend": "flash_varlen",
        "model.liger_kernels": True})
    without(*preflight.EXTRAS)
    with pytest.raises(ValueError) as info:
        preflight.check_extras(cfg)
    assert str(info.value).splitlines() == [line for _, _, line in EXTRA_CASES.values()]


def test_defaults_need_no_extra(without):
    """Plots left at auto, no LoRA (r=0), the default attention: nothing is required."""
    without(*preflight.EXTRAS)
    preflight.check_extras(_cfg())


def test_check_run_names_the_first_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("")
    cfg = from_flat({"checkpoint.dir": str(tmp_path / "ckpt"), "logging.out_dir": str(tmp_path / "file" / "logs")})
    with pytest.raises(ValueError, match=r"^--logging.out_dir .*/file/logs: cannot create the folder"):
        preflight.check_run(cfg)
    assert (tmp_path / "ckpt").is_dir()
