#!/usr/bin/env bash
# The full-protocol runs behind docs/RESULTS.md, as they were run (from the repository root, with
# ../shared/data present). Each writes docs/results/<name>/; then regenerate the page:
#   python benchmarks/paper/make_results.py
# On 2 shared CPU cores they took hours each (RESULTS.md gives every wall time); on a quiet
# machine, run several at once, one torch thread each.
set -euo pipefail
paper() { nice -n 19 han-surgery paper "$@" --threads 1; }

# Table 2 (Section 3.2)
paper approximation --out docs/results/approximation

# Table 3 (Section 4). Rows a, b, e, f1 and FCNet were run earlier, by the single-run trainer of the
# same protocol (docs/results/checkerboard*/results.json keep their exact commands); today's
# equivalent is the first line. The second adds rows c, d, f2; the last two the diagnostics of row e.
# paper checkerboard --variants a,b,e,f1,fcnet --compile --out docs/results/checkerboard
paper checkerboard --variants c,d,f2 --compile --out docs/results/checkerboard_cdf2
paper checkerboard --variants e-default,e-kaiming,e-6x100 --lrs 0.005,0.01,0.025,0.05 --compile \
  --out docs/results/checkerboard_e_diagnostics
paper checkerboard --variants e-default,e-6x100 --lrs 0.0005,0.001,0.0025,0.1,0.25 --compile \
  --out docs/results/checkerboard_e_diagnostics_lrs

# Table 6 (Section 5.1)
paper mnist --out docs/results/mnist

# Table 9 (Section 5.2): both column groups, 300 epochs, 5 seeds x 2 lrs per model
for ds in bikesharing calhousing elevators; do
  paper regression --datasets "$ds" --compile --out "docs/results/regression_$ds"
done

# Tables 12 and 14 need the datasets (not on the CI machine), and a GPU in practice:
# han-surgery paper mixer --data /path/to/cifar --out docs/results/mixer_cifar10
# han-surgery paper mobilevit --data /path/to/cifar --out docs/results/mobilevit_cifar10
