"""Fused linear preference losses: hidden states + LM-head weight + targets in, loss and metrics out.

Shapes: N head rows, H hidden, V vocabulary, R responses, G groups, K responses per group, n_c rows of a chunk.

One pipeline, used by the trainer, the Liger-compatible modules, the benchmarks and the tests: the head
gives per-token statistics, `stats.reduce_tokens` per-response sums, `stats.evaluate` the objective on every
bucket of equal-size groups, `metrics` the TRL-named sums and means. Two head paths feed it:

- generic: `fastpo.ops.token_stats` (Triton or chunked torch; logits never stored) gives per-token log-probs;
  the objective runs on per-response sums and autograd carries dL/dlogp_t back into the op, whose backward
  recomputes the logits. Any objective. 8NHV.
- pair-fused: for objectives whose per-group gradient depends on the group only (`LOSSES[n].pair_local`),
  chunks of whole groups are processed once: fp32 logits of the chunk (2 n_c H V), per-response sums,
  the objective and its gradient g = dL/dS for the chunk (autograd on a few scalars), then from the SAME
  logits dz = g (onehot(y) - softmax(z)) / temperature, dH = dz W and dW += dz^T h (2 + 2 n_c H V). 6NHV.
  Backward only scales the stored gradients by grad_output. With impl "triton" (CUDA) the row statistics
  and dz are one Triton pass each over the chunk (`fastpo.kernels.logit_rows`), dz is written in the
  inputs' dtype and dH, dW are cuBLAS GEMMs with fp32 accumulation; with "torch" they are PyTorch ops in
  fp32 (the CPU path), one exp pass over the chunk in all.

  Memory: the gradients are computed in the forward, so dH `[N, H]`, dW `[V, H]` and db `[V]` (fp32) are
  held from the head's forward to its backward, which runs first in the backward pass: at that point the
  generic path allocates the same fp32 dH and dW accumulators, so the peak is the same. Besides them, one
  chunk's fp32 logits `[n_c, V]` live during the forward (n_c <= `chunk_tokens`).

The reference model is forward-only (`token_stats` without gradient, 2NHV) or precomputed (`ref_logps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastpo.losses import stats as S
from fastpo.losses.objectives import is_pair_local, loss_names
from fastpo.losses.types import FusedLossOutput, ResponseLayout, SequenceStats
from fastpo.kernels.partials import addmm_fp32_
from fastpo.ops import _logits_f32, _resolve_impl, logit_grad_, token_stats, validate_head_inputs

PATHS = ("auto", "generic", "pair_fused")


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
# inputs: rows, layout, reference sums
# ----------------------------------------------------------------------------------------------------


def _rows(hidden, weight, targets, bias, head: HeadOptions):
    """Validated `[N, H]` rows and int64 `[N]` targets (the op's own validation, for both paths)."""
    targets = validate_head_inputs(hidden, weight, targets, bias=bias, **head.op_kwargs())
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def _default_layout(targets, unpaired):
    if targets.dim() != 2:
        raise ValueError("targets of shape [N] need an explicit layout (ResponseLayout); [2B, T] batches "
                         "default to chosen rows first, then rejected rows")
    build = ResponseLayout.unpaired if unpaired else ResponseLayout.chosen_rejected
    return build(targets.shape[0], targets.shape[1])


def _check_layout(layout, num_rows, device):
    if not isinstance(layout, ResponseLayout):
        raise TypeError(f"layout must be a fastpo.losses.ResponseLayout, got {type(layout).__name__}")
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


def _per_group(name, value, num_groups, device):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.shape != (num_groups,):
        raise ValueError(f"{name} must be a [G] = [{num_groups}] tensor, got "
                         f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    return value.to(device)


def head_sums(hidden_NH, weight, bias, targets_N, layout: ResponseLayout, head: HeadOptions, weights_N=None,
              extras=False) -> SequenceStats:
    """Per-response sums `[R]` of the head's per-token log-probs (`stats.reduce_tokens`; with `extras` also the
    mean-logit sums and WPO log-weights). Differentiable when the inputs require grad and grad is enabled."""
    stats = token_stats(hidden_NH, weight, targets_N, bias=bias, extras=extras, **head.op_kwargs())
    valid = targets_N != head.ignore_index
    return S.reduce_tokens(layout.token_response, layout.num_responses, stats.logp, valid, weights_N,
                           stats.mean_logits, stats.log_sum_sq_probs)


def _reference_sums(ref_hidden, ref_weight, ref_bias, ref_logps, targets_N, layout, weights_N, head):
    """S_ref per response `[R]` (or `[M, R]`), detached fp32, or None (reference-free)."""
    if ref_logps is not None:
        if ref_hidden is not None:
            raise ValueError("pass either ref_logps (precomputed) or ref_hidden / ref_weight, not both")
        if ref_logps.shape[-1] != layout.num_responses or ref_logps.dim() > 2:
            raise ValueError(f"ref_logps must be [R] or [M, R] with R = {layout.num_responses}, "
                             f"got {tuple(ref_logps.shape)}")
        return ref_logps.detach().float().to(targets_N.device)
    if ref_hidden is None:
        return None
    if ref_weight is None:
        raise ValueError("ref_hidden needs ref_weight (the reference model's LM-head weight)")
    if not isinstance(ref_hidden, torch.Tensor) or ref_hidden.shape[:-1].numel() != targets_N.numel():
        raise ValueError(f"ref_hidden must hold one row per target ({targets_N.numel()} rows), got "
                         f"{tuple(ref_hidden.shape) if isinstance(ref_hidden, torch.Tensor) else ref_hidden!r}")
    ref_NH, _ = _rows(ref_hidden, ref_weight, targets_N.view(ref_hidden.shape[:-1]), ref_bias, head)
    with torch.no_grad():
        return head_sums(ref_NH, ref_weight, ref_bias, targets_N, layout, head, weights_N).logps


def response_logps(hidden, weight, targets, layout, *, bias=None, token_weights=None, ld_alpha=None,
                   ignore_index=-100, temperature=1.0, softcap=None, impl="auto", chunk_tokens=1024,
                   chunk_vocab=8192) -> torch.Tensor:
    """Per-response log-prob sums `[R]` (fp32) from the head: for caching reference log-probs
    (`ref_logps`) or scoring KTO's mismatched completions. `token_weights` / `ld_alpha` weight the sums as
    `fused_linear_preference_loss` weights the policy's. Differentiable when the inputs require grad;
    forward-only (nothing saved) under `torch.no_grad()`."""
    head = HeadOptions(ignore_index, temperature, impl, chunk_tokens, chunk_vocab, softcap)
    hidden_NH, targets_N = _rows(hidden, weight, targets, bias, head)
    layout = _check_layout(layout, hidden_NH.shape[0], hidden.device)
    weights_N = S.token_weights_for(layout, targets_N != ignore_index, token_weights, ld_alpha)
    return head_sums(hidden_NH, weight, bias, targets_N, layout, head, weights_N).logps


# ----------------------------------------------------------------------------------------------------
# generic path
# ----------------------------------------------------------------------------------------------------


def _generic(hidden_NH, weight, bias, targets_N, layout, ref_R, data, config, head, weights_N, nll_targets_N,
             scale, normalizer):
    stats = token_stats(hidden_NH, weight, targets_N, bias=bias, extras=True, **head.op_kwargs())
    nll = {}
    if nll_targets_N is not None:
        nll_stats = token_stats(hidden_NH, weight, nll_targets_N, bias=bias, **head.op_kwargs())
        nll = dict(nll_logp_N=nll_stats.logp, nll_valid_N=nll_targets_N != head.ignore_index)
    return S.objective_from_token_stats(stats, targets_N, layout, ref_R, data, config, ignore_index=head.ignore_index,
                                        weights_N=weights_N, scale=scale, normalizer=normalizer, **nll)


# ----------------------------------------------------------------------------------------------------
# pair-fused path
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of whole groups [g0, g1): its head rows, and local response ids (host-planned)."""

    g0: int
    g1: int
    rows: torch.Tensor
    """[n_c] row indices into the flattened hidden states (rows with a target only, when known on the host)."""
    responses: torch.Tensor
    """[r_c] global response ids of the chunk, in local order."""
    layout: ResponseLayout
    """The chunk's own layout: local response id of each row, local group index and sizes."""


def plan_chunks(layout: ResponseLayout, chunk_tokens: int, device, valid_N: torch.Tensor | None = None
                ) -> tuple[ChunkPlan, ...]:
    """Greedy chunks of consecutive whole groups holding at most `chunk_tokens` rows (at least one group).

    Reads the layout's host copy (`ResponseLayout.host`, kept when it was moved to the device), so planning
    never waits on the device. `valid_N` (a CPU bool tensor, when the targets live on the host) drops rows
    without a target (prompt, padding) from the chunks: they cost no FLOPs and get a zero gradient.
    """
    host = layout.on_host()
    token_response = host.token_response
    group_of = host.group_of_response()
    token_group = group_of[token_response]
    order = torch.argsort(token_group, stable=True)
    counts = torch.bincount(token_group, minlength=host.num_groups)
    if valid_N is not None:
        keep = valid_N.cpu()[order]
        order = order[keep]
        counts = torch.bincount(token_group[order], minlength=host.num_groups)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()
    plans, g0, G = [], 0, host.num_groups
    while g0 < G:
        g1 = g0 + 1
        while g1 < G and starts[g1 + 1] - starts[g0] <= chunk_tokens:
            g1 += 1
        plans.append(_chunk_plan(g0, g1, order[starts[g0] : starts[g1]], host, device))
        g0 = g1
    return tuple(plans)


def _chunk_plan(g0, g1, rows, host: ResponseLayout, device):
    index = host.group_index[g0:g1]
    responses = index[index >= 0]
    local = torch.full((host.num_responses,), -1, dtype=torch.long)
    local[responses] = torch.arange(responses.numel())
    local_index = torch.where(index >= 0, local[index.clamp(min=0)], -1)
    sizes = None if host.sizes is None else host.sizes[g0:g1]
    chunk_layout = ResponseLayout(local[host.token_response[rows]], local_index, sizes)
    return ChunkPlan(g0, g1, rows.to(device), responses.to(device), chunk_layout.to(device))


@dataclass(frozen=True)
class FusedParams:
    """Everything non-differentiable the pair-fused Function needs (one value, so backward returns a fixed tuple)."""

    plans: tuple
    config: S.PreferenceConfig
    data: S.GroupData
    head: HeadOptions
    normalizer: float
    num_responses: int
    nll_scale: torch.Tensor
    ref_R: torch.Tensor | None
    weights_N: torch.Tensor | None
    mean_head: tuple | None
    """`_mean_head` of the weight (torch path)."""
    triton_rows: bool
    """Row statistics and dz from the Triton row kernels (impl "triton"), else PyTorch ops."""


def _chunk_logits(h, weight, bias, scale, softcap, chunk_vocab):
    """[n_c, V] fp32 logits of a chunk (soft-capped when `softcap` is set): one GEMM with an fp32 output on CUDA
    and for fp32 weights; low-precision weights on CPU go tile by tile over the vocabulary, bounding their fp32
    copies."""
    V = weight.shape[0]
    if h.is_cuda or weight.dtype == torch.promote_types(weight.dtype, torch.float32) or V <= chunk_vocab:
        return _logits_f32(h, weight, bias, scale, softcap)
    tiles = [_logits_f32(h, weight[v0 : v0 + chunk_vocab], None if bias is None else bias[v0 : v0 + chunk_vocab],
                         scale, softcap) for v0 in range(0, V, chunk_vocab)]
    return torch.cat(tiles, 1)


def _mean_head(weight, bias, head: HeadOptions):
    """(mean_v W_v [H], mean_v b_v) in fp32 for `_mean_logits`, once per call; None under a soft cap."""
    if head.softcap is not None:
        return None
    acc = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(acc).mean(0), (0.0 if bias is None else bias.to(acc).mean())


def _mean_logits(z, h, mean_head, head: HeadOptions):
    """(1/V) sum_v z_v per row. Without a soft cap z is affine in h, so it is (h . mean_v W_v + mean b) times the
    scale: O(n_c H) instead of a pass over the chunk."""
    if mean_head is None:
        return z.mean(-1)
    w_mean, b_mean = mean_head
    return ((h.to(w_mean.dtype) @ w_mean + b_mean) / head.temperature).float()


def _chunk_stats_torch(z, y, valid, wpo: bool):
    """(lse, logp, log sum p^2 or None, softmax numerators) of a chunk, with one exp pass: z is overwritten
    with e = exp(z - m), from which the backward forms p = e / s."""
    m = z.amax(-1)
    zy = z.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    e = z.sub_(m[:, None]).exp_()
    s = e.sum(-1)
    lse = m + torch.log(s)
    logp = torch.where(valid, zy - lse, 0.0)
    # log sum p^2 = log sum e^2 - 2 log s
    log_sum_sq = torch.log(torch.einsum("nv,nv->n", e, e)) - 2.0 * torch.log(s) if wpo else None
    return lse, logp, log_sum_sq, (e, s)


def _chunk_objective(seq, plan, p: FusedParams):
    """Loss contribution of the chunk (over the normalizer) and g = dL/dS^w, dL/dS for its responses."""
    S_leaf = seq.logps.detach().requires_grad_()
    nll_leaf = seq.nll_logps.detach().requires_grad_()
    ref = None if p.ref_R is None else p.ref_R[..., plan.responses]
    seq = seq._replace(logps=S_leaf, nll_logps=nll_leaf)
    with torch.enable_grad():
        result = S.evaluate(seq, ref, plan.layout, p.data.slice(plan.g0, plan.g1), p.config, p.nll_scale)
        total = result.losses.sum() / p.normalizer
        g_S, g_nll = torch.autograd.grad(total, [S_leaf, nll_leaf], allow_unused=True, materialize_grads=True)
    return total.detach(), g_S, g_nll


def _chunk_head_grads_torch(e_s, z_cap, y, valid, g_N, h, weight, head: HeadOptions, dW, db):
    """dz = g (onehot(y) - p) * scale (* 1 - tanh^2 under a soft cap), written over the chunk's softmax
    numerators in place; returns dH of the chunk and accumulates dW, db in fp32."""
    e, s = e_s
    acc = torch.promote_types(h.dtype, torch.float32)
    g_N = torch.where(valid, g_N, 0.0)
    dz = logit_grad_(e, s, torch.where(valid, y, -1), g_N, 1.0 / head.temperature, z_cap)
    if weight.dtype == acc:
        dH = dz @ weight
        if dW is not None:
            dW.addmm_(dz.T, h)
    else:
        dH = torch.zeros(h.shape, dtype=acc, device=h.device)
        for v0 in range(0, weight.shape[0], head.chunk_vocab):
            w, d = weight[v0 : v0 + head.chunk_vocab].to(acc), dz[:, v0 : v0 + head.chunk_vocab]
            dH.addmm_(d, w)
            if dW is not None:
                dW[v0 : v0 + head.chunk_vocab].addmm_(d.T, h.to(acc))
    if db is not None:
        db += dz.sum(0)
    return dH


def _cap_grad(z, head: HeadOptions):
    """dz/da = 1 - tanh^2(a / c) of a soft-capped chunk z = c tanh(a / c) * scale (None without a cap)."""
    if head.softcap is None:
        return None
    return torch.square(z * (head.temperature / head.softcap)).neg_().add_(1.0)


def _chunk_head_grads_triton(z, lse, y, g_N, h, weight, head: HeadOptions, dW, db):
    """dz from one Triton pass, in the inputs' dtype, and cuBLAS GEMMs."""
    from fastpo.kernels.logit_rows import logit_rows_bwd

    dz = logit_rows_bwd(z, lse, y, g_N, ignore_index=head.ignore_index, scale=1.0 / head.temperature,
                        softcap=head.softcap, out_dtype=h.dtype)
    if dW is not None:
        addmm_fp32_(dW, dz.T, h)
    if db is not None:
        db += dz.sum(0, dtype=torch.float32)
    return dz @ weight


def _run_chunk(plan, hidden_NH, weight, bias, targets_N, p: FusedParams, grads):
    """Forward, objective and head gradients of one chunk; returns (loss part, SequenceStats of its responses)."""
    h, y = hidden_NH[plan.rows], targets_N[plan.rows]
    valid = y != p.head.ignore_index
    triton_rows = p.triton_rows
    wpo = p.config.use_weighting
    z = _chunk_logits(h, weight, bias, 1.0 / p.head.temperature, p.head.softcap, p.head.chunk_vocab)
    if triton_rows:
        from fastpo.kernels.logit_rows import logit_rows_fwd

        lse, logp, mean_logits, log_sum_sq = logit_rows_fwd(z, y, p.head.ignore_index)
    else:
        mean_logits = _mean_logits(z, h, p.mean_head, p.head)
        cap = _cap_grad(z, p.head) if any(g is not None for g in grads) else None
        lse, logp, log_sum_sq, e_s = _chunk_stats_torch(z, y, valid, wpo)
    w_N = None if p.weights_N is None else p.weights_N[plan.rows]
    seq = S.reduce_tokens(plan.layout.token_response, plan.responses.numel(), logp, valid, w_N, mean_logits,
                          log_sum_sq if wpo else None)
    total, g_S, g_nll = _chunk_objective(seq, plan, p)
    dH, dW, db = grads
    if dH is not None or dW is not None or db is not None:
        g_N = g_S[plan.layout.token_response] * (1.0 if w_N is None else w_N) + g_nll[plan.layout.token_response]
        if triton_rows:
            dH_c = _chunk_head_grads_triton(z, lse, y, g_N, h, weight, p.head, dW, db)
        else:
            dH_c = _chunk_head_grads_torch(e_s, cap, y, valid, g_N, h, weight, p.head, dW, db)
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


def _pair_fused(hidden_NH, weight, bias, targets_N, layout, ref_R, data, config, head, weights_N, scale,
                normalizer, valid_N, counts_R):
    plans = plan_chunks(layout, head.chunk_tokens, hidden_NH.device, None if valid_N.is_cuda else valid_N)
    if scale is None:
        scale = S.nll_scale(layout, counts_R)
    triton_rows = _resolve_impl(head.impl, hidden_NH.device) == "triton"
    mean_head = None if triton_rows else _mean_head(weight, bias, head)
    params = FusedParams(plans, config, data, head, normalizer, layout.num_responses, scale, ref_R, weights_N,
                         mean_head, triton_rows)
    loss, *stats = PairFusedFunction.apply(hidden_NH, weight, bias, targets_N, params)
    with torch.no_grad():
        result = S.evaluate(SequenceStats(*stats), ref_R, layout, data, config, scale)
    return S.finish(loss, result)


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------


def resolve_path(path, loss_type, grad_needed: bool, *, nll_targets=False) -> str:
    """The head path: "pair_fused" when every objective is pair-local and a gradient is needed ("auto"),
    "generic" otherwise; an explicit "pair_fused" for an objective that cannot use it is an error."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    eligible = is_pair_local(loss_type) and not nll_targets
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
    example_mask=None, nll_scale=None, normalizer=None,
    ignore_index=-100, temperature=1.0, softcap=None, path="auto", impl="auto", chunk_tokens=1024, chunk_vocab=8192,
    allow_empty_completions=False, **hparams,
) -> FusedLossOutput:
    """Preference loss straight from the LM head: `[N, H]` (or `[2B, T, H]`) hidden states, `[V, H]` weight,
    targets (`ignore_index` on prompt and padding), and the response layout.

    loss_type        a `LOSSES` name or a list (TRL), with `loss_weights`; `**hparams` are the objective's
                     hyperparameters (beta, label_smoothing, gamma, discopop_tau, ...).
    layout           `ResponseLayout` (groups may differ in size); default for `[2B, T]` targets: rows [0, B)
                     chosen, [B, 2B) rejected (with `labels`: one unpaired response per row).
    reference        `ref_hidden` + `ref_weight` (+ `ref_bias`), forward only; or `ref_logps` `[R]` / `[M, R]`
                     precomputed (then LD weights must already be applied); or neither (reference-free).
    token_weights    `[N]` per-row weights w_t: S^w = sum_t w_t logp_t (token-weighted DPO); `ld_alpha` multiplies
                     in the LD-DPO positional weights (policy and computed reference alike).
    pair_*           per-group beta, margin (ODPO offset), weight `[G]`; `labels` `[G]` bool and `kl` (z0) for KTO.
    nll_targets      separate targets for NLL terms (Liger ORPO `nll_target`); generic path only.
    example_mask     `[G]` 1 for real examples, 0 for padding examples (no loss, gradient or metric).
    nll_scale        a global NLL scale (examples / chosen tokens over every micro-batch and rank); default: this
                     batch's.
    normalizer       the loss is sum(losses) / normalizer; default G (the mean). A trainer passes the global
                     number of examples of its step.
    softcap          final-logit soft cap c (logits c tanh(a / c), Gemma 2), for policy and computed reference.
    path             "auto" (pair-fused when every loss is pair-local and a gradient is needed), "generic",
                     "pair_fused". `impl` picks the head op ("triton", "torch", "auto").

    Returns `FusedLossOutput`: `loss` (differentiable), detached per-group values, and TRL-named metrics (means)
    with the sums they come from.
    """
    head = HeadOptions(ignore_index, temperature, impl, chunk_tokens, chunk_vocab, softcap)
    hidden_NH, targets_N = _rows(hidden, weight, targets, bias, head)
    names = loss_names(loss_type)
    config = S.PreferenceConfig(names, None if loss_weights is None else tuple(loss_weights), use_weighting,
                                average_log_prob, dict(hparams))
    if layout is None:
        layout = _default_layout(targets, labels is not None)
    layout = _check_layout(layout, hidden_NH.shape[0], hidden.device)
    valid_N = targets_N != ignore_index
    counts_R = S.segment_sum(valid_N.float(), layout.token_response, layout.num_responses)
    _check_nonempty(counts_R, allow_empty_completions)
    weights_N = S.token_weights_for(layout, valid_N, token_weights, ld_alpha)
    ref_R = _reference_sums(ref_hidden, ref_weight, ref_bias, ref_logps, targets_N, layout, weights_N, head)
    G, dev = layout.num_groups, hidden.device
    data = S.GroupData(*(_per_group(n, v, G, dev) for n, v in (("pair_beta", pair_beta), ("pair_margin", pair_margin),
                                                               ("pair_weight", pair_weight), ("labels", labels))),
                       kl, ref_weights, _per_group("example_mask", example_mask, G, dev))
    normalizer = G if normalizer is None else normalizer
    grad_needed = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if resolve_path(path, names, grad_needed, nll_targets=nll_targets is not None) == "pair_fused":
        return _pair_fused(hidden_NH, weight, bias, targets_N, layout, ref_R, data, config, head, weights_N,
                           nll_scale, normalizer, valid_N, counts_R)
    nll_N = None
    if nll_targets is not None:
        nll_N = validate_head_inputs(hidden, weight, nll_targets, bias=bias, **head.op_kwargs()).reshape(-1)
    return _generic(hidden_NH, weight, bias, targets_N, layout, ref_R, data, config, head, weights_N, nll_N,
                    nll_scale, normalizer)
