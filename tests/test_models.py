"""Han-MobileViT and Han-Mixer: registered with timm, built the timm way, counts pinned."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.mlp_mixer import MixerBlock
from timm.models.vision_transformer import Block
from torch import nn

import han_surgery  # noqa: F401  (registers han_* with timm)
from han_surgery import ConfigError
from han_surgery.layers import HanBlock, HanLayer
from han_surgery.models import HanMixerBlock
from han_surgery.surgery.modules import ResidualFree

MIXERS_32 = [
    "han_mixer_m0h0_32",
    "han_mixer_m2h0_32",
    "han_mixer_m4h0_32",
    "han_mixer_m0h16_32",
    "han_mixer_m1h16_32",
    "han_mixer_m2h16_32",
    "han_mixer_m4h16_32",
]
MIXERS_224 = ["han_mixer_s16_224", "han_mixer_b16_224"]
MOBILEVITS = ["han_mobilevit_xxs", "han_mobilevit_xs", "han_mobilevit_s"]
ALL = MIXERS_32 + MIXERS_224 + MOBILEVITS

# Parameters at the default config (pretrained=False), measured with timm 1.0.31 and pinned
# here; model_cards/MODELS.md lists them with MACs and the base models.
PARAMS = {
    "han_mixer_m0h0_32": 1_821_706,
    "han_mixer_m2h0_32": 2_893_066,
    "han_mixer_m4h0_32": 3_964_426,
    "han_mixer_m0h16_32": 1_858_570,
    "han_mixer_m1h16_32": 2_394_250,
    "han_mixer_m2h16_32": 2_929_930,
    "han_mixer_m4h16_32": 4_001_290,
    "han_mixer_s16_224": 5_358_192,
    "han_mixer_b16_224": 11_176_048,
    "han_mobilevit_xxs": 1_025_528,
    "han_mobilevit_xs": 1_763_784,
    "han_mobilevit_s": 4_129_944,
}
BASE = {"han_mobilevit_xxs": "mobilevit_xxs", "han_mobilevit_xs": "mobilevit_xs", "han_mobilevit_s": "mobilevit_s"}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small(name: str, **kwargs):
    """A cheap instance for API tests: 10 classes; Han-Mixers 64 wide (stem 8-16-32-64-64, token MLP 64)
    with at most 4 Han-Mixer blocks.

    MobileViT is run at 64x64 by the tests (timm allows any multiple of 32).
    """
    if name.startswith("han_mixer"):
        han_depth = min(4, int(name.split("h")[-1].split("_")[0]))
        kwargs = dict(dict(embed_dim=64, mlp_ratio=(1.0, 1.0), han_depth=han_depth), **kwargs)
    return timm.create_model(name, num_classes=10, **kwargs)


def test_registered_with_timm():
    assert sorted(timm.list_models("han_*")) == sorted(ALL)
    assert sorted(timm.list_models("han_*", include_tags=True)) == sorted(f"{n}.untrained" for n in ALL)
    cfg = timm.get_pretrained_cfg("han_mixer_m2h16_32")
    assert cfg.input_size == (3, 32, 32) and cfg.num_classes == 10 and cfg.tag == "untrained"


@pytest.mark.parametrize("name", ALL)
def test_parameter_counts_pinned(name):
    assert n_params(timm.create_model(name)) == PARAMS[name]


@pytest.mark.parametrize("name", MOBILEVITS)
def test_mobilevit_count_is_base_minus_mlp_paths(name):
    """Each transformer block loses LN2 and its d->2d->d MLP and gains a 4d Han-block."""
    base = timm.create_model(BASE[name])
    blocks = [m for m in base.modules() if isinstance(m, Block)]
    expected = n_params(base) - sum(n_params(b.norm2) + n_params(b.mlp) - 4 * b.norm2.weight.numel() for b in blocks)
    model = timm.create_model(name)
    assert n_params(model) == expected
    han_blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(han_blocks) == len(blocks) == 9
    for b in han_blocks:
        assert isinstance(b.norm2, nn.Identity) and isinstance(b.mlp, ResidualFree) and isinstance(b.mlp.ffn, HanBlock)
        assert not b.mlp.ffn.final_abs


def test_mixer_counts_follow_the_paper_structure():
    """k MLP blocks of (token 64->64->64, channel 512->512->512, 2 LN), m Han blocks of 4 (64 + 512)."""
    stem_only = PARAMS["han_mixer_m0h0_32"]
    mlp_block = (2 * 64 * 64 + 2 * 64) + (2 * 512 * 512 + 2 * 512) + 2 * 2 * 512
    han_block = 4 * (64 + 512)
    for name in MIXERS_32:
        k, m = (int(x) for x in name.split("_")[2][1:].split("h"))
        assert PARAMS[name] == stem_only + k * mlp_block + m * han_block, name
    model = timm.create_model("han_mixer_m1h16_32")
    assert sum(isinstance(b, MixerBlock) for b in model.blocks) == 1
    assert sum(isinstance(b, HanMixerBlock) for b in model.blocks) == 16
    assert [m.out_channels for m in model.stem.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 512]


def test_han_mixer_block_math():
    """Token mixing then channel mixing, each |H2 |H1 x + b1| + b2|, no norm, no skip."""
    torch.manual_seed(0)
    block = HanMixerBlock(dim=6, seq_len=5)
    assert not any(isinstance(m, nn.LayerNorm) for m in block.modules())
    x = torch.randn(3, 5, 6)

    def han(b: HanBlock, v):
        h = (v @ b.fc1.to_dense().T + b.fc1.bias).abs()
        return (h @ b.fc2.to_dense().T + b.fc2.bias).abs()

    expected = han(block.mlp_channels, han(block.mlp_tokens, x.transpose(1, 2)).transpose(1, 2))
    torch.testing.assert_close(block(x), expected)
    assert isinstance(block.mlp_channels.fc2, HanLayer)  # the final |.|


def test_hanformer_block_math():
    """In han_mobilevit, a transformer block is x + Attn(LN(x)), then H2 |H1 x + b1| + b2 (no LN2, no residual)."""
    torch.manual_seed(0)
    model = timm.create_model("han_mobilevit_xxs").eval()
    block = model.stages[2][1].transformer[0]
    x = torch.randn(2, 5, block.norm1.weight.numel())
    h = x + block.attn(block.norm1(x))
    han = block.mlp.ffn
    u1, u2 = han.fc1.to_dense(), han.fc2.to_dense()
    expected = (h @ u1.T + han.fc1.bias).abs() @ u2.T + han.fc2.bias
    torch.testing.assert_close(block(x), expected)
    # the Han path has no skip: it is not h + Han(h)
    assert not torch.allclose(block(x), h + expected)


def test_hanformer_block_with_the_residual_kept(tmp_path):
    """The paper's text replaces MobileViT's MLP block one-for-one and is silent on the skip around it:
    ``han_residual=True`` keeps it (x + Han(x)), same parameters, and round-trips through timm's folders."""
    torch.manual_seed(0)
    model = timm.create_model("han_mobilevit_xxs", han_residual=True).eval()
    assert n_params(model) == n_params(timm.create_model("han_mobilevit_xxs"))
    block = model.stages[2][1].transformer[0]
    assert isinstance(block.mlp, HanBlock) and isinstance(block.norm2, nn.Identity)
    x = torch.randn(2, 5, block.norm1.weight.numel())
    h = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), h + block.mlp(h))
    from timm.models import save_for_hf

    save_for_hf(model, str(tmp_path), safe_serialization=True)
    again = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(again(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,img",
    [("han_mixer_m2h16_32", 32), ("han_mixer_m0h0_32", 32), ("han_mobilevit_xxs", 64)],
)
def test_timm_api(name, img):
    torch.manual_seed(0)
    model = small(name, in_chans=1).eval()
    x = torch.randn(2, 1, img, img)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # forward = forward_head(forward_features)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats), out)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    # reset_classifier: new head, and num_classes=0 gives pooled features
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    # global_pool='' (no classifier) keeps the spatial / token axes: (B, C, H, W) or (B, N, C)
    unpooled = small(name, global_pool="", in_chans=1)
    unpooled.reset_classifier(0)
    unpooled.eval()
    tokens_or_map = unpooled(x)
    assert tokens_or_map.dim() in (3, 4) and tokens_or_map.shape[0] == 2


@pytest.mark.parametrize("name,img,n_out", [("han_mixer_m2h16_32", 32, 3), ("han_mobilevit_xxs", 64, 5)])
def test_features_only(name, img, n_out):
    model = small(name, features_only=True).eval()
    feats = model(torch.randn(2, 3, img, img))
    assert len(feats) == n_out == len(model.feature_info.channels())
    for f, c, r in zip(feats, model.feature_info.channels(), model.feature_info.reduction()):
        assert f.shape[:2] == (2, c) and f.shape[-1] == img // r


def test_img_size_must_fit_the_stem():
    with pytest.raises(ValueError, match="img_size 30 must be a multiple of the stem's stride 4"):
        timm.create_model("han_mixer_m2h16_32", img_size=30)
    # an input of another size is refused as by timm's PatchEmbed (29-31 px went through the ceil-division stem)
    model = timm.create_model("han_mixer_m0h16_32", num_classes=10)
    for size in (30, 64):
        with pytest.raises(AssertionError, match=rf"Input height \({size}\) doesn't match model \(32\)"):
            model(torch.randn(1, 3, size, size))


def test_cnn_stem_strides_that_do_not_give_the_mixers_grid_are_refused():
    """A 3x3 conv of stride 4 pads by 2, so (1, 2, 1, 4) maps 64 px to a 9x9 grid, not 8x8: the model built with
    64-token Mixer blocks and failed on its first forward; a stride of 0 was a ZeroDivisionError."""
    from han_surgery.models.han_mixer import ConvStem

    with pytest.raises(ValueError, match=r"stem_strides \(1, 2, 1, 4\) give a \(9, 9\) token grid .* not the \(8, 8\)"):
        timm.create_model("han_mixer_m2h16_32", stem_strides=(1, 2, 1, 4), img_size=64)
    for strides in [(1, 0, 1, 1), (1, 2.0, 1, 1), ()]:
        with pytest.raises(ValueError, match="stem_strides must be one or more positive integers"):
            timm.create_model("han_mixer_m2h16_32", stem_strides=strides)
    stem = ConvStem(32, embed_dim=64, strides=(1, 2, 1, 4))  # by itself, its grid is what its convs give
    assert stem.grid_size == (5, 5) and stem(torch.randn(1, 3, 32, 32)).shape == (1, stem.num_patches, 64)
    model = timm.create_model("han_mixer_m0h16_32", stem_strides=(1, 2, 2, 2), img_size=96, num_classes=3).eval()
    assert model.stem.grid_size == (12, 12) and model(torch.randn(1, 3, 96, 96)).shape == (1, 3)  # the STL-10 stem


def test_han_mobilevit_refuses_more_reflections_than_a_stage_is_wide():
    """``han_reflections=100`` on XXS (widths 64 / 80 / 96) built a dense MobileViT-XXS, its MLP blocks skipped."""
    with pytest.raises(ConfigError, match=r"han_reflections=100 leaves 9 MLP block\(s\) dense .*at most 64"):
        timm.create_model("han_mobilevit_xxs", han_reflections=100)
    with pytest.raises(ConfigError, match=r"han_reflections=65 leaves 2 MLP block\(s\) dense \(stages\.2\.1"):
        timm.create_model("han_mobilevit_xxs", han_reflections=65)
    model = timm.create_model("han_mobilevit_xxs", han_reflections=64)
    assert all(isinstance(m, HanBlock) for n, m in model.named_modules() if n.endswith("mlp.ffn"))


def test_features_only_without_blocks_fails_clearly():
    with pytest.raises(ValueError, match="han_mixer_m0h0_32: features_only needs at least one"):
        timm.create_model("han_mixer_m0h0_32", features_only=True)


@pytest.mark.parametrize("name,img", [("han_mixer_m1h16_32", 32), ("han_mobilevit_xxs", 64)])
def test_grad_checkpointing_same_gradients(name, img):
    torch.manual_seed(0)
    model = small(name).train()
    x = torch.randn(2, 3, img, img)

    def grads():
        model.zero_grad()
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing is True
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and any(".u" in n for n in plain)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], msg=n)


@pytest.mark.parametrize("name,img", [("han_mixer_m1h16_32", 32), ("han_mobilevit_xxs", 64)])
def test_trains_one_step(name, img):
    """Gradients are finite; every Han parameter gets a non-zero gradient and moves in one SGD step."""
    torch.manual_seed(0)
    model = small(name).train()
    nn.init.normal_(model.get_classifier().weight, std=0.02)  # timm's Mixer head starts at zero
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, img, img), torch.randint(0, 10, (4,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    han = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, HanBlock) for pn, _ in m.named_parameters()}
    assert han and any(n.endswith(".u") for n in han)
    for n in han:
        assert model.get_parameter(n).grad.abs().sum() > 0, n
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved >= han | {n for n in before if n.startswith(("head", "norm."))}


def test_224_mixers_build_on_timm_mlp_mixer():
    from timm.models import MlpMixer

    model = timm.create_model("han_mixer_s16_224", num_classes=5).eval()
    assert isinstance(model, MlpMixer) and model.stem.num_patches == 196
    assert [type(b).__name__ for b in model.blocks] == ["MixerBlock"] * 2 + ["HanMixerBlock"] * 16
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)


@pytest.mark.parametrize("argument", ["mlp_depth", "han_depth"])
@pytest.mark.parametrize("value", [-5, 2.5, True])
def test_han_mixer_depths_are_checked(argument, value):
    """A negative depth built a model with fewer blocks than it said (and misled the features_only guard); 2.5 was
    a bare TypeError from ``range``."""
    from han_surgery import ConfigError
    from han_surgery.models import HanMixer

    message = f"HanMixer {argument} must be an int >= 0, got {value!r}"
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        HanMixer(**{argument: value}, stem_type="cnn", img_size=32, embed_dim=64)
    for features_only in (False, True):
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            timm.create_model("han_mixer_m2h16_32", features_only=features_only, **{argument: value})
