#!/usr/bin/env python3
"""The seed's targets checked on a `vpipe run --report` (bench/gpu-pipeline.sh): the run
exited 0 and wrote its output, after each offload < 1 GB above baseline, single-frame VAE encode
< 2 GB, whole VAE encode < 5 GB (goal < 2 GB), each phase starting clean, no OOM fallback, no
budget violation, a playable MP4 (PyAV when installed), and with --max-rss-gib the run's peak
host RSS (from `/usr/bin/time -v`'s log) within it.

    python3 bench/check_pipeline_report.py --run-exit CODE [--time-log LOG --max-rss-gib N] \
        report.json out.mp4 [FRAMES [FRAME_REPORT.json]]

CODE is the `vpipe run` exit status (a failed run fails the check, whatever its report says);
FRAMES the expected frame count of the MP4 (81); FRAME_REPORT a `vpipe tensors vae-encode
--report` of a single frame, checked against the 2 GB target.
"""
import argparse
import json
import os
import sys

GB = 1e9


def main(report_path, mp4_path, frames="81", frame_report=None, run_exit=None, time_log=None,
         max_rss_gib=None):
    rows, ok = [], True

    def check(what, value, limit, passed):
        nonlocal ok
        ok &= passed
        rows.append((what, value, limit, "ok" if passed else "FAIL"))

    check("vpipe run exit status", run_exit, "0", run_exit == 0)
    check("output written", mp4_path, "exists, not empty",
          os.path.isfile(mp4_path) and os.path.getsize(mp4_path) > 0)
    if not os.path.isfile(report_path):
        check("report written", report_path, "exists", False)
        for row in rows:
            print("%-55s %-18s %-18s %s" % row)
        print("SOME CHECKS FAILED")
        return 1
    r = json.load(open(report_path))
    if max_rss_gib is not None:
        rss = None
        if time_log and os.path.isfile(time_log):
            for line in open(time_log):
                if "Maximum resident set size (kbytes)" in line:
                    rss = int(line.rsplit(":", 1)[1]) * 1024 / 2**30
        check("host peak RSS (time -v)", f"{rss:.2f} GiB" if rss is not None else "not measured",
              f"<= {max_rss_gib} GiB", rss is not None and rss <= max_rss_gib)

    for t in r["transitions"]:
        if t["to"] in ("disk", "host") and t["from"] == r["compute"]:
            check(f"after offload of {t['model']} ({t['phase']})", "verified" if t["verified"] else "not verified", "verified", t["verified"])
    for p in r["phases"]:
        check(f"phase {p['name']}: exit above baseline", f"{p['exit_above_baseline'] / GB:.3f} GB", "< 1 GB", p["exit_above_baseline"] < GB)
        check(f"phase {p['name']}: resident at exit", p["resident_compute_bytes"], "0", p["resident_compute_bytes"] == 0)
    enc = [p for p in r["phases"] if p["name"] == "vae encode"]
    if enc:
        peak = enc[0]["peak_above_baseline"]
        check("whole VAE encode peak", f"{peak / GB:.3f} GB", "< 5 GB (goal < 2)", peak < 5 * GB)
    if frame_report:
        f = json.load(open(frame_report))
        peak = max(p["peak_above_baseline"] for p in f["phases"] if p["name"] == "vae encode")
        check("single-frame VAE encode peak", f"{peak / GB:.3f} GB", "< 2 GB", peak < 2 * GB)
    check("fallbacks (OOM)", len(r["fallbacks"]), "0", len(r["fallbacks"]) == 0)
    check("violations", len(r["violations"]), "0", len(r["violations"]) == 0)
    try:
        import av

        with av.open(mp4_path) as f:
            decoded = sum(1 for _ in f.decode(video=0))
        check("MP4 decodes (PyAV)", f"{decoded} frames", frames, decoded == int(frames))
    except ImportError:
        rows.append(("MP4 decodes", "PyAV not installed", "-", "skipped"))
    for row in rows:
        print("%-55s %-18s %-18s %s" % row)
    for p in r["phases"]:
        print("phase %-11s peak %8.3f GB  exit %8.3f GB" % (p["name"], p["peak_above_baseline"] / GB, p["exit_above_baseline"] / GB))
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-exit", type=int, required=True)
    parser.add_argument("--time-log")
    parser.add_argument("--max-rss-gib", type=float)
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    sys.exit(main(*args.paths[:4], run_exit=args.run_exit, time_log=args.time_log,
                  max_rss_gib=args.max_rss_gib))
