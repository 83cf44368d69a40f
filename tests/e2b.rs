//! The E2B-compatible API against a real `conductor serve` and real Podman, at the wire
//! level (the official SDKs drive it in tests/e2b/python and tests/e2b/js): the control
//! plane's answers and errors, envd's Connect calls in both codecs (binary protobuf, which
//! the SDKs do not use, included), the sandbox guard (unknown sandbox, other ports, other
//! users, tokens), and the lease reaper (kill and pause at expiry).

mod common;

use std::time::{Duration, Instant};

use conductor_e2b::pb::{filesystem as fs, process as proc_pb};
use prost::Message;
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Server {
    _dir: tempfile::TempDir,
    served: common::Served,
    http: reqwest::Client,
}

impl Server {
    fn start(extra: &str) -> Server {
        let (dir, config) = common::config_dir("conductor-e2b-", extra);
        let served = common::serve(&config);
        Server {
            _dir: dir,
            served,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.served.base)
    }

    fn key(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("config").join("api-key"))
            .map(|k| k.trim().to_string())
            .unwrap_or_default()
    }

    async fn create(&self, body: Value, key: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.post(self.url("/v2/sandboxes")).json(&body);
        if let Some(k) = key {
            req = req.header("X-API-Key", k);
        }
        json_of(req.send().await.unwrap()).await
    }

    /// A request to envd of sandbox `id`.
    fn envd(&self, id: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .header("E2b-Sandbox-Id", id)
            .header("E2b-Sandbox-Port", "49983")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Whatever a failed test left: removed through conductor's own API.
        let base = self.served.base.clone();
        let key = self.key();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let http = reqwest::Client::new();
                let auth = format!("Bearer {key}");
                if let Ok(r) = http
                    .get(format!("{base}/workspaces"))
                    .header("Authorization", &auth)
                    .send()
                    .await
                {
                    if let Ok(v) = r.json::<Value>().await {
                        for w in v["workspaces"].as_array().cloned().unwrap_or_default() {
                            let id = w["id"].as_str().unwrap_or_default().to_string();
                            let _ = http
                                .delete(format!("{base}/workspaces/{id}?keep_volumes=false"))
                                .header("Authorization", &auth)
                                .send()
                                .await;
                        }
                    }
                }
            })
        })
        .join();
        common::unmount_under(self._dir.path());
    }
}

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn envelope(data: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The envelopes of a streamed response: messages, then the end-of-stream JSON.
fn envelopes(body: &[u8]) -> (Vec<Vec<u8>>, Value) {
    let (mut msgs, mut i) = (Vec::new(), 0);
    while i + 5 <= body.len() {
        let flags = body[i];
        let len = u32::from_be_bytes(body[i + 1..i + 5].try_into().unwrap()) as usize;
        let data = body[i + 5..i + 5 + len].to_vec();
        i += 5 + len;
        if flags & 2 != 0 {
            return (msgs, serde_json::from_slice(&data).unwrap());
        }
        msgs.push(data);
    }
    panic!("the stream has no end message");
}

/// Runs `line` through `process.Process/Start` in binary protobuf; stdout and the end.
async fn start_proto(s: &Server, id: &str, line: &str) -> (String, proc_pb::process_event::EndEvent, Value) {
    let req = proc_pb::StartRequest {
        process: Some(proc_pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), line.into()],
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    };
    let r = s
        .envd(id, "/process.Process/Start")
        .header("Content-Type", "application/connect+proto")
        .body(envelope(&req.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/connect+proto");
    let (msgs, end) = envelopes(&r.bytes().await.unwrap());
    let mut out = String::new();
    let mut last = None;
    for m in msgs {
        let ev = proc_pb::StartResponse::decode(m.as_slice()).unwrap().event.unwrap();
        match ev.event.unwrap() {
            proc_pb::process_event::Event::Data(d) => {
                if let Some(proc_pb::process_event::data_event::Output::Stdout(b)) = d.output {
                    out.push_str(&String::from_utf8_lossy(&b));
                }
            }
            proc_pb::process_event::Event::End(e) => last = Some(e),
            _ => {}
        }
    }
    (out, last.expect("an end event"), end)
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_are_workspaces_driven_over_both_codecs() {
    let s = Server::start("");
    let (st, sb) = s
        .create(
            json!({"templateID": "minimal", "metadata": {"owner": "it"}, "envVars": {"GREETING": "hi"}}),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{sb}");
    let id = sb["sandboxID"].as_str().unwrap().to_string();
    assert_eq!(sb["envdVersion"], conductor_e2b::ENVD_VERSION);
    assert!(sb.get("envdAccessToken").is_none(), "no token without auth: {sb}");

    // A conductor workspace of agent e2b, in conductor's own API.
    let (_, ws) = json_of(s.http.get(s.url(&format!("/workspaces/{id}"))).send().await.unwrap()).await;
    assert_eq!(
        (ws["agent_id"].as_str(), ws["environment"].as_str()),
        (Some("e2b"), Some("minimal"))
    );

    // Binary protobuf: the command's output and its end.
    let (out, end, trailer) = start_proto(&s, &id, "echo $GREETING; pwd; exit 3").await;
    assert_eq!(out, "hi\n/workspace\n");
    assert_eq!(
        (end.exit_code, end.exited, end.status.as_str()),
        (3, true, "exit status 3")
    );
    assert_eq!(trailer, json!({}));

    // JSON, unary: write a file over REST, list it over Connect in both codecs.
    let r = s
        .envd(&id, "/files?path=notes/a.txt")
        .header("Content-Type", "application/octet-stream")
        .body("abc")
        .send()
        .await
        .unwrap();
    let (st, written) = json_of(r).await;
    assert_eq!(st, StatusCode::OK, "{written}");
    assert_eq!(
        written,
        json!([{"name": "a.txt", "type": "file", "path": "/workspace/notes/a.txt"}])
    );
    let r = s
        .envd(&id, "/filesystem.Filesystem/ListDir")
        .header("Content-Type", "application/json")
        .body(r#"{"path":"notes","depth":1}"#)
        .send()
        .await
        .unwrap();
    let (st, listed) = json_of(r).await;
    assert_eq!(st, StatusCode::OK, "{listed}");
    assert_eq!(listed["entries"][0]["name"], "a.txt");
    assert_eq!(listed["entries"][0]["type"], "FILE_TYPE_FILE");
    assert_eq!(listed["entries"][0]["size"], "3", "int64 is a string in proto3 JSON");
    let req = fs::StatRequest {
        path: "notes/a.txt".into(),
    };
    let r = s
        .envd(&id, "/filesystem.Filesystem/Stat")
        .header("Content-Type", "application/proto")
        .body(req.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let entry = fs::StatResponse::decode(r.bytes().await.unwrap())
        .unwrap()
        .entry
        .unwrap();
    assert_eq!(
        (entry.path.as_str(), entry.size, entry.permissions.as_str()),
        ("/workspace/notes/a.txt", 3, "-rw-r--r--")
    );
    let r = s
        .http
        .get(s.url("/files?path=notes/a.txt"))
        .header("E2b-Sandbox-Id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "abc");

    // Listed with its metadata, filtered by it.
    let (_, all) = json_of(
        s.http
            .get(s.url("/v2/sandboxes?metadata=owner%3Dit"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    assert_eq!(all[0]["metadata"], json!({"owner": "it"}));
    let (_, none) = json_of(
        s.http
            .get(s.url("/v2/sandboxes?metadata=owner%3Dother"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(none, json!([]));

    // Killed: gone from conductor, and envd answers as E2B's proxy does.
    let r = s.http.delete(s.url(&format!("/sandboxes/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (st, gone) = json_of(s.http.get(s.url(&format!("/workspaces/{id}"))).send().await.unwrap()).await;
    assert_eq!((st, gone["state"].as_str()), (StatusCode::OK, Some("removed")));
    let r = s
        .envd(&id, "/filesystem.Filesystem/Stat")
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (st, body) = json_of(r).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert!(body["message"].as_str().unwrap().contains("was not found"), "{body}");
    let (st, _) = json_of(s.http.get(s.url(&format!("/sandboxes/{id}"))).send().await.unwrap()).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors_and_leave_nothing() {
    let s = Server::start("");
    for (body, status, needle) in [
        (
            json!({"templateID": "no-such-env"}),
            StatusCode::NOT_FOUND,
            "template 'no-such-env' was not found",
        ),
        (
            json!({"templateID": "minimal", "timeout": 999_999}),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            json!({"templateID": "minimal", "network": {"allowOut": ["1.2.3.4"]}}),
            StatusCode::BAD_REQUEST,
            "network",
        ),
        (
            json!({"templateID": "minimal", "envVars": {"A B": "x"}}),
            StatusCode::BAD_REQUEST,
            "envVars",
        ),
        (json!({"templateID": 7}), StatusCode::BAD_REQUEST, "not valid"),
    ] {
        let (st, err) = s.create(body.clone(), None).await;
        assert_eq!(st, status, "{body}: {err}");
        assert_eq!(err["code"], status.as_u16(), "{err}");
        assert!(err["message"].as_str().unwrap().contains(needle), "{body}: {err}");
    }
    let (_, all) = json_of(s.http.get(s.url("/workspaces")).send().await.unwrap()).await;
    assert_eq!(all["workspaces"], json!([]), "a refused create leaves no workspace");
    let (st, err) = json_of(s.http.post(s.url("/sandboxes/x/snapshots")).send().await.unwrap()).await;
    assert_eq!(st, StatusCode::NOT_IMPLEMENTED, "{err}");

    let (_, sb) = s.create(json!({"templateID": "minimal"}), None).await;
    let id = sb["sandboxID"].as_str().unwrap();
    let call =
        |path: &str, ct: &str, body: &'static str| s.envd(id, path).header("Content-Type", ct.to_string()).body(body);
    let cases = [
        (
            call(
                "/filesystem.Filesystem/Stat",
                "application/json",
                r#"{"path":"/etc/passwd"}"#,
            ),
            400,
            "invalid_argument",
        ),
        (
            call("/filesystem.Filesystem/Stat", "application/json", r#"{"path":"nope"}"#),
            404,
            "not_found",
        ),
        (
            call("/filesystem.Filesystem/Stat", "application/json", "{not json"),
            400,
            "invalid_argument",
        ),
        (
            call("/filesystem.Filesystem/Chown", "application/json", "{}"),
            501,
            "unimplemented",
        ),
        (
            call("/process.Process/Update", "application/json", "{}"),
            501,
            "unimplemented",
        ),
        (
            call(
                "/process.Process/SendSignal",
                "application/json",
                r#"{"process":{"pid":999999},"signal":"SIGNAL_SIGKILL"}"#,
            ),
            404,
            "not_found",
        ),
        (
            call("/filesystem.Filesystem/Stat", "text/plain", "x"),
            501,
            "unimplemented",
        ),
        (
            call("/filesystem.Filesystem/Stat", "application/json", r#"{"path":"."}"#)
                .header("Authorization", "Basic cm9vdDo="),
            400,
            "invalid_argument",
        ),
    ];
    for (req, status, code) in cases {
        let (st, err) = json_of(req.send().await.unwrap()).await;
        assert_eq!((st.as_u16(), err["code"].as_str()), (status, Some(code)), "{err}");
        assert!(!err["message"].as_str().unwrap_or("").is_empty());
    }
    // A PTY start ends its stream with the error.
    let r = s
        .envd(id, "/process.Process/Start")
        .header("Content-Type", "application/connect+json")
        .body(envelope(
            br#"{"process":{"cmd":"ls"},"pty":{"size":{"cols":80,"rows":24}}}"#,
        ))
        .send()
        .await
        .unwrap();
    let (msgs, end) = envelopes(&r.bytes().await.unwrap());
    assert!(msgs.is_empty());
    assert_eq!(end["error"]["code"], "unimplemented", "{end}");
    // Another port of the sandbox is not forwarded.
    let r = s
        .http
        .get(s.url("/"))
        .header("E2b-Sandbox-Id", id)
        .header("E2b-Sandbox-Port", "8080")
        .send()
        .await
        .unwrap();
    let (st, err) = json_of(r).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert!(
        err["message"].as_str().unwrap().contains("port 8080 is not open"),
        "{err}"
    );
    // An upload outside /workspace.
    let r = s.envd(id, "/files?path=/etc/x").body("x").send().await.unwrap();
    let (st, err) = json_of(r).await;
    assert_eq!(
        (st, err["code"].as_u64()),
        (StatusCode::BAD_REQUEST, Some(400)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_auth_on_each_plane_wants_its_key() {
    let s = Server::start("security:\n  api_key_required: true\n");
    let key = s.key();
    assert!(key.len() >= 16);
    let (st, err) = s.create(json!({"templateID": "minimal"}), Some("wrong")).await;
    assert_eq!(
        (st, err["code"].as_u64()),
        (StatusCode::UNAUTHORIZED, Some(401)),
        "{err}"
    );
    let (st, err) = s.create(json!({"templateID": "minimal"}), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{err}");
    let (st, sb) = s.create(json!({"templateID": "minimal"}), Some(&key)).await;
    assert_eq!(st, StatusCode::CREATED, "{sb}");
    let id = sb["sandboxID"].as_str().unwrap().to_string();
    let token = sb["envdAccessToken"].as_str().expect("an envd token").to_string();
    assert!(!token.contains(&key) && token != key);

    let stat = |t: Option<&str>| {
        let mut r = s
            .envd(&id, "/filesystem.Filesystem/Stat")
            .header("Content-Type", "application/json")
            .body(r#"{"path":"."}"#);
        if let Some(t) = t {
            r = r.header("X-Access-Token", t.to_string());
        }
        r
    };
    let (st, err) = json_of(stat(None).send().await.unwrap()).await;
    assert_eq!(
        (st, err["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthenticated")),
        "{err}"
    );
    let (st, err) = json_of(stat(Some("0123456789abcdef")).send().await.unwrap()).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{err}");
    let (st, ok) = json_of(stat(Some(&token)).send().await.unwrap()).await;
    assert_eq!(st, StatusCode::OK, "{ok}");
    assert_eq!(ok["entry"]["path"], "/workspace");
    // Conductor's own routes still want the bearer token, not the E2B key header.
    let r = s
        .http
        .get(s.url("/workspaces"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s
        .http
        .delete(s.url(&format!("/sandboxes/{id}")))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

/// Polls conductor's API until the workspace is in `state` (up to 30 s).
async fn wait_state(s: &Server, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, w) = json_of(s.http.get(s.url(&format!("/workspaces/{id}"))).send().await.unwrap()).await;
        if w["state"] == state {
            return;
        }
        assert!(Instant::now() < deadline, "workspace {id} never became {state}: {w}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_sandboxes_are_removed_or_paused() {
    let s = Server::start("");
    let (_, a) = s.create(json!({"templateID": "minimal", "timeout": 1}), None).await;
    let (_, b) = s
        .create(json!({"templateID": "minimal", "timeout": 1, "autoPause": true}), None)
        .await;
    let (_, c) = s.create(json!({"templateID": "minimal", "timeout": 1}), None).await;
    let (a, b, c) = (
        a["sandboxID"].as_str().unwrap().to_string(),
        b["sandboxID"].as_str().unwrap().to_string(),
        c["sandboxID"].as_str().unwrap().to_string(),
    );
    // c's timeout is moved out before it expires.
    let r = s
        .http
        .post(s.url(&format!("/sandboxes/{c}/timeout")))
        .json(&json!({"timeout": 120}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    wait_state(&s, &a, "removed").await;
    wait_state(&s, &b, "paused").await;
    let (_, info) = json_of(s.http.get(s.url(&format!("/sandboxes/{b}"))).send().await.unwrap()).await;
    assert_eq!(
        (info["state"].as_str(), info["lifecycle"]["onTimeout"].as_str()),
        (Some("paused"), Some("pause"))
    );
    // Connect resumes it (201) with a new lease; its files are still there.
    let r = s
        .http
        .post(s.url(&format!("/v2/sandboxes/{b}/connect")))
        .json(&json!({"timeout": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    wait_state(&s, &b, "running").await;
    let (out, end, _) = start_proto(&s, &b, "echo back").await;
    assert_eq!((out.as_str(), end.exit_code), ("back\n", 0));
    let (_, w) = json_of(s.http.get(s.url(&format!("/workspaces/{c}"))).send().await.unwrap()).await;
    assert_eq!(w["state"], "running", "the extended sandbox lives on");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_forks_into_sandboxes_with_its_files() {
    let s = Server::start("");
    let (_, sb) = s
        .create(json!({"templateID": "minimal", "metadata": {"role": "source"}}), None)
        .await;
    let id = sb["sandboxID"].as_str().unwrap().to_string();
    let r = s
        .envd(&id, "/files?path=state.txt")
        .header("Content-Type", "application/octet-stream")
        .body("before fork")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .http
        .post(s.url(&format!("/sandboxes/{id}/fork")))
        .json(&json!({"count": 2, "timeout": 60}))
        .send()
        .await
        .unwrap();
    let (st, forks) = json_of(r).await;
    assert_eq!(st, StatusCode::CREATED, "{forks}");
    let forks: Vec<String> = forks
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["sandbox"]["sandboxID"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(forks.len(), 2);
    for f in &forks {
        assert_ne!(f, &id);
        let (out, end, _) = start_proto(&s, f, "cat state.txt").await;
        assert_eq!((out.as_str(), end.exit_code), ("before fork", 0));
        let (_, info) = json_of(s.http.get(s.url(&format!("/sandboxes/{f}"))).send().await.unwrap()).await;
        assert_eq!(info["metadata"], json!({"role": "source"}), "{info}");
    }
    let (_, bad) = json_of(
        s.http
            .post(s.url(&format!("/sandboxes/{id}/fork")))
            .json(&json!({"count": 0}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(bad["code"], 400, "{bad}");
}
