"""Han-MobileViT (paper Section 5.4, Tables 13-14) on CIFAR-10, CIFAR-100 or STL10: ``han-surgery paper mobilevit --data DIR``.

Rows of Table 14: timm's ``mobilevit_xxs`` / ``mobilevit_xs`` (MLP blocks) against
``han_mobilevit_xxs`` / ``han_mobilevit_xs`` (:mod:`han_surgery.models.han_mobilevit`: every
transformer MLP ``LN -> dense -> Swish -> dense`` replaced by the Han-block
``H2 |H1 x + b1| + b2``).

Protocol (Table 13): AdamW, lr 1e-3, weight decay 0.1, batch 128 (CIFAR) / 64 (STL10), 300 epochs;
images resized to the MobileViT input size, which did not survive extraction: we use 256 x 256,
timm's MobileViT input size (``--image-size``). The paper names no augmentation for these runs;
we use Table 11's (flip, RandAugment, Cutout; :mod:`.vision`). The data layout: :mod:`.image_data`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..checks import positive_int
from .common import PaperInputError
from .image_data import ImageDataset
from .vision import Recipe, TableSpec, add_training_arguments, run_table

__all__ = ["ROWS", "TABLE14", "add_arguments", "run"]

ROWS = [
    ("mobilevit_xxs", "XXS, MLP"),
    ("han_mobilevit_xxs", "XXS, Han"),
    ("mobilevit_xs", "XS, MLP"),
    ("han_mobilevit_xs", "XS, Han"),
]

# Table 14 of the paper: parameters and test error %.
TABLE14: dict[str, dict[str, Any]] = {
    "XXS, MLP": {"params": "1.01M", "stl10": 12.4, "cifar10": 4.4, "cifar100": 22.7},
    "XXS, Han": {"params": "0.55M", "stl10": 12.0, "cifar10": 4.5, "cifar100": 22.5},
    "XS, MLP": {"params": "2.00M", "stl10": 11.5, "cifar10": 4.2, "cifar100": 21.1},
    "XS, Han": {"params": "0.97M", "stl10": 11.0, "cifar10": 3.9, "cifar100": 20.4},
}


def _check_args(args: argparse.Namespace) -> None:
    if args.image_size % 32:
        raise PaperInputError(f"--image-size must be a multiple of 32 for MobileViT, got {args.image_size}")


def _recipe(data: ImageDataset, args: argparse.Namespace) -> Recipe:
    batch = 64 if data.name == "stl10" else 128
    return Recipe(
        epochs=args.epochs or 300,
        batch_size=args.batch_size or batch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        image_size=args.image_size,
    )


SPEC = TableSpec(
    experiment="mobilevit",
    title="Han-MobileViT, Table 14",
    rows=ROWS,
    paper=TABLE14,
    recipe=_recipe,
    model_kwargs=lambda data: {},
    protocol_note=(
        "Protocol: Table 13 (AdamW lr 1e-3, weight decay 0.1, batch 128 CIFAR / 64 STL10, 300 epochs); images resized "
        "to --image-size, 256 x 256 by default (the paper's size was lost; the heading gives this run's); Table 11's augmentation; details: han_surgery/paper/vision.py."
    ),
    quick_rows=(0, 1),
    quick_image_size=64,
    check_args=_check_args,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)
    parser.add_argument(
        "--image-size", type=positive_int, default=256, help="input side after resizing (timm's MobileViT: 256)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and score Table 14's rows on ``--data``; write ``--out``; return the results."""
    return run_table(args, SPEC)
