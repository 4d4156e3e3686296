"""Calibrated surgery on the MNIST ViT of ``examples/mnist_walkthrough.sh``: accuracy right after surgery and after one epoch.

The base model is the walkthrough's: timm ``vit_tiny_patch16_224`` with
``{"patch_size": 7, "embed_dim": 128, "depth": 4, "num_heads": 4}``, trained from
scratch for 10 epochs on MNIST 10k with ``han_surgery.finetune`` (batch 64, lr 1e-3,
30 warm-up steps, seed 0; one process here). It is trained once into ``--base`` unless
that folder holds a ``model.safetensors``; a non-empty ``--base`` without one is refused, unless it is
an unfinished base run of this script (it has the ``training_args.json`` that finetune writes first),
which is trained again. Every MLP block is then replaced (pre-norm dropped, residual kept):

* ``plain hanify``: random Han-blocks (what ``hanify`` did before calibration);
* ``calibrated ...``: ``hanify(model, config, calibration=batches)`` with ``--num-calibration``
  training images, per structural option;
* ``MLPs deleted``: the control, every MLP and its pre-norm removed (the block adds 0), healed inside the
  benchmark as ``hanify`` heals the calibrated ones when ``--calibration-heal-steps`` is given: what the
  Han-blocks add over having no MLPs at all; ``MLPs deleted, first MLP kept`` the same for the ``first MLP
  kept`` variant (block 0's MLP stays, only the other blocks' hidden states are distilled);

each scored on the walkthrough's 1,000 held-out digits right after surgery, and after one
epoch of fine-tuning on the 9,000 training digits (all parameters, AdamW lr ``--heal-lr`` (1e-3) and
weight decay ``--heal-wd`` (0.05) with 30 warm-up steps and cosine decay, batch 64; loss = cross-entropy +
the hidden-state distillation of :func:`hidden_state_distillation_loss` against the base model, block by
block, TinyBERT-style, + ``--heal-kd`` (0) x the KD term on the base's logits). The base model gets the
same epoch too (its own copy as the teacher): the control that says what the epoch does to a model that
lost nothing. ``--seeds N`` runs each epoch N times (data orders ``seed`` .. ``seed + N - 1``) from the
same starting weights and reports the mean and every run: one run on 1,000 digits is noisy (binomial
standard error about 0.7 points). ``--epochs E`` fine-tunes E epochs under one schedule instead (how far
the smaller model gets with more training, against the base given the same).

Usage (from the repository root)::

    python benchmarks/calibrated_mnist.py                  # trains the base into runs/mnist_calibration/base first
    python benchmarks/calibrated_mnist.py --base runs/mnist/base --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from han_surgery import HanConfig, hanify, load_model
from han_surgery.checks import int_at_least, non_negative_float, positive_float, positive_int, thread_count
from han_surgery.finetune import load_data
from han_surgery.finetune.loop import distillation_loss
from han_surgery.surgery.calibration import CalibrationConfig, HiddenStates, hidden_state_distillation_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrated_surgery import ZeroBranch, heal_like_hanify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mnist" / "mnist10k.npz"
VIT = '{"patch_size": 7, "embed_dim": 128, "depth": 4, "num_heads": 4}'
EXTRAS = dict(gain=True, input_scale=True)
# name -> the blocks that keep their MLP, for the controls: every other MLP deleted (healed as hanify heals, with
# --calibration-heal-steps; only the deleted blocks' hidden states distilled, as hanify distils only rewritten ones).
DELETIONS: dict[str, tuple[int, ...]] = {"MLPs deleted": (), "MLPs deleted, first MLP kept": (0,)}
# name -> HanConfig of a calibrated hanify; None for the controls.
VARIANTS: dict[str, HanConfig | None] = {
    **dict.fromkeys(DELETIONS),
    "calibrated": HanConfig(),
    "calibrated gain+scale": HanConfig(**EXTRAS),
    "calibrated gain+scale r=8": HanConfig(**EXTRAS, side_rank=8),
    "calibrated gain+scale r=16": HanConfig(**EXTRAS, side_rank=16),
    "calibrated gain+scale r=32": HanConfig(**EXTRAS, side_rank=32),
    "calibrated gain+scale r=64": HanConfig(**EXTRAS, side_rank=64),
    "calibrated gain+scale r=16, first MLP kept": HanConfig(**EXTRAS, side_rank=16, exclude=("blocks.0.mlp",)),
    "calibrated gain+scale r=16, first two MLPs kept": HanConfig(
        **EXTRAS, side_rank=16, exclude=("blocks.0.mlp", "blocks.1.mlp")
    ),
}


def delete_mlps(model: nn.Module, keep: tuple[int, ...] = ()) -> nn.Module:
    """A copy of the timm ViT ``model`` with every MLP removed but those of the blocks in ``keep``, pre-norm included
    (as ``hanify`` drops it): such a block's ``mlp`` becomes a :class:`ZeroBranch`, so it computes
    ``x + attn(norm1(x))`` and nothing more."""
    model = copy.deepcopy(model)
    for i, block in enumerate(model.blocks):
        if i not in keep:
            block.norm2, block.mlp = nn.Identity(), ZeroBranch()
    return model


def base_action(base: Path) -> str:
    """What to do with ``--base``: ``"load"`` (it holds a ``model.safetensors``), ``"train"`` (missing or empty),
    ``"retrain"`` (an earlier base run's folder without weights: ``--overwrite`` empties it), or a ``ValueError``
    for anything else (a file, or a folder of other things that ``--overwrite`` would delete)."""
    if (base / "model.safetensors").is_file():
        return "load"
    if not base.exists():
        return "train"
    if not base.is_dir():
        raise ValueError(f"--base {base} is not a folder")
    if (base / "training_args.json").is_file():
        return "retrain"
    if any(base.iterdir()):
        raise ValueError(
            f"--base {base} is a non-empty folder without model.safetensors, not a base run of this script: "
            "give a base run's folder, or a new or empty one"
        )
    return "train"


def train_base(out: Path, data: Path, threads: int, overwrite: bool = False) -> None:
    """Trains the base into ``out``; ``overwrite`` (only for an earlier base run's folder) lets finetune empty it."""
    cmd = [sys.executable, "-m", "han_surgery.finetune", "--model", "vit_tiny_patch16_224", "--model-kwargs", VIT]
    cmd += [
        "--data",
        str(data.resolve()),
        "--epochs",
        "10",
        "--batch-size",
        "64",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "30",
    ]
    cmd += ["--seed", "0", "--output-dir", str(out.resolve()), "--no-progress", "--no-tensorboard"]
    cmd += ["--overwrite"] if overwrite else []
    print("training the base model:", " ".join(cmd), flush=True)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


@torch.no_grad()
def accuracy(model: nn.Module, dataset) -> float:
    model.eval()
    hits = 0
    for start in range(0, len(dataset), 250):
        batch = [dataset[i] for i in range(start, min(start + 250, len(dataset)))]
        x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        hits += (model(x).argmax(-1) == y).sum().item()
    return hits / len(dataset)


def heal_one_epoch(
    model: nn.Module,
    teacher: nn.Module,
    dataset,
    seed: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    logit_weight: float = 0.0,
) -> float:
    """One epoch of fine-tuning: cross-entropy + block-by-block hidden-state distillation from ``teacher``.

    With ``logit_weight`` > 0, also that weight x the KD term of ``han-surgery finetune --distill logits``
    (``T^2 KL(softmax(t/T) || softmax(s/T))``, T = 2) on the teacher's logits.
    """
    paths = [f"blocks.{i}" for i in range(len(model.blocks))]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    steps = len(loader)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    teacher.eval()
    model.train()
    start = time.perf_counter()
    with HiddenStates(model, paths) as student_h, HiddenStates(teacher, paths) as teacher_h:
        for x, y in loader:
            with torch.no_grad():
                teacher_logits = teacher(x)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y) + hidden_state_distillation_loss(
                student_h.states, teacher_h.states
            )
            if logit_weight:
                loss = loss + logit_weight * distillation_loss(logits, teacher_logits, "classification", 2.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--base", type=Path, default=ROOT / "runs" / "mnist_calibration" / "base")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        metavar="NAME",
        help="the variants to run, quoted (default: all): " + "; ".join(VARIANTS),
    )
    parser.add_argument("--num-calibration", type=positive_int, default=2048)
    parser.add_argument("--steps", type=positive_int, default=CalibrationConfig.steps, help="Adam steps per block.")
    parser.add_argument("--no-heal", action="store_true", help="Skip the one-epoch fine-tunes.")
    parser.add_argument(
        "--max-fvu",
        type=non_negative_float,
        default=None,
        help="Keep the MLPs whose fit leaves more variance unexplained.",
    )
    parser.add_argument(
        "--keep-by",
        choices=("block", "output"),
        default=None,
        help="What --max-fvu is compared with (CalibrationConfig.keep_by; default block).",
    )
    parser.add_argument(
        "--heal-lr", type=positive_float, default=1e-3, help="Peak learning rate of the one-epoch fine-tunes."
    )
    parser.add_argument(
        "--heal-wd", type=non_negative_float, default=0.05, help="AdamW weight decay of the one-epoch fine-tunes."
    )
    parser.add_argument(
        "--heal-kd",
        type=non_negative_float,
        default=0.0,
        help="Weight of a logit-distillation (KD, T = 2) term in the fine-tunes.",
    )
    parser.add_argument(
        "--calibration-heal-steps",
        type=int_at_least(0),
        default=0,
        help="In-hanify healing steps (CalibrationConfig.heal_steps, every parameter, lr 2e-3): distillation of the "
        "base's hidden states on the unlabelled calibration images, before the accuracy right after surgery.",
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=1, help="One-epoch fine-tunes per model (data orders seed .. seed+N-1)."
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=1,
        help="Fine-tune this many epochs (one cosine schedule) instead of one.",
    )
    parser.add_argument("--threads", type=thread_count, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.keep_by is not None and args.max_fvu is None:  # it was ignored
        parser.error("--keep-by says what --max-fvu is compared with: give --max-fvu")
    args.keep_by = args.keep_by or "block"
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    try:
        action = base_action(args.base)
    except ValueError as exc:
        parser.error(str(exc))
    data = load_data(args.data, seed=0)  # the walkthrough's split: 1,000 held-out digits
    if args.num_calibration > len(data.train):
        parser.error(f"--num-calibration is {args.num_calibration:,}, but the training split has {len(data.train):,}")
    torch.set_num_threads(args.threads)
    if action != "load":
        train_base(args.base, args.data, args.threads, overwrite=action == "retrain")
    base = load_model(args.base).eval()
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(data.train), generator=g)[: args.num_calibration].tolist()
    images = torch.stack([data.train[i][0] for i in pick])
    calibration = list(images.split(64))
    # --epochs E: the training digits E times over, so one cosine schedule spans all E epochs.
    train = data.train if args.epochs == 1 else torch.utils.data.ConcatDataset([data.train] * args.epochs)
    after = "acc_1_epoch" if args.epochs == 1 else f"acc_{args.epochs}_epochs"  # the JSON key

    def one_epoch(row: dict, model: nn.Module) -> None:
        """Fine-tunes copies of ``model`` for ``--epochs`` epochs, once per seed, and records the accuracies."""
        runs, seconds = [], 0.0
        for seed in range(args.seed, args.seed + args.seeds):
            tuned = copy.deepcopy(model)
            seconds += heal_one_epoch(
                tuned, base, train, seed, lr=args.heal_lr, weight_decay=args.heal_wd, logit_weight=args.heal_kd
            )
            runs.append(accuracy(tuned, data.eval))
        row.update({"heal_s": seconds / len(runs), after: sum(runs) / len(runs), after + "_runs": runs})

    rows = [{"variant": "base", "params": sum(p.numel() for p in base.parameters()), "acc": accuracy(base, data.eval)}]
    if not args.no_heal:
        one_epoch(rows[0], base)
        print(json.dumps(rows[0]), flush=True)
    cfg = CalibrationConfig(
        steps=args.steps,
        max_fvu=args.max_fvu,
        keep_by=args.keep_by,
        seed=args.seed,
        progress=False,
        heal_steps=args.calibration_heal_steps,
        heal_lr=2e-3,
        heal_params="all",
    )
    for name in ["plain hanify", *args.variants]:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        model = delete_mlps(base, DELETIONS[name]) if name in DELETIONS else copy.deepcopy(base)
        report = None
        if name == "plain hanify":
            hanify(model)
        elif name in DELETIONS:
            if cfg.heal_steps:  # the same healing as the calibrated variants get inside hanify
                paths = [f"blocks.{i}" for i in range(len(model.blocks)) if i not in DELETIONS[name]]
                heal_like_hanify(model, base, calibration, paths, cfg)
        else:
            report = hanify(model, VARIANTS[name], calibration=calibration, calibration_config=cfg).calibration
        row = {
            "variant": name,
            "params": sum(p.numel() for p in model.parameters()),
            "calibrate_s": time.perf_counter() - start,
            "acc": accuracy(model, data.eval),
            "fvu": [b.fvu for b in report.blocks] if report else None,
            "output_fvu": [b.output_fvu for b in report.blocks] if report else None,
            "kept": [b.path for b in report.kept] if report else None,
        }
        if not args.no_heal:
            one_epoch(row, model)
        rows.append(row)
        print(json.dumps(row), flush=True)

    base_acc = rows[0]["acc"]
    epoch = f"after {args.epochs} epoch{'s' if args.epochs > 1 else ''}"
    epoch += f" (mean of {args.seeds}: runs)" if args.seeds > 1 else ""
    print(f"\n| model | parameters | accuracy right after surgery | % of base | {epoch} | calibrate s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cell = ""
        if after in r:
            cell = f"{r[after]:.2%}"
            if len(r[after + "_runs"]) > 1:
                cell += " (" + " / ".join(f"{a:.1%}" for a in r[after + "_runs"]) + ")"
        cal = f"{r['calibrate_s']:.0f}" if "calibrate_s" in r else ""
        print(f"| {r['variant']} | {r['params']:,} | {r['acc']:.2%} | {r['acc'] / base_acc:.1%} | {cell} | {cal} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
