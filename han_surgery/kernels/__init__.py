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
import contextvars
import logging
from collections.abc import Iterator
from types import ModuleType

__all__ = ["enabled", "disabled", "triton_kernels"]

logger = logging.getLogger(__name__)

# How many disabled() blocks the current thread (or asyncio task) is inside: a context variable, so that one
# thread's block neither switches the kernels off for the others nor, when blocks of two threads overlap
# without nesting, leaves them off for good (a module-wide flag saved and restored did both).
_disabled_depth: contextvars.ContextVar[int] = contextvars.ContextVar("han_surgery_kernels_disabled", default=0)
_triton: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    """Whether :mod:`han_surgery.functional` may use the compiled kernels here (``True`` unless this thread is
    inside :func:`disabled`)."""
    return _disabled_depth.get() == 0


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the PyTorch implementation of the layers inside this block (for tests and side-by-side benchmarks).

    It applies to the thread (or asyncio task) that enters it; other threads keep the kernels."""
    _disabled_depth.set(_disabled_depth.get() + 1)
    try:
        yield
    finally:  # one down, not back to the depth at entry: blocks held open by generators may close out of order
        _disabled_depth.set(_disabled_depth.get() - 1)


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
