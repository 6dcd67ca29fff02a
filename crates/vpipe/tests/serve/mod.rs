//! A real `vpipe serve` on loopback for the server's tests, and a minimal HTTP/1.1 client
//! (one request per connection) that can also send what a well-behaved client would not.
#![allow(dead_code)] // each server test binary uses part of it

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A `vpipe serve` child process, stopped (SIGTERM, then waited for) when dropped.
pub struct Server {
    child: Child,
    pub address: SocketAddr,
}

impl Server {
    /// Starts `vpipe serve --models MODELS --outputs OUTPUTS` on a free loopback port.
    pub fn start(models: &Path, outputs: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vpipe"))
            .args(["serve", "--listen", "127.0.0.1:0", "--models"])
            .arg(models)
            .arg("--outputs")
            .arg(outputs)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .trim()
            .strip_prefix("vpipe serve: listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        Self { child, address }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Sends `request` (the whole HTTP request) and returns the status and the body.
    pub fn raw(&self, request: &[u8]) -> (u16, Vec<u8>) {
        let mut stream = TcpStream::connect(self.address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        // The server may answer (413) before it has read the whole body, and close.
        let _ = stream.write_all(request);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        parse_response(&answer)
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.address,
            body.len()
        )
        .into_bytes();
        if !content_type.is_empty() {
            request.extend(format!("Content-Type: {content_type}\r\n").as_bytes());
        }
        request.extend(b"\r\n");
        request.extend(body);
        self.raw(&request)
    }

    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        self.request("GET", path, "", b"")
    }

    pub fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// Submits a job as JSON; the status and the answer.
    pub fn submit(&self, settings: &Value) -> (u16, Value) {
        let (status, body) = self.request(
            "POST",
            "/api/jobs",
            "application/json",
            settings.to_string().as_bytes(),
        );
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// Submits a job as multipart: the settings and `(part name, bytes)` uploads.
    pub fn submit_multipart(&self, settings: &Value, uploads: &[(&str, &[u8])]) -> (u16, Value) {
        let settings = settings.to_string();
        let mut parts: Vec<(&str, Option<String>, &[u8])> =
            vec![("settings", None, settings.as_bytes())];
        parts.extend(
            uploads
                .iter()
                .map(|(name, bytes)| (*name, Some(format!("{name}.bin")), *bytes)),
        );
        self.submit_parts(&parts)
    }

    /// Submits a job as multipart parts `(name, file name, bytes)`.
    pub fn submit_parts(&self, parts: &[(&str, Option<String>, &[u8])]) -> (u16, Value) {
        let boundary = "vpipe-test-boundary-7d1f";
        let mut body = Vec::new();
        for (name, file_name, bytes) in parts {
            body.extend(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"")
                    .as_bytes(),
            );
            if let Some(file_name) = file_name {
                body.extend(
                    format!("; filename=\"{file_name}\"\r\nContent-Type: application/octet-stream")
                        .as_bytes(),
                );
            }
            body.extend(b"\r\n\r\n");
            body.extend(*bytes);
            body.extend(b"\r\n");
        }
        body.extend(format!("--{boundary}--\r\n").as_bytes());
        let (status, answer) = self.request(
            "POST",
            "/api/jobs",
            &format!("multipart/form-data; boundary={boundary}"),
            &body,
        );
        (status, serde_json::from_slice(&answer).unwrap())
    }

    /// Waits until job `id` is in a state that `done` accepts; its last view.
    pub fn wait_for(&self, id: u64, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let job = self.get_json(&format!("/api/jobs/{id}"));
            if done(&job) {
                return job;
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "job {id} did not get there: {job}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until job `id` has finished.
    pub fn wait_finished(&self, id: u64) -> Value {
        self.wait_for(id, |job| {
            matches!(
                job["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        })
    }
}

impl Server {
    /// Stops the server with SIGTERM (its own way to stop: the running job is stopped as
    /// Ctrl-C stops `vpipe run`) and returns how it exited; `None` if it had to be killed.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// The status and body of an HTTP/1.1 response (Content-Length or chunked).
fn parse_response(answer: &[u8]) -> (u16, Vec<u8>) {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(answer)));
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = &answer[split + 4..];
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if !chunked {
        return (status, body.to_vec());
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return (status, out);
        }
        out.extend(&rest[end + 2..end + 2 + size]);
        rest = &rest[end + 2 + size + 2..];
    }
}

/// The built-in models (`vpipe demo`'s, image-to-video) laid out as ComfyUI's `models/`.
pub fn comfy_models(dir: &Path) -> std::path::PathBuf {
    let demo = dir.join("demo");
    let run = vpipe(&[
        "demo",
        "--mode",
        "i2v",
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
    let models = dir.join("models");
    for entry in std::fs::read_dir(demo.join("weights")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let folder = match name.split('-').next().unwrap() {
            _ if name.contains("vae") => "vae",
            "wan2.1" => "diffusion_models",
            "umt5" => "text_encoders",
            "clip" => "clip_vision",
            _ if name == "tokenizer.json" => ".",
            _ => continue,
        };
        std::fs::create_dir_all(models.join(folder)).unwrap();
        std::fs::copy(&path, models.join(folder).join(&name)).unwrap();
    }
    models
}

/// The one file of `models/folder`.
pub fn only_file(models: &Path, folder: &str) -> String {
    let entry = std::fs::read_dir(models.join(folder))
        .unwrap()
        .next()
        .unwrap();
    entry.unwrap().file_name().to_str().unwrap().to_owned()
}

/// Runs the `vpipe` binary.
fn vpipe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vpipe"))
        .args(args)
        .output()
        .unwrap()
}

/// ComfyUI's image-to-video graph on [`comfy_models`], as "Export (API)" writes it: 64×64,
/// 5 frames, 2 steps, its first frame the input file `image`.
pub fn i2v_workflow(models: &Path, image: &str) -> Value {
    serde_json::json!({
        "1": {"class_type": "UNETLoader", "inputs": {
            "unet_name": only_file(models, "diffusion_models"), "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {
            "clip_name": only_file(models, "text_encoders"), "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": only_file(models, "vae")}},
        "4": {"class_type": "CLIPVisionLoader", "inputs": {
            "clip_name": only_file(models, "clip_vision")}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a paper boat", "clip": ["2", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["2", 0]}},
        "8": {"class_type": "CLIPVisionEncode", "inputs": {
            "clip_vision": ["4", 0], "image": ["5", 0], "crop": "center"}},
        "9": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "vae": ["3", 0],
            "clip_vision_output": ["8", 0], "start_image": ["5", 0],
            "width": 64, "height": 64, "length": 5, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["9", 0], "negative": ["9", 1],
            "latent_image": ["9", 2], "seed": 3, "steps": 2, "cfg": 5.0,
            "sampler_name": "uni_pc", "scheduler": "simple", "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 0]}},
        "12": {"class_type": "CreateVideo", "inputs": {"images": ["11", 0], "fps": 16}},
        "13": {"class_type": "SaveVideo", "inputs": {
            "video": ["12", 0], "filename_prefix": "vpipe", "format": "mp4", "codec": "h264"}},
    })
}
