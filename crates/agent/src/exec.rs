//! Running one command: spawn in its own process group, stream its output, honour stdin,
//! timeout and cancel.
//!
//! One `poll` loop per command watches stdout, stderr, the client connection (stdin data,
//! cancel, hang-up) and a socket pair on which a waiter thread reports the exit. Output is
//! written to the client with blocking writes, so a slow client throttles the command
//! through the pipe instead of buffering in the agent: memory stays at one chunk.
//!
//! Timeout, cancel and a client that hangs up all kill the process group
//! (`kill(-pgid, SIGKILL)`) and, when the request names a marker, every process whose
//! environment holds it (a process that called `setsid` left the group but kept the
//! marker). Once the command has exited, what its pipes already hold is sent; output that
//! background children write later is not (the command is over), as with `podman exec`.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use conductor_agent_protocol::{ErrorCode, ExecRequest, Request, Response, CHUNK};
use nix::poll::PollTimeout;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::conn::Conn;
use crate::pipes::{timeout_until, Output, Ready};

/// How long output already in the pipes may take to drain after the command exited.
pub(crate) const DRAIN: Duration = Duration::from_millis(200);
/// Rounds of the marker scan (a process may fork while we scan).
const KILL_ROUNDS: usize = 5;

/// The descriptors the loop watches besides the output pipes.
#[derive(Clone, Copy)]
enum Watched {
    /// The client: stdin data, cancel, hang-up.
    Client,
    /// The waiter thread's exit notice.
    Exited,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    TimedOut,
    Cancelled,
}

/// Kills the process group `pgid` and every process whose environment holds `marker`.
pub fn kill_tree(pgid: Pid, marker: Option<&str>) {
    let _ = killpg(pgid, Signal::SIGKILL);
    if let Some(marker) = marker {
        kill_marked(marker);
    }
}

/// Kills every process (but us and PID 1) whose environment holds the entry `marker`.
pub fn kill_marked(marker: &str) -> usize {
    let me = std::process::id();
    let mut killed = 0;
    for _ in 0..KILL_ROUNDS {
        let mut found = 0;
        let Ok(dir) = fs::read_dir("/proc") else { return killed };
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me || pid == 1 {
                continue;
            }
            let Ok(env) = fs::read(entry.path().join("environ")) else {
                continue;
            };
            if env.split(|b| *b == 0).any(|e| e == marker.as_bytes())
                && kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok()
            {
                found += 1;
            }
        }
        killed += found;
        if found == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    killed
}

/// The exit code a shell would report: the code, or 128 + the signal.
pub(crate) fn exit_code(status: ExitStatus) -> (i32, Option<i32>) {
    match (status.code(), status.signal()) {
        (Some(c), _) => (c, None),
        (None, Some(s)) => (128 + s, Some(s)),
        (None, None) => (255, None),
    }
}

/// Handles the buffered frames of the client while a command runs: stdin, its end, cancel.
/// Anything else is a protocol error (the command is killed).
fn client_frames(
    conn: &mut Conn,
    stdin_tx: &mut Option<mpsc::Sender<Vec<u8>>>,
    stop: &mut Option<Stop>,
    pgid: Pid,
    marker: Option<&str>,
) -> Result<(), String> {
    loop {
        match conn.take_frame() {
            Ok(None) => return Ok(()),
            Ok(Some((Request::Data, data))) => {
                if let Some(tx) = stdin_tx {
                    let _ = tx.send(data);
                }
            }
            Ok(Some((Request::Eof, _))) => *stdin_tx = None,
            Ok(Some((Request::Cancel, _))) => {
                if stop.is_none() {
                    kill_tree(pgid, marker);
                    *stop = Some(Stop::Cancelled);
                }
            }
            Ok(Some(_)) => {
                kill_tree(pgid, marker);
                return Err("only data, eof and cancel while a command runs".into());
            }
            Err(m) => {
                kill_tree(pgid, marker);
                return Err(m.0);
            }
        }
    }
}

/// Runs `req` and reports it on `conn`. Errors are connection failures only.
pub fn run(conn: &mut Conn, req: ExecRequest) -> io::Result<()> {
    if req.session.is_some() {
        return crate::session::exec(conn, req);
    }
    let start = Instant::now();
    let argv = match (req.argv, req.shell) {
        (Some(argv), None) if !argv.is_empty() => argv,
        (None, Some(line)) => vec!["/bin/sh".into(), "-c".into(), line],
        _ => {
            return conn.send_error(
                ErrorCode::SpawnFailed,
                "exactly one of argv (non-empty) and shell must be set",
            )
        }
    };
    if let Some(m) = &req.kill_marker {
        if !req.env.iter().any(|(k, v)| format!("{k}={v}") == *m) {
            return conn.send_error(ErrorCode::SpawnFailed, "kill_marker must be one of the env entries");
        }
    }
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = &req.cwd {
        if !std::path::Path::new(cwd).is_dir() {
            return conn.send_error(
                ErrorCode::SpawnFailed,
                format!("working directory {cwd} does not exist"),
            );
        }
        cmd.current_dir(cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            // As a shell reports it: 127 not found, 126 found but not runnable.
            let code = if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
            conn.send(
                &Response::Stderr,
                format!("conductor-agent: {}: {e}\n", argv[0]).as_bytes(),
            )?;
            return conn.send(
                &Response::Exit {
                    code,
                    signal: None,
                    timed_out: false,
                    cancelled: false,
                    duration_ms: start.elapsed().as_millis() as u64,
                },
                &[],
            );
        }
    };
    let pid = child.id();
    let pgid = Pid::from_raw(pid as i32);
    conn.send(&Response::Started { pid }, &[])?;

    // stdin is fed by its own thread so a command that does not read it never blocks us.
    let stdin_tx = child.stdin.take().map(|mut stdin| {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let _ = std::thread::Builder::new()
            .name("stdin".into())
            .stack_size(64 << 10)
            .spawn(move || {
                for chunk in rx {
                    if stdin.write_all(&chunk).is_err() {
                        break;
                    }
                }
            });
        tx
    });
    let mut stdin_tx = stdin_tx;
    let mut output = Output {
        out: child.stdout.take(),
        err: child.stderr.take(),
    };
    let (mut exited_rx, mut exited_tx) = UnixStream::pair()?;
    std::thread::Builder::new()
        .name("wait".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let raw = child.wait().map(|s| s.into_raw()).unwrap_or(255 << 8);
            let _ = exited_tx.write_all(&raw.to_ne_bytes());
        })?;

    let deadline = req.timeout_ms.map(|ms| start + Duration::from_millis(ms));
    let marker = req.kill_marker.as_deref();
    let mut stop: Option<Stop> = None;
    let mut status: Option<ExitStatus> = None;
    let mut drain_until: Option<Instant> = None;
    let mut buf = vec![0u8; CHUNK];
    // Frames that arrived with the request (its stdin) are already buffered.
    if let Err(m) = client_frames(conn, &mut stdin_tx, &mut stop, pgid, marker) {
        return conn.send_error(ErrorCode::Protocol, m);
    }
    loop {
        if status.is_some() && output.closed() {
            break;
        }
        if let (Some(d), None, None) = (deadline, stop, status) {
            if Instant::now() >= d {
                kill_tree(pgid, marker);
                stop = Some(Stop::TimedOut);
            }
        }
        let timeout = match (drain_until, stop, deadline) {
            (Some(_), _, _) => PollTimeout::ZERO,
            (None, None, Some(d)) => timeout_until(d, Instant::now()),
            _ => PollTimeout::NONE,
        };
        // Order: stdout, stderr, client, exit notice (absent ones are skipped).
        let mut others = Vec::with_capacity(2);
        if status.is_none() {
            others.push((conn.stream.as_fd(), Watched::Client));
            others.push((exited_rx.as_fd(), Watched::Exited));
        }
        let ready = match output.poll(&others, timeout) {
            Ok(ready) => ready,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if ready.is_empty() {
            if drain_until.is_some() {
                break; // nothing left in the pipes
            }
            continue;
        }
        for r in ready {
            match r {
                Ready::Pipe(pipe) => {
                    if let Err(e) = output.forward(pipe, &mut buf, conn) {
                        kill_tree(pgid, marker);
                        return Err(e);
                    }
                }
                Ready::Other(Watched::Client) => {
                    if conn.read_more()? == 0 {
                        // The client is gone: nobody wants the command any more.
                        kill_tree(pgid, marker);
                        return Ok(());
                    }
                    if let Err(m) = client_frames(conn, &mut stdin_tx, &mut stop, pgid, marker) {
                        return conn.send_error(ErrorCode::Protocol, m);
                    }
                }
                Ready::Other(Watched::Exited) => {
                    let mut raw = [0u8; 4];
                    exited_rx.read_exact(&mut raw)?;
                    status = Some(ExitStatus::from_raw(i32::from_ne_bytes(raw)));
                    drain_until = Some(Instant::now() + DRAIN);
                }
            }
        }
        if drain_until.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    drop(stdin_tx);
    let (code, signal) = exit_code(status.expect("the loop ends after the exit"));
    conn.send(
        &Response::Exit {
            code,
            signal,
            timed_out: stop == Some(Stop::TimedOut),
            cancelled: stop == Some(Stop::Cancelled),
            duration_ms: start.elapsed().as_millis() as u64,
        },
        &[],
    )
}
