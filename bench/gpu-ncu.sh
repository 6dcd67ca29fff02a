#!/bin/bash
# Per-kernel device time (Nsight Compute, gpu__time_duration) of a 5-frame 256-px VAE encode
# (two causal chunks), or with OP=decode of its 2 latent frames, vpipe next to diffusers, summed
# by kernel name. carry: [".carry", ".whl"]
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
W=/tmp/vaebench
python3 bench/vae_gpu.py tile-inputs .carry/clip.mp4 > /dev/null 2>&1 || exit 4
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "ncu: ${NCU:-none}"; [ -n "$NCU" ] || exit 5
OP=${OP:-encode}
IN=tile5; [ $OP = decode ] && IN=tile_lat2
$VPIPE tensors vae-$OP --vae $W/vae.safetensors --device cuda:0 --dtype bf16 --tile 256 \
  --input $W/$IN.safetensors --output $W/o.safetensors > /dev/null  # warm the PTX cache
timeout 240 $NCU --metrics gpu__time_duration.sum --csv --log-file $W/vp.csv $VPIPE tensors vae-$OP \
  --vae $W/vae.safetensors --device cuda:0 --dtype bf16 --tile 256 --input $W/$IN.safetensors --output $W/o.safetensors > /dev/null 2>&1
timeout 240 $NCU --metrics gpu__time_duration.sum --csv --log-file $W/df.csv \
  python3 bench/vae_gpu.py diffusers-tile $OP $IN > /dev/null 2>&1
for who in vp df; do
  echo "=== $who: $IN 256-px $OP, kernel time by name"
  python3 bench/ncu_by_kernel.py $W/$who.csv | tee -a "$OUT/ncu.txt"
done
