"""Every verified family scores exactly; every other one is refused before training, with the reason.

Ground truth: each `[prompt + response]` through the unmodified model (eager attention, its own logits, so
every output transform it applies), `log_softmax`, gathered at the response tokens, fp32. fastpo:
`fastpo.score` on prefix-shared rows packed by `pack_examples`. Compared: per-response log-prob sums and
the gradients of a random linear combination of them w.r.t. the LM head (weight, bias), the input
embedding and an attention projection (tests/tolerances.py, fp32).

Tiny random configs (hidden 32, 2 layers, vocabulary 128). Features are set so they bite: sliding windows of
4 tokens (shorter than most sequences) on one of two layers where the family has layer types, final-logit
soft caps of 1, logit scales far from 1, biased and tied heads where the family has them.
"""

import copy
import dataclasses
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from fastpo import models
from fastpo.attention import score
from fastpo.models import check_model_supported, lm_head_spec
from fastpo.packing import PreferenceExample, pack_examples
from tests.tolerances import assert_parity

hf_logging.set_verbosity_error()

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
# K = 2 and K = 3; a 1-token prompt and 1-token responses; prompts longer than the window of 4
SPEC = [(1, [5, 3]), (9, [2, 7, 4]), (6, [1, 8]), (12, [6, 2, 5])]
MAX_TOKENS = 32  # two or three examples per row

SLIDING = dict(sliding_window=4)
ALTERNATING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
SOFTCAP = dict(final_logit_softcapping=1.0)
GEMMA = dict(head_dim=8, query_pre_attn_scalar=8)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
DEEPSEEK_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1)
# multi-head latent attention with value heads as wide as query/key heads (the supported MLA shape)
MLA = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)

# name -> (model_type, config overrides); every VERIFIED class appears here
EXACT = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", SLIDING),
    "ministral": ("ministral", dict(head_dim=8, **ALTERNATING)),
    "mixtral": ("mixtral", dict(**SLIDING, **MOE)),
    "qwen2": ("qwen2", dict(use_sliding_window=True, **ALTERNATING)),
    "qwen2_moe": ("qwen2_moe", QWEN_MOE),
    "qwen3": ("qwen3", dict(use_sliding_window=True, **ALTERNATING)),
    "qwen3_moe": ("qwen3_moe", dict(use_sliding_window=True, **SLIDING, **QWEN_MOE)),
    "gemma": ("gemma", dict(head_dim=8)),
    "gemma2": ("gemma2", dict(**GEMMA, **ALTERNATING, **SOFTCAP, attn_logit_softcapping=2.0)),
    "gemma3_text": ("gemma3_text", dict(**GEMMA, **ALTERNATING, **SOFTCAP)),
    "vaultgemma": ("vaultgemma", dict(**GEMMA, **ALTERNATING, **SOFTCAP, attn_logit_softcapping=2.0)),
    "nanochat": ("nanochat", SOFTCAP),
    "phi3": ("phi3", SLIDING),
    "phi": ("phi", {}),  # biased head
    "phimoe": ("phimoe", dict(**MOE, lm_head_bias=True)),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "olmo3": ("olmo3", ALTERNATING),
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2)),
    "gpt_neox": ("gpt_neox", {}),
    "gpt2": ("gpt2", {}),  # tied head, learned absolute positions
    "gpt_bigcode": ("gpt_bigcode", {}),
    "gptj": ("gptj", dict(rotary_dim=4)),  # biased head
    "codegen": ("codegen", dict(rotary_dim=4)),  # biased head
    "opt": ("opt", {}),
    "cohere": ("cohere", dict(logit_scale=0.25)),
    "cohere2": ("cohere2", dict(logit_scale=4.0, **ALTERNATING)),
    "granite": ("granite", dict(logits_scaling=4.0)),
    "granitemoe": ("granitemoe", dict(logits_scaling=0.25, **MOE)),
    "granitemoeshared": ("granitemoeshared", dict(logits_scaling=4.0, shared_intermediate_size=16, **MOE)),
    "hyperclovax": ("hyperclovax", dict(logits_scaling=4.0)),
    "minicpm3": ("minicpm3", dict(**MLA, dim_model_base=8)),  # hidden / 4 before the head
    "starcoder2": ("starcoder2", SLIDING),
    "smollm3": ("smollm3", dict(use_sliding_window=True, **ALTERNATING)),
    "ernie4_5": ("ernie4_5", {}),
    "ernie4_5_moe": ("ernie4_5_moe", dict(use_bias=True, moe_num_experts=4, moe_k=2, moe_intermediate_size=16)),
    "glm": ("glm", {}),
    "glm4": ("glm4", {}),
    "glm4_moe": ("glm4_moe", dict(DEEPSEEK_MOE, n_group=1, topk_group=1)),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", dict(head_dim=8)),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", dict(head_dim=8, num_experts=4, moe_topk=2)),
    "exaone4": ("exaone4", ALTERNATING),
    "seed_oss": ("seed_oss", {}),
    "apertus": ("apertus", {}),
    "arcee": ("arcee", {}),
    "helium": ("helium", dict(head_dim=8)),
    "jetmoe": ("jetmoe", MOE),
    "persimmon": ("persimmon", {}),
    "bitnet": ("bitnet", {}),
    "diffllama": ("diffllama", {}),
    "deepseek_v2": ("deepseek_v2", dict(**MLA, **DEEPSEEK_MOE)),
    "deepseek_v3": ("deepseek_v3", dict(**MLA, **DEEPSEEK_MOE, n_group=1, topk_group=1)),
    # real MLA checkpoints: value heads narrower than query/key heads (V padded inside the attention function)
    "deepseek_v3-mla": ("deepseek_v3", dict(MLA, v_head_dim=4, **DEEPSEEK_MOE, n_group=1, topk_group=1)),
    "minicpm3-mla": ("minicpm3", dict(MLA, v_head_dim=4, dim_model_base=8)),
}

# name -> (model_type, config overrides, a fragment of the expected reason)
REFUSED = {
    "qwen2_moe-window": ("qwen2_moe", dict(QWEN_MOE, use_sliding_window=True, max_window_layers=2, sliding_window=4),
                         "does not pass to the attention function"),
    "phimoe-window": ("phimoe", dict(**MOE, **SLIDING), "does not pass to the attention function"),
    "olmoe-window": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, **SLIDING), "does not pass to the attention"),
    "gemma3-bidirectional": ("gemma3_text", dict(GEMMA, use_bidirectional_attention=True), "bidirectional"),
    "phi3-longrope": ("phi3", dict(rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 4, long_factor=[4.0] * 4,
        original_max_position_embeddings=16), original_max_position_embeddings=16, max_position_embeddings=64),
        "no max_length was given"),
    "falcon": ("falcon", {}, "does not go through transformers' attention interface"),
    "bloom": ("bloom", dict(n_head=4), "does not go through transformers' attention interface"),
    "gpt_neo": ("gpt_neo", dict(attention_types=[[["global", "local"], 1]]), "attention interface"),
    "stablelm": ("stablelm", {}, "do not forward keyword arguments"),
    "nemotron": ("nemotron", {}, "do not forward keyword arguments"),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, **ALTERNATING), "sinks"),
    "lfm2": ("lfm2", dict(num_hidden_layers=2, full_attn_idxs=[1]), "recurrent, convolutional"),
    "jamba": ("jamba", dict(num_experts=2, expert_layer_period=2, attn_layer_period=2, attn_layer_offset=1),
              "recurrent, convolutional"),
    "qwen3_next": ("qwen3_next", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                                      linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                                      linear_value_head_dim=8), "recurrent, convolutional"),
    "xglm": ("xglm", dict(d_model=32, ffn_dim=64, num_layers=2), "_supports_attention_backend"),
    "solar_open": ("solar_open", dict(QWEN_MOE, n_routed_experts=4, n_group=1, topk_group=1), "not verified"),
}


def make_examples(seed=0):
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    return [PreferenceExample(toks(p), [toks(r) for r in rs]) for p, rs in SPEC]


def make_model(model_type, overrides):
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()


ATTENTION_PROJECTIONS = tuple(f"{name}.weight" for name in ("q_proj", "qkv_proj", "query_key_value", "c_attn",
                                                               "q_a_proj", "kv_proj"))


def probe_params(model):
    """LM head (weight, bias), input embedding and the first layer's query (or fused qkv) projection."""
    head = model.get_output_embeddings()
    attention = next(p for n, p in model.named_parameters() if n.endswith(ATTENTION_PROJECTIONS))
    params = [head.weight, head.bias, model.get_input_embeddings().weight, attention]
    unique = {id(p): p for p in params if p is not None}
    return list(unique.values())


def separate_sums(model, examples):
    """[R] log-prob sums from the model's own forward of each [prompt + response]."""
    sums = []
    for ex in examples:
        P = len(ex.prompt_ids)
        for r in ex.response_ids:
            logits = model(input_ids=torch.tensor([[*ex.prompt_ids, *r]]), use_cache=False).logits.float()
            sums.append(logits[0, P - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).sum())
    return torch.stack(sums)


def sums_and_grads(sums, params):
    weights = torch.randn(sums.shape, generator=torch.Generator().manual_seed(1))
    return sums.detach(), torch.autograd.grad((weights * sums).sum(), params)


def assert_scores_match(model, examples, batch):
    """Separate forwards first (the stock attention), then fastpo (switches the model to prefix sharing).
    Returns the separate forwards' sums."""
    params = probe_params(model)
    want, want_grads = sums_and_grads(separate_sums(model, examples), params)
    got, got_grads = sums_and_grads(score(model, batch).logp_sum, params)
    assert_parity("logp_sum", got, want, dtype=torch.float32)
    for i, (g, g_want) in enumerate(zip(got_grads, want_grads)):
        assert_parity(f"grad of probe parameter {i} {tuple(g.shape)}", g, g_want, dtype=torch.float32)
    return want


@pytest.mark.parametrize("name", list(EXACT))
def test_family_matches_separate_forwards(name):
    model = make_model(*EXACT[name])
    check_model_supported(model)
    examples = make_examples()
    batch = pack_examples(examples, max_tokens=MAX_TOKENS)
    assert batch.shape[0] < len(examples) and batch.truncation.num_truncated_examples == 0
    want = assert_scores_match(model, examples, batch)
    with torch.no_grad():  # the flash-attn varlen layout (K/V gather, cu_seqlens), emulated on CPU
        varlen = score(model, batch, backend="varlen_emulated").logp_sum
    assert_parity("logp_sum (varlen_emulated)", varlen, want, dtype=torch.float32)


def test_matrix_covers_every_verified_family():
    mapping = AutoModelForCausalLM._model_mapping
    covered = {mapping[type(AutoConfig.for_model(model_type))].__name__ for model_type, _ in EXACT.values()}
    assert covered == set(models.VERIFIED)


WINDOWED = [name for name, (_, overrides) in EXACT.items() if "sliding_window" in overrides]


@pytest.mark.parametrize("name", WINDOWED)
def test_window_is_exercised(name):
    """The matrix would not notice an ignored window if the window did not change the stock result."""
    model_type, overrides = EXACT[name]
    with torch.no_grad():
        windowed = separate_sums(make_model(model_type, overrides), make_examples())
        unwindowed = separate_sums(make_model(model_type, {**overrides, "sliding_window": 64}), make_examples())
    assert (windowed - unwindowed).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(REFUSED))
def test_family_is_refused_with_its_reason(name):
    model_type, overrides, reason = REFUSED[name]
    model = make_model(model_type, overrides)
    with pytest.raises(ValueError, match=type(model).__name__) as err:
        check_model_supported(model)
    assert reason in str(err.value) and repr(model.config.model_type) in str(err.value)


@pytest.mark.parametrize("name", ["qwen2_moe-window", "phimoe-window", "olmoe-window", "lfm2"])
def test_refusal_guards_a_real_mismatch(name):
    """Without the check these families run and silently differ from separate forwards."""
    model_type, overrides, _ = REFUSED[name]
    model = make_model(model_type, overrides)
    examples = make_examples()
    batch = pack_examples(examples, max_tokens=MAX_TOKENS)
    with torch.no_grad():
        want = separate_sums(model, examples)
        family = models.VERIFIED.get(type(model).__name__, models.Family())
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(models.VERIFIED, type(model).__name__, family)
            got = score(model, batch).logp_sum
    assert (got - want).abs().max() > 1e-2


def test_attention_refuses_arguments_it_cannot_apply():
    """Second line of defence behind the allowlist: GPT-OSS passes its attention sinks (`s_aux`) to the
    attention function, which refuses them instead of silently ignoring them."""
    model_type, overrides, _ = REFUSED["gpt_oss"]
    model = make_model(model_type, overrides)
    batch = pack_examples(make_examples(), max_tokens=MAX_TOKENS)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(NotImplementedError, match=r"\['s_aux'\]"):
        mp.setitem(models.VERIFIED, type(model).__name__, models.Family())
        score(model, batch)


@pytest.mark.parametrize("name", ["stablelm", "nemotron"])
def test_refusal_guards_a_crash(name):
    model_type, overrides, _ = REFUSED[name]
    model = make_model(model_type, overrides)
    batch = pack_examples(make_examples(), max_tokens=MAX_TOKENS)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(ValueError, match="needs the packed layout"):
        mp.setitem(models.VERIFIED, type(model).__name__, models.Family())
        score(model, batch)


def test_score_refuses_an_unverified_head():
    """`fastpo.score` itself refuses a family whose output transform is unknown, before any forward."""
    model_type, overrides, _ = REFUSED["gpt_oss"]
    with pytest.raises(ValueError, match="GptOssForCausalLM.*sinks"):
        score(make_model(model_type, overrides), pack_examples(make_examples(), max_tokens=MAX_TOKENS))


# ----------------------------------------------------------------------------------------------------
# the head transforms: each is exercised by its config and is what makes the match
# ----------------------------------------------------------------------------------------------------

# name -> (temperature, softcap) of its head spec, from the config in EXACT
TRANSFORMS = {
    "cohere": (4.0, None),  # logits * logit_scale (0.25)
    "cohere2": (0.25, None),  # logits * logit_scale (4)
    "granite": (4.0, None),  # logits / logits_scaling (4)
    "granitemoe": (0.25, None),  # logits / logits_scaling (0.25)
    "hyperclovax": (0.25, None),  # logits * logits_scaling (4)
    "minicpm3": (4.0, None),  # hidden / (hidden_size / dim_model_base) before the head
    "gemma2": (1.0, 1.0),  # final_logit_softcapping
    "gemma3_text": (1.0, 1.0),
    "vaultgemma": (1.0, 1.0),
    "nanochat": (1.0, 1.0),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_head_spec_expresses_the_family_transform(name):
    model = make_model(*EXACT[name])
    spec = lm_head_spec(model)
    head = model.get_output_embeddings()
    assert spec.weight is head.weight and spec.bias is head.bias
    assert (spec.temperature, spec.softcap) == TRANSFORMS[name]


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_dropping_the_transform_breaks_equivalence(name, monkeypatch):
    """The matrix can fail: a spec that ignores the family's scale or cap gives different log-probs."""
    model = make_model(*EXACT[name])
    examples = make_examples()
    with torch.no_grad():
        want = separate_sums(model, examples)
        monkeypatch.setattr(models, "lm_head_spec", lambda m: dataclasses.replace(lm_head_spec(m), temperature=1.0,
                                                                                  softcap=None))
        got = score(model, pack_examples(examples, max_tokens=MAX_TOKENS)).logp_sum
    assert (got - want).abs().max() > 1e-2


@pytest.mark.parametrize("name, biased", [("phi", True), ("gptj", True), ("ernie4_5_moe", True), ("llama", False)])
def test_biased_heads_are_passed_to_the_op(name, biased):
    model = make_model(*EXACT[name])
    assert (lm_head_spec(model).bias is not None) == biased


@pytest.mark.parametrize("name, tied", [("llama", False), ("llama-tied", True), ("gpt2", True)])
def test_tied_heads_share_the_embedding(name, tied):
    model = make_model(*EXACT[name])
    assert (lm_head_spec(model).weight is model.get_input_embeddings().weight) == tied


# ----------------------------------------------------------------------------------------------------
# classes, heads and configs that change what was verified
# ----------------------------------------------------------------------------------------------------


class _CustomLlama(LlamaForCausalLM):
    pass


def test_custom_subclass_is_refused():
    model = make_model("llama", {})
    model.__class__ = _CustomLlama
    with pytest.raises(ValueError, match="_CustomLlama .* not one of transformers' own model classes"):
        check_model_supported(model)


def test_torch_wrapper_class_is_accepted():
    """FSDP2 swaps the class for a subclass defined in torch; the verified class is found behind it."""
    model = make_model("llama", {})
    model.__class__ = type("FSDPLlamaForCausalLM", (LlamaForCausalLM,), {"__module__": "torch.distributed.fsdp"})
    check_model_supported(model)


class _QuantizedLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x)


def test_non_linear_head_is_refused():
    model = make_model("llama", {})
    old = model.lm_head
    model.lm_head = _QuantizedLinear(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match="_QuantizedLinear, not a plain torch.nn.Linear"):
        lm_head_spec(model)


@pytest.mark.parametrize("value", [0.0, -0.5, float("inf")])
def test_non_positive_logit_scale_is_refused(value):
    model = make_model(*EXACT["cohere"])
    model.logit_scale = value
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        lm_head_spec(model)


def test_length_dependent_rope_needs_max_length_within_its_base_range():
    """Phi-3 longrope switches all positions to its long factors once the batch's longest sequence passes
    original_max_position_embeddings (16 here): a packed row of a long and a short example differs from
    their separate forwards, so the check needs max_length <= 16."""
    model_type, overrides, _ = REFUSED["phi3-longrope"]
    model = make_model(model_type, overrides)
    check_model_supported(model, max_length=16)
    with pytest.raises(ValueError, match="max_length=17 .*pass max_length <= 16"):
        check_model_supported(model, max_length=17)
    examples = make_examples()  # the longest sequence has 23 tokens, the shortest 6
    with torch.no_grad():
        want = separate_sums(model, examples)
        got = score(copy.deepcopy(model), pack_examples(examples, max_tokens=64)).logp_sum
    assert (got - want).abs().max() > 1e-2
    short = [ex for ex in examples if len(ex.prompt_ids) + max(map(len, ex.response_ids)) <= 16]
    assert_scores_match(model, short, pack_examples(short, max_tokens=64))


def test_window_the_family_does_not_pass_is_allowed_where_it_never_bites():
    """Phi-MoE applies its window in the mask only: exact while no sequence is longer than the window."""
    model_type, overrides, _ = REFUSED["phimoe-window"]
    model = make_model(model_type, overrides)
    check_model_supported(model, max_length=4)
    with pytest.raises(ValueError, match="pass a max_length no longer than the window"):
        check_model_supported(model, max_length=5)
    examples = [PreferenceExample([5, 6], [[7, 8], [9]]), PreferenceExample([10], [[11, 12, 13], [14, 15]])]
    assert_scores_match(model, examples, pack_examples(examples, max_tokens=MAX_TOKENS))


def test_peft_lora_model_matches_separate_forwards():
    """LoRA adapters on the attention projections (the trainer's LoRA path): checked through the wrapper."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(make_model("llama", {}), config)
    check_model_supported(model)
    examples = make_examples()
    with torch.no_grad():
        want = separate_sums(model, examples)
        got = score(model, pack_examples(examples, max_tokens=MAX_TOKENS)).logp_sum
    assert_parity("logp_sum", got, want, dtype=torch.float32)


def test_lora_on_the_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("llama", {}), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="LM head is a peft.*Linear, not a plain torch.nn.Linear"):
        check_model_supported(model)
