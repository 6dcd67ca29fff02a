#!/bin/bash
# Device-machine run for issue 13, the third call: after the planner's recalibration on the
# second call's measurements, the two runs whose budget was not kept, again: video-to-video
# from the real clip under --vram-budget 6GiB --ram-budget 32GiB (checked by
# bench/check_pipeline_report.py with the host peak RSS), and text-to-video under the least
# budget the plan takes (the resident step is the second call's, 10 minutes before).
# Needs .carry/vpipe.xz (CUDA build), .carry/clip.mp4, .whl/. Carry [".carry", ".whl"].
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
M=/tmp/wan-random
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
date -u
{
  T0=$(date +%s)
  ONLY=dit,umt5 python3 bench/make_random_checkpoints.py $M || exit 4
  python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
  FILES="--dit $M/wan2.1_t2v_14B_random_bf16.safetensors --vae /tmp/vaebench/vae.safetensors --text-encoder $M/umt5_xxl_random_bf16.safetensors --tokenizer crates/vpipe-text/tests/fixtures/tokenizer.json"
  T2V="--steps 2 --size 832x480 --frames 81 --device cuda:0 --dtype bf16 --tile 256"
  V2V="--input .carry/clip.mp4 --strength 0.5 --steps 4 --size 832x480 --frames 81 --device cuda:0 --dtype bf16 --tile 256"
  PROMPT="A cheesecake with berries on a plate, slow camera pan"
  run() {  # name, out, flags...
    local name=$1 out=$2; shift 2
    echo "=== vpipe run $name (+$(( $(date +%s) - T0 ))s)"
    VPIPE_LOG=info /usr/bin/time -v $VPIPE run "$@" --prompt "$PROMPT" --out $out --report /tmp/report-$name.json > /tmp/run-$name.log 2>&1
    local code=$?
    cp /tmp/report-$name.json $OUT/ 2>/dev/null
    echo "vpipe run $name exit $code"
    grep -E "^run:|^vpipe:|Maximum resident|Elapsed|panicked|sample [0-9]/" /tmp/run-$name.log | head -8
    return $code
  }
  run v2v-6GiB /tmp/v2v.mp4 $FILES $V2V --vram-budget 6GiB --ram-budget 32GiB
  CODE=$?
  python3 bench/check_pipeline_report.py --run-exit $CODE --time-log /tmp/run-v2v-6GiB.log --max-rss-gib 32 \
    /tmp/report-v2v-6GiB.json /tmp/v2v.mp4 81
  echo "check_pipeline_report exit $?"
  cp /tmp/report-v2v-6GiB.svg $OUT/ 2>/dev/null
  LEAST=$($VPIPE plan $FILES $T2V --vram-budget 1GiB --prompt x --out /tmp/x.mp4 --json \
    | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["minimum_bytes"] / 2**20) + 1)')MiB
  echo "least budget: $LEAST"
  run t2v-least /tmp/t2v-least.safetensors $FILES $T2V --vram-budget $LEAST

  echo "done at +$(( $(date +%s) - T0 ))s"
} 2>&1 | tee "$OUT/check.log"
