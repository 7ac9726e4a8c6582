#!/usr/bin/env bash
# The full GPU matrix on one GPU, sized for an 8-minute slot of one H100:
#   1. preset "gpu": our B0/B2/B4 variants (G1-BN, G1-GN, G16-BN e6, G16-BN/LN+PN/GN e4) and every
#      installed peer, bf16 autocast, NCHW and channels-last, train and infer; cases run in order
#      (each size's peers right after it), so a run cut by time has whole sizes first;
#   2. B0 in fp32 (TF32 where cuDNN uses it, and so the peak) and fp16: ours G1-BN, G16-BN e6,
#      G16-BN/LN+PN e4 against timm B0 / G16;
#   3. with COMPILE=1, a torch.compile pass for B0 (compilation is in the warm-up, not timed);
#   4. one Markdown report (report-gpu.md) and plots from the result files this run wrote, always,
#      also when a step fails or is cut short. The report shows G16 vs G1 and LN+PN vs BN per
#      layout and precision with utilisation; every row says whether its layout was the faster.
#      Out of memory, a case retries at half the batch.
# Time: TOTAL_S (default 420 s, a minute under the slot) covers the whole script. Each step may
# use what is left minus what the later steps and the report are kept (PRECISION_S; COMPILE_S with
# COMPILE=1; REPORT_S). It passes the harness a --budget-s of that share minus START_S (interpreter,
# imports, CUDA context: before the harness's clock starts) and SLACK_S (the case in flight; the
# harness starts a case only when the cases before it say it ends within the budget). A step still
# running at the end of its share gets SIGINT, writes the rows it has, and is killed 15 s later if
# it has not ended. A step whose budget would be under its minimum is skipped.
# Usage: benchmarks/gpu.sh [extra python -m benchmarks options]   (PY=python to use)
#        DRY=1 benchmarks/gpu.sh   CPU dry run of every step at a toy size, into a temp folder
#        COMPILE=1 adds step 3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
TOTAL_S=${TOTAL_S:-420} REPORT_S=${REPORT_S:-20} START_S=${START_S:-20} SLACK_S=${SLACK_S:-20}
PRECISION_S=${PRECISION_S:-130}  # kept for step 2
KEEP_COMPILE=0                    # kept for step 3: COMPILE_S, only when it runs
if [[ "${COMPILE:-0}" == 1 ]]; then KEEP_COMPILE=${COMPILE_S:-150}; fi
if [[ "${DRY:-0}" == 1 ]]; then
  OUT=${OUT:-$(mktemp -d)}
  TOY=(--device cpu --models b0 --res 32 --batch 2 --warmup 0 --steps 1)
else
  OUT=${OUT:-benchmarks/results}
  TOY=()
fi
mkdir -p "$OUT"
FILES=()   # the result files this run wrote: only they go into the report
FAILED=0

# step NAME KEEP_S MIN_S [options]: one harness run into $OUT/NAME, leaving KEEP_S for later steps.
step() {
  local name=$1 keep=$2 min=$3
  shift 3
  local share=$((TOTAL_S - SECONDS - REPORT_S - keep))
  local budget=$((share - START_S - SLACK_S))
  if ((share <= 0 || budget < min)); then  # timeout 0 would mean no limit at all
    echo "skip $name: at ${SECONDS} s its share would be ${share} s (budget ${budget} s, needs ${min} s)" >&2
    return 0
  fi
  local limit=()
  if command -v timeout >/dev/null; then limit=(timeout -s INT -k 15 "$share"); fi
  rm -f "$OUT/$name.jsonl"  # an earlier run's rows must not pass for this run's
  echo "== $name at ${SECONDS} s: --budget-s $budget, stopped at +${share} s"
  local rc=0
  ${limit[@]+"${limit[@]}"} "$PY" -m benchmarks --no-report --budget-s "$budget" \
    --out "$OUT/$name" "$@" ${TOY[@]+"${TOY[@]}"} || rc=$?
  if [[ -f "$OUT/$name.jsonl" ]]; then FILES+=("$OUT/$name.jsonl"); fi
  if ((rc == 124)); then
    echo "warning: $name reached the end of its share; its rows so far are kept" >&2
  elif ((rc != 0)); then
    echo "warning: $name exited with status $rc" >&2
    FAILED=1
  fi
}

step gpu-cuda $((PRECISION_S + KEEP_COMPILE)) 10 --preset gpu "$@"
step gpu-cuda-precision "$KEEP_COMPILE" 10 --preset gpu --models b0 \
  --variants g1-e6-bn,g16-e6-bn,g16-e4-bn,g16-e4-ln+pn --precisions fp32,fp16 \
  --peers timm/efficientnet_b0,timm/efficientnet_b0_g16_evos "$@"
if [[ "${COMPILE:-0}" == 1 ]]; then
  # The first compiled case starts whatever its cost (nothing before it to estimate from): 90 s.
  step gpu-cuda-compiled 0 90 --preset gpu --models b0 --variants g1-e6-bn,g16-e4-bn,g16-e4-ln+pn \
    --compile on --peers timm/efficientnet_b0 "$@"
fi
if ((${#FILES[@]} == 0)); then
  echo "error: no step wrote rows, so there is no report" >&2
  exit 1
fi
"$PY" -m benchmarks.report "${FILES[@]}" --out "$OUT/report-gpu.md"
echo "results and report in $OUT (${SECONDS} s)"
exit "$FAILED"
