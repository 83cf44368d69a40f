//! The HTTP API over real HTTP on 127.0.0.1:0 against real Podman: health, the OpenAPI
//! golden file, environments, workspaces, every kind of bad request (each gets the right
//! 4xx with the JSON error body and leaves nothing behind), the bearer token, the Host
//! check, and the spec's curl examples run with the real `curl`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestEnv;
use conductor_service::tasks::Orchestrator;
use conductor_service::workspaces::ListFilter;
use conductor_service::Conductor;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A conductor with the API served in-process on 127.0.0.1:0.
struct Api {
    /// Owns the data directory; its conductor was moved into `conductor`.
    env: TestEnv,
    conductor: Option<Arc<Conductor>>,
    port: u16,
    orchestrator: Option<Orchestrator>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    http: reqwest::Client,
}

impl Api {
    async fn start(extra: &str) -> Api {
        let mut env = TestEnv::new(extra).await;
        let conductor = Arc::new(env.conductor.take().expect("conductor"));
        let orchestrator = Orchestrator::start(conductor.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let c = conductor.clone();
        let server = tokio::spawn(async move {
            conductor_api::serve(c, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        let api = Api {
            env,
            conductor: Some(conductor),
            orchestrator: Some(orchestrator),
            port,
            stop: Some(stop),
            server: Some(server),
            http: reqwest::Client::new(),
        };
        // The router (and the API key file) is made when the server task first runs.
        for _ in 0..100 {
            if api.http.get(api.url("/health")).send().await.is_ok() {
                return api;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the API did not come up");
    }

    fn c(&self) -> &Conductor {
        self.conductor.as_deref().expect("conductor")
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        send(self.http.get(self.url(path))).await
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        send(self.http.post(self.url(path)).json(body)).await
    }

    /// Workspaces in any state, and this instance's containers in Podman.
    async fn leftovers(&self) -> (usize, usize) {
        let rows = self
            .c()
            .list_workspaces(&ListFilter {
                all: true,
                ..Default::default()
            })
            .unwrap();
        let containers = self
            .c()
            .engine
            .container_list(&[("io.conductor.instance", Some(self.c().instance.as_str()))])
            .await
            .unwrap();
        (rows.len(), containers.len())
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let Some(c) = self.conductor.take() else { return };
        let (stop, server, orchestrator) = (self.stop.take(), self.server.take(), self.orchestrator.take());
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                if let Some(o) = orchestrator {
                    o.shutdown(Duration::from_secs(1)).await;
                }
                if let Some(s) = stop {
                    let _ = s.send(());
                }
                if let Some(h) = server {
                    let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
                }
                let all = c.list_workspaces(&ListFilter::default()).unwrap_or_default();
                for w in all {
                    let _ = c.remove_workspace(&w.id, Some(false)).await;
                }
                let _ = c.reconcile().await;
                drop(c);
            })
        });
        let _ = &self.env;
    }
}

/// Sends a request and returns the status and the JSON body (`Null` when not JSON). Every
/// answer carries an `X-Request-Id`, and an error body quotes the same id.
async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let r = req.send().await.expect("send request");
    let status = r.status();
    let id = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = r.text().await.expect("read body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    if body["error"].is_object() {
        assert!(id.as_deref().is_some_and(|id| id.len() == 16), "no X-Request-Id");
        assert_eq!(body["error"]["request_id"].as_str(), id.as_deref(), "{body}");
    }
    (status, body)
}

/// Asserts an error response: status, code and field.
#[track_caller]
fn assert_error(got: &(StatusCode, Value), status: u16, code: &str, field: Option<&str>) {
    let (s, body) = got;
    assert_eq!(s.as_u16(), status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["field"].as_str(), field, "{body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// The document served equals `conductor_api::openapi()`, which equals the golden copy in
/// docs/openapi.json (`UPDATE_GOLDEN=1` rewrites it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_openapi_and_environments() {
    let golden_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let doc = serde_json::to_string_pretty(&conductor_api::openapi()).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden_path, &doc).unwrap();
    }
    let golden = std::fs::read_to_string(&golden_path).expect("docs/openapi.json (run with UPDATE_GOLDEN=1)");
    assert!(
        golden == doc,
        "the OpenAPI document changed; review and run with UPDATE_GOLDEN=1 to accept"
    );

    let api = Api::start("").await;
    let (s, health) = api.get("/health").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        health,
        json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "engine": "ok"})
    );

    let (s, served) = api.get("/openapi.json").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served, serde_json::from_str::<Value>(&golden).unwrap());
    assert!(served["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/tasks",
        "/tasks/{id}",
        "/tasks/{id}/logs",
        "/tasks/{id}/cancel",
        "/workspaces",
        "/workspaces/{id}",
        "/workspaces/{id}/exec",
        "/workspaces/{id}/files",
        "/environments",
        "/health",
        "/metrics",
    ] {
        assert!(served["paths"][path].is_object(), "{path} is not documented");
    }

    let (s, envs) = api.get("/environments").await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = envs["environments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for preset in [
        "minimal",
        "python-dev",
        "nodejs-dev",
        "fullstack",
        "python-ml",
        "security-tools",
    ] {
        assert!(names.contains(&preset), "{names:?}");
    }
    let minimal = &envs["environments"].as_array().unwrap()[names.iter().position(|n| *n == "minimal").unwrap()];
    assert_eq!(minimal["built"], true, "{minimal}");
    assert_eq!(minimal["kind"], "preset");

    let r = api.http.get(api.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for line in [
        "# TYPE conductor_workspaces gauge",
        "conductor_workspaces{state=\"running\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
}

/// Create, inspect, exec (env, cwd, exit code, stderr, timeout), list, delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_lifecycle_over_http() {
    let api = Api::start("").await;
    let (s, w) = api
        .post(
            "/workspaces",
            &json!({"agent_id": "http1", "environment": "minimal", "limits": {"memory": "512Mi", "cpu": 0.5, "pids": 128}, "network": "none"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{w}");
    let id = w["workspace_id"].as_str().unwrap().to_string();
    assert_eq!(w["id"], id.as_str());
    assert_eq!(w["state"], "running");
    assert_eq!(w["agent_id"], "http1");
    assert_eq!(w["limits"]["memory"], "512Mi");
    assert_eq!(w["limits"]["cpu"], "0.5");
    assert_eq!(w["limits"]["pids"], 128);
    assert!(w.get("volume_dir").is_none(), "host paths stay private: {w}");

    let (s, got) = api.get(&format!("/workspaces/{id}")).await;
    assert_eq!(s, StatusCode::OK, "{got}");
    assert_eq!(got["state"], "running");
    assert!(got["usage"]["memory_limit_bytes"].as_u64().unwrap() > 0, "{got}");
    assert_eq!(got["usage"]["pids_limit"], 128);

    let exec = format!("/workspaces/{id}/exec");
    let (s, r) = api
        .post(
            &exec,
            &json!({"command": "echo \"$GREETING from $(pwd)\"; echo oops >&2; exit 3", "env": {"GREETING": "hi there"}, "cwd": "/etc"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["stdout"], "hi there from /etc\n");
    assert_eq!(r["stderr"], "oops\n");
    assert_eq!(r["timed_out"], false);
    assert!(r["duration_ms"].is_u64());

    let (s, r) = api.post(&exec, &json!({"command": "sleep 30", "timeout": 1})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        (r["exit_code"].as_i64(), r["timed_out"].as_bool()),
        (Some(124), Some(true))
    );
    assert!(r["duration_ms"].as_u64().unwrap() < 10_000, "{r}");

    assert_error(
        &api.post(&exec, &json!({"command": "true", "env": {"BAD-NAME": "x"}}))
            .await,
        400,
        "invalid_request",
        Some("env.BAD-NAME"),
    );
    assert_error(
        &api.post(&exec, &json!({"command": "true", "cwd": "relative"})).await,
        400,
        "invalid_request",
        Some("cwd"),
    );
    assert_error(
        &api.post(&exec, &json!({"command": "true", "timeout": 0})).await,
        400,
        "invalid_request",
        Some("timeout"),
    );
    assert_error(
        &api.post(&exec, &json!({"command": "true", "privileged": true})).await,
        400,
        "invalid_request",
        Some("privileged"),
    );
    assert_error(
        &api.post(&exec, &json!({"command": "true", "user": "root"})).await,
        400,
        "invalid_request",
        Some("user"),
    );
    assert_error(
        &api.post("/workspaces/ws-nope/exec", &json!({"command": "true"})).await,
        404,
        "not_found",
        None,
    );

    let (s, list) = api.get("/workspaces?agent_id=http1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["workspaces"].as_array().unwrap().len(), 1, "{list}");
    let (_, list) = api.get("/workspaces?agent_id=someone-else").await;
    assert_eq!(list["workspaces"], json!([]));
    let (_, list) = api.get("/workspaces?state=running&environment=minimal").await;
    assert_eq!(list["workspaces"].as_array().unwrap().len(), 1, "{list}");

    let (s, gone) = send(
        api.http
            .delete(api.url(&format!("/workspaces/{id}?keep_volumes=false"))),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{gone}");
    assert_eq!(gone["state"], "removed");
    assert_error(
        &send(api.http.delete(api.url(&format!("/workspaces/{id}")))).await,
        409,
        "conflict",
        None,
    );
    assert_error(
        &api.post(&exec, &json!({"command": "true"})).await,
        409,
        "conflict",
        None,
    );
    let (_, list) = api.get("/workspaces").await;
    assert_eq!(list["workspaces"], json!([]));
    let (_, list) = api.get("/workspaces?all=true").await;
    assert_eq!(list["workspaces"].as_array().unwrap().len(), 1);
    assert_eq!(api.leftovers().await.1, 0, "containers left behind");
}

/// Every malformed or forbidden workspace request is refused with the documented error
/// body, naming the field, and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_workspace_requests_are_refused_and_leave_nothing() {
    let api = Api::start("network:\n  max_body_size: 64Ki\n").await;
    let raw = |body: &'static str, ctype: &'static str| {
        send(
            api.http
                .post(api.url("/workspaces"))
                .header("content-type", ctype)
                .body(body),
        )
    };
    let json_type = "application/json";
    assert_error(
        &raw(r#"{"agent_id": "a", "#, json_type).await,
        400,
        "malformed_json",
        None,
    );
    assert_error(&raw("not json at all", json_type).await, 400, "malformed_json", None);
    assert_error(
        &raw(r#"{"agent_id":"a","environment":"minimal"}"#, "text/plain").await,
        415,
        "unsupported_media_type",
        None,
    );
    assert_error(
        &raw(r#"{"agent_id": 5, "environment": "minimal"}"#, json_type).await,
        400,
        "invalid_request",
        Some("agent_id"),
    );
    assert_error(
        &raw(r#"{"environment": "minimal"}"#, json_type).await,
        400,
        "invalid_request",
        Some("agent_id"),
    );
    assert_error(&raw(r#"[]"#, json_type).await, 400, "invalid_request", Some("body"));

    let ok = json!({"agent_id": "bad1", "environment": "minimal"});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            with("environment", json!("no-such-env")),
            400,
            "invalid_request",
            "environment",
        ),
        (with("environment", json!("-rf")), 400, "invalid_request", "environment"),
        (
            with("agent_id", json!("Agent;rm -rf /")),
            400,
            "invalid_request",
            "agent_id",
        ),
        (with("privileged", json!(true)), 400, "invalid_request", "privileged"),
        (with("mounts", json!(["/:/host"])), 400, "invalid_request", "mounts"),
        (with("cap_add", json!(["SYS_ADMIN"])), 400, "invalid_request", "cap_add"),
        (with("network", json!("host")), 400, "invalid_request", "network"),
        (
            with("limits", json!({"memory": "64Gi"})),
            400,
            "invalid_request",
            "limits.memory",
        ),
        (with("limits", json!({"cpu": 64})), 400, "invalid_request", "limits.cpu"),
        (
            with("limits", json!({"pids": 100000})),
            400,
            "invalid_request",
            "limits.pids",
        ),
        (
            with("limits", json!({"volume_size": "1Ti"})),
            400,
            "invalid_request",
            "limits.volume_size",
        ),
        (
            with("limits", json!({"memory": "lots"})),
            400,
            "invalid_request",
            "limits.memory",
        ),
        (
            with("limits", json!({"privileged": true})),
            400,
            "invalid_request",
            "limits.privileged",
        ),
    ];
    for (body, status, code, field) in cases {
        let got = api.post("/workspaces", &body).await;
        assert_error(&got, status, code, Some(field));
    }
    let huge = format!(
        r#"{{"agent_id":"a","environment":"minimal","pad":"{}"}}"#,
        "x".repeat(100 * 1024)
    );
    let r = api
        .http
        .post(api.url("/workspaces"))
        .header("content-type", json_type)
        .body(huge)
        .send()
        .await
        .expect("send request");
    // The body was refused unread: the server says it closes the connection, so the
    // client does not reuse it for the next request.
    assert_eq!(r.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
    let status = r.status();
    let got = (
        status,
        serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
    );
    assert_error(&got, 413, "payload_too_large", None);

    assert_error(&api.get("/workspaces/ws-nope").await, 404, "not_found", None);
    assert_error(
        &send(api.http.delete(api.url("/workspaces/ws-nope"))).await,
        404,
        "not_found",
        None,
    );
    assert_error(
        &api.get("/workspaces?state=bogus").await,
        400,
        "invalid_request",
        Some("state"),
    );
    assert_error(
        &api.get("/workspaces?color=red").await,
        400,
        "invalid_request",
        Some("color"),
    );
    assert_error(&api.get("/no/such/endpoint").await, 404, "not_found", None);
    assert_error(
        &send(api.http.put(api.url("/workspaces"))).await,
        405,
        "method_not_allowed",
        None,
    );

    assert_eq!(api.leftovers().await, (0, 0), "a refused request left something behind");
}

/// With `security.api_key_required`, a token file is created (0600) and every endpoint
/// but /health needs it; a foreign Host header is refused before anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_host_checks() {
    use std::os::unix::fs::PermissionsExt;
    let api = Api::start("security:\n  api_key_required: true\n").await;
    let key_file = api.c().paths.base.join("config/api-key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = std::fs::read_to_string(&key_file).unwrap().trim().to_string();
    assert_eq!(token.len(), 64);

    let (s, _) = api.get("/health").await;
    assert_eq!(s, StatusCode::OK, "health stays open");
    let got = api.get("/environments").await;
    assert_error(&got, 401, "unauthorized", None);
    let got = send(api.http.get(api.url("/environments")).bearer_auth("wrong-token")).await;
    assert_error(&got, 401, "unauthorized", None);
    let got = send(
        api.http
            .post(api.url("/workspaces"))
            .bearer_auth("wrong")
            .json(&json!({"agent_id": "t", "environment": "minimal"})),
    )
    .await;
    assert_error(&got, 401, "unauthorized", None);
    let (s, _) = send(api.http.get(api.url("/environments")).bearer_auth(&token)).await;
    assert_eq!(s, StatusCode::OK);

    for host in [
        "evil.example",
        "evil.example:8081",
        "localhost.evil.example",
        "10.1.2.3",
    ] {
        let got = send(api.http.get(api.url("/health")).header("host", host)).await;
        assert_error(&got, 403, "forbidden_host", None);
    }
    for host in [
        format!("localhost:{}", api.port),
        "127.0.0.1".to_string(),
        "[::1]:1".to_string(),
    ] {
        let (s, _) = send(api.http.get(api.url("/health")).header("host", host.as_str())).await;
        assert_eq!(s, StatusCode::OK, "{host}");
    }
    assert_eq!(api.leftovers().await, (0, 0));
}

/// Polls a task until it has finished.
async fn finished(api: &Api, id: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let (s, t) = api.get(&format!("/tasks/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{t}");
        if !["queued", "running"].contains(&t["status"].as_str().unwrap()) {
            return t;
        }
        assert!(std::time::Instant::now() < deadline, "task {id} did not finish: {t}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every malformed or forbidden task submission is refused with the documented error body,
/// naming the field, and queues nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_task_requests_are_refused_and_queue_nothing() {
    let api = Api::start("network:\n  max_body_size: 64Ki\n").await;
    let raw = |body: String| {
        send(
            api.http
                .post(api.url("/tasks"))
                .header("content-type", "application/json")
                .body(body),
        )
    };
    assert_error(
        &raw(r#"{"task_type": "isolated_execution", "#.into()).await,
        400,
        "malformed_json",
        None,
    );
    assert_error(
        &raw(r#"{"task_type": 'single quotes'}"#.into()).await,
        400,
        "malformed_json",
        None,
    );
    let huge = format!(
        r#"{{"task_type":"isolated_execution","environment":"minimal","commands":["echo {}"]}}"#,
        "x".repeat(70 * 1024)
    );
    assert_error(&raw(huge).await, 413, "payload_too_large", None);

    let ok = json!({"task_type": "isolated_execution", "environment": "minimal", "commands": ["true"]});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("commands", json!("ls")), "commands"),
        (with("commands", json!(["ok", 3])), "commands[1]"),
        (with("commands", json!([])), "commands"),
        (with("environment", json!("no-such-env")), "environment"),
        (with("environment", json!(7)), "environment"),
        (with("task_type", json!("shell")), "task_type"),
        (with("priority", json!(11)), "priority"),
        (with("priority", json!(300)), "priority"),
        (with("timeout", json!(-1)), "timeout"),
        (with("services", json!(["-v /:/host"])), "services[0]"),
        (with("services", json!(["redis:7", "redis;rm -rf /"])), "services[1]"),
        (with("services", json!(["$(reboot)"])), "services[0]"),
        (with("services", json!(["postgres:14 --privileged"])), "services[0]"),
        (with("env", json!({"BAD-NAME": "x"})), "env.BAD-NAME"),
        (with("env", json!({"1ABC": "x"})), "env.1ABC"),
        (with("env", json!({"OK": 1})), "env.OK"),
        (with("agent_id", json!("../etc")), "agent_id"),
        (with("source", json!("relative/path")), "source"),
        (with("source", json!("/no/such/dir")), "source"),
        (with("privileged", json!(true)), "privileged"),
        (with("mounts", json!(["/:/host"])), "mounts"),
        (with("cap_add", json!(["SYS_ADMIN"])), "cap_add"),
        (with("network_mode", json!("host")), "network_mode"),
        (json!({"environment": "minimal", "commands": ["true"]}), "task_type"),
        (json!([ok.clone(), with("commands", json!([]))]), "tasks[1].commands"),
        (json!([ok.clone(), with("user", json!("root"))]), "tasks[1].user"),
        (json!([with("environment", json!("nope"))]), "tasks[0].environment"),
        (json!([]), "tasks"),
        (json!("just a string"), "body"),
    ];
    for (body, field) in cases {
        let got = api.post("/tasks", &body).await;
        assert_error(&got, 400, "invalid_request", Some(field));
    }
    assert_error(
        &api.post("/tasks?wait=maybe", &ok).await,
        400,
        "invalid_request",
        Some("wait"),
    );
    assert_error(
        &api.get("/tasks?status=bogus").await,
        400,
        "invalid_request",
        Some("status"),
    );
    assert_error(&api.get("/tasks?limit=0").await, 400, "invalid_request", Some("limit"));
    assert_error(&api.get("/tasks/task-nope").await, 404, "not_found", None);
    assert_error(&api.get("/tasks/task-nope/logs").await, 404, "not_found", None);
    assert_error(
        &api.get("/tasks/task-nope/logs?follow=true").await,
        404,
        "not_found",
        None,
    );
    assert_error(
        &api.post("/tasks/task-nope/cancel", &json!({})).await,
        404,
        "not_found",
        None,
    );

    let (s, page) = api.get("/tasks").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (page["total"].as_u64(), page["tasks"].clone()),
        (Some(0), json!([])),
        "a refused task was queued"
    );
    assert_eq!(api.leftovers().await, (0, 0));
}

/// One SSE event: its name, data and id.
#[derive(Debug)]
struct SseEvent {
    event: String,
    data: Value,
    id: Option<i64>,
}

/// Reads a Server-Sent Events response until its `end` event.
async fn read_sse(resp: reqwest::Response) -> Vec<SseEvent> {
    use futures_util::StreamExt;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();
    let (mut buf, mut out) = (String::new(), Vec::new());
    let read = async {
        while let Some(chunk) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk.expect("SSE chunk")));
            while let Some(i) = buf.find("\n\n") {
                let block: String = buf.drain(..i + 2).collect();
                let (mut event, mut data, mut id) = (String::new(), String::new(), None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    }
                }
                if event.is_empty() {
                    continue; // keep-alive comment
                }
                let end = event == "end";
                out.push(SseEvent {
                    event,
                    data: serde_json::from_str(&data).expect("event data is JSON"),
                    id,
                });
                if end {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(300), read)
        .await
        .expect("the stream ended with an end event");
    out
}

/// A task's log followed live over SSE, read as text, resumed with Last-Event-ID; a running
/// task cancelled; listing with filters and paging; task metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_logs_follow_cancel_and_list() {
    let api = Api::start("").await;
    let (s, t) = api
        .post(
            "/tasks",
            &json!({"task_type": "isolated_execution", "environment": "minimal", "agent_id": "logs1",
                    "commands": ["echo one", "sleep 2", "echo two >&2", "echo three"]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let id = t["task_id"].as_str().unwrap().to_string();
    assert_eq!(t["status"], "queued");
    assert_eq!(t["id"], id.as_str());

    let resp = api
        .http
        .get(api.url(&format!("/tasks/{id}/logs?follow=true")))
        .send()
        .await
        .unwrap();
    let events = read_sse(resp).await;
    let end = events.last().unwrap();
    assert_eq!(
        (end.event.as_str(), &end.data),
        ("end", &json!({"status": "succeeded"}))
    );
    let outputs: Vec<&SseEvent> = events.iter().filter(|e| e.event == "output").collect();
    let text = |evs: &[&SseEvent], stream: &str| -> String {
        evs.iter()
            .filter(|e| e.data["stream"] == stream)
            .map(|e| e.data["data"].as_str().unwrap())
            .collect()
    };
    assert_eq!(text(&outputs, "stdout"), "one\nthree\n", "{events:?}");
    assert_eq!(text(&outputs, "stderr"), "two\n", "{events:?}");
    assert!(
        outputs.windows(2).all(|w| w[0].id < w[1].id),
        "ids increase: {events:?}"
    );

    let logs = api
        .http
        .get(api.url(&format!("/tasks/{id}/logs")))
        .send()
        .await
        .unwrap();
    assert!(logs.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let logs = logs.text().await.unwrap();
    let (one, two, three) = (logs.find("one\n"), logs.find("two\n"), logs.find("three\n"));
    assert!(one < two && two < three && one.is_some(), "{logs}");

    // Resuming after the first output skips it.
    let first = outputs.iter().find(|e| e.data["data"] == "one\n").unwrap().id.unwrap();
    let resp = api
        .http
        .get(api.url(&format!("/tasks/{id}/logs?follow=true")))
        .header("Last-Event-ID", first.to_string())
        .send()
        .await
        .unwrap();
    let resumed = read_sse(resp).await;
    assert!(resumed.iter().all(|e| e.data["data"] != "one\n"), "{resumed:?}");
    assert!(resumed.iter().any(|e| e.data["data"] == "three\n"), "{resumed:?}");

    let (_, done) = api.get(&format!("/tasks/{id}")).await;
    assert_eq!(
        (done["status"].as_str(), done["exit_code"].as_i64()),
        (Some("succeeded"), Some(0)),
        "{done}"
    );
    let main: Vec<&Value> = done["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["phase"] == "main")
        .collect();
    assert_eq!(main.len(), 4, "{done}");
    assert_eq!(main[2]["stderr"], "two\n");
    assert!(main.iter().all(|c| c["exit_code"] == 0), "{done}");
    assert!(done["duration_ms"].as_u64().unwrap() >= 2000, "{done}");

    // Cancel a running task.
    let (_, t) = api
        .post(
            "/tasks",
            &json!({"task_type": "isolated_execution", "environment": "minimal", "agent_id": "logs2", "commands": ["echo started", "sleep 300"]}),
        )
        .await;
    let slow = t["task_id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let logs = common::task_log(&api.http, &api.url(""), &slow).await;
        if logs.contains("started\n") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slow task never started: {logs}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, c) = api.post(&format!("/tasks/{slow}/cancel"), &json!({})).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["status"], "cancelled");
    assert_error(
        &api.post(&format!("/tasks/{slow}/cancel"), &json!({})).await,
        409,
        "conflict",
        None,
    );

    let (_, page) = api.get("/tasks?status=cancelled").await;
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(page["tasks"][0]["task_id"], slow.as_str());
    let (_, page) = api.get("/tasks?limit=1").await;
    assert_eq!(
        (page["total"].as_u64(), page["tasks"].as_array().unwrap().len()),
        (Some(2), 1),
        "{page}"
    );
    assert_eq!(page["tasks"][0]["task_id"], slow.as_str(), "newest first");
    let (_, page) = api.get("/tasks?limit=1&offset=1").await;
    assert_eq!(page["tasks"][0]["task_id"], id.as_str());
    let (_, page) = api.get("/tasks?agent_id=logs1&environment=minimal").await;
    assert_eq!(page["total"], 1);
    let (_, page) = api.get("/tasks?environment=python-dev").await;
    assert_eq!(page["total"], 0);

    let metrics = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "conductor_tasks{status=\"succeeded\"} 1",
        "conductor_tasks{status=\"cancelled\"} 1",
        "conductor_queue_depth 0",
        "# TYPE conductor_task_duration_seconds histogram",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing in\n{metrics}");
    }
    // Sandboxes are removed just after their task's outcome is recorded.
    let start = Instant::now();
    while api.leftovers().await.1 != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "sandbox containers left behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The spec's curl examples, verbatim apart from the port (`8081` becomes the test's).
const SPEC_PYTHON: &str = r#"curl -X POST http://localhost:8081/tasks \
  -H 'Content-Type: application/json' \
  -d '{
    "task_type": "isolated_execution",
    "description": "Run Python tests",
    "environment": "python-dev",
    "commands": [
      "cd /workspace/src",
      "python -m pytest tests/"
    ]
  }'
"#;
const SPEC_NODE: &str = r#"curl -X POST http://localhost:8081/tasks \
  -H 'Content-Type: application/json' \
  -d '{
    "task_type": "isolated_execution",
    "description": "Build Node.js project",
    "environment": "nodejs-dev",
    "commands": [
      "cd /workspace/src",
      "npm install",
      "npm run build",
      "npm test"
    ]
  }'
"#;
const SPEC_FULLSTACK: &str = r#"curl -X POST http://localhost:8081/tasks \
  -H 'Content-Type: application/json' \
  -d '{
    "task_type": "isolated_execution",
    "description": "Run integration tests",
    "environment": "fullstack",
    "services": ["postgres:14", "redis:7"],
    "commands": [
      "cd /workspace",
      "./scripts/setup-dev.sh",
      "./scripts/run-integration-tests.sh"
    ]
  }'
"#;
const SPEC_SECURITY: &str = r#"curl -X POST http://localhost:8081/tasks \
  -H 'Content-Type: application/json' \
  -d '{
    "task_type": "isolated_execution",
    "description": "Security scan",
    "environment": "security-tools",
    "commands": [
      "cd /workspace",
      "bandit -r src/",
      "safety check",
      "npm audit"
    ]
  }'
"#;
/// The CI example posts a file of tasks (an array).
const SPEC_CI: &str = r#"curl -X POST http://localhost:8081/tasks \
  -H 'Content-Type: application/json' \
  -d @tests/isolated-test-suite.json
"#;

/// Runs a curl example with the real `curl` from the repository root and returns the JSON
/// it printed.
fn run_curl(example: &str, port: u16) -> Value {
    let command = example.replace("localhost:8081", &format!("localhost:{port}"));
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&command)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{command}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("curl printed no JSON ({e}): {stdout}"))
}

/// Writes `files` (path, content, executable) under `dir`.
fn write_tree(dir: &std::path::Path, files: &[(&str, &str, bool)]) {
    use std::os::unix::fs::PermissionsExt;
    for (path, content, exec) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        if *exec {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

/// The spec's curl examples, run as written with the real curl against the service: each
/// is accepted (202 with a task id), and each runs in the agent's shared workspace of its
/// environment, into which a first task copied a small real project (`source`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_curl_examples_work_as_written() {
    // The spec's examples carry no agent_id: in shared mode they all use the agent
    // "shared", whose per-environment workspaces keep /workspace between tasks.
    let api = Api::start("isolated_workspace:\n  mode: shared\n").await;
    let projects = api.env.dir.path().join("projects");
    let python = projects.join("python");
    write_tree(
        &python,
        &[
            ("calc.py", "def add(a, b):\n    return a + b\n", false),
            (
                "tests/test_calc.py",
                "import calc\n\n\ndef test_add():\n    assert calc.add(2, 3) == 5\n",
                false,
            ),
        ],
    );
    let node = projects.join("node");
    write_tree(&node, &[
        ("package.json", r#"{"name": "demo", "version": "1.0.0", "private": true, "scripts": {"build": "node build.js", "test": "node test.js"}}"#, false),
        (".npmrc", "audit=false\nfund=false\nupdate-notifier=false\n", false),
        ("src/add.js", "module.exports = (a, b) => a + b;\n", false),
        ("build.js", "const fs = require('fs');\nfs.mkdirSync('dist', { recursive: true });\nfs.copyFileSync('src/add.js', 'dist/add.js');\nconsole.log('built dist/add.js');\n", false),
        ("test.js", "const assert = require('assert');\nassert.strictEqual(require('./dist/add.js')(2, 3), 5);\nconsole.log('1 test passed');\n", false),
    ]);
    let fullstack = projects.join("fullstack");
    write_tree(&fullstack, &[
        ("scripts/setup-dev.sh", "#!/bin/sh\nset -e\nexport PGPASSWORD=postgres\npsql -h postgres -U postgres -v ON_ERROR_STOP=1 -c \"CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL); INSERT INTO items (name) VALUES ('conductor');\"\nredis-cli -h redis SET greeting hello\n", true),
        ("scripts/run-integration-tests.sh", "#!/bin/sh\nset -e\nexport PGPASSWORD=postgres\ntest \"$(psql -h postgres -U postgres -tAc 'SELECT name FROM items')\" = conductor\ntest \"$(redis-cli -h redis GET greeting)\" = hello\necho 'integration tests passed'\n", true),
    ]);
    let security = projects.join("security");
    write_tree(
        &security,
        &[("app.py", "def greet(name):\n    return 'hello ' + name\n", false)],
    );

    // Put each project where its example expects it.
    let seed = |env: &str, source: &std::path::Path, commands: Value| json!({"task_type": "isolated_execution", "environment": env, "source": source, "commands": commands});
    let (s, seeded) = api
        .post(
            "/tasks?wait=true",
            &json!([
                seed(
                    "python-dev",
                    &python,
                    json!(["test -f /workspace/src/tests/test_calc.py"])
                ),
                seed("nodejs-dev", &node, json!(["test -f /workspace/src/package.json"])),
                seed(
                    "fullstack",
                    &fullstack,
                    json!(["cp -r /workspace/src/scripts /workspace/"])
                ),
                seed("security-tools", &security, json!(["true"])),
            ]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{seeded}");
    for t in seeded["tasks"].as_array().unwrap() {
        assert_eq!(t["status"], "succeeded", "{t}");
    }

    let mut ids = Vec::new();
    for example in [SPEC_PYTHON, SPEC_NODE, SPEC_FULLSTACK, SPEC_SECURITY] {
        let t = run_curl(example, api.port);
        assert_eq!(t["status"], "queued", "{t}");
        assert!(t["task_id"].as_str().unwrap().starts_with("task-"), "{t}");
        ids.push(t["task_id"].as_str().unwrap().to_string());
    }
    let mut results = Vec::new();
    for id in &ids {
        results.push(finished(&api, id).await);
    }
    let main_output = |t: &Value| -> String {
        t["commands"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["phase"] == "main")
            .map(|c| format!("{}{}", c["stdout"].as_str().unwrap(), c["stderr"].as_str().unwrap()))
            .collect()
    };
    let [py, nd, fs, sec] = &results[..] else {
        unreachable!()
    };
    assert_eq!(py["status"], "succeeded", "{py}");
    assert!(main_output(py).contains("1 passed"), "{py}");
    assert_eq!(nd["status"], "succeeded", "{nd}");
    assert!(main_output(nd).contains("1 test passed"), "{nd}");
    assert_eq!(fs["status"], "succeeded", "{fs}");
    assert!(main_output(fs).contains("integration tests passed"), "{fs}");
    assert_eq!(fs["services"], json!(["postgres:14", "redis:7"]));
    // bandit scans the project; `safety check` and `npm audit` need their online
    // databases, which this offline machine cannot reach, so the task may fail there.
    let bandit = sec["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["command"] == "bandit -r src/")
        .expect("bandit ran");
    assert_eq!(bandit["exit_code"], 0, "{sec}");
    assert!(
        ["succeeded", "failed"].contains(&sec["status"].as_str().unwrap()),
        "{sec}"
    );

    // The CI example: a file holding an array of tasks.
    let batch = run_curl(SPEC_CI, api.port);
    let tasks = batch["tasks"].as_array().expect("{\"tasks\": [...]}");
    assert_eq!(tasks.len(), 3, "{batch}");
    for t in tasks {
        assert_eq!(t["status"], "queued");
        let done = finished(&api, t["task_id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }

    // The Python example with ?wait=true answers with the finished task.
    let t = run_curl(&SPEC_PYTHON.replace("/tasks ", "/tasks?wait=true "), api.port);
    assert_eq!(t["status"], "succeeded", "{t}");
    assert!(t["finished_at"].is_string());

    // The examples above are the spec's own text.
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/spec/isolated-workspaces.md");
    if let Ok(text) = std::fs::read_to_string(spec) {
        for example in [SPEC_PYTHON, SPEC_NODE, SPEC_FULLSTACK, SPEC_SECURITY] {
            assert!(text.contains(example), "the spec no longer contains:\n{example}");
        }
    }
}

/// The real binary: `conductor serve --port 0` prints its address, serves, and on SIGTERM
/// cancels a running task within the grace period, removes its workspace and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_binary_serves_and_stops_gracefully() {
    let (dir, config) = common::config_dir("conductor-serve-", "task_execution:\n  shutdown_grace_period: 2\n");
    let served = common::serve(&config);
    let base = served.base.clone();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    let http = reqwest::Client::new();
    let (s, health) = send(http.get(format!("{base}/health"))).await;
    assert_eq!((s, health["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, t) = send(http.post(format!("{base}/tasks")).json(&json!({
        "task_type": "isolated_execution", "environment": "minimal", "commands": ["echo started", "sleep 300"]
    })))
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{t}");
    let id = t["task_id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let logs = http
            .get(format!("{base}/tasks/{id}/logs"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if logs.contains("started\n") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the task never started: {logs}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let stopped_at = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || served.stop()).await.unwrap();
    assert!(status.success(), "{status}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(30),
        "took {:?}",
        stopped_at.elapsed()
    );

    // The task ended cancelled, and nothing of this instance is left in Podman.
    let store = conductor_store::Store::open(&dir.path().join("conductor.db")).unwrap();
    let task = store.get_task(&id).unwrap().unwrap();
    assert_eq!(task.state.as_str(), "cancelled", "{task:?}");
    assert_eq!(
        common::leftover_containers(&dir.path().join("conductor.db")),
        "",
        "containers left behind"
    );
}

/// Sends a request and returns the status, the JSON body and the body's text (to check
/// that a secret's value appears nowhere in it).
async fn send_text(req: reqwest::RequestBuilder) -> (StatusCode, Value, String) {
    let r = req.send().await.expect("send request");
    let status = r.status();
    let text = r.text().await.expect("read body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null), text)
}

/// A value of `prefix` and 24 random hex digits: nothing else could contain it by chance.
fn secret_value(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

/// `POST/GET/DELETE /secrets` over HTTP, `secrets` on workspaces and tasks: the value is
/// write-only (in no response body, errors included, nor inside the workspace), a
/// rotation is a 200 with the next version, bad input names its field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_over_http_are_write_only() {
    let api = Api::start("").await;
    let (v1, v2) = (secret_value("ghp_first_"), secret_value("ghp_second_"));
    let mut bodies: Vec<String> = Vec::new();
    let rules = json!([
        {"host": "github.com", "inject": {"type": "basic", "username": "x-access-token"}},
        {"host": "api.github.com", "inject": {"type": "header", "name": "Authorization", "value": "Bearer {value}"}},
    ]);

    let (s, created, text) = send_text(
        api.http
            .post(api.url("/secrets"))
            .json(&json!({"name": "github", "value": v1, "rules": rules})),
    )
    .await;
    bodies.push(text);
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["name"], "github");
    assert_eq!(created["version"], 1);
    assert_eq!(created["env_var"], "GITHUB_TOKEN");
    assert_eq!(created["rules"], rules);
    assert!(
        created["created_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{created}"
    );
    assert_eq!(created["created_at"], created["updated_at"]);
    assert!(created.get("value").is_none(), "{created}");

    // The same name again rotates it: 200, the next version, the new rules.
    let basic_only = json!([{"host": "github.com", "inject": {"type": "basic", "username": "git"}}]);
    let (s, rotated, text) = send_text(
        api.http
            .post(api.url("/secrets"))
            .json(&json!({"name": "github", "value": format!("{v2}\n"), "rules": basic_only})),
    )
    .await;
    bodies.push(text);
    assert_eq!(s, StatusCode::OK, "{rotated}");
    assert_eq!((rotated["version"].as_u64(), &rotated["rules"]), (Some(2), &basic_only));
    assert_eq!(rotated["created_at"], created["created_at"]);
    // Back to both rules for the workspace below.
    let (s, _, text) = send_text(
        api.http
            .post(api.url("/secrets"))
            .json(&json!({"name": "github", "value": v2, "rules": rules})),
    )
    .await;
    bodies.push(text);
    assert_eq!(s, StatusCode::OK);

    let (s, list, text) = send_text(api.http.get(api.url("/secrets"))).await;
    bodies.push(text);
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = list["secrets"]
        .as_array()
        .expect("secrets")
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["github"], "{list}");
    assert_eq!(list["secrets"][0]["version"], 3);
    let (s, one, text) = send_text(api.http.get(api.url("/secrets/github"))).await;
    bodies.push(text);
    assert_eq!((s, one["version"].as_u64()), (StatusCode::OK, Some(3)), "{one}");
    let got = send(api.http.get(api.url("/secrets/nope"))).await;
    assert_error(&got, 404, "not_found", None);

    // Bad input: a 400 naming the field, the value never quoted, nothing stored.
    let rule =
        json!({"host": "api.example.com", "inject": {"type": "header", "name": "X-Api-Key", "value": "{value}"}});
    let v3 = secret_value("sk_bad_");
    let bad: Vec<(Value, &str)> = vec![
        (
            json!({"name": "bad", "value": v3, "rules": [rule, {"host": "a..b.example", "inject": {"type": "basic", "username": "git"}}]}),
            "rules[1].host",
        ),
        (
            json!({"name": "bad", "value": v3, "rules": [{"host": "10.0.0.1", "inject": {"type": "basic", "username": "git"}}]}),
            "rules[0].host",
        ),
        (json!({"name": "bad", "value": v3, "rules": []}), "rules"),
        (json!({"name": "bad", "value": v3}), "rules"),
        (
            json!({"name": "bad", "value": format!("{v3}\nmore"), "rules": [rule]}),
            "value",
        ),
        (
            json!({"name": "bad", "value": format!(" {v3}"), "rules": [rule]}),
            "value",
        ),
        (json!({"name": "bad", "value": "", "rules": [rule]}), "value"),
        (
            json!({"name": "bad", "value": 123456789012_u64, "rules": [rule]}),
            "value",
        ),
        (json!({"name": "bad", "value": [v3], "rules": [rule]}), "value"),
        (json!({"name": "bad", "value": {"v": v3}, "rules": [rule]}), "value"),
        (json!({"name": "bad", "rules": [rule]}), "value"),
        (json!({"name": "Bad Name", "value": v3, "rules": [rule]}), "name"),
        (json!({"value": v3, "rules": [rule]}), "name"),
        (
            json!({"name": "bad", "value": v3, "rules": [rule], "show": true}),
            "show",
        ),
        (
            json!({"name": "bad", "value": v3, "rules": [{"host": "api.example.com", "inject": {"type": "header", "name": "Host", "value": "{value}"}}]}),
            "rules[0].inject.name",
        ),
        (
            json!({"name": "bad", "value": v3, "rules": [{"host": "api.example.com", "inject": {"type": "header", "name": "X", "value": "Bearer"}}]}),
            "rules[0].inject.value",
        ),
        (
            json!({"name": "bad", "value": v3, "rules": [{"host": "api.example.com", "inject": {"type": "basic", "username": "a:b"}}]}),
            "rules[0].inject.username",
        ),
        (
            json!({"name": "bad", "value": v3, "rules": [{"host": "api.example.com", "inject": {"type": "cookie"}}]}),
            "rules[0].inject.type",
        ),
    ];
    for (body, field) in bad {
        let (s, e, text) = send_text(api.http.post(api.url("/secrets")).json(&body)).await;
        assert_error(&(s, e.clone()), 400, "invalid_request", Some(field));
        assert!(!text.contains(&v3[3..]), "{field}: the error quotes the value: {text}");
        assert!(!text.contains("123456789012"), "{field}: {text}");
        bodies.push(text);
    }
    let (s, text) = {
        let r = api
            .http
            .post(api.url("/secrets"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"name": "bad", "value": "{v3}"#))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("malformed_json") && !text.contains(&v3[3..]), "{text}");
    bodies.push(text);
    assert!(api.c().get_secret("bad").is_err(), "nothing was stored");

    // A workspace names the secrets it may use: unknown ones are refused by index.
    let got = send(api.http.post(api.url("/workspaces")).json(&json!({
        "agent_id": "sec1", "environment": "minimal", "secrets": ["github", "nope"]
    })))
    .await;
    assert_error(&got, 400, "invalid_request", Some("secrets[1]"));
    let got = send(api.http.post(api.url("/workspaces")).json(&json!({
        "agent_id": "sec1", "environment": "minimal", "secrets": "github"
    })))
    .await;
    assert_error(&got, 400, "invalid_request", Some("secrets"));
    let (s, w, text) = send_text(api.http.post(api.url("/workspaces")).json(&json!({
        "agent_id": "sec1", "environment": "minimal", "secrets": ["github"]
    })))
    .await;
    bodies.push(text);
    assert_eq!(s, StatusCode::CREATED, "{w}");
    let id = w["workspace_id"].as_str().unwrap().to_string();
    assert_eq!(w["secrets"], json!(["github"]), "{w}");
    assert_eq!(w["network_policy"]["mode"], "proxy", "{w}");
    let allow = w["network_policy"]["allow"].as_array().unwrap();
    for host in ["github.com:443", "api.github.com:443"] {
        assert!(allow.contains(&json!(host)), "{host} allowed: {w}");
    }
    let (s, got, text) = send_text(api.http.get(api.url(&format!("/workspaces/{id}")))).await;
    bodies.push(text);
    assert_eq!((s, &got["secrets"]), (StatusCode::OK, &json!(["github"])), "{got}");
    let (_, _, text) = send_text(api.http.get(api.url("/workspaces"))).await;
    bodies.push(text);
    // Inside: a placeholder, never the value.
    let (s, out, text) = send_text(
        api.http
            .post(api.url(&format!("/workspaces/{id}/exec")))
            .json(&json!({"command": "printenv GITHUB_TOKEN; env"})),
    )
    .await;
    bodies.push(text);
    assert_eq!((s, out["exit_code"].as_i64()), (StatusCode::OK, Some(0)), "{out}");
    let stdout = out["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("conductor-secret-github-"), "{stdout}");
    let (s, gone, text) = send_text(
        api.http
            .delete(api.url(&format!("/workspaces/{id}?keep_volumes=false"))),
    )
    .await;
    bodies.push(text);
    assert_eq!(s, StatusCode::OK, "{gone}");

    // A task names them too (a sandbox task's workspace is made with them).
    let got = send(api.http.post(api.url("/tasks")).json(&json!({
        "task_type": "isolated_execution", "environment": "minimal", "commands": ["true"], "secrets": ["nope"]
    })))
    .await;
    assert_error(&got, 400, "invalid_request", Some("secrets[0]"));
    let (s, t, text) = send_text(api.http.post(api.url("/tasks?wait=true")).json(&json!({
        "task_type": "isolated_execution", "environment": "minimal", "agent_id": "sec2",
        "commands": ["printenv GITHUB_TOKEN"], "secrets": ["github"]
    })))
    .await;
    bodies.push(text);
    assert_eq!((s, t["status"].as_str()), (StatusCode::OK, Some("succeeded")), "{t}");
    let stdout = t["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["phase"] == "main")
        .map(|c| c["stdout"].as_str().unwrap().to_string())
        .unwrap();
    assert!(stdout.starts_with("conductor-secret-github-"), "{stdout}");
    let task_id = t["task_id"].as_str().unwrap().to_string();
    let (_, _, text) = send_text(api.http.get(api.url(&format!("/tasks/{task_id}")))).await;
    bodies.push(text);
    let (_, _, text) = send_text(api.http.get(api.url(&format!("/tasks/{task_id}/logs")))).await;
    bodies.push(text);

    // Delete: 204, then 404; the list is empty.
    let (s, _, text) = send_text(api.http.delete(api.url("/secrets/github"))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(text.is_empty(), "{text}");
    let got = send(api.http.delete(api.url("/secrets/github"))).await;
    assert_error(&got, 404, "not_found", None);
    let (_, list, text) = send_text(api.http.get(api.url("/secrets"))).await;
    bodies.push(text);
    assert_eq!(list, json!({"secrets": []}));

    assert!(bodies.len() > 30, "{}", bodies.len());
    for body in &bodies {
        for v in [&v1, &v2] {
            assert!(!body.contains(v.as_str()), "a response holds a value: {body}");
        }
    }
}

/// `conductor secret set|ls|rm` next to a running `conductor serve`: the value comes from
/// stdin, a file or a variable (never an argument) and is printed nowhere; the service
/// serves what the CLI registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_registers_secrets_the_service_serves() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let (dir, config) = common::config_dir("conductor-secret-cli-", "");
    let served = common::serve(&config);
    let base = served.base.clone();
    let http = reqwest::Client::new();
    let cli = |args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_conductor"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .envs(env.iter().copied())
            .env_remove("CONDUCTOR_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run conductor");
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (v1, v2, v3) = (
        secret_value("tok_stdin_"),
        secret_value("tok_file_"),
        secret_value("tok_env_"),
    );

    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(
            &[
                "secret",
                "set",
                "corp",
                "--basic",
                "git.corp.example=git",
                "--rule",
                "api.corp.example:8443=X-Api-Key: {value}",
            ],
            Some(&format!("{v1}\n")),
            &[],
        )
    });
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("registered secret corp (version 1)") && out.contains("CORP_TOKEN"),
        "{out}"
    );
    let (s, got) = send(http.get(format!("{base}/secrets/corp"))).await;
    assert_eq!((s, got["version"].as_u64()), (StatusCode::OK, Some(1)), "{got}");
    assert_eq!(
        got["rules"],
        json!([
            {"host": "api.corp.example:8443", "inject": {"type": "header", "name": "X-Api-Key", "value": "{value}"}},
            {"host": "git.corp.example", "inject": {"type": "basic", "username": "git"}},
        ])
    );

    // Rotation from a file, then from a variable.
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{v2}\n")).unwrap();
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(
            &[
                "secret",
                "set",
                "corp",
                "--basic",
                "git.corp.example=git",
                "--from-file",
                file.to_str().unwrap(),
            ],
            None,
            &[],
        )
    });
    assert!(ok && out.contains("rotated secret corp (version 2)"), "{out}{err}");
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(
            &[
                "secret",
                "set",
                "corp",
                "--basic",
                "git.corp.example=git",
                "--from-env",
                "CORP_VALUE",
                "--json",
            ],
            None,
            &[("CORP_VALUE", &v3)],
        )
    });
    assert!(ok, "{out}{err}");
    let shown: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (shown["name"].as_str(), shown["version"].as_u64()),
        (Some("corp"), Some(3)),
        "{out}"
    );
    let (s, list) = send(http.get(format!("{base}/secrets"))).await;
    assert_eq!(
        (s, list["secrets"][0]["version"].as_u64()),
        (StatusCode::OK, Some(3)),
        "{list}"
    );

    // Bad options and values are refused by name, quoting no value.
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(
            &["secret", "set", "x", "--rule", "a..b.example=X: {value}"],
            Some(&v1),
            &[],
        )
    });
    assert!(
        !ok && err.contains("--rule \"a..b.example=X: {value}\" (host)"),
        "{out}{err}"
    );
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(
            &["secret", "set", "x", "--basic", "a.example=git"],
            Some(&format!("{v1}\nsecond line")),
            &[],
        )
    });
    assert!(!ok && err.starts_with("error: value: "), "{out}{err}");
    assert!(!err.contains(&v1) && !out.contains(&v1), "{out}{err}");
    let (ok, _, err) = tokio::task::block_in_place(|| {
        cli(
            &["secret", "set", "x", "--basic", "a.example=git", v1.as_str()],
            None,
            &[],
        )
    });
    assert!(
        !ok && err.contains("unexpected argument"),
        "a value is never an argument: {err}"
    );

    let (ok, out, err) = tokio::task::block_in_place(|| cli(&["secret", "ls"], None, &[]));
    assert!(ok && out.contains("corp") && out.contains("CORP_TOKEN"), "{out}{err}");
    let (ok, json_out, err) = tokio::task::block_in_place(|| cli(&["secret", "ls", "--json"], None, &[]));
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&json_out).expect("json");
    assert_eq!(listed[0]["name"], "corp", "{json_out}");
    for text in [&out, &json_out] {
        for v in [&v1, &v2, &v3] {
            assert!(!text.contains(v.as_str()), "{text}");
        }
    }
    let (ok, out, err) = tokio::task::block_in_place(|| cli(&["secret", "rm", "corp"], None, &[]));
    assert!(ok && out.contains("deleted secret corp"), "{out}{err}");
    let (ok, _, err) = tokio::task::block_in_place(|| cli(&["secret", "rm", "corp"], None, &[]));
    assert!(!ok && err.contains("secret 'corp' not found"), "{err}");
    let got = send(http.get(format!("{base}/secrets/corp"))).await;
    assert_error(&got, 404, "not_found", None);
    drop(served);
}
