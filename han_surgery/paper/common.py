"""Shared pieces of the paper reproductions: model constructors, seeding, data paths, result files.

Models
------
* :func:`han_net` -- the paper's HanNet: ``dense_first`` dense layers, Householder layers, then
  ``dense_last`` dense layers, each followed by an activation, and a dense head. With
  ``activation="abs"`` the Householder layers are :class:`~han_surgery.layers.HanLayer`
  (``|H x + b|``, fused), otherwise :class:`~han_surgery.layers.HouseholderLinear` + activation.
* :func:`fc_net` -- a plain fully connected network (``depth`` hidden layers of ``width``).

Result files
------------
:func:`write_results` writes ``results.json`` (everything the run measured, plus the command,
the configuration, versions and the wall time) and ``results.md`` (a markdown table) into ``--out``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from ..checks import SEED_LIMIT, seed_arg
from ..layers import Abs, HanLayer, HouseholderLinear
from ..utils import count_parameters
from .activations import GroupSort

__all__ = [
    "PaperInputError",
    "load_rows",
    "Activation",
    "han_net",
    "fc_net",
    "count_parameters",
    "make_activation",
    "default_data_dir",
    "resolve_data_path",
    "SEED_LIMIT",
    "seed_arg",
    "seed_everything",
    "positive_milestones",
    "markdown_table",
    "write_results",
    "mean_std",
    "parse_floats",
    "use_agg_backend",
]


class PaperInputError(ValueError):
    """Bad input to a paper experiment: an option value, a missing data file, an unreadable CSV.

    The message says what is wrong and what to do; ``han-surgery paper`` prints it as one line on
    stderr and exits with status 2 (see :func:`han_surgery.paper.cli.main`).
    """


Activation = str  # "abs", "relu", "maxmin" or "groupsort<k>" (see make_activation)
DenseInit = Literal["orthogonal", "kaiming", "default"]

DATA_ENV = "HAN_SURGERY_DATA"

_Number = TypeVar("_Number", int, float)


def make_activation(name: str) -> nn.Module:
    """``"abs"`` -> :class:`~han_surgery.layers.Abs`, ``"relu"`` -> ``nn.ReLU``, ``"maxmin"`` ->
    ``GroupSort(2)``, ``"groupsort<k>"`` (e.g. ``"groupsort5"``) -> ``GroupSort(k)`` (see :mod:`.activations`)."""
    if name == "abs":
        return Abs()
    if name == "relu":
        return nn.ReLU()
    if name == "maxmin":
        return GroupSort(2)
    if name.startswith("groupsort") and name[len("groupsort") :].isdigit():
        return GroupSort(int(name[len("groupsort") :]))
    raise ValueError(
        f"han_surgery.paper.common: activation must be 'abs', 'relu', 'maxmin' or 'groupsort<k>', got {name!r}"
    )


def _init_dense(layer: nn.Linear, init: str) -> None:
    if init == "orthogonal":
        nn.init.orthogonal_(layer.weight)
    elif init == "kaiming":
        nn.init.kaiming_normal_(layer.weight)
    elif init != "default":
        raise ValueError(
            f"han_surgery.paper.common: dense init must be 'orthogonal', 'kaiming' or 'default', got {init!r}"
        )


def han_net(
    in_features: int,
    width: int,
    depth: int,
    out_features: int,
    dense_first: int = 2,
    dense_last: int = 1,
    activation: Activation = "abs",
    householder: bool = True,
    dense_init: DenseInit = "orthogonal",
    fuse_abs: bool = True,
) -> nn.Sequential:
    """The paper's HanNet (and its ablations).

    ``depth`` hidden layers of ``width`` neurons: the first ``dense_first`` and the last
    ``dense_last`` are ``nn.Linear``, the ``depth - dense_first - dense_last`` in between are
    Householder layers ``H x + b`` (``2 * width`` parameters each); every hidden layer is followed
    by ``activation``; a dense head maps ``width -> out_features``. The first layer is always dense
    when ``in_features != width`` (a reflection is square).

    The checkerboard HanNet of the paper is ``han_net(2, 30, 20, 2)`` (dense, dense, 17 Han-layers,
    dense, head); the regression HanNet is ``han_net(d, 200, 20, 1, dense_first=1, dense_last=0)``.

    Args:
        householder: ``False`` replaces the Householder layers by ``nn.Linear(width, width)``
            (ablation "FC + activation" with the same skeleton).
        dense_init: init of every ``nn.Linear`` weight (``"orthogonal"``: the paper's HanNet).
            Householder vectors always use the paper's orthogonal init.
        fuse_abs: with ``activation="abs"``, use :class:`~han_surgery.layers.HanLayer` (``|H x + b|``
            in one module); ``False`` builds ``HouseholderLinear`` + ``Abs``, the same function with
            the layer layout of the other activations (so the networks can be stacked together).

    Shapes: ``(N, in_features) -> (N, out_features)``.
    """
    if depth < 1:
        raise ValueError(f"han_net: depth must be >= 1, got {depth}")
    if in_features != width and dense_first < 1:
        raise ValueError(
            f"han_net: in_features={in_features} != width={width} needs dense_first >= 1 (a reflection is square)"
        )
    if dense_first + dense_last > depth:
        raise ValueError(f"han_net: dense_first + dense_last = {dense_first + dense_last} exceeds depth={depth}")
    layers: list[nn.Module] = []
    fan_in = in_features
    for idx in range(depth):
        dense = idx < dense_first or idx >= depth - dense_last or not householder
        if dense:
            lin = nn.Linear(fan_in, width)
            _init_dense(lin, dense_init)
            layers += [lin, make_activation(activation)]
        elif activation == "abs" and fuse_abs:
            layers.append(HanLayer(width))
        else:
            layers += [HouseholderLinear(width), make_activation(activation)]
        fan_in = width
    head = nn.Linear(width, out_features)
    _init_dense(head, dense_init)
    layers.append(head)
    return nn.Sequential(*layers)


def fc_net(
    in_features: int,
    width: int,
    depth: int,
    out_features: int,
    activation: Activation = "relu",
    init: DenseInit = "kaiming",
) -> nn.Sequential:
    """A fully connected network: ``depth`` hidden ``nn.Linear(., width)`` + activation, then a dense head.

    The paper's checkerboard FCNet is ``fc_net(2, 100, 6, 2)`` (ReLU, Kaiming normal init); the
    regression FCNet1/FCNet2 are ``fc_net(d, 50, 5, 1)`` and ``fc_net(d, 200, 5, 1)``; the MNIST
    baseline is ``fc_net(784, 784, 1, 10)``. Shapes: ``(N, in_features) -> (N, out_features)``.
    """
    layers: list[nn.Module] = []
    fan_in = in_features
    for _ in range(depth):
        lin = nn.Linear(fan_in, width)
        _init_dense(lin, init)
        layers += [lin, make_activation(activation)]
        fan_in = width
    head = nn.Linear(fan_in, out_features)
    _init_dense(head, init)
    layers.append(head)
    return nn.Sequential(*layers)


def default_data_dir() -> Path:
    """``$HAN_SURGERY_DATA`` if set, else ``../shared/data`` relative to the current directory."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path.cwd().parent / "shared" / "data"


def load_rows(path: str | Path, dtype: Any, delimiter: str | None = None) -> np.ndarray:
    """``np.loadtxt`` of a numeric text file as ``(rows, columns)``; an empty file gives shape ``(0, 1)`` without
    numpy's warning, so that the caller's check of the shape says it once (one line on the command line).

    Raises:
        ValueError, OSError: as ``np.loadtxt`` (a cell that is no number, an unreadable file).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return np.loadtxt(path, delimiter=delimiter, dtype=dtype, ndmin=2)


def resolve_data_path(given: str | os.PathLike[str] | None, *parts: str) -> Path:
    """``given`` if passed, else ``default_data_dir() / parts``; raises :class:`PaperInputError` if it is missing."""
    path = Path(given) if given is not None else default_data_dir().joinpath(*parts)
    if not path.exists():
        raise PaperInputError(
            f"data not found at {path}; pass its location (--data / --csv) or set ${DATA_ENV} to the folder "
            "that holds checkerboard/, regression/ and mnist/"
        )
    return path


def positive_milestones(milestones: Sequence[_Number]) -> list[_Number]:
    """``milestones`` without those ``<= 0``, for ``MultiStepLR``: it applies a milestone at step 0 when it is built,
    so ``--epochs 1`` (``int(0.5 * 1) == 0``) would start the run at a fraction of its lr."""
    return [m for m in milestones if m > 0]


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy; return a ``torch.Generator`` seeded with ``seed`` for data sampling."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population, ``ddof=0``) standard deviation; ``std = 0`` for one value."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def parse_floats(text: str, option: str, *, positive: bool, allow_empty: bool = False) -> tuple[float, ...]:
    """A comma-separated list of finite numbers, each ``> 0`` (``positive``) or ``>= 0``: a command-line value.

    Raises:
        PaperInputError: naming ``option``: not numbers, a value out of range (nan and inf included), or none.
    """
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise PaperInputError(f"{option} takes comma-separated numbers, got {text!r}") from err
    if not values and not allow_empty:
        raise PaperInputError(f"{option} needs at least one value")
    if not all(math.isfinite(v) and (v > 0 if positive else v >= 0) for v in values):
        kind = "positive" if positive else "non-negative"
        raise PaperInputError(f"{option} takes finite, {kind} numbers, got {text!r}")
    return values


def use_agg_backend() -> Any:
    """Import ``matplotlib.pyplot`` with the non-interactive Agg backend (raises a clear error if absent)."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the dev extra
        raise ImportError("han_surgery.paper: plots need matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def environment() -> dict[str, Any]:
    """Versions and thread count, recorded in every ``results.json``."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


def write_results(out: str | os.PathLike[str] | None, results: dict[str, Any], markdown: str) -> Path | None:
    """Write ``results.json`` and ``results.md`` into ``out`` (created); return the folder, or ``None`` if ``out`` is ``None``."""
    if out is None:
        return None
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    results.setdefault("environment", environment())
    results.setdefault("finished_utc", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    text = json.dumps(_finite_or_null(results), indent=2, default=_json_default, allow_nan=False)
    (folder / "results.json").write_text(text + "\n")
    (folder / "results.md").write_text(markdown)
    return folder


def _finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (Python or numpy) replaced by ``None``: JSON has no such numbers,
    and ``json.dumps`` would write ``NaN`` / ``Infinity``, which most JSON readers refuse (a diverged run's loss, the
    R^2 of a constant test target)."""
    if isinstance(obj, (float, np.floating)):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
