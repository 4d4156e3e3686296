"""Datasets for ``han-surgery finetune``: what a path holds decides how it is read.

=========================  ==================================================================
``--data`` is ...          read as
=========================  ==================================================================
a folder                   torchvision ``ImageFolder`` (``<root>/<class>/<image>``); a folder
                           with ``train/`` and ``val/`` (or ``test/``) subfolders uses that split;
                           one with ``train/`` alone is split as a flat one. At least 2 classes
``*.npz``                  ``images`` uint8/float ``(N, H, W)`` or ``(N, H, W, C)`` and ``labels``
                           int ``(N,)`` (e.g. ``mnist10k.npz``)
``*.csv`` (numbers only)   tabular: features first, target in the last column; an optional
                           header row. Regression unless the target is a small set of integers
                           (override with ``--task``)
``*.csv`` / ``*.jsonl``    text classification for transformers models: columns/keys ``text``
with a ``text`` column     and ``label`` (int, or strings mapped to ids in sorted order)
=========================  ==================================================================

A CSV is tab-separated when its first line holds more tabs than commas (or as many, in a ``.tsv``), and may start
with a UTF-8 byte-order mark; header names are matched ignoring case and surrounding spaces. A comma-separated file
quotes as CSV does (``"hello, world",1``); a tab-separated one quotes nothing (a ``"`` is part of the text).

The held-out split is a fixed random ``val_fraction`` of the rows drawn from ``seed``, so it does
not depend on the number of processes. Every problem raises :class:`DataError`, which names the file
and what to change.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..checks import MAX_NUM_CLASSES
from ..errors import HanSurgeryError, first_line
from ..fileio import csv_delimiter
from ..surgery.calibration.data import padding_tokens, table_reader

__all__ = ["DataError", "DataWarning", "DataBundle", "load_data", "TextDataset"]

#: ``--task auto`` takes a numeric CSV's integer target for classes when it holds at most this many values, all in
#: ``0..AUTO_CLASSES``; for regression otherwise.
AUTO_CLASSES = 20

Task = Literal["classification", "regression"]

#: Normalisation of image pixels in [0, 1]: ``(x - 0.5) / 0.5``, the same for every channel.
IMAGE_MEAN, IMAGE_STD = 0.5, 0.5


class DataError(HanSurgeryError, ValueError):
    """The data given to ``--data`` cannot be used; the message says why and what to do."""


@dataclass
class DataBundle:
    """What the training loop needs to know about a data set.

    Attributes:
        train, eval: map-style datasets yielding ``(input, target)`` pairs (text: dicts of tensors).
        kind: ``"image"`` (inputs ``(C, H, W)`` float), ``"tabular"`` (``(F,)`` float) or ``"text"``.
        task: ``"classification"`` (targets int64 in ``[0, num_outputs)``) or ``"regression"``
            (targets float ``(num_outputs,)``, standardised; see ``target_mean``/``target_std``).
        num_outputs: classes, or regression targets.
        name: a short name for the model card (the file or folder name).
        in_chans, image_size: images only (``image_size`` is ``(H, W)``, or None for a folder of
            images whose size the model decides).
        num_features: tabular only.
        class_names: label names, when the data has them.
        target_mean, target_std: regression only, to report errors in the data's units.
        held_out_folder: an image folder with its own held-out split (``train/`` beside ``val/``,
            ``validation/`` or ``test/``): that folder's name; ``None`` where ``--val-fraction`` split the data.
    """

    train: Dataset[Any]
    eval: Dataset[Any]
    kind: Literal["image", "tabular", "text"]
    task: Task
    num_outputs: int
    name: str
    in_chans: int | None = None
    image_size: tuple[int, int] | None = None
    num_features: int | None = None
    class_names: list[str] | None = None
    target_mean: list[float] | None = None
    target_std: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    held_out_folder: str | None = None

    def summary(self) -> dict[str, Any]:
        """What a run records about its data (``results.json``): kind, task, sizes, classes, preprocessing."""
        return {
            "name": self.name,
            "kind": self.kind,
            "task": self.task,
            "num_outputs": self.num_outputs,
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            "num_features": self.num_features,
            "class_names": self.class_names,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
            **{k: v for k, v in self.extra.items() if k in ("feature_mean", "feature_std")},
        }

    def standardization(self) -> dict[str, list[float]]:
        """Tabular data: the training split's feature (and, for regression, target) means and standard
        deviations the rows were standardised with, as :class:`~han_surgery.models.tabular.TabularNet` takes
        them; ``{}`` for other data."""
        if self.kind != "tabular":
            return {}
        stats = {k: self.extra[k] for k in ("feature_mean", "feature_std")}
        if self.target_mean is not None and self.target_std is not None:
            stats.update(target_mean=self.target_mean, target_std=self.target_std)
        return stats

    def describe(self) -> str:
        what = {
            "image": f"images {self.in_chans}x{self.image_size[0]}x{self.image_size[1]}"
            if self.image_size
            else "images",
            "tabular": f"tabular, {self.num_features} features",
            "text": "text",
        }[self.kind]
        target = (
            f"{self.num_outputs} classes"
            if self.task == "classification"
            else f"regression, {self.num_outputs} target(s)"
        )
        return f"{self.name}: {what}, {target}, {len(self.train)} train / {len(self.eval)} held-out"


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed random split of ``range(n)``: ``(train, held-out)``, held-out ``ceil(val_fraction n)`` rows."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}.")
    n_val = max(1, math.ceil(n * val_fraction))
    if n - n_val < 1:
        raise DataError(f"Only {n} rows: too few to hold out {val_fraction:.0%} for evaluation.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _too_many_classes(source: str, hi: int) -> DataError:
    return DataError(
        f"{source}: labels go up to {hi}, a classifier of {hi + 1:,} classes (at most {MAX_NUM_CLASSES:,}): "
        "re-map them to 0..K-1 for K classes."
    )


def check_labels(labels: np.ndarray, num_classes: int | None, source: str) -> int:
    """Check integer class labels are in ``[0, num_classes)``; return ``num_classes`` (inferred if None).

    An inferred count is at most :data:`~han_surgery.checks.MAX_NUM_CLASSES`: ``max label + 1`` of a stray
    label (an id, not a class index) would otherwise allocate a classifier of billions of rows.
    """
    if labels.size == 0:
        raise DataError(f"{source}: no labels.")
    if not np.issubdtype(labels.dtype, np.integer) and not (
        np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0)
    ):
        raise DataError(f"{source}: class labels must be integers, got dtype {labels.dtype}.")
    # Compared as they are: integral floats beyond int64 (1e30) would wrap around if cast first.
    lo, hi = int(labels.min()), int(labels.max())
    if num_classes is None:
        if hi >= MAX_NUM_CLASSES:
            raise _too_many_classes(source, hi)
        num_classes = hi + 1
    if lo < 0 or hi >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(
            f"{source}: label out of range: found {int(bad[0])} ({bad.size} such rows); labels must be "
            f"integers in [0, {num_classes - 1}] for {num_classes} classes. Re-map the labels to 0..K-1"
            + (" or pass a larger --num-classes." if num_classes else ".")
        )
    return num_classes


# ----------------------------------------------------------------------------------------- images
_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: what a channels-last axis holds


def _images_to_tensor(images: np.ndarray, source: str) -> torch.Tensor:
    """``(N, H, W)`` or ``(N, H, W, C)`` (integers 0..255 or floats 0..1) -> normalised float ``(N, C, H, W)``.

    Anything else is a :class:`DataError`, not a silently different input: integers above 255 (16-bit
    images), floats outside ``[0, 1]`` (0..255 stored as floats, or images already normalised), and a
    channels-first ``(N, C, H, W)`` array (it would read as ``C``-pixel-wide images of ``W`` channels).
    """
    if images.ndim == 3:
        images = images[:, :, :, None]
    if images.ndim != 4:
        raise DataError(f"{source}: 'images' must have shape (N, H, W) or (N, H, W, C), got {images.shape}.")
    if images.shape[-1] not in _CHANNELS and images.shape[1] in _CHANNELS:
        raise DataError(
            f"{source}: 'images' of shape {images.shape} look channels-first (N, C, H, W); save them channels-last, "
            "(N, H, W, C): images.transpose(0, 2, 3, 1)."
        )
    if images.dtype == np.bool_:  # a binary image: False 0.0, True 1.0
        images = images.astype(np.float32)
    lo, hi = (images.min(), images.max()) if images.size else (0, 0)  # the range checks below; none if empty
    if np.issubdtype(images.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise DataError(
                f"{source}: integer 'images' must hold 0..255, found {lo}..{hi}; scale them to 0..255 (uint8) "
                "or to floats in [0, 1]."
            )
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).float() / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        if lo < 0 or hi > 1:
            hint = "divide by 255" if hi > 1 and lo >= 0 else "give the raw pixels (the reader normalises them)"
            raise DataError(f"{source}: float 'images' must be in [0, 1], found {lo:g}..{hi:g}; {hint}.")
        x = torch.from_numpy(np.ascontiguousarray(images)).float()
    else:
        raise DataError(f"{source}: 'images' must be integers 0..255 or floats in [0, 1], got dtype {images.dtype}.")
    return ((x - IMAGE_MEAN) / IMAGE_STD).permute(0, 3, 1, 2).contiguous()


#: The first bytes of a zip archive (what ``np.savez`` writes), as ``np.load`` tells an .npz from other files.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPZ_HINT = "save the arrays with np.savez(path, images=..., labels=...)"


def _read_npz(path: Path, unlabelled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``images`` and ``labels`` arrays of an .npz; anything else (not a zip, objects, damage) is a DataError.
    ``unlabelled`` (calibration, which drops the labels): an .npz without ``labels`` reads as all of class 0.

    The file type is checked here, not left to ``np.load``: for a file that is not a zip it falls back to a
    pickle, and its error then suggests loading that pickle, which han-surgery never does.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or first_line(e)}).") from None
    if not head:
        raise DataError(f"{path}: the file is empty; {_NPZ_HINT}.")
    if head == b"\x93NUMPY":
        raise DataError(f"{path}: a single .npy array, not an .npz with 'images' and 'labels'; {_NPZ_HINT}.")
    if head[:4] not in _ZIP_MAGIC:
        raise DataError(f"{path}: not a .npz file (np.savez writes a zip archive of arrays); {_NPZ_HINT}.")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"images", "labels"} - set(f.files) - ({"labels"} if unlabelled else set())
            if missing:
                raise DataError(
                    f"{path}: an image .npz needs arrays 'images' and 'labels'; missing {sorted(missing)} "
                    f"(has {f.files})."
                )
            images = f["images"]
            labels = f["labels"] if "labels" in f.files else np.zeros(len(images) if images.ndim else 0, np.int64)
    except DataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):  # an object array: a pickle inside the archive, never loaded
            raise DataError(
                f"{path}: not a readable .npz of numeric arrays (it holds Python objects, which han-surgery never "
                "unpickles); save numeric arrays with np.savez(path, images=..., labels=...)."
            ) from None
        raise DataError(f"{path}: not a readable .npz of numeric arrays ({first_line(e)}); {_NPZ_HINT}.") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a damaged or truncated archive
        raise DataError(
            f"{path}: not a readable .npz file ({first_line(e)}): the archive is damaged or truncated; save it again."
        ) from None
    for name, array in (("images", images), ("labels", labels)):
        if not isinstance(array, np.ndarray):  # a zip member that is not an .npy file: np.load gives its bytes
            raise DataError(f"{path}: '{name}' is not a NumPy array; {_NPZ_HINT}.")
    return images, labels


def load_npz(
    path: Path,
    *,
    num_classes: int | None,
    val_fraction: float,
    seed: int,
    max_samples: int | None,
    unlabelled: bool = False,
) -> DataBundle:
    images, labels = _read_npz(path, unlabelled)
    for name, array in (("images", images), ("labels", labels)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise DataError(f"{path}: '{name}' has dtype {array.dtype}; expected numbers.")
    # Shapes before len(): a 0-d array has none, and (N, K) labels would reach the loss as multi-target.
    if labels.ndim == 2 and labels.shape[1] == 1:  # Keras' layout (CIFAR's y_train): one label a row
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{path}: 'labels' must have shape (N,), one class number per image, got {labels.shape}.")
    if images.ndim not in (3, 4):
        raise DataError(f"{path}: 'images' must have shape (N, H, W) or (N, H, W, C), got {images.shape}.")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        bad = np.argwhere(~np.isfinite(images.reshape(len(images), -1)))
        raise DataError(
            f"{path}: 'images' holds {len(bad)} non-finite value(s) (NaN or inf), the first in image {bad[0][0]}; "
            "clean them before training."
        )
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels.")
    num_classes = check_labels(np.asarray(labels), num_classes, str(path))  # from every row, not the first ones
    keep = _first_rows(max_samples, np.asarray(labels), str(path))
    images, labels = images[keep], labels[keep]
    x = _images_to_tensor(images, str(path))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    dataset = TensorDataset(x, y)
    train_idx, val_idx = split_indices(len(dataset), val_fraction, seed)
    return DataBundle(
        train=Subset(dataset, train_idx),
        eval=Subset(dataset, val_idx),
        kind="image",
        task="classification",
        num_outputs=num_classes,
        name=path.stem,
        in_chans=x.shape[1],
        image_size=(x.shape[2], x.shape[3]),
    )


def _first_rows(max_samples: int | None, labels: np.ndarray | None, source: str) -> slice:
    """The rows ``--max-samples`` keeps: the first ``max_samples`` (all without it). With class ``labels`` (of every
    row), warns (:class:`DataWarning`) naming the classes of the file that those rows leave out: the model still gets
    a head for every class of the file, which its training split then never shows."""
    if not max_samples:
        return slice(None)
    if labels is not None and max_samples < len(labels):
        left_out = sorted(set(np.unique(labels).tolist()) - set(np.unique(labels[:max_samples]).tolist()))
        if left_out:
            shown = ", ".join(map(str, left_out[:10])) + (", ..." if len(left_out) > 10 else "")
            warnings.warn(
                f"{source}: --max-samples {max_samples} keeps the first rows, which hold no row of class(es) "
                f"{shown} ({len(left_out)} of {len(np.unique(labels))}); is the file sorted by label?",
                DataWarning,
                stacklevel=4,
            )
    return slice(max_samples)


#: PIL modes of more than 8 bits a channel: converting them to RGB clips them (a 16-bit PNG turns mostly white).
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def read_image(path: str) -> Any:
    """An image as RGB, as torchvision's PIL loader reads it, with a one-line :class:`DataError` naming a file PIL
    cannot read, one beyond PIL's pixel limit, or one of 16-bit or float pixels (refused, as in an ``.npz``)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            if image.mode in _WIDE_MODES:
                raise DataError(
                    f"{path}: {image.mode} pixels (16-bit or float), which RGB would clip; convert the images to "
                    "8 bits first."
                )
            return image.convert("RGB")
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(
            f"{path}: more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, beyond PIL's guard against decompression "
            "bombs; shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        ) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError, so is a truncated file
        raise DataError(f"{path}: not a readable image ({type(e).__name__}); remove or replace the file.") from None


def _hidden(name: str) -> bool:
    """A hidden file or folder (``.ipynb_checkpoints``, ``.DS_Store``, macOS' ``._x.png``)."""
    return name.startswith(".")


def load_image_folder(
    path: Path,
    *,
    image_size: int | None,
    val_fraction: float,
    seed: int,
    max_samples: int | None,
    min_classes: int = 2,
) -> DataBundle:
    from torchvision import datasets, transforms

    size = image_size or 224
    transform = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize([IMAGE_MEAN] * 3, [IMAGE_STD] * 3),
        ]
    )

    class VisibleImageFolder(datasets.ImageFolder):
        """``ImageFolder`` without hidden entries: ``.ipynb_checkpoints/`` is no class, macOS' ``._x.png`` no image."""

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _hidden(e.name))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: i for i, name in enumerate(classes)}

    def visible_image(file: str) -> bool:
        return not _hidden(os.path.basename(file)) and file.lower().endswith(datasets.folder.IMG_EXTENSIONS)

    def folder(root: Path) -> Any:
        try:
            return VisibleImageFolder(str(root), transform=transform, loader=read_image, is_valid_file=visible_image)
        except FileNotFoundError as e:
            raise DataError(
                f"{root}: no classes found ({e}). An image folder needs one sub-folder per class with the "
                f"images inside: {root}/<class name>/<image>.png"
            ) from None

    train_dir = path / "train"
    held_dir = next((path / n for n in ("val", "validation", "test") if (path / n).is_dir()), None)
    if train_dir.is_dir() and held_dir is not None:
        train, held = folder(train_dir), folder(held_dir)
        if held.classes != train.classes:
            raise DataError(f"{path}: train/ has classes {train.classes} but {held_dir.name}/ has {held.classes}.")
        train_set, eval_set, classes = train, held, train.classes
        if max_samples:  # a seeded draw, as from a flat folder: ImageFolder lists the images class by class
            generator = torch.Generator().manual_seed(seed)
            train_set = Subset(train, torch.randperm(len(train), generator=generator)[:max_samples].tolist())
    else:
        # <dir>/train/<class>/ without a held-out folder: train/ is the class root, split as a flat folder is
        # (ImageFolder would read it as one class named "train"). Every sub-folder counts, as for ImageFolder.
        only_train = (
            train_dir.is_dir()
            and [e.name for e in path.iterdir() if e.is_dir() and not _hidden(e.name)] == ["train"]
            and any(e.is_dir() for e in train_dir.iterdir())  # train/<class>/...; train/*.png is one folder of images
        )
        full = folder(train_dir if only_train else path)
        n = min(len(full), max_samples) if max_samples else len(full)
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        train_idx, val_idx = split_indices(n, val_fraction, seed)
        train_set, eval_set, classes = (
            Subset(full, [perm[i] for i in train_idx]),
            Subset(full, [perm[i] for i in val_idx]),
            full.classes,
        )
    if len(classes) < min_classes:
        raise DataError(
            f"{path}: one class folder ({classes[0]}/) found; classification needs at least 2. Lay the images out "
            f"as {path}/<class>/<image>.png (split by --val-fraction), or {path}/train/<class>/<image>.png with "
            f"{path}/val/<class>/<image>.png."
        )
    return DataBundle(
        train=train_set,
        eval=eval_set,
        kind="image",
        task="classification",
        num_outputs=len(classes),
        name=path.name,
        in_chans=3,
        image_size=(size, size),
        class_names=list(classes),
        held_out_folder=held_dir.name if train_dir.is_dir() and held_dir is not None else None,
    )


# ---------------------------------------------------------------------------------------- tabular
def _read_text(path: Path) -> str:
    """The whole file decoded as UTF-8, less a byte-order mark (Excel's "CSV UTF-8" writes one); a file that is
    not UTF-8 is a :class:`DataError` naming the first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or first_line(e)}).") from None
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file (byte {bom + e.start}): is it binary?") from None


#: A CSV row as ``(line, cells)``: the file line it starts on (1-based, as an editor numbers them), its cells.
CsvRow = tuple[int, list[str]]


def _read_csv_rows(path: Path) -> list[CsvRow]:
    """The non-blank rows of a CSV or TSV file, split as :func:`~han_surgery.fileio.csv_delimiter` says, each
    with the line it starts on (blank lines and quoted line breaks counted, so messages name the editor's line)."""
    text = _read_text(path)
    rows: list[CsvRow] = []
    try:
        reader = table_reader(text, path.suffix)
        start = 1
        for row in reader:
            if row and any(c.strip() for c in row):
                rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV ({e}).") from None
    if not rows:
        raise DataError(f"{path}: the file is empty.")
    return rows


def _header_keys(row: list[str]) -> list[str]:
    """A header row as field names: ``Text``, `` label`` and ``LABEL`` all name ``text`` / ``label``."""
    return [c.strip().lower() for c in row]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _column_numbers_header(rows: list[CsvRow]) -> bool:
    """Whether the first row is the header pandas writes for a DataFrame without column names (``0,1,...,W-1``):
    those column numbers, above rows that are not all whole numbers (else it may be data, and is kept as data)."""
    first = [c.strip() for c in rows[0][1]]
    if first != [str(i) for i in range(len(first))]:
        return False
    return any(_is_number(c) and not float(c).is_integer() for _, row in rows[1:] for c in row)


def load_tabular_csv(
    path: Path,
    rows: list[CsvRow],
    *,
    task: str,
    num_classes: int | None,
    val_fraction: float,
    seed: int,
    max_samples: int | None,
) -> DataBundle:
    header = None
    if not any(_is_number(c) for c in rows[0][1]) or _column_numbers_header(rows):
        header, rows = rows[0][1], rows[1:]
    if not rows:
        raise DataError(f"{path}: only a header row, no data.")
    if header is not None and (
        unnamed := [j for j, c in enumerate(header) if not c.strip() or c.startswith("Unnamed: ")]
    ):
        raise DataError(
            f"{path}: the header names no column {unnamed[0] + 1}; a pandas index written by to_csv() looks like "
            "this, and would be trained on as a feature: save with to_csv(index=False), or name or drop the column."
        )
    width = len(rows[0][1])
    if width < 2:
        raise DataError(
            f"{path}: a tabular CSV needs at least one feature column and the target last; got {width} column(s)."
        )
    values = np.empty((len(rows), width), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        if len(row) != width:
            raise DataError(f"{path}, line {line}: {len(row)} cells, expected {width} like the first data row.")
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise DataError(
                    f"{path}, line {line}, column {j + 1}: non-numeric cell {cell!r}. A tabular CSV holds "
                    f"numbers only (features, then the target last); encode categories as numbers first. "
                    f"(For text classification use columns named 'text' and 'label'.)"
                ) from None
    if not np.all(np.isfinite(values)):
        i, j = np.argwhere(~np.isfinite(values))[0]
        raise DataError(f"{path}, line {rows[i][0]}, column {j + 1}: {values[i, j]} is not a finite number.")
    target = values[:, -1]
    if task == "auto":  # class numbers: few integers from 0 up (a year column is a quantity, not 2,020 classes)
        integral = np.all(np.mod(target, 1) == 0)
        few = len(np.unique(target)) <= AUTO_CLASSES and target.min() >= 0 and target.max() <= AUTO_CLASSES
        task = "classification" if integral and few else "regression"
    k = check_labels(target, num_classes, str(path) + " (last column)") if task == "classification" else None
    values = values[_first_rows(max_samples, target if k is not None else None, str(path))]
    features, target = values[:, :-1], values[:, -1]
    train_idx, val_idx = split_indices(len(values), val_fraction, seed)
    # Standardise features with the training rows' statistics; constant columns stay (scaled by 1).
    mean, std = features[train_idx].mean(0), features[train_idx].std(0)
    std[std == 0] = 1.0
    x = torch.as_tensor((features - mean) / std, dtype=torch.float32)
    extra: dict[str, Any] = {"feature_mean": mean.tolist(), "feature_std": std.tolist(), "header": header}
    if k is not None:
        y = torch.as_tensor(target, dtype=torch.int64)
        bundle_kw: dict[str, Any] = {"num_outputs": k}
    else:
        t_mean, t_std = float(target[train_idx].mean()), float(target[train_idx].std()) or 1.0
        y = torch.as_tensor((target - t_mean) / t_std, dtype=torch.float32)[:, None]
        bundle_kw = {"num_outputs": 1, "target_mean": [t_mean], "target_std": [t_std]}
    dataset = TensorDataset(x, y)
    return DataBundle(
        train=Subset(dataset, train_idx),
        eval=Subset(dataset, val_idx),
        kind="tabular",
        task=task,
        name=path.stem,
        num_features=x.shape[1],
        extra=extra,
        **bundle_kw,
    )


# ------------------------------------------------------------------------------------------- text
class TextDataset(Dataset):
    """Texts and integer labels, tokenised on access: ``{"input_ids", "attention_mask", ...}, label``.

    Batches are padded by :func:`text_collate` (``max_length`` tokens, truncating longer texts).
    """

    def __init__(self, texts: list[str], labels: list[int]) -> None:
        self.texts, self.labels = texts, labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], self.labels[i]


def make_text_collate(tokenizer: Any, max_length: int) -> Any:
    """Batches of ``(text, label)`` as ``(tokenizer output, labels)``; a tokenizer without a pad token pads with its
    end-of-text (or unknown) token, as calibration does (:func:`~han_surgery.surgery.calibration.data.padding_tokens`),
    and is left as it was."""

    def collate(batch: list[tuple[str, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        texts, labels = zip(*batch, strict=False)
        with padding_tokens(tokenizer):
            enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return dict(enc), torch.tensor(labels, dtype=torch.int64)

    return collate


def _text_records(path: Path, rows: list[CsvRow] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a .jsonl, or of a CSV/TSV (``rows`` from :func:`_read_csv_rows`, header first), and where
    each is, for messages: ``"line N"``, the file line it starts on."""
    if rows is None and path.suffix.lower() == ".jsonl":
        records, places = [], []
        for n, line in enumerate(_read_text(path).split("\n"), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {n}: not valid JSON ({e.msg}).") from None
                places.append(f"line {n}")
        return records, places
    (_, header), *body = rows if rows is not None else _read_csv_rows(path)
    keys = _header_keys(header)  # a short row lacks the fields it misses, and load_text names it
    for line, row in body:  # a long one would be cut short: an unquoted comma splits a text into text and label
        if len(row) > len(keys):
            raise DataError(
                f"{path}, line {line}: {len(row)} cells, the header has {len(keys)} ({_long_row_hint(path)})."
            )
    return [dict(zip(keys, row, strict=False)) for _, row in body], [f"line {line}" for line, _ in body]


def _long_row_hint(path: Path) -> str:
    """What to change about a row with more cells than the header (read again: this runs on an error only)."""
    if csv_delimiter(_read_text(path), path.suffix) == "\t":
        return "a text holds a tab, which a tab-separated file cannot quote: replace it by a space"
    return 'quote texts that contain a comma: "hello, world",1'


def _float_label(value: Any) -> float | None:
    """A text row's label as a float when it is a JSON float or a string that reads as one but not as an integer
    (``2.0``, ``"0.37"``, ``"nan"``); ``None`` for class numbers and names."""
    if isinstance(value, float):
        return value
    if isinstance(value, str) and not value.removeprefix("-").isdecimal():
        try:
            return float(value)
        except ValueError:
            return None
    return None


def load_text(
    path: Path,
    *,
    num_classes: int | None,
    val_fraction: float,
    seed: int,
    max_samples: int | None,
    rows: list[CsvRow] | None = None,
) -> DataBundle:
    records, places = _text_records(path, rows)
    if not records:
        raise DataError(f"{path}: no rows.")
    for r, where in zip(records, places, strict=True):
        if not isinstance(r, dict) or "text" not in r or "label" not in r:
            raise DataError(f"{path}, {where}: text data needs the fields 'text' and 'label', got {r!r:.120}.")
        if r["text"] is None or not str(r["text"]).strip():  # else trained on as "" or "None"
            raise DataError(f"{path}, {where}: empty text; every row needs one (drop or fill the row).")
    raw = [r["label"].strip() if isinstance(r["label"], str) else r["label"] for r in records]  # "a, 1": " 1"
    for i, (v, where) in enumerate(zip(raw, places, strict=False)):
        if v is None or v == "":  # else a class '' (sorted first) renumbers every other class
            raise DataError(f"{path}, {where}: empty label; every row needs one (drop or fill the row).")
        if isinstance(v, (list, dict)):  # else its text, '[0, 1]', became a class name
            raise DataError(
                f"{path}, {where}: label {v!r:.60} is a JSON {type(v).__name__}; each row takes one class (a number "
                "or a name): multi-label data is not supported."
            )
        number = _float_label(v)  # 2.0 (or "2.0") is class 2; 0.37 and NaN are no class: sorted as names before
        if number is not None:
            if not (math.isfinite(number) and number.is_integer()):
                raise DataError(
                    f"{path}, {where}: label {v!r} is a number but no class number; text data trains "
                    "classification only, on class numbers (0, 1, ...) or class names."
                )
            raw[i] = int(number)
    class_names = None
    # isdecimal, not isdigit: int() takes every decimal digit, but not "²" (a digit, not a decimal).
    numeric = [isinstance(v, int) or (isinstance(v, str) and v.removeprefix("-").isdecimal()) for v in raw]
    if any(numeric) and not all(numeric):
        number, name = raw[numeric.index(True)], raw[numeric.index(False)]
        raise DataError(
            f"{path}: the labels mix class numbers ({number!r}, {places[numeric.index(True)]}) and class names "
            f"({name!r}, {places[numeric.index(False)]}); use one or the other."
        )
    if all(numeric):
        ints = [int(v) for v in raw]
        if max(ints) >= 2**63:  # beyond int64: out of range whatever the number of classes
            raise _too_many_classes(str(path), max(ints))
        if min(ints) < -(2**63):
            raise DataError(f"{path}: label {min(ints)} is negative: re-map the labels to 0..K-1 for K classes.")
        labels = np.array(ints, dtype=np.int64)
    else:
        class_names = sorted({str(v) for v in raw})
        if num_classes is not None and num_classes != len(class_names):
            shown = ", ".join(class_names[:5]) + (", ..." if len(class_names) > 5 else "")
            raise DataError(
                f"--num-classes {num_classes}: {path} labels its rows with class names ({len(class_names)}: {shown}), "
                "which make their own classes; --num-classes applies to class numbers: drop it."
            )
        ids = {name: i for i, name in enumerate(class_names)}
        labels = np.array([ids[str(v)] for v in raw], dtype=np.int64)
    k = check_labels(labels, num_classes, str(path))  # from every row: class names and numbers alike
    keep = _first_rows(max_samples, labels, str(path))
    records, labels = records[keep], labels[keep]
    dataset = TextDataset([str(r["text"]) for r in records], labels.tolist())
    train_idx, val_idx = split_indices(len(dataset), val_fraction, seed)
    return DataBundle(
        train=Subset(dataset, train_idx),
        eval=Subset(dataset, val_idx),
        kind="text",
        task="classification",
        num_outputs=k,
        name=path.stem,
        class_names=class_names,
    )


# ------------------------------------------------------------------------------------------ entry
def load_data(
    path: str | Path,
    *,
    task: str = "auto",
    num_classes: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    max_samples: int | None = None,
    unlabelled: bool = False,
) -> DataBundle:
    """Read ``--data`` (see the module docstring for the formats) into a :class:`DataBundle`.

    ``unlabelled``: the caller drops the labels (calibration): an image folder may then hold a single class
    folder (``<dir>/images/*.png``), and an .npz no ``labels`` array.

    Warns (:class:`DataWarning`) when the training split holds a single class, e.g. because
    ``max_samples`` took the first rows of a file sorted by label.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"--data {path}: no such file or folder.")
    kw = dict(val_fraction=val_fraction, seed=seed, max_samples=max_samples)
    suffix = p.suffix.lower()
    if p.is_dir():
        bundle = load_image_folder(p, image_size=image_size, min_classes=1 if unlabelled else 2, **kw)
    elif suffix == ".npz":
        bundle = load_npz(p, num_classes=num_classes, unlabelled=unlabelled, **kw)
    elif suffix == ".jsonl":
        bundle = load_text(p, num_classes=num_classes, **kw)
    elif suffix in (".csv", ".tsv", ".txt"):
        rows = _read_csv_rows(p)
        header = _header_keys(rows[0][1])
        if "text" in header and "label" in header:
            bundle = load_text(p, num_classes=num_classes, rows=rows, **kw)
        else:
            bundle = load_tabular_csv(p, rows, task=task, num_classes=num_classes, **kw)
    else:
        raise DataError(
            f"--data {path}: unknown format {suffix!r}. Use an image folder, an .npz with 'images'/'labels', "
            f"a numeric .csv (target last), or a .csv/.jsonl with 'text' and 'label'."
        )
    if task != "auto" and task != bundle.task:  # image and text data are classification only
        raise DataError(f"--task {task}: --data {path} is {bundle.kind} data, which trains as {bundle.task} only.")
    if num_classes is not None and bundle.task != "classification":
        raise DataError(f"--num-classes {num_classes}: --data {path} is a {bundle.task} task, which has no classes.")
    if num_classes is not None and p.is_dir() and num_classes != bundle.num_outputs:  # it was ignored
        raise DataError(
            f"--num-classes {num_classes}: --data {path} is an image folder, whose {bundle.num_outputs} class "
            "folders make the classes; drop --num-classes."
        )
    if bundle.name in ("", ".", ".."):  # --data . : the folder's own name, for the console, results and card
        bundle = replace(bundle, name=p.resolve().name)
    _warn_if_classes_missing(bundle, max_samples)
    return bundle


class DataWarning(UserWarning):
    """The data loads, but training on it is probably not what was meant."""


def _warn_if_classes_missing(bundle: DataBundle, max_samples: int | None) -> None:
    """Warn when the training split lacks a class (most often: ``--max-samples`` took the first rows of a file
    sorted by label, or too few images)."""
    if bundle.task != "classification" or not isinstance(bundle.train, Subset):
        return
    dataset = bundle.train.dataset
    if isinstance(dataset, TextDataset):
        labels = dataset.labels
    elif isinstance(dataset, TensorDataset):
        labels = dataset.tensors[1]
    else:  # an image folder: torchvision's ImageFolder keeps its labels as .targets
        labels = getattr(dataset, "targets", None)
    if labels is None:
        return
    present = sorted({int(labels[i]) for i in bundle.train.indices})
    in_data = {int(label) for label in labels}  # the classes the data holds (labels need not be 0..n-1)
    if len(present) < 2 or len(present) < len(in_data):
        if not max_samples:
            why = ""
        elif bundle.kind == "image" and bundle.class_names:  # a random draw of the images
            why = f" (--max-samples {max_samples} kept too few images to hold every class)"
        else:
            why = f" (--max-samples {max_samples} kept the first rows; is the file sorted by label?)"
        which = f"class {present}" if len(present) == 1 else f"classes {present}"
        warnings.warn(
            f"{bundle.name}: the training split holds only {which} of {len(in_data)}{why}",
            DataWarning,
            stacklevel=3,
        )
