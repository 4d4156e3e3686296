"""Double backward for the custom autograd functions of :mod:`han_surgery.functional` and the kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["definition_grads", "is_batched"]


def definition_grads(
    fn: Callable[..., Tensor], inputs: tuple[Tensor | None, ...], needs: Sequence[bool], grad_out: Tensor
) -> tuple[Tensor | None, ...]:
    """Gradients of ``fn(*inputs)`` by plain autograd, keeping the graph: the backward of a custom
    function under ``create_graph=True``, so that double backward (gradient penalties,
    ``gradgradcheck``) differentiates the definition."""
    with torch.enable_grad():
        # Partial derivatives: an alias of each input, so that an input computed from another one (the Triton
        # path's V = T U) does not pass its gradient on to it here; the caller's graph does that, once.
        inputs = tuple(v.view_as(v) if v is not None else None for v in inputs)
        wrt = [v for v, need in zip(inputs, needs, strict=True) if need]
        out = fn(*inputs)
    grads = iter(torch.autograd.grad(out, wrt, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def is_batched(grad: Tensor) -> bool:
    """Whether a backward runs under ``vmap`` (``autograd.grad(is_grads_batched=True)``,
    ``jacobian``/``hessian(vectorize=True)`` and ``gradcheck``'s batched check use the legacy one; ``torch.func.vmap``
    over ``autograd.grad`` the functorch one). Batched tensors take neither an in-place update with a batched
    operand nor ``out=``, nor a compiled kernel's raw pointers."""
    if torch.compiler.is_compiling():  # a traced backward is not vmapped (and dynamo cannot trace these checks)
        return False
    return torch._C._functorch.is_legacy_batchedtensor(grad) or torch._C._are_functorch_transforms_active()
