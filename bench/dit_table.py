#!/usr/bin/env python3
"""The forwards of a `gpu-attention.sh fp8` log as one table, each vpipe forward next to
diffusers' forward of the same model size and batch from the same log.

    python3 bench/dit_table.py attention.log

Lines read: `vpipe <size> <attention> <products> {json}` (dit_bench) and `diffusers {json}`
(bench/dit_gpu.py, the 14B first, then the 1.3B). Exits 1 when a log holds no vpipe forward or
a forward reports cuDNN's refusal, so a check built on it fails with the run it reads.
"""
import json
import sys


def main(path):
    vpipe, diffusers, size_order, failed = [], {}, [], False
    for line in open(path, errors="replace"):
        head, _, rest = line.partition("{")
        if not rest:
            continue
        try:
            record = json.loads("{" + rest)
        except json.JSONDecodeError:
            continue
        words = head.split()
        if record.get("what") == "build" and words[:1] == ["diffusers"]:
            size_order.append("14b" if record["weights_gib"] > 10 else "1.3b")
        if record.get("what") == "fast_path_error" and vpipe:
            # dit_bench prints a float8 forward's error against exact right after its forward
            vpipe[-1][3]["error"] = record
            continue
        if record.get("what") != "forward":
            continue
        if words[:1] == ["vpipe"] and len(words) >= 4:
            vpipe.append((words[1], words[2], words[3], record))
        elif words[:1] == ["diffusers"] and size_order:
            diffusers[(size_order[-1], record["batch"])] = record["forward_s"]
    if not vpipe:
        print(f"{path}: no vpipe forward")
        return 1
    print("| model | attention | products | B | vpipe s | diffusers s | ratio | rel L2 vs exact | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, attention, products, r in vpipe:
        reference = diffusers.get((size, r["batch"]))
        ratio = f"{r['forward_s'] / reference:.3f}×" if reference else "–"
        error = r.get("error", {}).get("relative_l2")
        fault = r.get("cudnn_refusal")
        if fault:
            failed = True
        print(f"| {size} | {attention} | {products} | {r['batch']} | {r['forward_s']:.3f} | "
              f"{reference if reference is None else round(reference, 3)} | {ratio} | "
              f"{'–' if error is None else f'{error:.4g}'} | {r['peak_above_weights_gib']:.2f} |"
              + (f" fault: {fault}" if fault else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
