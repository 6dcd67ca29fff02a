#!/bin/bash
# Device-machine run: GPU test binaries carried in .carry/ (TESTS, space-separated names), each
# under a time limit; one that is still running after STACK_AFTER seconds gets every thread's
# stack printed by cuda-gdb (which also debugs host code) before it is killed, so that a hang
# names its place. Run with carry [".carry"]; logs in $OUT.
set -u
. bench/device-env.sh 2>/dev/null
[ -e /work/main/crates ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }
GDB=$(command -v cuda-gdb || ls /usr/local/cuda*/bin/cuda-gdb 2>/dev/null | head -1)
for t in ${TESTS:-}; do
  echo "=== $t"
  bin=$(unpack $t)
  RUST_BACKTRACE=1 "$bin" --test-threads 1 --nocapture > "$OUT/$t.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 "${STACK_AFTER:-40}"); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  if kill -0 $pid 2>/dev/null; then
    echo "$t still running after ${STACK_AFTER:-40} s: stacks"
    [ -n "$GDB" ] && timeout 60 "$GDB" -p $pid -batch -ex "thread apply all bt 25" > "$OUT/$t.stack" 2>&1
    grep -E "^#|^Thread" "$OUT/$t.stack" | grep -vE "libc.so|pthread|futex|clone|start_thread" | head -60
    kill -9 $pid
  fi
  wait $pid; echo "$t exit $?"
  grep -E "max abs|test result|panicked|FAILED|^test " "$OUT/$t.log" | tail -20
done
