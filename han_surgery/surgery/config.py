"""``HanConfig``: what :func:`han_surgery.hanify` may rewrite, and how.

Name patterns (``include`` / ``exclude``) are matched against the qualified
module name of each *candidate* (the FFN a rule recognised, e.g.
``"blocks.3.mlp"`` or ``"encoder.layer.0.intermediate"``):

* a plain pattern is a shell-style glob, matched with :func:`fnmatch.fnmatchcase`
  against the whole name (``*`` also crosses dots: ``"blocks.1*.mlp"``,
  ``"encoder.layer.*"``);
* a pattern that starts with ``"re:"`` is a regular expression matched with
  :func:`re.fullmatch` (``"re:blocks\\.(0|1)\\.mlp"``).

A candidate is rewritten if it matches at least one ``include`` pattern (or
``include`` is empty) and no ``exclude`` pattern. A pattern that matches no
candidate at all is an error, which lists the nearest names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..checks import check_bool, check_int, check_number
from ..errors import ConfigError

__all__ = ["HanConfig", "match_pattern"]

Residual = Literal["keep", "drop"]


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    """``value`` (one pattern or an iterable of them) as a tuple of strings; a ``ConfigError`` otherwise."""
    patterns = (value,) if isinstance(value, str) else value
    try:
        patterns = tuple(patterns)
    except TypeError:
        patterns = None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        none = " (use () for none)" if value is None else ""
        raise ConfigError(f"HanConfig.{name} must be a pattern or a list of patterns (str), got {value!r}{none}")
    return patterns


def match_pattern(pattern: str, name: str) -> bool:
    """``True`` if ``name`` matches ``pattern`` (glob, or regex when prefixed with ``"re:"``)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass
class HanConfig:
    """How to turn MLP/FFN blocks into Han-blocks ``H2 |H1 x + b1| + b2``.

    Every field is also a command-line option of ``han-surgery inspect``, ``hanify`` and
    ``finetune --hanify``, spelled the same way on each (``reflections`` -> ``--reflections``,
    ``drop_norm`` -> ``--drop-norm`` / ``--no-drop-norm``); see :mod:`han_surgery.dataclass_cli`.

    Args:
        rules: names (or globs, e.g. ``"timm.*"``) of the registered rules that
            may apply; ``None`` means every registered rule, the structural
            fallback (``"fallback.ffn"``) included. See
            :func:`han_surgery.surgery.registry.list_rules`.
        drop_norm: remove the LayerNorm *in front of* each replaced FFN (the
            paper drops it: a Han-block is norm-preserving and 1-Lipschitz).
            Only pre-norm blocks have such a norm; the post-LayerNorm of
            post-norm models (BERT, DistilBERT, BART) normalises the residual
            stream, not the FFN's input, and is always kept.
        residual: ``"keep"`` (default, right for surgery on pretrained models:
            the block still computes ``x + Han(x)``) or ``"drop"`` (the paper's
            Hanformer: ``Han(x)``). Rules that cannot drop a residual skip the
            block and say why.
        reflections: Householder reflections per Han layer (1 = paper).
        init, bias_init: initialisation of the Han layers (see
            :class:`han_surgery.layers.HouseholderLinear`).
        dropout: dropout after each Han layer; ``None`` keeps the dropout
            rates of the block being replaced.
        final_abs: end each block with ``|.|`` (the paper's Han-Mixer block).
        include, exclude: name patterns, see the module docstring.
        gain: give each Han-block a per-channel output gain ``g`` (``n``
            parameters): ``y = g * (H2 |H1 x + b1| + b2)``. Off for the paper's models.
        input_scale: give each Han-block a per-channel input scale ``s`` (``n``
            parameters): ``|H1 (s * x) + b1|``. Off for the paper's models.
        side_rank: ``r > 0`` adds a rank-``r`` linear side path ``B A x`` to each
            Han-block (``2 n r`` parameters). Off (0) for the paper's models.

    ``gain``, ``input_scale`` and ``side_rank`` are the extra degrees of
    freedom that calibrated surgery (``hanify(model, config, calibration=...)``)
    can fit to a pretrained FFN; see ``docs/CALIBRATION.md`` for what each buys.
    They change the module structure, so they are part of the recipe that
    ``from_pretrained`` replays.

    Raises:
        ConfigError: a field has an invalid value (also a ``ValueError``).
    """

    rules: Sequence[str] | None = field(
        default=None,
        metadata={
            "help": "only these registered rules may apply (names or globs, e.g. 'timm.*'); default: all",
            "metavar": "RULE",
        },
    )
    drop_norm: bool = field(
        default=True, metadata={"help": "remove the pre-norm in front of each replaced FFN, as the paper does"}
    )
    residual: Residual = field(
        default="keep",
        metadata={"help": "keep the residual around each FFN (x + Han(x); right for pretrained models) or drop it"},
    )
    reflections: int = field(default=1, metadata={"help": "Householder reflections per Han layer (1 = the paper)"})
    init: Literal["orthogonal", "normal"] = field(
        default="orthogonal", metadata={"help": "initialisation of the Householder vectors"}
    )
    bias_init: Literal["uniform", "zeros"] = field(
        default="uniform", metadata={"help": "initialisation of the Han layers' biases"}
    )
    dropout: float | None = field(
        default=None, metadata={"help": "dropout after each Han layer (default: the replaced block's rates)"}
    )
    final_abs: bool = field(default=False, metadata={"help": "end each block with |.| (the paper's Han-Mixer block)"})
    include: Sequence[str] = field(
        default_factory=tuple,
        metadata={
            "help": "only rewrite candidates matching these name patterns (glob, or 're:' regex)",
            "metavar": "PATTERN",
        },
    )
    exclude: Sequence[str] = field(
        default_factory=tuple,
        metadata={
            "help": "never rewrite candidates matching these name patterns (glob, or 're:' regex)",
            "metavar": "PATTERN",
        },
    )
    gain: bool = field(default=False, metadata={"help": "give each Han-block a per-channel output gain (n parameters)"})
    input_scale: bool = field(
        default=False, metadata={"help": "give each Han-block a per-channel input scale (n parameters)"}
    )
    side_rank: int = field(
        default=0,
        metadata={"help": "add a rank-r linear side path B A x to each Han-block (2 n r parameters; 0: none)"},
    )

    def __post_init__(self) -> None:
        for name in ("rules", "include", "exclude"):
            value = getattr(self, name)
            if name != "rules" or value is not None:
                setattr(self, name, _patterns(name, value))
        if self.residual not in ("keep", "drop"):
            raise ConfigError(f"HanConfig.residual must be 'keep' or 'drop', got {self.residual!r}")
        check_int("HanConfig.reflections", self.reflections, 1)
        if self.init not in ("orthogonal", "normal"):
            raise ConfigError(f"HanConfig.init must be 'orthogonal' or 'normal', got {self.init!r}")
        if self.bias_init not in ("uniform", "zeros"):
            raise ConfigError(f"HanConfig.bias_init must be 'uniform' or 'zeros', got {self.bias_init!r}")
        check_int("HanConfig.side_rank", self.side_rank, 0)
        for name in ("drop_norm", "final_abs", "gain", "input_scale"):
            check_bool(f"HanConfig.{name}", getattr(self, name))
        check_number("HanConfig.dropout", self.dropout, 0.0, 1.0, optional=True)
        for pattern in (*self.include, *self.exclude):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ConfigError(f"HanConfig: invalid regular expression {pattern!r}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (sequences as lists)."""
        out = dataclasses.asdict(self)
        for key in ("rules", "include", "exclude"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HanConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"HanConfig.from_dict: unknown fields {unknown}; known: {sorted(names)}")
        return cls(**data)

    def han_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by every Han module built from this config."""
        return {"reflections": self.reflections, "init": self.init, "bias_init": self.bias_init}

    def block_extras(self) -> dict[str, Any]:
        """The optional degrees of freedom of a :class:`~han_surgery.layers.HanBlock` (all off by default)."""
        return {"gain": self.gain, "input_scale": self.input_scale, "side_rank": self.side_rank}

    @property
    def has_block_extras(self) -> bool:
        """``True`` if any of ``gain``, ``input_scale``, ``side_rank`` is set."""
        return self.gain or self.input_scale or self.side_rank > 0
