//! Faults injected into a real `conductor serve`, as a user would meet them: CLI commands
//! run beside the service, the service's Podman service killed or its socket removed, a
//! workspace's main process (the agent, PID 1) killed during an exec or a task, and a
//! workspace's `conmon` killed during a task. Each test runs its own instance and leaves no
//! container behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{cli, config_dir, leftover_containers, serve, unmount_under, Served};
use serde_json::{json, Value};

/// A `conductor serve` of its own, removed with everything it made when dropped.
struct Instance {
    dir: tempfile::TempDir,
    config: PathBuf,
    served: Option<Served>,
    http: reqwest::Client,
}

impl Instance {
    fn start(prefix: &str) -> Instance {
        let (dir, config) = config_dir(prefix, "");
        let served = serve(&config);
        Instance {
            dir,
            config,
            served: Some(served),
            http: reqwest::Client::new(),
        }
    }

    fn base(&self) -> String {
        self.served.as_ref().expect("serving").base.clone()
    }

    fn base_path(&self) -> &Path {
        self.dir.path()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        send(self.http.get(format!("{}{path}", self.base()))).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        send(self.http.post(format!("{}{path}", self.base())).json(&body)).await
    }

    async fn create(&self, agent: &str) -> Value {
        let (s, w) = self
            .post("/workspaces", json!({"agent_id": agent, "environment": "minimal"}))
            .await;
        assert_eq!(s, 201, "{w}");
        w
    }

    /// The health answer once the engine answers again (up to 30 s).
    async fn healthy(&self) -> Value {
        let start = Instant::now();
        loop {
            let (s, h) = self.get("/health").await;
            if s == 200 && h["engine"] == "ok" {
                return h;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "engine still unavailable: {s} {h}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs the CLI with this instance's configuration and expects success.
    fn cli_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = cli(&self.config, args, None);
        assert!(ok, "conductor {args:?} failed: {err}");
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn wait_task(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let (s, t) = self.get(&format!("/tasks/{id}")).await;
            assert_eq!(s, 200, "{t}");
            if !matches!(t["status"].as_str(), Some("queued" | "running")) {
                return t;
            }
            assert!(start.elapsed() < Duration::from_secs(90), "task still {}", t["status"]);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn leftovers(&self) -> String {
        leftover_containers(&self.base_path().join("conductor.db"))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(served) = self.served.take() {
            served.stop();
        }
        // Whatever a failing test left: remove it with the CLI (the service is stopped).
        if let (true, out, _) = cli(&self.config, &["ws", "ls", "--json"], None) {
            let list: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
            for w in list.as_array().into_iter().flatten() {
                if let Some(id) = w["id"].as_str() {
                    let _ = cli(&self.config, &["ws", "rm", id], None);
                }
            }
        }
        unmount_under(self.dir.path());
    }
}

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// `podman inspect -f FORMAT name`.
fn podman_inspect(name: &str, format: &str) -> String {
    let out = std::process::Command::new("podman")
        .args(["inspect", "-f", format, name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podman inspect {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn kill_9(pid: &str) {
    let status = std::process::Command::new("kill").args(["-9", pid]).status().unwrap();
    assert!(status.success(), "kill -9 {pid}");
}

/// Pids of the processes whose command line holds `needle`.
fn pids_of(needle: &str) -> Vec<String> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", needle])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The container of the (sandbox) workspace a running task uses, once it has one.
async fn task_container(inst: &Instance, task: &str) -> String {
    let start = Instant::now();
    loop {
        let (_, t) = inst.get(&format!("/tasks/{task}")).await;
        if let Some(ws) = t["workspace_id"].as_str() {
            let (_, w) = inst.get(&format!("/workspaces/{ws}")).await;
            // Running and its first command started (the log shows it).
            let logs = common::task_log(&inst.http, &inst.base(), task).await;
            if w["state"] == "running" && logs.contains("started") {
                return w["container_name"].as_str().unwrap().to_string();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "task {task} has no running workspace: {t}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every CLI verb that talks to the engine, run beside the service with its configuration,
/// leaves the service's engine working: before the fix, the first `ws ls` removed the
/// service's Podman socket and every later `POST /workspaces` got a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_beside_the_service_leave_its_engine_alone() {
    let inst = Instance::start("conductor-faults-cli-");
    let socket = inst.base_path().join("podman.sock");
    assert!(socket.exists());
    let served_ws = inst.create("svc").await;
    let id = served_ws["id"].as_str().unwrap();

    let created: Value =
        serde_json::from_str(&inst.cli_ok(&["ws", "create", "--agent", "cli", "--env", "minimal", "--json"]))
            .expect("ws create --json");
    let cli_id = created["id"].as_str().unwrap().to_string();
    let verbs: Vec<Vec<&str>> = vec![
        vec!["ws", "ls"],
        vec!["ws", "inspect", &cli_id],
        vec!["ws", "exec", &cli_id, "--", "echo", "hi"],
        vec![
            "ws",
            "exec",
            &cli_id,
            "--no-shell",
            "--",
            "sh",
            "-c",
            "echo one > /workspace/f",
        ],
        vec!["snapshot", "create", &cli_id, "s1"],
        vec!["snapshot", "ls", &cli_id],
        vec!["snapshot", "restore", &cli_id, "s1"],
        vec!["snapshot", "rm", &cli_id, "s1"],
        vec!["ws", "stop", &cli_id],
        vec!["ws", "start", &cli_id],
        vec!["run", "--env", "minimal", "--", "true"],
        vec!["env", "list"],
        vec!["doctor"],
        vec!["cleanup"],
        vec!["ws", "rm", &cli_id],
    ];
    for verb in &verbs {
        let (ok, _, err) = cli(&inst.config, verb, None);
        assert!(ok || verb[0] == "doctor", "conductor {verb:?} failed: {err}");
        let (s, h) = inst.get("/health").await;
        assert_eq!((s, &h["engine"]), (200, &json!("ok")), "after conductor {verb:?}: {h}");
        assert!(socket.exists(), "conductor {verb:?} removed the service's socket");
        let (s, e) = inst
            .post(&format!("/workspaces/{id}/exec"), json!({"command": "true"}))
            .await;
        assert_eq!(s, 200, "exec after conductor {verb:?}: {e}");
    }
    // `reconcile` would undo the service's half-done work: it refuses while the service runs.
    let (ok, _, err) = cli(&inst.config, &["reconcile"], None);
    assert!(!ok && err.contains("conductor serve is running"), "{err}");
    // A second service of the same configuration is refused too.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_conductor"))
        .args(["--config", inst.config.to_str().unwrap(), "serve", "--port", "0"])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    let again = inst.create("svc2").await;
    assert_eq!(again["state"], "running");
    // No guest left a private socket of its own behind.
    let strays: Vec<_> = std::fs::read_dir(inst.base_path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("podman-") && n.ends_with(".sock"))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
}

/// The service's own Podman service killed, then its socket removed: `/health` says the
/// engine is unavailable meanwhile, and the service reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_recovers_its_engine() {
    let inst = Instance::start("conductor-faults-engine-");
    let socket = inst.base_path().join("podman.sock");
    let w = inst.create("eng").await;
    let id = w["id"].as_str().unwrap();

    let service = pids_of(&format!("system service --time=0 unix://{}", socket.display()));
    assert_eq!(service.len(), 1, "{service:?}");
    kill_9(&service[0]);
    let (s, h) = inst.get("/health").await;
    assert!(
        s == 503 && h["status"] == "degraded" && h["engine"] == "unavailable" || s == 200,
        "{s} {h}"
    );
    inst.healthy().await;
    let (s, e) = inst
        .post(&format!("/workspaces/{id}/exec"), json!({"command": "echo back"}))
        .await;
    assert_eq!((s, &e["stdout"]), (200, &json!("back\n")), "{e}");

    std::fs::remove_file(&socket).unwrap();
    let (s, h) = inst.get("/health").await;
    assert_eq!((s, &h["engine"]), (503, &json!("unavailable")), "{h}");
    assert!(h["engine_error"].is_string(), "{h}");
    inst.healthy().await;
    assert!(socket.exists());
    let again = inst.create("eng2").await;
    assert_eq!(again["state"], "running");
}

/// The agent (the container's PID 1) killed during an exec: the exec says the workspace's
/// main process died (409, not a 5xx), the workspace is `stopped` everywhere, the engine is
/// fine, and `start` brings it back. A task whose workspace dies the same way fails with
/// that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_main_process_stops_the_workspace() {
    let inst = Instance::start("conductor-faults-pid1-");
    let w = inst.create("pid1").await;
    let id = w["id"].as_str().unwrap().to_string();
    let name = w["container_name"].as_str().unwrap().to_string();
    let pid = podman_inspect(&name, "{{.State.Pid}}");

    let exec = {
        let (http, url) = (inst.http.clone(), format!("{}/workspaces/{id}/exec", inst.base()));
        tokio::spawn(async move { send(http.post(url).json(&json!({"command": "sleep 30"}))).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    kill_9(&pid);
    let (s, e) = exec.await.unwrap();
    assert_eq!((s, &e["error"]["code"]), (409, &json!("workspace_exited")), "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("main process") && message.contains("signal 9"),
        "{message}"
    );

    let (s, got) = inst.get(&format!("/workspaces/{id}")).await;
    assert_eq!((s, &got["state"]), (200, &json!("stopped")), "{got}");
    assert!(got["error"].as_str().unwrap().contains("signal 9"), "{got}");
    let (s, list) = inst.get("/workspaces").await;
    assert_eq!(s, 200);
    let listed = list["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id.as_str())
        .unwrap();
    assert_eq!(listed["state"], "stopped");
    assert!(inst.cli_ok(&["ws", "ls"]).contains("stopped"));
    let (s, h) = inst.get("/health").await;
    assert_eq!((s, &h["engine"]), (200, &json!("ok")));
    let (s, e) = inst
        .post(&format!("/workspaces/{id}/exec"), json!({"command": "true"}))
        .await;
    assert_eq!((s, &e["error"]["code"]), (409, &json!("conflict")), "{e}");
    inst.cli_ok(&["ws", "start", &id]);
    let (s, e) = inst
        .post(&format!("/workspaces/{id}/exec"), json!({"command": "echo up"}))
        .await;
    assert_eq!((s, &e["stdout"]), (200, &json!("up\n")), "{e}");

    // Killed under a listing, with no request in flight: the listing shows it.
    let pid = podman_inspect(&name, "{{.State.Pid}}");
    kill_9(&pid);
    let start = Instant::now();
    loop {
        let (_, list) = inst.get("/workspaces").await;
        let state = list["workspaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id.as_str())
            .unwrap()["state"]
            .clone();
        if state == "stopped" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A task: its sandbox's PID 1 killed during its command.
    let (s, t) = inst
        .post(
            "/tasks",
            json!({"task_type": "isolated_execution", "environment": "minimal",
                   "commands": ["echo started; sleep 30"]}),
        )
        .await;
    assert_eq!(s, 202, "{t}");
    let task = t["task_id"].as_str().unwrap().to_string();
    let container = task_container(&inst, &task).await;
    kill_9(&podman_inspect(&container, "{{.State.Pid}}"));
    let t = inst.wait_task(&task).await;
    assert_eq!(t["status"], "failed", "{t}");
    let error = t["error"].as_str().unwrap();
    assert!(error.contains("main process") && error.contains("signal 9"), "{error}");
    inst.cli_ok(&["ws", "rm", &id]);
    let start = Instant::now();
    while !inst.leftovers().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "left: {}", inst.leftovers());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// conmon killed during a task: the command runs on through the agent, but Podman no longer
/// supervises the container. conductor fails the task with that reason (instead of
/// `succeeded`), retires the workspace (`lost`, container removed), and leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_monitor_fails_the_task_and_retires_the_workspace() {
    let inst = Instance::start("conductor-faults-conmon-");
    let (s, t) = inst
        .post(
            "/tasks",
            json!({"task_type": "isolated_execution", "environment": "minimal",
                   "commands": ["echo started; sleep 3"]}),
        )
        .await;
    assert_eq!(s, 202, "{t}");
    let task = t["task_id"].as_str().unwrap().to_string();
    let container = task_container(&inst, &task).await;
    kill_9(&podman_inspect(&container, "{{.State.ConmonPid}}"));
    let t = inst.wait_task(&task).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(t["error"].as_str().unwrap().contains("conmon"), "{t}");

    // A workspace of its own: its conmon killed, the next look at it retires it.
    let w = inst.create("conmon").await;
    let id = w["id"].as_str().unwrap();
    let name = w["container_name"].as_str().unwrap();
    kill_9(&podman_inspect(name, "{{.State.ConmonPid}}"));
    // SIGKILL is sent, not yet done: on a loaded machine conmon may still be in /proc for
    // the first look. The first look after it is gone retires the workspace.
    let start = Instant::now();
    let (s, got) = loop {
        let (s, got) = inst.get(&format!("/workspaces/{id}")).await;
        if got["state"] != "running" || start.elapsed() > Duration::from_secs(10) {
            break (s, got);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((s, &got["state"]), (200, &json!("lost")), "{got}");
    assert!(got["error"].as_str().unwrap().contains("conmon"), "{got}");
    let start = Instant::now();
    while !inst.leftovers().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "left: {}", inst.leftovers());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
