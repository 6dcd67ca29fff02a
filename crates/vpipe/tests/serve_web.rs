//! `vpipe serve`'s web page in a real browser: headless Chromium (Debian's `chromium`, which
//! CI installs) driven over the DevTools protocol submits an image-to-video job through the
//! form (the first frame uploaded from its file input), sees its progress, and plays the
//! result in the `<video>` element. With `VPIPE_SCREENSHOT=FILE` the
//! page is saved as a PNG there (docs/serve-page.png is made this way).

mod common;
mod serve;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve::Server;

/// A headless Chromium with a DevTools WebSocket to its one page; killed when dropped.
struct Browser {
    child: Child,
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch() -> Self {
        let profile = tempfile::tempdir().unwrap();
        let binary = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| {
                Command::new("sh")
                    .args(["-c", &format!("command -v {b}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .expect("no chromium: install Debian's `chromium` package (.ci/run does)");
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--mute-audio",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let port_file = profile.path().join("DevToolsActivePort");
        let start = Instant::now();
        let port: u16 = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.parse().ok()))
            {
                break port;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "chromium did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let pages = http_get(port, "/json/list");
        let pages: Value = serde_json::from_str(&pages).unwrap();
        let url = pages
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["type"] == "page")
            .and_then(|p| p["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let (socket, _) = tungstenite::client(url.as_str(), stream).unwrap();
        Self {
            child,
            socket,
            next_id: 1,
            _profile: profile,
        }
    }

    /// Sends a DevTools command and returns its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(tungstenite::Message::text(message.to_string()))
            .unwrap();
        loop {
            let answer = self.socket.read().unwrap();
            let Ok(text) = answer.to_text() else { continue };
            let Ok(value) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if value["id"] == id {
                assert!(value.get("error").is_none(), "{method}: {value}");
                return value["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy; its last value.
    fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let start = Instant::now();
        loop {
            let value = self.eval(expression);
            if !(value.is_null() || value == false || value == "") {
                return value;
            }
            if start.elapsed() > Duration::from_secs(120) {
                let page = self.eval(
                    "document.getElementById('form-error').textContent + ' | ' + \
                     document.getElementById('jobs').innerText",
                );
                panic!("the page never showed {what}; it shows: {page}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET on the browser's DevTools HTTP endpoint (which keeps the connection open: the body is
/// read by its Content-Length).
fn http_get(port: u16, path: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

/// Standard base64, as DevTools sends screenshots.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|chunk| {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &d)| n | (d as u32) << (18 - 6 * i));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes[..chunk.len() - 1].to_vec()
        })
        .collect()
}

#[test]
fn the_page_submits_a_job_shows_its_progress_and_plays_the_video() {
    let dir = tempfile::tempdir().unwrap();
    // ComfyUI's layout, which the form's jobs find models in and a workflow's loaders name.
    let models = serve::comfy_models(dir.path());
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let server = Server::start(&models, &outputs, &[]);
    let mut browser = Browser::launch();
    browser.call("Page.enable", json!({}));
    browser.call("Page.navigate", json!({"url": server.url("/")}));
    browser.wait_for(
        "the form",
        "document.readyState === 'complete' && !!document.getElementById('job-form')",
    );
    browser.wait_for(
        "the device",
        "document.getElementById('device').textContent.startsWith('device cpu')",
    );

    // A bad setting: the server's message, the CLI's, under the form.
    let fill = |frames: u32, steps: u32| {
        format!(
            "(() => {{ const f = document.getElementById('job-form');
               f.prompt.value = 'a paper boat on a pond'; f.size.value = '64x64';
               f.frames.value = '{frames}'; f.steps.value = '{steps}'; f.cfg.value = '5';
               f.extra.value = '{{\"tile\": 64}}';
               document.getElementById('submit').click(); return true; }})()"
        )
    };
    browser.eval(&fill(6, 2));
    let error = browser.wait_for(
        "the error",
        "document.getElementById('form-error').textContent",
    );
    assert!(error.as_str().unwrap().contains("--frames"), "{error}");

    // The first frame, chosen in the file input as a person would.
    let document = browser.call("DOM.getDocument", json!({}));
    let input = browser.call(
        "DOM.querySelector",
        json!({"nodeId": document["root"]["nodeId"], "selector": "#image"}),
    );
    // From a folder of the user's (Chromium does not read files from the checkout's
    // fixtures folder in every sandbox).
    let image = dir.path().join("first.png");
    std::fs::copy(common::fixture("vpipe", "pipeline_i2v/first.png"), &image).unwrap();
    browser.call(
        "DOM.setFileInputFiles",
        json!({"nodeId": input["nodeId"], "files": [image.to_str().unwrap()]}),
    );
    // Long enough to watch it sample.
    browser.eval(&fill(5, 150));
    let progress = browser.wait_for(
        "the job sampling",
        "(() => { const row = document.querySelector('#jobs tr[data-state=running] .step');
                  return row && row.textContent.startsWith('sample') ? row.textContent : ''; })()",
    );
    assert!(progress.as_str().unwrap().contains("/150"), "{progress}");
    let loaded = browser.wait_for(
        "the video playing",
        "(() => { const v = document.getElementById('result-video');
                  return v && v.readyState >= 2 ? [v.videoWidth, v.videoHeight] : null; })()",
    );
    assert_eq!(loaded, json!([64, 64]), "the <video> decoded the result");
    let lines = browser.eval("document.querySelectorAll('#chart polyline').length");
    assert!(
        lines.as_u64() >= Some(2),
        "the memory chart draws host and heap: {lines}"
    );
    let legend = browser.eval("document.getElementById('legend').textContent");
    assert!(legend.as_str().unwrap().contains("heap"), "{legend}");
    let row = browser.eval("document.querySelector('#jobs tr').dataset.state");
    assert_eq!(row, "succeeded");
    let jobs = server.get_json("/api/jobs");
    assert_eq!(jobs["jobs"][0]["mode"], "image-to-video", "{jobs}");

    // A ComfyUI workflow from the page: its LoadImage file is the first frame chosen above.
    let workflow = dir.path().join("workflow_api.json");
    std::fs::write(
        &workflow,
        serve::i2v_workflow(&models, "first.png").to_string(),
    )
    .unwrap();
    let input = browser.call(
        "DOM.querySelector",
        json!({"nodeId": document["root"]["nodeId"], "selector": "#workflow"}),
    );
    browser.call(
        "DOM.setFileInputFiles",
        json!({"nodeId": input["nodeId"], "files": [workflow.to_str().unwrap()]}),
    );
    browser.eval(
        "(() => { const f = document.getElementById('job-form');
           f.extra.value = '{\"tile\": 64, \"tokenizer\": \"tokenizer.json\"}';
           document.getElementById('submit').click(); return true; })()",
    );
    let done = browser.wait_for(
        "the workflow's job done",
        "(() => { const row = document.querySelector('#jobs tr');
                  return row && row.id === 'job-3' && row.dataset.state !== 'queued'
                    && row.dataset.state !== 'running' ? row.dataset.state + ' ' + row.innerText : ''; })()",
    );
    assert!(done.as_str().unwrap().starts_with("succeeded"), "{done}");
    assert!(
        done.as_str().unwrap().contains("comfyui-workflow"),
        "{done}"
    );
    browser.wait_for(
        "the workflow's video playing",
        "(() => { const v = document.getElementById('result-video');
                  return v && v.src.includes('/api/jobs/3/') && v.readyState >= 2; })()",
    );

    let shot = browser.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64_decode(shot["data"].as_str().unwrap());
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    if let Some(path) = std::env::var_os("VPIPE_SCREENSHOT") {
        std::fs::write(Path::new(&path), &png).unwrap();
    }
}
