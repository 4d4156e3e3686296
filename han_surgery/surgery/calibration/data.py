"""``calibration_batches``: data -> a list of model inputs for ``hanify(model, config, calibration=...)``.

==========================  ================================================================
the source is ...           read as
==========================  ================================================================
a ``*.txt`` file            text, one sample per non-empty line
a ``*.tsv`` / ``*.csv``     text from the column named ``sentence`` or ``text`` (header row)
a ``*.jsonl`` file          text from the key ``sentence`` or ``text`` of each record
a dataset                   any map-style dataset of ``(input, label)`` pairs or of inputs,
                            e.g. ``han_surgery.finetune.load_data(path).train`` for the
                            images (``.npz``, image folders) ``finetune --data`` reads:
                            batches of its input tensors; inputs that are strings (the
                            text ``finetune --data`` reads) are tokenised as a file's are
==========================  ================================================================

Text batches are the tokenizer's output as a dict (``input_ids``, ``attention_mask``,
...), called as ``model(**batch)``; padding tokens are left out of the fit. Samples are
drawn at random (``seed``); text is sorted by length before batching so that batches
carry little padding. Labels are never needed. (Image files are read by the fine-tuning
data layer, which sits above surgery: the command line passes its dataset here.)
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ...errors import ConfigError
from ...fileio import csv_delimiter

__all__ = [
    "CalibrationData",
    "calibration_batches",
    "fallback_pad_token",
    "padding_tokens",
    "read_texts",
    "table_reader",
]

TEXT_COLUMNS = ("sentence", "text")


def _pick_column(header: list[str], source: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in TEXT_COLUMNS:
        if name in lowered:
            return lowered.index(name)
    raise ValueError(f"{source}: no column named {' or '.join(TEXT_COLUMNS)} in the header {header}")


def table_reader(text: str, suffix: str) -> Any:
    """A ``csv.reader`` over a CSV / TSV file's ``text`` (``suffix``: the file's), as ``finetune --data`` and
    :func:`read_texts` read one: the delimiter from the first line (:func:`~han_surgery.fileio.csv_delimiter`); a
    comma-separated file quotes as CSV does, a tab-separated one (GLUE's, SST's) quotes nothing, so a ``"`` in a text
    is part of it, not the start of a field that runs over the rows after it."""
    delimiter = csv_delimiter(text, suffix)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    return csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)


def read_texts(path: str | Path) -> list[str]:
    """The text samples of a ``.txt`` / ``.tsv`` / ``.csv`` / ``.jsonl`` file (see the module docstring).

    Files are UTF-8; a byte-order mark (Excel's "CSV UTF-8" writes one) is dropped, not read as part of the
    first sample or header name.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".txt":
        # lines end at "\n" ("\r\n" too), not at every separator str.splitlines() knows (U+2028, form feed, ...)
        return [line.strip() for line in p.read_text(encoding="utf-8-sig").split("\n") if line.strip()]
    if suffix in (".tsv", ".csv"):
        reader = table_reader(p.read_text(encoding="utf-8-sig"), suffix)  # as finetune --data reads it
        try:
            header = next((row for row in reader if any(cell.strip() for cell in row)), None)  # blank lines: none
            if header is None:
                raise ValueError(f"{p}: the file is empty")
            col = _pick_column(header, p)
            return [row[col] for row in reader if len(row) > col and row[col].strip()]
        except csv.Error as e:  # e.g. a field over csv.field_size_limit(): not a ValueError, so not a one-line error
            raise ValueError(f"{p}, line {reader.line_num}: {e}") from None
    if suffix == ".jsonl":
        texts = []
        with open(p, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}, line {n}: not valid JSON ({e.msg})") from None
                key = next((k for k in TEXT_COLUMNS if isinstance(record, dict) and k in record), None)
                if key is None:
                    raise ValueError(f"{p}, line {n}: a record needs a {' or '.join(TEXT_COLUMNS)!r} key")
                if not isinstance(record[key], str):  # str() made null "None" and a list its repr
                    raise ValueError(f"{p}, line {n}: {key!r} must be a string, got {type(record[key]).__name__}")
                if record[key].strip():  # a blank text is skipped, as a blank line of a .txt is
                    texts.append(record[key])
        return texts
    raise ValueError(f"{p}: unknown text format {suffix!r} (use .txt, .tsv, .csv or .jsonl)")


@dataclass
class CalibrationData:
    """Which calibration data, and how much of it: the arguments of :func:`calibration_batches`.

    ``source`` is a string (a file, a folder, or a name the caller resolves, such as
    ``finetune --calibrate train``); the other fields are also flags of ``han-surgery hanify`` and
    ``finetune``, prefixed (``num_samples`` -> ``--calibration-num-samples``).
    """

    source: str = field(metadata={"cli": False, "help": "the calibration data (--calibrate DATA)"})
    num_samples: int = field(default=2048, metadata={"help": "calibration samples drawn at random"})
    batch_size: int = field(default=32, metadata={"help": "calibration samples per batch"})
    max_length: int = field(default=128, metadata={"help": "text: tokens per calibration sample at most"})

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"CalibrationData.source: give a non-empty string, got {self.source!r}")
        for name in ("num_samples", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CalibrationData.{name} must be an int >= 1, got {value!r}")


def calibration_batches(
    source: str | Path | Sequence[Any] | Dataset[Any],
    *,
    tokenizer: Any = None,
    num_samples: int = 2048,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
) -> list[Any]:
    """Calibration batches from a text file or a dataset (see the module docstring).

    Args:
        source: a text file, or a map-style dataset (a ``Dataset`` with ``__len__``, or a list) of inputs or
            ``(input, label)`` pairs.
        tokenizer: a transformers tokenizer; required for text.
        num_samples: samples drawn at random (all of them if the file has fewer).
        batch_size: samples per batch.
        max_length: text: tokens per sample at most (longer samples are truncated).
        seed: which samples are drawn.

    Returns:
        A list of batches: dicts of tensors (text) or stacked input tensors (a dataset).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ValueError: not a text file, no text column, no tokenizer for text, no samples, or a dataset without
            ``__len__`` (an ``IterableDataset``).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"calibration_batches: num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}"
        )
    rng = random.Random(seed)
    if not isinstance(source, (str, Path)):
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise ValueError(
                f"calibration_batches: {type(source).__name__} is not a map-style dataset (no __len__ or "
                "__getitem__); pass a text file, a Dataset with __len__, or a list of samples. Model inputs already "
                "batched (any iterable) go straight to hanify(model, calibration=...)"
            )
        if len(source) == 0:
            raise ValueError("calibration_batches: the dataset is empty")
        index = sorted(rng.sample(range(len(source)), min(num_samples, len(source))))

        def sample(i: int) -> Any:
            item = source[i]
            return item[0] if isinstance(item, (tuple, list)) else item

        if isinstance(sample(index[0]), str):
            if tokenizer is None:
                raise ValueError("calibration_batches: the dataset holds text: pass tokenizer=")
            return _tokenize([sample(i) for i in index], tokenizer, batch_size, max_length)
        # batch by batch: a dataset that decodes images on access holds one batch of samples beside the stacked ones
        return [torch.stack([sample(i) for i in index[j : j + batch_size]]) for j in range(0, len(index), batch_size)]
    p = Path(source).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"calibration data {source}: no such file or folder")
    if p.is_dir() or p.suffix.lower() not in (".txt", ".tsv", ".csv", ".jsonl"):
        raise ValueError(
            f"calibration data {p}: not a text file (.txt, .tsv, .csv, .jsonl). For images, pass the dataset: "
            "calibration_batches(han_surgery.finetune.load_data(path).train)"
        )
    texts = read_texts(p)
    if not texts:
        raise ValueError(f"calibration data {p}: no text samples")
    if tokenizer is None:
        raise ValueError(f"calibration data {p} is text: pass tokenizer= (e.g. AutoTokenizer.from_pretrained(...))")
    return _tokenize(rng.sample(texts, min(num_samples, len(texts))), tokenizer, batch_size, max_length)


def with_decoder_inputs(batches: list[Any], model: Any) -> list[Any]:
    """For an encoder-decoder transformers model (T5, BART, ...): each batch of ``input_ids`` also gets
    ``decoder_input_ids``, the same tokens shifted right behind the decoder's start token (and a
    ``decoder_attention_mask`` shifted alike), so that the decoder's FFNs see the text too: T5 raises without
    them. Other models, and batches that carry decoder inputs or no ``input_ids``, are returned as they are.

    ``input_ids`` ``(B, L)`` -> ``decoder_input_ids`` ``(B, L)`` = ``[start, ids[:, :-1]]``.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return batches
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None) or 0
    out = []
    for batch in batches:
        if not isinstance(batch, dict) or "input_ids" not in batch or "decoder_input_ids" in batch:
            out.append(batch)
            continue
        ids = batch["input_ids"]
        shifted = {"decoder_input_ids": torch.cat([ids.new_full((ids.shape[0], 1), start), ids[:, :-1]], 1)}
        if "attention_mask" in batch:
            mask = batch["attention_mask"]
            shifted["decoder_attention_mask"] = torch.cat([mask.new_ones((mask.shape[0], 1)), mask[:, :-1]], 1)
        out.append({**batch, **shifted})
    return out


def fallback_pad_token(tokenizer: Any) -> str | None:
    """The token to pad with when ``tokenizer`` has no pad token (GPT-2's, LLaMA's): its end-of-text token, else its
    unknown token; ``None`` when it has a pad token.

    Raises:
        ValueError: it has no pad, end-of-text or unknown token.
    """
    if getattr(tokenizer, "pad_token", "") is not None:
        return None
    filler = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
    if filler is None:
        raise ValueError(
            "the tokenizer has no pad, end-of-text or unknown token to pad the batches with; set "
            "tokenizer.pad_token, or give batch_size=1"
        )
    return filler


@contextmanager
def padding_tokens(tokenizer: Any) -> Iterator[Any]:
    """``tokenizer``, able to pad inside the ``with``: one without a pad token pads with
    :func:`fallback_pad_token`'s token, set for the ``with`` only (the caller's tokenizer is left as it was). The
    attention mask keeps the padding out of a model's attention either way."""
    filler = fallback_pad_token(tokenizer)
    if filler is not None:
        tokenizer.pad_token = filler
    try:
        yield tokenizer
    finally:
        if filler is not None:
            tokenizer.pad_token = None


def _tokenize(texts: list[str], tokenizer: Any, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Batches of ``tokenizer`` output, the texts sorted by length first (little padding); a tokenizer without a
    pad token pads as :func:`padding_tokens` says.

    Raises:
        ValueError: ``max_length`` leaves no token for text once the tokenizer's special tokens are added (below
            their count the tokenizer truncates nothing), or exceeds the tokenizer's ``model_max_length``.
    """
    special = tokenizer.num_special_tokens_to_add() if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    if max_length <= special:
        raise ValueError(
            f"max_length={max_length} leaves no room for text: the tokenizer adds {special} special tokens to every "
            f"sample; give max_length > {special}"
        )
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 10**6 and max_length > limit:  # 10**30 or so: the tokenizer does not know
        raise ValueError(f"max_length={max_length} exceeds the tokenizer's model_max_length {limit}")
    texts = sorted(texts, key=len)
    with padding_tokens(tokenizer):
        return [
            dict(
                tokenizer(
                    texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
                )
            )
            for i in range(0, len(texts), batch_size)
        ]
