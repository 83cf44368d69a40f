//! Persistent shell sessions of the agent binary on the host (no container): state carries
//! over, sessions are independent, a shell that exits is replaced, timeout, cancel, hang-up
//! and `end_session` kill everything a session started, one command at a time.

mod common;

use std::ops::Deref;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{alive, code_of, wait_gone, wait_until, Client};
use conductor_agent_protocol::{ErrorCode, ExecRequest, Request, Response, FEATURE_SESSIONS};

/// An agent serving sessions, each of whose session ids ends with its tag.
struct Agent {
    agent: common::Agent,
    /// Ends every session id of this agent (see [`Agent::sid`]).
    tag: String,
}

impl Agent {
    fn start() -> Agent {
        let agent = common::Agent::start("serve").needing(FEATURE_SESSIONS);
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let tag = format!("-{}-{}", std::process::id(), COUNT.fetch_add(1, Ordering::SeqCst));
        Agent { agent, tag }
    }

    /// A session id unique to this agent of this test run.
    fn sid(&self, name: &str) -> String {
        format!("{name}{}", self.tag)
    }
}

impl Deref for Agent {
    type Target = common::Agent;

    fn deref(&self) -> &common::Agent {
        &self.agent
    }
}

impl Drop for Agent {
    /// Also kills what sessions of this agent left (after a failure): their shells carry
    /// `MARK=<session id>`, which ends with the agent's tag.
    fn drop(&mut self) {
        self.agent.stop();
        let suffix = self.tag.clone();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(env) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            let ours = env
                .split(|b| *b == 0)
                .any(|e| e.starts_with(b"MARK=") && e.ends_with(suffix.as_bytes()));
            if let (true, Ok(pid)) = (ours, entry.file_name().to_string_lossy().parse::<i32>()) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

impl Client {
    /// Runs `cmd` in `session`; returns (exit code, stdout, stderr).
    fn run(&mut self, session: &str, cmd: &str) -> (i32, String, String) {
        let (exit, out, err) = self.exec(in_session(session, cmd));
        (code_of(&exit), out, err)
    }

    fn end(&mut self, session: &str) -> Response {
        self.send(
            &Request::EndSession {
                session: session.into(),
            },
            b"",
        );
        self.recv().0
    }
}

fn in_session(session: &str, cmd: &str) -> ExecRequest {
    ExecRequest {
        shell: Some(cmd.into()),
        session: Some(session.into()),
        env: vec![("MARK".into(), session.into())],
        kill_marker: Some(format!("MARK={session}")),
        ..Default::default()
    }
}

/// The session directories of `id` (beside the agent's socket).
fn session_dirs(a: &Agent, id: &str) -> Vec<String> {
    std::fs::read_dir(a.dir.path().join("sessions"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&format!("{id}.")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn state_carries_over_and_sessions_are_independent() {
    let a = Agent::start();
    let mut c = a.connect();
    let (s1, s2) = (a.sid("carry"), a.sid("other"));
    let (code, pid1, _) = c.run(&s1, "echo $$");
    assert_eq!(code, 0);
    for cmd in [
        "cd /tmp",
        "export X=1; Y=local",
        "greet() { echo \"hi $1\"; }",
        "alias ll='echo aliased'",
        "set -o pipefail",
    ] {
        assert_eq!(c.run(&s1, cmd).0, 0, "{cmd}");
    }
    let (code, out, err) = c.run(&s1, "pwd; echo $X $Y; greet you; ll; echo $$; sh -c 'echo child:$X'");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("/tmp\n1 local\nhi you\naliased\n{pid1}child:1\n"));
    // The exit code is the command's; the shell stays.
    let (code, out, _) = c.run(&s1, "echo out; echo err >&2; false");
    assert_eq!((code, out.as_str()), (1, "out\n"));
    let (code, out, _) = c.run(&s1, "(exit 7)");
    assert_eq!((code, out.as_str()), (7, ""));
    let (_, same, _) = c.run(&s1, "echo $$");
    assert_eq!(same, pid1, "a new shell was spawned");

    // Another session on another connection knows nothing of the first.
    let mut c2 = a.connect();
    let (code, out, _) = c2.run(
        &s2,
        "pwd; echo \"[$X]\"; type greet >/dev/null 2>&1 || echo no-greet; echo $$",
    );
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_ne!(lines[0], "/tmp");
    assert_eq!(lines[1..3], ["[]", "no-greet"]);
    assert_ne!(format!("{}\n", lines[3]), pid1);
    // The first session is usable from another connection too.
    assert_eq!(c2.run(&s1, "pwd").1, "/tmp\n");

    // A command's stdin is /dev/null: it cannot eat the next command.
    let (code, out, _) = c.run(&s1, "cat; read x || echo eof");
    assert_eq!((code, out.as_str()), (0, "eof\n"));

    // end_session drops the state; the next command starts a fresh shell.
    assert_eq!(c.end(&s1), Response::Done { size: 0 });
    assert!(session_dirs(&a, &s1).is_empty(), "{:?}", session_dirs(&a, &s1));
    let (_, out, _) = c.run(&s1, "echo \"[$X]\" $$");
    assert_ne!(out, format!("[1] {pid1}"));
    assert!(out.starts_with("[] "), "{out}");
    assert_eq!(c.end(&s1), Response::Done { size: 0 });
    assert_eq!(c.end(&s2), Response::Done { size: 0 });
    assert_eq!(c.end("never-existed"), Response::Done { size: 0 });
}

#[test]
fn a_shell_that_exits_is_replaced_with_a_fresh_one() {
    let a = Agent::start();
    let mut c = a.connect();
    let s = a.sid("exit");
    let (_, pid1, _) = c.run(&s, "cd /tmp; export X=1; echo $$");
    let (exit, _, _) = c.exec(in_session(&s, "echo bye; exit 3"));
    match exit {
        Response::Exit {
            code,
            timed_out,
            cancelled,
            ..
        } => assert_eq!((code, timed_out, cancelled), (3, false, false)),
        other => panic!("{other:?}"),
    }
    assert!(wait_gone(pid1.trim().parse().unwrap()));
    let (code, out, _) = c.run(&s, "echo \"[$X]\"; echo $$");
    assert_eq!(code, 0);
    assert!(out.starts_with("[]\n"), "{out}");
    assert_ne!(out.lines().nth(1).unwrap(), pid1.trim());
    // `set -e` and a failure end the shell too, with the failure's code.
    assert_eq!(c.run(&s, "set -e").0, 0);
    assert_eq!(c.run(&s, "false; echo not reached").0, 1);
    assert_eq!(c.run(&s, "echo again").1, "again\n");
    c.end(&s);
}

#[test]
fn timeout_cancel_hang_up_and_end_session_kill_the_whole_session() {
    let a = Agent::start();
    let mut c = a.connect();
    let s = a.sid("kill");
    // A background job of an earlier command, a grandchild in its own session (setsid), and
    // a child of a child.
    let (_, out, _) = c.run(&s, "sleep 300 & echo $!; setsid sleep 301 & sleep 0.1; echo $!");
    let mut pids: Vec<u32> = out.lines().map(|l| l.parse().unwrap()).collect();
    let mut req = in_session(&s, "sh -c 'sleep 302 & echo $!; wait' & wait");
    req.timeout_ms = Some(500);
    let t = Instant::now();
    let (exit, out, _) = c.exec(req);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    match exit {
        Response::Exit {
            timed_out, cancelled, ..
        } => assert!(timed_out && !cancelled),
        other => panic!("{other:?}"),
    }
    pids.extend(out.lines().map(|l| l.parse::<u32>().unwrap()));
    assert_eq!(pids.len(), 3);
    for pid in pids {
        assert!(wait_gone(pid), "{pid} survived the timeout");
    }
    // The next command works, in a fresh shell.
    assert_eq!(c.run(&s, "echo ok").1, "ok\n");

    // Cancel.
    c.send(&Request::Exec(in_session(&s, "sleep 310 & echo $!; wait")), b"");
    assert!(matches!(c.recv().0, Response::Started { .. }));
    let (first, pid) = c.recv();
    assert_eq!(first, Response::Stdout);
    let pid: u32 = String::from_utf8(pid).unwrap().trim().parse().unwrap();
    c.send(&Request::Cancel, b"");
    let (exit, _, _) = c.collect();
    assert!(
        matches!(
            exit,
            Response::Exit {
                cancelled: true,
                code: 137,
                ..
            }
        ),
        "{exit:?}"
    );
    assert!(wait_gone(pid), "{pid} survived the cancel");

    // Hang-up.
    let mut c2 = a.connect();
    c2.send(&Request::Exec(in_session(&s, "sleep 320 & echo $!; wait")), b"");
    c2.recv();
    let pid: u32 = String::from_utf8(c2.recv().1).unwrap().trim().parse().unwrap();
    drop(c2);
    assert!(wait_gone(pid), "{pid} survived the hang-up");
    // Its files go right after (the agent cleans up once the client is gone).
    let t = Instant::now();
    while !session_dirs(&a, &s).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", session_dirs(&a, &s));
        std::thread::sleep(Duration::from_millis(10));
    }

    // end_session kills what an idle session left running, and frees its files.
    let (_, out, _) = c.run(&s, "sleep 330 & echo $!");
    let pid: u32 = out.trim().parse().unwrap();
    assert!(alive(pid));
    assert_eq!(session_dirs(&a, &s).len(), 1, "{:?}", session_dirs(&a, &s));
    assert_eq!(c.end(&s), Response::Done { size: 0 });
    assert!(wait_gone(pid), "{pid} survived end_session");
    assert!(session_dirs(&a, &s).is_empty());

    // end_session while a command runs kills it; the command reports cancelled.
    let mut c3 = a.connect();
    c3.send(&Request::Exec(in_session(&s, "sleep 340")), b"");
    assert!(matches!(c3.recv().0, Response::Started { .. }));
    assert_eq!(c.end(&s), Response::Done { size: 0 });
    let (exit, _, _) = c3.collect();
    assert!(matches!(exit, Response::Exit { cancelled: true, .. }), "{exit:?}");
    assert_eq!(c3.run(&s, "echo fresh").1, "fresh\n");
    c.end(&s);
}

#[test]
fn one_command_at_a_time_and_bad_requests_are_refused() {
    let a = Agent::start();
    let mut c = a.connect();
    let s = a.sid("busy");
    c.send(&Request::Exec(in_session(&s, "sleep 1; echo done")), b"");
    assert!(matches!(c.recv().0, Response::Started { .. }));
    let mut c2 = a.connect();
    let (refused, _, _) = c2.exec(in_session(&s, "echo me too"));
    assert!(
        matches!(
            refused,
            Response::Error {
                code: ErrorCode::SessionBusy,
                ..
            }
        ),
        "{refused:?}"
    );
    let (exit, out, _) = c.collect();
    assert_eq!((code_of(&exit), out.as_str()), (0, "done\n"));
    assert_eq!(c2.run(&s, "echo me too").1, "me too\n");

    let error = |c: &mut Client, req: ExecRequest| match c.exec(req).0 {
        Response::Error { code, .. } => code,
        other => panic!("{other:?}"),
    };
    for bad in ["", "a/b", "../x", &"x".repeat(65)] {
        assert_eq!(
            error(&mut c, in_session(bad, "true")),
            ErrorCode::InvalidSession,
            "{bad:?}"
        );
    }
    let mut argv = in_session(&s, "true");
    (argv.shell, argv.argv) = (None, Some(vec!["true".into()]));
    assert_eq!(error(&mut c, argv), ErrorCode::InvalidSession);
    let mut stdin = in_session(&s, "cat");
    stdin.stdin = true;
    assert_eq!(error(&mut c, stdin), ErrorCode::InvalidSession);
    let mut cwd = in_session(&a.sid("cwd"), "pwd");
    cwd.cwd = Some("/nonexistent-dir".into());
    assert_eq!(error(&mut c, cwd), ErrorCode::SpawnFailed);
    let mut cwd = in_session(&a.sid("cwd"), "pwd");
    cwd.cwd = Some("/usr".into());
    assert_eq!(c.exec(cwd).1, "/usr\n");
    assert!(matches!(
        c.end("bad/id"),
        Response::Error {
            code: ErrorCode::InvalidSession,
            ..
        }
    ));
    // The connection is still usable after all that.
    assert_eq!(c.run(&s, "echo fine").1, "fine\n");
    c.end(&s);
    c.end(&a.sid("cwd"));
}

#[test]
fn without_bash_the_session_runs_sh() {
    let a = Agent::start();
    let mut c = a.connect();
    let s = a.sid("dash");
    let mut first = in_session(
        &s,
        "echo \"[${BASH_VERSION:-none}]\"; cd /tmp; f() { echo f; }; echo $$",
    );
    // bash is looked up in the request's PATH.
    first.env.push(("PATH".into(), "/nonexistent".into()));
    let (exit, out, _) = c.exec(first);
    assert_eq!(code_of(&exit), 0);
    let pid = out.lines().nth(1).unwrap().to_string();
    assert_eq!(out.lines().next(), Some("[none]"));
    assert_eq!(c.run(&s, "echo $PWD; f; echo $$").1, format!("/tmp\nf\n{pid}\n"));
    // A syntax error in a sourced file ends dash; the next command gets a fresh shell.
    let (code, _, err) = c.run(&s, "if then");
    assert_ne!(code, 0);
    assert!(!err.is_empty());
    let (code, out, _) = c.run(&s, "echo $$");
    assert_eq!(code, 0);
    assert_ne!(out.trim(), pid);
    c.end(&s);
}

#[test]
fn output_streams_through_a_session() {
    let a = Agent::start();
    let mut c = a.connect();
    let s = a.sid("big");
    let (code, out, _) = c.run(&s, "head -c 20000000 /dev/zero | tr '\\0' x; echo; echo end >&2");
    assert_eq!(code, 0);
    assert_eq!(out.len(), 20_000_001);
    // Output a background job writes after its command ended comes with the next one.
    assert_eq!(c.run(&s, "(sleep 0.3; echo late) &").1, "");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(c.run(&s, "echo now").1, "late\nnow\n");
    // A shell whose stdout was closed for good stays usable.
    assert_eq!(c.run(&s, "exec >/dev/null; echo gone").0, 0);
    let (code, out, err) = c.run(&s, "echo quiet; echo loud >&2");
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", "loud\n"));
    c.end(&s);
}

/// A subshell of an earlier command still holds the shell's saved copy of the control
/// socket and writes status lines on it: they neither end a later command nor give it
/// their status, whether they come while it runs or between commands.
#[test]
fn forged_status_lines_are_ignored() {
    let a = Agent::start();
    let mut c = a.connect();
    let s = a.sid("forge");
    // Every 0.2 s for 3 s, on every socket it has: lines without the nonce, and a piece
    // of a line.
    let forger = "( for t in $(seq 15); do for n in $(seq 3 20); do \
                  [ -S /proc/$BASHPID/fd/$n ] && printf '0\\n7 7\\njunk' >&$n; done; sleep 0.2; \
                  done ) >/dev/null 2>&1 & echo started";
    assert_eq!(c.run(&s, forger), (0, "started\n".into(), String::new()));
    let t = Instant::now();
    let (code, out, _) = c.run(&s, "sleep 1; echo slept; (exit 3)");
    assert!(t.elapsed() >= Duration::from_secs(1), "ended early: {:?}", t.elapsed());
    assert_eq!((code, out.as_str()), (3, "slept\n"));
    assert_eq!(c.run(&s, "echo ok"), (0, "ok\n".into(), String::new()));
    // Forged lines that came while the session was idle do not count either.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.run(&s, "sleep 0.3; (exit 4)").0, 4);
    assert_eq!(c.run(&s, "true").0, 0);
    assert_eq!(c.end(&s), Response::Done { size: 0 });
}

/// Waits until `pid` has no /proc entry at all (reaped, not merely a zombie).
fn wait_reaped(pid: u32) -> bool {
    wait_until(|| !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// A shell that died stays unreaped (its pid, the session's process group id, cannot be
/// reused) until its session is dropped; then it is reaped, whichever way the session ended.
#[test]
fn shells_are_reaped_when_their_session_goes() {
    let a = Agent::start();
    let mut c = a.connect();
    let s = a.sid("reap");
    let pid = |out: String| out.trim().parse::<u32>().unwrap();
    let first = pid(c.run(&s, "echo $$").1);
    assert_eq!(c.run(&s, "exit 5").0, 5);
    assert!(wait_reaped(first), "{first} was not reaped");

    // Killed while idle: a zombie until the next command replaces the session.
    let second = pid(c.run(&s, "echo $$").1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_gone(second));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        std::path::Path::new(&format!("/proc/{second}")).exists(),
        "{second} was reaped while its session still held it"
    );
    let third = pid(c.run(&s, "echo $$").1);
    assert_ne!(third, second);
    assert!(wait_reaped(second), "{second} was not reaped");

    assert_eq!(c.end(&s), Response::Done { size: 0 });
    assert!(wait_reaped(third), "{third} was not reaped");
}
