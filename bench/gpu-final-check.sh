#!/bin/bash
# Device-machine check of a build on the GPU, in one short call: the VAE parity tests (tiled and
# untiled, f32 against diffusers' fixtures) and model_cli's fp8 GPU test when carried, then
# `vpipe demo --device cuda:0` (every phase of the pipeline on CUDA, every move verified) with
# a budget its phases keep. Needs .carry/{vpipe,vae_parity,vae_tiled_parity,model_cli}.xz.
# Run with carry [".carry", ".whl"]; logs in $OUT.
set -u
. bench/device-env.sh
[ -e /work/main/crates ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }
VPIPE=$(unpack vpipe)
mkdir -p /work/target-cuda/release && cp "$VPIPE" /work/target-cuda/release/vpipe
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for t in vae_parity vae_tiled_parity model_cli; do
  [ -f ".carry/$t.xz" ] || continue
  echo "=== $t"
  filter=""; [ $t = model_cli ] && filter=fp8
  timeout 150 "$(unpack $t)" --test-threads 1 --nocapture $filter > "$OUT/$t.log" 2>&1
  echo "$t exit $?"
  grep -E "test result|panicked|FAILED" "$OUT/$t.log" | tail -5
done
echo "=== vpipe demo --device cuda:0 --vram-budget 1GiB"
$VPIPE demo --out /tmp/demo-cuda --device cuda:0 --vram-budget 1GiB > "$OUT/demo.log" 2>&1
echo "demo exit $?"
tail -14 "$OUT/demo.log"
