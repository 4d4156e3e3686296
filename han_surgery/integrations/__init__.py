"""Hooks into other libraries' loaders, installed by ``import han_surgery``.

* :mod:`.transformers` registers hanified transformers models with transformers' ``AutoConfig``
  and ``AutoModel*`` classes, so ``AutoModel.from_pretrained(dir)`` and ``pipeline(...)`` load them.

(The timm entry point lives with the other timm models, in :mod:`han_surgery.models.hanified`.)
"""

from . import transformers  # noqa: F401  (registers the Auto classes)
