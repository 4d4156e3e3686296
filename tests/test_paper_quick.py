"""The ``--quick`` smoke runs of every paper experiment, through ``han_surgery.paper.cli.main``, and its error handling.

Those on the shipped data skip cleanly when ../shared/data is absent; mixer and mobilevit run
on a tiny generated CIFAR-10-format folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from han_surgery.paper.cli import main
from han_surgery.paper.image_data import load_image_dataset, write_cifar10_binary

DATA = Path.cwd().parent / "shared" / "data"
needs = lambda sub: pytest.mark.skipif(not (DATA / sub).exists(), reason=f"../shared/data/{sub} not available")  # noqa: E731


def _run(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / argv[0]
    assert main([*argv, "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["command"].startswith(f"han-surgery paper {argv[0]}")
    assert (out / "results.md").read_text().startswith("#")
    return results


@needs("checkerboard")
def test_checkerboard_quick(tmp_path):
    res = _run(tmp_path, "checkerboard", "--data", str(DATA / "checkerboard"))
    assert [r["variant"] for r in res["rows"]] == ["a", "b", "c", "d", "e", "f1", "f2", "fcnet"]
    assert [r["paper_test_acc"] for r in res["rows"]] == [99.2, 66.2, 77.6, 81.4, 85.3, 86.7, 75.5, 85.0]
    for row in res["rows"]:
        assert 40 < row["final_test_acc"] <= 100
        assert row["per_lr"][0]["final_train_loss"] < 0.5  # an untrained net starts near 0.5
    assert res["rows"][0]["params"] == 3032 and res["rows"][-1]["params"] == 51_002
    assert (tmp_path / "checkerboard" / "boards.png").stat().st_size > 0


@needs("regression")
def test_regression_quick(tmp_path):
    res = _run(tmp_path, "regression", "--datasets", "calhousing")
    assert {(r["train_fraction"], r["model"]) for r in res["rows"]} == {
        (f, m) for f in (1.0, 0.1) for m in ("hannet", "fcnet1", "fcnet2")
    }
    assert all(np.isfinite(r["rmse_mean"]) and r["rmse_mean"] > 0 and np.isfinite(r["r2_mean"]) for r in res["rows"])
    assert {r["model"]: r["params"] for r in res["rows"]} == {
        "hannet": 8 * 200 + 200 + 19 * 400 + 201,
        "fcnet1": 8 * 50 + 50 + 4 * 2550 + 51,
        "fcnet2": 8 * 200 + 200 + 4 * 40200 + 201,
    }
    assert res["rows"][0]["paper_rmse"] == 0.431 and res["rows"][3]["paper_rmse"] == 0.476
    assert len(res["runs"]) == 2 * 3 * 2 * 2  # fractions x models x seeds x lrs


@needs("mnist")
def test_mnist_quick(tmp_path):
    res = _run(tmp_path, "mnist")
    rows = {r["model"]: r for r in res["rows"]}
    assert list(rows) == ["hannet", "fcnet", "fcnet-trades", "fcnet-at"]
    assert rows["hannet"]["params"] == 39_210 and rows["fcnet"]["params"] == 623_290
    for row in rows.values():
        acc = row["accuracy"]
        assert acc["clean"] > 25  # 20 Adam steps already learn MNIST well above chance (10%)
        assert acc["pgd_linf@0.05"] <= acc["pgd_linf@0.02"] <= acc["clean"]
    assert (tmp_path / "mnist" / "robustness.png").stat().st_size > 0


def test_approximation_quick(tmp_path):
    res = _run(tmp_path, "approximation", "--dims", "2,3")
    assert {(r["student"], r["target"], r["d"]) for r in res["rows"]} == {
        (s, t, d) for s in ("fc1", "han3") for t in ("fc1", "han3") for d in (2, 3)
    }
    for row in res["rows"]:
        assert len(row["grid"]) == 16 and np.isfinite(row["test_rmse"])
        assert row["paper_rmse"] is not None and row["student_params"] > 0


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.arange(30) % 10
    write_cifar10_binary(root, images[:20], labels[:20], images[20:], labels[20:])
    return root


def test_cifar_binary_round_trip(tiny_cifar):
    data = load_image_dataset(tiny_cifar)
    assert data.name == "cifar10" and data.num_classes == 10 and data.image_size == 32
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (10, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    expected = torch.randint(0, 256, (30, 3, 32, 32), generator=gen, dtype=torch.uint8)
    assert torch.equal(data.x_train, expected[:20]) and torch.equal(data.y_test, torch.arange(20, 30) % 10)


@pytest.mark.parametrize("experiment, rows", [("mixer", 2), ("mobilevit", 2)])
def test_vision_quick(tmp_path, tiny_cifar, experiment, rows):
    res = _run(tmp_path, experiment, "--data", str(tiny_cifar), "--device", "cpu")
    assert res["config"]["dataset"] == "cifar10" and len(res["rows"]) == rows
    for row in res["rows"]:
        assert row["paper_error"] is not None and 0 <= row["test_error"] <= 100 and row["steps"] == 2


def _error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("han-surgery paper: "), err
    return err


def test_user_errors_end_as_one_line_and_exit_2(tmp_path, capsys):
    assert "--lrs" in _error_line(capsys, ["regression", "--lrs", "fast"])
    assert "invalid int value" in _error_line(capsys, ["regression", "--epochs", "many"])
    assert "unrecognized arguments" in _error_line(capsys, ["mnist", "--no-such-option"])
    assert "--variants" in _error_line(capsys, ["checkerboard", "--variants", "z"])
    missing = tmp_path / "nowhere.csv"
    assert str(missing) in _error_line(capsys, ["regression", "--csv", str(missing)])
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    assert "not a readable numeric CSV" in _error_line(capsys, ["regression", "--csv", str(bad)])
    assert "--data" in _error_line(capsys, ["mixer"])
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert "do not unpickle" in _error_line(capsys, ["mixer", "--data", str(tmp_path)])
    assert "--models" in _error_line(capsys, ["mnist", "--models", "resnet"])


def test_help_returns_0(capsys):
    assert main(["--help"]) == 0
    assert "checkerboard" in capsys.readouterr().out


def test_out_is_checked_before_the_experiment_runs(tmp_path, capsys, monkeypatch):
    """A user's folder is never written into without --overwrite; a file or an unwritable --out fails up front."""
    from han_surgery.paper import approximation

    ran = []
    monkeypatch.setattr(approximation, "run", lambda args: ran.append(args.out))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"my": "data"}')
    (tmp_path / "afile.txt").write_text("mine")
    assert "pass --overwrite" in _error_line(capsys, ["approximation", "--quick", "--out", str(mine)])
    assert "is a file, not a folder" in _error_line(capsys, ["approximation", "--out", str(tmp_path / "afile.txt")])
    assert "cannot write in /proc" in _error_line(capsys, ["approximation", "--out", "/proc/hanout"])
    assert ran == [] and (mine / "results.json").read_text() == '{"my": "data"}'
    # --overwrite, an empty or new folder, or a folder an earlier paper run wrote: the experiment runs
    assert main(["approximation", "--quick", "--out", str(mine), "--overwrite"]) == 0
    (tmp_path / "empty").mkdir()
    assert main(["approximation", "--quick", "--out", str(tmp_path / "empty")]) == 0
    assert main(["approximation", "--quick", "--out", str(tmp_path / "new" / "sub")]) == 0
    (mine / "results.json").write_text('{"command": "han-surgery paper approximation --quick"}')
    assert main(["approximation", "--quick", "--out", str(mine)]) == 0
    assert len(ran) == 4
    # another experiment's folder is not replaced without --overwrite: its plots would stay beside the new results
    (mine / "results.json").write_text('{"command": "han-surgery paper checkerboard --quick"}')
    assert "not written by 'han-surgery paper approximation'" in _error_line(
        capsys, ["approximation", "--quick", "--out", str(mine)]
    )
    assert len(ran) == 4
    # a full run's results (hours of work) are not replaced by a --quick smoke test without --overwrite
    (mine / "results.json").write_text('{"command": "han-surgery paper approximation --threads 1", "quick": false}')
    assert "holds the results of a full run" in _error_line(capsys, ["approximation", "--quick", "--out", str(mine)])
    assert len(ran) == 4
    assert main(["approximation", "--out", str(mine)]) == 0  # a full run replaces them (a rerun)
    assert main(["approximation", "--quick", "--out", str(mine), "--overwrite"]) == 0
    assert len(ran) == 6


def test_bad_numbers_are_one_line_and_ctrl_c_is_one_line(capsys, monkeypatch):
    """--threads -1, --lr -1 and --lrs -0.1 ended in tracebacks from torch (or ran and reported nonsense); Ctrl-C
    printed a traceback."""
    from han_surgery.cli import main as cli_main
    from han_surgery.paper import checkerboard

    assert "expected a positive integer, got -1" in _error_line(capsys, ["checkerboard", "--threads", "-1"])
    assert "expected a positive number, got -1" in _error_line(capsys, ["mnist", "--lr", "-1"])
    assert "expected a number >= 0, got nan" in _error_line(capsys, ["mixer", "--weight-decay", "nan"])
    assert "--lrs takes finite, positive numbers" in _error_line(capsys, ["regression", "--quick", "--lrs", "-0.1"])
    # nan and inf ran and reported "all lrs diverged" / attacks at eps=nan, exit 0
    assert "--lrs takes finite, positive numbers" in _error_line(capsys, ["checkerboard", "--quick", "--lrs", "nan"])
    assert "--lrs takes finite, positive numbers" in _error_line(capsys, ["checkerboard", "--quick", "--lrs", "inf"])
    for option in ("--linf-eps", "--l2-eps", "--cw-c"):
        assert f"{option} takes finite, non-negative numbers" in _error_line(
            capsys, ["mnist", "--quick", option, "nan"]
        )
    assert "--train-fractions takes finite, positive" in _error_line(capsys, ["regression", "--train-fractions", "0"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkerboard, "run", interrupted)
    assert cli_main(["paper", "checkerboard", "--quick"]) == 130
    assert capsys.readouterr().err == "han-surgery paper: interrupted\n"


def test_damaged_npz_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04garbage")  # the zip magic, then nothing a zip holds
    assert "is not an MNIST .npz" in _error_line(capsys, ["mnist", "--quick", "--data", str(bad)])


def test_regression_csv_too_small_for_the_split_is_one_line(tmp_path, capsys):
    """An empty CSV has no numpy warning before the error; 6 rows (1 test row: R^2 -inf) are refused."""
    from han_surgery.paper.regression import MIN_ROWS, split_sizes

    ok = [n for n in range(2, 200) if (lambda tr, te, va: tr >= 2 and te >= 2 and va >= 1)(*split_sizes(n))]
    assert ok == list(range(MIN_ROWS, 200))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert f"needs >= {MIN_ROWS} rows" in _error_line(capsys, ["regression", "--quick", "--csv", str(empty)])
    few = tmp_path / "few.csv"
    few.write_text("".join(f"{i / 7},{(i * 3 % 5) / 5}\n" for i in range(6)))
    assert "got shape (6, 2)" in _error_line(capsys, ["regression", "--quick", "--csv", str(few)])


def test_out_with_a_tilde_is_written_where_it_was_checked_and_plots_need_matplotlib(tmp_path, capsys, monkeypatch):
    """``--out=~/x`` (the shell leaves the ~) was checked in the home folder but written into ./~/x; without
    matplotlib an experiment ran for up to an hour and then failed with an ImportError traceback."""
    import sys

    from han_surgery.paper import approximation, han_mixer

    ran = []
    monkeypatch.setattr(approximation, "run", lambda args: ran.append(args.out))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["approximation", "--quick", "--out=~/pa"]) == 0
    assert ran == [str(tmp_path / "home" / "pa")]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = _error_line(capsys, ["approximation", "--quick", "--out", str(tmp_path / "p")])
    assert "writes PNG plots, which need matplotlib" in line and len(ran) == 1
    monkeypatch.setattr(han_mixer, "run", lambda args: ran.append(args.out))  # no plots: matplotlib not needed
    assert main(["mixer", "--quick", "--out", str(tmp_path / "m")]) == 0 and len(ran) == 2
