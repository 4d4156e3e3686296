"""Han models registered with timm: Han-MobileViT and Han-Mixer (Yu & Zhang, Section 5.3).

Importing this package (``import han_surgery`` does) registers ``han_mobilevit_*`` and
``han_mixer_*`` with timm's registry, so ``timm.list_models("han_*")`` lists them and
``timm.create_model("han_mobilevit_xxs", num_classes=10)`` builds one, the timm way. It also registers
``hanified`` (:mod:`.hanified`), the entry point through which timm loads any hanified timm model
saved by :func:`han_surgery.save_pretrained` (``timm.create_model("local-dir:<dir>", pretrained=True)``).

:class:`TabularNet` is the small MLP / HanNet the fine-tune command trains on numeric CSVs.

The Han modules are registered as leaves of timm's FX tracing (``register_notrace_module``), as timm's own
layers that branch on shapes in ``forward`` are, so ``timm.models.create_feature_extractor`` works on
hanified models.
"""

from timm.layers import register_notrace_module

from ..layers import HanStack, LowRankLinear
from ..surgery.modules import HAN_MODULE_TYPES
from .han_mixer import ConvStem, HanMixer, HanMixerBlock
from .han_mobilevit import HanMobileVit, hanformer_config
from .hanified import hanified
from .tabular import TabularNet

__all__ = ["hanified", "ConvStem", "HanMixer", "HanMixerBlock", "HanMobileVit", "TabularNet", "hanformer_config"]

for _module in (*HAN_MODULE_TYPES, HanStack, LowRankLinear):
    register_notrace_module(_module)
