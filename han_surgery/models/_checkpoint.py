"""Checkpoint checks shared by the Han timm models.

timm calls a model's ``pretrained_filter_fn`` on every checkpoint it loads (``pretrained=True``
from the Hub, a ``local-dir:``, or ``pretrained_cfg_overlay=dict(file=...)``) before
``load_state_dict``. :func:`checkpoint_filter_fn` uses that hook to refuse a checkpoint of
another architecture with one message that names the model, the offending keys and shapes and
what to do, instead of torch's long list of missing/unexpected keys.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["checkpoint_filter_fn"]

_SHOW = 5


def _as_tuple(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _short(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def _with_shared_names(state_dict: dict[str, Tensor], model: nn.Module, expected: dict[str, Any]) -> dict[str, Tensor]:
    """``state_dict`` with every name of a tensor the model shares under several names (a block reachable
    at two paths): safetensors stores a shared tensor once, under one of them, and ``load_state_dict``
    wants them all."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if name in expected:
            names_of.setdefault(id(tensor), []).append(name)
    filled = dict(state_dict)
    for names in names_of.values():
        stored = next((n for n in names if n in state_dict), None)
        for name in names if stored is not None and len(names) > 1 else ():
            filled.setdefault(name, state_dict[stored])
    return filled


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module, strict: bool = True) -> dict[str, Tensor]:
    """Return ``state_dict`` unchanged if it fits ``model``, else raise a ``ValueError`` saying why.

    The classifier (``pretrained_cfg["classifier"]``) and the first conv
    (``pretrained_cfg["first_conv"]``) are not checked: timm re-initialises the former when
    ``num_classes`` differs and adapts the latter when ``in_chans`` differs. With ``strict=False``
    (``create_model(..., pretrained_strict=False)``) missing and unexpected keys pass, as
    ``load_state_dict(strict=False)`` lets them; shapes that differ never do.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(model).__name__
    skip = _as_tuple(cfg.get("classifier")) + _as_tuple(cfg.get("first_conv"))

    def checked(key: str) -> bool:
        return not any(key == s or key.startswith(s + ".") for s in skip)

    expected = model.state_dict()
    state_dict = _with_shared_names(state_dict, model, expected)
    missing = [k for k in expected if k not in state_dict and checked(k)] if strict else []
    unexpected = [k for k in state_dict if k not in expected and checked(k)] if strict else []
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and checked(k) and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return state_dict

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_short(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_short(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({_short(shapes)})")
    hint = "Load it with the architecture it was saved from (the 'architecture' field of its config.json)"
    dense = not any(k.endswith(".u") for k in state_dict)  # not a Han model's checkpoint of another depth or width
    if (
        dense
        and any(k.endswith(".u") for k in missing)
        and any(k.endswith(".weight") and ".mlp" in k for k in unexpected)
    ):
        hint = (
            "This looks like a dense (non-Han) checkpoint: build its base timm model, load the weights "
            "there, then convert that model with han_surgery.hanify (for Han-MobileViT: "
            "hanify(model, han_surgery.models.hanformer_config()))"
        )
    raise ValueError(f"{arch}: the checkpoint does not fit this architecture: {'; '.join(problems)}. {hint}.")
