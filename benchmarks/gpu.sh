#!/usr/bin/env bash
# The full GPU matrix on one GPU, sized for about 8 minutes on one H100:
#   1. our B0/B2/B4 variants (G1-BN, G1-GN, G16-BN, G16-GN e4, G16-LN+PN e4) and the peers,
#      bf16 autocast, NCHW and channels-last (the report flags the faster layout per variant);
#   2. B0 in fp32 and fp16 for ours (G1-BN, G16-LN+PN) against timm B0 / G16;
#   3. the Markdown report and plots from every result file.
# Usage: benchmarks/gpu.sh            (on a CUDA machine; PY=path/to/python to choose Python)
#        DRY=1 benchmarks/gpu.sh      (CPU dry run of every step at a toy size, into a temp folder)
# COMPILE=1 adds a torch.compile pass for B0 (compile time is not counted in step times).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
if [[ "${DRY:-0}" == 1 ]]; then
  OUT=${OUT:-$(mktemp -d)}
  TOY=(--device cpu --models b0 --res 32 --batch 2 --warmup 0 --steps 1)
  LIMIT=600
else
  OUT=${OUT:-benchmarks/results}
  TOY=()
  LIMIT=300  # per command: a hung step cannot eat the whole budget
fi
run() { timeout "$LIMIT" "$PY" -m benchmarks "$@" "${TOY[@]}"; }

run --preset gpu --out "$OUT/gpu-cuda"
run --preset gpu --models b0 --variants g1-e6-bn,g16-e4-ln+pn --precisions fp32,fp16 \
    --layouts nchw,channels_last --peers timm/efficientnet_b0,timm/efficientnet_b0_g16_evos \
    --out "$OUT/gpu-cuda-precision"
if [[ "${COMPILE:-0}" == 1 ]]; then
  run --preset gpu --models b0 --variants g1-e6-bn,g16-e4-ln+pn --compile on \
      --peers timm/efficientnet_b0 --out "$OUT/gpu-cuda-compiled"
fi
"$PY" -m benchmarks.report "$OUT"/gpu-cuda*.jsonl --out "$OUT/report-gpu.md"
echo "results and report in $OUT"
