"""LoRA and QLoRA through PEFT: adapters on the policy, the reference as the same model with its adapters off,
and the export of a trained policy (full weights, or the adapter and optionally the merged model).

    model = apply_lora(load_model(cfg, device), cfg.lora)    # PeftModel: base frozen, adapters trainable
    with adapters_disabled(model): ...                      # the initial policy: the reference, no second copy

With `--lora.load_in_4bit` the base is loaded in NF4 by bitsandbytes (bf16 compute, CUDA only; QLoRA); the
adapters stay in the master dtype.
"""

from __future__ import annotations

import contextlib
import os

import torch


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def quantization_config(lora_cfg):
    """bitsandbytes' 4-bit NF4 load of the frozen base (QLoRA), or None."""
    if not lora_cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def apply_lora(model, lora_cfg, *, gradient_checkpointing: bool = False):
    """The policy with LoRA adapters: a fresh adapter (`--lora.r`, alpha, dropout, target modules), or the
    adapter of `--lora.init_from`, trainable. Everything else is frozen except `--lora.modules_to_save`."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if lora_cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if lora_cfg.init_from:
        return PeftModel.from_pretrained(model, lora_cfg.init_from, is_trainable=True)
    config = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, task_type="CAUSAL_LM",
        target_modules=list(lora_cfg.target_modules) or "all-linear",
        modules_to_save=list(lora_cfg.modules_to_save) or None,
    )
    return get_peft_model(model, config)


def adapters_disabled(model):
    """Context in which a PEFT model computes its base model's outputs (the reference of a LoRA policy)."""
    if not is_peft(model):
        raise TypeError(f"{type(model).__name__} has no adapters to disable")
    return model.disable_adapter()


def save_model(model, state_dict: dict, out_dir: str, *, merge: bool = False) -> None:
    """Save a trained policy from its full state dict (gathered from FSDP shards): `save_pretrained` with
    safetensors. A PEFT model saves its adapter (loadable with `PeftModel.from_pretrained(base, out_dir)`)
    and, with `merge`, the base with the adapter merged in to `<out_dir>/merged`."""
    os.makedirs(out_dir, exist_ok=True)
    if not is_peft(model):
        model.config.use_cache = True
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        return
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    if merge:
        merged = _rebuild(model, state_dict).merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(os.path.join(out_dir, "merged"), safe_serialization=True)


def _rebuild(model, state_dict: dict):
    """An unsharded CPU copy of a PEFT model holding `state_dict`: built on the meta device (no memory for
    random init), then the full weights assigned. Its `merge_and_unload` is PEFT's own merge."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base_config = model.get_base_model().config
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(base_config)
    copy = get_peft_model(base, model.peft_config[model.active_adapter])
    missing, unexpected = copy.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"cannot rebuild the LoRA model for merging: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    with contextlib.suppress(AttributeError):
        copy.tie_weights()
    return copy
