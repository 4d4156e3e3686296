"""hanify on every supported family, each a tiny model built from its config (no download):
the expected blocks are rewritten, the model still runs forward and backward, saves and reloads
bit for bit, and the norm / residual choices do what the README table says."""

from __future__ import annotations

import pytest
import torch
from _surgery_zoo import ZOO, output_tensor
from torch import nn

from han_surgery import HanBlock, HanConfig, from_pretrained, hanify, save_pretrained
from han_surgery.layers import HouseholderLinear
from han_surgery.surgery.modules import (
    HAN_MODULE_TYPES,
    HanConvMlp,
    HanExperts,
    HanGatedConvBlock,
    HanMixFfn,
    HanMixFfnFeatSize,
    ResidualFree,
)
from han_surgery.surgery.recipe import BaseModelSpec

INLINE_RULES = ("hf.inline_ffn", "hf.convnext", "hf.albert_ffn")  # swap fc1 / act / fc2 inside their layer


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_hanify_family_forward_backward_reload(name, tmp_path):
    torch.manual_seed(0)
    model, inputs, expected = ZOO[name]()
    model.eval()
    with torch.no_grad():
        before = output_tensor(model(**inputs))
    originals = {n: m for n, m in model.named_modules()}

    report = hanify(model)

    assert report.num_rewritten == expected, str(report)
    # only MLPs that are not FFNs (position-bias MLPs inside attention, d -> h -> 1 ones) or fallback guesses are skipped
    not_ffn = ("is square", "not an FFN")
    assert [s for s in report.skipped if s.rule != "fallback.ffn" and not any(w in s.reason for w in not_ffn)] == []
    assert report.params_after == _param_count(model) < report.params_before
    for rec in report.rewrites:
        assert rec.params_after < rec.params_before
        for path in rec.swapped:
            assert model.get_submodule(path) is not originals[path]
        assert isinstance(model.get_submodule(rec.path), HAN_MODULE_TYPES) or rec.rule in INLINE_RULES
    # No dense FFN left where a rewrite happened, and the Han parameters exist.
    han_params = [p for m in model.modules() if isinstance(m, HouseholderLinear) for p in m.parameters()]
    assert han_params

    model.train()
    for n, p in model.named_parameters():  # zero-initialised heads / res-post-norms would zero every gradient
        if not p.any() and (p.dim() > 1 or n.endswith("weight")):
            nn.init.normal_(p, std=0.02)
    out = output_tensor(model(**inputs))
    assert out.shape == before.shape
    out.float().square().mean().backward()
    grads = [p.grad for p in han_params if p.grad is not None]  # (a pooling head's MLP is not on this output's path)
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()  # save and reload (after the training step above changed BatchNorm statistics)
    with torch.no_grad():
        after = output_tensor(model(**inputs))
    save_pretrained(model, tmp_path)
    base = None if BaseModelSpec.of(model).library else ZOO[name]()[0]  # class-built: no config to rebuild from
    loaded = from_pretrained(tmp_path, model=base)
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**inputs)), after)


def _vit_block():
    model, inputs, _ = ZOO["timm/vit"]()
    return model.eval(), inputs


def test_timm_prenorm_dropped_and_residual_kept():
    model, _ = _vit_block()
    block = model.blocks[0]
    hanify(model)
    assert isinstance(block.norm2, nn.Identity) and isinstance(block.mlp, HanBlock)
    x = torch.randn(2, 5, 32)
    x1 = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    torch.testing.assert_close(block(x), x1 + block.mlp(x1))


def test_timm_residual_dropped_is_hanformer():
    model, _ = _vit_block()
    block = model.blocks[0]
    report = hanify(model, HanConfig(residual="drop"))
    assert "dropped" in report.rewrites[0].neighbours["residual"]
    assert isinstance(block.mlp, ResidualFree)
    x = torch.randn(2, 5, 32)
    x1 = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    torch.testing.assert_close(block(x), block.mlp.ffn(x1), atol=1e-6, rtol=0)


def test_timm_keep_norm_and_drop_residual_moves_norm_into_wrapper():
    model, _ = _vit_block()
    block = model.blocks[0]
    norm = block.norm2
    hanify(model, HanConfig(drop_norm=False, residual="drop"))
    assert isinstance(block.norm2, nn.Identity) and block.mlp.norm is norm
    x = torch.randn(2, 5, 32)
    x1 = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    torch.testing.assert_close(block(x), block.mlp.ffn(norm(x1)), atol=1e-6, rtol=0)


def test_mixer_token_mixing_residual_drop():
    model, inputs, _ = ZOO["timm/mixer"]()
    block = model.blocks[0]
    hanify(model, HanConfig(residual="drop"))
    x = torch.randn(2, 4, 32)
    tok = block.mlp_tokens.ffn(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(block(x), block.mlp_channels.ffn(tok), atol=1e-5, rtol=0)


def test_mixer_token_mixing_cannot_keep_norm_and_drop_residual():
    model, _, _ = ZOO["timm/mixer"]()
    report = hanify(model, HanConfig(drop_norm=False, residual="drop"))
    assert [r.path for r in report.rewrites] == ["blocks.0.mlp_channels"]
    (skip,) = report.skipped
    assert skip.path == "blocks.0.mlp_tokens" and "token-mixing" in skip.reason


def test_bert_post_norm_is_kept_and_residual_drop_normalises_han_output():
    model, _, _ = ZOO["hf/bert"]()
    layer = model.encoder.layer[0]
    norm = layer.output.LayerNorm
    report = hanify(model.eval(), HanConfig(residual="drop"))
    assert "post-norm" in report.rewrites[0].neighbours["norm"]
    assert layer.output.LayerNorm is norm
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(layer.feed_forward_chunk(x), norm(layer.intermediate(x)))


def test_bert_residual_kept():
    model, _, _ = ZOO["hf/bert"]()
    layer = model.encoder.layer[0]
    hanify(model.eval())
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(layer.feed_forward_chunk(x), layer.output.LayerNorm(layer.intermediate(x) + x))


def test_llama_residual_drop_gives_han_of_stream():
    model, _, _ = ZOO["hf/llama"]()
    layer = model.model.layers[0]
    report = hanify(model.eval(), HanConfig(residual="drop"))
    assert report.rewrites[0].neighbours["norm"].startswith("post_attention_layernorm")
    assert isinstance(layer.post_attention_layernorm, nn.Identity)
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(x + layer.mlp(x), layer.mlp.ffn(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("timm/beit", "gamma_2"),
        ("timm/convnext", "conv_dw"),
        # the rule's own reason (it was the engine's, quoting the rule's docstring)
        ("hf/bart", "adds its residual inline around fc1/fc2"),
        ("hf/convnext", "residual also spans"),
        ("custom/fallback", "does not know how ModuleList adds its residual"),
    ],
)
def test_residual_drop_refused_with_reason(name, reason):
    model, _, _ = ZOO[name]()
    report = hanify(model, HanConfig(residual="drop"))
    if name == "timm/beit":  # BEiT without layer scale (init_values=None) could drop; the default has gamma_2
        assert model.blocks[0].gamma_2 is not None
    assert report.num_rewritten == 0 and report.skipped
    assert all(reason in s.reason for s in report.skipped if s.rule != "fallback.ffn" or name == "custom/fallback")


def test_whisper_opt_prenorm_dropped_bart_postnorm_kept():
    whisper, _, _ = ZOO["hf/whisper"]()
    opt, _, _ = ZOO["hf/opt"]()
    bart, _, _ = ZOO["hf/bart"]()
    w, o, b = hanify(whisper), hanify(opt), hanify(bart)
    assert all("-> Identity" in r.neighbours["norm"] for r in w.rewrites + o.rewrites)
    assert all("post-norm" in r.neighbours["norm"] for r in b.rewrites)
    assert isinstance(whisper.encoder.layers[0].final_layer_norm, nn.Identity)
    assert isinstance(bart.encoder.layers[0].final_layer_norm, nn.LayerNorm)


def test_options_reach_the_blocks():
    model, _, _ = ZOO["timm/vit"]()
    hanify(model, HanConfig(reflections=3, dropout=0.25, final_abs=True, init="normal", bias_init="zeros"))
    han = model.blocks[0].mlp
    assert han.fc1.reflections == 3 and han.fc1.u.shape == (3, 32)
    assert han.drop1.p == han.drop2.p == 0.25 and han.final_abs
    assert torch.count_nonzero(han.fc1.bias) == 0


def test_config_dropout_is_applied_once_after_each_han_layer_of_a_split_ffn():
    """BERT's ``*Output`` keeps the dropout after the FFN, so the block's own ``drop2`` stays 0 (it was ``p`` too:
    two dropouts in a row, 75% zeros at ``p = 0.5``)."""
    model, _, _ = ZOO["hf/bert"]()
    hanify(model, HanConfig(dropout=0.3))
    layer = model.encoder.layer[0]
    rates = (layer.intermediate.drop1.p, layer.intermediate.drop2.p, layer.output.dropout.p)
    assert rates == (0.3, 0.0, 0.3)


def test_timm_fx_feature_extraction_of_a_hanified_model():
    """timm's FX feature extractor traces around the Han modules (it failed on ``HanBlock``'s shape checks)."""
    from timm.models import create_feature_extractor

    model, inputs, _ = ZOO["timm/vit"]()
    x = inputs["x"]
    hanify(model.eval())
    features = create_feature_extractor(model, return_nodes={"blocks.0": "b0"})
    seen = {}
    model.blocks[0].register_forward_hook(lambda _m, _i, out: seen.update(b0=out))
    with torch.no_grad():
        got = features(x)["b0"]
        model(x)
    torch.testing.assert_close(got, seen["b0"], rtol=0, atol=0)


def test_dtype_is_kept():
    model, _, _ = ZOO["hf/llama"]()
    model.to(torch.bfloat16)
    hanify(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---- the families of issue 12: what the paper's idea becomes there ----


def test_mix_ffn_starts_as_the_papers_block_and_keeps_a_depthwise_conv():
    """SegFormer / PVTv2 / GLPN: H2 |DW(H1 x + b1)| + b2 with DW the identity at first, so exactly H2 |H1 x + b1| + b2."""
    torch.manual_seed(0)
    han = HanMixFfn(16, kernel_size=3)
    x = torch.randn(2, 4 * 6, 16)
    torch.testing.assert_close(han(x, 4, 6), han.fc2(han.fc1(x).abs()), rtol=0, atol=1e-6)
    with torch.no_grad():
        han.dwconv.weight.normal_()  # once trained, the conv mixes neighbouring tokens
    y = han(x, 4, 6)
    assert not torch.allclose(y, han.fc2(han.fc1(x).abs()))
    assert sum(p.numel() for p in han.parameters()) == 4 * 16 + 16 * 9 + 16  # O(n): 4n + a 3x3 depthwise conv


def test_segformer_and_pvt_get_a_mix_ffn_with_their_call_signature():
    model, inputs, _ = ZOO["hf/segformer"]()
    report = hanify(model.eval())
    layer = model.stages[0].blocks[0]
    assert isinstance(layer.mlp, HanMixFfn) and isinstance(layer.layernorm_after, nn.Identity)
    assert all("depthwise 3x3 conv kept" in r.neighbours["dwconv"] for r in report.rewrites)
    with torch.no_grad():  # another resolution: the block takes (hidden_states, height, width)
        model(pixel_values=torch.randn(1, 3, 64, 48))
    pvt, _, _ = ZOO["timm/pvt_v2"]()
    hanify(pvt)
    block = pvt.stages[0].blocks[0]
    assert isinstance(block.mlp, HanMixFfnFeatSize) and isinstance(block.norm2, nn.Identity)
    x = torch.randn(2, 8 * 8, block.mlp.fc1.features)
    torch.testing.assert_close(block.mlp(x, [8, 8]), block.mlp.fc2(block.mlp.fc1(x).abs()), rtol=0, atol=1e-6)


def test_moe_keeps_the_router_and_the_top_k_routing():
    model, inputs, _ = ZOO["hf/mixtral"]()
    moe = model.layers[0].mlp
    router = moe.gate
    h = torch.randn(10, 32)
    with torch.no_grad():
        _, weights, chosen = router(h)
    report = hanify(model.eval())
    assert moe.gate is router and isinstance(moe.experts, HanExperts) and len(moe.experts.experts) == 4
    assert all("same top-k experts" in r.neighbours["router"] for r in report.rewrites)
    with torch.no_grad():
        _, weights2, chosen2 = moe.gate(h)
        assert torch.equal(chosen, chosen2) and torch.equal(weights, weights2)
        expected = torch.stack(
            [sum(weights[t, j] * moe.experts.experts[int(chosen[t, j])](h[t]) for j in range(2)) for t in range(10)]
        )
        torch.testing.assert_close(moe.experts(h, chosen, weights), expected)
        model(**inputs)


def test_levit_mlp_loses_its_batchnorms_and_can_drop_the_residual():
    model, _, _ = ZOO["timm/levit"]()
    report = hanify(model.eval(), HanConfig(residual="drop"))
    assert report.num_rewritten == 5 and all(r.rule == "timm.levit_mlp" for r in report.rewrites)
    block = model.stages[0].blocks[0]
    assert isinstance(block.mlp, ResidualFree) and not any(isinstance(m, nn.BatchNorm1d) for m in block.mlp.modules())
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        x1 = x + block.attn(x)
        torch.testing.assert_close(block(x), block.mlp.ffn(x1), atol=1e-5, rtol=0)


def test_fastvit_keeps_its_depthwise_conv_and_puts_a_han_block_after_it():
    model, _, _ = ZOO["timm/fastvit"]()
    old = model.stages[0].blocks[0].mlp
    conv = old.conv
    hanify(model.eval())
    new = model.stages[0].blocks[0].mlp
    assert isinstance(new, HanConvMlp) and new.conv is conv
    x = torch.randn(2, 48, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(new(x), new.block(conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_mambaout_block_loses_its_gate_and_keeps_token_mixing():
    model, _, _ = ZOO["timm/mambaout"]()
    hanify(model.eval())
    block = next(m for m in model.modules() if isinstance(m, HanGatedConvBlock))
    assert isinstance(block.norm, nn.Identity) and block.residual
    x = torch.randn(2, 4, 4, block.ffn.fc1.features)
    with torch.no_grad():
        flat = x.reshape(2, 16, -1)
        expected = x + block.ls(block.ffn.fc2(block.ffn.fc1(flat).abs())).reshape(x.shape)  # identity conv at first
        torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-6)


def test_a_model_level_relative_position_mlp_is_not_an_ffn():
    """timm's ``vit_srelpos_*`` shares one ``RelPosMlp`` at the model's root: with 2 heads its ``2 -> h -> 2`` MLP
    is square and was rewritten as an FFN (only an ``...Attention...`` ancestor was looked for)."""
    import timm

    model = timm.create_model("vit_srelpos_small_patch16_224", num_heads=2, depth=1, embed_dim=32, img_size=32)
    report = hanify(model)
    assert [r.path for r in report.rewrites] == ["blocks.0.mlp"]
    assert [(s.path, s.reason) for s in report.skipped] == [
        ("shared_rel_pos.mlp", "2 inputs, inside RelPosMlp (shared_rel_pos): a position-bias MLP, not an FFN")
    ]


def _tiny(model_type: str, **kw):
    import transformers as T

    torch.manual_seed(0)
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    return T.AutoModel.from_config(T.AutoConfig.for_model(model_type, **{**base, **kw}))


def test_olmo2_keeps_its_attention_post_norm_and_refuses_residual_drop():
    """OLMo-2 names the attention output's post-norm post_attention_layernorm, as LLaMA names the MLP's pre-norm:
    hanify swapped it for Identity (every output changed), and residual='drop' computed x + norm(Han(x) - x)."""
    model = _tiny("olmo2", num_key_value_heads=2, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    layer = model.layers[0]
    report = hanify(model)
    assert type(layer.post_attention_layernorm).__name__ == "Olmo2RMSNorm"
    assert report.rewrites[0].neighbours["norm"] == "no pre-norm"
    again = _tiny("olmo2", num_key_value_heads=2, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    dropped = hanify(again, HanConfig(residual="drop"))
    assert dropped.num_rewritten == 0 and "post_feedforward_layernorm sits on the branch" in dropped.skipped[0].reason


@pytest.mark.parametrize(
    ("model_type", "kw", "why"),
    [
        ("granite", {"residual_multiplier": 0.5}, "scales the branch by its residual_multiplier (0.5)"),
        ("glm4", {"pad_token_id": 0}, "post_mlp_layernorm sits on the branch"),
    ],
)
def test_a_scaled_or_post_normed_mlp_branch_refuses_residual_drop(model_type, kw, why):
    """Granite adds ``mlp(...) * residual_multiplier`` and GLM-4 ``post_mlp_layernorm(mlp(...))``: residual='drop'
    (``Han(x) - x`` in place of the MLP) computed ``x + m (Han(x) - x)`` or ``x + norm(Han(x) - x)``, reported as
    dropped; and calibration's 'model' target assumed an unscaled ``x + branch``."""
    from han_surgery.surgery.calibration import CalibrationConfig

    dropped = hanify(_tiny(model_type, num_key_value_heads=2, **kw), HanConfig(residual="drop"))
    assert dropped.num_rewritten == 0 and why in dropped.skipped[0].reason
    model = _tiny(model_type, num_key_value_heads=2, **kw)
    batches = [torch.randint(1, 50, (2, 6)) for _ in range(2)]
    config = CalibrationConfig(steps=2, tokens_per_block=16, progress=False)
    (block,) = hanify(model, calibration=batches, calibration_config=config).calibration.blocks
    assert block.status == "fitted" and "(the 'block' target)" in block.reason and why in block.reason
    llama = hanify(_tiny("llama", num_key_value_heads=2), HanConfig(residual="drop"))  # the unscaled control
    assert llama.num_rewritten == 1


@pytest.mark.parametrize(
    ("model_type", "norm"), [("swin", "layernorm_after"), ("audio-spectrogram-transformer", "layernorm_after")]
)
def test_hf_swin_and_ast_drop_their_mlp_pre_norm_like_vit(model_type, norm):
    """Their layers compute x + mlp(layernorm_after(x)) as ViT's do, but were unknown: the pre-norm was kept and
    residual='drop' refused."""
    kw = (
        dict(embed_dim=16, depths=[1], num_heads=[2], image_size=32, patch_size=4, window_size=4)
        if model_type == "swin"
        else {}
    )
    model = _tiny(model_type, **kw) if model_type != "swin" else _swin(kw)
    report = hanify(model)
    assert report.num_rewritten >= 1 and all(r.neighbours["norm"].startswith(norm) for r in report.rewrites)


def _swin(kw):
    import transformers as T

    torch.manual_seed(0)
    return T.SwinModel(T.SwinConfig(**kw))


def test_biogpt_pre_norm_is_dropped():
    """BioGpt applies final_layer_norm before fc1; it was kept as a post-norm (and calibration fitted through it)."""
    report = hanify(_tiny("biogpt", max_position_embeddings=32))
    assert report.rewrites and all(
        r.neighbours["norm"] == "final_layer_norm (pre-norm) -> Identity" for r in report.rewrites
    )


def test_a_dry_run_leaves_a_float32_norm_of_a_bfloat16_model_as_it_was():
    """Planning cast each whole replacement to the model's dtype, the model's own modules it keeps inside (the
    LayerNorm in HanSplitOutput) too: a dry run, or a failed call, turned them to bfloat16."""
    import transformers as T

    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=50)).to(torch.bfloat16)  # fmt: skip
    norm = model.encoder.layer[0].output.LayerNorm.float()
    hanify(model, dry_run=True)
    assert norm.weight.dtype == torch.float32
    hanify(model)
    assert model.encoder.layer[0].output.LayerNorm is norm and norm.weight.dtype == torch.float32
    assert {p.dtype for n, p in model.named_parameters() if "LayerNorm" not in n} == {torch.bfloat16}
