"""Triton kernels for one Householder layer on CUDA tensors (rows of an ``(N, n)`` matrix).

With ``V = T U`` (``k x n``, computed by autograd on the host), one layer is::

    P = x U^T                 (N, k)
    z = x - P V + b           y = |z| or z

and, with ``g = dL/dz`` (``dL/dy * sign(z)`` for ``|.|``) and ``Q = g V^T``::

    dL/dx = g - Q U           dL/dU = -Q^T x           dL/dV = -P^T g           dL/db = sum_rows g

* forward: one program per block of rows; reads ``x`` and writes ``y`` (a second read of the
  block comes from L2).
* backward, phase 1: one program per block of rows; writes ``dL/dx`` and the small ``P``, ``Q``.
* backward, phase 2: one program per (column block, row split); re-reads ``x`` and ``dL/dy``,
  recomputes ``sign(z)`` from ``P`` and sums the parameter gradients; the row splits are summed
  on the host (deterministic, no atomics).

Everything is accumulated in float32 (float64 for float64 inputs): float16/bfloat16 inputs are
converted on load and rounded once on store. The matrix products use ``tl.dot`` with IEEE
precision (no TF32). Numerics are tested on the CPU with ``TRITON_INTERPRET=1``
(``tests/test_kernels.py``); speed needs a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .grads import definition_grads, is_batched

__all__ = ["supports", "householder_rows", "MAX_REFLECTIONS"]

MAX_REFLECTIONS = 64
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK_M = 32  # rows per program
_BLOCK_N = 128  # columns per chunk
_ROW_SPLITS = 64  # row splits of the parameter-gradient phase


def supports(x: Tensor, reflections: int) -> bool:
    """Whether these kernels handle rows ``x`` with ``reflections`` Householder vectors."""
    return x.dim() == 2 and x.dtype in _DTYPES and reflections <= MAX_REFLECTIONS


def _k_pad(k: int) -> int:
    return max(16, triton.next_power_of_2(k))  # tl.dot needs every dimension >= 16


@triton.jit
def _project(
    x_ptr,
    u_ptr,
    rows,
    row_mask,
    n,
    stride_x,
    K,
    K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
):
    """P = x[rows] @ U^T, shape (BLOCK_M, K_PAD), over all column chunks."""
    ks = tl.arange(0, K_PAD)
    p = tl.zeros((BLOCK_M, K_PAD), dtype=ACC)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], row_mask[:, None] & col_mask[None, :], other=0)
        u = tl.load(u_ptr + ks[:, None] * n + cols[None, :], (ks[:, None] < K) & col_mask[None, :], other=0)
        p += tl.dot(x.to(ACC), tl.trans(u), input_precision="ieee")
    return p


@triton.jit
def _forward_kernel(
    x_ptr,
    u_ptr,
    v_ptr,
    b_ptr,
    y_ptr,
    N,
    n,
    stride_x,
    stride_y,
    K,
    K_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ABS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    ACC = v_ptr.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int32 offsets overflow at 2**31
    row_mask = rows < N
    ks = tl.arange(0, K_PAD)
    p = _project(x_ptr, u_ptr, rows, row_mask, n, stride_x, K, K_PAD, BLOCK_M, BLOCK_N, ACC)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask, other=0).to(ACC)
        v = tl.load(v_ptr + ks[:, None] * n + cols[None, :], (ks[:, None] < K) & col_mask[None, :], other=0)
        z = x - tl.dot(p, v, input_precision="ieee")
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, col_mask, other=0)[None, :]
        if ABS:
            z = tl.abs(z)
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], z.to(y_ptr.dtype.element_ty), mask)


@triton.jit
def _grad_z(x, gy, p, v, b_ptr, cols, col_mask, HAS_BIAS: tl.constexpr, ABS: tl.constexpr):
    """g = dL/dz on a tile: dL/dy * sign(x - P V + b) for |.|, else dL/dy."""
    if ABS:
        z = x - tl.dot(p, v, input_precision="ieee")
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, col_mask, other=0)[None, :]
        sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0)).to(gy.dtype)
        return gy * sign
    return gy


@triton.jit
def _backward_rows_kernel(
    x_ptr,
    gy_ptr,
    u_ptr,
    v_ptr,
    b_ptr,
    dx_ptr,
    p_ptr,
    q_ptr,
    N,
    n,
    stride_x,
    stride_g,
    stride_dx,
    K,
    K_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ABS: tl.constexpr,
    NEED_DX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Phase 1: P, Q = g V^T and dL/dx = g - Q U for a block of rows."""
    ACC = v_ptr.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int32 offsets overflow at 2**31
    row_mask = rows < N
    ks = tl.arange(0, K_PAD)
    p = _project(x_ptr, u_ptr, rows, row_mask, n, stride_x, K, K_PAD, BLOCK_M, BLOCK_N, ACC)
    q = tl.zeros((BLOCK_M, K_PAD), dtype=ACC)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        mask = row_mask[:, None] & col_mask[None, :]
        vmask = (ks[:, None] < K) & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask, other=0).to(ACC)
        gy = tl.load(gy_ptr + rows[:, None] * stride_g + cols[None, :], mask, other=0).to(ACC)
        v = tl.load(v_ptr + ks[:, None] * n + cols[None, :], vmask, other=0)
        g = _grad_z(x, gy, p, v, b_ptr, cols, col_mask, HAS_BIAS, ABS)
        q += tl.dot(g, tl.trans(v), input_precision="ieee")
    pq_offsets = rows[:, None] * K_PAD + ks[None, :]
    tl.store(p_ptr + pq_offsets, p, row_mask[:, None])
    tl.store(q_ptr + pq_offsets, q, row_mask[:, None])
    if NEED_DX:
        for c0 in range(0, n, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_mask = cols < n
            mask = row_mask[:, None] & col_mask[None, :]
            vmask = (ks[:, None] < K) & col_mask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask, other=0).to(ACC)
            gy = tl.load(gy_ptr + rows[:, None] * stride_g + cols[None, :], mask, other=0).to(ACC)
            v = tl.load(v_ptr + ks[:, None] * n + cols[None, :], vmask, other=0)
            u = tl.load(u_ptr + ks[:, None] * n + cols[None, :], vmask, other=0)
            g = _grad_z(x, gy, p, v, b_ptr, cols, col_mask, HAS_BIAS, ABS)
            dx = g - tl.dot(q, u, input_precision="ieee")
            tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask)


@triton.jit
def _backward_params_kernel(
    x_ptr,
    gy_ptr,
    v_ptr,
    b_ptr,
    p_ptr,
    q_ptr,
    du_ptr,
    dv_ptr,
    db_ptr,
    N,
    n,
    stride_x,
    stride_g,
    rows_per_split,
    K,
    K_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ABS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Phase 2: per column block and row split, dU = -Q^T x, dV = -P^T g, db = sum_rows g."""
    ACC = v_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    col_mask = cols < n
    ks = tl.arange(0, K_PAD)
    vmask = (ks[:, None] < K) & col_mask[None, :]
    v = tl.load(v_ptr + ks[:, None] * n + cols[None, :], vmask, other=0)
    du = tl.zeros((K_PAD, BLOCK_N), dtype=ACC)
    dv = tl.zeros((K_PAD, BLOCK_N), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    start = split * rows_per_split
    for r0 in range(start, start + rows_per_split, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = (rows < N) & (rows < start + rows_per_split)
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask, other=0).to(ACC)
        gy = tl.load(gy_ptr + rows[:, None] * stride_g + cols[None, :], mask, other=0).to(ACC)
        p = tl.load(p_ptr + rows[:, None] * K_PAD + ks[None, :], row_mask[:, None], other=0)
        q = tl.load(q_ptr + rows[:, None] * K_PAD + ks[None, :], row_mask[:, None], other=0)
        g = _grad_z(x, gy, p, v, b_ptr, cols, col_mask, HAS_BIAS, ABS)
        du -= tl.dot(tl.trans(q), x, input_precision="ieee")
        dv -= tl.dot(tl.trans(p), g, input_precision="ieee")
        db += tl.sum(g, axis=0)
    out = split * K * n + ks[:, None] * n + cols[None, :]
    tl.store(du_ptr + out, du, vmask)
    tl.store(dv_ptr + out, dv, vmask)
    tl.store(db_ptr + split * n + cols, db, col_mask)


def _forward(x: Tensor, u: Tensor, v: Tensor, b: Tensor | None, apply_abs: bool, out_dtype: torch.dtype) -> Tensor:
    rows, n = x.shape
    k = u.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _forward_kernel[(triton.cdiv(rows, _BLOCK_M),)](
        x, u, v, b if b is not None else v, y, rows, n, x.stride(0), y.stride(0), k,
        K_PAD=_k_pad(k), HAS_BIAS=b is not None, ABS=apply_abs, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
    )  # fmt: skip
    return y


def _backward(
    grad: Tensor, x: Tensor, u: Tensor, v: Tensor, b: Tensor | None, apply_abs: bool, need_x: bool, need_params: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    rows, n = x.shape
    k, k_pad = u.shape[0], _k_pad(u.shape[0])
    acc = v.dtype
    p = torch.empty(rows, k_pad, dtype=acc, device=x.device)
    q = torch.empty_like(p)
    dx = torch.empty_like(x) if need_x else None
    bias = b if b is not None else v
    _backward_rows_kernel[(triton.cdiv(rows, _BLOCK_M),)](
        x, grad, u, v, bias, dx if dx is not None else x, p, q, rows, n, x.stride(0), grad.stride(0),
        dx.stride(0) if dx is not None else 0, k,
        K_PAD=k_pad, HAS_BIAS=b is not None, ABS=apply_abs, NEED_DX=need_x, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
    )  # fmt: skip
    if not need_params:
        return dx, None, None, None
    splits = max(1, min(_ROW_SPLITS, triton.cdiv(rows, _BLOCK_M)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), _BLOCK_M) * _BLOCK_M
    splits = triton.cdiv(rows, rows_per_split)
    du = torch.empty(splits, k, n, dtype=acc, device=x.device)
    dv = torch.empty_like(du)
    db = torch.empty(splits, n, dtype=acc, device=x.device)
    _backward_params_kernel[(triton.cdiv(n, _BLOCK_N), splits)](
        x, grad, v, bias, p, q, du, dv, db, rows, n, x.stride(0), grad.stride(0), rows_per_split, k,
        K_PAD=k_pad, HAS_BIAS=b is not None, ABS=apply_abs, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
    )  # fmt: skip
    return dx, du.sum(0), dv.sum(0), db.sum(0)


def _reference(x: Tensor, u: Tensor, v: Tensor, b: Tensor | None, apply_abs: bool) -> Tensor:
    z = x.to(v.dtype) - (x.to(v.dtype) @ u.transpose(0, 1)) @ v
    if b is not None:
        z = z + b
    return (z.abs() if apply_abs else z).to(x.dtype)


class _HouseholderRowsTriton(torch.autograd.Function):
    """``z = x - (x U^T) V + b`` (``V = T U``), optionally ``|z|``, on CUDA rows; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, u: Tensor, v: Tensor, b: Tensor | None, apply_abs: bool, out_dtype: torch.dtype
    ) -> Tensor:
        ctx.apply_abs, ctx.out_dtype = apply_abs, out_dtype
        ctx.save_for_backward(x, u, v, b)
        return _forward(x, u, v, b, apply_abs, out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, u, v, b = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        # create_graph=True, or a vmapped backward (batched gradients, which a kernel cannot read): the definition
        if torch.is_grad_enabled() or is_batched(grad_out):
            fn = lambda x, u, v, b: _reference(x, u, v, b, ctx.apply_abs).to(ctx.out_dtype)  # noqa: E731
            return (*definition_grads(fn, (x, u, v, b), needs, grad_out), None, None)
        with torch.autocast(grad_out.device.type, enabled=False):  # as the forward (see functional._HouseholderRows)
            dx, du, dv, db = _backward(grad_out.contiguous(), x, u, v, b, ctx.apply_abs, needs[0], any(needs[1:]))
        db = db if needs[3] and b is not None else None
        return dx, du if needs[1] else None, dv if needs[2] else None, db, None, None


def householder_rows(
    x: Tensor, u: Tensor, t: Tensor, b: Tensor | None, apply_abs: bool, out_dtype: torch.dtype | None = None
) -> Tensor:
    """One layer ``f(x - ((x U^T) T) U + b)`` on contiguous rows ``x`` ``(N, n)``.

    ``u``: ``(k, n)``, ``t``: ``(k, k)``, ``b``: ``(n,)`` or ``None``, in the accumulation dtype;
    the result is in ``out_dtype`` (default: ``x``'s).
    """
    out_dtype = out_dtype or x.dtype
    v = (t @ u).contiguous()
    u = u.contiguous()
    if torch.is_grad_enabled() and any(w is not None and w.requires_grad for w in (x, u, v, b)):
        return _HouseholderRowsTriton.apply(x, u, v, b, apply_abs, out_dtype)
    return _forward(x, u, v, b, apply_abs, out_dtype)
