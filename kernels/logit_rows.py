"""Row statistics and row gradients of a materialized fp32 logit chunk: the pair-fused path's elementwise work.

Shapes: n rows of one chunk of whole groups, V vocabulary. `z [n, V]` fp32 holds the chunk's logits (already
scaled by 1 / temperature and soft-capped), written once by the logits GEMM.

Forward (`_logit_rows_fwd_kernel`), one program per row, one read of z:

    lse_t  = logsumexp_v z_tv                    (online: m, s = sum e^(z - m))
    logp_t = z_t,y_t - lse_t                     0 where y_t == ignore_index
    mean_t = (1/V) sum_v z_tv                    TRL's `logits/*` metrics
    lsq_t  = log sum_v p_tv^2 = log sum_v e^(2(z_tv - m)) - 2 log s       WPO weights

Backward (`_logit_rows_bwd_kernel`), one program per (row, BLOCK_V columns), one read of z and one write:

    dz_tv = g_t (1[v = y_t] - p_tv) * scale       (1 - p_ty) formed in fp32
          * (1 - tanh^2)                          under a soft cap c: tanh = z / (c * scale)

written in the dtype of the GEMMs that follow (dH = dz W, dW += dz^T h), so the chunk costs 2 n H V FLOPs of
logits GEMM + 4 n H V of gradient GEMMs and, besides them, ~3 passes over the n x V chunk instead of the
dozen a chain of PyTorch elementwise ops makes. Bytes: fwd 4nV read; bwd 4nV read + 2nV (bf16) write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastpo.kernels._compile import FP_FUSION, TORCH_TO_TRITON, divisibility_attrs, interpreting, store_dtype

# Columns per step: 4096 fp32 = 16 KiB per row per iteration keeps every load wide and the loop short.
CUDA_BLOCK_V = 4096
INTERPRETER_BLOCK_V = 64


@triton.jit
def _logit_rows_fwd_kernel(
    z_ptr,
    targets_ptr,
    lse_ptr,
    logp_ptr,
    mean_ptr,
    lsq_ptr,
    V,
    stride_zn,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zn
    y = tl.load(targets_ptr + row)
    # 1. online max, sum of e^(z - m), sum of e^(2(z - m)) and sum of z over the row
    m = float("-inf")
    s = 0.0
    sq = 0.0
    zsum = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * alpha + tl.sum(e, axis=0)
        sq = sq * alpha * alpha + tl.sum(e * e, axis=0)
        zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        m = m_new
    # 2. the target logit, one load
    valid = y != ignore_index
    zy = tl.load(z_row + tl.where(valid, y, 0).to(tl.int64))
    lse = m + tl.log(s)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(valid, zy - lse, 0.0))
    tl.store(mean_ptr + row, zsum / V)
    tl.store(lsq_ptr + row, tl.log(sq) - 2.0 * tl.log(s))


@triton.jit
def _logit_rows_bwd_kernel(
    z_ptr,
    lse_ptr,
    targets_ptr,
    grad_ptr,
    dz_ptr,
    V,
    stride_zn,
    stride_dzn,
    ignore_index,
    scale,
    inv_cap_scale,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    # 1. the row's target, lse and upstream gradient (0 for ignored rows)
    y = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.where(y != ignore_index, tl.load(grad_ptr + row), 0.0)
    # 2. dz = g (onehot - p) * scale, with 1 - p_y formed in fp32
    z = tl.load(z_ptr + row * stride_zn + offs, mask=mask, other=0.0)
    p = tl.exp(z - lse)
    dz = tl.where(offs == y, 1.0 - p, -p) * (g * scale)
    # 3. soft cap chain factor dz/da = 1 - tanh^2, tanh recovered from the capped logit
    if SOFTCAP:
        t = z * inv_cap_scale
        dz = dz * (1.0 - t * t)
    tl.store(dz_ptr + row * stride_dzn + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------------


def _block_v(device: torch.device) -> int:
    return CUDA_BLOCK_V if device.type == "cuda" else INTERPRETER_BLOCK_V


def _check(z_nV: torch.Tensor, targets_n: torch.Tensor):
    if z_nV.dtype != torch.float32 or z_nV.dim() != 2 or z_nV.stride(1) != 1:
        raise ValueError(f"z must be a row-major [n, V] fp32 tensor, got {tuple(z_nV.shape)} {z_nV.dtype}")
    if targets_n.shape != z_nV.shape[:1]:
        raise ValueError(f"targets must be [n]={z_nV.shape[0]}, got {tuple(targets_n.shape)}")
    if z_nV.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton row kernels need CUDA tensors (got {z_nV.device}) or TRITON_INTERPRET=1")


def logit_rows_fwd(z_nV: torch.Tensor, targets_n: torch.Tensor, ignore_index: int):
    """(lse, logp, mean_logits, log_sum_sq_probs), each `[n]` fp32, from the fp32 logits `z_nV`."""
    _check(z_nV, targets_n)
    n, V = z_nV.shape
    out = torch.empty((4, n), dtype=torch.float32, device=z_nV.device)
    if n == 0:
        return out.unbind(0)
    lse, logp, mean, lsq = out.unbind(0)
    _logit_rows_fwd_kernel[(n,)](
        z_nV, targets_n.to(torch.int32), lse, logp, mean, lsq, V, z_nV.stride(0), ignore_index,
        BLOCK_V=_block_v(z_nV.device), num_warps=8 if z_nV.is_cuda else 1, **FP_FUSION,
    )  # fmt: skip
    return lse, logp, mean, lsq


def logit_rows_bwd(z_nV, lse_n, targets_n, grad_n, *, ignore_index, scale, softcap=None, out_dtype=torch.float32):
    """dz `[n, V]` in `out_dtype` (see module docstring); an fp32 result overwrites `z_nV` in place (under the
    interpreter bf16 too, then rounded by torch: `_compile.store_dtype`)."""
    _check(z_nV, targets_n)
    n, V = z_nV.shape
    kernel_dtype = store_dtype(out_dtype)
    dz = z_nV if kernel_dtype == torch.float32 else torch.empty((n, V), dtype=kernel_dtype, device=z_nV.device)
    if n == 0:
        return dz.to(out_dtype)
    block_v = _block_v(z_nV.device)
    _logit_rows_bwd_kernel[(n, triton.cdiv(V, block_v))](
        z_nV, lse_n, targets_n.to(torch.int32), grad_n.float().contiguous(), dz, V, z_nV.stride(0), dz.stride(0),
        ignore_index, scale, 1.0 / (softcap * scale) if softcap is not None else 1.0,
        SOFTCAP=softcap is not None, BLOCK_V=block_v, num_warps=8 if z_nV.is_cuda else 1, **FP_FUSION,
    )  # fmt: skip
    return dz.to(out_dtype)


def aot_specs():
    """Every compiled variant as (name, kernel, signature, constexprs, attrs, options), specialized as the JIT
    specializes contiguous 16-byte aligned inputs (`triton.compile(ASTSource(...), target=...)`)."""
    const = {"BLOCK_V": CUDA_BLOCK_V}
    sig = {"z_ptr": "*fp32", "targets_ptr": "*i32", "lse_ptr": "*fp32", "logp_ptr": "*fp32", "mean_ptr": "*fp32",
           "lsq_ptr": "*fp32", "V": "i32", "stride_zn": "i32", "ignore_index": "i32", "BLOCK_V": "constexpr"}
    yield "rows-fwd", _logit_rows_fwd_kernel, sig, const, _divisible(sig), {"num_warps": 8, **FP_FUSION}
    for dtype, ty in TORCH_TO_TRITON.items():
        for softcap in (False, True):
            sig = {"z_ptr": "*fp32", "lse_ptr": "*fp32", "targets_ptr": "*i32", "grad_ptr": "*fp32",
                   "dz_ptr": f"*{ty}", "V": "i32", "stride_zn": "i32", "stride_dzn": "i32", "ignore_index": "i32",
                   "scale": "fp32", "inv_cap_scale": "fp32", "SOFTCAP": "constexpr", "BLOCK_V": "constexpr"}
            yield (f"rows-bwd-{ty}-cap{int(softcap)}", _logit_rows_bwd_kernel, sig, const | {"SOFTCAP": softcap},
                   _divisible(sig), {"num_warps": 8, **FP_FUSION})


def _divisible(sig):
    return divisibility_attrs(sig, ("V", "stride_zn", "stride_dzn"))
