//! The HTTP API and the page:
//!
//! | request | what it does |
//! |---|---|
//! | `GET /` | the web page |
//! | `POST /api/jobs` | submits a job: a JSON object of `run.toml`'s keys, or `multipart/form-data` with a `settings` part (that JSON) and `image`, `last_image` or `input` uploads, or with a `comfy_workflow` part (ComfyUI's API format, its model names in the models folder) and `comfy_input` parts (the files its LoadImage / LoadVideo nodes name); 201 with the job |
//! | `GET /api/jobs` | every kept job, newest first |
//! | `GET /api/jobs/{id}` | one job: state, progress (step, done, total), notices, error |
//! | `DELETE /api/jobs/{id}` | removes a finished job: its record and its folder (uploads, video, report); 409 while it is queued or running |
//! | `GET /api/jobs/{id}/events` | the job as server-sent events: its JSON each time it changes, until it has finished |
//! | `POST /api/jobs/{id}/cancel` | cancels it: a queued job never starts, a running one stops as Ctrl-C stops `vpipe run` |
//! | `GET /api/jobs/{id}/video`, `/report`, `/chart` | its `video.mp4`, `report.json`, memory chart (SVG) |
//! | `GET /api/memory` | the server's memory record: every meter at each job boundary, live samples, budgets |
//!
//! Errors are JSON `{"error": message, "exit_code": code}` with a 4xx for what the request got
//! wrong (the message `vpipe run` would print for the same settings) and 5xx for the server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower::ServiceExt;

use crate::jobs::{JobView, Refusal};
use crate::settings::{mode_of, upload_name, Confinement, Settings, UPLOAD_KEYS};
use crate::App;

/// An error answer.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    exit_code: Option<u8>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            exit_code: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            exit_code: Some(2),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// A job's settings the pipeline refused: the CLI's message and exit code.
    fn pipeline(err: &vpipe_pipeline::Error) -> Self {
        let exit_code = vpipe_pipeline::exit_code(vpipe_pipeline::causes(err));
        let status = match exit_code {
            2 => StatusCode::BAD_REQUEST,
            3 => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            message: vpipe_pipeline::one_line(vpipe_pipeline::causes(err)),
            exit_code: Some(exit_code),
        }
    }

    fn internal(what: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, what.to_string())
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let status = match refusal {
            Refusal::QueueFull(_) | Refusal::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Unknown(_) => StatusCode::NOT_FOUND,
            Refusal::Finished(..) | Refusal::NotFinished(..) => StatusCode::CONFLICT,
        };
        Self::new(status, refusal.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message, "exit_code": self.exit_code });
        (self.status, Json(body)).into_response()
    }
}

pub(crate) fn router(app: Arc<App>) -> Router {
    let limit = app.config.max_request_bytes;
    Router::new()
        .route("/", get(page))
        .route("/api/jobs", get(list).post(submit))
        .route("/api/jobs/{id}", get(job).delete(remove))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .route("/api/jobs/{id}/events", get(events))
        .route("/api/jobs/{id}/{file}", get(job_file))
        .route("/api/memory", get(memory))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such page or API path") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

async fn page() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(include_str!("page.html")),
    )
}

async fn list(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(json!({ "jobs": app.jobs.list() }))
}

async fn memory(State(app): State<Arc<App>>) -> Json<crate::MemoryRecord> {
    Json(app.memory.record())
}

/// A job id from the path.
fn job_id(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("no job '{text}'")))
}

async fn job(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = job_id(&id)?;
    app.jobs
        .view(id)
        .map(Json)
        .ok_or(Refusal::Unknown(id).into())
}

/// How often a job's event stream looks for a change.
const EVENT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// `GET /api/jobs/{id}/events`: the job as server-sent events, one `data:` line of its JSON
/// each time it changes (state, step, progress), ending after it has finished.
async fn events(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<
    axum::response::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    let id = job_id(&id)?;
    app.jobs.view(id).ok_or(Refusal::Unknown(id))?;
    // The state: the last view sent, and whether the stream is over.
    let stream = futures_util::stream::unfold(
        (app, None::<String>, false),
        move |(app, last, done)| async move {
            if done {
                return None;
            }
            loop {
                // A job whose record was removed ends its stream.
                let view = app.jobs.view(id)?;
                let json = serde_json::to_string(&view).unwrap_or_default();
                if last.as_deref() != Some(json.as_str()) {
                    let finished = !matches!(
                        view.state,
                        crate::JobState::Queued | crate::JobState::Running
                    );
                    let event = axum::response::sse::Event::default().data(json.clone());
                    return Some((Ok(event), (app, Some(json), finished)));
                }
                tokio::time::sleep(EVENT_POLL).await;
            }
        },
    );
    Ok(axum::response::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default()))
}

/// `DELETE /api/jobs/{id}`: a finished job's record and folder (its uploads, video, report).
async fn remove(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    let dir = app.jobs.remove(job_id(&id)?)?;
    tokio::fs::remove_dir_all(&dir)
        .await
        .map_err(|e| ApiError::internal(format!("removing {}: {e}", dir.display())))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn cancel(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let view = app.jobs.cancel(job_id(&id)?)?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

async fn job_file(
    State(app): State<Arc<App>>,
    axum::extract::Path((id, file)): axum::extract::Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let name = match file.as_str() {
        "video" => "video.mp4",
        "report" => "report.json",
        "chart" => "report.svg",
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("'{file}': a job has video, report and chart"),
            ))
        }
    };
    let view = app.jobs.view(id).ok_or(Refusal::Unknown(id))?;
    let path = app.jobs.dir(id).ok_or(Refusal::Unknown(id))?.join(name);
    if !path.is_file() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("job {id} has no {file} ({:?})", view.state),
        ));
    }
    let response = tower_http::services::ServeFile::new(path)
        .oneshot(request)
        .await
        .map_err(ApiError::internal)?;
    Ok(response.map(axum::body::Body::new))
}

/// `POST /api/jobs`.
async fn submit(
    State(app): State<Arc<App>>,
    request: Request,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let id = app.jobs.reserve_id();
    let dir = app.config.outputs.join(format!("job-{id}"));
    std::fs::create_dir(&dir).map_err(|e| {
        ApiError::internal(format!("creating the job's folder {}: {e}", dir.display()))
    })?;
    let submitted = submit_into(&app, id, &dir, &content_type, request).await;
    if submitted.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    submitted.map(|view| (StatusCode::CREATED, Json(view)))
}

async fn submit_into(
    app: &Arc<App>,
    id: u64,
    dir: &Path,
    content_type: &str,
    request: Request,
) -> Result<JobView, ApiError> {
    let submission = if content_type.starts_with("application/json") {
        let body = Bytes::from_request(request, &())
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        Submission {
            settings: json_settings(&body, "request body")?,
            uploads: Vec::new(),
            workflow: None,
        }
    } else if content_type.starts_with("multipart/form-data") {
        let multipart = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        read_multipart(multipart, dir).await?
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Type '{content_type}': expected application/json (the settings) or \
                 multipart/form-data (a `settings` part and uploads)"
            ),
        ));
    };
    let confinement = Confinement {
        models: &app.config.models,
        device: &app.config.device,
        vram_budget: app.config.vram_budget.as_deref(),
        ram_budget: app.config.ram_budget.as_deref(),
    };
    let comfy = submission
        .workflow
        .as_deref()
        .map(|workflow| (workflow, dir.join(COMFY_INPUT)));
    let settings = confinement
        .job_settings(
            &submission.settings,
            &submission.uploads,
            comfy.as_ref().map(|(w, i)| (*w, i.as_path())),
            dir,
        )
        .map_err(ApiError::bad_request)?;
    let parse = app.parse.clone();
    let options = tokio::task::spawn_blocking(move || parse(&settings))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::pipeline(&e))?;
    let mode = match &submission.workflow {
        Some(_) => "comfyui-workflow",
        None => mode_of(&submission.uploads),
    };
    Ok(app.jobs.push(id, dir.to_path_buf(), options, mode)?)
}

/// The largest settings object taken: a `--pipeline` file's limit.
const MAX_SETTINGS_BYTES: usize = 1 << 20;

/// A JSON object of settings.
fn json_settings(body: &[u8], what: &str) -> Result<Settings, ApiError> {
    if body.len() > MAX_SETTINGS_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{what}: {} bytes; a job's settings are at most {MAX_SETTINGS_BYTES} (uploads may \
                 be larger)",
                body.len()
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("{what}: not valid JSON: {e}")))?;
    match value {
        serde_json::Value::Object(settings) => Ok(settings),
        other => Err(ApiError::bad_request(format!(
            "{what}: expected a JSON object of run.toml's keys, got {}",
            match other {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            }
        ))),
    }
}

/// Refuses an uploaded image that does not decode, before the job is queued, with the
/// message `vpipe run` gives for it.
async fn check_image(key: &'static str, file: &Path) -> Result<(), ApiError> {
    let file = file.to_path_buf();
    tokio::task::spawn_blocking(move || {
        vpipe_video::read_image_with_limits(&file, &vpipe_video::ReadLimits::default())
            .map(drop)
            .map_err(|e| ApiError::bad_request(format!("{key}: {e}")))
    })
    .await
    .map_err(ApiError::internal)?
}

/// What a submission brings: the settings, the uploads the settings name, and a ComfyUI
/// workflow with the files its LoadImage / LoadVideo nodes name.
struct Submission {
    settings: Settings,
    uploads: Vec<(&'static str, PathBuf)>,
    /// The workflow, saved in the job's folder; its inputs in [`COMFY_INPUT`] beside it.
    workflow: Option<PathBuf>,
}

/// The folder of a job where a workflow's uploaded inputs go (ComfyUI's `input/`).
const COMFY_INPUT: &str = "input";

/// The `settings` part and the uploads of a multipart submission, each upload saved in `dir`
/// under a name from its content; or a `comfy_workflow` part (ComfyUI's API format) with
/// `comfy_input` parts, saved under their own (plain) file names for the workflow's loaders.
async fn read_multipart(mut multipart: Multipart, dir: &Path) -> Result<Submission, ApiError> {
    let mut settings = None;
    let mut uploads: Vec<(&'static str, PathBuf)> = Vec::new();
    let mut workflow = None;
    let part_error =
        |e: axum::extract::multipart::MultipartError| ApiError::new(e.status(), e.body_text());
    while let Some(field) = multipart.next_field().await.map_err(part_error)? {
        let name = field.name().unwrap_or_default().replace('-', "_");
        let file_name = field.file_name().map(str::to_owned);
        let bytes = field.bytes().await.map_err(part_error)?;
        if name == "settings" {
            if settings.is_some() {
                return Err(ApiError::bad_request("settings: given twice"));
            }
            settings = Some(json_settings(&bytes, "settings")?);
            continue;
        }
        if name == "comfy_workflow" {
            if workflow.is_some() {
                return Err(ApiError::bad_request("comfy_workflow: uploaded twice"));
            }
            // Checked as JSON here; as a workflow by the same reader as `vpipe run`'s.
            json_settings(&bytes, "comfy_workflow")?;
            let file = dir.join("workflow_api.json");
            save(&file, &bytes).await?;
            workflow = Some(file);
            continue;
        }
        if name == "comfy_input" {
            let plain = file_name
                .as_deref()
                .and_then(plain_file_name)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "comfy_input: the file name {file_name:?} is not a plain name (letters, \
                         digits, '.', '-', '_', ' '; as the workflow's LoadImage or LoadVideo \
                         names it)"
                    ))
                })?;
            let folder = dir.join(COMFY_INPUT);
            tokio::fs::create_dir_all(&folder)
                .await
                .map_err(|e| ApiError::internal(format!("{}: {e}", folder.display())))?;
            let file = folder.join(plain);
            if file.exists() {
                return Err(ApiError::bad_request(format!(
                    "comfy_input: {plain} uploaded twice"
                )));
            }
            save(&file, &bytes).await?;
            continue;
        }
        let Some(&key) = UPLOAD_KEYS.iter().find(|k| **k == name) else {
            return Err(ApiError::bad_request(format!(
                "part '{name}': expected `settings` and uploads named {}",
                UPLOAD_KEYS.join(", ")
            )));
        };
        if uploads.iter().any(|(k, _)| *k == key) {
            return Err(ApiError::bad_request(format!("{key}: uploaded twice")));
        }
        let file = dir.join(upload_name(key, &bytes).map_err(ApiError::bad_request)?);
        save(&file, &bytes).await?;
        if key != "input" {
            check_image(key, &file).await?;
        }
        uploads.push((key, file));
    }
    let settings = match (settings, &workflow) {
        (Some(settings), _) => settings,
        // The workflow holds the job's settings.
        (None, Some(_)) => Settings::new(),
        (None, None) => {
            return Err(ApiError::bad_request(
                "no `settings` part (the job's JSON) and no `comfy_workflow`",
            ))
        }
    };
    Ok(Submission {
        settings,
        uploads,
        workflow,
    })
}

/// Writes an upload.
async fn save(file: &Path, bytes: &[u8]) -> Result<(), ApiError> {
    tokio::fs::write(file, bytes)
        .await
        .map_err(|e| ApiError::internal(format!("saving {}: {e}", file.display())))
}

/// `name` when it is a plain file name a workflow's loader can give: no folder, no leading dot,
/// letters, digits, `.`, `-`, `_` and spaces, at most 200 bytes.
fn plain_file_name(name: &str) -> Option<&str> {
    let plain = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ' '));
    plain.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_a_json_object_of_at_most_a_mebibyte() {
        let ok = json_settings(br#"{"prompt": "a kite"}"#, "settings").unwrap();
        assert_eq!(ok["prompt"], "a kite");
        let big = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(MAX_SETTINGS_BYTES));
        let err = json_settings(big.as_bytes(), "settings").err().unwrap();
        assert_eq!(err.status, StatusCode::PAYLOAD_TOO_LARGE);
        for (body, needle) in [
            (&b"[1]"[..], "an array"),
            (b"\"x\"", "a string"),
            (b"{", "not valid"),
        ] {
            let err = json_settings(body, "settings").err().unwrap();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(err.message.contains(needle), "{}", err.message);
        }
    }
}
