"""Proof that the Han timm models learn: MNIST, Han model vs. its timm baseline, same budget.

Trains each model with the same recipe and the same number of epochs on 8,000 of the 10,000
MNIST digits in ``../shared/data/mnist/mnist10k.npz`` and tests on the other 2,000 (a
stratified 80/20 split: the file is sorted by label, see :func:`load_mnist`).
Digits are scaled to [0, 1], normalised with MNIST's mean/std, resized (bilinear) to the
model's input size and repeated to 3 channels. Prints a markdown table (test accuracy,
parameters, wall time), or writes it to ``--out`` (``--out model_cards/MNIST.md`` regenerates the card).

Pairs (every model built with ``timm.create_model(name, num_classes=10, **overrides)``):

* ``han_mobilevit_xxs`` vs. ``mobilevit_xxs`` at 64x64;
* ``han_mixer_m2h16_32`` (MLP(2)+Han(16)) vs. ``han_mixer_m2h0_32`` (its MLP(2) baseline)
  at 32x32, both at width 128 (``embed_dim=128``, token MLP 64) instead of the paper's 512
  so that the CPU budget covers several epochs.

Usage (from the repository root; not part of CI, a smoke run of it is)::

    nice -n 10 python benchmarks/mnist_models.py --out model_cards/MNIST.md   # 4 epochs each, ~15 min on 2 cores
    python benchmarks/mnist_models.py --epochs 0.1 --n-train 500           # a quick look: prints the table
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

import han_surgery  # noqa: F401  (registers han_* with timm)
from han_surgery.checks import positive_float, positive_int, thread_count
from han_surgery.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mnist" / "mnist10k.npz"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MIXER_128 = dict(embed_dim=128, mlp_ratio=(0.5, 1.0))


@dataclass
class Spec:
    name: str
    img_size: int
    baseline_of: str | None = None  # the Han model this one is the baseline for
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"`{self.name}`" + (f" ({extra})" if extra else "")


SPECS = [
    Spec("han_mobilevit_xxs", 64),
    Spec("mobilevit_xxs", 64, baseline_of="han_mobilevit_xxs"),
    Spec("han_mixer_m2h16_32", 32, overrides=MIXER_128),
    Spec("han_mixer_m2h0_32", 32, baseline_of="han_mixer_m2h16_32", overrides=MIXER_128),
]


def data_facts(path: Path) -> dict:
    """What the card says about the data file: its path (relative to the repository when it can be), its number of
    samples, and, for a file sorted by label, how many digits the first 80% hold and their classes."""
    with np.load(path) as data:
        labels = data["labels"]
    facts = {"path": os.path.relpath(Path(path).resolve(), ROOT), "total": len(labels), "sorted_head": None}
    if len(labels) and bool(np.all(np.diff(labels) >= 0)):
        head = labels[: round(0.8 * len(labels))]
        facts["sorted_head"] = (len(head), int(head.min()), int(head.max())) if len(head) else None
    return facts


def load_mnist(path: Path = DATA, n_train: int = 8000, n_test: int = 2000) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)`` as ``(N, 1, 28, 28)`` normalised floats and int64 labels.

    ``mnist10k.npz`` is sorted by label (all 0s first, ..., all 9s last), so "first 8,000 /
    last 2,000" would train on digits 0-7 and test on 7-9. The split is stratified instead:
    every class contributes its first 80% (in file order) to the train pool and the rest to
    the test pool; each pool is shuffled with a fixed seed, then cut to ``n_train`` / ``n_test``.
    """
    with np.load(path) as data:
        images, labels = data["images"], data["labels"]
    x = (torch.from_numpy(images).float().div(255.0) - MNIST_MEAN) / MNIST_STD
    x, y = x.unsqueeze(1), torch.from_numpy(labels).long()
    train_idx, test_idx = [], []
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        cut = round(0.8 * len(idx))
        train_idx.append(idx[:cut])
        test_idx.append(idx[cut:])
    gen = torch.Generator().manual_seed(1234)
    train, test = torch.cat(train_idx), torch.cat(test_idx)
    train = train[torch.randperm(len(train), generator=gen)][:n_train]
    test = test[torch.randperm(len(test), generator=gen)][:n_test]
    return x[train], y[train], x[test], y[test]


def prepare(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """``(B, 1, 28, 28) -> (B, 3, img_size, img_size)``."""
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, img_size: int, batch: int = 250) -> float:
    model.eval()
    correct = sum(
        (model(prepare(x[i : i + batch], img_size)).argmax(1) == y[i : i + batch]).sum().item()
        for i in range(0, len(x), batch)
    )
    return correct / len(x)


def train_one(spec: Spec, data: tuple[torch.Tensor, ...], epochs: float, batch_size: int, lr: float, seed: int) -> dict:
    """Train ``spec`` for ``epochs`` (may be fractional) with AdamW + cosine; return the row of the table."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = timm.create_model(spec.name, num_classes=10, **spec.overrides)
    params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    step, loss_sum, t0 = 0, 0.0, time.perf_counter()
    model.train()
    while step < total:
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(prepare(x_train[idx], spec.img_size)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item()
            step += 1
            if step == total:
                break
    train_s = time.perf_counter() - t0
    return dict(
        spec=spec,
        params=params,
        steps=total,
        final_loss=loss_sum / total,
        train_s=train_s,
        test_acc=accuracy(model, x_test, y_test, spec.img_size),
    )


def markdown(rows: list[dict], args: argparse.Namespace, n_train: int, n_test: int, facts: dict | None = None) -> str:
    """The card: ``facts`` (:func:`data_facts`) describe ``args.data``."""
    facts = facts or data_facts(args.data)
    by_name = {r["spec"].name: r for r in rows}
    split = "stratified 80/20 split per class"
    if facts["sorted_head"]:
        head, low, high = facts["sorted_head"]
        split += f": the file is sorted by label, so its first {head:,} digits hold only the classes {low}-{high}"
    load = os.getloadavg()  # measured, not assumed
    lines = [
        "# MNIST: Han models vs. their timm baselines",
        "",
        "Generated by `benchmarks/mnist_models.py` (do not edit by hand). Each model trains from scratch "
        f"on {n_train} of the {facts['total']:,} MNIST digits in `{facts['path']}` and is tested on "
        f"{n_test} others ({split}): {args.epochs:g} epochs, batch {args.batch_size}, AdamW "
        f"(lr {args.lr:g}, weight decay 0.05, one-cycle schedule), seed {args.seed}, "
        f"{args.threads} CPU thread(s), no augmentation. Digits are normalised, resized (bilinear) and "
        "repeated to 3 channels.",
        "",
        "| model | input | params | params vs. baseline | train wall time (s) | mean train loss | test accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        spec = r["spec"]
        base = next((b for b in rows if b["spec"].baseline_of == spec.name), None)
        if base:  # a Han model whose baseline ran
            ratio = f"{r['params'] / base['params']:.2f}x"
        elif spec.baseline_of in by_name:  # a baseline whose Han model ran
            ratio = "(baseline)"
        else:  # the other of its pair was not run
            ratio = ""
        lines.append(
            f"| {spec.label} | {spec.img_size}x{spec.img_size} | {r['params']:,} | {ratio} | "
            f"{r['train_s']:.0f} | {r['final_loss']:.3f} | {100 * r['test_acc']:.2f}% |"
        )
    lines += [
        "",
        f"Machine: {platform.machine()}, torch {torch.__version__}, timm {timm.__version__}. Load average when "
        f"this table was written (1 / 15 min): {load[0]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs; wall "
        "times move with the machine's load: compare them only roughly. The Han-Mixer pair runs at width 128 "
        "(the paper's is 512) to fit the CPU budget; "
        "`timm.create_model(name, embed_dim=128, mlp_ratio=(0.5, 1.0))` builds it.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=positive_float, default=4, help="may be fractional (> 0)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=positive_float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=thread_count, default=1)
    parser.add_argument("--n-train", type=positive_int, default=8000)
    parser.add_argument("--n-test", type=positive_int, default=2000)
    parser.add_argument(
        "--models",
        nargs="*",
        default=None,
        choices=[s.name for s in SPECS],
        help="a subset of the models (default: all)",
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("-"),
        help="markdown file to write, after every model (default '-': print the table at the end); "
        "--out model_cards/MNIST.md regenerates the committed card",
    )
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    data = load_mnist(args.data, args.n_train, args.n_test)
    for flag, asked, got in (("--n-train", args.n_train, len(data[0])), ("--n-test", args.n_test, len(data[2]))):
        if asked > got:
            parser.error(f"{flag} is {asked:,}, but the data's {flag[4:]} pool (80/20 per class) has {got:,}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, data)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> list[dict]:
    specs = [s for s in SPECS if args.models is None or s.name in args.models]
    facts = data_facts(args.data)
    if any(s.name.startswith("han_") for s in specs):
        cpu.available()  # the CPU kernel's one-time build/load, outside every train wall time
    rows = []
    for spec in specs:
        row = train_one(spec, data, args.epochs, args.batch_size, args.lr, args.seed)
        print(
            f"{spec.name:22s} params {row['params']:>9,}  train {row['train_s']:6.0f}s  "
            f"loss {row['final_loss']:.3f}  test acc {100 * row['test_acc']:.2f}%",
            flush=True,
        )
        rows.append(row)
        if str(args.out) != "-":  # after every model, so a long run leaves its finished rows behind
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(markdown(rows, args, len(data[0]), len(data[2]), facts))
    if rows:
        if str(args.out) == "-":
            print("\n" + markdown(rows, args, len(data[0]), len(data[2]), facts))
        else:
            print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
