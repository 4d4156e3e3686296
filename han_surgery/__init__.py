"""han-surgery: Householder (Han) layers for timm and Hugging Face models.

Yu & Zhang, "A Lightweight and Gradient-Stable Neural Layer", Neural Networks 2024.
"""

from . import models  # noqa: F401  (registers han_* with timm)
from .layers import Abs, HanBlock, HanLayer, HouseholderLinear
from .surgery import HanConfig, HanifyReport, from_pretrained, hanify, register_rule, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "Abs",
    "HanBlock",
    "HanLayer",
    "HouseholderLinear",
    "HanConfig",
    "HanifyReport",
    "hanify",
    "register_rule",
    "save_pretrained",
    "from_pretrained",
    "__version__",
]
