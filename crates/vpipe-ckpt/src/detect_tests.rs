//! Detection on synthetic tensor lists.
//!
//! Every list is built from the key tables and shapes of the published Wan 2.1 checkpoints: the
//! DiT (825 keys for T2V-1.3B), the VAE (all 194 keys), umT5, and for
//! LoRA formats; diffusers names are produced with the diffusers ↔ Wan rename rule. Parameter totals are
//! checked against the published sizes (1.419 B, 14.289 B, 16.395 B, 126.9 M,
//! 5.681 B, to within the last printed digit), which shows the synthetic lists really are the
//! released models' key sets. The exact DiT totals (1,418,996,800 / 14,288,491,584 /
//! 16,394,878,784) were computed separately by summing the DiT's layer shapes in Python:
//! globals `16·4·d + d + (4096·d + d) + 2(d² + d) + (256·d + d) + (6d² + 6d) + 64d + 64 + 2d`,
//! per block `6d + 2(4(d² + d) + 2d) + 2d + 2·f·d + f + d` (+ `2(d² + d) + d` for I2V), and for
//! I2V `2·1280 + 1280² + 1280 + 1280·d + d + 2d + 20·4·d` more.

use super::*;

type List = Vec<(String, Vec<usize>, DType)>;

fn metas(list: &List) -> impl Iterator<Item = TensorMeta<'_>> {
    list.iter().map(|(n, s, d)| TensorMeta {
        name: n,
        shape: s,
        dtype: *d,
    })
}

fn params(list: &List) -> u64 {
    list.iter()
        .map(|(_, s, _)| s.iter().map(|&d| d as u64).product::<u64>())
        .sum()
}

fn push(list: &mut List, name: impl Into<String>, shape: &[usize]) {
    list.push((name.into(), shape.to_vec(), DType::BF16));
}

/// Original Wan DiT keys, `blocks.0..layers`, plus the I2V extras when `in_dim == 36`.
fn wan_dit(dim: usize, ffn: usize, layers: usize, in_dim: usize) -> List {
    let mut l = List::new();
    push(&mut l, "patch_embedding.weight", &[dim, in_dim, 1, 2, 2]);
    push(&mut l, "patch_embedding.bias", &[dim]);
    for (name, inp) in [
        ("text_embedding.0", 4096),
        ("text_embedding.2", dim),
        ("time_embedding.0", 256),
        ("time_embedding.2", dim),
    ] {
        push(&mut l, format!("{name}.weight"), &[dim, inp]);
        push(&mut l, format!("{name}.bias"), &[dim]);
    }
    push(&mut l, "time_projection.1.weight", &[6 * dim, dim]);
    push(&mut l, "time_projection.1.bias", &[6 * dim]);
    push(&mut l, "head.head.weight", &[64, dim]);
    push(&mut l, "head.head.bias", &[64]);
    push(&mut l, "head.modulation", &[1, 2, dim]);
    let i2v = in_dim == 36;
    for b in 0..layers {
        let p = format!("blocks.{b}");
        push(&mut l, format!("{p}.modulation"), &[1, 6, dim]);
        for attn in ["self_attn", "cross_attn"] {
            let mut linears = vec!["q", "k", "v", "o"];
            if i2v && attn == "cross_attn" {
                linears.extend(["k_img", "v_img"]);
            }
            for lin in linears {
                push(&mut l, format!("{p}.{attn}.{lin}.weight"), &[dim, dim]);
                push(&mut l, format!("{p}.{attn}.{lin}.bias"), &[dim]);
            }
            push(&mut l, format!("{p}.{attn}.norm_q.weight"), &[dim]);
            push(&mut l, format!("{p}.{attn}.norm_k.weight"), &[dim]);
            if i2v && attn == "cross_attn" {
                push(&mut l, format!("{p}.{attn}.norm_k_img.weight"), &[dim]);
            }
        }
        push(&mut l, format!("{p}.norm3.weight"), &[dim]);
        push(&mut l, format!("{p}.norm3.bias"), &[dim]);
        push(&mut l, format!("{p}.ffn.0.weight"), &[ffn, dim]);
        push(&mut l, format!("{p}.ffn.0.bias"), &[ffn]);
        push(&mut l, format!("{p}.ffn.2.weight"), &[dim, ffn]);
        push(&mut l, format!("{p}.ffn.2.bias"), &[dim]);
    }
    if i2v {
        // MLPProj: LN(1280), Linear(1280, 1280), GELU, Linear(1280, dim), LN(dim).
        push(&mut l, "img_emb.proj.0.weight", &[1280]);
        push(&mut l, "img_emb.proj.0.bias", &[1280]);
        push(&mut l, "img_emb.proj.1.weight", &[1280, 1280]);
        push(&mut l, "img_emb.proj.1.bias", &[1280]);
        push(&mut l, "img_emb.proj.3.weight", &[dim, 1280]);
        push(&mut l, "img_emb.proj.3.bias", &[dim]);
        push(&mut l, "img_emb.proj.4.weight", &[dim]);
        push(&mut l, "img_emb.proj.4.bias", &[dim]);
    }
    l
}

/// The rename rule, original Wan → diffusers, from vpipe-models' key map (the one the
/// model loader uses).
fn to_diffusers_dit(name: &str) -> String {
    vpipe_models::wan::dit_keys::wan_to_diffusers(name)
        .unwrap_or_else(|| panic!("{name}: no diffusers name"))
}

fn renamed(list: &List, f: impl Fn(&str) -> String) -> List {
    list.iter().map(|(n, s, d)| (f(n), s.clone(), *d)).collect()
}

fn dit(d: &Detection) -> &DitConfig {
    match &d.config {
        Some(ModelConfig::Dit(c)) => c,
        other => panic!("expected a DiT config, got {other:?} ({:?})", d.notes),
    }
}

#[test]
fn wan_t2v_1_3b_original_names() {
    let l = wan_dit(1536, 8960, 30, 16);
    assert_eq!(l.len(), 825, "825 original keys for T2V-1.3B");
    assert_eq!(params(&l), 1_418_996_800, "1.419 B");
    let d = detect(metas(&l));
    assert_eq!(d.family, Family::WanDitT2v);
    assert_eq!(d.layout, KeyLayout::Wan);
    assert_eq!(d.prefix, "");
    assert!(d.notes.is_empty(), "{:?}", d.notes);
    let c = dit(&d);
    assert_eq!(
        *c,
        DitConfig {
            dim: 1536,
            ffn_dim: 8960,
            num_layers: 30,
            num_heads: 12,
            in_dim: 16,
            out_dim: 16,
            text_dim: 4096,
            freq_dim: 256,
            patch_size: [1, 2, 2],
            image_conditioning: false,
            first_last_frame: false,
            qk_norm: true,
            cross_attn_norm: true,
            size_name: Some("1.3B"),
        }
    );
}

#[test]
fn wan_t2v_14b_with_comfyui_prefix() {
    let l = renamed(&wan_dit(5120, 13824, 40, 16), |n| {
        format!("model.diffusion_model.{n}")
    });
    assert_eq!(
        params(&l),
        14_288_491_584,
        "14.289 B (the reference rounds 14.2885 up)"
    );
    let d = detect(metas(&l));
    assert_eq!(d.family, Family::WanDitT2v);
    assert_eq!(d.layout, KeyLayout::Wan);
    assert_eq!(d.prefix, "model.diffusion_model.");
    let c = dit(&d);
    assert_eq!(
        (c.dim, c.ffn_dim, c.num_layers, c.num_heads),
        (5120, 13824, 40, 40)
    );
    assert_eq!(c.size_name, Some("14B"));
}

#[test]
fn wan_i2v_14b_original_and_diffusers() {
    let l = wan_dit(5120, 13824, 40, 36);
    assert_eq!(params(&l), 16_394_878_784, "16.395 B");
    for (list, layout) in [
        (l.clone(), KeyLayout::Wan),
        (renamed(&l, to_diffusers_dit), KeyLayout::Diffusers),
        (
            renamed(&l, |n| format!("diffusion_model.{n}")),
            KeyLayout::Wan,
        ),
    ] {
        let d = detect(metas(&list));
        assert_eq!(d.family, Family::WanDitI2v, "{layout:?}");
        assert_eq!(d.layout, layout);
        let c = dit(&d);
        assert!(c.image_conditioning);
        assert_eq!(
            (c.in_dim, c.out_dim, c.dim, c.num_layers),
            (36, 16, 5120, 40)
        );
        assert_eq!(c.size_name, Some("14B"));
        assert!(d.notes.is_empty(), "{:?}", d.notes);
    }
}

#[test]
fn diffusers_t2v_1_3b_matches_the_original() {
    let orig = wan_dit(1536, 8960, 30, 16);
    let diff = renamed(&orig, to_diffusers_dit);
    assert!(diff
        .iter()
        .any(|(n, _, _)| n == "blocks.0.attn1.to_out.0.weight"));
    assert!(
        diff.iter().any(|(n, _, _)| n == "blocks.0.norm2.bias"),
        "norm3 → norm2"
    );
    let a = detect(metas(&orig));
    let b = detect(metas(&diff));
    assert_eq!(b.family, Family::WanDitT2v);
    assert_eq!(b.layout, KeyLayout::Diffusers);
    assert_eq!(a.config, b.config);
    // diffusers LoRA-style prefix on a whole model.
    let c = detect(metas(&renamed(&diff, |n| format!("transformer.{n}"))));
    assert_eq!(
        (c.layout, c.prefix.as_str()),
        (KeyLayout::Diffusers, "transformer.")
    );
}

#[test]
fn missing_config_key_keeps_the_family_and_says_what_is_missing() {
    let l: List = wan_dit(1536, 8960, 2, 16)
        .into_iter()
        .filter(|(n, _, _)| !n.starts_with("text_embedding.0"))
        .collect();
    let d = detect(metas(&l));
    assert_eq!(d.family, Family::WanDitT2v);
    assert!(d.config.is_none());
    assert_eq!(
        d.notes,
        ["configuration not derivable: missing key text_embedding.0.weight"]
    );
}

#[test]
fn fp8_scaled_files_are_noted() {
    let mut l = wan_dit(1536, 8960, 1, 16);
    l.push(("scaled_fp8".into(), vec![0], DType::F8_E4M3));
    l.push((
        "blocks.0.self_attn.q.scale_weight".into(),
        vec![1],
        DType::F32,
    ));
    let d = detect(metas(&l));
    assert_eq!(d.family, Family::WanDitT2v);
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("fp8 scaled") && n.contains("1 scale_weight")),
        "{:?}",
        d.notes
    );
}

/// All 194 original VAE keys.
fn wan_vae() -> List {
    let mut l = List::new();
    let conv = |l: &mut List, p: &str, o: usize, i: usize, k: &[usize]| {
        let mut s = vec![o, i];
        s.extend_from_slice(k);
        push(l, format!("{p}.weight"), &s);
        push(l, format!("{p}.bias"), &[o]);
    };
    let residual = |l: &mut List, p: &str, i: usize, o: usize| {
        push(l, format!("{p}.residual.0.gamma"), &[i, 1, 1, 1]);
        conv(l, &format!("{p}.residual.2"), o, i, &[3, 3, 3]);
        push(l, format!("{p}.residual.3.gamma"), &[o, 1, 1, 1]);
        conv(l, &format!("{p}.residual.6"), o, o, &[3, 3, 3]);
        if i != o {
            conv(l, &format!("{p}.shortcut"), o, i, &[1, 1, 1]);
        }
    };
    let attention = |l: &mut List, p: &str| {
        push(l, format!("{p}.norm.gamma"), &[384, 1, 1]);
        conv(l, &format!("{p}.to_qkv"), 1152, 384, &[1, 1]);
        conv(l, &format!("{p}.proj"), 384, 384, &[1, 1]);
    };
    conv(&mut l, "encoder.conv1", 96, 3, &[3, 3, 3]);
    residual(&mut l, "encoder.downsamples.0", 96, 96);
    residual(&mut l, "encoder.downsamples.1", 96, 96);
    conv(&mut l, "encoder.downsamples.2.resample.1", 96, 96, &[3, 3]);
    residual(&mut l, "encoder.downsamples.3", 96, 192);
    residual(&mut l, "encoder.downsamples.4", 192, 192);
    conv(
        &mut l,
        "encoder.downsamples.5.resample.1",
        192,
        192,
        &[3, 3],
    );
    conv(
        &mut l,
        "encoder.downsamples.5.time_conv",
        192,
        192,
        &[3, 1, 1],
    );
    residual(&mut l, "encoder.downsamples.6", 192, 384);
    residual(&mut l, "encoder.downsamples.7", 384, 384);
    conv(
        &mut l,
        "encoder.downsamples.8.resample.1",
        384,
        384,
        &[3, 3],
    );
    conv(
        &mut l,
        "encoder.downsamples.8.time_conv",
        384,
        384,
        &[3, 1, 1],
    );
    residual(&mut l, "encoder.downsamples.9", 384, 384);
    residual(&mut l, "encoder.downsamples.10", 384, 384);
    residual(&mut l, "encoder.middle.0", 384, 384);
    attention(&mut l, "encoder.middle.1");
    residual(&mut l, "encoder.middle.2", 384, 384);
    push(&mut l, "encoder.head.0.gamma", &[384, 1, 1, 1]);
    conv(&mut l, "encoder.head.2", 32, 384, &[3, 3, 3]);
    conv(&mut l, "conv1", 32, 32, &[1, 1, 1]);
    conv(&mut l, "conv2", 16, 16, &[1, 1, 1]);
    conv(&mut l, "decoder.conv1", 384, 16, &[3, 3, 3]);
    residual(&mut l, "decoder.middle.0", 384, 384);
    attention(&mut l, "decoder.middle.1");
    residual(&mut l, "decoder.middle.2", 384, 384);
    for n in 0..3 {
        residual(&mut l, &format!("decoder.upsamples.{n}"), 384, 384);
    }
    conv(&mut l, "decoder.upsamples.3.resample.1", 192, 384, &[3, 3]);
    conv(
        &mut l,
        "decoder.upsamples.3.time_conv",
        768,
        384,
        &[3, 1, 1],
    );
    residual(&mut l, "decoder.upsamples.4", 192, 384);
    residual(&mut l, "decoder.upsamples.5", 384, 384);
    residual(&mut l, "decoder.upsamples.6", 384, 384);
    conv(&mut l, "decoder.upsamples.7.resample.1", 192, 384, &[3, 3]);
    conv(
        &mut l,
        "decoder.upsamples.7.time_conv",
        768,
        384,
        &[3, 1, 1],
    );
    for n in 8..11 {
        residual(&mut l, &format!("decoder.upsamples.{n}"), 192, 192);
    }
    conv(&mut l, "decoder.upsamples.11.resample.1", 96, 192, &[3, 3]);
    for n in 12..15 {
        residual(&mut l, &format!("decoder.upsamples.{n}"), 96, 96);
    }
    push(&mut l, "decoder.head.0.gamma", &[96, 1, 1, 1]);
    conv(&mut l, "decoder.head.2", 3, 96, &[3, 3, 3]);
    l
}

#[test]
fn wan_vae_original_and_diffusers() {
    let l = wan_vae();
    assert_eq!(l.len(), 194, "194 tensors");
    assert_eq!(
        (params(&l) as f64 / 1e5).round(),
        1269.0,
        "126.9 M parameters"
    );
    let expected = VaeConfig {
        base_dim: 96,
        z_dim: 16,
        dim_mult: Some(vec![1, 2, 4, 4]),
        num_res_blocks: Some(2),
        temporal_downsample: Some(vec![false, true, true]),
        decoder_base_dim: None,
        patch_size: None,
    };
    let d = detect(metas(&l));
    assert_eq!((d.family, d.layout), (Family::WanVae, KeyLayout::Wan));
    assert_eq!(d.config, Some(ModelConfig::Vae(expected.clone())));

    // The diffusers names come from the model crate's key map, which its parity tests check
    // against a checkpoint written by diffusers itself (2 residual blocks per stage).
    let diff = renamed(&l, |name| {
        vpipe_models::wan::keys::wan_to_diffusers(name, 2)
    });
    assert!(diff
        .iter()
        .any(|(n, _, _)| n == "decoder.up_blocks.0.upsamplers.0.time_conv.weight"));
    assert!(diff
        .iter()
        .any(|(n, _, _)| n == "encoder.down_blocks.3.conv_shortcut.weight"));
    let d = detect(metas(&diff));
    assert_eq!((d.family, d.layout), (Family::WanVae, KeyLayout::Diffusers));
    assert_eq!(d.config, Some(ModelConfig::Vae(expected)));
}

/// The tiny Wan 2.2 VAE of vpipe-models' parity fixtures (diffusers names, written by
/// diffusers' `AutoencoderKLWan`: the real 196-key set at base_dim 4, decoder_base_dim 6,
/// z_dim 12, patch 2).
fn wan22_vae_tiny() -> List {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../vpipe-models/tests/fixtures/vae22/wan22_vae_tiny_diffusers.safetensors");
    crate::inspect(&path)
        .unwrap()
        .tensors
        .into_iter()
        .map(|t| (t.name, t.shape, t.dtype))
        .collect()
}

#[test]
fn wan22_vae_original_and_diffusers() {
    let diff = wan22_vae_tiny();
    assert_eq!(diff.len(), 196, "196 tensors");
    let expected = VaeConfig {
        base_dim: 4,
        z_dim: 12,
        dim_mult: Some(vec![1, 2, 4, 4]),
        num_res_blocks: Some(2),
        temporal_downsample: Some(vec![false, true, true]),
        decoder_base_dim: Some(6),
        patch_size: Some(2),
    };
    let d = detect(metas(&diff));
    assert_eq!(
        (d.family, d.layout),
        (Family::WanVae22, KeyLayout::Diffusers)
    );
    assert_eq!(d.config, Some(ModelConfig::Vae(expected.clone())));
    assert!(d.notes.is_empty(), "{:?}", d.notes);

    // Original Wan 2.2 / ComfyUI names, behind ComfyUI's prefix too.
    let wan = renamed(&diff, |name| {
        vpipe_models::wan::keys::diffusers_to_wan22(name, 2)
    });
    assert!(wan
        .iter()
        .any(|(n, _, _)| n == "encoder.downsamples.0.downsamples.0.residual.0.gamma"));
    let d = detect(metas(&wan));
    assert_eq!((d.family, d.layout), (Family::WanVae22, KeyLayout::Wan));
    assert_eq!(d.config, Some(ModelConfig::Vae(expected.clone())));
    let prefixed = renamed(&wan, |name| format!("vae.{name}"));
    let d = detect(metas(&prefixed));
    assert_eq!((d.family, d.prefix.as_str()), (Family::WanVae22, "vae."));
    assert_eq!(d.config, Some(ModelConfig::Vae(expected)));
}

#[test]
fn wan22_ti2v_5b_is_its_own_family() {
    let mut l = wan_dit(3072, 14336, 30, 48);
    // 48 latent channels out: 48 · (1·2·2) head rows.
    for (name, shape, _) in l.iter_mut() {
        if name.starts_with("head.head.") {
            shape[0] = 192;
        }
    }
    let d = detect(metas(&l));
    assert_eq!((d.family, d.layout), (Family::WanDitTi2v, KeyLayout::Wan));
    let c = dit(&d);
    assert_eq!(
        (c.in_dim, c.out_dim, c.num_heads, c.size_name),
        (48, 48, 24, Some("5B"))
    );
    assert!(!c.image_conditioning);
    assert!(d.notes.is_empty(), "{:?}", d.notes);
    assert_eq!((params(&l) as f64 / 1e9 * 10.0).round(), 50.0, "5.0 B");
    let d = detect(metas(&renamed(&l, to_diffusers_dit)));
    assert_eq!(
        (d.family, d.layout),
        (Family::WanDitTi2v, KeyLayout::Diffusers)
    );
    // A Wan 2.1 T2V DiT stays one.
    let d = detect(metas(&wan_dit(1536, 8960, 30, 16)));
    assert_eq!(d.family, Family::WanDitT2v);
}

/// umT5-XXL encoder keys, original Wan `t5.py` names.
fn umt5_original(layers: usize) -> List {
    let mut l = List::new();
    push(&mut l, "token_embedding.weight", &[256384, 4096]);
    for b in 0..layers {
        let p = format!("blocks.{b}");
        push(&mut l, format!("{p}.norm1.weight"), &[4096]);
        for x in ["q", "k", "v", "o"] {
            push(&mut l, format!("{p}.attn.{x}.weight"), &[4096, 4096]);
        }
        push(
            &mut l,
            format!("{p}.pos_embedding.embedding.weight"),
            &[32, 64],
        );
        push(&mut l, format!("{p}.norm2.weight"), &[4096]);
        push(&mut l, format!("{p}.ffn.gate.0.weight"), &[10240, 4096]);
        push(&mut l, format!("{p}.ffn.fc1.weight"), &[10240, 4096]);
        push(&mut l, format!("{p}.ffn.fc2.weight"), &[4096, 10240]);
    }
    push(&mut l, "norm.weight", &[4096]);
    l
}

/// The same model with transformers / ComfyUI names, with the tied embedding copy.
fn umt5_hf(layers: usize, per_layer_bias: bool) -> List {
    let mut l = List::new();
    push(&mut l, "shared.weight", &[256384, 4096]);
    push(&mut l, "encoder.embed_tokens.weight", &[256384, 4096]);
    for b in 0..layers {
        let p = format!("encoder.block.{b}.layer");
        push(&mut l, format!("{p}.0.layer_norm.weight"), &[4096]);
        for x in ["q", "k", "v", "o"] {
            push(
                &mut l,
                format!("{p}.0.SelfAttention.{x}.weight"),
                &[4096, 4096],
            );
        }
        if per_layer_bias || b == 0 {
            push(
                &mut l,
                format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                &[32, 64],
            );
        }
        push(&mut l, format!("{p}.1.layer_norm.weight"), &[4096]);
        push(
            &mut l,
            format!("{p}.1.DenseReluDense.wi_0.weight"),
            &[10240, 4096],
        );
        push(
            &mut l,
            format!("{p}.1.DenseReluDense.wi_1.weight"),
            &[10240, 4096],
        );
        push(
            &mut l,
            format!("{p}.1.DenseReluDense.wo.weight"),
            &[4096, 10240],
        );
    }
    push(&mut l, "encoder.final_layer_norm.weight", &[4096]);
    l
}

#[test]
fn umt5_xxl_both_layouts() {
    let expected = Umt5Config {
        d_model: 4096,
        d_ff: 10240,
        num_layers: 24,
        num_heads: 64,
        d_kv: 64,
        vocab_size: 256384,
        num_buckets: 32,
        has_tokenizer: false,
    };
    let orig = umt5_original(24);
    assert_eq!((params(&orig) as f64 / 1e6).round(), 5681.0, "5.681 B");
    let d = detect(metas(&orig));
    assert_eq!((d.family, d.layout), (Family::Umt5Encoder, KeyLayout::Wan));
    assert_eq!(d.config, Some(ModelConfig::Umt5(expected.clone())));

    let mut hf = umt5_hf(24, true);
    hf.push(("spiece_model".into(), vec![4_548_313], DType::U8));
    let d = detect(metas(&hf));
    assert_eq!(
        (d.family, d.layout),
        (Family::Umt5Encoder, KeyLayout::Diffusers)
    );
    assert_eq!(d.layout_description(), "transformers (as in ComfyUI)");
    assert_eq!(
        d.config,
        Some(ModelConfig::Umt5(Umt5Config {
            has_tokenizer: true,
            ..expected
        }))
    );
}

#[test]
fn plain_t5_is_not_umt5() {
    let d = detect(metas(&umt5_hf(3, false)));
    assert_eq!(d.family, Family::Unknown);
    assert!(d.config.is_none());
    assert!(
        d.notes.iter().any(|n| n.contains("not umT5")),
        "{:?}",
        d.notes
    );
}

/// Wan's `clip.py` ViT-H/14 vision tower (+ one text-tower key), from `XLMRobertaCLIP`.
fn clip_wan() -> List {
    let mut l = List::new();
    push(&mut l, "visual.patch_embedding.weight", &[1280, 3, 14, 14]);
    push(&mut l, "visual.cls_embedding", &[1, 1, 1280]);
    push(&mut l, "visual.pos_embedding", &[1, 257, 1280]);
    for b in 0..32 {
        let p = format!("visual.transformer.{b}");
        push(&mut l, format!("{p}.attn.to_qkv.weight"), &[3840, 1280]);
        push(&mut l, format!("{p}.attn.proj.weight"), &[1280, 1280]);
        push(&mut l, format!("{p}.mlp.0.weight"), &[5120, 1280]);
        push(&mut l, format!("{p}.mlp.2.weight"), &[1280, 5120]);
    }
    push(&mut l, "visual.head", &[1280, 1024]);
    push(&mut l, "textual.token_embedding.weight", &[250002, 1024]);
    l
}

/// transformers `CLIPVisionModelWithProjection` names, as in ComfyUI's `clip_vision_h`.
fn clip_hf() -> List {
    let mut l = List::new();
    push(&mut l, "vision_model.embeddings.class_embedding", &[1280]);
    push(
        &mut l,
        "vision_model.embeddings.patch_embedding.weight",
        &[1280, 3, 14, 14],
    );
    push(
        &mut l,
        "vision_model.embeddings.position_embedding.weight",
        &[257, 1280],
    );
    for b in 0..32 {
        let p = format!("vision_model.encoder.layers.{b}");
        for x in ["q", "k", "v", "out"] {
            push(
                &mut l,
                format!("{p}.self_attn.{x}_proj.weight"),
                &[1280, 1280],
            );
        }
        push(&mut l, format!("{p}.mlp.fc1.weight"), &[5120, 1280]);
        push(&mut l, format!("{p}.mlp.fc2.weight"), &[1280, 5120]);
    }
    push(&mut l, "visual_projection.weight", &[1024, 1280]);
    l
}

#[test]
fn clip_vision_h_both_layouts() {
    for (l, layout, text) in [
        (clip_wan(), KeyLayout::Wan, true),
        (clip_hf(), KeyLayout::Diffusers, false),
    ] {
        let d = detect(metas(&l));
        assert_eq!((d.family, d.layout), (Family::ClipVision, layout));
        assert_eq!(
            d.config,
            Some(ModelConfig::Clip(ClipConfig {
                width: 1280,
                num_layers: 32,
                mlp_dim: Some(5120),
                patch_size: 14,
                num_positions: Some(257),
                image_size: Some(224),
                projection_dim: Some(1024),
                has_text_tower: text,
                size_name: Some("ViT-H/14"),
            }))
        );
    }
}

/// A LoRA on blocks 0..blocks of a 1.3B DiT: q/k/v/o of both attentions and both FFN linears.
fn lora(
    blocks: usize,
    rank: usize,
    key: impl Fn(usize, &str, &str) -> String,
    parts: [&str; 2],
    alpha: bool,
) -> List {
    let mut l = List::new();
    let dim = 1536;
    for b in 0..blocks {
        for (module, inp, out) in [
            ("self_attn.q", dim, dim),
            ("self_attn.k", dim, dim),
            ("self_attn.v", dim, dim),
            ("self_attn.o", dim, dim),
            ("cross_attn.q", dim, dim),
            ("cross_attn.k", dim, dim),
            ("cross_attn.v", dim, dim),
            ("cross_attn.o", dim, dim),
            ("ffn.0", dim, 8960),
            ("ffn.2", 8960, dim),
        ] {
            push(&mut l, key(b, module, parts[0]), &[rank, inp]);
            push(&mut l, key(b, module, parts[1]), &[out, rank]);
            if alpha {
                push(&mut l, key(b, module, "alpha"), &[]);
            }
        }
    }
    l
}

fn lora_cfg(d: &Detection) -> &LoraConfig {
    match &d.config {
        Some(ModelConfig::Lora(c)) => c,
        other => panic!("expected a LoRA config, got {other:?} ({:?})", d.notes),
    }
}

#[test]
fn lora_peft_a_b_with_diffusion_model_prefix() {
    let l = lora(
        30,
        32,
        |b, m, p| format!("diffusion_model.blocks.{b}.{m}.{p}.weight"),
        ["lora_A", "lora_B"],
        false,
    );
    let d = detect(metas(&l));
    assert_eq!(
        (d.family, d.layout, d.prefix.as_str()),
        (Family::WanLora, KeyLayout::Wan, "diffusion_model.")
    );
    let c = lora_cfg(&d);
    assert_eq!(c.format, LoraFormat::PeftAB);
    assert_eq!(c.ranks, [32]);
    assert_eq!((c.targets, c.blocks, c.alphas), (300, 30, 0));
    assert_eq!((c.base_dim, c.base_size), (Some(1536), Some("1.3B")));
}

#[test]
fn lora_down_up_with_alpha_and_diff_patches() {
    let alpha_key = |b: usize, m: &str, p: &str| {
        if p == "alpha" {
            format!("diffusion_model.blocks.{b}.{m}.alpha")
        } else {
            format!("diffusion_model.blocks.{b}.{m}.{p}.weight")
        }
    };
    let mut l = lora(2, 16, alpha_key, ["lora_down", "lora_up"], true);
    // CausVid / lightx2v-style bias and norm deltas.
    push(
        &mut l,
        "diffusion_model.blocks.0.self_attn.q.diff_b",
        &[1536],
    );
    push(&mut l, "diffusion_model.blocks.0.norm3.diff", &[1536]);
    let d = detect(metas(&l));
    assert_eq!((d.family, d.layout), (Family::WanLora, KeyLayout::Wan));
    let c = lora_cfg(&d);
    assert_eq!(c.format, LoraFormat::DownUp);
    assert_eq!(
        (c.ranks.as_slice(), c.alphas, c.diffs, c.bias_diffs),
        (&[16][..], 20, 1, 1)
    );
    assert_eq!(c.targets, 21, "20 linears + norm3");
}

#[test]
fn lora_kohya_and_wan_fun_flat_names() {
    let flat = |head: &'static str| {
        move |b: usize, m: &str, p: &str| {
            let module = m.replace('.', "_");
            if p == "alpha" {
                format!("{head}blocks_{b}_{module}.alpha")
            } else {
                format!("{head}blocks_{b}_{module}.{p}.weight")
            }
        }
    };
    for (head, format) in [
        ("lora_unet_", LoraFormat::KohyaFlat),
        ("lora_unet__", LoraFormat::WanFunFlat),
    ] {
        let l = lora(3, 8, flat(head), ["lora_down", "lora_up"], true);
        assert!(l
            .iter()
            .any(|(n, _, _)| n == &format!("{head}blocks_0_self_attn_q.lora_down.weight")));
        let d = detect(metas(&l));
        assert_eq!(
            (d.family, d.layout, d.prefix.as_str()),
            (Family::WanLora, KeyLayout::Wan, head)
        );
        let c = lora_cfg(&d);
        assert_eq!(
            (c.format, c.blocks, c.targets, c.alphas),
            (format, 3, 30, 30)
        );
        assert_eq!(c.base_dim, Some(1536));
    }
}

#[test]
fn lora_diffusers_native() {
    let l = lora(
        4,
        64,
        |b, m, p| {
            format!(
                "transformer.{}.{p}.weight",
                to_diffusers_dit(&format!("blocks.{b}.{m}"))
            )
        },
        ["lora_A", "lora_B"],
        false,
    );
    assert!(l
        .iter()
        .any(|(n, _, _)| n == "transformer.blocks.0.attn1.to_q.lora_A.weight"));
    let d = detect(metas(&l));
    assert_eq!(
        (d.family, d.layout, d.prefix.as_str()),
        (Family::WanLora, KeyLayout::Diffusers, "transformer.")
    );
    let c = lora_cfg(&d);
    assert_eq!(
        (c.format, c.ranks.as_slice(), c.blocks),
        (LoraFormat::PeftAB, &[64][..], 4)
    );
    assert_eq!(c.base_size, Some("1.3B"));
}

#[test]
fn lora_for_another_model_is_unknown() {
    // A Stable Diffusion UNet LoRA in kohya naming.
    let mut l = List::new();
    push(
        &mut l,
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        &[4, 320],
    );
    push(
        &mut l,
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
        &[320, 4],
    );
    let d = detect(metas(&l));
    assert_eq!(d.family, Family::Unknown);
    assert!(d.config.is_none());
    assert!(
        d.notes.iter().any(|n| n.contains("other than the Wan DiT")),
        "{:?}",
        d.notes
    );
}

#[test]
fn combined_checkpoint_picks_the_largest_component_and_notes_the_rest() {
    let mut l = renamed(&wan_dit(1536, 8960, 30, 16), |n| {
        format!("model.diffusion_model.{n}")
    });
    l.extend(renamed(&wan_vae(), |n| format!("first_stage_model.{n}")));
    let d = detect(metas(&l));
    assert_eq!(
        (d.family, d.prefix.as_str()),
        (Family::WanDitT2v, "model.diffusion_model.")
    );
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("Wan 2.1 VAE") && n.contains("first_stage_model.")),
        "{:?}",
        d.notes
    );
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("194 tensors are outside")),
        "{:?}",
        d.notes
    );
}

#[test]
fn unknown_and_empty() {
    let mut l = List::new();
    push(&mut l, "conv_in.weight", &[320, 4, 3, 3]);
    let d = detect(metas(&l));
    assert_eq!(
        (d.family, d.layout, d.config.clone()),
        (Family::Unknown, KeyLayout::Unknown, None)
    );
    let d = detect(std::iter::empty());
    assert_eq!(d.family, Family::Unknown);
    assert_eq!(d.notes, ["the file holds no tensors"]);
}
