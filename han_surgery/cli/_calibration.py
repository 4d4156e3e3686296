"""The calibration flags of ``hanify`` and ``finetune``: ``--calibrate DATA`` and the ``--calibration-*`` options.

``--calibration-<field>`` is derived from each field of
:class:`~han_surgery.surgery.calibration.CalibrationData` (how many samples, per batch, of what length)
and of :class:`~han_surgery.surgery.calibration.CalibrationConfig` (how the blocks are fitted), so a
new field is a new flag with no edit here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Iterator

from ..dataclass_cli import add_dataclass_arguments, construct, dataclass_kwargs, flag_errors, flag_name
from ..errors import ConfigError
from ..surgery.calibration.config import FLAG_PREFIX, CalibrationConfig
from ..surgery.calibration.data import CalibrationData

__all__ = ["CALIBRATION", "add_calibration_arguments", "calibration_from_args", "calibration_flag_errors"]

CALIBRATION = "calibrated surgery (with --calibrate; see docs/CALIBRATION.md)"
_DATA_DEST, _FIT_DEST = "calibration_data.", "calibration."
_DATA_FLAGS = {"source": "--calibrate"}  # CalibrationData's field whose flag is not --calibration-<name>


def add_calibration_arguments(parser: argparse.ArgumentParser, *, data_help: str) -> None:
    """Add ``--calibrate DATA`` (described by ``data_help``) and the ``--calibration-*`` flags, in their own group."""
    group = parser.add_argument_group(CALIBRATION)
    group.add_argument("--calibrate", metavar="DATA", default=None, help=data_help)
    add_dataclass_arguments(group, CalibrationData, dest_prefix=_DATA_DEST, flag_prefix=FLAG_PREFIX)
    add_dataclass_arguments(group, CalibrationConfig, dest_prefix=_FIT_DEST, flag_prefix=FLAG_PREFIX)


def calibration_from_args(args: argparse.Namespace) -> tuple[CalibrationData | None, CalibrationConfig | None]:
    """``(CalibrationData, CalibrationConfig)`` from the parsed flags, or ``(None, None)`` without ``--calibrate``.

    Raises:
        ConfigError: a ``--calibration-*`` flag without ``--calibrate``, or an invalid value.
    """
    data_kwargs = dataclass_kwargs(args, CalibrationData, dest_prefix=_DATA_DEST)
    fit_kwargs = dataclass_kwargs(args, CalibrationConfig, dest_prefix=_FIT_DEST)
    if args.calibrate is None:
        if data_kwargs or fit_kwargs:
            given = [
                flag_name(f, FLAG_PREFIX)
                for cls, kwargs in ((CalibrationData, data_kwargs), (CalibrationConfig, fit_kwargs))
                for f in dataclasses.fields(cls)
                if f.name in kwargs
            ]
            raise ConfigError(f"{', '.join(given)} configure calibrated surgery: add --calibrate DATA")
        return None, None
    data = construct(
        CalibrationData, {"source": args.calibrate, **data_kwargs}, flag_prefix=FLAG_PREFIX, flags=_DATA_FLAGS
    )
    return data, construct(CalibrationConfig, fit_kwargs, flag_prefix=FLAG_PREFIX)


@contextlib.contextmanager
def calibration_flag_errors() -> Iterator[None]:
    """An error raised inside that names a field of :class:`CalibrationData` or :class:`CalibrationConfig`
    (``CalibrationConfig.heal_lr``) names its flag instead (``--calibration-heal-lr``; see
    :func:`~han_surgery.dataclass_cli.flag_errors`)."""
    with (
        flag_errors(CalibrationData, flag_prefix=FLAG_PREFIX, flags=_DATA_FLAGS),
        flag_errors(CalibrationConfig, flag_prefix=FLAG_PREFIX),
    ):
        yield
