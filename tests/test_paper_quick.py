"""The ``--quick`` smoke runs of every paper experiment, through the ``han-surgery`` CLI.

Those on the shipped data skip cleanly when ../shared/data is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from han_surgery.cli import main

DATA = Path.cwd().parent / "shared" / "data"
needs = lambda sub: pytest.mark.skipif(not (DATA / sub).exists(), reason=f"../shared/data/{sub} not available")  # noqa: E731


def _run(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / argv[0]
    assert main(["paper", *argv, "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["command"].startswith("han-surgery paper")
    assert (out / "results.md").read_text().startswith("#")
    return results


@needs("checkerboard")
def test_checkerboard_quick(tmp_path):
    res = _run(tmp_path, "checkerboard", "--data", str(DATA / "checkerboard"))
    assert [r["variant"] for r in res["rows"]] == ["a", "b", "e", "f1", "fcnet"]
    for row in res["rows"]:
        assert 40 < row["final_test_acc"] <= 100
        assert row["per_lr"][0]["final_train_loss"] < 0.3  # starts near 0.5 for an untrained net
    assert res["rows"][0]["params"] == 3032 and res["rows"][-1]["params"] == 51_002
    assert (tmp_path / "checkerboard" / "boards.png").stat().st_size > 0


@needs("regression")
def test_regression_quick(tmp_path):
    res = _run(tmp_path, "regression")
    assert {r["dataset"] for r in res["rows"]} == {"bikesharing", "calhousing", "elevators"}
    assert all(np.isfinite(r["rmse_mean"]) and r["rmse_mean"] > 0 and np.isfinite(r["r2_mean"]) for r in res["rows"])
    assert {r["model"]: r["params"] for r in res["rows"] if r["dataset"] == "calhousing"} == {
        "hannet": 8 * 200 + 200 + 19 * 400 + 201,
        "fcnet1": 8 * 50 + 50 + 4 * 2550 + 51,
        "fcnet2": 8 * 200 + 200 + 4 * 40200 + 201,
    }


@needs("mnist")
def test_mnist_quick(tmp_path):
    res = _run(tmp_path, "mnist")
    han, fc = res["rows"]
    assert han["params"] == 39_210 and fc["params"] == 623_290
    for row in (han, fc):
        assert row["clean"]["mean"] > 50  # 60 Adam steps already learn MNIST well above chance
        assert row["pgd_linf@0.1"]["mean"] <= row["clean"]["mean"]
    assert (tmp_path / "mnist" / "robustness.png").stat().st_size > 0


def test_approximation_quick(tmp_path):
    res = _run(tmp_path, "approximation", "--dims", "2,3")
    assert [(r["student"], r["target"]) for r in res["rows"]][:2] == [("han3", "fc1"), ("fc1", "han3")]
    fc_self = next(r for r in res["rows"] if r["student"] == r["target"] == "fc1")
    assert fc_self["cells"]["2"]["relative_rmse_mean"] < 0.5
