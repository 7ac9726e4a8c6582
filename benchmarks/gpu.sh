#!/usr/bin/env bash
# The full matrix on one GPU (preset "gpu": B0, B2, B4 × G1/G16 × BN/GN/LN+PN, bf16 autocast,
# NCHW and channels-last, train and infer, and every installed peer), sized for 8 minutes on one
# H100: cases run in order (each size's peers right after it) and none starts after BUDGET_S
# seconds (default 420), so the run ends with rows for what fitted and skipped rows for the rest.
# Out of memory, a case retries at half the batch. The report (<out>.md) picks the faster layout
# per variant and shows G16 vs G1 and LN+PN vs BN per layout with utilisation.
#
#   benchmarks/gpu.sh                                   # on the GPU machine
#   benchmarks/gpu.sh --device cpu --models b0 --res 32 --batch 2 --steps 1 --warmup 0 \
#       --out /tmp/gpu-dry-run                          # dry run of the same path on a CPU
# Extra arguments go to `python -m benchmarks` and override the preset's axes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
exec "$PY" -m benchmarks --preset gpu --budget-s "${BUDGET_S:-420}" \
    --out "${OUT:-benchmarks/results/gpu-cuda}" "$@"
