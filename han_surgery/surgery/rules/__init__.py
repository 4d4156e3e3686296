"""Built-in rewrite rules, one module per model family (importing registers them)."""

from . import timm_mlp  # noqa: F401
