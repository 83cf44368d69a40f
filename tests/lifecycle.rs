//! Pause, suspend and resume, auto-resume and the idle check, against real Podman.

mod common;

use std::time::{Duration, Instant};

use common::{cli, minimal, TestEnv};
use conductor_core::engine::ContainerStatus;
use conductor_core::lifecycle::WorkspaceState;
use conductor_service::exec::ExecRequest;
use conductor_service::{Conductor, ServiceError};

async fn sh(c: &Conductor, id: &str, cmd: &str) -> String {
    let (o, out, err) = c.exec_collect(id, ExecRequest::new(cmd)).await.expect("exec");
    assert_eq!(o.exit_code, 0, "{cmd}: {out}{err}");
    out
}

/// Starts a process that spins on a CPU in the background; returns its pid.
async fn spinner(c: &Conductor, id: &str) -> String {
    let pid = sh(c, id, "nohup sh -c 'while :; do :; done' >/dev/null 2>&1 & echo $!").await;
    pid.trim().to_string()
}

/// CPU time (user + system, in clock ticks) the process `pid` has used.
async fn cpu_ticks(c: &Conductor, id: &str, pid: &str) -> u64 {
    let stat = sh(c, id, &format!("cat /proc/{pid}/stat")).await;
    // Fields after the command name (which ends with ')'): state is the 3rd field, utime the
    // 14th and stime the 15th of the whole line.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

async fn container_status(c: &Conductor, id: &str) -> ContainerStatus {
    let w = c.get_workspace(id).unwrap();
    c.engine
        .container_inspect(&w.container_name)
        .await
        .unwrap()
        .expect("container")
        .status
}

fn state(c: &Conductor, id: &str) -> WorkspaceState {
    c.get_workspace(id).unwrap().state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_workspace_gets_no_cpu_and_exec_resumes_it() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = c.create_workspace(minimal("pause1"), common::quiet()).await.unwrap();
    let pid = spinner(c, &w.id).await;
    sh(c, &w.id, "echo before > /workspace/f").await;

    let before = cpu_ticks(c, &w.id, &pid).await;
    let paused = c.pause_workspace(&w.id).await.unwrap();
    assert_eq!(paused.state, WorkspaceState::Paused);
    assert_eq!(container_status(c, &w.id).await, ContainerStatus::Paused);
    // Listed, counted towards max_containers.
    let listed = c.list_workspaces(&Default::default()).unwrap();
    assert!(
        listed.iter().any(|l| l.id == w.id && l.state == WorkspaceState::Paused),
        "{listed:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Still paused: nothing resumed it behind our back.
    assert_eq!(state(c, &w.id), WorkspaceState::Paused);

    // Exec resumes it on its own; the spinner is the same process, with (almost) the CPU
    // time it had: 2 s of spinning would be ~200 ticks.
    let after = cpu_ticks(c, &w.id, &pid).await;
    assert_eq!(state(c, &w.id), WorkspaceState::Running);
    assert!(after - before < 50, "spun {} ticks while paused", after - before);
    assert_eq!(sh(c, &w.id, "cat /workspace/f").await, "before\n");

    // And it spins again once resumed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(cpu_ticks(c, &w.id, &pid).await > after, "the spinner runs again");

    // Files resume it too.
    c.pause_workspace(&w.id).await.unwrap();
    let entry = c.stat_file(&w.id, "f").await.unwrap();
    assert_eq!(entry.size, 7);
    assert_eq!(state(c, &w.id), WorkspaceState::Running);
    // An explicit resume of a running one changes nothing.
    assert_eq!(c.resume_workspace(&w.id).await.unwrap().state, WorkspaceState::Running);
    // A paused workspace can be removed.
    c.pause_workspace(&w.id).await.unwrap();
    assert_eq!(
        c.remove_workspace(&w.id, Some(false)).await.unwrap().state,
        WorkspaceState::Removed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_resume_work_on_a_paused_workspace_is_a_conflict() {
    let t = TestEnv::new("isolated_workspace:\n  auto_resume: false\n").await;
    let c = t.c();
    let w = c.create_workspace(minimal("pause2"), common::quiet()).await.unwrap();
    c.pause_workspace(&w.id).await.unwrap();
    let err = c.exec_collect(&w.id, ExecRequest::new("true")).await.unwrap_err();
    assert!(
        matches!(&err, ServiceError::Conflict(m) if m.contains("is paused") && m.contains("resume it first")),
        "{err}"
    );
    let err = c.stat_file(&w.id, "f").await.unwrap_err();
    assert!(
        matches!(&err, ServiceError::Conflict(m) if m.contains("is paused")),
        "{err}"
    );
    assert_eq!(state(c, &w.id), WorkspaceState::Paused);
    c.resume_workspace(&w.id).await.unwrap();
    assert_eq!(sh(c, &w.id, "echo ok").await, "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_transitions_name_the_state() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = c.create_workspace(minimal("pause3"), common::quiet()).await.unwrap();
    let conflict = |e: ServiceError, state: &str| match e {
        ServiceError::Conflict(m) => assert!(m.contains(&format!("is {state}")), "{m}"),
        other => panic!("expected a conflict naming {state}, got {other}"),
    };
    c.pause_workspace(&w.id).await.unwrap();
    conflict(c.pause_workspace(&w.id).await.unwrap_err(), "paused");
    c.stop_workspace(&w.id).await.unwrap();
    assert_eq!(container_status(c, &w.id).await, ContainerStatus::Exited);
    conflict(c.pause_workspace(&w.id).await.unwrap_err(), "stopped");
    conflict(c.suspend_workspace(&w.id).await.unwrap_err(), "stopped");
    // A stopped workspace is not resumed by work: someone stopped it.
    conflict(
        c.exec_collect(&w.id, ExecRequest::new("true")).await.unwrap_err(),
        "stopped",
    );
    assert_eq!(c.resume_workspace(&w.id).await.unwrap().state, WorkspaceState::Running);
    c.remove_workspace(&w.id, Some(false)).await.unwrap();
    conflict(c.pause_workspace(&w.id).await.unwrap_err(), "removed");
    conflict(c.resume_workspace(&w.id).await.unwrap_err(), "removed");
    conflict(c.suspend_workspace(&w.id).await.unwrap_err(), "removed");
    assert!(matches!(
        c.pause_workspace("ws-none").await.unwrap_err(),
        ServiceError::NotFound { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_keeps_files_and_frees_the_container() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = c.create_workspace(minimal("susp1"), common::quiet()).await.unwrap();
    spinner(c, &w.id).await;
    assert_eq!(sh(c, &w.id, "ps -eo args | grep -c '^sh -c while'").await, "1\n");
    sh(
        c,
        &w.id,
        "echo data > /workspace/f && echo root > /home/agent/g && chmod 640 /home/agent/g",
    )
    .await;
    let s = c.suspend_workspace(&w.id).await.unwrap();
    assert_eq!(s.state, WorkspaceState::Suspended);
    assert_eq!(container_status(c, &w.id).await, ContainerStatus::Exited);
    // Exec starts it again: the files are there, the processes are not.
    let begin = Instant::now();
    let out = sh(
        c,
        &w.id,
        // By command line: the fresh container's pids start again and may reuse the spinner's.
        "cat /workspace/f /home/agent/g; stat -c %a /home/agent/g; ps -eo args | grep -q '^sh -c while' || echo gone",
    )
    .await;
    assert_eq!(out, "data\nroot\n640\ngone\n", "resumed in {:?}", begin.elapsed());
    assert_eq!(state(c, &w.id), WorkspaceState::Running);
    // Suspending a paused one works too.
    c.pause_workspace(&w.id).await.unwrap();
    assert_eq!(
        c.suspend_workspace(&w.id).await.unwrap().state,
        WorkspaceState::Suspended
    );
    assert_eq!(c.resume_workspace(&w.id).await.unwrap().state, WorkspaceState::Running);
    assert_eq!(sh(c, &w.id, "cat /workspace/f").await, "data\n");
}

/// A suspended workspace survives a restart of conductor (`serve` stopped and started
/// again, reconciling), and comes back with its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_workspace_survives_a_restart_of_conductor() {
    let (_dir, config) = common::config_dir("conductor-test-", "");
    let run = |args: &[&str]| {
        let (ok, out, err) = cli(&config, args, None);
        assert!(ok, "conductor {args:?}: {err}");
        String::from_utf8(out).unwrap()
    };
    let id = run(&["ws", "create", "--agent", "susp2", "--env", "minimal"])
        .trim()
        .to_string();
    let _cleanup = RemoveOnDrop(config.clone(), id.clone());
    run(&[
        "ws",
        "exec",
        &id,
        "--",
        "echo kept > /workspace/f && echo root > /home/agent/g",
    ]);
    assert_eq!(run(&["ws", "suspend", &id]).trim(), "suspended");

    let served = common::serve(&config);
    assert!(served.stop().success());
    let served = common::serve(&config);
    let http = reqwest::Client::new();
    let base = served.base.clone();
    let post = |path: String, body: serde_json::Value| {
        let req = http.post(format!("{base}{path}")).json(&body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let w: serde_json::Value = http
        .get(format!("{base}/workspaces/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(w["state"], "suspended", "{w}");
    let none = serde_json::json!({});
    let (status, resumed) = post(format!("/workspaces/{id}/resume"), none.clone()).await;
    assert_eq!((status, resumed["state"].as_str()), (200, Some("running")), "{resumed}");
    let (_, r) = post(
        format!("/workspaces/{id}/exec"),
        serde_json::json!({"command": "cat /workspace/f /home/agent/g"}),
    )
    .await;
    assert_eq!(r["stdout"], "kept\nroot\n", "{r}");
    // Pause over HTTP: a second pause is a 409 naming the state.
    assert_eq!(post(format!("/workspaces/{id}/pause"), none.clone()).await.0, 200);
    let (status, body) = post(format!("/workspaces/{id}/pause"), none.clone()).await;
    assert_eq!(status, 409);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("is paused"),
        "{body}"
    );
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("state=\"paused\"") && l.ends_with(" 1")),
        "{metrics}"
    );
}

/// The idle check pauses a quiet workspace, leaves one whose background process works,
/// and one with a request in flight, and later suspends the paused one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_check_pauses_quiet_workspaces_only() {
    let t = TestEnv::new("isolated_workspace:\n  cleanup:\n    idle_pause_after: 1\n    idle_suspend_after: 4\n").await;
    let c = t.c();
    let quiet = c.create_workspace(minimal("idle1"), common::quiet()).await.unwrap();
    let busy = c.create_workspace(minimal("idle2"), common::quiet()).await.unwrap();
    let serving = c.create_workspace(minimal("idle3"), common::quiet()).await.unwrap();
    spinner(c, &busy.id).await;
    // A long request in flight: it uses no CPU, yet the workspace is in use.
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let long = c.exec(&serving.id, ExecRequest::new("sleep 8"), tx);
    // Its idle time starts now.
    sh(c, &quiet.id, "true").await;
    let checks = async {
        // The first check takes the CPU readings, the second compares.
        c.idle_check().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let r = c.idle_check().await.unwrap();
        assert_eq!(r.paused, vec![quiet.id.clone()], "{r:?}");
        assert_eq!(r.busy, vec![busy.id.clone()], "{r:?}");
        assert_eq!(state(c, &quiet.id), WorkspaceState::Paused);
        assert_eq!(state(c, &busy.id), WorkspaceState::Running);
        assert_eq!(state(c, &serving.id), WorkspaceState::Running);
        // Busy CPU counts as use: the spinner's workspace is never idle for long.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let r = c.idle_check().await.unwrap();
        assert_eq!(r.suspended, vec![quiet.id.clone()], "{r:?}");
        assert!(r.paused.is_empty(), "{r:?}");
        assert_eq!(state(c, &quiet.id), WorkspaceState::Suspended);
        assert_eq!(state(c, &busy.id), WorkspaceState::Running);
        assert_eq!(state(c, &serving.id), WorkspaceState::Running);
    };
    let (done, ()) = tokio::join!(long, checks);
    assert_eq!(done.unwrap().exit_code, 0, "the request in flight ran to its end");
    // Work brings the suspended one back.
    assert_eq!(sh(c, &quiet.id, "echo back").await, "back\n");
}

/// Removes a workspace made through the binary, and unmounts what its data directory still
/// has mounted (the storage pool), also when the test fails. Declared after the directory,
/// it runs before the directory is deleted.
struct RemoveOnDrop(std::path::PathBuf, String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = cli(&self.0, &["ws", "rm", &self.1, "--purge"], None);
        if let Some(dir) = self.0.parent() {
            common::unmount_under(dir);
        }
    }
}
