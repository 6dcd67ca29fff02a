#!/bin/bash
# One device call for issue 17: 10 sequential jobs through `vpipe serve` on the 14B text-to-video
# (random weights, bf16) under a --vram-budget that streams its blocks, with every meter at each
# job boundary (the server's own record); and, for issue 15, the CLIP vision encoder's layers
# streamed on the GPU (`tensors clip-vision --vram-budget 1GiB` against the resident run).
#   bash bench/gpu-serve.sh [jobs|clip|all]     (default all)
# Needs .carry/vpipe.xz (CUDA build). Carry [".carry", ".whl"].
# On a CPU (a check of this script): TINY=1 VPIPE=target/debug/vpipe bash bench/gpu-serve.sh
set -u
PART=${1:-all}
if [ -n "${TINY:-}" ]; then
  OUT=${OUT:-/tmp/vpipe-bench-out}; mkdir -p "$OUT"
  DEVICE="--device cpu"; BUDGET=""; JOBS=3
  SETTINGS='{"prompt": "A cheesecake on a plate", "size": "64x64", "frames": 5, "steps": 2, "tile": 64}'
else
  . bench/device-env.sh
  VPIPE=$(unpack vpipe)
  DEVICE="--device cuda:0"; BUDGET="--vram-budget 8GiB --ram-budget 64GiB"; JOBS=10
  SETTINGS='{"prompt": "A cheesecake on a plate", "size": "832x480", "frames": 33, "steps": 2, "tile": 256, "dtype": "bf16"}'
fi
M=/tmp/serve-models
T0=$(date +%s)
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  date -u
  mkdir -p $M
  cp crates/vpipe-text/tests/fixtures/tokenizer.json $M/
  if [ -n "${TINY:-}" ]; then
    $VPIPE demo --steps 2 --out /tmp/serve-demo > /dev/null || exit 4
    cp /tmp/serve-demo/weights/*.safetensors /tmp/serve-demo/weights/tokenizer.json $M/
    rm -f $M/lora-*.safetensors
  else
    if [ "$PART" = clip ]; then ONLY=clip; else ONLY=dit,umt5,clip; fi
    ONLY=$ONLY python3 bench/make_random_checkpoints.py $M || exit 4
    mkdir -p /tmp/serve-clip && mv $M/clip_vision_h_random_bf16.safetensors /tmp/serve-clip/
    [ "$PART" = clip ] || python3 -c "
import sys; sys.path.insert(0, 'bench')
from vae_gpu import make_vae
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in make_vae().state_dict().items()}, '$M/wan_2.1_vae.safetensors')" || exit 4
  fi
  echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
  JOBS_CODE=0
  if [ "$PART" != clip ]; then
  rm -rf /tmp/serve-out
  $VPIPE serve --models $M --outputs /tmp/serve-out --listen 127.0.0.1:8190 $DEVICE $BUDGET \
    > /tmp/serve.log 2>&1 &
  SERVER=$!
  for _ in $(seq 1 100); do grep -q listening /tmp/serve.log && break; sleep 0.1; done
  head -1 /tmp/serve.log
  python3 bench/serve_jobs.py http://127.0.0.1:8190 $JOBS "$SETTINGS" "$OUT/summary-serve.json"
  JOBS_CODE=$?
  kill -TERM $SERVER; wait $SERVER; echo "vpipe serve exit $?"
  cp /tmp/serve-out/job-1/report.json "$OUT/serve-job1-report.json" 2>/dev/null
  echo "jobs done at +$(( $(date +%s) - T0 ))s"
  fi
  if [ -z "${TINY:-}" ] && [ "$PART" != jobs ]; then
    # CLIP vision: resident, then its layers streamed through a 1 GiB budget; outputs compared.
    python3 -c "
import torch; from safetensors.torch import save_file
torch.manual_seed(0)
save_file({'pixel_values': torch.randn(1, 3, 224, 224)}, '/tmp/serve-clip/in.safetensors')"
    for budget in none 1GiB; do
      flag=""; [ $budget != none ] && flag="--vram-budget $budget"
      $VPIPE tensors clip-vision --clip-vision /tmp/serve-clip/clip_vision_h_random_bf16.safetensors \
        --input /tmp/serve-clip/in.safetensors --output /tmp/serve-clip/out-$budget.safetensors \
        --device cuda:0 --dtype bf16 $flag --report /tmp/serve-clip/report-$budget.json 2>&1 | tail -2
      code=${PIPESTATUS[0]}; echo "clip-vision $budget exit $code"; [ $code -ne 0 ] && JOBS_CODE=$code
    done
    python3 - "$OUT" <<'PY'
import json, sys
from safetensors.numpy import load_file
import numpy as np
a = load_file("/tmp/serve-clip/out-none.safetensors")["image_features"].astype(np.float64)
b = load_file("/tmp/serve-clip/out-1GiB.safetensors")["image_features"].astype(np.float64)
r = json.load(open("/tmp/serve-clip/report-1GiB.json"))
row = {"max_abs_streamed_vs_resident": float(np.abs(a - b).max()),
       "footprint_gib": max((p.get("device_footprint_peak") or 0) for p in r["phases"]) / 2**30,
       "streams": r.get("streams", []), "violations": r["violations"]}
json.dump(row, open(sys.argv[1] + "/summary-clip-stream.json", "w"), indent=1)
print(json.dumps({k: v for k, v in row.items() if k != "streams"}))
PY
  fi
  echo "done at +$(( $(date +%s) - T0 ))s"
  exit $JOBS_CODE
} 2>&1 | tee "$OUT/serve.log"
exit ${PIPESTATUS[0]}
