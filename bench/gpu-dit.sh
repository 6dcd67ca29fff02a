#!/bin/bash
# Device-machine run for issue 4: the 14B DiT step with CFG (vpipe vs diffusers SDPA) and the
# umT5-xxl encoder (vpipe vs transformers), full size, random bf16 weights, same card, same call;
# first the fused attention kernel's GPU test and the DiT parity test when their binaries are there.
# Needs .carry/dit_bench.xz (built with `--features cuda,bench-hooks`; and .carry/umt5_bench.xz
# when present) from a CUDA build, .whl/ with
# diffusers 0.42.1. Run with carry [".carry", ".whl"]; results in $OUT/dit.jsonl and log.
set -u
. bench/device-env.sh
for b in dit_bench umt5_bench dit_parity fused_attention_gpu; do unpack $b > /dev/null; done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
date -u
{
  if [ -x /tmp/vpipe-bin/fused_attention_gpu ]; then
    echo "=== fused attention kernel vs the chunked path"
    timeout 120 /tmp/vpipe-bin/fused_attention_gpu --nocapture --test-threads 1 2>&1 | grep -E "max abs|test result|panicked|FAILED"
  fi
  if [ -x /tmp/vpipe-bin/dit_parity ]; then
    echo "=== DiT parity on the GPU (fused kernels vs diffusers fixtures)"
    # The test binary finds its fixtures under the path it was built in.
    [ -e /work/main/crates ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }
    timeout 120 /tmp/vpipe-bin/dit_parity --nocapture --test-threads 1 2>&1 | grep -E "max abs|test result|panicked|FAILED"
  fi
  echo "=== vpipe DiT 14B"
  timeout 330 /tmp/vpipe-bin/dit_bench --preset wan2.1-t2v-14b --scratch-gib ${SCRATCH_GIB:-4} --reps ${DIT_REPS:-2} | sed 's/^/vpipe /'
  echo "=== diffusers DiT 14B"
  timeout 240 python3 bench/dit_gpu.py dit --reps 2 | sed 's/^/diffusers /'
  if [ -x /tmp/vpipe-bin/umt5_bench ] && [ -z "${SKIP_UMT5:-}" ]; then
    echo "=== vpipe umT5-xxl"
    timeout 120 /tmp/vpipe-bin/umt5_bench --reps 5 | sed 's/^/vpipe /'
    echo "=== transformers umT5-xxl"
    timeout 120 python3 bench/dit_gpu.py umt5 --reps 5 | sed 's/^/transformers /'
  fi
} 2>&1 | tee "$OUT/dit.log"
