#!/bin/bash
# One device call for everything measured so far: the memory core (issue 2) and the VAE
# (issue 3). Everything printed also lands in $OUT/log.txt.
# carry: [".carry", ".whl"]  (.carry: vpipe.xz, residency_bench.xz, clip.mp4; .whl: diffusers)
OUT=${OUT:-/tmp/vpipe-bench-out}; mkdir -p "$OUT"
{
  bash bench/gpu-memory-core.sh
  echo "=== VAE"
  bash bench/gpu-vae.sh
} 2>&1 | tee "$OUT/log.txt"
