"""Files that are never half-written and folders that are never shared: what protects a user's output.

* :func:`atomic_write_text` writes ``path.tmp`` and renames it over ``path`` (``os.replace`` is atomic on POSIX),
  so a reader sees the old file or the new one, never a prefix.
* :func:`publish_files` moves the files of a staging folder into a target folder the same way. The
  *completion marker* (for a model folder, its ``README.md``) is removed first and moved last, so
  the folder only looks finished once every file is in place.
* :class:`FolderLock` is an exclusive lock on a folder: a lock file created with ``O_EXCL`` that names
  its holder (process id, host, start time, command). A lock whose process has died is stale and
  is taken over, with a message.
* :func:`safetensors_problem` checks a ``.safetensors`` file's header and size without loading it
  (a truncated or garbage file is caught before anyone uploads or loads it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import HanSurgeryError

__all__ = [
    "LOCK_NAME",
    "FolderInUseError",
    "FolderLock",
    "atomic_write_text",
    "publish_files",
    "safetensors_problem",
    "json_problem",
    "folder_problems",
    "output_folder_problem",
    "empty_folder",
    "move_entries",
    "remove_path",
]

LOCK_NAME = ".han-surgery.lock"
_SAFETENSORS_MAX_HEADER = 100_000_000


class FolderInUseError(HanSurgeryError, RuntimeError):
    """Another live process holds the folder's lock."""


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def publish_files(staging: str | Path, target: str | Path, *, marker: str, replace: bool = False) -> list[str]:
    """Move every file of ``staging`` into ``target`` (atomic renames), ``marker`` last; remove ``staging``.

    ``target/marker`` is deleted before anything moves, so a process killed half-way leaves a folder
    without its marker: incomplete, and seen as such. With ``replace``, everything else in ``target``
    (but ``staging`` and the lock file) is replaced, all or nothing: it is moved aside into
    ``target/.replaced.tmp`` first (renames), put back if anything fails or is interrupted before the new files
    are all in, and deleted after. Returns the names moved.
    """
    staging, target = Path(staging), Path(target)
    names = sorted(p.name for p in staging.iterdir())
    if marker not in names:
        raise ValueError(f"publish_files: {staging} has no {marker}")
    aside = target / REPLACED_NAME
    if replace:
        if aside.is_dir() and not aside.is_symlink() and not (target / marker).is_file():
            # left by a run killed while publishing, before its marker was in: the former contents go back first
            for entry in target.iterdir():
                if entry.name not in (LOCK_NAME, staging.name, aside.name):
                    remove_path(entry)
            move_entries(aside, target)
        remove_path(aside)  # (a run killed after its marker was in had published: what is aside was replaced)
        aside.mkdir()
        try:
            for entry in [e for e in target.iterdir() if e.name not in (LOCK_NAME, staging.name, aside.name)]:
                os.replace(entry, aside / entry.name)
        except BaseException:
            move_entries(aside, target)
            raise
    else:
        (target / marker).unlink(missing_ok=True)
    moved: list[str] = []
    try:
        for name in [n for n in names if n != marker] + [marker]:
            dest = target / name
            if not replace:
                remove_path(dest)
            os.replace(staging / name, dest)
            moved.append(name)
    except BaseException:
        if replace:  # the new files go back into staging (for the caller to remove), the former ones back in place
            for name in moved:
                os.replace(target / name, staging / name)
            move_entries(aside, target)
        raise
    if replace:
        shutil.rmtree(aside, ignore_errors=True)  # a file it cannot delete stays there; the new model is in place
    staging.rmdir()
    return names


REPLACED_NAME = ".replaced.tmp"
"""Where :func:`publish_files` keeps a folder's former contents while it replaces them."""


def remove_path(path: Path) -> None:
    """Remove ``path``: a file or link (never followed), or a folder and everything in it; nothing if absent."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def move_entries(source: Path, target: Path) -> None:
    """Move every entry of ``source`` into ``target`` (renames), then remove the empty ``source``."""
    for entry in source.iterdir():
        os.replace(entry, target / entry.name)
    source.rmdir()


def empty_folder(folder: str | Path, *, keep: str | Path | None = None) -> None:
    """Remove everything in ``folder`` but its lock file and the folder ``keep`` (e.g. a staging folder
    inside it); a symbolic link is removed, never followed."""
    keep = Path(keep).resolve() if keep is not None else None
    for entry in Path(folder).iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        elif entry.resolve() != keep:
            shutil.rmtree(entry)


def csv_delimiter(text: str, suffix: str) -> str:
    """The delimiter of a CSV / TSV file's ``text``: the one its first non-blank line holds more of (so a ``.csv``
    of tab-separated columns, or a ``.tsv`` whose text holds commas, reads right); where that line holds as many
    of each (a one-column header), the file's ``suffix`` decides: a tab for ``.tsv``, else a comma."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    tabs, commas = first.count("\t"), first.count(",")
    if tabs == commas:
        return "\t" if suffix.lower() == ".tsv" else ","
    return "\t" if tabs > commas else ","


def lies_in(path: str | Path, *roots: Path) -> bool:
    """Whether ``path``, links followed, is one of the resolved folders ``roots`` or lies below one."""
    real = Path(path).resolve()
    return any(real == root or root in real.parents for root in roots)


def input_held_by(folder: str | Path, inputs: Mapping[str, str | None]) -> str | None:
    """``"<flag> <path>"`` for the first of ``inputs`` (flag -> path, ``local-dir:`` allowed, ``None`` skipped)
    that is the existing ``folder`` or lies below it, which emptying ``folder`` would delete; else ``None``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return None
    root = folder.resolve()
    for flag, value in inputs.items():
        path = Path(value.removeprefix("local-dir:")).expanduser() if value else None
        if path is not None and path.exists() and lies_in(path, root):
            return f"{flag} {value}"
    return None


def too_wide_to_empty(folder: str | Path) -> str | None:
    """Why ``--overwrite`` must not empty the existing ``folder`` (``None`` if it may): it is the current directory
    or one of its ancestors, the home directory, or the file system's root, where a run's files are not all
    there is (``--output-dir . --overwrite`` deleted a project's sources)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir() or not any(p.name != LOCK_NAME for p in folder.iterdir()):  # nothing to delete
        return None
    real, cwd = folder.resolve(), Path.cwd().resolve()
    if lies_in(cwd, real):
        return "the current directory" if real == cwd else "a parent of the current directory"
    if real == Path.home().resolve():
        return "the home directory"
    if real == Path(real.anchor):
        return "the file system's root"
    return None


def output_folder_problem(path: str | Path) -> str | None:
    """Why the folder ``path`` could not be created or written (``None`` if it can): checked before any work.

    An existing folder must be writable (``os.access``: no probe inside it, where another process, a rank of
    the same run, may be checking that it is empty); otherwise the nearest existing ancestor must be a folder
    in which a folder can be made: a probe folder is created there and removed at once (``path`` itself is not
    created). The answer names the culprit.
    """
    path = Path(path).expanduser()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"cannot write in {path}: permission denied (or a read-only file system)"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {path}: {parent} is a file, not a folder"
    try:
        probe = Path(tempfile.mkdtemp(prefix=".han-surgery-probe-", dir=parent))
    except OSError as e:
        return f"cannot write in {parent}: {e.strerror or e}"
    probe.rmdir()
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """An exclusive lock on ``folder`` for the lifetime of a run (``with FolderLock(folder): ...``).

    The lock file ``<folder>/.han-surgery.lock`` holds ``{"pid", "host", "started", "command"}``.
    :meth:`acquire` raises :class:`FolderInUseError` naming the holder if a live process has it; a
    lock left by a dead process on this host is taken over (``took_over`` says whose).
    """

    def __init__(self, folder: str | Path, what: str = "--output-dir") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.held = False
        self.took_over: dict[str, Any] | None = None

    def holder(self) -> dict[str, Any] | None:
        """The lock file's content, or ``None`` if there is none (or it is unreadable)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def check(self) -> None:
        """Raise :class:`FolderInUseError` if a live process holds the lock (does not take it)."""
        self._refuse_if_live(self.holder())

    def _refuse_if_live(self, holder: dict[str, Any] | None) -> None:
        """Raise :class:`FolderInUseError` if ``holder`` (a lock file's content) is a live process's."""
        if holder is None:
            return
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            return  # stale
        if pid == os.getpid() and host == socket.gethostname():
            return
        try:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        except (KeyError, TypeError, ValueError, OverflowError, OSError):  # a lock file not written by us
            started = "at an unknown time"
        raise FolderInUseError(
            f"{self.what} {self.folder} is in use by another han-surgery run (pid {pid} on {host}, started {started}: "
            f"{holder.get('command', '?')}). Wait for it to finish, or choose another folder; if that process is "
            f"gone, delete {self.path}."
        )

    def acquire(self) -> FolderLock:
        """Take the lock (creating ``folder`` if needed)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir() and not self.path.is_symlink():  # not a lock any run wrote: never taken over
            raise FolderInUseError(
                f"{self.what} {self.folder}: {self.path} is a folder, not a han-surgery lock file; move it away"
            )
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                stale = self.holder()
                if stale is None:  # empty: maybe a run that has just created it is writing it; read it again
                    time.sleep(0.2)
                    stale = self.holder()
                self._refuse_if_live(stale)  # raises if a live process holds it
                # Take over exactly the file judged stale: another run may have taken it over since. Move it
                # away (atomic: one run moves a given file), then compare; a live lock moved by mistake goes back.
                grave = self.path.with_name(f"{self.path.name}.{os.getpid()}.{time.monotonic_ns()}.stale")
                try:
                    os.rename(self.path, grave)
                except FileNotFoundError:  # another run moved it first: try to create it again
                    continue
                try:
                    moved = json.loads(grave.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    moved = None
                if moved != stale:
                    with contextlib.suppress(FileExistsError):
                        os.link(grave, self.path)  # give the live lock back (unless yet another run made one)
                    grave.unlink(missing_ok=True)
                    continue  # the next attempt names the live holder
                grave.unlink(missing_ok=True)
                self.took_over = stale
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                payload = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.time(),
                    "command": " ".join(sys.argv)[:500],
                }
                json.dump(payload, f)
            self.held = True
            return self
        raise FolderInUseError(f"{self.what} {self.folder}: could not take the lock {self.path}")

    def release(self) -> None:
        """Remove the lock file if this object holds it."""
        if self.held:
            holder = self.holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (``None`` if it is): reads the header only.

    A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor names
    to ``dtype``/``shape``/``data_offsets``, then the data; its size is exactly
    ``8 + header length + the largest end offset``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path}: {size} bytes, too short for a safetensors header"
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(_SAFETENSORS_MAX_HEADER, size - 8):
                return f"{path}: invalid safetensors header length {n} for a {size}-byte file (truncated or not safetensors)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"{path}: cannot be read ({e})"
    except (ValueError, UnicodeDecodeError):
        return f"{path}: the safetensors header is not valid JSON (corrupt file)"
    if not isinstance(header, dict):
        return f"{path}: the safetensors header is not a JSON object"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{path}: {size} bytes, but its header describes {expected} (truncated or padded)"
    return None


def json_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable JSON file (``None`` if it is)."""
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        return f"{path}: cannot be read ({e})"
    except (ValueError, UnicodeDecodeError) as e:
        return f"{path}: not valid JSON ({e})"
    return None


def folder_problems(folder: str | Path, required: Iterable[str]) -> list[str]:
    """Why ``folder`` is not a complete model folder: missing required files, a held lock, a staging folder left
    by an interrupted write (``<name>.tmp/``: :func:`publish_files` removes its staging folder once every file is
    in place, so one that is still there was not published), corrupt files."""
    folder = Path(folder)
    problems = [f"missing {name}" for name in required if not (folder / name).is_file()]
    for p in sorted(folder.glob("*.tmp")):
        if p.is_dir():
            problems.append(
                f"{p.name}/ was left by a run that did not finish (an export or a save, or the previous contents an "
                "--overwrite run set aside): finish it "
                f"(finetune: --resume) or delete {p}"
            )
    lock = FolderLock(folder)
    holder = lock.holder()
    if holder is not None:
        try:
            lock.check()
            problems.append(f"a lock file {LOCK_NAME} left by a run that did not finish (pid {holder.get('pid')})")
        except FolderInUseError:
            problems.append(f"a run is still writing it (pid {holder.get('pid')})")
    for p in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(p)
        if problem:
            problems.append(problem)
    for p in sorted(folder.glob("*.json")):
        problem = json_problem(p)
        if problem:
            problems.append(problem)
    return problems
