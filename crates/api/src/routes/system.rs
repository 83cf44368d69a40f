//! `/health`, `/metrics` (Prometheus text format) and `/openapi.json`.

use std::fmt::Write;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use conductor_service::tasks::TaskMetrics;
use conductor_service::ServiceError;
use conductor_store::EgressDecision;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiResult, ErrorBody};
use crate::AppState;

/// Response of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when the container engine does not answer.
    #[schema(example = "ok")]
    pub status: String,
    /// conductor's version.
    pub version: String,
    /// `ok`, or `unavailable` (the service reconnects by itself; see `engine_error`).
    #[schema(example = "ok")]
    pub engine: String,
    /// Why the engine is unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_error: Option<String>,
}

/// Health: whether the service is up and its container engine answers (no token needed).
#[utoipa::path(
    get, path = "/health", tag = "system",
    responses(
        (status = 200, description = "The service is up and its engine answers", body = Health),
        (status = 503, description = "The service is up but its engine does not answer", body = Health),
    )
)]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let engine = state.conductor.engine.ping().await;
    let status = if engine.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let health = Health {
        status: if engine.is_ok() { "ok" } else { "degraded" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        engine: if engine.is_ok() { "ok" } else { "unavailable" }.into(),
        engine_error: engine.err().map(|e| e.to_string()),
    };
    (status, Json(health))
}

/// The OpenAPI document of this API.
#[utoipa::path(
    get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json"))
)]
pub async fn openapi_json(State(state): State<AppState>) -> impl IntoResponse {
    Json(state.openapi.as_ref().clone())
}

/// Prometheus metrics: tasks by status, task durations, workspaces by state, queue depth,
/// egress connection attempts by decision and reason.
#[utoipa::path(
    get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain"),
        (status = 500, description = "The database failed", body = ErrorBody),
    )
)]
pub async fn metrics(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    let m = state.conductor.task_metrics()?;
    let egress = state.conductor.store.egress_counts().map_err(ServiceError::from)?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        render(&m, &egress),
    ))
}

/// `m` and the egress audit's counts in the Prometheus text exposition format.
fn render(m: &TaskMetrics, egress: &[(EgressDecision, String, u64)]) -> String {
    let mut out = String::new();
    let tasks: Vec<(&str, u64)> = m.tasks_by_state.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    gauge(&mut out, "conductor_tasks", "Tasks by status.", "status", &tasks);
    let h = &m.durations;
    let name = "conductor_task_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Run time of finished tasks (last attempt).\n# TYPE {name} histogram"
    );
    for (le, n) in &h.buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum_seconds, h.count);
    let workspaces: Vec<(&str, u64)> = m.workspaces_by_state.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    gauge(
        &mut out,
        "conductor_workspaces",
        "Workspaces by state.",
        "state",
        &workspaces,
    );
    let _ = writeln!(
        out,
        "# HELP conductor_queue_depth Queued tasks.\n# TYPE conductor_queue_depth gauge\nconductor_queue_depth {}",
        m.queue_depth
    );
    // Counted from the audit, whose oldest rows go (network.egress.audit_retention_days,
    // audit_max_rows): the value can fall, so it is a gauge, not a counter.
    let name = "conductor_egress_connections";
    let _ = writeln!(
        out,
        "# HELP {name} Egress connection attempts recorded (within audit retention), by decision and reason.\n\
         # TYPE {name} gauge"
    );
    for (decision, reason, n) in egress {
        let _ = writeln!(
            out,
            "{name}{{decision=\"{decision}\",reason=\"{}\"}} {n}",
            label_value(reason)
        );
    }
    out
}

/// `v` escaped for a label value (backslash, double quote, line feed).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Appends a labelled gauge.
fn gauge(out: &mut String, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (l, v) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{l}\"}} {v}");
    }
}

#[cfg(test)]
mod tests {
    use conductor_core::lifecycle::{TaskState, WorkspaceState};
    use conductor_core::task::DurationHistogram;

    use super::*;

    #[test]
    fn metrics_use_the_prometheus_text_format() {
        let m = TaskMetrics {
            tasks_by_state: vec![(TaskState::Queued, 2), (TaskState::TimedOut, 1)],
            queue_depth: 2,
            durations: DurationHistogram::from_millis([300, 1500]),
            workspaces_by_state: vec![(WorkspaceState::Running, 3)],
        };
        let egress = [
            (EgressDecision::Allowed, String::new(), 5),
            (EgressDecision::Denied, "not_allowed".to_string(), 2),
            (EgressDecision::Denied, "odd\"reason\\".to_string(), 1),
        ];
        let text = render(&m, &egress);
        for line in [
            "# TYPE conductor_tasks gauge",
            "conductor_tasks{status=\"queued\"} 2",
            "conductor_tasks{status=\"timed_out\"} 1",
            "# TYPE conductor_task_duration_seconds histogram",
            "conductor_task_duration_seconds_bucket{le=\"0.5\"} 1",
            "conductor_task_duration_seconds_bucket{le=\"2\"} 2",
            "conductor_task_duration_seconds_bucket{le=\"+Inf\"} 2",
            "conductor_task_duration_seconds_sum 1.8",
            "conductor_task_duration_seconds_count 2",
            "conductor_workspaces{state=\"running\"} 3",
            "conductor_queue_depth 2",
            "# TYPE conductor_egress_connections gauge",
            "conductor_egress_connections{decision=\"allowed\",reason=\"\"} 5",
            "conductor_egress_connections{decision=\"denied\",reason=\"not_allowed\"} 2",
            "conductor_egress_connections{decision=\"denied\",reason=\"odd\\\"reason\\\\\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // Without audit rows the metric is still described.
        assert!(render(&m, &[]).contains("# TYPE conductor_egress_connections gauge\n"));
    }
}
