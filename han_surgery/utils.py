"""Small helpers shared across the package: parameter counts, plain-text tables, telling a transformers model or a
Han timm architecture, moving parameters on or off the meta device, and an optimizer step that may overflow."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "count_parameters",
    "format_table",
    "is_han_timm_architecture",
    "is_transformers_model",
    "replace_parameters",
    "step_overflows",
]


def is_transformers_model(module: nn.Module) -> bool:
    """``True`` if ``module`` is a transformers ``PreTrainedModel``, checked without importing transformers'
    modeling code: none can exist before ``transformers.modeling_utils`` is imported, and importing it (with
    accelerate) costs a timm user about a second and 44 MB."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return modeling_utils is not None and isinstance(module, modeling_utils.PreTrainedModel)


def is_han_timm_architecture(name: object) -> bool:
    """``True`` if ``name`` is a timm architecture han_surgery registers (``han_mixer_*``, ``han_mobilevit_*``): timm
    knows those names only after ``import han_surgery``, and their models are built of Han-blocks already."""
    import timm.models

    if not isinstance(name, str) or not timm.models.is_model(name):
        return False
    return timm.models.model_entrypoint(name).__module__.startswith(f"{__package__}.")


def replace_parameters(
    module: nn.Module, which: Callable[[nn.Parameter], bool], new: Callable[[nn.Parameter], torch.Tensor]
) -> None:
    """Replace, in place, every parameter of ``module`` for which ``which(p)`` holds by ``nn.Parameter(new(p))``
    (same ``requires_grad``); a parameter shared by several modules (tied weights) is replaced once and stays
    shared. Buffers are left alone: ``Module.to`` / ``to_empty`` move them too, and a buffer's value (a rotary
    embedding's ``inv_freq``, one a rewrite rule computed) is not in a checkpoint when it is not persistent."""
    made: dict[int, nn.Parameter] = {}
    for part in module.modules():
        for name, param in part._parameters.items():
            if param is not None and which(param):
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(new(param), param.requires_grad)
                part._parameters[name] = made[id(param)]


def count_parameters(modules: nn.Module | Iterable[nn.Module], *, trainable_only: bool = False) -> int:
    """Parameters of one module, or of several counted once each (a parameter shared between them counts once).

    Args:
        modules: a module, or an iterable of modules.
        trainable_only: count only parameters with ``requires_grad``.
    """
    if isinstance(modules, nn.Module):
        modules = (modules,)
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            if not trainable_only or p.requires_grad:
                seen[id(p)] = p.numel()
    return sum(seen.values())


def format_table(headers: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A left-aligned plain-text table: a header row, a rule of dashes, then one line per row."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def step_overflows(optimizer: torch.optim.Optimizer) -> bool:
    """Run ``optimizer.step()``; ``True`` when its update overflowed float32 (Adam's step size ``lr / (1 - beta1 **
    t)`` beyond float32's range: a learning rate near 1e38), the step then partly applied. Other errors propagate."""
    try:
        optimizer.step()
    except RuntimeError as err:  # "value cannot be converted to type float without overflow"
        if "overflow" not in str(err):
            raise
        return True
    return False
