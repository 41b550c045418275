"""The training loop as named steps: build, reference pass, forward_backward_step, train_step, evaluate,
checkpoint, export.

One step consumes one global batch of `data.batch_size` examples, split into `optim.grad_accum_steps`
micro-batches and, within each, across data-parallel ranks (rank r takes examples r, r + W, ...). Each
rank packs its share with prefix sharing and scores it through `Scorer` (decoder body + fused head in
one module, so FSDP gathers the LM head inside the forward). The loss of a step is the mean over the
global batch's examples of the per-example objective: every micro-batch contributes
`sum(losses) / global_examples`, FSDP's division by the world size is off, so gradients are those of one
process on the whole batch. Metrics are TRL's (`rewards/chosen`, `rewards/accuracies`, ...), summed on
device and reduced once per step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from fastpo import parallel
from fastpo.attention import enable_prefix_sharing, score
from fastpo.losses import PreferenceInputs, preference_loss
from fastpo.packing import PackedBatch, pack_examples

logger = logging.getLogger(__name__)

METRIC_KEYS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
)  # fmt: skip


class Scorer(torch.nn.Module):
    """Decoder body + fused LM head: `forward(batch) -> fastpo.attention.ResponseScores`."""

    def __init__(self, model, *, backend="auto", impl="auto", extras=True):
        super().__init__()
        self.model = model
        self.backend, self.impl, self.extras = backend, impl, extras
        enable_prefix_sharing(model)

    def forward(self, batch: PackedBatch):
        return score(self.model, batch, backend=self.backend, impl=self.impl, extras=self.extras)


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler that an exact resume needs."""

    step: int = 0
    history: list = field(default_factory=list)

    def state_dict(self):
        return {"step": self.step, "history": json.dumps(self.history), "rng": _rng_state()}

    def load_state_dict(self, sd):
        self.step = int(sd["step"])
        self.history = json.loads(sd["history"])
        _set_rng_state(sd["rng"])


def _rng_state():
    return {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()[1])}


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(json.loads(state["python"])), None))


# ----------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------


def epoch_order(num_examples: int, epoch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


def global_batch(examples, step: int, batch_size: int, seed: int) -> list:
    """The examples of global step `step`: a pure function of (step, seed), so resume is exact."""
    per_epoch = len(examples) // batch_size
    if per_epoch == 0:
        raise ValueError(f"data.batch_size={batch_size} exceeds the {len(examples)} training examples")
    epoch, i = divmod(step, per_epoch)
    order = epoch_order(len(examples), epoch, seed)
    return [examples[j] for j in order[i * batch_size : (i + 1) * batch_size]]


def micro_batches(batch: list, accum: int, world: parallel.World) -> list[list]:
    """This rank's share of each of the `accum` micro-batches of a global batch."""
    size = len(batch) // accum
    micro = [batch[i * size : (i + 1) * size] for i in range(accum)]
    return [m[world.rank :: world.size] for m in micro]


def pack(examples, cfg, min_responses=2) -> PackedBatch:
    return pack_examples(
        [(ex.prompt_ids, ex.response_ids) for ex in examples],
        max_tokens=cfg.data.max_tokens,
        share_prompt=cfg.data.share_prefix,
        prompt_truncation=cfg.data.truncation_mode,
        min_responses=min_responses,
        pad_token_id=cfg.data.pad_token_id,
    )


# ----------------------------------------------------------------------------------------------------
# loss and metrics
# ----------------------------------------------------------------------------------------------------


def group_view(x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[R] -> [G, K] (responses are numbered example-major; every example has K responses)."""
    return x.view(batch.num_examples, batch.num_responses // batch.num_examples)


def loss_inputs(scores, ref_logps, batch: PackedBatch, nll_scale) -> PreferenceInputs:
    return PreferenceInputs(
        logps=group_view(scores.logp_sum, batch),
        num_tokens=group_view(scores.num_tokens.float(), batch),
        ref_logps=None if ref_logps is None else group_view(ref_logps, batch),
        nll_scale=nll_scale,
    )


def metric_sums(out, inputs: PreferenceInputs, scores, batch: PackedBatch) -> torch.Tensor:
    """Sums over this micro-batch of every METRIC_KEYS entry (loss excluded), plus the counts the means
    divide by: [examples, chosen tokens, rejected tokens]. Kept on device."""
    rewards = out.rewards.detach()
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    logps = inputs.logps.detach()
    tokens = group_view(scores.num_tokens.to(rewards.dtype), batch)
    logits = torch.zeros(batch.num_responses, device=rewards.device).index_add_(
        0, scores.token_response, scores.mean_logits.float()
    )
    logits = group_view(logits, batch)
    sums = [chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum(),
            logps[:, 0].sum(), logps[:, 1].sum(), logits[:, 0].sum(), logits[:, 1].sum()]
    counts = [torch.tensor(float(batch.num_examples), device=rewards.device), tokens[:, 0].sum(), tokens[:, 1].sum()]
    return torch.stack(sums + counts)


def finish_metrics(sums: torch.Tensor, loss_sum: torch.Tensor) -> dict:
    """Reduce across ranks once and turn sums into TRL-named means (one host sync per step)."""
    totals = parallel.all_reduce_sum(torch.cat([sums, loss_sum.reshape(1).to(sums.dtype)])).tolist()
    *s, n, tok_c, tok_r, loss = totals
    means = [x / max(n, 1) for x in s[:6]] + [s[6] / max(tok_c, 1), s[7] / max(tok_r, 1)]
    return {"loss": loss, **dict(zip(METRIC_KEYS[1:], means))}


# ----------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------


class Trainer:
    """Owns the policy, the reference, the optimizer and the data; `train()` runs to the end."""

    def __init__(self, cfg, world, policy: Scorer, reference: Scorer | None, optimizer, scheduler, data, hparams,
                 num_steps: int):
        self.cfg, self.world, self.num_steps = cfg, world, num_steps
        self.policy, self.reference = policy, reference
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_examples, self.eval_examples = data
        self.hparams = hparams
        self.state = TrainState()
        self.ref_cache: dict[int, torch.Tensor] = {}

    # -- reference -------------------------------------------------------------------------------

    @torch.no_grad()
    def reference_logps(self, examples, batch: PackedBatch) -> torch.Tensor | None:
        """[R] reference log-prob sums of the batch: from the cache when precomputed, else a forward."""
        if self.reference is None:
            return None
        if self.ref_cache:
            return torch.cat([self.ref_cache[ex.source_index] for ex in examples]).to(self.world.device)
        return self.reference(batch).logp_sum

    @torch.no_grad()
    def precompute_reference(self, examples):
        """Reference log-probs of every example, once, cached on disk keyed by model and data."""
        path = os.path.join(self.cfg.ref.cache_dir, f"ref-{self._cache_key(examples)}.pt")
        if os.path.exists(path):
            self.ref_cache = torch.load(path)
            return
        bs = max(1, self.cfg.data.batch_size // self.cfg.optim.grad_accum_steps)
        cache = {}
        for i in range(0, len(examples), bs):
            chunk = examples[i : i + bs]
            sums = self.reference(pack(chunk, self.cfg).to(self.world.device)).logp_sum.cpu()
            k = len(chunk[0].response_ids)
            cache.update({ex.source_index: sums[j * k : (j + 1) * k] for j, ex in enumerate(chunk)})
        self.ref_cache = cache
        if self.world.is_main:
            os.makedirs(self.cfg.ref.cache_dir, exist_ok=True)
            torch.save(cache, path)

    def _cache_key(self, examples) -> str:
        h = hashlib.sha256(json.dumps([self.cfg.ref.name or self.cfg.model.name, self.cfg.seed,
                                       asdict(self.cfg.data)], sort_keys=True, default=str).encode())
        for ex in examples:
            h.update(json.dumps([ex.source_index, list(ex.prompt_ids), [list(r) for r in ex.response_ids]]).encode())
        return h.hexdigest()[:16]

    # -- steps -----------------------------------------------------------------------------------

    def objective(self, batch: PackedBatch, ref_logps, nll_scale):
        """Policy scores of a packed batch and the objective on them: (LossOutput, inputs, scores)."""
        scores = self.policy(batch)
        inputs = loss_inputs(scores, ref_logps, batch, nll_scale)
        return preference_loss(self.cfg.loss.losses(), inputs, **self.hparams), inputs, scores

    def forward_backward_step(self, examples, global_examples: int, nll_scale) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch: score, objective, backward of sum(losses) / global_examples."""
        batch = pack(examples, self.cfg).to(self.world.device)
        out, inputs, scores = self.objective(batch, self.reference_logps(examples, batch), nll_scale)
        loss = out.losses.sum() / global_examples
        loss.backward()
        return loss.detach(), metric_sums(out, inputs, scores, batch)

    def train_step(self) -> dict:
        cfg = self.cfg
        examples = global_batch(self.train_examples, self.state.step, cfg.data.batch_size, cfg.seed)
        nll_scale = _nll_scale(examples)
        loss_sum, sums = 0.0, 0.0
        for micro in micro_batches(examples, cfg.optim.grad_accum_steps, self.world):
            loss, s = self.forward_backward_step(micro, len(examples), nll_scale)
            loss_sum, sums = loss_sum + loss, sums + s
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        metrics = finish_metrics(sums, loss_sum)
        metrics |= {"grad_norm": float(_full(grad_norm)), "lr": self.scheduler.get_last_lr()[0]}
        self.state.step += 1
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out TRL metrics (accuracy, margins, ...) over `eval_examples`, split across ranks."""
        bs = max(1, self.cfg.data.batch_size // self.cfg.optim.grad_accum_steps)
        sums, loss_sum = 0.0, 0.0
        mine = self.eval_examples[self.world.rank :: self.world.size]
        for i in range(0, len(mine), bs):
            chunk = mine[i : i + bs]
            batch = pack(chunk, self.cfg).to(self.world.device)
            # never the training cache: eval examples are indexed in their own split
            ref = None if self.reference is None else self.reference(batch).logp_sum
            out, inputs, scores = self.objective(batch, ref, _nll_scale(chunk))
            loss_sum = loss_sum + out.losses.sum() / len(self.eval_examples)
            sums = sums + metric_sums(out, inputs, scores, batch)
        return {f"eval/{k}": v for k, v in finish_metrics(sums, torch.as_tensor(loss_sum)).items()}

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint(self, tag: str | None = None):
        """Model, optimizer, scheduler, step, history and RNG with torch.distributed.checkpoint."""
        model_sd, optim_sd = get_state_dict(self.policy, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(),
                 "train": self.state.state_dict()}
        path = os.path.join(self.cfg.checkpoint.dir, tag or f"step-{self.state.step:07d}")
        dcp.save(state, checkpoint_id=path)
        if self.world.is_main:
            with open(os.path.join(self.cfg.checkpoint.dir, "latest"), "w") as f:
                f.write(os.path.basename(path))
        return path

    def resume(self, path: str):
        model_sd, optim_sd = get_state_dict(self.policy, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(),
                 "train": self.state.state_dict()}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.policy, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state.load_state_dict(state["train"])

    def export(self, out_dir: str, tokenizer):
        """A transformers checkpoint (safetensors + tokenizer) loadable by `from_pretrained`."""
        full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.world.is_main:
            model = self.policy.model
            sd = {k.removeprefix("model."): v for k, v in full.items()}
            model.config.use_cache = True
            model.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)


def _nll_scale(examples) -> torch.Tensor:
    """Global examples / chosen tokens of the whole step (NLL terms normalize by global counts)."""
    chosen_tokens = sum(len(ex.response_ids[0]) for ex in examples)
    return torch.tensor(len(examples) / max(chosen_tokens, 1))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def frozen_copy(model):
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


# ----------------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------------


def load_model(cfg, device: torch.device):
    """A transformers causal LM: random init from the config (seeded) or pretrained weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, cfg.model.dtype)
    try:
        if cfg.model.random_init():
            config = AutoConfig.from_pretrained(cfg.model.name, revision=cfg.model.revision,
                                                trust_remote_code=cfg.model.trust_remote_code)
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.model.name, revision=cfg.model.revision, dtype=dtype,
                                                         trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model.name={cfg.model.name!r}: cannot load a causal LM from it ({e})") from e
    model.config.use_cache = False
    return model.to(device)


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


def total_steps(cfg, num_examples: int) -> int:
    if cfg.optim.num_steps is not None:
        return cfg.optim.num_steps
    return max(1, int(cfg.optim.num_epochs * (num_examples // cfg.data.batch_size)))


def build(cfg, world: parallel.World):
    """Tokenizer, data, policy, reference, optimizer and schedule; returns (Trainer, tokenizer, report)."""
    from transformers import AutoTokenizer

    from fastpo.data import load_preference_dataset

    source = cfg.model.tokenizer or cfg.model.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.model.revision)
    except (OSError, ValueError) as e:
        flag = "--model.tokenizer" if cfg.model.tokenizer else "--model.name"
        raise ValueError(f"{flag}={source!r}: cannot load a tokenizer from it ({e})") from e
    if cfg.data.pad_token_id is None:
        cfg.data.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train, held_out, report = load_preference_dataset(cfg.data, tokenizer)
    model = load_model(cfg, world.device)
    reference = None
    if not cfg.loss.reference_free:
        if cfg.ref.name is None:
            reference = frozen_copy(model)
        else:
            ref_cfg = copy.deepcopy(cfg)
            ref_cfg.model.name, ref_cfg.model.init = cfg.ref.name, "pretrained"
            reference = frozen_copy(load_model(ref_cfg, world.device))
        reference = parallelize(Scorer(reference, backend=cfg.model.attn_backend, impl=cfg.model.head_impl,
                                       extras=False), cfg, world, train=False)
    policy = parallelize(Scorer(model, backend=cfg.model.attn_backend, impl=cfg.model.head_impl), cfg, world,
                         train=True)
    o = cfg.optim
    optimizer = torch.optim.AdamW(policy.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
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


# ----------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------


def resolve_resume(cfg) -> str | None:
    """--checkpoint.resume: a checkpoint path, or "latest" (the newest under --checkpoint.dir)."""
    if cfg.checkpoint.resume != "latest":
        return cfg.checkpoint.resume
    marker = os.path.join(cfg.checkpoint.dir, "latest")
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return os.path.join(cfg.checkpoint.dir, f.read().strip())


def run(trainer: Trainer, log) -> tuple[dict, dict]:
    """Train to `trainer.num_steps`; returns held-out metrics (before, after)."""
    cfg = trainer.cfg
    before = trainer.evaluate()
    log.log(trainer.state.step, before)
    while trainer.state.step < trainer.num_steps:
        metrics = trainer.train_step()
        step = trainer.state.step
        trainer.state.history.append({"step": step, **metrics})
        log.log(step, metrics)
        if not math.isfinite(metrics["loss"]):
            path = trainer.checkpoint(f"nan-step-{step:07d}")
            raise FloatingPointError(f"loss is {metrics['loss']} at step {step}; state saved to {path}")
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
            trainer.checkpoint()
        if cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0 and step < trainer.num_steps:
            log.log(step, trainer.evaluate())
    after = trainer.evaluate()
    log.log(trainer.state.step, after)
    return before, after
