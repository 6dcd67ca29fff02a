#!/bin/bash
# Makes a CUDA 13.0 toolkit for building vpipe with `--features cuda` on a machine without a GPU,
# from PyPI wheels only. CUDA 13.0 matches the GPU machine's driver (580) and nvcc (13.0): PTX from
# a newer nvcc would not load there.
#
# Usage: tools/setup-cuda-toolkit.sh [DEST]        (default: ~/.cache/vpipe-cuda)
# Needs: python3 + pip, unzip, gcc, and a `cargo fetch` of the project first (the stub libcuda is
# generated from the driver symbols that the fetched cudarc binds).
# Afterwards, in the shell that builds:
#   export CUDA_HOME=DEST PATH=DEST/bin:$PATH CUDA_COMPUTE_CAP=90 LIBRARY_PATH=DEST/lib
#   cargo build --release --features cuda
# CUDA_COMPUTE_CAP=90 builds for Hopper (H100/H200) only.
set -euo pipefail
DEST=${1:-$HOME/.cache/vpipe-cuda}
WHL=$DEST.wheels
mkdir -p "$WHL" "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$WHL" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3 nvidia-cudnn-cu13
TMP=$(mktemp -d)
for w in "$WHL"/nvidia_*.whl; do unzip -q -o "$w" 'nvidia/*' -d "$TMP"; done
cp -a "$TMP"/nvidia/cu13/. "$DEST"/
# cuDNN ships in its own folder: headers and libraries go next to the others
if [ -d "$TMP/nvidia/cudnn" ]; then
  cp -a "$TMP"/nvidia/cudnn/include/. "$DEST"/include/ 2>/dev/null || true
  cp -a "$TMP"/nvidia/cudnn/lib/. "$DEST"/lib/ 2>/dev/null || true
fi
rm -rf "$TMP"
# the wheels ship versioned libraries only; the linker wants the plain names
cd "$DEST/lib"
for l in cudart cublas cublasLt nvrtc; do ln -sf lib$l.so.13 lib$l.so; done
ln -sf libcurand.so.10 libcurand.so
[ -e libcudnn.so.9 ] && ln -sf libcudnn.so.9 libcudnn.so
# no wheel has libcuda (it comes with the driver): a stub with the same symbols satisfies the
# linker; at run time the real driver's libcuda.so.1 is loaded instead
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$CUDARC" ] || { echo "run 'cargo fetch' in the project first (cudarc not found)" >&2; exit 1; }
mkdir -p stubs
grep -ohE '^\s*pub unsafe fn cu[A-Za-z0-9_]+\(' "$CUDARC"/src/driver/sys/*.rs \
  | sed -E 's/.*pub unsafe fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u > stubs/libcuda.syms
awk '{print "int "$1"(void){return 999;}"}' stubs/libcuda.syms > stubs/libcuda_stub.c
gcc -shared -fPIC -o stubs/libcuda.so -Wl,-soname,libcuda.so.1 stubs/libcuda_stub.c
"$DEST/bin/nvcc" --version | tail -n 2
echo "ready: export CUDA_HOME=$DEST PATH=$DEST/bin:\$PATH CUDA_COMPUTE_CAP=90 LIBRARY_PATH=$DEST/lib"
