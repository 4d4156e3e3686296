"""Compiled kernels for the Householder layers, chosen automatically by :mod:`han_surgery.functional`.

* CPU: a C++/OpenMP kernel (:mod:`.cpu`, ``householder_cpu.cpp``) that applies a whole chain of
  Householder layers in one pass over memory. Built on first use, never at import time.
* CUDA: Triton kernels (:mod:`.triton_gpu`), used when ``triton`` is installed.
* :mod:`.flops`: FLOP formulas of the CPU kernel's operators, so that
  :class:`torch.utils.flop_counter.FlopCounterMode` counts them as it counts the PyTorch implementation
  (the Triton kernels are not counted: count CUDA models inside :func:`disabled`).

Without them (no compiler, no Triton, ``torch.compile``/``torch.export`` tracing, or
:func:`disabled`), the layers run their PyTorch implementation, which computes the same function.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import ModuleType

__all__ = ["enabled", "disabled", "triton_kernels"]

logger = logging.getLogger(__name__)

_enabled = True
_triton: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    """Whether :mod:`han_surgery.functional` may use the compiled kernels (``True`` unless inside :func:`disabled`)."""
    return _enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the PyTorch implementation of the layers inside this block (for tests and side-by-side benchmarks)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def triton_kernels() -> ModuleType | None:
    """:mod:`han_surgery.kernels.triton_gpu`, or ``None`` (after one warning) when Triton cannot be imported."""
    if "module" not in _triton:
        try:
            from . import triton_gpu

            _triton["module"] = triton_gpu
        except Exception as exc:  # not installed, or no usable backend
            logger.warning(
                "han_surgery: Triton is unavailable (%s: %s); CUDA Householder layers use their PyTorch implementation",
                type(exc).__name__,
                exc,
            )
            _triton["module"] = None
    return _triton["module"]
