"""Guards the engine applies to every rule (issue 11, items 11, 14 and 15; issue 12, shared modules):

* a new module takes the train/eval mode of the module it replaces;
* a replacement that cannot be called the way its parent calls the old module is not swapped in;
* ``torch.compile`` / ``DataParallel`` / ``DistributedDataParallel`` wrappers are looked through, so
  the recipe lands on the model and ``save_pretrained`` works on the wrapper too;
* a module reachable under several paths is replaced once and stays shared.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T
from _surgery_zoo import ZOO, output_tensor
from timm.layers import Mlp
from torch import nn

from han_surgery import HanBlock, HanConfig, from_pretrained, hanify, register_rule, save_pretrained
from han_surgery.errors import ConfigError
from han_surgery.surgery import Replacement, recipe_of, unregister_rule
from han_surgery.surgery.engine import call_signature_problem, unwrap_model


@pytest.mark.parametrize("name", ["timm/vit", "hf/bert", "hf/bart", "timm/convnext_convmlp", "custom/fallback"])
def test_new_modules_take_the_mode_of_the_module_they_replace(name):
    model, inputs, _ = ZOO[name]()
    model.eval()
    hanify(model, HanConfig(dropout=0.5))  # every new block has dropout: a training-mode one would show
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(output_tensor(model(**inputs)), output_tensor(model(**inputs)))

    model, _, _ = ZOO[name]()
    hanify(model.train(), HanConfig(dropout=0.5))
    assert all(m.training for m in model.modules())


def test_a_reused_module_keeps_its_own_mode_and_a_dry_run_changes_no_mode():
    """FastViT's rule keeps the original ``ConvMlp.conv`` (depthwise conv + BatchNorm) inside its replacement:
    setting the replacement's mode set that BatchNorm's too, even in a dry run (frozen BatchNorms came back to
    train mode)."""
    model, _, _ = ZOO["timm/fastvit"]()
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    hanify(model, dry_run=True)
    assert {n: m.training for n, m in model.named_modules()} == modes
    reused = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    report = hanify(model)
    assert report.rewrites and all(not m.training for m in reused)


def test_hooks_on_a_replaced_module_are_named_in_a_warning():
    """Forward hooks on an FFN (or a dropped norm) went with it without a word."""
    model, _, _ = ZOO["timm/vit"]()
    model.blocks[0].mlp.register_forward_hook(lambda module, args, output: None)
    model.blocks[0].mlp.fc1.register_forward_pre_hook(lambda module, args: None)
    with pytest.warns(UserWarning, match=r"2 forward/backward hook\(s\) registered on blocks\.0\.mlp or its sub"):
        hanify(model)
    model, _, _ = ZOO["timm/vit"]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hook, no warning
        hanify(model)


class SizedFFN(nn.Module):
    """An FFN called with the spatial size, like SegFormer's Mix-FFN: ``forward(x, height, width)``."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

    def forward(self, x, height, width):
        return self.down(self.act(self.up(x))) * (height * width) ** 0


class SizedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ffn = SizedFFN()

    def forward(self, x):
        return x + self.ffn(x, 2, 3)


def test_replacement_with_another_signature_is_not_swapped_in():
    """Any rule, not only the fallback: here a user rule that ignores the extra inputs."""

    @register_rule("test.sized", matcher=SizedFFN, priority=500)
    def build(cand, config):
        return Replacement({cand.path: HanBlock(8)})

    try:
        model = SizedNet()
        report = hanify(model, HanConfig(rules=["test.sized"]))
    finally:
        unregister_rule("test.sized")
    assert report.num_rewritten == 0 and isinstance(model.ffn, SizedFFN)
    (skip,) = report.skipped
    assert skip.rule == "test.sized"
    assert "HanBlock.forward(x) cannot be called as SizedFFN.forward(x, height, width)" in skip.reason
    assert model(torch.randn(2, 6, 8)).shape == (2, 6, 8)


def test_segformer_mix_ffn_is_never_swapped_for_a_plain_block():
    """Before the check, hf.mlp matched SegFormer's Mix-FFN (fc1, activation_fn, fc2), put a HanBlock in
    its place, reported success, and the model crashed at its first forward."""
    model, inputs, _ = ZOO["hf/segformer"]()
    report = hanify(model, HanConfig(rules=["hf.mlp", "fallback.ffn"]))
    assert report.num_rewritten == 0
    assert report.skipped and all("cannot be called as SegformerMixMLP.forward" in s.reason for s in report.skipped)
    output_tensor(model(**inputs))


@pytest.mark.parametrize(
    "old, new, ok",
    [
        (lambda x: x, lambda x: x, True),
        (lambda x, h, w: x, lambda x: x, False),
        (lambda x, mask=None: x, lambda x: x, False),  # the parent may pass the mask
        (lambda x, h, w: x, lambda x, *args, **kwargs: x, True),
        (lambda x, feat_size: x, lambda x, height, width=None: x, False),  # keyword name differs
        (lambda hidden_states: hidden_states, lambda x: x, True),  # the first input goes by position
        (lambda x, **kwargs: x, lambda x: x, False),
        (lambda x, *args: x, lambda x: x, False),
    ],
)
def test_call_signature_problem(old, new, ok):
    def module(fn):
        m = nn.Module()
        m.forward = fn
        return m

    assert (call_signature_problem(module(old), module(new)) is None) == ok


def test_hanify_looks_through_torch_compile_and_saves(tmp_path):
    model, inputs, _ = ZOO["timm/vit"]()
    model.eval()
    compiled = torch.compile(model, backend="eager")  # the OptimizedModule wrapper, without inductor's compile time
    report = hanify(compiled)
    assert [r.path for r in report.rewrites] == ["blocks.0.mlp"]  # not "_orig_mod.blocks.0.mlp"
    assert recipe_of(model) and unwrap_model(compiled) is model
    save_pretrained(compiled, tmp_path)
    loaded = from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))


def test_hanify_looks_through_data_parallel_and_refuses_ddp(tmp_path):
    import torch.distributed as dist

    model, inputs, _ = ZOO["hf/bert"]()
    wrapped = nn.DataParallel(model.eval())
    assert [r.path for r in hanify(wrapped).rewrites][0] == "encoder.layer.0.intermediate"
    save_pretrained(wrapped, tmp_path / "dp")
    assert torch.equal(output_tensor(from_pretrained(tmp_path / "dp")(**inputs)), output_tensor(model(**inputs)))

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model2, _, _ = ZOO["timm/vit"]()
        ddp = nn.parallel.DistributedDataParallel(model2)
        assert [r.path for r in hanify(ddp, dry_run=True).rewrites] == ["blocks.0.mlp"]
        # DDP all-reduces the parameters it found when it was built: the new blocks' would never be averaged
        with pytest.raises(ConfigError, match=r"DistributedDataParallel.*hanify\(ddp.module\) and wrap the result"):
            hanify(ddp)
        assert not recipe_of(model2) and not isinstance(model2.blocks[0].mlp, HanBlock)
        hanify(ddp.module)
        ddp = nn.parallel.DistributedDataParallel(model2)
        save_pretrained(ddp, tmp_path / "ddp")
        assert recipe_of(model2) and (tmp_path / "ddp" / "han_config.json").is_file()
    finally:
        dist.destroy_process_group()


class SharedFFN(nn.Module):
    """One ``Mlp`` held by two attributes (weight sharing by reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = Mlp(8, 16, 8)
        self.second = self.first

    def forward(self, x):
        x = x + self.first(x)
        return x + self.second(x)


def test_shared_module_is_rewritten_once_and_stays_shared(tmp_path):
    torch.manual_seed(0)
    model = SharedFFN().eval()
    report = hanify(model)
    (rec,) = report.rewrites
    assert isinstance(model.first, HanBlock) and model.second is model.first
    assert "shared with second" in rec.neighbours["shared"] and "second" in rec.swapped
    assert report.params_after == sum(p.numel() for p in model.parameters()) == 4 * 8
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, model=SharedFFN())
    assert loaded.second is loaded.first
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_albert_shared_layer_is_rewritten_once_and_the_report_says_so():
    model, inputs, _ = ZOO["hf/albert"]()
    config = model.config
    report = hanify(model.eval())
    (rec,) = report.rewrites  # one FFN, used by every layer
    assert f"used by all {config.num_hidden_layers} layers" in rec.neighbours["shared"]
    assert isinstance(model, T.AlbertModel)
    output_tensor(model(**inputs)).sum()


def _vit2() -> nn.Module:
    """The zoo's tiny ViT with two blocks (each with its own norm2 and ls2)."""
    model, _, _ = ZOO["timm/vit"]()
    model.blocks.append(type(model.blocks[0])(dim=32, num_heads=2))
    return model


def _types(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)]


@pytest.mark.parametrize("residual", ["keep", "drop"])
def test_a_shared_ffn_whose_neighbours_would_change_in_one_block_only_is_skipped(residual):
    """One Mlp in two ViT blocks, each with its own norm2: the rewrite dropped blocks.0.norm2 only, and the shared
    replacement ran behind blocks.1's kept LayerNorm (with residual='drop': x + Han(norm2 x) - norm2 x)."""
    model = _vit2()
    model.blocks[1].mlp = model.blocks[0].mlp
    types = _types(model)
    report = hanify(model, HanConfig(residual=residual))
    assert report.num_rewritten == 0 and _types(model) == types and not recipe_of(model)
    (skip,) = report.skipped
    assert skip.path == "blocks.0.mlp"
    assert "blocks.0.mlp is shared with blocks.1.mlp" in skip.reason and "blocks.0.norm2" in skip.reason
    assert "HanConfig.drop_norm=False, HanConfig.residual='keep'" in skip.reason
    # replacing the FFN alone is right in both blocks: rewritten once, and shared
    report = hanify(model, HanConfig(drop_norm=False))
    (rec,) = report.rewrites
    assert rec.swapped == ["blocks.0.mlp", "blocks.1.mlp"]
    assert isinstance(model.blocks[0].mlp, HanBlock) and model.blocks[1].mlp is model.blocks[0].mlp
    assert all(isinstance(b.norm2, nn.LayerNorm) for b in model.blocks)


def test_a_shared_block_is_rewritten_once_with_its_neighbours():
    """A whole block shared (its FFN and its norm reached under two paths each): one rewrite, at every path."""
    model = _vit2()
    model.blocks[1] = model.blocks[0]
    (rec,) = hanify(model).rewrites
    assert sorted(rec.swapped) == ["blocks.0.mlp", "blocks.0.norm2", "blocks.1.mlp", "blocks.1.norm2"]
    assert isinstance(model.blocks[1].mlp, HanBlock) and isinstance(model.blocks[1].norm2, nn.Identity)


def test_a_split_ffn_is_rewritten_where_both_halves_are_shared_and_skipped_where_one_is():
    """BERT's FFN is two modules (intermediate, output) the rewrite replaces together: two layers sharing both get the
    one new pair (each layer the same FFN, as before); sharing only ``intermediate`` would give layer 1 the new
    intermediate with its old output (a dense layer of the other width), so that rewrite is skipped with the
    reason."""
    config = T.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    both = T.BertModel(config).eval()
    layers = both.encoder.layer
    layers[1].intermediate, layers[1].output = layers[0].intermediate, layers[0].output
    assert not hanify(both).skipped
    assert layers[1].intermediate is layers[0].intermediate and layers[1].output is layers[0].output
    ids = torch.randint(0, 50, (2, 5))
    both(ids)  # runs: each layer the new intermediate and its output
    one = T.BertModel(config).eval()
    one.encoder.layer[1].intermediate = one.encoder.layer[0].intermediate
    report = hanify(one)
    (skip,) = [s for s in report.skipped if s.path == "encoder.layer.0.intermediate"]
    assert "shared with encoder.layer.1.intermediate" in skip.reason and "encoder.layer.0.output" in skip.reason
    assert report.rewrites == []  # the shared intermediate is one candidate, named under layer 0


def test_a_norm_shared_between_blocks_skips_them_with_the_shared_path():
    """blocks.1.norm2 = blocks.0.norm2 aborted the call: "wants to replace 'blocks.1.norm2', which is not a
    sub-module". Dropping it for one block would drop it for the other one too."""
    model = _vit2()
    model.blocks[1].norm2 = model.blocks[0].norm2
    types = _types(model)
    report = hanify(model)
    assert report.num_rewritten == 0 and _types(model) == types and not recipe_of(model)
    assert [s.path for s in report.skipped] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert "blocks.0.norm2, which the rewrite replaces, is shared with blocks.1.norm2" in report.skipped[0].reason
    assert "blocks.1.norm2, which the rewrite replaces, is shared with blocks.0.norm2" in report.skipped[1].reason
    assert all("drop_norm=False" in s.reason for s in report.skipped)
    report = hanify(model, HanConfig(drop_norm=False))  # the norm stays: both blocks can be rewritten
    assert report.num_rewritten == 2 and model.blocks[1].norm2 is model.blocks[0].norm2


def test_a_hook_warning_under_warnings_as_errors_comes_after_the_step_is_recorded():
    """The warning came between the swap and the recipe: under -W error the model was rewritten, had no recipe,
    and a second call was a silent no-op, so it could not be saved."""
    model = _vit2()
    model.blocks[1].mlp.register_forward_hook(lambda module, args, output: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"registered on blocks\.1\.mlp"):
            hanify(model)
    assert isinstance(model.blocks[1].mlp, HanBlock) and len(recipe_of(model)) == 1
    assert model.pretrained_cfg["architecture"] == "hanified"  # the hanify hooks ran too


def test_an_accelerate_offloaded_model_is_refused_before_anything_changes():
    """cpu_offload / device_map offload keep the weights on meta and load them in a hook: the new blocks went onto
    meta, without values, and the next forward raised."""
    accelerate = pytest.importorskip("accelerate")
    model = _vit2().eval()
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    types = _types(model)
    assert [r.path for r in hanify(model, dry_run=True).rewrites] == ["blocks.0.mlp", "blocks.1.mlp"]
    with pytest.raises(ConfigError, match=r"'blocks\.0\.mlp' is offloaded by accelerate.*before dispatch"):
        hanify(model)
    assert _types(model) == types and not recipe_of(model)
