"""``FinetuneConfig``: validated up front, round-trips through the CLI flags and through JSON; the run's steps alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _finetune_cli import config as config_from_argv
from _toy_data import TINY_VIT, make_images

from han_surgery import ConfigError, HanConfig
from han_surgery.finetune import FinetuneConfig
from han_surgery.finetune.hub import command_line

FULL = FinetuneConfig(
    model="test_vit",
    data="d.npz",
    output_dir="out",
    model_kwargs={"patch_size": 4, "drop_rate": 0.1},
    hanify=HanConfig(reflections=2, drop_norm=False, include=("blocks.0*", "blocks.1*"), dropout=0.0),
    max_steps=7,
    lr=3e-4,
    mixed_precision="bf16",
    checkpoint_every=3,
    distill_from="base",
    distill_alpha=0.25,
    max_grad_norm=0.5,
    push_to_hub="me/model",
    tensorboard=False,
    progress=False,
)


def test_round_trip_through_the_command_line() -> None:
    argv = command_line(FULL).split(" ", 2)[2]  # drop "han-surgery finetune"
    import shlex

    assert config_from_argv(shlex.split(argv)) == FULL
    assert config_from_argv(["--model", "m", "--data", "d", "--output-dir", "o"]) == FinetuneConfig(
        model="m", data="d", output_dir="o"
    )


def test_round_trip_through_json(tmp_path: Path) -> None:
    path = FULL.to_json(tmp_path / "training_args.json")
    assert FinetuneConfig.from_json(path) == FULL
    assert json.loads(path.read_text())["hanify"]["include"] == ["blocks.0*", "blocks.1*"]
    with pytest.raises(ConfigError, match="unknown fields"):
        FinetuneConfig.from_dict({**FULL.to_dict(), "learning_rate": 1.0})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": -1.0}, "--lr must be a finite number in (0, inf)"),
        ({"lr": math.nan}, "--lr"),
        ({"weight_decay": -1.0}, "--weight-decay"),
        ({"label_smoothing": 2.0}, "--label-smoothing must be a finite number in [0, 1)"),
        ({"warmup_steps": -5}, "--warmup-steps must be an integer >= 0"),
        ({"batch_size": 0}, "--batch-size must be a positive integer"),
        ({"num_classes": 10**10}, "--num-classes must be at most 1,000,000"),
        ({"distill_temperature": 0.0}, "--distill-temperature"),
        ({"epochs": 1, "max_steps": 3}, "give one of them, not both"),
        ({"resume": "latest", "overwrite": True}, "contradict"),
        ({"distill_from": "base"}, "add --hanify"),
        ({"push_to_hub": "no-slash"}, "<user or org>/<name>"),
        ({"model_kwargs": [1, 2]}, "JSON object"),
        ({"max_grad_norm": 0.0}, "--max-grad-norm must be None or a finite number in (0, inf), got 0.0"),
        ({"max_grad_norm": -1.0}, "--max-grad-norm must be None or a finite number in (0, inf)"),
        ({"max_grad_norm": math.nan}, "--max-grad-norm"),
        ({"max_grad_norm": math.inf}, "--max-grad-norm"),
        ({"max_grad_norm": True}, "--max-grad-norm"),
        ({"max_grad_norm": "1"}, "--max-grad-norm"),
        # a review: these trained something else than they recorded, or failed deep in the run
        ({"schedule": "linear"}, "--schedule must be one of cosine, constant, got 'linear'"),  # trained cosine
        ({"task": "foo"}, "--task must be one of auto, classification, regression"),  # trained as regression
        ({"mixed_precision": "fp8"}, "--mixed-precision must be one of None, no, fp16, bf16"),
        ({"distill": "attention"}, "--distill must be one of logits, hidden, both"),
        ({"seed": -1}, "--seed must be an int in [0, 4294967295], got -1"),  # numpy's seed: a traceback
        ({"seed": 2**32}, "--seed must be an int in [0, 4294967295]"),
        ({"seed": 1.5}, "--seed"),
        ({"resume": 5}, "--resume: give a non-empty string or None, got 5"),
        ({"push_to_hub": 123}, "--push-to-hub: give a non-empty string or None"),
        ({"distill_from": ""}, "--distill-from: give a non-empty string or None"),  # was ignored
        ({"overwrite": "yes"}, "--overwrite must be True or False"),
    ],
)
def test_invalid_values_are_refused_when_the_config_is_built(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(model="m", data="d", output_dir="o", **change)
    assert message in str(e.value)


def test_max_grad_norm_flag_parses_and_defaults_to_no_clipping() -> None:
    """``--max-grad-norm`` (transformers' ``max_grad_norm``): off unless given, so that the runs and checkpoints
    of earlier versions (which never clipped) keep their meaning; an options file without it reads as off."""
    base = ["--model", "m", "--data", "d", "--output-dir", "o"]
    assert config_from_argv(base).max_grad_norm is None
    assert config_from_argv([*base, "--max-grad-norm", "1.0"]).max_grad_norm == 1.0
    with pytest.raises(ConfigError, match="--max-grad-norm"):
        config_from_argv([*base, "--max-grad-norm", "inf"])
    older = {k: v for k, v in FULL.to_dict().items() if k != "max_grad_norm"}  # training_args.json of before
    assert FinetuneConfig.from_dict(older).max_grad_norm is None
    assert "--max-grad-norm 0.5" in command_line(FULL) and "--max-grad-norm" not in command_line(
        FinetuneConfig(model="m", data="d", output_dir="o")
    )


# ---- the run's steps, each on its own


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "toy.npz", n=96)


def test_data_model_and_loaders_steps(toy: Path, tmp_path: Path) -> None:
    from han_surgery.finetune.runner import build_loaders, build_student, load_run_data

    config = FinetuneConfig(
        model="test_vit", model_kwargs=TINY_VIT, data=str(toy), output_dir=str(tmp_path), batch_size=8,
        hanify=HanConfig(), distill_from="base", val_fraction=0.25,
    )  # fmt: skip
    data = load_run_data(config)
    assert (len(data.train), len(data.eval), data.num_outputs) == (72, 24, 4)
    torch.manual_seed(0)
    student = build_student(config, data)
    assert student.han_report.num_rewritten == 2 and student.params < student.params_base
    assert student.teacher is not None and sum(p.numel() for p in student.teacher.parameters()) == student.params_base
    train, held = build_loaders(config, data, student.built)
    assert len(train) == 9 and len(held) == 2  # drop_last for training; evaluation batches of 2 x 8
    x, y = next(iter(train))
    assert x.shape == (8, 1, 16, 16) and student.built.model(x).shape == (8, 4)


def test_output_folder_step_refuses_a_folder_with_files(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from han_surgery.finetune.checkpoints import FinetuneError, prepare_output_dir

    (tmp_path / "mine.txt").write_text("keep")
    accelerator = Accelerator(cpu=True)
    with pytest.raises(FinetuneError, match="already exists"):
        prepare_output_dir(FinetuneConfig(model="m", data="d", output_dir=str(tmp_path)), accelerator)
    assert (tmp_path / "mine.txt").read_text() == "keep"
    fresh, lock = prepare_output_dir(FinetuneConfig(model="m", data="d", output_dir=str(tmp_path / "new")), accelerator)
    assert fresh.is_dir() and (fresh / ".han-surgery.lock").is_file()  # the run holds the folder
    lock.release()
    assert list(fresh.iterdir()) == []


def test_a_teacher_whose_classifier_starts_untrained_cannot_teach_logits(toy: Path, tmp_path: Path) -> None:
    """``--distill-from base`` on a model given a new head for this data's labels (the README's own
    ``--pretrained`` example): the default ``--distill logits`` taught the student the random head's logits."""
    import timm
    from timm.models import save_for_hf

    from han_surgery.finetune.checkpoints import FinetuneError
    from han_surgery.finetune.runner import build_student, load_run_data

    folder = tmp_path / "ten_classes"  # a trained folder for 10 labels; the toy data has 4
    save_for_hf(timm.create_model("test_vit", num_classes=10, **TINY_VIT), str(folder), safe_serialization=True)
    common = dict(model=str(folder), data=str(toy), output_dir=str(tmp_path / "o"), hanify=HanConfig())
    data = load_run_data(FinetuneConfig(**common))
    for distill in ("logits", "both"):
        config = FinetuneConfig(**common, distill_from="base", distill=distill)
        with pytest.raises(FinetuneError, match=f"--distill {distill}: the teacher base .* new, untrained classifier"):
            build_student(config, data)
        with pytest.raises(FinetuneError, match="new, untrained classifier"):  # another folder as the teacher
            build_student(FinetuneConfig(**common, distill_from=str(folder), distill=distill), data)
    student = build_student(FinetuneConfig(**common, distill_from="base", distill="hidden"), data)
    assert student.built.random_weights == "head" and student.hidden_paths
    with pytest.raises(FinetuneError, match="--distill-from test_vit: its weights are random"):
        build_student(FinetuneConfig(**common, distill_from="test_vit"), data)
    four = tmp_path / "four_classes"  # a head that fits: every weight loaded, logits may be distilled
    save_for_hf(timm.create_model("test_vit", num_classes=4, **TINY_VIT), str(four), safe_serialization=True)
    student = build_student(FinetuneConfig(**{**common, "model": str(four)}, distill_from="base"), data)
    assert student.built.random_weights == "none" and student.teacher is not None


def _prepared(toy: Path, tmp_path: Path, warmup_steps: int, monkeypatch: pytest.MonkeyPatch, *, main: bool = True):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from han_surgery.finetune.runner import build_loaders, build_student, load_run_data, prepare_training

    config = FinetuneConfig(
        model="test_vit", model_kwargs=TINY_VIT, data=str(toy), output_dir=str(tmp_path), batch_size=8,
        max_steps=4, warmup_steps=warmup_steps, progress=False,
    )  # fmt: skip
    data = load_run_data(config)
    student = build_student(config, data)
    accelerator = Accelerator(cpu=True)
    if not main:  # another process of accelerate launch
        monkeypatch.setattr(type(accelerator), "is_main_process", property(lambda self: False))
    try:
        return prepare_training(accelerator, config, student, build_loaders(config, data, student.built))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_a_warm_up_as_long_as_the_run_is_a_warning(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--warmup-steps`` >= the run's optimizer steps was taken silently: the learning rate rose for the whole run
    (never reaching --lr when longer) and the cosine decay never began. One warning, naming both numbers, from the
    main process only (not once per process)."""
    import warnings

    for warmup in (4, 50):
        with pytest.warns(UserWarning) as record:
            state = _prepared(toy, tmp_path, warmup, monkeypatch)
        assert state.total_steps == 4
        messages = [str(w.message) for w in record if "--warmup-steps" in str(w.message)]
        assert len(messages) == 1, messages
        assert f"--warmup-steps {warmup}" in messages[0] and "4 optimizer steps" in messages[0]
        assert "lower --warmup-steps or train longer" in messages[0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _prepared(toy, tmp_path, 3, monkeypatch)  # the warm-up ends within the run: no warning
        _prepared(toy, tmp_path, 50, monkeypatch, main=False)  # the main process says it
    assert not [w for w in record if "--warmup-steps" in str(w.message)]


def test_accelerate_refusing_the_set_up_is_one_error_and_leaves_later_runs_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp8 from accelerate's config or launcher (``ACCELERATE_MIXED_PRECISION``) without its backend: accelerate's
    ValueError came from outside the run's error handling (a traceback from the command), and its half-built state
    made every later ``run()`` in the process fail with an AttributeError."""
    from han_surgery.finetune import FinetuneError, run

    table = tmp_path / "table.csv"
    table.write_text("a,b,y\n" + "".join(f"{i % 7},{i % 3},{i % 2}\n" for i in range(40)))
    config = FinetuneConfig(model="mlp", data=str(table), output_dir=str(tmp_path / "a"), max_steps=1,
                            batch_size=8, progress=False, tensorboard=False)  # fmt: skip
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(FinetuneError, match="^accelerate cannot set up this run: .*fp8"):
        run(config)
    assert not (tmp_path / "a").exists()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert run(config).global_step == 1


def test_hidden_state_distillation_from_a_wider_or_deeper_teacher_is_refused_before_training(
    toy: Path, tmp_path: Path
) -> None:
    """``--distill hidden`` checked only that the teacher had modules of the right names: a wider teacher failed in
    the first training step with a traceback, and a deeper one trained the student's last block towards the
    teacher's middle one, silently."""
    from han_surgery.finetune import FinetuneError, run

    common = dict(data=str(toy), max_steps=1, batch_size=8, progress=False, tensorboard=False)
    for name, kwargs in (
        ("wide", {"embed_dim": 2 * TINY_VIT["embed_dim"]}),
        ("deep", {"depth": 2 * TINY_VIT["depth"]}),
    ):
        run(FinetuneConfig(model="test_vit", model_kwargs={**TINY_VIT, **kwargs}, output_dir=str(tmp_path / name),
                           **common))  # fmt: skip
    student = dict(model="test_vit", model_kwargs=TINY_VIT, hanify=HanConfig(), distill="hidden", **common)
    with pytest.raises(FinetuneError, match=r"the hidden state after blocks\.0 is \(2, \d+, 64\) in the teacher"):
        run(FinetuneConfig(output_dir=str(tmp_path / "a"), distill_from=str(tmp_path / "wide"), **student))
    with pytest.raises(FinetuneError, match=r"has 4 layers in blocks where --model test_vit has 2"):
        run(FinetuneConfig(output_dir=str(tmp_path / "b"), distill_from=str(tmp_path / "deep"), **student))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
