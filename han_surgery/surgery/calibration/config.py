"""``CalibrationConfig``: how calibrated surgery fits (not *what* it builds: that is :class:`HanConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ...checks import check_bool, check_int, check_number
from ...errors import ConfigError

__all__ = ["CalibrationConfig", "FLAG_PREFIX"]

#: The command-line flags of :class:`CalibrationConfig` and ``CalibrationData`` are ``--calibration-<field>``.
FLAG_PREFIX = "calibration-"
START = ("linear", "random")
#: The fewest token rows a block's fit may sample (``tokens_per_block``).
MIN_TOKENS = 16
TARGET = ("model", "block")
HEAL_PARAMS = ("new", "all", "all-but-embeddings")
KEEP_BY = ("block", "output")
#: The largest calibration seed: torch's generators take 64 bits, and each block seeds its token sample with
#: seed + index.
MAX_SEED = 2**62


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class CalibrationConfig:
    """Settings of the fit that :func:`han_surgery.hanify` runs when given calibration data.

    The recipe saved with the model records these (never the data). Every field is also a
    flag of ``han-surgery hanify --calibrate`` and ``finetune --calibrate``, prefixed
    (``steps`` -> ``--calibration-steps``; see :mod:`han_surgery.dataclass_cli`). They change
    the fitted weights, not the module structure: the structural options (gain,
    input scale, side-path rank, reflections) live in :class:`HanConfig`.

    Args:
        tokens_per_block: the most token rows sampled (uniformly, reservoir) for
            each block's fit; bounds memory at ``tokens_per_block x d`` floats per
            block whatever the amount of data. At least :data:`MIN_TOKENS`.
        record_batches: calibration batches, drawn at random, run to record each
            block's inputs (``None``: all of them). Recording block ``i`` runs the
            model up to block ``i``, so this bounds the cost of the sequential pass.
        start: where a Han-block's fit starts. ``"linear"``: its Householder path in the
            linear regime (``H2 = H1^T``, ``b1`` above every pre-activation, so the block is
            the diagonal map ``g * x`` plus the side path), whose gain, bias and side path
            have closed forms; ``"random"``: its random initialisation (gain, bias and side
            path still set in closed form).
        target: what each block is fitted to. ``"model"`` (default): what the original
            *model* computes after that block on the same tokens, so that the block
            also undoes what it can of the errors of the blocks before it (one extra
            forward pass over the recording batches); ``"block"``: what the original
            block computes on the inputs the calibrated model gives it (as GPTQ does).
            A block whose input is not the residual stream its output is added to,
            unscaled (a kept pre-norm, a layer scale, ConvNeXt), is fitted to the
            ``"block"`` target either way; the report says so.
        steps: Adam steps per block, after the closed-form start.
        lr: peak learning rate of those steps (cosine decay).
        batch_tokens: token rows per Adam step.
        holdout: fraction of the sampled rows held out to score the fit (the FVU in the report).
        max_fvu: keep the original block where swapping in the fitted Han-block costs more than
            this fraction of variance unexplained, as ``keep_by`` measures it (``None``: replace
            every block).
        keep_by: what ``max_fvu`` is compared with. ``"block"``: the block's own fit (its
            output's FVU on held-out tokens); ``"output"``: how much swapping it in raises the FVU
            of the hidden state after the *last* rewritten block (the original model's as the
            target, on the recording batches, with the blocks decided so far in place). A block's
            own FVU understates what an early block costs: its error reaches every block after it.
            all-MiniLM-L6-v2 (gain, input scale, side rank 32, no healing): own FVU 0.10, 0.23,
            0.33, 0.36, 0.38, 0.53 for blocks 0-5, but the last state's FVU rises by 0.10, 0.13,
            0.12, 0.03, 0.10, 0.03; with two FFNs kept, cosine to the original 0.823 instead of
            0.810, with four 0.924 instead of 0.894 (docs/CALIBRATION.md). ``"output"`` costs one
            more forward pass over the recording batches per block; the report's ``output_fvu``
            column gives the running FVU.
        keep_count: keep exactly this many original blocks, chosen one at a time (``None``:
            ``max_fvu`` decides). A calibration pass on a copy of the model, with the blocks
            chosen so far kept and every other one replaced, measures how much each swap raises
            the last hidden state's FVU (as ``keep_by="output"`` does); the block with the largest
            rise is chosen, and the passes repeat. So the kept sets are nested (the two blocks kept
            by ``keep_count=2`` are among the three of ``keep_count=3``) and every count can be
            asked for, which no ``max_fvu`` threshold guarantees: a kept block changes the rises of
            the blocks after it. Costs ``keep_count`` calibration passes (no healing) before the
            real one. Needs ``keep_by="output"``; not with ``max_fvu`` or ``keep_budget``.
        keep_budget: the most parameters that blocks kept by ``max_fvu`` may cost, in all,
            over their Han replacements (``None``: no limit). Blocks are decided in model
            order; one that does not fit in what is left is replaced (the report says so).
        heal_steps: end-to-end distillation steps after the blockwise fit (0: none):
            the new parameters are trained so that every rewritten block's output
            hidden state matches the original model's (TinyBERT-style MSE).
        heal_lr: peak learning rate of healing.
        heal_params: ``"new"``: healing trains only the new (Han) parameters;
            ``"all"``: also every parameter of the model that was trainable (the
            original weights are then changed too; on failure they are restored);
            ``"all-but-embeddings"``: the same, except the tables of ``nn.Embedding``
            modules (token and position lookups). A calibration set touches only a few
            of a vocabulary's rows, so training the table moves those rows away from the
            ones it never saw, and its optimizer step over the whole table costs as much
            as the rest of a small model's (all-MiniLM-L6-v2, its embedding module frozen, 400 healing steps on two
            threads: the whole ``hanify`` call 82 s instead of 140 s).
        heal_augment: the fraction of tokens replaced, on every other healing step, by random
            tokens of the calibration text (:class:`~han_surgery.surgery.calibration.heal.TokenReplacer`;
            token-id batches only, 0: no augmentation). A copy of the original model, kept
            for the length of healing, computes the targets of those steps, so they cost
            one more forward. With a few thousand sentences, healing starts to fit them;
            these altered sentences make it generalise better (all-MiniLM-L6-v2: held-out
            cosine 0.854 vs 0.838 at about the same time).
        heal_batches: calibration batches, drawn at random, healing cycles through (``None``: all);
            the original model's hidden states on them are computed once and cached.
        heal_memory_mb: the most memory that cache may take; healing uses only as
            many of its (random) batches as fit (the report says how many). ``keep_by="output"``
            caches the original's last hidden state on the recording batches under the same bound.
        seed: seeds the new blocks' random initialisation (torch's generators, for the ``hanify`` call),
            the token sampling, the holdout split and the minibatches: the same seed, model and data give
            the same weights.
        progress: show tqdm progress bars.
    """

    tokens_per_block: int = _field(16384, "token rows sampled per block for its fit (bounds memory)")
    record_batches: int | None = _field(
        16, "calibration batches, drawn at random, run to record each block's inputs ('none': all of them)"
    )
    start: Literal["linear", "random"] = _field(
        "linear", "where each fit starts: the block's linear regime (closed forms) or its random init"
    )
    target: Literal["model", "block"] = _field(
        "model", "fit each block to what the original model computes after it, or to the original block alone"
    )
    steps: int = _field(200, "Adam steps per block after the closed-form start")
    lr: float = _field(1e-2, "peak learning rate of those steps (cosine decay)")
    batch_tokens: int = _field(2048, "token rows per Adam step")
    holdout: float = _field(0.125, "fraction of the sampled rows held out to score each fit")
    max_fvu: float | None = _field(
        None, "keep the original block where the fit leaves more than this fraction of variance unexplained"
    )
    keep_count: int | None = _field(
        None,
        "keep this many original blocks, each chosen by a calibration pass as the one that moves the last "
        "hidden state most (needs --keep-by output)",
    )
    keep_budget: int | None = _field(None, "the most parameters the blocks kept by --max-fvu may cost in all")
    keep_by: Literal["block", "output"] = _field(
        "block", "what --max-fvu is compared with: the block's own fit, or the rise of the last hidden state's FVU"
    )
    heal_steps: int = _field(0, "end-to-end hidden-state distillation steps after the blockwise fit (0: none)")
    heal_lr: float = _field(1e-3, "peak learning rate of healing")
    heal_params: Literal["new", "all", "all-but-embeddings"] = _field(
        "new", "what healing trains: the new (Han) parameters, all, or all but the nn.Embedding tables"
    )
    heal_augment: float = _field(
        0.0, "fraction of tokens replaced by random calibration tokens on every other healing step (0: none)"
    )
    heal_batches: int | None = _field(None, "calibration batches healing cycles through (default: all)")
    heal_memory_mb: float = _field(2048.0, "the most memory the cache of the original model's states may take")
    seed: int = _field(
        0, "seeds the new blocks' init, the sampling of data and tokens, the holdout split and the minibatches"
    )
    progress: bool = _field(True, "show progress bars")

    def __post_init__(self) -> None:
        q = "CalibrationConfig."
        # tokens_per_block: rows to fit on and rows to score the fit on (fewer: a fit of a few rows is noise)
        for name, low in (("tokens_per_block", MIN_TOKENS), ("batch_tokens", 1), ("steps", 0), ("heal_steps", 0)):
            check_int(q + name, getattr(self, name), low)
        for name, low in (("record_batches", 1), ("heal_batches", 1), ("keep_budget", 0), ("keep_count", 0)):
            check_int(q + name, getattr(self, name), low, optional=True)
        check_int(q + "seed", self.seed, 0, high=MAX_SEED)
        for name in ("lr", "heal_lr"):
            check_number(q + name, getattr(self, name), 0.0, low_open=True)
        check_number(q + "heal_memory_mb", self.heal_memory_mb, 0.0, low_open=True, high_closed=True)
        check_number(q + "holdout", self.holdout, 0.0, 1.0, low_open=True)
        check_number(q + "heal_augment", self.heal_augment, 0.0, 1.0)
        check_number(q + "max_fvu", self.max_fvu, 0.0, optional=True)
        check_bool(q + "progress", self.progress)
        for name, choices in (("start", START), ("target", TARGET), ("heal_params", HEAL_PARAMS), ("keep_by", KEEP_BY)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{q}{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.keep_count is not None:
            if self.keep_by != "output":
                raise ConfigError(
                    "CalibrationConfig.keep_count chooses blocks by the rise of the last hidden state's FVU: "
                    "set CalibrationConfig.keep_by='output'"
                )
            if self.max_fvu is not None or self.keep_budget is not None:
                raise ConfigError(
                    "CalibrationConfig.keep_count says how many blocks to keep; CalibrationConfig.max_fvu and "
                    "CalibrationConfig.keep_budget decide it another way: set one or the other"
                )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what the recipe records)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"CalibrationConfig.from_dict: unknown fields {unknown}; known: {sorted(names)}")
        return cls(**data)
