"""Parameters and MACs of every registered Han timm model and its base model -> model_cards/MODELS.md.

MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products,
convolutions and attention, a multiply-add being 2 FLOPs, so MACs = FLOPs / 2) for one image
at the model's default input size, in eval mode. PyTorch has no FLOP formula for its CPU
flash-attention kernel, so one is supplied (:func:`_sdpa_cpu`, the standard
``sdpa_flop_count``). Householder layers count by the formulas that :mod:`han_surgery.kernels.flops`
registers (``2kn + k^2`` MACs per vector of width ``n`` with ``k`` reflections), the same on the CPU
kernel and inside :func:`han_surgery.kernels.disabled`. Element-wise work (norms, activations, ``|.|``,
softmax, bias adds) is not counted, as usual for MAC tables.

Usage (from the repository root)::

    python benchmarks/model_table.py            # writes model_cards/MODELS.md
    python benchmarks/model_table.py --out -    # print only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import han_surgery  # noqa: F401  (registers han_* with timm)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "model_cards" / "MODELS.md"

# (Han model, its base model, the paper's row). Base "-" : no base (the row is itself a baseline).
ROWS = [
    ("han_mixer_m0h0_32", None, "CNN stem"),
    ("han_mixer_m2h0_32", None, "MLP(2)"),
    ("han_mixer_m4h0_32", None, "MLP(4)"),
    ("han_mixer_m0h16_32", "han_mixer_m0h0_32", "MLP(0)+Han(16)"),
    ("han_mixer_m1h16_32", None, "MLP(1)+Han(16)"),
    ("han_mixer_m2h16_32", "han_mixer_m2h0_32", "MLP(2)+Han(16)"),
    ("han_mixer_m4h16_32", "han_mixer_m4h0_32", "MLP(4)+Han(16)"),
    ("han_mixer_s16_224", "mixer_s16_224", "(not in the paper)"),
    ("han_mixer_b16_224", "mixer_b16_224", "(not in the paper)"),
    ("han_mobilevit_xxs", "mobilevit_xxs", "Han-MobileViT-XXS"),
    ("han_mobilevit_xs", "mobilevit_xs", "Han-MobileViT-XS"),
    ("han_mobilevit_s", "mobilevit_s", "Han-MobileViT-S"),
]


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``softmax(Q K^T) V`` for the CPU flash-attention kernel (Q K^T and A V products)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count(name: str) -> tuple[int, int, tuple[int, ...]]:
    """``(parameters, MACs, input_size)`` of ``timm.create_model(name)`` at its default input."""
    model = timm.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    input_size = tuple(model.pretrained_cfg["input_size"])
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu}
    )
    with torch.no_grad(), counter:
        model(torch.zeros(1, *input_size))
    return params, counter.get_total_flops() // 2, input_size


def _m(n: int) -> str:
    return f"{n / 1e6:.3f} M"


def _g(n: int) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e8 else f"{n / 1e6:.1f} M"


def table() -> str:
    cache: dict[str, tuple[int, int, tuple[int, ...]]] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = count(name)
        return cache[name]

    lines = [
        "| model | paper row | input | params | MACs | base model | base params | base MACs | params vs. base |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, base, row in ROWS:
        p, macs, size = get(name)
        if base:
            bp, bmacs, _ = get(base)
            base_cols = f"`{base}` | {_m(bp)} | {_g(bmacs)} | {p / bp:.2f}x"
        else:
            base_cols = "- | | |"
        lines.append(f"| `{name}` | {row} | {size[1]}x{size[2]} | {_m(p)} | {_g(macs)} | {base_cols} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(OUT), help="markdown file whose table block to rewrite ('-' to print)")
    args = parser.parse_args(argv)
    begin, end = "<!-- table:begin (benchmarks/model_table.py) -->", "<!-- table:end -->"
    out = Path(args.out)
    doc = f"{begin}\n{end}\n"
    if args.out != "-" and out.exists():  # checked before counting every model
        try:
            doc = out.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"--out {out}: cannot read it ({exc})")
        if begin not in doc or end not in doc.split(begin, 1)[1]:
            parser.error(f"--out {out} has no {begin} ... {end} block to rewrite ('-' prints the table)")
    text = table()
    if args.out == "-":
        print(text)
        return text
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    out.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
    print(text)
    print(f"wrote {out}")
    return text


if __name__ == "__main__":
    main()
