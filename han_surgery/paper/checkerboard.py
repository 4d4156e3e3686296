"""Checkerboard (paper Section 4, Figure 1, Table 3): HanNet vs FCNet and the seven ablation rows.

Data: the authors' 81 x 81 grid over ``[-1, 1]^2`` split 25% / 75% (``trainset.txt`` /
``testset.txt``, columns ``x1 x2 y y``). Protocol (the paper and the authors' code):

* HanNet: 20 hidden layers of width 30 (dense, dense, 17 Han-layers, dense), ABS, orthogonal
  init, dense 30 -> 2 head; FCNet: 6 ReLU layers of width 100, Kaiming normal init.
* MSE on the two outputs; SGD, momentum 0.9, batch 100 (drawn without replacement each step),
  40,000 iterations, lr x0.2 at 50/70/90% of them.
* The paper tries 10 initial learning rates (values not given) and keeps the best result. Ours:
  the authors' released grids, :data:`HAN_LRS` (4 values) for the 20 x 30 rows and :data:`FC_LRS`
  (9 values) for the 6 x 100 ones. All runs of a row train together as one stacked computation
  (:class:`~.stacked.StackedNet`), each exactly as it would alone.
* Accuracy: the mean of the two outputs thresholded at 0.5 against the label. The test accuracy
  is measured every 100 iterations; we read the paper's "best result kept" as the best one over
  training and over the lr grid (selected on the test set). We report that
  (``paper_protocol_test_acc``) and, as a number that does not select on the test set, the
  accuracy of the *final* model at the lr with the lowest final training loss (``final_test_acc``).

Table 3 rows, all on the 20 x 30 skeleton (the paper gives no other protocol change):
(a) Householder + ABS (= HanNet), (b) Householder + ReLU, (c) Householder + MaxMin, (d)
Householder + GroupSort(5), (e) FC + ABS (the 17 Householder layers replaced by dense 30 x 30
layers), (f1) orthogonally regularised FC + ABS, (f2) orthogonally regularised FC + ReLU. The
penalty is ``lambda * sum ||W^T W - I||_F^2`` over the square dense layers (``--ortho-weight``,
default 0.01; the paper's lambda did not survive extraction). Dense layers use orthogonal init
as in the HanNet; the ``e-default``, ``e-kaiming`` and ``e-6x100`` rows are diagnostics for row
(e) (PyTorch's default or Kaiming init; the FCNet's 6 x 100 skeleton with ABS).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checks import non_negative_float, positive_int, thread_count
from .common import (
    PaperInputError,
    count_parameters,
    fc_net,
    han_net,
    load_rows,
    markdown_table,
    parse_floats,
    positive_milestones,
    resolve_data_path,
    seed_arg,
    seed_everything,
    use_agg_backend,
    write_results,
)
from .stacked import StackedLinear, StackedNet, StackedSGD

__all__ = [
    "VARIANTS",
    "TABLE3",
    "HAN_LRS",
    "FC_LRS",
    "load_checkerboard",
    "build_model",
    "orthogonality_penalty",
    "accuracy",
    "skeleton",
    "train_rows",
    "run",
    "add_arguments",
]

#: ``--out`` also gets PNG plots (matplotlib), which :func:`~.cli.check_out` checks for before the run.
WRITES_PLOTS = True

# The paper tries 10 initial learning rates without listing them. The authors' released code
# sweeps these for the 20 x 30 networks and for the FCNet; we use them for every row.
HAN_LRS = (0.025, 0.05, 0.075, 0.1)
FC_LRS = (0.001, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25)

VARIANTS: dict[str, dict[str, Any]] = {
    "a": {"label": "(a) Householder + ABS (HanNet)", "householder": True, "activation": "abs"},
    "b": {"label": "(b) Householder + ReLU", "householder": True, "activation": "relu"},
    "c": {"label": "(c) Householder + MaxMin", "householder": True, "activation": "maxmin"},
    "d": {"label": "(d) Householder + GroupSort(5)", "householder": True, "activation": "groupsort5"},
    "e": {"label": "(e) FC + ABS", "householder": False, "activation": "abs"},
    "f1": {"label": "(f1) OrthFC + ABS", "householder": False, "activation": "abs", "ortho": True},
    "f2": {"label": "(f2) OrthFC + ReLU", "householder": False, "activation": "relu", "ortho": True},
    "fcnet": {"label": "FCNet (6 x 100, ReLU, Kaiming)", "fc": "relu"},
    # Diagnostics for row (e): which change brings FC + ABS down to the paper's 85.3%?
    "e-default": {
        "label": "(e) FC + ABS, PyTorch default init",
        "householder": False,
        "activation": "abs",
        "dense_init": "default",
    },
    "e-kaiming": {
        "label": "(e) FC + ABS, Kaiming init",
        "householder": False,
        "activation": "abs",
        "dense_init": "kaiming",
    },
    "e-6x100": {"label": "(e) FC + ABS on the FCNet skeleton (6 x 100, Kaiming)", "fc": "abs"},
}
TABLE3_ROWS = ("a", "b", "c", "d", "e", "f1", "f2", "fcnet")

# Test accuracy (%) stated by the paper: Table 3 and, for FCNet, Section 4's "about 85%".
TABLE3: dict[str, float] = {
    "a": 99.2,
    "b": 66.2,
    "c": 77.6,
    "d": 81.4,
    "e": 85.3,
    "f1": 86.7,
    "f2": 75.5,
    "fcnet": 85.0,
}


@dataclass
class Checkerboard:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_checkerboard(folder: str | Path | None = None) -> Checkerboard:
    """Read ``trainset.txt`` / ``testset.txt`` (space separated ``x1 x2 y y``) from ``folder``.

    ``folder`` defaults to ``../shared/data/checkerboard`` (see :func:`~.common.default_data_dir`). The points lie
    in ``[-1, 1]^2`` (the boards are drawn on an 81 x 81 grid over it) and the labels are 0 or 1.

    Raises:
        PaperInputError: a file is missing, unreadable or empty, or holds another shape, a non-finite value, a
            point outside ``[-1, 1]^2`` or a label other than 0 and 1 (its first such row named).
    """
    root = resolve_data_path(folder, "checkerboard")
    parts = []
    for name in ("trainset.txt", "testset.txt"):
        path = root / name
        try:
            arr = load_rows(path, np.float32)
        except (ValueError, OSError) as err:
            raise PaperInputError(
                f"{path} is not a readable checkerboard file ({err}); expected columns x1 x2 y y"
            ) from err
        if arr.shape[1] != 4 or len(arr) == 0:
            raise PaperInputError(f"{path} must have rows of 4 columns (x1 x2 y y), got shape {arr.shape}")
        bad = ~np.isfinite(arr).all(1) | (np.abs(arr[:, :2]) > 1).any(1) | ~np.isin(arr[:, 2:], (0, 1)).all(1)
        if bad.any():
            row = int(np.argmax(bad))
            raise PaperInputError(
                f"{path}: row {row + 1} is {arr[row].tolist()}; a checkerboard row is a point x1 x2 in [-1, 1] "
                f"and its label (0 or 1) twice ({int(bad.sum())} such row(s))"
            )
        parts += [torch.from_numpy(arr[:, :2]).contiguous(), torch.from_numpy(arr[:, 2:]).contiguous()]
    return Checkerboard(*parts)


def build_model(variant: str, fuse_abs: bool = True) -> nn.Sequential:
    """The network of row ``variant`` (a key of :data:`VARIANTS`); ``fuse_abs``: see :func:`~.common.han_net`."""
    if variant not in VARIANTS:
        raise PaperInputError(f"unknown checkerboard variant {variant!r}; choose from {', '.join(VARIANTS)}")
    spec = VARIANTS[variant]
    if "fc" in spec:
        return fc_net(2, 100, 6, 2, activation=spec["fc"], init="kaiming")
    return han_net(
        2,
        30,
        20,
        2,
        dense_first=2,
        dense_last=1,
        activation=spec["activation"],
        householder=spec["householder"],
        dense_init=spec.get("dense_init", "orthogonal"),
        fuse_abs=fuse_abs,
    )


def orthogonality_penalty(model: nn.Module) -> Tensor:
    """``sum ||W^T W - I||_F^2`` over the square dense layers of ``model``.

    For an ``nn.Sequential`` a scalar; for a :class:`~.stacked.StackedNet` one value per member, ``(R,)``.
    """
    total = torch.zeros(())
    for m in model.modules():
        if isinstance(m, (nn.Linear, StackedLinear)) and m.weight.shape[-1] == m.weight.shape[-2]:
            w = m.weight
            gram = w.transpose(-1, -2) @ w - torch.eye(w.shape[-1], dtype=w.dtype)
            total = total + (gram**2).sum(dim=(-2, -1))
    return total


def accuracy(pred: Tensor, target: Tensor) -> Tensor:
    """The authors' ``correct``: mean over the two outputs, thresholded at 0.5, vs the label.

    ``pred, target: (..., N, 2) -> (...)`` accuracy in [0, 1].
    """
    return ((pred.mean(dim=-1) > 0.5).float() == target.mean(dim=-1)).float().mean(dim=-1)


def skeleton(variant: str) -> str:
    """Rows with the same skeleton have the same parameter shapes and train in one stack."""
    spec = VARIANTS[variant]
    if "fc" in spec:
        return "6x100"
    return "householder 20x30" if spec["householder"] else "dense 20x30"


def train_rows(
    variants: list[str],
    lrs: tuple[float, ...],
    iters: int,
    data: Checkerboard,
    seed: int = 0,
    batch_size: int = 100,
    eval_every: int = 100,
    ortho_weight: float = 1e-2,
    compile: bool = False,
    progress: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Train every row of ``variants`` (one :func:`skeleton`) at every lr in ``lrs``, as one stacked computation.

    Every run of a row starts from the row's initial weights for seed ``seed``, and every run sees
    the same batches, exactly as separate runs with that seed would. Returns, per row, one dict per
    lr with ``final_train_loss``, ``final_train_acc``, ``final_test_acc``, ``best_test_acc`` (max
    over the evaluations every ``eval_every`` iterations; -1 if the run diverged before the
    first), ``best_iter``, ``diverged``, ``curve`` (iteration, train loss, test accuracy) and
    ``board`` (the final model's class on all points, train then test order).
    """
    if len({skeleton(v) for v in variants}) != 1:
        raise ValueError(f"train_rows: {variants} mix skeletons; train one skeleton per call")
    runs = [(v, lr) for v in variants for lr in lrs]
    size = len(runs)
    members = []
    for v in variants:
        seed_everything(seed)
        first = build_model(v, fuse_abs=False)
        members.append(first)
        for _ in lrs[1:]:
            members.append(build_model(v, fuse_abs=False))
            members[-1].load_state_dict(first.state_dict())
    gen = seed_everything(seed)
    net = StackedNet(members)
    opt = StackedSGD(net.parameters(), member_lr=[lr for _, lr in runs], size=size, momentum=0.9)
    milestones = positive_milestones([int(f * iters) for f in (0.5, 0.7, 0.9)])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.2)
    ortho = torch.tensor([float(bool(VARIANTS[v].get("ortho"))) for v, _ in runs])

    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        per_member = ((net(x) - y) ** 2).mean(dim=(1, 2))
        if ortho.any():
            per_member = per_member + ortho_weight * ortho * orthogonality_penalty(net)
        return per_member.sum()

    step_loss = torch.compile(loss_fn) if compile else loss_fn
    n = data.x_train.shape[0]
    best_acc = torch.full((size,), -1.0)
    best_iter = torch.full((size,), -1, dtype=torch.long)
    curves: list[list[tuple[int, float, float]]] = [[] for _ in runs]
    alive = torch.ones(size, dtype=torch.bool)
    t0 = time.perf_counter()
    desc = f"{','.join(variants)} x{len(lrs)}"
    for it in tqdm(range(iters), desc=desc, leave=False, disable=not progress, mininterval=10.0):
        idx = torch.randperm(n, generator=gen)[:batch_size]
        opt.zero_grad(set_to_none=True)
        step_loss(data.x_train[idx], data.y_train[idx]).backward()
        opt.step()
        sched.step()
        if it % eval_every == 0 or it == iters - 1:
            with torch.no_grad():
                train_loss = ((net(data.x_train) - data.y_train) ** 2).mean(dim=(1, 2))
                test_acc = accuracy(net(data.x_test), data.y_test)
            alive &= torch.isfinite(train_loss)
            improved = alive & (test_acc > best_acc)
            best_acc = torch.where(improved, test_acc, best_acc)
            best_iter[improved] = it
            for r in range(size):
                if alive[r]:
                    curves[r].append((it, train_loss[r].item(), test_acc[r].item()))
            if not alive.any():
                break
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        train_pred, test_pred = net(data.x_train), net(data.x_test)
    train_loss = ((train_pred - data.y_train) ** 2).mean(dim=(1, 2))
    train_acc, test_acc = accuracy(train_pred, data.y_train), accuracy(test_pred, data.y_test)
    boards = (torch.cat([train_pred, test_pred], dim=1).mean(dim=-1) > 0.5).numpy().astype(np.uint8)
    out: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r, (v, lr) in enumerate(runs):
        out[v].append(
            {
                "variant": v,
                "lr": lr,
                "seed": seed,
                "iters": iters,
                "diverged": not bool(alive[r]),
                "final_train_loss": train_loss[r].item(),
                "final_train_acc": train_acc[r].item(),
                "final_test_acc": test_acc[r].item(),
                "best_test_acc": best_acc[r].item(),
                "best_iter": int(best_iter[r]),
                "seconds": seconds,  # wall time of the whole stack
                "curve": curves[r],
                "board": boards[r],
            }
        )
    return out


def _grid_image(points: Tensor, values: np.ndarray, size: int = 81) -> np.ndarray:
    ij = torch.round((points + 1.0) / 2.0 * (size - 1)).long().numpy()
    img = np.full((size, size), np.nan)
    img[ij[:, 1], ij[:, 0]] = values
    return img


def plot_boards(data: Checkerboard, boards: dict[str, np.ndarray], titles: dict[str, str], path: Path) -> None:
    """PNG: the true board next to each model's predicted board (all 6,561 grid points)."""
    plt = use_agg_backend()
    pts = torch.cat([data.x_train, data.x_test])
    truth = torch.cat([data.y_train, data.y_test]).mean(dim=1).numpy()
    panels = [("truth", _grid_image(pts, truth))] + [(titles[k], _grid_image(pts, v)) for k, v in boards.items()]
    cols = min(len(panels), 6)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, img) in zip(axes.flat, panels, strict=False):
        ax.imshow(img, origin="lower", extent=(-1, 1, -1, 1), cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[str, list[tuple[int, float, float]]], titles: dict[str, str], path: Path) -> None:
    """PNG: test accuracy and training loss against iterations for each row's chosen lr."""
    plt = use_agg_backend()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, curve in curves.items():
        if not curve:
            continue
        it, loss, acc = zip(*curve, strict=True)
        ax1.plot(it, acc, label=titles[key])
        ax2.semilogy(it, np.maximum(loss, 1e-12), label=titles[key])
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("test accuracy")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("training MSE")
    ax1.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="folder with trainset.txt / testset.txt (default ../shared/data/checkerboard)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(TABLE3_ROWS),
        help="comma-separated rows (default: Table 3's seven and FCNet); also: " + ", ".join(VARIANTS),
    )
    parser.add_argument("--iters", type=positive_int, default=40_000, help="SGD iterations per run (paper: 40,000)")
    parser.add_argument(
        "--lrs", default=None, help="initial lr grid for every row (default: the authors' HAN_LRS / FC_LRS per row)"
    )
    parser.add_argument("--eval-every", type=positive_int, default=100)
    parser.add_argument(
        "--ortho-weight", type=non_negative_float, default=1e-2, help="lambda of the OrthFC penalty (rows f1, f2)"
    )
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the stacked training step")
    parser.add_argument("--threads", type=thread_count, default=None, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment described by ``args`` (see :func:`add_arguments`); write ``--out``; return the results."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise PaperInputError(f"--variants: unknown {unknown or args.variants!r}; choose from {', '.join(VARIANTS)}")
    if args.iters < 1 or args.eval_every < 1:
        raise PaperInputError(f"--iters and --eval-every must be >= 1, got {args.iters} and {args.eval_every}")
    lrs = None if args.lrs is None else parse_floats(args.lrs, "--lrs", positive=True)  # None: each row's grid
    iters, eval_every = args.iters, args.eval_every
    if args.quick:
        iters, eval_every = 60, 30
        lrs = lrs or (0.01, 0.05)
    data_dir = resolve_data_path(args.data, "checkerboard")
    data = load_checkerboard(data_dir)
    rows, table, boards, curves, titles = [], [], {}, {}, {}
    trained: dict[str, list[dict[str, Any]]] = {}
    for v in tqdm(variants, desc="checkerboard rows", disable=len(variants) == 1 or args.quick):
        row_lrs = lrs or (FC_LRS if skeleton(v) == "6x100" else HAN_LRS)
        trained.update(
            train_rows(
                [v], row_lrs, iters, data, args.seed, eval_every=eval_every, ortho_weight=args.ortho_weight,
                compile=args.compile, progress=not args.quick,
            )
        )  # fmt: skip
    for v in variants:
        runs = trained[v]
        paper_pick = max(runs, key=lambda r: r["best_test_acc"])
        finite = [r for r in runs if np.isfinite(r["final_train_loss"])]
        all_diverged = not finite
        clean_pick = min(finite or runs, key=lambda r: r["final_train_loss"])
        titles[v] = VARIANTS[v]["label"]
        boards[v] = clean_pick["board"]
        curves[v] = clean_pick["curve"]
        keys = ("lr", "final_train_loss", "final_train_acc", "final_test_acc", "best_test_acc", "best_iter", "diverged")
        row = {
            "variant": v,
            "label": VARIANTS[v]["label"],
            "params": count_parameters(build_model(v)),
            "paper_test_acc": TABLE3.get(v),
            # best_test_acc stays -1 for a run that diverged before its first evaluation
            "paper_protocol_test_acc": 100 * paper_pick["best_test_acc"] if paper_pick["best_test_acc"] >= 0 else None,
            "paper_protocol_lr": paper_pick["lr"],
            "final_test_acc": None if all_diverged else 100 * clean_pick["final_test_acc"],
            "final_train_acc": None if all_diverged else 100 * clean_pick["final_train_acc"],
            "final_train_loss": clean_pick["final_train_loss"],
            "final_lr": clean_pick["lr"],
            "seconds": runs[0]["seconds"],
            "per_lr": [{k: r[k] for k in keys} for r in runs],
        }
        rows.append(row)
        table.append(
            [
                row["label"],
                f"{row['params']:,}",
                "-" if row["paper_test_acc"] is None else f"{row['paper_test_acc']:.1f}",
                "all lrs diverged"
                if row["paper_protocol_test_acc"] is None
                else f"{row['paper_protocol_test_acc']:.2f} (lr {row['paper_protocol_lr']})",
                "all lrs diverged" if all_diverged else f"{row['final_test_acc']:.2f} (lr {row['final_lr']})",
                "-" if all_diverged else f"{row['final_train_acc']:.2f}",
            ]
        )
    wall = time.perf_counter() - t_start
    md = (
        f"# Checkerboard ({'quick smoke test' if args.quick else 'run'}: {iters} iterations, "
        f"lrs {list(lrs) if lrs else 'per row'}, seed {args.seed})\n\n"
        + markdown_table(
            [
                "model",
                "params",
                "paper test acc %",
                "ours: best test acc over training and lrs % (paper's selection)",
                "ours: final test acc % (lr with lowest final train loss)",
                "final train acc %",
            ],
            table,
        )
        + f"\nWall time: {wall:.0f} s.\n"
    )
    results = {
        "experiment": "checkerboard",
        "quick": bool(args.quick),
        "command": getattr(args, "command_line", None),
        "config": {
            "iters": iters,
            "eval_every": eval_every,
            "lrs": list(lrs) if lrs else {"20x30 rows": list(HAN_LRS), "6x100 rows": list(FC_LRS)},
            "batch_size": 100,
            "seed": args.seed,
            "ortho_weight": args.ortho_weight,
            "compile": bool(args.compile),
            "data": str(data_dir),
        },
        "rows": rows,
        "wall_seconds": wall,
    }
    folder = write_results(args.out, results, md)
    if folder is not None:
        plot_boards(data, boards, titles, folder / "boards.png")
        plot_curves(curves, titles, folder / "curves.png")
    print(md)
    return results
