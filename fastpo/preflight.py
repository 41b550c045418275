"""Checks that run before the model is built, so a run fails in seconds rather than at its first checkpoint
or its last plot. Each raises one ValueError naming the flag and what is expected.

    check_run(cfg)                      # extras, writable output folders
    check_free_disk(cfg.checkpoint.dir, estimate_checkpoint_bytes(model_config, cfg.model.dtype),
                    "--checkpoint.dir")
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import torch

GiB = 2**30

# import name -> what `pip install` needs for it
EXTRAS = {
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
    "peft": "peft",
    "bitsandbytes": "bitsandbytes",
    "flash_attn": "flash-attn --no-build-isolation",
    "liger_kernel": "liger-kernel",
}


def check_run(cfg) -> None:
    """Every check that needs only the config: optional extras, then the folders the run writes."""
    check_extras(cfg)
    check_writable(cfg.checkpoint.dir, "--checkpoint.dir")
    check_writable(cfg.logging.out_dir, "--logging.out_dir")
    if cfg.export_path:
        check_writable(cfg.export_path, "--checkpoint.export_dir")
    if cfg.lora.init_from and not os.path.isdir(cfg.lora.init_from):
        raise ValueError(f"--lora.init_from {cfg.lora.init_from}: not a folder (expected a PEFT adapter saved with "
                         "save_pretrained)")
    if cfg.ref.precompute:
        check_writable(cfg.ref.cache_dir, "--ref.cache_dir")


def check_writable(path: str, flag: str) -> None:
    """Create folder `path` and write, fsync and remove a probe file in it: a folder that cannot take a
    checkpoint fails now, not after the first interval of training."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create the folder ({e.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastpo-probe-", dir=path)
        try:
            os.write(fd, b"fastpo")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path}: the folder is not writable ({e.strerror})") from None


def check_free_disk(path: str, need_bytes: int, flag: str) -> None:
    """Fail when the disk holding `path` (or its nearest existing parent) has less than `need_bytes` free."""
    free = shutil.disk_usage(existing_parent(path)).free
    if free < need_bytes:
        raise ValueError(f"{flag} {path}: a checkpoint needs about {need_bytes / GiB:.2f} GiB, the disk has "
                         f"{free / GiB:.2f} GiB free")


def estimate_checkpoint_bytes(model_config, dtype: str | torch.dtype, trainable_fraction: float = 1.0) -> int:
    """Bytes of one checkpoint: the weights in `dtype` plus AdamW's two moments of the trainable ones (torch's
    AdamW keeps them in the parameter dtype). `model_config` is a transformers config or a Hub id / folder.
    The parameters are counted on the meta device: no memory, no weights downloaded; tied weights once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model_config, str):
        model_config = AutoConfig.from_pretrained(model_config)
    if not 0.0 <= trainable_fraction <= 1.0:
        raise ValueError(f"trainable_fraction: expected a value in [0, 1], got {trainable_fraction!r}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    count = sum(p.numel() for p in model.parameters())
    itemsize = (getattr(torch, dtype) if isinstance(dtype, str) else dtype).itemsize
    return int(count * itemsize * (1 + 2 * trainable_fraction))


def check_extras(cfg) -> None:
    """Each optional extra the config asks for must be importable; one line per missing one, naming the
    flag that needs it and the pip command that installs it."""
    missing = [f"{flag} needs {module}: pip install {pip}" for flag, module, pip in _wanted_extras(cfg)
               if not _importable(module)]
    if missing:
        raise ValueError("\n".join(missing))


def _wanted_extras(cfg):
    """(flag, import name, pip requirement) of the extras the config turns on. `--logging.plots` left at
    none (auto) needs nothing: it is on only when matplotlib is there."""
    wanted = []
    if cfg.logging.plots is True:
        wanted.append(("--logging.plots", "matplotlib"))
    if cfg.logging.tensorboard:
        wanted.append(("--logging.tensorboard", "tensorboard"))
    if cfg.lora.enabled:
        wanted.append(("--lora.r", "peft"))
    if cfg.lora.load_in_4bit:
        wanted.append(("--lora.load_in_4bit", "bitsandbytes"))
    if cfg.model.attn_backend == "flash_varlen":
        wanted.append(("--model.attn_backend flash_varlen", "flash_attn"))
    if cfg.model.liger_kernels:
        wanted.append(("--model.liger_kernels", "liger_kernel"))
    return [(flag, module, EXTRAS[module]) for flag, module in wanted]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def existing_parent(path: str) -> str:
    """`path` if it exists, else its nearest existing parent (the folder whose disk it will live on)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path
