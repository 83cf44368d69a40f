//! conductor as a Model Context Protocol server: workspaces as tools an AI agent calls.
//!
//! `conductor mcp` serves MCP over stdio with the official Rust SDK (`rmcp`); the HTTP API
//! serves the same tools over streamable HTTP at `/mcp` ([`http::McpHttp`]). The tools
//! ([`tools::WorkspaceTools`]) drive an in-process [`Conductor`] the same way the CLI does:
//! create a workspace, run commands in it, read, write and list its files, snapshot and
//! restore it, read its egress audit (proxy mode), destroy it. File tools call the
//! service's file API, with its path rules (under `/workspace` only; [`files`]); command
//! output is bounded before it reaches the model ([`output`]).
//!
//! The server does not reconcile the data directory at start: another conductor (the HTTP
//! service) may share it and own what looks orphaned from here. On exit — the client closes
//! stdin, or SIGINT/SIGTERM — operations still running get [`DRAIN`] to finish so that no
//! workspace is left half made.

pub mod files;
pub mod http;
pub mod output;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use conductor_service::{Conductor, ServiceError};
use rmcp::ServiceExt;
use tokio::signal::unix::{signal, SignalKind};

pub use tools::WorkspaceTools;

/// How long operations still running at exit get to finish.
pub const DRAIN: Duration = Duration::from_secs(120);

/// Serves the tools over stdin/stdout until the client disconnects or a signal arrives.
/// Nothing else may write to stdout meanwhile (logs go to stderr).
pub async fn serve_stdio(conductor: Arc<Conductor>) -> Result<(), ServiceError> {
    let tools = WorkspaceTools::new(conductor);
    let inflight = tools.inflight.clone();
    let running = tools
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| ServiceError::host("start the MCP session on stdio", e))?;
    let stop = running.cancellation_token();
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| ServiceError::host("install a SIGTERM handler", e))?;
    let session = running.waiting();
    tokio::pin!(session);
    let ended = tokio::select! {
        r = &mut session => r,
        _ = tokio::signal::ctrl_c() => { stop.cancel(); session.await }
        _ = sigterm.recv() => { stop.cancel(); session.await }
    };
    match ended {
        Ok(reason) => tracing::info!("MCP session ended: {reason:?}"),
        Err(e) => tracing::warn!("MCP session ended abnormally: {e}"),
    }
    if tokio::time::timeout(DRAIN, inflight.write()).await.is_err() {
        tracing::warn!(
            "operations still running after {}s; they end with the process",
            DRAIN.as_secs()
        );
    }
    Ok(())
}
