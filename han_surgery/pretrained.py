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

from .errors import HanSurgeryError

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
        HubUnavailableError: ``pretrained=True`` and the weights cannot be had.
    """
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
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
