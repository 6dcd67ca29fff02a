"""PyTorch's products at the 14B DiT's linear shapes (B = 2, 65 520 rows): bf16 `matmul`
against float8 `torch._scaled_mm` with per-row activation and per-output-feature weight scales
and fast accumulation (the scaling vpipe's --fp8-compute uses), to see what this card's float8
products reach outside vpipe, in the same call. One JSON line per shape."""
import json

import torch

ROWS = 65_520
SHAPES = {"attention projection": (5_120, 5_120), "FFN up": (5_120, 13_824),
          "FFN down": (13_824, 5_120)}


def median_seconds(fn, reps=7):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return times[len(times) // 2]


torch.manual_seed(0)
for name, (inputs, outputs) in SHAPES.items():
    x = torch.randn(ROWS, inputs, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(outputs, inputs, device="cuda", dtype=torch.bfloat16) * 0.02
    flops = 2 * ROWS * inputs * outputs
    row = {"shape": name, "rows": ROWS, "in": inputs, "out": outputs}
    with torch.no_grad():
        row["bf16_s"] = median_seconds(lambda: x @ w.t())
        xs = x.abs().amax(dim=1, keepdim=True).float() / 448.0
        ws = w.abs().amax(dim=1, keepdim=True).float() / 448.0
        x8 = (x / xs).to(torch.float8_e4m3fn)
        w8 = (w / ws).to(torch.float8_e4m3fn)
        for label, fast in (("fp8_rowwise_fast_s", True), ("fp8_rowwise_s", False)):
            try:
                row[label] = median_seconds(lambda: torch._scaled_mm(
                    x8, w8.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16,
                    use_fast_accum=fast))
            except Exception as e:  # a build without row-wise scaling says so
                row[label] = f"error: {str(e)[:120]}"
        one = torch.ones((), device="cuda")
        try:
            row["fp8_tensorwise_fast_s"] = median_seconds(lambda: torch._scaled_mm(
                x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                use_fast_accum=True))
        except Exception as e:
            row["fp8_tensorwise_fast_s"] = f"error: {str(e)[:120]}"
    for k in list(row):
        if k.endswith("_s") and isinstance(row[k], float):
            row[k.replace("_s", "_tflops")] = round(flops / row[k] / 1e12, 1)
            row[k] = round(row[k], 5)
    print(json.dumps(row), flush=True)
