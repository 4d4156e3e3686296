"""The accelerate training loop behind ``han-surgery finetune``.

One code path for one CPU process, ``accelerate launch --multi_gpu --num_processes N`` (gloo on CPU,
NCCL on GPUs) and mixed precision:

* ``Accelerator(cpu=not torch.cuda.is_available())`` with gradient accumulation, mixed precision,
  and ``DataLoaderConfiguration(use_seedable_sampler=True, data_seed=--seed)``: epoch ``e`` visits the
  training rows in the permutation drawn from ``seed + e``, the same on every process and every run.
  Each process takes its own ``--batch-size`` slice, so the global batch is
  ``batch_size x processes x grad_accum`` and N processes reproduce one process at the same global
  batch (up to float summation order; see ``tests/test_finetune_launch.py``).
* ``save_state`` every ``--checkpoint-every`` optimizer steps into ``<output-dir>/checkpoints/step_N``
  (model, optimizer, scheduler, every process's RNG state, and the loop position, registered with
  ``register_for_checkpointing``). A checkpoint is written under a temporary name and renamed when
  complete, so a killed run never leaves a half-written one. ``--resume`` loads the newest, re-seeds the
  sampler for the saved epoch and skips the batches already seen (``skip_first_batches``): the run
  continues as if it had never stopped.
* Metrics go through accelerate's trackers: :class:`JSONLTracker` (``metrics.jsonl``, always) and
  TensorBoard (``logs/``) when it is installed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataBundle, DataError, load_data, make_text_collate
from .models import ModelError, build_model, count_parameters, save_model

__all__ = ["FinetuneError", "JSONLTracker", "TrainProgress", "run", "main"]  # noqa: F822 (JSONLTracker: module __getattr__)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
ARGS_FILE = "training_args.json"
RESULTS_FILE = "results.json"
RUN_ARGS_FILE = "run_args.json"


class FinetuneError(RuntimeError):
    """A problem with the run's set-up (output folder, resume, options); the message says what to do."""


# --------------------------------------------------------------------------------------- tracking
@functools.cache
def _jsonl_tracker_class() -> type:
    from accelerate.tracking import GeneralTracker, on_main_process

    class JSONLTracker(GeneralTracker):
        """An accelerate tracker appending one JSON object per ``log`` call to ``<dir>/metrics.jsonl``.

        Lines are ``{"step": int, <metric>: value, ...}``. On resume, ``truncate_after(step)`` drops the
        lines a killed run wrote after the checkpoint it resumes from, so the file reads as one run.
        """

        name = "jsonl"
        requires_logging_directory = False
        main_process_only = True

        @on_main_process
        def __init__(self, directory: str | Path) -> None:
            super().__init__()
            self.path = Path(directory) / METRICS_FILE
            self.path.parent.mkdir(parents=True, exist_ok=True)

        @property
        def tracker(self) -> Path:
            return self.path

        @on_main_process
        def store_init_configuration(self, values: dict[str, Any]) -> None:
            (self.path.parent / "tracker_config.json").write_text(json.dumps(values, indent=2, default=str) + "\n")

        @on_main_process
        def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}, default=float) + "\n")

        @on_main_process
        def truncate_after(self, step: int) -> None:
            if self.path.is_file():
                lines = self.path.read_text().splitlines()
                kept = [ln for ln in lines if ln.strip() and (json.loads(ln).get("step") or 0) <= step]
                self.path.write_text("".join(ln + "\n" for ln in kept))

    return JSONLTracker


def __getattr__(name: str) -> Any:  # ``from han_surgery.finetune.train import JSONLTracker``
    if name == "JSONLTracker":
        return _jsonl_tracker_class()
    raise AttributeError(name)


class TrainProgress:
    """Where the loop is, saved with every checkpoint (``register_for_checkpointing``).

    ``global_step``: optimizer steps done; ``epoch``: the current epoch; ``batches_done``: micro-batches
    of ``epoch`` already consumed by this process.
    """

    def __init__(self, num_processes: int = 1, global_batch: int = 0) -> None:
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0
        self.num_processes = num_processes
        self.global_batch = global_batch

    def state_dict(self) -> dict[str, int]:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "num_processes": self.num_processes,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = (state.get("num_processes", self.num_processes), state.get("global_batch", self.global_batch))
        if saved != (self.num_processes, self.global_batch):
            raise FinetuneError(
                f"--resume: the checkpoint was written by {saved[0]} process(es) with global batch {saved[1]}; this run has "
                f"{self.num_processes} with {self.global_batch}. Relaunch with the same number of processes, --batch-size "
                f"and --grad-accum to continue exactly."
            )
        self.global_step, self.epoch, self.batches_done = state["global_step"], state["epoch"], state["batches_done"]


# ------------------------------------------------------------------------------------------ setup
def _prepare_output_dir(args: argparse.Namespace, accelerator: Any) -> Path:
    out = Path(args.output_dir).expanduser()
    exists = out.exists() and any(out.iterdir()) if out.is_dir() else out.exists()
    if args.resume is None and exists and not args.overwrite:
        raise FinetuneError(
            f"--output-dir {out} already exists and is not empty. Pass --overwrite to replace it, or --resume to continue its run."
        )
    if args.resume is not None and args.overwrite:
        raise FinetuneError("--resume and --overwrite contradict each other: resuming keeps --output-dir.")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if exists and args.overwrite:
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink()
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


def _find_checkpoint(out: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / "custom_checkpoint_0.pkl").is_file():
            raise FinetuneError(
                f"--resume {resume}: not a checkpoint folder written by this command (no custom_checkpoint_0.pkl)."
            )
        return path
    candidates = sorted(
        (p for p in (out / CHECKPOINT_DIR).glob("step_*") if p.is_dir() and p.name[5:].isdigit()),
        key=lambda p: int(p.name[5:]),
    )
    if not candidates:
        raise FinetuneError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}. Run with --checkpoint-every N first.")
    return candidates[-1]


#: Options that must be the same for ``--resume`` to continue the interrupted run exactly.
RESUME_KEYS = (
    "model",
    "model_kwargs",
    "pretrained",
    "data",
    "task",
    "num_classes",
    "val_fraction",
    "max_samples",
    "image_size",
    "max_length",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "label_smoothing",
    "seed",
    "mixed_precision",
    "hanify",
    "han_reflections",
    "han_init",
    "han_bias_init",
    "han_dropout",
    "han_drop_norm",
    "han_residual",
    "han_final_abs",
    "han_rules",
    "han_include",
    "han_exclude",
    "distill_from",
    "distill_alpha",
    "distill_temperature",
)


def _check_resume_args(out: Path, args: argparse.Namespace) -> None:
    path = out / RUN_ARGS_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    now = json.loads(json.dumps(vars(args), default=str))
    changed = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now.get(k)!r}" for k in RESUME_KEYS if saved.get(k) != now.get(k)
    ]
    if changed:
        raise FinetuneError(
            f"--resume: options differ from the interrupted run ({'; '.join(changed)}). Resume with the same options."
        )


def _lr_lambda(warmup: int, total: int, schedule: str) -> Any:
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def _logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        return model(**inputs).logits
    return model(inputs)


def _task_loss(
    out: torch.Tensor, target: torch.Tensor, task: str, label_smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    out = out.float()
    if task == "classification":
        return F.cross_entropy(out, target, label_smoothing=label_smoothing, reduction=reduction)
    loss = F.mse_loss(out, target.float(), reduction="none").mean(-1)
    return loss.mean() if reduction == "mean" else loss


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, task: str, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KD term: ``T^2 KL(softmax(t/T) || softmax(s/T))``, or MSE to the teacher for regression."""
    student, teacher = student.float(), teacher.float()
    if task == "regression":
        return F.mse_loss(student, teacher)
    t = temperature
    return (
        F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean")
        * t
        * t
    )


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, loader: Any, data: DataBundle) -> dict[str, float]:
    """Loss and accuracy (classification) or RMSE in the data's units (regression) on the held-out split."""
    model.eval()
    losses, hits = [], []
    for inputs, target in loader:
        with accelerator.autocast():
            out = _logits(model, inputs)
        loss = _task_loss(out, target, data.task, 0.0, reduction="none")
        if data.task == "classification":
            loss, hit = accelerator.gather_for_metrics((loss, (out.argmax(-1) == target).float()))
            hits.append(hit.cpu())
        else:
            loss = accelerator.gather_for_metrics(loss)
        losses.append(loss.float().cpu())
    model.train()
    mse = torch.cat(losses).mean().item()
    if data.task == "classification":
        return {"eval_loss": mse, "eval_accuracy": torch.cat(hits).mean().item()}
    return {"eval_loss": mse, "eval_rmse": math.sqrt(mse) * data.target_std[0]}


# -------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune as ``args`` says (see :mod:`han_surgery.finetune.args`); return the final metrics.

    Raises:
        FinetuneError, DataError, ModelError: the set-up cannot work; nothing is written in that case
        (except that an existing --output-dir is replaced with --overwrite).
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    if args.distill_from and not (0.0 <= args.distill_alpha <= 1.0):
        raise FinetuneError(f"--distill-alpha must be in [0, 1], got {args.distill_alpha}.")
    if args.distill_from == "base" and not args.hanify:
        raise FinetuneError(
            "--distill-from base distils from the model before --hanify; add --hanify, or name a teacher model."
        )
    if args.push_to_hub is not None and "/" not in args.push_to_hub:
        raise FinetuneError(f"--push-to-hub {args.push_to_hub}: give a repo id as <user or org>/<name>.")
    try:
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise FinetuneError(
            f"--model-kwargs {args.model_kwargs!r}: not a JSON object ({e.msg}); e.g. '{{\"drop_rate\": 0.1}}'."
        ) from None
    if not isinstance(model_kwargs, dict):
        raise FinetuneError(f"--model-kwargs {args.model_kwargs!r}: give a JSON object of keyword arguments.")

    out_arg = Path(args.output_dir).expanduser()
    tensorboard = False
    if not args.no_tensorboard:
        from accelerate.utils import is_tensorboard_available

        tensorboard = is_tensorboard_available()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        step_scheduler_with_optimizer=False,  # stepped by hand once per optimizer step, whatever the process count
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        project_config=ProjectConfiguration(project_dir=str(out_arg), logging_dir=str(out_arg / "logs")),
        log_with=None,
    )
    try:
        out = _prepare_output_dir(args, accelerator)
        set_seed(args.seed)

        # ---- data and model
        data = load_data(
            args.data,
            task=args.task,
            num_classes=args.num_classes,
            val_fraction=args.val_fraction,
            seed=args.seed,
            image_size=args.image_size,
            max_samples=args.max_samples,
        )
        built = build_model(args.model, data, pretrained=args.pretrained, model_kwargs=model_kwargs)
        params_base = count_parameters(built.model)
        teacher: nn.Module | None = None
        if args.distill_from == "base":
            teacher = copy.deepcopy(built.model)
        han_report = None
        if args.hanify:
            if built.hanified:
                raise FinetuneError(
                    f"--hanify: {args.model} is already hanified (it has han_config.json); drop --hanify."
                )
            import han_surgery
            from han_surgery.surgery.engine import HanifyError

            from .args import han_config_kwargs

            try:
                han_config = han_surgery.HanConfig(**han_config_kwargs(args))
                han_report = han_surgery.hanify(built.model, han_config)
            except (ValueError, HanifyError) as e:
                raise FinetuneError(f"--hanify on {args.model}: {e}") from None
            built.hanified = True
        if args.distill_from and teacher is None:
            teacher = build_model(args.distill_from, data, model_kwargs=None).model
        params_final = count_parameters(built.model)
        model = built.model

        # ---- loaders
        collate = make_text_collate(built.tokenizer, args.max_length) if data.kind == "text" else None
        if data.kind == "text" and built.tokenizer is None:
            raise FinetuneError(f"--model {args.model}: text data needs a tokenizer saved in the model folder.")
        train_loader = torch.utils.data.DataLoader(
            data.train,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(args.seed),
        )
        eval_loader = torch.utils.data.DataLoader(
            data.eval, batch_size=args.eval_batch_size or 2 * args.batch_size, collate_fn=collate
        )
        if len(train_loader) < accelerator.num_processes:
            raise FinetuneError(
                f"The training split has {len(data.train)} rows: fewer than one batch of {args.batch_size} for each of "
                f"{accelerator.num_processes} processes. Lower --batch-size or --val-fraction."
            )
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
        steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum)
        if args.max_steps:
            total_steps = args.max_steps
            epochs = math.ceil(total_steps / steps_per_epoch)
        else:
            epochs = args.epochs or 1
            total_steps = epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(args.warmup_steps, total_steps, args.schedule)
        )
        scheduler = accelerator.prepare(scheduler)
        global_batch = args.batch_size * accelerator.num_processes * args.grad_accum
        progress = TrainProgress(accelerator.num_processes, global_batch)
        accelerator.register_for_checkpointing(progress)
        if teacher is not None:
            teacher = teacher.to(accelerator.device).eval().requires_grad_(False)

        setup = {
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "per_process_batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "global_batch_size": global_batch,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "epochs": epochs,
        }
        accelerator.print(
            f"han-surgery finetune: {setup['num_processes']} process(es) ({setup['distributed_type']}), device {setup['device']}, "
            f"mixed precision {setup['mixed_precision']}\n"
            f"global batch size {global_batch} = {args.batch_size} per process x {accelerator.num_processes} process(es) "
            f"x {args.grad_accum} accumulation step(s)\n"
            f"data: {data.describe()}\n"
            f"model: {args.model} ({built.family}{', hanified' if built.hanified else ''}), parameters {params_base:,}"
            + (
                f" -> {params_final:,} after hanify ({han_report.num_rewritten} block(s) rewritten)"
                if han_report is not None
                else ""
            )
            + (f"; distilling from {args.distill_from}" if teacher is not None else "")
            + f"\nschedule: {total_steps} optimizer steps ({epochs} epoch(s) x {steps_per_epoch} steps), lr {args.lr} {args.schedule}"
            + (f", checkpoint every {args.checkpoint_every} steps" if args.checkpoint_every else ""),
            flush=True,
        )

        if args.resume is None and accelerator.is_main_process:  # what --resume compares against
            (out / RUN_ARGS_FILE).write_text(json.dumps(vars(args), indent=2, default=str) + "\n")

        # ---- trackers (after the output folder exists)
        trackers: list[Any] = [_jsonl_tracker_class()(out)]
        if tensorboard:
            trackers.append("tensorboard")
        from accelerate.tracking import filter_trackers

        accelerator.log_with = filter_trackers(trackers, accelerator.logging_dir)
        hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("finetune", config=hparams)

        # ---- resume
        if args.resume is not None:
            ckpt = _find_checkpoint(out, args.resume)
            _check_resume_args(out, args)
            accelerator.load_state(str(ckpt))
            accelerator.print(
                f"resumed from {ckpt}: step {progress.global_step}, epoch {progress.epoch}, {progress.batches_done} batches into it",
                flush=True,
            )
            for tracker in accelerator.trackers:
                if getattr(tracker, "name", None) == "jsonl":
                    tracker.truncate_after(progress.global_step)

        def save_checkpoint() -> None:
            final = out / CHECKPOINT_DIR / f"step_{progress.global_step:07d}"
            tmp = final.with_name(final.name + ".tmp")
            if accelerator.is_main_process and tmp.exists():
                shutil.rmtree(tmp)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                done = sorted(
                    (p for p in final.parent.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:])
                )
                for old in done[: -args.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            accelerator.wait_for_everyone()

        # ---- the loop
        model.train()
        bar = tqdm(
            total=total_steps,
            initial=progress.global_step,
            desc="finetune",
            dynamic_ncols=True,
            disable=args.no_progress or not accelerator.is_local_main_process,
        )
        metrics: dict[str, float] = {}
        running, running_n = 0.0, 0
        train_start = time.perf_counter()
        done = progress.global_step >= total_steps
        while not done and progress.epoch < epochs:
            train_loader.set_epoch(progress.epoch)
            loader: Any = train_loader
            if progress.batches_done:  # resumed mid-epoch: same permutation, minus the batches already seen
                from accelerate import skip_first_batches

                loader = (
                    skip_first_batches(train_loader, progress.batches_done)
                    if progress.batches_done < len(train_loader)
                    else []
                )
            for inputs, target in loader:
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        out_logits = _logits(model, inputs)
                        loss = _task_loss(out_logits, target, data.task, args.label_smoothing)
                        if teacher is not None:
                            with torch.no_grad():
                                t_logits = _logits(teacher, inputs)
                            kd = distillation_loss(out_logits, t_logits, data.task, args.distill_temperature)
                            loss = (1 - args.distill_alpha) * loss + args.distill_alpha * kd
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                progress.batches_done += 1
                running += loss.detach().float().item()
                running_n += 1
                if accelerator.sync_gradients:
                    scheduler.step()
                    progress.global_step += 1
                    bar.update(1)
                    if progress.global_step % 10 == 0 or progress.global_step == total_steps:
                        train_loss = accelerator.reduce(
                            torch.tensor(running / running_n, device=accelerator.device), "mean"
                        ).item()
                        bar.set_postfix(loss=f"{train_loss:.4f}")
                        accelerator.log(
                            {"train_loss": train_loss, "lr": scheduler.get_last_lr()[0], "epoch": progress.epoch},
                            step=progress.global_step,
                        )
                        metrics["train_loss"] = train_loss
                        running, running_n = 0.0, 0
                    if args.checkpoint_every and progress.global_step % args.checkpoint_every == 0:
                        save_checkpoint()
                    if progress.global_step >= total_steps:
                        done = True
                        break
            if not done or progress.batches_done >= len(train_loader):
                progress.epoch += 1
                progress.batches_done = 0
            eval_metrics = evaluate(accelerator, model, eval_loader, data)
            metrics.update(eval_metrics)
            accelerator.log({**eval_metrics, "epoch": progress.epoch}, step=progress.global_step)
            accelerator.print(
                f"epoch {progress.epoch} step {progress.global_step}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()),
                flush=True,
            )
        bar.close()
        if "eval_loss" not in metrics:  # resumed after the last step: evaluate the final weights
            metrics.update(evaluate(accelerator, model, eval_loader, data))
        train_time = time.perf_counter() - train_start

        # ---- the Hub folder
        accelerator.wait_for_everyone()
        results = {
            **metrics,
            "global_step": progress.global_step,
            "train_runtime_s": round(train_time, 2),
            "total_runtime_s": round(time.perf_counter() - start_time, 2),
            "params_base": params_base,
            "params": params_final,
            **setup,
        }
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            save_model(built, unwrapped, out, data_config=_timm_data_config(data))
            from .hub import base_model_id

            (out / ARGS_FILE).write_text(
                json.dumps(
                    {
                        **vars(args),
                        "base_model": base_model_id(args, built),
                        "setup": setup,
                        "data": _data_summary(data),
                    },
                    indent=2,
                    default=str,
                )
                + "\n"
            )
            (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
            if han_report is not None:
                (out / "hanify_report.txt").write_text(str(han_report) + "\n")
            from .hub import write_model_card

            write_model_card(out, args=args, built=built, data=data, results=results, han_report=han_report)
            accelerator.print(f"saved the model folder {out}", flush=True)
        accelerator.wait_for_everyone()
        try:
            if args.push_to_hub and accelerator.is_main_process:
                from .hub import push_folder

                url = push_folder(out, args.push_to_hub, private=args.private)
                accelerator.print(f"pushed to {url}", flush=True)
        finally:
            accelerator.end_training()  # closes the trackers (and the process group, when distributed)
        return results
    finally:
        if accelerator.num_processes == 1:  # let a later run in this process build its own Accelerator
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def _timm_data_config(data: DataBundle) -> dict[str, Any] | None:
    """The preprocessing of :mod:`.data` images, for timm's ``pretrained_cfg`` in ``config.json``."""
    if data.kind != "image" or data.image_size is None:
        return None
    from .data import IMAGE_MEAN, IMAGE_STD

    c = data.in_chans or 3
    return {"input_size": (c, *data.image_size), "mean": (IMAGE_MEAN,) * c, "std": (IMAGE_STD,) * c, "crop_pct": 1.0}


def _data_summary(data: DataBundle) -> dict[str, Any]:
    return {
        "name": data.name,
        "kind": data.kind,
        "task": data.task,
        "num_outputs": data.num_outputs,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "in_chans": data.in_chans,
        "image_size": data.image_size,
        "num_features": data.num_features,
        "class_names": data.class_names,
        "target_mean": data.target_mean,
        "target_std": data.target_std,
        **({k: v for k, v in data.extra.items() if k in ("feature_mean", "feature_std")}),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m han_surgery.finetune``: clear one-line errors, exit code 2 on bad input."""
    from .args import parse_args

    return run_cli(parse_args(argv))


def run_cli(args: argparse.Namespace) -> int:
    """:func:`run` with one-line errors: exit code 2 for bad input, 1 for a failed upload (the folder is complete)."""
    from .hub import HubUploadError

    try:
        run(args)
    except (FinetuneError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except HubUploadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
