"""Small networks for tabular rows, used by ``han-surgery finetune --model mlp|hannet`` on numeric CSVs."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ..checks import check_int
from ..errors import ConfigError
from ..layers import Abs, HanLayer

__all__ = ["STANDARDIZATION_KEYS", "TabularNet"]

#: The ``config`` entries of a network that takes raw rows (see :class:`TabularNet`).
STANDARDIZATION_KEYS = ("feature_mean", "feature_std", "target_mean", "target_std")

#: The most hidden layers and parameters (4 GB in float32) a :class:`TabularNet` may have: a larger one is a typo
#: (``mlp:10000000x2``) or a damaged ``config.json``, refused before gigabytes are allocated.
MAX_DEPTH = 1000
MAX_PARAMETERS = 1 << 30


class TabularNet(nn.Module):
    """A small network for tabular rows ``(B, F) -> (B, num_outputs)``.

    ``kind="mlp"``: ``[Linear(F|w, w), ReLU] x depth, Linear(w, out)``; ``depth=0`` is the linear model
    ``Linear(F, out)`` (``width`` unused, but still checked).
    ``kind="hannet"``: ``Linear(F, w), |.|, HanLayer(w) x depth, Linear(w, out)`` -- the paper's
    HanNet (each hidden layer ``|H x + b|`` has ``2w`` parameters).

    ``config`` holds the constructor arguments; the fine-tune command saves it in ``config.json``
    under ``han_surgery_tabular`` so that the folder can be rebuilt.

    The standardisation statistics make the network take raw rows: with ``feature_mean`` and
    ``feature_std`` (``F`` values each) the input is ``(x - mean) / std`` first, and with ``target_mean``
    and ``target_std`` (``num_outputs`` values each, regression) the output is ``y * std + mean``, in the
    data's units. ``han-surgery finetune`` trains the network on standardised rows without them and
    exports it with the training split's statistics, so ``han_surgery.load_model(folder)(raw_rows)`` gives
    predictions in the data's units. They are buffers outside the ``state_dict`` (kept in ``config``).

    Raises:
        ConfigError: an unknown ``kind``; ``in_features``, ``num_outputs``, ``width`` not ints ``>= 1`` or ``depth``
            not an int ``>= 0``; more than :data:`MAX_DEPTH` hidden layers or :data:`MAX_PARAMETERS` parameters
            (checked before anything is allocated); statistics of the wrong size, not finite, or a ``*_std`` not
            positive.
    """

    def __init__(
        self,
        in_features: int,
        num_outputs: int,
        width: int = 128,
        depth: int = 2,
        kind: Literal["mlp", "hannet"] = "mlp",
        *,
        feature_mean: Sequence[float] | None = None,
        feature_std: Sequence[float] | None = None,
        target_mean: Sequence[float] | None = None,
        target_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        _check_size(in_features, num_outputs, width, depth, kind)
        self.config = {
            "in_features": in_features,
            "num_outputs": num_outputs,
            "width": width,
            "depth": depth,
            "kind": kind,
        }
        stats = {"feature_mean": feature_mean, "feature_std": feature_std}
        stats.update(target_mean=target_mean, target_std=target_std)
        for pair, size in (
            (("feature_mean", "feature_std"), in_features),
            (("target_mean", "target_std"), num_outputs),
        ):
            given = [stats[key] is not None for key in pair]
            if any(given) and not all(given):
                raise ConfigError(f"TabularNet: {pair[0]} and {pair[1]} go together; got only one of them.")
            for key in pair:
                values = stats[key]
                if values is None:
                    continue
                tensor = torch.as_tensor(values, dtype=torch.float32)
                if tensor.shape != (size,) or not bool(torch.isfinite(tensor).all()):
                    raise ConfigError(f"TabularNet: {key} must be {size} finite numbers, got {list(values)!r:.80}.")
                if key.endswith("_std") and not bool((tensor > 0).all()):
                    raise ConfigError(f"TabularNet: {key} must be positive, got {list(values)!r:.80}.")
                self.config[key] = [float(v) for v in values]
                self.register_buffer(key, tensor, persistent=False)
        if kind == "mlp":
            layers: list[nn.Module] = []
            for i in range(depth):
                layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
        else:
            layers = [nn.Linear(in_features, width), Abs()] + [HanLayer(width) for _ in range(depth)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width if layers else in_features, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, F) -> (B, num_outputs)``; raw rows and outputs in the data's units with the statistics set."""
        if "feature_mean" in self.config:
            x = (x - self.feature_mean) / self.feature_std
        y = self.head(self.body(x))
        if "target_mean" in self.config:
            y = y * self.target_std + self.target_mean
        return y

    def without_standardization(self) -> TabularNet:
        """A copy with the same modules and weights and no statistics: it takes and gives standardised values."""
        plain = copy.deepcopy(self)
        for key in STANDARDIZATION_KEYS:
            plain.config.pop(key, None)
            plain._buffers.pop(key, None)
        return plain


def _check_size(in_features: int, num_outputs: int, width: int, depth: int, kind: str) -> None:
    """Refuse (:class:`ConfigError`) a kind or size no :class:`TabularNet` has: not whole numbers, no feature, output
    or hidden unit, a negative depth, or more than :data:`MAX_DEPTH` layers / :data:`MAX_PARAMETERS` parameters."""
    if kind not in ("mlp", "hannet"):
        raise ConfigError(f"TabularNet kind must be 'mlp' or 'hannet', got {kind!r}.")
    for name, value in (("in_features", in_features), ("num_outputs", num_outputs), ("width", width)):
        check_int(f"TabularNet {name}", value, 1)
    check_int("TabularNet depth", depth, 0)
    if depth > MAX_DEPTH:
        raise ConfigError(f"TabularNet depth must be at most {MAX_DEPTH}, got {depth}")
    if kind == "hannet":  # Linear(F, w), |.|, HanLayer(w) (2w parameters each) x depth, Linear(w, out)
        hidden = in_features * width + width + depth * 2 * width
    else:  # [Linear(F|w, w), ReLU] x depth
        hidden = in_features * width + width + (depth - 1) * (width * width + width) if depth else 0
    count = hidden + (width if kind == "hannet" or depth else in_features) * num_outputs + num_outputs
    if count > MAX_PARAMETERS:
        raise ConfigError(
            f"TabularNet: {kind} of width {width} and depth {depth} for {in_features} features and {num_outputs} "
            f"outputs has {count:,} parameters, more than {MAX_PARAMETERS:,}: choose a smaller width or depth"
        )
