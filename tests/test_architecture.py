"""The package's shape, checked from its source: the import graph, what imports what, type hints.

* Module level: no import cycle, and no module imports a package above it (its own parent
  package's ``__init__``, or the root ``han_surgery``): a package is built from its modules,
  never the other way round. Imports inside functions count too.
* Package level (``surgery``, ``models``, ``finetune``, ``cli``, ``demo``, ``paper`` and the
  top-level modules): the layers form no cycle either.
* ``import han_surgery`` and ``han-surgery --help`` import neither the paper experiments nor the
  fine-tuning stack.
* Every public function and class (the names in each module's ``__all__``) has type hints.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "han_surgery"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> set[str]:
    """The han_surgery modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node) for n in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "han_surgery")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "han_surgery":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES} - {name}


GRAPH = {name: imports_of(name) for name in MODULES if not name.endswith("__main__")}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one node (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_module_import_graph_has_no_cycles() -> None:
    assert strongly_connected(GRAPH) == []


def test_no_module_imports_a_package_above_it() -> None:
    upward = []
    for name, deps in GRAPH.items():
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if MODULES[name].name == "__init__.py":
            ancestors.discard(name)
        upward += [f"{name} imports {d}" for d in sorted(deps & ancestors)]
    assert upward == []


def layer_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def test_package_layers_have_no_cycles() -> None:
    layers: dict[str, set[str]] = {}
    for name, deps in GRAPH.items():
        if name == "han_surgery":  # the root re-exports the public API from every layer
            continue
        layers.setdefault(layer_of(name), set()).update(layer_of(d) for d in deps if layer_of(d) != layer_of(name))
    assert strongly_connected(layers) == []


@pytest.mark.parametrize(
    "code",
    [
        "import han_surgery",
        "from han_surgery.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
        "import han_surgery, timm\nhan_surgery.hanify(timm.create_model('vit_tiny_patch16_224', depth=1))",
    ],
    ids=["import", "cli-help", "hanify-timm"],
)
def test_import_and_help_load_neither_the_paper_nor_finetune(code: str) -> None:
    """Nor does hanify on a timm model load transformers' modeling code (and accelerate with it: 44 MB and about a
    second; no transformers model can exist before ``transformers.modeling_utils`` is imported)."""
    probe = code + "\nimport sys\nprint(sorted(m for m in sys.modules if m.startswith(('han_surgery.paper', "
    probe += "'han_surgery.finetune', 'han_surgery.demo', 'accelerate', 'transformers.modeling_utils'))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def public_callables():
    for name in sorted(MODULES):
        if name.endswith("__main__") or name.startswith("han_surgery.paper"):
            continue
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == name:
                yield f"{name}.{attr}", obj


def missing_hints(func) -> list[str]:
    sig = inspect.signature(func)
    hints = func.__annotations__
    missing = [p for p in sig.parameters if p not in ("self", "cls") and p not in hints]
    if "return" not in hints:
        missing.append("return")
    return missing


def test_every_public_function_and_class_has_type_hints() -> None:
    problems = []
    for qualname, obj in public_callables():
        if inspect.isfunction(obj):
            problems += [f"{qualname}: {m}" for m in missing_hints(obj)]
            continue
        if issubclass(obj, BaseException):
            continue
        generated = {"__init__", "__repr__", "__eq__"} if dataclasses.is_dataclass(obj) else set()
        for meth_name, meth in vars(obj).items():
            meth = meth.__func__ if isinstance(meth, (staticmethod, classmethod)) else meth
            if not inspect.isfunction(meth) or meth_name in generated:
                continue
            if meth_name.startswith("_") and meth_name != "__init__":
                continue
            problems += [f"{qualname}.{meth_name}: {m}" for m in missing_hints(meth)]
    assert problems == []
