"""Han-Mixer (paper Section 5.3, Tables 10-12) on CIFAR-10, CIFAR-100 or STL10: ``han-surgery paper mixer --data DIR``.

Rows of Table 12 (timm names registered by :mod:`han_surgery.models.han_mixer`): the paper's CNN stem
alone, + MLP(2), + MLP(4), and + MLP(k) + Han(16) for k = 0, 1, 2, 4. Width 512; 64 tokens on
32 x 32 CIFAR images (stem strides 1, 2, 1, 2), 144 tokens on 96 x 96 STL10 images (1, 2, 2, 2),
as in Table 10.

Protocol (Table 11): AdamW, lr 1e-3, weight decay 0.1; CIFAR batch 256 for 600 epochs, STL10
batch 64 for 300 epochs; random horizontal flip, RandAugment, Cutout (our choices where the
paper is silent: :mod:`.vision`). Downsampled ImageNet (Table 12's second part, a wider stem)
is not covered. The data layout: :mod:`.image_data`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import PaperInputError
from .image_data import ImageDataset
from .vision import Recipe, TableSpec, add_training_arguments, run_table

__all__ = ["ROWS", "TABLE12", "add_arguments", "run"]

ROWS = [
    ("han_mixer_m0h0_32", "CNN stem"),
    ("han_mixer_m2h0_32", "+ MLP(2)"),
    ("han_mixer_m4h0_32", "+ MLP(4)"),
    ("han_mixer_m0h16_32", "+ MLP(0) + Han(16)"),
    ("han_mixer_m1h16_32", "+ MLP(1) + Han(16)"),
    ("han_mixer_m2h16_32", "+ MLP(2) + Han(16)"),
    ("han_mixer_m4h16_32", "+ MLP(4) + Han(16)"),
]

# Table 12 of the paper (CIFAR / STL10 part): parameters and test error %.
TABLE12: dict[str, dict[str, Any]] = {
    "CNN stem": {"params": "1.82M", "stl10": 18.2, "cifar10": 7.2, "cifar100": 27.8},
    "+ MLP(2)": {"params": "2.89M", "stl10": 18.2, "cifar10": 5.3, "cifar100": 27.2},
    "+ MLP(4)": {"params": "3.96M", "stl10": 18.7, "cifar10": 5.5, "cifar100": 27.1},
    "+ MLP(0) + Han(16)": {"params": "1.86M", "stl10": 15.3, "cifar10": 5.9, "cifar100": 26.7},
    "+ MLP(1) + Han(16)": {"params": "2.39M", "stl10": 16.7, "cifar10": 5.0, "cifar100": 24.6},
    "+ MLP(2) + Han(16)": {"params": "2.93M", "stl10": 17.1, "cifar10": 4.7, "cifar100": 24.4},
    "+ MLP(4) + Han(16)": {"params": "4.00M", "stl10": 17.8, "cifar10": 4.6, "cifar100": 24.7},
}

STEM_STRIDES = {32: (1, 2, 1, 2), 96: (1, 2, 2, 2)}


def _recipe(data: ImageDataset, args: argparse.Namespace) -> Recipe:
    if data.image_size not in STEM_STRIDES:
        raise PaperInputError(
            f"mixer: the paper's Han-Mixers take 32x32 (CIFAR) or 96x96 (STL10) images; {data.name} has "
            f"{data.image_size}x{data.image_size}"
        )
    epochs, batch = (600, 256) if data.image_size == 32 else (300, 64)
    return Recipe(
        epochs=args.epochs or epochs, batch_size=args.batch_size or batch, lr=args.lr, weight_decay=args.weight_decay
    )


def _model_kwargs(data: ImageDataset) -> dict[str, Any]:
    return {"img_size": data.image_size, "stem_strides": STEM_STRIDES[data.image_size]}


SPEC = TableSpec(
    experiment="mixer",
    title="Han-Mixer, Table 12",
    rows=ROWS,
    paper=TABLE12,
    recipe=_recipe,
    model_kwargs=_model_kwargs,
    protocol_note=(
        "Protocol: Table 11 (AdamW lr 1e-3, weight decay 0.1; CIFAR batch 256 x 600 epochs, STL10 batch 64 x 300 "
        "epochs; flip, RandAugment, Cutout); our choices where the paper is silent: han_surgery/paper/vision.py."
    ),
    quick_rows=(1, 5),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and score Table 12's rows on ``--data``; write ``--out``; return the results."""
    return run_table(args, SPEC)
