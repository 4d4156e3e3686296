"""Demo steps about the layer itself: parameters, the orthogonal Jacobian, speed against ``nn.Linear``."""

from __future__ import annotations

import statistics
import time

import torch

from ..layers import HanBlock, HanLayer, HouseholderLinear
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


def step_layer_speed(rounds: int = 7) -> dict[str, float]:
    """Forward + backward time of one layer vs ``nn.Linear``, as median per-round ratios (interleaved rounds).

    Returns ``{layer name: median(nn.Linear time / layer time)}``; the full study is ``benchmarks/layer_speed.py``.
    """
    section("Speed, honestly: one layer, forward + backward, 4096 x 768, CPU")
    torch.manual_seed(0)
    n, rows = 768, 4096
    x = torch.randn(rows, n, requires_grad=True)
    grad = torch.randn(rows, n)
    candidates = {
        "nn.Linear": torch.nn.Linear(n, n),
        "HouseholderLinear k=1 (paper)": HouseholderLinear(n, reflections=1),
        "HouseholderLinear k=8": HouseholderLinear(n, reflections=8),
    }
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for module in candidates.values():  # warm-up (and the one-off CPU kernel build)
        module(x).backward(grad)
    for _ in range(rounds):  # interleaved: every round times every layer once, so load hits all alike
        for name, module in candidates.items():
            start = time.perf_counter()
            module(x).backward(grad)
            times[name].append(time.perf_counter() - start)
    base = times["nn.Linear"]
    ratios = {k: statistics.median(b / t for b, t in zip(base, v, strict=True)) for k, v in times.items()}
    print(
        format_table(
            ["layer", "params", "median ms", "speed vs nn.Linear (median of per-round ratios)"],
            [
                [k, f"{count_parameters(candidates[k]):,}", f"{statistics.median(v) * 1e3:.2f}", f"{ratios[k]:.1f}x"]
                for k, v in times.items()
            ],
        )
    )
    print(
        f"({rounds} interleaved rounds, {torch.get_num_threads()} threads; the calibrated surgery above uses k=1, "
        "the default; k=8 is HanConfig(reflections=8))"
    )
    return ratios
