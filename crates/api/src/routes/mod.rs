//! HTTP handlers, one module per resource. Handlers parse and validate the request, call
//! the service, and shape the response; they own no state and make no decisions.

pub mod egress;
pub mod environments;
pub mod files;
pub mod lifecycle;
pub mod secrets;
pub mod snapshots;
pub mod system;
pub mod tasks;
pub mod workspaces;

use std::future::Future;

use axum::http::StatusCode;

use crate::error::{ApiError, ApiResult};

/// Runs a state-changing service call on its own task, so that a client that hangs up
/// does not cancel a workflow half-way (a workspace half created, a volume half removed).
pub(crate) async fn detached<T, F>(fut: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: Future<Output = conductor_service::Result<T>> + Send + 'static,
{
    match tokio::spawn(fut).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => {
            tracing::error!("request task failed: {e}");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error; the service log has the details",
            ))
        }
    }
}
