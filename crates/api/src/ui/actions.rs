//! The dashboard's actions: POST forms (cancel, retry, snapshots, exec) and the file
//! download. Each answers with a redirect to the page it came from (303, so the browser
//! follows with a GET), or with the page itself for exec.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Multipart;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use conductor_service::exec::ExecRequest;
use conductor_service::files::PutOptions;
use serde::Deserialize;

use super::pages::{render_workspace, ExecResult};
use super::{query_value, segment, UiResult, UiState};
use crate::error::ApiError;
use crate::routes::detached;

/// Longest a command run from the workspace page may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn cancel_task(State(s): State<UiState>, Path(id): Path<String>) -> UiResult<Redirect> {
    let c = s.app.conductor.clone();
    let view = detached(async move { c.cancel_task(&id).await }).await?;
    Ok(Redirect::to(&format!("/ui/tasks/{}", segment(&view.id))))
}

pub async fn retry_task(State(s): State<UiState>, Path(id): Path<String>) -> UiResult<Redirect> {
    let view = s.app.conductor.retry_task(&id)?;
    Ok(Redirect::to(&format!("/ui/tasks/{}", segment(&view.id))))
}

#[derive(Deserialize)]
pub struct SnapshotForm {
    name: String,
}

fn back(id: &str, notice: &str) -> Redirect {
    Redirect::to(&format!("/ui/workspaces/{}?notice={notice}", segment(id)))
}

pub async fn create_snapshot(
    State(s): State<UiState>,
    Path(id): Path<String>,
    Form(f): Form<SnapshotForm>,
) -> UiResult<Redirect> {
    let c = s.app.conductor.clone();
    let ws = id.clone();
    detached(async move { c.create_snapshot(&ws, f.name.trim(), false).await }).await?;
    Ok(back(&id, "snapshot-created"))
}

#[derive(Deserialize)]
pub struct ForkForm {
    count: u32,
}

/// Forks the workspace into `count` copies (conductor's fork: all or none); shows the first.
pub async fn fork(State(s): State<UiState>, Path(id): Path<String>, Form(f): Form<ForkForm>) -> UiResult<Redirect> {
    let c = s.app.conductor.clone();
    let ws = id.clone();
    let req = conductor_service::fork::ForkRequest {
        count: f.count,
        snapshot: None,
        agent_id: None,
        env: Default::default(),
        limits: Default::default(),
    };
    let out = detached(async move { c.fork_workspace(&ws, req).await }).await?;
    let first = out.workspaces.first().map_or(id, |w| w.id.clone());
    Ok(back(&first, "forked"))
}

pub async fn restore_snapshot(
    State(s): State<UiState>,
    Path((id, name)): Path<(String, String)>,
) -> UiResult<Redirect> {
    let c = s.app.conductor.clone();
    let ws = id.clone();
    detached(async move { c.restore_snapshot(&ws, &name).await }).await?;
    Ok(back(&id, "snapshot-restored"))
}

pub async fn delete_snapshot(State(s): State<UiState>, Path((id, name)): Path<(String, String)>) -> UiResult<Redirect> {
    let c = s.app.conductor.clone();
    let ws = id.clone();
    detached(async move { c.delete_snapshot(&ws, &name).await }).await?;
    Ok(back(&id, "snapshot-deleted"))
}

#[derive(Deserialize)]
pub struct ExecForm {
    command: String,
}

/// Runs one command line and shows the workspace page with its output.
pub async fn exec(State(s): State<UiState>, Path(id): Path<String>, Form(f): Form<ExecForm>) -> UiResult<Html<String>> {
    let req = ExecRequest {
        timeout: Some(EXEC_TIMEOUT),
        ..ExecRequest::new(f.command.as_str())
    };
    req.validate()?;
    let ws = s.app.conductor.get_workspace(&id)?.id;
    let c = s.app.conductor.clone();
    let target = ws.clone();
    let (outcome, stdout, stderr) = detached(async move { c.exec_collect(&target, req).await }).await?;
    let result = ExecResult {
        command: f.command,
        exit_code: outcome.exit_code,
        timed_out: outcome.timed_out,
        duration_ms: outcome.duration_ms,
        stdout,
        stderr,
    };
    render_workspace(&s, &ws, "", None, Some(result)).await
}

/// Runs one command and streams its output (stdout and stderr as they come, then a line
/// with the exit code) as `text/plain`: the page's script shows it inline; without the
/// script the browser shows the stream itself.
pub async fn exec_stream(
    State(s): State<UiState>,
    Path(id): Path<String>,
    Form(f): Form<ExecForm>,
) -> UiResult<Response> {
    let req = ExecRequest {
        timeout: Some(EXEC_TIMEOUT),
        ..ExecRequest::new(f.command.as_str())
    };
    req.validate()?;
    let ws = s.app.conductor.get_workspace(&id)?.id;
    let c = s.app.conductor.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel(32);
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::convert::Infallible>>(32);
    tokio::spawn(async move {
        let run = tokio::spawn(async move { c.exec(&ws, req, tx).await });
        // The end line starts a line of its own.
        let mut at_line_start = true;
        while let Some(chunk) = rx.recv().await {
            let bytes = match chunk {
                conductor_core::engine::OutputChunk::Stdout(b) | conductor_core::engine::OutputChunk::Stderr(b) => b,
            };
            if let Some(last) = bytes.last() {
                at_line_start = *last == b'\n';
            }
            if out_tx.send(Ok(bytes)).await.is_err() {
                break;
            }
        }
        let end = match run.await {
            Ok(Ok(o)) if o.timed_out => format!("[timed out after {} ms]\n", o.duration_ms),
            Ok(Ok(o)) => format!("[exit code {} after {} ms]\n", o.exit_code, o.duration_ms),
            Ok(Err(e)) => format!("[failed: {e}]\n"),
            Err(_) => "[failed: the command's runner ended early]\n".to_string(),
        };
        let end = if at_line_start { end } else { format!("\n{end}") };
        let _ = out_tx.send(Ok(axum::body::Bytes::from(end))).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct UploadQuery {
    /// The directory, relative to /workspace ("" for /workspace itself).
    #[serde(default)]
    path: String,
}

/// Uploads one file (a multipart form's `file` field) into the directory being browsed.
/// The whole request is bounded by `network.max_body_size`; the name is checked by the
/// file API's path rules like any other path.
pub async fn upload(
    State(s): State<UiState>,
    Path(id): Path<String>,
    Query(q): Query<UploadQuery>,
    mut form: Multipart,
) -> UiResult<Redirect> {
    let invalid = |m: String| ApiError::invalid("file", m);
    let mut upload = None;
    while let Some(field) = form.next_field().await.map_err(|e| invalid(e.body_text()))? {
        if field.name() != Some("file") {
            continue;
        }
        let name = field.file_name().unwrap_or_default().to_string();
        let data = field.bytes().await.map_err(|e| invalid(e.body_text()))?;
        upload = Some((name, data));
    }
    let Some((name, data)) = upload else {
        return Err(invalid("choose a file to upload".into()).into());
    };
    if name.is_empty() || name.contains('/') {
        return Err(invalid("the file needs a plain name".into()).into());
    }
    let dir = q.path.trim_matches('/');
    let target = if dir.is_empty() { name } else { format!("{dir}/{name}") };
    let size = data.len() as u64;
    let body: conductor_core::engine::ByteStream = Box::pin(futures_util::stream::once(async move { Ok(data) }));
    let c = s.app.conductor.clone();
    let ws = id.clone();
    let opts = PutOptions {
        mode: None,
        size: Some(size),
    };
    detached(async move { c.put_file(&ws, &target, body, opts).await }).await?;
    Ok(Redirect::to(&format!(
        "/ui/workspaces/{}?path={}&notice=file-uploaded",
        segment(&id),
        query_value(dir)
    )))
}

#[derive(Deserialize)]
pub struct DownloadQuery {
    path: String,
}

/// A file name safe for `Content-Disposition` (anything unusual becomes `_`).
fn attachment_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match clean.trim_start_matches('.') {
        "" => "download".to_string(),
        s => s.to_string(),
    }
}

/// Downloads a file (a directory as a tar) as an attachment.
pub async fn download(
    State(s): State<UiState>,
    Path(id): Path<String>,
    Query(q): Query<DownloadQuery>,
) -> UiResult<Response> {
    let d = s.app.conductor.get_file(&id, &q.path).await?;
    let (content_type, suffix) = match d.kind {
        conductor_service::files::DownloadKind::File => ("application/octet-stream", ""),
        conductor_service::files::DownloadKind::Archive => ("application/x-tar", ".tar"),
    };
    let name = format!("{}{suffix}", attachment_name(&d.name));
    let mut response = Body::from_stream(d.stream).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(size) = d.size {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::attachment_name;

    #[test]
    fn attachment_names_are_plain() {
        assert_eq!(attachment_name("a.txt"), "a.txt");
        assert_eq!(attachment_name("\"><img src=x>.txt"), "___img_src_x_.txt");
        assert_eq!(attachment_name("..."), "download");
    }
}
