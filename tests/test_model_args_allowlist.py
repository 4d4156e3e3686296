"""``config.json``'s ``model_args`` reach ``timm.create_model``: only constructor arguments may (issue 11, item 4).

``checkpoint_path``, ``pretrained_cfg_overlay``, ``cache_dir`` and the other arguments timm's loaders use
to find and read weights are refused, with a ``CheckpointError`` that names the file and the key,
wherever han-surgery reads ``model_args``: ``load_model`` (a plain timm folder),
``from_pretrained`` and timm's ``create_model("local-dir:...")`` (a hanified one). A pickle that
``checkpoint_path`` points at is never opened.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import timm
import torch
from _surgery_zoo import ZOO

from han_surgery import CheckpointError, from_pretrained, hanify, load_model, save_pretrained
from han_surgery.folders import checked_timm_model_args


class WritesAFile:
    """Unpickling this creates ``path``: the proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "unpickled.txt"
    checkpoint = tmp_path / "evil.pth"
    checkpoint.write_bytes(pickle.dumps({"state_dict": WritesAFile(marker)}))
    return checkpoint, marker


def _folders(tmp_path: Path) -> dict[str, Path]:
    """A plain timm folder (``save_for_hf``) and a hanified one (``han_surgery.save_pretrained``)."""
    model = ZOO["timm/vit"]()[0].eval()
    plain = tmp_path / "plain"
    timm.models.save_for_hf(model, str(plain), safe_serialization=True)
    hanify(model)
    return {"plain": plain, "hanified": save_pretrained(model, tmp_path / "hanified")}


LOADER_KEYS = {
    "checkpoint_path": None,  # filled with the evil pickle's path
    "pretrained_cfg_overlay": {"file": None},
    "pretrained_cfg": {"file": None, "source": "file"},
    "cache_dir": "/tmp/elsewhere",
    "pretrained": True,
    "pretrained_strict": False,
    "features_only": True,
}


@pytest.mark.parametrize("key", sorted(LOADER_KEYS))
@pytest.mark.parametrize(
    "how",
    ["load_model(plain)", "load_model(hanified)", "from_pretrained(hanified)", "timm local-dir:(hanified)"],
)
def test_loader_arguments_in_model_args_are_refused(tmp_path, key, how):
    folders = _folders(tmp_path)
    checkpoint, marker = _evil_checkpoint(tmp_path)
    value = LOADER_KEYS[key]
    value = str(checkpoint) if value is None else value
    if isinstance(value, dict):
        value = {k: str(checkpoint) if v is None else v for k, v in value.items()}
    folder = folders["plain" if "plain" in how else "hanified"]
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("model_args", {})[key] = value
    (folder / "config.json").write_text(json.dumps(config))

    # timm's own create_model refuses a key that repeats one of its parameters (TypeError, before any file is read)
    timm_refuses = how.startswith("timm") and key in (
        "cache_dir",
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
    )
    with pytest.raises(TypeError if timm_refuses else CheckpointError) as info:
        if how.startswith("load_model"):
            load_model(folder)
        elif how.startswith("from_pretrained"):
            from_pretrained(folder)
        else:
            timm.create_model(f"local-dir:{folder}", pretrained=True)
    if timm_refuses:
        assert f"multiple values for keyword argument {key!r}" in str(info.value)
    else:
        assert f"model_args[{key!r}]" in str(info.value) and "config.json" in str(info.value)
    assert not marker.exists()


def test_constructor_arguments_pass(tmp_path):
    """The model_args timm records itself (img_size, depth, ...) still rebuild the model."""
    folders = _folders(tmp_path)
    config = json.loads((folders["hanified"] / "config.json").read_text())
    assert {"depth", "embed_dim", "img_size"} <= set(config["model_args"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = from_pretrained(folders["hanified"])(x)
        b = timm.create_model(f"local-dir:{folders['hanified']}", pretrained=True).eval()(x)
    assert torch.equal(a, b)
    assert load_model(folders["plain"]).patch_embed.img_size == (32, 32)


@pytest.mark.parametrize(
    "model_args, problem",
    [
        ({"not an identifier": 1}, "not a model constructor argument"),
        ({"depth": {1, 2}}, "not plain JSON"),
        (["depth", 1], "must be a JSON object"),
    ],
)
def test_model_args_shape(model_args, problem):
    with pytest.raises(CheckpointError, match=f"cfg.json: .*{problem}"):
        checked_timm_model_args(model_args, "cfg.json")
