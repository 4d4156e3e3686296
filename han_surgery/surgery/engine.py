"""``hanify``: find the MLP/FFN blocks of a model, plan their Han replacements, swap them in.

The engine works in three phases, so a failure never leaves a half-rewritten model:

1. **discover** -- walk ``model.named_modules()`` in order; the first rule (by
   priority) whose matcher accepts a module makes it a *candidate* and hides
   its sub-modules from the other rules. Han modules (anything hanify built)
   are never candidates: calling ``hanify`` twice rewrites nothing the second
   time (the second report is empty and counts the Han modules it found).
2. **plan** -- apply ``include`` / ``exclude`` / ``filter_fn``, then run every
   builder. Builders create new modules and never touch the model; a builder
   may decline with :class:`SkipCandidate` (reported with its reason). A
   rewrite that would replace a module an earlier one already replaces is
   skipped too, and so is one that would replace a shared module in one of its
   uses only (an FFN two blocks share, whose pre-norm only one of them goes
   through; a pre-norm two blocks share). Any other exception aborts the call
   with :class:`HanifyError`: nothing has been swapped yet, and nothing of the
   model is changed.
   Every new module must accept the calls of the module it replaces
   (:func:`call_signature_problem`, checked for every rule) and takes its
   train/eval mode.
3. **swap** -- ``setattr`` every planned module (undone if a swap fails). A
   module reachable under several paths (shared) is replaced at all of them
   by the one new module, so it stays shared. Warnings (hooks that went with a
   replaced module) come once the step is recorded: under warnings-as-errors the
   call raises with the model rewritten and recorded, not half-way.
   With ``calibration=`` data, the swaps happen one block at a time and each
   new block is fitted to the block it replaces before the next one is swapped
   in (:mod:`han_surgery.surgery.calibration`); a failure undoes every swap.

A wrapped model (``torch.compile``'s ``OptimizedModule``, ``DataParallel``) is unwrapped
first (:func:`unwrap_model`): the rewrites and the recipe land on the model itself, with
its own paths. ``DistributedDataParallel`` is refused (but for a dry run): it registered
the parameters it all-reduces when it was built, so hanify its ``module`` and wrap again.
So is a block accelerate offloads (``cpu_offload``, ``device_map`` with CPU or disk
offload; but for a dry run): its weights wait on the meta device for a hook to load them,
and the new block would have none. Hanify before dispatching.

A model in which no rule recognises anything (and which holds no Han module)
raises :class:`NothingToRewriteError`. If candidates exist but every one is
skipped, the report is returned with zero rewrites and the reasons.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, HanifyError, NothingToRewriteError
from ..utils import count_parameters
from .calibration.config import CalibrationConfig
from .config import HanConfig, match_pattern
from .modules import HAN_MODULE_TYPES
from .recipe import BaseModelSpec, RecipeStep, RewriteEntry, record_step
from .registry import Candidate, Replacement, Rule, SkipCandidate, resolve_rules
from .report import KEPT_BY_CALIBRATION, HanifyReport, RewriteRecord, SkipRecord

__all__ = ["hanify", "unwrap_model", "call_signature_problem", "HanifyError", "NothingToRewriteError"]

FilterFn = Callable[[nn.Module, str], bool]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``) and ``DataParallel`` /
    ``DistributedDataParallel`` (``module``), however deeply nested; any other module is returned as is."""
    return _wrapper_chain(model)[-1]


def _call_filter(filter_fn: FilterFn, cand: Candidate) -> bool:
    """``filter_fn(module, path)``; an exception it raises becomes a :class:`HanifyError` naming the path."""
    try:
        return bool(filter_fn(cand.module, cand.path))
    except Exception as e:
        raise HanifyError(
            f"filter_fn raised on {cand.path!r}: {e!r}. Nothing was swapped: the model is unchanged."
        ) from e


def _wrapper_chain(model: nn.Module) -> list[nn.Module]:
    """``model``, the module it wraps, the one that wraps, ...: the last is the model itself."""
    chain = [model]
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch._dynamo OptimizedModule
            model = model._orig_mod
        else:
            return chain
        chain.append(model)


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _signature_text(module: nn.Module, sig: inspect.Signature) -> str:
    """``Name.forward(x, height, width)``: the signature without annotations or defaults."""
    bare = [
        p.replace(annotation=inspect.Parameter.empty, default=inspect.Parameter.empty) for p in sig.parameters.values()
    ]
    return f"{type(module).__name__}.forward{sig.replace(parameters=bare, return_annotation=inspect.Signature.empty)}"


def call_signature_problem(old: nn.Module, new: nn.Module) -> str | None:
    """Why ``new`` cannot be called the way its parent calls ``old`` (``None`` if it can).

    ``new.forward`` must bind every positional arity ``old.forward`` accepts (required
    inputs up to all positional ones), ``*args`` / ``**kwargs`` if ``old`` takes them, and
    every input of ``old`` after the first by keyword (the first, the hidden state, is
    passed positionally by every model we know; Han modules call it ``x``).
    """
    try:
        old_sig, new_sig = inspect.signature(old.forward), inspect.signature(new.forward)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None
    params = list(old_sig.parameters.values())
    positional = [p for p in params if p.kind in _POSITIONAL]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    calls: list[tuple[tuple, dict]] = [(tuple(range(n)), {}) for n in range(len(required), len(positional) + 1)]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        calls.append((tuple(range(len(positional) + 2)), {}))
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        calls.append((tuple(range(len(required))), {"_han_surgery_probe": 0}))
    named = [
        p.name
        for p in params[1:]
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    if named:
        calls.append(((0,), {name: 0 for name in named}))
    for args, kwargs in calls:
        try:
            new_sig.bind(*args, **kwargs)
        except TypeError as e:
            return (
                f"the replacement {_signature_text(new, new_sig)} cannot be called as "
                f"{_signature_text(old, old_sig)} ({e})"
            )
    return None


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """``id(module)`` -> every path it is reachable under (more than one for a shared module)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), [])
        if path not in paths[id(module)]:
            paths[id(module)].append(path)
    return paths


def _under(path: str, blocked: set[str]) -> bool:
    if not blocked:
        return False
    parts = path.split(".")
    return any(".".join(parts[:i]) in blocked for i in range(1, len(parts) + 1))


def _near(pattern: str, names: list[str]) -> list[str]:
    probe = pattern[3:] if pattern.startswith("re:") else pattern
    return difflib.get_close_matches(probe.replace("\\", ""), names, n=5, cutoff=0.3)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


def _reference_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in module.parameters():
        return t
    for t in module.buffers():
        return t
    return None


#: Set on every module ``hanify`` swapped in, once the swaps are in (never in a dry run or a failed call, and never on
#: a module of the model a rule put back): not itself a candidate for a later call (what makes repeating a call a
#: no-op for a user's own replacement classes too, which ``HAN_MODULE_TYPES`` does not list). Its sub-modules are still
#: looked at: a wrapper a rule put around the original FFN leaves that FFN to a later call.
SWAPPED_IN = "_han_surgery_swapped_in"


def _mark_swapped_in(planned: list[tuple[RewriteRecord, Replacement]], originals: set[int]) -> None:
    """Set :data:`SWAPPED_IN` on the new modules of ``planned`` (swapped in), not on the model's own ones."""
    for _, repl in planned:
        for new in repl.swaps.values():
            if id(new) not in originals:
                setattr(new, SWAPPED_IN, True)


def _hooked_by_accelerate(model: nn.Module, path: str) -> bool:
    """Whether accelerate hooked (``_hf_hook``: ``cpu_offload``, ``dispatch_model``, ``from_pretrained(device_map=...)``)
    the module at ``path``, a module inside it, or one holding it."""
    parts = path.split(".")
    holders = (model.get_submodule(".".join(parts[:i])) for i in range(len(parts)))
    return any(hasattr(m, "_hf_hook") for m in (*model.get_submodule(path).modules(), *holders))


def _built_on_meta(module: nn.Module, originals: set[int]) -> bool:
    """Whether a part of ``module`` that a rule built (not one of the model's own) holds a tensor on the meta device."""
    return any(
        t is not None and t.is_meta
        for part in module.modules()
        if id(part) not in originals
        for t in (*part._parameters.values(), *part._buffers.values())
    )


def _check_placement(
    model: nn.Module,
    rule: Rule,
    cand: Candidate,
    path: str,
    new: nn.Module,
    originals: set[int],
    ref: torch.Tensor,
    dry_run: bool,
) -> None:
    """Refuse, before the model is touched, to put ``new`` (for ``path`` of the rewrite of ``cand``; ``ref``: the
    tensor it is placed like) where its new parts could get no values: a block accelerate offloads (its weights on
    meta, loaded by a hook; a dry run may plan it), or a model with values when the rule built ``new`` on meta."""
    if ref.is_meta and not dry_run and _hooked_by_accelerate(model, path):
        raise ConfigError(
            f"hanify: {cand.path!r} is offloaded by accelerate (its weights wait on the meta device for accelerate's "
            "hooks to load them at each forward): the new blocks would have no values. Hanify the model before "
            "dispatch (from_pretrained without device_map, or before cpu_offload / dispatch_model), then dispatch "
            "it again"
        )
    if not ref.is_meta and _built_on_meta(new, originals):
        raise HanifyError(
            f"rule {rule.name!r} built the replacement of {path!r} on the meta device (no values), but the model is "
            f"on {ref.device}: call hanify outside a `with torch.device('meta')` block, with a default device that is "
            "not meta (torch.set_default_device); model unchanged"
        )


def _shared_elsewhere(
    cand: Candidate, paths: list[str], aliases: Mapping[int, list[str]], modules: Mapping[str, nn.Module]
) -> str | None:
    """Why replacing the modules at ``paths`` (one rewrite's swaps) at every path each is reachable under would be
    wrong, or ``None``.

    Each swapped module sits at ``home + suffix``, ``suffix`` its path below the paths' common prefix. The swaps are
    right where every use of them (every ``home`` any of them is reached from) holds all of them, at the same
    suffixes: a whole block used twice, an FFN replaced alone, a split FFN whose two halves two layers share (BERT's
    ``intermediate`` and ``output``). They are wrong for an FFN two blocks use whose neighbours (a pre-norm, a layer
    scale) the rewrite replaces in one block only, and for a neighbour two blocks use (it would change for the other
    one too).
    """
    split = [p.split(".") for p in paths]
    common = len(os.path.commonprefix(split))
    suffixes = [parts[common:] for parts in split]
    uses = {p: [a.split(".") if a else [] for a in aliases[id(modules[p])]] for p in paths}
    homes = {
        tuple(alias[: len(alias) - len(suffix)])
        for p, suffix in zip(paths, suffixes, strict=True)
        for alias in uses[p]
        if alias[len(alias) - len(suffix) :] == suffix
    }
    if all(
        {".".join(alias) for alias in uses[p]} == {".".join([*home, *suffix]) for home in homes}
        for p, suffix in zip(paths, suffixes, strict=True)
    ):
        return None
    remedy = (
        "replace the FFN alone (HanConfig.drop_norm=False, HanConfig.residual='keep') or give each use its own module"
    )
    inside = [p for p in paths if p == cand.path or p.startswith(cand.path + ".")]
    outside = ", ".join(p for p in paths if p not in inside)
    for group in (inside, paths):
        for path in group:
            others = ", ".join(a for a in aliases[id(modules[path])] if a != path)
            if not others:
                continue
            if group is inside and outside:
                return (
                    f"{path} is shared with {others}, but the rewrite also replaces {outside}, which only this use "
                    f"goes through: the other use would get the new FFN with its old neighbours; {remedy}"
                )
            return f"{path}, which the rewrite replaces, is shared with {others}, which would change too; {remedy}"
    return f"the modules the rewrite replaces ({', '.join(paths)}) are shared unevenly between their uses; {remedy}"


def _params_after_swaps(model: nn.Module, planned: list[tuple[RewriteRecord, Replacement]]) -> int:
    """``count_parameters(model)`` once every planned swap is in (a dry run's prediction): the parameters of the
    modules that stay and those of the new ones, each counted once (one tied between several modules too)."""
    swaps = {path: new for _, repl in planned for path, new in repl.swaps.items()}
    replaced = set(swaps)
    kept = [m for path, m in model.named_modules(remove_duplicate=False) if not _under(path, replaced)]
    seen = {id(p): p.numel() for m in kept for p in m.parameters(recurse=False)}
    seen.update((id(p), p.numel()) for new in swaps.values() for p in new.parameters())
    return sum(seen.values())


def _place_new_parts(module: nn.Module, originals: set[int], ref: torch.Tensor) -> None:
    """Move the parts of a replacement that a rule built onto ``ref``'s device, and cast their floating-point
    tensors to its dtype. The model's own modules that the rule reuses inside it (a kept norm) stay as they are: a
    dry run or a failed call must not change them, and a norm kept in float32 in a bfloat16 model stays float32.
    Onto the meta device (a model built without memory, as ``from_pretrained`` builds one) only the parameters go,
    and the buffers keep the values they were built with: a checkpoint restores only the persistent ones, and
    nothing gives a meta buffer memory."""
    made: dict[int, nn.Parameter] = {}  # onto meta: a parameter shared by two new parts (tied) stays shared

    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=ref.device)
        return t.to(dtype=ref.dtype) if ref.is_floating_point() and t.is_floating_point() else t

    for part in module.modules():
        if id(part) in originals:
            continue
        for name, param in part._parameters.items():
            placed = place(param.data) if param is not None else None
            if placed is None or placed is param.data:
                continue
            if placed.is_meta and not param.is_meta:  # a new tensor type: a new Parameter, shared where it was
                made.setdefault(id(param), nn.Parameter(placed, param.requires_grad))
                part._parameters[name] = made[id(param)]
            else:  # in place, as Module.to does: the Parameter (and whoever shares it) stays the same object
                param.data = placed
        if ref.device.type != "meta":
            for name, buffer in part._buffers.items():
                if buffer is not None:
                    part._buffers[name] = place(buffer)
        elif ref.is_floating_point():  # buffers stay where they are, in the model's dtype
            for name, buffer in part._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    part._buffers[name] = buffer.to(dtype=ref.dtype)


def _discover(model: nn.Module, rules: list[Rule]) -> tuple[list[tuple[Candidate, Rule]], list[str]]:
    matches: list[tuple[Candidate, Rule]] = []
    blocked: set[str] = set()
    han_paths: list[str] = []
    parents: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        parents[path] = module
        if _under(path, blocked):
            continue
        if isinstance(module, HAN_MODULE_TYPES):
            han_paths.append(path)
            blocked.add(path)
            continue
        if getattr(module, SWAPPED_IN, False):  # not a candidate again; what it holds still is (an FFN it wraps)
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = parents.get(parent_path) if path else None
        cand = Candidate(path, module, parent, parent_path, attr, model)
        for rule in rules:
            try:
                hit = rule.matches(cand)
            except Exception as e:  # a broken matcher must name itself
                raise HanifyError(
                    f"matcher of rule {rule.name!r} raised on {path!r} ({type(module).__name__}): {e!r}"
                ) from e
            if hit:
                matches.append((cand, rule))
                blocked.add(path)
                break
    return matches, han_paths


def _check_patterns(config: HanConfig, model: nn.Module, candidate_paths: list[str], han_paths: list[str]) -> None:
    # Blocks already rewritten (Han modules and the modules holding them) count as matched:
    # repeating a call with the same patterns is a no-op, not an error.
    done = {".".join(p.split(".")[:i]) for p in han_paths for i in range(1, p.count(".") + 2)}
    for kind, patterns in (("include", config.include), ("exclude", config.exclude)):
        for pattern in patterns:
            if not any(match_pattern(pattern, p) for p in (*candidate_paths, *done)):
                near = _near(pattern, candidate_paths or [n for n, _ in model.named_modules() if n])
                raise ConfigError(
                    f"HanConfig.{kind} pattern {pattern!r} matches no candidate block. "
                    f"{f'Near names: {near}. ' if near else ''}Candidates: {candidate_paths[:8]}"
                    f"{' ...' if len(candidate_paths) > 8 else ''} (globs match whole names; prefix 're:' for a regex)"
                )


def _require_type(name: str, value: Any, cls: type) -> None:
    """A ``ConfigError`` unless ``value`` is a ``cls`` (a dict of its fields is the likely mistake)."""
    if not isinstance(value, cls):
        how = f": pass {cls.__name__}(**...) or {cls.__name__}.from_dict(...)" if isinstance(value, Mapping) else ""
        raise ConfigError(f"hanify: {name} must be a {cls.__name__}, not a {type(value).__name__}{how}")


def hanify(
    model: nn.Module,
    config: HanConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    dry_run: bool = False,
    calibration: Iterable[Any] | None = None,
    calibration_config: CalibrationConfig | None = None,
) -> HanifyReport:
    """Replace the MLP/FFN blocks of ``model`` by Han-blocks ``H2 |H1 x + b1| + b2``, in place.

    Args:
        model: any ``nn.Module`` (a timm model, a transformers ``PreTrainedModel``, your own);
            ``torch.compile`` / ``DataParallel`` / ``DistributedDataParallel`` wrappers are looked through.
        config: what to rewrite and how (:class:`HanConfig`; default: every rule,
            pre-norms dropped, residuals kept).
        filter_fn: ``filter_fn(module, qualified_name) -> bool``, called on each
            candidate FFN after the include/exclude patterns; ``False`` skips it
            (as in torchao's ``quantize_``).
        dry_run: plan and report without touching the model.
        calibration: calibrated surgery: an iterable of model inputs (a dict is
            called as ``model(**batch)``, a tuple as ``model(*batch)``, a tensor
            as ``model(batch)``; e.g. from
            :func:`han_surgery.surgery.calibration.calibration_batches`). Each new
            block is then fitted, in model order, to what the block it replaces
            computed on the inputs the already-fitted blocks produce, instead of
            keeping its random initialisation (see ``docs/CALIBRATION.md``).
        calibration_config: a
            :class:`~han_surgery.surgery.calibration.CalibrationConfig` (fit
            steps, token sample size, ``max_fvu``, healing); recorded in the recipe.
            Its ``seed`` also seeds the new blocks' random initialisation (torch's generators
            are seeded with it for the call and then restored), so the same call on the same
            model and data gives the same weights.

    After a step that rewrote something, the model's library can save it with its own API (see
    :func:`register_hanify_hook`): a transformers model becomes a ``Hanified<Class>`` (a subclass, same
    ``__name__``) whose ``save_pretrained`` writes a hanified folder; a timm model's ``pretrained_cfg``
    names the ``"hanified"`` entry point and its ``model_args`` the base and the recipe, for ``save_for_hf``.

    Returns:
        A :class:`HanifyReport` (``print`` it for a table); with calibration,
        ``report.calibration`` holds the per-block fit.

    Raises:
        NothingToRewriteError: no rule recognises any module (and no Han module is present).
        ConfigError: an include/exclude pattern matches no candidate (the message lists near names),
            ``config`` / ``calibration_config`` is not a ``HanConfig`` / ``CalibrationConfig`` (e.g. a dict), or
            a block to rewrite is offloaded by accelerate (hanify before dispatch); the model is unchanged.
        HanifyError: a rule failed, or built its blocks on the meta device (a ``torch.device("meta")``
            context); the model is unchanged.
        CalibrationDataError: the calibration data is empty, a batch has the
            wrong type, or the model raised on a batch (``CalibrationBatchError``, naming
            it); the model is unchanged (as after any failure of the fit).
    """
    _require_type("model", model, nn.Module)
    if not dry_run and any(isinstance(m, nn.parallel.DistributedDataParallel) for m in _wrapper_chain(model)):
        raise ConfigError(
            "hanify: the model is wrapped in DistributedDataParallel, which registered its parameters when it was "
            "built: the new blocks' gradients would not be averaged across processes. Call hanify(ddp.module) and "
            "wrap the result again (accelerate: hanify before accelerator.prepare)"
        )
    model = unwrap_model(model)
    config = config if config is not None else HanConfig()
    _require_type("config", config, HanConfig)
    if calibration_config is not None:
        _require_type("calibration_config", calibration_config, CalibrationConfig)
    if calibration_config is not None and calibration is None:
        raise ConfigError("hanify: calibration_config given without calibration data (calibration=batches)")
    if calibration is not None and dry_run:
        raise ConfigError("hanify: dry_run=True plans without touching the model; it cannot calibrate")
    if calibration is None:
        return _rewrite(model, config, filter_fn, dry_run, None, None)
    calibration_config = calibration_config if calibration_config is not None else CalibrationConfig()
    cuda = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # the caller's generators come back as they were
        # Seed only the generators the new blocks draw from, and that fork_rng restores: torch.manual_seed would
        # also (lazily) reseed every other accelerator's generator and leave it so.
        torch.default_generator.manual_seed(calibration_config.seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(calibration_config.seed)
        return _rewrite(model, config, filter_fn, dry_run, calibration, calibration_config)


def _rewrite(
    model: nn.Module,
    config: HanConfig,
    filter_fn: FilterFn | None,
    dry_run: bool,
    calibration: Iterable[Any] | None,
    calibration_config: CalibrationConfig | None,
) -> HanifyReport:
    """:func:`hanify` once its arguments are checked (``model`` unwrapped)."""
    rules = resolve_rules(config.rules)
    params_before = count_parameters(model)
    matches, han_paths = _discover(model, rules)
    report = HanifyReport(
        params_before=params_before, params_after=params_before, dry_run=dry_run, han_modules_found=len(han_paths)
    )
    if not matches:
        if han_paths:
            return report  # already hanified: idempotent no-op
        raise NothingToRewriteError(
            f"hanify: no rule recognises any module of {type(model).__name__} "
            f"(rules tried: {[r.name for r in rules]}). Register one with han_surgery.register_rule "
            "or check HanConfig.rules."
        )
    _check_patterns(config, model, [c.path for c, _ in matches], han_paths)

    modules = dict(model.named_modules(remove_duplicate=False))  # every path of a shared module too
    originals = {id(m) for m in modules.values()}
    aliases = _aliases(model)
    planned: list[tuple[RewriteRecord, Replacement]] = []
    claimed: set[str] = set()
    for cand, rule in matches:
        reason = None
        if config.include and not any(match_pattern(p, cand.path) for p in config.include):
            reason = "not matched by HanConfig.include"
        elif any(match_pattern(p, cand.path) for p in config.exclude):
            reason = f"excluded by {[p for p in config.exclude if match_pattern(p, cand.path)][0]!r}"
        elif filter_fn is not None and not _call_filter(filter_fn, cand):
            reason = "filter_fn returned False"
        elif cand.parent is None:
            reason = "the model itself is the FFN: wrap it in a parent module to replace it"
        if reason is None:
            try:
                repl = rule.builder(cand, config)
            except SkipCandidate as e:
                reason = str(e)
            except Exception as e:
                raise HanifyError(
                    f"rule {rule.name!r} failed on {cand.path!r} ({type(cand.module).__name__}): {e!r}. "
                    "Nothing was swapped: the model is unchanged."
                ) from e
            if reason is None and not (
                isinstance(repl, Replacement) and all(isinstance(m, nn.Module) for m in repl.swaps.values())
            ):
                raise HanifyError(
                    f"rule {rule.name!r} on {cand.path!r} returned {type(repl).__name__}, not a Replacement of "
                    "modules (or raise SkipCandidate to leave the candidate); model unchanged"
                )
            if reason is None and config.residual == "drop" and "residual" not in rule.changes:
                # the rule's own reason, where it gives one (it raised SkipCandidate above), is the better message
                reason = (
                    f"HanConfig.residual='drop' not possible: rule {rule.name!r} does not change residuals (it is "
                    "registered without changes=('residual',)); use HanConfig.residual='keep'"
                )
        if reason is not None:
            report.skipped.append(SkipRecord(cand.path, rule.name, reason))
            continue
        for path in repl.swaps:
            if not rule.changes and path != cand.path and not path.startswith(cand.path + "."):
                raise HanifyError(
                    f"rule {rule.name!r} on {cand.path!r} replaces {path!r}, outside the candidate, but declares "
                    "changes=() (register it with changes=('norm', ...) to touch neighbours); model unchanged"
                )
            if path not in modules or not path:
                raise HanifyError(
                    f"rule {rule.name!r} on {cand.path!r} wants to replace {path!r}, which is not a sub-module; model unchanged"
                )
        problem = next(
            (
                why if p == cand.path else f"{p}: {why}"
                for p, new in repl.swaps.items()
                if (why := call_signature_problem(modules[p], new))
            ),
            None,
        )
        problem = problem or _shared_elsewhere(cand, list(repl.swaps), aliases, modules)
        if problem is not None:
            report.skipped.append(SkipRecord(cand.path, rule.name, problem))
            continue
        shared = {p: [a for a in aliases[id(modules[p])] if a != p] for p in repl.swaps}
        shared = {p: others for p, others in shared.items() if others}
        clash = next(
            (
                p
                for p in repl.swaps
                if p in claimed or _under(p, claimed) or any(c.startswith(p + ".") for c in claimed)
            ),
            None,
        )
        if clash is not None:
            report.skipped.append(
                SkipRecord(cand.path, rule.name, f"would replace {clash!r}, which an earlier rewrite already replaces")
            )
            continue
        claimed.update(repl.swaps)
        claimed.update(a for others in shared.values() for a in others)
        for path, new in repl.swaps.items():
            for part in new.modules():  # a model in eval() stays in eval(): no dropout switched on
                if id(part) not in originals:  # a module of the model that the rule reuses keeps its own mode
                    part.training = modules[path].training
            ref = _reference_tensor(modules[path])
            ref = ref if ref is not None else _reference_tensor(cand.module)
            if ref is not None:
                _check_placement(model, rule, cand, path, new, originals, ref, dry_run)
                _place_new_parts(new, originals, ref)
        neighbours = dict(repl.neighbours)
        if shared:
            neighbours["shared"] = "; ".join(
                f"{p} is shared with {', '.join(others)}: rewritten once, the replacement is shared too"
                for p, others in shared.items()
            )
        record = RewriteRecord(
            path=cand.path,
            rule=rule.name,
            params_before=count_parameters(modules[p] for p in repl.swaps),
            params_after=count_parameters(repl.swaps.values()),
            swapped=[*repl.swaps, *(a for others in shared.values() for a in others)],
            neighbours=neighbours,
            stream=getattr(getattr(repl, "site", None), "stream_path", None),
        )
        alias_swaps = {a: repl.swaps[p] for p, others in shared.items() for a in others}
        planned.append((record, dataclasses.replace(repl, swaps={**repl.swaps, **alias_swaps})))

    report.rewrites = [rec for rec, _ in planned]
    if dry_run or not planned:
        report.params_after = _params_after_swaps(model, planned)
        return report

    calibration_record: dict | None = None
    if calibration is not None:
        from .calibration import calibrate_rewrites

        calibration_config = calibration_config if calibration_config is not None else CalibrationConfig()
        report.calibration, kept_indices = calibrate_rewrites(model, planned, calibration, calibration_config)
        kept = set(kept_indices)
        for index in sorted(kept):  # in model order
            record = planned[index][0]
            reason = next(b.reason for b in report.calibration.blocks if b.path == record.path)
            report.skipped.append(SkipRecord(record.path, record.rule, f"{KEPT_BY_CALIBRATION}: {reason}"))
        planned = [entry for index, entry in enumerate(planned) if index not in kept]
        report.rewrites = [rec for rec, _ in planned]
        calibration_record = calibration_config.to_dict()
    else:
        _swap_all(model, planned)
    _mark_swapped_in(planned, originals)  # a later hanify leaves them alone, whatever their class
    report.params_after = count_parameters(model)
    if not report.rewrites:  # calibration kept every block: the model is as it was, no step to record
        return report
    rewrites = tuple(RewriteEntry(r.path, r.rule, tuple(r.swapped), dict(r.neighbours)) for r in report.rewrites)
    record_step(model, RecipeStep(config, rewrites, calibration=calibration_record))
    for hook in _HANIFY_HOOKS:
        hook(model)
    _warn_dropped_hooks(modules, planned)  # last: under warnings-as-errors, the step is complete and recorded
    _warn_library_part(model)
    return report


def _warn_library_part(model: nn.Module) -> None:
    """Warn when ``model`` is a part of a timm or transformers model (a ``BertEncoder``, a timm ``Block``) rather
    than the model: the step is recorded on the part only, so the model holding it saves with its library's API
    as if it had not changed (its folder loads with the original FFNs, random, or not at all)."""
    library = type(model).__module__.partition(".")[0]
    if library not in ("timm", "transformers") or BaseModelSpec.of(model).library is not None:
        return
    if library == "timm" and callable(getattr(model, "get_classifier", None)):  # a model built by its class, as any
        return  # custom module (timm's pretrained_cfg comes from create_model)
    warnings.warn(
        f"hanify: {type(model).__name__} is a part of a {library} model, not the model itself; the step is recorded "
        "on this part only, so the model that holds it saves (save_pretrained, save_for_hf, push_to_hub) as if it "
        "had not been rewritten. Hanify the whole model instead: HanConfig(include=...) / exclude=... pick the blocks",
        stacklevel=4,  # the caller of hanify (-> _rewrite -> here)
    )


_HANIFY_HOOKS: list[Callable[[nn.Module], None]] = []


def register_hanify_hook(hook: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Register ``hook(model)``, called (in registration order) after each ``hanify`` step that rewrote
    ``model``, once its recipe has the step; usable as a decorator.

    The library integrations use it so that the libraries' own saving writes a folder that loads
    back hanified: :mod:`han_surgery.integrations.transformers` gives a transformers model its
    ``Hanified<Class>`` (for ``model.save_pretrained``, ``Trainer``, ``push_to_hub``), and
    :mod:`han_surgery.models.hanified` marks a timm model's ``pretrained_cfg`` and ``model_args``
    (for ``timm.models.save_for_hf`` / ``push_to_hf_hub``).
    """
    _HANIFY_HOOKS.append(hook)
    return hook


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _warn_dropped_hooks(modules: Mapping[str, nn.Module], planned: list[tuple[RewriteRecord, Replacement]]) -> None:
    """Warn, per replaced module, about the forward / backward hooks registered on it or its sub-modules (and not on
    a module its replacement reuses): they went with it."""
    seen: set[int] = set()
    for _, repl in planned:
        for path, new in repl.swaps.items():
            old = modules.get(path)
            if old is None or id(old) in seen:  # a shared module: one warning
                continue
            seen.add(id(old))
            reused = {id(m) for m in new.modules()}
            count = sum(
                len(getattr(m, name, None) or {}) for m in old.modules() if id(m) not in reused for name in _HOOK_DICTS
            )
            if count:
                warnings.warn(
                    f"hanify: {count} forward/backward hook(s) registered on {path} or its sub-modules went with the "
                    "replaced module; register them on the new one if they are still needed",
                    stacklevel=4,  # the caller of hanify (-> _rewrite -> here)
                )


def _swap_all(model: nn.Module, planned: list[tuple[RewriteRecord, Replacement]]) -> None:
    """Swap every planned module in; undo them all if one fails."""
    done: list[tuple[str, nn.Module]] = []
    try:
        for _, repl in planned:
            for path, new in repl.swaps.items():
                done.append((path, _set_module(model, path, new)))
    except BaseException:
        for path, old in reversed(done):
            _set_module(model, path, old)
        raise
