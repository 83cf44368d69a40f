//! The in-workspace agent against real Podman: PID 1, exec through the socket, streaming
//! with bounded memory, timeout and cancel, zombie reaping, confined file operations, and
//! the fallback to Podman exec when the agent is gone.
//!
//! Needs the static agent binary (`scripts/test.sh` builds it; by hand:
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu -p conductor-agent`).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::{agent_workspace, minimal, quiet, server_pid, TestEnv};
use conductor_agent_protocol::{ErrorCode, FileKind};
use conductor_core::engine::OutputChunk;
use conductor_service::agent_client::{self, AgentConn, AgentError};
use conductor_service::exec::{ExecPath, ExecRequest};
use conductor_service::Conductor;
use tokio::sync::mpsc;

/// Configuration of a conductor that starts workspaces without the agent.
const WITHOUT_AGENT: &str = "isolated_workspace:\n  agent_containers:\n    agent_binary: \"\"\n";

async fn sh(c: &Conductor, id: &str, cmd: &str) -> (i64, String, String) {
    let (o, out, err) = c.exec_collect(id, ExecRequest::new(cmd)).await.expect("exec");
    (o.exit_code, out, err)
}

async fn exec_path(c: &Conductor, id: &str) -> ExecPath {
    let (_, usage) = c.inspect_workspace(id).await.unwrap();
    usage.expect("running").exec_path.expect("exec path")
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_is_pid_1_with_the_workloads_restrictions_and_serves_exec() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "ag1", None).await;
    assert_eq!(exec_path(c, &w.id).await, ExecPath::Agent);

    let (code, out, _) = sh(
        c,
        &w.id,
        "tr '\\0' ' ' < /proc/1/cmdline; echo; for p in 1 $$; do grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/$p/status | tr -s '\\t' ' '; done",
    )
    .await;
    assert_eq!(code, 0);
    let mut lines = out.lines();
    assert_eq!(lines.next().unwrap().trim(), "/.conductor/agent init");
    let status: Vec<&str> = lines.collect();
    // The agent (PID 1) and the command carry the same restrictions.
    assert_eq!(status[..5], status[5..], "{status:?}");
    assert_eq!(
        status[..5],
        [
            "Uid: 1000 1000 1000 1000",
            "CapEff: 0000000000000000",
            "CapBnd: 0000000000000000",
            "NoNewPrivs: 1",
            "Seccomp: 2",
        ]
    );

    // The same shell semantics as the Podman path.
    let mut r = ExecRequest::new("echo $GREETING from $(pwd); cat; echo err >&2; exit 3");
    r.env.insert("GREETING".into(), "hi".into());
    r.cwd = Some("/etc".into());
    r.stdin = Some(bytes::Bytes::from_static(b"piped\n"));
    let (o, out, err) = c.exec_collect(&w.id, r).await.unwrap();
    assert_eq!(
        (o.exit_code, out.as_str(), err.as_str()),
        (3, "hi from /etc\npiped\n", "err\n")
    );
    let (code, out, _) = sh(c, &w.id, "pwd; id -u; echo $CONDUCTOR_WORKSPACE_ID").await;
    assert_eq!((code, out), (0, format!("/workspace\n1000\n{}\n", w.id)));

    // The socket directory on the host: the workspace user's, reachable by root only.
    let dir = agent_client::socket_dir(&c.paths, &w.id);
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (1000, 0o700));
    let parent = std::fs::metadata(dir.parent().unwrap()).unwrap();
    assert_eq!((parent.uid(), parent.permissions().mode() & 0o777), (0, 0o700));

    // Exec through the agent takes milliseconds (the Podman path takes tens).
    let start = Instant::now();
    for _ in 0..20 {
        assert_eq!(sh(c, &w.id, "true").await.0, 0);
    }
    let each = start.elapsed() / 20;
    assert!(each < Duration::from_millis(50), "exec through the agent took {each:?}");

    c.remove_workspace(&w.id, Some(false)).await.unwrap();
    assert!(!dir.exists(), "the socket directory goes with the workspace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_100_mib_keeps_memory_bounded() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "ag2", None).await;
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(4);
    let before = rss_kib();
    let consumer = tokio::spawn(async move {
        let (mut total, mut peak) = (0u64, 0u64);
        while let Some(chunk) = rx.recv().await {
            if let OutputChunk::Stdout(b) = chunk {
                total += b.len() as u64;
            }
            peak = peak.max(rss_kib());
        }
        (total, peak)
    });
    let o = c
        .exec(&w.id, ExecRequest::new("head -c 104857600 /dev/zero"), tx)
        .await
        .unwrap();
    let (total, peak) = consumer.await.unwrap();
    assert_eq!(o.exit_code, 0);
    assert_eq!(total, 100 << 20);
    let grown = peak.saturating_sub(before);
    assert!(grown < 32 << 10, "RSS grew by {grown} KiB while streaming 100 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_cancel_kill_grandchildren() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "ag3", None).await;
    let mut r = ExecRequest::new("sleep 301 & (setsid sleep 302 &); bash -c 'sleep 303 & wait' & sleep 304");
    r.timeout = Some(Duration::from_secs(1));
    let start = Instant::now();
    let (o, _, _) = c.exec_collect(&w.id, r).await.unwrap();
    assert!(o.timed_out);
    assert_eq!(o.exit_code, 124);
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    let (_, out, _) = sh(c, &w.id, "ps -eo args | grep -c '^sleep 30[1-4]' || true").await;
    assert_eq!(out.trim(), "0", "left-over sleeps after the timeout");

    // Cancel: the caller gives up (drops the exec); the agent kills the whole tree.
    let (tx, _rx) = mpsc::channel(16);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(800),
        c.exec(
            &w.id,
            ExecRequest::new("sleep 311 & (setsid sleep 312 &); sleep 313"),
            tx,
        ),
    )
    .await;
    assert!(cancelled.is_err(), "the command should still run: {cancelled:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, out, _) = sh(c, &w.id, "ps -eo args | grep -c '^sleep 31[1-3]' || true").await;
        if out.trim() == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "left-over sleeps after the cancel: {out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reaped_by_the_agent() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "ag4", None).await;
    // The shell exits at once; its background children are orphaned to PID 1.
    let (code, out, _) = sh(c, &w.id, "for i in 1 2 3; do sleep 0.2 & done; echo $!").await;
    assert_eq!(code, 0);
    let last: u32 = out.trim().parse().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, out, _) = sh(
        c,
        &w.id,
        &format!("cat /proc/{last}/stat 2>/dev/null; ps -eo stat,args | awk '$1 ~ /^Z/' "),
    )
    .await;
    assert_eq!(out.trim(), "", "zombies left: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_operations_are_confined_to_the_workspace() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "ag5", None).await;
    let (code, _, err) = sh(
        c,
        &w.id,
        "mkdir -p /workspace/d && ln -s /etc /workspace/etc-link && ln -s ../.. /workspace/d/up && ln -s ../d /workspace/d/self",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let dir = agent_client::socket_dir(&c.paths, &w.id);
    let mut a = AgentConn::connect(&dir).await.unwrap();

    assert_eq!(
        a.write_file("/workspace/new/f.txt", b"hello", None, true)
            .await
            .unwrap(),
        5
    );
    assert_eq!(a.read_file("new/f.txt").await.unwrap(), b"hello");
    let st = a.stat("new/f.txt").await.unwrap();
    assert_eq!((st.kind, st.size, st.uid, st.mode), (FileKind::File, 5, 1000, 0o644));
    let names: Vec<String> = a
        .list("/workspace")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    for n in ["d", "etc-link", "new"] {
        assert!(names.contains(&n.to_string()), "{names:?}");
    }
    assert_eq!(
        a.stat("d/self").await.unwrap().kind,
        FileKind::Dir,
        "links inside are followed"
    );
    let (_, out, _) = sh(c, &w.id, "cat /workspace/new/f.txt").await;
    assert_eq!(out, "hello");

    let refused = |r: Result<_, AgentError>| match r {
        Err(AgentError::Refused { code, .. }) => code,
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("not refused"),
    };
    for (path, code) in [
        ("etc-link/passwd", ErrorCode::OutsideRoot),
        ("d/up/etc/passwd", ErrorCode::OutsideRoot),
        ("../etc/passwd", ErrorCode::InvalidPath),
        ("/workspace/../etc/passwd", ErrorCode::InvalidPath),
        ("/etc/passwd", ErrorCode::OutsideRoot),
        ("a\0b", ErrorCode::InvalidPath),
    ] {
        assert_eq!(refused(a.read_file(path).await.map(|_| ())), code, "read {path:?}");
    }
    assert_eq!(
        refused(a.write_file("etc-link/evil", b"x", None, false).await.map(|_| ())),
        ErrorCode::OutsideRoot
    );
    assert_eq!(
        refused(a.stat(&"x/".repeat(2100)).await.map(|_| ())),
        ErrorCode::InvalidPath
    );
    assert_eq!(refused(a.list("d/up").await.map(|_| ())), ErrorCode::OutsideRoot);
    a.delete("etc-link", false).await.unwrap();
    a.delete("new", true).await.unwrap();
    let (_, out, _) = sh(c, &w.id, "ls /workspace; test -f /etc/passwd && echo kept").await;
    assert_eq!(out, "d\nkept\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_falls_back_to_podman_when_the_agent_is_killed() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "ag6", None).await;
    assert_eq!(exec_path(c, &w.id).await, ExecPath::Agent);
    let server = server_pid(c, &w).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server), nix::sys::signal::Signal::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (code, out, _) = sh(c, &w.id, "echo still here; id -u").await;
    assert_eq!((code, out.as_str()), (0, "still here\n1000\n"));
    assert_eq!(exec_path(c, &w.id).await, ExecPath::Podman);
    // The marker-based kill of the Podman path still reaches the whole tree.
    let mut r = ExecRequest::new("sleep 321 & (setsid sleep 322 &); sleep 323");
    r.timeout = Some(Duration::from_secs(1));
    let (o, _, _) = c.exec_collect(&w.id, r).await.unwrap();
    assert!(o.timed_out);
    let (_, out, _) = sh(c, &w.id, "ps -eo args | grep -c '^sleep 32[1-3]' || true").await;
    assert_eq!(out.trim(), "0");
    // A restart brings the agent back. init takes SIGTERM (a stop does not wait for the
    // 5 s kill timeout).
    let stopping = Instant::now();
    c.stop_workspace(&w.id).await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "stop took {:?}",
        stopping.elapsed()
    );
    c.start_workspace(&w.id).await.unwrap();
    let dir = agent_client::socket_dir(&c.paths, &w.id);
    assert!(agent_client::wait_ready(&dir).await);
    assert_eq!(exec_path(c, &w.id).await, ExecPath::Agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_agent_binary_workspaces_use_podman() {
    let t = TestEnv::new(WITHOUT_AGENT).await;
    let c = t.c();
    let w = c.create_workspace(minimal("ag7"), quiet()).await.unwrap();
    assert_eq!(exec_path(c, &w.id).await, ExecPath::Podman);
    let (code, out, _) = sh(c, &w.id, "tr '\\0' ' ' < /proc/1/cmdline").await;
    assert_eq!(code, 0);
    assert!(out.starts_with("/bin/sh -c"), "{out}");
    assert!(!agent_client::socket_dir(&c.paths, &w.id).exists());
}

/// Runs `cmd` as the next command of `session` (through the agent when it answers).
async fn in_session(c: &Conductor, id: &str, session: &str, cmd: &str) -> (i64, String, String) {
    let mut r = ExecRequest::new(cmd);
    r.session = Some(session.into());
    r.internal_env.push(("SESSION_MARK".into(), session.into()));
    let (o, out, err) = c.exec_collect(id, r).await.expect("exec in a session");
    (o.exit_code, out, err)
}

async fn count(c: &Conductor, id: &str, pattern: &str) -> String {
    let (_, out, _) = sh(c, id, &format!("ps -eo args | grep -c '{pattern}' || true")).await;
    out.trim().to_string()
}

/// A persistent shell per session through the agent: state carries over without a new
/// shell, sessions are independent, a shell that exits is replaced, timeout and
/// end_session kill everything a session started, output streams, nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_keep_one_shell_per_session() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "ag8", None).await;
    let dir = agent_client::socket_dir(&c.paths, &w.id);
    assert!(AgentConn::connect(&dir).await.unwrap().has_sessions());

    let (code, pid, _) = in_session(c, &w.id, "s1", "echo $$").await;
    assert_eq!(code, 0);
    for cmd in [
        "cd /tmp",
        "export X=1; Y=local",
        "greet() { echo \"hi $1\"; }",
        "alias hello='echo aliased'",
    ] {
        assert_eq!(in_session(c, &w.id, "s1", cmd).await.0, 0, "{cmd}");
    }
    let (code, out, err) = in_session(c, &w.id, "s1", "pwd; echo $X $Y; greet you; hello; echo $$").await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("/tmp\n1 local\nhi you\naliased\n{pid}"),
        "same shell, same state"
    );
    // Another session, and a plain exec, know nothing of it.
    let (_, out, _) = in_session(c, &w.id, "s2", "pwd; echo \"[$X]\"; echo $$").await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["/workspace", "[]"]);
    assert_ne!(lines[2], pid.trim());
    assert_eq!(sh(c, &w.id, "pwd; echo \"[$X]\"").await.1, "/workspace\n[]\n");

    // `exit 3` reports 3 and ends the shell; the next command gets a fresh one.
    let (code, out, _) = in_session(c, &w.id, "s1", "echo bye; exit 3").await;
    assert_eq!((code, out.as_str()), (3, "bye\n"));
    let (code, out, _) = in_session(c, &w.id, "s1", "pwd; echo \"[$X]\"; echo $$").await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["/workspace", "[]"]);
    assert_ne!(lines[2], pid.trim());

    // A timeout kills the session: a background job of an earlier command, a child of a
    // child, one that left the process group; the next command works.
    assert_eq!(in_session(c, &w.id, "s3", "sleep 301 &").await.0, 0);
    let mut r = ExecRequest::new("bash -c 'sleep 302 & wait' & (setsid sleep 303 &); sleep 304");
    r.session = Some("s3".into());
    r.timeout = Some(Duration::from_secs(1));
    let start = Instant::now();
    let (o, _, _) = c.exec_collect(&w.id, r).await.unwrap();
    assert!(o.timed_out);
    assert_eq!(o.exit_code, 124);
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert_eq!(
        count(c, &w.id, "^sleep 30[1-4]").await,
        "0",
        "left-over sleeps after the timeout"
    );
    assert_eq!(in_session(c, &w.id, "s3", "echo ok").await.1, "ok\n");

    // end_session kills what the session left running in the background.
    let (_, out, _) = in_session(c, &w.id, "s4", "sleep 311 & (setsid sleep 312 &); echo started").await;
    assert_eq!(out, "started\n");
    assert_eq!(count(c, &w.id, "^sleep 31[12]").await, "2");
    let mut a = AgentConn::connect(&dir).await.unwrap();
    for s in ["s1", "s2", "s3", "s4", "never-used"] {
        a.end_session(s).await.unwrap();
    }
    assert_eq!(
        count(c, &w.id, "^sleep 31[12]").await,
        "0",
        "end_session left processes"
    );

    // Large output streams through a session.
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(4);
    let consumer = tokio::spawn(async move {
        let mut total = 0u64;
        while let Some(chunk) = rx.recv().await {
            if let OutputChunk::Stdout(b) = chunk {
                total += b.len() as u64;
            }
        }
        total
    });
    let mut r = ExecRequest::new("head -c 52428800 /dev/zero");
    r.session = Some("big".into());
    let o = c.exec(&w.id, r, tx).await.unwrap();
    assert_eq!(o.exit_code, 0);
    assert_eq!(consumer.await.unwrap(), 50 << 20);
    a.end_session("big").await.unwrap();

    // Nothing is left: no shell of a session, no zombie, no session files.
    let (_, out, _) = sh(
        c,
        &w.id,
        "grep -l SESSION_MARK /proc/[0-9]*/environ 2>/dev/null; ps -eo stat,args | awk '$1 ~ /^Z/'; ls -A /run/conductor/sessions",
    )
    .await;
    assert_eq!(out, "", "left behind");
}

/// Without the agent a session is the state-file emulation: `cd` and exports carry over,
/// each command gets a fresh shell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_agent_sessions_fall_back_to_saved_state() {
    let t = TestEnv::new(WITHOUT_AGENT).await;
    let c = t.c();
    let w = c.create_workspace(minimal("ag9"), quiet()).await.unwrap();
    assert_eq!(exec_path(c, &w.id).await, ExecPath::Podman);
    let (_, pid, _) = in_session(c, &w.id, "task-f1", "cd /tmp; export X=1; echo $$").await;
    let (code, out, _) = in_session(c, &w.id, "task-f1", "pwd; echo $X; echo $$").await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["/tmp", "1"]);
    assert_ne!(lines[2], pid.trim(), "a fresh shell per command");
}

/// The socket directory is writable by the workload (same uid as the agent). A process the
/// workload starts on the socket, even the genuine agent binary, is not trusted: conductor
/// checks the peer (the server init spawned at start) and falls back to Podman instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_by_the_workload_is_not_trusted() {
    let t = TestEnv::new("").await;
    let c = t.c();
    let w = agent_workspace(c, "ag-impostor", None).await;
    assert_eq!(exec_path(c, &w.id).await, ExecPath::Agent);
    // The agent is not dumpable: the workload cannot read its memory or environment.
    let (code, _, err) = sh(c, &w.id, "head -c1 /proc/1/environ").await;
    assert_ne!(code, 0, "the workload read the agent's /proc/1/environ");
    assert!(err.contains("Permission denied"), "{err}");

    let (code, _, err) = sh(
        c,
        &w.id,
        "rm /run/conductor/agent.sock && (setsid /.conductor/agent serve --socket /run/conductor/agent.sock >/dev/null 2>&1 &) && sleep 0.5 && test -S /run/conductor/agent.sock",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    // The impostor answers hello, but conductor refuses it and uses Podman.
    let dir = agent_client::socket_dir(&c.paths, &w.id);
    match AgentConn::connect(&dir).await {
        Err(AgentError::Unavailable(why)) => assert!(why.contains("not the workspace's agent"), "{why}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("connected to a server the workload started"),
    }
    let (code, out, _) = sh(c, &w.id, "echo via podman").await;
    assert_eq!((code, out.as_str()), (0, "via podman\n"));
    assert_eq!(exec_path(c, &w.id).await, ExecPath::Podman);
}
