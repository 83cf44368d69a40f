//! `POST /workspaces/{id}/{pause,resume,suspend,stop,start}`: the lifecycle of a workspace
//! between creation and removal (see `conductor_service::pause`).

use axum::extract::{Path, State};
use axum::Json;

use super::detached;
use super::workspaces::Workspace;
use crate::error::{ApiResult, ErrorBody};
use crate::AppState;

/// Freeze every process of a running workspace (cgroup freezer): no CPU, memory kept.
/// Exec, files and tasks resume it on their own unless `isolated_workspace.auto_resume` is
/// off.
#[utoipa::path(
    post, path = "/workspaces/{id}/pause", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or container name")),
    responses(
        (status = 200, description = "The paused workspace", body = Workspace),
        (status = 404, description = "No such workspace", body = ErrorBody),
        (status = 409, description = "The workspace is not running (its state is named)", body = ErrorBody),
    )
)]
pub async fn pause_workspace(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Workspace>> {
    let c = state.conductor.clone();
    let info = detached(async move { c.pause_workspace(&id).await }).await?;
    Ok(Json(info.into()))
}

/// Bring a paused, suspended or stopped workspace back to running. A running one is
/// returned as is.
#[utoipa::path(
    post, path = "/workspaces/{id}/resume", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or container name")),
    responses(
        (status = 200, description = "The running workspace", body = Workspace),
        (status = 404, description = "No such workspace", body = ErrorBody),
        (status = 409, description = "The workspace cannot be resumed (removed, failed…; its state is named)", body = ErrorBody),
    )
)]
pub async fn resume_workspace(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Workspace>> {
    let c = state.conductor.clone();
    let info = detached(async move { c.resume_workspace(&id).await }).await?;
    Ok(Json(info.into()))
}

/// Stop a running or paused workspace's container to free its memory. Its files are kept
/// (`/workspace` and the root file system's changes); its processes are not. Resume (or the
/// next exec, file operation or task) starts it again. Refused while a task runs in it.
#[utoipa::path(
    post, path = "/workspaces/{id}/suspend", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or container name")),
    responses(
        (status = 200, description = "The suspended workspace", body = Workspace),
        (status = 404, description = "No such workspace", body = ErrorBody),
        (status = 409, description = "Not running or paused, or a task runs in it", body = ErrorBody),
    )
)]
pub async fn suspend_workspace(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Workspace>> {
    let c = state.conductor.clone();
    let info = detached(async move { c.suspend_workspace(&id).await }).await?;
    Ok(Json(info.into()))
}

/// Stop a workspace until it is started again: unlike a suspended one, a stopped workspace
/// is not resumed by exec, files or tasks.
#[utoipa::path(
    post, path = "/workspaces/{id}/stop", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or container name")),
    responses(
        (status = 200, description = "The stopped workspace", body = Workspace),
        (status = 404, description = "No such workspace", body = ErrorBody),
        (status = 409, description = "Not running, paused or suspended", body = ErrorBody),
    )
)]
pub async fn stop_workspace(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Workspace>> {
    let c = state.conductor.clone();
    let info = detached(async move { c.stop_workspace(&id).await }).await?;
    Ok(Json(info.into()))
}

/// Start a stopped workspace again (its files kept, its processes new).
#[utoipa::path(
    post, path = "/workspaces/{id}/start", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or container name")),
    responses(
        (status = 200, description = "The running workspace", body = Workspace),
        (status = 404, description = "No such workspace", body = ErrorBody),
        (status = 409, description = "Not stopped", body = ErrorBody),
    )
)]
pub async fn start_workspace(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Workspace>> {
    let c = state.conductor.clone();
    let info = detached(async move { c.start_workspace(&id).await }).await?;
    Ok(Json(info.into()))
}
