"""Per-token log-probs of target tokens straight from hidden states and the LM-head weight.

Shapes: N tokens reaching the head, H hidden size, V vocabulary, S vocabulary splits (partials).

    a_tv    = h_t . W_v + b_v                           never stored whole
    z_tv    = c tanh(a_tv / c) / temperature            c = softcap (Gemma 2); z = a / temperature without
    lse_t   = logsumexp_v z_tv
    logp_t  = z_t,y_t - lse_t                           fp32, 0 where y_t == ignore_index

Backward, for an upstream gradient g_t = dL/dlogp_t and p_tv = exp(z_tv - lse_t):

    dz_tv = g_t (1[v = y_t] - p_tv) / temperature
    da_tv = dz_tv (1 - tanh^2(a_tv / c))                (da = dz without a softcap)
    dh_t  = sum_v da_tv W_v        dW_v = sum_t da_tv h_t        db_v = sum_t da_tv

Both implementations sweep the vocabulary in tiles and keep, per (token, tile), the partial statistics
of `Partials`; `combine_partials` merges them exactly (m = max_k m_k, s = sum_k s_k e^(m_k - m)). The
Triton path (`fastpo.kernels.logprobs`, CUDA or `TRITON_INTERPRET=1`) computes the partials in a fused
GEMM + epilogue kernel; the torch path below computes them chunk by chunk in plain PyTorch with memory
bounded by `chunk_tokens * chunk_vocab`, never by N * V. It is the CPU path.
"""

from __future__ import annotations

import math

import torch

from fastpo.kernels.partials import (  # noqa: F401  (TokenStats and HeadParams are part of the op's API)
    HeadParams,
    Partials,
    TokenStats,
    combine_partials,
    pack_extras,
    unpack_extras,
)

EXTRA_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
IMPLS = ("auto", "triton", "torch")


# ----------------------------------------------------------------------------------------------------
# torch implementation: chunked over tokens and vocabulary, fp32 logits, bounded memory
# ----------------------------------------------------------------------------------------------------


def _pre_logits_f32(hidden_nH, weight_vH, bias_v):
    """a = h W^T + b of one (token chunk, vocab chunk) tile, from an fp32 GEMM accumulator."""
    if hidden_nH.is_cuda and hidden_nH.dtype in (torch.bfloat16, torch.float16):
        a = torch.mm(hidden_nH, weight_vH.T, out_dtype=torch.float32)
    else:
        acc = _acc_dtype(hidden_nH)
        a = hidden_nH.to(acc) @ weight_vH.to(acc).T
    if bias_v is not None:
        a.add_(bias_v.to(a.dtype))
    return a


def _logits_f32(hidden_nH, weight_vH, bias_v, scale, softcap=None):
    """fp32 logits z = c tanh(a / c) * scale (or a * scale) of one tile, computed in place."""
    a = _pre_logits_f32(hidden_nH, weight_vH, bias_v)
    if softcap is None:
        return a.mul_(scale)
    return a.div_(softcap).tanh_().mul_(softcap * scale)


def _logits_and_cap_grad(hidden_nH, weight_vH, bias_v, scale, softcap):
    """(z, dz/da) of one tile for the backward; dz/da = 1 - tanh^2(a / c) (None without a soft cap: the
    chain factor is 1). Costs one extra tile buffer, only with a soft cap."""
    if softcap is None:
        return _logits_f32(hidden_nH, weight_vH, bias_v, scale), None
    t = _pre_logits_f32(hidden_nH, weight_vH, bias_v).div_(softcap).tanh_()
    cap_grad = torch.addcmul(torch.ones_like(t), t, t, value=-1.0)
    return t.mul_(softcap * scale), cap_grad


def logit_grad_(p_nv, s_n, y_n, g_n, scale, cap_grad=None):
    """The head's logit gradient of one tile, in place over its softmax numerators `p_nv` (fp32):

        da_tv = g_t (1[v = y_t] - p_tv) * scale  (* dz/da = 1 - tanh^2(a / c) under a soft cap)

    with p = p_nv / s_n (`s_n` None: `p_nv` already holds p). `y_n` are target columns local to the tile (out of
    range: the target is in another tile). The + g at the target is added in fp32 after the -g p term, so
    1 - p_y never rounds before the subtraction. Shared by the op's backward and the pair-fused path."""
    V = p_nv.shape[1]
    g_n = g_n.to(p_nv.dtype)
    coef = -g_n * scale if s_n is None else -g_n * scale / s_n
    dz = p_nv.mul_(coef[:, None])
    hit = (y_n >= 0) & (y_n < V)
    dz.scatter_add_(1, y_n.clamp(0, V - 1)[:, None], torch.where(hit, g_n * scale, 0.0)[:, None])
    if cap_grad is not None:
        dz.mul_(cap_grad)
    return dz


def _acc_dtype(x):
    """Accumulation dtype: fp32, or float64 for float64 inputs (exact checks at tiny shapes)."""
    return torch.promote_types(x.dtype, torch.float32)


def _rowdot(a_nv, b_nv):
    """sum_v a_nv b_nv without an [n, v] temporary (a batched GEMV)."""
    return torch.einsum("nv,nv->n", a_nv, b_nv)


def _tile_partials(z_nv, y_n, v0, extras):
    """Partials of one tile `z_nv` whose first column is vocabulary index `v0`; consumes `z_nv`.

    Memory: one extra [n, v] buffer (e), and only with extras; without extras z becomes e in place."""
    m = z_nv.amax(-1)
    local_y = y_n - v0
    hit = (local_y >= 0) & (local_y < z_nv.shape[1])
    zy = torch.where(hit, z_nv.gather(1, local_y.clamp(0, z_nv.shape[1] - 1)[:, None]).squeeze(1), 0.0)
    if not extras:
        return m, z_nv.sub_(m[:, None]).exp_().sum(-1), zy, None, None, None, None
    cols = torch.arange(z_nv.shape[1], device=z_nv.device)
    before = z_nv.masked_fill(cols[None, :] >= local_y[:, None], -math.inf).amax(-1)
    e = torch.exp(z_nv - m[:, None])
    return m, e.sum(-1), zy, _rowdot(e, z_nv), _rowdot(e, e), z_nv.sum(-1), before


def _host_valid_rows(valid_N) -> torch.Tensor | None:
    """Rows with a target, when some are ignored and the mask can be read without a device sync (CPU data): the
    torch path then runs its GEMMs on those rows only (prompt and padding rows cost nothing). None otherwise
    (every row valid, or CUDA data, where ignored rows are computed and masked)."""
    if valid_N.is_cuda or bool(valid_N.all()):
        return None
    return valid_N.nonzero().squeeze(1)


def _scatter_rows(x_n: torch.Tensor | None, rows: torch.Tensor, N: int) -> torch.Tensor | None:
    """[n] values of the valid rows -> [N], 0 (False) on the other rows."""
    if x_n is None:
        return None
    return x_n.new_zeros((N, *x_n.shape[1:])).index_copy_(0, rows, x_n)


def _torch_forward(hidden_NH, weight_VH, bias_V, targets_N, params: HeadParams):
    valid_N = targets_N != params.ignore_index
    V = weight_VH.shape[0]
    rows = _host_valid_rows(valid_N)
    if rows is not None:
        N = hidden_NH.shape[0]
        stats, lse = _torch_forward(hidden_NH[rows], weight_VH, bias_V, targets_N[rows], params)
        return TokenStats(*(_scatter_rows(x, rows, N) for x in stats)), _scatter_rows(lse, rows, N)
    if hidden_NH.shape[0] == 0:
        empty = hidden_NH.new_zeros(0, dtype=torch.float32)
        extras = (empty, empty, empty, valid_N) if params.extras else ()
        return TokenStats(empty, *extras), empty
    stats_chunks, lse_chunks = [], []
    for n0 in range(0, hidden_NH.shape[0], params.chunk_tokens):
        h = hidden_NH[n0 : n0 + params.chunk_tokens]
        y = targets_N[n0 : n0 + params.chunk_tokens]
        tiles = []
        for v0 in range(0, V, params.chunk_vocab):
            b = None if bias_V is None else bias_V[v0 : v0 + params.chunk_vocab]
            z = _logits_f32(h, weight_VH[v0 : v0 + params.chunk_vocab], b, params.scale, params.softcap)
            tiles.append(_tile_partials(z, y, v0, params.extras))
        partials = Partials(*(torch.stack(t) if t[0] is not None else None for t in zip(*tiles)))
        stats, lse = combine_partials(partials, valid_N[n0 : n0 + params.chunk_tokens], V, params.extras)
        stats_chunks.append(stats)
        lse_chunks.append(lse)
    stats = TokenStats(*(None if f[0] is None else torch.cat(f) for f in zip(*stats_chunks)))
    return stats, torch.cat(lse_chunks)


def _torch_backward(grad_N, hidden_NH, weight_VH, bias_V, targets_N, lse_N, params: HeadParams, needs):
    """da = g (onehot(y) - p) * scale (* the soft cap's chain factor), recomputed per tile in place; dh, dW,
    db accumulate in fp32."""
    valid_N = targets_N != params.ignore_index
    rows = _host_valid_rows(valid_N)
    if rows is not None:
        dh, dW, db = _torch_backward(grad_N[rows], hidden_NH[rows], weight_VH, bias_V, targets_N[rows], lse_N[rows],
                                     params, needs)
        return _scatter_rows(dh, rows, hidden_NH.shape[0]), dW, db
    V = weight_VH.shape[0]
    acc = _acc_dtype(hidden_NH)
    g_N = torch.where(valid_N, grad_N.to(acc), 0.0)
    # ignored rows carry lse = 0: +inf makes their p exactly 0 (exp(z - 0) would overflow, and 0 * inf is NaN)
    lse_N = torch.where(valid_N, lse_N, torch.inf)
    dh = torch.zeros(hidden_NH.shape, dtype=acc, device=hidden_NH.device) if needs[0] else None
    dW = torch.zeros(weight_VH.shape, dtype=acc, device=weight_VH.device) if needs[1] else None
    db = torch.zeros(V, dtype=acc, device=weight_VH.device) if needs[2] else None
    for n0 in range(0, hidden_NH.shape[0], params.chunk_tokens):
        sl = slice(n0, n0 + params.chunk_tokens)
        h, y, g, lse = hidden_NH[sl], targets_N[sl], g_N[sl], lse_N[sl]
        for v0 in range(0, V, params.chunk_vocab):
            w = weight_VH[v0 : v0 + params.chunk_vocab]
            b = None if bias_V is None else bias_V[v0 : v0 + params.chunk_vocab]
            z, cap_grad = _logits_and_cap_grad(h, w, b, params.scale, params.softcap)
            dz = logit_grad_(z.sub_(lse[:, None]).exp_(), None, y - v0, g, params.scale, cap_grad)
            if dh is not None:
                dh[sl] += dz @ w.to(acc)
            if dW is not None:
                dW[v0 : v0 + w.shape[0]] += dz.T @ h.to(acc)
            if db is not None:
                db[v0 : v0 + w.shape[0]] += dz.sum(0)
    return dh, dW, db


class TorchLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, targets_N, params: HeadParams):
        stats, lse = _torch_forward(hidden_NH, weight_VH, bias_V, targets_N, params)
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, targets_N, lse)
        ctx.params = params
        extras = pack_extras(stats) if params.extras else hidden_NH.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(extras)
        return stats.logp, extras

    @staticmethod
    def backward(ctx, grad_logp, _grad_extras):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dh, dW, db = _torch_backward(grad_logp, hidden, weight, bias, targets, lse, ctx.params, ctx.needs_input_grad)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(dh, hidden), cast(dW, weight), cast(db, bias), None, None


# ----------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_head_inputs(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                         impl="auto", chunk_tokens=1024, chunk_vocab=8192) -> torch.Tensor:
    """The head op's one validation (the generic and pair-fused paths both run it): every argument's shape,
    dtype, device and range, with an error naming it. Returns the targets as int64 (any integer dtype is
    accepted). Target values are checked on the host for CPU data and by a device-side assert on CUDA."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 2:
        raise TypeError(f"hidden must be a floating-point tensor [N, H] or [B, T, H], got {_describe(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be a 2-D tensor [V, H] with V >= 1, got {_describe(weight)}")
    if hidden.shape[-1] != weight.shape[1] or weight.shape[1] == 0:
        raise ValueError(f"hidden's last dim ({tuple(hidden.shape)}) must equal weight's H >= 1 ({tuple(weight.shape)})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() or \
            targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {_describe(targets)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading dims {tuple(hidden.shape[:-1])}")
    tensors = {"weight": weight, "targets": targets} | ({} if bias is None else {"bias": bias})
    for name, t in tensors.items():
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be [V]={weight.shape[0]} of dtype {hidden.dtype}, got {_describe(bias)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int (the target of rows to skip, e.g. -100), got {ignore_index!r}")
    if not (_is_number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if softcap is not None and not (_is_number(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    targets = targets.long()
    _check_target_range(targets, weight.shape[0], ignore_index)
    return targets


def _check_target_range(targets, vocab_size, ignore_index):
    """Targets in [0, V) or == ignore_index. CPU data is checked here; CUDA data by a device-side
    assert, so the hot path never waits on the GPU."""
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    if targets.is_cuda:
        torch._assert_async(~bad.any(), f"targets out of range [0, {vocab_size}) (ignore_index={ignore_index})")
    elif bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"targets must lie in [0, V={vocab_size}) or equal ignore_index={ignore_index}; "
            f"targets.flatten()[{i}] = {int(targets.flatten()[i])}"
        )


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return type(x).__name__


def _resolve_impl(impl, device):
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def token_stats(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    ignore_index=-100,
    temperature=1.0,
    softcap=None,
    extras=False,
    impl="auto",
    chunk_tokens=1024,
    chunk_vocab=8192,
) -> TokenStats:
    """`token_logprobs` plus, with `extras=True`, entropy, log sum p^2, mean logit and is-top-1 from
    the same pass over the vocabulary (all of the capped, tempered logits z). Extras carry no gradient.

    With no gradient needed (inference mode, or no input requiring grad) nothing is saved for backward:
    this is the reference-model path.
    """
    targets = validate_head_inputs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                   temperature=temperature, softcap=softcap, impl=impl, chunk_tokens=chunk_tokens,
                                   chunk_vocab=chunk_vocab)
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])
    targets_N = targets.reshape(-1)
    params = HeadParams(ignore_index, 1.0 / temperature, bool(extras), chunk_tokens, chunk_vocab,
                        None if softcap is None else float(softcap))
    impl = _resolve_impl(impl, hidden.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if impl == "triton":
        from fastpo.kernels import logprobs as triton_logprobs

        return triton_logprobs.token_stats_triton(hidden_NH, weight, bias, targets_N, params, needs_grad)
    if not needs_grad:
        with torch.no_grad():
            return _torch_forward(hidden_NH, weight, bias, targets_N, params)[0]
    logp, extras_4N = TorchLogprobsFunction.apply(hidden_NH, weight, bias, targets_N, params)
    return unpack_extras(logp, extras_4N)


def token_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                   impl="auto", **kwargs):
    """fp32 `[N]` log-probs `log softmax((hidden @ weight.T + bias) / temperature)[t, targets[t]]`; with
    `softcap=c` the logits are first capped to `c tanh(logits / c)` (Gemma 2's final-logit soft cap).

    hidden `[N, H]` or `[B, T, H]` (flattened); weight `[V, H]`; targets int `[N]` (or `[B, T]`);
    exactly 0 where `targets == ignore_index`. Differentiable in hidden, weight and bias for any
    upstream gradient; the `[N, V]` logits are never materialized. `impl`: "triton" (CUDA, or CPU
    under TRITON_INTERPRET=1), "torch" (chunked PyTorch, the CPU path) or "auto" (Triton on CUDA).
    """
    return token_stats(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        impl=impl, **kwargs
    ).logp
