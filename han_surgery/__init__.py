"""han-surgery: Householder (Han) layers for timm and Hugging Face models.

Yu & Zhang, "A Lightweight and Gradient-Stable Neural Layer", Neural Networks 2024.

Importing the package registers the Han models with timm (``timm.create_model("han_mobilevit_xs")``),
the built-in surgery rules, and the loaders of hanified checkpoints: timm's ``"hanified"`` entry point
and transformers' ``AutoConfig`` / ``AutoModel*`` classes (:mod:`han_surgery.integrations`); it imports
neither the fine-tuning stack nor the paper experiments.
"""

from . import integrations, models  # noqa: F401  (register han_* and "hanified" with timm, and the Auto classes)
from .errors import CheckpointError, ConfigError, HanifyError, HanSurgeryError, NothingToRewriteError
from .layers import Abs, HanBlock, HanLayer, HanStack, HouseholderLinear, stack_han_layers
from .loading import load_model
from .surgery import HanConfig, HanifyReport, from_pretrained, hanify, register_rule, save_pretrained
from .utils import count_parameters
from .version import __version__

__all__ = [
    "Abs",
    "HanBlock",
    "HanLayer",
    "HanStack",
    "HouseholderLinear",
    "stack_han_layers",
    "HanConfig",
    "HanifyReport",
    "hanify",
    "register_rule",
    "save_pretrained",
    "from_pretrained",
    "load_model",
    "count_parameters",
    "HanSurgeryError",
    "ConfigError",
    "CheckpointError",
    "HanifyError",
    "NothingToRewriteError",
    "__version__",
]
