"""Han timm models: checkpoints saved with timm's ``save_for_hf`` load back like any timm model.

``local-dir:``, ``hf-hub:`` (served offline from a populated Hugging Face cache, in a
subprocess so the offline settings are read at import) and ``pretrained_cfg_overlay=dict(file=...)``
all give bit-identical outputs; checkpoints of another architecture fail with a clear error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from _hf_cache import populate_hf_cache
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

import han_surgery  # noqa: F401  (registers han_* with timm)
from han_surgery import CheckpointError

CASES = [("han_mobilevit_xxs", 64), ("han_mixer_m2h16_32", 32)]
# Non-default constructor arguments travel in config.json's model_args (and keep the tests fast).
KWARGS = {"han_mixer_m2h16_32": dict(embed_dim=64, mlp_ratio=(1.0, 1.0))}


def _model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    with torch.no_grad():  # non-trivial head and BN statistics, so a missed tensor shows up
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(0.01 * torch.rand_like(b))
    return model


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` on one thread, so outputs computed anywhere (fixtures, subprocesses) compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        torch.set_num_threads(threads)


def _save(model: torch.nn.Module, directory: Path) -> Path:
    save_for_hf(model, str(directory), safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (model, input, output, checkpoint dir)."""
    out = {}
    for name, img in CASES:
        model = _model(name, **KWARGS.get(name, {}))
        x = torch.randn(2, 3, img, img)
        y = _forward(model, x)
        out[name] = (model, x, y, _save(model, tmp_path_factory.mktemp(name)))
    return out


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_save_for_hf_writes_timm_files(saved, name):
    _, _, _, d = saved[name]
    assert {"config.json", "model.safetensors"} <= {p.name for p in d.iterdir()}
    config = json.loads((d / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == 10
    assert any(k.endswith(".u") for k in load_file(d / "model.safetensors"))


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_local_dir_roundtrip(saved, name):
    model, x, y, d = saved[name]
    loaded = timm.create_model(f"local-dir:{d}", pretrained=True).eval()
    assert type(loaded) is type(model) and loaded.num_classes == 10
    assert torch.equal(_forward(loaded, x), y)


def test_han_surgery_save_pretrained_loads_through_local_dir(saved, tmp_path):
    """``han_mobilevit_*``'s constructor hanifies: the folder's recipe starts with that step, which
    the timm entry point must not replay a second time (it raised CheckpointError)."""
    model, x, y, _ = saved["han_mobilevit_xxs"]
    han_surgery.save_pretrained(model, tmp_path)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert torch.equal(_forward(loaded, x), y)
    assert torch.equal(_forward(han_surgery.from_pretrained(tmp_path), x), y)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_pretrained_cfg_overlay_file(saved, name):
    """The overlay names the file and its class count (else timm re-initialises a 10-class head)."""
    _, x, y, d = saved[name]
    overlay = dict(file=str(d / "model.safetensors"), num_classes=10)
    loaded = timm.create_model(
        name, pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay, **KWARGS.get(name, {})
    ).eval()
    assert torch.equal(_forward(loaded, x), y)


def test_new_num_classes_keeps_the_backbone(saved):
    """timm re-initialises only the classifier when num_classes differs from the checkpoint."""
    model, x, _, d = saved["han_mobilevit_xxs"]
    loaded = timm.create_model(f"local-dir:{d}", pretrained=True, num_classes=3).eval()
    with torch.no_grad():
        assert loaded(x).shape == (2, 3)
        assert torch.equal(loaded.forward_features(x), model.forward_features(x))


def test_hf_hub_from_offline_cache(saved, tmp_path):
    model, x, y, d = saved["han_mobilevit_xxs"]
    hf_home = tmp_path / "hf"
    populate_hf_cache(hf_home / "hub", "han-surgery/han_mobilevit_xxs-test", d)
    save_file({"x": x, "y": y}, str(tmp_path / "io.safetensors"))
    script = textwrap.dedent(
        f"""
        import torch, timm
        import han_surgery
        torch.set_num_threads(1)  # as the parent's _forward
        from safetensors.torch import load_file
        io = load_file({str(tmp_path / "io.safetensors")!r})
        model = timm.create_model("hf-hub:han-surgery/han_mobilevit_xxs-test", pretrained=True).eval()
        assert type(model).__name__ == "HanMobileVit", type(model)
        with torch.no_grad():
            assert torch.equal(model(io["x"]), io["y"]), "outputs differ"
        try:
            timm.create_model("hf-hub:han-surgery/not-in-cache", pretrained=True)
        except Exception as e:
            print("uncached:", type(e).__name__)
        else:
            raise AssertionError("an uncached repo loaded while offline")
        print("OK")
        """
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")


def test_dense_checkpoint_into_han_model_fails_clearly(tmp_path):
    dense = _save(timm.create_model("mobilevit_xxs", num_classes=10), tmp_path / "dense")
    with pytest.raises(
        ValueError, match=r"han_mobilevit_xxs: .*missing keys.*mlp\.ffn\.fc1\.u.*dense \(non-Han\) checkpoint.*hanify"
    ):
        timm.create_model(
            "han_mobilevit_xxs",
            pretrained=True,
            num_classes=10,
            pretrained_cfg_overlay=dict(file=str(dense / "model.safetensors")),
        )


def test_pretrained_strict_false_loads_a_partial_checkpoint_as_for_the_dense_peer(tmp_path):
    """``pretrained_strict=False`` lets missing keys through, as timm does for ``mobilevit_xxs``; the Han models'
    checkpoint check refused them before timm's flag was read. Shapes that differ are refused either way."""
    model = timm.create_model("han_mobilevit_xxs", num_classes=10)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "final_conv.conv.weight"}
    save_file(state, str(tmp_path / "partial.safetensors"))
    overlay = dict(file=str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing keys \(final_conv\.conv\.weight\)"):
        timm.create_model("han_mobilevit_xxs", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay)
    loaded = timm.create_model(
        "han_mobilevit_xxs", pretrained=True, pretrained_strict=False, num_classes=10, pretrained_cfg_overlay=overlay
    )
    key = "stages.2.1.transformer.0.mlp.ffn.fc1.u"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])


def test_shape_mismatch_fails_clearly(tmp_path):
    """A 32x32 Han-Mixer (64 tokens) checkpoint does not fit a 64x64 one (256 tokens)."""
    d = _save(timm.create_model("han_mixer_m0h16_32"), tmp_path / "m32")
    with pytest.raises(
        ValueError, match=r"shape mismatches \(blocks\.0\.mlp_tokens\.fc1\.u: checkpoint \(1, 64\) vs model \(1, 256\)"
    ):
        timm.create_model(
            "han_mixer_m0h16_32",
            img_size=64,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(d / "model.safetensors")),
        )


def test_wrong_architecture_in_local_dir_fails_clearly(saved, tmp_path, capsys):
    """config.json naming another architecture than the weights were saved from. Through load_model and the CLI it is
    a CheckpointError naming the weights file: the Han models' checkpoint check raised a bare ValueError, a traceback
    from ``han-surgery inspect``."""
    from han_surgery.cli import main
    from han_surgery.loading import load_model

    _, _, _, d = saved["han_mobilevit_xxs"]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    config = json.loads((d / "config.json").read_text())
    config["architecture"] = "han_mobilevit_xs"
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"han_mobilevit_xs: the checkpoint does not fit this architecture: .*shape mismatches"
    ):
        timm.create_model(f"local-dir:{wrong}", pretrained=True)
    with pytest.raises(
        CheckpointError, match=rf"^{wrong / 'model.safetensors'}: han_mobilevit_xs: the checkpoint does not fit"
    ):
        load_model(wrong)
    assert main(["inspect", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("han-surgery inspect: ") and len(err.splitlines()) == 1, err


def test_a_han_checkpoint_of_another_depth_is_not_called_dense(tmp_path):
    """A Han-Mixer checkpoint with one Mixer block more has unexpected ``.mlp`` weights and misses some ``.u``: the
    hint said 'a dense (non-Han) checkpoint ... hanify', which does not apply to a checkpoint full of Han-blocks."""
    d = _save(timm.create_model("han_mixer_m1h16_32"), tmp_path / "m1")
    with pytest.raises(ValueError, match=r"han_mixer_m0h16_32: .*Load it with the architecture it was saved from") as e:
        timm.create_model(
            "han_mixer_m0h16_32", pretrained=True, pretrained_cfg_overlay=dict(file=str(d / "model.safetensors"))
        )
    assert "dense" not in str(e.value)
    # nor does han_surgery.from_pretrained tell its user to hanify a model made of Han-blocks
    with pytest.raises(CheckpointError, match=r"han_mixer_m1h16_32, is built of Han-blocks already: .*local-dir:"):
        han_surgery.from_pretrained(d)
    dense = _save(timm.create_model("mobilevit_xxs"), tmp_path / "dense")
    with pytest.raises(CheckpointError, match=r"plain timm folder: load it with its library, then call hanify"):
        han_surgery.from_pretrained(dense)


def test_hanified_base_checkpoint_loads_into_han_model(tmp_path):
    """The fix the dense-checkpoint error suggests: hanify the base model, its weights then fit."""
    from han_surgery import hanify
    from han_surgery.models import hanformer_config

    torch.manual_seed(0)
    base = timm.create_model("mobilevit_xxs", num_classes=10)
    hanify(base, hanformer_config())
    d = _save(base.eval(), tmp_path / "hanified")
    overlay = dict(file=str(d / "model.safetensors"), num_classes=10)
    loaded = timm.create_model("han_mobilevit_xxs", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_forward(loaded.eval(), x), _forward(base, x))
