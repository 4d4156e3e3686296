"""Checkerboard (paper Section 4, Figure 1, Table 3): HanNet vs FCNet and ablations.

Data: the authors' 81 x 81 grid over ``[-1, 1]^2`` split 25% / 75% (``trainset.txt`` /
``testset.txt``, columns ``x1 x2 y y``). Protocol (the authors' ``checkerboard_experiments/main.py``):

* HanNet: 20 hidden layers of width 30 (dense, dense, 17 Han-layers, dense), ABS, orthogonal
  init, dense 30 -> 2 head; FCNet: 6 ReLU layers of width 100, Kaiming normal init.
* MSE on the two outputs; SGD, momentum 0.9, batch 100 (drawn without replacement each step),
  40,000 iterations, lr x0.2 at 50/70/90% of them.
* Accuracy: the mean of the two outputs thresholded at 0.5 against the label. The test accuracy
  is measured every 100 iterations; the paper reports the best one over training and over the lr
  grid. We report that (``paper_acc``) and, as a number that does not select on the test set, the
  accuracy of the *final* model at the lr with the lowest final training loss (``final_acc``).

Ablations (Table 3), all on the 20 x 30 skeleton: (a) HH + ABS (= HanNet), (b) HH + ReLU,
(e) FC + ABS (Householder layers replaced by dense 30 x 30 layers, orthogonal init),
(f1) FC + ABS with an orthogonality penalty ``lambda * sum ||W^T W - I||_F^2`` over all square
dense layers (``--ortho-weight``, default 0.01).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .common import (
    count_parameters,
    fc_net,
    han_net,
    markdown_table,
    resolve_data_path,
    seed_everything,
    use_agg_backend,
    write_results,
)

__all__ = ["VARIANTS", "PAPER", "load_checkerboard", "build_model", "accuracy", "train_one", "run", "add_arguments"]

HAN_LRS = (0.025, 0.05, 0.075, 0.1)
# The authors' code sweeps a wider grid for FCNet (checkerboard_experiments/main.py).
FC_LRS = (0.001, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25)

VARIANTS: dict[str, dict[str, Any]] = {
    "a": {"label": "(a) HH + ABS (HanNet)", "householder": True, "activation": "abs"},
    "b": {"label": "(b) HH + ReLU", "householder": True, "activation": "relu"},
    "e": {"label": "(e) FC + ABS", "householder": False, "activation": "abs"},
    "f1": {"label": "(f1) FC + ABS + orth. penalty", "householder": False, "activation": "abs", "ortho": True},
    "fcnet": {"label": "FCNet (6 x 100, ReLU, Kaiming)", "fc": True},
}

# Test accuracy (%) stated by the paper for the two headline models (Section 4).
PAPER: dict[str, float] = {"a": 99.2, "fcnet": 85.0}


@dataclass
class Checkerboard:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_checkerboard(folder: str | Path | None = None) -> Checkerboard:
    """Read ``trainset.txt`` / ``testset.txt`` (space separated ``x1 x2 y y``) from ``folder``.

    ``folder`` defaults to ``../shared/data/checkerboard`` (see :func:`~.common.default_data_dir`).
    """
    root = resolve_data_path(folder, "checkerboard")
    parts = []
    for name in ("trainset.txt", "testset.txt"):
        arr = np.loadtxt(root / name, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ValueError(
                f"han_surgery.paper.checkerboard: {root / name} must have 4 columns (x1 x2 y y), got shape {arr.shape}"
            )
        parts += [torch.from_numpy(arr[:, :2]).contiguous(), torch.from_numpy(arr[:, 2:]).contiguous()]
    return Checkerboard(*parts)


def build_model(variant: str) -> nn.Module:
    """The network of ablation row ``variant`` (a key of :data:`VARIANTS`)."""
    spec = VARIANTS[variant]
    if spec.get("fc"):
        return fc_net(2, 100, 6, 2, activation="relu", init="kaiming")
    return han_net(
        2, 30, 20, 2, dense_first=2, dense_last=1, activation=spec["activation"], householder=spec["householder"]
    )


def orthogonality_penalty(model: nn.Module) -> Tensor:
    """``sum ||W^T W - I||_F^2`` over the square ``nn.Linear`` layers of ``model`` (except the head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.shape[0] == m.weight.shape[1]]
    total = torch.zeros(())
    for lin in linears:
        w = lin.weight
        eye = torch.eye(w.shape[1], dtype=w.dtype)
        total = total + ((w.T @ w - eye) ** 2).sum()
    return total


def accuracy(pred: Tensor, target: Tensor) -> float:
    """The authors' ``correct``: mean over the two outputs, thresholded at 0.5, vs the label."""
    return ((pred.mean(dim=1) > 0.5).float() == target.mean(dim=1)).float().mean().item()


def train_one(
    variant: str,
    lr: float,
    iters: int,
    data: Checkerboard,
    seed: int = 0,
    batch_size: int = 100,
    eval_every: int = 100,
    ortho_weight: float = 1e-2,
    compile: bool = False,
    threads: int | None = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one model of ``variant`` at ``lr`` with the paper's protocol; return its metrics.

    Returns a dict with ``final_train_loss``, ``final_train_acc``, ``final_test_acc``, ``best_test_acc``
    (max over the evaluations every ``eval_every`` iterations), ``best_iter``, ``curve`` (iteration,
    train loss, test accuracy) and ``board`` (the final model's predicted class on all points, train
    then test order, as a numpy array).
    """
    if threads:
        torch.set_num_threads(threads)
    gen = seed_everything(seed)
    model = build_model(variant)
    spec = VARIANTS[variant]
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    milestones = [int(f * iters) for f in (0.5, 0.7, 0.9)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.2)
    criterion = nn.MSELoss()
    n = data.x_train.shape[0]
    best_acc, best_iter, curve = -1.0, -1, []
    diverged = False
    t0 = time.perf_counter()
    for it in tqdm(range(iters), desc=f"{variant} lr={lr}", leave=False, disable=not progress, mininterval=1.0):
        idx = torch.randperm(n, generator=gen)[:batch_size]
        opt.zero_grad(set_to_none=True)
        loss = criterion(step_model(data.x_train[idx]), data.y_train[idx])
        if spec.get("ortho"):
            loss = loss + ortho_weight * orthogonality_penalty(model)
        loss.backward()
        opt.step()
        sched.step()
        if it % eval_every == 0 or it == iters - 1:
            with torch.no_grad():
                model.eval()
                train_pred, test_pred = model(data.x_train), model(data.x_test)
                model.train()
            train_loss = criterion(train_pred, data.y_train).item()
            test_acc = accuracy(test_pred, data.y_test)
            curve.append((it, train_loss, test_acc))
            if not np.isfinite(train_loss):
                diverged = True
                break
            if test_acc > best_acc:
                best_acc, best_iter = test_acc, it
    with torch.no_grad():
        train_pred, test_pred = model(data.x_train), model(data.x_test)
    board = (torch.cat([train_pred, test_pred]).mean(dim=1) > 0.5).numpy().astype(np.uint8)
    return {
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "iters": iters,
        "diverged": diverged,
        "final_train_loss": criterion(train_pred, data.y_train).item(),
        "final_train_acc": accuracy(train_pred, data.y_train),
        "final_test_acc": accuracy(test_pred, data.y_test),
        "best_test_acc": best_acc,
        "best_iter": best_iter,
        "seconds": time.perf_counter() - t0,
        "curve": curve,
        "board": board,
    }


def _job(kwargs: dict[str, Any]) -> dict[str, Any]:
    data = load_checkerboard(kwargs.pop("data_dir"))
    return train_one(data=data, **kwargs)


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
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels, strict=False):
        ax.imshow(img, origin="lower", extent=(-1, 1, -1, 1), cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[str, list[tuple[int, float, float]]], titles: dict[str, str], path: Path) -> None:
    """PNG: test accuracy and training loss against iterations for each row's chosen lr."""
    plt = use_agg_backend()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, curve in curves.items():
        it, loss, acc = zip(*curve, strict=False)
        ax1.plot(it, acc, label=titles[key])
        ax2.semilogy(it, np.maximum(loss, 1e-12), label=titles[key])
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("test accuracy")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("training MSE")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_floats(text: str | None) -> tuple[float, ...] | None:
    return None if text is None else tuple(float(v) for v in text.split(",") if v)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="folder with trainset.txt / testset.txt (default ../shared/data/checkerboard)"
    )
    parser.add_argument(
        "--variants", default="a,b,e,f1,fcnet", help="comma-separated rows of Table 3: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--iters", type=int, default=40_000, help="SGD iterations per run (paper: 40,000)")
    parser.add_argument(
        "--lrs", default=None, help="lr grid for the HanNet-skeleton rows (default 0.025,0.05,0.075,0.1)"
    )
    parser.add_argument(
        "--fc-lrs", default=None, help="lr grid for FCNet (default: the authors' 9 values 0.001 ... 0.25)"
    )
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--ortho-weight", type=float, default=1e-2, help="lambda of the (f1) orthogonality penalty")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="parallel training processes (1 thread each)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the training step (faster for 40k iterations)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment described by ``args`` (see :func:`add_arguments`); write ``--out``; return the results."""
    t_start = time.perf_counter()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"han_surgery.paper.checkerboard: unknown variants {unknown}; choose from {list(VARIANTS)}")
    han_lrs = _parse_floats(args.lrs) or HAN_LRS
    fc_lrs = _parse_floats(args.fc_lrs) or FC_LRS
    iters, eval_every = args.iters, args.eval_every
    if args.quick:
        iters, eval_every = 300, 50
        han_lrs, fc_lrs = (_parse_floats(args.lrs) or (0.05,)), (_parse_floats(args.fc_lrs) or (0.01,))
    data_dir = str(resolve_data_path(args.data, "checkerboard"))
    data = load_checkerboard(data_dir)
    jobs = [
        {
            "variant": v,
            "lr": lr,
            "iters": iters,
            "seed": args.seed,
            "eval_every": eval_every,
            "ortho_weight": args.ortho_weight,
            "compile": args.compile and not VARIANTS[v].get("fc"),
        }
        for v in variants
        for lr in (fc_lrs if VARIANTS[v].get("fc") else han_lrs)
    ]
    runs: list[dict[str, Any]] = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_job, {**job, "data_dir": data_dir}) for job in jobs]
            for fut in tqdm(as_completed(futures), total=len(futures), desc="checkerboard runs"):
                runs.append(fut.result())
    else:
        prev = torch.get_num_threads()
        for job in tqdm(jobs, desc="checkerboard runs", disable=len(jobs) == 1):
            runs.append(train_one(data=data, progress=not args.quick, **job))
        torch.set_num_threads(prev)

    rows, table, boards, curves, titles = [], [], {}, {}, {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        paper_pick = max(mine, key=lambda r: r["best_test_acc"])
        finite = [r for r in mine if np.isfinite(r["final_train_loss"])] or mine
        clean_pick = min(finite, key=lambda r: r["final_train_loss"])
        model = build_model(v)
        titles[v] = VARIANTS[v]["label"]
        boards[v] = clean_pick["board"]
        curves[v] = clean_pick["curve"]
        row = {
            "variant": v,
            "label": VARIANTS[v]["label"],
            "params": count_parameters(model),
            "paper_test_acc": PAPER.get(v),
            "paper_protocol_test_acc": 100 * paper_pick["best_test_acc"],
            "paper_protocol_lr": paper_pick["lr"],
            "final_test_acc": 100 * clean_pick["final_test_acc"],
            "final_train_acc": 100 * clean_pick["final_train_acc"],
            "final_train_loss": clean_pick["final_train_loss"],
            "final_lr": clean_pick["lr"],
            "per_lr": [
                {
                    k: r[k]
                    for k in (
                        "lr",
                        "final_train_loss",
                        "final_train_acc",
                        "final_test_acc",
                        "best_test_acc",
                        "best_iter",
                        "seconds",
                        "diverged",
                    )
                }
                for r in sorted(mine, key=lambda r: r["lr"])
            ],
        }
        rows.append(row)
        table.append(
            [
                row["label"],
                f"{row['params']:,}",
                "-" if row["paper_test_acc"] is None else f"{row['paper_test_acc']:.1f}",
                f"{row['paper_protocol_test_acc']:.2f} (lr {row['paper_protocol_lr']})",
                f"{row['final_test_acc']:.2f} (lr {row['final_lr']})",
                f"{row['final_train_acc']:.2f}",
            ]
        )
    wall = time.perf_counter() - t_start
    md = (
        f"# Checkerboard ({'quick smoke test' if args.quick else 'full protocol'}: {iters} iterations, seed {args.seed})\n\n"
        + markdown_table(
            [
                "model",
                "params",
                "paper test acc %",
                "ours: best test acc over training and lrs % (paper protocol)",
                "ours: final test acc % (lr with lowest train loss)",
                "final train acc %",
            ],
            table,
        )
        + f"\nWall time: {wall:.0f} s with {args.jobs} process(es).\n"
    )
    results = {
        "experiment": "checkerboard",
        "quick": bool(args.quick),
        "command": getattr(args, "command_line", None),
        "config": {
            "iters": iters,
            "eval_every": eval_every,
            "han_lrs": list(han_lrs),
            "fc_lrs": list(fc_lrs),
            "batch_size": 100,
            "seed": args.seed,
            "ortho_weight": args.ortho_weight,
            "jobs": args.jobs,
            "compile": bool(args.compile),
            "data": data_dir,
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
