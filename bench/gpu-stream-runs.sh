#!/bin/bash
# Device-machine run for issue 13, the second call (after bench/gpu-stream.sh):
#   1. text-to-video at 832x480x81, 2 steps, with the 14B bf16 resident and under the least
#      --vram-budget the plan takes (every block streamed), each with its report;
#   2. video-to-video from the real clip under --vram-budget 6GiB --ram-budget 32GiB, checked by
#      bench/check_pipeline_report.py (with the host peak RSS from /usr/bin/time -v), then the
#      same run with a rank-32 LoRA on all 400 linear layers (the DiT's load time compared);
#   3. when time is left: the scaled-fp8 14B under the least budget its plan takes.
# Needs .carry/vpipe.xz (CUDA build), .carry/clip.mp4, .whl/ (diffusers, for the VAE weights).
# Carry [".carry", ".whl"]. Results in $OUT: runs.log, report-*.json, report-v2v-6GiB.svg,
# summary.json (8 files at most come back).
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
M=/tmp/wan-random
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
date -u
{
  T0=$(date +%s)
  # When carried: vpipe-mem's stream test on the device (pinned and file sources, bf16 and
  # float8 blocks, in and out of order; built by `cargo test --release --features cuda -p
  # vpipe-mem --test stream --no-run`).
  if [ -f .carry/stream_gpu.xz ]; then
    timeout 120 "$(unpack stream_gpu)" --test-threads 1 --nocapture 2>&1 | grep -E "test result|panicked|FAILED"
  fi
  ONLY=dit,umt5,lora python3 bench/make_random_checkpoints.py $M || exit 4
  python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
  echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
  TOK="--tokenizer crates/vpipe-text/tests/fixtures/tokenizer.json"
  FILES="--vae /tmp/vaebench/vae.safetensors --text-encoder $M/umt5_xxl_random_bf16.safetensors $TOK"
  DIT="--dit $M/wan2.1_t2v_14B_random_bf16.safetensors"
  T2V="--steps 2 --size 832x480 --frames 81 --device cuda:0 --dtype bf16 --tile 256"
  V2V="--input .carry/clip.mp4 --strength 0.5 --steps 4 --size 832x480 --frames 81 --device cuda:0 --dtype bf16 --tile 256"
  PROMPT="A cheesecake with berries on a plate, slow camera pan"
  run() {  # name, out, flags...
    local name=$1 out=$2; shift 2
    echo "=== vpipe run $name (+$(( $(date +%s) - T0 ))s)"
    VPIPE_LOG=info /usr/bin/time -v $VPIPE run "$@" --prompt "$PROMPT" --out $out --report /tmp/report-$name.json > /tmp/run-$name.log 2>&1
    local code=$?
    cp /tmp/report-$name.json $OUT/ 2>/dev/null
    echo "vpipe run $name exit $code"
    grep -E "^run:|^vpipe:|Maximum resident|Elapsed|panicked|sample [0-9]/" /tmp/run-$name.log | head -8
    return $code
  }
  least() {  # the least budget the plan takes for these flags, in MiB, rounded up
    $VPIPE plan "$@" --vram-budget 1GiB --prompt x --out /tmp/x.mp4 --json \
      | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["minimum_bytes"] / 2**20) + 1)'
  }
  run t2v-resident /tmp/t2v-resident.safetensors $DIT $FILES $T2V
  LEAST=$(least $DIT $FILES $T2V)MiB
  echo "least budget: $LEAST"
  $VPIPE plan $DIT $FILES $T2V --vram-budget $LEAST --prompt x --out /tmp/x.mp4 | tail -6
  run t2v-least /tmp/t2v-least.safetensors $DIT $FILES $T2V --vram-budget $LEAST
  run v2v-6GiB /tmp/v2v.mp4 $DIT $FILES $V2V --vram-budget 6GiB --ram-budget 32GiB
  CODE=$?
  python3 bench/check_pipeline_report.py --run-exit $CODE --time-log /tmp/run-v2v-6GiB.log --max-rss-gib 32 \
    /tmp/report-v2v-6GiB.json /tmp/v2v.mp4 81
  echo "check_pipeline_report exit $?"
  cp /tmp/report-v2v-6GiB.svg $OUT/ 2>/dev/null
  run v2v-6GiB-lora /tmp/v2v-lora.mp4 $DIT $FILES $V2V --vram-budget 6GiB --ram-budget 32GiB \
    --lora $M/lora_rank32_all_linear_random.safetensors:0.8
  CODE=$?
  python3 bench/check_pipeline_report.py --run-exit $CODE --time-log /tmp/run-v2v-6GiB-lora.log --max-rss-gib 32 \
    /tmp/report-v2v-6GiB-lora.json /tmp/v2v-lora.mp4 81 | tail -3
  python3 - "$OUT" <<'EOF'
import json, sys, os
out = sys.argv[1]
GiB = 2**30
rows = {}
for name in ("t2v-resident", "t2v-least", "v2v-6GiB", "v2v-6GiB-lora", "fp8-least"):
    path = f"{out}/report-{name}.json"
    if not os.path.exists(path):
        continue
    r = json.load(open(path))
    phases = {p["name"]: p for p in r["phases"]}
    rows[name] = {
        "steps_s": [n["detail"] for n in r["notes"] if n["what"] == "step"],
        "footprint_peak_gib": {k: round((p.get("device_footprint_peak") or 0) / GiB, 3) for k, p in phases.items()},
        "live_peak_gib": {k: round(p["peak_above_baseline"] / GiB, 3) for k, p in phases.items()},
        "host_peak_anon_shmem_gib": round(max((p["exit"]["host"]["anon"] + p["exit"]["host"]["shmem"]) for p in r["phases"]) / GiB, 2),
        "streams": [{k: s[k] for k in ("phase", "model", "source", "slots", "groups", "fixed_bytes", "arena_bytes", "stats")} for s in r.get("streams", [])],
        "violations": r["violations"],
        "verified": all(t["verified"] for t in r["transitions"]),
        "notes": [n["detail"] for n in r["notes"] if n["what"] in ("sampling", "stream", "lora")],
        "moves_ms": {f'{t["phase"]}: {t["model"]} {t["from"]}->{t["to"]}': round(t["work_ms"]) for t in r["transitions"] if t["expected_bytes"] > 0},
    }
    print(name, json.dumps(rows[name], indent=1))
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
EOF
  if [ $(( $(date +%s) - T0 )) -lt 440 ]; then
    rm -f $M/wan2.1_t2v_14B_random_bf16.safetensors
    ONLY=fp8 python3 bench/make_random_checkpoints.py $M
    FP8="--dit $M/wan2.1_t2v_14B_random_fp8_scaled.safetensors"
    run fp8-least /tmp/fp8.safetensors $FP8 $FILES $T2V --vram-budget $(least $FP8 $FILES $T2V)MiB
  else
    echo "fp8 run skipped: +$(( $(date +%s) - T0 ))s"
  fi
  echo "done at +$(( $(date +%s) - T0 ))s"
} 2>&1 | tee "$OUT/runs.log"
