"""Which Hugging Face causal LMs fastpo scores exactly, and their LM head in the fused op's terms.

Prefix-shared scoring (`fastpo.score`) replaces two things a model does on its own: its attention mask
(the `"fastpo_prefix"` attention function builds the prefix-sharing mask from the packed layout) and its
output layer (`fastpo.ops.token_stats` computes log-probs from the decoder's hidden states and the LM-head
weight). Both replacements are exact only if the family routes every token-mixing step through
transformers' attention interface with the layout keyword forwarded to it, passes everything that shapes
attention (sliding windows, soft caps) as arguments fastpo's attention applies, and does nothing to the
LM head's output that the op cannot express: z = c tanh(a / c) / temperature with a = h W^T + b.

Allowlist, not structure. A family is scored only if it is in `VERIFIED`, i.e. `tests/test_families.py`
checks, on a tiny random model of it, that packed log-prob sums and their gradients equal separate
`[prompt + response]` forwards. Structural checks cannot prove this: transformers' own
`_supports_attention_backend` flag is True for models that drop the forwarded keywords in a decoder layer
(Nemotron) or pass attention sinks fastpo would ignore (GPT-OSS), and a window can live in the mask alone
(Qwen2-MoE, Phi-MoE) where no attention argument shows it. Everything else is refused with the
reason found (`KNOWN_UNSUPPORTED`, then structural hints: non-attention token-mixing layers, no attention
interface), or as unverified. Verified families still pass per-config rules for features whose exactness
depends on the config (windows, RoPE scaled by sequence length, bidirectional attention).

Verification is tied to the classes in `transformers.models`: remote code and subclasses that are not
transformers' own are refused, since their forward is not the one that was checked. To add a family, add
it to `VERIFIED` and to the matrix in `tests/test_families.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------------
# the LM head in the op's terms
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeadSpec:
    """The LM head as `fastpo.ops.token_stats` sees it: z = c tanh(a / c) / temperature, a = h W^T + b.

    weight       [V, H] the head's (possibly tied) weight, read when the spec is built: build it where the
                 weight is used (under FSDP, inside the root module's forward, where it is unsharded)
    bias         [V] or None
    temperature  the op's divisor: a family that multiplies its logits by s has temperature 1 / s
    softcap      c of a final-logit soft cap (Gemma 2/3), or None
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    temperature: float = 1.0
    softcap: float | None = None


def _identity(model, config):
    return 1.0, None


def _final_logit_softcap(model, config):
    """Gemma 2/3, VaultGemma, NanoChat: logits = c tanh(a / c) when `final_logit_softcapping` is set."""
    return 1.0, config.final_logit_softcapping


def _times_logit_scale(model, config):
    """Cohere, Cohere2: logits = a * model.logit_scale (the attribute the forward reads, set from the config)."""
    return 1.0 / _positive("logit_scale", model.logit_scale), None


def _over_logits_scaling(model, config):
    """Granite, GraniteMoE, GraniteMoEShared: logits = a / config.logits_scaling."""
    return _positive("logits_scaling", config.logits_scaling), None


def _times_logits_scaling(model, config):
    """HyperCLOVA X (muP): logits = a * config.logits_scaling."""
    return 1.0 / _positive("logits_scaling", config.logits_scaling), None


def _hidden_over_logits_scaling(model, config):
    """MiniCPM3: the hidden state is divided by config.logits_scaling before a bias-free head, which is
    (h W^T) / s: a temperature of s (with a bias it would be h W^T / s + b, which the op cannot express)."""
    if model.get_output_embeddings().bias is not None:
        raise ValueError(f"{type(model).__name__}: a hidden-state scale before a biased LM head is not expressible")
    return _positive("logits_scaling", config.logits_scaling), None


def _positive(name, value) -> float:
    if isinstance(value, torch.Tensor) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"the LM head's {name} must be a finite number > 0 for the fused head op, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------
# per-config rules: (text config, max_length) -> reason to refuse, or None
# ----------------------------------------------------------------------------------------------------


def _uses_sliding_window(config) -> bool:
    """Whether the stock model windows any layer: a `sliding_attention` layer type, or (families without
    layer types) a truthy `sliding_window` not switched off by `use_sliding_window`."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" in layer_types:
        return True
    if getattr(config, "use_sliding_window", True) is False:
        return False
    return bool(getattr(config, "sliding_window", None))


def _window_not_passed(config, max_length):
    """A window the family does not pass to the attention function (its stock model applies it in the mask
    only, or not at all) is exact only where it never bites: no sequence longer than the window."""
    window = getattr(config, "sliding_window", None)
    if not _uses_sliding_window(config) or (max_length is not None and window and max_length <= window):
        return None
    return (
        f"it has a sliding window (sliding_window={window}) that it does not pass to the attention function (the "
        "stock model applies it in the mask only, or not at all), so prefix-shared attention would not apply it; "
        "set sliding_window=None or use_sliding_window=False, or pass a max_length no longer than the window"
    )


def _rope_types(config) -> set[str]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "rope_type" in params or "type" in params:
        return {params.get("rope_type", params.get("type"))}
    return {p.get("rope_type", p.get("type")) for p in params.values() if isinstance(p, dict)}


def _rope_limit(config) -> int | None:
    """The longest sequence for which length-dependent RoPE keeps its base frequencies, or None when the
    RoPE does not depend on the sequence length. "dynamic" (NTK) grows its frequencies past
    max_position_embeddings and "longrope" switches to long factors past original_max_position_embeddings,
    both from the batch's largest position id: with several sequences in one packed row they would follow the
    longest one, while each separate forward follows its own."""
    types = _rope_types(config)
    if any(t and "dynamic" in t for t in types):
        return config.max_position_embeddings
    if "longrope" in types:
        params = getattr(config, "rope_parameters", None) or {}
        nested = [p for p in params.values() if isinstance(p, dict)]
        limits = [p.get("original_max_position_embeddings") for p in [params, *nested]]
        limits.append(getattr(config, "original_max_position_embeddings", None))
        return min((x for x in limits if x), default=config.max_position_embeddings)
    return None


def _length_dependent_rope(config, max_length):
    limit = _rope_limit(config)
    if limit is None or (max_length is not None and max_length <= limit):
        return None
    got = "no max_length was given" if max_length is None else f"max_length={max_length}"
    return (
        f"its RoPE ({sorted(t for t in _rope_types(config) if t)}) changes with the batch's longest sequence past "
        f"{limit} tokens, so packed sequences would not get the frequencies of their separate forwards; {got} "
        f"(pass max_length <= {limit})"
    )


def _bidirectional(config, max_length):
    if getattr(config, "use_bidirectional_attention", False) or getattr(config, "is_causal", True) is False:
        return "it attends bidirectionally (use_bidirectional_attention), which the causal prefix mask cannot express"
    return None


# ----------------------------------------------------------------------------------------------------
# the verified families
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A verified family. head: (model, text config) -> (temperature, softcap). window: the family passes
    its sliding window to the attention function, consistently with the stock mask (verified with windows
    shorter than the test sequences); otherwise any configured window refuses. rules: extra config rules."""

    head: Callable = _identity
    window: bool = False
    rules: tuple[Callable, ...] = ()


_W = Family(window=True)
_SOFTCAP_W = Family(head=_final_logit_softcap, window=True)
_GRANITE = Family(head=_over_logits_scaling)

VERIFIED: dict[str, Family] = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": _W,
    "MinistralForCausalLM": _W,
    "MixtralForCausalLM": _W,
    "Qwen2ForCausalLM": _W,
    "Qwen2MoeForCausalLM": Family(),  # its window lives in the mask only: refused when configured
    "Qwen3ForCausalLM": _W,
    "Qwen3MoeForCausalLM": _W,
    "GemmaForCausalLM": Family(),
    "Gemma2ForCausalLM": _SOFTCAP_W,
    "Gemma3ForCausalLM": _SOFTCAP_W,
    "VaultGemmaForCausalLM": _SOFTCAP_W,
    "NanoChatForCausalLM": Family(head=_final_logit_softcap),
    "Phi3ForCausalLM": _W,
    "PhiForCausalLM": Family(),  # biased head
    "PhimoeForCausalLM": Family(),  # its window lives in the mask only: refused when configured
    "OlmoForCausalLM": Family(),
    "Olmo2ForCausalLM": Family(),
    "Olmo3ForCausalLM": _W,
    "OlmoeForCausalLM": Family(),  # passes a window its stock mask ignores: refused when configured
    "GPTNeoXForCausalLM": Family(),
    "GPT2LMHeadModel": Family(),
    "GPTBigCodeForCausalLM": Family(),
    "GPTJForCausalLM": Family(),  # biased head
    "CodeGenForCausalLM": Family(),  # biased head
    "OPTForCausalLM": Family(),
    "CohereForCausalLM": Family(head=_times_logit_scale),
    "Cohere2ForCausalLM": Family(head=_times_logit_scale, window=True),
    "GraniteForCausalLM": _GRANITE,
    "GraniteMoeForCausalLM": _GRANITE,
    "GraniteMoeSharedForCausalLM": _GRANITE,
    "HyperCLOVAXForCausalLM": Family(head=_times_logits_scaling),
    "MiniCPM3ForCausalLM": Family(head=_hidden_over_logits_scaling),
    "Starcoder2ForCausalLM": _W,
    "SmolLM3ForCausalLM": _W,
    "Ernie4_5ForCausalLM": Family(),
    "Ernie4_5_MoeForCausalLM": Family(),  # biased head with use_bias
    "GlmForCausalLM": Family(),
    "Glm4ForCausalLM": Family(),
    "Glm4MoeForCausalLM": Family(),
    "HunYuanDenseV1ForCausalLM": Family(),
    "HunYuanMoEV1ForCausalLM": Family(),
    "Exaone4ForCausalLM": _W,
    "SeedOssForCausalLM": Family(),
    "ApertusForCausalLM": Family(),
    "ArceeForCausalLM": Family(),
    "HeliumForCausalLM": Family(),
    "JetMoeForCausalLM": Family(),
    "PersimmonForCausalLM": Family(),
    "BitNetForCausalLM": Family(),
    "DiffLlamaForCausalLM": Family(),
    "DeepseekV2ForCausalLM": Family(),
    "DeepseekV3ForCausalLM": Family(),
}

_COMMON_RULES = (_length_dependent_rope, _bidirectional)

_NO_INTERFACE = (
    "its attention does not go through transformers' attention interface, so the prefix mask would be ignored"
)
_RECURRENT = (
    "it has recurrent, convolutional or linear-attention layers that run over the packed row in order, so a "
    "response would see its sibling responses"
)
_SINKS = "its attention has learned sinks (s_aux), which fastpo's attention function does not apply"
_DROPS_KWARGS = (
    "its decoder layers do not forward keyword arguments to attention, so the packed layout never reaches it "
    "(the forward fails)"
)

KNOWN_UNSUPPORTED: dict[str, str] = {
    "FalconForCausalLM": _NO_INTERFACE + " (and ALiBi variants take positions from the attention mask)",
    "BloomForCausalLM": _NO_INTERFACE + " (ALiBi positions come from the attention mask)",
    "MptForCausalLM": _NO_INTERFACE + " (ALiBi)",
    "GPTNeoForCausalLM": _NO_INTERFACE,
    "StableLmForCausalLM": _DROPS_KWARGS,
    "NemotronForCausalLM": _DROPS_KWARGS,
    "GptOssForCausalLM": _SINKS,
    "FlintForCausalLM": _SINKS,
    "MiMoV2FlashForCausalLM": _SINKS,
    "GraniteSWAForCausalLM": _SINKS,
    "GraniteMoeSWAForCausalLM": _SINKS,
    "DeepseekV4ForCausalLM": _SINKS,
    "Llama4ForCausalLM": "its chunked attention layers are not expressible by the prefix-sharing mask",
    "DeepseekV32ForCausalLM": "its sparse attention selects keys with an indexer that fastpo's attention ignores",
    "GlmMoeDsaForCausalLM": "its sparse attention selects keys with an indexer that fastpo's attention ignores",
    "DogeForCausalLM": "its dynamic-mask attention adds a learned bias to the attention mask the layout replaces",
    "ModernBertDecoderForCausalLM": "its LM head is non-linear (dense, activation, norm, then the decoder)",
    **dict.fromkeys(
        [
            "JambaForCausalLM", "BambaForCausalLM", "FalconH1ForCausalLM", "FalconMambaForCausalLM",
            "GraniteMoeHybridForCausalLM", "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "ZambaForCausalLM",
            "Zamba2ForCausalLM", "NemotronHForCausalLM", "MiniMaxForCausalLM", "KimiLinearForCausalLM",
            "RecurrentGemmaForCausalLM", "OlmoHybridForCausalLM", "Qwen3NextForCausalLM", "Qwen3_5ForCausalLM",
            "Qwen3_5MoeForCausalLM", "MambaForCausalLM", "Mamba2ForCausalLM", "RwkvForCausalLM", "xLSTMForCausalLM",
            "BailingHybridForCausalLM",
        ],
        _RECURRENT,
    ),  # fmt: skip
}


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------


def _unwrap(model):
    """The transformers model under a `torch.compile` or PEFT wrapper (LoRA layers stay in place)."""
    model = getattr(model, "_orig_mod", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _transformers_class(model) -> type:
    """The first class of `model`'s MRO that is transformers' own, skipping torch's wrappers (FSDP2 swaps
    the class for a subclass defined in torch); any other class before it changes code that was verified."""
    for cls in type(model).__mro__:
        module = cls.__module__
        if module.startswith("transformers.models."):
            return cls
        if not module.startswith("torch."):
            raise ValueError(
                f"{type(model).__name__} ({module}) is not one of transformers' own model classes (remote code or a "
                "subclass): fastpo only scores transformers' verified causal LMs exactly (fastpo.models.VERIFIED)"
            )
    raise ValueError(f"{type(model).__name__} is not a transformers model")


def _describe(model, cls) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{cls.__name__} (model_type={model_type!r})"


def _unverified_reason(model, cls) -> str:
    if cls.__name__ in KNOWN_UNSUPPORTED:
        return KNOWN_UNSUPPORTED[cls.__name__]
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or ()
    mixers = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if mixers:
        return f"{_RECURRENT} (layer types {mixers})"
    if not getattr(cls, "_supports_attention_backend", False):
        return (
            "it does not declare transformers' attention interface with keyword arguments forwarded to every layer "
            "(_supports_attention_backend), so the prefix mask may never reach its attention"
        )
    multimodal = cls.__name__.endswith("ForConditionalGeneration")
    hint = "; for text-only training load its *ForCausalLM class" if multimodal else ""
    return (
        "it is not verified: its prefix-shared log-probs have not been checked against separate forwards (add it to "
        f"fastpo.models.VERIFIED with a case in tests/test_families.py){hint}"
    )


def _family(model) -> tuple[type, Family]:
    cls = _transformers_class(model)
    family = VERIFIED.get(cls.__name__)
    if family is None:
        reason = _unverified_reason(model, cls)
        raise ValueError(f"{_describe(model, cls)} cannot be scored exactly with prefix sharing: {reason}")
    return cls, family


def _linear_head(model, cls) -> nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        raise ValueError(
            f"{_describe(model, cls)}: the LM head is a {kind}, not a plain torch.nn.Linear; a quantized, "
            "adapter-wrapped or non-linear head is not expressible by the fused head op"
        )
    if not head.weight.is_floating_point():
        raise ValueError(f"{_describe(model, cls)}: the LM head's weight is {head.weight.dtype}, not floating point")
    return head


def lm_head_spec(model) -> HeadSpec:
    """The LM head of a verified causal LM and what its forward does to the head's output, in the fused op's
    terms. Raises ValueError for an unverified family (its output transform is unknown) or a head the op
    cannot express. Cheap (no device work): `fastpo.score` builds it on every call."""
    model = _unwrap(model)
    cls, family = _family(model)
    head = _linear_head(model, cls)
    temperature, softcap = family.head(model, model.config.get_text_config())
    if softcap is not None:
        softcap = _positive("final_logit_softcapping", softcap)
    return HeadSpec(head.weight, head.bias, temperature, softcap)


def check_model_supported(model, *, max_length: int | None = None) -> None:
    """Raise ValueError, naming the class, model_type and reason, unless fastpo's prefix-shared scoring of
    `model` equals separate `[prompt + response]` forwards. Call before training (cheap: reads classes and
    the config). max_length: the longest prompt + response the run packs; it admits configs that are exact
    only up to a length: RoPE that depends on the sequence length (Phi-3 longrope, dynamic NTK) and a
    window the family does not pass to attention (exact while it never bites)."""
    model = _unwrap(model)
    cls, family = _family(model)
    config = model.config.get_text_config()
    rules = (*_COMMON_RULES, *(() if family.window else (_window_not_passed,)), *family.rules)
    for rule in rules:
        reason = rule(config, max_length)
        if reason is not None:
            raise ValueError(f"{_describe(model, cls)} cannot be scored exactly with prefix sharing: {reason}")
    lm_head_spec(model)
