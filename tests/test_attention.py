"""Prefix-shared attention: packed rows give the log-probs and DPO gradients of separate forwards.

Ground truth: every `[prompt + response]` run on its own through the stock model (eager attention),
`logits.log_softmax(-1)` gathered at the response tokens, in fp32. Tiny random-weight models with GQA
(4 query heads, 2 key/value heads); Mistral and Gemma-2 with a sliding window (8) shorter than the
longer prompts, Gemma-2 with attention-logit and final-logit softcapping small enough to bite.
"""

import copy
import logging
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

import fastpo
from fastpo import attention
from fastpo.attention import ATTN_IMPLEMENTATION, enable_prefix_sharing, resolve_backend, score
from fastpo.packing import PreferenceExample, pack_examples

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
)  # fmt: skip
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),  # q/k/v biases
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8),
    "gemma2": lambda: Gemma2Config(
        **COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
        attn_logit_softcapping=2.0, final_logit_softcapping=1.0,
    ),  # fmt: skip
}
# several examples per row, K = 2 and K = 3, prompts of 1 to 40 tokens, responses of 1 to 30
SPEC = [(1, [5, 3]), (25, [2, 17]), (8, [1, 4, 9]), (3, [30, 6]), (12, [7, 7, 2]), (40, [4, 1])]
MAX_TOKENS = 64
RTOL, ATOL = 1e-5, 1e-5


def make_examples(spec, seed=0):
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    return [PreferenceExample(toks(p), [toks(r) for r in rs]) for p, rs in spec]


def make_model(name, **overrides):
    cfg = CONFIGS[name]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()


def separate_token_logps(model, examples):
    """Per-response [n] log-probs from one plain forward per [prompt + response] (eager attention)."""
    out = []
    for ex in examples:
        P = len(ex.prompt_ids)
        for r in ex.response_ids:
            ids = torch.tensor([list(ex.prompt_ids) + list(r)])
            logits = model(input_ids=ids, use_cache=False).logits.float()
            out.append(logits[0, P - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1))
    return out


def dpo_loss(logp_sum, response_example, response_rank, ref_logp, beta=0.5):
    """-log sigmoid(beta ((pi_i - ref_i) - (pi_j - ref_j))) over every pair i better than j of an example."""
    margin = logp_sum - ref_logp
    same = response_example[:, None] == response_example[None, :]
    better = same & (response_rank[:, None] < response_rank[None, :])
    i, j = better.nonzero(as_tuple=True)
    return -F.logsigmoid(beta * (margin[i] - margin[j])).mean()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name, g_ref in expected.items():
        scale = float(g_ref.abs().max())
        assert scale > 0, f"{name}: zero reference gradient"
        torch.testing.assert_close(actual[name], g_ref, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{name}: {m}")


def run_separate(model, examples, ref_logp, response_example, response_rank):
    token_logps = separate_token_logps(model, examples)
    logp_sum = torch.stack([t.sum() for t in token_logps])
    model.zero_grad()
    dpo_loss(logp_sum, response_example, response_rank, ref_logp).backward()
    return token_logps, logp_sum.detach(), grads(model)


def run_packed(model, batch, ref_logp, backend):
    enable_prefix_sharing(model)
    model.zero_grad()
    s = score(model, batch, backend=backend)
    dpo_loss(s.logp_sum, batch.response_example, batch.response_rank, ref_logp).backward()
    return s, grads(model)


@pytest.mark.parametrize(
    "share_prompt, backend",
    [
        (True, "sdpa"),  # the CPU path
        (True, "varlen_emulated"),  # the flash-attn varlen layout (K/V gather, cu_seqlens), emulated
        (False, "sdpa"),  # the unshared baseline through the same attention function
    ],
    ids=["shared-sdpa", "shared-varlen_emulated", "unshared-sdpa"],
)
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_packed_matches_separate_forwards(arch, share_prompt, backend):
    examples = make_examples(SPEC)
    batch = pack_examples(examples, max_tokens=MAX_TOKENS, share_prompt=share_prompt)
    assert batch.truncation.num_truncated_examples == 0
    ref_model = make_model(arch)
    model = copy.deepcopy(ref_model)
    ref_logp = torch.randn(batch.num_responses, generator=torch.Generator().manual_seed(1)) - 20.0

    tok_ref, sum_ref, g_ref = run_separate(ref_model, examples, ref_logp, batch.response_example, batch.response_rank)
    s, g = run_packed(model, batch, ref_logp, backend)

    assert s.logp_sum.dtype == torch.float32 and s.num_tokens.tolist() == [t.numel() for t in tok_ref]
    torch.testing.assert_close(s.token_logp.detach(), torch.cat(tok_ref).detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(s.logp_sum.detach(), sum_ref, rtol=RTOL, atol=ATOL)
    assert_grads_close(g, g_ref)


def test_activation_checkpointing_gives_the_same_gradients():
    """The layout kwarg survives transformers' checkpointed layers (recomputed in backward)."""
    examples = make_examples(SPEC)
    batch = pack_examples(examples, max_tokens=MAX_TOKENS)
    model = make_model("qwen2")
    ckpt = copy.deepcopy(model)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    ref_logp = torch.zeros(batch.num_responses)
    s, g = run_packed(model, batch, ref_logp, "sdpa")
    s_ckpt, g_ckpt = run_packed(ckpt, batch, ref_logp, "sdpa")
    torch.testing.assert_close(s_ckpt.logp_sum, s.logp_sum, rtol=RTOL, atol=ATOL)
    assert_grads_close(g_ckpt, g)


def test_unpaired_examples_match_separate_forwards():
    examples = make_examples([(6, [4]), (3, [7, 2]), (11, [1])])
    batch = pack_examples(examples, max_tokens=32, min_responses=1)
    ref_model = make_model("llama")
    model = copy.deepcopy(ref_model)
    enable_prefix_sharing(model)
    with torch.no_grad():
        expected = torch.stack([t.sum() for t in separate_token_logps(ref_model, examples)])
        got = score(model, batch).logp_sum
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "arch, feature, off",
    [
        ("mistral", "sliding_window", 4096),
        ("gemma2", "sliding_window", 4096),
        ("gemma2", "attn_logit_softcapping", None),
        ("gemma2", "final_logit_softcapping", None),
    ],
)
def test_window_and_softcap_are_exercised(arch, feature, off):
    """The equivalence tests would not notice a backend that ignores the window or the softcap if these
    features did not change the result for the test data: check that they do."""
    examples = make_examples(SPEC)
    with torch.no_grad():
        with_feature = torch.cat(separate_token_logps(make_model(arch), examples))
        without = torch.cat(separate_token_logps(make_model(arch, **{feature: off}), examples))
    assert (with_feature - without).abs().max() > 1e-3


def test_position_only_packing_is_wrong_without_the_mask():
    """The trap: prefix positions with the stock sdpa attention and no mask. transformers infers
    documents from position_ids, starts a new one where a later response restarts at P, so that
    response cannot see its prompt. The first responses still match, which is what makes it silent."""
    examples = make_examples(SPEC)
    batch = pack_examples(examples, max_tokens=MAX_TOKENS)
    model = make_model("llama")
    with torch.no_grad():
        expected = torch.stack([t.sum() for t in separate_token_logps(model, examples)])
        model.set_attn_implementation("sdpa")
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        logp = logits.flatten(0, 1)[batch.src_index].log_softmax(-1).gather(-1, batch.targets[:, None]).squeeze(-1)
        got = torch.zeros(batch.num_responses).index_add_(0, batch.token_response, logp)
    first, later = batch.response_rank == 0, batch.response_rank > 0
    torch.testing.assert_close(got[first], expected[first], rtol=RTOL, atol=1e-4)
    assert (got[later] - expected[later]).abs().max() > 0.05


# ----------------------------------------------------------------------------------------------------
# backends at the function level: the varlen layout (emulated) and FlexAttention against the SDPA mask
# ----------------------------------------------------------------------------------------------------


class _Module(torch.nn.Module):
    pass


def _qkv(batch, Hq=4, Hkv=2, D=8, requires_grad=False):
    B, L = batch.input_ids.shape
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


@pytest.mark.parametrize("window, softcap", [(None, None), (6, None), (None, 1.5), (6, 1.5)])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "unshared"])
def test_varlen_emulation_matches_sdpa_mask(share_prompt, window, softcap):
    batch = pack_examples(make_examples(SPEC), max_tokens=MAX_TOKENS, share_prompt=share_prompt)
    q, k, v = _qkv(batch, requires_grad=True)
    module = _Module()
    args = (batch.layout, 8**-0.5, 0.0, window, softcap)
    dense = attention._sdpa_backend(module, q, k, v, *args)
    varlen = attention._varlen_emulated_backend(module, q, k, v, *args)
    assert dense.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    torch.testing.assert_close(varlen, dense, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(dense)
    g_dense = torch.autograd.grad(dense, (q, k, v), upstream)
    g_varlen = torch.autograd.grad(varlen, (q, k, v), upstream)
    for a, b in zip(g_varlen, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window, softcap", [(None, None), (6, 1.5)])
def test_flex_forward_matches_sdpa_mask(window, softcap):
    """CPU FlexAttention is forward-only in torch; the CUDA backward runs in the gpu tests."""
    batch = pack_examples(make_examples(SPEC), max_tokens=MAX_TOKENS)
    q, k, v = _qkv(batch)
    module = _Module()
    args = (batch.layout, 8**-0.5, 0.0, window, softcap)
    with torch.no_grad():
        dense = attention._sdpa_backend(module, q, k, v, *args)
        flex = attention._flex_backend(module, q, k, v, *args)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_dense_mask_rule():
    """Hand-checked mask of one example [p0 p1 | c0 c1 | r0] and a padding run of 2."""
    batch = pack_examples([([1, 2], [[3, 4], [5]])], max_tokens=5)
    padded = pack_examples([([1, 2], [[3, 4], [5]]), ([6], [[7], [8]])], max_tokens=7)
    mask = attention.dense_prefix_mask(batch.layout)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],  # p0
            [1, 1, 0, 0, 0],  # p1
            [1, 1, 1, 0, 0],  # c0
            [1, 1, 1, 1, 0],  # c1
            [1, 1, 0, 0, 1],  # r0: prompt and itself, not chosen
        ]
    )
    assert torch.equal(mask, expected)
    assert attention.dense_prefix_mask(batch.layout) is attention.dense_prefix_mask(batch.layout)  # cached
    m2 = attention.dense_prefix_mask(padded.layout)
    assert m2.shape == (2, 1, 5, 5) and m2.diagonal(dim1=-2, dim2=-1).all()  # no empty query row
    # with a window of 2 (in positions), r0 (position 2) sees p1 (position 1) but not p0
    assert attention.dense_prefix_mask(batch.layout, 2)[0, 0, 4].tolist() == [False, True, False, False, True]


# ----------------------------------------------------------------------------------------------------
# wiring and errors
# ----------------------------------------------------------------------------------------------------


def test_score_is_exported_and_extras_match_reference():
    assert fastpo.score is score
    examples = make_examples(SPEC[:3])
    batch = pack_examples(examples, max_tokens=MAX_TOKENS)
    model = make_model("llama")
    rows = []
    with torch.no_grad():
        for ex in examples:
            for r in ex.response_ids:
                logits = model(input_ids=torch.tensor([list(ex.prompt_ids) + list(r)]), use_cache=False).logits
                rows.append(logits[0, len(ex.prompt_ids) - 1 : -1])
        logits = torch.cat(rows)
        enable_prefix_sharing(model)
        s = score(model, batch, extras=True)
    p = logits.softmax(-1)
    torch.testing.assert_close(s.entropy, -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.mean_logits, logits.mean(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(s.is_top1, logits.argmax(-1) == batch.targets)
    assert torch.equal(s.token_response, batch.token_response)


def test_score_switches_attention_and_logs(caplog):
    model = make_model("llama")
    batch = pack_examples(make_examples(SPEC[:2]), max_tokens=MAX_TOKENS)
    with caplog.at_level(logging.WARNING, logger="fastpo.attention"), torch.no_grad():
        score(model, batch)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert "switched LlamaForCausalLM from attn_implementation='eager'" in caplog.text


def test_model_without_layout_or_with_padding_mask_raises():
    model = make_model("llama")
    enable_prefix_sharing(model)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="needs the packed layout"):
        model(input_ids=ids, use_cache=False)
    batch = pack_examples([([1], [[2], [3]])], max_tokens=3)
    with pytest.raises(ValueError, match="takes no attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, fastpo_layout=batch.layout)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_score_skips_transformers_packed_sequence_detection(arch, monkeypatch):
    """transformers' packed-sequence detection on position_ids waits on the device; `score` passes the
    layout's mask token so that it never runs (called directly with only the layout, the model does run
    it: the patch is live)."""
    import transformers.masking_utils as masking_utils

    def no_sync(position_ids):
        raise AssertionError("find_packed_sequence_indices ran: a host sync per forward")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", no_sync)
    model = make_model(arch)
    batch = pack_examples(make_examples(SPEC[:2]), max_tokens=MAX_TOKENS)
    s = score(model, batch)
    assert torch.isfinite(s.logp_sum).all()
    with pytest.raises(AssertionError, match="host sync"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
              fastpo_layout=batch.layout)


def test_only_the_layouts_own_mask_token_is_accepted():
    model = make_model("llama")
    batch = pack_examples(make_examples(SPEC[:2]), max_tokens=MAX_TOKENS)
    enable_prefix_sharing(model)
    impostor = torch.empty_like(attention.layout_mask_token(batch.layout))
    with pytest.raises(ValueError, match="takes no attention_mask|builds its mask"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=impostor,
              use_cache=False, fastpo_layout=batch.layout)


def test_resolve_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert resolve_backend("auto", cuda, torch.float32) == "flex"  # flash-attn is fp16/bf16 only
    assert resolve_backend("varlen_emulated", cpu, torch.float32) == "varlen_emulated"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("flash", cpu, torch.float32)


@pytest.mark.skipif(attention.flash_attn_available(), reason="flash-attn is installed")
def test_missing_flash_attn_falls_back_with_one_warning(caplog):
    attention._log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="fastpo.attention"):
        assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "flex"
        assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "flex"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "flash-attn is not installed" in warnings[0].getMessage()
    with pytest.raises(ImportError, match="pip install flash-attn"):
        resolve_backend("flash_varlen", torch.device("cuda"), torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# CUDA: the real kernels against the SDPA-mask path (same dtype) and an fp32 ground truth
# ----------------------------------------------------------------------------------------------------


def _cuda_backends():
    marks = [pytest.mark.gpu]
    flash = pytest.mark.skipif(not attention.flash_attn_available(), reason="needs flash-attn")
    return [
        pytest.param("flash_varlen", marks=[*marks, flash]),
        pytest.param("flex", marks=marks),
        pytest.param("torch_varlen", marks=marks),
    ]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("backend", _cuda_backends())
def test_cuda_backend_matches_sdpa(backend, arch):
    """bf16: err(backend) <= 2 err(sdpa, bf16) + atol against the fp32 SDPA result, on log-prob sums
    and on the gradients of a DPO loss."""
    examples = make_examples(SPEC)
    batch = pack_examples(examples, max_tokens=MAX_TOKENS).to("cuda")
    ref_logp = (torch.randn(batch.num_responses, generator=torch.Generator().manual_seed(1)) - 20.0).cuda()
    base = make_model(arch).cuda()

    def run(dtype, be):
        model = copy.deepcopy(base).to(dtype)
        enable_prefix_sharing(model)
        s = score(model, batch, backend=be)
        dpo_loss(s.logp_sum, batch.response_example, batch.response_rank, ref_logp).backward()
        return s.logp_sum.detach(), {n: g.float() for n, g in grads(model).items()}

    truth_sum, truth_g = run(torch.float32, "sdpa")
    sdpa_sum, sdpa_g = run(torch.bfloat16, "sdpa")
    got_sum, got_g = run(torch.bfloat16, backend)
    assert torch.isfinite(got_sum).all()
    assert (got_sum - truth_sum).abs().max() <= 2 * (sdpa_sum - truth_sum).abs().max() + 1e-2
    for name, g in truth_g.items():
        assert torch.isfinite(got_g[name]).all()
        err, base_err = (got_g[name] - g).abs().max(), (sdpa_g[name] - g).abs().max()
        assert err <= 2 * base_err + 1e-2 * g.abs().max(), name
