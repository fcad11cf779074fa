#!/usr/bin/env bash
# The engine on a GPU: unit tests with the device set to CUDA, arrow_speed on the GPU, and the Phi-2-scale bench.
#
#   bash bench/gpu_check.sh                 # on a machine with a CUDA GPU (no network needed)
#   bash bench/gpu_check.sh --cpu           # the same steps on the CPU, small: checks this script itself
#   PY=python3 bash bench/gpu_check.sh      # another interpreter (default: .venv/bin/python, else python3)
#
# Needs torch, transformers, peft, safetensors and pytest installed; uses random-weight models built from the
# real configs (weights do not change speed), so nothing is downloaded. Writes bench/results/gpu_check/*.json
# and a log ($OUT to change; --cpu writes to a temporary folder); paste the tables into docs/engine.md
# ("Devices"). Exit status: non-zero when a step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-bench/results/gpu_check}
[ "${1:-}" = "--cpu" ] && OUT=${CPU_OUT:-$(mktemp -d)}  # a self-check leaves the committed results alone
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"

if [ "${1:-}" = "--cpu" ]; then
  DEVICE=cpu
  SPEED_ARGS=(--quick)
  PHI2_ARGS=(--layers 2 --experts 64 --tokens 32 --new-tokens 4 --reps 2)
else
  DEVICE=cuda
  SPEED_ARGS=(--reps 7 --gen-reps 5)
  PHI2_ARGS=(--layers 32 --experts 64 256 --tokens 256 --new-tokens 32 --reps 5)
fi
export LORA_EXPLORER_TEST_DEVICE=$DEVICE

status=0
step() {  # step NAME CMD...: run, log, remember failures, go on
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  if "$@" 2>&1 | tee -a "$LOG"; then
    echo "== $name: ok ($((SECONDS - t0)) s)" | tee -a "$LOG"
  else
    echo "== $name: FAILED ($((SECONDS - t0)) s)" | tee -a "$LOG"
    status=1
  fi
}

step environment "$PY" -c "import sys, torch, transformers, peft; print(sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
if [ "$DEVICE" = cuda ]; then
  step cuda-present "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible')"
fi
step pytest-present "$PY" -c "import pytest"  # not part of a bare torch image: pip install pytest if this fails
# test_device.py and test_trace_detail.py read LORA_EXPLORER_TEST_DEVICE; the rest are the CPU equivalences.
step unit-tests "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_device.py tests/unit/test_trace_detail.py \
  tests/unit/test_arrow.py tests/unit/test_routed.py tests/unit/test_trace.py tests/unit/test_peft_equivalence.py
step engine-profile "$PY" bench/engine_profile.py --device "$DEVICE" --reps 10 --rows 12
step arrow-speed "$PY" bench/arrow_speed.py --random-base --device "$DEVICE" "${SPEED_ARGS[@]}" \
  --out "$OUT/arrow_speed.json"
step phi2-scale "$PY" bench/phi2_scale.py --device "$DEVICE" "${PHI2_ARGS[@]}" --out "$OUT/phi2_scale.json"
echo "gpu_check: $([ $status = 0 ] && echo all steps ok || echo SOME STEPS FAILED), log in $LOG"
exit $status
