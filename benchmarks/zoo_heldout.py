"""Held-out families: does hanify work on architectures the test zoo (``tests/_surgery_zoo.py``) does not have?

For 30 timm and 30 transformers architectures of the kinds people fine-tune, all but two of them
absent from the test zoo (``efficientvit_b0`` and ``efficientformerv2_s0`` are there as tiny configs,
here at their real widths), each built with random weights (timm: its smallest variant at a small input size;
transformers: a tiny config), it checks, in order:

1. ``hanify(model)`` rewrites at least one block;
2. a training-mode forward and backward run, with finite gradients;
3. ``save_pretrained`` then ``from_pretrained`` gives bit-identical eval outputs.

It prints one line per architecture (``pass`` with the rules that fired and the parameter counts,
or ``FAIL`` with the step and the reason) and the pass count of each list. Slow (several minutes
on 2 CPU cores): a benchmark, not a test.

Usage (from the repository root)::

    python benchmarks/zoo_heldout.py                 # both lists
    python benchmarks/zoo_heldout.py --only timm     # or: --only transformers, --match 'vit*'
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import transformers as T

from han_surgery import from_pretrained, hanify, save_pretrained
from han_surgery.checks import thread_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test zoo's tiny configs and helpers
from _surgery_zoo import (  # noqa: E402
    AUDIO,
    BERTLIKE,
    DECODER,
    PIXELS,
    SEQ2SEQ,
    SMALL,
    TOKENS,
    WAVE,
    output_tensor,
    seq2seq_inputs,
)

Build = Callable[[], tuple[torch.nn.Module, dict]]

# name -> input size (None: the variant's default)
HELDOUT_TIMM: dict[str, int | None] = {
    "poolformerv2_s12": 64,
    "twins_pcpvt_small": 64,
    "volo_d1_224": None,
    "samvit_base_patch16_224": None,
    "flexivit_small": None,
    "beitv2_base_patch16_224": None,
    "efficientvit_b0": 64,
    "efficientvit_m0": None,
    "gcvit_xxtiny": None,
    "nextvit_small": 64,
    "visformer_tiny": None,
    "tnt_s_patch16_224": None,
    "crossvit_tiny_240": None,
    "caformer_s18": 64,
    "convformer_s18": 64,
    "mvitv2_tiny": None,
    "vit_small_patch16_rope_224": None,
    "swiftformer_xs": None,
    "efficientformerv2_s0": None,
    "mambaout_femto": 64,
    "vitamin_small_224": None,
    "hieradet_small": None,
    "vit_small_patch14_dinov2": None,
    "vit_base_patch16_siglip_224": None,
    "vit_base_patch16_clip_224": None,
    "iformer_t": None,
    "lowformer_b0": None,
    "shvit_s1": None,
    "csatv2_21m": None,
    "mobilenetv4_hybrid_medium": 64,
}

# model_type -> (inputs, config kwargs)
HELDOUT_TRANSFORMERS: dict[str, tuple[Callable[[], dict], dict]] = {
    "xlm-roberta": (TOKENS, dict(BERTLIKE, pad_token_id=1)),
    "camembert": (TOKENS, dict(BERTLIKE, pad_token_id=1)),
    "convbert": (TOKENS, dict(BERTLIKE, embedding_size=32)),
    "layoutlm": (TOKENS, BERTLIKE),
    "megatron-bert": (TOKENS, BERTLIKE),
    "funnel": (
        TOKENS,
        dict(
            d_model=32,
            n_head=2,
            d_head=16,
            d_inner=64,
            block_sizes=[1, 1],
            vocab_size=100,
            architectures=["FunnelModel"],
        ),
    ),
    "gpt_neo": (
        TOKENS,
        dict(hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]], vocab_size=100),
    ),
    "gptj": (TOKENS, dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, vocab_size=100, n_positions=64)),
    "codegen": (TOKENS, dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, vocab_size=100, n_positions=64, n_ctx=64)),
    "phi3": (TOKENS, dict(DECODER, pad_token_id=0)),
    "gemma": (TOKENS, DECODER),
    "olmo2": (TOKENS, DECODER),
    "stablelm": (TOKENS, dict(BERTLIKE, num_key_value_heads=2)),
    "starcoder2": (TOKENS, DECODER),
    "granite": (TOKENS, DECODER),
    "biogpt": (TOKENS, BERTLIKE),
    "xglm": (TOKENS, dict(d_model=32, num_layers=2, attention_heads=2, ffn_dim=64, vocab_size=100)),
    "marian": (seq2seq_inputs, SEQ2SEQ),
    "m2m_100": (seq2seq_inputs, SEQ2SEQ),
    "umt5": (seq2seq_inputs, dict(d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=100)),
    "hubert": (WAVE, AUDIO),
    "wavlm": (WAVE, AUDIO),
    "data2vec-audio": (WAVE, dict(AUDIO, conv_pos_kernel_size=4, num_conv_pos_embeddings=4)),
    "beit": (PIXELS(32), dict(SMALL, image_size=32, patch_size=8)),
    "vit_mae": (
        lambda: {**PIXELS(32)(), "noise": torch.rand(2, 16)},
        dict(SMALL, image_size=32, patch_size=8, decoder_hidden_size=32, decoder_intermediate_size=64),
    ),
    "swinv2": (
        PIXELS(32),
        dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
    ),
    "pvt_v2": (PIXELS(32), dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2])),
    "glpn": (
        PIXELS(32),
        dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2]),
    ),
    "olmoe": (TOKENS, dict(DECODER, num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (TOKENS, dict(DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)),
}


def timm_builder(name: str, size: int | None) -> Build:
    def build():
        model = timm.create_model(name, pretrained=False, num_classes=5)
        s = size or model.pretrained_cfg["input_size"][1]
        return model, {"x": torch.randn(2, 3, s, s)}

    return build


def transformers_builder(model_type: str, inputs: Callable[[], dict], kwargs: dict) -> Build:
    def build():
        return T.AutoModel.from_config(T.AutoConfig.for_model(model_type, **kwargs)), inputs()

    return build


def check(build: Build) -> str:
    """``"pass ..."`` or ``"FAIL <step>: <reason>"`` (see the module docstring)."""
    torch.manual_seed(0)
    step = "build"
    try:
        model, inputs = build()
        step = "hanify"
        report = hanify(model.eval())
        if not report.rewrites:
            reasons = "; ".join(f"{s.path}: {s.reason}" for s in report.skipped[:2]) or "no candidate"
            return f"FAIL hanify: 0 blocks rewritten ({reasons})"
        step = "forward/backward"
        model.train()
        output_tensor(model(**inputs)).float().square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or not all(torch.isfinite(g).all() for g in grads):
            return "FAIL forward/backward: no or non-finite gradients"
        step = "save/reload"
        model.eval()
        with torch.no_grad():
            expected = output_tensor(model(**inputs))
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(model, tmp)
            with torch.no_grad():
                got = output_tensor(from_pretrained(tmp)(**inputs))
        if not torch.equal(got, expected):
            return f"FAIL save/reload: outputs differ by {(got - expected).abs().max().item():.3g}"
    except Exception as e:  # a benchmark reports every failure and goes on
        return f"FAIL {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    rules = ", ".join(f"{r} x{n}" for r, n in Counter(r.rule for r in report.rewrites).items())
    return (
        f"pass  {len(report.rewrites)} rewritten ({rules}), {len(report.skipped)} skipped; "
        f"parameters {report.params_before:,} -> {report.params_after:,}"
    )


def run(title: str, builders: dict[str, Build]) -> int:
    print(f"\n{title}", flush=True)
    passed = 0
    for name, build in builders.items():
        start = time.perf_counter()
        result = check(build)
        passed += result.startswith("pass")
        print(f"  {name:32s} {result}  [{time.perf_counter() - start:.1f} s]", flush=True)
    print(f"{title}: {passed}/{len(builders)} pass", flush=True)
    return passed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("timm", "transformers"), help="run one list")
    parser.add_argument("--match", default="*", help="only architectures matching this glob")
    parser.add_argument("--threads", type=thread_count, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    T.logging.set_verbosity_error()
    lists = {
        "timm": {n: timm_builder(n, s) for n, s in HELDOUT_TIMM.items()},
        "transformers": {t: transformers_builder(t, i, k) for t, (i, k) in HELDOUT_TRANSFORMERS.items()},
    }
    for title, builders in lists.items():
        if args.only in (None, title):
            run(title, {n: b for n, b in builders.items() if fnmatch.fnmatch(n, args.match)})


if __name__ == "__main__":
    main()
