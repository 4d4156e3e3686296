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
import shutil
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


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A plain timm folder (``save_for_hf``) and a hanified one (``han_surgery.save_pretrained``)."""
    tmp = tmp_path_factory.mktemp("model_args")
    model = ZOO["timm/vit"]()[0].eval()
    plain = tmp / "plain"
    timm.models.save_for_hf(model, str(plain), safe_serialization=True)
    hanify(model)
    return {"plain": plain, "hanified": save_pretrained(model, tmp / "hanified")}


def _folders(saved: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    return {name: Path(shutil.copytree(src, tmp_path / name)) for name, src in saved.items()}


LOADER_KEYS = {
    "checkpoint_path": None,  # filled with the evil pickle's path
    "pretrained_cfg_overlay": {"file": None},
    "pretrained_cfg": {"file": None, "source": "file"},
    "cache_dir": "/tmp/elsewhere",
    "pretrained": True,
    "pretrained_strict": False,
    "features_only": True,
}


HOW = ["load_model(plain)", "load_model(hanified)", "from_pretrained(hanified)", "timm local-dir:(hanified)"]
# every loader key on one path (the same check serves all), checkpoint_path on every path that reads model_args
CASES = [(key, HOW[0]) for key in sorted(LOADER_KEYS)] + [("checkpoint_path", how) for how in HOW[1:]]


@pytest.mark.parametrize("key, how", CASES)
def test_loader_arguments_in_model_args_are_refused(saved, tmp_path, key, how):
    folders = _folders(saved, tmp_path)
    checkpoint, marker = _evil_checkpoint(tmp_path)
    value = LOADER_KEYS[key]
    value = str(checkpoint) if value is None else value
    if isinstance(value, dict):
        value = {k: str(checkpoint) if v is None else v for k, v in value.items()}
    folder = folders["plain" if "plain" in how else "hanified"]
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("model_args", {})[key] = value
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError) as info:
        if how.startswith("load_model"):
            load_model(folder)
        elif how.startswith("from_pretrained"):
            from_pretrained(folder)
        else:  # (timm itself refuses the keys that repeat a create_model parameter, e.g. cache_dir)
            timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert f"model_args[{key!r}]" in str(info.value) and "config.json" in str(info.value)
    assert not marker.exists()


def test_constructor_arguments_pass(saved):
    """The model_args timm records itself (img_size, depth, ...) still rebuild the model."""
    folders = saved
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
