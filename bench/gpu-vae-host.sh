#!/bin/bash
# Host time of the VAE's CUDA path: one 256-px tile, 81 frames, bf16, encode and decode, with
# span timing (VPIPE_LOG_SPANS=1) and no CUDA_LAUNCH_BLOCKING, so a span's busy time is what the
# host spends in it (launches, cuDNN calls, allocation), not device time. Then vae_bench's
# one-tile probe: time until the pass returns against time until the device is done.
# Needs .carry/vpipe.xz, .carry/vae_bench.xz, .carry/clip.mp4, .whl/; carry [".carry", ".whl"].
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe); BENCH=$(unpack vae_bench)
W=/tmp/vaebench
[ -f $W/tile_lat.safetensors ] || python3 bench/vae_gpu.py prepare .carry/clip.mp4 > $OUT/prepare.log 2>&1 || exit 4
COMMON="--vae $W/vae.safetensors --device cuda:0 --dtype bf16 --tile 256"
{
  for op in encode decode; do
    in=$W/tile.safetensors; [ $op = decode ] && in=$W/tile_lat.safetensors
    $VPIPE tensors vae-$op $COMMON --input $in --output $W/h.safetensors > /dev/null
    VPIPE_LOG_SPANS=1 VPIPE_LOG=vpipe_models=trace timeout 150 $VPIPE tensors vae-$op $COMMON \
      --input $in --output $W/h.safetensors 2> $W/host_$op.log | tail -1
    echo "--- $op: host busy time per span"; python3 bench/span_profile.py $W/host_$op.log | head -16
  done
  timeout 200 $BENCH --vae $W/vae.safetensors --clip $W/clip.safetensors \
    --latents $W/diffusers_enc.safetensors --tiles 256 --reps 1 | tail -2
} 2>&1 | tee "$OUT/host.log"
