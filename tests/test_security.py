"""Security: nothing a user hands han-surgery runs code.

* Resuming a fine-tune unpickles nothing of the checkpoint folder beyond plain tensors and numbers
  (``weights_only=True``); han-surgery's own loop state is JSON. A crafted pickle is refused, never run.
* A model folder that only holds pickle weights is refused, by every command.
* Python code shipped in a model folder (transformers' ``auto_map``) never runs: ``trust_remote_code`` is
  ``False`` everywhere unless the user opts in, so even answering transformers' interactive prompt with
  "y" runs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _finetune_cli import cli, rehash_checkpoint
from _toy_data import TINY_VIT, make_images

from han_surgery.finetune import FinetuneConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


class Payload:
    """Unpickling this object creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _run_with_checkpoints(tmp_path: Path) -> tuple[list[str], Path]:
    """A two-step fine-tune of a tiny ViT with a checkpoint after each step: (its arguments, its folder)."""
    data = make_images(tmp_path / "toy.npz", n=64)
    out = tmp_path / "run"
    opts = ["--model", "test_vit", "--model-kwargs", json.dumps(TINY_VIT), "--data", str(data), "--output-dir",
            str(out), "--max-steps", "2", "--batch-size", "8", "--checkpoint-every", "1", "--no-progress",
            "--no-tensorboard"]  # fmt: skip
    assert cli(opts) == 0
    return opts, out


LOADER_REFUSAL = "it holds a pickle that is not plain tensors (refused: loading it could run code)"


@pytest.mark.parametrize(
    ("name", "refusal"),
    [
        # read by accelerate's load_state, with weights_only=True
        pytest.param("optimizer.bin", LOADER_REFUSAL, id="optimizer.bin"),
        pytest.param("scheduler.bin", LOADER_REFUSAL, id="scheduler.bin"),
        # checked by han-surgery before load_state (accelerate would skip an unreadable one with a log line)
        pytest.param(
            "random_states_0.pkl",
            "random_states_0.pkl is not a random state of plain numbers (refused: loading it could run code)",
            id="random_states_0.pkl",
        ),
        # the file older versions registered their loop state in: nothing is registered now, so it is never read
        pytest.param("custom_checkpoint_0.pkl", "custom_checkpoint", id="custom_checkpoint_0.pkl"),
    ],
)
def test_resume_never_unpickles_code_from_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, refusal: str
) -> None:
    """The payload sits in one pickle alone, so the guard for that file (not an earlier one) has to refuse it."""
    opts, out = _run_with_checkpoints(tmp_path)
    marker = tmp_path / "pwned"
    for checkpoint in (out / "checkpoints").iterdir():
        torch.save({"state": Payload(marker)}, checkpoint / name)
        rehash_checkpoint(checkpoint)
    capsys.readouterr()
    assert cli([*opts, "--resume"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), f"code planted in {name} ran"
    assert "--resume: cannot load" in err and refusal in err and err.count("\n") == 1, err


def test_pickle_only_model_folders_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from han_surgery.cli import main

    marker = tmp_path / "pwned"
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    torch.save({"weight": Payload(marker)}, folder / "pytorch_model.bin")
    timm_folder = tmp_path / "vit"  # as timm's save_for_hf writes it, with the weights as a pickle
    timm_folder.mkdir()
    (timm_folder / "config.json").write_text(json.dumps({"architecture": "test_vit", "num_classes": 4}))
    torch.save({"weight": Payload(marker)}, timm_folder / "pytorch_model.bin")
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": f"t {i}", "label": i % 2}) + "\n" for i in range(20)))
    images = make_images(tmp_path / "toy.npz", n=32)
    for argv in (
        ["finetune", "--model", str(folder), "--data", str(text), "--output-dir", str(tmp_path / "o")],
        ["finetune", "--model", "test_vit", "--distill-from", str(folder), "--data", str(images), "--output-dir",
         str(tmp_path / "o2")],
        ["finetune", "--model", str(timm_folder), "--data", str(images), "--output-dir", str(tmp_path / "o3")],
        ["finetune", "--model", f"local-dir:{timm_folder}", "--data", str(images), "--output-dir", str(tmp_path / "o4")],
        ["inspect", str(folder)],
        ["inspect", str(timm_folder)],
        ["hanify", str(folder), "-o", str(tmp_path / "h")],
    ):  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "never unpickles" in err and "pytorch_model.bin" in err, err
    assert not marker.exists()


def _remote_code_folder(tmp_path: Path, marker: Path) -> Path:
    """A folder whose config asks transformers to import configuration_evil.py (which would create ``marker``)."""
    from safetensors.torch import save_file

    folder = tmp_path / "evil"
    folder.mkdir()
    config = {
        "model_type": "evil",
        "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForSequenceClassification": "configuration_evil.EvilModel"},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    return folder


def test_code_in_a_model_folder_never_runs_even_when_the_prompt_is_answered_yes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = _remote_code_folder(tmp_path, marker)
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": f"t {i}", "label": i % 2}) + "\n" for i in range(20)))
    for argv in (
        ["finetune", "--model", str(folder), "--data", str(text), "--output-dir", str(tmp_path / "o")],
        ["inspect", str(folder)],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "han_surgery", *argv], input="y\ny\n", capture_output=True, text=True, env=ENV,
            timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
        assert proc.stderr.startswith(f"han-surgery {argv[0]}: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert not marker.exists(), argv


def test_from_pretrained_never_runs_code_of_a_hanified_folder(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = _remote_code_folder(tmp_path, marker)
    recipe = {"format_version": 1, "base": {"library": "transformers", "class": "BertModel"}, "dtype": "float32",
              "recipe": [{"config": {}, "rewrites": []}]}  # fmt: skip
    (folder / "han_config.json").write_text(json.dumps(recipe))
    code = f"import han_surgery\ntry:\n    han_surgery.from_pretrained({str(folder)!r})\nexcept han_surgery.CheckpointError as e:\n    print('refused:', e)"
    proc = subprocess.run(
        [sys.executable, "-c", code], input="y\ny\n", capture_output=True, text=True, env=ENV, timeout=120
    )
    assert "refused:" in proc.stdout and not marker.exists(), proc.stdout[-1500:] + proc.stderr[-1500:]


def test_resume_into_a_folder_the_user_made_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--output-dir mine --resume <a run's checkpoint>`` replaced the user's README.md and config.json, cut their
    metrics.jsonl and deleted their checkpoints/step_1 by checkpoint rotation: --resume skipped the non-empty check."""
    opts, out = _run_with_checkpoints(tmp_path)
    mine = tmp_path / "mine"
    (mine / "checkpoints" / "step_1").mkdir(parents=True)
    (mine / "checkpoints" / "step_1" / "data.txt").write_text("my experiment")
    (mine / "README.md").write_text("# my notes")
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    checkpoint = sorted((out / "checkpoints").iterdir())[0]
    argv = [*opts[:opts.index("--output-dir")], "--output-dir", str(mine), "--max-steps", "4", "--batch-size", "8",
            "--checkpoint-every", "1", "--keep-checkpoints", "1", "--no-progress", "--resume", str(checkpoint)]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "another folder's checkpoint continues in a new or empty --output-dir" in err, err
    assert f"{mine} holds files but no training_args.json" in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


def test_resume_refuses_pickled_weights_and_a_random_state_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A checkpoint with pytorch_model.bin instead of model.safetensors resumed (accelerate falls back to the pickle);
    a crafted random_states_0.pkl was ignored with a warning (accelerate catches the error) and the run went on."""
    opts, out = _run_with_checkpoints(tmp_path)
    latest = sorted((out / "checkpoints").iterdir())[0]
    weights = latest / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), latest / "pytorch_model.bin")
    weights.unlink()
    rehash_checkpoint(latest)
    assert cli([*opts, "--resume", str(latest)]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and err.count("\n") == 1, err

    (tmp_path / "second").mkdir()
    opts2, out2 = _run_with_checkpoints(tmp_path / "second")
    latest = sorted((out2 / "checkpoints").iterdir())[0]
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, latest / "random_states_0.pkl")
    rehash_checkpoint(latest)
    assert cli([*opts2, "--resume", str(latest)]) == 2
    err = capsys.readouterr().err
    assert "random_states_0.pkl" in err and err.count("\n") == 1 and not marker.exists(), err


@pytest.mark.parametrize("architecture", ["local-dir:{elsewhere}", "hf-hub:someone/tracker"])
def test_a_timm_folder_cannot_point_timm_at_another_folder_or_the_hub(
    tmp_path: Path, capsys: pytest.CaptureFixture, architecture: str
) -> None:
    """A hanified timm folder's config.json with ``architecture: "local-dir:<elsewhere>"`` made timm read the
    other folder's config (its model_args unchecked); ``hf-hub:<repo>`` reached for the Hub (a traceback
    offline). Every loader now refuses a name that is not a registered timm model."""
    import han_surgery
    from han_surgery.cli import main
    from han_surgery.folders import CheckpointError

    folder = tmp_path / "han"
    assert main(["hanify", "test_vit", "-o", str(folder)]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text(json.dumps({"architecture": "test_vit", "model_args": {}}))
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = architecture.format(elsewhere=elsewhere)
    (folder / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="is not a timm model name"):
        han_surgery.from_pretrained(folder)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is not a timm model name" in err and err.count("\n") == 1, err


def test_a_timm_wrapper_folder_cannot_make_timm_load_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """transformers' timm_wrapper passes its config's model_args to timm.create_model: ``checkpoint_path`` made
    timm torch.load any file the config named (inspect, load_model, from_pretrained all built it)."""
    transformers = pytest.importorskip("transformers")
    import han_surgery
    from han_surgery.cli import main
    from han_surgery.folders import CheckpointError

    folder = tmp_path / "tw"
    transformers.TimmWrapperModel(transformers.TimmWrapperConfig(architecture="test_vit")).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"] = {"checkpoint_path": str(tmp_path / "weights.pth")}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="checkpoint_path"):
        han_surgery.load_model(folder)
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 2
    assert "checkpoint_path" in capsys.readouterr().err


@pytest.mark.parametrize("started", ['"yesterday"', "1e300", "null"])
def test_a_lock_file_not_written_by_han_surgery_is_a_clear_error(tmp_path: Path, started: str) -> None:
    """A lock file with ``"started": "yesterday"`` raised TypeError, ``1e300`` OverflowError (tracebacks); ``null``
    showed the current time as the holder's start."""
    from han_surgery.errors import HanSurgeryError
    from han_surgery.fileio import LOCK_NAME, FolderLock

    (tmp_path / LOCK_NAME).write_text(f'{{"pid": 1, "host": "elsewhere", "started": {started}, "command": "x"}}')
    with pytest.raises(HanSurgeryError, match="started at an unknown time"):
        FolderLock(tmp_path).check()


@pytest.mark.parametrize(
    ("key", "value"), [("global_step", '"4"'), ("metrics_lines", '"x"'), ("running_by_process", "[[1.0]]")]
)
def test_resume_from_a_crafted_trainer_state_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, key: str, value: str
) -> None:
    opts, out = _run_with_checkpoints(tmp_path)
    checkpoint = sorted((out / "checkpoints").iterdir())[0]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state[key] = json.loads(value)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    rehash_checkpoint(checkpoint)
    assert cli([*opts, "--resume", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and key in err and err.count("\n") == 1, err


def test_overwrite_never_empties_the_current_directory_or_home(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``finetune --output-dir . --overwrite`` from a project folder deleted its sources."""
    from han_surgery.cli import main

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    data = make_images(tmp_path / "toy.npz", n=32)
    monkeypatch.chdir(project / "src")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    train = ["--model", "test_vit", "--model-kwargs", json.dumps(TINY_VIT), "--data", str(data), "--max-steps", "1",
             "--batch-size", "8", "--no-progress", "--no-tensorboard", "--overwrite", "--output-dir"]  # fmt: skip
    for out, what in ((".", "the current directory"), ("..", "a parent of the current directory")):
        assert cli([*train, out]) == 2
        err = capsys.readouterr().err
        assert f"is {what}: --overwrite would delete everything in it" in err and err.count("\n") == 1, err
        assert main(["hanify", "test_vit", "-o", out, "--overwrite"]) == 2
        assert f"is {what}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "project")
    (tmp_path / "home" / "notes.txt").write_text("mine")
    assert main(["hanify", "test_vit", "-o", str(tmp_path / "home"), "--overwrite"]) == 2
    assert "is the home directory" in capsys.readouterr().err
    assert (project / "src" / "main.py").read_text() == "print('mine')\n"
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"  # nothing to delete: the current directory is fine
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(["hanify", "test_vit", "-o", ".", "--overwrite"]) == 0 and (empty / "han_config.json").is_file()


def test_two_runs_taking_over_a_dead_runs_lock_do_not_both_hold_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A judged-stale lock was deleted after the judgement: if another run had taken it over in between, its live
    lock was deleted and both runs wrote into the folder. The takeover now moves the exact stale file away."""
    import socket

    from han_surgery.fileio import LOCK_NAME, FolderInUseError, FolderLock

    lock_file = tmp_path / LOCK_NAME
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": 0, "command": "dead run"}
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": 1.0, "command": "run B"}
    lock_file.write_text(json.dumps(dead))
    judge = FolderLock._refuse_if_live

    def judge_then_lose_the_race(self: FolderLock, holder: dict | None) -> None:
        judge(self, holder)  # judged stale...
        if json.loads(lock_file.read_text())["command"] == "dead run":
            lock_file.write_text(json.dumps(live))  # ...and run B takes it over before this run moves it

    monkeypatch.setattr(FolderLock, "_refuse_if_live", judge_then_lose_the_race)
    with pytest.raises(FolderInUseError, match="run B"):
        FolderLock(tmp_path).acquire()
    assert json.loads(lock_file.read_text()) == live  # run B still holds it
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def test_a_run_started_from_another_runs_checkpoint_can_be_resumed(tmp_path: Path) -> None:
    """``--output-dir B --resume A/checkpoints/step_1`` into an empty B wrote no training_args.json, so B's own later
    ``--resume`` was refused as "not the folder of a han-surgery finetune run"."""
    opts, out = _run_with_checkpoints(tmp_path)
    second = tmp_path / "second"
    second.mkdir()
    argv = [*opts]
    argv[argv.index("--output-dir") + 1] = str(second)
    assert cli([*argv, "--resume", str(sorted((out / "checkpoints").iterdir())[0])]) == 0
    assert (second / "training_args.json").is_file()
    assert cli([*argv, "--resume"]) == 0  # B's own run, continued from its own newest checkpoint


def test_a_run_started_from_another_runs_checkpoint_must_use_that_runs_options(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Into an empty folder there was no training_args.json to compare with, so ``--resume A/checkpoints/step_1``
    took any --data, --lr, --batch-size (a changed micro-batch count skipped the wrong batches) without a word;
    the lr even came back from the checkpoint while training_args.json and the card recorded the new one."""
    opts, out = _run_with_checkpoints(tmp_path)
    second = tmp_path / "second"
    second.mkdir()
    argv = [*opts]
    argv[argv.index("--output-dir") + 1] = str(second)
    step_1 = str(sorted((out / "checkpoints").iterdir())[0])
    capsys.readouterr()
    assert cli([*argv, "--lr", "0.5", "--resume", step_1]) == 2
    assert "--lr" in capsys.readouterr().err
    assert not (second / "training_args.json").exists()
    # a checkpoint that records no options (written before they were kept in it) falls back to its run's folder
    state_file = Path(step_1) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("options")["lr"] == FinetuneConfig.from_json(out / "training_args.json").lr
    state_file.write_text(json.dumps(state))
    rehash_checkpoint(Path(step_1))
    assert cli([*argv, "--label-smoothing", "0.1", "--resume", step_1]) == 2
    assert "--label-smoothing" in capsys.readouterr().err
    # an option newer than the checkpoint is not compared (it would make every older checkpoint unresumable)
    state = json.loads(state_file.read_text())
    state["options"] = {k: v for k, v in FinetuneConfig.from_json(out / "training_args.json").to_dict().items()
                        if k not in ("output_dir", "label_smoothing")}  # fmt: skip
    state_file.write_text(json.dumps(state))
    rehash_checkpoint(Path(step_1))
    assert cli([*argv, "--resume", step_1]) == 0
    # a checkpoint with no record of its options (a run an earlier version started from another run's
    # checkpoint): resumed as before, with a warning
    del state["options"]
    state_file.write_text(json.dumps(state))
    rehash_checkpoint(Path(step_1))
    (out / "training_args.json").unlink()
    shutil.rmtree(second)
    second.mkdir()
    capsys.readouterr()
    assert cli([*argv, "--resume", step_1]) == 0
    assert "warning: --resume:" in capsys.readouterr().err


def test_push_never_uploads_a_file_a_link_leads_to_outside_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``han-surgery push`` staged every file with links followed: a link in the folder to a file outside it
    (``notes.txt -> ~/.ssh/id_rsa``) uploaded that file. Such a link is refused in one line, before the Hub is
    contacted; a link to a file of the folder itself goes up, and a linked folder is not followed. Fake at the
    HfApi boundary (create_repo / upload_folder record what would land in the repo)."""
    from huggingface_hub import CommitInfo, HfApi
    from safetensors.torch import save_file

    from han_surgery.cli import main

    calls: list[dict[str, bytes]] = []

    def upload_folder(self: HfApi, **kw: object) -> CommitInfo:
        staged = Path(str(kw["folder_path"]))
        calls.append({str(p.relative_to(staged)): p.read_bytes() for p in staged.rglob("*") if p.is_file()})
        return CommitInfo(commit_url="https://huggingface.co/me/x/commit/abc", commit_message="m",
                          commit_description="", oid="abc")  # fmt: skip

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE KEY\n")
    folder = tmp_path / "run"
    (folder / "logs").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("# run\n")
    (folder / "logs" / "config.json").symlink_to(folder / "config.json")  # inside the folder: uploaded
    (folder / "keys").symlink_to(secret, target_is_directory=True)  # a linked folder: not followed
    assert main(["push", str(folder), "me/x"]) == 0
    assert sorted(calls[0]) == ["README.md", "config.json", "logs/config.json", "model.safetensors"]
    assert b"PRIVATE KEY\n" not in calls[0].values()
    calls.clear()
    capsys.readouterr()
    (folder / "logs" / "notes.txt").symlink_to(secret / "id_rsa")
    assert main(["push", str(folder), "me/x"]) == 2
    err = capsys.readouterr().err
    assert calls == [] and err.count("\n") == 1, err
    assert str(folder / "logs" / "notes.txt") in err and "outside" in err and "Nothing was uploaded" in err, err
