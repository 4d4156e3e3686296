"""The exceptions han-surgery raises for problems with what a user gave it.

Every one of them derives from :class:`HanSurgeryError`, and also from the built-in
exception a Python caller would expect (``ValueError`` for bad values, ``RuntimeError``
for a step that could not complete), so ``except ValueError`` keeps working.

The command line turns a :class:`HanSurgeryError` into one line on stderr,
``han-surgery <command>: <message>``, and exit code 2. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "HanSurgeryError",
    "ConfigError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "HanifyError",
    "NothingToRewriteError",
    "first_line",
    "for_option",
]


class HanSurgeryError(Exception):
    """Base class: the input (a model, a folder, a file, an option) cannot be used; the message says what to do."""


class ConfigError(HanSurgeryError, ValueError):
    """An option or configuration value is invalid (a ``HanConfig`` field, a fine-tune option, a name pattern)."""


class CheckpointError(HanSurgeryError, ValueError):
    """A model folder or file cannot be read: missing, corrupt, or not the expected kind. The message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The folder only holds pickle-based weights (``.bin``, ``.pt``, ...), which han-surgery never loads."""


class HanifyError(HanSurgeryError, RuntimeError):
    """A rewrite rule failed while planning; the model was left exactly as it was."""


class NothingToRewriteError(HanSurgeryError, ValueError):
    """No registered rule recognises any module of the model."""


def first_line(error: BaseException) -> str:
    """The first line of ``str(error)`` (a library's message may run on for pages), or the exception's type name
    if it has no message: what a one-line error quotes from the exception it wraps. A first line that ends in a
    colon introduces the next, which is joined to it, cut at 200 characters (huggingface_hub's "Validation error
    for field 'x':"; torch's "Error(s) in loading state_dict for X:" is followed by every missing key)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if not (lines[0].endswith(":") and len(lines) > 1):
        return lines[0]
    detail = lines[1] if len(lines[1]) <= 200 else lines[1][:200] + " ..."
    return f"{lines[0]} {detail}"


def for_option(error: HanSurgeryError, option: str, as_option: str) -> HanSurgeryError:
    """``error`` as raised for ``as_option``: where its message starts with ``option`` (a reader that two options
    share, such as ``--model``'s for ``--distill-from``), it names ``as_option`` instead; same type, no traceback."""
    message = str(error)
    if message.startswith(option + " "):
        message = as_option + message[len(option) :]
    renamed = type(error)(message)
    renamed.__suppress_context__ = True
    return renamed
