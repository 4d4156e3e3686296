"""``--calibrate DATA``: the calibration batches of ``han-surgery hanify`` and ``finetune``.

Calibrated surgery (``hanify(model, config, calibration=batches)``, see ``docs/CALIBRATION.md``)
takes model inputs; this module turns what a user names on the command line into them. It sits
in the fine-tuning layer because image files are read by :func:`~.data.load_data`.

=================================  ==============================================================
``DATA`` is ...                    the batches are
=================================  ==============================================================
``train``                          ``finetune`` only: the inputs of the training split of
                                   ``--data`` (images, tabular rows, or text, tokenised); write
                                   ``./train`` for a file or folder of that name
a ``.txt``, ``.tsv`` or ``.jsonl``  text (see :func:`~han_surgery.surgery.calibration.calibration_batches`),
file                               tokenised with the model's tokenizer (the one saved in its folder)
a ``.csv`` file                    text when the model has a tokenizer, else what ``--data`` reads
anything else                      what ``finetune --data`` reads (an image folder, ``.npz``, a
                                   numeric ``.csv``): every input it holds (both of its splits),
                                   labels dropped (a numeric ``.csv``'s target: its last column)
=================================  ==============================================================
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset

from ..errors import ConfigError, for_option
from ..surgery.calibration.data import TEXT_COLUMNS, CalibrationData, calibration_batches, table_reader

__all__ = ["TRAIN_SPLIT", "TEXT_SUFFIXES", "check_calibration_positions", "load_calibration_batches"]

#: ``--calibrate train``: the fine-tune's own training split.
TRAIN_SPLIT = "train"
#: Files that always hold text (``.csv`` holds text only for a model with a tokenizer).
TEXT_SUFFIXES = (".txt", ".tsv", ".jsonl")


def load_calibration_batches(
    data: CalibrationData,
    *,
    tokenizer: Any = None,
    train: Any = None,
    model_name: str = "the model",
    image_size: int | None = None,
    seed: int = 0,
) -> list[Any]:
    """The batches ``data`` names (see the module docstring), for ``hanify(..., calibration=...)``.

    Args:
        data: the source and how many samples, per batch, of what length.
        tokenizer: the model's tokenizer, or ``None`` if it has none (text then is an error).
        train: the training split of a fine-tune (``--calibrate train``); ``None`` outside one.
        model_name: how error messages name the model (``--model`` or the hanify source).
        image_size: image folders: the square size to resize to (as ``finetune --image-size``).
        seed: which samples are drawn.

    Raises:
        ConfigError: the file or folder is missing, empty, text without a tokenizer, or ``train``
            outside a fine-tune.
        DataError: ``finetune``'s reader cannot read the file or folder (the message names it).
    """
    kwargs = dict(num_samples=data.num_samples, batch_size=data.batch_size, max_length=data.max_length, seed=seed)
    if data.source == TRAIN_SPLIT:
        if train is None:
            raise ConfigError(
                f"--calibrate {TRAIN_SPLIT} means the training split of finetune --data; here give a file or folder "
                f"(write ./{TRAIN_SPLIT} for one of that name)"
            )
        source: Any = train
    else:
        path = Path(data.source).expanduser()
        if not path.exists():
            raise ConfigError(f"--calibrate {data.source}: no such file or folder")
        suffix = path.suffix.lower()
        no_tokenizer = ConfigError(
            f"--calibrate {path} is text, but {model_name} has no tokenizer: text calibrates a transformers "
            "model whose folder holds one (save it there with tokenizer.save_pretrained(folder)); other "
            "models take what finetune --data reads (an image folder, an .npz of images, a numeric .csv)"
        )
        if path.is_file() and (suffix in TEXT_SUFFIXES or (suffix == ".csv" and tokenizer is not None)):
            if tokenizer is None:
                raise no_tokenizer
            source = path
        elif path.is_file() and suffix == ".csv" and _has_text_column(path):  # and no tokenizer to read it with
            raise no_tokenizer
        elif path.is_file() and suffix not in (".csv", ".npz"):
            raise ConfigError(
                f"--calibrate {path}: unknown format {suffix!r}. Calibration takes text (.txt, one sample per line; "
                ".tsv or .csv with a 'sentence' or 'text' column; .jsonl) for a model with a tokenizer, or an image "
                "folder, an .npz of images (its 'labels' array, if any, left out) or a numeric .csv as finetune --data "
                "reads it (its target, the last column, left out)"
            )
        elif tokenizer is not None:  # an image folder or an .npz: no text for a model that reads tokens
            raise ConfigError(
                f"--calibrate {data.source} holds images, but {model_name} is a text model (it has a tokenizer): "
                "give text (.txt one sample a line; .tsv or .csv with a 'sentence' or 'text' column; .jsonl)"
            )
        else:
            from .data import DataError, DataWarning, load_data

            try:
                with warnings.catch_warnings():  # the labels are dropped: a single class does not matter
                    warnings.simplefilter("ignore", DataWarning)
                    bundle = load_data(path, image_size=image_size, seed=seed, unlabelled=True)
                source = ConcatDataset([bundle.train, bundle.eval])  # no evaluation here: every sample may calibrate
            except DataError as e:  # finetune's reader: its messages name --data, or only the file
                renamed = for_option(e, "--data", "--calibrate")
                if not str(renamed).startswith("--calibrate"):
                    renamed = type(e)(f"--calibrate {data.source}: {renamed}")
                raise renamed from None
    try:
        return calibration_batches(source, tokenizer=tokenizer, **kwargs)
    except (OSError, ValueError) as e:  # calibration_batches' own errors are plain ValueErrors
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--calibrate {data.source}: {' '.join(str(e).split())}") from None


def _has_text_column(path: Path) -> bool:
    """Whether the header of the CSV ``path`` names a text column (``sentence`` or ``text``), as
    :func:`~han_surgery.surgery.calibration.read_texts` looks for one."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = f.readline()
    header = next(table_reader(first, path.suffix.lower()), [])
    return any(cell.strip().lower() in TEXT_COLUMNS for cell in header)


def check_calibration_positions(batches: list[Any], model: Any, model_name: str = "the model") -> None:
    """Text batches no longer than ``model`` takes (its ``config.max_position_embeddings``): a longer batch fails in
    the model's first forward, with a message about tensor sizes that does not name ``--calibration-max-length``.

    Raises:
        ConfigError: a batch holds more tokens than the model has positions.
    """
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int):
        return
    longest = max((b["input_ids"].shape[-1] for b in batches if isinstance(b, dict) and "input_ids" in b), default=0)
    if longest > positions:
        raise ConfigError(
            f"--calibration-max-length: a calibration batch holds {longest} tokens, but {model_name} takes at most "
            f"{positions} (its config.max_position_embeddings); give --calibration-max-length {positions} or less"
        )
