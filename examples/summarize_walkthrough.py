"""Turn the runs of ``examples/mnist_walkthrough.sh`` into the results table of ``examples/README.md``.

Reads ``<runs>/<name>/results.json`` (written by ``han_surgery.finetune``) and, for the row "right after
surgery", hanifies the base model and evaluates it on the same held-out split. The table replaces the text
between ``<!-- results:start -->`` and ``<!-- results:end -->`` in ``--readme``.

    python examples/summarize_walkthrough.py runs/mnist --data ../shared/data/mnist/mnist10k.npz --readme examples/README.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from pathlib import Path

import torch

import han_surgery
from han_surgery import load_model
from han_surgery.finetune import load_data

ROWS = [
    ("base", "base ViT, trained from scratch, {epochs} epoch{s}"),
    ("base_more", "base + {epochs} more epoch{s}, no surgery (control)"),
    (None, "hanified, right after surgery (no training)"),
    ("hanified", "hanified + {epochs} epoch{s} fine-tuning"),
    ("hanified_distilled", "hanified + {epochs} epoch{s} fine-tuning, distilled from the base"),
    (
        "hanified_calibrated",
        "calibrated hanify (gain, input scale, rank 8) + {epochs} epoch{s}, logits + hidden distilled",
    ),
]


@torch.no_grad()
def accuracy_after_surgery(base_dir: Path, data_path: str, seed: int) -> tuple[float, int, int, int]:
    """Held-out accuracy and parameters of the base hanified with no training; held-out and total samples."""
    model = load_model(base_dir).eval()
    torch.manual_seed(seed)  # the Han-blocks' random init: the same row on every rerun
    han_surgery.hanify(model)  # the runs' recipe: HanConfig() defaults
    model.eval()
    data = load_data(data_path, seed=seed)
    hits = 0
    for start in range(0, len(data.eval), 250):
        batch = [data.eval[i] for i in range(start, min(start + 250, len(data.eval)))]
        x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        hits += (model(x).argmax(-1) == y).sum().item()
    n_eval = len(data.eval)
    return hits / n_eval, sum(p.numel() for p in model.parameters()), n_eval, len(data.train) + n_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args()

    results = {
        name: json.loads((args.runs / name / "results.json").read_text())
        for name, _ in ROWS
        if name and (args.runs / name / "results.json").is_file()  # older runs have no calibrated row
    }
    missing = [name for name in ("base", "hanified") if name not in results]
    if missing:
        parser.error(
            f"no {', '.join(f'{args.runs}/{m}/results.json' for m in missing)}: give the runs folder of a finished "
            "examples/mnist_walkthrough.sh"
        )
    base = results["base"]
    split = ""
    lines = [
        "| model | parameters | held-out accuracy | held-out loss | optimizer steps | wall time |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in ROWS:
        if name is None:
            acc, params, n_eval, n_total = accuracy_after_surgery(args.runs / "base", args.data, seed=0)
            split = f"Held-out split: {n_eval:,} of the {n_total:,} samples, fixed by `--seed 0`."
            lines.append(f"| {label} | {params:,} | {acc:.2%} | | 0 | |")
            continue
        if name not in results:
            continue
        r = results[name]
        label = label.format(epochs=r["epochs"], s="" if r["epochs"] == 1 else "s")
        lines.append(
            f"| {label} | {r['params']:,} | {r['eval_accuracy']:.2%} | {r['eval_loss']:.4f} | "
            f"{r['global_step']} | {r['total_runtime_s']:.0f} s |"
        )
    wall = (args.runs / "wall_time.txt").read_text().strip() if (args.runs / "wall_time.txt").is_file() else ""
    setup = (
        f"{base['num_processes']} processes ({base['distributed_type']}, {base['device']}), global batch "
        f"{base['global_batch_size']}, {base['steps_per_epoch']} steps per epoch, mixed precision {base['mixed_precision']}; "
        f"torch {torch.__version__}, {platform.machine()}."
    )
    shares = ", ".join(
        f"{name.replace('_', ' ')} {results[name]['params'] / base['params']:.1%}"
        for name in ("hanified", "hanified_calibrated")
        if name in results
    )
    load = os.getloadavg()  # measured, not assumed: a quiet machine and a busy one give different wall times
    table = "\n".join(
        [
            *lines,
            "",
            f"Parameters against the base's: {shares}. Setup: {setup} {wall}.",
            f"Load average when this table was written (1 / 15 min): {load[0]:.2f} / {load[2]:.2f} on {os.cpu_count()} "
            f"CPUs; wall times move with the machine's load. {split}",
        ]
    )
    print(table)
    if args.readme:
        text = args.readme.read_text()
        new, n = re.subn(
            r"(<!-- results:start -->\n).*?(<!-- results:end -->)",
            lambda m: m.group(1) + table + "\n" + m.group(2),
            text,
            flags=re.S,
        )
        if n != 1:
            raise SystemExit(f"{args.readme}: no <!-- results:start --> ... <!-- results:end --> block")
        args.readme.write_text(new)
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
