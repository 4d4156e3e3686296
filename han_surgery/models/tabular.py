"""Small networks for tabular rows, used by ``han-surgery finetune --model mlp|hannet`` on numeric CSVs."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import Abs, HanLayer

__all__ = ["TabularNet"]


class TabularNet(nn.Module):
    """A small network for tabular rows ``(B, F) -> (B, num_outputs)``.

    ``kind="mlp"``: ``[Linear(F|w, w), ReLU] x depth, Linear(w, out)``.
    ``kind="hannet"``: ``Linear(F, w), |.|, HanLayer(w) x depth, Linear(w, out)`` -- the paper's
    HanNet (each hidden layer ``|H x + b|`` has ``2w`` parameters).

    ``config`` holds the constructor arguments; the fine-tune command saves it in ``config.json``
    under ``han_surgery_tabular`` so that the folder can be rebuilt.
    """

    def __init__(
        self,
        in_features: int,
        num_outputs: int,
        width: int = 128,
        depth: int = 2,
        kind: Literal["mlp", "hannet"] = "mlp",
    ) -> None:
        super().__init__()
        self.config = {
            "in_features": in_features,
            "num_outputs": num_outputs,
            "width": width,
            "depth": depth,
            "kind": kind,
        }
        if kind == "mlp":
            layers: list[nn.Module] = []
            for i in range(depth):
                layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
        elif kind == "hannet":
            layers = [nn.Linear(in_features, width), Abs()] + [HanLayer(width) for _ in range(depth)]
        else:
            raise ConfigError(f"TabularNet kind must be 'mlp' or 'hannet', got {kind!r}.")
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
