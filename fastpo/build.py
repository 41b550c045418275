"""Everything a run needs before its first step: tokenizer, data, policy (full or LoRA), reference, optimizer and
schedule, each checked before the expensive part starts.

    trainer, tokenizer, report = build(cfg, world)

Order: tokenizer, data files, tokenization (token ids checked against the model's vocabulary from its config,
and a free-disk check for one checkpoint), then the model (checked by `fastpo.models.check_model_supported`),
LoRA adapters, the reference, FSDP, the optimizer. The reference is a frozen copy of the initial policy, a
separate model (`--ref.name`), or, with LoRA, the policy itself with its adapters disabled (one copy of the
weights).
"""

from __future__ import annotations

import copy
import math

import torch

from fastpo import lora, parallel, preflight
from fastpo.trainer import Scorer, Trainer


def _model_config(cfg, name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        flag = "--model.name" if name == cfg.model.name else "--ref.name"
        raise ValueError(f"{flag}={name!r}: cannot load a model config from it ({e})") from e


def load_model(cfg, device: torch.device, name: str | None = None, *, random_init: bool | None = None,
               config=None):
    """A transformers causal LM: random init from the config (seeded) or pretrained weights (in 4-bit NF4 with
    `--lora.load_in_4bit`), checked to be scored exactly by fastpo's packed attention and fused head."""
    from transformers import AutoModelForCausalLM

    from fastpo.models import check_model_supported

    name = name or cfg.model.name
    random_init = cfg.model.random_init() if random_init is None else random_init
    dtype = getattr(torch, cfg.model.dtype)
    remote = cfg.model.trust_remote_code
    try:
        if random_init:
            torch.manual_seed(cfg.seed)
            config = _model_config(cfg, name) if config is None else config
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=remote)
        else:
            quantized = lora.quantization_config(cfg.lora)
            extra = {} if quantized is None else {"quantization_config": quantized, "device_map": {"": device}}
            model = AutoModelForCausalLM.from_pretrained(name, revision=cfg.model.revision, dtype=dtype,
                                                         trust_remote_code=remote, **extra)
    except (OSError, ValueError) as e:
        flag = "--model.name" if name == cfg.model.name else "--ref.name"
        raise ValueError(f"{flag}={name!r}: cannot load a causal LM from it ({e})") from e
    check_model_supported(model, max_length=_longest_sequence(cfg))
    model.config.use_cache = False
    return model if getattr(model, "is_quantized", False) else model.to(device)


def _longest_sequence(cfg) -> int:
    """The longest [prompt + response] a run can score: --data.max_length, bounded by the packed row."""
    d = cfg.data
    return d.max_tokens if d.max_length is None else min(d.max_length, d.max_tokens)


def frozen_copy(model):
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def apply_liger_kernels(model):
    """Liger-Kernel's fused RMSNorm / RoPE / SwiGLU on the model body (the head is fastpo's)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)


def parallelize(scorer: Scorer, cfg, world: parallel.World, *, train: bool) -> Scorer:
    if cfg.model.liger_kernels:
        apply_liger_kernels(scorer.model)
    if train and cfg.model.activation_checkpointing:
        parallel.apply_activation_checkpointing(scorer.model)
    if cfg.model.compile:
        for block in parallel.decoder_blocks(scorer.model):
            block.compile()
    if world.size > 1:
        mp = None
        if cfg.parallel.param_dtype != "auto":
            mp = parallel.mixed_precision(cfg.parallel.param_dtype, cfg.parallel.reduce_dtype)
        elif world.device.type == "cuda":
            mp = parallel.mixed_precision("bfloat16", cfg.parallel.reduce_dtype)
        parallel.apply_fsdp(scorer, parallel.decoder_blocks(scorer.model), world, mp=mp,
                            reshard_after_forward=cfg.parallel.reshard_after_forward)
    return scorer


class AdapterOffReference:
    """The reference of a LoRA policy: the policy's own module run with its adapters disabled (the initial
    policy, with no second copy of the weights; under FSDP the policy's forward gathers the weights)."""

    def __init__(self, policy: Scorer):
        self.policy = policy

    def __call__(self, batch, *, ld_alpha: float | None = None) -> torch.Tensor:
        return self.policy(batch, ld_alpha=ld_alpha, adapters=False)


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or cfg.model.name
    try:
        return AutoTokenizer.from_pretrained(source, revision=cfg.model.revision)
    except (OSError, ValueError) as e:
        flag = "--model.tokenizer" if cfg.model.tokenizer else "--model.name"
        raise ValueError(f"{flag}={source!r}: cannot load a tokenizer from it ({e})") from e


def load_data(cfg, tokenizer, config):
    """(train, held-out, report): files checked, rows tokenized, token ids checked against the policy's (and a
    separate reference's) vocabulary before any model is built."""
    from fastpo.config import check_data_format
    from fastpo.data import check_data_files, check_token_ids, load_preference_dataset

    check_data_files(cfg.data)
    train, held_out, report = load_preference_dataset(cfg.data, tokenizer, unpaired=cfg.loss.unpaired)
    check_data_format(cfg, report.format)
    source = cfg.model.tokenizer or cfg.model.name
    check_token_ids(train + held_out, config.get_text_config().vocab_size, source, cfg.model.name)
    if cfg.ref.name is not None and not cfg.loss.reference_free:
        vocab = _model_config(cfg, cfg.ref.name).get_text_config().vocab_size
        check_token_ids(train + held_out, vocab, source, cfg.ref.name)
    return train, held_out, report


def build_policy_and_reference(cfg, world: parallel.World, config=None):
    """(policy Scorer, reference or None), both parallelized."""
    model = load_model(cfg, world.device, config=config)
    scorer_kw = dict(backend=cfg.model.attn_backend, impl=cfg.model.head_impl)
    if cfg.lora.enabled:
        model = lora.apply_lora(model, cfg.lora, gradient_checkpointing=cfg.model.activation_checkpointing)
    reference = None
    if not cfg.loss.reference_free and (cfg.ref.name is not None or not cfg.lora.enabled):
        ref_model = frozen_copy(model) if cfg.ref.name is None else frozen_copy(
            load_model(cfg, world.device, cfg.ref.name, random_init=False))
        reference = parallelize(Scorer(ref_model, **scorer_kw), cfg, world, train=False)
    policy = parallelize(Scorer(model, path=cfg.model.head_path, **scorer_kw), cfg, world, train=True)
    if not cfg.loss.reference_free and reference is None:
        reference = AdapterOffReference(policy)
    return policy, reference


def check_disk(cfg, config) -> None:
    """Free space under --checkpoint.dir for one checkpoint (weights and the trainable parameters' AdamW state)."""
    trainable = 0.02 if cfg.lora.enabled else 1.0
    # a copy: building a model (here on the meta device) writes into its config
    need = preflight.estimate_checkpoint_bytes(copy.deepcopy(config), cfg.model.dtype, trainable)
    preflight.check_free_disk(cfg.checkpoint.dir, need, "--checkpoint.dir")


def total_steps(cfg, num_examples: int) -> int:
    if cfg.optim.num_steps is not None:
        return cfg.optim.num_steps
    return max(1, int(cfg.optim.num_epochs * (num_examples // cfg.data.batch_size)))


def build(cfg, world: parallel.World):
    """Tokenizer, data, policy, reference, optimizer and schedule; returns (Trainer, tokenizer, report)."""
    tokenizer = load_tokenizer(cfg)
    if cfg.data.pad_token_id is None:
        cfg.data.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    config = _model_config(cfg, cfg.model.name)  # read once: token-id check, disk check, random init
    train, held_out, report = load_data(cfg, tokenizer, config)
    check_disk(cfg, config)
    policy, reference = build_policy_and_reference(cfg, world, config)
    o = cfg.optim
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    steps = total_steps(cfg, len(train))
    scheduler = lr_schedule(optimizer, o.schedule, o.warmup_steps, steps, o.min_lr_ratio)
    trainer = Trainer(cfg, world, policy, reference, optimizer, scheduler, (train, held_out), cfg.loss.hparams(),
                      steps)
    return trainer, tokenizer, report


def lr_schedule(optimizer, kind: str, warmup_steps: int, total: int, min_ratio: float = 0.0):
    """Linear warmup, then cosine / linear decay to `min_ratio` of the peak, or constant."""
    decay = {
        "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
        "linear": lambda t: 1 - t,
        "constant": lambda t: 1.0,
    }[kind]

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return min_ratio + (1 - min_ratio) * decay(t)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
