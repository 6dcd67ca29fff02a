#!/bin/bash
# Image-to-video on the device (issue 15): the I2V-14B architecture with random weights, bf16,
# 2 steps each, as full `vpipe run`s from the real clip's first frame, in two calls on one warm
# machine (each under the device tool's 10 minutes):
#   bash bench/gpu-i2v.sh 1   the checkpoints (I2V 14B, umT5-XXL, CLIP ViT-H/14), then
#                             832x480x81 and 1280x720x81 (75,600 tokens), the models resident
#   bash bench/gpu-i2v.sh 2   1280x720x81 under --vram-budget 24GiB (streamed), then diffusers'
#                             WanTransformer3DModel (image-to-video 14B) forward at 1280x720x81,
#                             B=2, in the same call; first-last-frame to video at 832x480x81
# Needs .carry/vpipe.xz (CUDA build), .carry/clip.mp4, optionally .carry/clip_parity.xz (the
# CLIP device test, run first in call 1), .whl/ (diffusers). Carry [".carry",
# ".whl"]. Reports stay in /tmp; $OUT gets the summary, the log and two reports (8 files at most).
set -u
PART=${1:?1 or 2}
. bench/device-env.sh
VPIPE=$(unpack vpipe)
M=/tmp/wan-random
T0=$(date +%s)
TOK="--tokenizer crates/vpipe-text/tests/fixtures/tokenizer.json"
FILES="--dit $M/wan2.1_i2v_14B_random_bf16.safetensors --clip-vision $M/clip_vision_h_random_bf16.safetensors --vae /tmp/vaebench/vae.safetensors --text-encoder $M/umt5_xxl_random_bf16.safetensors $TOK"
COMMON="--image /tmp/first.png --steps 2 --frames 81 --device cuda:0 --dtype bf16 --tile 256"
PROMPT="A cheesecake with berries on a plate, slow camera pan"

run() {  # name, flags...: the run, its wall time and the log's key lines
  local name=$1; shift
  echo "=== vpipe run $name (+$(( $(date +%s) - T0 ))s)"
  local start=$(date +%s.%N)
  VPIPE_LOG=info /usr/bin/time -v $VPIPE run $FILES $COMMON "$@" --prompt "$PROMPT" \
    --out /tmp/$name.mp4 --report /tmp/report-$name.json > /tmp/run-$name.log 2>&1
  local code=$?
  echo "vpipe run $name exit $code wall $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
  grep -E "^run:|^vpipe:|Maximum resident|panicked|notice|resized" /tmp/run-$name.log | head -6
}

summary() {  # summary-i2v-$PART.json: per run the phases' peaks and times, steps, streams
  python3 - "$OUT" "$PART" <<'EOF'
import json, sys, glob, os
out, part = sys.argv[1], sys.argv[2]
GiB = 2**30
rows = {}
for path in sorted(glob.glob("/tmp/report-*.json")):
    name = os.path.basename(path)[len("report-"):-len(".json")]
    r = json.load(open(path))
    rows[name] = {
        "phases": {p["name"]: {
            "seconds": round((p["exit"]["t_ms"] - p["entry"]["t_ms"]) / 1e3, 2),
            "footprint_peak_gib": round((p.get("device_footprint_peak") or 0) / GiB, 3),
            "live_peak_gib": round(p["peak_above_baseline"] / GiB, 3),
        } for p in r["phases"]},
        "steps": [n["detail"] for n in r["notes"] if n["what"] == "step"],
        "notes": [n["detail"] for n in r["notes"] if n["what"] in ("sampling", "plan")],
        "violations": r["violations"],
        "verified": all(t["verified"] for t in r["transitions"]),
    }
json.dump(rows, open(f"{out}/summary-i2v-{part}.json", "w"), indent=1)
for name, row in rows.items():
    print(name, json.dumps({k: row[k] for k in ("steps", "violations", "verified")}))
    print("  ", json.dumps(row["phases"]))
EOF
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  date -u
  if [ "$PART" = 1 ]; then
    [ -f .carry/clip_parity.xz ] && timeout 120 "$(unpack clip_parity)" cuda --test-threads 1 \
      --nocapture 2>&1 | grep -E "^test |test result|panicked|max abs"
    ONLY=i2v,umt5,clip python3 bench/make_random_checkpoints.py $M || exit 4
    python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
    python3 - <<'EOF'
import cv2
cap = cv2.VideoCapture(".carry/clip.mp4")
frames = []
while True:
    ok, frame = cap.read()
    if not ok:
        break
    frames.append(frame)
cv2.imwrite("/tmp/first.png", frames[0])
cv2.imwrite("/tmp/last.png", frames[80])
print("frames", len(frames), frames[0].shape)
EOF
    echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
    run i2v-480p --size 832x480
    run i2v-720p --size 1280x720
  else
    run i2v-720p-24GiB --size 1280x720 --vram-budget 24GiB
    echo "=== diffusers: the image-to-video 14B forward at 1280x720x81, B=2 (+$(( $(date +%s) - T0 ))s)"
    timeout 300 python3 bench/dit_gpu.py i2v --reps 2 --size 1280x720 | sed 's/^/diffusers /'
    run flf2v-480p --size 832x480 --last-image /tmp/last.png
  fi
  summary
  echo "done at +$(( $(date +%s) - T0 ))s"
} 2>&1 | tee "$OUT/i2v-$PART.log"
