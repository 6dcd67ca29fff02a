"""Kernel time by kernel name from an Nsight Compute CSV log (`ncu --metrics
gpu__time_duration.sum --csv --log-file F`): python3 bench/ncu_by_kernel.py F [TOP]."""
import csv
import sys
from collections import defaultdict

rows = list(csv.DictReader(l for l in open(sys.argv[1], errors="replace") if l.startswith('"')))
top = int(sys.argv[2]) if len(sys.argv) > 2 else 28
tot, cnt = defaultdict(float), defaultdict(int)
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    v = float(r["Metric Value"].replace(",", ""))
    v *= {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(r.get("Metric Unit", "nsecond"), 1e-6)
    name = r["Kernel Name"][:100]
    tot[name] += v
    cnt[name] += 1
print(f"total {sum(tot.values()):.2f} ms in {sum(cnt.values())} kernels")
for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{v:9.2f} ms {cnt[k]:5d}x  {k}")
