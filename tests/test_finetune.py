"""End-to-end tests of ``han_surgery.finetune`` on a tiny ViT (timm ``test_vit``) and generated images.

Real accelerate throughout: one process in-process, two processes through ``accelerate launch
--multi_gpu --num_processes 2`` (DDP over gloo on CPU), a run killed with SIGKILL and resumed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from _finetune_cli import cli, rehash_checkpoint, run_argv
from _toy_data import TINY_VIT as TINY_VIT_KWARGS
from _toy_data import make_images
from safetensors.torch import load_file

# qkv_bias=False: the key bias of softmax attention has an identically zero gradient (a shift of every logit
# in a row), so its float32 rounding noise is all Adam sees there and it normalises it to steps of ~lr. Without it,
# what differs between process counts is summation order only.
TINY_VIT = json.dumps(TINY_VIT_KWARGS)
TINY_VIT_DROPOUT = json.dumps({**TINY_VIT_KWARGS, "drop_rate": 0.2, "proj_drop_rate": 0.1})
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "toy.npz", n=384)


def common(toy: Path, out: Path, *extra: str, model: str = "test_vit") -> list[str]:
    return ["--model", model, "--data", str(toy), "--output-dir", str(out), "--no-progress", "--no-tensorboard", *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One process, global batch 16, 2 epochs of the 345-row training split (21 steps per epoch)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    torch.set_num_threads(1)
    results = run_argv(
        common(toy, out, "--model-kwargs", TINY_VIT, "--epochs", "2", "--batch-size", "16", "--lr", "3e-3")
    )
    return out, results


def test_output_folder_is_hub_ready_and_loads_back_in_timm(reference: tuple[Path, dict], toy: Path) -> None:
    import timm
    from huggingface_hub import ModelCard

    out, results = reference
    for name in ("model.safetensors", "config.json", "README.md", "training_args.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert results["eval_accuracy"] > 0.7, results  # chance is 0.25: the loop does learn
    assert results["global_batch_size"] == 16 and results["total_steps"] == 42

    # timm reads the folder back (config.json from save_for_hf) and reproduces the measured held-out loss.
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    from han_surgery.finetune.data import load_data

    data = load_data(toy, seed=0)
    x = torch.stack([data.eval[i][0] for i in range(len(data.eval))])
    y = torch.stack([data.eval[i][1] for i in range(len(data.eval))])
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(-1) == y).float().mean().item()
    assert loss == pytest.approx(results["eval_loss"], rel=1e-5)
    assert acc == pytest.approx(results["eval_accuracy"])
    # and han_surgery.load_model gives the identical module
    from han_surgery import load_model

    with torch.no_grad():
        assert torch.equal(load_model(out).eval()(x), logits)

    # The model card: YAML metadata with the measured values, rendered from the template.
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm"
    assert {"han-surgery", "householder"} <= set(card.data.tags)
    assert card.data.base_model is None  # not a Hub repo: body only
    # test_vit as --model-kwargs changed it, trained from random weights (it said "A fine-tuned `test_vit`")
    built_as = f"test_vit --model-kwargs '{json.dumps(json.loads(TINY_VIT))}'"
    assert f"base model (`{built_as}`)" in card.text and f"`{built_as}` trained from scratch" in card.text
    assert card.data.datasets == ["toy"]
    measured = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert measured["accuracy"] == pytest.approx(results["eval_accuracy"], abs=1e-6)
    assert f"{results['params']:,}" in card.text and "local-dir:" in card.text and "## Recipe" in card.text

    # One JSON line per logged step, an evaluation after every epoch.
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval_accuracy" in line]
    assert [e["step"] for e in evals] == [21, 42]
    assert evals[-1]["eval_accuracy"] == pytest.approx(results["eval_accuracy"])
    from han_surgery.finetune import FinetuneConfig

    config = FinetuneConfig.from_json(out / "training_args.json")  # the run's config, round-tripped through JSON
    assert config.batch_size == 16 and config.epochs == 2 and config.model_kwargs == json.loads(TINY_VIT)
    assert results["num_processes"] == 1 and results["data"]["train_rows"] == 345


def test_two_processes_match_one_process_at_the_same_global_batch(
    reference: tuple[Path, dict], toy: Path, tmp_path: Path
) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` (gloo) with 8 per process == 1 process with 16.

    Each process sees its half of every global batch (seedable sampler, same permutation), DDP averages
    the two half-batch mean gradients, which equals the full-batch mean up to float32 summation order.
    Measured after 42 Adam steps: 1.5e-7 max abs (a few ulps of weights of magnitude ~1). The tolerance 1e-5 is
    ~70x that and 1/300 of one Adam step at lr 3e-3, so a single step on a different batch, a different data
    order or a missed gradient average would fail it; the weights moved >100x more from their initialisation.
    """
    out_ref, results_ref = reference
    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "han_surgery.finetune",
        *common(toy, out, "--model-kwargs", TINY_VIT, "--epochs", "2", "--batch-size", "8", "--lr", "3e-3"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) (MULTI_CPU)" in proc.stdout and "global batch size 16 = 8 per process x 2" in proc.stdout
    ref, two = weights(out_ref), weights(out)
    diff = max_abs_diff(ref, two)
    print(f"max |w_2proc - w_1proc| = {diff:.2e}")
    assert diff < 1e-5
    from accelerate.utils import set_seed

    from han_surgery.finetune import build_model, load_data

    set_seed(0)  # the run's initialisation, rebuilt: how far training moved the weights
    init = build_model("test_vit", load_data(toy, seed=0), model_kwargs=json.loads(TINY_VIT)).model.state_dict()
    moved = max_abs_diff(init, ref)
    print(f"max |w_1proc - w_init| = {moved:.2e}")
    assert moved > 100 * diff
    results_two = json.loads((out / "results.json").read_text())
    assert results_two["eval_accuracy"] == pytest.approx(results_ref["eval_accuracy"])
    assert results_two["global_batch_size"] == 16 and results_two["num_processes"] == 2
    assert "accelerate launch --multi_gpu --num_processes 2 -m han_surgery.finetune" in (out / "README.md").read_text()


LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "han_surgery.finetune"]  # fmt: skip


def test_two_processes_resumed_between_two_logged_losses_log_what_the_run_would_have(toy: Path, tmp_path: Path) -> None:
    """Each process sums its own micro-batches' losses until the next logged train_loss; a checkpoint kept the
    first process's sum only and both took it back, so the first train_loss logged after the resume was off
    (0.87598 for 0.87588 in the review's run). Each process's sums are now saved and restored."""
    import shutil

    def argv(out: Path) -> list[str]:
        opts = ("--max-steps", "30", "--batch-size", "8", "--checkpoint-every", "11", "--keep-checkpoints", "5")
        return [*LAUNCH_TWO, *common(toy, out, "--model-kwargs", TINY_VIT_DROPOUT, *opts)]

    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = subprocess.run(argv(full), capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cut.mkdir()  # as if killed after the checkpoint of step 11 (steps 10 and 20 log a train_loss)
    shutil.copytree(full / "checkpoints" / "step_0000011", cut / "checkpoints" / "step_0000011")
    shutil.copy(full / "training_args.json", cut)
    proc = subprocess.run([*argv(cut), "--resume"], capture_output=True, text=True, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def losses(out: Path) -> dict[int, float]:
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {line["step"]: line["train_loss"] for line in lines if "train_loss" in line and line["step"] > 11}

    assert list(losses(full)) == [20, 30] and losses(cut) == losses(full)
    assert max_abs_diff(weights(full), weights(cut)) == 0


def test_sigterm_mid_training_cleans_up_as_ctrl_c(toy: Path, tmp_path: Path) -> None:
    """``kill`` / ``timeout`` / a scheduler's preemption send SIGTERM: the run stops as for Ctrl-C, one line, exit
    143, and the unfinished folder (no checkpoint yet) is removed so that the same command runs again (it was left
    half-written, and the rerun was refused as a non-empty folder with nothing to resume)."""
    out = tmp_path / "run"
    argv = common(toy, out, "--model-kwargs", TINY_VIT, "--max-steps", "100000", "--batch-size", "8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "han_surgery.finetune", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    deadline = time.monotonic() + 180
    while not (out / "metrics.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert err.decode().strip().splitlines()[-1] == "han-surgery finetune: terminated"
    assert not out.exists()


def test_sigkill_mid_training_then_resume_equals_uninterrupted(toy: Path, tmp_path: Path) -> None:
    """Dropout on, gradient accumulation 2: a run killed with SIGKILL after its first checkpoint and resumed with
    ``--resume`` ends with exactly the weights of a run that was never interrupted (same process count and
    thread count, so the same float operations in the same order: bitwise equal)."""
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): the same kernels, the same summation order
    opts = (
        "--model-kwargs",
        TINY_VIT_DROPOUT,
        "--max-steps",
        "14",
        "--batch-size",
        "8",
        "--grad-accum",
        "2",
        "--checkpoint-every",
        "3",
    )
    straight = tmp_path / "straight"
    run_argv(common(toy, straight, *opts))

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "han_surgery.finetune", *common(toy, out, *opts)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    first = out / "checkpoints" / "step_0000003"
    deadline = time.monotonic() + 180
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert first.is_dir() and not (out / "model.safetensors").exists()

    results = run_argv(common(toy, out, *opts, "--resume"))
    assert results["global_step"] == 14
    assert max_abs_diff(weights(straight), weights(out)) == 0.0
    # the metrics file reads as one run: no step logged twice
    steps = [
        (json.loads(line)["step"], "eval_loss" in line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(steps) == len(set(steps))

    # resuming with other options would not continue the same run: refused, with the differences named
    assert cli(common(toy, out, *opts, "--resume", "--lr", "0.01")) == 2


def test_resume_without_checkpoint_and_contradicting_flags(
    toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli(common(toy, tmp_path / "none", "--resume")) == 2
    assert "does not exist: there is no run to continue" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(common(toy, tmp_path / "empty", "--resume")) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert cli(common(toy, tmp_path / "none", "--resume", "--overwrite")) == 2
    assert "contradict" in capsys.readouterr().err


def test_output_dir_is_checked_before_any_work(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An --output-dir that holds the data or the model is refused with --overwrite (which deleted the user's
    images, then failed on a missing file), and one that cannot be created is one line (it was a traceback after
    the data and the model had loaded)."""
    data = tmp_path / "mine" / "toy.npz"
    data.parent.mkdir()
    data.write_bytes(toy.read_bytes())
    for out in (data.parent, tmp_path):
        assert cli(common(data, out, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert f"holds --data {data}: --overwrite would delete it" in err and err.count("\n") == 1, err
    assert data.read_bytes() == toy.read_bytes()
    (tmp_path / "afile").write_text("mine")
    assert cli(common(data, tmp_path / "afile" / "run")) == 2
    err = capsys.readouterr().err
    assert "--output-dir cannot create" in err and "is a file, not a folder" in err and err.count("\n") == 1, err


def held_out(toy: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from han_surgery.finetune.data import load_data

    data = load_data(toy, seed=0)
    return torch.stack([data.eval[i][0] for i in range(len(data.eval))]), torch.stack(
        [data.eval[i][1] for i in range(len(data.eval))]
    )


def test_hanify_with_distillation_from_the_original_then_from_pretrained(
    reference: tuple[Path, dict], toy: Path, tmp_path: Path
) -> None:
    """``--model <trained folder> --hanify --distill-from base``: the output is a han_surgery.save_pretrained
    folder that ``han_surgery.from_pretrained`` rebuilds with the measured held-out loss."""
    from huggingface_hub import ModelCard

    import han_surgery

    out_ref, results_ref = reference
    out = tmp_path / "han"
    results = run_argv(
        common(
            toy,
            out,
            "--hanify",
            "--reflections",
            "2",
            "--distill-from",
            "base",
            "--max-steps",
            "6",
            "--batch-size",
            "16",
            model=str(out_ref),
        )
    )
    assert results["params_base"] == results_ref["params"] and results["params"] < results["params_base"]
    han_config = json.loads((out / "han_config.json").read_text())
    assert han_config["recipe"][0]["config"]["reflections"] == 2 and len(han_config["recipe"][0]["rewrites"]) == 2
    config = json.loads((out / "config.json").read_text())  # timm's format, through han-surgery's entry point
    assert config["architecture"] == "hanified" and config["model_args"]["han_base"] == "test_vit"

    model = han_surgery.from_pretrained(out)
    x, y = held_out(toy)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
        assert torch.equal(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x), model(x))
    assert loss == pytest.approx(results["eval_loss"], rel=1e-5)

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and "han-layer" in card.data.tags
    assert card.data.library_name == "timm" and "knowledge distillation from `base`" in card.text
    snippet = card.text.split("```python\n")[-1].split("```")[0].replace("path/to/this/folder", str(out))
    namespace: dict = {}
    exec(snippet, namespace)  # the card's "How to load it", as written: timm's loader after `import han_surgery`
    with torch.no_grad():
        assert torch.equal(namespace["model"].eval()(x), model(x))
    assert f"{results['params_base']:,}" in card.text and "2 block(s) rewritten" in card.text


def test_distillation_loss_is_hintons_kd_term() -> None:
    from han_surgery.finetune.loop import distillation_loss

    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    assert distillation_loss(t, t, "classification", 2.0).item() == pytest.approx(0.0, abs=1e-6)
    p_t = torch.softmax(t / 2, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert distillation_loss(s, t, "classification", 2.0).item() == pytest.approx(manual.item(), rel=1e-5)
    assert distillation_loss(s, t, "regression", 2.0).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)


def test_han_model_by_name_trains_and_reloads_with_timm(tmp_path: Path) -> None:
    """A Han model registered with timm (``han_mixer_m0h0_32``, the paper's CIFAR Han-Mixer) by name: plain timm output."""
    import timm

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 96)
    images = (rng.random((96, 32, 32, 3)) * 100 + 60 * labels[:, None, None, None]).astype(np.uint8)
    np.savez(tmp_path / "rgb.npz", images=images, labels=labels)
    out = tmp_path / "mixer"
    results = run_argv(
        common(tmp_path / "rgb.npz", out, "--max-steps", "3", "--batch-size", "16", model="han_mixer_m0h0_32")
    )
    assert not (out / "han_config.json").exists()  # a timm model in its own right, no surgery to replay
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x, y = held_out(tmp_path / "rgb.npz")
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
    assert loss == pytest.approx(results["eval_loss"], rel=1e-5)
    assert model.num_classes == 3
    # --max-steps 3 stopped inside the first epoch: logged as a fraction of it, not as "epoch 0"
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval_loss" in last and 0 < last["epoch"] < 1


def test_bf16_mixed_precision_on_cpu(toy: Path, tmp_path: Path) -> None:
    """accelerate's bf16 autocast on CPU: the setup says so, training runs, the saved weights stay float32."""
    out = tmp_path / "bf16"
    results = run_argv(
        common(
            toy,
            out,
            "--model-kwargs",
            TINY_VIT,
            "--max-steps",
            "4",
            "--batch-size",
            "16",
            "--mixed-precision",
            "bf16",
        )
    )
    assert results["mixed_precision"] == "bf16" and math.isfinite(results["eval_loss"])
    w = weights(out)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values())


def test_mixed_precision_chosen_by_accelerate_is_recorded(
    toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Chosen by accelerate's config or the launcher (ACCELERATE_MIXED_PRECISION), bf16 was recorded nowhere but in
    results.json: a --resume launched without it went on in float32 without a word, and the model card's command
    reran the run in float32. The checkpoints now record it (training_args.json stays the options given)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "bf16"
    argv = common(
        toy, out, "--model-kwargs", TINY_VIT, "--max-steps", "4", "--batch-size", "16", "--checkpoint-every", "2"
    )
    assert run_argv(argv)["mixed_precision"] == "bf16"
    assert json.loads((out / "training_args.json").read_text())["mixed_precision"] is None  # as given
    assert "--mixed-precision bf16" in (out / "README.md").read_text()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    capsys.readouterr()
    assert cli([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "written with mixed precision bf16; this run has no" in err and "--mixed-precision bf16" in err, err
    # a checkpoint written before the precision was recorded resumes as before
    state_file = out / "checkpoints" / "step_0000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["mixed_precision"]
    state_file.write_text(json.dumps(state))
    from han_surgery.finetune.checkpoints import TrainProgress

    TrainProgress(1, 16, "no").load_state_dict(state)


def test_a_second_run_after_one_under_accelerate_launch_is_one_clear_error(
    toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under accelerate launch the first run's end_training destroys the process group, and a second run() in the
    same process died in accelerate with "Default process group has not been initialized" (or, had the state been
    reset, could not join a new one: gloo's connect is refused). Tried with two processes by hand; here the flag
    the first run leaves."""
    from han_surgery.finetune import FinetuneError, runner

    monkeypatch.setattr(runner, "_process_group_ended", True)
    with pytest.raises(FinetuneError, match="launch one process group per run"):
        run_argv(common(toy, tmp_path / "second", "--model-kwargs", TINY_VIT, "--max-steps", "1"))
    assert not (tmp_path / "second").exists()


@pytest.mark.parametrize("hanify", [False, True], ids=["plain", "hanified"])
def test_image_folder_export_reproduces_the_run_through_timms_own_preprocessing(tmp_path: Path, hanify: bool) -> None:
    """timm's documented recipe on the raw files -- resolve_data_config + create_transform -- gives the tensors the run
    trained and evaluated on (the export said bicubic where the run resized bilinearly), and the class names reach
    pretrained_cfg["label_names"] (they were only in results.json)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from han_surgery.finetune.data import load_data

    root, rng = tmp_path / "shapes", np.random.default_rng(0)
    for c, name in enumerate(["zeta", "alpha", "mid"]):
        (root / name).mkdir(parents=True)
        for i in range(6):  # non-square, larger than --image-size: resized and centre-cropped
            pixels = (rng.random((30, 41, 3)) * 120 + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    out = tmp_path / "run"
    argv = common(root, out, "--model-kwargs", TINY_VIT, "--image-size", "16", "--max-steps", "2", "--batch-size", "8")
    run_argv(argv + (["--hanify"] if hanify else []))
    if hanify:
        import han_surgery  # noqa: F401  (registers the "hanified" timm model)
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == ["alpha", "mid", "zeta"]  # class order: sorted folder names
    transform = create_transform(**resolve_data_config({}, model=model))
    data = load_data(root, image_size=16, seed=0)
    for i in range(len(data.eval)):
        path, _ = data.eval.dataset.samples[data.eval.indices[i]]
        with Image.open(path) as image:
            torch.testing.assert_close(transform(image.convert("RGB")), data.eval[i][0], atol=1e-6, rtol=0)


def test_the_last_partial_accumulation_group_of_an_epoch_is_a_mean(tmp_path: Path, monkeypatch) -> None:
    """accelerate divides every loss by --grad-accum, and an epoch of 1 micro-batch under --grad-accum 2 stepped on
    half its gradient. With the group averaged, that run takes exactly the steps of --grad-accum 1."""
    from han_surgery.finetune.loop import accumulation_scale

    assert [accumulation_scale(i, 7, 3) for i in range(7)] == [1, 1, 1, 1, 1, 1, 3.0]
    assert [accumulation_scale(i, 5, 2) for i in range(5)] == [1, 1, 1, 1, 2.0]
    assert {accumulation_scale(i, 6, 3) for i in range(6)} == {1} and accumulation_scale(0, 1, 1) == 1
    data = make_images(tmp_path / "ten.npz", n=10)  # 8 training rows: one micro-batch of 8 per epoch
    grads: list[list[torch.Tensor]] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    runs = []
    for accum in ("2", "1"):
        grads = []
        argv = ["--model", "test_vit", "--model-kwargs", json.dumps(TINY_VIT_KWARGS), "--data", str(data),
                "--val-fraction", "0.2", "--batch-size", "8", "--grad-accum", accum, "--epochs", "2",
                "--output-dir", str(tmp_path / accum), "--no-progress", "--no-tensorboard"]  # fmt: skip
        assert cli(argv) == 0
        runs.append(grads)
    assert len(runs[0]) == len(runs[1]) == 2
    for by_two, by_one in zip(*runs):
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(by_two, by_one, strict=True))


def test_resuming_an_older_checkpoint_replaces_the_newer_ones_and_their_events(tmp_path: Path, monkeypatch) -> None:
    """``--resume step_1`` in a folder holding steps 1-4: rotation kept the highest step numbers, so the new run's
    own checkpoints were deleted as soon as written (a later ``--resume`` went back to the abandoned run); and
    TensorBoard showed the abandoned run's steps beside the new ones (metrics.jsonl was trimmed, the events not)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from han_surgery.finetune import runner

    data = make_images(tmp_path / "toy.npz", n=64)
    out = tmp_path / "run"
    argv = ["--model", "test_vit", "--model-kwargs", json.dumps(TINY_VIT_KWARGS), "--data", str(data),
            "--output-dir", str(out), "--max-steps", "12", "--batch-size", "8", "--checkpoint-every", "3",
            "--no-progress", "--tensorboard"]  # fmt: skip
    assert cli([*argv, "--keep-checkpoints", "10"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step_0000012"
    written: list[tuple[str, list[str]]] = []
    save = runner.save_checkpoint

    def spy(*args, **kwargs):
        path = save(*args, **kwargs)
        written.append((path.name, sorted(p.name for p in path.parent.iterdir())))
        return path

    monkeypatch.setattr(runner, "save_checkpoint", spy)
    assert cli([*argv, "--keep-checkpoints", "2", "--resume", str(out / "checkpoints" / "step_0000003")]) == 0
    assert written == [
        ("step_0000006", ["step_0000003", "step_0000006"]),
        ("step_0000009", ["step_0000006", "step_0000009"]),
        ("step_0000012", ["step_0000009", "step_0000012"]),
    ]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [10, 12] and steps.count(10) == 1


def _bert_folder(folder: Path, words: list[str], *, lowercase: bool = False) -> Path:
    """A tiny 2-label BERT classifier with a word-level tokenizer over ``words`` (after its special tokens)."""
    import transformers as T
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    if lowercase:
        raw.normalizer = normalizers.Lowercase()
    cfg = T.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=32, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    T.BertForSequenceClassification(cfg).save_pretrained(folder)
    T.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_a_teacher_that_cannot_take_the_datas_inputs_is_refused_before_the_folder_is_touched(
    toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Only the student was run on a batch before training: a 3-channel teacher on grey images, a text teacher of
    another tokenizer (ids past its embedding; or, of the same size, ids that mean other words to it) failed with a
    traceback in the first step, or distilled meaningless targets without a word."""
    from timm.models import save_for_hf

    rgb = tmp_path / "rgb_teacher"  # trained on 3-channel images; the toy images are grey
    save_for_hf(timm.create_model("test_vit", num_classes=4, in_chans=3, **TINY_VIT_KWARGS), str(rgb),
                safe_serialization=True)  # fmt: skip
    out = tmp_path / "out"
    assert cli(common(toy, out, "--model-kwargs", TINY_VIT, "--max-steps", "1", "--distill-from", str(rgb))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--distill-from {rgb} does not accept inputs of shape 2x1x16x16" in err, err
    assert not out.exists()

    words = [f"w{i}" for i in range(12)]
    texts = tmp_path / "t.csv"
    texts.write_text("text,label\n" + "".join(f"w{i % 12} w{(i * 5) % 12} W{i % 3},{i % 2}\n" for i in range(24)))
    student = _bert_folder(tmp_path / "student", words)
    teachers = {
        "small": (_bert_folder(tmp_path / "small", words[:4]), "another vocabulary"),
        "permuted": (_bert_folder(tmp_path / "permuted", words[::-1]), "another vocabulary"),
        "lowercase": (_bert_folder(tmp_path / "lowercase", words, lowercase=True), "tokenises"),
    }
    argv = ["--model", str(student), "--data", str(texts), "--output-dir", str(out), "--max-steps", "1",
            "--batch-size", "4", "--no-progress", "--no-tensorboard", "--distill-from"]  # fmt: skip
    for teacher, message in teachers.values():
        assert cli([*argv, str(teacher)]) == 2
        err = capsys.readouterr().err  # transformers' loading bars, then the one line
        line = err.strip().splitlines()[-1]
        assert "Traceback" not in err and f"finetune: --distill-from {teacher}: its tokenizer" in line, err
        assert message in line
        assert not out.exists()
    assert cli([*argv, str(_bert_folder(tmp_path / "same", words))]) == 0  # the student's tokenizer: distils


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast runs on CUDA")
def test_fp16_on_cpu_is_refused_as_it_would_train_in_float32(
    toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """accelerate turns fp16 autocast off on CPU: the run trained in float32 while results.json and the model card
    said fp16. Refused, whether --mixed-precision or accelerate's config / launcher (the environment) chose it."""
    out = tmp_path / "fp16"
    argv = common(toy, out, "--model-kwargs", TINY_VIT, "--max-steps", "1", "--batch-size", "16")
    for extra, env in ((["--mixed-precision", "fp16"], None), ([], "fp16")):
        if env:
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
        assert cli([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1
            and "fp16 (from --mixed-precision" in err
            and "needs a CUDA GPU" in err
            and "bf16" in err
        ), err
        assert not out.exists()


def _tiny_run(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "test_vit", "--model-kwargs", json.dumps(TINY_VIT_KWARGS), "--data", str(data),
            "--output-dir", str(out), "--batch-size", "8", "--no-progress", "--no-tensorboard", *extra]  # fmt: skip


def test_a_warm_up_longer_than_the_run_is_one_warning_line_and_again_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--warmup-steps 50`` on a 4-step run trained without a word: the lr never reached --lr, the cosine never
    decayed. One ``warning:`` line naming both numbers; a resumed run (the same length: its options are the
    interrupted run's) says it again; a warm-up that fits says nothing."""
    data = make_images(tmp_path / "toy.npz", n=48)
    out = tmp_path / "run"
    argv = _tiny_run(data, out, "--max-steps", "4", "--warmup-steps", "50", "--checkpoint-every", "2")
    for extra in ([], ["--resume", str(out / "checkpoints" / "step_0000002")]):
        capsys.readouterr()
        assert cli([*argv, *extra]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
        assert lines == [
            "han-surgery finetune: warning: --warmup-steps 50 is not shorter than the run's 4 optimizer steps: the "
            "learning rate rises for the whole run, reaching --lr at best at its last step, and the cosine decay "
            "never starts; lower --warmup-steps or train longer (--epochs / --max-steps)"
        ], lines
    capsys.readouterr()
    assert cli(_tiny_run(data, tmp_path / "fits", "--max-steps", "4", "--warmup-steps", "2")) == 0
    assert "warning:" not in capsys.readouterr().err


def test_max_grad_norm_clips_the_gradient_the_optimizer_steps_on(tmp_path: Path, monkeypatch) -> None:
    """``--max-grad-norm`` (none before: nothing clipped): the gradient AdamW steps on has at most that global norm,
    clipped once per optimizer step (after the last micro-batch of an accumulation group), and the norm before
    clipping is logged beside train_loss. Without it, nothing is clipped and no norm is logged."""
    from accelerate import Accelerator

    data = make_images(tmp_path / "toy.npz", n=48)
    grads: list[list[torch.Tensor]] = []
    clips: list[tuple[float, bool]] = []
    step, clip = torch.optim.AdamW.step, Accelerator.clip_grad_norm_

    def recording_step(self, *args, **kwargs):
        grads.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return step(self, *args, **kwargs)

    def recording_clip(self, parameters, max_norm, *args, **kwargs):
        clips.append((max_norm, self.sync_gradients))
        return clip(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording_clip)

    def norm(tensors: list[torch.Tensor]) -> float:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])).item()

    runs = {}
    for name, extra in (("plain", []), ("clipped", ["--max-grad-norm", "1e-3"])):
        grads, clips = [], []
        out = tmp_path / name
        assert cli(_tiny_run(data, out, "--max-steps", "1", "--grad-accum", "2", *extra)) == 0
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (grads, clips, next(line for line in logged if "train_loss" in line))
    (plain, no_clips, plain_log), (clipped, with_clips, clipped_log) = runs["plain"], runs["clipped"]
    assert len(plain) == len(clipped) == 1 and no_clips == [] and "grad_norm" not in plain_log
    assert with_clips == [(1e-3, True)]  # one optimizer step of two micro-batches: clipped once, when synced
    before = norm(plain[0])  # the same first step (same seed and data) unclipped
    assert before > 0.01 and norm(clipped[0]) == pytest.approx(1e-3, rel=1e-3)
    assert clipped_log["grad_norm"] == pytest.approx(before, rel=1e-4)
    assert clipped_log["train_loss"] == pytest.approx(plain_log["train_loss"])
    card = (tmp_path / "clipped" / "README.md").read_text()
    assert "gradient norm clipped at 0.001" in card and "--max-grad-norm 0.001" in card
    assert "clipped" not in (tmp_path / "plain" / "README.md").read_text()


def test_a_checkpoint_recording_no_max_grad_norm_resumes_as_unclipped(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A checkpoint and ``training_args.json`` written before ``--max-grad-norm`` existed lack it: such a run never
    clipped, so it resumes as it was (no clipping), and adding ``--max-grad-norm`` is refused as a changed option
    (the rest of the run would clip while its records say it did not)."""
    data = make_images(tmp_path / "toy.npz", n=48)
    out = tmp_path / "run"
    argv = _tiny_run(data, out, "--max-steps", "4", "--checkpoint-every", "2")
    assert cli(argv) == 0
    args = json.loads((out / "training_args.json").read_text())
    assert args.pop("max_grad_norm") is None
    (out / "training_args.json").write_text(json.dumps(args))
    for checkpoint in (out / "checkpoints").iterdir():
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        del state["options"]["max_grad_norm"]
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
        rehash_checkpoint(checkpoint)
    step_2 = str(out / "checkpoints" / "step_0000002")
    capsys.readouterr()
    assert cli([*argv, "--resume", step_2, "--max-grad-norm", "1"]) == 2
    assert "--max-grad-norm None -> 1.0" in capsys.readouterr().err
    assert cli([*argv, "--resume", step_2]) == 0
    assert json.loads((out / "results.json").read_text())["global_step"] == 4


def test_a_run_resumed_from_another_runs_checkpoint_keeps_its_metrics_whole_through_later_resumes(
    tmp_path: Path,
) -> None:
    """``--resume other/checkpoints/step_40`` into a new folder, killed, then resumed in place from its own step-80
    checkpoint: the count of metrics lines a checkpoint records included the other run's, which the new folder's file
    did not hold, so the second resume kept lines logged after step 80 and they came twice. The new folder's
    metrics.jsonl now starts as the other run's did at the checkpoint: every folder holds the uninterrupted run's."""
    import shutil

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    table = tmp_path / "table.csv"
    np.savetxt(table, np.c_[x, x[:, 0] > 0], delimiter=",", header="a,b,c,d,y", comments="", fmt="%.5f")

    def argv(out: Path, *extra: str) -> list[str]:
        opts = ("--epochs", "10", "--batch-size", "16", "--checkpoint-every", "20", "--keep-checkpoints", "50")
        return ["--model", "mlp:16x2", "--data", str(table), "--output-dir", str(out), "--no-progress",
                "--no-tensorboard", "--task", "classification", *opts, *extra]  # fmt: skip

    def metrics(out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    full, moved = tmp_path / "full", tmp_path / "moved"
    run_argv(argv(full))
    run_argv(argv(moved, "--resume", str(full / "checkpoints" / "step_0000040")))
    assert metrics(moved) == metrics(full)  # the whole history, not just what came after step 40
    again = tmp_path / "again"  # as if the moved run had been killed after step 110
    shutil.copytree(moved, again)
    run_argv(argv(again, "--resume", str(again / "checkpoints" / "step_0000080")))
    steps = [(m["step"], "eval_loss" in m) for m in metrics(again)]
    assert len(steps) == len(set(steps)) and metrics(again) == metrics(full)
    assert max_abs_diff(weights(again), weights(full)) == 0
