//! `/workspaces/{id}/snapshots`: take, list, restore and delete snapshots of a workspace.
//!
//! A snapshot holds the workspace's whole state: its root file system changes and its data
//! volume (`/workspace`); restoring brings back exactly that state. See
//! `conductor_service::snapshots` for how they are stored and what they cost.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use conductor_service::snapshots::SnapshotInfo;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::detached;
use super::workspaces::Workspace;
use crate::error::{ApiResult, ErrorBody};
use crate::extract::JsonBody;
use crate::AppState;

/// Body of `POST /workspaces/{id}/snapshots`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Lowercase letters, digits, `-`, `_`, `.`; at most 63 characters.
    #[schema(example = "before-deployment")]
    pub name: String,
    /// Replace an existing snapshot of that name (otherwise 409).
    #[serde(default)]
    pub overwrite: bool,
}

/// A snapshot of a workspace.
#[derive(Debug, Serialize, ToSchema)]
pub struct Snapshot {
    #[schema(example = "before-deployment")]
    pub name: String,
    pub workspace_id: String,
    /// RFC 3339 UTC.
    #[schema(example = "2024-05-01T12:34:56.789Z")]
    pub created_at: String,
    /// Allocated size of the volume copy plus the root file system layer; blocks shared
    /// with the workspace or other snapshots are counted in full (an upper bound).
    pub size_bytes: u64,
    /// `complete` (only complete snapshots are listed).
    #[schema(example = "complete")]
    pub state: String,
}

impl From<SnapshotInfo> for Snapshot {
    fn from(s: SnapshotInfo) -> Self {
        Snapshot {
            name: s.name,
            workspace_id: s.workspace_id,
            created_at: s.created_at,
            size_bytes: s.size_bytes,
            state: s.state.as_str().to_string(),
        }
    }
}

/// Response of `GET /workspaces/{id}/snapshots`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

/// Take a snapshot of a workspace; a running one is paused meanwhile and keeps running.
#[utoipa::path(
    post, path = "/workspaces/{id}/snapshots", tag = "snapshots",
    params(("id" = String, Path, description = "Workspace id, container name, or agent id with one live workspace")),
    request_body = CreateSnapshot,
    responses(
        (status = 201, description = "The snapshot is complete", body = Snapshot),
        (status = 400, description = "Invalid name (field `name`)", body = ErrorBody),
        (status = 404, description = "No such workspace", body = ErrorBody),
        (status = 409, description = "The name exists (ask for `overwrite`), the workspace is not running or stopped, or another snapshot operation runs on it", body = ErrorBody),
    )
)]
pub async fn create_snapshot(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CreateSnapshot>,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    let c = state.conductor.clone();
    let info = detached(async move { c.create_snapshot(&id, &body.name, body.overwrite).await }).await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

/// List a workspace's snapshots, oldest first.
#[utoipa::path(
    get, path = "/workspaces/{id}/snapshots", tag = "snapshots",
    params(("id" = String, Path, description = "Workspace id, container name, or agent id with one live workspace")),
    responses(
        (status = 200, description = "Complete snapshots, oldest first", body = SnapshotList),
        (status = 404, description = "No such workspace", body = ErrorBody),
    )
)]
pub async fn list_snapshots(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<SnapshotList>> {
    let list = state.conductor.list_snapshots(&id)?;
    Ok(Json(SnapshotList {
        snapshots: list.into_iter().map(Into::into).collect(),
    }))
}

/// Restore a workspace to a snapshot: files, owners and modes in `/workspace` and outside
/// it are as they were; the container is re-created and runs afterwards.
#[utoipa::path(
    post, path = "/workspaces/{id}/snapshots/{name}/restore", tag = "snapshots",
    params(
        ("id" = String, Path, description = "Workspace id, container name, or agent id with one live workspace"),
        ("name" = String, Path, description = "Snapshot name"),
    ),
    responses(
        (status = 200, description = "The restored workspace", body = Workspace),
        (status = 400, description = "Invalid name (field `name`)", body = ErrorBody),
        (status = 404, description = "No such workspace or snapshot", body = ErrorBody),
        (status = 409, description = "A task runs in the workspace, or another snapshot operation does", body = ErrorBody),
    )
)]
pub async fn restore_snapshot(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<Json<Workspace>> {
    let c = state.conductor.clone();
    let info = detached(async move { c.restore_snapshot(&id, &name).await }).await?;
    Ok(Json(info.into()))
}

/// Delete a snapshot (its image and its volume copy).
#[utoipa::path(
    delete, path = "/workspaces/{id}/snapshots/{name}", tag = "snapshots",
    params(
        ("id" = String, Path, description = "Workspace id, container name, or agent id with one live workspace"),
        ("name" = String, Path, description = "Snapshot name"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid name (field `name`)", body = ErrorBody),
        (status = 404, description = "No such workspace or snapshot", body = ErrorBody),
        (status = 409, description = "Another snapshot operation runs on the workspace", body = ErrorBody),
    )
)]
pub async fn delete_snapshot(
    State(state): State<AppState>,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let c = state.conductor.clone();
    detached(async move { c.delete_snapshot(&id, &name).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}
