#!/usr/bin/env python3
"""Full-size Wan 2.1 checkpoints with random weights, in the files users have, for the pipeline
benchmark (`bench/gpu-pipeline.sh`): the 14B text-to-video DiT as a ComfyUI diffusion-model file
(original names, `model.diffusion_model.` prefix, bf16, 28.6 GB) and umT5-XXL under transformers
names (bf16, 11.4 GB). The VAE comes from `bench/vae_gpu.py prepare` (diffusers layout).

    python3 bench/make_random_checkpoints.py OUT_DIR          # full size (needs ~45 GB RAM + disk)
    TINY=1 python3 bench/make_random_checkpoints.py OUT_DIR   # same key set, tiny widths (a check)
    FP8=1 python3 bench/make_random_checkpoints.py OUT_DIR    # the DiT as ComfyUI's scaled fp8 only
    ONLY=lora,fp8 python3 bench/make_random_checkpoints.py OUT_DIR  # just these files
                                             # (dit, dit13, i2v, ti2v, clip, umt5, fp8, lora;
                                             # default dit,umt5)

`dit13` writes the 1.3B text-to-video DiT the same way (dim 1536, 30 blocks, 2.8 GB); `ti2v` Wan 2.2's
TI2V-5B (dim 3072, 30 blocks, FFN 14336, 48 latent channels in and out; 10 GB). `i2v` writes
the image-to-video 14B (36 input channels, `img_emb`, `k_img`/`v_img`/`norm_k_img` in every
cross-attention; 32.8 GB). `clip` writes the CLIP ViT-H/14 vision encoder under transformers names
(`vision_model.*`, as ComfyUI's clip_vision_h.safetensors holds it; bf16, 1.26 GB).

`lora` writes a rank-32 LoRA on every linear layer of the 14B's blocks (self- and
cross-attention q, k, v, o and both FFN layers: 400 layers), in the kohya/ComfyUI layout
(`diffusion_model.blocks.N.….lora_A/lora_B.weight` and `.alpha`, bf16, about 0.3 GB), as the
lightx2v and style LoRAs users load are made.

FP8=1 writes the file most ComfyUI users have instead of the bf16 DiT: every 2-D weight of the
blocks in float8 e4m3fn with a per-tensor f32 `scale_weight` (absmax / 448), the `scaled_fp8`
marker, everything else bf16 (wan2.1_t2v_14B_random_fp8_scaled.safetensors, about 14.3 GB).

Values: normal with std 1/sqrt(fan_in) for matrices, 1 ± 0.05 for norm gains, 0.02 for biases
and modulation tables; generated on the GPU when there is one. Speed and memory do not depend on
the values; correctness is the parity tests' job.
"""
import os
import sys

import torch
from safetensors.torch import save_file

TINY = bool(os.environ.get("TINY"))
FP8 = bool(os.environ.get("FP8"))
FP8_MAX = 448.0
DEV = "cuda" if torch.cuda.is_available() else "cpu"
GEN = torch.Generator(device=DEV).manual_seed(2025)


def rand(shape, kind):
    if kind == "gain":
        t = 1.0 + 0.05 * torch.randn(shape, generator=GEN, device=DEV)
    elif kind == "small":
        t = 0.02 * torch.randn(shape, generator=GEN, device=DEV)
    else:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        t = torch.randn(shape, generator=GEN, device=DEV) / fan_in**0.5
    return t.to(torch.bfloat16).cpu()


def dit(size="14B", image=False):
    # Wan2.1-T2V-14B (or 1.3B; I2V with `image`; Wan 2.2 TI2V-5B with its 48 latent channels),
    # original names.
    full = {
        "14B": (5120, 13824, 40, 4096, 256),
        "1.3B": (1536, 8960, 30, 4096, 256),
        "5B": (3072, 14336, 30, 4096, 256),
    }[size]
    channels = 48 if size == "5B" else 16
    dim, ffn, layers, text_dim, freq = (256, 512, 2, 64, 256) if TINY else full
    clip_dim = 64 if TINY else 1280
    w = {}

    def linear(name, out_dim, in_dim):
        w[f"{name}.weight"] = rand((out_dim, in_dim), "matrix")
        w[f"{name}.bias"] = rand((out_dim,), "small")

    w["patch_embedding.weight"] = rand((dim, 36 if image else channels, 1, 2, 2), "matrix")
    w["patch_embedding.bias"] = rand((dim,), "small")
    linear("text_embedding.0", dim, text_dim)
    linear("text_embedding.2", dim, dim)
    linear("time_embedding.0", dim, freq)
    linear("time_embedding.2", dim, dim)
    linear("time_projection.1", 6 * dim, dim)
    if image:
        w["img_emb.proj.0.weight"] = rand((clip_dim,), "gain")
        w["img_emb.proj.0.bias"] = rand((clip_dim,), "small")
        linear("img_emb.proj.1", clip_dim, clip_dim)
        linear("img_emb.proj.3", dim, clip_dim)
        w["img_emb.proj.4.weight"] = rand((dim,), "gain")
        w["img_emb.proj.4.bias"] = rand((dim,), "small")
    for i in range(layers):
        b = f"blocks.{i}"
        w[f"{b}.modulation"] = rand((1, 6, dim), "small")
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                linear(f"{b}.{attn}.{p}", dim, dim)
            w[f"{b}.{attn}.norm_q.weight"] = rand((dim,), "gain")
            w[f"{b}.{attn}.norm_k.weight"] = rand((dim,), "gain")
        if image:
            linear(f"{b}.cross_attn.k_img", dim, dim)
            linear(f"{b}.cross_attn.v_img", dim, dim)
            w[f"{b}.cross_attn.norm_k_img.weight"] = rand((dim,), "gain")
        w[f"{b}.norm3.weight"] = rand((dim,), "gain")
        w[f"{b}.norm3.bias"] = rand((dim,), "small")
        linear(f"{b}.ffn.0", ffn, dim)
        linear(f"{b}.ffn.2", dim, ffn)
    linear("head.head", 4 * channels, dim)
    w["head.modulation"] = rand((1, 2, dim), "small")
    return {f"model.diffusion_model.{k}": v for k, v in w.items()}


def umt5():
    # umT5-XXL encoder, transformers names.
    d, ff, layers, heads, vocab = (64, 128, 2, 4, 1024) if TINY else (4096, 10240, 24, 64, 256384)
    w = {"shared.weight": rand((vocab, d), "matrix"), "encoder.final_layer_norm.weight": rand((d,), "gain")}
    for i in range(layers):
        b = f"encoder.block.{i}.layer"
        w[f"{b}.0.layer_norm.weight"] = rand((d,), "gain")
        for p in "qkvo":
            w[f"{b}.0.SelfAttention.{p}.weight"] = rand((d, d), "matrix")
        w[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = rand((32, heads), "small")
        w[f"{b}.1.layer_norm.weight"] = rand((d,), "gain")
        w[f"{b}.1.DenseReluDense.wi_0.weight"] = rand((ff, d), "matrix")
        w[f"{b}.1.DenseReluDense.wi_1.weight"] = rand((ff, d), "matrix")
        w[f"{b}.1.DenseReluDense.wo.weight"] = rand((d, ff), "matrix")
    return w


def clip():
    # CLIP ViT-H/14 vision tower, transformers names.
    d, ff, layers, patch, side = (64, 128, 2, 14, 224) if TINY else (1280, 5120, 32, 14, 224)
    v = "vision_model"
    w = {
        f"{v}.embeddings.class_embedding": rand((d,), "small"),
        f"{v}.embeddings.patch_embedding.weight": rand((d, 3, patch, patch), "matrix"),
        f"{v}.embeddings.position_embedding.weight": rand((1 + (side // patch) ** 2, d), "small"),
    }
    for name in ("pre_layrnorm", "post_layernorm"):
        w[f"{v}.{name}.weight"] = rand((d,), "gain")
        w[f"{v}.{name}.bias"] = rand((d,), "small")

    def linear(name, out_dim, in_dim):
        w[f"{name}.weight"] = rand((out_dim, in_dim), "matrix")
        w[f"{name}.bias"] = rand((out_dim,), "small")

    for i in range(layers):
        b = f"{v}.encoder.layers.{i}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"{b}.self_attn.{p}", d, d)
        for n in ("layer_norm1", "layer_norm2"):
            w[f"{b}.{n}.weight"] = rand((d,), "gain")
            w[f"{b}.{n}.bias"] = rand((d,), "small")
        linear(f"{b}.mlp.fc1", ff, d)
        linear(f"{b}.mlp.fc2", d, ff)
    return w


def scaled_fp8(tensors):
    """ComfyUI's `fp8_e4m3fn_scaled` form of a DiT state dict: w = w8.float() * scale_weight."""
    out = {}
    for k, v in tensors.items():
        if ".blocks." in k and k.endswith(".weight") and v.dim() == 2:
            w = v.to(DEV, torch.float32)
            scale = w.abs().max().clamp(min=1e-12) / FP8_MAX
            out[k] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).cpu()
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(1).float().cpu()
        else:
            out[k] = v
    out["model.diffusion_model.scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    return out


def lora(rank=32):
    dim, ffn, layers = (256, 512, 2) if TINY else (5120, 13824, 40)
    w = {}
    shapes = {f"{attn}.{p}": (dim, dim) for attn in ("self_attn", "cross_attn") for p in "qkvo"}
    shapes.update({"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)})
    for i in range(layers):
        for module, (out_dim, in_dim) in shapes.items():
            key = f"diffusion_model.blocks.{i}.{module}"
            w[f"{key}.lora_A.weight"] = rand((rank, in_dim), "matrix")
            w[f"{key}.lora_B.weight"] = rand((out_dim, rank), "small")
            w[f"{key}.alpha"] = torch.tensor(float(rank), dtype=torch.bfloat16)
    return w


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    files = {
        "dit": ("wan2.1_t2v_14B_random_bf16.safetensors", dit),
        "dit13": ("wan2.1_t2v_1.3B_random_bf16.safetensors", lambda: dit("1.3B")),
        "i2v": ("wan2.1_i2v_14B_random_bf16.safetensors", lambda: dit(image=True)),
        "ti2v": ("wan2.2_ti2v_5B_random_bf16.safetensors", lambda: dit("5B")),
        "clip": ("clip_vision_h_random_bf16.safetensors", clip),
        "umt5": ("umt5_xxl_random_bf16.safetensors", umt5),
        "fp8": ("wan2.1_t2v_14B_random_fp8_scaled.safetensors", lambda: scaled_fp8(dit())),
        "lora": ("lora_rank32_all_linear_random.safetensors", lora),
    }
    only = os.environ.get("ONLY", "fp8,umt5" if FP8 else "dit,umt5").split(",")
    makers = [files[k] for k in only]
    for name, make in makers:
        tensors = make()
        save_file(tensors, os.path.join(out, name))
        print(name, sum(t.numel() for t in tensors.values()), "parameters", flush=True)
        del tensors
