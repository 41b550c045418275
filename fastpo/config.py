"""The trainer's configuration: one dataclass tree, `--section.field` flags, an optional config file.

    cfg = parse_args(argv)   # defaults < --config file (TOML, or YAML with pyyaml) < CLI flags
    validate(cfg)            # cross-field checks, run before anything is built

Every field carries a docstring (the string literal under it); `--help` prints it with the default.
Each section validates its own fields in `__post_init__` and raises `ValueError` naming the flag
(`--data.max_length`) and what was expected. The defaults are the embedded demo: a tiny random-init
decoder trained with DPO on the bundled preference data (`fastpo.data.demo_paths()`).

Flags: `--section.field VALUE`; booleans as `--x.y`, `--x.no-y` or `--x.y true|false`; lists
comma-separated or repeated (`--loss.loss_type sigmoid,sft` == `--loss.loss_type sigmoid --loss.loss_type sft`);
`none` for an optional value. Root fields are plain `--seed`, `--device`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

_DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
DEMO_MODEL = str(_DEMO_DIR)
DEMO_TRAIN = str(_DEMO_DIR / "train.jsonl")
DEMO_EVAL = str(_DEMO_DIR / "eval.jsonl")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_BACKENDS = ("auto", "flash_varlen", "flex", "sdpa", "torch_varlen", "varlen_emulated")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
DATA_FORMATS = ("auto", "preference", "chat", "hh", "ranked", "kto")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _check(ok: bool, flag: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"--{flag}: expected {expected}, got {got!r}")


def _positive(section: str, obj, *names: str, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        _check(value is not None and value > 0, f"{section}.{name}", "a number > 0", value)


def _choice(section: str, obj, name: str, choices) -> None:
    value = getattr(obj, name)
    _check(value in choices, f"{section}.{name}" if section else name, f"one of {list(choices)}", value)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The policy model and its tokenizer."""

    name: str = DEMO_MODEL
    """Hugging Face Hub id or local directory of the policy (default: the bundled tiny demo decoder)."""
    init: Literal["auto", "pretrained", "random"] = "auto"
    """Weights: "pretrained" loads them, "random" builds the model from its config with random init,
    "auto" loads them unless `name` is a local directory without weight files (the demo ships none)."""
    tokenizer: str | None = None
    """Tokenizer id or path; None: the same as --model.name."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of model and tokenizer; None: the default branch."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the master weights (the compute dtype under FSDP is --parallel.param_dtype)."""
    attn_backend: str = "auto"
    """Prefix-shared attention backend: auto, flash_varlen, flex, sdpa, torch_varlen, varlen_emulated."""
    head_impl: Literal["auto", "triton", "torch"] = "auto"
    """Fused LM-head log-prob implementation: triton (CUDA), torch (chunked, any device), or auto."""
    head_path: Literal["auto", "generic", "pair_fused"] = "auto"
    """LM-head path of the training loss: pair_fused (head gradients computed in the forward, chunk by chunk of
    whole examples: 6NHV) for objectives whose per-example gradient depends on that example only; generic
    (per-token log-probs, backward recomputes the logits: 8NHV) for any objective; auto picks pair_fused
    whenever the objectives allow it."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in backward to save activation memory."""
    compile: bool = False
    """torch.compile each decoder block."""
    liger_kernels: bool = False
    """Patch the model with Liger-Kernel's fused RMSNorm/RoPE/SwiGLU (CUDA only, needs liger-kernel)."""
    trust_remote_code: bool = False
    """Allow model code from the Hub (transformers' trust_remote_code)."""

    def __post_init__(self):
        _check(bool(self.name), "model.name", "a Hub id or a local path", self.name)
        _choice("model", self, "init", ("auto", "pretrained", "random"))
        _choice("model", self, "dtype", DTYPES)
        _choice("model", self, "attn_backend", ATTN_BACKENDS)
        _choice("model", self, "head_impl", ("auto", "triton", "torch"))
        _choice("model", self, "head_path", ("auto", "generic", "pair_fused"))

    def random_init(self) -> bool:
        """Whether the policy starts from random weights (resolves init="auto" on the local disk)."""
        if self.init != "auto":
            return self.init == "random"
        path = Path(self.name)
        return path.is_dir() and not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir())


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Preference data: source, format, truncation, packing and batching."""

    dataset: str = DEMO_TRAIN
    """Hub id, or a local .json/.jsonl/.parquet file (default: the bundled demo preference data)."""
    eval_dataset: str | None = None
    """Separate eval data (Hub id or file); None: the dataset's --data.eval_split if it has one, else
    a seeded --data.eval_fraction of the training rows (the bundled demo data has its own eval file)."""
    format: Literal["auto", "preference", "chat", "hh", "ranked", "kto"] = "auto"
    """Row format: preference (prompt/chosen/rejected strings), chat (message lists, rendered with the
    tokenizer's chat template), hh (full transcripts split at their common prefix), ranked (a prompt with
    K responses best first), kto (prompt/completion/label rows); auto: detected from the columns."""
    dataset_config: str | None = None
    """Hub dataset configuration name (the `name` argument of datasets.load_dataset)."""
    train_split: str = "train"
    """Split used for training."""
    eval_split: str = "test"
    """Split used for evaluation when the dataset has it."""
    eval_fraction: float = 0.05
    """Fraction of the training rows held out for evaluation when there is no eval split or file."""
    max_train_examples: int | None = None
    """Use at most this many training rows (the first ones); None: all."""
    max_eval_examples: int | None = 1000
    """Use at most this many eval rows; None: all."""
    max_length: int | None = 1024
    """Cap on prompt + longest response tokens; which side is cut follows --data.truncation_mode."""
    max_prompt_length: int | None = None
    """Cap on prompt tokens, applied first (the side kept follows --data.truncation_mode); None: no cap."""
    max_completion_length: int | None = None
    """Cap on the tokens of each response (its first tokens are kept, EOS included); None: no cap."""
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    """keep_start: keep the start of prompt + response (cut the prompt's end, then responses' ends);
    keep_end: keep the end (cut the prompt's start). As TRL's truncation_mode."""
    append_eos: Literal["auto", "always", "never"] = "auto"
    """EOS after each response. auto (TRL's rule): plain-text responses get it unless they end with it; chat
    template output stays as rendered (the template ends the turn, e.g. <|im_end|>\\n or <|eot_id|>). always: also
    template output that does not end with it (trailing whitespace aside). never: no EOS is appended."""
    max_tokens: int = 4096
    """Token budget of one packed row: prompt + the sum of its responses with --data.share_prefix (prompt +
    the longest without). Longer examples are cut by --data.truncation_mode when loaded, so packing never cuts."""
    share_prefix: bool = True
    """Pack [prompt, response_1 .. response_K] with the prompt computed once; false packs each
    [prompt + response] as its own sequence."""
    pad_token_id: int | None = None
    """Pad id of packed rows; None: the tokenizer's pad token, else its EOS, else 0."""
    batch_size: int = 32
    """Examples (prompt groups) per optimizer step, summed over ranks and accumulation steps."""
    num_workers: int = 0
    """Processes for tokenization (datasets.map num_proc); 0: in this process."""
    seed: int = 0
    """Seed of the train/eval split carved from the training rows (kept apart from --seed so the split
    does not change with the training seed)."""

    def __post_init__(self):
        _check(bool(self.dataset), "data.dataset", "a Hub id or a local file", self.dataset)
        _choice("data", self, "format", DATA_FORMATS)
        _choice("data", self, "truncation_mode", ("keep_start", "keep_end"))
        _choice("data", self, "append_eos", ("auto", "always", "never"))
        _check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "a fraction in [0, 1)", self.eval_fraction)
        _positive("data", self, "max_length", "max_prompt_length", "max_completion_length",
                  "max_train_examples", "max_eval_examples", allow_none=True)
        _positive("data", self, "max_tokens", "batch_size")
        for name in ("max_length", "max_tokens"):  # one prompt token and one response token
            value = getattr(self, name)
            _check(value is None or value >= 2, f"data.{name}", "at least 2 tokens", value)
        _check(self.num_workers >= 0, "data.num_workers", "an integer >= 0", self.num_workers)
        if self.max_length is not None and self.max_prompt_length is not None:
            _check(self.max_prompt_length < self.max_length, "data.max_prompt_length",
                   f"fewer than --data.max_length={self.max_length} tokens", self.max_prompt_length)


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """The objective: a `fastpo.losses.LOSSES` name and its hyperparameters (TRL's names).

    Hyperparameters left at None take the loss's own default; one set for a loss that does not use it
    is an error (see `hparams`).
    """

    name: str = "dpo"
    """Objective, a key of the loss registry (fastpo.losses.LOSSES), e.g. dpo, ipo, simpo, orpo, kto."""
    loss_type: list[str] = field(default_factory=list)
    """Several registry names combined with --loss.loss_weights (TRL's multi-loss, e.g. MPO:
    sigmoid,bco_pair,sft); empty: just --loss.name."""
    loss_weights: list[float] = field(default_factory=list)
    """Weights of --loss.loss_type, one each; empty: 1.0 each."""
    beta: float = 0.1
    """Inverse temperature beta (ORPO's lambda)."""
    label_smoothing: float | None = None
    """Label smoothing epsilon (robust, cdpo, exo_pair, aot, simpo, cpo)."""
    f_divergence_type: str | None = None
    """f-divergence of the DPO-family losses: reverse_kl, forward_kl, js_divergence, alpha_divergence."""
    f_alpha_divergence_coef: float | None = None
    """alpha of the alpha-divergence."""
    simpo_gamma: float | None = None
    """SimPO target reward margin gamma (the `gamma` of the simpo loss)."""
    cpo_alpha: float | None = None
    """Weight of CPO's NLL term."""
    rpo_alpha: float | None = None
    """Weight of RPO's NLL term."""
    discopop_tau: float | None = None
    """DiscoPOP temperature."""
    dpo_shift_lambda: float | None = None
    """DPO-Shift lambda in (0, 1] (the `shift_lambda` of the dpo_shift loss)."""
    desirable_weight: float | None = None
    """KTO weight lambda_D of desirable examples (TRL's desirable_weight; default 1.0)."""
    undesirable_weight: float | None = None
    """KTO weight lambda_U of undesirable examples (TRL's undesirable_weight; default 1.0)."""
    compute_nll_loss: bool | None = None
    """ORPO: add the NLL term on the chosen response."""
    ld_alpha: float | None = None
    """LD-DPO length desensitization alpha: in the policy and reference sums S, log-probs of tokens past
    the shorter response of the group are scaled by alpha (NLL terms keep plain sums; None: off)."""
    use_weighting: bool = False
    """WPO: weight each pair's loss by prod_k exp(mean_t (logp_t - log sum_v p_v^2)) of its responses
    under the policy (detached)."""

    def __post_init__(self):
        _check(bool(self.name), "loss.name", "a loss registry name", self.name)
        _positive("loss", self, "beta")
        if self.loss_weights:
            _check(len(self.loss_weights) == len(self.losses()), "loss.loss_weights",
                   f"{len(self.losses())} weights, one per --loss.loss_type entry", self.loss_weights)
        if self.label_smoothing is not None:
            _check(0.0 <= self.label_smoothing < 0.5, "loss.label_smoothing", "a value in [0, 0.5)",
                   self.label_smoothing)
        if self.f_divergence_type is not None:
            _choice("loss", self, "f_divergence_type", F_DIVERGENCES)
        if self.ld_alpha is not None:
            _check(0.0 <= self.ld_alpha <= 1.0, "loss.ld_alpha", "a value in [0, 1]", self.ld_alpha)

    def losses(self) -> list[str]:
        """The registry names trained on: --loss.loss_type, else [--loss.name]."""
        return list(self.loss_type) or [self.name]

    @property
    def reference_free(self) -> bool:
        """True when no selected objective uses reference log-probs."""
        return not any(needs_reference(n) for n in self.losses())

    @property
    def unpaired(self) -> bool:
        """True when the objectives take unpaired examples: one response with a desirable/undesirable
        label each (KTO; `--data.format kto`)."""
        return any(objective_trait(n, "unpaired") for n in self.losses())

    @property
    def uses_reference_point(self) -> bool:
        """True when an objective reads KTO's reference point z0 (scored on mismatched pairs)."""
        return any(objective_trait(n, "uses_reference_point") for n in self.losses())

    def hparams(self) -> dict:
        """Keyword arguments for `fastpo.losses.preference_loss`: beta, loss_weights, use_weighting and
        every hyperparameter set (not None), under the objectives' own names."""
        renames = {"simpo_gamma": "gamma", "dpo_shift_lambda": "shift_lambda"}
        skip = {"name", "loss_type", "loss_weights", "use_weighting", "ld_alpha"}
        out = {"beta": self.beta, "use_weighting": self.use_weighting}
        if self.loss_weights:
            out["loss_weights"] = list(self.loss_weights)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in skip and f.name != "beta" and value is not None:
                out[renames.get(f.name, f.name)] = value
        return out


@dataclass(kw_only=True, slots=True)
class RefConfig:
    """The reference model of reference-based objectives."""

    name: str | None = None
    """Hub id or local path of the reference model; None: a frozen copy of the initial policy."""
    precompute: bool = False
    """Compute reference log-probs once over the dataset before training and cache them on disk (KTO's
    mismatched pairs, which depend on the batch, are still scored by the reference at every step)."""
    cache_dir: str = "outputs/ref_cache"
    """Directory of the precomputed reference log-probs."""

    def __post_init__(self):
        _check(self.name is None or bool(self.name), "ref.name", "a Hub id, a local path or none", self.name)
        _check(bool(self.cache_dir), "ref.cache_dir", "a directory", self.cache_dir)


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW, the learning-rate schedule and the length of training."""

    lr: float | None = None
    """Peak learning rate; None: 1e-6 for pretrained weights (TRL's default), 3e-3 for a random-init
    model such as the demo."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to --optim.lr."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of --optim.lr (cosine and linear)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 disables."""
    max_skipped_steps: int = 3
    """A step with a non-finite loss or gradient norm is skipped (no update; counted in `skipped_steps`); more
    than this many in a row stop the run, whose last checkpoint is then still a finite resume point."""
    num_epochs: float = 3.0
    """Passes over the training data (fractions allowed), used when --optim.num_steps is none."""
    num_steps: int | None = None
    """Optimizer steps; None: --optim.num_epochs worth of steps."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; --data.batch_size must be divisible by it."""

    def __post_init__(self):
        _positive("optim", self, "lr", allow_none=True)
        _positive("optim", self, "eps", "num_epochs", "grad_accum_steps")
        _positive("optim", self, "num_steps", allow_none=True)
        _check(self.weight_decay >= 0, "optim.weight_decay", "a value >= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "optim.betas",
               "two values in [0, 1), e.g. 0.9,0.999", self.betas)
        _choice("optim", self, "schedule", ("cosine", "linear", "constant"))
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "a value in [0, 1]", self.min_lr_ratio)
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", "a value >= 0", self.max_grad_norm)
        _check(self.max_skipped_steps >= 0, "optim.max_skipped_steps", "an integer >= 0", self.max_skipped_steps)


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """FSDP2 data parallelism and mixed precision."""

    dp_shard: int = -1
    """Ranks the weights are sharded over; -1: all ranks of the job. Fewer (a divisor of the world size) gives
    HSDP: each group of dp_shard ranks holds a sharded copy and the copies all-reduce gradients (e.g. one
    node per copy, so the all-gathers stay inside a node)."""
    param_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of parameters under FSDP; auto: bfloat16 on CUDA, float32 on CPU."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of gradient reduce-scatter."""
    reshard_after_forward: Literal["default", "always", "never"] = "default"
    """FSDP reshard policy: default (reshard the blocks, keep the last group), always, never."""

    def __post_init__(self):
        _check(self.dp_shard == -1 or self.dp_shard >= 1, "parallel.dp_shard", "-1 or an integer >= 1",
               self.dp_shard)
        _choice("parallel", self, "param_dtype", ("auto",) + DTYPES)
        _choice("parallel", self, "reduce_dtype", ("float32", "bfloat16"))
        _choice("parallel", self, "reshard_after_forward", ("default", "always", "never"))


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Distributed checkpoints and the final Hugging Face export."""

    dir: str = "outputs/checkpoints"
    """Directory of training checkpoints."""
    interval: int = 0
    """Steps between checkpoints; 0: none during training."""
    resume: str | None = None
    """Resume from a checkpoint: a path, or "latest" for the newest under --checkpoint.dir; None: start fresh."""
    export_dir: str | None = "auto"
    """Where the trained policy is saved at the end (safetensors + tokenizer + a model card, loadable with
    from_pretrained; with LoRA the PEFT adapter); auto: <logging.out_dir>/final; none: no export."""
    keep: int = 0
    """Keep the newest N resume points under --checkpoint.dir (never the one `latest` names) and delete
    older ones after each save; 0: keep all."""
    allow_changes: bool = False
    """Resume even when run-defining options (model, data, loss, optim, seed ...) differ from those saved in
    the checkpoint; the differences are logged. Without it such a resume is refused."""

    def __post_init__(self):
        _check(bool(self.dir), "checkpoint.dir", "a directory", self.dir)
        _check(self.interval >= 0, "checkpoint.interval", "an integer >= 0", self.interval)
        _check(self.keep >= 0, "checkpoint.keep", "an integer >= 0", self.keep)
        _check(self.export_dir is None or bool(self.export_dir), "checkpoint.export_dir", "a directory, auto or none",
               self.export_dir)


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    """LoRA / QLoRA adapters (through PEFT). The reference of a reference-based objective is then the policy
    with its adapters disabled: one copy of the weights."""

    r: int = 0
    """Adapter rank; 0: full fine-tuning (no adapters)."""
    alpha: float = 16.0
    """LoRA alpha (the adapter's update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=list)
    """Module names (or suffixes) that get adapters; empty: every linear layer of the decoder blocks (PEFT's
    "all-linear", which leaves the LM head out)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (e.g. embed_tokens); the LM head and the embeddings stay
    frozen unless listed here."""
    init_from: str | None = None
    """An existing PEFT adapter (a folder saved by save_pretrained) to continue training."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in 4-bit NF4 with bitsandbytes (bf16 compute); CUDA only."""
    merge_on_export: bool = False
    """Also export the base with the adapters merged in, to <export_dir>/merged."""

    def __post_init__(self):
        _check(self.r >= 0, "lora.r", "an integer >= 0 (0: no adapters)", self.r)
        _check(self.alpha > 0, "lora.alpha", "a number > 0", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "a value in [0, 1)", self.dropout)
        if not self.enabled:
            for name in ("init_from", "load_in_4bit", "merge_on_export", "target_modules", "modules_to_save"):
                _check(not getattr(self, name), f"lora.{name}", "to be unset unless --lora.r > 0 (LoRA is off)",
                       getattr(self, name))

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """Metrics, evaluation and outputs."""

    out_dir: str = "outputs"
    """Directory of logs, metrics and plots."""
    log_interval: int = 10
    """Steps between metric lines."""
    eval_interval: int = 0
    """Steps between evaluations on the eval set; 0: only before and after training."""
    tensorboard: bool = False
    """Write TensorBoard events (needs tensorboard)."""
    jsonl: bool = True
    """Append metrics to <out_dir>/metrics.jsonl."""
    plots: bool | None = None
    """Save loss/accuracy/margin plots at the end (needs matplotlib); none: on when matplotlib is installed."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""

    def __post_init__(self):
        _check(bool(self.out_dir), "logging.out_dir", "a directory", self.out_dir)
        _positive("logging", self, "log_interval")
        _check(self.eval_interval >= 0, "logging.eval_interval", "an integer >= 0", self.eval_interval)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """fastpo trainer configuration (defaults: the embedded demo)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 0
    """Seed of initialization, data order and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device: auto (CUDA when available), cpu or cuda."""

    def __post_init__(self):
        _choice("", self, "device", ("auto", "cpu", "cuda"))
        if self.optim.lr is None:
            self.optim.lr = 3e-3 if self.model.random_init() else 1e-6

    @property
    def export_path(self) -> str | None:
        """--checkpoint.export_dir resolved: auto is <logging.out_dir>/final; None: no export."""
        if self.checkpoint.export_dir == "auto":
            return os.path.join(self.logging.out_dir, "final")
        return self.checkpoint.export_dir


def needs_reference(loss_name: str) -> bool:
    """Whether a registered objective uses reference log-probs (the registry's `needs_reference`)."""
    from fastpo.losses import LOSSES

    return LOSSES[loss_name].needs_reference


def objective_trait(loss_name: str, trait: str) -> bool:
    """A trait of a registered objective (`fastpo.losses.Objective`: unpaired, uses_reference_point, ...)."""
    from fastpo.losses import LOSSES

    return bool(getattr(LOSSES[loss_name], trait))


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks, run before any model or data is built; raises ValueError."""
    from fastpo.losses import LOSSES

    for name in cfg.loss.losses():
        if name not in LOSSES:
            close = difflib.get_close_matches(name, list(LOSSES), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; registered: {sorted(LOSSES)}"
            raise ValueError(f"--loss.name / --loss.loss_type: unknown loss {name!r}{hint}")
    _check_hparams_used(cfg.loss)
    if cfg.loss.reference_free and cfg.ref.name is not None:
        raise ValueError(f"--ref.name={cfg.ref.name!r} is set, but loss {cfg.loss.losses()} is reference-free "
                         "and never uses a reference model; drop --ref.name or pick a reference-based loss")
    if cfg.loss.reference_free and cfg.ref.precompute:
        raise ValueError(f"--ref.precompute is set, but loss {cfg.loss.losses()} is reference-free")
    _check_trainer_support(cfg)
    _check_head_path(cfg)
    _check_weighting(cfg)
    _check_unpaired(cfg)
    if cfg.data.format != "auto":
        check_data_format(cfg, cfg.data.format)
    d = cfg.data
    if d.max_length is not None and d.max_length > d.max_tokens:
        raise ValueError(f"--data.max_length={d.max_length} exceeds --data.max_tokens={d.max_tokens}: "
                         "one prompt + response must fit in a packed row")
    if d.batch_size % cfg.optim.grad_accum_steps:
        raise ValueError(f"--data.batch_size={d.batch_size} is not divisible by "
                         f"--optim.grad_accum_steps={cfg.optim.grad_accum_steps}")
    _check_device(cfg)


def _check_trainer_support(cfg: TrainConfig) -> None:
    """Objectives the loss library has but `python -m fastpo.train` cannot feed: refused up front rather
    than failing at the first step (use `fastpo.losses` directly for them)."""
    multi = [n for n in cfg.loss.losses() if objective_trait(n, "multi_reference")]
    if multi:
        raise ValueError(f"--loss.name {multi}: needs the log-probs of several reference models ([M, G, K]); "
                         "the trainer scores one reference (--ref.name); use "
                         "fastpo.losses.fused_linear_preference_loss(..., ref_logps=<[M, R] sums>)")


def _check_head_path(cfg: TrainConfig) -> None:
    """--model.head_path pair_fused needs objectives whose per-example gradient depends on that example only."""
    from fastpo.losses import resolve_path

    try:
        resolve_path(cfg.model.head_path, cfg.loss.losses(), True)
    except ValueError as e:
        raise ValueError(f"--model.head_path={cfg.model.head_path} with --loss {cfg.loss.losses()}: {e}; use "
                         "--model.head_path auto or generic") from None


def _check_weighting(cfg: TrainConfig) -> None:
    coupled = [n for n in cfg.loss.losses() if not objective_trait(n, "pair_local")]
    if cfg.loss.use_weighting and coupled:
        raise ValueError(f"--loss.use_weighting (WPO) cannot be combined with the batch-coupled AOT losses {coupled}")


def _unpaired_names() -> list[str]:
    from fastpo.losses import LOSSES

    return sorted(n for n in LOSSES if objective_trait(n, "unpaired"))


def _check_unpaired(cfg: TrainConfig) -> None:
    """Unpaired objectives: not mixed with paired ones, no pair-only modifiers, >= 2 examples for z0."""
    names = cfg.loss.losses()
    unpaired = [n for n in names if objective_trait(n, "unpaired")]
    if not unpaired:
        return
    if len(unpaired) < len(names):
        raise ValueError(f"--loss.loss_type {names}: the unpaired objectives {unpaired} (one labelled response "
                         "per example) cannot be combined with paired or listwise ones")
    if cfg.loss.ld_alpha is not None:
        raise ValueError(f"--loss.ld_alpha: LD-DPO down-weights the tokens past the shorter response of a pair; "
                         f"the unpaired objectives {unpaired} have one response per example")
    if cfg.loss.use_weighting:
        raise ValueError(f"--loss.use_weighting: WPO weights pairs of responses; the unpaired objectives "
                         f"{unpaired} have one response per example")
    per_micro = cfg.data.batch_size // cfg.optim.grad_accum_steps
    if cfg.loss.uses_reference_point and per_micro < 2:
        raise ValueError(f"--data.batch_size / --optim.grad_accum_steps = {per_micro} example(s) per micro-batch: "
                         f"the KTO reference point z0 of {unpaired} pairs each prompt with another example's "
                         "completion of the same micro-batch, so it needs at least 2")


def check_data_format(cfg: TrainConfig, fmt: str) -> None:
    """Unpaired objectives take unpaired rows (format "kto") or pairs (`fastpo.data.PAIRED_FORMATS`, which the
    data layer unpairs into a desirable and an undesirable example, as TRL's KTOTrainer); the other objectives
    take paired or ranked rows. `fmt` is --data.format, or the format detected from the data (checked again
    after loading)."""
    from fastpo.data import PAIRED_FORMATS

    accepted = ("kto", *PAIRED_FORMATS) if cfg.loss.unpaired else tuple(f for f in DATA_FORMATS if f != "kto")
    if fmt in accepted or fmt == "auto":
        return
    where = f"--data.format={fmt}" if cfg.data.format != "auto" else \
        f"--data.dataset={cfg.data.dataset!r} (detected format {fmt!r})"
    if fmt == "kto":
        raise ValueError(f"{where} gives unpaired rows (prompt, completion, label); --loss.name must be one of "
                         f"the unpaired objectives {_unpaired_names()}, got {cfg.loss.losses()}")
    raise ValueError(f"--loss.name {cfg.loss.losses()} is unpaired (one response with a desirable/undesirable "
                     f"label per example) and takes kto rows (prompt, completion, label) or pairs "
                     f"({', '.join(PAIRED_FORMATS)}), which are unpaired; {where} gives ranked lists of K responses")


def _check_hparams_used(loss: LossConfig) -> None:
    from fastpo.losses import LOSSES

    accepted = set().union(*(getattr(LOSSES[n], "hparams", set()) for n in loss.losses()))
    flags = {"gamma": "simpo_gamma", "shift_lambda": "dpo_shift_lambda"}
    for key in loss.hparams():
        if key not in accepted and key not in ("beta", "use_weighting", "loss_weights"):
            raise ValueError(f"--loss.{flags.get(key, key)} is set but loss {loss.losses()} does not use it; "
                             f"its hyperparameters: {sorted(accepted)}")


def _check_device(cfg: TrainConfig) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ValueError("--device=cuda, but CUDA is not available; use --device cpu or auto")
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cuda)
    if cfg.model.liger_kernels and not on_cuda:
        raise ValueError("--model.liger_kernels needs CUDA; drop it on CPU")
    if cfg.model.head_impl == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--model.head_impl=triton needs CUDA (or TRITON_INTERPRET=1); use auto or torch")
    if cfg.lora.load_in_4bit:
        if not on_cuda:
            raise ValueError("--lora.load_in_4bit (QLoRA) needs CUDA: bitsandbytes' 4-bit weights run on the GPU; "
                             "use plain LoRA (--lora.r) on CPU")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--lora.load_in_4bit (QLoRA) runs on one GPU: FSDP cannot shard bitsandbytes' 4-bit "
                             "weights here; use plain LoRA (--lora.r) across GPUs")
        if cfg.model.random_init():
            raise ValueError(f"--lora.load_in_4bit quantizes pretrained weights, but --model.name {cfg.model.name} "
                             "has none (random init)")


# ----------------------------------------------------------------------------------------------------
# dataclass tree <-> argparse and config files
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring under it (the string literal that follows its annotation)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _sections() -> dict[str, type]:
    return {f.name: _hints(TrainConfig)[f.name] for f in dataclasses.fields(TrainConfig)
            if dataclasses.is_dataclass(_hints(TrainConfig)[f.name])}


def options() -> dict[str, tuple[type, str, object, type]]:
    """Every leaf option: "section.field" (or "field" at the root) -> (owner class, field, default, type)."""
    out = {}
    for name, cls in _sections().items():
        for f in dataclasses.fields(cls):
            out[f"{name}.{f.name}"] = (cls, f.name, _default(f), _hints(cls)[f.name])
    for f in dataclasses.fields(TrainConfig):
        if f.name not in _sections():
            out[f.name] = (TrainConfig, f.name, _default(f), _hints(TrainConfig)[f.name])
    return out


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _unwrap_optional(tp):
    """(inner type, optional?) for `X | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _convert(key: str, value, tp):
    """A CLI string or a config-file value -> the field's type; ValueError naming the flag."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        _check(optional, key, f"a value of type {_type_name(tp)}", value)
        return None
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        items = [p.strip() if isinstance(p, str) else p
                 for v in items for p in (v.split(",") if isinstance(v, str) else [v]) if p != ""]
        item_tp = typing.get_args(inner)[0]
        converted = [_convert(key, v, item_tp) for v in items]
        return tuple(converted) if origin is tuple else converted
    if origin is Literal:
        choices = typing.get_args(inner)
        _check(value in choices, key, f"one of {list(choices)}", value)
        return value
    if inner is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        _check(isinstance(value, bool), key, "true or false", value)
        return value
    try:
        if inner is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if inner in (int, float) and isinstance(value, bool):
            raise ValueError
        return inner(value)
    except (TypeError, ValueError):
        raise ValueError(f"--{key}: expected {_type_name(tp)}, got {value!r}") from None


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is Literal:
        name = "|".join(map(str, typing.get_args(inner)))
    elif origin in (list, tuple):
        name = f"comma-separated {typing.get_args(inner)[0].__name__}s"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or none" if optional else name


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastpo.train",
        usage="%(prog)s [--config PATH] [--section.field VALUE ...]",
        description="Preference optimization with fastpo. Precedence: CLI flags > --config file > defaults.",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="TOML (or YAML, with pyyaml) file of [section] tables; CLI flags override it")
    groups = {name: parser.add_argument_group(name, cls.__doc__) for name, cls in _sections().items()}
    for key, (cls, name, default, tp) in options().items():
        group = groups.get(key.split(".")[0], parser) if "." in key else parser
        doc = field_docs(cls).get(name, "").replace("%", "%%").replace("\n", " ")
        shown = "none" if default is None else (",".join(map(str, default)) if isinstance(default, (list, tuple))
                                                else default)
        help_text = f"{doc} [{_type_name(tp)}; default: {shown}]"
        inner, _ = _unwrap_optional(tp)
        if inner is bool:
            group.add_argument(f"--{key}", dest=key, nargs="?", const="true", default=argparse.SUPPRESS,
                               metavar="BOOL", help=help_text)
            neg = key.rsplit(".", 1)
            neg = f"{neg[0]}.no-{neg[1]}" if len(neg) == 2 else f"no-{key}"
            group.add_argument(f"--{neg}", dest=key, action="store_const", const="false",
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif typing.get_origin(inner) in (list, tuple):
            group.add_argument(f"--{key}", dest=key, action="append", default=argparse.SUPPRESS,
                               metavar="A,B", help=help_text)
        else:
            group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar="VALUE",
                               help=help_text)
    return parser


def load_config_file(path: str) -> dict[str, object]:
    """A TOML or YAML file -> flat {"section.field": value}; unknown keys raise with close matches."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: no such file {path!r}")
    if p.suffix == ".toml":
        import tomllib

        with open(p, "rb") as f:
            tree = tomllib.load(f)
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: YAML needs pyyaml (pip install pyyaml), or use TOML") from None
        tree = yaml.safe_load(p.read_text()) or {}
    else:
        raise ValueError(f"--config {path}: expected a .toml, .yaml or .yml file")
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    known = options()
    for key in flat:
        if key not in known:
            raise ValueError(f"{path}: unknown config key {key!r}{_suggest(key, known)}")
    return flat


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI flags (and an optional --config file) -> a validated-per-field `TrainConfig`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        flags = [f"--{k}" for k in options()] + ["--config"]
        parser.error(f"unrecognized argument {flag!r}{_suggest(flag.split('=')[0], flags)}")
    values = load_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    return from_flat(values)


def from_flat(values: dict[str, object]) -> TrainConfig:
    """{"section.field": value} (strings or typed values) over the defaults -> `TrainConfig`."""
    known = options()
    kwargs: dict[str, dict] = {name: {} for name in _sections()}
    root = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown option {key!r}{_suggest(key, known)}")
        converted = _convert(key, value, known[key][3])
        if "." in key:
            section, name = key.split(".", 1)
            kwargs[section][name] = converted
        else:
            root[key] = converted
    sections = {name: cls(**kwargs[name]) for name, cls in _sections().items()}
    return TrainConfig(**sections, **root)


def to_dict(cfg: TrainConfig) -> dict:
    """The config as nested plain data (for logs and checkpoints)."""
    return dataclasses.asdict(cfg)
