"""Smoke run of benchmarks/mnist_models.py (the full run is not part of CI)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import timm
import torch

import han_surgery  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mnist_models.py"
DATA = ROOT.parent / "shared" / "data" / "mnist" / "mnist10k.npz"

pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"MNIST data not found at {DATA}")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("mnist_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_split_is_stratified_and_disjoint(bench):
    x_train, y_train, x_test, y_test = bench.load_mnist(DATA)
    assert x_train.shape == (8000, 1, 28, 28) and x_test.shape == (2000, 1, 28, 28)
    # the file is sorted by label: a naive first-8000 / last-2000 split would miss classes
    assert torch.bincount(y_train, minlength=10).min() > 600
    assert torch.bincount(y_test, minlength=10).min() > 150
    train_rows = {row.numpy().tobytes() for row in x_train.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in x_test.flatten(1)[:200])
    assert bench.prepare(x_test[:2], 64).shape == (2, 3, 64, 64)


def test_smoke_run_writes_the_table(bench, tmp_path, monkeypatch):
    """Each model's accuracy is the fraction of the held-out digits its trained model gets right, and the table
    prints what was measured."""
    measured, real_accuracy = [], bench.accuracy

    def accuracy(model, x, y, img_size, **kwargs):
        acc = real_accuracy(model, x, y, img_size, **kwargs)
        with torch.no_grad():
            right = (model(bench.prepare(x, img_size)).argmax(1) == y).sum().item()
        measured.append((x, y, acc, right))
        return acc

    monkeypatch.setattr(bench, "accuracy", accuracy)
    out = tmp_path / "MNIST.md"
    rows = bench.main(["--epochs", "1", "--n-train", "64", "--n-test", "50", "--batch-size", "32", "--out", str(out)])
    assert [r["spec"].name for r in rows] == [s.name for s in bench.SPECS]
    _, _, x_test, y_test = bench.load_mnist(DATA, 64, 50)
    text = out.read_text()
    assert len(measured) == len(rows)
    for r, (x, y, acc, right) in zip(rows, measured, strict=True):
        spec = r["spec"]
        assert torch.equal(x, x_test) and torch.equal(y, y_test)  # the 50 held-out digits, not training ones
        assert r["test_acc"] == acc == right / 50, (spec.name, acc, right)
        assert r["steps"] == 2 and math.isfinite(r["final_loss"]) and r["train_s"] > 0
        expected = sum(p.numel() for p in timm.create_model(spec.name, num_classes=10, **spec.overrides).parameters())
        assert r["params"] == expected
        row = f"| {spec.label} | {spec.img_size}x{spec.img_size} | {expected:,} |"
        assert row in text
        measured_cells = f"| {r['train_s']:.0f} | {r['final_loss']:.3f} | {100 * r['test_acc']:.2f}% |"
        assert next(line for line in text.splitlines() if line.startswith(row)).endswith(measured_cells)
    assert "(baseline)" in text and "0.74x" in text  # han_mobilevit_xxs vs mobilevit_xxs with a 10-class head
