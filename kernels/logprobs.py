"""Fused linear log-softmax gather: per-token log-probs of the targets from hidden states and W.

Shapes: N tokens, H hidden size, V vocabulary, S vocabulary splits, C tokens per backward chunk.

    a_tv   = h_t . W_v + b_v                     fp32 accumulator
    z_tv   = a_tv * scale                        scale = 1 / temperature
           = c tanh(a_tv / c) * scale            with a soft cap c (SOFTCAP, Gemma 2)
    logp_t = z_t,y_t - logsumexp_v z_tv

Forward (`_logprobs_fwd_kernel`): a BLOCK_N x BLOCK_V tiled GEMM over H whose epilogue folds each logit
tile into online log-sum-exp partials (fastpo.kernels.partials.Partials) per (row, split); the target logit is
picked from the same fp32 accumulator. The vocabulary is split over grid axis 1 so that small N still
fills the GPU; `fastpo.kernels.partials.combine_partials` merges the splits in a fixed order (deterministic, no
atomics). Only `lse` [N] is kept for backward.

Backward (`_logprobs_bwd_kernel`): per chunk of C rows, recompute the logit tiles and write

    dz_tv = g_t (1[v = y_t] - p_tv) * scale       (1 - p_ty) formed in fp32 before any rounding
            * (1 - tanh^2(a_tv / c))              with a soft cap (the chain factor dz/da)

into a bounded [C, V] buffer in the inputs' dtype, then dH = dz W and dW += dz^T h run as cuBLAS GEMMs
with fp32 accumulation (dW accumulates across chunks in fp32 and is cast once).

FLOPs: forward 2NHV; backward 6NHV (recompute + dH + dW). Bytes: the op is compute-bound at model
shapes (arithmetic intensity in the thousands); the dz buffer costs ~6CV bytes of traffic per chunk.

Ignored rows (targets == ignore_index) are moved behind the valid ones by a stable device-side sort,
and `count` (a device scalar) bounds the work: programs past it exit at once, so ignored rows cost no
FLOPs in either kernel and nothing waits on the host.

Numerics: int64 row and column offsets; targets passed as int32 (int64 label loads that are not 16-byte
aligned miscompile in some Triton versions); vocabulary tail masked with -inf; fp32 inputs use IEEE
fp32 dots (TF32 would cost ~1e-3 relative error).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastpo.kernels._compile import (
    FP_FUSION,
    TORCH_TO_TRITON,
    divisibility_attrs,
    interpreting,
    store_dtype,
    upcast_dot,
)
from fastpo.kernels.partials import (
    HeadParams,
    Partials,
    TokenStats,
    addmm_fp32_,
    combine_partials,
    pack_extras,
    unpack_extras,
)

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_H: int
    num_warps: int
    num_stages: int


# Hopper (and other CUDA) tiles, per operand width. 16-bit: 128x128 logit tiles with a 64-deep K step,
# three cp.async stages (3 * (128 + 128) * 64 * 2 B = 96 KiB of shared memory) feeding wgmma; the fp32
# accumulator and the epilogue fit in 255 registers without spills (checked by ptxas in the AOT test).
# fp32 (IEEE dots, no wgmma): 128x64x32 tiles, since 128x128 spills the accumulator.
CUDA_CONFIGS = {
    "fwd": KernelConfig(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    "bwd": KernelConfig(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
}
CUDA_CONFIGS_FP32 = {
    "fwd": KernelConfig(BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=3),
    "bwd": KernelConfig(BLOCK_N=128, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=3),
}
# The interpreter runs each program as numpy code: few, mid-sized tiles are fastest.
INTERPRETER_CONFIGS = {
    "fwd": KernelConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=1),
    "bwd": KernelConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=1),
}


@triton.jit
def _logit_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """h[rows] W[offs_v]^T + b[offs_v] as a [BLOCK_N, BLOCK_V] fp32 tile, K-loop over H (shared by the
    forward and the backward recompute)."""
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_H):
        k_mask = (k0 + offs_h) < H
        h = tl.load(
            hidden_ptr + rows[:, None] * stride_hn + (k0 + offs_h)[None, :] * stride_hh,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + offs_v[None, :] * stride_wv + (k0 + offs_h)[:, None] * stride_wh,
            mask=col_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        if UPCAST_DOT:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _soft_cap(a, softcap):
    """(tanh(a / c), 1 - tanh^2(a / c)) from e = exp(-2|a / c|): tanh = sign(a) (1 - e) / (1 + e) and
    1 - tanh^2 = 4e / (1 + e)^2, which keeps its relative precision where the logit saturates."""
    x = a / softcap
    e = tl.exp(-2.0 * tl.abs(x))
    r = 1.0 / (1.0 + e)
    t = (1.0 - e) * r
    return tl.where(x < 0, -t, t), 4.0 * e * r * r


@triton.jit
def _logprobs_fwd_kernel(
    # data ptrs
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    order_ptr,
    count_ptr,
    m_ptr,
    s_ptr,
    zy_ptr,
    ent_ptr,
    sq_ptr,
    zsum_ptr,
    before_ptr,
    # shapes
    N,
    V,
    H,
    cols_per_split,
    # strides
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    # constants
    scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    EXTRAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    n_valid = tl.load(count_ptr)
    if pid_n * BLOCK_N >= n_valid:
        return
    # 1. rows of this block: positions in valid-first order -> source rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    rows = tl.load(order_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    y = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    # 2. online log-sum-exp over the tiles of this vocabulary split
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    ent = tl.zeros((BLOCK_N,), tl.float32)
    sq = tl.zeros((BLOCK_N,), tl.float32)
    zsum = tl.zeros((BLOCK_N,), tl.float32)
    before = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_mask = offs_v < v_hi
        # 2a. logit tile z = (h W^T + b) * scale (soft-capped first), fp32 accumulator
        acc = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H,
                          stride_hn, stride_hh, stride_wv, stride_wh,
                          HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
        if SOFTCAP:
            acc = _soft_cap(acc, softcap)[0] * softcap
        z = tl.where(col_mask[None, :], acc * scale, float("-inf"))
        # 2b. epilogue: m' = max(m, max z); s = s e^(m - m') + sum e^(z - m')
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        is_target = offs_v[None, :] == y[:, None]
        zy += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        if EXTRAS:
            z0 = tl.where(col_mask[None, :], z, 0.0)
            ent = ent * alpha + tl.sum(e * z0, axis=1)
            sq = sq * alpha * alpha + tl.sum(e * e, axis=1)
            zsum += tl.sum(z0, axis=1)
            left = offs_v[None, :] < y[:, None]
            before = tl.maximum(before, tl.max(tl.where(left, z, float("-inf")), axis=1))
        m = m_new
    # 3. partials of this (row, split)
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(zy_ptr + out, zy, mask=row_mask)
    if EXTRAS:
        tl.store(ent_ptr + out, ent, mask=row_mask)
        tl.store(sq_ptr + out, sq, mask=row_mask)
        tl.store(zsum_ptr + out, zsum, mask=row_mask)
        tl.store(before_ptr + out, before, mask=row_mask)


@triton.jit
def _logprobs_bwd_kernel(
    # data ptrs
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    order_ptr,
    count_ptr,
    lse_ptr,
    grad_ptr,
    dz_ptr,
    # shapes
    V,
    H,
    chunk_start,
    chunk_rows,
    # strides
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_dzn,
    # constants
    scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1).to(tl.int64)
    n_valid = tl.load(count_ptr)
    offs_local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = chunk_start + offs_local
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs_v < V
    dz_ptrs = dz_ptr + offs_local[:, None].to(tl.int64) * stride_dzn + offs_v[None, :]
    store_mask = (offs_local < chunk_rows)[:, None] & col_mask[None, :]
    if chunk_start + pid_n * BLOCK_N >= n_valid:
        # ignored rows only: the GEMMs that follow read zeros here
        tl.store(dz_ptrs, tl.zeros((BLOCK_N, BLOCK_V), dz_ptr.dtype.element_ty), mask=store_mask)
        return
    # 1. rows, targets, lse and upstream gradients of this block
    row_mask = (offs_n < n_valid) & (offs_local < chunk_rows)
    rows = tl.load(order_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    y = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    # 2. recompute the logit tile
    acc = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, offs_v, col_mask, H,
                      stride_hn, stride_hh, stride_wv, stride_wh,
                      HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H)
    # 3. dz = g (onehot - p) * scale, with 1 - p_y formed in fp32, times dz/da under a soft cap
    if SOFTCAP:
        t, cap_grad = _soft_cap(acc, softcap)
        acc = t * softcap
    p = tl.exp(acc * scale - lse[:, None])
    onehot_minus_p = tl.where(offs_v[None, :] == y[:, None], 1.0 - p, -p)
    dz = onehot_minus_p * (g * scale)[:, None]
    if SOFTCAP:
        dz = dz * cap_grad
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=store_mask)


# ----------------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------------


def kernel_config(phase: str, device: torch.device, dtype: torch.dtype) -> KernelConfig:
    if device.type != "cuda":
        return INTERPRETER_CONFIGS[phase]
    return (CUDA_CONFIGS_FP32 if dtype == torch.float32 else CUDA_CONFIGS)[phase]


@functools.lru_cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(num_row_blocks: int, V: int, cfg: KernelConfig, device: torch.device) -> int:
    """Vocabulary splits so that row blocks x splits gives ~2 waves of programs on the GPU (2 on CPU,
    which exercises the split merge)."""
    v_tiles = triton.cdiv(V, cfg.BLOCK_V)
    target = 2 * _num_sms(device.index or 0) if device.type == "cuda" else 2 * num_row_blocks
    return max(1, min(v_tiles, triton.cdiv(target, num_row_blocks)))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_launchable(hidden: torch.Tensor):
    if hidden.dtype not in TRITON_DTYPES:
        raise TypeError(f"impl='triton' supports hidden dtypes {TRITON_DTYPES}, got {hidden.dtype}")
    if hidden.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"impl='triton' needs CUDA tensors (got {hidden.device}); on CPU set TRITON_INTERPRET=1 before "
            "triton is imported, or use impl='torch'"
        )


def valid_first_order(targets_N: torch.Tensor, ignore_index: int):
    """(order [N] int64, count [1] int32): rows with a target first, in their original order."""
    valid = targets_N != ignore_index
    order = torch.argsort((~valid).to(torch.int8), stable=True)
    return order, valid.sum(dtype=torch.int32).reshape(1)


def logprobs_fwd(hidden_NH, weight_VH, bias_V, targets_N, params: HeadParams, num_splits=None):
    """Forward launcher: returns (TokenStats, lse [N] fp32, order, count)."""
    _check_launchable(hidden_NH)
    N, H = hidden_NH.shape
    V = weight_VH.shape[0]
    cfg = kernel_config("fwd", hidden_NH.device, hidden_NH.dtype)
    targets_i32 = targets_N.to(torch.int32)
    order, count = valid_first_order(targets_N, params.ignore_index)
    row_blocks = max(1, triton.cdiv(N, cfg.BLOCK_N))
    S = num_splits or _num_splits(row_blocks, V, cfg, hidden_NH.device)
    cols_per_split = triton.cdiv(triton.cdiv(V, S), cfg.BLOCK_V) * cfg.BLOCK_V
    S = triton.cdiv(V, cols_per_split)  # every split holds at least one column
    f32 = dict(dtype=torch.float32, device=hidden_NH.device)
    # ignored rows are never written: m=0, s=1 keep their (masked-out) merge finite
    partials = Partials(
        m=torch.zeros((S, N), **f32),
        s=torch.ones((S, N), **f32),
        zy=torch.zeros((S, N), **f32),
        ent=torch.zeros((S, N), **f32) if params.extras else None,
        sq=torch.ones((S, N), **f32) if params.extras else None,
        zsum=torch.zeros((S, N), **f32) if params.extras else None,
        before=torch.zeros((S, N), **f32) if params.extras else None,
    )
    dummy = partials.m
    _logprobs_fwd_kernel[(row_blocks, S)](
        # data ptrs
        hidden_NH,
        weight_VH,
        bias_V if bias_V is not None else dummy,
        targets_i32,
        order,
        count,
        *(t if t is not None else dummy for t in partials),
        # shapes
        N,
        V,
        H,
        cols_per_split,
        # strides
        hidden_NH.stride(0),
        hidden_NH.stride(1),
        weight_VH.stride(0),
        weight_VH.stride(1),
        # constants
        params.scale,
        params.softcap or 1.0,
        HAS_BIAS=bias_V is not None,
        SOFTCAP=params.softcap is not None,
        EXTRAS=params.extras,
        DOT_PRECISION=_dot_precision(hidden_NH.dtype),
        UPCAST_DOT=upcast_dot(hidden_NH.dtype),
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_V=cfg.BLOCK_V,
        BLOCK_H=cfg.BLOCK_H,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **FP_FUSION,
    )
    stats, lse = combine_partials(partials, targets_N != params.ignore_index, V, params.extras)
    return stats, lse, order, count


def logprobs_bwd(grad_N, hidden_NH, weight_VH, bias_V, targets_N, lse_N, order, count, params, needs):
    """Backward launcher: (dH, dW, db) for an upstream gradient `grad_N` (None where not needed)."""
    N, H = hidden_NH.shape
    V = weight_VH.shape[0]
    cfg = kernel_config("bwd", hidden_NH.device, hidden_NH.dtype)
    C = max(1, min(params.chunk_tokens, N))
    targets_i32 = targets_N.to(torch.int32)
    grad = grad_N.float().contiguous()
    dz_CV = torch.empty((C, V), dtype=store_dtype(hidden_NH.dtype), device=hidden_NH.device)
    dh = torch.zeros_like(hidden_NH) if needs[0] else None
    dW = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if needs[1] else None
    db = torch.zeros(V, dtype=torch.float32, device=weight_VH.device) if needs[2] else None
    for c0 in range(0, N, C):
        rows = min(C, N - c0)
        _logprobs_bwd_kernel[(triton.cdiv(rows, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V))](
            # data ptrs
            hidden_NH,
            weight_VH,
            bias_V if bias_V is not None else lse_N,
            targets_i32,
            order,
            count,
            lse_N,
            grad,
            dz_CV,
            # shapes
            V,
            H,
            c0,
            rows,
            # strides
            hidden_NH.stride(0),
            hidden_NH.stride(1),
            weight_VH.stride(0),
            weight_VH.stride(1),
            dz_CV.stride(0),
            # constants
            params.scale,
            params.softcap or 1.0,
            HAS_BIAS=bias_V is not None,
            SOFTCAP=params.softcap is not None,
            DOT_PRECISION=_dot_precision(hidden_NH.dtype),
            UPCAST_DOT=upcast_dot(hidden_NH.dtype),
            BLOCK_N=cfg.BLOCK_N,
            BLOCK_V=cfg.BLOCK_V,
            BLOCK_H=cfg.BLOCK_H,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **FP_FUSION,
        )
        dz = dz_CV[:rows].to(hidden_NH.dtype)
        src = order[c0 : c0 + rows]
        if dh is not None:
            dh.index_copy_(0, src, dz @ weight_VH)
        if dW is not None:
            addmm_fp32_(dW, dz.T, hidden_NH.index_select(0, src))
        if db is not None:
            db += dz.sum(0, dtype=torch.float32)
    return dh, dW, db


# Contiguous inputs: the JIT turns the unit strides into constants (`_compile.divisibility_attrs` for the rest).
_UNIT_STRIDES = ("stride_hh", "stride_wh")
_DIVISIBLE = ("V", "H", "stride_hn", "stride_wv", "stride_dzn")


def _aot_spec(name, kernel, sig, const, cfg):
    const = const | dict.fromkeys(_UNIT_STRIDES, 1)
    sig = sig | dict.fromkeys(const, "constexpr")
    return name, kernel, sig, const, divisibility_attrs(sig, _DIVISIBLE), _options(cfg)


def aot_specs(configs=None):
    """Every compiled variant of the two kernels as (name, kernel, signature, constexprs, attrs, options), for
    ahead-of-time compilation (`triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=...)`).
    `configs`: {"fwd": KernelConfig, "bwd": KernelConfig} for every dtype; default: the CUDA tables."""
    cuda = torch.device("cuda")
    strides = dict.fromkeys(["stride_hn", "stride_hh", "stride_wv", "stride_wh"], "i32")
    for dtype, ty in TORCH_TO_TRITON.items():
        for has_bias, softcap in itertools.product((False, True), (False, True)):
            table = configs or {phase: kernel_config(phase, cuda, dtype) for phase in ("fwd", "bwd")}
            common = dict(HAS_BIAS=has_bias, SOFTCAP=softcap, DOT_PRECISION=_dot_precision(dtype), UPCAST_DOT=False)
            tag = f"{ty}-bias{int(has_bias)}-cap{int(softcap)}"
            for extras in (False, True):
                cfg = table["fwd"]
                sig = {"hidden_ptr": f"*{ty}", "weight_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "targets_ptr": "*i32",
                       "order_ptr": "*i64", "count_ptr": "*i32"}
                sig |= {f"{name}_ptr": "*fp32" for name in Partials._fields}
                sig |= dict.fromkeys(["N", "V", "H", "cols_per_split"], "i32") | strides | {"scale": "fp32", "softcap": "fp32"}
                const = common | dict(EXTRAS=extras, BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H)
                yield _aot_spec(f"fwd-{tag}-extras{int(extras)}", _logprobs_fwd_kernel, sig, const, cfg)
            cfg = table["bwd"]
            sig = {"hidden_ptr": f"*{ty}", "weight_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "targets_ptr": "*i32",
                   "order_ptr": "*i64", "count_ptr": "*i32", "lse_ptr": "*fp32", "grad_ptr": "*fp32",
                   "dz_ptr": f"*{ty}"}
            sig |= dict.fromkeys(["V", "H", "chunk_start", "chunk_rows"], "i32") | strides | {"stride_dzn": "i32"}
            sig |= {"scale": "fp32", "softcap": "fp32"}
            const = common | dict(BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_H=cfg.BLOCK_H)
            yield _aot_spec(f"bwd-{tag}", _logprobs_bwd_kernel, sig, const, cfg)


def _options(cfg: KernelConfig) -> dict:
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **FP_FUSION}


# ----------------------------------------------------------------------------------------------------
# autograd binding and entry point
# ----------------------------------------------------------------------------------------------------


class TritonLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, targets_N, params: HeadParams):
        stats, lse, order, count = logprobs_fwd(hidden_NH, weight_VH, bias_V, targets_N, params)
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, targets_N, lse, order, count)
        ctx.params = params
        extras = pack_extras(stats) if params.extras else lse.new_empty(0)
        ctx.mark_non_differentiable(extras)
        return stats.logp, extras

    @staticmethod
    def backward(ctx, grad_logp, _grad_extras):
        hidden, weight, bias, targets, lse, order, count = ctx.saved_tensors
        dh, dW, db = logprobs_bwd(
            grad_logp, hidden, weight, bias, targets, lse, order, count, ctx.params, ctx.needs_input_grad
        )
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return dh, cast(dW, weight), cast(db, bias), None, None


def token_stats_triton(hidden_NH, weight_VH, bias_V, targets_N, params: HeadParams, needs_grad: bool) -> TokenStats:
    """Triton implementation of `fastpo.ops.token_stats` on flattened, validated inputs."""
    hidden_NH = hidden_NH.contiguous()
    if not needs_grad:
        # reference-model path: forward only, nothing kept
        with torch.no_grad():
            return logprobs_fwd(hidden_NH, weight_VH, bias_V, targets_N, params)[0]
    logp, extras = TritonLogprobsFunction.apply(hidden_NH, weight_VH, bias_V, targets_N, params)
    return unpack_extras(logp, extras)
