//! E2B's control plane, the REST subset the SDKs call: create, get, list (v1 and v2, with
//! metadata and state filters), kill, set timeout, refresh, connect (v1 and v2), pause,
//! resume and metrics. Every sandbox is a conductor workspace of agent `e2b`; its lease
//! (template, metadata, expiry, what happens then) is a store row, enforced by the
//! [`reaper`](crate::reaper). Errors are E2B's shape: `{"code": <http status>, "message"}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use conductor_core::lifecycle::WorkspaceState;
use conductor_service::workspaces::{CreateRequest, WorkspaceInfo};
use conductor_service::ServiceError;
use conductor_store::{LeaseRecord, OnTimeout};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::envd::Shared;
use crate::{E2b, AGENT_ID, ENVD_VERSION};

/// Default lifetime of a sandbox whose create names none (the SDKs document 300 s).
const DEFAULT_TIMEOUT_S: u64 = 300;

pub(crate) fn routes(shared: Shared) -> Router {
    Router::new()
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/{id}/fork", post(fork))
        .fallback(|| async {
            error(
                StatusCode::NOT_IMPLEMENTED,
                "this part of the E2B API is not supported by conductor (docs/e2b.md lists what is)",
            )
            .into_response()
        })
        .layer(middleware::from_fn_with_state(shared.clone(), require_key))
        .with_state(shared)
}

use crate::{http_error as error, HttpError};

fn service_error(e: ServiceError) -> HttpError {
    let status = match &e {
        ServiceError::Invalid { .. } | ServiceError::Config(_) => StatusCode::BAD_REQUEST,
        ServiceError::NotFound { .. } => StatusCode::NOT_FOUND,
        ServiceError::Conflict(_) => StatusCode::CONFLICT,
        ServiceError::Exhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        ServiceError::TooLarge(_) | ServiceError::NoSpace(_) => StatusCode::PAYLOAD_TOO_LARGE,
        ServiceError::Environment { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let message = match &e {
        ServiceError::NotFound { what } => format!("{what} was not found"),
        other => other.to_string(),
    };
    error(status, message)
}

type Reply = Result<Response, HttpError>;

async fn require_key(State(shared): State<Shared>, req: Request, next: Next) -> Response {
    let Some(e2b) = shared.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down").into_response();
    };
    let headers = req.headers();
    let presented = headers.get("x-api-key").and_then(|v| v.to_str().ok()).or_else(|| {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    });
    if !e2b.api_key_ok(presented) {
        return error(
            StatusCode::UNAUTHORIZED,
            "Invalid API key: set E2B_API_KEY to conductor's API token (security.api_key_file)",
        )
        .into_response();
    }
    next.run(req).await
}

fn e2b(shared: &Shared) -> Result<Arc<E2b>, HttpError> {
    shared
        .get()
        .ok_or_else(|| error(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"))
}

fn now_ms() -> i64 {
    conductor_service::now_ms()
}

fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// E2B's state of a workspace, when it is one of E2B's two.
fn e2b_state(state: WorkspaceState) -> Option<&'static str> {
    match state {
        WorkspaceState::Running => Some("running"),
        WorkspaceState::Paused | WorkspaceState::Suspended => Some("paused"),
        _ => None,
    }
}

/// A live workspace and its lease (a workspace made outside this API gets a lease that
/// never ends, until a client sets a timeout).
fn sandbox(e2b: &E2b, id: &str) -> Result<(WorkspaceInfo, LeaseRecord), HttpError> {
    let not_found = || error(StatusCode::NOT_FOUND, format!("sandbox '{id}' was not found"));
    let info = match e2b.conductor.get_workspace(id) {
        Ok(info) => info,
        Err(ServiceError::NotFound { .. }) => return Err(not_found()),
        Err(e) => return Err(service_error(e)),
    };
    if e2b_state(info.state).is_none() {
        return Err(not_found());
    }
    let lease = e2b
        .conductor
        .store
        .get_lease(&info.id)
        .map_err(|e| service_error(e.into()))?
        .unwrap_or_else(|| LeaseRecord {
            workspace_id: info.id.clone(),
            template: info.environment.clone(),
            metadata: BTreeMap::new(),
            started_at: info.created_at,
            end_at: i64::MAX,
            on_timeout: OnTimeout::Kill,
            auto_resume: true,
        });
    Ok((info, lease))
}

/// The `Sandbox` answer of create, connect and resume.
fn sandbox_json(e2b: &E2b, info: &WorkspaceInfo, lease: &LeaseRecord) -> Value {
    let mut v = json!({
        "templateID": lease.template,
        "alias": lease.template,
        "sandboxID": info.id,
        "clientID": "conductor",
        "envdVersion": ENVD_VERSION,
        "domain": null,
        "trafficAccessToken": null,
    });
    if let Some(token) = e2b.envd_token(&info.id) {
        v["envdAccessToken"] = json!(token);
    }
    v
}

/// The `SandboxDetail`/`ListedSandbox` answer.
fn detail_json(e2b: &E2b, info: &WorkspaceInfo, lease: &LeaseRecord, with_token: bool) -> Value {
    let end = if lease.end_at == i64::MAX {
        // No expiry: shown as a year ahead (the field is required).
        now_ms() + 365 * 86_400_000
    } else {
        lease.end_at
    };
    let mut v = json!({
        "templateID": lease.template,
        "alias": lease.template,
        "sandboxID": info.id,
        "clientID": "conductor",
        "startedAt": rfc3339(lease.started_at),
        "endAt": rfc3339(end),
        "cpuCount": (info.limits.cpu.millis().div_ceil(1000)).max(1),
        "memoryMB": info.limits.memory.bytes() >> 20,
        "diskSizeMB": info.limits.volume_size.bytes() >> 20,
        "metadata": lease.metadata,
        "state": e2b_state(info.state).unwrap_or("running"),
        "envdVersion": ENVD_VERSION,
        "lifecycle": {
            "autoResume": lease.auto_resume,
            "onTimeout": lease.on_timeout.as_str(),
        },
    });
    if with_token {
        if let Some(token) = e2b.envd_token(&info.id) {
            v["envdAccessToken"] = json!(token);
        }
    }
    v
}

/// Parses a JSON body with E2B's error shape for a bad one.
fn body<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, HttpError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("the request body is not valid: {e}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<u64>,
    auto_pause: Option<bool>,
    auto_resume: Option<AutoResume>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    secure: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    network: Option<Value>,
    mcp: Option<Value>,
    volume_mounts: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct AutoResume {
    enabled: Option<bool>,
}

fn check_timeout(e2b: &E2b, timeout: u64) -> Result<u64, HttpError> {
    let max = e2b.conductor.config.e2b.max_timeout;
    if timeout > max {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("timeout: {timeout} s is above the longest allowed, {max} s (e2b.max_timeout)"),
        ));
    }
    Ok(timeout)
}

const MAX_METADATA: usize = 64;

async fn create(State(shared): State<Shared>, raw: axum::body::Bytes) -> Reply {
    let e2b = e2b(&shared)?;
    let req: NewSandbox = body(&raw)?;
    let template = req.template_id.unwrap_or_else(|| "base".into());
    let environment = if template == "base" {
        e2b.conductor.config.e2b.default_template.clone()
    } else {
        template.clone()
    };
    if e2b.conductor.catalog.get(&environment).is_none() {
        let known: Vec<&str> = e2b.conductor.catalog.names().collect();
        return Err(error(
            StatusCode::NOT_FOUND,
            format!(
                "template '{template}' was not found: templates are conductor environments ({}, or 'base' for {})",
                known.join(", "),
                e2b.conductor.config.e2b.default_template
            ),
        ));
    }
    if req.mcp.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "mcp: MCP gateways in sandboxes are not supported by conductor",
        ));
    }
    if req
        .volume_mounts
        .as_ref()
        .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "volumeMounts: E2B volumes are not supported by conductor (a sandbox has its /workspace volume)",
        ));
    }
    if req
        .network
        .as_ref()
        .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "network: E2B network rules are not supported; conductor's egress policy applies (no egress by default)",
        ));
    }
    let _ = (req.secure, req.allow_internet_access);
    let metadata = req.metadata.unwrap_or_default();
    if metadata.len() > MAX_METADATA {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("metadata: at most {MAX_METADATA} entries"),
        ));
    }
    if let Some((k, _)) = metadata
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > 256 || v.len() > 4096)
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("metadata.{k}: keys have 1 to 256 bytes, values at most 4096"),
        ));
    }
    let timeout = check_timeout(&e2b, req.timeout.unwrap_or(DEFAULT_TIMEOUT_S))?;
    let create = CreateRequest {
        agent_id: AGENT_ID.into(),
        environment,
        env: req.env_vars.unwrap_or_default(),
        labels: [("conductor.e2b.template".to_string(), template.clone())].into(),
        ..Default::default()
    };
    let conductor = e2b.conductor.clone();
    // Detached: a client that hangs up must not leave a half-made workspace.
    let made = tokio::spawn(async move { conductor.create_workspace(create, Arc::new(|_| {})).await })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("create failed: {e}")))?
        .map_err(|e| match e {
            ServiceError::Invalid { field, message } if field.starts_with("env") => error(
                StatusCode::BAD_REQUEST,
                format!("envVars{}: {message}", field.strip_prefix("env").unwrap_or("")),
            ),
            other => service_error(other),
        })?;
    let now = now_ms();
    let lease = LeaseRecord {
        workspace_id: made.id.clone(),
        template,
        metadata,
        started_at: now,
        end_at: now.saturating_add((timeout as i64).saturating_mul(1000)),
        on_timeout: if req.auto_pause.unwrap_or(false) {
            OnTimeout::Pause
        } else {
            OnTimeout::Kill
        },
        auto_resume: req.auto_resume.and_then(|a| a.enabled).unwrap_or(false),
    };
    if let Err(e) = e2b.conductor.store.put_lease(&lease) {
        // Nothing lost: the workspace would otherwise live without an expiry.
        let _ = e2b.conductor.remove_workspace(&made.id, Some(false)).await;
        return Err(service_error(e.into()));
    }
    Ok((StatusCode::CREATED, Json(sandbox_json(&e2b, &made, &lease))).into_response())
}

async fn detail(State(shared): State<Shared>, Path(id): Path<String>) -> Reply {
    let e2b = e2b(&shared)?;
    let (info, lease) = sandbox(&e2b, &id)?;
    Ok(Json(detail_json(&e2b, &info, &lease, true)).into_response())
}

/// The metadata filter of a list: `key=value` pairs, URL-encoded as one parameter.
fn metadata_filter(raw: Option<&str>) -> BTreeMap<String, String> {
    let Some(q) = raw else { return BTreeMap::new() };
    let mut filter = BTreeMap::new();
    for pair in url_pairs(q) {
        if pair.0 == "metadata" {
            // The SDKs encode each key and value, then the pairs, then the parameter.
            for (k, v) in url_pairs(&pair.1) {
                filter.insert(percent_decode(&k), percent_decode(&v));
            }
        }
    }
    filter
}

/// `a=1&b=2` decoded (`+` is a space, `%XX` a byte).
fn url_pairs(q: &str) -> Vec<(String, String)> {
    let decode = percent_decode;
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// `s` with `+` as a space and `%XX` as the byte.
fn percent_decode(s: &str) -> String {
    {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn listed(e2b: &E2b, filter: &BTreeMap<String, String>, states: &[&str]) -> Result<Vec<Value>, HttpError> {
    let leases = e2b.conductor.store.list_leases().map_err(|e| service_error(e.into()))?;
    let mut out = Vec::new();
    for lease in leases {
        let Ok(info) = e2b.conductor.get_workspace(&lease.workspace_id) else {
            continue;
        };
        let Some(state) = e2b_state(info.state) else { continue };
        if !states.is_empty() && !states.contains(&state) {
            continue;
        }
        if filter.iter().any(|(k, v)| lease.metadata.get(k) != Some(v)) {
            continue;
        }
        out.push(detail_json(e2b, &info, &lease, false));
    }
    Ok(out)
}

async fn list_v1(State(shared): State<Shared>, RawQuery(q): RawQuery) -> Reply {
    let e2b = e2b(&shared)?;
    let filter = metadata_filter(q.as_deref());
    Ok(Json(listed(&e2b, &filter, &["running"])?).into_response())
}

async fn list_v2(State(shared): State<Shared>, RawQuery(q): RawQuery) -> Reply {
    let e2b = e2b(&shared)?;
    let filter = metadata_filter(q.as_deref());
    let mut states: Vec<String> = Vec::new();
    let mut limit: Option<usize> = None;
    let mut after: Option<String> = None;
    let mut template: Option<String> = None;
    for (k, v) in url_pairs(q.as_deref().unwrap_or("")) {
        match k.as_str() {
            "nextToken" if !v.is_empty() => after = Some(v),
            "template" if !v.is_empty() => template = Some(v),
            "state" => states.extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string)),
            "limit" => {
                limit = Some(
                    v.parse()
                        .map_err(|_| error(StatusCode::BAD_REQUEST, "limit: must be a number"))?,
                );
            }
            _ => {}
        }
    }
    if let Some(bad) = states.iter().find(|s| *s != "running" && *s != "paused") {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("state: '{bad}' is not a sandbox state (running, paused)"),
        ));
    }
    let states: Vec<&str> = states.iter().map(String::as_str).collect();
    // Pages in lease order; the token is the sandbox id the previous page ended with.
    let mut all = listed(&e2b, &filter, &states)?;
    if let Some(t) = template {
        all.retain(|v| v["templateID"] == t.as_str());
    }
    if let Some(after) = after {
        let Some(at) = all.iter().position(|v| v["sandboxID"] == after.as_str()) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "nextToken: not a token of this list (its sandbox is gone); list again from the start",
            ));
        };
        all.drain(..=at);
    }
    let mut next = None;
    if let Some(limit) = limit.filter(|l| *l > 0) {
        if all.len() > limit {
            all.truncate(limit);
            next = all.last().and_then(|v| v["sandboxID"].as_str()).map(str::to_string);
        }
    }
    let mut resp = Json(all).into_response();
    if let Some(token) = next.and_then(|t| axum::http::HeaderValue::from_str(&t).ok()) {
        resp.headers_mut().insert("x-next-token", token);
    }
    Ok(resp)
}

async fn kill(State(shared): State<Shared>, Path(id): Path<String>) -> Reply {
    let e2b = e2b(&shared)?;
    let (info, _) = sandbox(&e2b, &id)?;
    let conductor = e2b.conductor.clone();
    let id = info.id.clone();
    tokio::spawn(async move { conductor.remove_workspace(&id, Some(false)).await })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("kill failed: {e}")))?
        .map_err(service_error)?;
    e2b.processes.forget_sandbox(&info.id);
    e2b.watchers.forget_sandbox(&info.id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Default, Deserialize)]
struct TimeoutBody {
    timeout: Option<u64>,
    duration: Option<u64>,
    #[serde(rename = "autoPause")]
    auto_pause: Option<bool>,
}

/// Moves the lease's end to `seconds` from now (`only_later`: never earlier than it is).
fn extend(
    e2b: &E2b,
    info: &WorkspaceInfo,
    mut lease: LeaseRecord,
    seconds: u64,
    only_later: bool,
) -> Result<LeaseRecord, HttpError> {
    let seconds = check_timeout(e2b, seconds)?;
    let end = now_ms().saturating_add((seconds as i64).saturating_mul(1000));
    if only_later && lease.end_at != i64::MAX && lease.end_at >= end {
        return Ok(lease);
    }
    if only_later && lease.end_at == i64::MAX && e2b.conductor.store.get_lease(&info.id).ok().flatten().is_none() {
        // A workspace made outside this API keeps living without an expiry on connect.
        return Ok(lease);
    }
    lease.end_at = end;
    e2b.conductor
        .store
        .put_lease(&lease)
        .map_err(|e| service_error(e.into()))?;
    Ok(lease)
}

async fn set_timeout(State(shared): State<Shared>, Path(id): Path<String>, raw: axum::body::Bytes) -> Reply {
    let e2b = e2b(&shared)?;
    let b: TimeoutBody = body(&raw)?;
    let Some(timeout) = b.timeout else {
        return Err(error(StatusCode::BAD_REQUEST, "timeout: required (seconds from now)"));
    };
    let (info, lease) = sandbox(&e2b, &id)?;
    extend(&e2b, &info, lease, timeout, false)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn refresh(State(shared): State<Shared>, Path(id): Path<String>, raw: axum::body::Bytes) -> Reply {
    let e2b = e2b(&shared)?;
    let b: TimeoutBody = body(&raw)?;
    let (info, lease) = sandbox(&e2b, &id)?;
    extend(&e2b, &info, lease, b.duration.unwrap_or(DEFAULT_TIMEOUT_S), true)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Resumes a paused sandbox; `true` when it was paused.
async fn resume_if_paused(e2b: &E2b, info: &WorkspaceInfo) -> Result<bool, HttpError> {
    if !matches!(info.state, WorkspaceState::Paused | WorkspaceState::Suspended) {
        return Ok(false);
    }
    let conductor = e2b.conductor.clone();
    let id = info.id.clone();
    tokio::spawn(async move { conductor.resume_workspace(&id).await })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("resume failed: {e}")))?
        .map_err(service_error)?;
    Ok(true)
}

async fn connect(State(shared): State<Shared>, Path(id): Path<String>, raw: axum::body::Bytes) -> Reply {
    let e2b = e2b(&shared)?;
    let b: TimeoutBody = body(&raw)?;
    let (info, lease) = sandbox(&e2b, &id)?;
    let resumed = resume_if_paused(&e2b, &info).await?;
    let lease = match b.timeout {
        Some(t) => extend(&e2b, &info, lease, t, !resumed)?,
        None => lease,
    };
    let status = if resumed { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(sandbox_json(&e2b, &info, &lease))).into_response())
}

async fn pause(State(shared): State<Shared>, Path(id): Path<String>) -> Reply {
    let e2b = e2b(&shared)?;
    let (info, _) = sandbox(&e2b, &id)?;
    if info.state != WorkspaceState::Running {
        return Err(error(StatusCode::CONFLICT, format!("sandbox '{id}' is already paused")));
    }
    let conductor = e2b.conductor.clone();
    let wid = info.id.clone();
    tokio::spawn(async move { conductor.pause_workspace(&wid).await })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("pause failed: {e}")))?
        .map_err(service_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn resume(State(shared): State<Shared>, Path(id): Path<String>, raw: axum::body::Bytes) -> Reply {
    let e2b = e2b(&shared)?;
    let b: TimeoutBody = body(&raw)?;
    let (info, mut lease) = sandbox(&e2b, &id)?;
    if !resume_if_paused(&e2b, &info).await? {
        return Err(error(StatusCode::CONFLICT, format!("sandbox '{id}' is not paused")));
    }
    if let Some(p) = b.auto_pause {
        lease.on_timeout = if p { OnTimeout::Pause } else { OnTimeout::Kill };
    }
    let lease = extend(&e2b, &info, lease, b.timeout.unwrap_or(DEFAULT_TIMEOUT_S), false)?;
    Ok((StatusCode::CREATED, Json(sandbox_json(&e2b, &info, &lease))).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct ForkBody {
    timeout: Option<u64>,
    count: Option<u32>,
}

/// Forks a sandbox into `count` new ones (conductor's fork: all or nothing), each with the
/// source's template and metadata and a lease of `timeout`.
async fn fork(State(shared): State<Shared>, Path(id): Path<String>, raw: axum::body::Bytes) -> Reply {
    let e2b = e2b(&shared)?;
    let b: ForkBody = body(&raw)?;
    let (info, lease) = sandbox(&e2b, &id)?;
    let timeout = check_timeout(&e2b, b.timeout.unwrap_or(DEFAULT_TIMEOUT_S))?;
    let req = conductor_service::fork::ForkRequest {
        count: b.count.unwrap_or(1),
        snapshot: None,
        agent_id: Some(AGENT_ID.into()),
        env: Default::default(),
        limits: Default::default(),
    };
    let conductor = e2b.conductor.clone();
    let source = info.id.clone();
    let forked = tokio::spawn(async move { conductor.fork_workspace(&source, req).await })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("fork failed: {e}")))?
        .map_err(service_error)?;
    let now = now_ms();
    let mut out = Vec::new();
    for w in &forked.workspaces {
        let copy = LeaseRecord {
            workspace_id: w.id.clone(),
            started_at: now,
            end_at: now.saturating_add((timeout as i64).saturating_mul(1000)),
            ..lease.clone()
        };
        e2b.conductor
            .store
            .put_lease(&copy)
            .map_err(|e| service_error(e.into()))?;
        out.push(json!({ "sandbox": sandbox_json(&e2b, w, &copy) }));
    }
    Ok((StatusCode::CREATED, Json(Value::Array(out))).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct MetricsQuery {
    #[allow(dead_code)]
    start: Option<i64>,
    #[allow(dead_code)]
    end: Option<i64>,
}

async fn metrics(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    Query(_q): Query<MetricsQuery>,
    _headers: HeaderMap,
) -> Reply {
    let e2b = e2b(&shared)?;
    let (info, _) = sandbox(&e2b, &id)?;
    let (info, usage) = e2b.conductor.inspect_workspace(&info.id).await.map_err(service_error)?;
    let Some(u) = usage else {
        return Ok(Json(json!([])).into_response());
    };
    let now = now_ms();
    Ok(Json(json!([{
        "timestamp": rfc3339(now),
        "timestampUnix": now / 1000,
        "cpuCount": (info.limits.cpu.millis().div_ceil(1000)).max(1),
        "cpuUsedPct": u.cpu_percent,
        "memUsed": u.memory_bytes,
        "memTotal": u.memory_limit_bytes,
        "memCache": 0,
        "diskUsed": u.disk_used_bytes.unwrap_or(0),
        "diskTotal": u.disk_limit_bytes.unwrap_or(info.limits.volume_size.bytes()),
    }]))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_are_one_url_encoded_parameter() {
        let f = metadata_filter(Some("metadata=owner%3Dci%26run%3D7&state=running"));
        // As the SDKs send {"team name": "a b&c"}: each part, the pairs, the parameter.
        let sdk = metadata_filter(Some("metadata=team%252520name%3Da%252520b%252526c"));
        assert_eq!(sdk, BTreeMap::from([("team name".to_string(), "a b&c".to_string())]));
        assert_eq!(
            f,
            BTreeMap::from([
                ("owner".to_string(), "ci".to_string()),
                ("run".to_string(), "7".to_string())
            ])
        );
        assert!(metadata_filter(None).is_empty());
        assert_eq!(
            url_pairs("a=b+c&d=%41%zz"),
            vec![("a".into(), "b c".into()), ("d".into(), "A%zz".into())]
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.5Z");
    }
}
