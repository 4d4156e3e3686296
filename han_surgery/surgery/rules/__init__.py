"""Built-in rewrite rules, one module per model family (importing registers them).

========================  =========================================================================================
module                    family
========================  =========================================================================================
``timm_mlp``              timm ``Mlp``, ``GluMlp``, ``SwiGLU``, ``GatedMlp``, ``ConvMlp``
``timm_levit``            timm LeViT ``LevitMlp`` (Linear/1x1-conv + BatchNorm pairs)
``timm_pvt``              timm PVTv2 ``MlpWithDepthwiseConv`` (a Mix-FFN, ``forward(x, feat_size)``)
``timm_fastvit``          timm FastViT ``ConvMlp`` (depthwise conv, then a 1x1-conv MLP)
``timm_efficientformer``  timm EfficientFormer-V2 ``ConvMlpWithNorm`` (a Mix-FFN on feature maps)
``timm_efficientvit``     timm EfficientViT (MIT): the ``MBConv`` FFN of each block
``timm_mambaout``         timm MambaOut ``GatedConvBlock`` (gated MLP + depthwise conv, a whole block)
``hf_bert``               transformers ``*Intermediate`` + ``*Output`` (BERT, RoBERTa, ELECTRA, MobileViT)
``hf_distilbert``         DistilBERT ``FFN``
``hf_gpt2``               GPT-2 ``GPT2MLP`` (``Conv1D``)
``hf_llama``              gated MLPs (LLaMA, Mistral, Qwen2, Gemma)
``hf_t5``                 T5 ``DenseReluDense`` (plain and gated)
``hf_seq2seq``            inline ``fc1``/``fc2`` layers (BART, Whisper, mBART, Marian, ...)
``hf_convnext``           transformers ConvNeXt / ConvNeXt-V2 layers (inline ``pwconv1``/``pwconv2``)
``hf_mlp``                ``*MLP`` modules with ``fc1``/``fc2`` (CLIP, SigLIP, ViT, DeiT, Dinov2)
``hf_segformer``          Mix-FFNs of SegFormer, PVTv2, GLPN (depthwise conv inside, ``forward(h, height, width)``)
``hf_albert``             ALBERT's shared ``AlbertLayer`` (inline FFN)
``hf_moe``                fused mixture-of-experts experts (Mixtral, Qwen2-MoE, OLMoE, DeepSeek, ...)
``fallback``              the structural fallback for unknown FFNs
========================  =========================================================================================
"""

from ..registry import _freeze_builtin_rules
from . import (  # noqa: F401
    fallback,
    hf_albert,
    hf_bert,
    hf_convnext,
    hf_distilbert,
    hf_gpt2,
    hf_llama,
    hf_mlp,
    hf_moe,
    hf_segformer,
    hf_seq2seq,
    hf_t5,
    timm_efficientformer,
    timm_efficientvit,
    timm_fastvit,
    timm_levit,
    timm_mambaout,
    timm_mlp,
    timm_pvt,
)

_freeze_builtin_rules()
