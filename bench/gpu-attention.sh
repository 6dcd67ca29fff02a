#!/bin/bash
# One device call for issue 14's attention kernel: vpipe's cuDNN SDPA (ops::cudnn_sdpa) against
# the f32 chunked path and vpipe's own fused kernel (the GPU test binary), then PyTorch's SDPA on
# the same self-attention shape in the same call: its default choice, and cuDNN, flash and
# memory-efficient forced. Which libcudnn each side loads is printed first. With `dit`, then the
# whole 14B and 1.3B forwards (B=2 with CFG, and B=1) with cuDNN's and vpipe's fused attention,
# next to diffusers' in the same call.
# With `stream`: the 14B T2V at 832x480x81, 2 steps, at --vram-budget 4GiB and 12GiB and
# resident, one `vpipe run` each (the plan's attention kernel and token slices, the steps, the
# footprint; needs .carry/vpipe.xz).
# With `slices`: the 14B forward at B=1 with cuDNN's attention, whole and in 8 token slices
# (what a streamed plan runs), resident, to split a sliced step's cost from streaming's.
# With `fp8`: the float8 GPU tests (.carry/fp8_gpu.xz: `cargo test --release --features cuda -p
# vpipe-models --test fp8_gpu --no-run`: products and attention against exact, their times),
# then `dit_bench --attention cudnn|fp8 --matmul exact|fp8` on the 14B and the 1.3B at B = 2
# (each float8 run with its output's error against the exact forward) next to diffusers.
# With `ncu-slices`: the same two forwards on 2 blocks of the 14B under Nsight Compute, kernel
# time summed by kernel name, whole against 8 slices (where a sliced forward's time goes).
# With `fp8-short`: the float8 rows that fit a short call (the tests, the 14B exact and float8,
# the 1.3B exact, each next to diffusers). With `fp8-centred`: the float8 and device-merge
# GPU tests, then the 14B at B = 2 exact, with the float8 attention alone and with both float8
# paths (each with its error against exact), next to diffusers' 14B. With `exact-short`: the 1.3B and the 14B exact at
# B = 2, each next to diffusers (about 5 minutes). With `cudnn-wheel`: the float8 attention test
# on the system's libcudnn and on PyTorch's (its nvidia-cudnn wheel), then the 14B at B = 2 exact and in float8 on PyTorch's, next to diffusers.
#   bash bench/gpu-attention.sh [kernel|dit|stream|slices|ncu-slices|fp8|fp8-short|fp8-pass|fp8-centred|cudnn-wheel|cross-kernels|ncu-rows|exact-short|all]   (default all: kernel and dit)
# Needs .carry/cudnn_attention_gpu.xz (`cargo test --release --features cuda -p vpipe-models
# --test cudnn_attention_gpu --no-run`) and, for `dit`, .carry/dit_bench.xz (`cargo build
# --release --features cuda,bench-hooks -p vpipe --example dit_bench`). Carry [".carry", ".whl"].
set -u
PART=${1:-all}
. bench/device-env.sh
diffusers_dits() {  # the reference: diffusers' 14B and 1.3B forwards, same call
  echo "=== diffusers 14B"
  timeout 200 python3 bench/dit_gpu.py dit --reps 2 | sed 's/^/diffusers /'
  echo "=== diffusers 1.3B"
  timeout 120 python3 bench/dit_gpu.py dit-1.3b --reps 2 | sed 's/^/diffusers /'
}
torch_sdpa() {  # PyTorch's SDPA on one 14B self-attention layer, then on its cross-attention
  # (the text's 512 keys): its default, cuDNN, flash, efficient
  timeout 150 python3 - <<'PY'
import json, torch
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F
b, h, l, d = 2, 40, 32760, 128
torch.manual_seed(0)
# token-major [B, L, H, D] viewed as [B, H, L, D], as diffusers' Wan attention passes them
q, k, v = (torch.randn(b, l, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
lk = l
def timed(backend):
    ctx = sdpa_kernel([backend]) if backend is not None else torch.no_grad()
    with ctx, torch.no_grad():
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v)
        times = []
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); F.scaled_dot_product_attention(q, k, v); e.record()
            torch.cuda.synchronize(); times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return times[len(times) // 2]
backends = [("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
for keys in (l, 512):
    if keys != lk:
        k, v = (torch.randn(b, keys, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        lk = keys
    flops = 4 * b * h * l * keys * d
    for name, backend in backends:
        try:
            s = timed(backend)
            print(json.dumps({"torch_sdpa": name, "shape": [b, h, l, d], "keys": keys, "s": round(s, 5),
                              "tflops": round(flops / s / 1e12, 1)}))
        except Exception as e:
            print(json.dumps({"torch_sdpa": name, "keys": keys, "error": str(e)[:200]}))
PY
}
vpipe_14b() {  # ATTENTION MATMUL [LABEL]: the 14B forward at B = 2 through dit_bench ($B)
  echo "=== vpipe wan2.1-t2v-14b, $1 attention, $2 products${3:+, $3}"
  timeout "${T14:-150}" "$B" --preset wan2.1-t2v-14b --attention "$1" --matmul "$2" --reps 2 \
    --batches 2 ${FP8_SCALES:+--fp8-scales $FP8_SCALES} | sed "s/^/vpipe 14b $1 $2 ${3:+$3 }/"
  [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=8
}
{
  if [ "$PART" = kernel ] || [ "$PART" = all ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  date -u
  ldconfig -p | grep -i libcudnn.so | head -3
  python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
  T=$(unpack cudnn_attention_gpu)
  CUDNN_LOGERR_DBG=1 CUDNN_LOGDEST_DBG=stderr timeout 300 "$T" --nocapture --test-threads 1 2>&1 \
    | grep -vE "^running|^$" | head -120
  CODE=${PIPESTATUS[0]}
  torch_sdpa
  fi
  if [ "$PART" = dit ] || [ "$PART" = all ]; then
    B=$(unpack dit_bench)
    for preset in wan2.1-t2v-14b wan2.1-t2v-1.3b; do
      for kernel in cudnn fused; do
        echo "=== vpipe $preset, $kernel attention"
        timeout 200 "$B" --preset $preset --attention $kernel --reps 2 | sed "s/^/vpipe $kernel /"
        [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=6
      done
    done
    diffusers_dits
  fi
  if [ "$PART" = fp8 ]; then
    # Float8 products (--fp8-compute, dit_bench --matmul fp8): the GPU test against the CPU's
    # emulation and a 14B FFN-sized product's time; then the 14B and 1.3B forwards at B = 2,
    # exact and in float8 (with the output's error against exact), next to diffusers.
    T=$(unpack fp8_gpu)
    timeout 200 "$T" --nocapture --test-threads 1 2>&1 | grep -E "^test |test result|panicked|GPU against|FFN product|fp8 attention|self-attention|linear rows"
    [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=9
    B=$(unpack dit_bench)
    # The issue's rows first and the reference next to them, then the two paths apart (a call
    # that runs out of time still brings back what it printed).
    dit_runs() {
      for run in "$@"; do
        set -- $run
        echo "=== vpipe wan2.1-t2v-$1, $2 attention, $3 products"
        timeout 200 "$B" --preset wan2.1-t2v-$1 --attention $2 --matmul $3 --reps 2 --batches 2 \
          | sed "s/^/vpipe $1 $2 $3 /"
        [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=6
      done
    }
    dit_runs "14b cudnn exact" "14b fp8 fp8" "1.3b cudnn exact" "1.3b fp8 fp8"
    diffusers_dits
    # Each float8 path alone (gpu-parts.sh G leaves them out, for its streaming runs' time).
    [ "${FP8_APART:-1}" = 1 ] && dit_runs "14b cudnn fp8" "14b fp8 exact"
  fi
  if [ "$PART" = fp8-centred ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    date -u
    timeout 90 "$(unpack device_merge_gpu)" --test-threads 1 --nocapture 2>&1 \
      | grep -E "^test |test result|panicked|against host|scaled fp8"
    timeout 150 "$(unpack fp8_gpu)" --nocapture --test-threads 1 2>&1 \
      | grep -E "^test |test result|panicked|GPU against|FFN product|fp8 attention|bf16 attention|self-attention|linear rows"
    B=$(unpack dit_bench)
    for run in "cudnn exact" "fp8 exact" "fp8 fp8"; do vpipe_14b $run; done
    timeout 150 python3 bench/dit_gpu.py dit --reps 2 | sed 's/^/diffusers /'
    date -u
  fi
  if [ "$PART" = cross-kernels ]; then
    # Which cuDNN graph and engine configuration the cross-attention (the text's 512 keys)
    # should run: dit_bench on one block of the 14B at B = 2 (its cross-attention lines:
    # cuDNN head- and token-major with the plan, and the fused kernel) with the native
    # graph's first and second engine configuration and with the composite graph, on the
    # system's cuDNN and on PyTorch's; then PyTorch's SDPA on the same shapes (about 3 minutes).
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    date -u
    B=$(unpack dit_bench)
    WHEEL=$(python3 -c "import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], 'lib'))")
    mkdir -p /tmp/cudnn-wheel && ln -sf "$WHEEL/libcudnn.so.9" /tmp/cudnn-wheel/libcudnn.so
    SYSTEM_LIBRARY_PATH=${LD_LIBRARY_PATH-}
    for lib in system wheel; do
      [ $lib = wheel ] && export LD_LIBRARY_PATH=/tmp/cudnn-wheel:$WHEEL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      for choice in "native 1" "native 2" "composite 1"; do
        set -- $choice
        echo "=== $lib cuDNN, $1 graph, engine configuration $2 first"
        VPIPE_CUDNN_SDPA_GRAPH=$1 VPIPE_CUDNN_SDPA_CONFIG=$2 timeout 60 "$B" --preset wan2.1-t2v-14b \
          --layers 1 --attention cudnn --reps 2 --batches 2 | grep -E 'cross_attention"|"forward"' \
          | sed "s/^/$lib $1 $2 /"
        [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=6
      done
    done
    export LD_LIBRARY_PATH=$SYSTEM_LIBRARY_PATH
    torch_sdpa
    date -u
  fi
  if [ "$PART" = ncu-rows ]; then
    # Nsight Compute's detailed sections (throughput against the peaks, memory, occupancy,
    # what the warps wait on) for the float8 forward's row kernels, two launches of each, on
    # one block of the 14B at B = 2 (about 2 minutes).
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    date -u
    B=$(unpack dit_bench)
    NCU_BIN=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    timeout 240 $NCU_BIN --kernel-name 'regex:ln_modulate|quantize_fp8|dequant_rows|gated_residual|rms_rope|absmax_all|channel_stats_x8' \
      --launch-count 14 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section WarpStateStats "$B" --preset wan2.1-t2v-14b --layers 1 \
      --attention fp8 --matmul fp8 --reps 1 --batches 2 2>&1 \
      | grep -E '^  [a-z_0-9]+.*\(|Duration|Memory Throughput|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Block Limit|Warp Cycles Per Issued|Stall|OPT|Block Size|Grid Size' \
      | cut -c1-160
    [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=6
    date -u
  fi
  if [ "$PART" = cudnn-wheel ]; then
    # The same binaries on the system's libcudnn and on the one PyTorch ships (the
    # nvidia-cudnn wheel): which cuDNN the attention runs on, and what each costs.
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    date -u
    WHEEL=$(python3 -c "import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], 'lib'))")
    mkdir -p /tmp/cudnn-wheel && ln -sf "$WHEEL/libcudnn.so.9" /tmp/cudnn-wheel/libcudnn.so
    ls "$WHEEL"; python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
    for lib in system wheel; do
      [ $lib = wheel ] && export LD_LIBRARY_PATH=/tmp/cudnn-wheel:$WHEEL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      echo "=== fp8_gpu, $lib cuDNN"
      LD_DEBUG=libs timeout 90 "$(unpack fp8_gpu)" fp8_attention --nocapture --test-threads 1 2>&1 \
        | grep -E "^test |test result|panicked|calling init: .*libcudnn.so|fp8 attention|bf16 attention|self-attention"
      [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=8
    done
    B=$(unpack dit_bench)
    for run in "cudnn exact" "fp8 exact" "fp8 fp8"; do vpipe_14b $run "wheel cuDNN"; done
    timeout 150 python3 bench/dit_gpu.py dit --reps 2 | sed 's/^/diffusers /'
    date -u
  fi
  if [ "$PART" = fp8-pass ]; then
    # The float8 GPU tests (products and attention against exact, the FFN product's time with
    # the scales in cuBLASLt's epilogue and in vpipe's pass) and the DiT parity on the GPU;
    # then the 14B at B = 2 with both float8 paths next to diffusers' 14B, the 14B exact, the
    # 1.3B exact next to diffusers' 1.3B (about 4 minutes). CUBLAS_WHEEL=1 then runs the FFN
    # product and the 14B float8 forward on PyTorch's cuBLASLt. TORCH_PRODUCTS=1 first times
    # PyTorch's float8 products at the 14B's shapes; NCU=1 last adds Nsight Compute's kernel
    # times of two blocks of the float8 forward; SDPA=1 adds PyTorch's SDPA on one
    # self-attention layer (default, cuDNN, flash, efficient). Needs .carry/{fp8_gpu,dit_parity,dit_bench}.xz.
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    date -u
    [ "${TORCH_PRODUCTS:-0}" = 1 ] && timeout 60 python3 bench/fp8_products_torch.py | sed 's/^/torch /'
    # QUICK=1: the products' tests alone and no 14B exact run (a call of about 2.5 minutes);
    # FP8_TESTS=NAME: only the float8 tests whose names hold NAME (fp8_attention: the
    # attention's error against the exact one).
    timeout 100 "$(unpack fp8_gpu)" ${FP8_TESTS:-${QUICK:+product}} --nocapture --test-threads 1 2>&1 \
      | grep -E "^test |test result|panicked|GPU against|FFN product|fp8 attention|bf16 attention|self-attention|linear rows"
    [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=8
    # The fused DiT kernels against diffusers' fixtures, the one-pass block kernels at the
    # 14B's width against the steps they replace, float8 products against the host's
    # emulation (the binary finds its fixtures under the path it was built in).
    [ -e /work/main/crates ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }
    timeout 60 "$(unpack dit_parity)" cuda --nocapture --test-threads 1 2>&1 \
      | grep -E "max abs|largest error|test result|panicked|FAILED"
    [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=8
    B=$(unpack dit_bench)
    T14=80 vpipe_14b fp8 fp8
    timeout 80 python3 bench/dit_gpu.py dit --reps 2 --batches 2 | sed 's/^/diffusers /'
    [ -z "${QUICK:-}" ] && T14=60 vpipe_14b cudnn exact
    echo "=== vpipe wan2.1-t2v-1.3b, cudnn attention, exact products"
    timeout 40 "$B" --preset wan2.1-t2v-1.3b --attention cudnn --reps 2 --batches 2 | sed "s/^/vpipe 1.3b cudnn exact /"
    [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=6
    timeout 50 python3 bench/dit_gpu.py dit-1.3b --reps 2 --batches 2 | sed 's/^/diffusers /'
    # SDPA=1: PyTorch's attention on the self-attention layer the float8 tests time.
    [ "${SDPA:-0}" = 1 ] && torch_sdpa
    if [ "${CUBLAS_WHEEL:-0}" = 1 ]; then
      # The same FFN product and 14B float8 forward on the cuBLASLt PyTorch ships (its
      # nvidia wheel) instead of the system's.
      LT=$(python3 -c "import nvidia, glob, os; print(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], '**', 'libcublasLt.so.*'), recursive=True))[-1])")
      echo "wheel cuBLASLt: $LT"; mkdir -p /tmp/lt-wheel
      ln -sf "$LT" /tmp/lt-wheel/libcublasLt.so; ln -sf "$LT" /tmp/lt-wheel/$(basename "$LT")
      export LD_LIBRARY_PATH=/tmp/lt-wheel:$(dirname "$LT")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
      LD_DEBUG=libs timeout 60 /tmp/vpipe-bin/fp8_gpu times_a_14b_ffn_product --nocapture 2>&1 \
        | grep -E "FFN product|calling init: .*libcublasLt" | sort -u
      T14=80 vpipe_14b fp8 fp8 "wheel cuBLASLt"
    fi
    NCU_BIN=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    if [ "${NCU:-0}" = 1 ] && [ -n "$NCU_BIN" ]; then
      timeout 200 $NCU_BIN --clock-control none --metrics gpu__time_duration.sum --csv \
        --log-file /tmp/ncu-fp8.csv "$B" --preset wan2.1-t2v-14b --layers 2 --attention fp8 \
        --matmul fp8 --reps 1 --batches 2 > /dev/null 2>&1
      echo "=== two blocks of the 14B at B = 2, both float8 paths: kernel time by name"
      python3 bench/ncu_by_kernel.py /tmp/ncu-fp8.csv 40
    fi
    date -u
  fi
  if [ "$PART" = fp8-short ]; then
    # The float8 rows for a short call (about 6 minutes): the GPU tests, the 14B exact and in
    # float8 next to diffusers' 14B, then the 1.3B exact next to diffusers' 1.3B.
    T=$(unpack fp8_gpu)
    timeout 120 "$T" --nocapture --test-threads 1 2>&1 | grep -E "^test |test result|panicked|GPU against|FFN product|fp8 attention|self-attention|linear rows"
    B=$(unpack dit_bench)
    for run in "14b cudnn exact" "14b fp8 fp8"; do
      set -- $run
      echo "=== vpipe wan2.1-t2v-$1, $2 attention, $3 products"
      timeout 150 "$B" --preset wan2.1-t2v-$1 --attention $2 --matmul $3 --reps 2 --batches 2 | sed "s/^/vpipe $1 $2 $3 /"
    done
    timeout 150 python3 bench/dit_gpu.py dit --reps 2 | sed 's/^/diffusers /'
    echo "=== vpipe wan2.1-t2v-1.3b, cudnn attention, exact products"
    timeout 60 "$B" --preset wan2.1-t2v-1.3b --attention cudnn --reps 2 --batches 2 | sed "s/^/vpipe 1.3b cudnn exact /"
    timeout 90 python3 bench/dit_gpu.py dit-1.3b --reps 2 | sed 's/^/diffusers /'
  fi
  if [ "$PART" = exact-short ]; then
    # The exact forwards next to diffusers' for a short call (about 5 minutes): the 1.3B at
    # B = 2 first, then the 14B.
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    date -u
    B=$(unpack dit_bench)
    echo "=== vpipe wan2.1-t2v-1.3b, cudnn attention, exact products"
    timeout 60 "$B" --preset wan2.1-t2v-1.3b --attention cudnn --reps 2 --batches 2 | sed "s/^/vpipe 1.3b cudnn exact /"
    timeout 90 python3 bench/dit_gpu.py dit-1.3b --reps 2 | sed 's/^/diffusers /'
    echo "=== vpipe wan2.1-t2v-14b, cudnn attention, exact products"
    timeout 70 "$B" --preset wan2.1-t2v-14b --attention cudnn --reps 2 --batches 2 | sed "s/^/vpipe 14b cudnn exact /"
    timeout 100 python3 bench/dit_gpu.py dit --reps 2 | sed 's/^/diffusers /'
    date -u
  fi
  if [ "$PART" = slices ]; then
    D=$(unpack dit_bench)
    for n in 1 8; do
      timeout 200 "$D" --preset wan2.1-t2v-14b --attention cudnn --reps 3 --batches 1 --token-slices $n \
        | grep forward
      [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=8
    done
  fi
  if [ "$PART" = ncu-slices ]; then
    D=$(unpack dit_bench)
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    echo "ncu: ${NCU:-none}"; [ -n "$NCU" ] || exit 5
    for n in 1 8; do
      timeout 240 $NCU --clock-control none --metrics gpu__time_duration.sum --csv \
        --log-file /tmp/ncu-slices-$n.csv "$D" --preset wan2.1-t2v-14b --layers 2 \
        --attention cudnn --reps 1 --batches 1 --token-slices $n > /dev/null 2>&1
      echo "=== $n token slice(s): 2 blocks, kernel time by name"
      python3 bench/ncu_by_kernel.py /tmp/ncu-slices-$n.csv 30
    done
  fi
  if [ "$PART" = stream ]; then
    V=$(unpack vpipe); M=/tmp/stream-models; mkdir -p $M
    ONLY=dit,umt5 python3 bench/make_random_checkpoints.py $M > /dev/null || exit 4
    python3 -c "
import sys; sys.path.insert(0, 'bench')
from vae_gpu import make_vae
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in make_vae().state_dict().items()}, '$M/wan_2.1_vae.safetensors')" || exit 4
    for budget in 4GiB 12GiB none; do
      flags="--ram-budget 64GiB"; [ $budget != none ] && flags="$flags --vram-budget $budget"
      $V run --model-dir $M --tokenizer crates/vpipe-text/tests/fixtures/tokenizer.json \
        --device cuda:0 --size 832x480 --frames 81 --steps 2 --prompt "A cheesecake" $flags \
        --out /tmp/stream-$budget.safetensors --report $OUT/report-stream-$budget.json 2>&1 | tail -1
      [ "${PIPESTATUS[0]}" -ne 0 ] && CODE=7
      python3 - "$OUT/report-stream-$budget.json" "$budget" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); GiB = 2**30
notes = [n["detail"] for n in r["notes"] if n["what"] in ("sampling", "step")]
peak = max((p.get("device_footprint_peak") or 0) for p in r["phases"]) / GiB
print(json.dumps({"budget": sys.argv[2], "footprint_gib": round(peak, 2), "notes": notes,
                  "fallbacks": r.get("fallbacks", []), "violations": r["violations"]}))
PY
    done
  fi
  exit ${CODE:-0}
} 2>&1 | tee "$OUT/attention.log"
exit ${PIPESTATUS[0]}
