//! `/workspaces/{id}/files`: upload, download, list and delete files of a running
//! workspace, served by its agent (Podman's archive endpoints when the agent does not
//! answer; see `conductor_service::files`).
//!
//! Bodies stream both ways: an upload is passed on chunk by chunk as it arrives and may be
//! as large as the workspace's storage limit (`network.max_body_size`, which bounds JSON
//! bodies, does not apply here); a download is sent as the workspace produces it.

use std::io;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use conductor_service::files::{DownloadKind, FileEntry, PutOptions, Written};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::QueryParams;
use crate::AppState;

/// Header of a download: `file` (raw contents) or `directory` (a tar).
pub const KIND_HEADER: &str = "x-conductor-file-kind";
/// At most this much of a refused upload is read (and dropped) before the error is sent,
/// so that the client, still sending, gets to read the answer.
const DRAIN_LIMIT: u64 = 256 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// Query of `PUT /workspaces/{id}/files`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PutQuery {
    /// Relative to `/workspace`, or absolute under it. Missing parent directories are made.
    #[param(example = "src/main.py")]
    pub path: String,
    /// The body is a tar, unpacked into the directory `path` (made when missing).
    #[serde(default)]
    pub extract: bool,
    /// Permission bits of the file, octal (`755`); default 644 for a new file.
    #[param(example = "755")]
    pub mode: Option<String>,
}

/// Query of `GET /workspaces/{id}/files`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct GetQuery {
    /// Relative to `/workspace`, or absolute under it.
    #[param(example = "src")]
    pub path: String,
    /// List the directory as JSON instead of downloading it.
    #[serde(default)]
    pub list: bool,
}

/// Query of `DELETE /workspaces/{id}/files`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Relative to `/workspace`, or absolute under it; never `/workspace` itself.
    pub path: String,
    /// Delete a directory with its contents.
    #[serde(default)]
    pub recursive: bool,
}

/// What an upload wrote.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileWritten {
    /// Absolute path in the workspace.
    #[schema(example = "/workspace/src/main.py")]
    pub path: String,
    /// Bytes of file contents written.
    pub size: u64,
}

impl From<Written> for FileWritten {
    fn from(w: Written) -> Self {
        FileWritten {
            path: w.path,
            size: w.size,
        }
    }
}

/// One directory entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileInfo {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[schema(example = "file")]
    pub kind: String,
    pub size: u64,
    /// Permission bits, e.g. 420 (0644).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Last modification, milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    /// Target of a symlink, as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

impl From<FileEntry> for FileInfo {
    fn from(e: FileEntry) -> Self {
        FileInfo {
            name: e.name,
            kind: serde_json::to_value(e.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            size: e.size,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime_ms: e.mtime_ms,
            link_target: e.link_target,
        }
    }
}

/// Response of `GET /workspaces/{id}/files?list=true`.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileList {
    /// The listed directory as asked.
    pub path: String,
    /// Sorted by name; links are not followed.
    pub entries: Vec<FileInfo>,
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The request body as a stream for the service, fed by a task. The task starts reading
/// when the service first asks for data. Once the service stops reading (it refused the
/// upload), the task reads on and drops the rest (up to a limit), so that a client still
/// sending gets to read the answer instead of a reset connection. A request refused
/// before its body was asked for is not read at all when the client waits for
/// `100 Continue` (`Expect: 100-continue`, as curl does for large bodies): it gets the
/// answer instead of the go-ahead.
fn body_stream(
    body: Body,
    waits_for_continue: bool,
) -> (conductor_core::engine::ByteStream, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<io::Result<axum::body::Bytes>>(4);
    let (start, started) = tokio::sync::oneshot::channel::<()>();
    let pump = tokio::spawn(async move {
        let mut forwarding = started.await.is_ok();
        if !forwarding && waits_for_continue {
            return;
        }
        let mut data = body.into_data_stream();
        let mut dropped = 0u64;
        while let Some(chunk) = data.next().await {
            match chunk {
                Ok(bytes) if forwarding => forwarding = tx.send(Ok(bytes)).await.is_ok(),
                Ok(bytes) => {
                    dropped += bytes.len() as u64;
                    if dropped > DRAIN_LIMIT {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(io::Error::other(e))).await;
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold((rx, Some(start)), |(mut rx, start)| async move {
        if let Some(start) = start {
            let _ = start.send(());
        }
        rx.recv().await.map(|item| (item, (rx, None)))
    });
    (Box::pin(stream), pump)
}

fn parse_mode(mode: Option<&str>) -> ApiResult<Option<u32>> {
    mode.map(|m| {
        u32::from_str_radix(m, 8).ok().filter(|n| *n <= 0o777).ok_or_else(|| {
            ApiError::invalid(
                "mode",
                format!("{m:?} is not an octal permission mode such as 644 or 755"),
            )
        })
    })
    .transpose()
}

/// Upload a file (raw body) or a tar unpacked into a directory (`extract=true`).
#[utoipa::path(
    put, path = "/workspaces/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Workspace id or container name"), PutQuery),
    request_body(
        description = "The file's contents, or with `extract=true` a tar (members relative to `path`; files, directories and symlinks)",
        content(("application/octet-stream"), ("application/x-tar"))
    ),
    responses(
        (status = 200, description = "Written, as the workspace user", body = FileWritten),
        (status = 400, description = "Invalid `path` (`..`, outside /workspace, through a symlink leading outside, NUL, too long), `mode`, or a refused tar member (field `body`)", body = ErrorBody),
        (status = 404, description = "No such workspace", body = ErrorBody),
        (status = 409, description = "The workspace is not running, or the path is a directory (without `extract`) or a file (with it)", body = ErrorBody),
        (status = 413, description = "The body is larger than the workspace's storage limit (`limits.volume_size`)", body = ErrorBody),
        (status = 507, description = "The workspace's volume is full", body = ErrorBody),
    )
)]
pub async fn put_files(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<PutQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<FileWritten>> {
    let mode = parse_mode(q.mode.as_deref())?;
    let size = declared_length(&headers);
    let waits_for_continue = headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    let (stream, pump) = body_stream(body, waits_for_continue);
    let c = &state.conductor;
    let result = if q.extract {
        c.put_archive(&id, &q.path, stream, size).await
    } else {
        c.put_file(&id, &q.path, stream, PutOptions { mode, size }).await
    };
    match result {
        Ok(w) => Ok(Json(w.into())),
        Err(e) => {
            let _ = tokio::time::timeout(DRAIN_TIME, pump).await;
            Err(e.into())
        }
    }
}

/// Download a file (raw) or a directory (tar), or list a directory (`list=true`).
#[utoipa::path(
    get, path = "/workspaces/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Workspace id or container name"), GetQuery),
    responses(
        (status = 200, description = "A file's contents (`x-conductor-file-kind: file`, with `Content-Length`), a tar of a directory (`x-conductor-file-kind: directory`; entries named from the directory's name, symlinks stored as links), or with `list=true` the listing",
            headers(("x-conductor-file-kind" = String, description = "`file` or `directory` (downloads only)")),
            content(
                ("application/octet-stream"),
                ("application/x-tar"),
                (FileList = "application/json"),
            )
        ),
        (status = 400, description = "Invalid `path`", body = ErrorBody),
        (status = 404, description = "No such workspace or file", body = ErrorBody),
        (status = 409, description = "The workspace is not running, or the path is not a regular file or directory (or, with `list`, not a directory)", body = ErrorBody),
    )
)]
pub async fn get_files(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<GetQuery>,
) -> ApiResult<Response> {
    let c = &state.conductor;
    if q.list {
        let entries = c.list_files(&id, &q.path).await?;
        let list = FileList {
            path: q.path,
            entries: entries.into_iter().map(Into::into).collect(),
        };
        return Ok(Json(list).into_response());
    }
    let download = c.get_file(&id, &q.path).await?;
    let (content_type, kind) = match download.kind {
        DownloadKind::File => ("application/octet-stream", "file"),
        DownloadKind::Archive => ("application/x-tar", "directory"),
    };
    let mut response = Body::from_stream(download.stream).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(KIND_HEADER, HeaderValue::from_static(kind));
    if let Some(size) = download.size {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(response)
}

/// Delete a file, a symlink (not its target) or a directory (`recursive` for a non-empty one).
#[utoipa::path(
    delete, path = "/workspaces/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Workspace id or container name"), DeleteQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid `path`, or `/workspace` itself", body = ErrorBody),
        (status = 404, description = "No such workspace or file", body = ErrorBody),
        (status = 409, description = "The workspace is not running, or the directory is not empty (without `recursive`)", body = ErrorBody),
    )
)]
pub async fn delete_files(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<DeleteQuery>,
) -> ApiResult<StatusCode> {
    state.conductor.delete_file(&id, &q.path, q.recursive).await?;
    Ok(StatusCode::NO_CONTENT)
}
