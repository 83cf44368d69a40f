//! `/workspaces/{id}/egress`: the audit of a workspace's outbound connections (proxy
//! mode), read as a page or followed live; and the schema of the `network` policy that
//! workspaces and tasks are created with.
//!
//! Following is Server-Sent Events like a task's log: the stored rows first, then new ones
//! as they are recorded (`egress` events whose id is the row id, so `Last-Event-ID`
//! resumes). The live feed is only a signal: the rows sent are always read from the audit
//! after the last one sent, so rows recorded out of order, or missed while the reader fell
//! behind, are neither lost nor sent twice.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use conductor_core::task::rfc3339;
use conductor_service::Conductor;
use conductor_store::{EgressDecision, EgressEventRecord, EgressFilter};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::{IntoParams, ToSchema};

use super::tasks::{closed, json_text};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::QueryParams;
use crate::AppState;

/// Most rows one `GET /workspaces/{id}/egress` page holds, and its default size.
const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;
/// How often a follow checks whether its workspace is gone.
const WORKSPACE_CHECK: Duration = Duration::from_secs(5);

/// A network policy (`network` of a workspace or a task): a mode, or `{mode, allow, deny}`.
// Documentation only: requests are parsed as `conductor_core::config::NetworkPolicy`.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(example = json!({"allow": ["pypi", "*.pythonhosted.org", "10.0.0.0/8:5432"], "deny": ["evil.example.com"]}))]
#[allow(dead_code)]
pub enum NetworkSchema {
    /// Just a mode.
    Mode(NetworkModeSchema),
    /// A mode and what proxy mode may reach.
    Policy(NetworkPolicySchema),
}

/// How a workspace reaches the network.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum NetworkModeSchema {
    /// A private network namespace with loopback only: no route out, no other workspace.
    Isolated,
    /// Same as `isolated` (its older name).
    None,
    /// Outbound connections only through conductor's allowlist proxy
    /// (`HTTP_PROXY`/`HTTPS_PROXY` inside the workspace), each one audited
    /// (`GET /workspaces/{id}/egress`).
    Proxy,
    /// A bridge to the public internet (opt-in); never the host, private ranges or link-local addresses.
    Egress,
}

/// A network policy written out. Each field may be left out: the policy goes over the
/// configured default and the environment's (and a task's over its workspace's).
///
/// Entries of `allow` and `deny`: an exact host name (`pypi.org`); a wildcard
/// (`*.pythonhosted.org`: its subdomains only, not the name itself); either followed by
/// `:port` (`github.com:22`; without a port an allow entry means ports 80 and 443, a deny
/// entry every port); an IP address or range, reachable only when written as one
/// (`10.0.0.0/8:5432`, `[fd00::1]:443`); or a bundle (`pypi`, `npm`, `debian`, `github`,
/// and the configured `network.egress.bundles`). Allowed entries must stay within
/// `network.egress.max_allow`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct NetworkPolicySchema {
    /// Defaults to `proxy` when `allow` is not empty, else to the earlier layer's mode.
    pub mode: Option<NetworkModeSchema>,
    /// What the workspace may reach (proxy mode); replaces the earlier layer's list, so a
    /// task can narrow what its environment allows.
    #[schema(example = json!(["pypi", "*.pythonhosted.org", "github.com:22"]))]
    pub allow: Option<Vec<String>>,
    /// What it may never reach; adds to the earlier layers' lists and wins over `allow`.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// Options of `GET /workspaces/{id}/egress`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EgressQuery {
    /// Page size (default 100, at most 1000): without `after` the newest rows, with it the
    /// first rows after the cursor. When following, the backlog without `after`.
    pub limit: Option<u32>,
    /// Only rows after this id (the `id` of a row or of an SSE event); a `Last-Event-ID`
    /// header does the same when following.
    pub after: Option<i64>,
    /// `allowed` or `denied`.
    #[param(value_type = Option<String>)]
    pub decision: Option<EgressDecision>,
    /// Only rows recorded while this task ran.
    pub task_id: Option<String>,
    /// Stream the rows as Server-Sent Events: the stored ones, then new ones as they are
    /// recorded, until the workspace is gone (or the client leaves).
    #[serde(default)]
    pub follow: bool,
}

/// One outbound connection attempt of a workspace through the egress proxy.
#[derive(Debug, Serialize, ToSchema)]
pub struct EgressEvent {
    /// Position in the audit; only grows (the cursor of `after`).
    pub id: i64,
    /// When the attempt started, RFC 3339 UTC.
    #[schema(example = "2024-05-01T12:34:56.789Z")]
    pub at: String,
    /// The same, milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub workspace_id: String,
    /// The task running in the workspace at the time.
    pub task_id: Option<String>,
    /// The proxy request: `CONNECT` (HTTPS and other TCP) or the HTTP method.
    #[schema(example = "CONNECT")]
    pub method: String,
    /// The host asked for (name or IP address).
    #[schema(example = "pypi.org")]
    pub host: String,
    pub port: u16,
    /// The address connected to, if the proxy got that far.
    pub resolved: Option<String>,
    /// `allowed` or `denied`.
    #[schema(example = "allowed")]
    pub decision: String,
    /// The policy entry that decided.
    pub rule: Option<String>,
    /// Why it was denied: `not_allowed`, `denied` (a deny entry), `ip_literal`,
    /// `special_address`, `invalid_host`, `sni_mismatch`, `connection_limit`, ….
    pub reason: Option<String>,
    /// Bytes sent by the workspace.
    pub bytes_up: u64,
    /// Bytes received by the workspace.
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// What went wrong after an allow (upstream unreachable, reset, …).
    pub error: Option<String>,
}

impl From<EgressEventRecord> for EgressEvent {
    fn from(r: EgressEventRecord) -> Self {
        EgressEvent {
            id: r.id,
            at: rfc3339(r.at_ms),
            at_ms: r.at_ms,
            workspace_id: r.workspace_id,
            task_id: r.task_id,
            method: r.method,
            host: r.host,
            port: r.port,
            resolved: r.resolved,
            decision: r.decision.as_str().to_string(),
            rule: r.rule,
            reason: r.reason,
            bytes_up: r.bytes_up,
            bytes_down: r.bytes_down,
            duration_ms: r.duration_ms,
            error: r.error,
        }
    }
}

/// Response of `GET /workspaces/{id}/egress`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EgressEvents {
    /// Oldest first.
    pub events: Vec<EgressEvent>,
}

/// Data of an SSE `lagged` event: the live feed fell behind; the rows of this workspace
/// it dropped follow, read again from the audit.
#[derive(Debug, Serialize, ToSchema)]
pub struct EgressLagged {
    /// Rows of the live feed (of every workspace) that were dropped.
    pub missed: u64,
}

/// Data of the final SSE `end` event: the workspace is gone.
#[derive(Debug, Serialize, ToSchema)]
pub struct EgressEnd {
    /// The workspace's state (`removed`, `lost` or `failed`).
    #[schema(example = "removed")]
    pub state: String,
}

/// A workspace's outbound connection attempts (proxy mode), or a live stream of them.
///
/// Without `follow`: `EgressEvents`, oldest first. With `?follow=true`: Server-Sent Events,
/// one `egress` event per row (data `EgressEvent`, id = row id): the backlog (the rows
/// after `after` or `Last-Event-ID`, else the last `limit`), then rows as they are
/// recorded. A `lagged` event (data `EgressLagged`) says the live feed fell behind (the
/// rows follow from the audit); one `end` event (data `EgressEnd`) closes the stream when
/// the workspace is removed. The audit keeps rows for `network.egress.audit_retention_days`
/// (at most `audit_max_rows`), also after the workspace is gone.
#[utoipa::path(
    get, path = "/workspaces/{id}/egress", tag = "workspaces",
    params(("id" = String, Path, description = "Workspace id or container name"), EgressQuery),
    responses(
        (status = 200, description = "The rows, or with `?follow=true` an event stream",
            content((EgressEvents = "application/json"), (String = "text/event-stream"))),
        (status = 400, description = "Invalid option (field named)", body = ErrorBody),
        (status = 404, description = "No such workspace", body = ErrorBody),
    )
)]
pub async fn workspace_egress(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<EgressQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid("limit", format!("must be between 1 and {MAX_PAGE}")));
    }
    let mut filter = EgressFilter {
        workspace_id: None,
        task_id: q.task_id,
        decision: q.decision,
        after_id: q.after,
        limit: limit as usize,
    };
    if !q.follow {
        let rows = state.conductor.egress_events(&id, filter)?;
        let events = rows.into_iter().map(Into::into).collect();
        return Ok(Json(EgressEvents { events }).into_response());
    }
    if let Some(v) = headers.get("last-event-id") {
        let after = v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| ApiError::invalid("Last-Event-ID", "must be the id of an earlier event"))?;
        filter.after_id = Some(after);
    }
    let workspace = state.conductor.get_workspace(&id)?.id;
    // Subscribe before reading the backlog, so no row falls between the two.
    let live = state.conductor.follow_egress();
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(follow(state.conductor.clone(), workspace, filter, live, tx));
    let events = ReceiverStream::new(rx)
        .map(Ok::<_, Infallible>)
        .take_until(closed(state.closing.clone()));
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

/// Whether a live row is one the follow sends.
fn wanted(filter: &EgressFilter, workspace: &str, r: &EgressEventRecord) -> bool {
    r.workspace_id == workspace
        && filter
            .task_id
            .as_deref()
            .is_none_or(|t| r.task_id.as_deref() == Some(t))
        && filter.decision.is_none_or(|d| r.decision == d)
}

fn egress_event(r: EgressEventRecord) -> Event {
    Event::default()
        .event("egress")
        .id(r.id.to_string())
        .data(json_text(&EgressEvent::from(r)))
}

/// A follow's reading of the audit: what it matches and the last row sent.
struct Cursor {
    conductor: Arc<Conductor>,
    workspace: String,
    filter: EgressFilter,
    /// Id of the last row sent.
    last: Option<i64>,
}

impl Cursor {
    /// Reads `filter` (without a cursor: its last `limit` rows; with one: every row after
    /// it, page by page) and sends the rows. `false` when the audit cannot be read or the
    /// client left.
    async fn send_rows(&mut self, tx: &mpsc::Sender<Event>) -> bool {
        loop {
            let filter = EgressFilter {
                after_id: self.last,
                limit: if self.last.is_some() {
                    MAX_PAGE as usize
                } else {
                    self.filter.limit
                },
                ..self.filter.clone()
            };
            let tail = filter.after_id.is_none();
            let rows = match self.conductor.egress_events(&self.workspace, filter) {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(workspace = %self.workspace, %error, "cannot read the egress audit");
                    return false;
                }
            };
            let full = rows.len() == MAX_PAGE as usize;
            for r in rows {
                self.last = Some(r.id);
                if tx.send(egress_event(r)).await.is_err() {
                    return false;
                }
            }
            // A tail is one page; after it, or with none, the cursor is the newest row.
            if tail && self.last.is_none() {
                self.last = Some(0);
            }
            if tail || !full {
                return true;
            }
        }
    }

    /// The workspace's state when it is gone (terminal, or no longer known).
    fn gone(&self) -> Option<String> {
        match self.conductor.get_workspace(&self.workspace) {
            Ok(w) if w.state.is_terminal() => Some(w.state.as_str().to_string()),
            Ok(_) => None,
            Err(conductor_service::ServiceError::NotFound { .. }) => Some("removed".to_string()),
            Err(error) => {
                tracing::debug!(workspace = %self.workspace, %error, "cannot look the workspace up");
                None
            }
        }
    }
}

/// Feeds a follow: the backlog, then the rows the live feed announces (read from the
/// audit after the last one sent), until the workspace is gone or the client leaves.
async fn follow(
    conductor: Arc<Conductor>,
    workspace: String,
    filter: EgressFilter,
    mut live: broadcast::Receiver<EgressEventRecord>,
    tx: mpsc::Sender<Event>,
) {
    let mut cursor = Cursor {
        conductor,
        workspace,
        last: filter.after_id,
        filter,
    };
    // A cursor given by the client means every row after it, not a tail.
    if !cursor.send_rows(&tx).await {
        return;
    }
    let mut check = tokio::time::interval(WORKSPACE_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = live.recv() => match received {
                Ok(r) => {
                    let new = cursor.last.is_none_or(|last| r.id > last);
                    if new && wanted(&cursor.filter, &cursor.workspace, &r) && !cursor.send_rows(&tx).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let event = Event::default().event("lagged").data(json_text(&EgressLagged { missed }));
                    if tx.send(event).await.is_err() || !cursor.send_rows(&tx).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = check.tick() => {
                if let Some(state) = cursor.gone() {
                    // Rows of connections that ended while the workspace went.
                    if cursor.send_rows(&tx).await {
                        let _ = tx.send(Event::default().event("end").data(json_text(&EgressEnd { state }))).await;
                    }
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::extract::FromRequestParts;
    use axum::http::Request;

    use super::*;

    async fn query(q: &str) -> Result<EgressQuery, ApiError> {
        let (mut parts, ()) = Request::builder()
            .uri(format!("/workspaces/ws-1/egress?{q}"))
            .body(())
            .unwrap()
            .into_parts();
        QueryParams::<EgressQuery>::from_request_parts(&mut parts, &())
            .await
            .map(|QueryParams(q)| q)
    }

    #[tokio::test]
    async fn query_parameters() {
        let q = query("limit=5&after=42&decision=denied&task_id=task-1&follow=true")
            .await
            .unwrap();
        assert_eq!(q.limit, Some(5));
        assert_eq!(q.after, Some(42));
        assert_eq!(q.decision, Some(EgressDecision::Denied));
        assert_eq!(q.task_id.as_deref(), Some("task-1"));
        assert!(q.follow);

        let q = query("").await.unwrap();
        assert_eq!((q.limit, q.after, q.decision, q.follow), (None, None, None, false));
        assert_eq!(
            query("decision=allowed").await.unwrap().decision,
            Some(EgressDecision::Allowed)
        );

        for (q, field) in [
            ("decision=maybe", "decision"),
            ("limit=many", "limit"),
            ("after=x", "after"),
            ("follow=perhaps", "follow"),
            ("verbose=1", "verbose"),
        ] {
            let e = query(q).await.expect_err(q);
            assert_eq!(
                (e.code, e.field.as_deref()),
                ("invalid_request", Some(field)),
                "{q}: {}",
                e.message
            );
        }
    }

    fn record(id: i64, workspace: &str, task: Option<&str>, decision: EgressDecision) -> EgressEventRecord {
        EgressEventRecord {
            id,
            at_ms: 1_714_566_896_789,
            workspace_id: workspace.into(),
            task_id: task.map(Into::into),
            method: "CONNECT".into(),
            host: "pypi.org".into(),
            port: 443,
            resolved: Some("151.101.0.223:443".into()),
            decision,
            rule: Some("pypi.org".into()),
            reason: None,
            bytes_up: 10,
            bytes_down: 20,
            duration_ms: 30,
            error: None,
            injected: Vec::new(),
        }
    }

    #[test]
    fn live_rows_are_filtered() {
        let f = EgressFilter {
            task_id: Some("task-1".into()),
            decision: Some(EgressDecision::Allowed),
            ..Default::default()
        };
        assert!(wanted(
            &f,
            "ws-1",
            &record(1, "ws-1", Some("task-1"), EgressDecision::Allowed)
        ));
        assert!(!wanted(
            &f,
            "ws-2",
            &record(1, "ws-1", Some("task-1"), EgressDecision::Allowed)
        ));
        assert!(!wanted(&f, "ws-1", &record(1, "ws-1", None, EgressDecision::Allowed)));
        assert!(!wanted(
            &f,
            "ws-1",
            &record(1, "ws-1", Some("task-1"), EgressDecision::Denied)
        ));
        assert!(wanted(
            &EgressFilter::default(),
            "ws-1",
            &record(1, "ws-1", None, EgressDecision::Denied)
        ));
    }

    #[test]
    fn events_show_the_time_as_rfc3339() {
        let v = serde_json::to_value(EgressEvent::from(record(7, "ws-1", None, EgressDecision::Allowed))).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["at"], "2024-05-01T12:34:56.789Z");
        assert_eq!(v["at_ms"], 1_714_566_896_789_i64);
        assert_eq!(v["decision"], "allowed");
        assert_eq!(v["task_id"], serde_json::Value::Null);
    }
}
