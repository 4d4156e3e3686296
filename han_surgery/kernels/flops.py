"""FLOP formulas of the CPU kernel's operators, for :class:`torch.utils.flop_counter.FlopCounterMode`.

``FlopCounterMode`` counts an operator only if it has a formula, so without these the compiled CPU
kernel (:mod:`han_surgery.kernels.cpu`) counted as zero while the PyTorch implementation
(:func:`han_surgery.kernels.disabled`) counted its matrix products. The formulas below give the kernel
exactly the count of the PyTorch implementation, forward and backward, so a model counts the same
on either path.

What counts (as for ``nn.Linear``): the multiply-adds (MACs) of the matrix products, one FLOP
formula unit being 2 FLOPs per MAC, as ``FlopCounterMode`` counts ``aten.mm``; products with the
small triangular ``T`` count as dense ``k x k`` products, as ``torch.mm`` does. Element-wise work is
not counted: the bias add, ``|.|`` and its sign, the normalisation of ``u`` (``unit_rows``), the
triangular solve for ``T``. For rows of width ``n`` (``rows`` of them; ``B * C`` for the kernel's
``(B, n, C)`` layout), ``k`` reflections per layer and ``L`` layers:

* forward, per layer and row: ``P = x U^T`` (``k n``), ``W = P T`` (``k^2``), ``x - W U`` (``k n``);
  per layer with ``k > 1``: the Gram matrix ``U U^T`` of the compact WY factor (``k^2 n``).
  In all ``L (rows (2 k n + k^2) + [k > 1] k^2 n)``: one Householder layer costs about twice the
  ``n`` MACs per reflection of a rank-1 product.
* backward, per layer and row, with ``g = dL/dz``: ``W = P T`` again (``k^2``; the PyTorch backward
  recomputes it from the saved ``P``), ``G = g U^T`` (``k n``), ``G T^T`` (``k^2``); for the
  parameters ``W^T g`` (``k n``; ``+ n`` for the bias gradient ``sum_rows g``, which the PyTorch
  backward computes in the same product), ``(G T^T)^T x`` (``k n``) and, with ``k > 1``, ``P^T G``
  (``k^2``); for the input gradient ``g - (G T^T) U`` (``k n``; every layer but the first of a chain
  always, the first when the chain's input needs a gradient); per layer with ``k > 1`` and parameter
  gradients: back through ``T`` and the Gram matrix (``2 k^2 n + k^3``).

The CPU kernel's backward recomputes the forward's projections instead of saving them (except for
one layer with ``k > 1``); that recomputation is not counted, so that both paths count the same
arithmetic of the layer. Where the parameters' gradients differ from "all or none" (a frozen ``u``
with a trainable bias), the kernel computes every parameter gradient and is counted so; the PyTorch
path skips some. The Triton kernels of CUDA tensors are not counted (only the host-side ``T U``
product is): count CUDA models inside :func:`han_surgery.kernels.disabled`.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from . import cpu  # noqa: F401  (defines the operators' schemas)

__all__ = ["forward_macs", "backward_macs"]


def forward_macs(rows: int, features: int, reflections: int = 1, layers: int = 1) -> int:
    """MACs of a forward pass of ``layers`` Householder layers over ``rows`` vectors of width ``features``."""
    n, k = features, reflections
    per_layer = rows * (2 * k * n + k * k) + (k * k * n if k > 1 else 0)
    return layers * per_layer


def backward_macs(
    rows: int,
    features: int,
    reflections: int = 1,
    layers: int = 1,
    *,
    bias: bool = True,
    need_input: bool = True,
    need_params: bool = True,
) -> int:
    """MACs of the backward pass of :func:`forward_macs`'s chain (gradients of its input and/or parameters)."""
    n, k = features, reflections
    total = 0
    for layer in range(layers):
        per_row = k * k + k * n + k * k  # W = P T, G = g U^T, G T^T
        if need_params:
            # W^T g (+ sum_rows g with a bias), (G T^T)^T x, P^T G
            per_row += k * n + (n if bias else 0) + k * n + (k * k if k > 1 else 0)
        if need_input or layer > 0:
            per_row += k * n  # g - (G T^T) U
        total += rows * per_row
        if need_params and k > 1:
            total += 2 * k * k * n + k**3  # through T and the Gram matrix U U^T
    return total


def _rows_and_sizes(x_shape, u_shape) -> tuple[int, int, int, int]:
    batch, n, columns = x_shape
    layers, k, _ = u_shape
    return batch * columns, n, k, layers


@register_flop_formula(
    [torch.ops.han_surgery.householder_chain_forward, torch.ops.han_surgery.householder_layer_forward_saving]
)
def _forward_flops(x_shape, u_shape, *args, out_shape=None, **kwargs) -> int:
    rows, n, k, layers = _rows_and_sizes(x_shape, u_shape)
    return 2 * forward_macs(rows, n, k, layers)


@register_flop_formula(torch.ops.han_surgery.householder_chain_backward)
def _backward_flops(
    grad_shape, x_shape, u_shape, b_shape, abs, normalize, need_input, need_params, *args, out_shape=None, **kwargs
) -> int:
    rows, n, k, layers = _rows_and_sizes(x_shape, u_shape)
    bias = math.prod(b_shape) > 0
    return 2 * backward_macs(rows, n, k, layers, bias=bias, need_input=need_input, need_params=need_params)
