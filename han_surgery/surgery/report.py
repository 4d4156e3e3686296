"""``HanifyReport``: what :func:`han_surgery.hanify` rewrote, what it skipped and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..utils import format_table
from .calibration.report import CalibrationReport

__all__ = ["HanifyReport", "RewriteRecord", "SkipRecord", "KEPT_BY_CALIBRATION"]

#: How a :class:`SkipRecord`'s reason starts when calibration kept the original block (``max_fvu`` and friends).
KEPT_BY_CALIBRATION = "kept by calibration"


@dataclass
class RewriteRecord:
    """One rewritten FFN.

    Attributes:
        path: qualified name of the FFN (the candidate).
        rule: name of the rule that rewrote it.
        params_before: parameters of the modules it replaced (FFN and neighbours).
        params_after: parameters of their replacements.
        swapped: every qualified name whose module was replaced.
        neighbours: what happened to the pre-norm and the residual, in words.
        stream: the module whose output is the hidden state right after this block
            (e.g. the transformer layer holding the FFN), when the rule knows it: the
            module to hook for hidden-state distillation (same name in the original model).
    """

    path: str
    rule: str
    params_before: int
    params_after: int
    swapped: list[str] = field(default_factory=list)
    neighbours: dict[str, str] = field(default_factory=dict)
    stream: str | None = None


@dataclass
class SkipRecord:
    """A candidate that was seen but left alone, with the reason."""

    path: str
    rule: str
    reason: str


@dataclass
class HanifyReport:
    """The result of :func:`han_surgery.hanify` (``print(report)`` shows a table).

    Attributes:
        rewrites: one :class:`RewriteRecord` per rewritten FFN, in model order.
        skipped: one :class:`SkipRecord` per candidate left alone.
        params_before, params_after: parameter totals of the whole model
            (``params_after`` is what the model has, or would have for a dry run).
        dry_run: ``True`` if the model was not touched.
        han_modules_found: Han modules already in the model before the call
            (non-zero on a second call, which then rewrites nothing).
        calibration: with ``hanify(..., calibration=...)``, the per-block fit
            (:class:`~han_surgery.surgery.calibration.CalibrationReport`); blocks it
            kept as original are listed in ``skipped``.
    """

    rewrites: list[RewriteRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    dry_run: bool = False
    han_modules_found: int = 0
    calibration: CalibrationReport | None = None

    @property
    def num_rewritten(self) -> int:
        return len(self.rewrites)

    @property
    def reduction(self) -> float:
        """``params_before / params_after`` (1.0 if nothing changed)."""
        return self.params_before / self.params_after if self.params_after else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        head = "HanifyReport (dry run: model unchanged)" if self.dry_run else "HanifyReport"
        lines = [head]
        if self.rewrites:
            rows = [
                [
                    r.path,
                    r.rule,
                    f"{r.params_before:,}",
                    f"{r.params_after:,}",
                    "; ".join(f"{k}: {v}" for k, v in r.neighbours.items()),
                ]
                for r in self.rewrites
            ]
            lines.append(format_table(["path", "rule", "params before", "params after", "neighbours"], rows))
        else:
            lines.append(
                "no block rewritten"
                + (f" ({self.han_modules_found} Han modules already present)" if self.han_modules_found else "")
            )
        if self.skipped:
            lines.append(f"\nskipped ({len(self.skipped)}):")
            lines.append(format_table(["path", "rule", "reason"], [[s.path, s.rule, s.reason] for s in self.skipped]))
        verb = "would have" if self.dry_run else "has"
        done = "would be rewritten" if self.dry_run else "rewritten"  # the dry run (inspect) changes nothing
        lines.append(
            f"\n{len(self.rewrites)} block(s) {done}; model parameters {self.params_before:,} -> "
            f"{self.params_after:,} ({verb} {self.params_after / max(self.params_before, 1):.1%} of before)"
            + (f"; {self.han_modules_found} Han modules were already present" if self.han_modules_found else "")
        )
        if self.calibration is not None:
            lines.append("\n" + str(self.calibration))
        return "\n".join(lines)
