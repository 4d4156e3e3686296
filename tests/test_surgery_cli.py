"""``han-surgery inspect`` and ``han-surgery hanify`` (in-process, timm names built with pretrained=False)."""

from __future__ import annotations

import json

import pytest
import torch
from _surgery_zoo import ZOO

from han_surgery import from_pretrained
from han_surgery.cli import main


def test_inspect_timm_name_prints_dry_run(capsys):
    assert main(["inspect", "test_vit", "--residual", "drop"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "blocks.0.mlp" in out and "timm.mlp" in out and "dropped" in out


def test_hanify_then_inspect_the_directory(tmp_path, capsys):
    out_dir = tmp_path / "han"
    assert main(["hanify", "test_vit", "-o", str(out_dir), "--reflections", "2", "--exclude", "blocks.0.*"]) == 0
    text = capsys.readouterr().out
    assert "excluded by 'blocks.0.*'" in text and "saved to" in text
    han = json.loads((out_dir / "han_config.json").read_text())
    assert han["base"] == {"library": "timm", "architecture": "test_vit"}
    assert han["recipe"][0]["config"]["reflections"] == 2
    model = from_pretrained(out_dir)
    assert model.blocks[1].mlp.fc1.reflections == 2
    # inspecting the hanified directory: only the excluded block is left to do
    assert main(["inspect", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "1 block(s) rewritten" in text and "blocks.0.mlp" in text and "Han modules were already present" in text


def test_hanify_a_transformers_directory(tmp_path, capsys):
    model, inputs, _ = ZOO["hf/distilbert"]()
    model.save_pretrained(tmp_path / "base")
    assert main(["hanify", str(tmp_path / "base"), "-o", str(tmp_path / "han"), "--residual", "drop"]) == 0
    assert "hf.distilbert_ffn" in capsys.readouterr().out
    loaded = from_pretrained(tmp_path / "han")
    assert type(loaded).__name__ == "DistilBertModel"
    with torch.no_grad():
        assert torch.isfinite(loaded(**inputs).last_hidden_state).all()


def test_hanify_a_timm_save_for_hf_directory(tmp_path, capsys):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    base = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    save_for_hf(base, str(tmp_path / "base"), safe_serialization=True)
    assert main(["hanify", str(tmp_path / "base"), "-o", str(tmp_path / "han")]) == 0
    loaded = from_pretrained(tmp_path / "han")
    # the weights outside the MLPs are the saved ones, not a fresh random init
    assert torch.equal(loaded.patch_embed.proj.weight, base.patch_embed.proj.weight)
    assert torch.equal(loaded.head.weight, base.head.weight)


def test_bad_sources(tmp_path, capsys):
    assert main(["inspect", "vit_tiny_patch16_22"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("han-surgery inspect: ") and "vit_tiny_patch16_224" in err and err.count("\n") == 1
    (tmp_path / "model.pt").write_bytes(b"x")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert main(["inspect", "test_resnet"]) == 2
    assert "no rule recognises any module of ResNet" in capsys.readouterr().err
    assert main(["inspect", "test_vit", "--include", "blocks.9.mlp"]) == 2
    assert "Near names" in capsys.readouterr().err


def test_help_says_pretrained_false(capsys):
    with pytest.raises(SystemExit):
        main(["hanify", "--help"])
    assert "pretrained=False" in capsys.readouterr().out
