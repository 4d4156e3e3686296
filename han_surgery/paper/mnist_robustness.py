"""MNIST robustness (paper Section 5.1, Table 6): HanNet vs FCNet, vanilla and defended.

Models (Table 6's columns):

* ``hannet`` -- HanNet, vanilla training (VT): 20 Han-layers of width 784 acting directly on the
  flattened image, then a dense ``784 -> 10`` head (``han_net(784, 784, 20, 10, dense_first=0,
  dense_last=0)``), 39,210 parameters; 1-Lipschitz up to the head.
* ``fcnet`` -- FCNet VT: ``784 -> 784`` ReLU ``-> 10`` (Kaiming init), 623,290 parameters.
* ``fcnet-trades`` -- FCNet trained with TRADES (Zhang et al. 2019): cross-entropy plus
  ``beta * KL(f(x) || f(x'))``, ``x'`` from 10 signed steps of 0.02 on the KL in the L-inf ball of
  radius 0.1; ``beta = 6``.
* ``fcnet-at`` -- FCNet with adversarial training on FGSM samples (Goodfellow et al. 2015): the
  mean of the cross-entropy on the clean batch and on its FGSM (L-inf, eps 0.1) version.

The defences' radii and ``beta`` are our choice (the paper names the methods only).

Training (the paper): Adam, lr 1e-3, weight decay 1e-3, batch 256, 100 epochs, lr x0.2 at half
of training. Data: ``mnist10k.npz`` (10,000 real MNIST digits, stored sorted by label); a fixed
random 8,000 / 2,000 train / test split (seed 0); pixels in ``[0, 1]``. (The paper trains on
10,000 digits and tests on the other 60,000.)

Attacks (white-box, :mod:`.attacks`): PGD with 30 steps of ``2.5 eps / 30`` and a random start,
in the L-inf and the L2 norm, over eps grids that bracket the paper's accuracies (its eps values
did not survive extraction); Carlini-Wagner L2 with 1,000 Adam steps (lr 0.01, kappa 0) at the
paper's ``c`` in {1, 3, 5}, on all test digits (``--cw-digits N``: a fixed random subset of N).
"""

from __future__ import annotations

import argparse
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checks import non_negative_float, positive_float, positive_int, thread_count
from .attacks import cw_l2, fgsm, pgd_l2, pgd_linf, robust_accuracy, trades_kl_linf
from .common import (
    PaperInputError,
    count_parameters,
    fc_net,
    han_net,
    markdown_table,
    parse_floats,
    positive_milestones,
    resolve_data_path,
    seed_arg,
    seed_everything,
    use_agg_backend,
    write_results,
)

__all__ = ["MODELS", "TABLE6", "load_mnist", "build_model", "train_model", "evaluate", "run", "add_arguments"]

#: ``--out`` also gets PNG plots (matplotlib), which :func:`~.cli.check_out` checks for before the run.
WRITES_PLOTS = True

MODELS = {
    "hannet": "HanNet VT (20 Han-layers, width 784)",
    "fcnet": "FCNet VT (1 hidden layer, width 784)",
    "fcnet-trades": "FCNet TRADES",
    "fcnet-at": "FCNet AT (FGSM)",
}
LINF_EPS = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2)
L2_EPS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
CW_C = (1.0, 3.0, 5.0)
DEFENCE_EPS = 0.1
TRADES_BETA = 6.0
TRADES_STEPS = 10
TRADES_ALPHA = 0.02

# Table 6 of the paper (../shared/paper/README.md), accuracy in [0, 1]. PGD rows: the norm and eps
# were lost in extraction ("norm A" / "norm B", eps 1 < 2 < 3).
TABLE6: dict[str, dict[str, float]] = {
    "clean": {"hannet": 0.925, "fcnet": 0.964, "fcnet-trades": 0.969, "fcnet-at": 0.967},
    "cw@1.0": {"hannet": 0.887, "fcnet": 0.684, "fcnet-trades": 0.828, "fcnet-at": 0.815},
    "cw@3.0": {"hannet": 0.757, "fcnet": 0.069, "fcnet-trades": 0.437, "fcnet-at": 0.348},
    "cw@5.0": {"hannet": 0.653, "fcnet": 0.032, "fcnet-trades": 0.216, "fcnet-at": 0.176},
    "pgd norm A, eps 1": {"hannet": 0.783, "fcnet": 0.705, "fcnet-trades": 0.866, "fcnet-at": 0.859},
    "pgd norm A, eps 2": {"hannet": 0.529, "fcnet": 0.121, "fcnet-trades": 0.448, "fcnet-at": 0.412},
    "pgd norm A, eps 3": {"hannet": 0.260, "fcnet": 0.007, "fcnet-trades": 0.071, "fcnet-at": 0.051},
    "pgd norm B, eps 1": {"hannet": 0.753, "fcnet": 0.467, "fcnet-trades": 0.861, "fcnet-at": 0.867},
    "pgd norm B, eps 2": {"hannet": 0.406, "fcnet": 0.018, "fcnet-trades": 0.475, "fcnet-at": 0.420},
    "pgd norm B, eps 3": {"hannet": 0.075, "fcnet": 0.001, "fcnet-trades": 0.042, "fcnet-at": 0.041},
}


def load_mnist(
    path: str | Path | None = None, n_train: int = 8000, split_seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` from ``mnist10k.npz``: flattened ``(N, 784)`` floats in ``[0, 1]``.

    ``n_train`` digits train and the rest test, after a fixed random permutation (``split_seed``):
    the shipped file is sorted by label, so its first 8,000 digits hold only the classes 0-7.
    ``path`` defaults to ``../shared/data/mnist/mnist10k.npz``.
    """
    path = resolve_data_path(path, "mnist", "mnist10k.npz")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy file (whatever its name): one unnamed array
            raise ValueError(f"it holds one unnamed {loaded.shape} array, as np.save writes; use np.savez")
        with loaded as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # a damaged zip
        raise PaperInputError(
            f"{path} is not an MNIST .npz with arrays 'images' (N, 28, 28) uint8 and 'labels' (N,) ({err})"
        ) from err
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise PaperInputError(
            f"{path}: expected images (N, 28, 28) and labels (N,), got {images.shape}, {labels.shape}"
        )
    if images.dtype != np.uint8:
        raise PaperInputError(
            f"{path}: images must be uint8 (0-255), got {images.dtype}; store the raw MNIST pixels (the loader scales "
            "them to [0, 1])"
        )
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and not 0 <= labels.min() <= labels.max() <= 9):
        numeric = labels.size and np.issubdtype(labels.dtype, np.number)
        got = f"{labels.min()}..{labels.max()} ({labels.dtype})" if numeric else f"{labels.dtype} labels"
        raise PaperInputError(f"{path}: labels must be integers 0..9, got {got}")
    if not 0 < n_train < images.shape[0]:
        raise PaperInputError(f"{path} has {images.shape[0]} digits; cannot train on {n_train} and test on the rest")
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(split_seed))
    x, y = x[perm], y[perm]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def build_model(name: str) -> nn.Sequential:
    """The network of column ``name`` (a key of :data:`MODELS`; the defended FCNets share FCNet's architecture)."""
    if name == "hannet":
        return han_net(784, 784, 20, 10, dense_first=0, dense_last=0, activation="abs")
    if name in MODELS:
        return fc_net(784, 784, 1, 10, activation="relu", init="kaiming")
    raise PaperInputError(f"unknown MNIST model {name!r}; choose from {', '.join(MODELS)}")


def _loss(name: str, model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
    if name == "fcnet-at":
        return 0.5 * (F.cross_entropy(model(x), y) + F.cross_entropy(model(fgsm(model, x, y, DEFENCE_EPS)), y))
    if name == "fcnet-trades":
        adv = trades_kl_linf(model, x, DEFENCE_EPS, TRADES_ALPHA, TRADES_STEPS, generator=gen)
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + TRADES_BETA * kl
    return F.cross_entropy(model(x), y)


def train_model(
    name: str,
    x: Tensor,
    y: Tensor,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    max_steps: int | None = None,
    progress: bool = False,
) -> nn.Module:
    """Train column ``name`` with the paper's recipe (Adam, lr x0.2 at half of training); returns it in eval mode."""
    gen = seed_everything(seed)
    model = build_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=positive_milestones([epochs // 2]), gamma=0.2)
    steps = 0
    for _ in tqdm(range(epochs), desc=f"train {name}", leave=False, disable=not progress):
        model.train()
        for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            _loss(name, model, x[idx], y[idx], gen).backward()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return model.eval()
        sched.step()
    return model.eval()


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    linf_eps=LINF_EPS,
    l2_eps=L2_EPS,
    cw_c=CW_C,
    pgd_steps: int = 30,
    cw_steps: int = 1000,
    cw_digits: int | None = None,
    seed: int = 0,
    progress: bool = False,
    cw_abort_early: bool = False,
) -> dict[str, float]:
    """Clean and robust accuracy in [0, 1]: keys ``clean``, ``pgd_linf@eps``, ``pgd_l2@eps``, ``cw@c``.

    CW runs on the first ``cw_digits`` of ``x`` (all by default; a random subset when ``x`` is in
    random order), with ``clean@cw`` the clean accuracy on that subset when it is one;
    ``cw_abort_early``: see :func:`~.attacks.cw_l2`.
    """
    cw_digits = x.shape[0] if cw_digits is None else min(cw_digits, x.shape[0])
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = {"clean": (model(x).argmax(dim=1) == y).float().mean().item()}
        if cw_digits < x.shape[0]:
            out["clean@cw"] = (model(x[:cw_digits]).argmax(dim=1) == y[:cw_digits]).float().mean().item()
    jobs = [("pgd_linf", e) for e in linf_eps] + [("pgd_l2", e) for e in l2_eps] + [("cw", c) for c in cw_c]
    for kind, value in tqdm(jobs, desc="attacks", leave=False, disable=not progress):
        if kind == "cw":
            out[f"cw@{value}"] = robust_accuracy(
                model, x[:cw_digits], y[:cw_digits], cw_l2, c=value, steps=cw_steps, lr=0.01, abort_early=cw_abort_early
            )
        else:
            attack = pgd_linf if kind == "pgd_linf" else pgd_l2
            out[f"{kind}@{value}"] = robust_accuracy(model, x, y, attack, eps=value, steps=pgd_steps, generator=gen)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="path of mnist10k.npz (default ../shared/data/mnist/mnist10k.npz)")
    parser.add_argument("--models", default=",".join(MODELS), help="columns of Table 6: " + ", ".join(MODELS))
    parser.add_argument("--epochs", type=positive_int, default=100, help="paper: 100")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam lr (paper: 1e-3)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=1e-3, help="Adam weight decay (paper: 1e-3)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="paper: 256")
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--linf-eps", default=",".join(map(str, LINF_EPS)))
    parser.add_argument("--l2-eps", default=",".join(map(str, L2_EPS)))
    parser.add_argument("--cw-c", default=",".join(map(str, CW_C)), help="paper: 1,3,5")
    parser.add_argument("--pgd-steps", type=positive_int, default=30, help="paper: 30")
    parser.add_argument("--cw-steps", type=positive_int, default=1000, help="paper: 1,000")
    parser.add_argument(
        "--cw-digits",
        type=positive_int,
        default=None,
        help="CW attacks only this many test digits (a random subset; default all)",
    )
    parser.add_argument(
        "--cw-abort-early",
        action="store_true",
        help="stop CW when the batch loss stops falling, as torchattacks' CW does (a weaker attack)",
    )
    parser.add_argument("--threads", type=thread_count, default=None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment described by ``args``; write ``--out``; return the results."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise PaperInputError(f"--models takes a comma-separated subset of {', '.join(MODELS)}, got {args.models!r}")
    for option in ("epochs", "batch_size", "pgd_steps", "cw_steps", "cw_digits"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise PaperInputError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    linf, l2, cwc = (
        parse_floats(text, option, positive=False, allow_empty=True)
        for text, option in ((args.linf_eps, "--linf-eps"), (args.l2_eps, "--l2-eps"), (args.cw_c, "--cw-c"))
    )
    x_tr, y_tr, x_te, y_te = load_mnist(args.data)
    epochs, max_steps, pgd_steps, cw_steps, cw_digits = (
        args.epochs, None, args.pgd_steps, args.cw_steps, args.cw_digits,
    )  # fmt: skip
    if args.quick:
        epochs, max_steps, pgd_steps, cw_steps, cw_digits = 1, 12, 3, 5, 50
        x_te, y_te = x_te[:100], y_te[:100]
        linf, l2, cwc = linf[:2], l2[:1], cwc[:1]
    config = {
        "epochs": epochs,
        "max_steps": max_steps,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "lr_schedule": "x0.2 at half of the epochs",
        "seed": args.seed,
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "linf_eps": linf,
        "l2_eps": l2,
        "cw_c": cwc,
        "pgd_steps": pgd_steps,
        "cw_steps": cw_steps,
        "cw_digits": min(cw_digits or len(x_te), len(x_te)),
        "cw_abort_early": bool(args.cw_abort_early),
        "defence_eps_linf": DEFENCE_EPS,
        "trades": {"beta": TRADES_BETA, "steps": TRADES_STEPS, "alpha": TRADES_ALPHA},
        "flush_denormal": True,
    }
    rows: list[dict[str, Any]] = []
    # Weight decay shrinks the weights of never-lit border pixels geometrically, through the subnormal
    # range, where x86 matrix products slow down by an order of magnitude; flush subnormals to zero.
    torch.set_flush_denormal(True)
    try:
        for m in models:
            t0 = time.perf_counter()
            model = train_model(
                m, x_tr, y_tr, epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                seed=args.seed, max_steps=max_steps, progress=not args.quick,
            )  # fmt: skip
            t1 = time.perf_counter()
            acc = evaluate(
                model, x_te, y_te, linf, l2, cwc, pgd_steps, cw_steps, cw_digits, args.seed, not args.quick,
                cw_abort_early=args.cw_abort_early,
            )  # fmt: skip
            rows.append(
                {
                    "model": m,
                    "label": MODELS[m],
                    "params": count_parameters(model),
                    "train_seconds": t1 - t0,
                    "attack_seconds": time.perf_counter() - t1,
                    "accuracy": {k: 100 * v for k, v in acc.items()},
                }
            )
            results, md = _write(args, config, rows, time.perf_counter() - t_start, len(rows) == len(models))
    finally:
        torch.set_flush_denormal(False)
    print(md)
    return results


def _write(
    args: argparse.Namespace, config: dict[str, Any], rows: list[dict[str, Any]], wall: float, complete: bool
) -> tuple[dict[str, Any], str]:
    """Write ``--out`` for the models done so far (after each one); return the results and their markdown table."""
    keys = list(rows[0]["accuracy"])
    table = [[_header(k)] + [f"{r['accuracy'][k]:.1f}" for r in rows] for k in keys]
    md = (
        f"# MNIST robustness ({'quick smoke test' if args.quick else 'run'}: {config['n_train']} train / "
        f"{config['n_test']} test digits, {config['epochs']} epochs, Adam lr {args.lr}, weight decay "
        f"{args.weight_decay}, batch {args.batch_size}; PGD {config['pgd_steps']} steps, CW {config['cw_steps']} "
        f"steps on {config['cw_digits']} digits; accuracy %)\n\n"
        + markdown_table(["attack"] + [r["label"] for r in rows], table)
        + f"\nWall time: {wall:.0f} s.\n"
    )
    results = {
        "experiment": "mnist",
        "quick": bool(args.quick),
        "complete": complete,
        "command": getattr(args, "command_line", None),
        "config": config,
        "rows": rows,
        "wall_seconds": wall,
    }
    folder = write_results(args.out, results, md)
    if folder is not None:
        _plot(rows, config["linf_eps"], config["l2_eps"], folder / "robustness.png")
    return results, md


def _header(key: str) -> str:
    if key == "clean":
        return "clean"
    if key == "clean@cw":
        return "clean (CW subset)"
    kind, val = key.split("@")
    return {"pgd_linf": f"PGD L-inf eps={val}", "pgd_l2": f"PGD L2 eps={val}", "cw": f"CW c={val}"}[kind]


def _plot(rows: list[dict[str, Any]], linf, l2, path: Path) -> None:
    plt = use_agg_backend()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, kind, grid, title in ((axes[0], "pgd_linf", linf, "PGD L-inf"), (axes[1], "pgd_l2", l2, "PGD L2")):
        for row in rows:
            acc = row["accuracy"]
            ax.plot([0.0, *grid], [acc["clean"]] + [acc[f"{kind}@{e}"] for e in grid], marker="o", label=row["label"])
        ax.set_xlabel("eps")
        ax.set_ylabel("accuracy %")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
