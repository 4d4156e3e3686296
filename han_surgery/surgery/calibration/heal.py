"""Hidden-state distillation: the loss (for a fine-tune loop's ``--distill hidden``) and the short healing run.

Hidden states:

* transformers models return them with ``model(**batch, output_hidden_states=True)``
  (``outputs.hidden_states``: the embeddings, then one per layer);
* any model (timm included): :class:`HiddenStates` records the outputs of
  chosen modules (e.g. ``[f"blocks.{i}" for i in range(depth)]``) with forward hooks;
  :func:`hidden_state_paths` names the ones right after each block ``hanify`` rewrote
  (the same names exist in the original model, the teacher).

For ``finetune --distill hidden``::

    report = hanify(student, config)
    paths = hidden_state_paths(report)
    with HiddenStates(student, paths) as s, HiddenStates(teacher, paths) as t:
        logits = student(**batch)
        with torch.no_grad():
            teacher(**batch)
        loss = task_loss + hidden_state_distillation_loss(s.states, t.states, mask=batch.get("attention_mask"))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ...utils import step_overflows
from .record import CalibrationDataError, as_rows, call_model, token_mask

if TYPE_CHECKING:  # the report module imports this package
    from ..report import HanifyReport

__all__ = [
    "hidden_state_distillation_loss",
    "hidden_state_paths",
    "HiddenStates",
    "heal",
    "TokenReplacer",
    "warmup_cosine",
]


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise TypeError(f"cannot find the hidden-state tensor in a module output of type {type(out).__name__}")


class HiddenStates:
    """Record the outputs of modules of ``model`` (forward hooks), as a context manager.

    ``with HiddenStates(model, ["blocks.0", "blocks.1"]) as hs: model(x)`` leaves
    ``hs.states`` = ``[output of blocks.0, output of blocks.1]`` (the first tensor of
    a tuple output), with the autograd graph attached. Each forward overwrites them.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.model = model
        self.paths = list(paths)
        self._values: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> HiddenStates:
        try:
            for path in self.paths:
                module = self.model.get_submodule(path)
                self._handles.append(module.register_forward_hook(self._hook(path)))
        except BaseException:  # __exit__ does not run when __enter__ raises: no hook may stay on the model
            self.__exit__()
            raise
        return self

    def _hook(self, path: str):
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            self._values[path] = _first_tensor(output)

        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def states(self) -> list[Tensor]:
        missing = [p for p in self.paths if p not in self._values]
        if missing:
            raise RuntimeError(f"HiddenStates: the forward did not run {missing}")
        return [self._values[p] for p in self.paths]


def hidden_state_paths(report: HanifyReport) -> list[str]:
    """The modules whose outputs are the hidden states right after the blocks a :class:`HanifyReport` rewrote
    (``RewriteRecord.stream``, in model order, without repeats; rewrites whose rule does not know it are left out)."""
    return list(dict.fromkeys(r.stream for r in report.rewrites if r.stream))


def hidden_state_distillation_loss(
    student_hidden_states: Sequence[Tensor],
    teacher_hidden_states: Sequence[Tensor],
    layer_map: Sequence[tuple[int, int]] | None = None,
    mask: Tensor | None = None,
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """TinyBERT-style hidden-state distillation: the mean over mapped layers of ``MSE(s, t) / Var(t)``.

    Each term is the squared error summed over features, averaged over tokens,
    divided by the teacher's total variance over those tokens, so every layer
    counts the same whatever the scale of its residual stream (a term of 1 is
    as bad as predicting the teacher's mean).

    Args:
        student_hidden_states, teacher_hidden_states: sequences of tensors
            ``(..., d)`` (e.g. ``outputs.hidden_states`` of a transformers model
            called with ``output_hidden_states=True``, or :class:`HiddenStates`).
        layer_map: ``(student_index, teacher_index)`` pairs; default: pair equal
            indices (the two sequences must then have the same length).
        mask: optional ``(B, L)`` mask of real tokens, for ``(B, L, d)`` states.
        all_reduce: in a data-parallel run, sums a tensor over the processes (e.g.
            ``lambda x: accelerator.reduce(x, "sum")``). The token count and the teacher's
            variance are then those of the whole global batch, and each process's term is
            ``P x`` its tokens' share of the squared error, so that the gradients DDP averages
            over the ``P`` processes, and the mean of their terms, are what one process computes
            on the whole batch.

    Returns:
        A scalar tensor (differentiable with respect to the student's states).
    """
    if layer_map is None:
        if len(student_hidden_states) != len(teacher_hidden_states):
            raise ValueError(
                f"hidden_state_distillation_loss: {len(student_hidden_states)} student and "
                f"{len(teacher_hidden_states)} teacher hidden states; pass layer_map=[(s, t), ...]"
            )
        layer_map = [(i, i) for i in range(len(student_hidden_states))]
    if not layer_map:
        raise ValueError("hidden_state_distillation_loss: no layers to distil")
    pairs = []
    for s_idx, t_idx in layer_map:
        s, t = student_hidden_states[s_idx], teacher_hidden_states[t_idx].detach()
        if s.shape != t.shape:
            raise ValueError(
                f"hidden_state_distillation_loss: student state {s_idx} has shape {tuple(s.shape)}, "
                f"teacher state {t_idx} {tuple(t.shape)}"
            )
        pairs.append((as_rows(s, mask), as_rows(t, mask)))
    if all_reduce is None:
        terms = []
        for s, t in pairs:
            var = (t - t.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
            terms.append((s.float() - t.float()).pow(2).sum(1).mean() / var.float())
        return torch.stack(terms).mean()
    # per layer: token count, per-feature sums and sums of squares of the teacher; then the process count
    local = [torch.cat([t.new_tensor([len(t)], dtype=torch.float64), t.double().sum(0), t.double().pow(2).sum(0)])
             for _, t in pairs]  # fmt: skip
    total = all_reduce(torch.cat([*local, local[0].new_ones(1)]))
    processes = total[-1]
    terms, offset = [], 0
    for (s, t), part in zip(pairs, local, strict=True):
        n, d = total[offset], t.shape[1]
        sums, squares = total[offset + 1 : offset + 1 + d], total[offset + 1 + d : offset + len(part)]
        offset += len(part)
        var = (squares / n - (sums / n).pow(2)).sum().clamp_min(1e-12)
        error = (s.float() - t.float()).pow(2).sum()
        terms.append(error * (processes / (n * var)).float())
    return torch.stack(terms).mean()


class TokenReplacer:
    """Token-replacement augmentation for healing on token-id batches (as TinyBERT augments its distillation data).

    ``replacer(batch)`` returns a copy of ``batch`` (a dict with ``input_ids`` ``(B, L)``
    and, optionally, ``attention_mask``) in which each token is replaced, with
    probability ``rate``, by a token id drawn uniformly from ``vocabulary``. The first
    and the last real token of each sequence (``[CLS]`` / ``[SEP]``, BOS / EOS) and padding
    are never replaced. :meth:`from_batches` takes the vocabulary from the ids the
    calibration batches hold at those replaceable positions, so the altered text uses
    only words of the calibration text.

    Args:
        vocabulary: 1-D tensor of the token ids to draw from.
        rate: the probability that a replaceable token is replaced, in ``[0, 1)``.
        generator: the source of randomness (a seeded ``torch.Generator``).
    """

    def __init__(self, vocabulary: Tensor, rate: float, generator: torch.Generator | None = None) -> None:
        if vocabulary.dim() != 1 or vocabulary.numel() == 0:
            raise ValueError("TokenReplacer: the vocabulary must be a non-empty 1-D tensor of token ids")
        self.vocabulary, self.rate, self.generator = vocabulary, rate, generator

    @staticmethod
    def replaceable(batch: Mapping[str, Any]) -> Tensor:
        """The ``(B, L)`` mask of the positions that may be replaced: real tokens, not the first or last of a row."""
        ids = batch["input_ids"]
        mask = token_mask(batch)
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.clone()
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        first = real.long().argmax(1, keepdim=True)  # the first real position of each row (left padding too)
        last = real.long().cumsum(1).argmax(1, keepdim=True)  # and the last
        return real & (positions > first) & (positions < last)

    @classmethod
    def from_batches(
        cls, batches: Sequence[Any], rate: float, generator: torch.Generator | None = None
    ) -> TokenReplacer:
        """A replacer whose vocabulary is every id at a replaceable position of ``batches``.

        Raises:
            CalibrationDataError: no batch has a replaceable token (every sequence two tokens long or less).
        """
        ids = torch.cat([b["input_ids"][cls.replaceable(b)] for b in batches])
        if ids.numel() == 0:
            raise CalibrationDataError(
                "CalibrationConfig.heal_augment replaces tokens between the first and the last of each sequence, but "
                "no calibration sequence has any (each is two tokens long or less): use CalibrationConfig."
                "heal_augment=0, or longer samples"
            )
        return cls(torch.unique(ids).cpu(), rate, generator)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        ids = batch["input_ids"]
        hit = (torch.rand(ids.shape, generator=self.generator) < self.rate).to(ids.device) & self.replaceable(batch)
        draws = torch.randint(len(self.vocabulary), (int(hit.sum()),), generator=self.generator)
        new = ids.clone()
        new[hit] = self.vocabulary[draws].to(device=ids.device, dtype=ids.dtype)
        return {**batch, "input_ids": new}


def warmup_cosine(step: int, *, steps: int, warmup: int) -> float:
    """The learning-rate factor at ``step`` (0-based) of ``steps``: ``(step + 1) / warmup`` for the first
    ``warmup`` steps, then ``(1 + cos(pi * t)) / 2`` with ``t`` going from 0 to 1 over the rest."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def heal(
    model: nn.Module,
    batches: Sequence[Any],
    teacher_states: Sequence[list[Tensor]],
    paths: Sequence[str],
    params: Sequence[nn.Parameter],
    *,
    steps: int,
    lr: float,
    progress: bool = False,
    augment: Callable[[Any], Any] | None = None,
    teacher: nn.Module | None = None,
) -> tuple[float, float]:
    """Train ``params`` (only them) for ``steps`` so that the outputs of ``paths`` match ``teacher_states``.

    ``teacher_states[i]`` holds the original model's outputs of ``paths`` on
    ``batches[i]`` (as token rows, padding removed, see :func:`record.as_rows`).
    With ``augment`` (e.g. a :class:`TokenReplacer`) and ``teacher`` (the original
    model), every other step (the odd ones) trains on ``augment(batch)`` instead, its
    targets computed by running ``teacher`` on it.
    The model runs in eval mode (no dropout); batches are cycled in order. AdamW (no weight
    decay) at ``lr`` after a linear warm-up over the first 5% of the steps, then cosine decay
    (:func:`warmup_cosine`).

    Half-precision parameters (float16, bfloat16) are trained through float32 master copies, as mixed-precision
    training keeps them: AdamW on float16 weights themselves turns them to NaN within a step or two (its ``eps``
    and second moments underflow).

    Returns:
        The mean loss (no augmentation) on the first ``min(steps, len(batches))`` batches before the first step and
        after the last one: two forward passes over them, without gradients.

    Raises:
        CalibrationDataError: an AdamW update overflowed float32 (``lr`` far too high); the weights are then
        partly stepped, and the caller restores them.
    """
    from tqdm.auto import tqdm

    params = list(params)
    half = [p for p in params if p.dtype in (torch.float16, torch.bfloat16)]
    masters = {id(p): p.detach().float() for p in half}
    for master in masters.values():
        master.requires_grad_(True)
    opt = torch.optim.AdamW([masters.get(id(p), p) for p in params], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, steps=steps, warmup=max(1, steps // 20)))
    device = params[0].device
    window = min(steps, len(batches))  # the batches the loss is reported on, before and after
    before = _mean_loss(model, paths, batches[:window], teacher_states[:window], device)
    with HiddenStates(model, paths) as hs, torch.enable_grad():  # hanify may be called under torch.no_grad()
        for step in tqdm(range(steps), desc="healing", disable=not progress, leave=False):
            i = step % len(batches)
            batch = batches[i]
            masks = [token_mask(batch, p) for p in paths]  # a decoder's states: the decoder's mask
            if augment is not None and teacher is not None and step % 2 == 1:
                batch = augment(batch)
                with torch.no_grad(), HiddenStates(teacher, paths) as original:
                    call_model(teacher, batch, device)
                    targets = [as_rows(s, m) for s, m in zip(original.states, masks, strict=True)]
            else:
                targets = [t.to(device) for t in teacher_states[i]]
            loss = _student_loss(model, hs, batch, masks, targets, device)
            opt.zero_grad(set_to_none=True)
            for p in half:
                p.grad = None
            loss.backward()
            for p in half:  # the half-precision gradient onto the master, the stepped master back onto the weight
                masters[id(p)].grad = p.grad.float() if p.grad is not None else None
            if step_overflows(opt):
                raise CalibrationDataError(
                    f"calibration: healing diverged (AdamW's update at step {step + 1} overflowed float32); lower "
                    "CalibrationConfig.heal_lr"
                )
            with torch.no_grad():
                for p in half:
                    p.copy_(masters[id(p)])
            sched.step()
    return before, _mean_loss(model, paths, batches[:window], teacher_states[:window], device)


def _mean_loss(
    model: nn.Module, paths: Sequence[str], batches: Sequence[Any], targets: Sequence[list[Tensor]], device: Any
) -> float:
    """The mean of :func:`hidden_state_distillation_loss` over ``batches`` (no gradients), ``targets[i]`` the
    teacher's states on ``batches[i]``."""
    total = 0.0
    with torch.no_grad(), HiddenStates(model, paths) as hs:
        for batch, target in zip(batches, targets, strict=True):
            masks = [token_mask(batch, p) for p in paths]
            total += _student_loss(model, hs, batch, masks, [t.to(device) for t in target], device).item()
    return total / len(batches)


def _student_loss(
    model: nn.Module,
    hs: HiddenStates,
    batch: Any,
    masks: Sequence[Any],
    targets: Sequence[Tensor],
    device: Any,
) -> Tensor:
    """:func:`hidden_state_distillation_loss` of ``model`` on ``batch``: its states at the paths ``hs`` records, as
    token rows under ``masks``, against the teacher's ``targets``."""
    call_model(model, batch, device)
    student = [as_rows(s, m) for s, m in zip(hs.states, masks, strict=True)]
    return hidden_state_distillation_loss(student, targets)
