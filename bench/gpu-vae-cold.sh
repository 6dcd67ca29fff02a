#!/bin/bash
# Device-machine run for issue 3: where a fresh `vpipe tensors vae-encode|vae-decode` process
# spends the time that a warm process (vae_bench) does not. Full-size VAE, bf16, the real clip.
#   1. fresh processes with a fixed tile (no calibration), three times in a row: the first with
#      the driver's PTX JIT cache disabled (CUDA_CACHE_DISABLE=1, as on a machine's first run),
#      then twice with it (SKIP_NOCACHE=1: once, with it);
#   2. a fresh process with --vram-budget (calibration), with debug spans: host time in
#      calibration, cuDNN plans and handles, and each tile.
# Needs .carry/vpipe.xz, .carry/clip.mp4, .whl/; after bench/gpu-vae.sh in the same call, or it
# prepares the inputs itself. Run with carry [".carry", ".whl"].
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
W=/tmp/vaebench
[ -f $W/diffusers_enc.safetensors ] || python3 bench/vae_gpu.py prepare .carry/clip.mp4 > $OUT/prepare.log 2>&1 || exit 4
phase_s() { python3 -c "
import json,sys; r=json.load(open('$1'))
p=[p for p in r['phases'] if p['name']=='$2'][0]
print('%.2f s' % ((p['exit']['t_ms']-p['entry']['t_ms'])/1e3))"; }
{
  echo "JIT cache before: $(du -sh ~/.nv/ComputeCache 2>/dev/null || echo none)"
  for op in encode decode; do
    in=$W/clip.safetensors; [ $op = decode ] && in=$W/diffusers_enc.safetensors
    runs="nocache cache1 cache2"; [ -n "${SKIP_NOCACHE:-}" ] && runs="cache1"
    for run in $runs; do
      env=""; [ $run = nocache ] && env="CUDA_CACHE_DISABLE=1"
      start=$(date +%s.%N)
      env $env timeout 150 $VPIPE tensors vae-$op --vae $W/vae.safetensors --device cuda:0 --dtype bf16 \
        --tile 384 --input $in --output $W/cold_$op.safetensors --report $W/cold_${op}_$run.json > /dev/null
      end=$(date +%s.%N)
      echo "$op, tile 384 balanced, $run: process $(python3 -c "print('%.2f s' % ($end-$start))"), phase $(phase_s $W/cold_${op}_$run.json "vae $op")"
    done
  done
  echo "JIT cache after: $(du -sh ~/.nv/ComputeCache 2>/dev/null || echo none)"
  for op in encode decode; do
    in=$W/clip.safetensors; [ $op = decode ] && in=$W/diffusers_enc.safetensors
    VPIPE_LOG_SPANS=1 VPIPE_LOG=vpipe=debug,vpipe_models=debug timeout 150 $VPIPE tensors vae-$op \
      --vae $W/vae.safetensors --device cuda:0 --dtype bf16 --vram-budget 1.3GiB \
      --input $in --output $W/cold_budget_$op.safetensors --report $W/cold_budget_$op.json 2> $W/spans_cold_$op.log
    echo "--- $op with --vram-budget 1.3GiB: phase $(phase_s $W/cold_budget_$op.json "vae $op"); host busy per span:"
    python3 bench/span_profile.py $W/spans_cold_$op.log | head -12
    grep -o '"vae tile[^}]*' $W/cold_budget_$op.json | head -3
    cp $W/cold_budget_$op.json "$OUT/"
  done
} 2>&1 | tee "$OUT/cold.log"
