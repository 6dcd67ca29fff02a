#!/bin/bash
# Device-machine run for issue 3 after a change to the VAE's CUDA path, in one call:
#   1. the VAE parity tests on the GPU (tests/vae_parity.rs and vae_tiled_parity.rs built with
#      `cuda`: the tiny fixture VAE, f32 ≤ 1e-4 against diffusers, odd sizes, 1/5/9 frames,
#      tiled against diffusers' tiled), stopping here if any fails;
#   2. bench/gpu-vae.sh without the span profile (full-size VAE, bf16, real clip: parity,
#      timings and peaks next to diffusers, the automatic tile under a 1 GiB budget);
#   3. bench/gpu-vae-warm.sh (warm timings, TILES).
# WARM_ONLY=1 skips step 2 (about two minutes of device time).
# Needs .carry/{vae_parity,vae_tiled_parity,vpipe,vae_bench}.xz and .carry/clip.mp4, .whl/.
# Run with carry [".carry", ".whl"].
set -u
. bench/device-env.sh
# The test binaries find their fixtures under the build machine's checkout path.
[ -e /work/main/crates ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }
{
  failed=0
  for t in vae_parity vae_tiled_parity; do
    echo "=== $t on the GPU"
    timeout 150 "$(unpack $t)" --test-threads 1 --nocapture > "$OUT/$t.log" 2>&1 || failed=1
    grep -E "max abs|: mean|test result|panicked|FAILED" "$OUT/$t.log" | tail -40
  done
  [ $failed = 0 ] || { echo "GPU parity tests failed: stopping"; exit 5; }
  [ "${WARM_ONLY:-0}" = 1 ] || SKIP_SPANS=1 bash bench/gpu-vae.sh
  TILES=${TILES:-256,320} bash bench/gpu-vae-warm.sh
} 2>&1 | tee "$OUT/check.log"
