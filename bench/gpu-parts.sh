#!/bin/bash
# Device-machine runs for issue 13 with DiT blocks streamed in parts (one arena slot per
# block part), sequential guidance and token slices, in calls on one warm machine (each under
# the device tool's 10 minutes):
#   bash bench/gpu-parts.sh A   the stream test on the device; text-to-video 832x480x81, 2
#                               steps, 14B bf16: resident, --vram-budget 4GiB (else the plan's
#                               least) and 12GiB; diffusers' group offloading in the same call
#   bash bench/gpu-parts.sh B   the device tests (stream, fused attention written over its
#                               queries); text-to-video resident and at 4GiB (else the least);
#                               video-to-video from the real clip at --vram-budget 6GiB
#                               --ram-budget 32GiB, then with a rank-32 LoRA on all 400 linear
#                               layers (load times compared), each checked by
#                               bench/check_pipeline_report.py
#   bash bench/gpu-parts.sh D   with a reading as each streamed block starts: text-to-video
#                               resident and at 4GiB (else the least)
#   bash bench/gpu-parts.sh E   with the LoRA merged in place in the pinned copy and the
#                               planner's estimate of cuDNN's attention in token slices:
#                               text-to-video at 4GiB (else the least); video-to-video at 6GiB
#                               without and with the rank-32 LoRA (load times compared, each
#                               checked); then the scaled-fp8 14B: text-to-video at 3GiB (else
#                               its least)
#   bash bench/gpu-parts.sh F   with the LoRA merged on the GPU as the weights are read and
#                               the FFN's in-place estimate: the device-merge test and the
#                               epilogue linear layer's (.carry/fp8_gpu.xz); text-to-video
#                               resident and at 4GiB (else the least); video-to-video at 6GiB
#                               without and with the rank-32 LoRA (load times compared, each
#                               checked); then the scaled-fp8 14B with the LoRA at 16GiB
#                               (checked; the fp8 weights' LoRA merged on the host)
#   bash bench/gpu-parts.sh G   one call for what F and `gpu-attention.sh fp8` measure, most
#                               wanted first, each step started only while the call's 10
#                               minutes leave it time: the device-merge test, the float8
#                               tests and forwards next to
#                               diffusers (`gpu-attention.sh fp8`), then text-to-video resident
#                               and at 4GiB, then video-to-video at 6GiB without and with the
#                               LoRA (load times compared, each checked); G_SECONDS=N for a
#                               call limited to N seconds (default 585)
#   bash bench/gpu-parts.sh O   with float8 LoRA merges on the GPU and the float8 attention's
#                               keys and values centred: the device-merge test and the float8
#                               attention test; the 14B forward at B = 2 with the float8
#                               attention (its error against exact); then what N runs
#   bash bench/gpu-parts.sh L   what G leaves out when short of time: video-to-video at 6GiB
#                               without and with the LoRA (load times compared, each checked)
#   bash bench/gpu-parts.sh M   the device-merge test and the float8 tests (the float8
#                               attention's error per shape, its time token- and head-major);
#                               the 14B forward at B = 2 with each float8 path alone (its
#                               error against exact); then text-to-video resident and at 4GiB
#                               (one sample at a time, whole, since the planner's one-sample
#                               pool reserve)
#   bash bench/gpu-parts.sh N   the scaled-fp8 14B: video-to-video at 16GiB without and with
#                               the rank-32 LoRA (its float8 weights merged in place in the
#                               pinned copy; load times compared, each checked)
#   bash bench/gpu-parts.sh H   issue 13's H200 table in one call: text-to-video resident, at
#                               4GiB (else the plan's least) and at 12GiB; diffusers' group
#                               offloading (leaf and block level) in the same call; then the
#                               scaled-fp8 14B at 3GiB (else its least); each step started
#                               only while the call's 10 minutes leave it time (H_SECONDS,
#                               default 585)
#   bash bench/gpu-parts.sh C   after the planner's recalibration on call B: text-to-video
#                               resident and at 4GiB (else the least), video-to-video at 6GiB
#                               (checked); then the scaled-fp8 14B: text-to-video at 3GiB (else
#                               its least), video-to-video at 16GiB (checked)
# Needs .carry/vpipe.xz (CUDA build), .carry/{stream,fused_attention_gpu}.xz (the device
# tests, built with `cargo test --release --features cuda -p vpipe-mem --test stream
# --no-run` and `-p vpipe-models --test fused_attention_gpu`), .carry/clip.mp4, .whl/
# (diffusers). Carry [".carry", ".whl"]. Results in $OUT (8 files at most come back).
set -u
PART=${1:?A or B}
. bench/device-env.sh
VPIPE=$(unpack vpipe)
M=/tmp/wan-random
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
date -u
T0=$(date +%s)
TOK="--tokenizer crates/vpipe-text/tests/fixtures/tokenizer.json"
FILES="--vae /tmp/vaebench/vae.safetensors --text-encoder $M/umt5_xxl_random_bf16.safetensors $TOK"
BF16="--dit $M/wan2.1_t2v_14B_random_bf16.safetensors"
FP8="--dit $M/wan2.1_t2v_14B_random_fp8_scaled.safetensors"
T2V="--steps 2 --size 832x480 --frames 81 --device cuda:0 --dtype bf16 --tile 256"
V2V="--input .carry/clip.mp4 --strength 0.5 --steps 4 --size 832x480 --frames 81 --device cuda:0 --dtype bf16 --tile 256"
PROMPT="A cheesecake with berries on a plate, slow camera pan"

run() {  # name, out, flags...; the report and the log's key lines
  local name=$1 out=$2; shift 2
  echo "=== vpipe run $name (+$(( $(date +%s) - T0 ))s)"
  VPIPE_LOG=info /usr/bin/time -v $VPIPE run "$@" --prompt "$PROMPT" --out $out --report /tmp/report-$name.json > /tmp/run-$name.log 2>&1
  local code=$?
  # A refused run (exit 3) loaded nothing: its report does not come back (8 files at most).
  [ $code -ne 3 ] && cp /tmp/report-$name.json $OUT/ 2>/dev/null
  echo "vpipe run $name exit $code"
  grep -E "^run:|^vpipe:|Maximum resident|Elapsed|panicked|sample [0-9]/|stream|DiT" /tmp/run-$name.log | head -12
  return $code
}
least() {  # the least budget the plan takes for these flags, in MiB, rounded up
  $VPIPE plan "$@" --vram-budget 1GiB --prompt x --out /tmp/x.mp4 --json \
    | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["minimum_bytes"] / 2**20) + 1)'
}
budget_or_least() {  # name, out, budget, flags...: the run at the budget, else at the least
  local name=$1 out=$2 budget=$3; shift 3
  echo "--- plan at $budget"
  $VPIPE plan "$@" --vram-budget $budget --prompt x --out /tmp/x.mp4 | tail -8
  run $name $out "$@" --vram-budget $budget
  if [ $? -eq 3 ]; then
    local l=$(least "$@")MiB
    echo "refused at $budget; the plan's least: $l"
    run $name-least $out "$@" --vram-budget $l
  fi
}
checked() {  # name, out, exit code: bench/check_pipeline_report.py with the host peak RSS
  python3 bench/check_pipeline_report.py --run-exit $3 --time-log /tmp/run-$1.log --max-rss-gib 32 \
    /tmp/report-$1.json $2 81 | grep -E "FAIL|ALL|exit status|peak RSS"
  echo "check_pipeline_report $1 exit ${PIPESTATUS[0]}"
}
bf16_runs() {  # the checkpoints ($1: which), then text-to-video resident and at 4GiB (else the
  # least), video-to-video at 6GiB checked
  ONLY=$1 python3 bench/make_random_checkpoints.py $M || exit 4
  python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
  echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
  run t2v-resident /tmp/t2v-resident.safetensors $BF16 $FILES $T2V
  budget_or_least t2v-4GiB /tmp/t2v-4GiB.safetensors 4GiB $BF16 $FILES $T2V
  run v2v-6GiB /tmp/v2v.mp4 $BF16 $FILES $V2V --vram-budget 6GiB --ram-budget 32GiB
  checked v2v-6GiB /tmp/v2v.mp4 $?
  cp /tmp/report-v2v-6GiB.svg $OUT/ 2>/dev/null
}
v2v_lora() {  # video-to-video at 6GiB with the rank-32 LoRA on all 400 linear layers, checked
  run v2v-6GiB-lora /tmp/v2v-lora.mp4 $BF16 $FILES $V2V --vram-budget 6GiB --ram-budget 32GiB \
    --lora $M/lora_rank32_all_linear_random.safetensors:0.8
  checked v2v-6GiB-lora /tmp/v2v-lora.mp4 $?
}
v2v_without_and_with_lora() {  # the same without the LoRA first (the load times compared)
  run v2v-6GiB /tmp/v2v.mp4 $BF16 $FILES $V2V --vram-budget 6GiB --ram-budget 32GiB
  checked v2v-6GiB /tmp/v2v.mp4 $?
  v2v_lora
}
summary() {  # summary-$PART.json: per run the steps, footprints, streams and load times
  python3 - "$OUT" "$PART" <<'EOF'
import json, sys, os, glob
out, part = sys.argv[1], sys.argv[2]
GiB = 2**30
rows = {}
for path in sorted(glob.glob(f"{out}/report-*.json")):
    name = os.path.basename(path)[len("report-"):-len(".json")]
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
        "sample_phase_readings": sum(1 for x in r["samples"] if phases["sample"]["entry"]["t_ms"] <= x["t_ms"] <= phases["sample"]["exit"]["t_ms"]),
        "notes": [n["detail"] for n in r["notes"] if n["what"] in ("sampling", "stream", "lora", "plan")],
        "moves_ms": {f'{t["phase"]}: {t["model"]} {t["from"]}->{t["to"]}': round(t["work_ms"]) for t in r["transitions"] if t["expected_bytes"] > 0},
    }
json.dump(rows, open(f"{out}/summary-{part}.json", "w"), indent=1)
for name, row in rows.items():
    print(name, json.dumps({k: row[k] for k in ("steps_s", "footprint_peak_gib", "violations", "verified", "sample_phase_readings")}))
EOF
}

{
  if [ "$PART" = A ]; then
    [ -f .carry/stream.xz ] && timeout 120 "$(unpack stream)" --test-threads 1 2>&1 \
      | grep -E "^test |test result|panicked"
    ONLY=dit,umt5,lora python3 bench/make_random_checkpoints.py $M || exit 4
    python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
    echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
    run t2v-resident /tmp/t2v-resident.safetensors $BF16 $FILES $T2V
    budget_or_least t2v-4GiB /tmp/t2v-4GiB.safetensors 4GiB $BF16 $FILES $T2V
    run t2v-12GiB /tmp/t2v-12GiB.safetensors $BF16 $FILES $T2V --vram-budget 12GiB
    python3 - <<'EOF'
from safetensors.numpy import load_file
import numpy as np
import glob
ref = load_file("/tmp/t2v-resident.safetensors")
for other in sorted(glob.glob("/tmp/t2v-*GiB*.safetensors")):
    o = load_file(other)
    print(other, {k: float(np.abs(o[k].astype(np.float32) - ref[k].astype(np.float32)).max()) for k in ref})
EOF
    echo "=== diffusers: the 14B resident and with group offloading (+$(( $(date +%s) - T0 ))s)"
    timeout 300 python3 bench/dit_gpu.py dit-offload --reps 2 | sed 's/^/diffusers /'
  elif [ "$PART" = B ]; then
    for t in stream fused_attention_gpu; do
      [ -f .carry/$t.xz ] && timeout 120 "$(unpack $t)" --test-threads 1 --nocapture 2>&1 \
        | grep -E "^test |test result|panicked|max abs"
    done
    bf16_runs dit,umt5,lora
    v2v_lora
  elif [ "$PART" = E ]; then
    ONLY=dit,umt5,lora python3 bench/make_random_checkpoints.py $M || exit 4
    python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
    echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
    budget_or_least t2v-4GiB /tmp/t2v-4GiB.safetensors 4GiB $BF16 $FILES $T2V
    v2v_without_and_with_lora
    rm -f $M/wan2.1_t2v_14B_random_bf16.safetensors
    ONLY=fp8 python3 bench/make_random_checkpoints.py $M || exit 4
    echo "fp8 checkpoint ready at +$(( $(date +%s) - T0 ))s"
    budget_or_least fp8-3GiB /tmp/fp8-t2v.safetensors 3GiB $FP8 $FILES $T2V
  elif [ "$PART" = F ]; then
    [ -f .carry/device_merge_gpu.xz ] && timeout 120 "$(unpack device_merge_gpu)" --test-threads 1 \
      --nocapture 2>&1 | grep -E "^test |test result|panicked|against host"
    # The exact linear layers' bias and GELU in cuBLASLt's epilogue, against the host, before
    # the runs that use them.
    [ -f .carry/fp8_gpu.xz ] && timeout 120 "$(unpack fp8_gpu)" the_epilogue_linear_equals_the_hosts \
      --test-threads 1 --nocapture 2>&1 | grep -E "^test |test result|panicked|linear rows"
    ONLY=dit,umt5,lora python3 bench/make_random_checkpoints.py $M || exit 4
    python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
    echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
    run t2v-resident /tmp/t2v-resident.safetensors $BF16 $FILES $T2V
    budget_or_least t2v-4GiB /tmp/t2v-4GiB.safetensors 4GiB $BF16 $FILES $T2V
    v2v_without_and_with_lora
    rm -f $M/wan2.1_t2v_14B_random_bf16.safetensors
    if [ $(( $(date +%s) - T0 )) -lt 400 ]; then
      ONLY=fp8 python3 bench/make_random_checkpoints.py $M || exit 4
      run v2v-fp8-lora /tmp/v2v-fp8-lora.mp4 $FP8 $FILES $V2V --vram-budget 16GiB --ram-budget 32GiB \
        --lora $M/lora_rank32_all_linear_random.safetensors:0.8
      checked v2v-fp8-lora /tmp/v2v-fp8-lora.mp4 $?
    else
      echo "fp8 + LoRA skipped: +$(( $(date +%s) - T0 ))s"
    fi
  elif [ "$PART" = G ]; then
    left() { echo $(( ${G_SECONDS:-585} - ($(date +%s) - T0) )); }
    [ -f .carry/device_merge_gpu.xz ] && timeout 60 "$(unpack device_merge_gpu)" --test-threads 1 \
      --nocapture 2>&1 | grep -E "^test |test result|panicked|against host"
    FP8_APART=0 bash bench/gpu-attention.sh fp8 > /dev/null 2>&1
    echo "float8 forwards done (attention.log) at +$(( $(date +%s) - T0 ))s"
    grep -E "^test |test result|panicked|GPU against|FFN product|fp8 attention" $OUT/attention.log
    python3 bench/dit_table.py $OUT/attention.log
    if [ $(left) -gt 200 ]; then
      ONLY=dit,umt5,lora python3 bench/make_random_checkpoints.py $M || exit 4
      python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
      echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
      run t2v-resident /tmp/t2v-resident.safetensors $BF16 $FILES $T2V
      [ $(left) -gt 60 ] && budget_or_least t2v-4GiB /tmp/t2v-4GiB.safetensors 4GiB $BF16 $FILES $T2V
      [ $(left) -gt 110 ] && v2v_without_and_with_lora
    fi
  elif [ "$PART" = M ]; then
    [ -f .carry/device_merge_gpu.xz ] && timeout 60 "$(unpack device_merge_gpu)" --test-threads 1 \
      --nocapture 2>&1 | grep -E "^test |test result|panicked|against host"
    timeout 150 "$(unpack fp8_gpu)" --nocapture --test-threads 1 2>&1 \
      | grep -E "^test |test result|panicked|GPU against|FFN product|fp8 attention|self-attention|linear rows|relative L2"
    D=$(unpack dit_bench)
    for run in "cudnn fp8" "fp8 exact"; do
      set -- $run
      echo "=== vpipe wan2.1-t2v-14b, $1 attention, $2 products (+$(( $(date +%s) - T0 ))s)"
      timeout 120 "$D" --preset wan2.1-t2v-14b --attention $1 --matmul $2 --reps 2 --batches 2 \
        | sed "s/^/vpipe 14b $1 $2 /"
    done
    ONLY=dit,umt5 python3 bench/make_random_checkpoints.py $M || exit 4
    python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
    echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
    run t2v-resident /tmp/t2v-resident.safetensors $BF16 $FILES $T2V
    budget_or_least t2v-4GiB /tmp/t2v-4GiB.safetensors 4GiB $BF16 $FILES $T2V
  elif [ "$PART" = H ]; then
    left() { echo $(( ${H_SECONDS:-585} - ($(date +%s) - T0) )); }
    ONLY=dit,umt5 python3 bench/make_random_checkpoints.py $M || exit 4
    python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
    echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
    run t2v-resident /tmp/t2v-resident.safetensors $BF16 $FILES $T2V
    budget_or_least t2v-4GiB /tmp/t2v-4GiB.safetensors 4GiB $BF16 $FILES $T2V
    [ $(left) -gt 300 ] && run t2v-12GiB /tmp/t2v-12GiB.safetensors $BF16 $FILES $T2V --vram-budget 12GiB
    if [ $(left) -gt 220 ]; then
      echo "=== diffusers: the 14B resident and with group offloading (+$(( $(date +%s) - T0 ))s)"
      timeout $(( $(left) - 130 )) python3 bench/dit_gpu.py dit-offload --reps 2 | sed 's/^/diffusers /'
    fi
    rm -f $M/wan2.1_t2v_14B_random_bf16.safetensors
    if [ $(left) -gt 120 ]; then
      ONLY=fp8 python3 bench/make_random_checkpoints.py $M || exit 4
      budget_or_least fp8-3GiB /tmp/fp8-t2v.safetensors 3GiB $FP8 $FILES $T2V
    fi
  elif [ "$PART" = O ] || [ "$PART" = N ]; then
    if [ "$PART" = O ]; then
      timeout 90 "$(unpack device_merge_gpu)" --test-threads 1 --nocapture 2>&1 \
        | grep -E "^test |test result|panicked|against host|scaled fp8"
      timeout 150 "$(unpack fp8_gpu)" fp8_attention --nocapture --test-threads 1 2>&1 \
        | grep -E "^test |test result|panicked|fp8 attention|bf16 attention|self-attention"
      echo "=== vpipe wan2.1-t2v-14b, fp8 attention, exact products (+$(( $(date +%s) - T0 ))s)"
      timeout 120 "$(unpack dit_bench)" --preset wan2.1-t2v-14b --attention fp8 --matmul exact \
        --reps 2 --batches 2 | sed "s/^/vpipe 14b fp8 exact /"
    fi
    ONLY=umt5,lora,fp8 python3 bench/make_random_checkpoints.py $M || exit 4
    python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
    echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
    run v2v-fp8 /tmp/v2v-fp8.mp4 $FP8 $FILES $V2V --vram-budget 16GiB --ram-budget 32GiB
    checked v2v-fp8 /tmp/v2v-fp8.mp4 $?
    run v2v-fp8-lora /tmp/v2v-fp8-lora.mp4 $FP8 $FILES $V2V --vram-budget 16GiB --ram-budget 32GiB \
      --lora $M/lora_rank32_all_linear_random.safetensors:0.8
    checked v2v-fp8-lora /tmp/v2v-fp8-lora.mp4 $?
  elif [ "$PART" = L ]; then
    ONLY=dit,umt5,lora python3 bench/make_random_checkpoints.py $M || exit 4
    python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
    echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
    v2v_without_and_with_lora
  elif [ "$PART" = D ]; then
    ONLY=dit,umt5 python3 bench/make_random_checkpoints.py $M || exit 4
    python3 bench/vae_gpu.py prepare .carry/clip.mp4 > /dev/null || exit 4
    run t2v-resident /tmp/t2v-resident.safetensors $BF16 $FILES $T2V
    budget_or_least t2v-4GiB /tmp/t2v-4GiB.safetensors 4GiB $BF16 $FILES $T2V
  else
    bf16_runs dit,umt5
    rm -f $M/wan2.1_t2v_14B_random_bf16.safetensors
    ONLY=fp8 python3 bench/make_random_checkpoints.py $M || exit 4
    echo "fp8 checkpoint ready at +$(( $(date +%s) - T0 ))s"
    budget_or_least fp8-3GiB /tmp/fp8-t2v.safetensors 3GiB $FP8 $FILES $T2V
    run v2v-fp8-16GiB /tmp/v2v-fp8.mp4 $FP8 $FILES $V2V --vram-budget 16GiB --ram-budget 32GiB
    checked v2v-fp8-16GiB /tmp/v2v-fp8.mp4 $?
  fi
  summary
  echo "done at +$(( $(date +%s) - T0 ))s"
} 2>&1 | tee "$OUT/runs-$PART.log"
