//! `vpipe run --comfy-workflow`: ComfyUI API-format workflows of the native Wan nodes, written
//! here as ComfyUI exports them, on the built-in model laid out as ComfyUI's `models/` folder.
//! Each run equals the `vpipe run` with the same settings given as flags, bit for bit.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

mod common;
use common::{fixture, load, max_abs, vpipe};

/// The built-in model (`vpipe demo`'s weights, text-to-video or, with `image`, image-to-video)
/// as ComfyUI's folders: `models/{diffusion_models,text_encoders,vae,loras,clip_vision}` and
/// `input/`. Returns the ComfyUI folder and the tokenizer.json.
fn comfy_folder(dir: &Path, image: bool) -> (PathBuf, PathBuf) {
    comfy_folder_of(dir, "wan2.1", if image { "i2v" } else { "v2v" })
}

/// [`comfy_folder`] of the built-in `model` (`vpipe demo --model`) in `mode`.
fn comfy_folder_of(dir: &Path, model: &str, mode: &str) -> (PathBuf, PathBuf) {
    let demo = dir.join("demo");
    let run = vpipe(&[
        "demo",
        "--model",
        model,
        "--mode",
        mode,
        "--steps",
        "2",
        "--out",
        demo.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let comfy = dir.join("ComfyUI");
    for sub in [
        "models/diffusion_models",
        "models/text_encoders",
        "models/vae",
        "models/loras",
        "models/clip_vision",
        "input",
    ] {
        std::fs::create_dir_all(comfy.join(sub)).unwrap();
    }
    for entry in std::fs::read_dir(demo.join("weights")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let folder = match name.split('-').next().unwrap() {
            "wan2.1" | "wan2.2" if name.contains("vae") => "vae",
            "wan2.1" | "wan2.2" => "diffusion_models",
            "umt5" => "text_encoders",
            "lora" => "loras",
            "clip" => "clip_vision",
            _ => continue,
        };
        std::fs::copy(&path, comfy.join("models").join(folder).join(&name)).unwrap();
    }
    (comfy, demo.join("weights/tokenizer.json"))
}

/// The one file in `comfy/models/folder`, by name.
fn model_name(comfy: &Path, folder: &str) -> String {
    let entry = std::fs::read_dir(comfy.join("models").join(folder))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    entry.file_name().to_str().unwrap().to_owned()
}

const PROMPT: &str = "a red kite over the sea";
const NEGATIVE: &str = "blurry, static";

/// The loaders, LoRA, shift, prompts and sampler of a Wan workflow, the sampler's
/// conditioning from the links `positive` and `negative` and its latent from node "10"; the
/// caller adds "10" and what it needs.
fn workflow(comfy: &Path, positive: Value, negative: Value) -> Value {
    json!({
        "1": {"class_type": "UNETLoader", "inputs": {
            "unet_name": model_name(comfy, "diffusion_models"), "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {
            "clip_name": model_name(comfy, "text_encoders"), "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": model_name(comfy, "vae")}},
        "4": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": model_name(comfy, "loras"), "strength_model": 0.8}},
        "5": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": 3.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["2", 0]}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "positive": positive, "negative": negative,
            "latent_image": ["10", 0], "seed": 7, "steps": 2, "cfg": 5.0,
            "sampler_name": "uni_pc", "scheduler": "simple", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "11": {"class_type": "CreateVideo", "inputs": {"images": ["9", 0], "fps": 16}},
        "12": {"class_type": "SaveVideo", "inputs": {
            "video": ["11", 0], "filename_prefix": "vpipe", "format": "mp4", "codec": "h264"}},
    })
}

/// Runs `args` and returns the output's video; the run must succeed.
fn video_of(args: &[&str], out: &Path) -> candle_core::Tensor {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--out", out.to_str().unwrap()]);
    let run = vpipe(&all);
    assert!(
        run.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    load(out)["video"].clone()
}

/// Runs the workflow (with `beside` flags, for what it leaves open) and the same settings as
/// flags, and checks the videos are equal.
fn check_equal(
    dir: &Path,
    (comfy, tokenizer): (&Path, &Path),
    (graph, beside): (&Value, &[&str]),
    flags: &[&str],
) {
    let file = dir.join("workflow_api.json");
    std::fs::write(&file, serde_json::to_string_pretty(graph).unwrap()).unwrap();
    let models = comfy.join("models");
    let mut args = vec![
        "run",
        "--comfy-workflow",
        file.to_str().unwrap(),
        "--comfy-models",
        models.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
    ];
    args.extend_from_slice(beside);
    let from_workflow = video_of(&args, &dir.join("workflow.safetensors"));
    let file_of = |folder: &str| {
        models
            .join(folder)
            .join(model_name(comfy, folder))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let lora = format!("{}:0.8", file_of("loras"));
    let (dit, vae, text) = (
        file_of("diffusion_models"),
        file_of("vae"),
        file_of("text_encoders"),
    );
    let mut args = vec![
        "run",
        "--dit",
        &dit,
        "--vae",
        &vae,
        "--text-encoder",
        &text,
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--lora",
        &lora,
        "--shift",
        "3",
        "--prompt",
        PROMPT,
        "--negative-prompt",
        NEGATIVE,
        "--seed",
        "7",
        "--steps",
        "2",
        "--cfg",
        "5",
        "--sampler",
        "unipc",
    ];
    args.extend_from_slice(flags);
    let from_flags = video_of(&args, &dir.join("flags.safetensors"));
    assert_eq!(max_abs(&from_workflow, &from_flags), 0.0);
}

#[test]
fn a_text_to_video_workflow_equals_the_same_run_by_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (comfy, tokenizer) = comfy_folder(dir.path(), false);
    let mut graph = workflow(&comfy, json!(["6", 0]), json!(["7", 0]));
    graph["10"] = json!({"class_type": "EmptyHunyuanLatentVideo", "inputs": {
        "width": 96, "height": 64, "length": 9, "batch_size": 1}});
    check_equal(
        dir.path(),
        (&comfy, &tokenizer),
        (&graph, &[]),
        &["--size", "96x64", "--frames", "9"],
    );
}

/// The seed's graph: loaders → LoRA → ModelSamplingSD3 → CLIPTextEncode → VAEEncode of a
/// loaded video → KSampler at denoise 0.6 → VAEDecodeTiled → SaveVideo.
#[test]
fn a_video_to_video_workflow_equals_the_same_run_by_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (comfy, tokenizer) = comfy_folder(dir.path(), false);
    let clip = fixture("vpipe-video", "wan21-cheesecake-832x480x81-h264.mp4");
    std::fs::copy(&clip, comfy.join("input/clip.mp4")).unwrap();
    let mut graph = workflow(&comfy, json!(["6", 0]), json!(["7", 0]));
    graph["8"]["inputs"]["denoise"] = json!(0.6);
    graph["13"] = json!({"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}});
    graph["14"] = json!({"class_type": "GetVideoComponents", "inputs": {"video": ["13", 0]}});
    graph["10"] = json!({"class_type": "VAEEncode", "inputs": {
        "pixels": ["14", 0], "vae": ["3", 0]}});
    let stride = vpipe_models::tiling::default_stride(64);
    graph["9"] = json!({"class_type": "VAEDecodeTiled", "inputs": {
        "samples": ["8", 0], "vae": ["3", 0], "tile_size": 64, "overlap": 64 - stride,
        "temporal_size": 64, "temporal_overlap": 8}});
    let input = comfy.join("input/clip.mp4");
    // The workflow sets no size or length for a loaded video: given beside it.
    let beside = ["--size", "96x64", "--frames", "9"];
    check_equal(
        dir.path(),
        (&comfy, &tokenizer),
        (&graph, &beside),
        &[
            "--input",
            input.to_str().unwrap(),
            "--strength",
            "0.6",
            "--size",
            "96x64",
            "--frames",
            "9",
            "--tile",
            "64",
        ],
    );
}

#[test]
fn an_image_to_video_workflow_equals_the_same_run_by_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (comfy, tokenizer) = comfy_folder(dir.path(), true);
    let first = fixture("vpipe", "pipeline_i2v/first.png");
    std::fs::copy(&first, comfy.join("input/first.png")).unwrap();
    // The image-to-video node's outputs: positive, negative, latent.
    let mut graph = workflow(&comfy, json!(["15", 0]), json!(["15", 1]));
    graph["13"] = json!({"class_type": "CLIPVisionLoader", "inputs": {
        "clip_name": model_name(&comfy, "clip_vision")}});
    graph["14"] = json!({"class_type": "LoadImage", "inputs": {"image": "first.png"}});
    graph["16"] = json!({"class_type": "CLIPVisionEncode", "inputs": {
        "clip_vision": ["13", 0], "image": ["14", 0], "crop": "center"}});
    graph["15"] = json!({"class_type": "WanImageToVideo", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "vae": ["3", 0],
        "clip_vision_output": ["16", 0], "start_image": ["14", 0],
        "width": 64, "height": 48, "length": 9, "batch_size": 1}});
    graph["8"]["inputs"]["latent_image"] = json!(["15", 2]);
    let clip = comfy
        .join("models/clip_vision")
        .join(model_name(&comfy, "clip_vision"));
    let image = comfy.join("input/first.png");
    check_equal(
        dir.path(),
        (&comfy, &tokenizer),
        (&graph, &[]),
        &[
            "--image",
            image.to_str().unwrap(),
            "--clip-vision",
            clip.to_str().unwrap(),
            "--size",
            "64x48",
            "--frames",
            "9",
        ],
    );
}

#[test]
fn a_wan22_ti2v_workflow_equals_the_same_run_by_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (comfy, tokenizer) = comfy_folder_of(dir.path(), "wan2.2-ti2v", "t2v");
    // Text-to-video: the TI2V latent node without an image.
    let mut graph = workflow(&comfy, json!(["6", 0]), json!(["7", 0]));
    graph["10"] = json!({"class_type": "Wan22ImageToVideoLatent", "inputs": {
        "vae": ["3", 0], "width": 64, "height": 64, "length": 5, "batch_size": 1}});
    check_equal(
        dir.path(),
        (&comfy, &tokenizer),
        (&graph, &[]),
        &["--size", "64x64", "--frames", "5"],
    );
    // Image-to-video: its start_image, the first latent frame.
    std::fs::copy(
        fixture("vpipe", "pipeline_i2v/first.png"),
        comfy.join("input/first.png"),
    )
    .unwrap();
    graph["14"] = json!({"class_type": "LoadImage", "inputs": {"image": "first.png"}});
    graph["10"]["inputs"]["start_image"] = json!(["14", 0]);
    let image = comfy.join("input/first.png");
    check_equal(
        dir.path(),
        (&comfy, &tokenizer),
        (&graph, &[]),
        &[
            "--image",
            image.to_str().unwrap(),
            "--size",
            "64x64",
            "--frames",
            "5",
        ],
    );
}

/// The one file in `comfy/models/diffusion_models` whose name holds `part`.
fn expert_name(comfy: &Path, part: &str) -> String {
    std::fs::read_dir(comfy.join("models/diffusion_models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_owned())
        .find(|n| n.contains(part))
        .unwrap()
}

#[test]
fn a_wan22_expert_pair_workflow_equals_the_same_run_by_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (comfy, tokenizer) = comfy_folder_of(dir.path(), "wan2.2", "t2v");
    let (high, low) = (
        expert_name(&comfy, "high_noise"),
        expert_name(&comfy, "low_noise"),
    );
    // ComfyUI's Wan 2.2 template: two model chains, the high-noise KSamplerAdvanced takes
    // steps 0 to 2 of 4 from noise and hands its latents, noise left in, to the low-noise one.
    let mut graph = workflow(&comfy, json!(["6", 0]), json!(["7", 0]));
    graph["1"]["inputs"]["unet_name"] = json!(high);
    graph["21"] = json!({"class_type": "UNETLoader", "inputs": {
        "unet_name": low, "weight_dtype": "default"}});
    graph["25"] = json!({"class_type": "ModelSamplingSD3", "inputs": {
        "model": ["21", 0], "shift": 3.0}});
    graph["10"] = json!({"class_type": "EmptyHunyuanLatentVideo", "inputs": {
        "width": 64, "height": 64, "length": 5, "batch_size": 1}});
    graph["8"] = json!({"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["5", 0], "add_noise": "enable", "noise_seed": 7, "steps": 4, "cfg": 5.0,
        "sampler_name": "euler", "scheduler": "simple", "positive": ["6", 0],
        "negative": ["7", 0], "latent_image": ["10", 0], "start_at_step": 0,
        "end_at_step": 2, "return_with_leftover_noise": "enable"}});
    graph["18"] = json!({"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["25", 0], "add_noise": "disable", "noise_seed": 0, "steps": 4, "cfg": 3.0,
        "sampler_name": "euler", "scheduler": "simple", "positive": ["6", 0],
        "negative": ["7", 0], "latent_image": ["8", 0], "start_at_step": 2,
        "end_at_step": 10000, "return_with_leftover_noise": "disable"}});
    graph["9"]["inputs"]["samples"] = json!(["18", 0]);

    // The switch after step 2 of 4 on this schedule: between its second and third timesteps.
    let schedule =
        vpipe_sampling::Schedule::new(vpipe_sampling::SamplerKind::Euler, 4, 3.0).unwrap();
    let t = schedule.timesteps();
    let boundary = ((t[1] + t[2]) / 2000.0).to_string();
    let low_path = comfy.join("models/diffusion_models").join(&low);
    let high_path = comfy.join("models/diffusion_models").join(&high);
    let report = dir.path().join("pair.json");
    check_equal(
        dir.path(),
        (&comfy, &tokenizer),
        (&graph, &["--report", report.to_str().unwrap()]),
        &[
            "--dit",
            high_path.to_str().unwrap(),
            "--dit-low-noise",
            low_path.to_str().unwrap(),
            "--boundary",
            &boundary,
            "--cfg-low-noise",
            "3",
            "--sampler",
            "euler",
            "--steps",
            "4",
            "--size",
            "64x64",
            "--frames",
            "5",
        ],
    );
    // Each expert took its two steps.
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    for phase in ["sample high noise", "sample low noise"] {
        let steps = report["notes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["phase"] == phase && n["what"] == "step")
            .count();
        assert_eq!(steps, 2, "{phase}");
    }

    // A low-noise sampler that does not continue where the high-noise one stopped is refused.
    graph["18"]["inputs"]["start_at_step"] = json!(3);
    let file = dir.path().join("gap.json");
    std::fs::write(&file, graph.to_string()).unwrap();
    let models = comfy.join("models");
    let out = dir.path().join("gap.safetensors");
    let run = vpipe(&[
        "run",
        "--comfy-workflow",
        file.to_str().unwrap(),
        "--comfy-models",
        models.to_str().unwrap(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("low-noise KSamplerAdvanced takes steps 3"),
        "{stderr}"
    );
}

/// Unknown nodes are listed, a loader's file that leaves its folder is refused: exit 2.
#[test]
fn unknown_nodes_and_escaping_names_are_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (comfy, tokenizer) = comfy_folder(dir.path(), false);
    let models = comfy.join("models");
    let run = |graph: &Value| {
        let file = dir.path().join("bad.json");
        std::fs::write(&file, graph.to_string()).unwrap();
        let out = dir.path().join("bad.safetensors");
        let result = vpipe(&[
            "run",
            "--comfy-workflow",
            file.to_str().unwrap(),
            "--comfy-models",
            models.to_str().unwrap(),
            "--tokenizer",
            tokenizer.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!out.exists());
        (
            result.status.code(),
            String::from_utf8_lossy(&result.stderr).into_owned(),
        )
    };
    let mut graph = workflow(&comfy, json!(["6", 0]), json!(["7", 0]));
    graph["10"] = json!({"class_type": "EmptyHunyuanLatentVideo", "inputs": {
        "width": 96, "height": 64, "length": 9, "batch_size": 1}});
    graph["20"] = json!({"class_type": "WanVideoTeaCache", "inputs": {}});
    let (code, stderr) = run(&graph);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("WanVideoTeaCache (node 20)"), "{stderr}");
    graph["20"] = json!({"class_type": "SaveWEBM", "inputs": {}});
    let (code, stderr) = run(&graph);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("SaveWEBM: vpipe writes MP4"), "{stderr}");
    graph.as_object_mut().unwrap().remove("20");
    graph["1"]["inputs"]["unet_name"] = json!("../../etc/passwd");
    let (code, stderr) = run(&graph);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("leaves its folder"), "{stderr}");
}
