#!/bin/bash
# Device-machine run for issue 5: `vpipe run` at full size — 14B DiT, umT5-XXL, Wan VAE, random
# bf16 weights — video-to-video from the real clip (832x480, 81 frames), 2 sampling steps, and
# the report checked against the seed's targets (bench/check_pipeline_report.py).
# Needs .carry/vpipe.xz (CUDA build), .carry/clip.mp4, .whl/ (diffusers, for the VAE weights);
# runs vpipe-mem's `pinned_gpu` test first when .carry/pinned_gpu.xz is there.
# Run with carry [".carry", ".whl"]; results in $OUT (report.json, memory.svg, out.mp4 probe, log).
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
M=/tmp/wan-random
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
date -u
{
  PINNED_TEST=$(unpack pinned_gpu)
  if [ -x "$PINNED_TEST" ]; then
    echo "=== the CUDA host tier: weights read into pinned memory reach the device equal to the file"
    timeout 120 $PINNED_TEST --test-threads 1 --nocapture 2>&1 | grep -E "max abs|test result|panicked"
  fi
  python3 bench/make_random_checkpoints.py $M || exit 4
  python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4   # writes /tmp/vaebench/vae.safetensors
  $VPIPE plan --dit $M/wan2.1_t2v_14B_random_bf16.safetensors --vae /tmp/vaebench/vae.safetensors \
    --text-encoder $M/umt5_xxl_random_bf16.safetensors --input .carry/clip.mp4 --dtype bf16 \
    --device cuda:0 --vram-budget 76GiB --steps 4 --size 832x480 --frames 81
  TIMER=""; [ -x /usr/bin/time ] && TIMER="/usr/bin/time -v"
  VPIPE_LOG=info $TIMER $VPIPE run --dit $M/wan2.1_t2v_14B_random_bf16.safetensors \
    --vae /tmp/vaebench/vae.safetensors --text-encoder $M/umt5_xxl_random_bf16.safetensors \
    --tokenizer crates/vpipe-text/tests/fixtures/tokenizer.json \
    --prompt "A cheesecake with berries on a plate, slow camera pan" \
    --input .carry/clip.mp4 --strength 0.5 --steps 4 --size 832x480 --frames 81 --tile 256 \
    --device cuda:0 --dtype bf16 --vram-budget 76GiB \
    --out $OUT/out.mp4 --report $OUT/report.json > $OUT/run.log 2>&1; RUN_EXIT=$?; echo "vpipe run exit $RUN_EXIT"
  tail -40 $OUT/run.log
  $VPIPE tensors vae-encode --vae /tmp/vaebench/vae.safetensors --input /tmp/vaebench/frame.safetensors \
    --output /tmp/frame_enc.safetensors --device cuda:0 --dtype bf16 --tile 256 --report $OUT/frame_report.json
  python3 bench/check_pipeline_report.py --run-exit $RUN_EXIT $OUT/report.json $OUT/out.mp4 81 $OUT/frame_report.json
} 2>&1 | tee "$OUT/pipeline.log"
