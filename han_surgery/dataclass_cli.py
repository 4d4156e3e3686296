"""Command-line flags derived from dataclass fields, and back.

A configuration dataclass (:class:`~han_surgery.HanConfig`,
:class:`~han_surgery.finetune.FinetuneConfig`) is the one place an option is defined: its
type, its default and its help text (``field(metadata={"help": ...})``, as PEFT and
transformers write them). This module turns the fields into ``argparse`` options, the way
transformers' ``HfArgumentParser`` does, with three differences that suit a multi-command CLI:

* flags are spelled with dashes only (``--output-dir``); a ``bool`` field that defaults to ``True``
  gives the pair ``--flag`` / ``--no-flag`` (``argparse.BooleanOptionalAction``), one that defaults
  to ``False`` a plain ``--flag`` switch;
* a sequence field takes one or more values and may be repeated
  (``--include A B`` and ``--include A --include B`` both give ``("A", "B")``);
* an option that is not given is absent from the namespace (``argparse.SUPPRESS``), so the
  dataclass's own default applies and its ``__post_init__`` validates the values.

Field metadata read here: ``help`` (where it names another field by its flag, ``--max-fvu``, the
flag is spelled as this parser has it, ``--calibration-max-fvu``); ``metavar``; ``group`` (the ``--help`` section the option is
listed in); ``flag`` (another flag name); ``cli`` (``False``: no flag); ``nargs`` and ``const``
(passed to ``add_argument``, for options such as ``--resume [CHECKPOINT]``).

:func:`to_argv` goes the other way: the flags that reproduce a dataclass instance (its
non-default fields), which is how a model card prints the command that made the model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import json
import re
import shlex
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NoReturn, TypeVar, Union

__all__ = [
    "CommandParser",
    "add_dataclass_arguments",
    "construct",
    "dataclass_kwargs",
    "flag_errors",
    "flags_in_text",
    "to_argv",
    "flag_name",
    "json_object",
]

T = TypeVar("T")


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` for one command of a CLI: no abbreviated flags, and one-line usage errors.

    A usage error (an unknown or missing flag, an invalid choice) exits with code 2 after one line on stderr,
    ``<prog>: <message>; did you mean --flag? (see '<prog> --help')``, where argparse prints the whole usage
    first. The suggestion is the closest flag (of this parser and its sub-parsers) or choice, when one is close.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def usage_problem(self, message: str) -> str:
        """``message`` on one line, with a did-you-mean and where to look."""
        message = " ".join(message.split())
        hint = self._closest(message)
        return f"{message}{f'; did you mean {hint}?' if hint else ''} (see '{self.prog} --help')"

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {self.usage_problem(message)}\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # the value and the choices, from argparse itself: its message's wording differs between Pythons
        self._invalid_choice = (value, action.choices) if action.choices is not None else None
        super()._check_value(action, value)  # type: ignore[misc]

    def _closest(self, message: str) -> str | None:
        invalid = getattr(self, "_invalid_choice", None)
        if "invalid choice: " in message and invalid is not None:
            if "maybe you meant" in message:  # Python 3.14's own suggestion
                return None
            typed, known = str(invalid[0]), [str(c) for c in invalid[1]]
        elif message.startswith("unrecognized arguments: "):
            flags = [a.split("=")[0] for a in message.split()[2:] if a.startswith("-")]
            typed, known = (flags[0] if flags else ""), self._all_option_strings()
        else:
            return None
        close = difflib.get_close_matches(typed, known, n=1, cutoff=0.75) if typed else []
        return close[0] if close else None

    def _all_option_strings(self) -> list[str]:
        """The flags of this parser and of its sub-parsers (argparse reports their unknown flags here)."""
        flags, parsers = [], [self]
        while parsers:
            parser = parsers.pop()
            flags += [s for s in parser._option_string_actions if s.startswith("--")]
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    parsers += list(action.choices.values())
        return flags


def flag_name(field: dataclasses.Field, prefix: str = "") -> str:
    """``--output-dir`` for the field ``output_dir`` (or ``metadata["flag"]``); ``prefix="calibration-"`` gives
    ``--calibration-steps`` for ``steps`` (the prefix goes before the field's name, not before ``metadata["flag"]``)."""
    if "flag" in field.metadata:
        return "--" + field.metadata["flag"]
    return "--" + prefix + field.name.replace("_", "-")


def json_object(text: str) -> dict[str, Any]:
    """``argparse`` type for a JSON object given on the command line (``'{"drop_rate": 0.1}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"drop_rate\": 0.1}}', got {text!r}")
    return value


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


@functools.cache
def literal_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """The fields of the dataclass ``cls`` typed as a ``Literal`` (or as one or ``None``): field name -> the values
    the type allows, ``None`` first for an optional field, in the order the annotation gives them."""
    hints = typing.get_type_hints(cls)
    choices = {}
    for f in dataclasses.fields(cls):
        inner = _unwrap_optional(hints[f.name])
        if typing.get_origin(inner) is Literal:
            choices[f.name] = ((None,) if inner is not hints[f.name] else ()) + typing.get_args(inner)
    return choices


def _is_sequence(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple)


#: A flag named in a help text (``--max-fvu``).
_FLAG_MENTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def _or_none(tp: type) -> Callable[[str], Any]:
    """``argparse`` type of an optional field whose default is not ``None``: ``none`` gives ``None``, anything else
    ``tp(text)`` (argparse's "invalid int value" message names ``tp``)."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else tp(text)

    parse.__name__ = tp.__name__
    return parse


def _cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [
        (f, _unwrap_optional(hints[f.name])) for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)
    ]


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return ""
    if default is None or default == () or default == {}:
        return ""
    if isinstance(default, bool):  # a True default is the --flag / --no-flag pair; a False one a plain switch
        return " (default: on)" if default else ""
    return f" (default: {default})"


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    exclude: Sequence[str] = (),
    dest_prefix: str = "",
    flag_prefix: str = "",
) -> None:
    """Add one option per field of the dataclass ``cls`` to ``parser`` (or an argument group).

    Args:
        parser: where the options go.
        cls: a dataclass whose fields carry ``metadata={"help": ...}``.
        exclude: field names that get no option.
        dest_prefix: prefix of each option's ``dest`` in the namespace, so that two dataclasses
            can share one parser (read the values back with :func:`dataclass_kwargs` and the
            same prefix).
        flag_prefix: prefix of each flag after the dashes (``"calibration-"``: ``--calibration-steps``),
            for a dataclass whose field names would clash with another's on the same parser.

    A field without a default becomes a required option. Fields with ``metadata["group"]`` go into
    an argument group of that title (created once per parser).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    fields = _cli_fields(cls)
    hints = typing.get_type_hints(cls)
    optional = {f.name: hints[f.name] is not tp for f, tp in fields}
    # a help text names another field by its unprefixed flag (--max-fvu): give it this parser's spelling
    fields_by_flag = {flag_name(f): flag_name(f, flag_prefix) for f, _ in fields}
    for field, tp in fields:
        if field.name in exclude:
            continue
        meta = field.metadata
        target = parser
        if "group" in meta and isinstance(parser, argparse.ArgumentParser):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        kwargs: dict[str, Any] = {
            "dest": dest_prefix + field.name,
            "help": (
                _FLAG_MENTION.sub(lambda m: fields_by_flag.get(m.group(), m.group()), meta.get("help", ""))
                + _default_text(field)
            ).replace("%", "%%"),
        }
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        elif tp is not bool and typing.get_origin(tp) is not Literal:
            kwargs["metavar"] = field.name.upper()
        if tp is bool:
            # default False: a plain switch; default True: the --flag / --no-flag pair
            kwargs["action"] = argparse.BooleanOptionalAction if field.default is True else "store_true"
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = typing.get_args(tp)
            kwargs["type"] = type(typing.get_args(tp)[0])
        elif _is_sequence(tp):
            item = (typing.get_args(tp) or (str,))[0]
            kwargs.update(nargs="+", action="extend", type=item if isinstance(item, type) else str)
        elif tp is dict or typing.get_origin(tp) is dict:
            kwargs["type"] = json_object
            kwargs["metavar"] = meta.get("metavar", "JSON")
        elif optional[field.name] and field.default is not None and isinstance(tp, type):
            kwargs["type"] = _or_none(tp)  # a default other than None: 'none' is how the command line gives None
        else:
            kwargs["type"] = tp
        for key in ("nargs", "const", "choices"):
            if key in meta:
                kwargs[key] = meta[key]
        target.add_argument(flag_name(field, flag_prefix), **kwargs)


def dataclass_kwargs(namespace: argparse.Namespace, cls: type, *, dest_prefix: str = "") -> dict[str, Any]:
    """The field values given on the command line (options not given are left out: the defaults apply)."""
    values = vars(namespace)
    out: dict[str, Any] = {}
    for field, tp in _cli_fields(cls):
        key = dest_prefix + field.name
        if key in values:
            value = values[key]
            out[field.name] = tuple(value) if _is_sequence(tp) and isinstance(value, list) else value
    return out


def construct(cls: type[T], kwargs: dict[str, Any], *, flag_prefix: str = "", flags: dict[str, str] | None = None) -> T:
    """``cls(**kwargs)`` for a command line: its :class:`~han_surgery.errors.ConfigError` names the flags
    (:func:`flag_errors`)."""
    with flag_errors(cls, flag_prefix=flag_prefix, flags=flags):
        return cls(**kwargs)


@contextlib.contextmanager
def flag_errors(cls: type, *, flag_prefix: str = "", flags: dict[str, str] | None = None) -> Iterator[None]:
    """A :class:`~han_surgery.errors.HanSurgeryError` raised inside that names a field of the dataclass ``cls`` in
    the Python API's words names the field's flag instead, as the user typed it: ``HanConfig.reflections`` ->
    ``--reflections``, ``CalibrationConfig.keep_by='output'`` -> ``--calibration-keep-by output``,
    ``CalibrationConfig.progress=False`` -> ``--no-calibration-progress`` (``flag_prefix`` as for
    :func:`add_dataclass_arguments`; ``flags`` maps fields whose option is spelled otherwise, such as
    ``{"source": "--calibrate"}``).

    The exception propagates as it was raised (same object: its type, attributes and ``__cause__``), its message
    changed. Left as they are: a :class:`~han_surgery.errors.CheckpointError` (the fields it names are a file's, not
    flags), an exception whose message is not its one argument (built from attributes), and any other exception."""
    from .errors import CheckpointError, HanSurgeryError

    try:
        yield
    except HanSurgeryError as e:
        if not isinstance(e, CheckpointError) and e.args == (str(e),):
            e.args = (flags_in_text(str(e), cls, flag_prefix=flag_prefix, flags=flags),)
        raise


def flags_in_text(text: str, cls: type, *, flag_prefix: str = "", flags: dict[str, str] | None = None) -> str:
    """``text`` with every ``Cls.field[=value]`` of the dataclass ``cls`` spelled as its flag, as
    :func:`flag_errors` does for an error's message (a report's skip reasons, printed by a command:
    ``use HanConfig.residual='keep'`` -> ``use --residual keep``). A ``Cls.name`` that is no field stays as it is."""
    by_name = {f.name: flag_name(f, flag_prefix) for f in dataclasses.fields(cls)} | (flags or {})
    mention = re.compile(rf"\b{cls.__name__}\.(\w+)(?:=({_FIELD_VALUE}))?")
    return mention.sub(lambda m: _as_flag(m, by_name), text)


#: A value a message gives a field (``Cls.field=<value>``): quoted (``'output'``), or a number, ``None``, ``False``.
_FIELD_VALUE = r"'[^']*'|\"[^\"]*\"|[\w.+-]*\w"


def _as_flag(match: re.Match[str], by_name: dict[str, str]) -> str:
    """The flag (and value) a ``Cls.field[=value]`` of :func:`flag_errors` means; the text as it was for a name that
    is no field of ``Cls``."""
    name, value = match.groups()
    flag = by_name.get(name)
    if flag is None:
        return match.group()
    if value in (None, "True"):
        return flag
    if value == "False":  # as to_argv spells it
        return "--no-" + flag[2:]
    if value[0] in "'\"":
        value = value[1:-1]
    return f"{flag} {shlex.quote(value)}"


def to_argv(obj: Any, *, exclude: Sequence[str] = (), flag_prefix: str = "") -> list[str]:
    """The flags that rebuild the dataclass instance ``obj`` from its defaults (non-default fields only;
    ``flag_prefix`` as in :func:`add_dataclass_arguments`)."""
    argv: list[str] = []
    for field, tp in _cli_fields(type(obj)):
        if field.name in exclude:
            continue
        value = getattr(obj, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        if value == default or (_is_sequence(tp) and default is not None and list(value or ()) == list(default)):
            continue
        flag = flag_name(field, flag_prefix)
        if tp is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            continue
        elif "const" in field.metadata and value == field.metadata["const"]:
            argv.append(flag)
        elif _is_sequence(tp):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv
