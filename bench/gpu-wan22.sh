#!/bin/bash
# Device calls for issue 16 (Wan 2.2), random weights, bf16:
#   bash bench/gpu-wan22.sh a14b   the T2V-A14B pair at 832x480x81, 4 steps (2 per expert), at
#                                  --vram-budget 40GiB --ram-budget 48GiB and at 8GiB (streamed;
#                                  --boundary 0.95: shift 12 then gives each expert 2 steps):
#                                  the switch, the footprints, host peak
#   bash bench/gpu-wan22.sh ti2v   TI2V-5B at 1280x704x121, 2 steps; and the Wan 2.2 VAE's tiled
#                                  decode of that latent, vpipe against diffusers, same call
# The two experts are one random file under both of ComfyUI's names (hard links; the disk holds
# one 28.6 GB copy), so the page cache holds one copy for both: the host figures are the process's
# own (RSS anon + pinned), which do not depend on that.
# Needs .carry/vpipe.xz (CUDA build) and, for `ti2v`, .carry/{dit_ti2v_parity,vae22_parity}.xz
# (`cargo test --release --features cuda -p vpipe-models --test dit_ti2v_parity --test
# vae22_parity --no-run`). Carry [".carry", ".whl"].
# On a CPU (a check of this script): TINY=1 VPIPE=target/debug/vpipe bash bench/gpu-wan22.sh PART
set -u
PART=${1:?a14b or ti2v}
if [ -n "${TINY:-}" ]; then
  OUT=${OUT:-/tmp/vpipe-bench-out}; mkdir -p "$OUT"
  DEV="--device cpu"; SIZE_A14B="--size 64x64 --frames 5"; SIZE_TI2V="--size 64x64 --frames 5"
  BUDGETS_A14B="none"; PY=${PY:-python3}
else
  . bench/device-env.sh
  VPIPE=$(unpack vpipe)
  DEV="--device cuda:0 --dtype bf16"; SIZE_A14B="--size 832x480 --frames 81"
  SIZE_TI2V="--size 1280x704 --frames 121"; BUDGETS_A14B="40GiB 8GiB"; PY=python3
fi
M=/tmp/wan22-models-$PART
T0=$(date +%s)
TOK=crates/vpipe-text/tests/fixtures/tokenizer.json
summary() {  # name: the run's report as one JSON line of phases, footprints, moves, host peak
  $PY - "/tmp/report-$1.json" "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); GiB = 2**30
phases = [{"name": p["name"], "s": round((p["exit"]["t_ms"] - p["entry"]["t_ms"]) / 1e3, 2),
           "footprint_gib": round((p.get("device_footprint_peak") or 0) / GiB, 2)} for p in r["phases"]]
host = max((s["rss_anon"] + s["rss_shmem"]) for s in r["samples"]) / GiB if r["samples"] else None
row = {"run": sys.argv[2], "phases": phases,
       "steps": [n["detail"] for n in r["notes"] if n["what"] == "step"],
       "notes": [f'{n["what"]}: {n["detail"]}' for n in r["notes"]
                 if n["what"] in ("expert switch", "sampling")],
       "fallbacks": [f'{n["what"]}: {n["detail"]}' for n in r.get("fallbacks", [])],
       "host_anon_shmem_peak_gib": None if host is None else round(host, 2),
       "verified": all(t["verified"] for t in r["transitions"]),
       "moves": [f'{t["model"]}: {t["from"]}->{t["to"]} ({t["phase"]})' for t in r["transitions"]],
       "violations": r["violations"]}
print(json.dumps(row))
PY
}
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  date -u
  rm -rf $M; mkdir -p $M
  CODE=0
  if [ "$PART" = a14b ]; then
    ONLY=dit,umt5 $PY bench/make_random_checkpoints.py $M || exit 4
    mv $M/wan2.1_t2v_14B_random_bf16.safetensors $M/wan2.2_t2v_high_noise_14B_random_bf16.safetensors
    ln $M/wan2.2_t2v_high_noise_14B_random_bf16.safetensors $M/wan2.2_t2v_low_noise_14B_random_bf16.safetensors
    $PY -c "
import sys; sys.path.insert(0, 'bench')
from vae_gpu import make_vae
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in make_vae().state_dict().items()}, '$M/wan_2.1_vae.safetensors')" || exit 4
    echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
    for budget in $BUDGETS_A14B; do
      flags=""; [ $budget != none ] && flags="--vram-budget $budget --ram-budget 48GiB"
      echo "=== A14B at $budget (+$(( $(date +%s) - T0 ))s)"
      VPIPE_LOG=info $VPIPE run --model-dir $M --tokenizer $TOK $DEV $SIZE_A14B --steps 4 --cfg 4 \
        --cfg-low-noise 3 --boundary 0.95 --prompt "A cheesecake on a plate" --tile 256 $flags \
        --out /tmp/a14b-$budget.mp4 --report /tmp/report-a14b-$budget.json > /tmp/run-a14b-$budget.log 2>&1
      code=$?; echo "exit $code"; [ $code -ne 0 ] && CODE=$code
      grep -E "^run:|^vpipe:|panicked" /tmp/run-a14b-$budget.log | head -4
      summary a14b-$budget | tee -a "$OUT/summary-wan22.jsonl"
    done
  else
    # The TI2V DiT's and the Wan 2.2 VAE's parity tests on the GPU (built with `cuda`, the whole
    # binary runs on device 0): the per-token modulation through the fused kernels, the VAE's
    # stage shortcuts and patches.
    # The test binaries find their fixtures under the path they were built in.
    [ -e /work/main/crates ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }
    for t in dit_ti2v_parity vae22_parity; do
      [ -f .carry/$t.xz ] && timeout 200 "$(unpack $t)" --test-threads 1 --nocapture 2>&1 \
        | grep -E "^test |test result|panicked|max abs|err"
    done
    ONLY=ti2v,umt5 $PY bench/make_random_checkpoints.py $M || exit 4
    $PY -c "
import sys; sys.path.insert(0, 'bench')
from vae_gpu import make_vae22
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in make_vae22().state_dict().items()}, '$M/wan2.2_vae.safetensors')" || exit 4
    echo "checkpoints ready at +$(( $(date +%s) - T0 ))s"
    VPIPE_LOG=info $VPIPE run --model-dir $M --tokenizer $TOK $DEV $SIZE_TI2V --steps 2 --cfg 5 \
      --prompt "A cheesecake on a plate" --tile 256 \
      --out /tmp/ti2v.safetensors --report /tmp/report-ti2v.json > /tmp/run-ti2v.log 2>&1
    code=$?; echo "TI2V-5B exit $code"; [ $code -ne 0 ] && CODE=$code
    grep -E "^run:|^vpipe:|panicked" /tmp/run-ti2v.log | head -4
    summary ti2v | tee -a "$OUT/summary-wan22.jsonl"
    if [ -z "${TINY:-}" ]; then
      # The VAE alone on the run's final latents: diffusers' tiled decode (its defaults, 256 px
      # tiles, stride 192) and vpipe's with the same tiles in diffusers' layout.
      $PY - "$M/wan2.2_vae.safetensors" <<'PY' || CODE=5
import json, sys, time, torch
sys.path.insert(0, "bench")
from vae_gpu import make_vae22
from safetensors.torch import load_file, save_file
z = load_file("/tmp/ti2v.safetensors")["latents"].to(torch.float32)
save_file({"enc_mean": z.contiguous()}, "/tmp/ti2v-latents.safetensors")
vae = make_vae22().cuda()
vae.enable_tiling()
zb = z.to("cuda", torch.bfloat16)
rows = []
for rep in range(2):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.no_grad():
        video = vae.decode(zb).sample
    torch.cuda.synchronize()
    rows.append({"rep": rep, "s": round(time.perf_counter() - t0, 2),
                 "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                 "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)})
print(json.dumps({"diffusers_tiled_decode": rows, "latents": list(z.shape), "video": list(video.shape)}))
PY
      for rep in 1 2; do
        /usr/bin/time -f "vpipe tensors vae-decode wall %e s" $VPIPE tensors vae-decode \
          --vae $M/wan2.2_vae.safetensors --input /tmp/ti2v-latents.safetensors \
          --output /tmp/ti2v-decoded.safetensors --tile 256 --stride 192 --tile-layout diffusers \
          --device cuda:0 --dtype bf16 --report /tmp/report-vae22-$rep.json 2>&1 | tail -2
        summary vae22-$rep | tee -a "$OUT/summary-wan22.jsonl"
      done
    fi
  fi
  echo "done at +$(( $(date +%s) - T0 ))s"
  exit $CODE
} 2>&1 | tee "$OUT/wan22-$PART.log"
exit ${PIPESTATUS[0]}
