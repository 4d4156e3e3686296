"""Model surgery: turn the MLP/FFN blocks of timm and transformers models into Han-blocks.

``hanify(model, HanConfig(...))`` rewrites in place and returns a
:class:`HanifyReport`; ``save_pretrained`` / ``from_pretrained`` store and
rebuild the result exactly (the recipe format is in :mod:`.recipe`). Rules live
in :mod:`.rules`, one file per family, and register themselves when imported
(below, as timm's ``models/__init__.py`` registers its models); add your own with
:func:`register_rule`.
"""

from ..errors import HanifyError, NothingToRewriteError, UnsafeCheckpointError
from . import rules  # noqa: F401  (importing the built-in rules registers them)
from .config import HanConfig
from .engine import hanify
from .recipe import Recipe, RecipeStep, recipe_of
from .registry import Candidate, Replacement, Rule, SkipCandidate, get_rule, list_rules, register_rule, unregister_rule
from .report import HanifyReport, RewriteRecord, SkipRecord
from .serialization import from_pretrained, save_pretrained

__all__ = [
    "HanConfig",
    "HanifyReport",
    "HanifyError",
    "NothingToRewriteError",
    "RewriteRecord",
    "SkipRecord",
    "Candidate",
    "Replacement",
    "Rule",
    "SkipCandidate",
    "Recipe",
    "RecipeStep",
    "recipe_of",
    "hanify",
    "register_rule",
    "unregister_rule",
    "get_rule",
    "list_rules",
    "save_pretrained",
    "from_pretrained",
    "UnsafeCheckpointError",
]
