"""``han-surgery demo``: the whole story in under two minutes on two CPU cores, no download.

The demo is a list of steps (:data:`DEMO_STEPS`), one module each; each step prints one section.
Steps only use what ships inside the package, or generate their data.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .finetune import step_finetune
from .layer import step_layer_properties, step_layer_speed
from .surgery import step_surgery_minilm

__all__ = ["DEMO_STEPS", "run_demo"]

DEMO_STEPS: list[Callable[[], None]] = [step_layer_properties, step_layer_speed, step_surgery_minilm, step_finetune]


def run_demo(steps: list[Callable[[], None]] | None = None) -> None:
    """Run the demo steps (default: all of :data:`DEMO_STEPS`) and print how long it took."""
    start = time.perf_counter()
    print(f"han-surgery demo (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    for step in steps if steps is not None else DEMO_STEPS:
        step()
    print(f"\nDemo finished in {time.perf_counter() - start:.1f} s.")
