"""Regression (paper Table 9): HanNet (depth 20, width 200) vs FCNet1 (5 x 50) vs FCNet2 (5 x 200).

Data: any comma-separated CSV without header, features first, the target in the last column
(the three shipped sets are ``bikesharing``, ``calhousing`` and ``elevators``). Protocol (the
authors' ``regession_experiments``): drop constant feature columns, standardise the features with
the mean/std of the whole file (the target is left as is), split 80% train and the remaining 20%
60/40 into test and validation (a new random split per seed); Adam, batch 100; the model with the
best validation RMSE (checked once per epoch) is scored on the test set: RMSE and R^2.

Learning-rate schedule: the authors build ``MultiStepLR(milestones=[0.5 E, 0.7 E], gamma=0.2)``
but step it every *iteration*, so their lr drops to 0.04x after 210 iterations. ``--schedule
epoch`` (default) applies the evidently intended drops at 50% and 70% of the epochs;
``--schedule authors`` reproduces the per-iteration behaviour.

HanNet here is the authors' regression HanNet: one dense ``d -> 200`` layer then 19 Han-layers
(ABS everywhere, orthogonal init) and a dense head; FCNets use ReLU and Kaiming init.
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

from .common import (
    count_parameters,
    fc_net,
    han_net,
    markdown_table,
    mean_std,
    resolve_data_path,
    seed_everything,
    use_agg_backend,
    write_results,
)

__all__ = ["MODELS", "RegressionData", "load_csv", "split", "build_model", "train_one", "run", "add_arguments"]

DATASETS = ("bikesharing", "calhousing", "elevators")

MODELS: dict[str, str] = {
    "hannet": "HanNet (depth 20, width 200)",
    "fcnet1": "FCNet1 (5 x 50)",
    "fcnet2": "FCNet2 (5 x 200)",
}


@dataclass
class RegressionData:
    x: Tensor  # (N, d) standardised features, constant columns dropped
    y: Tensor  # (N, 1) raw target
    dropped_columns: list[int]


def load_csv(path: str | Path) -> RegressionData:
    """Read a header-less CSV (features..., target), drop constant columns, standardise the features.

    Any number of rows and columns (at least one feature) is accepted.
    """
    arr = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    if arr.shape[1] < 2 or arr.shape[0] < 5:
        raise ValueError(
            f"han_surgery.paper.regression: {path} needs >= 5 rows and >= 2 columns (features, target), got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"han_surgery.paper.regression: {path} contains NaN or infinite values")
    x, y = arr[:, :-1], arr[:, -1:]
    std = x.std(axis=0, ddof=1)
    keep = std > 0
    if not keep.any():
        raise ValueError(f"han_surgery.paper.regression: every feature column of {path} is constant")
    x = (x[:, keep] - x[:, keep].mean(axis=0)) / std[keep]
    return RegressionData(
        torch.from_numpy(x).float(), torch.from_numpy(y).float(), [int(i) for i in np.flatnonzero(~keep)]
    )


def split(n: int, gen: torch.Generator, train: float = 0.8, test_of_rest: float = 0.6) -> tuple[Tensor, Tensor, Tensor]:
    """Random indices: ``train`` of the rows for training, the rest split ``test_of_rest`` / rest into test / validation."""
    perm = torch.randperm(n, generator=gen)
    n_train = int(n * train)
    n_test = int((n - n_train) * test_of_rest)
    return perm[:n_train], perm[n_train : n_train + n_test], perm[n_train + n_test :]


def build_model(name: str, in_features: int) -> nn.Module:
    """``hannet``, ``fcnet1`` or ``fcnet2`` for ``in_features`` inputs and one output."""
    if name == "hannet":
        return han_net(in_features, 200, 20, 1, dense_first=1, dense_last=0, activation="abs")
    if name == "fcnet1":
        return fc_net(in_features, 50, 5, 1)
    if name == "fcnet2":
        return fc_net(in_features, 200, 5, 1)
    raise ValueError(f"han_surgery.paper.regression: unknown model {name!r}; choose from {list(MODELS)}")


def _scores(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        pred = model(x)
    sse = ((pred - y) ** 2).sum().item()
    sst = ((y - y.mean()) ** 2).sum().item()
    return (sse / y.shape[0]) ** 0.5, 1.0 - sse / sst if sst > 0 else float("nan")


def train_one(
    data: RegressionData,
    model_name: str,
    lr: float,
    epochs: int,
    seed: int,
    batch_size: int = 100,
    schedule: str = "epoch",
    max_steps: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model_name`` on the seed's split; return validation/test RMSE and R^2 of the best-validation epoch."""
    gen = seed_everything(seed)
    tr, te, va = split(data.x.shape[0], gen)
    model = build_model(model_name, data.x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if schedule == "epoch":
        milestones = [int(0.5 * epochs), int(0.7 * epochs)]
    elif schedule == "authors":
        milestones = [0.5 * epochs, 0.7 * epochs]  # compared against the iteration count, as in their code
    else:
        raise ValueError(f"han_surgery.paper.regression: schedule must be 'epoch' or 'authors', got {schedule!r}")
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.2)
    loss_fn = nn.MSELoss()
    best = {"val_rmse": float("inf")}
    steps, t0 = 0, time.perf_counter()
    for epoch in tqdm(range(epochs), desc=f"{model_name} lr={lr} seed={seed}", leave=False, disable=not progress):
        model.train()
        order = tr[torch.randperm(tr.shape[0], generator=gen)]
        for start in range(0, order.shape[0], batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(data.x[idx]), data.y[idx]).backward()
            opt.step()
            steps += 1
            if schedule == "authors":
                sched.step()
            if max_steps is not None and steps >= max_steps:
                break
        if schedule == "epoch":
            sched.step()
        model.eval()
        val_rmse, _ = _scores(model, data.x[va], data.y[va])
        if np.isfinite(val_rmse) and val_rmse < best["val_rmse"]:
            test_rmse, test_r2 = _scores(model, data.x[te], data.y[te])
            best = {"val_rmse": val_rmse, "test_rmse": test_rmse, "test_r2": test_r2, "epoch": epoch}
        if max_steps is not None and steps >= max_steps:
            break
    if "test_rmse" not in best:
        best.update(test_rmse=float("nan"), test_r2=float("nan"), epoch=-1)
    return {
        "model": model_name,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "params": count_parameters(model),
        **best,
    }


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="folder with the CSVs (default ../shared/data/regression)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="CSV names (without .csv) in --data")
    parser.add_argument(
        "--csv", action="append", default=None, help="any CSV of the same format (repeatable); replaces --datasets"
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--epochs", type=int, default=300, help="paper: 300")
    parser.add_argument(
        "--lrs",
        default="0.001,0.003",
        help="Adam lr grid, best chosen per seed on validation RMSE (paper: 0.001,0.003)",
    )
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds / random splits (paper: 5)")
    parser.add_argument("--schedule", choices=("epoch", "authors"), default="epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment described by ``args``; write ``--out``; return the results."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.csv:
        paths = [resolve_data_path(p) for p in args.csv]
    else:
        paths = [
            resolve_data_path(Path(args.data) / f"{n}.csv" if args.data else None, "regression", f"{n}.csv")
            for n in args.datasets.split(",")
            if n
        ]
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise ValueError(f"han_surgery.paper.regression: unknown model {m!r}; choose from {list(MODELS)}")
    lrs, seeds, epochs = _floats(args.lrs), list(range(args.seeds)), args.epochs
    max_steps = None
    if args.quick:
        seeds, lrs, epochs, max_steps = seeds[:1], lrs[:1], 1, 30
    rows, table, runs = [], [], []
    for path in paths:
        data = load_csv(path)
        name = Path(path).stem
        for m in models:
            per_seed = []
            for seed in tqdm(seeds, desc=f"{name} {m}", leave=False):
                cands = [
                    train_one(data, m, lr, epochs, seed, schedule=args.schedule, max_steps=max_steps) for lr in lrs
                ]
                runs += cands
                per_seed.append(min(cands, key=lambda r: r["val_rmse"]))
            rmse_m, rmse_s = mean_std([r["test_rmse"] for r in per_seed])
            r2_m, r2_s = mean_std([r["test_r2"] for r in per_seed])
            row = {
                "dataset": name,
                "rows": int(data.x.shape[0]),
                "features": int(data.x.shape[1]),
                "dropped_constant_columns": data.dropped_columns,
                "model": m,
                "label": MODELS[m],
                "params": per_seed[0]["params"],
                "rmse_mean": rmse_m,
                "rmse_std": rmse_s,
                "r2_mean": r2_m,
                "r2_std": r2_s,
                "chosen_lrs": [r["lr"] for r in per_seed],
                "seconds": sum(r["seconds"] for r in runs if r["model"] == m),
            }
            rows.append(row)
            table.append(
                [name, MODELS[m], f"{row['params']:,}", f"{rmse_m:.4g} ± {rmse_s:.2g}", f"{r2_m:.4f} ± {r2_s:.2g}"]
            )
    wall = time.perf_counter() - t_start
    md = (
        f"# Regression ({'quick smoke test' if args.quick else 'run'}: {epochs} epochs, lrs {lrs}, "
        f"{len(seeds)} seeds, schedule '{args.schedule}')\n\n"
        + markdown_table(["dataset", "model", "params", "test RMSE (mean ± std)", "test R^2 (mean ± std)"], table)
        + f"\nWall time: {wall:.0f} s.\n"
    )
    results = {
        "experiment": "regression",
        "quick": bool(args.quick),
        "command": getattr(args, "command_line", None),
        "config": {
            "epochs": epochs,
            "max_steps": max_steps,
            "lrs": lrs,
            "seeds": seeds,
            "batch_size": 100,
            "schedule": args.schedule,
            "datasets": [str(p) for p in paths],
        },
        "rows": rows,
        "runs": runs,
        "wall_seconds": wall,
    }
    folder = write_results(args.out, results, md)
    if folder is not None:
        _plot(rows, folder / "rmse.png")
    print(md)
    return results


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = use_agg_backend()
    datasets = sorted({r["dataset"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.6 * len(datasets), 3.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=False):
        mine = [next(r for r in rows if r["dataset"] == ds and r["model"] == m) for m in models]
        ax.bar(range(len(mine)), [r["rmse_mean"] for r in mine], yerr=[r["rmse_std"] for r in mine], capsize=3)
        ax.set_xticks(range(len(mine)), [m for m in models], fontsize=8)
        ax.set_title(ds, fontsize=9)
        ax.set_ylabel("test RMSE")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
