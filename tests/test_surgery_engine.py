"""The hanify engine on bad and edge inputs: skips with reasons, all-or-nothing failures,
pattern errors with near names, idempotence, the registry and the config."""

from __future__ import annotations

import pytest
import torch
from _surgery_zoo import ZOO
from timm.layers import Mlp
from torch import nn

from han_surgery import HanBlock, HanConfig, HanifyReport, hanify, register_rule
from han_surgery.errors import ConfigError
from han_surgery.surgery import (
    HanifyError,
    NothingToRewriteError,
    Replacement,
    SkipCandidate,
    get_rule,
    list_rules,
    registry,
    unregister_rule,
)


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
    )


def _assert_unchanged(model: nn.Module, snap) -> None:
    state, types = snap
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [(n, type(m)) for n, m in model.named_modules()] == types


class TwoMlps(nn.Module):
    def __init__(self, out2: int = 96):
        super().__init__()
        self.a = Mlp(96, 192, 96)
        self.b = Mlp(96, 192, out2)

    def forward(self, x):
        return self.b(x + self.a(x))


def test_non_square_block_is_skipped_with_reason():
    model = TwoMlps(out2=128)
    report = hanify(model)
    assert [r.path for r in report.rewrites] == ["a"]
    (skip,) = report.skipped
    assert skip.path == "b" and skip.rule == "timm.mlp"
    assert "fc1 96 -> 192 -> 128" in skip.reason and "square" in skip.reason
    assert isinstance(model.b, Mlp) and isinstance(model.a, HanBlock)
    assert "square" in str(report)


def test_rule_raising_midway_leaves_model_exactly_as_before():
    model = ZOO["timm/vit"]()[0]
    model.blocks.append(type(model.blocks[0])(dim=32, num_heads=2))
    calls = []

    @register_rule("test.explodes", matcher=Mlp, changes=("norm",), priority=10_000)
    def explode(cand, config):
        calls.append(cand.path)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return Replacement({cand.path: HanBlock(32), cand.qualify("norm2"): nn.Identity()})

    try:
        snap = _snapshot(model)
        with pytest.raises(HanifyError, match=r"test\.explodes.*blocks\.1\.mlp.*boom.*unchanged"):
            hanify(model)
        assert calls == ["blocks.0.mlp", "blocks.1.mlp"]  # the first rewrite was planned, then abandoned
        _assert_unchanged(model, snap)
        assert not hasattr(model, "_han_surgery_recipe")
    finally:
        unregister_rule("test.explodes")
    assert hanify(model).num_rewritten == 2  # and the model is still good for a real run


def test_a_swap_failing_midway_puts_back_every_module_already_swapped(monkeypatch: pytest.MonkeyPatch):
    """Planning succeeded and the swaps began: the third swap fails after two went in (``blocks.0``'s), and every
    module already swapped is put back, the very same objects at every path."""
    from han_surgery.surgery import engine

    model = ZOO["timm/vit"]()[0]
    model.blocks.append(type(model.blocks[0])(dim=32, num_heads=2))
    snap = _snapshot(model)
    before = dict(model.named_modules())
    real_set_module, swaps = engine._set_module, []

    def third_swap_fails(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
        swaps.append(path)
        if len(swaps) == 3:
            raise RuntimeError("swap failed")
        return real_set_module(model, path, module)

    monkeypatch.setattr(engine, "_set_module", third_swap_fails)
    with pytest.raises(RuntimeError, match="swap failed"):
        hanify(model)
    assert swaps[:3] == ["blocks.0.mlp", "blocks.0.norm2", "blocks.1.mlp"]  # two swaps went in before
    _assert_unchanged(model, snap)
    assert dict(model.named_modules()).keys() == before.keys()
    assert all(module is before[path] for path, module in model.named_modules())
    assert not any(isinstance(m, HanBlock) for m in model.modules())
    assert not hasattr(model, "_han_surgery_recipe")
    monkeypatch.undo()
    assert hanify(model).num_rewritten == 2  # and the model is still good for a real run


def test_a_rule_that_returns_no_replacement_or_a_raising_filter_is_a_hanify_error_naming_the_path():
    """A builder returning ``None`` was an ``AttributeError`` without a path; an exception from ``filter_fn`` came out
    bare. Both name the candidate now, and the model is unchanged."""
    model = ZOO["timm/vit"]()[0]
    snap = _snapshot(model)

    @register_rule("test.returns_none", matcher=Mlp, priority=10_000)
    def returns_none(cand, config):
        return None

    try:
        with pytest.raises(
            HanifyError, match=r"test\.returns_none.*blocks\.0\.mlp.*returned NoneType, not a Replacement"
        ):
            hanify(model)
    finally:
        unregister_rule("test.returns_none")
    _assert_unchanged(model, snap)

    def filter_fn(module, path):
        raise KeyError("oops")

    with pytest.raises(HanifyError, match=r"filter_fn raised on 'blocks\.0\.mlp': KeyError\('oops'\).*unchanged"):
        hanify(model, filter_fn=filter_fn)
    _assert_unchanged(model, snap)
    with pytest.raises(ConfigError, match="dry_run=True plans without touching the model"):
        hanify(model, dry_run=True, calibration=[torch.randn(1, 3, 32, 32)])


def test_dry_run_does_not_touch_the_model_and_predicts_the_real_run():
    model = ZOO["hf/bert"]()[0]
    snap = _snapshot(model)
    dry = hanify(model, dry_run=True)
    _assert_unchanged(model, snap)
    assert dry.dry_run and "dry run" in str(dry)
    real = hanify(model)
    assert [(r.path, r.params_before, r.params_after) for r in dry.rewrites] == [
        (r.path, r.params_before, r.params_after) for r in real.rewrites
    ]
    assert dry.params_after == real.params_after == sum(p.numel() for p in model.parameters())


def test_second_call_is_a_no_op():
    model = ZOO["timm/swin"]()[0]
    first = hanify(model)
    snap = _snapshot(model)
    second = hanify(model)
    assert first.num_rewritten == 2
    assert second.num_rewritten == 0 and second.skipped == [] and second.han_modules_found > 0
    assert second.params_before == second.params_after == first.params_after
    _assert_unchanged(model, snap)
    assert "already present" in str(second)


def test_second_call_is_a_no_op_for_a_users_own_replacement_class():
    """A rule matching by name whose replacement is the user's own wrapper (not a Han module type) matched the
    wrapper again on a second call, and its builder failed on it."""

    class Wrapped(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.han = HanBlock(d)

        def forward(self, x):
            return self.han(x)

    @register_rule("test.by_name", matcher="[ab]", priority=10_000)
    def build(cand, config):
        return Replacement({cand.path: Wrapped(cand.module.fc1.in_features)})

    try:
        model = TwoMlps()
        assert hanify(model, HanConfig(rules=["test.by_name"])).num_rewritten == 2
        snap = _snapshot(model)
        again = hanify(model, HanConfig(rules=["test.by_name"]))
    finally:
        unregister_rule("test.by_name")
    assert again.num_rewritten == 0 and again.han_modules_found == 2
    _assert_unchanged(model, snap)


def test_a_later_call_rewrites_an_ffn_a_users_replacement_wraps():
    """What a rule swapped in is not a candidate again, but what it holds still is: here the original FFN inside a
    user's wrapper, which a second call with the built-in rules rewrites (and a saved model with those two steps
    replays)."""

    class Scaled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.scale = inner, nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.inner(x) * self.scale

    register_rule("test.scaled", matcher=Mlp, priority=10_000)(
        lambda cand, config: Replacement({cand.path: Scaled(cand.module)})
    )
    try:
        model = TwoMlps()
        hanify(model, HanConfig(rules=["test.scaled"]))
        report = hanify(model, HanConfig(rules=["timm.*"]))
    finally:
        unregister_rule("test.scaled")
    assert [r.path for r in report.rewrites] == ["a.inner", "b.inner"] and isinstance(model.a.inner, HanBlock)


def test_a_second_call_counts_han_modules_not_the_norms_the_first_dropped():
    model = ZOO["hf/llama"]()[0]
    hanify(model, HanConfig(include=["model.layers.0.*"]))  # the MLP and its pre-norm (-> Identity)
    assert hanify(model, HanConfig(include=["model.layers.1.*"])).han_modules_found == 1
    assert hanify(model).han_modules_found == 2


@pytest.mark.parametrize("name, pattern", [("timm/swin", "layers.0.*"), ("hf/bart", "encoder.layers.0")])
def test_second_call_with_the_same_patterns_is_a_no_op(name, pattern):
    model = ZOO[name]()[0]
    cfg = HanConfig(include=[pattern])
    assert hanify(model, cfg).num_rewritten == 1
    snap = _snapshot(model)
    again = hanify(model, cfg)
    assert again.num_rewritten == 0 and all(s.reason == "not matched by HanConfig.include" for s in again.skipped)
    _assert_unchanged(model, snap)


def test_nothing_to_rewrite_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(NothingToRewriteError, match="no rule recognises"):
        hanify(model)


def test_all_candidates_skipped_gives_explicit_empty_report():
    model = nn.Sequential(Mlp(8, 16, 4))
    report = hanify(model)
    assert report.num_rewritten == 0 and len(report.skipped) == 1
    assert report.params_before == report.params_after
    assert isinstance(model[0], Mlp)


@pytest.mark.parametrize("kind", ["include", "exclude"])
def test_patterns_matching_nothing_list_near_names(kind):
    model = ZOO["timm/vit"]()[0]
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{kind} pattern 'blocks.0.mpl' matches no candidate.*blocks\.0\.mlp"):
        hanify(model, HanConfig(**{kind: ["blocks.0.mpl"]}))
    _assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="matches no candidate") as info:  # nothing near: no empty list
        hanify(model, HanConfig(**{kind: ["zzzz"]}))
    assert "Near names" not in str(info.value) and "Candidates: ['blocks.0.mlp'" in str(info.value)


def test_include_exclude_glob_regex_and_filter_fn():
    build = ZOO["hf/bert"]
    paths = ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    assert [r.path for r in hanify(build()[0], HanConfig(include=["*.layer.1.*"])).rewrites] == paths[1:]
    assert [r.path for r in hanify(build()[0], HanConfig(include=[r"re:encoder\.layer\.0\..*"])).rewrites] == paths[:1]
    report = hanify(build()[0], HanConfig(exclude=["encoder.layer.0.*"]))
    assert [r.path for r in report.rewrites] == paths[1:]
    assert report.skipped[0].reason == "excluded by 'encoder.layer.0.*'"
    seen = []
    report = hanify(
        build()[0], filter_fn=lambda m, name: seen.append((type(m).__name__, name)) or name.endswith("0.intermediate")
    )
    assert seen == [("BertIntermediate", p) for p in paths]
    assert [r.path for r in report.rewrites] == paths[:1]
    assert report.skipped[0].reason == "filter_fn returned False"


def test_rules_selection_and_unknown_rule():
    model = ZOO["custom/fallback"]()[0]
    with pytest.raises(NothingToRewriteError):
        hanify(model, HanConfig(rules=["timm.*"]))
    assert hanify(model, HanConfig(rules=["fallback.ffn"])).num_rewritten == 2
    with pytest.raises(ValueError, match="timm.mlp"):
        hanify(model, HanConfig(rules=["timm.mpl"]))


def test_user_rule_outranks_fallback_and_registry_checks():
    class Gate(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d, d))

        def forward(self, x):
            return torch.tanh(x @ self.w)

    model = nn.Sequential(nn.Linear(4, 8), Gate(8))

    @register_rule("test.gate", matcher=Gate, priority=5)
    def build_gate(cand, config):
        """Gate -> HanBlock."""
        if config.reflections > 4:
            raise SkipCandidate("too many reflections for a Gate")
        return Replacement({cand.path: HanBlock(cand.module.w.shape[0], **config.han_kwargs())}, {"residual": "none"})

    try:
        assert callable(build_gate)  # the decorator returns the builder
        names = [r.name for r in list_rules()]
        assert names.index("test.gate") < names.index("fallback.ffn")
        assert (
            hanify(nn.Sequential(nn.Linear(4, 8), Gate(8)), HanConfig(reflections=5)).skipped[0].reason
            == "too many reflections for a Gate"
        )
        report = hanify(model)
        assert report.rewrites[0].rule == "test.gate" and isinstance(model[1], HanBlock)
        with pytest.raises(ValueError, match="exists already"):
            register_rule("test.gate", matcher=Gate, builder=build_gate)
        with pytest.raises(ValueError, match="subset"):
            register_rule("test.other", matcher=Gate, builder=build_gate, changes=("bias",))
        with pytest.raises(ValueError, match=r"not the string 'norm': write changes=\('norm',\)"):
            register_rule("test.other", matcher=Gate, builder=build_gate, changes="norm")  # type: ignore[arg-type]
        assert "test.other" not in [r.name for r in list_rules()]
        swaps = {"1": HanBlock(8)}  # any mapping; the Replacement holds its own dict
        assert Replacement(swaps).swaps == swaps and Replacement(swaps).swaps is not swaps
    finally:
        unregister_rule("test.gate")


def test_a_built_in_rule_name_cannot_be_taken():
    """override=True replaced timm.mlp; a model saved with the override loaded back, in a process without it,
    rewritten by the built-in rule under the same name: no error, other outputs (0.2 apart in the review's run)."""

    def build(cand, config):
        return Replacement({cand.path: HanBlock(cand.module.fc1.in_features)})

    with pytest.raises(ValueError, match="'timm.mlp' is the name of a built-in rule"):
        register_rule("timm.mlp", matcher=Mlp, builder=build, override=True)
    rule, order = get_rule("timm.mlp"), registry._ORDER["timm.mlp"]
    unregister_rule("timm.mlp")
    try:
        with pytest.raises(ValueError, match="built-in rule"):
            register_rule("timm.mlp", matcher=Mlp, builder=build)
    finally:
        register_rule(
            rule.name, matcher=rule.matcher, builder=rule.builder, changes=rule.changes, priority=rule.priority
        )
        registry._ORDER["timm.mlp"] = order  # its place among the rules of its priority
    assert get_rule("timm.mlp").builder is rule.builder and [r.name for r in list_rules()].count("timm.mlp") == 1
    register_rule("test.mine", matcher=Mlp, builder=build)
    try:  # a user's own rule may still be replaced (a notebook cell run twice)
        register_rule("test.mine", matcher=Mlp, builder=build, override=True)
    finally:
        unregister_rule("test.mine")
    register_rule("test.reused", matcher=Mlp, builder=rule.builder)  # a built-in builder under a name of one's own
    unregister_rule("test.reused")
    register_rule("test.reused", matcher=Mlp, builder=build)  # does not make that name a built-in one
    unregister_rule("test.reused")


def test_declared_changes_are_enforced():
    @register_rule("test.sneaky", matcher=Mlp, priority=10_000)  # changes=(): may not touch neighbours
    def sneaky(cand, config):
        return Replacement({cand.path: HanBlock(96), "b": nn.Identity()})

    model = TwoMlps()
    snap = _snapshot(model)
    try:
        with pytest.raises(HanifyError, match="outside the candidate"):
            hanify(model, HanConfig(include=["a"]))
        _assert_unchanged(model, snap)
        report = hanify(model, HanConfig(residual="drop", rules=["test.sneaky"]))
        assert report.num_rewritten == 0
        assert all("'test.sneaky' does not change residuals" in s.reason for s in report.skipped)
    finally:
        unregister_rule("test.sneaky")


def test_overlapping_rewrites_skip_the_later_one():
    @register_rule("test.grabs_b", matcher="a", changes=("norm",), priority=10_000)
    def grab(cand, config):
        return Replacement({cand.path: HanBlock(96), "b": nn.Identity()}, {"norm": "b -> Identity"})

    model = TwoMlps()
    try:
        report = hanify(model)
    finally:
        unregister_rule("test.grabs_b")
    assert [(r.path, r.rule) for r in report.rewrites] == [("a", "test.grabs_b")]
    assert report.skipped[0].path == "b" and "earlier rewrite" in report.skipped[0].reason
    assert isinstance(model.b, nn.Identity)


def test_builder_touching_a_foreign_path_is_refused():
    @register_rule("test.bad_path", matcher=Mlp, priority=10_000)
    def bad(cand, config):
        return Replacement({"does.not.exist": nn.Identity()})

    model = TwoMlps()
    snap = _snapshot(model)
    try:
        with pytest.raises(HanifyError, match="does.not.exist"):
            hanify(model)
    finally:
        unregister_rule("test.bad_path")
    _assert_unchanged(model, snap)


def test_config_validation_and_round_trip():
    cfg = HanConfig(
        rules=["timm.*"], residual="drop", reflections=2, include="blocks.*", exclude=["re:head.*"], dropout=0.1
    )
    assert cfg.include == ("blocks.*",)
    assert HanConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (
        dict(residual="none"),
        dict(reflections=0),
        dict(init="xavier"),
        dict(dropout=1.5),
        dict(include=["re:("]),
    ):
        with pytest.raises(ValueError):
            HanConfig(**bad)
    with pytest.raises(ValueError, match="unknown fields"):
        HanConfig.from_dict({"residul": "keep"})


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(dropout="0.1"), r"HanConfig.dropout must be None or a finite number in \[0, 1\), got '0.1'"),
        (dict(dropout=float("nan")), "HanConfig.dropout must be None or a finite number"),
        (dict(reflections=True), "HanConfig.reflections must be an int >= 1, got True"),  # bool is an int subclass
        (dict(side_rank=1.0), "HanConfig.side_rank must be an int >= 0"),
        (dict(drop_norm="no"), "HanConfig.drop_norm must be True or False"),
        (dict(include=None), r"HanConfig.include must be a pattern or a list of patterns \(str\), got None \(use \(\)"),
        (dict(exclude=[1]), "HanConfig.exclude must be a pattern or a list of patterns"),
        (dict(rules=3), "HanConfig.rules must be a pattern or a list of patterns"),
    ],
)
def test_config_fields_of_the_wrong_type_are_config_errors_naming_the_field(bad, match):
    with pytest.raises(ConfigError, match=match):
        HanConfig(**bad)


def test_hanify_with_a_dict_for_a_config_says_to_build_the_dataclass():

    model = TwoMlps()
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match=r"config must be a HanConfig, not a dict: pass HanConfig\(\*\*\.\.\.\)"):
        hanify(model, {"reflections": 2})
    with pytest.raises(ConfigError, match="calibration_config must be a CalibrationConfig, not a dict"):
        hanify(model, calibration=[torch.randn(2, 96)], calibration_config={"steps": 2})
    with pytest.raises(ConfigError, match="hanify: model must be a Module, not a NoneType"):
        hanify(None)  # type: ignore[arg-type]  # was "TypeError: 'NoneType' object is not iterable"
    _assert_unchanged(model, snap)
    assert hanify(model, HanConfig(**{"reflections": 2})).num_rewritten == 2


def test_public_annotations_resolve_at_run_time():
    """get_type_hints (pydantic, jsonargparse) failed on HanifyReport: CalibrationReport was imported for type
    checkers only."""
    import typing

    from han_surgery.surgery.calibration import CalibrationConfig, CalibrationReport

    assert typing.get_type_hints(HanifyReport)["calibration"] == CalibrationReport | None
    assert typing.get_type_hints(hanify)["calibration_config"] == CalibrationConfig | None


def test_report_table_and_totals():
    report = hanify(TwoMlps())
    assert isinstance(report, HanifyReport)
    text = str(report)
    assert "timm.mlp" in text and f"{report.params_before:,}" in text and f"{report.params_after:,}" in text
    row = report.rewrites[0]
    assert row.params_before == 2 * 96 * 192 + 192 + 96 and row.params_after == 4 * 96
    assert report.params_before - report.params_after == sum(r.params_before - r.params_after for r in report.rewrites)
    assert report.to_dict()["rewrites"][0]["rule"] == "timm.mlp"


def test_fallback_leaves_a_feed_forward_with_its_own_residual():
    """XLNet's feed-forward module returns ``norm(x + ffn(x))``, its layer's only residual and norm, and
    MobileBERT's FFN layers end in a unit computing ``norm(dense(h) + residual)``: the fallback replaced both with a
    bare Han-block (the residual and norm gone, the report saying "residual: kept"). XLNet's is now skipped with the
    reason; MobileBERT's goes to the BERT rule, which keeps its residual and post-norm."""
    from transformers import MobileBertConfig, MobileBertModel, XLNetConfig, XLNetModel

    torch.manual_seed(0)
    xlnet = XLNetModel(XLNetConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, d_inner=32))
    before = {k: v.clone() for k, v in xlnet.state_dict().items()}
    report = hanify(xlnet)
    assert report.num_rewritten == 0 and type(xlnet.layer[0].ff).__name__ == "XLNetFeedForward"
    (skip,) = report.skipped
    assert skip.path == "layer.0.ff" and "adds its input 'inp'" in skip.reason and "register a rule" in skip.reason
    assert all(torch.equal(v, before[k]) for k, v in xlnet.state_dict().items())
    config = MobileBertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        embedding_size=8, intra_bottleneck_size=16, true_hidden_size=16,
    )  # fmt: skip
    mobile = MobileBertModel(config)
    report = hanify(mobile)
    rows = {r.path: r for r in report.rewrites}
    assert set(rows) == {f"encoder.layer.0.ffn.{i}.intermediate" for i in range(3)}
    assert {r.rule for r in rows.values()} == {"hf.split_ffn"} and all(
        "kept" in r.neighbours["norm"] for r in rows.values()
    )
    assert mobile(torch.randint(0, 50, (2, 5))).last_hidden_state.shape == (2, 5, 16)


def test_fallback_reports_the_norms_it_replaces_with_the_module():
    """A norm of the stream held by the FFN module itself goes with it (a pre-norm, as in vit-pytorch's
    ``Sequential(LayerNorm, Linear, GELU, Linear)``): the report said "unknown parent: left as is"."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))

        def forward(self, x):
            return x + self.ff(x)

    (row,) = hanify(nn.Sequential(Block())).rewrites
    assert row.rule == "fallback.ffn" and row.neighbours["norm"] == "its own 0 (LayerNorm) replaced with it"


def test_fallback_catches_1x1_conv_ffn_but_not_a_depthwise_block():
    class ConvFFN(nn.Module):
        def __init__(self, c=8):
            super().__init__()
            self.fc1, self.bn, self.act, self.fc2 = (
                nn.Conv2d(c, 4 * c, 1),
                nn.BatchNorm2d(4 * c),
                nn.GELU(),
                nn.Conv2d(4 * c, c, 1),
            )

        def forward(self, x):
            return self.fc2(self.act(self.bn(self.fc1(x))))

    class DwFFN(ConvFFN):
        def __init__(self, c=8):
            super().__init__(c)
            self.dw = nn.Sequential(nn.Conv2d(c, c, 7, padding=3, groups=c), nn.BatchNorm2d(c))

    model = nn.Sequential(nn.Conv2d(3, 8, 1), ConvFFN(), DwFFN())
    report = hanify(model)
    assert [(r.path, r.rule) for r in report.rewrites] == [("1", "fallback.ffn")]
    assert type(model[1]).__name__ == "ChannelsFirst" and isinstance(model[2], DwFFN)
    assert model(torch.randn(2, 3, 5, 5)).shape == (2, 8, 5, 5)


def test_fallback_skips_an_ffn_whose_forward_takes_the_residual():
    class AddsResidual(nn.Module):  # like BLOOM's MLP: forward(hidden_states, residual)
        def __init__(self, d=8):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

        def forward(self, x, residual):
            return residual + self.down(self.act(self.up(x)))

    model = nn.Sequential(nn.Linear(2, 8), AddsResidual())
    report = hanify(model)
    assert report.num_rewritten == 0
    assert "forward(x, residual) takes 2 inputs" in report.skipped[0].reason


def test_split_output_without_its_residual_input_names_the_argument():
    """BertOutput(h) says 'missing input_tensor'; after hanify, HanSplitOutput(h) added None to a tensor."""
    from han_surgery.surgery.modules import HanSplitOutput

    out = HanSplitOutput(nn.Dropout(0.0), nn.LayerNorm(4))
    h = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="missing the argument 'input_tensor'"):
        out(h)
    assert torch.equal(out(h, h), nn.functional.layer_norm(2 * h, (4,), out.LayerNorm.weight, out.LayerNorm.bias))
    assert torch.equal(HanSplitOutput(None, None, residual=False)(h), h)


def _vit2() -> nn.Module:
    """The zoo's tiny ViT with two blocks."""
    model = ZOO["timm/vit"]()[0]
    model.blocks.append(type(model.blocks[0])(dim=32, num_heads=2))
    return model


def test_a_replacement_holding_the_models_own_module_marks_nothing():
    """The swapped-in mark was set while planning, on whatever the Replacement held: a rule that "swaps" a module for
    itself marked the model's own module in a dry run (or a call that then failed), and no later call saw it again."""
    register_rule("test.keep", matcher=lambda c: c.path == "blocks.0.mlp", priority=10_000)(
        lambda cand, config: Replacement({cand.path: cand.module})
    )
    register_rule("test.boom", matcher=lambda c: c.path == "blocks.1.mlp", priority=10_000)(
        lambda cand, config: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    model = _vit2()
    mlp = model.blocks[0].mlp
    try:
        hanify(model, HanConfig(include=["blocks.0.mlp"]), dry_run=True)
        assert "_han_surgery_swapped_in" not in vars(mlp)
        with pytest.raises(HanifyError, match="boom"):
            hanify(model)
        assert "_han_surgery_swapped_in" not in vars(mlp)
        hanify(model, HanConfig(include=["blocks.0.mlp"]))  # swapped for itself: an original is never marked
        assert "_han_surgery_swapped_in" not in vars(mlp)
    finally:
        unregister_rule("test.keep")
        unregister_rule("test.boom")
    report = hanify(model)
    assert [r.path for r in report.rewrites] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert isinstance(model.blocks[0].mlp, HanBlock)
    assert all(getattr(m, "_han_surgery_swapped_in", False) for m in (model.blocks[0].mlp, model.blocks[0].norm2))


def test_dry_run_counts_a_tied_parameter_once():
    """Each rewrite's params_before counted a parameter two FFNs share: the dry run predicted 29,765, not 33,861."""
    model = _vit2()
    model.blocks[1].mlp.fc1.weight = model.blocks[0].mlp.fc1.weight
    model.blocks[1].norm1.weight = model.blocks[0].norm2.weight  # tied to a module that stays, and one that goes
    dry = hanify(model, dry_run=True)
    real = hanify(model)
    assert dry.params_after == real.params_after == sum(p.numel() for p in model.parameters())


def test_hanify_under_a_meta_default_device_names_the_path_and_the_remedy():
    """The new blocks were built on meta and copying them to the model's device raised a bare NotImplementedError."""
    model = ZOO["timm/vit"]()[0]
    snap = _snapshot(model)
    with torch.device("meta"), pytest.raises(HanifyError, match=r"'blocks\.0\.mlp'.*meta.*outside"):
        hanify(model)
    _assert_unchanged(model, snap)
    assert not hasattr(model, "_han_surgery_recipe")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"priority": "100"}, r"register_rule\('test\.bad'\): priority must be an int, got '100'"),
        ({"priority": True}, r"register_rule\('test\.bad'\): priority must be an int, got True"),
        ({"priority": 1.5}, r"priority must be an int"),
        ({"matcher": (Mlp, "blocks.*")}, r"register_rule\('test\.bad'\): matcher must be .*got \(<class"),
        ({"matcher": ()}, r"register_rule\('test\.bad'\): matcher must be"),
        ({"matcher": 42}, r"register_rule\('test\.bad'\): matcher must be .*got 42"),
        ({"matcher": int}, r"register_rule\('test\.bad'\): matcher must be .*got <class 'int'>"),
    ],
)
def test_register_rule_checks_priority_and_matcher(kwargs, match):
    """A string priority was taken, and then every hanify raised 'bad operand type for unary -: str' naming no rule;
    a tuple matcher holding a pattern failed only at hanify, as "'tuple' object is not callable"."""
    try:
        with pytest.raises(ValueError, match=match):
            register_rule("test.bad", **{"matcher": Mlp, "builder": lambda cand, config: None, **kwargs})
        assert "test.bad" not in [r.name for r in list_rules()]
        with pytest.raises(ValueError, match=match):
            register_rule("test.bad", **{"matcher": Mlp, **kwargs})  # the decorator form checks before it is applied
        assert hanify(ZOO["timm/vit"]()[0], dry_run=True).num_rewritten == 1
    finally:
        if "test.bad" in registry._RULES:  # not list_rules(): a str priority breaks its sort
            unregister_rule("test.bad")
