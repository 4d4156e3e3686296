"""Recording a module's inputs on calibration batches, with a bounded token sample.

:class:`TokenReservoir` keeps a uniform random sample of at most ``capacity``
rows of a stream of ``(m, d)`` chunks (Vitter's Algorithm R, vectorised per
chunk), so memory is ``capacity x d`` floats whatever the amount of data.
:func:`record_inputs` runs the model on each batch with a forward pre-hook on
one module, feeds that module's input tokens to a reservoir and stops the
forward right there (nothing after the module runs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import HanSurgeryError

__all__ = ["TokenReservoir", "call_model", "record_inputs", "CalibrationDataError", "CalibrationBatchError"]


class CalibrationDataError(HanSurgeryError, TypeError):
    """A calibration batch is of a type the model cannot be called with, or there were no batches."""


_HOW_CALLED = (  # (batch type, how it is called and what to check)
    (
        Mapping,
        "a dict batch is called as model(**batch): its keys must be the model's arguments and its values inputs "
        "it takes (token ids within the vocabulary)",
    ),
    ((tuple, list), "a tuple/list batch is called as model(*batch): pass inputs only, not (inputs, labels)"),
    (Tensor, "a tensor batch is called as model(batch): it must be an input the model takes (shape, dtype)"),
)


class CalibrationBatchError(CalibrationDataError):
    """The model raised on a calibration batch; its exception is the ``__cause__``.

    ``index`` is the batch's position in ``hanify(calibration=...)``, set by the calibration (which
    knows the whole list; ``None`` for a batch it made itself, e.g. one with tokens replaced).
    """

    def __init__(self, batch: Any, error: BaseException, index: int | None = None, hint: str = "") -> None:
        super().__init__(batch, error)
        self.batch, self.error, self.index, self.hint = batch, error, index, hint

    def __str__(self) -> str:
        which = f"calibration batch {self.index}" if self.index is not None else "a calibration batch"
        hint = self.hint or next((how for kind, how in _HOW_CALLED if isinstance(self.batch, kind)), "")
        return f"the model raised {type(self.error).__name__} on {which}: {self.error} ({hint})"


class TokenReservoir:
    """A uniform random sample of at most ``capacity`` rows from a stream of ``(m, d)`` chunks.

    Every row seen so far is in the sample with the same probability
    ``min(1, capacity / seen)`` (Algorithm R). Which rows are kept depends only
    on the number of rows seen and on ``generator``, never on their values: two
    reservoirs with the same seed fed chunks of the same sizes keep the same
    positions.

    Args:
        capacity: the most rows kept.
        generator: the source of randomness (a seeded ``torch.Generator``).
    """

    def __init__(self, capacity: int, generator: torch.Generator | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"TokenReservoir: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.generator = generator
        self.seen = 0
        self._rows: Tensor | None = None
        self._filled = 0

    def add(self, rows: Tensor) -> None:
        """Offer ``rows`` (shape ``(m, d)``) to the sample; they are copied, detached, to float32 on CPU."""
        rows = rows.detach()
        m = rows.shape[0]
        if m == 0:
            return
        if self._rows is None:
            self._rows = torch.empty(self.capacity, rows.shape[1], dtype=torch.float32)
        elif rows.shape[1] != self._rows.shape[1]:
            raise ValueError(f"TokenReservoir: rows have {rows.shape[1]} features, earlier rows {self._rows.shape[1]}")
        take = min(self.capacity - self._filled, m)
        if take:
            self._rows[self._filled : self._filled + take] = rows[:take].float().cpu()
            self._filled += take
        if take < m:
            # Row number i (0-based over the stream) replaces slot r ~ U{0..i} if r < capacity.
            index = torch.arange(self.seen + take, self.seen + m, dtype=torch.float64)
            u = torch.rand(m - take, generator=self.generator, dtype=torch.float64)
            slot = (u * (index + 1)).long()
            hit = slot < self.capacity
            if hit.any():
                slots, sources = slot[hit], torch.nonzero(hit).squeeze(1) + take
                # Later rows win a slot drawn twice in one chunk, as in the sequential algorithm.
                winner = torch.full((self.capacity,), -1, dtype=torch.long)
                winner.scatter_reduce_(0, slots, sources, reduce="amax")
                keep = winner >= 0
                self._rows[keep] = rows[winner[keep]].float().cpu()
        self.seen += m

    @property
    def sample(self) -> Tensor:
        """The sampled rows, ``(min(seen, capacity), d)`` float32."""
        if self._rows is None:
            return torch.empty(0, 0)
        return self._rows[: self._filled]


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}  # a plain dict: model(**batch) takes any mapping
    if isinstance(batch, (tuple, list)):
        moved = [_move(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # a namedtuple: by field
    return batch


def call_model(model: nn.Module, batch: Any, device: torch.device | None = None) -> Any:
    """Call ``model`` on one calibration batch: a dict as ``model(**batch)``, a tuple or list as
    ``model(*batch)``, a tensor as ``model(batch)`` (tensors moved to ``device``).

    Raises:
        CalibrationBatchError: the model raised on the batch (chained: its exception is the cause).
    """
    try:  # moving rebuilds the batch: a tuple type whose constructor refuses that is the batch's error too
        moved = _move(batch, device) if device is not None else batch
        if isinstance(moved, Mapping):
            return model(**moved)
        if isinstance(moved, (tuple, list)):
            return model(*moved)
        if isinstance(moved, Tensor):
            return model(moved)
    except (HanSurgeryError, _StopForward):  # raised by our own hooks
        raise
    except Exception as err:
        hint = ""
        decoder_keys = ("decoder_input_ids", "decoder_inputs_embeds", "labels")
        # a missing input is a ValueError naming input_ids / inputs_embeds (T5: "You must specify exactly one of
        # input_ids or inputs_embeds", about the decoder's); other errors keep the hint of how the batch was called
        missing_input = isinstance(err, ValueError) and any(
            word in str(err) for word in ("input_ids", "inputs_embeds", "decoder")
        )
        if (
            missing_input
            and getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            and not (isinstance(batch, Mapping) and any(k in batch for k in decoder_keys))
        ):
            hint = (
                "an encoder-decoder model's decoder needs inputs too: "
                "han_surgery.surgery.calibration.with_decoder_inputs(batches, model) adds them"
            )
        raise CalibrationBatchError(batch, err, hint=hint) from err  # the caller's batch, not the moved copy
    raise CalibrationDataError(
        f"calibration batch of type {type(batch).__name__}: expected a dict (called as model(**batch)), "
        "a tuple/list (model(*batch)) or a tensor (model(batch))"
    )


def token_mask(batch: Any, path: str = "") -> Tensor | None:
    """The ``(B, L)`` boolean mask of real (non-padding) tokens of a transformers-style batch, if it has one: for a
    module under a ``decoder`` (``path``, e.g. ``"decoder.block.0.layer.2"``) of an encoder-decoder model, whose
    batch carries ``decoder_input_ids`` / ``decoder_inputs_embeds``, its ``decoder_attention_mask`` (none if the
    batch has none: the encoder's mask does not describe the decoder's tokens), else its ``attention_mask`` (also
    for decoder-only models whose layers sit under a ``decoder``: OPT, ``BartForCausalLM``)."""
    if not isinstance(batch, Mapping):
        return None
    separate_decoder = any(k in batch for k in ("decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask"))
    under_decoder = "decoder" in path.split(".")
    key = "decoder_attention_mask" if under_decoder and separate_decoder else "attention_mask"
    mask = batch.get(key)
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


def as_rows(x: Tensor, mask: Tensor | None = None, channels_first: bool = False, flat: bool = False) -> Tensor:
    """The tokens of a module input as rows ``(T, d)``.

    ``x`` is ``(..., d)``, or ``(N, d, H, W)`` with ``channels_first``. A ``(B, L)``
    padding mask selects the real tokens of a ``(B, L, d)`` input, or with ``flat`` of a ``(B * L, d)`` one (OPT
    flattens the tokens before its FFN; another 2-D input of as many rows, a vision tower's patches, is not the
    batch's tokens); it is ignored when the shapes do not line up (e.g. a block that sees another sequence).
    """
    if channels_first:
        x = x.movedim(1, -1)
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(device=x.device, dtype=torch.bool)]
    if flat and mask is not None and x.dim() == 2 and x.shape[0] == mask.numel() and mask.dim() == 2:
        return x[mask.reshape(-1).to(device=x.device, dtype=torch.bool)]
    return x.reshape(-1, x.shape[-1])


class _StopForward(Exception):
    """Raised by the recording hook once the module's input is recorded: nothing after it needs to run."""


def _device_of(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    return None


@torch.no_grad()
def record_inputs(
    model: nn.Module,
    batches: Iterable[Any],
    path: str | dict[str, tuple[TokenReservoir, bool] | tuple[TokenReservoir, bool, bool]],
    reservoir: TokenReservoir | None = None,
    *,
    channels_first: bool = False,
    flat_tokens: bool = False,
) -> int:
    """Feed the input tokens of ``model.get_submodule(path)`` on each batch to ``reservoir``.

    With one module the forward stops right after its hook (the rest of the model does
    not run). ``path`` may instead map several module paths to ``(reservoir,
    channels_first[, flat_tokens])``: they are all recorded in one full forward per batch.
    ``flat_tokens``: the module's input is the batch's tokens flattened to ``(B * L, d)`` (see :func:`as_rows`).

    Returns:
        The number of batches run.
    """
    targets = path if isinstance(path, dict) else {path: (reservoir, channels_first, flat_tokens)}
    stop_after = None if isinstance(path, dict) else path
    device = _device_of(model)
    current: dict[str, Any] = {}

    def make_hook(name: str, res: TokenReservoir, cf: bool, flat: bool):
        def hook(_module: nn.Module, args: tuple) -> None:
            if name in current["seen"]:
                return  # a module called twice per forward (shared weights): its first call is recorded
            current["seen"].add(name)
            if not args or not isinstance(args[0], Tensor):
                raise CalibrationDataError(f"calibration: {name} was called without a tensor as its first input")
            res.add(as_rows(args[0], token_mask(current["batch"], name), cf, flat))
            if name == stop_after:
                raise _StopForward

        return hook

    handles = []
    for name, (res, cf, *flat) in targets.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            for handle in handles:
                handle.remove()
            raise CalibrationDataError(
                f"calibration: {type(model).__name__} has no module {name!r} to record the inputs of (a "
                "CalibrationSite's input_path, a path in the rewritten model; where the original model has no module "
                "there, its original_input_path must name the same point in the original model)"
            ) from None
        handles.append(module.register_forward_pre_hook(make_hook(name, res, cf, bool(flat and flat[0]))))
    count = 0
    try:
        for batch in batches:
            current["batch"] = batch
            current["seen"] = set()
            try:
                call_model(model, batch, device)
            except _StopForward:
                pass
            count += 1
    finally:
        for handle in handles:
            handle.remove()
    return count
