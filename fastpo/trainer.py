"""The training loop as named steps: build, reference pass, forward_backward_step, train_step, evaluate,
checkpoint, export.

One step consumes one global batch of `data.batch_size` examples, split into `optim.grad_accum_steps`
micro-batches and, within each, across data-parallel ranks (rank r takes examples r, r + W, ...; a rank
whose share is empty scores one masked copy, so every rank runs the same forwards). Each rank packs its
share with prefix sharing and scores it through `Scorer` (decoder body + fused head in one module, so
FSDP gathers the LM head inside the forward). The loss of a step is the mean over the global batch's
examples of the per-example objective: every micro-batch contributes `sum(losses) / global_examples`,
FSDP's division by the world size is off, so gradients are those of one process on the whole batch.
Evaluation walks the eval set in the same global micro-batches. Metrics are TRL's (`rewards/chosen`,
`rewards/accuracies`, ... for pairs; KTO's for unpaired data), summed on device and reduced once per step.

Per-response sums come from the per-token log-probs through `fastpo.losses.stats.reduce_tokens`: S with
LD-DPO's positional weights when `--loss.ld_alpha` is set (policy and reference alike; NLL terms keep the
plain sums), and the WPO log-weights `mean_t (logp_t - log sum_v p_v^2)`. Unpaired objectives get the
labels and, for KTO, the reference point z0 = max(0, mean (S - S_ref)) over mismatched pairs: prompt i
with the completion of example i - 1 of the same global micro-batch (cyclically; TRL's rotation by one),
scored without gradient by policy and reference and summed over ranks on device.
"""

from __future__ import annotations

import copy
import dataclasses
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
from fastpo.batch_stats import (
    PAIRED_METRICS,
    UNPAIRED_METRICS,
    add_sums,
    finish_metrics,
    loss_inputs,
    response_stats,
)
from fastpo.losses import preference_loss
from fastpo.packing import PackedBatch, pack_examples

logger = logging.getLogger(__name__)


class Scorer(torch.nn.Module):
    """Decoder body + fused LM head: `forward(batch) -> fastpo.attention.ResponseScores`."""

    def __init__(self, model, *, backend="auto", impl="auto", extras=True):
        super().__init__()
        self.model = model
        self.backend, self.impl, self.extras = backend, impl, extras
        enable_prefix_sharing(model)

    def forward(self, batch: PackedBatch, extras: bool | None = None):
        """`extras` overrides the per-token extras (entropy, log sum p^2, mean logit) for this call."""
        extras = self.extras if extras is None else extras
        return score(self.model, batch, backend=self.backend, impl=self.impl, extras=extras)


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


def micro_batches(batch: list, accum: int) -> list[list]:
    """The `accum` global micro-batches of a global batch (each is then sharded across ranks)."""
    size = len(batch) // accum
    return [batch[i * size : (i + 1) * size] for i in range(accum)]


def eval_chunks(examples: list, size: int) -> list[list]:
    """Global eval micro-batches of `size` examples (the last one shorter): the same for every world
    size, so every rank runs one forward per chunk and the metrics do not depend on the world size."""
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def shard(items: list, world: parallel.World) -> tuple[list, list[float]]:
    """Rank r's items r, r + W, ... of a global micro-batch and their mask (1.0 each). An empty share
    becomes one copy of items[0] with mask 0.0: under FSDP every rank must run every forward (each
    all-gathers the weights), and the copy's loss and metrics are multiplied by its mask."""
    mine = items[world.rank :: world.size]
    return (mine, [1.0] * len(mine)) if mine else (items[:1], [0.0])


def mismatched_pairs(examples: list, data_cfg) -> list:
    """KTO's KL pairs: prompt i with the completion of example i - 1 (cyclically; TRL rotates the
    completions of a batch by one), truncated by the --data rules like any example."""
    from fastpo.data import truncate

    pairs = []
    for i, ex in enumerate(examples):
        prompt_ids, response_ids, _ = truncate(ex.prompt_ids, examples[i - 1].response_ids, data_cfg)
        pairs.append(dataclasses.replace(ex, prompt_ids=prompt_ids, response_ids=response_ids))
    return pairs


def pack(examples, cfg) -> PackedBatch:
    return pack_examples(
        [(ex.prompt_ids, ex.response_ids) for ex in examples],
        max_tokens=cfg.data.max_tokens,
        share_prompt=cfg.data.share_prefix,
        prompt_truncation=cfg.data.truncation_mode,
        min_responses=1 if cfg.loss.unpaired else 2,
        pad_token_id=cfg.data.pad_token_id,
    )


def example_labels(examples, device) -> torch.Tensor | None:
    """[G] bool desirability labels of unpaired examples; None for paired or ranked data."""
    if examples[0].label is None:
        return None
    return torch.tensor([bool(ex.label) for ex in examples], device=device)


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
        self.metric_set = UNPAIRED_METRICS if cfg.loss.unpaired else PAIRED_METRICS
        self.state = TrainState()
        self.ref_cache: dict[int, torch.Tensor] = {}

    @property
    def micro_size(self) -> int:
        """Examples of one global micro-batch (summed over ranks)."""
        return max(1, self.cfg.data.batch_size // self.cfg.optim.grad_accum_steps)

    # -- reference -------------------------------------------------------------------------------

    @torch.no_grad()
    def reference_logps(self, examples, batch: PackedBatch, *, cached: bool = False) -> torch.Tensor | None:
        """[R] reference log-prob sums (LD-weighted like the policy's): from the cache when `cached` and
        precomputed, else a forward."""
        if self.reference is None:
            return None
        if cached and self.ref_cache:
            return torch.cat([self.ref_cache[ex.source_index] for ex in examples]).to(self.world.device)
        return response_stats(self.reference(batch), batch, self.cfg.loss.ld_alpha).logps

    @torch.no_grad()
    def precompute_reference(self, examples):
        """Reference log-probs of every example, once, cached on disk keyed by model, data and weights."""
        path = os.path.join(self.cfg.ref.cache_dir, f"ref-{self._cache_key(examples)}.pt")
        if os.path.exists(path):
            self.ref_cache = torch.load(path)
            return
        cache = {}
        for i in range(0, len(examples), self.micro_size):
            chunk = examples[i : i + self.micro_size]
            batch = pack(chunk, self.cfg).to(self.world.device)
            sums = self.reference_logps(chunk, batch).cpu()
            k = len(chunk[0].response_ids)
            cache.update({ex.source_index: sums[j * k : (j + 1) * k] for j, ex in enumerate(chunk)})
        self.ref_cache = cache
        if self.world.is_main:
            os.makedirs(self.cfg.ref.cache_dir, exist_ok=True)
            torch.save(cache, path)

    def _cache_key(self, examples) -> str:
        h = hashlib.sha256(json.dumps([self.cfg.ref.name or self.cfg.model.name, self.cfg.seed,
                                       asdict(self.cfg.data), self.cfg.loss.ld_alpha],
                                      sort_keys=True, default=str).encode())
        for ex in examples:
            h.update(json.dumps([ex.source_index, list(ex.prompt_ids), [list(r) for r in ex.response_ids]]).encode())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def kl_terms(self, micro: list) -> torch.Tensor:
        """[2]: this rank's sum of sg(S - S_ref) over its share of the micro-batch's mismatched pairs
        (`mismatched_pairs`), and how many real pairs that share holds."""
        pairs, mask = shard(mismatched_pairs(micro, self.cfg.data), self.world)
        batch = pack(pairs, self.cfg).to(self.world.device)
        mask = torch.tensor(mask, device=self.world.device)
        rho = self.policy(batch, extras=False).logp_sum - self.reference(batch).logp_sum
        return torch.stack([(rho * mask).sum(), mask.sum()])

    def reference_point(self, micro: list) -> torch.Tensor:
        """KTO's z0 of a global micro-batch: max(0, mean over its mismatched pairs of S - S_ref), the
        sums all-reduced over ranks on device (so it is the one-process value); detached."""
        terms = parallel.all_reduce_sum(self.kl_terms(micro))
        return (terms[0] / terms[1].clamp(min=1.0)).clamp(min=0.0)

    # -- steps -----------------------------------------------------------------------------------

    def objective(self, micro: list, nll_scale, *, cached_ref: bool = False):
        """This rank's share of a global micro-batch through the policy and the objective:
        (LossOutput, PreferenceInputs, SequenceStats, batch, mask [G])."""
        examples, mask = shard(micro, self.world)
        device = self.world.device
        batch = pack(examples, self.cfg).to(device)
        kl = self.reference_point(micro) if self.cfg.loss.uses_reference_point else None
        ref_logps = self.reference_logps(examples, batch, cached=cached_ref)
        seq = response_stats(self.policy(batch), batch, self.cfg.loss.ld_alpha)
        inputs = loss_inputs(seq, ref_logps, batch, nll_scale, labels=example_labels(examples, device), kl=kl)
        out = preference_loss(self.cfg.loss.losses(), inputs, **self.hparams)
        return out, inputs, seq, batch, torch.tensor(mask, device=device)

    def micro_step(self, micro: list, nll_scale, *, cached_ref: bool = False) -> tuple[torch.Tensor, dict]:
        """(sum of this rank's per-example losses, metric sums) of a global micro-batch."""
        out, inputs, seq, batch, mask = self.objective(micro, nll_scale, cached_ref=cached_ref)
        return (out.losses * mask).sum(), self.metric_set.sums(out, inputs, seq, batch, mask)

    def forward_backward_step(self, micro: list, global_examples: int, nll_scale) -> tuple[torch.Tensor, dict]:
        """One micro-batch: score, objective, backward of sum(losses) / global_examples."""
        loss_sum, sums = self.micro_step(micro, nll_scale, cached_ref=True)
        loss = loss_sum / global_examples
        loss.backward()
        return loss.detach(), sums

    def train_step(self) -> dict:
        cfg = self.cfg
        examples = global_batch(self.train_examples, self.state.step, cfg.data.batch_size, cfg.seed)
        nll_scale = _nll_scale(examples)
        loss_sum, sums = 0.0, None
        for micro in micro_batches(examples, cfg.optim.grad_accum_steps):
            loss, s = self.forward_backward_step(micro, len(examples), nll_scale)
            loss_sum, sums = loss_sum + loss, add_sums(sums, s)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        metrics = finish_metrics(sums, loss_sum, self.metric_set)
        metrics |= {"grad_norm": float(_full(grad_norm)), "lr": self.scheduler.get_last_lr()[0]}
        self.state.step += 1
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out metrics over `eval_examples` in global micro-batches split across ranks, as in
        training (every rank runs one forward per chunk); {} without eval examples."""
        if not self.eval_examples:
            return {}
        loss_sum, sums = 0.0, None
        for chunk in eval_chunks(self.eval_examples, self.micro_size):
            # never the training cache: eval examples are indexed in their own split
            losses, s = self.micro_step(chunk, _nll_scale(chunk))
            loss_sum, sums = loss_sum + losses / len(self.eval_examples), add_sums(sums, s)
        return {f"eval/{k}": v for k, v in finish_metrics(sums, loss_sum, self.metric_set).items()}

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

    from fastpo.config import check_data_format
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
    check_data_format(cfg, report.format)
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
