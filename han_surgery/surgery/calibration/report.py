"""``CalibrationReport``: per block, how well the fitted Han-block reproduces the original, next to three baselines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ...utils import format_table

__all__ = ["BlockFit", "CalibrationReport"]


@dataclass
class BlockFit:
    """The calibration of one rewrite.

    The four fractions of variance unexplained (FVU) are of the block's output
    as the rest of the network sees it (after the post-norm in post-norm
    models, the FFN branch in pre-norm ones), on held-out sampled tokens whose
    inputs come from the already-calibrated blocks before it:

    Attributes:
        path: the rewritten FFN (as in :class:`~han_surgery.RewriteRecord`).
        status: ``"fitted"``, ``"kept"`` (the original block stays: see ``reason``)
            or ``"not calibrated"`` (replaced, not fitted: see ``reason``, which after healing also says whether
            healing trained it; it can only where a hidden state it feeds is distilled).
        fvu: the fitted Han-block.
        deleted: the FFN's output set to 0.
        mean: the FFN replaced by its mean output.
        linear: the best dense ``d x d`` linear map + bias (least squares; ``None``
            above 4096 features).
        tokens: token rows sampled for the fit (and held out for scoring).
        output_fvu: with ``CalibrationConfig(keep_by="output")``, the FVU of the hidden state after
            the last rewritten block (against the original model's, on the recording batches)
            right after this block was swapped in, with the blocks before it as decided and the
            ones after it still original; a kept block is scored before it is put back, and a
            block left uncalibrated is scored too (the next block's rise starts from there).
        params_original, params_han: parameters of the replaced modules and of their replacements.
        reason: why it was kept or not calibrated.
    """

    path: str
    status: str
    fvu: float | None = None
    deleted: float | None = None
    mean: float | None = None
    linear: float | None = None
    tokens: int = 0
    output_fvu: float | None = None
    params_original: int = 0
    params_han: int = 0
    reason: str = ""


@dataclass
class CalibrationReport:
    """What calibrated surgery did (``print`` it for a table).

    Attributes:
        blocks: one :class:`BlockFit` per candidate rewrite, in model order.
        heal_steps: end-to-end distillation steps run.
        heal_batches: calibration batches healing cycled through.
        heal_loss: the distillation loss (mean over blocks of the hidden-state MSE
            divided by the original's variance) on the healing batches (the first
            ``heal_steps`` of them, if fewer), before the first step and after the last.
        seconds: wall time of the calibration (recording, fitting, healing).
        batches: calibration batches given.
    """

    blocks: list[BlockFit] = field(default_factory=list)
    heal_steps: int = 0
    heal_batches: int = 0
    heal_loss: tuple[float, float] | None = None
    seconds: float = 0.0
    batches: int = 0

    @property
    def kept(self) -> list[BlockFit]:
        """The blocks whose original FFN was kept."""
        return [b for b in self.blocks if b.status == "kept"]

    def output_rises(self) -> list[float | None]:
        """Per block, in model order: how much swapping it in raised ``output_fvu``, the last hidden
        state's FVU (``keep_by="output"``); ``None`` where it was not scored (``keep_by="block"``, or a
        block ``keep_count`` kept unfitted). A block kept by ``max_fvu`` shows the rise it would have
        caused; the next block's rise starts from the FVU before it.
        """
        rises: list[float | None] = []
        running = 0.0
        for b in self.blocks:
            if b.output_fvu is None:
                rises.append(None)
                continue
            rises.append(b.output_fvu - running)
            if b.status != "kept":
                running = b.output_fvu
        return rises

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None else "n/a" if v != v else f"{v:.3f}"

        output = any(b.output_fvu is not None for b in self.blocks)
        rows = [
            [b.path, b.status, f(b.fvu), f(b.deleted), f(b.mean), f(b.linear)]
            + ([f(b.output_fvu)] if output else [])
            + [f"{b.tokens:,}", b.reason]
            for b in self.blocks
        ]
        head = ["path", "status", "Han fit", "deleted", "mean", "linear"] + (["last state"] if output else [])
        lines = [
            "CalibrationReport: fraction of each block's output variance unexplained (held-out tokens)"
            + ("; 'last state': of the hidden state after the last rewritten block" if output else ""),
            format_table(head + ["tokens", "note"], rows),
        ]
        fitted = sum(b.status == "fitted" for b in self.blocks)
        tail = f"\n{fitted} fitted, {len(self.kept)} kept, {len(self.blocks) - fitted - len(self.kept)} not calibrated"
        tail += f"; {self.batches} calibration batches; {self.seconds:.1f} s"
        if self.heal_steps:
            a, b = self.heal_loss or (float("nan"), float("nan"))
            tail += (
                f"; healing: {self.heal_steps} steps over {self.heal_batches} batches, "
                f"hidden-state loss {a:.4f} -> {b:.4f}"
            )
        lines.append(tail)
        return "\n".join(lines)
