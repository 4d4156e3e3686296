"""What a typed user writes against han-surgery's public API: type-checked by tests/test_typing.py, never run.

Every line must pass mypy as it is, except the ones marked ``# type: ignore[code]``: those are mistakes the
annotations must catch (mypy runs with ``--warn-unused-ignores``, so a mistake that slips through fails the test).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertForSequenceClassification

from han_surgery import HanBlock, HanConfig, HanifyReport, from_pretrained, hanify, register_rule
from han_surgery.finetune import FinetuneConfig, load_data
from han_surgery.integrations.transformers import hanified_class
from han_surgery.surgery import Candidate, Replacement, Rule, SkipCandidate
from han_surgery.surgery.calibration import CalibrationConfig, calibration_batches, hidden_state_paths


class MyFFN(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


# the README's own rule: register_rule as a decorator returns the builder unchanged
@register_rule("typed.ffn", matcher=MyFFN, changes=("norm",), priority=50)
def build(candidate: Candidate, config: HanConfig) -> Replacement:
    module = candidate.module
    assert isinstance(module, MyFFN)
    d = module.up.in_features
    if module.down.out_features != d:
        raise SkipCandidate("not square")
    swaps = {candidate.path: HanBlock(d, **config.han_kwargs())}  # dict[str, HanBlock]
    return Replacement(swaps, {"norm": "kept", "residual": "kept"})


# called directly, it returns the Rule
rule: Rule = register_rule("typed.ffn2", matcher=lambda c: c.path.endswith("ffn"), builder=build)
rule_name: str = rule.name
register_rule("typed.ffn3", matcher=MyFFN, builder=build, changes="norm")  # type: ignore[arg-type]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ffn = MyFFN(16, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


net = Net()
report: HanifyReport = hanify(net, HanConfig(), calibration_config=CalibrationConfig(heal_steps=0))
hanify(net, calibration_config={"heal_steps": 0})  # type: ignore[arg-type]
paths: list[str] = hidden_state_paths(report)

# from_pretrained(model=...) gives back that model, with its own type
restored: Net = from_pretrained("folder", model=Net())
restored.embed(torch.zeros(2, 16))
anything: nn.Module = from_pretrained("folder")

# a hanified transformers class is still the base class for a checker
cls: type[BertForSequenceClassification] = hanified_class(BertForSequenceClassification)

# image calibration from a dataset, as docs/CALIBRATION.md shows
batches = calibration_batches(load_data("digits.npz").train, num_samples=64)

# the required fields of FinetuneConfig have no default
FinetuneConfig(data="digits.npz", output_dir="out")  # type: ignore[call-arg]
config = FinetuneConfig(model="vit_tiny_patch16_224", data="digits.npz", output_dir="out")
