"""Regression (paper Table 9): HanNet (depth 20, width 200) vs FCNet1 (5 x 50) vs FCNet2 (5 x 200).

Data: any comma-separated CSV without header, features first, the target in the last column
(the three shipped sets are ``bikesharing``, ``calhousing`` and ``elevators``). Protocol (the
paper and the authors' code): drop constant feature columns, standardise the features with the
mean/std of the whole file (the target is left as is), split 80% train and the remaining 20%
60/40 into test and validation (a new random split per seed); Adam, no weight decay, batch 100,
300 epochs, lr in {0.001, 0.003} chosen per seed on the validation RMSE; the model of the best
validation epoch is scored on the test set (RMSE and R^2); mean over 5 seeds.

Second column group of Table 9 ("fewer training samples"; the paper does not give the size):
``--train-fractions 1,0.1`` also trains on a random 10% of each seed's training split, with the
same test and validation rows and the same 300 epochs (so one tenth of the steps).

Learning-rate schedule: the authors build ``MultiStepLR(milestones=[0.5 E, 0.7 E], gamma=0.2)``
but step it every *iteration*, so their lr drops to 0.04x after 210 iterations. ``--schedule
epoch`` (default) applies the evidently intended drops at 50% and 70% of the epochs;
``--schedule authors`` reproduces the per-iteration behaviour.

All runs of one model on one dataset (seeds x learning rates) train together as one stacked
computation (:class:`~.stacked.StackedNet`); :func:`train_one` is the plain single-run loop they
are tested against.

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

from ..checks import positive_int, thread_count
from .common import (
    PaperInputError,
    count_parameters,
    fc_net,
    han_net,
    load_rows,
    markdown_table,
    mean_std,
    parse_floats,
    positive_milestones,
    resolve_data_path,
    seed_everything,
    use_agg_backend,
    write_results,
)
from .stacked import StackedAdam, StackedNet

__all__ = [
    "MODELS",
    "PAPER",
    "RegressionData",
    "load_csv",
    "split",
    "build_model",
    "train_one",
    "train_stacked",
    "run",
    "add_arguments",
]

#: ``--out`` also gets PNG plots (matplotlib), which :func:`~.cli.check_out` checks for before the run.
WRITES_PLOTS = True

DATASETS = ("bikesharing", "calhousing", "elevators")

MODELS: dict[str, str] = {
    "hannet": "HanNet (depth 20, width 200)",
    "fcnet1": "FCNet1 (5 x 50)",
    "fcnet2": "FCNet2 (5 x 200)",
}

# Table 9 of the paper (../shared/paper/README.md): (RMSE, R^2) per set and model, for the full
# training set and for the "fewer training samples" column group.
PAPER: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "full": {
        "bikesharing": {"hannet": (0.218, 0.951), "fcnet1": (0.241, 0.938), "fcnet2": (0.223, 0.949)},
        "calhousing": {"hannet": (0.431, 0.813), "fcnet1": (0.462, 0.786), "fcnet2": (0.459, 0.788)},
        "elevators": {"hannet": (0.087, 0.878), "fcnet1": (0.090, 0.869), "fcnet2": (0.091, 0.869)},
        "parkinsons": {"hannet": (1.235, 0.986), "fcnet1": (2.035, 0.963), "fcnet2": (1.399, 0.982)},
        "skillcraft": {"hannet": (0.255, 0.546), "fcnet1": (0.282, 0.455), "fcnet2": (0.266, 0.507)},
    },
    "fewer": {
        "bikesharing": {"hannet": (0.311, 0.898), "fcnet1": (0.498, 0.744), "fcnet2": (0.344, 0.877)},
        "calhousing": {"hannet": (0.476, 0.772), "fcnet1": (0.506, 0.743), "fcnet2": (0.498, 0.750)},
        "elevators": {"hannet": (0.103, 0.832), "fcnet1": (0.140, 0.671), "fcnet2": (0.106, 0.823)},
        "parkinsons": {"hannet": (3.072, 0.917), "fcnet1": (5.034, 0.777), "fcnet2": (4.187, 0.845)},
        "skillcraft": {"hannet": (0.276, 0.477), "fcnet1": (0.328, 0.266), "fcnet2": (0.301, 0.383)},
    },
}

SCHEDULES = ("epoch", "authors")


@dataclass
class RegressionData:
    x: Tensor  # (N, d) standardised features, constant columns dropped
    y: Tensor  # (N, 1) raw target
    dropped_columns: list[int]


def load_csv(path: str | Path) -> RegressionData:
    """Read a header-less CSV (features..., target), drop constant columns, standardise the features.

    Any number of rows (at least ``MIN_ROWS``, 16) and columns (at least one feature) is accepted; anything else
    raises :class:`~.common.PaperInputError` naming the file.
    """
    try:
        arr = load_rows(path, np.float64, delimiter=",")
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise PaperInputError(
            f"{path} is not a readable numeric CSV ({err}); give comma-separated numbers without a header, "
            "features first and the target last"
        ) from err
    if arr.shape[1] < 2 or arr.shape[0] < MIN_ROWS:
        raise PaperInputError(
            f"{path} needs >= {MIN_ROWS} rows and >= 2 columns (features, target), got shape {arr.shape}: the "
            "protocol's split (80% train, the rest 60/40 test/validation) must leave >= 2 test rows for R^2"
        )
    if not np.isfinite(arr).all():
        raise PaperInputError(f"{path} contains NaN or infinite values; remove or impute them first")
    x, y = arr[:, :-1], arr[:, -1:]
    if y.min() == y.max():
        raise PaperInputError(
            f"{path}: the target (last) column is constant ({y[0, 0]:g}): R^2 is undefined and there is nothing to "
            "learn; give a CSV whose last column is the target"
        )
    std = x.std(axis=0, ddof=1)
    keep = std > 0
    if not keep.any():
        raise PaperInputError(f"every feature column of {path} is constant; there is nothing to learn from")
    x = (x[:, keep] - x[:, keep].mean(axis=0)) / std[keep]
    return RegressionData(
        torch.from_numpy(x).float(), torch.from_numpy(y).float(), [int(i) for i in np.flatnonzero(~keep)]
    )


def split_sizes(n: int, train: float = 0.8, test_of_rest: float = 0.6) -> tuple[int, int, int]:
    """``(train, test, validation)`` row counts of :func:`split` for ``n`` rows."""
    n_train = int(n * train)
    n_test = int((n - n_train) * test_of_rest)
    return n_train, n_test, n - n_train - n_test


MIN_ROWS = 16  # the fewest rows whose split has >= 2 test and >= 1 validation rows (checked in the tests)


def kept_train_rows(n: int, train_fraction: float, train: float = 0.8) -> int:
    """How many training rows :func:`split` keeps of ``n`` rows with ``train_fraction`` (at least one)."""
    return max(1, int(int(n * train) * train_fraction))


def split(
    n: int, gen: torch.Generator, train: float = 0.8, test_of_rest: float = 0.6, train_fraction: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Random indices: ``train`` of the rows for training, the rest split ``test_of_rest`` / rest into test / validation.

    ``train_fraction < 1`` keeps only that fraction of the training rows (a random subset: a
    prefix of the random permutation); the test and validation rows are unchanged.
    """
    perm = torch.randperm(n, generator=gen)
    n_train, n_test, _ = split_sizes(n, train, test_of_rest)
    return perm[: kept_train_rows(n, train_fraction, train)], perm[n_train : n_train + n_test], perm[n_train + n_test :]


def build_model(name: str, in_features: int) -> nn.Sequential:
    """``hannet``, ``fcnet1`` or ``fcnet2`` for ``in_features`` inputs and one output."""
    if name == "hannet":
        return han_net(in_features, 200, 20, 1, dense_first=1, dense_last=0, activation="abs")
    if name == "fcnet1":
        return fc_net(in_features, 50, 5, 1)
    if name == "fcnet2":
        return fc_net(in_features, 200, 5, 1)
    raise PaperInputError(f"unknown regression model {name!r}; choose from {', '.join(MODELS)}")


def _milestones(schedule: str, epochs: int) -> list[int] | list[float]:
    """The lr milestones of ``schedule``, those ``<= 0`` dropped (``--epochs 1`` trains at the full lr)."""
    if schedule == "epoch":
        return positive_milestones([int(0.5 * epochs), int(0.7 * epochs)])
    if schedule == "authors":
        # compared against the iteration count, as in their code
        return positive_milestones([0.5 * epochs, 0.7 * epochs])
    raise PaperInputError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def _scores(pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """RMSE and R^2 over the second-to-last dim: ``pred, y: (..., N, 1) -> (...,), (...,)``."""
    sse = ((pred - y) ** 2).sum(dim=(-2, -1))
    sst = ((y - y.mean(dim=-2, keepdim=True)) ** 2).sum(dim=(-2, -1))
    return (sse / y.shape[-2]).sqrt(), 1.0 - sse / sst


def train_one(
    data: RegressionData,
    model_name: str,
    lr: float,
    epochs: int,
    seed: int,
    batch_size: int = 100,
    schedule: str = "epoch",
    train_fraction: float = 1.0,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train one ``model_name`` on the seed's split, the plain way; return the best-validation epoch's scores.

    The reference for :func:`train_stacked`, which trains many such runs at once.
    """
    gen = seed_everything(seed)
    tr, te, va = split(data.x.shape[0], gen, train_fraction=train_fraction)
    model = build_model(model_name, data.x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=_milestones(schedule, epochs), gamma=0.2)
    best = {"val_rmse": float("inf"), "test_rmse": float("nan"), "test_r2": float("nan"), "epoch": -1}
    steps, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        order = tr[torch.randperm(tr.shape[0], generator=gen)]
        for idx in order.split(batch_size):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(data.x[idx]), data.y[idx]).backward()
            opt.step()
            steps += 1
            if schedule == "authors":
                sched.step()
            if max_steps is not None and steps >= max_steps:
                break
        if schedule == "epoch":
            sched.step()
        with torch.no_grad():
            val_rmse, _ = _scores(model(data.x[va]), data.y[va])
            if torch.isfinite(val_rmse) and val_rmse.item() < best["val_rmse"]:
                test_rmse, test_r2 = _scores(model(data.x[te]), data.y[te])
                best = {"val_rmse": val_rmse.item(), "test_rmse": test_rmse.item(), "test_r2": test_r2.item()}
                best["epoch"] = epoch
        if max_steps is not None and steps >= max_steps:
            break
    return {
        "model": model_name,
        "lr": lr,
        "seed": seed,
        "train_fraction": train_fraction,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "params": count_parameters(model),
        **best,
    }


def train_stacked(
    data: RegressionData,
    model_name: str,
    runs: list[tuple[int, float]],
    epochs: int,
    batch_size: int = 100,
    schedule: str = "epoch",
    train_fraction: float = 1.0,
    max_steps: int | None = None,
    compile: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train one run per ``(seed, lr)`` in ``runs`` as one stacked computation; one result dict per run.

    Run ``(seed, lr)`` sees exactly what :func:`train_one` with that seed and lr sees (split,
    initial weights, batch order, schedule), so up to float rounding the results are the same.
    ``compile`` wraps the stacked loss in ``torch.compile`` (about 2x faster for HanNet on CPU).
    """
    size = len(runs)
    gens, trains, tests, vals, members = [], [], [], [], []
    for seed, _ in runs:
        gen = seed_everything(seed)
        tr, te, va = split(data.x.shape[0], gen, train_fraction=train_fraction)
        members.append(build_model(model_name, data.x.shape[1]))
        gens.append(gen)
        trains.append(tr)
        tests.append(te)
        vals.append(va)
    te, va = torch.stack(tests), torch.stack(vals)
    net = StackedNet(members)
    opt = StackedAdam(net.parameters(), member_lr=[lr for _, lr in runs], size=size)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=_milestones(schedule, epochs), gamma=0.2)

    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        return ((net(x) - y) ** 2).mean(dim=(1, 2)).sum()  # sum over runs of each run's MSE

    step_loss = torch.compile(loss_fn) if compile else loss_fn
    best_val = torch.full((size,), float("inf"))
    best_test_rmse = torch.full((size,), float("nan"))
    best_test_r2 = torch.full((size,), float("nan"))
    best_epoch = torch.full((size,), -1, dtype=torch.long)
    steps, t0 = 0, time.perf_counter()
    for epoch in tqdm(range(epochs), desc=f"{model_name} x{size}", leave=False, disable=not progress):
        order = torch.stack([tr[torch.randperm(tr.shape[0], generator=g)] for tr, g in zip(trains, gens, strict=True)])
        for idx in order.split(batch_size, dim=1):
            opt.zero_grad(set_to_none=True)
            step_loss(data.x[idx], data.y[idx]).backward()
            opt.step()
            steps += 1
            if schedule == "authors":
                sched.step()
            if max_steps is not None and steps >= max_steps:
                break
        if schedule == "epoch":
            sched.step()
        with torch.no_grad():
            val_rmse, _ = _scores(net(data.x[va]), data.y[va])
            better = torch.isfinite(val_rmse) & (val_rmse < best_val)
            if better.any():
                test_rmse, test_r2 = _scores(net(data.x[te]), data.y[te])
                best_val = torch.where(better, val_rmse, best_val)
                best_test_rmse = torch.where(better, test_rmse, best_test_rmse)
                best_test_r2 = torch.where(better, test_r2, best_test_r2)
                best_epoch[better] = epoch
        if max_steps is not None and steps >= max_steps:
            break
    seconds = time.perf_counter() - t0
    params = count_parameters(members[0])
    return [
        {
            "model": model_name,
            "lr": lr,
            "seed": seed,
            "train_fraction": train_fraction,
            "steps": steps,
            "seconds": seconds,  # wall time of the whole stack
            "params": params,
            "val_rmse": best_val[r].item(),
            "test_rmse": best_test_rmse[r].item(),
            "test_r2": best_test_r2[r].item(),
            "epoch": int(best_epoch[r]),
        }
        for r, (seed, lr) in enumerate(runs)
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="folder with the CSVs (default ../shared/data/regression)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="CSV names (without .csv) in --data")
    parser.add_argument(
        "--csv", action="append", default=None, help="any CSV of the same format (repeatable); replaces --datasets"
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--epochs", type=positive_int, default=300, help="paper: 300")
    parser.add_argument(
        "--lrs",
        default="0.001,0.003",
        help="Adam lr grid, best chosen per seed on validation RMSE (paper: 1e-3; the grid is the authors' code's)",
    )
    parser.add_argument("--seeds", type=positive_int, default=5, help="number of seeds / random splits (paper: 5)")
    parser.add_argument(
        "--train-fractions",
        default="1,0.1",
        help="fractions of each seed's training split to train on, one column group each (default 1,0.1: "
        "Table 9's two groups; the paper does not give the smaller size)",
    )
    parser.add_argument("--schedule", choices=SCHEDULES, default="epoch")
    parser.add_argument("--compile", action="store_true", help="torch.compile the stacked step (faster for HanNet)")
    parser.add_argument("--threads", type=thread_count, default=None, help="torch threads (default: torch's)")


def _dataset_paths(args: argparse.Namespace) -> list[Path]:
    """The CSV files to run on; two of one name are refused, as the results name each dataset by its file's stem."""
    if args.csv:
        paths = [resolve_data_path(p) for p in args.csv]
    else:
        names = [n for n in args.datasets.split(",") if n]
        if not names:
            raise PaperInputError("--datasets is empty; name at least one CSV (without .csv) or pass --csv FILE")
        paths = [
            resolve_data_path(Path(args.data) / f"{n}.csv" if args.data else None, "regression", f"{n}.csv")
            for n in names
        ]
    stems = [Path(p).stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        named = "; ".join(f"{s}: {', '.join(str(p) for p in paths if Path(p).stem == s)}" for s in twice)
        raise PaperInputError(
            f"two datasets of one name ({named}): the results name each by its file name; rename or drop one"
        )
    return paths


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment described by ``args``; write ``--out``; return the results."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise PaperInputError(f"--models takes a comma-separated subset of {', '.join(MODELS)}, got {args.models!r}")
    fractions = list(parse_floats(args.train_fractions, "--train-fractions", positive=True))
    if any(not 0 < f <= 1 for f in fractions):
        raise PaperInputError(f"--train-fractions must lie in (0, 1], got {args.train_fractions!r}")
    if args.epochs < 1 or args.seeds < 1:
        raise PaperInputError(f"--epochs and --seeds must be >= 1, got {args.epochs} and {args.seeds}")
    lrs, seeds, epochs = list(parse_floats(args.lrs, "--lrs", positive=True)), list(range(args.seeds)), args.epochs
    _milestones(args.schedule, epochs)
    paths = _dataset_paths(args)
    max_steps = None
    if args.quick:
        seeds, epochs, max_steps = seeds[:2], 1, 20
    config = {
        "epochs": epochs,
        "max_steps": max_steps,
        "lrs": lrs,
        "seeds": seeds,
        "train_fractions": fractions,
        "batch_size": 100,
        "schedule": args.schedule,
        "compile": bool(args.compile),
        "datasets": [str(p) for p in paths],
    }
    datasets = [(path, load_csv(path)) for path in paths]  # every file checked before the first one trains
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for path, data in datasets:
        name = Path(path).stem
        for fraction in fractions:
            for m in models:
                grid = [(seed, lr) for seed in seeds for lr in lrs]
                stack = train_stacked(
                    data, m, grid, epochs, schedule=args.schedule, train_fraction=fraction, max_steps=max_steps,
                    compile=args.compile, progress=not args.quick,
                )  # fmt: skip
                runs += stack
                per_seed = [min((r for r in stack if r["seed"] == s), key=lambda r: r["val_rmse"]) for s in seeds]
                rmse_m, rmse_s = mean_std([r["test_rmse"] for r in per_seed])
                r2_m, r2_s = mean_std([r["test_r2"] for r in per_seed])
                paper = PAPER["full" if fraction == 1 else "fewer"].get(name, {}).get(m)
                rows.append(
                    {
                        "dataset": name,
                        "rows": int(data.x.shape[0]),
                        "features": int(data.x.shape[1]),
                        "dropped_constant_columns": data.dropped_columns,
                        "train_fraction": fraction,
                        "train_rows": kept_train_rows(int(data.x.shape[0]), fraction),
                        "model": m,
                        "label": MODELS[m],
                        "params": stack[0]["params"],
                        "paper_rmse": None if paper is None else paper[0],
                        "paper_r2": None if paper is None else paper[1],
                        "rmse_mean": rmse_m,
                        "rmse_std": rmse_s,
                        "r2_mean": r2_m,
                        "r2_std": r2_s,
                        "chosen_lrs": [r["lr"] for r in per_seed],
                        "seconds": stack[0]["seconds"],
                    }
                )
                complete = len(rows) == len(paths) * len(fractions) * len(models)
                results, md = _write(args, config, rows, runs, time.perf_counter() - t_start, complete)
    print(md)
    return results


def _write(
    args: argparse.Namespace,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    wall: float,
    complete: bool,
) -> tuple[dict[str, Any], str]:
    """Write ``--out`` for the models done so far (after each one); return the results and their markdown table."""
    table = [
        [
            r["dataset"],
            f"{r['train_fraction']:g}",
            r["label"],
            f"{r['params']:,}",
            "-" if r["paper_rmse"] is None else f"{r['paper_rmse']:.3f}",
            f"{r['rmse_mean']:.4g} ± {r['rmse_std']:.2g}",
            "-" if r["paper_r2"] is None else f"{r['paper_r2']:.3f}",
            f"{r['r2_mean']:.4f} ± {r['r2_std']:.2g}",
        ]
        for r in rows
    ]
    headers = ["dataset", "train fraction", "model", "params", "paper RMSE", "ours: test RMSE (mean ± std)"]
    headers += ["paper R^2", "ours: test R^2 (mean ± std)"]
    md = (
        f"# Regression ({'quick smoke test' if args.quick else 'run'}: {config['epochs']} epochs, lrs "
        f"{config['lrs']}, {len(config['seeds'])} seeds, schedule '{config['schedule']}')\n\n"
        + markdown_table(headers, table)
        + f"\nWall time: {wall:.0f} s.\n"
    )
    results = {
        "experiment": "regression",
        "quick": bool(args.quick),
        "complete": complete,
        "command": getattr(args, "command_line", None),
        "config": config,
        "rows": rows,
        "runs": runs,
        "wall_seconds": wall,
    }
    folder = write_results(args.out, results, md)
    if folder is not None:
        _plot(rows, folder / "rmse.png")
    return results, md


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = use_agg_backend()
    panels = list(dict.fromkeys((r["dataset"], r["train_fraction"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (ds, frac) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if r["dataset"] == ds and r["train_fraction"] == frac]
        xs = np.arange(len(mine))
        ax.bar(
            xs - 0.2, [r["rmse_mean"] for r in mine], 0.4, yerr=[r["rmse_std"] for r in mine], capsize=3, label="ours"
        )
        paper = [r["paper_rmse"] if r["paper_rmse"] is not None else np.nan for r in mine]
        ax.bar(xs + 0.2, paper, 0.4, label="paper")
        ax.set_xticks(xs, [r["model"] for r in mine], fontsize=8)
        ax.set_title(f"{ds}, train fraction {frac:g}", fontsize=9)
        ax.set_ylabel("test RMSE")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
