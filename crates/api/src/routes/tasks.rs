//! `/tasks`: submit (one task or an array), list, inspect, read or follow logs, cancel.
//!
//! A task accepted with 202 is already durable (queued in the store). `?wait=true` keeps
//! the request open until every submitted task has finished and answers 200 with the
//! final views; log following is Server-Sent Events (`output` events, then one `end`).
//! Both long-lived responses end early when the server shuts down.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use conductor_core::config::NetworkPolicy;
use conductor_core::lifecycle::TaskState;
use conductor_core::task::{batch_field, TaskSpec};
use conductor_service::tasks::{CommandView, LogEvent, TaskListFilter, TaskView};
use conductor_service::ServiceError;
use conductor_store::EgressSummary;
use futures_util::future::try_join_all;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use utoipa::{IntoParams, ToSchema};

use super::detached;
use super::egress::NetworkSchema;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{from_value, JsonBody, QueryParams};
use crate::AppState;

/// Most tasks one `GET /tasks` page holds, and its default size.
const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

/// One task to run: commands in one shell session inside a fresh or shared workspace.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// Always `isolated_execution`.
    #[schema(example = "isolated_execution")]
    pub task_type: String,
    pub description: Option<String>,
    /// An environment from `GET /environments`.
    #[schema(example = "python-dev")]
    pub environment: String,
    /// Shell command lines run in order in one session (`cd` and exports carry over); the
    /// first failing command stops the task.
    #[schema(example = json!(["cd /workspace/src", "python -m pytest tests/"]))]
    pub commands: Vec<String>,
    /// Sidecar images reachable by name and on localhost, e.g. `["postgres:14", "redis:7"]`.
    #[serde(default)]
    pub services: Vec<String>,
    /// 1 (lowest) to 10; default `task_execution.default_priority`.
    pub priority: Option<u8>,
    /// Seconds for all commands together; default `task_execution.task_timeout`.
    pub timeout: Option<u64>,
    /// The agent the task runs for.
    pub agent_id: Option<String>,
    /// Environment variables of every command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute host directory copied to `/workspace/src` before the commands run.
    pub source: Option<String>,
    /// The task's network, over its environment's and its workspace's: an `allow` list
    /// replaces theirs (within `network.egress.max_allow`), `deny` entries add to theirs.
    #[schema(value_type = Option<NetworkSchema>)]
    pub network: Option<NetworkPolicy>,
    /// Registered secrets (`POST /secrets`) the egress proxy injects into the task's
    /// requests to their hosts, within `secrets.max_allow`. A sandbox task's workspace is
    /// made with them; in a shared workspace they must be among the workspace's own, and
    /// only they are injected while the task runs.
    #[serde(default)]
    #[schema(example = json!(["github"]))]
    pub secrets: Vec<String>,
}

impl From<TaskRequest> for TaskSpec {
    fn from(r: TaskRequest) -> Self {
        TaskSpec {
            task_type: r.task_type,
            description: r.description,
            environment: r.environment,
            commands: r.commands,
            services: r.services,
            priority: r.priority,
            timeout: r.timeout,
            agent_id: r.agent_id,
            env: r.env,
            source: r.source,
            network: r.network,
            secrets: r.secrets,
        }
    }
}

/// Body of `POST /tasks`: one task, or an array of tasks submitted together (all are
/// queued, or none when one is invalid).
// Parsed with `from_json`, which names the field at fault; serde's untagged parsing,
// derived here only for the document's `oneOf`, would not.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TaskSubmission {
    One(Box<TaskRequest>),
    Many(Vec<TaskRequest>),
}

impl TaskSubmission {
    /// Parses a body; errors inside an array are named `tasks[i].field`.
    fn from_json(value: Value) -> ApiResult<Self> {
        match value {
            Value::Array(_) => from_value(value).map(TaskSubmission::Many).map_err(|mut e| {
                e.field = e.field.as_deref().map(|f| batch_field(0, f));
                e
            }),
            other => from_value(other).map(TaskSubmission::One),
        }
    }
}

/// The outcome of one command.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskCommand {
    /// `pre` (container_lifecycle.pre_task), `main` or `post`.
    pub phase: String,
    /// Position within its phase, from 0.
    pub index: u32,
    pub command: String,
    /// `null` while running and for a command killed by a timeout or a cancel.
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
}

impl From<CommandView> for TaskCommand {
    fn from(c: CommandView) -> Self {
        TaskCommand {
            phase: c.phase,
            index: c.index,
            command: c.command,
            exit_code: c.exit_code,
            stdout: c.stdout,
            stderr: c.stderr,
            duration_ms: c.duration_ms,
        }
    }
}

/// A task and its results so far.
#[derive(Debug, Serialize, ToSchema)]
pub struct Task {
    /// Same as `id`.
    pub task_id: String,
    #[schema(example = "task-3f2c9a1b7d4e")]
    pub id: String,
    /// Shared by the tasks of one array submission.
    pub batch_id: Option<String>,
    /// `queued`, `running`, `succeeded`, `failed`, `timed_out` or `cancelled`.
    #[schema(example = "queued")]
    pub status: String,
    pub task_type: String,
    pub description: Option<String>,
    pub environment: String,
    pub agent_id: Option<String>,
    pub priority: u8,
    /// Attempts started (infrastructure failures are retried).
    pub attempt: u32,
    pub workspace_id: Option<String>,
    /// Exit code of the failing command, or of the last one; 124 after a timeout.
    pub exit_code: Option<i64>,
    /// Why the task failed, timed out or was cancelled.
    pub error: Option<String>,
    /// Pre-task hooks, commands and post-task hooks in the order they ran.
    pub commands: Vec<TaskCommand>,
    pub services: Vec<String>,
    /// RFC 3339 UTC.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<u64>,
    /// Snapshot note (hybrid mode).
    pub snapshot: Option<String>,
    /// What the task's workspace tried to reach through the egress proxy (proxy mode;
    /// `GET /tasks/{id}` only, not in listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<TaskEgress>,
}

/// A task's outbound connection attempts at a glance (the rows are in
/// `GET /workspaces/{id}/egress?task_id=…`).
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskEgress {
    pub allowed: u64,
    pub denied: u64,
    /// Bytes sent, over all attempts.
    pub bytes_up: u64,
    /// Bytes received, over all attempts.
    pub bytes_down: u64,
    /// Per destination, most attempts first (at most 50).
    pub hosts: Vec<TaskEgressHost>,
}

/// Attempts to one destination.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskEgressHost {
    #[schema(example = "pypi.org")]
    pub host: String,
    pub port: u16,
    pub allowed: u64,
    pub denied: u64,
}

impl From<EgressSummary> for TaskEgress {
    fn from(s: EgressSummary) -> Self {
        TaskEgress {
            allowed: s.allowed,
            denied: s.denied,
            bytes_up: s.bytes_up,
            bytes_down: s.bytes_down,
            hosts: s
                .hosts
                .into_iter()
                .map(|h| TaskEgressHost {
                    host: h.host,
                    port: h.port,
                    allowed: h.allowed,
                    denied: h.denied,
                })
                .collect(),
        }
    }
}

impl From<TaskView> for Task {
    fn from(t: TaskView) -> Self {
        Task {
            task_id: t.id.clone(),
            id: t.id,
            batch_id: t.batch_id,
            status: t.status.as_str().to_string(),
            task_type: t.task_type,
            description: t.description,
            environment: t.environment,
            agent_id: t.agent_id,
            priority: t.priority,
            attempt: t.attempt,
            workspace_id: t.workspace_id,
            exit_code: t.exit_code,
            error: t.error,
            commands: t.commands.into_iter().map(Into::into).collect(),
            services: t.services,
            created_at: t.created_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
            duration_ms: t.duration_ms,
            snapshot: t.snapshot,
            egress: t.egress.map(Into::into),
        }
    }
}

/// Tasks of an array submission.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskBatch {
    pub tasks: Vec<Task>,
}

/// Response of `POST /tasks`: a task for a single submission, `{"tasks": […]}` for an
/// array.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Submitted {
    One(Box<Task>),
    Many(TaskBatch),
}

/// Options of `POST /tasks`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SubmitQuery {
    /// Answer only when every submitted task has finished (200 with the final views).
    #[serde(default)]
    pub wait: bool,
}

/// Filters and paging of `GET /tasks`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TaskQuery {
    /// `queued`, `running`, `succeeded`, `failed`, `timed_out` or `cancelled`.
    #[param(value_type = Option<String>)]
    pub status: Option<TaskState>,
    pub agent_id: Option<String>,
    pub environment: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Tasks to skip.
    #[serde(default)]
    pub offset: u32,
}

/// A page of tasks, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    /// Tasks matching the filter, all pages together.
    pub total: u64,
    pub limit: u32,
    pub offset: u32,
}

/// Options of `GET /tasks/{id}/logs`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Stream the log live as Server-Sent Events until the task ends.
    #[serde(default)]
    pub follow: bool,
    /// Only output after this sequence number (the `id` of an SSE event); a
    /// `Last-Event-ID` header does the same when following.
    #[serde(default)]
    pub after_seq: i64,
}

/// Data of an SSE `output` event.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogChunk {
    /// `stdout`, `stderr` or `system` (conductor's own notes).
    pub stream: String,
    pub data: String,
}

/// Data of the final SSE `end` event.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogEnd {
    pub status: String,
}

/// The 503 sent when the server stops while a response waits.
fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "conductor is shutting down; the tasks are stored and can be looked up with GET /tasks/{id} after it restarts",
    )
}

/// Resolves once the server begins to shut down.
pub(crate) async fn closed(mut closing: watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

/// Submit one task or an array of tasks.
#[utoipa::path(
    post, path = "/tasks", tag = "tasks",
    params(SubmitQuery),
    request_body(content = TaskSubmission, description = "One task, or an array of tasks"),
    responses(
        (status = 202, description = "Queued: the task (or `{\"tasks\": […]}` for an array)", body = Submitted),
        (status = 200, description = "With `?wait=true`: the finished task(s)", body = Submitted),
        (status = 400, description = "Invalid request (field named, e.g. `commands[1]` or `tasks[2].environment`)", body = ErrorBody),
        (status = 413, description = "Body above network.max_body_size", body = ErrorBody),
        (status = 503, description = "With `?wait=true`: the service stopped before the tasks finished", body = ErrorBody),
    )
)]
pub async fn submit_tasks(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<SubmitQuery>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<(StatusCode, Json<Submitted>)> {
    let submission = TaskSubmission::from_json(body)?;
    let (specs, many): (Vec<TaskSpec>, bool) = match submission {
        TaskSubmission::One(t) => (vec![(*t).into()], false),
        TaskSubmission::Many(ts) => (ts.into_iter().map(Into::into).collect(), true),
    };
    let mut views = state.conductor.submit_tasks(specs).map_err(|e| match e {
        // The service names fields by position only for two or more tasks.
        ServiceError::Invalid { field, message } if many && !field.starts_with("tasks") => {
            ServiceError::invalid(batch_field(0, &field), message)
        }
        other => other,
    })?;
    let mut status = StatusCode::ACCEPTED;
    if q.wait {
        let c = &state.conductor;
        let waits = try_join_all(views.iter().map(|v| c.wait_task(&v.id)));
        views = tokio::select! {
            r = waits => r?,
            _ = closed(state.closing.clone()) => return Err(shutting_down()),
        };
        status = StatusCode::OK;
    }
    let mut tasks = views.into_iter().map(Task::from);
    let body = match (many, tasks.next()) {
        (false, Some(one)) => Submitted::One(Box::new(one)),
        (_, first) => Submitted::Many(TaskBatch {
            tasks: first.into_iter().chain(tasks).collect(),
        }),
    };
    Ok((status, Json(body)))
}

/// List tasks, newest first.
#[utoipa::path(
    get, path = "/tasks", tag = "tasks",
    params(TaskQuery),
    responses(
        (status = 200, description = "A page of tasks", body = TaskPage),
        (status = 400, description = "Invalid filter", body = ErrorBody),
    )
)]
pub async fn list_tasks(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<TaskQuery>,
) -> ApiResult<Json<TaskPage>> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid("limit", format!("must be between 1 and {MAX_PAGE}")));
    }
    let filter = TaskListFilter {
        status: q.status,
        agent_id: q.agent_id,
        environment: q.environment,
        limit,
        offset: q.offset,
    };
    let (tasks, total) = state.conductor.list_tasks(&filter)?;
    Ok(Json(TaskPage {
        tasks: tasks.into_iter().map(Into::into).collect(),
        total,
        limit,
        offset: q.offset,
    }))
}

/// A task with its per-command results.
#[utoipa::path(
    get, path = "/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task", body = Task),
        (status = 404, description = "No such task", body = ErrorBody),
    )
)]
pub async fn get_task(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Task>> {
    Ok(Json(state.conductor.get_task(&id)?.into()))
}

/// Cancel a queued or running task (its processes are killed).
#[utoipa::path(
    post, path = "/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The cancelled task", body = Task),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "The task already finished", body = ErrorBody),
    )
)]
pub async fn cancel_task(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Task>> {
    let c = state.conductor.clone();
    let view = detached(async move { c.cancel_task(&id).await }).await?;
    Ok(Json(view.into()))
}

/// The task's output, or a live stream of it.
///
/// Without `follow`: the combined output so far as text (stdout, stderr and conductor's
/// notes in the order they were written). With `?follow=true`: Server-Sent Events, one
/// `output` event per chunk (data `LogChunk`, id = sequence number) until one `end` event
/// (data `LogEnd`) when the task has finished.
#[utoipa::path(
    get, path = "/tasks/{id}/logs", tag = "tasks",
    params(("id" = String, Path, description = "Task id"), LogQuery),
    responses(
        (status = 200, description = "The output (text/plain), or with `?follow=true` an event stream",
            content((String = "text/plain"), (String = "text/event-stream"))),
        (status = 404, description = "No such task", body = ErrorBody),
    )
)]
pub async fn task_logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<LogQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if !q.follow {
        let text: String = state
            .conductor
            .read_task_log(&id, q.after_seq)?
            .into_iter()
            .map(|(_, _, data)| data)
            .collect();
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response());
    }
    let after_seq = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| ApiError::invalid("Last-Event-ID", "must be the id of an earlier event"))?,
        None => q.after_seq,
    };
    let events = state
        .conductor
        .follow_task_log(&id, after_seq)?
        .map(|e| Ok::<_, Infallible>(sse_event(e)))
        .take_until(closed(state.closing.clone()));
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

fn sse_event(e: LogEvent) -> Event {
    match e {
        LogEvent::Output { seq, stream, data } => Event::default()
            .event("output")
            .id(seq.to_string())
            .data(json_text(&LogChunk { stream, data })),
        LogEvent::End { status } => Event::default().event("end").data(json_text(&LogEnd {
            status: status.as_str().to_string(),
        })),
    }
}

pub(crate) fn json_text<T: Serialize>(v: &T) -> String {
    // Serialising a struct of strings and numbers cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use conductor_core::config::NetworkMode;
    use serde_json::json;

    use super::*;

    fn task(network: Value) -> Value {
        json!({"task_type": "isolated_execution", "environment": "python-dev", "commands": ["true"], "network": network})
    }

    fn network(v: Value) -> ApiResult<Option<NetworkPolicy>> {
        match TaskSubmission::from_json(task(v))? {
            TaskSubmission::One(t) => Ok(TaskSpec::from(*t).network),
            TaskSubmission::Many(_) => unreachable!(),
        }
    }

    #[test]
    fn network_is_a_mode_or_a_policy() {
        assert_eq!(
            network(json!("proxy")).unwrap(),
            Some(NetworkPolicy::mode(NetworkMode::Proxy))
        );
        assert_eq!(
            network(json!("none")).unwrap(),
            Some(NetworkPolicy::mode(NetworkMode::Isolated))
        );
        let p = network(json!({"allow": ["pypi", "*.example.com:8443"], "deny": ["evil.example.com"]}))
            .unwrap()
            .unwrap();
        assert_eq!(p.mode, None);
        assert_eq!(p.allow.unwrap(), ["pypi", "*.example.com:8443"]);
        assert_eq!(p.deny, ["evil.example.com"]);
        let t: TaskRequest =
            from_value(json!({"task_type": "isolated_execution", "environment": "e", "commands": []})).unwrap();
        assert_eq!(TaskSpec::from(t).network, None);
    }

    #[test]
    fn network_errors_name_the_field() {
        for (v, field) in [
            (json!("bogus"), "network"),
            (json!(3), "network"),
            (json!({"allow": "pypi"}), "network.allow"),
            (json!({"allow": ["pypi", 1]}), "network.allow[1]"),
            (json!({"deny": [true]}), "network.deny[0]"),
            (json!({"ports": [22]}), "network.ports"),
        ] {
            let e = network(v.clone()).expect_err(&v.to_string());
            assert_eq!(
                (e.code, e.field.as_deref()),
                ("invalid_request", Some(field)),
                "{v}: {}",
                e.message
            );
        }
        let e = network(json!({"mode": "open"})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("network.mode"));
        assert!(e.message.contains("unknown variant `open`"), "{}", e.message);

        let e = TaskSubmission::from_json(json!([task(json!("proxy")), task(json!({"allow": [1]}))])).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tasks[1].network.allow[0]"));
    }

    #[test]
    fn task_egress_summary_is_shown() {
        let summary = EgressSummary {
            allowed: 3,
            denied: 1,
            bytes_up: 10,
            bytes_down: 20,
            hosts: vec![conductor_store::EgressHostSummary {
                host: "pypi.org".into(),
                port: 443,
                allowed: 3,
                denied: 1,
            }],
        };
        let v = serde_json::to_value(TaskEgress::from(summary)).unwrap();
        assert_eq!(
            v,
            json!({"allowed": 3, "denied": 1, "bytes_up": 10, "bytes_down": 20,
                   "hosts": [{"host": "pypi.org", "port": 443, "allowed": 3, "denied": 1}]})
        );
    }
}
