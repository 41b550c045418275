"""Prefix sharing and packing: forward+backward throughput of a tiny decoder on preference pairs.

Every provider computes the same per-response log-prob sums (fused head on the completion rows only)
and the gradient of a DPO-style loss; only the layout and the attention path differ:

  fastpo-shared             `pack_examples(share_prompt=True)` + `fastpo.score` (prefix-shared attention)
  fastpo-unshared           `pack_examples(share_prompt=False)` + `fastpo.score`: every [p + y_k] packed
  fastpo-shared-hf-4d-mask  the shared rows through the stock `sdpa` attention with the 4-D bool mask given
                            as `attention_mask` (the mask path without the fastpo attention function)
  naive-padded              no packing: one [p + y_k] per row, right-padded, stock `sdpa` with a 2-D
                            padding mask

Datasets are synthetic, at three median prompt/response length ratios r = P / R:
0.4 (UltraFeedback-like), 2 (HH-RLHF-like), 8 (summarization-like); lengths uniform in [0.5, 1.5] x
the median. `tokens_per_s` counts the tokens of the separate sequences, sum_k (P + R_k), for every
provider, so it compares directly; `processed_tokens` is what the decoder actually ran (rows x length).
The token-count bound of sharing for pairs is 2(r + 1) / (r + 2).
"""

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.harness import DEVICE, run_pedantic
from fastpo.attention import dense_prefix_mask, enable_prefix_sharing, score
from fastpo.ops import token_stats
from fastpo.packing import PreferenceExample, pack_examples


@dataclass(frozen=True)
class PackingShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    num_examples: int
    response_len: int
    """Median response length; the prompt median is ratio x this (at least 8 tokens)."""
    max_tokens: int
    dtype: str = "float32"


SHAPES = {
    "cpu": PackingShape(
        hidden=128, layers=2, heads=4, kv_heads=2, vocab=512, num_examples=8, response_len=32, max_tokens=512
    ),
    "cuda": PackingShape(
        hidden=1024, layers=8, heads=16, kv_heads=4, vocab=32000, num_examples=64, response_len=256,
        max_tokens=8192, dtype="bfloat16",
    ),
}  # fmt: skip
SHAPE = SHAPES[DEVICE]
RATIOS = {0.4: "ultrafeedback-like", 2.0: "hh-like", 8.0: "summarization-like"}
PROVIDERS = ["fastpo-shared", "fastpo-unshared", "fastpo-shared-hf-4d-mask", "naive-padded"]
WARMUP_STEPS = 2
"""Untimed steps before `run_pedantic` (which adds its own warmup round): the first CPU steps of a new
shape run several times slower."""


def make_examples(ratio, shape=SHAPE, seed=0):
    rng = random.Random(seed)

    def length(median):
        return max(1, round(median * rng.uniform(0.5, 1.5)))

    def toks(n):
        return [rng.randrange(1, shape.vocab) for _ in range(n)]

    p_med = max(8, round(ratio * shape.response_len))
    return [
        PreferenceExample(toks(length(p_med)), [toks(length(shape.response_len)) for _ in range(2)])
        for _ in range(shape.num_examples)
    ]


def make_model(shape=SHAPE):
    cfg = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=4 * shape.hidden,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4 * shape.max_tokens,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(DEVICE, getattr(torch, shape.dtype))


def pair_loss(logp_sum):
    """DPO-style loss on pairs; responses are example-major, so chosen = even, rejected = odd."""
    return -F.logsigmoid(0.1 * (logp_sum[0::2] - logp_sum[1::2])).mean()


def _head_logps(model, hidden_BLH, rows):
    """Per-response log-prob sums through the fused head; `rows` has src_index, targets, token_response."""
    head = model.get_output_embeddings()
    logp = token_stats(hidden_BLH.flatten(0, 1).index_select(0, rows["src_index"]), head.weight, rows["targets"]).logp
    return torch.zeros(rows["num_responses"], device=logp.device).index_add(0, rows["token_response"], logp)


def _padded_inputs(examples):
    """One [p + y_k] per row, right-padded; src/tgt gather of the completion rows."""
    seqs = [(list(ex.prompt_ids), list(r)) for ex in examples for r in ex.response_ids]
    L = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    src, tgt, resp = [], [], []
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        src += range(i * L + len(p) - 1, i * L + n - 1)
        tgt += range(i * L + len(p), i * L + n)
        resp += [i] * len(r)
    src, tgt = torch.tensor(src), torch.tensor(tgt)
    return dict(
        input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), src_index=src.to(DEVICE),
        targets=ids.flatten()[tgt].to(DEVICE), token_response=torch.tensor(resp, device=DEVICE),
        num_responses=len(seqs), processed_tokens=ids.numel(),
    )  # fmt: skip


def make_step(provider, model, examples):
    """(step() -> loss after backward, processed token count, setup())."""
    if provider in ("fastpo-shared", "fastpo-unshared"):
        share = provider == "fastpo-shared"
        batch = pack_examples(examples, max_tokens=SHAPE.max_tokens, share_prompt=share).to(DEVICE)
        enable_prefix_sharing(model)

        def step():
            loss = pair_loss(score(model, batch).logp_sum)
            loss.backward()
            return loss

        return step, batch.input_ids.numel(), batch.layout.cache.clear  # mask rebuilt every step
    if provider == "fastpo-shared-hf-4d-mask":
        batch = pack_examples(examples, max_tokens=SHAPE.max_tokens).to(DEVICE)
        model.set_attn_implementation("sdpa")

        def step():
            batch.layout.cache.clear()
            hidden = model.get_decoder()(
                input_ids=batch.input_ids, attention_mask=dense_prefix_mask(batch.layout),
                position_ids=batch.position_ids, use_cache=False,
            ).last_hidden_state  # fmt: skip
            logp_sum = _head_logps(model, hidden, vars(batch))
            loss = pair_loss(logp_sum)
            loss.backward()
            return loss

        return step, batch.input_ids.numel(), None
    padded = _padded_inputs(examples)
    model.set_attn_implementation("sdpa")

    def step():
        hidden = model.get_decoder()(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
        ).last_hidden_state
        logp_sum = _head_logps(model, hidden, padded)
        loss = pair_loss(logp_sum)
        loss.backward()
        return loss

    return step, padded["processed_tokens"], None


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("ratio", list(RATIOS), ids=[f"r{r:g}" for r in RATIOS])
def bench_packing_fwd_bwd(benchmark, record, ratio, provider):
    examples = make_examples(ratio)
    model = make_model()
    step, processed, clear = make_step(provider, model, examples)

    def setup():
        model.zero_grad(set_to_none=True)
        if clear is not None:
            clear()

    for _ in range(WARMUP_STEPS):
        setup()
        step()
    loss = run_pedantic(benchmark, lambda _: step(), setup=setup, rounds=5 if DEVICE == "cpu" else None)
    assert torch.isfinite(loss)
    separate_tokens = sum(len(ex.prompt_ids) + len(r) for ex in examples for r in ex.response_ids)
    median = benchmark.stats.stats.median
    record(
        benchmark, ratio=ratio, data=RATIOS[ratio], provider=provider, mode="fwd_bwd",
        examples=len(examples), separate_tokens=separate_tokens, processed_tokens=processed,
        tokens_per_s=separate_tokens / median, token_bound=2 * (ratio + 1) / (ratio + 2),
    )  # fmt: skip
