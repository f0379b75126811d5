#!/usr/bin/env bash
# GPU smoke test: on whatever GPUs are present, a fast_dev_run, one epoch in bf16-mixed, and
# trainer=ddp over all GPUs (when there are 2 or more), on the generated demo data, offline.
# Usage: bash scripts/gpu_smoke.sh [extra overrides...]   (results in logs/gpu_smoke/)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then echo "gpu_smoke: no CUDA GPU visible" >&2; exit 1; fi
"$PYTHON" -c "import torch; print('gpu_smoke:', torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
OUT=logs/gpu_smoke/$(date +%Y-%m-%d_%H-%M-%S)
mkdir -p "$OUT"
run() {  # name, overrides...
  local name=$1; shift
  local start=$SECONDS
  "$PYTHON" train.py hydra.run.dir="$OUT/$name" callbacks.rich_progress_bar=null "$@" "${EXTRA[@]}" > "$OUT/$name.out" 2>&1 \
    || { echo "gpu_smoke: $name FAILED (see $OUT/$name.out)"; tail -20 "$OUT/$name.out"; exit 1; }
  local acc
  acc=$("$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"val/acc {r['val/acc']:.4f} epochs {r['epochs']}\")" "$OUT/$name/results.json" 2>/dev/null || echo "no results.json")
  echo "gpu_smoke: $name ok in $((SECONDS - start)) s: $acc"
}
EXTRA=("$@")
run fast_dev_run trainer=gpu trainer.devices=1 trainer.fast_dev_run=true
run bf16_epoch trainer=gpu trainer.devices=1 trainer.max_epochs=1 trainer.precision=bf16-mixed finetune=partial
if [ "$GPUS" -ge 2 ]; then
  run ddp trainer=ddp trainer.max_epochs=2 finetune=gradual finetune.unfreeze_at_epoch=1
  grep -h "Rank .*: weights" "$OUT"/ddp/*.log | sed 's/^/gpu_smoke:   /'
else
  echo "gpu_smoke: ddp skipped (1 GPU)"
fi
echo "gpu_smoke: all passed; outputs in $OUT"
