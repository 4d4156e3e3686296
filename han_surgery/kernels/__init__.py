"""Compiled kernels for the Householder layers, chosen automatically by :mod:`han_surgery.functional`.

* CPU: a C++/OpenMP kernel (:mod:`.cpu`, ``householder_cpu.cpp``) that applies a whole chain of
  Householder layers in one pass over memory. Built on first use, never at import time.
* CUDA: Triton kernels (:mod:`.triton_gpu`), used when ``triton`` is installed.

Without them (no compiler, no Triton, ``torch.compile``/``torch.export`` tracing, or
:func:`disabled`), the layers run their PyTorch implementation, which computes the same function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["enabled", "disabled"]

_enabled = True


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
