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
   skipped too. Any other exception aborts the call with :class:`HanifyError`:
   nothing has been swapped yet.
3. **swap** -- ``setattr`` every planned module (undone if a swap fails).
   With ``calibration=`` data, the swaps happen one block at a time and each
   new block is fitted to the block it replaces before the next one is swapped
   in (:mod:`han_surgery.surgery.calibration`); a failure undoes every swap.

A model in which no rule recognises anything (and which holds no Han module)
raises :class:`NothingToRewriteError`. If candidates exist but every one is
skipped, the report is returned with zero rewrites and the reasons.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .config import HanConfig, match_pattern
from .modules import HAN_MODULE_TYPES
from .registry import Candidate, Replacement, Rule, SkipCandidate, resolve_rules
from .report import HanifyReport, RewriteRecord, SkipRecord

__all__ = ["hanify", "HanifyError", "NothingToRewriteError", "RECIPE_ATTR"]

RECIPE_ATTR = "_han_surgery_recipe"
"""Attribute set on the model: the list of hanify steps applied (used by ``save_pretrained``)."""

FilterFn = Callable[[nn.Module, str], bool]


class HanifyError(RuntimeError):
    """A rule failed while planning; the model was left exactly as it was."""


class NothingToRewriteError(ValueError):
    """No registered rule recognises any module of the model."""


def _count(modules: Iterable[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


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
                names = candidate_paths or [n for n, _ in model.named_modules() if n]
                raise ValueError(
                    f"HanConfig.{kind} pattern {pattern!r} matches no candidate block. "
                    f"Near names: {_near(pattern, names)}. Candidates: {candidate_paths[:8]}"
                    f"{' ...' if len(candidate_paths) > 8 else ''} (globs match whole names; prefix 're:' for a regex)"
                )


def hanify(
    model: nn.Module,
    config: HanConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    dry_run: bool = False,
    calibration: Iterable[Any] | None = None,
    calibration_config: Any | None = None,
) -> HanifyReport:
    """Replace the MLP/FFN blocks of ``model`` by Han-blocks ``H2 |H1 x + b1| + b2``, in place.

    Args:
        model: any ``nn.Module`` (a timm model, a transformers ``PreTrainedModel``, your own).
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

    Returns:
        A :class:`HanifyReport` (``print`` it for a table); with calibration,
        ``report.calibration`` holds the per-block fit.

    Raises:
        NothingToRewriteError: no rule recognises any module (and no Han module is present).
        ValueError: an include/exclude pattern matches no candidate (the message lists near names).
        HanifyError: a rule failed; the model is unchanged.
        CalibrationDataError: the calibration data is empty or a batch has the
            wrong type; the model is unchanged (as after any failure of the fit).
    """
    config = config if config is not None else HanConfig()
    if calibration_config is not None and calibration is None:
        raise ValueError("hanify: calibration_config given without calibration data (calibration=batches)")
    if calibration is not None and dry_run:
        raise ValueError("hanify: dry_run=True plans without touching the model; it cannot calibrate")
    rules = resolve_rules(config.rules)
    params_before = _count([model])
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

    modules = dict(model.named_modules())
    planned: list[tuple[RewriteRecord, Replacement]] = []
    claimed: set[str] = set()
    for cand, rule in matches:
        reason = None
        if config.include and not any(match_pattern(p, cand.path) for p in config.include):
            reason = "not matched by HanConfig.include"
        elif any(match_pattern(p, cand.path) for p in config.exclude):
            reason = f"excluded by {[p for p in config.exclude if match_pattern(p, cand.path)][0]!r}"
        elif filter_fn is not None and not filter_fn(cand.module, cand.path):
            reason = "filter_fn returned False"
        elif cand.parent is None:
            reason = "the model itself is the FFN: wrap it in a parent module to replace it"
        elif config.residual == "drop" and "residual" not in rule.changes:
            reason = (
                f"residual='drop' not possible: rule {rule.name!r} does not change residuals "
                f"({rule.description or 'see its docstring'}); use residual='keep'"
            )
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
        for path, new in repl.swaps.items():
            ref = _reference_tensor(modules[path])
            ref = ref if ref is not None else _reference_tensor(cand.module)
            if ref is not None:
                new.to(device=ref.device)
                if ref.is_floating_point():
                    new.to(dtype=ref.dtype)
        record = RewriteRecord(
            path=cand.path,
            rule=rule.name,
            params_before=_count(modules[p] for p in repl.swaps),
            params_after=_count(repl.swaps.values()),
            swapped=list(repl.swaps),
            neighbours=dict(repl.neighbours),
            stream=getattr(getattr(repl, "site", None), "stream_path", None),
        )
        planned.append((record, repl))

    report.rewrites = [rec for rec, _ in planned]
    if dry_run or not planned:
        report.params_after = (
            params_before - sum(r.params_before for r in report.rewrites) + sum(r.params_after for r in report.rewrites)
        )
        return report

    step: dict[str, Any] = {}
    if calibration is not None:
        from .calibration import CalibrationConfig, calibrate_rewrites

        calibration_config = calibration_config if calibration_config is not None else CalibrationConfig()
        report.calibration, kept = calibrate_rewrites(model, planned, calibration, calibration_config)
        for index in reversed(kept):
            record = planned[index][0]
            reason = next(b.reason for b in report.calibration.blocks if b.path == record.path)
            report.skipped.append(SkipRecord(record.path, record.rule, f"kept by calibration: {reason}"))
            del planned[index]
        report.rewrites = [rec for rec, _ in planned]
        step["calibration"] = calibration_config.to_dict()
    else:
        _swap_all(model, planned)
    report.params_after = _count([model])
    recipe = list(getattr(model, RECIPE_ATTR, []))
    recipe.append(
        {
            "config": config.to_dict(),
            "rewrites": [
                {"path": r.path, "rule": r.rule, "swapped": r.swapped, "neighbours": r.neighbours}
                for r in report.rewrites
            ],
            **step,
        }
    )
    object.__setattr__(model, RECIPE_ATTR, recipe)
    return report


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
