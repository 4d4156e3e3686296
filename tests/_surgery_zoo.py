"""Tiny models (built from configs, no download) for the surgery tests: name -> (build, inputs, expected rewrites)."""

from __future__ import annotations

import timm
import torch
import transformers as T
from timm.models import metaformer, mlp_mixer
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


BERTLIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
LLM = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    vocab_size=100,
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


def _seq2seq_inputs():
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
        _seq2seq_inputs,
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
        _seq2seq_inputs,
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=1,
        num_heads=2,
        vocab_size=100,
        feed_forward_proj="gated-gelu",
    ),
    "hf/bart": _hf(T.BartConfig, T.BartModel, 2, _seq2seq_inputs, **SEQ2SEQ),
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
