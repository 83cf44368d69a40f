//! The E2B-compatible API: E2B's control plane (`/sandboxes`, `/v2/sandboxes`) and its
//! in-sandbox daemon, envd (the process and filesystem services on the Connect protocol,
//! `/files`, `/health`, `/envs`), served on conductor's API port over conductor's own
//! workspaces. The unmodified E2B SDKs work with `E2B_API_URL` and `E2B_SANDBOX_URL` both
//! set to the API's address (docs/e2b.md).
//!
//! There is no second sandbox implementation here: a sandbox is a workspace (its id is the
//! sandbox id, its agent id `e2b`), commands go through the workspace's agent, files
//! through the service's file API, and the lease (template, metadata, expiry) is a row of
//! the store. Requests of the sandbox plane are told apart by the `E2b-Sandbox-Id` header
//! the SDKs send when `E2B_SANDBOX_URL` is set ([`dispatch`]).

pub mod connect;
mod control;
mod envd;
pub mod reaper;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use conductor_service::Conductor;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower::ServiceExt;

/// The envd message types, generated from `proto/` (prost for binary protobuf, pbjson for
/// the proto3 JSON mapping).
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod process {
        include!(concat!(env!("OUT_DIR"), "/process.rs"));
        include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
    }
    pub mod filesystem {
        include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
        include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
    }
}

/// The envd version conductor reports: the SDKs turn features on by it (0.5.7: raw
/// octet-stream uploads, stdin, `CloseStdin`, no default user).
pub const ENVD_VERSION: &str = "0.5.7";
/// The port the SDKs address envd on (`E2b-Sandbox-Port`).
pub const ENVD_PORT: u16 = 49983;
/// The agent id of the workspaces this API makes.
pub const AGENT_ID: &str = "e2b";

/// What the E2B handlers share.
pub struct E2b {
    pub(crate) conductor: Arc<Conductor>,
    /// The API token when `security.api_key_required` is on.
    key: Option<String>,
    pub(crate) processes: envd::process::Processes,
    pub(crate) watchers: envd::watch::Watchers,
    control: Router,
    envd: Router,
}

impl E2b {
    /// The E2B API over `conductor`; `key` is the API token when authentication is on.
    pub fn new(conductor: Arc<Conductor>, key: Option<String>) -> Arc<E2b> {
        Arc::new_cyclic(|weak| {
            let me = envd::Shared(weak.clone());
            E2b {
                conductor,
                key,
                processes: Default::default(),
                watchers: Default::default(),
                control: control::routes(me.clone()),
                envd: envd::routes(me),
            }
        })
    }

    /// Whether `presented` is the API token (always, when authentication is off).
    pub(crate) fn api_key_ok(&self, presented: Option<&str>) -> bool {
        match (&self.key, presented) {
            (None, _) => true,
            (Some(key), Some(p)) => p.trim().as_bytes().ct_eq(key.as_bytes()).into(),
            (Some(_), None) => false,
        }
    }

    /// The envd access token of a sandbox (when authentication is on): derived from the API
    /// token and the sandbox id, so it needs no storage and dies with a key rotation.
    pub(crate) fn envd_token(&self, sandbox: &str) -> Option<String> {
        self.key.as_ref().map(|key| {
            let mut h = Sha256::new();
            h.update(b"conductor-e2b-envd\0");
            h.update(key.as_bytes());
            h.update(b"\0");
            h.update(sandbox.as_bytes());
            hex::encode(&h.finalize()[..20])
        })
    }
}

/// An error of E2B's REST APIs (control plane and envd's `/files`): `{"code": <status>,
/// "message"}`.
#[derive(Debug)]
pub(crate) struct HttpError {
    status: axum::http::StatusCode,
    message: String,
}

/// An [`HttpError`].
pub(crate) fn http_error(status: axum::http::StatusCode, message: impl Into<String>) -> HttpError {
    HttpError {
        status,
        message: message.into(),
    }
}

impl axum::response::IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

/// Middleware in front of conductor's own routes: a request carrying `E2b-Sandbox-Id` goes
/// to envd, one under `/sandboxes` or `/v2/sandboxes` to the control plane (each with its
/// own authentication, the E2B headers), anything else on to conductor.
pub async fn dispatch(State(e2b): State<Arc<E2b>>, req: Request, next: Next) -> Response {
    let router = if req.headers().contains_key("e2b-sandbox-id") {
        Some(e2b.envd.clone())
    } else {
        let path = req.uri().path();
        let control = ["/sandboxes", "/v2/sandboxes"]
            .iter()
            .any(|p| path == *p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/')));
        control.then(|| e2b.control.clone())
    };
    match router {
        Some(r) => match r.oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        },
        None => next.run(req).await,
    }
}
