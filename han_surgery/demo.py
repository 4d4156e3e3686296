"""``han-surgery demo``: the whole story in under two minutes on two CPU cores, no download.

The demo is a list of steps (``DEMO_STEPS``); each step prints one section and
returns nothing. Steps only use what ships inside the package, or generates data.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from .layers import Abs, HanBlock, HanLayer, HouseholderLinear


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """Render a small left-aligned text table."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_layer_properties() -> None:
    """Parameters of a Han-block vs the MLP it replaces, and the Jacobian property, measured."""
    section("1. The Han-layer: O(n) parameters, orthogonal Jacobian")
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
    section("2. Speed: one layer, forward + backward, 4096 x 768, CPU")
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


from .finetune.demo_step import step_finetune  # noqa: E402
from .surgery.demo_step import step_surgery_minilm  # noqa: E402

DEMO_STEPS: list[Callable[[], None]] = [step_layer_properties, step_layer_speed, step_surgery_minilm, step_finetune]


def run_demo(args: argparse.Namespace | None = None) -> int:
    start = time.perf_counter()
    print(f"han-surgery demo (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    for step in DEMO_STEPS:
        step()
    print(f"\nDemo finished in {time.perf_counter() - start:.1f} s.")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="Run the no-download demo of han-surgery.")
    parser.set_defaults(func=run_demo)
