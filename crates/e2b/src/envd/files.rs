//! envd's REST `/files`: download a file (`GET ?path=`), upload one or more (`POST`), as
//! the SDKs send it: a raw `application/octet-stream` body for `?path=`, or a
//! `multipart/form-data` body whose `file` parts are named by their path (with `?path=`
//! for a single part). Bodies stream straight to the service's file API (the workspace's
//! storage limit bounds them); answers are envd's: the written entries as
//! `[{"name","type","path"}]`, errors as `{"code","message"}`.

use std::io;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Query, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use conductor_service::files::{DownloadKind, PutOptions};
use conductor_service::ServiceError;
use futures_util::TryStreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::filesystem::absolute;
use super::{rest_error, Sandbox};

#[derive(Debug, Deserialize)]
pub(crate) struct FileQuery {
    path: Option<String>,
}

/// A service error as envd's REST answer.
pub(crate) fn service_rest_error(e: ServiceError) -> Response {
    let status = match &e {
        ServiceError::Invalid { .. } => StatusCode::BAD_REQUEST,
        ServiceError::NotFound { .. } => StatusCode::NOT_FOUND,
        ServiceError::Conflict(_) => StatusCode::BAD_REQUEST,
        ServiceError::TooLarge(_) | ServiceError::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
        ServiceError::WorkspaceExited(_) => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let message = match &e {
        ServiceError::NotFound { what } => format!("{what} was not found"),
        other => other.to_string(),
    };
    rest_error(status, message)
}

fn checked(path: Option<&str>) -> Result<String, Box<Response>> {
    let Some(path) = path.filter(|p| !p.is_empty()) else {
        return Err(Box::new(rest_error(StatusCode::BAD_REQUEST, "path: required")));
    };
    absolute(path, "path").map_err(|e| Box::new(rest_error(StatusCode::BAD_REQUEST, e.message)))
}

pub(crate) async fn download(Extension(s): Extension<Sandbox>, Query(q): Query<FileQuery>) -> Response {
    let path = match checked(q.path.as_deref()) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let d = match s.e2b.conductor.get_file(&s.id, &path).await {
        Ok(d) => d,
        Err(e) => return service_rest_error(e),
    };
    if d.kind == DownloadKind::Archive {
        return rest_error(
            StatusCode::BAD_REQUEST,
            format!("path: {path} is a directory, not a file"),
        );
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(size) = d.size {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    (StatusCode::OK, headers, Body::from_stream(d.stream)).into_response()
}

fn written(path: &str) -> Value {
    json!({
        "name": path.rsplit('/').next().unwrap_or(path),
        "type": "file",
        "path": path,
    })
}

pub(crate) async fn upload(Extension(s): Extension<Sandbox>, Query(q): Query<FileQuery>, req: Request) -> Response {
    let headers = req.headers().clone();
    if headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "identity")
    {
        return rest_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed uploads are not supported by conductor: upload without gzip",
        );
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        return upload_multipart(s, q, req).await;
    }
    let path = match checked(q.path.as_deref()) {
        Ok(p) => p,
        Err(r) => {
            super::drain(req.into_body()).await;
            return *r;
        }
    };
    let size = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = Box::pin(req.into_body().into_data_stream().map_err(io::Error::other));
    let opts = PutOptions { mode: None, size };
    match s.e2b.conductor.put_file(&s.id, &path, body, opts).await {
        Ok(w) => Json(json!([written(&w.path)])).into_response(),
        Err(e) => service_rest_error(e),
    }
}

async fn upload_multipart(s: Sandbox, q: FileQuery, req: Request) -> Response {
    let mut multipart = match Multipart::from_request(req, &()).await {
        Ok(m) => m,
        Err(e) => return rest_error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let mut out = Vec::new();
    let mut parts = 0usize;
    // A refusal reads (and drops) the rest of the body first, up to the drain limit.
    macro_rules! refuse {
        ($resp:expr) => {{
            let resp = $resp;
            let mut read = 0usize;
            while read <= super::DRAIN_LIMIT {
                match multipart.next_field().await {
                    Ok(Some(mut f)) => {
                        while let Ok(Some(b)) = f.chunk().await {
                            read += b.len();
                        }
                    }
                    _ => break,
                }
            }
            return resp;
        }};
    }
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return rest_error(StatusCode::BAD_REQUEST, format!("body: {e}")),
        };
        parts += 1;
        // A single part takes `?path=`; several are named by their file names.
        let name = match (parts, q.path.as_deref(), field.file_name()) {
            (1, Some(p), _) if !p.is_empty() => p.to_string(),
            (_, _, Some(f)) if !f.is_empty() => f.to_string(),
            _ => {
                drop(field);
                refuse!(rest_error(
                    StatusCode::BAD_REQUEST,
                    "path: each part needs a file name (its path)"
                ))
            }
        };
        let path = match checked(Some(&name)) {
            Ok(p) => p,
            Err(r) => {
                drop(field);
                refuse!(*r)
            }
        };
        // The part borrows the body: feed it through a channel beside the upload.
        let mut field = field;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<axum::body::Bytes>>(4);
        let feed = async move {
            loop {
                match field.chunk().await {
                    Ok(Some(b)) => {
                        if tx.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::other(e))).await;
                        return;
                    }
                }
            }
        };
        let body = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        let put = s.e2b.conductor.put_file(&s.id, &path, body, PutOptions::default());
        let ((), result) = tokio::join!(feed, put);
        match result {
            Ok(w) => out.push(written(&w.path)),
            Err(e) => return service_rest_error(e),
        }
    }
    if out.is_empty() {
        return rest_error(StatusCode::BAD_REQUEST, "body: no file part");
    }
    Json(Value::Array(out)).into_response()
}
