"""Training and scoring of the image classifiers of Tables 11-14 (Han-Mixer, Han-MobileViT).

One recipe, the paper's Table 11 (and Table 13's optimiser): AdamW, lr 1e-3, weight decay 0.1,
cross-entropy; augmentation random horizontal flip, RandAugment and Cutout. Where the paper is
silent we choose: RandAugment with torchvision's defaults (2 ops, magnitude 9); Cutout as one
square of half the image side (16 x 16 on CIFAR, DeVries & Taylor's CIFAR-10 setting) set to 0
after normalisation by the model's timm ``mean`` and ``std``, i.e. filled with the colour ``mean``:
the CIFAR-10 mean colour for the Han-Mixers (their config carries CIFAR-10's mean, also on STL10),
black for MobileViT (timm's mean 0, std 1); a per-step cosine decay of the lr to 0 (no warm-up);
weight decay on every parameter; bfloat16 autocast on CUDA, float32 on CPU. Scored by the test
error (%) of the final model, the paper's metric.

:func:`train_and_score` runs one model; :mod:`.han_mixer` and :mod:`.han_mobilevit` define
the tables' rows and per-dataset batch sizes and epochs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..checks import int_at_least, non_negative_float, positive_float, positive_int
from .common import PaperInputError, count_parameters, markdown_table, seed_arg, seed_everything, write_results
from .image_data import ImageDataset, load_image_dataset

__all__ = [
    "Recipe",
    "TableSpec",
    "TransformedImages",
    "make_transform",
    "train_and_score",
    "add_training_arguments",
    "device_of",
    "run_table",
]


@dataclass
class Recipe:
    """One training run: ``epochs`` of ``batch_size`` images, AdamW(``lr``, ``weight_decay``), cosine decay."""

    epochs: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    image_size: int | None = None  # resize to this side (None: keep the dataset's)
    max_steps: int | None = None  # stop early (smoke tests)
    max_test_images: int | None = None  # score on a prefix of the test set (smoke tests)


def make_transform(
    train: bool, mean: Sequence[float], std: Sequence[float], image_size: int | None, native_size: int
) -> v2.Compose:
    """``uint8 (3, H, W)`` image -> normalised ``float32`` tensor, with the paper's augmentation when ``train``."""
    steps: list[nn.Module] = []
    if image_size is not None and image_size != native_size:
        steps.append(v2.Resize(image_size, antialias=True))
    if train:
        steps += [v2.RandomHorizontalFlip(), v2.RandAugment()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if train:  # Cutout: one square of half the side, 0 after normalisation: the colour `mean` (black if mean is 0)
        steps.append(v2.RandomErasing(p=1.0, scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0.0))
    return v2.Compose(steps)


class TransformedImages(Dataset):
    """``uint8 (N, 3, H, W)`` images and ``(N,)`` labels, each image passed through ``transform``."""

    def __init__(self, images: Tensor, labels: Tensor, transform: v2.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def device_of(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:<i>"`` (a device torch sees).

    Other torch device types (``mps``, ``meta``, ``xla``, ...) raise :class:`~.common.PaperInputError`: the
    training here autocasts on CUDA and runs float32 on CPU, and is written for nothing else.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        problem = " ".join(str(err).split())
        raise PaperInputError(f"--device {name!r} is not a torch device ({problem}); use auto, cpu or cuda") from err
    if device.type not in ("cpu", "cuda"):
        raise PaperInputError(f"--device {name!r}: these experiments run on CPU or CUDA only; use auto, cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PaperInputError(f"--device {name}, but torch sees no CUDA device; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PaperInputError(f"--device {name}, but torch sees {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return device


def train_and_score(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    recipe: Recipe,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    workers: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` with ``recipe`` on ``uint8`` images, then return its test error (%) and timings."""
    torch.manual_seed(seed)
    native = int(x_train.shape[-1])
    if recipe.max_test_images is not None:
        x_test, y_test = x_test[: recipe.max_test_images], y_test[: recipe.max_test_images]
    train_set = TransformedImages(x_train, y_train, make_transform(True, mean, std, recipe.image_size, native))
    test_set = TransformedImages(x_test, y_test, make_transform(False, mean, std, recipe.image_size, native))
    loader_args = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
    train_loader = DataLoader(
        train_set,
        batch_size=recipe.batch_size,
        shuffle=True,
        drop_last=len(train_set) > recipe.batch_size,
        generator=torch.Generator().manual_seed(seed),
        **loader_args,
    )
    test_loader = DataLoader(test_set, batch_size=recipe.batch_size, **loader_args)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    total = recipe.epochs * len(train_loader)
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    steps, t0 = 0, time.perf_counter()
    bar = tqdm(total=total, desc=type(model).__name__, leave=False, disable=not progress, mininterval=10.0)
    while steps < total:
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast:
                loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            bar.update()
            if steps >= total:
                break
    bar.close()
    train_seconds = time.perf_counter() - t0
    model.eval()
    wrong = 0
    with torch.no_grad(), autocast:
        for images, labels in test_loader:
            pred = model(images.to(device)).argmax(dim=1).cpu()
            wrong += int((pred != labels).sum())
    return {
        "params": count_parameters(model),
        "test_error": 100.0 * wrong / len(test_set),
        "test_images": len(test_set),
        "steps": steps,
        "final_train_loss": float(loss.detach()),
        "train_seconds": train_seconds,
    }


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``han-surgery paper mixer`` and ``mobilevit``."""
    parser.add_argument(
        "--data",
        default=None,
        help="folder holding cifar-10-batches-bin/, cifar-100-binary/, stl10_binary/ or train/ + test/ class folders",
    )
    parser.add_argument("--epochs", type=positive_int, default=None, help="default: the paper's for the dataset")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: the paper's for the dataset")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW lr (paper: 1e-3)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW weight decay (paper: 0.1)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int_at_least(0), default=4, help="DataLoader worker processes")
    parser.add_argument("--seed", type=seed_arg, default=0, help="initial weights, augmentation and data order")
    parser.add_argument("--models", default=None, help="comma-separated timm names (default: every row of the table)")


@dataclass
class TableSpec:
    """One paper table of image classifiers: its rows, the paper's values and the per-dataset recipe.

    ``rows``: ``(timm model name, row label)``; ``paper``: ``row label -> {"params": str,
    dataset name: test error %}``; ``recipe(dataset, args) -> Recipe``; ``model_kwargs(dataset) ->``
    extra ``timm.create_model`` arguments; ``quick_rows``: the rows a ``--quick`` run trains; ``check_args(args)``:
    the experiment's own option checks, run before the data is read (raises :class:`~.common.PaperInputError`).
    """

    experiment: str
    title: str
    rows: list[tuple[str, str]]
    paper: dict[str, dict[str, Any]]
    recipe: Callable[[ImageDataset, argparse.Namespace], Recipe]
    model_kwargs: Callable[[ImageDataset], dict[str, Any]]
    protocol_note: str
    quick_rows: tuple[int, ...] = (0, 1)
    quick_image_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    check_args: Callable[[argparse.Namespace], None] | None = None


def run_table(args: argparse.Namespace, spec: TableSpec) -> dict[str, Any]:
    """Train and score every row of ``spec`` on ``--data``; write ``--out``; return the results."""
    import timm

    from .. import models as _  # noqa: F401 - registers the han_* timm models

    t_start = time.perf_counter()
    if args.data is None:
        raise PaperInputError(
            f"{spec.experiment} needs --data DIR: a folder with CIFAR-10/100 (binary version) or STL10 "
            "(see 'han-surgery paper " + spec.experiment + " --help')"
        )
    for option in ("epochs", "batch_size"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise PaperInputError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.workers < 0:
        raise PaperInputError(f"--workers must be >= 0, got {args.workers}")
    device = device_of(args.device)
    if spec.check_args is not None:
        spec.check_args(args)
    rows = spec.rows
    if args.models:
        known = dict(spec.rows)
        names = [m for m in args.models.split(",") if m]
        unknown = [m for m in names if m not in known]
        if unknown or not names:
            raise PaperInputError(f"--models: unknown {unknown or args.models!r}; choose from {', '.join(known)}")
        rows = [(m, known[m]) for m in names]
    data = load_image_dataset(args.data)  # every option checked first: reading a dataset takes a while
    recipe = spec.recipe(data, args)
    workers = args.workers
    if args.quick:
        rows = [spec.rows[i] for i in spec.quick_rows] if not args.models else rows
        recipe.epochs, recipe.max_steps, recipe.max_test_images = 1, 2, 16
        recipe.batch_size = min(recipe.batch_size, 8)
        recipe.image_size = spec.quick_image_size or recipe.image_size
        workers = 0
    results_rows: list[dict[str, Any]] = []
    table: list[list[str]] = []

    def write(complete: bool) -> tuple[dict[str, Any], str]:
        """``--out`` for the rows done so far (after each one, so that a run stopped early keeps them)."""
        wall = time.perf_counter() - t_start
        md = (
            f"# {spec.title} ({'quick smoke test' if args.quick else 'run'} on {data.name}: {recipe.epochs} epochs, "
            f"batch {recipe.batch_size}, AdamW lr {recipe.lr}, weight decay {recipe.weight_decay}, "
            f"image size {recipe.image_size or data.image_size}; test error %)\n\n"
            + markdown_table(
                ["row", "timm model", "paper params", "our params", "paper error %", "ours error %"], table
            )
            + f"\n{spec.protocol_note}\n\nWall time: {wall:.0f} s on {device}.\n"
        )
        results = {
            "experiment": spec.experiment,
            "quick": bool(args.quick),
            "complete": complete,
            "command": getattr(args, "command_line", None),
            "config": {
                "dataset": data.name,
                "train_images": len(data.y_train),
                "test_images": results_rows[0]["test_images"] if results_rows else 0,
                "epochs": recipe.epochs,
                "batch_size": recipe.batch_size,
                "lr": recipe.lr,
                "weight_decay": recipe.weight_decay,
                "image_size": recipe.image_size or data.image_size,
                "max_steps": recipe.max_steps,
                "device": str(device),
                "seed": args.seed,
            },
            "rows": results_rows,
            "wall_seconds": wall,
        }
        write_results(args.out, results, md)
        return results, md

    for name, label in rows:
        seed_everything(args.seed)  # the initial weights: the same for a row whatever rows ran before it
        model = timm.create_model(name, num_classes=data.num_classes, **spec.model_kwargs(data))
        cfg = model.pretrained_cfg
        scored = train_and_score(
            model, data.x_train, data.y_train, data.x_test, data.y_test, recipe, cfg["mean"], cfg["std"],
            device, workers, args.seed, progress=not args.quick,
        )  # fmt: skip
        paper = spec.paper.get(label, {})
        row = {"model": name, "label": label, "paper_params": paper.get("params"), "paper_error": paper.get(data.name)}
        results_rows.append({**row, **scored})
        table.append(
            [
                label,
                f"`{name}`",
                paper.get("params", "-"),
                f"{scored['params'] / 1e6:.2f}M",
                "-" if row["paper_error"] is None else f"{row['paper_error']:.1f}",
                f"{scored['test_error']:.1f}",
            ]
        )
        results, md = write(complete=len(results_rows) == len(rows))
    print(md)
    return results
