#!/bin/bash
# Device-machine run for issue 13 (streamed DiT and umT5), in one call:
#   1. the 14B T2V DiT, umT5-XXL and the VAE with random bf16 weights (speed and memory do not
#      depend on the values), `vpipe plan` and `vpipe run` text-to-video at 832x480x81, 2 steps,
#      CFG 5: resident (no budget), --vram-budget 12GiB (some blocks held, the rest streamed),
#      --vram-budget 4GiB (every block streamed), each with its report; the resident and 12 GiB
#      outputs compared (same kernels, same order: they should be equal);
#   2. diffusers in the same call: the same 14B resident (B=1, B=2) and with group offloading,
#      leaf level and block level, use_stream=True (bench/dit_gpu.py dit-offload).
# Needs .carry/vpipe.xz (CUDA build), .whl/ (diffusers). Carry [".carry", ".whl"].
# Results in $OUT: stream.log, report-*.json, summary.json.
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
M=/tmp/wan-random
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
date -u
{
  T0=$(date +%s)
  [ -f $M/wan2.1_t2v_14B_random_bf16.safetensors ] || python3 bench/make_random_checkpoints.py $M || exit 4
  [ -f /tmp/vaebench/vae.safetensors ] || python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
  echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
  FILES="--dit $M/wan2.1_t2v_14B_random_bf16.safetensors --vae /tmp/vaebench/vae.safetensors --text-encoder $M/umt5_xxl_random_bf16.safetensors --tokenizer crates/vpipe-text/tests/fixtures/tokenizer.json"
  JOB="--prompt 'A cheesecake with berries on a plate, slow camera pan' --steps 2 --size 832x480 --frames 81 --device cuda:0 --dtype bf16 --tile 256"
  for B in resident 12GiB 4GiB; do
    FLAG=""; [ $B != resident ] && FLAG="--vram-budget $B"
    echo "=== vpipe plan, $B"
    eval $VPIPE plan $FILES $JOB $FLAG --out /tmp/x.safetensors | tail -9
    echo "=== vpipe run, $B (+$(( $(date +%s) - T0 ))s)"
    TIMER=""; [ -x /usr/bin/time ] && TIMER="/usr/bin/time -v"
    eval VPIPE_LOG=info $TIMER $VPIPE run $FILES $JOB $FLAG --out /tmp/out-$B.safetensors --report $OUT/report-$B.json > /tmp/run-$B.log 2>&1
    echo "vpipe run $B exit $?"
    grep -E "^run:|vpipe:|Maximum resident|Elapsed|panicked|error" /tmp/run-$B.log | head -8
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | head -3
  done
  python3 - "$OUT" <<'EOF'
import json, sys, glob, os
out = sys.argv[1]
GiB = 2**30
rows = {}
for name in ("resident", "12GiB", "4GiB"):
    path = f"{out}/report-{name}.json"
    if not os.path.exists(path):
        print(name, "no report"); continue
    r = json.load(open(path))
    steps = [float(n["detail"].split(": ")[-1].split(" s")[0]) for n in r["notes"] if n["what"] == "step"]
    phases = {p["name"]: p for p in r["phases"]}
    row = {
        "steps_s": steps,
        "footprint_peak_gib": {k: round((p.get("device_footprint_peak") or 0) / GiB, 3) for k, p in phases.items()},
        "live_peak_gib": {k: round(p["peak_above_baseline"] / GiB, 3) for k, p in phases.items()},
        "nvml_gib": {k: round(((p["exit"].get("cuda") or {}).get("nvml_process_used") or 0) / GiB, 3) for k, p in phases.items()},
        "streams": r.get("streams", []),
        "violations": r["violations"],
        "verified": all(t["verified"] for t in r["transitions"]),
        "notes": [n["detail"] for n in r["notes"] if n["what"] in ("sampling", "stream")],
        "load_ms": {f'{t["model"]} {t["from"]}->{t["to"]}': round(t["work_ms"]) for t in r["transitions"] if t["expected_bytes"] > 0},
    }
    rows[name] = row
    print(name, json.dumps(row, indent=1))
if "resident" in rows:
    base = rows["resident"]["steps_s"][-1]
    for k, v in rows.items():
        if v["steps_s"]:
            print(f"{k}: last step {v['steps_s'][-1]:.2f} s = {v['steps_s'][-1] / base:.3f}x resident")
try:
    from safetensors.torch import load_file
    a = load_file("/tmp/out-resident.safetensors")["video"].float()
    for other in ("12GiB", "4GiB"):
        b = load_file(f"/tmp/out-{other}.safetensors")["video"].float()
        print(f"max |resident - {other}| on the decoded video: {(a - b).abs().max().item():.3e}")
except Exception as e:
    print("comparison failed:", e)
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
EOF
  echo "=== diffusers: the 14B resident and with group offloading (+$(( $(date +%s) - T0 ))s)"
  timeout 400 python3 bench/dit_gpu.py dit-offload --reps 2 | sed 's/^/diffusers /'
  echo "done at +$(( $(date +%s) - T0 ))s"
} 2>&1 | tee "$OUT/stream.log"
