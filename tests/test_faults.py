"""Faults: a fine-tune killed anywhere resumes exactly; nothing a user made is overwritten; no half-written
folder looks finished; no silent NaN.

The SIGKILL tests run ``han-surgery finetune`` in a subprocess through ``tests/_fault_driver.py``, which
kills the process at a chosen point (after an optimizer step, inside a checkpoint write, before a
checkpoint's rename, inside the final save, half-way through publishing the folder) or at a random
moment. Each killed run is then resumed, and its weights and ``metrics.jsonl`` must equal those of a
run that was never interrupted, bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _finetune_cli import cli
from _toy_data import TINY_VIT, make_images
from safetensors.torch import load_file

from han_surgery.cli._common import Terminated
from han_surgery.fileio import folder_problems

ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).with_name("_fault_driver.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
REQUIRED = ("model.safetensors", "config.json", "README.md")
# dropout on, gradient accumulation 2, 5 optimizer steps per epoch: 12 steps cross two epoch ends
OPTIONS = [
    "--model", "test_vit", "--model-kwargs", json.dumps({**TINY_VIT, "drop_rate": 0.2}), "--max-steps", "12",
    "--batch-size", "8", "--grad-accum", "2", "--checkpoint-every", "3", "--keep-checkpoints", "2",
    "--no-progress", "--no-tensorboard",
]  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "toy.npz", n=96)


def argv(toy: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(toy), "--output-dir", str(out), *OPTIONS, *extra]


@pytest.fixture(scope="module")
def reference(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (in-process, one thread: the subprocesses use the same kernels and order)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    torch.set_num_threads(1)
    assert cli(argv(toy, out)) == 0
    return out


def killed_run(toy: Path, out: Path, point: str, n: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRIVER), point, str(n), *argv(toy, out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def assert_same_as_reference(out: Path, reference: Path) -> None:
    ref, got = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    results, expected = (
        json.loads((out / "results.json").read_text()),
        json.loads((reference / "results.json").read_text()),
    )
    assert results["eval_loss"] == expected["eval_loss"] and results["global_step"] == expected["global_step"] == 12
    # the last logged train_loss too: resumed from the last step's checkpoint, the run logs none of its own
    assert results["train_loss"] == expected["train_loss"]
    assert folder_problems(out, REQUIRED) == []


@pytest.mark.parametrize(
    "point, n",
    [
        ("step", 5),  # between checkpoints 3 and 6
        ("state_file", 5),  # inside the 2nd checkpoint write (3 accelerate files each), after its weights
        ("checkpoint_rename", 3),  # the 3rd checkpoint fully written as step_9.tmp, not yet renamed
        ("export", 1),  # the final save: model files staged, nothing published
        ("publish", 2),  # the final save: one file moved into place, the rest (and the card) not
    ],
)
def test_killed_at_a_fault_point_then_resumed_equals_uninterrupted(
    point: str, n: int, toy: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = killed_run(toy, out, point, n)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert folder_problems(out, REQUIRED) != []  # never looks finished when it is not
    assert not list((out / "checkpoints").glob("*.tmp")) or point in ("state_file", "checkpoint_rename")
    torch.set_num_threads(1)
    assert cli(argv(toy, out, "--resume")) == 0
    assert_same_as_reference(out, reference)


def test_killed_at_random_moments_then_resumed_equals_uninterrupted(toy: Path, reference: Path, tmp_path: Path) -> None:
    """Two kills at random moments after the first checkpoint exists (seeded, so a failure reproduces).

    A kill can land after the folder is published but before the process exits: then the folder
    must already equal the uninterrupted run; otherwise it must not look finished, and resumes."""
    rng = random.Random(20261129)
    for i in range(2):
        out = tmp_path / f"run{i}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "han_surgery.finetune", *argv(toy, out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        first = out / "checkpoints" / "step_0000003"
        deadline = time.monotonic() + 240
        while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        if proc.returncode == 0:  # it finished before the kill landed: then it must be complete
            assert folder_problems(out, REQUIRED) == []
        elif folder_problems(out, REQUIRED) != []:  # killed before the folder was published: resume it
            torch.set_num_threads(1)
            assert cli(argv(toy, out, "--resume")) == 0
        assert_same_as_reference(out, reference)


def test_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(
    toy: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert killed_run(toy, out, "step", 8).returncode == -9  # checkpoints 3 and 6 on disk
    newest = out / "checkpoints" / "step_0000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    torch.set_num_threads(1)
    assert cli(argv(toy, out, "--resume")) == 0
    printed = capsys.readouterr()
    assert "skipping step_0000006" in printed.out and "resumed from" in printed.out and "step_0000003" in printed.out
    assert_same_as_reference(out, reference)


def test_a_second_run_into_a_busy_folder_is_refused(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Run A holds its output folder; run B (even with --overwrite) is refused, naming A; A is not disturbed."""
    out = tmp_path / "run"
    long = [o if o != "12" else "400" for o in argv(toy, out)]
    proc = subprocess.Popen([sys.executable, "-m", "han_surgery.finetune", *long], stderr=subprocess.PIPE, env=ENV)
    lock = out / ".han-surgery.lock"
    deadline = time.monotonic() + 240
    while not lock.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert lock.is_file(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no lock"
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert cli(argv(toy, out, "--lr", "0.5", *extra)) == 2
            err = capsys.readouterr().err
            assert f"is in use by another han-surgery run (pid {proc.pid}" in err, err
        assert json.loads((out / "training_args.json").read_text())["lr"] == 0.001  # A's, untouched
    finally:
        proc.kill()
        proc.wait()
    # A died: its lock is stale, and a new run takes the folder over (with --overwrite), saying so
    assert cli(argv(toy, out, "--overwrite", "--max-steps", "2")) == 0
    assert "took over the lock" in capsys.readouterr().out
    assert not lock.exists()


def test_nan_training_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4))
    data = tmp_path / "reg.csv"
    np.savetxt(data, np.column_stack([x, x @ [1.0, -2.0, 0.5, 3.0]]), delimiter=",")
    out = tmp_path / "run"
    code = cli(["--model", "hannet:16x4", "--data", str(data), "--output-dir", str(out), "--lr", "1000",
                "--max-steps", "30", "--checkpoint-every", "2", "--no-progress", "--no-tensorboard"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "the loss became" in err and "training stopped" in err and "the last good checkpoint is" in err
    kept = err.split("the last good checkpoint is ")[1].split(".")[0].split(";")[0].strip()
    weights = load_file(str(Path(kept) / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()


def test_non_finite_inputs_are_refused_by_the_loaders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = np.random.default_rng(0).random((20, 8, 8)).astype(np.float32)
    images[3, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", images=images, labels=np.arange(20) % 2)
    table = tmp_path / "nan.csv"
    table.write_text("".join(f"{i},{'nan' if i == 7 else i % 3},{i}\n" for i in range(30)))
    for data, message in ((tmp_path / "nan.npz", "non-finite value(s) (NaN or inf), the first in image 3"),
                          (table, "is not a finite number")):  # fmt: skip
        out = tmp_path / "o"
        model = "test_vit" if data.suffix == ".npz" else "mlp"
        assert cli(["--model", model, "--data", str(data), "--output-dir", str(out), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_push_refuses_a_truncated_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from huggingface_hub import HfApi

    from han_surgery.cli import main

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: uploads.append("create"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **k: uploads.append("upload"))
    folder = tmp_path / "model"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("card")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["push", str(folder), "me/model"]) == 2
    err = capsys.readouterr().err
    assert "not a finished model folder" in err and "truncated" in err and uploads == []


def _table(path: Path) -> Path:
    """A two-class numeric CSV (200 rows, 4 features): tiny ``mlp`` runs of a second or two."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    np.savetxt(path, np.column_stack([x, x[:, 0] + x[:, 1] > 0]), delimiter=",", fmt="%.4f")
    return path


def _mlp(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "mlp:8x1", "--data", str(data), "--output-dir", str(out), "--batch-size", "16",
            "--no-progress", "--no-tensorboard", *extra]  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (the lock file aside) and its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".han-surgery.lock"
    }


def test_another_runs_checkpoint_resumes_only_into_a_new_folder_or_one_of_its_options(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--resume Y/checkpoints/step_N --output-dir X`` with X a finished run of other options was accepted (X is "a
    run folder"): X's checkpoints were deleted as "abandoned", its metrics cut, its model replaced, and its
    training_args.json kept, describing another run. Now refused, X untouched; into a new folder, or one holding a run
    of the checkpoint's options, it resumes, and that folder's later checkpoints are not taken for abandoned ones."""
    data = _table(tmp_path / "t.csv")
    x, y = tmp_path / "X", tmp_path / "Y"
    assert cli(_mlp(data, x, "--epochs", "2", "--checkpoint-every", "3")) == 0
    y_options = ("--epochs", "3", "--grad-accum", "2", "--checkpoint-every", "4", "--keep-checkpoints", "9")
    assert cli(_mlp(data, y, *y_options)) == 0
    before = _snapshot(x)
    capsys.readouterr()
    foreign = y / "checkpoints" / "step_0000004"
    assert cli(_mlp(data, x, *y_options, "--resume", str(foreign))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume {foreign}" in err and "--epochs 3 -> 2" in err, err
    assert _snapshot(x) == before
    w = tmp_path / "W"  # a new folder, but other options: refused before anything is read or written
    assert cli(_mlp(data, w, *y_options, "--lr", "0.01", "--resume", str(foreign))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "options differ" in err and "--lr 0.001 -> 0.01" in err, err
    assert not w.exists()

    z = tmp_path / "Z"  # a new folder: the run continues Y's trajectory there, as in Y
    assert cli(_mlp(data, z, *y_options, "--resume", str(foreign))) == 0
    assert load_file(str(z / "model.safetensors")).keys() == load_file(str(y / "model.safetensors")).keys()
    assert (
        json.loads((z / "results.json").read_text())["eval_loss"]
        == json.loads((y / "results.json").read_text())["eval_loss"]
    )
    # Z now holds a run of the checkpoint's options: resuming it again from Y's checkpoint is that run's restart,
    # and Z's own checkpoints of later steps (its trajectory, not another run's) stay where they are
    later = sorted(p.name for p in (z / "checkpoints").iterdir())
    assert later and all(int(name[5:]) > 4 for name in later)
    before = _snapshot(z)
    capsys.readouterr()
    assert cli(_mlp(data, z, *y_options, "--lr", "0.5", "--resume", str(foreign))) == 2  # another option
    assert "--lr 0.001 -> 0.5" in capsys.readouterr().err and _snapshot(z) == before
    assert cli(_mlp(data, z, *y_options, "--resume", str(foreign))) == 0
    assert "removing" not in capsys.readouterr().out
    assert sorted(p.name for p in (z / "checkpoints").iterdir()) == later


def test_a_failed_or_interrupted_overwrite_run_puts_the_previous_run_back_or_stays_resumable(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--overwrite`` emptied the folder before training: a retrain that failed (NaN loss) or was interrupted (Ctrl-C,
    SIGTERM) left nothing of the finished run. The previous contents now stay until the new run has exported: put back
    if it fails before its first checkpoint; after one, kept aside beside the new run, which ``--resume`` continues, as
    after a SIGKILL (a preempted job's checkpoints were deleted, all its progress lost)."""
    data = _table(tmp_path / "t.csv")
    out, aside = tmp_path / "run", tmp_path / "run" / ".overwritten.tmp"
    assert cli(_mlp(data, out, "--epochs", "1", "--checkpoint-every", "4")) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert cli(_mlp(data, out, "--overwrite", "--lr", "1e12", "--max-steps", "3")) == 2  # NaN at step 1 or 2
    err = capsys.readouterr().err
    assert "the loss became" in err and "is put back as it was before --overwrite" in err and err.count("\n") == 1, err
    assert _snapshot(out) == before  # the staging folder of the previous contents too is gone

    step = torch.optim.AdamW.step

    def fail_at(n: int, error: type[BaseException] | None) -> None:
        """The n-th optimizer step raises ``error`` (``None``: makes the weights NaN, so the next loss is NaN)."""
        calls = []

        def failing_step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == n and error is not None:
                raise error
            result = step(self, *args, **kwargs)
            if len(calls) == n:
                for group in self.param_groups:
                    for p in group["params"]:
                        p.data.fill_(float("nan"))
            return result

        monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)

    new = _mlp(data, out, "--lr", "0.01", "--checkpoint-every", "2")
    fail_at(1, KeyboardInterrupt)  # Ctrl-C before the new run's first checkpoint: the previous run comes back
    assert cli([*new, "--overwrite"]) == 130
    monkeypatch.undo()
    assert _snapshot(out) == before
    capsys.readouterr()

    fail_at(7, Terminated)  # SIGTERM (preemption) after checkpoints 2, 4 and 6: the new run stays, resumable
    assert cli([*new, "--overwrite"]) == 143
    monkeypatch.undo()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1] == "han-surgery finetune: terminated", err
    assert str(aside) in err[0] and "--resume in place of --overwrite continues" in err[0] and "deletes" in err[0], err
    assert _snapshot(aside) == before and (out / "checkpoints" / "step_0000006").is_dir()
    assert cli([*new, "--resume"]) == 0
    assert not aside.exists() and folder_problems(out, REQUIRED) == []
    resumed = _snapshot(out)

    fail_at(5, None)  # a NaN loss at step 6, after checkpoint 4: the message says where both runs are
    capsys.readouterr()
    assert cli([*new, "--overwrite"]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the loss became" in err, err
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_0000004'}" in err, err
    assert str(aside) in err and "--resume" in err and "put back" not in err, err
    assert _snapshot(aside) == resumed and (out / "checkpoints" / "step_0000004").is_dir()

    assert cli(_mlp(data, out, "--overwrite", "--lr", "0.02", "--max-steps", "3")) == 0  # a run that ends: replaced
    assert json.loads((out / "training_args.json").read_text())["lr"] == 0.02
    assert not (out / "checkpoints").exists() and not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert folder_problems(out, REQUIRED) == []


@pytest.mark.parametrize("kill_at", ["first", "last"])
def test_an_overwrite_run_killed_while_setting_the_previous_run_aside_puts_it_back_whole(
    kill_at: str, tmp_path: Path
) -> None:
    """A SIGKILL between the moves of the previous contents into ``.overwritten.tmp`` left them in two places: the next
    ``--overwrite`` took a README.md still in place for a killed run that had exported (deleting what had moved), or
    the files not yet moved for the killed run's own (deleting them). Now the set-aside completes or never happened:
    whatever the next run does, the previous run comes back whole."""
    data = _table(tmp_path / "t.csv")
    out = tmp_path / "run"
    assert cli(_mlp(data, out, "--epochs", "1", "--checkpoint-every", "4")) == 0
    finished = _snapshot(out)
    n = 1 if kill_at == "first" else sum(1 for p in out.iterdir() if p.name != ".han-surgery.lock")
    assert n > 2 or kill_at == "first"
    proc = subprocess.run([sys.executable, str(DRIVER), "set_aside", str(n), *_mlp(data, out, "--overwrite")],
                          capture_output=True, text=True, env=ENV, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert cli(_mlp(data, out, "--overwrite", "--lr", "1e12")) == 2  # a failing --overwrite: the previous run back
    assert _snapshot(out) == finished
    assert cli(_mlp(data, out, "--epochs", "1", "--checkpoint-every", "4", "--resume")) == 0  # and resumable as it was


def test_an_overwrite_run_killed_by_sigkill_resumes_or_is_overwritten_again(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """SIGKILL gives no chance to put anything back: the killed ``--overwrite`` run's folder holds the new run (resumable)
    and the previous contents, aside in ``.overwritten.tmp``. A ``--resume`` that ends deletes them; another
    ``--overwrite`` that fails puts back the last finished run: the one aside, or the killed run had it exported."""
    data = _table(tmp_path / "t.csv")
    new = ("--epochs", "2", "--lr", "0.01", "--checkpoint-every", "4")
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert cli(_mlp(data, ref, *new)) == 0
    assert cli(_mlp(data, out, "--epochs", "1")) == 0
    finished = _snapshot(out)
    proc = subprocess.run([sys.executable, str(DRIVER), "step", "6", *_mlp(data, out, *new, "--overwrite")],
                          capture_output=True, text=True, env=ENV, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _snapshot(out / ".overwritten.tmp") == finished and (out / "checkpoints" / "step_0000004").is_dir()
    again = tmp_path / "again"  # a failing --overwrite drops the killed run and puts the finished one back
    shutil.copytree(out, again)
    assert cli(_mlp(data, again, "--overwrite", "--lr", "1e12")) == 2
    assert _snapshot(again) == finished
    assert cli(_mlp(data, out, *new, "--resume")) == 0
    assert not (out / ".overwritten.tmp").exists()
    got, expected = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # killed after its export, before the previous contents were deleted: the exported run is the one kept
    exported = _snapshot(out)
    (out / ".overwritten.tmp").mkdir()
    (out / ".overwritten.tmp" / "model.safetensors").write_bytes(finished["model.safetensors"])
    capsys.readouterr()
    assert cli(_mlp(data, out, "--overwrite", "--lr", "1e12")) == 2
    assert _snapshot(out) == exported
