#!/bin/bash
# Kernel-time profile of one 256-px, 81-frame VAE tile (bf16), vpipe next to diffusers, with
# Nsight Systems when the device machine has it. carry: [".carry", ".whl"]
set -u
OUT=${OUT:-/tmp/vpipe-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
VPIPE=/tmp/vpipe-bin/vpipe
mkdir -p /tmp/vpipe-bin && xz -dc .carry/vpipe.xz > $VPIPE && chmod +x $VPIPE
W=/tmp/vaebench
python3 bench/vae_gpu.py tile-inputs .carry/clip.mp4 || exit 4
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
echo "nsys: ${NSYS:-none}"
[ -n "$NSYS" ] || exit 5
for op in encode decode; do
  in=$W/tile.safetensors; [ $op = decode ] && in=$W/tile_lat.safetensors
  # two runs in one process are not possible with the CLI; the first run's one-time costs
  # (cuDNN plans, PTX JIT) are in the vpipe figures, so a warm-up run goes first
  $VPIPE tensors vae-$op --vae $W/vae.safetensors --device cuda:0 --dtype bf16 --tile 256 --input $in --output $W/o.safetensors > /dev/null
  $NSYS profile -o $W/vp_$op --force-overwrite true -t cuda $VPIPE tensors vae-$op --vae $W/vae.safetensors \
    --device cuda:0 --dtype bf16 --tile 256 --input $in --output $W/o.safetensors > /dev/null 2>&1
  $NSYS profile -o $W/df_$op --force-overwrite true -t cuda python3 bench/vae_gpu.py diffusers-tile $op > /dev/null 2>&1
  for who in vp df; do
    echo "=== $who $op: top kernels (cuda_gpu_kern_sum)"
    $NSYS stats --report cuda_gpu_kern_sum --format csv --output - $W/${who}_$op.nsys-rep 2>/dev/null \
      | python3 -c "
import csv,sys
rows=list(csv.DictReader(l for l in sys.stdin if l.count(',')>3))
tot=sum(float(r['Total Time (ns)']) for r in rows)
print(f'total kernel time {tot/1e6:.1f} ms in {sum(int(r[\"Instances\"]) for r in rows)} launches')
for r in rows[:12]: print(f\"{float(r['Total Time (ns)'])/1e6:9.1f} ms {int(r['Instances']):6d}x  {r['Name'][:110]}\")
" | tee -a "$OUT/profile.txt"
  done
done
