"""Double backward for the custom autograd functions of :mod:`han_surgery.functional` and the kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["definition_grads"]


def definition_grads(
    fn: Callable[..., Tensor], inputs: tuple[Tensor | None, ...], needs: Sequence[bool], grad_out: Tensor
) -> tuple[Tensor | None, ...]:
    """Gradients of ``fn(*inputs)`` by plain autograd, keeping the graph: the backward of a custom
    function under ``create_graph=True``, so that double backward (gradient penalties,
    ``gradgradcheck``) differentiates the definition."""
    wrt = [v for v, need in zip(inputs, needs, strict=True) if need]
    with torch.enable_grad():
        out = fn(*inputs)
    grads = iter(torch.autograd.grad(out, wrt, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)
