//! `vpipe serve` as a client sees it: a real server on loopback running jobs on the built-in
//! tiny models (the demo's), one at a time, cancelled on request, each with its video, report
//! and chart, a clip uploaded for video-to-video; its memory record showing no growth over 20 jobs; and bad requests answered with
//! a 4xx while the server keeps serving.

mod common;
mod serve;

use std::path::Path;

use serde_json::{json, Value};
use serve::Server;

/// A quick text-to-video job on the built-in models.
fn small_job(prompt: &str, steps: u64) -> Value {
    json!({
        "prompt": prompt,
        "size": "64x64",
        "frames": 5,
        "steps": steps,
        "tile": 64,
    })
}

/// The video `vpipe run` makes of `small_job("a red kite over the sea", 2)` on `models`.
fn run_video(models: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("cli.mp4");
    let run = common::vpipe(&[
        "run",
        "--model-dir",
        models.to_str().unwrap(),
        "--prompt",
        "a red kite over the sea",
        "--size",
        "64x64",
        "--frames",
        "5",
        "--steps",
        "2",
        "--tile",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read(&out).unwrap()
}

fn id_of(answer: &Value) -> u64 {
    answer["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no job id: {answer}"))
}

#[test]
fn three_jobs_one_cancelled_each_with_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::builtin_models(&dir.path().join("demo"));
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let mut server = Server::start(&models, &outputs, &[]);

    let (status, first) = server.submit(&small_job("a red kite over the sea", 2));
    assert_eq!(status, 201, "{first}");
    // Long enough to be cancelled while it samples.
    let (status, long) = server.submit(&small_job("a slow boat", 1000));
    assert_eq!(status, 201, "{long}");
    let (status, third) = server.submit(&json!({
        "prompt": "a lighthouse at night",
        "size": "64x64",
        "frames": 5,
        "steps": 2,
        "tile": 64,
        "lora": ["lora-tiny-seed42.safetensors:0.5"],
        "seed": 7,
    }));
    assert_eq!(status, 201, "{third}");
    let (first, long, third) = (id_of(&first), id_of(&long), id_of(&third));

    let listed = server.get_json("/api/jobs");
    let ids: Vec<u64> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [third, long, first], "newest first");

    // The third job as server-sent events, read from its queueing to its end while the
    // rest of the test goes on: its JSON at each change.
    std::thread::scope(|scope| {
        let events = scope.spawn(|| server.get(&format!("/api/jobs/{third}/events")));
        let sampling = server.wait_for(long, |job| {
            job["state"] == "running"
                && job["progress"]["step"] == "sample"
                && job["progress"]["done"].as_u64() >= Some(2)
        });
        assert_eq!(sampling["progress"]["total"], 1000);
        // A running job cannot be removed; it can be cancelled.
        let (status, _) = server.request("DELETE", &format!("/api/jobs/{long}"), "", b"");
        assert_eq!(status, 409);
        let (status, _) = server.request("POST", &format!("/api/jobs/{long}/cancel"), "", b"");
        assert_eq!(status, 202);

        let done = server.wait_finished(first);
        assert_eq!(done["state"], "succeeded", "{done}");

        let cancelled = server.wait_finished(long);
        assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
        assert_eq!(cancelled["error"]["exit_code"], 130);
        assert_eq!(cancelled["video"], false, "a cancelled job writes no video");
        assert_eq!(cancelled["report"], true, "but its report so far");
        let done_third = server.wait_finished(third);
        assert_eq!(done_third["state"], "succeeded", "{done_third}");
        let (status, stream) = events.join().unwrap();
        assert_eq!(status, 200);
        let events: Vec<Value> = String::from_utf8(stream)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|json| serde_json::from_str(json.trim()).unwrap())
            .collect();
        let states: Vec<&str> = events
            .iter()
            .map(|e| e["state"].as_str().unwrap())
            .collect();
        assert_eq!(states.first(), Some(&"queued"), "{states:?}");
        assert_eq!(states.last(), Some(&"succeeded"), "{states:?}");
        assert!(
            events
                .iter()
                .any(|e| e["state"] == "running" && e["progress"]["step"] == "sample"),
            "{states:?}"
        );
    });

    // Cancelling a finished job is a conflict; an unknown job is not found.
    let (status, _) = server.request("POST", &format!("/api/jobs/{first}/cancel"), "", b"");
    assert_eq!(status, 409);
    let (status, _) = server.get("/api/jobs/999999");
    assert_eq!(status, 404);

    for id in [first, third] {
        let (status, video) = server.get(&format!("/api/jobs/{id}/video"));
        assert_eq!(status, 200);
        assert_eq!(&video[4..8], b"ftyp", "an MP4");
        let report = server.get_json(&format!("/api/jobs/{id}/report"));
        let phases = common::phase_names(&report);
        assert!(phases.contains(&"sample".to_owned()), "{phases:?}");
        assert!(report["violations"].as_array().unwrap().is_empty());
        let (status, chart) = server.get(&format!("/api/jobs/{id}/chart"));
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&chart).contains("<svg"));
    }
    let (status, _) = server.get(&format!("/api/jobs/{long}/video"));
    assert_eq!(status, 404);
    let report = server.get_json(&format!("/api/jobs/{long}/report"));
    assert!(!common::phase_names(&report).is_empty());

    // A finished job can be removed, files and all.
    let (status, _) = server.request("DELETE", &format!("/api/jobs/{long}"), "", b"");
    assert_eq!(status, 204);
    assert!(!outputs.join(format!("job-{long}")).exists());
    let (status, _) = server.get(&format!("/api/jobs/{long}"));
    assert_eq!(status, 404);

    // The server's job is `vpipe run`'s, bit for bit.
    let cli_video = run_video(&models, dir.path());
    let (_, served) = server.get(&format!("/api/jobs/{first}/video"));
    assert!(
        served == cli_video,
        "the served video differs from vpipe run's"
    );

    // Video-to-video from an uploaded clip: the first job's video.
    let settings = json!({
        "prompt": "the same kite at dusk", "size": "64x64", "frames": 5, "steps": 2,
        "tile": 64, "strength": 0.6,
    });
    let (status, v2v) = server.submit_multipart(&settings, &[("input", &served)]);
    assert_eq!(status, 201, "{v2v}");
    assert_eq!(v2v["mode"], "video-to-video");
    let v2v_id = id_of(&v2v);
    let v2v = server.wait_finished(v2v_id);
    assert_eq!(v2v["state"], "succeeded", "{v2v}");
    let report = server.get_json(&format!("/api/jobs/{}/report", v2v["id"]));
    assert!(common::phase_names(&report).contains(&"vae encode".to_owned()));

    // Every job boundary was measured, and the record is on disk too.
    let memory = server.get_json("/api/memory");
    let ends = boundaries(&memory, "job end");
    assert_eq!(ends.len(), 4, "{memory}");
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(outputs.join("server-memory.json")).unwrap())
            .unwrap();
    assert_eq!(boundaries(&on_disk, "job end").len(), 4);

    let status = server.stop().expect("the server stops on SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// The boundary readings `at` of a memory record.
fn boundaries<'a>(memory: &'a Value, at: &str) -> Vec<&'a Value> {
    memory["boundaries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["at"] == at)
        .collect()
}

/// Heap growth from the third job's end to the twentieth's: what a job leaves behind, times 17.
/// The jobs' own records (a few hundred bytes each) are the only thing the server keeps.
const HEAP_GROWTH_TOLERANCE: u64 = 256 << 10;
/// Anonymous RSS growth over the same jobs: the allocator may keep freed pages; a leak of the
/// jobs' tensors (megabytes each) would exceed it within a few jobs.
const RSS_GROWTH_TOLERANCE: u64 = 16 << 20;

#[test]
fn twenty_jobs_leave_the_server_as_they_found_it() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::builtin_models(&dir.path().join("demo"));
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let server = Server::start(&models, &outputs, &[]);
    let ids: Vec<u64> = (0..20)
        .map(|i| {
            let (status, answer) = server.submit(&small_job(&format!("job {i}"), 2));
            assert_eq!(status, 201, "{answer}");
            id_of(&answer)
        })
        .collect();
    for &id in &ids {
        let job = server.wait_finished(id);
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    let memory = server.get_json("/api/memory");
    let ends = boundaries(&memory, "job end");
    assert_eq!(ends.len(), 20);
    let value = |b: &Value, key: &str| b[key].as_u64().unwrap_or_else(|| panic!("{key}: {b}"));
    // Job 20 has no job after it and gives every model back; jobs 3 and 19 each keep the
    // same models for the next: growth is measured between two ends holding the same.
    let names = |b: &Value| -> Vec<String> {
        b["resident_models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(!names(ends[2]).is_empty(), "{}", ends[2]);
    assert_eq!(names(ends[2]), names(ends[18]));
    assert!(names(ends[19]).is_empty(), "{}", ends[19]);
    let (third, last) = (ends[2], ends[18]);
    let heap_growth = value(last, "heap").saturating_sub(value(third, "heap"));
    let rss_growth = value(last, "host_anon").saturating_sub(value(third, "host_anon"));
    eprintln!(
        "heap at job ends: {:?}",
        ends.iter().map(|b| value(b, "heap")).collect::<Vec<_>>()
    );
    eprintln!(
        "host anon at job ends: {:?}",
        ends.iter()
            .map(|b| value(b, "host_anon"))
            .collect::<Vec<_>>()
    );
    assert!(
        heap_growth <= HEAP_GROWTH_TOLERANCE,
        "the heap grew by {heap_growth} B from job 3 to job 19"
    );
    assert!(
        rss_growth <= RSS_GROWTH_TOLERANCE,
        "anonymous RSS grew by {rss_growth} B from job 3 to job 19"
    );
}

/// The notes of `report` named `what`.
fn notes<'a>(report: &'a Value, what: &str) -> Vec<&'a str> {
    report["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["what"] == what)
        .map(|n| n["detail"].as_str().unwrap())
        .collect()
}

/// The (model, from, to, phase) of every transition of `report`, each verified.
fn moves(report: &Value) -> Vec<(String, String, String, String)> {
    let transitions = report["transitions"].as_array().unwrap();
    assert!(transitions.iter().all(|t| t["verified"] == true));
    transitions
        .iter()
        .map(|t| {
            let field = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
            (field("model"), field("from"), field("to"), field("phase"))
        })
        .collect()
}

/// The models a report loads (disk → host).
fn loaded(report: &Value) -> Vec<String> {
    moves(report)
        .into_iter()
        .filter(|(_, from, _, _)| from == "disk")
        .map(|(model, ..)| model)
        .collect()
}

/// The models a report gives back to disk in phase `phase`.
fn given_back_in(report: &Value, phase: &str) -> Vec<String> {
    let mut models: Vec<String> = moves(report)
        .into_iter()
        .filter(|(_, _, to, p)| to == "disk" && p == phase)
        .map(|(model, ..)| model)
        .collect();
    models.sort();
    models
}

#[test]
fn a_job_takes_the_models_the_one_before_left_resident() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::builtin_models(&dir.path().join("demo"));
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let server = Server::start(&models, &outputs, &[]);
    let job = small_job("a red kite over the sea", 2);
    let mut with_lora = job.clone();
    with_lora["lora"] = json!(["lora-tiny-seed42.safetensors:0.5"]);
    // Queued together, so that each job's end sees the next.
    let ids: Vec<u64> = [&job, &job, &with_lora]
        .iter()
        .map(|settings| {
            let (status, answer) = server.submit(settings);
            assert_eq!(status, 201, "{answer}");
            id_of(&answer)
        })
        .collect();
    let reports: Vec<Value> = ids
        .iter()
        .map(|&id| {
            let job = server.wait_finished(id);
            assert_eq!(job["state"], "succeeded", "{job}");
            server.get_json(&format!("/api/jobs/{id}/report"))
        })
        .collect();
    let (first, second, third) = (&reports[0], &reports[1], &reports[2]);
    let all = ["dit", "text encoder", "vae"];

    // The first job loads everything and, the second using the same, keeps it.
    let mut first_loads = loaded(first);
    first_loads.sort();
    assert_eq!(first_loads, all);
    assert!(given_back_in(first, "release").is_empty(), "{first}");
    assert_eq!(notes(first, "kept").len(), 3, "{:?}", notes(first, "kept"));
    eprintln!("first job's decision: {:?}", notes(first, "holding"));

    // The second loads nothing and says what it took, with its bytes.
    assert!(loaded(second).is_empty(), "{:?}", moves(second));
    let carried = notes(second, "carried over");
    assert_eq!(carried.len(), 3, "{carried:?}");
    for model in all {
        assert!(
            carried
                .iter()
                .any(|n| n.contains(&format!("'{model}' carried over")) && n.contains(" B,")),
            "{carried:?}"
        );
    }
    eprintln!("carried over: {carried:?}");
    assert!(common::phase_names(second).contains(&"sample".to_owned()));
    assert!(second["violations"].as_array().unwrap().is_empty());

    // Its video is the first's, and `vpipe run`'s.
    let video = |id: u64| server.get(&format!("/api/jobs/{id}/video")).1;
    assert!(
        video(ids[0]) == video(ids[1]),
        "the carried models made another video"
    );
    let cli_video = run_video(&models, dir.path());
    assert!(video(ids[1]) == cli_video, "differs from vpipe run's");

    // The third merges a LoRA: another DiT. The second gives its DiT back (verified), keeps
    // the rest; the third loads the DiT alone and, last in the queue, gives everything back.
    assert_eq!(given_back_in(second, "release"), ["dit"]);
    assert_eq!(loaded(third), ["dit"]);
    assert_eq!(notes(third, "carried over").len(), 2);
    assert_eq!(given_back_in(third, "release"), all);

    // The server's record: what stayed resident across each job boundary.
    let memory = server.get_json("/api/memory");
    let resident: Vec<usize> = boundaries(&memory, "job end")
        .iter()
        .map(|b| b["resident_models"].as_array().unwrap().len())
        .collect();
    assert_eq!(resident, [3, 2, 0], "{memory}");
}

/// A PNG of this crate's image-to-video fixtures.
fn fixture_png() -> Vec<u8> {
    std::fs::read(common::fixture("vpipe", "pipeline_i2v/first.png")).unwrap()
}

#[test]
fn bad_requests_get_a_4xx_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let models = serve::comfy_models(dir.path());
    std::fs::write(dir.path().join("secret.safetensors"), b"not for jobs").unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("secret.safetensors"),
        models.join("escape.safetensors"),
    )
    .unwrap();
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let server = Server::start(&models, &outputs, &["--max-request", "1MiB"]);

    let expect = |(status, answer): (u16, Value), code: u16, needle: &str| {
        assert_eq!(status, code, "{answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "expected '{needle}' in: {message}"
        );
    };
    let body = |(status, body): (u16, Vec<u8>)| {
        (
            status,
            serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
        )
    };
    let json = "application/json";
    expect(
        body(server.request("POST", "/api/jobs", json, b"{\"prompt\": ")),
        400,
        "not valid JSON",
    );
    expect(
        body(server.request("POST", "/api/jobs", json, b"[1, 2]")),
        400,
        "a JSON object",
    );
    expect(
        server.submit(&json!({"prompt": "x", "no_such_key": 1})),
        400,
        "--no-such-key",
    );
    expect(
        server.submit(&json!({"prompt": "x", "steps": "many"})),
        400,
        "--steps",
    );
    expect(
        server.submit(&json!({"prompt": "x", "size": "64x64", "frames": 6})),
        400,
        "--frames",
    );
    expect(
        server.submit(&json!({"prompt": "x", "dit": "../secret.safetensors"})),
        400,
        "without '..'",
    );
    expect(
        server.submit(&json!({"prompt": "x", "vae": "/etc/passwd"})),
        400,
        "relative to the models folder",
    );
    expect(
        server.submit(&json!({"prompt": "x", "dit": "escape.safetensors"})),
        400,
        "leads outside",
    );
    expect(
        server.submit(&json!({"prompt": "x", "lora": "../../x:1"})),
        400,
        "without '..'",
    );
    expect(
        server.submit(&json!({"prompt": "x", "out": "/tmp/owned.mp4"})),
        400,
        "set by the server",
    );
    expect(
        server.submit(&json!({"prompt": "x", "image": "/etc/hostname"})),
        400,
        "as an upload",
    );
    expect(
        body(server.request("POST", "/api/jobs", "text/plain", b"prompt")),
        415,
        "Content-Type",
    );
    let huge = vec![b' '; 2 << 20];
    let (status, _) = server.request("POST", "/api/jobs", json, &huge);
    assert_eq!(status, 413, "a body over --max-request");
    let settings = json!({"prompt": "x", "size": "64x64", "frames": 5, "steps": 2, "tile": 64});
    expect(
        server.submit_multipart(&settings, &[("image", b"GIF89a not an image")]),
        400,
        "PNG or JPEG",
    );
    let mut broken = fixture_png();
    broken.truncate(40);
    expect(
        server.submit_multipart(&settings, &[("image", &broken)]),
        400,
        "image",
    );
    expect(
        server.submit_multipart(&settings, &[("avatar", &fixture_png())]),
        400,
        "part 'avatar'",
    );
    expect(
        server.submit_multipart(&json!({"steps": 2}), &[]),
        400,
        "prompt",
    );
    let (status, _) = server.get("/api/jobs/x/../../etc/passwd");
    assert_eq!(status, 404);

    // Nothing was queued, no folder was left behind; an image-to-video job still runs.
    assert!(server.get_json("/api/jobs")["jobs"]
        .as_array()
        .unwrap()
        .is_empty());
    let (status, answer) = server.submit_multipart(&settings, &[("image", &fixture_png())]);
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["mode"], "image-to-video");
    let job = server.wait_finished(id_of(&answer));
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        job["notices"][0].as_str().unwrap().contains("resized"),
        "{job}"
    );
    let folders: Vec<_> = std::fs::read_dir(&outputs)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(folders.len(), 1, "only the job that ran has a folder");
    assert!(!Path::new("/tmp/owned.mp4").exists());
}

#[test]
fn a_comfyui_workflow_runs_as_a_job_with_its_input_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let models = serve::comfy_models(dir.path());
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let server = Server::start(&models, &outputs, &[]);
    let workflow = serve::i2v_workflow(&models, "boat photo.png").to_string();
    let image = fixture_png();
    let settings = json!({"tokenizer": "tokenizer.json", "tile": 64}).to_string();
    let parts = |input_name: &str| -> Vec<(&str, Option<String>, Vec<u8>)> {
        vec![
            ("settings", None, settings.clone().into_bytes()),
            (
                "comfy_workflow",
                Some("workflow_api.json".into()),
                workflow.clone().into_bytes(),
            ),
            ("comfy_input", Some(input_name.to_owned()), image.clone()),
        ]
    };
    let send = |parts: &[(&str, Option<String>, Vec<u8>)]| {
        let parts: Vec<(&str, Option<String>, &[u8])> = parts
            .iter()
            .map(|(n, f, b)| (*n, f.clone(), b.as_slice()))
            .collect();
        server.submit_parts(&parts)
    };
    let (status, answer) = send(&parts("boat photo.png"));
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["mode"], "comfyui-workflow");
    let job = server.wait_finished(id_of(&answer));
    assert_eq!(job["state"], "succeeded", "{job}");

    // The same workflow through `vpipe run`.
    let comfy_input = dir.path().join("input");
    std::fs::create_dir(&comfy_input).unwrap();
    std::fs::write(comfy_input.join("boat photo.png"), &image).unwrap();
    let file = dir.path().join("workflow_api.json");
    std::fs::write(&file, &workflow).unwrap();
    let out = dir.path().join("cli.mp4");
    let run = common::vpipe(&[
        "run",
        "--comfy-workflow",
        file.to_str().unwrap(),
        "--comfy-models",
        models.to_str().unwrap(),
        "--comfy-input",
        comfy_input.to_str().unwrap(),
        "--tokenizer",
        models.join("tokenizer.json").to_str().unwrap(),
        "--tile",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (_, served) = server.get(&format!("/api/jobs/{}/video", job["id"]));
    assert!(
        served == std::fs::read(&out).unwrap(),
        "the served video differs from vpipe run's"
    );

    // A file name that is not plain, a missing input, a node vpipe does not run: 4xx.
    let (status, answer) = send(&parts("../boat.png"));
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("plain name"),
        "{answer}"
    );
    let (status, answer) = send(&parts("other.png"));
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("boat photo.png"),
        "{answer}"
    );
    let unknown = workflow.replace("\"CreateVideo\"", "\"RIFE VFI\"");
    let (status, answer) =
        server.submit_parts(&[("comfy_workflow", Some("w.json".into()), unknown.as_bytes())]);
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("RIFE VFI"),
        "{answer}"
    );
}

/// What `vpipe serve` would hold to a job's end follows the budget: the 1.3B DiT (f32 on the
/// CPU) held whole in 8 GiB stays for a next job; in 4 GiB its blocks stream, so it cannot.
#[test]
fn the_plan_holds_for_a_next_job_only_what_the_budget_holds_whole() {
    let held = |budget: &str| -> Vec<String> {
        let out = common::vpipe(&[
            "plan",
            "--preset",
            "wan2.1-t2v-1.3b",
            "--size",
            "832x480",
            "--frames",
            "81",
            "--device",
            "cpu",
            "--vram-budget",
            budget,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
        plan["serve_holding"]["held_to_end"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["model"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(held("8GiB"), ["dit", "vae"]);
    assert_eq!(held("4GiB"), ["vae"]);
}
