"""Fused linear preference losses: hidden states + LM-head weight + targets in, loss and metrics out.

Shapes: N head rows, H hidden, V vocabulary, R responses, G groups, K responses per group, n_c rows of a chunk.

Two paths over the same objective code (`objectives.py`) and the same reductions (`stats.py`):

- generic: `fastpo.ops.token_stats` (Triton or chunked torch; logits never stored) gives per-token log-probs;
  the objective runs on per-response sums and autograd carries dL/dlogp_t back into the op, whose backward
  recomputes the logits. Any objective. 8NHV.
- pair-fused: for objectives whose per-group gradient depends on the group only (`LOSSES[n].pair_local`),
  chunks of whole groups are processed once: fp32 logits of the chunk (2 n_c H V), per-response sums,
  the objective and its gradient g = dL/dS for the chunk (autograd on a few scalars), then from the SAME
  logits dz = g (onehot(y) - softmax(z)) / temperature, dH = dz W and dW += dz^T h (2 + 2 n_c H V). 6NHV,
  at the price of an n_c x V fp32 buffer. Backward only scales the stored gradients by grad_output.
  With impl "triton" (CUDA) the row statistics and dz are one Triton pass each over the chunk
  (`fastpo.kernels.logit_rows`), dz is written in the inputs' dtype and dH, dW are cuBLAS GEMMs with fp32
  accumulation; with "torch" they are PyTorch ops in fp32 (the CPU path).

The reference model is forward-only (`token_stats` without gradient, 2NHV) or precomputed (`ref_logps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpo.losses import stats as S
from fastpo.losses.objectives import is_pair_local, loss_names
from fastpo.losses.types import FusedLossOutput, ResponseLayout, SequenceStats
from fastpo.ops import _logits_f32, _resolve_impl, addmm_fp32_, token_logprobs, token_stats

PATHS = ("auto", "generic", "pair_fused")


# ----------------------------------------------------------------------------------------------------
# inputs: rows, layout, reference sums
# ----------------------------------------------------------------------------------------------------


def _rows(hidden, targets):
    if hidden.dim() < 2 or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def _default_layout(targets, unpaired):
    if targets.dim() != 2:
        raise ValueError("targets of shape [N] need an explicit layout (ResponseLayout); [2B, T] batches "
                         "default to chosen rows first, then rejected rows")
    build = ResponseLayout.unpaired if unpaired else ResponseLayout.chosen_rejected
    return build(targets.shape[0], targets.shape[1])


def _check_layout(layout, num_rows, device):
    if layout.token_response.numel() != num_rows:
        raise ValueError(f"layout.token_response has {layout.token_response.numel()} rows, hidden has {num_rows}")
    return layout.to(device)


def _check_nonempty(num_tokens_R, allow_empty):
    """Every response needs at least one completion token (checked on CPU data; CUDA asserts on device)."""
    if allow_empty:
        return
    empty = num_tokens_R == 0
    if num_tokens_R.is_cuda:
        torch._assert_async(~empty.any(), "a response has no completion tokens (all targets == ignore_index)")
    elif empty.any():
        ids = empty.nonzero().flatten().tolist()
        raise ValueError(f"responses {ids} have no completion tokens (all targets == ignore_index); "
                         "pass allow_empty_completions=True to let them contribute S = 0")


def _reference_sums(ref_hidden, ref_weight, ref_bias, ref_logps, targets_N, layout, weights_N, head):
    """S_ref per response `[R]` (or `[M, R]`), detached fp32, or None (reference-free)."""
    if ref_logps is not None:
        if ref_hidden is not None:
            raise ValueError("pass either ref_logps (precomputed) or ref_hidden / ref_weight, not both")
        if ref_logps.shape[-1] != layout.num_responses or ref_logps.dim() > 2:
            raise ValueError(f"ref_logps must be [R] or [M, R] with R = {layout.num_responses}, "
                             f"got {tuple(ref_logps.shape)}")
        return ref_logps.detach().float()
    if ref_hidden is None:
        return None
    if ref_weight is None:
        raise ValueError("ref_hidden needs ref_weight (the reference model's LM-head weight)")
    ref_NH = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    with torch.no_grad():
        logp = token_logprobs(ref_NH, ref_weight, targets_N, bias=ref_bias, **head.op_kwargs())
    valid = targets_N != head.ignore_index
    return S.reduce_tokens(layout.token_response, layout.num_responses, logp, valid, weights_N).logps


def response_logps(hidden, weight, targets, layout, *, bias=None, token_weights=None, ignore_index=-100,
                   temperature=1.0, softcap=None, impl="auto", chunk_tokens=1024, chunk_vocab=8192) -> torch.Tensor:
    """Per-response log-prob sums `[R]` (fp32) from the head: for caching reference log-probs
    (`ref_logps`) or scoring KTO's mismatched completions (`kto_reference_point`). Differentiable when the
    inputs require grad; forward-only (nothing saved) under `torch.no_grad()`."""
    hidden_NH, targets_N = _rows(hidden, targets)
    layout = _check_layout(layout, hidden_NH.shape[0], hidden.device)
    head = HeadOptions(ignore_index, temperature, impl, chunk_tokens, chunk_vocab, softcap)
    logp = token_logprobs(hidden_NH, weight, targets_N, bias=bias, **head.op_kwargs())
    w = None if token_weights is None else token_weights.reshape(-1).float()
    return S.reduce_tokens(layout.token_response, layout.num_responses, logp, targets_N != ignore_index, w).logps


@dataclass(frozen=True)
class HeadOptions:
    ignore_index: int = -100
    temperature: float = 1.0
    impl: str = "auto"
    chunk_tokens: int = 1024
    chunk_vocab: int = 8192
    softcap: float | None = None

    def op_kwargs(self):
        return dict(ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap,
                    impl=self.impl, chunk_tokens=self.chunk_tokens, chunk_vocab=self.chunk_vocab)


# ----------------------------------------------------------------------------------------------------
# generic path
# ----------------------------------------------------------------------------------------------------


def _generic(hidden_NH, weight, bias, targets_N, layout, ref_R, data, config, head, weights_N, nll_targets_N):
    stats = token_stats(hidden_NH, weight, targets_N, bias=bias, extras=True, **head.op_kwargs())
    nll = {}
    if nll_targets_N is not None:
        nll["nll_logp_N"] = token_logprobs(hidden_NH, weight, nll_targets_N, bias=bias, **head.op_kwargs())
        nll["nll_valid_N"] = nll_targets_N != head.ignore_index
    return S.objective_from_token_stats(stats, targets_N, layout, ref_R, data, config, ignore_index=head.ignore_index,
                                        weights_N=weights_N, **nll)


# ----------------------------------------------------------------------------------------------------
# pair-fused path
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of whole groups [g0, g1): its head rows, and local response ids (host-planned)."""

    g0: int
    g1: int
    rows: torch.Tensor
    """[n_c] row indices into the flattened hidden states."""
    responses: torch.Tensor
    """[r_c] global response ids of the chunk, in local order."""
    token_local: torch.Tensor
    """[n_c] local response id of each row."""
    group_index: torch.Tensor
    """[g1 - g0, K] local response ids."""


def plan_chunks(layout: ResponseLayout, chunk_tokens: int, device) -> tuple[ChunkPlan, ...]:
    """Greedy chunks of consecutive whole groups holding at most `chunk_tokens` rows (at least one group).

    Reads the layout on the host: build it on the CPU to keep this free of device synchronization.
    """
    token_response = layout.token_response.cpu()
    group_index = layout.group_index.cpu()
    G, K = group_index.shape
    group_of = torch.empty(layout.num_responses, dtype=torch.long)
    group_of[group_index.flatten()] = torch.arange(G).repeat_interleave(K)
    token_group = group_of[token_response]
    order = torch.argsort(token_group, stable=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(token_group, minlength=G).cumsum(0)]).tolist()
    plans, g0 = [], 0
    while g0 < G:
        g1 = g0 + 1
        while g1 < G and starts[g1 + 1] - starts[g0] <= chunk_tokens:
            g1 += 1
        plans.append(_chunk_plan(g0, g1, order[starts[g0] : starts[g1]], token_response, group_index, device))
        g0 = g1
    return tuple(plans)


def _chunk_plan(g0, g1, rows, token_response, group_index, device):
    responses = group_index[g0:g1].flatten()
    local = torch.empty(int(responses.max()) + 1, dtype=torch.long)
    local[responses] = torch.arange(responses.numel())
    plan = ChunkPlan(g0, g1, rows, responses, local[token_response[rows]],
                     torch.arange(responses.numel()).view(g1 - g0, -1))
    return ChunkPlan(g0, g1, *(t.to(device) for t in (plan.rows, plan.responses, plan.token_local, plan.group_index)))


@dataclass(frozen=True)
class FusedParams:
    """Everything non-differentiable the pair-fused Function needs (one value, so backward returns a fixed tuple)."""

    plans: tuple
    config: S.PreferenceConfig
    data: S.GroupData
    head: HeadOptions
    num_groups: int
    num_responses: int
    nll_scale: torch.Tensor
    ref_R: torch.Tensor | None
    weights_N: torch.Tensor | None


def _chunk_logits(h, weight, bias, scale, softcap, chunk_vocab):
    """[n_c, V] fp32 logits of a chunk (soft-capped when `softcap` is set): one GEMM with an fp32 output on CUDA;
    on CPU tile by tile over the vocabulary, bounding the fp32 copies of W."""
    V = weight.shape[0]
    if h.is_cuda:
        return _logits_f32(h, weight, bias, scale, softcap)
    tiles = [_logits_f32(h, weight[v0 : v0 + chunk_vocab], None if bias is None else bias[v0 : v0 + chunk_vocab],
                         scale, softcap) for v0 in range(0, V, chunk_vocab)]
    return torch.cat(tiles, 1) if len(tiles) > 1 else tiles[0]


def _chunk_token_stats(z, y, valid):
    """lse, logp (0 where invalid), mean logit and log sum p^2 per row of the chunk."""
    lse = torch.logsumexp(z, -1)
    zy = z.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    logp = torch.where(valid, zy - lse, 0.0)
    log_sum_sq = torch.logsumexp(2.0 * z, -1) - 2.0 * lse
    return lse, logp, z.mean(-1), log_sum_sq


def _chunk_objective(seq, plan, p: FusedParams):
    """Loss contribution of the chunk (divided by the batch's G) and g = dL/dS^w, dL/dS for its responses."""
    S_leaf = seq.logps.detach().requires_grad_()
    nll_leaf = seq.nll_logps.detach().requires_grad_()
    ref = None if p.ref_R is None else p.ref_R[..., plan.responses]
    seq = seq._replace(logps=S_leaf, nll_logps=nll_leaf)
    with torch.enable_grad():
        inputs = S.build_inputs(seq, ref, plan.group_index, p.data.slice(plan.g0, plan.g1), p.config, p.nll_scale)
        total = p.config(inputs).losses.sum() / p.num_groups
        g_S, g_nll = torch.autograd.grad(total, [S_leaf, nll_leaf], allow_unused=True, materialize_grads=True)
    return total.detach(), g_S, g_nll


def _chunk_head_grads(z, lse, y, valid, g_N, h, weight, scale, softcap, chunk_vocab, dW, db):
    """dz = g (onehot(y) - p) * scale (* 1 - tanh^2 under a soft cap), written over z in place; returns dH of the
    chunk and accumulates dW, db."""
    acc = torch.promote_types(h.dtype, torch.float32)
    g_N = torch.where(valid, g_N, 0.0)
    # z = c tanh(a / c) * scale, so tanh = z / (c * scale) and dz/da = 1 - tanh^2
    cap_grad = None if softcap is None else torch.square(z * (1.0 / (softcap * scale))).neg_().add_(1.0)
    dz = z.sub_(lse[:, None]).exp_().mul_(-g_N[:, None])
    # + g at the target column, in fp32: 1 - p_y never rounds before the subtraction
    dz.scatter_add_(1, torch.where(valid, y, 0)[:, None], g_N[:, None])
    dz.mul_(scale)
    if cap_grad is not None:
        dz.mul_(cap_grad)
    dH = torch.zeros(h.shape, dtype=acc, device=h.device)
    for v0 in range(0, weight.shape[0], chunk_vocab):
        w, d = weight[v0 : v0 + chunk_vocab].to(acc), dz[:, v0 : v0 + chunk_vocab]
        dH += d @ w
        if dW is not None:
            dW[v0 : v0 + chunk_vocab] += d.T @ h.to(acc)
    if db is not None:
        db += dz.sum(0)
    return dH


def _chunk_head_grads_triton(z, lse, y, g_N, h, weight, head: HeadOptions, dW, db):
    """`_chunk_head_grads` with dz from one Triton pass, in the inputs' dtype, and cuBLAS GEMMs."""
    from fastpo.kernels.logit_rows import logit_rows_bwd

    dz = logit_rows_bwd(z, lse, y, g_N, ignore_index=head.ignore_index, scale=1.0 / head.temperature,
                        softcap=head.softcap, out_dtype=h.dtype)
    if dW is not None:
        addmm_fp32_(dW, dz.T, h)
    if db is not None:
        db += dz.sum(0, dtype=torch.float32)
    return dz @ weight


def _chunk_stats(z, y, valid, head: HeadOptions, triton_rows: bool):
    if not triton_rows:
        return _chunk_token_stats(z, y, valid)
    from fastpo.kernels.logit_rows import logit_rows_fwd

    return logit_rows_fwd(z, y, head.ignore_index)


def _run_chunk(plan, hidden_NH, weight, bias, targets_N, p: FusedParams, grads):
    """Forward, objective and head gradients of one chunk; returns (loss part, SequenceStats of its responses)."""
    h, y = hidden_NH[plan.rows], targets_N[plan.rows]
    valid = y != p.head.ignore_index
    scale = 1.0 / p.head.temperature
    triton_rows = _resolve_impl(p.head.impl, h.device) == "triton"
    z = _chunk_logits(h, weight, bias, scale, p.head.softcap, p.head.chunk_vocab)
    lse, logp, mean_logits, log_sum_sq = _chunk_stats(z, y, valid, p.head, triton_rows)
    w_N = None if p.weights_N is None else p.weights_N[plan.rows]
    seq = S.reduce_tokens(plan.token_local, plan.responses.numel(), logp, valid, w_N, mean_logits, log_sum_sq)
    total, g_S, g_nll = _chunk_objective(seq, plan, p)
    dH, dW, db = grads
    if dH is not None or dW is not None or db is not None:
        g_w = g_S[plan.token_local] * (1.0 if w_N is None else w_N)
        g_N = g_w + g_nll[plan.token_local]
        if triton_rows:
            dH_c = _chunk_head_grads_triton(z, lse, y, g_N, h, weight, p.head, dW, db)
        else:
            dH_c = _chunk_head_grads(z, lse, y, valid, g_N, h, weight, scale, p.head.softcap, p.head.chunk_vocab,
                                     dW, db)
        if dH is not None:
            dH.index_copy_(0, plan.rows, dH_c.to(dH.dtype))
    return total, seq


class PairFusedFunction(torch.autograd.Function):
    """Loss with dH, dW, db computed in forward, chunk by chunk; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden_NH, weight, bias, targets_N, params: FusedParams):
        acc = torch.promote_types(hidden_NH.dtype, torch.float32)
        needs = ctx.needs_input_grad
        dH = torch.zeros(hidden_NH.shape, dtype=acc, device=hidden_NH.device) if needs[0] else None
        dW = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and needs[2] else None
        R = params.num_responses
        out = [torch.zeros(R, device=hidden_NH.device) for _ in SequenceStats._fields]
        loss = torch.zeros((), device=hidden_NH.device)
        for plan in params.plans:
            total, seq = _run_chunk(plan, hidden_NH, weight, bias, targets_N, params, (dH, dW, db))
            loss += total
            for buf, part in zip(out, seq):
                buf.index_copy_(0, plan.responses, part.detach().float())
        ctx.save_for_backward(dH, dW, db)
        ctx.dtypes = (hidden_NH.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*out)
        return (loss, *out)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        # NOTE: multiply unconditionally; comparing grad_output to 1 would be a host sync.
        scaled = [None if g is None else (g * grad_loss).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return scaled[0], scaled[1], scaled[2], None, None


def _pair_fused(hidden_NH, weight, bias, targets_N, layout, ref_R, data, config, head, weights_N):
    valid_N = targets_N != head.ignore_index
    counts = S.segment_sum(valid_N.float(), layout.token_response, layout.num_responses)
    params = FusedParams(plan_chunks(layout, head.chunk_tokens, hidden_NH.device), config, data, head,
                         layout.num_groups, layout.num_responses, S.nll_scale(layout, counts), ref_R, weights_N)
    loss, *stats = PairFusedFunction.apply(hidden_NH, weight, bias, targets_N, params)
    seq = SequenceStats(*stats)
    inputs = S.build_inputs(seq, ref_R, layout.group_index, data, config, params.nll_scale)
    with torch.no_grad():
        out = config(inputs)
    return S.finish(loss, out, inputs, seq, layout.group_index)


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------


def _resolve_path(path, loss_type, nll_targets, grad_needed):
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    eligible = is_pair_local(loss_type) and nll_targets is None
    if path == "pair_fused" and not eligible:
        raise ValueError(f"loss_type {list(loss_names(loss_type))} (or nll_targets) needs the generic path: "
                         "its per-group gradient depends on the whole batch")
    if path == "auto":
        return "pair_fused" if eligible and grad_needed else "generic"
    return path


def fused_linear_preference_loss(
    hidden, weight, targets, *, loss_type="sigmoid", layout=None, bias=None,
    ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None, ref_weights=None,
    token_weights=None, ld_alpha=None, average_log_prob=False, use_weighting=False, loss_weights=None,
    pair_beta=None, pair_margin=None, pair_weight=None, labels=None, kl=None, nll_targets=None,
    ignore_index=-100, temperature=1.0, softcap=None, path="auto", impl="auto", chunk_tokens=1024, chunk_vocab=8192,
    allow_empty_completions=False, **hparams,
) -> FusedLossOutput:
    """Preference loss straight from the LM head: `[N, H]` (or `[2B, T, H]`) hidden states, `[V, H]` weight,
    targets (`ignore_index` on prompt and padding), and the response layout.

    loss_type        a `LOSSES` name or a list (TRL), with `loss_weights`; `**hparams` are the objective's
                     hyperparameters (beta, label_smoothing, gamma, discopop_tau, ...).
    layout           `ResponseLayout`; default for `[2B, T]` targets: rows [0, B) chosen, [B, 2B) rejected
                     (with `labels`: one unpaired response per row).
    reference        `ref_hidden` + `ref_weight` (+ `ref_bias`), forward only; or `ref_logps` `[R]` / `[M, R]`
                     precomputed (then LD weights must already be applied); or neither (reference-free).
    token_weights    `[N]` per-row weights w_t: S^w = sum_t w_t logp_t (token-weighted DPO); `ld_alpha` multiplies
                     in the LD-DPO positional weights (policy and computed reference alike).
    pair_*           per-group beta, margin (ODPO offset), weight `[G]`; `labels` `[G]` bool and `kl` (z0) for KTO.
    nll_targets      separate targets for NLL terms (Liger ORPO `nll_target`); generic path only.
    softcap          final-logit soft cap c (logits c tanh(a / c), Gemma 2), for policy and computed reference.
    path             "auto" (pair-fused when every loss is pair-local and a gradient is needed), "generic",
                     "pair_fused". `impl` picks the head op of the generic path and of the reference pass.

    Returns `FusedLossOutput`: `loss` (mean over groups, differentiable) and detached per-group values and
    TRL-named metrics.
    """
    hidden_NH, targets_N = _rows(hidden, targets)
    names = loss_names(loss_type)
    config = S.PreferenceConfig(names, None if loss_weights is None else tuple(loss_weights), use_weighting,
                                average_log_prob, dict(hparams))
    head = HeadOptions(ignore_index, temperature, impl, chunk_tokens, chunk_vocab, softcap)
    if layout is None:
        layout = _default_layout(targets, labels is not None)
    layout = _check_layout(layout, hidden_NH.shape[0], hidden.device)
    valid_N = targets_N != ignore_index
    counts_R = S.segment_sum(valid_N.float(), layout.token_response, layout.num_responses)
    _check_nonempty(counts_R, allow_empty_completions)
    weights_N = S.token_weights_for(layout, valid_N, token_weights, ld_alpha)
    ref_R = _reference_sums(ref_hidden, ref_weight, ref_bias, ref_logps, targets_N, layout, weights_N, head)
    data = S.GroupData(pair_beta, pair_margin, pair_weight, labels, kl, ref_weights)
    grad_needed = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    nll_N = None if nll_targets is None else nll_targets.reshape(-1)
    if _resolve_path(path, names, nll_targets, grad_needed) == "pair_fused":
        return _pair_fused(hidden_NH, weight, bias, targets_N, layout, ref_R, data, config, head, weights_N)
    return _generic(hidden_NH, weight, bias, targets_N, layout, ref_R, data, config, head, weights_N, nll_N)
