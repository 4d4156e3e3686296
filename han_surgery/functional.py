"""Functional core of the Householder layers.

A product of ``k`` Householder reflections is applied in *compact WY* form
(Schreiber & Van Loan, 1989; Joffrain et al., "Accumulating Householder
transformations, revisited", 2006)::

    H_i = I - 2 u_i u_i^T              (u_i unit vectors, the columns of U in R^{n x k})
    H_k ... H_1 = I - U T^T U^T         T^{-1} = triu(U^T U, 1) + I / 2   (k x k, upper triangular)

so for row vectors ``x`` (shape ``(N, n)``)::

    y = x (H_k ... H_1)^T + b = x - (x U) T U^T + b

This costs two skinny matrix products, ``O(N n k)`` flops and ``O(n k + k^2)``
memory, and never materialises an ``n x n`` matrix. ``k = 1`` is the paper's
Han-layer, for which ``T = [[2]]`` and ``y = x - 2 (x . u) u + b``.

:func:`householder_affine` runs the large ``N``-sized work in one custom
autograd function with a hand-written backward (few passes over memory and
few fresh ``N x n`` buffers: see :class:`_HouseholderAffine`), while the tiny
``U``/``T`` algebra stays in ordinary autograd. It works under
``torch.autocast``, ``torch.compile`` and ``torch.export`` (see ``tests/test_layers.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["unit_rows", "wy_factor", "householder_affine", "householder_dense"]

_TINY = 1e-30
_HALF_TYPES = (torch.float16, torch.bfloat16)


def unit_rows(u: Tensor) -> Tensor:
    """Normalise each row of ``u`` (shape ``(k, n)``) to unit length, overflow- and zero-safe.

    Half-precision ``u`` is normalised in float32 (the result is float32).

    Rows are first divided by their largest magnitude, so ``u ~ 1e30`` does not
    overflow ``||u||^2``. An all-zero row maps to the zero vector, which turns
    its reflection ``I - 2 u u^T`` into the identity: forward and backward stay
    finite.
    """
    if u.dtype in _HALF_TYPES:
        u = u.float()  # normalise in float32; callers cast to the input's dtype
    scale = u.detach().abs().amax(dim=-1, keepdim=True).clamp_min(_TINY)
    v = u / scale
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v / norm.clamp_min(_TINY)


def wy_factor(u_hat: Tensor) -> Tensor:
    """The ``k x k`` upper-triangular factor ``T`` of the compact WY form.

    Args:
        u_hat: unit (or zero) Householder vectors as rows, shape ``(k, n)``.

    Returns:
        ``T`` with ``H_1 H_2 ... H_k = I - U T U^T`` (``U = u_hat^T``), i.e.
        ``T = (triu(U^T U, 1) + I/2)^{-1}``. The diagonal of ``T^{-1}`` is 1/2 for
        every row, so ``T^{-1}`` is always invertible, zero rows included.
    """
    k = u_hat.shape[0]
    if k == 1:
        return u_hat.new_full((1, 1), 2.0)
    eye = torch.eye(k, dtype=u_hat.dtype, device=u_hat.device)
    t_inv = torch.triu(u_hat @ u_hat.transpose(0, 1), diagonal=1) + 0.5 * eye
    return torch.linalg.solve_triangular(t_inv, eye, upper=True)


def _reflect_rows(x: Tensor, w: Tensor, u: Tensor, b: Tensor | None) -> Tensor:
    """``x - w U^T + b``: one new ``(N, n)`` tensor, two passes (``x + b``, then an in-place rank-k update).

    Measured on CPU this beats ``addmm(x, ...)``, which copies ``x`` and then runs a separate update pass.
    """
    if b is None:
        return torch.addmm(x, w, u.transpose(0, 1), alpha=-1)
    return torch.add(x, b).addmm_(w, u.transpose(0, 1), alpha=-1)


class _HouseholderAffine(torch.autograd.Function):
    """``z = x - (x U) T U^T + b``, optionally ``|z|``, for a 2-D ``x`` of shape ``(N, n)``.

    ``U``: ``(n, k)``; ``T``: ``(k, k)``; ``b``: ``(n,)`` or ``None``.

    Backward, with ``g = dL/dz`` (``g = dL/d|z| * sign(z)`` when ``apply_abs``),
    ``P = x U``, ``W = P T`` and ``G = g U``::

        dL/dx = g - G T^T U^T          (the transposed reflection product)
        dL/dU = -(x^T (G T^T) + g^T W)
        dL/dT = -P^T G
        dL/db = sum_rows g

    Memory and passes: saved are ``x`` (which the caller keeps anyway in most
    graphs), the ``(N, k)`` projections ``P`` and, with ``apply_abs``, ``z``.
    Forward and backward each allocate one ``(N, n)`` tensor beyond their result
    at most (``dL/dz`` becomes ``dL/dx`` in place), and inference (no input needs
    grad) computes ``|z|`` in place and saves nothing: on CPU a fresh large
    allocation (page faults) costs as much as the arithmetic.
    """

    @staticmethod
    def forward(ctx, x: Tensor, u: Tensor, t: Tensor, b: Tensor | None, apply_abs: bool) -> Tensor:  # type: ignore[override]
        p = x @ u  # (N, k)
        z = _reflect_rows(x, p @ t, u, b)
        ctx.apply_abs = apply_abs
        ctx.has_bias = b is not None
        if not apply_abs:
            ctx.save_for_backward(x, u, t, p, None)
            return z
        # Keep z (its sign is abs's derivative); backward turns it into dL/dz in place.
        ctx.save_for_backward(x, u, t, p, z)
        return z.abs()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, u, t, p, z = ctx.saved_tensors
        need_x, need_u, need_t, need_b = ctx.needs_input_grad[:4]
        w = p @ t
        # dL/dz = dL/d|z| * sign(z), in a fresh buffer that later becomes dL/dx (z itself
        # stays intact, so backward can run again with retain_graph=True).
        g = z.sign().mul_(grad_out) if ctx.apply_abs else grad_out
        gx = gu = gt = gb = None
        g_u = g @ u  # G = g U, (N, k)
        g_ut = g_u @ t.transpose(0, 1)  # G T^T
        if need_u or need_b:
            # One pass over g gives both W^T g and the bias gradient sum_rows g.
            wg_b = torch.cat([w, torch.ones_like(w[:, :1])], 1).transpose(0, 1) @ g  # (k+1, n)
            if need_u:
                # Built as (k, n) rows so that, transposed back to the parameter's (k, n)
                # layout, the gradient is contiguous (what DDP's gradient buckets expect).
                gu = -(g_ut.transpose(0, 1) @ x + wg_b[:-1]).transpose(0, 1)
            if need_b and ctx.has_bias:
                gb = wg_b[-1]
        if need_t:
            gt = -(p.transpose(0, 1) @ g_u)
        if need_x:
            if ctx.apply_abs:
                gx = g.addmm_(g_ut, u.transpose(0, 1), alpha=-1)  # reuse g's buffer, used last
            else:
                gx = torch.addmm(g, g_ut, u.transpose(0, 1), alpha=-1)
        return gx, gu, gt, gb, None


def householder_affine(x: Tensor, u_hat: Tensor, bias: Tensor | None = None, *, apply_abs: bool = False) -> Tensor:
    """Apply ``y = H_k ... H_1 x + b`` (then ``|y|`` if ``apply_abs``) over the last dimension.

    Args:
        x: input of shape ``(..., n)``; any leading shape, float32/bfloat16/float16.
        u_hat: unit Householder vectors as rows, shape ``(k, n)`` (see :func:`unit_rows`).
        bias: optional ``(n,)`` bias ``b``.
        apply_abs: fuse the element-wise ``|.|`` of a Han-layer.

    Returns:
        A tensor of the same shape and dtype as ``x``; under ``torch.autocast`` in
        the autocast dtype (as ``nn.Linear`` would be).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Compute in the autocast dtype with autocast off, so forward and backward
        # (which autocast does not cover) see the same dtypes.
        with torch.autocast(device_type, enabled=False):
            return householder_affine(x.to(torch.get_autocast_dtype(device_type)), u_hat, bias, apply_abs=apply_abs)
    n = x.shape[-1]
    if u_hat.shape[-1] != n:
        raise ValueError(
            f"householder_affine: input has {n} features but the Householder vectors have {u_hat.shape[-1]}"
        )
    dtype = x.dtype
    # The small k x k algebra runs in at least float32, even for bfloat16/float16 weights.
    t = wy_factor(u_hat.float() if u_hat.dtype in _HALF_TYPES else u_hat)
    u = u_hat.transpose(0, 1).to(dtype)
    t = t.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    lead = x.shape[:-1]
    x2d = x.reshape(-1, n)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x2d, u, t, b)):
        y = _HouseholderAffine.apply(x2d, u, t, b, apply_abs)
    else:  # inference: one (N, n) buffer, |.| in place, nothing saved
        y = _reflect_rows(x2d, (x2d @ u) @ t, u, b)
        if apply_abs:
            y = y.abs_()
    return y.reshape(*lead, n)


def householder_dense(u_hat: Tensor) -> Tensor:
    """The dense ``n x n`` matrix ``M = H_k ... H_1`` (so ``y = x M^T + b``, like ``nn.Linear.weight``)."""
    n = u_hat.shape[-1]
    u = u_hat.transpose(0, 1)
    t = wy_factor(u_hat)
    eye = torch.eye(n, dtype=u_hat.dtype, device=u_hat.device)
    # x M^T = x - (x U) T U^T  =>  M^T = I - U T U^T  =>  M = I - U T^T U^T
    return eye - u @ t.transpose(0, 1) @ u.transpose(0, 1)
