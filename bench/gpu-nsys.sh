#!/bin/bash
# Nsight Systems timeline of vpipe's full 256-px tiled decode (or OP=encode) of the real clip,
# bf16: where the wall time goes between kernels (GPU busy share, host API time, syncs).
# Needs .carry/vpipe.xz, .carry/clip.mp4, .whl/; carry [".carry", ".whl"].
set -u
. bench/device-env.sh
VPIPE=$(unpack vpipe)
W=/tmp/vaebench
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
echo "nsys: ${NSYS:-none}"; [ -n "$NSYS" ] || exit 5
[ -f $W/diffusers_enc.safetensors ] || python3 bench/vae_gpu.py prepare .carry/clip.mp4 > $OUT/prepare.log 2>&1 || exit 4
OP=${OP:-decode}
IN=$W/clip.safetensors; [ $OP = decode ] && IN=$W/diffusers_enc.safetensors
ARGS="tensors vae-$OP --vae $W/vae.safetensors --device cuda:0 --dtype bf16 --tile 256 --stride 192 --input $IN --output $W/o.safetensors"
$VPIPE $ARGS > /dev/null  # the PTX cache, as in the timed runs
timeout 300 $NSYS profile -t cuda,osrt -o $W/vp -f true $VPIPE $ARGS --report $W/nsys_report.json | tail -2
python3 -c "
import json; r=json.load(open('$W/nsys_report.json'))
p=[p for p in r['phases'] if p['name']=='vae $OP'][0]
print('phase vae $OP wall under nsys: %.3f s' % ((p['exit']['t_ms']-p['entry']['t_ms'])/1e3))"
$NSYS stats -q --report cuda_gpu_kern_sum,cuda_api_sum,cuda_gpu_mem_time_sum --format csv -o $W/vp $W/vp.nsys-rep > /dev/null 2>&1
python3 - $W <<'PY' | tee "$OUT/nsys-$OP.txt"
import csv, glob, sys
w = sys.argv[1]
def rows(pat):
    f = glob.glob(f"{w}/vp_{pat}*.csv")
    return list(csv.DictReader(open(f[0]))) if f else []
k = rows("cuda_gpu_kern_sum")
tot = sum(float(r["Total Time (ns)"]) for r in k) / 1e9
print(f"kernel time {tot:.3f} s in {sum(int(r['Instances']) for r in k)} kernels")
for r in sorted(k, key=lambda r: -float(r["Total Time (ns)"]))[:12]:
    print(f"  {float(r['Total Time (ns)'])/1e9:7.3f} s {int(r['Instances']):7d}x  {r['Name'][:90]}")
print("host API time:")
for r in sorted(rows("cuda_api_sum"), key=lambda r: -float(r["Total Time (ns)"]))[:14]:
    print(f"  {float(r['Total Time (ns)'])/1e9:7.3f} s {int(r['Num Calls']):7d}x  {r['Name']}")
print("memory copies/sets on the GPU:")
for r in rows("cuda_gpu_mem_time_sum"):
    print(f"  {float(r['Total Time (ns)'])/1e9:7.3f} s {int(r['Count']):7d}x  {r['Operation']}")
PY
