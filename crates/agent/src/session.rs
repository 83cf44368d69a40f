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
//! . '/run/conductor/sessions/<id>.<shell pid>/cmd-<n>' </dev/null; printf '%s %d\n' <nonce> "$?" >&0
//! ```
//!
//! and the shell answers with the command's status on the same socket, after a random
//! nonce that is new for every command: only the line with the current nonce counts, so a
//! process that got hold of the socket (a subshell forked off an earlier command inherits
//! the shell's saved copy of it) cannot end a command with a status of its own, and what it
//! wrote is dropped before the next command. The command text itself sits in that file
//! (under the agent's own socket directory; the directory made fresh, 0700, never through a
//! link; the file created with `O_EXCL | O_NOFOLLOW`, 0600), so no quoting is involved; `.`
//! runs it in the shell's own context (`cd` persists) with stdin from `/dev/null`. The line
//! works the same in bash and dash.
//!
//! None of this separates processes of the same uid: everything in a workspace runs as the
//! workspace user, who can read and replace those files and signal the shell. Tasks that
//! share a workspace are not isolated from each other.
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
//! whichever way it ends. A waiter thread per shell reports its exit at once but reaps it
//! only once the session is dropped: until then the shell's pid, which is its process
//! group id, cannot be taken by another process, so killing the group never hits a
//! stranger.
//!
//! One command runs per session at a time: a request for a busy session is answered
//! `session_busy`.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use conductor_agent_protocol::{valid_session_id, ErrorCode, ExecRequest, Request, Response, CHUNK};
use nix::errno::Errno;
use nix::fcntl::{open, openat, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::{fstat, Mode};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{geteuid, mkdir, Pid};

use crate::conn::Conn;
use crate::exec::{exit_code, kill_tree, DRAIN};
use crate::files::random_token;
use crate::pipes::{timeout_until, Output, Ready};

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

/// The descriptors a command's loop watches besides the output pipes.
#[derive(Clone, Copy)]
enum Watched {
    /// The shell's control socket: status lines.
    Control,
    /// The client: cancel, hang-up.
    Client,
    /// The waiter thread's exit notice.
    Exited,
}

/// One live shell.
struct Session {
    pid: u32,
    marker: Option<String>,
    /// Our end of the control socket (the shell's stdin): command lines out, status lines in.
    control: UnixStream,
    /// Its stdout and stderr: `None` once the shell closed them for good (`exec >/dev/null`).
    output: Output,
    /// Readable once the shell has exited: the raw wait status, from the waiter thread.
    exited: UnixStream,
    /// Dropped with the session: the waiter then reaps the shell.
    _reap: mpsc::Sender<()>,
    dir: PathBuf,
    commands: u64,
    /// What the control socket delivered during the current command, searched for its
    /// status line.
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

    /// Writes the next command to a file of the session's directory and returns its path.
    fn command_file(&mut self, command: &str) -> io::Result<PathBuf> {
        self.commands += 1;
        write_command(&self.dir, &format!("cmd-{}", self.commands), command)
    }
}

/// Opens the session directory `dir`, never through a link: with `fresh` it is made here
/// and must not exist yet; otherwise it is made when missing (something removed it).
fn open_session_dir(dir: &Path, fresh: bool) -> io::Result<OwnedFd> {
    match mkdir(dir, Mode::from_bits_truncate(0o700)) {
        Ok(()) => {}
        Err(Errno::EEXIST) if !fresh => {}
        Err(e) => return Err(e.into()),
    }
    // O_NOFOLLOW: a link planted at `dir` is refused (ELOOP), never followed.
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = open(dir, flags, Mode::empty())?;
    if fstat(&fd)?.st_uid != geteuid().as_raw() {
        return Err(io::Error::other(format!("{} is not the agent's", dir.display())));
    }
    Ok(fd)
}

/// Writes `command` to the new file `name` (0600, `O_EXCL | O_NOFOLLOW`: never an existing
/// file or link) in the session directory `dir`; returns its path.
fn write_command(dir: &Path, name: &str, command: &str) -> io::Result<PathBuf> {
    let dirfd = open_session_dir(dir, false)?;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut f = fs::File::from(openat(&dirfd, name, flags, Mode::from_bits_truncate(0o600))?);
    f.write_all(command.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(dir.join(name))
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
/// with stdin from `/dev/null`, then report `nonce` and `$?` on the control socket (its
/// stdin, which is open both ways). `nonce` is hex: no quoting needed.
pub fn source_line(path: &str, nonce: &str) -> String {
    format!(". {} </dev/null; printf '%s %d\\n' {nonce} \"$?\" >&0\n", quote(path))
}

/// Looks in `buf` (what the control socket delivered) for the status line of the command
/// with `nonce`, `<nonce> <status>\n`, and returns the status once it is complete. Anything
/// else is dropped: only a tail that may be the start of that line is kept.
fn take_status(buf: &mut Vec<u8>, nonce: &str) -> Option<i32> {
    let tag = format!("{nonce} ");
    let tag = tag.as_bytes();
    match buf.windows(tag.len()).position(|w| w == tag) {
        Some(at) => {
            buf.drain(..at);
            let nl = buf.iter().position(|b| *b == b'\n')?;
            let status = parse_status(&buf[tag.len()..nl]);
            buf.clear();
            Some(status)
        }
        None => {
            let keep = tag.len() - 1;
            if buf.len() > keep {
                buf.drain(..buf.len() - keep);
            }
            None
        }
    }
}

/// Parses a status the shell wrote (without its newline).
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
    /// Kills the session while its lease holds it. Under the lock: the lease clears the
    /// target before it lets the shell be reaped (and its pid be reused).
    fn kill(&self) {
        if let Some((pgid, marker)) = &*lock(&self.target) {
            kill_tree(*pgid, marker.as_deref());
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
        // From here on `end_session` leaves the shell alone (an idle session is killed by
        // dropping it), and a kill under way is over.
        lock(&self.running.target).take();
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
    let output = Output {
        out: child.stdout.take(),
        err: child.stderr.take(),
    };
    let (reap, reap_rx) = mpsc::channel::<()>();
    let waiter = std::thread::Builder::new()
        .name("session".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let _ = exited_tx.write_all(&wait_exit(pid).to_ne_bytes());
            // The shell stays a zombie, holding its pid and process group id, until the
            // session is dropped (its sender with it); then it is reaped.
            let _ = reap_rx.recv();
            let _ = child.wait();
        });
    let mut session = Session {
        pid,
        marker: req.kill_marker.clone(),
        control,
        output,
        exited,
        _reap: reap,
        dir: PathBuf::new(),
        commands: 0,
        status: Vec::new(),
    };
    // From here on, dropping `session` kills the shell.
    waiter.map_err(failed)?;
    session.dir =
        session_dir(base_dir(), id, pid).map_err(|e| format!("cannot create the session's directory: {e}"))?;
    if bash {
        // Non-interactive bash ignores aliases unless told otherwise.
        session
            .control
            .write_all(b"shopt -s expand_aliases\n")
            .map_err(failed)?;
    }
    Ok(session)
}

/// Waits for the shell `pid` to exit, without reaping it; returns its raw wait status.
fn wait_exit(pid: u32) -> i32 {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
    loop {
        match waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {
            Ok(WaitStatus::Exited(_, code)) => return (code & 0xff) << 8,
            Ok(WaitStatus::Signaled(_, signal, core)) => return signal as i32 | if core { 0x80 } else { 0 },
            Err(Errno::EINTR) => {}
            _ => return 255 << 8,
        }
    }
}

/// Makes `<base>/<id>.<pid>` (mode 0700) afresh: a stale directory of that name (from a
/// shell that had the same pid) is removed first; a link or anything else there is refused.
fn session_dir(base: &Path, id: &str, pid: u32) -> io::Result<PathBuf> {
    match mkdir(base, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    if !fs::symlink_metadata(base)?.is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", base.display())));
    }
    let dir = base.join(format!("{id}.{pid}"));
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&dir)?,
        Ok(_) => {
            return Err(io::Error::other(format!(
                "{} exists and is not a directory",
                dir.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    open_session_dir(&dir, true)?;
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
    // Whatever came on the control socket before this command is not its status.
    session.status.clear();
    let nonce = random_token();
    if session
        .control
        .write_all(source_line(&file.to_string_lossy(), &nonce).as_bytes())
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
                Some(t) => timeout_until(t, now),
                None => PollTimeout::NONE,
            }
        };
        // Order: stdout, stderr, control, client, exit notice (absent ones are skipped).
        let mut others = Vec::with_capacity(3);
        if !finished {
            if control_open {
                others.push((session.control.as_fd(), Watched::Control));
            }
            others.push((conn.stream.as_fd(), Watched::Client));
            others.push((session.exited.as_fd(), Watched::Exited));
        }
        let ready = match session.output.poll(&others, timeout) {
            Ok(ready) => ready,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                kill();
                return Err(e.into());
            }
        };
        if ready.is_empty() {
            if finished {
                break; // nothing left in the pipes
            }
            continue;
        }
        for r in ready {
            match r {
                Ready::Pipe(pipe) => {
                    if let Err(e) = session.output.forward(pipe, &mut buf, conn) {
                        kill();
                        return Err(e);
                    }
                }
                Ready::Other(Watched::Control) => {
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
                    if let Some(status) = take_status(&mut session.status, &nonce) {
                        // After a kill the shell's end is what counts.
                        if stop.is_none() && code.is_none() {
                            code = Some(status);
                            drain_until = Some(Instant::now() + DRAIN);
                        }
                    }
                }
                Ready::Other(Watched::Client) => {
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
                Ready::Other(Watched::Exited) => {
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
            source_line("/tmp/.conductor-sessions/t1.42/cmd-3", "0a1b"),
            ". '/tmp/.conductor-sessions/t1.42/cmd-3' </dev/null; printf '%s %d\\n' 0a1b \"$?\" >&0\n"
        );
        assert_eq!(quote("it's"), r"'it'\''s'");
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert!(a.len() == 32 && a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
    }

    /// Only the line with the current nonce counts, whatever came before, around or in
    /// pieces; the buffer stays small.
    #[test]
    fn only_the_status_line_with_the_nonce_counts() {
        let nonce = "c0ffee";
        let mut buf = Vec::new();
        for (got, want) in [
            (&b"0\n"[..], None),
            (b"bad0ff 0\n1\n", None),
            (b"junk without newline c0f", None),
            (b"fee ", None),
            (b"4", None),
            (b"2\n", Some(42)),
        ] {
            buf.extend_from_slice(got);
            assert_eq!(take_status(&mut buf, nonce), want, "{got:?}");
            assert!(buf.len() <= 16, "{buf:?}");
        }
        assert!(buf.is_empty());
        buf.extend_from_slice(b"xx c0ffee junk\nc0ffee 0\n");
        assert_eq!(take_status(&mut buf, nonce), Some(255));
        buf.extend_from_slice(b"c0ffeed 0\nc0ffe 1\n");
        assert_eq!(take_status(&mut buf, nonce), None);
    }

    /// The session directory is made afresh and never through a link; command files are
    /// new files, never written through a link or over an existing file.
    #[test]
    fn command_files_go_to_a_fresh_directory_never_through_links() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("sessions");
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::create_dir(&base).unwrap();

        // A link planted where the directory goes is refused and left alone.
        std::os::unix::fs::symlink(&elsewhere, base.join("s.7")).unwrap();
        assert!(session_dir(&base, "s", 7).is_err());
        assert!(fs::symlink_metadata(base.join("s.7")).unwrap().is_symlink());
        fs::write(base.join("s.8"), "x").unwrap();
        assert!(session_dir(&base, "s", 8).is_err());
        // A stale directory is replaced by an empty one.
        fs::create_dir(base.join("s.9")).unwrap();
        fs::write(base.join("s.9/cmd-1"), "stale").unwrap();
        let dir = session_dir(&base, "s", 9).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);

        let path = write_command(&dir, "cmd-1", "echo hi").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "echo hi\n");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Never over an existing file or through a link.
        assert!(write_command(&dir, "cmd-1", "again").is_err());
        std::os::unix::fs::symlink(elsewhere.join("target"), dir.join("cmd-2")).unwrap();
        assert!(write_command(&dir, "cmd-2", "evil").is_err());
        assert!(!elsewhere.join("target").exists());
        // A directory swapped for a link is refused; a removed one is made again.
        fs::remove_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        assert!(write_command(&dir, "cmd-3", "evil").is_err());
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
        fs::remove_file(&dir).unwrap();
        assert!(write_command(&dir, "cmd-4", "true").is_ok());
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
            let mut status = [0u8; 8];
            ours.write_all(source_line(cmd1.to_str().unwrap(), "a1b2c").as_bytes())
                .unwrap();
            ours.read_exact(&mut status).unwrap();
            assert_eq!(&status, b"a1b2c 1\n", "{shell}");
            ours.write_all(source_line(cmd2.to_str().unwrap(), "d3").as_bytes())
                .unwrap();
            let mut out = String::new();
            child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            assert_eq!(out, "read:1\n/ kept\n", "{shell}");
            assert_eq!(child.wait().unwrap().code(), Some(4), "{shell}");
        }
    }
}
