#!/bin/bash
# Device-machine run for the memory core (issue 2): vpipe's residency benchmark, vpipe demo on
# CUDA, and PyTorch's pinned host->device copy on the same card in the same call.
#
# Build here first (see README "CUDA build"), then:
#   mkdir -p .carry && xz -T2 -6 -c target-cuda/release/examples/residency_bench > .carry/residency_bench.xz
#   xz -T2 -6 -c target-cuda/release/vpipe > .carry/vpipe.xz
# and in the device tool: run `bash bench/gpu-memory-core.sh` with carry [".carry"].
set -u
OUT=${OUT:-/tmp/vpipe-bench-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
BIN=/tmp/vpipe-bin
mkdir -p "$BIN"
for f in .carry/*.xz; do
  name=$(basename "$f" .xz)
  xz -dc "$f" > "$BIN/$name" && chmod +x "$BIN/$name"
done
date -u +"%Y-%m-%dT%H:%MZ"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1

echo "=== vpipe residency benchmark (4 GiB bf16, 3 rounds)"
"$BIN/residency_bench" --gib 4 --rounds 3 --out "$OUT/residency" 2>&1
rm -f "$OUT/residency/memory.svg"  # drawn again from report.json here; $OUT returns 8 files at most

if [ -x "$BIN/vpipe" ]; then
  echo "=== vpipe demo --device cuda:0"
  "$BIN/vpipe" demo --device cuda:0 --out /tmp/vpipe-demo 2>&1 | tail -n 12
  mkdir -p "$OUT/demo" && cp /tmp/vpipe-demo/report.json "$OUT/demo/" 2>/dev/null
fi

echo "=== PyTorch pinned/pageable copies, same card"
mkdir -p "$OUT/torch"
OUT="$OUT/torch" python3 bench/wan-anchors/bench.py xfer 2>&1 | tail -n 20
grep -h '"GB_per_s"' "$OUT/torch/results.jsonl" 2>/dev/null
