"""Model surgery: turn the MLP/FFN blocks of timm and transformers models into Han-blocks.

``hanify(model, HanConfig(...))`` rewrites in place and returns a
:class:`HanifyReport`; ``save_pretrained`` / ``from_pretrained`` store and
rebuild the result exactly. Rules live in :mod:`.rules`, one file per family;
add your own with :func:`register_rule`.
"""

from .config import HanConfig
from .engine import HanifyError, NothingToRewriteError, hanify
from .registry import Candidate, Replacement, Rule, SkipCandidate, get_rule, list_rules, register_rule, unregister_rule
from .report import HanifyReport, RewriteRecord, SkipRecord
from .serialization import UnsafeCheckpointError, from_pretrained, save_pretrained

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
    "hanify",
    "register_rule",
    "unregister_rule",
    "get_rule",
    "list_rules",
    "save_pretrained",
    "from_pretrained",
    "UnsafeCheckpointError",
]
