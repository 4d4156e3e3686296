#!/usr/bin/env bash
# Hanify a timm ViT, fine-tune it on MNIST 10k with `accelerate launch` (2 CPU processes) and
# distillation from the original, plain and calibrated, and produce Hub-ready folders. Then print the results table
# (python examples/summarize_walkthrough.py); with UPDATE_README=1, also write it into examples/README.md
# (only for a run worth publishing: the default data and epochs).
#
#   bash examples/mnist_walkthrough.sh [DATA] [RUNS]
#   UPDATE_README=1 bash examples/mnist_walkthrough.sh      # the same, and rewrite examples/README.md's table
#
# DATA defaults to ../shared/data/mnist/mnist10k.npz (10,000 real MNIST digits, `images` (N,28,28)
# uint8 and `labels`); any .npz with the same keys works. About 4 minutes on 2 quiet CPU cores (238 s at
# 888aeb9), twice that or more when they are busy (BASE_EPOCHS=3 FT_EPOCHS=2 for a shorter version).
#
# Runs with the `python` on PATH (an activated venv; `PYTHON=.venv/bin/python bash examples/mnist_walkthrough.sh`
# after `make demo` or `make test` without one). DATA and RUNS may be relative to the current directory.
set -euo pipefail
PYTHON=${PYTHON:-python}
DATA=$(realpath -m "${1:-$(dirname "$0")/../../shared/data/mnist/mnist10k.npz}")
RUNS=$(realpath -m "${2:-$(dirname "$0")/../runs/mnist}")
cd "$(dirname "$0")/.."
BASE_EPOCHS=${BASE_EPOCHS:-10}   # the base model, from scratch
FT_EPOCHS=${FT_EPOCHS:-3}        # each fine-tune after it
LAUNCH=("$PYTHON" -m accelerate.commands.launch --config_file examples/accelerate_cpu_2proc.yaml -m han_surgery.finetune)
# A 4-block ViT from timm's vit_tiny_patch16_224, resized for 28x28 digits (7x7 patches: 16 tokens).
VIT='{"patch_size": 7, "embed_dim": 128, "depth": 4, "num_heads": 4}'
COMMON=(--data "$DATA" --batch-size 32 --lr 1e-3 --warmup-steps 30 --seed 0 --checkpoint-every 100 --overwrite)
mkdir -p "$RUNS"
start=$(date +%s)

# 1. The base model: a timm ViT trained from scratch (no download).
"${LAUNCH[@]}" --model vit_tiny_patch16_224 --model-kwargs "$VIT" --epochs "$BASE_EPOCHS" --output-dir "$RUNS/base" "${COMMON[@]}"

# 2. Control: the same base, FT_EPOCHS more epochs without surgery (what the fine-tunes below are compared to).
"${LAUNCH[@]}" --model "$RUNS/base" --epochs "$FT_EPOCHS" --output-dir "$RUNS/base_more" "${COMMON[@]}"

# 3. Hanify it (every MLP block -> Han-block H2|H1 x + b1| + b2, pre-norm dropped, residual kept), fine-tune.
"${LAUNCH[@]}" --model "$RUNS/base" --hanify --epochs "$FT_EPOCHS" --output-dir "$RUNS/hanified" "${COMMON[@]}"

# 4. The same, with knowledge distillation from the un-hanified original.
"${LAUNCH[@]}" --model "$RUNS/base" --hanify --distill-from base --epochs "$FT_EPOCHS" --output-dir "$RUNS/hanified_distilled" "${COMMON[@]}"

# 5. Calibrated surgery: each Han-block (with a per-channel gain, input scale and a rank-8 side path) is first
#    fitted to the MLP it replaces on the training split, then healed by hidden-state and logit distillation.
"${LAUNCH[@]}" --model "$RUNS/base" --hanify --gain --input-scale --side-rank 8 --calibrate train \
    --distill-from base --distill both --epochs "$FT_EPOCHS" --output-dir "$RUNS/hanified_calibrated" "${COMMON[@]}"

echo "walkthrough wall time: $(( $(date +%s) - start )) s" | tee "$RUNS/wall_time.txt"
SUMMARY=("$PYTHON" examples/summarize_walkthrough.py "$RUNS" --data "$DATA")
if [[ "${UPDATE_README:-0}" == 1 ]]; then
    "${SUMMARY[@]}" --readme examples/README.md   # prints the table and rewrites examples/README.md's
else
    "${SUMMARY[@]}"   # prints the table only (UPDATE_README=1 writes it into examples/README.md)
fi
