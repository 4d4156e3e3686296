"""Functional core of the Householder layers.

A product of ``k`` Householder reflections is applied in *compact WY* form
(Schreiber & Van Loan, 1989; Joffrain et al., "Accumulating Householder
transformations, revisited", 2006)::

    H_i = I - 2 u_i u_i^T              (u_i unit vectors, the rows of U in R^{k x n})
    H_k ... H_1 = I - U^T T^T U          T^{-1} = triu(U U^T, 1) + I / 2   (k x k, upper triangular)

so for row vectors ``x`` (shape ``(N, n)``)::

    y = x (H_k ... H_1)^T + b = x - ((x U^T) T) U + b

This costs ``O(N n k)`` flops and ``O(n k + k^2)`` memory and never materialises an
``n x n`` matrix. ``k = 1`` is the paper's Han-layer, for which ``T = [[2]]`` and
``y = x - 2 (x . u) u + b``.

:func:`householder_chain` applies ``L`` such layers one after the other (``a <- |H_l a + b_l|``
or ``a <- H_l a + b_l``); a Han-block is a chain of two, a HanNet's hidden stack a chain of
its depth. Where it runs:

* CPU tensors: the C++/OpenMP kernel of :mod:`han_surgery.kernels.cpu` (built on first use).
  One operator call per direction for the whole chain: it normalises the rows of ``u`` and
  builds ``T`` itself (in float64), the forward reads ``x`` once and writes ``y`` once, and the
  backward reads ``x`` and ``dL/dy`` once, recomputes the chain's intermediates in cache and
  writes ``dL/dx`` once. Only ``x`` is saved for backward (a single layer with ``k > 1`` also saves
  its projections and ``sign(z)``). The operator's autograd is C++ too (no Python autograd.Function
  per call); double backward goes through :func:`_chain_backward_backward`.
* CUDA tensors: the Triton kernels of :mod:`han_surgery.kernels.triton_gpu`, one layer at a time.
* Otherwise (no compiler or Triton, under ``torch.compile``/``torch.export`` tracing, inside
  :func:`han_surgery.kernels.disabled`): :class:`_HouseholderRows`, matrix products and a
  hand-written backward in PyTorch, one layer at a time (what ``torch.compile`` and
  ``torch.export`` trace).
* Inside ``torch.func`` transforms (``grad``, ``vmap``, ``jvp``, ``jacrev``, ``functional_call``
  under them) and forward-mode AD (``torch.autograd.forward_ad.dual_level``): the definition with
  plain differentiable ops, which every transform takes.

All paths compute in float32 at least: float16/bfloat16 inputs are projected and updated in
float32 and rounded once at the end of a chain, so ``x . u`` cannot overflow the input dtype.
Double backward (``create_graph=True``) differentiates the definition above with plain
autograd. The tests run every property on the kernel and on the PyTorch path
(``tests/test_layers.py``, ``tests/test_numerics.py``, ``tests/test_kernels.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import kernels
from .kernels import cpu as cpu_kernel
from .kernels import flops as _flops  # noqa: F401  (registers the CPU operators' FLOP formulas)
from .kernels.grads import definition_grads, is_batched

__all__ = ["unit_rows", "wy_factor", "householder_affine", "householder_chain", "householder_dense"]

_TINY = 1e-30
_HALF_TYPES = (torch.float16, torch.bfloat16)


def unit_rows(u: Tensor) -> Tensor:
    """Normalise each row of ``u`` (shape ``(..., k, n)``) to unit length, overflow- and zero-safe.

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
        u_hat: unit (or zero) Householder vectors as rows, shape ``(..., k, n)``.

    Returns:
        ``T`` of shape ``(..., k, k)`` with ``H_1 H_2 ... H_k = I - U T U^T`` (``U = u_hat^T``),
        i.e. ``T = (triu(U^T U, 1) + I/2)^{-1}``. The diagonal of ``T^{-1}`` is 1/2 for every
        row, so ``T^{-1}`` is always invertible, zero rows included.
    """
    k = u_hat.shape[-2]
    if k == 1:
        return u_hat.new_full((*u_hat.shape[:-2], 1, 1), 2.0)
    eye = torch.eye(k, dtype=u_hat.dtype, device=u_hat.device)
    t_inv = torch.triu(u_hat @ u_hat.transpose(-1, -2), diagonal=1) + 0.5 * eye
    return torch.linalg.solve_triangular(t_inv, eye.expand_as(t_inv), upper=True)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF_TYPES else dtype


def _reference_rows(x: Tensor, u: Tensor, t: Tensor, b: Tensor | None, apply_abs: bool) -> Tensor:
    """The definition with plain, differentiable ops: ``f(x - ((x U^T) T) U + b)`` over the last dimension."""
    z = x - ((x @ u.transpose(0, 1)) @ t) @ u
    if b is not None:
        z = z + b
    return z.abs() if apply_abs else z


def _reflect_rows(x: Tensor, w: Tensor, u: Tensor, b: Tensor | None) -> Tensor:
    """``x - w U + b``: one new ``(N, n)`` tensor, two passes (``x + b``, then an in-place rank-k update).

    Measured on CPU this beats ``addmm(x, ...)``, which copies ``x`` and then runs a separate update pass.
    """
    if b is None:
        return torch.addmm(x, w, u, alpha=-1)
    return _subtract_product_(torch.add(x, b), w, u)


def _subtract_product_(z: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``z -= a @ b`` in place, returning ``z`` (a buffer of this module's own, not shared with autograd).

    In eager mode ``addmm(z, ..., out=z)``, the computation of ``z.addmm_(...)``: FLOP counting
    (:class:`torch.utils.flop_counter.FlopCounterMode`) has a formula for ``aten.addmm`` and none for
    ``aten.addmm_``. Under ``torch.compile``/``torch.export`` tracing ``addmm_``: an ``out=`` call in a
    traced graph fails when the graph later runs with gradients (out= variants do not support autograd).
    """
    if torch.compiler.is_compiling():
        return z.addmm_(a, b, alpha=-1)
    return torch.addmm(z, a, b, alpha=-1, out=z)


class _HouseholderRows(torch.autograd.Function):
    """PyTorch implementation of one layer: ``z = x - ((x U^T) T) U + b``, optionally ``|z|``, for ``x`` of shape ``(N, n)``.

    ``U``: ``(k, n)``, ``T``: ``(k, k)``, ``b``: ``(n,)`` or ``None``, all in the accumulation
    dtype (float32 for float16/bfloat16 ``x``, which is converted on the way in); the result is
    returned in ``out_dtype`` (``x``'s dtype, or the accumulation dtype inside a chain).

    Backward, with ``g = dL/dz`` (``g = dL/d|z| * sign(z)`` when ``apply_abs``),
    ``P = x U^T``, ``W = P T`` and ``G = g U^T``::

        dL/dx = g - (G T^T) U
        dL/dU = -((G T^T)^T x + W^T g)
        dL/dT = -P^T G
        dL/db = sum_rows g

    Saved are ``x``, the ``(N, k)`` projections ``P`` and, with ``apply_abs``, ``z``. The
    backward turns a fresh ``dL/dz`` buffer into ``dL/dx`` in place. Under ``create_graph=True``
    it differentiates :func:`_reference_rows` instead.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, u: Tensor, t: Tensor, b: Tensor | None, apply_abs: bool, out_dtype: torch.dtype
    ) -> Tensor:
        xa = x.to(u.dtype)
        p = xa @ u.transpose(0, 1)  # (N, k)
        z = _reflect_rows(xa, p @ t, u, b)
        ctx.apply_abs = apply_abs
        ctx.save_for_backward(x, u, t, b, p, z if apply_abs else None)
        return (z.abs() if apply_abs else z).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        # The forward ran with autocast off (householder_chain turns it off), and so does the backward: in eager
        # mode it already does, but torch.compile traces it under the caller's autocast (bfloat16 x float32).
        with torch.autocast(grad_out.device.type, enabled=False):
            return _HouseholderRows._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, u, t, b, p, z = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True
            grads = definition_grads(
                lambda x, u, t, b: _reference_rows(x.to(u.dtype), u, t, b, ctx.apply_abs).to(x.dtype),
                (x, u, t, b),
                needs,
                grad_out,
            )
            return (*grads, None, None)
        need_x, need_u, need_t, need_b = needs
        xa = x.to(u.dtype)
        w = p @ t
        # dL/dz in a fresh buffer that later becomes dL/dx (z stays intact for retain_graph=True); out of place
        # when the backward is vmapped (batched gradients), which takes neither in-place updates nor out=.
        in_place = not is_batched(grad_out)
        if ctx.apply_abs:
            g = z.sign().mul_(grad_out) if in_place else z.sign() * grad_out
        else:
            g = grad_out.to(u.dtype)
        gx = gu = gt = gb = None
        g_u = g @ u.transpose(0, 1)  # G = g U^T, (N, k)
        g_ut = g_u @ t.transpose(0, 1)  # G T^T
        if need_u or need_b:
            # One pass over g gives both W^T g and, with a bias, the bias gradient sum_rows g.
            wg_b = (torch.cat([w, torch.ones_like(w[:, :1])], 1) if b is not None else w).transpose(0, 1) @ g
            if need_u:
                gu = -(g_ut.transpose(0, 1) @ xa + wg_b[: w.shape[1]])
            if need_b and b is not None:
                gb = wg_b[-1]
        if need_t:
            gt = -(p.transpose(0, 1) @ g_u)
        if need_x:
            if in_place and g is not grad_out:
                gx = _subtract_product_(g, g_ut, u)  # reuse g's buffer, used last
            else:
                gx = torch.addmm(g, g_ut, u, alpha=-1)
            gx = gx.to(x.dtype)
        return gx, gu, gt, gb, None, None


def _rows_torch(x: Tensor, u: Tensor, t: Tensor, b: Tensor | None, apply_abs: bool, out_dtype: torch.dtype) -> Tensor:
    # grad, vmap, jvp, jacrev, ...: the definition, which they all differentiate; torch.jit.trace too, which records
    # a Python autograd.Function as an op it can neither check nor save
    if _in_functorch_transform() or torch.jit.is_tracing():
        return _reference_rows(x.to(u.dtype), u, t, b, apply_abs).to(out_dtype)
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, u, t, b)):
        return _HouseholderRows.apply(x, u, t, b, apply_abs, out_dtype)
    # inference: one (N, n) buffer, |.| in place, nothing saved
    xa = x.to(u.dtype)
    y = _reflect_rows(xa, (xa @ u.transpose(0, 1)) @ t, u, b)
    return (y.abs_() if apply_abs else y).to(out_dtype)


def _reference_chain(x3d: Tensor, u_hat: Tensor, t: Tensor, b: Tensor | None, apply_abs: tuple[bool, ...]) -> Tensor:
    """The definition of a chain on ``(B, n, C)`` (vectors along the middle dimension), plain autograd."""
    a = x3d.transpose(1, 2).to(u_hat.dtype)
    for layer, take_abs in enumerate(apply_abs):
        a = _reference_rows(a, u_hat[layer], t[layer], b[layer] if b is not None else None, take_abs)
    return a.to(x3d.dtype).transpose(1, 2)


def _chain_parameters(u: Tensor, bias: Tensor | None, normalize: bool, acc: torch.dtype) -> tuple[Tensor, ...]:
    """``(u_hat, T, b)`` in the accumulation dtype, differentiable: the PyTorch paths' view of a chain's parameters."""
    u_hat = unit_rows(u) if normalize else u
    # The small k x k algebra runs in at least float32, even for bfloat16/float16 weights.
    t = wy_factor(u_hat.float() if u_hat.dtype in _HALF_TYPES else u_hat).to(acc)
    return u_hat.to(acc), t, bias.to(acc) if bias is not None else None


_EMPTY = torch.empty(0)  # what the CPU operators take for "no bias"


def _as_3d(x: Tensor, dim: int) -> Tensor:
    """``x`` as the contiguous ``(B, n, C)`` the CPU kernel takes, ``n = x.shape[dim]`` (``dim >= 0``): a view when it can be."""
    if dim == x.dim() - 1:  # rows (the common case): no products of sizes to compute
        x3d = x.reshape(-1, x.shape[dim], 1)
    else:
        x3d = x.reshape(math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1 :]))
    return x3d if x3d.is_contiguous() else x3d.contiguous()


def _chain_vjp(
    grad: Tensor, primals: tuple[Tensor, ...], normalize: bool, apply_abs: tuple[bool, ...]
) -> tuple[Tensor, ...]:
    """What the backward operator computes, through the definition with plain differentiable ops: the chain's
    gradients ``(dx, du[, db])`` at ``primals = (x, u[, b])`` (``b``: the bias, or nothing) for the output gradient
    ``grad``."""
    acc = _accumulation_dtype(primals[0].dtype)

    def definition(x: Tensor, u: Tensor, *b: Tensor) -> Tensor:
        return _reference_chain(x, *_chain_parameters(u, b[0] if b else None, normalize, acc), apply_abs)

    return torch.func.vjp(definition, *primals)[1](grad)


def _chain_backward_batched(
    grad: Tensor,
    x: Tensor,
    u: Tensor,
    b: Tensor,
    apply_abs: list[int],
    normalize: bool,
    need_input: bool,
    need_params: bool,
    saved_p: Tensor,
    saved_sign: Tensor,
) -> list[Tensor]:
    """``householder_chain_backward`` on the legacy ``vmap``'s batched tensors: the backward of
    ``autograd.grad(is_grads_batched=True)``, ``jacobian``/``hessian(vectorize=True)`` and ``gradcheck``'s batched
    check, where only the backward is vmapped (the forward ran on the kernel). Those tensors give no access to their
    batch from Python, so this is the definition's VJP with plain ops, which have batching rules; the projections and
    signs a forward saved are recomputed. Registered for the ``Batched`` dispatch key only: calls without batched
    tensors never come here."""
    grads = _chain_vjp(grad, (x, u, *([b] if b.numel() > 0 else [])), normalize, tuple(bool(a) for a in apply_abs))
    dx = grads[0] if need_input else x.new_empty(0)
    du = grads[1] if need_params else u.new_empty(0)
    db = grads[2] if need_params and b.numel() > 0 else b.new_empty(0)
    return [dx, du, db]


cpu_kernel.define_fallback("householder_chain_backward", _chain_backward_batched, "Batched")


def _chain_backward_setup(ctx, inputs: tuple, output) -> None:
    grad, x, u, b, apply_abs, normalize = inputs[:6]
    ctx.save_for_backward(grad, x, u, b)
    ctx.apply_abs, ctx.normalize = tuple(bool(a) for a in apply_abs), normalize


def _chain_backward_backward(ctx, grads: list[Tensor | None]) -> tuple[Tensor | None, ...]:
    """The derivative of the CPU kernel's backward operator (double backward), through the definition.

    The operator maps ``(grad, x, u, b)`` to the chain's gradients ``(dx, du, db)``, the VJP of
    :func:`_reference_chain`; this is the VJP of that VJP: given the incoming ``(ddx, ddu, ddb)``,
    the partial derivatives of ``<dx, ddx> + <du, ddu> + <db, ddb>`` with respect to ``grad``, ``x``,
    ``u`` and ``b`` (``None`` for the operator's other arguments). ``torch.func.vjp`` keeps them
    partial (not through ``grad``'s own dependence on ``x``) and differentiable (higher orders).
    """
    grad, x, u, b = ctx.saved_tensors

    def backward_operator(grad: Tensor, *primals: Tensor) -> tuple[Tensor, ...]:
        return _chain_vjp(grad, primals, ctx.normalize, ctx.apply_abs)

    outputs, vjp = torch.func.vjp(backward_operator, grad, x, u, *([b] if b.numel() > 0 else []))
    # Cotangents of the operator's outputs (dx, du[, db]); zeros for those it left empty (not asked for).
    cotangents = tuple(
        dd if dd is not None and dd.shape == out.shape else torch.zeros_like(out)
        for out, dd in zip(outputs, grads, strict=False)
    )
    seconds = (*vjp(cotangents), None)[:4]  # grad, x, u, b
    return (*(d if need else None for d, need in zip(seconds, ctx.needs_input_grad[:4], strict=True)), *(None,) * 6)


def _register_double_backward() -> None:
    torch.library.register_autograd(
        "han_surgery::householder_chain_backward", _chain_backward_backward, setup_context=_chain_backward_setup
    )


cpu_kernel.on_load(_register_double_backward)


def _chain_forward_before_load(x: Tensor, u: Tensor, b: Tensor, apply_abs: list[int], normalize: bool) -> Tensor:
    """``householder_chain_forward`` called before the extension is loaded: by a graph that recorded the operator
    (``torch.jit.trace`` saved, then ``torch.jit.load`` in a fresh process), not by han-surgery (whose layers load
    the extension first). Loads it and calls the operator again, or computes the definition where it cannot be
    built (no compiler, ``HAN_SURGERY_CPU_KERNEL=0``) or the tensors are not on the CPU. Registered for ``CompositeExplicitAutograd``: the
    extension's own CPU kernel takes precedence once loaded."""
    on_cpu = all(t.device.type == "cpu" for t in (x, u, b))  # (any other device would come back here: the definition)
    if on_cpu and cpu_kernel.available():
        return torch.ops.han_surgery.householder_chain_forward(x, u, b, apply_abs, normalize)
    acc = _accumulation_dtype(x.dtype)
    params = _chain_parameters(u, b if b.numel() > 0 else None, normalize, acc)
    return _reference_chain(x, *params, tuple(bool(a) for a in apply_abs)).contiguous()


cpu_kernel.define_fallback("householder_chain_forward", _chain_forward_before_load)


def _in_functorch_transform() -> bool:
    """Inside ``torch.func`` transforms, which take plain differentiable ops, not custom autograd functions; or
    inside a ``torch.autograd.forward_ad.dual_level()`` (forward-mode AD: the functions have no ``jvp``)."""
    return torch._C._are_functorch_transforms_active() or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _kernels_allowed() -> bool:
    """Whether a compiled kernel may run here: not switched off, not under ``torch.compile`` / ``torch.export`` /
    ``torch.jit.trace`` tracing (their graphs hold standard ops only, so that a saved trace or exported program
    loads without han_surgery, in libtorch too), not inside ``torch.func`` transforms."""
    return (
        kernels.enabled()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not _in_functorch_transform()
    )


#: Reflections per layer up to which the CPU kernel runs. Beyond, the PyTorch path's matrix products win: its
#: per-call compact-WY set-up (``T``, O(k^2 n + k^3)) is scalar, and so are the per-row k-term updates (one run at
#: n = 768, 2048 rows, one thread: PyTorch path / kernel 1.08x at k = 64, 0.79x at 96, 0.67x at 128; at k = n = 768
#: the kernel took 10x the PyTorch path's time for forward+backward). The Triton kernels stop at 64 too.
MAX_CPU_KERNEL_REFLECTIONS = 64


def _use_cpu_kernel(x: Tensor, u: Tensor, reflections: int) -> bool:
    # an empty input takes the PyTorch path: the kernel's tiling divides by its zero width; so do parameters on
    # another device than x (meta ones not yet loaded, CUDA ones), where PyTorch's ops name the mismatch
    return (
        x.device.type == "cpu"
        and u.device.type == "cpu"
        and x.numel() > 0
        and reflections <= MAX_CPU_KERNEL_REFLECTIONS
        and _kernels_allowed()
        and cpu_kernel.available()
    )


def _autocast_on(x: Tensor) -> bool:
    """Whether ``torch.autocast`` is on for ``x``'s device (``False`` for a device it does not know: ``meta``)."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # "unknown device type for autocast"
        return False


def _use_triton(x: Tensor, k: int, *params: Tensor | None) -> bool:
    if x.device.type != "cuda" or x.numel() == 0 or not _kernels_allowed():  # empty: the PyTorch path, as on CPU
        return False
    if any(p is not None and p.device != x.device for p in params):  # a kernel would read them through a pointer
        return False  # of another device; PyTorch's ops name the mismatch instead, as on CPU
    triton_gpu = kernels.triton_kernels()
    return triton_gpu is not None and triton_gpu.supports(x, k)


def _chain_cpu(
    x: Tensor, u: Tensor, b: Tensor | None, apply_abs: tuple[bool, ...], dim: int, normalize: bool
) -> Tensor:
    # Differentiable (its autograd is in the C++ source); the output is never a view, so callers may modify it in place.
    y = torch.ops.han_surgery.householder_chain_forward(
        _as_3d(x, dim), u, b if b is not None else _EMPTY, apply_abs, normalize
    )
    return y.view(x.shape)


def householder_chain(
    x: Tensor,
    u: Tensor,
    bias: Tensor | None,
    apply_abs: Sequence[bool],
    *,
    dim: int = -1,
    normalize: bool = False,
) -> Tensor:
    """Apply ``L`` Householder layers in sequence along ``dim``: ``a <- f_l(H_{l,k} ... H_{l,1} a + b_l)``.

    ``f_l`` is ``|.|`` where ``apply_abs[l]`` is true (a Han-layer) and the identity otherwise;
    a Han-block ``H2 |H1 x + b1| + b2`` is the chain ``apply_abs=(True, False)``.

    Args:
        x: input of shape ``(..., n, ...)`` with ``n = x.shape[dim]``; float32/64, bfloat16, float16.
        u: Householder vectors, shape ``(L, k, n)``: unit rows (see :func:`unit_rows`), or any
            non-zero directions with ``normalize=True`` (what the layers pass; a zero row is the
            identity).
        bias: ``(L, n)`` biases, or ``None``.
        apply_abs: ``L`` flags.
        dim: the dimension the reflections act on. ``dim=-2`` on ``(B, N, C)`` mixes the ``N``
            tokens of every channel, without transposing ``x``.
        normalize: normalise the rows of ``u`` first (``unit_rows``), inside the kernel on CPU.

    Returns:
        A tensor of the same shape and dtype as ``x``; under ``torch.autocast`` in the autocast
        dtype (as ``nn.Linear`` would be).
    """
    if _autocast_on(x):
        # Compute in the autocast dtype with autocast off, so forward and backward (which autocast does not
        # cover) see the same dtypes; an input autocast never casts (float64, as nn.Linear's stays float64)
        # stays as it is, and the algebra on u is not cast either.
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            return householder_chain(x, u, bias, apply_abs, dim=dim, normalize=normalize)
    if u.dim() != 3:
        raise ValueError(f"householder_chain: u must have shape (L, k, n), got {tuple(u.shape)}")
    layers, k, n = u.shape
    apply_abs = tuple(bool(a) for a in apply_abs)
    if len(apply_abs) != layers:
        raise ValueError(f"householder_chain: {layers} layers of u but {len(apply_abs)} apply_abs flags")
    if not x.is_floating_point():
        raise TypeError(f"han_surgery.functional: input must be a floating-point tensor, got {x.dtype}")
    if x.dim() and not -x.dim() <= dim < x.dim():  # as torch's own dim arguments: no wrapping around
        raise IndexError(
            f"han_surgery.functional: dim {dim} is out of range for an input of {x.dim()} dimensions "
            f"(expected in [{-x.dim()}, {x.dim() - 1}])"
        )
    dim = dim % x.dim() if x.dim() else 0
    if x.dim() == 0 or x.shape[dim] != n:
        features = x.shape[dim] if x.dim() else 0
        raise ValueError(
            f"han_surgery.functional: input has {features} features but the Householder vectors have {n} (dim={dim})"
        )
    if bias is not None and bias.shape != (layers, n):
        raise ValueError(f"householder_chain: bias must have shape {(layers, n)}, got {tuple(bias.shape)}")
    if _use_cpu_kernel(x, u, k) and (bias is None or bias.device.type == "cpu"):
        return _chain_cpu(x, u, bias, apply_abs, dim, normalize)
    acc = _accumulation_dtype(x.dtype)
    u_hat, t, b = _chain_parameters(u, bias, normalize, acc)
    # One layer at a time, on rows of the last dimension; inside the chain, results stay in the
    # accumulation dtype (as in the kernel), so a float16 chain is rounded once.
    last = dim == x.dim() - 1
    moved = x if last else x.movedim(dim, -1)
    a = moved.reshape(-1, n)
    if not a.is_contiguous():
        a = a.contiguous()
    rows_fn = kernels.triton_kernels().householder_rows if _use_triton(a, k, u_hat, b) else _rows_torch
    for layer in range(layers):
        out_dtype = x.dtype if layer == layers - 1 else acc
        a = rows_fn(a, u_hat[layer], t[layer], b[layer] if b is not None else None, apply_abs[layer], out_dtype)
    out = a.reshape(moved.shape)
    return out if last else out.movedim(-1, dim).contiguous()  # contiguous, as the kernel's


def householder_affine(
    x: Tensor, u_hat: Tensor, bias: Tensor | None = None, *, apply_abs: bool = False, dim: int = -1
) -> Tensor:
    """Apply ``y = H_k ... H_1 x + b`` (then ``|y|`` if ``apply_abs``) along ``dim`` (default: the last).

    Args:
        x: input of shape ``(..., n)`` (or ``n = x.shape[dim]``); float32/64, bfloat16, float16.
        u_hat: unit Householder vectors as rows, shape ``(k, n)`` (see :func:`unit_rows`).
        bias: optional ``(n,)`` bias ``b``.
        apply_abs: fuse the element-wise ``|.|`` of a Han-layer.
        dim: the dimension the reflections act on.

    Returns:
        A tensor of the same shape and dtype as ``x``; under ``torch.autocast`` in the autocast
        dtype (as ``nn.Linear`` would be). One layer of :func:`householder_chain`.
    """
    return householder_chain(
        x, u_hat.unsqueeze(0), bias.unsqueeze(0) if bias is not None else None, (apply_abs,), dim=dim
    )


def householder_dense(u_hat: Tensor) -> Tensor:
    """The dense ``n x n`` matrix ``M = H_k ... H_1`` (so ``y = x M^T + b``, like ``nn.Linear.weight``)."""
    n = u_hat.shape[-1]
    u = u_hat.transpose(0, 1)
    t = wy_factor(u_hat)
    eye = torch.eye(n, dtype=u_hat.dtype, device=u_hat.device)
    # x M^T = x - (x U) T U^T  =>  M^T = I - U T U^T  =>  M = I - U T^T U^T
    return eye - u @ t.transpose(0, 1) @ u.transpose(0, 1)
