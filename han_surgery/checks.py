"""Field checks shared by the config dataclasses (``HanConfig``, ``CalibrationConfig``, ``FinetuneConfig``).

Each raises a :class:`~han_surgery.errors.ConfigError` that names the field (``name``: ``"HanConfig.dropout"``,
or a flag, ``"--lr"``) and the values it takes. ``bool`` is never taken for a number (it is an ``int``
subclass: ``reflections=True`` is a mistake, not 1), and neither is a string that looks like one.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from .errors import ConfigError

__all__ = [
    "check_bool",
    "check_int",
    "check_number",
    "MAX_NUM_CLASSES",
    "positive_int",
    "int_at_least",
    "positive_float",
    "non_negative_float",
    "SEED_LIMIT",
    "seed_arg",
]

#: The most classes a classifier may have (``--num-classes``, or the labels of ``finetune --data``): a classifier
#: this wide is already gigabytes, and a larger count is a mistake (a stray label, an id instead of a class index).
MAX_NUM_CLASSES = 1_000_000


def _none_or(optional: bool) -> str:
    return "None or " if optional else ""


def check_int(
    name: str, value: Any, low: int | None = None, *, high: int | None = None, optional: bool = False
) -> None:
    """``value`` is an ``int`` (not a ``bool``) ``>= low`` and ``<= high`` (or ``None``, with ``optional``)."""
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bound = f" >= {low}" if low is not None else ""
        if high is not None:
            bound = f" in [{low}, {high}]" if low is not None else f" <= {high}"
        raise ConfigError(f"{name} must be {_none_or(optional)}an int{bound}, got {value!r}")


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_closed: bool = False,
    optional: bool = False,
) -> None:
    """``value`` is an ``int`` or ``float`` (not a ``bool``, not NaN) in the interval from ``low`` to ``high``
    (open or closed at each end; ``high=inf, high_closed=True`` also takes infinity), or ``None`` with ``optional``."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:  # NaN fails every comparison
        ok = (value > low if low_open else value >= low) and (value <= high if high_closed else value < high)
    if not ok:
        finite = "" if high_closed and high == math.inf else "finite "
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if high_closed else ')'}"
        raise ConfigError(f"{name} must be {_none_or(optional)}a {finite}number in {bound}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


# ``argparse`` types: a bad value becomes the parser's one-line usage error, never a traceback from deep inside.
def _int_from(text: str, low: int, what: str, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    if value >= 2**63:  # beyond int64 every torch call that takes it overflows
        raise argparse.ArgumentTypeError(f"expected {what} below 2**63, got {text}")
    return value


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    return _int_from(text, 1, "a positive integer")


#: The most threads ``--threads`` takes: far beyond any machine's cores, and below what OpenMP cannot allocate
#: (``--threads 100000`` aborted in libgomp; 10**11 overflowed in ``torch.set_num_threads``).
MAX_THREADS = 1024


def thread_count(text: str) -> int:
    """``argparse`` type: a ``torch.set_num_threads`` count, an integer in ``[1, MAX_THREADS]``."""
    return _int_from(text, 1, f"a thread count in [1, {MAX_THREADS}]", high=MAX_THREADS)


def int_at_least(low: int) -> Callable[[str], int]:
    """``argparse`` type: an integer >= ``low`` (a step count that may be 0: ``int_at_least(0)``)."""
    return lambda text: _int_from(text, low, f"an integer >= {low}")


def _finite_float(text: str, low: float, low_open: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or (value <= low if low_open else value < low):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_float(text: str) -> float:
    """``argparse`` type: a finite number > 0 (a learning rate)."""
    return _finite_float(text, 0.0, True, "a positive number")


def non_negative_float(text: str) -> float:
    """``argparse`` type: a finite number >= 0 (a weight decay, a penalty weight)."""
    return _finite_float(text, 0.0, False, "a number >= 0")


#: ``--seed`` takes ``0 <= seed < SEED_LIMIT``: torch's generators take a (signed) 64-bit integer.
SEED_LIMIT = 2**63


def seed_arg(text: str) -> int:
    """``argparse`` type of ``--seed``: an integer in ``[0, 2**63)`` (a larger one overflowed in ``torch.manual_seed``).

    An experiment that seeds with ``seed + offset`` also checks that sum (``approximation``: ``seed + 1000 d``).
    """
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
    return value
