//! Persistent shell sessions: one long-lived shell per session id, so that `cd`, variables
//! (exported or not), functions, aliases and shell options carry over from one command to
//! the next and no shell is spawned per command.
//!
//! # How a command reaches the shell
//!
//! The first `exec` naming a session starts its shell (`bash --noprofile --norc` when the
//! image has bash, else `/bin/sh`) in its own process group, with the request's `env`, `cwd`
//! and kill marker. Its stdout and stderr are pipes; its stdin is one end of a socket pair,
//! the *control socket*, which the agent uses both ways: it writes one line per command,
//!
//! ```text
//! . '/run/conductor/sessions/<id>.<shell pid>/cmd-<n>' </dev/null; printf '%d\n' "$?" >&0
//! ```
//!
//! and the shell answers with the command's status on the same socket. The command text
//! itself sits in that private file (under the agent's own socket directory; directories
//! 0700, file 0600), so no quoting is involved; `.` runs it in the shell's own context
//! (`cd` persists) with stdin from `/dev/null`, so neither the command nor its children can
//! read or write the control socket. The line works the same in bash and dash.
//!
//! # Ending
//!
//! Once the status line arrives, what is already in the output pipes is sent (they are
//! drained until empty, for at most [`DRAIN`]), then `exit`. Output that background jobs
//! write between two commands is sent with the next command. A command that makes the shell
//! exit (`exit 3`, `set -e` and a failure, a dash syntax error in a sourced file) reports
//! the shell's exit status and ends the session; the next command gets a fresh shell, with
//! the state of the old one lost. Timeout, cancel, a client hanging up and `end_session` kill
//! the session: the process group and every process carrying the session's kill marker.
//! Dropping a [`Session`] always does that and removes its directory, so nothing leaks
//! whichever way it ends; a waiter thread per shell reaps it as soon as it exits.
//!
//! One command runs per session at a time: a request for a busy session is answered
//! `session_busy`.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use conductor_agent_protocol::{valid_session_id, ErrorCode, ExecRequest, Request, Response, CHUNK};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::Pid;

use crate::conn::Conn;
use crate::exec::{exit_code, kill_tree, DRAIN};

/// Where sessions keep their command files (one directory per shell) when [`set_dir`] was
/// not called.
const DEFAULT_DIR: &str = "/tmp/.conductor-sessions";

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Sets where sessions keep their files, and removes what a previous server left there. The
/// server uses `sessions/` beside its socket: in a workspace that is `/run/conductor`, the
/// workspace's own directory (always writable, removed with the workspace).
pub fn set_dir(dir: PathBuf) {
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            eprintln!("conductor-agent: cannot clear {}: {e}", dir.display())
        }
        _ => {}
    }
    let _ = DIR.set(dir);
}

fn base_dir() -> &'static Path {
    DIR.get().map_or(Path::new(DEFAULT_DIR), PathBuf::as_path)
}
/// How long a killed shell may take to be reported gone before the command is reported
/// anyway (its session is dropped, which kills again).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// One live shell.
struct Session {
    pid: u32,
    marker: Option<String>,
    /// Our end of the control socket (the shell's stdin): command lines out, status lines in.
    control: UnixStream,
    /// `None` once the shell closed them for good (`exec >/dev/null`).
    out: Option<ChildStdout>,
    err: Option<ChildStderr>,
    /// Readable once the shell has exited: the raw wait status, from the waiter thread.
    exited: UnixStream,
    dir: PathBuf,
    commands: u64,
    /// A status line being received.
    status: Vec<u8>,
}

impl Session {
    fn pgid(&self) -> Pid {
        Pid::from_raw(self.pid as i32)
    }

    /// Whether the shell has exited (killed while idle, for instance).
    fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(self.exited.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Writes the next command to a private file and returns its path.
    fn command_file(&mut self, command: &str) -> io::Result<PathBuf> {
        // Recreated if something removed it meanwhile.
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        self.commands += 1;
        let path = self.dir.join(format!("cmd-{}", self.commands));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)?;
        f.write_all(command.as_bytes())?;
        f.write_all(b"\n")?;
        Ok(path)
    }
}

impl Drop for Session {
    /// Ends the session for good: every process it started dies, its files go.
    fn drop(&mut self) {
        kill_tree(self.pgid(), self.marker.as_deref());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The line that makes a session's shell run the command file `path` in its own context,
/// with stdin from `/dev/null`, then report `$?` on the control socket (its stdin, which is
/// open both ways).
pub fn source_line(path: &str) -> String {
    format!(". {} </dev/null; printf '%d\\n' \"$?\" >&0\n", quote(path))
}

/// Parses a status line the shell wrote (without its newline).
fn parse_status(line: &[u8]) -> i32 {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(255)
}

/// What killing a busy session needs, shared with `end_session` while a command runs.
#[derive(Default)]
struct Running {
    ended: AtomicBool,
    target: Mutex<Option<(Pid, Option<String>)>>,
}

impl Running {
    fn kill(&self) {
        let target = lock(&self.target).clone();
        if let Some((pgid, marker)) = target {
            kill_tree(pgid, marker.as_deref());
        }
    }
}

enum Slot {
    Idle(Session),
    Busy(Arc<Running>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn registry() -> MutexGuard<'static, HashMap<String, Slot>> {
    static SESSIONS: OnceLock<Mutex<HashMap<String, Slot>>> = OnceLock::new();
    lock(SESSIONS.get_or_init(Default::default))
}

/// A session taken out of the registry by the one request running in it. Dropping it puts
/// the session back (when `keep`) or ends it.
struct Lease {
    id: String,
    running: Arc<Running>,
    session: Option<Session>,
    keep: bool,
}

impl Lease {
    /// Marks the session busy; `None` when it already is.
    fn take(id: &str) -> Option<Lease> {
        let running = Arc::new(Running::default());
        let mut map = registry();
        let session = match map.remove(id) {
            Some(Slot::Busy(r)) => {
                map.insert(id.to_string(), Slot::Busy(r));
                return None;
            }
            Some(Slot::Idle(s)) => Some(s),
            None => None,
        };
        map.insert(id.to_string(), Slot::Busy(running.clone()));
        Some(Lease {
            id: id.to_string(),
            running,
            session,
            keep: false,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let keep = self.keep && !self.running.ended.load(Ordering::SeqCst);
        let session = self.session.take();
        let leftover = {
            let mut map = registry();
            let ours = matches!(map.get(&self.id), Some(Slot::Busy(r)) if Arc::ptr_eq(r, &self.running));
            match session {
                Some(s) if keep && ours => {
                    map.insert(self.id.clone(), Slot::Idle(s));
                    None
                }
                other => {
                    if ours {
                        map.remove(&self.id);
                    }
                    other
                }
            }
        };
        // Killing and removing files happen outside the lock.
        drop(leftover);
    }
}

/// Starts a session's shell.
fn spawn(id: &str, req: &ExecRequest) -> Result<Session, String> {
    if let Some(cwd) = &req.cwd {
        if !Path::new(cwd).is_dir() {
            return Err(format!("working directory {cwd} does not exist"));
        }
    }
    let failed = |e: io::Error| format!("cannot start the session's shell: {e}");
    let (control, theirs) = UnixStream::pair().map_err(failed)?;
    let command = |program: &str, args: &[&str]| -> io::Result<Command> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::from(OwnedFd::from(theirs.try_clone()?)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = &req.cwd {
            cmd.current_dir(cwd);
        }
        Ok(cmd)
    };
    let (mut child, bash) = match command("bash", &["--noprofile", "--norc"]).and_then(|mut c| c.spawn()) {
        Ok(c) => (c, true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (
            command("/bin/sh", &[]).and_then(|mut c| c.spawn()).map_err(failed)?,
            false,
        ),
        Err(e) => return Err(failed(e)),
    };
    drop(theirs);
    let pid = child.id();
    let (exited, mut exited_tx) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            kill_tree(Pid::from_raw(pid as i32), None);
            let _ = child.wait();
            return Err(failed(e));
        }
    };
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let waiter = std::thread::Builder::new()
        .name("session".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let raw = child.wait().map(|s| s.into_raw()).unwrap_or(255 << 8);
            let _ = exited_tx.write_all(&raw.to_ne_bytes());
        });
    let mut session = Session {
        pid,
        marker: req.kill_marker.clone(),
        control,
        out,
        err,
        exited,
        dir: PathBuf::new(),
        commands: 0,
        status: Vec::new(),
    };
    // From here on, dropping `session` kills the shell.
    waiter.map_err(failed)?;
    session.dir = session_dir(id, pid).map_err(|e| format!("cannot create the session's directory: {e}"))?;
    if bash {
        // Non-interactive bash ignores aliases unless told otherwise.
        session
            .control
            .write_all(b"shopt -s expand_aliases\n")
            .map_err(failed)?;
    }
    Ok(session)
}

/// Makes `<sessions dir>/<id>.<pid>` (mode 0700), replacing a stale one.
fn session_dir(id: &str, pid: u32) -> io::Result<PathBuf> {
    let base = base_dir();
    match fs::DirBuilder::new().mode(0o700).create(base) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    if !fs::symlink_metadata(base)?.is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", base.display())));
    }
    let dir = base.join(format!("{id}.{pid}"));
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// Why a command was killed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    TimedOut,
    Cancelled,
}

/// Runs `req` (which names a session) in the session's shell and reports it on `conn`.
/// Errors are connection failures only.
pub fn exec(conn: &mut Conn, req: ExecRequest) -> io::Result<()> {
    let start = Instant::now();
    let id = req.session.clone().unwrap_or_default();
    if let Err(m) = valid_session_id(&id) {
        return conn.send_error(ErrorCode::InvalidSession, m);
    }
    let command = match (&req.argv, &req.shell) {
        (None, Some(c)) => c.clone(),
        _ => {
            return conn.send_error(
                ErrorCode::InvalidSession,
                "a command in a session is a shell command line: set shell, not argv",
            )
        }
    };
    if req.stdin {
        return conn.send_error(
            ErrorCode::InvalidSession,
            "commands in a session read no stdin (it is /dev/null)",
        );
    }
    if let Some(m) = &req.kill_marker {
        if !req.env.iter().any(|(k, v)| format!("{k}={v}") == *m) {
            return conn.send_error(ErrorCode::SpawnFailed, "kill_marker must be one of the env entries");
        }
    }
    let Some(mut lease) = Lease::take(&id) else {
        return conn.send_error(
            ErrorCode::SessionBusy,
            format!("session {id} is running another command"),
        );
    };
    if lease.session.as_ref().is_some_and(Session::has_exited) {
        // Its shell died while idle: start afresh (dropping the old one cleans up).
        lease.session = None;
    }
    if lease.session.is_none() {
        match spawn(&id, &req) {
            Ok(s) => lease.session = Some(s),
            Err(m) => return conn.send_error(ErrorCode::SpawnFailed, m),
        }
    }
    let session = lease.session.as_mut().expect("set above");
    let (pgid, marker) = (session.pgid(), session.marker.clone());
    *lock(&lease.running.target) = Some((pgid, marker.clone()));
    let kill = || kill_tree(pgid, marker.as_deref());
    if lease.running.ended.load(Ordering::SeqCst) {
        kill(); // ended while it was starting
    }
    let file = match session.command_file(&command) {
        Ok(f) => f,
        Err(e) => {
            lease.keep = true;
            return conn.send_error(ErrorCode::Io, format!("cannot write the command file: {e}"));
        }
    };
    if let Err(e) = conn.send(&Response::Started { pid: session.pid }, &[]) {
        // The session is left as it was; nothing ran.
        let _ = fs::remove_file(&file);
        lease.keep = true;
        return Err(e);
    }
    let mut stop: Option<Stop> = None;
    let mut kill_deadline: Option<Instant> = None;
    if session
        .control
        .write_all(source_line(&file.to_string_lossy()).as_bytes())
        .is_err()
    {
        // The shell is gone or going: the loop waits for its end.
        kill();
        kill_deadline = Some(Instant::now() + KILL_WAIT);
    }

    let deadline = req.timeout_ms.map(|ms| start + Duration::from_millis(ms));
    let mut code: Option<i32> = None;
    let mut shell_status: Option<ExitStatus> = None;
    let mut control_open = true;
    let mut drain_until: Option<Instant> = None;
    let mut buf = vec![0u8; CHUNK];
    // Frames that came with the request (a cancel) are already buffered.
    if let Err(m) = client_frames(conn, &mut stop, &kill, &mut kill_deadline) {
        return conn.send_error(ErrorCode::Protocol, m);
    }
    loop {
        let now = Instant::now();
        if drain_until.is_some_and(|d| now >= d) {
            break;
        }
        if kill_deadline.is_some_and(|d| now >= d) && drain_until.is_none() {
            break; // the shell did not go away after a kill; dropping the session kills again
        }
        let finished = drain_until.is_some();
        if let (Some(d), None, false) = (deadline, stop, finished) {
            if now >= d && kill_deadline.is_none() {
                kill();
                stop = Some(Stop::TimedOut);
                kill_deadline = Some(now + KILL_WAIT);
            }
        }
        let timeout = if finished {
            PollTimeout::ZERO
        } else {
            let next = match (kill_deadline, deadline) {
                (Some(k), _) => Some(k),
                (None, Some(d)) if stop.is_none() => Some(d),
                _ => None,
            };
            match next {
                Some(t) => {
                    let left = t.saturating_duration_since(now).as_millis() + 1;
                    PollTimeout::try_from(left.min(60_000)).unwrap_or(PollTimeout::NONE)
                }
                None => PollTimeout::NONE,
            }
        };
        // Order: stdout, stderr, control, client, exit notice (absent ones are skipped).
        let mut fds = Vec::with_capacity(5);
        let mut which = Vec::with_capacity(5);
        if let Some(o) = &session.out {
            fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
            which.push(0);
        }
        if let Some(e) = &session.err {
            fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
            which.push(1);
        }
        if !finished {
            if control_open {
                fds.push(PollFd::new(session.control.as_fd(), PollFlags::POLLIN));
                which.push(2);
            }
            fds.push(PollFd::new(conn.stream.as_fd(), PollFlags::POLLIN));
            which.push(3);
            fds.push(PollFd::new(session.exited.as_fd(), PollFlags::POLLIN));
            which.push(4);
        }
        let n = match poll(&mut fds, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                kill();
                return Err(e.into());
            }
        };
        if n == 0 {
            if finished {
                break; // nothing left in the pipes
            }
            continue;
        }
        let ready: Vec<usize> = fds
            .iter()
            .zip(&which)
            .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, w)| *w)
            .collect();
        drop(fds);
        for w in ready {
            match w {
                0 | 1 => {
                    let pipe: &mut dyn Read = if w == 0 {
                        session.out.as_mut().expect("polled")
                    } else {
                        session.err.as_mut().expect("polled")
                    };
                    let got = match pipe.read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => 0,
                    };
                    if got == 0 {
                        if w == 0 {
                            session.out = None;
                        } else {
                            session.err = None;
                        }
                    } else {
                        let msg = if w == 0 { Response::Stdout } else { Response::Stderr };
                        if let Err(e) = conn.send(&msg, &buf[..got]) {
                            kill();
                            return Err(e);
                        }
                    }
                }
                2 => {
                    let got = match session.control.read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => 0,
                    };
                    if got == 0 {
                        control_open = false; // the shell is gone; its exit notice follows
                        continue;
                    }
                    session.status.extend_from_slice(&buf[..got]);
                    if let Some(nl) = session.status.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = session.status.drain(..=nl).collect();
                        // After a kill the shell's end is what counts.
                        if stop.is_none() && code.is_none() {
                            code = Some(parse_status(&line[..nl]));
                            drain_until = Some(Instant::now() + DRAIN);
                        }
                    }
                }
                3 => {
                    if conn.read_more()? == 0 {
                        // The client is gone: nobody wants the command (or the session) any
                        // more. Dropping the lease frees the id, then kills the session.
                        drop(lease);
                        return Ok(());
                    }
                    if let Err(m) = client_frames(conn, &mut stop, &kill, &mut kill_deadline) {
                        return conn.send_error(ErrorCode::Protocol, m);
                    }
                }
                _ => {
                    let mut raw = [0u8; 4];
                    session.exited.read_exact(&mut raw)?;
                    shell_status = Some(ExitStatus::from_raw(i32::from_ne_bytes(raw)));
                    drain_until = Some(Instant::now() + DRAIN);
                }
            }
        }
    }
    let ended = lease.running.ended.load(Ordering::SeqCst);
    let (code, signal, keep) = match (stop, code, shell_status) {
        // The command's own status; the shell stays unless it went away meanwhile.
        (None, Some(c), status) => (c, None, status.is_none() && !ended),
        // The shell exited (`exit 3`) or was killed: its status.
        (_, _, Some(status)) => {
            let (c, s) = exit_code(status);
            (c, s, false)
        }
        // Killed, and the shell was not reported gone in time.
        (_, _, None) => (137, Some(9), false),
    };
    let _ = fs::remove_file(&file);
    lease.keep = keep;
    // Back in the registry (or ended, killed and cleaned up) before the client hears of the
    // end, so its next request never finds the session busy.
    drop(lease);
    conn.send(
        &Response::Exit {
            code,
            signal,
            timed_out: stop == Some(Stop::TimedOut),
            cancelled: stop == Some(Stop::Cancelled) || ended,
            duration_ms: start.elapsed().as_millis() as u64,
        },
        &[],
    )
}

/// Handles the buffered frames of the client while a command runs: `cancel` kills the
/// session; `data` and `eof` are ignored (a session command has no stdin); anything else is
/// a protocol error (the session is killed).
fn client_frames(
    conn: &mut Conn,
    stop: &mut Option<Stop>,
    kill: &dyn Fn(),
    kill_deadline: &mut Option<Instant>,
) -> Result<(), String> {
    loop {
        match conn.take_frame() {
            Ok(None) => return Ok(()),
            Ok(Some((Request::Data | Request::Eof, _))) => {}
            Ok(Some((Request::Cancel, _))) => {
                if stop.is_none() {
                    kill();
                    *stop = Some(Stop::Cancelled);
                    *kill_deadline = Some(Instant::now() + KILL_WAIT);
                }
            }
            Ok(Some(_)) => {
                kill();
                return Err("only data, eof and cancel while a command runs".into());
            }
            Err(m) => {
                kill();
                return Err(m.0);
            }
        }
    }
}

/// Ends a session: kills its shell and everything it started, removes its files. Answered
/// by `done`, also when there is no such session.
pub fn end(conn: &mut Conn, id: &str) -> io::Result<()> {
    if let Err(m) = valid_session_id(id) {
        return conn.send_error(ErrorCode::InvalidSession, m);
    }
    let slot = registry().remove(id);
    match slot {
        Some(Slot::Idle(session)) => drop(session),
        Some(Slot::Busy(running)) => {
            // The request running in it sees its shell die and drops the session.
            running.ended.store(true, Ordering::SeqCst);
            running.kill();
        }
        None => {}
    }
    conn.send(&Response::Done { size: 0 }, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_line_runs_the_file_in_the_shell_and_reports_on_the_control_socket() {
        assert_eq!(
            source_line("/tmp/.conductor-sessions/t1.42/cmd-3"),
            ". '/tmp/.conductor-sessions/t1.42/cmd-3' </dev/null; printf '%d\\n' \"$?\" >&0\n"
        );
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn status_lines_parse_or_count_as_failure() {
        assert_eq!(parse_status(b"0"), 0);
        assert_eq!(parse_status(b"127"), 127);
        assert_eq!(parse_status(b" 3\r"), 3);
        assert_eq!(parse_status(b"x"), 255);
        assert_eq!(parse_status(b""), 255);
    }

    /// The line does what it says in both shells: the command's `cd` and variables stay,
    /// its stdin is /dev/null, the status comes back on fd 0.
    #[test]
    fn the_source_line_works_in_bash_and_sh() {
        let dir = tempfile::tempdir().unwrap();
        for shell in ["bash", "sh"] {
            if Command::new(shell).arg("-c").arg("true").status().is_err() {
                continue;
            }
            let (mut ours, theirs) = UnixStream::pair().unwrap();
            let mut child = Command::new(shell)
                .stdin(Stdio::from(OwnedFd::from(theirs)))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let cmd1 = dir.path().join(format!("{shell}-1"));
            fs::write(&cmd1, "cd /; X=kept; read line; echo \"read:$?\"; false\n").unwrap();
            let cmd2 = dir.path().join(format!("{shell}-2"));
            fs::write(&cmd2, "echo \"$PWD $X\"; exit 4\n").unwrap();
            let mut status = [0u8; 2];
            ours.write_all(source_line(cmd1.to_str().unwrap()).as_bytes()).unwrap();
            ours.read_exact(&mut status).unwrap();
            assert_eq!(&status, b"1\n", "{shell}");
            ours.write_all(source_line(cmd2.to_str().unwrap()).as_bytes()).unwrap();
            let mut out = String::new();
            child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            assert_eq!(out, "read:1\n/ kept\n", "{shell}");
            assert_eq!(child.wait().unwrap().code(), Some(4), "{shell}");
        }
    }
}
