"""The output folder, checkpoints and the resume step of a run.

* :func:`prepare_output_dir` refuses to write into a non-empty folder without ``overwrite`` (or ``resume``).
* :func:`save_checkpoint` writes accelerate's ``save_state`` into ``<output-dir>/checkpoints/step_N`` under
  a temporary name and renames it when complete, so a killed run never leaves a half-written checkpoint;
  it keeps the newest ``keep_checkpoints``.
* :func:`resume` finds the checkpoint, checks that the run's options are the interrupted run's
  (:data:`~.config.RESUME_FIELDS`, against ``training_args.json``), loads it and trims ``metrics.jsonl``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import HanSurgeryError
from .config import RESUME_FIELDS, FinetuneConfig
from .tracking import truncate_metrics

__all__ = [
    "FinetuneError",
    "CHECKPOINT_DIR",
    "ARGS_FILE",
    "TrainProgress",
    "prepare_output_dir",
    "find_checkpoint",
    "check_resume_config",
    "save_checkpoint",
    "resume",
]

CHECKPOINT_DIR = "checkpoints"
ARGS_FILE = "training_args.json"
#: A file accelerate's ``save_state`` writes for the registered :class:`TrainProgress`: its presence marks a checkpoint.
CHECKPOINT_MARKER = "custom_checkpoint_0.pkl"


class FinetuneError(HanSurgeryError, RuntimeError):
    """A problem with the run's set-up (output folder, resume, options); the message says what to do."""


class TrainProgress:
    """Where the loop is, saved with every checkpoint (``accelerator.register_for_checkpointing``).

    Attributes:
        global_step: optimizer steps done.
        epoch: the current epoch.
        batches_done: micro-batches of ``epoch`` this process has consumed.
        num_processes, global_batch: the run's layout; a checkpoint only resumes under the same.
    """

    def __init__(self, num_processes: int = 1, global_batch: int = 0) -> None:
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0
        self.num_processes = num_processes
        self.global_batch = global_batch

    def state_dict(self) -> dict[str, int]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "num_processes": self.num_processes,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = (state.get("num_processes", self.num_processes), state.get("global_batch", self.global_batch))
        if saved != (self.num_processes, self.global_batch):
            raise FinetuneError(
                f"--resume: the checkpoint was written by {saved[0]} process(es) with global batch {saved[1]}; this "
                f"run has {self.num_processes} with {self.global_batch}. Relaunch with the same number of processes, "
                "--batch-size and --grad-accum to continue exactly."
            )
        self.global_step, self.epoch, self.batches_done = state["global_step"], state["epoch"], state["batches_done"]


def prepare_output_dir(config: FinetuneConfig, accelerator: Any) -> Path:
    """Create ``config.output_dir`` (replacing it with ``overwrite``); refuse a non-empty one otherwise."""
    out = Path(config.output_dir).expanduser()
    exists = out.exists() and any(out.iterdir()) if out.is_dir() else out.exists()
    if config.resume is None and exists and not config.overwrite:
        raise FinetuneError(
            f"--output-dir {out} already exists and is not empty. Pass --overwrite to replace it, or --resume to "
            "continue its run."
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if exists and config.overwrite:
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink()
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


def _step_of(path: Path) -> int | None:
    return int(path.name[5:]) if path.name.startswith("step_") and path.name[5:].isdigit() else None


def find_checkpoint(out: Path, resume: str) -> Path:
    """The checkpoint folder ``--resume`` names: the newest in ``<out>/checkpoints`` for ``"latest"``."""
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / CHECKPOINT_MARKER).is_file():
            raise FinetuneError(f"--resume {resume}: not a checkpoint folder written by this command.")
        return path
    candidates = sorted(
        (p for p in (out / CHECKPOINT_DIR).glob("step_*") if p.is_dir() and _step_of(p) is not None), key=_step_of
    )
    if not candidates:
        raise FinetuneError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}. Run with --checkpoint-every N first.")
    return candidates[-1]


def check_resume_config(out: Path, config: FinetuneConfig) -> None:
    """Raise :class:`FinetuneError` if an option in :data:`RESUME_FIELDS` differs from the interrupted run's."""
    path = out / ARGS_FILE
    if not path.is_file():
        return
    saved = FinetuneConfig.from_json(path).to_dict()
    now = config.to_dict()
    changed = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now.get(k)!r}"
        for k in RESUME_FIELDS
        if saved.get(k) != now.get(k)
    ]
    if changed:
        raise FinetuneError(
            f"--resume: options differ from the interrupted run ({'; '.join(changed)}). Resume with the same options."
        )


def save_checkpoint(accelerator: Any, out: Path, progress: TrainProgress, keep: int) -> Path:
    """``accelerator.save_state`` into ``<out>/checkpoints/step_N`` (written as ``step_N.tmp``, then renamed)."""
    final = out / CHECKPOINT_DIR / f"step_{progress.global_step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted((p for p in final.parent.glob("step_*") if _step_of(p) is not None), key=_step_of)
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator: Any, out: Path, config: FinetuneConfig, progress: TrainProgress) -> Path:
    """Continue the interrupted run in ``out``: check the options, load the checkpoint, trim the metrics."""
    assert config.resume is not None
    checkpoint = find_checkpoint(out, config.resume)
    check_resume_config(out, config)
    accelerator.load_state(str(checkpoint))
    if accelerator.is_main_process:
        truncate_metrics(out, progress.global_step)
    accelerator.print(
        f"resumed from {checkpoint}: step {progress.global_step}, epoch {progress.epoch}, "
        f"{progress.batches_done} batches into it",
        flush=True,
    )
    return checkpoint
