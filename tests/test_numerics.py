"""Numerics of the Householder layers beyond first-order float32 (issue 11, items 12 and 13).

* Double backward: a gradient penalty through a ``HanBlock`` and ``gradgradcheck`` with
  respect to ``x``, ``u`` and ``b`` match plain autograd through the definition.
* Half precision: under fp16 autocast the projection ``x . u`` is accumulated in float32, so
  a layer whose float32 result is representable in fp16 stays finite (as ``nn.Linear`` does).
"""

from __future__ import annotations

import pytest
import torch
from _kernel_paths import kernel_path  # noqa: F401  (fixture)
from torch import nn

from han_surgery import HanBlock, HanLayer, HouseholderLinear
from han_surgery.functional import householder_affine, unit_rows

pytestmark = pytest.mark.usefixtures("kernel_path")  # every test, on both implementations


def reflection(u: torch.Tensor) -> torch.Tensor:
    """``H_k ... H_1`` built from the definition with differentiable ops (the reference)."""
    n = u.shape[-1]
    out = torch.eye(n, dtype=u.dtype)
    for row in u:
        out = (torch.eye(n, dtype=u.dtype) - 2 * torch.outer(row, row) / row.dot(row)) @ out
    return out


def reference_block(block: HanBlock, x: torch.Tensor) -> torch.Tensor:
    h = (x @ reflection(block.fc1.u).T + block.fc1.bias).abs()
    return h @ reflection(block.fc2.u).T + block.fc2.bias


@pytest.mark.parametrize("k", [1, 3])
def test_gradient_penalty_through_han_block_matches_the_definition(k):
    torch.manual_seed(0)
    block = HanBlock(8, reflections=k).double()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    grads = {}
    for name, fn in (("han", block), ("reference", lambda v: reference_block(block, v))):
        block.zero_grad()
        x.grad = None
        out = fn(x)
        (gx,) = torch.autograd.grad(
            (out * torch.linspace(-1, 1, 8, dtype=torch.float64)).pow(2).sum(), x, create_graph=True
        )
        gx.pow(2).sum().backward()  # a gradient penalty: needs the second derivative
        grads[name] = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    for got, want in zip(grads["han"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("apply_abs", [False, True])
def test_gradgradcheck_wrt_input_vectors_and_bias(k, apply_abs):
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    u = torch.randn(k, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(x, u, b):
        return householder_affine(x, unit_rows(u), b, apply_abs=apply_abs)

    assert torch.autograd.gradgradcheck(f, (x, u, b), check_batched_grad=True)


@pytest.mark.parametrize("cls", [HouseholderLinear, HanLayer])
def test_gradgradcheck_through_the_layers(cls):
    torch.manual_seed(2)
    layer = cls(5, reflections=2).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, u, b):
        return torch.func.functional_call(layer, {"u": u, "bias": b}, (x,))

    u = layer.u.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(f, (x, u, b), check_batched_grad=True)


def definition_layer(layer: HanLayer, x: torch.Tensor) -> torch.Tensor:
    y = x @ reflection(layer.u).T + (layer.bias if layer.bias is not None else 0)
    return y.abs()


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_penalty_on_parameter_gradients_matches_the_definition(k, bias, input_requires_grad):
    """Double backward through the parameters only (meta-learning, gradient-norm penalties on
    weights): the second derivatives, with and without a bias, whether x requires grad or not."""
    torch.manual_seed(4)
    layer = HanLayer(8, reflections=k, bias=bias).double()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=input_requires_grad)
    grads = {}
    for name, fn in (("han", layer), ("reference", lambda v: definition_layer(layer, v))):
        layer.zero_grad()
        x.grad = None
        params = list(layer.parameters())
        first = torch.autograd.grad(fn(x).pow(3).sum(), params, create_graph=True)
        sum(g.pow(2).sum() for g in first).backward()
        grads[name] = [p.grad.clone() for p in params] + ([x.grad.clone()] if input_requires_grad else [])
    for got, want in zip(grads["han"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_third_derivative_through_han_block_matches_the_definition():
    torch.manual_seed(5)
    block = HanBlock(6, reflections=2).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (block, lambda v: reference_block(block, v)):
        (g1,) = torch.autograd.grad(fn(x).pow(3).sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad(g1.pow(2).sum(), x, create_graph=True)
        (g3,) = torch.autograd.grad(g2.pow(2).sum(), x)
        results.append(g3)
    torch.testing.assert_close(*results, atol=1e-8, rtol=1e-9)


def test_fp16_autocast_projection_does_not_overflow():
    """``x . u`` is 3000 * sqrt(768) = 8.3e4 > 65504 (fp16's max); the result itself is about 3e3."""
    block = HanBlock(768)
    with torch.no_grad():
        block.fc1.u.fill_(1.0)
        block.fc2.u.fill_(1.0)
    x = torch.full((4, 768), 3000.0, requires_grad=True)
    ref = block(x)
    assert ref.abs().max() < 6e4  # representable in fp16
    linear = nn.Linear(768, 768)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.isfinite(linear(x)).all()  # the dense peer stays finite
        out = block(x)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0, rtol=2e-3)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 1.5e-3), (torch.bfloat16, 1.5e-2)])
def test_half_inputs_accumulate_in_float32(dtype, bound):
    """A dot product ``x . u`` whose 512 terms are all positive and large (rows offset by 200, ``u > 0``): its partial
    sums grow to thousands, where a half-precision sum rounds by units. Accumulated in float32, the layer's output
    is within a few roundings of the float32 layer's; a sum kept in ``dtype`` (computed here, term by term) is 6x
    (float16) and 30x (bfloat16) further off, beyond the bound. (Rows of mixed-sign terms could not tell them
    apart: their sums stay small.)"""
    torch.manual_seed(3)
    n = 512
    layer = HanLayer(n)
    with torch.no_grad():
        layer.u.copy_(torch.rand_like(layer.u) + 0.5)
    x = torch.randn(16, n) + 200.0
    with torch.no_grad():
        ref = layer(x)
        half = layer.to(dtype)
        out = half(x.to(dtype))
        xs, u = x.to(dtype), (half.u.float() / half.u.float().norm()).reshape(-1).to(dtype)
        s = torch.zeros(len(x), dtype=dtype)
        for j in range(n):  # the dot product accumulated in dtype
            s = s + xs[:, j] * u[j]
        in_dtype = (xs - 2 * s[:, None] * u + half.bias).abs()

    def error(y: torch.Tensor) -> float:
        return ((y.float() - ref).norm() / ref.norm()).item()

    assert torch.isfinite(out).all() and out.dtype == dtype
    assert error(out) < bound < error(in_dtype)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # raised inside torch.func.jvp
def test_torch_func_transforms_match_autograd():
    """``torch.func``: parameter gradients (``grad`` of ``functional_call``), per-sample input gradients
    (``vmap(grad)``) and forward-mode ``jvp`` agree with ordinary autograd on the layer."""
    torch.manual_seed(6)
    block = HanBlock(8, reflections=2).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    params = dict(block.named_parameters())

    def loss(p, inputs):
        return torch.func.functional_call(block, p, (inputs,)).pow(2).sum()

    grads = torch.func.grad(loss)(params, x)
    block.zero_grad()
    xr = x.clone().requires_grad_()
    loss(params, xr).backward()
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad)
    per_sample = torch.func.vmap(torch.func.grad(lambda row: block(row).pow(2).sum()))(x)
    torch.testing.assert_close(per_sample, xr.grad)  # rows are independent: the batch gradient, row by row
    tangent = torch.randn_like(x)
    _, forward_mode = torch.func.jvp(block, (x,), (tangent,))
    _, vjp = torch.func.vjp(block, x)
    # <J t, c> = <t, J^T c> for a random cotangent c
    cotangent = torch.randn_like(x)
    torch.testing.assert_close((forward_mode * cotangent).sum(), (tangent * vjp(cotangent)[0]).sum())
