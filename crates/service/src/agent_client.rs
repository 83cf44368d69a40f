//! The service side of the in-workspace agent (`crates/agent`, protocol in
//! `conductor-agent-protocol`, described in docs/agent-protocol.md).
//!
//! # Where things are
//!
//! - **The binary** ([`binary`]): `isolated_workspace.agent_containers.agent_binary` when set
//!   (empty turns the agent off), else `conductor-agent` next to the running executable,
//!   else the newest of `target/x86_64-unknown-linux-gnu/{release,debug}/conductor-agent`
//!   above it (what `scripts/setup.sh` and `scripts/test.sh` build). Only a statically
//!   linked binary is taken: it must run in any image, whatever its libc. It is mounted
//!   read-only at [`AGENT_PATH`] and is the container's entrypoint (PID 1).
//! - **The socket**: each workspace gets its own host directory `<base_path>/agents/<id>/`
//!   (owned by the workspace user, mode 0700, under a root-only `agents/`), bind-mounted at
//!   `/run/conductor`; the agent listens on `agent.sock` in it. Only that workspace and
//!   root on the host can reach it; it needs no network.
//!
//! # Connecting safely
//!
//! The workspace owns its socket directory and could replace `agent.sock` with a symlink
//! to some host socket. So the socket is opened with `O_PATH | O_NOFOLLOW`, checked to be
//! a socket, and connected through `/proc/self/fd/N`: the connection goes to exactly the
//! inode that was checked (and the path stays far below the 108-byte limit of socket
//! addresses).
//!
//! # Fallback
//!
//! A workspace whose agent does not answer `hello` within [`HELLO_TIMEOUT`] (no agent
//! binary, the agent was killed, an old workspace) is driven through Podman exec; nothing
//! is retried once a command has been handed to the agent, since it may have run.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conductor_agent_protocol::{
    self as proto, encode, parse_prefix, ErrorCode, FileStat, Request, Response, CHUNK, SOCKET_DIR, SOCKET_NAME,
    VERSION,
};
use conductor_core::config::{Config, DataPaths};
use conductor_core::engine::{Mount, OutputChunk};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::volumes::WORKSPACE_UID;
use crate::{host, Result, ServiceError};

/// Where the agent binary is mounted in a workspace.
pub const AGENT_PATH: &str = "/.conductor/agent";
/// How long a workspace's agent gets to answer `hello` before Podman exec is used.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a new workspace's agent gets to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Beyond the command's own timeout, how long the agent may take to report its end.
const EXIT_GRACE: Duration = Duration::from_secs(30);
/// Target architecture the agent is built for.
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// A failure talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No agent answers (no socket, refused, no `hello`): use Podman instead.
    #[error("the workspace agent is not available: {0}")]
    Unavailable(String),
    /// The agent refused the request (a path outside the workspace, a missing file…).
    #[error("{code}: {message}")]
    Refused { code: ErrorCode, message: String },
    /// The connection broke or the agent broke the protocol mid-request.
    #[error("the workspace agent failed: {0}")]
    Broken(String),
}

impl From<AgentError> for ServiceError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Refused { code, message } => match code {
                ErrorCode::NotFound => ServiceError::NotFound { what: message },
                ErrorCode::InvalidPath | ErrorCode::OutsideRoot => ServiceError::invalid("path", message),
                ErrorCode::IsADirectory
                | ErrorCode::NotADirectory
                | ErrorCode::NotARegularFile
                | ErrorCode::DirectoryNotEmpty
                | ErrorCode::PermissionDenied => ServiceError::Conflict(message),
                ErrorCode::SessionBusy => ServiceError::Conflict(message),
                ErrorCode::InvalidSession => ServiceError::invalid("session", message),
                _ => ServiceError::host("workspace agent", message),
            },
            other => ServiceError::host("workspace agent", other),
        }
    }
}

fn broken(e: impl ToString) -> AgentError {
    AgentError::Broken(e.to_string())
}

/// The agent binary to mount into workspaces, if any (see the module docs).
pub fn binary(config: &Config) -> Option<PathBuf> {
    match config.isolated_workspace.agent_containers.agent_binary.as_deref() {
        Some("") => None,
        Some(p) => is_static_elf(Path::new(p)).then(|| PathBuf::from(p)),
        None => {
            static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
            FOUND.get_or_init(discover).clone()
        }
    }
}

fn discover() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let beside = exe.with_file_name("conductor-agent");
    if is_static_elf(&beside) {
        return Some(beside);
    }
    // target/{debug,release}/conductor, or target/debug/deps/<test binary>.
    let mut built: Vec<(std::time::SystemTime, PathBuf)> = exe
        .ancestors()
        .skip(1)
        .take(3)
        .flat_map(|dir| {
            ["release", "debug"].map(|profile| dir.join(AGENT_TARGET).join(profile).join("conductor-agent"))
        })
        .filter(|p| is_static_elf(p))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    built.sort();
    built.pop().map(|(_, p)| p)
}

/// Whether `path` is an x86-64 ELF executable without a program interpreter (static or
/// static-pie), i.e. one that runs in any image.
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else { return false };
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    };
    // 64-bit, little endian, x86-64.
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01") || u16_at(0x12) != Some(0x3e) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| matches!(u32_at(phoff + i * phentsize), Some(t) if t != PT_INTERP))
}

/// Host directory of a workspace's agent socket.
pub fn socket_dir(paths: &DataPaths, workspace_id: &str) -> PathBuf {
    paths.base.join("agents").join(workspace_id)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ServiceError::host(format!("chmod {}", path.display()), e))
}

/// What a workspace needs to run the agent as PID 1: the mounts and the entrypoint, after
/// making its socket directory. `None` (the `sh` loop as PID 1, Podman exec) without a
/// usable binary or without root (the directory must belong to the workspace user).
pub fn container_setup(
    config: &Config,
    paths: &DataPaths,
    workspace_id: &str,
) -> Result<Option<(Vec<Mount>, Vec<String>)>> {
    let Some(binary) = binary(config) else { return Ok(None) };
    if !host::is_root() {
        return Ok(None);
    }
    let dir = socket_dir(paths, workspace_id);
    let parent = dir.parent().expect("agents/<id>");
    std::fs::create_dir_all(parent).map_err(|e| ServiceError::host(format!("create {}", parent.display()), e))?;
    set_mode(parent, 0o700)?;
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(ServiceError::host(format!("create {}", dir.display()), e))
        }
        _ => {}
    }
    let uid = Some(nix::unistd::Uid::from_raw(WORKSPACE_UID));
    let gid = Some(nix::unistd::Gid::from_raw(WORKSPACE_UID));
    nix::unistd::chown(&dir, uid, gid).map_err(|e| ServiceError::host(format!("chown {}", dir.display()), e))?;
    set_mode(&dir, 0o700)?;
    let mounts = vec![
        Mount::Bind {
            source: binary,
            target: AGENT_PATH.into(),
            readonly: true,
        },
        Mount::Bind {
            source: dir,
            target: SOCKET_DIR.into(),
            readonly: false,
        },
    ];
    Ok(Some((mounts, vec![AGENT_PATH.into(), "init".into()])))
}

/// `(parent pid, start time in clock ticks)` from the text of `/proc/<pid>/stat`.
fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    // The command name (field 2) may hold spaces and parentheses: fields restart after the
    // last ')'. There, field 3 (state) is the first and field 22 (starttime) the 20th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// Which process is a workspace's agent server: its host pid and start time (which tell
/// it apart from a later process reusing the pid).
///
/// The socket lives in a directory the workload can write to (it runs as the agent's
/// uid), so a workload could replace the socket with a server of its own, even the genuine
/// agent binary, and see or fake what conductor sends. [`wait_ready`] therefore records the
/// server right after the container starts, before conductor has run any command in it,
/// in `agents/<id>.server` (the `agents/` directory is root-only and not mounted into the
/// container); [`AgentConn::connect`] accepts only that process. The real server cannot
/// be taken over either: the agent is not dumpable and ptrace is denied by seccomp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerIdentity {
    pub pid: i32,
    pub start_ticks: u64,
}

impl ServerIdentity {
    fn record_path(dir: &Path) -> PathBuf {
        let mut name = dir.file_name().unwrap_or_default().to_os_string();
        name.push(".server");
        dir.with_file_name(name)
    }

    /// The identity of process `pid` if it is an agent server: the agent binary, a child of
    /// the container's PID 1, itself the agent's init.
    fn of(pid: Option<i32>) -> std::result::Result<ServerIdentity, String> {
        let pid = pid.filter(|p| *p > 0).ok_or("no peer process id")?;
        let read = |pid: i32, name: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/{name}")).map_err(|e| format!("pid {pid}: {e}"))
        };
        let is_agent =
            |pid: i32| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == Path::new(AGENT_PATH));
        if !is_agent(pid) {
            return Err(format!("pid {pid} is not {AGENT_PATH}"));
        }
        let (ppid, start_ticks) = parse_stat(&read(pid, "stat")?).ok_or(format!("pid {pid}: unreadable stat"))?;
        let init = read(ppid, "status")?
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|ids| ids.split_whitespace().last() == Some("1"));
        if !init || !is_agent(ppid) {
            return Err(format!("pid {pid} is not a child of the agent's init"));
        }
        Ok(ServerIdentity { pid, start_ticks })
    }

    fn load(dir: &Path) -> Option<ServerIdentity> {
        let text = std::fs::read_to_string(Self::record_path(dir)).ok()?;
        let mut it = text.split_whitespace();
        Some(ServerIdentity {
            pid: it.next()?.parse().ok()?,
            start_ticks: it.next()?.parse().ok()?,
        })
    }

    fn save(&self, dir: &Path) -> std::io::Result<()> {
        let path = Self::record_path(dir);
        let tmp = path.with_extension("server.tmp");
        std::fs::write(&tmp, format!("{} {}\n", self.pid, self.start_ticks))?;
        std::fs::rename(&tmp, &path)
    }
}

/// Removes a workspace's socket directory/// Removes a workspace's socket directory (after its container is gone).
pub fn remove_dir(paths: &DataPaths, workspace_id: &str) {
    let dir = socket_dir(paths, workspace_id);
    let _ = std::fs::remove_file(ServerIdentity::record_path(&dir));
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}

/// Waits until the agent of a just-started workspace answers; false when it does not
/// within a few seconds (exec then falls back to Podman).
pub async fn wait_ready(dir: &Path) -> bool {
    let start = Instant::now();
    // Whatever identity was recorded belongs to an earlier start of the container.
    let _ = std::fs::remove_file(ServerIdentity::record_path(dir));
    loop {
        if let Ok((_, peer)) = AgentConn::connect_any(dir).await {
            match ServerIdentity::of(peer).map(|id| id.save(dir).map(|()| id)) {
                Ok(Ok(_)) => return true,
                Ok(Err(e)) => {
                    tracing::warn!(dir = %dir.display(), "cannot record the agent server: {e}");
                    return false;
                }
                Err(why) => tracing::debug!(dir = %dir.display(), "not the agent server yet: {why}"),
            }
        }
        if start.elapsed() > READY_TIMEOUT {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Whether the agent of the workspace with this socket directory answers.
pub async fn answers(dir: &Path) -> bool {
    AgentConn::connect(dir).await.is_ok()
}

/// What a command run through the agent reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentExit {
    pub code: i32,
    /// The signal that ended the command, when one did.
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub cancelled: bool,
}

/// Where a command's stdin comes from.
pub enum StdinFeed {
    /// `/dev/null`.
    None,
    /// These bytes, then the end.
    Fixed(Bytes),
    /// Chunks as they arrive; the end when the sender is dropped.
    Stream(mpsc::Receiver<Bytes>),
}

/// A byte stream to an agent: a Unix socket here, a port-forward on another backend.
pub trait AgentStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> AgentStream for T {}

/// One connection to a workspace's agent, past `hello`.
pub struct AgentConn {
    stream: Box<dyn AgentStream>,
    wbuf: Vec<u8>,
    /// What the agent said it supports beyond protocol version 1's first requests.
    features: Vec<String>,
}

impl AgentConn {
    /// Connects to the agent listening in `dir` and says hello, after checking that the
    /// process on the socket is the agent server [`wait_ready`] recorded when the
    /// workspace started (see [`ServerIdentity`]).
    pub async fn connect(dir: &Path) -> Result<AgentConn, AgentError> {
        let (conn, peer) = Self::connect_any(dir).await?;
        let recorded = ServerIdentity::load(dir)
            .ok_or_else(|| AgentError::Unavailable("no agent server was recorded when the workspace started".into()))?;
        match ServerIdentity::of(peer) {
            Ok(found) if found == recorded => Ok(conn),
            Ok(found) => {
                tracing::warn!(dir = %dir.display(), ?found, ?recorded, "refusing the process on the agent socket");
                Err(AgentError::Unavailable(format!(
                    "the process on the socket (pid {}) is not the workspace's agent (pid {})",
                    found.pid, recorded.pid
                )))
            }
            Err(why) => Err(AgentError::Unavailable(format!(
                "the process on the socket is not the workspace's agent: {why}"
            ))),
        }
    }

    /// Connects and says hello to whatever listens in `dir`; returns the peer's pid.
    async fn connect_any(dir: &Path) -> Result<(AgentConn, Option<i32>), AgentError> {
        let unavailable = |e: &dyn std::fmt::Display| AgentError::Unavailable(e.to_string());
        let socket = dir.join(SOCKET_NAME);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&socket)
            .map_err(|e| unavailable(&e))?;
        let meta = file.metadata().map_err(|e| unavailable(&e))?;
        if !meta.file_type().is_socket() {
            return Err(AgentError::Unavailable(format!("{} is not a socket", socket.display())));
        }
        let stream = UnixStream::connect(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .await
            .map_err(|e| unavailable(&e))?;
        drop(file);
        let peer = stream.peer_cred().map_err(|e| unavailable(&e))?;
        if peer.uid() != WORKSPACE_UID {
            return Err(AgentError::Unavailable(format!(
                "the process on {} runs as uid {}",
                socket.display(),
                peer.uid()
            )));
        }
        let conn = Self::hello(Box::new(stream)).await?;
        Ok((conn, peer.pid()))
    }

    /// Says hello over a stream a transport opened to an agent (with a timeout).
    pub async fn hello(stream: Box<dyn AgentStream>) -> Result<AgentConn, AgentError> {
        let mut conn = AgentConn {
            stream,
            wbuf: Vec::with_capacity(CHUNK + 256),
            features: Vec::new(),
        };
        let hello = async {
            conn.send(&Request::Hello { version: VERSION }, &[]).await?;
            match conn.recv().await? {
                (Response::Hello { version, features, .. }, _) if version == VERSION => {
                    conn.features = features;
                    Ok(())
                }
                (Response::Error { message, .. }, _) => Err(AgentError::Unavailable(message)),
                (other, _) => Err(AgentError::Unavailable(format!(
                    "unexpected answer to hello: {other:?}"
                ))),
            }
        };
        match tokio::time::timeout(HELLO_TIMEOUT, hello).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) => Err(AgentError::Unavailable(e.to_string())),
            Err(_) => Err(AgentError::Unavailable("no answer to hello".into())),
        }
    }

    /// Whether the agent serves an optional feature (`conductor_agent_protocol::FEATURE_*`).
    pub fn supports(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    async fn send(&mut self, msg: &Request, data: &[u8]) -> Result<(), AgentError> {
        self.wbuf.clear();
        encode(msg, data, &mut self.wbuf);
        self.stream.write_all(&self.wbuf).await.map_err(broken)
    }

    async fn recv(&mut self) -> Result<(Response, Bytes), AgentError> {
        read_frame(&mut self.stream).await
    }

    /// Runs a command, streaming its output into `output` (a full channel slows the command
    /// down; a dropped receiver discards the rest). Dropping the future closes the
    /// connection, which makes the agent kill the command's process group.
    pub async fn exec(
        self,
        req: proto::ExecRequest,
        stdin: Option<Bytes>,
        output: mpsc::Sender<OutputChunk>,
    ) -> Result<AgentExit, AgentError> {
        let feed = match stdin {
            Some(b) => StdinFeed::Fixed(b),
            None => StdinFeed::None,
        };
        self.exec_with(req, feed, None, output).await
    }

    /// [`AgentConn::exec`] with stdin from `stdin` (a stream is fed while the command runs)
    /// and the command's pid sent to `started` once the agent reports it.
    pub async fn exec_with(
        mut self,
        mut req: proto::ExecRequest,
        stdin: StdinFeed,
        started: Option<tokio::sync::oneshot::Sender<u32>>,
        output: mpsc::Sender<OutputChunk>,
    ) -> Result<AgentExit, AgentError> {
        req.stdin = !matches!(stdin, StdinFeed::None);
        let limit = req.timeout_ms.map(|ms| Duration::from_millis(ms) + EXIT_GRACE);
        self.send(&Request::Exec(req), &[]).await?;
        let (mut rd, mut wr) = tokio::io::split(self.stream);
        let feed = async move {
            let mut buf = Vec::with_capacity(CHUNK + 64);
            match stdin {
                StdinFeed::None => return Ok::<_, AgentError>(wr),
                StdinFeed::Fixed(input) => {
                    for chunk in input.chunks(CHUNK) {
                        buf.clear();
                        encode(&Request::Data, chunk, &mut buf);
                        wr.write_all(&buf).await.map_err(broken)?;
                    }
                }
                StdinFeed::Stream(mut rx) => {
                    while let Some(input) = rx.recv().await {
                        for chunk in input.chunks(CHUNK) {
                            buf.clear();
                            encode(&Request::Data, chunk, &mut buf);
                            // The command may have ended (and the agent stopped reading).
                            if wr.write_all(&buf).await.is_err() {
                                return Ok(wr);
                            }
                        }
                    }
                }
            }
            buf.clear();
            encode(&Request::Eof, &[], &mut buf);
            // An ended command no longer reads its stdin: not a failure of the exec.
            let _ = wr.write_all(&buf).await;
            Ok(wr)
        };
        let collect = async move {
            let mut started = started;
            loop {
                match read_frame(&mut rd).await? {
                    (Response::Started { pid }, _) => {
                        if let Some(tx) = started.take() {
                            let _ = tx.send(pid);
                        }
                    }
                    (Response::Stdout, data) => {
                        let _ = output.send(OutputChunk::Stdout(data)).await;
                    }
                    (Response::Stderr, data) => {
                        let _ = output.send(OutputChunk::Stderr(data)).await;
                    }
                    (
                        Response::Exit {
                            code,
                            signal,
                            timed_out,
                            cancelled,
                            ..
                        },
                        _,
                    ) => {
                        return Ok(AgentExit {
                            code,
                            signal,
                            timed_out,
                            cancelled,
                        })
                    }
                    (Response::Error { code, message }, _) => return Err(AgentError::Refused { code, message }),
                    (other, _) => return Err(broken(format!("unexpected message during exec: {other:?}"))),
                }
            }
        };
        let both = async {
            // The writer half must live until the end: dropping it would not close the
            // socket, but keep it anyway so a hang-up only happens when we are dropped. A
            // streamed stdin may still be open when the command ends: the exit wins.
            tokio::pin!(feed);
            tokio::pin!(collect);
            let mut writer = None;
            loop {
                tokio::select! {
                    fed = &mut feed, if writer.is_none() => writer = Some(fed?),
                    exit = &mut collect => return exit,
                }
            }
        };
        match limit {
            None => both.await,
            Some(limit) => tokio::time::timeout(limit, both)
                .await
                .map_err(|_| broken("the agent did not report the end of the command"))?,
        }
    }

    /// Writes `contents` to `path` (relative to `/workspace`, or absolute inside it).
    pub async fn write_file(
        &mut self,
        path: &str,
        contents: &[u8],
        mode: Option<u32>,
        create_dirs: bool,
    ) -> Result<u64, AgentError> {
        let req = replace_request(path, mode, create_dirs);
        self.send(&req, &[]).await?;
        for chunk in contents.chunks(CHUNK) {
            self.send(&Request::Data, chunk).await?;
        }
        self.send(&Request::Eof, &[]).await?;
        match self.recv().await? {
            (Response::Done { size }, _) => Ok(size),
            other => Err(unexpected(other)),
        }
    }

    /// Reads a whole regular file.
    pub async fn read_file(&mut self, path: &str) -> Result<Vec<u8>, AgentError> {
        self.send(&Request::Read { path: path.to_string() }, &[]).await?;
        let mut out = Vec::new();
        loop {
            match self.recv().await? {
                (Response::Data, data) => out.extend_from_slice(&data),
                (Response::Eof { .. }, _) => return Ok(out),
                other => return Err(unexpected(other)),
            }
        }
    }

    pub async fn list(&mut self, path: &str) -> Result<Vec<FileStat>, AgentError> {
        self.send(&Request::List { path: path.to_string() }, &[]).await?;
        match self.recv().await? {
            (Response::List { entries }, _) => Ok(entries),
            other => Err(unexpected(other)),
        }
    }

    pub async fn stat(&mut self, path: &str) -> Result<FileStat, AgentError> {
        self.send(&Request::Stat { path: path.to_string() }, &[]).await?;
        match self.recv().await? {
            (Response::Stat(s), _) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    pub async fn delete(&mut self, path: &str, recursive: bool) -> Result<(), AgentError> {
        let req = Request::Delete {
            path: path.to_string(),
            recursive,
        };
        self.send(&req, &[]).await?;
        match self.recv().await? {
            (Response::Done { .. }, _) => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// Persistent shell sessions (`exec` with a `session`, see [`proto::ExecRequest::session`]).
impl AgentConn {
    /// Whether this agent keeps shell sessions (older agents ignore `session`).
    pub fn has_sessions(&self) -> bool {
        self.supports(proto::FEATURE_SESSIONS)
    }

    /// Ends the session `id`: its shell and every process it started are killed, its files
    /// removed. Fine when there is no such session.
    pub async fn end_session(&mut self, id: &str) -> Result<(), AgentError> {
        self.send(
            &Request::EndSession {
                session: id.to_string(),
            },
            &[],
        )
        .await?;
        match self.recv().await? {
            (Response::Done { .. }, _) => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// A `write` that creates or replaces the whole file.
fn replace_request(path: &str, mode: Option<u32>, create_dirs: bool) -> Request {
    Request::Write {
        path: path.to_string(),
        mode,
        append: false,
        create_dirs,
    }
}

fn unexpected((msg, _): (Response, Bytes)) -> AgentError {
    match msg {
        Response::Error { code, message } => AgentError::Refused { code, message },
        other => broken(format!("unexpected answer: {other:?}")),
    }
}

async fn read_frame<R: AsyncReadExt + Unpin>(rd: &mut R) -> Result<(Response, Bytes), AgentError> {
    let mut prefix = [0u8; 8];
    rd.read_exact(&mut prefix).await.map_err(broken)?;
    let (h, d) = parse_prefix(&prefix).map_err(broken)?;
    let mut buf = vec![0u8; h + d];
    rd.read_exact(&mut buf).await.map_err(broken)?;
    let msg: Response = serde_json::from_slice(&buf[..h]).map_err(|e| broken(format!("bad frame header: {e}")))?;
    Ok((msg, Bytes::from(buf).slice(h..)))
}

/// Streaming file transfers (`write`, `read`, `archive`, `extract`) and `mkdir`: nothing is
/// held whole in memory, only one chunk at a time.
impl AgentConn {
    /// Creates a directory (with `parents`, its missing parents too); an existing one is fine.
    pub async fn mkdir(&mut self, path: &str, mode: Option<u32>, parents: bool) -> Result<(), AgentError> {
        let req = Request::Mkdir {
            path: path.to_string(),
            mode,
            parents,
        };
        self.send(&req, &[]).await?;
        match self.recv().await? {
            (Response::Done { .. }, _) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Creates or replaces the file `path` with the contents of `body`; returns its size.
    pub async fn write_stream(
        self,
        path: &str,
        mode: Option<u32>,
        create_dirs: bool,
        body: conductor_core::engine::ByteStream,
    ) -> Result<u64, AgentError> {
        let req = replace_request(path, mode, create_dirs);
        self.send_body(req, body).await
    }

    /// Unpacks the tar `body` into the existing directory `path`; returns the bytes of
    /// file contents written.
    pub async fn extract_stream(self, path: &str, body: conductor_core::engine::ByteStream) -> Result<u64, AgentError> {
        self.send_body(Request::Extract { path: path.to_string() }, body).await
    }

    /// Sends `req`, then `body` as `data` frames and an `eof`, and reads the `done`. The
    /// agent answers a failure at once: sending stops there.
    async fn send_body(
        mut self,
        req: Request,
        mut body: conductor_core::engine::ByteStream,
    ) -> Result<u64, AgentError> {
        use futures_util::StreamExt;
        self.send(&req, &[]).await?;
        let (mut rd, mut wr) = tokio::io::split(&mut self.stream);
        /// Why sending stopped.
        enum Stop {
            Body(String),
            Socket(AgentError),
        }
        let feed = async {
            let mut buf = Vec::with_capacity(CHUNK + 64);
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| Stop::Body(e.to_string()))?;
                for part in chunk.chunks(CHUNK) {
                    buf.clear();
                    encode(&Request::Data, part, &mut buf);
                    wr.write_all(&buf).await.map_err(|e| Stop::Socket(broken(e)))?;
                }
            }
            buf.clear();
            encode(&Request::Eof, &[], &mut buf);
            wr.write_all(&buf).await.map_err(|e| Stop::Socket(broken(e)))
        };
        let answer = read_frame(&mut rd);
        tokio::pin!(feed, answer);
        let frame = tokio::select! {
            biased;
            early = &mut answer => early?,
            fed = &mut feed => match fed {
                Ok(()) => answer.await?,
                // The request body failed: hang up, the agent drops what it got so far.
                Err(Stop::Body(m)) => return Err(AgentError::Broken(format!("reading the upload failed: {m}"))),
                // The agent may have answered before it stopped reading.
                Err(Stop::Socket(e)) => match tokio::time::timeout(Duration::from_secs(1), answer).await {
                    Ok(Ok(frame)) => frame,
                    _ => return Err(e),
                },
            },
        };
        match frame {
            (Response::Done { size }, _) => Ok(size),
            other => Err(unexpected(other)),
        }
    }

    /// Reads a regular file as a stream of chunks.
    pub async fn read_stream(self, path: &str) -> Result<conductor_core::engine::ByteStream, AgentError> {
        self.receive_stream(Request::Read { path: path.to_string() }).await
    }

    /// A tar of a file or directory as a stream of chunks (see `Request::Archive`).
    pub async fn archive_stream(self, path: &str) -> Result<conductor_core::engine::ByteStream, AgentError> {
        self.receive_stream(Request::Archive { path: path.to_string() }).await
    }

    /// Sends `req` and waits for the first frame, so a refusal is an `Err` here and not
    /// a broken stream later; the rest is read as the stream is polled.
    async fn receive_stream(mut self, req: Request) -> Result<conductor_core::engine::ByteStream, AgentError> {
        use futures_util::StreamExt;
        self.send(&req, &[]).await?;
        let first = match self.recv().await? {
            (Response::Data, data) => data,
            (Response::Eof { .. }, _) => return Ok(Box::pin(futures_util::stream::empty())),
            other => return Err(unexpected(other)),
        };
        let rest = futures_util::stream::unfold(Some(self), |conn| async move {
            let mut conn = conn?;
            match conn.recv().await {
                Ok((Response::Data, data)) => Some((Ok(data), Some(conn))),
                Ok((Response::Eof { .. }, _)) => None,
                Ok(other) => Some((Err(std::io::Error::other(unexpected(other).to_string())), None)),
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        });
        Ok(Box::pin(
            futures_util::stream::once(async move { Ok(first) }).chain(rest),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_static_executables_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let not_elf = dir.path().join("x");
        std::fs::write(&not_elf, b"#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&not_elf));
        assert!(!is_static_elf(&dir.path().join("missing")));
        // Every dynamically linked host binary has an interpreter.
        assert!(!is_static_elf(Path::new("/bin/sh")));
    }

    #[test]
    fn stat_lines_are_parsed_after_the_command_name() {
        let stat =
            "31365 (conductor-agent) S 31355 31365 31355 0 -1 4194560 170 0 0 0 0 0 0 0 20 0 2 0 1209169 8224768 220";
        assert_eq!(parse_stat(stat), Some((31355, 1209169)));
        // A workload may name its process anything, parentheses and spaces included.
        let tricky = "77 (a) S 1 2 3 (b) x) S 9 77 9 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0";
        assert_eq!(parse_stat(tricky), Some((9, 4242)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn only_an_agent_server_has_an_identity() {
        // This test process is not the agent.
        let me = std::process::id() as i32;
        assert!(ServerIdentity::of(Some(me)).unwrap_err().contains("is not"));
        assert!(ServerIdentity::of(None).is_err());
    }

    #[test]
    fn the_identity_is_recorded_next_to_the_socket_directory() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ws-1");
        assert_eq!(ServerIdentity::load(&sock), None);
        let id = ServerIdentity {
            pid: 42,
            start_ticks: 7,
        };
        id.save(&sock).unwrap();
        assert!(dir.path().join("ws-1.server").is_file());
        assert_eq!(ServerIdentity::load(&sock), Some(id));
    }

    #[test]
    fn the_agent_can_be_turned_off() {
        let mut config = Config::default();
        config.isolated_workspace.agent_containers.agent_binary = Some(String::new());
        assert_eq!(binary(&config), None);
        config.isolated_workspace.agent_containers.agent_binary = Some("/bin/sh".into());
        assert_eq!(binary(&config), None, "a dynamic binary is not used");
    }
}
