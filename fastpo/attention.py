"""Prefix-shared attention for Hugging Face decoders, and `score`: packed batch -> per-response log-probs.

Importing this module registers the transformers attention implementation `"fastpo_prefix"` (and a
mask builder under the same key). A model switched to it (`enable_prefix_sharing(model)`, or
`attn_implementation="fastpo_prefix"` at load time) computes, for a `fastpo.packing.PackedBatch`, exactly
what separate `[prompt + response]` forwards compute: each response attends to its prompt and causally to
itself, never to a sibling response or another example. The mask comes from the batch's
`AttentionLayout`, passed to the decoder as the extra keyword `fastpo_layout` (transformers forwards
unknown keywords unchanged to every attention call; verified for Llama, Qwen2, Mistral and Gemma2 in
transformers 5.x by the equivalence tests).

Backends (`backend=` of `score`; "auto" picks the first that applies and logs the choice once):

  flash_varlen     CUDA, fp16/bf16, flash-attn installed: `flash_attn_varlen_func` over the 2-segment
                   layout q [p||y_1] [y_2] .. [y_K] against gathered k/v [p||y_1] [p||y_2] .. [p||y_K]
                   (bottom-right causal alignment, flash-attn >= 2.1). Minimal attention FLOPs.
  flex             CUDA otherwise: FlexAttention with a `BlockMask` built from the layout (compiled).
                   On CPU forward only (torch has no CPU FlexAttention backward).
  sdpa             any device (the CPU choice): SDPA with a [B, 1, L, L] bool mask built once per
                   forward; with attention-logit softcapping (Gemma-2) the same mask in an eager
                   matmul/softmax path, since SDPA cannot softcap.
  torch_varlen     explicit only: `torch.nn.attention.varlen.varlen_attn` (CUDA) on the same 2-segment
                   layout; no softcap, no dropout.
  varlen_emulated  explicit only: the varlen 2-segment kernel emulated per segment with SDPA on any
                   device; tests the gather index and cu_seqlens on CPU. Slow (a loop over segments).

Sliding windows are measured in position ids (a response token j sees prompt token i iff
P + j - i < window), as in separate forwards.

Shape legend: B rows, L row length, Hq query heads, Hkv key/value heads, D head dim, M completion tokens,
R responses, S varlen segments, T gathered keys.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from fastpo.ops import token_stats
from fastpo.packing import AttentionLayout, PackedBatch

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "fastpo_prefix"
LAYOUT_KWARG = "fastpo_layout"
BACKEND_KWARG = "fastpo_backend"
MASK_TOKEN = "hf_mask_token"
BACKENDS = ("auto", "flash_varlen", "flex", "sdpa", "torch_varlen", "varlen_emulated")
UNSUPPORTED_KWARGS = ("s_aux", "sinks", "position_bias", "indices", "block_indices")
"""Attention arguments some families pass (attention sinks, learned biases, sparse indices) that the
prefix-shared attention does not apply: refused rather than silently ignored."""


# ----------------------------------------------------------------------------------------------------
# masks built from the layout (cached on the layout: one build per forward, shared by all layers)
# ----------------------------------------------------------------------------------------------------


def _allowed(doc_q, doc_k, br_q, br_k, pos_q, pos_k, q_idx, k_idx, window):
    """The prefix-sharing rule on broadcastable index tensors (used by the dense and the flex mask)."""
    ok = (q_idx >= k_idx) & (doc_q == doc_k) & ((br_k == 0) | (br_k == br_q))
    if window is not None:
        ok = ok & (pos_q - pos_k < window)
    return ok


def dense_prefix_mask(layout: AttentionLayout, sliding_window: int | None = None) -> torch.Tensor:
    """`[B, 1, L, L]` bool mask, True = attend. Every query row keeps at least its own key (no NaN)."""
    key = ("dense", sliding_window)
    if key not in layout.cache:
        doc, br, pos = layout.doc, layout.branch, layout.position_ids
        i = torch.arange(doc.shape[1], device=doc.device)
        ok = _allowed(
            doc[:, :, None], doc[:, None, :], br[:, :, None], br[:, None, :],
            pos[:, :, None], pos[:, None, :], i[:, None], i[None, :], sliding_window,
        )  # fmt: skip
        layout.cache[key] = ok[:, None]
    return layout.cache[key]


def flex_block_mask(layout: AttentionLayout, sliding_window: int | None = None):
    """FlexAttention `BlockMask` of the same rule (compiled mask construction on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("flex", sliding_window)
    if key not in layout.cache:
        doc, br, pos = layout.doc, layout.branch, layout.position_ids

        def mask_mod(b, h, q, kv):
            return _allowed(doc[b, q], doc[b, kv], br[b, q], br[b, kv], pos[b, q], pos[b, kv], q, kv, sliding_window)

        B, L = doc.shape
        layout.cache[key] = create_block_mask(
            mask_mod, B, None, L, L, device=doc.device, _compile=doc.device.type == "cuda"
        )
    return layout.cache[key]


# ----------------------------------------------------------------------------------------------------
# backends: each maps (query [B, Hq, L, D], key/value [B, Hkv, L, D]) -> out [B, L, Hq, D]
# ----------------------------------------------------------------------------------------------------


def _attend_dense(q, k, v, mask, scaling, dropout, softcap, training):
    """Masked attention on [*, H, Lq, D] tensors with a bool mask; eager matmul when softcapping."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=q.shape[-3] != k.shape[-3]
        )
    n_rep = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(n_rep, dim=-3), v.repeat_interleave(n_rep, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v)


def _sdpa_backend(module, query, key, value, layout, scaling, dropout, window, softcap):
    mask = dense_prefix_mask(layout, window)
    out = _attend_dense(query, key, value, mask, scaling, dropout, softcap, module.training)
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _softcap_score_mod(softcap):
    """FlexAttention score_mod applying `softcap * tanh(score / softcap)` after scaling (as eager does)."""
    if softcap is None:
        return None

    def score_mod(score, b, h, q, kv):
        return softcap * torch.tanh(score / softcap)

    return score_mod


def _flex_backend(module, query, key, value, layout, scaling, dropout, window, softcap):
    from torch.nn.attention.flex_attention import flex_attention

    if dropout > 0:
        raise NotImplementedError("the flex backend has no attention dropout; set attention_dropout=0")
    fn = _compiled_flex() if query.is_cuda else flex_attention
    out = fn(
        query, key, value, score_mod=_softcap_score_mod(softcap), block_mask=flex_block_mask(layout, window),
        scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2)


def _varlen_inputs(query, key, value, layout):
    """Flatten to varlen form: q [B*L, Hq, D]; k, v gathered to [T, Hkv, D] (2-segment layout)."""
    B, Hq, L, D = query.shape
    q = query.transpose(1, 2).reshape(B * L, Hq, D)
    k = key.transpose(1, 2).reshape(B * L, -1, D).index_select(0, layout.kv_index)
    v = value.transpose(1, 2).reshape(B * L, -1, D).index_select(0, layout.kv_index)
    return q, k, v


def _flash_varlen_backend(module, query, key, value, layout, scaling, dropout, window, softcap):
    from flash_attn import flash_attn_varlen_func

    B, Hq, L, D = query.shape
    q, k, v = _varlen_inputs(query, key, value, layout)
    # NOTE: causal=True is bottom-right aligned when seqlen_q < seqlen_k (flash-attn >= 2.1), which is
    # what lets y_k see all of its prompt. window_size=(w - 1, 0) is `q_pos - k_pos < w` as in HF.
    out = flash_attn_varlen_func(
        q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k,
        dropout_p=dropout, softmax_scale=scaling, causal=True,
        window_size=(-1, -1) if window is None else (window - 1, 0),
        softcap=0.0 if softcap is None else softcap,
    )  # fmt: skip
    return out.view(B, L, Hq, D)


def _torch_varlen_backend(module, query, key, value, layout, scaling, dropout, window, softcap):
    from torch.nn.attention.varlen import varlen_attn

    if dropout > 0 or softcap is not None:
        raise NotImplementedError("the torch_varlen backend supports neither attention dropout nor softcapping")
    B, Hq, L, D = query.shape
    q, k, v = _varlen_inputs(query, key, value, layout)
    out = varlen_attn(
        q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k, layout.max_seqlen_q, layout.max_seqlen_k,
        scale=scaling, window_size=(-1 if window is None else window - 1, 0), enable_gqa=Hq != k.shape[1],
    )  # fmt: skip
    return out.view(B, L, Hq, D)


def varlen_emulated(
    q, k, v, cu_seqlens_q, cu_seqlens_k, *, scaling, dropout=0.0, window=None, softcap=None, training=False
):
    """Reference for `flash_attn_varlen_func(..., causal=True)`: q [Tq, Hq, D], k/v [Tk, Hkv, D].

    Segment s: q rows cu_seqlens_q[s] .. [s+1] against k rows cu_seqlens_k[s] .. [s+1]; bottom-right
    causal alignment (query i sees key j iff j <= i + lk - lq) and `(i + lk - lq) - j < window`.
    """
    outs = []
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for q0, q1, k0, k1 in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        lq, lk = q1 - q0, k1 - k0
        i = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        j = torch.arange(lk, device=q.device)[None, :]
        mask = (j <= i) if window is None else (j <= i) & (i - j < window)
        qs, ks, vs = (x.transpose(0, 1) for x in (q[q0:q1], k[k0:k1], v[k0:k1]))
        outs.append(_attend_dense(qs, ks, vs, mask, scaling, dropout, softcap, training).transpose(0, 1))
    return torch.cat(outs)


def _varlen_emulated_backend(module, query, key, value, layout, scaling, dropout, window, softcap):
    B, Hq, L, D = query.shape
    q, k, v = _varlen_inputs(query, key, value, layout)
    out = varlen_emulated(
        q, k, v, layout.cu_seqlens_q, layout.cu_seqlens_k,
        scaling=scaling, dropout=dropout, window=window, softcap=softcap, training=module.training,
    )  # fmt: skip
    return out.view(B, L, Hq, D)


_BACKEND_FNS = {
    "flash_varlen": _flash_varlen_backend,
    "flex": _flex_backend,
    "sdpa": _sdpa_backend,
    "torch_varlen": _torch_varlen_backend,
    "varlen_emulated": _varlen_emulated_backend,
}


@functools.cache
def flash_attn_available() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except ImportError as exc:
        logger.warning("flash_attn is installed but does not import (%s); not using it", exc)
        return False
    return True


@functools.cache
def _log_choice(backend: str, device_type: str, dtype: torch.dtype, why: str) -> None:
    level = logging.WARNING if why.startswith("fallback") else logging.INFO
    logger.log(level, "fastpo prefix-shared attention: backend %r on %s/%s (%s)", backend, device_type, dtype, why)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for `backend` on `device` / `dtype`; "auto" logs its choice once."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "flash_varlen" and not flash_attn_available():
        raise ImportError("backend='flash_varlen' needs flash-attn: pip install flash-attn --no-build-isolation")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        choice, why = "sdpa", "not CUDA"
    elif dtype not in (torch.float16, torch.bfloat16):
        choice, why = "flex", f"fallback: flash-attn needs fp16/bf16, got {dtype}"
    elif flash_attn_available():
        choice, why = "flash_varlen", "flash-attn installed"
    else:
        choice, why = "flex", "fallback: flash-attn is not installed"
    _log_choice(choice, device.type, dtype, why)
    return choice


# ----------------------------------------------------------------------------------------------------
# the transformers attention function and its mask builder
# ----------------------------------------------------------------------------------------------------


def prefix_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs
):
    """transformers attention function (`"fastpo_prefix"`): query [B, Hq, L, D], key/value [B, Hkv, L, D]
    (RoPE applied) -> (out [B, L, Hq, D], None). The mask comes from `kwargs["fastpo_layout"]`."""
    layout = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} needs the packed layout: call fastpo.score(model, "
            f"batch), or pass {LAYOUT_KWARG}=batch.layout to the model; for ordinary inputs switch back "
            "with model.set_attn_implementation('sdpa')"
        )
    if attention_mask is not None and attention_mask is not layout.cache.get(MASK_TOKEN):
        raise ValueError(
            f"{ATTN_IMPLEMENTATION!r} builds its mask from {LAYOUT_KWARG}; pass attention_mask=None "
            "(padding is part of the packed layout)"
        )
    if query.shape[2] != layout.doc.shape[1] or query.shape[0] != layout.doc.shape[0]:
        raise ValueError(f"query {tuple(query.shape)} does not match the layout's [B, L] = {tuple(layout.doc.shape)}")
    unapplied = [name for name in UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if unapplied:
        raise NotImplementedError(f"{type(module).__name__} passes {unapplied} to its attention, which the "
                                  f"prefix-shared attention cannot apply; this model cannot be scored exactly")
    backend = resolve_backend(kwargs.get(BACKEND_KWARG) or "auto", query.device, query.dtype)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    # MLA (DeepSeek-V2/V3, MiniCPM3): value heads narrower than query/key heads. Zero columns of V give zero
    # output columns, so padding V to D and slicing the output back is exact for every backend.
    v_dim = value.shape[-1]
    if v_dim < query.shape[-1]:
        value = F.pad(value, (0, query.shape[-1] - v_dim))
    out = _BACKEND_FNS[backend](module, query, key, value, layout, scaling, dropout, sliding_window, softcap)
    return out[..., :v_dim], None


def prefix_mask_builder(*args, attention_mask=None, **kwargs):
    """Mask builder registered with the attention function: the mask is built inside the attention
    function from the layout, so this returns None (and refuses a padding mask it would ignore).

    NOTE: before calling a registered builder, transformers 5.x runs its packed-sequence detection on
    `position_ids` (`masking_utils.find_packed_sequence_indices`), which waits on the device once per
    mask type and forward. `score` avoids it with `layout_mask_token`; a user calling the model directly
    with only the layout gets the builder, the sync, and this check of the padding mask."""
    if attention_mask is not None:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION!r} takes no attention_mask: padding and sequence boundaries come from "
            f"the packed layout ({LAYOUT_KWARG})"
        )
    return None


def layout_mask_token(layout: AttentionLayout) -> torch.Tensor:
    """An empty `[B, 1, 0, 0]` tensor that stands for the layout's mask, passed as `attention_mask`.

    transformers returns a 4-D `attention_mask` unchanged, skipping its mask preprocessing and with it the
    packed-sequence detection that synchronizes with the device; `prefix_attention` accepts this tensor
    (by identity: it is cached on the layout) and builds the real mask from the layout."""
    if MASK_TOKEN not in layout.cache:
        layout.cache[MASK_TOKEN] = torch.empty((layout.doc.shape[0], 1, 0, 0), dtype=torch.bool,
                                               device=layout.doc.device)
    return layout.cache[MASK_TOKEN]


AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_mask_builder)


def enable_prefix_sharing(model) -> str:
    """Switch `model` to the prefix-shared attention; return the previous implementation's name
    (`model.set_attn_implementation(previous)` restores it, e.g. for generation)."""
    previous = model.config._attn_implementation
    if previous != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return previous


# ----------------------------------------------------------------------------------------------------
# score: decoder body + fused head on the completion rows only
# ----------------------------------------------------------------------------------------------------


class ResponseScores(NamedTuple):
    """Per-response statistics of one packed batch (R responses, M completion tokens).

    logp_sum        [R] fp32  sum of the response's token log-probs (differentiable)
    num_tokens      [R] int64 completion tokens of the response
    token_logp      [M] fp32  per-token log-probs (differentiable), ordered by response
    token_response  [M] int64 response of each token
    entropy, log_sum_sq_probs, mean_logits, is_top1: [M] per-token extras (`fastpo.ops.TokenStats`)
    with `extras=True`, else None; no gradient.
    """

    logp_sum: torch.Tensor
    num_tokens: torch.Tensor
    token_logp: torch.Tensor
    token_response: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def _head(model):
    """The LM head in the op's terms (`fastpo.models.HeadSpec`: weight, bias, the family's logit temperature
    and final-logit soft cap), so the op applies what the model's own forward applies to its logits. Raises
    ValueError for a family whose output transform is not verified."""
    from fastpo.models import lm_head_spec

    return lm_head_spec(model)


def completion_hidden(model, batch: PackedBatch, *, backend: str = "auto") -> torch.Tensor:
    """Run the decoder body of `model` on a packed batch: `[M, H]` hidden states of the rows that predict its
    completion tokens (`hidden[src_index]`: the last prompt row once per response, so its gradient is the sum
    over them). Prompt and padding rows never reach the head.

    Calls the decoder with `use_cache=False`, explicit `position_ids` and `layout_mask_token` (no device
    synchronization in transformers' mask preparation); switches the model to the prefix-shared attention if
    needed (logged, see `enable_prefix_sharing`).
    """
    previous = enable_prefix_sharing(model)
    if previous != ATTN_IMPLEMENTATION:
        logger.warning(
            "fastpo switched %s from attn_implementation=%r to %r; call "
            "model.set_attn_implementation(%r) to restore it",
            type(model).__name__, previous, ATTN_IMPLEMENTATION, previous,
        )  # fmt: skip
    out = model.get_decoder()(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=layout_mask_token(batch.layout),
        use_cache=False,
        **{LAYOUT_KWARG: batch.layout, BACKEND_KWARG: backend},
    )
    return out.last_hidden_state.flatten(0, 1).index_select(0, batch.src_index)


def score(
    model,
    batch: PackedBatch,
    *,
    backend: str = "auto",
    impl: str = "auto",
    extras: bool = False,
    temperature: float = 1.0,
) -> ResponseScores:
    """Run the decoder body of `model` on a packed batch and the fused head on its completion rows.

    model    a transformers causal LM (`get_decoder()` and `get_output_embeddings()`).
    batch    `fastpo.packing.PackedBatch` on the model's device (`batch.to(device)`).
    backend  attention backend (module docstring); impl: `fastpo.ops.token_stats` implementation.

    `completion_hidden`, then the head with the family's output transform (`fastpo.models.lm_head_spec`) and
    per-response fp32 sums (`fastpo.losses.stats.segment_sum`). Same path for the policy (with gradient) and a
    reference model (under `torch.no_grad()`). Training goes through `fastpo.trainer.Scorer`, which feeds the
    same hidden states to `fastpo.losses.fused_linear_preference_loss`.
    """
    from fastpo.losses.stats import segment_sum

    head = _head(model)
    hidden_MH = completion_hidden(model, batch, backend=backend)
    stats = token_stats(
        hidden_MH, head.weight, batch.targets, bias=head.bias, ignore_index=batch.ignore_index,
        temperature=temperature * head.temperature, softcap=head.softcap, extras=extras, impl=impl,
    )  # fmt: skip
    logp_sum = segment_sum(stats.logp, batch.token_response, batch.num_responses)
    return ResponseScores(
        logp_sum, batch.response_num_tokens, stats.logp, batch.token_response,
        stats.entropy, stats.log_sum_sq_probs, stats.mean_logits, stats.is_top1,
    )  # fmt: skip
