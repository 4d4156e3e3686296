"""timm models with pretrained weights, failing fast and clearly when the weights cannot be had.

``timm.create_model(name, pretrained=True)`` downloads the weights from the Hugging Face Hub (or reads
them from its cache). Without network it retries for about a minute and ends with a raw
``LocalEntryNotFoundError``. :func:`create_timm_model` checks first: weights in the local cache are
used as they are; otherwise the Hub's host must answer within a few seconds, or
:class:`HubUnavailableError` says so in one line, with what to do.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

from torch import nn

from .errors import ConfigError, HanSurgeryError

__all__ = ["HubUnavailableError", "hub_reachable", "create_timm_model"]

WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class HubUnavailableError(HanSurgeryError, OSError):
    """Pretrained weights are neither in the local cache nor reachable on the Hub."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub's host accepts a TCP connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(hf_hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(hf_hub_id, f), str) for f in WEIGHT_FILES)


def create_timm_model(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)``, with a fast, clear error when the
    pretrained weights are not cached and the Hub cannot be reached.

    Raises:
        ConfigError: ``name`` has a tag timm does not know (``vit_tiny_patch16_224.bogus``), or ``pretrained=True``
            for an architecture timm has no weights for.
        HubUnavailableError: ``pretrained=True`` and the weights cannot be had.
    """
    import timm

    arch, tag = timm.models.split_model_name_tag(name)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag (...)"
        tags = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
        raise ConfigError(f"{name}: timm has no weights tagged {tag!r} for {arch} (its tags: {tags})") from None
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ConfigError(
            f"--pretrained {name}: timm has no pretrained weights for it; leave out --pretrained for random weights, "
            "or pick a name `timm.list_pretrained()` lists"
        )
    hub_id = cfg.hf_hub_id
    where = f"hf-hub:{hub_id}" if hub_id else "timm's download URL"
    if hub_id and not _cached(hub_id) and not hub_reachable():
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise HubUnavailableError(
            f"--pretrained {name}: its weights ({where}) are not in the local Hugging Face cache and the Hub cannot be "
            f"reached{offline}. Run once with network access (the weights are then cached), or pass a local "
            "folder (local-dir:<folder>) instead."
        )
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as e:
        raise HubUnavailableError(f"--pretrained {name}: could not load its weights from {where} ({e})") from None
