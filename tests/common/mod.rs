//! Shared set-up for the integration tests: every test gets its own data directory,
//! configuration, store and private Podman service, and removes what it made even when it
//! fails (the `Drop` of [`TestEnv`] reconciles away every container and network of its
//! instance and unmounts its volumes). Tests run on a multi-thread runtime so that `Drop`
//! can block on that cleanup.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use conductor_core::engine::{Progress, ProgressSink};
use conductor_core::size::ByteSize;
use conductor_core::Config;
use conductor_service::agent_client;
use conductor_service::workspaces::{CreateRequest, WorkspaceInfo};
use conductor_service::Conductor;

pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub conductor: Option<Conductor>,
}

/// A configuration whose data lives in `dir`, plus `extra` YAML merged on top.
pub fn config_text(dir: &std::path::Path, extra: &str) -> String {
    format!("storage:\n  base_path: {}\n{extra}", dir.display())
}

pub fn quiet() -> ProgressSink {
    Arc::new(|_p: Progress| {})
}

impl TestEnv {
    /// Opens a conductor with `extra` configuration YAML (top-level keys other than storage).
    pub async fn new(extra: &str) -> TestEnv {
        // `RUST_LOG=warn cargo test …` shows the service's log next to a failing test.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::Builder::new()
            .prefix("conductor-test-")
            .tempdir_in(test_root())
            .expect("temp dir");
        let text = config_text(dir.path(), extra);
        std::fs::write(dir.path().join("config.yaml"), &text).unwrap();
        let config = Config::parse(&text).expect("test config").config;
        let conductor = Conductor::open(config).await.expect("open conductor");
        TestEnv {
            dir,
            conductor: Some(conductor),
        }
    }

    pub fn c(&self) -> &Conductor {
        self.conductor.as_ref().expect("conductor")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }
}

/// Test data lives on the disk (not /tmp, which may be a small tmpfs).
/// A fresh data directory under [`test_root`] with a `config.yaml` in it (storage there,
/// plus `extra`); returns the directory and the configuration file's path.
#[allow(dead_code)]
pub fn config_dir(prefix: &str, extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(test_root())
        .expect("temp dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, config_text(dir.path(), extra)).expect("write config.yaml");
    (dir, config)
}

pub fn test_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("it");
    std::fs::create_dir_all(&root).unwrap();
    root
}

impl Drop for TestEnv {
    /// Runs on the test's own (multi-thread) runtime, also when the test panicked.
    fn drop(&mut self) {
        let Some(c) = self.conductor.take() else {
            // The conductor was moved out (an Arc in a harness); whatever still holds it,
            // leave no mount behind the temporary directory.
            unmount_under(self.dir.path());
            return;
        };
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let all = c
                    .list_workspaces(&conductor_service::workspaces::ListFilter::default())
                    .unwrap_or_default();
                for w in all {
                    let _ = c.remove_workspace(&w.id, Some(false)).await;
                }
                let _ = c.reconcile().await;
                drop(c);
            })
        });
        unmount_under(self.dir.path());
    }
}

/// A `conductor serve` child process on a free port. Dropping it stops it (SIGTERM, then
/// SIGKILL after 10 s), so a failing test leaves no service behind.
pub struct Served {
    child: Option<std::process::Child>,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

/// Starts the real binary with `config` and waits for its "listening" line.
pub fn serve(config: &std::path::Path) -> Served {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_conductor"))
        .args(["--config", config.to_str().unwrap(), "serve", "--port", "0"])
        .env_remove("CONDUCTOR_CONFIG")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start conductor serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("conductor listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Served {
        child: Some(child),
        base,
    }
}

impl Served {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `kill -9`: the process dies without any clean-up of its own.
    pub fn kill_9(mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait (SIGKILL after 10 s); returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = c.kill();
        c.wait().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.is_some() {
            let served = Served {
                child: self.child.take(),
                base: String::new(),
            };
            served.stop();
        }
    }
}

/// The stored log of task `id` of the API at `base` (`http://127.0.0.1:PORT`), as text.
pub async fn task_log(http: &reqwest::Client, base: &str, id: &str) -> String {
    http.get(format!("{base}/tasks/{id}/logs"))
        .send()
        .await
        .expect("GET /tasks/{id}/logs")
        .text()
        .await
        .expect("read the log")
}

/// Runs the conductor binary with configuration `config`; (success, stdout, stderr).
pub fn cli(config: &std::path::Path, args: &[&str], stdin: Option<&[u8]>) -> (bool, Vec<u8>, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_conductor"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("CONDUCTOR_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        input.write_all(data).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Names of the containers Podman still has for the conductor whose database is `db`.
pub fn leftover_containers(db: &std::path::Path) -> String {
    let store = conductor_store::Store::open(db).unwrap();
    let instance = store.instance_id().unwrap();
    let out = std::process::Command::new("podman")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=io.conductor.instance={instance}"),
            "--format",
            "{{.Names}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Lazily unmounts everything mounted at or below `dir` (deepest first), so removing a
/// test's temporary directory never leaves a loop mount behind.
pub fn unmount_under(dir: &std::path::Path) {
    let prefix = dir.to_string_lossy().to_string();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = std::process::Command::new("umount").args(["-l", &m]).status();
    }
}

/// A request for a `minimal` workspace of `agent`.
pub fn minimal(agent: &str) -> CreateRequest {
    CreateRequest {
        agent_id: agent.into(),
        environment: "minimal".into(),
        ..Default::default()
    }
}

/// Creates a `minimal` workspace of `agent` that runs the in-workspace agent (the static
/// binary must be built), with `volume_size` as its storage limit when given.
pub async fn agent_workspace(c: &Conductor, agent: &str, volume_size: Option<ByteSize>) -> WorkspaceInfo {
    assert!(
        agent_client::binary(&c.config).is_some(),
        "the static conductor-agent is not built (see the header of tests/agent.rs)"
    );
    let mut req = minimal(agent);
    req.limits.volume_size = volume_size;
    c.create_workspace(req, quiet()).await.expect("create workspace")
}

/// Host pid of the workspace container's PID 1 (the agent's init).
pub async fn init_pid(c: &Conductor, w: &WorkspaceInfo) -> u32 {
    c.engine
        .container_inspect(&w.container_name)
        .await
        .unwrap()
        .unwrap()
        .pid
        .unwrap()
}

/// Host pid of the agent's server (the only child of the container's PID 1 at rest).
pub async fn server_pid(c: &Conductor, w: &WorkspaceInfo) -> i32 {
    let init = init_pid(c, w).await;
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).unwrap();
    let pids: Vec<i32> = children.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 1, "children of the agent init: {pids:?}");
    pids[0]
}

/// Waits (up to 30 s) until workspace `id` is removed: a finished sandbox is removed just
/// after its task's outcome is recorded.
#[allow(dead_code)]
pub async fn wait_removed(c: &Conductor, id: &str) {
    let start = std::time::Instant::now();
    loop {
        let state = c.get_workspace(id).expect("workspace").state;
        if state == conductor_core::lifecycle::WorkspaceState::Removed {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "workspace {id} still {state:?} 30 s after its task"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A test's conductor shared as an `Arc` (an orchestrator holds it) that still removes what
/// the test made when it is dropped, also when the test panicked. Take it out of the
/// [`TestEnv`] instead of opening a second conductor: two in one process share the private
/// Podman service's socket, and dropping either would take it from the other.
pub struct Owned(pub Arc<Conductor>);

impl Owned {
    pub fn take(t: &mut TestEnv) -> Owned {
        Owned(Arc::new(t.conductor.take().expect("a conductor")))
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let c = self.0.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let all = c
                    .list_workspaces(&conductor_service::workspaces::ListFilter::default())
                    .unwrap_or_default();
                for w in all {
                    let _ = c.remove_workspace(&w.id, Some(false)).await;
                }
                let _ = c.reconcile().await;
            })
        });
    }
}
