"""One DPO optimizer step of a Hugging Face Llama, end to end: throughput and peak memory, per provider.

A step: build the batch from token ids and move it to the device, reference forward (no gradient),
policy forward, sigmoid DPO loss (beta = 0.1, mean over pairs), backward, AdamW step, zero_grad.
Providers differ only in how log-prob sums reach the loss:

  fastpo           the trainer's own step, `fastpo.trainer.Trainer.train_step` (prefix-shared packing, decoder
                   body and `fused_linear_preference_loss` in one `Scorer`, metrics reduced), head path "auto",
                   which is pair-fused for DPO
  fastpo-generic   the same step with `--model.head_path generic` (per-token log-probs, backward recomputes)
  fastpo-unshared  the trainer's step with `--data.share_prefix false`: every [p + y_k] its own packed sequence
  naive            TRL's `concatenated_forward`: [p + chosen] rows then [p + rejected] rows, right-padded
                   to the longest, the full model forward with materialized [2B, L, V] logits,
                   log_softmax + gather of the completion tokens, the loss written out with F.logsigmoid

Model: the bundled demo config (`fastpo.data.demo_paths().model`, a 2-layer Llama) with the shape's
sizes substituted, random init; the reference is a second random init. Data: synthetic pairs, prompt
and response lengths uniform in [0.5, 1.5] x the shape's medians (fixed seed), identical for every
provider. `tokens_per_s` counts the tokens of the separate sequences, sum over pairs of
(2P + n_chosen + n_rejected); `completion_tokens_per_s` the response tokens alone; `processed_tokens`
is what the decoder ran (rows x row length, padding included). Peak memory: CUDA
`max_memory_allocated` above the live models and optimizer state; CPU peak RSS of a fresh subprocess.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from bench.harness import DEVICE, peak_memory_bytes, run_pedantic, synchronize
from fastpo import parallel
from fastpo.build import AdapterOffReference, lr_schedule
from fastpo.config import from_flat
from fastpo.data import TokenizedExample, demo_paths
from fastpo.lora import apply_lora
from fastpo.packing import IGNORE_INDEX, PreferenceExample, pack_examples
from fastpo.trainer import Scorer, Trainer, _nll_scale

BETA = 0.1


@dataclass(frozen=True)
class TrainShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    pairs: int
    prompt_len: int
    """Median prompt length (tokens)."""
    response_len: int
    """Median response length (tokens)."""
    max_tokens: int
    """Row budget of the packed batches (fastpo providers)."""
    dtype: str = "float32"
    model_type: str = "llama"
    """"llama": the bundled demo config with these sizes; another transformers model type: its config class."""

    def config_overrides(self) -> dict:
        """Fields replaced in the demo config."""
        return dict(
            hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.hidden // self.heads,
            vocab_size=self.vocab, max_position_embeddings=4 * (self.prompt_len + self.response_len),
        )  # fmt: skip


# cpu-demo is the bundled demo model as shipped (V=100: the head is negligible, attention and packing
# dominate); cpu-vocab16k widens it so the head and its [N, V] logits matter (the naive step runs the
# head on every prompt and padding position too: ~5 s per step at V=32000 on 2 cores, too slow here); the GPU shape is
# Qwen2-0.5B's config (H=896, 24 layers, V=151936) with ~1024-token sequences.
SHAPES = {
    "cpu": {
        "cpu-demo": TrainShape(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=100, pairs=8,
                               prompt_len=64, response_len=32, max_tokens=512),
        "cpu-vocab16k": TrainShape(hidden=128, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=16384,
                                   pairs=8, prompt_len=64, response_len=32, max_tokens=512),
        # head-dominated: the head's 6-8 NHV per completion token is ~5x the body's FLOPs per token, so the
        # pair-fused head's saving (one logits GEMM instead of two) shows in the whole step
        "cpu-head": TrainShape(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=8192, pairs=8,
                               prompt_len=64, response_len=32, max_tokens=512),
    },
    "cuda": {
        # Qwen2-0.5B's sizes and layout (qkv biases, 2 KV heads, tied embeddings), random init
        "qwen2-0.5b": TrainShape(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936,
                                 pairs=8, prompt_len=512, response_len=512, max_tokens=4096, dtype="bfloat16",
                                 model_type="qwen2"),
    },
}[DEVICE]
MEMORY_SHAPE = "cpu-vocab16k" if DEVICE == "cpu" else "qwen2-0.5b"
WARMUP_STEPS = 1
"""Untimed steps before `run_pedantic` (which adds its own warmup round): the first step allocates the
AdamW state, and the first CPU steps of a new shape run several times slower."""


def make_examples(shape: TrainShape, seed: int = 0) -> list[PreferenceExample]:
    """`shape.pairs` synthetic (prompt, [chosen, rejected]) token lists."""
    rng = random.Random(seed)

    def toks(median):
        return [rng.randrange(3, shape.vocab) for _ in range(max(1, round(median * rng.uniform(0.5, 1.5))))]

    return [PreferenceExample(toks(shape.prompt_len), [toks(shape.response_len), toks(shape.response_len)])
            for _ in range(shape.pairs)]


def make_model(shape: TrainShape, seed: int):
    """A model of the shape's type and sizes (the demo Llama's config for "llama"), random init from `seed`, on
    DEVICE in the shape's dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape.model_type == "llama":
        cfg = AutoConfig.from_pretrained(demo_paths().model, **shape.config_overrides())
    else:
        cfg = AutoConfig.for_model(shape.model_type, **shape.config_overrides(), tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.to(DEVICE, getattr(torch, shape.dtype))


def make_models(shape: TrainShape):
    """(policy, frozen reference): two random inits, the same for every provider."""
    reference = make_model(shape, seed=1).requires_grad_(False).eval()
    return make_model(shape, seed=0), reference


# ----------------------------------------------------------------------------------------------------
# providers: (policy, reference, shape) -> loss_fn(examples) -> scalar loss with a graph to the policy
# ----------------------------------------------------------------------------------------------------


def tokenized(examples) -> list[TokenizedExample]:
    return [TokenizedExample(list(ex.prompt_ids), [list(r) for r in ex.response_ids], None, i)
            for i, ex in enumerate(examples)]


def make_trainer(policy, reference, shape: TrainShape, *, head_path="auto", share_prompt=True,
                 lora_rank: int = 0) -> Trainer:
    """A `fastpo.trainer.Trainer` over the shape's examples (one global batch of all of them per step), on
    DEVICE, one process: the step `python -m fastpo.train` runs, minus data loading. With `lora_rank` the
    policy gets PEFT LoRA adapters on every linear layer of its blocks and the reference is the policy with
    them disabled (`reference` is then unused)."""
    flat = {"data.batch_size": shape.pairs, "data.max_tokens": shape.max_tokens, "data.share_prefix": share_prompt,
            "model.head_path": head_path, "optim.lr": 1e-5, "optim.warmup_steps": 0, "optim.schedule": "constant",
            "optim.max_grad_norm": 0.0, "data.pad_token_id": 0, "device": DEVICE, "loss.beta": BETA,
            "lora.r": lora_rank}
    cfg = from_flat(flat)
    world = parallel.World(0, 1, torch.device(DEVICE), None)
    if lora_rank:
        policy = apply_lora(policy, cfg.lora)
    policy_s = Scorer(policy, path=head_path)
    reference_s = AdapterOffReference(policy_s) if lora_rank else Scorer(reference)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    scheduler = lr_schedule(optimizer, "constant", 0, 1)
    return Trainer(cfg, world, policy_s, reference_s, optimizer, scheduler, (tokenized(make_examples(shape)), []),
                   cfg.loss.hparams(), num_steps=1 << 30)


def fastpo_provider(head_path: str, share_prompt: bool):
    def build(policy, reference, shape):
        trainer = make_trainer(policy, reference, shape, head_path=head_path, share_prompt=share_prompt)

        def loss_fn(examples):
            examples = tokenized(examples)
            out, _ = trainer.micro_step(examples, _nll_scale(examples), len(examples))
            return out.loss

        return loss_fn

    return build


def padded_pairs(examples) -> dict:
    """TRL's concatenated batch: [p + chosen] rows, then [p + rejected] rows, right-padded; labels hold the
    completion tokens at their own positions and IGNORE_INDEX elsewhere."""
    seqs = [(list(ex.prompt_ids), list(ex.response_ids[k])) for k in (0, 1) for ex in examples]
    L = max(len(p) + len(y) for p, y in seqs)
    input_ids = torch.zeros(len(seqs), L, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), L, dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    for i, (p, y) in enumerate(seqs):
        input_ids[i, : len(p) + len(y)] = torch.tensor(p + y)
        attention_mask[i, : len(p) + len(y)] = 1
        labels[i, len(p) : len(p) + len(y)] = torch.tensor(y)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def naive_logps(model, batch: dict) -> torch.Tensor:
    """[2B] fp32 completion log-prob sums from the full forward's materialized logits (log_softmax in the
    model's dtype, as TRL's `selective_log_softmax`)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    logp = logits[:, :-1].log_softmax(-1).gather(-1, torch.where(mask, labels, 0)[..., None]).squeeze(-1)
    return (logp.float() * mask).sum(-1)


def naive_provider(policy, reference, shape):
    def loss_fn(examples):
        batch = {k: v.to(DEVICE) for k, v in padded_pairs(examples).items()}
        with torch.no_grad():
            ref_chosen, ref_rejected = naive_logps(reference, batch).chunk(2)
        chosen, rejected = naive_logps(policy, batch).chunk(2)
        return -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()

    return loss_fn


TRAINER_PROVIDERS = {"fastpo": ("auto", True), "fastpo-generic": ("generic", True), "fastpo-unshared": ("auto", False)}
PROVIDERS = {**{name: fastpo_provider(*args) for name, args in TRAINER_PROVIDERS.items()}, "naive": naive_provider}


def processed_tokens(provider: str, shape: TrainShape, examples) -> int:
    """Positions the decoder runs in one policy forward: rows x row length, padding included."""
    if provider == "naive":
        return padded_pairs(examples)["input_ids"].numel()
    share = TRAINER_PROVIDERS[provider][1]
    return pack_examples(examples, max_tokens=shape.max_tokens, share_prompt=share).input_ids.numel()


def make_step(provider: str, shape: TrainShape):
    """step() -> detached loss: one optimizer step, on fresh models and a fresh AdamW (fastpo providers: the
    trainer's `train_step`)."""
    policy, reference = make_models(shape)
    if provider in TRAINER_PROVIDERS:
        head_path, share = TRAINER_PROVIDERS[provider]
        trainer = make_trainer(policy, reference, shape, head_path=head_path, share_prompt=share)
        return lambda: torch.tensor(trainer.train_step()["loss"])
    loss_fn = PROVIDERS[provider](policy, reference, shape)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    examples = make_examples(shape)

    def step():
        loss = loss_fn(examples)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def token_counts(shape: TrainShape) -> dict:
    """Tokens of one step's data: separate sequences (sum over pairs of 2P + n_c + n_r) and completions."""
    examples = make_examples(shape)
    completion = sum(len(y) for ex in examples for y in ex.response_ids)
    return dict(sequence_tokens=completion + 2 * sum(len(ex.prompt_ids) for ex in examples),
                completion_tokens=completion)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def bench_train_step_time(benchmark, record, shape_name, provider):
    shape = SHAPES[shape_name]
    step = make_step(provider, shape)
    for _ in range(WARMUP_STEPS):
        step()
    loss = run_pedantic(benchmark, step, rounds=3 if DEVICE == "cpu" else None)
    assert torch.isfinite(loss)
    median = benchmark.stats.stats.median
    counts = token_counts(shape)
    record(
        benchmark, shape=shape_name, provider=provider, mode="train_step", pairs=shape.pairs, H=shape.hidden,
        layers=shape.layers, V=shape.vocab, dtype=shape.dtype, **counts,
        processed_tokens=processed_tokens(provider, shape, make_examples(shape)),
        tokens_per_s=counts["sequence_tokens"] / median, completion_tokens_per_s=counts["completion_tokens"] / median,
    )  # fmt: skip


def train_case(provider: str, shape_name: str):
    """Models, optimizer and data built, one untimed step run (AdamW state allocated): returns the
    measured region, one more step."""
    step = make_step(provider, SHAPES[shape_name])
    step()
    synchronize()
    return step


@pytest.mark.parametrize("provider", list(PROVIDERS))
def bench_train_step_peak_memory(record, provider):
    """Peak memory of one step above the models, the AdamW state and the inputs."""
    shape = SHAPES[MEMORY_SHAPE]
    peak = peak_memory_bytes("bench.bench_train", "train_case", dict(provider=provider, shape_name=MEMORY_SHAPE))
    record(shape=MEMORY_SHAPE, provider=provider, mode="train_step", pairs=shape.pairs, H=shape.hidden,
           layers=shape.layers, V=shape.vocab, dtype=shape.dtype, peak_mb=peak / 2**20)


# ----------------------------------------------------------------------------------------------------
# LoRA against full fine-tuning: the whole run's memory
# ----------------------------------------------------------------------------------------------------

# ~50M parameters (untied 16k-token embedding and head 16.4M, 8 blocks of 4.2M); full fine-tuning keeps the
# policy, its gradients, AdamW's two moments and a frozen reference copy (5x the weights); LoRA keeps one copy
# of the weights plus adapters and their optimizer state. Both keep the step's activations (LoRA needs the
# body's activations to reach its adapters), so the ratio falls with the batch: two batch sizes are shown.
LORA_SHAPES = {f"cpu-50m-{pairs}pairs": TrainShape(hidden=512, intermediate=2048, layers=8, heads=8, kv_heads=8,
                                                   vocab=16000, pairs=pairs, prompt_len=64, response_len=32,
                                                   max_tokens=1024) for pairs in (4, 8)}
LORA_RANK = 16


def _lora_shape(name: str) -> TrainShape:
    return LORA_SHAPES[name] if DEVICE == "cpu" else SHAPES[MEMORY_SHAPE]


def training_run_case(kind: str, shape_name: str):
    """The measured region: build the models ("full": policy and a frozen reference copy; "lora": one model with
    rank-16 adapters), AdamW, and run two trainer steps; memory counted from before the models exist."""

    def run():
        shape = _lora_shape(shape_name)
        if kind == "full":
            policy, reference = make_models(shape)
            trainer = make_trainer(policy, reference, shape)
        else:
            trainer = make_trainer(make_model(shape, seed=0), None, shape, lora_rank=LORA_RANK)
        for _ in range(2):
            trainer.train_step()
        synchronize()

    return run


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("shape_name", list(LORA_SHAPES) if DEVICE == "cpu" else [MEMORY_SHAPE])
def bench_lora_peak_memory(record, shape_name, kind):
    """Peak memory of a whole short run (models, optimizer state, two DPO steps): LoRA with the adapter-off
    reference against full fine-tuning with a frozen reference copy, same model and batch."""
    shape = _lora_shape(shape_name)
    peak = peak_memory_bytes("bench.bench_train", "training_run_case", dict(kind=kind, shape_name=shape_name))
    params = sum(p.numel() for p in make_model(shape, seed=0).parameters())
    record(shape=shape_name, provider=f"fastpo-{kind}", mode="run", params=params, pairs=shape.pairs,
           lora_rank=LORA_RANK if kind == "lora" else 0, peak_mb=peak / 2**20)
