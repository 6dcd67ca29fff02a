#!/bin/bash
# One device call that runs on the GPU what was first checked on the CPU (issues 14 and 15):
#   - the device tests of the CLIP vision encoder and of the image-to-video / first-last-frame
#     DiTs (f32 and bf16 against the transformers / diffusers fixtures);
#   - `vpipe tensors clip-vision` on the full-size ViT-H/14 (random weights) for two images;
#   - the 1.3B text-to-video at 832x480x81, 30 steps, CFG 5: uncached, then `--cache teacache`
#     at two thresholds (wall time, skipped steps, relative L2 of the final latents against the
#     uncached run), and at `--cfg 1` (one forward per step) for 2 steps next to CFG 5.
# Needs .carry/vpipe.xz (CUDA build), .carry/{clip_parity,dit_parity}.xz (the device tests:
# `cargo test --release --features cuda -p vpipe-models --test clip_parity --test dit_parity
# --no-run`), .whl/ (diffusers, for bench/vae_gpu.py), .carry/clip.mp4. Carry [".carry", ".whl"].
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
M=/tmp/wan-random
T0=$(date +%s)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  date -u
  for t in clip_parity dit_parity; do
    [ -f .carry/$t.xz ] && timeout 120 "$(unpack $t)" cuda --test-threads 1 --nocapture 2>&1 \
      | grep -E "^test |test result|panicked|max abs"
  done
  ONLY=dit13,umt5,clip python3 bench/make_random_checkpoints.py $M || exit 4
  python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
  echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"

  echo "=== tensors clip-vision, ViT-H/14, 2 images"
  python3 -c "
import torch; from safetensors.torch import save_file
save_file({'pixel_values': torch.randn(2, 3, 224, 224)}, '/tmp/pixels.safetensors')"
  /usr/bin/time -v $VPIPE tensors clip-vision --clip-vision $M/clip_vision_h_random_bf16.safetensors \
    --input /tmp/pixels.safetensors --output /tmp/features.safetensors --device cuda:0 --dtype bf16 \
    --report $OUT/report-clip.json > /tmp/clip.log 2>&1
  echo "clip-vision exit $?"
  grep -E "^vpipe|Elapsed|Maximum resident|panicked|error" /tmp/clip.log | head
  python3 -c "
from safetensors.numpy import load_file; f = load_file('/tmp/features.safetensors')
print({k: (v.shape, float(abs(v.astype('float32')).mean())) for k, v in f.items()})"

  TOK="--tokenizer crates/vpipe-text/tests/fixtures/tokenizer.json"
  FILES="--dit $M/wan2.1_t2v_1.3B_random_bf16.safetensors --vae /tmp/vaebench/vae.safetensors --text-encoder $M/umt5_xxl_random_bf16.safetensors $TOK"
  COMMON="--size 832x480 --frames 81 --device cuda:0 --dtype bf16 --tile 256 --prompt 'A cheesecake with berries on a plate, slow camera pan'"
  run() {  # name, flags...
    local name=$1; shift
    echo "=== vpipe run $name (+$(( $(date +%s) - T0 ))s)"
    local start=$(date +%s.%N)
    eval VPIPE_LOG=info $VPIPE run $FILES $COMMON "$@" --out /tmp/$name.safetensors --report $OUT/report-$name.json > /tmp/run-$name.log 2>&1
    local code=$?
    echo "vpipe run $name exit $code wall $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
    grep -E "^vpipe:|panicked|step cache|one forward|sampling" /tmp/run-$name.log | head -5
  }
  run steps30 --steps 30
  run teacache010 --steps 30 --cache teacache --cache-threshold 0.1
  run teacache030 --steps 30 --cache teacache --cache-threshold 0.3
  run cfg5-2 --steps 2
  run cfg1-2 --steps 2 --cfg 1
  python3 - "$OUT" <<'EOF'
import json, sys
import numpy as np
from safetensors.numpy import load_file
out = sys.argv[1]
ref = load_file("/tmp/steps30.safetensors")["latents"].astype(np.float64)
rows = {}
for name in ["steps30", "teacache010", "teacache030", "cfg5-2", "cfg1-2"]:
    try:
        r = json.load(open(f"{out}/report-{name}.json"))
    except OSError:
        rows[name] = "no report"
        continue
    phases = {p["name"]: p for p in r["phases"]}
    row = {
        "sample_s": round((phases["sample"]["exit"]["t_ms"] - phases["sample"]["entry"]["t_ms"]) / 1e3, 2),
        "steps_s": [n["detail"] for n in r["notes"] if n["what"] == "step"][:3],
        "notes": [n["detail"] for n in r["notes"] if n["what"] in ("sampling", "step cache")],
        "violations": r["violations"],
    }
    if name.startswith("teacache"):
        lat = load_file(f"/tmp/{name}.safetensors")["latents"].astype(np.float64)
        row["latents_rel_l2_vs_uncached"] = float(np.linalg.norm(lat - ref) / np.linalg.norm(ref))
    rows[name] = row
json.dump(rows, open(f"{out}/summary-verify.json", "w"), indent=1)
print(json.dumps(rows, indent=1))
EOF
  echo "done at +$(( $(date +%s) - T0 ))s"
} 2>&1 | tee "$OUT/verify.log"
