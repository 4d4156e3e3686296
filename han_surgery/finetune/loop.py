"""The loop step of a run: losses, evaluation and the accelerate training loop.

One code path for one CPU process, ``accelerate launch --multi_gpu --num_processes N`` (gloo on CPU,
NCCL on GPUs) and mixed precision. Epoch ``e`` visits the training rows in the permutation drawn from
``seed + e`` (accelerate's seedable sampler), the same on every process and every run, so a resumed run
re-seeds the sampler for the saved epoch, skips the batches already seen (``skip_first_batches``) and
continues as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..surgery.calibration.heal import HiddenStates, hidden_state_distillation_loss
from ..utils import step_overflows
from .checkpoints import FinetuneError, TrainProgress
from .data import DataBundle

__all__ = [
    "lr_lambda",
    "warmup_problem",
    "task_loss",
    "distillation_loss",
    "logits_of",
    "evaluate",
    "NonFiniteLossError",
    "TrainingState",
    "train_loop",
]


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step: linear warm-up, then cosine decay to 0 or constant."""

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def warmup_problem(warmup: int, total: int, schedule: str) -> str | None:
    """Why a warm-up of ``warmup`` steps does not fit a run of ``total`` optimizer steps (``None`` if it does): one
    as long as the run or longer keeps the learning rate rising to the end, below ``--lr`` but for the last step at
    best, and the schedule after it never starts (no cosine decay)."""
    if warmup < total:
        return None
    decay = ", and the cosine decay never starts" if schedule == "cosine" else ""
    return (
        f"--warmup-steps {warmup} is not shorter than the run's {total} optimizer steps: the learning rate rises for "
        f"the whole run, reaching --lr at best at its last step{decay}; lower --warmup-steps or train longer "
        "(--epochs / --max-steps)"
    )


def logits_of(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's output tensor: ``model(**inputs).logits`` for a dict of tokenised text, else ``model(inputs)``."""
    if isinstance(inputs, dict):
        return model(**inputs).logits
    return model(inputs)


def task_loss(
    out: torch.Tensor, target: torch.Tensor, task: str, label_smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy (classification) or MSE over the targets (regression), in float32."""
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
    kl = F.kl_div(
        F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="batchmean"
    )
    return kl * t * t


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, loader: Any, data: DataBundle) -> dict[str, float]:
    """Loss and accuracy (classification) or RMSE in the data's units (regression) on the held-out split."""
    model.eval()
    losses, hits = [], []
    for inputs, target in loader:
        with accelerator.autocast():
            out = logits_of(model, inputs)
        loss = task_loss(out, target, data.task, 0.0, reduction="none")
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


class NonFiniteLossError(FinetuneError):
    """The loss became NaN or infinite, and training stopped before the optimizer applied it; or (``overflow``) the
    optimizer's update itself overflowed float32 (AdamW's step size is ``lr / (1 - beta1 ** t)``: an ``--lr`` near
    float32's 3.4e38), and training stopped with that step partly applied."""

    def __init__(self, step: int, epoch: int, value: float, note: str = "", *, overflow: bool = False) -> None:
        where = f"at optimizer step {step} (epoch {epoch + 1})"
        note = f"; {note}" if note else ""
        if overflow:
            message = f"the optimizer's update overflowed float32 {where}; training stopped{note}. Lower --lr."
        else:
            message = (
                f"the loss became {value} {where}; training stopped before the weights took it in{note}. Lower "
                "--lr, check the data for extreme values, or try --mixed-precision no."
            )
        super().__init__(message)
        self.step, self.epoch, self.value, self.overflow = step, epoch, value, overflow


@dataclass
class TrainingState:
    """What the loop works on, after ``accelerator.prepare``.

    Attributes:
        model, optimizer, scheduler, train_loader, eval_loader: prepared by accelerate.
        progress: the loop position (registered for checkpointing).
        total_steps, epochs: the run's length in optimizer steps and epochs.
        teacher: the distillation teacher (frozen, eval mode), or ``None``.
        hidden_paths: the modules whose outputs are distilled (``--distill hidden`` / ``both``),
            named the same in the (unwrapped) model and the teacher; ``None``: logits only.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    progress: TrainProgress
    total_steps: int
    epochs: int
    teacher: nn.Module | None = None
    hidden_paths: list[str] | None = None


def train_loop(
    accelerator: Any,
    state: TrainingState,
    data: DataBundle,
    *,
    label_smoothing: float = 0.0,
    distill: str = "logits",
    distill_alpha: float = 0.5,
    distill_temperature: float = 2.0,
    distill_hidden_weight: float = 1.0,
    max_grad_norm: float | None = None,
    on_step: Callable[[TrainProgress], None] | None = None,
    show_progress: bool = True,
) -> tuple[dict[str, float], float]:
    """Train from ``state.progress`` to ``state.total_steps``; evaluate after every epoch.

    With a teacher the loss is ``(1 - a) task + a D``, where ``D`` is, as ``distill`` says, the logits
    term ``T^2 KL`` (``"logits"``), ``w`` times the hidden-state term (``"hidden"``: TinyBERT-style
    ``MSE / Var(teacher)`` of the outputs of ``state.hidden_paths``, recorded with forward hooks, so
    timm and transformers models alike), or their sum (``"both"``).

    With ``max_grad_norm`` the gradients' global L2 norm is clipped to it before each optimizer step (once per step,
    after the last micro-batch of an accumulation group: ``accelerator.clip_grad_norm_``, which unscales fp16
    gradients first).

    Logs ``train_loss`` (the mean over the last 10 optimizer steps' micro-batches, averaged over
    processes; ``distill_hidden_loss`` likewise, when hidden states are distilled), ``lr`` and, with
    ``max_grad_norm``, ``grad_norm`` (the logged step's norm before clipping, as transformers' Trainer logs it) every
    10 steps, and the held-out metrics after each epoch, through ``accelerator.log``. ``on_step`` is
    called after every optimizer step (checkpointing).

    Returns:
        The last metrics (``train_loss`` and the held-out ones) and the training wall time in seconds.
    """
    from tqdm.auto import tqdm

    model, optimizer, scheduler, progress = state.model, state.optimizer, state.scheduler, state.progress
    train_loader, teacher = state.train_loader, state.teacher
    model.train()
    bar = tqdm(
        total=state.total_steps,
        initial=progress.global_step,
        desc="finetune",
        dynamic_ncols=True,
        disable=not show_progress or not accelerator.is_local_main_process,
    )
    metrics: dict[str, float] = dict(progress.last_train)  # resumed: what the run had logged
    start = time.perf_counter()

    def log(values: dict[str, float]) -> None:
        accelerator.log(values, step=progress.global_step)
        progress.metrics_lines += 1  # one metrics.jsonl line per call (written by the main process)

    hidden_paths = state.hidden_paths if teacher is not None and distill != "logits" else None
    hooks = contextlib.ExitStack()  # the forward hooks that record the hidden states, removed at the end
    if hidden_paths:
        student_states = hooks.enter_context(HiddenStates(accelerator.unwrap_model(model), hidden_paths))
        teacher_states = hooks.enter_context(HiddenStates(teacher, hidden_paths))

    # the hidden term's token count and teacher variance are the global batch's, as with one process
    all_reduce = (lambda x: accelerator.reduce(x, "sum")) if accelerator.num_processes > 1 else None

    def distillation_term(inputs: Any, out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        term = torch.zeros((), device=out.device)
        if distill in ("logits", "both"):
            term = term + distillation_loss(out, teacher_out, data.task, distill_temperature)
        if hidden_paths:
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            hidden = hidden_state_distillation_loss(
                student_states.states, teacher_states.states, mask=mask, all_reduce=all_reduce
            )
            progress.running_hidden += hidden.detach().float().item()
            term = term + distill_hidden_weight * hidden
        return term

    grad_norm = None  # the last optimizer step's gradient norm before clipping (with max_grad_norm)
    done = progress.global_step >= state.total_steps
    with hooks:
        while not done and progress.epoch < state.epochs:
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
                        out = logits_of(model, inputs)
                        loss = task_loss(out, target, data.task, label_smoothing)
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_out = logits_of(teacher, inputs)
                            kd = distillation_term(inputs, out, teacher_out)
                            loss = (1 - distill_alpha) * loss + distill_alpha * kd
                    value = loss.detach().float()
                    if accelerator.num_processes > 1:  # every process stops together, before a NaN gradient is averaged
                        value = accelerator.reduce(value, "sum")
                    if not torch.isfinite(value):
                        raise NonFiniteLossError(progress.global_step + 1, progress.epoch, value.item())
                    scale = accumulation_scale(
                        progress.batches_done, len(train_loader), accelerator.gradient_accumulation_steps
                    )
                    accelerator.backward(loss * scale if scale != 1 else loss)
                    if max_grad_norm is not None and accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    if step_overflows(optimizer):  # in every process alike: the gradients are synced
                        raise NonFiniteLossError(progress.global_step + 1, progress.epoch, math.inf, overflow=True)
                    optimizer.zero_grad()
                progress.batches_done += 1
                progress.running_loss += loss.detach().float().item()
                progress.running_count += 1
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                progress.global_step += 1
                bar.update(1)
                if progress.global_step % 10 == 0 or progress.global_step == state.total_steps:
                    means = [
                        progress.running_loss / progress.running_count,
                        progress.running_hidden / progress.running_count,
                    ]
                    means = accelerator.reduce(torch.tensor(means, device=accelerator.device), "mean").tolist()
                    train_loss = means[0]
                    bar.set_postfix(loss=f"{train_loss:.4f}")
                    epoch = _epochs_done(progress, len(train_loader))
                    values = {"train_loss": train_loss, "lr": scheduler.get_last_lr()[0], "epoch": epoch}
                    if hidden_paths:
                        values["distill_hidden_loss"] = means[1]
                    if grad_norm is not None:
                        values["grad_norm"] = float(grad_norm)
                    log(values)
                    progress.last_train = {k: v for k, v in values.items() if k not in ("lr", "epoch", "grad_norm")}
                    metrics.update(progress.last_train)
                    progress.running_loss, progress.running_count, progress.running_hidden = 0.0, 0, 0.0
                if on_step is not None:
                    on_step(progress)
                if progress.global_step >= state.total_steps:
                    done = True
                    break
            if not done or progress.batches_done >= len(train_loader):
                progress.epoch += 1
                progress.batches_done = 0
            eval_metrics = evaluate(accelerator, model, state.eval_loader, data)
            metrics.update(eval_metrics)
            epoch = _epochs_done(progress, len(train_loader))
            log({**eval_metrics, "epoch": epoch})
            summary = ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
            accelerator.print(f"epoch {epoch:g} step {progress.global_step}: {summary}", flush=True)
    bar.close()
    if "eval_loss" not in metrics:  # resumed from the last step's checkpoint: the final evaluation is still due
        eval_metrics = evaluate(accelerator, model, state.eval_loader, data)
        metrics.update(eval_metrics)
        log({**eval_metrics, "epoch": _epochs_done(progress, len(state.train_loader))})
    return metrics, time.perf_counter() - start


def accumulation_scale(index: int, batches_per_epoch: int, accumulation_steps: int) -> float:
    """The factor on micro-batch ``index``'s loss (0-based, in its epoch) that makes each optimizer step the mean
    of its micro-batches' gradients.

    accelerate divides every loss by ``accumulation_steps``, and the last group of an epoch whose
    ``batches_per_epoch`` is not a multiple of it holds only ``r = batches_per_epoch % accumulation_steps``
    micro-batches (accelerate steps at the end of the loader): their gradient would be ``r / accumulation_steps``
    of a mean. They get ``accumulation_steps / r``; every other micro-batch 1.
    """
    partial = batches_per_epoch % accumulation_steps
    return accumulation_steps / partial if partial and index >= batches_per_epoch - partial else 1.0


def _epochs_done(progress: TrainProgress, batches_per_epoch: int) -> float:
    """Epochs trained so far, counting a partial one (as transformers' Trainer logs them): 1 after the first
    whole epoch, 0.14 when ``--max-steps`` stopped a seventh of the way into it."""
    return round(progress.epoch + progress.batches_done / max(batches_per_epoch, 1), 2)
