"""Small helpers shared across the package: parameter counts, plain-text tables, and telling a transformers model."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["count_parameters", "format_table", "is_transformers_model"]


def is_transformers_model(module: nn.Module) -> bool:
    """``True`` if ``module`` is a transformers ``PreTrainedModel``, checked without importing transformers'
    modeling code: none can exist before ``transformers.modeling_utils`` is imported, and importing it (with
    accelerate) costs a timm user about a second and 44 MB."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return modeling_utils is not None and isinstance(module, modeling_utils.PreTrainedModel)


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
