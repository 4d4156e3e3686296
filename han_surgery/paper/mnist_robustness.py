"""MNIST robustness (paper Section 5.1, Table 6): a 20-Han-layer net vs a one-hidden-layer FCNet.

* HanNet: 20 Han-layers of width 784 acting directly on the flattened image (no dense layer
  before them), then a dense ``784 -> 10`` head: ``han_net(784, 784, 20, 10, dense_first=0,
  dense_last=0)``, 39,210 parameters. It is 1-Lipschitz up to the head.
* FCNet: ``784 -> 784`` ReLU ``-> 10`` (Kaiming init), 623,290 parameters.

Data: ``mnist10k.npz`` (10,000 real MNIST digits, stored sorted by label); a fixed random
8,000 / 2,000 train / test split (seed 0); pixels scaled to ``[0, 1]``. Training: Adam, cross-entropy, batch 100. Robust accuracy: accuracy
on adversarial test images from white-box PGD (L-inf and L2; 20 steps of ``2.5 eps / 20``, random
start) and Carlini-Wagner L2 (100 Adam steps, lr 0.01, kappa 0, fixed ``c``), see :mod:`.attacks`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attacks import cw_l2, pgd_l2, pgd_linf, robust_accuracy
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

__all__ = ["load_mnist", "build_model", "train_model", "evaluate", "run", "add_arguments"]

MODELS = {"hannet": "HanNet (20 Han-layers, width 784)", "fcnet": "FCNet (1 hidden layer, width 784)"}
LINF_EPS = (0.05, 0.1, 0.15, 0.2)
L2_EPS = (0.5, 1.0, 1.5, 2.0)
CW_C = (0.1, 1.0, 10.0)


def load_mnist(
    path: str | Path | None = None, n_train: int = 8000, split_seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` from ``mnist10k.npz``: flattened ``(N, 784)`` floats in ``[0, 1]``.

    ``n_train`` digits train and the rest test, after a fixed random permutation (``split_seed``):
    the shipped file is sorted by label, so its first 8,000 digits hold only the classes 0-7.
    ``path`` defaults to ``../shared/data/mnist/mnist10k.npz``.
    """
    path = resolve_data_path(path, "mnist", "mnist10k.npz")
    with np.load(path) as npz:
        images, labels = npz["images"], npz["labels"]
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(split_seed))
    x, y = x[perm], y[perm]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def build_model(name: str) -> nn.Module:
    """``hannet`` or ``fcnet`` (see the module docstring)."""
    if name == "hannet":
        return han_net(784, 784, 20, 10, dense_first=0, dense_last=0, activation="abs")
    if name == "fcnet":
        return fc_net(784, 784, 1, 10, activation="relu", init="kaiming")
    raise ValueError(f"han_surgery.paper.mnist_robustness: unknown model {name!r}; choose from {list(MODELS)}")


def train_model(
    name: str,
    x: Tensor,
    y: Tensor,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 100,
    seed: int = 0,
    max_steps: int | None = None,
    progress: bool = False,
) -> nn.Module:
    """Train ``name`` with Adam on ``(x, y)``; returns the model in eval mode."""
    gen = seed_everything(seed)
    model = build_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    for _ in tqdm(range(epochs), desc=f"train {name} seed={seed}", leave=False, disable=not progress):
        model.train()
        for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return model.eval()
    return model.eval()


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    linf_eps=LINF_EPS,
    l2_eps=L2_EPS,
    cw_c=CW_C,
    pgd_steps: int = 20,
    cw_steps: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Clean accuracy and robust accuracy under every attack setting (keys ``clean``, ``pgd_linf@eps``, ``pgd_l2@eps``, ``cw@c``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = {"clean": (model(x).argmax(dim=1) == y).float().mean().item()}
    for eps in linf_eps:
        out[f"pgd_linf@{eps}"] = robust_accuracy(model, x, y, pgd_linf, eps=eps, steps=pgd_steps, generator=gen)
    for eps in l2_eps:
        out[f"pgd_l2@{eps}"] = robust_accuracy(model, x, y, pgd_l2, eps=eps, steps=pgd_steps, generator=gen)
    for c in cw_c:
        out[f"cw@{c}"] = robust_accuracy(model, x, y, cw_l2, c=c, steps=cw_steps)
    return out


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="path of mnist10k.npz (default ../shared/data/mnist/mnist10k.npz)")
    parser.add_argument("--models", default="hannet,fcnet")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--linf-eps", default=",".join(map(str, LINF_EPS)))
    parser.add_argument("--l2-eps", default=",".join(map(str, L2_EPS)))
    parser.add_argument("--cw-c", default=",".join(map(str, CW_C)))
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--cw-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment described by ``args``; write ``--out``; return the results."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    x_tr, y_tr, x_te, y_te = load_mnist(args.data)
    models = [m for m in args.models.split(",") if m]
    linf, l2, cwc = _floats(args.linf_eps), _floats(args.l2_eps), _floats(args.cw_c)
    seeds, epochs, max_steps, pgd_steps, cw_steps = (
        list(range(args.seeds)),
        args.epochs,
        None,
        args.pgd_steps,
        args.cw_steps,
    )
    if args.quick:
        seeds, epochs, max_steps, pgd_steps, cw_steps = [0], 1, 60, 3, 5
        x_te, y_te = x_te[:100], y_te[:100]
        linf, l2, cwc = linf[:2], l2[:2], cwc[-1:]
    per_model: dict[str, list[dict[str, float]]] = {m: [] for m in models}
    train_seconds: dict[str, float] = {m: 0.0 for m in models}
    for m in models:
        for seed in seeds:
            t0 = time.perf_counter()
            model = train_model(
                m, x_tr, y_tr, epochs, lr=args.lr, seed=seed, max_steps=max_steps, progress=not args.quick
            )
            train_seconds[m] += time.perf_counter() - t0
            per_model[m].append(evaluate(model, x_te, y_te, linf, l2, cwc, pgd_steps, cw_steps, seed=seed))
    keys = list(per_model[models[0]][0])
    rows, table = [], []
    for m in models:
        stats = {k: mean_std([r[k] for r in per_model[m]]) for k in keys}
        row = {
            "model": m,
            "label": MODELS[m],
            "params": count_parameters(build_model(m)),
            "train_seconds": train_seconds[m],
            **{
                k: {"mean": 100 * mu, "std": 100 * sd, "per_seed": [100 * r[k] for r in per_model[m]]}
                for k, (mu, sd) in stats.items()
            },
        }
        rows.append(row)
        table.append([MODELS[m], f"{row['params']:,}"] + [f"{row[k]['mean']:.1f} ± {row[k]['std']:.1f}" for k in keys])
    headers = ["model", "params"] + [_header(k) for k in keys]
    wall = time.perf_counter() - t_start
    md = (
        f"# MNIST robustness ({'quick smoke test' if args.quick else 'run'}: {len(x_tr)} train / {len(x_te)} test digits, "
        f"{epochs} epochs, Adam lr {args.lr}, {len(seeds)} seed(s); accuracy %, mean ± std)\n\n"
        + markdown_table(headers, table)
        + f"\nWall time: {wall:.0f} s.\n"
    )
    results = {
        "experiment": "mnist",
        "quick": bool(args.quick),
        "command": getattr(args, "command_line", None),
        "config": {
            "epochs": epochs,
            "max_steps": max_steps,
            "lr": args.lr,
            "batch_size": 100,
            "seeds": seeds,
            "n_train": len(x_tr),
            "n_test": len(x_te),
            "linf_eps": linf,
            "l2_eps": l2,
            "cw_c": cwc,
            "pgd_steps": pgd_steps,
            "cw_steps": cw_steps,
        },
        "rows": rows,
        "wall_seconds": wall,
    }
    folder = write_results(args.out, results, md)
    if folder is not None:
        _plot(rows, linf, l2, folder / "robustness.png")
    print(md)
    return results


def _header(key: str) -> str:
    if key == "clean":
        return "clean"
    kind, val = key.split("@")
    return {"pgd_linf": f"PGD L-inf eps={val}", "pgd_l2": f"PGD L2 eps={val}", "cw": f"CW c={val}"}[kind]


def _plot(rows: list[dict[str, Any]], linf, l2, path: Path) -> None:
    plt = use_agg_backend()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, kind, grid, title in ((axes[0], "pgd_linf", linf, "PGD L-inf"), (axes[1], "pgd_l2", l2, "PGD L2")):
        for row in rows:
            xs = [0.0] + list(grid)
            ys = [row["clean"]["mean"]] + [row[f"{kind}@{e}"]["mean"] for e in grid]
            es = [row["clean"]["std"]] + [row[f"{kind}@{e}"]["std"] for e in grid]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=row["label"])
        ax.set_xlabel("eps")
        ax.set_ylabel("accuracy %")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
