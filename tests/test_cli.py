"""The ``han-surgery`` command line: one vocabulary, one error format, the subcommand's own usage."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from han_surgery import HanConfig
from han_surgery.cli import main
from han_surgery.cli.finetune import build_parser as finetune_parser
from han_surgery.cli.surgery import build_parser as surgery_parser
from han_surgery.dataclass_cli import flag_name


def surgery_flags(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    """HanConfig's options in ``parser``: flag -> (option strings, choices, nargs)."""
    wanted = {flag_name(f) for f in dataclasses.fields(HanConfig)}
    return {
        a.option_strings[0]: (tuple(a.option_strings), a.choices, a.nargs)
        for a in parser._actions
        if a.option_strings and a.option_strings[0] in wanted
    }


def test_hanconfig_flags_are_spelled_the_same_on_every_command() -> None:
    inspect, hanify, finetune = (
        surgery_flags(surgery_parser("i", write=False)),
        surgery_flags(surgery_parser("h", write=True)),
        surgery_flags(finetune_parser()),
    )
    assert inspect == hanify == finetune
    assert len(inspect) == len(dataclasses.fields(HanConfig))
    assert inspect["--drop-norm"][0] == ("--drop-norm", "--no-drop-norm")
    assert inspect["--include"][2] == "+"


def test_an_optional_flag_whose_default_is_not_none_takes_none(capsys: pytest.CaptureFixture) -> None:
    """``CalibrationConfig.record_batches: int | None = 16``, where None is 'all of them': the flag's type was
    ``int``, so ``--calibration-record-batches none`` was "invalid int value" and None could not be given."""
    from han_surgery.cli._calibration import calibration_from_args

    parser = surgery_parser("h", write=True)
    args = parser.parse_args(["m", "-o", "o", "--calibrate", "d.txt", "--calibration-record-batches", "none"])
    assert calibration_from_args(args)[1].record_batches is None
    args = parser.parse_args(["m", "-o", "o", "--calibrate", "d.txt", "--calibration-record-batches", "4"])
    assert calibration_from_args(args)[1].record_batches == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "-o", "o", "--calibration-record-batches", "four"])
    assert "--calibration-record-batches: invalid int value: 'four'" in capsys.readouterr().err


def test_sequence_flags_take_several_values_and_repeat(capsys: pytest.CaptureFixture) -> None:
    args = surgery_parser("p", write=False).parse_args(["m", "--include", "a", "b", "--include", "c"])
    assert args.include == ["a", "b", "c"]


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["hanify", "test_vit", "-o", "{out}", "--reflection", "2"],
            "han-surgery hanify: unrecognized arguments: --reflection 2; did you mean --reflections? "
            "(see 'han-surgery hanify --help')",
        ),
        (["hanify", "test_vit"], "han-surgery hanify: the following arguments are required: -o/--output"),
        (["inspect"], "han-surgery inspect: the following arguments are required: source"),
        (["finetune", "--model", "m"], "han-surgery finetune: the following arguments are required: --data"),
        (["push", "d", "r", "--privat"], "han-surgery push: unrecognized arguments: --privat; did you mean --private?"),
        (["demo", "--fats"], "han-surgery demo: unrecognized arguments: --fats; did you mean --fast?"),
        (
            ["paper", "checkerboard", "--quik"],
            "han-surgery paper: unrecognized arguments: --quik; did you mean --quick?",
        ),
        (["hanfy"], "han-surgery: argument <command>: invalid choice: 'hanfy' ... did you mean hanify?"),
        (["inspect", "test_vit", "--init", "orthogonl"], "han-surgery inspect: argument --init: ... orthogonal?"),
        (["inspect", "test_vit", "--init", "ortho"], "han-surgery inspect: argument --init: invalid choice: 'ortho'"),
    ],
)
def test_a_usage_error_is_one_line(argv, line, tmp_path, capsys: pytest.CaptureFixture) -> None:
    # no abbreviations either: "--reflection" is not silently taken for "--reflections"
    argv = [a.format(out=tmp_path / "x") for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    start, _, hint = line.split(" (see")[0].partition(" ... ")  # the choices' list between: its format is Python's
    assert len(err.splitlines()) == 1 and err.startswith(start) and hint in err
    assert err.rstrip().endswith(f"(see '{line.split(':')[0]} --help')")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["inspect", "test_vit", "--reflections", "0"],
            "han-surgery inspect: --reflections must be an int >= 1",  # the flag, not HanConfig.reflections
        ),
        (
            ["finetune", "--model", "m", "--data", "d", "--output-dir", "o", "--hanify", "--dropout", "2"],
            "han-surgery finetune: --dropout must be None or a finite number in [0, 1)",
        ),
        (["inspect", "test_vit", "--include", "re:("], "han-surgery inspect: HanConfig: invalid regular expression"),
        (["inspect", "test_vit", "--rules", "timm.nope"], "han-surgery inspect: --rules: 'timm.nope'"),
        (
            ["finetune", "--model", "m", "--data", "d", "--output-dir", "o", "--hanify", "--rules", "x.y"],
            "--rules: 'x.y'",
        ),
        (["inspect", "test_vit", "--rules", "bogus"], "names no registered rule; the rules are ['fallback.ffn', "),
        (["finetune", "--model", "m", "--data", "d", "--output-dir", "o", "--lr", "nan"], "han-surgery finetune: --lr"),
        (["finetune", "--model", "m", "--data", "d", "--output-dir", "o", "--include", "x"], "add --hanify"),
        (["push", "/no/such/folder", "a/b"], "han-surgery push: /no/such/folder is not a finished model folder"),
        # an empty path meant the current directory: hanify -o "" saved into it, demo --out-dir "" wrote there
        (["inspect", ""], "han-surgery inspect: source: give a non-empty string"),
        (["hanify", "test_vit", "-o", " "], "han-surgery hanify: --output: give a non-empty string"),
        (["push", "", "a/b"], "han-surgery push: directory: give a non-empty string"),
        (["demo", "--out-dir", ""], "han-surgery demo: --out-dir: give a non-empty string"),
        (["paper", "approximation", "--out", ""], "han-surgery paper: --out: give a non-empty folder name"),
        # a Hub repo (timm's hf-hub: spec, or owner/name) is not downloaded here: say so (it listed near timm names)
        (
            ["inspect", "hf-hub:someone/vit@v2"],
            "If it is a Hub repo: it is not downloaded here; download it (hf "
            "download someone/vit --revision v2 --local-dir <folder>)",
        ),  # fmt: skip
        (["hanify", "someone/vit", "-o", "x"], "(hf download someone/vit --local-dir <folder>) and pass the folder"),
        (["inspect", "./vit"], "'./vit' is neither a folder nor a timm model name"),  # a path, no Hub hint
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(argv, message, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith(f"han-surgery {argv[0]}: ")


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only HanSurgeryError is a user error: any other exception is a bug and propagates."""
    import han_surgery.surgery.engine as engine

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(engine, "hanify", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["inspect", "test_vit"])


def test_flag_errors_names_the_flags_in_any_user_error_keeping_the_exception() -> None:
    """It translated only a ConfigError and only ``Cls.field``: a CalibrationDataError's "lower CalibrationConfig.lr"
    and a value given with the field (``keep_by='output'``) kept the Python words."""
    from han_surgery.dataclass_cli import flag_errors
    from han_surgery.errors import CheckpointError, ConfigError, HanifyError
    from han_surgery.surgery.calibration import CalibrationConfig
    from han_surgery.surgery.calibration.record import CalibrationBatchError, CalibrationDataError

    cause = OSError("disk")
    error = CalibrationDataError(
        "set CalibrationConfig.keep_by='output' (CalibrationConfig.heal_steps=5, CalibrationConfig.progress=False), "
        "lower CalibrationConfig.lr, or CalibrationConfig.holdout=0.1. CalibrationConfig.nope stays"
    )
    with pytest.raises(CalibrationDataError) as info, flag_errors(CalibrationConfig, flag_prefix="calibration-"):
        raise error from cause
    assert info.value is error and info.value.__cause__ is cause  # the same exception, its message in flags
    assert str(error) == (
        "set --calibration-keep-by output (--calibration-heal-steps 5, --no-calibration-progress), lower "
        "--calibration-lr, or --calibration-holdout 0.1. CalibrationConfig.nope stays"
    )
    with pytest.raises(HanifyError, match=r"^--include 're:a b' and --rules$"), flag_errors(HanConfig):
        raise HanifyError("HanConfig.include='re:a b' and HanConfig.rules")
    # left as they are: a file's content (its fields are not flags), a message built from attributes, and a bug
    kept = [
        CheckpointError("x/han_config.json: invalid HanConfig in the recipe (HanConfig.reflections must be ...)"),
        CalibrationBatchError(None, RuntimeError("HanConfig.gain"), hint="HanConfig.gain"),
        ValueError("HanConfig.gain"),
    ]
    for raised in kept:
        message = str(raised)
        with pytest.raises(type(raised)) as info, flag_errors(HanConfig):
            raise raised
        assert info.value is raised and str(raised) == message
    # the Python API keeps the fields' names
    with pytest.raises(ConfigError, match=r"set CalibrationConfig\.keep_by='output'$"):
        CalibrationConfig(keep_count=1)


@pytest.mark.parametrize("value", ["1000000000", "99999999999999999999999"])
def test_absurd_num_classes_is_refused_by_the_parser(value, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["inspect", "test_vit", "--num-classes", value])
    assert e.value.code == 2
    assert "--num-classes: expected at most 1,000,000 classes" in capsys.readouterr().err


def test_checking_an_existing_output_folder_creates_nothing_in_it(tmp_path, monkeypatch) -> None:
    """Every rank of a run checks its output folder, then that it is empty: a probe folder made inside it showed up
    in another rank's emptiness check (one rank refused, the other waited). An existing folder is checked with
    os.access; only a folder still to be made is probed, in its parent."""
    import tempfile

    from han_surgery.fileio import output_folder_problem

    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(Path(k["dir"])) or real(*a, **k))
    assert output_folder_problem(tmp_path) is None and made == []
    assert output_folder_problem(tmp_path / "new" / "run") is None and made == [tmp_path]
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []


def test_help_gives_every_default_including_the_on_switches(capsys: pytest.CaptureFixture) -> None:
    """An on-by-default switch (``--drop-norm``) says so: argparse prints no default where it is SUPPRESS."""
    actions = {a.option_strings[0]: a for a in surgery_parser("h", write=True)._actions if a.option_strings}
    assert actions["--drop-norm"].help.endswith("(default: on)")
    assert "default" not in actions["--final-abs"].help  # an off switch: its flag turns it on
    assert actions["--reflections"].help.endswith("(default: 1)")


def test_a_help_text_names_other_fields_by_the_flags_this_command_has() -> None:
    """CalibrationConfig's help said "needs keep-by output" where hanify's flag is --calibration-keep-by."""
    from han_surgery.cli.surgery import build_parser as surgery_parser

    actions = {a.option_strings[0]: a for a in surgery_parser("h", write=True)._actions if a.option_strings}
    assert "(needs --calibration-keep-by output)" in actions["--calibration-keep-count"].help
    assert actions["--calibration-keep-by"].help.startswith("what --calibration-max-fvu is compared with")


def test_inspect_help_describes_inspect_only() -> None:
    """inspect --help explained hanify's --calibrate, an option inspect does not have."""
    assert "--calibrate" not in surgery_parser("i", write=False).description
    assert "--calibrate DATA" in surgery_parser("h", write=True).description


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "levit_256d", "--pretrained"], "--pretrained levit_256d: timm has no pretrained weights for it"),
        (["inspect", "vit_tiny_patch16_224.bogus_tag"], "vit_tiny_patch16_224.bogus_tag: timm has no weights tagged"),
    ],
)
def test_a_timm_name_without_such_weights_is_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """timm raises RuntimeError for both (an architecture without weights, an unknown tag): a traceback, exit 1."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"han-surgery inspect: {message}"), err
    if "bogus" in argv[1]:
        assert "vit_tiny_patch16_224.augreg_in21k" in err  # the tags it has


def test_first_line_joins_a_colon_ended_line_to_the_next_and_cuts_it() -> None:
    from han_surgery.errors import first_line

    assert first_line(ValueError("Validation error for field 'x':\n    TypeError: got str")) == (
        "Validation error for field 'x': TypeError: got str"
    )
    keys = ", ".join(f'"{i}.weight"' for i in range(500))
    line = first_line(RuntimeError(f"Error(s) in loading state_dict for M:\n\tMissing key(s) in state_dict: {keys}."))
    assert line.startswith("Error(s) in loading state_dict for M: Missing key(s)") and line.endswith(" ...")
    assert len(line) < 300 and first_line(ValueError("one\ntwo")) == "one" and first_line(ValueError()) == "ValueError"


@pytest.mark.parametrize(
    "message",
    [
        "invalid choice: 'orthogonl' (choose from orthogonal, normal)",  # Python 3.12.8+, 3.13.1+
        "invalid choice: 'orthogonl', maybe you meant 'orthogonal'? (choose from orthogonal, normal)",  # 3.14
    ],
)
def test_the_closest_choice_does_not_depend_on_argparses_wording(message, monkeypatch, capsys) -> None:
    """The hint was read off Python 3.11's "(choose from 'a', 'b')": later Pythons list the choices unquoted (no
    hint) or suggest one themselves (two hints)."""
    from han_surgery.dataclass_cli import CommandParser

    def check_value(self, action, value):
        if value not in action.choices:
            raise argparse.ArgumentError(action, message)

    monkeypatch.setattr(argparse.ArgumentParser, "_check_value", check_value)
    parser = CommandParser(prog="p")
    parser.add_argument("--init", choices=["orthogonal", "normal"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--init", "orthogonl"])
    err = capsys.readouterr().err
    assert "orthogonal" in err and ("did you mean" in err) != ("maybe you meant" in err)  # one hint


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (
            OSError(28, "No space left on device", "/data/out/model.safetensors"),
            "No space left on device (/data/out/model.safetensors): free some space or write elsewhere",
        ),
        (OSError(122, "Disk quota exceeded"), "Disk quota exceeded: free some space or write elsewhere"),
        (
            PermissionError(13, "Permission denied", "/srv/out"),
            "Permission denied (/srv/out): check the path's permissions or write elsewhere",
        ),
        (OSError(30, "Read-only file system", "/ro"), "Read-only file system (/ro): check the path's permissions"),
    ],
)
def test_a_full_disk_or_a_forbidden_path_is_one_line_exit_2(raised, expected, capsys) -> None:
    """What the machine refuses (a full disk or quota, a read-only or forbidden path) is no bug of the program: one
    line naming the cause and the path where the error gives it, exit code 2, no traceback."""
    from han_surgery.cli._common import run_command

    def body() -> int:
        raise raised

    assert run_command("han-surgery x", body) == 2
    err = capsys.readouterr().err
    assert err.startswith("han-surgery x: " + expected) and err.count("\n") == 1, err


def test_safetensors_disk_full_is_one_line_exit_2(capsys) -> None:
    """safetensors reports a full disk as a ``SafetensorError`` (``... (os error 28)``), not an ``OSError``."""
    from safetensors import SafetensorError

    from han_surgery.cli._common import run_command

    def body() -> int:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    assert run_command("han-surgery x", body) == 2
    err = capsys.readouterr().err
    assert err == "han-surgery x: No space left on device: free some space or write elsewhere\n", err


def test_memory_the_machine_refuses_is_one_line_exit_2(capsys) -> None:
    """Sizes beyond the machine (``han-surgery paper regression --seeds 10**12``: a MemoryError; ``approximation
    --dims 10**8``: torch's allocator) were tracebacks; they are the machine refusing, as a full disk is."""
    import torch

    from han_surgery.cli._common import run_command

    def huge() -> int:
        torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: refused by the allocator on any machine
        return 0

    for body, said in ((huge, "DefaultCPUAllocator: can't allocate memory"), (lambda: [0] * 2**62, "MemoryError")):
        assert run_command("han-surgery x", body) == 2
        err = capsys.readouterr().err
        assert err.startswith("han-surgery x: out of memory (") and said in err and err.count("\n") == 1, err
        assert err.rstrip().endswith("lower the sizes asked for (batch size, widths, samples, seeds) or free memory")


def test_an_integer_flag_beyond_int64_is_refused_by_the_parser(capsys) -> None:
    """``han-surgery paper mnist --batch-size 10**20`` overflowed in torch ("Overflow when unpacking long long")."""
    from han_surgery.cli import main

    assert main(["paper", "mnist", "--quick", "--batch-size", str(10**20)]) == 2
    err = capsys.readouterr().err
    assert f"--batch-size: expected a positive integer below 2**63, got {10**20}" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "raised", [OSError(2, "No such file or directory", "x"), RuntimeError("a bug"), OSError("no errno")]
)
def test_other_errors_still_propagate_as_bugs(raised) -> None:
    from han_surgery.cli._common import run_command

    def body() -> int:
        raise raised

    with pytest.raises(type(raised)):
        run_command("han-surgery x", body)
