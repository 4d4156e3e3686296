"""Checkpoint keys are an API: a renamed attribute in a surgery module must not change them silently.

``tests/data/han_mobilevit_xxs_keys.txt`` lists every state-dict key of ``han_mobilevit_xxs`` with its
shape, as published checkpoints hold them. If this test fails, the change breaks every saved
Han-MobileViT: keep the old names (or add a ``checkpoint_filter_fn`` mapping and a CHANGELOG line),
then regenerate the file.
"""

from __future__ import annotations

from pathlib import Path

import timm

import han_surgery  # noqa: F401  (registers the Han models)

PINNED = Path(__file__).parent / "data" / "han_mobilevit_xxs_keys.txt"


def test_han_mobilevit_xxs_state_dict_keys_are_pinned() -> None:
    model = timm.create_model("han_mobilevit_xxs", pretrained=False)
    now = [f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()]
    pinned = PINNED.read_text().splitlines()
    assert sorted(set(now) - set(pinned)) == [] and sorted(set(pinned) - set(now)) == []
    assert now == pinned  # same order too (state_dict order follows the module tree)
    assert "stages.2.1.transformer.0.mlp.ffn.fc1.u (1, 64)" in pinned  # the Hanformer path: ResidualFree(HanBlock)
