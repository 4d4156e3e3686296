"""``AutoConfig.from_pretrained`` on a hanified folder gives a :class:`HanifiedConfig` that reads and edits like the
base model's config: the usual ``cfg = AutoConfig.from_pretrained(d); cfg.x = ...; AutoModel*.from_pretrained(d,
config=cfg)`` idiom behaves as on a plain folder."""

from __future__ import annotations

import torch
import transformers as T

from han_surgery import hanify

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _folder(tmp_path, **config):
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(**TINY, num_labels=2, **config)).eval()
    hanify(model)
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_base_attributes_read_through_the_hanified_config(tmp_path) -> None:
    """``cfg.hidden_size`` raised AttributeError, and a common field the base set read as transformers' default."""
    config = T.AutoConfig.from_pretrained(_folder(tmp_path, output_hidden_states=True, hidden_dropout_prob=0.2))
    assert (config.hidden_size, config.vocab_size, config.hidden_dropout_prob) == (32, 100, 0.2)
    assert config.output_hidden_states is True and config.num_labels == 2
    assert not hasattr(config, "no_such_field")


def test_edits_to_the_hanified_config_reach_the_model(tmp_path) -> None:
    """Only id2label / label2id / problem_type carried over: output_hidden_states and hidden_dropout_prob set on the
    config were silently dropped by from_pretrained(config=...) and from_config."""
    folder = _folder(tmp_path)
    config = T.AutoConfig.from_pretrained(folder)
    config.output_hidden_states = True
    config.hidden_dropout_prob = 0.5
    config.problem_type = "multi_label_classification"
    ids = torch.randint(0, 100, (1, 6))
    for model in (
        T.AutoModelForSequenceClassification.from_pretrained(folder, config=config),
        T.AutoModelForSequenceClassification.from_config(config),
    ):
        assert model.config.output_hidden_states is True and model(ids).hidden_states is not None
        assert model.config.hidden_dropout_prob == 0.5
        assert model.config.problem_type == "multi_label_classification"
    config.save_pretrained(tmp_path / "saved")
    again = T.AutoConfig.from_pretrained(tmp_path / "saved")
    assert (again.output_hidden_states, again.hidden_dropout_prob, again.problem_type) == (
        True,
        0.5,
        "multi_label_classification",
    )
    assert again.base_config["output_hidden_states"] is True and "hidden_dropout_prob" not in vars(again)


def test_auto_classes_check_a_timm_wrapper_base_like_han_surgerys_loader(tmp_path) -> None:
    """A hanified timm_wrapper folder whose base config asks timm to open a checkpoint path: han_surgery's loader
    refused it, the Auto classes handed the path to timm."""
    import json

    import pytest

    from han_surgery.errors import CheckpointError

    model = T.TimmWrapperForImageClassification(T.TimmWrapperConfig(architecture="test_vit", num_labels=3))
    hanify(model)
    model.save_pretrained(tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    config["base_config"]["model_args"] = {"checkpoint_path": str(tmp_path / "elsewhere.pth")}
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="checkpoint_path"):
        T.AutoModelForImageClassification.from_pretrained(tmp_path / "m")


def test_remote_code_file_imports_with_a_han_surgery_that_lacks_a_class(monkeypatch) -> None:
    """``han_surgery_auto.py`` imported every class by name, so a folder saved where transformers had one more
    ``AutoModelFor*`` class raised ImportError under trust_remote_code=True, for every Auto class."""
    from han_surgery import folders
    from han_surgery.integrations import transformers as integration

    names = {**folders.transformers_auto_map(), "AutoModelForSomeNewTask": "han_surgery_auto.HanifiedAutoModelForNew"}
    monkeypatch.setattr(folders, "transformers_auto_map", lambda: names)
    namespace: dict = {}
    exec(folders.transformers_remote_code("0"), namespace)
    assert namespace["HanifiedAutoModel"] is integration.HanifiedAutoModel
    assert namespace["HanifiedConfig"] is integration.HanifiedConfig and "HanifiedAutoModelForNew" not in namespace


def test_a_config_override_that_drops_layers_loads_the_rest(tmp_path) -> None:
    """``num_hidden_layers=1`` on a two-layer hanified folder raised 'step 0 of the recipe does not replay' (a plain
    folder loads, transformers ignoring the dropped layers' weights)."""
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(**TINY)).eval()
    hanify(model)
    model.save_pretrained(tmp_path / "m")
    smaller = T.AutoModel.from_pretrained(tmp_path / "m", num_hidden_layers=1).eval()
    assert len(smaller.encoder.layer) == 1
    kept, original = smaller.encoder.layer[0].state_dict(), model.encoder.layer[0].state_dict()
    assert kept.keys() == original.keys() and all(torch.equal(kept[k], original[k]) for k in kept)


def test_names_the_base_maps_and_its_sub_configs_read_and_edit_through(tmp_path) -> None:
    """GPT-2 spells hidden_size n_embd (its attribute_map): reading it raised AttributeError and an assignment was
    dropped; a composite base's sub-configs (an EncoderDecoderModel's decoder) read as dicts, so get_text_config()
    returned a dict and GenerationConfig.from_model_config raised."""
    torch.manual_seed(0)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    hanify(gpt2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    config = T.AutoConfig.from_pretrained(tmp_path / "gpt2")
    assert (config.hidden_size, config.num_hidden_layers) == (32, 2)
    config.num_hidden_layers = 1
    assert config.base_config["n_layer"] == 1 and "num_hidden_layers" not in vars(config)
    assert len(T.AutoModelForCausalLM.from_config(config).transformer.h) == 1

    bert = T.BertConfig(**TINY)
    pair = T.EncoderDecoderModel(T.EncoderDecoderConfig.from_encoder_decoder_configs(bert, bert)).eval()
    hanify(pair)
    pair.save_pretrained(tmp_path / "pair")
    config = T.AutoConfig.from_pretrained(tmp_path / "pair")
    assert isinstance(config.decoder, T.BertConfig) and config.decoder.hidden_size == 32
    T.GenerationConfig.from_model_config(config)


def test_an_assignment_counts_even_where_it_matches_the_wrappers_default(tmp_path) -> None:
    """output_attentions=False on a config whose base saved True was taken for no edit (the wrapper's own default
    is False), and the model still returned attentions."""
    folder = _folder(tmp_path, output_attentions=True)
    config = T.AutoConfig.from_pretrained(folder)
    config.output_attentions = False
    model = T.AutoModel.from_pretrained(folder, config=config)
    assert model.config.output_attentions is False
