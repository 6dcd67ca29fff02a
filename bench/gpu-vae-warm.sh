#!/bin/bash
# Device-machine run for issue 3: vpipe's and diffusers' tiled VAE encode and decode, each
# measured warm in one process (a first, untimed pass, then the median of 2), for several tile
# sizes (TILES) and, for vpipe, tile layouts (LAYOUTS: balanced is vpipe's default, diffusers
# the same tiles as diffusers); full-size Wan 2.1 VAE with random weights, bf16, the real
# 832x480x81 clip.
# Needs .carry/vae_bench.xz (cargo build --release -p vpipe --features vpipe/cuda --examples),
# .carry/clip.mp4, .whl/ with diffusers 0.42.1. Run with carry [".carry", ".whl"].
set -u
. bench/device-env.sh
VAE_BENCH=$(unpack vae_bench)
W=/tmp/vaebench
TILES=${TILES:-256,320,384}
LAYOUTS=${LAYOUTS:-balanced,diffusers}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
date -u
{
  # gpu-vae.sh leaves the same inputs behind when it ran first in the call.
  [ -f $W/diffusers_enc.safetensors ] || python3 bench/vae_gpu.py prepare .carry/clip.mp4 > $OUT/prepare.log 2>&1 || { tail $OUT/prepare.log; exit 4; }
  echo "=== vpipe (vae_bench)"
  timeout 280 $VAE_BENCH --vae $W/vae.safetensors --clip $W/clip.safetensors \
    --latents $W/diffusers_enc.safetensors --tiles $TILES --layouts $LAYOUTS --reps 2 | sed 's/^/vpipe /'
  echo "=== diffusers"
  timeout 280 python3 bench/vae_gpu.py warm $TILES 2 | sed 's/^/diffusers /'
} 2>&1 | tee "$OUT/vae_warm.log"
