"""``run(config)``: a fine-tuning run as a sequence of named steps, each a function of its own.

================  ======================================================================
step              function
================  ======================================================================
accelerator       :func:`make_accelerator`, :func:`check_mixed_precision`
output folder     :func:`~.checkpoints.prepare_output_dir`
data              :func:`load_run_data` (:func:`~.data.load_data`)
model             :func:`build_student`: the model, the surgery (``config.hanify``), the teacher
loaders           :func:`build_loaders`
optimisation      :func:`prepare_training`: optimizer, schedule, ``accelerator.prepare``
trackers          :func:`~.tracking.init_trackers`
resume            :func:`~.checkpoints.resume`
loop              :func:`~.loop.train_loop`
export            :func:`export`: the Hub-ready folder (weights, config, card, metrics)
================  ======================================================================
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from ..errors import ConfigError, HanifyError, HanSurgeryError, first_line, for_option
from ..fileio import atomic_write_text, publish_files
from ..folders import CARD_NAME, WEIGHTS_NAME
from ..surgery.calibration.config import CalibrationConfig
from ..surgery.calibration.data import fallback_pad_token
from ..surgery.calibration.heal import HiddenStates, hidden_state_paths
from ..surgery.engine import hanify
from ..surgery.report import KEPT_BY_CALIBRATION, HanifyReport
from ..utils import count_parameters
from .calibration import check_calibration_positions, load_calibration_batches
from .checkpoints import (
    ARGS_FILE,
    FinetuneError,
    TrainProgress,
    check_finite_parameters,
    check_output_dir,
    discard_partial_output,
    drop_overwritten,
    failed_overwrite_note,
    foreign_checkpoint,
    prepare_output_dir,
    resume,
    resume_options,
    save_checkpoint,
)
from .config import FinetuneConfig, FinetuneResult
from .data import IMAGE_MEAN, IMAGE_STD, DataBundle, load_data, make_text_collate
from .hub import RESULTS_NAME, base_model_id, push_folder, write_model_card
from .loop import NonFiniteLossError, TrainingState, logits_of, lr_lambda, train_loop, warmup_problem
from .models import BuiltModel, build_model, class_names_in, save_model
from .tracking import init_trackers

__all__ = [
    "Student",
    "run",
    "make_accelerator",
    "check_mixed_precision",
    "load_run_data",
    "build_student",
    "build_loaders",
    "check_loaders",
    "check_forward",
    "cap_max_length",
    "prepare_training",
    "export",
    "timm_data_config",
]


def make_accelerator(config: FinetuneConfig) -> Any:
    """The run's ``Accelerator``: CPU unless CUDA is there, seedable sampler, manual scheduler steps."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    out = Path(config.output_dir).expanduser()
    try:
        return Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            step_scheduler_with_optimizer=False,  # stepped by hand once per optimizer step, whatever the process count
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
            log_with=None,
        )
    except (ValueError, ImportError) as e:  # e.g. fp8 from accelerate's config or launcher, without its backend
        AcceleratorState._reset_state()  # half set up: a later run in this process would fail on it
        GradientState._reset_state()
        raise FinetuneError(f"accelerate cannot set up this run: {first_line(e)}") from None


def check_mixed_precision(accelerator: Any) -> None:
    """Refuse fp16 on a CPU (whether ``--mixed-precision`` or accelerate's config or launcher chose it): accelerate
    turns its autocast off there, so the run would train in float32 and be recorded as fp16."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise FinetuneError(
            "mixed precision fp16 (from --mixed-precision, or accelerate's config or launcher) needs a CUDA GPU: on "
            "the CPU accelerate trains in float32 (no fp16 autocast). Pass --mixed-precision bf16 (or no)."
        )


def load_run_data(config: FinetuneConfig) -> DataBundle:
    """The data step: ``config.data`` read as :func:`~.data.load_data` says, split by ``config.seed``."""
    return load_data(
        config.data,
        task=config.task,
        num_classes=config.num_classes,
        val_fraction=config.val_fraction,
        seed=config.seed,
        image_size=config.image_size,
        max_samples=config.max_samples,
    )


@dataclass
class Student:
    """The model step's result: the model to train, the surgery report, the teacher, the parameter counts,
    and (``--distill hidden`` / ``both``) the modules whose outputs are distilled (the same in both models)."""

    built: BuiltModel
    han_report: HanifyReport | None
    teacher: nn.Module | None
    params_base: int
    params: int
    hidden_paths: list[str] | None = None


def build_student(config: FinetuneConfig, data: DataBundle, *, show_progress: bool = True) -> Student:
    """The model step: build ``config.model`` for ``data``, apply ``config.hanify`` (calibrated on
    ``config.calibrate``), build the teacher.

    A resumed run rebuilds the model the same way (the calibration runs again: the checkpoint then
    overwrites the weights, but kept blocks, ``max_fvu``, decide the structure) and the teacher too.
    Under ``accelerate launch`` every process calibrates its own copy (the same data and seed give every
    process the same weights); ``show_progress=False`` (``--no-progress``, and every process but the
    first) hides the calibration's progress bars.
    """
    built = build_model(
        config.model,
        data,
        pretrained=config.pretrained,
        model_kwargs=config.model_kwargs,
        trust_remote_code=config.trust_remote_code,
    )
    _set_pad_token_id(built)
    params_base = count_parameters(built.model)
    teacher = copy.deepcopy(built.model) if config.distill_from == "base" else None
    if teacher is not None:
        _check_teacher(config, built)
    han_report = None
    if config.hanify is not None:
        if built.hanified:
            raise FinetuneError(
                f"--hanify: {config.model} is already hanified (it has han_config.json); drop --hanify."
            )
        batches = None
        if config.calibrate is not None:
            batches = load_calibration_batches(
                config.calibrate,
                tokenizer=built.tokenizer,
                train=data.train,
                model_name=f"--model {config.model}",
                image_size=_calibration_image_size(config, data),
                seed=config.calibration.seed if config.calibration else 0,
            )
            check_calibration_positions(batches, built.model, f"--model {config.model}")
        calibration_config = config.calibration
        if batches is not None and not (show_progress and config.progress):
            calibration_config = dataclasses.replace(calibration_config or CalibrationConfig(), progress=False)
        try:
            han_report = hanify(built.model, config.hanify, calibration=batches, calibration_config=calibration_config)
        except (ConfigError, HanifyError) as e:
            raise FinetuneError(f"--hanify on {config.model}: {e}") from None
        if han_report.num_rewritten == 0:
            reasons = sorted({s.reason for s in han_report.skipped})
            if any(r.startswith(KEPT_BY_CALIBRATION) for r in reasons):
                why = (
                    f"calibration kept every block ({'; '.join(reasons[:3])}): raise --calibration-max-fvu or "
                    "--calibration-keep-budget, or lower --calibration-keep-count"
                )
            else:
                why = "no block was left to rewrite (check --include / --exclude / --rules with han-surgery inspect)"
            raise FinetuneError(
                f"--hanify rewrote nothing in {config.model}: {why}; drop --hanify to fine-tune the model as it is."
            )
        built.hanified = True
    if config.distill_from and teacher is None:
        _check_teacher_classes(config, data)  # before the build: it would give a head for other classes a new one
        try:
            teacher_built = build_model(config.distill_from, data, trust_remote_code=config.trust_remote_code)
        except HanSurgeryError as e:  # build_model's messages name --model
            raise for_option(e, "--model", "--distill-from") from None
        _check_teacher(config, teacher_built)
        _check_teacher_tokenizer(config, data, built, teacher_built)
        teacher = teacher_built.model
    if data.kind == "text" and built.tokenizer is None:
        raise FinetuneError(f"--model {config.model}: text data needs a tokenizer saved in the model folder.")
    hidden_paths = _hidden_paths(config, han_report, teacher, built.model)
    return Student(built, han_report, teacher, params_base, count_parameters(built.model), hidden_paths)


def _check_teacher(config: FinetuneConfig, teacher: BuiltModel) -> None:
    """Refuse a teacher with nothing to teach: a random classifier's logits, or random weights altogether.

    A timm name built without ``--pretrained`` for ``base`` is let through: it is how the toy runs of the tests and
    examples exercise distillation on a machine without weights (the run's first lines say the teacher is random).
    """
    name = "base (the --model before --hanify)" if config.distill_from == "base" else config.distill_from
    if teacher.random_weights == "all" and config.distill_from != "base":
        raise FinetuneError(
            f"--distill-from {config.distill_from}: its weights are random (a timm name without pretrained weights, "
            "or a built-in tabular network); name a trained model folder as the teacher"
        )
    if teacher.random_weights == "head" and config.distill in ("logits", "both"):
        raise FinetuneError(
            f"--distill {config.distill}: the teacher {name} gets a new, untrained classifier for this data's "
            "labels, so its logits teach nothing; distil its body with --distill hidden, or "
            "name a teacher fine-tuned on these labels"
        )


def _check_teacher_classes(config: FinetuneConfig, data: DataBundle) -> None:
    """``--distill logits`` / ``both``: a teacher folder that names its classes (timm's ``label_names``, transformers'
    ``id2label``) must name the data's, in the same order: its logits are matched to the student's position by
    position (a teacher of ``cat, dog, fox`` taught ``ant, cat, dog`` its cat as the ant, silently)."""
    if config.distill == "hidden" or not data.class_names or config.distill_from in (None, "base"):
        return
    names = class_names_in(Path(config.distill_from.removeprefix("local-dir:")).expanduser() / "config.json")
    if names is not None and names != list(data.class_names):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        ours = ", ".join(data.class_names[:5]) + (", ..." if len(data.class_names) > 5 else "")
        raise FinetuneError(
            f"--distill {config.distill}: the teacher --distill-from {config.distill_from} names its classes {shown}, "
            f"--data {config.data} has {ours}: its logits would teach each class as the one in its position; distil "
            "from a teacher trained on these labels, or use --distill hidden"
        )


def _check_teacher_tokenizer(
    config: FinetuneConfig, data: DataBundle, student: BuiltModel, teacher: BuiltModel
) -> None:
    """Text: the teacher reads the student's token ids, so its tokenizer must be the student's: the same vocabulary,
    and the same ids for the first training texts (normalisation, special tokens). A teacher folder without a
    tokenizer is not compared (:func:`check_forward` still runs it on the student's ids)."""
    if data.kind != "text" or student.tokenizer is None or teacher.tokenizer is None:
        return
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        why = "another vocabulary"
    else:
        texts = [data.train[i][0] for i in range(min(2, len(data.train)))]
        encode = {"truncation": True, "max_length": config.max_length}
        if teacher.tokenizer(texts, **encode)["input_ids"] == student.tokenizer(texts, **encode)["input_ids"]:
            return
        why = "the same vocabulary, but it tokenises the training texts into other ids"
    raise FinetuneError(
        f"--distill-from {config.distill_from}: its tokenizer is not that of --model {config.model} ({why}), and the "
        "teacher reads the student's token ids: distil from a teacher with the student's tokenizer"
    )


def _hidden_paths(
    config: FinetuneConfig, report: HanifyReport | None, teacher: nn.Module | None, model: nn.Module
) -> list[str] | None:
    """``--distill hidden`` / ``both``: the modules after the rewritten blocks; the teacher must have them too, in
    layer lists as long as the student's (a deeper teacher's first layers are not the student's counterparts)."""
    if config.distill == "logits" or report is None or teacher is None:
        return None
    paths = hidden_state_paths(report)
    if not paths:
        raise FinetuneError(
            f"--distill {config.distill}: the rules that rewrote {config.model} do not name the hidden state after "
            "each block; use --distill logits"
        )
    names = dict(teacher.named_modules())
    missing = [p for p in paths if p not in names]
    if missing:
        raise FinetuneError(
            f"--distill {config.distill}: the teacher --distill-from {config.distill_from} has no module "
            f"{', '.join(missing[:3])}: hidden states are distilled between models of the same architecture"
        )
    for path in paths:
        layers, _, index = path.rpartition(".")
        if not (layers and index.isdigit()):
            continue
        container, theirs_container = model.get_submodule(layers), names.get(layers)
        if not all(isinstance(c, (nn.ModuleList, nn.Sequential)) for c in (container, theirs_container)):
            continue
        mine, theirs = len(container), len(theirs_container)
        if mine != theirs:
            raise FinetuneError(
                f"--distill {config.distill}: the teacher --distill-from {config.distill_from} has {theirs} layers in "
                f"{layers} where --model {config.model} has {mine}: hidden states are distilled between models of the "
                "same architecture, layer by layer"
            )
    return paths


def _calibration_image_size(config: FinetuneConfig, data: DataBundle) -> int | None:
    """The square size ``--calibrate <image folder>`` resizes to: ``--image-size``, else that of the training images
    (an ``.npz`` of 32x32 images calibrates at 32 px, not at the folder reader's default 224)."""
    if config.image_size is not None or data.kind != "image" or data.image_size is None:
        return config.image_size
    height, width = data.image_size
    return height if height == width else None  # a folder is resized to a square: no size fits other images


def _set_pad_token_id(built: BuiltModel) -> None:
    """A tokenizer without a pad token pads with its end-of-text token (:func:`~.data.make_text_collate`): give the
    model's config that token as ``pad_token_id`` too when it has none, as transformers' sequence classifiers of
    decoder models (GPT-2's) need to find each row's last real token in a batch of several rows."""
    config = getattr(built.model, "config", None)
    if built.tokenizer is None or config is None or getattr(config, "pad_token_id", 0) is not None:
        return
    try:
        filler = fallback_pad_token(built.tokenizer)
    except ValueError:  # nothing to pad with: check_forward says so in one line
        return
    if filler is not None:
        config.pad_token_id = built.tokenizer.convert_tokens_to_ids(filler)


#: ``tokenizer.model_max_length`` of a tokenizer that sets no limit (transformers' ``VERY_LARGE_INTEGER``).
_NO_LIMIT = int(1e20)


def cap_max_length(
    config: FinetuneConfig, built: BuiltModel, teacher: nn.Module | None = None
) -> tuple[FinetuneConfig, str | None]:
    """``config`` with ``max_length`` (``--max-length``) cut to what the model takes, its positions
    (``config.max_position_embeddings``) and its tokenizer's ``model_max_length``, and a note saying so (``None``
    when it fits). A longer batch would fail in the middle of training, where the position embeddings run out.

    Capped with a note, as transformers' own example scripts (``run_glue.py``) cap ``--max_seq_length``: the default
    128 is more than some small models take, and texts were to be cut anyway. The capped value is the one recorded
    (``args.json``, the card, the saved tokenizer's ``model_max_length``).
    """
    limits = []
    positions = getattr(getattr(built.model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append((positions, "config.max_position_embeddings"))
    tokens = getattr(built.tokenizer, "model_max_length", None)
    if isinstance(tokens, int) and 0 < tokens < _NO_LIMIT:
        limits.append((tokens, "tokenizer.model_max_length"))
    teacher_positions = getattr(getattr(teacher, "config", None), "max_position_embeddings", None)
    if isinstance(teacher_positions, int) and teacher_positions > 0:  # the teacher reads the same batches
        limits.append((teacher_positions, "teacher"))
    if not limits or config.max_length <= min(limits)[0]:
        return config, None
    limit, where = min(limits)
    who = f"--distill-from {config.distill_from}" if where == "teacher" else f"--model {config.model}"
    where = "config.max_position_embeddings" if where == "teacher" else where
    note = (
        f"note: --max-length {config.max_length} is more than {who} takes ({limit} tokens, its {where}): texts are "
        f"cut to {limit} tokens"
    )
    return dataclasses.replace(config, max_length=limit), note


def build_loaders(config: FinetuneConfig, data: DataBundle, built: BuiltModel) -> tuple[Any, Any]:
    """The loaders step: shuffled, drop-last training batches and in-order evaluation batches."""
    collate = make_text_collate(built.tokenizer, config.max_length) if data.kind == "text" else None
    train_loader = torch.utils.data.DataLoader(
        data.train,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(config.seed),
    )
    eval_loader = torch.utils.data.DataLoader(data.eval, batch_size=config.eval_batch, collate_fn=collate)
    return train_loader, eval_loader


def check_loaders(accelerator: Any, config: FinetuneConfig, loaders: tuple[Any, Any]) -> None:
    """At least one training batch for each process (checked before the output folder is touched)."""
    train_loader = loaders[0]
    if len(train_loader) < accelerator.num_processes:
        raise FinetuneError(
            f"The training split has {len(train_loader.dataset)} rows: fewer than one batch of {config.batch_size} for "
            f"each of {accelerator.num_processes} processes. Lower --batch-size or --val-fraction."
        )


def check_forward(config: FinetuneConfig, data: DataBundle, student: Student) -> None:
    """Run the model once on two training rows (eval mode, no gradient) before the output folder is touched.

    A model that does not accept the data's inputs (an image size its patches do not divide, a bad
    ``--model-kwargs`` value) or whose output does not have one value per class (``num_classes`` in
    ``--model-kwargs``) fails here, in one line, instead of in the first training step; so does a
    batch of one row for a model with BatchNorm layers (they cannot normalise one row in training), and
    a ``--distill-from`` teacher that does not take the same batch or gives outputs of another shape.
    """
    built = student.built
    if config.batch_size < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in built.model.modules()):
        raise FinetuneError(
            f"--batch-size 1: --model {config.model} has BatchNorm layers, which need at least 2 rows per batch "
            "in training. Use --batch-size 2 or more."
        )
    collate = make_text_collate(built.tokenizer, config.max_length) if data.kind == "text" else default_collate
    try:
        inputs, _ = collate([data.train[i] for i in range(min(2, len(data.train)))])  # no DataLoader: no RNG drawn
    except ValueError as e:  # the tokenizer cannot pad (no pad, end-of-text or unknown token)
        if data.kind != "text":
            raise
        raise FinetuneError(f"--model {config.model}: {first_line(e)}.") from None
    shape = (
        "token ids " + "x".join(map(str, inputs["input_ids"].shape))
        if isinstance(inputs, dict)
        else "x".join(map(str, inputs.shape))
    )
    if data.kind == "image" and Path(config.data).expanduser().is_dir():
        hint = "check --image-size and --model-kwargs"
    elif data.kind == "image":  # --image-size resizes image folders only: an .npz's images keep their size
        hint = "check --model-kwargs (an .npz's images keep their size: --image-size resizes image folders only)"
    else:
        hint = "check --model-kwargs"
    out = _trial_logits(  # the model's own failure, e.g. timm's AssertionError on the input size
        built.model,
        inputs,
        lambda error: (
            f"--model {config.model} does not accept inputs of shape {shape} from --data {config.data} "
            f"({error}): {hint}."
        ),
    )
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[-1] != data.num_outputs:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise FinetuneError(
            f"--model {config.model} outputs {got} for a batch of {shape}, but --data {config.data} needs "
            f"{data.num_outputs} value(s) per row: check --model-kwargs (num_classes) and --num-classes."
        )
    if student.teacher is not None and config.distill_from != "base":  # base: the student before --hanify
        _check_teacher_forward(config, student.teacher, inputs, shape, tuple(out.shape))
        if student.hidden_paths:
            _check_teacher_hidden_states(config, built.model, student.teacher, student.hidden_paths, inputs)


def _check_teacher_hidden_states(
    config: FinetuneConfig, model: nn.Module, teacher: nn.Module, paths: list[str], inputs: Any
) -> None:
    """``--distill hidden`` / ``both`` from another model: its hidden states have the student's shapes (a wider
    teacher failed in the first training step, with a traceback)."""
    shapes = []
    for net in (model, teacher):
        with HiddenStates(net, paths) as states:
            _trial_logits(net, inputs, lambda error: error)  # both ran in check_forward already
            shapes.append([tuple(state.shape) for state in states.states])
    for path, mine, theirs in zip(paths, *shapes, strict=True):
        if mine != theirs:
            raise FinetuneError(
                f"--distill {config.distill}: the hidden state after {path} is {theirs} in the teacher "
                f"--distill-from {config.distill_from} and {mine} in --model {config.model}: hidden states are "
                "distilled between models of the same architecture and width; use --distill logits"
            )


def _trial_logits(model: nn.Module, inputs: Any, refusal: Callable[[str], str]) -> Any:
    """``logits_of(model, inputs)`` in eval mode, without gradients and without drawing from the RNG, the model's
    mode restored after. The model's own failure (not a han-surgery error) is a :class:`FinetuneError` with the
    message ``refusal("<exception type>: <its first line>")``."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return logits_of(model, inputs)
    except HanSurgeryError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise FinetuneError(refusal(f"{type(e).__name__}: {first}")) from None
    finally:
        model.train(training)


def _check_teacher_forward(
    config: FinetuneConfig, teacher: nn.Module, inputs: Any, shape: str, expected: tuple[int, ...]
) -> None:
    """:func:`check_forward` for the ``--distill-from`` teacher: it takes the student's batch (another number of
    channels, features or token ids fails here) and gives logits of the student's shape."""
    out = _trial_logits(  # the teacher's own failure, e.g. a convolution over another number of channels
        teacher,
        inputs,
        lambda error: (
            f"--distill-from {config.distill_from} does not accept inputs of shape {shape} from --data "
            f"{config.data} ({error}): the teacher gets the student's inputs; distil from a teacher trained on data like "
            "these (the same channels, features or tokenizer)."
        ),
    )
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise FinetuneError(
            f"--distill-from {config.distill_from} outputs {got} for a batch of {shape}, where --model {config.model} "
            f"outputs {expected}: a teacher distils into a student of the same outputs."
        )


def prepare_training(
    accelerator: Any, config: FinetuneConfig, student: Student, loaders: tuple[Any, Any]
) -> TrainingState:
    """The optimisation step: AdamW, the schedule, ``accelerator.prepare``, the loop position.

    A warm-up as long as the run or longer (:func:`~.loop.warmup_problem`) is a warning, from the main process only
    (a resumed run, whose options and length are the interrupted run's, says it again).
    """
    train_loader, eval_loader = loaders
    check_loaders(accelerator, config, loaders)
    model = student.built.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    if config.max_steps:
        total_steps = config.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        epochs = config.epochs or 1
        total_steps = epochs * steps_per_epoch
    problem = warmup_problem(config.warmup_steps, total_steps, config.schedule)
    if problem is not None and accelerator.is_main_process:
        warnings.warn(problem, stacklevel=2)
    schedule = lr_lambda(config.warmup_steps, total_steps, config.schedule)
    scheduler = accelerator.prepare(torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
    global_batch = config.batch_size * accelerator.num_processes * config.grad_accum
    progress = TrainProgress(accelerator.num_processes, global_batch, accelerator.mixed_precision)
    teacher = student.teacher
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    return TrainingState(
        model, optimizer, scheduler, train_loader, eval_loader, progress, total_steps, epochs, teacher,
        student.hidden_paths,
    )  # fmt: skip


def _setup_summary(accelerator: Any, config: FinetuneConfig, state: TrainingState) -> dict[str, Any]:
    return {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "per_process_batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "global_batch_size": state.progress.global_batch,
        "steps_per_epoch": math.ceil(len(state.train_loader) / config.grad_accum),
        "total_steps": state.total_steps,
        "epochs": state.epochs,
    }


def _describe(config: FinetuneConfig, data: DataBundle, student: Student, setup: dict[str, Any]) -> str:
    built, report = student.built, student.han_report
    model = f"model: {config.model} ({built.family}{', hanified' if built.hanified else ''}), parameters {student.params_base:,}"
    if report is not None:
        model += f" -> {student.params:,} after hanify ({report.num_rewritten} block(s) rewritten)"
    if report is not None and report.calibration is not None:
        model += f", calibrated on {config.calibrate.source}"
    if student.teacher is not None:
        model += f"; distilling {config.distill} from {config.distill_from}"
        if config.distill_from == "base" and built.random_weights == "all":
            model += " (whose weights are random: no pretrained weights were loaded)"
    length = (
        f"--max-steps; an epoch is {setup['steps_per_epoch']} steps"
        if config.max_steps
        else f"{setup['epochs']} epoch(s) x {setup['steps_per_epoch']} steps"
    )
    schedule = f"schedule: {setup['total_steps']} optimizer steps ({length}), lr {config.lr} {config.schedule}"
    if config.max_grad_norm is not None:
        schedule += f", gradient norm clipped at {config.max_grad_norm}"
    if config.checkpoint_every:
        schedule += f", checkpoint every {config.checkpoint_every} steps"
    return "\n".join(
        [
            f"han-surgery finetune: {setup['num_processes']} process(es) ({setup['distributed_type']}), device "
            f"{setup['device']}, mixed precision {setup['mixed_precision']}",
            f"global batch size {setup['global_batch_size']} = {config.batch_size} per process x "
            f"{setup['num_processes']} process(es) x {config.grad_accum} accumulation step(s)",
            f"data: {data.describe()}",
            model,
            schedule,
        ]
    )


def timm_data_config(data: DataBundle) -> dict[str, Any] | None:
    """The preprocessing of :mod:`.data` images, for timm's ``pretrained_cfg`` in ``config.json``: what
    ``timm.data.create_transform(**resolve_data_config({}, model=model))`` then does to an image file is what the
    run did (a bilinear resize of the shorter side, a centre crop, ``(x - 0.5) / 0.5``)."""
    if data.kind != "image" or data.image_size is None:
        return None
    c = data.in_chans or 3
    return {
        "input_size": (c, *data.image_size),
        "interpolation": "bilinear",  # torchvision's Resize default; timm's architectures mostly say bicubic
        "mean": (IMAGE_MEAN,) * c,
        "std": (IMAGE_STD,) * c,
        "crop_pct": 1.0,
    }


EXPORT_STAGING = ".export.tmp"
#: Written last: a model folder with its card is complete (see :func:`han_surgery.fileio.publish_files`).
COMPLETION_MARKER = CARD_NAME


def export(
    accelerator: Any,
    config: FinetuneConfig,
    out: Path,
    student: Student,
    data: DataBundle,
    model: nn.Module,
    result: FinetuneResult,
) -> None:
    """The export step (main process): weights and config in the model's library format, ``results.json``,
    the surgery report and the model card.

    Everything is written into ``<out>/.export.tmp`` first and then renamed into place, the model card
    last: a run killed here leaves a folder without its card, which ``--resume`` rewrites and
    ``han-surgery push`` refuses.
    """
    staging = out / EXPORT_STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    save_model(
        student.built,
        accelerator.unwrap_model(model),
        staging,
        data_config=timm_data_config(data),
        standardization=data.standardization(),
        label_names=data.class_names if data.kind == "image" else None,
        max_length=config.max_length if data.kind == "text" else None,
    )
    atomic_write_text(staging / RESULTS_NAME, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    if student.han_report is not None:
        (staging / "hanify_report.txt").write_text(str(student.han_report) + "\n")
    write_model_card(
        staging, config=config, built=student.built, data=data, result=result, han_report=student.han_report
    )
    publish_files(staging, out, marker=COMPLETION_MARKER)


_process_group_ended = False  # a run under accelerate launch ended its process group (end_training)


def run(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune as ``config`` says and write a Hub-ready folder into ``config.output_dir``.

    Works the same in one process and under ``accelerate launch`` (each process calls ``run``). The
    output folder is locked for the whole run (a second run into it is refused, naming this one). A run
    that fails after it took the output folder leaves it as it was (removed if the run created it,
    emptied if it was empty), unless it resumed or wrote a checkpoint. ``overwrite`` is all or nothing:
    the folder's contents are moved aside into ``.overwritten.tmp`` when the run takes the folder, put
    back if it fails or is interrupted before its first checkpoint, and deleted once the new model is
    exported; after a checkpoint, a failure, an interrupt (a note on stderr says so) or a SIGKILL leaves
    them aside beside the new run: ``resume`` finishes the new run, or ``overwrite`` starts again from
    the last finished one.

    Returns:
        The :class:`~.config.FinetuneResult` (also written as ``results.json``).

    Raises:
        FinetuneError, DataError, ModelError, CheckpointError, ConfigError: the set-up cannot work; nothing
            is written in that case (an existing output folder's contents are only moved aside, for
            ``overwrite``, once the data and the model have loaded).
        NonFiniteLossError: the loss became NaN or infinite, or the optimizer's update overflowed float32 (an
            ``lr`` above about 3e37); the checkpoints written before stay (with ``overwrite``, beside the folder's
            former contents, which come back instead if there is none).
        HubUploadError: the upload failed; the local folder is complete.
    """
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    global _process_group_ended
    if _process_group_ended:
        raise FinetuneError(
            "run(): a run in this process has ended, and with it the process group of accelerate launch (a new one "
            "cannot be joined): launch one process group per run"
        )
    start = time.perf_counter()
    out = check_output_dir(config)  # fail before any work
    existed = out.is_dir()
    accelerator = make_accelerator(config)
    lock = None
    prepared = exported = False
    try:
        check_mixed_precision(accelerator)
        set_seed(config.seed)
        data = load_run_data(config)
        student = build_student(config, data, show_progress=accelerator.is_local_main_process)
        if data.kind == "text":  # before anything uses or records --max-length
            config, note = cap_max_length(config, student.built, student.teacher)
            if note:
                accelerator.print(note, flush=True)
        loaders = build_loaders(config, data, student.built)
        check_loaders(accelerator, config, loaders)
        check_forward(config, data, student)
        out, lock = prepare_output_dir(config, accelerator)
        prepared = True
        state = prepare_training(accelerator, config, student, loaders)
        setup = _setup_summary(accelerator, config, state)
        accelerator.print(_describe(config, data, student, setup), flush=True)
        last_checkpoint = None
        if config.resume is not None:  # before anything is written into the folder
            if (out / WEIGHTS_NAME).is_file() and not (out / COMPLETION_MARKER).is_file():
                accelerator.print(f"note: the final save into {out} was interrupted; it is written again", flush=True)
            last_checkpoint = resume(accelerator, out, config, state.progress)
            if accelerator.is_main_process and not (out / ARGS_FILE).is_file():  # started from another run's
                config.to_json(out / ARGS_FILE)  # checkpoint: this folder's run is this one, resumable in turn
        elif accelerator.is_main_process:  # what --resume compares against
            config.to_json(out / ARGS_FILE)
        resumed_step = state.progress.global_step if config.resume is not None else None
        init_trackers(accelerator, out, config.to_dict(), tensorboard=config.tensorboard, resumed_step=resumed_step)

        def checkpoint(progress: TrainProgress) -> None:
            nonlocal last_checkpoint
            if config.checkpoint_every and progress.global_step % config.checkpoint_every == 0:
                bad = check_finite_parameters(state.model)
                if bad is not None:
                    raise FinetuneError(f"parameter {bad} became non-finite at step {progress.global_step}")
                last_checkpoint = save_checkpoint(
                    accelerator,
                    out,
                    progress,
                    config.keep_checkpoints,
                    resume_options(config),
                    replaces_later=foreign_checkpoint(out, config.resume) is None,
                )

        try:
            metrics, train_time = train_loop(
                accelerator,
                state,
                data,
                label_smoothing=config.label_smoothing,
                distill=config.distill,
                distill_alpha=config.distill_alpha,
                distill_temperature=config.distill_temperature,
                distill_hidden_weight=config.distill_hidden_weight,
                max_grad_norm=config.max_grad_norm,
                on_step=checkpoint,
                show_progress=config.progress,
            )
        except NonFiniteLossError as e:
            overwritten = failed_overwrite_note(out) if config.overwrite else None  # what discard_partial_output does
            if last_checkpoint:
                kept = f"the last good checkpoint is {last_checkpoint}" + (f"; {overwritten}" if overwritten else "")
            else:
                kept = overwritten or "no checkpoint was written"
            raise NonFiniteLossError(e.step, e.epoch, e.value, kept, overflow=e.overflow) from None
        accelerator.wait_for_everyone()
        result = FinetuneResult(
            output_dir=out,
            metrics=metrics,
            global_step=state.progress.global_step,
            params_base=student.params_base,
            params=student.params,
            train_runtime_s=round(train_time, 2),
            total_runtime_s=round(time.perf_counter() - start, 2),
            base_model=base_model_id(config, student.built),
            setup=setup,
            data=data.summary(),
        )
        if accelerator.is_main_process:
            export(accelerator, config, out, student, data, state.model, result)
            drop_overwritten(out)  # the former contents (--overwrite) go once the new model is in place
            accelerator.print(f"saved the model folder {out}", flush=True)
        accelerator.wait_for_everyone()
        exported = True
        if lock is not None:  # the folder is complete: release it before the (slow, optional) upload
            lock.release()
        try:
            if config.push_to_hub and accelerator.is_main_process:
                url = push_folder(out, config.push_to_hub, private=config.private or None)
                accelerator.print(f"pushed to {url}", flush=True)
        finally:
            accelerator.end_training()  # closes the trackers (and the process group, when distributed)
            _process_group_ended = _process_group_ended or accelerator.num_processes > 1
        return result
    except BaseException as e:
        if lock is not None:
            lock.release()
        if prepared and not exported and config.resume is None and accelerator.is_main_process:
            note = failed_overwrite_note(out) if config.overwrite else None
            discard_partial_output(out, existed=existed)  # the corrected command can run into it again
            if note and not isinstance(e, NonFiniteLossError):  # whose message says it
                print(f"note: {note}", file=sys.stderr, flush=True)
        raise
    finally:
        if lock is not None:
            lock.release()
        if accelerator.num_processes == 1:  # let a later run in this process build its own Accelerator
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
