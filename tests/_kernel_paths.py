"""The ``kernel_path`` fixture: run a test on each implementation of the Householder layers.

``"kernel"``: the compiled CPU kernel (``han_surgery/kernels/householder_cpu.cpp``), built on
first use; a build failure fails the test, unless ``HAN_SURGERY_CPU_KERNEL=0`` is set, which
skips it. ``"torch"``: the PyTorch implementation (``han_surgery.kernels.disabled()``).
"""

from __future__ import annotations

import os

import pytest

from han_surgery import kernels
from han_surgery.kernels import cpu


@pytest.fixture(params=["kernel", "torch"])
def kernel_path(request):
    if request.param == "torch":
        with kernels.disabled():
            yield "torch"
        return
    if os.environ.get(cpu.ENV_VAR) == "0":
        pytest.skip(f"{cpu.ENV_VAR}=0: the CPU kernel is switched off")
    assert cpu.available(), "the CPU kernel did not build (see the log); set HAN_SURGERY_CPU_KERNEL=0 to skip"
    yield "kernel"
