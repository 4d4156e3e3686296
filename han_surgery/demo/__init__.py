"""``han-surgery demo``: the whole story in under two minutes on two CPU cores, no download.

One module per section: :mod:`.checkerboard` (the paper's headline, trained live),
:mod:`.surgery` (plain vs calibrated hanify of MiniLM), :mod:`.finetune` (a real fine-tune
subprocess on bundled MNIST), :mod:`.layer` (properties and speed of the layer).
Steps only use what ships inside the package, or generate their data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..kernels import cpu as cpu_kernel
from .checkerboard import board_file_problem, step_checkerboard
from .finetune import step_finetune
from .layer import step_layer_properties, step_layer_speed
from .surgery import step_surgery_minilm

__all__ = ["run_demo"]


def run_demo(fast: bool = False, out_dir: str | Path = ".") -> dict[str, Any]:
    """Run every section; ``fast`` shortens training. Returns each section's key figures.

    Raises:
        ConfigError: ``out_dir`` holds a ``checkerboard.png`` the demo did not write (checked before any work).
    """
    problem = board_file_problem(out_dir)
    if problem:
        raise ConfigError(problem)
    start = time.perf_counter()
    print(f"han-surgery demo (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    results: dict[str, Any] = {}
    print("CPU kernel: loading (compiled on first use, about a minute, then cached) ...", end=" ", flush=True)
    kernel_start = time.perf_counter()
    ready = cpu_kernel.available()
    print(
        f"{'ready' if ready else 'not available, using the PyTorch path'} ({time.perf_counter() - kernel_start:.1f} s)"
    )
    step_layer_properties()
    results["checkerboard"] = step_checkerboard(fast=fast, out_dir=out_dir)
    results["surgery"] = step_surgery_minilm()
    results["finetune"] = step_finetune(fast=fast)
    results["speed"] = step_layer_speed(rounds=3 if fast else 7)
    print(f"\nDemo finished in {time.perf_counter() - start:.1f} s.")
    return results
