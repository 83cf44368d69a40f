//! The conductor HTTP API: axum routes over [`Conductor`].
//!
//! `router` assembles the routes (one module per resource under `routes/`) with the
//! guards every request passes, outermost first: a request log line, `Connection: close`
//! on errors to requests with a body (their rest may be unread), the body size limit
//! (`network.max_body_size`), the `Host` check against DNS rebinding ([`host`]), and the
//! bearer token when `security.api_key_required` is on ([`auth`]). Handlers only parse
//! and validate, then call the service; every failure becomes an [`ApiError`], whose one
//! `IntoResponse` writes `{"error":{"code","message","field"}}`.
//!
//! The web dashboard under `/ui` ([`ui`]) is merged in behind the same guards; the token
//! middleware also accepts its session cookie.
//!
//! The routes are registered through `utoipa_axum`, so the OpenAPI document ([`openapi`])
//! is generated from the same list and cannot drift from what is served. `/mcp` is the
//! one route outside it: the MCP tools over streamable HTTP (`conductor_mcp::http`),
//! behind the same guards.

pub mod auth;
pub mod error;
pub mod extract;
pub mod host;
pub mod openapi;
pub mod routes;
pub mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use conductor_service::{Conductor, Result, ServiceError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{ApiError, ApiResult};

use routes::{egress, environments, files, lifecycle, secrets, snapshots, system, tasks, workspaces};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub conductor: Arc<Conductor>,
    /// `network.max_body_size` in bytes.
    pub body_limit: usize,
    /// Turns `true` when the server begins to shut down; long-lived responses (log
    /// streams, `?wait=true`) end then instead of holding the shutdown up.
    pub closing: watch::Receiver<bool>,
    pub openapi: Arc<utoipa::openapi::OpenApi>,
}

/// Every route, with its OpenAPI description.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(tasks::submit_tasks, tasks::list_tasks))
        .routes(routes!(tasks::get_task))
        .routes(routes!(tasks::task_logs))
        .routes(routes!(tasks::cancel_task))
        .routes(routes!(workspaces::create_workspace, workspaces::list_workspaces))
        .routes(routes!(workspaces::get_workspace, workspaces::delete_workspace))
        .routes(routes!(workspaces::exec))
        .routes(routes!(lifecycle::pause_workspace))
        .routes(routes!(lifecycle::resume_workspace))
        .routes(routes!(lifecycle::suspend_workspace))
        .routes(routes!(lifecycle::stop_workspace))
        .routes(routes!(lifecycle::start_workspace))
        .routes(routes!(workspaces::fork_workspace))
        .routes(routes!(egress::workspace_egress))
        .routes(routes!(files::put_files, files::get_files, files::delete_files))
        .routes(routes!(snapshots::create_snapshot, snapshots::list_snapshots))
        .routes(routes!(snapshots::restore_snapshot))
        .routes(routes!(snapshots::delete_snapshot))
        .routes(routes!(secrets::put_secret, secrets::list_secrets))
        .routes(routes!(secrets::get_secret, secrets::delete_secret))
        .routes(routes!(environments::list_environments))
        .routes(routes!(system::health))
        .routes(routes!(system::metrics))
        .routes(routes!(system::openapi_json))
}

/// The OpenAPI 3 document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().split_for_parts().1
}

/// The complete application for a server listening on `local`, and the MCP endpoint it
/// mounts at `/mcp` (the caller closes and drains it at shutdown). Reads (or creates) the
/// API key file when `security.api_key_required` is on.
fn router(
    conductor: Arc<Conductor>,
    local: SocketAddr,
    closing: watch::Receiver<bool>,
) -> Result<(
    Router,
    Arc<conductor_mcp::http::McpHttp>,
    Option<Arc<conductor_e2b::E2b>>,
)> {
    let (routes, api) = api_routes().split_for_parts();
    let body_limit = usize::try_from(conductor.config.network.max_body_size.bytes()).unwrap_or(usize::MAX);
    let key = if conductor.config.security.api_key_required {
        Some(Arc::new(auth::ApiKey::load_or_create(&auth::key_path(
            &conductor.config,
            &conductor.paths,
        ))?))
    } else {
        None
    };
    let mcp = Arc::new(conductor_mcp::http::McpHttp::new(conductor.clone(), body_limit));
    let e2b = conductor
        .config
        .e2b
        .enabled
        .then(|| conductor_e2b::E2b::new(conductor.clone(), key.as_ref().map(|k| k.token().to_string())));
    let state = AppState {
        conductor,
        body_limit,
        closing,
        openapi: Arc::new(api),
    };
    let dashboard = ui::router(ui::UiState {
        app: state.clone(),
        key: key.clone(),
        builds: Default::default(),
    });
    let mut app = routes
        .route_service("/mcp", mcp.service.clone())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not support the method",
            )
        })
        .with_state(state)
        .merge(dashboard);
    if let Some(key) = key {
        app = app.layer(middleware::from_fn_with_state(key, auth::require_token));
    }
    // The E2B API has its own authentication (E2B's headers), so it goes before ours.
    if let Some(e2b) = &e2b {
        app = app.layer(middleware::from_fn_with_state(e2b.clone(), conductor_e2b::dispatch));
    }
    let policy = Arc::new(host::HostPolicy::new(local.ip()));
    let app = app
        .layer(middleware::from_fn_with_state(policy, host::check_host))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(close_after_refused_body))
        .layer(middleware::from_fn(log_request));
    Ok((app, mcp, e2b))
}

/// Adds `Connection: close` to an error response for a request that carried a body.
///
/// A refusal (413 before reading, 415, 401, a 400 on a partly read upload) can leave
/// the rest of the body unread on the connection. hyper then closes the connection
/// after the response, but the response itself said keep-alive, so a client that
/// reuses it for its next request sees the connection drop mid-request. Saying `close`
/// up front makes every client open a fresh connection instead.
async fn close_after_refused_body(req: Request, next: Next) -> Response {
    use axum::http::header;
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    let mut response = next.run(req).await;
    if has_body && (response.status().is_client_error() || response.status().is_server_error()) {
        response
            .headers_mut()
            .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    response
}

tokio::task_local! {
    /// The id of the request being answered (see [`log_request`]).
    static REQUEST_ID: String;
}

/// The id of the request being answered, inside a handler or a layer under [`log_request`].
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Gives each request an id, answers it in `X-Request-Id`, runs the request inside a
/// `request` span holding the id (so every log line about it carries the id, and error
/// bodies quote it: [`ApiError`]), and logs one line per request: method, path, status,
/// duration.
async fn log_request(req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let span = tracing::info_span!("request", request_id = %id);
    let start = Instant::now();
    let mut response = REQUEST_ID
        .scope(id.clone(), next.run(req))
        .instrument(span.clone())
        .await;
    span.in_scope(|| {
        tracing::info!(
            "{method} {path} -> {} in {} ms",
            response.status().as_u16(),
            start.elapsed().as_millis()
        )
    });
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// An API server bound to its listener: [`Server::run`] serves until shutdown;
/// [`Server::mcp`] is the MCP endpoint, whose tool operations the process waits for
/// ([`conductor_mcp::http::McpHttp::drain`]) once the HTTP side has stopped.
pub struct Server {
    app: Router,
    listener: TcpListener,
    local: SocketAddr,
    closing: watch::Sender<bool>,
    mcp: Arc<conductor_mcp::http::McpHttp>,
    /// The E2B API, when on (its lease reaper runs while the server does).
    e2b: Option<Arc<conductor_e2b::E2b>>,
}

impl Server {
    /// Builds the application for `listener` (the API key file exists when this returns).
    pub fn new(conductor: Arc<Conductor>, listener: TcpListener) -> Result<Server> {
        let local = listener
            .local_addr()
            .map_err(|e| ServiceError::host("read the listening address", e))?;
        let (closing, rx) = watch::channel(false);
        let (app, mcp, e2b) = router(conductor, local, rx)?;
        Ok(Server {
            app,
            listener,
            local,
            closing,
            mcp,
            e2b,
        })
    }

    pub fn mcp(&self) -> Arc<conductor_mcp::http::McpHttp> {
        self.mcp.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting connections, ends
    /// long-lived responses and MCP sessions, and waits for the requests in flight.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Server {
            app,
            listener,
            local,
            closing,
            mcp,
            e2b,
        } = self;
        let reaper = e2b.map(conductor_e2b::reaper::spawn);
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                let _ = closing.send(true);
                mcp.close();
            })
            .await
            .map_err(|e| ServiceError::host(format!("serve HTTP on {local}"), e));
        if let Some(r) = reaper {
            r.abort();
        }
        served
    }
}

/// Serves the API on `listener` until `shutdown` completes (see [`Server::run`]), then
/// waits for MCP tool operations still running.
pub async fn serve(
    conductor: Arc<Conductor>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let server = Server::new(conductor, listener)?;
    let mcp = server.mcp();
    let served = server.run(shutdown).await;
    mcp.close();
    mcp.drain().await;
    served
}
