#!/usr/bin/env bash
# The full-protocol runs behind docs/RESULTS.md: one command per folder of docs/results/ (calibration/
# excepted: docs/CALIBRATION.md says where it comes from), each the "command" that the folder's
# results.json records, run from the repository root with ../shared/data present. Then regenerate the page:
#   python benchmarks/paper/make_results.py
# Where a run wrote to another folder (--out /work/out/<name>, copied to docs/results/ afterwards), --out
# here is docs/results/<name>. On 2 shared CPU cores they took hours each (RESULTS.md gives every wall
# time); on a quiet machine, run several at once, one torch thread each.
set -euo pipefail

# Table 2 (Section 3.2)
nice -n 19 han-surgery paper approximation --out docs/results/approximation --threads 1

# Table 3 (Section 4). Rows a, fcnet (checkerboard/) and b, e, f1 (checkerboard_ablation*/, two lrs each)
# were run by the single-run trainer of the same protocol (commits bb62225 and bf1e37c) with `--jobs 2`
# (parallel processes), an option since removed; the stacked trainer of today reproduces single runs to
# float rounding (tests/test_paper_stacked.py). Recorded:
#   han-surgery paper checkerboard --variants a,fcnet --jobs 2 --compile --out docs/results/checkerboard
#   han-surgery paper checkerboard --out docs/results/checkerboard_ablation --variants b,e,f1 --lrs 0.05,0.1 --jobs 2 --compile
#   han-surgery paper checkerboard --out docs/results/checkerboard_ablation_lr2 --variants b,e,f1 --lrs 0.025,0.075 --jobs 2 --compile
# and the same without --jobs today (`--variants a,b,e,f1,fcnet --compile` runs all five in one folder):
nice -n 19 han-surgery paper checkerboard --variants a,fcnet --compile --out docs/results/checkerboard
nice -n 19 han-surgery paper checkerboard --out docs/results/checkerboard_ablation --variants b,e,f1 --lrs 0.05,0.1 --compile
nice -n 19 han-surgery paper checkerboard --out docs/results/checkerboard_ablation_lr2 --variants b,e,f1 --lrs 0.025,0.075 --compile
# Rows c, d, f2 (recorded with --out /work/out/checkerboard_cdf2), then the diagnostics of row e.
nice -n 19 han-surgery paper checkerboard --out docs/results/checkerboard_cdf2 --variants c,d,f2 --compile --threads 1
nice -n 19 han-surgery paper checkerboard --out docs/results/checkerboard_e_diagnostics \
  --variants e-default,e-kaiming,e-6x100 --lrs 0.005,0.01,0.025,0.05 --compile --threads 1

# Table 6 (Section 5.1): the unprotected and defended FCNets, HanNet, then CW with early abort (no PGD)
nice -n 19 han-surgery paper mnist --out docs/results/mnist_fcnet --models fcnet,fcnet-at,fcnet-trades --threads 1
nice -n 19 han-surgery paper mnist --out docs/results/mnist_hannet --models hannet --threads 1
nice -n 19 han-surgery paper mnist --out docs/results/mnist_cw_abort --models hannet,fcnet --linf-eps '' --l2-eps '' \
  --cw-abort-early --threads 1

# Table 9 (Section 5.2): both column groups, 300 epochs, 5 seeds x 2 lrs per model (bikesharing and
# elevators recorded with --out /work/out/regression_<dataset>)
nice -n 19 han-surgery paper regression --out docs/results/regression_bikesharing --datasets bikesharing --threads 1
nice -n 19 han-surgery paper regression --out docs/results/regression_calhousing --datasets calhousing --threads 1
nice -n 19 han-surgery paper regression --out docs/results/regression_elevators --datasets elevators --threads 1

# Tables 12 and 14 need the datasets (not on the CI machine), and a GPU in practice; docs/results/ holds
# no run of them:
# han-surgery paper mixer --data /path/to/cifar --out docs/results/mixer_cifar10
# han-surgery paper mobilevit --data /path/to/cifar --out docs/results/mobilevit_cifar10
