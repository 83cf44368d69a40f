//! The wire protocol between conductor and `conductor-agent`, the in-workspace agent.
//!
//! Shared by the agent (blocking std I/O) and the service (Tokio), so both sides agree on
//! one definition of every message, of the frame layout and of the path rules. Full
//! description with examples: `docs/agent-protocol.md`.
//!
//! # Frames
//!
//! Every message is one frame: an 8-byte prefix, a JSON header, then raw data bytes:
//!
//! ```text
//! u32 big-endian  header length  (1 ..= MAX_HEADER)
//! u32 big-endian  data length    (0 ..= MAX_DATA)
//! header          JSON object with a "type" field (Request or Response)
//! data            raw bytes: stdin, stdout/stderr chunks, file contents; empty otherwise
//! ```
//!
//! Output and file contents travel as raw bytes beside the header, never inside the JSON,
//! so streaming 100 MiB costs no base64 and no escaping.
//!
//! # Conversation
//!
//! The client opens a connection and sends `hello` with its [`VERSION`]; the agent answers
//! `hello` (or `error` with code `unsupported_version` and closes). Then requests run one
//! at a time on that connection; concurrent work uses more connections. A client that
//! closes the connection while a command runs cancels it.

use std::fmt;

use serde::{Deserialize, Serialize};

pub mod tar_guard;
pub use tar_guard::{Member, MemberKind, MemberRules, TarGuard};

/// Version of this protocol. The agent refuses any other.
pub const VERSION: u32 = 1;
/// Largest JSON header accepted (an exec with a large environment fits).
pub const MAX_HEADER: u32 = 4 << 20;
/// Largest data part of one frame.
pub const MAX_DATA: u32 = 1 << 20;
/// Size of the data chunks the agent sends (output and file contents).
pub const CHUNK: usize = 64 << 10;
/// Longest path accepted by file operations, in bytes (`PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Longest single path component, in bytes (`NAME_MAX`).
pub const MAX_NAME: usize = 255;
/// Where the agent's socket directory is mounted in a workspace.
pub const SOCKET_DIR: &str = "/run/conductor";
/// File name of the agent's socket in its directory.
pub const SOCKET_NAME: &str = "agent.sock";
/// Where a workspace in the "proxy" network mode finds the host's egress proxy: a directory
/// bind-mounted read-only (the workload can connect to the socket but not replace it).
pub const EGRESS_SOCKET_DIR: &str = "/run/conductor-egress";
/// File name of the egress proxy's Unix socket in [`EGRESS_SOCKET_DIR`].
pub const EGRESS_SOCKET_NAME: &str = "egress.sock";
/// Where the agent's egress relay listens in the workspace (`--egress-listen`), relaying
/// every connection to the egress socket: what `HTTP(S)_PROXY` points at.
pub const EGRESS_DEFAULT_LISTEN: &str = "127.0.0.1:3128";
/// Most connections the agent's egress relay carries at once; beyond it, a new connection
/// is closed at once (the host proxy applies its own, lower limit, with an answer).
pub const EGRESS_MAX_CONNECTIONS: usize = 256;

/// A message from conductor to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First message of every connection.
    Hello { version: u32 },
    /// Runs a command; answered by `started`, `stdout`/`stderr` chunks, then `exit`.
    Exec(ExecRequest),
    /// A chunk of bytes (frame data): the command's stdin, or the contents of a `write`.
    Data,
    /// End of the stdin of a running command, or of the contents of a `write`.
    Eof,
    /// Kills the running command's process group (and every process carrying its marker).
    Cancel,
    /// Creates or replaces a file; its contents follow as `data` frames and an `eof`.
    Write {
        path: String,
        /// Permission bits of a new file (default 0644).
        #[serde(default)]
        mode: Option<u32>,
        /// Appends instead of replacing.
        #[serde(default)]
        append: bool,
        /// Creates missing parent directories.
        #[serde(default)]
        create_dirs: bool,
    },
    /// Reads a regular file: answered by `data` frames and an `eof`.
    Read { path: String },
    /// Lists a directory (entries are not followed).
    List { path: String },
    /// Describes a path (a symlink inside the root is followed).
    Stat { path: String },
    /// Deletes a file, a symlink (not its target) or a directory.
    Delete {
        path: String,
        /// Deletes a directory with its contents.
        #[serde(default)]
        recursive: bool,
    },
    /// Creates a directory (an existing one is fine); answered by `done`.
    Mkdir {
        path: String,
        /// Permission bits (default 0755).
        #[serde(default)]
        mode: Option<u32>,
        /// Creates missing parent directories.
        #[serde(default)]
        parents: bool,
    },
    /// Streams a tar of a file or directory (symlinks below `path` are archived as links,
    /// never followed): `data` frames, then `eof`. Entries are named relative to the
    /// parent of `path` (`src/`, `src/a.py`), as `docker cp` does.
    Archive { path: String },
    /// Unpacks the tar that follows as `data` frames and an `eof` into the existing
    /// directory `path`; answered by `done` with the bytes of file contents written.
    Extract { path: String },
    /// Ends a session (see [`ExecRequest::session`]): kills its shell and every process it
    /// started, removes its files; answered by `done` (also when no such session exists).
    EndSession { session: String },
}

/// What an agent that answers `hello` with these features supports beyond the first
/// protocol version's requests (`features` of `hello`; additions keep [`VERSION`]).
pub const FEATURE_ARCHIVE: &str = "archive";
/// `exec` with `session` and `end_session`: one long-lived shell per session id.
pub const FEATURE_SESSIONS: &str = "sessions";
/// Longest session id, in bytes.
pub const MAX_SESSION_ID: usize = 64;

/// What to run and how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program and its arguments, run directly (no shell). Exactly one of `argv` and
    /// `shell` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A command line for `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Working directory; default: the agent's (the container's working directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Added to (or replacing in) the container's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The command reads `data` frames as stdin until `eof`; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kills the process group after this long and reports `timed_out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// An environment entry `NAME=value` of `env`: on timeout or cancel, every process of the
    /// container whose environment holds it is killed too (this reaches processes that left
    /// the process group with `setsid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_marker: Option<String>,
    /// Runs `shell` in the session's long-lived shell instead of a new process: `cd`,
    /// variables, functions and aliases carry over to the next command of the session. The
    /// first command starts the shell with its `env`, `cwd` and `kill_marker`; later ones
    /// use the shell as it is (their `env` and `cwd` are ignored). Needs `shell`, not
    /// `argv`, and no `stdin`. See [`valid_session_id`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// Checks a session id: 1 to [`MAX_SESSION_ID`] bytes of `A-Z a-z 0-9 _ -`.
pub fn valid_session_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_SESSION_ID {
        return Err(format!("a session id has 1 to {MAX_SESSION_ID} characters"));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err("a session id may only hold letters, digits, '_' and '-'".into());
    }
    Ok(())
}

/// A message from the agent to conductor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `hello`.
    Hello {
        version: u32,
        /// `conductor-agent <crate version>`.
        agent: String,
        /// The serving process's pid in the container.
        pid: u32,
        /// Optional requests this agent serves (e.g. [`FEATURE_ARCHIVE`]: `mkdir`,
        /// `archive`, `extract`); absent from older agents.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// The command was started with this pid (also its process group id).
    Started { pid: u32 },
    /// A chunk of the command's standard output (frame data).
    Stdout,
    /// A chunk of the command's standard error (frame data).
    Stderr,
    /// The command ended. `code` is its exit code, or 128 + the signal that killed it.
    Exit {
        code: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        timed_out: bool,
        cancelled: bool,
        duration_ms: u64,
    },
    /// A chunk of file contents (frame data).
    Data,
    /// End of a file's contents; `size` bytes were sent.
    Eof { size: u64 },
    /// A `write` or `delete` succeeded; `size` is the bytes written (0 for delete).
    Done { size: u64 },
    /// Answer to `stat`.
    Stat(FileStat),
    /// Answer to `list`, sorted by name.
    List { entries: Vec<FileStat> },
    /// A request failed; the connection stays usable unless the code is `protocol`.
    Error { code: ErrorCode, message: String },
}

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One file's facts, as `stat` and `list` report them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// The entry's name (the last path component; `""` for the root).
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Last modification, milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    /// Target of a symlink (as stored, not resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed frame or a message out of turn; the agent closes the connection.
    Protocol,
    UnsupportedVersion,
    /// The path is empty, holds NUL or `..`, or is too long.
    InvalidPath,
    /// The path, or a symlink on the way, leads outside the allowed root.
    OutsideRoot,
    NotFound,
    PermissionDenied,
    IsADirectory,
    NotADirectory,
    /// Neither a regular file nor a directory (device, FIFO, socket).
    NotARegularFile,
    DirectoryNotEmpty,
    /// The command could not be started.
    SpawnFailed,
    /// The workspace's volume is full (ENOSPC, EDQUOT).
    NoSpace,
    /// A tar given to `extract` is malformed or holds a member that is refused (a bad
    /// name, a hard link, a device); the message names the member.
    InvalidArchive,
    /// The session id is malformed, or the request cannot run in a session.
    InvalidSession,
    /// Another command of the session is still running.
    SessionBusy,
    /// Any other I/O error; the message has the detail.
    Io,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// A frame prefix that breaks the limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError(pub String);

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FrameError {}

/// Reads the 8-byte prefix: (header length, data length), checked against the limits.
pub fn parse_prefix(prefix: &[u8; 8]) -> Result<(usize, usize), FrameError> {
    let header = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let data = u32::from_be_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    if header == 0 || header > MAX_HEADER {
        return Err(FrameError(format!(
            "frame header of {header} bytes (allowed 1..={MAX_HEADER})"
        )));
    }
    if data > MAX_DATA {
        return Err(FrameError(format!("frame data of {data} bytes (at most {MAX_DATA})")));
    }
    Ok((header as usize, data as usize))
}

/// Appends one frame (`message` as the JSON header, then `data`) to `out`.
///
/// # Panics
/// When `data` is longer than [`MAX_DATA`]: callers chunk their data.
pub fn encode<T: Serialize>(message: &T, data: &[u8], out: &mut Vec<u8>) {
    assert!(data.len() <= MAX_DATA as usize, "frame data larger than MAX_DATA");
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    // Serializing our own enums to a Vec cannot fail.
    serde_json::to_writer(&mut *out, message).expect("serialize a protocol message");
    let header = (out.len() - start - 8) as u32;
    out[start..start + 4].copy_from_slice(&header.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A path of a file operation, checked and made relative to the allowed root.
///
/// `path` may be absolute (then it must be `root` or lie under it) or relative to `root`.
/// Refused: empty, NUL bytes, longer than [`MAX_PATH`] or a component longer than
/// [`MAX_NAME`], any `..` component, and absolute paths outside `root`. `.` components and
/// repeated slashes are dropped. The result is `""` for the root itself. Symlinks are not
/// looked at here: the agent resolves them beneath the root when it opens the path.
pub fn confine(path: &str, root: &str) -> Result<String, (ErrorCode, String)> {
    let invalid = |m: String| (ErrorCode::InvalidPath, m);
    check_whole(path.as_bytes()).map_err(invalid)?;
    let root = root.trim_end_matches('/');
    let rel = match path.strip_prefix('/') {
        Some(abs) => {
            let abs = format!("/{}", abs.trim_start_matches('/'));
            if abs == root {
                String::new()
            } else if let Some(rest) = abs.strip_prefix(root).and_then(|r| r.strip_prefix('/')) {
                rest.to_string()
            } else {
                return Err((ErrorCode::OutsideRoot, format!("{path} is outside {root}")));
            }
        }
        None => path.to_string(),
    };
    let parts = components(rel.as_bytes()).map_err(invalid)?;
    // Split at '/' only, so every part is a whole piece of the UTF-8 input.
    Ok(String::from_utf8_lossy(&parts.join(&b'/')).into_owned())
}

/// The checks of a whole path: not empty, no NUL byte, at most [`MAX_PATH`] bytes.
fn check_whole(path: &[u8]) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.contains(&0) {
        return Err("the path contains a NUL byte".into());
    }
    if path.len() > MAX_PATH {
        return Err(format!("the path is longer than {MAX_PATH} bytes"));
    }
    Ok(())
}

/// The components of a relative path: `.` and empty ones dropped, `..` refused, each at
/// most [`MAX_NAME`] bytes.
fn components(rel: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut parts = Vec::new();
    for part in rel.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("'..' is not allowed in paths".into()),
            p if p.len() > MAX_NAME => return Err(format!("a path component is longer than {MAX_NAME} bytes")),
            p => parts.push(p),
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        encode(&Request::Hello { version: VERSION }, b"", &mut buf);
        encode(&Response::Stdout, b"abc", &mut buf);
        let (h, d) = parse_prefix(buf[..8].try_into().unwrap()).unwrap();
        assert_eq!(d, 0);
        let msg: Request = serde_json::from_slice(&buf[8..8 + h]).unwrap();
        assert_eq!(msg, Request::Hello { version: 1 });
        let rest = &buf[8 + h..];
        let (h2, d2) = parse_prefix(rest[..8].try_into().unwrap()).unwrap();
        assert_eq!(&rest[8..8 + h2], br#"{"type":"stdout"}"#);
        assert_eq!(&rest[8 + h2..8 + h2 + d2], b"abc");
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut p = [0u8; 8];
        assert!(parse_prefix(&p).is_err(), "empty header");
        p[..4].copy_from_slice(&(MAX_HEADER + 1).to_be_bytes());
        assert!(parse_prefix(&p).is_err());
        p[..4].copy_from_slice(&2u32.to_be_bytes());
        p[4..].copy_from_slice(&(MAX_DATA + 1).to_be_bytes());
        assert!(parse_prefix(&p).is_err());
    }

    #[test]
    fn messages_have_stable_names() {
        let exec = Request::Exec(ExecRequest {
            argv: Some(vec!["true".into()]),
            timeout_ms: Some(5),
            ..Default::default()
        });
        let v = serde_json::to_value(&exec).unwrap();
        assert_eq!(v["type"], "exec");
        assert_eq!(v["argv"][0], "true");
        let err = Response::Error {
            code: ErrorCode::OutsideRoot,
            message: "x".into(),
        };
        assert_eq!(serde_json::to_value(&err).unwrap()["code"], "outside_root");
        assert_eq!(ErrorCode::NotARegularFile.to_string(), "not_a_regular_file");
    }

    #[test]
    fn paths_are_confined_to_the_root() {
        let ok = |p: &str| confine(p, "/workspace").unwrap();
        let code = |p: &str| confine(p, "/workspace").unwrap_err().0;
        assert_eq!(ok("/workspace"), "");
        assert_eq!(ok("/workspace/"), "");
        assert_eq!(ok("//workspace//a/./b/"), "a/b");
        assert_eq!(ok("a/b.txt"), "a/b.txt");
        assert_eq!(ok("."), "");
        assert_eq!(code("/workspace/../etc/passwd"), ErrorCode::InvalidPath);
        assert_eq!(code("a/../../x"), ErrorCode::InvalidPath);
        assert_eq!(code("/etc/passwd"), ErrorCode::OutsideRoot);
        assert_eq!(code("/workspacex/a"), ErrorCode::OutsideRoot);
        assert_eq!(code(""), ErrorCode::InvalidPath);
        assert_eq!(code("a\0b"), ErrorCode::InvalidPath);
        assert_eq!(code(&"a".repeat(MAX_PATH + 1)), ErrorCode::InvalidPath);
        assert_eq!(code(&"a".repeat(MAX_NAME + 1)), ErrorCode::InvalidPath);
    }

    #[test]
    fn session_ids_are_short_and_plain() {
        assert!(valid_session_id("3f2a9c1e-77b0-4b0e-9d43-0a1b2c3d4e5f").is_ok());
        assert!(valid_session_id("build_1").is_ok());
        assert!(valid_session_id(&"a".repeat(MAX_SESSION_ID)).is_ok());
        for bad in ["", "a/b", "..", "a b", "a\0", "é", "a.b", "$(x)"] {
            assert!(valid_session_id(bad).is_err(), "{bad:?}");
        }
        assert!(valid_session_id(&"a".repeat(MAX_SESSION_ID + 1)).is_err());
    }

    #[test]
    fn sessions_stay_compatible_with_version_1() {
        // An exec without a session serializes as before; an old client's exec parses.
        let plain = serde_json::to_value(Request::Exec(ExecRequest {
            shell: Some("true".into()),
            ..Default::default()
        }))
        .unwrap();
        assert!(plain.get("session").is_none(), "{plain}");
        let old: Request = serde_json::from_str(r#"{"type":"exec","shell":"true"}"#).unwrap();
        assert!(matches!(old, Request::Exec(ExecRequest { session: None, .. })));
        let end: Request = serde_json::from_str(r#"{"type":"end_session","session":"t1"}"#).unwrap();
        assert_eq!(end, Request::EndSession { session: "t1".into() });
        assert_eq!(ErrorCode::SessionBusy.to_string(), "session_busy");
    }
}
