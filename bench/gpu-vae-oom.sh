#!/bin/bash
# Device-machine check of the VAE's out-of-memory fallback (issue 3) on a real
# device OOM: another process holds all but HEADROOM_GIB of the card, then `vpipe tensors
# vae-encode --tile 512` on the real clip must hit the OOM, halve the tile, finish, and record
# the fallback in its report. Needs .carry/vpipe.xz, .carry/clip.mp4, .whl/ (diffusers, for the
# weights). Run with carry [".carry", ".whl"].
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
W=/tmp/vaebench
[ -f $W/clip.safetensors ] || python3 bench/vae_gpu.py prepare .carry/clip.mp4 > $OUT/prepare.log 2>&1 || exit 4
HEADROOM_GIB=${HEADROOM_GIB:-2.0}
python3 - "$HEADROOM_GIB" <<'PY' &
import sys, time, torch
free, total = torch.cuda.mem_get_info()
hold = free - int(float(sys.argv[1]) * 2**30)
x = torch.empty(hold, dtype=torch.uint8, device="cuda")
print(f"holder: {hold / 2**30:.2f} GiB held, {torch.cuda.mem_get_info()[0] / 2**30:.2f} GiB free", flush=True)
open("/tmp/holder-ready", "w").close()
time.sleep(240)
PY
HOLDER=$!
for _ in $(seq 120); do [ -f /tmp/holder-ready ] && break; sleep 1; done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
timeout 200 $VPIPE tensors vae-encode --vae $W/vae.safetensors --device cuda:0 --dtype bf16 --tile 512 \
  --input $W/clip.safetensors --output $W/oom_enc.safetensors --report $OUT/oom_report.json 2>&1 | tail -5
echo "vpipe exit: ${PIPESTATUS[0]}"
kill $HOLDER 2>/dev/null
python3 - "$OUT/oom_report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("fallbacks:", json.dumps(r["fallbacks"], indent=1))
for n in r["notes"]: print("note:", n["what"], "-", n["detail"])
p = [p for p in r["phases"] if p["name"] == "vae encode"][0]
print(f"encode peak above baseline {p['peak_above_baseline'] / 2**30:.3f} GiB, exit {p['exit_above_baseline']}")
PY
