"""Corrupt hanified folders fail with one clear error that names the file, on every loading path (issue 11, item 16):
``han_surgery.from_pretrained``, ``han_surgery.load_model``, timm's ``create_model("local-dir:...")`` and
transformers' ``AutoModel.from_pretrained`` (the last two through han-surgery's entry points).

A truncated or garbage ``model.safetensors``, a tensor of the wrong shape, a recipe that is a list, lacks
``recipe`` or has a null ``format_version`` (in ``han_config.json`` for han-surgery's loaders, in
``config.json`` for the native ones), malformed JSON and a missing ``config.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import transformers as T
from _surgery_zoo import ZOO
from safetensors.torch import load_file, save_file

from han_surgery import CheckpointError, from_pretrained, hanify, load_model, save_pretrained


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, family in (("timm/vit", "timm"), ("hf/bert", "transformers")):
        torch.manual_seed(0)
        model = ZOO[name]()[0].eval()
        hanify(model)
        out[family] = save_pretrained(model, tmp_path_factory.mktemp(family))
    return out


def truncate(d: Path) -> str:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return "model.safetensors"


def garbage(d: Path) -> str:
    (d / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 8)
    return "model.safetensors"


def wrong_shape(d: Path) -> str:
    state = load_file(d / "model.safetensors")
    key = next(k for k in state if k.endswith("fc1.u"))
    state[key] = torch.zeros(1, 7)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return "model.safetensors"


def no_config(d: Path) -> str:
    (d / "config.json").unlink()
    return "config.json"


def bad_json(file: str) -> Callable[[Path], str]:
    def mutate(d: Path) -> str:
        (d / file).write_text('{"format_version": 1, "recipe": [')
        return file

    return mutate


def recipe_edit(edit: Callable[[dict], object], in_config: bool) -> Callable[[Path], str]:
    """Edit the recipe where the loader reads it: han_config.json, or config.json's han_recipe (native loaders)."""

    def mutate(d: Path) -> str:
        if not in_config:
            (d / "han_config.json").write_text(json.dumps(edit(json.loads((d / "han_config.json").read_text()))))
            return "han_config.json"
        config = json.loads((d / "config.json").read_text())
        if "model_args" in config:  # timm
            config["model_args"]["han_recipe"] = edit(config["model_args"]["han_recipe"])
        else:
            config["han_recipe"] = edit(config["han_recipe"])
        (d / "config.json").write_text(json.dumps(config))
        return "config.json"

    return mutate


RECIPE_FAULTS = {
    "recipe_is_a_list": lambda r: [r],
    "no_recipe": lambda r: {k: v for k, v in r.items() if k != "recipe"},
    "null_format_version": lambda r: {**r, "format_version": None},
}
WEIGHT_FAULTS = {"truncated": truncate, "garbage": garbage, "wrong_shape": wrong_shape}


def _copy(saved: dict[str, Path], family: str, tmp_path: Path) -> Path:
    d = tmp_path / "folder"
    shutil.copytree(saved[family], d)
    return d


def _native(family: str) -> Callable[[Path], object]:
    if family == "timm":
        return lambda d: timm.create_model(f"local-dir:{d}", pretrained=True)
    return lambda d: T.AutoModel.from_pretrained(d)


LOADERS = {"from_pretrained": lambda _f: from_pretrained, "load_model": lambda _f: load_model, "native": _native}


@pytest.mark.parametrize("family", ["timm", "transformers"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("fault", [*WEIGHT_FAULTS, *RECIPE_FAULTS, "bad_han_config_json", "no_config"])
def test_corrupt_folder_raises_one_error_naming_the_file(saved, tmp_path, family, loader, fault):
    d = _copy(saved, family, tmp_path)
    native = loader == "native"
    if fault in WEIGHT_FAULTS:
        file = WEIGHT_FAULTS[fault](d)
    elif fault in RECIPE_FAULTS:
        file = recipe_edit(RECIPE_FAULTS[fault], in_config=native)(d)
    elif fault == "bad_han_config_json":
        if native:
            pytest.skip("the native loaders do not read han_config.json")
        file = bad_json("han_config.json")(d)
    else:
        file = no_config(d)
    load = LOADERS[loader](family)
    if native and fault == "no_config":
        # timm / transformers read config.json themselves, before han-surgery's code runs: their own errors
        with pytest.raises((OSError, ValueError), match="config.json"):
            load(d)
        return
    with pytest.raises(CheckpointError) as info:
        load(d)
    assert str(d / file) in str(info.value), str(info.value)


@pytest.mark.parametrize("family", ["timm", "transformers"])
def test_malformed_config_json_names_the_file(saved, tmp_path, family):
    d = _copy(saved, family, tmp_path)
    bad_json("config.json")(d)
    for load in (from_pretrained, load_model):
        with pytest.raises(CheckpointError, match=f"{d / 'config.json'}: not valid JSON"):
            load(d)
    if family == "transformers":  # transformers reads config.json itself and names it
        with pytest.raises(OSError, match="config.json"):
            T.AutoModel.from_pretrained(d)


def test_transformers_base_config_must_be_an_object(saved, tmp_path):
    d = _copy(saved, "transformers", tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["base_config"] = ["not", "a", "config"]
    (d / "config.json").write_text(json.dumps(config))
    for load in (from_pretrained, T.AutoModel.from_pretrained):
        with pytest.raises(CheckpointError, match=r"config\.json: .*base_config"):
            load(d)


# ---------------------------------------------------------------------- plain (not hanified) folders
@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, Path]:
    """A timm ``save_for_hf`` folder and a transformers ``save_pretrained`` folder, both tiny."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("plain")
    save_for_hf(timm.create_model("test_vit", pretrained=False), str(root / "timm"), safe_serialization=True)
    config = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    T.BertModel(config).save_pretrained(root / "transformers")
    return {"timm": root / "timm", "transformers": root / "transformers"}


def _edit_config(edit: Callable[[dict], None]) -> Callable[[Path], str]:
    def mutate(d: Path) -> str:
        config = json.loads((d / "config.json").read_text())
        edit(config)
        (d / "config.json").write_text(json.dumps(config))
        return "config.json"

    return mutate


def _model_args(**changes: object) -> Callable[[Path], str]:
    return _edit_config(lambda c: c["model_args"].update(changes))


def _shape_fault(d: Path) -> str:  # config.json describes a model the weights do not fit
    if (d / "config.json").read_text().count('"model_args"'):
        _model_args(embed_dim=128)(d)
    else:
        _edit_config(lambda c: c.update(intermediate_size=100))(d)
    return "model.safetensors"


PLAIN_FAULTS: dict[str, tuple[tuple[str, ...], Callable[[Path], str]]] = {
    "truncated": (("timm", "transformers"), truncate),
    "garbage": (("timm", "transformers"), garbage),
    "config_shape": (("timm", "transformers"), _shape_fault),
    "unknown_architecture": (("timm",), _edit_config(lambda c: c.update(architecture="no_such_arch"))),
    "hub_architecture": (("timm",), _edit_config(lambda c: c.update(architecture="hf-hub:timm/test_vit.r160_in1k"))),
    "local_dir_architecture": (("timm",), _edit_config(lambda c: c.update(architecture="local-dir:/tmp"))),
    "arg_of_wrong_type": (("timm",), _model_args(depth="abc")),
    "unknown_arg": (("timm",), _model_args(bogus_kw=3)),
    "value_of_wrong_type": (("transformers",), _edit_config(lambda c: c.update(hidden_size="abc"))),
}


@pytest.mark.parametrize(
    "family, fault", [(family, fault) for fault, (families, _) in PLAIN_FAULTS.items() for family in families]
)
def test_corrupt_plain_folder_is_one_line_naming_the_file(plain, tmp_path, capsys, family, fault):
    """``inspect`` / ``hanify`` of a broken timm or transformers folder: one line naming the file, exit 2."""
    from han_surgery.cli import main

    d = _copy(plain, family, tmp_path)
    file = PLAIN_FAULTS[fault][1](d)
    with pytest.raises(CheckpointError, match=f"^{d / file}"):
        load_model(d)
    capsys.readouterr()
    assert main(["hanify", str(d), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]  # progress bar
    assert len(lines) == 1 and lines[0].startswith(f"han-surgery hanify: {d / file}"), err
    assert not (tmp_path / "out").exists()


def test_sharded_transformers_folder_loads_and_a_missing_shard_is_named(tmp_path):
    """``save_pretrained(max_shard_size=...)`` writes shards and an index (most Hub LLM repos hold that): ``load_model``
    (so ``hanify`` / ``inspect`` / ``finetune --model``) loads it as transformers does; it asked for a
    ``model.safetensors``."""
    torch.manual_seed(0)
    config = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = T.BertModel(config).eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    loaded = load_model(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    from han_surgery.finetune.models import build_model

    classifier = build_model(str(tmp_path / "sharded")).model  # finetune --model: a head on the sharded backbone
    assert all(torch.equal(v, classifier.bert.state_dict()[k]) for k, v in model.state_dict().items())
    # a Trainer checkpoint's pickles beside the shards are never read, and do not make the folder "pickle only"
    for name in ("optimizer.pt", "training_args.bin"):
        (tmp_path / "sharded" / name).write_bytes(b"never unpickled")
    loaded = load_model(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"^{shards[-1]}: missing"):
        load_model(tmp_path / "sharded")
    with pytest.raises(CheckpointError, match=f"^{shards[-1]}: missing"):
        build_model(str(tmp_path / "sharded"))


HANIFIED_CONFIG_FAULTS = {
    "transformers": {
        "value_of_wrong_type": lambda c: c["base_config"].update(hidden_size="abc"),
        "heads_do_not_divide": lambda c: c["base_config"].update(num_attention_heads=3),
    },
    "timm": {"arg_of_wrong_type": lambda c: c["model_args"].update(depth="x")},
}


@pytest.mark.parametrize(
    "family, fault", [(family, fault) for family, faults in HANIFIED_CONFIG_FAULTS.items() for fault in faults]
)
def test_a_hanified_config_the_base_model_cannot_be_built_from_is_one_line(saved, tmp_path, capsys, family, fault):
    """A config.json value the base model's constructor rejects (transformers' strict config validation is no
    ValueError; BERT's head check and timm's constructor raise inside the build): tracebacks from ``inspect``."""
    from han_surgery.cli import main

    d = _copy(saved, family, tmp_path)
    _edit_config(HANIFIED_CONFIG_FAULTS[family][fault])(d)
    for load in (from_pretrained, load_model):
        with pytest.raises(CheckpointError, match=f"^{d / 'config.json'}"):
            load(d)
    capsys.readouterr()
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"han-surgery inspect: {d / 'config.json'}"), err
