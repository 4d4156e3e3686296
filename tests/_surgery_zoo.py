"""Tiny models (built from configs, no download) for the surgery tests: name -> (build, inputs, expected rewrites).

43 timm and 40 transformers architectures of the kinds people fine-tune (vision transformers, hybrids,
MLP models, encoders, decoders, encoder-decoders, audio, mixtures of experts), one custom model for the
structural fallback. Entries built from a model class rather than a registered name (``_cls``) have no
config to rebuild them from: a reload passes the freshly built base model (``from_pretrained(dir, model=...)``).
"""

from __future__ import annotations

import timm
import torch
import transformers as T
from timm.models import focalnet, metaformer, mlp_mixer, nest
from torch import nn

IMG = lambda s=32: {"x": torch.randn(2, 3, s, s)}  # noqa: E731
TOKENS = lambda: {"input_ids": torch.randint(0, 99, (2, 8))}  # noqa: E731
VIT = dict(depth=1, embed_dim=32, num_heads=2, img_size=32, num_classes=5)


def _timm(name, n, size=32, **kw):
    return lambda: (timm.create_model(name, pretrained=False, **kw), IMG(size), n)


def _cls(make, n, size=32):
    return lambda: (make(), IMG(size), n)


def _hf(cfg_cls, model_cls, n, inputs=TOKENS, **kw):
    def build():
        torch.manual_seed(0)
        return model_cls(cfg_cls(**kw)), inputs(), n

    return build


def _auto(model_type, n, inputs=TOKENS, **kw):
    """``AutoModel`` of a transformers model type, from its config with ``kw``."""

    def build():
        torch.manual_seed(0)
        return T.AutoModel.from_config(T.AutoConfig.for_model(model_type, **kw)), inputs(), n

    return build


PIXELS = lambda s=32: lambda: {"pixel_values": torch.randn(2, 3, s, s)}  # noqa: E731
WAVE = lambda: {"input_values": torch.randn(2, 800)}  # noqa: E731


BERTLIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
LLM = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    vocab_size=100,
)
SMALL = {k: v for k, v in BERTLIKE.items() if k != "vocab_size"}
DECODER = dict(LLM, head_dim=16, max_position_embeddings=64)
# SegFormer-style encoders (Mix-FFNs): SegFormer, GLPN
MIX_FFN_ENCODER = dict(
    num_encoder_blocks=2,
    depths=[1, 1],
    sr_ratios=[2, 1],
    hidden_sizes=[16, 32],
    patch_sizes=[7, 3],
    strides=[4, 2],
    num_attention_heads=[1, 2],
    mlp_ratios=[2, 2],
    decoder_hidden_size=16,
)
AUDIO = dict(
    BERTLIKE,
    conv_dim=(16, 16),
    conv_stride=(5, 4),
    conv_kernel=(10, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)
SEQ2SEQ = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    vocab_size=100,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    max_position_embeddings=64,
)


def seq2seq_inputs():
    return {"input_ids": torch.randint(3, 99, (2, 8)), "decoder_input_ids": torch.randint(3, 99, (2, 5))}


def _whisper_inputs():
    return {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": torch.randint(3, 99, (2, 5))}


def _clip_inputs():
    return {"input_ids": torch.randint(0, 99, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32)}


class CustomFFN(nn.Module):
    """An FFN no rule names: only the structural fallback catches it."""

    def __init__(self, d, h):
        super().__init__()
        self.up, self.act, self.down, self.drop = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d), nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.down(self.act(self.up(x))))


class CustomNet(nn.Module):
    def __init__(self, d=16, h=48, depth=2):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList(CustomFFN(d, h) for _ in range(depth))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


ZOO = {
    # timm
    "timm/vit": _timm("vit_tiny_patch16_224", 1, **VIT),
    "timm/deit": _timm("deit_tiny_patch16_224", 1, **VIT),
    "timm/beit": _timm("beit_base_patch16_224", 1, **VIT),
    "timm/cait": _timm("cait_xxs24_224", 2, depth_token_only=1, **VIT),
    "timm/eva_swiglu": _timm(
        "eva02_tiny_patch14_224", 1, size=28, depth=1, embed_dim=32, num_heads=2, img_size=28, num_classes=5
    ),
    "timm/eva_glu": _timm(
        "eva02_tiny_patch14_224",
        1,
        size=28,
        depth=1,
        embed_dim=32,
        num_heads=2,
        img_size=28,
        num_classes=5,
        scale_mlp=False,
    ),
    "timm/swin": _timm(
        "swin_tiny_patch4_window7_224",
        2,
        img_size=32,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=5,
    ),
    "timm/convnext": _timm("convnext_atto", 4, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5),
    "timm/convnext_convmlp": _timm(
        "convnext_atto", 4, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5, conv_mlp=True
    ),
    "timm/poolformer": _cls(
        lambda: metaformer.MetaFormer(
            depths=(1, 1, 1, 1),
            dims=(8, 16, 32, 64),
            num_classes=5,
            token_mixers=metaformer.Pooling,
            mlp_act=nn.GELU,
            norm_layers=timm.layers.GroupNorm1,
        ),
        4,
    ),
    "timm/mobilevit": _timm("mobilevit_xxs", 9, size=32, num_classes=5),
    "timm/gmlp": _cls(
        lambda: mlp_mixer.MlpMixer(
            num_classes=5,
            img_size=32,
            patch_size=16,
            num_blocks=1,
            embed_dim=32,
            mlp_ratio=6,
            mlp_layer=timm.layers.GatedMlp,
            block_layer=mlp_mixer.SpatialGatingBlock,
        ),
        1,
    ),
    "timm/mixer": _cls(
        lambda: mlp_mixer.MlpMixer(num_classes=5, img_size=32, patch_size=16, num_blocks=1, embed_dim=32), 2
    ),
    # the families issue 12 found refused or broken
    "timm/levit": _timm(
        "levit_128s", 5, size=64, img_size=64, embed_dim=(16, 24, 32), key_dim=8, num_heads=(2, 2, 2), depth=(1, 1, 1)
    ),
    "timm/levit_conv": _timm(
        "levit_conv_128s",
        5,
        size=64,
        img_size=64,
        embed_dim=(16, 24, 32),
        key_dim=8,
        num_heads=(2, 2, 2),
        depth=(1, 1, 1),
    ),
    "timm/pvt_v2": _timm("pvt_v2_b0", 4, embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
    "timm/fastvit": _timm("fastvit_t8", 4, layers=(1, 1, 1, 1), embed_dims=(48, 48, 48, 48)),
    "timm/efficientformerv2": _timm(
        "efficientformerv2_s0", 4, size=224, depths=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), num_vit=1
    ),
    "timm/efficientvit": _timm(
        "efficientvit_b0",
        2,
        size=64,
        widths=(8, 16, 32, 64, 128),
        depths=(1, 1, 1, 1, 1),
        head_dim=16,
        head_widths=(64, 80),
    ),
    "timm/mambaout": _timm("test_mambaout", 6, size=64),
    # more vision transformers, hybrids and MLP models
    "timm/deit3": _timm("deit3_small_patch16_224", 1, **VIT),
    "timm/convnextv2": _timm("convnextv2_atto", 4, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
    "timm/mobilevitv2": _timm("mobilevitv2_050", 9, size=64),
    "timm/resmlp": _cls(
        lambda: mlp_mixer.MlpMixer(
            num_classes=5,
            img_size=32,
            patch_size=16,
            num_blocks=1,
            embed_dim=32,
            mlp_ratio=4,
            block_layer=mlp_mixer.ResBlock,
            norm_layer=mlp_mixer.Affine,
        ),
        1,
    ),
    "timm/gmixer": _cls(
        lambda: mlp_mixer.MlpMixer(
            num_classes=5,
            img_size=32,
            patch_size=16,
            num_blocks=1,
            embed_dim=32,
            mlp_ratio=(0.5, 4.0),
            mlp_layer=timm.layers.GluMlp,
            act_layer=nn.SiLU,
        ),
        2,
    ),
    "timm/coat_lite": _timm(
        "coat_lite_tiny", 4, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1), num_heads=8, img_size=32
    ),
    "timm/convit": _timm("convit_tiny", 2, depth=2, local_up_to_layer=1, embed_dim=32, num_heads=2, img_size=32),
    "timm/xcit": _timm("xcit_nano_12_p16_224", 2, depth=1, embed_dim=32, num_heads=2, img_size=32, cls_attn_layers=1),
    "timm/pit": _timm("pit_ti_224", 3, size=64, img_size=64, base_dims=(8, 8, 8), depth=(1, 1, 1), heads=(2, 2, 2)),
    "timm/nest": _cls(
        lambda: nest.Nest(
            img_size=32,
            num_classes=5,
            embed_dims=(16, 24, 32),
            depths=(1, 1, 1),
            num_heads=(1, 2, 2),
            patch_size=2,
            num_levels=3,
        ),
        3,
    ),
    "timm/efficientformer": _timm(
        "efficientformer_l1", 4, size=224, depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_vit=1
    ),
    "timm/edgenext": _timm(
        "edgenext_xx_small", 4, size=64, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), heads=(2, 2, 2, 2)
    ),
    "timm/maxvit": _timm("test_maxvit", 8, size=160),
    "timm/coatnet": _timm("test_coatnet", 3, size=160),
    "timm/tiny_vit": _timm(
        "tiny_vit_5m_224",
        3,
        size=224,
        embed_dims=(8, 16, 24, 32),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 2),
        window_sizes=(7, 7, 14, 7),
    ),
    "timm/davit": _timm(
        "davit_tiny", 8, size=64, depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 2, 2)
    ),
    "timm/focalnet": _cls(lambda: focalnet.FocalNet(num_classes=5, depths=(1, 1, 1, 1), embed_dim=8), 4),
    "timm/hiera": _timm("hiera_tiny_224", 4, size=64, img_size=64, embed_dim=8, num_heads=1, stages=(1, 1, 1, 1)),
    "timm/sequencer": _timm(
        "sequencer2d_s", 4, layers=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), hidden_sizes=(8, 8, 8, 8)
    ),
    "timm/twins": _timm(
        "twins_svt_small",
        4,
        embed_dims=(8, 16, 24, 32),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 2),
        wss=(2, 2, 2, 2),
        sr_ratios=(2, 2, 1, 1),
    ),
    "timm/inception_next": _timm("inception_next_atto", 4, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
    "timm/swinv2_cr": _timm(
        "swinv2_cr_tiny_ns_224", 2, img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)
    ),
    "timm/vit_relpos": _timm("test_vit_relpos", 9, size=64, img_size=64),
    # transformers
    "hf/bert": _hf(T.BertConfig, T.BertModel, 2, **BERTLIKE),
    "hf/roberta": _hf(T.RobertaConfig, T.RobertaModel, 2, pad_token_id=1, **BERTLIKE),
    "hf/electra": _hf(T.ElectraConfig, T.ElectraModel, 2, embedding_size=16, **BERTLIKE),
    "hf/vit": _hf(
        T.ViTConfig,
        T.ViTModel,
        2,
        lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
        image_size=32,
        patch_size=16,
        **{k: v for k, v in BERTLIKE.items() if k != "vocab_size"},
    ),
    "hf/distilbert": _hf(
        T.DistilBertConfig, T.DistilBertModel, 2, dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100
    ),
    "hf/gpt2": _hf(T.GPT2Config, T.GPT2LMHeadModel, 2, n_embd=32, n_layer=2, n_head=2, vocab_size=100),
    "hf/llama": _hf(T.LlamaConfig, T.LlamaForCausalLM, 2, **LLM),
    "hf/mistral": _hf(T.MistralConfig, T.MistralModel, 2, **LLM),
    "hf/qwen2": _hf(T.Qwen2Config, T.Qwen2Model, 2, **LLM),
    "hf/t5": _hf(
        T.T5Config,
        T.T5Model,
        2,
        seq2seq_inputs,
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=1,
        num_heads=2,
        vocab_size=100,
    ),
    "hf/t5_gated": _hf(
        T.T5Config,
        T.T5Model,
        2,
        seq2seq_inputs,
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=1,
        num_heads=2,
        vocab_size=100,
        feed_forward_proj="gated-gelu",
    ),
    "hf/bart": _hf(T.BartConfig, T.BartModel, 2, seq2seq_inputs, **SEQ2SEQ),
    "hf/opt": _hf(
        T.OPTConfig,
        T.OPTModel,
        2,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        vocab_size=100,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    ),
    "hf/whisper": _hf(
        T.WhisperConfig,
        T.WhisperModel,
        2,
        _whisper_inputs,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=16,
        **{k: v for k, v in SEQ2SEQ.items() if k != "max_position_embeddings"},
    ),
    "hf/clip": _hf(
        T.CLIPConfig,
        T.CLIPModel,
        2,
        _clip_inputs,
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=100,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
    ),
    "hf/mobilevit": _hf(
        T.MobileViTConfig,
        T.MobileViTModel,
        9,
        lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
        image_size=32,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
    ),
    "hf/convnext": _hf(
        T.ConvNextConfig,
        T.ConvNextModel,
        2,
        lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_stages=2,
    ),
    "hf/convnextv2": _hf(
        T.ConvNextV2Config,
        T.ConvNextV2Model,
        2,
        lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_stages=2,
    ),
    # the families issue 12 found refused or broken
    "hf/albert": _auto("albert", 1, embedding_size=16, **BERTLIKE),
    "hf/segformer": _auto("segformer", 2, PIXELS(32), **MIX_FFN_ENCODER),
    "hf/mixtral": _auto("mixtral", 2, num_local_experts=4, num_experts_per_tok=2, **DECODER),
    "hf/qwen2_moe": _auto(
        "qwen2_moe",
        4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
        **DECODER,
    ),
    # more encoders, decoders, encoder-decoders, audio and vision models
    "hf/deberta_v2": _auto("deberta-v2", 2, **BERTLIKE),
    "hf/mpnet": _auto("mpnet", 2, **BERTLIKE),
    "hf/esm": _auto("esm", 2, pad_token_id=1, **BERTLIKE),
    "hf/roformer": _auto("roformer", 2, embedding_size=32, **BERTLIKE),
    "hf/gpt_neox": _auto("gpt_neox", 2, **BERTLIKE),
    "hf/gpt_bigcode": _auto("gpt_bigcode", 2, n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64),
    "hf/phi": _auto("phi", 2, **BERTLIKE),
    "hf/gemma2": _auto("gemma2", 2, **DECODER),
    "hf/qwen3": _auto("qwen3", 2, **DECODER),
    "hf/falcon": _auto("falcon", 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=100),
    "hf/mbart": _auto("mbart", 2, seq2seq_inputs, **SEQ2SEQ),
    "hf/pegasus": _auto("pegasus", 2, seq2seq_inputs, **SEQ2SEQ),
    "hf/mt5": _auto("mt5", 2, seq2seq_inputs, d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=100),
    "hf/wav2vec2": _auto("wav2vec2", 2, WAVE, **AUDIO),
    "hf/ast": _auto(
        "audio-spectrogram-transformer",
        2,
        lambda: {"input_values": torch.randn(2, 32, 16)},
        num_mel_bins=16,
        max_length=32,
        patch_size=8,
        frequency_stride=8,
        time_stride=8,
        **SMALL,
    ),
    "hf/dinov2": _auto("dinov2", 2, PIXELS(32), image_size=32, patch_size=8, **SMALL),
    "hf/swin": _auto(
        "swin", 2, PIXELS(32), image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4
    ),
    "hf/siglip": _auto("siglip_vision_model", 3, PIXELS(32), image_size=32, patch_size=8, **SMALL),
    # fallback
    "custom/fallback": lambda: (CustomNet(), {"x": torch.randn(2, 5, 4)}, 2),
}


def output_tensor(out) -> torch.Tensor:
    """The first floating tensor of a model output (tensor, ModelOutput or tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    for o in out:
        t = output_tensor(o) if not isinstance(o, torch.Tensor) else o
        if t is not None and t.is_floating_point():
            return t
    return None
