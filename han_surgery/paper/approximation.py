"""Mutual approximation (paper Section 3.2, Table 2): FC-1 and Han-3 fitting each other.

For input dimension ``d`` in {2, 3, 4} the two maps ``R^d -> R^d`` have about the same number
of parameters:

* FC-1: one dense layer with ABS, ``x -> |W x + b|`` (``d^2 + d`` parameters);
* Han-3: three Han-layers, ``x -> |H3 |H2 |H1 x + b1| + b2| + b3|`` (``6 d`` parameters).

A randomly initialised *target* of one kind (default PyTorch / Han-layer init) is fitted by a
*student* of the other kind with Adam on the MSE, on fresh inputs drawn uniformly from
``[-1, 1]^d`` each step; the score is the RMSE on 4,096 held-out inputs (and the RMSE divided by
the target's standard deviation). The same-kind fits (FC-1 -> FC-1, Han-3 -> Han-3) are reported
as a control: they show how close the optimiser gets when an exact fit exists.

Our reading of the paper's setting: the paper's exact target distribution and optimiser settings
were not available to us, see docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import Abs, HanLayer
from .common import count_parameters, markdown_table, mean_std, seed_everything, use_agg_backend, write_results

__all__ = ["fc1", "han3", "fit", "run", "add_arguments"]

PAIRS = (("han3", "fc1"), ("fc1", "han3"), ("fc1", "fc1"), ("han3", "han3"))  # (student, target)
LABELS = {"fc1": "FC-1", "han3": "Han-3"}


def fc1(d: int) -> nn.Module:
    """``x -> |W x + b|``, ``(N, d) -> (N, d)``."""
    return nn.Sequential(nn.Linear(d, d), Abs())


def han3(d: int) -> nn.Module:
    """Three Han-layers, ``(N, d) -> (N, d)``."""
    return nn.Sequential(HanLayer(d), HanLayer(d), HanLayer(d))


BUILDERS = {"fc1": fc1, "han3": han3}


def fit(
    student: str,
    target: str,
    d: int,
    seed: int,
    steps: int = 3000,
    batch_size: int = 256,
    lr: float = 1e-2,
    n_test: int = 4096,
) -> dict[str, float]:
    """Fit a fresh ``student`` to a random ``target`` (both ``"fc1"`` or ``"han3"``) in dimension ``d``."""
    gen = seed_everything(seed)
    teacher = BUILDERS[target](d).requires_grad_(False)
    model = BUILDERS[student](d)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x_test = torch.rand(n_test, d, generator=gen) * 2 - 1
    for _ in range(steps):
        x = torch.rand(batch_size, d, generator=gen) * 2 - 1
        opt.zero_grad(set_to_none=True)
        ((model(x) - teacher(x)) ** 2).mean().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        y = teacher(x_test)
        rmse = ((model(x_test) - y) ** 2).mean().sqrt().item()
        scale = y.std().item()
    return {
        "rmse": rmse,
        "relative_rmse": rmse / scale if scale > 0 else float("nan"),
        "target_std": scale,
        "student_params": count_parameters(model),
        "target_params": count_parameters(teacher),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dims", default="2,3,4")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, default=5, help="targets (and students) per cell")
    parser.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment described by ``args``; write ``--out``; return the results."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = [int(v) for v in args.dims.split(",") if v]
    steps, seeds = args.steps, list(range(args.seeds))
    if args.quick:
        steps, seeds = 200, seeds[:2]
    rows, table = [], []
    for student, target in PAIRS:
        row: dict[str, Any] = {"student": student, "target": target, "cells": {}}
        cells = []
        for d in dims:
            fits = [
                fit(student, target, d, seed, steps=steps, lr=args.lr)
                for seed in tqdm(seeds, desc=f"{student}<-{target} d={d}", leave=False)
            ]
            m, s = mean_std([f["rmse"] for f in fits])
            rm, rs = mean_std([f["relative_rmse"] for f in fits])
            row["cells"][str(d)] = {
                "rmse_mean": m,
                "rmse_std": s,
                "relative_rmse_mean": rm,
                "relative_rmse_std": rs,
                "student_params": fits[0]["student_params"],
                "target_params": fits[0]["target_params"],
                "per_seed": fits,
            }
            cells.append(f"{m:.2e} ± {s:.1e} (rel. {rm:.3f})")
        rows.append(row)
        table.append([f"{LABELS[student]} fits {LABELS[target]}" + (" (control)" if student == target else "")] + cells)
    params = [f"d={d}: FC-1 {d * d + d}, Han-3 {6 * d}" for d in dims]
    wall = time.perf_counter() - t_start
    md = (
        f"# Mutual approximation ({'quick smoke test' if args.quick else 'run'}: {steps} Adam steps, lr {args.lr}, "
        f"{len(seeds)} seeds; test RMSE mean ± std, relative = RMSE / target std)\n\n"
        + markdown_table(["student fits target"] + [f"d = {d}" for d in dims], table)
        + f"\nParameters: {'; '.join(params)}.\n\nWall time: {wall:.0f} s.\n"
    )
    results = {
        "experiment": "approximation",
        "quick": bool(args.quick),
        "command": getattr(args, "command_line", None),
        "config": {"dims": dims, "steps": steps, "lr": args.lr, "seeds": seeds, "batch_size": 256, "n_test": 4096},
        "rows": rows,
        "wall_seconds": wall,
    }
    folder = write_results(args.out, results, md)
    if folder is not None:
        _plot(rows, dims, folder / "approximation.png")
    print(md)
    return results


def _plot(rows: list[dict[str, Any]], dims: list[int], path: Path) -> None:
    plt = use_agg_backend()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for row in rows:
        ys = [row["cells"][str(d)]["rmse_mean"] for d in dims]
        es = [row["cells"][str(d)]["rmse_std"] for d in dims]
        style = "--" if row["student"] == row["target"] else "-"
        ax.errorbar(
            dims,
            ys,
            yerr=es,
            marker="o",
            linestyle=style,
            capsize=3,
            label=f"{LABELS[row['student']]} fits {LABELS[row['target']]}",
        )
    ax.set_yscale("log")
    ax.set_xticks(dims)
    ax.set_xlabel("input dimension d")
    ax.set_ylabel("test RMSE")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
