"""Read CIFAR-10, CIFAR-100 and STL10 from the folders their publishers ship, without unpickling anything.

:func:`load_image_dataset` looks in ``root`` for, in this order:

=======================  ===============================================================  =========
folder in ``root``        files                                                            dataset
=======================  ===============================================================  =========
``cifar-10-batches-bin``  ``data_batch_{1..5}.bin``, ``test_batch.bin`` (CIFAR binary        CIFAR-10
                          version: per image 1 label byte + 3,072 pixel bytes)
``cifar-100-binary``      ``train.bin``, ``test.bin`` (2 label bytes, coarse then fine,       CIFAR-100
                          + 3,072 pixel bytes; the fine label is used)
``stl10_binary``          ``train_X.bin``, ``train_y.bin``, ``test_X.bin``, ``test_y.bin``     STL10
                          (96 x 96, column-major images, labels 1..10)
``train/``, ``test/``     one sub-folder per class (``torchvision.datasets.ImageFolder``)     any
=======================  ===============================================================  =========

These are the folders ``tar xf`` makes of the archives at https://www.cs.toronto.edu/~kriz/cifar.html
(the *binary* versions) and https://cs.stanford.edu/~acoates/stl10/ (what torchvision's ``STL10``
also reads). torchvision's ``CIFAR10``/``CIFAR100`` read the *python* versions, which are pickles:
we do not unpickle files a user hands us, so a ``cifar-10-batches-py`` folder gets an error that
says which archive to fetch instead.

Everything is returned as ``uint8`` tensors ``(N, 3, H, W)`` and ``int64`` labels ``(N,)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import PaperInputError

__all__ = ["ImageDataset", "load_image_dataset", "write_cifar10_binary"]


@dataclass
class ImageDataset:
    """A train/test image classification set: ``uint8 (N, 3, H, W)`` images and ``int64 (N,)`` labels."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])


def _read_records(path: Path, label_bytes: int, label_index: int) -> tuple[Tensor, Tensor]:
    record = label_bytes + 3 * 32 * 32
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise PaperInputError(f"{path} is not a CIFAR binary file ({raw.size} bytes is not a multiple of {record})")
    rows = raw.reshape(-1, record)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32)
    return torch.from_numpy(images.copy()), torch.from_numpy(rows[:, label_index].astype(np.int64))


def _cifar(folder: Path, train_files: list[str], test_file: str, label_bytes: int, name: str) -> ImageDataset:
    missing = [f for f in [*train_files, test_file] if not (folder / f).is_file()]
    if missing:
        raise PaperInputError(f"{folder} lacks {', '.join(missing)}; extract the full {name} binary archive there")
    train = [_read_records(folder / f, label_bytes, label_bytes - 1) for f in train_files]
    x_test, y_test = _read_records(folder / test_file, label_bytes, label_bytes - 1)
    num_classes = 100 if label_bytes == 2 else 10
    for file, (_, labels) in zip([*train_files, test_file], [*train, (x_test, y_test)], strict=True):
        if int(labels.max()) >= num_classes:
            raise PaperInputError(f"{folder / file}: labels go up to {int(labels.max())}, not a {name} binary file")
    y_train = torch.cat([y for _, y in train])
    return ImageDataset(name, torch.cat([x for x, _ in train]), y_train, x_test, y_test, num_classes)


def _stl10(folder: Path) -> ImageDataset:
    parts = []
    for split in ("train", "test"):
        xf, yf = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        if not (xf.is_file() and yf.is_file()):
            raise PaperInputError(f"{folder} lacks {xf.name} / {yf.name}; extract stl10_binary.tar.gz there")
        raw = np.fromfile(xf, dtype=np.uint8)
        labels = np.fromfile(yf, dtype=np.uint8).astype(np.int64) - 1
        if labels.size == 0:
            raise PaperInputError(f"{yf} holds no labels; extract stl10_binary.tar.gz there again")
        if raw.size != labels.size * 3 * 96 * 96 or labels.min() < 0 or labels.max() > 9:
            raise PaperInputError(f"{xf} and {yf} do not hold matching STL10 images (3 x 96 x 96) and labels 1..10")
        images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # stored column-major
        parts += [torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)]
    return ImageDataset("stl10", *parts, num_classes=10)


def _image_folder(root: Path) -> ImageDataset:
    """``root/train`` and ``root/test`` (one sub-folder per class), every image decoded up front as RGB: an
    unreadable file, a split without class folders or images of several sizes raise :class:`PaperInputError`."""
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    folders = {}
    for split in ("train", "test"):
        try:
            folders[split] = ImageFolder(str(root / split))
        except FileNotFoundError as err:  # no class folder, or class folders without image files
            raise PaperInputError(
                f"{root / split}: no class folders holding images ({' '.join(str(err).split())}); put each class's "
                f"images in {root}/train/<class>/ and {root}/test/<class>/"
            ) from err
    if folders["train"].classes != folders["test"].classes:
        raise PaperInputError(f"{root}/train and {root}/test have different class folders")
    parts, shapes = [], {}
    for split, folder in folders.items():
        images = []
        for path, _ in folder.samples:
            try:
                images.append(pil_to_tensor(folder.loader(path)))  # torchvision's loader: converted to RGB
            except Image.UnidentifiedImageError as err:
                raise PaperInputError(f"cannot read {path}: not an image PIL can decode; remove or replace it") from err
            except (OSError, ValueError, Image.DecompressionBombError) as err:  # truncated, unreadable, too large
                raise PaperInputError(f"cannot read {path} as an image ({err}); remove or replace it") from err
        sizes = {tuple(img.shape) for img in images}
        if len(sizes) != 1:
            raise PaperInputError(
                f"{root / split}: images of several sizes {sorted(sizes)[:3]}; resize them to one size"
            )
        shapes[split] = images[0].shape
        parts += [torch.stack(images), torch.tensor(folder.targets, dtype=torch.int64)]
    size = lambda shape: "x".join(map(str, shape))  # noqa: E731
    if shapes["train"] != shapes["test"]:
        raise PaperInputError(
            f"{root}: train images are {size(shapes['train'])} but test images {size(shapes['test'])}; resize them "
            "to one size"
        )
    if shapes["train"][1] != shapes["train"][2]:
        raise PaperInputError(f"{root}: images are {size(shapes['train'])}, not square; crop or resize them to squares")
    return ImageDataset(root.name, *parts, num_classes=len(folders["train"].classes))


def load_image_dataset(root: str | Path) -> ImageDataset:
    """The CIFAR-10, CIFAR-100, STL10 or ImageFolder dataset found in ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise PaperInputError(f"--data {root} is not a folder; give the folder that holds the extracted dataset")
    if (root / "cifar-10-batches-bin").is_dir():
        return _cifar(
            root / "cifar-10-batches-bin",
            [f"data_batch_{i}.bin" for i in range(1, 6)],
            "test_batch.bin",
            1,
            "cifar10",
        )
    if (root / "cifar-100-binary").is_dir():
        return _cifar(root / "cifar-100-binary", ["train.bin"], "test.bin", 2, "cifar100")
    if (root / "stl10_binary").is_dir():
        return _stl10(root / "stl10_binary")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return _image_folder(root)
    if any((root / name).is_dir() for name in ("cifar-10-batches-py", "cifar-100-python")):
        raise PaperInputError(
            f"{root} holds the pickled python version of CIFAR, which we do not unpickle; extract the binary "
            "version (cifar-10-binary.tar.gz / cifar-100-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) "
            "into the same folder"
        )
    raise PaperInputError(
        f"no dataset found in {root}: expected cifar-10-batches-bin/, cifar-100-binary/, stl10_binary/ or "
        "train/ and test/ class folders"
    )


def write_cifar10_binary(
    root: str | Path, images: Tensor, labels: Tensor, test_images: Tensor, test_labels: Tensor
) -> Path:
    """Write ``root/cifar-10-batches-bin`` (5 train batches + test batch) from ``uint8 (N, 3, 32, 32)`` images.

    For tests and demos: a tiny CIFAR-10-format folder that :func:`load_image_dataset` reads.
    """
    folder = Path(root) / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)

    def records(x: Tensor, y: Tensor) -> bytes:
        return np.concatenate([y.numpy().astype(np.uint8)[:, None], x.numpy().reshape(len(x), -1)], axis=1).tobytes()

    if len(images) < 5:
        raise ValueError(f"write_cifar10_binary: needs >= 5 training images (one per batch file), got {len(images)}")
    for i, chunk in enumerate(np.array_split(np.arange(len(images)), 5), start=1):
        (folder / f"data_batch_{i}.bin").write_bytes(records(images[chunk], labels[chunk]))
    (folder / "test_batch.bin").write_bytes(records(test_images, test_labels))
    return folder
