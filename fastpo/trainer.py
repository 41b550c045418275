"""The training loop as named steps: build, reference pass, forward_backward_step, train_step, evaluate,
checkpoint, export.

One step consumes one global batch of `data.batch_size` examples, split into `optim.grad_accum_steps`
micro-batches and, within each, across data-parallel ranks (rank r takes examples r, r + W, ...; a rank
whose share is empty scores one masked copy, so every rank runs the same forwards). Each rank packs its
share with prefix sharing and runs it through `Scorer`: decoder body and `fastpo.losses`'
`fused_linear_preference_loss` in one module, so FSDP gathers the LM head inside the forward, and the
trainer never re-derives a statistic, an objective or a metric. The head path follows the objective
(`--model.head_path`): pair-fused when every objective is group-local and a gradient is needed, generic
otherwise (AOT's batch sort; evaluation and reference scoring, which need no gradient).

The loss of a step is the mean over the global batch's examples of the per-example objective: every
micro-batch contributes `sum(losses) / global_examples` (the `normalizer`), and NLL terms use the step's
global chosen-token count (`nll_scale`); FSDP's division by the world size is off, so gradients are those
of one process on the whole batch. Metrics are `fastpo.losses.metrics`' sums, added over micro-batches,
all-reduced once per step and turned into TRL-named means, plus TRL's `learning_rate`, `epoch`,
`num_tokens`, `grad_norm` and the step's `time/step_s`, `throughput/tokens_per_s` and `memory/peak_gib`.

Unpaired objectives get the labels and, for KTO, the reference point z0 = max(0, mean (S - S_ref)) over
mismatched pairs: prompt i with the completion of example i - 1 of the same global micro-batch (cyclically;
TRL's rotation by one), scored without gradient by policy and reference and summed over ranks on device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from fastpo import checkpoint as ckpt
from fastpo import parallel
from fastpo.attention import completion_hidden, enable_prefix_sharing
from fastpo.config import to_dict
from fastpo.lora import adapters_disabled
from fastpo.losses import add_sums, fused_linear_preference_loss, metric_means, response_logps
from fastpo.losses.objectives import reference_point_from_sums
from fastpo.models import lm_head_spec
from fastpo.packing import PackedBatch, pack_examples

logger = logging.getLogger(__name__)


class Scorer(torch.nn.Module):
    """Decoder body + fused LM head. `forward(batch)`: per-response log-prob sums `[R]` (reference scoring,
    KTO's mismatched pairs; LD-DPO-weighted with `ld_alpha`); `forward(batch, objective)`: the preference loss
    of the batch (`fastpo.losses.FusedLossOutput`), where `objective` holds the keyword arguments of
    `fused_linear_preference_loss` (loss type, hyperparameters, reference sums, labels, masks, normalizers)."""

    def __init__(self, model, *, backend="auto", impl="auto", path="auto"):
        super().__init__()
        self.model = model
        self.backend, self.impl, self.path = backend, impl, path
        enable_prefix_sharing(model)

    def forward(self, batch: PackedBatch, objective: dict | None = None, *, ld_alpha: float | None = None,
                adapters: bool = True):
        """`adapters=False` runs a LoRA policy with its adapters disabled: the reference (`fastpo.build`)."""
        if not adapters:
            with adapters_disabled(self.model):
                return self.forward(batch, objective, ld_alpha=ld_alpha)
        hidden_MH = completion_hidden(self.model, batch, backend=self.backend)
        head = lm_head_spec(self.model)
        common = dict(bias=head.bias, ignore_index=batch.ignore_index, temperature=head.temperature,
                      softcap=head.softcap, impl=self.impl)
        if objective is None:
            return response_logps(hidden_MH, head.weight, batch.targets, batch.responses, ld_alpha=ld_alpha, **common)
        return fused_linear_preference_loss(hidden_MH, head.weight, batch.targets, layout=batch.responses,
                                            path=self.path, **common, **objective)


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler that an exact resume needs."""

    step: int = 0
    history: list = field(default_factory=list)
    num_tokens: int = 0
    """TRL's `num_tokens`: prompt + completion tokens of the training examples so far, each [prompt + response]
    counted as its own sequence (what a padded trainer feeds its model), over all ranks."""
    skipped_steps: int = 0
    """Steps whose update was skipped (non-finite loss or gradient norm)."""
    consecutive_skips: int = 0

    def state_dict(self):
        return {"step": self.step, "history": json.dumps(self.history), "num_tokens": self.num_tokens,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "rng": _rng_state()}

    def load_state_dict(self, sd):
        self.step = int(sd["step"])
        self.history = json.loads(sd["history"])
        self.num_tokens = int(sd["num_tokens"])
        self.skipped_steps, self.consecutive_skips = int(sd["skipped_steps"]), int(sd["consecutive_skips"])
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
    """Pack a share of examples. The data layer already fit every example to `--data.max_tokens` (and counted
    what it cut), so the packer must not cut anything: a truncation here is a bug, not a silent trim."""
    batch = pack_examples(
        [(ex.prompt_ids, ex.response_ids) for ex in examples],
        max_tokens=cfg.data.max_tokens,
        share_prompt=cfg.data.share_prefix,
        prompt_truncation=cfg.data.truncation_mode,
        min_responses=1 if cfg.loss.unpaired else 2,
        pad_token_id=cfg.data.pad_token_id,
    )
    if batch.truncation.num_truncated_examples:
        raise RuntimeError(f"packing cut {batch.truncation.num_truncated_examples} example(s) that the data layer "
                           f"should have fit to --data.max_tokens={cfg.data.max_tokens}: {batch.truncation}")
    return batch


def sequence_tokens(examples) -> int:
    """Tokens of the examples as separate [prompt + response] sequences (TRL's `num_tokens` count)."""
    return sum(len(ex.prompt_ids) * len(ex.response_ids) + sum(map(len, ex.response_ids)) for ex in examples)


# ----------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------


class Trainer:
    """Owns the policy, the reference, the optimizer and the data; `train()` runs to the end."""

    def __init__(self, cfg, world, policy: Scorer, reference, optimizer, scheduler, data, hparams,
                 num_steps: int):
        self.cfg, self.world, self.num_steps = cfg, world, num_steps
        self.policy, self.reference = policy, reference
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_examples, self.eval_examples = data
        self.hparams = hparams
        self.state = TrainState()
        self.ref_cache: dict[tuple, torch.Tensor] = {}
        self.stop = None
        """`fastpo.stopping.GracefulStop` of the run: its flag rides on the step's metric reduction."""
        self.stop_requested = False

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
            return torch.cat([self.ref_cache[example_key(ex)] for ex in examples]).to(self.world.device)
        return self.reference(batch, ld_alpha=self.cfg.loss.ld_alpha)

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
            batch = pack(chunk, self.cfg)
            sums = self.reference_logps(chunk, batch.to(self.world.device)).cpu()
            offsets = batch.example_offsets.tolist()
            cache.update({example_key(ex): sums[offsets[j] : offsets[j + 1]] for j, ex in enumerate(chunk)})
        self.ref_cache = cache
        if self.world.is_main:
            os.makedirs(self.cfg.ref.cache_dir, exist_ok=True)
            torch.save(cache, path)

    def _cache_key(self, examples) -> str:
        h = hashlib.sha256(json.dumps([self.cfg.ref.name or self.cfg.model.name, self.cfg.seed,
                                       asdict(self.cfg.data), self.cfg.loss.ld_alpha],
                                      sort_keys=True, default=str).encode())
        for ex in examples:
            h.update(json.dumps([example_key(ex), list(ex.prompt_ids), [list(r) for r in ex.response_ids]]).encode())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def kl_terms(self, micro: list) -> torch.Tensor:
        """[2]: this rank's sum of sg(S - S_ref) over its share of the micro-batch's mismatched pairs
        (`mismatched_pairs`), and how many real pairs that share holds."""
        pairs, mask = shard(mismatched_pairs(micro, self.cfg.data), self.world)
        batch = pack(pairs, self.cfg).to(self.world.device)
        mask = torch.tensor(mask, device=self.world.device)
        rho = self.policy(batch) - self.reference(batch)
        return torch.stack([(rho * mask).sum(), mask.sum()])

    def reference_point(self, micro: list) -> torch.Tensor:
        """KTO's z0 of a global micro-batch: max(0, mean over its mismatched pairs of S - S_ref), the
        sums all-reduced over ranks on device (so it is the one-process value); detached."""
        terms = parallel.all_reduce_sum(self.kl_terms(micro))
        return reference_point_from_sums(terms[0], terms[1])

    # -- steps -----------------------------------------------------------------------------------

    def micro_step(self, micro: list, nll_scale, normalizer: float, *, cached_ref: bool = False):
        """This rank's share of a global micro-batch through the policy and the objective: (FusedLossOutput,
        the share's token counts: decoder tokens of the policy forward and TRL's sequence tokens)."""
        examples, mask_list = shard(micro, self.world)
        device = self.world.device
        batch = pack(examples, self.cfg).to(device)
        mask = torch.tensor(mask_list, device=device)
        objective = dict(loss_type=self.cfg.loss.losses(), example_mask=mask, nll_scale=nll_scale.to(device),
                         normalizer=normalizer, ld_alpha=self.cfg.loss.ld_alpha, **self.hparams)
        objective["ref_logps"] = self.reference_logps(examples, batch, cached=cached_ref)
        if self.cfg.loss.unpaired:
            objective["labels"] = torch.tensor([bool(ex.label) for ex in examples], device=device)
        if self.cfg.loss.uses_reference_point:
            objective["kl"] = self.reference_point(micro)
        real = max(mask_list)  # a masked copy (an empty share) counts no tokens
        tokens = {"tokens/decoder": batch.num_tokens * real, "tokens/sequences": sequence_tokens(examples) * real}
        return self.policy(batch, objective), tokens

    def forward_backward_step(self, micro: list, global_examples: int, nll_scale) -> dict:
        """One micro-batch: score, objective, backward of sum(losses) / global_examples; returns its sums."""
        out, tokens = self.micro_step(micro, nll_scale, global_examples, cached_ref=True)
        out.loss.backward()
        return out.metric_sums | {k: torch.tensor(float(v)) for k, v in tokens.items()}

    def train_step(self) -> dict:
        """One optimizer step over the next global batch. A non-finite loss or gradient norm skips the update
        (the batch is consumed and counted in `skipped_steps`; `check_divergence` stops a run that keeps
        skipping). One all-reduce and one host read per step."""
        cfg = self.cfg
        start = time.perf_counter()
        parallel.reset_peak_memory(self.world.device)
        examples = global_batch(self.train_examples, self.state.step, cfg.data.batch_size, cfg.seed)
        nll_scale = _nll_scale(examples)
        sums = {"control/stop": torch.tensor(self.stop.flag() if self.stop is not None else 0.0)}
        for micro in micro_batches(examples, cfg.optim.grad_accum_steps):
            sums = add_sums(sums, self.forward_backward_step(micro, len(examples), nll_scale))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optim.max_grad_norm or math.inf)
        totals = reduce_sums(sums, self.world.device)
        grad_norm = float(_full(grad_norm))
        learning_rate = self.scheduler.get_last_lr()[0]
        metrics = step_metrics(totals)
        skipped = self._apply_update(metrics["loss"], grad_norm)
        self.scheduler.step()
        self.state.step += 1
        self.state.num_tokens += int(totals["tokens/sequences"])
        self.stop_requested = totals["control/stop"] > 0
        step_s = time.perf_counter() - start
        return metrics | {
            "grad_norm": grad_norm, "learning_rate": learning_rate,
            "epoch": self.state.step * cfg.data.batch_size / len(self.train_examples),
            "num_tokens": self.state.num_tokens, "skipped": float(skipped),
            "skipped_steps": self.state.skipped_steps, "time/step_s": step_s,
            "throughput/tokens_per_s": totals["tokens/decoder"] / step_s,
            "memory/peak_gib": parallel.peak_memory_bytes(self.world.device) / 2**30,
        }

    def _apply_update(self, loss: float, grad_norm: float) -> bool:
        """Step the optimizer unless the loss or the gradient norm is non-finite; returns whether it skipped.
        The same decision on every rank: both values are already reduced over ranks."""
        step = self.state.step + 1
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.state.consecutive_skips = 0
            _warn_suspicious_gradient(step, grad_norm, self.cfg.optim.max_grad_norm)
        else:
            self.state.skipped_steps += 1
            self.state.consecutive_skips += 1
            logger.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row, %d in all)", step, loss,
                           grad_norm, self.state.consecutive_skips, self.state.skipped_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return not finite

    def check_divergence(self) -> None:
        """Stop the run after more than `--optim.max_skipped_steps` consecutive skipped steps: dump the state
        beside the checkpoints (never a resume point) and raise `DivergenceError`."""
        o = self.cfg.optim
        if self.state.consecutive_skips <= o.max_skipped_steps:
            return
        path = self.checkpoint(diagnostic=True)
        raise DivergenceError(
            f"stopped at step {self.state.step}: {self.state.consecutive_skips} consecutive steps with a non-finite "
            f"loss or gradient norm (--optim.max_skipped_steps={o.max_skipped_steps}); no update was applied from "
            f"them, so the checkpoints under {self.cfg.checkpoint.dir} are finite resume points; state dumped to "
            f"{path} for inspection (not a resume point). Lower --optim.lr or check the data")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out metrics over `eval_examples` in global micro-batches split across ranks, as in
        training (every rank runs one forward per chunk); {} without eval examples."""
        if not self.eval_examples:
            return {}
        sums = None
        for chunk in eval_chunks(self.eval_examples, self.micro_size):
            # never the training cache: eval examples are indexed in their own split
            out, _ = self.micro_step(chunk, _nll_scale(chunk), len(self.eval_examples))
            sums = add_sums(sums, out.metric_sums)
        return {f"eval/{k}": v for k, v in step_metrics(reduce_sums(sums, self.world.device)).items()}

    # -- checkpoints -----------------------------------------------------------------------------

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.policy, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(),
                "train": self.state.state_dict()}

    def checkpoint(self, *, diagnostic: bool = False) -> str:
        """Save model, optimizer, scheduler, step, history and RNG (`fastpo.checkpoint.save`: verified manifest,
        then `latest`; old checkpoints pruned to `--checkpoint.keep`). `diagnostic`: a dump beside them that is
        never a resume point."""
        c, step, config = self.cfg.checkpoint, self.state.step, to_dict(self.cfg)
        if diagnostic:
            return ckpt.save_diagnostic(self._state(), c.dir, step=step, config=config, is_main=self.world.is_main,
                                        reason="divergence")
        path = ckpt.save(self._state(), c.dir, ckpt.step_tag(step), step=step, config=config,
                         is_main=self.world.is_main)
        if self.world.is_main:
            ckpt.prune(c.dir, c.keep)
        return path

    def resume(self, path: str) -> list[str]:
        """Load checkpoint `path` (already verified by `resolve_resume`); refuses a changed run unless
        `--checkpoint.allow_changes`, and returns the changes then allowed."""
        changes = ckpt.check_resume_config(ckpt.read_manifest(path)["config"], to_dict(self.cfg),
                                           self.cfg.checkpoint.allow_changes, path=path)
        state = self._state()
        ckpt.load(state, path, verified=True)
        set_state_dict(self.policy, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state.load_state_dict(state["train"])
        # the optimizer's saved learning rate is the old schedule's; with an allowed change of schedule (more
        # steps, another peak) the next update must follow this run's schedule at the resumed step
        sched = self.scheduler  # a LambdaLR (`fastpo.build.lr_schedule`)
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return changes

    def export(self, out_dir: str, tokenizer, card: str = "") -> str:
        """A transformers checkpoint (safetensors + tokenizer + a model card) loadable by `from_pretrained`;
        with LoRA the PEFT adapter (`PeftModel.from_pretrained(base, out_dir)`), plus the merged model in
        `<out_dir>/merged` with `--lora.merge_on_export`. Returns `out_dir`."""
        full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.world.is_main:
            from fastpo.lora import save_model

            sd = {k.removeprefix("model."): v for k, v in full.items()}
            save_model(self.policy.model, sd, out_dir, merge=self.cfg.lora.merge_on_export)
            tokenizer.save_pretrained(out_dir)
            if card:
                with open(os.path.join(out_dir, "README.md"), "w") as f:
                    f.write(card)
        return out_dir


class DivergenceError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


def _warn_suspicious_gradient(step: int, grad_norm: float, max_grad_norm: float) -> None:
    """Finite updates that are still a sign of trouble: no gradient at all, or one far past the clip."""
    if grad_norm == 0.0:
        logger.warning("step %d: gradient norm is exactly 0: nothing was learned from this batch (all examples "
                       "masked, or no trainable parameter reached by the loss)", step)
    elif max_grad_norm and grad_norm > 1e3 * max_grad_norm:
        logger.warning("step %d: gradient norm %.3g is %.0fx --optim.max_grad_norm: the update is clipped, but the run "
                       "is likely diverging (learning rate too high?)", step, grad_norm, grad_norm / max_grad_norm)


THROUGHPUT_SUMS = ("tokens/decoder", "tokens/sequences", "control/stop")


def reduce_sums(sums: dict, device) -> dict[str, float]:
    """Sum a step's per-rank sums over ranks: one all-reduce and one host read per step."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(device).reshape(()) for v in sums.values()])
    return dict(zip(sums, parallel.all_reduce_sum(values).tolist()))


def step_metrics(totals: dict) -> dict:
    """TRL-named means of a step's (or an evaluation's) reduced sums."""
    return metric_means({k: v for k, v in totals.items() if k not in THROUGHPUT_SUMS})


def example_key(ex) -> tuple:
    """A training example's key in the reference cache: its row, and its label (the two unpaired examples of a
    preference pair share their row)."""
    return ex.source_index, ex.label


def _nll_scale(examples) -> torch.Tensor:
    """Global examples / chosen tokens of the whole step (NLL terms normalize by global counts)."""
    chosen_tokens = sum(len(ex.response_ids[0]) for ex in examples)
    return torch.tensor(len(examples) / max(chosen_tokens, 1))


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------


def resolve_resume(cfg) -> str | None:
    """--checkpoint.resume: a checkpoint folder, or "latest" (the newest intact one under --checkpoint.dir,
    falling back past damaged ones with a warning); None when there is nothing to resume (said in one line)."""
    if cfg.checkpoint.resume is None:
        return None
    return ckpt.find_resume(cfg.checkpoint.dir, cfg.checkpoint.resume)


@dataclass
class RunResult:
    """Held-out metrics before and after training (`after` is {} when the run stopped on a signal), the wall
    time of the training steps, and whether the run stopped early on a signal."""

    before: dict
    after: dict
    train_runtime: float
    stopped: bool = False


def run(trainer: Trainer, log) -> RunResult:
    """Train to `trainer.num_steps`, checkpointing every `--checkpoint.interval` steps; on SIGTERM, SIGINT or
    SIGUSR1 finish the step, checkpoint and return early (`fastpo.stopping`)."""
    from fastpo.stopping import GracefulStop

    cfg = trainer.cfg
    fresh = trainer.state.step == 0
    before = trainer.evaluate()
    if fresh:  # a resumed run's lineage logged its evaluations already
        log.log(trainer.state.step, before)
    start = time.perf_counter()
    with GracefulStop(verbose=trainer.world.is_main) as stop:
        trainer.stop = stop
        while trainer.state.step < trainer.num_steps:
            metrics = trainer.train_step()
            step = trainer.state.step
            trainer.state.history.append({"step": step, **metrics})
            log.log(step, metrics)
            trainer.check_divergence()
            saved = trainer.checkpoint() if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 else None
            if trainer.stop_requested:
                path = saved or trainer.checkpoint()
                log.message(stop.resume_message(step, path))
                return RunResult(before, {}, time.perf_counter() - start, stopped=True)
            if cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0 and step < trainer.num_steps:
                log.log(step, trainer.evaluate())
    runtime = time.perf_counter() - start
    after = trainer.evaluate()
    log.log(trainer.state.step, after)
    return RunResult(before, after, runtime)
