#!/bin/bash
# One device call for issue 13: the 14B text-to-video at 832x480x81, 2 steps, CFG 6, with a
# streamed DiT's text and time embeddings (0.43 GiB) left on the host and brought to the device
# at each forward: the stream device test, then the resident run and the run at --vram-budget
# 4GiB (else the plan's least), same call.
# Needs .carry/vpipe.xz (CUDA build), .carry/stream.xz (`cargo test --release --features cuda
# -p vpipe-mem --test stream --no-run`). Carry [".carry", ".whl"].
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
M=/tmp/wan-random
T0=$(date +%s)
TOK="--tokenizer crates/vpipe-text/tests/fixtures/tokenizer.json"
FILES="--dit $M/wan2.1_t2v_14B_random_bf16.safetensors --vae /tmp/vaebench/vae.safetensors --text-encoder $M/umt5_xxl_random_bf16.safetensors $TOK"
T2V="--steps 2 --size 832x480 --frames 81 --device cuda:0 --dtype bf16 --tile 256"
run() {  # name, flags...
  local name=$1; shift
  echo "=== vpipe run $name (+$(( $(date +%s) - T0 ))s)"
  VPIPE_LOG=info $VPIPE run $FILES $T2V "$@" --prompt "A cheesecake on a plate" \
    --out /tmp/$name.safetensors --report /tmp/report-$name.json > /tmp/run-$name.log 2>&1
  local code=$?
  echo "vpipe run $name exit $code"
  grep -E "^run:|^vpipe:|panicked" /tmp/run-$name.log | head -4
  return $code
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  date -u
  [ -f .carry/stream.xz ] && timeout 120 "$(unpack stream)" --test-threads 1 2>&1 \
    | grep -E "^test |test result|panicked"
  ONLY=dit,umt5 python3 bench/make_random_checkpoints.py $M || exit 4
  python3 -c "
import sys, os; sys.path.insert(0, 'bench')
from vae_gpu import make_vae
from safetensors.torch import save_file
os.makedirs('/tmp/vaebench', exist_ok=True)
save_file({k: v.contiguous() for k, v in make_vae().state_dict().items()}, '/tmp/vaebench/vae.safetensors')" || exit 4
  echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
  run t2v-resident
  $VPIPE plan $FILES $T2V --prompt x --vram-budget 4GiB | tail -4
  run t2v-4GiB --vram-budget 4GiB
  if [ $? -eq 3 ]; then
    least=$($VPIPE plan $FILES $T2V --vram-budget 1GiB --prompt x --json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["minimum_bytes"] / 2**20) + 1)')
    echo "refused at 4GiB; the plan's least: ${least}MiB"
    run t2v-least --vram-budget ${least}MiB
  fi
  python3 - "$OUT" <<'PY'
import json, sys, glob, os
import numpy as np
from safetensors.numpy import load_file
out = sys.argv[1]
GiB = 2**30
rows = {}
ref = load_file("/tmp/t2v-resident.safetensors")["latents"].astype(np.float64)
for path in sorted(glob.glob("/tmp/report-*.json")):
    name = os.path.basename(path)[len("report-"):-len(".json")]
    r = json.load(open(path))
    ph = {p["name"]: p for p in r["phases"]}
    lat = load_file(f"/tmp/{name}.safetensors")["latents"].astype(np.float64)
    rows[name] = {
        "steps": [n["detail"] for n in r["notes"] if n["what"] == "step"],
        "sample_footprint_gib": round((ph["sample"].get("device_footprint_peak") or 0) / GiB, 3),
        "footprint_gib": round(max((p.get("device_footprint_peak") or 0) for p in r["phases"]) / GiB, 3),
        "sampling": [n["detail"] for n in r["notes"] if n["what"] == "sampling"],
        "streams": [{k: s[k] for k in ("fixed_bytes", "arena_bytes", "stats")} for s in r.get("streams", []) if s["phase"] == "sample"],
        "violations": r["violations"],
        "verified": all(t["verified"] for t in r["transitions"]),
        "latents_max_abs_vs_resident": float(np.abs(lat - ref).max()),
    }
json.dump(rows, open(f"{out}/summary-embeddings.json", "w"), indent=1)
print(json.dumps(rows, indent=1))
PY
  echo "done at +$(( $(date +%s) - T0 ))s"
} 2>&1 | tee "$OUT/embeddings.log"
