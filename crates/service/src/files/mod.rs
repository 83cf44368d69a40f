//! Files of a running workspace: upload (a raw file, or a tar unpacked into a directory),
//! download (a raw file, or a tar of a directory), list, stat and delete. This is the one
//! file API of every client: the HTTP `/workspaces/{id}/files` routes, `conductor ws cp`
//! and the MCP file tools, so the path rules are the same for all of them: a path is
//! relative to `/workspace` or absolute under it ([`validate::workspace_path`]), and never
//! leads out of it (not even through a symlink); nothing else of the container (`/tmp`
//! included) is reachable here.
//!
//! # Two ways in
//!
//! This module checks the path, finds the workspace and chooses the way, once per call:
//!
//! - **The agent** (`crates/agent`, when it answers): every path is opened with
//!   `openat2(RESOLVE_BENEATH)` below `/workspace`, as the workspace user; tars are made and
//!   unpacked by the agent (`archive`/`extract`), member by member, through the same checks.
//! - **Podman** ([`podman`]: the agent does not answer, or is too old for `archive`): the
//!   path is first resolved by `realpath` run as the workspace user through Podman exec and
//!   refused when it leaves `/workspace`; then Podman's archive endpoints move the data
//!   (they unpack chrooted into the volume's directory, members owned by the workspace
//!   user), and list, stat and delete run `find`/`stat`/`rm` as the workspace user. Tars
//!   sent this way are checked and rewritten member by member first ([`rewrite`]: the
//!   protocol's [`MemberRules`](conductor_agent_protocol::MemberRules), uid/gid 1000). A
//!   path or member through an absolute symlink is resolved against the workspace's volume
//!   (Podman's chroot), so it may land elsewhere inside the workspace.
//!
//! A directory's tar downloaded to the host is unpacked there by [`Download::unpack_on_host`]
//! (for `conductor ws cp`), on the same member rules.
//!
//! # Limits
//!
//! Paths are checked by [`validate::workspace_path`] before the workspace is looked at.
//! Nothing is held whole in memory: bodies stream through in chunks (a raw upload through
//! the Podman fallback without a known size is spooled to a temporary file first: a tar
//! header needs the size); every tar parsed here goes through a
//! [`TarGuard`](conductor_agent_protocol::TarGuard), which refuses a long-name or pax
//! extension entry over 64 KiB before it is buffered. An upload larger than the
//! workspace's `volume_size` is refused (up front when its size is declared, else when it
//! gets there): [`ServiceError::TooLarge`]; a full volume is [`ServiceError::NoSpace`]. A
//! raw upload that fails midway leaves the previous file, if any, untouched either way: the
//! agent, and Podman's archive endpoint, write a temporary file beside the target that is
//! renamed over it only once complete (through Podman the rename is a `mv` run as the
//! workspace user) and removed on failure; a tar that fails midway leaves the members
//! unpacked so far.

mod podman;
mod rewrite;
mod unpack;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use conductor_agent_protocol::{ErrorCode, FileStat, FEATURE_ARCHIVE};
use conductor_core::engine::ByteStream;
use conductor_core::validate::{self, WORKSPACE_ROOT};

use crate::agent_client::{AgentConn, AgentError};
use crate::channel::Channel;
use crate::exec::ExecPath;
use crate::streams::limited;
use crate::{Conductor, Result, ServiceError};

pub use conductor_agent_protocol::FileKind;

/// One entry of a listing (or a `stat`): name, kind, size, mode, owner, mtime, link target.
pub type FileEntry = FileStat;

/// Options of a raw file upload.
#[derive(Debug, Clone, Copy, Default)]
pub struct PutOptions {
    /// Permission bits of the file (at most 0o777; default 0644 for a new file).
    pub mode: Option<u32>,
    /// The body's size when the caller knows it (`Content-Length`): refused up front when
    /// above the storage limit.
    pub size: Option<u64>,
}

/// What an upload wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The path, absolute in the workspace (`/workspace/…`).
    pub path: String,
    /// Bytes of file contents written.
    pub size: u64,
    /// Through the agent or through Podman.
    pub via: ExecPath,
}

/// What a download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadKind {
    /// The raw contents of a regular file.
    File,
    /// A tar of a directory, entries named from its base name (`src/`, `src/a.py`).
    Archive,
}

/// A download: its kind, its size when known (a file's), and the bytes.
pub struct Download {
    pub kind: DownloadKind,
    pub size: Option<u64>,
    /// Base name of the path (`workspace` for the root), e.g. for a file name. For an
    /// archive, the top-level name of its entries: through Podman that of the path with
    /// its symlinks resolved (`real` for `link -> real`).
    pub name: String,
    pub via: ExecPath,
    /// The contents; an error ends it early (the workspace changed, the agent died).
    pub stream: ByteStream,
}

/// A checked path in a running workspace.
struct Target {
    /// The request is in flight on the workspace while this lives.
    _in_use: Option<std::sync::Arc<crate::pause::InUse>>,
    workspace: String,
    container: String,
    /// How commands reach the workspace (its handle's).
    channel: Channel,
    /// Relative to `/workspace`, cleaned; `""` is `/workspace`.
    rel: String,
    /// The workspace's storage limit in bytes.
    limit: u64,
}

impl Target {
    fn abs(&self) -> String {
        absolute(&self.rel)
    }
    /// The path as sent to the agent (relative to its root; `.` for the root).
    fn agent_path(&self) -> &str {
        if self.rel.is_empty() {
            "."
        } else {
            &self.rel
        }
    }
    fn name(&self) -> String {
        match self.rel.rsplit('/').next() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => "workspace".to_string(),
        }
    }
}

fn absolute(rel: &str) -> String {
    if rel.is_empty() {
        WORKSPACE_ROOT.to_string()
    } else {
        format!("{WORKSPACE_ROOT}/{rel}")
    }
}

/// An agent failure as a service error; `field` names the request part at fault for
/// refused paths (`path`, or `body` for tar members).
fn agent_error(e: AgentError, field: &str) -> ServiceError {
    match e {
        AgentError::Refused { code, message } => match code {
            ErrorCode::InvalidPath | ErrorCode::OutsideRoot => ServiceError::invalid(field, message),
            ErrorCode::InvalidArchive => ServiceError::invalid("body", message),
            ErrorCode::NotFound => ServiceError::not_found(message.trim_end_matches(": No such file or directory")),
            ErrorCode::IsADirectory
            | ErrorCode::NotADirectory
            | ErrorCode::NotARegularFile
            | ErrorCode::DirectoryNotEmpty
            | ErrorCode::PermissionDenied => ServiceError::Conflict(message),
            ErrorCode::NoSpace => ServiceError::NoSpace(format!(
                "{message}: the workspace's volume is full (its limits.volume_size)"
            )),
            _ => ServiceError::host("workspace agent", message),
        },
        other => ServiceError::host("workspace agent", other),
    }
}

fn too_large(limit: u64) -> ServiceError {
    ServiceError::TooLarge(format!(
        "the upload is larger than the workspace's storage limit ({limit} bytes, limits.volume_size)"
    ))
}

impl Conductor {
    /// Checks `path` and finds the running workspace it is in.
    async fn file_target(&self, id: &str, path: &str) -> Result<Target> {
        let rel = validate::workspace_path(path).map_err(|m| ServiceError::invalid("path", m))?;
        let h = self.running(id, "reach its files").await?;
        Ok(Target {
            _in_use: h.in_use.clone(),
            container: h.container().to_string(),
            limit: h.limits.volume_size.bytes(),
            workspace: h.record.id,
            channel: h.channel,
            rel,
        })
    }

    /// The workspace's agent when it answers (and, with `archive`, serves tars).
    async fn agent_for(&self, t: &Target, archive: bool) -> Option<AgentConn> {
        match t.channel.agent().await {
            Some(conn) if !archive || conn.supports(FEATURE_ARCHIVE) => Some(conn),
            Some(_) => {
                tracing::debug!(workspace = %t.workspace, "the agent is too old for archives; files through podman");
                None
            }
            None => {
                tracing::debug!(workspace = %t.workspace, "files through podman");
                None
            }
        }
    }

    /// Writes `body` to the file `path` (missing parent directories are made), as the
    /// workspace user; returns what was written.
    pub async fn put_file(&self, id: &str, path: &str, body: ByteStream, opts: PutOptions) -> Result<Written> {
        let t = self.file_target(id, path).await?;
        if let Some(mode) = opts.mode {
            if mode > 0o777 {
                return Err(ServiceError::invalid(
                    "mode",
                    format!("{mode:o} is not a permission mode (octal, at most 777)"),
                ));
            }
        }
        if t.rel.is_empty() {
            return Err(ServiceError::Conflict(
                "/workspace is a directory; upload a tar with extract=true to fill it".into(),
            ));
        }
        if opts.size.is_some_and(|n| n > t.limit) {
            return Err(too_large(t.limit));
        }
        let over = Arc::new(AtomicBool::new(false));
        let body = limited(body, t.limit, over.clone());
        let result = match self.agent_for(&t, false).await {
            Some(conn) => conn
                .write_stream(t.agent_path(), opts.mode, true, body)
                .await
                .map(|size| (size, ExecPath::Agent))
                .map_err(|e| agent_error(e, "path")),
            None => self
                .podman_put_file(&t, body, opts)
                .await
                .map(|size| (size, ExecPath::Podman)),
        };
        // Both ways write a temporary file beside the target and rename it over the target
        // only at the end, removing it on failure: the previous file, if any, stays.
        written(&t, result, &over)
    }

    /// Unpacks the tar `body` into the directory `path` (made when missing), as the
    /// workspace user; returns the bytes of file contents written.
    pub async fn put_archive(&self, id: &str, path: &str, body: ByteStream, size: Option<u64>) -> Result<Written> {
        let t = self.file_target(id, path).await?;
        if size.is_some_and(|n| n > t.limit) {
            return Err(too_large(t.limit));
        }
        let over = Arc::new(AtomicBool::new(false));
        let body = limited(body, t.limit, over.clone());
        let result = match self.agent_for(&t, true).await {
            Some(mut conn) => {
                conn.mkdir(t.agent_path(), None, true)
                    .await
                    .map_err(|e| agent_error(e, "path"))?;
                conn.extract_stream(t.agent_path(), body)
                    .await
                    .map(|size| (size, ExecPath::Agent))
                    .map_err(|e| agent_error(e, "body"))
            }
            None => self
                .podman_put_archive(&t, body)
                .await
                .map(|size| (size, ExecPath::Podman)),
        };
        written(&t, result, &over)
    }

    /// Downloads `path`: a regular file raw, a directory as a tar.
    pub async fn get_file(&self, id: &str, path: &str) -> Result<Download> {
        let t = self.file_target(id, path).await?;
        if let Some(mut conn) = self.agent_for(&t, false).await {
            let st = conn.stat(t.agent_path()).await.map_err(|e| agent_error(e, "path"))?;
            match st.kind {
                FileKind::File => {
                    let stream = conn
                        .read_stream(t.agent_path())
                        .await
                        .map_err(|e| agent_error(e, "path"))?;
                    return Ok(Download {
                        kind: DownloadKind::File,
                        size: Some(st.size),
                        name: t.name(),
                        via: ExecPath::Agent,
                        stream,
                    });
                }
                FileKind::Dir if conn.supports(FEATURE_ARCHIVE) => {
                    let stream = conn
                        .archive_stream(t.agent_path())
                        .await
                        .map_err(|e| agent_error(e, "path"))?;
                    return Ok(Download {
                        kind: DownloadKind::Archive,
                        size: None,
                        name: t.name(),
                        via: ExecPath::Agent,
                        stream,
                    });
                }
                FileKind::Dir => {}
                _ => return Err(not_regular(&t.abs())),
            }
        }
        self.podman_get(&t).await
    }

    /// The entries of the directory `path`, sorted by name (links are not followed).
    pub async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileEntry>> {
        let t = self.file_target(id, path).await?;
        match self.agent_for(&t, false).await {
            Some(mut conn) => conn.list(t.agent_path()).await.map_err(|e| agent_error(e, "path")),
            None => self.podman_list(&t).await,
        }
    }

    /// Facts about `path` (a symlink inside the workspace is followed).
    pub async fn stat_file(&self, id: &str, path: &str) -> Result<FileEntry> {
        let t = self.file_target(id, path).await?;
        match self.agent_for(&t, false).await {
            Some(mut conn) => conn.stat(t.agent_path()).await.map_err(|e| agent_error(e, "path")),
            None => self.podman_stat(&t).await,
        }
    }

    /// Deletes a file, a symlink (not its target) or a directory (with `recursive`, with
    /// its contents). `/workspace` itself is refused.
    pub async fn delete_file(&self, id: &str, path: &str, recursive: bool) -> Result<()> {
        let t = self.file_target(id, path).await?;
        if t.rel.is_empty() {
            return Err(ServiceError::invalid(
                "path",
                "/workspace itself cannot be deleted (delete what is in it)",
            ));
        }
        match self.agent_for(&t, false).await {
            Some(mut conn) => conn
                .delete(t.agent_path(), recursive)
                .await
                .map_err(|e| agent_error(e, "path")),
            None => self.podman_delete(&t, recursive).await,
        }
    }
}

impl Conductor {
    /// Makes the directory `path` with its missing parents, as the workspace user. `false`
    /// when it already existed; a conflict when something else is there.
    pub async fn make_dir(&self, id: &str, path: &str) -> Result<bool> {
        let t = self.file_target(id, path).await?;
        match self.agent_for(&t, true).await {
            Some(mut conn) => {
                match conn.stat(t.agent_path()).await {
                    Ok(s) if s.kind == FileKind::Dir => return Ok(false),
                    Ok(_) => {
                        return Err(ServiceError::Conflict(format!(
                            "{} exists and is not a directory",
                            t.abs()
                        )))
                    }
                    Err(AgentError::Refused {
                        code: ErrorCode::NotFound,
                        ..
                    }) => {}
                    Err(e) => return Err(agent_error(e, "path")),
                }
                conn.mkdir(t.agent_path(), None, true)
                    .await
                    .map_err(|e| agent_error(e, "path"))?;
                Ok(true)
            }
            None => {
                if self.podman_stat(&t).await.is_ok() {
                    return Ok(false);
                }
                self.run_file_command(&t, "mkdir -p -- \"$1\"", &[&t.abs()]).await?;
                Ok(true)
            }
        }
    }

    /// Renames `from` to `to` (both in `/workspace`), as the workspace user; an existing
    /// file at `to` is replaced, a directory there is a conflict.
    pub async fn move_path(&self, id: &str, from: &str, to: &str) -> Result<()> {
        let dest = validate::workspace_path(to).map_err(|m| ServiceError::invalid("destination", m))?;
        let t = self.file_target(id, from).await?;
        if t.rel.is_empty() || dest.is_empty() {
            return Err(ServiceError::invalid("path", "/workspace itself cannot be moved"));
        }
        self.run_file_command(&t, "mv -f -T -- \"$1\" \"$2\"", &[&t.abs(), &absolute(&dest)])
            .await
    }

    /// Runs a file command (`sh -c script` with `args`) as the workspace user through the
    /// workspace's channel; a failure becomes not-found or a conflict with its message.
    async fn run_file_command(&self, t: &Target, script: &str, args: &[&str]) -> Result<()> {
        let mut argv: Vec<String> = vec!["/bin/sh".into(), "-c".into(), script.into(), "sh".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let collect = async move {
            let mut err = Vec::new();
            while let Some(chunk) = rx.recv().await {
                if let conductor_core::engine::OutputChunk::Stderr(b) = chunk {
                    err.extend_from_slice(&b);
                }
            }
            String::from_utf8_lossy(&err).trim().to_string()
        };
        let req = crate::exec::ExecRequest::new(crate::exec::Command::Argv(argv));
        let (outcome, err) = tokio::join!(t.channel.exec(req, tx), collect);
        let (outcome, _) = outcome?;
        match outcome.exit_code {
            0 => Ok(()),
            _ if err.contains("No such file or directory") => Err(ServiceError::not_found(
                err.rsplit(": ")
                    .nth(1)
                    .unwrap_or(args[0])
                    .trim_matches(|c| c == '\'' || c == '"')
                    .to_string(),
            )),
            _ => Err(ServiceError::Conflict(err)),
        }
    }
}

fn not_regular(path: &str) -> ServiceError {
    ServiceError::Conflict(format!("{path} is neither a regular file nor a directory"))
}

/// What an upload reports: its size and path, or why it failed (too large when the body
/// went over the storage limit, whatever broke off the upload then).
fn written(t: &Target, result: Result<(u64, ExecPath)>, over: &AtomicBool) -> Result<Written> {
    match result {
        Ok((size, via)) => Ok(Written {
            path: t.abs(),
            size,
            via,
        }),
        Err(_) if over.load(Ordering::Relaxed) => Err(too_large(t.limit)),
        Err(e) => Err(e),
    }
}
