"""Corrupt model folders: every loader says which file is wrong, in one line (issue 11, item 16).

One hanified ``test_vit`` folder, damaged one way per case, is handed to ``han-surgery inspect``,
``han-surgery hanify``, ``han-surgery finetune --model`` and ``han_surgery.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from _toy_data import make_images
from safetensors.torch import load_file, save_file

import han_surgery
from han_surgery.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corrupt")
    model = timm.create_model("test_vit", pretrained=False, num_classes=4, in_chans=1)
    han_surgery.hanify(model)
    return han_surgery.save_pretrained(model, root / "good")


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)


def _wrong_shape(folder: Path) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["head.weight"] = torch.zeros(7, 3)
    save_file(tensors, str(folder / "model.safetensors"))


def _edit_han_config(change):
    def edit(folder: Path) -> None:
        path = folder / "han_config.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return edit


CASES = {
    "truncated weights": (_truncate, "model.safetensors"),
    "garbage weights": (_garbage, "model.safetensors"),
    "wrong tensor shape": (_wrong_shape, "model.safetensors"),
    "han_config is a list": (_edit_han_config(lambda d: [d]), "han_config.json"),
    "han_config without recipe": (_edit_han_config(lambda d: {k: v for k, v in d.items() if k != "recipe"}), "han_config.json"),
    "null format_version": (_edit_han_config(lambda d: {**d, "format_version": None}), "han_config.json"),
    "malformed han_config": (lambda f: (f / "han_config.json").write_text('{"recipe": ['), "han_config.json"),
    "malformed config": (lambda f: (f / "config.json").write_text("{not json"), "config.json"),
    "missing config": (lambda f: (f / "config.json").unlink(), "config.json"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_every_loader_names_the_damaged_file(
    case: str, saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    damage, culprit = CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    damage(folder)
    toy = make_images(tmp_path / "toy.npz", n=32)
    for argv in (
        ["inspect", str(folder)],
        ["hanify", str(folder), "-o", str(tmp_path / "out")],
        ["finetune", "--model", str(folder), "--data", str(toy), "--output-dir", str(tmp_path / "ft"), "--no-progress"],
    ):
        assert main(argv) == 2, (case, argv)
        err = capsys.readouterr().err
        assert err.startswith(f"han-surgery {argv[0]}: ") and err.count("\n") == 1, err
        assert culprit in err, err
    with pytest.raises(han_surgery.CheckpointError, match=culprit.replace(".", r"\.")):
        han_surgery.from_pretrained(folder)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ft").exists()
