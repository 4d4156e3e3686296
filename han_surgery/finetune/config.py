"""``FinetuneConfig``: every option of a fine-tuning run, typed, documented and validated in one place.

``han-surgery finetune`` derives its flags from these fields (``output_dir`` -> ``--output-dir``,
see :mod:`han_surgery.dataclass_cli`); Python callers build the dataclass and call
:func:`han_surgery.finetune.run`. A run writes its config as ``training_args.json``, which
:meth:`FinetuneConfig.from_json` reads back (``--resume`` compares the two).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..checks import MAX_NUM_CLASSES, check_bool, check_int, check_number
from ..dataclass_cli import literal_choices
from ..errors import ConfigError
from ..surgery.calibration.config import CalibrationConfig
from ..surgery.calibration.data import CalibrationData
from ..surgery.config import HanConfig

__all__ = ["FinetuneConfig", "FinetuneResult", "RESUME_FIELDS", "repo_id_problem"]

MODEL, SURGERY, DATA, TRAINING, CHECKPOINTS, DISTILLATION, OUTPUT = (
    "model",
    "surgery (with --hanify; the HanConfig fields)",
    "data",
    "training",
    "checkpoints",
    "distillation",
    "output",
)


def _opt(default: Any, help: str, group: str, **meta: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "group": group, **meta})
    return field(default=default, metadata={"help": help, "group": group, **meta})


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a Hub model repo id ``<user or org>/<name>`` (``None`` if it is one)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1 or repo_id.startswith("/"):
        return "give a repo id as <user or org>/<name>"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"not a Hub repo id ({e})"
    return None


@dataclass(kw_only=True)
class FinetuneConfig:
    """A fine-tuning run: model, optional surgery, data, training, checkpoints, distillation, output.

    Only ``model``, ``data`` and ``output_dir`` are required. ``hanify`` is the surgery applied
    before training (a :class:`~han_surgery.HanConfig`; ``None``: none). With ``calibrate`` (a
    :class:`~han_surgery.surgery.calibration.CalibrationData`; its ``source`` ``"train"`` is the
    training split of ``data``) the surgery is calibrated, as ``calibration`` (a
    :class:`~han_surgery.surgery.calibration.CalibrationConfig`) says. The global batch is
    ``batch_size x processes x grad_accum``.

    Raises:
        ConfigError: an invalid value or an impossible combination; raised when the config is
            built, before anything is written.
    """

    # --- model
    # required fields are spelled `field(metadata=...)` so that type checkers see they have no default
    model: str = field(
        metadata={
            "help": "timm or Han model name, local-dir:<folder>, a folder saved by han_surgery.save_pretrained, timm "
            "save_for_hf or transformers save_pretrained, or mlp[:WxD] / hannet[:WxD] for tabular data",
            "group": MODEL,
        }
    )
    pretrained: bool = _opt(
        False, "load timm's pretrained weights for a timm name (needs the Hub or a warm cache)", MODEL
    )
    trust_remote_code: bool = _opt(
        False, "let transformers run Python code shipped in the model folder (auto_map); off unless you trust it", MODEL
    )
    model_kwargs: dict[str, Any] = _opt(
        {},
        "extra keyword arguments for a timm model name's constructor or a transformers folder's config, e.g. "
        "'{\"drop_rate\": 0.1}' (refused for other folders and for mlp / hannet)",
        MODEL,
    )
    # --- surgery
    hanify: HanConfig | None = field(default=None, metadata={"cli": False, "help": "the surgery before training"})
    calibrate: CalibrationData | None = field(
        default=None, metadata={"cli": False, "help": "calibrated surgery: the data the new blocks are fitted on"}
    )
    calibration: CalibrationConfig | None = field(
        default=None, metadata={"cli": False, "help": "calibrated surgery: how the new blocks are fitted"}
    )
    # --- data
    data: str = field(
        metadata={
            "help": "image folder, .npz (images, labels), numeric .csv (target last), or .csv/.jsonl (text, label)",
            "group": DATA,
        }
    )
    task: Literal["auto", "classification", "regression"] = _opt(
        "auto",
        "for numeric CSVs: what the last column is (auto: classification for <= 20 integer values in 0..20)",
        DATA,
    )
    num_classes: int | None = _opt(None, "number of classes (default: largest label + 1)", DATA)
    val_fraction: float = _opt(0.1, "fraction of rows held out for evaluation (fixed by --seed)", DATA)
    max_samples: int | None = _opt(
        None,
        "use only N rows (quick runs): a file's first N (the classes still all of the file's), a seeded draw of N "
        "images",
        DATA,
    )
    image_size: int | None = _opt(None, "resize image-folder images to this square size (default 224)", DATA)
    max_length: int = _opt(128, "token limit for text data", DATA)
    # --- training
    output_dir: str = field(metadata={"help": "where the model folder, metrics and checkpoints go", "group": TRAINING})
    overwrite: bool = _opt(
        False,
        "replace an existing --output-dir, all or nothing: its contents wait in <dir>/.overwritten.tmp until the new "
        "model is saved, and are put back if the run fails or is interrupted before its first checkpoint (after "
        "one, --resume in place of --overwrite continues the new run)",
        TRAINING,
    )
    epochs: int | None = _opt(None, "passes over the training split (default 1; or give --max-steps)", TRAINING)
    max_steps: int | None = _opt(None, "optimizer steps to run (instead of --epochs)", TRAINING)
    batch_size: int = _opt(32, "batch size PER PROCESS", TRAINING)
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step", TRAINING)
    lr: float = _opt(1e-3, "peak learning rate (AdamW)", TRAINING)
    weight_decay: float = _opt(0.05, "AdamW weight decay", TRAINING)
    warmup_steps: int = _opt(
        0, "linear warm-up steps before the schedule (fewer than the run's optimizer steps)", TRAINING
    )
    schedule: Literal["cosine", "constant"] = _opt("cosine", "learning-rate schedule after warm-up", TRAINING)
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy, in [0, 1)", TRAINING)
    max_grad_norm: float | None = _opt(
        None,
        "clip the gradients' global L2 norm to this before each optimizer step (default: no clipping; "
        "transformers' Trainer clips at 1.0)",
        TRAINING,
        metavar="NORM",
    )
    seed: int = _opt(0, "seed of the model init, the held-out split and the data order", TRAINING)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _opt(
        None, "accelerate mixed precision (default: the accelerate config's, else no); CPU supports bf16", TRAINING
    )
    eval_batch_size: int | None = _opt(None, "per-process evaluation batch size (default 2x --batch-size)", TRAINING)
    # --- checkpoints
    checkpoint_every: int | None = _opt(
        None,
        "save the full training state every N optimizer steps (<output-dir>/checkpoints)",
        CHECKPOINTS,
        metavar="N",
    )
    keep_checkpoints: int = _opt(2, "keep the newest N checkpoints", CHECKPOINTS)
    resume: str | None = _opt(
        None,
        "continue exactly from the newest checkpoint in --output-dir (or the given checkpoint folder: another "
        "folder's checkpoint continues into a new or empty --output-dir, or one holding a run of the same options)",
        CHECKPOINTS,
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
    )
    # --- distillation
    distill_from: str | None = _opt(
        None, "teacher: 'base' (the --model before --hanify) or any --model spec", DISTILLATION, metavar="MODEL"
    )
    distill: Literal["logits", "hidden", "both"] = _opt(
        "logits",
        "what is distilled: the logits (T^2 KL), the hidden state after every rewritten block (TinyBERT-style "
        "MSE / Var(teacher), needs --hanify), or both",
        DISTILLATION,
    )
    distill_alpha: float = _opt(
        0.5, "weight a of the distillation term: (1-a) task loss + a (T^2 KL and/or w hidden)", DISTILLATION
    )
    distill_temperature: float = _opt(2.0, "softmax temperature T of the logits term", DISTILLATION)
    distill_hidden_weight: float = _opt(
        1.0, "weight w of the hidden-state term inside the distillation term", DISTILLATION
    )
    # --- output
    push_to_hub: str | None = _opt(
        None, "upload the output folder to this Hub repo <user>/<name>", OUTPUT, metavar="REPO_ID"
    )
    private: bool = _opt(False, "create the Hub repo as private", OUTPUT)
    tensorboard: bool = _opt(True, "log to TensorBoard too, when it is installed", OUTPUT)
    progress: bool = _opt(True, "show a progress bar", OUTPUT)

    def __post_init__(self) -> None:
        if isinstance(self.hanify, dict):
            self.hanify = HanConfig.from_dict(self.hanify)
        if isinstance(self.calibrate, dict):
            self.calibrate = CalibrationData(**self.calibrate)
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig.from_dict(self.calibration)
        for name in ("model", "data", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')}: give a non-empty string")
        for name in ("resume", "distill_from", "push_to_hub"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"--{name.replace('_', '-')}: give a non-empty string or None, got {value!r}")
        for name in ("pretrained", "trust_remote_code", "overwrite", "private", "tensorboard", "progress"):
            check_bool(f"--{name.replace('_', '-')}", getattr(self, name))
        for name, choices in literal_choices(type(self)).items():  # task, schedule, mixed_precision, distill
            if getattr(self, name) not in choices:
                names = ", ".join(repr(c) if c is None else str(c) for c in choices)
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {names}, got {getattr(self, name)!r}")
        # numpy's seed (accelerate's set_seed seeds it too) is a 32-bit unsigned int
        check_int("--seed", self.seed, 0, high=2**32 - 1)
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"--model-kwargs: give a JSON object of keyword arguments, got {self.model_kwargs!r}")
        positive = ("num_classes", "max_samples", "image_size", "max_length", "epochs", "max_steps", "batch_size",
                    "grad_accum", "eval_batch_size", "checkpoint_every", "keep_checkpoints")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.num_classes is not None and self.num_classes > MAX_NUM_CLASSES:  # as the command line's type
            raise ConfigError(f"--num-classes must be at most {MAX_NUM_CLASSES:,}, got {self.num_classes}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be an integer >= 0, got {self.warmup_steps!r}")
        check_number("--lr", self.lr, 0.0, low_open=True)
        check_number("--weight-decay", self.weight_decay, 0.0)
        check_number("--label-smoothing", self.label_smoothing, 0.0, 1.0)
        check_number("--max-grad-norm", self.max_grad_norm, 0.0, low_open=True, optional=True)
        check_number("--val-fraction", self.val_fraction, 0.0, 1.0, low_open=True)
        check_number("--distill-alpha", self.distill_alpha, 0.0, 1.0, high_closed=True)
        check_number("--distill-temperature", self.distill_temperature, 0.0, low_open=True)
        check_number("--distill-hidden-weight", self.distill_hidden_weight, 0.0, low_open=True)
        if self.epochs is not None and self.max_steps is not None:
            raise ConfigError("--epochs and --max-steps: give one of them, not both")
        if self.resume is not None and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: resuming keeps --output-dir")
        if self.distill_from == "base" and self.hanify is None:
            raise ConfigError(
                "--distill-from base distils from the model before --hanify; add --hanify, or name a teacher"
            )
        if self.calibrate is not None and self.hanify is None:
            raise ConfigError("--calibrate fits the blocks --hanify makes: add --hanify")
        if self.calibration is not None and self.calibrate is None:
            raise ConfigError("the calibration settings need the data to fit on: add --calibrate DATA")
        if self.distill != "logits" and self.distill_from is None:
            raise ConfigError(f"--distill {self.distill} needs a teacher: add --distill-from base (or a model)")
        if self.distill != "logits" and self.hanify is None:
            raise ConfigError(
                f"--distill {self.distill} matches the hidden states after the blocks --hanify rewrites: add --hanify"
            )
        if self.push_to_hub is not None and (problem := repo_id_problem(self.push_to_hub)):
            raise ConfigError(f"--push-to-hub {self.push_to_hub}: {problem}")

    @property
    def eval_batch(self) -> int:
        """The per-process evaluation batch size."""
        return self.eval_batch_size or 2 * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``hanify`` as the HanConfig dict); :meth:`from_dict` inverts it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("hanify", "calibrate", "calibration"):
            value = getattr(self, name)
            out[name] = dataclasses.asdict(value) if value is not None else None
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        """Build from :meth:`to_dict`'s output; unknown keys are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"FinetuneConfig.from_dict: expected a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"FinetuneConfig: unknown fields {unknown}")
        missing = sorted(n for n in ("model", "data", "output_dir") if n not in data)
        if missing:
            raise ConfigError(f"FinetuneConfig: missing required fields {missing}")
        return cls(**data)

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> FinetuneConfig:
        """Read a file written by :meth:`to_json` (e.g. a run's ``training_args.json``)."""
        from ..folders import read_json_object

        return cls.from_dict(read_json_object(path))


#: Fields that must be the same for ``--resume`` to continue the interrupted run exactly.
RESUME_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(FinetuneConfig)
    if f.name
    not in (
        "output_dir",
        "overwrite",
        "resume",
        "checkpoint_every",
        "keep_checkpoints",
        "eval_batch_size",
        "push_to_hub",
        "private",
        "tensorboard",
        "progress",
    )  # fmt: skip
)


@dataclass
class FinetuneResult:
    """What a run returns (and writes as ``results.json``).

    Attributes:
        output_dir: the model folder.
        metrics: the final held-out metrics (``eval_loss`` and ``eval_accuracy`` or ``eval_rmse``)
            and the last logged ``train_loss``.
        global_step: optimizer steps done.
        params_base, params: parameters before and after surgery.
        train_runtime_s, total_runtime_s: wall times.
        base_model: what the model came from (a timm name, a Hub id, a folder name).
        setup: processes, device, mixed precision and batch sizes.
        data: a summary of the data (rows, classes, preprocessing).
    """

    output_dir: Path
    metrics: dict[str, float]
    global_step: int
    params_base: int
    params: int
    train_runtime_s: float
    total_runtime_s: float
    base_model: str
    setup: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` layout: the metrics and the set-up at the top level, beside the other fields."""
        return {
            **self.metrics,
            "global_step": self.global_step,
            "train_runtime_s": self.train_runtime_s,
            "total_runtime_s": self.total_runtime_s,
            "params_base": self.params_base,
            "params": self.params,
            **self.setup,
            "base_model": self.base_model,
            "output_dir": str(self.output_dir),
            "data": self.data,
        }
