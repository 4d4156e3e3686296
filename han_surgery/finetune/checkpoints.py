"""The output folder, checkpoints and the resume step of a run.

* :func:`check_output_dir` refuses a non-empty folder without ``overwrite`` (or ``resume``), a folder
  another run holds, and another folder's checkpoint resumed over a run of other options or with other options,
  before anything is read or written; :func:`prepare_output_dir` then takes the folder's lock
  (:class:`~han_surgery.fileio.FolderLock`) for the whole run and, for ``overwrite``, moves its contents
  aside into ``.overwritten.tmp``: deleted once the new run has exported, put back if it fails before its first
  checkpoint (all or nothing); after one, kept aside beside the new run, which ``resume`` continues.
* :func:`save_checkpoint` writes accelerate's ``save_state`` (weights as safetensors; optimizer, scheduler
  and RNG states as torch files), this loop's own state as JSON (``trainer_state.json``: step, epoch,
  position in the epoch, running loss, metrics lines written) and a manifest of every file's size and
  SHA-256, into ``checkpoints/step_N.tmp``, then renames it to ``step_N``: a killed run never leaves a
  half-written checkpoint that looks complete.
* :func:`resume` takes the newest checkpoint whose manifest verifies (a corrupt newer one is reported and
  skipped), checks that the run's options are the interrupted run's (:data:`~.config.RESUME_FIELDS`,
  as the checkpoint records them), loads it with ``weights_only=True`` unpickling only (no file in a
  checkpoint can run code; han-surgery's own state is JSON), and restarts ``metrics.jsonl`` as the run that wrote
  the checkpoint had it then (its own first lines; another folder's checkpoint: that run's), so the resumed run's
  metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import HanSurgeryError
from ..fileio import (
    LOCK_NAME,
    FolderLock,
    atomic_write_text,
    empty_folder,
    input_held_by,
    move_entries,
    output_folder_problem,
    too_wide_to_empty,
)
from ..folders import CARD_NAME
from .config import RESUME_FIELDS, FinetuneConfig
from .tracking import METRICS_FILE

__all__ = [
    "FinetuneError",
    "CHECKPOINT_DIR",
    "ARGS_FILE",
    "STATE_FILE",
    "MANIFEST_FILE",
    "OVERWRITTEN_DIR",
    "OVERWRITTEN_PARTIAL_DIR",
    "TrainProgress",
    "check_output_dir",
    "foreign_checkpoint",
    "prepare_output_dir",
    "set_aside_contents",
    "drop_overwritten",
    "failed_overwrite_note",
    "discard_partial_output",
    "checkpoint_problem",
    "find_checkpoints",
    "check_resume_config",
    "OPTIONS_BEFORE_RECORDED",
    "resume_options",
    "save_checkpoint",
    "resume",
    "check_finite_parameters",
]

CHECKPOINT_DIR = "checkpoints"
ARGS_FILE = "training_args.json"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "checkpoint_manifest.json"
#: Where ``--overwrite`` keeps the folder's former contents until the new run has exported (inside the folder: the
#: same file system, so every move is a rename; a ``.tmp`` name, which ``han-surgery push`` does not upload).
OVERWRITTEN_DIR = ".overwritten.tmp"
#: Where :func:`set_aside_contents` moves them first, renamed to :data:`OVERWRITTEN_DIR` once all are in: one left
#: behind means a run killed in the middle of the moves (before it started), whose contents go back.
OVERWRITTEN_PARTIAL_DIR = ".overwritten.partial.tmp"


class FinetuneError(HanSurgeryError, RuntimeError):
    """A problem with the run's set-up (output folder, resume, options); the message says what to do."""


class TrainProgress:
    """Where the loop is: saved as JSON with every checkpoint.

    Attributes:
        global_step: optimizer steps done.
        epoch: the current epoch.
        batches_done: micro-batches of ``epoch`` this process has consumed.
        running_loss, running_count: the sum and count of micro-batch losses since the last logged
            ``train_loss`` (so the first value logged after a resume is the uninterrupted run's).
        running_hidden: the sum of the micro-batches' hidden-state distillation terms over the same
            window (``--distill hidden`` / ``both``; logged as ``distill_hidden_loss``).
        metrics_lines: lines of ``metrics.jsonl`` written so far.
        last_train: the last logged training values (``train_loss``, ``distill_hidden_loss``), which the run's
            results report (a run resumed from its last step's checkpoint logs none of its own).
        num_processes, global_batch, mixed_precision: the run's layout (the mixed precision in effect, whether
            ``--mixed-precision`` or accelerate's config or launcher chose it); a checkpoint only resumes under the
            same.
    """

    def __init__(self, num_processes: int = 1, global_batch: int = 0, mixed_precision: str = "no") -> None:
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0
        self.running_loss = 0.0
        self.running_count = 0
        self.running_hidden = 0.0
        self.metrics_lines = 0
        self.last_train: dict[str, float] = {}
        self.num_processes = num_processes
        self.global_batch = global_batch
        self.mixed_precision = mixed_precision

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state.get("num_processes"), state.get("global_batch"))
        if saved != (self.num_processes, self.global_batch):
            raise FinetuneError(
                f"--resume: the checkpoint was written by {saved[0]} process(es) with global batch {saved[1]}; this "
                f"run has {self.num_processes} with {self.global_batch}. Relaunch with the same number of processes, "
                "--batch-size and --grad-accum to continue exactly."
            )
        saved_precision = state.get("mixed_precision")  # checkpoints written before it was recorded: not checked
        if saved_precision is not None and saved_precision != self.mixed_precision:
            raise FinetuneError(
                f"--resume: the checkpoint was written with mixed precision {saved_precision}; this run has "
                f"{self.mixed_precision} (from --mixed-precision, or accelerate's config or launcher). Relaunch with "
                f"--mixed-precision {saved_precision} to continue exactly."
            )
        for key, current in list(vars(self).items()):  # a key newer than the checkpoint keeps its start value
            value = state.get(key, current)
            kinds = (int, float) if isinstance(current, float) else type(current)
            if isinstance(value, dict):  # last_train: names to numbers
                bad = not all(isinstance(k, str) and type(v) in (int, float) for k, v in value.items())
            else:
                bad = isinstance(value, bool) or (isinstance(value, int) and value < 0)
            if bad or not isinstance(value, kinds):
                raise FinetuneError(
                    f"--resume: the checkpoint's {STATE_FILE} holds {key} = {value!r:.40}, not a state han-surgery "
                    "wrote; resume from another checkpoint"
                )
            setattr(self, key, value)


def _is_run_folder(out: Path) -> bool:
    """Whether ``out`` is a fine-tune's own folder: its ``training_args.json``, or a checkpoint it wrote (a run
    that an earlier version started from another run's checkpoint has no ``training_args.json``)."""
    return (out / ARGS_FILE).is_file() or any((out / CHECKPOINT_DIR).glob(f"step_*/{MANIFEST_FILE}"))


def check_output_dir(config: FinetuneConfig) -> Path:
    """Fail early (nothing read or written yet) if the output folder cannot be used; return its path."""
    out = Path(config.output_dir).expanduser()
    foreign = foreign_checkpoint(out, config.resume)
    problem = output_folder_problem(out)  # a file, or a place where no folder can be made
    if problem is not None:
        raise FinetuneError(f"--output-dir {problem}.")
    held = config.overwrite and input_held_by(
        out,
        {
            "--data": config.data,
            "--model": config.model,
            "--calibrate": config.calibrate.source if config.calibrate is not None else None,
            "--distill-from": config.distill_from,
        },
    )
    if held:
        raise FinetuneError(
            f"--output-dir {out} holds {held}: --overwrite would delete it. Choose another --output-dir."
        )
    wide = config.overwrite and too_wide_to_empty(out)
    if wide:
        raise FinetuneError(
            f"--output-dir {out} is {wide}: --overwrite would delete everything in it. Choose a folder of the run's own."
        )
    saved = None  # the options another folder's checkpoint records, read once
    if out.is_dir():
        FolderLock(out).check()  # another live run writes into it
        entries = [p for p in out.iterdir() if p.name != LOCK_NAME]
        if config.resume is None and entries and not config.overwrite:
            raise FinetuneError(
                f"--output-dir {out} already exists and is not empty. Pass --overwrite to replace it, or --resume "
                "to continue its run."
            )
        if foreign is not None:
            saved = _foreign_options(out, foreign)
            if entries:
                _check_foreign_resume(out, foreign, saved)
        elif config.resume is not None and entries and not _is_run_folder(out):
            raise FinetuneError(
                f"--resume: {out} is not the folder of a han-surgery finetune run (it has no {ARGS_FILE}): --resume "
                "continues a run in that run's own --output-dir; nothing was changed"
            )
    elif config.resume is not None and foreign is None:
        raise FinetuneError(f"--resume: {out} does not exist: there is no run to continue.")
    elif foreign is not None:
        saved = _foreign_options(out, foreign)
    if saved is not None:
        _check_foreign_options(saved, config)
    return out


def foreign_checkpoint(out: Path, resume: str | None) -> Path | None:
    """The checkpoint ``--resume PATH`` names when it is not one of ``<out>/checkpoints`` (another folder's run),
    else ``None`` (no ``--resume``, ``latest``, or a checkpoint of the folder's own run)."""
    if resume is None or resume == "latest":
        return None
    path = Path(resume).expanduser()
    return None if path.resolve().parent == (out / CHECKPOINT_DIR).resolve() else path


def _foreign_options(out: Path, checkpoint: Path) -> dict[str, Any] | None:
    """The options another folder's ``checkpoint`` records (:func:`_recorded_options`); a folder that is not a
    checkpoint is refused in one line."""
    find_checkpoints(out, str(checkpoint))  # a checkpoint folder, or one line saying it is not
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = None
    return _recorded_options(checkpoint, state if isinstance(state, dict) else {})


def _check_foreign_options(saved: dict[str, Any], config: FinetuneConfig) -> None:
    """``--resume`` of another folder's checkpoint, whose run had the options ``saved``: refuse other options before
    anything is read or written (:func:`resume` compares them again, and warns where the checkpoint records none).

    ``--max-length`` is compared only where this run's is not longer: a text run's is cut to the model's limit later
    (:func:`~.runner.cap_max_length`), and the recorded one is that cut value.
    """
    now = config.to_dict()
    if isinstance(saved.get("max_length"), int) and saved["max_length"] < now["max_length"]:
        now["max_length"] = saved["max_length"]
    _refuse_changed_options(saved, now)


def _check_foreign_resume(out: Path, checkpoint: Path, saved: dict[str, Any] | None) -> None:
    """``--resume`` of another folder's ``checkpoint`` (whose run had the options ``saved``, ``None`` if it records
    none) into the non-empty ``out``: allowed only where ``out`` holds a run of those options (:data:`RESUME_FIELDS`;
    the same command run again), never over another run."""
    if saved is None or not (out / ARGS_FILE).is_file():
        why = (
            f"files but no {ARGS_FILE} to compare with the checkpoint's options"
            if saved is not None
            else "files, and the checkpoint records no options to compare with theirs"
        )
    else:
        changed = _changed_options(saved, FinetuneConfig.from_json(out / ARGS_FILE).to_dict())
        if not changed:
            return
        why = f"a run of other options (the checkpoint's -> the folder's: {'; '.join(changed)})"
    raise FinetuneError(
        f"--resume {checkpoint}: another folder's checkpoint continues in a new or empty --output-dir, and {out} "
        f"holds {why}. Choose another --output-dir; nothing was changed"
    )


def prepare_output_dir(config: FinetuneConfig, accelerator: Any) -> tuple[Path, FolderLock | None]:
    """Take the output folder's lock (main process), put back what an ``--overwrite`` run killed while setting the
    folder's contents aside had moved, and, with ``overwrite``, set its contents aside (:func:`set_aside_contents`).

    Returns the folder and the lock (``None`` on the other processes); release it at the end of the run.
    """
    out = check_output_dir(config)
    lock = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        lock = FolderLock(out).acquire()
        if lock.took_over is not None:
            print(f"note: took over the lock left in {out} by a run that died (pid {lock.took_over.get('pid')})")
        try:
            if config.overwrite:
                set_aside_contents(out)
            else:
                _undo_partial_set_aside(out)
        except BaseException:
            lock.release()
            raise
    accelerator.wait_for_everyone()
    return out, lock


def set_aside_contents(out: Path) -> None:
    """``--overwrite``: move everything in ``out`` but its lock into ``out/.overwritten.tmp``
    (:data:`OVERWRITTEN_DIR`), where it stays until the new run has exported its model
    (:func:`drop_overwritten`), or goes back if the run fails or is interrupted before its first checkpoint
    (:func:`discard_partial_output`).

    The entries are moved into :data:`OVERWRITTEN_PARTIAL_DIR` first, which is renamed ``.overwritten.tmp`` once all
    are in: a ``.overwritten.tmp`` always holds the whole of the former contents, and what is beside it is the new
    run's (a partial one left by a SIGKILL, the set-aside unfinished and the run never started, is put back first).

    A ``.overwritten.tmp`` already there was left by an ``--overwrite`` run killed with SIGKILL (or one that failed or
    was interrupted after its first checkpoint), and what is beside it is that run's: if it had exported (its model
    card is in place), that is the last finished run and replaces the folder's former contents; otherwise it is
    dropped and the former contents stay aside.
    """
    _undo_partial_set_aside(out)
    aside = out / OVERWRITTEN_DIR
    if aside.is_symlink() or aside.is_file():
        aside.unlink()
    if aside.is_dir():
        if not (out / CARD_NAME).is_file():
            empty_folder(out, keep=aside)
            return
        shutil.rmtree(aside)
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if not entries:
        return
    partial = out / OVERWRITTEN_PARTIAL_DIR
    partial.mkdir()
    try:
        for entry in entries:
            os.replace(entry, partial / entry.name)
    except BaseException:  # interrupted half-way: what moved goes back
        move_entries(partial, out)
        raise
    os.replace(partial, aside)


def _undo_partial_set_aside(out: Path) -> None:
    """Move back into ``out`` what an ``--overwrite`` run killed in the middle of :func:`set_aside_contents` had moved
    into :data:`OVERWRITTEN_PARTIAL_DIR` (that run never started: the rest of the former contents are still in
    place)."""
    partial = out / OVERWRITTEN_PARTIAL_DIR
    if partial.is_symlink() or partial.is_file():
        partial.unlink()
    elif partial.is_dir():
        move_entries(partial, out)


def _put_back(out: Path) -> None:
    """Replace whatever is in ``out`` (but the lock) by the contents :func:`set_aside_contents` moved aside, if any."""
    aside = out / OVERWRITTEN_DIR
    if aside.is_symlink() or not aside.is_dir():
        return
    empty_folder(out, keep=aside)
    move_entries(aside, out)


def drop_overwritten(out: Path) -> None:
    """Delete the contents an ``--overwrite`` run set aside (:func:`set_aside_contents`), once it has exported: its
    own, or those of an ``--overwrite`` run killed with SIGKILL that a ``--resume`` has now finished."""
    aside = out / OVERWRITTEN_DIR
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)


def _has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a complete checkpoint (one ``--resume`` can continue)."""
    return any(_step_of(p.parent) is not None for p in (out / CHECKPOINT_DIR).glob(f"step_*/{MANIFEST_FILE}"))


def failed_overwrite_note(out: Path) -> str | None:
    """What :func:`discard_partial_output` leaves of a failed or interrupted ``--overwrite`` run in ``out``, in one
    line (``None``: not an ``--overwrite`` run's folder)."""
    aside = out / OVERWRITTEN_DIR
    if aside.is_symlink() or not aside.is_dir():
        return None
    if not _has_checkpoint(out):
        return f"{out} is put back as it was before --overwrite"
    return (
        f"{out} keeps this --overwrite run's checkpoints, and the previous run in {aside}: the same command with "
        "--resume in place of --overwrite continues this run and then deletes the previous one; --overwrite starts "
        "over from the previous one"
    )


def discard_partial_output(out: Path, *, existed: bool) -> None:
    """After a failed run: leave ``out`` as the user had it before the run, unless the run wrote a checkpoint.

    A folder holding a checkpoint is kept (resumable: the error or a note names it); an ``--overwrite`` run's former
    contents then stay aside in ``.overwritten.tmp``, as a SIGKILL leaves them (:func:`failed_overwrite_note`).
    Otherwise an ``--overwrite`` run's folder gets its former contents back (the new run's files are deleted); a folder
    the run created is removed; one that existed (empty) is emptied again, so the corrected command can run into it.
    Call it after the lock is released.
    """
    if _has_checkpoint(out):  # resumable
        return
    if (out / OVERWRITTEN_DIR).is_dir():
        _put_back(out)
        return
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
    elif out.is_dir():
        empty_folder(out)


def _step_of(path: Path) -> int | None:
    return int(path.name[5:]) if path.name.startswith("step_") and path.name[5:].isdigit() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not an intact checkpoint (``None`` if it is): every file of its manifest, same size and hash."""
    manifest_file = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest_file} is missing or unreadable"
    if STATE_FILE not in files:
        return f"{folder} has no {STATE_FILE} in its manifest"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry.get("size") or _sha256(path) != entry.get("sha256"):
            return f"{path} does not match the manifest (truncated or changed)"
    return None


def find_checkpoints(out: Path, resume: str) -> list[Path]:
    """The checkpoint folders ``--resume`` may use, newest first (one folder if it names one)."""
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / STATE_FILE).is_file() and not (path / MANIFEST_FILE).is_file():
            raise FinetuneError(f"--resume {resume}: not a checkpoint folder written by han-surgery finetune.")
        return [path]
    candidates = sorted(
        (p for p in (out / CHECKPOINT_DIR).glob("step_*") if p.is_dir() and _step_of(p) is not None), key=_step_of
    )
    if not candidates:
        raise FinetuneError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}. Run with --checkpoint-every N first.")
    return candidates[::-1]


def resume_options(config: FinetuneConfig) -> dict[str, Any]:
    """The options a checkpoint records (and :func:`check_resume_config` compares): :data:`RESUME_FIELDS`."""
    values = config.to_dict()
    return {k: values[k] for k in RESUME_FIELDS}


def check_resume_config(checkpoint: Path, state: dict[str, Any], config: FinetuneConfig) -> None:
    """Raise :class:`FinetuneError` if an option in :data:`RESUME_FIELDS` differs from those of the run that
    wrote ``checkpoint``: the options its ``trainer_state.json`` (``state``) records (an option newer than the
    checkpoint is not compared, unless :data:`OPTIONS_BEFORE_RECORDED` gives the value runs before it had), or (a
    checkpoint written before they were recorded there) its run folder's ``training_args.json``. A checkpoint with
    neither (a run an earlier version started from another run's checkpoint) is resumed with a warning that its
    options cannot be checked; its layout (processes, global batch, mixed precision) still is."""
    saved = _recorded_options(checkpoint, state)
    if saved is None:
        warnings.warn(
            f"--resume: {checkpoint} records no options and its run folder has no {ARGS_FILE}: that this run "
            "uses the interrupted run's options (--data, --lr, ...) cannot be checked",
            stacklevel=2,
        )
        return
    _refuse_changed_options(saved, config.to_dict())


def _refuse_changed_options(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise :class:`FinetuneError` naming each of :data:`RESUME_FIELDS` whose value ``now`` differs from ``saved``."""
    changed = _changed_options(saved, now)
    if changed:
        raise FinetuneError(
            f"--resume: options differ from the interrupted run ({'; '.join(changed)}). Resume with the same options."
        )


def _recorded_options(checkpoint: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """The options of the run that wrote ``checkpoint``: those its ``trainer_state.json`` (``state``) records, else
    (written before they were recorded there) its run folder's ``training_args.json``; ``None`` if neither."""
    saved = state.get("options")
    if isinstance(saved, dict):
        return saved
    args = checkpoint.parent.parent / ARGS_FILE
    return FinetuneConfig.from_json(args).to_dict() if args.is_file() else None


#: Options newer than some checkpoints, with the value every run before them had (``--max-grad-norm``: no clipping):
#: a checkpoint that does not record one is compared as having that value.
OPTIONS_BEFORE_RECORDED: dict[str, Any] = {"max_grad_norm": None}


def _changed_options(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``--flag saved -> now`` for each of :data:`RESUME_FIELDS` that differs (one ``saved`` lacks is not compared,
    unless :data:`OPTIONS_BEFORE_RECORDED` says what every run that did not record it had)."""
    saved = {**OPTIONS_BEFORE_RECORDED, **saved}
    return [
        f"--{k.replace('_', '-')} {saved[k]!r} -> {now.get(k)!r}"
        for k in RESUME_FIELDS
        if k in saved and saved[k] != now.get(k)
    ]


def save_checkpoint(
    accelerator: Any,
    out: Path,
    progress: TrainProgress,
    keep: int,
    options: dict[str, Any],
    *,
    replaces_later: bool = True,
) -> Path:
    """Write ``<out>/checkpoints/step_N`` (see the module docstring) with the run's ``options``
    (:func:`resume_options`); keep the newest ``keep``.

    Checkpoints of a later step than ``N`` are removed once ``step_N`` is in place: they belong to the trajectory
    this run resumed before (``--resume`` of an older checkpoint of ``out``), which this run replaces (it would
    overwrite them one by one), and a later plain ``--resume`` must continue this run, not that one. With
    ``replaces_later=False`` (this run resumed another folder's checkpoint: ``out``'s are not that trajectory's) they
    are left alone, outside the rotation, until this run overwrites them.
    """
    final = out / CHECKPOINT_DIR / f"step_{progress.global_step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # each process's running sums since the last logged train_loss (its own micro-batches): restored per process
    running = torch.tensor([[progress.running_loss, progress.running_hidden]], dtype=torch.float64)
    running = accelerator.gather(running.to(accelerator.device)).tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**progress.state_dict(), "running_by_process": running, "options": options}
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps({"files": files}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(  # only the checkpoints this code wrote (a manifest): never a folder of another name's
            (p for p in final.parent.glob("step_*") if _step_of(p) is not None and (p / MANIFEST_FILE).is_file()),
            key=_step_of,
        )
        later = [p for p in done if _step_of(p) > progress.global_step]
        abandoned = later if replaces_later else []
        if abandoned:
            names = ", ".join(p.name for p in abandoned)
            accelerator.print(f"removing {names}: checkpoints of the run this one resumed before", flush=True)
        current = [p for p in done if p not in later]
        for old in abandoned + current[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator: Any, out: Path, config: FinetuneConfig, progress: TrainProgress) -> Path:
    """Continue the interrupted run in ``out`` from its newest intact checkpoint (see the module docstring)."""
    assert config.resume is not None
    skipped: list[str] = []
    checkpoint = None
    for candidate in find_checkpoints(out, config.resume):
        problem = checkpoint_problem(candidate)
        if problem is None:
            checkpoint = candidate
            break
        skipped.append(problem)
        accelerator.print(f"--resume: skipping {candidate.name}: {problem}", flush=True)
    if checkpoint is None:
        raise FinetuneError(f"--resume: no intact checkpoint in {out / CHECKPOINT_DIR} ({'; '.join(skipped)}).")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    if not isinstance(state, dict):
        raise FinetuneError(f"--resume: {checkpoint / STATE_FILE} is not a state han-surgery wrote")
    check_resume_config(checkpoint, state, config)
    problem = _unsafe_state_problem(checkpoint)
    if problem is not None:
        raise FinetuneError(f"--resume: cannot load {checkpoint}: {problem}")
    try:
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    except Exception as e:  # torch refuses a pickle that is not plain tensors/numbers; or the state does not fit
        refused = isinstance(e, pickle.UnpicklingError)
        why = "it holds a pickle that is not plain tensors (refused: loading it could run code)" if refused else str(e)
        raise FinetuneError(f"--resume: cannot load {checkpoint}: {why}") from None
    progress.load_state_dict(state)
    running = state.get("running_by_process")
    if isinstance(running, list):  # the same number of processes (checked above)
        mine = running[accelerator.process_index] if accelerator.process_index < len(running) else None
        if not (isinstance(mine, list) and len(mine) == 2 and all(isinstance(v, (int, float)) for v in mine)):
            raise FinetuneError(f"--resume: {checkpoint / STATE_FILE} holds running_by_process = {running!r:.60}")
        progress.running_loss, progress.running_hidden = mine
    # This folder's metrics.jsonl restarts as the run that wrote the checkpoint had it then: its own first lines, or
    # (another run's checkpoint, in <run>/checkpoints/) that run's, so that a run resumed from it later is cut right.
    head = _metrics_head(checkpoint.resolve().parent.parent / METRICS_FILE, progress.metrics_lines)
    progress.metrics_lines = len(head)  # what the file holds (fewer if that run's file has lost lines)
    if accelerator.is_main_process:
        atomic_write_text(out / METRICS_FILE, "".join(line + "\n" for line in head))
    accelerator.print(
        f"resumed from {checkpoint}: step {progress.global_step}, epoch {progress.epoch}, "
        f"{progress.batches_done} batches into it",
        flush=True,
    )
    return checkpoint


def _unsafe_state_problem(checkpoint: Path) -> str | None:
    """Why accelerate's ``load_state`` must not read ``checkpoint`` (``None`` if it may): model weights only as
    a pickle (it falls back to ``pytorch_model.bin``, which han-surgery never writes), or a random-state pickle
    that does not load as plain data (accelerate would skip it with a log line and resume with other RNG states)."""
    pickled = sorted(p.name for p in checkpoint.glob("pytorch_model*.bin"))
    if pickled or not any(checkpoint.glob("model*.safetensors")):
        return (
            f"its model weights are {', '.join(pickled) or 'missing'}, not model.safetensors (han-surgery's "
            "checkpoints keep them as safetensors and never unpickle weights)"
        )
    from accelerate.utils import load as accelerate_load

    for path in sorted(checkpoint.glob("random_states_*.pkl")):
        try:
            accelerate_load(path, map_location="cpu")  # weights_only=True, numpy's RNG state allowed
        except Exception:  # noqa: BLE001 (refused by the weights_only unpickler, or unreadable)
            return f"{path.name} is not a random state of plain numbers (refused: loading it could run code)"
    return None


def _metrics_head(path: Path, lines: int) -> list[str]:
    """The first ``lines`` lines of a run's ``metrics.jsonl`` (what it had logged when a checkpoint was saved; fewer
    if the file holds fewer, none if it is missing)."""
    return path.read_text().splitlines()[:lines] if path.is_file() else []


def check_finite_parameters(model: torch.nn.Module) -> str | None:
    """The name of the first parameter with a non-finite value, or ``None``."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return name
    return None
