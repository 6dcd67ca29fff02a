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
  python3 - $W/$who.csv <<'PY' | tee -a "$OUT/ncu.txt"
import csv, sys
from collections import defaultdict
rows = list(csv.DictReader(l for l in open(sys.argv[1], errors="replace") if l.startswith('"')))
tot, cnt = defaultdict(float), defaultdict(int)
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    v = float(r["Metric Value"].replace(",", ""))
    unit = r.get("Metric Unit", "nsecond")
    v *= {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(unit, 1e-6)
    name = r["Kernel Name"][:100]
    tot[name] += v; cnt[name] += 1
print(f"total {sum(tot.values()):.2f} ms in {sum(cnt.values())} kernels")
for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:28]:
    print(f"{v:9.2f} ms {cnt[k]:5d}x  {k}")
PY
done
