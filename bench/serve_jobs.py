#!/usr/bin/env python3
"""Sequential jobs through a running `vpipe serve` (bench/gpu-serve.sh starts it): submits N
jobs one after another (each waits for the previous to finish), then reads the server's memory
record and prints, per job, its time and every meter at its start and end. Exits non-zero when
a job did not succeed or a reading is missing, so that the calling script fails with it.

    python3 bench/serve_jobs.py URL N SETTINGS_JSON SUMMARY_OUT
"""
import json
import sys
import time
import urllib.request

url, count, settings, summary_path = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
GiB = 2**30


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def gib(v):
    return None if v is None else round(v / GiB, 3)


jobs = []
for i in range(count):
    job = call("POST", "/api/jobs", dict(settings, prompt=f"{settings['prompt']} ({i})", seed=i))
    t0 = time.time()
    while job["state"] in ("queued", "running"):
        time.sleep(0.5)
        job = call("GET", f"/api/jobs/{job['id']}")
    wall = time.time() - t0
    print(f"job {job['id']}: {job['state']} in {wall:.1f} s", job.get("error") or "", flush=True)
    row = {"id": job["id"], "state": job["state"], "wall_s": round(wall, 2), "error": job["error"]}
    if job["report"]:
        report = call("GET", f"/api/jobs/{job['id']}/report")
        peaks = [p.get("device_footprint_peak") for p in report["phases"]]
        row["device_footprint_peak_gib"] = gib(max((p or 0) for p in peaks)) if any(peaks) else None
        row["host_anon_shmem_peak_gib"] = gib(max(s["rss_anon"] + s["rss_shmem"] for s in report["samples"])) if report["samples"] else None
        row["verified"] = all(t["verified"] for t in report["transitions"])
        row["violations"] = report["violations"]
        ok_job = row["verified"] and not row["violations"]
        if not ok_job:
            row["state"] = "failed (verification or budget)"
    jobs.append(row)

memory = call("GET", "/api/memory")


rows = []
for b in [memory["first"]] + memory["boundaries"]:
    rows.append({
        "at": b["at"], "job": b["job"],
        "device_footprint_gib": gib(b["device_footprint"]),
        "pool_reserved_gib": gib(b["pool_reserved"]),
        "host_anon_gib": gib(b["host_anon"]), "host_shmem_gib": gib(b["host_shmem"]),
        "host_file_gib": gib(b["host_file"]), "heap_gib": gib(b["heap"]),
    })
for r in rows:
    print(json.dumps(r))
ends = [b for b in memory["boundaries"] if b["at"] == "job end"]
ok = all(j["state"] == "succeeded" for j in jobs) and len(ends) == count
if ok and count >= 3:
    growth = {k: ends[-1][k] - ends[1][k] for k in ("heap", "host_anon", "host_shmem")}
    if ends[0]["device_footprint"] is not None:
        growth["device_footprint"] = ends[-1]["device_footprint"] - ends[1]["device_footprint"]
    print("growth from job 2's end to the last's (bytes):", growth)
else:
    growth = None
json.dump({"jobs": jobs, "boundaries": rows, "growth_bytes": growth,
           "vram_budget": memory["vram_budget"], "ram_budget": memory["ram_budget"]},
          open(summary_path, "w"), indent=1)
print("ALL OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
