#!/bin/bash
# Device-machine run for the VAE (issue 3): diffusers' tiled encode/decode and vpipe's on the same
# card in the same call; full-size Wan 2.1 VAE with random weights, bf16, the real 832x480x81 clip.
# Needs: .carry/vpipe.xz (CUDA build), .carry/clip.mp4 (a copy of crates/vpipe-video/tests/fixtures/wan21-cheesecake-832x480x81-h264.mp4),
# .whl/ with diffusers 0.42.1. Run with carry [".carry", ".whl"].
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
. bench/device-env.sh
VPIPE=$(unpack vpipe)
W=/tmp/vaebench
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 bench/vae_gpu.py prepare .carry/clip.mp4 || exit 4
V="$VPIPE tensors"
# diffusers' tile layout: the outputs are compared with diffusers' tiled ones.
COMMON="--vae $W/vae.safetensors --device cuda:0 --dtype bf16 --tile 256 --stride 192 --tile-layout diffusers"
# warm-up: the first use of each candle kernel compiles its PTX; keep that out of the timings
timeout 150 $V vae-encode $COMMON --input $W/frame.safetensors --output $W/frame_enc.safetensors --report $W/vpipe_frame.json
timeout 150 $V vae-decode $COMMON --input $W/frame_enc.safetensors --output $W/frame_dec.safetensors
timeout 150 $V vae-encode $COMMON --input $W/frame.safetensors --output $W/frame_enc.safetensors --report $W/vpipe_frame.json
timeout 150 $V vae-encode $COMMON --input $W/clip.safetensors --output $W/vpipe_enc.safetensors --report $W/vpipe_enc.json
timeout 150 $V vae-decode $COMMON --input $W/diffusers_enc.safetensors --output $W/vpipe_dec.safetensors --report $W/vpipe_dec.json
timeout 150 $V vae-encode --vae $W/vae.safetensors --device cuda:0 --dtype f32 --tile 128 --input $W/crop.safetensors --output $W/vpipe_crop_enc.safetensors
timeout 150 $V vae-decode --vae $W/vae.safetensors --device cuda:0 --dtype f32 --tile 128 --input $W/diffusers_crop_enc.safetensors --output $W/vpipe_crop_dec.safetensors
[ -z "${SKIP_SPANS:-}" ] && echo "=== span profile of one 256-px tile, 81 frames (CUDA_LAUNCH_BLOCKING=1: busy time is device time)"
[ -z "${SKIP_SPANS:-}" ] && for op in encode decode; do
  in=$W/tile.safetensors; [ $op = decode ] && in=$W/tile_lat.safetensors
  CUDA_LAUNCH_BLOCKING=1 VPIPE_LOG_SPANS=1 VPIPE_LOG=vpipe_models=trace timeout 150 $V vae-$op $COMMON \
    --input $in --output $W/prof_$op.safetensors 2> $W/spans_$op.log
  echo "--- $op"; python3 bench/span_profile.py $W/spans_$op.log 2>/dev/null | head -14
done
cp $W/vpipe_enc.json $W/vpipe_dec.json "$OUT/" 2>/dev/null
python3 bench/vae_gpu.py compare
[ -n "${SKIP_AUTO:-}" ] && exit 0
echo "=== vpipe with --vram-budget at diffusers' measured peak (its on-device input or output included) and an automatic tile"
budget() { python3 -c "import json; print(json.load(open('$W/diffusers.json'))['$1'])"; }
timeout 150 $V vae-encode --vae $W/vae.safetensors --device cuda:0 --dtype bf16 --vram-budget "$(budget encode_peak_total)" \
  --input $W/clip.safetensors --output $W/budget_enc.safetensors --report $W/vpipe_budget_enc.json
timeout 150 $V vae-decode --vae $W/vae.safetensors --device cuda:0 --dtype bf16 --vram-budget "$(budget decode_peak_total)" \
  --input $W/diffusers_enc.safetensors --output $W/budget_dec.safetensors --report $W/vpipe_budget_dec.json
cp $W/vpipe_budget_enc.json $W/vpipe_budget_dec.json "$OUT/" 2>/dev/null
python3 bench/vae_gpu.py budget-compare
echo "=== vpipe encode with --vram-budget 1GiB and an automatic tile"
timeout 150 $V vae-encode --vae $W/vae.safetensors --device cuda:0 --dtype bf16 --vram-budget 1GiB \
  --input $W/clip.safetensors --output $W/auto_enc.safetensors --report $W/vpipe_auto.json
python3 -c "
import json; r=json.load(open('$W/vpipe_auto.json'))
p=[p for p in r['phases'] if p['name']=='vae encode'][0]
print('auto tile: peak above baseline %.3f GiB; budget 1 GiB; violations %s' % (p['peak_above_baseline']/2**30, r['violations']))
for n in r['notes']: print('  ', n['what'], ':', n['detail'])
print('   fallbacks:', r['fallbacks'])"
