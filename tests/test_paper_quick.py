"""The ``--quick`` smoke runs of every paper experiment, through ``han_surgery.paper.cli.main``, and its error handling.

Those on the shipped data skip cleanly when ../shared/data (beside the repository, found from this file whatever the
working directory) is absent; mixer and mobilevit run on a tiny generated CIFAR-10-format folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from han_surgery.paper.cli import main
from han_surgery.paper.common import PaperInputError
from han_surgery.paper.image_data import load_image_dataset, write_cifar10_binary

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data of the repository, from any cwd
needs = lambda sub: pytest.mark.skipif(not (DATA / sub).exists(), reason=f"{DATA / sub} not available")  # noqa: E731


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
    res = _run(tmp_path, "regression", "--datasets", "calhousing", "--data", str(DATA / "regression"))
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
    res = _run(tmp_path, "mnist", "--data", str(DATA / "mnist" / "mnist10k.npz"))
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
    assert "--epochs: expected a positive integer, got 'many'" in _error_line(
        capsys, ["regression", "--epochs", "many"]
    )
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

    assert "expected a positive integer, got -1" in _error_line(capsys, ["checkerboard", "--iters", "-1"])
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
    # a bad second file: the first one had trained and left --out with partial results before the error
    good = tmp_path / "good.csv"
    good.write_text("".join(f"{i / 7},{(i * 3 % 5) / 5}\n" for i in range(40)))
    out = tmp_path / "out"
    argv = ["regression", "--quick", "--models", "fcnet1", "--csv", str(good), "--csv", str(empty), "--out", str(out)]
    assert f"needs >= {MIN_ROWS} rows" in _error_line(capsys, argv)
    assert not out.exists()


def test_two_regression_datasets_of_one_name_are_refused(tmp_path, capsys):
    """Two --csv files named alike trained into one row label and one plot panel, their results mixed."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "d.csv").write_text("".join(f"{i / 7},{(i * 3 % 5) / 5}\n" for i in range(40)))
    argv = ["regression", "--quick", "--csv", str(tmp_path / "a" / "d.csv"), "--csv", str(tmp_path / "b" / "d.csv")]
    assert "two datasets of one name (d: " in _error_line(capsys, argv)


def test_regression_reports_the_training_rows_it_kept(tmp_path):
    """``train_rows`` was recomputed without split()'s floor of one row: 0 for --train-fractions 0.001 of 200 rows,
    where one row trained."""
    from han_surgery.paper.regression import kept_train_rows, split

    csv = tmp_path / "d.csv"
    csv.write_text("".join(f"{i / 7},{(i * 3 % 5) / 5}\n" for i in range(200)))
    res = _run(tmp_path, "regression", "--models", "fcnet1", "--train-fractions", "0.001,0.5", "--csv", str(csv))
    assert [r["train_rows"] for r in res["rows"]] == [1, 80]
    gen = torch.Generator().manual_seed(0)
    assert [len(split(200, gen, train_fraction=f)[0]) for f in (0.001, 0.5)] == [
        kept_train_rows(200, f) for f in (0.001, 0.5)
    ]


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


def _fake_training(monkeypatch, seen: list) -> None:
    """Replace :func:`~han_surgery.paper.vision.train_and_score` by one that records the initial weights."""
    from han_surgery.paper import vision

    def fake(model, *args, **kwargs):
        seen.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        return {"params": 1, "test_error": 50.0, "test_images": 1, "steps": 0, "final_train_loss": 0.0,
                "train_seconds": 0.0}  # fmt: skip

    monkeypatch.setattr(vision, "train_and_score", fake)


def test_vision_seed_fixes_the_initial_weights(tiny_cifar, monkeypatch, capsys):
    """``paper mixer/mobilevit --seed`` seeded only the augmentation and data order: timm built each model from
    torch's unseeded global generator, so the same command started from different weights in every process."""
    seen: list[Tensor] = []
    _fake_training(monkeypatch, seen)
    argv = ["mixer", "--quick", "--data", str(tiny_cifar), "--device", "cpu", "--models", "han_mixer_m0h0_32"]
    for seed in (3, 3, 4):
        torch.manual_seed(int(torch.randint(0, 2**31, ()).item()) + seed)  # the global generator moves between runs
        torch.rand(1000)
        assert main([*argv, "--seed", str(seed)]) == 0
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    # every row is seeded, not only the first: a row's weights do not depend on the rows built before it
    assert main([*argv[:-1], "han_mixer_m2h0_32,han_mixer_m0h0_32", "--seed", "3"]) == 0
    assert torch.equal(seen[-1], seen[0])


def test_vision_writes_each_row_as_it_ends(tiny_cifar, tmp_path, monkeypatch):
    """``paper mixer/mobilevit`` wrote --out once, after every row: a full run stopped in its last row (7 rows x 600
    epochs) lost all of them. Now each row is written as it ends, and ``complete`` says whether every row ran."""
    import json

    from han_surgery.paper import vision

    out = tmp_path / "out"
    calls: list[int] = []

    def fake(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            written = json.loads((out / "results.json").read_text())
            assert [r["model"] for r in written["rows"]] == ["han_mixer_m2h0_32"] and not written["complete"]
            assert "han_mixer_m2h0_32" in (out / "results.md").read_text()
            raise KeyboardInterrupt
        return {"params": 1, "test_error": 50.0, "test_images": 1, "steps": 0, "final_train_loss": 0.0,
                "train_seconds": 0.0}  # fmt: skip

    monkeypatch.setattr(vision, "train_and_score", fake)
    argv = ["mixer", "--quick", "--data", str(tiny_cifar), "--device", "cpu", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--models", "han_mixer_m2h0_32,han_mixer_m0h0_32"])
    assert len(calls) == 2
    calls.append(1)  # past the second call: the next run is not interrupted
    assert main([*argv, "--models", "han_mixer_m0h0_32"]) == 0  # the partial folder is this command's to replace
    written = json.loads((out / "results.json").read_text())
    assert written["complete"] and [r["model"] for r in written["rows"]] == ["han_mixer_m0h0_32"]


def _png(path: Path, side: int, value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), value, dtype=np.uint8)).save(path)


def test_malformed_image_data_is_one_line_before_training(tmp_path, tiny_cifar, capsys, monkeypatch):
    """Train and test images of different sizes trained for the whole run, then crashed in the test pass; an
    unreadable png, train/ and test/ without class folders and empty STL10 files ended in tracebacks; CIFAR test
    labels beyond the classes were not checked."""
    from han_surgery.paper import vision

    monkeypatch.setattr(vision, "train_and_score", lambda *a, **k: pytest.fail("training started"))
    run = lambda root: _error_line(capsys, ["mixer", "--quick", "--device", "cpu", "--data", str(root)])  # noqa: E731
    mixed = tmp_path / "mixed"
    for split, side in (("train", 32), ("test", 48)):
        for cls in ("a", "b"):
            _png(mixed / split / cls / "0.png", side)
    assert "train images are 3x32x32 but test images 3x48x48" in run(mixed)
    corrupt = tmp_path / "corrupt"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _png(corrupt / split / cls / "0.png", 32)
    (corrupt / "train" / "b" / "1.png").write_bytes(b"not a png")
    line = run(corrupt)
    assert str(corrupt / "train" / "b" / "1.png") in line and "cannot read" in line
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    assert f"{empty / 'train'}: no class folders" in run(empty)
    stl = tmp_path / "stl" / "stl10_binary"
    stl.mkdir(parents=True)
    for name in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"):
        (stl / name).write_bytes(b"")
    assert f"{stl / 'train_y.bin'} holds no labels" in run(stl.parent)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 3, 32, 32), generator=gen, dtype=torch.uint8)
    bad_test = torch.full((10,), 12)
    write_cifar10_binary(tmp_path / "cifar", images[:20], torch.arange(20) % 10, images[20:], bad_test)
    assert "test_batch.bin: labels go up to 12" in run(tmp_path / "cifar")


def _mnist_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images, labels=labels)
    return path


def test_mnist_npz_labels_and_dtype_are_checked(tmp_path, capsys, monkeypatch):
    """Labels 1..10 or -1..8 crashed in cross_entropy with a traceback; float images in [0, 1] were divided by 255
    a second time and the run reported 10% accuracy without a word."""
    from han_surgery.paper import mnist_robustness

    monkeypatch.setattr(mnist_robustness, "train_model", lambda *a, **k: pytest.fail("training started"))
    n = 8010
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    run = lambda path: _error_line(capsys, ["mnist", "--quick", "--data", str(path)])  # noqa: E731
    assert "labels must be integers 0..9, got 1..10" in run(_mnist_npz(tmp_path / "a.npz", images, labels + 1))
    assert "labels must be integers 0..9, got -1..8" in run(_mnist_npz(tmp_path / "b.npz", images, labels - 1))
    line = run(_mnist_npz(tmp_path / "c.npz", images, labels.astype(np.float32)))
    assert "labels must be integers 0..9" in line and "float32" in line
    line = run(_mnist_npz(tmp_path / "d.npz", images / 255.0, labels))
    assert "images must be uint8 (0-255), got float64" in line
    # np.save's one unnamed array (under either name) was a TypeError traceback, a damaged compressed member a
    # zlib.error one
    for name in ("e.npy", "e.npz"):
        with open(tmp_path / name, "wb") as f:
            np.save(f, images[:10])
        assert "it holds one unnamed (10, 28, 28) array, as np.save writes; use np.savez" in run(tmp_path / name)
    strokes = np.zeros_like(images)  # compressible, as digits are: deflate then codes it with Huffman tables
    strokes[:, 10:18, 12:16] = 200
    np.savez_compressed(tmp_path / "f.npz", images=strokes, labels=labels)
    raw = bytearray((tmp_path / "f.npz").read_bytes())
    raw[100:164] = bytes(b ^ 0xFF for b in raw[100:164])  # the images' deflate header: zlib.error, not a CRC error
    (tmp_path / "f.npz").write_bytes(raw)
    assert "f.npz is not an MNIST .npz" in run(tmp_path / "f.npz")


@pytest.mark.parametrize("experiment", ["checkerboard", "mnist", "approximation", "mixer", "mobilevit"])
def test_seed_out_of_range_is_one_line(capsys, experiment):
    """``--seed`` beyond int64 (or negative) ended in an overflow traceback from torch.manual_seed (mixer and
    mobilevit only after loading the data)."""
    for seed in (str(2**63), "99999999999999999999999", "-1"):
        line = _error_line(capsys, [experiment, "--quick", "--seed", seed])
        assert f"--seed: expected an integer in [0, 2**63), got {seed!r}" in line, line


def test_approximation_seed_leaves_room_for_its_offsets(capsys, monkeypatch):
    """approximation seeds each dimension d with seed + 1000 d: a --seed just under 2**63 overflowed there."""
    from han_surgery.paper import approximation

    line = _error_line(capsys, ["approximation", "--quick", "--dims", "2,3", "--seed", str(2**63 - 2000)])
    assert "--seed must be < 2**63 - 3000" in line
    monkeypatch.setattr(approximation, "fit_grid", lambda *a, **k: pytest.fail("fits ran"))
    monkeypatch.setattr(approximation, "seed_everything", lambda seed: pytest.fail(f"seeded {seed}"))
    with pytest.raises(pytest.fail.Exception, match=f"seeded {2**63 - 3001 + 2000}"):
        main(["approximation", "--quick", "--dims", "2,3", "--seed", str(2**63 - 3001)])


def test_device_and_image_size_are_checked_before_the_data_is_read(tiny_cifar, capsys, monkeypatch):
    """``--device mps`` / ``meta`` passed the check and crashed in torch; ``--image-size 33`` was refused only
    after the whole dataset had been read."""
    from han_surgery.paper import vision

    seen: list[Tensor] = []
    _fake_training(monkeypatch, seen)
    base = ["mixer", "--quick", "--data", str(tiny_cifar)]
    for device in ("mps", "meta", "xla", "cuda:x"):
        line = _error_line(capsys, [*base, "--device", device])
        assert f"--device {device!r}" in line and "use auto, cpu or cuda" in line, line
    if not torch.cuda.is_available():
        assert "torch sees no CUDA device" in _error_line(capsys, [*base, "--device", "cuda:0"])
    assert seen == []
    with monkeypatch.context() as one_gpu:  # a machine with one CUDA device: cuda:1 does not exist
        one_gpu.setattr(torch.cuda, "is_available", lambda: True)
        one_gpu.setattr(torch.cuda, "device_count", lambda: 1)
        assert vision.device_of("cuda:0") == torch.device("cuda:0") and vision.device_of("cuda").type == "cuda"
        with pytest.raises(PaperInputError, match=r"--device cuda:1, but torch sees 1 CUDA device\(s\)"):
            vision.device_of("cuda:1")
    monkeypatch.setattr(vision, "load_image_dataset", lambda root: pytest.fail("data read"))
    line = _error_line(capsys, ["mobilevit", "--quick", "--data", str(tiny_cifar), "--image-size", "33"])
    assert "--image-size must be a multiple of 32" in line
    assert "--models" in _error_line(capsys, [*base, "--models", "resnet18"])


def _board(folder: Path, train: np.ndarray) -> Path:
    folder.mkdir()
    test = np.array([[0.5, -0.5, 1, 1], [-0.25, 0.25, 0, 0]] * 4)
    np.savetxt(folder / "trainset.txt", train)
    np.savetxt(folder / "testset.txt", test)
    return folder


def test_checkerboard_rows_outside_the_board_are_one_line_before_training(tmp_path, capsys, monkeypatch):
    """Points outside [-1, 1]^2 trained, wrote results.json, then crashed drawing the board (IndexError; a point
    below -1 wrapped round silently); a NaN trained and reported "all lrs diverged"; labels other than 0/1 trained
    to 0%; an empty file printed numpy's warning as a second line."""
    from han_surgery.paper import checkerboard

    monkeypatch.setattr(checkerboard, "train_rows", lambda *a, **k: pytest.fail("training started"))
    good = np.array([[0.5, 1.0, 0, 0], [0.2, -0.2, 1, 1], [-1.0, 0.0, 1, 1]] * 4)
    run = lambda folder: _error_line(capsys, ["checkerboard", "--quick", "--variants", "a", "--data", str(folder)])  # noqa: E731
    for name, row, shown in (
        ("outside", [1.5, 3.0, 0, 0], "[1.5, 3.0, 0.0, 0.0]"),
        ("nan", [np.nan, 0.5, 0, 0], "[nan, 0.5, 0.0, 0.0]"),
        ("label", [0.5, 0.5, 7, 7], "[0.5, 0.5, 7.0, 7.0]"),
    ):
        line = run(_board(tmp_path / name, np.vstack([good, [row]])))
        assert f"trainset.txt: row 13 is {shown}; a checkerboard row is a point x1 x2 in [-1, 1]" in line, line
    empty = _board(tmp_path / "empty", good)
    (empty / "testset.txt").write_text("")
    assert "testset.txt must have rows of 4 columns (x1 x2 y y), got shape (0, 1)" in run(empty)


@pytest.mark.parametrize("experiment", ["checkerboard", "regression", "mnist", "approximation"])
def test_threads_beyond_any_machine_are_one_line(capsys, experiment):
    """``--threads 100000`` aborted in libgomp ("Out of memory allocating"), 10**11 overflowed in
    torch.set_num_threads: tracebacks after the data had loaded."""
    for threads in ("100000", str(10**11), "0", str(2**63)):  # its own bound, not int64's "below 2**63"
        line = _error_line(capsys, [experiment, "--quick", "--threads", threads])
        assert f"--threads: expected a thread count in [1, 1024], got {threads}" in line, line
