"""What every command shares: one-line errors with exit code 2, and argparse types."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from ..checks import MAX_NUM_CLASSES, positive_int
from ..dataclass_cli import construct, flag_errors
from ..errors import ConfigError, HanSurgeryError
from ..surgery.config import HanConfig
from ._calibration import calibration_flag_errors

__all__ = [
    "run_command",
    "han_config",
    "surgery_flag_errors",
    "require_text",
    "positive_int",
    "num_classes",
    "EXIT_USER_ERROR",
    "MAX_NUM_CLASSES",
]

EXIT_USER_ERROR = 2


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run ``body``; a :class:`HanSurgeryError` becomes ``<prog>: <message>`` (one line) and exit code 2.

    So does an error by which the machine refuses (a full disk, a read-only or forbidden path:
    :func:`machine_refusal`). Warnings print as one line each, ``<prog>: warning: <message>``. Other exceptions
    propagate with their traceback: they are bugs.
    """

    def show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    try:
        with warnings.catch_warnings(), _terminate_like_interrupt():
            warnings.showwarning = show_warning
            return int(body() or 0)
    except HanSurgeryError as e:
        message = " ".join(str(e).split())
        print(f"{prog}: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        message = machine_refusal(e)
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


#: ``errno`` codes by which the machine, not the program, refuses: a full disk or quota, a read-only or forbidden path.
MACHINE_REFUSALS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "check the path's permissions or write elsewhere",
    errno.EACCES: "check the path's permissions or write elsewhere",
    errno.EPERM: "check the path's permissions or write elsewhere",
}
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports one
#: How torch reports an allocation the machine refused: its CPU allocator, and CUDA (``torch.OutOfMemoryError``).
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory", re.I)


def machine_refusal(e: BaseException) -> str | None:
    """One line for an error of :data:`MACHINE_REFUSALS` (``No space left on device (<path>): free some space or
    write elsewhere``): an ``OSError``, or safetensors' ``SafetensorError`` that wraps one (``... (os error 28)``);
    or for memory the machine would not give (``MemoryError``, torch's allocators' ``RuntimeError``: sizes asked
    for beyond the machine, as ``--seeds 10**12``); ``None`` for any other exception (a bug: it keeps its
    traceback). Whatever the command had written is cleaned up on the way out, as for any failure."""
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _OUT_OF_MEMORY.search(str(e))):
        said = " ".join(str(e).split()[:40]) or type(e).__name__
        return f"out of memory ({said}): lower the sizes asked for (batch size, widths, samples, seeds) or free memory"
    code = e.errno if isinstance(e, OSError) else None
    if code is None and type(e).__name__ == "SafetensorError":
        found = _OS_ERROR_CODE.search(str(e))
        code = int(found.group(1)) if found else None
    if code not in MACHINE_REFUSALS:
        return None
    where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
    return f"{os.strerror(code)}{where}: {MACHINE_REFUSALS[code]}"


#: Arguments :func:`require_text` names without dashes.
POSITIONAL = frozenset({"source", "directory", "repo_id"})


def require_text(**values: str | None) -> None:
    """Refuse an empty (or blank) value of a path or name argument, named by its option (keyword ``out_dir``:
    ``--out-dir``; ``source``: ``source``): as a path, ``""`` would silently mean the current directory."""
    for name, value in values.items():
        if value is not None and not value.strip():
            option = f"--{name.replace('_', '-')}" if name not in POSITIONAL else name
            raise ConfigError(f"{option}: give a non-empty string")


def han_config(kwargs: dict[str, Any]) -> HanConfig:
    """The :class:`HanConfig` the surgery flags give, its ``--rules`` checked against the registered rules before
    any work; its errors name the flags (``--reflections``, ``--rules``), not the fields."""
    from ..surgery.registry import resolve_rules

    config = construct(HanConfig, kwargs)
    with flag_errors(HanConfig):
        resolve_rules(config.rules)
    return config


@contextlib.contextmanager
def surgery_flag_errors() -> Iterator[None]:
    """Around the surgery a command runs (``hanify``, calibrated or not): its errors that name a field of
    :class:`HanConfig`, ``CalibrationData`` or ``CalibrationConfig`` (``HanConfig.include``,
    ``CalibrationConfig.keep_by='output'``) name the flag instead (``--include``, ``--calibration-keep-by output``;
    see :func:`~han_surgery.dataclass_cli.flag_errors`)."""
    with flag_errors(HanConfig), calibration_flag_errors():
        yield


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler's preemption), raised where the command runs, so that its
    clean-up runs as for Ctrl-C: an unfinished output folder without a checkpoint is removed, locks released."""


@contextlib.contextmanager
def _terminate_like_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the command runs (main thread only; the previous handler is
    restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def num_classes(text: str) -> int:
    """``argparse`` type: a classifier size, 1 to :data:`MAX_NUM_CLASSES`."""
    try:
        too_many = int(text) > MAX_NUM_CLASSES
    except ValueError:
        too_many = False  # positive_int says it
    if too_many:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_NUM_CLASSES:,} classes, got {text}")
    return positive_int(text)
