"""Sums span busy times from a vpipe log made with VPIPE_LOG_SPANS=1: python3 bench/span_profile.py LOG.
On CUDA with CUDA_LAUNCH_BLOCKING=1 busy time is device time plus launch; without it, host time."""
import re
import sys
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
totals, counts = defaultdict(float), defaultdict(int)
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"(\w+)(?:\{([^}]*)\})?: \S+ close time\.busy=([\d.]+)(ns|µs|us|ms|s)", line)
    if not m:
        continue
    name, fields, value, unit = m.groups()
    key = name
    if name == "conv3d":
        f = dict(kv.split("=") for kv in fields.split())
        key = f"conv3d k{f.get('k_t')}x{f.get('k_h')}x{f.get('k_w')} {f.get('c_in')}->{f.get('c_out')}"
    if name == "vae_tile":
        key = f"vae_tile {fields}"
    totals[key] += float(value) * UNITS[unit]
    counts[key] += 1
for key, total in sorted(totals.items(), key=lambda kv: -kv[1])[:25]:
    print(f"{total:9.3f} s  {counts[key]:6d}x  {key}")
