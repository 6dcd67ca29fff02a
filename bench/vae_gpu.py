"""VAE benchmark on the GPU machine: diffusers' tiled encode/decode next to vpipe's, same card,
same call. Full-size Wan 2.1 VAE (base dim 96, z 16) with seeded random weights, bf16, the real
clip (832x480, 81 frames), tiles 256 / stride 192 px.

    python3 bench/vae_gpu.py prepare CLIP.mp4   # clip + weights + diffusers timings -> /tmp/vaebench
    python3 bench/vae_gpu.py compare            # reads vpipe's outputs and reports, prints a table
    python3 bench/vae_gpu.py warm 256,320 2     # diffusers warm, per tile size (as vae_bench)

Run by bench/gpu-vae.sh; numbers land in $OUT/vae_summary.json.
"""
import json
import os
import sys
import time

import numpy as np
import torch

WORK = "/tmp/vaebench"
OUT = os.environ.get("OUT", "/tmp/out")
TILE, STRIDE = 256, 192
GiB = 1024**3


def log(*a):
    print(time.strftime("[%H:%M:%S]"), *a, flush=True)


def read_clip(path):
    import cv2

    cap = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    video = torch.from_numpy(np.stack(frames)).float().div(127.5).sub(1.0)  # T,H,W,C
    return video.permute(3, 0, 1, 2).unsqueeze(0).contiguous()  # 1,3,T,H,W


def randomized(vae):
    """`vae` with seeded random weights (scaled by fan-in, norm gains near 1), in bf16."""
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / fan_in**0.5)
            elif name.endswith("gamma"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.02)
    return vae.to(torch.bfloat16).eval()


def make_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(1234)
    vae = AutoencoderKLWan()  # Wan 2.1 defaults: base_dim 96, z_dim 16
    return randomized(vae)


def make_vae22():
    """The Wan 2.2 VAE (TI2V-5B's: 48 latent channels, residual stages, 2x2 patches) with random
    weights, as `make_vae` makes the Wan 2.1 one."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(1234)
    vae = AutoencoderKLWan(
        base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
        attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=True,
        in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4,
        scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
    )
    return randomized(vae)


def timed(fn, reps=2):
    torch.cuda.synchronize()
    times, out = [], None
    for _ in range(reps):
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated()


def prepare(clip_path):
    from safetensors.torch import save_file

    os.makedirs(WORK, exist_ok=True)
    video = read_clip(clip_path)
    log("clip", tuple(video.shape), float(video.min()), float(video.max()))
    save_file({"video_in": video}, f"{WORK}/clip.safetensors")
    save_file({"video_in": video[:, :, :1].contiguous()}, f"{WORK}/frame.safetensors")
    vae = make_vae()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, f"{WORK}/vae.safetensors")
    log("weights", sum(p.numel() for p in vae.parameters()), "params")

    vae = vae.cuda()
    vae.enable_tiling(
        tile_sample_min_height=TILE, tile_sample_min_width=TILE,
        tile_sample_stride_height=STRIDE, tile_sample_stride_width=STRIDE,
    )
    x = video.cuda().to(torch.bfloat16)
    weights = torch.cuda.memory_allocated()
    res = {"weights_bytes": weights}
    with torch.no_grad():
        _, t, peak = timed(lambda: vae.encode(x[:, :, :1]).latent_dist.mean, reps=3)
        res["frame_encode_s"], res["frame_encode_peak"] = t, peak - x.numel() * 2
        mean, t, peak = timed(lambda: vae.encode(x).latent_dist.mean)
        res["encode_s"], res["encode_peak"] = t, peak - x.numel() * 2
        res["encode_peak_total"] = peak
        log("diffusers tiled encode", f"{t:.2f} s", f"peak {peak / GiB:.2f} GiB (incl. input)")
        del x
        torch.cuda.empty_cache()
        z = mean.clone()
        decoded, t, peak = timed(lambda: vae.decode(z).sample)
        res["decode_s"], res["decode_peak"] = t, peak - decoded.numel() * 2
        res["decode_peak_total"] = peak
        log("diffusers tiled decode", f"{t:.2f} s", f"peak {peak / GiB:.2f} GiB (incl. output)")
    # f32 parity on the GPU: a 9-frame 128x128 crop, untiled, no TF32 anywhere.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    vae32 = vae.float()
    vae32.disable_tiling()
    crop = video[:, :, :9, :128, :128].contiguous()
    with torch.no_grad():
        m32 = vae32.encode(crop.cuda()).latent_dist.mean
        d32 = vae32.decode(m32).sample
    save_file({"video_in": crop}, f"{WORK}/crop.safetensors")
    save_file({"enc_mean": m32.cpu().contiguous()}, f"{WORK}/diffusers_crop_enc.safetensors")
    save_file({"decoded": d32.cpu().contiguous()}, f"{WORK}/diffusers_crop_dec.safetensors")
    del vae32
    save_file({"enc_mean": mean.float().cpu().contiguous()}, f"{WORK}/diffusers_enc.safetensors")
    # one-tile inputs for the span profile
    save_file({"video_in": video[:, :, :, :256, :256].contiguous()}, f"{WORK}/tile.safetensors")
    save_file({"enc_mean": mean[:, :, :, :32, :32].float().cpu().contiguous()}, f"{WORK}/tile_lat.safetensors")
    save_file({"decoded": decoded.cpu().contiguous()}, f"{WORK}/diffusers_dec.safetensors")
    json.dump(res, open(f"{WORK}/diffusers.json", "w"), indent=1)


def tile_inputs(clip_path):
    """Weights and one-tile inputs only (for profiling): vae.safetensors, tile.safetensors,
    tile_lat.safetensors (the tile's latents from diffusers' untiled encode of the crop)."""
    from safetensors.torch import save_file

    os.makedirs(WORK, exist_ok=True)
    video = read_clip(clip_path)[:, :, :, :256, :256].contiguous()
    vae = make_vae()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, f"{WORK}/vae.safetensors")
    save_file({"video_in": video}, f"{WORK}/tile.safetensors")
    save_file({"video_in": video[:, :, :5].contiguous()}, f"{WORK}/tile5.safetensors")
    vae = vae.cuda()
    with torch.no_grad():
        mean = vae.encode(video.cuda().to(torch.bfloat16)).latent_dist.mean
    save_file({"enc_mean": mean.float().cpu().contiguous()}, f"{WORK}/tile_lat.safetensors")
    save_file({"enc_mean": mean[:, :, :2].float().cpu().contiguous()}, f"{WORK}/tile_lat2.safetensors")


def diffusers_tile(op, name="tile"):
    """One untiled 256-px tile through diffusers, for a profiler to watch (`name`: the input
    file in WORK: tile, tile5 for encode; tile_lat, tile_lat2 for decode)."""
    from safetensors.torch import load_file

    vae = make_vae().cuda()
    with torch.no_grad():
        if op == "encode":
            x = load_file(f"{WORK}/{name}.safetensors")["video_in"].cuda().to(torch.bfloat16)
            vae.encode(x)
        else:
            z = load_file(f"{WORK}/{name}.safetensors")["enc_mean"].cuda().to(torch.bfloat16)
            vae.decode(z)
    torch.cuda.synchronize()


def warm(tiles="256", reps="2"):
    """diffusers' tiled encode and decode measured as `vae_bench` measures vpipe: for each tile
    size, one untimed pass, then the median of `reps` (JSON lines). Peaks are
    `max_memory_allocated` above the weights, less the input (encode) or output (decode) it
    holds on the device; vpipe keeps both on the host."""
    from safetensors.torch import load_file

    vae = make_vae()
    vae.load_state_dict(load_file(f"{WORK}/vae.safetensors"))
    vae = vae.cuda()
    weights = torch.cuda.memory_allocated()
    x = load_file(f"{WORK}/clip.safetensors")["video_in"].cuda().to(torch.bfloat16)
    z = load_file(f"{WORK}/diffusers_enc.safetensors")["enc_mean"].cuda().to(torch.bfloat16)
    base = torch.cuda.memory_allocated()
    for tile in [int(t) for t in tiles.split(",")]:
        stride = tile // 4 * 3 // 8 * 8
        vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                          tile_sample_stride_height=stride, tile_sample_stride_width=stride)
        for op, fn, held in (("encode", lambda: vae.encode(x).latent_dist.mean, 0),
                             ("decode", lambda: vae.decode(z).sample, x.numel() * 2)):
            with torch.no_grad():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                out = fn()
                torch.cuda.synchronize()
                cold = time.perf_counter() - t0
                del out
                times = []
                for _ in range(int(reps)):
                    t0 = time.perf_counter()
                    out = fn()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    del out
            peak = torch.cuda.max_memory_allocated() - base - held
            print(json.dumps({"what": op, "tile": tile, "stride": stride, "cold_s": cold,
                              "warm_s": sorted(times)[len(times) // 2],
                              "peak_above_weights_gib": peak / GiB,
                              "peak_with_weights_gib": (peak + weights) / GiB}), flush=True)
            torch.cuda.empty_cache()


def phase_stats(report_path, name):
    r = json.load(open(report_path))
    phase = next(p for p in r["phases"] if p["name"] == name)
    moves = sum(t["work_ms"] for t in r["transitions"] if t["phase"] == name)
    wall = phase["exit"]["t_ms"] - phase["entry"]["t_ms"]
    return {
        "compute_s": (wall - moves) / 1e3,
        "phase_s": wall / 1e3,
        "peak_above_baseline": phase["peak_above_baseline"],
        "resident_weights": max(
            (t["expected_bytes"] for t in r["transitions"] if t["phase"] == name), default=0
        ),
        "verified": all(t["verified"] for t in r["transitions"]),
        "fallbacks": r["fallbacks"],
        "notes": r["notes"],
        "baseline_driver_used": r["baseline"]["cuda"]["driver_total"] - r["baseline"]["cuda"]["driver_free"],
    }


def compare():
    from safetensors.torch import load_file

    d = json.load(open(f"{WORK}/diffusers.json"))
    enc = phase_stats(f"{WORK}/vpipe_enc.json", "vae encode")
    dec = phase_stats(f"{WORK}/vpipe_dec.json", "vae decode")
    frame = phase_stats(f"{WORK}/vpipe_frame.json", "vae encode")

    def err(a, b):
        a, b = a.float(), b.float()
        return {"max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm())}

    e = err(load_file(f"{WORK}/vpipe_enc.safetensors")["enc_mean"],
            load_file(f"{WORK}/diffusers_enc.safetensors")["enc_mean"])
    x = err(load_file(f"{WORK}/vpipe_dec.safetensors")["decoded"],
            load_file(f"{WORK}/diffusers_dec.safetensors")["decoded"])
    f32_enc = err(load_file(f"{WORK}/vpipe_crop_enc.safetensors")["enc_mean"],
                  load_file(f"{WORK}/diffusers_crop_enc.safetensors")["enc_mean"])
    f32_dec = err(load_file(f"{WORK}/vpipe_crop_dec.safetensors")["decoded"],
                  load_file(f"{WORK}/diffusers_crop_dec.safetensors")["decoded"])
    summary = {"diffusers": d, "f32_crop_encode_vs_diffusers": f32_enc, "f32_crop_decode_vs_diffusers": f32_dec, "vpipe_encode": enc, "vpipe_decode": dec, "vpipe_frame_encode": frame,
               "encode_vs_diffusers": e, "decode_vs_diffusers": x,
               "ratio_time_enc_plus_dec": (enc["compute_s"] + dec["compute_s"]) / (d["encode_s"] + d["decode_s"])}
    json.dump(summary, open(f"{OUT}/vae_summary.json", "w"), indent=1)
    g = lambda b: f"{b / GiB:.2f} GiB"
    print(f"{'':28}{'vpipe':>22}{'diffusers':>22}")
    print(f"{'encode time':28}{enc['compute_s']:>20.2f} s{d['encode_s']:>20.2f} s")
    print(f"{'encode peak (weights+act.)':28}{g(enc['peak_above_baseline']):>22}{g(d['encode_peak']):>22}")
    print(f"{'decode time':28}{dec['compute_s']:>20.2f} s{d['decode_s']:>20.2f} s")
    print(f"{'decode peak (weights+act.)':28}{g(dec['peak_above_baseline']):>22}{g(d['decode_peak']):>22}")
    print(f"{'1-frame encode peak':28}{g(frame['peak_above_baseline']):>22}{g(d['frame_encode_peak']):>22}")
    print("f32, 9x128x128 crop, untiled, vs diffusers f32 (no TF32): encode", f32_enc, "decode", f32_dec)
    print("encode vs diffusers (both bf16):", e)
    print("decode vs diffusers (both bf16, vpipe decodes diffusers' latents):", x)
    print("(enc+dec) vpipe / diffusers time:", round(summary["ratio_time_enc_plus_dec"], 3))
    print("vpipe notes:", enc["notes"], dec["notes"], "fallbacks:", enc["fallbacks"], dec["fallbacks"])


def budget_compare():
    """vpipe's encode and decode with --vram-budget at diffusers' whole peak (its input or
    output included) against diffusers' tiled time: the issue's "at no more memory"."""
    d = json.load(open(f"{WORK}/diffusers.json"))
    enc = phase_stats(f"{WORK}/vpipe_budget_enc.json", "vae encode")
    dec = phase_stats(f"{WORK}/vpipe_budget_dec.json", "vae decode")
    g = lambda b: f"{b / GiB:.3f} GiB"
    for name, v, budget, t_d in [("encode", enc, d["encode_peak_total"], d["encode_s"]),
                                 ("decode", dec, d["decode_peak_total"], d["decode_s"])]:
        tiles = [n["detail"] for n in v["notes"] if n["what"] in ("vae tile choice", "vae tiles")]
        print(f"{name}: budget {g(budget)} (diffusers' peak incl. its I/O); vpipe peak "
              f"{g(v['peak_above_baseline'])}, {v['compute_s']:.2f} s (calibration included) "
              f"vs diffusers {t_d:.2f} s; fallbacks {v['fallbacks']}; {tiles}")
    ratio = (enc["compute_s"] + dec["compute_s"]) / (d["encode_s"] + d["decode_s"])
    ok = enc["peak_above_baseline"] <= d["encode_peak_total"] and dec["peak_above_baseline"] <= d["decode_peak_total"]
    print(f"(enc+dec) vpipe at diffusers' memory / diffusers tiled 256 px time: {ratio:.3f}; "
          f"vpipe peaks within diffusers': {ok}")
    json.dump({"encode": enc, "decode": dec, "diffusers": d, "ratio": ratio, "peaks_within": ok},
              open(f"{OUT}/vae_budget_summary.json", "w"), indent=1)


if __name__ == "__main__":
    {
        "prepare": lambda: prepare(sys.argv[2]),
        "compare": compare,
        "budget-compare": budget_compare,
        "tile-inputs": lambda: tile_inputs(sys.argv[2]),
        "diffusers-tile": lambda: diffusers_tile(*sys.argv[2:4]),
        "warm": lambda: warm(*sys.argv[2:4]),
    }[sys.argv[1]]()
