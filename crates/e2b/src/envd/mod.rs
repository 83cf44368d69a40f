//! envd, E2B's in-sandbox daemon, served by conductor for requests carrying
//! `E2b-Sandbox-Id`: the process and filesystem services on the Connect protocol, the REST
//! `/files` (upload and download), `/health` and `/envs`.
//!
//! Every request is first checked here ([`sandbox_guard`]): the sandbox must be a live
//! workspace (else the 502 "sandbox … was not found" that E2B's proxy answers, which the
//! SDKs turn into their "sandbox is not running" error), the port must be envd's, the
//! envd access token must match when authentication is on, and the user (the SDKs' Basic
//! `Authorization`, or `username`) must be the workspace user.

pub(crate) mod files;
pub(crate) mod filesystem;
pub(crate) mod process;
pub(crate) mod watch;

use std::sync::{Arc, Weak};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use conductor_core::lifecycle::WorkspaceState;
use serde_json::json;

use crate::connect::{self, Code, RpcError};
use crate::{E2b, ENVD_PORT};

/// The E2B state every handler reaches (weak: the state holds the routers).
#[derive(Clone)]
pub(crate) struct Shared(pub(crate) Weak<E2b>);

impl Shared {
    pub(crate) fn get(&self) -> Option<Arc<E2b>> {
        self.0.upgrade()
    }
}

/// The sandbox a request addresses, checked.
#[derive(Clone)]
pub(crate) struct Sandbox {
    pub(crate) id: String,
    pub(crate) e2b: Arc<E2b>,
}

pub(crate) fn routes(shared: Shared) -> Router {
    Router::new()
        .route("/process.Process/{method}", post(process::call))
        .route("/filesystem.Filesystem/{method}", post(filesystem::call))
        .route("/files", get(files::download).post(files::upload))
        .route("/health", get(health))
        .route("/envs", get(envs))
        .fallback(|| async { rest_error(StatusCode::NOT_FOUND, "no such envd endpoint on conductor") })
        .layer(middleware::from_fn_with_state(shared, sandbox_guard))
        // Uploads stream to the workspace; its storage limit bounds them, not the body limit.
        .layer(DefaultBodyLimit::disable())
}

/// A REST error of envd: `{"code": <status>, "message"}`.
pub(crate) fn rest_error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "code": status.as_u16(), "message": message.into() })),
    )
        .into_response()
}

/// The answer of E2B's proxy for a sandbox that is not there.
fn not_found(id: &str) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        Json(json!({
            "code": 502,
            "message": format!("The sandbox {id} was not found"),
            "sandboxId": id,
        })),
    )
        .into_response()
}

/// The user a request names: Basic `Authorization` (`user:`), else `username=`.
fn requested_user(req: &Request) -> Option<String> {
    if let Some(v) = req.headers().get("authorization").and_then(|v| v.to_str().ok()) {
        if let Some(b64) = v.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
            let text = String::from_utf8_lossy(&decoded).into_owned();
            return Some(text.split(':').next().unwrap_or("").to_string());
        }
    }
    req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == "username")
            .map(|(_, v)| v.to_string())
    })
}

/// Users the SDKs may name: E2B's default user, the workspace user's name and uid.
fn user_ok(user: &str) -> bool {
    matches!(user, "" | "user" | "agent" | "1000")
}

/// Most bytes of a refused request's body read (and dropped) before the answer, so that a
/// client still sending it gets to read the answer instead of a broken pipe.
pub(crate) const DRAIN_LIMIT: usize = 4 << 20;

/// Reads and drops up to [`DRAIN_LIMIT`] bytes of `body`.
pub(crate) async fn drain(body: axum::body::Body) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut read = 0usize;
    while read <= DRAIN_LIMIT {
        match body.frame().await {
            Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
            _ => return,
        }
    }
}

/// A refusal of the guard in the shape the call expects: a Connect stream's end for a
/// streaming RPC, a Connect error for a unary one, envd's REST error otherwise; the body is
/// drained first.
async fn refuse(req: Request, rpc: bool, status: StatusCode, e: RpcError) -> Response {
    let content_type = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    drain(req.into_body()).await;
    if content_type.starts_with("application/connect+proto") {
        connect::stream_error(connect::Codec::Proto, e)
    } else if content_type.starts_with("application/connect+") {
        connect::stream_error(connect::Codec::Json, e)
    } else if rpc {
        connect::error_response(&e)
    } else {
        rest_error(status, e.message)
    }
}

async fn sandbox_guard(State(shared): State<Shared>, mut req: Request, next: Next) -> Response {
    let Some(e2b) = shared.get() else {
        return rest_error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down");
    };
    let headers = req.headers();
    let id = headers
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if let Some(port) = headers.get("e2b-sandbox-port").and_then(|v| v.to_str().ok()) {
        if port.trim() != ENVD_PORT.to_string() {
            return (
                StatusCode::BAD_GATEWAY,
                Json(json!({
                    "code": 502,
                    "message": format!(
                        "port {port} is not open in sandbox {id}: conductor forwards only envd ({ENVD_PORT}) this way; \
                         publish workspace ports with conductor instead"
                    ),
                    "sandboxId": id,
                })),
            )
                .into_response();
        }
    }
    let live = e2b.conductor.get_workspace(&id).ok().filter(|w| {
        matches!(
            w.state,
            WorkspaceState::Running | WorkspaceState::Paused | WorkspaceState::Suspended
        )
    });
    let Some(workspace) = live else {
        return not_found(&id);
    };
    if workspace.state != WorkspaceState::Running {
        let no_auto_resume = e2b
            .conductor
            .store
            .get_lease(&workspace.id)
            .ok()
            .flatten()
            .is_some_and(|l| !l.auto_resume);
        if no_auto_resume {
            return (
                StatusCode::BAD_GATEWAY,
                Json(json!({
                    "code": 502,
                    "message": format!("sandbox {id} is paused and was created without auto-resume: connect or resume it first"),
                    "sandboxId": id,
                })),
            )
                .into_response();
        }
    }
    let rpc = req.uri().path().contains('.');
    if req.uri().path() != "/health" {
        if let Some(expected) = e2b.envd_token(&workspace.id) {
            let presented = headers
                .get("x-access-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let ok: bool = subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), expected.as_bytes()).into();
            if !ok {
                let message =
                    "the envd access token is missing or wrong (connect through the E2B API with a valid key)";
                return refuse(
                    req,
                    rpc,
                    StatusCode::UNAUTHORIZED,
                    RpcError::new(Code::Unauthenticated, message),
                )
                .await;
            }
        }
    }
    if let Some(user) = requested_user(&req) {
        if !user_ok(&user) {
            let message = format!(
                "user '{user}' is not available: conductor runs commands and file operations as the workspace user (uid 1000)"
            );
            return refuse(req, rpc, StatusCode::BAD_REQUEST, RpcError::invalid(message)).await;
        }
    }
    req.extensions_mut().insert(Sandbox { id: workspace.id, e2b });
    next.run(req).await
}

async fn health(Extension(_sandbox): Extension<Sandbox>) -> StatusCode {
    StatusCode::NO_CONTENT
}

/// The environment a command of the sandbox starts with.
async fn envs(Extension(sandbox): Extension<Sandbox>) -> Response {
    let req = conductor_service::exec::ExecRequest::new(conductor_service::exec::Command::Argv(vec![
        "env".into(),
        "-0".into(),
    ]));
    match sandbox.e2b.conductor.exec_collect(&sandbox.id, req).await {
        Ok((_, out, _)) => {
            let map: serde_json::Map<String, serde_json::Value> = out
                .split('\0')
                .filter_map(|kv| kv.split_once('='))
                .filter(|(k, _)| !k.starts_with("CONDUCTOR_"))
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            Json(map).into_response()
        }
        Err(e) => files::service_rest_error(e),
    }
}

/// Runs a unary Connect call: decode, handle, encode.
pub(crate) async fn unary<Req, Resp, F, Fut>(headers: &HeaderMap, body: &Bytes, f: F) -> Response
where
    Req: connect::Msg,
    Resp: connect::Msg,
    F: FnOnce(Req) -> Fut,
    Fut: std::future::Future<Output = Result<Resp, RpcError>>,
{
    match connect::unary_request::<Req>(headers, body) {
        Ok((codec, m)) => connect::unary_response(codec, f(m).await),
        Err((_, e)) => connect::error_response(&e),
    }
}

/// The method part of a Connect path, for an unknown one's error.
pub(crate) fn unknown_method(service: &str, method: &Path<String>) -> Response {
    connect::error_response(&RpcError::unimplemented(format!(
        "{service}/{} is not a method conductor serves",
        method.0
    )))
}
