"""Demo steps about the layer itself: parameters, the orthogonal Jacobian, speed against ``nn.Linear``."""

from __future__ import annotations

import time

import torch

from ..layers import Abs, HanBlock, HanLayer, HouseholderLinear
from ..utils import count_parameters, format_table
from ._format import section

__all__ = ["step_layer_properties", "step_layer_speed"]


def step_layer_properties() -> None:
    """Parameters of a Han-block vs the MLP it replaces, and the Jacobian property, measured."""
    section("The Han-layer: O(n) parameters, orthogonal Jacobian")
    torch.manual_seed(0)
    rows = []
    for n in (384, 768, 1024):
        mlp = torch.nn.Sequential(torch.nn.Linear(n, 4 * n), torch.nn.GELU(), torch.nn.Linear(4 * n, n))
        han = HanBlock(n)
        rows.append(
            [
                n,
                f"{count_parameters(mlp):,}",
                f"{count_parameters(han):,}",
                f"{count_parameters(mlp) / count_parameters(han):,.0f}x",
            ]
        )
    print(format_table(["width n", "MLP n->4n->n params", "Han-block params", "smaller by"], rows))

    n = 64
    layer = HanLayer(n).double()
    x = torch.randn(n, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(layer, x)
    ortho_err = (jac @ jac.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
    depth = 200
    stack = torch.nn.Sequential(*[HanLayer(n) for _ in range(depth)])
    relu = torch.nn.Sequential(*[m for _ in range(depth) for m in (torch.nn.Linear(n, n), torch.nn.ReLU())])
    ratios = []
    for net in (stack, relu):
        xin = torch.randn(32, n, requires_grad=True)
        out = net(xin)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        ratios.append(xin.grad.norm().item() / grad_out.norm().item())
    print(f"\nJacobian of one Han-layer (n={n}): max |J J^T - I| = {ortho_err:.1e}")
    print(
        f"Gradient norm ratio ||dL/dx|| / ||dL/dy|| through {depth} layers: "
        f"Han {ratios[0]:.6f}   ReLU MLP (default init) {ratios[1]:.3e}"
    )


def step_layer_speed() -> None:
    """A quick side-by-side timing of one layer vs nn.Linear (the full study is benchmarks/layer_speed.py)."""
    section("Speed: one layer, forward + backward, 4096 x 768, CPU")
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    n, rows = 768, 4096
    x = torch.randn(rows, n, requires_grad=True)
    grad = torch.randn(rows, n)
    candidates = {
        "HanLayer |Hx + b|": HanLayer(n),
        "HouseholderLinear (k=8)": HouseholderLinear(n, reflections=8),
        "nn.Linear + abs": torch.nn.Sequential(torch.nn.Linear(n, n), Abs()),
    }
    timings = {}
    for name, module in tqdm(candidates.items(), desc="timing", leave=False):
        for _ in range(2):
            module(x).backward(grad)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            module(x).backward(grad)
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    base = timings["nn.Linear + abs"]
    print(
        format_table(
            ["layer", "params", "fwd+bwd ms", "vs nn.Linear"],
            [
                [k, f"{count_parameters(candidates[k]):,}", f"{v * 1e3:.2f}", f"{base / v:.1f}x faster"]
                for k, v in timings.items()
            ],
        )
    )
