"""The registry of rewrite rules used by :func:`han_surgery.hanify`.

A *rule* recognises one kind of MLP/FFN block and builds its Han replacement.
It has

* ``name`` -- unique, dotted by family (``"timm.mlp"``, ``"hf.llama_mlp"``);
* ``matcher`` -- which modules it applies to: a module class (or tuple of
  classes, matched with ``isinstance``), a string (a pattern on the qualified
  module name, glob or ``"re:"`` regex as in :class:`HanConfig`), or a callable
  ``matcher(candidate: Candidate) -> bool`` that looks at structure;
* ``builder`` -- ``builder(candidate, config) -> Replacement``: builds the new
  modules *without touching the model* (the engine swaps them in only once
  every builder has succeeded) or raises :class:`SkipCandidate` with a reason.
  Loading a saved model (``from_pretrained``) runs the builder again, on the
  base built from its config: a transformers base has its parameters on the
  meta device then (shapes, no values), as transformers builds it. A builder
  that reads weight values still works: the base is then built for real, at
  the cost of the dense model's memory and random init;
* ``changes`` -- which neighbours of the FFN the rule may change:
  ``"norm"`` (the pre-norm in front of it), ``"residual"`` (the skip
  connection around it). The engine holds rules to it: with
  ``residual="drop"``, a rule without ``"residual"`` skips every block (with
  that reason) before its builder runs; a rule with ``changes=()`` may only
  replace the candidate and modules inside it;
* ``priority`` -- higher first; the structural fallback has the lowest.

Register your own rule without touching the built-in ones::

    @register_rule("mylib.ffn", matcher=MyFFN, changes=(), priority=50)
    def build_my_ffn(candidate, config):
        d = candidate.module.up.in_features
        return Replacement({candidate.path: HanBlock(d, **config.han_kwargs())})
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, overload

from torch import nn

from ..checks import check_int
from ..errors import ConfigError
from .config import HanConfig, match_pattern

__all__ = [
    "Candidate",
    "Replacement",
    "Rule",
    "SkipCandidate",
    "register_rule",
    "unregister_rule",
    "get_rule",
    "list_rules",
    "resolve_rules",
]

Neighbour = Literal["norm", "residual"]
NEIGHBOURS: frozenset[str] = frozenset({"norm", "residual"})


class SkipCandidate(Exception):
    """Raised by a builder: the candidate is a block the rule recognised but will not rewrite.

    The message is the reason shown in :class:`~han_surgery.HanifyReport`. Name an option as
    ``HanConfig.<field>=<value>`` (``use HanConfig.residual='keep'``): the commands print it as their flag
    (``use --residual keep``).
    """


@dataclass
class Candidate:
    """A module a rule is asked about.

    Attributes:
        path: qualified name in the model (``"blocks.0.mlp"``; ``""`` for the root).
        module: the module itself.
        parent: the module that holds it (``None`` for the root).
        parent_path: qualified name of ``parent``.
        attr: the attribute name of ``module`` in ``parent``.
        root: the whole model.
    """

    path: str
    module: nn.Module
    parent: nn.Module | None
    parent_path: str
    attr: str
    root: nn.Module

    def sibling(self, name: str) -> nn.Module | None:
        """The parent's child module called ``name``, or ``None``."""
        if self.parent is None:
            return None
        child = getattr(self.parent, name, None)
        return child if isinstance(child, nn.Module) else None

    def qualify(self, name: str) -> str:
        """The qualified name of the parent's child ``name``."""
        return f"{self.parent_path}.{name}" if self.parent_path else name


@dataclass
class Replacement:
    """What a builder returns.

    Attributes:
        swaps: qualified module name -> new module. Usually the candidate's own
            path plus neighbours (e.g. ``{"blocks.0.mlp": HanBlock(192),
            "blocks.0.norm2": nn.Identity()}``). A new module may hold a module
            of the original model (e.g. a kept norm moved into a wrapper); it
            must not modify it. Any mapping is taken (and copied into a ``dict``).
        neighbours: what happened to the norm and the residual, in words
            (``{"norm": "blocks.0.norm2 -> Identity", "residual": "kept"}``).
    """

    swaps: Mapping[str, nn.Module]
    neighbours: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.swaps = dict(self.swaps)


Matcher = type[nn.Module] | tuple[type[nn.Module], ...] | str | Callable[[Candidate], bool]
Builder = Callable[[Candidate, HanConfig], Replacement]


@dataclass(frozen=True)
class Rule:
    """A registered rewrite rule (see the module docstring)."""

    name: str
    matcher: Matcher
    builder: Builder
    changes: frozenset[str] = frozenset()
    priority: int = 0
    description: str = ""

    def matches(self, candidate: Candidate) -> bool:
        m = self.matcher
        if isinstance(m, type) or (isinstance(m, tuple) and all(isinstance(t, type) for t in m)):
            return isinstance(candidate.module, m)
        if isinstance(m, str):
            return match_pattern(m, candidate.path)
        return bool(m(candidate))


_RULES: dict[str, Rule] = {}
_ORDER: dict[str, int] = {}
_counter = 0
_BUILTIN_NAMES: frozenset[str] = frozenset()  # the rules han_surgery.surgery.rules registers: not to be taken over


@overload
def register_rule(
    name: str,
    *,
    matcher: Matcher,
    builder: Builder,
    changes: Iterable[Neighbour] = (),
    priority: int = 0,
    description: str = "",
    override: bool = False,
) -> Rule: ...


@overload
def register_rule(
    name: str,
    *,
    matcher: Matcher,
    builder: None = None,
    changes: Iterable[Neighbour] = (),
    priority: int = 0,
    description: str = "",
    override: bool = False,
) -> Callable[[Builder], Builder]: ...


def register_rule(
    name: str,
    *,
    matcher: Matcher,
    builder: Builder | None = None,
    changes: Iterable[Neighbour] = (),
    priority: int = 0,
    description: str = "",
    override: bool = False,
) -> Rule | Callable[[Builder], Builder]:
    """Register a rewrite rule; usable directly or as a decorator on the builder.

    Args:
        name: unique rule name; registering an existing name raises unless
            ``override=True``. The name of a built-in rule cannot be taken,
            even after ``unregister_rule``: a saved model records the name of
            the rule that rewrote each block, and loading it replays the rule
            of that name, so a model rewritten by your rule would load back
            rewritten by the built-in one. Give yours a name of its own and a
            higher ``priority``.
        matcher: a module class or a non-empty tuple of them, a name pattern, or ``matcher(candidate) -> bool``.
        builder: ``builder(candidate, config) -> Replacement`` (omit to use as a decorator).
        changes: neighbours the rule may change, a subset of ``{"norm", "residual"}``
            (a tuple such as ``("norm",)``, not a bare string).
        priority: an ``int``; rules are tried from the highest priority down (ties: in
            registration order); the first that matches a module owns it.
        description: one line for ``list_rules`` and the docs.

    Returns:
        The :class:`Rule` (direct call) or the decorator (which returns the
        builder unchanged, so it stays a plain function).

    Raises:
        ValueError: a bad ``changes``, ``priority`` or ``matcher`` (the message names the rule: caught here, not
            at every later ``hanify``), or a name that is taken.
    """
    check_int(f"register_rule({name!r}): priority", priority)
    if not _is_matcher(matcher):
        raise ConfigError(
            f"register_rule({name!r}): matcher must be an nn.Module class, a non-empty tuple of them, a name "
            f"pattern (str) or a callable matcher(candidate) -> bool, got {matcher!r}"
        )
    if isinstance(changes, str):
        raise ValueError(
            f"register_rule({name!r}): changes must be a collection of neighbour names, not the string "
            f"{changes!r}: write changes=({changes!r},)"
        )
    allowed = frozenset[str](changes)
    if not allowed <= NEIGHBOURS:
        raise ValueError(
            f"register_rule({name!r}): changes must be a subset of {sorted(NEIGHBOURS)}, got {sorted(allowed)}"
        )

    def _register(fn: Builder) -> Rule:
        global _counter
        if name in _RULES and not override:
            raise ValueError(f"register_rule: a rule named {name!r} exists already; pass override=True to replace it")
        if name in _BUILTIN_NAMES and not (getattr(fn, "__module__", None) or "").startswith(__package__ + ".rules."):
            raise ValueError(
                f"register_rule: {name!r} is the name of a built-in rule (a saved model rewritten by your rule would "
                "load back rewritten by the built-in one): register yours under a name of its own, with a higher "
                "priority to take its modules"
            )
        rule = Rule(name, matcher, fn, allowed, priority, description or (fn.__doc__ or "").strip().split("\n")[0])
        _RULES[name] = rule
        if name not in _ORDER:
            _ORDER[name] = _counter
            _counter += 1
        return rule

    if builder is not None:
        return _register(builder)

    def decorator(fn: Builder) -> Builder:
        _register(fn)
        return fn

    return decorator


def _is_module_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, nn.Module)


def _is_matcher(matcher: object) -> bool:
    """Whether ``matcher`` is one of the kinds :meth:`Rule.matches` takes (see :data:`Matcher`)."""
    if isinstance(matcher, type):  # a class is callable too: only a module class is a matcher
        return _is_module_class(matcher)
    if isinstance(matcher, tuple):
        return bool(matcher) and all(_is_module_class(m) for m in matcher)
    return isinstance(matcher, str) or callable(matcher)


def _freeze_builtin_rules() -> None:
    """Called once, by :mod:`han_surgery.surgery.rules` after it registered them: the rules now known are built in."""
    global _BUILTIN_NAMES
    _BUILTIN_NAMES = frozenset(_RULES)


def is_builtin_rule(name: str) -> bool:
    """``True`` for the name of a rule han-surgery ships (``"timm.mlp"``), ``False`` for a user's rule."""
    return name in _BUILTIN_NAMES


def unregister_rule(name: str) -> None:
    """Remove a rule (e.g. a test's own rule)."""
    _RULES.pop(get_rule(name).name)
    _ORDER.pop(name, None)


def get_rule(name: str) -> Rule:
    """The rule called ``name``; unknown names raise ``KeyError`` listing near names."""
    if name not in _RULES:
        near = difflib.get_close_matches(name, list(_RULES), n=5, cutoff=0.3)
        raise KeyError(
            f"no rewrite rule named {name!r}; did you mean one of {near}? (all: han_surgery.surgery.list_rules())"
        )
    return _RULES[name]


def list_rules() -> list[Rule]:
    """Every registered rule, in the order hanify tries them (priority, then registration)."""
    return sorted(_RULES.values(), key=lambda r: (-r.priority, _ORDER[r.name]))


def resolve_rules(names: Iterable[str] | None) -> list[Rule]:
    """The rules a :class:`HanConfig` allows, in try order. Names may be globs (``"hf.*"``)."""
    rules = list_rules()
    if names is None:
        return rules
    chosen: set[str] = set()
    for pattern in names:
        hits = [r.name for r in rules if fnmatch.fnmatchcase(r.name, pattern)]
        if not hits:
            near = difflib.get_close_matches(pattern, [r.name for r in rules], n=5, cutoff=0.3)
            known = f"near names: {near}" if near else f"the rules are {sorted(r.name for r in rules)}"
            raise ConfigError(f"HanConfig.rules: {pattern!r} names no registered rule; {known}")
        chosen.update(hits)
    return [r for r in rules if r.name in chosen]
