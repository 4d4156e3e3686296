"""Sequential calibration: swap the planned rewrites in one by one, fitting each to what the original block computed.

Block ``i`` is fitted on the inputs that the already-rewritten (and fitted)
blocks ``0 .. i-1`` produce, as GPTQ quantises layer by layer, so that errors
do not compound unseen. Its target is what the *original* block computes on
those same inputs. Optionally, a short end-to-end healing run then distils the
original model's hidden states into the new parameters.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ConfigError, HanifyError, HanSurgeryError
from ..registry import is_builtin_rule
from .config import CalibrationConfig
from .fit import fit_site, fvu
from .heal import HiddenStates, TokenReplacer, heal
from .record import (
    CalibrationBatchError,
    CalibrationDataError,
    TokenReservoir,
    as_rows,
    call_model,
    record_inputs,
    token_mask,
)
from .report import BlockFit, CalibrationReport
from .site import CalibratedReplacement

__all__ = ["calibrate_rewrites", "check_batches"]


def check_batches(calibration: Iterable[Any]) -> list[Any]:
    """The calibration batches as a list; a clear error if there are none, one has the wrong type, or the data
    source raises while it is read (its error the cause)."""
    if isinstance(calibration, (Tensor, Mapping)):
        raise CalibrationDataError(
            "hanify(calibration=...) takes an iterable of batches (e.g. a list or a DataLoader), "
            f"not a single {type(calibration).__name__}: wrap it in a list"
        )
    try:
        source = iter(calibration)
    except TypeError as e:
        raise CalibrationDataError(
            f"hanify(calibration=...) must be an iterable of batches, got {type(calibration).__name__}"
        ) from e
    batches: list[Any] = []
    try:  # an error of the caller's own data pipeline (a generator, a DataLoader) is not "not an iterable"
        for batch in source:
            batches.append(batch)
    except (HanSurgeryError, MemoryError):
        raise
    except Exception as e:
        raise CalibrationDataError(
            f"hanify(calibration=...): the data source ({type(calibration).__name__}) raised while being read, "
            f"after {len(batches)} batch(es): {e!r}"
        ) from e
    if not batches:
        raise CalibrationDataError("hanify(calibration=...): the calibration data yielded no batch")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (Mapping, tuple, list, Tensor)):
            raise CalibrationDataError(
                f"calibration batch {i} is a {type(batch).__name__}: expected a dict (called as model(**batch)), "
                "a tuple/list (model(*batch)) or a tensor (model(batch))"
            )
    _warn_positional_masks(batches)
    return batches


def _warn_positional_masks(batches: list[Any]) -> None:
    """Warn (once) when a tuple/list batch seems to hold a padding mask: an integer or boolean tensor of 0s and 1s,
    with some 0s, of the shape of the integer ids before it (a ``TensorDataset(ids, mask)``). Padding is known only
    from a dict's ``attention_mask``, so these padding tokens would be fitted on, scored and distilled."""
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            continue
        ids = batch[0]
        if not (isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
            continue
        for k, mask in enumerate(batch[1:], start=1):
            if (
                isinstance(mask, Tensor)
                and mask.shape == ids.shape
                and not mask.is_floating_point()
                and bool(((mask == 0) | (mask == 1)).all())
                and not bool(mask.all())
            ):
                warnings.warn(
                    f"calibration batch {i} is a {type(batch).__name__} whose element {k} looks like a padding mask: "
                    "padding is left out only for dict batches ({'input_ids': ..., 'attention_mask': ...}); these "
                    "padding tokens are fitted on as if they were text. Pass dicts to leave them out",
                    stacklevel=6,  # hanify's caller (-> _rewrite -> calibrate_rewrites -> check_batches -> here)
                )
                return


def _check_token_batches(batches: list[Any]) -> None:
    """heal_augment replaces token ids: every batch must be a dict with a 2-D integer ``input_ids``."""
    for i, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise CalibrationDataError(
                f"CalibrationConfig.heal_augment replaces token ids, but calibration batch {i} has no 2-D integer "
                "'input_ids': use CalibrationConfig.heal_augment=0 for this data"
            )


def _set_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path``; return the module that was there."""
    old = model.get_submodule(path)
    model.set_submodule(path, module, strict=True)
    return old


@contextlib.contextmanager
def _float32(site: Any) -> Iterator[Callable[[Tensor | None], Tensor | None]]:
    """Fit a half-precision site in float32: the half-precision tensors of its modules (the new block, the replaced
    FFN, the post-norm) are float32 for the fit and their own dtype again after it (exact for the ones the fit does
    not change; a module that keeps some weights in float32 keeps them so); yields the cast for rows."""
    modules = [m for m in (site.fitted, site.reference, site.post_norm) if isinstance(m, nn.Module)]
    half = {
        id(t): (t, t.dtype)
        for m in modules
        for t in [*m.parameters(), *m.buffers()]
        if t.dtype in (torch.float16, torch.bfloat16)
    }
    if not half:
        yield lambda x: x
        return
    for t, _ in half.values():
        t.data = t.data.float()
    try:
        yield lambda x: x.float() if x is not None else None
    finally:
        for t, dtype in half.values():
            t.data = t.data.to(dtype)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def _state_rows(model: nn.Module, batches: list[Any], paths: list[str], memory_mb: float) -> list[list[Tensor]]:
    """``model``'s outputs of ``paths`` on the first batches, as float32 CPU token rows (padding removed),
    for as many batches as fit in ``memory_mb``."""
    device = next(model.parameters()).device
    out: list[list[Tensor]] = []
    used = 0
    with HiddenStates(model, paths) as hs:
        for batch in batches:
            call_model(model, batch, device)
            states = [
                as_rows(s, token_mask(batch, p)).detach().float().cpu() for s, p in zip(hs.states, paths, strict=True)
            ]
            used += sum(s.numel() * s.element_size() for s in states)
            if out and used > memory_mb * 2**20:
                break
            out.append(states)
    return out


def _seeded_order(batches: list[Any], seed: int) -> list[Any]:
    """``batches`` in ``seed``'s random order, what the recording and healing subsets are cut from: never a prefix of
    ``batches`` itself, which :func:`~han_surgery.surgery.calibration.calibration_batches` sorts by length."""
    return [batches[i] for i in torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed))]


def _heal_targets(
    model: nn.Module, batches: list[Any], paths: list[str], config: CalibrationConfig
) -> tuple[list[Any], list[list[Tensor]], TokenReplacer | None]:
    """What healing distils from ``model`` (the original, before any swap): the batches it cycles through
    (``batches`` in ``config.seed``'s random order, the first ``heal_batches``, as many as ``heal_memory_mb`` holds
    states for), ``model``'s outputs of ``paths`` on each (:func:`_state_rows`), and the token replacer of
    ``heal_augment`` (``None`` without it)."""
    order = _seeded_order(batches, config.seed)
    heal_set = order if config.heal_batches is None else order[: config.heal_batches]
    teacher = _state_rows(model, heal_set, paths, config.heal_memory_mb)
    heal_set = heal_set[: len(teacher)]
    replacer = None
    if config.heal_augment:
        replacer = TokenReplacer.from_batches(heal_set, config.heal_augment, torch.Generator().manual_seed(config.seed))
    return heal_set, teacher, replacer


def _embedding_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter of ``model``'s ``nn.Embedding`` tables: what ``heal_params="all-but-embeddings"``
    leaves frozen."""
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}


def _output_fvu(model: nn.Module, batches: list[Any], path: str, reference: list[Tensor]) -> float:
    """FVU of ``model``'s output of ``path`` on ``batches`` (token rows), against the ``reference`` rows of each."""
    rows = _state_rows(model, batches[: len(reference)], [path], float("inf"))
    return fvu(torch.cat([r[0] for r in rows]), torch.cat(reference))


def _reservoir(config: CalibrationConfig, index: int) -> TokenReservoir:
    """Block ``index``'s token sample; seeded per block, so a second recording keeps the same positions."""
    return TokenReservoir(config.tokens_per_block, torch.Generator().manual_seed(config.seed + index))


def _site_error(record: Any, detail: str) -> HanifyError:
    """The error of a block whose rule's calibration site is broken: it names the block and the rule."""
    hint = (
        ""
        if is_builtin_rule(record.rule)
        else " (Your rule: its site's reference must take the rows (tokens, d) the fitted module takes, "
        "input_path / original_input_path name modules of the rewritten / original model, and stream_path one of "
        "both.)"
    )
    return HanifyError(
        f"calibration of {record.path!r} failed in the CalibrationSite of rule {record.rule!r}: {detail}. The model "
        f"is unchanged.{hint}"
    )


@contextlib.contextmanager
def _naming_the_block(record: Any) -> Iterator[None]:
    """An exception from a block's fit (a rule's calibration site: its reference, its paths, its fitted module) names
    the block and the rule, as a failing builder does. han-surgery's own errors, and running out of memory (which a
    caller may retry with fewer tokens), pass as they are."""
    try:
        yield
    except (HanSurgeryError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        raise _site_error(record, repr(e)) from e


def _check_site_paths(model: nn.Module, planned: list[tuple[Any, Any]], sites: list[Any], target: str) -> None:
    """Every site's paths name modules, checked before the model runs: ``input_path`` one of the rewritten model,
    ``original_input_path`` (or, for the ``"model"`` target, ``input_path`` without it) one of the original model,
    and ``stream_path`` one of both (healing and ``keep_by="output"`` record it in each)."""
    swaps = {path: new for _, repl in planned for path, new in repl.swaps.items()}

    def rewritten(path: str) -> nn.Module:  # the module at path once every swap is in place
        for at, new in swaps.items():
            if path == at:
                return new
            if path.startswith(at + "."):
                return new.get_submodule(path[len(at) + 1 :])
        return model.get_submodule(path)

    for (record, _), site in zip(planned, sites, strict=True):
        if site is None:
            continue
        checks = [("input_path", site.input_path, "rewritten", rewritten)]
        if site.original_input_path is not None:
            checks.append(("original_input_path", site.original_input_path, "original", model.get_submodule))
        elif target == "model":
            checks.append(("input_path", site.input_path, "original", model.get_submodule))
        if site.stream_path:
            checks += [
                ("stream_path", site.stream_path, "original", model.get_submodule),
                ("stream_path", site.stream_path, "rewritten", rewritten),
            ]
        for name, path, which, find in checks:
            try:
                find(path)
            except AttributeError as e:
                detail = f"its {name} {path!r} names no module of the {which} {type(model).__name__} ({e})"
                if name == "input_path" and which == "original":
                    detail += (
                        "; the 'model' target records the original model's input there: give original_input_path, "
                        "the same point of the original model"
                    )
                raise _site_error(record, detail) from None


def _fit_block(
    model: nn.Module,
    site: Any,
    record_set: list[Any],
    original_rows: TokenReservoir | None,
    config: CalibrationConfig,
    gen: torch.Generator,
    index: int,
) -> tuple[Any, int]:
    """Record one swapped-in block's input rows and fit its site to them: ``(scores, number of rows)``."""
    reservoir = _reservoir(config, index)
    record_inputs(
        model, record_set, site.input_path, reservoir, channels_first=site.channels_first, flat_tokens=site.flat_tokens
    )
    x = reservoir.sample
    if len(x) < 2:
        raise CalibrationDataError(
            f"calibration: {site.input_path} saw {len(x)} token(s) on the calibration batches "
            "(is it on the forward path of these inputs?)"
        )
    ref = next(site.fitted.parameters(), None)
    place = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    x = x.to(**place)
    x_original = original_rows.sample.to(**place) if original_rows is not None else None
    if x_original is not None and x_original.shape != x.shape:
        raise CalibrationDataError(
            f"calibration: {site.input_path} saw {tuple(x.shape)} tokens but the same point of the original "
            f"model {tuple(x_original.shape)}; use CalibrationConfig.target='block'"
        )
    with _float32(site) as to_float32:  # Adam on half-precision weights turns them to NaN at once
        scores = fit_site(
            site,
            to_float32(x),
            steps=config.steps,
            lr=config.lr,
            batch=config.batch_tokens,
            holdout=config.holdout,
            gen=gen,
            start=config.start,
            x_original=to_float32(x_original),
        )
    return scores, len(x)


def _original_inputs(
    model: nn.Module, batches: list[Any], sites: list[Any], config: CalibrationConfig
) -> dict[int, TokenReservoir]:
    """Every site's input in the original model, sampled at the positions its later recording will keep."""
    targets: dict[str, tuple[TokenReservoir, bool, bool]] = {}
    index_of: dict[str, int] = {}
    for index, site in enumerate(sites):
        if site is not None and not site.block_target:  # those are fitted to the block's own output
            path = site.original_input_path or site.input_path
            targets[path] = (_reservoir(config, index), site.channels_first, site.flat_tokens)
            index_of[path] = index
    record_inputs(model, batches, targets)
    return {index_of[path]: res for path, (res, *_) in targets.items()}


def _choose_kept(
    model: nn.Module, planned: list[tuple[Any, Any]], batches: list[Any], config: CalibrationConfig
) -> dict[int, str]:
    """``keep_count``: the indices (into ``planned``) of the blocks to keep, each with the reason.

    One calibration pass (no healing) per block chosen, each on a copy of ``model`` and
    ``planned`` with the blocks chosen so far kept: the fitted block whose swap raised the
    last hidden state's FVU most is chosen next. ``model`` is not touched.
    """
    from tqdm.auto import tqdm

    trial = dataclasses.replace(config, keep_count=None, heal_steps=0, progress=False)
    chosen: dict[int, str] = {}
    count = config.keep_count or 0
    if count > len(planned):
        raise ConfigError(
            f"CalibrationConfig.keep_count={count}: hanify rewrites {len(planned)} block(s) here, so at most "
            f"{len(planned)} can be kept"
        )
    for turn in tqdm(range(count), desc="choosing blocks to keep", disable=not config.progress, leave=False):
        trial_model, trial_planned = copy.deepcopy((model, planned))
        report, _ = calibrate_rewrites(trial_model, trial_planned, batches, trial, chosen=chosen)
        rises = report.output_rises()
        fitted = [i for i, block in enumerate(report.blocks) if block.status == "fitted"]
        if not fitted:  # every block that can be fitted is kept already
            raise ConfigError(
                f"CalibrationConfig.keep_count={count}: only {len(chosen)} of the {len(planned)} block(s) hanify "
                f"rewrites here can be fitted, and so kept (one that cannot be calibrated is replaced as plain hanify "
                f"replaces it); keep at most {len(chosen)}"
            )
        best = max(fitted, key=rises.__getitem__)  # the first of equals
        chosen[best] = (
            f"keep_count: swapping it in raised the last hidden state's FVU by {rises[best]:.3f}, the most of the "
            f"blocks still replaced (choice {turn + 1} of {count})"
        )
    return chosen


def calibrate_rewrites(
    model: nn.Module,
    planned: list[tuple[Any, Any]],
    calibration: Iterable[Any],
    config: CalibrationConfig,
    *,
    chosen: Mapping[int, str] | None = None,
) -> tuple[CalibrationReport, list[int]]:
    """Swap ``planned`` rewrites into ``model`` one by one, fitting each; all or nothing.

    Args:
        model: the model (modified in place; restored exactly if anything fails).
        planned: ``(RewriteRecord, Replacement)`` pairs from the engine's planning phase, in model order.
        calibration: the calibration batches.
        config: the fitting settings.
        chosen: indices (into ``planned``) of blocks to keep as they are, with the reason
            (default: those ``config.keep_count`` chooses).

    Returns:
        The report and the indices (into ``planned``) of the rewrites that were
        kept as original (not swapped in).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if torch.is_inference_mode_enabled():
        raise CalibrationDataError(
            "calibration fits the new blocks with gradients, which torch.inference_mode() forbids: call hanify with "
            "calibration outside it (torch.no_grad() is fine)"
        )
    sites = [repl.site if isinstance(repl, CalibratedReplacement) else None for _, repl in planned]
    _check_site_paths(model, planned, sites, config.target)  # a rule's bug, before the data is read or the model run
    batches = check_batches(calibration)
    report = CalibrationReport(batches=len(batches))
    gen = torch.Generator().manual_seed(config.seed)
    # every module's mode and every parameter's flag, the new blocks' as their rules built them: restored at the end
    everything = [*model.modules(), *(m for _, repl in planned for new in repl.swaps.values() for m in new.modules())]
    modes = {id(m): (m, m.training) for m in everything}
    grad_flags = list({id(p): (p, p.requires_grad) for m in everything for p in m.parameters(recurse=False)}.values())
    original = {id(p) for p in model.parameters()}
    grads_before = {id(p): p.grad for p in model.parameters()}
    order = _seeded_order(batches, config.seed)
    record_set = batches if config.record_batches is None else order[: config.record_batches]
    heal_set: list[Any] = []
    done: list[tuple[str, nn.Module]] = []  # (path, original module) of every swap made, to undo on failure
    kept: list[int] = []
    kept_cost = 0
    fitted_modules: list[nn.Module] = []
    # swapped in without a site: their new parameters (not the original ones they may share), left at their init, are
    # healed as the fitted blocks' are (those the rule left trainable)
    unfitted: list[tuple[BlockFit, list[nn.Parameter]]] = []
    trainable = {id(p) for p, flag in grad_flags if flag}
    snapshot: list[tuple[nn.Parameter, Tensor]] = []
    replacer, augment_teacher = None, None
    if config.heal_steps and config.heal_augment:
        _check_token_batches(batches)
    stream_paths = list(dict.fromkeys(s.stream_path for s in sites if s is not None and s.stream_path))
    if not stream_paths and (config.keep_by == "output" or config.heal_steps):  # both need the hidden states
        if config.keep_by == "output":
            need, instead = (
                "CalibrationConfig.keep_by='output' measures the hidden state after the last rewritten block",
                "CalibrationConfig.keep_by='block'",
            )
        else:
            need, instead = (
                f"CalibrationConfig.heal_steps={config.heal_steps} distils the hidden state after each rewritten block",
                "CalibrationConfig.heal_steps=0",
            )
        paths = ", ".join(repr(record.path) for record, _ in planned[:3]) + (", ..." if len(planned) > 3 else "")
        raise CalibrationDataError(
            f"calibration: {need}, but the rules that rewrite {paths or 'nothing'} do not name it "
            f"(RewriteRecord.stream); use {instead}"
        )
    if chosen is None:
        chosen = _choose_kept(model, planned, batches, config) if config.keep_count else {}
    try:
        for p in model.parameters():  # else the fit's backward adds into the caller's own .grad tensors, in place
            p.grad = None
        model.eval()
        output_ref: list[Tensor] = []  # keep_by="output": the original's last hidden state, per recording batch
        output_fvu = 0.0
        if config.keep_by == "output":
            output_ref = [s[0] for s in _state_rows(model, record_set, stream_paths[-1:], config.heal_memory_mb)]
        teacher = None
        if config.heal_steps and stream_paths:
            heal_set, teacher, replacer = _heal_targets(model, batches, stream_paths, config)
            if config.heal_augment:
                augment_teacher = copy.deepcopy(model)  # the original model: targets of the augmented steps
        originals = _original_inputs(model, record_set, sites, config) if config.target == "model" else {}
        bar = tqdm(planned, desc="calibrating", disable=not config.progress, leave=False)
        for index, ((record, repl), site) in enumerate(zip(bar, sites, strict=True)):
            original_rows = originals.pop(index, None)  # read by this block only: freed after its fit
            fit = BlockFit(record.path, "fitted", params_original=record.params_before, params_han=record.params_after)
            report.blocks.append(fit)
            if index in chosen:  # never swapped in
                kept.append(index)
                fit.status, fit.reason = "kept", chosen[index]
                continue
            swaps = [(path, _set_module(model, path, new)) for path, new in repl.swaps.items()]
            done.extend(swaps)
            for new in repl.swaps.values():  # built in the original's mode: no dropout while the later blocks
                new.eval()  # are recorded, scored and healed (the modes are restored at the end)
            if site is None:
                made = {id(p): p for m in repl.swaps.values() for p in m.parameters()}
                unfitted.append((fit, [p for i, p in made.items() if i not in original and i in trainable]))
                fit.status = "not calibrated"
                fit.reason = getattr(repl, "not_calibrated", "") or "the rule gives no calibration site"
                if output_ref:  # swapped in as built: the blocks after it see (and are charged from) its error
                    fit.output_fvu = output_fvu = _output_fvu(model, record_set, stream_paths[-1], output_ref)
                continue
            # a rule's fitted module may hold the model's own modules (a kept norm): the fit trains the new parameters
            # only, so that keeping the block, or failing, leaves the model's weights as they were
            held = [p for p in site.fitted.parameters() if id(p) in original and p.requires_grad]
            for p in held:
                p.requires_grad_(False)
            try:
                with _naming_the_block(record):  # the rows it draws are freed when it returns
                    scores, tokens = _fit_block(model, site, record_set, original_rows, config, gen, index)
            finally:
                for p in held:
                    p.requires_grad_(True)
            if not all(bool(torch.isfinite(p).all()) for p in site.fitted.parameters()):
                raise CalibrationDataError(
                    f"calibration: the fit of {record.path} diverged (non-finite weights); check the calibration "
                    "batches for inf / NaN, or lower CalibrationConfig.lr"
                )
            fit.fvu, fit.deleted, fit.mean, fit.linear = scores.fit, scores.deleted, scores.mean, scores.linear
            fit.tokens = tokens
            if config.target == "model" and site.block_target:
                fit.reason = f"fitted to the FFN's own output (the 'block' target): {site.block_target}"
            cost_fvu, measure = scores.fit, "Han fit FVU"
            if output_ref:
                fit.output_fvu = _output_fvu(model, record_set, stream_paths[-1], output_ref)
                cost_fvu, measure = fit.output_fvu - output_fvu, "last hidden state's FVU rise"
            if config.max_fvu is not None and cost_fvu > config.max_fvu:
                cost = record.params_before - record.params_after
                if config.keep_budget is None or kept_cost + cost <= config.keep_budget:
                    for path, old in reversed(swaps):
                        _set_module(model, path, old)
                    del done[len(done) - len(swaps) :]
                    kept.append(index)
                    kept_cost += cost
                    fit.status = "kept"
                    fit.reason = f"{measure} {cost_fvu:.3f} > max_fvu {config.max_fvu}"
                    continue
                fit.reason = (
                    f"{measure} {cost_fvu:.3f} > max_fvu, but keeping it would cost {cost:,} parameters; "
                    f"{config.keep_budget - kept_cost:,} left of keep_budget"
                )
            if fit.output_fvu is not None:
                output_fvu = fit.output_fvu
            fitted_modules.append(site.fitted)
        # the new parameters the rule left trainable (the model's own, in a fitted module, heal as heal_params says)
        new_params = {
            id(p): p for m in fitted_modules for p in m.parameters() if id(p) not in original and id(p) in trainable
        }
        new_params.update((id(p), p) for _, ps in unfitted for p in ps)
        if config.heal_steps and teacher is not None and new_params:
            if config.heal_params != "new":  # every parameter the caller left trainable, and the new ones
                frozen = set()
                if config.heal_params == "all-but-embeddings":
                    frozen = _embedding_parameter_ids(model)
                snapshot = [
                    (p, p.detach().clone())
                    for p, flag in grad_flags
                    if flag and id(p) in original and id(p) not in frozen
                ]
                params = list({**{id(p): p for p, _ in snapshot}, **new_params}.values())
            else:
                params = list(new_params.values())
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            report.heal_loss = heal(
                model,
                heal_set,
                teacher,
                stream_paths,
                params,
                steps=config.heal_steps,
                lr=config.heal_lr,
                progress=config.progress,
                augment=replacer,
                teacher=augment_teacher,
            )
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise CalibrationDataError(
                    "calibration: healing diverged (non-finite weights); lower CalibrationConfig.heal_lr, or check "
                    "the calibration batches for inf / NaN"
                )
            for block, ps in unfitted:  # healing trains a block only through a hidden state distilled after it
                if ps:
                    reached = any(p.grad is not None for p in ps)  # the last step's gradients, reset below
                    block.reason += (
                        "; trained by healing only"
                        if reached
                        else "; left at its initialisation: healing distils no hidden state after it"
                    )
            report.heal_steps = config.heal_steps
            report.heal_batches = len(heal_set)
    except BaseException as err:
        for path, old in reversed(done):
            _set_module(model, path, old)
        with torch.no_grad():
            for p, value in snapshot:  # healing with heal_params="all..." had trained them
                p.copy_(value)
        if isinstance(err, CalibrationBatchError) and err.index is None:  # which of the caller's batches
            err.index = next((i for i, batch in enumerate(batches) if batch is err.batch), None)
        raise
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for p in model.parameters():  # the fit's and healing's gradients must not leak into the caller's first step
            p.grad = grads_before.get(id(p))
        for module, training in modes.values():  # not model.train(...): that would set every child alike
            module.training = training
    report.seconds = time.perf_counter() - start
    return report, kept
