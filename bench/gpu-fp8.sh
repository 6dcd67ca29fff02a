#!/bin/bash
# Device-machine run for the fp8 defect (float8 checkpoints failed on the GPU), in one call:
#   1. model_cli's GPU test: ComfyUI's scaled-fp8 tiny DiT (alone and with a LoRA) and a plain
#      fp8 one through the store and `vpipe tensors dit` on cuda:0, against diffusers' outputs
#      with the dequantised weights and the f32 twin;
#   2. a full-size scaled-fp8 14B DiT (random weights, bench/make_random_checkpoints.py FP8=1),
#      umT5-XXL and the VAE: `vpipe plan`, then `vpipe run` video-to-video from the real clip at
#      832x480x81 under a 24 GiB budget (a 4090's card) when the plan fits it, with its report;
#   3. diffusers' way of running the same file in the same call: the 14B with float8 storage and
#      bf16 compute (layerwise casting), one CFG-batched forward (bench/dit_gpu.py dit-fp8).
# Needs .carry/{vpipe,model_cli}.xz (CUDA build: the test binary runs the vpipe binary at the
# path its build recorded, /work/target-cuda/release/vpipe), .carry/clip.mp4, .whl/ (diffusers).
# Run with carry [".carry", ".whl"]; results in $OUT (report.json, memory.svg, run.log, fp8.log).
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
# The test binaries find their fixtures and the vpipe binary under the build machine's paths.
[ -e /work/main/crates ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }
mkdir -p /work/target-cuda/release && cp "$VPIPE" /work/target-cuda/release/vpipe
M=/tmp/wan-random
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
date -u
{
  echo "=== fp8 DiT files through the store on the GPU (model_cli)"
  timeout 180 "$(unpack model_cli)" --test-threads 1 --nocapture fp8 > "$OUT/model_cli.log" 2>&1
  echo "model_cli exit $?"
  grep -E "max abs|test result|panicked|FAILED" "$OUT/model_cli.log"
  # When carried: every held dtype uploads exactly (vpipe-mem), the DiT parity and hostile-input
  # tests of vpipe-models on the GPU (the float8 host fallback for non-Linear tensors).
  for t in fp8_upload_gpu dit_parity hostile_inputs; do
    [ -f ".carry/$t.xz" ] || continue
    echo "=== $t on the GPU"
    timeout 120 "$(unpack $t)" --test-threads 1 --nocapture > "$OUT/$t.log" 2>&1
    echo "$t exit $?"
    grep -E "max abs|test result|panicked|FAILED" "$OUT/$t.log" | tail -12
  done

  echo "=== full size: scaled-fp8 14B DiT, umT5-XXL, VAE (random weights)"
  FP8=1 python3 bench/make_random_checkpoints.py $M || exit 4
  python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
  DIT=$M/wan2.1_t2v_14B_random_fp8_scaled.safetensors
  ls -l $M
  $VPIPE inspect $DIT | head -8
  FILES="--dit $DIT --vae /tmp/vaebench/vae.safetensors --text-encoder $M/umt5_xxl_random_bf16.safetensors"
  JOB="--input .carry/clip.mp4 --strength 0.5 --steps 4 --size 832x480 --frames 81 --device cuda:0"
  BUDGET=24GiB
  $VPIPE plan $FILES $JOB --vram-budget $BUDGET || BUDGET=40GiB
  echo "budget $BUDGET"
  TIMER=""; [ -x /usr/bin/time ] && TIMER="/usr/bin/time -v"
  VPIPE_LOG=info $TIMER $VPIPE run $FILES $JOB --vram-budget $BUDGET \
    --tokenizer crates/vpipe-text/tests/fixtures/tokenizer.json \
    --prompt "A cheesecake with berries on a plate, slow camera pan" \
    --out $OUT/out.mp4 --report $OUT/report.json > $OUT/run.log 2>&1
  echo "vpipe run exit $?"
  grep -vE "^\s*(Command|Percent|Average|Exit status|Swaps|File system|Socket|Signals|Page size|Minor|Voluntary|Involuntary|Major)" $OUT/run.log | tail -45
  rm -f $OUT/out.mp4
  python3 - "$OUT/report.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
GiB = 2**30
print("meter", r["compute_meter"], "budget", r["budget"])
for p in r["phases"]:
    cuda = p["exit"].get("cuda") or {}
    print(f'{p["name"]:<11} peak {p["peak_above_baseline"]/GiB:6.2f} GiB above baseline, '
          f'pool reserved high {(cuda.get("pool_reserved_high") or 0)/GiB:6.2f} GiB, '
          f'process (NVML) {(cuda.get("nvml_process_used") or 0)/GiB:6.2f} GiB')
for t in r["transitions"]:
    print(t["model"], t["from"], "->", t["to"], "verified" if t["verified"] else "NOT VERIFIED")
for n in r["notes"]:
    if n["what"] in ("step", "sampling", "dit"):
        print("note", n["what"], n["detail"])
print("violations", r["violations"])
EOF

  echo "=== diffusers: the 14B with float8 storage, bf16 compute, B=2"
  rm -rf $M
  timeout 300 python3 bench/dit_gpu.py dit-fp8 --reps 2 | sed 's/^/diffusers /'
} 2>&1 | tee "$OUT/fp8.log"
