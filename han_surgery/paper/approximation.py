"""Mutual approximation (paper Section 3.2, Tables 1-2): FC-1 and Han-3 fitting each other.

Models, ``R^d -> R^d`` (:func:`fc1`, :func:`han3`): an input layer (dense ``d -> n``), the hidden
part, an output layer (dense ``n -> d``):

* FC-1: one hidden dense layer of width ``n`` with ReLU (``n^2 + n`` hidden parameters);
* Han-3: three Han-layers of width ``n``, ``|H x + b|`` (``6 n`` hidden parameters).

The paper leaves the exact form of the input and output layers open; ours are plain dense maps
with no activation of their own. Every dense layer has orthogonal init ("FC models use random
orthogonal init"), the Householder vectors the Han-layer's orthogonal init.

Protocol (the paper): 2,000 random training and 10,000 test points drawn uniformly from
``[-1, 1]^d``, ``d`` in {2, 3, 4}. A *target* model of one kind is fixed and a *student* of
either kind is fitted to its outputs with the MSE; test RMSE against the target. Training, Table
1's grid with the best run kept: optimizer {SGD, Adam} x lr {1e-4, 1e-3, 1e-2, 1e-1} x weight
decay {0, 1e-3}, batch 100, 1,000 epochs (20,000 steps), lr x0.2 at 6/10 and 9/10 of training.
The 16 settings x 2 targets of one student kind train together as two stacked computations (one
per optimizer, :class:`~.stacked.StackedNet`).

Where we differ: the target is a randomly initialised model of its kind, where the paper's is
"trained" (on data it does not name), so our errors are on targets of another scale than its.
Our choices where the paper is silent: SGD uses momentum 0.9; the kept run is
the one with the lowest final *training* RMSE (``test_rmse``; the lowest *test* RMSE over the
grid is recorded too, as ``best_test_rmse``); width ``n`` from ``--widths`` (the paper uses 30 to
100 without saying which one Table 2 shows).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checks import positive_int, thread_count
from ..layers import HanLayer
from .common import (
    SEED_LIMIT,
    PaperInputError,
    count_parameters,
    markdown_table,
    positive_milestones,
    seed_arg,
    seed_everything,
    use_agg_backend,
    write_results,
)
from .stacked import StackedAdam, StackedNet, StackedSGD

__all__ = ["TABLE2", "fc1", "han3", "fit_grid", "run", "add_arguments"]

#: ``--out`` also gets PNG plots (matplotlib), which :func:`~.cli.check_out` checks for before the run.
WRITES_PLOTS = True

# (student, target) pairs in the paper's column order.
PAIRS = (("fc1", "fc1"), ("han3", "fc1"), ("fc1", "han3"), ("han3", "han3"))
LABELS = {"fc1": "FC-1", "han3": "Han-3"}
OPTIMIZERS = ("sgd", "adam")
LRS = (1e-4, 1e-3, 1e-2, 1e-1)
WEIGHT_DECAYS = (0.0, 1e-3)

# Table 2 of the paper: test RMSE per input dimension d and (student, target).
TABLE2: dict[int, dict[tuple[str, str], float]] = {
    2: {("fc1", "fc1"): 0.00033, ("han3", "fc1"): 0.00049, ("fc1", "han3"): 0.00107, ("han3", "han3"): 0.00079},
    3: {("fc1", "fc1"): 0.00086, ("han3", "fc1"): 0.00078, ("fc1", "han3"): 0.00251, ("han3", "han3"): 0.00237},
    4: {("fc1", "fc1"): 0.00184, ("han3", "fc1"): 0.00192, ("fc1", "han3"): 0.00478, ("han3", "han3"): 0.00494},
}


def _dense(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.orthogonal_(layer.weight)
    return layer


def fc1(d: int, width: int) -> nn.Sequential:
    """FC-1: ``Linear(d, n) -> Linear(n, n) -> ReLU -> Linear(n, d)``; ``(N, d) -> (N, d)``."""
    return nn.Sequential(_dense(d, width), _dense(width, width), nn.ReLU(), _dense(width, d))


def han3(d: int, width: int) -> nn.Sequential:
    """Han-3: ``Linear(d, n) -> 3 x HanLayer(n) -> Linear(n, d)``; ``(N, d) -> (N, d)``."""
    return nn.Sequential(_dense(d, width), HanLayer(width), HanLayer(width), HanLayer(width), _dense(width, d))


BUILDERS = {"fc1": fc1, "han3": han3}


def fit_grid(
    student: str,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    width: int,
    seed: int = 0,
    epochs: int = 1000,
    batch_size: int = 100,
    max_steps: int | None = None,
    compile: bool = False,
) -> list[list[dict[str, Any]]]:
    """Fit ``student`` to each of ``T`` targets with every setting of Table 1's grid.

    ``x_train: (N, d)``, ``y_train: (T, N, d)`` (the outputs of ``T`` target models),
    ``x_test: (M, d)``, ``y_test: (T, M, d)``. All ``T x 16`` fits start from the same initial
    student (seed ``seed``), see the same batches and train as two stacked computations (one per
    optimizer). Returns, per target, one dict per setting: ``optimizer``, ``lr``,
    ``weight_decay``, ``train_rmse`` and ``test_rmse`` of the final model.
    """
    d, n_targets = x_train.shape[1], y_train.shape[0]
    gen = seed_everything(seed)
    init = BUILDERS[student](d, width)
    settings = [(lr, wd) for lr in LRS for wd in WEIGHT_DECAYS]
    size = n_targets * len(settings)  # member r fits target r // len(settings) with setting r % len(settings)
    y_train_stack = y_train.repeat_interleave(len(settings), dim=0)
    steps_total = epochs * -(-x_train.shape[0] // batch_size)
    milestones = positive_milestones([int(0.6 * steps_total), int(0.9 * steps_total)])
    stacks, opts, scheds = [], [], []
    for name in OPTIMIZERS:
        members = [BUILDERS[student](d, width) for _ in range(size)]
        for m in members:
            m.load_state_dict(init.state_dict())
        net = StackedNet(members)
        kwargs = {
            "member_lr": [lr for lr, _ in settings] * n_targets,
            "weight_decay": [wd for _, wd in settings] * n_targets,
        }
        if name == "adam":
            opt = StackedAdam(net.parameters(), size=size, **kwargs)
        else:
            opt = StackedSGD(net.parameters(), size=size, momentum=0.9, **kwargs)
        stacks.append(net)
        opts.append(opt)
        scheds.append(torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.2))

    def loss_fn(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return ((net(x) - y) ** 2).mean(dim=(1, 2)).sum()

    step_loss = torch.compile(loss_fn) if compile else loss_fn
    steps = 0
    for _ in range(epochs):
        for idx in torch.randperm(x_train.shape[0], generator=gen).split(batch_size):
            for net, opt, sched in zip(stacks, opts, scheds, strict=True):
                opt.zero_grad(set_to_none=True)
                step_loss(net, x_train[idx], y_train_stack[:, idx]).backward()
                opt.step()
                sched.step()  # per step: the milestones are in steps
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    results: list[list[dict[str, Any]]] = [[] for _ in range(n_targets)]
    with torch.no_grad():
        for name, net in zip(OPTIMIZERS, stacks, strict=True):
            train_rmse = ((net(x_train) - y_train_stack) ** 2).mean(dim=(1, 2)).sqrt()
            test_rmse = ((net(x_test) - y_test.repeat_interleave(len(settings), dim=0)) ** 2).mean(dim=(1, 2)).sqrt()
            for r in range(size):
                lr, wd = settings[r % len(settings)]
                results[r // len(settings)].append(
                    {
                        "optimizer": name,
                        "lr": lr,
                        "weight_decay": wd,
                        "steps": steps,
                        "train_rmse": train_rmse[r].item(),
                        "test_rmse": test_rmse[r].item(),
                    }
                )
    return results


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise PaperInputError(f"{option} takes comma-separated integers, got {text!r}") from err
    if not values or any(v < 1 for v in values):
        raise PaperInputError(f"{option} takes positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dims", default="2,3,4", help="input dimensions d (paper: 2,3,4)")
    parser.add_argument("--widths", default="30", help="hidden widths n, comma-separated (paper: 30 to 100)")
    parser.add_argument("--epochs", type=positive_int, default=1000, help="paper: 1,000 (20,000 steps of 100)")
    parser.add_argument("--n-train", type=positive_int, default=2000, help="paper: 2,000")
    parser.add_argument("--n-test", type=positive_int, default=10000, help="paper: 10,000")
    parser.add_argument("--seed", type=seed_arg, default=0, help="data of dimension d: seed + 1000 d")
    parser.add_argument("--compile", action="store_true", help="torch.compile the stacked training step")
    parser.add_argument("--threads", type=thread_count, default=None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment described by ``args``; write ``--out``; return the results."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    dims, widths = _ints(args.dims, "--dims"), _ints(args.widths, "--widths")
    if args.seed + 1000 * max(dims) >= SEED_LIMIT:  # the data of dimension d is seeded with seed + 1000 d
        raise PaperInputError(
            f"--seed must be < 2**63 - {1000 * max(dims)} with --dims {args.dims} (dimension d seeds its data with "
            f"seed + 1000 d), got {args.seed}"
        )
    for option in ("epochs", "n_train", "n_test"):
        if getattr(args, option) < 1:
            raise PaperInputError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    epochs, max_steps, n_train, n_test = args.epochs, None, args.n_train, args.n_test
    if args.quick:
        epochs, max_steps, n_train, n_test, widths = 1, 20, 400, 1000, widths[:1]
    rows = []
    for width in widths:
        for d in tqdm(dims, desc=f"width {width}", leave=False, disable=args.quick):
            gen = seed_everything(args.seed + 1000 * d)
            x_train = torch.rand(n_train, d, generator=gen) * 2 - 1
            x_test = torch.rand(n_test, d, generator=gen) * 2 - 1
            targets = {kind: BUILDERS[kind](d, width).requires_grad_(False) for kind in ("fc1", "han3")}
            with torch.no_grad():
                y_train = torch.stack([targets[kind](x_train) for kind in ("fc1", "han3")])
                y_test = torch.stack([targets[kind](x_test) for kind in ("fc1", "han3")])
            for student in ("fc1", "han3"):
                t0 = time.perf_counter()
                grids = fit_grid(
                    student, x_train, y_train, x_test, y_test, width, seed=args.seed + 1,
                    epochs=epochs, max_steps=max_steps, compile=args.compile,
                )  # fmt: skip
                seconds = time.perf_counter() - t0
                for t, target in enumerate(("fc1", "han3")):
                    grid = grids[t]
                    kept = min(grid, key=lambda g: g["train_rmse"] if math.isfinite(g["train_rmse"]) else math.inf)
                    finite_test = [g["test_rmse"] for g in grid if math.isfinite(g["test_rmse"])]
                    rows.append(
                        {
                            "width": width,
                            "d": d,
                            "student": student,
                            "target": target,
                            "paper_rmse": TABLE2.get(d, {}).get((student, target)),
                            "test_rmse": kept["test_rmse"],
                            "train_rmse": kept["train_rmse"],
                            "kept": {k: kept[k] for k in ("optimizer", "lr", "weight_decay")},
                            "best_test_rmse": min(finite_test, default=math.nan),
                            "target_std": y_test[t].std().item(),
                            "student_params": count_parameters(BUILDERS[student](d, width)),
                            "target_params": count_parameters(targets[target]),
                            "seconds": seconds,  # the student's stacks, both targets
                            "grid": grid,
                        }
                    )
    table = []
    for width in widths:
        for d in dims:
            cells = [r for r in rows if r["width"] == width and r["d"] == d]
            line = [str(width), str(d)]
            for student, target in PAIRS:
                r = next(c for c in cells if c["student"] == student and c["target"] == target)
                paper = "-" if r["paper_rmse"] is None else f"{r['paper_rmse']:.5f}"
                line += [paper, f"{r['test_rmse']:.5f}"]
            table.append(line)
    headers = ["n", "d"]
    for student, target in PAIRS:
        pair = f"{LABELS[student]} fits {LABELS[target]}"
        headers += [f"paper: {pair}", f"ours: {pair}"]
    wall = time.perf_counter() - t_start
    md = (
        f"# Mutual approximation ({'quick smoke test' if args.quick else 'run'}: {n_train} train / {n_test} test "
        f"points, {epochs} epochs of batch 100, Table 1's 16 settings, lowest training RMSE kept; test RMSE)\n\n"
        + markdown_table(headers, table)
        + f"\nWall time: {wall:.0f} s.\n"
    )
    results = {
        "experiment": "approximation",
        "quick": bool(args.quick),
        "command": getattr(args, "command_line", None),
        "config": {
            "dims": dims,
            "widths": widths,
            "epochs": epochs,
            "max_steps": max_steps,
            "n_train": n_train,
            "n_test": n_test,
            "batch_size": 100,
            "grid": {"optimizer": list(OPTIMIZERS), "lr": list(LRS), "weight_decay": list(WEIGHT_DECAYS)},
            "sgd_momentum": 0.9,
            "schedule": "lr x0.2 at 6/10 and 9/10 of the steps",
            "seed": args.seed,
            "compile": bool(args.compile),
        },
        "rows": rows,
        "wall_seconds": wall,
    }
    folder = write_results(args.out, results, md)
    if folder is not None:
        _plot(rows, dims, widths, folder / "approximation.png")
    print(md)
    return results


def _plot(rows: list[dict[str, Any]], dims: list[int], widths: list[int], path: Path) -> None:
    plt = use_agg_backend()
    fig, axes = plt.subplots(1, len(widths), figsize=(5.2 * len(widths), 3.4), squeeze=False)
    for ax, width in zip(axes[0], widths, strict=True):
        for k, (student, target) in enumerate(PAIRS):
            mine = [next(r for r in rows if r["width"] == width and r["d"] == d and r["student"] == student
                         and r["target"] == target) for d in dims]  # fmt: skip
            label = f"{LABELS[student]} fits {LABELS[target]}"
            ax.plot(dims, [r["test_rmse"] for r in mine], marker="o", color=f"C{k}", label=f"ours: {label}")
            paper = [TABLE2.get(d, {}).get((student, target), float("nan")) for d in dims]
            ax.plot(dims, paper, marker="x", linestyle="--", color=f"C{k}", label=f"paper: {label}")
        ax.set_yscale("log")
        ax.set_xticks(dims)
        ax.set_xlabel("input dimension d")
        ax.set_ylabel("test RMSE")
        ax.set_title(f"width n = {width}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
