//! ComfyUI workflows in API format (ComfyUI's "Export (API)": `{"id": {"class_type": …,
//! "inputs": {…}}}`, a link written `["id", output]`) made of the native Wan nodes, read into
//! the settings of a run: which files the loaders name, the prompts, the size and length, the
//! sampler's steps, guidance, shift, seed and denoise, the decoder's tile, and the images or the
//! clip the graph starts from.
//!
//! The graph is followed from its one sampler (`KSampler` or `KSamplerAdvanced`): its model
//! through `LoraLoaderModelOnly` and `ModelSamplingSD3` to `UNETLoader`, its conditioning
//! through `WanImageToVideo` / `WanFirstLastFrameToVideo` to `CLIPTextEncode` and
//! `CLIPLoader`, its latent to `EmptyHunyuanLatentVideo`, `VAEEncode` of a loaded video, the
//! image-to-video node, or Wan 2.2 TI2V's `Wan22ImageToVideoLatent`, and the decoder that
//! reads its output to `VAELoader`. Wan 2.2's A14B workflows have two `KSamplerAdvanced`, the
//! low-noise expert's continuing the high-noise expert's latents from the step where that one
//! stops: they become an expert pair switched at that step. A node vpipe does not know is bad
//! input naming every such node.

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::options::{ImageInputs, RunOptions};

/// The node types a workflow may hold.
const KNOWN_NODES: [&str; 22] = [
    "UNETLoader",
    "CLIPLoader",
    "VAELoader",
    "CLIPVisionLoader",
    "LoraLoaderModelOnly",
    "ModelSamplingSD3",
    "CLIPTextEncode",
    "CLIPVisionEncode",
    "EmptyHunyuanLatentVideo",
    "WanImageToVideo",
    "Wan22ImageToVideoLatent",
    "WanFirstLastFrameToVideo",
    "VAEEncode",
    "VAEDecode",
    "VAEDecodeTiled",
    "KSampler",
    "KSamplerAdvanced",
    "LoadImage",
    "LoadVideo",
    "GetVideoComponents",
    "CreateVideo",
    "SaveVideo",
];

/// Output nodes of formats vpipe does not write.
const OTHER_OUTPUTS: [&str; 2] = ["SaveAnimatedWEBP", "SaveWEBM"];

/// Where a workflow's file names resolve: ComfyUI's `models/` folder and its `input/` folder.
pub struct ComfyFolders<'a> {
    pub models: &'a Path,
    pub input: &'a Path,
}

/// A node's inputs, by name.
type Inputs = Map<String, Value>;

/// What [`Graph::follow`] calls on each node it passes: the node's type and inputs.
type Visit<'v> = dyn FnMut(&str, &Inputs) -> Result<()> + 'v;

/// A workflow's nodes by id.
struct Graph {
    nodes: Map<String, Value>,
}

impl Graph {
    fn bad(what: String) -> Error {
        Error::BadInput(format!("--comfy-workflow: {what}"))
    }

    /// Node `id`'s type and inputs.
    fn node(&self, id: &str) -> Result<(&str, &Map<String, Value>)> {
        let node = self
            .nodes
            .get(id)
            .ok_or_else(|| Self::bad(format!("a link to node {id}, which the workflow lacks")))?;
        let class = node["class_type"]
            .as_str()
            .ok_or_else(|| Self::bad(format!("node {id} has no class_type")))?;
        let inputs = node["inputs"]
            .as_object()
            .ok_or_else(|| Self::bad(format!("node {id} ({class}) has no inputs")))?;
        Ok((class, inputs))
    }

    /// The node (id, type, inputs) input `name` of `inputs` links to, and the output it takes.
    fn linked<'a>(
        &'a self,
        (class, inputs): (&str, &'a Map<String, Value>),
        name: &str,
    ) -> Result<(String, &'a str, &'a Map<String, Value>, u64)> {
        let link = inputs
            .get(name)
            .and_then(Value::as_array)
            .filter(|l| l.len() == 2)
            .ok_or_else(|| Self::bad(format!("{class}'s `{name}` is not a link [node, output]")))?;
        let id = match &link[0] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return Err(Self::bad(format!("{class}'s `{name}` links to no node id"))),
        };
        let output = link[1].as_u64().unwrap_or(0);
        let (linked_class, linked_inputs) = self.node(&id)?;
        Ok((id, linked_class, linked_inputs, output))
    }

    /// Follows input `name` through nodes of the types in `through` (each passing it on in the
    /// same input) to a node of type `to`; calls `visit` on every node passed.
    fn follow<'a>(
        &'a self,
        start: (&str, &'a Map<String, Value>),
        name: &str,
        (through, to): (&[&str], &str),
        visit: &mut Visit<'_>,
    ) -> Result<&'a Map<String, Value>> {
        let (mut class, mut inputs) = start;
        loop {
            let (_, next_class, next_inputs, _) = self.linked((class, inputs), name)?;
            if next_class == to {
                return Ok(next_inputs);
            }
            if !through.contains(&next_class) {
                return Err(Self::bad(format!(
                    "{class}'s `{name}` comes from a {next_class}, expected a {to}"
                )));
            }
            visit(next_class, next_inputs)?;
            (class, inputs) = (next_class, next_inputs);
        }
    }
}

fn number(inputs: &Map<String, Value>, class: &str, name: &str) -> Result<f64> {
    inputs
        .get(name)
        .and_then(Value::as_f64)
        .ok_or_else(|| Graph::bad(format!("{class}'s `{name}` is not a number")))
}

fn text<'a>(inputs: &'a Map<String, Value>, class: &str, name: &str) -> Result<&'a str> {
    inputs
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| Graph::bad(format!("{class}'s `{name}` is not text")))
}

/// The file `name` (a loader's choice) in the first of `folders` under `root` that holds it;
/// a name that leaves the folder (`..`, an absolute path) is refused.
fn file_in(root: &Path, folders: &[&str], class: &str, name: &str) -> Result<PathBuf> {
    let relative = Path::new(name);
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(Graph::bad(format!(
            "{class} names {name:?}, which leaves its folder"
        )));
    }
    folders
        .iter()
        .map(|f| root.join(f).join(relative))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Graph::bad(format!(
                "{class} names {name:?}, which is not in {} ({})",
                root.display(),
                folders.join(", ")
            ))
        })
}

/// Reads the workflow at `path` into `options`: the files its loaders name (under
/// `folders`), its prompts and settings. What the workflow does not set stays as the flags
/// gave it.
pub fn apply_comfy_workflow(
    path: &Path,
    folders: &ComfyFolders<'_>,
    options: &mut RunOptions,
) -> Result<()> {
    let text_of_file = crate::paths::read_settings_file("--comfy-workflow", path)?;
    let value: Value = serde_json::from_str(&text_of_file).map_err(|e| {
        Graph::bad(format!(
            "{}: not JSON ({e}); export the workflow with ComfyUI's \"Export (API)\"",
            path.display()
        ))
    })?;
    let nodes = value
        .as_object()
        .filter(|o| o.values().all(|n| n.get("class_type").is_some()))
        .ok_or_else(|| {
            Graph::bad(format!(
                "{}: not an API-format workflow (an object of nodes with class_type); export it \
                 with ComfyUI's \"Export (API)\"",
                path.display()
            ))
        })?
        .clone();
    let graph = Graph { nodes };
    if let Some(class) = graph
        .nodes
        .values()
        .filter_map(|n| n["class_type"].as_str())
        .find(|class| OTHER_OUTPUTS.contains(class))
    {
        return Err(Graph::bad(format!(
            "{class}: vpipe writes MP4, GIF, PNG frames or safetensors, named by --out; use \
             SaveVideo"
        )));
    }
    let mut unknown: Vec<String> = graph
        .nodes
        .iter()
        .filter_map(|(id, n)| {
            let class = n["class_type"].as_str().unwrap_or("?");
            (!KNOWN_NODES.contains(&class)).then(|| format!("{class} (node {id})"))
        })
        .collect();
    unknown.sort();
    if !unknown.is_empty() {
        return Err(Graph::bad(format!(
            "nodes vpipe does not run: {}; it runs {}",
            unknown.join(", "),
            KNOWN_NODES.join(", ")
        )));
    }
    let samplers: Vec<&String> = graph
        .nodes
        .iter()
        .filter(|(_, n)| {
            matches!(
                n["class_type"].as_str(),
                Some("KSampler" | "KSamplerAdvanced")
            )
        })
        .map(|(id, _)| id)
        .collect();
    // One sampler, or Wan 2.2's expert pair: two KSamplerAdvanced, the second continuing the
    // first's latents from the step where the first stops.
    let (sampler_id, low_noise_id) = match samplers[..] {
        [one] => (one.as_str(), None),
        [a, b] => {
            let continues = |from: &str, to: &str| -> Result<bool> {
                let node = graph.node(to)?;
                Ok(graph
                    .linked(node, "latent_image")
                    .is_ok_and(|(id, ..)| id == from))
            };
            if continues(a, b)? {
                (a.as_str(), Some(b.as_str()))
            } else if continues(b, a)? {
                (b.as_str(), Some(a.as_str()))
            } else {
                return Err(Graph::bad(
                    "two samplers, neither taking the other's latents: vpipe runs one sampler, \
                     or a Wan 2.2 expert pair (the low-noise KSamplerAdvanced continuing the \
                     high-noise one's latents)"
                        .into(),
                ));
            }
        }
        _ => {
            return Err(Graph::bad(format!(
                "{} samplers (KSampler or KSamplerAdvanced); vpipe runs a workflow with one, or \
                 Wan 2.2's two (high noise, then low noise)",
                samplers.len()
            )))
        }
    };
    let sampler = graph.node(sampler_id)?;
    let switch_step = apply_sampler(
        sampler,
        options,
        if low_noise_id.is_some() {
            SamplerPart::HighNoise
        } else {
            SamplerPart::Whole
        },
    )?;

    // The model: LoRAs and the flow shift on the way to the DiT.
    let ModelChain { dit, loras, shift } = model_chain(&graph, sampler, folders)?;
    options.dit = Some(dit);
    options.loras = loras;
    if let Some(shift) = shift {
        options.shift = shift;
        options.shift_given = true;
    }

    // The prompts, through the image-to-video node when there is one.
    let prompt = |sampler: (&str, &Map<String, Value>), name: &str| -> Result<(String, PathBuf)> {
        let encode = graph.follow(
            sampler,
            name,
            (
                &["WanImageToVideo", "WanFirstLastFrameToVideo"],
                "CLIPTextEncode",
            ),
            &mut |_, _| Ok(()),
        )?;
        let clip = graph.follow(
            ("CLIPTextEncode", encode),
            "clip",
            (&[], "CLIPLoader"),
            &mut |_, _| Ok(()),
        )?;
        let encoder = file_in(
            folders.models,
            &["text_encoders", "clip"],
            "CLIPLoader",
            text(clip, "CLIPLoader", "clip_name")?,
        )?;
        Ok((text(encode, "CLIPTextEncode", "text")?.to_owned(), encoder))
    };
    let (positive, encoder) = prompt(sampler, "positive")?;
    let (negative, _) = prompt(sampler, "negative")?;
    options.prompt = positive;
    options.negative_prompt = negative;
    options.text_encoder = Some(encoder);

    apply_latent(&graph, sampler, folders, options)?;
    let decoded = match (low_noise_id, switch_step) {
        (Some(id), Some(switch_step)) => {
            let low = graph.node(id)?;
            for name in ["positive", "negative"] {
                if prompt(low, name)?.0 != prompt(sampler, name)?.0 {
                    return Err(Graph::bad(format!(
                        "the two samplers' {name} prompts differ; vpipe's expert pair shares \
                         one prompt"
                    )));
                }
            }
            apply_low_noise(&graph, low, switch_step, folders, options)?;
            id
        }
        _ => sampler_id,
    };
    apply_decoder(&graph, decoded, folders, options)
}

/// Which steps of the workflow a sampler takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SamplerPart {
    /// All of them, from noise.
    Whole,
    /// A Wan 2.2 pair's high-noise expert: from noise to the switch step, handing over its
    /// latents with their noise left in (the low-noise expert takes the rest).
    HighNoise,
}

/// What a sampler's `model` input comes from.
struct ModelChain {
    dit: PathBuf,
    /// Closest to the model first, as ComfyUI applies them.
    loras: Vec<(PathBuf, f64)>,
    /// The flow shift, when the chain sets one.
    shift: Option<f64>,
}

/// The DiT the sampler's `model` comes from, through `LoraLoaderModelOnly` and
/// `ModelSamplingSD3`, with the LoRAs and the shift on the way.
fn model_chain(
    graph: &Graph,
    sampler: (&str, &Map<String, Value>),
    folders: &ComfyFolders<'_>,
) -> Result<ModelChain> {
    let mut loras = Vec::new();
    let mut shift = None;
    let unet = graph.follow(
        sampler,
        "model",
        (&["LoraLoaderModelOnly", "ModelSamplingSD3"], "UNETLoader"),
        &mut |class, inputs| {
            match class {
                "LoraLoaderModelOnly" => loras.push((
                    file_in(
                        folders.models,
                        &["loras"],
                        class,
                        text(inputs, class, "lora_name")?,
                    )?,
                    number(inputs, class, "strength_model")?,
                )),
                _ => shift = Some(number(inputs, class, "shift")?),
            }
            Ok(())
        },
    )?;
    let dit = file_in(
        folders.models,
        &["diffusion_models", "unet"],
        "UNETLoader",
        text(unet, "UNETLoader", "unet_name")?,
    )?;
    loras.reverse();
    Ok(ModelChain { dit, loras, shift })
}

/// The low-noise expert of a two-sampler workflow: its DiT, LoRAs and guidance, and the
/// boundary that hands it the steps from `switch_step` on. vpipe switches experts at a
/// timestep (diffusers' `boundary_ratio`), so the boundary is placed between the timesteps of
/// the steps either side of the switch, on the schedule the run will use.
fn apply_low_noise(
    graph: &Graph,
    low: (&str, &Map<String, Value>),
    switch_step: usize,
    folders: &ComfyFolders<'_>,
    options: &mut RunOptions,
) -> Result<()> {
    let node = read_sampler(low)?;
    let fits = node.class == "KSamplerAdvanced"
        && !node.add_noise
        && node.start == switch_step
        && node.end == node.steps
        && node.steps == options.steps
        && node.kind == options.sampler;
    if !fits {
        return Err(Graph::bad(format!(
            "the low-noise {} takes steps {} to {} of {} (add_noise {}, {:?}); after the \
             high-noise sampler's {switch_step} of {} steps ({:?}) it must take the rest of \
             the same schedule, adding no noise",
            node.class,
            node.start,
            node.end,
            node.steps,
            node.add_noise,
            node.kind,
            options.steps,
            options.sampler
        )));
    }
    let ModelChain { dit, loras, shift } = model_chain(graph, low, folders)?;
    if let Some(low_shift) = shift {
        if options.shift_given && low_shift != options.shift {
            return Err(Graph::bad(format!(
                "the experts' ModelSamplingSD3 shifts differ ({} and {low_shift}); vpipe samples \
                 the pair on one schedule",
                options.shift
            )));
        }
        options.shift = low_shift;
        options.shift_given = true;
    }
    let image_to_video = options.image.is_some();
    let shift = if options.shift_given {
        options.shift
    } else {
        crate::options::LowNoiseExpert::default_shift(image_to_video)
    };
    let schedule = vpipe_sampling::Schedule::new(options.sampler, options.steps, shift)?;
    let t = schedule.timesteps();
    let boundary = (t[switch_step - 1] + t[switch_step]) / 2000.0;
    options.low_noise = Some(crate::options::LowNoiseExpert {
        dit: Some(dit),
        config: None,
        boundary,
        guidance: node.guidance,
        loras,
    });
    Ok(())
}

/// What a sampler node sets: its steps, guidance, seed and sampler, the steps it takes
/// (`start..end`; a KSampler takes them all) and whether it adds the noise.
struct SamplerNode {
    class: String,
    steps: usize,
    guidance: f64,
    seed: Option<u64>,
    kind: vpipe_sampling::SamplerKind,
    start: usize,
    end: usize,
    add_noise: bool,
}

fn read_sampler((class, inputs): (&str, &Map<String, Value>)) -> Result<SamplerNode> {
    let step_count = |name: &str| -> Result<usize> {
        let value = number(inputs, class, name)?;
        if value < 0.0 || value.fract() != 0.0 {
            return Err(Graph::bad(format!(
                "{class}'s {name} {value}: expected a whole number of steps"
            )));
        }
        Ok(value.min(1e6) as usize)
    };
    let steps = step_count("steps")?;
    if !(1..=1000).contains(&steps) {
        return Err(Graph::bad(format!(
            "{class}'s steps {steps}: expected 1 to 1000"
        )));
    }
    let advanced = class == "KSamplerAdvanced";
    let seed_name = if advanced { "noise_seed" } else { "seed" };
    let add_noise = !advanced || text(inputs, class, "add_noise")? == "enable";
    // A sampler that adds no noise does not use its seed.
    let seed = match inputs.get(seed_name).and_then(Value::as_u64) {
        None if add_noise => {
            return Err(Graph::bad(format!("{class}'s `{seed_name}` is not a seed")))
        }
        seed => seed,
    };
    let kind = match text(inputs, class, "sampler_name")? {
        "euler" => vpipe_sampling::SamplerKind::Euler,
        "uni_pc" | "uni_pc_bh2" => vpipe_sampling::SamplerKind::UniPc,
        other => {
            return Err(Graph::bad(format!(
                "{class}'s sampler_name {other:?}: vpipe has euler, uni_pc and uni_pc_bh2"
            )))
        }
    };
    let scheduler = text(inputs, class, "scheduler")?;
    if !matches!(scheduler, "simple" | "normal") {
        return Err(Graph::bad(format!(
            "{class}'s scheduler {scheduler:?}: vpipe's flow schedule is ComfyUI's simple \
             (or normal)"
        )));
    }
    let (start, end) = if advanced {
        (step_count("start_at_step")?, step_count("end_at_step")?)
    } else {
        (0, steps)
    };
    Ok(SamplerNode {
        class: class.to_owned(),
        steps,
        guidance: number(inputs, class, "cfg")?,
        seed,
        kind,
        start,
        end: end.min(steps),
        add_noise,
    })
}

/// The steps, guidance, seed and sampler of the sampler that starts from noise (the only one,
/// or a Wan 2.2 pair's high-noise expert) into `options`; its denoise (below 1: video-to-video's
/// strength) is kept for the latent. Returns the step where a high-noise expert hands over.
fn apply_sampler(
    sampler: (&str, &Map<String, Value>),
    options: &mut RunOptions,
    part: SamplerPart,
) -> Result<Option<usize>> {
    let node = read_sampler(sampler)?;
    let class = &node.class;
    let switch_step = match part {
        SamplerPart::Whole if node.add_noise && node.start == 0 && node.end == node.steps => None,
        SamplerPart::HighNoise
            if node.add_noise && node.start == 0 && node.end > 0 && node.end < node.steps =>
        {
            Some(node.end)
        }
        _ => {
            return Err(Graph::bad(format!(
                "{class} from step {} to {} of {} (add_noise {}): vpipe runs every step from \
                 noise, or a Wan 2.2 pair whose high-noise sampler takes the first steps from \
                 noise and whose low-noise sampler the rest",
                node.start, node.end, node.steps, node.add_noise
            )))
        }
    };
    options.steps = node.steps;
    options.guidance = node.guidance;
    options.seed = node.seed.unwrap_or_default();
    options.sampler = node.kind;
    Ok(switch_step)
}

/// What the sampler starts from: an empty latent (text-to-video), a video's latents
/// (video-to-video, at the sampler's denoise), or an image-to-video node's.
fn apply_latent(
    graph: &Graph,
    sampler: (&str, &Map<String, Value>),
    folders: &ComfyFolders<'_>,
    options: &mut RunOptions,
) -> Result<()> {
    let (_, class, inputs, _) = graph.linked(sampler, "latent_image")?;
    let denoise = sampler
        .1
        .get("denoise")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let size = |options: &mut RunOptions| -> Result<()> {
        let (w, h, length) = (
            number(inputs, class, "width")?,
            number(inputs, class, "height")?,
            number(inputs, class, "length")?,
        );
        for (what, v) in [("width", w), ("height", h)] {
            if !(16.0..=4096.0).contains(&v) || v % 16.0 != 0.0 {
                return Err(Graph::bad(format!(
                    "{class}'s {what} {v}: expected a multiple of 16 from 16 to 4096"
                )));
            }
        }
        if length < 1.0 || (length - 1.0) % 4.0 != 0.0 {
            return Err(Graph::bad(format!(
                "{class}'s length {length}: expected 4k+1 frames"
            )));
        }
        (options.width, options.height, options.frames) = (w as usize, h as usize, length as usize);
        Ok(())
    };
    let image = |name: &str| -> Result<PathBuf> {
        let load = graph.follow(
            (class, inputs),
            name,
            (&[], "LoadImage"),
            &mut |_, _| Ok(()),
        )?;
        file_in(
            folders.input,
            &["."],
            "LoadImage",
            text(load, "LoadImage", "image")?,
        )
    };
    match class {
        "EmptyHunyuanLatentVideo" => size(options)?,
        "VAEEncode" => {
            // The frames of a loaded video, straight or through GetVideoComponents.
            let (_, source, source_inputs, _) = graph.linked((class, inputs), "pixels")?;
            let load = match source {
                "GetVideoComponents" => graph.follow(
                    (source, source_inputs),
                    "video",
                    (&[], "LoadVideo"),
                    &mut |_, _| Ok(()),
                )?,
                _ => graph.follow(
                    (class, inputs),
                    "pixels",
                    (&[], "LoadVideo"),
                    &mut |_, _| Ok(()),
                )?,
            };
            let video = file_in(
                folders.input,
                &["."],
                "LoadVideo",
                text(load, "LoadVideo", "file")?,
            )?;
            if !(denoise > 0.0 && denoise <= 1.0) {
                return Err(Graph::bad(format!(
                    "the sampler's denoise {denoise}: expected above 0, at most 1"
                )));
            }
            options.input = Some((video, denoise));
        }
        // Wan 2.2 TI2V-5B's latent: the empty video, or with `start_image` the image as its
        // first latent frame.
        "Wan22ImageToVideoLatent" => {
            size(options)?;
            if inputs.contains_key("start_image") {
                let first = image("start_image")?;
                options.image = Some(ImageInputs { first, last: None });
            }
        }
        "WanImageToVideo" | "WanFirstLastFrameToVideo" => {
            size(options)?;
            let first = image("start_image")?;
            let last = (class == "WanFirstLastFrameToVideo")
                .then(|| image("end_image"))
                .transpose()?;
            options.image = Some(ImageInputs { first, last });
            if inputs.contains_key("clip_vision_output")
                || inputs.contains_key("clip_vision_start_image")
            {
                let name = if inputs.contains_key("clip_vision_output") {
                    "clip_vision_output"
                } else {
                    "clip_vision_start_image"
                };
                let encode = graph.follow(
                    (class, inputs),
                    name,
                    (&[], "CLIPVisionEncode"),
                    &mut |_, _| Ok(()),
                )?;
                let loader = graph.follow(
                    ("CLIPVisionEncode", encode),
                    "clip_vision",
                    (&[], "CLIPVisionLoader"),
                    &mut |_, _| Ok(()),
                )?;
                options.clip_vision = Some(file_in(
                    folders.models,
                    &["clip_vision"],
                    "CLIPVisionLoader",
                    text(loader, "CLIPVisionLoader", "clip_name")?,
                )?);
            }
        }
        other => {
            return Err(Graph::bad(format!(
                "the sampler's latent_image comes from a {other}; vpipe starts from \
                 EmptyHunyuanLatentVideo, VAEEncode, WanImageToVideo, WanFirstLastFrameToVideo or \
                 Wan22ImageToVideoLatent"
            )))
        }
    }
    if class != "VAEEncode" && denoise != 1.0 {
        return Err(Graph::bad(format!(
            "the sampler's denoise {denoise} without a video to denoise: expected 1"
        )));
    }
    Ok(())
}

/// The decoder that reads the sampler's latents: its VAE file, and its tile.
fn apply_decoder(
    graph: &Graph,
    sampler_id: &str,
    folders: &ComfyFolders<'_>,
    options: &mut RunOptions,
) -> Result<()> {
    let decoder = graph
        .nodes
        .iter()
        .filter(|(_, n)| {
            matches!(
                n["class_type"].as_str(),
                Some("VAEDecode" | "VAEDecodeTiled")
            ) && n["inputs"]["samples"][0].as_str() == Some(sampler_id)
        })
        .map(|(id, _)| id.clone())
        .next()
        .ok_or_else(|| {
            Graph::bad("no VAEDecode or VAEDecodeTiled reads the sampler's latents".into())
        })?;
    let (class, inputs) = graph.node(&decoder)?;
    let vae = graph.follow((class, inputs), "vae", (&[], "VAELoader"), &mut |_, _| {
        Ok(())
    })?;
    options.vae = Some(file_in(
        folders.models,
        &["vae"],
        "VAELoader",
        text(vae, "VAELoader", "vae_name")?,
    )?);
    if class == "VAEDecodeTiled" {
        let tile = number(inputs, class, "tile_size")? as usize;
        let overlap = number(inputs, class, "overlap")? as usize;
        let tiles = vpipe_models::tiling::TileSpec {
            tile,
            stride: tile.saturating_sub(overlap),
            layout: options.tiles.layout,
        };
        tiles.validate().map_err(|e| {
            Graph::bad(format!(
                "VAEDecodeTiled's tile_size {tile}, overlap {overlap}: {e}"
            ))
        })?;
        options.tiles = tiles;
    }
    Ok(())
}
