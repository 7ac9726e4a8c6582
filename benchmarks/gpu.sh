#!/usr/bin/env bash
# The full GPU matrix on one GPU, sized for 8 minutes on one H100:
#   1. preset "gpu": our B0/B2/B4 variants (G1-BN, G1-GN, G16-BN, G16-GN e4, G16-LN+PN e4) and
#      every installed peer, bf16 autocast, NCHW and channels-last, train and infer; cases run in
#      order (each size's peers right after it) and none starts after BUDGET_S seconds (default
#      300), so the run ends with rows for what fitted and skipped rows for the rest;
#   2. B0 in fp32 and fp16: ours (G1-BN, G16-LN+PN) against timm B0 / G16 (budget 120 s);
#   3. one Markdown report (report-gpu.md) and plots from both result files. Every row says
#      whether its layout was the faster one; the report shows G16 vs G1 and LN+PN vs BN per
#      layout with utilisation. Out of memory, a case retries at half the batch.
# Usage: benchmarks/gpu.sh [extra python -m benchmarks options]   (PY=python to use)
#        DRY=1 benchmarks/gpu.sh   CPU dry run of every step at a toy size, into a temp folder
#        COMPILE=1 adds a torch.compile pass for B0 (compilation is in the warm-up, not timed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
if [[ "${DRY:-0}" == 1 ]]; then
  OUT=${OUT:-$(mktemp -d)}
  TOY=(--device cpu --models b0 --res 32 --batch 2 --warmup 0 --steps 1)
else
  OUT=${OUT:-benchmarks/results}
  TOY=()
fi
run() { "$PY" -m benchmarks --no-report "$@" "${TOY[@]}"; }

run --preset gpu --budget-s "${BUDGET_S:-300}" --out "$OUT/gpu-cuda" "$@"
run --preset gpu --models b0 --variants g1-e6-bn,g16-e4-ln+pn --precisions fp32,fp16 \
    --peers timm/efficientnet_b0,timm/efficientnet_b0_g16_evos --budget-s 120 \
    --out "$OUT/gpu-cuda-precision" "$@"
if [[ "${COMPILE:-0}" == 1 ]]; then
  run --preset gpu --models b0 --variants g1-e6-bn,g16-e4-ln+pn --compile on --budget-s 120 \
      --peers timm/efficientnet_b0 --out "$OUT/gpu-cuda-compiled" "$@"
fi
"$PY" -m benchmarks.report "$OUT"/gpu-cuda*.jsonl --out "$OUT/report-gpu.md"
echo "results and report in $OUT"
