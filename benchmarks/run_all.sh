#!/usr/bin/env bash
# All three benchmarks in one command (`make bench`): inference (benchmarks/inference.py --methods), training
# (benchmarks/train.py) and degradation (benchmarks/degradation.py), on this machine's device, in sequence.
# Prints a header (date, device, torch) and tees everything to benchmarks/results/<date>-<device>.txt.
#
#   CUDA: the real shape (backbone sd21_shape, bf16 with the frozen weights in bf16, as sr-infer runs bf16):
#         inference eager (all rows at 128 -> 512, CCSR-15 and AddSR-4 tiled at 512 -> 2048, the diffusers
#         baseline, seeds batched vs one by one), inference with --compile (CCSR-15 and its baseline), training
#         eager (ccsr_stage1, stablesr_stage1) and with --compile (ccsr_stage1), degradation (batch 16, 512
#         crops). Sized for ONE run of at most 10 minutes: every step has a time cap (CAP_*, seconds; 240 + 120
#         + 90 + 120 + 30); a step that reaches it is stopped, says so, and the next one runs (rows printed
#         before the cap are complete measurements; inference then prints the table of those rows).
#   CPU:  the same at reduced size (tiny backbone, 64 -> 256, 2 timed runs); --quick: a smoke run of every path
#         (16 -> 64, 1 timed run, the sd21_shape smoke included) in a few minutes.
#
# Usage: benchmarks/run_all.sh [--quick] [--cpu]
#   env: PY (python, default .venv/bin/python); TRAIN_ARGS, TRAIN_ARGS_COMPILE, TRAIN_ARGS_CPU (arguments of
#        benchmarks/train.py, replacing the defaults below); CAP_INFER, CAP_INFER_COMPILE, CAP_TRAIN,
#        CAP_TRAIN_COMPILE, CAP_DEGRADATION (time caps in seconds)
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
QUICK=0
FORCE_CPU=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --cpu) FORCE_CPU=1 ;;
    *) echo "run_all.sh: unknown argument $arg (use --quick, --cpu)" >&2; exit 2 ;;
  esac
done

info=$(FORCE_CPU=$FORCE_CPU "$PY" - <<'EOF'
import os, re, torch
from sr_lab.utils.device import device_name
dev = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("FORCE_CPU") != "1" else "cpu")
name = device_name(dev)
print(dev.type)
print(name)
print(torch.__version__)
print(re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or dev.type)
EOF
) || { echo "run_all.sh: $PY cannot import torch / sr_lab (make install first)" >&2; exit 1; }
DEVICE=$(sed -n 1p <<<"$info")
DEVICE_NAME=$(sed -n 2p <<<"$info")
TORCH_VERSION=$(sed -n 3p <<<"$info")
SLUG=$(sed -n 4p <<<"$info")
[ "$QUICK" = 1 ] && SLUG="$SLUG-quick"

mkdir -p benchmarks/results
OUT="benchmarks/results/$(date +%Y-%m-%d_%H%M)-$SLUG.txt"
exec > >(tee -a "$OUT") 2>&1

echo "# sr_lab benchmarks $(date '+%Y-%m-%d %H:%M:%S %Z')"
echo "# device: $DEVICE ($DEVICE_NAME); torch $TORCH_VERSION; $(nproc) CPU cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)')"
if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null 2>&1; then
  echo "# nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm \
    --format=csv,noheader 2>/dev/null | head -1)"
fi
echo "# output: $OUT"

FAILED=0
step() {  # step <cap seconds> <title> <command...>
  local cap=$1 title=$2
  shift 2
  echo
  echo "## $title (time cap ${cap} s)"
  echo "\$ $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$cap" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then
    echo "## $title: STOPPED at the ${cap} s cap (rows above are complete; raise the CAP_* variable to finish it)"
    FAILED=1
  elif [ $rc -ne 0 ]; then
    echo "## $title: FAILED (exit $rc) after $((SECONDS - t0)) s"
    FAILED=1
  else
    echo "## $title: done in $((SECONDS - t0)) s"
  fi
}

INFER=benchmarks/inference.py
TRAIN=benchmarks/train.py
DEGRADE=benchmarks/degradation.py
train_step() {  # train_step <cap> <title> <args...>
  local cap=$1 title=$2
  shift 2
  if [ -f "$TRAIN" ]; then
    step "$cap" "$title" "$PY" "$TRAIN" "$@"
  else
    echo; echo "## $title: skipped ($TRAIN not found)"
  fi
}

if [ "$DEVICE" = cuda ]; then
  # --frozen-bf16: the frozen weights in bf16, as sr-infer runs precision=bf16 by default (speed.frozen_dtype=auto)
  step "${CAP_INFER:-240}" "inference, sd21_shape bf16, eager" \
    "$PY" "$INFER" --methods --backbone sd21_shape --precision bf16 --frozen-bf16 --tiled \
    --tiled-rows CCSR-15,AddSR-4 --iters 5
  step "${CAP_INFER_COMPILE:-120}" "inference, sd21_shape bf16, --compile" \
    "$PY" "$INFER" --methods --backbone sd21_shape --precision bf16 --frozen-bf16 --compile --rows CCSR-15 \
    --seeds 0 --iters 5
  # shellcheck disable=SC2086
  train_step "${CAP_TRAIN:-90}" "training, sd21_shape bf16-mixed, eager" ${TRAIN_ARGS:---steps 10 --warmup 3}
  # shellcheck disable=SC2086
  train_step "${CAP_TRAIN_COMPILE:-120}" "training, sd21_shape bf16-mixed, --compile" \
    ${TRAIN_ARGS_COMPILE:---experiment ccsr_stage1 --steps 10 --warmup 3} --compile
  step "${CAP_DEGRADATION:-30}" "degradation, batch 16, 512 crops" "$PY" "$DEGRADE"
elif [ "$QUICK" = 1 ]; then
  step "${CAP_INFER:-300}" "inference smoke, tiny backbone" \
    "$PY" "$INFER" --methods --device cpu --sizes 16 --iters 1 --rows CCSR-15,AddSR-1 --seeds 2
  step "${CAP_INFER_COMPILE:-420}" "inference smoke, sd21_shape (16 -> 64 only: CPU)" \
    "$PY" "$INFER" --methods --device cpu --backbone sd21_shape --sizes 16 --iters 1 --rows CCSR-15 --seeds 0 \
    --no-baseline
  # shellcheck disable=SC2086
  train_step "${CAP_TRAIN:-300}" "training smoke" ${TRAIN_ARGS_CPU:---device cpu --experiment ccsr_stage1 --steps 1 --warmup 1}
  step "${CAP_DEGRADATION:-120}" "degradation smoke" \
    "$PY" "$DEGRADE" --device cpu --batch 2 --size 128 --iters 1 --warmup 1
else
  step "${CAP_INFER:-1800}" "inference, tiny backbone, 64 -> 256" \
    "$PY" "$INFER" --methods --device cpu --sizes 64 --iters 2
  # shellcheck disable=SC2086
  train_step "${CAP_TRAIN:-900}" "training, tiny backbone" ${TRAIN_ARGS_CPU:---device cpu}
  step "${CAP_DEGRADATION:-300}" "degradation, batch 4, 256 crops" \
    "$PY" "$DEGRADE" --device cpu --batch 4 --size 256 --iters 3
fi

echo
echo "# finished $(date '+%Y-%m-%d %H:%M:%S %Z'); results in $OUT"
exit $FAILED
