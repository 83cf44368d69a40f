//! MCP over streamable HTTP, served by the HTTP API at `/mcp` (next to the REST routes, on
//! the same address, behind the same `Host` check and bearer token).
//!
//! Each MCP session gets its own [`WorkspaceTools`] over the one shared [`Conductor`];
//! every session's detached operations hold the same in-flight lock, so [`McpHttp::drain`]
//! can wait for all of them when the server stops.

use std::sync::Arc;

use conductor_service::Conductor;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};

use crate::{WorkspaceTools, DRAIN};

/// The `/mcp` endpoint: an axum-mountable service plus what shutdown needs.
pub struct McpHttp {
    pub service: StreamableHttpService<WorkspaceTools, LocalSessionManager>,
    tools: WorkspaceTools,
    stop: Box<dyn Fn() + Send + Sync>,
}

impl McpHttp {
    /// The endpoint for `conductor`. `max_body` bounds a request body (the API's
    /// `network.max_body_size`).
    pub fn new(conductor: Arc<Conductor>, max_body: usize) -> McpHttp {
        // The API checks `Host` (DNS rebinding) and the token before a request gets here;
        // a request from a web page (it carries `Origin`) is refused.
        let config = StreamableHttpServerConfig::default()
            .disable_allowed_hosts()
            .enforce_origin_validation()
            .with_max_request_body_bytes(max_body);
        let token = config.cancellation_token.clone();
        let tools = WorkspaceTools::new(conductor);
        let prototype = tools.clone();
        let service = StreamableHttpService::new(
            move || Ok(prototype.clone()),
            Arc::new(LocalSessionManager::default()),
            config,
        );
        McpHttp {
            service,
            tools,
            stop: Box::new(move || token.cancel()),
        }
    }

    /// Ends every session and its event streams (a client's open `GET /mcp` would otherwise
    /// hold the HTTP server's graceful shutdown up); new requests are refused.
    pub fn close(&self) {
        (self.stop)();
    }

    /// Waits (up to [`DRAIN`]) for tool operations still running, e.g. a workspace being
    /// created for a call whose client went away.
    pub async fn drain(&self) {
        if tokio::time::timeout(DRAIN, self.tools.inflight.write()).await.is_err() {
            tracing::warn!(
                "MCP operations still running after {}s; they end with the process",
                DRAIN.as_secs()
            );
        }
    }
}
