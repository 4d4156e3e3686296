"""The trackers step of a run: ``metrics.jsonl`` always, TensorBoard when it is installed (accelerate trackers)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "jsonl_tracker_class", "init_trackers"]

METRICS_FILE = "metrics.jsonl"


@functools.cache
def jsonl_tracker_class() -> type:
    """The ``JSONLTracker`` class (built on first use, so importing this module does not import accelerate)."""
    from accelerate.tracking import GeneralTracker, on_main_process

    class JSONLTracker(GeneralTracker):
        """An accelerate tracker appending one JSON object per ``log`` call to ``<dir>/metrics.jsonl``.

        Lines are ``{"step": int, <metric>: value, ...}``.
        """

        name = "jsonl"
        requires_logging_directory = False
        main_process_only = True

        @on_main_process
        def __init__(self, directory: str | Path) -> None:
            super().__init__()
            self.path = Path(directory) / METRICS_FILE
            self.path.parent.mkdir(parents=True, exist_ok=True)

        @property
        def tracker(self) -> Path:
            return self.path

        @on_main_process
        def store_init_configuration(self, values: dict[str, Any]) -> None:
            (self.path.parent / "tracker_config.json").write_text(json.dumps(values, indent=2, default=str) + "\n")

        @on_main_process
        def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}, default=float) + "\n")

    return JSONLTracker


def init_trackers(
    accelerator: Any, out: Path, hparams: dict[str, Any], *, tensorboard: bool, resumed_step: int | None = None
) -> None:
    """Start the run's trackers: :func:`jsonl_tracker_class` in ``out``, plus TensorBoard in ``out/logs``.

    ``resumed_step``: the step of the checkpoint a resumed run continues from. ``metrics.jsonl`` is trimmed to it
    by the resume; TensorBoard's writer is told to purge the interrupted run's events after it (``purge_step``),
    so its plots show one run, not both. One point shows twice: an epoch's evaluation is logged at the step of the
    checkpoint taken at the epoch's end, after it, and the resumed run logs it again (the same value);
    ``metrics.jsonl`` holds it once.
    """
    from accelerate.tracking import filter_trackers
    from accelerate.utils import is_tensorboard_available

    trackers: list[Any] = [jsonl_tracker_class()(out)]
    if tensorboard and is_tensorboard_available():
        trackers.append("tensorboard")
    accelerator.log_with = filter_trackers(trackers, accelerator.logging_dir)
    flat = {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))}
    purge = {"tensorboard": {"purge_step": resumed_step + 1}} if resumed_step is not None else {}
    accelerator.init_trackers("finetune", config=flat, init_kwargs=purge)
