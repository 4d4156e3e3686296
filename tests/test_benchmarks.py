"""The benchmarks' argument checks and small helpers, and tiny runs of the speed scripts (a few seconds at most).

A bad flag is the parser's one-line error (exit 2), found before anything is measured or trained; folders and
caches that a run would delete or misuse are refused. The speed scripts print and write what they measured: times
that are positive and finite, and ratios that are those of the times (no test asserts how fast anything is).
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    """``benchmarks/<name>.py`` as a module (registered in ``sys.modules``: dataclasses look their module up there)."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(BENCHMARKS / f"{name}.py"):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The scripts set torch's thread count (--threads): put it back for the tests after them."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def surgery():
    return _load("calibrated_surgery")


@pytest.fixture(scope="module")
def cal_mnist():
    return _load("calibrated_mnist")


@pytest.fixture(scope="module")
def brown():
    return _load("calibrated_brown_genre")


@pytest.fixture(scope="module")
def mnist_models():
    return _load("mnist_models")


def _usage_error(capsys, main, argv: list[str]) -> str:
    """Runs ``main(argv)``, which must stop with the parser's error (exit 2, no traceback); returns that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert ": error: " in line
    return line


@pytest.fixture()
def tiny_brown(tmp_path) -> Path:
    """A Brown-format TSV: 15 genres x 2 sample files x 3 sentences."""
    path = tmp_path / "brown.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["genre_file", "sentence"])
        for genre in "abcdefghjklmnpr":
            for number in (1, 2):
                for i in range(3):
                    writer.writerow([f"c{genre}{number:02d}", f"Sentence {i} of file {genre}{number}."])
    return path


@pytest.fixture()
def tiny_mnist(tmp_path) -> Path:
    """An MNIST-format .npz: 100 digits, sorted by label as mnist10k.npz is."""
    path = tmp_path / "digits.npz"
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 10)
    np.savez(path, images=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8), labels=labels)
    return path


# --- calibrated_surgery.py / calibration_tradeoff.py ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--keep-by", "output"], "--keep-by says what --max-fvu is compared with"),
        (["--keep-by", "block"], "--keep-by says what --max-fvu is compared with"),
        (["--keep-by", "block", "--keep-count", "3"], "--keep-count"),
        (["--max-fvu", "0.3", "--keep-count", "3"], "give one"),
        (["--num-eval", "2"], "expected an integer >= 3"),
        (["--batch-size", "0"], "expected a positive integer"),
        (["--threads", "0"], "expected a thread count in [1, 1024]"),
        (["--num-calibration", "0"], "expected a positive integer"),
        (["--keep-count", "0"], "expected a positive integer"),
        (["--data", "/nonexistent/brown.tsv"], "no such file"),
    ],
)
def test_calibrated_surgery_refuses_bad_flags(surgery, capsys, tiny_brown, argv, message):
    argv = argv if "--data" in argv else [*argv, "--data", str(tiny_brown)]
    assert message in _usage_error(capsys, surgery.main, argv)


def test_calibrated_surgery_keep_by_defaults_and_combinations(surgery, tiny_brown):
    data = ["--data", str(tiny_brown)]
    assert surgery.parse_args(data)[1].keep_by == "block"
    assert surgery.parse_args([*data, "--max-fvu", "0.3", "--keep-by", "output"])[1].keep_by == "output"
    assert surgery.parse_args([*data, "--keep-count", "3", "--keep-by", "output"])[1].keep_count == 3


def test_calibrated_surgery_counts_checked_against_the_data(surgery, capsys, tiny_brown, monkeypatch):
    monkeypatch.setattr(surgery, "load_minilm", lambda: pytest.fail("the model loaded before the data was checked"))
    line = _usage_error(capsys, surgery.main, ["--data", str(tiny_brown), "--num-calibration", "100000"])
    assert "--num-calibration is 100,000, but the calibration half's sample files hold only 45 sentences" in line
    line = _usage_error(capsys, surgery.main, ["--data", str(tiny_brown), "--num-calibration", "4"])
    assert "--num-eval is 400" in line
    cal, ev = surgery.brown_split(tiny_brown, 45, 45, 0)
    assert len(cal) == len(ev) == 45 and not set(cal) & set(ev)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    return BertModel(config).eval()


def test_calibrated_surgery_deleted_model_has_no_ffn_and_its_output_is_zero(surgery):
    """``delete_ffns`` removes the FFNs (no parameters, no compute): each layer is ``LayerNorm(h + 0)``, as with its
    ``output.dense`` zeroed, and the original is untouched."""
    model = _tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    ffn = 2 * (8 * 16 + 16 + 16 * 8 + 8)
    assert surgery.ffn_params(model) == ffn
    deleted = surgery.delete_ffns(model)
    assert sum(p.numel() for p in deleted.parameters()) == total - ffn and surgery.ffn_params(deleted) == 0
    zeroed = copy.deepcopy(model)
    for layer in zeroed.encoder.layer:
        torch.nn.init.zeros_(layer.output.dense.weight)
        torch.nn.init.zeros_(layer.output.dense.bias)
    ids = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        assert torch.allclose(deleted(ids).last_hidden_state, zeroed(ids).last_hidden_state, atol=1e-6)
        assert not torch.allclose(model(ids).last_hidden_state, zeroed(ids).last_hidden_state, atol=1e-3)
    assert sum(p.numel() for p in model.parameters()) == total
    first_kept = surgery.delete_ffns(model, keep=(0,))  # the control of the "first FFN kept" variants
    assert surgery.ffn_params(first_kept) == ffn // 2
    with torch.no_grad():
        kept_layer, layer = first_kept.encoder.layer[0], model.encoder.layer[0]
        h = torch.randn(2, 5, 8)
        assert torch.equal(kept_layer.output(kept_layer.intermediate(h), h), layer.output(layer.intermediate(h), h))
        assert isinstance(first_kept.encoder.layer[1].output.dense, surgery.ZeroBranch)


def test_calibrated_surgery_references_delete_one_ffn_or_quantise_a_copy(surgery, monkeypatch, tmp_path):
    """The reference rows: ``only layer i's FFN deleted`` removes that FFN alone, and the int8 row quantises every
    Linear of a copy (the original untouched), which then computes close to, not exactly, the original."""
    assert [surgery.ONE_DELETED[v] for v in surgery.ONE_DELETED] == list(range(6))
    assert set(surgery.ONE_DELETED) | {surgery.INT8} <= set(surgery.VARIANTS)
    torch.manual_seed(0)
    model = _tiny_bert()
    ids = torch.randint(0, 30, (3, 7))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
        quantised = surgery.int8_dynamic(model)
        out = quantised(ids).last_hidden_state
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert not any(type(m) is torch.nn.Linear for m in quantised.modules())
    assert torch.equal(model(ids).last_hidden_state, ref)
    assert 0 < (out - ref).abs().max() < 0.1 * ref.abs().max()
    rows = []
    monkeypatch.setattr(surgery, "load_minilm", lambda: (None, model))
    monkeypatch.setattr(surgery, "brown_split", lambda *a: (["a"], ["b", "c", "d"]))
    monkeypatch.setattr(surgery, "doc_sentences", lambda *a: ["e", "f", "g"])
    monkeypatch.setattr(surgery, "batches", lambda tok, s, *a: [{"input_ids": torch.randint(0, 30, (len(s), 5))}])
    monkeypatch.setattr(
        surgery, "embed", lambda m, bl: rows.append(m) or torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    )
    out = tmp_path / "rows.json"
    argv = ["--variants", "original", "only layer 1's FFN deleted", surgery.INT8, "--data", __file__]
    surgery.main([*argv, "--threads", "1", "--json", str(out)])
    one_deleted, int8 = rows[-4], rows[-2]  # each variant embeds both text sources
    written = json.loads(out.read_text())
    assert list(written[0]["nn_margins"]) == [k for k in written[0] if k.startswith(("Brown", "repository"))]
    assert "nn_margins" not in written[1] and written[2]["params"] == sum(p.numel() for p in model.parameters())
    assert isinstance(one_deleted.encoder.layer[1].output.dense, surgery.ZeroBranch)
    assert type(one_deleted.encoder.layer[0].output.dense) is torch.nn.Linear
    assert int8 is not model and not any(type(m) is torch.nn.Linear for m in int8.modules())


def test_calibrated_surgery_nn_margins_of_the_original(surgery):
    """Three unit vectors at angles 0, 0.1 and 0.3: nearest minus second-nearest cosine is cos 0.1 - cos 0.3,
    cos 0.1 - cos 0.2 and cos 0.2 - cos 0.3."""
    angles = torch.tensor([0.0, 0.1, 0.3], dtype=torch.float64)
    ref = torch.stack([angles.cos(), angles.sin()], dim=1)
    margins = surgery.nn_margins(ref)
    c = math.cos
    assert margins["median"] == pytest.approx(c(0.2) - c(0.3))  # the middle one of the three margins
    assert margins["under_0.01"] == 0 and margins["under_0.02"] == pytest.approx(1 / 3)  # cos 0.1 - cos 0.2 = 0.0149


def test_calibrated_surgery_heal_deleted_trains_all_but_the_embeddings_towards_the_original(surgery):
    """The healing control: the FFN-less model's hidden-state loss falls, its embedding tables stay as they were,
    and the other weights move (but the pooler's, which no distilled state depends on)."""
    import dataclasses

    from han_surgery.surgery.calibration import CalibrationConfig

    torch.manual_seed(0)
    model = _tiny_bert()
    with torch.no_grad():  # FFNs that matter: deleting them moves every hidden state
        for layer in model.encoder.layer:
            layer.output.dense.weight.normal_(0, 1.0)
    cal = [{"input_ids": torch.randint(0, 30, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}] * 2
    config = dataclasses.replace(surgery.HEAL_BODY, heal_steps=30, heal_lr=1e-2)
    healed, (before, after) = surgery.heal_deleted(model, cal, config)
    assert after < 0.5 * before, (before, after)
    start = surgery.delete_ffns(model)
    for (name, p), p0 in zip(healed.named_parameters(), start.parameters(), strict=True):
        moved = not torch.equal(p, p0)
        assert moved == (("embeddings" not in name or "LayerNorm" in name) and "pooler" not in name), name
    with pytest.raises(ValueError, match="no new parameters"):
        surgery.heal_deleted(model, cal, CalibrationConfig(heal_steps=2))


def test_calibrated_surgery_heal_deleted_distils_what_hanify_distils_in_the_row_it_controls(surgery, monkeypatch):
    """hanify distils the states after every layer it planned to rewrite: a layer left out by HanConfig(exclude=...)
    is no target, but one kept by calibration (keep_by="output") is, as its targets are fixed before the choice. The
    kept-by-output controls distilled the deleted layers only (the scored last layer not at all for 0/4/5 kept)."""
    import dataclasses

    from han_surgery import HanConfig, hanify
    from han_surgery.surgery.calibration import CalibrationConfig

    seen = []
    monkeypatch.setattr(surgery, "heal_like_hanify", lambda model, base, cal, paths, config: seen.append(paths))
    surgery.heal_deleted(_tiny_bert(), [], surgery.HEAL_BODY)
    surgery.heal_deleted(_tiny_bert(), [], surgery.HEAL_BODY, surgery.Deletion((0,)))
    surgery.heal_deleted(_tiny_bert(), [], surgery.HEAL_BODY, surgery.Deletion((0,), distil_kept=True))
    assert seen == [["encoder.layer.0", "encoder.layer.1"], ["encoder.layer.1"], ["encoder.layer.0", "encoder.layer.1"]]
    assert surgery.HEALED_DELETIONS["deleted +heal body, layers 0/4/5 kept"].distil_kept
    assert not surgery.HEALED_DELETIONS["deleted +heal body, first FFN kept"].distil_kept
    # and hanify itself, where calibration keeps a block: every planned layer is still a healing target
    from han_surgery.surgery.calibration import calibrate

    targets = []
    real = calibrate.heal
    monkeypatch.setattr(
        calibrate, "heal", lambda m, b, t, paths, *a, **k: targets.append(list(paths)) or real(m, b, t, paths, *a, **k)
    )
    model = _tiny_bert()
    cal = [{"input_ids": torch.randint(0, 30, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}] * 3
    config = CalibrationConfig(
        steps=2, tokens_per_block=32, progress=False, keep_count=1, keep_by="output", heal_steps=1
    )
    report = hanify(model, HanConfig(), calibration=cal, calibration_config=config)
    assert len(report.calibration.kept) == 1 and targets == [["encoder.layer.0", "encoder.layer.1"]]
    # --heal-steps 0: no healing, as hanify heals none (it was a ZeroDivisionError in the loss over no batches)
    assert surgery.heal_deleted(_tiny_bert(), [], dataclasses.replace(surgery.HEAL_BODY, heal_steps=0))[1] is None


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--num-eval", "1"], ["--record-batches", "0"]])
def test_calibration_tradeoff_refuses_bad_flags(capsys, tiny_brown, argv):
    tradeoff = _load("calibration_tradeoff")
    _usage_error(capsys, tradeoff.main, [*argv, "--data", str(tiny_brown)])


def test_calibration_tradeoff_counts_checked_before_the_model_loads(capsys, tiny_brown, monkeypatch):
    tradeoff = _load("calibration_tradeoff")
    monkeypatch.setattr(tradeoff, "load_minilm", lambda: pytest.fail("the model loaded before the data was checked"))
    assert "--num-calibration" in _usage_error(capsys, tradeoff.main, ["--data", str(tiny_brown)])


def test_zoo_heldout_refuses_zero_threads(capsys):
    zoo = _load("zoo_heldout")
    _usage_error(capsys, zoo.main, ["--threads", "0"])


# --- calibrated_mnist.py -------------------------------------------------------------------------------------------


def test_calibrated_mnist_base_action(cal_mnist, tmp_path):
    assert cal_mnist.base_action(tmp_path / "new") == "train"
    (tmp_path / "empty").mkdir()
    assert cal_mnist.base_action(tmp_path / "empty") == "train"
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "training_args.json").write_text("{}")
    (run / "checkpoint-100").mkdir()
    assert cal_mnist.base_action(run) == "retrain"
    (run / "model.safetensors").write_bytes(b"")
    assert cal_mnist.base_action(run) == "load"
    other = tmp_path / "mnist"
    (other / "base_more").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder without model.safetensors"):
        cal_mnist.base_action(other)
    with pytest.raises(ValueError, match="not a folder"):
        cal_mnist.base_action(other / "notes.txt")


def test_calibrated_mnist_refuses_a_folder_it_would_wipe(cal_mnist, capsys, tiny_mnist, tmp_path, monkeypatch):
    other = tmp_path / "mnist"
    (other / "base_more").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    monkeypatch.setattr(cal_mnist.subprocess, "run", lambda *a, **k: pytest.fail("training started"))
    line = _usage_error(capsys, cal_mnist.main, ["--base", str(other), "--data", str(tiny_mnist)])
    assert "not a base run of this script" in line
    assert (other / "notes.txt").read_text() == "mine" and (other / "base_more").is_dir()


def test_calibrated_mnist_overwrites_only_an_earlier_base_run(cal_mnist, tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(cal_mnist.subprocess, "run", lambda cmd, **k: commands.append(cmd))
    cal_mnist.train_base(tmp_path / "base", tmp_path / "d.npz", 1)
    cal_mnist.train_base(tmp_path / "base", tmp_path / "d.npz", 1, overwrite=True)
    assert "--overwrite" not in commands[0] and "--overwrite" in commands[1]


def _tiny_vit():
    import timm

    kwargs = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=2, num_heads=2)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def test_calibrated_mnist_deleted_model_has_no_mlp_and_each_block_adds_attention_only(cal_mnist):
    """``delete_mlps`` removes every MLP and its pre-norm: each block is ``x + attn(norm1(x))``, the original is
    untouched, and the healing control (images, not token dicts) moves the weights and lowers its loss."""
    from han_surgery.surgery.calibration import CalibrationConfig

    torch.manual_seed(0)
    model = _tiny_vit()
    with torch.no_grad():  # MLPs that matter: deleting them moves every hidden state
        for block in model.blocks:
            block.mlp.fc2.weight.normal_(0, 1.0)
    total = sum(p.numel() for p in model.parameters())
    mlp = 2 * (8 * 32 + 32 + 32 * 8 + 8 + 2 * 8)  # fc1, fc2 and norm2, per block
    deleted = cal_mnist.delete_mlps(model)
    assert sum(p.numel() for p in deleted.parameters()) == total - mlp
    assert sum(p.numel() for p in model.parameters()) == total
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block in model.blocks:
            h = h + block.attn(block.norm1(h))
        expected = model.forward_head(model.norm(h))
        assert torch.allclose(deleted(x), expected, atol=1e-5)
        assert not torch.allclose(model(x), expected, atol=1e-3)
    images = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    config = CalibrationConfig(heal_steps=30, heal_lr=1e-2, heal_params="all")
    before, after = cal_mnist.heal_like_hanify(deleted, model, images, ["blocks.0", "blocks.1"], config)
    assert after < 0.5 * before, (before, after)
    start = cal_mnist.delete_mlps(model)
    moved = [not torch.equal(p, p0) for p, p0 in zip(deleted.parameters(), start.parameters(), strict=True)]
    assert sum(moved) > len(moved) // 2
    first_kept = cal_mnist.delete_mlps(model, keep=(0,))  # the control of the "first MLP kept" variant
    assert sum(p.numel() for p in first_kept.parameters()) == total - mlp // 2
    with torch.no_grad():
        kept, block = first_kept.blocks[0], model.blocks[0]
        h = torch.randn(3, 4, 8)
        assert torch.equal(kept.mlp(kept.norm2(h)), block.mlp(block.norm2(h)))
        assert isinstance(first_kept.blocks[1].mlp, cal_mnist.ZeroBranch)


@pytest.mark.parametrize(
    "argv",
    [
        ["--threads", "0"],
        ["--num-calibration", "0"],
        ["--epochs", "0"],
        ["--heal-lr", "0"],
        ["--steps", "0"],
        ["--keep-by", "output"],  # without --max-fvu it was ignored, as calibrated_surgery.py refuses
    ],
)
def test_calibrated_mnist_refuses_bad_flags(cal_mnist, capsys, tiny_mnist, tmp_path, argv):
    _usage_error(capsys, cal_mnist.main, [*argv, "--data", str(tiny_mnist), "--base", str(tmp_path / "b")])


def test_calibrated_mnist_calibration_count_checked_against_the_data(cal_mnist, capsys, tiny_mnist, tmp_path):
    base = tmp_path / "base"
    line = _usage_error(capsys, cal_mnist.main, ["--data", str(tiny_mnist), "--base", str(base)])
    assert "--num-calibration is 2,048, but the training split has" in line
    assert not base.exists()


# --- calibrated_brown_genre.py -------------------------------------------------------------------------------------


def test_brown_genre_settings_mismatch(brown):
    recorded = {"seed": 0, "data": "/d.tsv", "data_bytes": 10, "num_train": 64, "base_epochs": 1}
    assert brown.settings_mismatch(recorded, dict(recorded)) == []
    current = {**recorded, "seed": 1, "base_epochs": 5}
    assert brown.settings_mismatch(recorded, current) == ["seed: 0 -> 1", "base_epochs: 1 -> 5"]
    assert brown.settings_mismatch({"seed": 0}, {"seed": 0, "max_length": 64}) == ["max_length: None -> 64"]


def test_brown_genre_cached_base(brown, tmp_path, tiny_brown):
    import argparse

    args = argparse.Namespace(
        seed=0, data=tiny_brown, num_train=8, base_epochs=1, max_length=32, batch_size=4, base_dir=tmp_path / "b.st"
    )
    settings = brown.base_settings(args)
    assert settings["data"] == str(tiny_brown.resolve()) and settings["data_bytes"] == tiny_brown.stat().st_size
    assert brown.cached_base(args.base_dir, settings) == (False, [])
    args.base_dir.write_bytes(b"weights")
    with pytest.raises(ValueError, match="no b.st.json beside it"):
        brown.cached_base(args.base_dir, settings)
    brown.settings_path(args.base_dir).write_text(json.dumps(settings))
    assert brown.cached_base(args.base_dir, settings) == (True, [])
    reuse, differences = brown.cached_base(args.base_dir, {**settings, "seed": 1})
    assert not reuse and differences == ["seed: 0 -> 1"]


def test_brown_genre_refuses_an_unrecorded_cache_and_oversized_counts(brown, capsys, tiny_brown, tmp_path):
    cache = tmp_path / "base.safetensors"
    cache.write_bytes(b"weights")
    line = _usage_error(capsys, brown.main, ["--data", str(tiny_brown), "--base-dir", str(cache), "--num-train", "8"])
    assert "delete it or give another --base-dir" in line and cache.read_bytes() == b"weights"
    fresh = ["--data", str(tiny_brown), "--base-dir", str(tmp_path / "new.safetensors")]
    assert "--num-train is 4,096" in _usage_error(capsys, brown.main, fresh)
    assert "--num-test is 1,000" in _usage_error(capsys, brown.main, [*fresh, "--num-train", "8"])
    for flag in ("--threads", "--batch-size", "--base-epochs", "--max-length"):
        _usage_error(capsys, brown.main, [*fresh, flag, "0"])


def test_brown_genre_split_is_file_disjoint(brown, tiny_brown):
    train, test, genres = brown.split(tiny_brown, 30, 15, 0)
    assert len(genres) == 15
    assert not {s for s, _ in train} & {s for s, _ in test}


# --- mnist_models.py -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "-1"],
        ["--epochs", "0"],
        ["--batch-size", "0"],
        ["--threads", "0"],
        ["--lr", "0"],
        ["--n-test", "0"],
    ],
)
def test_mnist_models_refuses_bad_flags(mnist_models, capsys, tiny_mnist, argv):
    _usage_error(capsys, mnist_models.main, [*argv, "--data", str(tiny_mnist)])


def test_mnist_models_counts_checked_against_the_data(mnist_models, capsys, tiny_mnist):
    line = _usage_error(capsys, mnist_models.main, ["--data", str(tiny_mnist), "--n-test", "10"])
    assert "--n-train is 8,000, but the data's train pool (80/20 per class) has 80" in line
    line = _usage_error(capsys, mnist_models.main, ["--data", str(tiny_mnist), "--n-train", "10"])
    assert "--n-test is 2,000" in line


def test_mnist_models_prints_by_default_and_describes_its_data(mnist_models, capsys, tiny_mnist, monkeypatch):
    card = ROOT / "model_cards" / "MNIST.md"
    before = card.read_bytes()
    monkeypatch.setattr(mnist_models.SPECS[3], "overrides", dict(embed_dim=16, mlp_ratio=(0.5, 1.0)))
    argv = ["--data", str(tiny_mnist), "--n-train", "16", "--n-test", "20", "--epochs", "0.5", "--batch-size", "8"]
    rows = mnist_models.main([*argv, "--models", "han_mixer_m2h0_32"])
    assert len(rows) == 1 and rows[0]["steps"] == 1
    out = capsys.readouterr().out
    assert card.read_bytes() == before
    assert "| `han_mixer_m2h0_32` (embed_dim=16" in out
    row = next(line for line in out.splitlines() if line.startswith("| `han_mixer_m2h0_32`"))
    assert row.endswith(f"| {rows[0]['final_loss']:.3f} | {100 * rows[0]['test_acc']:.2f}% |"), row  # what it measured
    assert f"on 16 of the 100 MNIST digits in `{mnist_models.data_facts(tiny_mnist)['path']}`" in out
    assert "first 80 digits hold only the classes 0-7" in out
    assert "Load average when this table was written" in out and "shared, loaded" not in out


# --- model_table.py, layer_speed.py, model_speed.py ----------------------------------------------------------------


def test_model_table_refuses_a_file_without_markers_before_counting(capsys, tmp_path, monkeypatch):
    table = _load("model_table")
    monkeypatch.setattr(table, "table", lambda: pytest.fail("counted before checking --out"))
    out = tmp_path / "notes.md"
    out.write_text("# my notes\n")
    assert "no <!-- table:begin" in _usage_error(capsys, table.main, ["--out", str(out)])
    assert out.read_text() == "# my notes\n"
    monkeypatch.setattr(table, "table", lambda: "| t |")
    fresh = tmp_path / "new.md"
    table.main(["--out", str(fresh)])
    assert "| t |" in fresh.read_text()


def _timings_ok(values: list[float], count: int) -> bool:
    """``count`` measured times, each positive and finite."""
    return len(values) == count and all(math.isfinite(v) and v > 0 for v in values)


def _median_ratio(num: list[float], den: list[float]) -> float:
    """What the speed scripts print as a ratio: the median over rounds of the per-round ratio."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def test_model_speed_json_folder_made_before_measuring(capsys, tmp_path):
    speed = _load("model_speed")
    out = tmp_path / "a" / "b" / "speed.json"
    speed.main(["--rows", "paper", "--only", "no such row", "--no-memory", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == {}
    (tmp_path / "file").write_text("")
    line = _usage_error(capsys, speed.main, ["--rows", "paper", "--json", str(tmp_path / "file" / "x.json")])
    assert "cannot create its folder" in line


def test_model_speed_prints_and_writes_what_it_measured(capsys, tmp_path):
    """One real row (the smallest pair): every job timed each round, and the printed ratios are those of the times."""
    speed = _load("model_speed")
    label = "HanNet (one HanStack) vs FCNet1 (batch 100)"
    out = tmp_path / "speed.json"
    speed.main(["--rows", "paper", "--only", "one HanStack", "--rounds", "2", "--threads", "1", "--no-memory",
                "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["rounds"] == 2 and list(report["rows"]) == [label]
    row = report["rows"][label]
    times = row.pop("times_s")
    jobs = ["peer train", "han train", "han torch-path train", "peer infer", "han infer", "han torch-path infer"]
    assert list(times) == jobs and all(_timings_ok(times[job], 2) for job in jobs), times
    ratios = {
        "train peer/han": _median_ratio(times["peer train"], times["han train"]),
        "inference peer/han": _median_ratio(times["peer infer"], times["han infer"]),
        "train torch-path/kernel": _median_ratio(times["han torch-path train"], times["han train"]),
    }
    assert row == pytest.approx(ratios, rel=1e-12)
    for job, values in times.items():
        low, mid = min(values) * 1e3, statistics.median(values) * 1e3
        assert f"  {job:22s} {low:9.2f} ms min  {mid:9.2f} ms median" in printed
    assert "  " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()) + "\n" in printed
    assert f"| {label} | " + " | ".join(f"{v:.2f}x" for v in ratios.values()) + " |" in printed


def test_layer_speed_json_folder_made_before_measuring(capsys, tmp_path):
    layer = _load("layer_speed")
    (tmp_path / "file").write_text("")
    line = _usage_error(capsys, layer.main, ["--json", str(tmp_path / "file" / "x.json")])
    assert "cannot create its folder" in line
    out = tmp_path / "a" / "b" / "layers.json"
    layer.main(["--rows", "4", "--widths", "16", "--rounds", "2", "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["rows"] == 4 and list(report["seconds"]) == ["16"]

    # every candidate timed in every round (the forward-only ones have no fwd+bwd), each time positive and finite
    times = report["seconds"]["16"]
    assert list(times) == layer.NAMES
    for name, kinds in times.items():
        assert _timings_ok(kinds["fwd"], 2), (name, kinds)
        assert _timings_ok(kinds["fwd+bwd"], 0 if name in layer.FORWARD_ONLY else 2), (name, kinds)

    # the table prints those times (ms: min, then median) and the ratios are theirs
    printed = capsys.readouterr().out.splitlines()
    for kind in ("fwd", "fwd+bwd"):
        row = next(line for line in printed if line.split()[:2] == ["16", kind])
        cells = [[min(v) * 1e3, statistics.median(v) * 1e3] if (v := times[name][kind]) else [] for name in layer.NAMES]
        numbers = [float(n) for n in re.findall(r"\d+\.\d+", row)]
        assert numbers == pytest.approx([c for pair in cells for c in pair], abs=0.0051), row
    ratio_lines = [line for line in printed[printed.index("n=16") + 1 :] if line.startswith("  ")]
    assert len(ratio_lines) == 9
    for line in ratio_lines:  # e.g. "  fwd+bwd  paper / han     1.23x ( 1.20x)   [>= 4]"
        kind, num, den, median, minima = re.match(r"  (\S+)\s+(\S+) / (\S+)\s+(\S+)x \(\s*(\S+)x\)", line).groups()
        assert float(median) == pytest.approx(_median_ratio(times[num][kind], times[den][kind]), abs=0.0051), line
        assert float(minima) == pytest.approx(min(times[num][kind]) / min(times[den][kind]), abs=0.0051), line


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_model_speed_memory_baseline_includes_the_kernel(capsys, monkeypatch):
    speed = _load("model_speed")
    from han_surgery.kernels import cpu

    calls = []
    monkeypatch.setattr(cpu, "available", lambda: calls.append("kernel") or True)
    status = {"VmRSS": 100.0, "VmHWM": 130.0}  # the resident set after imports, the peak after two steps
    monkeypatch.setattr(speed, "_status_mb", lambda field: calls.append(field) or status[field])
    speed.memory_child("paper", "hannet", "peer", 4)
    assert calls == ["kernel", "VmRSS", "VmHWM"]
    assert json.loads(capsys.readouterr().out) == {"peak_mb": 30.0}  # the peak above the baseline


def test_layer_speed_times_each_backward_into_fresh_gradients(monkeypatch):
    """A timed training call starts from no gradients, as a step after ``zero_grad()`` does: the parameters'
    gradients after many calls are one call's, not their sum (accumulating would time an extra add)."""
    layer = _load("layer_speed")
    linear = torch.nn.Linear(16, 16)
    monkeypatch.setattr(layer, "candidates", lambda n: {"linear": linear})
    layer.measure(16, rows=8, rounds=3)
    torch.manual_seed(0)  # the inputs measure() draws
    x, grad = torch.randn(8, 16), torch.randn(8, 16)
    assert torch.allclose(linear.weight.grad, grad.T @ x, atol=1e-5)
    assert torch.allclose(linear.bias.grad, grad.sum(0), atol=1e-5)
