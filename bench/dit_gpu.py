#!/usr/bin/env python3
"""diffusers/transformers side of the DiT and umT5 benchmarks (same card, same call as vpipe's).

    python3 bench/dit_gpu.py dit [--reps 2]     # WanTransformer3DModel 14B, bf16, SDPA
    python3 bench/dit_gpu.py dit-1.3b [--reps 2]  # the same for the 1.3B
    python3 bench/dit_gpu.py umt5 [--reps 5]    # UMT5EncoderModel (umT5-xxl), bf16, 512 tokens
    python3 bench/dit_gpu.py dit-fp8 [--reps 2] # the 14B with float8 e4m3 weights (diffusers'
                                                # layerwise casting: stored fp8, computed bf16)
    python3 bench/dit_gpu.py dit-offload [--reps 2]  # the 14B resident (B=1, B=2), then with
                                                # group offloading (leaf, block level, use_stream)
    python3 bench/dit_gpu.py i2v [--reps 2] [--size 1280x720]  # the image-to-video 14B, one
                                                # CFG-batched forward (B=2) with 257 image tokens

Random weights built directly on the device (speed and memory do not depend on the values),
with the modules diffusers keeps in fp32 (`_keep_in_fp32_modules`) upcast as from_pretrained
would. Prints one JSON object per measurement: median seconds of `reps` synchronized runs after
one warm-up, and torch's peak allocated bytes above what was allocated before the call. The
attention share is SDPA alone on q/k/v of the model's shapes (the [B,S,H,D]→[B,H,S,D] layout
diffusers passes), per block kind, times the number of blocks.
"""

import json
import sys
import time

import torch

GIB = 2**30
DEV = "cuda"


def emit(**rec):
    print(json.dumps(rec), flush=True)


def measure(fn, reps):
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], (torch.cuda.max_memory_allocated() - before) / GIB


def build(ctor):
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = ctor()
    finally:
        torch.set_default_dtype(torch.float32)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name.split(".") for k in keep):
                p.data = p.data.float()
    return model.eval().requires_grad_(False)


WAN14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
              patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
              cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def i2v(reps, width=1280, height=720):
    """One CFG-batched forward (B=2) of the image-to-video 14B (36 input channels, image
    cross-attention over 257 CLIP tokens) at `width` x `height` x 81 frames."""
    from diffusers import WanTransformer3DModel

    cfg = dict(WAN14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
    if small:  # Wan 2.1 1.3B
        cfg.update(num_attention_heads=12, ffn_dim=8960, num_layers=30)
    heads = cfg["num_attention_heads"]
    t0 = time.perf_counter()
    model = build(lambda: WanTransformer3DModel(**cfg))
    torch.cuda.synchronize()
    emit(what="build i2v", weights_gib=torch.cuda.memory_allocated() / GIB,
         build_s=time.perf_counter() - t0, torch=torch.__version__)
    F, H, W, L, B = 21, height // 8, width // 8, 512, 2
    g = torch.Generator(device=DEV).manual_seed(0)
    hs = torch.randn(B, 36, F, H, W, generator=g, device=DEV).to(torch.bfloat16)
    ehs = torch.randn(B, L, 4096, generator=g, device=DEV).to(torch.bfloat16)
    img = torch.randn(B, 257, 1280, generator=g, device=DEV).to(torch.bfloat16)
    ts = torch.full((B,), 999.0, device=DEV)
    fwd = lambda: model(hidden_states=hs, timestep=ts, encoder_hidden_states=ehs,
                        encoder_hidden_states_image=img, return_dict=False)
    step, peak = measure(fwd, reps)
    emit(what="forward i2v", batch=B, size=f"{width}x{height}x81", tokens=F * (H // 2) * (W // 2),
         forward_s=step, peak_above_weights_gib=peak,
         max_reserved_gib=torch.cuda.max_memory_reserved() / GIB)


def dit_fp8(reps):
    """One CFG-batched forward (B=2) of the 14B at 832x480x81 with its weights stored in float8
    e4m3fn and each layer cast to bf16 as it runs: diffusers' way of running an fp8 checkpoint."""
    from diffusers import WanTransformer3DModel

    t0 = time.perf_counter()
    model = build(lambda: WanTransformer3DModel(**WAN14B))
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    emit(what="build fp8", weights_gib=torch.cuda.memory_allocated() / GIB,
         reserved_gib=torch.cuda.memory_reserved() / GIB, build_s=time.perf_counter() - t0)
    F, H, W, L, B = 21, 60, 104, 512, 2
    g = torch.Generator(device=DEV).manual_seed(0)
    hs = torch.randn(B, 16, F, H, W, generator=g, device=DEV).to(torch.bfloat16)
    ehs = torch.randn(B, L, 4096, generator=g, device=DEV).to(torch.bfloat16)
    ts = torch.full((B,), 999.0, device=DEV)
    fwd = lambda: model(hidden_states=hs, timestep=ts, encoder_hidden_states=ehs, return_dict=False)
    torch.cuda.reset_peak_memory_stats()
    step, peak = measure(fwd, reps)
    emit(what="forward fp8", batch=B, tokens=F * (H // 2) * (W // 2), forward_s=step,
         peak_above_weights_gib=peak, max_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
         max_reserved_gib=torch.cuda.max_memory_reserved() / GIB)


def dit(reps, small=False, batches=(2, 1)):
    from diffusers import WanTransformer3DModel

    cfg = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
               patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    if small:  # Wan 2.1 1.3B
        cfg.update(num_attention_heads=12, ffn_dim=8960, num_layers=30)
    heads = cfg["num_attention_heads"]
    t0 = time.perf_counter()
    model = build(lambda: WanTransformer3DModel(**cfg))
    torch.cuda.synchronize()
    emit(what="build", weights_gib=torch.cuda.memory_allocated() / GIB, build_s=time.perf_counter() - t0,
         torch=torch.__version__)
    F, H, W, L = 21, 60, 104, 512
    tokens = F * (H // 2) * (W // 2)
    g = torch.Generator(device=DEV).manual_seed(0)
    for B in batches:
        hs = torch.randn(B, 16, F, H, W, generator=g, device=DEV).to(torch.bfloat16)
        ehs = torch.randn(B, L, 4096, generator=g, device=DEV).to(torch.bfloat16)
        ts = torch.full((B,), 999.0, device=DEV)
        fwd = lambda: model(hidden_states=hs, timestep=ts, encoder_hidden_states=ehs, return_dict=False)
        step, peak = measure(fwd, reps)
        q = torch.randn(B, tokens, heads, 128, device=DEV, dtype=torch.bfloat16).permute(0, 2, 1, 3)
        kv = torch.randn(B, L, heads, 128, device=DEV, dtype=torch.bfloat16).permute(0, 2, 1, 3)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        self_s, _ = measure(lambda: sdpa(q, q, q), reps)
        cross_s, _ = measure(lambda: sdpa(q, kv, kv), reps)
        attn = (self_s + cross_s) * cfg["num_layers"]
        # Everything but attention: SDPA returns its query (diffusers calls it through the module
        # attribute at call time), as vpipe's `skip_for_benchmark` does.
        real_sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = lambda *a, **kw: kw.get("query", a[0] if a else None)
        try:
            rest, rest_peak = measure(fwd, reps)
        finally:
            torch.nn.functional.scaled_dot_product_attention = real_sdpa
        emit(what="forward", batch=B, tokens=tokens, text_len=L, forward_s=step, peak_above_weights_gib=peak,
             attention_s=attn, non_attention_s=step - attn, self_attention_layer_s=self_s,
             cross_attention_layer_s=cross_s, forward_without_attention_s=rest,
             forward_without_attention_peak_gib=rest_peak)
        del hs, ehs, q, kv
        torch.cuda.empty_cache()


def host_rss_gib():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = round(int(value.split()[0]) * 1024 / GIB, 2)
    return fields


def process_gpu_gib():
    """This process's device memory as the driver sees it (what nvidia-smi shows)."""
    import subprocess
    import os
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, used = [x.strip() for x in line.split(",")]
            if int(pid) == os.getpid():
                return round(int(used) / 1024, 3)
    except Exception:
        pass
    return None


def dit_offload(reps):
    """The 14B at 832x480x81 resident (B=1 and B=2), then moved to the host and run with
    diffusers' group offloading, leaf level and block level (one block per group), both with
    use_stream=True (pinned host copies, a copy stream, prefetch): the anchor of issue 13. Each
    offloaded setting: the median forward, torch's peak allocated and reserved, the process's
    device memory (nvidia-smi) and host RSS."""
    from diffusers import WanTransformer3DModel
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.hooks import HookRegistry
    from diffusers.hooks import group_offloading as go

    model = build(lambda: WanTransformer3DModel(**WAN14B))
    F, H, W, L = 21, 60, 104, 512
    g = torch.Generator(device=DEV).manual_seed(0)
    inputs = {}
    for B in (1, 2):
        inputs[B] = dict(hidden_states=torch.randn(B, 16, F, H, W, generator=g, device=DEV).to(torch.bfloat16),
                         encoder_hidden_states=torch.randn(B, L, 4096, generator=g, device=DEV).to(torch.bfloat16),
                         timestep=torch.full((B,), 999.0, device=DEV), return_dict=False)
    for B in (1, 2):
        step, peak = measure(lambda: model(**inputs[B]), reps)
        emit(what="offload anchor", setup="resident", batch=B, forward_s=step, peak_above_weights_gib=peak,
             max_reserved_gib=torch.cuda.max_memory_reserved() / GIB, process_gpu_gib=process_gpu_gib())
    model.to("cpu")
    torch.cuda.empty_cache()
    variants = [("leaf_level", dict(offload_type="leaf_level", use_stream=True)),
                ("block_level", dict(offload_type="block_level", num_blocks_per_group=1, use_stream=True))]
    for i, (name, kw) in enumerate(variants):
        if i:
            registry = HookRegistry.check_if_exists_or_initialize(model)
            for hook in (go._GROUP_OFFLOADING, go._LAYER_EXECUTION_TRACKER, go._LAZY_PREFETCH_GROUP_OFFLOADING):
                registry.remove_hook(hook, recurse=True)
            model.to("cpu")
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        apply_group_offloading(model, onload_device=torch.device(DEV), offload_device=torch.device("cpu"), **kw)
        torch.cuda.synchronize()
        apply_s = time.perf_counter() - t0
        for B in (1, 2):
            torch.cuda.reset_peak_memory_stats()
            # The first forward traces the execution order (blocking loads): measure() warms up once.
            step, _ = measure(lambda: model(**inputs[B]), reps)
            emit(what="offload anchor", setup=f"group offloading {name}, use_stream", batch=B, forward_s=step,
                 apply_s=apply_s, max_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                 max_reserved_gib=torch.cuda.max_memory_reserved() / GIB, process_gpu_gib=process_gpu_gib(),
                 host=host_rss_gib())


def umt5(reps):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                     is_encoder_decoder=False)
    model = build(lambda: UMT5EncoderModel(cfg)).to(torch.bfloat16)
    torch.cuda.synchronize()
    emit(what="umt5 build", weights_gib=torch.cuda.memory_allocated() / GIB,
         attn=getattr(model.config, "_attn_implementation", None))
    g = torch.Generator(device=DEV).manual_seed(0)
    for B in (1, 2):
        ids = torch.randint(0, cfg.vocab_size, (B, 512), generator=g, device=DEV)
        mask = torch.ones(B, 512, dtype=torch.long, device=DEV)
        t, peak = measure(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state, reps)
        emit(what="umt5 encode", batch=B, tokens=512, encode_s=t, peak_above_weights_gib=peak)


if __name__ == "__main__":
    section = sys.argv[1]
    reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 2
    if section == "i2v":
        size = sys.argv[sys.argv.index("--size") + 1] if "--size" in sys.argv else "1280x720"
        width, height = map(int, size.split("x"))
        i2v(reps, width, height)
    else:
        # `--batches 2` measures the CFG-batched forward alone.
        batches = (int(sys.argv[sys.argv.index("--batches") + 1]),) if "--batches" in sys.argv else (2, 1)
        {"dit": lambda r: dit(r, batches=batches), "dit-1.3b": lambda r: dit(r, small=True, batches=batches),
         "umt5": umt5, "dit-fp8": dit_fp8,
         "dit-offload": dit_offload}[section](reps)
