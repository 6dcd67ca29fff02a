# Sourced by the bench/gpu-*.sh scripts on the device machine: $OUT, the carried Python wheels
# on PYTHONPATH (diffusers, which the image lacks), and `unpack NAME`, which puts the carried
# binary .carry/NAME.xz at /tmp/vpipe-bin/NAME and prints its path. It unpacks on every call: a
# machine kept warm between calls still holds the previous call's binaries.
OUT=${OUT:-/tmp/vpipe-bench-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site

unpack() {
  local bin=/tmp/vpipe-bin/$1
  if [ -f ".carry/$1.xz" ]; then
    mkdir -p /tmp/vpipe-bin && xz -dc ".carry/$1.xz" > "$bin" && chmod +x "$bin"
  fi
  echo "$bin"
}
