//! `/workspaces`: create, list, inspect, remove, fork and exec into workspaces.
//!
//! A caller chooses the agent, the environment, the network policy and limits up to the
//! configured maxima; nothing else. Mounts, capabilities, privileged mode or the host
//! network have no field, and unknown fields are refused by name.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use conductor_core::config::NetworkPolicy;
use conductor_core::egress::ResolvedNetwork;
use conductor_core::engine::Progress;
use conductor_core::lifecycle::WorkspaceState;
use conductor_core::resources::{LimitOverrides, WorkspaceLimits};
use conductor_core::size::{ByteSize, Cpu};
use conductor_service::exec::{Command, ExecOutcome, ExecRequest};
use conductor_service::fork::ForkRequest;
use conductor_service::workspaces::{CreateRequest, ListFilter, Usage, WorkspaceInfo};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::detached;
use super::egress::NetworkSchema;
use crate::error::{ApiResult, ErrorBody};
use crate::extract::{JsonBody, QueryParams};
use crate::AppState;

/// Limits a caller may ask for; each may lower the configured default or raise it up to
/// `isolated_workspace.agent_containers.resources.maximums`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// Memory, e.g. `2Gi` or a number of bytes.
    #[schema(value_type = Option<String>, example = "2Gi")]
    pub memory: Option<ByteSize>,
    /// CPU cores, e.g. `1.5` or `500m`.
    #[schema(value_type = Option<String>, example = "1.5")]
    pub cpu: Option<Cpu>,
    /// Maximum number of processes.
    pub pids: Option<u32>,
    /// Size of `/workspace`, e.g. `5Gi`.
    #[schema(value_type = Option<String>, example = "5Gi")]
    pub volume_size: Option<ByteSize>,
}

/// Body of `POST /workspaces`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspace {
    /// Owner of the workspace: lowercase letters, digits, `-`, `_`, `.`.
    #[schema(example = "agent-1")]
    pub agent_id: String,
    /// An environment from `GET /environments`.
    #[schema(example = "python-dev")]
    pub environment: String,
    #[serde(default)]
    pub limits: Option<LimitsRequest>,
    /// A mode (`isolated`, `proxy`, `egress`) or `{mode, allow, deny}`, over the
    /// environment's policy and the configured one (`isolated` by default).
    #[schema(value_type = Option<NetworkSchema>)]
    pub network: Option<NetworkPolicy>,
    /// Container ports to publish on 127.0.0.1 (host ports from
    /// `podman_config.container_port_range`); needs `network: egress`.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Registered secrets (`POST /secrets`) the workspace may use, within
    /// `secrets.max_allow`. Implies `proxy` mode; the hosts of their rules are added to the
    /// allow list. The workspace holds only a placeholder per secret (`GITHUB_TOKEN` for
    /// `github`), which the egress proxy replaces by the value on the secret's hosts.
    #[serde(default)]
    #[schema(example = json!(["github"]))]
    pub secrets: Vec<String>,
}

/// Limits a workspace runs with.
#[derive(Debug, Serialize, ToSchema)]
pub struct Limits {
    #[schema(example = "2Gi")]
    pub memory: String,
    #[schema(example = "1")]
    pub cpu: String,
    pub pids: u32,
    pub nofile: u32,
    pub nproc: u32,
    #[schema(example = "10Gi")]
    pub volume_size: String,
}

impl From<WorkspaceLimits> for Limits {
    fn from(l: WorkspaceLimits) -> Self {
        Limits {
            memory: l.memory.to_string(),
            cpu: l.cpu.to_string(),
            pids: l.pids,
            nofile: l.nofile,
            nproc: l.nproc,
            volume_size: l.volume_size.to_string(),
        }
    }
}

/// Live resource use of a running workspace.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceUsage {
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids: u64,
    pub pids_limit: u64,
    /// Processes the kernel killed for exceeding the memory limit.
    pub oom_kills: Option<u64>,
    pub disk_used_bytes: Option<u64>,
    pub disk_limit_bytes: Option<u64>,
    /// How commands reach the workspace: `agent` (in-workspace agent) or `podman` (fallback).
    #[schema(example = "agent")]
    pub exec_path: Option<String>,
    /// Ports published on 127.0.0.1.
    pub published_ports: Vec<PublishedPort>,
}

/// A container port published on the host's loopback.
#[derive(Debug, Serialize, ToSchema)]
pub struct PublishedPort {
    pub container_port: u16,
    /// Port on 127.0.0.1.
    pub host_port: u16,
}

impl From<Usage> for WorkspaceUsage {
    fn from(u: Usage) -> Self {
        WorkspaceUsage {
            cpu_percent: u.cpu_percent,
            memory_bytes: u.memory_bytes,
            memory_limit_bytes: u.memory_limit_bytes,
            pids: u.pids,
            pids_limit: u.pids_limit,
            oom_kills: u.oom_kills,
            disk_used_bytes: u.disk_used_bytes,
            disk_limit_bytes: u.disk_limit_bytes,
            exec_path: u.exec_path.map(|p| {
                match p {
                    conductor_service::exec::ExecPath::Agent => "agent",
                    conductor_service::exec::ExecPath::Podman => "podman",
                }
                .to_string()
            }),
            published_ports: u
                .published_ports
                .into_iter()
                .map(|(container_port, host_port)| PublishedPort {
                    container_port,
                    host_port,
                })
                .collect(),
        }
    }
}

/// The network policy a workspace runs with (its environment's, the configured one and
/// the request's, layered).
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceNetworkPolicy {
    /// `isolated`, `proxy` or `egress`.
    #[schema(example = "proxy")]
    pub mode: String,
    /// What proxy mode lets the workspace reach.
    #[schema(example = json!(["pypi", "*.pythonhosted.org"]))]
    pub allow: Vec<String>,
    /// What it may never reach (wins over `allow`).
    pub deny: Vec<String>,
}

impl From<ResolvedNetwork> for WorkspaceNetworkPolicy {
    fn from(n: ResolvedNetwork) -> Self {
        WorkspaceNetworkPolicy {
            mode: n.mode.as_str().to_string(),
            allow: n.allow,
            deny: n.deny,
        }
    }
}

/// A workspace.
#[derive(Debug, Serialize, ToSchema)]
pub struct Workspace {
    /// Same as `id` (the name the create response is documented with).
    pub workspace_id: String,
    #[schema(example = "ws-3f2c9a1b7d4e")]
    pub id: String,
    pub agent_id: String,
    pub environment: String,
    /// Image the container runs.
    pub image: String,
    /// Podman container name (`claude-agent-<agent>-<short id>`).
    pub container_name: String,
    /// `creating`, `running`, `paused`, `suspended`, `stopped`, `removing`, `removed`,
    /// `lost` or `failed`.
    #[schema(example = "running")]
    pub state: String,
    /// Name of the workspace's own network, if any (`egress` mode).
    pub network: Option<String>,
    pub network_policy: WorkspaceNetworkPolicy,
    /// The names of the secrets it may use (never their values or placeholders).
    pub secrets: Vec<String>,
    pub limits: Limits,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub last_used_at: i64,
    /// Why the workspace failed or was lost.
    pub error: Option<String>,
    /// Live usage (`GET /workspaces/{id}` of a running workspace only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<WorkspaceUsage>,
}

impl From<WorkspaceInfo> for Workspace {
    fn from(w: WorkspaceInfo) -> Self {
        Workspace {
            workspace_id: w.id.clone(),
            id: w.id,
            agent_id: w.agent_id,
            environment: w.environment,
            image: w.image,
            container_name: w.container_name,
            state: w.state.as_str().to_string(),
            network: w.network,
            network_policy: w.network_policy.into(),
            secrets: w.secrets,
            limits: w.limits.into(),
            created_at: w.created_at,
            last_used_at: w.last_used_at,
            error: w.error,
            usage: None,
        }
    }
}

/// Response of `GET /workspaces`.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkspaceList {
    pub workspaces: Vec<Workspace>,
}

/// Filters of `GET /workspaces`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WorkspaceQuery {
    pub agent_id: Option<String>,
    pub environment: Option<String>,
    /// One state (`creating`, `running`, `paused`, `suspended`, `stopped`, `removing`,
    /// `removed`, `lost`, `failed`).
    #[param(value_type = Option<String>)]
    pub state: Option<WorkspaceState>,
    /// Include removed, lost and failed workspaces (default: live ones only).
    #[serde(default)]
    pub all: bool,
}

/// Options of `DELETE /workspaces/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Keep (`true`) or delete (`false`) the workspace's data; by default a persistent
    /// volume is kept and a throw-away one deleted.
    pub keep_volumes: Option<bool>,
}

/// What `POST /workspaces/{id}/exec` runs (the schema of [`Command`]).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum CommandSchema {
    /// A shell command line (`bash -c` when bash exists, else `sh -c`).
    #[schema(example = "cd /workspace && ls -la")]
    Line(String),
    /// A program and its arguments, executed directly without a shell.
    #[schema(example = json!(["python3", "-c", "print(1)"]))]
    Argv(Vec<String>),
}

/// Body of `POST /workspaces/{id}/exec`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// A shell command line (a string: run by `bash -c` when bash exists, else `sh -c`), or
    /// an argv (an array of strings: executed directly, no shell).
    #[schema(value_type = CommandSchema, example = "cd /workspace && ls -la")]
    pub command: Command,
    /// Seconds before the command and its children are killed (default
    /// `task_execution.task_timeout`).
    pub timeout: Option<u64>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the workspace (default `/workspace`).
    pub cwd: Option<String>,
}

/// Result of `POST /workspaces/{id}/exec`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecResult {
    /// The command's exit code (124 when it timed out).
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    pub timed_out: bool,
}

impl ExecResult {
    fn new((o, stdout, stderr): (ExecOutcome, String, String)) -> Self {
        ExecResult {
            exit_code: o.exit_code,
            stdout,
            stderr,
            duration_ms: o.duration_ms,
            timed_out: o.timed_out,
        }
    }
}

/// Create a workspace (building its environment's image first when needed).
#[utoipa::path(
    post, path = "/workspaces", tag = "workspaces",
    request_body = CreateWorkspace,
    responses(
        (status = 201, description = "The workspace runs", body = Workspace),
        (status = 400, description = "Invalid request (field named, e.g. `network.allow[0]` or `secrets[0]` for an unknown secret or one outside `secrets.max_allow`)", body = ErrorBody),
        (status = 422, description = "The environment's image could not be made", body = ErrorBody),
        (status = 429, description = "isolated_workspace.cleanup.max_containers reached", body = ErrorBody),
    )
)]
pub async fn create_workspace(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateWorkspace>,
) -> ApiResult<(StatusCode, Json<Workspace>)> {
    let limits = body.limits.unwrap_or_default();
    let req = CreateRequest {
        agent_id: body.agent_id,
        environment: body.environment,
        limits: LimitOverrides {
            memory: limits.memory,
            cpu: limits.cpu,
            pids: limits.pids,
            volume_size: limits.volume_size,
        },
        network: body.network,
        ports: body.ports,
        secrets: body.secrets,
        ..Default::default()
    };
    let c = state.conductor.clone();
    let progress = Arc::new(|p: Progress| tracing::debug!("environment image: {p:?}"));
    let info = detached(async move { c.create_workspace(req, progress).await }).await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

/// List workspaces (live ones unless `all` or `state` says otherwise).
#[utoipa::path(
    get, path = "/workspaces", tag = "workspaces",
    params(WorkspaceQuery),
    responses(
        (status = 200, description = "Workspaces, oldest first", body = WorkspaceList),
        (status = 400, description = "Invalid filter", body = ErrorBody),
    )
)]
pub async fn list_workspaces(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<WorkspaceQuery>,
) -> ApiResult<Json<WorkspaceList>> {
    let filter = ListFilter {
        agent_id: q.agent_id,
        environment: q.environment,
        state: q.state,
        all: q.all,
    };
    if let Err(e) = state.conductor.refresh_states().await {
        tracing::debug!("listing without refreshing the workspaces' states: {e}");
    }
    let list = state.conductor.list_workspaces(&filter)?;
    Ok(Json(WorkspaceList {
        workspaces: list.into_iter().map(Into::into).collect(),
    }))
}

/// A workspace with its live resource usage.
#[utoipa::path(
    get, path = "/workspaces/{id}", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or container name")),
    responses(
        (status = 200, description = "The workspace", body = Workspace),
        (status = 404, description = "No such workspace", body = ErrorBody),
    )
)]
pub async fn get_workspace(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Workspace>> {
    let (info, usage) = state.conductor.inspect_workspace(&id).await?;
    let mut w = Workspace::from(info);
    w.usage = usage.map(Into::into);
    Ok(Json(w))
}

/// Remove a workspace: its container, network and (per `keep_volumes`) its data.
#[utoipa::path(
    delete, path = "/workspaces/{id}", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or container name"), DeleteQuery),
    responses(
        (status = 200, description = "The removed workspace", body = Workspace),
        (status = 404, description = "No such workspace", body = ErrorBody),
        (status = 409, description = "Already removed", body = ErrorBody),
    )
)]
pub async fn delete_workspace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<DeleteQuery>,
) -> ApiResult<Json<Workspace>> {
    let c = state.conductor.clone();
    let id = state.conductor.get_workspace(&id)?.id;
    let info = detached(async move { c.remove_workspace(&id, q.keep_volumes).await }).await?;
    Ok(Json(info.into()))
}

/// Run a command (a shell command line, or an argv without a shell) in a running workspace
/// and return its output.
#[utoipa::path(
    post, path = "/workspaces/{id}/exec", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or container name")),
    request_body = ExecBody,
    responses(
        (status = 200, description = "The command ran (whatever its exit code)", body = ExecResult),
        (status = 400, description = "Invalid request (field named)", body = ErrorBody),
        (status = 404, description = "No such workspace", body = ErrorBody),
        (status = 409, description = "The workspace is not running", body = ErrorBody),
    )
)]
pub async fn exec(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExecBody>,
) -> ApiResult<Json<ExecResult>> {
    let timeout = body
        .timeout
        .unwrap_or(state.conductor.config.task_execution.task_timeout);
    let req = ExecRequest {
        command: body.command,
        cwd: body.cwd,
        env: body.env,
        stdin: None,
        timeout: Some(Duration::from_secs(timeout)),
        ..Default::default()
    };
    req.validate()?;
    let id = state.conductor.get_workspace(&id)?.id;
    let c = state.conductor.clone();
    let result = detached(async move { c.exec_collect(&id, req).await }).await?;
    Ok(Json(ExecResult::new(result)))
}

fn one() -> u32 {
    1
}

/// Body of `POST /workspaces/{id}/fork`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkWorkspace {
    /// How many copies, 1 to `isolated_workspace.fork.max_count` (default 1), within the
    /// room `isolated_workspace.cleanup.max_containers` leaves.
    #[serde(default = "one")]
    #[schema(example = 4)]
    pub count: u32,
    /// Fork from this snapshot of the workspace instead of its state now.
    #[schema(example = "before-refactor")]
    pub snapshot: Option<String>,
    /// The copies' agent (default: the source's).
    #[schema(example = "agent-2")]
    pub agent_id: Option<String>,
    /// Environment variables set over the source's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Memory, CPU and process limits over the source's, up to the configured maxima. The
    /// volume is a copy of the source's: `volume_size`, if given, must be the source's.
    #[serde(default)]
    pub limits: Option<LimitsRequest>,
}

/// Response of `POST /workspaces/{id}/fork`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ForkResult {
    /// The workspace forked.
    pub source_id: String,
    /// The snapshot forked from, if one was named.
    pub snapshot: Option<String>,
    /// How long the source was paused for the capture (absent when forking from a
    /// snapshot or a stopped workspace).
    pub paused_ms: Option<u64>,
    /// The whole fork, until the last copy ran.
    pub took_ms: u64,
    /// The new workspaces, running.
    pub workspaces: Vec<Workspace>,
}

/// Fork a workspace into `count` new running workspaces holding its state now (root file
/// system changes and `/workspace`, captured once while it is paused for an instant) or at
/// one of its snapshots. Each copy has its own id, container, network namespace, agent,
/// limits and quota; the copies share blocks with the source until they write. All or
/// nothing: if one copy fails, none is kept.
#[utoipa::path(
    post, path = "/workspaces/{id}/fork", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id, container name, or agent id with one live workspace")),
    request_body = ForkWorkspace,
    responses(
        (status = 201, description = "Every copy runs", body = ForkResult),
        (status = 400, description = "Invalid request (field named: `count` outside 1..=max_count, `snapshot` unknown, `env.NAME`, `limits.memory`, …)", body = ErrorBody),
        (status = 404, description = "No such workspace", body = ErrorBody),
        (status = 409, description = "The workspace is not running or stopped (the state is named), or a snapshot operation runs on it", body = ErrorBody),
        (status = 429, description = "`count` more workspaces would exceed isolated_workspace.cleanup.max_containers", body = ErrorBody),
    )
)]
pub async fn fork_workspace(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ForkWorkspace>,
) -> ApiResult<(StatusCode, Json<ForkResult>)> {
    let limits = body.limits.unwrap_or_default();
    let req = ForkRequest {
        count: body.count,
        snapshot: body.snapshot,
        agent_id: body.agent_id,
        env: body.env,
        limits: LimitOverrides {
            memory: limits.memory,
            cpu: limits.cpu,
            pids: limits.pids,
            volume_size: limits.volume_size,
        },
    };
    let c = state.conductor.clone();
    let out = detached(async move { c.fork_workspace(&id, req).await }).await?;
    Ok((
        StatusCode::CREATED,
        Json(ForkResult {
            source_id: out.source_id,
            snapshot: out.snapshot,
            paused_ms: out.paused_ms,
            took_ms: out.took_ms,
            workspaces: out.workspaces.into_iter().map(Into::into).collect(),
        }),
    ))
}
